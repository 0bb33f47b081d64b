"""AWS KMS through boto3: data keys generated and wrapped by a customer master key.

boto3 is imported only when a provider is built without a client, so
``import sqlalchemy_envelope`` works without the ``aws`` extra. Every call
carries the scope's encryption context; every failure is a ``KmsError``
naming the operation, the AWS error code and the CMK, never key bytes.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import threading
from collections.abc import Mapping
from typing import Any, NoReturn, TypeVar
from urllib.parse import urlsplit

from ..errors import ConfigurationError, KmsError
from .base import DATA_KEY_BYTES, GeneratedKey, KeyProvider

log = logging.getLogger("sqlalchemy_envelope")

_INSTALL_HINT = "pip install 'sqlalchemy-envelope[aws]'"

#: botocore's defaults (60 s to connect, 60 s to read, 3 attempts) let an endpoint that
#: never answers hold a flush for 3 minutes. KMS answers in tens of ms at p99, so 2 s
#: is ample for an answer and 1 s for a connection; with 3 attempts and standard
#: back-off (under 3 s in all, when throttled) a call fails within about 12 s.
_CLIENT_DEFAULTS: dict[str, Any] = {
    "connect_timeout": 1,
    "read_timeout": 2,
    "retries": {"mode": "standard", "total_max_attempts": 3},
}
_T = TypeVar("_T")


class AwsKms:
    """A :class:`KeyProvider` backed by one AWS KMS key (id, ARN or alias)."""

    __slots__ = ("_arn", "_arn_lock", "_client", "_key_id")

    def __init__(
        self,
        key_id: str,
        *,
        client: Any = None,
        region_name: str | None = None,
        endpoint_url: str | None = None,
        config: Any = None,
    ) -> None:
        if not isinstance(key_id, str):
            raise TypeError("key_id must be a str: a KMS key id, key ARN or alias")
        if not key_id.strip():
            raise ValueError("key_id must name a KMS key: a key id, key ARN or 'alias/...'")
        if client is not None and (region_name, endpoint_url, config) != (None, None, None):
            raise ValueError("pass either client or region_name/endpoint_url/config, not both")
        self._key_id = key_id
        _redact_botocore_logs()
        if client is None:
            client = _make_client(region_name or arn_region(key_id), endpoint_url, config)
        self._client = client
        _warn_if_plain_http(self)
        self._arn: str | None = key_id if _is_key_arn(key_id) else None
        self._arn_lock = threading.Lock()

    @property
    def key_id(self) -> str:
        """The key id, ARN or alias this provider was built with."""
        return self._key_id

    # -- KeyProvider ----------------------------------------------------------------

    def generate_data_key(self, context: Mapping[str, str]) -> GeneratedKey:
        response = self._call(
            "GenerateDataKey",
            self._key_id,
            KeyId=self._key_id,
            KeySpec="AES_256",
            EncryptionContext=dict(context),
        )
        plaintext = _field(response, "Plaintext", bytes, "GenerateDataKey")
        if len(plaintext) != DATA_KEY_BYTES:
            raise KmsError(
                f"AWS KMS GenerateDataKey returned a data key of {len(plaintext)} bytes for "
                f"{self._key_id}, not {DATA_KEY_BYTES}"
            )
        return GeneratedKey(
            plaintext=plaintext,
            wrapped=_field(response, "CiphertextBlob", bytes, "GenerateDataKey"),
            kms_key_id=_field(response, "KeyId", str, "GenerateDataKey"),
        )

    def wrap(self, plaintext: bytes, context: Mapping[str, str]) -> tuple[bytes, str]:
        if not isinstance(plaintext, bytes):
            raise TypeError("a data key must be bytes")
        if len(plaintext) != DATA_KEY_BYTES:
            raise ValueError(f"a data key must be exactly {DATA_KEY_BYTES} bytes")
        response = self._call(
            "Encrypt",
            self._key_id,
            KeyId=self._key_id,
            Plaintext=plaintext,
            EncryptionContext=dict(context),
        )
        return (
            _field(response, "CiphertextBlob", bytes, "Encrypt"),
            _field(response, "KeyId", str, "Encrypt"),
        )

    def unwrap(self, wrapped: bytes, context: Mapping[str, str], kms_key_id: str) -> bytes:
        response = self._call(
            "Decrypt",
            kms_key_id,
            CiphertextBlob=wrapped,
            EncryptionContext=dict(context),
            KeyId=kms_key_id,
        )
        return _field(response, "Plaintext", bytes, "Decrypt")

    def rewrap_from(
        self, source: KeyProvider, wrapped: bytes, context: Mapping[str, str], kms_key_id: str
    ) -> tuple[bytes, str]:
        if not self.moves_in_place(source):
            # Another provider, or another region/endpoint that cannot see the source key.
            return self.wrap(source.unwrap(wrapped, context, kms_key_id), context)
        # Server-side: the plaintext data key never leaves KMS.
        response = self._call(
            "ReEncrypt",
            f"{kms_key_id} -> {self._key_id}",
            CiphertextBlob=wrapped,
            SourceEncryptionContext=dict(context),
            SourceKeyId=kms_key_id,
            DestinationKeyId=self._key_id,
            DestinationEncryptionContext=dict(context),
        )
        return (
            _field(response, "CiphertextBlob", bytes, "ReEncrypt"),
            _field(response, "KeyId", str, "ReEncrypt"),
        )

    def moves_in_place(self, source: KeyProvider) -> bool:
        """Whether :meth:`rewrap_from` moves ``source``'s keys inside KMS (``ReEncrypt``,
        which needs ``kms:ReEncryptFrom``, not ``Decrypt``), never unwrapping them here."""
        return isinstance(source, AwsKms) and self._same_endpoint(source)

    def owns(self, kms_key_id: str) -> bool:
        return kms_key_id == self._resolve_arn()

    def refresh(self) -> None:
        """Forget which CMK an alias names; the next :meth:`owns` asks KMS again.

        ``update-alias`` may have moved the alias since: ``rewrap`` calls this first.
        """
        if not _is_key_arn(self._key_id):
            with self._arn_lock:
                self._arn = None

    # -- helpers ----------------------------------------------------------------------

    def _resolve_arn(self) -> str:
        """This CMK's ARN: ``DescribeKey`` once, then memoized until :meth:`refresh`."""
        arn = self._arn  # read once: refresh() may clear it meanwhile
        if arn is None:
            with self._arn_lock:
                arn = self._arn
                if arn is None:
                    response = self._call("DescribeKey", self._key_id, KeyId=self._key_id)
                    metadata = response.get("KeyMetadata")
                    if not isinstance(metadata, dict):
                        _malformed("DescribeKey", "KeyMetadata")
                    arn = self._arn = _field(metadata, "Arn", str, "DescribeKey")
        return arn

    def _same_endpoint(self, other: AwsKms) -> bool:
        mine, theirs = self._client.meta, other._client.meta
        return bool(
            mine.region_name == theirs.region_name and mine.endpoint_url == theirs.endpoint_url
        )

    def _call(self, operation: str, cmk: str, **params: Any) -> dict[str, Any]:
        method = getattr(self._client, _snake_case(operation))
        try:
            response: dict[str, Any] = method(**params)
        except Exception as exc:
            error = _translate(exc, operation, cmk)
            if error is None:
                raise
        else:
            return response
        # Raised here, not chained: botocore's frames keep the request (for Encrypt
        # and ReEncrypt, a data key) in their locals, for any traceback to show.
        params.clear()
        raise error

    def __repr__(self) -> str:
        return f"AwsKms({self._key_id!r})"

    def __reduce__(self) -> NoReturn:
        raise TypeError("AwsKms holds a boto3 client and cannot be pickled; build one per process")

    def __copy__(self) -> AwsKms:
        return self  # immutable apart from a memo; boto3 clients do not copy

    def __deepcopy__(self, memo: object) -> AwsKms:
        return self


