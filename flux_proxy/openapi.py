"""The gateway's own OpenAPI document, served at ``{api_prefix}/openapi.json``.

The request body is described by the pydantic model the gateway validates it with
(``ImageRequest``), with this gateway's limits; the answers by OpenAI's own response
schemas, extracted from its published spec into ``openai_schemas.json`` beside this
module (``tests/extract_openai_schemas.py`` regenerates it). Built once, at start-up.
"""

from __future__ import annotations

import json
from importlib import resources
from importlib.metadata import version
from typing import Any

from flux_proxy.config import Settings
from flux_proxy.schema import ImageRequest

OPENAPI_PATH = "/openapi.json"  # under the API prefix: a host app's own /openapi.json stays
IMAGE_MEDIA_TYPES = ("image/png", "image/jpeg", "image/webp", "image/gif", "image/avif")

# Why each route answers each error status (the README's error table, per route).
GENERATION_ERRORS = {
    "400": "Invalid JSON or parameter (`param` names it), a moderation refusal, a url "
    "answer asked with a Host that is not in server.allowed_hosts (`untrusted_host`), or "
    "more pixels x n than one request may ask for (`too_many_pixels`)",
    "401": "Client keys are configured and the key is missing or wrong",
    "404": "Unknown model",
    "408": "The body did not arrive within limits.client_body_timeout (connection closed)",
    "413": "The body is larger than limits.max_body_bytes (connection closed)",
    "429": "The upstream rate-limits (its Retry-After is forwarded), or this client key "
    "holds its share of the gateway's image capacity",
    "502": "The upstream failed, rejected the gateway's own key, or sent a broken image",
    "503": "The gateway has as much image work admitted as it takes (`overloaded`), every "
    "provider of the model is skipped by its circuit breaker, or the gateway is shutting down",
    "504": "The upstream or the whole request took too long",
}
# While draining for a shutdown, every route but the probes answers 503 (drain.py).
SHUTTING_DOWN = {"503": "The gateway is shutting down: send it again"}
MODEL_ERRORS = {"401": GENERATION_ERRORS["401"], "404": "Unknown model", **SHUTTING_DOWN}
FILE_ERRORS = {
    "403": "A bad or expired signature",
    "404": "The image has expired or never existed",
    **SHUTTING_DOWN,
}
RETRY_AFTER_STATUSES = ("429", "503")
# With `stream: true`, each server-sent event (OpenAPI 3.1: `schema` describes one event):
# OpenAI's image events, the gateway's progress and report, or an error, as JSON text.
SSE_EVENT = {
    "type": "object",
    "required": ["event", "data"],
    "properties": {
        "event": {
            "enum": [
                "image_generation.partial_image",
                "image_generation.completed",
                "flux_proxy.progress",
                "flux_proxy.report",
                "error",
            ]
        },
        "data": {"type": "string", "contentMediaType": "application/json"},
    },
}


def openai_schemas() -> dict[str, Any]:
    """OpenAI's response schemas (ImagesResponse, ErrorResponse, Model, ...), by name."""
    text = resources.files("flux_proxy").joinpath("openai_schemas.json").read_text("utf-8")
    schemas: dict[str, Any] = json.loads(text)["components"]["schemas"]
    return schemas


