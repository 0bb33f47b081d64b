"""Which columns of a table are encrypted, and how: from the models or from the values.

A batch job is given an ORM model, a ``Table`` or a table name. A model or a
table declared with ``Encrypted`` columns says everything itself. A name is
looked up in the envelope's metadata; failing that, the job works from the
database alone: the stored format is self-describing, so a binary column
whose values carry our header with ids of the keyring's keys is encrypted,
its scope is the scope of those keys and its mode is the header's algorithm
byte.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from .. import wire
from ..column import Encrypted
from ..crypter import ColumnCrypter
from ..errors import (
    ConfigurationError,
    DecryptionError,
    KeyDestroyedError,
    KeyNotFoundError,
    KmsError,
)
from ..keyring import DESTROYED
from .batches import primary_key

if TYPE_CHECKING:
    from ..envelope import Envelope

log = logging.getLogger("sqlalchemy_envelope")

SAMPLE_SIZE = 64
#: Values whose first byte tells whether plaintext sits beside ours (see :func:`_others`).
OTHERS_SAMPLE = 1000


@dataclass(frozen=True)
class Target:
    """A table as a batch job sees it: primary key and encrypted columns read as raw bytes."""

    name: str
    table: sa.Table
    pk: list[sa.Column[Any]]
    crypters: dict[str, ColumnCrypter]
    #: Columns declared ``Encrypted`` but still stored as plaintext (not converted yet).
    unconverted: list[str] = field(default_factory=list)

    @property
    def columns(self) -> list[sa.Column[Any]]:
        return [self.table.c[name] for name in self.crypters]


def resolve(
    envelope: Envelope,
    conn: Connection,
    table_or_model: Any,
    columns: Sequence[str] | None = None,
    *,
    schema: str | None = None,
    unconverted_ok: bool = False,
) -> Target:
    """The encrypted columns of ``table_or_model``: a model class, a ``Table`` or a table name.

    ``schema`` is the schema of a table given by name (a model or a ``Table``
    says its own). ``unconverted_ok``: a table whose declared encrypted columns are all still
    plaintext is a target (with no crypters, see ``Target.unconverted``),
    not an error.
    """
    declared = _declared_table(table_or_model)
    if declared is None and isinstance(table_or_model, str) and envelope.metadata is not None:
        key = table_or_model if schema is None else f"{schema}.{table_or_model}"
        declared = envelope.metadata.tables.get(key)
    name = declared.name if declared is not None else table_or_model
    if not isinstance(name, str) or not name:
        raise TypeError(
            "expected an ORM model class, a sqlalchemy Table or a table name, "
            f"not {type(table_or_model).__name__}"
        )
    if columns is not None and (
        isinstance(columns, str) or not all(isinstance(c, str) for c in columns)
    ):
        raise TypeError("columns must be a list of column names")
    if declared is not None:
        schema = declared.schema
    with conn.begin():
        reflected = sa.Table(name, sa.MetaData(), schema=schema, autoload_with=conn)
        types = _declared_types(declared)
        unconverted: list[str] = []
        if columns is not None:
            wanted = list(dict.fromkeys(columns))
        else:
            declared_names = list(types) or [c for (t, c) in envelope.columns if t == name]
            wanted = [c for c in declared_names if _stored_encrypted(reflected, name, c)]
            unconverted = [c for c in declared_names if c in reflected.c and c not in wanted]
        for column in wanted:
            if column not in reflected.c:
                raise ConfigurationError(f"table {name!r} has no column {column!r}")
            if not isinstance(reflected.c[column].type, sa.types._Binary):
                raise ConfigurationError(
                    f"{name}.{column} is not a binary column, so it is not encrypted"
                )
        samples = {c: _sample(conn, reflected, c) for c in wanted or _binary_columns(reflected)}
    key_scopes = {row.id: row.scope for row in envelope.keyring().rows()}
    if not wanted and unconverted and not unconverted_ok:
        raise ConfigurationError(
            f"table {name!r}: {', '.join(unconverted)} declared encrypted but still stored "
            "as plaintext; convert them with encrypt_column first"
        )
    if not wanted and not unconverted:
        # Nothing declared: find the encrypted columns from their values.
        if not samples:
            raise ConfigurationError(
                f"table {name!r} has no binary column, so none of its columns is encrypted "
                "(to encrypt one, see encrypt_column)"
            )
        ours = {c: _ours(envelope, name, c, s, key_scopes)[0] for c, s in samples.items()}
        wanted = [c for c, heads in ours.items() if heads]
        if not wanted and any(s.values for s in samples.values()):
            raise ConfigurationError(
                f"found no encrypted columns in table {name!r}; name them "
                "(columns=[...] in Python, --column NAME on the command line)"
            )
        if wanted:
            log.info(
                "table %r: found encrypted columns %s from their values", name, ", ".join(wanted)
            )
        else:  # no binary value at all (an empty table): nothing encrypted to work on
            log.info("table %r: no encrypted values yet", name)
    else:  # named or declared: the values tell only a named column's scope and mode
        ours = {
            c: _ours(envelope, name, c, samples[c], key_scopes)[0] for c in wanted if c not in types
        }
    crypters = {}
    for column in wanted:
        heads = ours.get(column, [])
        scope, deterministic = _mode(name, column, types, envelope, heads, key_scopes)
        crypters[column] = ColumnCrypter(
            envelope, name, column, scope=scope, deterministic=deterministic
        )
    pk = primary_key(reflected)
    raw = sa.Table(
        name,
        sa.MetaData(),
        *(sa.Column(c.name, c.type, primary_key=True) for c in pk),
        *(sa.Column(c, sa.LargeBinary) for c in crypters if c not in reflected.primary_key.c),
        schema=schema,
    )
    if set(crypters) & set(raw.primary_key.c.keys()):
        raise ConfigurationError(
            f"table {name!r}: an encrypted primary key cannot be paged through"
        )
    return Target(name, raw, list(raw.primary_key.columns), crypters, unconverted)


def _declared_table(obj: Any) -> sa.Table | None:
    if isinstance(obj, sa.Table):
        return obj
    if isinstance(obj, type):
        mapper: Any = sa.inspect(obj, raiseerr=False)
        table = getattr(mapper, "local_table", None)
        if isinstance(table, sa.Table):
            return table
    return None


def _declared_types(table: sa.Table | None) -> dict[str, Encrypted]:
    if table is None:
        return {}
    return {c.name: c.type for c in table.columns if isinstance(c.type, Encrypted)}


def _stored_encrypted(table: sa.Table, name: str, column: str) -> bool:
    if column not in table.c:
        log.warning("%s.%s is declared encrypted but the table has no such column", name, column)
        return False
    if not isinstance(table.c[column].type, sa.types._Binary):
        log.warning(
            "%s.%s is declared encrypted but stored as %s: not encrypted yet (see encrypt_column)",
            name, column, table.c[column].type,
        )  # fmt: skip
        return False
    return True


def _binary_columns(table: sa.Table) -> list[str]:
    return [
        c.name
        for c in table.columns
        if isinstance(c.type, sa.types._Binary) and c.name not in table.primary_key.c
    ]


@dataclass(frozen=True)
class Stored:
    """What a sample of a column's values tells: whether it holds any, whether they are
    ours, and, where some are, whether others are not (plaintext beside ciphertext)."""

    values: bool
    ours: bool
    scope: str | None = None
    deterministic: bool = False
    others: bool = False


def sample_column(
    conn: Connection, envelope: Envelope, table: sa.TableClause, column: str
) -> Stored:
    """Whether ``column`` holds values, and whether any are ours (see :func:`_ours`; the
    keyring table may not exist: then none are), with their scope and mode."""
    sample = _sample(conn, table, column)
    if not sample.values:
        return Stored(values=False, ours=False)
    keyring = envelope.table
    if not sa.inspect(conn).has_table(keyring.name, schema=keyring.schema):
        return Stored(values=True, ours=False)
    keys = conn.execute(sa.select(keyring.c.id, keyring.c.scope, keyring.c.state)).all()
    key_scopes = {key: scope for key, scope, _ in keys}
    shredded = frozenset(key for key, _, state in keys if state == DESTROYED)
    heads, unproven = _ours(envelope, table.name, column, sample, key_scopes, shredded)
    others = _others(conn, table, column)
    if not heads and not others:
        # Values under keys shredded since cannot be authenticated: taken as ours only in
        # a column of nothing else, so that an upload naming one chooses nothing.
        heads = unproven
    if not heads:
        return Stored(values=True, ours=False)
    scope, deterministic = _stored_mode(table.name, heads, key_scopes)
    return Stored(True, True, scope, deterministic, others=others)


_VERSION_BYTE = sa.literal(bytes([wire.VERSION]), sa.LargeBinary)


def _first_byte(col: sa.ColumnElement[Any]) -> sa.ColumnElement[Any]:
    # An empty value's is empty, not NULL (SQLite's substr of an empty blob).
    return sa.func.coalesce(sa.func.substr(col, 1, 1), sa.literal(b"", sa.LargeBinary))


def header_like(col: sa.ColumnElement[Any]) -> sa.ColumnElement[bool]:
    """SQL: whether a stored value begins like ours (a cheap filter before parsing)."""
    return _first_byte(col) == _VERSION_BYTE


def _others(conn: Connection, table: sa.TableClause, column: str) -> bool:
    """Whether, among the first values, one does not begin like ours, as encrypt_column
    tells them (one that does but fails to authenticate, damaged or foreign, is no
    plaintext it would convert). Bounded: plaintext written before the models declared
    the column ``Encrypted`` is most of it, and a finished column is read no further."""
    col = sa.column(column, sa.LargeBinary)
    # Only first bytes are read, in SQL as encrypt_column tells them (SQLite returns the
    # first character of a string or a number stored in a binary column as text): a
    # database that copies a limited subquery's rows (MariaDB) copies one byte each.
    firsts = sa.select(_first_byte(col).label("first")).select_from(table)
    first = firsts.where(col.is_not(None)).limit(OTHERS_SAMPLE).subquery().c.first
    other = sa.select(sa.literal(1)).select_from(first.table).where(first != _VERSION_BYTE)
    return conn.execute(other.limit(1)).first() is not None


@dataclass(frozen=True)
class _Sample:
    values: bool  # the column holds a value (not NULL)
    #: ``((algorithm, key id), value)`` of a few values that carry our header
    found: list[tuple[tuple[int, int], bytes]]


def _sample(conn: Connection, table: sa.TableClause, column: str) -> _Sample:
    """A few stored values carrying our header, wherever they are in the column: one
    encrypted value among plaintext ones (written by old code) still tells."""
    col = sa.column(column, sa.LargeBinary)
    present = sa.select(col).select_from(table).where(col.is_not(None))
    values = conn.execute(present.where(header_like(col)).limit(SAMPLE_SIZE)).scalars()
    found = [(h, bytes(v)) for v in values if (h := wire.parse_header(v)) is not None]
    return _Sample(bool(found) or conn.execute(present.limit(1)).first() is not None, found)


def _ours(
    envelope: Envelope,
    table: str,
    column: str,
    sample: _Sample,
    key_scopes: dict[int, str],
    shredded: frozenset[int] = frozenset(),
) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Headers of the sampled values that are ours (they authenticate as this column's
    under a key of the keyring, or one shredded since, so bytes forged to look like a
    header do not count), and apart, those naming a key of ``shredded``, which cannot
    be checked. Without a KMS configured, a header naming a key of the keyring is taken
    at its word, as when the KMS fails (with a warning)."""
    named = [h for h, _ in sample.found if h[1] in key_scopes]
    try:
        _ = envelope.kms
    except ConfigurationError:
        return named, []
    ours, unproven = [], []
    for head, value in sample.found:
        if head[1] in shredded:
            unproven.append(head)
            continue
        if head[1] not in key_scopes:
            continue
        try:
            if authentic(envelope, table, column, key_scopes[head[1]], value):
                ours.append(head)
        except KmsError as exc:
            log.warning(
                "%s.%s: the KMS could not check its values (%s); taking their headers "
                "at their word", table, column, exc,
            )  # fmt: skip
            return named, []
    return ours, unproven


