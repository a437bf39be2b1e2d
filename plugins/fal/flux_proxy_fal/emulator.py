"""A small fal.ai emulator for FLUX 1.1 [pro], for offline tests and demos.

It speaks fal's protocol as documented (see the project's PROVIDERS.md, section 2):

- Queue API at the root (stands in for ``https://queue.fal.run``):
  ``POST /fal-ai/flux-pro/v1.1`` -> ticket; ``GET /fal-ai/flux-pro/requests/{id}/status``
  (202 while ``IN_QUEUE``/``IN_PROGRESS``, 200 when ``COMPLETED``; ``?logs=1`` adds log
  lines); ``GET /fal-ai/flux-pro/requests/{id}`` -> output; ``PUT .../requests/{id}/cancel``.
  Like fal, status/result/cancel URLs carry only the owner/app, not the ``/v1.1`` sub-path.
- Sync API under ``/sync`` (stands in for ``https://fal.run``): ``POST /sync/fal-ai/flux-pro/v1.1``.
- Generated files under ``/files/...`` (stands in for ``fal.media``), with an HMAC signature
  and an expiry in the query: a bad signature is 403, an expired link 404.

Auth is ``Authorization: Key <key>`` (default key ``emulator-key``). A prompt containing
"moderate" is refused with fal's 422 ``content_policy_violation``; one containing "nsfw"
comes back as black images flagged in ``has_nsfw_concepts`` (unless the request turned
``enable_safety_checker`` off). Out-of-range input gets fal's 422 ``detail`` list.

Where fal's behaviour is not documented the emulator picks something plausible and says
so: 401 bodies, the body of a result fetched too early, and the enforcement of FLUX's
256-1440 / multiple-of-32 size rule for custom sizes (on by default, knob ``strict_sizes``).

Every request is recorded in ``FalEmulator.requests``. Knobs are attributes and may be
changed while the app runs (tests do).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import io
import json
import secrets
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from PIL import Image
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from flux_proxy import sdk

APP_ID = "fal-ai/flux-pro"
DOCS = "https://docs.fal.ai/errors/#"

# fal's named sizes (fal toolkit).
IMAGE_SIZES: dict[str, tuple[int, int]] = {
    "square_hd": (1024, 1024),
    "square": (512, 512),
    "portrait_4_3": (768, 1024),
    "portrait_16_9": (576, 1024),
    "landscape_4_3": (1024, 768),
    "landscape_16_9": (1024, 576),
}
# Ultra's aspect ratios and the ~4 MP size the emulator makes for each (BFL's, UNCERTAIN).
ULTRA_SIZES: dict[str, tuple[int, int]] = {
    ratio: sdk.FLUX_ULTRA_SIZES[ratio] for ratio in sdk.FLUX_ULTRA_RATIOS
}


@dataclass(frozen=True)
class ModelSpec:
    size_field: str
    default_size: str
    booleans: tuple[str, ...]


MODELS: dict[str, ModelSpec] = {
    "fal-ai/flux-pro/v1.1": ModelSpec(
        "image_size", "landscape_4_3", ("sync_mode", "enable_safety_checker", "enhance_prompt")
    ),
    "fal-ai/flux-pro/v1.1-ultra": ModelSpec(
        "aspect_ratio", "16:9", ("sync_mode", "enable_safety_checker", "enhance_prompt", "raw")
    ),
}
OUTPUT_FORMATS = ("jpeg", "png")
SAFETY_TOLERANCES = ("1", "2", "3", "4", "5", "6")
PIL_FORMATS = {"jpeg": "JPEG", "png": "PNG"}

# Infrastructure error types and the HTTP status fal answers them with.
INFRA_ERRORS: dict[str, int] = {
    "request_timeout": 504,
    "startup_timeout": 504,
    "runner_scheduling_failure": 503,
    "runner_connection_timeout": 503,
    "internal_error": 500,
}


@dataclass
class Recorded:
    method: str
    path: str
    url: str
    query: dict[str, str]
    headers: dict[str, str]
    body: Any


@dataclass
class Outcome:
    """What a run ends with: the result endpoint's answer, and the status's error fields."""

    status_code: int
    body: Any
    headers: dict[str, str] = field(default_factory=dict)
    error: str | None = None
    error_type: str | None = None


@dataclass
class QueuedRequest:
    request_id: str
    app_id: str
    model: str
    outcome: Outcome
    polls: int = 0
    cancelled: bool = False


class ValidationFailure(Exception):
    def __init__(self, errors: list[dict[str, Any]]) -> None:
        super().__init__("invalid input")
        self.errors = errors


def _standard_base64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


class FalEmulator:
    def __init__(
        self,
        *,
        key: str = "emulator-key",
        polls_before_ready: int = 2,
        retry_after: str | None = None,
        poll_rate_limits: int = 0,
        rate_limited: bool = False,
        rate_limit_retry_after: str = "5",
        infra_error: str | None = None,
        strict_sizes: bool = True,
        url_ttl: float = 3600.0,
        signing_key: bytes | None = None,
        urls_base: str | None = None,
        inline_base64: Callable[[bytes], str] = _standard_base64,
    ) -> None:
        self.key = key
        # Status polls answered IN_QUEUE/IN_PROGRESS before one says COMPLETED.
        self.polls_before_ready = polls_before_ready
        # Retry-After sent with the ticket and 202 status answers (None: none).
        self.retry_after = retry_after
        # The next this-many status polls are answered 429 with Retry-After.
        self.poll_rate_limits = poll_rate_limits
        # Submissions (queue and sync) are answered 429.
        self.rate_limited = rate_limited
        self.rate_limit_retry_after = rate_limit_retry_after
        # Runs fail with this infrastructure error type (see INFRA_ERRORS).
        self.infra_error = infra_error
        self.strict_sizes = strict_sizes
        self.url_ttl = url_ttl
        self._signing_key = signing_key or secrets.token_bytes(32)
        # Base URL of the status/response/cancel URLs handed out (default: the one the
        # emulator was reached at); another host shows who follows them with the key.
        self.urls_base = urls_base
        # How sync_mode's data: URIs write an image's bytes: a test may give valid base64
        # no encoder writes, to see it passed on as it is, or cut the image short.
        self.inline_base64 = inline_base64
        self.requests: list[Recorded] = []
        self.queue: dict[str, QueuedRequest] = {}
        self._files: dict[str, tuple[bytes, str]] = {}

    # --- what tests read ------------------------------------------------------------

    def calls(self, method: str, path_contains: str = "") -> list[Recorded]:
        return [r for r in self.requests if r.method == method and path_contains in r.path]

    # --- app ----------------------------------------------------------------------

    def app(self) -> Starlette:
        routes = [
            Route("/files/{token}/{name}", self._file, methods=["GET"]),
            Route("/sync/{owner}/{app}/{sub:path}", self._sync, methods=["POST"]),
            Route("/sync/{owner}/{app}", self._sync, methods=["POST"]),
            Route("/{owner}/{app}/requests/{rid}/status", self._status, methods=["GET"]),
            Route("/{owner}/{app}/requests/{rid}/cancel", self._cancel, methods=["PUT"]),
            Route("/{owner}/{app}/requests/{rid}", self._result, methods=["GET"]),
            Route("/{owner}/{app}/{sub:path}", self._submit, methods=["POST"]),
            Route("/{owner}/{app}", self._submit, methods=["POST"]),
            # Anything else (e.g. a status URL built with the /v1.1 sub-path) is not found.
            Route("/{rest:path}", self._not_found, methods=["GET", "PUT", "POST", "DELETE"]),
        ]
        app = Starlette(routes=routes)
        app.state.emulator = self
        return app

    async def _record(self, request: Request) -> Recorded:
        raw = await request.body()
        try:
            body: Any = json.loads(raw) if raw else None
        except ValueError:
            body = raw.decode("utf-8", "replace")
        entry = Recorded(
            method=request.method,
            path=request.url.path,
            url=str(request.url),
            query=dict(request.query_params),
            headers={k.lower(): v for k, v in request.headers.items()},
            body=body,
        )
        self.requests.append(entry)
        return entry

    def _unauthorized(self, request: Request) -> Response | None:
        header = request.headers.get("authorization")
        if header is None:
            return JSONResponse({"detail": "Missing authorization header"}, status_code=401)
        scheme, _, key = header.partition(" ")
        if scheme != "Key" or not hmac.compare_digest(key.encode(), self.key.encode()):
            return JSONResponse({"detail": "Invalid API key"}, status_code=401)
        return None

    # --- queue --------------------------------------------------------------------

    async def _submit(self, request: Request) -> Response:
        accepted = await self._accept(request)
        if isinstance(accepted, Response):
            return accepted
        recorded, model = accepted
        request_id = str(uuid.uuid4())
        base = str(request.base_url)
        queued = QueuedRequest(
            request_id, APP_ID, model, self._run(model, recorded.body, base, request_id)
        )
        self.queue[request_id] = queued
        headers = {"Retry-After": self.retry_after} if self.retry_after is not None else {}
        return JSONResponse(
            {
                **self._urls(self.urls_base or base, queued),
                "status": "IN_QUEUE",
                "queue_position": self._queued_polls,
                "logs": None,
                "metrics": {},
            },
            headers=headers,
        )

    async def _status(self, request: Request) -> Response:
        queued = await self._find(request)
        if isinstance(queued, Response):
            return queued
        if self.poll_rate_limits > 0:
            self.poll_rate_limits -= 1
            return self._rate_limit_response()
        queued.polls += 1
        state = self._state(queued)
        with_logs = request.query_params.get("logs") == "1"
        body: dict[str, Any] = {
            **self._urls(self.urls_base or str(request.base_url), queued),
            "status": state,
            "logs": _logs(queued, state) if with_logs else None,
            "metrics": {},
        }
        headers: dict[str, str] = {}
        if state == "IN_QUEUE":
            body["queue_position"] = max(0, self._queued_polls - queued.polls)
        if state == "COMPLETED":
            body["metrics"] = {"inference_time": 0.05}
            if queued.outcome.error is not None:
                body["error"] = queued.outcome.error
                body["error_type"] = queued.outcome.error_type
        elif self.retry_after is not None:
            headers["Retry-After"] = self.retry_after
        return JSONResponse(body, status_code=200 if state == "COMPLETED" else 202, headers=headers)

    async def _result(self, request: Request) -> Response:
        queued = await self._find(request)
        if isinstance(queued, Response):
            return queued
        if self._state(queued) != "COMPLETED":
            # fal's exact answer to an early result fetch is undocumented.
            return JSONResponse({"detail": "Request is still in progress"}, status_code=400)
        outcome = queued.outcome
        return JSONResponse(outcome.body, status_code=outcome.status_code, headers=outcome.headers)

    async def _cancel(self, request: Request) -> Response:
        await self._record(request)
        denied = self._unauthorized(request)
        if denied is not None:
            return denied
        queued = self._lookup(request)
        if queued is None:
            return JSONResponse({"status": "NOT_FOUND"}, status_code=404)
        if self._state(queued) == "COMPLETED":
            return JSONResponse({"status": "ALREADY_COMPLETED"}, status_code=400)
        queued.cancelled = True
        queued.outcome = Outcome(
            400, {"detail": "Request was cancelled"}, error="Request was cancelled"
        )
        return JSONResponse({"status": "CANCELLATION_REQUESTED"}, status_code=202)

    @property
    def _queued_polls(self) -> int:
        return self.polls_before_ready // 2

    def _state(self, queued: QueuedRequest) -> str:
        if queued.cancelled or queued.polls > self.polls_before_ready:
            return "COMPLETED"
        return "IN_QUEUE" if queued.polls <= self._queued_polls else "IN_PROGRESS"

    def _lookup(self, request: Request) -> QueuedRequest | None:
        params = request.path_params
        queued = self.queue.get(params["rid"])
        if queued is None or queued.app_id != f"{params['owner']}/{params['app']}":
            return None
        return queued

    @staticmethod
    def _urls(base: str, queued: QueuedRequest) -> dict[str, str]:
        # Owner/app only: fal drops the model's sub-path from these URLs.
        response_url = f"{base.rstrip('/')}/{queued.app_id}/requests/{queued.request_id}"
        return {
            "request_id": queued.request_id,
            "response_url": response_url,
            "status_url": f"{response_url}/status",
            "cancel_url": f"{response_url}/cancel",
        }

    # --- sync ---------------------------------------------------------------------

    async def _sync(self, request: Request) -> Response:
        accepted = await self._accept(request)
        if isinstance(accepted, Response):
            return accepted
        recorded, model = accepted
        base = str(request.base_url)
        outcome = self._run(model, recorded.body, base, str(uuid.uuid4()))
        return JSONResponse(outcome.body, status_code=outcome.status_code, headers=outcome.headers)

    async def _accept(self, request: Request) -> tuple[Recorded, str] | Response:
        """Record a submission (queue or sync); the refusal, or what to run."""
        recorded = await self._record(request)
        refused = self._refuse_submission(request)
        if refused is not None:
            return refused
        model = _model_id(request)
        if model not in MODELS:
            return JSONResponse({"detail": f"Application {model!r} not found"}, status_code=404)
        return recorded, model

    async def _find(self, request: Request) -> QueuedRequest | Response:
        """Record a status or result call; the refusal, or its queued request."""
        await self._record(request)
        denied = self._unauthorized(request)
        if denied is not None:
            return denied
        queued = self._lookup(request)
        if queued is None:
            return JSONResponse({"detail": "Request not found"}, status_code=404)
        return queued

    def _refuse_submission(self, request: Request) -> Response | None:
        denied = self._unauthorized(request)
        if denied is not None:
            return denied
        return self._rate_limit_response() if self.rate_limited else None

    def _rate_limit_response(self) -> Response:
        # fal's 429 body is undocumented; its SDKs read `detail`.
        return JSONResponse(
            {"detail": "Rate limit exceeded, please retry later"},
            status_code=429,
            headers={"Retry-After": self.rate_limit_retry_after},
        )

    # --- a run ----------------------------------------------------------------------

    def _run(self, model: str, body: Any, base: str, request_id: str) -> Outcome:
        """Everything fal's runner would do with this input, decided up front."""
        if self.infra_error is not None:
            message = f"The request failed: {self.infra_error.replace('_', ' ')}"
            return Outcome(
                INFRA_ERRORS.get(self.infra_error, 500),
                {"detail": message, "error_type": self.infra_error},
                {"X-Fal-Error-Type": self.infra_error},
                error=message,
                error_type=self.infra_error,
            )
        spec = MODELS[model]
        try:
            size = _validate(spec, body, strict_sizes=self.strict_sizes)
        except ValidationFailure as failure:
            return Outcome(
                422,
                {"detail": failure.errors},
                {"X-Fal-Retryable": "false"},
                error="Unprocessable Entity",
            )
        if "moderate" in body["prompt"].lower():
            error = _error_item(
                ["body", "prompt"],
                "The content could not be processed because it contained material "
                "flagged by a content checker.",
                "content_policy_violation",
                body["prompt"],
            )
            return Outcome(
                422,
                {"detail": [error]},
                {"X-Fal-Retryable": "false"},
                error="Unprocessable Entity",
            )
        return Outcome(200, self._output(body, size, base, request_id))

    def _output(
        self, body: dict[str, Any], size: tuple[int, int], base: str, request_id: str
    ) -> dict[str, Any]:
        fmt = body.get("output_format", "jpeg")
        count = body.get("num_images", 1)
        seed = body["seed"] if "seed" in body else secrets.randbelow(2**32)
        flagged = "nsfw" in body["prompt"].lower()
        blank = flagged and body.get("enable_safety_checker", True)
        images = []
        for index in range(count):
            colour = (0, 0, 0) if blank else _colour(seed, index)
            data = _picture(size, colour, fmt)
            media_type = f"image/{fmt}"
            if body.get("sync_mode"):
                url = f"data:{media_type};base64,{self.inline_base64(data)}"
            else:
                url = self._host(base, request_id, f"{index}.{'jpg' if fmt == 'jpeg' else fmt}")
                self._files[_file_key(url)] = (data, media_type)
            images.append(
                {"url": url, "width": size[0], "height": size[1], "content_type": media_type}
            )
        return {
            "images": images,
            "timings": {"inference": 0.05},
            "seed": seed,
            "has_nsfw_concepts": [flagged] * count,
            "prompt": body["prompt"],
        }

    # --- files ----------------------------------------------------------------------

    def _host(self, base: str, token: str, name: str) -> str:
        expires = int(time.time() + self.url_ttl)
        signature = self._sign(f"{token}/{name}", expires)
        return f"{base}files/{token}/{name}?expires={expires}&signature={signature}"

    def _sign(self, path: str, expires: int) -> str:
        message = f"{path}:{expires}".encode()
        return hmac.new(self._signing_key, message, hashlib.sha256).hexdigest()

    async def _file(self, request: Request) -> Response:
        await self._record(request)
        token, name = request.path_params["token"], request.path_params["name"]
        expires = request.query_params.get("expires", "")
        signature = request.query_params.get("signature", "")
        if not expires.isdigit() or not hmac.compare_digest(
            signature, self._sign(f"{token}/{name}", int(expires))
        ):
            return JSONResponse({"detail": "Forbidden"}, status_code=403)
        stored = self._files.get(f"{token}/{name}")
        if int(expires) < time.time() or stored is None:
            return JSONResponse({"detail": "Not Found"}, status_code=404)
        return Response(stored[0], media_type=stored[1])

    async def _not_found(self, request: Request) -> Response:
        await self._record(request)
        return JSONResponse({"detail": "Not Found"}, status_code=404)


