"""The one submit/poll policy (flux_proxy.polling.poll), against a scripted upstream.

The upstream answers each poll from a script (status code, or "done"); the tests
check how many polls were made, what the caller gets, and when the task is
cancelled. In process, through httpx.ASGITransport.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from flux_proxy.errors import GatewayError, RateLimited, UpstreamError, UpstreamTimeout
from flux_proxy.hosts import KeyHosts
from flux_proxy.polling import MAX_RETRIES, PollingOptions, poll
from flux_proxy.upstream import Upstream

BASE = "http://127.0.0.1:9400"
KEY = "poll-key-0123456789"
FAST = PollingOptions(poll_interval=0.01, poll_max_interval=0.02)


class Script:
    """A task's status URL answering ``answers`` in turn (the last one repeats)."""

    def __init__(self, *answers: int | str) -> None:
        self.answers = list(answers)
        self.polls: list[dict[str, str]] = []

    def app(self) -> Starlette:
        async def status(request: Request) -> Response:
            self.polls.append(dict(request.headers))
            answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
            if answer == "done":
                return JSONResponse({"status": "done", "image": "x"})
            if answer == "running":
                return JSONResponse({"status": "running"})
            return JSONResponse({"detail": "busy"}, status_code=int(answer))

        return Starlette(routes=[Route("/status", status)])


def upstream(script: Script) -> Upstream:
    async def public_only(url: str) -> None:
        del url  # the address guard has its own tests; here every host is allowed

    return Upstream(
        provider="test",
        http=httpx.AsyncClient(transport=httpx.ASGITransport(app=script.app())),
        key=KEY,
        auth={"x-key": KEY},
        hosts=KeyHosts("test", (), BASE),
        guard=public_only,
        max_bytes=65536,
    )


async def read(response: httpx.Response) -> dict[str, Any] | None:
    body: dict[str, Any] = response.json()
    return body if body["status"] == "done" else None


class Cancels:
    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self) -> None:
        self.calls += 1


async def run(script: Script, cancel: Cancels | None = None, **kwargs: Any) -> dict[str, Any]:
    line = upstream(script)
    return await poll(
        line, f"{BASE}/status", read, options=FAST, task="test task", cancel=cancel, **kwargs
    )


@pytest.mark.anyio
async def test_polls_until_done_with_the_key() -> None:
    script = Script("running", "running", "done")
    assert (await run(script))["image"] == "x"
    assert len(script.polls) == 3
    assert all(headers["x-key"] == KEY for headers in script.polls)


@pytest.mark.anyio
@pytest.mark.parametrize("status", [429, 502, 503])
async def test_a_few_transient_answers_are_waited_out(status: int) -> None:
    script = Script(*[status] * MAX_RETRIES, "done")
    assert (await run(script))["image"] == "x"
    assert len(script.polls) == MAX_RETRIES + 1


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("status", "error"), [(429, RateLimited), (503, UpstreamError), (500, UpstreamError)]
)
async def test_past_the_retries_the_answer_is_the_error_and_the_task_is_cancelled(
    status: int, error: type[GatewayError]
) -> None:
    script = Script(status)
    cancel = Cancels()
    with pytest.raises(error):
        await run(script, cancel)
    transient = status != 500
    assert len(script.polls) == (MAX_RETRIES + 1 if transient else 1)
    assert cancel.calls == 1


@pytest.mark.anyio
async def test_poll_timeout_is_a_504_and_cancels_the_task() -> None:
    script = Script("running")
    cancel = Cancels()
    line = upstream(script)
    options = PollingOptions(poll_interval=0.01, poll_max_interval=0.02, poll_timeout=0.1)
    with pytest.raises(UpstreamTimeout, match="poll_timeout"):
        await poll(line, f"{BASE}/status", read, options=options, task="t", cancel=cancel)
    assert cancel.calls == 1 and script.polls


@pytest.mark.anyio
async def test_a_polling_url_on_a_foreign_host_is_never_polled() -> None:
    script = Script("done")
    line = upstream(script)
    with pytest.raises(UpstreamError, match="trusted_hosts"):
        await poll(line, "http://elsewhere.example/status", read, options=FAST, task="t")
    assert script.polls == []


@pytest.mark.anyio
async def test_the_first_poll_waits_only_when_the_submit_answer_asked() -> None:
    # A Retry-After far past the poll timeout: honoured (bounded by poll_max_interval,
    # 0.02 s here), so the task still finishes; without the bound it would time out.
    script = Script("done")
    options = PollingOptions(poll_interval=0.01, poll_max_interval=0.02, poll_timeout=5)
    result = await poll(
        upstream(script), f"{BASE}/status", read, options=options, task="t", retry_after="3600"
    )
    assert result["status"] == "done" and len(script.polls) == 1
