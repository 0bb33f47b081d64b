"""Writing a batch back: its rows locked in key order, then a compare-and-set per value.

A batch job reads a page without locking it, computes the new values, and
writes them in the same transaction. Two rules make that safe beside the
application's own writers:

* :class:`RowLocks` locks every row the batch is about to write, in
  primary-key order, in one statement (``SELECT ... ORDER BY pk FOR NO KEY
  UPDATE``; ``FOR UPDATE`` on MySQL), before any write. A writer that takes
  its rows in key order too may wait for a batch but cannot deadlock with
  it, whatever order the writes then visit rows in (a set-based ``UPDATE``
  follows its join; a job with several columns writes them one after
  another). SQLite locks the whole database and needs no row locks.
* :class:`BatchWrite` writes each value only where the row still holds what
  the batch read (a compare-and-set), so a value the application changed
  between the read and the lock is kept and counted, never overwritten.

On PostgreSQL through psycopg, with a single-column key and a binary target,
a column's batch is one statement, ``UPDATE t SET c = v.new FROM
unnest(:keys, :olds, :news) AS v ...``, with the byte arrays sent in
psycopg's binary format: escaping them as text cost more than the cipher.
Elsewhere it is an executemany of one ``UPDATE`` per row.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Dialect
from sqlalchemy.sql.elements import ColumnElement

from . import pg_arrays
from .batches import Key


def _set_based(dialect: Dialect, pk: Sequence[sa.Column[Any]]) -> bool:
    return dialect.name == "postgresql" and dialect.driver == "psycopg" and len(pk) == 1


class _Arrays:
    """A batch's key array (and byte arrays), sent to PostgreSQL as packed binary arrays."""

    def __init__(self, key: sa.Column[Any]) -> None:
        self.key = key
        # Plain integer keys go packed; others (strings, UUIDs, decorated types)
        # through their SQLAlchemy type, which may need to process each one.
        self.int_keys = isinstance(key.type, sa.Integer)

    def keys(self, name: str) -> ColumnElement[Any]:
        return self._array(name, self.key.type, packed=self.int_keys)

    def bytes(self, name: str) -> ColumnElement[Any]:
        return self._array(name, sa.LargeBinary(), packed=True)

    @staticmethod
    def _array(name: str, item: sa.types.TypeEngine[Any], packed: bool) -> ColumnElement[Any]:
        """``CAST(:name AS item[])``: whatever array type is sent, the server sees this one."""
        from sqlalchemy.dialects import postgresql

        bind = sa.bindparam(name, type_=sa.types.NullType() if packed else postgresql.ARRAY(item))
        return sa.cast(bind, postgresql.ARRAY(item))

    def key_params(self, conn: Connection, keys: Sequence[Key]) -> dict[str, Any]:
        pg_arrays.enable(conn)
        ids = [k[0] for k in keys]
        return {
            "_env_keys": pg_arrays.Int8Array.of(ids) if self.int_keys else ids,
            "_env_first": ids[0],
            "_env_last": ids[-1],
        }


class BatchWrite:
    """Writes one batch of new values into ``column``, each row's write a compare-and-set.

    Row ``i`` gets ``column = news[i]`` where its key is ``keys[i]``, ``guard
    = olds[i]`` (when a ``guard`` column is given) and every clause of
    ``where`` holds; a call returns the number of rows written, so a row
    changed since the batch read it is neither overwritten nor counted.
    The rows should be locked already (``walk(..., lock=True)`` does).
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
        self.set_based = _set_based(dialect, pk) and _binary(column.type)
        if not self.set_based:
            update = table.update().where(*where)
            if guard is not None:
                update = update.where(guard == sa.bindparam("_env_old", type_=guard.type))
            self.each = update.where(
                *(c == sa.bindparam(f"_env_k{i}", type_=c.type) for i, c in enumerate(self.pk))
            ).values({column: sa.bindparam("_env_new", type_=new_type)})
            return
        # The new values go out processed by new_type (encrypted, for encrypt_column),
        # except plain bytes, which need nothing (LargeBinary would wrap each one).
        plain = isinstance(new_type, sa.types._Binary)
        self.process = None if plain else new_type._cached_bind_processor(dialect)
        key = self.pk[0]
        self.arrays = _Arrays(key)
        arrays = [self.arrays.keys("_env_keys")]
        names = [sa.column("_env_key", key.type)]
        if guard is not None:
            arrays.append(self.arrays.bytes("_env_olds"))
            names.append(sa.column("_env_old", sa.LargeBinary()))
        arrays.append(self.arrays.bytes("_env_news"))
        names.append(sa.column("_env_new", sa.LargeBinary()))
        v = sa.func.unnest(*arrays).table_valued(*names).render_derived(name="_env_v")
        # The batch's key bounds show the planner an index range: without them
        # it sees no cheaper plan for 1,000 keys than a hash join over the table.
        stmt = table.update().where(
            *where,
            key >= sa.bindparam("_env_first", type_=key.type),
            key <= sa.bindparam("_env_last", type_=key.type),
            key == v.c._env_key,
        )
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
        if self.process is not None:
            news = list(map(self.process, news))
        params = self.arrays.key_params(conn, keys)
        params["_env_news"] = pg_arrays.ByteaArray.of(news)
        if olds is not None:
            params["_env_olds"] = pg_arrays.ByteaArray.of(olds)
        return int(conn.execute(self.whole, params).rowcount)


def _binary(type_: sa.types.TypeEngine[Any]) -> bool:
    """Whether a column is stored as bytes (``BYTEA`` on PostgreSQL)."""
    while isinstance(type_, sa.types.TypeDecorator):
        type_ = type_.impl_instance
    return isinstance(type_, sa.types._Binary)
