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

from sqlalchemy_envelope import Encrypted, Envelope, LocalKms, TableBusyError
from sqlalchemy_envelope.jobs import encrypt_column, locks, trigger

from .test_inplace import encrypted_view, envelope_on, make_table

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
    view = encrypted_view(table, envelope, ["s"])
    with engine.connect() as conn:
        got = conn.execute(sa.select(view.c.s).where(view.c.id == 1)).scalar_one()
    assert got == "written while the job waited"


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
            assert SHADOW in {c["name"] for c in sa.inspect(conn).get_columns("records")}
            assert trigger.exists(conn, "records", None, SHADOW)
    report = encrypt_column(envelope, engine, "records", "s", Encrypted(sa.String(40)))
    assert report.swapped
    view = encrypted_view(table, envelope, ["s"])
    with engine.connect() as conn:
        assert conn.execute(sa.select(view.c.s).where(view.c.id == 1)).scalar_one() == (
            "after the failed swap"
        )
