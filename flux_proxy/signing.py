"""Signed, expiring links to images the gateway hosts."""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Callable

from flux_proxy.errors import Forbidden


class UrlSigner:
    def __init__(
        self, key: bytes, ttl_seconds: int, clock: Callable[[], float] = time.time
    ) -> None:
        self._key = key
        self._ttl = ttl_seconds
        self._clock = clock

    def query(self, name: str) -> str:
        """The query string that makes a link to ``name`` valid until it expires."""
        expires = int(self._clock()) + self._ttl
        return f"expires={expires}&signature={self._signature(name, expires)}"

    def verify(self, name: str, expires: str | None, signature: str | None) -> int:
        """Check a link's signature and expiry; the seconds it stays valid (403 if none)."""
        # isascii: str.isdigit() also accepts digits like "²" that int() refuses.
        if not expires or not signature or not _is_small_number(expires):
            raise Forbidden("This image link is not signed.", code="invalid_signature")
        if not hmac.compare_digest(self._signature(name, int(expires)), signature):
            raise Forbidden("This image link's signature is not valid.", code="invalid_signature")
        left = int(expires) - int(self._clock())
        if left < 0:
            raise Forbidden("This image link has expired.", code="link_expired")
        return left

    def _signature(self, name: str, expires: int) -> str:
        message = f"{name}\n{expires}".encode()
        return hmac.new(self._key, message, hashlib.sha256).hexdigest()


def _is_small_number(text: str) -> bool:
    return text.isascii() and text.isdigit() and len(text) <= 12
