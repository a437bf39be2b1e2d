"""flux-proxy serve keeps freed megabyte buffers for reuse, unless the operator chose."""

from __future__ import annotations

import platform

import pytest

from flux_proxy.memory import reuse_freed_buffers


@pytest.mark.parametrize("variable", ["MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"])
def test_an_operators_malloc_setting_is_left_alone(variable: str) -> None:
    assert reuse_freed_buffers({variable: "131072"}) is False


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_glibc_takes_the_settings() -> None:
    assert reuse_freed_buffers({}) is True
