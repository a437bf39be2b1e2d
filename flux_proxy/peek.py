"""What an encoded image is, read from its first and last bytes, without decoding it.

The format and pixel size are in every supported format's header (PNG IHDR, GIF's
screen descriptor, WebP's VP8/VP8L/VP8X chunk, JPEG's SOF segment, AVIF's ``ispe``
property), and whether the file is complete shows at its end (PNG ``IEND``, JPEG's
end-of-image marker, GIF's trailer) or in its lengths (RIFF's, ISO-BMFF's top-level
boxes). An image held as base64 text is read the same way: only the few groups of
characters that hold the bytes asked for are decoded. Nothing here checks the
compressed data in between; a layer that changes pixels decodes it anyway.
"""

from __future__ import annotations

from flux_proxy import b64

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"
# JPEG start-of-frame markers (the ones that carry the frame size): C0-CF but
# DHT (C4), JPG (C8) and DAC (CC).
JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# Markers that stand alone, without a length: TEM, RST0-7, SOI.
JPEG_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8), 0xD8})
# How far the walks look before giving up (and leaving the header to Pillow).
MAX_JPEG_SEGMENTS = 64
MAX_BOXES = 64
# Short runs after a JPEG's end marker (padding some encoders add) still count as complete.
JPEG_TAIL = 32


class ImageBytes:
    """Random access to an encoded image held as its bytes or as base64 text."""

    def __init__(self, *, data: bytes | None = None, text: bytes | None = None) -> None:
        if (data is None) == (text is None):
            raise ValueError("exactly one of data and text")
        self._data = data
        self._text = text
        self.length = len(data) if data is not None else b64.decoded_length(text or b"")

    def read(self, start: int, end: int) -> bytes:
        """Bytes ``start:end`` (clipped to the image)."""
        start, end = max(0, start), min(end, self.length)
        if start >= end:
            return b""
        if self._data is not None:
            return self._data[start:end]
        assert self._text is not None
        return b64.decode_range(self._text, start, end)


def sniff_format(head: bytes) -> str | None:
    """The image format from its magic bytes (the first 12 are enough), never from a label."""
    if head.startswith(PNG_SIGNATURE):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[4:8] == b"ftyp" and head[8:12] in (b"avif", b"avis"):
        return "avif"
    return None


def pixel_size(image: ImageBytes, fmt: str) -> tuple[int, int] | None:
    """Width and height from the header; None where this reading does not find them."""
    reader = _SIZE_READERS[fmt]
    try:
        size = reader(image)
    except (IndexError, ValueError):  # a header shorter or stranger than its format allows
        return None
    if size is None or size[0] <= 0 or size[1] <= 0:
        return None
    return size


def is_complete(image: ImageBytes, fmt: str) -> bool:
    """Whether the image runs to its end: False for one cut short on the way."""
    return _END_CHECKS[fmt](image)


def _u16be(data: bytes, at: int) -> int:
    return int.from_bytes(data[at : at + 2], "big")


def _u32be(data: bytes, at: int) -> int:
    return int.from_bytes(data[at : at + 4], "big")


def _le(data: bytes, at: int, size: int) -> int:
    return int.from_bytes(data[at : at + size], "little")


def _png_size(image: ImageBytes) -> tuple[int, int] | None:
    head = image.read(0, 24)
    if head[12:16] != b"IHDR":
        return None
    return _u32be(head, 16), _u32be(head, 20)


def _gif_size(image: ImageBytes) -> tuple[int, int] | None:
    head = image.read(0, 10)
    return _le(head, 6, 2), _le(head, 8, 2)


def _webp_size(image: ImageBytes) -> tuple[int, int] | None:
    head = image.read(0, 30)
    chunk = head[12:16]
    if chunk == b"VP8 " and head[23:26] == b"\x9d\x01\x2a":
        return _le(head, 26, 2) & 0x3FFF, _le(head, 28, 2) & 0x3FFF
    if chunk == b"VP8L" and head[20] == 0x2F:
        bits = _le(head, 21, 4)
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X":
        return _le(head, 24, 3) + 1, _le(head, 27, 3) + 1
    return None


