"""No plaintext and no key material in logs, error texts, exception chains, reprs or pickles.

Planted values are distinctive strings; the secrets searched for are the
master key, every data key in memory and every derived column sub-key, in raw,
hex, base64 and ``repr`` form.
"""

from __future__ import annotations

import base64
import logging
import os
import pickle
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import boto3
import pytest
import sqlalchemy as sa
from botocore.config import Config
from moto.server import ThreadedMotoServer
from sqlalchemy.orm import Session

from sqlalchemy_envelope import (
    AwsKms,
    ConfigurationError,
    DecryptionError,
    Encrypted,
    Envelope,
    EnvelopeError,
    KmsError,
    LocalKms,
    ValueTypeError,
)

from . import format_reference as ref
from .attack import SwitchableKms
from .kms_fixtures import REGION, aws_credentials  # noqa: F401
from .models import App, build

PLANTED = {
    "name": "PLANTED-NAME-qz81",
    "email": "planted-email-qz82@example.org",
    "ssn": "PLANTED-SSN-qz83",
    "notes": {"diagnosis": "PLANTED-JSON-qz84"},
}
MARKERS = ["PLANTED-NAME-qz81", "planted-email-qz82", "PLANTED-SSN-qz83", "PLANTED-JSON-qz84"]


# -- what must never show ------------------------------------------------------------------
@dataclass
class Secrets:
    keys: list[bytes] = field(default_factory=list)

    def forms(self) -> list[str]:
        out = []
        for key in self.keys:
            out += [key.hex(), base64.b64encode(key).decode(), repr(key)[2:-1]]
        return out

    def check_text(self, text: str, what: str) -> None:
        for marker in MARKERS:
            assert marker not in text, f"{what} holds plaintext {marker!r}:\n{text[:2000]}"
        for form in self.forms():
            assert form not in text, f"{what} holds key material:\n{text[:2000]}"

    def check_bytes(self, data: bytes, what: str) -> None:
        for marker in MARKERS:
            assert marker.encode() not in data, f"{what} holds plaintext {marker!r}"
        for key in self.keys:
            assert key not in data, f"{what} holds a raw key"
        self.check_text(data.decode("latin-1"), what)


def secrets_of(app: App, master: bytes) -> Secrets:
    """The master key, every data key the envelope holds, and every column sub-key."""
    manager = app.envelope._keys()
    data_keys = {}
    for _, (_, key) in list(manager.cache._entries.items()):
        data_keys[key.id] = key.material
    found = Secrets([master, *data_keys.values()])
    for (table, column), _ in app.envelope.columns.items():
        for key_id, material in data_keys.items():
            for algorithm in (ref.GCM, ref.SIV):
                found.keys.append(ref.subkey(material, algorithm, key_id, table, column))
    return found


