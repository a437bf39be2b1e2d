"""Validate gateway responses against OpenAI's published schemas."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator


@cache
def _document() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(Path(__file__).with_name("openai_schemas.json").read_text())
    return loaded


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
