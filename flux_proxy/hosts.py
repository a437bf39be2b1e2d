"""Where a provider key may go: the provider's own hosts, and nowhere else.

Upstreams hand back URLs to follow (BFL's ``polling_url``, fal's ``status_url`` and
``cancel_url``, Replicate's ``urls.get``). The gateway sends its provider key along
only when the URL's host belongs to the provider:

- a host the provider declares as its own (``BflProvider.key_hosts``: ``*.bfl.ai``, ...),
- the configured ``base_url``'s origin (host and port: an emulator, a private mirror),
- a host the model entry's ``trusted_hosts`` option lists.

A pattern is an exact host name, or ``*.domain`` for any host below ``domain``.
Anything else is refused with a 502 that names the host and the option to set, before
a byte is sent: following such a URL would hand the key to whoever the answer named.
"""

from __future__ import annotations

from collections.abc import Iterable
from urllib.parse import urlsplit

from flux_proxy.errors import UpstreamError


class KeyHosts:
    """The hosts one model entry's provider key may be sent to."""

    def __init__(self, provider: str, patterns: Iterable[str], base_url: str | None) -> None:
        self._provider = provider
        self._patterns = tuple(pattern.strip().lower() for pattern in patterns if pattern.strip())
        self._base_origin = origin(base_url) if base_url else None

    def allows(self, url: str) -> bool:
        parts = urlsplit(url)
        host = (parts.hostname or "").lower()
        if parts.scheme not in ("http", "https") or not host:
            return False
        if self._base_origin is not None and origin(url) == self._base_origin:
            return True
        return any(host_matches(host, pattern) for pattern in self._patterns)

    def check(self, url: str, what: str) -> None:
        """Refuse (502) a handed-back URL whose host is not the provider's."""
        if self.allows(url):
            return
        host = urlsplit(url).hostname or "no host"
        raise UpstreamError(
            f"The {self._provider} upstream handed back a {what} on {host!r}, which is not one "
            f"of the provider's hosts nor the configured base_url's; the gateway does not send "
            "its key there (list the host in the model's trusted_hosts option to allow it)."
        )


def host_matches(host: str, pattern: str) -> bool:
    if pattern.startswith("*."):
        return host.endswith(pattern[1:])
    return host == pattern


def origin(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) with the scheme's default port filled in."""
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:  # a port that is not a number matches nothing
        return ("", "", -1)
    default = 443 if parts.scheme == "https" else 80
    return (parts.scheme, (parts.hostname or "").lower(), port or default)
