"""Downloading images from upstream URLs, and only from where the gateway should.

A provider answer can carry any URL. The gateway fetches it only when the host
resolves to public addresses, or is one the operator trusts: a configured
provider's own origin (its base_url's scheme, host *and* port) or a host listed in
``fetch.allow_private_hosts``. Anything
else (loopback, private ranges, link-local metadata endpoints) is refused, so
the gateway cannot be turned into a probe of the network it runs in.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from urllib.parse import urlsplit

import httpx

from flux_proxy import b64
from flux_proxy.addresses import AddressPolicy, PrivateAddress, ResolverFactory
from flux_proxy.deadline import Deadlines
from flux_proxy.errors import UpstreamError, UpstreamTimeout
from flux_proxy.imaging import check_pixels, probe
from flux_proxy.peek import ImageBytes, is_complete, pixel_size, sniff_format
from flux_proxy.read_budget import ReadBudget
from flux_proxy.request_builder import RequestBuilder
from flux_proxy.schema import GeneratedImage
from flux_proxy.upstream import AnswerTooLarge, Send, send_capped


class ImageFetcher:
    def __init__(
        self,
        send: Send,
        build: Callable[[], RequestBuilder],
        *,
        policy: AddressPolicy,
        dns: ResolverFactory,
        max_bytes: int,
        max_pixels: int,
        reads: ReadBudget | None = None,
        deadlines: Deadlines | None = None,
    ) -> None:
        # The gateway's own client, the way providers' calls use it (Runtime.exchange and
        # build_request): no redirect is followed and no cookie kept either way.
        self._send = send
        self._build = build
        self._reads = reads
        self._deadlines = deadlines
        self._max_pixels = max_pixels
        self._policy = policy
        self._dns = dns
        self._max_bytes = max_bytes

    async def fetch(self, url: str) -> bytes:
        if url.startswith("data:"):
            return b64.decode(self.data_uri_text(url))
        await self.check_url(url)
        try:
            # The same capped read as every upstream answer: refused at the cap, never
            # held whole first.
            response = await send_capped(
                self._send,
                self._build()("GET", url, headers={}),
                max_bytes=self._max_bytes,
                reads=self._reads,
                deadlines=self._deadlines,
            )
        except AnswerTooLarge:
            raise UpstreamError("The upstream image is larger than the gateway accepts.") from None
        except httpx.TimeoutException:
            raise UpstreamTimeout("Fetching the upstream image timed out.") from None
        except httpx.HTTPError:
            raise UpstreamError("Fetching the upstream image failed.") from None
        if response.status_code != 200:
            raise UpstreamError(
                f"Fetching the upstream image failed with HTTP {response.status_code}."
            )
        return response.content

    def data_uri_text(self, uri: str) -> bytes:
        """The base64 text of a ``data:`` URI, under the same cap as a download but not
        decoded: like an OpenAI ``b64_json`` answer it is passed on as it is unless a
        layer needs the bytes (its media type label is ignored: the bytes say it)."""
        header, _, payload = uri.partition(",")
        if not header.endswith(";base64"):
            raise UpstreamError("The upstream returned a data URI that is not base64.")
        if len(payload) * 3 // 4 > self._max_bytes:
            raise UpstreamError("The upstream image is larger than the gateway accepts.")
        try:
            return payload.encode("ascii")
        except UnicodeEncodeError:
            raise b64.InvalidBase64() from None

    async def ensure_data(self, image: GeneratedImage) -> GeneratedImage:
        """Give ``image`` its bytes, media type and pixel size: the one place the
        upstream's base64 is decoded, or its URL downloaded, for a layer that needs them."""
        if image.data is None:
            if image.b64 is not None:
                image.keep_decoded(b64.decode(image.b64))
            elif image.url is not None:
                image.data = await self.fetch(image.url)
        if image.data is not None:
            read_header(image, self._max_pixels)
        return image

    async def ensure_info(self, image: GeneratedImage, *, verify: bool = True) -> bool:
        """Give ``image`` its media type and pixel size without decoding it (see
        :func:`read_header`). A URL is downloaded for that unless ``verify`` is False;
        returns whether the image could be read (False: a URL left unchecked)."""
        if image.data is None and image.b64 is None:
            if image.url is None or not verify:
                return False
            image.data = await self.fetch(image.url)
        read_header(image, self._max_pixels)
        return True

    async def check_url(self, url: str) -> None:
        """Refuse URLs the gateway should not request (see the module's docstring).

        Providers call this too before following a URL an upstream handed them
        (a polling or result URL).
        """
        parts = urlsplit(url)
        host = parts.hostname
        if parts.scheme not in ("http", "https") or not host:
            raise UpstreamError("The upstream returned a URL the gateway cannot fetch.")
        if parts.username is not None or parts.password is not None:
            # Refused, not stripped: whoever wrote user:pass@ into an answer meant them to
            # be sent, and the gateway sends no credential an upstream chose.
            raise UpstreamError(
                "The upstream returned a URL with credentials in it (user:password@); "
                "the gateway does not fetch such URLs."
            )
        if self._policy.trusts_url(url):
            return
        # Checked here for a clear 502 before anything is sent; the connection checks
        # again what its own lookup answers (flux_proxy/addresses.py), so a name that
        # answers differently the second time gains nothing.
        resolver = self._dns()
        try:
            answers = await resolver.resolve(host, 0, socket.AF_UNSPEC)
            self._policy.check(host, (answer["host"] for answer in answers))
        except PrivateAddress:
            raise UpstreamError(
                "The upstream returned a URL on a private address; "
                "the gateway does not fetch from there."
            ) from None
        except OSError:
            raise UpstreamError("The upstream image host could not be resolved.") from None
        finally:
            await resolver.close()


def read_header(image: GeneratedImage, max_pixels: int) -> None:
    """Set ``image``'s media type and pixel size from the first bytes it holds (its
    bytes or its base64 text, which stays undecoded: only the groups read are), and
    check from the last ones that it is complete: a truncated upstream image is a 502,
    never a 200, and so is one above ``max_pixels``, before anything decodes it."""
    if image.media_type and image.width and image.height and not image.assumed:
        return  # read already, or made by the gateway itself
    text = image.b64 if image.data is None else None
    held = ImageBytes(text=text) if text is not None else ImageBytes(data=image.data)
    fmt = sniff_format(held.read(0, 12))
    if fmt is None:
        raise UpstreamError("The upstream returned data that is not a supported image.")
    if not is_complete(held, fmt):
        raise UpstreamError(
            f"The upstream returned a truncated {fmt} image ({held.length} bytes): "
            "it stops before the end of the file."
        )
    size = pixel_size(held, fmt)
    if size is None:  # a header this reading does not know: Pillow reads it
        if image.data is None:
            assert image.b64 is not None
            image.keep_decoded(b64.decode(image.b64))
        assert image.data is not None
        fmt, width, height = probe(image.data)
        size = (width, height)
    check_pixels(*size, max_pixels)
    image.media_type = f"image/{fmt}"
    image.width, image.height = size
    image.assumed = False
