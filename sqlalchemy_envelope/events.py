"""The two engine events the library installs, once, for every engine.

* ``handle_error``: when a statement fails before it runs (a KMS outage during
  a flush, a value of the wrong type, in our column or in any other),
  SQLAlchemy builds a ``StatementError`` whose text and ``params`` hold the
  statement's parameters before encryption, that is in plaintext: they are
  hidden. For errors of ours, the caller gets our own exception instead (a
  copy, chained from the original), and the ``StatementError`` is dropped.
* ``begin``, on SQLite only: SQLite has one writer at a time, so once an
  application transaction has written, the keyring's own connection could not
  create a new scope's first key until it ends. When a transaction begins (before
  it holds any lock), every scope declared with the envelope that has never had
  a key gets its first one, once per process and scope.
* ``before_cursor_execute``: under asyncio, a plain ``AsyncConnection.execute``
  processes result rows after the statement's greenlet has finished, where no
  I/O is possible. Just before such a statement runs (inside the greenlet), the
  keys of the scopes its result columns read are loaded, so decryption later
  finds them in memory. Synchronous engines skip this at the cost of one check.
"""

from __future__ import annotations

import contextlib
import copy
import threading
import weakref
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Engine, ExceptionContext

from . import _runtime
from .errors import EnvelopeError
from .keyring import beginning, in_keyring_io

_installed = False
_lock = threading.Lock()
_readers: weakref.WeakKeyDictionary[Any, tuple[Any, ...]] = weakref.WeakKeyDictionary()
_sqlite_managers: weakref.WeakSet[Any] = weakref.WeakSet()


def install() -> None:
    global _installed
    with _lock:
        if _installed:
            return
        event.listen(Engine, "handle_error", _redact_parameters)
        event.listen(Engine, "before_cursor_execute", _prefetch_for_async)
        event.listen(Engine, "begin", _prepare_sqlite_scopes)
        _installed = True


def watch_sqlite(manager: Any) -> None:
    """Prepare ``manager``'s scopes whenever a transaction begins on its SQLite engine."""
    if manager.keyring.data_engine.dialect.name == "sqlite":
        _sqlite_managers.add(manager)


def unwatch_sqlite(manager: Any) -> None:
    """Forget a manager the envelope replaced (``configure`` again)."""
    _sqlite_managers.discard(manager)


def _prepare_sqlite_scopes(conn: Any) -> None:
    if conn.dialect.name != "sqlite" or in_keyring_io():
        return
    for manager in list(_sqlite_managers):
        if manager.keyring.data_engine is conn.engine:
            # No keyring table yet (create_all is running), or the KMS is down: the
            # next transaction retries, and a statement that needs the key reports it.
            with contextlib.suppress(sa.exc.OperationalError, EnvelopeError), beginning(conn):
                manager.prepare_scopes()


def _redact_parameters(context: ExceptionContext) -> BaseException | None:
    original = context.original_exception
    statement_error = context.sqlalchemy_exception
    # Before the statement runs (no execution context yet), its parameters are
    # the caller's values, not yet encrypted: whatever failed (our processor, a
    # RecursionError from a too deeply nested JSON value, a keyring query,
    # another column's processor, a missing parameter), they are hidden. Once
    # it has run, they are processed: ciphertext for encrypted columns.
    if isinstance(statement_error, sa.exc.StatementError) and (
        isinstance(original, EnvelopeError) or context.execution_context is None
    ):
        statement_error.params = None
        statement_error.hide_parameters = True
    return copy.copy(original) if isinstance(original, EnvelopeError) else None


def _prefetch_for_async(
    conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool
) -> None:
    if not _runtime.in_greenlet() or context is None or context.compiled is None:
        return
    compiled = context.compiled
    readers = _readers.get(compiled)
    if readers is None:
        readers = _readers[compiled] = _crypters_read_by(compiled)
    for crypter in readers:
        crypter.prefetch()


def _crypters_read_by(compiled: Any) -> tuple[Any, ...]:
    from .column import Encrypted

    found = {}
    for entry in getattr(compiled, "_result_columns", ()) or ():
        type_ = entry[3]
        if isinstance(type_, Encrypted):
            try:
                crypter = type_.crypter()
            except EnvelopeError:
                continue
            found[id(crypter)] = crypter
    return tuple(found.values())
