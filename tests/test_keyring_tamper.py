"""An attacker with write access edits the keyring table (SQLite and Postgres; LocalKms and AWS).

A wrapped key is bound to its scope by the KMS encryption context, and each
value to its data key by AEAD: a key moved to another scope does not unwrap
(``KmsError``), a key swapped with another of the same scope unwraps but
opens nothing (``DecryptionError``). Each test reads with a cold cache, as a
freshly started process would.
"""

from __future__ import annotations

import datetime as dt
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from moto import mock_aws
from sqlalchemy.orm import Session

from sqlalchemy_envelope import (
    DecryptionError,
    KeyDestroyedError,
    KeyNotFoundError,
    KmsError,
    LocalKms,
    wire,
)
from sqlalchemy_envelope.kms.base import KeyProvider

from .attack import ALICE, Db, outcome, populate
from .kms_fixtures import *  # noqa: F403
from .kms_fixtures import KmsBackend
from .models import build

NEW_NAME = "Alice Afterrotation"


@pytest.fixture(params=["local", "aws-in-process", "aws-server"])
def kms(request: pytest.FixtureRequest) -> Iterator[KeyProvider]:
    if request.param == "local":
        yield LocalKms(os.urandom(32))
        return
    request.getfixturevalue("aws_credentials")
    if request.param == "aws-server":
        backend = KmsBackend("server", request.getfixturevalue("moto_server"))
        yield backend.provider(backend.create_cmk().arn)
        return
    with mock_aws():
        backend = KmsBackend("in-process", None)
        yield backend.provider(backend.create_cmk().arn)


@pytest.fixture
def db(db_url: str, make_engine: Callable[..., sa.Engine], kms: KeyProvider) -> Db:
    """Patients under two keys (ssn before a rotation, name after), a doctor in scope 'staff'."""
    app = build()
    engine = make_engine(db_url)
    app.Base.metadata.create_all(engine)
    app.envelope.configure(kms=kms, engine=engine)
    populate(app, engine)
    app.envelope.rotate("patients")
    with Session(engine) as s:
        s.get(app.Patient, 1).name = NEW_NAME
        s.commit()
    return Db(app, engine)


def keyrow(db: Db, key_id: int) -> Any:
    t = db.app.envelope.table
    with db.engine.connect() as conn:
        return conn.execute(sa.select(t).where(t.c.id == key_id)).one()


def edit_key(db: Db, key_id: int, **values: Any) -> None:
    t = db.app.envelope.table
    with db.engine.begin() as conn:
        assert conn.execute(t.update().where(t.c.id == key_id).values(**values)).rowcount == 1


def cold(db: Db) -> None:
    """Forget every key in memory, as a new process would start."""
    db.app.envelope.configure(kms=db.app.envelope.kms, engine=db.engine)


def key_of(db: Db, table: str, column: str, row_id: int = 1) -> int:
    key_id = wire.key_id_of(db.raw(table, column, row_id))
    assert key_id is not None
    return key_id


def write_patient(db: Db) -> Any:
    with Session(db.engine) as s:
        s.add(db.app.Patient(id=3, name="Carol New", email="carol@x.org"))
        s.commit()


def patient_count(db: Db) -> int:
    with db.engine.connect() as conn:
        return int(conn.execute(sa.text("SELECT count(*) FROM patients")).scalar_one())


# -- a wrapped key moved to another scope: the KMS context binding refuses it ---------------
def test_wrapped_key_copied_from_another_scope_does_not_unwrap(db: Db) -> None:
    patients, staff = key_of(db, "patients", "name"), key_of(db, "doctors", "name")
    edit_key(db, patients, wrapped_key=keyrow(db, staff).wrapped_key)
    cold(db)
    with pytest.raises(KmsError) as info:
        db.read("patients", "name")
    assert info.value.code == "InvalidCiphertextException"
    assert f"key {patients}" in str(info.value) and "'patients'" in str(info.value)


def test_key_row_relabelled_to_another_scope_does_not_unwrap(db: Db) -> None:
    staff = key_of(db, "doctors", "name")
    edit_key(db, staff, scope="patients", active_scope=None, state="retired")
    cold(db)
    with pytest.raises(KmsError) as info:
        db.read("doctors", "name")
    assert info.value.code == "InvalidCiphertextException"


