"""KMS outages: a warm cache rides them out until ``cache_ttl``; a cold one fails closed.

Failing closed means: ``KmsError`` (with the provider's code), the session
rolls back, and nothing reaches the database, neither the row nor a key.
Outages are simulated three ways: a switchable provider in front of LocalKms,
moto's HTTP server stopped, and AWS error responses injected with botocore's
Stubber into a real boto3 client.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import boto3
import pytest
import sqlalchemy as sa
from botocore.config import Config
from botocore.stub import Stubber
from moto import mock_aws
from moto.server import ThreadedMotoServer
from sqlalchemy.orm import Session

from sqlalchemy_envelope import AwsKms, KmsError, LocalKms
from sqlalchemy_envelope.kms.base import KeyProvider

from .attack import SwitchableKms
from .kms_fixtures import REGION, aws_credentials  # noqa: F401
from .models import build

TTL = 2.0  # long enough for a busy machine to do the warm part inside it
REFRESH = 0.25


class World:
    """An application database whose KMS can be broken."""

    def __init__(self, url: str, make_engine: Callable[..., sa.Engine], kms: KeyProvider) -> None:
        self.app = build(cache_ttl=TTL, keyring_refresh=REFRESH)
        self.engine = make_engine(url)
        self.observer = make_engine(url, poolclass=sa.NullPool)  # not the envelope's engine
        self.app.Base.metadata.create_all(self.engine)
        self.configure(kms)
        with Session(self.engine) as s:
            s.add(self.app.Patient(id=1, name="first", email="first@x.org", ssn="1"))
            s.add(self.app.Doctor(id=1, name="Dr. First", plain="p"))
            s.commit()

    def configure(self, kms: KeyProvider) -> None:
        """(Re)configure: a cold cache, as in a freshly started process."""
        self.app.envelope.configure(kms=kms, engine=self.engine)

    def read(self, row_id: int = 1) -> str:
        with Session(self.engine) as s:
            p = s.get(self.app.Patient, row_id)
            assert p is not None
            return str(p.name)

    def write(self, row_id: int) -> None:
        with Session(self.engine) as s:
            # Something that needs no key first, in the same transaction.
            s.execute(sa.text("UPDATE doctors SET plain = 'changed'"))
            s.add(self.app.Patient(id=row_id, name=f"n{row_id}", email=f"{row_id}@x.org"))
            s.commit()

    def lookup(self, email: str) -> list[int]:
        with Session(self.engine) as s:
            stmt = sa.select(self.app.Patient.id).where(self.app.Patient.email == email)
            return list(s.scalars(stmt))

    def state(self) -> tuple[list[int], str | None, int]:
        """Patient ids, the doctor's plain column, and the number of keys."""
        with self.observer.connect() as conn:
            ids = list(conn.execute(sa.text("SELECT id FROM patients ORDER BY id")).scalars())
            plain = conn.execute(sa.text("SELECT plain FROM doctors")).scalar()
            keys = conn.execute(sa.select(sa.func.count()).select_from(self.app.envelope.table))
            return ids, plain, int(keys.scalar_one())


def assert_fails_closed(
    world: World, action: Callable[[], Any], code: str | None = None
) -> KmsError:
    before = world.state()
    with pytest.raises(KmsError) as info:
        action()
    if code is not None:
        assert info.value.code == code, info.value
    assert world.state() == before
    return info.value


# -- a provider switched off ----------------------------------------------------------------
@pytest.fixture
def switchable(db_url: str, make_engine: Callable[..., sa.Engine]) -> tuple[World, SwitchableKms]:
    kms = SwitchableKms(LocalKms(os.urandom(32)))
    return World(db_url, make_engine, kms), kms


def test_nulls_need_no_key_during_an_outage(switchable: tuple[World, SwitchableKms]) -> None:
    """NULL is stored unencrypted: a cold process writes and reads it with the KMS down."""
    world, kms = switchable
    world.configure(kms)  # cold
    kms.failure = KmsError("KMS unreachable", code="ServiceUnavailable")
    patients = world.app.Patient.__table__
    with world.engine.begin() as conn:
        conn.execute(patients.update().where(patients.c.id == 1).values(ssn=None, notes=None))
    with world.engine.connect() as conn:
        assert conn.execute(sa.select(patients.c.ssn, patients.c.notes)).one() == (None, None)
    kms.failure = None
    assert world.read() == "first"


def test_warm_cache_rides_out_an_outage_until_cache_ttl(
    switchable: tuple[World, SwitchableKms],
) -> None:
    world, kms = switchable
    assert world.read() == "first"
    warmed = time.monotonic()
    kms.failure = KmsError("KMS unreachable", code="ServiceUnavailable")
    calls = world.app.envelope.stats.kms_calls
    world.write(2)  # reads, writes and lookups keep working from memory
    assert world.read(2) == "n2" and world.lookup("2@x.org") == [2]
    assert world.app.envelope.stats.kms_calls == calls
    assert time.monotonic() - warmed < TTL, "the test machine is too slow for this TTL"
    time.sleep(TTL + 0.1)
    error = assert_fails_closed(world, world.read, "ServiceUnavailable")
    assert "data key" in str(error)
    assert_fails_closed(world, lambda: world.write(3), "ServiceUnavailable")
    assert_fails_closed(world, lambda: world.lookup("2@x.org"), "ServiceUnavailable")
    kms.failure = None
    assert world.read(2) == "n2"  # back as soon as the KMS is
    world.write(3)


def test_cold_cache_fails_closed(switchable: tuple[World, SwitchableKms]) -> None:
    world, kms = switchable
    kms.failure = KmsError("KMS unreachable", code="ServiceUnavailable")
    world.configure(kms)
    assert_fails_closed(world, world.read, "ServiceUnavailable")
    assert_fails_closed(world, lambda: world.write(2), "ServiceUnavailable")
    kms.failure = None
    world.write(2)
    assert world.read(2) == "n2"


