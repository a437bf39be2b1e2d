"""Admission control: heavy requests fill their own lane and are refused at once past it;
light ones go by; a request over its budget is a 400; the deadline holds while Pillow works.

Nothing here measures time: heavy work is held (at the upstream, or in its thread) on
an event the test sets, so what must happen while it is held is checked as an outcome.
"""

from __future__ import annotations

import base64
import threading
from collections.abc import Callable, Iterator
from typing import Any

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from flux_proxy import FluxProxy
from flux_proxy.admission import Admission, Demand
from flux_proxy.config import DEFAULT_MIDDLEWARES, LimitSettings
from flux_proxy.errors import InvalidRequest, Overloaded, RateLimited
from flux_proxy.hookspecs import RegisterMiddleware, hookimpl
from flux_proxy.imaging import ImageWorker
from flux_proxy.pipeline import CallNext, Layer
from flux_proxy.runtime import Runtime
from flux_proxy.schema import ImageJob, ImageResult
from tests.images import assert_image, make_image
from tests.in_process import generate
from tests.openapi import assert_openai_error
from tests.waiting import wait_for

pytestmark = pytest.mark.anyio

HEAVY, LIGHT = (256, 256), (64, 64)
# Two heavy requests fill the heavy lane; a light one is 64 x 64 at most.
LIMITS = {"light_request_pixels": 64 * 64, "heavy_lane_pixels": 2 * 256 * 256}
# Generous: nothing here should take more than a fraction of it.
PATIENCE = 20.0


class HoldingUpstream:
    """An OpenAI Images upstream that holds every request for more than a light image's
    pixels until ``release`` is set, then answers a real PNG of the size asked for."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.held = 0

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/v1/images/generations", self._generate, methods=["POST"])])

    async def _generate(self, request: Request) -> JSONResponse:
        body = await request.json()
        width, _, height = str(body["size"]).partition("x")
        size = (int(width), int(height))
        if size[0] * size[1] > LIGHT[0] * LIGHT[1]:
            self.held += 1
            await anyio.to_thread.run_sync(self.release.wait, PATIENCE)
        image = base64.b64encode(make_image("png", size)).decode()
        return JSONResponse({"created": 1, "data": [{"b64_json": image}]})


@pytest.fixture
def holding(serve_upstream: Callable[[Any], str]) -> Iterator[tuple[HoldingUpstream, str]]:
    upstream = HoldingUpstream()
    url = serve_upstream(upstream.app())
    try:
        yield upstream, url
    finally:
        upstream.release.set()  # a failed test must not leave the server's thread waiting


def config_for(url: str, **limits: Any) -> dict[str, Any]:
    """The gateway's settings: model ``up`` on the holding upstream, LIMITS and ``limits``."""
    entry = {
        "provider": "openai",
        "base_url": f"{url}/v1",
        "options": {"response_format": "b64_json"},
    }
    return {"limits": {**LIMITS, **limits}, "models": {"up": entry}}


def image_request(size: tuple[int, int], fmt: str) -> dict[str, Any]:
    return {
        "model": "up",
        "prompt": "a harbour",
        "size": f"{size[0]}x{size[1]}",
        "output_format": fmt,
        "response_format": "b64_json",
    }


def image_of(response: httpx.Response) -> bytes:
    assert response.status_code == 200, response.text
    return base64.b64decode(response.json()["data"][0]["b64_json"])


async def test_a_full_heavy_lane_refuses_at_once_and_light_requests_go_by(
    holding: tuple[HoldingUpstream, str], start_gateway: Callable[..., str]
) -> None:
    upstream, url = holding
    gateway = start_gateway(config_for(url))
    heavy = image_request(HEAVY, "avif")  # transcoded by the gateway: real AVIF work
    answers: list[httpx.Response] = []
    async with httpx.AsyncClient(base_url=f"{gateway}/v1", timeout=PATIENCE) as client:

        async def send_heavy() -> None:
            answers.append(await client.post("/images/generations", json=heavy))

        async with anyio.create_task_group() as group:
            group.start_soon(send_heavy)
            group.start_soon(send_heavy)
            # Both admitted and held upstream: the heavy lane is full.
            admitted = await anyio.to_thread.run_sync(
                wait_for, lambda: upstream.held == 2, PATIENCE
            )
            assert admitted

            refused = await client.post("/images/generations", json=heavy)
            error = assert_openai_error(refused, 503)
            assert error["code"] == "overloaded"
            assert int(refused.headers["retry-after"]) > 0
            assert upstream.held == 2  # refused before anything was asked of the upstream

            light = await client.post("/images/generations", json=image_request(LIGHT, "png"))
            assert_image(image_of(light), "png", LIGHT)
            assert not upstream.release.is_set()  # served while the heavy ones were held

            upstream.release.set()
        # The admitted ones complete, and their places are free again.
        again = await client.post("/images/generations", json=heavy)
    assert len(answers) == 2
    for answer in [*answers, again]:
        assert_image(image_of(answer), "avif", HEAVY)