#: A data key in a KMS request or response body: ``"Plaintext": "<base64>"``.
_PLAINTEXT = re.compile(r'("Plaintext"\s*:\s*")[^"\\]*')


class _RedactDataKeys(logging.Filter):
    """botocore logs request and response bodies at DEBUG: data keys among them."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "Plaintext" in message:
            record.msg, record.args = _PLAINTEXT.sub(r"\1<redacted>", message), ()
        return True


def _redact_botocore_logs() -> None:
    for name in ("botocore.endpoint", "botocore.parsers"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _RedactDataKeys) for f in logger.filters):
            logger.addFilter(_RedactDataKeys())


def _warn_if_plain_http(kms: AwsKms) -> None:
    """boto3 also takes the endpoint from AWS_ENDPOINT_URL_KMS or AWS_ENDPOINT_URL: an
    http:// one sends data keys over the network in the clear, unless it stays on this host."""
    endpoint = getattr(getattr(kms._client, "meta", None), "endpoint_url", None)
    if not isinstance(endpoint, str):
        return
    url = urlsplit(endpoint)
    host = (url.hostname or "").rstrip(".")
    if url.scheme.lower() != "http" or host == "localhost" or _is_loopback(host):
        return
    log.warning(
        "%r talks to its KMS at %s over plain HTTP: data keys cross the network "
        "unencrypted. Use an https:// endpoint (endpoint_url=, AWS_ENDPOINT_URL_KMS, "
        "AWS_ENDPOINT_URL)",
        kms,
        host,
    )


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name, not an address
        return False


