"""A child process whose stdout is JSON log lines: the part the test harnesses share.

:class:`LoggedProcess` is the base of ``RegistryProcess`` (registry_process.py),
``NodeProcess`` (node_process.py) and ``netns.NsProcess`` (tests/netns/netns.py).
It holds the ``trio.Process``, reads its stdout line by line (``lines``: the
lines that are JSON objects, as TrustNet logs them; ``raw_lines``: every line;
``bad_lines``: those that are not JSON objects) and keeps its stderr, and
offers waiting for a log line, filtering the log, a description for failure
messages, and stopping, waiting for and killing the process.

A subclass starts the process with :meth:`LoggedProcess._launch` (and may
wait for its start-up lines with :meth:`LoggedProcess._await_start`), and
says, as class attributes or a property:

- ``label``: how messages name the process ("registry", "node n1", ...);
- ``exited``: the exception raised when the process ends, or stays silent,
  while a test needs it (an AssertionError: the test fails with the process's
  output in the message);
- ``stop_timeout``: the default bound of :meth:`LoggedProcess.wait` and
  :meth:`LoggedProcess.stop`.

Timeouts are only failure bounds: a test never depends on how fast a process is.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import orjson
import trio

__all__ = ["LOG_TIMEOUT", "LoggedProcess", "ProcessExited"]

LOG_TIMEOUT = 30.0
"""Default bound of :meth:`LoggedProcess.wait_for_log`."""


class ProcessExited(AssertionError):
    """A process ended (or stayed silent) when the test waited for a log line."""


class LoggedProcess:
    """A child process, its stdout parsed as JSON log lines, its stderr kept."""

    exited: type[AssertionError] = ProcessExited
    """Raised when the process is not there (or not saying it) when needed."""
    stop_timeout: float = 20.0
    """Default bound of :meth:`wait` and :meth:`stop`, in seconds."""

    def __init__(self) -> None:
        self.process: trio.Process | None = None
        self.lines: list[dict[str, Any]] = []
        """Every stdout line that parsed as a JSON object, in order."""
        self.raw_lines: list[str] = []
        """Every stdout line as text, including any that did not parse."""
        self.bad_lines: list[str] = []
        """stdout lines that are not a JSON object (TrustNet should log none)."""
        self.stderr = bytearray()
        self._changed = trio.Event()
        self._stdout_done = trio.Event()
        self._stderr_done = trio.Event()

    @property
    def label(self) -> str:
        """How messages name this process."""
        return "process"

    # ------------------------------------------------------------ lifecycle

    async def _launch(self, nursery: trio.Nursery, argv: Sequence[str], *,
                      env: Mapping[str, str] | None = None,
                      cwd: str | os.PathLike[str] | None = None) -> None:
        """Start ``argv`` (stdin from /dev/null) and read its output in ``nursery``."""
        assert self.process is None, f"{self.label} started twice"
        self.process = await trio.lowlevel.open_process(
            list(argv), env=dict(env) if env is not None else None,
            cwd=None if cwd is None else str(cwd),
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        nursery.start_soon(self._read_stdout)
        nursery.start_soon(self._read_stderr)

    async def _await_start(self, *messages: str, timeout: float) -> list[dict[str, Any]]:
        """The first log line with each of these messages (each waited for up to
        ``timeout``); the process is killed when one does not come."""
        found = []
        try:
            for message in messages:
                found.append(await self.wait_for_log(
                    lambda d, message=message: d.get("message") == message, timeout=timeout))
        except BaseException:
            self.kill()
            raise
        return found

    async def stop(self, sig: int = signal.SIGTERM, timeout: float | None = None) -> int:
        """Send ``sig``, wait for the exit and the end of its output; the exit code."""
        self.send_signal(sig)
        return await self.wait(timeout)

    async def wait(self, timeout: float | None = None) -> int:
        """Wait for the process to end by itself (and its output to be read); its
        exit code. Killed, and ``exited`` raised, when it outlives ``timeout``
        (default ``stop_timeout``)."""
        timeout = self.stop_timeout if timeout is None else timeout
        proc = self._proc()
        try:
            with trio.fail_after(timeout):
                code = await proc.wait()
                await self._stdout_done.wait()
                await self._stderr_done.wait()
        except trio.TooSlowError:
            self.kill()
            raise self.exited(f"{self.label} did not exit within {timeout}s; "
                              f"{self.describe()}") from None
        return code

    def send_signal(self, sig: int) -> None:
        """Send ``sig`` unless the process has ended."""
        proc = self._proc()
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL if still running (teardown; never raises)."""
        if self.process is not None and self.process.returncode is None:
            with contextlib.suppress(OSError):
                self.process.kill()

    async def aclose(self) -> None:
        """Kill if running and reap the process."""
        if self.process is None:
            return
        self.kill()
        with trio.move_on_after(self.stop_timeout):
            await self.process.wait()

    @property
    def returncode(self) -> int | None:
        return None if self.process is None else self.process.returncode

    @property
    def pid(self) -> int:
        return self._proc().pid

    # ------------------------------------------------------------ logs

    async def wait_for_log(self, predicate: Callable[[dict[str, Any]], bool], *,
                           timeout: float = LOG_TIMEOUT, start: int = 0) -> dict[str, Any]:
        """The first JSON log line from index ``start`` on for which ``predicate`` holds.

        Raises ``exited`` when stdout ends without one or ``timeout`` passes.
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
                    # the message then shows all of stderr and the exit code
                    with trio.move_on_after(2):
                        await self._stderr_done.wait()
                        await self._proc().wait()
                    raise self.exited(f"{self.label}: output ended without the awaited "
                                      f"log line; {self.describe()}")
                await changed.wait()
        raise self.exited(f"{self.label}: no awaited log line within {timeout}s; "
                          f"{self.describe()}")

    def logs(self, message: str | None = None, *, start: int = 0,
             **fields: Any) -> list[dict[str, Any]]:
        """The JSON log lines (from index ``start``) with this message and these field values."""
        return [d for d in self.lines[start:]
                if (message is None or d.get("message") == message)
                and all(d.get(k) == v for k, v in fields.items())]

    def describe(self, tail: int = 30) -> str:
        """The process, its exit code, the end of its stderr and its last ``tail``
        stdout lines (for failure messages)."""
        err = bytes(self.stderr).decode(errors="replace")[-3000:]
        out = "\n  ".join(self.raw_lines[-tail:])
        return (f"[{self.label}, pid {self.process.pid if self.process else None}, "
                f"exit code {self.returncode}; stderr: {err!r}; last stdout lines:\n  {out}]")

    def _port_of(self, line: Mapping[str, Any]) -> int:
        """The port of the ``[::1]`` (or ``[::]``) HTTP address among the binds of
        a "... listening" log line."""
        binds = line.get("binds")
        if not isinstance(binds, list) or not binds:
            raise self.exited(f"{line.get('message')!r} has no binds: {binds!r}")
        for bind in binds:
            if isinstance(bind, str) and bind.startswith(
                    ("http://[::1]:", "http://[::]:", "https://[::1]:", "https://[::]:")):
                port = int(bind.rsplit(":", 1)[1].rstrip("/"))
                if 0 < port < 65536:
                    return port
        raise self.exited(f"no [::1] or [::] address among the binds {binds!r}")

    # ------------------------------------------------------------ internals

    def _proc(self) -> trio.Process:
        assert self.process is not None, f"{self.label} was not started"
        return self.process

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def _read_stdout(self) -> None:
        buf = b""
        try:
            async for chunk in self._proc().stdout:  # type: ignore[union-attr]
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
            async for chunk in self._proc().stderr:  # type: ignore[union-attr]
                self.stderr += chunk
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass
        finally:
            self._stderr_done.set()
