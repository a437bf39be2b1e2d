"""The S3 image store against a real S3 API on loopback (moto's server, one per module):
two replicas share one bucket, presigned links fetch from the bucket itself, expired
objects are not served, and an unreachable bucket fails readiness and ``url`` answers
(503, Retry-After) while ``b64_json`` answers go on."""

from __future__ import annotations

import base64
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
import yaml
from moto.server import ThreadedMotoServer

from flux_proxy import FluxProxy
from flux_proxy.config import ConfigError
from flux_proxy.s3_store import BucketAddress, S3ImageStore
from flux_proxy.sigv4 import AwsCredentials, SigV4Signer
from tests.images import assert_image, make_image
from tests.servers import free_port
from tests.upstream_openai import RecordingUpstream

SCRIPT = Path(sys.executable).with_name("flux-proxy")
SECRET = "s3-secret-never-shown-7f3a"
KEY_ID = "AKIDFLUXPROXYTEST"
AWS = {"AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET}
SIGNING = {"FLUX_PROXY_SIGNING_KEY": "shared-by-every-replica"}
ASK = {"model": "flux1.1-pro", "prompt": "a lighthouse", "size": "64x48"}


@pytest.fixture(scope="module")
def moto() -> Iterator[str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def bucket_call(method: str, url: str) -> httpx.Response:
    """One signed call to moto, for the test's own look into the bucket."""
    request = httpx.Request(method, url)
    SigV4Signer(AwsCredentials(KEY_ID, SECRET), "us-east-1").sign(request)
    with httpx.Client() as client:
        response = client.send(request)
    assert response.status_code == 200, response.text
    return response


def keys_in(endpoint: str, bucket: str) -> list[str]:
    listing = bucket_call("GET", f"{endpoint}/{bucket}?list-type=2").text
    return re.findall(r"<Key>([^<]+)</Key>", listing)


@pytest.fixture
def bucket(moto: str) -> str:
    """A fresh bucket for each test: nothing of one test's objects reaches another."""
    name = f"images-{uuid.uuid4().hex[:12]}"
    bucket_call("PUT", f"{moto}/{name}")
    return name


def s3_config(endpoint: str, bucket: str, **s3: Any) -> dict[str, Any]:
    return {
        "store": {
            "backend": "s3",
            "ttl_seconds": 600,
            "s3": {"bucket": bucket, "endpoint_url": endpoint, "prefix": "replicas", **s3},
        }
    }


def generate(gateway: str, response_format: str) -> httpx.Response:
    body = {**ASK, "response_format": response_format}
    return httpx.post(f"{gateway}/v1/images/generations", json=body, timeout=30)


def assert_secret_absent(*texts: str) -> None:
    for text in texts:
        assert SECRET not in text


# --- two replicas, one bucket -------------------------------------------------------------


def wait_ready(process: subprocess.Popen[bytes], base_url: str, log: Path) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"flux-proxy exited early:\n{log.read_text(errors='replace')}")
        try:
            if httpx.get(f"{base_url}/readyz", timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    pytest.fail(f"flux-proxy was not ready:\n{log.read_text(errors='replace')}")


@pytest.fixture
def replicas(tmp_path: Path, moto: str, bucket: str) -> Iterator[tuple[list[str], str]]:
    """Two `flux-proxy serve` processes on one bucket and one signing key."""
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(s3_config(moto, bucket)))
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("FLUX_", "AWS_"))}
    environ.update(AWS, **SIGNING)
    started: list[tuple[subprocess.Popen[bytes], str, Path]] = []
    try:
        for index in range(2):
            port = free_port()
            log = tmp_path / f"replica-{index}.log"
            with log.open("wb") as sink:
                process = subprocess.Popen(
                    [str(SCRIPT), "serve", "--port", str(port), "--config", str(config)],
                    stdout=sink,
                    stderr=subprocess.STDOUT,
                    env=environ,
                )
            started.append((process, f"http://127.0.0.1:{port}", log))
        for process, url, log in started:
            wait_ready(process, url, log)
        yield [url for _, url, _ in started], bucket
    finally:
        for process, _, log in started:
            process.terminate()
            process.wait(timeout=10)
            assert_secret_absent(log.read_text(errors="replace"))


def test_a_link_made_by_one_replica_is_served_by_the_other(replicas, moto):
    (first, second), bucket = replicas
    made = generate(first, "url")
    assert made.status_code == 200, made.text
    (image,) = made.json()["data"]
    link = urlsplit(image["url"])
    assert f"{link.scheme}://{link.netloc}" == first  # the gateway's own signed link
    expires = int(parse_qs(link.query)["expires"][0])
    assert 600 - 120 < expires - time.time() <= 600  # store.ttl_seconds, not the default
    served = httpx.get(f"{second}{link.path}?{link.query}")
    assert served.status_code == 200, served.text
    assert served.headers["content-type"] == "image/png"
    assert_image(served.content, "png", (64, 48))
    # The object is the bucket's, under the configured prefix, and nowhere else.
    assert keys_in(moto, bucket) == [f"replicas/{Path(link.path).name}"]
    # A changed signature is refused by the replica that did not make the link either.
    forged = httpx.get(f"{second}{link.path}?{link.query[:-4]}beef")
    assert forged.status_code == 403


