"""The outer layer: plain ASGI, mountable anywhere.

``FluxProxy`` answers the OpenAI image routes under the API prefix through a
Starlette ``Router`` and hands every other request to the host app it wraps
(mounted mode), to the forwarder (standalone, ``forward.base_url``) or answers
an OpenAI-format 404. JSON is parsed once here, on the way in, and rendered
once, on the way out.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import orjson
from aiohttp import ThreadedResolver
from pydantic import ValidationError
from starlette.datastructures import Headers
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.routing import Router as HTTPRouter
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from flux_proxy import b64
from flux_proxy.addresses import ResolverFactory
from flux_proxy.admission import Admission
from flux_proxy.breaker import BreakerBoard, Clock
from flux_proxy.composition import build_stack
from flux_proxy.config import ConfigError, Settings, describe_validation_error, load_settings
from flux_proxy.deadline import Deadline
from flux_proxy.disconnect import unless_disconnected
from flux_proxy.drain import Drain
from flux_proxy.eager import Pending, eagerly
from flux_proxy.errors import (
    AuthenticationFailed,
    GatewayError,
    InternalError,
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    RequestTimeout,
)
from flux_proxy.forward import Forwarder
from flux_proxy.generation import Generator, render_json, render_stream
from flux_proxy.health import Health
from flux_proxy.hosts import host_matches
from flux_proxy.kept import Kept
from flux_proxy.logs import EVENT
from flux_proxy.metrics import IMAGE_GENERATION, BreakerMetrics, Children, Metrics
from flux_proxy.openapi import OPENAPI_PATH, openapi_document
from flux_proxy.plugins import load_registry
from flux_proxy.request_context import (
    REQUEST_ID_HEADER,
    UNKNOWN_MODEL,
    RequestContext,
    current,
    enter,
    leave,
    request_id_from,
)
from flux_proxy.routing import Router
from flux_proxy.runtime import Runtime
from flux_proxy.schema import ImageRequest, ImageResult, ProgressSink
from flux_proxy.startup import announce
from flux_proxy.store import is_valid_name

logger = logging.getLogger("flux_proxy")

_REQUEST_ID_NAME = REQUEST_ID_HEADER.encode()
# The Hosts whose public URL is kept worked out (a gateway is reached under a few).
_PUBLIC_URLS_KEPT = 64

ConfigInput = Settings | str | Path | Mapping[str, Any] | None
# A route handler; None means the client went away and nothing is to be sent.
Handler = Callable[[Request], Awaitable[Response | None]]


class FluxProxy:
    def __init__(
        self,
        config: ConfigInput = None,
        *,
        app: ASGIApp | None = None,
        environ: Mapping[str, str] | None = None,
        plugins: Iterable[object] = (),
        transport: httpx.AsyncBaseTransport | None = None,
        clock: Clock = time.monotonic,
        resolver: ResolverFactory = ThreadedResolver,
    ) -> None:
        """``transport`` and ``resolver`` replace the HTTP client's wire and its DNS
        (tests: an in-process upstream, a DNS double); ``clock`` the circuit breakers'."""
        settings = _as_settings(config, environ)
        registry = load_registry(plugins)
        self.settings = settings
        self.runtime = Runtime(settings, environ, transport, resolver)
        providers = {name: factory(self.runtime) for name, factory in registry.providers.items()}
        self.router = Router(settings, providers)
        stack = build_stack(settings.middlewares, registry.middlewares, self.runtime)
        # Upstream health, per gateway; ``clock`` lets tests move time (cool-downs).
        self.breakers = BreakerBoard(settings.breaker, clock, BreakerMetrics(self.runtime.metrics))
        self._generator = Generator(
            settings, stack, self.breakers, self.runtime.sizes, self.runtime.deadlines
        )
        self._admission = Admission(settings.limits)
        self._app = app
        self._prefix = settings.server.api_prefix
        self._allowed_hosts = [host.strip().lower() for host in settings.server.allowed_hosts]
        # _public_url's answers, by what they depend on (bounded: _PUBLIC_URLS_KEPT).
        self._public_urls: Kept[tuple[object, ...], str | None] = Kept(_PUBLIC_URLS_KEPT)
        self._client_keys = [
            key.strip()
            for key in (self.runtime.secret(settings.auth.api_keys_env) or "").split(",")
            if key.strip()
        ]
        self._client_key_bytes = [key.encode() for key in self._client_keys]
        # Standalone only: mounted, the host app owns every other request.
        self._forwarder: Forwarder | None = None
        if app is None and settings.forward.base_url is not None:
            self._forwarder = Forwarder(
                lambda: self.runtime.http,
                settings.forward,
                self.runtime.secret(settings.forward.api_key_env),
                # A client key the gateway checked is its credential, not the upstream's.
                forward_authorization=not self._client_keys,
            )
        self._started = int(time.time())
        self.metrics = metrics = self.runtime.metrics
        self.health = Health(self.runtime.store, metrics)
        self._image_counts = _ImageCounts(metrics)
        prefix = self._prefix
        self._fallback: ASGIApp = (
            self._to_host if app is not None else self._forward if self._forwarder else _not_found
        )
        routes = [
            _GatewayRoute(
                f"{prefix}/images/generations",
                self._generations,
                ["POST"],
                metrics,
                operation=IMAGE_GENERATION,
            ),
            _GatewayRoute(f"{prefix}/models", self._models, ["GET"], metrics),
            _GatewayRoute(f"{prefix}/models/{{name}}", self._model, ["GET"], metrics),
            _GatewayRoute(f"{prefix}/images/files/{{name}}", self._file, ["GET"], metrics),
        ]
        health_paths = settings.server.health_paths
        probes = {
            "/healthz": self.health.live,
            "/readyz": self.health.ready,
            "/metrics": self.health.metrics,
        }
        if not (health_paths or (health_paths is None and app is None)):
            probes = {}
        # Rendered once: it describes the configuration, which does not change.
        self._openapi_body = orjson.dumps(
            openapi_document(
                settings, health_paths=bool(probes), client_keys=bool(self._client_keys)
            )
        )
        routes.append(_GatewayRoute(f"{prefix}{OPENAPI_PATH}", self._openapi, ["GET"], metrics))
        # Probes and scrapes come every few seconds: their lines go to debug.
        routes += [
            _GatewayRoute(path, probe, ["GET"], metrics, log_level=logging.DEBUG)
            for path, probe in probes.items()
        ]
        # Begun by `flux-proxy serve` on SIGTERM (serving.py); probes keep their own answers.
        self.drain = Drain(exempt_paths=probes, on_begin=self.health.stopping)
        # The HTTP edge (self.router maps model names to providers).
        self._http_router = HTTPRouter(
            routes,
            # "/v1/models/" is not a gateway route: it falls through, it is not redirected.
            redirect_slashes=False,
            default=self._fallback,
            lifespan=self._lifespan,
        )
        # The routes without path parameters, by their path: a request for one of them
        # (most are) goes straight to it, without the Router's scan of every pattern.
        self._exact = _exact_routes(routes)
        announce(
            self.router.models(),
            [entry if isinstance(entry, str) else entry.name for entry in settings.middlewares],
            self.runtime.secret,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "lifespan" and self._app is not None:
            await self._host_lifespan(scope, receive, send)
        elif scope["type"] == "lifespan":
            await self._http_router(scope, receive, send)
        else:  # websockets and the rest are never the gateway's
            await self._fallback(scope, receive, send)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Every HTTP request gets an id (the client's, if valid), echoed on its answer
        (by the drain's send, the one wrapper every answer goes through)."""
        given = None
        for name, value in scope["headers"]:  # a loop, not next() over a generator: cheaper
            if name == _REQUEST_ID_NAME:
                given = value
                break
        context = RequestContext(request_id_from(given))
        token = enter(context)
        try:
            await self.drain(
                self._route,
                scope,
                receive,
                send,
                ((_REQUEST_ID_NAME, context.request_id.encode()),),
            )
        finally:
            leave(token)

    async def _route(self, scope: Scope, receive: Receive, send: Send) -> None:
        """What the Router does, for a path one of the exact routes has (under no
        root_path: the Router would match the path less it)."""
        route = None if scope.get("root_path") else self._exact.get(scope["path"])
        if route is None:
            await self._http_router(scope, receive, send)
            return
        if "router" not in scope:
            scope["router"] = self._http_router
        scope["route"] = route
        scope["endpoint"] = route.endpoint
        scope["path_params"] = dict(scope.get("path_params", {}))
        await route.handle(scope, receive, send)

    # --- routes -----------------------------------------------------------------

    async def _generations(self, request: Request) -> Response | None:
        client = self._authenticate(request.headers)
        # One key's share of a lane is bounded only when there are others to share with.
        sharing = client if len(self._client_keys) > 1 else None
        payload = await self._json_body(request)
        image_request = _validate(payload)
        model_name = image_request.model or self.router.default_model()
        if model_name is None:
            raise InvalidRequest("'model' is required: name one of GET /v1/models.", param="model")
        context = current()
        if context is not None:  # counted under a configured name, never the client's text
            context.model = UNKNOWN_MODEL
        model = self.router.resolve(model_name)
        if context is not None:
            context.model = model.name
        public_url = self._public_url(request)
        sent = list(payload)
        demand = self._generator.demand(image_request, model)
        wanted = image_request.response_format or self.settings.defaults.response_format
        if image_request.stream:
            self._generator.check(image_request, model, public_url)

            async def stream_work(progress: ProgressSink) -> ImageResult:
                result = await self._generator.generate(image_request, model, public_url, progress)
                self._image_counts.count(model.name, wanted, result)
                return result

            ticket = self._admission.admit(demand, sharing)  # last: nothing after it may refuse
            return render_stream(stream_work, sent, on_close=ticket.release)

        async def work() -> Response:
            result = await self._generator.generate(image_request, model, public_url)
            response = render_json(image_request, result, sent, self.settings)
            self._image_counts.count(model.name, wanted, result)
            return response

        with self._admission.admit(demand, sharing):
            return await unless_disconnected(request.receive, work)

    async def _openapi(self, request: Request) -> Response:
        """The OpenAPI document of the gateway's own routes (no client key needed)."""
        return Response(self._openapi_body, media_type="application/json")

    async def _models(self, request: Request) -> Response:
        self._authenticate(request.headers)
        return JSONResponse(
            {
                "object": "list",
                "data": [self._model_entry(name) for name, _ in self.router.public_names()],
            }
        )

    async def _model(self, request: Request) -> Response:
        self._authenticate(request.headers)
        name: str = request.path_params["name"]
        self.router.resolve(name)
        return JSONResponse(self._model_entry(name))

    async def _file(self, request: Request) -> Response:
        name: str = request.path_params["name"]
        if not is_valid_name(name):
            raise NotFound("No such image.", param=None)
        query = request.query_params
        valid_for = self.runtime.signer.verify(name, query.get("expires"), query.get("signature"))
        stored = await self.runtime.store.get(name)
        if stored is None:
            raise NotFound("This image has expired or never existed.")
        # No cache keeps the image past its link (store.ttl_seconds after it was made).
        return Response(
            stored.data,
            media_type=stored.media_type,
            headers={
                "Cache-Control": f"private, max-age={valid_for}",
                "X-Content-Type-Options": "nosniff",
            },
        )

    # --- helpers ------------------------------------------------------------------

    def _model_entry(self, name: str) -> dict[str, Any]:
        route = self.router.resolve(name)
        return {
            "id": name,
            "object": "model",
            "created": self._started,
            "owned_by": route.owned_by,
            "description": route.description,
        }

    def _authenticate(self, headers: Headers) -> int | None:
        """Check the client key; which of them it is (its index), None when none is asked."""
        if not self._client_keys:
            return None
        scheme, _, key = headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not key:
            raise AuthenticationFailed(
                "Missing API key: send 'Authorization: Bearer <key>'.", code="missing_api_key"
            )
        # Every key compared, so the time taken does not say which one nearly matched.
        given = key.encode()
        matches = [hmac.compare_digest(given, k) for k in self._client_key_bytes]
        if not any(matches):
            raise AuthenticationFailed("Incorrect API key provided.")
        return matches.index(True)

    async def _json_body(self, request: Request) -> dict[str, Any]:
        limit = self.settings.limits.max_body_bytes
        declared = request.headers.get("content-length", "")
        if declared.isascii() and declared.isdigit() and int(declared[:20]) > limit:
            raise PayloadTooLarge(f"The request body is larger than {limit} bytes.")
        # The whole body, however it trickles in: a client sending a byte a minute
        # would otherwise hold the request (and its connection) for ever. Most bodies
        # have arrived with their head: the deadline is armed only when reading waits.
        read = eagerly(_read_body(request.receive, limit))
        if isinstance(read, Pending):
            deadline = self.settings.limits.client_body_timeout
            try:
                with Deadline(deadline, self.runtime.deadlines):
                    body = await read
            except TimeoutError:
                raise RequestTimeout(
                    f"The request body did not arrive within {deadline:g} seconds "
                    "(limits.client_body_timeout)."
                ) from None
        else:
            body = read
        try:
            payload = _parse_json(body)
        except (ValueError, RecursionError):  # ValueError covers JSON, UTF-8 and huge ints
            raise InvalidRequest(
                "The request body is not valid JSON. Send a JSON object with at least 'prompt'."
            ) from None
        if not isinstance(payload, dict):
            raise InvalidRequest("The request body must be a JSON object.")
        limits = self.settings.limits
        if len(payload) > limits.max_fields:
            raise InvalidRequest(
                f"The request has {len(payload)} parameters; this gateway accepts at most "
                f"{limits.max_fields}."
            )
        if not _flat(payload) and _depth(payload) > limits.max_json_depth:
            raise InvalidRequest(
                f"The request body nests deeper than {limits.max_json_depth} levels."
            )
        return payload

    def _public_url(self, request: Request) -> str | None:
        """The base of hosted-image links: ``server.public_url``, else the request's
        own scheme and Host when ``server.allowed_hosts`` lists the Host, else None
        (no link is built from a Host the operator did not list)."""
        configured = self.settings.server.public_url
        if configured:
            return configured.rstrip("/") + self._prefix
        # What the answer depends on, so it is worked out once per Host, not per request
        # (Starlette's request.url parses the whole URL).
        scope = request.scope
        server = scope.get("server")
        key = (
            scope.get("scheme", "http"),
            request.headers.get("host"),
            tuple(server) if server is not None else None,  # a list, from some servers
            scope.get("root_path", ""),
        )
        try:
            return self._public_urls[key]
        except KeyError:
            pass
        return self._public_urls.keep(key, self._public_url_of(request))

    def _public_url_of(self, request: Request) -> str | None:
        if not self._allowed_host(request.url.netloc):
            return None
        # root_path, not Starlette's app-level base_url: under a Mount it carries the prefix.
        root = request.scope.get("root_path", "")
        return f"{request.url.scheme}://{request.url.netloc}{root}{self._prefix}"

    def _allowed_host(self, netloc: str) -> bool:
        if "*" in self._allowed_hosts:
            return True
        try:
            host = (urlsplit(f"//{netloc}").hostname or "").rstrip(".")
        except ValueError:  # not a host at all ("[::1", say)
            return False
        return any(host_matches(host, pattern) for pattern in self._allowed_hosts)

    # --- what is not the gateway's, and the lifespan ---------------------------------

    async def _to_host(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert self._app is not None
        # The Router marked the scope as its own; the host's url_for must find the host's.
        if scope.get("router") is self._http_router:
            del scope["router"]
        await self._app(scope, receive, send)

    async def _forward(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert self._forwarder is not None
        if scope["type"] != "http":
            return
        context = current()
        if context is not None:
            context.provider = "forward"
        # Client keys guard the forward too, or any client could spend the
        # operator's upstream key without one.
        try:
            self._authenticate(Headers(scope=scope))
        except GatewayError as refused:
            await _error_response(refused)(scope, receive, send)
            return
        await self._forwarder(scope, receive, send)

    @asynccontextmanager
    async def _lifespan(self, app: object) -> AsyncIterator[None]:
        """Standalone: the Router runs this around the server's lifespan."""
        self._started_serving()
        try:
            yield
        finally:
            self.health.stopping()
            await self.runtime.aclose()

    def _started_serving(self) -> None:
        # A host app whose lifespan runs again (a test client per test) serves again.
        self.health.started()
        self.drain.reset()

    async def _host_lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Mounted: the host's lifespan runs as it is (its startup, shutdown and state)."""

        async def receive_from_server() -> Message:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self._started_serving()
            elif message["type"] == "lifespan.shutdown":
                self.health.stopping()
            return message

        async def send_to_server(message: Message) -> None:
            # Closed before the server hears of it: it may stop the event loop right after.
            if message["type"] in ("lifespan.shutdown.complete", "lifespan.shutdown.failed"):
                await self.runtime.aclose()
            await send(message)

        assert self._app is not None
        await self._app(scope, receive_from_server, send_to_server)


class FluxProxyMiddleware:
    """Mount flux-proxy in an existing ASGI app.

    ``app.add_middleware(FluxProxyMiddleware, config=...)``: image requests under
    the API prefix are answered here; everything else reaches ``app``.

    Starlette builds its middlewares on the first ASGI call, the server's lifespan
    startup. A config error raised there would read to the server as "no lifespan
    support": it would start and answer every request, the host's too, with a 500.
    So the error is held and fails that startup with its message instead.
    """

    # The options are spelled out, not ``**options: Any``: with a catch-all, mypy cannot
    # match the class to Starlette's ``Middleware(cls, ...)`` / ``add_middleware`` types.
    def __init__(
        self,
        app: ASGIApp,
        config: ConfigInput = None,
        *,
        environ: Mapping[str, str] | None = None,
        plugins: Iterable[object] = (),
        transport: httpx.AsyncBaseTransport | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        self.gateway: FluxProxy | None = None
        self._failure: Exception | None = None
        try:
            self.gateway = FluxProxy(
                config, app=app, environ=environ, plugins=plugins, transport=transport, clock=clock
            )
        except (ConfigError, OSError) as error:  # OSError: e.g. store.directory cannot be made
            self._failure = error

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.gateway is not None:
            await self.gateway(scope, receive, send)
            return
        assert self._failure is not None
        if scope["type"] == "lifespan":
            await receive()
            await send({"type": "lifespan.startup.failed", "message": _why(self._failure)})
        # Raised too: lifespan managers that ignore startup.failed still see it, and a
        # server that runs no lifespan logs it with every request.
        raise self._failure


def _why(failure: Exception) -> str:
    """The start-up failure as ``flux-proxy serve`` words it."""
    if isinstance(failure, ConfigError):
        return f"flux-proxy: {failure}"
    return f"flux-proxy: cannot start: {failure}"


def _as_settings(config: ConfigInput, environ: Mapping[str, str] | None) -> Settings:
    if isinstance(config, Settings):
        return config
    if isinstance(config, Mapping):
        try:
            return Settings.model_validate(dict(config))
        except ValidationError as exc:
            raise ConfigError(describe_validation_error(exc, None)) from None
    return load_settings(config, environ)


async def _read_body(receive: Receive, limit: int) -> bytes:
    """The request's body, read straight from ``receive`` (Starlette's ``stream()`` is an
    async generator: dearer per request, for a body that mostly comes in one message)."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        if message["type"] != "http.request":
            continue
        chunk: bytes = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"The request body is larger than {limit} bytes.")
        if not message.get("more_body", False):
            if not chunks:
                return chunk
            chunks.append(chunk)
            return b"".join(chunks)
        chunks.append(chunk)


# 19 digits in a row: maybe an integer past 64 bits, which orjson reads as a float.
_LONG_NUMBER = re.compile(rb"\d{19}")


def _parse_json(body: bytes) -> Any:
    """The body's JSON: orjson's (several times faster) where it reads it as the
    standard library does; else the standard library's, which reads what the gateway
    has always taken (NaN, integers past 64 bits, UTF-16 and UTF-32 bodies) or refuses it."""
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        return json.loads(body)
    # An integer orjson misread is a float now: only then is the body searched for one.
    if not _flat(payload) and _LONG_NUMBER.search(body) is not None:
        return json.loads(body)
    return payload


def _flat(payload: Any) -> bool:
    """Whether ``payload`` is an object of texts, integers, booleans and nulls (most
    requests' bodies): no float in it, nothing nested. One look at its values."""
    # issuperset over map(type, ...): the whole look in C, no generator frames
    return type(payload) is dict and _FLAT_TYPES.issuperset(map(type, payload.values()))


_FLAT_TYPES = frozenset({str, int, bool, type(None)})


def _exact_routes(routes: list[_GatewayRoute]) -> dict[str, _GatewayRoute]:
    """The routes a path names exactly (no parameters), that no route before them matches:
    the Router, trying them in order, would choose the same."""
    exact: dict[str, _GatewayRoute] = {}
    for index, route in enumerate(routes):
        earlier = routes[:index]
        if not route.param_convertors and not any(r.path_regex.match(route.path) for r in earlier):
            exact[route.path] = route
    return exact


def _depth(value: Any) -> int:
    """How deeply JSON containers nest in ``value`` (iterative: no recursion to exhaust)."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict | list):
            deepest = max(deepest, depth + 1)
            children = node.values() if isinstance(node, dict) else node
            stack.extend((child, depth + 1) for child in children)
    return deepest


def _validate(payload: dict[str, Any]) -> ImageRequest:
    try:
        return ImageRequest.model_validate(payload)
    except ValidationError as exc:
        error = exc.errors()[0]
        param = ".".join(str(part) for part in error["loc"]) or None
        if error["type"] == "missing":
            message = f"Missing required parameter: '{param}'."
        else:
            given = json.dumps(error.get("input"))[:100]
            message = f"Invalid value for '{param}': {error['msg']} (got {given})."
        raise InvalidRequest(message, param=param) from None


class _ImageCounts:
    """The images of successful answers, and the bytes of those the gateway held."""

    def __init__(self, metrics: Metrics) -> None:
        self._images = Children(metrics.images)
        self._bytes = Children(metrics.image_bytes)

    def count(self, model: str, wanted: str, result: ImageResult) -> None:
        size = 0
        for image in result.images:
            if image.data is not None:
                size += len(image.data)
            elif image.b64 is not None:
                size += b64.decoded_length(image.b64)
        self._images(model, wanted).inc(len(result.images))
        if size:
            self._bytes(model, wanted).inc(size)


def _error_response(error: GatewayError) -> Response:
    return Response(
        error.body_bytes(),
        status_code=error.status_code,
        media_type="application/json",
        headers=error.headers,
    )


async def _not_found(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "http":
        error = NotFound(f"No route for {scope.get('path', '')}.", code="unknown_url")
        await _error_response(error)(scope, receive, send)


class _GatewayRoute(Route):
    """A Starlette ``Route`` to one handler, answering a wrong method in OpenAI's error shape.

    Starlette's own 405 is plain text, or, inside a Starlette app, an HTTPException
    that only the host's exception layer (inside this middleware) could render.
    ``GET`` routes answer ``HEAD`` too (Starlette adds it).
    """

    def __init__(
        self,
        path: str,
        handler: Handler,
        methods: list[str],
        metrics: Metrics,
        *,
        operation: str = "",
        log_level: int = logging.INFO,
    ) -> None:
        super().__init__(
            path, _Endpoint(handler, path, metrics, operation, log_level), methods=methods
        )

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        allowed = self.methods or set()
        if scope["method"] in allowed:
            await self.app(scope, receive, send)
            return
        error = MethodNotAllowed(
            f"{scope['method']} is not allowed on {scope['path']}.",
            headers={"Allow": ", ".join(sorted(allowed))},
        )
        await _error_response(error)(scope, receive, send)


# The status counted and logged for a request whose client left before its answer
# (nginx's convention; no HTTP answer was sent).
CLIENT_GONE = 499


class _Endpoint:
    """A handler as an ASGI app: its errors become OpenAI error bodies, its outcome is
    counted and logged once its answer is sent (a stream's last event included), and
    ``HEAD`` gets the headers ``GET`` would, without the body."""

    def __init__(
        self, handler: Handler, route: str, metrics: Metrics, operation: str, log_level: int
    ) -> None:
        self._handler = handler
        self._route = route
        self._operation = operation
        self._log_level = log_level
        # The route's own series, looked up once rather than per request.
        self._requests = Children(metrics.requests, route)
        self._in_flight = metrics.in_flight.labels(route)
        self._seconds = metrics.request_seconds.labels(route)
        self._overhead = metrics.overhead_seconds.labels(route)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        request = Request(scope, receive)
        self._in_flight.inc()
        status = CLIENT_GONE
        try:
            response = await self._respond(request)
            if response is not None:  # None: the client went away, its work was cancelled
                status = response.status_code
                await response(
                    scope, receive, _headers_only(send) if request.method == "HEAD" else send
                )
        finally:
            self._in_flight.dec()
            self._done(request, status, time.perf_counter() - started)

    def _done(self, request: Request, status: int, seconds: float) -> None:
        context = current()
        model = context.model if context is not None else ""
        provider = context.provider if context is not None else ""
        upstream = context.upstream_seconds if context is not None else 0.0
        overhead = max(seconds - upstream, 0.0)
        self._requests(str(status), self._operation, model, provider).inc()
        self._seconds.observe(seconds)
        self._overhead.observe(overhead)
        if not logger.isEnabledFor(self._log_level):
            return
        request_id = context.request_id if context is not None else "-"
        logger.log(
            self._log_level,
            "%s %s -> %s in %.0f ms (request %s)",
            request.method,
            request.url.path,
            status,
            seconds * 1000,
            request_id,
            extra={
                EVENT: {
                    "event": "request",
                    "method": request.method,
                    "route": self._route,
                    "path": request.url.path,
                    "status": status,
                    "model": model or None,
                    "provider": provider or None,
                    "duration_ms": round(seconds * 1000, 3),
                    "upstream_ms": round(upstream * 1000, 3),
                    "overhead_ms": round(overhead * 1000, 3),
                }
            },
        )

    async def _respond(self, request: Request) -> Response | None:
        try:
            response: Response | None = await self._handler(request)
        except GatewayError as error:
            response = _error_response(error)
        except ClientDisconnect:
            # No failure of the gateway's, and nobody left to answer.
            logger.info(
                "%s %s: client disconnected while sending its body",
                request.method,
                request.url.path,
            )
            return None
        except Exception:
            logger.exception("unexpected failure on %s %s", request.method, request.url.path)
            response = _error_response(InternalError("The gateway failed unexpectedly."))
        return response


def _headers_only(send: Send) -> Send:
    async def send_without_body(message: Message) -> None:
        if message["type"] == "http.response.body":
            message = {**message, "body": b""}
        await send(message)

    return send_without_body
