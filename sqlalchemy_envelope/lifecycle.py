"""Key lifecycle: rotate, re-wrap, shred and list data keys.

Every event is logged at INFO on the ``sqlalchemy_envelope`` logger with the
scope and key ids, never key material.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import sqlalchemy as sa

from . import _runtime, wire
from ._dberrors import denied
from .errors import (
    ConfigurationError,
    KeyInUseError,
    KeyNotFoundError,
    KmsError,
    RewrapError,
)
from .keyring import ACTIVE, DESTROYED, RETIRED, KeyRow, Rewrapped
from .keys import DataKey, KeyManager
from .kms.base import KeyProvider, scope_context

if TYPE_CHECKING:
    from .envelope import Envelope

log = logging.getLogger("sqlalchemy_envelope")


@dataclass(frozen=True)
class KeyInfo:
    """A keyring entry as operators see it: never key material."""

    id: int
    scope: str
    state: str
    created_at: dt.datetime
    kms_key_id: str


def keys(envelope: Envelope, scope: str | None = None) -> list[KeyInfo]:
    return [
        KeyInfo(r.id, r.scope, r.state, r.created_at, r.kms_key_id)
        for r in envelope.keyring().rows(scope)
    ]


def rotate(envelope: Envelope, scope: str) -> int:
    if not isinstance(scope, str) or not scope:
        raise ValueError("scope must be a non-empty string")
    manager = envelope._keys()
    rows = manager.keyring.rows(scope)
    _refresh(manager.kms)
    _check_kms(manager, scope, rows)
    generated = manager.generate(scope)
    row, old = manager.keyring.replace_active(scope, generated.wrapped, generated.kms_key_id)
    envelope._forget(scope=scope)
    manager.cache.put(row.id, DataKey(row.id, scope, generated.plaintext))
    manager.stats.add("keys_created")
    retired = "its first key" if old is None else f"key {old} retired"
    log.info("rotated scope %r: key %d is active, %s", scope, row.id, retired)
    if not rows and scope not in manager.known_scopes():
        # A mistyped scope gets a key of its own while the intended one keeps its old key.
        others = sorted({r.scope for r in manager.keyring.rows()} - {scope})
        log.warning(
            "scope %r had no keys and no encrypted column of this envelope uses it: "
            "key %d is its first (scopes with keys: %s). If the name was mistyped, "
            "destroy key %d: no value uses it yet",
            scope, row.id, ", ".join(map(repr, others)) or "none", row.id,
        )  # fmt: skip
    return row.id


#: KMS failures worth retrying as they are (no answer about the key itself).
_TRANSIENT = frozenset(
    {
        None,  # unreachable, or a provider that broke its contract
        "ThrottlingException",
        "KMSInternalException",
        "DependencyTimeoutException",
        "KeyUnavailableException",
    }
)


def _check_kms(manager: KeyManager, scope: str, rows: list[KeyRow]) -> None:
    """Refuse a rotation that would leave the application unable to unwrap the new key.

    A KMS key other than the one that wrapped the current key (the scope's, or
    for a scope without one the keyring's newest) wraps the new key where the
    application may not unwrap it (another master key file, another CMK):
    refused when this KMS cannot unwrap the current key either, logged as a
    warning when it can (an alias moved to a new CMK that the application may
    use as well). When the KMS cannot tell which key it wraps under (an AWS
    role without kms:DescribeKey), the refusal or warning says so.
    """
    live = [r for r in rows if r.state in (ACTIVE, RETIRED)] or [
        r for r in manager.keyring.rows() if r.state in (ACTIVE, RETIRED)
    ]
    if not live:
        return
    current = live[-1]
    owned = _owns(manager.kms, current.kms_key_id)
    if owned is True:
        return
    try:
        manager.data_key(current.id)
    except KmsError as exc:
        if exc.code in _TRANSIENT:
            raise
        refusal = str(exc)
    else:
        if owned is False:
            log.warning(
                "rotating scope %r under another KMS key than data key %d's (%s): "
                "the application must be able to unwrap keys under both",
                scope, current.id, current.kms_key_id,
            )  # fmt: skip
        else:
            log.warning(
                "rotating scope %r: cannot tell whether this KMS wraps under %s, data key "
                "%d's CMK (%s), though it unwraps that key; grant kms:DescribeKey to tell. "
                "If it is another CMK, the application must be able to unwrap keys under both",
                scope, current.kms_key_id, current.id, owned,
            )  # fmt: skip
        return
    if owned is False:
        raise ConfigurationError(
            f"not rotating scope {scope!r}: this KMS cannot unwrap data key {current.id} "
            f"({refusal}), so the application, which can, might not unwrap a key made by "
            "this one. Use the application's KMS or master key; to move to another one, "
            "re-wrap every key first (envelope.rewrap / keys rewrap)"
        )
    if owned.code in _TRANSIENT:
        raise owned  # the KMS could not answer now: worth retrying as is
    raise ConfigurationError(
        f"not rotating scope {scope!r}: cannot tell which CMK this KMS names ({owned}), "
        f"nor unwrap data key {current.id} with it ({refusal}), so cannot check that it "
        f"is the application's ({current.kms_key_id}). Grant this role kms:DescribeKey "
        "on the CMK and rotate again"
    )


def _owns(kms: KeyProvider, kms_key_id: str) -> bool | KmsError:
    """Whether ``kms`` wraps under ``kms_key_id``, or the error that kept it from telling
    (an AWS role without kms:DescribeKey): then an unwrap decides. Not a counted KMS
    call: the providers answer from memory, AWS after one DescribeKey."""
    try:
        return bool(_runtime.offload(kms.owns, kms_key_id))
    except KmsError as exc:
        return exc
    except Exception as exc:  # a provider that broke its contract
        return KmsError(f"{kms!r} could not tell which key it wraps under: {type(exc).__name__}")


#: How often ``rewrap`` reads the keyring again for keys created while it ran (by
#: processes still on the old KMS) before it reports them as left behind.
_REWRAP_PASSES = 5
#: How many keys the KMS would not move a re-wrap error names (all are logged).
_LISTED = 10


def rewrap(
    envelope: Envelope,
    kms: KeyProvider,
    *,
    progress: Callable[[int, int | None], None] | None = None,
) -> int:
    """Re-wrap every live data key under ``kms``; resumable (keys already there are skipped).

    Each pass re-wraps every key to move, keeping only the new wrapped keys in
    memory, then stores them in one transaction, each by compare-and-set.
    Where the keys move through this process (between providers, regions or
    local master keys), that unwraps each key once under the current KMS and
    wraps it under ``kms``; a key it fails for (its wrapped form altered, its
    CMK gone, ``kms`` refusing) stops the re-wrap before the pass stores any
    key, as a keyring split between two master keys would lock out an
    application that holds only one. Within one AWS region (``ReEncrypt``,
    which needs no ``Decrypt`` permission) a process on either CMK can unwrap
    both, so a key that fails to move (throttling, an outage, a damaged row)
    does not stop the others. The keyring is read again after each pass, for keys created
    meanwhile. Returns how many keys moved; raises :class:`RewrapError` if any
    key is left elsewhere, and only once none is does the envelope switch to
    ``kms``.
    """
    if not isinstance(kms, KeyProvider):
        raise TypeError(
            f"kms must be a KMS provider such as AwsKms or LocalKms, not {type(kms).__name__}"
        )
    manager = envelope._keys()
    _refresh(kms)
    in_place = getattr(kms, "moves_in_place", None)
    all_or_none = not (callable(in_place) and in_place(manager.kms))
    failed: dict[int, tuple[KeyRow, KmsError]] = {}
    moved = done = 0
    for _ in range(_REWRAP_PASSES):
        left = _elsewhere(manager, kms)
        todo = [r for r in left if r.id not in failed]
        if not todo:
            break
        total = done + len(todo)
        rewrapped: list[tuple[KeyRow, Rewrapped]] = []
        for row in todo:
            try:
                rewrapped.append((row, _rewrapped(manager, kms, row)))
            except KmsError as exc:
                failed[row.id] = (row, exc)
                log.warning("re-wrap: data key %d of scope %r: %s", row.id, row.scope, exc)
            done += 1
            if progress is not None:
                progress(done, total)
        if failed and all_or_none:
            raise _incomplete(kms, moved, list(failed.values()), 0)
        moved += _store(manager, rewrapped)
    else:
        left = _elsewhere(manager, kms)
    stuck = [failed[r.id] for r in left if r.id in failed]
    if left:
        raise _incomplete(kms, moved, stuck, len(left) - len(stuck))
    envelope.configure(kms=kms, engine=manager.keyring.app_engine)
    log.info("re-wrap finished: %d data key(s) moved; the envelope now uses %r", moved, kms)
    return moved


def _refresh(kms: KeyProvider) -> None:
    """Before a lifecycle step that asks which CMK ``kms`` names: an alias may name
    another since the provider last asked (AwsKms.refresh; one DescribeKey)."""
    refresh = getattr(kms, "refresh", None)
    if callable(refresh):
        refresh()


def _elsewhere(manager: KeyManager, kms: KeyProvider) -> list[KeyRow]:
    """The live keys not under ``kms`` (``owns`` asked once per KMS key id)."""
    rows = manager.keyring.rows(states=(ACTIVE, RETIRED))
    owned = {k: manager.call_kms(kms.owns, k) for k in {r.kms_key_id for r in rows}}
    return [r for r in rows if r.wrapped_key is not None and not owned[r.kms_key_id]]


def _rewrapped(manager: KeyManager, kms: KeyProvider, row: KeyRow) -> Rewrapped:
    """``row``'s key wrapped under ``kms``, not yet stored (one KMS call)."""
    assert row.wrapped_key is not None
    wrapped, kms_key_id = manager.call_kms(
        kms.rewrap_from, manager.kms, row.wrapped_key, scope_context(row.scope), row.kms_key_id
    )
    return Rewrapped(row.id, wrapped, kms_key_id, expect=row.wrapped_key)


def _store(manager: KeyManager, rewrapped: list[tuple[KeyRow, Rewrapped]]) -> int:
    """Store a pass's re-wrapped keys in one transaction, so that a failure meanwhile leaves
    none stored either; how many were. A key whose row changed meanwhile is not (the next
    pass looks again)."""
    if not rewrapped:
        return 0
    stored = manager.keyring.set_wrapped([new for _, new in rewrapped])
    for (row, new), done in zip(rewrapped, stored, strict=True):
        if done:
            log.info(
                "re-wrapped data key %d of scope %r under %s", row.id, row.scope, new.kms_key_id
            )
    return sum(stored)


def _incomplete(
    kms: KeyProvider, moved: int, stuck: list[tuple[KeyRow, KmsError]], remaining: int
) -> RewrapError:
    text = f"re-wrap under {kms!r} incomplete: {moved} data key(s) moved"
    if stuck:
        named = "; ".join(
            f"key {row.id} of scope {row.scope!r} ({exc.code or 'no error code'})"
            for row, exc in stuck[:_LISTED]
        )
        more = f"; {len(stuck) - _LISTED} more in the log" if len(stuck) > _LISTED else ""
        text += (
            f", {len(stuck)} failed: {named}{more}. A failure that passes (throttling, an "
            "outage, a permission) needs only a rerun; a key the KMS cannot unwrap "
            "(InvalidCiphertextException: its wrapped key was altered) is lost unless a "
            "backup holds its keyring row intact: restore the row, or shred the key with "
            "`keys destroy ID --force` (envelope.destroy(ID, force=True))"
        )
    if remaining:
        text += (
            f", {remaining} created or changed while it ran still under another KMS key: "
            "give every process the new KMS first"
        )
    return RewrapError(
        f"{text}. The envelope keeps its KMS until every key is moved; run rewrap again "
        "to move what is left",
        moved=moved,
        failed=tuple((row.id, row.scope, exc.code) for row, exc in stuck),
        remaining=remaining,
    )


def destroy(envelope: Envelope, key_id: int, *, force: bool = False) -> None:
    if isinstance(key_id, bool) or not isinstance(key_id, int):
        raise TypeError("key_id must be an integer")
    keyring = envelope.keyring()
    row = keyring.get(key_id)
    if row is None:
        raise KeyNotFoundError(f"data key {key_id} is not in the keyring")
    if row.state == DESTROYED:
        log.info("data key %d of scope %r was already destroyed", key_id, row.scope)
        return
    if not force:
        found = usage(keyring.data_engine, key_id, declared_schemas(envelope))
        if found.counts:
            where = ", ".join(f"{t}.{c} ({n})" for (t, c), n in sorted(found.counts.items()))
            raise KeyInUseError(
                f"data key {key_id} of scope {row.scope!r} still encrypts values in {where}; "
                "run reencrypt on those tables first, or pass force=True to shred them too"
            )
        if found.unsearched:
            raise KeyInUseError(
                f"data key {key_id} of scope {row.scope!r}: this connection may not read "
                f"{', '.join(found.unsearched)}, where values could use it; search them "
                "with a role that may, or pass force=True if none can"
            )
    keyring.destroy(key_id)
    envelope._forget(key_id=key_id, scope=row.scope)
    log.info("destroyed data key %d of scope %r (forced=%s)", key_id, row.scope, force)


def declared_schemas(envelope: Envelope) -> set[str]:
    """The schemas of the tables in the envelope's MetaData (None, the default, aside)."""
    tables = envelope.metadata.tables.values() if envelope.metadata is not None else ()
    return {t.schema for t in tables if t.schema is not None}


class Usage(NamedTuple):
    #: ``(table, column) -> values`` whose header names the key
    counts: dict[tuple[str, str], int]
    #: ``table.column`` the connection may not read
    unsearched: list[str]


def usage(
    engine: sa.engine.Engine, key_id: int, schemas: set[str] | frozenset[str] = frozenset()
) -> Usage:
    """How many values in each binary column carry ``key_id`` in their header.

    Looks in the default schema, in ``schemas`` and, on PostgreSQL, in every
    schema of the database but the system's (on MySQL a schema is another
    database, so only those named). Keys are ``(table, column)``, the table
    qualified by its schema outside the default one. Columns the connection
    may not read (a privilege error) are listed apart; any other error stands.
    """
    key_bytes = key_id.to_bytes(4, "big")
    counts: dict[tuple[str, str], int] = {}
    with engine.connect() as conn:
        inspector = sa.inspect(conn)
        found: set[str | None] = {None, *schemas}
        if conn.dialect.name == "postgresql":
            found |= {
                s
                for s in inspector.get_schema_names()
                if not s.startswith("pg_") and s != "information_schema"
            }
        if inspector.default_schema_name in found:
            found.discard(inspector.default_schema_name)  # the same as None
        unsearched = []
        for schema in sorted(found, key=lambda s: s or ""):
            for table_name in inspector.get_table_names(schema=schema):
                where = table_name if schema is None else f"{schema}.{table_name}"
                columns = inspector.get_columns(table_name, schema=schema)
                if {c["name"] for c in columns} >= _KEYRING_COLUMNS:
                    continue  # a keyring: its wrapped keys are not values
                binary = [
                    c["name"]
                    for c in columns
                    if isinstance(c["type"], (sa.LargeBinary, sa.types._Binary))
                ]
                table = sa.table(
                    table_name, *(sa.column(c, sa.LargeBinary) for c in binary), schema=schema
                )
                for name in binary:
                    col = table.c[name]
                    stmt = sa.select(sa.func.count()).where(
                        sa.func.substr(col, 1, 1) == bytes([wire.VERSION]),
                        sa.func.substr(col, 3, 4) == key_bytes,
                    )
                    try:
                        with conn.begin_nested():
                            n = conn.execute(stmt).scalar_one()
                    except sa.exc.DBAPIError as exc:
                        if not denied(exc):
                            raise
                        unsearched.append(f"{where}.{name}")
                        continue
                    if n:
                        counts[(where, name)] = n
    return Usage(counts, unsearched)


_KEYRING_COLUMNS = frozenset({"scope", "state", "wrapped_key", "kms_key_id"})
