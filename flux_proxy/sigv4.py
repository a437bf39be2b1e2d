"""AWS Signature Version 4 for S3: headers for the store's own calls, a query for links.

What the S3 store needs of an AWS SDK is this signature and four plain HTTP calls, so
they go over the gateway's one HTTP client instead of a second client stack (see the
commit that added it for the comparison with aiobotocore). The algorithm is AWS's
published one; tests check it against AWS's own worked examples.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from urllib.parse import quote

import httpx

ALGORITHM = "AWS4-HMAC-SHA256"
# The body is not hashed: hashing megabytes would hold the event loop, and TLS already
# protects it on the way (S3 accepts this for header and query signatures alike).
UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"
# Presigned links live at most a week (SigV4's limit).
MAX_PRESIGN_SECONDS = 7 * 24 * 3600
# Headers the signature covers when present; the rest (User-Agent, Accept...) may be
# changed by the HTTP stack without breaking it.
_SIGNED = frozenset({"host", "content-type", "content-md5", "range"})


@dataclass(frozen=True, slots=True)
class AwsCredentials:
    """Keys from the standard AWS_* variables. Kept out of repr: never printed."""

    access_key_id: str
    secret_access_key: str = field(repr=False)
    session_token: str | None = field(default=None, repr=False)

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> AwsCredentials | None:
        key_id = environ.get("AWS_ACCESS_KEY_ID", "").strip()
        secret = environ.get("AWS_SECRET_ACCESS_KEY", "").strip()
        if not key_id or not secret:
            return None
        return cls(key_id, secret, environ.get("AWS_SESSION_TOKEN", "").strip() or None)


class SigV4Signer:
    def __init__(
        self,
        credentials: AwsCredentials,
        region: str,
        service: str = "s3",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._credentials = credentials
        self._region = region
        self._service = service
        self._clock = clock

    def sign(self, request: httpx.Request, payload_hash: str = UNSIGNED_PAYLOAD) -> None:
        """Add the Authorization header (and what it covers) to ``request``."""
        stamp = self._timestamp()
        request.headers["x-amz-date"] = stamp
        request.headers["x-amz-content-sha256"] = payload_hash
        if self._credentials.session_token:
            request.headers["x-amz-security-token"] = self._credentials.session_token
        headers = {
            name.lower(): " ".join(value.split())
            for name, value in request.headers.items()
            if name.lower() in _SIGNED or name.lower().startswith("x-amz-")
        }
        signed = ";".join(sorted(headers))
        canonical = _canonical_request(request.method, request.url, headers, signed, payload_hash)
        signature = self._signature(stamp, canonical)
        request.headers["authorization"] = (
            f"{ALGORITHM} Credential={self._credentials.access_key_id}/{self._scope(stamp)}, "
            f"SignedHeaders={signed}, Signature={signature}"
        )

    def presign(self, method: str, url: str, expires_seconds: int) -> str:
        """``url`` with a query that lets anyone ``method`` it for ``expires_seconds``."""
        if not 1 <= expires_seconds <= MAX_PRESIGN_SECONDS:
            raise ValueError(f"a presigned link lives 1 to {MAX_PRESIGN_SECONDS} seconds")
        stamp = self._timestamp()
        target = httpx.URL(url)
        query = {
            "X-Amz-Algorithm": ALGORITHM,
            "X-Amz-Credential": f"{self._credentials.access_key_id}/{self._scope(stamp)}",
            "X-Amz-Date": stamp,
            "X-Amz-Expires": str(expires_seconds),
            "X-Amz-SignedHeaders": "host",
        }
        if self._credentials.session_token:
            query["X-Amz-Security-Token"] = self._credentials.session_token
        target = target.copy_with(query=_canonical_query(query).encode())
        host = {"host": target.netloc.decode("ascii")}
        canonical = _canonical_request(method, target, host, "host", UNSIGNED_PAYLOAD)
        signature = self._signature(stamp, canonical)
        return str(target.copy_with(query=target.query + f"&X-Amz-Signature={signature}".encode()))

    def _timestamp(self) -> str:
        return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(self._clock()))

    def _scope(self, stamp: str) -> str:
        return f"{stamp[:8]}/{self._region}/{self._service}/aws4_request"

    def _signature(self, stamp: str, canonical_request: str) -> str:
        to_sign = "\n".join(
            (
                ALGORITHM,
                stamp,
                self._scope(stamp),
                hashlib.sha256(canonical_request.encode()).hexdigest(),
            )
        )
        key = f"AWS4{self._credentials.secret_access_key}".encode()
        for part in (stamp[:8], self._region, self._service, "aws4_request"):
            key = hmac.new(key, part.encode(), hashlib.sha256).digest()
        return hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()


def _canonical_request(
    method: str, url: httpx.URL, headers: Mapping[str, str], signed: str, payload_hash: str
) -> str:
    pairs = httpx.QueryParams(url.query.decode())
    query = _canonical_query(dict(pairs.multi_items()))
    lines = "".join(f"{name}:{headers[name]}\n" for name in sorted(headers))
    # S3 signs the path as sent (each segment encoded once), not encoded again.
    path = url.raw_path.split(b"?", 1)[0].decode("ascii") or "/"
    return "\n".join((method, path, query, lines, signed, payload_hash))


def _canonical_query(params: Mapping[str, str]) -> str:
    encoded = sorted((_encode(key), _encode(value)) for key, value in params.items())
    return "&".join(f"{key}={value}" for key, value in encoded)


def _encode(text: str) -> str:
    return quote(text, safe="-_.~")
