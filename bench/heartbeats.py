"""Heartbeat capacity of one registry process: signed heartbeats over websockets.

    .venv/bin/python bench/heartbeats.py            # full run, ~3-5 minutes
    .venv/bin/python bench/heartbeats.py --quick    # smoke run, about a minute
    .venv/bin/python bench/heartbeats.py --profile  # + py-spy profile of the registry

Starts `trustnet registry` as a subprocess on loopback [::1] (REGISTRY_PORT=0,
REGISTRY_WS_PORT=0, LOG_LEVEL=warn, a temporary SQLite file). Load-generator
processes (multiprocessing, each with its own ActorSystem + WebsocketTransport,
as a node has) simulate N nodes (default 10,000): each node gets its own Ed25519
key (trustnet.identity) and registers with a signed SignedRegister; then every
process pre-signs SignedHeartbeat statements (before the clock starts, so
signing is not measured) and its concurrent askers send them as fast as the
registry answers, for a bounded time. Printed: answered heartbeats/s, p50/p99
ask latency, the registry's CPU (utime+stime from /proc) and heartbeats per
registry CPU-second, against the target (>= 10,000/s: 300,000 nodes at a 30 s
interval) and against etcd's lease keepalive rate (measured on a local
3-member cluster when `etcd` is installed, else the issue's reference figure,
labelled as such).

Variants (the first field of --cases):
  session   what a node sends (trustnet.node.heartbeat): each node opens a
            heartbeat session with one signed OpenSession (X25519 share; timed
            and printed as sessions opened/s, what a new leader faces), then
            sends SessionHeartbeat{session, counter, HMAC} (precomputed).
  signed    SignedHeartbeat statements, each Ed25519-verified (still accepted;
            what nodes sent before sessions).
  noverify  signed, with trustnet.identity.verify() replaced by `return True`
            (statement still parsed, ts/nonce checked, key looked up): what
            the signature itself costs. Not shippable.
(Unsigned registrations and heartbeats, the floor this benchmark measured
until 2026-11-27, are refused over the websocket now: they are the HTTP
API's, behind its key.)

The exit status is 0 unless the benchmark itself broke; PASS/MISS is
informational. See bench/README.md.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import http.client
import json
import math
import multiprocessing as mp
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import server_python, stop_process  # noqa: E402
HOST = "::1"
TARGET = 10_000.0
ETCD_REFERENCE = (10_000, 12_000)
VARIANTS = {
    "session": "as shipped: one signed OpenSession per node, then MAC'd SessionHeartbeats",
    "signed": "SignedHeartbeat, Ed25519-verified, one per heartbeat",
    "noverify": "signed with identity.verify() stubbed (not shippable)",
}  # issue 3: keepalives/s, 3-member cluster, 16 connections

# A registry whose verify() accepts anything (the "noverify" variant).
NOVERIFY_BOOT = (
    "import sys, trustnet.identity as i\n"
    "i.verify = lambda public_key, data, signature: True\n"
    "from trustnet.cli import main\n"
    "sys.argv = ['trustnet', 'registry']\n"
    "main(['registry'])\n"
)


# ================================================================ helpers


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of a process (all threads), from /proc."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def cpu_split(pid: int) -> tuple[float, float] | None:
    """(utime, stime) seconds of a process, from /proc."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        tck = os.sysconf("SC_CLK_TCK")
        return int(fields[11]) / tck, int(fields[12]) / tck
    except (OSError, IndexError, ValueError):
        return None


def percentile(sorted_values: list[float], q: float) -> float | None:
    """Nearest-rank percentile of an already sorted list."""
    if not sorted_values:
        return None
    k = max(0, min(len(sorted_values) - 1, math.ceil(q * len(sorted_values)) - 1))
    return sorted_values[k]


def fmt(v: float | None, spec: str = ",.0f") -> str:
    return "-" if v is None else format(v, spec)


def listening_ports(pid: int) -> list[int]:
    """TCP ports the process listens on (from /proc/<pid>/fd and /proc/net/tcp{,6})."""
    inodes = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    except OSError:
        return []
    ports = []
    for table in ("tcp6", "tcp"):
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if len(parts) > 9 and parts[3] == "0A" and parts[9] in inodes:
                ports.append(int(parts[1].rsplit(":", 1)[1], 16))
    return sorted(set(ports))


def http_get(port: int, path: str, timeout: float = 5.0, ca: str | None = None
             ) -> tuple[int, Any]:
    """GET over http://, or https:// checked against `ca` when given."""
    if ca is not None:
        import ssl
        conn: http.client.HTTPConnection = http.client.HTTPSConnection(
            HOST, port, timeout=timeout, context=ssl.create_default_context(cafile=ca))
    else:
        conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        body = resp.read()
        try:
            return resp.status, json.loads(body) if body else None
        except ValueError:
            return resp.status, None
    finally:
        conn.close()


# ================================================================ the registry


class Registry:
    """`trustnet registry` on [::1], ports picked by the OS, its own database."""

    def __init__(self, python: str, workdir: Path, name: str, noverify: bool = False,
                 tls: dict[str, str] | None = None):
        self.name = name
        self.ca = tls["ca.pem"] if tls else None  # --tls: https:// and wss://
        self.log_path = workdir / f"{name}.log"
        self._log = open(self.log_path, "wb")
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("REGISTRY_") and k not in ("LOG_LEVEL", "LOG_FORMAT")}
        env.update(REGISTRY_PORT="0", REGISTRY_WS_PORT="0", REGISTRY_LISTEN=HOST,
                   LOG_LEVEL="warn", REGISTRY_DB_PATH=str(workdir / f"{name}.db"),
                   # leases of 3 h: no simulated node expires while the benchmark runs
                   REGISTRY_HEARTBEAT_INTERVAL="1h")
        if tls:
            env.update(REGISTRY_TLS_CERT=tls["cert.pem"], REGISTRY_TLS_KEY=tls["key.pem"])
        cmd = ([python, "-c", NOVERIFY_BOOT] if noverify
               else [python, "-m", "trustnet.cli", "registry"])
        self.proc = subprocess.Popen(cmd, env=env, cwd=workdir, stdout=self._log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.pid = self.proc.pid
        self.ws: str | None = None
        self.http_port: int | None = None

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Find the websocket address: the "registry listening" line (logged at
        info, so absent at LOG_LEVEL=warn) or else the process's two listening
        sockets, of which the one answering GET /health is HTTP."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n"
                                   f"{self.log_path.read_text()[-3000:]}")
            for line in self.log_path.read_text(errors="replace").splitlines():
                if '"registry listening"' in line:
                    data = json.loads(line)
                    self.ws = data["ws"]
                    self.http_port = int(str(data["binds"][0]).rsplit(":", 1)[1])
            if self.ws is None:
                ports = listening_ports(self.pid)
                if len(ports) >= 2:
                    for port in ports:
                        try:
                            status, _ = http_get(port, "/health", timeout=2.0, ca=self.ca)
                        except (OSError, http.client.HTTPException):
                            continue
                        if status == 200:
                            self.http_port = port
                    others = [p for p in ports if p != self.http_port]
                    if self.http_port is not None and len(others) == 1:
                        self.ws = f"{'wss' if self.ca else 'ws'}://[{HOST}]:{others[0]}"
            if self.ws is not None and self.http_port is not None:
                try:
                    if http_get(self.http_port, "/health", ca=self.ca)[0] == 200:
                        return
                except (OSError, http.client.HTTPException):
                    pass
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} not ready after {timeout}s:\n"
                           f"{self.log_path.read_text()[-3000:]}")

    def cpu(self) -> float | None:
        return cpu_seconds(self.pid)

    def nodes(self) -> int | None:
        try:
            return http_get(self.http_port, "/health",  # type: ignore[arg-type]
                            ca=self.ca)[1].get("nodes")
        except Exception:  # noqa: BLE001
            return None

    def stop(self) -> None:
        stop_process(self.proc, 20)
        self._log.close()

    def log_tail(self, n: int = 5) -> list[str]:
        lines = self.log_path.read_text(errors="replace").splitlines()
        return [ln for ln in lines if '"level":"warn"' not in ln or "API_KEY" not in ln][-n:]


