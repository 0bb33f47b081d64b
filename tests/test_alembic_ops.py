"""The Alembic operations and autogenerate hooks, in process, on SQLite and Postgres."""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.autogenerate import produce_migrations, render_python_code, renderers
from alembic.autogenerate.api import AutogenContext
from alembic.operations import Operations, ops
from alembic.runtime.migration import MigrationContext

import sqlalchemy_envelope.alembic as envelope_alembic
from sqlalchemy_envelope import ConfigurationError, Encrypted, Envelope, LocalKms, wire
from sqlalchemy_envelope.alembic import DecryptColumnOp, EncryptColumnOp
from sqlalchemy_envelope.jobs import encrypt_column


def models(envelope_name: str = "envelope_data_keys") -> tuple[sa.MetaData, Envelope]:
    metadata = sa.MetaData()
    envelope = Envelope(metadata, table_name=envelope_name)
    sa.Table(
        "people",
        metadata,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", Encrypted(sa.String(80), envelope), nullable=False),
        sa.Column("email", Encrypted(sa.String(120), envelope, deterministic=True), unique=True),
        sa.Column("born", Encrypted(sa.Date, envelope, scope="dates")),
        sa.Column("city", sa.String(50)),
    )
    return metadata, envelope


@pytest.fixture
def engine(db_url: str, make_engine: Callable[..., sa.Engine]) -> sa.Engine:
    return make_engine(db_url)


@pytest.fixture
def migrate(engine: sa.Engine) -> Iterator[Callable[..., Operations]]:
    """``migrate(target_metadata)`` -> ``op`` inside a migration transaction."""
    connections: list[sa.Connection] = []

    def make(target: Any = None) -> Operations:
        conn = engine.connect()
        connections.append(conn)
        context = MigrationContext.configure(conn, opts={"target_metadata": target})
        return Operations(context)

    yield make
    for conn in connections:
        if conn.in_transaction():
            conn.commit()
        conn.close()


def create_plain_people(op: Operations) -> None:
    op.create_table(
        "people",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(80), nullable=False),
        sa.Column("email", sa.String(120)),
        sa.Column("born", sa.Date),
        sa.Column("city", sa.String(50)),
        sa.UniqueConstraint("email", name="uq_people_email"),
    )


def insert_people(
    engine: sa.Engine, n: int = 120, table: sa.Table | None = None
) -> list[tuple[Any, ...]]:
    """``n`` rows, written through ``table`` (default: as they are, into a plain table)."""
    import datetime as dt

    rows = [
        {
            "id": i,
            "name": f"Person {i}",
            "email": f"p{i}@example.org",
            "born": dt.date(1980, 1, 1) + dt.timedelta(days=i) if i % 5 else None,
            "city": "Lyon",
        }
        for i in range(1, n + 1)
    ]
    with engine.begin() as conn:
        target = table if table is not None else sa.table("people", *map(sa.column, rows[0]))
        conn.execute(target.insert(), rows)
    return [tuple(r.values()) for r in rows]


def in_order(table: sa.Table) -> sa.Select[Any]:
    """The columns in their original order (a conversion moves its column to the end)."""
    names = ("id", "name", "email", "born", "city")
    return sa.select(*(table.c[n] for n in names)).order_by(table.c.id)


