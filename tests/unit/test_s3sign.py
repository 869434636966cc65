"""The direct path's SigV4 signer gives exactly botocore's S3 signature, header for header."""

from __future__ import annotations

import hashlib
from urllib.parse import quote, urlsplit

import pytest
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import ReadOnlyCredentials

from asynckarton.storage._s3sign import Credentials, SigV4

CASES = [
    # (url prefix, host as sent, method, key, extra headers, body, token)
    ("http://127.0.0.1:9000/karton/", "127.0.0.1:9000", "GET", "uid", {}, b"", None),
    (
        "http://minio:9000/karton/",
        "minio:9000",
        "GET",
        "a b/c+d~é",
        {"Range": "bytes=5-"},
        b"",
        None,
    ),
    ("https://s3.amazonaws.com/karton/", "s3.amazonaws.com", "HEAD", "x/y", {}, b"", "tok=="),
    (
        "https://karton.s3.eu-west-1.amazonaws.com/",
        "karton.s3.eu-west-1.amazonaws.com",
        "PUT",
        "0123abc",
        {"Content-MD5": "M2MRoBYYQybdvdYe3U7rUg=="},
        b"x" * 4096,
        None,
    ),
    ("http://h/b/", "h", "PUT", "empty", {"Content-MD5": "1B2M2Y8AsgTpgAmY7PhCfg=="}, b"", "t"),
]


@pytest.mark.parametrize(("prefix", "host", "method", "key", "headers", "body", "token"), CASES)
def test_signature_matches_botocore(
    prefix: str,
    host: str,
    method: str,
    key: str,
    headers: dict[str, str],
    body: bytes,
    token: str | None,
) -> None:
    url = prefix + quote(key, safe="/~")
    region = "eu-west-1" if "eu-west-1" in prefix else "us-east-1"
    request = AWSRequest(method=method, url=url, data=body, headers=dict(headers))
    S3SigV4Auth(ReadOnlyCredentials("AKID", "secret/key+", token), "s3", region).add_auth(request)
    expected = {name: str(value) for name, value in request.headers.items()}

    ours = SigV4(region, "s3").sign(
        Credentials("AKID", "secret/key+", token),
        method,
        host,
        urlsplit(url).path,
        headers,
        hashlib.sha256(body).hexdigest(),
        expected["X-Amz-Date"],
    )
    assert ours == expected


def test_signing_key_follows_the_day_and_the_secret() -> None:
    signer = SigV4("us-east-1", "s3")
    creds = Credentials("AKID", "one", None)
    args: tuple[str, str, str, dict[str, str], str] = (
        "GET",
        "h",
        "/b/k",
        {},
        hashlib.sha256(b"").hexdigest(),
    )
    first = signer.sign(creds, *args, "20260101T000000Z")["Authorization"]
    assert signer.sign(creds, *args, "20260102T000000Z")["Authorization"] != first
    other = signer.sign(creds._replace(secret_key="two"), *args, "20260101T000000Z")
    assert other["Authorization"] != first
    assert signer.sign(creds, *args, "20260101T000000Z")["Authorization"] == first
