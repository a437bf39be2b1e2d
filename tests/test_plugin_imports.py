"""Plugins import flux_proxy.sdk and nothing else from flux_proxy.

The SDK is the one surface the core promises to keep; a plugin reaching past it
into a core module would break when the core moves its insides.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PLUGIN_SOURCES = sorted(
    [
        *ROOT.glob("plugins/*/flux_proxy_*/*.py"),
        *ROOT.glob("tests/fixture_plugins/*/flux_proxy_*/*.py"),
    ]
)


def core_imports(path: Path) -> list[str]:
    """Every flux_proxy module ``path`` imports other than the SDK."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
            if node.module == "flux_proxy":
                names = [f"flux_proxy.{alias.name}" for alias in node.names]
        else:
            continue
        found += [
            name
            for name in names
            if (name == "flux_proxy" or name.startswith("flux_proxy.")) and name != "flux_proxy.sdk"
        ]
    return found


def test_there_are_plugins_to_check() -> None:
    assert len(PLUGIN_SOURCES) >= 10


@pytest.mark.parametrize("path", PLUGIN_SOURCES, ids=lambda path: str(path.relative_to(ROOT)))
def test_a_plugin_imports_only_the_sdk(path: Path) -> None:
    assert core_imports(path) == []
