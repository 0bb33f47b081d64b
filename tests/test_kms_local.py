"""LocalKms: wrapping, context binding, loading the master key, keeping it secret."""

from __future__ import annotations

import base64
import copy
import os
import pickle
import re
import stat
import threading
import traceback
from pathlib import Path

import pytest

from sqlalchemy_envelope.errors import ConfigurationError, KmsError
from sqlalchemy_envelope.kms import KeyProvider, LocalKms, scope_context

MASTER = bytes(range(32))
CONTEXT = scope_context("patients")

# Known answer: pins the fingerprint (stored in keyrings) and the wrapped format,
# so a change to either is a visible, deliberate break. Checked independently
# against HKDF-SHA256 + AES-256-GCM when written.
KAT_FINGERPRINT = "local:632d8dad3c025e9b"
KAT_DATA_KEY = bytes(range(32, 64))
KAT_WRAPPED = bytes.fromhex(
    "01915cd95172a98ebf84ff9841831706d47d957b74486e0e0044ec6d29606d6c5d"
    "2861c9ae86ec9df80e35b547aec992352ca0cae5f4c793054ef03626"
)


@pytest.fixture
def kms() -> LocalKms:
    return LocalKms(MASTER)


def secret_forms(key: bytes) -> list[str]:
    """Ways a key could show up in text."""
    return [key.hex(), key.hex().upper(), base64.b64encode(key).decode(), repr(key)[2:-1]]


def assert_no_secret(text: str, key: bytes) -> None:
    for form in secret_forms(key):
        assert form not in text


# -- wrapping ---------------------------------------------------------------------------


def test_is_a_key_provider(kms: LocalKms) -> None:
    assert isinstance(kms, KeyProvider)


def test_generate_and_unwrap_round_trip(kms: LocalKms) -> None:
    generated = kms.generate_data_key(CONTEXT)
    assert len(generated.plaintext) == 32
    assert generated.kms_key_id == kms.kms_key_id
    assert kms.unwrap(generated.wrapped, CONTEXT, generated.kms_key_id) == generated.plaintext


def test_wrap_and_unwrap_round_trip(kms: LocalKms) -> None:
    data_key = os.urandom(32)
    wrapped, kms_key_id = kms.wrap(data_key, CONTEXT)
    assert kms.unwrap(wrapped, CONTEXT, kms_key_id) == data_key


def test_wrapped_format(kms: LocalKms) -> None:
    wrapped, _ = kms.wrap(KAT_DATA_KEY, CONTEXT)
    assert len(wrapped) == 1 + 12 + 32 + 16
    assert wrapped[0] == 1
    assert KAT_DATA_KEY not in wrapped


def test_wrapping_is_randomized(kms: LocalKms) -> None:
    first, _ = kms.wrap(KAT_DATA_KEY, CONTEXT)
    second, _ = kms.wrap(KAT_DATA_KEY, CONTEXT)
    assert first != second


def test_generated_keys_differ(kms: LocalKms) -> None:
    assert kms.generate_data_key(CONTEXT).plaintext != kms.generate_data_key(CONTEXT).plaintext


def test_known_answer(kms: LocalKms) -> None:
    assert kms.kms_key_id == KAT_FINGERPRINT
    assert kms.unwrap(KAT_WRAPPED, CONTEXT, KAT_FINGERPRINT) == KAT_DATA_KEY


def test_context_order_does_not_matter(kms: LocalKms) -> None:
    wrapped, kms_key_id = kms.wrap(KAT_DATA_KEY, {"a": "1", "b": "2"})
    assert kms.unwrap(wrapped, {"b": "2", "a": "1"}, kms_key_id) == KAT_DATA_KEY


def test_wrap_refuses_a_bad_data_key(kms: LocalKms) -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        kms.wrap(b"short", CONTEXT)
    with pytest.raises(TypeError):
        kms.wrap("x" * 32, CONTEXT)  # type: ignore[arg-type]


# -- every way an unwrap can fail ---------------------------------------------------------


