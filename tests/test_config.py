"""Settings: the YAML/TOML file, FLUX_PROXY_* environment overrides, and config errors."""

from __future__ import annotations

import base64
import os
import textwrap
from pathlib import Path
from typing import Any

import httpx
import pytest

from flux_proxy import FluxProxy
from flux_proxy.config import ConfigError, EnvironmentSource, Settings, load_settings
from tests.images import assert_image

FULL_CONFIG = """
server:
  port: 8000
limits:
  max_n: 2
  max_side: 2048
models:
  flux-dev:
    provider: openai
    upstream_model: black-forest-labs/FLUX.1-dev
    base_url: http://upstream.internal:9000/v1
    api_key_env: UPSTREAM_KEY
    aliases: [dev, flux-1-dev]
    description: FLUX.1 [dev] behind an OpenAI-compatible server
    capabilities:
      max_images_per_call: 4
      output_formats: [jpeg, png]
      sizes:
        multiple_of: 16
    options:
      response_format: b64_json
      trusted_hosts: [mirror.internal]
  sketch:
    provider: local
"""


def write(tmp_path: Path, text: str, name: str = "flux-proxy.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def config_error(path: Path | None = None, environ: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as caught:
        load_settings(path, environ or {})
    return str(caught.value)


async def generate(app: Any, body: dict[str, Any], **headers: str) -> httpx.Response:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
        return await http.post("/v1/images/generations", json=body, headers=headers)


# --- loading a file --------------------------------------------------------------------


def test_yaml_file_with_models_loads(tmp_path):
    settings = load_settings(write(tmp_path, FULL_CONFIG), {})

    assert list(settings.models) == ["flux-dev", "sketch"]
    dev = settings.models["flux-dev"]
    assert dev.providers[0].provider == "openai"
    assert dev.providers[0].upstream_model == "black-forest-labs/FLUX.1-dev"
    assert dev.providers[0].base_url == "http://upstream.internal:9000/v1"
    assert dev.providers[0].api_key_env == "UPSTREAM_KEY"
    assert dev.aliases == ["dev", "flux-1-dev"]
    assert dev.providers[0].capabilities == {
        "max_images_per_call": 4,
        "output_formats": ["jpeg", "png"],
        "sizes": {"multiple_of": 16},
    }
    assert dev.providers[0].options == {
        "response_format": "b64_json",
        "trusted_hosts": ["mirror.internal"],
    }
    assert settings.models["sketch"].providers[0].provider == "local"
    assert settings.models["sketch"].providers[0].upstream_model is None
    # Sections the file sets keep their other defaults.
    assert settings.limits.max_n == 2
    assert settings.limits.max_side == 2048
    assert settings.limits.fanout_concurrency == 4
    assert settings.server.host == "127.0.0.1"


def test_loaded_models_are_routed_with_their_aliases_and_capability_overrides(tmp_path):
    settings = load_settings(write(tmp_path, FULL_CONFIG), {})
    proxy = FluxProxy(settings, environ={})

    model = proxy.router.resolve("flux-1-dev")
    assert model.name == "flux-dev"
    route = model.targets[0]
    assert route.upstream_model == "black-forest-labs/FLUX.1-dev"
    # Overrides replace the provider's declared values; nested sizes merge key by key.
    assert route.capabilities.max_images_per_call == 4
    assert route.capabilities.output_formats == ("jpeg", "png")
    assert route.capabilities.sizes.multiple_of == 16
    assert route.capabilities.sizes.max_side == 14142
    assert proxy.router.resolve("sketch").targets[0].provider.name == "local"


def test_toml_file_loads(tmp_path):
    path = write(
        tmp_path,
        """
        [limits]
        max_n = 3

        [models."flux1.1-pro"]
        provider = "local"
        aliases = ["fp"]
        """,
        name="flux-proxy.toml",
    )
    settings = load_settings(path, {})
    assert settings.limits.max_n == 3
    assert settings.models["flux1.1-pro"].aliases == ["fp"]


def test_empty_file_means_defaults(tmp_path):
    settings = load_settings(write(tmp_path, "# nothing configured yet\n"), {})
    assert settings == Settings()


# --- the embedded default --------------------------------------------------------------


def test_no_config_is_the_embedded_default():
    settings = load_settings(None, {})
    assert list(settings.models) == ["flux1.1-pro"]
    model = settings.models["flux1.1-pro"]
    assert model.providers[0].provider == "local"
    assert model.aliases == ["flux-pro-1.1"]
    assert settings.server.port == 8080
    assert settings.server.api_prefix == "/v1"


@pytest.mark.anyio
async def test_embedded_default_serves_the_alias_with_real_images():
    response = await generate(
        FluxProxy(None, environ={}),
        {
            "model": "flux-pro-1.1",
            "prompt": "a red kite",
            "size": "320x200",
            "response_format": "b64_json",
        },
    )
    assert response.status_code == 200, response.text
    assert response.headers["x-flux-proxy-provider"] == "local"
    assert_image(base64.b64decode(response.json()["data"][0]["b64_json"]), "png", (320, 200))


# --- environment overrides -------------------------------------------------------------


def test_environment_overrides_the_file_with_typed_values(tmp_path):
    environ = {
        "FLUX_PROXY_LIMITS__MAX_N": "4",
        "FLUX_PROXY_SERVER__PORT": "9001",
        "FLUX_PROXY_LIMITS__REQUEST_TIMEOUT": "2.5",
        "FLUX_PROXY_STORE__RETURN_UPSTREAM_URLS": "true",
        "FLUX_PROXY_MODELS__SKETCH__ALIASES": "[s1, s2]",
        "FLUX_PROXY_MODELS__FLUX-DEV__OPTIONS__TRUSTED_HOSTS": "[a.internal, b.internal]",
    }
    settings = load_settings(write(tmp_path, FULL_CONFIG), environ)

    assert settings.limits.max_n == 4 and type(settings.limits.max_n) is int
    assert settings.server.port == 9001 and type(settings.server.port) is int
    assert settings.limits.request_timeout == 2.5
    assert settings.store.return_upstream_urls is True
    assert settings.models["sketch"].aliases == ["s1", "s2"]
    # Nested overrides merge into the file's tables instead of replacing them.
    assert settings.limits.max_side == 2048
    assert settings.models["flux-dev"].providers[0].options == {
        "response_format": "b64_json",
        "trusted_hosts": ["a.internal", "b.internal"],
    }
    assert settings.models["flux-dev"].providers[0].provider == "openai"


def test_environment_alone_overrides_the_defaults():
    settings = load_settings(None, {"FLUX_PROXY_LIMITS__MAX_N": "4"})
    assert settings.limits.max_n == 4
    assert list(settings.models) == ["flux1.1-pro"]


@pytest.mark.anyio
async def test_environment_override_takes_effect_in_the_gateway():
    settings = load_settings(None, {"FLUX_PROXY_LIMITS__MAX_N": "2"})
    response = await generate(FluxProxy(settings, environ={}), {"prompt": "x", "n": 3})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "n"


@pytest.mark.parametrize(
    ("variable", "value", "path"),
    [
        # Text settings are taken verbatim, not as YAML ("::" is a mapping there, NO is false,
        # 1.10 is the number 1.1).
        ("FLUX_PROXY_SERVER__HOST", "::", ("server", "host")),
        ("FLUX_PROXY_AUTH__API_KEYS_ENV", "NO", ("auth", "api_keys_env")),
        (
            "FLUX_PROXY_SERVER__PUBLIC_URL",
            "https://img.example.com:8443/x",
            ("server", "public_url"),
        ),
        # A model's inline provider keys land in its one-entry providers list.
        (
            "FLUX_PROXY_MODELS__FLUX1.1-PRO__UPSTREAM_MODEL",
            "1.10",
            ("models", "flux1.1-pro", "providers", 0, "upstream_model"),
        ),
    ],
)
def test_text_settings_from_the_environment_are_verbatim(variable, value, path):
    environ = {"FLUX_PROXY_MODELS__FLUX1.1-PRO__PROVIDER": "local", variable: value}
    node: Any = load_settings(None, environ).model_dump()
    for key in path:
        node = node[key]
    assert node == value


def test_store_directory_from_the_environment_is_a_path(tmp_path):
    settings = load_settings(None, {"FLUX_PROXY_STORE__DIRECTORY": str(tmp_path)})
    assert settings.store.directory == tmp_path


@pytest.mark.parametrize(
    "value", ["size,passthrough", " size , passthrough ", "[size, passthrough]"]
)
def test_list_settings_take_comma_separated_or_yaml_lists(value):
    settings = load_settings(None, {"FLUX_PROXY_MIDDLEWARES": value})
    assert settings.middlewares == ["size", "passthrough"]


def test_middlewares_from_the_environment_take_a_json_list_of_names_or_entries():
    # The list is decoded before validation, so entries may be names or {name, options}
    # mappings, whatever Settings.middlewares accepts.
    source = EnvironmentSource(
        {"FLUX_PROXY_MIDDLEWARES": '["size", {"name": "fanout", "options": {"limit": 2}}]'}
    )
    assert source() == {"middlewares": ["size", {"name": "fanout", "options": {"limit": 2}}]}
    settings = load_settings(None, {"FLUX_PROXY_MIDDLEWARES": '["size", "passthrough"]'})
    assert settings.middlewares == ["size", "passthrough"]


def test_free_form_values_from_the_environment_are_yaml_scalars():
    environ = {
        "FLUX_PROXY_MODELS__M__PROVIDER": "local",
        "FLUX_PROXY_MODELS__M__CAPABILITIES__MAX_IMAGES_PER_CALL": "4",
        "FLUX_PROXY_MODELS__M__CAPABILITIES__SIZES__MULTIPLE_OF": "16",
        "FLUX_PROXY_MODELS__M__OPTIONS__QUALITY": "high",
    }
    provider = load_settings(None, environ).models["m"].providers[0]
    assert provider.capabilities == {"max_images_per_call": 4, "sizes": {"multiple_of": 16}}
    assert provider.options == {"quality": "high"}


def test_a_whole_section_from_one_variable_is_a_flow_mapping(tmp_path):
    path = write(tmp_path, FULL_CONFIG)
    settings = load_settings(path, {"FLUX_PROXY_LIMITS": '{"max_n": 3, "max_side": 1024}'})
    assert (settings.limits.max_n, settings.limits.max_side) == (3, 1024)


def test_blank_variables_count_as_unset(tmp_path):
    path = write(tmp_path, "server:\n  public_url: https://img.example.com\n")
    environ = {"FLUX_PROXY_SERVER__PUBLIC_URL": "", "FLUX_PROXY_LIMITS__MAX_N": "  "}
    settings = load_settings(path, environ)
    assert settings.server.public_url == "https://img.example.com"
    assert settings.limits.max_n == Settings().limits.max_n


def test_settings_never_read_the_process_environment_implicitly(monkeypatch):
    monkeypatch.setattr(os, "environ", {"FLUX_PROXY_LIMITS__MAX_N": "3"})
    assert Settings().limits.max_n == 10
    assert load_settings(None, {}).limits.max_n == 10
    assert load_settings(None).limits.max_n == 3  # no mapping given: the process's own


def test_secret_variables_are_not_settings(tmp_path):
    environ = {
        "FLUX_PROXY_API_KEYS": "sk-client-1,sk-client-2",
        "FLUX_PROXY_SIGNING_KEY": "sign-me",
        "FLUX_PROXY_CONFIG": str(tmp_path / "elsewhere.yaml"),
        "FLUX_PROXYLIMITS__MAX_N": "7",  # not our prefix
        "OTHER_LIMITS__MAX_N": "7",
    }
    settings = load_settings(None, environ)
    assert settings == Settings()
    dumped = settings.model_dump_json()
    assert "sk-client" not in dumped and "sign-me" not in dumped


@pytest.mark.anyio
async def test_api_keys_variable_is_used_as_the_client_key_secret():
    environ = {"FLUX_PROXY_API_KEYS": "sk-one, sk-two"}
    app = FluxProxy(load_settings(None, environ), environ=environ)
    body = {"prompt": "x", "size": "64x64", "response_format": "b64_json"}

    assert (await generate(app, body)).status_code == 401
    assert (await generate(app, body, authorization="Bearer sk-wrong")).status_code == 401
    accepted = await generate(app, body, authorization="Bearer sk-two")
    assert accepted.status_code == 200, accepted.text
    assert_image(base64.b64decode(accepted.json()["data"][0]["b64_json"]), "png", (64, 64))


# --- errors name the bad key or the file ---------------------------------------------


def test_unknown_key_in_the_file_is_named(tmp_path):
    path = write(tmp_path, "limits:\n  max_m: 4\n")
    message = config_error(path)
    assert "limits.max_m" in message
    assert str(path) in message


def test_unknown_section_in_the_file_is_named(tmp_path):
    message = config_error(write(tmp_path, "limmits:\n  max_n: 4\n"))
    assert "limmits" in message


def test_unknown_model_field_is_named(tmp_path):
    message = config_error(write(tmp_path, "models:\n  m:\n    provider: local\n    alias: [x]\n"))
    assert "models.m.alias" in message


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("limits:\n  max_n: lots\n", "limits.max_n"),
        ("limits:\n  max_n: 0\n", "limits.max_n"),
        ("server:\n  port: 70000\n", "server.port"),
        ("store:\n  backend: s3-ish\n", "store.backend"),
        ("models:\n  m:\n    aliases: [x]\n", "models.m"),
        ("models:\n  m:\n    provider: local\n    aliases: x-and-y\n", "models.m.aliases"),
        ("middlewares: size\n", "middlewares"),
    ],
)
def test_wrong_type_or_value_in_the_file_is_named(tmp_path, text, key):
    message = config_error(write(tmp_path, text))
    assert f"{key}:" in message
    # Only the bad key is reported.
    assert len(message.splitlines()) == 2, message


