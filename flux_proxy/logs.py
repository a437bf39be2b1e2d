"""How the gateway's log lines look, and what they may show.

URLs as log lines may show them: no query, no fragment, no userinfo. Result
links are capabilities: an upstream's signed result URL (``sig=``,
``signature=``) and the gateway's own hosted-image links grant the image to
whoever reads the log. Every URL the gateway logs goes through :func:`log_url`,
and :class:`UrlQueryFilter` applies it to the lines httpx (one per upstream
request) and uvicorn's access log write.

``flux-proxy serve`` writes text lines, or with ``--log-format json`` one JSON
object a line (:class:`JsonFormatter`); either way every line written while a
request is served carries its request id (:class:`RequestIdFilter`).
:func:`logging_config` is the one description of both, handed to uvicorn so
every worker process sets it up the same.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Literal
from urllib.parse import urlsplit

import httpx
import orjson

from flux_proxy.request_context import current

LogFormat = Literal["text", "json"]
# The structured fields of a request's or an upstream exchange's line: passed as
# ``extra={EVENT: {...}}``, written as top-level keys of its JSON line.
EVENT = "flux_proxy_event"
TEXT_FORMAT = "%(levelname)s %(name)s: %(message)s"

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


class RequestIdFilter(logging.Filter):
    """Gives every record the id of the request it was logged for (``-`` outside one)."""

    def filter(self, record: logging.LogRecord) -> bool:
        context = current()
        record.request_id = context.request_id if context is not None else "-"
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, message, request id, and the
    record's structured fields (a request's status and durations, say)."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": _utc(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = getattr(record, "request_id", "-")
        if request_id != "-":
            line["request_id"] = request_id
        fields = getattr(record, EVENT, None)
        if isinstance(fields, dict):
            line.update(fields)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(line, default=str).decode()


def _utc(created: float) -> str:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
    return f"{stamp}.{int(created % 1 * 1000):03d}Z"


def logging_config(level: str, log_format: LogFormat) -> dict[str, Any]:
    """A :func:`logging.config.dictConfig` for ``flux-proxy serve`` (and uvicorn's ``log_config``).

    Text: the gateway's lines as ``LEVEL logger: message``, uvicorn's as uvicorn writes
    them. JSON: every logger, uvicorn's included, through one JSON handler. httpx's own
    line per request is left out (WARNING): the gateway writes a line per upstream
    exchange with its provider, status, duration and request id instead.
    """
    url_filter = {"filters": ["urls"]}
    if log_format == "json":
        handlers: dict[str, Any] = {"default": _handler("json")}
        uvicorn_loggers: dict[str, Any] = {
            "uvicorn": {"handlers": [], "propagate": True},
            "uvicorn.access": {**url_filter, "propagate": True},
        }
    else:
        handlers = {
            "default": _handler("text"),
            "uvicorn": _handler("uvicorn"),
            "access": {**_handler("access"), "stream": "ext://sys.stdout"},
        }
        uvicorn_loggers = {
            "uvicorn": {"handlers": ["uvicorn"], "level": "INFO", "propagate": False},
            "uvicorn.access": {**url_filter, "handlers": ["access"], "propagate": False},
        }
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {
            "urls": {"()": UrlQueryFilter},
            "request_id": {"()": RequestIdFilter},
        },
        "formatters": {
            "text": {"format": TEXT_FORMAT},
            "json": {"()": JsonFormatter},
            # uvicorn's own, as its default config names them.
            "uvicorn": {
                "()": "uvicorn.logging.DefaultFormatter",
                "fmt": "%(levelprefix)s %(message)s",
            },
            "access": {
                "()": "uvicorn.logging.AccessFormatter",
                "fmt": '%(levelprefix)s %(client_addr)s - "%(request_line)s" %(status_code)s',
            },
        },
        "handlers": handlers,
        "root": {"level": level.upper(), "handlers": ["default"]},
        "loggers": {
            "httpx": {**url_filter, "level": "WARNING"},
            **uvicorn_loggers,
        },
    }


def _handler(formatter: str) -> dict[str, Any]:
    return {
        "class": "logging.StreamHandler",
        "stream": "ext://sys.stderr",
        "formatter": formatter,
        "filters": ["request_id"],
    }