def test_unwrap_with_another_scope_fails(kms: LocalKms) -> None:
    wrapped, kms_key_id = kms.wrap(KAT_DATA_KEY, CONTEXT)
    with pytest.raises(KmsError, match=r"wrong master key .* or wrong scope") as info:
        kms.unwrap(wrapped, scope_context("doctors"), kms_key_id)
    assert info.value.code == "InvalidCiphertextException"


def test_unwrap_with_an_empty_context_fails(kms: LocalKms) -> None:
    wrapped, kms_key_id = kms.wrap(KAT_DATA_KEY, CONTEXT)
    with pytest.raises(KmsError):
        kms.unwrap(wrapped, {}, kms_key_id)


def test_unwrap_under_another_master_key_fails(kms: LocalKms) -> None:
    other = LocalKms(os.urandom(32))
    wrapped, kms_key_id = other.wrap(KAT_DATA_KEY, CONTEXT)
    with pytest.raises(KmsError, match=re.escape(kms_key_id)) as info:
        kms.unwrap(wrapped, CONTEXT, kms_key_id)
    assert info.value.code == "IncorrectKeyException"
    # Even when the stored key id is wrong too, the tag check still refuses it.
    with pytest.raises(KmsError, match=re.escape(kms.kms_key_id)):
        kms.unwrap(wrapped, CONTEXT, kms.kms_key_id)


def test_unwrap_of_a_foreign_key_id_fails(kms: LocalKms) -> None:
    wrapped, _ = kms.wrap(KAT_DATA_KEY, CONTEXT)
    with pytest.raises(KmsError, match="arn:aws:kms"):
        kms.unwrap(wrapped, CONTEXT, "arn:aws:kms:us-east-1:123456789012:key/abc")


@pytest.mark.parametrize("position", range(61))
def test_every_flipped_byte_fails(kms: LocalKms, position: int) -> None:
    wrapped = bytearray(KAT_WRAPPED)
    wrapped[position] ^= 0x01
    with pytest.raises(KmsError):
        kms.unwrap(bytes(wrapped), CONTEXT, KAT_FINGERPRINT)


@pytest.mark.parametrize("length", [0, 1, 13, 28, 29, 60])
def test_truncated_fails(kms: LocalKms, length: int) -> None:
    with pytest.raises(KmsError):
        kms.unwrap(KAT_WRAPPED[:length], CONTEXT, KAT_FINGERPRINT)


def test_appended_bytes_fail(kms: LocalKms) -> None:
    with pytest.raises(KmsError):
        kms.unwrap(KAT_WRAPPED + b"\x00", CONTEXT, KAT_FINGERPRINT)


def test_unknown_version_fails(kms: LocalKms) -> None:
    with pytest.raises(KmsError):
        kms.unwrap(b"\x02" + KAT_WRAPPED[1:], CONTEXT, KAT_FINGERPRINT)


def test_unwrap_error_holds_no_key_material(kms: LocalKms) -> None:
    with pytest.raises(KmsError) as info:
        kms.unwrap(KAT_WRAPPED, scope_context("other"), KAT_FINGERPRINT)
    text = "".join(traceback.format_exception(info.value))
    assert_no_secret(text, MASTER)
    assert_no_secret(text, KAT_DATA_KEY)


# -- owns and rewrap ----------------------------------------------------------------------


def test_key_id_is_a_fingerprint_not_the_key(kms: LocalKms) -> None:
    assert re.fullmatch(r"local:[0-9a-f]{16}", kms.kms_key_id)
    assert_no_secret(kms.kms_key_id, MASTER)
    assert LocalKms(os.urandom(32)).kms_key_id != kms.kms_key_id


def test_owns(kms: LocalKms) -> None:
    assert kms.owns(kms.kms_key_id)
    assert LocalKms(MASTER).owns(kms.kms_key_id)
    assert not kms.owns(LocalKms(os.urandom(32)).kms_key_id)
    assert not kms.owns("arn:aws:kms:us-east-1:123456789012:key/abc")


