"""URLs as log lines may show them: no query, no fragment, no userinfo.

Result links are capabilities: an upstream's signed result URL (``sig=``,
``signature=``) and the gateway's own hosted-image links grant the image to
whoever reads the log. Every URL the gateway logs goes through :func:`log_url`,
and :class:`UrlQueryFilter` applies it to the lines httpx (one per upstream
request) and uvicorn's access log write.
"""

from __future__ import annotations

import logging
from urllib.parse import urlsplit

import httpx

# Loggers that pass a URL or a request target as a plain string: the argument's index.
STRING_URL_ARGS: dict[str, int] = {"uvicorn.access": 2}  # '%s - "%s %s HTTP/%s" %d'
# Loggers the filter is installed on by install_url_filter.
FILTERED_LOGGERS = ("httpx", *STRING_URL_ARGS)


def log_url(url: str | httpx.URL) -> str:
    """``url`` without its query, fragment and userinfo; a bare path stays a path."""
    parts = urlsplit(str(url))
    host = parts.netloc.rpartition("@")[2]
    return f"{parts.scheme}://{host}{parts.path}" if parts.scheme else parts.path


class UrlQueryFilter(logging.Filter):
    """Rewrites the URL arguments of a log record with :func:`log_url`."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not isinstance(record.args, tuple):
            return True
        args = [log_url(arg) if isinstance(arg, httpx.URL) else arg for arg in record.args]
        index = STRING_URL_ARGS.get(record.name)
        if index is not None and index < len(args):
            target = args[index]
            if isinstance(target, str):
                args[index] = log_url(target)
        record.args = tuple(args)
        return True


def install_url_filter() -> None:
    """Filter the URL-logging loggers of this process (once, however often called).

    A process-wide change, so the CLI makes it; an app that mounts the gateway
    owns its logging and can add ``UrlQueryFilter`` itself.
    """
    for name in FILTERED_LOGGERS:
        target = logging.getLogger(name)
        if not any(isinstance(f, UrlQueryFilter) for f in target.filters):
            target.addFilter(UrlQueryFilter())
