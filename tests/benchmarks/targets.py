"""What the benchmark measures, each started the way its users start it.

- ``upstream``: the fake OpenAI Images server (``tests/benchmarks/servers.py``);
- ``aiohttp`` and ``httpx``: the thin forwarders, under the uvicorn command line;
- ``flux-pass`` and ``flux-default``: ``flux-proxy serve`` with a settings file and
  client keys on (``FLUX_PROXY_API_KEYS``); ``flux-pass`` returns upstream URLs as they
  are (``store.return_upstream_urls: true``), ``flux-default`` hosts ``url`` images;
- ``litellm`` (``--peers``): LiteLLM's proxy from its own virtualenv, made on first use.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from tests.benchmarks.processes import BenchmarkError, Cpus, Server, free_port

# One key for every target: the gateway and LiteLLM check it, the others pass it on.
CLIENT_KEY = "sk-bench-client-key"
UPSTREAM_MODEL = "bench-image"
# The gateway's models: what the upstream is asked for decides the path through it.
URL_MODEL = "bench-url"  # the upstream answers links
B64_MODEL = "bench-b64"  # the upstream answers base64
SINGLE_MODEL = "bench-single"  # one image per call, after a delay: the gateway fans n out
LITELLM_VENV = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / (
    "flux-proxy-bench/litellm"
)
LITELLM_REQUIREMENT = "litellm[proxy]"


def upstream(cpu: int | None, sides: Sequence[int], work: Path) -> Server:
    port = free_port()
    command = [sys.executable, "-m", "tests.benchmarks.servers", f"--port={port}"]
    command += [f"--parent={os.getpid()}", "--sides=" + ",".join(map(str, sides))]
    return Server("upstream", command, port, work / "upstream.log", cpu)


def forwarder(kind: str, upstream_url: str, cpu: int | None, work: Path) -> Server:
    port = free_port()
    command = [sys.executable, "-m", "uvicorn", "--factory"]
    command += [f"tests.benchmarks.forward_{kind}:create_app", f"--port={port}"]
    command += ["--log-level=warning", "--no-access-log"]
    env = {"BENCH_UPSTREAM": upstream_url}
    return Server(kind, command, port, work / f"{kind}.log", cpu, env, ready_path="/health")


def flux_settings(
    upstream_url: str, sides: Sequence[int], delay_ms: int, port: int, pass_through: bool
) -> dict[str, Any]:
    """Models whose declared capabilities make a square PNG of a served size native."""

    def model(base_url: str, response_format: str, per_call: int) -> dict[str, Any]:
        presets = [f"{side}x{side}" for side in sides]
        return {
            "provider": "openai",
            "upstream_model": UPSTREAM_MODEL,
            "base_url": base_url,
            "capabilities": {
                "sizes": {"presets": presets},
                "default_size": presets[len(presets) // 2],
                "max_images_per_call": per_call,
                "output_formats": ["png"],
            },
            "options": {"response_format": response_format},
        }

    settings: dict[str, Any] = {
        "server": {"host": "127.0.0.1", "port": port},
        "models": {
            URL_MODEL: model(f"{upstream_url}/v1", "url", 10),
            B64_MODEL: model(f"{upstream_url}/v1", "b64_json", 10),
            SINGLE_MODEL: model(f"{upstream_url}/single/delay/{delay_ms}/v1", "b64_json", 1),
        },
    }
    if pass_through:
        settings["store"] = {"return_upstream_urls": True}
    return settings


def flux(name: str, settings: dict[str, Any], cpu: int | None, work: Path) -> Server:
    config = work / f"{name}.yaml"
    config.write_text(yaml.safe_dump(settings))
    port = int(settings["server"]["port"])
    command = [_console_script("flux-proxy"), "serve", f"--config={config}"]
    command += ["--log-level=warning"]
    env = {"FLUX_PROXY_API_KEYS": CLIENT_KEY}
    return Server(name, command, port, work / f"{name}.log", cpu, env, ready_path="/v1/models")


def litellm(upstream_url: str, cpu: int | None, work: Path) -> Server:
    executable = ensure_litellm()
    config = work / "litellm.yaml"
    model = {
        "model_name": UPSTREAM_MODEL,
        "litellm_params": {
            # A model name LiteLLM knows takes response_format (it refuses it for others);
            # the fake upstream serves any name.
            "model": "openai/dall-e-2",
            "api_base": f"{upstream_url}/v1",
            "api_key": "sk-bench-upstream-key",
        },
    }
    settings = {"model_list": [model], "general_settings": {"master_key": CLIENT_KEY}}
    config.write_text(yaml.safe_dump(settings))
    port = free_port()
    command = [str(executable), f"--config={config}", f"--port={port}", "--num_workers=1"]
    env = {"LITELLM_LOG": "ERROR", "LITELLM_TELEMETRY": "False", "NO_DOCS": "True"}
    return Server(
        "litellm", command, port, work / "litellm.log", cpu, env, ready_path="/health/liveliness"
    )


def ensure_litellm() -> Path:
    """LiteLLM's proxy in a virtualenv of its own (its pins are not the project's)."""
    executable = LITELLM_VENV / "bin" / "litellm"
    if executable.exists():
        return executable
    print(f"installing {LITELLM_REQUIREMENT} into {LITELLM_VENV} (once) ...", flush=True)
    try:
        subprocess.run([sys.executable, "-m", "venv", str(LITELLM_VENV)], check=True)
        pip = [str(LITELLM_VENV / "bin" / "python"), "-m", "pip", "install", "--quiet"]
        subprocess.run([*pip, LITELLM_REQUIREMENT], check=True, capture_output=True, text=True)
    except subprocess.CalledProcessError as error:
        shutil.rmtree(LITELLM_VENV, ignore_errors=True)
        detail = (error.stderr or "")[-1500:] if isinstance(error.stderr, str) else ""
        raise BenchmarkError(
            f"--peers: cannot install {LITELLM_REQUIREMENT!r} into {LITELLM_VENV}: {detail}"
        ) from error
    if not executable.exists():
        raise BenchmarkError(f"--peers: {LITELLM_REQUIREMENT!r} installed no {executable}")
    return executable


def _console_script(name: str) -> str:
    """The script beside this interpreter, so the run uses this checkout's install."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        raise BenchmarkError(f"no {name!r} command: pip install -e . first")
    return found


def all_servers(
    cpus: Cpus,
    sides: Sequence[int],
    delay_ms: int,
    work: Path,
    peers: bool,
) -> dict[str, Server]:
    """Every target, keyed by name; the upstream first (the others point at it)."""
    up = upstream(cpus.other, sides, work)
    servers = {"upstream": up}
    servers["aiohttp"] = forwarder("aiohttp", up.url, cpus.server, work)
    servers["httpx"] = forwarder("httpx", up.url, cpus.server, work)
    for name, pass_through in (("flux-pass", True), ("flux-default", False)):
        settings = flux_settings(up.url, sides, delay_ms, free_port(), pass_through)
        servers[name] = flux(name, settings, cpus.server, work)
    if peers:
        servers["litellm"] = litellm(up.url, cpus.server, work)
    return servers