# --- in-process gateways ------------------------------------------------------------------


def test_presigned_links_fetch_the_object_from_the_bucket(start_gateway, moto, bucket):
    # By name: a host on loopback, trusted because it is the configured bucket endpoint
    # (the gateway refuses private addresses to every name it was not given).
    moto = moto.replace("127.0.0.1", "localhost")
    gateway = start_gateway(s3_config(moto, bucket, links="presigned"), environ=AWS)
    made = generate(gateway, "url")
    assert made.status_code == 200, made.text
    (image,) = made.json()["data"]
    link = urlsplit(image["url"])
    assert f"{link.scheme}://{link.netloc}" == moto
    assert link.path.startswith(f"/{bucket}/replicas/")
    query = parse_qs(link.query)
    assert query["X-Amz-Expires"] == ["600"]  # store.ttl_seconds
    assert query["X-Amz-Credential"][0].startswith(f"{KEY_ID}/")
    assert_secret_absent(image["url"])
    fetched = httpx.get(image["url"])
    assert fetched.status_code == 200, fetched.text
    assert_image(fetched.content, "png", (64, 48))
    # The signature is what opens it: the bare object URL is refused.
    assert httpx.get(f"{moto}{link.path}").status_code == 403


def test_b64_json_answers_leave_the_bucket_alone(start_gateway, moto, bucket):
    gateway = start_gateway(s3_config(moto, bucket), environ=AWS)
    answer = generate(gateway, "b64_json")
    assert answer.status_code == 200, answer.text
    assert keys_in(moto, bucket) == []


def test_an_unreachable_bucket_fails_readiness_and_url_but_not_b64(start_gateway, bucket):
    # A bucket of its own that the test stops: the gateway saw it up, then it goes away.
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    gateway = start_gateway(s3_config(endpoint, bucket, check_seconds=0), environ=AWS)
    try:
        assert httpx.get(f"{gateway}/readyz").status_code == 200
        assert generate(gateway, "url").status_code == 200
    finally:
        server.stop()
    ready = httpx.get(f"{gateway}/readyz")
    url = generate(gateway, "url")
    b64 = generate(gateway, "b64_json")
    assert ready.status_code == 503
    assert ready.json()["checks"]["store"] == "the image bucket is unreachable"
    assert httpx.get(f"{gateway}/healthz").status_code == 200  # alive: no restart helps
    assert url.status_code == 503
    assert url.headers["retry-after"].isdigit()
    error = url.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["code"]) == ("server_error", "image_store_unavailable")
    assert "b64_json" in error["message"]  # says what still works
    assert endpoint not in error["message"] and bucket not in error["message"]
    assert b64.status_code == 200, b64.text
    (image,) = b64.json()["data"]
    assert_image(base64.b64decode(image["b64_json"]), "png", (64, 48))
    assert_secret_absent(ready.text, url.text)


def test_a_url_request_fails_before_the_provider_while_the_bucket_is_known_down(
    start_gateway, serve_upstream
):
    recording = RecordingUpstream()
    upstream = serve_upstream(recording.app())
    config = {
        **s3_config(f"http://127.0.0.1:{free_port()}", "b", check_seconds=60),  # nothing there
        "models": {"relay": {"provider": "openai", "base_url": f"{upstream}/v1"}},
    }
    gateway = start_gateway(config, environ={**AWS, "OPENAI_API_KEY": "sk-up"})
    assert httpx.get(f"{gateway}/readyz").status_code == 503  # the store learns it is down
    ask = {"model": "relay", "prompt": "a lighthouse", "size": "64x48"}
    url = httpx.post(f"{gateway}/v1/images/generations", json=ask)
    assert url.status_code == 503
    assert url.json()["error"]["code"] == "image_store_unavailable"
    assert recording.requests == []  # no provider was paid for an image with nowhere to go
    b64 = httpx.post(
        f"{gateway}/v1/images/generations", json={**ask, "response_format": "b64_json"}
    )
    assert b64.status_code == 200, b64.text
    assert len(recording.requests) == 1


