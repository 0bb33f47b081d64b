"""Declaring and configuring: clear errors for misuse, and the less common declaration styles."""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from sqlalchemy_envelope import ConfigurationError, Encrypted, Envelope, LocalKms, keyring

SecretStr = Annotated[str, "secret"]


def test_envelope_options_are_validated() -> None:
    with pytest.raises(ValueError, match="cache_ttl"):
        Envelope(cache_ttl=0)
    with pytest.raises(ValueError, match="cache_ttl"):
        Envelope(cache_ttl=float("inf"))
    with pytest.raises(ValueError, match="cache_capacity"):
        Envelope(cache_capacity=0)
    with pytest.raises(TypeError, match="MetaData"):
        Envelope("not metadata")  # type: ignore[arg-type]
    metadata = sa.MetaData()
    Envelope(metadata)
    with pytest.raises(ConfigurationError, match="already has an Envelope"):
        Envelope(metadata)


def test_configure_is_validated() -> None:
    envelope = Envelope()
    with pytest.raises(TypeError, match="KMS provider"):
        envelope.configure(kms="alias/x", engine=sa.create_engine("sqlite://"))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="Engine"):
        envelope.configure(kms=LocalKms(b"k" * 32), engine="sqlite://")  # type: ignore[arg-type]


def test_keyring_table_is_in_the_metadata_with_the_contract_columns() -> None:
    metadata = sa.MetaData()
    envelope = Envelope(metadata, table_name="my_keys")
    table = metadata.tables["my_keys"]
    assert table is envelope.table
    assert {"id", "scope", "state", "wrapped_key", "kms_key_id", "created_at"} <= set(
        table.c.keys()
    )


def test_encrypted_arguments_are_validated() -> None:
    envelope = Envelope()
    with pytest.raises(TypeError, match="SQLAlchemy type"):
        Encrypted("String", envelope)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="Envelope"):
        Encrypted(sa.String, object())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="another Encrypted"):
        Encrypted(Encrypted(sa.String, envelope), envelope)
    with pytest.raises(ValueError, match="scope"):
        Encrypted(sa.String, envelope, scope="")


def test_column_without_envelope_fails_when_first_used() -> None:
    metadata = sa.MetaData()
    table = sa.Table(
        "t",
        metadata,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("v", Encrypted(sa.String(5))),
    )
    engine = sa.create_engine("sqlite://")
    metadata.create_all(engine)
    with engine.begin() as conn, pytest.raises(ConfigurationError, match=r"t\.v.*no envelope"):
        conn.execute(table.insert().values(id=1, v="x"))


def test_use_before_configure_is_a_configuration_error() -> None:
    metadata = sa.MetaData()
    envelope = Envelope(metadata)
    table = sa.Table(
        "t",
        metadata,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("v", Encrypted(sa.String(5), envelope)),
    )
    engine = sa.create_engine("sqlite://")
    metadata.create_all(engine)
    with engine.begin() as conn, pytest.raises(ConfigurationError, match="configure"):
        conn.execute(table.insert().values(id=1, v="x"))


def test_shared_type_objects_and_annotation_maps_bind_each_column(tmp_path: Any) -> None:
    envelope_holder: dict[str, Envelope] = {}

    class Base(DeclarativeBase):
        pass

    envelope = envelope_holder["e"] = Envelope(Base.metadata)
    Base.registry.update_type_annotation_map({SecretStr: Encrypted(sa.String(50), envelope)})
    shared = Encrypted(sa.String(50), envelope)

    class A(Base):
        __tablename__ = "a"
        id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
        x: Mapped[SecretStr]
        y: Mapped[SecretStr]
        z: Mapped[str] = mapped_column(shared)
        w: Mapped[str] = mapped_column(shared)

    engine = sa.create_engine(f"sqlite:///{tmp_path / 'a.db'}")
    Base.metadata.create_all(engine)
    envelope.configure(kms=LocalKms(b"k" * 32), engine=engine)
    with Session(engine) as s:
        s.add(A(x="1", y="2", z="3", w="4"))
        s.commit()
    with Session(engine) as s:
        a = s.scalars(sa.select(A)).one()
        assert (a.x, a.y, a.z, a.w) == ("1", "2", "3", "4")
    assert set(envelope.columns) == {("a", "x"), ("a", "y"), ("a", "z"), ("a", "w")}
    with engine.connect() as conn:
        raw = conn.execute(sa.text("SELECT x, y, z, w FROM a")).one()
    # each column decrypts only as itself: swap two columns' ciphertexts and reads fail
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE a SET x = :y, y = :x"), {"x": raw[0], "y": raw[1]})
    from sqlalchemy_envelope import DecryptionError

    with Session(engine) as s, pytest.raises(DecryptionError, match=r"a\.x"):
        s.scalars(sa.select(A)).one()


