"""Key lifecycle and the key cache, across envelopes standing in for separate processes."""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import boto3
import pytest
import sqlalchemy as sa
from botocore.awsrequest import AWSResponse
from moto import mock_aws

from sqlalchemy_envelope import (
    AwsKms,
    ConfigurationError,
    DecryptionError,
    Encrypted,
    Envelope,
    KeyDestroyedError,
    KeyInUseError,
    KeyNotFoundError,
    KmsError,
    LocalKms,
    RewrapError,
    lifecycle,
)
from sqlalchemy_envelope.cache import Cache, Stats
from sqlalchemy_envelope.kms import GeneratedKey, KeyProvider, scope_context

from .kms_fixtures import *  # noqa: F403
from .kms_fixtures import REGION, Cmk, KmsBackend, aws_credentials, count_calls  # noqa: F401
from .test_kms_economy import CountingKms


def _schema(**options: float) -> tuple[Envelope, sa.Table]:
    metadata = sa.MetaData()
    envelope = Envelope(metadata, **options)  # type: ignore[arg-type]
    table = sa.Table(
        "notes",
        metadata,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("body", Encrypted(sa.Text, envelope)),
    )
    return envelope, table


@pytest.fixture
def two_processes(
    db_url: str, make_engine: Callable[..., sa.Engine], local_kms: LocalKms
) -> tuple[Envelope, Envelope, sa.Table, sa.Engine]:
    """Two envelopes on one database: what two application processes would hold."""
    engine = make_engine(db_url)
    first, table = _schema(keyring_refresh=0.05)
    second, _ = _schema(keyring_refresh=0.05)
    table.metadata.create_all(engine)
    first.configure(kms=local_kms, engine=engine)
    second.configure(kms=local_kms, engine=make_engine(db_url))
    return first, second, table, engine


def _key_of(engine: sa.Engine, row_id: int) -> int:
    with engine.connect() as conn:
        raw = conn.execute(
            sa.text("SELECT body FROM notes WHERE id = :i"), {"i": row_id}
        ).scalar_one()
    return int.from_bytes(bytes(raw)[2:6], "big")


def _damage(envelope: Envelope, engine: sa.Engine, key_id: int) -> None:
    """Flip one byte of a key's wrapped form: the KMS refuses it from then on."""
    t = envelope.table
    with engine.begin() as conn:
        wrapped = conn.execute(sa.select(t.c.wrapped_key).where(t.c.id == key_id)).scalar_one()
        flipped = wrapped[:-1] + bytes([wrapped[-1] ^ 1])
        conn.execute(t.update().where(t.c.id == key_id).values(wrapped_key=flipped))


def test_rotation_elsewhere_takes_effect_within_keyring_refresh(two_processes: tuple) -> None:  # type: ignore[type-arg]
    _, second, table, engine = two_processes
    with engine.begin() as conn:
        conn.execute(table.insert().values(id=1, body="before"))
    new = second.rotate("notes")
    time.sleep(0.1)
    with engine.begin() as conn:
        conn.execute(table.insert().values(id=2, body="after"))
    assert _key_of(engine, 1) != new and _key_of(engine, 2) == new
    with engine.connect() as conn:
        assert conn.execute(sa.select(table.c.body).order_by(table.c.id)).scalars().all() == [
            "before",
            "after",
        ]


def test_cache_ttl_bounds_how_long_a_key_is_used_from_memory(
    sqlite_url: str, make_engine: Callable[..., sa.Engine], local_kms: LocalKms
) -> None:
    envelope, table = _schema(cache_ttl=0.2)
    engine = make_engine(sqlite_url)
    table.metadata.create_all(engine)
    envelope.configure(kms=local_kms, engine=engine)
    with engine.begin() as conn:
        conn.execute(table.insert().values(id=1, body="x"))
    reader, _ = _schema(cache_ttl=0.2)
    reader.configure(kms=local_kms, engine=engine)
    reader_table = table.to_metadata(sa.MetaData())
    reader_table.c.body.type.envelope = reader
    select = sa.select(table.c.body)
    with engine.connect() as conn:
        for _ in range(5):
            conn.execute(select).all()
        calls = envelope.stats.kms_calls
        time.sleep(0.25)
        conn.execute(select).all()
    assert envelope.stats.kms_calls == calls + 1


