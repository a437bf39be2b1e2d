"""Shared resources of one gateway instance: HTTP client, image workers, store.

Nothing here is global: two gateways in one process (tests do this) share nothing.
"""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Mapping
from http.cookiejar import CookieJar, DefaultCookiePolicy

import httpx
from aiohttp import ThreadedResolver

from flux_proxy.addresses import AddressPolicy, CheckedResolver, ResolverFactory
from flux_proxy.config import ConfigError, Settings
from flux_proxy.deadline import Deadlines
from flux_proxy.errors import UpstreamCredentialsMissing
from flux_proxy.fetch import ImageFetcher
from flux_proxy.imaging import ImageWorker
from flux_proxy.metrics import Metrics
from flux_proxy.observed import ObservedTransport
from flux_proxy.read_budget import ReadBudget
from flux_proxy.request_builder import RequestBuilder
from flux_proxy.s3_store import BucketAddress, S3ImageStore
from flux_proxy.signing import UrlSigner
from flux_proxy.sigv4 import AwsCredentials, SigV4Signer
from flux_proxy.sizes import SizeLimits, SizePlanner
from flux_proxy.store import DirectoryImageStore, ImageStore, MemoryImageStore
from flux_proxy.transport import NO_URL_CREDENTIALS, AiohttpTransport, WireAnswer

logger = logging.getLogger("flux_proxy")
# httpx's own logger: the per-request line it writes, written for requests sent past it.
_httpx_logger = logging.getLogger("httpx")


