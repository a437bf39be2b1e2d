"""The real ``flux-proxy`` console script, in subprocesses, serving on loopback."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

import flux_proxy
from tests.images import assert_image, data_of

SCRIPT = Path(sys.executable).with_name("flux-proxy")
START_TIMEOUT = 15.0


def clean_environ(**extra: str) -> dict[str, str]:
    """The test's environment without any FLUX_PROXY_* setting that could leak in."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("FLUX_PROXY_")}
    environ.update(extra)
    return environ


def run(*args: str, environ: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=20,
        env=clean_environ() if environ is None else environ,
        check=False,
    )


def free_ports(count: int) -> list[int]:
    """Distinct ports free on loopback (all held at once, so they differ)."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def free_port() -> int:
    return free_ports(1)[0]


def assert_clean_failure(result: subprocess.CompletedProcess[str]) -> str:
    """Non-zero exit, a short message on stderr, no traceback."""
    assert result.returncode != 0, result
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip(), "no message on stderr"
    assert len(result.stderr.strip().splitlines()) <= 4, result.stderr
    return result.stderr


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> int:
        """SIGTERM, as a container runtime sends it; the exit status."""
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=10)


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """Start ``flux-proxy`` processes that are always stopped when the test ends."""
    servers: list[Server] = []

    def start(*args: str, environ: dict[str, str] | None = None) -> Server:
        log = tmp_path / f"server-{len(servers)}.log"
        with log.open("wb") as sink:
            process = subprocess.Popen(
                [str(SCRIPT), *args],
                stdout=sink,
                stderr=subprocess.STDOUT,
                env=clean_environ() if environ is None else environ,
            )
        servers.append(Server(process, log))
        return servers[-1]

    try:
        yield start
    finally:
        for server in servers:
            if server.process.poll() is None:
                server.process.kill()
            server.process.wait(timeout=10)


def wait_until_serving(server: Server, base_url: str) -> httpx.Response:
    """Poll GET /v1/models until the server answers (bounded)."""
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            pytest.fail(
                f"flux-proxy exited early with status {server.process.returncode}:\n"
                f"{server.output()}"
            )
        try:
            return httpx.get(f"{base_url}/v1/models", timeout=1.0)
        except httpx.TransportError:
            time.sleep(0.05)
    pytest.fail(f"flux-proxy did not answer on {base_url} within {START_TIMEOUT:g} s")


def assert_graceful_exit(server: Server) -> None:
    # uvicorn shuts down cleanly, then re-raises the signal: the status is 0 or -SIGTERM.
    assert server.stop() in (0, -signal.SIGTERM)
    assert "Application shutdown complete" in server.output()
    assert "Traceback" not in server.output()


# --- help ---------------------------------------------------------------------------


def test_serve_help_documents_the_options():
    result = run("serve", "--help")
    assert result.returncode == 0, result.stderr
    for option in ("--host", "--port", "--config", "--log-level", "--log-format", "--workers"):
        assert option in result.stdout
    assert "flux1.1-pro" in result.stdout  # says what the embedded default serves


def test_python_dash_m_runs_the_same_cli():
    result = subprocess.run(
        [sys.executable, "-m", "flux_proxy", "serve", "--help"],
        capture_output=True,
        text=True,
        timeout=20,
        env=clean_environ(),
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "--port" in result.stdout and "--config" in result.stdout


def test_version_is_the_installed_distributions():
    result = run("--version")
    assert result.returncode == 0, result.stderr
    with (Path(__file__).parents[1] / "pyproject.toml").open("rb") as project:
        declared = tomllib.load(project)["project"]["version"]
    assert result.stdout.strip() == f"flux-proxy {declared}"
    assert flux_proxy.__version__ == declared


def test_no_subcommand_is_a_usage_error():
    result = run()
    assert result.returncode == 2
    assert "usage: flux-proxy" in result.stderr
    assert "Traceback" not in result.stderr


# --- bad configuration: a clear message, no traceback ---------------------------------


def test_bad_config_key_is_named_on_stderr(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("limits:\n  max_n: lots\n")
    stderr = assert_clean_failure(run("serve", "--config", str(config)))
    assert "limits.max_n" in stderr
    assert str(config) in stderr


def test_unknown_config_key_is_named_on_stderr(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("server:\n  prot: 9000\n")
    stderr = assert_clean_failure(run("serve", "--config", str(config)))
    assert "server.prot" in stderr


def test_bad_yaml_is_named_on_stderr(tmp_path):
    config = tmp_path / "broken.yaml"
    config.write_text("server: [\n")
    stderr = assert_clean_failure(run("serve", "--config", str(config)))
    assert str(config) in stderr and "YAML" in stderr


def test_missing_config_file_is_named_on_stderr(tmp_path):
    config = tmp_path / "nowhere.yaml"
    stderr = assert_clean_failure(run("serve", "--config", str(config)))
    assert str(config) in stderr


def test_config_from_the_environment_variable(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("limits:\n  max_n: lots\n")
    result = run("serve", environ=clean_environ(FLUX_PROXY_CONFIG=str(config)))
    assert "limits.max_n" in assert_clean_failure(result)


def test_bad_setting_in_the_environment_names_the_variable():
    result = run("serve", environ=clean_environ(FLUX_PROXY_LIMITS__MAX_N="lots"))
    stderr = assert_clean_failure(result)
    assert "limits.max_n" in stderr and "FLUX_PROXY_LIMITS__MAX_N" in stderr


def test_unknown_provider_is_named_on_stderr(tmp_path):
    config = tmp_path / "provider.yaml"
    config.write_text("models:\n  flux-dev:\n    provider: nosuchprovider\n")
    stderr = assert_clean_failure(run("serve", "--config", str(config)))
    assert "models.flux-dev.provider" in stderr and "nosuchprovider" in stderr


@pytest.mark.parametrize(
    ("option", "value"),
    [
        # uvicorn would otherwise listen on 70000 % 65536 = 4464 and say "running on :70000".
        ("--port", "70000"),
        ("--port", "-1"),
        ("--port", "http"),
        ("--workers", "0"),
        ("--workers", "two"),
    ],
)
def test_a_bad_port_or_worker_count_is_refused(option, value):
    result = run("serve", option, value)
    assert result.returncode == 2
    assert option in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("how", ["flag", "config"])
def test_several_workers_on_the_memory_store_are_refused(tmp_path, how):
    """Each worker's memory store is its own: a link one made would 404 on another."""
    config = tmp_path / "workers.yaml"
    config.write_text("server:\n  workers: 3\n" if how == "config" else "{}\n")
    flag = ["--workers", "3"] if how == "flag" else []
    result = run("serve", "--config", str(config), *flag)
    assert result.returncode == 2
    assert "server.workers: 3 workers cannot share the memory store" in result.stderr
    assert "store.backend to directory" in result.stderr
    assert "Traceback" not in result.stderr