def chain(exc: BaseException) -> Iterator[BaseException]:
    """The exception and everything it chains to: causes and contexts, suppressed or not."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        e = todo.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [x for x in (e.__cause__, e.__context__) if x is not None]


def check_exception(exc: BaseException, secrets: Secrets) -> None:
    text = "".join(traceback.format_exception(exc))
    secrets.check_text(text, "the formatted traceback")
    for e in chain(exc):
        for part in (
            str(e),
            repr(e),
            repr(e.args),
            repr(vars(e)) if hasattr(e, "__dict__") else "",
        ):
            secrets.check_text(part, f"{type(e).__name__} in the chain")
        if isinstance(e, sa.exc.StatementError):
            assert e.params is None or not any(m in repr(e.params) for m in MARKERS)


# -- fixtures --------------------------------------------------------------------------------
@dataclass
class Setup:
    app: App
    engine: sa.Engine
    kms: SwitchableKms
    master: bytes

    def secrets(self) -> Secrets:
        return secrets_of(self.app, self.master)

    def cold(self) -> None:
        self.app.envelope.configure(kms=self.kms, engine=self.engine)


@pytest.fixture
def setup(db_url: str, make_engine: Callable[..., sa.Engine]) -> Setup:
    master = os.urandom(32)
    kms = SwitchableKms(LocalKms(master))
    app = build()
    engine = make_engine(db_url)
    app.Base.metadata.create_all(engine)
    app.envelope.configure(kms=kms, engine=engine)
    with Session(engine) as s:  # every scope gets its key
        s.add_all([app.Patient(id=1, name="warm", email="warm@x.org"), app.Doctor(name="d")])
        s.commit()
    return Setup(app, engine, kms, master)


def write_planted(setup: Setup, **extra: Any) -> None:
    with Session(setup.engine) as s:
        s.add(setup.app.Patient(id=2, **{**PLANTED, **extra}))
        s.commit()


def patient_ids(setup: Setup) -> list[int]:
    with setup.engine.connect() as conn:
        return list(conn.execute(sa.text("SELECT id FROM patients ORDER BY id")).scalars())


def planted_rows(n: int) -> list[dict[str, Any]]:
    return [
        {"id": 10 + i, "name": PLANTED["name"], "email": f"{i}{PLANTED['email']}"} for i in range(n)
    ]


# -- SQL logs --------------------------------------------------------------------------------
def exercise(setup: Setup) -> None:
    a = setup.app
    write_planted(setup)
    with Session(setup.engine) as s:
        p = s.get(a.Patient, 2)
        assert p is not None and p.name == PLANTED["name"]
        p.ssn = "PLANTED-SSN-qz83-updated"
        s.commit()
        assert s.scalars(sa.select(a.Patient.id).where(a.Patient.email == PLANTED["email"])).one()
        s.scalars(sa.select(a.Patient).where(a.Patient.email.in_([PLANTED["email"]]))).all()
    with setup.engine.begin() as conn:
        t = a.Patient.__table__
        conn.execute(
            t.insert(),
            [
                {"id": 10 + i, "name": PLANTED["name"], "email": f"{i}{PLANTED['email']}"}
                for i in range(3)
            ],
        )
        conn.execute(t.update().where(t.c.id == 10).values(notes=PLANTED["notes"]))
        conn.execute(sa.select(t)).all()


def test_echo_logs_hold_no_plaintext(setup: Setup, caplog: pytest.LogCaptureFixture) -> None:
    setup.engine.echo = True
    with caplog.at_level(logging.INFO):
        exercise(setup)
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "INSERT INTO patients" in logged
    assert "\\x01\\x01\\x00" in logged  # the parameters were logged: as ciphertext
    setup.secrets().check_text(logged, "the echo=True log")


def test_library_logs_hold_no_key_material(setup: Setup, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="sqlalchemy_envelope"):
        setup.app.envelope.rotate("patients")
        exercise(setup)
        setup.app.envelope.destroy(setup.app.envelope.keys("staff")[0].id, force=True)
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "rotated scope 'patients'" in logged
    setup.secrets().check_text(logged, "the sqlalchemy_envelope log")


def test_echo_debug_logs_decrypted_rows(setup: Setup, caplog: pytest.LogCaptureFixture) -> None:
    # NOT protected, and documented: echo="debug" logs result rows after decryption.
    write_planted(setup)
    setup.engine.echo = "debug"
    with caplog.at_level(logging.DEBUG, logger="sqlalchemy.engine"), Session(setup.engine) as s:
        s.get(setup.app.Patient, 2)
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert PLANTED["name"] in logged


def test_engine_debug_logs_hold_wrapped_keys_never_unwrapped_ones(
    setup: Setup, caplog: pytest.LogCaptureFixture
) -> None:
    # NOT protected, and documented: with sqlalchemy.engine at DEBUG the keyring's own
    # engine logs its result rows, wrapped keys among them (what a dump holds anyway).
    with setup.engine.connect() as conn:
        table = setup.app.envelope.table
        wrapped = conn.execute(sa.select(table.c.wrapped_key)).scalars().all()
    setup.cold()  # a fresh process: keys are read from the keyring again
    with caplog.at_level(logging.DEBUG, logger="sqlalchemy.engine"), Session(setup.engine) as s:
        assert s.get(setup.app.Patient, 1) is not None
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert any(repr(bytes(w))[2:40] in logged for w in wrapped), logged[:2000]
    setup.secrets().check_text(logged, "the sqlalchemy.engine DEBUG log")


# -- errors in the middle of a flush ----------------------------------------------------------
FAILURES = {
    "kms-error": lambda: KmsError("the KMS is unreachable", code="KMSInternalException"),
    "broken-provider": lambda: RuntimeError("provider bug"),
}


@pytest.mark.parametrize("failure", FAILURES)
def test_kms_failure_mid_flush_hides_the_parameters(setup: Setup, failure: str) -> None:
    setup.cold()
    setup.kms.failure = FAILURES[failure]()
    with pytest.raises(KmsError) as info:  # ours, not SQLAlchemy's StatementError
        write_planted(setup)
    exc = info.value
    setup.kms.failure = None
    check_exception(exc, setup.secrets())
    assert patient_ids(setup) == [1]


def test_kms_failure_in_executemany_and_update(setup: Setup) -> None:
    t = setup.app.Patient.__table__
    setup.cold()
    setup.kms.failure = KmsError("down")
    rows = [
        {"id": 10 + i, "name": PLANTED["name"], "email": f"{i}{PLANTED['email']}"} for i in range(5)
    ]
    for stmt, params in (
        (t.insert(), rows),
        (t.update().where(t.c.id == 1).values(ssn=PLANTED["ssn"]), None),
        (sa.select(t).where(t.c.email == PLANTED["email"]), None),
    ):
        with pytest.raises(EnvelopeError) as info, setup.engine.begin() as conn:
            conn.execute(stmt, params)
        setup.kms.failure = None
        check_exception(info.value, setup.secrets())
        setup.kms.failure = KmsError("down")
    setup.kms.failure = None
    assert patient_ids(setup) == [1]


def test_wrong_value_types_name_the_column_not_the_value(setup: Setup) -> None:
    a = setup.app
    for model, values in (
        (a.Patient, {"id": 3, "name": 12345, "email": "x@x.org"}),
        (a.Patient, {"id": 3, "name": "n", "email": "x@x.org", "notes": {PLANTED["ssn"]: {1, 2}}}),
        (a.Visit, {"patient_id": 1, "reason": "r", "at": PLANTED["name"]}),
        (a.Visit, {"patient_id": 1, "reason": "r", "at": None, "color": PLANTED["ssn"]}),
        (a.Visit, {"patient_id": 1, "reason": "r", "at": None, "fee": PLANTED["name"]}),
    ):
        with pytest.raises(ValueTypeError) as info, Session(setup.engine) as s:
            s.add(model(**values))
            s.commit()
        assert "." in str(info.value)  # table.column
        check_exception(info.value, setup.secrets())


def test_too_deeply_nested_json_hides_the_parameters(setup: Setup) -> None:
    deep: Any = PLANTED["notes"]
    for _ in range(980):  # deep enough for the encoder, shallow enough for repr()
        deep = [deep]
    with pytest.raises(sa.exc.StatementError) as info:
        write_planted(setup, notes={"a": deep})
    assert isinstance(info.value.orig, RecursionError)
    check_exception(info.value, setup.secrets())


def test_missing_keyring_table_hides_the_parameters(
    db_url: str, make_engine: Callable[..., sa.Engine]
) -> None:
    app = build()
    engine = make_engine(db_url)
    app.Base.metadata.create_all(engine)
    app.envelope.table.drop(engine)
    master = os.urandom(32)
    app.envelope.configure(kms=LocalKms(master), engine=engine)
    missing = r"keyring table 'envelope_data_keys' does not exist"
    with pytest.raises(ConfigurationError, match=missing) as info, Session(engine) as s:
        s.add(app.Patient(id=2, **PLANTED))
        s.commit()
    assert "create_keyring_table" in str(info.value)
    check_exception(info.value, Secrets([master]))


@pytest.fixture
def stoppable_moto(aws_credentials: None) -> Iterator[ThreadedMotoServer]:  # noqa: F811
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    yield server
    server.stop()


def fast_client(endpoint: str) -> Any:
    config = Config(retries={"max_attempts": 1}, connect_timeout=1, read_timeout=2)
    return boto3.session.Session().client(
        "kms", region_name=REGION, endpoint_url=endpoint, config=config
    )


def test_aws_kms_unreachable_mid_flush(
    stoppable_moto: ThreadedMotoServer, sqlite_url: str, make_engine: Callable[..., sa.Engine]
) -> None:
    host, port = stoppable_moto.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    client = fast_client(endpoint)
    cmk = client.create_key()["KeyMetadata"]["Arn"]
    app = build()
    engine = make_engine(sqlite_url)
    app.Base.metadata.create_all(engine)
    app.envelope.configure(kms=AwsKms(cmk, client=client), engine=engine)
    with Session(engine) as s:
        s.add(app.Patient(id=1, name="warm", email="warm@x.org"))
        s.commit()
    secrets = secrets_of(app, b"")
    secrets.keys = [k for k in secrets.keys if k]
    stoppable_moto.stop()
    app.envelope.configure(kms=AwsKms(cmk, client=fast_client(endpoint)), engine=engine)
    with pytest.raises(KmsError) as info, Session(engine) as s:
        s.add(app.Patient(id=2, **PLANTED))
        s.commit()
    assert cmk in str(info.value)
    check_exception(info.value, secrets)
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM patients")).scalar_one() == 1
    stoppable_moto.start()  # the fixture stops it again


def test_decryption_errors_hold_no_plaintext(setup: Setup) -> None:
    write_planted(setup)
    raw = sa.table("patients", sa.column("id"), sa.column("name"), sa.column("ssn"))
    with setup.engine.begin() as conn:
        ssn = conn.execute(sa.select(raw.c.ssn).where(raw.c.id == 2)).scalar_one()
        conn.execute(raw.update().where(raw.c.id == 2).values(name=ssn))  # a transplant
    with pytest.raises(EnvelopeError) as info, Session(setup.engine) as s:
        s.get(setup.app.Patient, 2)
    check_exception(info.value, setup.secrets())


def test_authentic_values_of_another_type_raise_without_their_plaintext(setup: Setup) -> None:
    """A value that authenticates but does not decode (the column's type changed, or a value
    moved between same-named tables of one scope): the decoder's own error quotes the
    plaintext, so it must not ride along in the chain."""
    write_planted(setup)
    as_integer = sa.Table(
        "patients",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("ssn", Encrypted(sa.Integer, setup.app.envelope)),
    )
    with pytest.raises(DecryptionError) as info, setup.engine.connect() as conn:
        conn.execute(sa.select(as_integer.c.ssn).where(as_integer.c.id == 2)).all()
    check_exception(info.value, setup.secrets())


# -- reprs and pickles ------------------------------------------------------------------------
def envelope_objects(setup: Setup) -> dict[str, Any]:
    a = setup.app
    manager = a.envelope._keys()
    name_type = a.Patient.__table__.c.name.type
    crypter = name_type.crypter()
    data_key = next(iter(manager.cache._entries.values()))[1]
    return {
        "Envelope": a.envelope,
        "Encrypted": name_type,
        "ColumnCrypter": crypter,
        "Cipher": crypter.for_writing(),
        "DataKey": data_key,
        "LocalKms": setup.kms.inner,
        "Cache": manager.cache,
        "KeyManager": manager,
        "Keyring": manager.keyring,
        "Stats": a.envelope.stats,
        "GeneratedKey": setup.kms.inner.generate_data_key({"k": "v"}),
        "KeyInfo": a.envelope.keys()[0],
        "Column": a.Patient.__table__.c.name,
        "Table": a.Patient.__table__,
        "statement": sa.select(a.Patient).where(a.Patient.email == PLANTED["email"]),
    }


def test_reprs_hold_no_key_material(setup: Setup) -> None:
    write_planted(setup)
    secrets = setup.secrets()
    secrets.keys.append(
        setup.kms.inner.generate_data_key({"k": "v"}).plaintext
    )  # not the same as the one in objects, so check GeneratedKey explicitly below
    for name, obj in envelope_objects(setup).items():
        for text in (repr(obj), str(obj)):
            secrets.check_text(text, f"repr of {name}")
    generated = setup.kms.inner.generate_data_key({"k": "v"})
    assert generated.plaintext.hex() not in repr(generated)
    assert repr(generated.plaintext)[2:-1] not in repr(generated)


def test_aws_kms_repr(aws_credentials: None) -> None:  # noqa: F811
    from moto import mock_aws

    with mock_aws():
        client = boto3.session.Session().client("kms", region_name=REGION)
        kms = AwsKms(client.create_key()["KeyMetadata"]["Arn"], client=client)
        generated = kms.generate_data_key({"k": "v"})
        assert generated.plaintext.hex() not in repr(kms) + repr(generated)
        assert repr(kms).startswith("AwsKms(")
        with pytest.raises(TypeError):
            pickle.dumps(kms)


def test_pickles_hold_no_key_material(setup: Setup) -> None:
    write_planted(setup)
    secrets = setup.secrets()
    refused = []
    for name, obj in envelope_objects(setup).items():
        try:
            data = pickle.dumps(obj)
        except (TypeError, pickle.PicklingError, AttributeError):
            refused.append(name)
            continue
        secrets.check_bytes(data, f"pickle of {name}")
    # Whatever holds keys refuses outright.
    for name in (
        "Envelope",
        "ColumnCrypter",
        "DataKey",
        "GeneratedKey",
        "LocalKms",
        "Cache",
        "KeyManager",
    ):
        assert name in refused, name


def test_exceptions_pickle_without_secrets(setup: Setup) -> None:
    write_planted(setup)
    setup.cold()
    setup.kms.failure = KmsError("down", code="X")
    with pytest.raises(KmsError) as info, Session(setup.engine) as s:
        s.get(setup.app.Patient, 2)
    setup.kms.failure = None
    data = pickle.dumps(info.value)
    setup.secrets().check_bytes(data, "a pickled KmsError")


def test_envelope_without_configuration_repr() -> None:
    envelope = Envelope()
    assert "Envelope(" in repr(envelope)


class _Refusing(sa.types.TypeDecorator[str]):
    """A plaintext column type of the application's whose bind processor fails."""

    impl = sa.String
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: sa.Dialect) -> Any:
        raise ValueError("refused")