def test_rewrap_from_another_master_key(kms: LocalKms) -> None:
    target = LocalKms(os.urandom(32))
    generated = kms.generate_data_key(CONTEXT)
    wrapped, kms_key_id = target.rewrap_from(kms, generated.wrapped, CONTEXT, generated.kms_key_id)
    assert kms_key_id == target.kms_key_id
    assert target.owns(kms_key_id)
    assert target.unwrap(wrapped, CONTEXT, kms_key_id) == generated.plaintext
    with pytest.raises(KmsError):
        kms.unwrap(wrapped, CONTEXT, kms.kms_key_id)


def test_rewrap_keeps_the_context_binding(kms: LocalKms) -> None:
    target = LocalKms(os.urandom(32))
    generated = kms.generate_data_key(CONTEXT)
    wrapped, kms_key_id = target.rewrap_from(kms, generated.wrapped, CONTEXT, generated.kms_key_id)
    with pytest.raises(KmsError):
        target.unwrap(wrapped, scope_context("doctors"), kms_key_id)


# -- construction -------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 16, 31, 33, 64])
def test_master_key_must_be_32_bytes(size: int) -> None:
    with pytest.raises(ValueError, match="exactly 32 bytes"):
        LocalKms(b"k" * size)


@pytest.mark.parametrize("value", [base64.b64encode(MASTER).decode(), MASTER.hex(), None, 42])
def test_master_key_must_be_bytes(value: object) -> None:
    with pytest.raises(TypeError, match="from_env"):
        LocalKms(value)  # type: ignore[arg-type]


def test_generate_key() -> None:
    first, second = LocalKms.generate_key(), LocalKms.generate_key()
    assert first != second
    assert len(first) == 44
    assert len(base64.b64decode(first, validate=True)) == 32
    LocalKms(base64.b64decode(first))


# -- keeping the key secret ------------------------------------------------------------------


def test_repr_shows_only_the_fingerprint(kms: LocalKms) -> None:
    assert repr(kms) == f"LocalKms({KAT_FINGERPRINT})"
    assert_no_secret(repr(kms), MASTER)
    assert_no_secret(str(kms), MASTER)


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_pickling_is_refused(kms: LocalKms, protocol: int) -> None:
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(kms, protocol=protocol)


def test_copies_share_the_object(kms: LocalKms) -> None:
    assert copy.copy(kms) is kms
    assert copy.deepcopy({"kms": kms})["kms"] is kms


def test_no_instance_dict_holds_the_key(kms: LocalKms) -> None:
    assert not hasattr(kms, "__dict__")
    assert not hasattr(kms, "master_key")


# -- from_env ---------------------------------------------------------------------------------

VAR = "SQLALCHEMY_ENVELOPE_MASTER_KEY"


@pytest.mark.parametrize(
    "text",
    [
        base64.b64encode(MASTER).decode(),
        MASTER.hex(),
        MASTER.hex().upper(),
        "  " + base64.b64encode(MASTER).decode() + "\n",
    ],
    ids=["base64", "hex", "HEX", "whitespace"],
)
def test_from_env(monkeypatch: pytest.MonkeyPatch, text: str) -> None:
    monkeypatch.setenv(VAR, text)
    assert LocalKms.from_env().kms_key_id == KAT_FINGERPRINT


def test_from_env_other_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(VAR, raising=False)
    monkeypatch.setenv("APP_KEY", base64.b64encode(MASTER).decode())
    assert LocalKms.from_env("APP_KEY").kms_key_id == KAT_FINGERPRINT


@pytest.mark.parametrize("value", [None, "", "   "], ids=["unset", "empty", "blank"])
def test_from_env_missing(monkeypatch: pytest.MonkeyPatch, value: str | None) -> None:
    if value is None:
        monkeypatch.delenv(VAR, raising=False)
    else:
        monkeypatch.setenv(VAR, value)
    with pytest.raises(ConfigurationError, match=VAR) as info:
        LocalKms.from_env()
    assert "python -c" in str(info.value)
    assert "os.urandom(32)" in str(info.value)