def test_operations_find_the_envelope_in_target_metadata(
    engine: sa.Engine, migrate: Callable[..., Operations], local_kms: LocalKms
) -> None:
    metadata, envelope = models()
    envelope.configure(kms=local_kms, engine=engine)
    op = migrate(metadata)
    with op.get_context().begin_transaction():
        op.create_keyring_table()
        create_plain_people(op)
    expected = insert_people(engine)

    op = migrate(metadata)
    with op.get_context().begin_transaction():
        # Encrypted(...) without an envelope, as in a migration file.
        op.encrypt_column("people", "name", Encrypted(sa.String(80)), batch_size=50)
        op.encrypt_column(
            "people", "email", Encrypted(sa.String(120), deterministic=True), batch_size=50
        )
        op.encrypt_column("people", "born", Encrypted(sa.Date, scope="dates"), batch_size=50)
    people = metadata.tables["people"]
    with engine.connect() as conn:
        assert [tuple(r) for r in conn.execute(sa.select(people).order_by(people.c.id))] == expected
        found = conn.execute(
            sa.select(people.c.id).where(people.c.email == "p7@example.org")
        ).scalar_one()
        assert found == 7
    assert {k.scope for k in envelope.keys()} == {"people", "dates"}

    new = envelope.rotate("people")
    op = migrate(metadata)
    with op.get_context().begin_transaction():
        op.reencrypt_column("people", "name", batch_size=50)
    with engine.connect() as conn:
        names = [bytes(v) for (v,) in conn.execute(sa.text("SELECT name FROM people"))]
        emails = [bytes(v) for (v,) in conn.execute(sa.text("SELECT email FROM people"))]
    assert {wire.key_id_of(v) for v in names} == {new}
    assert new not in {wire.key_id_of(v) for v in emails}  # only the named column moved

    op = migrate(metadata)
    with op.get_context().begin_transaction():
        for name, type_ in (
            ("name", sa.String(80)),
            ("email", sa.String(120)),
            ("born", sa.Date()),
        ):
            op.decrypt_column("people", name, type_, batch_size=50)
    plain = sa.Table("people", sa.MetaData(), autoload_with=engine)
    with engine.connect() as conn:
        assert [tuple(r) for r in conn.execute(in_order(plain))] == expected
    op = migrate(metadata)
    with op.get_context().begin_transaction():
        op.drop_table("people")
        op.drop_keyring_table()
    assert sa.inspect(engine).get_table_names() == []


def test_explicit_envelope_and_missing_envelope(
    engine: sa.Engine, migrate: Callable[..., Operations], local_kms: LocalKms
) -> None:
    _, envelope = models("custom_keys")
    envelope.configure(kms=local_kms, engine=engine)
    op = migrate(None)
    with op.get_context().begin_transaction():
        op.create_keyring_table(envelope=envelope)
        create_plain_people(op)
    insert_people(engine, 10)
    assert "custom_keys" in sa.inspect(engine).get_table_names()
    with pytest.raises(ConfigurationError, match=r"in env\.py"):
        migrate(models()[0]).encrypt_column("people", "name", Encrypted(sa.String(80)))
    op = migrate(sa.MetaData())
    with pytest.raises(ConfigurationError, match="target_metadata"):
        op.encrypt_column("people", "name", Encrypted(sa.String(80)))
    op.encrypt_column("people", "name", Encrypted(sa.String(80)), envelope=envelope)
    from sqlalchemy_envelope.jobs import verify

    report = verify(envelope, "people", bind=engine)
    assert report.columns["name"].ok and report.columns["name"].plaintext == 0
    # email and born are declared encrypted but not converted: verify says so.
    assert report.columns["email"].plaintext == 10 and not report.ok


def test_offline_mode_renders_ddl_and_refuses_batch_jobs() -> None:
    metadata, _ = models()
    buffer = io.StringIO()
    context = MigrationContext.configure(
        dialect_name="postgresql",
        opts={"as_sql": True, "output_buffer": buffer, "target_metadata": metadata},
    )
    op = Operations(context)
    op.create_keyring_table()
    assert "CREATE TABLE envelope_data_keys" in buffer.getvalue()
    op.drop_keyring_table()
    assert "DROP TABLE envelope_data_keys" in buffer.getvalue()
    for call in (
        lambda: op.encrypt_column("people", "name", Encrypted(sa.String(80))),
        lambda: op.decrypt_column("people", "name", sa.String(80)),
        lambda: op.reencrypt_column("people", "name"),
    ):
        with pytest.raises(ConfigurationError, match=r"offline \(--sql\) mode"):
            call()


def test_reverse_operations() -> None:
    encrypt = EncryptColumnOp("people", "name", Encrypted(sa.String(80)), batch_size=10)
    decrypt = encrypt.reverse()
    assert isinstance(decrypt, DecryptColumnOp)
    assert (decrypt.table_name, decrypt.column_name, decrypt.batch_size) == ("people", "name", 10)
    assert isinstance(decrypt.type_, sa.String) and decrypt.type_.length == 80
    create = envelope_alembic.CreateKeyringTableOp("k")
    assert isinstance(create.reverse(), envelope_alembic.DropKeyringTableOp)
    assert create.reverse().reverse().table_name == "k"


