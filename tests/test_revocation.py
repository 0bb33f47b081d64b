"""How long memory outlives a change made elsewhere: ``keyring_refresh`` and ``cache_ttl``.

Two envelopes on one database stand for two processes: "ours" keeps working
from memory, "theirs" rotates or destroys keys. These are the windows
docs/SECURITY.md states.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from sqlalchemy_envelope import DecryptionError, KeyDestroyedError, KmsError, LocalKms, wire
from sqlalchemy_envelope.kms.base import GeneratedKey

from .attack import SwitchableKms
from .models import App, build


class Process:
    def __init__(
        self, url: str, make_engine: Callable[..., sa.Engine], kms: Any, **options: Any
    ) -> None:
        self.app: App = build(**options)
        self.engine = make_engine(url)
        self.app.Base.metadata.create_all(self.engine)
        self.app.envelope.configure(kms=kms, engine=self.engine)

    def write(self, row_id: int) -> int:
        with Session(self.engine) as s:
            s.add(self.app.Patient(id=row_id, name=f"n{row_id}", email=f"{row_id}@x.org"))
            s.commit()
        with self.engine.connect() as conn:
            raw = conn.execute(
                sa.text(f"SELECT name FROM patients WHERE id = {row_id}")
            ).scalar_one()
        key_id = wire.key_id_of(bytes(raw))
        assert key_id is not None
        return key_id

    def read(self, row_id: int) -> str:
        with Session(self.engine) as s:
            p = s.get(self.app.Patient, row_id)
            assert p is not None
            return str(p.name)


@pytest.fixture
def kms() -> LocalKms:
    return LocalKms(os.urandom(32))


def test_rotation_elsewhere_reaches_our_writes_within_keyring_refresh(
    db_url: str, make_engine: Callable[..., sa.Engine], kms: LocalKms
) -> None:
    ours = Process(db_url, make_engine, kms, keyring_refresh=1.0)
    theirs = Process(db_url, make_engine, kms)
    old = ours.write(1)
    new = theirs.app.envelope.rotate("patients")
    assert ours.write(2) == old  # still within keyring_refresh: the rotated-out key
    time.sleep(1.1)
    assert ours.write(3) == new
    assert [ours.read(i) for i in (1, 2, 3)] == ["n1", "n2", "n3"]


def test_a_destroyed_key_still_decrypts_elsewhere_until_cache_ttl(
    db_url: str, make_engine: Callable[..., sa.Engine], kms: LocalKms
) -> None:
    ours = Process(db_url, make_engine, kms, cache_ttl=2.0, keyring_refresh=0.2)
    theirs = Process(db_url, make_engine, kms)
    key = ours.write(1)
    assert ours.read(1) == "n1"
    loaded = time.monotonic()
    theirs.app.envelope.destroy(key, force=True)
    with pytest.raises(KeyDestroyedError):
        Process(db_url, make_engine, kms).read(1)  # a cold process: gone
    assert ours.read(1) == "n1"  # ours: from memory, until cache_ttl
    assert time.monotonic() - loaded < 2.0
    time.sleep(2.1)
    with pytest.raises(KeyDestroyedError, match=f"data key {key}"):
        ours.read(1)


def test_writes_under_a_key_destroyed_elsewhere_are_lost(
    db_url: str, make_engine: Callable[..., sa.Engine], kms: LocalKms
) -> None:
    # Why destroy() refuses keys in use, and why to rotate and reencrypt before destroying:
    # another process keeps writing under its active key for up to keyring_refresh.
    ours = Process(db_url, make_engine, kms, keyring_refresh=1.0)
    theirs = Process(db_url, make_engine, kms)
    key = ours.write(1)
    theirs.app.envelope.destroy(key, force=True)
    assert ours.write(2) == key  # written under a shredded key: unreadable elsewhere
    with pytest.raises(KeyDestroyedError):
        Process(db_url, make_engine, kms).read(2)
    time.sleep(1.1)
    fresh = ours.write(3)  # after keyring_refresh: a new active key
    assert fresh != key
    assert Process(db_url, make_engine, kms).read(3) == "n3"


def test_unwrapped_keys_leave_the_cache_on_destroy_and_expiry(
    db_url: str, make_engine: Callable[..., sa.Engine], kms: LocalKms
) -> None:
    ours = Process(db_url, make_engine, kms, cache_ttl=0.5)
    key = ours.write(1)
    cache = ours.app.envelope._keys().cache
    assert key in cache._entries  # in memory, in the clear, while in use
    ours.app.envelope.destroy(key, force=True)
    assert key not in cache._entries
    other = ours.write(2)
    expires, _ = cache._entries[other]
    assert expires - time.monotonic() <= 0.5
    time.sleep(0.6)
    crypters = list(ours.app.envelope._crypters)
    assert any(c.ciphers for c in crypters)  # expired, not yet dropped
    calls = ours.app.envelope.stats.kms_calls
    assert ours.read(2) == "n2"  # expired: asked the KMS again
    assert ours.app.envelope.stats.kms_calls == calls + 1
    # Loading a key drops every expired one from memory, with its column sub-keys.
    ours.app.envelope.rotate("patients")
    time.sleep(0.6)
    newest = ours.write(3)
    assert list(cache._entries) == [newest]
    assert {c.key_id for c in crypters for c in c.ciphers.values()} <= {newest}


# -- a KMS that lies --------------------------------------------------------------------------
class LyingKms(SwitchableKms):
    """Returns ``answer`` instead of the real data key on unwrap."""

    def __init__(self, inner: LocalKms, answer: bytes) -> None:
        super().__init__(inner)
        self.answer = answer

    def unwrap(self, wrapped: bytes, context: Mapping[str, str], kms_key_id: str) -> bytes:
        return self.answer

    def generate_data_key(self, context: Mapping[str, str]) -> GeneratedKey:
        return self.inner.generate_data_key(context)


def test_a_wrong_data_key_from_the_kms_is_detected(
    db_url: str, make_engine: Callable[..., sa.Engine], kms: LocalKms
) -> None:
    ours = Process(db_url, make_engine, kms)
    ours.write(1)
    ours.app.envelope.configure(kms=LyingKms(kms, os.urandom(32)), engine=ours.engine)
    with pytest.raises(DecryptionError):
        ours.read(1)


def test_a_data_key_of_the_wrong_size_is_refused(
    db_url: str, make_engine: Callable[..., sa.Engine], kms: LocalKms
) -> None:
    ours = Process(db_url, make_engine, kms)
    ours.write(1)
    ours.app.envelope.configure(kms=LyingKms(kms, os.urandom(16)), engine=ours.engine)
    with pytest.raises(KmsError, match="wrong size"):
        ours.read(1)


def test_aws_kms_talks_https_by_default() -> None:
    from sqlalchemy_envelope import AwsKms

    pytest.importorskip("boto3")
    kms = AwsKms("alias/app", region_name="eu-west-1")
    assert kms._client.meta.endpoint_url.startswith("https://")
