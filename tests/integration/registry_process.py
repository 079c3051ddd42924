"""Run ``trustnet registry`` as a real process for integration tests.

    async with trio.open_nursery() as nursery:
        reg = RegistryProcess(tmp_path, config={"leases": {"ttl_multiplier": 3}})
        base_url = await reg.start(nursery)      # "http://[::1]:PORT" (https:// with tls)
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
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import orjson
import trio
import yaml

from logged_process import LoggedProcess, ProcessExited

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
    "REGISTRY_REPLICATION", "REGISTRY_REPLICA_ID", "REGISTRY_PEERS", "REGISTRY_REPLICA_JOIN",
    "REGISTRY_CLUSTER_SECRET", "REGISTRY_TLS_CERT", "REGISTRY_TLS_KEY", "REGISTRY_TLS_CA",
)
"""Variables the registry reads; removed from the inherited environment."""

START_TIMEOUT = 30.0
STOP_TIMEOUT = 20.0


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """os.environ without the registry's variables, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in ENV_VARS}
    env.update(extra or {})
    return env


class RegistryExited(ProcessExited):
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


class RegistryProcess(LoggedProcess):
    """One ``trustnet registry`` process.

    ``config``: a mapping (dumped as YAML) or the YAML text, written to
    ``tmp_path/<name>.yaml``; ``None`` writes a config with only the database
    path. ``env``: extra environment variables. ``db_path``: the database
    (default ``tmp_path/registry.db``), put in the config file unless the
    config already names one. Unless the config or env sets them, the listen
    host is ``::1`` and the port 0.

    The log, waiting and stopping are :class:`LoggedProcess`'s.
    """

    exited = RegistryExited
    stop_timeout = STOP_TIMEOUT
    label = "registry"

    def __init__(self, tmp_path: Path, *, config: Mapping[str, Any] | str | None = None,
                 env: Mapping[str, str] | None = None, db_path: Path | str | None = None,
                 name: str = "registry"):
        super().__init__()
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
        self.base_url: str | None = None
        self.port: int | None = None
        self.ws_address: str | None = None
        """The registry's actor address for nodes, e.g. ws://[::1]:PORT (set by start)."""

    async def start(self, nursery: trio.Nursery, timeout: float = START_TIMEOUT) -> str:
        """Start the process, wait for "registry listening"; the base URL."""
        await self._launch(nursery, [TRUSTNET, "registry", "--config", str(self.config_path)],
                           env=self.env, cwd=self.tmp_path)
        [line] = await self._await_start("registry listening", timeout=timeout)
        self.port = self._port_of(line)
        scheme = "https" if any(str(b).startswith("https://") for b in line["binds"]) else "http"
        self.base_url = f"{scheme}://[::1]:{self.port}"
        self.ws_address = line.get("ws")
        return self.base_url