def test_destroy_refuses_in_use_then_shreds(two_processes: tuple) -> None:  # type: ignore[type-arg]
    first, second, table, engine = two_processes
    with engine.begin() as conn:
        conn.execute(table.insert().values(id=1, body="secret"))
    key_id = first.keys("notes")[0].id
    with pytest.raises(KeyInUseError, match=r"notes\.body \(1\)"):
        first.destroy(key_id)
    first.destroy(key_id, force=True)
    assert [(k.id, k.state) for k in first.keys()] == [(key_id, "destroyed")]
    with (
        engine.connect() as conn,
        pytest.raises(KeyDestroyedError, match=rf"^notes\.body: data key {key_id} "),
    ):
        conn.execute(sa.select(table.c.body)).all()
    with engine.connect() as conn:
        wrapped = conn.execute(sa.text("SELECT wrapped_key FROM envelope_data_keys")).scalar()
    assert wrapped is None
    # The next write creates a new active key; the other process follows within keyring_refresh.
    time.sleep(0.1)
    with engine.begin() as conn:
        conn.execute(table.insert().values(id=2, body="fresh"))
    assert _key_of(engine, 2) != key_id
    states = sorted(k.state for k in second.keys("notes"))
    assert states == ["active", "destroyed"]
    with pytest.raises(KeyNotFoundError):
        first.destroy(9999)


def test_rewrap_moves_every_key_and_touches_no_row(two_processes: tuple) -> None:  # type: ignore[type-arg]
    first, _, table, engine = two_processes
    with engine.begin() as conn:
        conn.execute(table.insert().values(id=1, body="one"))
    first.rotate("notes")
    with engine.begin() as conn:
        conn.execute(table.insert().values(id=2, body="two"))
        rows_before = conn.execute(sa.text("SELECT id, body FROM notes ORDER BY id")).all()
    new_kms = LocalKms(b"n" * 32)
    assert first.rewrap(new_kms) == 2
    assert first.rewrap(new_kms) == 0  # resumable: nothing left to move
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT id, body FROM notes ORDER BY id")).all() == rows_before
    assert {k.kms_key_id for k in first.keys()} == {new_kms.kms_key_id}
    fresh, fresh_table = _schema()
    fresh.configure(kms=new_kms, engine=engine)  # a process that knows only the new KMS
    with engine.connect() as conn:
        assert conn.execute(
            sa.select(fresh_table.c.body).order_by(fresh_table.c.id)
        ).scalars().all() == [
            "one",
            "two",
        ]


@pytest.fixture
def counted(
    sqlite_url: str, make_engine: Callable[..., sa.Engine]
) -> tuple[Envelope, sa.Engine, CountingKms]:
    """An envelope whose master key counts its unwraps, with four keys in three scopes
    (one of them retired)."""
    engine = make_engine(sqlite_url)
    envelope, table = _schema()
    table.metadata.create_all(engine)
    kms = CountingKms(LocalKms(os.urandom(32)))
    envelope.configure(kms=kms, engine=engine)
    for scope in ("notes", "b", "c", "notes"):
        envelope.rotate(scope)
    kms.unwraps = 0
    return envelope, engine, kms


def _wrapped(envelope: Envelope) -> dict[int, tuple[str, bytes]]:
    with envelope.engine.connect() as conn:
        t = envelope.table
        return {
            i: (k, bytes(w))
            for i, k, w in conn.execute(sa.select(t.c.id, t.c.kms_key_id, t.c.wrapped_key))
        }


def test_rewrap_between_master_keys_unwraps_each_key_once(
    counted: tuple[Envelope, sa.Engine, CountingKms],
) -> None:
    envelope, _, source = counted
    target = LocalKms(os.urandom(32))
    assert envelope.rewrap(target) == 4
    assert source.unwraps == 4
    assert envelope.kms is target
    assert {k for k, _ in _wrapped(envelope).values()} == {target.kms_key_id}


def test_rewrap_between_master_keys_stores_nothing_while_a_key_does_not_unwrap(
    counted: tuple[Envelope, sa.Engine, CountingKms],
) -> None:
    """Every key is tried once and each one that does not unwrap is named, and not one
    is stored: a keyring split between two master keys locks out a process holding one."""
    envelope, engine, source = counted
    damaged = envelope.keys("b")[0].id
    _damage(envelope, engine, damaged)
    before = _wrapped(envelope)
    with pytest.raises(RewrapError) as caught:
        envelope.rewrap(LocalKms(os.urandom(32)))
    error = caught.value
    assert (error.moved, error.remaining) == (0, 0)
    assert error.failed == ((damaged, "b", "InvalidCiphertextException"),)
    assert f"key {damaged} of scope 'b' (InvalidCiphertextException)" in str(error)
    assert "0 data key(s) moved" in str(error) and "keys destroy ID" in str(error)
    assert source.unwraps == 4
    assert _wrapped(envelope) == before and envelope.kms is source


