"""asyncio: AsyncSession and AsyncConnection round trips; a KMS call never blocks the loop.

The KMS provider here is LocalKms behind a deliberately blocking ``time.sleep``
(a slow network call): while it runs, a ticker task on the same loop must keep
ticking every 10 ms.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine

from sqlalchemy_envelope import (
    ConfigurationError,
    DecryptionError,
    Envelope,
    KeyDestroyedError,
    KeyNotFoundError,
    KmsError,
    LocalKms,
    wire,
)
from sqlalchemy_envelope.kms.base import GeneratedKey

from .attack import SwitchableKms
from .models import App, build

DELAY = 1.0
TICK = 0.01
MAX_GAP = 0.6  # a blocked loop shows a gap of at least DELAY; a busy CI machine ~0.35 s


class SlowKms(SwitchableKms):
    """LocalKms whose calls block their thread for ``DELAY`` seconds, recording where they ran."""

    def __init__(self, inner: LocalKms) -> None:
        super().__init__(inner)
        self.threads: list[int] = []
        self.scopes: list[str] = []

    def _slow(self, context: Mapping[str, str]) -> None:
        self.threads.append(threading.get_ident())
        self.scopes.extend(context.values())
        time.sleep(DELAY)  # a blocking call, as boto3's are

    def generate_data_key(self, context: Mapping[str, str]) -> GeneratedKey:
        self._slow(context)
        return super().generate_data_key(context)

    def unwrap(self, wrapped: bytes, context: Mapping[str, str], kms_key_id: str) -> bytes:
        self._slow(context)
        return super().unwrap(wrapped, context, kms_key_id)


class Ticker:
    """A task that ticks every 10 ms and remembers the longest gap between ticks."""

    def __init__(self) -> None:
        self.max_gap = 0.0
        self.ticks = 0
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(TICK)
            now = time.monotonic()
            self.max_gap = max(self.max_gap, now - last)
            self.ticks += 1
            last = now

    async def __aenter__(self) -> Ticker:
        self._task = asyncio.get_running_loop().create_task(self._run())
        await asyncio.sleep(0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


#: Each server database's URL fixture and async driver (asyncmy: aiomysql
#: cannot bind bytes beside PyMySQL 1.2).
ASYNC_SERVERS = {
    "postgres": ("pg_url", "postgresql+psycopg"),
    "mysql": ("mysql_url", "mysql+asyncmy"),
}


@pytest.fixture(params=["postgres", "sqlite", "mysql"])
def async_url(request: pytest.FixtureRequest, tmp_path: Any) -> str:
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'async.db'}"
    fixture, driver = ASYNC_SERVERS[request.param]
    url = sa.make_url(request.getfixturevalue(fixture))
    return url.set(drivername=driver).render_as_string(hide_password=False)


World = tuple[App, AsyncEngine, SlowKms]


def run(url: str, body: Callable[[App, AsyncEngine, SlowKms], Awaitable[None]]) -> None:
    """Set up, run ``body`` and tear down, all on one event loop."""

    async def main() -> None:
        app = build()
        engine = create_async_engine(url)
        try:
            async with engine.begin() as conn:
                await conn.run_sync(app.Base.metadata.create_all)
            kms = SlowKms(LocalKms(os.urandom(32)))
            app.envelope.configure(kms=kms, engine=engine)
            await body(app, engine, kms)
        finally:
            await engine.dispose()  # closes the keyring's own pool too

    asyncio.run(main())


WHEN = dt.datetime(2024, 5, 1, 9, 30, tzinfo=dt.timezone(dt.timedelta(hours=-4)))


async def patient_name(app: App, engine: AsyncEngine, n: int) -> str:
    async with AsyncSession(engine) as s:
        p = await s.get(app.Patient, n)
        assert p is not None
        return str(p.name)


async def add_patient(app: App, engine: AsyncEngine, n: int) -> None:
    async with AsyncSession(engine) as s:
        p = app.Patient(id=n, name=f"async-{n}", email=f"{n}@async.org", notes={"n": n})
        p.visits.append(app.Visit(reason=f"reason-{n}", at=WHEN))
        s.add(p)
        await s.commit()


def test_orm_async_session_round_trip(async_url: str) -> None:
    async def main(app: App, engine: AsyncEngine, kms: SlowKms) -> None:
        await add_patient(app, engine, 1)
        app.envelope.configure(kms=kms, engine=engine)  # cold: keys load inside the greenlet
        async with AsyncSession(engine) as s:
            p = (await s.scalars(sa.select(app.Patient))).one()  # visits: selectin
            assert (p.name, p.email, p.notes) == ("async-1", "1@async.org", {"n": 1})
            assert p.visits[0].reason == "reason-1" and p.visits[0].at == WHEN
            found = await s.scalars(
                sa.select(app.Patient.id).where(app.Patient.email == "1@async.org")
            )
            assert found.all() == [1]

    run(async_url, main)


def test_core_async_connection_results_decrypt(async_url: str) -> None:
    async def main(app: App, engine: AsyncEngine, kms: SlowKms) -> None:
        patients = app.Patient.__table__
        await add_patient(app, engine, 1)
        await add_patient(app, engine, 2)
        app.envelope.configure(kms=kms, engine=engine)  # cold again
        async with engine.connect() as conn:
            rows = (await conn.execute(sa.select(patients).order_by(patients.c.id))).all()
            assert [(r.name, r.email) for r in rows] == [
                ("async-1", "1@async.org"),
                ("async-2", "2@async.org"),
            ]
            result = await conn.stream(sa.select(patients.c.name).order_by(patients.c.id))
            assert [r.name async for r in result] == ["async-1", "async-2"]

    run(async_url, main)


def test_kms_calls_do_not_block_the_event_loop(async_url: str) -> None:
    async def main(app: App, engine: AsyncEngine, kms: SlowKms) -> None:
        patients = app.Patient.__table__
        loop_thread = threading.get_ident()
        async with Ticker() as ticker:  # the first key of each scope: GenerateDataKey
            started = time.monotonic()
            await add_patient(app, engine, 1)
            assert time.monotonic() - started >= DELAY
        assert ticker.max_gap < MAX_GAP, f"the loop stalled for {ticker.max_gap:.3f}s"
        assert kms.threads and loop_thread not in kms.threads

        app.envelope.configure(kms=kms, engine=engine)  # cold: Decrypt on the next read
        kms.threads.clear()
        async with Ticker() as ticker:
            started = time.monotonic()
            async with AsyncSession(engine) as s:
                assert (await s.get(app.Patient, 1)).name == "async-1"  # type: ignore[union-attr]
            async with engine.connect() as conn:
                app.envelope.configure(kms=kms, engine=engine)
                assert (await conn.execute(sa.select(patients.c.ssn, patients.c.name))).one().name
            assert time.monotonic() - started >= 2 * DELAY
        assert ticker.max_gap < MAX_GAP, f"the loop stalled for {ticker.max_gap:.3f}s"
        assert ticker.ticks >= int(2 * DELAY / TICK) // 2
        assert kms.threads and loop_thread not in kms.threads

    run(async_url, main)


def test_concurrent_cold_reads_share_one_unwrap(async_url: str) -> None:
    async def main(app: App, engine: AsyncEngine, kms: SlowKms) -> None:
        await add_patient(app, engine, 1)
        app.envelope.configure(kms=kms, engine=engine)
        kms.scopes.clear()
        async with Ticker() as ticker:
            names = await asyncio.gather(*(patient_name(app, engine, 1) for _ in range(8)))
        assert names == ["async-1"] * 8
        assert ticker.max_gap < MAX_GAP
        # One Decrypt per key the reads need (patients', and visits' for the selectin
        # load), not one per task.
        assert sorted(kms.scopes) == ["patients", "visits"]

    run(async_url, main)


@pytest.mark.parametrize("cancelled", ["loader", "waiter"])
def test_a_cancelled_read_cancels_no_other_read_of_its_key(async_url: str, cancelled: str) -> None:
    """A read cancelled (a timeout, say) while it unwraps a key, or while it waits for
    another read's unwrap: the other reads of that key go on and return their rows."""

    async def main(app: App, engine: AsyncEngine, kms: SlowKms) -> None:
        await add_patient(app, engine, 1)
        app.envelope.configure(kms=kms, engine=engine)
        loader = asyncio.create_task(patient_name(app, engine, 1))
        await asyncio.sleep(DELAY / 5)  # the first read is unwrapping the key
        waiters = [asyncio.create_task(patient_name(app, engine, 1)) for _ in range(3)]
        await asyncio.sleep(DELAY / 5)  # they wait for it
        victim = loader if cancelled == "loader" else waiters[0]
        victim.cancel()
        reads = [loader, *waiters]
        results = await asyncio.gather(*reads, return_exceptions=True)
        for task, result in zip(reads, results, strict=True):
            if task is victim:
                assert isinstance(result, asyncio.CancelledError), result
            else:
                assert result == "async-1", result

    run(async_url, main)


