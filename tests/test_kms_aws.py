"""AwsKms against moto (in process and over HTTP) and botocore's Stubber."""

from __future__ import annotations

import base64
import copy
import logging
import os
import pickle
import socket
import subprocess
import sys
import threading
import time
import traceback
import uuid
from collections import Counter
from typing import Any

import boto3
import pytest
from botocore.config import Config
from botocore.stub import Stubber

from sqlalchemy_envelope.errors import ConfigurationError, KmsError
from sqlalchemy_envelope.kms import AwsKms, KeyProvider, LocalKms, scope_context

from .kms_fixtures import *  # noqa: F403
from .kms_fixtures import REGION, Cmk, KmsBackend, count_calls

CONTEXT = scope_context("patients")


def secret_forms(key: bytes) -> list[str]:
    return [key.hex(), base64.b64encode(key).decode(), repr(key)[2:-1]]


# -- round trips -------------------------------------------------------------------------


def test_is_a_key_provider(kms_backend: KmsBackend, aws_cmk: Cmk) -> None:
    assert isinstance(kms_backend.provider(aws_cmk.key_id), KeyProvider)


@pytest.mark.parametrize("which", ["key_id", "arn", "alias"])
def test_generate_and_unwrap(kms_backend: KmsBackend, aws_cmk: Cmk, which: str) -> None:
    kms = kms_backend.provider(getattr(aws_cmk, which))
    generated = kms.generate_data_key(CONTEXT)
    assert len(generated.plaintext) == 32
    assert generated.kms_key_id == aws_cmk.arn  # the ARN is stored, never an alias
    assert generated.plaintext not in generated.wrapped
    assert kms.unwrap(generated.wrapped, CONTEXT, generated.kms_key_id) == generated.plaintext


def test_a_generated_key_of_the_wrong_size_is_refused(
    kms_backend: KmsBackend, aws_cmk: Cmk
) -> None:
    client = kms_backend.client()
    # A real 16-byte key from the KMS: the request asks for AES_128 instead of AES_256.
    client.meta.events.register(
        "provide-client-params.kms.GenerateDataKey",
        lambda params, **_: {**params, "KeySpec": "AES_128"},
    )
    with pytest.raises(KmsError, match="16 bytes") as info:
        AwsKms(aws_cmk.alias, client=client).generate_data_key(CONTEXT)
    assert "GenerateDataKey" in str(info.value) and aws_cmk.alias in str(info.value)


def test_wrap_and_unwrap(kms_backend: KmsBackend, aws_cmk: Cmk) -> None:
    kms = kms_backend.provider(aws_cmk.alias)
    data_key = os.urandom(32)
    wrapped, kms_key_id = kms.wrap(data_key, CONTEXT)
    assert kms_key_id == aws_cmk.arn
    assert kms.unwrap(wrapped, CONTEXT, kms_key_id) == data_key


def test_calls_carry_the_context(kms_backend: KmsBackend, aws_cmk: Cmk) -> None:
    client = kms_backend.client()
    seen: list[dict[str, Any]] = []
    client.meta.events.register(
        "provide-client-params.kms", lambda params, **_: seen.append(dict(params))
    )
    kms = AwsKms(aws_cmk.alias, client=client)
    generated = kms.generate_data_key(CONTEXT)
    kms.unwrap(generated.wrapped, CONTEXT, generated.kms_key_id)
    kms.wrap(generated.plaintext, CONTEXT)
    assert [p["EncryptionContext"] for p in seen] == [CONTEXT] * 3
    assert seen[0]["KeySpec"] == "AES_256"
    assert seen[1]["KeyId"] == aws_cmk.arn  # Decrypt names the stored CMK


def test_unwrap_uses_the_stored_key_id(kms_backend: KmsBackend) -> None:
    first, second = kms_backend.create_cmk(), kms_backend.create_cmk()
    generated = kms_backend.provider(first.alias).generate_data_key(CONTEXT)
    other = kms_backend.provider(second.alias)
    assert other.unwrap(generated.wrapped, CONTEXT, generated.kms_key_id) == generated.plaintext


def test_wrap_refuses_a_bad_data_key(kms_backend: KmsBackend, aws_cmk: Cmk) -> None:
    kms = kms_backend.provider(aws_cmk.alias)
    with pytest.raises(ValueError, match="32 bytes"):
        kms.wrap(b"short", CONTEXT)
    with pytest.raises(TypeError):
        kms.wrap("x" * 32, CONTEXT)  # type: ignore[arg-type]