# ================================================================ load generator (child processes)


def node_name(i: int) -> str:
    return f"hb-{i:06d}"


def node_ipv6(i: int) -> str:
    return f"fd10:1234:beef::{i >> 16:x}:{i & 0xFFFF:x}"


def node_identity(i: int) -> Any:
    """Node i's Ed25519 key, derived from i: every process (and every case of a
    variant, against the same registry) gets the same key for the same node."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from trustnet.identity import NodeIdentity
    seed = hashlib.sha256(f"trustnet-bench-heartbeats-{i}".encode()).digest()
    return NodeIdentity(Ed25519PrivateKey.from_private_bytes(seed))


@dataclass
class Case:
    """One measurement: a variant (the registry), a load generator, its links."""
    variant: str
    loadgen: str          # "actor" | "raw"
    links: int            # websocket connections per load-generator process
    inflight: int         # outstanding asks per process (spread over its links)
    profile: bool = False

    @property
    def label(self) -> str:
        return f"{self.variant}/{self.loadgen}/{self.links}L"

    def describe(self) -> str:
        if self.loadgen == "actor":
            return (f"ActorSystem + WebsocketTransport per process, {self.inflight} concurrent "
                    f"askers on {self.links} link")
        per = max(1, self.inflight // self.links)
        return (f"raw websocket client, {self.links} connection(s) per process, {per} in "
                f"flight each")


def _worker(idx: int, ws: str, nodes: list[int], case: dict, cfg: dict, conn: Any) -> None:
    """One load-generator process (see Case). Talks to the parent over `conn`."""
    import trio

    from actors import ActorError, ActorSystem, Refused
    from actors.ws import WebsocketTransport
    from trustnet.logs import setup_logging
    from trustnet.identity import session_key, session_share
    from trustnet.node.heartbeat import HeartbeatSession
    from trustnet.registry.node_protocol import OpenSession, SignedHeartbeat, SignedRegister
    from trustnet.tls import client_context
    import orjson

    setup_logging("bench-loadgen", "error")
    tls_client = client_context(cfg["ca"]) if cfg.get("ca") else None  # --tls
    sessions = case["variant"] == "session"
    me = [(node_name(i), i, node_identity(i)) for i in nodes]

    def stmt(identity: Any, purpose: str, node_id: str, body: dict,
             ts: float | None = None) -> str:
        return orjson.dumps(identity.statement(purpose, node_id, body, now=ts)).decode()

    registers: list[Any] = []
    if cfg["register"]:
        registers = [SignedRegister(stmt(ident, "register", name,
                                         {"ipv6": node_ipv6(i), "port": 9000,
                                          "domain": "bench-hb",
                                          "public_key": ident.public_key}))
                     for name, i, ident in me]
    conn.send(("keys", len(me)))

    async def ask_all(msgs: list[Any], answered: Callable[[int, Any], None] | None = None
                      ) -> tuple[int, dict, float, float]:
        """Ask every message, 64 at a time: (answered, errors, start, end)."""
        transport = WebsocketTransport(HOST, 0, unreachable_after=10.0, queue_size=10_000,
                                       tls_client=tls_client)
        system = ActorSystem(transport=transport)
        registry = system.ref("registry", ws)
        async with trio.open_nursery() as nursery:
            await nursery.start(system.serve)
            errors: collections.Counter[str] = collections.Counter()
            queue = list(enumerate(msgs))
            ok = 0
            t0 = time.time()

            async def registerer() -> None:
                nonlocal ok
                while queue:
                    k, msg = queue.pop()
                    try:
                        answer = await registry.ask(msg, timeout=30.0)
                        if answered is not None:
                            answered(k, answer)
                        ok += 1
                    except Refused as exc:
                        errors[f"refused {exc.code}"] += 1
                    except ActorError as exc:
                        errors[type(exc).__name__] += 1

            async with trio.open_nursery() as inner:
                for _ in range(min(64, len(queue))):
                    inner.start_soon(registerer)
            nursery.cancel_scope.cancel()
            return ok, dict(errors), t0, time.time()

    cmd = conn.recv()
    assert cmd[0] == "register", cmd
    if registers:
        conn.send(("registered", *trio.run(ask_all, registers)))
    else:
        conn.send(("registered", 0, {}, time.time(), time.time()))

    # ---- sessions (the shipped protocol): one signed opening per node, timed
    opened: dict[int, Any] = {}
    if sessions:
        shares = [session_share() for _ in me]
        opens = [OpenSession(stmt(ident, "session", name, {"share": shares[k][1]}))
                 for k, (name, _, ident) in enumerate(me)]

        def keep(k: int, answer: Any) -> None:
            private, share = shares[k]
            key = session_key(private, answer["share"], me[k][0], share, answer["share"])
            opened[k] = HeartbeatSession(answer["session"], key)
        conn.send(("sessions", *trio.run(ask_all, opens, keep)))
    else:
        conn.send(("sessions", 0, {}, time.time(), time.time()))

    # ---- pre-sign the heartbeats (not timed): round robin over our nodes
    budget, skew = cfg["budget"], cfg["ts_offset"]
    if sessions:
        live = [opened[k] for k in sorted(opened)]
        beats = [live[k % len(live)].next() for k in range(budget)] if live else []
    else:
        beats = [SignedHeartbeat(stmt(ident, "heartbeat", name, {}, time.time() + skew))
                 for k in range(budget) for name, _, ident in (me[k % len(me)],)]
    raw = case["loadgen"] == "raw"
    if raw:  # pre-encode the websocket frames too (the real codec, zero mask)
        from actors.codec import Envelope, encode
        links = case["links"]
        # Each connection's hello names its own address; the registry checks that
        # its host is where the connection comes from ([::1]), so the ports tell
        # them apart: ports bound (not listened on) here, held for the run.
        holds = []
        for _ in range(links):
            hold = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
            hold.bind((HOST, 0))
            holds.append(hold)
        hellos = [f"ws://[{HOST}]:{h.getsockname()[1]}" for h in holds]
        frames: list[list[bytes]] = [[] for _ in range(links)]
        for k, msg in enumerate(beats):
            c = k % links
            frames[c].append(ws_frame(encode(Envelope(hellos[c] + "/", "registry", "ask", msg,
                                                      k + 1))))
        beats = []
        socks = [_raw_connect(ws, hello, cfg.get("ca"))  # before the clock starts
                 for hello in hellos]
    conn.send(("signed", budget))
    cmd = conn.recv()
    assert cmd[0] == "run", cmd
    _, start_at, warmup, seconds = cmd
    if raw:
        result = _raw_heartbeats(socks, frames, case["inflight"], start_at, warmup, seconds)
        conn.send(("result", result))
        return

    async def actor_heartbeats() -> dict:
        transport = WebsocketTransport(HOST, 0, unreachable_after=10.0, queue_size=10_000,
                                       tls_client=tls_client)
        system = ActorSystem(transport=transport)
        registry = system.ref("registry", ws)
        win_lo, win_hi = start_at + warmup, start_at + warmup + seconds
        lat: list[float] = []
        done = 0
        herr: collections.Counter[str] = collections.Counter()
        exhausted = False
        it = iter(beats)
        async with trio.open_nursery() as nursery:
            await nursery.start(system.serve)
            await trio.sleep(max(0.0, start_at - time.time()))
            cpu0 = time.process_time()

            async def asker() -> None:
                nonlocal done, exhausted
                perf, wall = time.perf_counter, time.time
                while True:
                    now = wall()
                    if now >= win_hi:
                        return
                    msg = next(it, None)
                    if msg is None:
                        exhausted = True
                        return
                    t = perf()
                    try:
                        await registry.ask(msg, timeout=10.0)
                    except Refused as exc:
                        if now >= win_lo:
                            herr[f"refused {exc.code}"] += 1
                        continue
                    except ActorError as exc:
                        if now >= win_lo:
                            herr[type(exc).__name__] += 1
                        continue
                    end = wall()
                    if win_lo <= end < win_hi:
                        done += 1
                        lat.append(perf() - t)

            async with trio.open_nursery() as inner:
                for _ in range(case["inflight"]):
                    inner.start_soon(asker)
            nursery.cancel_scope.cancel()
        return {"done": done, "lat": lat, "errors": dict(herr), "exhausted": exhausted,
                "cpu": time.process_time() - cpu0}

    conn.send(("result", trio.run(actor_heartbeats)))


def ws_frame(payload: bytes) -> bytes:
    """A masked client text frame (mask key 0: the payload goes as is)."""
    n = len(payload)
    if n < 126:
        head = bytes((0x81, 0x80 | n))
    elif n < 65536:
        head = bytes((0x81, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x81, 0x80 | 127)) + n.to_bytes(8, "big")
    return head + b"\0\0\0\0" + payload


def _raw_connect(ws: str, hello: str, ca: str | None = None) -> socket.socket:
    """TCP (+ TLS for wss://, checked against `ca`) + websocket handshake +
    the transport's hello, as a dialling node does."""
    import base64
    import ssl

    from actors.ws import hello_frame, is_tls, parse_address
    host, port = parse_address(ws)
    sock = socket.create_connection((host, port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if is_tls(ws):
        sock = ssl.create_default_context(cafile=ca).wrap_socket(sock, server_hostname=host)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall((f"GET / HTTP/1.1\r\nHost: [{host}]:{port}\r\nUpgrade: websocket\r\n"
                  f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                  "Sec-WebSocket-Version: 13\r\n\r\n").encode())
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(4096)
        if not chunk:
            raise RuntimeError("registry closed the websocket handshake")
        buf += chunk
    if not buf.startswith(b"HTTP/1.1 101"):
        raise RuntimeError(f"websocket handshake refused: {buf[:80]!r}")
    sock.sendall(ws_frame(hello_frame(hello).encode()))
    sock.settimeout(None)
    return sock


def _raw_heartbeats(socks: list[socket.socket], frames: list[list[bytes]], inflight: int,
                    start_at: float, warmup: float, seconds: float) -> dict:
    """Closed loop over raw websocket connections: `inflight` asks outstanding
    per process, spread over the connections; replies parsed just enough to
    match their correlation ids (orjson)."""
    import selectors

    import orjson

    sel = selectors.DefaultSelector()
    per = max(1, inflight // len(socks))
    conns = []
    for c, sock in enumerate(socks):
        st = {"sock": sock, "frames": frames[c], "next": 0, "buf": bytearray(), "sent": {},
              "closed": False}
        conns.append(st)
        sel.register(sock, selectors.EVENT_READ, st)
    win_lo, win_hi = start_at + warmup, start_at + warmup + seconds
    time.sleep(max(0.0, start_at - time.time()))
    perf, wall = time.perf_counter, time.time
    done, errors, exhausted, stray = 0, collections.Counter(), False, 0
    lat: list[float] = []
    cpu0 = time.process_time()

    # cids: frame j of connection c carries cid (global index + 1); map them back
    for c, st in enumerate(conns):
        st["cid_of"] = [c + j * len(conns) + 1 for j in range(len(st["frames"]))]
    def push_cids(st: dict, n: int) -> None:
        nonlocal exhausted
        i, fr = st["next"], st["frames"]
        take = fr[i:i + n]
        if len(take) < n:
            exhausted = True
        if not take:
            return
        st["next"] = i + len(take)
        t = perf()
        cids = st["cid_of"]
        for j in range(i, i + len(take)):
            st["sent"][cids[j]] = t
        st["sock"].sendall(b"".join(take))

    for st in conns:
        push_cids(st, per)
    while wall() < win_hi and not exhausted:
        for key, _ in sel.select(0.2):
            st = key.data
            try:
                chunk = st["sock"].recv(262144)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError as exc:
                errors[f"socket {type(exc).__name__}"] += 1
                sel.unregister(st["sock"])
                continue
            if not chunk:
                errors["connection closed"] += 1
                sel.unregister(st["sock"])
                continue
            pending = getattr(st["sock"], "pending", None)  # TLS: decrypted bytes select() misses
            while pending is not None and pending():
                chunk += st["sock"].recv(262144)
            buf = st["buf"]
            buf += chunk
            answered = 0
            pos = 0
            now = wall()
            while True:
                if len(buf) - pos < 2:
                    break
                b0, b1 = buf[pos], buf[pos + 1]
                n = b1 & 0x7F
                hdr = 2
                if n == 126:
                    if len(buf) - pos < 4:
                        break
                    n = int.from_bytes(buf[pos + 2:pos + 4], "big")
                    hdr = 4
                elif n == 127:
                    if len(buf) - pos < 10:
                        break
                    n = int.from_bytes(buf[pos + 2:pos + 10], "big")
                    hdr = 10
                if len(buf) - pos < hdr + n:
                    break
                payload = bytes(buf[pos + hdr:pos + hdr + n])
                pos += hdr + n
                opcode = b0 & 0x0F
                if opcode == 8:
                    errors["closed by registry"] += 1
                    continue
                if opcode != 1:
                    continue
                data = orjson.loads(payload)
                # one envelope, or a batch of them (what queued up in the registry)
                for env in data if isinstance(data, list) else (data,):
                    t = st["sent"].pop(env.get("cid"), None)
                    if t is None:
                        # not an answer to this run's asks: the registry flushed a reply
                        # queued for an earlier connection with the same address
                        stray += 1
                        continue
                    answered += 1
                    if win_lo <= now < win_hi:
                        if env.get("kind") == "reply":
                            done += 1
                            lat.append(perf() - t)
                        else:
                            body = env.get("body") or {}
                            errors[f"error {body.get('code') or body.get('type') or '?'}"] += 1
            del buf[:pos]
            if answered:
                push_cids(st, answered)
    cpu = time.process_time() - cpu0
    for st in conns:
        st["sock"].close()
    if stray:
        errors["stray replies (ignored)"] += stray
    return {"done": done, "lat": lat, "errors": dict(errors), "exhausted": exhausted, "cpu": cpu}


@dataclass
class RunResult:
    case: Case
    nodes: int
    registered: int = 0
    register_rate: float | None = None
    register_errors: dict = field(default_factory=dict)
    sessions: int = 0
    session_rate: float | None = None
    session_errors: dict = field(default_factory=dict)
    heartbeats: int = 0
    seconds: float = 0.0
    p50_ms: float | None = None
    p99_ms: float | None = None
    errors: dict = field(default_factory=dict)
    reg_cpu: float | None = None      # registry CPU seconds in the window
    reg_sys: float | None = None      # of which in the kernel (stime)
    reg_rss_mb: float | None = None   # registry resident memory at the end of the window
    gen_cpu: float = 0.0              # load generator CPU seconds in the window (all workers)
    exhausted: bool = False
    profile: dict | None = None

    @property
    def variant(self) -> str:
        return self.case.variant

    @property
    def rate(self) -> float:
        return self.heartbeats / self.seconds if self.seconds else 0.0

    @property
    def per_cpu(self) -> float | None:
        return self.heartbeats / self.reg_cpu if self.reg_cpu else None

    @property
    def us_per_hb(self) -> float | None:
        return self.reg_cpu / self.heartbeats * 1e6 if self.reg_cpu and self.heartbeats else None


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def run_variant(args: argparse.Namespace, python: str, workdir: Path, variant: str,
                cases: list[Case]) -> list[RunResult]:
    """One registry for the variant; the first case registers the nodes."""
    reg = Registry(python, workdir, f"registry-{variant}", noverify=(variant == "noverify"),
                   tls=args.tls_files)
    out: list[RunResult] = []
    try:
        reg.wait_ready()
        print(f"  [{variant}] registry pid {reg.pid} at {reg.ws} (HTTP port {reg.http_port}), "
              f"RSS {fmt(rss_mb(reg.pid), '.0f')} MB", flush=True)
        for k, case in enumerate(cases):
            out.append(run_case(args, reg, workdir, case, register=(k == 0)))
    finally:
        reg.stop()
    return out


def totals(reports: list[tuple]) -> tuple[int, dict, float]:
    """The load generators' ("...", answered, errors, start, end) reports
    summed: answered, errors by kind, and the span from first start to last end."""
    errors: dict[str, int] = {}
    for m in reports:
        for key, v in m[2].items():
            errors[key] = errors.get(key, 0) + v
    return (sum(m[1] for m in reports), errors,
            max(m[4] for m in reports) - min(m[3] for m in reports))


def run_case(args: argparse.Namespace, reg: Registry, workdir: Path, case: Case,
             register: bool) -> RunResult:
    res = RunResult(case, args.nodes)
    ctx = mp.get_context("spawn")
    procs: list[Any] = []
    pipes: list[Any] = []
    tag = case.label
    try:
        P = args.processes
        max_rate = max_rate_of(args, case.variant)
        budget = math.ceil(max_rate * (args.warmup + args.seconds) / P)
        cfg = {"budget": budget, "ts_offset": args.ts_offset, "register": register,
               "ca": reg.ca}
        for w in range(P):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_worker, args=(w, reg.ws, list(range(w, args.nodes, P)),
                                                  vars(case), cfg, child), daemon=True)
            p.start()
            procs.append(p)
            pipes.append(parent)

        def recv_all(what: str, timeout: float = 600.0) -> list[tuple]:
            got = []
            for p, pipe in zip(procs, pipes):
                if not pipe.poll(timeout):
                    raise RuntimeError(f"load generator {p.pid} sent no {what!r} in {timeout}s "
                                       f"(alive: {p.is_alive()})")
                msg = pipe.recv()
                if msg[0] != what:
                    raise RuntimeError(f"expected {what!r}, got {msg[0]!r}")
                got.append(msg)
            return got

        t = time.monotonic()
        recv_all("keys")
        for pipe in pipes:
            pipe.send(("register",))
        if register:
            print(f"  [{tag}] {args.nodes:,} node keys and registrations made in "
                  f"{time.monotonic() - t:.1f} s ({P} processes)", flush=True)
        regs = recv_all("registered")
        if register:
            res.registered, res.register_errors, span = totals(regs)
            res.register_rate = res.registered / span if span > 0 else None
            print(f"  [{tag}] registered {res.registered:,} nodes (signed SignedRegister over the websocket, "
                  f"{64 * P} in flight) in {span:.1f} s = {fmt(res.register_rate)}/s; the "
                  f"registry holds {fmt(reg.nodes())}"
                  + (f"; errors {res.register_errors}" if res.register_errors else ""),
                  flush=True)
        opens = recv_all("sessions")
        if case.variant == "session":
            res.sessions, res.session_errors, span = totals(opens)
            res.session_rate = res.sessions / span if span > 0 else None
            print(f"  [{tag}] opened {res.sessions:,} heartbeat sessions (signed OpenSession, "
                  f"{64 * P} in flight) in {span:.1f} s = {fmt(res.session_rate)}/s"
                  + (f"; errors {res.session_errors}" if res.session_errors else ""), flush=True)
        t = time.monotonic()
        signed = sum(m[1] for m in recv_all("signed"))
        print(f"  [{tag}] {'pre-signed' if case.variant in ('signed', 'noverify') else 'prepared'} "
              f"{signed:,} heartbeats in {time.monotonic() - t:.1f} s (enough for "
              f"{max_rate:,.0f}/s over {args.warmup + args.seconds:g} s); "
              f"{case.describe()}", flush=True)

        start_at = time.time() + 1.0 + 0.02 * case.links
        for pipe in pipes:
            pipe.send(("run", start_at, args.warmup, args.seconds))
        lo, hi = start_at + args.warmup, start_at + args.warmup + args.seconds
        time.sleep(max(0.0, lo - time.time()))
        c0, s0 = reg.cpu(), cpu_split(reg.pid)
        spy = (start_profiler(args, reg.pid, workdir, tag.replace("/", "-"))
               if args.profile and case.profile else None)
        time.sleep(max(0.0, hi - time.time()))
        c1, s1 = reg.cpu(), cpu_split(reg.pid)
        res.reg_rss_mb = rss_mb(reg.pid)
        res.seconds = args.seconds
        res.reg_cpu = None if c0 is None or c1 is None else c1 - c0
        if s0 and s1:
            res.reg_sys = s1[1] - s0[1]
        results = [m[1] for m in recv_all("result", timeout=args.seconds + 120)]
        lat = sorted(x for r in results for x in r["lat"])
        res.heartbeats = sum(r["done"] for r in results)
        res.p50_ms = (percentile(lat, 0.50) or 0) * 1e3 if lat else None
        res.p99_ms = (percentile(lat, 0.99) or 0) * 1e3 if lat else None
        for r in results:
            for key, v in r["errors"].items():
                res.errors[key] = res.errors.get(key, 0) + v
        res.exhausted = any(r["exhausted"] for r in results)
        res.gen_cpu = sum(r["cpu"] for r in results)
        if spy is not None:
            res.profile = finish_profiler(spy)
        print(f"  [{tag}] {res.heartbeats:,} heartbeats answered in {args.seconds:g} s "
              f"= {res.rate:,.0f}/s, registry CPU {fmt(res.reg_cpu, '.1f')} s "
              f"-> {fmt(res.per_cpu)} per CPU-second", flush=True)
        for p in procs:
            p.join(10)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    return res


# ================================================================ profiling (py-spy)


def find_pyspy() -> str | None:
    for cand in (shutil.which("py-spy"), "/tmp/prof/bin/py-spy", "/tmp/pyspy/bin/py-spy"):
        if cand and os.access(cand, os.X_OK):
            return cand
    return None


def start_profiler(args: argparse.Namespace, pid: int, workdir: Path, variant: str) -> Any:
    exe = find_pyspy()
    if exe is None:
        print("  (--profile: py-spy not found; install it outside the project, e.g. "
              "`python3.13 -m venv /tmp/prof && /tmp/prof/bin/pip install py-spy`)")
        return None
    out = workdir / f"profile-{variant}.txt"
    duration = max(1, int(args.seconds) - 1)
    proc = subprocess.Popen([exe, "record", "-p", str(pid), "-d", str(duration), "-r", "200",
                             "--nonblocking", "-f", "raw", "-o", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return proc, out


# (label, function name (last part of its qualified name), path part): the
# inclusive share of the samples whose stack holds such a frame
PROFILE_GROUPS: list[tuple[str, str, str]] = [
    ("RegistryActor.receive: all of the heartbeat's handling", "receive", "registry/actor.py"),
    ("  StatementGate.parse: orjson.loads of the statement", "parse", "registry/nodes.py"),
    ("  state.public_key_of: SQLite SELECT per heartbeat", "public_key_of", "registry/state.py"),
    ("  ReplayGuard.check: ts/nonce checks + verify", "check", "trustnet/identity.py"),
    ("    identity.verify: Ed25519 verify (+ key parse)", "verify", "trustnet/identity.py"),
    ("  RegistryActor._heartbeat: lease renew + reputation", "_heartbeat", "registry/actor.py"),
    ("RegistryActor._checkpoint: leases/reputation to SQLite", "_checkpoint", "registry/actor.py"),
    ("transport _read_frames: read, decode, deliver (answer inline)", "_read_frames",
     "actors/ws.py"),
    ("  websocket read: socket recv + wsproto parse", "_receive", "actors/wsconn.py"),
    ("  decode_frame: envelope JSON -> message", "decode_frame", "actors/ws.py"),
    ("reply path: RemoteReply.set -> codec.encode -> queue", "set", "actors/actor.py"),
    ("transport _write_frames: ws send_message per reply", "_write_frames", "actors/ws.py"),
    ("socket send()/recv() syscalls (trio _nonblocking_helper)", "_nonblocking_helper",
     "trio/_socket.py"),
]
RUN_LOOP = "trio run loop only (scheduling, epoll; no task frame)"
_LOOP_ONLY = re.compile(r"runpy|trustnet/cli\.py|trio/_core/|<string>")


def finish_profiler(spy: tuple) -> dict | None:
    proc, out = spy
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        return None
    if not out.exists():
        return {"error": (err or b"").decode(errors="replace")[-300:]}
    return summarize_profile(out)


def _frame_parts(frame: str) -> tuple[str, str]:
    m = re.match(r"(.*) \((.*)\)$", frame)
    return (m.group(1), m.group(2)) if m else (frame, "")


def summarize_profile(path: Path) -> dict:
    total = 0
    inclusive: collections.Counter[str] = collections.Counter()
    self_time: collections.Counter[str] = collections.Counter()
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        try:
            n = int(count)
        except ValueError:
            continue
        total += n
        frames = [_frame_parts(fr) for fr in stack.split(";")]
        hit = set()
        for func, where in frames:
            short = func.rsplit(".", 1)[-1]
            for label, f, file_part in PROFILE_GROUPS:
                if short == f and file_part in where:
                    hit.add(label)
        if all(_LOOP_ONLY.search(where) for _, where in frames):
            hit.add(RUN_LOOP)
        for label in hit:
            inclusive[label] += n
        func, where = frames[-1]
        where = re.sub(r".*/(site-packages|lib/python3\.\d+)/", "", where)
        self_time[f"{func} ({where.rsplit(':', 1)[0]})"] += n
    return {"total": total, "inclusive": dict(inclusive), "self": self_time.most_common(15),
            "path": str(path)}


# ================================================================ micro-measurements


def verify_microbench(n: int = 3000) -> dict[str, float]:
    """µs per Ed25519 operation here and now (one core): the registry's
    verify (libsodium, trustnet.identity.verify), cryptography's for
    comparison, the whole statement check and a signature (cryptography)."""
    import orjson

    from trustnet.identity import (NodeIdentity, ReplayGuard, canonical, public_key_from_text,
                                   unb64, verify)
    ident = NodeIdentity.generate()
    stmts = [ident.statement("heartbeat", "n1", {}) for _ in range(n)]
    pk = public_key_from_text(ident.public_key)
    data, sig_text = canonical(stmts[0]), stmts[0]["sig"]
    out = {}
    t = time.perf_counter()
    for _ in range(n):
        verify(ident.public_key, data, sig_text)
    out["verify_us"] = (time.perf_counter() - t) / n * 1e6
    raw_sig = unb64(sig_text)
    t = time.perf_counter()
    for _ in range(n):
        pk.verify(raw_sig, data)
    out["cryptography_verify_us"] = (time.perf_counter() - t) / n * 1e6
    guard = ReplayGuard()
    texts = [orjson.dumps(s).decode() for s in stmts]
    t = time.perf_counter()
    for text in texts:
        guard.check(orjson.loads(text), ident.public_key, "heartbeat")
    out["gate_us"] = (time.perf_counter() - t) / n * 1e6
    t = time.perf_counter()
    for _ in range(n // 3):
        ident.statement("heartbeat", "n1", {})
    out["sign_us"] = (time.perf_counter() - t) / (n // 3) * 1e6
    return out


# ================================================================ etcd


def etcd_reference_line() -> str:
    lo, hi = ETCD_REFERENCE
    return (f"{lo:,}-{hi:,} keepalives/s (REFERENCE from issue 3, 3-member cluster at 16 "
            f"connections; NOT measured here)")


def etcd_installed(allow_install: bool) -> str | None:
    exe = shutil.which("etcd")
    if exe or not allow_install:
        return exe
    print("etcd not installed; --with-etcd: apt-get install -y etcd-server etcd-client ...",
          flush=True)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], env=env, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, check=False)
    r = subprocess.run(["apt-get", "install", "-y", "-qq", "etcd-server", "etcd-client"],
                       env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=False)
    if r.returncode != 0:
        print(f"  apt-get failed: {r.stderr.decode(errors='replace')[-300:]}")
    return shutil.which("etcd")


def free_port4() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EtcdCluster:
    """A 3-member etcd cluster on 127.0.0.1, data in the work dir."""

    def __init__(self, exe: str, workdir: Path, members: int = 3):
        self.procs: list[subprocess.Popen] = []
        self.logs = []
        names = [f"m{i}" for i in range(members)]
        peers = {n: free_port4() for n in names}
        self.clients = {n: free_port4() for n in names}
        cluster = ",".join(f"{n}=http://127.0.0.1:{peers[n]}" for n in names)
        for n in names:
            log = open(workdir / f"etcd-{n}.log", "wb")
            self.logs.append(log)
            self.procs.append(subprocess.Popen(
                [exe, "--name", n, "--data-dir", str(workdir / f"etcd-{n}"),
                 "--listen-client-urls", f"http://127.0.0.1:{self.clients[n]}",
                 "--advertise-client-urls", f"http://127.0.0.1:{self.clients[n]}",
                 "--listen-peer-urls", f"http://127.0.0.1:{peers[n]}",
                 "--initial-advertise-peer-urls", f"http://127.0.0.1:{peers[n]}",
                 "--initial-cluster", cluster, "--initial-cluster-state", "new",
                 "--initial-cluster-token", "trustnet-bench", "--log-level", "error"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(p.poll() is not None for p in self.procs):
                raise RuntimeError("an etcd member exited")
            try:
                if all(self.post(port, "/v3/maintenance/status", {}).get("leader")
                       for port in self.clients.values()):
                    return
            except (OSError, ValueError, http.client.HTTPException):
                pass
            time.sleep(0.2)
        raise RuntimeError("etcd cluster not ready")

    @staticmethod
    def post(port: int, path: str, body: dict) -> dict:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        try:
            conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
            return json.loads(conn.getresponse().read())
        finally:
            conn.close()

    def cpu(self) -> float:
        return sum(cpu_seconds(p.pid) or 0.0 for p in self.procs)

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for log in self.logs:
            log.close()


def _etcd_worker(targets: list[tuple[int, str]], start_at: float, warmup: float,
                 seconds: float, out: Any) -> None:
    """Closed-loop keepalives over HTTP/1.1 keep-alive, one connection per target,
    each POST /v3/lease/keepalive {"ID": lease} through the JSON gateway."""
    import selectors

    sel = selectors.DefaultSelector()
    conns = []
    for port, lease in targets:
        s = socket.create_connection(("127.0.0.1", port))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.setblocking(False)
        body = json.dumps({"ID": lease}).encode()
        req = (f"POST /v3/lease/keepalive HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
               f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
               ).encode() + body
        c = {"sock": s, "req": req, "buf": b"", "t": 0.0}
        conns.append(c)
        sel.register(s, selectors.EVENT_READ, c)
    lo, hi = start_at + warmup, start_at + warmup + seconds
    time.sleep(max(0.0, start_at - time.time()))
    done, errors, lat = 0, 0, []
    for c in conns:
        c["t"] = time.perf_counter()
        c["sock"].sendall(c["req"])
    cpu0 = time.process_time()
    while time.time() < hi:
        for key, _ in sel.select(0.5):
            c = key.data
            try:
                chunk = c["sock"].recv(65536)
            except BlockingIOError:
                continue
            if not chunk:
                raise RuntimeError("etcd closed a connection")
            c["buf"] += chunk
            complete = _http_response_complete(c["buf"])
            if complete is None:
                continue
            status_ok, used = complete
            c["buf"] = c["buf"][used:]
            now = time.time()
            if lo <= now < hi:
                if status_ok:
                    done += 1
                    lat.append(time.perf_counter() - c["t"])
                else:
                    errors += 1
            c["t"] = time.perf_counter()
            c["sock"].sendall(c["req"])
    out.send({"done": done, "errors": errors, "lat": lat, "cpu": time.process_time() - cpu0})


def _http_response_complete(buf: bytes) -> tuple[bool, int] | None:
    """(status 200 and a result in it?, bytes used) once a whole response is in buf."""
    head_end = buf.find(b"\r\n\r\n")
    if head_end < 0:
        return None
    head = buf[:head_end].decode("latin-1").lower()
    ok = head.startswith("http/1.1 200")
    pos = head_end + 4
    m = re.search(r"content-length:\s*(\d+)", head)
    if m:
        end = pos + int(m.group(1))
        if len(buf) < end:
            return None
        return ok and b'"result"' in buf[pos:end] or ok and b'"TTL"' in buf[pos:end], end
    if "transfer-encoding: chunked" in head:
        body = b""
        while True:
            line_end = buf.find(b"\r\n", pos)
            if line_end < 0:
                return None
            size = int(buf[pos:line_end].split(b";")[0], 16)
            if len(buf) < line_end + 2 + size + 2:
                return None
            body += buf[line_end + 2:line_end + 2 + size]
            pos = line_end + 2 + size + 2
            if size == 0:
                return ok and b'"TTL"' in body and b'"error"' not in body, pos
    return ok, pos


def measure_etcd(exe: str, workdir: Path, args: argparse.Namespace) -> dict:
    cluster = EtcdCluster(exe, workdir)
    try:
        cluster.wait_ready()
        ports = list(cluster.clients.values())
        conns = args.etcd_connections
        targets = []
        for i in range(conns):  # spread over the members, as etcd's benchmark tool does
            port = ports[i % len(ports)]
            lease = cluster.post(port, "/v3/lease/grant", {"TTL": 3600})["ID"]
            targets.append((port, lease))
        check = cluster.post(targets[0][0], "/v3/lease/keepalive", {"ID": targets[0][1]})
        if "result" not in check or "TTL" not in check["result"]:
            raise RuntimeError(f"unexpected keepalive answer: {check}")
        P = args.etcd_processes
        ctx = mp.get_context("spawn")
        start_at = time.time() + 1.5
        procs, pipes = [], []
        for w in range(P):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_etcd_worker, args=(targets[w::P], start_at, args.warmup,
                                                       args.seconds, child), daemon=True)
            p.start()
            procs.append(p)
            pipes.append(parent)
        lo, hi = start_at + args.warmup, start_at + args.warmup + args.seconds
        time.sleep(max(0.0, lo - time.time()))
        c0 = cluster.cpu()
        time.sleep(max(0.0, hi - time.time()))
        c1 = cluster.cpu()
        results = []
        for pipe in pipes:
            if not pipe.poll(args.seconds + 60):
                raise RuntimeError("etcd load generator did not answer")
            results.append(pipe.recv())
        for p in procs:
            p.join(5)
        lat = sorted(x for r in results for x in r["lat"])
        done = sum(r["done"] for r in results)
        return {"rate": done / args.seconds, "done": done,
                "errors": sum(r["errors"] for r in results),
                "p50_ms": (percentile(lat, 0.5) or 0) * 1e3 if lat else None,
                "p99_ms": (percentile(lat, 0.99) or 0) * 1e3 if lat else None,
                "cpu": c1 - c0, "gen_cpu": sum(r["cpu"] for r in results),
                "version": subprocess.run([exe, "--version"], capture_output=True,
                                          text=True).stdout.split("\n")[0]}
    finally:
        cluster.stop()


# ================================================================ main

FULL_CASES = ("session:actor:1:64,session:raw:1:64,session:raw:500:500,signed:actor:1:64,"
              "signed:raw:1:64,noverify:raw:1:64")
QUICK_CASES = "session:actor:1:64,session:raw:1:64,signed:raw:1:64"


def max_rate_of(args: argparse.Namespace, variant: str) -> float:
    """What the statements prepared for a case can sustain (see --max-rate)."""
    if args.max_rate is not None:
        return args.max_rate
    return 60_000 if variant == "session" else 15_000


def parse_cases(text: str, profile: bool) -> list[Case]:
    cases = []
    for item in text.split(","):
        parts = item.strip().split(":")
        if len(parts) != 4 or parts[0] not in VARIANTS or parts[1] not in ("actor", "raw"):
            raise ValueError(f"bad case {item!r}: want variant:actor|raw:links:inflight "
                             f"with variant in {sorted(VARIANTS)}")
        links, inflight = int(parts[2]), int(parts[3])
        if parts[1] == "actor" and links != 1:
            raise ValueError(f"{item!r}: the actor load generator has one link per process")
        cases.append(Case(parts[0], parts[1], links, inflight, profile))
    return cases


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 2,000 nodes, 5 s per case, 3 cases")
    p.add_argument("--nodes", type=int, help="simulated nodes (default 10,000; 2,000 quick)")
    p.add_argument("--processes", type=int, default=2,
                   help="load-generator processes (default 2)")
    p.add_argument("--cases", help="comma list of variant:loadgen:links:inflight, per process "
                                   f"(default {FULL_CASES}; quick {QUICK_CASES})")
    p.add_argument("--seconds", type=float, help="measured seconds per case (default 20; 5 quick)")
    p.add_argument("--warmup", type=float, help="seconds before the window (default 3; 1 quick)")
    p.add_argument("--max-rate", type=float,
                   help="heartbeats/s the prepared statements can sustain (default 60,000 "
                        "for session heartbeats, cheap to make, 15,000 for signed ones: 21 us "
                        "a signature); a case that runs out says so, and its rate is then low")
    p.add_argument("--ts-offset", type=float, default=20.0,
                   help="statements are stamped this far in the future so they stay within "
                        "the registry's 60 s skew for the whole run (default 20)")
    p.add_argument("--profile", action="store_true",
                   help="py-spy record the registry during each measured window")
    p.add_argument("--with-etcd", action="store_true",
                   help="apt-get install etcd-server etcd-client if etcd is missing")
    p.add_argument("--no-etcd", action="store_true", help="do not run etcd even if installed")
    p.add_argument("--etcd-connections", type=int, default=16)
    p.add_argument("--etcd-processes", type=int, default=2)
    p.add_argument("--keep", action="store_true", help="keep the work dir (logs, profiles)")
    p.add_argument("--tls", action="store_true",
                   help="the registry serves TLS (REGISTRY_TLS_CERT/KEY): nodes dial wss://")
    args = p.parse_args(argv)
    args.nodes = args.nodes or (2_000 if args.quick else 10_000)
    args.seconds = args.seconds or (5.0 if args.quick else 20.0)
    args.warmup = args.warmup if args.warmup is not None else (1.0 if args.quick else 3.0)
    try:
        args.case_list = parse_cases(args.cases or (QUICK_CASES if args.quick else FULL_CASES),
                                     args.profile)
    except ValueError as exc:
        p.error(str(exc))
    if args.warmup + args.seconds + args.ts_offset > 55:
        p.error("--warmup + --seconds + --ts-offset must stay under the 60 s statement skew")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    python = server_python("heartbeats.py")
    t_start = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="trustnet-hb-"))
    import cryptography

    print(f"TrustNet registry heartbeat capacity{' (--quick)' if args.quick else ''}: "
          f"{os.cpu_count()} CPUs, Python {platform.python_version()}, cryptography "
          f"{cryptography.__version__}, load average {os.getloadavg()[0]:.1f}")
    print(f"{args.nodes:,} simulated nodes, {args.processes} load-generator processes, "
          f"{args.warmup:g} s warm-up + {args.seconds:g} s measured per case; work dir {workdir}",
          flush=True)
    args.tls_files = None
    if args.tls:
        from trustnet.tls import make_certificates, write_certificates
        args.tls_files = write_certificates(make_certificates([HOST]), str(workdir / "certs"))
        print("--tls: the registry serves https:// and wss:// (a certificate for "
              f"[{HOST}] from trustnet.tls); every load generator connection is TLS", flush=True)
    micro = verify_microbench()
    results: list[RunResult] = []
    by_variant: dict[str, list[Case]] = {}
    for case in args.case_list:
        by_variant.setdefault(case.variant, []).append(case)
    for variant, cases in by_variant.items():
        results += run_variant(args, python, workdir, variant, cases)
    etcd: dict | None = None
    etcd_note = ""
    if not args.no_etcd:
        exe = etcd_installed(args.with_etcd)
        if exe:
            print(f"etcd: 3-member cluster on 127.0.0.1, {args.etcd_connections} connections, "
                  "lease keepalives through its JSON gateway ...", flush=True)
            try:
                etcd = measure_etcd(exe, workdir, args)
            except Exception as exc:  # noqa: BLE001
                etcd_note = f"etcd measurement failed: {type(exc).__name__}: {exc}"
        else:
            etcd_note = "etcd is not installed (run with --with-etcd to apt-get it)"
    else:
        etcd_note = "etcd skipped (--no-etcd)"

    P = args.processes
    print()
    print("Results: answered heartbeats in the measured window; latency = one ask, client side; "
          f"links and in-flight are totals over the {P} load-generator processes")
    print(f"  {'case':<22} {'links':>5} {'inflt':>5} {'hb/s':>7} {'p50 ms':>7} {'p99 ms':>7} "
          f"{'reg CPU':>12} {'hb/CPU-s':>8} {'us/hb':>6} {'RSS MB':>6} {'gen CPU':>7} {'err':>4}")
    for r in results:
        c = r.case
        util = f"{r.reg_cpu / r.seconds:.0%}" if r.reg_cpu is not None else "-"
        if r.reg_cpu and r.reg_sys is not None:
            util += f" ({r.reg_sys / r.reg_cpu:.0%})"
        print(f"  {c.variant + '/' + c.loadgen:<22} {c.links * P:>5} {c.inflight * P:>5} "
              f"{r.rate:>7,.0f} {fmt(r.p50_ms, '.2f'):>7} {fmt(r.p99_ms, '.2f'):>7} "
              f"{util:>12} {fmt(r.per_cpu):>8} {fmt(r.us_per_hb):>6} "
              f"{fmt(r.reg_rss_mb, '.0f'):>6} {r.gen_cpu / r.seconds:>7.0%} "
              f"{sum(r.errors.values()):>4}")
        if r.errors:
            print(f"  {'':<22} errors: {r.errors}")
        if r.exhausted:
            print(f"  {'':<22} NOTE: ran out of pre-signed statements (raise --max-rate)")
    print("  reg CPU: the registry's CPU time / wall time (100% = one core), its kernel (sys) "
          "share in brackets;")
    print("  hb/CPU-s: heartbeats per registry CPU-second (what one dedicated core would do); "
          "gen CPU: all load generators")
    for v in by_variant:
        print(f"  {v}: {VARIANTS[v]}")
    print("  actor: the load generator a node is (ActorSystem + WebsocketTransport, Ref.ask); "
          "raw: pre-encoded frames on raw sockets, far cheaper per ask")
    regs = [r for r in results if r.register_rate]
    if regs:
        print("  registration over the websocket, 128 in flight: " + ", ".join(
            f"{r.variant} {fmt(r.register_rate)}/s" for r in regs))
    opens = [r for r in results if r.session_rate]
    if opens:
        print("  heartbeat sessions opened (signed OpenSession + X25519), 128 in flight: "
              + ", ".join(f"{r.case.label} {fmt(r.session_rate)}/s" for r in opens))
    print(f"  this machine, now: Ed25519 verify {micro['verify_us']:.0f} us (libsodium, as the "
          f"registry does; cryptography's {micro['cryptography_verify_us']:.0f} us), "
          f"the whole statement check (JSON parse + canonical + verify + replay guard) "
          f"{micro['gate_us']:.0f} us, sign {micro['sign_us']:.0f} us (cryptography)")
    print(f"  -> signature checks alone cap one core at {1e6 / micro['gate_us']:,.0f} "
          "heartbeats/s")

    print()
    best = {}
    for r in results:
        if r.variant not in best or r.rate > best[r.variant].rate:
            best[r.variant] = r
    if etcd:
        per_cpu_etcd = etcd["done"] / etcd["cpu"] if etcd["cpu"] else None
        print(f"etcd ({etcd['version']}), MEASURED here: {etcd['rate']:,.0f} keepalives/s at "
              f"{args.etcd_connections} connections (p50 {fmt(etcd['p50_ms'], '.2f')} ms, "
              f"p99 {fmt(etcd['p99_ms'], '.2f')} ms, errors {etcd['errors']}); the 3 members "
              f"used {etcd['cpu'] / args.seconds:.0%} of a core -> {fmt(per_cpu_etcd)} "
              f"keepalives per cluster CPU-second; load generator {etcd['gen_cpu'] / args.seconds:.0%}")
        print("  (through etcd's JSON gateway: each keepalive is an HTTP/1.1 POST that etcd turns "
              "into a gRPC LeaseKeepAlive stream internally; etcd's gRPC benchmark tool is not "
              "packaged here)")
        for v, r in best.items():
            ratio = r.rate / etcd["rate"] if etcd["rate"] else None
            cpu_ratio = r.per_cpu / per_cpu_etcd if r.per_cpu and per_cpu_etcd else None
            print(f"  registry {v:<9} (best case {r.case.label}): {fmt(ratio, '.2f')}x etcd's "
                  f"keepalives/s; per CPU-second {fmt(cpu_ratio, '.2f')}x")
    else:
        print(f"etcd: {etcd_note}")
    lo, hi = ETCD_REFERENCE
    print(f"  etcd {etcd_reference_line()}")
    for v, r in best.items():
        print(f"  registry {v:<9} (best case {r.case.label}): {r.rate / hi:.2f}-{r.rate / lo:.2f}x "
              f"the reference; per registry CPU-second {fmt(r.per_cpu)}/s = "
              f"{(r.per_cpu or 0) / hi:.2f}-{(r.per_cpu or 0) / lo:.2f}x")

    print()
    print("Target (issue 3, informational): >= 10,000 heartbeats/s on one registry process "
          "(300,000 nodes at 30 s)")
    for r in results:
        verdict = "PASS" if r.rate >= TARGET else "MISS"
        extra = ""
        if r.per_cpu:
            extra = (f"  (per registry CPU-second {r.per_cpu:,.0f}: "
                     f"{'PASS' if r.per_cpu >= TARGET else 'MISS'} even with a core to itself)")
        print(f"  {r.case.label:<22} {r.rate:>8,.0f}/s  {verdict}{extra}")

    for r in results:
        prof = r.profile
        if not prof:
            continue
        print()
        if "error" in prof:
            print(f"Profile of the registry ({r.case.label}): py-spy failed: {prof['error']}")
            continue
        total = prof["total"] or 1
        print(f"Profile of the registry ({r.case.label}; py-spy, {prof['total']:,} samples at "
              f"200 Hz; share of samples, and that share of the measured {fmt(r.us_per_hb)} us "
              "of registry CPU per heartbeat):")
        for label in [g[0] for g in PROFILE_GROUPS] + [RUN_LOOP]:
            n = prof["inclusive"].get(label, 0)
            us = n / total * r.us_per_hb if r.us_per_hb else None
            print(f"  {n / total:6.1%} {fmt(us, '5.0f')} us  {label}")
        print("  top self time:")
        for name, n in prof["self"][:12]:
            print(f"  {n / total:6.1%}  {name}")
        print("  (py-spy counts a thread that is runnable but preempted as busy: on an "
              "oversubscribed machine the syscalls that wake")
        print("  another process (send) collect samples out of proportion; /proc's sys share "
              "above is the kernel's real CPU)")
    print()
    print(f"total time {time.monotonic() - t_start:.0f} s")
    if args.keep or args.profile:
        print(f"kept {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
