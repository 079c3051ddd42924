"""Run ``trustnet node`` as a real process for integration tests.

    async with loopback_addresses(3) as addrs:            # fd10:1234::<random> on lo
        async with trio.open_nursery() as nursery:
            node = NodeProcess(tmp_path, "n1", addrs[0], registry_ws=reg.ws_address)
            await node.start(nursery)                      # waits for "node API listening"
            node.api_url                                   # "http://[::1]:PORT"
            node.mesh_address                              # "ws://[fd10:1234::..]:PORT"
            ...
            await node.stop()                              # SIGTERM -> exit code

Each node gets its own config file ``tmp_path/<name>.yaml`` (short timings by
default, overridable), its own data directory (its key) unless the caller
names one, port 0 for both its mesh listener and its local API (the real
ports are read from its log), and an environment with every TrustNet
variable removed except those given.

:func:`loopback_addresses` adds ULA addresses to ``lo`` (``ip -6 addr add
ADDR/128 dev lo nodad``; needs root) and removes them again when the block
ends, whatever happened in it. The addresses are random within
fd10:1234::/32 so that parallel runs do not collide.

Timeouts here are only failure bounds: a test never depends on how fast a
node is.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import secrets
import subprocess
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import trio
import yaml

from logged_process import LoggedProcess, ProcessExited
from registry_process import TRUSTNET

__all__ = [
    "NODE_ENV_VARS",
    "NodeExited",
    "NodeProcess",
    "addresses_on_lo",
    "loopback_addresses",
    "node_env",
    "root_reason",
]

NODE_ENV_VARS = (
    "NODE_NAME", "NODE_LISTEN_PORT", "NODE_ADVERTISE", "NODE_DATA_DIR", "NODE_HTTP_PORT",
    "REGISTRY_URL", "REGISTRY_WS", "REGISTRY_CA_FILE", "LOG_LEVEL", "LOG_FORMAT", "TRUSTNET_NODE_API",
)
"""Variables a node (or the node CLI subcommands) read; removed from the inherited environment."""

START_TIMEOUT = 30.0
STOP_TIMEOUT = 25.0


def node_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in NODE_ENV_VARS}
    env.update(extra or {})
    return env


class NodeExited(ProcessExited):
    """The node ended (or never got ready) when the test needed it running."""


# ------------------------------------------------------------------ addresses


def root_reason() -> str | None:
    """Why ULA addresses cannot be added to lo here, or None when they can."""
    if os.geteuid() != 0:
        return "needs root: the test adds IPv6 addresses to lo (ip -6 addr add ... dev lo)"
    if not any(Path(d, "ip").exists() for d in ("/usr/sbin", "/sbin", "/usr/bin", "/bin")):
        return "needs iproute2 (the ip command)"
    if not Path("/proc/net/if_inet6").exists():
        return "IPv6 is not available"
    return None


def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "-6", "addr", *args], capture_output=True, text=True,
                          timeout=10, check=False)


_ON_LO: set[str] = set()
"""Addresses this process added to lo and has not removed yet."""


def _remove(address: str) -> None:
    _ip("del", f"{address}/128", "dev", "lo")
    _ON_LO.discard(address)


@atexit.register
def _remove_leftovers() -> None:
    """A run interrupted past its finally blocks still leaves lo clean."""
    for address in sorted(_ON_LO):
        _remove(address)


@contextlib.asynccontextmanager
async def loopback_addresses(count: int) -> AsyncIterator[list[str]]:
    """``count`` fresh fd10:1234::/32 addresses on lo, removed on exit (always)."""
    added: list[str] = []
    try:
        # fd10:1234::<random 32 bits>:<i>: one random prefix for this block.
        tag = secrets.randbits(32)
        for i in range(count):
            address = f"fd10:1234::{tag >> 16:x}:{tag & 0xffff:x}:{i + 1:x}"
            result = _ip("add", f"{address}/128", "dev", "lo", "nodad")
            if result.returncode != 0:
                raise RuntimeError(f"cannot add {address} to lo: {result.stderr.strip()}")
            added.append(address)
            _ON_LO.add(address)
        yield list(added)
    finally:
        for address in added:
            _remove(address)


def addresses_on_lo() -> set[str]:
    out = subprocess.run(["ip", "-6", "-o", "addr", "show", "dev", "lo"], capture_output=True,
                         text=True, timeout=10, check=False).stdout
    found = set()
    for line in out.splitlines():
        parts = line.split()
        if "inet6" in parts:
            found.add(parts[parts.index("inet6") + 1].split("/")[0])
    return found


# ------------------------------------------------------------------ the process


def _merge(base: dict, over: Mapping[str, Any]) -> dict:
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value
    return base


class NodeProcess(LoggedProcess):
    """One ``trustnet node`` process listening (mesh) on ``address``.

    ``config`` is merged into the default test config (heartbeat 0.5 s,
    peer_timeout 1.5 s, ports 0). ``data_dir``: the node's key directory
    (default ``tmp_path/<name>-data``). ``node_id`` defaults to ``name``.

    The log, waiting and stopping are :class:`LoggedProcess`'s.
    """

    exited = NodeExited
    stop_timeout = STOP_TIMEOUT

    def __init__(self, tmp_path: Path, name: str, address: str, *, registry_ws: str,
                 registry_url: str = "http://[::1]:8000", node_id: str | None = None,
                 data_dir: Path | str | None = None, config: Mapping[str, Any] | None = None,
                 env: Mapping[str, str] | None = None):
        super().__init__()
        self.tmp_path = Path(tmp_path)
        self.name = name
        self.node_id = node_id or name
        self.address = address
        self.data_dir = Path(data_dir) if data_dir is not None else self.tmp_path / f"{name}-data"
        self.config_path = self.tmp_path / f"{name}.yaml"
        doc = {
            "node": {"id": self.node_id, "listen_host": address, "listen_port": 0,
                     "advertise": address, "data_dir": str(self.data_dir), "domain": "default"},
            "registry": {"url": registry_url, "ws": registry_ws, "heartbeat_interval": "500ms",
                         "startup_timeout": "10s", "unreachable_timeout": "10s",
                         "request_timeout": "2s"},
            "peers": {"max_connections": 10, "peer_timeout": "1500ms", "rotate_interval": "1h"},
            "http": {"host": "::1", "port": 0},
            "logging": {"level": "info", "format": "json"},
        }
        self.config_path.write_text(yaml.safe_dump(_merge(doc, config or {})))
        self.env = node_env(env)
        self.api_url: str | None = None
        self.mesh_address: str | None = None
        self.public_key: str | None = None

    def __repr__(self) -> str:
        return f"NodeProcess({self.node_id!r}, {self.address}, rc={self.returncode})"

    @property
    def label(self) -> str:
        return f"node {self.node_id}"

    # ------------------------------------------------------------ lifecycle

    async def launch(self, nursery: trio.Nursery) -> None:
        """Start the process without waiting for it to get ready."""
        await self._launch(nursery, [TRUSTNET, "node", "--config", str(self.config_path)],
                           env=self.env, cwd=self.tmp_path)

    async def start(self, nursery: trio.Nursery, timeout: float = START_TIMEOUT) -> str:
        """Start it and wait until its local API listens; the API's base URL."""
        await self.launch(nursery)
        starting, ready = await self._await_start("node starting", "node API listening",
                                                  timeout=timeout)
        self.mesh_address = starting.get("address")
        self.public_key = starting.get("public_key")
        self.api_url = f"http://[::1]:{self._port_of(ready)}"
        return self.api_url

    @property
    def mesh_port(self) -> int:
        assert self.mesh_address is not None
        return int(self.mesh_address.rsplit(":", 1)[1].rstrip("/"))
