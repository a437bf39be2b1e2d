"""Shared resources of one gateway instance: HTTP client, image workers, store.

Nothing here is global: two gateways in one process (tests do this) share nothing.
"""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx

from flux_proxy.config import Settings
from flux_proxy.fetch import ImageFetcher
from flux_proxy.imaging import ImageWorker
from flux_proxy.signing import UrlSigner
from flux_proxy.store import DirectoryImageStore, ImageStore, MemoryImageStore

logger = logging.getLogger("flux_proxy")


@dataclass
class Runtime:
    settings: Settings
    environ: Mapping[str, str]
    http: httpx.AsyncClient
    images: ImageWorker
    fetcher: ImageFetcher
    store: ImageStore
    signer: UrlSigner

    @classmethod
    def create(
        cls,
        settings: Settings,
        environ: Mapping[str, str] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> Runtime:
        environ = os.environ if environ is None else environ
        limits = settings.limits
        http = httpx.AsyncClient(
            transport=transport,
            timeout=httpx.Timeout(limits.upstream_timeout, connect=10.0),
            limits=httpx.Limits(max_connections=200, max_keepalive_connections=50),
            follow_redirects=False,
        )
        trusted = [
            host
            for model in settings.models.values()
            if model.base_url and (host := urlsplit(model.base_url).hostname)
        ] + settings.fetch.allow_private_hosts
        return cls(
            settings=settings,
            environ=environ,
            http=http,
            images=ImageWorker(limits.image_workers),
            fetcher=ImageFetcher(http, trusted_hosts=trusted, max_bytes=limits.max_fetch_bytes),
            store=_make_store(settings),
            signer=UrlSigner(_signing_key(settings, environ), settings.store.ttl_seconds),
        )

    def secret(self, env_name: str | None) -> str | None:
        """A secret from the environment, by the variable's name in config."""
        if not env_name:
            return None
        return self.environ.get(env_name) or None

    async def aclose(self) -> None:
        await self.http.aclose()


def _make_store(settings: Settings) -> ImageStore:
    store = settings.store
    if store.backend == "directory":
        if store.directory is None:
            from flux_proxy.config import ConfigError

            raise ConfigError("store.directory: required when store.backend is 'directory'")
        return DirectoryImageStore(store.directory, ttl_seconds=store.ttl_seconds)
    return MemoryImageStore(ttl_seconds=store.ttl_seconds, max_bytes=store.max_bytes)


def _signing_key(settings: Settings, environ: Mapping[str, str]) -> bytes:
    key = environ.get(settings.store.signing_key_env)
    if key:
        return key.encode()
    if settings.store.backend != "memory":
        logger.warning(
            "%s is not set: image links are signed with a per-process key and "
            "stop working after a restart or on another replica",
            settings.store.signing_key_env,
        )
    return secrets.token_bytes(32)
