"""Exact, typed conversions between an inner type's Python values and bytes.

The cipher encrypts bytes; a codec turns the Python value of the column's
inner type into bytes and back, losing nothing: a Decimal keeps its digits, a
timezone-aware datetime its offset, JSON its structure. Codecs check the
value's type, since the database can no longer do it for an encrypted column.
"""

from __future__ import annotations

import datetime as dt
import json
import numbers
import operator
import struct
import uuid
from collections.abc import Callable
from decimal import Decimal
from typing import Any, NamedTuple

import sqlalchemy as sa
from sqlalchemy.engine import Dialect

Encode = Callable[[Any], bytes]
Decode = Callable[[bytes], Any]


class Codec(NamedTuple):
    encode: Encode
    decode: Decode
    expects: str  # what a value must be, for error messages


SUPPORTED = (
    "String, Text, Unicode, UnicodeText, LargeBinary, Integer, BigInteger, SmallInteger, "
    "Numeric, Float, Boolean, Date, DateTime, Time, Interval, JSON, Uuid, Enum, "
    "or a TypeDecorator over one of these"
)

_DOUBLE = struct.Struct(">d")
_INTERVAL = struct.Struct(">iII")
_TRUE, _FALSE = b"\x01", b"\x00"


def _check(kind: type | tuple[type, ...], name: str) -> Callable[[Any], Any]:
    def check(value: Any) -> Any:
        if not isinstance(value, kind):
            raise TypeError(name)
        return value

    return check


def _text() -> Codec:
    return Codec(str.encode, bytes.decode, "str")


def _binary() -> Codec:
    is_bytes = _check((bytes, bytearray, memoryview), "bytes")
    return Codec(lambda v: bytes(is_bytes(v)), bytes, "bytes")


def _integer() -> Codec:
    return Codec(lambda v: b"%d" % operator.index(v), int, "int")


def _numeric(asdecimal: bool) -> Codec:
    def encode(value: Any) -> bytes:
        if isinstance(value, bool):
            raise TypeError
        if isinstance(value, numbers.Integral):  # int, numpy's integers
            value = operator.index(value)
        elif isinstance(value, numbers.Real) and not isinstance(value, numbers.Rational):
            value = Decimal(repr(float(value)))  # float, numpy's floats (their repr names them)
        elif not isinstance(value, Decimal):
            raise TypeError
        return str(value).encode()

    if asdecimal:
        return Codec(encode, lambda b: Decimal(b.decode()), "Decimal")
    return Codec(encode, lambda b: float(b.decode()), "float or Decimal")


def _float(asdecimal: bool) -> Codec:
    if asdecimal:
        return _numeric(True)

    def encode(value: Any) -> bytes:
        if not isinstance(value, (numbers.Real, Decimal)) or isinstance(value, bool):
            raise TypeError  # float, int, Decimal and numpy's numbers go
        return _DOUBLE.pack(float(value))

    return Codec(encode, lambda b: _DOUBLE.unpack(b)[0], "float")


def _boolean() -> Codec:
    def encode(value: Any) -> bytes:
        if value is True or value is False or (type(value) is int and value in (0, 1)):
            return _TRUE if value else _FALSE
        raise TypeError

    def decode(raw: bytes) -> bool:
        if raw == _TRUE:
            return True
        if raw == _FALSE:
            return False
        raise ValueError("not a stored boolean")

    return Codec(encode, decode, "bool")


def _date() -> Codec:
    def encode(value: Any) -> bytes:
        if not isinstance(value, dt.date) or isinstance(value, dt.datetime):
            raise TypeError
        return value.isoformat().encode()

    return Codec(encode, lambda b: dt.date.fromisoformat(b.decode()), "datetime.date")


def _iso(kind: type[dt.datetime] | type[dt.time]) -> Codec:
    """datetime and time: ISO 8601 text, which keeps microseconds and the UTC offset."""
    is_kind = _check(kind, kind.__name__)
    return Codec(
        lambda v: is_kind(v).isoformat().encode(),
        lambda b: kind.fromisoformat(b.decode()),
        f"datetime.{kind.__name__}",
    )


def _interval() -> Codec:
    def encode(value: Any) -> bytes:
        if not isinstance(value, dt.timedelta):
            raise TypeError
        return _INTERVAL.pack(value.days, value.seconds, value.microseconds)

    def decode(raw: bytes) -> dt.timedelta:
        days, seconds, micros = _INTERVAL.unpack(raw)
        return dt.timedelta(days=days, seconds=seconds, microseconds=micros)

    return Codec(encode, decode, "datetime.timedelta")


def _json() -> Codec:
    dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode
    return Codec(lambda v: dumps(v).encode(), json.loads, "JSON-serializable value")


def _uuid(as_uuid: bool) -> Codec:
    def encode(value: Any) -> bytes:
        if isinstance(value, uuid.UUID):
            return value.bytes
        if isinstance(value, str):
            return uuid.UUID(value).bytes
        raise TypeError

    if as_uuid:
        return Codec(encode, lambda b: uuid.UUID(bytes=b), "uuid.UUID")
    return Codec(encode, lambda b: str(uuid.UUID(bytes=b)), "UUID string")


def _enum(inner: sa.Enum) -> Codec:
    # The Enum's own lookups give the same name/value mapping as a plaintext Enum
    # column; unlike it, unknown strings are refused (the database cannot check them).
    valid: dict[Any, Any] = inner._valid_lookup
    from_db: Callable[[str], Any] = inner._object_value_for_elem
    return Codec(lambda v: valid[v].encode(), lambda b: from_db(b.decode()), "a member of the Enum")


def _decorated(inner: sa.types.TypeDecorator[Any], dialect: Dialect | None) -> Codec:
    base = codec_for(inner.impl_instance, dialect)
    bind, result = inner.process_bind_param, inner.process_result_value

    return Codec(
        lambda v: base.encode(bind(v, dialect)),  # type: ignore[arg-type]
        lambda b: result(base.decode(b), dialect),  # type: ignore[arg-type]
        base.expects,
    )


def codec_for(inner: sa.types.TypeEngine[Any], dialect: Dialect | None = None) -> Codec:
    """The codec of an inner type; ``TypeError`` if the type is not supported."""
    # Order matters: Enum is a String, Interval a TypeDecorator, Float a Numeric.
    if isinstance(inner, sa.Enum):
        return _enum(inner)
    if isinstance(inner, sa.Interval):
        return _interval()
    if isinstance(inner, sa.types.TypeDecorator):
        if type(inner).process_bind_param is sa.types.TypeDecorator.process_bind_param:
            raise TypeError(
                f"{type(inner).__name__} cannot be encrypted: supported are {SUPPORTED}"
            )
        return _decorated(inner, dialect)
    if isinstance(inner, sa.String):
        return _text()
    if isinstance(inner, sa.types._Binary):
        return _binary()
    if isinstance(inner, sa.Integer):
        return _integer()
    if isinstance(inner, sa.Float):
        return _float(inner.asdecimal)
    if isinstance(inner, sa.Numeric):
        return _numeric(inner.asdecimal)
    if isinstance(inner, sa.Boolean):
        return _boolean()
    if isinstance(inner, sa.DateTime):
        return _iso(dt.datetime)
    if isinstance(inner, sa.Date):
        return _date()
    if isinstance(inner, sa.Time):
        return _iso(dt.time)
    if isinstance(inner, sa.JSON):
        return _json()
    if isinstance(inner, sa.Uuid):
        return _uuid(inner.as_uuid)
    raise TypeError(f"{type(inner).__name__} cannot be encrypted: supported are {SUPPORTED}")
