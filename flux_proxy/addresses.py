"""Which addresses the gateway connects to, checked where it connects.

Every host name the gateway's HTTP client connects to is resolved by
:class:`CheckedResolver`: the addresses the name answers are checked, and the
connection goes to those very addresses. No second lookup happens between the
check and the connection, so a name cannot answer a public address to the check
and a loopback one to the connection (DNS rebinding). TLS's SNI and the ``Host``
header still carry the name: only the address comes from here.

A host the operator trusts may answer any address: a configured ``base_url``'s host
and port, or a host in ``fetch.allow_private_hosts``. Every other name must answer
public addresses only (:func:`is_public`). IP literals are not resolved at all;
:meth:`flux_proxy.fetch.ImageFetcher.check_url` refuses private ones before
anything is sent, and no DNS answer can change them.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Iterable

from aiohttp.abc import AbstractResolver, ResolveResult

from flux_proxy.hosts import origin

# Makes the DNS resolver to ask (called inside the running loop, where aiohttp's
# resolvers must be made): the host's own by default, a double in tests.
ResolverFactory = Callable[[], AbstractResolver]

# IPv6 forms that carry an IPv4 address: NAT64 (64:ff9b::/96) and the deprecated
# IPv4-compatible ::/96. is_global judges the IPv6 wrapper, not the address inside.
_EMBEDS_IPV4 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("::/96"))


def is_public(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Whether ``address`` is globally routable, judging any IPv4 address it wraps."""
    if isinstance(address, ipaddress.IPv6Address):
        inner = address.ipv4_mapped or address.sixtofour
        if inner is None and any(address in network for network in _EMBEDS_IPV4):
            inner = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if inner is not None:
            return inner.is_global
    return address.is_global


class PrivateAddress(OSError):
    """A name the gateway does not trust answered a non-public address."""

    def __init__(self, host: str) -> None:
        super().__init__(f"{host} resolves to a private address")


class AddressPolicy:
    """The hosts that may be on private addresses; every other one must be public."""

    def __init__(self, trusted_origins: Iterable[str], trusted_hosts: Iterable[str]) -> None:
        self._origins = {origin(url) for url in trusted_origins}
        self._host_ports = {(host, port) for _, host, port in self._origins}
        self._hosts = {host.lower() for host in trusted_hosts}

    def trusts_url(self, url: str) -> bool:
        """Whether ``url``'s host may be anywhere: a trusted origin (scheme, host and
        port) or a trusted host (any port)."""
        return origin(url)[1] in self._hosts or origin(url) in self._origins

    def trusts(self, host: str, port: int) -> bool:
        """:meth:`trusts_url` as a connection sees it: a host and a port, no scheme."""
        host = host.lower()
        return host in self._hosts or (host, port) in self._host_ports

    def check(self, host: str, addresses: Iterable[str]) -> None:
        """Refuse (:class:`PrivateAddress`) ``addresses`` a name answered that are
        not all public."""
        for address in addresses:
            try:
                parsed = ipaddress.ip_address(address)
            except ValueError:  # not an address this can judge: not a public one
                raise PrivateAddress(host) from None
            if not is_public(parsed):
                raise PrivateAddress(host)


class CheckedResolver(AbstractResolver):
    """aiohttp's resolver for the gateway's connections: ``resolver``'s answers, with
    a name the policy does not trust refused unless every address is public."""

    def __init__(self, policy: AddressPolicy, resolver: AbstractResolver) -> None:
        self._policy = policy
        self._resolver = resolver

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        answers = await self._resolver.resolve(host, port, family)
        if not self._policy.trusts(host, port):
            self._policy.check(host, (answer["host"] for answer in answers))
        return answers

    async def close(self) -> None:
        await self._resolver.close()
