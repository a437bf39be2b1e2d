"""``flux-proxy serve``: run the gateway under uvicorn."""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
from collections.abc import Sequence
from importlib.metadata import version

from flux_proxy.config import ConfigError, load_settings
from flux_proxy.logs import install_url_filter


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
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    install_url_filter()
    try:
        settings = load_settings(args.config)
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
    workers = args.workers or settings.server.workers
    if args.fd is None and workers > 1:
        sock = serving.listen(app, host, port, args.log_level)
        return serving.Workers(_worker_command(args), workers, sock, grace).run()
    # No Server header of uvicorn's own: forwarded answers carry the upstream's.
    return serving.run(
        app,
        app.drain,
        grace,
        sockets=None if args.fd is None else [socket.socket(fileno=args.fd)],
        host=host,
        port=port,
        log_level=args.log_level,
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
    return command + (["--config", args.config] if args.config else [])
