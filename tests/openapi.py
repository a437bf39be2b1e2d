"""Validate gateway responses against OpenAI's published schemas."""

from __future__ import annotations

from functools import cache
from typing import Any

from jsonschema import Draft202012Validator

from flux_proxy.openapi import openai_schemas


@cache
def _document() -> dict[str, Any]:
    return {"components": {"schemas": openai_schemas()}}


def assert_matches(instance: Any, schema: str) -> None:
    """Raise if ``instance`` is not a valid OpenAI ``schema`` (e.g. "ImagesResponse")."""
    root = {**_document(), "$ref": f"#/components/schemas/{schema}"}
    Draft202012Validator(root).validate(instance)


def assert_openai_error(response: Any, status: int, param: str | None = None) -> dict[str, Any]:
    """An httpx response carrying an OpenAI ErrorResponse with ``status`` (and ``param``)."""
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert_matches(body, "ErrorResponse")
    assert "Traceback" not in response.text
    if param is not None:
        assert body["error"]["param"] == param, body
    error: dict[str, Any] = body["error"]
    return error
