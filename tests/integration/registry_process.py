"""Run ``trustnet registry`` as a real process for integration tests.

    async with trio.open_nursery() as nursery:
        reg = RegistryProcess(tmp_path, config={"leases": {"ttl_multiplier": 3}})
        base_url = await reg.start(nursery)      # "http://[::1]:PORT"
        ...
        assert await reg.stop() == 0             # SIGTERM, then the exit code
        reg.lines                                # stdout, one parsed JSON object a line

The process gets an environment with every TrustNet variable removed except
those given, listens on ``[::1]`` with port 0 (the real port is read from the
"registry listening" log line) unless the caller says otherwise, keeps its
database under ``tmp_path`` and runs with ``tmp_path`` as its working
directory. :meth:`RegistryProcess.kill` (called by the ``registry`` fixture on
teardown) makes sure nothing outlives the test.

Timeouts here are only failure bounds: a test never depends on how fast the
registry is.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import orjson
import trio
import yaml

__all__ = [
    "ENV_VARS",
    "TRUSTNET",
    "Finished",
    "RegistryExited",
    "RegistryProcess",
    "clean_env",
    "run_trustnet",
]

TRUSTNET = str(Path(sys.executable).parent / "trustnet")
"""The console script of the venv running the tests."""

ENV_VARS = (
    "REGISTRY_PORT", "REGISTRY_WS_PORT", "REGISTRY_LISTEN", "REGISTRY_DB_PATH", "REGISTRY_API_KEY",
    "LOG_LEVEL", "LOG_FORMAT", "REGISTRY_HEARTBEAT_INTERVAL",
    "REGISTRY_REPLICATION", "REGISTRY_REPLICA_ID", "REGISTRY_PEERS",
)
"""Variables the registry reads; removed from the inherited environment."""

START_TIMEOUT = 30.0
STOP_TIMEOUT = 20.0


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """os.environ without the registry's variables, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in ENV_VARS}
    env.update(extra or {})
    return env


class RegistryExited(AssertionError):
    """The registry ended (or never listened) when the test needed it running."""


class Finished:
    """A completed ``trustnet`` run: exit code, stdout, stderr, stdout as JSON."""

    def __init__(self, returncode: int, stdout: bytes, stderr: bytes):
        self.returncode = returncode
        self.stdout = stdout.decode("utf-8", "replace")
        self.stderr = stderr.decode("utf-8", "replace")

    @property
    def lines(self) -> list[dict[str, Any]]:
        """stdout parsed line by line (raises if a line is not a JSON object)."""
        out = []
        for line in self.stdout.splitlines():
            doc = orjson.loads(line)
            assert isinstance(doc, dict), line
            out.append(doc)
        return out

    def __repr__(self) -> str:
        return (f"Finished(returncode={self.returncode}, stdout={self.stdout[-2000:]!r}, "
                f"stderr={self.stderr[-2000:]!r})")


async def run_trustnet(*args: str, env: Mapping[str, str] | None = None,
                       cwd: str | os.PathLike[str] | None = None,
                       timeout: float = START_TIMEOUT) -> Finished:
    """Run ``trustnet ARGS`` to completion (killed if it outlives ``timeout``)."""
    with trio.fail_after(timeout):
        proc = await trio.run_process(
            [TRUSTNET, *args], env=clean_env(env), cwd=cwd, check=False,
            capture_stdout=True, capture_stderr=True, stdin=subprocess.DEVNULL,
        )
    return Finished(proc.returncode, proc.stdout, proc.stderr)