@pytest.mark.parametrize("failure", ["another column's processor", "a missing parameter"])
def test_errors_before_execution_hide_the_parameters(setup: Setup, failure: str) -> None:
    """Not only our own errors: any failure before the statement runs shows its raw values."""
    t = setup.app.Patient.__table__
    with pytest.raises(sa.exc.StatementError) as info, setup.engine.begin() as conn:
        if failure == "a missing parameter":
            conn.execute(t.insert(), [planted_rows(1)[0], {"id": 20, "email": "x@x.org"}])
        else:
            refusing = sa.bindparam("refusing", 2, type_=_Refusing())
            conn.execute(t.update().where(t.c.id == refusing).values(name=PLANTED["name"]))
    assert info.value.params is None
    check_exception(info.value, setup.secrets())
    assert patient_ids(setup) == [1]


def test_literal_rendering_is_refused_before_the_value_is_seen(setup: Setup) -> None:
    """SQLAlchemy quotes the value in its CompileError when a literal processor fails."""
    t = setup.app.Patient.__table__
    for statement in (
        t.insert().values(id=3, name=PLANTED["name"]),
        t.update().values(ssn=PLANTED["ssn"]),
        sa.select(sa.literal(PLANTED["name"], t.c.name.type)),
        sa.select(t.c.id).where(t.c.email == PLANTED["email"]),  # a lookup's stored forms
    ):
        with pytest.raises(ConfigurationError, match=r"SQL literals") as info:
            statement.compile(setup.engine, compile_kwargs={"literal_binds": True})
        check_exception(info.value, setup.secrets())
        assert "\\x01" not in str(info.value) and "b'" not in str(info.value)
