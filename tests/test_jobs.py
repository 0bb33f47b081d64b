"""reencrypt and verify on SQLite and Postgres: exact values, resumability, live traffic."""

from __future__ import annotations

import datetime as dt
import decimal
import logging
import threading
import uuid
from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.orm import Session

from sqlalchemy_envelope import ConfigurationError, Encrypted, Envelope, LocalKms, wire
from sqlalchemy_envelope.jobs import reencrypt, verify
from sqlalchemy_envelope.jobs.reports import KEY_DESTROYED, NOT_AUTHENTIC
from sqlalchemy_envelope.jobs.writes import BatchWrite

from .models import App, Color, build

N = 230  # patients; batches of 50 make several pages and a short last one


class Interrupted(Exception):
    pass


@pytest.fixture
def app(
    db_url: str, make_engine: Callable[..., sa.Engine], local_kms: LocalKms
) -> tuple[App, sa.Engine]:
    a = build(keyring_refresh=0.05)
    engine = make_engine(db_url)
    a.Base.metadata.create_all(engine)
    a.envelope.configure(kms=local_kms, engine=engine)
    with Session(engine) as s:
        for i in range(1, N + 1):
            p = a.Patient(
                id=i,
                name=f"Patient {i}",
                email=f"p{i}@example.org",
                ssn=None if i % 7 == 0 else f"{i:03d}-00-{i:04d}",
                notes={"i": i, "tags": ["a", "b"]} if i % 3 else None,
            )
            p.visits.append(
                a.Visit(
                    reason=f"checkup {i}",
                    at=dt.datetime(2024, 1, 1, 9, tzinfo=dt.timezone.utc) + dt.timedelta(days=i),
                    fee=decimal.Decimal(f"{i}.50"),
                    color=Color.RED if i % 2 else None,
                )
            )
            s.add(p)
        s.add(a.Doctor(id=1, name="Dr. Who"))
        s.commit()
    return a, engine


def snapshot(a: App, engine: sa.Engine) -> dict[str, list[Any]]:
    with Session(engine) as s:
        patients = s.execute(
            sa.select(a.Patient.id, a.Patient.name, a.Patient.email, a.Patient.ssn, a.Patient.notes)
            .order_by(a.Patient.id)
        ).all()  # fmt: skip
        visits = s.execute(
            sa.select(a.Visit.id, a.Visit.reason, a.Visit.at, a.Visit.fee, a.Visit.color).order_by(
                a.Visit.id
            )
        ).all()
    return {"patients": [tuple(r) for r in patients], "visits": [tuple(r) for r in visits]}


def key_ids(engine: sa.Engine, table: str, columns: list[str]) -> dict[int | None, int]:
    counts: dict[int | None, int] = {}
    with engine.connect() as conn:
        for column in columns:
            for (value,) in conn.execute(sa.text(f"SELECT {column} FROM {table}")):
                if value is not None:
                    key = wire.key_id_of(bytes(value))
                    counts[key] = counts.get(key, 0) + 1
    return counts


PATIENT_COLUMNS = ["name", "email", "ssn", "notes"]


