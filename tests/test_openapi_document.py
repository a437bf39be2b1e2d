"""The gateway publishes an OpenAPI document for its own routes, and answers as it says.

schemathesis reads ``/v1/openapi.json`` from the app in process (ASGI) and sends a
bounded number of generated requests to every operation it lists; each answer must
not be a 5xx and must match the document: a listed status, a listed content type,
the listed headers, and a body valid against the schema (OpenAI's own, for answers).
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from jsonschema import Draft202012Validator
from schemathesis import checks

from flux_proxy import FluxProxy, __version__
from tests.in_process import TINY_LOCAL
from tests.openapi import assert_matches

CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_headers_conformance,
    checks.response_schema_conformance,
]

schema = schemathesis.openapi.from_asgi("/v1/openapi.json", FluxProxy(TINY_LOCAL, environ={}))


@schema.parametrize()
@settings(
    max_examples=12,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)
def test_every_operation_answers_as_the_document_says(case: schemathesis.Case[Any]) -> None:
    case.call_and_validate(checks=CHECKS)


def document(path: str = "/v1/openapi.json", **config: Any) -> dict[str, Any]:
    app = FluxProxy({**TINY_LOCAL, **config}, environ={"KEYS": "k1"})
    transport = httpx.ASGITransport(app=app)

    async def get() -> dict[str, Any]:
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
            response = await client.get(path)
            assert response.status_code == 200
            loaded: dict[str, Any] = response.json()
            return loaded

    import anyio

    return anyio.run(get)


def test_the_document_describes_this_gateway():
    doc = document(auth={"api_keys_env": "KEYS"}, limits={"max_n": 3})
    assert doc["openapi"] == "3.1.0"
    assert doc["info"]["version"] == __version__
    request = doc["components"]["schemas"]["CreateImageRequest"]
    assert request["properties"]["n"]["maximum"] == 3
    assert request["required"] == ["prompt"]
    generate = doc["paths"]["/v1/images/generations"]["post"]
    assert generate["security"] == [{"bearer": []}]
    assert {"200", "400", "401", "413", "429", "502", "503", "504"} <= set(generate["responses"])
    assert "500" not in generate["responses"]
    # The answers' schemas are OpenAI's: a real answer body validates against them.
    assert_matches({"created": 1, "data": [{"url": "http://x/y.png"}]}, "ImagesResponse")
    Draft202012Validator.check_schema(request)


@pytest.mark.parametrize(("prefix", "path"), [("/api/v2", "/api/v2/openapi.json")])
def test_the_document_follows_the_api_prefix(prefix, path):
    doc = document(path, server={"api_prefix": prefix})
    assert f"{prefix}/images/generations" in doc["paths"]
    assert path in doc["paths"]
