"""Every supported inner type round-trips exactly through a real database (property-based)."""

from __future__ import annotations

import datetime as dt
import decimal
import enum
import numbers
import time
from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sqlalchemy_envelope import Encrypted, Envelope, LocalKms, ValueTypeError, wire


class Mood(enum.Enum):
    HAPPY = "happy"
    SAD = "sad"


offsets = st.integers(min_value=-23 * 60, max_value=23 * 60).map(
    lambda m: dt.timezone(dt.timedelta(minutes=m))
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**53), max_value=2**53) | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)

# (inner type, strategy of Python values)
CASES: dict[str, tuple[sa.types.TypeEngine[Any], st.SearchStrategy[Any]]] = {
    "string": (sa.String(200), st.text(max_size=200)),
    "text": (sa.Text(), st.text()),
    "unicode": (sa.Unicode(50), st.text(max_size=50)),
    "binary": (sa.LargeBinary(), st.binary()),
    "integer": (sa.Integer(), st.integers(min_value=-(2**31), max_value=2**31 - 1)),
    "bigint": (sa.BigInteger(), st.integers(min_value=-(2**63), max_value=2**63 - 1)),
    "numeric": (
        sa.Numeric(20, 6),
        st.decimals(
            allow_nan=False, allow_infinity=False, places=6, min_value=-(10**13), max_value=10**13
        ),
    ),
    "float": (sa.Float(), st.floats(allow_nan=False)),
    "boolean": (sa.Boolean(), st.booleans()),
    "date": (sa.Date(), st.dates()),
    "datetime": (sa.DateTime(), st.datetimes()),
    "datetime_tz": (sa.DateTime(timezone=True), st.datetimes(timezones=offsets)),
    "time": (sa.Time(), st.times()),
    "interval": (sa.Interval(), st.timedeltas()),
    "json": (sa.JSON(), json_values.filter(lambda v: v is not None)),
    "uuid": (sa.Uuid(), st.uuids()),
    "uuid_str": (sa.Uuid(as_uuid=False), st.uuids().map(str)),
    "enum": (sa.Enum(Mood), st.sampled_from(Mood)),
    "enum_str": (sa.Enum("a", "b", name="letters"), st.sampled_from(["a", "b"])),
}


@pytest.fixture
def store(
    any_db_url: str, make_engine: Callable[..., sa.Engine]
) -> Callable[[str], tuple[sa.Engine, sa.Table]]:
    engine = make_engine(any_db_url)
    metadata = sa.MetaData()
    envelope = Envelope(metadata)
    tables = {
        name: sa.Table(
            f"t_{name}",
            metadata,
            sa.Column("id", sa.Integer, primary_key=True),
            sa.Column("value", Encrypted(inner, envelope)),
        )
        for name, (inner, _) in CASES.items()
    }
    metadata.create_all(engine)
    envelope.configure(kms=LocalKms(b"k" * 32), engine=engine)
    return lambda name: (engine, tables[name])


@pytest.mark.parametrize("name", sorted(CASES))
def test_round_trip_is_exact(store: Callable[[str], tuple[sa.Engine, sa.Table]], name: str) -> None:
    engine, table = store(name)
    strategy = CASES[name][1]

    @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
    @given(values=st.lists(strategy, min_size=1, max_size=5))
    def check(values: list[Any]) -> None:
        with engine.begin() as conn:
            conn.execute(table.delete())
            conn.execute(table.insert(), [{"id": i, "value": v} for i, v in enumerate(values, 1)])
            got = conn.execute(sa.select(table.c.value).order_by(table.c.id)).scalars().all()
        assert got == values
        for a, b in zip(got, values, strict=True):
            assert type(a) is type(b)
            if isinstance(b, dt.datetime):
                assert a.utcoffset() == b.utcoffset()
            if isinstance(b, decimal.Decimal):
                assert str(a) == str(b)

    check()


def test_none_is_sql_null_also_for_json(store: Callable[[str], tuple[sa.Engine, sa.Table]]) -> None:
    engine, table = store("json")
    with engine.begin() as conn:
        conn.execute(table.insert(), [{"id": 1, "value": None}])
        assert conn.execute(sa.select(sa.func.count()).where(table.c.value.is_(None))).scalar() == 1


