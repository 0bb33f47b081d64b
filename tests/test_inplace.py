"""encrypt_column / decrypt_column in place, on SQLite, Postgres and MySQL/MariaDB."""

from __future__ import annotations

import datetime as dt
import decimal
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import event

from sqlalchemy_envelope import (
    ConfigurationError,
    DecryptionError,
    Encrypted,
    Envelope,
    LocalKms,
    ValueTypeError,
    wire,
)
from sqlalchemy_envelope.jobs import (
    abandon_conversion,
    conversion,
    decrypt_column,
    encrypt_column,
    reencrypt_column,
    trigger,
    verify,
)
from sqlalchemy_envelope.jobs.batches import Progress
from sqlalchemy_envelope.jobs.early import _FROM_MYSQL_LATIN1
from sqlalchemy_envelope.jobs.sqlite_rebuild import (
    column_collations,
    column_definitions,
    inline_uniques,
)

ROWS = 240


class Interrupted(Exception):
    pass


def plaintext_types(dialect: str) -> dict[str, sa.types.TypeEngine[Any]]:
    return {
        "s": sa.String(40),
        "i": sa.Integer(),
        "n": sa.Numeric(12, 4),
        "ts": sa.DateTime(timezone=True),
        "j": sa.JSON(),
        "d": sa.Date(),
        "b": sa.Boolean(),
    }


def value(column: str, i: int, dialect: str) -> Any:
    if i % 11 == 0:
        return None
    when = dt.datetime(2024, 3, 1, 12, 30, 15, 123456, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    return {
        "s": f"secret {i} é",
        "i": i * 1000 - 7,
        "n": decimal.Decimal(i) / 8,
        # Only Postgres keeps an offset; elsewhere the plaintext column is naive.
        "ts": (when if dialect == "postgresql" else when.replace(tzinfo=None))
        + dt.timedelta(minutes=i),
        "j": {"i": i, "list": [1, "two", None], "nested": {"ok": i % 2 == 0}},
        "d": dt.date(2020, 1, 1) + dt.timedelta(days=i),
        "b": i % 2 == 0,
    }[column]


def make_table(engine: sa.Engine) -> tuple[sa.Table, list[tuple[Any, ...]]]:
    dialect = engine.dialect.name
    types = plaintext_types(dialect)
    metadata = sa.MetaData()
    table = sa.Table(
        "records",
        metadata,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("code", sa.String(20), nullable=False, unique=True),
        *(sa.Column(name, type_) for name, type_ in types.items()),
    )
    metadata.create_all(engine)
    rows = [
        {"id": i, "code": f"code-{i:05d}", **{c: value(c, i, dialect) for c in types}}
        for i in range(1, ROWS + 1)
    ]
    with engine.begin() as conn:
        conn.execute(table.insert(), rows)
    return table, read(engine, table)


def read(engine: sa.Engine, table: sa.Table) -> list[tuple[Any, ...]]:
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(sa.select(table).order_by(table.c.id))]


def columns(bind: Any) -> set[str]:
    """The column names of ``records`` as the database has them now."""
    return {c["name"] for c in sa.inspect(bind).get_columns("records")}


def encrypted_view(table: sa.Table, envelope: Envelope, columns: list[str]) -> sa.Table:
    return sa.Table(
        table.name,
        sa.MetaData(),
        *(
            sa.Column(c.name, Encrypted(c.type, envelope) if c.name in columns else c.type)
            for c in table.columns
        ),
        schema=table.schema,
    )


def raw(engine: sa.Engine, column: str) -> list[bytes]:
    with engine.connect() as conn:
        rows = conn.execute(sa.text(f"SELECT {column} FROM records WHERE {column} IS NOT NULL"))
        return [bytes(v) for (v,) in rows]


def envelope_on(engine: sa.Engine, kms: LocalKms) -> Envelope:
    envelope = Envelope(sa.MetaData())
    envelope.metadata.create_all(engine)  # type: ignore[union-attr]
    envelope.configure(kms=kms, engine=engine)
    return envelope


def binary_files(engine: sa.Engine) -> sa.Table:
    """An empty table ``files (id, body)`` whose body is plaintext bytes."""
    files = sa.Table(
        "files",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("body", sa.LargeBinary),
    )
    files.create(engine)
    return files


def stop_after_a_batch(envelope: Envelope, engine: sa.Engine, **options: Any) -> None:
    """An encrypt_column of records.s interrupted after its first batch (shadow left filling)."""

    def stop(done: int, total: int | None) -> None:
        raise Interrupted

    with pytest.raises(Interrupted):
        encrypt_column(
            envelope, engine, "records", "s", Encrypted(sa.String(40)), batch_size=50,
            progress=stop, **options,
        )  # fmt: skip


@pytest.fixture
def setup(
    any_db_url: str, make_engine: Callable[..., sa.Engine], local_kms: LocalKms
) -> tuple[Envelope, sa.Engine, sa.Table, list[tuple[Any, ...]]]:
    engine = make_engine(any_db_url)
    envelope = envelope_on(engine, local_kms)
    table, before = make_table(engine)
    return envelope, engine, table, before


def test_encrypt_then_decrypt_every_type_exactly(
    setup: tuple[Envelope, sa.Engine, sa.Table, list[tuple[Any, ...]]],
) -> None:
    envelope, engine, table, before = setup
    columns = [*plaintext_types(engine.dialect.name), "code"]
    index = table.c.keys().index
    for name in columns:
        type_ = Encrypted(table.c[name].type, deterministic=name == "code")
        report = encrypt_column(envelope, engine, "records", name, type_, batch_size=64)
        # (JSON's None is stored as JSON null, not SQL NULL, so it counts as a row here.)
        assert report.swapped and report.rows >= sum(
            1 for r in before if r[index(name)] is not None
        )
        assert encrypt_column(envelope, engine, "records", name, type_).already_done

    view = encrypted_view(table, envelope, columns)
    assert read(engine, view) == before
    for name in columns:
        stored = raw(engine, name)
        assert stored and all(wire.parse_header(v) is not None for v in stored)
    assert not any(b"secret" in v for v in raw(engine, "s"))
    assert verify(envelope, "records").ok
    schema = {c["name"]: c for c in sa.inspect(engine).get_columns("records")}
    assert not schema["code"]["nullable"] and schema["s"]["nullable"]
    with engine.connect() as conn:  # the unique constraint came along (deterministic column)
        code = conn.execute(sa.text("SELECT code FROM records WHERE id = 1")).scalar_one()
        with pytest.raises(sa.exc.IntegrityError):
            conn.execute(sa.text("UPDATE records SET code = :c WHERE id = 2"), {"c": code})

    for name in columns:
        report = decrypt_column(
            envelope, engine, "records", name, table.c[name].type, batch_size=64
        )
        assert report.swapped
        assert decrypt_column(envelope, engine, "records", name, table.c[name].type).already_done
    assert read(engine, table) == before
    with engine.connect() as conn, pytest.raises(sa.exc.IntegrityError):
        conn.execute(sa.text("UPDATE records SET code = 'code-00001' WHERE id = 2"))


def test_encrypt_column_resumes_after_an_interruption(
    setup: tuple[Envelope, sa.Engine, sa.Table, list[tuple[Any, ...]]],
) -> None:
    envelope, engine, table, before = setup

    reported: list[int] = []

    def stop(done: int, total: int | None) -> None:
        reported.append(done)
        if done >= 100:
            raise Interrupted

    with pytest.raises(Interrupted):
        encrypt_column(
            envelope, engine, "records", "s", Encrypted(sa.String(40)), batch_size=50, progress=stop
        )
    with engine.connect() as conn:
        half = conn.execute(sa.text("SELECT COUNT(s__envelope) FROM records")).scalar_one()
    # Every batch reported committed (on PostgreSQL, the other lane may have committed one more).
    assert half >= reported[-1] >= 100
    with engine.connect() as conn:
        assert trigger.exists(conn, "records", None, "s__envelope")
    report = encrypt_column(
        envelope, engine, "records", "s", Encrypted(sa.String(40)), batch_size=50
    )
    assert report.rows == len([r for r in before if r[2] is not None]) - half and report.swapped
    assert read(engine, encrypted_view(table, envelope, ["s"])) == before

    # Interrupted the other way: the plaintext shadow is dropped when encrypting again.
    with pytest.raises(Interrupted):
        decrypt_column(
            envelope, engine, "records", "s", sa.String(40), batch_size=50, progress=stop
        )
    assert "s__envelope_plain" in columns(engine)
    assert encrypt_column(envelope, engine, "records", "s", Encrypted(sa.String(40))).already_done
    assert "s__envelope_plain" not in columns(engine)
    view = encrypted_view(table, envelope, ["s"])
    assert read(engine, view) == before
    with engine.begin() as conn:  # its trigger went with it: updates of the column still work
        assert not trigger.exists(conn, "records", None, "s__envelope_plain")
        conn.execute(view.update().where(view.c.id == 1).values(s="updated"))
    assert read(engine, view)[0][2] == "updated"