class Runtime:
    """Created once per gateway; the HTTP client is opened on first use.

    A lifespan shutdown closes the client; a host app whose lifespan runs again
    (one test client per test, say) gets a fresh one on the next call.
    """

    def __init__(
        self,
        settings: Settings,
        environ: Mapping[str, str] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        resolver: ResolverFactory = ThreadedResolver,
    ) -> None:
        """``resolver`` makes the DNS resolver every host name is looked up with."""
        self.settings = settings
        self.environ: Mapping[str, str] = os.environ if environ is None else environ
        self._transport = transport
        self._client: httpx.AsyncClient | None = None
        self._wire: ObservedTransport | None = None  # the client's transport
        self._builder: RequestBuilder | None = None  # the client's requests
        limits = settings.limits
        self.metrics = Metrics(self.environ)
        # Every whole answer read from an upstream (provider calls, image downloads).
        self.reads = ReadBudget(limits.upstream_read_bytes)
        # The timers every request's deadlines share (flux_proxy/deadline.py).
        self.deadlines = Deadlines()
        # Every request's size, resolved once: admission's demand and the size layer ask
        # the same question of the same planner.
        self.sizes = SizePlanner(SizeLimits(max_side=limits.max_side, max_pixels=limits.max_pixels))
        self.images = ImageWorker(
            limits.image_workers,
            limits.light_image_workers,
            # Light image work: what one image of a light request can be.
            limits.light_request_pixels,
            seconds=self.metrics.image_seconds,
        )
        origins = [t.base_url for t in settings.provider_configs() if t.base_url]
        private = settings.fetch.allow_private_hosts
        self.fetcher = ImageFetcher(
            self.exchange,
            lambda: self.build_request,
            policy=AddressPolicy(origins, private),
            dns=resolver,
            max_bytes=limits.max_fetch_bytes,
            max_pixels=limits.max_upstream_pixels,
            reads=self.reads,
            deadlines=self.deadlines,
        )
        self.store: ImageStore = self._make_store()
        # Every connection: the fetcher's hosts, the forwarder's base_url and the image
        # bucket's endpoint (the operator's own, which may be private too).
        forward = [settings.forward.base_url] if settings.forward.base_url else []
        bucket = [self.store.bucket_url] if isinstance(self.store, S3ImageStore) else []
        self._connect_policy = AddressPolicy([*origins, *forward, *bucket], private)
        self._resolver = resolver
        self.signer = UrlSigner(_signing_key(settings, self.environ), settings.store.ttl_seconds)

    @property
    def http(self) -> httpx.AsyncClient:
        """The one client all upstream I/O goes through."""
        if self._client is None or self._client.is_closed:
            limits = self.settings.limits
            wire = self._transport or AiohttpTransport(
                max_connections=200,
                ssl_context=httpx.create_ssl_context,
                # The address each connection goes to is the one checked.
                resolver=lambda: CheckedResolver(self._connect_policy, self._resolver()),
                idle_seconds=limits.upstream_idle_seconds,
            )
            # Every exchange timed and counted, the ones send() makes past the client too.
            self._wire = ObservedTransport(wire, self.metrics)
            self._client = httpx.AsyncClient(
                transport=self._wire,
                # A gateway serves many clients: an upstream's Set-Cookie for one must
                # never ride along on another's request, so the jar accepts nothing.
                cookies=CookieJar(policy=DefaultCookiePolicy(allowed_domains=[])),
                timeout=httpx.Timeout(limits.upstream_timeout, connect=10.0),
                limits=httpx.Limits(max_connections=200, max_keepalive_connections=50),
                follow_redirects=False,
                # A URL's user:pass@ never becomes an Authorization header.
                auth=NO_URL_CREDENTIALS,
            )
            self._builder = RequestBuilder(self._client, jar_stays_empty=True)
        return self._client

    @property
    def build_request(self) -> RequestBuilder:
        """``http.build_request`` for providers' calls, the client's part done once."""
        _ = self.http  # opens the client, and with it the builder, if need be
        assert self._builder is not None
        return self._builder

    async def exchange(self, request: httpx.Request) -> WireAnswer:
        """A request ``http`` built, straight onto its transport; the answer's head read.

        What ``AsyncClient.send`` adds around the transport is never used by a
        provider call: no auth (the client's is none), no redirect followed, no cookie
        kept (its jar accepts none). It cost a fifth of a url pass-through's CPU (the
        jar's look at every answer alone 4-5%), so providers' calls go this way, and
        take the answer as the wire gives it (no httpx.Response made for one read whole
        at once). The request line httpx would log is logged the same, under its logger."""
        _ = self.http  # opens the client, and with it the transport, if need be
        assert self._wire is not None
        answer = await self._wire.exchange(request)
        if _httpx_logger.isEnabledFor(logging.INFO):
            _httpx_logger.info(
                'HTTP Request: %s %s "%s %d %s"',
                request.method,
                request.url,
                answer.http_version,
                answer.status_code,
                answer.reason_phrase,
            )
        return answer

    def secret(self, env_name: str | None) -> str | None:
        """A secret from the environment, by the variable's name in config."""
        if not env_name:
            return None
        return self.environ.get(env_name) or None

    def upstream_key(self, env_name: str) -> str:
        """The provider key held in ``env_name``; a clear 502 naming the variable if unset."""
        key = self.secret(env_name)
        if key is None:
            raise UpstreamCredentialsMissing([env_name])
        return key

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()

    def _make_store(self) -> ImageStore:
        store = self.settings.store
        if store.backend == "s3":
            return self._s3_store()
        if store.backend == "directory":
            if store.directory is None:
                raise ConfigError("store.directory: required when store.backend is 'directory'")
            return DirectoryImageStore(store.directory, ttl_seconds=store.ttl_seconds)
        return MemoryImageStore(ttl_seconds=store.ttl_seconds, max_bytes=store.max_bytes)

    def _s3_store(self) -> S3ImageStore:
        """The bucket, as the config names it and the standard AWS_* variables fill in."""
        s3, environ = self.settings.store.s3, self.environ
        assert s3.bucket is not None  # StoreSettings checked it
        credentials = AwsCredentials.from_environ(environ)
        if credentials is None:
            raise ConfigError(
                "store.backend 's3': set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                "(and AWS_SESSION_TOKEN for temporary credentials) in the environment"
            )
        region = (
            s3.region or environ.get("AWS_REGION") or environ.get("AWS_DEFAULT_REGION")
        ) or "us-east-1"
        endpoint = s3.endpoint_url or (
            environ.get("AWS_ENDPOINT_URL_S3") or environ.get("AWS_ENDPOINT_URL") or ""
        ).rstrip("/")
        custom = bool(endpoint)
        return S3ImageStore(
            lambda: self.http,
            BucketAddress(
                endpoint_url=endpoint or f"https://s3.{region}.amazonaws.com",
                bucket=s3.bucket,
                path_style=custom if s3.path_style is None else s3.path_style,
            ),
            SigV4Signer(credentials, region),
            prefix=s3.prefix,
            ttl_seconds=self.settings.store.ttl_seconds,
            timeout_seconds=s3.timeout_seconds,
            presigned_links=s3.links == "presigned",
            check_seconds=s3.check_seconds,
        )


def _signing_key(settings: Settings, environ: Mapping[str, str]) -> bytes:
    key = environ.get(settings.store.signing_key_env)
    if key:
        return key.encode()
    store = settings.store
    presigned = store.backend == "s3" and store.s3.links == "presigned"  # S3 signs those
    if store.backend != "memory" and not presigned:
        logger.warning(
            "%s is not set: image links are signed with a per-process key and "
            "stop working after a restart or on another replica",
            settings.store.signing_key_env,
        )
    return secrets.token_bytes(32)
