"""Fuzzing the format parser and the result processors: only ``EnvelopeError`` subclasses.

A moderate number of examples by default; ``-m slow`` runs the same properties
with many more.
"""

from __future__ import annotations

import datetime as dt
import decimal
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from sqlalchemy_envelope import (
    DecryptionError,
    Encrypted,
    Envelope,
    EnvelopeError,
    KeyNotFoundError,
    LocalKms,
    wire,
)
from sqlalchemy_envelope.crypter import ColumnCrypter

DEFAULT = settings(
    max_examples=500,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
SLOW = settings(DEFAULT, max_examples=20_000)

TYPES: dict[str, sa.types.TypeEngine[Any]] = {
    "string": sa.String(50),
    "binary": sa.LargeBinary(),
    "integer": sa.Integer(),
    "numeric": sa.Numeric(10, 2),
    "float": sa.Float(),
    "boolean": sa.Boolean(),
    "datetime": sa.DateTime(timezone=True),
    "date": sa.Date(),
    "time": sa.Time(),
    "interval": sa.Interval(),
    "json": sa.JSON(),
    "uuid": sa.Uuid(),
    "enum": sa.Enum("a", "b", name="ab"),
}


@dataclass
class Target:
    engine: sa.Engine
    table: sa.Table
    sample: dict[str, bytes]  # a genuine stored value per column
    key_ids: list[int]

    def processor(self, column: str) -> Callable[[Any], Any]:
        type_ = self.table.c[column].type
        process = type_.result_processor(self.engine.dialect, None)
        assert process is not None
        return process

    def crypter(self, column: str) -> ColumnCrypter:
        return self.table.c[column].type.crypter()


SAMPLES: dict[str, Any] = {
    "string": "fuzz me",
    "binary": b"\x00\x01",
    "integer": 42,
    "numeric": decimal.Decimal("1.50"),
    "float": 2.5,
    "boolean": True,
    "datetime": dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc),
    "date": dt.date(2024, 1, 2),
    "time": dt.time(3, 4, 5),
    "interval": dt.timedelta(days=1, seconds=2),
    "json": {"k": [1, "v"]},
    "uuid": uuid.UUID(int=7),
    "enum": "a",
}


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    """One SQLite database with a randomized and a deterministic column per type, and a row."""
    metadata = sa.MetaData()
    envelope = Envelope(metadata)
    columns = []
    for name, inner in TYPES.items():
        columns.append(sa.Column(name, Encrypted(inner, envelope)))
        columns.append(sa.Column(f"{name}_det", Encrypted(inner, envelope, deterministic=True)))
    other = sa.Table(
        "other",
        metadata,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("v", Encrypted(sa.String(10), envelope, scope="elsewhere")),
    )
    table = sa.Table("fuzz", metadata, sa.Column("id", sa.Integer, primary_key=True), *columns)
    engine = sa.create_engine(f"sqlite:///{tmp_path_factory.mktemp('fuzz') / 'fuzz.db'}")
    metadata.create_all(engine)
    envelope.configure(kms=LocalKms(bytes(32)), engine=engine)
    row = {"id": 1}
    for name in TYPES:
        row[name] = row[f"{name}_det"] = SAMPLES[name]
    with engine.begin() as conn:
        conn.execute(table.insert(), row)
        conn.execute(other.insert(), {"id": 1, "v": "x"})
    envelope.rotate("fuzz")  # two keys in the scope
    raw = sa.table("fuzz", *(sa.column(c.name, sa.LargeBinary) for c in table.columns[1:]))
    with engine.connect() as conn:
        sample = {k: bytes(v) for k, v in conn.execute(sa.select(raw)).one()._mapping.items()}
    key_ids = [k.id for k in envelope.keys(scope=None)]
    yield Target(engine, table, sample, key_ids)
    engine.dispose()


COLUMNS = [c for name in TYPES for c in (name, f"{name}_det")]


# -- the header parser: never raises -----------------------------------------------------
def check_parse_header(value: bytes) -> None:
    parsed = wire.parse_header(value)
    if parsed is None:
        return
    algorithm, key_id = parsed
    assert value[0] == wire.VERSION
    assert algorithm in (wire.RANDOMIZED, wire.DETERMINISTIC) and algorithm == value[1]
    assert 0 < key_id <= wire.MAX_KEY_ID and key_id == int.from_bytes(value[2:6], "big")
    assert len(value) >= wire.OVERHEAD[algorithm]
    assert wire.key_id_of(value) == key_id


headers = st.builds(
    lambda v, a, k, body: bytes([v, a]) + k.to_bytes(4, "big") + body,
    st.sampled_from([0, 1, 2, 255]),
    st.sampled_from([0, 1, 2, 3, 255]),
    st.integers(0, 2**32 - 1),
    st.binary(max_size=64),
)
anything = st.binary(max_size=200) | headers


