"""Reusable AWS KMS fixtures on moto: in process (``mock_aws``) and over HTTP.

Import them into a test module with ``from .kms_fixtures import *``.
``kms_backend`` runs each test twice, once per moto mode; ``aws_cmk`` is a
fresh customer master key with an alias on that backend.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import boto3
import pytest
from moto import mock_aws
from moto.server import ThreadedMotoServer

from sqlalchemy_envelope.kms import AwsKms

__all__ = [
    "REGION",
    "Cmk",
    "KmsBackend",
    "aws_cmk",
    "aws_credentials",
    "count_calls",
    "kms_backend",
    "moto_server",
]

REGION = "us-east-1"


@dataclass(frozen=True)
class Cmk:
    key_id: str
    arn: str
    alias: str
    region: str


@dataclass(frozen=True)
class KmsBackend:
    """One moto mode: ``endpoint_url`` is None in process, the server's URL over HTTP."""

    name: str
    endpoint_url: str | None

    def client(self, region: str = REGION, **kwargs: Any) -> Any:
        session = boto3.session.Session()
        return session.client("kms", region_name=region, endpoint_url=self.endpoint_url, **kwargs)

    def create_cmk(self, region: str = REGION) -> Cmk:
        client = self.client(region)
        metadata = client.create_key(Description="sqlalchemy-envelope test")["KeyMetadata"]
        alias = f"alias/envelope-test-{uuid.uuid4().hex[:12]}"
        client.create_alias(AliasName=alias, TargetKeyId=metadata["KeyId"])
        return Cmk(key_id=metadata["KeyId"], arn=metadata["Arn"], alias=alias, region=region)

    def provider(self, key_id: str, region: str = REGION) -> AwsKms:
        """A provider that builds its own boto3 client, as applications do."""
        return AwsKms(key_id, region_name=region, endpoint_url=self.endpoint_url)


def count_calls(client: Any) -> Counter[str]:
    """Count the KMS operations a boto3 client sends (botocore's own event hook)."""
    calls: Counter[str] = Counter()

    def record(model: Any, **_: Any) -> None:
        calls[model.name] += 1

    client.meta.events.register("before-call.kms", record)
    return calls


@pytest.fixture
def aws_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    """Dummy credentials, a region, and no reading of the developer's AWS config."""
    for name in ("AWS_PROFILE", "AWS_REGION", "AWS_DEFAULT_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/aws-config")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/aws-credentials")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture(scope="session")
def moto_server() -> Iterator[str]:
    """moto's threaded HTTP server on a free loopback port; yields its endpoint URL."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture(params=["in-process", "server"])
def kms_backend(request: pytest.FixtureRequest, aws_credentials: None) -> Iterator[KmsBackend]:
    if request.param == "in-process":
        with mock_aws():
            yield KmsBackend("in-process", None)
    else:
        yield KmsBackend("server", request.getfixturevalue("moto_server"))


@pytest.fixture
def aws_cmk(kms_backend: KmsBackend) -> Cmk:
    return kms_backend.create_cmk()