def create_app(**knobs: Any) -> Starlette:
    """The emulator as an ASGI app; the ``FalEmulator`` is ``app.state.emulator``."""
    return FalEmulator(**knobs).app()


# --- validation (fal's 422 `detail` list) -----------------------------------------------


def _error_item(
    loc: list[str], msg: str, kind: str, value: Any, ctx: dict[str, Any] | None = None
) -> dict[str, Any]:
    item: dict[str, Any] = {"loc": loc, "msg": msg, "type": kind, "url": DOCS + kind}
    if ctx is not None:
        item["ctx"] = ctx
    item["input"] = value
    return item


def _validate(spec: ModelSpec, body: Any, *, strict_sizes: bool) -> tuple[int, int]:
    """Check ``body`` like fal's input model does; returns the pixel size to make."""
    if not isinstance(body, dict):
        raise ValidationFailure(
            [_error_item(["body"], "Input should be a valid dictionary", "dict_type", body)]
        )
    errors: list[dict[str, Any]] = []
    prompt = body.get("prompt")
    if "prompt" not in body:
        errors.append(_error_item(["body", "prompt"], "Field required", "missing", body))
    elif not isinstance(prompt, str):
        errors.append(
            _error_item(["body", "prompt"], "Input should be a valid string", "string_type", prompt)
        )
    if "num_images" in body:
        errors += _integer_range(["body", "num_images"], body["num_images"], 1, 4)
    if "seed" in body and not _is_int(body["seed"]):
        errors.append(
            _error_item(
                ["body", "seed"], "Input should be a valid integer", "int_type", body["seed"]
            )
        )
    errors += _one_of(body, "output_format", OUTPUT_FORMATS)
    errors += _one_of(body, "safety_tolerance", SAFETY_TOLERANCES)
    for name in spec.booleans:
        if name in body and not isinstance(body[name], bool):
            errors.append(
                _error_item(
                    ["body", name], "Input should be a valid boolean", "bool_type", body[name]
                )
            )
    if "image_prompt_strength" in body:
        errors += _number_range(["body", "image_prompt_strength"], body["image_prompt_strength"])
    size: tuple[int, int] = (0, 0)
    if spec.size_field == "image_size":
        size, size_errors = _image_size(body.get("image_size", spec.default_size), strict_sizes)
        errors += size_errors
    else:
        errors += _one_of(body, "aspect_ratio", tuple(ULTRA_SIZES))
        size = ULTRA_SIZES.get(str(body.get("aspect_ratio", spec.default_size)), (0, 0))
    if errors:
        raise ValidationFailure(errors)
    return size


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _integer_range(loc: list[str], value: Any, low: int, high: int) -> list[dict[str, Any]]:
    if not _is_int(value):
        return [_error_item(loc, "Input should be a valid integer", "int_type", value)]
    if value < low:
        return [
            _error_item(
                loc,
                f"Input should be greater than or equal to {low}",
                "greater_than_equal",
                value,
                {"ge": low},
            )
        ]
    if value > high:
        return [
            _error_item(
                loc,
                f"Input should be less than or equal to {high}",
                "less_than_equal",
                value,
                {"le": high},
            )
        ]
    return []


