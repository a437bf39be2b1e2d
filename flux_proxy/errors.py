"""Errors the gateway answers with, all rendered as OpenAI's ``ErrorResponse``.

Every failure a client can cause or meet is a :class:`GatewayError` with an HTTP
status and the four fields OpenAI's schema requires (``message``, ``type``,
``param``, ``code``). Nothing else ever reaches the client: unexpected exceptions
are logged and answered with a generic 500 body, never a stack trace.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from types import TracebackType


class GatewayError(Exception):
    status_code = 500
    error_type = "server_error"
    default_code: str | None = None
    # Whether another provider may serve the same request (failover).
    retryable = False
    # Whether the answer closes the client's connection (``Connection: close``): after
    # a request whose body was not read to its end, the connection cannot carry another.
    closes_connection = False

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
        status_code: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code if code is not None else self.default_code
        self.headers = dict(headers or {})
        if self.closes_connection:
            self.headers.setdefault("Connection", "close")
        if status_code is not None:
            self.status_code = status_code

    def body(self) -> dict[str, dict[str, str | None]]:
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
            }
        }

    def body_bytes(self) -> bytes:
        return json.dumps(self.body()).encode()


class InvalidRequest(GatewayError):
    status_code = 400
    error_type = "invalid_request_error"


class ContentPolicyViolation(InvalidRequest):
    default_code = "content_policy_violation"


class AuthenticationFailed(GatewayError):
    status_code = 401
    error_type = "invalid_request_error"
    default_code = "invalid_api_key"


class Forbidden(GatewayError):
    status_code = 403
    error_type = "invalid_request_error"
    default_code = "forbidden"


class NotFound(GatewayError):
    status_code = 404
    error_type = "invalid_request_error"
    default_code = "not_found"


class ModelNotFound(NotFound):
    default_code = "model_not_found"


class MethodNotAllowed(GatewayError):
    status_code = 405
    error_type = "invalid_request_error"
    default_code = "method_not_allowed"


class RequestTimeout(GatewayError):
    """The client took longer than its limit to send its request."""

    status_code = 408
    error_type = "invalid_request_error"
    default_code = "request_timeout"
    closes_connection = True


class PayloadTooLarge(GatewayError):
    status_code = 413
    error_type = "invalid_request_error"
    default_code = "request_too_large"
    # Refused before the body is read (or part-way): reading on to reuse the
    # connection would take in what the limit refused.
    closes_connection = True


class RateLimited(GatewayError):
    status_code = 429
    error_type = "rate_limit_error"
    default_code = "rate_limit_exceeded"
    retryable = True


class Overloaded(GatewayError):
    """The gateway has as much image work admitted as it takes: try again shortly."""

    status_code = 503
    error_type = "server_error"
    default_code = "overloaded"

    def __init__(self, message: str, *, retry_after: int) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after)})


class UpstreamError(GatewayError):
    """The provider failed or answered something the gateway cannot use."""

    status_code = 502
    error_type = "server_error"
    default_code = "upstream_error"
    retryable = True


class UpstreamCredentialsMissing(UpstreamError):
    """The gateway holds no key for an upstream: the variables meant to hold one are unset.

    Retryable: the model's next provider may have its key. When none has, the
    failover names every variable it found unset (see generation.py).
    """

    default_code = "upstream_credentials_missing"

    def __init__(self, variables: Sequence[str]) -> None:
        self.variables = tuple(dict.fromkeys(variables))  # once each, in order
        names = ", ".join(self.variables)
        if len(self.variables) == 1:
            message = (
                "The gateway has no key for this model's upstream: the environment "
                f"variable {names} is not set."
            )
        else:
            message = (
                "The gateway has no key for this model's upstreams: the environment "
                f"variables {names} are not set."
            )
        super().__init__(message)


class UpstreamTimeout(UpstreamError):
    status_code = 504
    default_code = "upstream_timeout"


class UpstreamUnavailable(GatewayError):
    """Every provider of the model is skipped by its circuit breaker: a fast answer, with
    Retry-After, instead of calls expected to fail (see flux_proxy/breaker.py)."""

    status_code = 503
    error_type = "server_error"
    default_code = "upstream_unavailable"


class ShuttingDown(GatewayError):
    """A request that reached this replica after its shutdown began (see drain.py)."""

    status_code = 503
    default_code = "shutting_down"
    # Long enough for the client's next try to reach another replica.
    retry_after_seconds = 1

    def __init__(self) -> None:
        super().__init__(
            "This gateway is shutting down: send the request again, it will reach another replica.",
            headers={"Retry-After": str(self.retry_after_seconds), "Connection": "close"},
        )


class StoreUnavailable(GatewayError):
    """The image store cannot keep or give back images now (its bucket is unreachable,
    say). Only ``url`` answers need it: ``b64_json`` ones are still served."""

    status_code = 503
    default_code = "image_store_unavailable"
    # A bucket that went away is rarely back within a second; a probe period is fair.
    retry_after_seconds = 5

    def __init__(self, problem: str) -> None:
        """``problem``: what is wrong, in words fit for any client ("the image bucket is
        unreachable"), never an address or a key."""
        super().__init__(
            f"The gateway cannot host images now: {problem}. Retry later, or ask for "
            "response_format 'b64_json', which does not need the image store.",
            headers={"Retry-After": str(self.retry_after_seconds)},
        )


class InternalError(GatewayError):
    status_code = 500
    default_code = "internal_error"


def redact(text: str, secrets: list[str]) -> str:
    """Remove every secret from ``text``: upstream messages may echo a key back."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "[redacted]")
    return text


class RaisedAs:
    """A ``with`` block that raises its failures as other exceptions: ``translate``
    says which (None: as they are).

    A class, not a generator-based context manager: one is entered for every upstream
    call and every body read, and a generator's making, entering and leaving cost
    several times this. The new exception is never left in a local here: this frame is
    in its traceback, so holding it would keep every frame of the failed block in a
    reference cycle until the collector ran."""

    __slots__ = ()
    # Whether the new exception names the one it replaces as its cause.
    chained = True

    def translate(self, error: BaseException) -> BaseException | None:
        raise NotImplementedError

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if error is None:
            return
        translated = self.translate(error)
        if translated is None:
            return
        try:
            raise translated from (error if self.chained else None)
        finally:
            del translated