def openapi_document(
    settings: Settings, *, health_paths: bool, client_keys: bool
) -> dict[str, Any]:
    prefix = settings.server.api_prefix
    schemas = {**openai_schemas(), "CreateImageRequest": _request_schema(settings)}
    secured: dict[str, Any] = {"security": [{"bearer": []}]} if client_keys else {}
    paths: dict[str, Any] = {
        f"{prefix}/images/generations": {
            "post": {
                "operationId": "createImage",
                "summary": "Generate images (OpenAI's Images API)",
                **secured,
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref("CreateImageRequest")}},
                },
                "responses": {
                    "200": {
                        "description": "The images; with `stream: true`, server-sent events",
                        "headers": {
                            "x-flux-proxy-params": _header("How each parameter was handled"),
                            "x-flux-proxy-provider": _header("The provider that answered"),
                        },
                        "content": {
                            "application/json": {"schema": _ref("ImagesResponse")},
                            "text/event-stream": {"schema": SSE_EVENT},
                        },
                    },
                    **_errors(GENERATION_ERRORS),
                },
            }
        },
        f"{prefix}/models": {
            "get": {
                "operationId": "listModels",
                "summary": "The configured models and their aliases",
                **secured,
                "responses": {
                    "200": _json("The models", "ListModelsResponse"),
                    **_errors({"401": GENERATION_ERRORS["401"], **SHUTTING_DOWN}),
                },
            }
        },
        f"{prefix}/models/{{model}}": {
            "get": {
                "operationId": "retrieveModel",
                "summary": "One model, by name or alias",
                **secured,
                "parameters": [_parameter("model", "path")],
                "responses": {"200": _json("The model", "Model"), **_errors(MODEL_ERRORS)},
            }
        },
        f"{prefix}/images/files/{{name}}": {
            "get": {
                "operationId": "getImageFile",
                "summary": "A hosted image, by its signed link",
                "parameters": [
                    _parameter("name", "path"),
                    _parameter("expires", "query", required=False),
                    _parameter("signature", "query", required=False),
                ],
                "responses": {
                    "200": {
                        "description": "The image",
                        "content": {
                            media: {"schema": {"type": "string", "format": "binary"}}
                            for media in IMAGE_MEDIA_TYPES
                        },
                    },
                    **_errors(FILE_ERRORS),
                },
            }
        },
        f"{prefix}{OPENAPI_PATH}": {
            "get": {
                "operationId": "getOpenAPI",
                "summary": "This document",
                "responses": {
                    "200": {"description": "OpenAPI 3.1", "content": _any_json()},
                    **_errors(SHUTTING_DOWN),
                },
            }
        },
    }
    if health_paths:
        paths["/healthz"] = _probe("healthz", "The process serves", ())
        paths["/readyz"] = _probe("readyz", "Ready for traffic", ("503",))
        text = {"text/plain": {"schema": {"type": "string"}}}
        paths["/metrics"] = {
            "get": {
                "operationId": "metrics",
                "summary": "Prometheus text exposition (flux_proxy/metrics.py)",
                "responses": {"200": {"description": "The metrics", "content": text}},
            }
        }
    components: dict[str, Any] = {"schemas": schemas}
    if client_keys:
        components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "flux-proxy",
            "version": version("flux-proxy"),
            "description": "An OpenAI-compatible image-generation gateway.",
        },
        "paths": paths,
        "components": components,
    }


def _request_schema(settings: Settings) -> dict[str, Any]:
    schema = ImageRequest.model_json_schema()
    schema["title"] = "CreateImageRequest"
    schema["description"] = (
        "OpenAI's CreateImageRequest and the gateway's extensions; any other parameter "
        "is passed to the provider."
    )
    schema["properties"]["n"]["maximum"] = settings.limits.max_n
    return schema


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(description: str, schema: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ref(schema)}}}


def _any_json() -> dict[str, Any]:
    return {"application/json": {"schema": {"type": "object"}}}


def _header(description: str) -> dict[str, Any]:
    return {"description": description, "schema": {"type": "string"}}


def _errors(reasons: dict[str, str]) -> dict[str, Any]:
    errors = {status: _json(reason, "ErrorResponse") for status, reason in reasons.items()}
    for status in RETRY_AFTER_STATUSES:
        if status in errors:
            errors[status]["headers"] = {"Retry-After": _header("Seconds to wait, or a date")}
    return errors


def _parameter(name: str, where: str, *, required: bool = True) -> dict[str, Any]:
    return {"name": name, "in": where, "required": required, "schema": {"type": "string"}}


def _probe(name: str, summary: str, failures: tuple[str, ...]) -> dict[str, Any]:
    answer = {"description": summary, "content": _any_json()}
    return {
        "get": {
            "operationId": name,
            "summary": summary,
            "responses": {"200": answer, **{status: answer for status in failures}},
        }
    }