# -- context binding and wrong keys --------------------------------------------------------


def test_unwrap_with_another_scope_fails(kms_backend: KmsBackend, aws_cmk: Cmk) -> None:
    kms = kms_backend.provider(aws_cmk.alias)
    generated = kms.generate_data_key(CONTEXT)
    with pytest.raises(KmsError, match="Decrypt") as info:
        kms.unwrap(generated.wrapped, scope_context("doctors"), generated.kms_key_id)
    assert info.value.code == "InvalidCiphertextException"
    assert info.value.__cause__ is None and info.value.__context__ is None  # no botocore frames


def test_unwrap_naming_another_cmk_fails(kms_backend: KmsBackend) -> None:
    first, second = kms_backend.create_cmk(), kms_backend.create_cmk()
    kms = kms_backend.provider(first.alias)
    generated = kms.generate_data_key(CONTEXT)
    with pytest.raises(KmsError, match=second.arn):
        kms.unwrap(generated.wrapped, CONTEXT, second.arn)


def test_corrupted_wrapped_key_fails(kms_backend: KmsBackend, aws_cmk: Cmk) -> None:
    kms = kms_backend.provider(aws_cmk.alias)
    generated = kms.generate_data_key(CONTEXT)
    corrupted = bytearray(generated.wrapped)
    corrupted[-1] ^= 1
    with pytest.raises(KmsError):
        kms.unwrap(bytes(corrupted), CONTEXT, generated.kms_key_id)


# -- owns ---------------------------------------------------------------------------------------


def test_owns_resolves_an_alias_once(kms_backend: KmsBackend, aws_cmk: Cmk) -> None:
    client = kms_backend.client()
    calls = count_calls(client)
    kms = AwsKms(aws_cmk.alias, client=client)
    assert kms.owns(aws_cmk.arn)
    assert not kms.owns(kms_backend.create_cmk().arn)
    assert not kms.owns(aws_cmk.alias)
    assert not kms.owns("local:0123456789abcdef")
    assert calls["DescribeKey"] == 1


def test_refresh_follows_an_alias_to_its_new_cmk(kms_backend: KmsBackend, aws_cmk: Cmk) -> None:
    client = kms_backend.client()
    calls = count_calls(client)
    kms = AwsKms(aws_cmk.alias, client=client)
    assert kms.owns(aws_cmk.arn)
    moved_to = kms_backend.create_cmk()
    client.update_alias(AliasName=aws_cmk.alias, TargetKeyId=moved_to.key_id)
    assert kms.owns(aws_cmk.arn)  # memoized: no call per owns()
    kms.refresh()
    assert kms.owns(moved_to.arn) and not kms.owns(aws_cmk.arn)
    assert calls["DescribeKey"] == 2
    by_arn = AwsKms(aws_cmk.arn, client=client)
    by_arn.refresh()  # a key ARN names one CMK for good: nothing to ask
    assert by_arn.owns(aws_cmk.arn) and calls["DescribeKey"] == 2


def test_owns_with_a_bare_key_id(kms_backend: KmsBackend, aws_cmk: Cmk) -> None:
    assert kms_backend.provider(aws_cmk.key_id).owns(aws_cmk.arn)


def test_owns_with_a_key_arn_needs_no_call(kms_backend: KmsBackend, aws_cmk: Cmk) -> None:
    client = kms_backend.client()
    calls = count_calls(client)
    assert AwsKms(aws_cmk.arn, client=client).owns(aws_cmk.arn)
    assert calls["DescribeKey"] == 0