class _Throttling:
    """A new KMS that refuses to wrap one scope's key, as a throttled KMS would."""

    def __init__(self, inner: LocalKms, scope: str) -> None:
        self.inner, self.context = inner, scope_context(scope)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def rewrap_from(
        self, source: KeyProvider, wrapped: bytes, context: Mapping[str, str], kms_key_id: str
    ) -> tuple[bytes, str]:
        if context == self.context:
            raise KmsError("rate exceeded", code="ThrottlingException")
        return self.inner.rewrap_from(source, wrapped, context, kms_key_id)


def test_rewrap_between_master_keys_stores_nothing_while_the_new_kms_refuses_one(
    counted: tuple[Envelope, sa.Engine, CountingKms],
) -> None:
    """A refusal of the new KMS leaves the keyring whole as well; a rerun moves every key."""
    envelope, _, source = counted
    before = _wrapped(envelope)
    target = LocalKms(os.urandom(32))
    with pytest.raises(RewrapError) as caught:
        envelope.rewrap(_Throttling(target, "c"))  # type: ignore[arg-type]
    refused = envelope.keys("c")[0].id
    assert caught.value.failed == ((refused, "c", "ThrottlingException"),)
    assert caught.value.moved == 0 and _wrapped(envelope) == before
    assert envelope.rewrap(target) == 4
    assert source.unwraps == 3 + 4  # once per key and run; the refusal came before one


class _Lost(Exception):
    """The database connection lost while re-wrapped keys are being stored."""