def test_core_async_rows_read_after_their_keys_ttl_still_decrypt(async_url: str) -> None:
    """A plain AsyncConnection.execute() decrypts its rows after its statement, where no
    key can be loaded: a key fresh when the statement began still opens them after its
    cache_ttl ran out (a statement in flight then), for keyring_refresh at most."""

    async def main(app: App, engine: AsyncEngine, kms: SlowKms) -> None:
        await add_patient(app, engine, 1)
        app.envelope.cache_ttl = 2 * DELAY
        app.envelope.keyring_refresh = DELAY
        app.envelope.configure(kms=kms, engine=engine)
        names = sa.select(app.Patient.__table__.c.name)
        async with engine.connect() as conn:
            result = await conn.execute(names)  # loads the key (DELAY), fresh for 2 DELAY
            assert result.scalars().all() == ["async-1"]
            result, kept = await conn.execute(names), await conn.execute(names)
            await asyncio.sleep(2.5 * DELAY)  # the key's cache_ttl runs out: DELAY / 2 ago
            assert result.scalars().all() == ["async-1"]
            await asyncio.sleep(DELAY)  # beyond keyring_refresh: no longer
            with pytest.raises(KeyNotFoundError):
                kept.scalars().all()
            assert (await conn.execute(names)).scalars().all() == ["async-1"]  # loaded again

    run(async_url, main)