def test_wrapped_keys_swapped_across_scopes_do_not_unwrap(db: Db) -> None:
    patients, staff = key_of(db, "patients", "name"), key_of(db, "doctors", "name")
    a, b = keyrow(db, patients).wrapped_key, keyrow(db, staff).wrapped_key
    edit_key(db, patients, wrapped_key=b)
    edit_key(db, staff, wrapped_key=a)
    cold(db)
    for table in ("patients", "doctors"):
        result = outcome(lambda table=table: db.read(table, "name"))  # type: ignore[misc]
        assert isinstance(result, KmsError), result
        assert result.code == "InvalidCiphertextException"


# -- wrapped keys swapped within a scope: they unwrap, and nothing authenticates ------------
def test_wrapped_keys_swapped_within_a_scope_are_detected(db: Db) -> None:
    old, new = key_of(db, "patients", "ssn"), key_of(db, "patients", "name")
    assert old != new
    a, b = keyrow(db, old).wrapped_key, keyrow(db, new).wrapped_key
    edit_key(db, old, wrapped_key=b)
    edit_key(db, new, wrapped_key=a)
    cold(db)
    with pytest.raises(DecryptionError, match=rf"patients\.ssn \(key {old}\)"):
        db.read("patients", "ssn")
    with pytest.raises(DecryptionError, match=rf"patients\.name \(key {new}\)"):
        db.read("patients", "name")


def test_a_values_key_id_pointed_at_the_swapped_key_still_fails(db: Db) -> None:
    # Swapping the value's key id instead (to the other key of the scope) is detected too.
    old, new = key_of(db, "patients", "ssn"), key_of(db, "patients", "name")
    value = db.raw("patients", "ssn")
    db.put("patients", "ssn", value[:2] + new.to_bytes(4, "big") + value[6:])
    cold(db)
    with pytest.raises(DecryptionError, match=rf"key {new}"):
        db.read("patients", "ssn")
    assert old != new


