"""deploy/Containerfile, run without a container engine (these machines have no daemon).

The recipe's own commands are read from the file and run, so the two cannot drift:
its build stage's ``pip`` commands make the wheels from a copy of what it ``COPY``s,
its final stage's ``pip`` commands install them into a fresh virtualenv, and the
server starts from its ``ENTRYPOINT``/``CMD`` with its ``ENV``, mounted config file
and keys from the environment. When the tests run as root, the server runs as
``nobody`` in a directory it cannot write to, with a virtualenv it cannot write to:
as in the image, nothing is writable but what the system grants everyone (/tmp).

The pip commands run through this test's own pip (``pip --python VENV``): the
virtualenvs are made without pip, which takes ~10 s each here (ensurepip), and the
image removes pip anyway. The build (one per module) takes ~20 s, most of it pip
resolving and copying the dependencies' wheels.
"""

from __future__ import annotations

import base64
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import venv
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from fnmatch import fnmatch
from glob import glob
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

from flux_proxy.plugins import load_registry
from tests.containerfile import Stage, parse
from tests.images import assert_image, data_of
from tests.servers import free_port, serve
from tests.waiting import wait_for

ROOT = Path(__file__).parents[1]
RECIPE = ROOT / "deploy" / "Containerfile"
SHIPPED_CONFIG = ROOT / "deploy" / "config.yaml"
KEYS = {name: "emulator-key" for name in ("BFL_API_KEY", "FAL_KEY", "REPLICATE_API_TOKEN")}
# Each emulator answers after two polls (as in tests/plugins/test_all_providers.py).
EMULATOR_KNOBS: dict[str, dict[str, Any]] = {
    "bfl": {"polls_before_ready": 2, "retry_after": None},
    "fal": {"polls_before_ready": 2},
    "replicate": {"polls_until_ready": 2, "finish_within_wait": False},
}
FAST_POLLS = {"poll_interval": 0.05, "poll_max_interval": 0.1}
NOBODY = 65534


@dataclass
class Installed:
    """The image's file system, as far as the test needs it."""

    root: Path
    venv: Path
    wheels: Path


def stages() -> tuple[Stage, Stage]:
    build, final = parse(RECIPE)
    return build, final


def pip(target: Path, command: list[str], cwd: Path, paths: dict[str, Path]) -> None:
    """Run one of the recipe's ``python -m pip ...`` commands against ``target``'s venv."""
    assert command[:3] == ["python", "-m", "pip"], f"not a pip command: {command}"
    args: list[str] = []
    for word in command[3:]:
        for image_path, here in paths.items():
            word = word.replace(image_path, str(here))
        args.extend(sorted(glob(word)) if "*" in word else [word])
    python = target / "bin" / "python"
    run = [sys.executable, "-m", "pip", "--python", str(python), *args]
    done = subprocess.run(run, cwd=cwd, capture_output=True, text=True, check=False)
    assert done.returncode == 0, f"{' '.join(command)}\n{done.stdout}\n{done.stderr}"


