"""Load generators for the registry benchmark: wrk when it is installed, else
a multi-process raw-socket HTTP/1.1 client in pure Python.

Both run closed-loop: each of C keep-alive connections sends one request,
waits for the whole response, then sends the next (no pipelining). Both take
the same workload description and return the same figures, so the benchmark
does not care which one ran.

Workloads (plain dicts, so they cross process boundaries):

    {"kind": "static", "method": "GET", "path": "/ping", "body": None}
    {"kind": "register", "tag": "r3", "net": 3, "domain": "bench-reg"}
        POST /nodes with unique ids "<tag>-<thread>-<n>" and unique addresses
        fd10:1234:<net>:<thread+1>:<n/65536+1>::<n%65536>, a new id for every
        request; the addresses are in compressed form (but for n%65536 = 0),
        as `trustnet node` sends its address
    {"kind": "heartbeat", "nodes": N}
        POST /nodes/n<i>/heartbeat for a random preloaded node i < N
    {"kind": "query", "domain": "bench", "nodes": N, "limit": 100}
        GET /nodes?domain=bench&limit=100&after=n<i>, a random full page
    {"kind": "preload", "start": a, "stop": b, "domain": "bench"}
        POST /nodes for nodes a..b-1 exactly once each (count mode, Python only)

Any workload may add "think_ms": T. Each connection then waits a random time
(exponential, mean T ms) between a response and its next request, as clients
that are not synchronized do, so the load is below saturation and latency is
not dominated by the benchmark's own queue. Latency counts from the send.

Preloaded nodes are "n%07d" (sorted like their numbers, so an `after`
cursor picks a page) at fd10:1234::<i>.
"""

from __future__ import annotations

import array
import heapq
import math
import multiprocessing
import os
import random
import re
import resource
import selectors
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from common import wrk_prologue

JSON = "application/json"


def node_id(i: int) -> str:
    return f"n{i:07d}"


def node_ipv6(i: int) -> str:
    return f"fd10:1234::{i >> 16:x}:{i & 0xFFFF:x}"


# ---------------------------------------------------------------- results


@dataclass
class Result:
    requests: int                 # completed responses
    seconds: float                # wall time of the run
    p50_ms: float
    p99_ms: float
    max_ms: float
    errors: int                   # non-2xx responses and socket errors/timeouts
    client_cpu_s: float = 0.0     # CPU the load generator used (all its processes)
    backend: str = ""
    statuses: dict[int, int] = field(default_factory=dict)
    left: list[tuple[int, int]] = field(default_factory=list)  # preload: ranges not sent

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def _percentile(sorted_values: Any, p: float) -> float:
    if not sorted_values:
        return float("nan")
    k = math.ceil(p / 100 * len(sorted_values)) - 1  # nearest rank
    return sorted_values[max(0, min(len(sorted_values) - 1, k))]


# ---------------------------------------------------------------- wrk


def wrk_path() -> str | None:
    return shutil.which("wrk")


def wrk_version() -> str:
    exe = wrk_path()
    if not exe:
        return ""
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=10)
    m = re.search(r"wrk\s+(\S+)", out.stdout + out.stderr)
    return m.group(1) if m else "?"


_LUA_COMMON = wrk_prologue("  math.randomseed(os.time() * 1000 + tid * 7919 + SEED)")


