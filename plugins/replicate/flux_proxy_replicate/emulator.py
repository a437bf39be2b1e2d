"""A small emulator of Replicate's predictions API, for offline tests and keyless demos.

It speaks the protocol the provider uses (PROVIDERS.md, section 3):

- ``POST /v1/models/{owner}/{name}/predictions`` (``Authorization: Bearer <key>``;
  the legacy ``Token <key>`` works too) answers 201 with a prediction object. With
  ``Prefer: wait`` / ``wait=N`` the prediction is finished inside the create call
  (knob ``finish_within_wait``), otherwise it is returned ``starting``.
- ``GET /v1/predictions/{id}`` (the ``urls.get`` it hands out) moves the prediction
  ``starting`` -> ``processing`` -> ``succeeded`` after ``polls_until_ready`` polls.
- ``POST /v1/predictions/{id}/cancel`` (``urls.cancel``) cancels a running one.
- Outputs are real images (Pillow, the asked size and format) at signed, expiring
  URLs under ``/delivery/`` (Replicate serves them from ``replicate.delivery``); an
  expired link is 404, as after Replicate removes a prediction's data, and a bad
  signature 403. After ``url_ttl`` seconds a polled prediction shows
  ``output: null, data_removed: true``, like Replicate's one-hour data retention.
- Input is validated against each model's schema; problems are 422 in Replicate's
  shape (RFC 7807 + ``invalid_fields``). A prompt containing ``moderate`` fails with
  E005 (flagged as sensitive); one containing ``crash`` fails with a model error.
- Knobs for 429 (with ``Retry-After``) on creates or polls, and 402 (no credit).

Every request is recorded (``emulator.records``) so tests can check what was sent.
URLs are built from each request's own base URL, so it works on any port.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import io
import json
import math
import secrets
import time
from base64 import b32encode
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import anyio.to_thread
from PIL import Image, ImageDraw
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from flux_proxy import sdk

DEFAULT_KEY = "emulator-key"
MODERATION_TRIGGER = "moderate"
FAILURE_TRIGGER = "crash"
MODERATION_ERROR = "The input or output was flagged as sensitive (E005)"

FieldKind = Literal["string", "integer", "number", "boolean", "uri"]


@dataclass(frozen=True, slots=True)
class InputField:
    kind: FieldKind
    required: bool = False
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] = ()
    default: Any = None


@dataclass(frozen=True, slots=True)
class ModelSchema:
    fields: dict[str, InputField]
    # Preset aspect ratio -> pixel size; "custom" takes width/height instead.
    ratio_sizes: dict[str, tuple[int, int]]
    # Custom sizes are rounded to this multiple (the model card says "nearest multiple of 32").
    multiple_of: int = 32


def _one_megapixel_sizes(ratios: tuple[str, ...], multiple: int) -> dict[str, tuple[int, int]]:
    # Replicate does not publish the pixels behind each preset; ~1 MP in multiples of 32
    # is what FLUX makes, and all a test needs is a size with the right shape.
    sizes = {}
    for ratio in ratios:
        w, h = (int(part) for part in ratio.split(":"))
        scale = math.sqrt(1024 * 1024 / (w * h))
        sizes[ratio] = (
            round(w * scale / multiple) * multiple,
            round(h * scale / multiple) * multiple,
        )
    return sizes


PRO_RATIOS = ("1:1", "16:9", "3:2", "2:3", "4:5", "5:4", "9:16", "3:4", "4:3")
ULTRA_SIZES: dict[str, tuple[int, int]] = dict(sdk.FLUX_ULTRA_SIZES)

# The input schemas (version 96ccd0e7 of flux-1.1-pro; flux-1.1-pro-ultra as published).
SCHEMAS: dict[str, ModelSchema] = {
    "black-forest-labs/flux-1.1-pro": ModelSchema(
        fields={
            "prompt": InputField("string", required=True),
            "image_prompt": InputField("uri"),
            "aspect_ratio": InputField("string", choices=("custom", *PRO_RATIOS), default="1:1"),
            "width": InputField("integer", minimum=256, maximum=1440),
            "height": InputField("integer", minimum=256, maximum=1440),
            "safety_tolerance": InputField("integer", minimum=1, maximum=6, default=2),
            "seed": InputField("integer"),
            "prompt_upsampling": InputField("boolean", default=False),
            "output_format": InputField("string", choices=("webp", "jpg", "png"), default="webp"),
            "output_quality": InputField("integer", minimum=0, maximum=100, default=80),
        },
        ratio_sizes=_one_megapixel_sizes(PRO_RATIOS, 32),
    ),
    "black-forest-labs/flux-1.1-pro-ultra": ModelSchema(
        fields={
            "prompt": InputField("string", required=True),
            "image_prompt": InputField("uri"),
            "image_prompt_strength": InputField("number", minimum=0, maximum=1, default=0.1),
            "aspect_ratio": InputField("string", choices=tuple(ULTRA_SIZES), default="1:1"),
            "raw": InputField("boolean", default=False),
            "safety_tolerance": InputField("integer", minimum=1, maximum=6, default=2),
            "seed": InputField("integer"),
            "output_format": InputField("string", choices=("jpg", "png"), default="jpg"),
        },
        ratio_sizes=ULTRA_SIZES,
    ),
}

PILLOW_FORMATS = {
    "webp": ("WEBP", "image/webp"),
    "jpg": ("JPEG", "image/jpeg"),
    "png": ("PNG", "image/png"),
}


@dataclass(slots=True)
class RecordedRequest:
    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: Any
    at: float  # time.monotonic() on arrival, to check waits between polls


@dataclass(slots=True)
class Prediction:
    id: str
    model: str
    input: dict[str, Any]  # as sent: what Replicate echoes back
    effective: dict[str, Any]  # with the schema's defaults filled in: what the model runs with
    base_url: str
    created: float
    status: str = "starting"
    polls: int = 0
    started: float | None = None
    completed: float | None = None
    error: str | None = None
    logs: str = ""
    filename: str | None = None
    image: bytes | None = None
    media_type: str = "image/webp"
    size: tuple[int, int] | None = None  # what was actually made


@dataclass
class ReplicateEmulator:
    api_key: str = DEFAULT_KEY
    # GETs a prediction takes to finish (1: the first poll sees it succeed).
    polls_until_ready: int = 1
    # With Prefer: wait, finish inside the create call; False: answer "starting" anyway,
    # as Replicate does when the wait runs out.
    finish_within_wait: bool = True
    # The first N creates / polls are answered 429 with Retry-After.
    throttle_creates: int = 0
    throttle_polls: int = 0
    retry_after: str = "30"
    insufficient_credit: bool = False
    create_status: int = 201
    # Serve urls.get/urls.cancel under this prefix too, to show clients follow them.
    urls_prefix: str = ""
    # Base URL of the urls.get/urls.cancel handed out (default: the one the emulator was
    # reached at); another host shows who follows them with the token.
    urls_base: str | None = None
    # Lifetime of output links and of a prediction's data.
    url_ttl: float = 3600.0
    # Outputs as data: URIs, the bytes written as base64 by this (as some sync answers
    # inline the file; a test may write unusual or cut-short base64); None: signed links.
    inline_outputs: Callable[[bytes], str] | None = None
    clock: Callable[[], float] = time.time
    signing_key: bytes = field(default_factory=lambda: secrets.token_bytes(32))
    records: list[RecordedRequest] = field(default_factory=list)
    predictions: dict[str, Prediction] = field(default_factory=dict)
    _creates: int = field(default=0, init=False)
    _polls: int = field(default=0, init=False)

    def app(self) -> Starlette:
        routes = [
            Route("/v1/models/{owner}/{name}/predictions", self._create, methods=["POST"]),
            Route("/delivery/{id}/{filename}", self._file, methods=["GET", "HEAD"]),
        ]
        for prefix in {"", self.urls_prefix.rstrip("/")}:
            routes += [
                Route(prefix + "/v1/predictions/{id}", self._get, methods=["GET"]),
                Route(prefix + "/v1/predictions/{id}/cancel", self._cancel, methods=["POST"]),
            ]
        return Starlette(routes=routes)

    # --- requests a test may look at ---------------------------------------------------

    def requests_to(self, method: str, path_part: str) -> list[RecordedRequest]:
        return [r for r in self.records if r.method == method and path_part in r.path]

    # --- routes --------------------------------------------------------------------------

    async def _create(self, request: Request) -> Response:
        body = await self._record(request)
        if (refused := self._authenticate(request)) is not None:
            return refused
        self._creates += 1
        if self._creates <= self.throttle_creates:
            return self._throttled()
        if self.insufficient_credit:
            return JSONResponse({"title": "Insufficient credit", "status": 402}, status_code=402)
        model = f"{request.path_params['owner']}/{request.path_params['name']}"
        schema = SCHEMAS.get(model)
        if schema is None:
            return _problem(404, "Not found", "The requested resource could not be found.")
        if not isinstance(body, dict):
            return _problem(400, "Invalid request", "The request body must be a JSON object.")
        given = body.get("input")
        if not isinstance(given, dict):
            return _invalid([_invalid_field("input", "required", "input is required")])
        inputs, problems = _validate(given, schema)
        if problems:
            return _invalid(problems)
        now = self.clock()
        prediction = Prediction(
            id=_prediction_id(),
            model=model,
            input=given,
            effective=inputs,
            base_url=str(request.base_url).rstrip("/"),
            created=now,
        )
        self.predictions[prediction.id] = prediction
        if _wants_wait(request.headers.get("prefer")) and self.finish_within_wait:
            await self._finish(prediction, schema)
        return JSONResponse(self._public(prediction), status_code=self.create_status)

    async def _get(self, request: Request) -> Response:
        await self._record(request)
        if (refused := self._authenticate(request)) is not None:
            return refused
        self._polls += 1
        if self._polls <= self.throttle_polls:
            return self._throttled()
        prediction = self.predictions.get(request.path_params["id"])
        if prediction is None:
            return _problem(404, "Not found", "The requested resource could not be found.")
        if prediction.status in ("starting", "processing"):
            prediction.polls += 1
            if prediction.polls >= self.polls_until_ready:
                await self._finish(prediction, SCHEMAS[prediction.model])
            else:
                prediction.status = "processing"
                prediction.started = prediction.started or self.clock()
                percent = 100 * prediction.polls // self.polls_until_ready
                prediction.logs = f"Generating image\n{percent}%|{'#' * (percent // 10)}|\n"
        return JSONResponse(self._public(prediction))

    async def _cancel(self, request: Request) -> Response:
        await self._record(request)
        if (refused := self._authenticate(request)) is not None:
            return refused
        prediction = self.predictions.get(request.path_params["id"])
        if prediction is None:
            return _problem(404, "Not found", "The requested resource could not be found.")
        if prediction.status in ("starting", "processing"):
            prediction.status = "canceled"
            prediction.completed = self.clock()
        return JSONResponse(self._public(prediction))

    async def _file(self, request: Request) -> Response:
        await self._record(request)
        prediction = self.predictions.get(request.path_params["id"])
        filename = request.path_params["filename"]
        if prediction is None or prediction.image is None or prediction.filename != filename:
            return Response("Not Found", status_code=404, media_type="text/plain")
        expires = request.query_params.get("expires", "")
        signature = request.query_params.get("signature", "")
        expected = self._signature(prediction.id, filename, expires)
        if not expires.isdigit() or not hmac.compare_digest(expected, signature):
            return Response("Forbidden", status_code=403, media_type="text/plain")
        if int(expires) < self.clock():
            return Response("Not Found", status_code=404, media_type="text/plain")
        return Response(prediction.image, media_type=prediction.media_type)

    # --- behaviour -----------------------------------------------------------------------

    async def _finish(self, prediction: Prediction, schema: ModelSchema) -> None:
        """Run the "model": succeed with an image, or fail the way Replicate does."""
        inputs = prediction.effective
        prediction.started = prediction.started or self.clock()
        prediction.completed = self.clock()
        seed = inputs.get("seed")
        seed = seed if isinstance(seed, int) else secrets.randbelow(2**31)
        prediction.logs = f"Using seed: {seed}\nGenerating image\n100%|##########|\n"
        prompt = str(inputs.get("prompt", ""))
        if MODERATION_TRIGGER in prompt.lower():
            prediction.status, prediction.error = "failed", MODERATION_ERROR
            return
        if FAILURE_TRIGGER in prompt.lower():
            prediction.status = "failed"
            prediction.error = "Prediction failed: the model crashed (emulated failure)"
            return
        if inputs.get("aspect_ratio") == "custom":
            if "width" not in inputs or "height" not in inputs:
                prediction.status = "failed"
                prediction.error = "width and height are required when aspect_ratio is custom"
                return
            step = schema.multiple_of
            # Half-up, as "nearest multiple" reads (Python's round() would halve to even).
            size = (
                math.floor(inputs["width"] / step + 0.5) * step,
                math.floor(inputs["height"] / step + 0.5) * step,
            )
        else:
            size = schema.ratio_sizes[inputs["aspect_ratio"]]
        fmt = inputs["output_format"]
        quality = int(inputs.get("output_quality", 80))
        prediction.image = await anyio.to_thread.run_sync(_render, prompt, seed, size, fmt, quality)
        prediction.media_type = PILLOW_FORMATS[fmt][1]
        prediction.filename = f"out-0.{fmt}"
        prediction.size = size
        prediction.status = "succeeded"

    def _public(self, prediction: Prediction) -> dict[str, Any]:
        """The prediction object as Replicate's API shows it."""
        base = (self.urls_base or prediction.base_url).rstrip("/") + self.urls_prefix.rstrip("/")
        removed = self.clock() > prediction.created + self.url_ttl
        output = None
        ready = prediction.status == "succeeded" and not removed
        if ready and self.inline_outputs is not None and prediction.image is not None:
            text = self.inline_outputs(prediction.image)
            output = f"data:{prediction.media_type};base64,{text}"
        elif ready and prediction.filename:
            expires = int(prediction.created + self.url_ttl)
            signature = self._signature(prediction.id, prediction.filename, str(expires))
            output = (
                f"{prediction.base_url}/delivery/{prediction.id}/{prediction.filename}"
                f"?expires={expires}&signature={signature}"
            )
        metrics = {}
        if prediction.completed and prediction.started:
            metrics["predict_time"] = round(prediction.completed - prediction.started, 3)
        return {
            "id": prediction.id,
            "model": prediction.model,
            "version": "hidden",  # what official models show
            "input": None if removed else prediction.input,
            "logs": None if removed else prediction.logs,
            "output": output,
            "data_removed": removed,
            "error": prediction.error,
            "status": prediction.status,
            "created_at": _iso(prediction.created),
            "started_at": _iso(prediction.started),
            "completed_at": _iso(prediction.completed),
            "urls": {
                "get": f"{base}/v1/predictions/{prediction.id}",
                "cancel": f"{base}/v1/predictions/{prediction.id}/cancel",
            },
            "metrics": metrics,
        }

    async def _record(self, request: Request) -> Any:
        raw = await request.body()
        body: Any = None
        if raw:
            try:
                body = json.loads(raw)
            except ValueError:
                body = raw.decode(errors="replace")
        self.records.append(
            RecordedRequest(
                method=request.method,
                path=request.url.path,
                query=request.url.query,
                headers=dict(request.headers),
                body=body,
                at=time.monotonic(),
            )
        )
        return body

    def _authenticate(self, request: Request) -> Response | None:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() in ("bearer", "token") and hmac.compare_digest(
            token.strip().encode(), self.api_key.encode()
        ):
            return None
        return _problem(401, "Unauthenticated", "You did not pass a valid authentication token")

    def _throttled(self) -> Response:
        return JSONResponse(
            {"detail": "Request was throttled. Your rate limit resets in ~30s."},
            status_code=429,
            headers={"Retry-After": self.retry_after},
        )

    def _signature(self, prediction_id: str, filename: str, expires: str) -> str:
        message = f"{prediction_id}/{filename}\n{expires}".encode()
        return hmac.new(self.signing_key, message, hashlib.sha256).hexdigest()