def test_rewrap_between_master_keys_stores_every_key_or_none(
    counted: tuple[Envelope, sa.Engine, CountingKms],
) -> None:
    """The keys re-wrapped in memory are stored in one transaction: a failure while storing
    them (the connection lost, the process killed) leaves no keyring split between two
    master keys either."""
    envelope, _, source = counted
    engine = envelope.keyring().engine  # the keyring's own pool
    before = _wrapped(envelope)
    updates = 0

    def lose_the_second(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        nonlocal updates
        if statement.startswith("UPDATE envelope_data_keys"):
            updates += 1
            if updates == 2:
                raise _Lost

    sa.event.listen(engine, "before_cursor_execute", lose_the_second)
    target = LocalKms(os.urandom(32))
    with pytest.raises(_Lost):
        envelope.rewrap(target)
    sa.event.remove(engine, "before_cursor_execute", lose_the_second)
    assert _wrapped(envelope) == before and envelope.kms is source
    assert envelope.rewrap(target) == 4


def test_a_value_from_another_keyring_does_not_decrypt(
    db_url: str, make_engine: Callable[..., sa.Engine]
) -> None:
    engine = make_engine(db_url)
    envelope, table = _schema()
    table.metadata.create_all(engine)
    envelope.configure(kms=LocalKms(b"a" * 32), engine=engine)
    with engine.begin() as conn:
        conn.execute(table.insert().values(id=1, body="ours"))
        ours = conn.execute(sa.text("SELECT body FROM notes")).scalar_one()
        # another database: same key id 1, another data key
        conn.execute(sa.text("DELETE FROM notes"))
        conn.execute(sa.text("DELETE FROM envelope_data_keys"))
        if engine.dialect.name == "postgresql":
            conn.execute(sa.text("ALTER SEQUENCE envelope_data_keys_id_seq RESTART WITH 1"))
    envelope._forget()
    with engine.begin() as conn:
        conn.execute(table.insert().values(id=1, body="theirs"))
    assert _key_of(engine, 1) == int.from_bytes(bytes(ours)[2:6], "big")  # same id, other key
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE notes SET body = :b"), {"b": ours})
    with engine.connect() as conn, pytest.raises(DecryptionError):
        conn.execute(sa.select(table.c.body)).all()


def test_cache_limits_are_checked_and_kept() -> None:
    with pytest.raises(ValueError):
        Cache(ttl=0, capacity=1, stats=Stats())
    with pytest.raises(ValueError):
        Cache(ttl=1, capacity=0, stats=Stats())
    cache: Cache[str] = Cache(ttl=60, capacity=2, stats=Stats())
    loads: list[int] = []
    for key in (1, 2, 1, 3, 1, 2):
        cache.get_or_load(key, lambda key=key: loads.append(key) or str(key))  # type: ignore[misc]
    assert loads == [1, 2, 3, 2]  # 2 was the least recently used when 3 arrived
    assert "entries=2" in repr(cache)


def test_cache_capacity_also_bounds_the_keys_this_process_creates(
    sqlite_url: str, make_engine: Callable[..., sa.Engine], local_kms: LocalKms
) -> None:
    """A key created here (a scope's first, a rotation) enters the cache without an unwrap:
    cache_capacity holds for those too, and the keys pushed out are unwrapped again."""
    envelope, table = _schema(cache_capacity=2)
    engine = make_engine(sqlite_url)
    table.metadata.create_all(engine)
    envelope.configure(kms=local_kms, engine=engine)
    cache = envelope._keys().cache
    for i in range(1, 6):
        envelope.rotate("notes")
        with engine.begin() as conn:
            conn.execute(table.insert().values(id=i, body=f"note {i}"))
        assert len(cache._entries) <= 2, f"{len(cache._entries)} keys held after rotation {i}"
    assert len({_key_of(engine, i) for i in range(1, 6)}) == 5
    with engine.connect() as conn:
        bodies = conn.execute(sa.select(table.c.body).order_by(table.c.id)).scalars().all()
    assert bodies == [f"note {i}" for i in range(1, 6)]
    assert len(cache._entries) <= 2


@pytest.fixture(params=["postgres", "mysql"])
def other_schema(
    request: pytest.FixtureRequest, make_engine: Callable[..., sa.Engine]
) -> Iterator[tuple[sa.Engine, str]]:
    """An engine on a fresh database, and a second schema (MySQL: database) beside it."""
    postgres = request.param == "postgres"
    engine = make_engine(request.getfixturevalue("pg_url" if postgres else "mysql_url"))
    name = f"t_{uuid.uuid4().hex[:16]}"
    with engine.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{name}"' if postgres else f"CREATE DATABASE {name}"))
    yield engine, name
    with engine.begin() as conn:
        conn.execute(
            sa.text(f'DROP SCHEMA "{name}" CASCADE' if postgres else f"DROP DATABASE {name}")
        )


def _tenant_tables(
    engine: sa.Engine, local_kms: LocalKms, schema: str, declared: bool
) -> tuple[Envelope, list[sa.Table]]:
    """Tables ``docs`` and ``files`` in ``schema``, holding a value each under scope "tenant"."""
    envelope = Envelope(sa.MetaData())
    metadata = envelope.metadata if declared else sa.MetaData()
    tables = [
        sa.Table(
            name,
            metadata if name == "docs" else sa.MetaData(),
            sa.Column("id", sa.Integer, primary_key=True),
            sa.Column("body", Encrypted(sa.Text, envelope, scope="tenant")),
            schema=schema,
        )
        for name in ("docs", "files")
    ]
    envelope.table.create(engine)
    envelope.configure(kms=local_kms, engine=engine)
    for table in tables:
        table.create(engine)
        with engine.begin() as conn:
            conn.execute(table.insert().values(id=1, body="tenant data"))
    return envelope, tables


def test_destroy_sees_values_in_other_schemas(
    other_schema: tuple[sa.Engine, str], local_kms: LocalKms
) -> None:
    """A schema of the envelope's MetaData is searched whole, declared tables or not."""
    engine, schema = other_schema
    envelope, tables = _tenant_tables(engine, local_kms, schema, declared=True)
    with pytest.raises(KeyInUseError) as info:
        envelope.destroy(envelope.keys("tenant")[0].id)
    assert f"in {schema}.docs.body (1), {schema}.files.body (1);" in str(info.value)
    with engine.connect() as conn:
        assert conn.execute(sa.select(tables[1].c.body)).scalar_one() == "tenant data"


def test_destroy_searches_every_postgres_schema(
    pg_url: str, make_engine: Callable[..., sa.Engine], local_kms: LocalKms
) -> None:
    """On PostgreSQL, even a schema nothing declares (on MySQL, another database)."""
    engine = make_engine(pg_url)
    schema = f"t_{uuid.uuid4().hex[:16]}"
    with engine.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    try:
        envelope, _ = _tenant_tables(engine, local_kms, schema, declared=False)
        with pytest.raises(KeyInUseError, match=rf"in {schema}\.docs\.body \(1\), {schema}\."):
            envelope.destroy(envelope.keys("tenant")[0].id)
    finally:
        with engine.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))


