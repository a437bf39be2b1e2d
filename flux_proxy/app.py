"""The outer layer: plain ASGI, mountable anywhere.

``FluxProxy`` answers the OpenAI image routes under the API prefix and hands
every other request to the host app it wraps (mounted mode) or answers 404.
JSON is parsed once here, on the way in, and rendered once, on the way out.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import httpx
from pydantic import ValidationError
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from flux_proxy.config import ConfigError, Settings, describe_validation_error, load_settings
from flux_proxy.disconnect import unless_disconnected
from flux_proxy.errors import (
    AuthenticationFailed,
    GatewayError,
    InternalError,
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
)
from flux_proxy.forward import Forwarder
from flux_proxy.generation import Generator, render_json, render_stream
from flux_proxy.pipeline import build_stack, call_provider
from flux_proxy.plugins import load_registry
from flux_proxy.routing import Router
from flux_proxy.runtime import Runtime
from flux_proxy.schema import ImageRequest
from flux_proxy.store import is_valid_name

logger = logging.getLogger("flux_proxy")

_GENERATIONS_ROUTE = re.compile(r"^/images/generations$")
_MODELS_ROUTE = re.compile(r"^/models$")
_FILE_ROUTE = re.compile(r"^/images/files/([^/]+)$")
_MODEL_ROUTE = re.compile(r"^/models/([^/]+)$")

ConfigInput = Settings | str | Path | Mapping[str, Any] | None
# A route handler; None means the client went away and nothing is to be sent.
Handler = Callable[[Request, str], Awaitable[Response | None]]


class FluxProxy:
    def __init__(
        self,
        config: ConfigInput = None,
        *,
        app: ASGIApp | None = None,
        environ: Mapping[str, str] | None = None,
        plugins: Iterable[object] = (),
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        settings = _as_settings(config, environ)
        registry = load_registry(plugins)
        self.settings = settings
        self.runtime = Runtime(settings, environ, transport)
        providers = {name: factory(self.runtime) for name, factory in registry.providers.items()}
        self.router = Router(settings, providers)
        unknown = [name for name in settings.middlewares if name not in registry.middlewares]
        if unknown:
            raise ConfigError(
                f"middlewares: unknown middleware {unknown[0]!r} "
                f"(installed: {', '.join(sorted(registry.middlewares))})"
            )
        stack = [registry.middlewares[name](self.runtime) for name in settings.middlewares]
        self._generator = Generator(settings, stack, build_stack(stack, call_provider))
        self._app = app
        self._prefix = settings.server.api_prefix
        self._client_keys = [
            key.strip()
            for key in (self.runtime.secret(settings.auth.api_keys_env) or "").split(",")
            if key.strip()
        ]
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
        # The gateway's own routes under the API prefix: pattern, methods, handler.
        self._routes: list[tuple[re.Pattern[str], frozenset[str], Handler]] = [
            (_GENERATIONS_ROUTE, frozenset({"POST"}), self._generations),
            (_MODELS_ROUTE, frozenset({"GET"}), self._models),
            (_MODEL_ROUTE, frozenset({"GET"}), self._model),
            (_FILE_ROUTE, frozenset({"GET", "HEAD"}), self._file),
        ]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(scope, receive, send)
            return
        if scope["type"] != "http":
            await self._fall_through(scope, receive, send)
            return
        path = _path_in_app(scope)
        if not path.startswith(self._prefix + "/"):
            await self._fall_through(scope, receive, send)
            return
        route = path[len(self._prefix) :]
        found = next((r for r in self._routes if r[0].match(route)), None)
        if found is None:
            await self._fall_through(scope, receive, send)
            return
        _, methods, handler = found
        request = Request(scope, receive)
        method = request.method
        response: Response | None
        if method not in methods:
            response = _error_response(MethodNotAllowed(f"{method} is not allowed on {path}."))
        else:
            response = await self._respond(handler, request, route)
        if response is not None:  # None: the client went away and its work was cancelled
            await response(scope, receive, send)

    async def _respond(self, handler: Handler, request: Request, route: str) -> Response | None:
        started = time.perf_counter()
        try:
            response: Response | None = await handler(request, route)
        except GatewayError as error:
            response = _error_response(error)
        except Exception:
            logger.exception("unexpected failure on %s %s", request.method, request.url.path)
            response = _error_response(InternalError("The gateway failed unexpectedly."))
        logger.info(
            "%s %s -> %s in %.0f ms",
            request.method,
            request.url.path,
            response.status_code if response is not None else "client gone",
            (time.perf_counter() - started) * 1000,
        )
        return response

    # --- routes -----------------------------------------------------------------

    async def _generations(self, request: Request, route: str) -> Response | None:
        self._authenticate(request.headers)
        payload = await self._json_body(request)
        image_request = _validate(payload)
        model_name = image_request.model or self.router.default_model()
        if model_name is None:
            raise InvalidRequest("'model' is required: name one of GET /v1/models.", param="model")
        model = self.router.resolve(model_name)
        public_url = self._public_url(request)
        sent = list(payload)
        if image_request.stream:
            self._generator.check(image_request, model, public_url)
            return render_stream(
                lambda progress: self._generator.generate(
                    image_request, model, public_url, progress
                ),
                sent,
            )

        async def work() -> Response:
            result = await self._generator.generate(image_request, model, public_url)
            return render_json(image_request, result, sent, self.settings)

        return await unless_disconnected(request.receive, work)

    async def _models(self, request: Request, route: str) -> Response:
        self._authenticate(request.headers)
        return JSONResponse(
            {
                "object": "list",
                "data": [self._model_entry(name) for name, _ in self.router.public_names()],
            }
        )

    async def _model(self, request: Request, route: str) -> Response:
        self._authenticate(request.headers)
        match = _MODEL_ROUTE.match(route)
        assert match is not None
        self.router.resolve(match[1])
        return JSONResponse(self._model_entry(match[1]))

    async def _file(self, request: Request, route: str) -> Response:
        match = _FILE_ROUTE.match(route)
        assert match is not None
        name = match[1]
        if not is_valid_name(name):
            raise NotFound("No such image.", param=None)
        query = request.query_params
        self.runtime.signer.verify(name, query.get("expires"), query.get("signature"))
        stored = await self.runtime.store.get(name)
        if stored is None:
            raise NotFound("This image has expired or never existed.")
        return Response(
            stored.data,
            media_type=stored.media_type,
            headers={"Cache-Control": "private, max-age=3600", "X-Content-Type-Options": "nosniff"},
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

    def _authenticate(self, headers: Headers) -> None:
        if not self._client_keys:
            return
        scheme, _, key = headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not key:
            raise AuthenticationFailed(
                "Missing API key: send 'Authorization: Bearer <key>'.", code="missing_api_key"
            )
        if not any(hmac.compare_digest(key.encode(), k.encode()) for k in self._client_keys):
            raise AuthenticationFailed("Incorrect API key provided.")

    async def _json_body(self, request: Request) -> dict[str, Any]:
        limit = self.settings.limits.max_body_bytes
        declared = request.headers.get("content-length", "")
        if declared.isascii() and declared.isdigit() and int(declared[:20]) > limit:
            raise PayloadTooLarge(f"The request body is larger than {limit} bytes.")
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"The request body is larger than {limit} bytes.")
            chunks.append(chunk)
        try:
            payload = json.loads(b"".join(chunks))
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
        if _depth(payload) > limits.max_json_depth:
            raise InvalidRequest(
                f"The request body nests deeper than {limits.max_json_depth} levels."
            )
        return payload

    def _public_url(self, request: Request) -> str:
        configured = self.settings.server.public_url
        if configured:
            return configured.rstrip("/") + self._prefix
        # root_path, not Starlette's app-level base_url: under a Mount it carries the prefix.
        root = request.scope.get("root_path", "")
        return f"{request.url.scheme}://{request.url.netloc}{root}{self._prefix}"

    async def _fall_through(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self._app is not None:
            await self._app(scope, receive, send)
            return
        if self._forwarder is not None and scope["type"] == "http":
            # Client keys guard the forward too, or any client could spend the
            # operator's upstream key without one.
            try:
                self._authenticate(Headers(scope=scope))
            except GatewayError as refused:
                await _error_response(refused)(scope, receive, send)
                return
            await self._forwarder(scope, receive, send)
            return
        if scope["type"] == "http":
            error = NotFound(f"No route for {scope.get('path', '')}.", code="unknown_url")
            await _error_response(error)(scope, receive, send)

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self._app is not None:
            try:
                await self._app(scope, receive, send)
            finally:
                await self.runtime.aclose()
            return
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.runtime.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return


class FluxProxyMiddleware(FluxProxy):
    """Mount flux-proxy in an existing ASGI app.

    ``app.add_middleware(FluxProxyMiddleware, config=...)``: image requests under
    the API prefix are answered here; everything else reaches ``app``.
    """

    def __init__(self, app: ASGIApp, config: ConfigInput = None, **options: Any) -> None:
        super().__init__(config, app=app, **options)


def _as_settings(config: ConfigInput, environ: Mapping[str, str] | None) -> Settings:
    if isinstance(config, Settings):
        return config
    if isinstance(config, Mapping):
        try:
            return Settings.model_validate(dict(config))
        except ValidationError as exc:
            raise ConfigError(describe_validation_error(exc, None)) from None
    return load_settings(config, environ)


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


def _path_in_app(scope: Scope) -> str:
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


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


def _error_response(error: GatewayError) -> Response:
    return Response(
        error.body_bytes(),
        status_code=error.status_code,
        media_type="application/json",
        headers=error.headers,
    )