@pytest.mark.parametrize("form", ["model", "table", "name"])
def test_reencrypt_after_rotate_moves_every_value_exactly(
    app: tuple[App, sa.Engine], form: str
) -> None:
    a, engine = app
    before = snapshot(a, engine)
    old = a.envelope.keys("patients")[0].id
    new = a.envelope.rotate("patients")
    target = {"model": a.Patient, "table": a.Patient.__table__, "name": "patients"}[form]
    calls: list[tuple[int, int | None]] = []

    report = reencrypt(
        a.envelope, target, batch_size=50, progress=lambda d, t: calls.append((d, t))
    )

    values = sum(1 for p in before["patients"] for v in p[1:] if v is not None)
    assert report.rows == N and report.values_rewritten == values and report.ok
    assert report.active_keys == {"patients": new}
    # One call per batch; with two lanes batches finish in either order, so the
    # steps are the batch sizes in some order and the count only grows.
    assert all(total == N for _, total in calls)
    done = [d for d, _ in calls]
    steps = sorted(b - a for a, b in zip([0, *done[:-1]], done, strict=True))
    assert steps == [N % 50] + [50] * (N // 50) and done[-1] == N
    assert key_ids(engine, "patients", PATIENT_COLUMNS) == {new: values}
    assert snapshot(a, engine) == before
    # Deterministic lookups work under the new key; the old key is free to destroy.
    with Session(engine) as s:
        assert (
            s.scalars(sa.select(a.Patient.name).where(a.Patient.email == "p7@example.org")).one()
            == "Patient 7"
        )
    a.envelope.destroy(old)
    again = reencrypt(a.envelope, target, batch_size=50)
    assert again.values_rewritten == 0 and again.values_current == values


def test_reencrypt_uuid_keys_and_scopes(app: tuple[App, sa.Engine]) -> None:
    a, engine = app
    before = snapshot(a, engine)
    new = a.envelope.rotate("visits")
    report = reencrypt(a.envelope, a.Visit, batch_size=64)
    assert report.rows == N and report.values_rewritten == 3 * N + N // 2 + N % 2
    assert key_ids(engine, "visits", ["reason", "at", "fee", "color"]) == {
        new: report.values_rewritten
    }
    assert snapshot(a, engine) == before
    staff = a.envelope.rotate("staff")  # the Doctor model's own scope
    assert reencrypt(a.envelope, a.Doctor).active_keys == {"staff": staff}
    assert key_ids(engine, "doctors", ["name"]) == {staff: 1}


def test_reencrypt_from_the_database_alone(
    app: tuple[App, sa.Engine],
    db_url: str,
    make_engine: Callable[..., sa.Engine],
    local_kms: LocalKms,
) -> None:
    """What the CLI does: a bare Envelope, a table name, nothing imported from the application."""
    a, engine = app
    before = snapshot(a, engine)
    new = a.envelope.rotate("patients")
    bare = Envelope()
    bare.configure(kms=local_kms, engine=make_engine(db_url))
    report = reencrypt(bare, "patients", batch_size=100)
    assert report.ok and report.values_rewritten == sum(
        key_ids(engine, "patients", PATIENT_COLUMNS).values()
    )
    assert key_ids(engine, "patients", PATIENT_COLUMNS) == {new: report.values_rewritten}
    assert (
        snapshot(a, engine) == before
    )  # email stayed deterministic: the app's lookups still match
    with Session(engine) as s:
        assert (
            s.scalars(sa.select(a.Patient.id).where(a.Patient.email == "p9@example.org")).one() == 9
        )
    assert verify(bare, "visits").by_key == verify(a.envelope, a.Visit).by_key
    with pytest.raises(ConfigurationError, match="no encrypted columns"):
        verify(bare, "envelope_data_keys")


def test_reencrypt_resumes_after_an_interruption(app: tuple[App, sa.Engine]) -> None:
    a, engine = app
    before = snapshot(a, engine)
    new = a.envelope.rotate("patients")

    def stop_after_two(done: int, total: int | None) -> None:
        if done >= 100:
            raise Interrupted

    with pytest.raises(Interrupted):
        reencrypt(a.envelope, a.Patient, batch_size=50, progress=stop_after_two)
    halfway = key_ids(engine, "patients", PATIENT_COLUMNS)
    assert len(halfway) == 2 and halfway[new] > 0  # two committed batches, the rest untouched
    report = reencrypt(a.envelope, a.Patient, batch_size=50)
    assert report.values_current == halfway[new]
    assert key_ids(engine, "patients", PATIENT_COLUMNS) == {new: sum(halfway.values())}
    assert snapshot(a, engine) == before  # nothing encrypted twice


def test_a_concurrent_write_is_kept(
    app: tuple[App, sa.Engine], db_url: str, make_engine: Callable[..., sa.Engine]
) -> None:
    a, engine = app
    a.envelope.rotate("patients")
    job_engine = make_engine(db_url)
    app_write = threading.Thread(target=rename_patient_one, args=(a, engine))
    first = threading.Lock()  # two lanes may reach their first UPDATE together: start once

    @event.listens_for(job_engine, "before_cursor_execute")
    def app_writes_first(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        # Between the job's read of the first batch and its first write, the
        # application updates patient 1 (another thread, another connection).
        if statement.lstrip().upper().startswith("UPDATE") and first.acquire(blocking=False):
            app_write.start()
            app_write.join(1.0)

    report = reencrypt(a.envelope, a.Patient, batch_size=50, bind=job_engine)
    app_write.join(10)
    assert app_write.ident is not None and not app_write.is_alive()
    # The read locked the batch's rows (SQLite: the database): the app's write waited.
    assert report.values_changed == 0
    with Session(engine) as s:
        assert s.get(a.Patient, 1).name == "Renamed by the app"
    assert (
        reencrypt(a.envelope, a.Patient).values_rewritten == 0
    )  # the app wrote under the active key


def test_a_batch_write_keeps_a_value_changed_since_the_batch_read_it(
    app: tuple[App, sa.Engine],
) -> None:
    """The compare-and-set behind reencrypt's writes, on its own (its row locks make the
    application wait, so no job shows it): a value changed between the batch's read and its
    write keeps the application's write and is not counted as written. On PostgreSQL the
    one-statement write, elsewhere the row-by-row one."""
    a, engine = app
    stored = sa.Table("patients", sa.MetaData(), autoload_with=engine)  # as a job reads it
    write = BatchWrite(
        engine.dialect, stored, [stored.c.id], stored.c.name, sa.LargeBinary(), guard=stored.c.name
    )
    crypter = a.Patient.__table__.c.name.type.crypter()
    with engine.connect() as conn:
        olds = [conn.execute(sa.select(stored.c.name).where(stored.c.id == i)).scalar_one()
                for i in (1, 2)]  # fmt: skip
    rename_patient_one(a, engine)  # after the read, before the write
    news = [crypter.encrypt(b"one"), crypter.encrypt(b"two")]
    with engine.begin() as conn:
        assert write(conn, [(1,), (2,)], news, [bytes(o) for o in olds]) == 1
    with Session(engine) as s:
        assert [s.get(a.Patient, i).name for i in (1, 2)] == ["Renamed by the app", "two"]


def rename_patient_one(a: App, engine: sa.Engine) -> None:
    with Session(engine) as s:
        s.get(a.Patient, 1).name = "Renamed by the app"
        s.commit()


def test_verify_counts_and_finds_problems(
    app: tuple[App, sa.Engine], caplog: pytest.LogCaptureFixture
) -> None:
    a, engine = app
    first = a.envelope.keys("patients")[0].id
    report = verify(a.envelope, a.Patient, batch_size=40)
    values = sum(key_ids(engine, "patients", PATIENT_COLUMNS).values())
    assert report.ok and report.rows == N and report.by_key == {first: values}
    assert report.columns["ssn"].null == N // 7 and report.plaintext == report.unreadable == 0

    second = a.envelope.rotate("patients")
    with Session(engine) as s:
        s.add(a.Patient(id=N + 1, name="Newer", email="new@example.org"))
        s.commit()
    with engine.begin() as conn:
        raw = {
            r.id: (bytes(r.name), bytes(r.email))
            for r in conn.execute(
                sa.text("SELECT id, name, email FROM patients WHERE id IN (1, 2, 3)")
            )
        }
        flipped = bytearray(raw[2][0])
        flipped[-1] ^= 1
        plant = sa.text("UPDATE patients SET name = :v WHERE id = :i").bindparams(
            sa.bindparam("v", type_=sa.LargeBinary)
        )
        conn.execute(plant, {"v": b"Patient one in clear", "i": 1})  # plaintext
        conn.execute(plant, {"v": bytes(flipped), "i": 2})  # tampered
        conn.execute(plant, {"v": raw[3][1], "i": 3})  # moved from the email column
    caplog.set_level(logging.INFO, logger="sqlalchemy_envelope")
    report = verify(a.envelope, "patients")
    assert not report.ok and report.plaintext == 1 and report.unreadable == 2
    assert report.unreadable_by_cause == {NOT_AUTHENTIC: 2}
    assert report.columns["name"].plaintext == 1 and report.columns["email"].ok
    assert report.by_key == {first: values - 3, second: 2}

    a.envelope.destroy(first, force=True)
    report = verify(a.envelope, a.Patient)
    assert report.by_key == {second: 2} and report.unreadable_by_cause == {
        KEY_DESTROYED: values - 1
    }
    for text in (repr(report), str(report), caplog.text):
        assert "Patient" not in text and "example.org" not in text and "in clear" not in text
    moved = reencrypt(a.envelope, a.Patient)  # leaves what it cannot read alone, and says so
    assert moved.values_rewritten == 0 and moved.plaintext == 1 and moved.unreadable == values - 1


def test_reencrypt_refuses_misuse(app: tuple[App, sa.Engine]) -> None:
    a, engine = app
    with pytest.raises(ValueError, match="batch_size"):
        reencrypt(a.envelope, a.Patient, batch_size=0)
    with pytest.raises(TypeError):
        reencrypt(a.envelope, 42)
    with pytest.raises(ConfigurationError, match="no column"):
        verify(a.envelope, "patients", columns=["nope"])
    with pytest.raises(ConfigurationError, match="not a binary column"):
        verify(a.envelope, "doctors", columns=["plain"])
    with engine.connect() as conn:
        conn.execute(sa.text("SELECT 1"))
        with pytest.raises(ValueError, match="outside any transaction"):
            verify(a.envelope, a.Patient, bind=conn)


def test_composite_primary_key(
    any_db_url: str, make_engine: Callable[..., sa.Engine], local_kms: LocalKms
) -> None:
    metadata = sa.MetaData()
    envelope = Envelope(metadata)
    table = sa.Table(
        "events",
        metadata,
        sa.Column("tenant", sa.String(20), primary_key=True),
        sa.Column("id", sa.Uuid, primary_key=True),
        sa.Column("body", Encrypted(sa.Text, envelope)),
    )
    engine = make_engine(any_db_url)
    metadata.create_all(engine)
    envelope.configure(kms=local_kms, engine=engine)
    rows = [{"tenant": f"t{i % 3}", "id": uuid.uuid4(), "body": f"event {i}"} for i in range(101)]
    with engine.begin() as conn:
        conn.execute(table.insert(), rows)
    new = envelope.rotate("events")
    report = reencrypt(envelope, table, batch_size=10)
    assert report.rows == 101 and report.values_rewritten == 101
    with engine.connect() as conn:
        stored = {(r.tenant, r.id): r.body for r in conn.execute(sa.select(table))}
    assert stored == {(r["tenant"], r["id"]): r["body"] for r in rows}
    assert key_ids(engine, "events", ["body"]) == {new: 101}


def test_reencrypt_pages_with_interleaved_keys(app: tuple[App, sa.Engine]) -> None:
    """Pages whose values alternate between old keys and the active one: each goes its way."""
    a, engine = app
    before = snapshot(a, engine)
    first = a.envelope.keys("patients")[0].id
    second = a.envelope.rotate("patients")
    with Session(engine) as s:  # every third patient rewritten under the second key
        for p in s.scalars(sa.select(a.Patient).where(a.Patient.id % 3 == 0)):
            sa.orm.attributes.flag_modified(p, "name")
        s.commit()
    third = a.envelope.rotate("patients")
    with Session(engine) as s:  # every fifth under the active (third) key
        for p in s.scalars(sa.select(a.Patient).where(a.Patient.id % 5 == 0)):
            sa.orm.attributes.flag_modified(p, "name")
        s.commit()
    names = key_ids(engine, "patients", ["name"])
    assert set(names) == {first, second, third}
    report = reencrypt(a.envelope, a.Patient, batch_size=50, columns=["name"])
    assert report.values_current == names[third]
    assert report.values_rewritten == names[first] + names[second]
    assert key_ids(engine, "patients", ["name"]) == {third: N}
    assert snapshot(a, engine) == before


def test_verify_counts_a_declared_column_not_converted_yet_as_plaintext(
    any_db_url: str, make_engine: Callable[..., sa.Engine], local_kms: LocalKms
) -> None:
    """The models say Encrypted, the database still holds text: that is plaintext, not ok."""
    engine = make_engine(any_db_url)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE people (id INT PRIMARY KEY, name VARCHAR(40))")
        conn.exec_driver_sql("INSERT INTO people VALUES (1, 'one'), (2, NULL), (3, 'three')")
    envelope = Envelope(sa.MetaData())
    envelope.table.create(engine)
    envelope.configure(kms=local_kms, engine=engine)
    people = sa.Table(
        "people",
        envelope.metadata,  # type: ignore[arg-type]
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", Encrypted(sa.String(40), envelope)),
    )
    for target in (people, "people"):
        report = verify(envelope, target)
        assert (report.rows, report.columns["name"].plaintext, report.ok) == (3, 2, False)
    with pytest.raises(ConfigurationError, match="still stored as plaintext; convert them"):
        reencrypt(envelope, people)


def test_a_table_with_no_encrypted_value_yet_is_fine(
    db_url: str, make_engine: Callable[..., sa.Engine], local_kms: LocalKms
) -> None:
    """From the database alone, an empty table (or only NULLs) has nothing to verify or move."""
    engine = make_engine(db_url)
    envelope = Envelope(sa.MetaData())
    envelope.table.create(engine)
    envelope.configure(kms=local_kms, engine=engine)
    with engine.begin() as conn:
        binary = "BYTEA" if engine.dialect.name == "postgresql" else "BLOB"
        conn.execute(sa.text(f"CREATE TABLE blobs (id INT PRIMARY KEY, body {binary})"))
        conn.execute(sa.text("INSERT INTO blobs VALUES (1, NULL)"))
    report = verify(envelope, "blobs")
    assert (report.rows, report.ok, report.columns) == (1, True, {})
    assert reencrypt(envelope, "blobs").values_rewritten == 0
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE blobs SET body = :b"), {"b": b"not ours at all, just bytes"})
    with pytest.raises(ConfigurationError, match="--column NAME"):
        verify(envelope, "blobs")


def test_a_duplicate_under_a_unique_constraint_is_left_and_counted(
    any_db_url: str, make_engine: Callable[..., sa.Engine], local_kms: LocalKms
) -> None:
    """After a rotation the application wrote an email equal to an older row's: the older
    one cannot move under the unique constraint; every other value still does."""
    a = build()
    engine = make_engine(any_db_url)
    a.Base.metadata.create_all(engine)
    a.envelope.configure(kms=local_kms, engine=engine)
    with Session(engine) as s:
        s.add_all([a.Patient(id=i, name=f"n{i}", email=f"{i}@x.org") for i in range(1, 6)])
        s.commit()
    new = a.envelope.rotate("patients")
    with Session(engine) as s:
        s.add(a.Patient(id=9, name="late", email="3@x.org"))  # a different ciphertext: accepted
        s.commit()
    for _ in range(2):  # a rerun does the same: it finishes, it does not fail
        report = a.envelope.reencrypt(a.Patient)
        assert (report.duplicates, report.ok) == (1, False)
        assert "1 duplicates left under their old key" in str(report)
        by_key = verify(a.envelope, a.Patient).columns["email"].by_key
        assert by_key[new] == 5 and sum(by_key.values()) == 6
    with Session(engine) as s:
        s.delete(s.get(a.Patient, 9))
        s.commit()
    assert a.envelope.reencrypt(a.Patient).ok
    assert verify(a.envelope, a.Patient).columns["email"].by_key == {new: 5}


def test_a_batch_of_large_values_is_written_in_several_statements(
    pg_url: str,
    make_engine: Callable[..., sa.Engine],
    local_kms: LocalKms,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A statement's values stay under a byte budget (PostgreSQL refuses messages over 1 GB)."""
    from sqlalchemy_envelope.jobs import writes

    monkeypatch.setattr(writes, "MAX_STATEMENT_BYTES", 2_000)
    a = build()
    engine = make_engine(pg_url)
    a.Base.metadata.create_all(engine)
    a.envelope.configure(kms=local_kms, engine=engine)
    with Session(engine) as s:
        s.add_all([a.Patient(id=i, name="x" * 300, email=f"{i}@x.org") for i in range(1, 41)])
        s.commit()
    new = a.envelope.rotate("patients")
    updates: list[str] = []
    event.listen(engine, "before_cursor_execute", lambda *args: updates.append(args[2]))
    report = a.envelope.reencrypt(a.Patient, batch_size=40)
    assert report.values_rewritten == 80 and report.ok
    name_writes = [s for s in updates if s.startswith("UPDATE patients SET name")]
    assert len(name_writes) >= 8  # 40 values of ~330 bytes, twice (old and new): 2,000 each
    assert verify(a.envelope, a.Patient).columns["name"].by_key == {new: 40}


def test_a_table_that_is_not_there_is_named_in_a_configuration_error(
    sqlite_url: str, make_engine: Callable[..., sa.Engine], local_kms: LocalKms
) -> None:
    """As the command line says it: not SQLAlchemy's bare NoSuchTableError."""
    from sqlalchemy_envelope.jobs import abandon_conversion, encrypt_column

    a = build()
    engine = make_engine(sqlite_url)
    a.Base.metadata.create_all(engine)
    a.envelope.configure(kms=local_kms, engine=engine)
    with pytest.raises(ConfigurationError, match="no table named 'patient' in the database"):
        a.envelope.verify("patient")
    with pytest.raises(ConfigurationError, match="no table named 'patient' in the database"):
        reencrypt(a.envelope, "patient")
    with pytest.raises(ConfigurationError, match="no table named 'stuff' in the database"):
        encrypt_column(a.envelope, engine, "stuff", "ssn", Encrypted(sa.String(11)))
    with pytest.raises(ConfigurationError, match="no table named 'stuff' in the database"):
        abandon_conversion(engine, "stuff", "ssn")


def test_a_column_sample_without_a_working_kms_takes_headers_at_their_word(
    sqlite_url: str, local_kms: LocalKms, caplog: pytest.LogCaptureFixture
) -> None:
    """Autogenerate on a machine whose KMS cannot unwrap (another master key, no AWS
    credentials) still tells an encrypted column, as it did before values were checked."""
    from sqlalchemy_envelope.jobs.discovery import sample_column

    engine = sa.create_engine(sqlite_url)
    envelope = Envelope(sa.MetaData())
    metadata: Any = envelope.metadata
    docs = sa.Table(
        "docs",
        metadata,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("body", Encrypted(sa.LargeBinary, envelope)),
    )
    envelope.configure(kms=local_kms, engine=engine)
    metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(docs.insert().values(id=1, body=b"secret"))
    elsewhere = Envelope(sa.MetaData())
    elsewhere.configure(kms=LocalKms(b"x" * 32), engine=engine)
    with engine.connect() as conn:
        stored = sample_column(conn, elsewhere, sa.table("docs"), "body")
    assert stored.ours and stored.scope == "docs"
    assert "the KMS could not check its values" in caplog.text
    engine.dispose()
