"""The README's "Writing a plugin" provider, run exactly as the README shows it.

The code block is read out of README.md (so the two cannot drift), loaded as a
module, registered as a plugin and driven end to end against a fake upstream that
speaks the made-up protocol the README describes.
"""

from __future__ import annotations

import base64
import json
import re
import types
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from flux_proxy import FluxProxy
from flux_proxy.config import ConfigError
from tests.images import assert_image, make_image
from tests.in_process import generate

KEY = "pixel-key-0123456789abcdef"
UPSTREAM = "http://127.0.0.1:9300"
README = Path(__file__).resolve().parent.parent / "README.md"


def readme_plugin() -> types.ModuleType:
    section = README.read_text().split("### Writing a plugin", 1)[1]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)
    (code,) = [block for block in blocks if block.startswith("# my_plugin.py")]
    module = types.ModuleType("my_plugin")
    exec(compile(code, "README.md: my_plugin.py", "exec"), module.__dict__)
    return module


class PixelApi:
    """The README's made-up API: POST /v1/{model} -> {"url"}; the URL serves a PNG."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.keys: list[str | None] = []

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/v1/{model}", self.generate, methods=["POST"]),
                Route("/files/{width:int}x{height:int}.png", self.file),
            ]
        )

    async def generate(self, request: Request) -> Response:
        self.keys.append(request.headers.get("authorization"))
        body = await request.json()
        self.bodies.append(body)
        if body.get("width", 0) > 2048:
            detail = [{"loc": ["body", "width"], "msg": "must be at most 2048", "type": "x"}]
            return JSONResponse({"detail": detail}, status_code=422)
        base = str(request.base_url).rstrip("/")
        return JSONResponse({"url": f"{base}/files/{body['width']}x{body['height']}.png"})

    async def file(self, request: Request) -> Response:
        size = (request.path_params["width"], request.path_params["height"])
        return Response(make_image("png", size), media_type="image/png")


def gateway(api: PixelApi, **entry: Any) -> FluxProxy:
    return FluxProxy(
        {"models": {"pixel": {"provider": "pixel", "base_url": UPSTREAM, **entry}}},
        environ={"PIXEL_API_KEY": KEY},
        plugins=[readme_plugin()],
        transport=httpx.ASGITransport(app=api.app()),
    )


async def post(app: FluxProxy, **body: Any) -> httpx.Response:
    return await generate(app, **{"model": "pixel", "prompt": "a heron", **body})


@pytest.mark.anyio
async def test_the_readme_provider_serves_exact_sizes_end_to_end() -> None:
    api = PixelApi()
    response = await post(
        gateway(api, options={"quality": 80}),
        size="1000x700",
        seed=5,
        response_format="b64_json",
        style="ink",
    )
    assert response.status_code == 200, response.text
    # The model makes multiples of 16; the gateway resizes its 992x704 to the ask.
    assert_image(base64.b64decode(response.json()["data"][0]["b64_json"]), "png", (1000, 700))
    (body,) = api.bodies
    assert body == {
        "prompt": "a heron",
        "width": 992,
        "height": 704,
        "seed": 5,
        "quality": 80,
        "style": "ink",
    }
    assert api.keys == [f"Bearer {KEY}"]
    report = json.loads(response.headers["x-flux-proxy-params"])
    assert report["size"]["handling"] == "emulated"
    assert report["size"]["detail"].startswith("sent as width=992, height=704")
    assert report["style"]["handling"] == "passthrough"


@pytest.mark.anyio
async def test_the_readme_provider_maps_a_validation_error_to_the_public_parameter() -> None:
    api = PixelApi()
    # The gateway is told the model makes 4096-pixel sides; the upstream's 422 says otherwise.
    response = await post(
        gateway(api, capabilities={"sizes": {"max_side": 4096}}), size="4096x1024"
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "size"
    assert "sent as width" in error["message"] and KEY not in response.text


@pytest.mark.parametrize(
    ("entry", "where"),
    [
        ({"options": {"quality": "high"}}, "options.quality"),
        ({"options": {"qualty": 80}}, "options.qualty"),
        ({"upstream_model": "pixel-9"}, "upstream_model"),
    ],
)
def test_the_readme_provider_checks_its_entry_at_start_up(
    entry: dict[str, Any], where: str
) -> None:
    with pytest.raises(ConfigError, match=f"models.pixel: {re.escape(where)}"):
        gateway(PixelApi(), **entry)