def _jpeg_size(image: ImageBytes) -> tuple[int, int] | None:
    at = 2  # after SOI
    for _ in range(MAX_JPEG_SEGMENTS):
        segment = image.read(at, at + 9)
        if len(segment) < 4 or segment[0] != 0xFF:
            return None
        marker = segment[1]
        if marker == 0xFF:  # fill byte before a marker
            at += 1
            continue
        if marker in JPEG_STANDALONE:
            at += 2
            continue
        if marker in JPEG_SOF:
            if len(segment) < 9:
                return None
            return _u16be(segment, 7), _u16be(segment, 5)
        if marker == 0xDA:  # start of scan before any frame header
            return None
        at += 2 + _u16be(segment, 2)
    return None


# An ISO-BMFF box: its type, where its payload starts, where it ends.
Box = tuple[bytes, int, int]


def _boxes(image: ImageBytes, start: int, end: int) -> list[Box]:
    """ISO-BMFF boxes between ``start`` and ``end``: (type, payload start, box end).

    Raises ValueError where a box's length does not fit (a file cut short, or not a box)."""
    boxes: list[Box] = []
    at = start
    while at < end:
        if len(boxes) == MAX_BOXES:
            raise ValueError("too many boxes")
        header = image.read(at, at + 16)
        if len(header) < 8:
            raise ValueError("box header cut short")
        size, kind, payload = _u32be(header, 0), header[4:8], at + 8
        if size == 1:
            if len(header) < 16:
                raise ValueError("box header cut short")
            size, payload = int.from_bytes(header[8:16], "big"), at + 16
        elif size == 0:
            size = end - at
        if size < payload - at or at + size > end:
            raise ValueError("box runs past its container")
        boxes.append((kind, payload, at + size))
        at += size
    return boxes


def _children(image: ImageBytes, boxes: list[Box], kind: bytes, skip: int = 0) -> list[Box]:
    """The boxes inside the first of ``boxes`` of type ``kind`` (none if there is none)."""
    for found, payload, end in boxes:
        if found == kind:
            return _boxes(image, payload + skip, end)
    return []


def _avif_size(image: ImageBytes) -> tuple[int, int] | None:
    top = _boxes(image, 0, image.length)
    meta = _children(image, top, b"meta", skip=4)  # a full box: version and flags first
    properties = _children(image, _children(image, meta, b"iprp"), b"ipco")
    sizes: set[tuple[int, int]] = set()
    for kind, payload, _ in properties:
        if kind == b"ispe":
            body = image.read(payload, payload + 12)
            sizes.add((_u32be(body, 4), _u32be(body, 8)))
    # Several sizes (a grid's tiles, a thumbnail): which is the primary image's is
    # in other boxes; Pillow answers that.
    return sizes.pop() if len(sizes) == 1 else None


_SIZE_READERS = {
    "png": _png_size,
    "gif": _gif_size,
    "webp": _webp_size,
    "jpeg": _jpeg_size,
    "avif": _avif_size,
}


def _png_complete(image: ImageBytes) -> bool:
    return image.read(image.length - len(PNG_END), image.length) == PNG_END


def _jpeg_complete(image: ImageBytes) -> bool:
    # FF D9 cannot occur inside entropy-coded data (an FF there is followed by 00 or RSTn).
    return b"\xff\xd9" in image.read(image.length - JPEG_TAIL, image.length)


def _gif_complete(image: ImageBytes) -> bool:
    return image.read(image.length - 1, image.length) == b";"


def _webp_complete(image: ImageBytes) -> bool:
    declared = _le(image.read(4, 8), 0, 4)
    return declared + 8 == image.length


def _avif_complete(image: ImageBytes) -> bool:
    try:
        _boxes(image, 0, image.length)
    except ValueError:
        return False
    return True


_END_CHECKS = {
    "png": _png_complete,
    "gif": _gif_complete,
    "webp": _webp_complete,
    "jpeg": _jpeg_complete,
    "avif": _avif_complete,
}
