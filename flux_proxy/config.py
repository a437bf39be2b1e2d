"""Settings: one YAML (or TOML, by the ``.toml`` suffix) file plus ``FLUX_PROXY_*``
environment variables.

Environment variables name a section and a key joined by a double underscore,
``FLUX_PROXY_LIMITS__MAX_N=4`` sets ``limits.max_n``; they win over the file.
A value is read by the type of the setting it names: text settings take the
value verbatim (``FLUX_PROXY_SERVER__HOST=::``), list settings take YAML flow
lists or comma-separated items (``FLUX_PROXY_MIDDLEWARES=size,passthrough``),
everything else is read as a YAML scalar or flow collection (``4``, ``true``).
Secrets (provider keys, client keys, the URL-signing key) are never stored in
settings, only the *names* of the environment variables that hold them.
"""

from __future__ import annotations

import os
import tomllib
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

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
    # Top-level parameters per request, and JSON nesting: each unknown parameter gets a
    # line in the report header, and deep nesting exhausts encoders further down.
    max_fields: int = Field(64, ge=8)
    max_json_depth: int = Field(32, ge=2)
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


class ForwardSettings(_Section):
    # Standalone mode only: requests that are not the gateway's own image routes go
    # here unchanged, so a client can point its whole base_url at the gateway.
    # The client's path is appended as is ("https://api.openai.com" + "/v1/chat/completions").
    # Unset: such requests are answered 404. Mounted mode always hands them to the host app.
    base_url: str | None = None
    # Names the variable holding the upstream key that replaces the client's Authorization;
    # unset or empty: the client's own Authorization is forwarded (unless the gateway
    # checked it as a client key, which is never passed on).
    api_key_env: str | None = None

    @field_validator("base_url")
    @classmethod
    def _base_url_shape(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        parts = urlsplit(value.strip())
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// URL with a host")
        if parts.query or parts.fragment:
            # The client's own query string is what gets forwarded; one here would be lost.
            raise ValueError("must not have a query string or fragment")
        return value.strip().rstrip("/")


class DefaultSettings(_Section):
    output_format: Literal["png", "jpeg", "gif", "webp", "avif"] = "png"
    response_format: Literal["url", "b64_json"] = "url"


class ProviderConfig(_Section):
    """One provider that can serve a public model."""

    provider: str
    # The provider's own name for the model; defaults to the public name.
    upstream_model: str | None = None
    base_url: str | None = None
    api_key_env: str | None = None
    # Overrides of the provider's declared capabilities (see flux_proxy/capabilities.py).
    capabilities: dict[str, Any] = Field(default_factory=dict)
    # Provider-specific options.
    options: dict[str, Any] = Field(default_factory=dict)


PROVIDER_KEYS = frozenset(ProviderConfig.model_fields)


class ModelConfig(_Section):
    """A public model, served by an ordered list of providers (the next one serves
    when one fails in a retryable way). ``provider:`` with its keys inline is the
    short form of a one-entry ``providers:`` list."""

    providers: list[ProviderConfig] = Field(min_length=1)
    aliases: list[str] = Field(default_factory=list)
    description: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _inline_provider(cls, data: Any) -> Any:
        if not isinstance(data, dict) or ("providers" in data and "provider" not in data):
            return data
        if "provider" not in data:
            raise ValueError("give 'provider' (one) or 'providers' (a list)")
        if "providers" in data:
            raise ValueError("give either 'provider' (one) or 'providers' (a list), not both")
        inline = {key: value for key, value in data.items() if key in PROVIDER_KEYS}
        rest = {key: value for key, value in data.items() if key not in PROVIDER_KEYS}
        return {**rest, "providers": [inline]}


def _default_models() -> dict[str, ModelConfig]:
    return {
        "flux1.1-pro": ModelConfig.model_validate(
            {"provider": "local", "aliases": ["flux-pro-1.1"]}
        ),
    }


class Settings(_Section):
    server: ServerSettings = Field(default_factory=ServerSettings)
    auth: AuthSettings = Field(default_factory=AuthSettings)
    limits: LimitSettings = Field(default_factory=LimitSettings)
    store: StoreSettings = Field(default_factory=StoreSettings)
    fetch: FetchSettings = Field(default_factory=FetchSettings)
    forward: ForwardSettings = Field(default_factory=ForwardSettings)
    defaults: DefaultSettings = Field(default_factory=DefaultSettings)
    # The image middleware stack, outermost first; names registered by plugins.
    middlewares: list[str] = Field(default_factory=lambda: list(DEFAULT_MIDDLEWARES))
    models: dict[str, ModelConfig] = Field(default_factory=_default_models)

    def provider_configs(self) -> list[ProviderConfig]:
        return [target for model in self.models.values() for target in model.providers]


def load_settings(
    path: str | Path | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Read the file (if any), lay the environment over it, and validate."""
    environ = os.environ if environ is None else environ
    data: dict[str, Any] = {}
    if path is not None:
        data = _read_file(Path(path))
    overlay, origins = _from_environment(environ)
    _merge(data, overlay)
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc, path, origins)) from None


def _read_file(path: Path) -> dict[str, Any]:
    kind = "TOML" if path.suffix.lower() == ".toml" else "YAML"
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text") from None
    try:
        loaded = tomllib.loads(text) if kind == "TOML" else yaml.safe_load(text)
    except (yaml.YAMLError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"config file {path} is not valid {kind}: {_syntax_error(exc)}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return loaded


def _syntax_error(exc: Exception) -> str:
    """A one-line description of a YAML/TOML syntax error, with its position."""
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        problem = exc.problem or exc.context or "syntax error"
        return f"{problem} (line {mark.line + 1}, column {mark.column + 1})"
    return " ".join(str(exc).split())


def _from_environment(
    environ: Mapping[str, str],
) -> tuple[dict[str, Any], dict[tuple[str, ...], str]]:
    """The settings named by ``FLUX_PROXY_*`` variables, and which variable set each."""
    sections = set(Settings.model_fields)
    found: dict[str, Any] = {}
    origins: dict[tuple[str, ...], str] = {}
    for name, raw in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX):
            continue
        path = name[len(ENV_PREFIX) :].lower().split("__")
        if path[0] not in sections or (len(path) == 1 and path[0] != "middlewares"):
            continue  # e.g. FLUX_PROXY_API_KEYS holds a secret, not a setting
        value = _env_value(name, raw, _annotation_at(path))
        node = found
        for depth, key in enumerate(path[:-1]):
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                other = origins.get(tuple(path[: depth + 1]), "another variable")
                raise ConfigError(f"{name} conflicts with {other}: both set {'.'.join(path)}")
            node = child
        if isinstance(node.get(path[-1]), dict):
            raise ConfigError(f"{name} conflicts with {name}__*: both set {'.'.join(path)}")
        node[path[-1]] = value
        origins[tuple(path)] = name
    return found, origins


def _env_value(name: str, raw: str, annotation: Any) -> Any:
    if not raw.strip():
        return None
    kinds = _kinds(annotation)
    if kinds == {"text"}:
        # Verbatim: YAML would make "::" a mapping, "no" False and "1.10" the number 1.1.
        return raw
    if kinds == {"list"} and not raw.lstrip().startswith("["):
        return [item.strip() for item in raw.split(",") if item.strip()]
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{name}: cannot read the value: {_syntax_error(exc)}") from None


def _annotation_at(path: list[str]) -> Any:
    """The declared type of the setting at ``path``; ``Any`` where free-form or unknown."""
    annotation: Any = Settings
    for key in path:
        inner = _strip_optional(annotation)
        if isinstance(inner, type) and issubclass(inner, BaseModel):
            # A model's inline provider keys are ProviderConfig's (see ModelConfig).
            field = inner.model_fields.get(key) or (
                ProviderConfig.model_fields.get(key) if inner is ModelConfig else None
            )
            if field is None:
                return Any  # unknown key: validation names it
            annotation = field.annotation
        elif get_origin(inner) is dict:
            annotation = get_args(inner)[1]
        else:
            return Any
    return annotation


def _strip_optional(annotation: Any) -> Any:
    if get_origin(annotation) in (Union, types.UnionType):
        members = [arg for arg in get_args(annotation) if arg is not type(None)]
        if len(members) == 1:
            return members[0]
    return annotation


def _kinds(annotation: Any) -> set[str]:
    """How an environment value for a setting of this type is read: text, list or YAML."""
    if get_origin(annotation) in (Union, types.UnionType):
        return set().union(*(_kinds(arg) for arg in get_args(annotation) if arg is not type(None)))
    if annotation is str or annotation is Path:
        return {"text"}
    if get_origin(annotation) is Literal:
        return {"text"} if all(isinstance(arg, str) for arg in get_args(annotation)) else {"yaml"}
    if get_origin(annotation) in (list, tuple):
        return {"list"}
    return {"yaml"}


def _merge(base: dict[str, Any], overlay: dict[str, Any]) -> None:
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value


def describe_validation_error(
    exc: ValidationError,
    path: str | Path | None,
    origins: Mapping[tuple[str, ...], str] | None = None,
) -> str:
    where = f" in {path}" if path else ""
    lines = [f"invalid configuration{where}:"]
    for error in exc.errors():
        loc = tuple(str(part) for part in error["loc"])
        key = ".".join(loc) or "(top level)"
        source = next(
            (name for keys, name in (origins or {}).items() if loc[: len(keys)] == keys), None
        )
        note = f" (from {source})" if source else ""
        lines.append(f"  {key}: {error['msg']}{note}")
    return "\n".join(lines)