async def test_one_client_key_gets_its_share_of_a_lane_and_the_others_still_get_in(
    holding: tuple[HoldingUpstream, str], start_gateway: Callable[..., str]
) -> None:
    upstream, url = holding
    # Room for three heavy requests; half of it for one key: a second one is over.
    config = config_for(url, heavy_lane_pixels=3 * 256 * 256, client_lane_share=0.5)
    gateway = start_gateway(config, environ={"FLUX_PROXY_API_KEYS": "alice,bob"})
    heavy = image_request(HEAVY, "png")
    answers: list[httpx.Response] = []

    async def post(client: httpx.AsyncClient) -> httpx.Response:
        return await client.post("/images/generations", json=heavy)

    async with (
        httpx.AsyncClient(
            base_url=f"{gateway}/v1", timeout=PATIENCE, headers={"Authorization": "Bearer alice"}
        ) as alice,
        httpx.AsyncClient(
            base_url=f"{gateway}/v1", timeout=PATIENCE, headers={"Authorization": "Bearer bob"}
        ) as bob,
    ):

        async def send(client: httpx.AsyncClient) -> None:
            answers.append(await post(client))

        async with anyio.create_task_group() as group:
            group.start_soon(send, alice)
            assert await anyio.to_thread.run_sync(wait_for, lambda: upstream.held == 1, PATIENCE)
            refused = await post(alice)
            error = assert_openai_error(refused, 429)
            assert error["code"] == "rate_limit_exceeded"
            assert int(refused.headers["retry-after"]) > 0
            group.start_soon(send, bob)  # another key: the lane has room for it
            assert await anyio.to_thread.run_sync(wait_for, lambda: upstream.held == 2, PATIENCE)
            upstream.release.set()
        again = await post(alice)  # its place is back
    for answer in [*answers, again]:
        assert_image(image_of(answer), "png", HEAVY)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"size": "4096x4096", "n": 5}, "n"),  # 5 x 16.7 MP: over max_request_pixels
        ({"size": "4096x4096", "n": 2, "output_format": "avif"}, "output_format"),
    ],
)
async def test_a_request_over_its_pixel_budget_is_400_before_any_work(
    body: dict[str, Any], param: str
) -> None:
    app = FluxProxy({}, environ={})  # the defaults; the local renderer would draw them
    response = await generate(app, prompt="a harbour", **body)
    error = assert_openai_error(response, 400, param)
    assert error["code"] == "too_many_pixels"


def test_a_lane_admits_up_to_its_capacity_and_a_lone_request_always() -> None:
    limits = LimitSettings(light_request_pixels=100, light_lane_pixels=250, heavy_lane_pixels=10)
    admission = Admission(limits)
    light = Demand(pixels=100, n=1, fmt="png")
    first, second = admission.admit(light), admission.admit(light)
    with pytest.raises(Overloaded) as full:
        admission.admit(light)
    assert full.value.headers["Retry-After"] == "1"
    # Heavy (AVIF, or over the light bound) is the other lane; alone, it gets in even
    # above that lane's capacity, and makes the next one wait.
    with admission.admit(Demand(pixels=100, n=1, fmt="avif")), pytest.raises(Overloaded):
        admission.admit(Demand(pixels=101, n=1, fmt="png"))
    with admission.admit(Demand(pixels=101, n=1, fmt="png")):
        pass
    first.release()
    admission.admit(light).release()  # a place came free
    second.release()
    with pytest.raises(InvalidRequest):
        admission.admit(Demand(pixels=limits.max_request_pixels, n=2, fmt="png"))


