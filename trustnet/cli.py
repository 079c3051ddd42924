"""The ``trustnet`` command.

    trustnet --version
    trustnet addr NODE_ID
    trustnet tls-cert --host ADDR [--host ...] --out DIR
    trustnet registry [--config PATH]

Exit codes (architecture record, section 12): 0 ok, 1 runtime failure (the
container restarts it), 2 invalid configuration or usage.

Subcommands live in :data:`COMMANDS`; add one with :func:`command`. A command's
``run(args) -> int`` imports heavy modules lazily so that every other command
keeps working when one service's module is missing or broken.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable

import attrs

from trustnet.version import version

__all__ = ["COMMANDS", "EXIT_CONFIG", "EXIT_FAILURE", "EXIT_OK", "Command", "build_parser", "command", "main"]

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2
EXIT_INTERRUPTED = 130


@attrs.frozen
class Command:
    name: str
    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


COMMANDS: dict[str, Command] = {}


def command(name: str, help: str, configure: Callable[[argparse.ArgumentParser], None]):
    """Decorator: register ``run(args) -> int`` as subcommand ``name``."""

    def register(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        COMMANDS[name] = Command(name, help, configure, run)
        return run

    return register


# --------------------------------------------------------------------------- addr


def _addr_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("node_id", metavar="NODE_ID", help="the node id")


@command("addr", "print the ULA IPv6 address derived from a node id", _addr_args)
def _addr(args: argparse.Namespace) -> int:
    from trustnet.addressing import ula_for

    try:
        print(ula_for(args.node_id))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    return EXIT_OK


# --------------------------------------------------------------------------- tls-cert


def _tls_cert_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", metavar="HOST", action="append", required=True,
                   help="an IP address or DNS name the registry is reached at (repeat for "
                        "each; every replica's address for a replicated registry)")
    p.add_argument("--out", metavar="DIR", required=True,
                   help="where to write ca.pem, cert.pem and key.pem (mode 0600); the CA's "
                        "own key is not kept, so it can issue nothing else")
    p.add_argument("--days", type=int, default=825, help="validity (default 825 days)")


@command("tls-cert", "issue a private CA and a registry certificate for its hosts", _tls_cert_args)
def _tls_cert(args: argparse.Namespace) -> int:
    from trustnet.tls import make_certificates, write_certificates

    try:
        paths = write_certificates(make_certificates(args.host, days=args.days), args.out)
    except (FileExistsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    print(f"registry: REGISTRY_TLS_CERT={paths['cert.pem']} REGISTRY_TLS_KEY={paths['key.pem']}"
          f" (replicas also REGISTRY_TLS_CA={paths['ca.pem']})")
    print(f"nodes:    REGISTRY_CA_FILE={paths['ca.pem']} (and REGISTRY_WS=wss://...)")
    print(f"clients:  curl --cacert {paths['ca.pem']} https://...")
    return EXIT_OK


# --------------------------------------------------------------------------- registry


def _registry_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config", metavar="PATH", default=None,
        help="registry YAML config (default: built-in defaults); "
             "environment variables override it, see trustnet.config.REGISTRY_ENV_VARS",
    )


@command("registry", "run a registry replica (HTTP API, state, consensus)", _registry_args)
def _registry(args: argparse.Namespace) -> int:
    from trustnet.config import load_registry_config

    return _run_service("registry", load_registry_config, args.config)


# --------------------------------------------------------------------------- node


def _node_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config", metavar="PATH", default=None,
        help="node YAML config (default: built-in defaults, NODE_NAME required); "
             "environment variables override it, see trustnet.node.config.NODE_ENV_VARS",
    )


@command("node", "run a node: register, keep the lease, keep authenticated peer links", _node_args)
def _node(args: argparse.Namespace) -> int:
    from trustnet.node.config import load_node_config

    return _run_service("node", load_node_config, args.config)


def _run_service(name: str, load_config, config_path: str | None) -> int:
    """Load the config (exit 2 if bad), set up logging, run trustnet.<name>.service
    until it returns its exit code; anything it raises is a failure (exit 1:
    fail fast, the container's restart policy takes over)."""
    import importlib

    from trustnet.config import ConfigError, redacted
    from trustnet.logs import setup_logging
    from trustnet.version import build_info

    try:
        config = load_config(config_path, os.environ)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    setup_logging(name, config.logging.level, config.logging.format)
    log = logging.getLogger("trustnet.cli")
    log.info("config loaded", extra={"config_path": config_path, "config": redacted(config),
                                     **build_info()})

    import trio

    try:
        service = importlib.import_module(f"trustnet.{name}.service")
    except Exception:  # a broken install: say what is missing
        log.critical(f"cannot load the {name} service", exc_info=True)
        return EXIT_FAILURE
    try:
        code = trio.run(service.serve, config)
    except KeyboardInterrupt:
        log.info("interrupted")
        return EXIT_INTERRUPTED
    except Exception:  # noqa: BLE001
        log.critical(f"{name} failed", exc_info=True)
        return EXIT_FAILURE
    if code is None:
        return EXIT_OK
    if isinstance(code, bool) or not isinstance(code, int):
        log.critical(f"{name} service returned a non-int exit code", extra={"returned": repr(code)})
        return EXIT_FAILURE
    return code


DEFAULT_NODE_API = "http://[::1]:9100"


def _api_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--api", metavar="URL", default=os.environ.get("TRUSTNET_NODE_API", DEFAULT_NODE_API),
                   help=f"the node's local API (default: $TRUSTNET_NODE_API or {DEFAULT_NODE_API})")


