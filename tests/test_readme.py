"""The README's walkthroughs use files and settings that exist and work as written."""

from __future__ import annotations

import re
from pathlib import Path

from flux_proxy import FluxProxy
from flux_proxy.config import load_settings

ROOT = Path(__file__).parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def section(title: str) -> str:
    start = README.index(title)
    following = re.compile(r"^#{1,4} ", flags=re.MULTILINE).search(README, start + len(title))
    return README[start : following.start() if following else None]


def code_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.DOTALL)


def test_the_emulator_walkthrough_serves_the_shipped_config():
    walkthrough = section("### Try it with no keys: the emulators")
    commands = code_blocks(walkthrough, "sh")[0]
    ports = {
        name: int(port)
        for name, port in re.findall(r"flux-proxy emulate (\w+) --port (\d+) &", commands)
    }
    assert set(ports) == {"bfl", "fal", "replicate"}
    for name in ports:  # the Quick Start installs none of the plugins
        assert f"-e plugins/{name}" in commands
    (config,) = re.findall(r"flux-proxy serve --config (\S+)", commands)
    settings = load_settings(ROOT / config, {})

    # Every provider entry points at the port its emulator was started on.
    entries = [entry for model in settings.models.values() for entry in model.providers]
    assert {entry.provider for entry in entries} == set(ports)
    for entry in entries:
        assert entry.base_url == f"http://127.0.0.1:{ports[entry.provider]}"
    # The models the walkthrough names are the ones the file serves.
    for model in ("flux1.1-pro", "flux-bfl", "flux-fal", "flux-replicate"):
        assert f"`{model}`" in walkthrough
    assert set(settings.models) == {"flux1.1-pro", "flux-bfl", "flux-fal", "flux-replicate"}
    # And the gateway starts on it, with the keys the walkthrough exports.
    exported = dict(re.findall(r"(\w+)=(\S+)", commands.split("export ", 1)[1].splitlines()[0]))
    gateway = FluxProxy(settings, environ=exported)
    assert gateway.router.resolve("flux-pro-1.1").name == "flux1.1-pro"


def test_the_toml_example_loads(tmp_path):
    (example,) = code_blocks(section("## Configuration"), "toml")
    path = tmp_path / "flux-proxy.toml"
    path.write_text(example, encoding="utf-8")
    settings = load_settings(path, {})
    assert settings.limits.max_n == 4
    assert settings.models["flux1.1-pro"].aliases == ["flux-pro-1.1"]


def test_the_deploying_section_names_files_that_exist():
    deploying = section("## Deploying")
    named = set(re.findall(r"deploy/[\w./-]*\w", deploying))
    assert {"deploy/Containerfile", "deploy/config.yaml"} <= named
    for path in named:
        assert (ROOT / path).exists(), path
    # The docker example mounts the config where the image reads it.
    (docker,) = [block for block in code_blocks(deploying, "sh") if "docker run" in block]
    assert ":/etc/flux-proxy/config.yaml:ro" in docker
    assert "/etc/flux-proxy/config.yaml" in (ROOT / "deploy" / "Containerfile").read_text()


def test_the_shipped_container_config_loads():
    settings = load_settings(ROOT / "deploy" / "config.yaml", {})
    assert [entry.provider for entry in settings.models["flux1.1-pro"].providers] == [
        "bfl",
        "fal",
        "replicate",
    ]


def test_the_reliability_limits_are_the_settings_defaults():
    table = section("## Reliability").split("**Limits, with their defaults**", 1)[1]
    rows = re.findall(r"^\| `([\w.]+)` \| ([\d.]+)", table, flags=re.MULTILINE)
    defaults = load_settings(None, {})
    assert len(rows) >= 14
    for name, default in rows:
        section_name, _, key = name.rpartition(".")
        value = getattr(getattr(defaults, section_name or "limits"), key)
        assert float(default) == value, name
