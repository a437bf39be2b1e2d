"""How the C allocator treats the megabyte buffers every image answer passes through.

Each b64_json answer arrives in aiohttp's pieces (256 KiB each) and its base64 is
copied out of them into one buffer of its size (1.5 MB for a 1 MP PNG, 6 MB at 4 MP;
flux_proxy/json_blobs.py). glibc's malloc by default hands
blocks that large back to the kernel as soon as they are freed: through ``munmap`` for
those it mapped, and by trimming the heap's top past 2x its (moving) mmap threshold.
The next request then faults the same memory back in, page by page: measured on
``flux-proxy serve`` at c=16, 360 page faults a request at 1 MP and 500 to 2,700 at
4 MP, a third to half of the process's CPU time there. Keeping freed blocks for reuse
removes them (0 at 1 MP; 4 MP: 14.6 -> 12.9 ms of CPU a request).

What it costs is memory held between bursts, not a higher peak: with the answers
being read bounded (flux_proxy/read_budget.py), 64 concurrent 1 MP b64_json requests
peaked at 119-120 MiB whether with these settings, a trim threshold of 8 MiB, one
malloc arena, or glibc's defaults; the defaults cost 834 page faults and 4 ms of CPU
a request more there (4.9 -> 9.0 ms), and gave back 12 MiB once the burst was over.

A process-wide setting, so only ``flux-proxy serve``, which owns its process, makes it;
an app that mounts the gateway keeps its own allocator settings.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Mapping

logger = logging.getLogger("flux_proxy")

# glibc's mallopt(3) parameters.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Blocks up to this size come from the heap, where freed ones are reused (answers of
# several images, larger, are still mapped and unmapped whole).
MMAP_THRESHOLD = 32 * 2**20
# Free memory at the heap's top kept for the next requests before any goes back.
TRIM_THRESHOLD = 64 * 2**20
# glibc reads these at start-up; an operator who set one has chosen for themselves.
_ENVIRONMENT = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def reuse_freed_buffers(environ: Mapping[str, str]) -> bool:
    """Ask glibc to keep freed megabyte blocks for reuse; False where that is not
    glibc, or the environment already decides it."""
    if any(name in environ for name in _ENVIRONMENT):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not a C library with mallopt (macOS, Windows)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # mallopt returns 1 on success; musl's is a stub that returns 0.
    done: bool = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    done = mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1 and done
    logger.debug("malloc: freed blocks up to %d MiB kept for reuse: %s", MMAP_THRESHOLD >> 20, done)
    return done
