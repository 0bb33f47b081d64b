"""Several workers on one table, each with its own engine, coordinated through the database."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa

from sqlalchemy_envelope import Encrypted, Envelope, LocalKms, wire
from sqlalchemy_envelope.jobs import claims, encrypt_column, reencrypt, verify

ROWS = 1200


class Interrupted(Exception):
    pass


def populate(engine: sa.Engine, envelope: Envelope, *, encrypted: bool) -> sa.Table:
    metadata = sa.MetaData()
    table = sa.Table(
        "accounts",
        metadata,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("owner", Encrypted(sa.String(60), envelope) if encrypted else sa.String(60)),
        sa.Column("iban", Encrypted(sa.String(34), envelope) if encrypted else sa.String(34)),
    )
    metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(
            table.insert(),
            [{"id": i, "owner": f"Owner {i}", "iban": f"DE{i:020d}"} for i in range(1, ROWS + 1)],
        )
    return table


def workers(
    count: int, url: str, make_engine: Callable[..., sa.Engine], kms: LocalKms
) -> list[tuple[Envelope, sa.Engine]]:
    """What separate processes would hold: an envelope and an engine each."""
    out = []
    for _ in range(count):
        envelope, engine = Envelope(), make_engine(url)
        envelope.configure(kms=kms, engine=engine)
        out.append((envelope, engine))
    return out


def run_all(jobs: list[Callable[[], Any]]) -> list[Any]:
    results: list[Any] = [None] * len(jobs)
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(jobs))

    def run(i: int) -> None:
        try:
            barrier.wait()
            results[i] = jobs[i]()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    if errors:
        raise errors[0]
    return results


def stored_keys(engine: sa.Engine) -> set[int | None]:
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT owner, iban FROM accounts")).all()
    return {wire.key_id_of(bytes(v)) for row in rows for v in row}


@pytest.mark.postgres
def test_two_workers_share_a_reencrypt(
    pg_url: str, make_engine: Callable[..., sa.Engine], local_kms: LocalKms
) -> None:
    engine = make_engine(pg_url)
    app = Envelope(sa.MetaData())
    app.metadata.create_all(engine)  # type: ignore[union-attr]
    app.configure(kms=local_kms, engine=engine)
    table = populate(engine, app, encrypted=True)
    new = app.rotate("accounts")
    pool = workers(2, pg_url, make_engine, local_kms)

    reports = run_all(
        [
            lambda env=env, eng=eng: reencrypt(
                env, "accounts", batch_size=25, bind=eng, distributed=True, chunk_rows=100, lease=30
            )
            for env, eng in pool
        ]
    )
    rows = [r.rows for r in reports]
    assert sum(rows) == ROWS and all(n > 0 for n in rows), rows  # each range once, both worked
    assert sum(r.values_rewritten for r in reports) == 2 * ROWS
    assert stored_keys(engine) == {new}
    with engine.connect() as conn:
        got = conn.execute(sa.select(table.c.owner).order_by(table.c.id)).scalars().all()
    assert got == [f"Owner {i}" for i in range(1, ROWS + 1)]
    # A later run plans afresh and finds nothing left to move.
    again = reencrypt(app, "accounts", distributed=True, chunk_rows=500)
    assert again.rows == ROWS and again.values_rewritten == 0


@pytest.mark.parametrize("url_fixture", ["pg_url", "mysql_url"])
def test_two_workers_share_an_encrypt_column(
    url_fixture: str,
    request: pytest.FixtureRequest,
    make_engine: Callable[..., sa.Engine],
    local_kms: LocalKms,
) -> None:
    url = request.getfixturevalue(url_fixture)
    engine = make_engine(url)
    app = Envelope(sa.MetaData())
    app.metadata.create_all(engine)  # type: ignore[union-attr]
    app.configure(kms=local_kms, engine=engine)
    populate(engine, app, encrypted=False)
    pool = workers(2, url, make_engine, local_kms)

    def job(env: Envelope, eng: sa.Engine, column: str) -> Any:
        return encrypt_column(
            env, eng, "accounts", column, Encrypted(sa.String(60)),
            batch_size=25, distributed=True, chunk_rows=100, lease=30,
        )  # fmt: skip

    for column in ("owner", "iban"):
        reports = run_all([lambda e=env, g=eng, c=column: job(e, g, c) for env, eng in pool])
        assert sum(r.rows for r in reports) == ROWS
        assert sum(r.swapped for r in reports) == 1  # one worker swapped the column in
    view = sa.Table(
        "accounts",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("owner", Encrypted(sa.String(60), app)),
        sa.Column("iban", Encrypted(sa.String(60), app)),
    )
    with engine.connect() as conn:
        got = conn.execute(sa.select(view.c.owner, view.c.iban).order_by(view.c.id)).all()
    assert got == [(f"Owner {i}", f"DE{i:020d}") for i in range(1, ROWS + 1)]
    assert verify(app, "accounts").ok


def test_a_dead_workers_range_is_taken_over(
    sqlite_url: str, make_engine: Callable[..., sa.Engine], local_kms: LocalKms
) -> None:
    engine = make_engine(sqlite_url)
    app = Envelope(sa.MetaData())
    app.metadata.create_all(engine)  # type: ignore[union-attr]
    app.configure(kms=local_kms, engine=engine)
    populate(engine, app, encrypted=True)
    new = app.rotate("accounts")

    def die(done: int, total: int | None) -> None:
        if done >= 50:
            raise Interrupted  # holds range 0 (rows 1-100), half done, lease running

    with pytest.raises(Interrupted):
        reencrypt(
            app,
            "accounts",
            batch_size=25,
            progress=die,
            distributed=True,
            chunk_rows=100,
            lease=0.5,
        )
    report = reencrypt(app, "accounts", batch_size=25, distributed=True, chunk_rows=100, lease=0.5)
    assert report.rows == ROWS  # the dead worker's range too, once its lease ran out
    assert stored_keys(engine) == {new}
    with engine.connect() as conn:
        states = (
            conn.execute(sa.text("SELECT DISTINCT state FROM envelope_data_keys_jobs"))
            .scalars()
            .all()
        )
    assert states == ["done"]


def test_a_rotation_in_between_gets_a_new_plan(
    sqlite_url: str, make_engine: Callable[..., sa.Engine], local_kms: LocalKms
) -> None:
    engine = make_engine(sqlite_url)
    app = Envelope(sa.MetaData())
    app.metadata.create_all(engine)  # type: ignore[union-attr]
    app.configure(kms=local_kms, engine=engine)
    populate(engine, app, encrypted=True)
    app.rotate("accounts")

    def die(done: int, total: int | None) -> None:
        if done >= 250:
            raise Interrupted  # ranges 0 and 1 done under the plan for that key

    with pytest.raises(Interrupted):
        reencrypt(app, "accounts", batch_size=25, progress=die, distributed=True, chunk_rows=100)
    newest = app.rotate("accounts")
    report = reencrypt(app, "accounts", batch_size=25, distributed=True, chunk_rows=100)
    assert report.rows == ROWS and stored_keys(engine) == {newest}


def test_a_rerun_says_what_it_waits_for_and_takes_a_gone_process_range_at_once(
    sqlite_url: str,
    make_engine: Callable[..., sa.Engine],
    local_kms: LocalKms,
    caplog: pytest.LogCaptureFixture,
) -> None:
    engine = make_engine(sqlite_url)
    app = Envelope(sa.MetaData())
    app.metadata.create_all(engine)  # type: ignore[union-attr]
    app.configure(kms=local_kms, engine=engine)
    populate(engine, app, encrypted=True)
    options: dict[str, Any] = {"batch_size": 25, "distributed": True, "chunk_rows": 100}

    def die(done: int, total: int | None) -> None:
        if done >= 50:
            raise Interrupted  # holds range 0

    def interrupted_then_held_by(owner: str, seconds: float) -> None:
        app.rotate("accounts")
        with pytest.raises(Interrupted):
            reencrypt(app, "accounts", progress=die, lease=60, **options)
        with engine.begin() as conn:
            conn.execute(
                sa.text("UPDATE envelope_data_keys_jobs SET owner = :o, lease_until = :u "
                        "WHERE state = 'running'"),
                {"o": owner, "u": int((time.time() + seconds) * 1000)},
            )  # fmt: skip

    # A worker of this machine that is still running (here: another thread): waited for.
    interrupted_then_held_by(f"{claims._machine()}:{os.getpid()}:1:alive", 1.5)
    with caplog.at_level(logging.INFO, logger="sqlalchemy_envelope"):
        assert reencrypt(app, "accounts", lease=60, **options).rows == ROWS
    assert "waiting for 1 range(s) held by other workers, at most" in caplog.text

    # One whose process has ended: its range is taken over at once, not after its lease.
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    interrupted_then_held_by(f"{claims._machine()}:{ended.pid}:1:gone", 60)
    started = time.monotonic()
    assert reencrypt(app, "accounts", lease=60, **options).rows == ROWS
    assert time.monotonic() - started < 30
