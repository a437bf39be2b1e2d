"""S3ImageStore: images as objects in one S3-compatible bucket, shared by every replica.

Four plain calls over the gateway's one HTTP client, signed with SigV4: PUT and GET an
object, HEAD the bucket for readiness, and (in presigned mode) no call at all to make a
link. Objects older than ``store.ttl_seconds`` are never served; a bucket lifecycle rule
deletes them (README, "Scale out").

Neither the credentials nor a signed URL is ever logged or put in an error: failures
are described by what happened (unreachable, refused, HTTP status, S3's error code).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import quote, urlsplit

import httpx

from flux_proxy.errors import StoreUnavailable
from flux_proxy.request_context import PEER_EXTENSION
from flux_proxy.sigv4 import SigV4Signer
from flux_proxy.store import MEDIA_TYPE_OF_EXTENSION, StoredImage, is_valid_name, new_name

logger = logging.getLogger("flux_proxy")

# The replica that stored an image says when it stops being served (its clock, like the
# signed link's), so a GET needs no clock of the bucket's.
_EXPIRES_HEADER = "x-amz-meta-flux-proxy-expires"
_ERROR_CODE = re.compile(rb"<Code>([A-Za-z0-9.]{1,64})</Code>")
UNREACHABLE = "the image bucket is unreachable"


@dataclass(frozen=True, slots=True)
class BucketAddress:
    """Where the bucket's objects are: path-style (``endpoint/bucket/key``, for MinIO,
    moto and most S3-compatibles) or virtual-hosted (``bucket.endpoint/key``, AWS)."""

    endpoint_url: str
    bucket: str
    path_style: bool

    @property
    def bucket_url(self) -> str:
        if self.path_style:
            return f"{self.endpoint_url}/{self.bucket}"
        parts = urlsplit(self.endpoint_url)
        return f"{parts.scheme}://{self.bucket}.{parts.netloc}"

    def object_url(self, key: str) -> str:
        return f"{self.bucket_url}/{quote(key, safe='/-_.~')}"


class S3ImageStore:
    def __init__(
        self,
        http: Callable[[], httpx.AsyncClient],
        address: BucketAddress,
        signer: SigV4Signer,
        *,
        prefix: str,
        ttl_seconds: int,
        timeout_seconds: float,
        presigned_links: bool,
        check_seconds: float,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._http = http
        self._address = address
        self._signer = signer
        self._prefix = prefix
        self._ttl = ttl_seconds
        self._timeout = httpx.Timeout(timeout_seconds)
        # A probe must answer within the kubelet's timeout, whatever the store's own.
        self._probe_timeout = httpx.Timeout(min(timeout_seconds, 2.0))
        self._presigned = presigned_links
        self._check_seconds = check_seconds
        # How long a failure stops url requests before they reach a provider.
        self._recent_seconds = max(check_seconds, 1.0)
        self._clock = clock
        self._monotonic = monotonic
        # The last thing learnt about the bucket, and when: (monotonic time, problem).
        self._known: tuple[float, str | None] | None = None

    @property
    def bucket_url(self) -> str:
        return self._address.bucket_url

    async def put(self, data: bytes, fmt: str) -> str:
        name = new_name(fmt)
        expires = int(self._clock()) + self._ttl
        response = await self._call(
            "PUT",
            self._address.object_url(self._prefix + name),
            content=data,
            headers={"content-type": MEDIA_TYPE_OF_EXTENSION[name.rsplit(".", 1)[1]]},
            extra={_EXPIRES_HEADER: str(expires)},
        )
        if response.status_code != 200:
            raise self._failed("PUT", response)
        return name

    async def get(self, name: str) -> StoredImage | None:
        if not is_valid_name(name):
            return None
        response = await self._call("GET", self._address.object_url(self._prefix + name))
        if response.status_code == 404:
            return None
        if response.status_code != 200:
            raise self._failed("GET", response)
        expires = response.headers.get(_EXPIRES_HEADER, "")
        if not expires.isascii() or not expires.isdigit() or int(expires) < self._clock():
            return None  # past its time (a lifecycle rule deletes it later)
        return StoredImage(response.content, MEDIA_TYPE_OF_EXTENSION[name.rsplit(".", 1)[1]])

    def direct_url(self, name: str) -> str | None:
        if not self._presigned:
            return None
        return self._signer.presign("GET", self._address.object_url(self._prefix + name), self._ttl)

    def known_problem(self) -> str | None:
        # Only while fresh: with no probe or request since, the next request tries again.
        if self._known is None or self._monotonic() - self._known[0] >= self._recent_seconds:
            return None
        return self._known[1]

    async def problem(self) -> str | None:
        """HEAD the bucket, at most once per ``check_seconds`` (probes come every few
        seconds from every kubelet); a PUT or GET that just succeeded or failed counts."""
        if self._known is not None and self._monotonic() - self._known[0] < self._check_seconds:
            return self._known[1]
        try:
            response = await self._call("HEAD", self._address.bucket_url, probe=True)
        except StoreUnavailable:
            return UNREACHABLE
        problem = None if response.status_code == 200 else _described(response.status_code)
        self._learn(problem)
        return problem

    async def _call(
        self,
        method: str,
        url: str,
        *,
        content: bytes | None = None,
        headers: dict[str, str] | None = None,
        extra: dict[str, str] | None = None,
        probe: bool = False,
    ) -> httpx.Response:
        client = self._http()
        request = client.build_request(
            method,
            url,
            content=content,
            headers={**(headers or {}), **(extra or {})},
            timeout=self._probe_timeout if probe else self._timeout,
        )
        self._signer.sign(request)
        request.extensions[PEER_EXTENSION] = "s3"  # not the provider's, in metrics and logs
        try:
            response = await client.send(request)
        except httpx.TransportError as error:
            # The exception's class, not its text: that may quote the request.
            logger.warning("image store: %s failed: %s", method, type(error).__name__)
            self._learn(UNREACHABLE)
            raise StoreUnavailable(UNREACHABLE) from None
        if response.status_code < 500 and response.status_code not in (401, 403):
            self._learn(None)  # the bucket answered, and took the gateway's credentials
        return response

    def _failed(self, method: str, response: httpx.Response) -> StoreUnavailable:
        code = _ERROR_CODE.search(response.content)
        logger.warning(
            "image store: %s answered HTTP %s%s",
            method,
            response.status_code,
            f" ({code.group(1).decode()})" if code else "",
        )
        problem = _described(response.status_code)
        self._learn(problem)
        return StoreUnavailable(problem)

    def _learn(self, problem: str | None) -> None:
        self._known = (self._monotonic(), problem)


def _described(status: int) -> str:
    """A bucket's answer, in words fit for an unauthenticated probe's reader."""
    if status in (401, 403):
        return "the image bucket refused the gateway's credentials"
    if status == 404:
        return "the image bucket does not exist"
    if status == 301:  # S3's PermanentRedirect: the bucket lives in another region
        return "the image bucket is in another region than store.s3.region"
    return f"the image bucket answered HTTP {status}"