def _number_range(loc: list[str], value: Any) -> list[dict[str, Any]]:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return [_error_item(loc, "Input should be a valid number", "float_type", value)]
    if not 0 <= value <= 1:
        return [_error_item(loc, "Input should be between 0 and 1", "less_than_equal", value)]
    return []


def _one_of(body: dict[str, Any], name: str, allowed: tuple[str, ...]) -> list[dict[str, Any]]:
    if name not in body or body[name] in allowed:
        return []
    quoted = ", ".join(f"'{value}'" for value in allowed)
    return [
        _error_item(
            ["body", name],
            f"Input should be {quoted}",
            "one_of",
            body[name],
            {"expected": list(allowed)},
        )
    ]


def _image_size(value: Any, strict: bool) -> tuple[tuple[int, int], list[dict[str, Any]]]:
    loc = ["body", "image_size"]
    if isinstance(value, str):
        if value in IMAGE_SIZES:
            return IMAGE_SIZES[value], []
        return (0, 0), _one_of({"image_size": value}, "image_size", tuple(IMAGE_SIZES))
    if not isinstance(value, dict):
        return (0, 0), [_error_item(loc, "Input should be a valid size", "one_of", value, None)]
    errors: list[dict[str, Any]] = []
    low, high = (256, 1440) if strict else (1, 14142)
    for side in ("width", "height"):
        side_errors = _integer_range([*loc, side], value.get(side), low, high)
        if not side_errors and strict and value[side] % 32:
            side_errors = [
                _error_item(
                    [*loc, side],
                    "Input should be a multiple of 32",
                    "multiple_of",
                    value[side],
                    {"multiple_of": 32},
                )
            ]
        errors += side_errors
    if errors:
        return (0, 0), errors
    return (value["width"], value["height"]), []


