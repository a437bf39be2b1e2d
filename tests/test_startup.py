"""What the gateway says as it starts (unset provider keys, a summary), and the
request-time error for unset keys across a failover list. In process: no upstream
is reached, a missing key stops each provider before it sends anything."""

from __future__ import annotations

import logging
from typing import Any

import httpx
import pytest

from flux_proxy import FluxProxy
from tests.openapi import assert_openai_error

SECRET = "sk-startup-secret-value"

FAILOVER: dict[str, Any] = {
    "flux1.1-pro": {
        "aliases": ["flux-pro-1.1"],
        "providers": [{"provider": "bfl"}, {"provider": "fal"}, {"provider": "replicate"}],
    },
    "flux-bfl": {"provider": "bfl"},
    "relay": {
        "provider": "openai",
        "base_url": "http://upstream.test/v1",
        "api_key_env": "RELAY_KEY",
    },
    "sketch": {"provider": "local"},
}


def records(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == level and r.name == "flux_proxy"]


def test_each_unset_key_variable_is_warned_about_once(caplog):
    with caplog.at_level(logging.INFO, logger="flux_proxy"):
        FluxProxy({"models": FAILOVER}, environ={"FAL_KEY": SECRET})
    warnings = records(caplog, logging.WARNING)
    assert len(warnings) == 3, warnings
    bfl, replicate, relay = warnings
    assert "BFL_API_KEY is not set" in bfl
    assert "bfl cannot serve flux1.1-pro, flux-bfl" in bfl
    assert "REPLICATE_API_TOKEN is not set" in replicate
    assert "replicate cannot serve flux1.1-pro" in replicate
    assert "RELAY_KEY is not set" in relay and "openai cannot serve relay" in relay
    assert not any("FAL_KEY" in warning for warning in warnings)  # it is set
    assert SECRET not in caplog.text


def test_no_warning_when_every_key_is_set_or_none_is_needed(caplog):
    environ = {"BFL_API_KEY": SECRET, "FAL_KEY": SECRET, "REPLICATE_API_TOKEN": SECRET}
    with caplog.at_level(logging.INFO, logger="flux_proxy"):
        FluxProxy({"models": {**FAILOVER, "relay": {"provider": "local"}}}, environ=environ)
        FluxProxy({}, environ={})  # the embedded default: the local renderer needs no key
    assert records(caplog, logging.WARNING) == []
    assert SECRET not in caplog.text


def test_the_start_up_summary_names_models_providers_and_the_stack(caplog):
    with caplog.at_level(logging.INFO, logger="flux_proxy"):
        FluxProxy({"models": FAILOVER, "middlewares": ["response_format", "size"]}, environ={})
        FluxProxy({}, environ={})
    assert records(caplog, logging.INFO) == [
        "serving 4 models (flux1.1-pro -> bfl > fal > replicate, flux-bfl -> bfl, "
        "relay -> openai, sketch -> local), middlewares: response_format, size",
        "serving 1 model (flux1.1-pro -> local), middlewares: response_format, "
        "output_format, size, fanout, passthrough",
    ]


def down(request: httpx.Request) -> httpx.Response:
    return httpx.Response(503, json={"error": {"message": "down for maintenance"}})


async def generate(gateway: FluxProxy, model: str) -> httpx.Response:
    transport = httpx.ASGITransport(app=gateway)
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway.test") as client:
        body: dict[str, Any] = {"model": model, "prompt": "x", "size": "64x64"}
        return await client.post("/v1/images/generations", json=body)


@pytest.mark.anyio
async def test_a_failover_model_with_no_keys_names_every_unset_variable():
    gateway = FluxProxy({"models": FAILOVER}, environ={}, transport=httpx.MockTransport(down))
    error = assert_openai_error(await generate(gateway, "flux-pro-1.1"), 502)
    assert error["code"] == "upstream_credentials_missing"
    assert "BFL_API_KEY, FAL_KEY, REPLICATE_API_TOKEN are not set" in error["message"]


@pytest.mark.anyio
async def test_an_upstream_failure_between_unset_keys_is_not_named_as_one():
    models = {
        "mixed": {
            "providers": [
                {"provider": "bfl"},
                {**FAILOVER["relay"], "api_key_env": "RELAY_KEY"},
                {"provider": "replicate"},
            ]
        }
    }
    gateway = FluxProxy(
        {"models": models}, environ={"RELAY_KEY": SECRET}, transport=httpx.MockTransport(down)
    )
    response = await generate(gateway, "mixed")
    error = assert_openai_error(response, 502)
    assert error["code"] == "upstream_credentials_missing"
    assert "BFL_API_KEY, REPLICATE_API_TOKEN are not set" in error["message"]
    assert "RELAY_KEY" not in error["message"] and SECRET not in response.text


@pytest.mark.anyio
async def test_a_single_unset_key_keeps_its_message():
    gateway = FluxProxy({"models": FAILOVER}, environ={}, transport=httpx.MockTransport(down))
    error = assert_openai_error(await generate(gateway, "flux-bfl"), 502)
    assert error["message"] == (
        "The gateway has no key for this model's upstream: the environment variable "
        "BFL_API_KEY is not set."
    )