def _make_client(region_name: str | None, endpoint_url: str | None, config: Any) -> Any:
    try:
        import boto3
        from botocore.config import Config
        from botocore.exceptions import BotoCoreError
    except ImportError:
        raise ConfigurationError(f"AwsKms needs boto3: {_INSTALL_HINT}") from None
    if config is not None and not isinstance(config, Config):
        raise TypeError(f"config must be a botocore.config.Config, not {type(config).__name__}")
    merged = Config(**_CLIENT_DEFAULTS)
    if config is not None:
        merged = merged.merge(config)  # the caller's settings win, ours fill the rest
    try:
        # A session per provider: boto3's default session is not safe to share across threads.
        session = boto3.session.Session()
        return session.client(
            "kms", region_name=region_name, endpoint_url=endpoint_url, config=merged
        )
    except BotoCoreError as exc:
        # e.g. NoRegionError: nothing secret in botocore's text here.
        raise ConfigurationError(
            f"cannot create an AWS KMS client: {exc} "
            "(pass region_name=, set AWS_DEFAULT_REGION, or name the key by its ARN)"
        ) from None


def _translate(exc: Exception, operation: str, cmk: str) -> KmsError | None:
    """The ``KmsError`` for a botocore failure; None for anything else."""
    try:
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            ParamValidationError,
            ValidationError,
        )
    except ImportError:  # a client that is not botocore's: leave its errors alone
        return None
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code") or "Unknown")
        detail = error.get("Message")
        text = f"AWS KMS {operation} failed for {cmk}: {code}"
        # AWS error texts describe keys and requests, never the data sent.
        return KmsError(f"{text}: {detail}" if detail else text, code=code)
    if isinstance(exc, (ParamValidationError, ValidationError)):
        # botocore's report quotes the parameter values, which may include a data key.
        return KmsError(
            f"AWS KMS {operation} failed for {cmk}: botocore rejected the request parameters"
        )
    if isinstance(exc, BotoCoreError):
        return KmsError(f"AWS KMS {operation} failed for {cmk}: {type(exc).__name__}: {exc}")
    return None


def _field(response: Mapping[str, Any], name: str, kind: type[_T], operation: str) -> _T:
    value = response.get(name)
    if not isinstance(value, kind):
        _malformed(operation, name)
    return value


def _malformed(operation: str, name: str) -> NoReturn:
    raise KmsError(f"AWS KMS {operation} returned a response without a valid {name}")


def arn_region(key_id: str) -> str | None:
    """The region a KMS ARN names, else None."""
    # A key lives in one region: an ARN names it, so it wins over AWS_DEFAULT_REGION.
    parts = key_id.split(":")
    if len(parts) >= 6 and parts[0] == "arn" and parts[2] == "kms" and parts[3]:
        return parts[3]
    return None


def _is_key_arn(key_id: str) -> bool:
    return key_id.startswith("arn:") and ":key/" in key_id


def _snake_case(operation: str) -> str:
    return "".join("_" + c.lower() if c.isupper() else c for c in operation).lstrip("_")
