"""An offline emulator of Black Forest Labs' API, for tests and for trying the gateway.

It speaks the protocol in the shared PROVIDERS.md, section 1:

- ``POST /v1/flux-pro-1.1`` and ``POST /v1/flux-pro-1.1-ultra`` with ``x-key``; the body
  is validated like BFL's ``FluxPro11Inputs`` / ``FluxUltraInput`` and rejected with
  FastAPI's 422 shape ``{"detail": [{"type", "loc", "msg", "input", ...}]}``.
- The answer ``{"id", "polling_url", "cost", "input_mp", "output_mp"}`` names a polling
  URL on another path (``/v1/get_result?id=...``), or another base (``polling_base``),
  so a client that builds the URL itself instead of following it is caught.
- ``GET /v1/get_result?id=...`` answers ``Pending`` (with ``progress``) for
  ``polls_before_ready`` polls, then ``Ready`` with ``result.sample``: a signed URL
  (HMAC over path and expiry, Azure-blob style ``se=...&sig=...``) that expires
  ``url_ttl`` seconds after the task finished, like BFL's ten minutes. An expired or
  tampered URL gets the 403 Azure's blob storage answers.
- Words in the prompt play out the unhappy endings: ``moderate-output`` ->
  "Content Moderated", ``moderate`` -> "Request Moderated", ``explode`` -> "Error",
  ``forget`` -> "Task not found".
- Wrong or missing key -> 403 ``{"detail": "Not authenticated - Invalid Authentication"}``;
  more than ``max_active_tasks`` running -> 429; out of ``credits`` -> 402.
- Every request is recorded in ``requests`` (``app.state.emulator`` is the emulator).

Images are real: Pillow draws them at the asked size (Ultra: about 4 MP in the asked
ratio) in the asked format. BFL has no cancel endpoint, so neither has this.
"""

from __future__ import annotations

import argparse
import base64
import calendar
import hashlib
import hmac
import io
import json
import math
import re
import secrets
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import anyio.to_thread
from PIL import Image, ImageDraw
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from flux_proxy import sdk

