"""``flux-proxy serve``: run the gateway under uvicorn."""

from __future__ import annotations

import argparse
import logging
import logging.config
import os
import secrets
import shutil
import socket
import sys
import tempfile
from collections.abc import Sequence
from importlib.metadata import version

# httpx imports the libraries of its own command-line tool (click, rich, pygments)
# whenever they happen to be installed, 3 MiB of every gateway process that never runs
# it. Marked missing before the first import of httpx: httpx then does without them
# (its `httpx` command says to install them), nothing else changes.
sys.modules.setdefault("httpx._main", None)  # type: ignore[arg-type]

from flux_proxy.config import ConfigError, Settings, load_settings  # noqa: E402
from flux_proxy.logs import install_url_filter, logging_config  # noqa: E402

logger = logging.getLogger("flux_proxy")


def _port(text: str) -> int:
    """A TCP port number; uvicorn would silently wrap 70000 to 4464."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port must be between 0 and 65535, not {port}")
    return port


def _positive(text: str) -> int:
    try:
        count = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if count < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {count}")
    return count


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flux-proxy", description="OpenAI-compatible image-generation gateway."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {version('flux-proxy')}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser(
        "serve",
        help="run the gateway",
        description="Serve the OpenAI Images API. With no config, the embedded default "
        "serves model flux1.1-pro (alias flux-pro-1.1) from the local renderer.",
    )
    serve.add_argument("--host", help="address to listen on (default: server.host, 127.0.0.1)")
    serve.add_argument("--port", type=_port, help="port to listen on (default: server.port, 8080)")
    serve.add_argument(
        "--config",
        # An empty FLUX_PROXY_CONFIG means no file, not the current directory.
        default=os.environ.get("FLUX_PROXY_CONFIG") or None,
        help="YAML (or .toml) settings file (default: $FLUX_PROXY_CONFIG; "
        "none: the embedded default)",
    )
    serve.add_argument(
        "--log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug"],
        help="log level (default: info)",
    )
    serve.add_argument(
        "--workers",
        type=_positive,
        help="worker processes sharing the port (default: server.workers, 1)",
    )
    serve.add_argument(
        "--log-format",
        choices=["text", "json"],
        help="log lines as text, or one JSON object a line (default: server.log_format, text)",
    )
    # A worker of --workers: serve on the listening socket its parent passed down.
    serve.add_argument("--fd", type=int, help=argparse.SUPPRESS)
    emulate = commands.add_parser(
        "emulate",
        help="run a provider emulator (offline, no keys)",
        description="Serve an installed plugin's emulator of its provider's protocol, "
        "to try the gateway against it with no keys and no network.",
    )
    emulate.add_argument("name", help="the provider, e.g. bfl, fal, replicate")
    emulate.add_argument("--host", default="127.0.0.1", help="address (default: 127.0.0.1)")
    emulate.add_argument("--port", type=_port, default=9100, help="port (default: 9100)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return serve(args)
    if args.command == "emulate":
        return emulate(args)
    return 2  # pragma: no cover - argparse enforces the subcommand


def emulate(args: argparse.Namespace) -> int:
    import uvicorn

    from flux_proxy.plugins import load_registry

    emulators = load_registry().emulators
    factory = emulators.get(args.name)
    if factory is None:
        installed = ", ".join(sorted(emulators)) or "none installed"
        print(f"flux-proxy: no emulator named {args.name!r} ({installed})", file=sys.stderr)
        return 2
    install_url_filter()  # the emulators hand out signed result links too
    uvicorn.run(factory(), host=args.host, port=args.port, log_level="info")
    return 0


def serve(args: argparse.Namespace) -> int:
    try:
        settings = load_settings(args.config)
    except ConfigError as error:
        print(f"flux-proxy: {error}", file=sys.stderr)
        return 2
    # One description of the logging, applied here and by uvicorn in every worker.
    args.log_format = args.log_format or settings.server.log_format
    log_config = logging_config(args.log_level, args.log_format)
    logging.config.dictConfig(log_config)
    workers = args.workers or settings.server.workers
    if args.fd is None and workers > 1:
        if settings.store.backend == "memory":
            # Refused, not warned: a url link one worker hosts would be a 404 on the
            # others, an answer that says one thing and serves another.
            print(
                f"flux-proxy: server.workers: {workers} workers cannot share the memory "
                "store (each process keeps its own, so a url link one makes is a 404 on "
                "the others): set store.backend to directory (a path every worker "
                "reaches) or s3, or run one worker",
                file=sys.stderr,
            )
            return 2
        _share_across_workers(settings, workers)
    try:
        # Imported once the settings are known good: a bad file is reported without
        # loading the gateway, its layers and plugins first.
        from flux_proxy.app import FluxProxy

        app = FluxProxy(settings)
    except ConfigError as error:
        print(f"flux-proxy: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # e.g. store.directory cannot be created
        print(f"flux-proxy: cannot start: {error}", file=sys.stderr)
        return 1
    from flux_proxy import serving
    from flux_proxy.head_guard import http_protocol
    from flux_proxy.memory import reuse_freed_buffers

    # Each worker is such a process too (it runs this same command with --fd).
    reuse_freed_buffers(os.environ)  # this process is the gateway's alone
    host = args.host or settings.server.host
    port = args.port if args.port is not None else settings.server.port
    grace = settings.server.shutdown_grace_seconds
    if args.fd is None and workers > 1:
        sock = serving.listen(app, host, port, args.log_level)
        logging.config.dictConfig(log_config)  # uvicorn's Config set up its own just now
        from flux_proxy.metrics import MULTIPROCESS_DIR_ENV

        # The workers' metric values meet in files in a directory of this run's own,
        # gone with it (a stale file from an earlier run would be added up too).
        shared = tempfile.mkdtemp(prefix="flux-proxy-metrics-")
        os.environ[MULTIPROCESS_DIR_ENV] = shared  # read by each worker's prometheus-client
        supervisor = serving.Workers(_worker_command(args), workers, sock, grace)
        return supervisor.run(cleanup=lambda: shutil.rmtree(shared, ignore_errors=True))
    # No Server header of uvicorn's own: forwarded answers carry the upstream's.
    return serving.run(
        app,
        app.drain,
        grace,
        sockets=None if args.fd is None else [socket.socket(fileno=args.fd)],
        host=host,
        port=port,
        log_level=args.log_level,
        log_config=log_config,
        # JSON: the gateway's own line per request replaces uvicorn's access line.
        access_log=args.log_format == "text",
        proxy_headers=True,
        forwarded_allow_ips=settings.server.forwarded_allow_ips,
        server_header=False,
        # uvicorn's httptools protocol, with a deadline and a size cap on each
        # request head: see flux_proxy/head_guard.py.
        http=http_protocol(settings.limits.client_header_timeout),
    )


def _worker_command(args: argparse.Namespace) -> list[str]:
    """How a worker of ``--workers`` is started: this same serve, on one socket (--fd)."""
    command = [sys.executable, "-m", "flux_proxy", "serve", "--log-level", args.log_level]
    command += ["--log-format", args.log_format]
    return command + (["--config", args.config] if args.config else [])


def _share_across_workers(settings: Settings, workers: int) -> None:
    """What N workers must share besides the store: the key that signs hosted links."""
    variable = settings.store.signing_key_env
    if not os.environ.get(variable):
        # Inherited by every worker, so a link one signs verifies on the others.
        os.environ[variable] = secrets.token_urlsafe(32)
        logger.warning(
            "%s is not set: the %d workers share a key made for this run, so image links "
            "stop working after a restart and on other replicas",
            variable,
            workers,
        )
