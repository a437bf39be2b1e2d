"""Regenerate flux_proxy/openai_schemas.json from OpenAI's published spec.

    python tests/extract_openai_schemas.py ../shared/openai/openapi.yaml

Keeps only the response schemas the gateway must satisfy, with the schemas they
reference, so neither the gateway's OpenAPI document (flux_proxy/openapi.py) nor the
tests need the 3 MB spec or a YAML parse of it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml

ROOTS = ["ErrorResponse", "ImagesResponse", "ListModelsResponse", "Model", "ImageGenStreamEvent"]
OUT = Path(__file__).parents[1] / "flux_proxy" / "openai_schemas.json"


def main(spec_path: str) -> None:
    spec = yaml.load(
        Path(spec_path).read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    )
    schemas = spec["components"]["schemas"]
    kept: dict[str, Any] = {}

    def collect(name: str) -> None:
        if name not in kept:
            kept[name] = _strip(schemas[name])
            for ref in _refs(schemas[name]):
                collect(ref.rsplit("/", 1)[1])

    for root in ROOTS:
        collect(root)
    document = {
        "$comment": "Extracted from OpenAI's openapi.yaml by tests/extract_openai_schemas.py.",
        "components": {"schemas": kept},
    }
    OUT.write_text(json.dumps(document, indent=1, sort_keys=True) + "\n")


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        return [v for k, v in node.items() if k == "$ref"] + [
            ref for k, v in node.items() if k != "$ref" for ref in _refs(v)
        ]
    if isinstance(node, list):
        return [ref for item in node for ref in _refs(item)]
    return []


def _strip(node: Any) -> Any:
    if isinstance(node, dict):
        return {
            k: _strip(v)
            for k, v in node.items()
            if not k.startswith("x-") and k not in ("description", "example")
        }
    if isinstance(node, list):
        return [_strip(item) for item in node]
    return node


if __name__ == "__main__":
    main(sys.argv[1])
