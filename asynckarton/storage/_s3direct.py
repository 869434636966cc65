"""A light request path for small objects: PUT, GET and HEAD straight over aiohttp.

Through aiobotocore one 4 KiB GET costs a few milliseconds of CPU, almost none of it in
the HTTP exchange: botocore validates parameters, evaluates the endpoint rule set, fires a
dozen event hooks and parses the response headers against the service model on every
call. Resources are small and numerous, so :class:`~asynckarton.storage.S3Storage` sends
its small PUTs, GETs and HEADs through this module instead, which keeps what makes a
request correct and drops the rest:

* where a bucket's objects live (path-style or virtual-host addressing, custom, regional
  or global endpoint) and the signing scope (region, service) are botocore's own answer:
  a presigned URL computed locally, once per bucket;
* each request is signed with SigV4 (``_s3sign``, checked against botocore's
  ``S3SigV4Auth`` by the unit tests) and the client's own credentials (static keys, or
  the refreshed ones of the IAM/web-identity chain); the payload is SHA-256 signed;
* a PUT carries ``Content-MD5``, as botocore sends it for PutObject: the server rejects a
  body damaged on the way;
* an error response becomes the ``ClientError`` botocore would raise (error code, message,
  HTTP status), so ``S3Storage`` classifies and retries it with the same policy; network
  failures surface as aiohttp errors, which that policy already retries.

What it does not handle goes back to aiobotocore by raising :class:`_Delegate`: a bucket
that answers with a redirect (it lives in another region; botocore follows those), a
client without credentials (botocore raises its usual error) and bodies larger than the
caller's limit (the streaming, resumable path suits them better).
"""

from __future__ import annotations

import base64
import hashlib
import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit
from xml.etree import ElementTree

import aiohttp
import anyio
from botocore.exceptions import BotoCoreError
from yarl import URL

from asynckarton.storage._s3errors import ClientError
from asynckarton.storage._s3sign import EMPTY_SHA256, Credentials, SigV4, amz_date

__all__ = ["DirectS3"]

_PROBE_KEY = "k"  # the key presigned to learn a bucket's URL prefix
_REDIRECTS = frozenset({301, 302, 307, 308})
_HASH_ON_LOOP = 256 * 1024  # bodies above this are hashed in a worker thread


class _Delegate(Exception):
    """This request belongs on the aiobotocore path; the caller repeats it there."""


@dataclass(frozen=True, slots=True)
class _Target:
    """Where one bucket's objects live and how requests to it are signed."""

    origin: str  # scheme://host[:port]
    host: str  # the Host header (no default port)
    path: str  # the path up to the key, e.g. "/karton/" (path-style) or "/"
    signer: SigV4