def test_owns_is_resolved_once_under_concurrency(kms_backend: KmsBackend, aws_cmk: Cmk) -> None:
    client = kms_backend.client()
    calls = count_calls(client)
    kms = AwsKms(aws_cmk.alias, client=client)
    barrier = threading.Barrier(12)
    results: list[bool] = []

    def check() -> None:
        barrier.wait()
        results.append(kms.owns(aws_cmk.arn))

    threads = [threading.Thread(target=check) for _ in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [True] * 12
    assert calls["DescribeKey"] == 1


def test_concurrent_round_trips(kms_backend: KmsBackend, aws_cmk: Cmk) -> None:
    kms = kms_backend.provider(aws_cmk.alias)
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            context = scope_context(f"scope-{n}")
            generated = kms.generate_data_key(context)
            assert kms.unwrap(generated.wrapped, context, generated.kms_key_id) == (
                generated.plaintext
            )
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors


# -- rewrap ---------------------------------------------------------------------------------------


def test_rewrap_to_a_second_cmk_uses_reencrypt(kms_backend: KmsBackend) -> None:
    first, second = kms_backend.create_cmk(), kms_backend.create_cmk()
    source = kms_backend.provider(first.alias)
    generated = source.generate_data_key(CONTEXT)
    client = kms_backend.client()
    calls = count_calls(client)
    target = AwsKms(second.alias, client=client)

    wrapped, kms_key_id = target.rewrap_from(source, generated.wrapped, CONTEXT, first.arn)

    assert calls == Counter({"ReEncrypt": 1})  # server-side: no Decrypt, no Encrypt
    assert kms_key_id == second.arn
    assert target.owns(kms_key_id)
    fresh = kms_backend.provider(second.arn)
    assert fresh.unwrap(wrapped, CONTEXT, kms_key_id) == generated.plaintext
    with pytest.raises(KmsError):
        fresh.unwrap(wrapped, scope_context("doctors"), kms_key_id)


def test_rewrap_with_a_wrong_context_fails(kms_backend: KmsBackend) -> None:
    first, second = kms_backend.create_cmk(), kms_backend.create_cmk()
    source = kms_backend.provider(first.alias)
    generated = source.generate_data_key(CONTEXT)
    target = kms_backend.provider(second.alias)
    with pytest.raises(KmsError, match="ReEncrypt") as info:
        target.rewrap_from(source, generated.wrapped, scope_context("doctors"), first.arn)
    assert info.value.code == "InvalidCiphertextException"


def test_rewrap_across_regions_unwraps_and_wraps(kms_backend: KmsBackend) -> None:
    west = kms_backend.create_cmk(region="us-west-2")
    east = kms_backend.create_cmk()
    source_client, target_client = kms_backend.client("us-west-2"), kms_backend.client()
    source_calls, target_calls = count_calls(source_client), count_calls(target_client)
    source = AwsKms(west.alias, client=source_client)
    target = AwsKms(east.alias, client=target_client)
    generated = source.generate_data_key(CONTEXT)

    wrapped, kms_key_id = target.rewrap_from(source, generated.wrapped, CONTEXT, west.arn)

    assert source_calls == Counter({"GenerateDataKey": 1, "Decrypt": 1})
    assert target_calls == Counter({"Encrypt": 1})
    assert kms_key_id == east.arn
    assert target.unwrap(wrapped, CONTEXT, kms_key_id) == generated.plaintext


def test_rewrap_local_to_aws(kms_backend: KmsBackend, aws_cmk: Cmk) -> None:
    local = LocalKms(os.urandom(32))
    generated = local.generate_data_key(CONTEXT)
    aws = kms_backend.provider(aws_cmk.alias)
    wrapped, kms_key_id = aws.rewrap_from(local, generated.wrapped, CONTEXT, generated.kms_key_id)
    assert kms_key_id == aws_cmk.arn
    assert aws.owns(kms_key_id)
    assert aws.unwrap(wrapped, CONTEXT, kms_key_id) == generated.plaintext


def test_rewrap_aws_to_local(kms_backend: KmsBackend, aws_cmk: Cmk) -> None:
    aws = kms_backend.provider(aws_cmk.alias)
    generated = aws.generate_data_key(CONTEXT)
    local = LocalKms(os.urandom(32))
    wrapped, kms_key_id = local.rewrap_from(aws, generated.wrapped, CONTEXT, generated.kms_key_id)
    assert local.owns(kms_key_id)
    assert local.unwrap(wrapped, CONTEXT, kms_key_id) == generated.plaintext
    with pytest.raises(KmsError):
        local.unwrap(wrapped, scope_context("doctors"), kms_key_id)


# -- errors from moto ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key_id",
    [f"alias/missing-{uuid.uuid4().hex[:8]}", str(uuid.uuid4())],
    ids=["alias", "key-id"],
)
def test_missing_key_is_not_found(kms_backend: KmsBackend, key_id: str) -> None:
    kms = kms_backend.provider(key_id)
    with pytest.raises(KmsError) as info:
        kms.generate_data_key(CONTEXT)
    assert info.value.code == "NotFoundException"
    message = str(info.value)
    assert "GenerateDataKey" in message and "NotFoundException" in message and key_id in message
    with pytest.raises(KmsError, match="DescribeKey") as info:
        kms.owns("arn:aws:kms:us-east-1:123456789012:key/x")
    assert info.value.code == "NotFoundException"


