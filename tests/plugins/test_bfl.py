"""The Black Forest Labs plugin, end to end: the official openai SDK -> gateway -> BFL emulator.

Every test runs the real emulator over loopback HTTP and looks at what it received:
native field names, values and JSON types, the x-key header, and that polls went to
the polling_url BFL handed out rather than one the gateway built.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any
from urllib.parse import urlsplit

import httpx
import httpx2
import openai
import pytest
from starlette.testclient import TestClient

from flux_proxy.config import ConfigError
from flux_proxy.errors import UpstreamError
from flux_proxy.hosts import KeyHosts
from flux_proxy.plugins import load_registry
from flux_proxy_bfl.emulator import BflEmulator
from flux_proxy_bfl.provider import BflProvider
from tests.images import assert_image, data_of, decode
from tests.openapi import assert_openai_error
from tests.servers import serve
from tests.sse import stream_events

SECRET = "bfl-test-key-5f0c2d9a7b3e41c8"
KEY_ENV = "BFL_TEST_KEY"

Started = tuple[BflEmulator, str]


@pytest.fixture(scope="module")
def served_emulator() -> Iterator[Started]:
    # One server for the module (starting and stopping uvicorn is most of a test's time);
    # each test resets it through the `bfl` fixture.
    emulator = BflEmulator()
    with serve(emulator.app()) as url:
        yield emulator, url


@pytest.fixture
def bfl(served_emulator: Started) -> Iterator[Callable[..., Started]]:
    """The emulator reset with the given knobs (fast polls by default): (emulator, base URL)."""
    emulator, url = served_emulator

    def start(**knobs: Any) -> Started:
        emulator.reset(**{"api_key": SECRET, "retry_after": "0", **knobs})
        return emulator, url

    start()
    yield start
    emulator.reset()


def config(url: str, **entry: Any) -> dict[str, Any]:
    common = {"provider": "bfl", "base_url": url, "api_key_env": KEY_ENV}
    return {
        "models": {
            "flux1.1-pro": {**common, **entry},
            "flux-ultra": {**common, "upstream_model": "flux-pro-1.1-ultra", **entry},
        }
    }


def gateway_for(start_gateway: Callable[..., str], url: str, **settings: Any) -> str:
    entry = settings.pop("entry", {})
    return start_gateway({**config(url, **entry), **settings}, environ={KEY_ENV: SECRET})


def sdk(gateway: str, timeout: float = 20) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway}/v1", api_key="x", max_retries=0, timeout=timeout)


def post(gateway: str, **body: Any) -> httpx.Response:
    return httpx.post(
        f"{gateway}/v1/images/generations",
        json={"model": "flux1.1-pro", "prompt": "a kestrel", **body},
        timeout=20,
    )


def report_of(headers: Mapping[str, str]) -> dict[str, dict[str, str]]:
    report: dict[str, dict[str, str]] = json.loads(headers["x-flux-proxy-params"])
    return report


# -- the happy path ---------------------------------------------------------------------


def test_generate_sends_the_native_body_and_follows_the_polling_url(bfl, start_gateway):
    emulator, url = bfl(polls_before_ready=2)
    gateway = gateway_for(start_gateway, url)
    raw = sdk(gateway).images.with_raw_response.generate(
        model="flux1.1-pro",
        prompt="a kestrel",
        size="256x256",
        response_format="b64_json",
        output_format="webp",
        extra_body={
            "seed": 7,
            "safety_tolerance": 6,
            "prompt_upsampling": True,
            "image_prompt": "aGVsbG8=",
        },
    )
    result = raw.parse()
    assert_image(base64.b64decode(data_of(result)[0].b64_json or ""), "webp", (256, 256))
    # prompt_upsampling: BFL's rewritten prompt comes back as OpenAI's revised_prompt.
    assert (data_of(result)[0].revised_prompt or "").startswith("a kestrel, ")

    (submit,) = emulator.submits
    assert submit.method == "POST" and submit.path == "/v1/flux-pro-1.1"
    assert submit.headers["x-key"] == SECRET
    assert submit.body == {
        "prompt": "a kestrel",
        "width": 256,
        "height": 256,
        "seed": 7,
        "output_format": "webp",
        "safety_tolerance": 6,
        "prompt_upsampling": True,
        "image_prompt": "aGVsbG8=",
    }
    assert type(submit.body["safety_tolerance"]) is int
    assert submit.body["prompt_upsampling"] is True

    (task_id,) = emulator.tasks
    polls = emulator.polls
    assert len(polls) == 3  # two Pending, then Ready
    for poll in polls:
        # The URL BFL handed out, on another path than the submit: followed as given.
        assert poll.url == f"{url}/v1/get_result?id={task_id}"
        assert poll.headers["x-key"] == SECRET
    (download,) = emulator.downloads
    assert {"se", "sig", "sp", "rsct"} <= set(download.query)
    assert "x-key" not in download.headers  # the key goes to BFL's API, not its CDN

    report = report_of(raw.headers)
    assert report["size"]["handling"] == "converted"
    assert report["size"]["detail"].startswith("sent as width=256, height=256")
    for name in ("safety_tolerance", "prompt_upsampling", "image_prompt", "seed", "prompt"):
        assert report[name]["handling"] == "passthrough", (name, report[name])
    assert report["output_format"]["handling"] == "passthrough"
    assert report["response_format"]["handling"] == "emulated"
    assert raw.headers["x-flux-proxy-provider"] == "bfl"


def test_sizes_types_and_compression_are_converted_or_emulated(bfl, start_gateway):
    emulator, url = bfl()
    gateway = gateway_for(start_gateway, url)
    response = post(
        gateway,
        size="1920x1080",
        output_format="jpeg",
        output_compression=50,
        safety_tolerance="5",
        prompt_upsampling="false",
    )
    assert response.status_code == 200, response.text
    image = httpx.get(response.json()["data"][0]["url"]).content
    assert_image(image, "jpeg", (1920, 1080))

    body = emulator.submits[0].body
    # 1920x1080 is over BFL's 1440 cap: the nearest it makes, multiples of 32.
    assert (body["width"], body["height"]) == (1440, 800)
    # BFL has no quality field, so the gateway asks for lossless png and encodes jpeg at 50.
    assert body["output_format"] == "png"
    assert body["safety_tolerance"] == 5 and type(body["safety_tolerance"]) is int
    assert body["prompt_upsampling"] is False
    assert "seed" not in body

    report = report_of(response.headers)
    assert report["size"]["handling"] == "emulated"
    assert "sent as width=1440, height=800" in report["size"]["detail"]
    assert "gateway resizes to 1920x1080" in report["size"]["detail"]
    assert report["output_compression"]["handling"] == "emulated"
    assert report["output_format"]["handling"] == "emulated"
    assert report["safety_tolerance"]["handling"] == "converted"
    assert report["prompt_upsampling"]["handling"] == "converted"


def test_n_is_one_task_per_image_with_consecutive_seeds(bfl, start_gateway):
    emulator, url = bfl()
    gateway = gateway_for(start_gateway, url)
    result = sdk(gateway).images.generate(
        model="flux1.1-pro",
        prompt="a kestrel",
        n=2,
        size="256x256",
        response_format="b64_json",
        extra_body={"seed": 10},
    )
    pixels = set()
    for item in data_of(result):
        image = assert_image(base64.b64decode(item.b64_json or ""), "png", (256, 256))
        pixels.add(image.convert("RGB").getpixel((0, 0)))
    assert len(pixels) == 2  # the emulator colours by seed: two seeds, two pictures
    assert sorted(submit.body["seed"] for submit in emulator.submits) == [10, 11]
    assert len(emulator.tasks) == 2


def test_ultra_gets_an_aspect_ratio_instead_of_pixels(bfl, start_gateway):
    emulator, url = bfl()
    gateway = gateway_for(start_gateway, url)
    response = post(
        gateway, model="flux-ultra", size="640x360", raw=True, response_format="b64_json"
    )
    assert response.status_code == 200, response.text
    assert_image(base64.b64decode(response.json()["data"][0]["b64_json"]), "png", (640, 360))
    body = emulator.submits[0].body
    assert emulator.submits[0].path == "/v1/flux-pro-1.1-ultra"
    assert body == {
        "prompt": "a kestrel",
        "aspect_ratio": "16:9",
        "output_format": "png",
        "raw": True,
    }
    report = report_of(response.headers)
    assert report["size"]["handling"] == "emulated"
    assert report["size"]["detail"].startswith("sent as aspect_ratio=16:9")

    # A shape at the 2K tier is exactly Ultra's native size: converted, no resize.
    response = post(
        gateway,
        model="flux-ultra",
        aspect_ratio="21:9",
        resolution="2K",
        response_format="b64_json",
    )
    assert response.status_code == 200, response.text
    assert_image(base64.b64decode(response.json()["data"][0]["b64_json"]), "png", (3136, 1344))
    assert emulator.submits[1].body["aspect_ratio"] == "21:9"
    report = report_of(response.headers)
    assert report["aspect_ratio"]["handling"] == "converted"
    assert report["aspect_ratio"]["detail"].startswith("sent as aspect_ratio=21:9")


# -- what the gateway refuses before calling BFL ------------------------------------------


@pytest.mark.parametrize(
    ("model", "extra", "param"),
    [
        ("flux1.1-pro", {"safety_tolerance": 7}, "safety_tolerance"),
        ("flux1.1-pro", {"safety_tolerance": "lenient"}, "safety_tolerance"),
        ("flux-ultra", {"image_prompt_strength": 2}, "image_prompt_strength"),
        ("flux1.1-pro", {"webhook_url": "https://example.com/hook"}, "webhook_url"),
    ],
)
def test_invalid_fields_are_400s_naming_the_field(bfl, start_gateway, model, extra, param):
    emulator, url = bfl()
    gateway = gateway_for(start_gateway, url)
    assert_openai_error(post(gateway, model=model, size="256x256", **extra), 400, param)
    assert emulator.requests == []


def test_safety_tolerance_zero_is_bfls_own_and_allowed(bfl, start_gateway):
    emulator, url = bfl()
    gateway = gateway_for(start_gateway, url)
    assert post(gateway, size="256x256", safety_tolerance=0).status_code == 200
    assert emulator.submits[0].body["safety_tolerance"] == 0


def test_client_width_and_height_are_ignored_in_favour_of_size(bfl, start_gateway):
    emulator, url = bfl()
    gateway = gateway_for(start_gateway, url)
    response = post(gateway, size="256x256", width=1024, height=1024, response_format="b64_json")
    assert response.status_code == 200, response.text
    assert (emulator.submits[0].body["width"], emulator.submits[0].body["height"]) == (256, 256)
    report = report_of(response.headers)
    assert report["width"]["handling"] == report["height"]["handling"] == "ignored"


# -- BFL's unhappy endings -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("prompt", "status"),
    [("please moderate this", "Request Moderated"), ("moderate-output", "Content Moderated")],
)
def test_moderation_is_a_content_policy_violation(bfl, start_gateway, prompt, status):
    emulator, url = bfl()
    gateway = gateway_for(start_gateway, url)
    error = assert_openai_error(post(gateway, prompt=prompt, size="256x256"), 400)
    assert error["code"] == "content_policy_violation"
    assert status in error["message"] and "Sexual Content" in error["message"]
    assert emulator.downloads == []


@pytest.mark.parametrize(("prompt", "said"), [("explode", "'Error'"), ("forget", "Task not found")])
def test_failed_or_lost_tasks_are_502s(bfl, start_gateway, prompt, said):
    _, url = bfl()
    gateway = gateway_for(start_gateway, url)
    error = assert_openai_error(post(gateway, prompt=prompt, size="256x256"), 502)
    assert error["code"] == "upstream_error"
    assert said in error["message"]


@pytest.mark.parametrize(
    ("knobs", "status", "code"),
    [
        ({"api_key": "another-key"}, 502, "upstream_auth_failed"),
        ({"credits": 0.0}, 502, "upstream_insufficient_credit"),
        ({"max_active_tasks": 0, "rate_limit_retry_after": "7"}, 429, "rate_limit_exceeded"),
    ],
)
def test_upstream_errors_are_mapped_and_never_leak_the_key(bfl, start_gateway, knobs, status, code):
    emulator, url = bfl(**knobs)
    gateway = gateway_for(start_gateway, url)
    response = post(gateway, size="256x256")
    error = assert_openai_error(response, status)
    assert error["code"] == code
    assert SECRET not in response.text
    assert emulator.submits[0].headers["x-key"] == SECRET
    if status == 429:
        assert response.headers["retry-after"] == "7"


@pytest.mark.parametrize(
    ("entry", "body", "bfl_field", "param"),
    [
        # The gateway is told BFL makes 2048-pixel sides; BFL's own 422 says otherwise.
        ({"capabilities": {"sizes": {"max_side": 2048}}}, {"size": "2048x2048"}, "width", "size"),
        (
            {"capabilities": {"fields": {"safety_tolerance": {"type": "integer"}}}},
            {"safety_tolerance": 9},
            "safety_tolerance",
            "safety_tolerance",
        ),
    ],
)
def test_bfl_422_is_a_400_naming_the_public_parameter(
    bfl, start_gateway, entry, body, bfl_field, param
):
    emulator, url = bfl()
    gateway = gateway_for(start_gateway, url, entry=entry)
    error = assert_openai_error(post(gateway, **{"size": "256x256", **body}), 400, param)
    assert "less than or equal to" in error["message"]
    assert emulator.submits and emulator.polls == []
    if bfl_field != param:
        assert f"sent as {bfl_field}" in error["message"]


def test_missing_key_names_bfls_conventional_variable(bfl, start_gateway):
    emulator, url = bfl(api_key="emulator-key")
    entry = {"provider": "bfl", "base_url": url}  # no api_key_env: BFL_API_KEY
    gateway = start_gateway({"models": {"flux1.1-pro": entry}}, environ={})
    error = assert_openai_error(post(gateway, size="256x256"), 502)
    assert error["code"] == "upstream_credentials_missing"
    assert "BFL_API_KEY" in error["message"]
    assert emulator.requests == []

    gateway = start_gateway(
        {"models": {"flux1.1-pro": entry}}, environ={"BFL_API_KEY": "emulator-key"}
    )
    assert post(gateway, size="256x256").status_code == 200
    assert emulator.submits[0].headers["x-key"] == "emulator-key"


# -- polling -------------------------------------------------------------------------------


def test_a_polling_url_on_another_host_is_followed_as_given(bfl, start_gateway):
    emulator, url = bfl()
    port = urlsplit(url).port
    emulator.polling_base = f"http://localhost:{port}"  # same server, another host form
    gateway = gateway_for(
        start_gateway,
        url,
        entry={"options": {"polling_hosts": ["localhost"]}},
        fetch={"allow_private_hosts": ["localhost"]},
    )
    assert post(gateway, size="256x256").status_code == 200
    assert emulator.submits[0].headers["host"] == f"127.0.0.1:{port}"
    assert [poll.headers["host"] for poll in emulator.polls] == [f"localhost:{port}"] * 2


def test_the_key_is_not_sent_to_a_polling_host_that_is_not_bfls(bfl, start_gateway):
    emulator, url = bfl()
    emulator.polling_base = f"http://localhost:{urlsplit(url).port}"
    gateway = gateway_for(start_gateway, url, fetch={"allow_private_hosts": ["localhost"]})
    error = assert_openai_error(post(gateway, size="256x256"), 502)
    assert "trusted_hosts" in error["message"]
    assert len(emulator.submits) == 1 and emulator.polls == []


def test_a_polling_url_on_an_untrusted_private_host_is_refused(bfl, start_gateway):
    emulator, url = bfl()
    emulator.polling_base = f"http://localhost:{urlsplit(url).port}"
    gateway = gateway_for(start_gateway, url, entry={"options": {"polling_hosts": ["localhost"]}})
    error = assert_openai_error(post(gateway, size="256x256"), 502)
    assert "private address" in error["message"]
    assert len(emulator.submits) == 1 and emulator.polls == []


def test_retry_after_is_honoured(bfl, start_gateway):
    # Without BFL's hint the provider would first wait poll_interval = 30 s, far past the
    # client's 10 s timeout; Retry-After: 0 from BFL is what lets the request finish.
    emulator, url = bfl(polls_before_ready=3, retry_after="0")
    options = {"poll_interval": 30, "poll_max_interval": 30}
    gateway = gateway_for(start_gateway, url, entry={"options": options})
    result = sdk(gateway, timeout=10).images.generate(
        model="flux1.1-pro", prompt="a kestrel", size="256x256", response_format="b64_json"
    )
    assert len(data_of(result)) == 1
    assert len(emulator.polls) == 4


def test_progress_is_streamed_from_polls(bfl, start_gateway):
    _, url = bfl(polls_before_ready=3)
    gateway = gateway_for(start_gateway, url)
    events = stream_events(
        gateway,
        {"model": "flux1.1-pro", "prompt": "a kestrel", "size": "256x256", "stream": True},
        timeout=20,
    )
    progress = [event for event in events if event["type"] == "flux_proxy.progress"]
    assert [event["status"] for event in progress] == ["Pending"] * 3 + ["Ready"]
    assert [event["progress"] for event in progress] == [None, 0.33, 0.67, None]
    assert {event["provider"] for event in progress} == {"bfl"}
    (completed,) = [event for event in events if event["type"] == "image_generation.completed"]
    assert_image(base64.b64decode(completed["b64_json"]), "png", (256, 256))


def test_poll_timeout_option_is_a_504(bfl, start_gateway):
    _, url = bfl(polls_before_ready=10**6, retry_after="0.05")
    gateway = gateway_for(start_gateway, url, entry={"options": {"poll_timeout": 0.5}})
    error = assert_openai_error(post(gateway, size="256x256"), 504)
    assert error["code"] == "upstream_timeout"
    assert "poll_timeout" in error["message"]


def test_a_request_past_its_deadline_stops_polling(bfl, start_gateway):
    # BFL has no cancel endpoint: all the gateway can (and must) do is stop polling.
    emulator, url = bfl(polls_before_ready=10**6, retry_after="0.05")
    gateway = gateway_for(start_gateway, url, limits={"request_timeout": 1})
    assert_openai_error(post(gateway, size="256x256"), 504)
    deadline = time.monotonic() + 5
    seen = -1
    while len(emulator.polls) != seen:
        assert time.monotonic() < deadline, "the gateway kept polling after the request ended"
        seen = len(emulator.polls)
        time.sleep(0.3)
    assert seen > 0
    assert {(r.method, r.kind) for r in emulator.requests} == {("POST", "submit"), ("GET", "poll")}


# -- configuration -------------------------------------------------------------------------


def test_the_plugin_registers_its_provider_and_emulator():
    registry = load_registry()
    assert registry.providers["bfl"] is BflProvider
    assert "bfl" in registry.emulators


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"upstream_model": "flux-dev"}, "flux-dev"),
        ({"options": {"poll_timout": 3}}, "options.poll_timout"),
    ],
)
def test_bad_model_entries_fail_at_startup(start_gateway, entry, message):
    with pytest.raises(ConfigError, match=message):
        start_gateway({"models": {"m": {"provider": "bfl", **entry}}})


# -- the emulator itself -------------------------------------------------------------------


@pytest.fixture
def emulated() -> Iterator[tuple[BflEmulator, TestClient]]:
    # In process (no server): these tests look only at the emulator's own answers.
    emulator = BflEmulator(polls_before_ready=0, retry_after="1")
    with TestClient(emulator.app()) as client:
        yield emulator, client


def submit(
    client: TestClient,
    body: dict[str, Any],
    path: str = "/v1/flux-pro-1.1",
    key: str = "emulator-key",
) -> httpx2.Response:  # what starlette's TestClient answers with
    return client.post(path, json=body, headers={"x-key": key})


@pytest.mark.parametrize(
    ("path", "body", "loc", "kind"),
    [
        ("/v1/flux-pro-1.1", {"width": 128}, "width", "greater_than_equal"),
        ("/v1/flux-pro-1.1", {"height": 1472}, "height", "less_than_equal"),
        ("/v1/flux-pro-1.1", {"width": 300}, "width", "multiple_of"),
        ("/v1/flux-pro-1.1", {"safety_tolerance": 7}, "safety_tolerance", "less_than_equal"),
        ("/v1/flux-pro-1.1", {"output_format": "gif"}, "output_format", "literal_error"),
        ("/v1/flux-pro-1.1-ultra", {"aspect_ratio": "4:1"}, "aspect_ratio", "value_error"),
    ],
)
def test_emulator_validates_like_bfls_fastapi(emulated, path, body, loc, kind):
    emulator, client = emulated
    response = submit(client, {"prompt": "x", **body}, path)
    assert response.status_code == 422
    (error,) = response.json()["detail"]
    assert error["loc"] == ["body", loc]
    assert error["type"] == kind
    assert isinstance(error["msg"], str) and error["msg"]
    assert emulator.tasks == {}


def test_emulator_auth_and_unknown_paths(emulated):
    _, client = emulated
    response = submit(client, {"prompt": "x"}, key="wrong")
    assert (response.status_code, response.json()) == (
        403,
        {"detail": "Not authenticated - Invalid Authentication"},
    )
    assert client.post("/v1/flux-pro-1.1", json={"prompt": "x"}).status_code == 403
    response = submit(client, {"prompt": "x"}, "/v1/flux-pro-9")
    assert (response.status_code, response.json()) == (404, {"detail": "Not Found"})
    response = client.get("/v1/get_result?id=nope", headers={"x-key": "emulator-key"})
    assert response.status_code == 200
    assert response.json()["status"] == "Task not found"


def test_emulator_polling_url_and_result(emulated):
    _, client = emulated
    body = {"prompt": "x", "width": 256, "height": 512, "output_format": "png"}
    task = submit(client, body).json()
    assert set(task) == {"id", "polling_url", "cost", "input_mp", "output_mp"}
    assert task["polling_url"] == f"http://testserver/v1/get_result?id={task['id']}"
    polled = client.get(task["polling_url"], headers={"x-key": "emulator-key"})
    assert polled.headers["retry-after"] == "1"
    answer = polled.json()
    assert answer["status"] == "Ready"
    assert set(answer) == {"id", "status", "result", "progress", "details", "preview"}
    assert_image(client.get(answer["result"]["sample"]).content, "png", (256, 512))


def test_emulator_result_urls_are_signed_and_expire():
    now = [1_750_000_000.0]
    emulator = BflEmulator(polls_before_ready=0, url_ttl=600, clock=lambda: now[0])
    with TestClient(emulator.app()) as client:
        task = submit(client, {"prompt": "x", "width": 256, "height": 256}).json()
        answer = client.get(task["polling_url"], headers={"x-key": "emulator-key"}).json()
        sample_url = answer["result"]["sample"]
        assert decode(client.get(sample_url).content).format == "JPEG"  # BFL's default

        tampered = sample_url.replace("sig=", "sig=x")
        assert client.get(tampered).status_code == 403

        now[0] += 601  # ten minutes and a second later
        expired = client.get(sample_url)
        assert expired.status_code == 403
        assert "AuthenticationFailed" in expired.text


@pytest.mark.parametrize(
    ("polling_url", "allowed"),
    [
        ("https://api.eu2.bfl.ai/v1/get_result?id=1", True),
        ("https://gateway.bfl.ai/v1/get_result?id=1", True),
        ("https://api.bfl.ml/v1/get_result?id=1", True),
        ("https://api.bfl.ai.example.com/v1/get_result?id=1", False),
        ("https://notbfl.ai/v1/get_result?id=1", False),
    ],
)
def test_polling_hosts_that_get_the_key(polling_url, allowed):
    hosts = KeyHosts("bfl", BflProvider.key_hosts, "https://api.bfl.ai")
    assert hosts.allows(polling_url) is allowed
    if not allowed:
        with pytest.raises(UpstreamError):
            hosts.check(polling_url, "polling URL")