def copy_context(build: Stage, src: Path) -> None:
    """What the build stage COPYs from the context, without what .dockerignore leaves out."""
    ignored = [
        line.removeprefix("**/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.startswith("**/")
    ]

    def ignore(directory: str, names: list[str]) -> list[str]:
        return [name for name in names if any(fnmatch(name, pattern) for pattern in ignored)]

    for rest in build.all("COPY"):
        *sources, destination = rest.split()
        for source in sources:
            target = src / destination
            if (ROOT / source).is_dir():
                shutil.copytree(ROOT / source, target, symlinks=True, ignore=ignore)
            else:
                target.mkdir(parents=True, exist_ok=True)
                shutil.copy(ROOT / source, target)


@pytest.fixture(scope="module")
def installed() -> Iterator[Installed]:
    build, final = stages()
    # Not pytest's tmp_path: that is private to root, and the server runs as nobody.
    root = Path(tempfile.mkdtemp(prefix="flux-proxy-image-"))
    root.chmod(0o755)
    try:
        src, wheels = root / "src", root / "wheels"
        copy_context(build, src)
        paths = {"/wheels": wheels, "/src": src}
        builder = root / "build-venv"
        venv.create(builder, with_pip=False)
        for commands in build.runs():
            for command in commands:
                pip(builder, command, src, paths)
        runtime = root / "venv"
        venv.create(runtime, with_pip=False)
        for commands in final.runs():
            for command in commands:
                if command[0] in ("groupadd", "useradd"):
                    continue  # the image's user; here the server runs as nobody
                pip(runtime, command, root, paths)
        yield Installed(root, runtime, wheels)
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def emulators() -> Iterator[dict[str, str]]:
    factories = load_registry().emulators
    with ExitStack() as stack:
        yield {
            name: stack.enter_context(serve(factories[name](**knobs)))
            for name, knobs in EMULATOR_KNOBS.items()
        }


def as_unprivileged(command: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return command
    return ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *command]


def container_config(emulators: dict[str, str]) -> dict[str, Any]:
    """The shipped config, its providers pointed at the emulators, plus one model per
    plugin (so each installed plugin answers once)."""
    config: dict[str, Any] = yaml.safe_load(SHIPPED_CONFIG.read_text())
    for model in config["models"].values():
        for entry in model["providers"]:
            entry.update(base_url=emulators[entry["provider"]], options=dict(FAST_POLLS))
    for name, url in emulators.items():
        options: dict[str, Any] = dict(FAST_POLLS)
        if name == "replicate":
            options["wait_seconds"] = 0
        config["models"][f"via-{name}"] = {"provider": name, "base_url": url, "options": options}
    return config


@dataclass
class Container:
    base_url: str
    env: dict[str, str]
    process: subprocess.Popen[str]


@pytest.fixture
def container(installed: Installed, emulators: dict[str, str]) -> Iterator[Container]:
    _, final = stages()
    mounted = installed.root / "etc" / "flux-proxy"
    mounted.mkdir(parents=True)
    env = final.env()
    config_file = mounted / Path(env["FLUX_PROXY_CONFIG"]).name
    config_file.write_text(yaml.safe_dump(container_config(emulators)))
    port = free_port()
    env.update(
        # The "mount": the recipe's path, here.
        FLUX_PROXY_CONFIG=str(config_file),
        # Loopback and a free port rather than 0.0.0.0:8080, as `docker run -e` would.
        FLUX_PROXY_SERVER__HOST="127.0.0.1",
        FLUX_PROXY_SERVER__PORT=str(port),
        PATH=f"{installed.venv / 'bin'}:/usr/local/bin:/usr/bin:/bin",
        HOME="/nonexistent",
        **KEYS,
    )
    workdir = installed.root / "cwd"
    workdir.mkdir()
    workdir.chmod(0o555)
    command = final.exec_form("ENTRYPOINT") + final.exec_form("CMD")
    process = subprocess.Popen(
        as_unprivileged(command),
        env=env,
        cwd=workdir,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base_url = f"http://127.0.0.1:{port}"
    try:

        def serving() -> bool:
            assert process.poll() is None, process.communicate()[0]
            try:
                return httpx.get(f"{base_url}/healthz", timeout=1).status_code == 200
            except httpx.TransportError:
                return False

        assert wait_for(serving, seconds=30), "the server did not answer /healthz"
        yield Container(base_url, env, process)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        shutil.rmtree(mounted.parent)
        workdir.chmod(0o755)
        shutil.rmtree(workdir)


def test_the_recipe_is_multi_stage_slim_and_runs_as_a_numeric_non_root_user():
    build, final = stages()
    assert build.name == "build"
    assert build.base == final.base == "python:3.11-slim"
    user = final.one("USER")
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) != 0 and gid.isdigit() and int(gid) != 0, user
    # The final stage installs wheels and nothing else: no package manager, no sources.
    words = [word for commands in final.runs() for command in commands for word in command]
    for tool in ("apt-get", "apt", "gcc", "build-essential", "make"):
        assert tool not in words
    assert final.all("COPY") == []
    assert ["python", "-m", "pip", "uninstall", "--yes", "pip", "setuptools", "wheel"] in [
        command for commands in final.runs() for command in commands
    ]
    assert final.env()["FLUX_PROXY_CONFIG"] == "/etc/flux-proxy/config.yaml"


def test_the_built_wheels_are_the_gateway_and_its_three_plugins(installed):
    names = sorted(path.name.split("-")[0] for path in installed.wheels.glob("flux_proxy*.whl"))
    assert names == ["flux_proxy", "flux_proxy_bfl", "flux_proxy_fal", "flux_proxy_replicate"]
    assert not (installed.venv / "bin" / "pip").exists()


def test_the_image_serves_a_generation_from_each_plugin(container):
    client = openai.OpenAI(
        base_url=f"{container.base_url}/v1", api_key="unused", max_retries=0, timeout=30
    )
    models = {model.id for model in client.models.list()}
    assert {"flux1.1-pro", "via-bfl", "via-fal", "via-replicate"} <= models
    for model in ("flux1.1-pro", "via-bfl", "via-fal", "via-replicate"):
        answer = client.images.generate(
            model=model, prompt="a lighthouse", size="256x256", response_format="b64_json"
        )
        assert_image(base64.b64decode(data_of(answer)[0].b64_json or ""), "png", (256, 256))
    # A hosted link: the memory store needs no writable path.
    linked = client.images.generate(model="via-fal", prompt="a harbour", size="512x512")
    url = data_of(linked)[0].url or ""
    assert url.startswith(f"{container.base_url}/v1/images/files/")
    assert_image(httpx.get(url).content, "png", (512, 512))


def test_the_healthcheck_passes_while_serving_and_fails_once_stopped(container):
    _, final = stages()
    options, command = final.healthcheck()
    assert command[0] == "python"  # slim has no curl
    timeout = float(options["timeout"].removesuffix("s"))
    healthy = subprocess.run(
        as_unprivileged(command), env=container.env, capture_output=True, timeout=timeout
    )
    assert healthy.returncode == 0, healthy.stderr
    container.process.send_signal(signal.SIGTERM)
    output = container.process.communicate(timeout=10)[0]
    # uvicorn shuts down cleanly, then re-raises the signal (exit 143 in a container).
    assert container.process.returncode in (0, -signal.SIGTERM), output
    assert "Application shutdown complete" in output
    stopped = subprocess.run(
        as_unprivileged(command), env=container.env, capture_output=True, timeout=timeout
    )
    assert stopped.returncode != 0