def authentic(envelope: Envelope, table: str, column: str, scope: str, value: bytes) -> bool:
    """Whether ``value`` is ``table.column``'s ciphertext under a key of ``scope`` (or one
    shredded since, whose values are unreadable but ours): bytes whose header merely
    names a key do not count. A KMS failure propagates."""
    header = wire.parse_header(value)
    if header is None:
        return False
    crypter = ColumnCrypter(
        envelope, table, column, scope=scope, deterministic=header[0] == wire.DETERMINISTIC
    )
    try:
        crypter.decrypt(value)
    except KeyDestroyedError:
        return True
    except (DecryptionError, KeyNotFoundError):
        return False
    return True


def _mode(
    table: str,
    column: str,
    types: dict[str, Encrypted],
    envelope: Envelope,
    heads: list[tuple[int, int]],
    key_scopes: dict[int, str],
) -> tuple[str, bool]:
    declared = types.get(column)
    if declared is not None:
        return declared.scope or table, declared.deterministic
    scope, deterministic = _stored_mode(table, heads, key_scopes)
    return envelope.columns.get((table, column), scope), deterministic


def _stored_mode(
    table: str, heads: list[tuple[int, int]], key_scopes: dict[int, str]
) -> tuple[str, bool]:
    """The scope of most sampled values' keys and their most common algorithm."""
    ours = [h for h in heads if h[1] in key_scopes]
    algorithms = Counter(a for a, _ in ours)
    deterministic = bool(algorithms) and algorithms.most_common(1)[0][0] == wire.DETERMINISTIC
    scopes = Counter(key_scopes[k] for _, k in ours)
    return (scopes.most_common(1)[0][0] if scopes else table), deterministic
