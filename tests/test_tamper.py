"""An attacker with write access to the database edits stored values (SQLite, Postgres, MySQL).

Every way a value can be tampered with raises ``DecryptionError`` (or
``KeyNotFoundError`` when the key id bytes now name a key the keyring does not
hold), never another exception and never a wrong plaintext. What the format
cannot detect (a value swapped between rows of one column, or replayed from
an older version of the same row) is shown as well: docs/SECURITY.md says so.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from sqlalchemy_envelope import (
    DecryptionError,
    Encrypted,
    Envelope,
    KeyNotFoundError,
    LocalKms,
    wire,
)

from .attack import ALICE, BOB, WHEN, Db, outcome, populate
from .models import build


@pytest.fixture
def db(any_db_url: str, make_engine: Callable[..., sa.Engine], local_kms: LocalKms) -> Db:
    app = build()
    engine = make_engine(any_db_url)
    app.Base.metadata.create_all(engine)
    app.envelope.configure(kms=local_kms, engine=engine)
    populate(app, engine)
    return Db(app, engine)


def try_read(db: Db, table: str, column: str) -> Any:
    return outcome(lambda: db.read(table, column))


def key_ids(db: Db) -> set[int]:
    return {k.id for k in db.app.envelope.keys(scope=None)}


def assert_rejected(result: Any, what: str, *, key_bytes_changed: bool = False) -> None:
    allowed: tuple[type[Exception], ...] = (DecryptionError,)
    if key_bytes_changed:
        allowed = (DecryptionError, KeyNotFoundError)
    assert isinstance(result, Exception), f"{what}: read back {result!r} instead of failing"
    assert type(result) in allowed or (
        key_bytes_changed and isinstance(result, KeyNotFoundError)
    ), f"{what}: {type(result).__name__}: {result}"


# (table, column, plaintext): a randomized string, a deterministic string, JSON, a tz datetime
TARGETS = [
    ("patients", "name", ALICE["name"]),
    ("patients", "email", ALICE["email"]),
    ("patients", "notes", ALICE["notes"]),
    ("visits", "at", WHEN),
]
target = pytest.mark.parametrize(("table", "column", "plain"), TARGETS, ids=lambda x: str(x)[:12])


# -- single-value edits ----------------------------------------------------------------------
@target
def test_every_byte_flip_is_rejected(db: Db, table: str, column: str, plain: Any) -> None:
    original = db.raw(table, column)
    assert db.read(table, column) == plain
    for position in range(len(original)):
        # The header bytes get three flips (low bit, high bit, all bits), the body one.
        for mask in (0x01, 0x80, 0xFF) if position < wire.HEADER_BYTES else (1 << position % 8,):
            tampered = bytearray(original)
            tampered[position] ^= mask
            db.put(table, column, bytes(tampered))
            assert_rejected(
                outcome(lambda: db.read(table, column)),
                f"byte {position} ^ {mask:#x}",
                key_bytes_changed=2 <= position < wire.HEADER_BYTES,
            )
    db.put(table, column, original)
    assert db.read(table, column) == plain


@target
def test_every_truncation_is_rejected(db: Db, table: str, column: str, plain: Any) -> None:
    original = db.raw(table, column)
    for length in range(len(original)):
        db.put(table, column, original[:length])
        assert_rejected(outcome(lambda: db.read(table, column)), f"truncated to {length}")


@target
def test_extension_is_rejected(db: Db, table: str, column: str, plain: Any) -> None:
    original = db.raw(table, column)
    for tampered in (
        original + b"\x00",
        original + bytes(16),
        original + original,
        original + original[6:],
        original[:6] + bytes(12) + original[6:],  # bytes inserted after the header
        b"\x00" + original,
        original[:-1] + b"\x00" + original[-1:],
    ):
        db.put(table, column, tampered)
        assert_rejected(outcome(lambda: db.read(table, column)), f"{len(tampered)} bytes")


def test_values_that_are_not_ours_are_rejected(db: Db) -> None:
    for value in (
        b"",
        b"Alice",
        b"\x01",
        b"\x01\x01",
        bytes(6),
        bytes(64),
        b"\x01\x01\x00\x00\x00\x00" + bytes(40),
    ):
        db.put("patients", "name", value)
        assert_rejected(outcome(lambda: db.read("patients", "name")), repr(value[:8]))


def test_unknown_key_id_is_key_not_found(db: Db) -> None:
    original = db.raw("patients", "name")
    db.put("patients", "name", original[:2] + (99999).to_bytes(4, "big") + original[6:])
    with pytest.raises(KeyNotFoundError, match=r"^patients\.name: data key 99999 "):
        db.read("patients", "name")


def test_key_id_of_another_scope_is_decryption_error(db: Db) -> None:
    # Point the value at the key of another scope ("staff"): the key exists and unwraps,
    # but the value does not authenticate under it.
    staff_key = wire.key_id_of(db.raw("doctors", "name"))
    assert staff_key is not None
    original = db.raw("patients", "name")
    assert wire.key_id_of(original) != staff_key
    db.put("patients", "name", original[:2] + staff_key.to_bytes(4, "big") + original[6:])
    with pytest.raises(DecryptionError, match=rf"patients\.name \(key {staff_key}\)"):
        db.read("patients", "name")


# -- transplants -----------------------------------------------------------------------------
TRANSPLANTS = [
    # (from table.column, to table.column)
    (("patients", "name"), ("patients", "ssn")),  # same table, same type, same key
    (("patients", "ssn"), ("patients", "name")),
    (("patients", "email"), ("patients", "name")),  # deterministic into randomized
    (("patients", "name"), ("patients", "email")),  # randomized into deterministic
    (("patients", "name"), ("visits", "reason")),  # another table
    (("visits", "reason"), ("patients", "name")),
    (("patients", "name"), ("doctors", "name")),  # another table and scope
    (("doctors", "name"), ("patients", "name")),
    (("visits", "at"), ("patients", "notes")),
]


@pytest.mark.parametrize(("source", "dest"), TRANSPLANTS, ids=lambda x: ".".join(x))
def test_transplant_is_rejected(db: Db, source: tuple[str, str], dest: tuple[str, str]) -> None:
    value = db.raw(*source)
    db.put(*dest, value)
    assert_rejected(outcome(lambda: db.read(*dest)), f"{source} -> {dest}")


def test_transplant_from_a_row_of_another_table_is_rejected(db: Db) -> None:
    # Bob's row in patients into the visit row: other table, other row, same scope.
    db.put("visits", "reason", db.raw("patients", "name", 2))
    assert_rejected(outcome(lambda: db.read("visits", "reason")), "patients#2 -> visits")


def test_orm_load_of_a_transplanted_value_raises(db: Db) -> None:
    db.put("patients", "ssn", db.raw("patients", "name", 1), 1)
    with pytest.raises(DecryptionError, match=r"patients\.ssn"):
        db.read_orm(1)


# -- what the format does not detect (documented in docs/SECURITY.md) -----------------------
def test_swap_between_rows_of_one_column_is_not_detected(db: Db) -> None:
    alice, bob = db.raw("patients", "ssn", 1), db.raw("patients", "ssn", 2)
    db.put("patients", "ssn", bob, 1)
    db.put("patients", "ssn", alice, 2)
    assert db.read_orm(1)["ssn"] == BOB["ssn"]
    assert db.read_orm(2)["ssn"] == ALICE["ssn"]


def test_replay_of_an_old_value_of_the_same_row_is_not_detected(db: Db) -> None:
    old = db.raw("patients", "ssn", 1)
    with Session(db.engine) as s:
        s.get(db.app.Patient, 1).ssn = "000-00-0000"
        s.commit()
    assert db.read_orm(1)["ssn"] == "000-00-0000"
    db.put("patients", "ssn", old, 1)  # an attacker restores the value from a backup
    assert db.read_orm(1)["ssn"] == ALICE["ssn"]


def test_nulling_a_value_is_not_detected(db: Db) -> None:
    # NULL is stored as SQL NULL, unencrypted: an attacker can erase a value unnoticed.
    t = sa.table("patients", sa.column("id"), sa.column("ssn"))
    with db.engine.begin() as conn:
        conn.execute(t.update().where(t.c.id == 1).values(ssn=None))
    assert db.read_orm(1)["ssn"] is None


def test_replay_after_rotation_is_not_detected(db: Db) -> None:
    # Retired keys stay readable, so a value from before a rotation replays too.
    old = db.raw("patients", "ssn", 1)
    db.app.envelope.rotate("patients")
    with Session(db.engine) as s:
        s.get(db.app.Patient, 1).ssn = "111-11-1111"
        s.commit()
    assert wire.key_id_of(db.raw("patients", "ssn", 1)) != wire.key_id_of(old)
    db.put("patients", "ssn", old, 1)
    assert db.read_orm(1)["ssn"] == ALICE["ssn"]


# -- values from another database's keyring ----------------------------------------------
@pytest.fixture
def other_url(request: pytest.FixtureRequest, db: Db, tmp_path: Any) -> Iterator[str]:
    """A second, empty database: a SQLite file beside a SQLite ``db``, else a Postgres schema."""
    if db.engine.dialect.name == "sqlite":
        yield f"sqlite:///{tmp_path / 'other.db'}"
        return
    server = request.getfixturevalue("pg_server_url")
    schema = f"t_other_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(server, poolclass=sa.NullPool)
    with admin.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    url = sa.make_url(server).update_query_dict({"options": f"-csearch_path={schema}"})
    yield url.render_as_string(hide_password=False)
    with admin.begin() as conn:
        conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
    admin.dispose()


def second_database(url: str, make_engine: Callable[..., sa.Engine], kms: Any) -> Db:
    app = build()
    engine = make_engine(url, poolclass=sa.NullPool)
    app.Base.metadata.create_all(engine)
    app.envelope.configure(kms=kms, engine=engine)
    populate(app, engine)
    return Db(app, engine)


@target
def test_value_from_another_databases_keyring_is_rejected(
    db: Db,
    other_url: str,
    make_engine: Callable[..., sa.Engine],
    table: str,
    column: str,
    plain: Any,
) -> None:
    # Another application: its own keyring and master key, and the same key ids.
    foreign = second_database(other_url, make_engine, LocalKms(bytes(range(32))))
    value = foreign.raw(table, column)
    assert wire.key_id_of(value) in key_ids(db)
    db.put(table, column, value)
    assert_rejected(outcome(lambda: db.read(table, column)), "foreign value")


def test_same_master_key_but_another_keyring_is_rejected(
    db: Db, other_url: str, make_engine: Callable[..., sa.Engine]
) -> None:
    # Data keys are random per keyring: sharing the master key (the CMK) does not make
    # one database's values readable in another.
    twin = second_database(other_url, make_engine, db.app.envelope.kms)
    for table, column, _ in TARGETS:
        value = twin.raw(table, column)
        assert wire.key_id_of(value) in key_ids(db)
        db.put(table, column, value)
        assert_rejected(try_read(db, table, column), f"twin {table}.{column}")


def test_deterministic_lookup_does_not_match_a_foreign_value(
    db: Db, other_url: str, make_engine: Callable[..., sa.Engine]
) -> None:
    # The same email in another database encrypts differently: no cross-database equality.
    twin = second_database(other_url, make_engine, db.app.envelope.kms)
    assert twin.raw("patients", "email", 1) != db.raw("patients", "email", 1)
    db.put("patients", "email", twin.raw("patients", "email", 1), 2)
    with Session(db.engine) as s:
        stmt = sa.select(db.app.Patient.id).where(db.app.Patient.email == ALICE["email"])
        assert s.scalars(stmt).all() == [1]


def test_move_between_schemas_of_one_keyring_is_not_detected(
    pg_url: str, make_engine: Callable[..., sa.Engine], local_kms: LocalKms
) -> None:
    # NOT detected: the associated data names the table without its schema. Two schemas
    # with a table of the same name, sharing one envelope and scope, share what is bound.
    moved = move_between_tenants(pg_url, make_engine, local_kms, scoped=False)
    assert moved == ["111-11-1111"] * 2


def test_move_between_tenants_of_their_own_scopes_is_decryption_error(
    pg_url: str, make_engine: Callable[..., sa.Engine], local_kms: LocalKms
) -> None:
    # One scope per tenant: the key a value names must be its column's scope's, whether
    # the process holds it already (it wrote both tenants' rows) or starts cold.
    moved = move_between_tenants(pg_url, make_engine, local_kms, scoped=True)
    assert all(isinstance(m, DecryptionError) for m in moved), moved
    assert all("belongs to scope" not in str(m) for m in moved)


def move_between_tenants(
    pg_url: str, make_engine: Callable[..., sa.Engine], kms: LocalKms, *, scoped: bool
) -> list[Any]:
    """Tenant a's value copied into tenant b's table of the same name; what a warm and then
    a cold process read there."""
    metadata = sa.MetaData()
    envelope = Envelope(metadata)
    suffix = uuid.uuid4().hex[:8]
    tables = {
        schema: sa.Table(
            "patients",
            metadata,
            sa.Column("id", sa.Integer, primary_key=True),
            sa.Column("ssn", Encrypted(sa.String(11), envelope, scope=schema if scoped else None)),
            schema=schema,
        )
        for schema in (f"tenant_a_{suffix}", f"tenant_b_{suffix}")
    }
    a, b = tables
    engine = make_engine(pg_url)
    with engine.begin() as conn:
        for schema in tables:
            conn.execute(sa.text(f"CREATE SCHEMA {schema}"))
    try:
        metadata.create_all(engine)
        envelope.configure(kms=kms, engine=engine)
        with engine.begin() as conn:
            conn.execute(tables[a].insert().values(id=1, ssn="111-11-1111"))
            conn.execute(tables[b].insert().values(id=1, ssn="222-22-2222"))
            conn.execute(sa.text(f"UPDATE {b}.patients SET ssn = (SELECT ssn FROM {a}.patients)"))
        read = sa.select(tables[b].c.ssn)
        warm = outcome(lambda: _scalar(engine, read))
        envelope.configure(kms=kms, engine=engine)  # a new process
        return [warm, outcome(lambda: _scalar(engine, read))]
    finally:
        with engine.begin() as conn:
            for schema in tables:
                conn.execute(sa.text(f"DROP SCHEMA {schema} CASCADE"))


def _scalar(engine: sa.Engine, statement: sa.Select[Any]) -> Any:
    with engine.connect() as conn:
        return conn.execute(statement).scalar_one()


def test_values_of_other_types_are_rejected_on_sqlite(
    sqlite_url: str, make_engine: Callable[..., sa.Engine], local_kms: LocalKms
) -> None:
    """SQLite stores whatever it is given: integers, reals and text in a BLOB column too."""
    app = build()
    engine = make_engine(sqlite_url)
    app.Base.metadata.create_all(engine)
    app.envelope.configure(kms=local_kms, engine=engine)
    populate(app, engine)
    db = Db(app, engine)
    app.envelope.rotate("patients")
    for value in (42, 10**12, 4.2, "Alice Tamperproof", "\x01\x01" + "x" * 40):
        with engine.begin() as conn:
            conn.execute(sa.text("UPDATE patients SET name = :v WHERE id = 1"), {"v": value})
        assert_rejected(outcome(lambda: db.read("patients", "name")), repr(value))
        for target in (app.Patient, "patients"):  # from the models, from the database alone
            verified = app.envelope.verify(target)
            assert verified.columns["name"].plaintext == 1, (value, verified)
        assert app.envelope.reencrypt(app.Patient).plaintext == 1, value
        with engine.connect() as conn:
            stored = conn.execute(sa.text("SELECT name FROM patients WHERE id = 1")).scalar_one()
        assert stored == value  # left as it was
