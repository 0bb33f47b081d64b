"""Batch jobs over whole tables: re-encrypt under the active key, verify, and convert columns.

They work on stored bytes with a :class:`~sqlalchemy_envelope.crypter.ColumnCrypter`
(no codecs), so they need nothing but the database and the KMS. Each job walks
the table in primary-key order (keyset pagination), one transaction per
batch, holding one batch in memory per connection it runs batches on (two
on PostgreSQL, see :mod:`sqlalchemy_envelope.jobs.pages`; one elsewhere).
The pieces: ``batches`` (key ranges, connections, progress), ``pages`` (the
walk), ``writes`` and ``pg_arrays`` (writing a batch back), ``claims``
(workers sharing a table), ``conversion``, ``trigger``, ``swap`` and ``locks``
(columns converted in place; schema changes that never queue the application for
long), ``discovery`` and ``reports``. ``distributed=True`` lets several workers
share one table through claimed key ranges (see :mod:`sqlalchemy_envelope.jobs.claims`).
Progress is logged at INFO on the ``sqlalchemy_envelope`` logger with scopes,
key ids and counts, never values.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Dialect, Engine

from .. import wire
from .._crypto import AuthenticationFailed
from ..cache import clock
from ..crypter import Cipher, ColumnCrypter
from ..errors import DecryptionError, KeyDestroyedError, KeyNotFoundError
from .batches import (
    Key,
    Progress,
    Ticker,
    check_batch_size,
    connect,
    count,
    naming_missing_tables,
)
from .claims import SharedJob, job_name, jobs_table, jobs_table_name
from .discovery import Target, resolve
from .inplace import abandon_conversion, decrypt_column, encrypt_column, reencrypt_column
from .pages import lanes, walk
from .reports import (
    KEY_DESTROYED,
    KEY_NOT_FOUND,
    NOT_AUTHENTIC,
    ColumnJobReport,
    ColumnReport,
    ReencryptReport,
    VerifyReport,
)
from .writes import BatchWrite

if TYPE_CHECKING:
    from ..envelope import Envelope

__all__ = [
    "ColumnJobReport",
    "ReencryptReport",
    "VerifyReport",
    "abandon_conversion",
    "decrypt_column",
    "encrypt_column",
    "reencrypt",
    "reencrypt_column",
    "verify",
]

log = logging.getLogger("sqlalchemy_envelope")


@naming_missing_tables
def reencrypt(
    envelope: Envelope,
    table_or_model: Any,
    *,
    batch_size: int = 1000,
    progress: Progress | None = None,
    columns: Sequence[str] | None = None,
    bind: Engine | Connection | None = None,
    distributed: bool = False,
    chunk_rows: int | None = None,
    lease: float = 120.0,
    schema: str | None = None,
) -> ReencryptReport:
    """Move every value of the table's encrypted columns that is not under its scope's active key.

    ``table_or_model`` is an ORM model, a ``Table`` or a table name (whose
    encrypted columns are found from the envelope's models or, failing that,
    from the stored values; ``columns=`` names them explicitly; ``schema=`` is
    the schema of a table given by name). The table is
    read from ``bind`` (default: the envelope's engine) in primary-key order,
    ``batch_size`` rows per transaction; ``progress(done, total)`` is called
    after each committed batch (``total`` is a ``COUNT(*)`` taken at the
    start).

    Everything is re-derived from what is stored, so the job is resumable after
    a crash at any point and never encrypts twice: values already under the
    active key are skipped. Each batch's read locks its rows in key order
    (SQLite: the database's write lock), so application writes to them wait for the batch rather
    than deadlock with it; each value is written with a compare-and-set,
    ``UPDATE ... SET col = :new WHERE pk = :pk AND col = :old``, so a value the
    application changed since the batch read it keeps the application's write.
    Given an Engine on PostgreSQL, batches run on two connections at once
    (:mod:`sqlalchemy_envelope.jobs.pages`); a Connection keeps to itself.
    The remaining windows: a value the application writes under a key that was
    active when it started but has been rotated out since is left under that
    key until the next run (a rotation during the job moves the target too),
    and so is a row whose primary key the application moves behind the job.

    ``distributed=True``: this call is one of several workers (processes or
    machines) sharing the table; start the same call on each. They split it
    into claimed ranges of ``chunk_rows`` rows (default ``10 * batch_size``)
    through a jobs table in the database; a range whose worker died is taken
    over after ``lease`` seconds. Each call returns once the whole table is
    done; its report counts the rows this worker handled.
    """
    batch_size = check_batch_size(batch_size)
    bind = bind if bind is not None else envelope.engine
    with connect(bind) as conn, lanes(bind) as more:
        target = resolve(envelope, conn, table_or_model, columns, schema=schema)
        report = ReencryptReport(target.name)
        if not target.crypters:  # nothing encrypted yet
            return report
        total = count(conn, target.table)
        rewriter = _Rewriter(conn.dialect, target, report)
        query = sa.select(*target.pk, *target.columns)
        _log_start("reencrypt", target, total)
        ticker = Ticker("reencrypt", target.name, total)

        def work(lo: Key | None, hi: Key | None, renew: Callable[[], None]) -> None:
            for rows in walk(
                conn, query, target.pk, rewriter.batch, batch_size=batch_size, lo=lo, hi=hi,
                before_batch=rewriter.load_active, lock=True, lanes=more,
            ):  # fmt: skip
                report.rows += rows
                renew()
                if progress is not None:
                    progress(report.rows, total)
                ticker.tick(report.rows)

        if distributed:
            # Named after the target keys: after another rotation, a new plan.
            rewriter.load_active()
            keys = ",".join(str(k) for k in sorted(set(rewriter.report.active_keys.values())))
            job = job_name(f"reencrypt {target.name}({','.join(target.crypters)}) to {keys}")
            shared = SharedJob(
                conn,
                jobs_table(jobs_table_name(envelope), target.table.schema),
                job,
                chunk_rows=chunk_rows or 10 * batch_size,
                lease=lease,
            )
            shared.run(target.table, target.pk, work, final=lambda renew: None)
        else:
            work(None, None, lambda: None)
    log.info("reencrypt finished: %s", report)
    return report


@naming_missing_tables
def verify(
    envelope: Envelope,
    table_or_model: Any,
    *,
    columns: Sequence[str] | None = None,
    batch_size: int = 1000,
    progress: Progress | None = None,
    bind: Engine | Connection | None = None,
    schema: str | None = None,
) -> VerifyReport:
    """Count the table's encrypted values per key id, and find plaintext and unreadable ones.

    Every value is decrypted (authenticated) but none is kept, shown or logged.
    Reads ``batch_size`` rows at a time in primary-key order from ``bind``
    (default: the envelope's engine); ``progress(done, total)`` as for
    :func:`reencrypt`.
    """
    batch_size = check_batch_size(batch_size)
    with connect(bind if bind is not None else envelope.engine) as conn:
        target = resolve(
            envelope, conn, table_or_model, columns, schema=schema, unconverted_ok=True
        )
        report = VerifyReport(
            target.name, columns={name: ColumnReport() for name in target.crypters}
        )
        for name in target.unconverted:  # declared encrypted, still stored as plaintext
            plain = sa.table(target.name, sa.column(name), schema=target.table.schema)
            report.columns[name] = ColumnReport(
                plaintext=count(conn, plain, plain.c[name].is_not(None))
            )
        failed: dict[int, str] = {}  # key id -> cause, so a missing key costs one lookup
        offset = len(target.pk)

        def check(_: Connection, rows: list[sa.Row[Any]]) -> None:
            for i, (name, crypter) in enumerate(target.crypters.items(), offset):
                counts = report.columns[name]
                for row in rows:
                    if row[i] is None:
                        counts.null += 1
                        continue
                    value = wire.stored_bytes(row[i])  # None: not even binary (SQLite)
                    key_id = None if value is None else wire.key_id_of(value)
                    if value is None or key_id is None:
                        counts.plaintext += 1
                        continue
                    cause = failed.get(key_id)
                    if cause is None:
                        try:
                            crypter.decrypt(value)
                        except KeyDestroyedError:
                            cause = failed[key_id] = KEY_DESTROYED
                        except KeyNotFoundError:
                            cause = failed[key_id] = KEY_NOT_FOUND
                        except DecryptionError:
                            cause = NOT_AUTHENTIC
                    if cause is None:
                        counts.by_key[key_id] += 1
                    else:
                        counts.unreadable += 1
                        counts.unreadable_by_cause[cause] += 1

        total = count(conn, target.table) if progress is not None else None
        query = sa.select(*target.pk, *target.columns)
        for rows in walk(conn, query, target.pk, check, batch_size=batch_size):
            report.rows += rows
            if progress is not None:
                progress(report.rows, total)
    log.info("verify %s", report)
    return report


class _Rewriter:
    """Moves one batch of values to the active keys, with compare-and-set updates."""

    def __init__(self, dialect: Dialect, target: Target, report: ReencryptReport) -> None:
        self.target = target
        self.report = report
        self.active: dict[str, Cipher] = {}
        self.failed: set[int] = set()
        self.lock = threading.Lock()  # batches may run on several lanes (jobs.pages)
        t, pk = target.table, target.pk
        self.writes = {
            name: BatchWrite(dialect, t, pk, t.c[name], sa.LargeBinary(), guard=t.c[name])
            for name in target.crypters
        }

    def load_active(self) -> None:
        # Outside the batch's transaction: creating a scope's first key must not
        # wait behind our own locks (SQLite). One key per batch, even if rotated meanwhile.
        with self.lock:
            for name, crypter in self.target.crypters.items():
                cipher = self.active[name] = crypter.for_writing()
                self.report.active_keys[crypter.scope] = cipher.key_id

    def batch(self, conn: Connection, rows: list[sa.Row[Any]]) -> None:
        # walk read the page with its rows locked, so the columns may be written in turn.
        # The Python half holds the lock (it holds the GIL anyway); the writes do not.
        offset, now = len(self.target.pk), clock()
        with self.lock:
            todo = [self._column(rows, i, name, now) for i, name in enumerate(self.writes, offset)]
        for (name, write), (keys, olds, news) in zip(self.writes.items(), todo, strict=True):
            if not keys:
                continue
            if self.target.crypters[name].deterministic:
                written, duplicates = _unique_aware(conn, write, keys, news, olds)
            else:
                written, duplicates = write(conn, keys, news, olds), 0
            with self.lock:
                self.report.values_rewritten += written
                self.report.duplicates += duplicates
                self.report.values_changed += len(keys) - written - duplicates
            if duplicates:
                log.warning(
                    "reencrypt %s.%s: %d values left under their old key: under the active "
                    "key each equals another row's value, which a unique constraint refuses",
                    self.target.name, name, duplicates,
                )  # fmt: skip

    def _column(
        self, rows: list[sa.Row[Any]], i: int, name: str, now: float
    ) -> tuple[list[Key], list[bytes], list[bytes]]:
        """The keys, stored values and re-encrypted values of column ``name`` to rewrite."""
        report, offset, head_size = self.report, len(self.target.pk), wire.HEADER_BYTES
        crypter, active = self.target.crypters[name], self.active[name]
        ciphers, active_head = crypter.ciphers, active.head
        keys: list[Key] = []
        olds: list[bytes] = []
        plaintexts: list[bytes] = []
        last_head, open_ = active_head, None  # a page's values mostly share a key
        for row in rows:
            value = row[i]
            if value is None:
                continue
            if type(value) is not bytes:
                value = wire.stored_bytes(value)
                if value is None:  # not even binary (SQLite): not ours
                    report.plaintext += 1
                    continue
            head = value[:head_size]
            if head != last_head or open_ is None:
                if head == active_head:
                    report.values_current += 1
                    continue
                cipher = ciphers.get(head)
                if cipher is None or cipher.expires <= now:
                    cipher = self._cipher(crypter, value)
                    if cipher is None:
                        continue
                last_head, open_ = head, cipher.open
            try:
                plaintext = open_(value)
            except AuthenticationFailed:
                report.unreadable += 1
                continue
            keys.append(tuple(row[:offset]))
            olds.append(value)
            plaintexts.append(plaintext)
        return keys, olds, active.seal_all(active_head, plaintexts)

    def _cipher(self, crypter: ColumnCrypter, value: bytes) -> Cipher | None:
        """The cipher that opens ``value``, or None (counted) if it cannot be read."""
        key_id = wire.key_id_of(value)
        if key_id is None:
            self.report.plaintext += 1
            return None
        if key_id in self.failed:
            self.report.unreadable += 1
            return None
        try:
            return crypter.for_reading(value)
        except KeyNotFoundError:
            self.failed.add(key_id)
        except DecryptionError:
            pass
        self.report.unreadable += 1
        return None


def _unique_aware(
    conn: Connection, write: BatchWrite, keys: list[Key], news: list[bytes], olds: list[bytes]
) -> tuple[int, int]:
    """``(written, duplicates)``: a deterministic column's batch, row by row if it must be.

    After a rotation, the application may have written a value equal to
    another row's under the new key (a unique constraint sees two different
    ciphertexts); moving the older one would break the constraint. Such rows
    are left under their old key and counted, the rest of the batch goes on.
    """
    try:
        with conn.begin_nested():
            return write(conn, keys, news, olds), 0
    except sa.exc.IntegrityError:
        pass
    written = duplicates = 0
    for key, new, old in zip(keys, news, olds, strict=True):
        try:
            with conn.begin_nested():
                written += write(conn, [key], [new], [old])
        except sa.exc.IntegrityError:
            duplicates += 1
    return written, duplicates


def _log_start(job: str, target: Target, total: int) -> None:
    columns = ", ".join(f"{name} (scope {c.scope!r})" for name, c in target.crypters.items())
    log.info("%s %s: %d rows; columns %s", job, target.name, total, columns)
