"""The official openai SDK against a real gateway on loopback (embedded default config)."""

from __future__ import annotations

import base64
import json

import httpx
import openai

from tests.images import assert_image, data_of, decode
from tests.openapi import assert_matches


def test_url_response_downloads_as_png_of_the_asked_size(client: openai.OpenAI) -> None:
    result = client.images.generate(model="flux1.1-pro", prompt="a lighthouse", size="1024x1024")
    assert len(data_of(result)) == 1
    url = data_of(result)[0].url
    assert url is not None and "/v1/images/files/" in url
    download = httpx.get(url)
    assert download.status_code == 200
    assert download.headers["content-type"] == "image/png"
    assert_image(download.content, "png", (1024, 1024))


def test_b64_json_decodes_to_the_image(client: openai.OpenAI) -> None:
    result = client.images.generate(
        model="flux-pro-1.1", prompt="a lighthouse", size="640x480", response_format="b64_json"
    )
    assert data_of(result)[0].url is None
    assert_image(base64.b64decode(data_of(result)[0].b64_json or ""), "png", (640, 480))


def test_raw_response_matches_openai_schema_and_carries_the_report(client: openai.OpenAI) -> None:
    raw = client.images.with_raw_response.generate(
        model="flux1.1-pro", prompt="a lighthouse", size="16:9", n=2, extra_body={"seed": 7}
    )
    body = json.loads(raw.text)
    assert_matches(body, "ImagesResponse")
    assert len(body["data"]) == 2
    report = json.loads(raw.headers["x-flux-proxy-params"])
    assert set(report) == {"model", "prompt", "size", "n", "seed"}
    assert report["size"]["handling"] == "converted"
    assert "1365x768" in report["size"]["detail"]
    assert report["n"]["handling"] == "emulated"
    assert raw.headers["x-flux-proxy-provider"] == "local"


def test_extra_body_parameters_are_accepted_and_reported(client: openai.OpenAI) -> None:
    raw = client.images.with_raw_response.generate(
        model="flux1.1-pro",
        prompt="a lighthouse",
        extra_body={"aspect_ratio": "3:2", "resolution": "0.5K", "safety_tolerance": 2},
        response_format="b64_json",
    )
    image = data_of(raw.parse())[0].b64_json or ""
    assert_image(base64.b64decode(image), "png", (627, 418))
    report = json.loads(raw.headers["x-flux-proxy-params"])
    assert report["aspect_ratio"]["handling"] == "converted"
    # The local renderer has no safety checker: it says so instead of pretending.
    assert report["safety_tolerance"]["handling"] == "ignored"


def test_models_lists_configured_models_and_aliases(client: openai.OpenAI, gateway: str) -> None:
    ids = [model.id for model in client.models.list()]
    assert ids == ["flux1.1-pro", "flux-pro-1.1"]
    raw = httpx.get(f"{gateway}/v1/models").json()
    assert_matches(raw, "ListModelsResponse")
    assert "placeholder" in raw["data"][0]["description"]
    one = client.models.retrieve("flux-pro-1.1")
    assert one.owned_by == "flux-proxy:local"


def test_local_renderer_is_deterministic_per_prompt_and_seed(client: openai.OpenAI) -> None:
    def pixels(prompt: str, seed: int) -> bytes:
        result = client.images.generate(
            model="flux1.1-pro",
            prompt=prompt,
            size="256x256",
            response_format="b64_json",
            extra_body={"seed": seed},
        )
        return decode(base64.b64decode(data_of(result)[0].b64_json or "")).tobytes()

    assert pixels("a fox", 1) == pixels("a fox", 1)
    assert pixels("a fox", 1) != pixels("a fox", 2)
    assert pixels("a fox", 1) != pixels("a cat", 1)


def test_width_and_height_fields_mean_exact_pixels(client: openai.OpenAI) -> None:
    for extra in (
        {"width": 800, "height": 600},
        {"aspect_ratio": "custom", "width": 800, "height": 600},
        {"size": " Auto ", "width": 800, "height": 600},  # auto, as every layer reads it
    ):
        raw = client.images.with_raw_response.generate(
            model="flux1.1-pro", prompt="x", response_format="b64_json", extra_body=extra
        )
        assert_image(base64.b64decode(data_of(raw.parse())[0].b64_json or ""), "png", (800, 600))
        report = json.loads(raw.headers["x-flux-proxy-params"])
        assert report["width"] == {"handling": "converted", "detail": "exact size 800x600"}


def test_custom_aspect_ratio_without_pixels_is_400(gateway: str) -> None:
    response = httpx.post(
        f"{gateway}/v1/images/generations",
        json={"model": "flux1.1-pro", "prompt": "x", "aspect_ratio": "custom"},
    )
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "aspect_ratio"


def test_null_parameters_are_reported_as_defaults(gateway: str) -> None:
    response = httpx.post(
        f"{gateway}/v1/images/generations",
        json={
            "model": "flux1.1-pro",
            "prompt": "x",
            "size": None,
            "seed": None,
            "n": None,
            "response_format": "b64_json",
        },
    )
    assert response.status_code == 200
    report = json.loads(response.headers["x-flux-proxy-params"])
    assert report["size"] == {"handling": "ignored", "detail": "null: the default applies"}
    assert report["seed"]["detail"] == "null: the default applies"
    # n's default is 1, not None: null still means the default, never a 400.
    assert report["n"] == {"handling": "ignored", "detail": "null: the default applies"}
    (item,) = response.json()["data"]
    assert_image(base64.b64decode(item["b64_json"]), "png", (1024, 1024))


def test_null_prompt_is_still_a_400(gateway: str) -> None:
    response = httpx.post(
        f"{gateway}/v1/images/generations", json={"model": "flux1.1-pro", "prompt": None}
    )
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "prompt"