# -- other edits of key rows ------------------------------------------------------------
def test_corrupted_wrapped_key_does_not_unwrap(db: Db) -> None:
    key_id = key_of(db, "patients", "name")
    wrapped = bytearray(keyrow(db, key_id).wrapped_key)
    wrapped[len(wrapped) // 2] ^= 0x01
    edit_key(db, key_id, wrapped_key=bytes(wrapped))
    cold(db)
    with pytest.raises(KmsError, match=rf"key {key_id}"):
        db.read("patients", "name")


def test_changed_kms_key_id_does_not_unwrap(db: Db) -> None:
    key_id = key_of(db, "patients", "name")
    edit_key(db, key_id, kms_key_id="local:0000000000000000")
    cold(db)
    with pytest.raises(KmsError, match=rf"key {key_id}"):
        db.read("patients", "name")


def test_key_marked_destroyed_is_reported(db: Db) -> None:
    key_id = key_of(db, "patients", "ssn")
    edit_key(db, key_id, state="destroyed", wrapped_key=None, active_scope=None)
    cold(db)
    with pytest.raises(KeyDestroyedError, match=rf"data key {key_id}"):
        db.read("patients", "ssn")


def test_deleted_key_row_is_key_not_found(db: Db) -> None:
    key_id = key_of(db, "patients", "ssn")
    t = db.app.envelope.table
    with db.engine.begin() as conn:
        conn.execute(t.delete().where(t.c.id == key_id))
    cold(db)
    with pytest.raises(KeyNotFoundError, match=rf"data key {key_id}"):
        db.read("patients", "ssn")


def test_forged_active_key_fails_closed_and_writes_nothing(db: Db) -> None:
    # An attacker cannot make the application write under a key of their choosing: a key
    # row the CMK did not wrap for this scope does not unwrap, and the write is refused.
    t = db.app.envelope.table
    with db.engine.begin() as conn:
        conn.execute(
            t.update()
            .where(t.c.active_scope == "patients")
            .values(state="retired", active_scope=None)
        )
        conn.execute(
            t.insert().values(
                scope="patients",
                state="active",
                active_scope="patients",
                wrapped_key=os.urandom(80),
                kms_key_id=keyrow(db, key_of(db, "patients", "name")).kms_key_id,
                created_at=dt.datetime.now(dt.timezone.utc),
            )
        )
    cold(db)
    before = patient_count(db)
    result = outcome(lambda: write_patient(db))
    assert isinstance(result, KmsError), result
    assert patient_count(db) == before
    assert db.read("patients", "name") == NEW_NAME  # stored values stay readable


def test_a_warm_process_writes_under_no_key_relabelled_from_another_scope(db: Db) -> None:
    # The running process holds both scopes' keys. Relabelled the patients' active key,
    # the staff key is not used for 'patients' from memory: it is unwrapped again for
    # 'patients', and the KMS refuses it, as in a new process.
    envelope = db.app.envelope
    envelope.keyring_refresh = 0.05
    cold(db)
    assert db.read("patients", "name") == NEW_NAME and db.read("doctors", "name")
    write_patient(db)  # the active key of 'patients' is in memory too
    staff, active = key_of(db, "doctors", "name"), key_of(db, "patients", "name")
    edit_key(db, active, state="retired", active_scope=None)
    edit_key(db, staff, scope="patients", active_scope="patients")
    time.sleep(0.1)  # keyring_refresh: the process reads which key is active again
    before = patient_count(db)
    with Session(db.engine) as s:
        s.add(db.app.Patient(id=4, name="Dave New", email="dave@x.org"))
        result = outcome(s.commit)
    assert isinstance(result, KmsError) and result.code == "InvalidCiphertextException"
    assert patient_count(db) == before


def test_active_key_demoted_only_selects_another_key_of_the_scope(db: Db) -> None:
    # Changing which key is active is not detected, but only picks among keys the CMK
    # wrapped for this scope: here the next write creates a new one; everything reads.
    active = key_of(db, "patients", "name")
    edit_key(db, active, state="retired", active_scope=None)
    cold(db)
    write_patient(db)
    assert key_of(db, "patients", "name", 3) not in (active, key_of(db, "patients", "ssn"))
    assert db.read_orm(1)["name"] == NEW_NAME
    assert db.read_orm(3)["name"] == "Carol New"


def test_restored_wrapped_key_revives_shredded_values(db: Db) -> None:
    # NOT protected: destroy() deletes the wrapped key from the keyring, but a backup taken
    # before still holds it, and it unwraps for as long as the CMK exists and allows it.
    key_id = key_of(db, "patients", "ssn")
    backup = keyrow(db, key_id)
    db.app.envelope.destroy(key_id, force=True)
    with pytest.raises(KeyDestroyedError):
        db.read("patients", "ssn")
    edit_key(db, key_id, state="retired", wrapped_key=backup.wrapped_key)
    cold(db)
    assert db.read("patients", "ssn") == ALICE["ssn"]


def test_a_retired_key_made_active_again_takes_the_writes(db: Db) -> None:
    # NOT protected: which key of a scope is active is not authenticated. Someone who
    # can write the keyring can make an older key of the scope active again (one that
    # leaked, say), and new values go under it.
    old, active = key_of(db, "patients", "ssn"), key_of(db, "patients", "name")
    edit_key(db, active, state="retired", active_scope=None)
    edit_key(db, old, state="active", active_scope="patients")
    cold(db)
    write_patient(db)
    assert key_of(db, "patients", "name", 3) == old


def test_an_old_wrapped_key_does_not_unwrap_after_a_rewrap_under_a_new_master(
    db_url: str, make_engine: Callable[..., sa.Engine]
) -> None:
    # The remedy for the two above: move the keys to a new master key and retire the
    # old one; a wrapped key restored from before the rewrap no longer unwraps.
    app = build()
    engine = make_engine(db_url)
    app.Base.metadata.create_all(engine)
    app.envelope.configure(kms=LocalKms(os.urandom(32)), engine=engine)
    populate(app, engine)
    db = Db(app, engine)
    key_id = key_of(db, "patients", "ssn")
    before = keyrow(db, key_id).wrapped_key
    app.envelope.rewrap(LocalKms(os.urandom(32)))
    edit_key(db, key_id, wrapped_key=before)
    cold(db)
    with pytest.raises(KmsError):
        db.read("patients", "ssn")