@pytest.mark.parametrize(
    ("name", "bad"),
    [
        ("string", 5),
        ("integer", "5"),
        ("integer", 1.5),
        ("date", dt.datetime(2020, 1, 1)),
        ("boolean", "yes"),
        ("uuid", 12),
        ("enum", "HAPPY?"),
        ("binary", "text"),
        ("json", {1, 2}),
        ("numeric", "1.5"),
    ],
)
def test_wrong_python_type_is_a_clear_error_naming_the_column(
    store: Callable[[str], tuple[sa.Engine, sa.Table]], name: str, bad: Any
) -> None:
    engine, table = store(name)
    with pytest.raises(ValueTypeError) as info, engine.begin() as conn:
        conn.execute(table.insert(), [{"id": 1, "value": bad}])
    assert isinstance(info.value, TypeError)
    assert f"t_{name}.value" in str(info.value)
    assert repr(bad) not in str(info.value) and "parameters" not in str(info.value)
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(table)).scalar() == 0


class NumpyLikeFloat(float):
    """Like numpy's float64 (what pandas' to_dict() gives): a float whose repr names its type."""

    def __repr__(self) -> str:
        return f"np.float64({float(self)})"


class NumpyLikeInt:
    """Like numpy's int64: not an int, but an Integral with __index__."""

    def __init__(self, value: int) -> None:
        self.value = value

    def __index__(self) -> int:
        return self.value

    def __float__(self) -> float:
        return float(self.value)


numbers.Integral.register(NumpyLikeInt)


class NumpyLikeFloat32:
    """Like numpy's float32: a Real, not a float."""

    def __float__(self) -> float:
        return 0.25


numbers.Real.register(NumpyLikeFloat32)


@pytest.mark.parametrize(
    ("name", "values", "expected"),
    [
        (
            "numeric",
            [NumpyLikeFloat(12.5), NumpyLikeInt(7), NumpyLikeFloat32()],
            ["12.5", "7", "0.25"],
        ),
        ("float", [NumpyLikeFloat(12.5), NumpyLikeInt(7), NumpyLikeFloat32()], [12.5, 7.0, 0.25]),
    ],
)
def test_numbers_take_numpy_lookalikes(
    store: Callable[[str], tuple[sa.Engine, sa.Table]],
    name: str,
    values: list[Any],
    expected: list[Any],
) -> None:
    """What pandas' to_dict() hands over: numpy's float64, float32 and int64."""
    engine, table = store(name)
    with engine.begin() as conn:
        conn.execute(table.insert(), [{"id": i, "value": v} for i, v in enumerate(values, 1)])
        got = conn.execute(sa.select(table.c.value).order_by(table.c.id)).scalars().all()
    if name == "numeric":
        expected = [decimal.Decimal(e) for e in expected]
    assert got == expected


@pytest.mark.parametrize("inner", [sa.ARRAY(sa.Integer), sa.PickleType(), sa.types.NullType()])
def test_unsupported_inner_type_is_a_type_error_at_declaration(inner: Any) -> None:
    with pytest.raises(TypeError, match="cannot be encrypted"):
        Encrypted(inner, Envelope())


def test_inner_type_may_be_a_class_and_a_user_type_decorator() -> None:
    class Lower(sa.types.TypeDecorator[str]):
        impl = sa.String
        cache_ok = True

        def process_bind_param(self, value: Any, dialect: Any) -> Any:
            return None if value is None else value.lower()

        def process_result_value(self, value: Any, dialect: Any) -> Any:
            return value

    metadata = sa.MetaData()
    envelope = Envelope(metadata)
    table = sa.Table(
        "t",
        metadata,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("a", Encrypted(sa.String, envelope)),
        sa.Column("b", Encrypted(Lower(20), envelope)),
    )
    engine = sa.create_engine("sqlite://")
    metadata.create_all(engine)
    envelope.configure(kms=LocalKms(b"k" * 32), engine=engine)
    with engine.begin() as conn:
        conn.execute(table.insert().values(id=1, a="x", b="MiXeD"))
        assert conn.execute(sa.select(table.c.a, table.c.b)).one() == ("x", "mixed")


