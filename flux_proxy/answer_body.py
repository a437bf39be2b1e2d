"""An upstream answer's body that can also be read whole, in one call.

Read through httpx's byte stream, each chunk of an answer passes four async
iterators (httpx's raw and decoded streams, the observer's, the transport's): for
a 1.4 MB base64 answer that was a quarter of the gateway's CPU per request. Where
the caller knows the body's length (a Content-Length it checked against its cap)
and there is nothing to decode, one read of the whole body does the same work.

The body read is kept as the pieces it arrived in (``PiecewiseAnswer``): joined
only when something asks for it in one piece. A JSON answer's base64 is cut
straight out of the pieces (flux_proxy/json_blobs.py), so each image is copied
once on its way through, not twice (joined, then cut out).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence

import httpx


class WholeBody(httpx.AsyncByteStream):
    """A streamed answer body; :meth:`read_pieces` reads the rest of it at once."""

    async def read_pieces(self) -> list[bytes]:
        """The rest of the body, as the pieces it came in. Only for a body whose length
        the caller has bounded (a checked Content-Length): nothing here stops at a cap."""
        return [chunk async for chunk in self]


class _Held(httpx.SyncByteStream, httpx.AsyncByteStream):
    def __init__(self, pieces: list[bytes]) -> None:
        self._pieces = pieces

    def __iter__(self) -> Iterator[bytes]:
        yield from self._pieces

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for piece in self._pieces:
            yield piece


class PiecewiseAnswer(httpx.Response):
    """An answer read to its end, held as its pieces; ``content`` joins them once, on
    first use (an error's text, a download's bytes), and then holds only that."""

    def __init__(
        self,
        status_code: int,
        *,
        headers: httpx.Headers | Sequence[tuple[bytes, bytes]],
        pieces: list[bytes],
        request: httpx.Request,
    ) -> None:
        super().__init__(status_code, headers=headers, stream=_Held(pieces), request=request)
        self._pieces = pieces

    @property
    def pieces(self) -> list[bytes]:
        """The body as it arrived (one piece once ``content`` has joined it)."""
        return self._pieces

    @property
    def content(self) -> bytes:
        if len(self._pieces) != 1:
            # In place: the stream holds the same list, so the pieces go once joined.
            self._pieces[:] = [b"".join(self._pieces)]
        return self._pieces[0]

    def read(self) -> bytes:
        return self.content

    async def aread(self) -> bytes:
        return self.content
