"""What the benchmark scripts share: the interpreter that runs the servers,
stopping a server, and the wrk Lua prologue (thread ids, a JSON summary)."""

from __future__ import annotations

import importlib.util
import signal
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def server_python(script: str) -> str:
    """An interpreter that can import trustnet (this one, or the repo's .venv)."""
    if importlib.util.find_spec("trustnet") and importlib.util.find_spec("quart_trio"):
        return sys.executable
    venv = REPO / ".venv" / "bin" / "python"
    if venv.exists():
        return str(venv)
    sys.exit("cannot import trustnet: run with the project's interpreter, "
             f"e.g. `make venv && .venv/bin/python bench/{script}`")


def stop_process(proc: subprocess.Popen, grace: float) -> None:
    """SIGTERM, then SIGKILL after `grace` seconds."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wrk_prologue(init_extra: str = "") -> str:
    """Lua for wrk: `tid` (the thread's number), `counter`, `init_extra` run
    in init(), and a done() that prints one WRKJSON line of the summary."""
    return r"""
local threads = 0
function setup(thread)
  thread:set("tid", threads)
  threads = threads + 1
end
tid = 0
counter = 0
function init(args)
  tid = tonumber(wrk.thread:get("tid")) or 0
""" + init_extra + r"""
end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "WRKJSON {\"requests\":%d,\"duration_us\":%d,\"connect\":%d,\"read\":%d,\"write\":%d," ..
    "\"status\":%d,\"timeout\":%d,\"p50\":%d,\"p99\":%d,\"max\":%d}\n",
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99), latency.max))
end
"""