def test_sqlmodel_field_with_sa_type(tmp_path: Any) -> None:
    from sqlmodel import Field, SQLModel
    from sqlmodel import Session as SMSession

    own_metadata = sa.MetaData()
    envelope = Envelope(own_metadata)

    class Customer(SQLModel, table=True):
        metadata = own_metadata
        id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
        email: str = Field(
            sa_type=Encrypted(sa.String(320), envelope, deterministic=True), unique=True
        )
        phone: str | None = Field(default=None, sa_type=Encrypted(sa.String(30), envelope))

    engine = sa.create_engine(f"sqlite:///{tmp_path / 'sm.db'}")
    own_metadata.create_all(engine)
    envelope.configure(kms=LocalKms(b"k" * 32), engine=engine)
    with SMSession(engine) as s:
        s.add(Customer(email="c@x.org", phone="+1 555"))
        s.commit()
    with SMSession(engine) as s:
        c = s.exec(sa.select(Customer).where(Customer.email == "c@x.org")).scalars().one()  # type: ignore[call-overload]
        assert c.phone == "+1 555"


def _notes(envelope: Envelope) -> sa.Table:
    return sa.Table(
        "notes",
        envelope.metadata if envelope.metadata is not None else sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("body", Encrypted(sa.String(50), envelope)),
    )


def _ids(conn: sa.Connection, table: sa.Table) -> list[int]:
    return list(conn.execute(sa.select(table.c.id).order_by(table.c.id)).scalars())


def test_an_in_memory_database_keeps_the_applications_transaction_whole() -> None:
    """Its one connection is shared with the keyring: no keyring I/O may end a transaction."""
    envelope = Envelope(sa.MetaData(), keyring_refresh=0.01, cache_ttl=0.02)
    notes = _notes(envelope)
    engine = sa.create_engine("sqlite://")
    notes.metadata.create_all(engine)
    envelope.configure(kms=LocalKms(b"k" * 32), engine=engine)
    with engine.connect() as conn:
        with conn.begin():
            conn.execute(notes.insert().values(id=1, body="one"))
            time.sleep(0.05)  # cache_ttl is over: the key is read again, inside the transaction
            conn.execute(notes.insert().values(id=2, body="two"))
        with conn.begin() as transaction:
            conn.execute(notes.insert().values(id=3, body="three"))
            with pytest.raises(ConfigurationError, match="cannot write a key"):
                envelope.rotate("notes")
            transaction.rollback()
        assert _ids(conn, notes) == [1, 2]
        conn.rollback()
        envelope.rotate("notes")  # between transactions, it may
        conn.execute(notes.insert().values(id=3, body="three"))
        conn.commit()
        assert conn.execute(sa.select(notes.c.body).where(notes.c.id == 3)).scalar() == "three"


def test_a_static_pool_reads_keys_inside_the_applications_transaction(tmp_path: Any) -> None:
    """A file database behind a StaticPool: the keyring reads in the open transaction."""
    envelope = Envelope(sa.MetaData(), keyring_refresh=0.01, cache_ttl=0.05)
    notes = _notes(envelope)
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'static.db'}", poolclass=sa.StaticPool)
    notes.metadata.create_all(engine)
    envelope.configure(kms=LocalKms(b"k" * 32), engine=engine)
    with engine.connect() as conn:
        with conn.begin():
            conn.execute(notes.insert().values(id=1, body="one"))
            time.sleep(0.1)  # keyring_refresh and cache_ttl are over: read the keyring again
            conn.execute(notes.insert().values(id=2, body="two"))
            envelope.configure(kms=LocalKms(b"k" * 32), engine=engine)  # a cold process
            assert conn.execute(sa.select(notes.c.body).order_by(notes.c.id)).scalars().all() == [
                "one",
                "two",
            ]
            with pytest.raises(ConfigurationError, match="cannot write a key"):
                envelope.rotate("notes")
        assert _ids(conn, notes) == [1, 2]  # committed whole


def test_configure_again_leaves_no_earlier_key_manager_behind(tmp_path: Any) -> None:
    """SQLite prepares scopes as a transaction begins: with the current provider only."""
    from sqlalchemy_envelope import events

    envelope = Envelope(sa.MetaData())
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'again.db'}")
    for _ in range(3):
        envelope.configure(kms=LocalKms(b"k" * 32), engine=engine)
    managers = [m for m in events._sqlite_managers if m.keyring.data_engine is engine]
    assert managers == [envelope._keys()]


