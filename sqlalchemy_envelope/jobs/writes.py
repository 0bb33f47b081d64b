"""Writing a batch back: a compare-and-set per value, in one statement where it can be.

A batch job reads a page (locking its rows, see
:func:`sqlalchemy_envelope.jobs.pages.walk`), computes the new values, and
writes them in the same transaction. :class:`BatchWrite` writes each value
only where the row still holds what the batch read, so a value changed in
between is kept and counted, never overwritten (defence in depth: the read
already locked the rows).

On PostgreSQL through psycopg, with a single-column key and a binary target,
a column's batch is one statement, ``UPDATE t SET c = v.new FROM
unnest(:keys, :olds, :news) AS v(key, old, new) WHERE t.pk = v.key AND t.c
= v.old``, with the arrays packed in PostgreSQL's binary format
(:mod:`~sqlalchemy_envelope.jobs.pg_arrays`). Its join visits rows in the
plan's order, not in key order: that is safe because the read already holds
every row's lock. Elsewhere the batch is an executemany of one ``UPDATE`` per
row.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Dialect
from sqlalchemy.sql.elements import ColumnElement

from ..column import Encrypted
from . import pg_arrays
from .batches import Key

#: A set-based write sends at most about this many bytes of values in one
#: statement (PostgreSQL refuses a message over 1 GB); a batch of large values
#: is written in several.
MAX_STATEMENT_BYTES = 64 << 20


class BatchWrite:
    """Writes one batch of new values into ``column``, each row's write a compare-and-set.

    Row ``i`` gets ``column = news[i]`` where its key is ``keys[i]``, ``guard
    = olds[i]`` (when a ``guard`` column is given) and every clause of
    ``where`` holds; a call returns the number of rows written, so a row
    changed since the batch read it is neither overwritten nor counted.
    The rows should be locked already (``walk(..., lock=True)`` locks them).
    """

    def __init__(
        self,
        dialect: Dialect,
        table: sa.Table,
        pk: Sequence[sa.Column[Any]],
        column: sa.Column[Any],
        new_type: sa.types.TypeEngine[Any],
        *,
        guard: sa.Column[Any] | None = None,
        where: Sequence[ColumnElement[bool]] = (),
    ) -> None:
        self.pk, self.guard = list(pk), guard
        key_type = _array_key_type(dialect, pk)
        self.set_based = key_type is not None and _binary(column.type)
        if key_type is None or not self.set_based:
            update = table.update().where(*where)
            if guard is not None:
                update = update.where(guard == sa.bindparam("_env_old", type_=guard.type))
            self.each = update.where(
                *(c == sa.bindparam(f"_env_k{i}", type_=c.type) for i, c in enumerate(self.pk))
            ).values({column: sa.bindparam("_env_new", type_=new_type)})
            return
        # The new values go out processed by new_type (encrypted, for encrypt_column),
        # except plain bytes, which need nothing (LargeBinary would wrap each one).
        self.process: Callable[[list[Any]], list[Any]] | None = None
        if isinstance(new_type, Encrypted):
            self.process = new_type.batch_bind_processor(dialect)
        elif not isinstance(new_type, sa.types._Binary):
            one = new_type._cached_bind_processor(dialect)
            if one is not None:
                self.process = lambda values: list(map(one, values))
        key = self.pk[0]
        self.int_keys = isinstance(key.type, sa.Integer)  # packed too; others go as a list
        # Integers and UUIDs sort in Python as in the database; strings sort by the
        # column's collation, which Python cannot know (a range bounded by Python's
        # min and max skipped keys): for them, an index probe per key instead.
        self.ranged = isinstance(key.type, (sa.Integer, sa.Uuid))
        arrays = [_array("_env_keys", key_type, packed=self.int_keys)]
        names = [sa.column("_env_key", key.type)]
        if guard is not None:
            arrays.append(_array("_env_olds", sa.LargeBinary(), packed=True))
            names.append(sa.column("_env_old", sa.LargeBinary()))
        arrays.append(_array("_env_news", sa.LargeBinary(), packed=True))
        names.append(sa.column("_env_new", sa.LargeBinary()))
        v = sa.func.unnest(*arrays).table_valued(*names).render_derived(name="_env_v")
        # The batch's key bounds show the planner an index range: without them
        # it sees no cheaper plan for 1,000 keys than a hash join over the table.
        if self.ranged:
            bounds = [
                key >= sa.bindparam("_env_first", type_=key.type),
                key <= sa.bindparam("_env_last", type_=key.type),
            ]
        else:
            bounds = [key == sa.any_(_array("_env_keys", key_type, packed=False))]
        stmt = table.update().where(*where, *bounds, key == v.c._env_key)
        if guard is not None:
            stmt = stmt.where(guard == v.c._env_old)
        self.whole = stmt.values({column: v.c._env_new})

    def __call__(
        self, conn: Connection, keys: list[Key], news: list[Any], olds: list[Any] | None = None
    ) -> int:
        """Rows written; ``keys`` in primary-key order.

        The values (plaintext, for decrypt_column) are left out of errors.
        """
        if not keys:
            return 0
        if (olds is not None) != (self.guard is not None):
            raise ValueError("olds must be given exactly when the write has a guard column")
        try:
            if self.set_based:
                return self._whole(conn, keys, news, olds)
            rows = [
                {**{f"_env_k{i}": v for i, v in enumerate(k)}, "_env_new": new}
                for k, new in zip(keys, news, strict=True)
            ]
            if olds is not None:
                for row, old in zip(rows, olds, strict=True):
                    row["_env_old"] = old
            if conn.dialect.supports_sane_multi_rowcount:
                return int(conn.execute(self.each, rows).rowcount)
            return sum(int(conn.execute(self.each, r).rowcount) for r in rows)
        except sa.exc.StatementError as exc:
            exc.params = None
            exc.hide_parameters = True
            raise

    def _whole(
        self, conn: Connection, keys: list[Key], news: list[Any], olds: list[Any] | None
    ) -> int:
        pg_arrays.enable(conn)
        ids = [k[0] for k in keys]
        if self.process is not None:
            news = self.process(news)
        return self._send(conn, ids, news, olds)

    def _send(
        self, conn: Connection, ids: list[Any], news: list[Any], olds: list[Any] | None
    ) -> int:
        """One statement, or halves of it while its values pass :data:`MAX_STATEMENT_BYTES`."""
        size = sum(len(v) for v in news if v is not None)
        size += sum(len(v) for v in olds if v is not None) if olds is not None else 0
        if size > MAX_STATEMENT_BYTES and len(ids) > 1:
            h = len(ids) // 2
            return self._send(conn, ids[:h], news[:h], olds and olds[:h]) + self._send(
                conn, ids[h:], news[h:], olds and olds[h:]
            )
        params: dict[str, Any] = {
            "_env_keys": pg_arrays.Int8Array.of(ids) if self.int_keys else ids,
            "_env_news": pg_arrays.ByteaArray.of(news),
        }
        if self.ranged:
            # Not ids[0] and ids[-1]: a key changed while the read waited for its
            # row lock comes back in its old place.
            params["_env_first"], params["_env_last"] = min(ids), max(ids)
        if olds is not None:
            params["_env_olds"] = pg_arrays.ByteaArray.of(olds)
        return int(conn.execute(self.whole, params).rowcount)


def _array_key_type(dialect: Dialect, pk: Sequence[sa.Column[Any]]) -> Any:
    """The element type of the key array, or None where a batch is written row by row.

    The set-based write needs psycopg and a single-column key of a type whose
    array cast cannot change a value: integers, UUIDs, and strings cast
    without the model's length (an explicit cast to ``VARCHAR(n)`` truncates).
    """
    if dialect.name != "postgresql" or dialect.driver != "psycopg" or len(pk) != 1:
        return None
    key_type = pk[0].type
    if isinstance(key_type, (sa.Integer, sa.Uuid)):
        return key_type
    if isinstance(key_type, sa.String) and not isinstance(key_type, sa.Enum):
        return sa.String()
    return None


def _array(name: str, item: sa.types.TypeEngine[Any], packed: bool) -> ColumnElement[Any]:
    """``CAST(:name AS item[])``: whatever array type is sent, the server sees this one.

    A ``packed`` value (a :class:`~.pg_arrays.PackedArray`) is passed on as it is.
    """
    from sqlalchemy.dialects import postgresql

    bind = sa.bindparam(name, type_=sa.types.NullType() if packed else postgresql.ARRAY(item))
    return sa.cast(bind, postgresql.ARRAY(item))


def _binary(type_: sa.types.TypeEngine[Any]) -> bool:
    """Whether a column is stored as bytes (``BYTEA`` on PostgreSQL)."""
    while isinstance(type_, sa.types.TypeDecorator):
        type_ = type_.impl_instance
    return isinstance(type_, sa.types._Binary)
