"""Slow and oversized clients against the real ``flux-proxy serve``, over raw sockets:
a head or a body that takes longer than its limit gets a 408 and a closed
connection, and an early 413 closes the connection instead of reading on."""

from __future__ import annotations

import json
import socket
import subprocess
from collections.abc import Iterator

import pytest
import yaml

from tests.test_cli import SCRIPT, Server, clean_environ, free_port, wait_until_serving

# Small limits, so that the slow clients below are cut off quickly.
CONFIG = {
    "limits": {"client_header_timeout": 0.5, "client_body_timeout": 0.5, "max_body_bytes": 2048}
}
# A generous bound on any wait for the server: only a hang fails on it.
SOCKET_TIMEOUT = 15.0


@pytest.fixture(scope="module")
def address(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    folder = tmp_path_factory.mktemp("serve")
    config = folder / "config.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    port = free_port()
    log = folder / "server.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [str(SCRIPT), "serve", "--port", str(port), "--config", str(config)],
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=clean_environ(),
        )
    server = Server(process, log)
    try:
        wait_until_serving(server, f"http://127.0.0.1:{port}")
        yield ("127.0.0.1", port)
    finally:
        process.kill()
        process.wait(timeout=10)


def exchange(address: tuple[str, int], sent: bytes) -> bytes:
    """Send ``sent`` and no more, then read until the server closes the connection."""
    with socket.create_connection(address, timeout=SOCKET_TIMEOUT) as sock:
        sock.sendall(sent)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    return received


def answer(received: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = received.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers, body


def assert_openai_error_body(body: bytes, code: str) -> None:
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert error["code"] == code, error


def test_headers_sent_too_slowly_get_a_408_and_the_connection_closes(address):
    # Half a head, then silence: the server must end it, not wait for the rest.
    status, headers, body = answer(
        exchange(address, b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\n")
    )
    assert status == 408
    assert headers["connection"] == "close"
    assert_openai_error_body(body, "request_timeout")


def test_a_connection_that_sends_nothing_is_closed_without_an_answer(address):
    # An answer on an idle connection would be read as the answer to its next request.
    assert exchange(address, b"") == b""


def test_a_body_sent_too_slowly_gets_a_408_and_the_connection_closes(address):
    head = (
        b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\n"
        b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
    )
    status, headers, body = answer(exchange(address, head + b'{"prompt": "'))
    assert status == 408
    assert headers["connection"] == "close"
    assert_openai_error_body(body, "request_timeout")


def test_an_early_413_closes_the_connection_without_reading_the_body(address):
    head = (
        b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\n"
        b"Content-Type: application/json\r\nContent-Length: 100000000\r\n\r\n"
    )
    # No body follows: the answer comes from the head alone, and then the server closes.
    status, headers, body = answer(exchange(address, head))
    assert status == 413
    assert headers["connection"] == "close"
    assert_openai_error_body(body, "request_too_large")


def test_an_oversized_head_is_refused(address):
    """uvicorn's h11 caps a head (16 KiB), its default parser httptools does not:
    the gateway's own guard does. Refused: a 431, or a reset when the server closes
    on bytes it did not read; never an answer to the request."""
    padding = b"".join(b"X-Pad-%d: %s\r\n" % (index, b"a" * 1000) for index in range(1000))
    received = b""
    with socket.create_connection(address, timeout=SOCKET_TIMEOUT) as sock:
        try:
            sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n" + padding + b"\r\n")
            while chunk := sock.recv(65536):
                received += chunk
        except (BrokenPipeError, ConnectionResetError):
            pass  # closed while the rest of the head was still arriving
    if received:
        status, _, body = answer(received)
        assert status == 431, received[:200]
        assert_openai_error_body(body, "request_headers_too_large")
