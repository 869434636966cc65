"""How S3Storage sorts failures: retry, not found, or a clear permanent error.

S3 (and MinIO, and moto) report failures three ways: a ``ClientError`` carrying an error
code and HTTP status, a botocore/aiohttp connection error, or a timeout. This module turns
each into "retry it" or the :mod:`asynckarton` exception the caller should see.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import aiohttp
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    DataNotFoundError,
    HTTPClientError,
    IncompleteReadError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError
from botocore.loaders import create_loader

from asynckarton._errors import KartonError, ResourceNotFoundError, StorageError

# botocore ships no type information: its names reach the other S3 modules through here.
__all__ = [
    "ClientError",
    "DataNotFoundError",
    "Failure",
    "backoff_delay",
    "classify",
    "create_loader",
    "error_code",
    "http_status",
]

# Error codes S3-compatible servers use for "try again later", whatever the HTTP status.
_TRANSIENT_CODES = frozenset(
    {
        "InternalError",
        "ServiceUnavailable",
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestTimeout",
        "RequestLimitExceeded",
        "TooManyRequests",
        "OperationAborted",
        "XMinioServerNotInitialized",
    }
)
_NOT_FOUND_CODES = frozenset({"NoSuchKey", "NotFound", "404"})
_NETWORK_ERRORS = (
    BotoConnectionError,
    HTTPClientError,
    IncompleteReadError,
    aiohttp.ClientError,
    TimeoutError,
    ConnectionError,
)


@dataclass(frozen=True, slots=True)
class Failure:
    """A classified failure.

    Attributes:
        error: the exception to raise if the call is not (or no longer) retried.
        transient: whether trying again may succeed.
    """

    error: KartonError
    transient: bool


def error_code(exc: ClientError) -> str:
    """The S3 error code of a ``ClientError`` (``"404"`` for bodiless HEAD responses)."""
    return str(exc.response.get("Error", {}).get("Code", ""))


def http_status(exc: ClientError) -> int:
    """The HTTP status of a ``ClientError``, or 0 when the response has none."""
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)


def classify(exc: Exception, op: str, bucket: str, key: str | None) -> Failure | None:
    """Sort ``exc`` raised by S3 operation ``op``; None means "not a storage failure".

    Programming errors (``TypeError``, our own exceptions...) come back as None so the
    caller re-raises them untouched.
    """
    where = f"S3 {op} on bucket {bucket!r}" + (f", key {key!r}" if key is not None else "")
    if isinstance(exc, ClientError):
        code, status = error_code(exc), http_status(exc)
        if (
            key is not None
            and (code in _NOT_FOUND_CODES or status == 404)
            and (code != "NoSuchBucket")
        ):
            return Failure(ResourceNotFoundError(bucket, key), transient=False)
        if code == "NoSuchBucket":
            return Failure(StorageError(f"{where} failed: the bucket does not exist"), False)
        transient = code in _TRANSIENT_CODES or status >= 500 or status == 429
        detail = exc.response.get("Error", {}).get("Message") or code or f"HTTP {status}"
        return Failure(StorageError(f"{where} failed: {code or status}: {detail}"), transient)
    if isinstance(exc, _NETWORK_ERRORS):
        return Failure(StorageError(f"{where} failed: {type(exc).__name__}: {exc}"), True)
    if isinstance(exc, BotoCoreError):
        # NoCredentialsError, ParamValidationError...: retrying cannot help.
        return Failure(StorageError(f"{where} failed: {exc}"), transient=False)
    return None


def backoff_delay(attempt: int, *, base: float, cap: float = 5.0) -> float:
    """Seconds to wait before retry number ``attempt`` (1-based): capped exponential backoff
    with jitter, so parallel part uploads do not retry in lockstep."""
    ceiling: float = min(cap, base * (2 ** (attempt - 1)))
    return ceiling * random.uniform(0.5, 1.0)