def test_unknown_key_from_the_environment_names_the_key_and_variable():
    message = config_error(None, {"FLUX_PROXY_LIMITS__MAX_M": "4"})
    assert "limits.max_m" in message
    assert "FLUX_PROXY_LIMITS__MAX_M" in message


def test_wrong_type_from_the_environment_names_the_key_and_variable(tmp_path):
    message = config_error(write(tmp_path, FULL_CONFIG), {"FLUX_PROXY_SERVER__PORT": "http"})
    assert "server.port" in message
    assert "FLUX_PROXY_SERVER__PORT" in message


def test_unparseable_environment_value_is_a_config_error():
    message = config_error(None, {"FLUX_PROXY_LIMITS__MAX_N": "[1, 2"})
    assert "FLUX_PROXY_LIMITS__MAX_N" in message


def test_unparseable_list_from_the_environment_names_the_key_and_variable():
    message = config_error(None, {"FLUX_PROXY_MIDDLEWARES": "[size, passthrough"})
    assert "middlewares:" in message and "(from FLUX_PROXY_MIDDLEWARES)" in message


def test_section_variable_conflicting_with_its_key_variable_is_a_config_error():
    message = config_error(
        None, {"FLUX_PROXY_LIMITS": '{"max_n": 3}', "FLUX_PROXY_LIMITS__MAX_N": "4"}
    )
    assert "FLUX_PROXY_LIMITS conflicts with FLUX_PROXY_LIMITS__MAX_N" in message
    assert "limits" in message