def test_presigned_links_need_no_gateway_signing_key(caplog):
    config = s3_config("http://127.0.0.1:9", "b", links="presigned")
    with caplog.at_level("WARNING", logger="flux_proxy"):
        FluxProxy(config, environ=AWS)
        FluxProxy(s3_config("http://127.0.0.1:9", "b"), environ=AWS)
    warned = [r.getMessage() for r in caplog.records if "FLUX_PROXY_SIGNING_KEY" in r.getMessage()]
    assert len(warned) == 1  # the gateway-links store only


def test_a_missing_bucket_is_named_as_such_in_readiness(start_gateway, moto):
    gateway = start_gateway(s3_config(moto, "no-such-bucket-here"), environ=AWS)
    ready = httpx.get(f"{gateway}/readyz")
    assert ready.status_code == 503
    assert ready.json()["checks"]["store"] == "the image bucket does not exist"


class CountingTransport(httpx.AsyncBaseTransport):
    """The real wire, counting what the gateway asks of the bucket."""

    def __init__(self) -> None:
        self._wire = httpx.AsyncHTTPTransport()
        self.methods: list[str] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.methods.append(request.method)
        return await self._wire.handle_async_request(request)

    async def aclose(self) -> None:
        await self._wire.aclose()


@pytest.mark.parametrize(("check_seconds", "heads"), [(60, 1), (0, 3)])
def test_readiness_asks_the_bucket_at_most_once_per_check_interval(
    start_gateway, moto, bucket, check_seconds, heads
):
    transport = CountingTransport()
    config = s3_config(moto, bucket, check_seconds=check_seconds)
    gateway = start_gateway(config, environ=AWS, transport=transport)
    for _ in range(3):
        assert httpx.get(f"{gateway}/readyz").status_code == 200
    assert transport.methods == ["HEAD"] * heads


# --- the store itself ---------------------------------------------------------------------


@pytest.mark.anyio
async def test_objects_past_their_ttl_are_not_served(moto, bucket):
    now = [1_000_000.0]
    signer = SigV4Signer(AwsCredentials(KEY_ID, SECRET), "us-east-1")
    async with httpx.AsyncClient() as client:
        store = S3ImageStore(
            lambda: client,
            BucketAddress(moto, bucket, path_style=True),
            signer,
            prefix="p/",
            ttl_seconds=60,
            timeout_seconds=5,
            presigned_links=False,
            check_seconds=2,
            clock=lambda: now[0],
        )
        png = make_image("png", (8, 6))
        name = await store.put(png, "png")
        fresh = await store.get(name)
        now[0] += 61
        stale = await store.get(name)
        missing = await store.get("A" * 32 + ".png")
    assert fresh is not None and fresh.data == png and fresh.media_type == "image/png"
    assert stale is None
    assert missing is None
    assert store.direct_url(name) is None  # gateway links in this mode


# --- configuration ------------------------------------------------------------------------


def test_the_s3_backend_needs_a_bucket():
    with pytest.raises(ConfigError, match=r"store: .*s3\.bucket is required"):
        FluxProxy({"store": {"backend": "s3"}}, environ=AWS)


def test_the_s3_backend_needs_credentials_and_names_only_the_variables():
    with pytest.raises(ConfigError) as raised:
        FluxProxy(s3_config("http://127.0.0.1:9", "b"), environ={"AWS_ACCESS_KEY_ID": KEY_ID})
    assert "AWS_SECRET_ACCESS_KEY" in str(raised.value)
    assert KEY_ID not in str(raised.value)


def test_presigned_links_cannot_outlive_sigv4s_week():
    config = s3_config("http://127.0.0.1:9", "b", links="presigned")
    config["store"]["ttl_seconds"] = 8 * 24 * 3600
    with pytest.raises(ConfigError, match="604800"):
        FluxProxy(config, environ=AWS)


def presigned_link_of(environ: dict[str, str]) -> str:
    config = {"store": {"backend": "s3", "s3": {"bucket": "b", "links": "presigned"}}}
    url = FluxProxy(config, environ={**AWS, **environ}).runtime.store.direct_url("A" * 32 + ".png")
    assert url is not None
    return url


def test_the_region_and_endpoint_fall_back_to_the_standard_aws_variables():
    on_aws = presigned_link_of({"AWS_REGION": "eu-west-3"})
    assert on_aws.startswith("https://b.s3.eu-west-3.amazonaws.com/flux-proxy/")  # virtual-hosted
    credential = parse_qs(urlsplit(on_aws).query)["X-Amz-Credential"][0]
    assert credential.endswith("/eu-west-3/s3/aws4_request")
    default = presigned_link_of({"AWS_DEFAULT_REGION": "ap-south-1"})
    assert default.startswith("https://b.s3.ap-south-1.amazonaws.com/")
    custom = presigned_link_of({"AWS_ENDPOINT_URL": "http://minio.local:9000/"})
    assert custom.startswith("http://minio.local:9000/b/flux-proxy/")  # path-style
