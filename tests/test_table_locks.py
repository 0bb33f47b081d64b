"""A conversion's schema changes never hold the application up behind a long transaction.

On PostgreSQL (a waiting ACCESS EXCLUSIVE lock) and MySQL/MariaDB (a waiting
metadata lock) every later query on the table queues behind the waiting
lock, so each try waits briefly and is retried (jobs/locks.py). These tests
hold the table with an open transaction, as a long report would.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import pytest
import sqlalchemy as sa

from sqlalchemy_envelope import ConfigurationError, Encrypted, Envelope, LocalKms, TableBusyError
from sqlalchemy_envelope.jobs import abandon_conversion, encrypt_column, locks, trigger

from .test_inplace import columns, encrypted_view, envelope_on, make_table

SHADOW = "s__envelope"


@pytest.fixture
def quick(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(locks, "LOCK_TIMEOUT", 0.2)
    monkeypatch.setattr(locks, "FIRST_PAUSE", 0.1)
    monkeypatch.setattr(locks, "MAX_PAUSE", 0.2)


@pytest.fixture(params=["postgres", "mysql"])
def setup(
    request: pytest.FixtureRequest, make_engine: Callable[..., sa.Engine], local_kms: LocalKms
) -> tuple[Envelope, sa.Engine, sa.Table]:
    engine = make_engine(
        request.getfixturevalue("pg_url" if request.param == "postgres" else "mysql_url")
    )
    table, _ = make_table(engine)
    return envelope_on(engine, local_kms), engine, table


@contextmanager
def long_transaction(engine: sa.Engine) -> Iterator[Callable[[], None]]:
    """A transaction that has read the table and stays open until the returned call."""
    conn = engine.connect()
    conn.begin()
    conn.execute(sa.text("SELECT count(*) FROM records"))
    ended = False

    def end() -> None:
        nonlocal ended
        if not ended:
            conn.rollback()
            conn.close()
            ended = True

    try:
        yield end
    finally:
        end()


def timed_update(engine: sa.Engine, text: str) -> float:
    """Seconds an application UPDATE of row 1 takes (failing after 5 s, never hanging)."""
    started = time.monotonic()
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            conn.execute(sa.text("SET LOCAL statement_timeout = '5s'"))
        else:  # the metadata lock wait; restored below (a pooled connection)
            conn.execute(sa.text("SET SESSION lock_wait_timeout = 5"))
        try:
            conn.execute(sa.text("UPDATE records SET s = :s WHERE id = 1"), {"s": text})
        finally:
            if engine.dialect.name != "postgresql":
                conn.execute(sa.text("SET SESSION lock_wait_timeout = DEFAULT"))
    return time.monotonic() - started


def two_workers_held_at_the_swap(envelope: Envelope, engine: sa.Engine) -> dict[int, Any]:
    """A distributed encrypt_column on two workers (lease 2.5 s); the swap's table held 3 s.

    Worker 0 opens the long transaction once the fill is done; worker 1
    joins a second later. Returns each worker's report or exception.
    """
    held = ExitStack()

    def hold_for_a_while(done: int, total: int | None) -> None:
        if done == total and not held._exit_callbacks:  # type: ignore[attr-defined]
            end = held.enter_context(long_transaction(engine))
            threading.Timer(3.0, end).start()

    outcomes: dict[int, Any] = {}

    def worker(n: int) -> None:
        try:
            outcomes[n] = encrypt_column(
                envelope, engine, "records", "s", Encrypted(sa.String(40)), batch_size=50,
                distributed=True, lease=2.5, progress=hold_for_a_while if n == 0 else None,
            )  # fmt: skip
        except BaseException as exc:
            outcomes[n] = exc

    with held:
        workers = [threading.Thread(target=worker, args=(n,)) for n in (0, 1)]
        workers[0].start()
        time.sleep(1.0)
        workers[1].start()
        for thread in workers:
            thread.join(60)
    return outcomes


def assert_converted(
    engine: sa.Engine, envelope: Envelope, table: sa.Table, row: int = 2, value: str = "secret 2 é"
) -> None:
    """Column s of ``row`` reads back as ``value`` through Encrypted."""
    view = encrypted_view(table, envelope, ["s"])
    with engine.connect() as conn:
        assert conn.execute(sa.select(view.c.s).where(view.c.id == row)).scalar_one() == value


@pytest.mark.usefixtures("quick")
def test_the_swap_retries_while_the_application_keeps_writing(
    setup: tuple[Envelope, sa.Engine, sa.Table], caplog: pytest.LogCaptureFixture
) -> None:
    envelope, engine, table = setup
    with long_transaction(engine) as end:
        retried = threading.Event()

        class Watch(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                if "in use by another transaction" in record.getMessage():
                    retried.set()

        watch = Watch()
        logging.getLogger("sqlalchemy_envelope").addHandler(watch)
        outcome: list[Any] = []

        def job() -> None:
            try:
                outcome.append(
                    encrypt_column(
                        envelope, engine, "records", "s", Encrypted(sa.String(40)), batch_size=50
                    )
                )
            except BaseException as exc:
                outcome.append(exc)

        # The long transaction is older than the job: even the ADD COLUMN must wait for it.
        worker = threading.Thread(target=job)
        worker.start()
        try:
            assert retried.wait(10), "the job never reported waiting for the table"
            # The job is between tries or waiting at most LOCK_TIMEOUT: the app gets through.
            assert timed_update(engine, "written while the job waited") < 2.0
            end()
            worker.join(60)
        finally:
            logging.getLogger("sqlalchemy_envelope").removeHandler(watch)
    assert not worker.is_alive()
    (report,) = outcome
    assert not isinstance(report, BaseException), report
    assert report.swapped
    assert_converted(engine, envelope, table, 1, "written while the job waited")


@pytest.mark.usefixtures("quick")
def test_a_table_held_through_every_try_is_a_clear_error_and_a_rerun_resumes(
    setup: tuple[Envelope, sa.Engine, sa.Table], monkeypatch: pytest.MonkeyPatch
) -> None:
    envelope, engine, table = setup
    monkeypatch.setattr(locks, "ATTEMPTS", 3)
    held = ExitStack()

    def hold_at_the_end(done: int, total: int | None) -> None:
        if done == total:  # the fill is done: the swap comes next
            held.enter_context(long_transaction(engine))

    with held:
        sessions = "pg_stat_activity" if engine.dialect.name == "postgresql" else "PROCESSLIST"
        with pytest.raises(TableBusyError, match=sessions) as info:
            encrypt_column(
                envelope, engine, "records", "s", Encrypted(sa.String(40)), batch_size=50,
                progress=hold_at_the_end,
            )  # fmt: skip
        assert "records.s" in str(info.value)
        # The application was never queued for long behind the swap's tries.
        assert timed_update(engine, "after the failed swap") < 2.0
        with engine.connect() as conn:  # nothing lost: the shadow and its trigger remain
            assert SHADOW in columns(conn)
            assert trigger.exists(conn, "records", None, SHADOW)
    report = encrypt_column(envelope, engine, "records", "s", Encrypted(sa.String(40)))
    assert report.swapped
    assert_converted(engine, envelope, table, 1, "after the failed swap")


def _fail_once(engine: sa.Engine, fragment: str) -> list[str]:
    """Make the first statement containing ``fragment`` fail as MySQL's lock wait timeout."""
    import pymysql

    seen: list[str] = []

    def before(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if fragment in statement and not seen:
            seen.append(statement)
            raise pymysql.err.OperationalError(1205, "Lock wait timeout exceeded")

    sa.event.listen(engine, "before_cursor_execute", before)
    return seen


@pytest.mark.usefixtures("quick")
@pytest.mark.parametrize("fragment", ["CHANGE COLUMN", "CREATE TRIGGER"])
def test_mysql_never_retries_a_step_after_its_ddl_committed(
    mysql_url: str, make_engine: Callable[..., sa.Engine], local_kms: LocalKms, fragment: str
) -> None:
    """DDL commits at once on MySQL: a timeout after it raises, and the next run starts clean.

    A retried swap would run without the trigger it had already dropped, and
    an update made during its pause would be lost.
    """
    engine = make_engine(mysql_url)
    table, _ = make_table(engine)
    envelope = envelope_on(engine, local_kms)
    seen = _fail_once(engine, fragment)
    with pytest.raises(TableBusyError, match="SHOW PROCESSLIST"):
        encrypt_column(envelope, engine, "records", "s", Encrypted(sa.String(40)), batch_size=50)
    assert seen
    with engine.begin() as conn:  # between the runs, as during a retry's pause
        conn.execute(sa.text("UPDATE records SET s = 'changed in between' WHERE id = 1"))
    report = encrypt_column(envelope, engine, "records", "s", Encrypted(sa.String(40)))
    assert report.swapped
    assert_converted(engine, envelope, table, 1, "changed in between")


@pytest.mark.usefixtures("quick")
def test_mysql_gives_the_session_its_own_lock_wait_timeout_back(
    mysql_url: str, make_engine: Callable[..., sa.Engine], local_kms: LocalKms
) -> None:
    engine = make_engine(mysql_url, pool_size=1, max_overflow=0)

    @sa.event.listens_for(engine, "connect")
    def own_setting(dbapi_conn: Any, record: Any) -> None:
        with dbapi_conn.cursor() as cursor:
            cursor.execute("SET SESSION lock_wait_timeout = 37")

    make_table(engine)
    envelope = envelope_on(engine, local_kms)
    encrypt_column(envelope, engine, "records", "s", Encrypted(sa.String(40)), batch_size=50)
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT @@SESSION.lock_wait_timeout")).scalar() == 37


@pytest.mark.usefixtures("quick")
def test_a_distributed_swap_keeps_its_lease_while_it_waits(
    setup: tuple[Envelope, sa.Engine, sa.Table],
) -> None:
    """Two workers, a lease shorter than the swap's wait (3 s): still one swap, and both finish."""
    envelope, engine, table = setup
    outcomes = two_workers_held_at_the_swap(envelope, engine)
    assert not any(isinstance(o, BaseException) for o in outcomes.values()), outcomes
    assert sorted(o.swapped for o in outcomes.values()) == [False, True]
    assert_converted(engine, envelope, table)


def test_a_swap_refuses_a_shadow_that_lost_its_trigger(
    any_db_url: str, make_engine: Callable[..., sa.Engine], local_kms: LocalKms
) -> None:
    """What a swap stopped half-way on MySQL leaves, as another worker would find it."""
    from sqlalchemy_envelope.jobs.swap import swap

    from .test_inplace import stop_after_a_batch

    engine = make_engine(any_db_url)
    make_table(engine)
    envelope = envelope_on(engine, local_kms)
    stop_after_a_batch(envelope, engine)
    with engine.begin() as conn:
        trigger.remove(conn, "records", None, SHADOW)
    with engine.connect() as conn, pytest.raises(ConfigurationError, match="lost its trigger"):
        swap(conn, "records", None, "s", SHADOW, sa.LargeBinary(), lambda: 0)
    with engine.connect() as conn:  # nothing changed
        assert SHADOW in columns(conn)
    report = encrypt_column(envelope, engine, "records", "s", Encrypted(sa.String(40)))
    assert report.swapped


@pytest.mark.usefixtures("quick")
def test_a_drop_is_retried_until_the_table_is_free(
    setup: tuple[Envelope, sa.Engine, sa.Table],
) -> None:
    """abandon_conversion's drops are safe to repeat, so MySQL retries them too."""
    from .test_inplace import stop_after_a_batch

    envelope, engine, _ = setup
    stop_after_a_batch(envelope, engine)
    with long_transaction(engine) as end:
        threading.Timer(2.5, end).start()
        assert abandon_conversion(engine, "records", "s") == [SHADOW]
    with engine.connect() as conn:
        assert SHADOW not in columns(conn)
        assert not trigger.exists(conn, "records", None, SHADOW)


@pytest.mark.usefixtures("quick")
def test_a_worker_that_outwaits_its_lease_on_the_swap_stops_and_says_so(
    setup: tuple[Envelope, sa.Engine, sa.Table], monkeypatch: pytest.MonkeyPatch
) -> None:
    envelope, engine, table = setup
    monkeypatch.setattr(locks, "FIRST_PAUSE", 4.0)  # longer than the lease
    monkeypatch.setattr(locks, "MAX_PAUSE", 4.0)
    outcomes = two_workers_held_at_the_swap(envelope, engine)
    # Either worker may have claimed the swap first; the other took it over.
    failed = [o for o in outcomes.values() if isinstance(o, BaseException)]
    reports = [o for o in outcomes.values() if not isinstance(o, BaseException)]
    assert len(failed) == 1 and isinstance(failed[0], ConfigurationError), outcomes
    assert "took over the final step" in str(failed[0])
    assert len(reports) == 1 and reports[0].swapped, outcomes
    assert_converted(engine, envelope, table)