BAD_VALUES = {
    "not-base64": "this is not a key at all!",
    "short-base64": base64.b64encode(MASTER[:16]).decode(),
    "long-base64": base64.b64encode(MASTER + MASTER).decode(),
    "urlsafe-base64": base64.urlsafe_b64encode(b"\xfb\xff" * 16).decode(),
    "unpadded-base64": base64.b64encode(MASTER).decode().rstrip("="),
    "bad-hex": "zz" + MASTER.hex()[2:],
    "short-hex": MASTER.hex()[:62],
    "non-ascii": "é" * 44,
}


@pytest.mark.parametrize("value", BAD_VALUES.values(), ids=BAD_VALUES.keys())
def test_from_env_bad_value(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv(VAR, value)
    with pytest.raises(ConfigurationError, match=VAR) as info:
        LocalKms.from_env()
    text = "".join(traceback.format_exception(info.value))
    assert value not in text
    assert "python -c" in str(info.value)
    assert info.value.__cause__ is None and info.value.__context__ is None


# -- from_file ----------------------------------------------------------------------------------


def test_from_file_reads_base64(tmp_path: Path) -> None:
    path = tmp_path / "master.key"
    path.write_text(base64.b64encode(MASTER).decode() + "\n")
    assert LocalKms.from_file(path).kms_key_id == KAT_FINGERPRINT
    assert LocalKms.from_file(str(path)).kms_key_id == KAT_FINGERPRINT


def test_from_file_reads_hex(tmp_path: Path) -> None:
    path = tmp_path / "master.key"
    path.write_text(MASTER.hex())
    assert LocalKms.from_file(path).kms_key_id == KAT_FINGERPRINT


def test_from_file_missing(tmp_path: Path) -> None:
    path = tmp_path / "missing.key"
    with pytest.raises(ConfigurationError, match=re.escape("missing.key")) as info:
        LocalKms.from_file(path)
    assert "create=True" in str(info.value)
    assert not path.exists()


@pytest.mark.parametrize("value", BAD_VALUES.values(), ids=BAD_VALUES.keys())
def test_from_file_bad_content(tmp_path: Path, value: str) -> None:
    path = tmp_path / "master.key"
    path.write_text(value, encoding="utf-8")
    with pytest.raises(ConfigurationError, match=re.escape("master.key")) as info:
        LocalKms.from_file(path, create=True)
    assert value not in "".join(traceback.format_exception(info.value))
    assert path.read_text(encoding="utf-8") == value  # create=True never overwrites


def test_from_file_create_writes_a_0600_key(tmp_path: Path) -> None:
    path = tmp_path / "master.key"
    old_umask = os.umask(0)  # even a permissive umask must not widen the mode
    try:
        kms = LocalKms.from_file(path, create=True)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text()
    assert text.endswith("\n")
    key = base64.b64decode(text.strip(), validate=True)
    assert LocalKms(key).kms_key_id == kms.kms_key_id
    assert_no_secret(repr(kms), key)


def test_from_file_create_reads_an_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "master.key"
    path.write_text(base64.b64encode(MASTER).decode())
    before = path.stat()
    assert LocalKms.from_file(path, create=True).kms_key_id == KAT_FINGERPRINT
    assert path.read_text() == base64.b64encode(MASTER).decode()
    assert path.stat().st_mtime_ns == before.st_mtime_ns


def test_from_file_create_twice_gives_the_same_key(tmp_path: Path) -> None:
    path = tmp_path / "master.key"
    first = LocalKms.from_file(path, create=True)
    content = path.read_bytes()
    second = LocalKms.from_file(path, create=True)
    assert first.kms_key_id == second.kms_key_id
    assert path.read_bytes() == content


def test_from_file_create_in_a_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="cannot create key file"):
        LocalKms.from_file(tmp_path / "nowhere" / "master.key", create=True)


def test_from_file_concurrent_create_agrees(tmp_path: Path) -> None:
    path = tmp_path / "master.key"
    barrier = threading.Barrier(16)
    results: list[str] = []
    errors: list[BaseException] = []

    def create() -> None:
        barrier.wait()
        try:
            results.append(LocalKms.from_file(path, create=True).kms_key_id)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=create) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert len(results) == 16
    assert len(set(results)) == 1
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
