"""The built-in image middlewares, registered the way a plugin registers its own."""

from __future__ import annotations

from flux_proxy.hookspecs import RegisterMiddleware, hookimpl
from flux_proxy.middlewares.fanout import FanOutMiddleware
from flux_proxy.middlewares.output_format import OutputFormatMiddleware
from flux_proxy.middlewares.passthrough import PassthroughMiddleware
from flux_proxy.middlewares.response_format import ResponseFormatMiddleware
from flux_proxy.middlewares.size import SizeMiddleware

__all__ = [
    "FanOutMiddleware",
    "OutputFormatMiddleware",
    "PassthroughMiddleware",
    "ResponseFormatMiddleware",
    "SizeMiddleware",
]


@hookimpl
def register_middlewares(register: RegisterMiddleware) -> None:
    register("response_format", ResponseFormatMiddleware)
    register("output_format", OutputFormatMiddleware)
    register("size", SizeMiddleware)
    register("fanout", FanOutMiddleware)
    register("passthrough", PassthroughMiddleware)
