"""Whole arrays for psycopg, packed in PostgreSQL's binary format in one go.

A batch write sends three arrays of 1,000 values per statement. psycopg
adapts a list item by item (and as text, escaping every byte string), which
cost a batch job more than its cipher did; packing the array here is a few
C-level joins. The packed value goes out as one binary parameter of the
array's type, with the layout of PostgreSQL's ``array_recv``: dimensions,
a has-nulls flag, the element type, then each element's length and bytes.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Iterable, Sequence
from itertools import chain
from typing import Any, cast

from sqlalchemy.engine import Connection

_BYTEA, _INT8 = 17, 20
_HEAD = struct.Struct(">iiiii")  # dimensions (1), has nulls, element oid, length, lower bound (1)
_LENGTH = struct.Struct(">i").pack
_NULL = _LENGTH(-1)
_INT8_ITEM = struct.Struct(">iq").pack  # length 8, value


class PackedArray(bytes):
    """A one-dimensional array in PostgreSQL's binary format; ``oid`` is the array type's."""

    oid = 0


class ByteaArray(PackedArray):
    oid = 1001  # bytea[]

    @classmethod
    def of(cls, items: Sequence[bytes | None]) -> ByteaArray:
        """``items`` as ``bytea[]``."""
        if None in items:
            body = [_NULL if v is None else _LENGTH(len(v)) + v for v in items]
            return cls(_HEAD.pack(1, 1, _BYTEA, len(items), 1) + b"".join(body))
        present = cast("Sequence[bytes]", items)
        lengths = map(_LENGTH, map(len, present))
        return cls(
            _HEAD.pack(1, 0, _BYTEA, len(items), 1) + b"".join(_interleave(lengths, present))
        )


class Int8Array(PackedArray):
    oid = 1016  # bigint[]

    @classmethod
    def of(cls, items: Sequence[int]) -> Int8Array:
        """``items`` as ``bigint[]`` (no NULLs)."""
        body: Iterable[bytes] = (_INT8_ITEM(8, i) for i in items)
        return cls(_HEAD.pack(1, 0, _INT8, len(items), 1) + b"".join(body))


def _interleave(a: Iterable[bytes], b: Iterable[bytes]) -> Iterable[bytes]:
    return chain.from_iterable(zip(a, b, strict=True))


def enable(conn: Connection) -> None:
    """Let this (psycopg) connection send :class:`PackedArray` values as they are."""
    adapters = conn.connection.dbapi_connection.adapters  # type: ignore[union-attr]
    dumper = _dumper()
    for cls in (ByteaArray, Int8Array):
        # Idempotent and cheap (a dict entry): once per batch beats tracking connections.
        adapters.register_dumper(cls, dumper)


@functools.cache
def _dumper() -> type[Any]:
    from psycopg.adapt import Dumper
    from psycopg.pq import Format

    class PackedDumper(Dumper):
        format = Format.BINARY

        def __init__(self, cls: type[PackedArray], context: Any = None) -> None:
            super().__init__(cls, context)
            self.oid = cls.oid

        def dump(self, obj: PackedArray) -> bytes:
            return obj

    return PackedDumper
