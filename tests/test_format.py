"""The stored format against docs/FORMAT.md: known-answer vectors, both ways, real values.

The vectors in ``tests/vectors/format.json`` come from ``tests/format_reference.py``,
an implementation that shares no code with the package.
"""

from __future__ import annotations

import base64
import datetime as dt
import decimal
import json
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from sqlalchemy_envelope import Encrypted, Envelope, LocalKms, wire
from sqlalchemy_envelope._crypto import column_cipher, derive_key, gcm_seal_with_nonce
from sqlalchemy_envelope.codecs import codec_for
from sqlalchemy_envelope.crypter import ColumnCrypter
from sqlalchemy_envelope.kms.base import scope_context

from . import format_reference as ref
from .models import App, Color, build

VECTORS = json.loads((Path(__file__).parent / "vectors" / "format.json").read_text("utf-8"))
ALGORITHMS = {"AES-256-GCM": wire.RANDOMIZED, "AES-SIV": wire.DETERMINISTIC}


def _id(v: dict[str, Any]) -> str:
    size = len(v["plaintext_hex"]) // 2
    return f"{v['algorithm']}-{v['table']}.{v['column']}-key{v['key_id']}-{size}B"


VALUES = pytest.mark.parametrize("v", VECTORS["values"], ids=_id)


# -- the vectors against the cipher layer ----------------------------------------------------
@VALUES
def test_vector_header_and_subkey(v: dict[str, Any]) -> None:
    algorithm = ALGORITHMS[v["algorithm"]]
    stored = bytes.fromhex(v["stored_hex"])
    assert stored[:6] == wire.header(algorithm, v["key_id"])
    assert wire.parse_header(stored) == (algorithm, v["key_id"])
    info = wire.subkey_info(algorithm, v["key_id"], v["table"], v["column"])
    length = 32 if algorithm == wire.RANDOMIZED else 64
    assert derive_key(bytes.fromhex(v["data_key_hex"]), info, length).hex() == v["subkey_hex"]


@VALUES
def test_vector_decrypts_and_encrypts_with_column_cipher(v: dict[str, Any]) -> None:
    algorithm = ALGORITHMS[v["algorithm"]]
    data_key, stored = bytes.fromhex(v["data_key_hex"]), bytes.fromhex(v["stored_hex"])
    plaintext = bytes.fromhex(v["plaintext_hex"])
    head = wire.header(algorithm, v["key_id"])
    info = wire.subkey_info(algorithm, v["key_id"], v["table"], v["column"])
    aad = wire.associated_data(head, v["table"], v["column"])
    seal, open_, seal_all = column_cipher(
        algorithm == wire.DETERMINISTIC, data_key, info, aad, wire.HEADER_BYTES
    )
    assert open_(stored) == plaintext
    if algorithm == wire.DETERMINISTIC:
        assert head + seal(plaintext) == stored
        assert seal_all(head, [plaintext, plaintext]) == [stored, stored]
    else:
        nonce = bytes.fromhex(v["nonce_hex"])
        assert head + gcm_seal_with_nonce(data_key, info, aad, nonce, plaintext) == stored
        fresh = head + seal(plaintext)  # a random nonce: different bytes, same plaintext
        assert fresh != stored and open_(fresh) == plaintext
        # A batch's nonces come from one draw: each value has its own.
        batch = seal_all(head, [plaintext] * 64)
        assert all(open_(b) == plaintext for b in batch)
        nonces = {b[wire.HEADER_BYTES : wire.HEADER_BYTES + 12] for b in batch}
        assert len(nonces | {fresh[wire.HEADER_BYTES : wire.HEADER_BYTES + 12]}) == 65


@VALUES
def test_vector_overhead(v: dict[str, Any]) -> None:
    stored, plaintext = bytes.fromhex(v["stored_hex"]), bytes.fromhex(v["plaintext_hex"])
    expected = 34 if v["algorithm"] == "AES-256-GCM" else 22
    assert len(stored) - len(plaintext) == expected == wire.OVERHEAD[ALGORITHMS[v["algorithm"]]]


