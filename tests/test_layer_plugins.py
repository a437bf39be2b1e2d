"""A third-party layer package, found through its entry point and configured with options.

tests/fixture_plugins/watermark is installed like any plugin (pip, entry point
group ``flux_proxy``; .ci/run and the README's developer setup install it). Its
layers are configured as ``{name, options}`` entries, checked by the same
composition rules as the built-in ones, and exercised end to end.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest

from flux_proxy import FluxProxy
from flux_proxy.config import ConfigError
from flux_proxy.plugins import load_registry
from tests.images import assert_image, decode
from tests.openapi import assert_openai_error
from tests.test_cli import assert_clean_failure, run

GREEN = (0, 200, 0)
STACK: list[Any] = [
    "response_format",
    "output_format",
    {"name": "prompt_policy", "options": {"blocked_words": ["forbidden"]}},
    {"name": "watermark", "options": {"colour": list(GREEN), "corner": "top-left", "size": 0.5}},
    "size",
    "fanout",
    "passthrough",
]


def config(middlewares: list[Any]) -> dict[str, Any]:
    return {"middlewares": middlewares}


def test_the_entry_point_installs_both_layers() -> None:
    registry = load_registry()
    assert {"watermark", "prompt_policy"} <= set(registry.middlewares)


def test_watermarked_images_through_the_sdk(start_gateway: Callable[..., str]) -> None:
    gateway = start_gateway(config(STACK))
    client = openai.OpenAI(base_url=f"{gateway}/v1", api_key="unused", max_retries=0)
    result = client.images.generate(
        model="flux1.1-pro", prompt="a castle", size="96x64", n=2, response_format="b64_json"
    )
    assert result.data is not None and len(result.data) == 2
    for item in result.data:
        image = assert_image(base64.b64decode(item.b64_json or ""), "png", (96, 64)).convert("RGB")
        # The band covers half the smaller side from the top-left corner; the rest is
        # the rendered picture. The gateway resized first, then stamped, then encoded.
        assert image.getpixel((0, 0)) == GREEN
        assert image.getpixel((31, 31)) == GREEN
        assert image.getpixel((95, 63)) != GREEN

    hosted = client.images.generate(
        model="flux1.1-pro",
        prompt="a castle",
        size="64x64",
        response_format="url",
        extra_body={"output_format": "webp", "output_compression": 100},
    )
    assert hosted.data is not None and hosted.data[0].url
    data = httpx.get(hosted.data[0].url, timeout=10).content
    webp = assert_image(data, "webp", (64, 64)).convert("RGB")
    red, green, blue = webp.getpixel((4, 20))  # type: ignore[misc]
    assert red < 40 and green > 160 and blue < 40, (red, green, blue)


def test_prompt_policy_refuses_before_anything_is_spent(start_gateway: Callable[..., str]) -> None:
    gateway = start_gateway(config(STACK))
    for stream in (False, True):
        response = httpx.post(
            f"{gateway}/v1/images/generations",
            json={"prompt": "a Forbidden castle", "stream": stream},
            timeout=10,
        )
        # Streaming too: the check runs before the 200 and the event stream begin.
        error = assert_openai_error(response, 400, param="prompt")
        assert error["code"] == "content_policy_violation"
        assert "forbidden" in error["message"]


def test_a_pixel_changing_plugin_layer_obeys_the_order_rules() -> None:
    stack = ["response_format", "watermark", "output_format", "size"]
    with pytest.raises(ConfigError) as refused:
        FluxProxy(config(stack), environ={})
    message = str(refused.value)
    assert "'watermark' (middlewares[1])" in message
    assert "'output_format' (middlewares[2])" in message


@pytest.mark.parametrize(
    ("entry", "index", "named"),
    [
        ({"name": "watermark", "options": {"size": 2}}, 3, "middlewares[3].options.size"),
        ({"name": "watermark", "options": {"colour": "pink"}}, 3, "middlewares[3].options.colour"),
        ({"name": "prompt_policy", "options": {}}, 3, "middlewares[3].options.blocked_words"),
        ({"name": "size", "options": {"bogus": 1}}, 3, "middlewares[3].options.bogus"),
        ({"name": "output_format", "options": {"quality": 500}}, 1, ".options.quality"),
    ],
)
def test_bad_layer_options_name_the_key(entry: dict[str, Any], index: int, named: str) -> None:
    stack: list[Any] = ["response_format", "output_format", "fanout", "passthrough"]
    if entry["name"] == "output_format":
        stack[1] = entry
    else:
        stack[index] = entry
    with pytest.raises(ConfigError) as refused:
        FluxProxy(config(stack), environ={})
    assert named in str(refused.value)


def test_a_layer_listed_twice_is_refused() -> None:
    with pytest.raises(ConfigError) as refused:
        FluxProxy(config(["response_format", "size", "size"]), environ={})
    message = str(refused.value)
    assert "middlewares[2]" in message and "'size'" in message and "twice" in message


@pytest.mark.anyio
async def test_output_format_quality_option_applies_when_the_client_sends_none() -> None:
    async def jpeg_bytes(middlewares: list[Any]) -> bytes:
        app = FluxProxy(config(middlewares), environ={})
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw.test") as http:
            response = await http.post(
                "/v1/images/generations",
                json={
                    "prompt": "a harbour",
                    "size": "256x256",
                    "seed": 7,
                    "output_format": "jpeg",
                    "response_format": "b64_json",
                },
            )
        assert response.status_code == 200, response.text
        data = base64.b64decode(response.json()["data"][0]["b64_json"])
        assert_image(data, "jpeg", (256, 256))
        return data

    plain = await jpeg_bytes(["response_format", "output_format", "size"])
    rough = await jpeg_bytes(
        ["response_format", {"name": "output_format", "options": {"quality": 5}}, "size"]
    )
    assert len(rough) < len(plain) * 0.6, (len(rough), len(plain))
    assert decode(rough).size == decode(plain).size


def test_a_bad_stack_stops_the_cli_with_exit_2(tmp_path: Any) -> None:
    path = tmp_path / "stack.yaml"
    path.write_text("middlewares: [size, response_format]\n")
    result = run("serve", "--config", str(path))
    assert result.returncode == 2
    stderr = assert_clean_failure(result)
    assert "'size' (middlewares[0])" in stderr and "'response_format'" in stderr