class RegistryProcess:
    """One ``trustnet registry`` process.

    ``config``: a mapping (dumped as YAML) or the YAML text, written to
    ``tmp_path/<name>.yaml``; ``None`` writes a config with only the database
    path. ``env``: extra environment variables. ``db_path``: the database
    (default ``tmp_path/registry.db``), put in the config file unless the
    config already names one. Unless the config or env sets them, the listen
    host is ``::1`` and the port 0.
    """

    def __init__(self, tmp_path: Path, *, config: Mapping[str, Any] | str | None = None,
                 env: Mapping[str, str] | None = None, db_path: Path | str | None = None,
                 name: str = "registry"):
        self.tmp_path = Path(tmp_path)
        self.db_path = Path(db_path) if db_path is not None else self.tmp_path / "registry.db"
        self.config_path = self.tmp_path / f"{name}.yaml"
        self.env = clean_env(env)
        if isinstance(config, str):
            self.config_path.write_text(config)
        else:
            doc = {k: dict(v) if isinstance(v, Mapping) else v for k, v in (config or {}).items()}
            doc.setdefault("database", {}).setdefault("path", str(self.db_path))
            listen = doc.setdefault("listen", {})
            listen.setdefault("host", "::1")
            listen.setdefault("port", 0)
            listen.setdefault("ws_port", 0)  # tests run side by side: no fixed ports
            self.config_path.write_text(yaml.safe_dump(doc))
        self.process: trio.Process | None = None
        self.base_url: str | None = None
        self.port: int | None = None
        self.lines: list[dict[str, Any]] = []
        """Every stdout line that parsed as a JSON object, in order."""
        self.raw_lines: list[str] = []
        """Every stdout line as text, including any that did not parse."""
        self.bad_lines: list[str] = []
        """stdout lines that are not a JSON object (the registry should log none)."""
        self.stderr = bytearray()
        self._changed = trio.Event()
        self._stdout_done = trio.Event()
        self._stderr_done = trio.Event()

    # ------------------------------------------------------------ lifecycle

    async def start(self, nursery: trio.Nursery, timeout: float = START_TIMEOUT) -> str:
        """Start the process, wait for "registry listening"; the base URL."""
        assert self.process is None, "start() twice"
        self.process = await trio.lowlevel.open_process(
            [TRUSTNET, "registry", "--config", str(self.config_path)],
            env=self.env, cwd=str(self.tmp_path),
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        nursery.start_soon(self._read_stdout)
        nursery.start_soon(self._read_stderr)
        try:
            line = await self.wait_for_log(lambda d: d.get("message") == "registry listening",
                                           timeout=timeout)
        except BaseException:
            self.kill()
            raise
        self.port = _port_of(line.get("binds"))
        self.base_url = f"http://[::1]:{self.port}"
        self.ws_address = line.get("ws")
        """The registry's actor address for nodes, e.g. ws://[::1]:PORT."""
        return self.base_url

    async def stop(self, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT) -> int:
        """Send ``sig``, wait for the exit and the end of its output; the exit code."""
        proc = self._proc()
        if proc.returncode is None:
            proc.send_signal(sig)
        return await self.wait(timeout)

    async def wait(self, timeout: float = STOP_TIMEOUT) -> int:
        """Wait for the process to end by itself (and its output to be read)."""
        proc = self._proc()
        try:
            with trio.fail_after(timeout):
                code = await proc.wait()
                await self._stdout_done.wait()
                await self._stderr_done.wait()
        except trio.TooSlowError:
            self.kill()
            raise RegistryExited(f"registry did not exit within {timeout}s; {self.describe()}") from None
        return code

    def kill(self) -> None:
        """SIGKILL if still running (teardown; never raises)."""
        if self.process is not None and self.process.returncode is None:
            try:
                self.process.kill()
            except OSError:
                pass

    async def aclose(self) -> None:
        """Kill if running and reap the process."""
        if self.process is None:
            return
        self.kill()
        with trio.move_on_after(STOP_TIMEOUT):
            await self.process.wait()

    @property
    def returncode(self) -> int | None:
        return None if self.process is None else self.process.returncode

    def send_signal(self, sig: int) -> None:
        self._proc().send_signal(sig)

    # ------------------------------------------------------------ logs

    async def wait_for_log(self, predicate: Callable[[dict[str, Any]], bool], *,
                           timeout: float = START_TIMEOUT, start: int = 0) -> dict[str, Any]:
        """The first log line from index ``start`` on for which ``predicate`` holds.

        Raises RegistryExited when stdout ends without one or ``timeout`` passes.
        """
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
                    raise RegistryExited(f"registry output ended without the awaited log line; "
                                         f"{self.describe()}")
                await changed.wait()
        raise RegistryExited(f"no awaited log line within {timeout}s; {self.describe()}")

    def logs(self, message: str | None = None, **fields: Any) -> list[dict[str, Any]]:
        """The log lines with this message and these field values."""
        return [d for d in self.lines
                if (message is None or d.get("message") == message)
                and all(d.get(k) == v for k, v in fields.items())]

    def describe(self) -> str:
        tail = "\n".join(self.raw_lines[-30:])
        return (f"exit code {self.returncode}; stderr: {bytes(self.stderr).decode(errors='replace')[-3000:]!r}; "
                f"last stdout lines:\n{tail}")

    # ------------------------------------------------------------ internals

    def _proc(self) -> trio.Process:
        assert self.process is not None, "the registry was not started"
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
        text = raw.decode("utf-8", "replace")
        self.raw_lines.append(text)
        try:
            doc = orjson.loads(raw)
        except orjson.JSONDecodeError:
            doc = None
        if isinstance(doc, dict):
            self.lines.append(doc)
        else:
            self.bad_lines.append(text)

    async def _read_stderr(self) -> None:
        try:
            async for chunk in self._proc().stderr:
                self.stderr += chunk
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass
        finally:
            self._stderr_done.set()


def _port_of(binds: Any) -> int:
    """The port of the ``[::1]`` (or only) address in "registry listening"'s binds."""
    if not isinstance(binds, list) or not binds:
        raise RegistryExited(f"'registry listening' has no binds: {binds!r}")
    for bind in binds:
        if isinstance(bind, str) and bind.startswith(("http://[::1]:", "http://[::]:")):
            port = int(bind.rsplit(":", 1)[1].rstrip("/"))
            if 0 < port < 65536:
                return port
    raise RegistryExited(f"no [::1] or [::] address among the binds {binds!r}")
