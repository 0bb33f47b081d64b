"""Fault tests on PostgreSQL: killed connections, killed processes, and load during rotation.

* A batch job's database connection is terminated (``pg_terminate_backend``
  from another connection) between two batches, in the middle of a batch and,
  for ``encrypt_column``, in the middle of the column swap; the job raises, a
  rerun finishes, and every value is exact and under the active key.
* ``reencrypt`` running in a child process is killed with SIGKILL at random
  moments (with a rotation before each attempt), then run to the end.
  (``encrypt_column`` under SIGKILL: ``test_inplace.test_sigkill_at_random_points_then_rerun``.)
* Eight threads insert, update and read encrypted rows while the main thread
  rotates the scope twice and re-encrypts it: no error, no lost or changed
  row, no deadlock. Four threads update a plaintext column while
  ``encrypt_column`` converts it: every committed update ends up encrypted.
"""

from __future__ import annotations

import base64
import itertools
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
import traceback
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import event

from sqlalchemy_envelope import Encrypted, Envelope, LocalKms, wire
from sqlalchemy_envelope.jobs import decrypt_column, encrypt_column, reencrypt, verify

pytestmark = pytest.mark.postgres

ROWS = 600
BATCH = 50
COLUMNS = ["owner", "iban", "note"]

Row = tuple[Any, ...]


class Failed(Exception):
    pass


# -- the data --------------------------------------------------------------------------------
def row_values(i: int, version: int = 0) -> dict[str, Any]:
    return {
        "id": i,
        "owner": f"Owner {i} v{version}",
        "iban": f"DE{i:010d}{version:08d}",
        "note": None if i % 7 == 0 else {"id": i, "v": version, "tags": ["a", "é"]},
    }


def as_row(values: dict[str, Any]) -> Row:
    return tuple(values[c] for c in ("id", *COLUMNS))


def accounts(metadata: sa.MetaData, envelope: Envelope | None) -> sa.Table:
    """Encrypted when ``envelope`` is given, plaintext otherwise (for encrypt_column)."""

    def typed(inner: sa.types.TypeEngine[Any], **kw: Any) -> sa.types.TypeEngine[Any]:
        return inner if envelope is None else Encrypted(inner, envelope, **kw)

    return sa.Table(
        "accounts",
        metadata,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("owner", typed(sa.String(60)), nullable=False),
        sa.Column("iban", typed(sa.String(34), deterministic=True)),
        sa.Column("note", typed(sa.JSON())),
    )


@dataclass
class Db:
    url: str
    engine: sa.Engine
    envelope: Envelope
    table: sa.Table
    expected: list[Row]


def make_db(
    url: str,
    make_engine: Callable[..., sa.Engine],
    kms: LocalKms,
    *,
    encrypted: bool,
    rows: int = ROWS,
    **engine_options: Any,
) -> Db:
    metadata = sa.MetaData()
    envelope = Envelope(metadata, keyring_refresh=0.05)
    table = accounts(metadata, envelope if encrypted else None)
    engine = make_engine(url, **engine_options)
    metadata.create_all(engine)
    envelope.configure(kms=kms, engine=engine)
    values = [row_values(i) for i in range(1, rows + 1)]
    if values:
        with engine.begin() as conn:
            conn.execute(table.insert(), values)
    return Db(url, engine, envelope, table, [as_row(v) for v in values])


def read(engine: sa.Engine, table: sa.Table) -> list[Row]:
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(sa.select(table).order_by(table.c.id))]


def stored_keys(engine: sa.Engine, columns: list[str] = COLUMNS) -> Counter[int | None]:
    """Stored values per key id in the header (None: not ciphertext)."""
    counts: Counter[int | None] = Counter()
    with engine.connect() as conn:
        for column in columns:
            for (v,) in conn.execute(sa.text(f"SELECT {column} FROM accounts")):
                if v is not None:
                    counts[wire.key_id_of(bytes(v))] += 1
    return counts