def test_async_kms_outage_fails_closed(async_url: str) -> None:
    async def main(app: App, engine: AsyncEngine, kms: SlowKms) -> None:
        await add_patient(app, engine, 1)
        kms.failure = KmsError("down", code="ServiceUnavailable")
        app.envelope.configure(kms=kms, engine=engine)
        with pytest.raises(KmsError):
            await add_patient(app, engine, 2)
        with pytest.raises(KmsError):
            async with AsyncSession(engine) as s:
                await s.get(app.Patient, 1)
        kms.failure = None
        async with engine.connect() as conn:
            ids = (await conn.execute(sa.text("SELECT id FROM patients"))).scalars().all()
        assert ids == [1]

    run(async_url, main)


def test_core_async_rows_under_a_destroyed_or_unknown_key_raise_our_errors(
    async_url: str,
) -> None:
    """Rows of a plain AsyncConnection.execute() decrypt with no I/O possible: still our errors."""

    async def main(app: App, engine: AsyncEngine, kms: SlowKms) -> None:
        patients, envelope = app.Patient.__table__, app.envelope
        await add_patient(app, engine, 1)
        with pytest.raises(ConfigurationError, match="run_sync"):
            envelope.keys("patients")  # from plain async code
        async with engine.connect() as conn:  # lifecycle calls are synchronous: run_sync
            shredded = await conn.run_sync(lambda _: envelope.keys("patients")[0].id)
            await conn.run_sync(lambda _: envelope.rotate("patients"))
            await conn.run_sync(lambda _: envelope.destroy(shredded, force=True))
        envelope.configure(kms=kms, engine=engine)  # cold
        async with engine.connect() as conn:
            with pytest.raises(KeyDestroyedError, match=f"data key {shredded} "):
                (await conn.execute(sa.select(patients.c.name))).all()
            raw = sa.table("patients", sa.column("ssn", sa.LargeBinary))
            forged = wire.header(wire.RANDOMIZED, 4242) + bytes(40)
            await conn.execute(raw.update().values(ssn=forged))
            with pytest.raises(KeyNotFoundError, match="4242"):
                (await conn.execute(sa.select(patients.c.ssn))).all()

    run(async_url, main)


def test_core_async_reads_a_key_rotated_in_another_process(async_url: str) -> None:
    """Within keyring_refresh, not cache_ttl: the prefetch re-reads the scope's keys
    once its listing expires, so rows under a key made elsewhere decrypt."""

    async def main() -> None:
        app, elsewhere = build(keyring_refresh=0.2), build()  # two processes' envelopes
        engine = create_async_engine(async_url)
        try:
            async with engine.begin() as conn:
                await conn.run_sync(app.Base.metadata.create_all)
            kms = LocalKms(os.urandom(32))
            app.envelope.configure(kms=kms, engine=engine)
            elsewhere.envelope.configure(kms=kms, engine=engine)
            names = sa.select(app.Patient.__table__.c.name).order_by(app.Patient.__table__.c.id)
            await add_patient(app, engine, 1)
            async with engine.connect() as conn:  # this process now holds key 1 for cache_ttl
                assert (await conn.execute(names)).scalars().all() == ["async-1"]
            async with engine.connect() as conn:
                await conn.run_sync(lambda _: elsewhere.envelope.rotate("patients"))
            await add_patient(elsewhere, engine, 2)  # under the new key
            await asyncio.sleep(0.3)
            async with engine.connect() as conn:
                assert (await conn.execute(names)).scalars().all() == ["async-1", "async-2"]
        finally:
            await engine.dispose()

    asyncio.run(main())