@pytest.mark.parametrize("algorithm", ALGORITHMS.values(), ids=ALGORITHMS.keys())
def test_parse_header_refuses_every_length_below_the_overhead(algorithm: int) -> None:
    """FORMAT.md section 1: a value shorter than its algorithm's overhead is not ours, at
    every length (a fuzzer draws the GCM lengths from 22 to 33 bytes only now and then)."""
    head = wire.header(algorithm, 1)
    for length in range(wire.OVERHEAD[algorithm]):
        assert wire.parse_header((head + bytes(64))[:length]) is None, length
    shortest = head + bytes(wire.OVERHEAD[algorithm] - wire.HEADER_BYTES)
    assert wire.parse_header(shortest) == (algorithm, 1)


def test_reference_hkdf_matches_rfc5869() -> None:
    ikm = bytes([0x0B]) * 22
    okm = bytes.fromhex(
        "8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d9d201395faa4b61a96c8"
    )
    assert ref.hkdf_sha256(ikm, b"", 42) == okm
    assert derive_key(ikm, b"", 42) == okm


# -- the vectors through the keyring, a ColumnCrypter and an Encrypted column ----------------
@pytest.fixture
def vector_keyring(
    sqlite_url: str, make_engine: Callable[..., sa.Engine], local_kms: LocalKms
) -> tuple[Envelope, sa.Engine, sa.Table]:
    """Every vector's data key in a real keyring, wrapped by LocalKms (SQLite: ids to 2**32 - 1)."""
    metadata = sa.MetaData()
    envelope = Envelope(metadata)
    columns: dict[str, set[str]] = {}
    for v in VECTORS["values"]:
        columns.setdefault(v["table"], set()).add(v["column"])
    tables = [
        sa.Table(
            t,
            metadata,
            sa.Column("id", sa.Integer, primary_key=True),
            *(sa.Column(c, Encrypted(sa.LargeBinary, envelope)) for c in sorted(cols)),
        )
        for t, cols in columns.items()
    ]
    engine = make_engine(sqlite_url)
    metadata.create_all(engine)
    seen: set[int] = set()
    with engine.begin() as conn:
        for v in VECTORS["values"]:
            if v["key_id"] in seen:
                continue
            seen.add(v["key_id"])
            scope = f"scope-{v['key_id']}"
            wrapped, kms_key_id = local_kms.wrap(
                bytes.fromhex(v["data_key_hex"]), scope_context(scope)
            )
            conn.execute(
                envelope.table.insert().values(
                    id=v["key_id"],
                    scope=scope,
                    state="active",
                    active_scope=scope,
                    wrapped_key=wrapped,
                    kms_key_id=kms_key_id,
                    created_at=dt.datetime.now(dt.timezone.utc),
                )
            )
    # Configured after the rows exist: on SQLite the first transaction of a configured
    # envelope creates the first key of every declared scope.
    envelope.configure(kms=local_kms, engine=engine)
    return envelope, engine, tables[0]


@VALUES
def test_vector_through_column_crypter(
    vector_keyring: tuple[Envelope, sa.Engine, sa.Table], v: dict[str, Any]
) -> None:
    envelope, _, _ = vector_keyring
    deterministic = v["algorithm"] == "AES-SIV"
    crypter = ColumnCrypter(
        envelope, v["table"], v["column"], scope=f"scope-{v['key_id']}", deterministic=deterministic
    )
    stored, plaintext = bytes.fromhex(v["stored_hex"]), bytes.fromhex(v["plaintext_hex"])
    assert crypter.decrypt(stored) == plaintext
    written = crypter.encrypt(plaintext)  # under the scope's active key: the vector's key
    assert written[:6] == stored[:6]
    if deterministic:
        assert written == stored
    else:
        nonce = written[6:18]
        data_key = bytes.fromhex(v["data_key_hex"])
        expected = ref.seal(
            data_key, ref.GCM, v["key_id"], v["table"], v["column"], plaintext, nonce
        )
        assert written == expected


def test_vectors_through_an_encrypted_column(
    vector_keyring: tuple[Envelope, sa.Engine, sa.Table],
) -> None:
    envelope, engine, _ = vector_keyring
    for v in VECTORS["values"]:
        # Each vector's key is its own scope's (a column reads only its scope's keys).
        scope = f"scope-{v['key_id']}"
        table = sa.Table(
            v["table"],
            sa.MetaData(),
            sa.Column("id", sa.Integer, primary_key=True),
            sa.Column(v["column"], Encrypted(sa.LargeBinary, envelope, scope=scope)),
        )
        with engine.begin() as conn:
            conn.execute(sa.delete(table))
            # Stored bytes go in raw, past the type: what a restored dump would hold.
            raw = sa.table(v["table"], sa.column("id"), sa.column(v["column"], sa.LargeBinary))
            conn.execute(
                raw.insert().values({"id": 1, v["column"]: bytes.fromhex(v["stored_hex"])})
            )
            got = conn.execute(sa.select(table.c[v["column"]])).scalar_one()
        assert got == bytes.fromhex(v["plaintext_hex"]), _id(v)


