"""deploy/nginx: a real nginx, configured from the shipped template, in front of
flux-proxy and a small application, driven with the official openai SDK.

nginx terminates TLS (a throwaway self-signed certificate) on a free loopback port,
so the hosted-image links must carry the scheme and host nginx forwarded, not
flux-proxy's own http://127.0.0.1:PORT. When the tests run as root, nginx runs as
nobody (no `user` switch, no privileged port), in its own prefix under a temporary
directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import httpx
import openai
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from flux_proxy import FluxProxy
from tests.images import assert_image, data_of
from tests.servers import free_port, serve
from tests.waiting import wait_for

ROOT = Path(__file__).parents[1]
TEMPLATE = ROOT / "deploy" / "nginx" / "flux-proxy.conf.template"
NOBODY = 65534
UPLOAD_BYTES = 10 * 1024 * 1024
# How long the app holds its stream open waiting for the client to see the first event;
# a buffering proxy delivers nothing until the stream ends, so the wait runs out.
RELEASE_WAIT_SECONDS = 10


@dataclass
class App:
    """An application with its own OpenAI-style routes, recording what reached it."""

    paths: list[str] = field(default_factory=list)
    released: threading.Event = field(default_factory=threading.Event)
    # Whether the client had seen the first event before the app sent the rest.
    first_event_seen_in_time: list[bool] = field(default_factory=list)

    def asgi(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/v1/chat/completions", self.chat, methods=["POST"]),
                Route("/v1/files", self.upload, methods=["POST"]),
            ]
        )

    async def chat(self, request: Request) -> Response:
        self.paths.append(request.url.path)
        body = await request.json()
        if not body.get("stream"):
            return JSONResponse(completion("answered by the app"))
        return StreamingResponse(self.events(), media_type="text/event-stream")

    async def events(self) -> AsyncIterator[str]:
        yield f"data: {json.dumps(chunk('first'))}\n\n"
        seen = await anyio.to_thread.run_sync(self.released.wait, RELEASE_WAIT_SECONDS)
        self.first_event_seen_in_time.append(seen)
        for word in (" second", " third"):
            yield f"data: {json.dumps(chunk(word))}\n\n"
        yield "data: [DONE]\n\n"

    async def upload(self, request: Request) -> Response:
        self.paths.append(request.url.path)
        parts = multipart(request.headers["content-type"], await request.body())
        data = parts["file"]
        return JSONResponse(
            {
                "id": "file-" + hashlib.sha256(data).hexdigest(),
                "object": "file",
                "bytes": len(data),
                "created_at": 0,
                "filename": "big.bin",
                "purpose": parts["purpose"].decode(),
                "status": "processed",
            }
        )


def multipart(content_type: str, body: bytes) -> dict[str, bytes]:
    """A multipart/form-data body by field name (python-multipart is no dependency here)."""
    boundary = content_type.split("boundary=", 1)[1].strip('"').encode()
    fields = {}
    for part in body.split(b"--" + boundary)[1:-1]:
        head, _, content = part.removeprefix(b"\r\n").partition(b"\r\n\r\n")
        (name,) = re.findall(rb'\bname="([^"]+)"', head)
        fields[name.decode()] = content.removesuffix(b"\r\n")
    return fields


def completion(text: str) -> dict[str, object]:
    message = {"role": "assistant", "content": text}
    return chat_object("chat.completion", {"message": message, "finish_reason": "stop"})


def chunk(text: str) -> dict[str, object]:
    return chat_object("chat.completion.chunk", {"delta": {"content": text}, "finish_reason": None})


def chat_object(kind: str, choice: dict[str, object]) -> dict[str, object]:
    created = {"id": "chatcmpl-app", "object": kind, "created": 0, "model": "app-model"}
    return {**created, "choices": [{"index": 0, **choice}]}


def nginx_binary() -> str:
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")
    if found is None:
        pytest.fail(
            "nginx is not installed: .ci/run installs Debian's package "
            "(apt-get install nginx); these tests run a real one"
        )
    return found


def fill(template: str, values: dict[str, str]) -> str:
    """envsubst with a list of names: ${NAME} is replaced, nginx's own $vars are not."""
    names = set(re.findall(r"\$\{(\w+)\}", template))
    assert names == set(values), f"the template's placeholders are {sorted(names)}"
    return re.sub(r"\$\{(\w+)\}", lambda match: values[match.group(1)], template)


def self_signed(directory: Path) -> tuple[Path, Path]:
    certificate, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
            "-addext", "subjectAltName=IP:127.0.0.1",
            "-keyout", str(key), "-out", str(certificate),
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return certificate, key


@dataclass
class Site:
    base_url: str
    app: App
    tls: ssl.SSLContext