@DEFAULT
@given(anything)
def test_parse_header_never_raises(value: bytes) -> None:
    check_parse_header(value)


@pytest.mark.slow
@SLOW
@given(anything)
def test_parse_header_never_raises_long(value: bytes) -> None:
    check_parse_header(value)


# -- the result processor: arbitrary stored bytes ------------------------------------------
def check_processor(target: Target, column: str, value: bytes) -> None:
    try:
        result = target.processor(column)(value)
    except EnvelopeError as exc:
        assert isinstance(exc, (DecryptionError, KeyNotFoundError)), repr(exc)
        return
    # Only a genuine value may decrypt; the fuzzers exclude it.
    raise AssertionError(f"{column}: {value.hex()} decrypted to {result!r}")


def stored_values(target: Target) -> st.SearchStrategy[bytes]:
    """Arbitrary bytes, headers naming real keys, and mutations of genuine values."""
    key_ids = st.sampled_from(target.key_ids) | st.integers(1, 2**32 - 1)
    forged = st.builds(
        lambda a, k, body: bytes([1, a]) + k.to_bytes(4, "big") + body,
        st.sampled_from([1, 2]),
        key_ids,
        st.binary(max_size=80),
    )
    genuine = st.sampled_from(sorted(target.sample.values()))

    @st.composite
    def mutated(draw: st.DrawFn) -> bytes:
        value = bytearray(draw(genuine))
        for _ in range(draw(st.integers(1, 4))):
            op = draw(st.sampled_from(["flip", "cut", "insert", "splice"]))
            i = draw(st.integers(0, max(len(value) - 1, 0)))
            if op == "flip" and value:
                value[i] ^= draw(st.integers(1, 255))
            elif op == "cut":
                del value[i : i + draw(st.integers(1, 8))]
            elif op == "insert":
                value[i:i] = draw(st.binary(min_size=1, max_size=8))
            else:
                other = draw(genuine)
                value = value[:i] + bytearray(other[i:])
        return bytes(value)

    return st.binary(max_size=120) | forged | mutated()


def fuzz_processor(target: Target, examples: settings) -> None:
    genuine = set(target.sample.values())

    @examples
    @given(st.sampled_from(COLUMNS), stored_values(target))
    def run(column: str, value: bytes) -> None:
        assume(value not in genuine)
        check_processor(target, column, value)

    run()


def test_result_processor_raises_only_envelope_errors(target: Target) -> None:
    fuzz_processor(target, DEFAULT)


@pytest.mark.slow
def test_result_processor_raises_only_envelope_errors_long(target: Target) -> None:
    fuzz_processor(target, SLOW)


# -- authentic ciphertext of arbitrary plaintext: the codec's failures are DecryptionError --
def fuzz_authentic(target: Target, examples: settings) -> None:
    @examples
    @given(st.sampled_from(COLUMNS), st.binary(max_size=64) | st.text(max_size=32).map(str.encode))
    def run(column: str, plaintext: bytes) -> None:
        stored = target.crypter(column).encrypt(plaintext)  # genuine: authenticates
        try:
            target.processor(column)(stored)
        except EnvelopeError as exc:
            assert isinstance(exc, DecryptionError), repr(exc)

    run()


def test_authentic_values_of_the_wrong_shape_are_decryption_errors(target: Target) -> None:
    fuzz_authentic(target, DEFAULT)


@pytest.mark.slow
def test_authentic_values_of_the_wrong_shape_are_decryption_errors_long(target: Target) -> None:
    fuzz_authentic(target, SLOW)


def test_genuine_values_still_read(target: Target) -> None:
    for column, value in target.sample.items():
        expected = SAMPLES[column.removesuffix("_det")]
        assert target.processor(column)(value) == expected


def test_fuzzed_values_through_the_database(target: Target) -> None:
    # A smaller run through SQLite itself: stored bytes, read by a SELECT.
    raw = sa.table("fuzz", sa.column("id"), *(sa.column(c, sa.LargeBinary) for c in COLUMNS))

    @settings(DEFAULT, max_examples=60)
    @given(st.sampled_from(COLUMNS), stored_values(target))
    def run(column: str, value: bytes) -> None:
        assume(value not in set(target.sample.values()))
        with target.engine.begin() as conn:
            conn.execute(raw.update().where(raw.c.id == 1).values({column: value}))
        try:
            with target.engine.connect() as conn:
                got = conn.execute(sa.select(target.table.c[column])).scalar_one()
        except EnvelopeError as exc:
            assert isinstance(exc, (DecryptionError, KeyNotFoundError)), repr(exc)
        else:
            raise AssertionError(f"{column}: {value.hex()} decrypted to {got!r}")
        finally:
            with target.engine.begin() as conn:
                conn.execute(
                    raw.update().where(raw.c.id == 1).values({column: target.sample[column]})
                )

    run()