def rendered_imports(context: MigrationContext, upgrade_ops: ops.UpgradeOps) -> set[str]:
    """The import lines autogenerate would add to the migration file."""
    autogen = AutogenContext(
        context,
        opts={
            "render_item": envelope_alembic.render_item,
            "sqlalchemy_module_prefix": "sa.",
            "alembic_module_prefix": "op.",
            "user_module_prefix": None,
        },
    )
    for op in upgrade_ops.ops:
        renderers.dispatch(op)(autogen, op)
    return set(autogen.imports)


def run(body: str, namespace: dict[str, Any]) -> None:
    """Run a rendered migration body as the ``upgrade()`` of a migration file would."""
    exec(f"def migration():\n    {body}\n", namespace)
    namespace["migration"]()


def test_autogenerate_renders_encrypted_columns_that_run(
    engine: sa.Engine, migrate: Callable[..., Operations], local_kms: LocalKms
) -> None:
    metadata, envelope = models()
    with engine.connect() as conn:
        context = MigrationContext.configure(
            conn,
            opts={
                "target_metadata": metadata,
                "render_item": envelope_alembic.render_item,
                "process_revision_directives": envelope_alembic.process_revision_directives,
            },
        )
        script = produce_migrations(context, metadata)
        # What `alembic revision --autogenerate` does with the hook, and then renders.
        envelope_alembic.process_revision_directives(context, ("head",), [script])
        upgrade = render_python_code(script.upgrade_ops, render_item=envelope_alembic.render_item)
        downgrade = render_python_code(
            script.downgrade_ops, render_item=envelope_alembic.render_item
        )
        imports = rendered_imports(context, script.upgrade_ops)
    assert "op.create_keyring_table()" in upgrade and "op.drop_keyring_table()" in downgrade
    assert "envelope_data_keys_scope" not in upgrade + downgrade  # its index comes with it
    assert "sqlalchemy_envelope.Encrypted(sa.String(length=120), deterministic=True)" in upgrade
    assert "sqlalchemy_envelope.Encrypted(sa.Date(), scope='dates')" in upgrade
    assert {"import sqlalchemy_envelope", "import sqlalchemy_envelope.alembic"} <= imports

    op = migrate(metadata)
    namespace: dict[str, Any] = {"op": op, "sa": sa}
    exec("\n".join(sorted(imports)), namespace)  # the migration file's import lines
    with op.get_context().begin_transaction():
        run(upgrade, namespace)  # NameError without the import
    envelope.configure(kms=local_kms, engine=engine)
    people = metadata.tables["people"]
    with engine.begin() as conn:
        conn.execute(people.insert().values(id=1, name="Ann", email="ann@example.org"))
        assert conn.execute(sa.select(people.c.name)).scalar_one() == "Ann"
        assert b"Ann" not in bytes(conn.execute(sa.text("SELECT name FROM people")).scalar_one())


