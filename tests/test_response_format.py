"""response_format: url and b64_json whatever the upstream returns; signed, expiring links."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from urllib.parse import parse_qs, urlsplit

import httpx
import openai
import pytest

from tests.images import assert_image, data_of
from tests.openapi import assert_openai_error
from tests.servers import ServeUpstream, serve
from tests.upstream_openai import RecordingUpstream, gateway_config

KEY = "test-signing-key"


def sign(name: str, expires: int) -> str:
    return hmac.new(KEY.encode(), f"{name}\n{expires}".encode(), hashlib.sha256).hexdigest()


def image_url(gateway: str) -> str:
    response = httpx.post(
        f"{gateway}/v1/images/generations",
        json={"model": "flux1.1-pro", "prompt": "x", "size": "64x48"},
    )
    assert response.status_code == 200, response.text
    url: str = response.json()["data"][0]["url"]
    return url


def test_signed_link_serves_the_image(start_gateway):
    gateway = start_gateway(environ={"FLUX_PROXY_SIGNING_KEY": KEY})
    url = image_url(gateway)
    assert url.startswith(f"{gateway}/v1/images/files/")
    download = httpx.get(url)
    assert_image(download.content, "png", (64, 48))
    assert httpx.head(url).status_code == 200


def test_tampered_or_missing_signature_is_403(start_gateway):
    gateway = start_gateway(environ={"FLUX_PROXY_SIGNING_KEY": KEY})
    url = image_url(gateway)
    parts = urlsplit(url)
    query = parse_qs(parts.query)
    base = f"{gateway}{parts.path}"
    later = int(query["expires"][0]) + 100_000
    cases = [
        base,
        f"{base}?expires={query['expires'][0]}",
        f"{base}?expires={query['expires'][0]}&signature={'0' * 64}",
        f"{base}?expires={later}&signature={query['signature'][0]}",  # extended expiry
    ]
    for tampered in cases:
        response = httpx.get(tampered)
        error = assert_openai_error(response, 403)
        assert not response.headers["content-type"].startswith("image/")
        assert error["code"] == "invalid_signature"


def test_expired_link_is_403_even_when_correctly_signed(start_gateway):
    gateway = start_gateway(environ={"FLUX_PROXY_SIGNING_KEY": KEY})
    path = urlsplit(image_url(gateway)).path
    name = path.rsplit("/", 1)[1]
    expires = int(time.time()) - 5
    response = httpx.get(f"{gateway}{path}?expires={expires}&signature={sign(name, expires)}")
    assert assert_openai_error(response, 403)["code"] == "link_expired"


def test_unknown_image_with_valid_signature_is_404(start_gateway):
    gateway = start_gateway(environ={"FLUX_PROXY_SIGNING_KEY": KEY})
    name = "A" * 32 + ".png"
    expires = int(time.time()) + 60
    response = httpx.get(
        f"{gateway}/v1/images/files/{name}?expires={expires}&signature={sign(name, expires)}"
    )
    assert_openai_error(response, 404)


def test_directory_store_survives_a_restart(start_gateway, tmp_path):
    config = {"store": {"backend": "directory", "directory": str(tmp_path)}}
    environ = {"FLUX_PROXY_SIGNING_KEY": KEY}
    first = start_gateway(config, environ=environ)
    url = image_url(first)
    assert len(list(tmp_path.glob("*.png"))) == 1
    second = start_gateway(config, environ=environ)
    moved = url.replace(first, second)
    assert_image(httpx.get(moved).content, "png", (64, 48))


@pytest.fixture
def url_upstream(serve_upstream: ServeUpstream) -> tuple[RecordingUpstream, str]:
    recorder = RecordingUpstream()
    return recorder, serve_upstream(recorder.app())


def test_b64_json_from_an_upstream_that_returns_urls(url_upstream, start_gateway):
    recorder, url = url_upstream
    gateway = start_gateway(gateway_config(url))
    client = openai.OpenAI(base_url=f"{gateway}/v1", api_key="x", max_retries=0)
    result = client.images.generate(
        model="up", prompt="x", size="200x100", response_format="b64_json"
    )
    assert base64.b64decode(data_of(result)[0].b64_json or "") == recorder.produced[0]


def test_upstream_urls_are_hosted_by_default(url_upstream, start_gateway):
    recorder, url = url_upstream
    gateway = start_gateway(gateway_config(url))
    response = httpx.post(
        f"{gateway}/v1/images/generations",
        json={"model": "up", "prompt": "x", "size": "200x100", "response_format": "url"},
    )
    hosted = response.json()["data"][0]["url"]
    assert hosted.startswith(gateway)
    assert httpx.get(hosted).content == recorder.produced[0]
    report = json.loads(response.headers["x-flux-proxy-params"])
    assert report["response_format"]["handling"] == "emulated"


def test_upstream_urls_returned_as_they_are_by_config(url_upstream, start_gateway):
    _, url = url_upstream
    gateway = start_gateway(gateway_config(url, return_upstream_urls=True))
    exact = httpx.post(
        f"{gateway}/v1/images/generations",
        json={"model": "up", "prompt": "x", "size": "200x100", "output_format": "png"},
    ).json()["data"][0]["url"]
    assert exact.startswith(f"{url}/files/")
    # A change (here: a format the upstream cannot make) means the gateway hosts it.
    changed = httpx.post(
        f"{gateway}/v1/images/generations",
        json={"model": "up", "prompt": "x", "size": "200x100", "output_format": "gif"},
    ).json()["data"][0]["url"]
    assert changed.startswith(gateway)
    assert_image(httpx.get(changed).content, "gif", (200, 100))


def test_gateway_refuses_image_urls_on_private_addresses(url_upstream, start_gateway):
    recorder, url = url_upstream
    # The upstream points at a loopback host that is not the configured one.
    recorder.url_base = url.replace("127.0.0.1", "localhost")
    gateway = start_gateway(gateway_config(url))
    response = httpx.post(
        f"{gateway}/v1/images/generations",
        json={"model": "up", "prompt": "x", "size": "200x100", "response_format": "b64_json"},
    )
    error = assert_openai_error(response, 502)
    assert "private address" in error["message"]
    assert len(recorder.requests) == 1


def test_allow_private_hosts_lets_the_operator_trust_a_host(url_upstream, start_gateway):
    recorder, url = url_upstream
    recorder.url_base = url.replace("127.0.0.1", "localhost")
    config = gateway_config(url)
    config["fetch"] = {"allow_private_hosts": ["localhost"]}
    gateway = start_gateway(config)
    response = httpx.post(
        f"{gateway}/v1/images/generations",
        json={"model": "up", "prompt": "x", "size": "200x100", "response_format": "b64_json"},
    )
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "10.1.2.3",
        "169.254.169.254",
        "::1",
        "::ffff:127.0.0.1",
        "::127.0.0.1",
        "64:ff9b::7f00:1",
        "64:ff9b::a9fe:a9fe",
        "2002:7f00:1::",
        "fd00::1",
    ],
)
def test_private_addresses_in_any_disguise_are_not_public(address):
    import ipaddress

    from flux_proxy.addresses import is_public

    assert not is_public(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", ["93.184.215.14", "2606:4700::1111", "64:ff9b::5db8:d70e"])
def test_public_addresses_are_public(address):
    import ipaddress

    from flux_proxy.addresses import is_public

    assert is_public(ipaddress.ip_address(address))


def test_a_trusted_provider_host_is_trusted_on_its_own_port_only(url_upstream, start_gateway):
    recorder, url = url_upstream
    other = RecordingUpstream()
    with serve(other.app()) as other_url:
        recorder.url_base = other_url  # same host (127.0.0.1), another port
        gateway = start_gateway(gateway_config(url))
        response = httpx.post(
            f"{gateway}/v1/images/generations",
            json={"model": "up", "prompt": "x", "size": "200x100", "response_format": "b64_json"},
        )
    assert "private address" in assert_openai_error(response, 502)["message"]