def _call_node(args: argparse.Namespace, method: str, path: str, body: object = None,
               params: dict | None = None) -> int:
    import json

    import httpx

    try:
        resp = httpx.request(method, args.api.rstrip("/") + path, params=params, timeout=15.0,
                             json=body if method == "POST" else None)
    except httpx.HTTPError as exc:
        print(f"error: cannot reach the node API at {args.api}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    try:
        data = resp.json()
    except ValueError:
        data = resp.text
    if resp.is_success:
        print(json.dumps(data, indent=2))
        return EXIT_OK
    err = data.get("error", {}) if isinstance(data, dict) else {}
    print(f"error: {resp.status_code} {err.get('code', '')}: {err.get('message', data)}", file=sys.stderr)
    return EXIT_FAILURE


def _payload(text: str) -> object:
    import json

    try:
        return json.loads(text)
    except ValueError:
        return text  # plain text is sent as a JSON string


def _broadcast_args(p: argparse.ArgumentParser) -> None:
    _api_arg(p)
    p.add_argument("payload", help="JSON value (or plain text) to broadcast")


@command("broadcast", "broadcast a message to every node of the mesh (via the local node)", _broadcast_args)
def _broadcast(args: argparse.Namespace) -> int:
    return _call_node(args, "POST", "/broadcast", {"payload": _payload(args.payload)})


def _send_args(p: argparse.ArgumentParser) -> None:
    _api_arg(p)
    p.add_argument("node", metavar="NODE", help="the target node id")
    p.add_argument("payload", help="JSON value (or plain text) to send")


@command("send", "send a direct message to one node (via the local node)", _send_args)
def _send(args: argparse.Namespace) -> int:
    return _call_node(args, "POST", f"/send/{args.node}", {"payload": _payload(args.payload)})


def _messages_args(p: argparse.ArgumentParser) -> None:
    _api_arg(p)
    p.add_argument("--since", type=int, default=0, help="only messages after this sequence number")
    p.add_argument("--limit", type=int, default=100)


@command("messages", "list the messages the local node received", _messages_args)
def _messages(args: argparse.Namespace) -> int:
    return _call_node(args, "GET", "/messages", params={"since": args.since, "limit": args.limit})


@command("peers", "list the local node's peer links", _api_arg)
def _peers(args: argparse.Namespace) -> int:
    return _call_node(args, "GET", "/peers")


# --------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trustnet",
        description="TrustNet: a replicated node registry and an authenticated IPv6 mesh.",
    )
    parser.add_argument("--version", action="version", version=f"trustnet {version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for cmd in COMMANDS.values():
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        cmd.configure(p)
        p.set_defaults(_run=cmd.run)
    return parser


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``trustnet`` console script; exits non-zero on failure."""
    parser = build_parser()
    args = parser.parse_args(argv)
    run = getattr(args, "_run", None)
    if run is None:
        parser.print_help(sys.stderr)
        raise SystemExit(EXIT_CONFIG)
    code = run(args)
    if code:
        raise SystemExit(code)


if __name__ == "__main__":
    main()