def create_app(**knobs: Any) -> Starlette:
    """The emulator as an ASGI app; ``app.state.emulator`` is the recorder/knob object."""
    emulator = ReplicateEmulator(**knobs)
    app = emulator.app()
    app.state.emulator = emulator
    return app


# --- validation -----------------------------------------------------------------------------


def _validate(
    given: dict[str, Any], schema: ModelSchema
) -> tuple[dict[str, Any], list[dict[str, str]]]:
    """The inputs with defaults filled in, and every problem in Replicate's shape."""
    problems: list[dict[str, str]] = []
    inputs: dict[str, Any] = {}
    for name, spec in schema.fields.items():
        if name not in given or given[name] is None:
            if spec.required:
                problems.append(_invalid_field("input", "required", f"{name} is required"))
            elif spec.default is not None:
                inputs[name] = spec.default
            continue
        value = given[name]
        problem = _check(name, value, spec)
        if problem is not None:
            problems.append(problem)
        else:
            inputs[name] = value
    # Unknown fields are kept (Replicate ignores what the model does not take).
    inputs.update({k: v for k, v in given.items() if k not in schema.fields})
    return inputs, problems


def _check(name: str, value: Any, spec: InputField) -> dict[str, str] | None:
    where = f"input.{name}"
    expected = {"uri": "string"}.get(spec.kind, spec.kind)
    valid_type = {
        "string": isinstance(value, str),
        "integer": isinstance(value, int) and not isinstance(value, bool),
        "number": isinstance(value, int | float) and not isinstance(value, bool),
        "boolean": isinstance(value, bool),
    }[expected]
    if not valid_type:
        return _invalid_field(
            where, "invalid_type", f"Invalid type. Expected: {expected}, given: {_json_type(value)}"
        )
    if spec.kind == "uri" and not value.startswith(("http://", "https://", "data:")):
        return _invalid_field(where, "format", "Does not match format 'uri'")
    if spec.choices and value not in spec.choices:
        options = ", ".join(f'"{choice}"' for choice in spec.choices)
        return _invalid_field(where, "enum", f"{name} must be one of the following: {options}")
    if spec.minimum is not None and value < spec.minimum:
        return _invalid_field(
            where, "number_gte", f"Must be greater than or equal to {spec.minimum:g}"
        )
    if spec.maximum is not None and value > spec.maximum:
        return _invalid_field(
            where, "number_lte", f"Must be less than or equal to {spec.maximum:g}"
        )
    return None