# -- plaintext serialization per inner type -------------------------------------------------
_TYPES: dict[str, sa.types.TypeEngine[Any]] = {
    "String": sa.String(50),
    "Text": sa.Text(),
    "LargeBinary": sa.LargeBinary(),
    "Integer": sa.Integer(),
    "BigInteger": sa.BigInteger(),
    "Numeric(10, 2)": sa.Numeric(10, 2),
    "Float": sa.Float(),
    "Boolean": sa.Boolean(),
    "Date": sa.Date(),
    "DateTime": sa.DateTime(),
    "DateTime(timezone=True)": sa.DateTime(timezone=True),
    "Time": sa.Time(),
    "Interval": sa.Interval(),
    "JSON": sa.JSON(),
    "Uuid": sa.Uuid(),
    "Enum(Color)": sa.Enum(Color),
}


def _python_value(kind: str, value: Any) -> Any:
    return {
        "str": lambda x: x,
        "bytes_b64": base64.b64decode,
        "int": int,
        "decimal": decimal.Decimal,
        "float": float,
        "bool": bool,
        "date": dt.date.fromisoformat,
        "datetime": dt.datetime.fromisoformat,
        "time": dt.time.fromisoformat,
        "timedelta": lambda x: dt.timedelta(days=x[0], seconds=x[1], microseconds=x[2]),
        "json": lambda x: x,
        "uuid": uuid.UUID,
        "enum": lambda x: Color[x],
    }[kind](value)


@pytest.mark.parametrize(
    "c", VECTORS["codecs"], ids=lambda c: f"{c['type']}-{c['plaintext_hex'][:12]}"
)
def test_codec_vectors(c: dict[str, Any]) -> None:
    codec = codec_for(_TYPES[c["type"]])
    value = _python_value(c["kind"], c["value"])
    raw = bytes.fromhex(c["plaintext_hex"])
    assert codec.encode(value) == raw
    back = codec.decode(raw)
    assert back == value and type(back) is type(value)
    if isinstance(value, (dt.datetime, dt.time)):
        assert back.utcoffset() == value.utcoffset()
    if isinstance(value, decimal.Decimal):
        assert str(back) == str(value)  # the digits, not only the number


def test_every_supported_type_has_a_codec_vector() -> None:
    listed = {c["type"].split("(")[0] for c in VECTORS["codecs"]}
    for name in ("String", "Text", "LargeBinary", "Integer", "BigInteger", "Numeric", "Float"):
        assert name in listed
    for name in ("Boolean", "Date", "DateTime", "Time", "Interval", "JSON", "Uuid", "Enum"):
        assert name in listed


# -- LocalKms wrapped keys ------------------------------------------------------------------
@pytest.mark.parametrize("w", VECTORS["local_kms"], ids=lambda w: w["scope"])
def test_local_kms_vectors(w: dict[str, Any]) -> None:
    master = base64.b64decode(w["master_key_b64"])
    kms = LocalKms(master)
    assert kms.kms_key_id == w["kms_key_id"]
    wrapped, data_key = bytes.fromhex(w["wrapped_hex"]), bytes.fromhex(w["data_key_hex"])
    assert kms.unwrap(wrapped, scope_context(w["scope"]), w["kms_key_id"]) == data_key
    fresh, key_id = kms.wrap(data_key, scope_context(w["scope"]))
    assert key_id == w["kms_key_id"] and len(fresh) == 1 + 12 + 32 + 16
    assert fresh == ref.local_kms_wrap(master, w["scope"], data_key, fresh[1:13])


# -- real stored values, written by the library, against the reference ---------------------
@pytest.fixture
def app(
    db_url: str, make_engine: Callable[..., sa.Engine], local_kms: LocalKms
) -> tuple[App, sa.Engine, LocalKms]:
    app = build()
    engine = make_engine(db_url)
    app.Base.metadata.create_all(engine)
    app.envelope.configure(kms=local_kms, engine=engine)
    return app, engine, local_kms