def test_a_new_scope_cannot_get_its_first_key_during_an_outage(
    switchable: tuple[World, SwitchableKms],
) -> None:
    world, kms = switchable
    with world.engine.begin() as conn:  # as if "staff" had never had a key
        conn.execute(sa.text("DELETE FROM doctors"))
        conn.execute(
            world.app.envelope.table.delete().where(world.app.envelope.table.c.scope == "staff")
        )
    kms.failure = KmsError("AccessDenied", code="AccessDeniedException")
    world.configure(kms)

    def add_doctor() -> None:
        with Session(world.engine) as s:
            s.add(world.app.Doctor(id=2, name="Dr. Second"))
            s.commit()

    assert_fails_closed(world, add_doctor, "AccessDeniedException")
    assert world.app.envelope.keys("staff") == []
    # Work that needs no key of that scope goes on (SQLite prepares scopes as a
    # transaction begins: a failure there is left to the statement that needs the key).
    with world.engine.begin() as conn:
        conn.execute(sa.text("UPDATE doctors SET plain = 'still writable'"))
    kms.failure = None
    add_doctor()
    assert len(world.app.envelope.keys("staff")) == 1


def test_session_is_usable_after_a_failed_flush(switchable: tuple[World, SwitchableKms]) -> None:
    world, kms = switchable
    kms.failure = KmsError("down")
    world.configure(kms)
    with Session(world.engine) as s:
        s.add(world.app.Patient(id=2, name="x", email="x@x.org"))
        with pytest.raises(KmsError):
            s.flush()
        s.rollback()
        kms.failure = None
        s.add(world.app.Patient(id=3, name="y", email="y@x.org"))
        s.commit()
    assert world.state()[0] == [1, 3]


# -- moto's HTTP server stopped ----------------------------------------------------------------
@pytest.fixture
def moto_endpoint(aws_credentials: None) -> Iterator[tuple[ThreadedMotoServer, str]]:  # noqa: F811
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield server, f"http://{host}:{port}"
    server.stop()


def client_for(endpoint: str | None) -> Any:
    # No retries and short timeouts: an outage shows in milliseconds, not after backoff.
    config = Config(retries={"total_max_attempts": 1}, connect_timeout=1, read_timeout=2)
    return boto3.session.Session().client(
        "kms", region_name=REGION, endpoint_url=endpoint, config=config
    )


def test_aws_outage_warm_then_expired_then_cold(
    moto_endpoint: tuple[ThreadedMotoServer, str],
    db_url: str,
    make_engine: Callable[..., sa.Engine],
) -> None:
    server, endpoint = moto_endpoint
    client = client_for(endpoint)
    cmk = client.create_key()["KeyMetadata"]["Arn"]
    world = World(db_url, make_engine, AwsKms(cmk, client=client))
    assert world.read() == "first"
    server.stop()
    world.write(2)
    assert world.read(2) == "n2"
    time.sleep(TTL + 0.1)
    error = assert_fails_closed(world, world.read)
    assert cmk in str(error) and "Decrypt" in str(error)
    assert_fails_closed(world, lambda: world.write(3))
    world.configure(AwsKms(cmk, client=client_for(endpoint)))
    assert_fails_closed(world, world.read)
    server.start()  # stopped again by the fixture


# -- AWS errors injected with Stubber into a real boto3 client ----------------------------------
@pytest.fixture
def aws_world(
    aws_credentials: None,  # noqa: F811
    db_url: str,
    make_engine: Callable[..., sa.Engine],
) -> Iterator[tuple[World, str]]:
    with mock_aws():
        client = client_for(None)
        cmk = client.create_key()["KeyMetadata"]["Arn"]
        yield World(db_url, make_engine, AwsKms(cmk, client=client)), cmk


@pytest.mark.parametrize(
    "code",
    [
        "DisabledException",
        "AccessDeniedException",
        "ThrottlingException",
        "KMSInvalidStateException",
    ],
)
def test_injected_aws_errors_fail_closed(aws_world: tuple[World, str], code: str) -> None:
    world, cmk = aws_world
    client = client_for(None)
    with Stubber(client) as stubber:
        for _ in range(3):  # a read, a write, a new scope's first key
            stubber.add_client_error("decrypt", service_error_code=code, service_message=f"{code}!")
        world.configure(AwsKms(cmk, client=client))
        error = assert_fails_closed(world, world.read, code)
        assert f"{code}: {code}!" in str(error) and "'patients'" in str(error)
        assert_fails_closed(world, lambda: world.write(2), code)
        assert_fails_closed(world, lambda: world.lookup("first@x.org"), code)
        stubber.assert_no_pending_responses()


def test_injected_error_on_generate_data_key(aws_world: tuple[World, str]) -> None:
    world, cmk = aws_world
    client = client_for(None)
    with world.engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM doctors"))
        conn.execute(
            world.app.envelope.table.delete().where(world.app.envelope.table.c.scope == "staff")
        )
    with Stubber(client) as stubber:
        # SQLite asks once as the transaction begins (and lets it begin), once for the flush.
        for _ in range(2 if world.engine.dialect.name == "sqlite" else 1):
            stubber.add_client_error("generate_data_key", service_error_code="DisabledException")
        world.configure(AwsKms(cmk, client=client))

        def add_doctor() -> None:
            with Session(world.engine) as s:
                s.add(world.app.Doctor(id=2, name="Dr. Second"))
                s.commit()

        assert_fails_closed(world, add_doctor, "DisabledException")
        stubber.assert_no_pending_responses()
    assert world.app.envelope.keys("staff") == []