def _invalid_field(where: str, kind: str, description: str) -> dict[str, str]:
    return {"type": kind, "field": where, "description": description}


def _invalid(problems: list[dict[str, str]]) -> JSONResponse:
    detail = "".join(f"- {p['field']}: {p['description']}\n" for p in problems)
    return JSONResponse(
        {
            "detail": detail,
            "status": 422,
            "title": "Input validation failed",
            "invalid_fields": problems,
        },
        status_code=422,
    )


def _problem(status: int, title: str, detail: str) -> JSONResponse:
    return JSONResponse({"title": title, "detail": detail, "status": status}, status_code=status)


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object" if isinstance(value, dict) else "null"


# --- small pieces ---------------------------------------------------------------------------


def _wants_wait(prefer: str | None) -> bool:
    return any(part.strip().split("=")[0] == "wait" for part in (prefer or "").split(","))


def _prediction_id() -> str:
    # Replicate's ids: 26 lowercase base32 characters.
    return b32encode(secrets.token_bytes(20)).decode().lower()[:26]


def _iso(moment: float | None) -> str | None:
    if moment is None:
        return None
    return (
        datetime.fromtimestamp(moment, UTC)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z")
    )


def _render(prompt: str, seed: int, size: tuple[int, int], fmt: str, quality: int) -> bytes:
    """A real image at ``size`` in ``fmt``, its colours picked by prompt and seed."""
    digest = hashlib.sha256(f"{seed}\x00{prompt}".encode()).digest()
    background, shape = (digest[0], digest[1], digest[2]), (digest[3], digest[4], digest[5])
    image = Image.new("RGB", size, background)
    width, height = size
    ImageDraw.Draw(image).ellipse(
        (width // 4, height // 4, 3 * width // 4, 3 * height // 4), fill=shape
    )
    buffer = io.BytesIO()
    pillow_name = PILLOW_FORMATS[fmt][0]
    if pillow_name == "PNG":
        image.save(buffer, pillow_name)  # output_quality is ignored for png, as on Replicate
    else:
        image.save(buffer, pillow_name, quality=quality)
    return buffer.getvalue()


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description="Serve the Replicate protocol emulator.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8081)
    parser.add_argument("--api-key", default=DEFAULT_KEY, help="the token clients must send")
    parser.add_argument("--polls-until-ready", type=int, default=1)
    args = parser.parse_args(argv)
    app = create_app(api_key=args.api_key, polls_until_ready=args.polls_until_ready)
    uvicorn.run(app, host=args.host, port=args.port)


if __name__ == "__main__":
    main()