def test_inner_schema_side_effects_stay_off_the_binary_column(
    pg_url: str, make_engine: Callable[..., sa.Engine]
) -> None:
    metadata = sa.MetaData()
    envelope = Envelope(metadata)
    sa.Table(
        "t",
        metadata,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("mood", Encrypted(sa.Enum(Mood, name="mood_type"), envelope)),
        sa.Column("flag", Encrypted(sa.Boolean(create_constraint=True), envelope)),
    )
    engine = make_engine(pg_url)
    metadata.create_all(engine)
    with engine.connect() as conn:
        types = conn.execute(
            sa.text("SELECT count(*) FROM pg_type WHERE typname = 'mood_type'")
        ).scalar()
        checks = conn.execute(
            sa.text(
                "SELECT count(*) FROM pg_constraint c JOIN pg_class t ON c.conrelid = t.oid "
                "WHERE t.relname = 't' AND c.contype = 'c'"
            )
        ).scalar()
        coltype = conn.execute(
            sa.text(
                "SELECT data_type FROM information_schema.columns WHERE table_name = 't' "
                "AND column_name = 'mood' AND table_schema = current_schema()"
            )
        ).scalar()
    assert (types, checks, coltype) == (0, 0, "bytea")


def test_overhead_is_at_most_34_bytes(store: Callable[[str], tuple[sa.Engine, sa.Table]]) -> None:
    engine, table = store("binary")
    with engine.begin() as conn:
        conn.execute(table.insert(), [{"id": 1, "value": b"x" * 100}])
        raw = conn.execute(sa.select(sa.type_coerce(table.c.value, sa.LargeBinary))).scalar_one()
    assert len(raw) - 100 == 34


@pytest.mark.parametrize("deterministic", [False, True])
def test_batch_bind_processor_is_the_bind_processor_for_a_list(deterministic: bool) -> None:
    """What the batch jobs write with: the same stored values and errors, Nones kept in place."""
    metadata = sa.MetaData()
    envelope = Envelope(metadata)
    table = sa.Table(
        "t",
        metadata,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("value", Encrypted(sa.String(50), envelope, deterministic=deterministic)),
    )
    engine = sa.create_engine("sqlite://")
    metadata.create_all(engine)
    envelope.configure(kms=LocalKms(b"k" * 32), engine=engine)
    encrypted, dialect = table.c.value.type, engine.dialect
    one, all_ = encrypted.bind_processor(dialect), encrypted.batch_bind_processor(dialect)
    read = encrypted.result_processor(dialect, None)
    assert all_([None, None]) == [None, None]  # as one(None): no data key is created for NULLs
    assert envelope.stats.kms_calls == 0 and envelope.keys("t") == []
    values = ["a", None, "b", "a", None]
    stored = all_(values)
    assert [None if s is None else read(s) for s in stored] == values
    assert [s is None for s in stored] == [v is None for v in values]
    if deterministic:
        assert stored == [None if v is None else one(v) for v in values]
    else:
        assert len({s[:18] for s in stored if s is not None}) == 3  # header + own nonce each
    hits = envelope.stats.cache_hits
    all_(["x"] * 10)
    assert envelope.stats.cache_hits == hits + 10
    with pytest.raises(ValueTypeError) as info:
        all_(["fine", 5, None])
    assert "t.value" in str(info.value) and info.value.__context__ is None


def test_batch_bind_processor_follows_a_rotation_elsewhere_as_the_bind_processor_does(
    sqlite_url: str, make_engine: Callable[..., sa.Engine]
) -> None:
    """Its active key is asked again once keyring_refresh runs out, as for one value at a time:
    a long batch job must not keep writing under a key another process rotated out."""
    kms, engine = LocalKms(b"k" * 32), make_engine(sqlite_url)
    envelopes = []
    for _ in range(2):  # two processes on one database
        metadata = sa.MetaData()
        envelope = Envelope(metadata, keyring_refresh=0.05)
        table = sa.Table(
            "t",
            metadata,
            sa.Column("id", sa.Integer, primary_key=True),
            sa.Column("value", Encrypted(sa.String(50), envelope)),
        )
        metadata.create_all(engine)
        envelope.configure(kms=kms, engine=engine)
        envelopes.append((envelope, table))
    (_, table), (theirs, _) = envelopes  # ours writes, theirs rotates
    encrypted, dialect = table.c.value.type, engine.dialect
    all_ = encrypted.batch_bind_processor(dialect)
    (before,) = all_(["before"])
    rotated = theirs.rotate("t")
    assert wire.key_id_of(before) != rotated
    time.sleep(0.1)  # beyond keyring_refresh
    (after,) = all_(["after"])
    assert wire.key_id_of(after) == rotated
    assert wire.key_id_of(encrypted.bind_processor(dialect)("one")) == rotated
