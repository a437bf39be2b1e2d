"""The typed values that flow through the gateway.

``ImageRequest`` is the client's JSON, parsed and validated once. ``ImageJob`` is
what travels down the middleware stack: each layer passes a changed copy to the
next. ``ImageResult`` travels back up carrying the images (their bytes, or the
upstream's base64 text or URL where nothing changed them) and the normalisation report.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

import orjson
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ModelWrapValidatorHandler,
    PrivateAttr,
    StrictBool,
    StrictInt,
    field_validator,
    model_validator,
)

from flux_proxy.b64 import check as check_base64
from flux_proxy.capabilities import Capabilities
from flux_proxy.config import ProviderConfig
from flux_proxy.fields import Handling

if TYPE_CHECKING:
    from PIL import Image

__all__ = ["Handling"]  # re-exported: the report's vocabulary lives with the field rules

# Public spellings of output formats, mapped to the one the gateway uses.
FORMAT_ALIASES: dict[str, str] = {"jpg": "jpeg"}


class ImageRequest(BaseModel):
    """An OpenAI ``CreateImageRequest`` plus the reference gateway's extensions.

    Fields the gateway does not know are kept, in the client's order, in
    ``extras`` and reach the provider unchanged unless a plugin maps them.
    """

    model_config = ConfigDict(extra="allow", str_strip_whitespace=False)

    model: str | None = None
    prompt: str = Field(min_length=1)
    n: StrictInt = Field(1, ge=1)
    size: str | None = None
    aspect_ratio: str | None = None
    resolution: str | None = None
    response_format: Literal["url", "b64_json"] | None = None
    output_format: Literal["png", "jpeg", "jpg", "gif", "webp", "avif"] | None = None
    output_compression: StrictInt | None = Field(None, ge=0, le=100)
    seed: StrictInt | None = None
    stream: StrictBool | None = None

    @model_validator(mode="wrap")
    @classmethod
    def _null_means_the_default(
        cls, data: Any, handler: ModelWrapValidatorHandler[ImageRequest]
    ) -> ImageRequest:
        # Null means the default for every field: {"size": null} is no size, and
        # {"n": null} is n=1, so a field whose default is not None drops its null
        # before validation. A required field stays required.
        if not isinstance(data, dict) or None not in data.values():
            return handler(data)  # no nulls (most requests)
        nulls = frozenset(k for k, v in data.items() if v is None)
        defaulted = nulls & _NULL_IS_NOT_THE_DEFAULT
        if defaulted:
            data = {k: v for k, v in data.items() if k not in defaulted}
        request = handler(data)
        # The same request, as the kind that remembers its nulls (a private attribute on
        # this class would cost every request a Python call to set it up, about a
        # third of the validation).
        sent = _NullsSent.model_construct(request.model_fields_set, **request.__dict__)
        # Set as they are, not as keywords: a client's field may be called anything.
        object.__setattr__(sent, "__pydantic_extra__", request.__pydantic_extra__)
        sent._null_fields = nulls
        return sent

    @field_validator("resolution", mode="before")
    @classmethod
    def _resolution_as_text(cls, value: Any) -> Any:
        # {"resolution": 1} and {"resolution": "1"} mean the same tier.
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)
        if isinstance(value, float):
            return format(value, "g")
        return value

    @property
    def null_fields(self) -> frozenset[str]:
        """The parameters the client sent as null (their defaults apply)."""
        return _NO_NULLS

    @property
    def extras(self) -> dict[str, Any]:
        return dict(self.__pydantic_extra__ or {})

    @property
    def target_format(self) -> str | None:
        if self.output_format is None:
            return None
        return FORMAT_ALIASES.get(self.output_format, self.output_format)


_NO_NULLS: frozenset[str] = frozenset()


class _NullsSent(ImageRequest):
    """An ImageRequest in which the client sent some parameters as null."""

    _null_fields: frozenset[str] = PrivateAttr(_NO_NULLS)

    @property
    def null_fields(self) -> frozenset[str]:
        return self._null_fields


# The optional fields whose default is not None: a null sent for one is dropped.
_NULL_IS_NOT_THE_DEFAULT = frozenset(
    name
    for name, info in ImageRequest.model_fields.items()
    if not info.is_required() and info.default is not None
)


@dataclass(frozen=True, slots=True)
class ParamHandling:
    handling: Handling
    detail: str


class Report:
    """How each parameter the client sent was handled; rendered as a response header.

    Layers and providers only write to it, through the verbs below, which keep the
    precedence rules in one place; the edge reads it once, when it renders. Each
    entry is kept as the JSON object the header shows (``{"handling", "detail"}``):
    rendering is then one orjson call, with nothing built per entry.
    """

    MAX_DETAIL = 200

    def __init__(self) -> None:
        self._entries: dict[str, dict[str, str]] = {}

    def record(self, param: str, handling: Handling, detail: str) -> None:
        """Say how ``param`` was handled, replacing anything said before."""
        self._entries[param] = {"handling": handling, "detail": detail[: self.MAX_DETAIL]}

    def suggest(self, param: str, handling: Handling, detail: str) -> None:
        """Say it unless something more telling is said already: a layer's emulation
        note is worth more than a provider's "sent unchanged"."""
        existing = self._entries.get(param)
        if existing is None or (
            existing["handling"] == "passthrough" and handling != "passthrough"
        ):
            self.record(param, handling, detail)

    def sent_as(self, param: str, form: str) -> None:
        """Put how ``param`` reached the provider (its native ``form``) in front of
        what the layers said. Idempotent: fan-out's calls share one report."""
        sent_as = f"sent as {form}"
        entry = self._entries.get(param)
        if entry is None or entry["handling"] == "passthrough":
            # Went out in the provider's own form: converted, and the form says all a
            # passthrough note did.
            self.record(param, "converted", sent_as)
        elif entry["handling"] != "ignored" and not entry["detail"].startswith(sent_as):
            handling: Handling = "emulated" if entry["handling"] == "emulated" else "converted"
            self.record(param, handling, f"{sent_as}; {entry['detail']}")

    def fill(self, params: Iterable[str], handling: Handling, detail: str) -> None:
        """Say it of each of ``params`` that nothing was said about."""
        for param in params:
            if param not in self._entries:
                self.record(param, handling, detail)

    def says(self, param: str) -> ParamHandling | None:
        """What is said of ``param`` (for rendering and tests, not for layers)."""
        entry = self._entries.get(param)
        if entry is None:
            return None
        return ParamHandling(entry["handling"], entry["detail"])  # type: ignore[arg-type]

    def as_dict(self) -> dict[str, dict[str, str]]:
        return {k: dict(v) for k, v in self._entries.items()}

    # Proxies commonly refuse response headers much over 8 KB.
    MAX_HEADER = 8000

    def header_value(self, params: list[str]) -> str:
        """Compact ASCII JSON, in the order the client sent the parameters.

        Past MAX_HEADER the details are dropped, then trailing entries, and
        ``"_truncated"`` counts the entries left out. Each entry is encoded once, so
        the cost is linear in the report's size however long the parameter names are.
        """
        said = self._entries
        entries = {p: said[p] for p in params if p in said}
        if len(entries) < len(said):  # said of what the client did not send: after the rest
            entries.update({p: v for p, v in said.items() if p not in entries})
        text = _compact(entries)
        if len(text) <= self.MAX_HEADER:
            return text
        # '"name":{"handling":"..."}' for each entry, without the braces around it.
        pieces = [_compact({k: {"handling": v["handling"]}})[1:-1] for k, v in entries.items()]
        budget = self.MAX_HEADER - len(_truncated(len(pieces)))
        kept, used = 0, 0
        for piece in pieces:
            used += len(piece) + 1  # and its comma
            if used > budget:
                break
            kept += 1
        return (
            "{"
            + "".join(piece + "," for piece in pieces[:kept])
            + _truncated(len(pieces) - kept)[1:]
        )