# -- errors from a stubbed boto3 client ----------------------------------------------------------


@pytest.fixture
def stubbed(aws_credentials: None) -> Any:
    client = boto3.session.Session().client("kms", region_name=REGION)
    with Stubber(client) as stubber:
        yield client, stubber
        stubber.assert_no_pending_responses()


ARN = "arn:aws:kms:us-east-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab"


def test_disabled_key(stubbed: Any) -> None:
    client, stubber = stubbed
    stubber.add_client_error(
        "generate_data_key",
        service_error_code="DisabledException",
        service_message=f"{ARN} is disabled.",
        http_status_code=400,
        expected_params={"KeyId": "alias/app", "KeySpec": "AES_256", "EncryptionContext": CONTEXT},
    )
    with pytest.raises(KmsError) as info:
        AwsKms("alias/app", client=client).generate_data_key(CONTEXT)
    assert info.value.code == "DisabledException"
    message = str(info.value)
    assert "GenerateDataKey" in message and "DisabledException" in message
    assert "alias/app" in message
    assert info.value.__cause__ is None and info.value.__context__ is None  # no botocore frames


def test_access_denied_on_decrypt(stubbed: Any) -> None:
    client, stubber = stubbed
    stubber.add_client_error(
        "decrypt",
        service_error_code="AccessDeniedException",
        service_message="User is not authorized to perform: kms:Decrypt",
        http_status_code=400,
        expected_params={"CiphertextBlob": b"wrapped", "EncryptionContext": CONTEXT, "KeyId": ARN},
    )
    with pytest.raises(KmsError) as info:
        AwsKms("alias/app", client=client).unwrap(b"wrapped", CONTEXT, ARN)
    assert info.value.code == "AccessDeniedException"
    assert "Decrypt" in str(info.value) and ARN in str(info.value)


def test_access_denied_on_reencrypt(stubbed: Any) -> None:
    client, stubber = stubbed
    stubber.add_client_error(
        "re_encrypt",
        service_error_code="AccessDeniedException",
        http_status_code=400,
        expected_params={
            "CiphertextBlob": b"wrapped",
            "SourceEncryptionContext": CONTEXT,
            "SourceKeyId": ARN,
            "DestinationKeyId": "alias/new",
            "DestinationEncryptionContext": CONTEXT,
        },
    )
    source = AwsKms("alias/old", client=client)
    with pytest.raises(KmsError, match="ReEncrypt") as info:
        AwsKms("alias/new", client=client).rewrap_from(source, b"wrapped", CONTEXT, ARN)
    assert info.value.code == "AccessDeniedException"


def test_errors_never_hold_the_data_key(stubbed: Any) -> None:
    client, stubber = stubbed
    data_key = os.urandom(32)
    stubber.add_client_error(
        "encrypt", service_error_code="KMSInternalException", http_status_code=500
    )
    with pytest.raises(KmsError) as info:
        AwsKms("alias/app", client=client).wrap(data_key, CONTEXT)
    assert info.value.code == "KMSInternalException"
    text = "".join(traceback.format_exception(info.value))
    for form in secret_forms(data_key):
        assert form not in text
    # Not chained to botocore's error, whose frames hold the request in their locals.
    assert info.value.__cause__ is None and info.value.__context__ is None
    frames = [f.f_code.co_name for f, _ in traceback.walk_tb(info.value.__traceback__)]
    assert "_make_api_call" not in frames


# -- unreachable or unconfigured -------------------------------------------------------------------


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_unreachable_endpoint(aws_credentials: None) -> None:
    endpoint = f"http://127.0.0.1:{closed_port()}"
    config = Config(connect_timeout=1, read_timeout=1, retries={"total_max_attempts": 1})
    client = boto3.session.Session().client(
        "kms", region_name=REGION, endpoint_url=endpoint, config=config
    )
    with pytest.raises(KmsError, match="GenerateDataKey") as info:
        AwsKms("alias/app", client=client).generate_data_key(CONTEXT)
    assert info.value.code is None
    assert "alias/app" in str(info.value)