class DirectS3:
    """Signed PUT/GET/HEAD requests for one aiobotocore S3 client, on one aiohttp session.

    Args:
        client: the open aiobotocore S3 client whose configuration (endpoint, addressing
            style, region, credentials) the requests follow.
        max_connections: size of this path's own connection pool.
        connect_timeout: seconds to establish a connection.
        read_timeout: seconds to wait for each read from the socket.
    """

    def __init__(
        self,
        client: Any,
        *,
        max_connections: int,
        connect_timeout: float,
        read_timeout: float,
    ) -> None:
        self._client = client
        self._targets: dict[str, _Target | None] = {}  # None: that bucket is delegated
        # S3 objects are bytes: never ask for or undo a Content-Encoding, never invent a
        # Content-Type (botocore sends neither).
        self._http = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=max_connections),
            timeout=aiohttp.ClientTimeout(sock_connect=connect_timeout, sock_read=read_timeout),
            auto_decompress=False,
            skip_auto_headers=("Accept-Encoding", "Content-Type"),
        )

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._http.close()

    async def put(self, bucket: str, key: str, data: bytes) -> None:
        """PutObject ``data`` under ``key``."""
        if len(data) > _HASH_ON_LOOP:
            md5, sha256 = await anyio.to_thread.run_sync(_digests, data)
        else:
            md5, sha256 = _digests(data)
        await self._send("PUT", "PutObject", bucket, key, {"Content-MD5": md5}, data, sha256)

    async def get(
        self, bucket: str, key: str, first: int, last: int | None, *, max_size: int
    ) -> bytes:
        """GetObject, whole or the inclusive range ``first..last``.

        Returns b"" when the range starts past the end of the object (HTTP 416).

        Raises:
            _Delegate: the body is larger than ``max_size`` (checked before reading it).
        """
        headers = {}
        if first > 0 or last is not None:
            headers["Range"] = f"bytes={first}-{'' if last is None else last}"
        body = await self._send(
            "GET", "GetObject", bucket, key, headers, b"", EMPTY_SHA256, max_size=max_size
        )
        return b"" if body is None else body

    async def head(self, bucket: str, key: str) -> bool:
        """HeadObject: True when the object exists, False on a 404."""
        try:
            await self._send("HEAD", "HeadObject", bucket, key, {}, b"", EMPTY_SHA256)
        except ClientError as exc:
            if exc.response["ResponseMetadata"]["HTTPStatusCode"] == 404:
                return False
            raise
        return True

    # -- one request ---------------------------------------------------------------------

    async def _send(
        self,
        method: str,
        operation: str,
        bucket: str,
        key: str,
        headers: dict[str, str],
        data: bytes,
        payload_sha256: str,
        *,
        max_size: int | None = None,
    ) -> bytes | None:
        """Sign and send one request; the body of a 2xx answer, None for a GET's 416."""
        target = await self._target(bucket)
        path = target.path + quote(key, safe="/~")
        signed = target.signer.sign(
            await self._credentials(),
            method,
            target.host,
            path,
            headers,
            payload_sha256,
            amz_date(),
        )
        async with self._http.request(
            method,
            URL(target.origin + path, encoded=True),  # sent exactly as signed: no re-quoting
            data=data if data or method == "PUT" else None,
            headers=signed,
            allow_redirects=False,
        ) as response:
            status = response.status
            if status < 300:
                if method == "HEAD":
                    return b""
                size = response.content_length
                if max_size is not None and size is not None and size > max_size:
                    raise _Delegate(f"{size} bytes is above the direct path's {max_size}")
                return await response.read()
            if status == 416 and method == "GET":
                return None
            if status in _REDIRECTS or (
                status == 400
                and response.headers.get("x-amz-bucket-region", target.signer.region)
                != target.signer.region
            ):
                self._targets[bucket] = None  # another region: botocore follows redirects
                raise _Delegate(f"bucket {bucket!r} answered {status}: redirected")
            body = b"" if method == "HEAD" else await response.read()
            raise _client_error(operation, status, response.headers, body)

    async def _target(self, bucket: str) -> _Target:
        """The bucket's URL prefix and signing scope, from a presigned URL (local work)."""
        if bucket in self._targets:
            target = self._targets[bucket]
            if target is None:
                raise _Delegate(f"bucket {bucket!r} goes through aiobotocore")
            return target
        try:
            url: str = await self._client.generate_presigned_url(
                "get_object", Params={"Bucket": bucket, "Key": _PROBE_KEY}, ExpiresIn=60
            )
        except BotoCoreError as exc:  # no credentials, invalid bucket name...
            raise _Delegate(f"cannot presign for bucket {bucket!r}: {exc}") from exc
        parts = urlsplit(url)
        scope = parse_qs(parts.query).get("X-Amz-Credential", [""])[0].split("/")
        if len(scope) != 5 or not parts.path.endswith("/" + _PROBE_KEY):
            self._targets[bucket] = None
            raise _Delegate(f"unexpected presigned URL shape for bucket {bucket!r}")
        default_port = {"http": ":80", "https": ":443"}.get(parts.scheme, "")
        host = parts.netloc.removesuffix(default_port) if default_port else parts.netloc
        target = self._targets[bucket] = _Target(
            f"{parts.scheme}://{parts.netloc}",
            host,
            parts.path[: -len(_PROBE_KEY)],
            SigV4(scope[2], scope[3]),
        )
        return target

    async def _credentials(self) -> Credentials:
        """The client's current credentials, frozen (refreshed first when they expire)."""
        credentials = self._client._request_signer._credentials  # what botocore signs with
        if credentials is None:
            raise _Delegate("no credentials: botocore reports that")
        frozen = credentials.get_frozen_credentials()
        if inspect.isawaitable(frozen):
            frozen = await frozen
        return Credentials(frozen.access_key, frozen.secret_key, frozen.token)


def _client_error(
    operation: str, status: int, headers: Mapping[str, str], body: bytes
) -> ClientError:
    """The ``ClientError`` botocore raises for this answer: S3's XML error code and message,
    or (no body, as for HEAD) the status itself as the code."""
    code, message = str(status), ""
    if body:
        try:
            root = ElementTree.fromstring(body)
        except ElementTree.ParseError:
            message = body[:200].decode("utf-8", "replace")
        else:
            code = root.findtext("Code") or code
            message = root.findtext("Message") or ""
    return ClientError(
        {
            "Error": {"Code": code, "Message": message},
            "ResponseMetadata": {"HTTPStatusCode": status, "HTTPHeaders": dict(headers)},
        },
        operation,
    )


def _digests(data: bytes) -> tuple[str, str]:
    """Content-MD5 (base64) and the SigV4 payload hash (hex SHA-256) of a PUT body."""
    md5 = hashlib.md5(data, usedforsecurity=False).digest()
    return base64.b64encode(md5).decode(), hashlib.sha256(data).hexdigest()
