"""The JSON body is assembled by hand for speed; it must still be exactly OpenAI's shape."""

from __future__ import annotations

import base64
import json

from flux_proxy.config import Settings
from flux_proxy.generation import render_json
from flux_proxy.schema import GeneratedImage, ImageRequest, ImageResult, Report
from tests.openapi import assert_matches


def result(*images: GeneratedImage) -> ImageResult:
    return ImageResult(images=list(images), provider="p", report=Report(), output_format="png")


def test_b64_body_with_and_without_revised_prompt():
    request = ImageRequest(prompt="x", response_format="b64_json")
    images = (
        GeneratedImage(data=b"\x00\x01png-bytes", revised_prompt='a "quoted"\nprompt \u00e9'),
        GeneratedImage(data=b"more"),
    )
    response = render_json(request, result(*images), ["prompt", "response_format"], Settings())
    body = json.loads(bytes(response.body))
    assert_matches(body, "ImagesResponse")
    assert body["output_format"] == "png"
    assert base64.b64decode(body["data"][0]["b64_json"]) == b"\x00\x01png-bytes"
    assert body["data"][0]["revised_prompt"] == 'a "quoted"\nprompt \u00e9'
    assert body["data"][1] == {"b64_json": base64.b64encode(b"more").decode()}


def test_url_body():
    request = ImageRequest(prompt="x")
    image = GeneratedImage(url='https://example.test/a.png?x=1&y="2"', revised_prompt="r")
    body = json.loads(bytes(render_json(request, result(image), ["prompt"], Settings()).body))
    assert_matches(body, "ImagesResponse")
    assert body["data"] == [{"url": 'https://example.test/a.png?x=1&y="2"', "revised_prompt": "r"}]


def test_report_verbs_keep_their_precedence() -> None:
    from flux_proxy.schema import Report

    report = Report()
    report.record("seed", "emulated", "image i uses seed + i (from 5)")
    report.suggest("seed", "passthrough", "sent unchanged")  # the layer's note stays
    report.suggest("style", "passthrough", "sent unchanged")
    report.suggest("style", "renamed", "sent as preset")  # refines a plain passthrough
    report.record("size", "emulated", "1920x1080; provider makes 1344x768")
    for _ in range(3):  # one per fan-out call: said once
        report.sent_as("size", "width/height")
    report.fill(["seed", "quality"], "ignored", "not used")
    said = {param: report.says(param) for param in ("seed", "style", "size", "quality")}
    assert {param: (entry.handling if entry else None) for param, entry in said.items()} == {
        "seed": "emulated",
        "style": "renamed",
        "size": "emulated",
        "quality": "ignored",
    }
    size = report.says("size")
    assert size is not None
    assert size.detail == "sent as width/height; 1920x1080; provider makes 1344x768"