def _compact(value: dict[str, Any]) -> str:
    """Compact JSON in printable ASCII (a header value). orjson's where it is that (most
    reports: several times faster), else the standard library's, which escapes the rest."""
    try:
        text = orjson.dumps(value)
    except orjson.JSONEncodeError:  # a lone surrogate in a client's parameter name
        text = b"\x80"
    if text.isascii() and b"\x7f" not in text:  # orjson leaves DEL and non-ASCII as they are
        return text.decode("ascii")
    return json.dumps(value, separators=(",", ":"), ensure_ascii=True)


def _truncated(left_out: int) -> str:
    """The closing member, with its opening brace: '{"_truncated":3}'."""
    return _compact({"_truncated": left_out})


class GeneratedImage:
    """One image on its way back up.

    The encoded image is held as ``data`` (its bytes), as ``b64`` (the upstream's
    base64 text, ASCII bytes, passed on as it is when nothing changes), or both; both
    means the same image. Assigning ``data`` drops ``b64``: new bytes are a new image.
    A layer that needs the bytes calls ``runtime.fetcher.ensure_data``, which decodes
    the text (or downloads the URL) on demand.

    Invariant: when ``url`` is set, ``data`` or ``b64`` (if present) is exactly what
    the URL serves. A layer that changes the pixels clears ``url``.
    """

    __slots__ = (
        "_b64",
        "_b64_checked",
        "_data",
        "assumed",
        "height",
        "media_type",
        "pixels",
        "revised_prompt",
        "seed",
        "url",
        "width",
    )

    def __init__(
        self,
        data: bytes | None = None,
        url: str | None = None,
        media_type: str | None = None,
        width: int | None = None,
        height: int | None = None,
        seed: int | None = None,
        revised_prompt: str | None = None,
        pixels: Image.Image | None = None,
        *,
        b64: bytes | None = None,
        b64_checked: bool = False,
    ) -> None:
        """``b64_checked``: ``b64`` is known to be strict base64 (checked where it
        was read), so ``checked_b64`` need not check it again."""
        self._data = data
        self._b64 = b64
        self._b64_checked = b64_checked
        self.url = url
        # Read from the bytes, never taken from a label; see ``assumed``.
        self.media_type = media_type
        self.width = width
        self.height = height
        self.seed = seed
        self.revised_prompt = revised_prompt
        # Decoded pixels after a change, not yet encoded; the format layer encodes them.
        self.pixels = pixels
        # True when media_type and size are what the provider was asked for, not read
        # from the image: a URL passed on without downloading it.
        self.assumed = False

    @property
    def data(self) -> bytes | None:
        return self._data

    @data.setter
    def data(self, value: bytes | None) -> None:
        self._data = value
        self._b64 = None

    @property
    def b64(self) -> bytes | None:
        """The upstream's base64 text, as given (see ``checked_b64``)."""
        return self._b64

    def checked_b64(self) -> bytes | None:
        """``b64``, checked (once) to be strict base64: text that can be passed on as it
        is, spliced into JSON unescaped. InvalidBase64 (502) if it is not."""
        if self._b64 is not None and not self._b64_checked:
            check_base64(self._b64)
            self._b64_checked = True
        return self._b64

    def keep_decoded(self, data: bytes) -> None:
        """Hold ``data``, the bytes ``b64`` decodes to (checked on the way), beside the text."""
        self._data = data
        self._b64_checked = True

    def pixel_count(self) -> int | None:
        """Pixels of the image as it is held (decoded, or as its header says), if known."""
        if self.pixels is not None:
            return self.pixels.width * self.pixels.height
        if self.width is not None and self.height is not None:
            return self.width * self.height
        return None

    def __repr__(self) -> str:  # never megabytes of image in a log line
        held = "b64" if self._b64 is not None else "data" if self._data is not None else "url"
        return (
            f"GeneratedImage({held}, media_type={self.media_type!r}, "
            f"size={self.width}x{self.height}, url={self.url!r})"
        )


