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
import signal
import subprocess
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any

import orjson
import trio
import yaml

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
    "REGISTRY_URL", "REGISTRY_WS", "LOG_LEVEL", "LOG_FORMAT", "TRUSTNET_NODE_API",
)
"""Variables a node (or the node CLI subcommands) read; removed from the inherited environment."""

START_TIMEOUT = 30.0
STOP_TIMEOUT = 25.0


def node_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in NODE_ENV_VARS}
    env.update(extra or {})
    return env


class NodeExited(AssertionError):
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


class NodeProcess:
    """One ``trustnet node`` process listening (mesh) on ``address``.

    ``config`` is merged into the default test config (heartbeat 0.5 s,
    peer_timeout 1.5 s, ports 0). ``data_dir``: the node's key directory
    (default ``tmp_path/<name>-data``). ``node_id`` defaults to ``name``.
    """

    def __init__(self, tmp_path: Path, name: str, address: str, *, registry_ws: str,
                 registry_url: str = "http://[::1]:8000", node_id: str | None = None,
                 data_dir: Path | str | None = None, config: Mapping[str, Any] | None = None,
                 env: Mapping[str, str] | None = None):
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
        self.process: trio.Process | None = None
        self.api_url: str | None = None
        self.mesh_address: str | None = None
        self.public_key: str | None = None
        self.lines: list[dict[str, Any]] = []
        self.raw_lines: list[str] = []
        self.stderr = bytearray()
        self._changed = trio.Event()
        self._stdout_done = trio.Event()
        self._stderr_done = trio.Event()

    def __repr__(self) -> str:
        return f"NodeProcess({self.node_id!r}, {self.address}, rc={self.returncode})"

    # ------------------------------------------------------------ lifecycle

    async def launch(self, nursery: trio.Nursery) -> None:
        """Start the process without waiting for it to get ready."""
        assert self.process is None, "started twice"
        self.process = await trio.lowlevel.open_process(
            [TRUSTNET, "node", "--config", str(self.config_path)],
            env=self.env, cwd=str(self.tmp_path),
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        nursery.start_soon(self._read_stdout)
        nursery.start_soon(self._read_stderr)

    async def start(self, nursery: trio.Nursery, timeout: float = START_TIMEOUT) -> str:
        """Start it and wait until its local API listens; the API's base URL."""
        await self.launch(nursery)
        try:
            starting = await self.wait_for_log(lambda d: d.get("message") == "node starting",
                                               timeout=timeout)
            ready = await self.wait_for_log(lambda d: d.get("message") == "node API listening",
                                            timeout=timeout)
        except BaseException:
            self.kill()
            raise
        self.mesh_address = starting.get("address")
        self.public_key = starting.get("public_key")
        self.api_url = f"http://[::1]:{_port_of(ready.get('binds'))}"
        return self.api_url

    @property
    def mesh_port(self) -> int:
        assert self.mesh_address is not None
        return int(self.mesh_address.rsplit(":", 1)[1].rstrip("/"))

    async def stop(self, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT) -> int:
        proc = self._proc()
        if proc.returncode is None:
            proc.send_signal(sig)
        return await self.wait(timeout)

    async def wait(self, timeout: float = STOP_TIMEOUT) -> int:
        """Wait for the process to end (and its output to be read); its exit code."""
        proc = self._proc()
        try:
            with trio.fail_after(timeout):
                code = await proc.wait()
                await self._stdout_done.wait()
                await self._stderr_done.wait()
        except trio.TooSlowError:
            self.kill()
            raise NodeExited(f"node {self.node_id} did not exit within {timeout}s; "
                             f"{self.describe()}") from None
        return code

    def kill(self) -> None:
        """SIGKILL if still running (never raises)."""
        if self.process is not None and self.process.returncode is None:
            try:
                self.process.kill()
            except OSError:
                pass

    async def aclose(self) -> None:
        """Kill if running and reap."""
        if self.process is None:
            return
        self.kill()
        with trio.move_on_after(STOP_TIMEOUT):
            await self.process.wait()

    @property
    def returncode(self) -> int | None:
        return None if self.process is None else self.process.returncode

    # ------------------------------------------------------------ logs

    async def wait_for_log(self, predicate: Callable[[dict[str, Any]], bool], *,
                           timeout: float = START_TIMEOUT, start: int = 0) -> dict[str, Any]:
        i = start
        with trio.move_on_after(timeout):
            while True:
                changed = self._changed
                while i < len(self.lines):
                    if predicate(self.lines[i]):
                        return self.lines[i]
                    i += 1
                if self._stdout_done.is_set():
                    await self._stderr_done.wait()
                    raise NodeExited(f"node {self.node_id}: output ended without the awaited "
                                     f"log line; {self.describe()}")
                await changed.wait()
        raise NodeExited(f"node {self.node_id}: no awaited log line within {timeout}s; "
                         f"{self.describe()}")

    def logs(self, message: str | None = None, **fields: Any) -> list[dict[str, Any]]:
        return [d for d in self.lines
                if (message is None or d.get("message") == message)
                and all(d.get(k) == v for k, v in fields.items())]

    def describe(self, tail: int = 30) -> str:
        lines = "\n".join(self.raw_lines[-tail:])
        return (f"exit code {self.returncode}; stderr: "
                f"{bytes(self.stderr).decode(errors='replace')[-2000:]!r}; "
                f"last stdout lines:\n{lines}")

    # ------------------------------------------------------------ internals

    def _proc(self) -> trio.Process:
        assert self.process is not None, f"node {self.node_id} was not started"
        return self.process

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def _read_stdout(self) -> None:
        buf = b""
        try:
            async for chunk in self._proc().stdout:
                buf += chunk
                *complete, buf = buf.split(b"\n")
                for raw in complete:
                    self._add_line(raw)
                if complete:
                    self._notify()
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass
        finally:
            if buf:
                self._add_line(buf)
            self._stdout_done.set()
            self._notify()

    def _add_line(self, raw: bytes) -> None:
        self.raw_lines.append(raw.decode("utf-8", "replace"))
        try:
            doc = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return
        if isinstance(doc, dict):
            self.lines.append(doc)

    async def _read_stderr(self) -> None:
        try:
            async for chunk in self._proc().stderr:
                self.stderr += chunk
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass
        finally:
            self._stderr_done.set()


def _port_of(binds: Any) -> int:
    if not isinstance(binds, list) or not binds:
        raise NodeExited(f"'node API listening' has no binds: {binds!r}")
    for bind in binds:
        if isinstance(bind, str) and bind.startswith("http://[::1]:"):
            return int(bind.rsplit(":", 1)[1].rstrip("/"))
    raise NodeExited(f"no [::1] address among the binds {binds!r}")