def _data_keys(engine: sa.Engine, envelope: Envelope, kms: LocalKms) -> dict[int, bytes]:
    t = envelope.table
    with engine.connect() as conn:
        rows = conn.execute(sa.select(t.c.id, t.c.scope, t.c.wrapped_key, t.c.kms_key_id)).all()
    return {
        r.id: kms.unwrap(bytes(r.wrapped_key), scope_context(r.scope), r.kms_key_id) for r in rows
    }


def test_stored_values_follow_the_document(app: tuple[App, sa.Engine, LocalKms]) -> None:
    a, engine, kms = app
    plain = {
        "name": "Ada Lovelace-Byron",
        "email": "ada@analytical.engine",
        "ssn": "999-00-1234",
        "notes": {"engine": ["analytical", 1843]},
    }
    with Session(engine) as s:
        s.add(a.Patient(**plain))
        s.commit()
    keys = _data_keys(engine, a.envelope, kms)
    with engine.connect() as conn:
        raw = conn.execute(sa.text("SELECT name, email, ssn, notes FROM patients")).one()._asdict()
    codecs = {c: codec_for(a.Patient.__table__.c[c].type.inner_type) for c in plain}
    for column, value in plain.items():
        stored = bytes(raw[column])
        plaintext = codecs[column].encode(value)
        deterministic = column == "email"
        assert stored[0] == 0x01 and stored[1] == (0x02 if deterministic else 0x01)
        key_id = int.from_bytes(stored[2:6], "big")
        assert ref.open_(keys[key_id], "patients", column, stored) == plaintext
        # Overhead on real values: 34 bytes randomized, 22 deterministic.
        assert len(stored) - len(plaintext) == (22 if deterministic else 34)
        algorithm = ref.SIV if deterministic else ref.GCM
        nonce = None if deterministic else stored[6:18]
        assert (
            ref.seal(keys[key_id], algorithm, key_id, "patients", column, plaintext, nonce)
            == stored
        )


def test_overhead_of_a_binary_value(
    sqlite_url: str, make_engine: Callable[..., sa.Engine], local_kms: LocalKms
) -> None:
    metadata = sa.MetaData()
    envelope = Envelope(metadata)
    t = sa.Table(
        "blobs",
        metadata,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("r", Encrypted(sa.LargeBinary, envelope)),
        sa.Column("d", Encrypted(sa.LargeBinary, envelope, deterministic=True)),
    )
    engine = make_engine(sqlite_url)
    metadata.create_all(engine)
    envelope.configure(kms=local_kms, engine=engine)
    sizes = [0, 1, 15, 16, 17, 1000]
    with engine.begin() as conn:
        conn.execute(t.insert(), [{"id": n, "r": b"\xab" * n, "d": b"\xab" * n} for n in sizes])
        raw = conn.execute(sa.text("SELECT id, r, d FROM blobs ORDER BY id")).all()
    for n, r, d in raw:
        assert len(r) == n + 34
        assert len(d) == n + 22


def test_nonces_are_fresh_and_equal_plaintexts_differ(app: tuple[App, sa.Engine, LocalKms]) -> None:
    a, engine, _ = app
    with Session(engine) as s:
        s.add_all(a.Patient(name="same", email=f"{i}@x.org") for i in range(500))
        s.commit()
    with engine.connect() as conn:
        names = [bytes(v) for v in conn.execute(sa.text("SELECT name FROM patients")).scalars()]
    assert len({n[6:18] for n in names}) == 500
    assert len(set(names)) == 500


def test_rotation_moves_new_writes_to_a_new_key(app: tuple[App, sa.Engine, LocalKms]) -> None:
    a, engine, _ = app
    with Session(engine) as s:
        s.add(a.Patient(name="before", email="before@x.org"))
        s.commit()
    new = a.envelope.rotate("patients")
    with Session(engine) as s:
        s.add(a.Patient(name="after", email="after@x.org"))
        s.commit()
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT name, email FROM patients ORDER BY id")).all()
    (old_name, old_email), (new_name, new_email) = [(bytes(n), bytes(e)) for n, e in rows]
    assert wire.key_id_of(old_name) == wire.key_id_of(old_email) != new
    assert wire.key_id_of(new_name) == wire.key_id_of(new_email) == new