def test_autogenerate_turns_a_type_change_into_encrypt_column(
    engine: sa.Engine, migrate: Callable[..., Operations], local_kms: LocalKms
) -> None:
    metadata, envelope = models()
    envelope.configure(kms=local_kms, engine=engine)
    op = migrate(metadata)
    with op.get_context().begin_transaction():
        op.create_keyring_table()
        create_plain_people(op)
    expected = insert_people(engine, 30)
    with engine.connect() as conn:
        context = MigrationContext.configure(
            conn, opts={"target_metadata": metadata, "compare_type": True}
        )
        script = produce_migrations(context, metadata)
        envelope_alembic.process_revision_directives(context, ("head",), [script])
        upgrade = render_python_code(script.upgrade_ops, render_item=envelope_alembic.render_item)
        downgrade = render_python_code(
            script.downgrade_ops, render_item=envelope_alembic.render_item
        )
        imports = rendered_imports(context, script.upgrade_ops)
    upgrade_ops = [o for o in script.upgrade_ops.ops[0].ops]  # type: ignore[attr-defined]
    assert sorted(type(o).__name__ for o in upgrade_ops) == ["EncryptColumnOp"] * 3
    diffs = script.upgrade_ops.as_diffs()  # what `alembic check` lists
    assert sorted(d[:4] for d in diffs) == [
        ("encrypt_column", None, "people", c) for c in ("born", "email", "name")
    ]
    encrypted = "sqlalchemy_envelope.Encrypted(sa.String(length=120), deterministic=True)"
    assert f"op.encrypt_column('people', 'email', {encrypted})" in upgrade
    assert "op.decrypt_column('people', 'name', sa.String(length=80), scope='people')" in downgrade
    assert "op.decrypt_column('people', 'born', sa.Date(), scope='dates')" in downgrade
    assert not any(isinstance(o, ops.AlterColumnOp) for o in upgrade_ops)

    namespace: dict[str, Any] = {"op": migrate(metadata), "sa": sa}
    exec("\n".join(sorted(imports)), namespace)
    run(upgrade, namespace)
    people = metadata.tables["people"]
    with engine.connect() as conn:
        assert [tuple(r) for r in conn.execute(sa.select(people).order_by(people.c.id))] == expected
    namespace["op"] = migrate(metadata)
    run(downgrade, namespace)
    plain = sa.Table("people", sa.MetaData(), autoload_with=engine)
    with engine.connect() as conn:
        assert [tuple(r) for r in conn.execute(in_order(plain))] == expected


def autogenerate(engine: sa.Engine, metadata: sa.MetaData) -> tuple[ops.MigrationScript, str, str]:
    """``(script, upgrade, downgrade)`` as ``alembic revision --autogenerate`` makes them."""
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"target_metadata": metadata})
        script = produce_migrations(context, metadata)
        envelope_alembic.process_revision_directives(context, ("head",), [script])
    assert script.upgrade_ops is not None and script.downgrade_ops is not None
    render = envelope_alembic.render_item
    return (
        script,
        render_python_code(script.upgrade_ops, render_item=render),
        render_python_code(script.downgrade_ops, render_item=render),
    )