def test_destroy_refuses_while_the_role_may_not_read_a_table(
    pg_url: str, make_engine: Callable[..., sa.Engine], local_kms: LocalKms
) -> None:
    """Another role's schema in the database: searched as far as the role may, then refused."""
    admin = make_engine(pg_url)
    role, other = f"r_{uuid.uuid4().hex[:12]}", f"o_{uuid.uuid4().hex[:12]}"
    schema = admin.url.query["options"].split("=")[-1]  # the test's fresh schema
    with admin.begin() as conn:
        conn.execute(sa.text(f"CREATE ROLE {role} LOGIN"))
        conn.execute(sa.text(f'GRANT ALL ON SCHEMA "{schema}" TO {role}'))
        conn.execute(sa.text(f"CREATE SCHEMA {other}"))
        conn.execute(sa.text(f"CREATE TABLE {other}.secrets (id int PRIMARY KEY, b bytea)"))
    try:
        engine = make_engine(admin.url.set(username=role))
        envelope, table = _schema()
        table.metadata.create_all(engine)
        envelope.configure(kms=local_kms, engine=engine)
        with engine.begin() as conn:
            conn.execute(table.insert().values(id=1, body="kept"))
        old = envelope.keys("notes")[0].id
        envelope.rotate("notes")
        with admin.begin() as conn:  # a table of another owner; the role may read two columns
            conn.execute(sa.text("CREATE TABLE docs (id int PRIMARY KEY, photo bytea, ssn bytea)"))
            conn.execute(sa.text("INSERT INTO docs SELECT id, NULL, body FROM notes"))
            conn.execute(sa.text(f"GRANT SELECT (id, ssn) ON docs TO {role}"))
        with pytest.raises(KeyInUseError, match=r"in docs\.ssn \(1\), notes\.body \(1\);"):
            envelope.destroy(old)  # searched what it may read, and found the values
        with engine.begin() as conn:
            conn.execute(table.delete())
        with admin.begin() as conn:
            conn.execute(sa.text("DROP TABLE docs"))
        with pytest.raises(KeyInUseError, match=rf"may not read {other}\.secrets\.b,"):
            envelope.destroy(old)  # nothing left that it can see, but it cannot see all
        envelope.destroy(old, force=True)
        assert [k.state for k in envelope.keys("notes")] == ["destroyed", "active"]
    finally:
        with admin.begin() as conn:
            conn.execute(sa.text(f"DROP SCHEMA {other} CASCADE"))
            conn.execute(sa.text(f'REVOKE ALL ON SCHEMA "{schema}" FROM {role}'))
            conn.execute(sa.text(f"DROP OWNED BY {role}"))
            conn.execute(sa.text(f"DROP ROLE {role}"))