def test_an_update_between_a_batchs_read_and_write_is_kept(
    setup: tuple[Envelope, sa.Engine, sa.Table, list[tuple[Any, ...]]],
    any_db_url: str,
    make_engine: Callable[..., sa.Engine],
) -> None:
    # The application updates row 1 after the first batch read it and before the batch
    # writes: it waits for the batch's lock (rows; SQLite: the database), then lands.
    envelope, engine, table, before = setup
    job_engine = make_engine(any_db_url)
    first = threading.Lock()
    app = threading.Thread(target=lambda: _update_row_one(engine, table))

    @event.listens_for(job_engine, "before_cursor_execute")
    def between(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        writes_shadow = (
            statement.lstrip().upper().startswith("UPDATE") and "__ENVELOPE" in statement.upper()
        )
        if writes_shadow and first.acquire(blocking=False):
            app.start()
            app.join(0.5)  # still waiting: the batch holds the lock

    def pause(done: int, total: int | None) -> None:
        # SQLite's busy handler retries with growing sleeps: give it a gap between
        # batches, or it gets the lock only after the swap (see docs: switch code there).
        time.sleep(0.2)

    encrypt_column(
        envelope, job_engine, "records", "s", Encrypted(sa.String(40)), batch_size=50,
        progress=pause,
    )  # fmt: skip
    app.join(10)
    assert app.ident is not None and not app.is_alive()
    got = read(engine, encrypted_view(table, envelope, ["s"]))
    assert got == [(*before[0][:2], "updated meanwhile", *before[0][3:]), *before[1:]]


def _update_row_one(engine: sa.Engine, table: sa.Table) -> None:
    with engine.begin() as conn:
        conn.execute(table.update().where(table.c.id == 1).values(s="updated meanwhile"))


def test_a_shadow_without_its_trigger_is_filled_again(
    setup: tuple[Envelope, sa.Engine, sa.Table, list[tuple[Any, ...]]],
) -> None:
    # Left by an earlier release, or by a MySQL swap stopped between DROP TRIGGER and
    # ALTER TABLE: updates made meanwhile reached no shadow, so none of it can be trusted.
    envelope, engine, table, before = setup

    stop_after_a_batch(envelope, engine)
    with engine.begin() as conn:
        trigger.remove(conn, "records", None, "s__envelope")
    with engine.begin() as conn:  # a converted row, updated while nothing watched
        conn.execute(table.update().where(table.c.id == 1).values(s="changed unseen"))
    report = encrypt_column(
        envelope, engine, "records", "s", Encrypted(sa.String(40)), batch_size=50
    )
    assert report.rows == len([r for r in before if r[2] is not None])  # all of it again
    assert read(engine, encrypted_view(table, envelope, ["s"])) == [
        (*before[0][:2], "changed unseen", *before[0][3:]),
        *before[1:],
    ]


def test_rows_inserted_during_the_fill_are_converted(
    setup: tuple[Envelope, sa.Engine, sa.Table, list[tuple[Any, ...]]],
) -> None:
    envelope, engine, table, _ = setup
    late = [{"id": ROWS + i, "code": f"late {i}", "s": "written during the job"} for i in (1, 2)]
    late += [{"id": ROWS + i, "code": f"late {i}", "s": "more"} for i in range(3, 40)]

    reported: list[tuple[int, int | None]] = []

    def insert_once(done: int, total: int | None) -> None:
        if not reported:  # after the first batch
            with engine.begin() as conn:
                conn.execute(
                    sa.text("INSERT INTO records (id, code, s) VALUES (:id, :code, :s)"), late
                )
        reported.append((done, total))

    encrypt_column(
        envelope,
        engine,
        "records",
        "s",
        Encrypted(sa.String(40)),
        batch_size=50,
        progress=insert_once,
    )
    view = encrypted_view(table, envelope, ["s"])
    with engine.connect() as conn:
        assert (
            conn.execute(sa.select(view.c.s).where(view.c.id == ROWS + 1)).scalar_one()
            == late[0]["s"]
        )
    # The rows inserted meanwhile count in the total too: progress never passes it.
    assert all(total is not None and done <= total for done, total in reported), reported


def test_updates_during_the_fill_are_kept(
    setup: tuple[Envelope, sa.Engine, sa.Table, list[tuple[Any, ...]]],
) -> None:
    # Rows 1 and 2 are converted in the first batch, then the application updates them;
    # row 150 is updated before the fill gets there. Both ways, no update may be lost.
    envelope, engine, table, before = setup
    view = encrypted_view(table, envelope, ["s"])

    def updating_once(target: sa.Table, changes: dict[int, str | None]) -> Progress:
        def update(done: int, total: int | None) -> None:
            if changes:
                with engine.begin() as conn:
                    for id_, new in changes.items():
                        conn.execute(target.update().where(target.c.id == id_).values(s=new))
                changes.clear()

        return update

    def expected(
        changes: dict[int, str | None], rows: list[tuple[Any, ...]]
    ) -> list[tuple[Any, ...]]:
        return [(*r[:2], changes[r[0]], *r[3:]) if r[0] in changes else r for r in rows]

    # Row 4 changes case only: equal under a case-insensitive collation (MySQL's default).
    first = {1: "changed 1", 2: None, 4: "SECRET 4 É", 150: "changed 150"}
    after_first = expected(first, before)
    encrypt_column(
        envelope, engine, "records", "s", Encrypted(sa.String(40)), batch_size=50,
        progress=updating_once(table, dict(first)),
    )  # fmt: skip
    assert read(engine, view) == after_first

    second = {3: "changed 3", 1: None, 160: "changed 160"}  # written encrypted, as new code does
    decrypt_column(
        envelope, engine, "records", "s", sa.String(40), batch_size=50,
        progress=updating_once(view, dict(second)),
    )  # fmt: skip
    assert read(engine, table) == expected(second, after_first)
    with engine.connect() as conn:  # the triggers went with the shadows
        for suffix in ("__envelope", "__envelope_plain"):
            assert not trigger.exists(conn, "records", None, "s" + suffix)


def test_an_unfinished_conversion_can_be_abandoned(
    setup: tuple[Envelope, sa.Engine, sa.Table, list[tuple[Any, ...]]],
) -> None:
    envelope, engine, table, before = setup

    stop_after_a_batch(envelope, engine)
    assert abandon_conversion(engine, "records", "s") == ["s__envelope"]
    assert abandon_conversion(engine, "records", "s") == []
    assert columns(engine) == {c.name for c in table.c}
    with engine.begin() as conn:  # no trigger left behind: updates of the column work
        assert not trigger.exists(conn, "records", None, "s__envelope")
        conn.execute(table.update().where(table.c.id == 1).values(s="updated"))
    assert read(engine, table) == [(*before[0][:2], "updated", *before[0][3:]), *before[1:]]


def test_a_table_in_another_schema(
    pg_url: str, make_engine: Callable[..., sa.Engine], local_kms: LocalKms
) -> None:
    engine = make_engine(pg_url)
    with engine.begin() as conn:
        conn.exec_driver_sql("DROP SCHEMA IF EXISTS envelope_other CASCADE")
        conn.exec_driver_sql("CREATE SCHEMA envelope_other")
    envelope = envelope_on(engine, local_kms)
    table = sa.Table(
        "records", sa.MetaData(), sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("s", sa.String(40)), schema="envelope_other",
    )  # fmt: skip
    table.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(table.insert(), [{"id": i, "s": f"v{i}"} for i in range(1, 101)])

    functions = sa.text(
        "SELECT count(*) FROM pg_proc JOIN pg_namespace n ON n.oid = pronamespace "
        "WHERE nspname = 'envelope_other' AND proname LIKE 'envelope_stale_%'"
    )
    during: list[int] = []

    def update(done: int, total: int | None) -> None:
        with engine.begin() as conn:
            conn.execute(table.update().where(table.c.id == 1).values(s="changed"))
            during.append(conn.execute(functions).scalar_one())

    encrypt_column(
        envelope, engine, "records", "s", Encrypted(sa.String(40)), batch_size=20,
        schema="envelope_other", progress=update,
    )  # fmt: skip
    view = encrypted_view(table, envelope, ["s"])
    assert read(engine, view) == [(1, "changed")] + [(i, f"v{i}") for i in range(2, 101)]
    assert during and set(during) == {1}  # the trigger's function lives beside the table
    with engine.connect() as conn:
        assert not trigger.exists(conn, "records", "envelope_other", "s__envelope")
        assert conn.execute(functions).scalar_one() == 0
    old_key = wire.key_id_of(raw_values(engine, table, "s")[0])
    envelope.rotate("records")
    moved = reencrypt_column(envelope, engine, "records", "s", schema="envelope_other")
    assert moved.rows == 100 and old_key not in {
        wire.key_id_of(v) for v in raw_values(engine, table, "s")
    }
    assert read(engine, view) == [(1, "changed")] + [(i, f"v{i}") for i in range(2, 101)]
    with engine.begin() as conn:
        conn.exec_driver_sql("DROP SCHEMA envelope_other CASCADE")


def raw_values(engine: sa.Engine, table: sa.Table, column: str) -> list[bytes]:
    with engine.connect() as conn:
        raw = sa.select(sa.column(column, sa.LargeBinary)).select_from(table)
        return list(conn.execute(raw).scalars())


def test_a_worker_that_finds_the_job_swapped_meanwhile_leaves_no_trigger(
    setup: tuple[Envelope, sa.Engine, sa.Table, list[tuple[Any, ...]]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Worker B reads "filling"; before it checks the shadow's trigger, worker A finishes
    # the job (its swap drops the trigger). B must not put a trigger back on the table.
    envelope, engine, table, before = setup
    if engine.dialect.name == "mysql":
        pytest.skip("MySQL workers prepare one at a time (GET_LOCK): this order cannot occur")
    type_ = Encrypted(sa.String(40))

    stop_after_a_batch(envelope, engine)
    exists = trigger.exists

    def other_worker_first(*args: Any) -> bool:
        monkeypatch.setattr(trigger, "exists", exists)
        assert encrypt_column(envelope, engine, "records", "s", type_).swapped  # worker A
        return exists(*args)

    monkeypatch.setattr(trigger, "exists", other_worker_first)
    assert encrypt_column(envelope, engine, "records", "s", type_).already_done  # worker B
    with engine.begin() as conn:
        assert not trigger.exists(conn, "records", None, "s__envelope")
        conn.execute(table.update().where(table.c.id == 1).values(code="still writable"))
    assert read(engine, encrypted_view(table, envelope, ["s"]))[1:] == before[1:]


@pytest.mark.parametrize("distributed", [False, True], ids=["single", "distributed"])
def test_a_run_that_finds_the_column_swapped_before_it_counts_is_done(
    setup: tuple[Envelope, sa.Engine, sa.Table, list[tuple[Any, ...]]],
    monkeypatch: pytest.MonkeyPatch,
    distributed: bool,
) -> None:
    """Run B found the conversion half-done; run A finishes it, swap included, before B
    counts the rows left: B's count names a column that is gone. B is done, not failed."""
    envelope, engine, table, before = setup
    type_ = Encrypted(sa.String(40))
    # The interrupted run's claim lapses at once: run A need not wait to take it over.
    options: dict[str, Any] = {"distributed": True, "lease": 0.2} if distributed else {}
    stop_after_a_batch(envelope, engine, **options)
    count = conversion.count

    def other_run_first(*args: Any) -> int:
        monkeypatch.setattr(conversion, "count", count)
        assert encrypt_column(envelope, engine, "records", "s", type_, **options).swapped
        return count(*args)

    monkeypatch.setattr(conversion, "count", other_run_first)
    run_b = encrypt_column(envelope, engine, "records", "s", type_, **options)
    assert run_b.already_done and not run_b.swapped
    assert read(engine, encrypted_view(table, envelope, ["s"])) == before


def test_a_plan_does_not_outlive_the_shadow_it_was_made_for(
    setup: tuple[Envelope, sa.Engine, sa.Table, list[tuple[Any, ...]]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Abandoned after a distributed run filled half its ranges, then a retry stopped right
    after adding its new shadow: the next run must fill that shadow whole, not skip the
    ranges the old plan marked done (their rows would be left to the swap's table lock)."""
    envelope, engine, table, before = setup
    options: dict[str, Any] = {"distributed": True, "chunk_rows": 40, "lease": 0.2}
    type_ = Encrypted(sa.String(40))

    def stop(done: int, total: int | None) -> None:
        if done >= 120:
            raise Interrupted

    with pytest.raises(Interrupted):
        encrypt_column(
            envelope, engine, "records", "s", type_, batch_size=20, progress=stop, **options
        )
    assert abandon_conversion(engine, "records", "s") == ["s__envelope"]

    def crash(*args: Any) -> int:
        raise Interrupted

    monkeypatch.setattr(conversion, "count", crash)  # the first step after ADD COLUMN
    with pytest.raises(Interrupted):
        encrypt_column(envelope, engine, "records", "s", type_, **options)
    monkeypatch.undo()
    assert "s__envelope" in columns(engine)

    report = encrypt_column(envelope, engine, "records", "s", type_, batch_size=20, **options)
    assert report.swapped
    assert report.rows == len([r for r in before if r[2] is not None])  # all by the fill
    assert read(engine, encrypted_view(table, envelope, ["s"])) == before


def deadlock(dialect: str) -> sa.exc.OperationalError:
    """The error a deadlock's victim gets, as the driver raises it."""
    if dialect == "postgresql":
        import psycopg

        orig: Exception = psycopg.errors.DeadlockDetected("deadlock detected")
    else:
        import pymysql

        orig = pymysql.err.OperationalError(1213, "Deadlock found when trying to get lock")
    return sa.exc.OperationalError("UPDATE records ...", {}, orig)


@pytest.mark.parametrize("distributed", [False, True], ids=["single", "distributed"])
@pytest.mark.parametrize("url_fixture", ["pg_url", "mysql_url"])
def test_a_deadlocked_run_resumes_by_itself(
    url_fixture: str,
    distributed: bool,
    request: pytest.FixtureRequest,
    make_engine: Callable[..., sa.Engine],
    local_kms: LocalKms,
) -> None:
    engine = make_engine(request.getfixturevalue(url_fixture))
    envelope = envelope_on(engine, local_kms)
    table, before = make_table(engine)
    raised: list[int] = []

    def deadlocked_once(done: int, total: int | None) -> None:
        if not raised:
            raised.append(done)
            raise deadlock(engine.dialect.name)

    started = time.monotonic()
    report = encrypt_column(
        envelope, engine, "records", "s", Encrypted(sa.String(40)), batch_size=50,
        progress=deadlocked_once, distributed=distributed, lease=60,
    )  # fmt: skip
    assert raised and report.swapped
    assert time.monotonic() - started < 30  # its own range taken back, not waited for
    assert read(engine, encrypted_view(table, envelope, ["s"])) == before


def test_a_distributed_swap_finding_the_column_swapped_is_done(
    setup: tuple[Envelope, sa.Engine, sa.Table, list[tuple[Any, ...]]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A run without distributed=True swaps the column just before a distributed worker's
    swap takes its lock: that worker finds the shadow gone, trigger and all. It is done."""
    envelope, engine, table, before = setup
    type_ = Encrypted(sa.String(40))
    stop_after_a_batch(envelope, engine)
    swap = conversion.swap

    def other_run_first(*args: Any) -> None:
        monkeypatch.setattr(conversion, "swap", swap)
        assert encrypt_column(envelope, engine, "records", "s", type_).swapped
        swap(*args)

    monkeypatch.setattr(conversion, "swap", other_run_first)
    report = encrypt_column(envelope, engine, "records", "s", type_, distributed=True)
    assert report.already_done and not report.swapped
    assert read(engine, encrypted_view(table, envelope, ["s"])) == before


def test_a_failing_trigger_takes_its_shadow_back_at_once(
    setup: tuple[Envelope, sa.Engine, sa.Table, list[tuple[Any, ...]]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # MySQL commits ADD COLUMN by itself: a failed CREATE TRIGGER must not leave the
    # shadow behind, nor send the job around again (it once re-added it 300 times).
    envelope, engine, table, before = setup
    attempts: list[str] = []

    def refuse(conn: sa.Connection, *args: Any) -> None:
        attempts.append("install")
        raise sa.exc.OperationalError("CREATE TRIGGER", {}, Exception("lock wait timeout"))

    monkeypatch.setattr(trigger, "install", refuse)
    with pytest.raises(sa.exc.OperationalError):
        encrypt_column(envelope, engine, "records", "s", Encrypted(sa.String(40)))
    assert attempts == ["install"]
    assert "s__envelope" not in columns(engine)
    assert read(engine, table) == before


def test_resuming_takes_no_table_lock(
    pg_url: str, make_engine: Callable[..., sa.Engine], local_kms: LocalKms
) -> None:
    # An application transaction sits on an uncommitted update. A resumed job must not
    # queue for a table lock behind it, or every other writer would queue behind the job.
    engine = make_engine(pg_url)
    envelope = envelope_on(engine, local_kms)
    table, _ = make_table(engine)
    stop_after_a_batch(envelope, engine)
    idle = engine.connect()
    idle.begin()
    idle.execute(table.update().where(table.c.id == 1).values(s="idle update"))

    def slow(done: int, total: int | None) -> None:
        time.sleep(0.2)  # still filling when the other writer comes (the swap must wait)

    job = threading.Thread(
        target=encrypt_column,
        args=(envelope, engine, "records", "s", Encrypted(sa.String(40))),
        kwargs={"batch_size": 20, "progress": slow},
    )
    job.start()
    try:
        time.sleep(0.5)
        with engine.begin() as conn:  # another writer, while the job runs
            conn.exec_driver_sql("SET LOCAL lock_timeout = '2s'")
            conn.execute(table.update().where(table.c.id == 200).values(code="other writer"))
    finally:
        idle.commit()  # now the swap may take its lock
        idle.close()
        job.join(30)
    got = read(engine, encrypted_view(table, envelope, ["s"]))
    assert got[0][2] == "idle update" and got[199][1] == "other writer"


def test_the_trigger_is_found_however_the_schema_is_spelled(
    pg_url: str, make_engine: Callable[..., sa.Engine], local_kms: LocalKms
) -> None:
    engine = make_engine(pg_url)
    envelope = envelope_on(engine, local_kms)
    table, before = make_table(engine)
    with engine.connect() as conn:
        schema = conn.execute(sa.text("SELECT current_schema()")).scalar_one()

    stop_after_a_batch(envelope, engine)  # started without a schema...
    encrypt_column(  # ...finished with the default schema's name
        envelope, engine, "records", "s", Encrypted(sa.String(40)), schema=schema
    )
    with engine.begin() as conn:
        assert not trigger.exists(conn, "records", None, "s__envelope")
        conn.execute(table.update().where(table.c.id == 1).values(code="still writable"))
    assert read(engine, encrypted_view(table, envelope, ["s"]))[1:] == before[1:]


def test_without_the_trigger_privilege_mysql_stops_before_converting(
    mysql_url: str, make_engine: Callable[..., sa.Engine], local_kms: LocalKms
) -> None:
    admin = make_engine(mysql_url)
    database = sa.make_url(mysql_url).database
    envelope = envelope_on(admin, local_kms)
    table, before = make_table(admin)
    user = f"envelope_{os.urandom(4).hex()}"
    with admin.begin() as conn:
        for host in ("%", "localhost", "127.0.0.1"):
            conn.execute(sa.text(f"CREATE USER '{user}'@'{host}' IDENTIFIED BY 'pw'"))
            conn.execute(
                sa.text(
                    "GRANT SELECT, INSERT, UPDATE, DELETE, CREATE, DROP, ALTER, INDEX, "
                    f"LOCK TABLES ON `{database}`.* TO '{user}'@'{host}'"
                )
            )
    try:
        url = sa.make_url(mysql_url).set(username=user, password="pw")
        limited = make_engine(url.render_as_string(hide_password=False))
        with pytest.raises(ConfigurationError, match="grant it TRIGGER"):
            encrypt_column(envelope, limited, "records", "s", Encrypted(sa.String(40)))
    finally:
        with admin.begin() as conn:
            for host in ("%", "localhost", "127.0.0.1"):
                conn.execute(sa.text(f"DROP USER '{user}'@'{host}'"))
    assert "s__envelope" not in columns(admin)  # the shadow it had added is gone again
    assert read(admin, table) == before


def test_sqlite_rows_with_a_null_key_are_refused_before_any_change(
    sqlite_url: str, make_engine: Callable[..., sa.Engine], local_kms: LocalKms
) -> None:
    # SQLite accepts NULL in a primary key that is not INTEGER: such a row cannot be
    # written by key, so its value would not survive the swap.
    engine = make_engine(sqlite_url)
    envelope = envelope_on(engine, local_kms)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE coded (code TEXT PRIMARY KEY, s TEXT)")
        conn.exec_driver_sql("INSERT INTO coded VALUES ('a', 'x'), (NULL, 'old-null')")
    with pytest.raises(ConfigurationError, match="NULL in its primary key"):
        encrypt_column(envelope, engine, "coded", "s", Encrypted(sa.String(40)))
    assert [c["name"] for c in sa.inspect(engine).get_columns("coded")] == ["code", "s"]

    with engine.begin() as conn:  # and one inserted by the application during the fill
        conn.exec_driver_sql("DELETE FROM coded WHERE code IS NULL")
        conn.execute(
            sa.text("INSERT INTO coded VALUES (:c, 'v')"), [{"c": f"k{i}"} for i in range(60)]
        )

    def insert_late(done: int, total: int | None) -> None:
        if done > 50:
            return
        with engine.begin() as conn:
            conn.exec_driver_sql("INSERT INTO coded (code, s) VALUES (NULL, 'late')")

    with pytest.raises(ConfigurationError, match="nothing was swapped"):
        encrypt_column(
            envelope, engine, "coded", "s", Encrypted(sa.String(40)), batch_size=50,
            progress=insert_late,
        )  # fmt: skip
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT s FROM coded WHERE code IS NULL").scalar_one() == "late"


def test_misuse(setup: tuple[Envelope, sa.Engine, sa.Table, list[tuple[Any, ...]]]) -> None:
    envelope, engine, _, _ = setup
    with pytest.raises(TypeError, match="Encrypted"):
        encrypt_column(envelope, engine, "records", "s", sa.String(40))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="plaintext type"):
        decrypt_column(envelope, engine, "records", "s", Encrypted(sa.String(40)))

    with pytest.raises(ConfigurationError, match="no column"):
        encrypt_column(envelope, engine, "records", "nope", Encrypted(sa.String(40)))
    loose = sa.Table("loose", sa.MetaData(), sa.Column("s", sa.String(40)))
    loose.create(engine)
    with pytest.raises(ConfigurationError, match="no primary key"):
        encrypt_column(envelope, engine, "loose", "s", Encrypted(sa.String(40)))
    assert [c["name"] for c in sa.inspect(engine).get_columns("loose")] == ["s"]  # nothing added
    with engine.connect() as conn:
        assert not trigger.exists(conn, "loose", None, "s__envelope")
    with pytest.raises(ConfigurationError, match="primary key"):
        encrypt_column(envelope, engine, "records", "id", Encrypted(sa.Integer()))
    assert "id__envelope" not in columns(engine)


# -- killed with SIGKILL at random moments, then finished -----------------------------------
CHILD = textwrap.dedent(
    """
    import base64, logging, os, sys, time
    import sqlalchemy as sa
    from sqlalchemy_envelope import Encrypted, Envelope, LocalKms
    from sqlalchemy_envelope.jobs import encrypt_column

    logging.basicConfig(level=logging.INFO, stream=sys.stdout)
    url, key = sys.argv[1], base64.b64decode(sys.argv[2])
    envelope = Envelope()
    engine = sa.create_engine(url)
    envelope.configure(kms=LocalKms(key), engine=engine)
    def slow(done, total):
        print("progress", done, flush=True)
        time.sleep(0.01)
    for column in ("s", "j", "n"):
        inner = {"s": sa.String(40), "j": sa.JSON(), "n": sa.Numeric(12, 4)}[column]
        type_ = Encrypted(inner)
        encrypt_column(envelope, engine, "records", column, type_, batch_size=20, progress=slow)
    print("finished", flush=True)
    """
)


@pytest.mark.postgres
def test_sigkill_at_random_points_then_rerun(
    pg_url: str, make_engine: Callable[..., sa.Engine], tmp_path: Path
) -> None:
    import base64

    engine = make_engine(pg_url)
    key = os.urandom(32)
    envelope = envelope_on(engine, LocalKms(key))
    table, before = make_table(engine)
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    rng = random.Random(1234)
    kills = 0
    for _ in range(6):
        child = subprocess.Popen(
            [sys.executable, str(script), pg_url, base64.b64encode(key).decode()],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        assert child.stdout is not None
        lines = rng.randint(1, 25)  # kill after this many lines of progress or log
        finished = False
        for _ in range(lines):
            line = child.stdout.readline()
            if not line or line.startswith("finished"):
                finished = True
                break
        time.sleep(rng.random() * 0.05)
        if not finished:
            os.kill(child.pid, signal.SIGKILL)
            kills += 1
        child.wait()
        child.stdout.close()
    assert kills >= 3
    subprocess.run(
        [sys.executable, str(script), pg_url, base64.b64encode(key).decode()],
        check=True,
        capture_output=True,
    )
    assert read(engine, encrypted_view(table, envelope, ["s", "j", "n"])) == before
    assert verify(envelope, "records", columns=["s", "j", "n"]).ok
    assert columns(engine) == {c.name for c in table.columns}


def test_a_failing_batch_names_no_value(
    setup: tuple[Envelope, sa.Engine, sa.Table, list[tuple[Any, ...]]],
) -> None:
    envelope, engine, table, before = setup
    encrypt_column(envelope, engine, "records", "s", Encrypted(sa.String(40)))
    if engine.dialect.name == "sqlite":
        pytest.skip("SQLite does not enforce VARCHAR lengths")
    with pytest.raises(ConfigurationError, match="refused a converted value") as failure:
        decrypt_column(envelope, engine, "records", "s", sa.String(5))  # too narrow
    assert "abandon_conversion(engine, 'records', 's')" in str(failure.value)
    assert "secret" not in str(failure.value)
    assert failure.value.__cause__ is None and failure.value.__context__ is None
    # The corrected run cannot fill the narrow shadow column left behind: it says so.
    with pytest.raises(ConfigurationError, match=r"s__envelope_plain is VARCHAR\(length=5\)"):
        decrypt_column(envelope, engine, "records", "s", sa.String(40))
    # The encrypted column is untouched; abandoning the shadow and rerunning recovers.
    assert read(engine, encrypted_view(table, envelope, ["s"])) == before
    assert abandon_conversion(engine, "records", "s") == ["s__envelope_plain"]
    decrypt_column(envelope, engine, "records", "s", sa.String(40))
    assert read(engine, table) == before


def test_a_value_of_another_type_says_how_to_start_over(
    setup: tuple[Envelope, sa.Engine, sa.Table, list[tuple[Any, ...]]],
) -> None:
    """Numeric values declared Encrypted(Integer): the error names the way back."""
    envelope, engine, table, before = setup
    with pytest.raises(ValueTypeError, match=r"expected int.*abandon_conversion") as failure:
        encrypt_column(envelope, engine, "records", "n", Encrypted(sa.Integer()))
    assert "Decimal(" not in str(failure.value)  # a type name, never a value
    assert failure.value.__context__ is None
    assert abandon_conversion(engine, "records", "n") == ["n__envelope"]
    assert read(engine, table) == before


def test_batch_jobs_refuse_an_async_engine(tmp_path: Path, local_kms: LocalKms) -> None:
    from sqlalchemy.ext.asyncio import create_async_engine

    from sqlalchemy_envelope.jobs import reencrypt

    envelope = Envelope()
    envelope.configure(
        kms=local_kms, engine=create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'a.db'}")
    )
    with pytest.raises(ConfigurationError, match="synchronous"):
        reencrypt(envelope, "records")


def test_string_keys_in_a_collation_python_does_not_share(
    pg_url: str, make_engine: Callable[..., sa.Engine], local_kms: LocalKms
) -> None:
    """Keys sorted by an ICU collation ('a' < 'B' < 'c'), not by code point: none is skipped."""
    engine = make_engine(pg_url)
    envelope = envelope_on(engine, local_kms)
    metadata = sa.MetaData()
    people = sa.Table(
        "people",
        metadata,
        sa.Column("key", sa.String(20, collation="en-US-x-icu"), primary_key=True),
        sa.Column("name", sa.String(40)),
    )
    metadata.create_all(engine)
    keys = [f"{c}{i:03d}" for i in range(60) for c in "aBcD"]
    with engine.begin() as conn:
        conn.execute(people.insert(), [{"key": k, "name": f"name of {k}"} for k in keys])
    encrypt_column(envelope, engine, "people", "name", Encrypted(sa.String(40)), batch_size=50)
    view = encrypted_view(people, envelope, ["name"])
    with engine.connect() as conn:
        assert dict(conn.execute(sa.select(view.c.key, view.c.name)).all()) == {
            k: f"name of {k}" for k in keys
        }
    new = envelope.rotate("people")
    report = envelope.reencrypt(view, batch_size=50)
    assert (report.values_rewritten, report.values_changed) == (len(keys), 0)
    assert verify(envelope, view).columns["name"].by_key == {new: len(keys)}


def test_whether_a_binary_column_is_encrypted_is_decided_by_authentic_values(
    any_db_url: str, make_engine: Callable[..., sa.Engine], local_kms: LocalKms
) -> None:
    """Bytes that look like ours, or plaintext written around the library, decide nothing."""
    engine = make_engine(any_db_url)
    envelope = envelope_on(engine, local_kms)
    files = binary_files(engine)
    lookalike = wire.header(wire.RANDOMIZED, 1) + os.urandom(40)  # an upload, not ours
    bodies = {i: lookalike if i <= 20 else f"upload {i}".encode() for i in range(1, 61)}
    with engine.begin() as conn:
        conn.execute(files.insert(), [{"id": i, "body": b} for i, b in bodies.items()])

    target = Encrypted(sa.LargeBinary())
    first = encrypt_column(envelope, engine, "files", "body", target, batch_size=25)
    assert (first.rows, first.already_done) == (60, False)  # not taken for ciphertext
    view = encrypted_view(files, envelope, ["body"])
    with engine.connect() as conn:
        assert dict(conn.execute(sa.select(view.c.id, view.c.body)).all()) == bodies

    # Old code writes plaintext bytes after the swap, into the first rows.
    with engine.begin() as conn:
        conn.execute(files.update().where(files.c.id <= 20).values(body=b"written around"))
    # The way back may not report "done" while the column holds ciphertext.
    with pytest.raises(DecryptionError):
        decrypt_column(envelope, engine, "files", "body", sa.LargeBinary())
    abandon_conversion(engine, "files", "body")
    # Nor the way there while it holds plaintext: refused, or told to keep the ciphertext,
    # it encrypts what was written around and nothing twice.
    with pytest.raises(ConfigurationError, match="ciphertext beside values that are not"):
        encrypt_column(envelope, engine, "files", "body", target)
    again = encrypt_column(envelope, engine, "files", "body", target, keep_ciphertext=True)
    assert again.swapped
    bodies.update(dict.fromkeys(range(1, 21), b"written around"))
    with engine.connect() as conn:
        assert dict(conn.execute(sa.select(view.c.id, view.c.body)).all()) == bodies


def test_the_sqlite_rebuild_keeps_what_refers_to_the_table(
    sqlite_url: str,
    make_engine: Callable[..., sa.Engine],
    local_kms: LocalKms,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Children (foreign keys enforced), triggers, views, CHECKs, AUTOINCREMENT and
    other columns' COLLATE survive."""
    engine = make_engine(sqlite_url)

    @event.listens_for(engine, "connect")
    def enforce(dbapi_connection: Any, _: Any) -> None:
        dbapi_connection.execute("PRAGMA foreign_keys = ON")

    envelope = envelope_on(engine, local_kms)
    with engine.begin() as conn:
        for sql in (
            "CREATE TABLE accounts (id INTEGER PRIMARY KEY AUTOINCREMENT, "
            "balance INT CHECK (balance >= 0), "
            "ssn VARCHAR(11) NOT NULL UNIQUE CHECK (length(SSN) = 11), "
            "kind TEXT CHECK (kind IN ('ssn', 'none')), email TEXT COLLATE NOCASE UNIQUE)",
            "CREATE TABLE parents (id INTEGER PRIMARY KEY)",
            "CREATE TABLE orphans (id INTEGER PRIMARY KEY, parent_id INT REFERENCES parents (id))",
            "CREATE TABLE payments (id INTEGER PRIMARY KEY, "
            "account_id INT REFERENCES accounts (id) ON DELETE CASCADE)",
            "CREATE TABLE notes (id INTEGER PRIMARY KEY, "
            "account_id INT REFERENCES accounts (id) ON DELETE SET NULL)",
            "CREATE TABLE audit (account_id INT, balance INT)",
            "CREATE TRIGGER accounts_audit AFTER UPDATE OF balance ON accounts "
            "BEGIN INSERT INTO audit VALUES (new.id, new.balance); END",
            "CREATE VIEW rich AS SELECT id FROM accounts WHERE balance > 100",
        ):
            conn.exec_driver_sql(sql)
        for i in range(1, 6):
            conn.exec_driver_sql(
                f"INSERT INTO accounts VALUES ({i}, {i * 100}, '000-00-000{i}', 'none', "
                f"'User{i}@Example.org')"
            )
            conn.exec_driver_sql(f"INSERT INTO payments VALUES ({i}, {i})")
            conn.exec_driver_sql(f"INSERT INTO notes VALUES ({i}, {i})")
        conn.exec_driver_sql("DELETE FROM payments WHERE account_id = 5")
        conn.exec_driver_sql("DELETE FROM notes WHERE account_id = 5")
        conn.exec_driver_sql("DELETE FROM accounts WHERE id = 5")  # AUTOINCREMENT never reuses 5
    with engine.connect() as conn:  # an orphan from long ago, in tables of no concern
        conn.exec_driver_sql("PRAGMA foreign_keys = OFF")
        conn.exec_driver_sql("INSERT INTO orphans VALUES (1, 42)")
        conn.commit()
        conn.exec_driver_sql("PRAGMA foreign_keys = ON")
        conn.commit()

    ssn_type = Encrypted(sa.String(11), deterministic=True)
    report = encrypt_column(envelope, engine, "accounts", "ssn", ssn_type)
    assert report.swapped
    assert "CHECK constraint (length(SSN) = 11) describes the old values" in caplog.text

    with engine.begin() as conn:
        q = conn.exec_driver_sql
        assert q("SELECT count(*) FROM payments WHERE account_id IS NOT NULL").scalar() == 4
        assert q("SELECT count(*) FROM notes WHERE account_id IS NOT NULL").scalar() == 4
        assert q("SELECT id FROM rich ORDER BY id").scalars().all() == [2, 3, 4]
        q("UPDATE accounts SET balance = 7 WHERE id = 1")
        assert q("SELECT * FROM audit").all() == [(1, 7)]
        with pytest.raises(sa.exc.IntegrityError), conn.begin_nested():
            q("UPDATE accounts SET balance = -5 WHERE id = 1")
        with pytest.raises(sa.exc.IntegrityError), conn.begin_nested():  # not about ssn: kept
            q("UPDATE accounts SET kind = 'bogus' WHERE id = 1")
        with pytest.raises(sa.exc.IntegrityError), conn.begin_nested():
            q("INSERT INTO payments VALUES (9, 42)")  # foreign keys are enforced again
        assert q("SELECT id FROM accounts WHERE email = 'user2@example.ORG'").all() == [(2,)]
        with pytest.raises(sa.exc.IntegrityError), conn.begin_nested():  # still NOCASE UNIQUE
            q("INSERT INTO accounts (balance, ssn, email) VALUES (1, x'00', 'USER3@example.org')")
        q("INSERT INTO accounts (balance, ssn, kind) VALUES (1, x'00', 'none')")
        assert q("SELECT max(id) FROM accounts").scalar() == 6
        assert q("PRAGMA foreign_keys").scalar() == 1
    view = sa.Table(
        "accounts", sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("ssn", Encrypted(sa.String(11), envelope, deterministic=True)),
    )  # fmt: skip
    with engine.connect() as conn:
        got = conn.execute(sa.select(view.c.id, view.c.ssn).where(view.c.id < 5)).all()
    assert got == [(i, f"000-00-000{i}") for i in range(1, 5)]
    uniques = sa.inspect(engine).get_unique_constraints("accounts")  # as constraints, unnamed
    assert sorted(u["column_names"] for u in uniques) == [["email"], ["ssn"]]
    assert {u["name"] for u in uniques} == {None}
    assert sa.inspect(engine).get_indexes("accounts") == []
    with pytest.raises(sa.exc.IntegrityError), engine.begin() as conn:
        conn.execute(view.insert().values(id=9, ssn="000-00-0001"))


def test_collations_and_uniques_are_read_from_the_column_definitions_only() -> None:
    sql = """CREATE TABLE "t(x" (id integer primary key, "E""m" TEXT COLLATE NOCASE UNIQUE,
        [b c] varchar(20) NOT NULL collate "rtrim", -- c TEXT COLLATE nocase,
        d text CHECK (d COLLATE nocase IN ('a', 'b')) DEFAULT 'COLLATE x', /* COLLATE y */
        CONSTRAINT u UNIQUE (d COLLATE nocase), `f` DECIMAL(10, 2) COLLATE [BINARY]
    ) WITHOUT ROWID"""
    assert column_collations(column_definitions(sql)) == {
        'E"m': "NOCASE",
        "b c": "rtrim",
        "f": "BINARY",
    }
    assert column_collations(column_definitions("CREATE TABLE t(a, b)")) == {}
    sql = """CREATE TABLE t (a VARCHAR(5) NOT NULL UNIQUE, "b" INT CONSTRAINT "u b" UNIQUE,
        c TEXT DEFAULT 'UNIQUE' CHECK (c != 'UNIQUE'), d TEXT NOT NULL/* UNIQUE */,
        e TEXT NULL-- COLLATE NOCASE UNIQUE
        , f INT DEFAULT -1 CHECK (f > -2), UNIQUE (c))"""
    definitions = column_definitions(sql)
    assert inline_uniques(definitions) == {"a": None, "b": "u b"}
    assert column_collations(definitions) == {}
    assert definitions["f"] == ["INT", "DEFAULT", "-1", "CHECK"]


def test_postgres_swap_keeps_the_columns_comment_and_privileges(
    pg_url: str, make_engine: Callable[..., sa.Engine], local_kms: LocalKms
) -> None:
    """A column-level GRANT (a read-only role's access) and the comment survive the swap."""
    engine = make_engine(pg_url)
    envelope = envelope_on(engine, local_kms)
    role = f"reader_{os.urandom(6).hex()}"
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE people (id int PRIMARY KEY, ssn varchar(11))")
        conn.exec_driver_sql("INSERT INTO people VALUES (1, '123-45-6789')")
        conn.exec_driver_sql("COMMENT ON COLUMN people.ssn IS 'social security number'")
        conn.exec_driver_sql(f"CREATE ROLE {role}")
        conn.exec_driver_sql(f"GRANT SELECT (id, ssn), UPDATE (ssn) ON people TO {role}")
    try:
        encrypt_column(envelope, engine, "people", "ssn", Encrypted(sa.String(11)))
        with engine.connect() as conn:
            column = next(c for c in sa.inspect(conn).get_columns("people") if c["name"] == "ssn")
            assert column["comment"] == "social security number"
            privileges = conn.execute(
                sa.text(
                    "SELECT has_column_privilege(:r, 'people', 'ssn', 'SELECT'), "
                    "has_column_privilege(:r, 'people', 'ssn', 'UPDATE')"
                ),
                {"r": role},
            ).one()
        assert tuple(privileges) == (True, True)
    finally:
        with engine.begin() as conn:
            conn.exec_driver_sql("DROP TABLE people")
            conn.exec_driver_sql(f"DROP ROLE {role}")


def test_a_column_under_keys_the_keyring_lacks_is_refused(
    any_db_url: str, make_engine: Callable[..., sa.Engine], local_kms: LocalKms
) -> None:
    """Encrypted under another keyring (a configuration slip): neither done nor plaintext."""
    engine = make_engine(any_db_url)
    first = envelope_on(engine, local_kms)
    files = binary_files(engine)
    with engine.begin() as conn:
        conn.execute(files.insert(), [{"id": i, "body": b"secret %d" % i} for i in range(5)])
    encrypt_column(first, engine, "files", "body", Encrypted(sa.LargeBinary()))
    other = Envelope(sa.MetaData(), table_name="other_keys")
    other.metadata.create_all(engine)  # type: ignore[union-attr]
    other.configure(kms=local_kms, engine=engine)
    for job in (
        lambda: encrypt_column(other, engine, "files", "body", Encrypted(sa.LargeBinary())),
        lambda: decrypt_column(other, engine, "files", "body", sa.LargeBinary()),
    ):
        with pytest.raises(ConfigurationError, match="keys this keyring does not have"):
            job()
    view = encrypted_view(files, first, ["body"])
    with engine.connect() as conn:  # untouched
        assert conn.execute(sa.select(view.c.body).where(view.c.id == 3)).scalar() == b"secret 3"


def test_a_second_run_started_by_mistake_finds_the_job_done(
    setup: tuple[Envelope, sa.Engine, sa.Table, list[tuple[Any, ...]]],
) -> None:
    """Two runs without distributed=True: the one that finds the column swapped says so."""
    envelope, engine, table, before = setup
    target = Encrypted(sa.String(40))
    other: list[Any] = []

    def meanwhile(done: int, total: int | None) -> None:
        if not other:  # after this run's first batch, the other run does the whole job
            other.append(encrypt_column(envelope, engine, "records", "s", target))

    with engine.connect() as conn:
        report = encrypt_column(
            envelope, conn, "records", "s", target, batch_size=50, progress=meanwhile
        )
    assert other[0].swapped and report.already_done and not report.swapped
    assert read(engine, encrypted_view(table, envelope, ["s"])) == before


def test_decrypt_to_a_native_enum_declared_with_a_length(
    pg_url: str, make_engine: Callable[..., sa.Engine], local_kms: LocalKms
) -> None:
    """A native ENUM reads back without the length it was declared with: that is not
    a leftover shadow column of another type, and the conversion goes through."""
    engine = make_engine(pg_url)
    envelope = envelope_on(engine, local_kms)
    with engine.begin() as conn:
        conn.exec_driver_sql("DROP TABLE IF EXISTS levels")
        conn.exec_driver_sql("DROP TYPE IF EXISTS lvl")
        conn.exec_driver_sql("CREATE TYPE lvl AS ENUM ('a', 'bb')")
        conn.exec_driver_sql("CREATE TABLE levels (id int PRIMARY KEY, s varchar(10))")
        conn.exec_driver_sql("INSERT INTO levels VALUES (1, 'a'), (2, 'bb')")
    as_text = sa.Enum("a", "bb", name="lvl", native_enum=False)
    encrypt_column(envelope, engine, "levels", "s", Encrypted(as_text))
    native = sa.Enum("a", "bb", name="lvl", length=50)
    assert decrypt_column(envelope, engine, "levels", "s", native).swapped
    with engine.begin() as conn:
        assert conn.exec_driver_sql("SELECT s::text FROM levels ORDER BY id").scalars().all() == [
            "a",
            "bb",
        ]
        conn.exec_driver_sql("DROP TABLE levels")
        conn.exec_driver_sql("DROP TYPE lvl")


def test_decrypt_to_a_native_enum_creates_its_type(
    pg_url: str, make_engine: Callable[..., sa.Engine], local_kms: LocalKms
) -> None:
    """A table created with the column already Encrypted(Enum) has no ENUM type yet."""
    engine = make_engine(pg_url)
    envelope = envelope_on(engine, local_kms)
    metadata = sa.MetaData()
    colors = sa.Enum("red", "blue", name="colors_x")
    table = sa.Table(
        "paints",
        metadata,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("color", Encrypted(colors, envelope)),
    )
    metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(table.insert(), [{"id": 1, "color": "red"}, {"id": 2, "color": None}])
        assert not sa.inspect(conn).get_enums()
    assert decrypt_column(envelope, engine, "paints", "color", colors).swapped
    with engine.begin() as conn:
        assert [e["name"] for e in sa.inspect(conn).get_enums()] == ["colors_x"]
        got = conn.exec_driver_sql("SELECT color::text FROM paints ORDER BY id").all()
        assert [tuple(r) for r in got] == [("red",), (None,)]
        conn.exec_driver_sql("DROP TABLE paints")
        conn.exec_driver_sql("DROP TYPE colors_x")


def test_a_column_changes_scope_by_decrypting_and_encrypting_again(
    db_url: str, make_engine: Callable[..., sa.Engine], local_kms: LocalKms
) -> None:
    """A column reads only its scope's keys. The models already declare the new scope:
    decrypt_column reads under the scope they declare, unless given the old one."""
    engine = make_engine(db_url)

    def model(scope: str) -> tuple[Envelope, sa.Table]:
        envelope = Envelope(sa.MetaData())
        table = sa.Table(
            "cards", envelope.metadata,  # type: ignore[arg-type]
            sa.Column("id", sa.Integer, primary_key=True),
            sa.Column("pan", Encrypted(sa.String(19), envelope, scope=scope)),
        )  # fmt: skip
        envelope.configure(kms=local_kms, engine=engine)
        return envelope, table

    before, old = model("payments")
    old.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(old.insert(), [{"id": i, "pan": f"4111-{i:04d}"} for i in range(1, 31)])
    envelope, new = model("cards_pci")
    with pytest.raises(DecryptionError), engine.connect() as conn:
        conn.execute(sa.select(new.c.pan)).all()
    with pytest.raises(ConfigurationError, match="scope 'payments', not 'cards_pci'"):
        decrypt_column(envelope, engine, "cards", "pan", sa.String(19))  # declared: the new
    assert decrypt_column(envelope, engine, "cards", "pan", sa.String(19), scope="payments").swapped
    encrypted = Encrypted(sa.String(19), scope="cards_pci")
    assert encrypt_column(envelope, engine, "cards", "pan", encrypted).swapped
    with engine.connect() as conn:
        got = conn.execute(sa.select(new.c.id, new.c.pan).order_by(new.c.id)).all()
    assert [tuple(r) for r in got] == [(i, f"4111-{i:04d}") for i in range(1, 31)]
    assert {k.scope for k in envelope.keys() if k.state == "active"} >= {"cards_pci"}
    assert before.keys("payments")  # the old scope's keys stay, for destroy when unused


@pytest.mark.parametrize("moved", [30, 18], ids=["all moved", "most moved"])
def test_values_moved_in_cannot_choose_the_scope_decrypt_column_reads_under(
    db_url: str, make_engine: Callable[..., sa.Engine], local_kms: LocalKms, moved: int
) -> None:
    """Models that no longer declare a column leave its table's scope, not the stored
    values', to read it under: another tenant's ciphertext moved into it stays ciphertext."""
    engine = make_engine(db_url)
    envelope = Envelope(sa.MetaData())
    metadata: Any = envelope.metadata
    tables = {
        tenant: sa.Table(
            f"{tenant}_notes",
            metadata,
            sa.Column("id", sa.Integer, primary_key=True),
            sa.Column("body", Encrypted(sa.String(40), envelope)),
        )
        for tenant in ("a", "b")
    }
    envelope.configure(kms=local_kms, engine=engine)
    metadata.create_all(engine)
    with engine.begin() as conn:
        for tenant, table in tables.items():
            conn.execute(table.insert(), [{"id": i, "body": f"{tenant} {i}"} for i in range(30)])
        b = tables["b"]
        stolen = sa.select(b.c.body).where(b.c.id == tables["a"].c.id).scalar_subquery()
        conn.execute(tables["a"].update().where(tables["a"].c.id < moved).values(body=stolen))
    raw = sa.table("a_notes", sa.column("id"), sa.column("body", sa.LargeBinary))
    with engine.connect() as conn:
        before = conn.execute(sa.select(raw.c.body).order_by(raw.c.id)).scalars().all()

    undeclared = Envelope(sa.MetaData())
    undeclared.configure(kms=local_kms, engine=engine)
    with pytest.raises((ConfigurationError, DecryptionError)) as failed:
        decrypt_column(undeclared, engine, "a_notes", "body", sa.String(40))
    if moved == 30:
        assert "scope 'b_notes', not 'a_notes'" in str(failed.value)
        assert "scope='b_notes'" in str(failed.value)  # the way, for an honest column
    abandon_conversion(engine, "a_notes", "body")
    with engine.connect() as conn:
        assert conn.execute(sa.select(raw.c.body).order_by(raw.c.id)).scalars().all() == before


def test_encrypting_again_in_the_other_mode_is_refused_and_reencrypt_changes_it(
    db_url: str, make_engine: Callable[..., sa.Engine], local_kms: LocalKms
) -> None:
    """A migration asking for deterministic on a randomized column is not "already done":
    lookups would find nothing. reencrypt with the models declaring it changes the mode."""
    engine = make_engine(db_url)
    envelope = Envelope(sa.MetaData())
    metadata: Any = envelope.metadata
    ids = sa.Table(
        "ids",
        metadata,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("ssn", Encrypted(sa.String(11), envelope, deterministic=True)),
    )
    envelope.configure(kms=local_kms, engine=engine)
    envelope.table.create(engine)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE ids (id INTEGER PRIMARY KEY, ssn VARCHAR(11))")
        conn.execute(sa.table("ids", sa.column("id"), sa.column("ssn")).insert(), [
            {"id": i, "ssn": f"078-05-{i:04d}"} for i in range(20)
        ])  # fmt: skip
    assert encrypt_column(envelope, engine, "ids", "ssn", Encrypted(sa.String(11))).swapped
    deterministic = Encrypted(sa.String(11), deterministic=True)
    with pytest.raises(ConfigurationError, match="encrypted already, randomized, not determ"):
        encrypt_column(envelope, engine, "ids", "ssn", deterministic)

    assert envelope.reencrypt(ids).values_rewritten == 20
    assert encrypt_column(envelope, engine, "ids", "ssn", deterministic).already_done
    with engine.connect() as conn:
        assert conn.execute(sa.select(ids.c.id).where(ids.c.ssn == "078-05-0007")).scalar() == 7


def early_and_old(
    engine: sa.Engine, kms: LocalKms, name: str, column: str, type_: Any
) -> tuple[Envelope, sa.Table, sa.Table]:
    """The table as code declaring ``column`` Encrypted sees it (the keyring created), and
    as the old code does (the table created with the plaintext column)."""
    envelope = Envelope(sa.MetaData())
    new = sa.Table(
        name,
        envelope.metadata,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column(column, Encrypted(type_, envelope)),
    )
    envelope.configure(kms=kms, engine=engine)
    envelope.table.create(engine)
    old = sa.Table(
        name,
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column(column, type_),
    )
    old.create(engine)
    return envelope, new, old


@pytest.mark.parametrize("when", ["while filling", "after a decrypt"])
def test_ciphertext_found_in_the_plaintext_column_is_refused_or_kept_never_encrypted_again(
    db_url: str,
    make_engine: Callable[..., sa.Engine],
    local_kms: LocalKms,
    when: str,
) -> None:
    """Code declaring the column Encrypted, deployed too early, writes ciphertext into the
    plaintext column (PostgreSQL stores its text form, SQLite a blob), and so does someone
    copying another row's ciphertext from a dump through the old code. The job cannot
    tell them apart: it refuses, naming the rows, unless told to keep them as they are."""
    engine = make_engine(db_url)
    envelope, new, old = early_and_old(engine, local_kms, "accounts", "email", sa.String(200))
    with engine.begin() as conn:
        conn.execute(old.insert(), [{"id": i, "email": f"old-{i}@x.org"} for i in range(1, 41)])
    target = Encrypted(sa.String(200))
    if when == "while filling":

        def stop(done: int, total: int | None) -> None:
            raise Interrupted

        with pytest.raises(Interrupted):
            encrypt_column(
                envelope, engine, "accounts", "email", target, batch_size=10, progress=stop
            )
    else:  # encrypted, decrypted, then written by code still declaring Encrypted
        assert encrypt_column(envelope, engine, "accounts", "email", target).swapped
        assert decrypt_column(envelope, engine, "accounts", "email", sa.String(200)).swapped
    with engine.begin() as conn:  # the early code: updates (batches done and not) and inserts
        for i in (2, 35):
            conn.execute(new.update().where(new.c.id == i).values(email=f"new-{i}@x.org"))
        conn.execute(new.insert().values(id=41, email="new-41@x.org"))

    with pytest.raises(ConfigurationError, match=r"primary key (2, )?35, 41 hold this column's"):
        encrypt_column(envelope, engine, "accounts", "email", target)
    assert encrypt_column(
        envelope, engine, "accounts", "email", target, keep_ciphertext=True
    ).swapped
    expected = {i: f"old-{i}@x.org" for i in range(1, 41)}
    expected.update({2: "new-2@x.org", 35: "new-35@x.org", 41: "new-41@x.org"})
    with engine.connect() as conn:
        assert dict(conn.execute(sa.select(new.c.id, new.c.email)).all()) == expected  # type: ignore[arg-type]


def test_kept_ciphertext_of_the_other_mode_is_still_refused(
    db_url: str, make_engine: Callable[..., sa.Engine], local_kms: LocalKms
) -> None:
    """keep_ciphertext copies the column's own ciphertext as it is, but not a value written
    in the other mode: randomized ciphertext kept in a deterministic column would match no
    lookup (and deterministic ciphertext in a randomized one would show equal values)."""
    engine = make_engine(db_url)
    envelope = Envelope(sa.MetaData())
    metadata: Any = envelope.metadata
    early = sa.Table(  # the early code declares the column randomized
        "accounts",
        metadata,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("email", Encrypted(sa.String(200), envelope)),
    )
    envelope.configure(kms=local_kms, engine=engine)
    envelope.table.create(engine)
    old = sa.Table(
        "accounts",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("email", sa.String(200)),
    )
    old.create(engine)
    with engine.begin() as conn:
        conn.execute(old.insert(), [{"id": i, "email": f"old-{i}@x.org"} for i in range(1, 11)])
        conn.execute(early.insert().values(id=11, email="early-11@x.org"))
    target = Encrypted(sa.String(200), deterministic=True)
    with pytest.raises(ConfigurationError, match=r"primary key 11 hold this column's"):
        encrypt_column(envelope, engine, "accounts", "email", target, keep_ciphertext=True)
    with engine.connect() as conn:
        assert conn.execute(sa.select(old.c.email).where(old.c.id == 1)).scalar() == "old-1@x.org"


def test_decrypting_a_column_of_another_scope_beside_other_values_is_refused_not_done(
    db_url: str, make_engine: Callable[..., sa.Engine], local_kms: LocalKms
) -> None:
    """One value not ours (x'00') beside another scope's ciphertext: still refused, as a
    column of that scope's values alone is; "already done" would leave the ciphertext."""
    engine = make_engine(db_url)
    envelope = Envelope(sa.MetaData())
    metadata: Any = envelope.metadata
    notes = sa.Table(
        "notes",
        metadata,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("body", Encrypted(sa.String(40), envelope, scope="dates")),
    )
    envelope.configure(kms=local_kms, engine=engine)
    metadata.create_all(engine)
    raw = sa.table("notes", sa.column("id"), sa.column("body", sa.LargeBinary))
    with engine.begin() as conn:
        conn.execute(notes.insert(), [{"id": i, "body": f"note {i}"} for i in range(10)])
        conn.execute(raw.update().where(raw.c.id == 0).values(body=b"\x00"))
    undeclared = Envelope(sa.MetaData())
    undeclared.configure(kms=local_kms, engine=engine)
    with pytest.raises(ConfigurationError, match="scope 'dates', not 'notes'"):
        decrypt_column(undeclared, engine, "notes", "body", sa.String(40))


def test_a_forged_header_cannot_make_a_decrypted_column_fail_its_rerun(
    db_url: str, make_engine: Callable[..., sa.Engine], local_kms: LocalKms
) -> None:
    """An upload whose header names another scope's key (ids are small and guessable) is
    not that scope's ciphertext: a rerun of the finished decrypt_column stays done."""
    engine = make_engine(db_url)
    envelope = Envelope(sa.MetaData())
    metadata: Any = envelope.metadata
    files = sa.Table(
        "files",
        metadata,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("body", Encrypted(sa.LargeBinary, envelope)),
    )
    envelope.configure(kms=local_kms, engine=engine)
    metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(files.insert(), [{"id": i, "body": b"scan %d" % i} for i in range(5)])
    other = envelope.rotate("other")
    assert decrypt_column(envelope, engine, "files", "body", sa.LargeBinary()).swapped
    raw = sa.table("files", sa.column("id"), sa.column("body", sa.LargeBinary))
    with engine.begin() as conn:
        conn.execute(
            raw.insert().values(id=9, body=wire.header(wire.RANDOMIZED, other) + b"A" * 40)
        )
    assert decrypt_column(envelope, engine, "files", "body", sa.LargeBinary()).already_done


@pytest.mark.parametrize("when", ["before the conversion", "after it"])
def test_a_binary_column_holding_its_ciphertext_beside_plaintext_is_neither_done_nor_skipped(
    any_db_url: str,
    make_engine: Callable[..., sa.Engine],
    local_kms: LocalKms,
    when: str,
) -> None:
    """A binary column is the same type before and after: code declaring it Encrypted
    deployed before the conversion, or code not declaring it writing after, leaves
    ciphertext beside plaintext. "Already done" would leave the plaintext there; the
    job refuses before touching anything, and with keep_ciphertext encrypts the rest."""
    engine = make_engine(any_db_url)
    envelope, new, old = early_and_old(engine, local_kms, "files", "body", sa.LargeBinary())
    with engine.begin() as conn:
        conn.execute(old.insert(), [{"id": i, "body": b"scan %d" % i} for i in range(1, 31)])
    target = Encrypted(sa.LargeBinary())
    if when == "after it":
        assert encrypt_column(envelope, engine, "files", "body", target).swapped
        with engine.begin() as conn:  # old code, still running
            conn.execute(old.update().where(old.c.id == 7).values(body=b"rescan 7"))
            conn.execute(old.insert().values(id=31, body=b"scan 31"))
    else:
        with engine.begin() as conn:  # new code, deployed too early
            conn.execute(new.update().where(new.c.id == 7).values(body=b"rescan 7"))
            conn.execute(new.insert().values(id=31, body=b"scan 31"))
    with engine.connect() as conn:
        before = conn.execute(sa.select(old).order_by(old.c.id)).all()

    with pytest.raises(ConfigurationError, match="holds this column's ciphertext beside"):
        encrypt_column(envelope, engine, "files", "body", target)
    with engine.connect() as conn:
        assert conn.execute(sa.select(old).order_by(old.c.id)).all() == before
        assert [c["name"] for c in sa.inspect(conn).get_columns("files")] == ["id", "body"]

    report = encrypt_column(envelope, engine, "files", "body", target, keep_ciphertext=True)
    assert report.swapped
    expected = {i: b"scan %d" % i for i in range(1, 32)}
    expected[7] = b"rescan 7"
    with engine.connect() as conn:
        assert dict(conn.execute(sa.select(new.c.id, new.c.body)).all()) == expected  # type: ignore[arg-type]
    assert encrypt_column(envelope, engine, "files", "body", target).already_done


@pytest.mark.parametrize(
    ("type_", "old", "new"),
    [
        (sa.Boolean(), False, False),
        (sa.Date(), dt.date(1970, 1, 1), dt.date(2001, 2, 3)),
        (sa.Numeric(10, 2), decimal.Decimal("1.50"), decimal.Decimal("2.25")),
        (sa.JSON(), {"a": 1}, {"b": [2]}),
    ],
    ids=["Boolean", "Date", "Numeric", "JSON"],
)
def test_ciphertext_in_a_column_of_any_type_is_told_before_the_type_reads_it(
    sqlite_url: str,
    make_engine: Callable[..., sa.Engine],
    local_kms: LocalKms,
    type_: sa.types.TypeEngine[Any],
    old: Any,
    new: Any,
) -> None:
    """SQLite stores the early code's ciphertext in a column of any type, and the type's
    reading would make True of it (Boolean), or fail (Date): it is told apart first."""
    engine = make_engine(sqlite_url)
    envelope, encrypted, plain = early_and_old(engine, local_kms, "things", "value", type_)
    with engine.begin() as conn:
        conn.execute(plain.insert(), [{"id": i, "value": old} for i in range(1, 6)])
        conn.execute(encrypted.update().where(encrypted.c.id == 3).values(value=new))

    target = Encrypted(type_)
    with pytest.raises(ConfigurationError, match=r"primary key 3 hold this column's"):
        encrypt_column(envelope, engine, "things", "value", target)
    assert encrypt_column(envelope, engine, "things", "value", target, keep_ciphertext=True).swapped
    with engine.connect() as conn:
        values = dict(conn.execute(sa.select(encrypted.c.id, encrypted.c.value)).all())  # type: ignore[arg-type]
    assert values == {1: old, 2: old, 3: new, 4: old, 5: old}


def test_ciphertext_in_a_mysql_latin1_column_is_told_from_its_text(
    mysql_url: str, make_engine: Callable[..., sa.Engine], local_kms: LocalKms
) -> None:
    """A latin1 column takes the early code's bytes and returns them as cp1252 text (five
    bytes as themselves): encrypted as that text, the new value would be lost."""
    engine = make_engine(mysql_url)
    envelope = Envelope(sa.MetaData())
    metadata: Any = envelope.metadata
    new = sa.Table(
        "legacy",
        metadata,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", Encrypted(sa.String(200), envelope)),
    )
    envelope.configure(kms=local_kms, engine=engine)
    envelope.table.create(engine)
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "CREATE TABLE legacy (id INTEGER PRIMARY KEY, name VARCHAR(255) CHARACTER SET latin1)"
        )
        conn.execute(
            sa.table("legacy", sa.column("id"), sa.column("name")).insert(),
            [{"id": i, "name": f"Zoë {i}"} for i in range(1, 41)],
        )
    with engine.begin() as conn:  # every byte, as the server returns it, maps back
        conn.exec_driver_sql("INSERT INTO legacy VALUES (99, %s)", (bytes(range(1, 256)),))
        text = conn.exec_driver_sql("SELECT name FROM legacy WHERE id = 99").scalar_one()
        assert bytes(_FROM_MYSQL_LATIN1[ord(c)] for c in text) == bytes(range(1, 256))
        conn.exec_driver_sql("DELETE FROM legacy WHERE id = 99")
        for i in range(1, 41, 2):
            conn.execute(new.update().where(new.c.id == i).values(name=f"Chloé {i}"))

    target = Encrypted(sa.String(200))
    with pytest.raises(ConfigurationError, match=r"primary key 1, 3, 5, 7, 9, \.\.\. hold"):
        encrypt_column(envelope, engine, "legacy", "name", target)
    assert encrypt_column(envelope, engine, "legacy", "name", target, keep_ciphertext=True).swapped
    with engine.connect() as conn:
        names = dict(conn.execute(sa.select(new.c.id, new.c.name)).all())  # type: ignore[arg-type]
    assert names == {i: f"Chloé {i}" if i % 2 else f"Zoë {i}" for i in range(1, 41)}


def test_a_header_naming_a_shredded_key_does_not_make_encrypt_column_skip_plaintext(
    db_url: str, make_engine: Callable[..., sa.Engine], local_kms: LocalKms
) -> None:
    """An upload whose header names a shredded key (of any scope: ids are small and
    guessable, and destroyed keys stay in the keyring) cannot be authenticated: it is
    no sign that the column is encrypted already, and is encrypted like the rest."""
    engine = make_engine(db_url)
    envelope, new, old = early_and_old(engine, local_kms, "uploads", "body", sa.LargeBinary())
    shredded = envelope.rotate("tenant_17")  # a tenant erased long ago
    envelope.destroy(shredded, force=True)
    forged = wire.header(wire.RANDOMIZED, shredded) + b"A" * 40
    uploads = {1: forged, **{i: b"upload %d" % i for i in range(2, 11)}}
    with engine.begin() as conn:
        conn.execute(old.insert(), [{"id": i, "body": b} for i, b in uploads.items()])

    report = encrypt_column(envelope, engine, "uploads", "body", Encrypted(sa.LargeBinary()))
    assert report.swapped and not report.already_done
    with engine.connect() as conn:
        assert dict(conn.execute(sa.select(new.c.id, new.c.body)).all()) == uploads  # type: ignore[arg-type]


def test_shredded_values_beside_plaintext_do_not_make_a_binary_column_done(
    db_url: str, make_engine: Callable[..., sa.Engine], local_kms: LocalKms
) -> None:
    """A finished binary column whose first values are under a key shredded since, with
    plaintext written around it after: refused like any other ciphertext beside
    plaintext, whichever values the job happens to look at first."""
    engine = make_engine(db_url)
    envelope, new, old = early_and_old(engine, local_kms, "files", "body", sa.LargeBinary())
    with engine.begin() as conn:
        conn.execute(old.insert(), [{"id": i, "body": b"scan %d" % i} for i in range(1, 21)])
    target = Encrypted(sa.LargeBinary())
    assert encrypt_column(envelope, engine, "files", "body", target).swapped
    (first,) = envelope.keys("files")
    envelope.rotate("files")
    with engine.begin() as conn:
        conn.execute(new.insert().values(id=21, body=b"scan 21"))
    envelope.destroy(first.id, force=True)
    with engine.begin() as conn:  # old code, still running
        conn.execute(old.insert().values(id=22, body=b"scan 22"))

    with pytest.raises(ConfigurationError, match="holds this column's ciphertext beside"):
        encrypt_column(envelope, engine, "files", "body", target)


@pytest.mark.parametrize("db", ["sqlite", "mysql"])
def test_a_finished_text_column_with_plaintext_written_around_it_stays_done(
    db: str,
    request: pytest.FixtureRequest,
    make_engine: Callable[..., sa.Engine],
    local_kms: LocalKms,
) -> None:
    """A text column is binary only once converted: plaintext that old code wrote into it
    after the swap (SQLite and MySQL take it; PostgreSQL refuses) is no conversion to
    start again, which would read it as bytes where text is expected."""
    engine = make_engine(request.getfixturevalue(f"{db}_url"))
    envelope, new, old = early_and_old(engine, local_kms, "people", "name", sa.String(50))
    with engine.begin() as conn:
        conn.execute(old.insert(), [{"id": i, "name": f"name {i}"} for i in range(1, 11)])
    target = Encrypted(sa.String(50))
    assert encrypt_column(envelope, engine, "people", "name", target).swapped
    with engine.begin() as conn:  # old code, still running
        conn.execute(old.insert().values(id=11, name="written around"))

    for keep in (False, True):
        report = encrypt_column(envelope, engine, "people", "name", target, keep_ciphertext=keep)
        assert report.already_done
    with engine.connect() as conn:
        assert [c["name"] for c in sa.inspect(conn).get_columns("people")] == ["id", "name"]
        assert conn.execute(sa.select(new.c.name).where(new.c.id == 1)).scalar() == "name 1"


def test_the_early_ciphertext_check_never_compares_text_with_bytes() -> None:
    """A str and a bytes of one character hash alike, so a set holding both compares
    them: under ``python -bb`` (a project's tests may run so) that is an error, and every
    conversion would stop on it. The first characters are told apart by type."""
    script = textwrap.dedent(
        """
        import os
        import sqlalchemy as sa
        from sqlalchemy_envelope import Envelope, LocalKms
        from sqlalchemy_envelope.crypter import ColumnCrypter
        from sqlalchemy_envelope.jobs.early import Classified

        envelope = Envelope()
        engine = sa.create_engine("sqlite://")
        envelope.configure(kms=LocalKms(os.urandom(32)), engine=engine)
        crypter = ColumnCrypter(envelope, "legacy", "name", deterministic=False)
        process = Classified(sa.String(), crypter).result_processor(engine.dialect, None)
        for value in ("\\x01short", "\\\\x01ab", "plain", b"\\\\png", b"\\x01", b"png", 7):
            assert process(value) == value
        """
    )
    done = subprocess.run(
        [sys.executable, "-bb", "-c", script], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr


def test_ciphertext_in_a_padded_char_column_is_told_apart(
    pg_url: str, make_engine: Callable[..., sa.Engine], local_kms: LocalKms
) -> None:
    """PostgreSQL pads a CHAR(n) column's values with spaces, the text form of ciphertext
    the early code wrote too: padded, it is still the column's ciphertext."""
    engine = make_engine(pg_url)
    envelope, new, old = early_and_old(engine, local_kms, "codes", "code", sa.CHAR(200))
    with engine.begin() as conn:
        conn.execute(old.insert(), [{"id": i, "code": "A" * 200} for i in range(1, 6)])
        conn.execute(new.update().where(new.c.id == 3).values(code="new"))  # the early code

    target = Encrypted(sa.CHAR(200))
    with pytest.raises(ConfigurationError, match=r"primary key 3 hold this column's"):
        encrypt_column(envelope, engine, "codes", "code", target)
    assert encrypt_column(envelope, engine, "codes", "code", target, keep_ciphertext=True).swapped
    with engine.connect() as conn:
        codes = dict(conn.execute(sa.select(new.c.id, new.c.code)).all())  # type: ignore[arg-type]
    assert codes == {1: "A" * 200, 2: "A" * 200, 3: "new", 4: "A" * 200, 5: "A" * 200}


def test_an_empty_value_beside_ciphertext_is_no_ciphertext(
    any_db_url: str, make_engine: Callable[..., sa.Engine], local_kms: LocalKms
) -> None:
    """An empty value written around the library is plaintext beside the ciphertext (SQLite
    gives NULL for its first byte, which SQL would take for "no")."""
    engine = make_engine(any_db_url)
    envelope, new, old = early_and_old(engine, local_kms, "files", "body", sa.LargeBinary())
    with engine.begin() as conn:
        conn.execute(old.insert(), [{"id": i, "body": b"scan %d" % i} for i in range(1, 6)])
    target = Encrypted(sa.LargeBinary())
    assert encrypt_column(envelope, engine, "files", "body", target).swapped
    with engine.begin() as conn:  # old code, still running
        conn.execute(old.insert().values(id=6, body=b""))
    with pytest.raises(ConfigurationError, match="holds this column's ciphertext beside"):
        encrypt_column(envelope, engine, "files", "body", target)
    assert encrypt_column(envelope, engine, "files", "body", target, keep_ciphertext=True).swapped
    with engine.connect() as conn:
        assert conn.execute(sa.select(new.c.body).where(new.c.id == 6)).scalar_one() == b""
