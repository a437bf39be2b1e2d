"""Everything a provider or layer plugin needs, in one import: ``from flux_proxy import sdk``.

Like ``import llm`` for llm's plugins: a plugin imports this module and nothing else
from flux_proxy, so the core can move its insides without breaking plugins. This
module only re-exports; core modules never import it (the import graph stays a tree).

- hooks: :data:`hookimpl`, ``Register*`` (see flux_proxy/hookspecs.py)
- layers: :class:`Layer` (effects, honoured parameters, an options model),
  :class:`NoOptions`, :data:`CallNext`; :func:`decode_image` for layers that change pixels
- providers: :class:`UpstreamProvider` (key, base URL, options, the upstream line),
  :class:`ModelSpec`, :class:`ProviderOptions`, :class:`PollingOptions`
- jobs and results: :class:`ImageJob`, :class:`GeneratedImage`, :class:`ImageResult`,
  :class:`Progress`, :class:`Report`
- capabilities as data: :class:`Capabilities`, :class:`SizeSupport`, :class:`FieldRule`,
  the known FLUX model tables
- the request body and the report: :class:`NativeBody`, :func:`report_size_form`
- errors: :class:`GatewayError` and its kinds, :class:`ConfigError`
- upstream machinery: :class:`Upstream` (capped, key-safe requests), :func:`poll`
  (the one submit/poll policy), :func:`cancel_upstream_on_exit`, :class:`KeyHosts`
"""

from __future__ import annotations

from flux_proxy.capabilities import (
    FLUX_1K_SIZES,
    FLUX_PRO_SIZES,
    FLUX_ULTRA_RATIOS,
    FLUX_ULTRA_SIZES,
    Capabilities,
    OutputFormat,
    SizeSupport,
    flux_ultra_capabilities,
)
from flux_proxy.config import ConfigError, ProviderConfig
from flux_proxy.errors import (
    ContentPolicyViolation,
    GatewayError,
    InvalidRequest,
    RateLimited,
    UpstreamCredentialsMissing,
    UpstreamError,
    UpstreamTimeout,
)
from flux_proxy.fields import FieldRule
from flux_proxy.hookspecs import (
    EmulatorFactory,
    RegisterEmulator,
    RegisterMiddleware,
    RegisterProvider,
    hookimpl,
)
from flux_proxy.hosts import KeyHosts
from flux_proxy.imaging import decode as decode_image
from flux_proxy.native_body import (
    SIZE_PARAMS,
    NativeBody,
    client_sent,
    public_param,
    report_size_form,
)
from flux_proxy.pipeline import CallNext, Effect, Layer, NoOptions
from flux_proxy.polling import (
    Backoff,
    PollingOptions,
    cancel_upstream_on_exit,
    poll,
    retry_after_seconds,
)
from flux_proxy.providers.base import (
    ModelEntry,
    ModelSpec,
    Provider,
    ProviderOptions,
    UpstreamProvider,
    provider_options,
    unknown_model_message,
)
from flux_proxy.runtime import Runtime
from flux_proxy.schema import (
    GeneratedImage,
    Handling,
    ImageJob,
    ImageRequest,
    ImageResult,
    Progress,
    Report,
    Target,
)
from flux_proxy.upstream import MAX_MESSAGE, Upstream, error_for_status, validation_error

__all__ = [
    "FLUX_1K_SIZES",
    "FLUX_PRO_SIZES",
    "FLUX_ULTRA_RATIOS",
    "FLUX_ULTRA_SIZES",
    "MAX_MESSAGE",
    "SIZE_PARAMS",
    "Backoff",
    "CallNext",
    "Capabilities",
    "ConfigError",
    "ContentPolicyViolation",
    "Effect",
    "EmulatorFactory",
    "FieldRule",
    "GatewayError",
    "GeneratedImage",
    "Handling",
    "ImageJob",
    "ImageRequest",
    "ImageResult",
    "InvalidRequest",
    "KeyHosts",
    "Layer",
    "ModelEntry",
    "ModelSpec",
    "NativeBody",
    "NoOptions",
    "OutputFormat",
    "PollingOptions",
    "Progress",
    "Provider",
    "ProviderConfig",
    "ProviderOptions",
    "RateLimited",
    "RegisterEmulator",
    "RegisterMiddleware",
    "RegisterProvider",
    "Report",
    "Runtime",
    "SizeSupport",
    "Target",
    "Upstream",
    "UpstreamCredentialsMissing",
    "UpstreamError",
    "UpstreamProvider",
    "UpstreamTimeout",
    "cancel_upstream_on_exit",
    "client_sent",
    "decode_image",
    "error_for_status",
    "flux_ultra_capabilities",
    "hookimpl",
    "poll",
    "provider_options",
    "public_param",
    "report_size_form",
    "retry_after_seconds",
    "unknown_model_message",
    "validation_error",
]