# --- pictures -----------------------------------------------------------------------------


def _colour(seed: int, index: int) -> tuple[int, int, int]:
    digest = hashlib.sha256(f"{seed}:{index}".encode()).digest()
    return (digest[0], digest[1], digest[2])


def _picture(size: tuple[int, int], colour: tuple[int, int, int], fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, PIL_FORMATS[fmt])
    return buffer.getvalue()


def _file_key(url: str) -> str:
    path = url.split("/files/", 1)[1]
    return path.split("?", 1)[0]


def _logs(queued: QueuedRequest, state: str) -> list[dict[str, str]]:
    lines = [f"Request {queued.request_id} queued"]
    if state != "IN_QUEUE":
        lines.append("Generating image")
    if state == "COMPLETED":
        lines.append("Done")
    return [{"message": line, "level": "INFO", "source": "user"} for line in lines]


def _model_id(request: Request) -> str:
    params = request.path_params
    sub = params.get("sub")
    return f"{params['owner']}/{params['app']}" + (f"/{sub}" if sub else "")


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description="Serve the fal.ai emulator.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8600)
    parser.add_argument("--key", default="emulator-key", help="the accepted FAL_KEY")
    parser.add_argument("--polls", type=int, default=2, help="status polls before COMPLETED")
    args = parser.parse_args(argv)
    uvicorn.run(
        create_app(key=args.key, polls_before_ready=args.polls), host=args.host, port=args.port
    )


if __name__ == "__main__":
    main()
