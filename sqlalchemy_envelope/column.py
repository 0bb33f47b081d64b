"""``Encrypted``: the column type. It casts, hands over, and stays out of the way.

The type learns its table and column when SQLAlchemy attaches it to a column
(like ``Enum`` does), because the associated data and the sub-key of every
value are bound to those names. Its bind and result processors are closures
over a :class:`~sqlalchemy_envelope.crypter.ColumnCrypter` and a codec, built
once per dialect; per value they do a dict lookup, one clock read and one
AEAD call.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator

from . import wire
from .cache import clock
from .codecs import codec_for
from .comparator import EncryptedComparator
from .crypter import ColumnCrypter
from .errors import ConfigurationError, DecryptionError, ValueTypeError, where

if TYPE_CHECKING:
    from .envelope import Envelope

_BAD_VALUE = (TypeError, ValueError, AttributeError, LookupError, ArithmeticError)

#: Drivers that bind ``bytes`` as a binary parameter as is. For them the bind
#: processor skips ``LargeBinary``'s own, which wraps each value in
#: ``dbapi.Binary``: the same bytes are stored, and the wrapper cost about 2 µs
#: per value on sqlite3 and psycopg, more than the cipher (docs/PERFORMANCE.md).
_NATIVE_BYTES_DRIVERS = frozenset(
    {"pysqlite", "aiosqlite", "psycopg", "asyncpg", "pymysql", "mysqldb", "aiomysql", "asyncmy"}
)
#: Drivers over sqlite3, which binds an exact ``bytearray`` directly but sends
#: ``bytes`` through its adapter lookup first: 0.5 µs or more per value written is
#: saved by handing it the stored value as a ``bytearray`` (docs/PERFORMANCE.md).
_BYTEARRAY_DRIVERS = frozenset({"pysqlite", "aiosqlite"})


@dataclass(eq=False)
class _Binding:
    """The column a type instance serves (shared by SQLAlchemy's per-dialect copies)."""

    owner: Encrypted
    column: sa.Column[Any] | None = None
    table: str | None = None
    name: str | None = None
    crypters: dict[int, ColumnCrypter] = field(default_factory=dict)


class Encrypted(TypeDecorator[Any]):
    """An encrypted column: ``Encrypted(sa.String(200), envelope)``.

    ``deterministic=True`` makes equal plaintexts encrypt equally (per column
    and data key) so ``==``, ``in_`` and unique constraints work; it reveals
    which rows share a value. ``scope`` names the key scope (default: the
    table's name).
    """

    impl = sa.LargeBinary
    cache_ok = True
    comparator_factory = EncryptedComparator

    def __init__(
        self,
        inner_type: sa.types.TypeEngine[Any] | type[sa.types.TypeEngine[Any]],
        envelope: Envelope | None = None,
        *,
        deterministic: bool = False,
        scope: str | None = None,
    ) -> None:
        from .envelope import Envelope

        if isinstance(inner_type, type) and issubclass(inner_type, sa.types.TypeEngine):
            inner_type = inner_type()
        if not isinstance(inner_type, sa.types.TypeEngine):
            raise TypeError(f"Encrypted() needs a SQLAlchemy type, not {type(inner_type).__name__}")
        if isinstance(inner_type, Encrypted):
            raise TypeError("Encrypted() cannot wrap another Encrypted type")
        codec_for(inner_type)  # TypeError now, at declaration, for unsupported types
        if envelope is not None and not isinstance(envelope, Envelope):
            raise TypeError(f"envelope must be an Envelope, not {type(envelope).__name__}")
        if not isinstance(deterministic, bool):
            raise TypeError("deterministic must be True or False")
        if scope is not None and not (isinstance(scope, str) and 0 < len(scope) <= 255):
            raise ValueError("scope must be a non-empty string of at most 255 characters")
        super().__init__()
        self.inner_type = inner_type
        self.envelope = envelope
        self.deterministic = deterministic
        self.scope = scope
        self._binding = _Binding(self)

    def __repr__(self) -> str:
        args = [repr(self.inner_type)]
        if self.deterministic:
            args.append("deterministic=True")
        if self.scope is not None:
            args.append(f"scope={self.scope!r}")
        return f"Encrypted({', '.join(args)})"

    @property
    def _static_cache_key(self) -> Any:
        b = self._binding
        return (
            Encrypted,
            self.inner_type._static_cache_key,
            id(self.envelope),
            self.deterministic,
            self.scope,
            b.table,
            b.name,
        )

    @property
    def python_type(self) -> type[Any]:
        return self.inner_type.python_type

    def load_dialect_impl(self, dialect: Dialect) -> sa.types.TypeEngine[Any]:
        if dialect.name in ("mysql", "mariadb"):
            from sqlalchemy.dialects import mysql

            # A unique index on MySQL needs a bounded VARBINARY; other values may be long.
            length = getattr(self.inner_type, "length", None)
            if self.deterministic and isinstance(length, int):
                return dialect.type_descriptor(
                    sa.VARBINARY(4 * length + wire.OVERHEAD[wire.DETERMINISTIC])
                )
            return dialect.type_descriptor(mysql.LONGBLOB())
        return dialect.type_descriptor(sa.LargeBinary())

    # -- learning the column ---------------------------------------------------------
    def _set_parent(self, parent: Any, outer: bool = False, **kw: Any) -> None:
        # The inner type is deliberately not attached: an Enum's CREATE TYPE or a
        # Boolean's CHECK constraint must not land on the binary column.
        if not isinstance(parent, sa.Column):
            return
        binding = self._binding
        if binding.column is None or binding.column is parent:
            if binding.owner is not self:  # a copy made by Column._copy()
                binding = self._binding = _Binding(self)
            binding.column = parent
            parent._on_table_attach(self._attach_table)
            return
        if binding.owner is self:
            # One instance declared on two columns (a shared type object or a
            # type_annotation_map entry): give this column its own copy.
            twin = self.copy()
            twin._binding = _Binding(twin)
            parent.type = twin
            twin._set_parent(parent)
        else:
            self._binding = _Binding(self)
            self._set_parent(parent)

    def _attach_table(self, column: sa.Column[Any], table: sa.Table) -> None:
        self._binding.table = table.name
        self._binding.name = column.name
        if self.envelope is not None:
            self.envelope.columns[(table.name, column.name)] = self.scope or table.name

    def for_column(self, table: str, column: str, envelope: Envelope | None = None) -> Encrypted:
        """A copy of this type bound to ``table.column`` (for migrations and tools)."""
        twin = self.copy()
        if envelope is not None:
            twin.envelope = envelope
        twin._binding = _Binding(twin, table=table, name=column)
        return twin

    def bound_name(self) -> str:
        return f"{self._binding.table}_{self._binding.name}"

    def crypter(self) -> ColumnCrypter:
        """The column's crypter; ConfigurationError if the type cannot encrypt yet."""
        b = self._binding
        envelope = self.envelope
        if b.table is None or b.name is None:
            raise ConfigurationError(
                f"{self!r} is not attached to a table column; declare it on a Column of a Table"
            )
        if envelope is None:
            raise ConfigurationError(
                f"{b.table}.{b.name}: Encrypted() has no envelope; pass it, "
                "as in Encrypted(sa.String(200), envelope)"
            )
        crypter = b.crypters.get(id(envelope))
        if crypter is None:
            crypter = b.crypters[id(envelope)] = ColumnCrypter(
                envelope, b.table, b.name, scope=self.scope, deterministic=self.deterministic
            )
        return crypter

    # -- the hot path ----------------------------------------------------------------
    def bind_processor(self, dialect: Dialect) -> Callable[[Any], Any]:
        crypter = self.crypter()
        codec = codec_for(self.inner_type, dialect)
        encode, expects, stats = codec.encode, codec.expects, crypter.envelope.stats
        location = crypter.where()
        join = bytearray().join if dialect.driver in _BYTEARRAY_DRIVERS else b"".join

        def process(value: Any) -> Any:
            if value is None:
                return None
            try:
                data = encode(value)
            except _BAD_VALUE:
                data = None
            if data is None:
                # Raised outside the except block: the codec's error (which may quote
                # the value, as Enum's does) must not ride along as __context__.
                raise ValueTypeError(
                    f"{location}: expected {expects}, got a value of type {type(value).__name__}"
                )
            cipher = crypter.active
            if cipher is None or cipher.expires <= clock():
                cipher = crypter.for_writing()
            else:
                stats.cache_hits += 1
            return join((cipher.head, cipher.seal(data)))

        if dialect.driver in _NATIVE_BYTES_DRIVERS:
            return process
        return self._then(process, self.impl_instance.bind_processor(dialect), first=True)

    def batch_bind_processor(self, dialect: Dialect) -> Callable[[Sequence[Any]], list[Any]]:
        """:meth:`bind_processor` for a list of values at once (the batch jobs' writes).

        One active cipher for the batch, and its nonces drawn in one call
        (``Cipher.seal_all``): what a per-value system call costs adds up
        over a million rows. Same values, same errors.
        """
        one = self.bind_processor(dialect)
        if dialect.driver not in _NATIVE_BYTES_DRIVERS:
            return lambda values: [one(v) for v in values]
        crypter = self.crypter()
        encode, stats = codec_for(self.inner_type, dialect).encode, crypter.envelope.stats

        def process_all(values: Sequence[Any]) -> list[Any]:
            present = [v for v in values if v is not None]
            if not present:  # as the per-value path: no key is needed for NULLs
                return list(values)
            try:
                data: list[bytes] | None = [encode(v) for v in present]
            except _BAD_VALUE:
                data = None
            if data is None:  # outside the handler: no codec message as __context__
                return [one(v) for v in values]  # raises the bad value's error
            cipher = crypter.active
            if cipher is None or cipher.expires <= clock():
                cipher = crypter.for_writing()  # the key cache counts this one
                stats.cache_hits += len(data) - 1
            else:
                stats.cache_hits += len(data)
            sealed = cipher.seal_all(cipher.head, data)
            if len(present) == len(values):
                return sealed
            it = iter(sealed)
            return [None if v is None else next(it) for v in values]

        return process_all

    def result_processor(self, dialect: Dialect, coltype: Any) -> Callable[[Any], Any]:
        crypter = self.crypter()
        decode = codec_for(self.inner_type, dialect).decode
        ciphers, for_reading, stats = crypter.ciphers, crypter.for_reading, crypter.envelope.stats
        head_size = wire.HEADER_BYTES

        def process(value: Any) -> Any:
            if value is None:
                return None
            try:
                cipher = ciphers.get(value[:head_size])
            except TypeError:  # not bytes at all (SQLite stores any type): for_reading refuses it
                cipher = None
            if cipher is None or cipher.expires <= clock():
                cipher = for_reading(value)
            else:
                stats.cache_hits += 1
            try:
                return decode(cipher.open(value))
            except Exception:  # noqa: S110 - AuthenticationFailed, or authentic yet not of this type:
                pass  # raised below, outside the handler, so no decoder message (it may quote
                # the plaintext) rides along as __context__
            raise DecryptionError(
                f"{crypter.where(cipher.key_id)}: the stored value did not authenticate "
                "(tampered, truncated, moved from another column, or foreign)"
            )

        return self._then(
            process, self.impl_instance.result_processor(dialect, coltype), first=False
        )

    @staticmethod
    def _then(
        ours: Callable[[Any], Any], impl: Callable[[Any], Any] | None, *, first: bool
    ) -> Callable[[Any], Any]:
        if impl is None:
            return ours
        if first:
            return lambda value: impl(ours(value))
        return lambda value: ours(impl(value))

    def literal_processor(self, dialect: Dialect) -> Callable[[Any], str]:
        # Refused here, before a value is seen: SQLAlchemy quotes the value in the
        # CompileError it raises when the processor it returns fails.
        raise ConfigurationError(
            f"{where(self._binding.table, self._binding.name)}: encrypted values cannot be "
            "rendered as SQL literals "
            "(literal_binds or offline migrations); bind them as parameters"
        )

    def process_bind_param(self, value: Any, dialect: Dialect) -> Any:
        return self.bind_processor(dialect)(value)

    def process_result_value(self, value: Any, dialect: Dialect) -> Any:
        return self.result_processor(dialect, None)(value)

    # -- deterministic lookups -------------------------------------------------------
    def lookup_ciphertexts(self, values: tuple[Any, ...]) -> list[bytes | None]:
        """Every stored form of ``values`` under the scope's readable keys (at execution);
        a None stays NULL, so ``IN`` / ``NOT IN`` treat it as SQL does."""
        crypter = self.crypter()
        codec = codec_for(self.inner_type)
        try:
            plaintexts: list[bytes] | None = [codec.encode(v) for v in values if v is not None]
        except _BAD_VALUE:
            plaintexts = None
        if plaintexts is None:  # outside the except block: no __context__ quoting the value
            raise ValueTypeError(f"{crypter.where()}: expected {codec.expects} in the comparison")
        nulls: list[bytes | None] = [None] if any(v is None for v in values) else []
        return [c.head + c.seal(p) for c in crypter.for_lookup() for p in plaintexts] + nulls