def test_rotating_a_scope_no_column_uses_warns_with_the_way_back(
    sqlite_url: str,
    make_engine: Callable[..., sa.Engine],
    local_kms: LocalKms,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A mistyped scope gets a key of its own while the intended one keeps its old key."""
    envelope, table = _schema()
    engine = make_engine(sqlite_url)
    table.metadata.create_all(engine)
    envelope.configure(kms=local_kms, engine=engine)
    caplog.set_level(logging.WARNING, logger="sqlalchemy_envelope")
    first = envelope.rotate("notes")  # a declared scope: its first key, without a warning
    assert not caplog.records
    typo = envelope.rotate("note")  # a new scope, as DESIGN.md's rotate(scope) promises
    (warning,) = caplog.records
    assert warning.levelno == logging.WARNING
    assert "scope 'note' had no keys" in warning.getMessage()
    assert "scopes with keys: 'notes'" in warning.getMessage()
    assert f"destroy key {typo}" in warning.getMessage()
    assert envelope.rotate("note") > typo and len(caplog.records) == 1  # has keys now
    envelope.destroy(typo)  # no value uses it: no force needed
    assert [k.id for k in envelope.keys("notes")] == [first]


def test_rotate_refuses_what_would_strand_the_application(
    sqlite_url: str, make_engine: Callable[..., sa.Engine], local_kms: LocalKms
) -> None:
    """Another master key would wrap a key the application cannot unwrap: not written."""
    envelope, table = _schema()
    engine = make_engine(sqlite_url)
    table.metadata.create_all(engine)
    envelope.configure(kms=local_kms, engine=engine)
    first = envelope.rotate("notes")
    wrong, _ = _schema()
    wrong.configure(kms=LocalKms(bytes(range(32))), engine=engine)
    with pytest.raises(ConfigurationError, match=r"cannot unwrap data key.*re-wrap"):
        wrong.rotate("notes")
    with pytest.raises(ConfigurationError, match=r"cannot unwrap data key"):
        wrong.rotate("visits")  # a new scope: checked against the keyring's newest key
    assert [(k.id, k.state) for k in envelope.keys() if k.state == "active"] == [(first, "active")]
    assert {k.scope for k in envelope.keys()} == {"notes"}

    class Throttled(LocalKms):  # another master key, and a KMS that cannot answer now
        def unwrap(self, wrapped: bytes, context: Mapping[str, str], kms_key_id: str) -> bytes:
            raise KmsError("throttled", code="ThrottlingException")

    busy, _ = _schema()
    busy.configure(kms=Throttled(bytes(range(32))), engine=engine)
    with pytest.raises(KmsError, match="throttled"):  # not a refusal: worth retrying as is
        busy.rotate("notes")
    assert [k.id for k in envelope.keys() if k.state == "active"] == [first]
    calls = envelope.stats.kms_calls
    assert envelope.rotate("visits") > first  # with the right KMS
    assert envelope.stats.kms_calls == calls + 1  # GenerateDataKey only: no check costs a call


def deny(client: Any, *operations: str) -> None:
    """AWS's refusal of ``operations`` to this role, raised by the boto3 client itself
    (moto's IAM checks answer KMS in a form botocore reads as code '403')."""

    def refuse(model: Any, **_: Any) -> Any:
        if model.name not in operations:
            return None
        error = {"Code": "AccessDeniedException", "Message": f"not authorized: kms:{model.name}"}
        return AWSResponse("https://kms.us-east-1.amazonaws.com/", 400, {}, None), {"Error": error}

    client.meta.events.register("before-call.kms", refuse)


def test_rotate_without_describe_key_says_it_cannot_tell_the_cmk(
    aws_credentials: None,  # noqa: F811
    sqlite_url: str,
    make_engine: Callable[..., sa.Engine],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An operator's role without kms:DescribeKey, on the application's own CMK: not told
    to use the application's KMS, but that it cannot tell which CMK the alias names."""
    with mock_aws():
        cmk = KmsBackend("in-process", None).create_cmk()
        envelope, table = _schema()
        engine = make_engine(sqlite_url)
        table.metadata.create_all(engine)
        envelope.configure(kms=AwsKms(cmk.alias, region_name=REGION), engine=engine)
        first = envelope.rotate("notes")

        operator, _ = _schema()
        client = boto3.session.Session().client("kms", region_name=REGION)
        deny(client, "DescribeKey", "Decrypt")
        operator.configure(kms=AwsKms(cmk.alias, client=client), engine=engine)
        with pytest.raises(ConfigurationError) as info:
            operator.rotate("notes")
        message = str(info.value)
        described = (
            f"cannot tell which CMK this KMS names (AWS KMS DescribeKey failed for {cmk.alias}"
        )
        assert described in message
        assert "AccessDeniedException" in message and "Grant this role kms:DescribeKey" in message
        assert "Use the application's KMS" not in message
        assert [k.id for k in envelope.keys()] == [first]

        client = boto3.session.Session().client("kms", region_name=REGION)
        deny(client, "DescribeKey")  # it may unwrap: the rotation goes on, with a warning
        operator.configure(kms=AwsKms(cmk.alias, client=client), engine=engine)
        caplog.set_level(logging.WARNING, logger="sqlalchemy_envelope")
        assert operator.rotate("notes") > first
    (warning,) = [r.getMessage() for r in caplog.records if r.name == "sqlalchemy_envelope"]
    assert "cannot tell whether this KMS wraps under" in warning and "AccessDenied" in warning
    assert "grant kms:DescribeKey" in warning


def test_a_generated_key_of_the_wrong_size_is_refused_before_anything_is_written(
    sqlite_url: str, make_engine: Callable[..., sa.Engine]
) -> None:
    """Values under a 16-byte key would be written here and fail in every other process
    ("wrong size"): the key is refused when generated, for a first write and a rotation."""

    class ShortKeys(LocalKms):
        def generate_data_key(self, context: Mapping[str, str]) -> GeneratedKey:
            generated = super().generate_data_key(context)
            return GeneratedKey(generated.plaintext[:16], generated.wrapped, generated.kms_key_id)

    envelope, table = _schema()
    engine = make_engine(sqlite_url)
    table.metadata.create_all(engine)
    envelope.configure(kms=ShortKeys(os.urandom(32)), engine=engine)
    refused = r"wrong size for scope 'notes' \(16 bytes, not 32\)"
    with pytest.raises(KmsError, match=refused), engine.begin() as conn:
        conn.execute(table.insert().values(id=1, body="written under a short key"))
    with pytest.raises(KmsError, match="16 bytes, not 32"):
        envelope.rotate("notes")
    assert envelope.keys() == []
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one() == 0


def test_a_listing_read_across_a_key_change_is_read_again(
    sqlite_url: str, make_engine: Callable[..., sa.Engine], local_kms: LocalKms
) -> None:
    """Deterministic lookups use the cached listing of a scope's keys: one read while
    another thread rotated must not be served for keyring_refresh seconds."""
    envelope, table = _schema(keyring_refresh=60)
    engine = make_engine(sqlite_url)
    table.metadata.create_all(engine)
    envelope.configure(kms=local_kms, engine=engine)
    first = envelope.rotate("notes")
    manager, listing = envelope._keys(), envelope._keys().keyring.rows
    rotated: list[int] = []

    def rows_while_rotating(scope: str | None = None, **kw: Any) -> Any:
        found = listing(scope, **kw)  # read before the rotation below ...
        if not rotated:
            rotated.append(0)
            rotated[0] = envelope.rotate("notes")  # ... which lands meanwhile
        return found

    manager.keyring.rows = rows_while_rotating  # type: ignore[method-assign]
    _, keys = manager.readable_keys("notes")
    assert sorted(k.id for _, k in keys) == [first, rotated[0]]


# -- re-wrapping under another CMK (moto) ------------------------------------------------


@pytest.fixture
def on_aws(
    pg_url: str, make_engine: Callable[..., sa.Engine], kms_backend: KmsBackend
) -> tuple[Envelope, sa.Engine, Cmk, Cmk]:
    """An envelope on Postgres under a first CMK (by alias), with keys in four scopes,
    and a second CMK to move them to."""
    old, new = kms_backend.create_cmk(), kms_backend.create_cmk()
    engine = make_engine(pg_url)
    envelope, table = _schema()
    table.metadata.create_all(engine)
    envelope.configure(kms=kms_backend.provider(old.alias), engine=engine)
    for scope in ("notes", "b", "c", "d"):
        envelope.rotate(scope)
    return envelope, engine, old, new


def _cmks(envelope: Envelope, *cmks: Cmk) -> dict[int, int]:
    """Which of ``cmks`` (by position) each live key is under."""
    arns = [c.arn for c in cmks]
    return {k.id: arns.index(k.kms_key_id) for k in envelope.keys() if k.state != "destroyed"}


def test_rewrap_within_aws_moves_every_key_it_can_and_names_those_it_cannot(
    on_aws: tuple[Envelope, sa.Engine, Cmk, Cmk], kms_backend: KmsBackend
) -> None:
    """Within one region keys move by ReEncrypt, and a process on either CMK unwraps both:
    one damaged row does not hold the others back. (Between providers nothing moves
    then: test_cli.py::test_rewrap_moves_no_key_while_one_does_not_unwrap_and_names_it.)"""
    envelope, engine, old, new = on_aws
    damaged = envelope.keys("b")[0].id
    _damage(envelope, engine, damaged)
    source, target = envelope.kms, kms_backend.provider(new.arn)
    for moved in (3, 0):  # a rerun fails the same way, and moves nothing twice
        with pytest.raises(RewrapError) as caught:
            envelope.rewrap(target)
        error = caught.value
        assert (error.moved, error.remaining) == (moved, 0)
        assert error.failed == ((damaged, "b", "InvalidCiphertextException"),)
        assert f"key {damaged} of scope 'b' (InvalidCiphertextException)" in str(error)
        assert "keys destroy ID" in str(error) and f"{moved} data key(s) moved" in str(error)
        assert {i: c for i, c in _cmks(envelope, old, new).items() if i != damaged} == {
            k.id: 1 for k in envelope.keys() if k.id != damaged
        }
        assert envelope.kms is source  # not every key is under the new CMK yet
    envelope.destroy(damaged, force=True)
    assert envelope.rewrap(target) == 0
    assert envelope.kms is target and set(_cmks(envelope, old, new).values()) == {1}


def test_rewrap_across_regions_unwraps_each_key_once_and_stores_all_or_none(
    pg_url: str, make_engine: Callable[..., sa.Engine], kms_backend: KmsBackend
) -> None:
    """Between regions keys move through this process: one Decrypt in the old region and
    one Encrypt in the new one per key, and while one does not unwrap, none is stored."""
    west, east = kms_backend.create_cmk(region="us-west-2"), kms_backend.create_cmk()
    west_client, east_client = kms_backend.client("us-west-2"), kms_backend.client()
    engine = make_engine(pg_url)
    envelope, table = _schema()
    table.metadata.create_all(engine)
    envelope.configure(kms=AwsKms(west.alias, client=west_client), engine=engine)
    for scope in ("notes", "b", "c"):
        envelope.rotate(scope)
    damaged = envelope.keys("b")[0].id
    _damage(envelope, engine, damaged)
    before = _wrapped(envelope)
    old, new = count_calls(west_client), count_calls(east_client)
    target = AwsKms(east.arn, client=east_client)

    with pytest.raises(RewrapError) as caught:
        envelope.rewrap(target)
    assert caught.value.failed == ((damaged, "b", "InvalidCiphertextException"),)
    assert caught.value.moved == 0 and _wrapped(envelope) == before
    assert (old["Decrypt"], new["Encrypt"]) == (3, 2)

    envelope.destroy(damaged, force=True)
    old.clear()
    new.clear()
    assert envelope.rewrap(target) == 2
    assert (old["Decrypt"], new["Encrypt"], old["ReEncrypt"] + new["ReEncrypt"]) == (2, 2, 0)
    assert envelope.kms is target and set(_cmks(envelope, west, east).values()) == {1}


class _RotatingMeanwhile:
    """The target KMS, while another process still on the old KMS rotates "notes"
    during each of the first ``times`` re-wraps."""

    def __init__(self, inner: Any, other: Envelope, times: int) -> None:
        self.inner, self.other, self.times = inner, other, times

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def rewrap_from(self, source: Any, *args: Any) -> tuple[bytes, str]:
        if self.times:
            self.times -= 1
            self.other.rotate("notes")
        return self.inner.rewrap_from(source, *args)  # type: ignore[no-any-return]


def test_rewrap_also_moves_keys_created_while_it_ran(
    on_aws: tuple[Envelope, sa.Engine, Cmk, Cmk],
    kms_backend: KmsBackend,
    make_engine: Callable[..., sa.Engine],
    pg_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    envelope, _, old, new = on_aws
    other, _ = _schema()
    other.configure(kms=kms_backend.provider(old.arn), engine=make_engine(pg_url))
    target = _RotatingMeanwhile(kms_backend.provider(new.arn), other, times=2)
    assert envelope.rewrap(target) == 4 + 2  # type: ignore[arg-type]
    assert set(_cmks(envelope, old, new).values()) == {1}

    # A process that never stops rotating with the old KMS: reported, not hidden.
    monkeypatch.setattr(lifecycle, "_REWRAP_PASSES", 2)
    other.rotate("notes")
    with pytest.raises(RewrapError, match=r"1 created or changed while it ran") as e:
        envelope.rewrap(_RotatingMeanwhile(kms_backend.provider(new.arn), other, times=3))
    assert (e.value.moved, e.value.failed, e.value.remaining) == (2, (), 1)


def test_rotate_sees_an_alias_moved_to_another_cmk(
    on_aws: tuple[Envelope, sa.Engine, Cmk, Cmk],
    kms_backend: KmsBackend,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The new key goes under the CMK the alias names now; the rotation says so, since
    the application must unwrap keys under both."""
    envelope, _, old, new = on_aws
    assert envelope.kms.owns(old.arn)  # type: ignore[union-attr]  # the alias, resolved
    kms_backend.client().update_alias(AliasName=old.alias, TargetKeyId=new.key_id)
    with caplog.at_level(logging.WARNING, logger="sqlalchemy_envelope"):
        envelope.rotate("b")
    assert "under another KMS key" in caplog.text
    assert [k.kms_key_id for k in envelope.keys("b") if k.state == "active"] == [new.arn]


def test_rewrap_follows_an_alias_moved_to_another_cmk(
    on_aws: tuple[Envelope, sa.Engine, Cmk, Cmk], kms_backend: KmsBackend
) -> None:
    envelope, _, old, new = on_aws
    assert envelope.kms.owns(old.arn)  # type: ignore[union-attr]  # the alias, resolved
    kms_backend.client().update_alias(AliasName=old.alias, TargetKeyId=new.key_id)
    assert envelope.rewrap(envelope.kms) == 4  # type: ignore[arg-type]
    assert set(_cmks(envelope, old, new).values()) == {1}