def _lua_string(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _lua_for(work: dict, seed: int) -> str:
    head = _LUA_COMMON.replace("SEED", str(seed))
    if work.get("think_ms"):
        # wrk waits delay() ms before a connection's next request; its latency
        # clock starts when the request is written, so the wait is not counted.
        head += ("function delay()\n"
                 f"  return math.floor(-{float(work['think_ms'])} * math.log(1 - math.random()) + 0.5)\n"
                 "end\n")
    return head + _lua_requests(work)


def _lua_requests(work: dict) -> str:
    kind = work["kind"]
    json_headers = '{["Content-Type"] = "application/json"}'
    if kind == "static":
        body = "nil" if work.get("body") is None else _lua_string(work["body"])
        return (
            f"local req = nil\n"
            f"function request()\n"
            f"  if req == nil then req = wrk.format({_lua_string(work['method'])}, "
            f"{_lua_string(work['path'])}, {json_headers if work.get('body') else 'nil'}, {body}) end\n"
            f"  return req\nend\n")
    if kind == "register":
        return (
            "function request()\n"
            "  counter = counter + 1\n"
            "  local body = string.format('{\"id\":\"%s-%d-%d\",\"ipv6\":\"fd10:1234:%x:%x:%x::%x\","
            "\"domain\":\"%s\"}', "
            f"{_lua_string(work['tag'])}, tid, counter, {int(work['net'])}, tid + 1, "
            f"math.floor(counter / 65536) + 1, counter % 65536, {_lua_string(work['domain'])})\n"
            f"  return wrk.format(\"POST\", \"/nodes\", {json_headers}, body)\n"
            "end\n")
    if kind == "heartbeat":
        return (
            "function request()\n"
            f"  local path = string.format('/nodes/n%07d/heartbeat', math.random(0, {int(work['nodes']) - 1}))\n"
            "  return wrk.format(\"POST\", path)\n"
            "end\n")
    if kind == "query":
        top = max(0, int(work["nodes"]) - int(work["limit"]) - 1)
        return (
            "function request()\n"
            f"  local path = string.format('/nodes?domain=%s&limit=%d&after=n%07d', "
            f"{_lua_string(work['domain'])}, {int(work['limit'])}, math.random(0, {top}))\n"
            "  return wrk.format(\"GET\", path)\n"
            "end\n")
    raise ValueError(f"wrk cannot run workload {kind!r}")


def run_wrk(host: str, port: int, work: dict, *, connections: int, seconds: float,
            threads: int = 1, seed: int = 0) -> Result:
    exe = wrk_path()
    if exe is None:
        raise RuntimeError("wrk is not installed")
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(_lua_for(work, seed))
        script = f.name
    url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
    cmd = [exe, "-t", str(threads), "-c", str(max(connections, threads)),
           "-d", f"{max(1, round(seconds))}s", "--timeout", "10s", "-s", script, url]
    cpu0 = _children_cpu()
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
    finally:
        os.unlink(script)
    cpu = _children_cpu() - cpu0
    m = re.search(r"^WRKJSON (\{.*\})$", out.stdout, re.M)
    if out.returncode != 0 or not m:
        raise RuntimeError(f"wrk failed ({out.returncode}): {out.stdout[-500:]} {out.stderr[-500:]}")
    import json
    d = json.loads(m.group(1))
    errors = d["status"] + d["connect"] + d["read"] + d["write"] + d["timeout"]
    return Result(requests=d["requests"], seconds=d["duration_us"] / 1e6,
                  p50_ms=d["p50"] / 1000, p99_ms=d["p99"] / 1000, max_ms=d["max"] / 1000,
                  errors=errors, client_cpu_s=cpu, backend="wrk")


# ---------------------------------------------------------------- Python client


def _request_bytes(method: str, path: str, host_header: str, body: bytes | None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host_header}"]
    if body is not None:
        lines += [f"Content-Type: {JSON}", f"Content-Length: {len(body)}"]
    elif method in ("POST", "PUT", "PATCH"):
        lines.append("Content-Length: 0")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b"")


def _generator(work: dict, host_header: str, rnd: random.Random, tid: int,
               items: Iterator[int] | None) -> Callable[[], bytes | None]:
    kind = work["kind"]
    if kind == "static":
        body = None if work.get("body") is None else work["body"].encode()
        req = _request_bytes(work["method"], work["path"], host_header, body)
        return lambda: req
    if kind == "register":
        counter = 0
        tag, net, domain = work["tag"], int(work["net"]), work["domain"]

        def register() -> bytes:
            nonlocal counter
            counter += 1
            body = (f'{{"id":"{tag}-{tid}-{counter}","ipv6":"fd10:1234:{net:x}:{tid + 1:x}:'
                    f'{(counter >> 16) + 1:x}::{counter & 0xFFFF:x}","domain":"{domain}"}}').encode()
            return _request_bytes("POST", "/nodes", host_header, body)
        return register
    if kind == "heartbeat":
        n = int(work["nodes"])
        return lambda: _request_bytes("POST", f"/nodes/{node_id(rnd.randrange(n))}/heartbeat",
                                      host_header, None)
    if kind == "query":
        top = max(1, int(work["nodes"]) - int(work["limit"]))
        prefix = f"/nodes?domain={work['domain']}&limit={int(work['limit'])}&after="
        return lambda: _request_bytes("GET", prefix + node_id(rnd.randrange(top)),
                                      host_header, None)
    if kind == "preload":
        assert items is not None
        domain = work["domain"]

        def preload() -> bytes | None:
            i = next(items, None)
            if i is None:
                return None
            body = (f'{{"id":"{node_id(i)}","ipv6":"{node_ipv6(i)}",'
                    f'"domain":"{domain}"}}').encode()
            return _request_bytes("POST", "/nodes", host_header, body)
        return preload
    raise ValueError(f"unknown workload {kind!r}")