@pytest.mark.parametrize("filled", [True, False], ids=["with values", "empty"])
def test_autogenerate_turns_dropping_encrypted_into_decrypt_column(
    engine: sa.Engine,
    migrate: Callable[..., Operations],
    local_kms: LocalKms,
    filled: bool,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The database's side of the change is a binary column: its values say it is ours.
    A plain ALTER from binary to text would keep the ciphertext as the new plaintext, so
    an empty column (a development database) is taken as ours too. The scope the values
    were read under is written into the migration, not chosen by the values it meets."""
    metadata, envelope = models()
    metadata.create_all(engine)
    envelope.configure(kms=local_kms, engine=engine)
    people = metadata.tables["people"]
    expected = insert_people(engine, 30, people) if filled else []
    plain_metadata = sa.MetaData()
    Envelope(plain_metadata, table_name="envelope_data_keys").configure(
        kms=local_kms, engine=engine
    )
    sa.Table(
        "people",
        plain_metadata,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(80), nullable=False),
        sa.Column("email", sa.String(120), unique=True),
        sa.Column("born", sa.Date),
        sa.Column("city", sa.String(50)),
    )
    _, upgrade, downgrade = autogenerate(engine, plain_metadata)
    assert "alter_column" not in upgrade + downgrade
    assert "op.decrypt_column('people', 'name', sa.String(length=80), scope='people')" in upgrade
    born = "op.decrypt_column('people', 'born', sa.Date(), scope='{}')"
    assert born.format("dates" if filled else "people") in upgrade
    if filled:  # the values tell each column's mode and scope
        encrypted = "sqlalchemy_envelope.Encrypted(sa.String(length=120), deterministic=True)"
        assert f"op.encrypt_column('people', 'email', {encrypted})" in downgrade
        assert "sqlalchemy_envelope.Encrypted(sa.Date(), scope='dates')" in downgrade
    else:  # nothing tells them: randomized, the table's scope, and a warning
        assert "Encrypted(sa.String(length=120))" in downgrade
        assert "people.email holds no values that tell how it was encrypted" in caplog.text
        expected = insert_people(engine, 30, people)  # the database the migration runs on

    namespace: dict[str, Any] = {"op": migrate(plain_metadata), "sa": sa}
    exec("import sqlalchemy_envelope", namespace)
    if not filled:  # the warning was right: born had a scope of its own; the run says which
        with pytest.raises(ConfigurationError, match="scope 'dates', not 'people'"):
            run(upgrade, namespace)
        upgrade = upgrade.replace(born.format("people"), born.format("dates"))
        namespace["op"] = migrate(plain_metadata)
    run(upgrade, namespace)
    plain = sa.Table("people", sa.MetaData(), autoload_with=engine)
    with engine.connect() as conn:
        assert [tuple(r) for r in conn.execute(in_order(plain))] == expected
    namespace["op"] = migrate(plain_metadata)
    run(downgrade, namespace)
    if not filled:  # as the downgrade says: born under the table's scope, not 'dates'
        people = sa.Table(
            "people",
            sa.MetaData(),
            sa.Column("id", sa.Integer, primary_key=True),
            *(sa.Column(c, Encrypted(sa.String(120), envelope)) for c in ("name", "email")),
            sa.Column("born", Encrypted(sa.Date, envelope)),
            sa.Column("city", sa.String(50)),
        )
    with engine.connect() as conn:  # encrypted again, as the models that had Encrypted read it
        assert [tuple(r) for r in conn.execute(in_order(people))] == expected
    if filled:
        assert autogenerate(engine, metadata)[0].upgrade_ops.is_empty()  # type: ignore[union-attr]


def encrypted_files(engine: sa.Engine, kms: LocalKms) -> tuple[sa.MetaData, Envelope, sa.Table]:
    """Models with one ``Encrypted(LargeBinary)`` column, ``files.body``."""
    metadata = sa.MetaData()
    envelope = Envelope(metadata)
    envelope.configure(kms=kms, engine=engine)
    files = sa.Table(
        "files", metadata,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("body", Encrypted(sa.LargeBinary, envelope)),
    )  # fmt: skip
    return metadata, envelope, files


def commands(rendered: str) -> list[str]:
    """The operations of a rendered migration body, without Alembic's comments."""
    return [line.strip() for line in rendered.splitlines() if line.strip()[:1] not in ("", "#")]


def test_autogenerate_converts_binary_columns_by_their_values(
    engine: sa.Engine, migrate: Callable[..., Operations], local_kms: LocalKms
) -> None:
    """LargeBinary and Encrypted(LargeBinary) are the same column type in the database:
    the values tell autogenerate whether the models' declaration changes them, and only
    values that authenticate: a header forged into an upload does not."""

    def files(encrypted: bool) -> tuple[sa.MetaData, sa.Table, Envelope]:
        metadata = sa.MetaData()
        envelope = Envelope(metadata)
        envelope.configure(kms=local_kms, engine=engine)
        body = Encrypted(sa.LargeBinary, envelope) if encrypted else sa.LargeBinary()
        table = sa.Table(
            "files", metadata,
            sa.Column("id", sa.Integer, primary_key=True),
            sa.Column("body", body),
        )  # fmt: skip
        return metadata, table, envelope

    plain_metadata, plain, plain_envelope = files(encrypted=False)
    plain_metadata.create_all(engine)
    key = plain_envelope.rotate("files")
    forged = wire.header(wire.RANDOMIZED, key) + bytes(40)  # names a real key of the scope
    blobs = [bytes([1, 1]) + bytes(10), forged, b"\x00\xffpng", b"", None]
    with engine.begin() as conn:
        conn.execute(plain.insert(), [{"id": i, "body": b} for i, b in enumerate(blobs)])
    metadata, encrypted, _ = files(encrypted=True)
    _, upgrade, downgrade = autogenerate(engine, metadata)
    body = "sqlalchemy_envelope.Encrypted(sa.LargeBinary())"
    decrypt = "op.decrypt_column('files', 'body', sa.LargeBinary(), scope='files')"
    assert commands(upgrade) == [f"op.encrypt_column('files', 'body', {body})"]
    assert commands(downgrade) == [decrypt]

    namespace: dict[str, Any] = {"op": migrate(metadata), "sa": sa}
    exec("import sqlalchemy_envelope", namespace)
    run(upgrade, namespace)
    with engine.connect() as conn:
        assert (
            conn.execute(sa.select(encrypted.c.body).order_by(encrypted.c.id)).scalars().all()
            == blobs
        )
    assert autogenerate(engine, metadata)[0].upgrade_ops.is_empty()  # type: ignore[union-attr]

    _, upgrade, downgrade = autogenerate(engine, plain_metadata)  # the models drop Encrypted
    assert commands(upgrade) == [decrypt]
    assert commands(downgrade) == [f"op.encrypt_column('files', 'body', {body})"]
    namespace["op"] = migrate(plain_metadata)
    run(upgrade, namespace)
    with engine.connect() as conn:
        assert conn.execute(sa.select(plain.c.body).order_by(plain.c.id)).scalars().all() == blobs
    assert autogenerate(engine, plain_metadata)[0].upgrade_ops.is_empty()  # type: ignore[union-attr]


def test_autogenerate_encrypts_a_binary_column_holding_its_ciphertext_beside_plaintext(
    engine: sa.Engine,
    migrate: Callable[..., Operations],
    local_kms: LocalKms,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Models declaring Encrypted(LargeBinary) that ran before the migration was written
    leave ciphertext beside the plaintext: still a conversion to write, since another
    database may hold plaintext only (and this one, run, says what to do)."""
    metadata, envelope, files = encrypted_files(engine, local_kms)
    plain = sa.Table(
        "files", sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("body", sa.LargeBinary),
    )  # fmt: skip
    plain.create(engine)
    envelope.table.create(engine)
    with engine.begin() as conn:
        conn.execute(plain.insert(), [{"id": i, "body": b"scan %d" % i} for i in range(5)])
        conn.execute(files.insert().values(id=5, body=b"scan 5"))  # the new code, early

    with caplog.at_level(logging.WARNING, "sqlalchemy_envelope"):
        _, upgrade, _ = autogenerate(engine, metadata)
    body = "sqlalchemy_envelope.Encrypted(sa.LargeBinary())"
    assert commands(upgrade) == [f"op.encrypt_column('files', 'body', {body})"]
    assert "files.body holds its ciphertext beside values that are not" in caplog.text

    namespace: dict[str, Any] = {"op": migrate(metadata), "sa": sa}
    exec("import sqlalchemy_envelope", namespace)
    with pytest.raises(ConfigurationError, match="keep_ciphertext=True"):
        run(upgrade, namespace)
    run(upgrade.replace(f"{body})", f"{body}, keep_ciphertext=True)"), namespace)
    with engine.connect() as conn:
        stored = conn.execute(sa.select(files.c.body).order_by(files.c.id)).scalars().all()
    assert stored == [b"scan %d" % i for i in range(6)]
    assert autogenerate(engine, metadata)[0].upgrade_ops.is_empty()  # type: ignore[union-attr]


def test_autogenerate_leaves_a_text_column_made_binary_to_its_author(
    engine: sa.Engine, local_kms: LocalKms
) -> None:
    """A text column the models make LargeBinary holds no values of ours to sample (nor
    does the binary column of its downgrade, when that is written): a plain type change,
    both ways, where Postgres would refuse a first byte of text compared with bytes."""
    metadata = sa.MetaData()
    Envelope(metadata).configure(kms=local_kms, engine=engine)
    notes = sa.Table(
        "notes", metadata,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("body", sa.String(50)),
    )  # fmt: skip
    metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(notes.insert(), [{"id": 1, "body": "plain"}, {"id": 2, "body": ""}])
    notes.c.body.type = sa.LargeBinary()
    _, upgrade, downgrade = autogenerate(engine, metadata)
    assert commands(upgrade)[0] == "op.alter_column('notes', 'body',"
    assert commands(downgrade)[0] == "op.alter_column('notes', 'body',"
    assert "crypt_column" not in upgrade + downgrade


@pytest.mark.parametrize("stored", ["'plain'", "42", "x''"], ids=["text", "integer", "empty"])
def test_autogenerate_reads_any_value_sqlite_keeps_in_a_binary_column(
    sqlite_url: str, make_engine: Callable[..., sa.Engine], local_kms: LocalKms, stored: str
) -> None:
    """SQLite keeps a string or a number written around the library in a binary column
    (old code after the swap): beside ours, autogenerate tells it as encrypt_column does,
    rather than fail on the first character SQLite returns for it."""
    engine = make_engine(sqlite_url)
    metadata, envelope, files = encrypted_files(engine, local_kms)
    metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(files.insert(), [{"id": i, "body": b"scan %d" % i} for i in range(1, 4)])
        conn.exec_driver_sql(f"INSERT INTO files VALUES (4, {stored})")

    script, upgrade, _ = autogenerate(engine, metadata)
    target = Encrypted(sa.LargeBinary())
    if script.upgrade_ops is not None and script.upgrade_ops.is_empty():
        assert encrypt_column(envelope, engine, "files", "body", target).already_done
    else:
        body = "sqlalchemy_envelope.Encrypted(sa.LargeBinary())"
        assert commands(upgrade) == [f"op.encrypt_column('files', 'body', {body})"]
        with pytest.raises(ConfigurationError, match="keep_ciphertext=True"):
            encrypt_column(envelope, engine, "files", "body", target)


def test_an_upload_naming_a_shredded_key_chooses_no_conversion(
    engine: sa.Engine, local_kms: LocalKms
) -> None:
    """Values under a key shredded since cannot be authenticated: beside other values (an
    upload naming one, ids being small) they make no column ours, nor choose its scope;
    a column of nothing else was encrypted under it, and is converted back."""
    metadata = sa.MetaData()
    envelope = Envelope(metadata)
    envelope.configure(kms=local_kms, engine=engine)
    uploads = sa.Table(
        "uploads", metadata,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("body", sa.LargeBinary),
    )  # fmt: skip
    metadata.create_all(engine)
    shredded = envelope.rotate("tenant_17")
    envelope.destroy(shredded, force=True)
    forged = wire.header(wire.RANDOMIZED, shredded) + b"A" * 40
    with engine.begin() as conn:
        conn.execute(uploads.insert(), [{"id": 1, "body": forged}, {"id": 2, "body": b"%PDF"}])
    assert autogenerate(engine, metadata)[0].upgrade_ops.is_empty()  # type: ignore[union-attr]

    with engine.begin() as conn:  # all of it under the shredded key: encrypted once
        conn.execute(uploads.delete().where(uploads.c.id == 2))
    _, upgrade, _ = autogenerate(engine, metadata)
    decrypt = "op.decrypt_column('uploads', 'body', sa.LargeBinary(), scope='tenant_17')"
    assert commands(upgrade) == [decrypt]


@pytest.mark.parametrize("damage", ["a flipped byte", "an unknown key id"])
def test_autogenerate_leaves_an_encrypted_binary_column_with_a_damaged_value_alone(
    engine: sa.Engine, local_kms: LocalKms, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A value that begins like ours but does not authenticate is no plaintext that
    encrypt_column would convert (it reports the column done): writing the operation
    would add it again to every revision."""
    metadata, envelope, files = encrypted_files(engine, local_kms)
    metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(files.insert(), [{"id": i, "body": b"scan %d" % i} for i in range(5)])
    raw = sa.table("files", sa.column("id"), sa.column("body", sa.LargeBinary))
    with engine.begin() as conn:
        value = conn.execute(sa.select(raw.c.body).where(raw.c.id == 3)).scalar_one()
        if damage == "a flipped byte":
            value = value[:-1] + bytes([value[-1] ^ 1])
        else:
            value = value[:2] + (999).to_bytes(4, "big") + value[6:]
        conn.execute(raw.update().where(raw.c.id == 3).values(body=value))

    with caplog.at_level(logging.WARNING, "sqlalchemy_envelope"):
        script, upgrade, _ = autogenerate(engine, metadata)
    assert script.upgrade_ops is not None and script.upgrade_ops.is_empty(), upgrade
    assert "beside values that are not" not in caplog.text
    target = Encrypted(sa.LargeBinary())
    assert encrypt_column(envelope, engine, "files", "body", target).already_done


@pytest.mark.parametrize("filled", [True, False], ids=["with values", "empty"])
def test_autogenerate_resizes_an_encrypted_column_without_decrypting_it(
    mysql_url: str, make_engine: Callable[..., sa.Engine], local_kms: LocalKms, filled: bool
) -> None:
    """On MySQL the binary column's size follows the String length: a longer String is
    a type change of a column already encrypted, both ways, not an encryption."""
    engine = make_engine(mysql_url)
    metadata, envelope = models()
    metadata.create_all(engine)
    envelope.configure(kms=local_kms, engine=engine)
    if filled:
        expected = insert_people(engine, 10, metadata.tables["people"])
    longer, _ = models()
    longer.tables["people"].c.email.type = Encrypted(sa.String(400), envelope, deterministic=True)
    _, upgrade, downgrade = autogenerate(engine, longer)
    if not filled:
        expected = insert_people(engine, 10, metadata.tables["people"])
    assert "encrypt_column" not in upgrade + downgrade
    assert "decrypt_column" not in upgrade + downgrade
    assert "op.alter_column('people', 'email'" in upgrade
    namespace: dict[str, Any] = {"op": Operations(MigrationContext.configure(engine.connect()))}
    exec("import sqlalchemy as sa\nimport sqlalchemy_envelope", namespace)
    run(upgrade, namespace)
    namespace["op"].get_context().connection.commit()
    people = metadata.tables["people"]
    with engine.begin() as conn:
        conn.execute(people.update().where(people.c.id == 1).values(email="x" * 400))
        rows = conn.execute(sa.select(people).order_by(people.c.id)).all()
    assert [tuple(r) for r in rows[1:]] == expected[1:] and rows[0].email == "x" * 400


def test_autogenerate_decrypts_a_binary_column_whose_stored_type_mysql_resizes(
    mysql_url: str, make_engine: Callable[..., sa.Engine], local_kms: LocalKms
) -> None:
    """MySQL stores Encrypted(LargeBinary) as LONGBLOB and LargeBinary as BLOB: dropping
    Encrypted is a type change, which as an ALTER would keep the ciphertext as the values
    (or cut it at 64 KB). It is decrypt_column, and its downgrade encrypt_column."""
    engine = make_engine(mysql_url)
    metadata, _, files = encrypted_files(engine, local_kms)
    metadata.create_all(engine)
    blobs = [b"scan %d" % i for i in range(5)]
    with engine.begin() as conn:
        conn.execute(files.insert(), [{"id": i, "body": b} for i, b in enumerate(blobs, 1)])
    plain_metadata = sa.MetaData()
    Envelope(plain_metadata).configure(kms=local_kms, engine=engine)
    plain = sa.Table(
        "files", plain_metadata,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("body", sa.LargeBinary),
    )  # fmt: skip

    _, upgrade, downgrade = autogenerate(engine, plain_metadata)
    assert commands(upgrade) == [
        "op.decrypt_column('files', 'body', sa.LargeBinary(), scope='files')"
    ]
    assert commands(downgrade) == [
        "op.encrypt_column('files', 'body', sqlalchemy_envelope.Encrypted(sa.LargeBinary()))"
    ]
    for body, metadata_after, table in (
        (upgrade, plain_metadata, plain),
        (downgrade, metadata, files),
    ):
        conn = engine.connect()
        context = MigrationContext.configure(conn, opts={"target_metadata": metadata_after})
        namespace: dict[str, Any] = {"op": Operations(context), "sa": sa}
        exec("import sqlalchemy_envelope", namespace)
        run(body, namespace)
        conn.commit()
        conn.close()
        with engine.connect() as conn:
            assert (
                conn.execute(sa.select(table.c.body).order_by(table.c.id)).scalars().all() == blobs
            )


def test_autogenerate_leaves_the_jobs_table_alone(engine: sa.Engine, local_kms: LocalKms) -> None:
    from sqlalchemy_envelope.jobs import reencrypt

    metadata, envelope = models()
    metadata.create_all(engine)
    envelope.configure(kms=local_kms, engine=engine)
    with engine.begin() as conn:
        conn.execute(metadata.tables["people"].insert().values(id=1, name="Ann"))
    reencrypt(envelope, "people", distributed=True)
    assert "envelope_data_keys_jobs" in sa.inspect(engine).get_table_names()
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"target_metadata": metadata})
        script = produce_migrations(context, metadata)
        envelope_alembic.process_revision_directives(context, ("head",), [script])
    assert script.upgrade_ops is not None and script.upgrade_ops.is_empty()
