"""The memory store's byte budget counts what its entries really hold, and hosted
images may be cached for as long as their links are valid, no longer."""

from __future__ import annotations

import tracemalloc

import httpx
import pytest

from flux_proxy import FluxProxy
from flux_proxy.store import MemoryImageStore
from tests.asgi import asgi_client
from tests.images import assert_image

pytestmark = pytest.mark.anyio


async def test_many_tiny_images_stay_within_max_bytes():
    budget = 16 * 1024
    store = MemoryImageStore(ttl_seconds=3600, max_bytes=budget)
    # Only what this test's own calls allocate: no other thread's work in this process.
    mine = [tracemalloc.Filter(True, __file__, all_frames=True)]
    tracemalloc.start(8)
    try:
        before = tracemalloc.take_snapshot().filter_traces(mine)
        first = await store.put(b"\x89PNG tiny", "png")
        for _ in range(1_000):
            last = await store.put(b"\x89PNG tiny", "png")
        after = tracemalloc.take_snapshot().filter_traces(mine)
    finally:
        tracemalloc.stop()
    held = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    # 1,000 ten-byte images are 10 KB of data, but each entry holds ~300 bytes (the
    # store kept 8 times its budget when it counted len(data)). A tenth over for the
    # dict's table, which grows in steps.
    assert held <= budget * 1.1
    assert await store.get(first) is None  # the oldest went first
    assert await store.get(last) is not None


async def test_a_hosted_images_cache_lifetime_is_its_links():
    ttl = 600
    app = FluxProxy({"store": {"ttl_seconds": ttl}}, environ={})
    async with asgi_client(app) as client:
        answer = await client.post(
            "/v1/images/generations",
            json={"prompt": "a harbour", "size": "64x64", "response_format": "url"},
        )
        assert answer.status_code == 200, answer.text
        link = httpx.URL(answer.json()["data"][0]["url"])
        image = await client.get(link.path, params=link.params)
    assert image.status_code == 200
    assert_image(image.content, "png", (64, 64))
    directive, _, seconds = image.headers["cache-control"].partition(", max-age=")
    assert directive == "private"
    # What is left of the link's life: ttl at most, and (however slow this machine)
    # most of it, never the hard-coded hour it was.
    assert ttl - 60 <= int(seconds) <= ttl