def test_an_endpoint_that_never_answers_fails_within_seconds(aws_credentials: None) -> None:
    """An endpoint that accepts connections and never answers: botocore's defaults would
    hold the caller (a flush) for 3 minutes; AwsKms's own client gives up in seconds."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)  # the kernel accepts; nothing ever reads or answers
        kms = AwsKms("alias/app", endpoint_url=f"http://127.0.0.1:{listener.getsockname()[1]}")
        attempts: list[object] = []
        kms._client.meta.events.register("before-send.kms", lambda **kw: attempts.append(kw))
        errors: list[BaseException] = []

        def call() -> None:
            try:
                kms.generate_data_key(CONTEXT)
            except BaseException as exc:
                errors.append(exc)

        started = time.monotonic()
        worker = threading.Thread(target=call, daemon=True)
        worker.start()
        worker.join(timeout=12)  # 3 attempts x 2 s read timeout, with room for a busy machine
        elapsed = time.monotonic() - started
        assert not worker.is_alive(), f"still waiting for the KMS after {elapsed:.0f} s"
    (error,) = errors
    assert isinstance(error, KmsError) and error.code is None
    assert "GenerateDataKey" in str(error) and "ReadTimeout" in str(error)
    assert len(attempts) == 3


def test_config_is_merged_over_the_defaults(aws_credentials: None) -> None:
    config = AwsKms("alias/app", config=Config(read_timeout=30))._client.meta.config
    assert (config.connect_timeout, config.read_timeout) == (1, 30)
    assert config.retries == {"mode": "standard", "total_max_attempts": 3}
    retries = Config(retries={"mode": "adaptive", "total_max_attempts": 5})
    assert AwsKms("alias/app", config=retries)._client.meta.config.retries["mode"] == "adaptive"
    with pytest.raises(TypeError, match=r"botocore\.config\.Config"):
        AwsKms("alias/app", config={"read_timeout": 30})


def test_a_client_passed_in_keeps_its_own_config(aws_credentials: None) -> None:
    client = boto3.session.Session().client("kms", config=Config(read_timeout=45))
    assert AwsKms("alias/app", client=client)._client.meta.config.read_timeout == 45
    with pytest.raises(ValueError, match="client"):
        AwsKms("alias/app", client=client, config=Config(read_timeout=5))


def test_missing_region_is_a_configuration_error(
    aws_credentials: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    with pytest.raises(ConfigurationError, match="region_name"):
        AwsKms("alias/app")


@pytest.mark.parametrize("default_region", [None, REGION], ids=["unset", "another"])
def test_a_key_arn_names_the_region(
    kms_backend: KmsBackend, monkeypatch: pytest.MonkeyPatch, default_region: str | None
) -> None:
    """A key lives in one region: its ARN's, whatever AWS_DEFAULT_REGION says."""
    cmk = kms_backend.create_cmk("eu-west-1")
    if default_region is None:
        monkeypatch.delenv("AWS_DEFAULT_REGION")
    kms = AwsKms(cmk.arn, endpoint_url=kms_backend.endpoint_url)
    generated = kms.generate_data_key(CONTEXT)
    assert kms.unwrap(generated.wrapped, CONTEXT, generated.kms_key_id) == generated.plaintext
    assert AwsKms(cmk.arn, region_name="ap-south-1")._client.meta.region_name == "ap-south-1"


@pytest.mark.parametrize(
    ("variable", "endpoint"),
    [
        ("AWS_ENDPOINT_URL_KMS", "http://kms.internal.example:4566"),
        ("AWS_ENDPOINT_URL", "http://10.0.0.5"),
        ("AWS_ENDPOINT_URL_KMS", "HTTP://[fd00::1]:8080"),
        (None, "http://kms.internal.example"),
    ],
)
def test_a_plain_http_endpoint_is_warned_about(
    aws_credentials: None,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    variable: str | None,
    endpoint: str,
) -> None:
    """boto3 honours AWS_ENDPOINT_URL(_KMS): AwsKms('alias/app') could send keys in the clear."""
    if variable is not None:
        monkeypatch.setenv(variable, endpoint)
    caplog.set_level(logging.WARNING, logger="sqlalchemy_envelope")
    kms = AwsKms("alias/app", endpoint_url=None if variable else endpoint)
    (warning,) = [r for r in caplog.records if r.name == "sqlalchemy_envelope"]
    assert warning.levelno == logging.WARNING
    assert "AwsKms('alias/app')" in warning.getMessage() and "plain HTTP" in warning.getMessage()
    with Stubber(kms._client) as stubber:  # one warning per AwsKms, not one per call
        response = {"Plaintext": os.urandom(32), "CiphertextBlob": b"wrapped", "KeyId": ARN}
        stubber.add_response("generate_data_key", response)
        kms.generate_data_key(CONTEXT)
    assert len([r for r in caplog.records if r.name == "sqlalchemy_envelope"]) == 1