class _Conn:
    __slots__ = ("sock", "buf", "sent")

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buf = b""
        self.sent = 0


def _parse(buf: bytes) -> tuple[int, int, bool] | None:
    """(status, total length, whether the server closes the connection after
    it) of the first complete response in buf, or None."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    head = buf[:end].lower()
    status = int(head[9:12])
    i = head.find(b"\r\ncontent-length:")
    if i < 0:
        raise RuntimeError(f"response without content-length: {buf[:200]!r}")
    j = head.find(b"\r\n", i + 2)
    length = int(head[i + 17: j if j >= 0 else len(head)])
    total = end + 4 + length
    # hypercorn closes a keep-alive connection after keep_alive_max_requests
    # (1,000) requests, saying so in that response
    closing = b"\r\nconnection: close" in head
    return (status, total, closing) if len(buf) >= total else None


def _connect(family: int, host: str, port: int) -> socket.socket:
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.connect((host, port))
    return s


def _py_worker(job: dict) -> dict:
    host, port, work = job["host"], job["port"], job["work"]
    rnd = random.Random(job["seed"])
    issued = [0]
    if job.get("range"):
        def counting(lo: int, hi: int) -> Iterator[int]:
            for i in range(lo, hi):
                issued[0] += 1
                yield i
        items: Iterator[int] | None = counting(*job["range"])
    else:
        items = None
    host_header = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    next_request = _generator(work, host_header, rnd, job["tid"], items)
    deadline = time.perf_counter() + job["seconds"] if job.get("seconds") else None
    lat = array.array("q")
    statuses: dict[int, int] = {}
    errors = 0
    sel = selectors.DefaultSelector()
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    active = 0
    for _ in range(job["connections"]):
        req = next_request()
        if req is None:
            break
        s = _connect(family, host, port)
        c = _Conn(s)
        sel.register(s, selectors.EVENT_READ, c)
        c.sent = time.perf_counter_ns()
        s.sendall(req)
        active += 1
    think = work.get("think_ms", 0) / 1000
    waiting: list[tuple[float, int, _Conn, bytes]] = []  # (due, tiebreak, conn, request)
    started = time.perf_counter()
    last = started
    hard_stop = (deadline or float("inf")) + 15.0
    while active:
        now = time.perf_counter()
        if now > hard_stop:
            errors += active  # responses that never came
            break
        while waiting and waiting[0][0] <= now:
            _, _, c, req = heapq.heappop(waiting)
            c.sent = time.perf_counter_ns()
            c.sock.sendall(req)
        timeout = min(1.0, max(0.0, waiting[0][0] - now)) if waiting else 1.0
        for key, _ in sel.select(timeout=timeout):
            c: _Conn = key.data
            try:
                chunk = c.sock.recv(262144)
            except OSError:
                chunk = b""
            if not chunk:
                errors += 1
                sel.unregister(c.sock)
                c.sock.close()
                active -= 1
                continue
            c.buf += chunk
            parsed = _parse(c.buf)
            if parsed is None:
                continue
            status, total, closing = parsed
            done_ns = time.perf_counter_ns()
            lat.append((done_ns - c.sent) // 1000)
            statuses[status] = statuses.get(status, 0) + 1
            if not 200 <= status < 300:
                errors += 1
            c.buf = c.buf[total:]
            last = time.perf_counter()
            req = None if (deadline is not None and last >= deadline) else next_request()
            if req is None:
                sel.unregister(c.sock)
                c.sock.close()
                active -= 1
                continue
            if closing:  # the same connection, opened again
                sel.unregister(c.sock)
                c.sock.close()
                c.sock = _connect(family, host, port)
                c.buf = b""
                sel.register(c.sock, selectors.EVENT_READ, c)
            if think:
                heapq.heappush(waiting, (last + rnd.expovariate(1 / think), id(c), c, req))
                continue
            c.sent = time.perf_counter_ns()
            c.sock.sendall(req)
    sel.close()
    return {"lat": lat.tobytes(), "statuses": statuses, "errors": errors,
            "seconds": last - started, "range": job.get("range"), "issued": issued[0]}


def _pool_context() -> multiprocessing.context.BaseContext:
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else "spawn")


def default_processes() -> int:
    # One process drives a few thousand requests/s; the server needs a core.
    return max(1, min(4, (os.cpu_count() or 2) - 1))


def run_python(host: str, port: int, work: dict, *, connections: int,
               seconds: float | None = None, processes: int | None = None,
               seed: int = 0) -> Result:
    """Duration mode (seconds) for measuring; count mode (a "preload" workload) for loading."""
    procs = max(1, min(processes or default_processes(), connections))
    per = [connections // procs + (1 if i < connections % procs else 0) for i in range(procs)]
    jobs = []
    if work["kind"] == "preload":
        start, stop = work["start"], work["stop"]
        size = stop - start
        bounds = [start + size * i // procs for i in range(procs + 1)]
        for i in range(procs):
            jobs.append({"range": (bounds[i], bounds[i + 1])})
    else:
        jobs = [{} for _ in range(procs)]
    for i, job in enumerate(jobs):
        job.update(host=host, port=port, work=work, connections=per[i], seconds=seconds,
                   seed=seed * 1000 + i, tid=i)
    cpu0 = _children_cpu()
    wall0 = time.perf_counter()
    if procs == 1:
        t0 = resource.getrusage(resource.RUSAGE_SELF)
        outs = [_py_worker(jobs[0])]
        t1 = resource.getrusage(resource.RUSAGE_SELF)
        cpu = (t1.ru_utime - t0.ru_utime) + (t1.ru_stime - t0.ru_stime)
    else:
        with _pool_context().Pool(procs) as pool:
            outs = pool.map(_py_worker, jobs)
        cpu = _children_cpu() - cpu0
    wall = time.perf_counter() - wall0
    lat = array.array("q")
    statuses: dict[int, int] = {}
    errors = 0
    for out in outs:
        part = array.array("q")
        part.frombytes(out["lat"])
        lat.extend(part)
        errors += out["errors"]
        for k, v in out["statuses"].items():
            statuses[k] = statuses.get(k, 0) + v
    left = []
    for out in outs:
        if out.get("range"):
            lo, hi = out["range"]
            if lo + out["issued"] < hi:
                left.append((lo + out["issued"], hi))
    values = sorted(lat)
    seconds_run = max((o["seconds"] for o in outs), default=wall) if seconds else wall
    return Result(requests=len(values), seconds=seconds_run,
                  p50_ms=_percentile(values, 50) / 1000, p99_ms=_percentile(values, 99) / 1000,
                  max_ms=(values[-1] / 1000) if values else float("nan"), errors=errors,
                  client_cpu_s=cpu, backend="python", statuses=statuses, left=left)


# ---------------------------------------------------------------- front door


class LoadGen:
    """Runs workloads with wrk when available (and allowed), else with the Python client."""

    def __init__(self, host: str, prefer: str = "auto", processes: int | None = None,
                 wrk_threads: int = 1):
        self.host = host
        self.processes = processes
        self.wrk_threads = wrk_threads
        if prefer not in ("auto", "wrk", "python"):
            raise ValueError(f"load generator must be auto, wrk or python, got {prefer!r}")
        if prefer == "wrk" and wrk_path() is None:
            raise RuntimeError("--loadgen wrk: wrk is not installed (apt-get install wrk)")
        self.use_wrk = prefer != "python" and wrk_path() is not None
        self._seed = 0

    def describe(self, connections: int) -> str:
        if self.use_wrk:
            return (f"wrk ({wrk_version()}; {self.wrk_threads} thread, {connections} keep-alive "
                    f"connections, Lua-generated requests)")
        procs = max(1, min(self.processes or default_processes(), connections))
        return (f"Python raw-socket HTTP/1.1 client ({procs} process(es), {connections} "
                f"keep-alive connections, no pipelining)")

    def run(self, port: int, work: dict, *, connections: int, seconds: float) -> Result:
        self._seed += 1
        if self.use_wrk:
            return run_wrk(self.host, port, work, connections=connections, seconds=seconds,
                           threads=min(self.wrk_threads, connections), seed=self._seed)
        return run_python(self.host, port, work, connections=connections, seconds=seconds,
                          processes=self.processes, seed=self._seed)

    def load(self, port: int, work: dict, *, connections: int,
             seconds: float | None = None) -> Result:
        """Count mode (preload): always the Python client, each node at most once.
        With `seconds`, stops sending after that long; Result.left says what was not sent."""
        self._seed += 1
        return run_python(self.host, port, work, connections=connections, seconds=seconds,
                          processes=self.processes, seed=self._seed)