def test_a_client_keys_share_of_a_lane_is_bounded_and_given_back() -> None:
    limits = LimitSettings(light_request_pixels=100, light_lane_pixels=400, client_lane_share=0.5)
    admission = Admission(limits)
    light = Demand(pixels=100, n=1, fmt="png")
    held = [admission.admit(light, client=0), admission.admit(light, client=0)]
    with pytest.raises(RateLimited) as over:
        admission.admit(light, client=0)  # its half of the lane is in use
    assert over.value.status_code == 429 and over.value.headers["Retry-After"] == "1"
    with admission.admit(light, client=1), admission.admit(light):  # others get in
        pass
    held.pop().release()
    held.pop().release()
    held.append(admission.admit(light, client=0))  # given back, taken again
    held[0].release()
    held[0].release()  # once only: a second release changes nothing
    admission.admit(light, client=0).release()


async def test_light_image_work_runs_while_the_heavy_threads_are_busy() -> None:
    worker = ImageWorker(1, 1, light_pixels=64 * 64)
    release = threading.Event()
    async with anyio.create_task_group() as group:
        group.start_soon(lambda: worker.run(release.wait, PATIENCE, pixels=4096 * 4096))
        group.start_soon(lambda: worker.run(release.wait, PATIENCE))  # size unsaid: heavy
        with anyio.fail_after(PATIENCE):
            assert await worker.run(sum, [1, 2], pixels=64 * 64, fmt="png") == 3
        assert not release.is_set()
        # AVIF is never light work, whatever its size: it waits for the heavy thread.
        with anyio.move_on_after(0.2) as waited:
            await worker.run(sum, [1, 2], pixels=64 * 64, fmt="avif")
        assert waited.cancelled_caught
        release.set()


async def test_a_caller_that_gives_up_frees_itself_not_the_thread() -> None:
    worker = ImageWorker(1)
    started, release, ran = threading.Event(), threading.Event(), []

    def job(name: str) -> str:
        started.set()
        release.wait(PATIENCE)
        ran.append(name)
        return name

    async with anyio.create_task_group() as group:
        waiting = anyio.CancelScope()

        async def first() -> None:
            with waiting:
                await worker.run(job, "first")

        group.start_soon(first)
        assert await anyio.to_thread.run_sync(started.wait, PATIENCE)  # in its thread now
        waiting.cancel()  # the caller gives up: its task ends, the job does not
    assert ran == []
    with anyio.move_on_after(0.1):
        await worker.run(job, "dropped")  # queued behind it; given up before it started
    release.set()
    with anyio.fail_after(PATIENCE):
        assert await worker.run(job, "next") == "next"
    # The first ran to its end before the next one had the thread; the dropped one never ran.
    assert ran == ["first", "next"]


class GatedLayer(Layer):
    """Image work that waits for the test's word, in the gateway's image threads."""

    started = threading.Event()
    release = threading.Event()
    finished = threading.Event()

    def __init__(self, runtime: Runtime, options: object) -> None:
        self._runtime = runtime

    async def __call__(self, job: ImageJob, call_next: CallNext) -> ImageResult:
        # First thing: the deadline below is long next to getting this to its thread.
        await self._runtime.images.run(self._work, pixels=job.n)
        return await call_next(job)

    def _work(self) -> None:
        self.started.set()
        self.release.wait(PATIENCE)
        self.finished.set()


class GatedPlugin:
    @hookimpl
    def register_middlewares(self, register: RegisterMiddleware) -> None:
        register("gated", GatedLayer)


async def test_the_request_deadline_answers_while_pillow_still_works() -> None:
    for event in (GatedLayer.started, GatedLayer.release, GatedLayer.finished):
        event.clear()
    config = {"limits": {"request_timeout": 1.0}, "middlewares": ["gated", *DEFAULT_MIDDLEWARES]}
    app = FluxProxy(config, environ={}, plugins=[GatedPlugin()])
    try:
        response = await generate(app, prompt="a harbour", size="64x64")
        error = assert_openai_error(response, 504)
        assert error["code"] == "upstream_timeout"
        # Answered while the thread's work was still held: the deadline did not wait for it.
        assert GatedLayer.started.is_set() and not GatedLayer.finished.is_set()
    finally:
        GatedLayer.release.set()
    assert await anyio.to_thread.run_sync(GatedLayer.finished.wait, PATIENCE)


async def test_a_stream_holds_its_place_until_it_ends() -> None:
    # Every request heavy, and the lane full with one: a place not given back shows.
    app = FluxProxy({"limits": {"light_request_pixels": 1, "heavy_lane_pixels": 1}}, environ={})
    for _ in range(2):
        response = await generate(app, prompt="a harbour", size="64x64", stream=True)
        assert response.status_code == 200, response.text
        assert "event: image_generation.completed" in response.text
    answer = await generate(app, prompt="a harbour", size="64x64")
    assert answer.status_code == 200, answer.text
