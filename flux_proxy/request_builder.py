"""Provider requests built the way ``httpx.AsyncClient.build_request`` builds them, with
what is the same for every call worked out once.

``build_request`` merges the client's headers, cookies, params and base URL into each
request and parses its URL again: 8% of a url pass-through's CPU, URL parsing alone
3%. A provider calls the same few endpoints with the same client, so here the
client's headers and timeout are read once, and each endpoint's URL is parsed once.
The request that comes out is the one ``build_request`` makes, header for header and
byte for byte (``tests/test_request_builder.py`` holds them side by side); anything
this does not build the same way (query parameters, a header the client also sets)
goes to ``build_request`` itself.
"""

from __future__ import annotations

import json as stdlib_json
from collections.abc import Mapping
from typing import Any

import httpx
import orjson

from flux_proxy.kept import Kept

# httpx 0.28's own JSON body: compact, UTF-8, NaN refused.
_ENCODER = stdlib_json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)
# orjson writes what it does not know as the standard library would not (a dataclass, a
# datetime, a str or int subclass): those it refuses here, and the encoder above decides.
_ORJSON_STRICT = (
    orjson.OPT_PASSTHROUGH_DATACLASS
    | orjson.OPT_PASSTHROUGH_DATETIME
    | orjson.OPT_PASSTHROUGH_SUBCLASS
)
# The headers httpx sets from the body or the URL, ahead of (Host) or after the others.
_OWN = frozenset({"host", "content-length", "content-type", "transfer-encoding"})
_WITH_BODY = frozenset({"POST", "PUT", "PATCH"})  # httpx says Content-Length: 0 for these
_JSON_TYPE = (b"Content-Type", b"application/json")
# A request's head, by method, URL, whether it has no body, and the call's headers.
_HeadKey = tuple[str, str, bool, tuple[tuple[str, str], ...]]
# URLs kept parsed: a provider's endpoints are few; URLs an upstream hands back (polls)
# are parsed each time and not kept.
MAX_KEPT_URLS = 256


class RequestBuilder:
    """``build_request`` for one client, whose headers and timeout do not change after
    this is made. Its own way for a client with no base URL, params or cookies (the
    gateway's: its jar accepts none); for any other, ``build_request`` itself."""

    def __init__(self, http: httpx.AsyncClient, *, jar_stays_empty: bool = False) -> None:
        """``jar_stays_empty``: the client's cookie jar accepts no cookie (the gateway's
        own client's), so it is not asked on each call whether it holds one: that walks
        the jar under its lock."""
        self._http = http
        # A client with a base URL or params of its own: httpx merges those, every time.
        self._plain = not http.params and not str(http.base_url)
        self._cookieless = jar_stays_empty and not http.cookies
        self._defaults = http.headers.raw
        self._default_names = _OWN | {name.lower() for name in http.headers}
        self._timeout = http.timeout.as_dict()
        self._urls: Kept[str, httpx.URL] = Kept(MAX_KEPT_URLS)
        self._heads: Kept[_HeadKey, tuple[httpx.URL, list[tuple[bytes, bytes]]]] = Kept(
            MAX_KEPT_URLS
        )

    def __call__(
        self,
        method: str,
        url: str,
        *,
        json: Any = None,
        params: Mapping[str, str] | None = None,
        headers: Mapping[str, str],
        keep_url: bool = False,
    ) -> httpx.Request:
        """The request ``build_request(method, url, json=..., params=..., headers=...)``
        makes; ``keep_url`` keeps ``url`` parsed for the next call (a provider's own
        endpoint, not a URL from an answer)."""
        merged = params or not self._plain or (not self._cookieless and self._http.cookies)
        if merged:
            return self._http.build_request(method, url, json=json, params=params, headers=headers)
        # A provider's own endpoint is called with the same headers every time: its
        # request's head (all but the body's length) is worked out once.
        key = (method, url, json is None, tuple(headers.items())) if keep_url else None
        made = self._heads.get(key) if key is not None else None
        if made is None:
            if not self._own_headers_free(headers):
                return self._http.build_request(
                    method, url, json=json, params=params, headers=headers
                )
            made = self._head(method, url, json is None, headers, keep_url=keep_url)
            if key is not None:
                self._heads.keep(key, made)
        parsed, raw = made
        body = b""
        if json is not None:
            body = _json_body(json)
            raw = [*raw, (b"Content-Length", str(len(body)).encode()), _JSON_TYPE]
        request = httpx.Request(
            method,
            parsed,
            headers=raw,
            stream=httpx.ByteStream(body),
            extensions={"timeout": dict(self._timeout)},
        )
        request.read()  # the body as request.content, as httpx's own build leaves it
        return request

    def _head(
        self, method: str, url: str, bodiless: bool, headers: Mapping[str, str], *, keep_url: bool
    ) -> tuple[httpx.URL, list[tuple[bytes, bytes]]]:
        """The URL parsed, and the headers httpx puts before a JSON body's own two."""
        parsed = self._url(url) if keep_url else httpx.URL(url)
        raw: list[tuple[bytes, bytes]] = []
        if parsed.host:
            raw.append((b"Host", parsed.netloc))
        if bodiless and method.upper() in _WITH_BODY:
            raw.append((b"Content-Length", b"0"))
        raw += self._defaults
        raw += [(name.encode("ascii"), value.encode("ascii")) for name, value in headers.items()]
        return parsed, raw

    def _own_headers_free(self, headers: Mapping[str, str]) -> bool:
        """None of ``headers`` is one the client or the body sets, nor two of them the
        same name (httpx merges those)."""
        names = {name.lower() for name in headers}
        return len(names) == len(headers) and names.isdisjoint(self._default_names)

    def _url(self, url: str) -> httpx.URL:
        parsed = self._urls.get(url)
        if parsed is None:
            parsed = self._urls.keep(url, httpx.URL(url))
        return parsed


def _json_body(value: Any) -> bytes:
    """The bytes httpx's own encoder makes of ``value``, by orjson (about fifteen times
    faster) wherever it writes the same JSON: it differs only in spelling some floats'
    exponents (``1e-7`` for ``1e-07``, the same number). What it refuses (integers past
    64 bits, keys that are not text, the types above) and what it would write as null
    where the standard library refuses (NaN, infinities) go to the standard library."""
    try:
        body = orjson.dumps(value, option=_ORJSON_STRICT)
    except TypeError:  # orjson.JSONEncodeError is one
        return _ENCODER.encode(value).encode("utf-8")
    if b"null" in body:  # a None, or a NaN orjson wrote as null: the encoder tells them apart
        return _ENCODER.encode(value).encode("utf-8")
    return body
