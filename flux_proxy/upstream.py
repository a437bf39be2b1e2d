"""Mapping an upstream's HTTP failure to the error the client should see.

Shared by every provider, built-in or plugin, so the same upstream trouble reads
the same whoever the upstream is. Messages never include provider keys: callers
pass the secrets to strip from anything the upstream echoed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx

from flux_proxy.errors import (
    ContentPolicyViolation,
    GatewayError,
    InvalidRequest,
    RateLimited,
    UpstreamError,
    UpstreamTimeout,
    redact,
)

MAX_MESSAGE = 500

# Upstream error codes that mean "moderation refused this", whatever the model's
# generation calls it (dall-e-3 and gpt-image differ); the client sees OpenAI's
# ``content_policy_violation``, as it does from every plugin provider.
MODERATION_CODES: frozenset[str] = frozenset({"content_policy_violation", "moderation_blocked"})
# An upstream code passes on only when it looks like one: a code is matched on by
# client code, so free text (or anything echoing a key) never goes there.
CODE_PATTERN = re.compile(r"[A-Za-z0-9_.\-]{1,64}")


def upstream_message(response: httpx.Response) -> str:
    """The human part of an upstream error body, whatever shape it has."""
    try:
        body = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return response.text[:MAX_MESSAGE].strip()
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return str(error["message"])[:MAX_MESSAGE]
        for key in ("detail", "message", "error", "title"):
            value = body.get(key)
            if isinstance(value, str):
                return value[:MAX_MESSAGE]
            if value is not None:
                return json.dumps(value)[:MAX_MESSAGE]
    return json.dumps(body)[:MAX_MESSAGE]


def error_for_status(
    response: httpx.Response, *, provider: str, secrets: list[str]
) -> GatewayError:
    status = response.status_code
    detail = redact(upstream_message(response), secrets)
    if status in (401, 403):
        return UpstreamError(
            f"The {provider} upstream rejected the gateway's credentials (HTTP {status}). "
            "Your own key was accepted; the gateway's operator must fix its upstream key.",
            code="upstream_auth_failed",
        )
    if status == 402:
        return UpstreamError(
            f"The {provider} upstream account is out of credit.",
            code="upstream_insufficient_credit",
        )
    if status == 429:
        headers = {}
        if retry_after := response.headers.get("retry-after"):
            headers["Retry-After"] = retry_after
        return RateLimited(
            f"The {provider} upstream is rate limiting requests: {detail}", headers=headers
        )
    if status in (400, 422):
        param = _openai_field(response, "param")
        code = _openai_field(response, "code")
        if code is not None and not CODE_PATTERN.fullmatch(code):
            code = None
        message = f"The {provider} upstream rejected the request: {detail}"
        if code in MODERATION_CODES:
            return ContentPolicyViolation(message, param=param)
        return InvalidRequest(message, param=param, code=code)
    if status in (408, 504):
        return UpstreamTimeout(f"The {provider} upstream timed out (HTTP {status}).")
    return UpstreamError(f"The {provider} upstream failed with HTTP {status}: {detail}")


def _openai_field(response: httpx.Response, name: str) -> str | None:
    """A string field of an OpenAI-shaped ``{"error": {...}}`` body, if there is one."""
    try:
        error = response.json().get("error")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return None
    value = error.get(name) if isinstance(error, dict) else None
    return value if isinstance(value, str) else None


def upstream_json(response: httpx.Response, *, provider: str, what: str) -> Any:
    """The answer's JSON, or a 502 saying the upstream sent something else."""
    try:
        return response.json()
    except (ValueError, UnicodeDecodeError):
        raise UpstreamError(
            f"The {provider} upstream answered the {what} with something other than JSON."
        ) from None


@contextmanager
def upstream_transport_errors(provider: str) -> Iterator[None]:
    """Turn httpx's transport failures into 502/504 answers."""
    try:
        yield
    except httpx.TimeoutException:
        raise UpstreamTimeout(f"The {provider} upstream did not answer in time.") from None
    except httpx.HTTPError as exc:
        raise UpstreamError(
            f"The {provider} upstream could not be reached ({type(exc).__name__})."
        ) from None


async def post_capped(
    http: httpx.AsyncClient, url: str, *, max_bytes: int, **kwargs: Any
) -> httpx.Response:
    """POST and read the answer, refusing one larger than ``max_bytes``.

    For upstreams that put images inside their JSON: an answer is otherwise read
    whole into memory, however large the upstream makes it.
    """
    request = http.build_request("POST", url, **kwargs)
    response = await http.send(request, stream=True)
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in response.aiter_bytes():
            size += len(chunk)
            if size > max_bytes:
                raise UpstreamError("The upstream's answer is larger than the gateway accepts.")
            chunks.append(chunk)
    finally:
        await response.aclose()
    # aiter_bytes already undid any content-encoding: the copy must not claim one.
    headers = [(k, v) for k, v in response.headers.multi_items() if k != "content-encoding"]
    return httpx.Response(
        response.status_code, headers=headers, content=b"".join(chunks), request=request
    )