@dataclass(slots=True)
class ImageResult:
    images: list[GeneratedImage]
    provider: str
    report: Report
    # Final format of every image (set by the format layer).
    output_format: str | None = None


@dataclass(frozen=True, slots=True)
class Progress:
    """Something a provider can tell a streaming client before the images are done."""

    provider: str
    status: str  # the provider's own word: "IN_QUEUE", "Pending", "processing", ...
    queue_position: int | None = None
    fraction: float | None = None  # 0..1 when the provider reports progress
    preview: bytes | None = None  # a partial image, when the provider gives one


ProgressSink = Callable[[Progress], Awaitable[None]]


async def ignore_progress(progress: Progress) -> None:
    del progress


class ProviderHandle(Protocol):
    """What a job needs of the provider serving it (the full interface is
    ``providers.base.Provider``): a name for reports, a check, the call."""

    @property
    def name(self) -> str: ...

    def check(self, job: ImageJob) -> None: ...

    async def generate(self, job: ImageJob) -> list[GeneratedImage]: ...


@dataclass(frozen=True, slots=True)
class Target:
    """The provider serving one attempt, as plain data: what layers and providers read."""

    model: str  # the configured public name (aliases resolve to it)
    upstream_model: str  # the provider's own name for it
    config: ProviderConfig
    capabilities: Capabilities
    provider: ProviderHandle

    @property
    def key_env(self) -> str | None:
        """The environment variable this attempt's upstream key is read from, if it needs
        one: the entry's ``api_key_env``, else the provider's ``key_env`` (``BFL_API_KEY``)."""
        return self.config.api_key_env or getattr(self.provider, "key_env", None)


# Not slotted: a layer's changed copy (pipeline.derive) is its fields' dict copied in
# one step, a third of what setting thirteen slots one by one costs.
@dataclass(frozen=True)
class ImageJob:
    """One request as the layers below should carry it out."""

    request: ImageRequest  # as the client sent it; never changed
    target: Target  # the provider serving this attempt
    report: Report
    # Base URL under which the gateway serves its own routes (for hosted images); None
    # when no link may be built for this request (its Host is not an allowed one).
    public_url: str | None
    n: int = 1
    width: int | None = None  # size the layers below should make
    height: int | None = None
    output_format: str | None = None  # format the provider should return; None = its default
    output_compression: int | None = None
    seed: int | None = None
    # Provider-bound fields the gateway does not interpret, in the client's order.
    fields: dict[str, Any] = field(default_factory=dict)
    # Where providers send progress; a streaming response turns it into events.
    progress: ProgressSink = ignore_progress
    # Whether an image the upstream answers with as a URL is downloaded to read its
    # format and size. False when the URL goes back to the client as it is, unchecked
    # (store.return_upstream_urls without store.verify_upstream_urls): a layer with
    # nothing to change then assumes the image is what the provider was asked for.
    verify_urls: bool = True