def test_a_static_pool_refuses_keyring_io_from_another_threads_transaction(
    tmp_path: Any,
) -> None:
    """One connection for every thread: another thread's keyring I/O would end this one's work."""
    import threading

    envelope = Envelope(sa.MetaData())
    notes = _notes(envelope)
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'static.db'}", poolclass=sa.StaticPool)
    notes.metadata.create_all(engine)
    envelope.configure(kms=LocalKms(b"k" * 32), engine=engine)
    seen: list[BaseException | None] = []
    with engine.connect() as conn:
        with conn.begin():
            conn.execute(notes.insert().values(id=1, body="one"))

            def other() -> None:
                try:
                    envelope.keys("notes")
                    seen.append(None)
                except ConfigurationError as exc:
                    seen.append(exc)

            thread = threading.Thread(target=other)
            thread.start()
            thread.join()
        assert isinstance(seen[0], ConfigurationError)
        assert "another thread's transaction" in str(seen[0])
        assert _ids(conn, notes) == [1]


def test_a_missing_keyring_table_is_named_on_an_in_memory_database() -> None:
    envelope = Envelope(sa.MetaData(), table_name="no_such_keys")
    notes = sa.Table(
        "notes", sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("body", Encrypted(sa.String(50), envelope)),
    )  # fmt: skip
    engine = sa.create_engine("sqlite://")
    notes.metadata.create_all(engine)  # the keyring's MetaData is not created
    envelope.configure(kms=LocalKms(b"k" * 32), engine=engine)
    missing = "'no_such_keys' does not exist"
    with pytest.raises(ConfigurationError, match=missing):
        envelope.keys()
    with pytest.raises(ConfigurationError, match=missing), engine.begin() as conn:
        conn.execute(notes.insert().values(id=1, body="one"))


def _notes(envelope: Envelope) -> sa.Table:
    return sa.Table(
        "notes", envelope.metadata,  # type: ignore[arg-type]
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("body", Encrypted(sa.String(50), envelope)),
    )  # fmt: skip


def test_recreating_the_keyring_table_and_writing_in_one_transaction_fails_rather_than_hangs(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The keyring reads on its own connection, which does not see a table created by a
    transaction that has not committed, and waits for one that transaction dropped and
    created again, while that transaction waits for the key: a lock timeout ends it."""
    monkeypatch.setattr(keyring, "LOCK_TIMEOUT", 0.5)
    envelope = Envelope(sa.MetaData())
    notes = _notes(envelope)
    engine = sa.create_engine(pg_url)
    envelope.configure(kms=LocalKms(b"k" * 32), engine=engine)
    missing = pytest.raises(ConfigurationError, match="commit its creation before writing")
    with missing, engine.begin() as conn:
        envelope.metadata.create_all(conn)  # type: ignore[arg-type]
        conn.execute(notes.insert().values(id=1, body="one"))
    envelope.metadata.create_all(engine)  # type: ignore[arg-type]
    started = time.monotonic()
    locked = pytest.raises(ConfigurationError, match="Commit the keyring table's creation")
    with locked, engine.begin() as conn:
        envelope.metadata.drop_all(conn)  # type: ignore[arg-type]
        envelope.metadata.create_all(conn)  # type: ignore[arg-type]
        conn.execute(notes.insert().values(id=1, body="one"))
    assert time.monotonic() - started < 10
    envelope.metadata.create_all(engine)  # type: ignore[arg-type]
    with engine.begin() as conn:  # committed first: the same write goes through
        conn.execute(notes.insert().values(id=1, body="one"))
        assert conn.execute(sa.select(notes.c.body)).scalar() == "one"
    engine.dispose()


@pytest.mark.parametrize("backend", ["postgres", "mysql"])
def test_a_keyring_table_locked_by_another_transaction_is_named_after_the_timeout(
    request: pytest.FixtureRequest, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(keyring, "LOCK_TIMEOUT", 1.0)
    url = request.getfixturevalue("pg_url" if backend == "postgres" else "mysql_url")
    envelope = Envelope(sa.MetaData())
    notes = _notes(envelope)
    engine = sa.create_engine(url)
    envelope.metadata.create_all(engine)  # type: ignore[arg-type]
    envelope.configure(kms=LocalKms(b"k" * 32), engine=engine)
    lock = {
        "postgres": "LOCK TABLE envelope_data_keys IN ACCESS EXCLUSIVE MODE",
        "mysql": "LOCK TABLES envelope_data_keys WRITE",
    }[backend]
    with engine.connect() as holder:
        holder.exec_driver_sql(lock)
        locked = pytest.raises(ConfigurationError, match="stayed locked by another transaction")
        with locked, engine.begin() as conn:
            conn.execute(notes.insert().values(id=1, body="one"))
        holder.rollback()
        if backend == "mysql":
            holder.exec_driver_sql("UNLOCK TABLES")
    with engine.begin() as conn:
        conn.execute(notes.insert().values(id=1, body="one"))
    engine.dispose()
