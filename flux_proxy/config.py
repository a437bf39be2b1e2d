"""Settings: one YAML (or TOML, by the ``.toml`` suffix) file plus ``FLUX_PROXY_*``
environment variables, laid over each other by pydantic-settings.

Environment variables name a section and a key joined by a double underscore,
``FLUX_PROXY_LIMITS__MAX_N=4`` sets ``limits.max_n``; they win over the file.
A value is read by the type of the setting it names: text settings take the
value verbatim (``FLUX_PROXY_SERVER__HOST=::``), list settings take YAML/JSON flow
lists or comma-separated items (``FLUX_PROXY_MIDDLEWARES=size,passthrough``),
free-form values are YAML scalars (``4``, ``true``); see EnvironmentSource.
Secrets (provider keys, client keys, the URL-signing key) are never stored in
settings, only the *names* of the environment variables that hold them.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal
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
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from flux_proxy.sigv4 import MAX_PRESIGN_SECONDS

ENV_PREFIX = "FLUX_PROXY_"
NESTED_DELIMITER = "__"

DEFAULT_MIDDLEWARES = ("response_format", "output_format", "size", "fanout", "passthrough")


class ConfigError(Exception):
    """The configuration is invalid; the message names the bad key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _http_base_url(value: str | None) -> str | None:
    """An http(s) URL with a host and no query or fragment, less its trailing slash;
    blank means unset."""
    if value is None or not value.strip():
        return None
    parts = urlsplit(value.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http:// or https:// URL with a host")
    if parts.query or parts.fragment:
        raise ValueError("must not have a query string or fragment")
    return value.strip().rstrip("/")


class ServerSettings(_Section):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    # Where the OpenAI routes live; "/v1" makes base_url "http://host:port/v1".
    api_prefix: str = "/v1"
    # Base URL for links to hosted images; by default taken from each request's Host.
    public_url: str | None = None
    # With no public_url: the Hosts links may be built from. Names, "*.domain" for any
    # host below domain, "*" for any (Starlette's TrustedHostMiddleware patterns). A
    # request for a url answer with another Host is refused (400) before any upstream call.
    allowed_hosts: list[str] = Field(default_factory=lambda: ["*"])
    # /healthz and /readyz at the root, outside api_prefix and without client keys.
    # Unset: on when the gateway serves alone, off when it is mounted in a host app
    # (whose own paths these must not shadow unless asked to).
    health_paths: bool | None = None
    # Proxies whose X-Forwarded-Proto (and -For) `flux-proxy serve` believes: addresses,
    # networks, or "*" for any. Hosted-image links take their scheme from that header, so
    # a client must never be trusted here. Mounted, the host's server decides.
    forwarded_allow_ips: list[str] = Field(default_factory=lambda: ["127.0.0.1", "::1"])
    # After SIGTERM, how long `flux-proxy serve` lets requests in flight finish before it
    # ends them (see flux_proxy/serving.py). Under Kubernetes' default 30 s termination
    # grace period; a Deployment that allows longer requests sets both (deploy/kustomize).
    shutdown_grace_seconds: float = Field(25.0, ge=0)
    # `flux-proxy serve` processes sharing the port (--workers wins); each drains on SIGTERM.
    workers: int = Field(1, ge=1)
    # `flux-proxy serve`'s log lines: text, or one JSON object a line (--log-format).
    log_format: Literal["text", "json"] = "text"

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
    # Seconds a client has to send a request's headers (`flux-proxy serve`: from the
    # connection's start or its last answer) and its whole body; 408 and the connection
    # closed after. nginx's client_header_timeout / client_body_timeout defaults.
    client_header_timeout: float = Field(60.0, gt=0)
    client_body_timeout: float = Field(60.0, gt=0)
    # One upstream HTTP exchange.
    upstream_timeout: float = Field(120.0, gt=0)
    # Seconds a kept-alive upstream connection may sit idle and still be reused. Below
    # the 5 s after which uvicorn, Node.js and Apache close an idle connection: a
    # request sent on one the upstream is closing that instant fails (a 502), and a
    # POST may not be retried (RFC 9112, 9.3.1). For an upstream that closes sooner
    # (gunicorn: 2 s), set it lower.
    upstream_idle_seconds: float = Field(4.0, gt=0)
    # Upstream calls one request may run at once when fanning out n.
    fanout_concurrency: int = Field(4, ge=1)
    # Decode/resize/encode jobs running at once in the heavy lane (threads, off the event
    # loop), and in the light lane, which has its own (see flux_proxy/admission.py).
    image_workers: int = Field(2, ge=1)
    light_image_workers: int = Field(1, ge=1)
    # One request's budget, pixels x n: above it a 400, before anything is spent. AVIF
    # has its own, smaller one: its encoder costs ~1 s of CPU per megapixel (imaging.py).
    max_request_pixels: int = Field(4 * 4096 * 4096, ge=1)
    max_avif_pixels: int = Field(4096 * 4096, ge=1)
    # Requests of at most this many pixels x n, in a fast format, are light: their own
    # lane of admission and threads, so they never wait behind heavy ones.
    light_request_pixels: int = Field(4 * 1024 * 1024, ge=1)
    # Pixels x n each lane admits at once (working or waiting); past it a fast 503 with
    # Retry-After. A request alone in its lane is always admitted.
    light_lane_pixels: int = Field(256 * 1024 * 1024, ge=1)
    heavy_lane_pixels: int = Field(8 * 4096 * 4096, ge=1)
    # With several client keys: the share of a lane one key may hold; past it a 429 with
    # Retry-After for that key, while the others still get in.
    client_lane_share: float = Field(0.5, gt=0, le=1)
    # Largest image the gateway will download from an upstream URL.
    max_fetch_bytes: int = Field(64 * 1024 * 1024, ge=1024)
    # Bytes of upstream answers read into memory at once (Content-Length reserved before
    # a body is read; more wait their turn): the process's memory under load.
    upstream_read_bytes: int = Field(32 * 1024 * 1024, ge=64 * 1024)

    @property
    def max_upstream_pixels(self) -> int:
        """Largest image (in pixels, read from its header) taken from an upstream: twice
        the largest the gateway makes, room for a provider's native size above the one
        asked for (the gateway scales it down), never a decompression bomb's."""
        return 2 * self.max_pixels


class BreakerSettings(_Section):
    """Each upstream's circuit breaker (see flux_proxy/breaker.py)."""

    enabled: bool = True
    # Retryable failures of one upstream in a row (a success resets the count) that open
    # its circuit, when they all fall within window_seconds (older ones are forgotten).
    failure_threshold: int = Field(5, ge=1)
    window_seconds: float = Field(60.0, gt=0)
    # How long an open circuit skips the upstream before one trial request probes it.
    cooldown_seconds: float = Field(30.0, gt=0)


class S3Settings(_Section):
    """An S3-compatible bucket (AWS S3, MinIO, R2, ...) that every replica shares.
    Credentials come from the standard AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and
    (optional) AWS_SESSION_TOKEN variables, never from here."""

    bucket: str | None = None
    # Objects are named "{prefix}{random}.{ext}": give the lifecycle rule the same prefix.
    prefix: str = "flux-proxy/"
    # Unset: AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL, else AWS's endpoint for the region.
    endpoint_url: str | None = None
    # Unset: AWS_REGION or AWS_DEFAULT_REGION, else us-east-1.
    region: str | None = None
    # Unset: path-style (endpoint/bucket/key) with an endpoint_url, virtual-hosted on AWS.
    path_style: bool | None = None
    # "gateway": links to the gateway's signed /images/files/ URLs, served from the bucket
    # by any replica; "presigned": S3's own presigned URLs, fetched from the bucket directly
    # (the endpoint must then be one clients can reach).
    links: Literal["gateway", "presigned"] = "gateway"
    # One call to the bucket, connect to last byte.
    timeout_seconds: float = Field(10.0, gt=0)
    # /readyz asks the bucket at most this often; answers in between are remembered.
    check_seconds: float = Field(2.0, ge=0)

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint_shape(cls, value: str | None) -> str | None:
        url = _http_base_url(value)
        if url is not None and "@" in urlsplit(url).netloc:
            raise ValueError("must not hold credentials: they come from the AWS_* variables")
        return url

    @field_validator("prefix")
    @classmethod
    def _prefix_shape(cls, value: str) -> str:
        value = value.strip("/")
        if value and any(part in ("", ".", "..") for part in value.split("/")):
            raise ValueError("must be path segments such as 'flux-proxy/images/'")
        return f"{value}/" if value else ""


class StoreSettings(_Section):
    backend: Literal["memory", "directory", "s3"] = "memory"
    directory: Path | None = None
    s3: S3Settings = Field(default_factory=S3Settings)
    # How long a hosted image is served: signed and presigned links expire with it.
    ttl_seconds: int = Field(3600, ge=1)
    # Memory backend: oldest images are evicted past this many bytes.
    max_bytes: int = Field(512 * 1024 * 1024, ge=1)
    # Replicas behind one load balancer must share this key; unset: a random per-process key.
    signing_key_env: str = "FLUX_PROXY_SIGNING_KEY"
    # Return an upstream's own image URL when the gateway did not change the image.
    return_upstream_urls: bool = False
    # With return_upstream_urls: download such an image first, to check its format,
    # size and completeness. Off: the URL is passed on unchecked (the report says so).
    verify_upstream_urls: bool = False

    @model_validator(mode="after")
    def _backend_needs(self) -> StoreSettings:
        if self.backend == "s3" and not self.s3.bucket:
            raise ValueError("s3.bucket is required when backend is 's3'")
        presigned = self.backend == "s3" and self.s3.links == "presigned"
        if presigned and self.ttl_seconds > MAX_PRESIGN_SECONDS:
            raise ValueError(
                f"ttl_seconds: presigned links live at most {MAX_PRESIGN_SECONDS} s (7 days)"
            )
        return self


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
        # No query: the client's own query string is what gets forwarded.
        return _http_base_url(value)


class DefaultSettings(_Section):
    output_format: Literal["png", "jpeg", "gif", "webp", "avif"] = "png"
    response_format: Literal["url", "b64_json"] = "url"


class MiddlewareEntry(_Section):
    """One layer of the image stack with options (``{name, options}``); a bare name
    in the list is the same with no options."""

    name: str
    options: dict[str, Any] = Field(default_factory=dict)


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


def _default_middlewares() -> list[str | MiddlewareEntry]:
    return list(DEFAULT_MIDDLEWARES)


class Settings(BaseSettings):
    # Declares how pydantic-settings reads FLUX_PROXY_SECTION__KEY variables (see
    # EnvironmentSource); blank variables count as unset, as an empty FLUX_PROXY_CONFIG does.
    model_config = SettingsConfigDict(
        extra="forbid",
        env_prefix=ENV_PREFIX,
        env_nested_delimiter=NESTED_DELIMITER,
        env_ignore_empty=True,
    )

    server: ServerSettings = Field(default_factory=ServerSettings)
    auth: AuthSettings = Field(default_factory=AuthSettings)
    limits: LimitSettings = Field(default_factory=LimitSettings)
    breaker: BreakerSettings = Field(default_factory=BreakerSettings)
    store: StoreSettings = Field(default_factory=StoreSettings)
    fetch: FetchSettings = Field(default_factory=FetchSettings)
    forward: ForwardSettings = Field(default_factory=ForwardSettings)
    defaults: DefaultSettings = Field(default_factory=DefaultSettings)
    # The image middleware stack, outermost first; names registered by plugins.
    middlewares: list[str | MiddlewareEntry] = Field(default_factory=_default_middlewares)
    models: dict[str, ModelConfig] = Field(default_factory=_default_models)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Settings(...) is built from its arguments alone: the file and the environment are
        # laid over each other by load_settings, from the mapping it is handed, never from
        # os.environ behind the caller's back.
        return (init_settings,)

    def provider_configs(self) -> list[ProviderConfig]:
        return [target for model in self.models.values() for target in model.providers]


def load_settings(
    path: str | Path | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Read the file (if any), lay the environment over it, and validate."""
    environment = EnvironmentSource(os.environ if environ is None else environ)
    file = InitSettingsSource(Settings, {} if path is None else _read_file(Path(path)))
    try:
        # Earlier sources win: the environment over the file, the file over the defaults.
        return Settings(_build_sources=((environment, file), {}))
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc, path, environment.origins)) from None


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


class EnvironmentSource(EnvSettingsSource):
    """The settings named by the ``FLUX_PROXY_*`` variables of an explicit mapping.

    pydantic-settings does the reading (prefix, ``__`` nesting, text settings verbatim);
    this adds the house rules the file's users expect:

    - a model's inline provider keys (``FLUX_PROXY_MODELS__M__UPSTREAM_MODEL``) are typed
      as ProviderConfig's, as they are in the file (see ModelConfig);
    - a list or table is a YAML/JSON flow collection when it starts with ``[`` or ``{``,
      and comma-separated items otherwise (``FLUX_PROXY_MIDDLEWARES=size,passthrough``);
    - a free-form value (inside a provider's ``options`` or ``capabilities``) is a YAML
      scalar, so ``true`` is a boolean and ``4`` a number;
    - ``origins`` records which variable set each key, for error messages, and two
      variables that set the same key (``X`` and ``X__Y``) are refused.
    """

    def __init__(self, environ: Mapping[str, str]) -> None:
        self._environ = environ
        super().__init__(Settings)  # reads the mapping through _load_env_vars
        spelling = {name.lower(): name for name in environ}
        prefix = self.env_prefix.lower()
        self.origins: dict[tuple[str, ...], str] = {}
        for name in self.env_vars:  # lower-cased, as pydantic-settings matches them
            path = tuple(name[len(prefix) :].split(NESTED_DELIMITER))
            if name.startswith(prefix) and path[0] in Settings.model_fields:
                self.origins[path] = spelling[name]

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return {
            name.lower(): value
            for name, value in self._environ.items()
            if not (self.env_ignore_empty and not value.strip())
        }

    def __call__(self) -> dict[str, Any]:
        for path, name in sorted(self.origins.items()):
            for longer, other in sorted(self.origins.items()):
                if len(longer) > len(path) and longer[: len(path)] == path:
                    raise ConfigError(f"{name} conflicts with {other}: both set {'.'.join(path)}")
        return super().__call__()

    def next_field(
        self, field: FieldInfo | Any | None, key: str, case_sensitive: bool | None = None
    ) -> FieldInfo | None:
        if field is ModelConfig and key not in ModelConfig.model_fields:
            field = ProviderConfig  # an inline provider key (see ModelConfig)
        # A raw type where a dict's values are typed (ModelConfig for models.NAME), Any for
        # options and capabilities: no type to go by, so None makes it a free-form value.
        found: Any = super().next_field(field, key, case_sensitive)
        return None if found is Any else found

    def decode_complex_value(self, field_name: str, field: FieldInfo | None, value: Any) -> Any:
        text = str(value).strip()
        if field is not None and not text.startswith(("[", "{")):
            return [item.strip() for item in text.split(",") if item.strip()]
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError:
            return value  # not YAML: taken as text, and validation names key and variable


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