@pytest.fixture(scope="module")
def site() -> Iterator[Site]:
    binary = nginx_binary()
    app = App()
    # Not pytest's tmp_path: that is private to root, and nginx runs as nobody.
    prefix = Path(tempfile.mkdtemp(prefix="flux-proxy-nginx-"))
    try:
        certificate, key = self_signed(prefix)
        port = free_port()
        with serve(FluxProxy({}, environ={})) as gateway, serve(app.asgi()) as application:
            site_conf = prefix / "flux-proxy.conf"
            site_conf.write_text(
                fill(
                    TEMPLATE.read_text(),
                    {
                        "FLUX_PROXY": gateway.removeprefix("http://"),
                        "APP": application.removeprefix("http://"),
                        "LISTEN": f"127.0.0.1:{port}",
                        "SERVER_NAME": "127.0.0.1",
                        "TLS_CERTIFICATE": str(certificate),
                        "TLS_CERTIFICATE_KEY": str(key),
                    },
                )
            )
            (prefix / "nginx.conf").write_text(main_config(prefix, site_conf))
            command = [binary, "-p", str(prefix), "-c", "nginx.conf", "-g", "daemon off;"]
            if os.geteuid() == 0:
                for path in [prefix, *prefix.iterdir()]:
                    os.chown(path, NOBODY, NOBODY)
                command = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}",
                           "--clear-groups", *command]  # fmt: skip
            process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
            try:
                assert wait_for(lambda: listening(port, process), seconds=10), "nginx did not start"
                tls = ssl.create_default_context(cafile=str(certificate))
                yield Site(f"https://127.0.0.1:{port}", app, tls)
            finally:
                process.send_signal(signal.SIGTERM)  # fast shutdown
                try:
                    process.communicate(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.communicate()
    finally:
        shutil.rmtree(prefix, ignore_errors=True)


def main_config(prefix: Path, site_conf: Path) -> str:
    """The smallest nginx.conf around the site: everything under the prefix."""
    temp = "\n".join(
        f"    {kind}_temp_path {prefix / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return (
        f"pid {prefix / 'nginx.pid'};\n"
        f"error_log {prefix / 'error.log'} warn;\n"
        "worker_processes 1;\n"
        "events { worker_connections 64; }\n"
        "http {\n"
        "    access_log off;\n"
        f"{temp}\n"
        f"    include {site_conf};\n"
        "}\n"
    )


def listening(port: int, process: subprocess.Popen[str]) -> bool:
    assert process.poll() is None, process.communicate()[1]
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


@pytest.fixture
def client(site: Site) -> Iterator[openai.OpenAI]:
    with openai.DefaultHttpxClient(verify=site.tls, timeout=30) as http:
        yield openai.OpenAI(
            base_url=f"{site.base_url}/v1", api_key="unused", max_retries=0, http_client=http
        )


def test_image_requests_are_answered_by_flux_proxy_with_public_links(site, client):
    models = {model.id for model in client.models.list()}
    assert models == {"flux1.1-pro", "flux-pro-1.1"}  # flux-proxy's list, not the app's
    answer = client.images.generate(model="flux1.1-pro", prompt="a lighthouse", size="256x256")
    url = data_of(answer)[0].url or ""
    # The scheme and host the client used at nginx, not flux-proxy's plain loopback address.
    assert url.startswith(f"{site.base_url}/v1/images/files/"), url
    with httpx.Client(verify=site.tls) as http:
        image = http.get(url)
    assert image.status_code == 200
    assert_image(image.content, "png", (256, 256))
    assert not [path for path in site.app.paths if "/images/" in path or "/models" in path]


def test_other_api_calls_reach_the_application(site, client):
    reply = client.chat.completions.create(
        model="app-model", messages=[{"role": "user", "content": "hello"}]
    )
    assert reply.choices[0].message.content == "answered by the app"
    assert "/v1/chat/completions" in site.app.paths


def test_a_streamed_chat_answer_arrives_event_by_event(site, client):
    site.app.released.clear()
    stream = client.chat.completions.create(
        model="app-model", messages=[{"role": "user", "content": "hello"}], stream=True
    )
    texts = []
    for event in stream:
        texts.append(event.choices[0].delta.content)
        site.app.released.set()  # the app sends the rest only once this is seen
    assert texts == ["first", " second", " third"]
    # The app was still holding the rest back when the client got the first event.
    assert site.app.first_event_seen_in_time == [True]


def test_a_large_upload_passes(site, client):
    data = os.urandom(UPLOAD_BYTES)
    uploaded = client.files.create(file=("big.bin", data), purpose="batch")
    assert uploaded.bytes == UPLOAD_BYTES
    assert uploaded.id == "file-" + hashlib.sha256(data).hexdigest()