def values_in(expected: list[Row]) -> int:
    return sum(1 for row in expected for v in row[1:] if v is not None)


# -- killing the job's connection from another one -------------------------------------------
class Terminator:
    """Terminates the backends of one application name, from a connection of its own."""

    def __init__(self, url: str, make_engine: Callable[..., sa.Engine]) -> None:
        self.name = f"envelope_job_{uuid.uuid4().hex[:12]}"
        self.job_url = (
            sa.make_url(url)
            .update_query_dict({"application_name": self.name})
            .render_as_string(hide_password=False)
        )
        self.admin = make_engine(url, poolclass=sa.NullPool)
        self.killed = 0

    def kill(self) -> None:
        with self.admin.begin() as conn:
            # With a timeout, pg_terminate_backend waits until the backend is gone.
            n = conn.execute(
                sa.text(
                    "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid, 10000)) "
                    "FROM pg_stat_activity WHERE application_name = :name AND pid <> "
                    "pg_backend_pid()"
                ),
                {"name": self.name},
            ).scalar_one()
        assert n >= 1, "the job's connection was not found in pg_stat_activity"
        self.killed += n

    def on_statement(self, engine: sa.Engine, match: Callable[[str], bool], nth: int) -> None:
        """Kill the job's connection just before the ``nth`` statement that ``match``es."""
        seen = itertools.count(1)  # next() is atomic: lanes may run statements at once

        @event.listens_for(engine, "before_cursor_execute")
        def before(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
            if match(statement.lstrip().upper()) and next(seen) == nth:
                self.kill()

    def after_first_batch(self) -> Callable[[int, int | None], None]:
        def progress(done: int, total: int | None) -> None:
            if not self.killed:
                self.kill()

        return progress


@pytest.mark.parametrize("point", ["between batches", "mid-batch"])
def test_reencrypt_survives_a_killed_connection(
    pg_url: str, make_engine: Callable[..., sa.Engine], local_kms: LocalKms, point: str
) -> None:
    db = make_db(pg_url, make_engine, local_kms, encrypted=True)
    old = db.envelope.keys("accounts")[0].id
    new = db.envelope.rotate("accounts")
    kill = Terminator(pg_url, make_engine)
    job_engine = make_engine(kill.job_url)
    progress = None
    if point == "between batches":
        progress = kill.after_first_batch()
    else:  # the second batch's first UPDATE (one executemany per column and batch)
        kill.on_statement(job_engine, lambda s: s.startswith("UPDATE"), len(COLUMNS) + 1)

    # One connection: batches in sequence (an Engine would add concurrent lanes).
    with pytest.raises(sa.exc.DBAPIError), job_engine.connect() as job:
        reencrypt(db.envelope, "accounts", batch_size=BATCH, bind=job, progress=progress)
    assert kill.killed == 1
    first_batch = values_in(db.expected[:BATCH])
    # Exactly the first batch committed; the killed batch rolled back.
    assert stored_keys(db.engine) == {new: first_batch, old: values_in(db.expected) - first_batch}
    assert read(db.engine, db.table) == db.expected

    report = reencrypt(db.envelope, "accounts", batch_size=BATCH, bind=job_engine)  # same pool
    assert report.ok and report.rows == ROWS
    assert report.values_current == first_batch  # nothing moved twice
    assert report.values_rewritten == values_in(db.expected) - first_batch
    assert report.values_changed == 0
    assert stored_keys(db.engine) == {new: values_in(db.expected)}
    check = verify(db.envelope, "accounts")
    assert check.ok and check.by_key == {new: values_in(db.expected)}
    assert read(db.engine, db.table) == db.expected
    with db.engine.connect() as conn:  # deterministic lookups still match
        hit = conn.execute(
            sa.select(db.table.c.id).where(db.table.c.iban == db.expected[9][2])
        ).scalar_one()
    assert hit == 10


@pytest.mark.parametrize("job", ["reencrypt", "encrypt_column"])
def test_jobs_on_lanes_survive_killed_connections(
    pg_url: str, make_engine: Callable[..., sa.Engine], local_kms: LocalKms, job: str
) -> None:
    # With an Engine, batches run on two connections at once (jobs.pages): kill
    # them all in the middle, and every committed batch holds, none is redone.
    db = make_db(pg_url, make_engine, local_kms, encrypted=job == "reencrypt")
    kill = Terminator(pg_url, make_engine)
    job_engine = make_engine(kill.job_url)
    kill.on_statement(job_engine, lambda s: s.startswith("UPDATE"), 3)
    type_ = Encrypted(sa.String(60))
    total = values_in(db.expected)

    def run() -> Any:
        if job == "reencrypt":
            return reencrypt(db.envelope, "accounts", batch_size=BATCH, bind=job_engine)
        return encrypt_column(db.envelope, job_engine, "accounts", "owner", type_, batch_size=BATCH)

    new = db.envelope.rotate("accounts") if job == "reencrypt" else None
    with pytest.raises(sa.exc.DBAPIError):
        run()
    assert kill.killed >= 2  # the lanes' connections (and the idle one that started them)
    assert read(db.engine, db.table) == db.expected
    if job == "reencrypt":
        done = stored_keys(db.engine).get(new, 0)
        assert 0 < done < total and sum(stored_keys(db.engine).values()) == total
        report = run()
        assert report.ok and report.values_changed == 0
        assert (report.values_current, report.values_rewritten) == (done, total - done)
        assert stored_keys(db.engine) == {new: total}
    else:
        with db.engine.connect() as conn:
            done = conn.execute(sa.text("SELECT count(owner__envelope) FROM accounts")).scalar_one()
        assert 0 < done < ROWS
        report = run()
        assert report.swapped and report.rows == ROWS - done
        (key,) = db.envelope.keys("accounts")
        assert stored_keys(db.engine, ["owner"]) == {key.id: ROWS}
    assert verify(db.envelope, "accounts").ok


@pytest.mark.parametrize("point", ["between batches", "mid-batch", "in the swap"])
def test_encrypt_column_survives_a_killed_connection(
    pg_url: str, make_engine: Callable[..., sa.Engine], local_kms: LocalKms, point: str
) -> None:
    db = make_db(pg_url, make_engine, local_kms, encrypted=False)
    kill = Terminator(pg_url, make_engine)
    job_engine = make_engine(kill.job_url)
    progress = None
    if point == "between batches":
        progress = kill.after_first_batch()
    elif point == "mid-batch":
        kill.on_statement(job_engine, lambda s: s.startswith("UPDATE"), 2)
    else:  # after the table lock and the last fill, before the old column goes
        kill.on_statement(job_engine, lambda s: "DROP COLUMN" in s, 1)
    type_ = Encrypted(sa.String(60))

    with pytest.raises(sa.exc.DBAPIError), job_engine.connect() as job:  # batches in sequence
        encrypt_column(
            db.envelope, job, "accounts", "owner", type_, batch_size=BATCH, progress=progress
        )
    assert kill.killed == 1
    columns = {c["name"] for c in sa.inspect(db.engine).get_columns("accounts")}
    assert columns == {"id", *COLUMNS, "owner__envelope"}  # not swapped, nothing half-done
    with db.engine.connect() as conn:
        filled = conn.execute(sa.text("SELECT count(owner__envelope) FROM accounts")).scalar_one()
    assert filled == (ROWS if point == "in the swap" else BATCH)
    assert read(db.engine, db.table) == db.expected  # the plaintext column is untouched

    report = encrypt_column(db.envelope, job_engine, "accounts", "owner", type_, batch_size=BATCH)
    assert report.swapped and report.rows == ROWS - filled  # converted rows are not redone
    assert encrypt_column(db.envelope, job_engine, "accounts", "owner", type_).already_done
    assert {c["name"] for c in sa.inspect(db.engine).get_columns("accounts")} == {"id", *COLUMNS}
    view = sa.Table(
        "accounts",
        sa.MetaData(),
        *(
            sa.Column(c.name, Encrypted(c.type, db.envelope) if c.name == "owner" else c.type)
            for c in db.table.columns
        ),
    )
    assert read(db.engine, view) == db.expected
    (key,) = db.envelope.keys("accounts")
    assert stored_keys(db.engine, ["owner"]) == {key.id: ROWS}
    check = verify(db.envelope, "accounts", columns=["owner"])
    assert check.ok and check.by_key == {key.id: ROWS}
    schema = {c["name"]: c for c in sa.inspect(db.engine).get_columns("accounts")}
    assert not schema["owner"]["nullable"]


def test_a_decrypt_column_batch_killed_mid_write_shows_no_plaintext(
    pg_url: str, make_engine: Callable[..., sa.Engine], local_kms: LocalKms
) -> None:
    """decrypt_column writes plaintext: the database error of a failed batch write (here its
    connection killed) must not carry the values in its parameters, text or traceback."""
    db = make_db(pg_url, make_engine, local_kms, encrypted=True)
    kill = Terminator(pg_url, make_engine)
    job_engine = make_engine(kill.job_url)
    kill.on_statement(job_engine, lambda s: s.startswith("UPDATE"), 2)
    with pytest.raises(sa.exc.DBAPIError) as info, job_engine.connect() as job:
        decrypt_column(db.envelope, job, "accounts", "owner", sa.String(60), batch_size=BATCH)
    assert kill.killed == 1
    exc = info.value
    assert exc.params is None
    text = "".join(traceback.format_exception(exc)) + repr(exc)
    assert "UPDATE" in text  # the statement is shown; its values are not
    assert not [i for i in range(1, ROWS + 1) if f"Owner {i} v0" in text]


# -- SIGKILL at random moments of reencrypt ------------------------------------------------
CHILD = textwrap.dedent(
    """
    import base64, sys, time
    import sqlalchemy as sa
    from sqlalchemy_envelope import Envelope, LocalKms
    from sqlalchemy_envelope.jobs import reencrypt

    url, key = sys.argv[1], base64.b64decode(sys.argv[2])
    envelope = Envelope()
    envelope.configure(kms=LocalKms(key), engine=sa.create_engine(url))
    print("ready", flush=True)
    def slow(done, total):
        time.sleep(0.01)
    report = reencrypt(envelope, "accounts", batch_size=20, progress=slow)
    print("finished", report.values_rewritten, report.values_current, flush=True)
    """
)


def test_reencrypt_sigkilled_at_random_points_then_rerun(
    pg_url: str, make_engine: Callable[..., sa.Engine]
) -> None:
    master = os.urandom(32)
    rows = 1500  # 75 batches with a pause each: longer than any delay below
    db = make_db(pg_url, make_engine, LocalKms(master), encrypted=True, rows=rows)
    argv = [sys.executable, "-c", CHILD, pg_url, base64.b64encode(master).decode()]
    rng = random.Random(20240607)
    total = values_in(db.expected)
    seen_keys: set[int | None] = set()
    for _ in range(3):
        newest = db.envelope.rotate("accounts")  # each attempt has another target
        child = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert child.stdout is not None and child.stderr is not None
        try:
            assert child.stdout.readline().strip() == "ready", child.stderr.read()
            time.sleep(rng.uniform(0.0, 0.5))
            os.kill(child.pid, signal.SIGKILL)
            assert child.wait(30) == -signal.SIGKILL
            assert "finished" not in child.stdout.read()  # killed, not done
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
            child.stdout.close()
            child.stderr.close()
        keys = stored_keys(db.engine)
        assert sum(keys.values()) == total and None not in keys
        seen_keys |= set(keys)
        assert read(db.engine, db.table) == db.expected

    assert len(seen_keys) >= 3  # the kills left values under several keys
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    _, rewritten, current = done.stdout.split()[-3:]
    assert int(rewritten) + int(current) == total
    assert stored_keys(db.engine) == {newest: total}
    check = verify(db.envelope, "accounts")
    assert check.ok and check.by_key == {newest: total}
    assert read(db.engine, db.table) == db.expected


# -- load: writers and readers while the scope rotates and re-encrypts ------------------------
THREADS = 8
ROWS_PER_THREAD = 300
ID_SPAN = 1_000_000  # thread t owns ids t * ID_SPAN + 1 ...


class Writer:
    """One thread's rows: inserts, updates (in key order) and reads of its own rows."""

    def __init__(self, t: int, db: Db, stop: threading.Event) -> None:
        self.t, self.db, self.stop = t, db, stop
        self.rng = random.Random(t)
        base = (t + 1) * ID_SPAN
        self.expected = {
            base + n: as_row(row_values(base + n)) for n in range(1, ROWS_PER_THREAD + 1)
        }
        self.next_id = base + ROWS_PER_THREAD + 1
        self.version = 0
        self.ops = 0
        self.error: BaseException | None = None

    def initial(self) -> list[dict[str, Any]]:
        return [dict(zip(("id", *COLUMNS), row, strict=True)) for row in self.expected.values()]

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                choice = self.rng.random()
                if choice < 0.15:
                    self.insert()
                elif choice < 0.65:
                    self.update()
                elif choice < 0.9:
                    self.read_mine()
                else:
                    self.read_any()
                self.ops += 1
        except BaseException as exc:
            self.error = exc

    def insert(self) -> None:
        new = [row_values(self.next_id + n, 0) for n in range(self.rng.randint(1, 4))]
        self.next_id += len(new)
        with self.db.engine.begin() as conn:
            conn.execute(self.db.table.insert(), new)
        self.expected.update({v["id"]: as_row(v) for v in new})

    def update(self) -> None:
        ids = sorted(self.rng.sample(sorted(self.expected), self.rng.randint(1, 3)))
        self.version += 1
        new = [row_values(i, self.version) for i in ids]
        t = self.db.table
        with self.db.engine.begin() as conn:
            for v in new:
                changed = conn.execute(
                    t.update()
                    .where(t.c.id == v["id"])
                    .values(owner=v["owner"], iban=v["iban"], note=v["note"])
                ).rowcount
                assert changed == 1
        self.expected.update({v["id"]: as_row(v) for v in new})

    def read_mine(self) -> None:
        ids = self.rng.sample(sorted(self.expected), 20)
        t = self.db.table
        with self.db.engine.connect() as conn:
            got = {r[0]: tuple(r) for r in conn.execute(sa.select(t).where(t.c.id.in_(ids)))}
        assert got == {i: self.expected[i] for i in ids}

    def read_any(self) -> None:
        t = self.db.table
        start = self.rng.randint(1, THREADS) * ID_SPAN + self.rng.randint(0, ROWS_PER_THREAD)
        with self.db.engine.connect() as conn:
            rows = conn.execute(sa.select(t).where(t.c.id > start).order_by(t.c.id).limit(50)).all()
        for i, owner, iban, note in rows:  # others' rows: some version of the right row
            assert owner.startswith(f"Owner {i} v") and iban.startswith(f"DE{i:010d}")
            assert note is None or note["id"] == i


def test_writers_and_readers_during_rotation_and_reencrypt(
    pg_url: str, make_engine: Callable[..., sa.Engine], local_kms: LocalKms
) -> None:
    url = sa.make_url(pg_url)
    # A lock wait that long is a hang: fail instead of waiting for the test timeout.
    options = f"{url.query.get('options', '')} -c lock_timeout=20000"
    url = url.update_query_dict({"options": options.strip()})
    db = make_db(
        url.render_as_string(hide_password=False), make_engine, local_kms,
        encrypted=True, rows=0, pool_size=THREADS + 2,
    )  # fmt: skip
    stop = threading.Event()
    writers = [Writer(t, db, stop) for t in range(THREADS)]
    with db.engine.begin() as conn:
        conn.execute(db.table.insert(), [v for w in writers for v in w.initial()])
    threads = [threading.Thread(target=w.run, name=f"writer-{w.t}") for w in writers]
    for thread in threads:
        thread.start()

    def ops() -> int:
        return sum(w.ops for w in writers)

    reports = []
    try:
        time.sleep(0.5)
        for _ in range(2):
            before = ops()
            db.envelope.rotate("accounts")
            reports.append(reencrypt(db.envelope, "accounts", batch_size=BATCH))
            assert ops() > before + THREADS  # the writers kept going meanwhile
            assert not [(w.t, w.error) for w in writers if w.error is not None]
        time.sleep(0.3)
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    assert not [t.name for t in threads if t.is_alive()], "a writer hangs"
    errors = [(w.t, w.error) for w in writers if w.error is not None]
    assert not errors, errors
    assert all(r.ok for r in reports)

    expected = sorted(row for w in writers for row in w.expected.values())
    assert len(expected) > THREADS * ROWS_PER_THREAD  # some inserts happened
    assert read(db.engine, db.table) == expected  # no row lost, none changed
    newest = db.envelope.keys("accounts")[-1].id
    assert db.envelope.keys("accounts")[-1].state == "active"
    check = verify(db.envelope, "accounts", batch_size=BATCH)
    assert check.ok and check.rows == len(expected)
    assert sum(check.by_key.values()) == values_in(expected)
    # A value written under a key rotated out meanwhile may wait for the next run.
    last = reencrypt(db.envelope, "accounts", batch_size=BATCH)
    assert last.ok and last.values_changed == 0
    assert stored_keys(db.engine) == {newest: values_in(expected)}
    assert read(db.engine, db.table) == expected


def test_updates_of_the_plaintext_column_during_encrypt_column_are_kept(
    pg_url: str, make_engine: Callable[..., sa.Engine], local_kms: LocalKms
) -> None:
    # The application's old code keeps updating the plaintext column while the shadow
    # fills on two lanes; its writes fail once the column is swapped. Every update that
    # committed must be in the encrypted column, whichever batch had converted the row.
    db = make_db(pg_url, make_engine, local_kms, encrypted=False, pool_size=8)
    stop, t = threading.Event(), db.table
    last: dict[int, str] = {row[0]: row[1] for row in db.expected}
    committed: list[int] = []

    def write(thread: int) -> None:
        rng, version = random.Random(thread), 0
        mine = [i for i in last if i % 4 == thread]
        while not stop.is_set():
            i, version = rng.choice(mine), version + 1
            new = f"Owner {i} t{thread} v{version}"
            try:
                with db.engine.begin() as conn:
                    conn.execute(t.update().where(t.c.id == i).values(owner=new))
            except sa.exc.DBAPIError:  # the column is bytes now: the old code's writes fail
                return
            last[i] = new
            committed.append(i)

    def slow(done: int, total: int | None) -> None:
        time.sleep(0.01)  # leave the writers time to update rows already converted

    threads = [threading.Thread(target=write, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    try:
        encrypt_column(
            db.envelope, db.engine, "accounts", "owner", Encrypted(sa.String(60)),
            batch_size=20, progress=slow,
        )  # fmt: skip
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    assert len(committed) > 100  # the writers were busy during the fill
    view = sa.Table(
        "accounts", sa.MetaData(), sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("owner", Encrypted(sa.String(60), db.envelope)),
    )  # fmt: skip
    with db.engine.connect() as conn:
        stored = {i: owner for i, owner in conn.execute(sa.select(view.c.id, view.c.owner))}
    assert stored == last