def test_core_async_statement_begun_after_its_keys_ttl_does_not_use_the_expired_key(
    async_url: str,
) -> None:
    """keyring_refresh's grace covers a statement in flight when its key's cache_ttl ran
    out, not one begun after: for that one, a key shredded elsewhere meanwhile is gone."""

    async def main() -> None:
        app, elsewhere = build(cache_ttl=0.5, keyring_refresh=5.0), build()  # two processes
        engine = create_async_engine(async_url)
        try:
            async with engine.begin() as conn:
                await conn.run_sync(app.Base.metadata.create_all)
            kms = LocalKms(os.urandom(32))
            app.envelope.configure(kms=kms, engine=engine)
            elsewhere.envelope.configure(kms=kms, engine=engine)
            names = sa.select(app.Patient.__table__.c.name)
            await add_patient(app, engine, 1)
            async with engine.connect() as conn:  # this process holds the key for cache_ttl
                assert (await conn.execute(names)).scalars().all() == ["async-1"]
                shredded = await conn.run_sync(lambda _: elsewhere.envelope.keys()[0].id)
                await conn.run_sync(lambda _: elsewhere.envelope.destroy(shredded, force=True))
                await asyncio.sleep(0.7)  # cache_ttl ran out; keyring_refresh did not
                with pytest.raises(KeyDestroyedError, match=f"data key {shredded} "):
                    (await conn.execute(names)).scalars().all()
        finally:
            await engine.dispose()

    asyncio.run(main())


def test_core_async_value_moved_from_another_scope_is_decryption_error(async_url: str) -> None:
    """As with I/O (test_tamper.py): the same DecryptionError, not a missing key."""

    async def main(app: App, engine: AsyncEngine, kms: SlowKms) -> None:
        await add_patient(app, engine, 1)
        async with AsyncSession(engine) as s:
            s.add(app.Doctor(id=1, name="dr-moved"))  # scope "staff", a key of its own
            await s.commit()
        async with engine.begin() as conn:
            await conn.execute(
                sa.text("UPDATE patients SET name = (SELECT name FROM doctors WHERE id = 1)")
            )
        app.envelope.configure(kms=kms, engine=engine)  # cold: the staff key never loaded
        async with engine.connect() as conn:
            with pytest.raises(DecryptionError, match=r"patients\.name") as caught:
                (await conn.execute(sa.select(app.Patient.__table__.c.name))).all()
        assert "dr-moved" not in str(caught.value)

    run(async_url, main)


def test_a_key_another_task_is_loading_is_our_error_outside_the_greenlet(
    async_url: str,
) -> None:
    """A row read outside SQLAlchemy's greenlet cannot wait for another task's unwrap
    without blocking the loop that runs it: KeyNotFoundError saying so, not a RuntimeError."""

    async def main(app: App, engine: AsyncEngine, kms: SlowKms) -> None:
        await add_patient(app, engine, 1)
        async with engine.connect() as conn:
            raw = sa.table("patients", sa.column("name", sa.LargeBinary))
            stored = (await conn.execute(sa.select(raw.c.name))).scalar_one()
        app.envelope.configure(kms=kms, engine=engine)  # cold
        crypter = app.Patient.__table__.c.name.type.crypter()

        async def load_in_session() -> str:
            async with AsyncSession(engine) as s:  # inside the greenlet: unwraps (1 s)
                return (await s.get(app.Patient, 1)).name  # type: ignore[union-attr]

        loading = asyncio.ensure_future(load_in_session())
        await asyncio.sleep(DELAY / 2)
        with pytest.raises(KeyNotFoundError, match="being loaded by another task"):
            crypter.decrypt(stored)  # on the loop, outside any greenlet
        assert await loading == "async-1"
        assert crypter.decrypt(stored) == b"async-1"  # loaded now

    run(async_url, main)


def test_batch_jobs_on_an_asyncio_engine_name_its_driver_and_the_way_out(tmp_path: Any) -> None:
    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'async.db'}")
    envelope = Envelope(sa.MetaData())
    envelope.configure(kms=LocalKms(os.urandom(32)), engine=engine)
    with pytest.raises(ConfigurationError, match=r"sqlite\+aiosqlite is an asyncio one"):
        envelope.reencrypt("patients")
    asyncio.run(engine.dispose())