DEFAULT_API_KEY = "emulator-key"
# What BFL's FastAPI answers without a key and with a wrong one.
NO_KEY = {"detail": "Not authenticated"}
BAD_KEY = {"detail": "Not authenticated - Invalid Authentication"}
# List prices in credits (1 credit = $0.01): FLUX 1.1 [pro] $0.04, Ultra $0.06.
COSTS = {"flux-pro-1.1": 4.0, "flux-pro-1.1-ultra": 6.0}
MEDIA_TYPES = {"jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp"}
PILLOW_NAMES = {"jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}
MODERATION_REASONS = ["Sexual Content"]
# Ultra's pixel sizes per ratio (UNCERTAIN, see the provider); other ratios get ~4 MP.
ULTRA_MEGAPIXELS = 4 * 1024 * 1024
ULTRA_SIZES: dict[str, tuple[int, int]] = {
    ratio: sdk.FLUX_ULTRA_SIZES[ratio] for ratio in sdk.FLUX_ULTRA_RATIOS
}
# Prompt words that end a task some other way than Ready, first match wins.
TRIGGERS: tuple[tuple[str, str], ...] = (
    ("moderate-output", "Content Moderated"),
    ("moderate", "Request Moderated"),
    ("explode", "Error"),
    ("forget", "Task not found"),
)
_RATIO = re.compile(r"^(\d+):(\d+)$")
_EXPIRY_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
_STORAGE_VERSION = "2024-11-04"


class BflInputs(BaseModel):
    """Fields both endpoints share; unknown fields are ignored, as FastAPI does."""

    model_config = ConfigDict(extra="ignore")

    prompt: str | None = ""
    image_prompt: str | None = None
    prompt_upsampling: bool = False
    seed: int | None = None
    safety_tolerance: int = Field(2, ge=0, le=6)
    output_format: Literal["jpeg", "png", "webp"] | None = "jpeg"
    webhook_url: str | None = Field(None, min_length=1, max_length=2083)
    webhook_secret: str | None = None

    def size(self) -> tuple[int, int]:
        raise NotImplementedError


class FluxPro11Inputs(BflInputs):
    width: int = Field(1024, ge=256, le=1440, multiple_of=32)
    height: int = Field(768, ge=256, le=1440, multiple_of=32)

    def size(self) -> tuple[int, int]:
        return self.width, self.height


class FluxUltraInput(BflInputs):
    aspect_ratio: str = "16:9"
    raw: bool = False
    image_prompt_strength: float = Field(0.1, ge=0, le=1)

    @field_validator("aspect_ratio")
    @classmethod
    def _within_range(cls, value: str) -> str:
        # BFL's schema types it as a bare string and states the bound only in prose.
        match = _RATIO.match(value)
        if not match or int(match[1]) == 0 or int(match[2]) == 0:
            raise ValueError("aspect ratio must be of the form W:H, e.g. 16:9")
        if not 9 / 21 <= int(match[1]) / int(match[2]) <= 21 / 9:
            raise ValueError("aspect ratio must be between 21:9 and 9:21")
        return value

    def size(self) -> tuple[int, int]:
        if self.aspect_ratio in ULTRA_SIZES:
            return ULTRA_SIZES[self.aspect_ratio]
        width, height = (int(part) for part in self.aspect_ratio.split(":"))
        ratio = width / height
        return (
            round(math.sqrt(ULTRA_MEGAPIXELS * ratio) / 32) * 32,
            round(math.sqrt(ULTRA_MEGAPIXELS / ratio) / 32) * 32,
        )


ENDPOINTS: dict[str, type[BflInputs]] = {
    "flux-pro-1.1": FluxPro11Inputs,
    "flux-pro-1.1-ultra": FluxUltraInput,
}

RequestKind = Literal["submit", "poll", "download", "other"]


@dataclass
class RecordedRequest:
    kind: RequestKind
    method: str
    url: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: Any  # the JSON body, or the text when it was not JSON, or None


@dataclass
class Task:
    id: str
    endpoint: str
    inputs: BflInputs
    # How the task ends once it is done: "Ready" or one of the TRIGGERS' statuses.
    outcome: str
    started: float
    polls: int = 0
    status: str = "Pending"
    result: dict[str, Any] | None = None
    image: bytes | None = None
    fmt: str = "jpeg"


@dataclass
class BflEmulator:
    api_key: str = DEFAULT_API_KEY
    # Pending answers before the task is Ready.
    polls_before_ready: int = 1
    # Retry-After on poll answers (BFL sends "1"); None: no header.
    retry_after: str | None = "1"
    # Lifetime of result URLs, from the task's end (BFL: 10 minutes).
    url_ttl: float = 600.0
    # Running tasks allowed at once (BFL: 24 per account); one more is a 429.
    max_active_tasks: int | None = 24
    # Retry-After on that 429 (whether BFL sends one is UNCERTAIN); None: no header.
    rate_limit_retry_after: str | None = None
    # Credits left; None: unlimited. A task costing more than is left is a 402.
    credits: float | None = None
    # Base URL of the polling URLs handed out; None: the submit request's own base URL.
    polling_base: str | None = None
    clock: Callable[[], float] = time.time
    requests: list[RecordedRequest] = field(default_factory=list)
    tasks: dict[str, Task] = field(default_factory=dict)
    _signing_key: bytes = field(default_factory=lambda: secrets.token_bytes(32), repr=False)

    def app(self) -> Starlette:
        app = Starlette(
            routes=[
                Route("/v1/get_result", self._poll, methods=["GET"]),
                Route("/v1/{endpoint}", self._submit, methods=["POST"]),
                Route("/results/{task_id}/sample.{ext}", self._download, methods=["GET"]),
            ],
            exception_handlers={404: self._http_error, 405: self._http_error},
        )
        app.state.emulator = self
        return app

    # -- what tests look at ------------------------------------------------------------

    def reset(self, **knobs: Any) -> None:
        """Forget every task and record and take ``knobs`` (others back to defaults).

        A served app keeps working: its routes are this object's methods.
        """
        self.__dict__.update(vars(BflEmulator(**knobs)))

    def of_kind(self, kind: RequestKind) -> list[RecordedRequest]:
        return [request for request in list(self.requests) if request.kind == kind]

    @property
    def submits(self) -> list[RecordedRequest]:
        return self.of_kind("submit")

    @property
    def polls(self) -> list[RecordedRequest]:
        return self.of_kind("poll")

    @property
    def downloads(self) -> list[RecordedRequest]:
        return self.of_kind("download")

    # -- handlers ----------------------------------------------------------------------

    async def _submit(self, request: Request) -> Response:
        recorded = await self._record(request, "submit")
        endpoint = request.path_params["endpoint"]
        schema = ENDPOINTS.get(endpoint)
        if schema is None:
            return JSONResponse({"detail": "Not Found"}, status_code=404)
        if (denied := self._authenticate(request)) is not None:
            return denied
        try:
            if not isinstance(recorded.body, dict):
                raise _not_an_object(recorded.body)
            inputs = schema.model_validate(recorded.body)
        except ValidationError as error:
            return _validation_response(error, where="body")
        except _BodyError as error:
            return JSONResponse({"detail": error.detail}, status_code=422)
        if self.max_active_tasks is not None and self._active() >= self.max_active_tasks:
            headers = (
                {"Retry-After": self.rate_limit_retry_after} if self.rate_limit_retry_after else {}
            )
            return JSONResponse(
                {
                    "detail": f"You have reached the limit of {self.max_active_tasks} active "
                    "tasks. Wait for a task to finish before submitting another."
                },
                status_code=429,
                headers=headers,
            )
        cost = COSTS[endpoint]
        if self.credits is not None:
            if self.credits < cost:
                return JSONResponse(
                    {"detail": "Insufficient credits. Add credits to your account to continue."},
                    status_code=402,
                )
            self.credits -= cost
        prompt = (inputs.prompt or "").lower()
        outcome = next((status for word, status in TRIGGERS if word in prompt), "Ready")
        task = Task(str(uuid.uuid4()), endpoint, inputs, outcome, started=self.clock())
        self.tasks[task.id] = task
        width, height = inputs.size()
        base = (self.polling_base or str(request.base_url)).rstrip("/")
        return JSONResponse(
            {
                "id": task.id,
                "polling_url": f"{base}/v1/get_result?id={task.id}",
                "cost": cost,
                "input_mp": 0.0,
                "output_mp": round(width * height / 1_000_000, 2),
            }
        )

    async def _poll(self, request: Request) -> Response:
        await self._record(request, "poll")
        if (denied := self._authenticate(request)) is not None:
            return denied
        task_id = request.query_params.get("id")
        if task_id is None:
            detail = [
                {"type": "missing", "loc": ["query", "id"], "msg": "Field required", "input": None}
            ]
            return JSONResponse({"detail": detail}, status_code=422)
        task = self.tasks.get(task_id)
        if task is not None:
            await self._advance(task, str(request.base_url).rstrip("/"))
            if task.status == "Task not found":
                del self.tasks[task_id]  # the emulator "loses" it, as the trigger asks
        status = task.status if task is not None else "Task not found"
        body: dict[str, Any] = {
            "id": task_id,
            "status": status,
            "result": task.result if task is not None and status == "Ready" else None,
            "progress": _progress(task, self.polls_before_ready),
            "details": _details(status),
            "preview": None,
        }
        headers = {
            "X-Ratelimit-Limit": "1200",
            "X-Ratelimit-Remaining": "1199",
            "X-Ratelimit-Reset": f"{self.clock() + 60:.3f}",
        }
        if self.retry_after is not None:
            headers["Retry-After"] = self.retry_after
        return JSONResponse(body, headers=headers)

    async def _download(self, request: Request) -> Response:
        await self._record(request, "download")
        task = self.tasks.get(request.path_params["task_id"])
        query = request.query_params
        expiry = query.get("se", "")
        signature = query.get("sig", "")
        expected = self._signature(request.url.path, expiry, query.get("rsct", ""))
        if not hmac.compare_digest(signature, expected):
            return _storage_error(
                403,
                "AuthenticationFailed",
                "Signature did not match. String to sign used was r",
            )
        expires_at = _parse_expiry(expiry)
        now = self.clock()
        if expires_at is None or now >= expires_at:
            return _storage_error(
                403,
                "AuthenticationFailed",
                f"Signature not valid in the specified time frame: Expiry [{expiry}] - "
                f"Current [{time.strftime(_EXPIRY_FORMAT, time.gmtime(now))}]",
            )
        if task is None or task.image is None:
            return _storage_error(404, "BlobNotFound", "The specified blob does not exist.")
        return Response(task.image, media_type=MEDIA_TYPES[task.fmt])

    async def _http_error(self, request: Request, exc: Exception) -> Response:
        await self._record(request, "other")
        status = exc.status_code if isinstance(exc, HTTPException) else 500
        detail = "Method Not Allowed" if status == 405 else "Not Found"
        return JSONResponse({"detail": detail}, status_code=status)

    # -- the task's life ---------------------------------------------------------------

    async def _advance(self, task: Task, base: str) -> None:
        if task.status != "Pending":
            return  # a finished task answers the same every time
        task.polls += 1
        if task.outcome == "Request Moderated":
            task.status = task.outcome  # input moderation runs before any generation
        elif task.polls > self.polls_before_ready:
            if task.outcome == "Ready":
                await self._finish(task, base)
            task.status = task.outcome

    async def _finish(self, task: Task, base: str) -> None:
        inputs = task.inputs
        seed = inputs.seed if inputs.seed is not None else secrets.randbelow(2**32)
        task.fmt = inputs.output_format or "jpeg"
        width, height = inputs.size()
        task.image = await anyio.to_thread.run_sync(render, width, height, task.fmt, seed)
        end = self.clock()
        prompt = inputs.prompt or ""
        if inputs.prompt_upsampling:
            prompt = f"{prompt}, rendered in rich detail under soft natural light"
        task.result = {
            "sample": self._sample_url(base, task, end + self.url_ttl),
            "prompt": prompt,
            "seed": seed,
            "start_time": task.started,
            "end_time": end,
            "duration": end - task.started,
        }

    def _active(self) -> int:
        return sum(1 for task in self.tasks.values() if task.status == "Pending")

    # -- auth, recording, signing ------------------------------------------------------

    def _authenticate(self, request: Request) -> Response | None:
        key = request.headers.get("x-key")
        if not key:
            return JSONResponse(NO_KEY, status_code=403)
        if not hmac.compare_digest(key.encode(), self.api_key.encode()):
            return JSONResponse(BAD_KEY, status_code=403)
        return None

    async def _record(self, request: Request, kind: RequestKind) -> RecordedRequest:
        raw = await request.body()
        body: Any = None
        if raw:
            try:
                body = json.loads(raw)
            except (ValueError, UnicodeDecodeError):
                body = _JsonError(raw.decode("utf-8", "replace"))
        recorded = RecordedRequest(
            kind=kind,
            method=request.method,
            url=str(request.url),
            path=request.url.path,
            query=dict(request.query_params),
            headers=dict(request.headers),
            body=body,
        )
        self.requests.append(recorded)
        return recorded

    def _sample_url(self, base: str, task: Task, expires_at: float) -> str:
        path = f"/results/{task.id}/sample.{task.fmt}"
        expiry = time.strftime(_EXPIRY_FORMAT, time.gmtime(expires_at))
        media_type = MEDIA_TYPES[task.fmt]
        signature = self._signature(path, expiry, media_type)
        return (
            f"{base}{path}?se={expiry}&sp=r&sv={_STORAGE_VERSION}&sr=b"
            f"&rsct={media_type}&sig={signature}"
        )

    def _signature(self, path: str, expiry: str, media_type: str) -> str:
        message = f"{path}\n{expiry}\n{media_type}".encode()
        digest = hmac.new(self._signing_key, message, hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).decode().rstrip("=")


def create_app(**knobs: Any) -> Starlette:
    """The emulator as an ASGI app; ``knobs`` are :class:`BflEmulator`'s fields."""
    return BflEmulator(**knobs).app()


def render(width: int, height: int, fmt: str, seed: int) -> bytes:
    """A picture whose colours depend on the seed, so different seeds look different."""
    digest = hashlib.sha256(str(seed).encode()).digest()
    image = Image.new("RGB", (width, height), (digest[0], digest[1], digest[2]))
    ImageDraw.Draw(image).rectangle(
        (width // 4, height // 4, width * 3 // 4, height * 3 // 4),
        fill=(digest[3], digest[4], digest[5]),
    )
    buffer = io.BytesIO()
    image.save(buffer, PILLOW_NAMES[fmt])
    return buffer.getvalue()


class _JsonError(str):
    """A body that was not JSON (kept as text for the record)."""


class _BodyError(Exception):
    def __init__(self, detail: list[dict[str, Any]]) -> None:
        super().__init__("invalid body")
        self.detail = detail


def _not_an_object(body: Any) -> _BodyError:
    if isinstance(body, _JsonError):
        return _BodyError(
            [
                {
                    "type": "json_invalid",
                    "loc": ["body", 0],
                    "msg": "JSON decode error",
                    "input": {},
                    "ctx": {"error": "Expecting value"},
                }
            ]
        )
    return _BodyError(
        [
            {
                "type": "model_attributes_type",
                "loc": ["body"],
                "msg": "Input should be a valid dictionary or object to extract fields from",
                "input": body,
            }
        ]
    )


def _validation_response(error: ValidationError, *, where: str) -> JSONResponse:
    """FastAPI's 422 body for a pydantic error (FastAPI leaves out pydantic's doc URL)."""
    detail = []
    for item in error.errors(include_url=False):
        entry: dict[str, Any] = {
            "type": item["type"],
            "loc": [where, *item["loc"]],
            "msg": item["msg"],
            "input": item.get("input"),
        }
        if "ctx" in item:
            entry["ctx"] = {key: _jsonable(value) for key, value in item["ctx"].items()}
        detail.append(entry)
    return JSONResponse({"detail": detail}, status_code=422)


def _jsonable(value: Any) -> Any:
    return value if isinstance(value, str | int | float | bool | type(None)) else str(value)


def _progress(task: Task | None, polls_before_ready: int) -> float | None:
    # Like BFL: null at first, then a growing fraction while Pending.
    if task is None or task.status != "Pending" or task.polls <= 1:
        return None
    return round((task.polls - 1) / max(polls_before_ready, 1), 2)


def _details(status: str) -> dict[str, Any] | None:
    if status in ("Request Moderated", "Content Moderated"):
        return {"Moderation Reasons": list(MODERATION_REASONS)}
    if status == "Error":
        return {"message": "The image could not be generated."}  # BFL's shape is UNCERTAIN
    return None


def _parse_expiry(text: str) -> float | None:
    try:
        return float(calendar.timegm(time.strptime(text, _EXPIRY_FORMAT)))
    except ValueError:
        return None


def _storage_error(status: int, code: str, message: str) -> Response:
    """Azure blob storage's XML error, which BFL's delivery URLs answer with."""
    body = (
        '<?xml version="1.0" encoding="utf-8"?><Error>'
        f"<Code>{code}</Code><Message>{message}</Message></Error>"
    )
    return Response(body, status_code=status, media_type="application/xml")


def main(argv: Sequence[str] | None = None) -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description="Serve an emulator of Black Forest Labs' API.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9100)
    parser.add_argument("--api-key", default=DEFAULT_API_KEY, help="the x-key it accepts")
    parser.add_argument("--polls-before-ready", type=int, default=1)
    parser.add_argument("--retry-after", default="1", help="Retry-After on polls ('' for none)")
    parser.add_argument("--url-ttl", type=float, default=600.0, help="result URL lifetime (s)")
    args = parser.parse_args(argv)
    app = create_app(
        api_key=args.api_key,
        polls_before_ready=args.polls_before_ready,
        retry_after=args.retry_after or None,
        url_ttl=args.url_ttl,
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")


if __name__ == "__main__":
    main()