@pytest.mark.parametrize(
    "endpoint",
    [
        "https://kms.internal.example",
        "http://127.0.0.1:4566",
        "http://127.9.8.7",
        "http://localhost:4566",
        "http://[::1]:4566",
    ],
)
def test_https_and_loopback_endpoints_are_not_warned_about(
    aws_credentials: None,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    endpoint: str,
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL_KMS", endpoint)
    caplog.set_level(logging.WARNING, logger="sqlalchemy_envelope")
    assert AwsKms("alias/app")._client.meta.endpoint_url.lower() == endpoint.lower()
    assert not [r for r in caplog.records if r.name == "sqlalchemy_envelope"]


def test_missing_boto3(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "boto3", None)  # makes `import boto3` fail
    with pytest.raises(ConfigurationError, match=r"pip install 'sqlalchemy-envelope\[aws\]'"):
        AwsKms("alias/app")


def test_import_does_not_load_boto3() -> None:
    code = (
        "import sys, sqlalchemy_envelope.kms\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('boto3', 'botocore'))\n"
        "assert not loaded, loaded\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)


# -- construction and repr -----------------------------------------------------------------------


@pytest.mark.parametrize("key_id", ["", "   "])
def test_key_id_must_not_be_empty(key_id: str) -> None:
    with pytest.raises(ValueError, match="key_id"):
        AwsKms(key_id, client=object())


@pytest.mark.parametrize("key_id", [None, 42, b"alias/app"])
def test_key_id_must_be_a_string(key_id: object) -> None:
    with pytest.raises(TypeError, match="key_id"):
        AwsKms(key_id, client=object())  # type: ignore[arg-type]


def test_client_excludes_region_and_endpoint() -> None:
    with pytest.raises(ValueError, match="client"):
        AwsKms("alias/app", client=object(), region_name=REGION)


def test_repr_shows_only_the_key_id(stubbed: Any) -> None:
    client, _ = stubbed
    kms = AwsKms("alias/app", client=client)
    assert repr(kms) == "AwsKms('alias/app')"
    assert kms.key_id == "alias/app"


def test_pickling_is_refused(kms_backend: KmsBackend, aws_cmk: Cmk) -> None:
    kms = kms_backend.provider(aws_cmk.alias)
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(kms)


def test_copies_share_the_object(kms_backend: KmsBackend, aws_cmk: Cmk) -> None:
    kms = kms_backend.provider(aws_cmk.alias)
    assert copy.copy(kms) is kms
    assert copy.deepcopy({"kms": kms})["kms"] is kms


def test_botocore_debug_logs_hold_no_data_key(
    kms_backend: KmsBackend, aws_cmk: Cmk, caplog: pytest.LogCaptureFixture
) -> None:
    """botocore logs request and response bodies at DEBUG; the data keys in them are redacted."""
    kms = kms_backend.provider(aws_cmk.alias)
    with caplog.at_level(logging.DEBUG):
        generated = kms.generate_data_key(CONTEXT)  # the key in a response body
        data_key = kms.unwrap(generated.wrapped, CONTEXT, generated.kms_key_id)
        kms.wrap(data_key, CONTEXT)  # ... and in a request body
    assert "Response body" in caplog.text and "<redacted>" in caplog.text
    for form in secret_forms(data_key):
        assert form not in caplog.text


def test_botocore_debug_logs_hold_wrapped_keys(
    kms_backend: KmsBackend, aws_cmk: Cmk, caplog: pytest.LogCaptureFixture
) -> None:
    """Not redacted, and documented: the CiphertextBlob of a response is a wrapped key,
    which needs the KMS to open (what a database dump holds anyway)."""
    kms = kms_backend.provider(aws_cmk.alias)
    with caplog.at_level(logging.DEBUG):
        generated = kms.generate_data_key(CONTEXT)
    assert base64.b64encode(generated.wrapped).decode() in caplog.text
    for form in secret_forms(generated.plaintext):
        assert form not in caplog.text