def test_store_directory_that_cannot_be_created_is_reported(tmp_path):
    occupied = tmp_path / "a-file"
    occupied.write_text("not a directory")
    config = tmp_path / "store.yaml"
    config.write_text(f"store:\n  backend: directory\n  directory: {occupied}\n")
    stderr = assert_clean_failure(run("serve", "--config", str(config)))
    assert str(occupied) in stderr


def test_empty_config_variable_means_no_file(spawn):
    port = free_port()
    server = spawn("serve", "--port", str(port), environ=clean_environ(FLUX_PROXY_CONFIG=""))
    models = wait_until_serving(server, f"http://127.0.0.1:{port}")
    assert models.status_code == 200


# --- really serving -----------------------------------------------------------------


def test_serve_without_config_generates_a_real_png(spawn):
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    server = spawn("serve", "--port", str(port))

    models = wait_until_serving(server, base_url)
    assert models.status_code == 200
    assert [model["id"] for model in models.json()["data"]] == ["flux1.1-pro", "flux-pro-1.1"]

    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="x", max_retries=0, timeout=30)
    result = client.images.generate(model="flux1.1-pro", prompt="a harbour", size="1024x1024")
    assert len(data_of(result)) == 1
    url = data_of(result)[0].url
    assert url is not None and url.startswith(f"{base_url}/v1/images/files/")
    download = httpx.get(url, timeout=10)
    assert download.status_code == 200
    assert download.headers["content-type"] == "image/png"
    assert_image(download.content, "png", (1024, 1024))

    assert_graceful_exit(server)
    # The access log names the link it served, never its signature.
    signature = httpx.URL(url).params["signature"]
    assert f"GET {httpx.URL(url).path} HTTP/1.1" in server.output()
    assert signature not in server.output()


def test_server_port_from_the_config_file_is_used(spawn, tmp_path):
    port = free_port()
    config = tmp_path / "flux-proxy.yaml"
    config.write_text(
        f"server:\n  port: {port}\n"
        "models:\n  sketch:\n    provider: local\n    aliases: [sketchy]\n"
    )
    server = spawn("serve", "--config", str(config))
    models = wait_until_serving(server, f"http://127.0.0.1:{port}")
    assert models.status_code == 200
    assert [model["id"] for model in models.json()["data"]] == ["sketch", "sketchy"]
    # The start-up summary, one line, before uvicorn's own.
    assert "serving 1 model (sketch -> local), middlewares: response_format," in server.output()

    generated = httpx.post(
        f"http://127.0.0.1:{port}/v1/images/generations",
        json={"model": "sketchy", "prompt": "x", "size": "96x64", "response_format": "url"},
        timeout=30,
    )
    assert generated.status_code == 200, generated.text
    download = httpx.get(generated.json()["data"][0]["url"], timeout=10)
    assert_image(download.content, "png", (96, 64))


def test_port_option_wins_over_the_config_file(spawn, tmp_path):
    configured, wanted = free_ports(2)
    config = tmp_path / "flux-proxy.yaml"
    config.write_text(f"server:\n  port: {configured}\n")
    server = spawn("serve", "--config", str(config), "--port", str(wanted))
    assert wait_until_serving(server, f"http://127.0.0.1:{wanted}").status_code == 200
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{configured}/v1/models", timeout=1.0)


def test_emulate_unknown_provider_names_the_installed_ones():
    result = run("emulate", "no-such-provider")
    message = assert_clean_failure(result)
    assert "no-such-provider" in message


@pytest.mark.parametrize(
    ("trusted", "scheme"), [(None, "https"), ("[]", "http"), ("[10.0.0.0/8]", "http")]
)
def test_forwarded_proto_is_believed_only_from_trusted_proxies(spawn, tmp_path, trusted, scheme):
    port = free_port()
    config = tmp_path / "flux-proxy.yaml"
    text = f"server:\n  port: {port}\n"
    if trusted is not None:  # None: the default, loopback
        text += f"  forwarded_allow_ips: {trusted}\n"
    config.write_text(text)
    server = spawn("serve", "--config", str(config))
    assert wait_until_serving(server, f"http://127.0.0.1:{port}").status_code == 200
    generated = httpx.post(
        f"http://127.0.0.1:{port}/v1/images/generations",
        json={"prompt": "x", "size": "64x64", "response_format": "url"},
        headers={"X-Forwarded-Proto": "https", "Host": "images.example.com"},
        timeout=30,
    )
    assert generated.status_code == 200, generated.text
    url = generated.json()["data"][0]["url"]
    assert url.startswith(f"{scheme}://images.example.com/v1/images/files/"), url
