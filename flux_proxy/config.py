"""Settings: one YAML file plus ``FLUX_PROXY_*`` environment variables.

Environment variables name a section and a key joined by a double underscore,
``FLUX_PROXY_LIMITS__MAX_N=4`` sets ``limits.max_n``; they win over the file.
Secrets (provider keys, client keys, the URL-signing key) are never stored in
settings, only the *names* of the environment variables that hold them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

ENV_PREFIX = "FLUX_PROXY_"

DEFAULT_MIDDLEWARES = ["response_format", "output_format", "size", "fanout", "passthrough"]


class ConfigError(Exception):
    """The configuration is invalid; the message names the bad key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ServerSettings(_Section):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    # Where the OpenAI routes live; "/v1" makes base_url "http://host:port/v1".
    api_prefix: str = "/v1"
    # Base URL for links to hosted images; by default taken from each request's Host.
    public_url: str | None = None

    @field_validator("api_prefix")
    @classmethod
    def _prefix_shape(cls, value: str) -> str:
        value = "/" + value.strip("/")
        return "" if value == "/" else value


class AuthSettings(_Section):
    # Comma-separated client keys; when the variable is unset or empty, no key is required.
    api_keys_env: str = "FLUX_PROXY_API_KEYS"


class LimitSettings(_Section):
    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1024)
    max_n: int = Field(10, ge=1)
    max_side: int = Field(14142, ge=1)
    max_pixels: int = Field(4096 * 4096, ge=1)
    # Whole request, from first byte to last image.
    request_timeout: float = Field(300.0, gt=0)
    # One upstream HTTP exchange.
    upstream_timeout: float = Field(120.0, gt=0)
    # Upstream calls one request may run at once when fanning out n.
    fanout_concurrency: int = Field(4, ge=1)
    # Decode/resize/encode jobs running at once, process-wide (off the event loop).
    image_workers: int = Field(2, ge=1)
    # Largest image the gateway will download from an upstream URL.
    max_fetch_bytes: int = Field(64 * 1024 * 1024, ge=1024)


class StoreSettings(_Section):
    backend: Literal["memory", "directory"] = "memory"
    directory: Path | None = None
    ttl_seconds: int = Field(3600, ge=1)
    # Memory backend: oldest images are evicted past this many bytes.
    max_bytes: int = Field(512 * 1024 * 1024, ge=1)
    # Replicas behind one load balancer must share this key; unset: a random per-process key.
    signing_key_env: str = "FLUX_PROXY_SIGNING_KEY"
    # Return an upstream's own image URL when the gateway did not change the image.
    return_upstream_urls: bool = False


class FetchSettings(_Section):
    # Hosts on private or loopback addresses that the gateway may fetch images from.
    # Configured providers' base_url hosts are always allowed.
    allow_private_hosts: list[str] = Field(default_factory=list)


class DefaultSettings(_Section):
    output_format: Literal["png", "jpeg", "gif", "webp", "avif"] = "png"
    response_format: Literal["url", "b64_json"] = "url"


class ModelConfig(_Section):
    provider: str
    # The provider's own name for the model; defaults to the public name.
    upstream_model: str | None = None
    base_url: str | None = None
    api_key_env: str | None = None
    aliases: list[str] = Field(default_factory=list)
    description: str | None = None
    # Overrides of the provider's declared capabilities (see flux_proxy/capabilities.py).
    capabilities: dict[str, Any] = Field(default_factory=dict)
    # Provider-specific options.
    options: dict[str, Any] = Field(default_factory=dict)


def _default_models() -> dict[str, ModelConfig]:
    return {
        "flux1.1-pro": ModelConfig(provider="local", aliases=["flux-pro-1.1"]),
    }


class Settings(_Section):
    server: ServerSettings = Field(default_factory=ServerSettings)
    auth: AuthSettings = Field(default_factory=AuthSettings)
    limits: LimitSettings = Field(default_factory=LimitSettings)
    store: StoreSettings = Field(default_factory=StoreSettings)
    fetch: FetchSettings = Field(default_factory=FetchSettings)
    defaults: DefaultSettings = Field(default_factory=DefaultSettings)
    # The image middleware stack, outermost first; names registered by plugins.
    middlewares: list[str] = Field(default_factory=lambda: list(DEFAULT_MIDDLEWARES))
    models: dict[str, ModelConfig] = Field(default_factory=_default_models)


def load_settings(
    path: str | Path | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Read the YAML file (if any), lay the environment over it, and validate."""
    environ = os.environ if environ is None else environ
    data: dict[str, Any] = {}
    if path is not None:
        data = _read_yaml(Path(path))
    _merge(data, _from_environment(environ))
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, path)) from None


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return loaded


def _from_environment(environ: Mapping[str, str]) -> dict[str, Any]:
    sections = set(Settings.model_fields)
    found: dict[str, Any] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        path = name[len(ENV_PREFIX) :].lower().split("__")
        if path[0] not in sections or (len(path) == 1 and path[0] != "middlewares"):
            continue  # e.g. FLUX_PROXY_API_KEYS holds a secret, not a setting
        value = yaml.safe_load(raw) if raw.strip() else None
        node = found
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return found


def _merge(base: dict[str, Any], overlay: dict[str, Any]) -> None:
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value


def _describe(exc: ValidationError, path: str | Path | None) -> str:
    where = f" in {path}" if path else ""
    lines = [f"invalid configuration{where}:"]
    for error in exc.errors():
        key = ".".join(str(part) for part in error["loc"]) or "(top level)"
        lines.append(f"  {key}: {error['msg']}")
    return "\n".join(lines)