def test_conflicting_environment_variables_are_a_config_error():
    message = config_error(
        None,
        {
            "FLUX_PROXY_MODELS__M": "local",
            "FLUX_PROXY_MODELS__M__PROVIDER": "local",
        },
    )
    assert "FLUX_PROXY_MODELS__M" in message and "models.m" in message


def test_bad_yaml_names_the_file_and_line(tmp_path):
    path = write(tmp_path, "limits:\n  max_n: 4\nserver: [\n")
    message = config_error(path)
    assert str(path) in message
    assert "not valid YAML" in message
    assert "line 4" in message
    assert "\n" not in message


def test_bad_toml_names_the_file(tmp_path):
    path = write(tmp_path, "[limits\nmax_n = 4\n", name="flux-proxy.toml")
    message = config_error(path)
    assert str(path) in message and "not valid TOML" in message


def test_missing_file_is_named(tmp_path):
    path = tmp_path / "missing.yaml"
    message = config_error(path)
    assert str(path) in message
    assert "No such file" in message


def test_non_utf8_file_is_a_config_error(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("description: caf\xe9\n".encode("latin-1"))
    message = config_error(path)
    assert str(path) in message and "UTF-8" in message


def test_top_level_must_be_a_mapping(tmp_path):
    path = write(tmp_path, "- limits\n- server\n")
    message = config_error(path)
    assert str(path) in message and "mapping" in message


# --- errors found when building the gateway ------------------------------------------


def test_model_with_a_provider_not_installed_is_named():
    settings = load_settings(None, {"FLUX_PROXY_MODELS__FLUX1.1-PRO__PROVIDER": "no-such-provider"})
    with pytest.raises(ConfigError) as caught:
        FluxProxy(settings, environ={})
    message = str(caught.value)
    assert "models.flux1.1-pro.provider" in message
    assert "'no-such-provider'" in message
    assert "local" in message  # says what is installed


def test_capability_override_with_an_unknown_field_is_named(tmp_path):
    path = write(
        tmp_path,
        "models:\n  m:\n    provider: local\n    capabilities:\n      max_images_per_cal: 4\n",
    )
    with pytest.raises(ConfigError) as caught:
        FluxProxy(load_settings(path, {}), environ={})
    message = str(caught.value)
    assert "models.m.capabilities" in message
    assert "max_images_per_cal" in message


def test_capability_override_with_a_bad_value_is_named():
    config = {"models": {"m": {"provider": "local", "capabilities": {"max_images_per_call": 0}}}}
    with pytest.raises(ConfigError) as caught:
        FluxProxy(config, environ={})
    assert "models.m.capabilities" in str(caught.value)
    assert "max_images_per_call" in str(caught.value)


def test_unknown_middleware_is_named():
    with pytest.raises(ConfigError) as caught:
        FluxProxy({"middlewares": ["response_format", "size", "sepia"]}, environ={})
    message = str(caught.value)
    assert "middlewares[2]" in message and "'sepia'" in message and "installed:" in message


def test_alias_used_twice_is_named():
    config = {
        "models": {
            "a": {"provider": "local", "aliases": ["same"]},
            "b": {"provider": "local", "aliases": ["same"]},
        }
    }
    with pytest.raises(ConfigError, match="'same'"):
        FluxProxy(config, environ={})


def test_mapping_config_is_validated_as_settings():
    with pytest.raises(ConfigError, match=r"limits\.max_n"):
        FluxProxy({"limits": {"max_n": "lots"}}, environ={})


def test_directory_store_without_a_directory_is_named():
    with pytest.raises(ConfigError, match=r"store\.directory"):
        FluxProxy({"store": {"backend": "directory"}}, environ={})
