"""Mesh broadcast benchmark: time for a broadcast to reach every node.

    .venv/bin/python bench/mesh.py            # full run: 50 real nodes, then the simulation ladder
    .venv/bin/python bench/mesh.py --quick    # smoke run: 10 real nodes, small simulations
    .venv/bin/python bench/mesh.py --skip-real / --skip-sim

(a) Real processes. One `trustnet registry` and N (default 50) `trustnet node`
    processes on loopback. The registry keeps every node's ipv6 UNIQUE, so each
    node advertises its own ULA, added to `lo` for the run
    (`ip -6 addr add fd10:1234::be:<n>/128 dev lo nodad`, root) and removed at
    the end, always (finally + SIGTERM/SIGHUP handlers; an address that was
    already there is left alone). Once the links form a connected mesh, it
    POSTs broadcasts (default 30) to random nodes' local APIs and polls every
    other node's GET /messages until all of them have it.

    Arrival times. Each node stamps a message with `received_at`, its own trio
    clock: CLOCK_MONOTONIC (the benchmark's time.perf_counter too) plus a random
    offset trio draws per process. The offset of node i is pinned down by the
    polls: a message first seen by the poll that returned at t1, and absent from
    the poll that started at t0, arrived in [t0, t1], so the offset lies in
    [received_at - t1, received_at - t0]; intersecting these intervals over all
    broadcasts leaves a few milliseconds. Arrival = received_at - offset.
    Printed: time-to-all (last node's arrival minus the POST's start) p50/p99
    from these calibrated arrivals, and the cruder poll-based upper bound.

(b) Simulation. The node actors (HeartbeatActor, MeshActor, PeerLinkActors)
    over actors.simnet under trio's MockClock, with the in-sim registry of
    tests/sim/test_mesh_sim.py (its Candidates replaced by an O(limit) random
    sample, since the test's sorts every node on every call). Each link delays
    every frame by a uniform --sim-delay (default 0.5-5 ms): simulated time is
    network delay only, processing is free. Sizes run as a ladder (default up
    to 10,000 nodes), each in a subprocess; a size whose predicted wall time
    (from the trend so far) exceeds --sim-budget is skipped and said so.
    Printed per size: time to a connected mesh, broadcast time-to-all p50/p99
    and hops in simulated time, and the real (wall) time the simulation took.

Figures only; the exit status is 0 unless the benchmark itself broke.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import http.client
import json
import math
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, server_python  # noqa: E402
HOST = "::1"
ADDR_PREFIX = "fd10:1234::be:"  # node n advertises fd10:1234::be:<n in hex>


# ================================================================ helpers


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile."""
    if not values:
        return None
    s = sorted(values)
    return s[max(0, min(len(s) - 1, math.ceil(q * len(s)) - 1))]


def fmt(v: float | None, spec: str = ".1f") -> str:
    return "-" if v is None else format(v, spec)


def log_line(path: Path, message: str) -> dict | None:
    """The first JSON log line of `path` whose message is `message`."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        if f'"{message}"' in line:
            try:
                data = json.loads(line)
            except ValueError:
                continue
            if data.get("message") == message:
                return data
    return None


def port_of(bind: str) -> int:
    return int(str(bind).rsplit(":", 1)[1])


class Api:
    """A keep-alive HTTP/1.1 connection to one local API."""

    def __init__(self, port: int):
        self.port = port
        self.conn: http.client.HTTPConnection | None = None

    def request(self, method: str, path: str, body: Any = None,
                timeout: float = 10.0) -> tuple[int, Any]:
        for attempt in (1, 2):
            if self.conn is None:
                self.conn = http.client.HTTPConnection(HOST, self.port, timeout=timeout)
            try:
                data = None if body is None else json.dumps(body)
                headers = {} if body is None else {"Content-Type": "application/json"}
                self.conn.request(method, path, data, headers)
                resp = self.conn.getresponse()
                raw = resp.read()
                return resp.status, (json.loads(raw) if raw else None)
            except (OSError, http.client.HTTPException):
                self.close()
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


# ================================================================ (a) real processes


class LoopbackAddresses:
    """ULA addresses added to lo for the run; removed by remove(), always called."""

    def __init__(self) -> None:
        self.added: list[str] = []

    @staticmethod
    def present() -> set[str]:
        out = subprocess.run(["ip", "-6", "addr", "show", "dev", "lo"], capture_output=True,
                             text=True, check=True).stdout
        return {line.split()[1].split("/")[0] for line in out.splitlines()
                if line.strip().startswith("inet6")}

    def add(self, addresses: list[str]) -> None:
        have = self.present()
        for addr in addresses:
            if addr in have:
                continue  # not ours: leave it in place at the end
            subprocess.run(["ip", "-6", "addr", "add", f"{addr}/128", "dev", "lo", "nodad"],
                           check=True, capture_output=True)
            self.added.append(addr)

    def remove(self) -> list[str]:
        failed = []
        while self.added:
            addr = self.added.pop()
            r = subprocess.run(["ip", "-6", "addr", "del", f"{addr}/128", "dev", "lo"],
                               capture_output=True)
            if r.returncode != 0:
                failed.append(addr)
        return failed


class Proc:
    def __init__(self, name: str, cmd: list[str], env: dict[str, str], workdir: Path):
        self.name = name
        self.log_path = workdir / f"{name}.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, env=env, cwd=workdir, stdout=self._log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def terminate(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def wait_or_kill(self, timeout: float) -> None:
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()

    def tail(self, n: int = 3) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def base_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items()
            if not k.startswith(("REGISTRY_", "NODE_")) and k not in ("LOG_LEVEL", "LOG_FORMAT")}


def wait_for(what: str, check, timeout: float, procs: list[Proc] = ()) -> Any:  # type: ignore[assignment]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in procs:
            if not p.alive():
                raise RuntimeError(f"{p.name} exited with {p.proc.returncode} while waiting for "
                                   f"{what}:\n{p.tail(8)}")
        value = check()
        if value:
            return value
        time.sleep(0.2)
    raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")


def connected(graph: dict[str, set[str]]) -> bool:
    if not graph:
        return True
    start = next(iter(graph))
    seen, todo = {start}, [start]
    while todo:
        for peer in graph[todo.pop()]:
            if peer in graph and peer not in seen:
                seen.add(peer)
                todo.append(peer)
    return len(seen) == len(graph)


def diameter(graph: dict[str, set[str]]) -> int:
    best = 0
    for src in graph:
        dist = {src: 0}
        frontier = [src]
        while frontier:
            nxt = []
            for n in frontier:
                for p in graph[n]:
                    if p in graph and p not in dist:
                        dist[p] = dist[n] + 1
                        nxt.append(p)
            frontier = nxt
        best = max(best, max(dist.values()))
    return best


def run_real(args: argparse.Namespace, python: str) -> None:
    n = args.nodes
    print(f"(a) {n} real `trustnet node` processes + 1 registry on loopback"
          f"{', nodes linked over TLS (PEERS_TLS)' if args.tls else ''}", flush=True)
    if os.geteuid() != 0 or shutil.which("ip") is None:
        print("  skipped: adding addresses to lo needs root and iproute2's `ip`")
        return
    workdir = Path(tempfile.mkdtemp(prefix="trustnet-mesh-"))
    addrs = LoopbackAddresses()
    procs: list[Proc] = []
    apis: list[Api] = []

    def on_signal(signum: int, _frame: Any) -> None:
        raise SystemExit(f"stopped by {signal.Signals(signum).name}")

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGHUP)}
    t_start = time.monotonic()
    ok = False
    try:
        names = [f"bench-{i:02d}" for i in range(1, n + 1)]
        ipv6 = {name: f"{ADDR_PREFIX}{i:x}" for i, name in enumerate(names, 1)}
        addrs.add(list(ipv6.values()))
        print(f"  added {len(addrs.added)} addresses {ADDR_PREFIX}1..{ADDR_PREFIX}{n:x} to lo "
              f"(work dir {workdir})", flush=True)

        env = base_env()
        env.update(REGISTRY_PORT="0", REGISTRY_WS_PORT="0", REGISTRY_LISTEN=HOST, LOG_LEVEL="info",
                   REGISTRY_DB_PATH=str(workdir / "registry.db"))
        registry = Proc("registry", [python, "-m", "trustnet.cli", "registry"], env, workdir)
        procs.append(registry)
        listening = wait_for("the registry", lambda: log_line(registry.log_path,
                                                              "registry listening"),
                             60, [registry])
        ws, http_port = listening["ws"], port_of(listening["binds"][0])
        print(f"  registry at {ws} (HTTP {http_port})", flush=True)

        t0 = time.monotonic()
        nodes: list[Proc] = []
        for name in names:
            env = base_env()
            data = workdir / name
            data.mkdir()
            env.update(NODE_NAME=name, REGISTRY_WS=ws, REGISTRY_URL=f"http://[{HOST}]:{http_port}",
                       NODE_LISTEN_PORT="0", NODE_ADVERTISE=ipv6[name], NODE_DATA_DIR=str(data),
                       NODE_HTTP_PORT="0", LOG_LEVEL="info",
                       PEERS_TLS="true" if args.tls else "false")
            p = Proc(name, [python, "-m", "trustnet.cli", "node"], env, workdir)
            procs.append(p)
            nodes.append(p)
            time.sleep(args.stagger)

        def api_ports() -> list[int] | None:
            ports = []
            for p in nodes:
                line = log_line(p.log_path, "node API listening")
                if line is None:
                    return None
                ports.append(port_of(line["binds"][0]))
            return ports

        ports = wait_for("every node's local API", api_ports, 180, procs)
        apis = [Api(port) for port in ports]
        print(f"  {n} nodes registered and serving their APIs {time.monotonic() - t0:.1f} s "
              "after the first start", flush=True)

        pool = concurrent.futures.ThreadPoolExecutor(max_workers=args.poll_threads)

        def graph_now() -> dict[str, set[str]]:
            answers = list(pool.map(lambda a: a.request("GET", "/peers")[1], apis))
            return {name: {p["id"] for p in ans["peers"]} for name, ans in zip(names, answers)}

        # links: connected, then until the link count stops growing (or the cap)
        t1 = time.monotonic()
        graph = wait_for("a connected mesh", lambda: (lambda g: g if connected(g) and
                                                      all(g.values()) else None)(graph_now()),
                         args.link_timeout, procs)
        t_conn = time.monotonic() - t1
        last, stable_since = sum(map(len, graph.values())), time.monotonic()
        while time.monotonic() - stable_since < args.settle and time.monotonic() - t1 < 120:
            time.sleep(1.0)
            graph = graph_now()
            links = sum(map(len, graph.values()))
            if links != last:
                last, stable_since = links, time.monotonic()
        degrees = [len(v) for v in graph.values()]
        print(f"  mesh connected {t_conn:.1f} s after the APIs came up; then {last // 2} links, "
              f"degree min/median/max {min(degrees)}/{statistics.median(degrees):g}/"
              f"{max(degrees)}, diameter {diameter(graph)} hops "
              f"(connected: {connected(graph)})", flush=True)

        # broadcasts
        rng = random.Random(args.seed)
        seqs = [0] * n  # last inbox seq seen per node
        for i, api in enumerate(apis):
            seqs[i] = api.request("GET", "/messages?since=0&limit=1000")[1]["last_seq"]
        records = []  # per broadcast: t_send, {node: (received_at, lo, hi)}, missing
        offsets_lo = [-math.inf] * n
        offsets_hi = [math.inf] * n
        print(f"  {args.calibration_broadcasts} calibration broadcasts (polled every "
              f"~{args.calibration_pause * 1e3:g} ms), then {args.broadcasts} measured ones "
              f"(polled every ~{args.poll_pause * 1e3:g} ms), from random nodes; one poller "
              "thread per other node polls its GET /messages, random phase, from just before "
              "the POST until the message is there ...", flush=True)
        missing_total = 0
        poll_times: list[float] = []
        pollers = concurrent.futures.ThreadPoolExecutor(max_workers=n)
        jitter = random.Random(args.seed + 1)  # shared by the threads: only a phase
        # First calibration broadcasts, polled often (tight brackets: the clock
        # offsets), then the measured ones, polled lightly (less load on the cores
        # the nodes run on); both tighten the offsets.
        schedule = ([(True, args.calibration_pause)] * args.calibration_broadcasts
                    + [(False, args.poll_pause)] * args.broadcasts)
        for b, (calibrating, pause) in enumerate(schedule):
            origin = rng.randrange(n)
            others = [i for i in range(n) if i != origin]
            box: dict[str, Any] = {}
            sent = threading.Event()
            ready = threading.Barrier(len(others) + 1)
            deadline = time.perf_counter() + args.broadcast_timeout + 5

            def poller(i: int) -> tuple[int, tuple[float, float, float] | None, list[float]]:
                """Poll node i until the message is there: (its received_at, start of the
                last poll without it, end of the first poll with it), or None."""
                polls: list[tuple[float, float, dict]] = []  # (start, end, id -> item)
                took = []
                while time.perf_counter() < deadline:
                    t0 = time.perf_counter()
                    _, body = apis[i].request("GET", f"/messages?since={seqs[i]}&limit=1000")
                    t1 = time.perf_counter()
                    took.append(t1 - t0)
                    polls.append((t0, t1, {item["id"]: item for item in body["messages"]}))
                    if len(polls) == 1:
                        ready.wait()  # every node polled once: now the POST goes out
                    if sent.is_set():
                        msg_id = box["id"]
                        lo = box["t_send"]
                        for p0, p1, items in polls:
                            item = items.get(msg_id)
                            if item is None:
                                lo = max(lo, p0)
                                continue
                            seqs[i] = max(it["seq"] for it in items.values())
                            return i, (item["received_at"], lo, p1), took
                    # random phase: over many broadcasts, some polls fall just before
                    # and just after each arrival, which pins the node's clock offset
                    time.sleep(pause * jitter.uniform(0.5, 1.5))
                return i, None, took

            futures = [pollers.submit(poller, i) for i in others]
            ready.wait()
            box["t_send"] = time.perf_counter()
            status, ans = apis[origin].request("POST", "/broadcast",
                                               {"payload": {"bench": b}})
            if status != 202:
                raise RuntimeError(f"broadcast refused: {status} {ans}")
            box["id"] = ans["id"]
            sent.set()
            got: dict[int, tuple[float, float, float]] = {}
            for fut in futures:
                i, seen, took = fut.result()
                if not calibrating:
                    poll_times += took
                if seen is not None:
                    got[i] = seen
            missing = len(others) - len(got)
            for i, (r, lo, hi) in got.items():
                offsets_lo[i] = max(offsets_lo[i], r - hi)
                offsets_hi[i] = min(offsets_hi[i], r - lo)
            if not calibrating:
                missing_total += missing
                records.append((box["t_send"], got, missing))
            time.sleep(args.gap)
        pollers.shutdown()

        # calibrated arrivals
        widths, inconsistent = [], 0
        offset = []
        for i in range(n):
            lo, hi = offsets_lo[i], offsets_hi[i]
            if lo == -math.inf:
                offset.append(None)
                continue
            if lo > hi:  # cannot happen with exact clocks; take the midpoint anyway
                inconsistent += 1
            widths.append(abs(hi - lo))
            offset.append((lo + hi) / 2)
        tta_cal, tta_poll = [], []
        for t_send, got, missing in records:
            if missing or not got:
                continue
            tta_cal.append(max(r - offset[i] for i, (r, _, _) in got.items()) - t_send)
            tta_poll.append(max(hi for _, (_, _, hi) in got.items()) - t_send)
        ms = 1e3
        print()
        print(f"  Results, {n} real nodes on loopback ({len(tta_cal)} of {args.broadcasts} "
              f"broadcasts reached all {n - 1} others; {missing_total} node-deliveries missing "
              f"after {args.broadcast_timeout:g} s):")
        print(f"    time-to-all, calibrated arrivals: p50 {fmt(percentile(tta_cal, .5) and percentile(tta_cal, .5) * ms)} ms, "
              f"p99 {fmt(percentile(tta_cal, .99) and percentile(tta_cal, .99) * ms)} ms, "
              f"max {fmt(max(tta_cal) * ms if tta_cal else None)} ms")
        print(f"    time-to-all, poll upper bound:    p50 {fmt(percentile(tta_poll, .5) and percentile(tta_poll, .5) * ms)} ms, "
              f"p99 {fmt(percentile(tta_poll, .99) and percentile(tta_poll, .99) * ms)} ms "
              f"(one poll of one API took {fmt(statistics.median(poll_times) * ms if poll_times else None)} ms median)")
        print(f"    clock calibration: offset known to +/- {fmt(statistics.median(widths) / 2 * ms if widths else None, '.2f')} ms "
              f"median (+/- {fmt(max(widths) / 2 * ms if widths else None, '.2f')} ms worst) per node"
              + (f"; {inconsistent} nodes with inconsistent bounds" if inconsistent else ""))
        print(f"    load average {os.getloadavg()[0]:.1f} at the end (2 CPUs shared with the "
              f"{n + 1} processes, the pollers and any neighbours)")
        print("    time-to-all = the last node's arrival minus the start of the POST /broadcast "
              "(includes that HTTP request)")
        ok = True
        pool.shutdown(wait=False, cancel_futures=True)
    finally:
        for api in apis:
            api.close()
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait_or_kill(20)
        failed = addrs.remove()
        for s, h in old.items():
            signal.signal(s, h)
        print(f"  cleanup: {len(procs)} processes stopped, loopback addresses removed"
              + (f" EXCEPT {failed}" if failed else "") + f" ({time.monotonic() - t_start:.0f} s "
              "for part (a))", flush=True)
        if args.keep or not ok:
            print(f"  kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


# ================================================================ (b) simulation


def sim_one(n: int, seed: int, broadcasts: int, delay: tuple[float, float],
            max_connections: int, settle_limit: float, timers: dict[str, float]) -> dict:
    """One simulated mesh of n nodes under MockClock; figures as a dict."""
    import logging

    import orjson
    import trio
    import trio.testing

    sys.path.insert(0, str(REPO / "tests" / "sim"))
    import test_mesh_sim as tms  # the fake registry and cluster of the mesh tests

    import actors.simnet as simnet
    from actors.simnet import FaultModel, seeded_trio_scheduler
    from actors import ActorSystem
    from trustnet.addressing import ula_for
    from trustnet.node.context import NodeContext, NodeParams
    from trustnet.node.messages import Broadcast
    from trustnet.node.tree import run_node
    from trustnet.registry.node_protocol import Candidates

    logging.disable(logging.WARNING)  # node logs are not the point here
    simnet._summary = lambda env: ""  # the trace is off (below): skip its per-frame repr()

    class ScalableRegistry(tms.FakeRegistry):
        """The test's registry with O(limit) candidates (a random sample of live nodes)."""

        def __init__(self, seed: int):
            super().__init__(seed)
            self.order: list[str] = []  # registered names, in order of first registration

        async def receive(self, msg: Any) -> Any:
            if isinstance(msg, Candidates):
                out: list[dict] = []
                seen: set[str] = set()
                for _ in range(4 * msg.limit):
                    if len(out) >= msg.limit or not self.order:
                        break
                    cand = self.order[self.rng.randrange(len(self.order))]
                    if cand == msg.node_id or cand in seen or not self._live(cand):
                        continue
                    seen.add(cand)
                    out.append(self.nodes[cand])
                return {"peers": out}
            known = len(self.nodes)
            answer = await super().receive(msg)
            if len(self.nodes) > known:  # a first registration
                self.order.append(answer["node"]["id"])
            if isinstance(answer, dict) and "heartbeat_interval" in answer:
                answer["heartbeat_interval"] = timers["heartbeat"]
                answer["ttl"] = tms.TTL
            return answer

    tms.TTL = 3 * timers["heartbeat"]  # the fake registry's lease

    class BenchCluster(tms.Cluster):
        """The mesh tests' cluster (node ids n00, n01, ...) with the registry above,
        link delays, no trace (it would hold every frame of the run), and the
        timers of --sim-timers instead of the tests' fast ones."""

        def __init__(self, seed: int, n: int, max_connections: int):
            super().__init__(seed, n, max_connections)
            self.registry = ScalableRegistry(seed)
            self.net.faults = FaultModel(delay=delay)
            self.net._record = lambda *a, **k: None
            self.net._note = lambda *a, **k: None

        def _main(self, name: str):
            async def main(transport: Any) -> None:
                system = ActorSystem(transport=transport)
                params = NodeParams(node_id=name, ipv6=str(ula_for(name)), port=9000,
                                    registry_address=tms.REGISTRY,
                                    heartbeat_interval=timers["heartbeat"],
                                    startup_timeout=60.0, unreachable_timeout=300.0,
                                    request_timeout=2.0, max_connections=self.max_connections,
                                    peer_timeout=timers["peer_timeout"],
                                    rotate_interval=timers["rotate"], seed=self.seed)
                ctx = self.contexts[name] = NodeContext(params, self.identities[name], system)
                async with trio.open_nursery() as inner:
                    await inner.start(system.serve)
                    self.exits[name] = await run_node(ctx)
                    inner.cancel_scope.cancel()
            return main

    out: dict[str, Any] = {"n": n}

    async def main() -> None:
        wall0 = time.perf_counter()
        cluster = BenchCluster(seed, n, max_connections)
        rng = random.Random(seed)
        async with trio.open_nursery() as nursery:
            await cluster.start(nursery)
            out["wall_start"] = time.perf_counter() - wall0
            # settle: a connected mesh in which every node has a link
            v0 = trio.current_time()
            w0 = time.perf_counter()
            conn_at = None
            while trio.current_time() - v0 < settle_limit:
                await trio.sleep(2.0)
                try:
                    graph = cluster.graph(cluster.names)
                except KeyError:
                    continue
                if all(graph.values()) and connected(graph):
                    conn_at = trio.current_time() - v0
                    break
            out["settle_virtual"] = conn_at
            out["wall_settle"] = time.perf_counter() - w0
            if conn_at is None:
                out["error"] = f"no connected mesh within {settle_limit:g} simulated s"
                nursery.cancel_scope.cancel()
                return
            graph = cluster.graph(cluster.names)
            degrees = [len(v) for v in graph.values()]
            out["links"] = sum(degrees) // 2
            out["degree"] = (min(degrees), statistics.median(degrees), max(degrees))
            w1 = time.perf_counter()
            tta, hops, missing = [], [], 0
            for b in range(broadcasts):
                origin = cluster.names[rng.randrange(n)]
                t0 = trio.current_time()
                ans = await cluster.contexts[origin].system.ref("mesh").ask(
                    Broadcast(orjson.dumps({"bench": b}).decode()))
                # wait (in simulated 10 ms steps, at most 2 s) until every node has it
                pending = [name for name in cluster.names if name != origin]
                arrivals, hop = [], 0
                while pending and trio.current_time() - t0 < 2.0:
                    await trio.sleep(0.01)
                    still = []
                    for name in pending:
                        items = cluster.mesh(name).inbox._items
                        item = items[-1] if items and items[-1]["id"] == ans["id"] else None
                        if item is None:  # not there, or something arrived after it
                            item = next((it for it in reversed(items) if it["id"] == ans["id"]),
                                        None)
                        if item is None:
                            still.append(name)
                            continue
                        arrivals.append(item["received_at"] - t0)
                        hop = max(hop, item["hops"] or 0)
                    pending = still
                missing += len(pending)
                if not pending:
                    tta.append(max(arrivals))
                    hops.append(hop)
                await trio.sleep(0.1)
            out["wall_broadcasts"] = time.perf_counter() - w1
            out["tta"] = tta
            out["hops"] = hops
            out["missing"] = missing
            nursery.cancel_scope.cancel()
        out["wall_total"] = time.perf_counter() - wall0

    with seeded_trio_scheduler(seed):
        trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    return out


def run_sim(args: argparse.Namespace, python: str) -> None:
    sizes = [int(x) for x in args.sim_sizes.split(",")]
    print(f"(b) simulated network (actors.simnet under MockClock), sizes {sizes}, "
          f"{args.sim_broadcasts} broadcasts each, link delay uniform "
          f"{args.sim_delay[0] * 1e3:g}-{args.sim_delay[1] * 1e3:g} ms per frame, "
          f"max_connections {args.max_connections}, heartbeat/peer_timeout/rotate "
          f"{args.sim_timers_text.replace(',', '/')} s, budget {args.sim_budget:g} s wall per size",
          flush=True)
    done: list[dict] = []
    skipped: list[tuple[int, str]] = []
    for n in sizes:
        predicted = None
        if len(done) >= 2:
            a, b = done[-2], done[-1]
            alpha = math.log(b["wall"] / a["wall"]) / math.log(b["n"] / a["n"])
            predicted = b["wall"] * (n / b["n"]) ** max(alpha, 1.0)
        elif done:
            predicted = done[-1]["wall"] * (n / done[-1]["n"]) ** 1.2
        if predicted is not None and predicted > args.sim_budget:
            skipped.append((n, f"predicted {predicted:.0f} s of wall time > budget "
                               f"{args.sim_budget:g} s"))
            continue
        cmd = [python, str(Path(__file__).resolve()), "--_sim-one", str(n),
               "--seed", str(args.seed), "--sim-broadcasts", str(args.sim_broadcasts),
               "--sim-delay", f"{args.sim_delay[0]},{args.sim_delay[1]}",
               "--max-connections", str(args.max_connections),
               "--sim-timers", args.sim_timers_text]
        t = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True,
                                  timeout=max(args.sim_budget * 2, 60))
        except subprocess.TimeoutExpired:
            skipped.append((n, f"killed after {max(args.sim_budget * 2, 60):.0f} s"))
            break
        wall = time.perf_counter() - t
        if proc.returncode != 0:
            skipped.append((n, f"failed: {proc.stderr.strip().splitlines()[-1:]}"))
            break
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        res["wall"] = wall
        done.append(res)
        if "error" in res:
            print(f"  {n:>6} nodes: {res['error']} (wall {wall:.0f} s)", flush=True)
            continue
        tta = [x * 1e3 for x in res["tta"]]
        print(f"  {n:>6} nodes: connected mesh after {res['settle_virtual']:.0f} simulated s, "
              f"{res['links']:,} links, degree {res['degree'][0]}/{res['degree'][1]:g}/"
              f"{res['degree'][2]}; broadcast time-to-all p50 {fmt(percentile(tta, .5), '.1f')} ms, "
              f"p99 {fmt(percentile(tta, .99), '.1f')} ms simulated, max hops "
              f"{max(res['hops']) if res['hops'] else '-'} ({len(tta)}/{args.sim_broadcasts} "
              f"reached all); wall {wall:.1f} s (start {res['wall_start']:.1f}, mesh "
              f"{res['wall_settle']:.1f}, broadcasts {res['wall_broadcasts']:.1f})", flush=True)
    ok = [d for d in done if "error" not in d]
    if len(ok) >= 2:
        a, b = ok[0], ok[-1]
        alpha = math.log(b["wall"] / a["wall"]) / math.log(b["n"] / a["n"])
        print(f"  wall-time scaling {a['n']:,} -> {b['n']:,} nodes: ~n^{alpha:.2f}")
    for n, why in skipped:
        print(f"  {n:>6} nodes: NOT RUN: {why}")
    if ok:
        print(f"  largest size simulated: {ok[-1]['n']:,} nodes")


# ================================================================ main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 10 real nodes and 5 broadcasts; simulation of 50 and 200")
    p.add_argument("--skip-real", action="store_true")
    p.add_argument("--skip-sim", action="store_true")
    p.add_argument("--tls", action="store_true",
                   help="real nodes link over TLS (PEERS_TLS: self-signed, pinned keys)")
    p.add_argument("--nodes", type=int, help="real node processes (default 50; 10 quick)")
    p.add_argument("--broadcasts", type=int, help="real broadcasts (default 30; 5 quick)")
    p.add_argument("--poll-threads", type=int, default=16, help="threads for /peers polls")
    p.add_argument("--calibration-broadcasts", type=int, default=None,
                   help="broadcasts polled often, to pin each node's clock offset (default 20; "
                        "5 quick)")
    p.add_argument("--calibration-pause", type=float, default=0.02,
                   help="mean pause between polls during calibration (default 20 ms)")
    p.add_argument("--poll-pause", type=float, default=0.15,
                   help="mean pause between two polls of one node's API, jittered x0.5-1.5 "
                        "(default 0.15 s: polling faster loads the 2 cores the nodes run on "
                        "and slows the broadcast being measured)")
    p.add_argument("--broadcast-timeout", type=float, default=10.0)
    p.add_argument("--gap", type=float, default=0.3, help="seconds between broadcasts")
    p.add_argument("--stagger", type=float, default=0.1, help="seconds between node starts")
    p.add_argument("--settle", type=float, default=8.0,
                   help="after the mesh is connected, wait until the link count has not "
                        "changed for this long (max 120 s)")
    p.add_argument("--link-timeout", type=float, default=180.0)
    p.add_argument("--sim-sizes", help="simulated sizes (default 100,1000,10000; "
                                       "quick 50,200)")
    p.add_argument("--sim-broadcasts", type=int, help="broadcasts per size (default 20; 5 quick)")
    p.add_argument("--sim-delay", default="0.0005,0.005",
                   help="per-frame link delay range in seconds (default 0.0005,0.005)")
    p.add_argument("--sim-budget", type=float, default=900.0,
                   help="skip a size predicted to take longer than this (wall seconds)")
    p.add_argument("--max-connections", type=int, default=6,
                   help="peers.max_connections in the simulation (as the mesh tests)")
    p.add_argument("--sim-timers", default="30,60,300",
                   help="heartbeat_interval,peer_timeout,rotate_interval of the simulated nodes "
                        "(default 30,60,300: the node defaults; the mesh tests use 5,6,20)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--keep", action="store_true")
    p.add_argument("--_sim-one", type=int, dest="sim_one", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.nodes = args.nodes or (10 if args.quick else 50)
    args.broadcasts = args.broadcasts or (5 if args.quick else 30)
    if args.calibration_broadcasts is None:
        args.calibration_broadcasts = 5 if args.quick else 20
    args.sim_sizes = args.sim_sizes or ("50,200" if args.quick else "100,1000,10000")
    args.sim_broadcasts = args.sim_broadcasts or (5 if args.quick else 20)
    lo, hi = (float(x) for x in args.sim_delay.split(","))
    args.sim_delay = (lo, hi)
    hb, pt, rot = (float(x) for x in args.sim_timers.split(","))
    args.sim_timers_text = args.sim_timers
    args.sim_timers = {"heartbeat": hb, "peer_timeout": pt, "rotate": rot}
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.sim_one:
        res = sim_one(args.sim_one, args.seed, args.sim_broadcasts, args.sim_delay,
                      args.max_connections, settle_limit=600.0, timers=args.sim_timers)
        print(json.dumps(res))
        return 0
    python = server_python("mesh.py")
    t = time.monotonic()
    print(f"TrustNet mesh broadcast benchmark{' (--quick)' if args.quick else ''}: "
          f"{os.cpu_count()} CPUs, Python {platform.python_version()}, load average "
          f"{os.getloadavg()[0]:.1f}", flush=True)
    if not args.skip_real:
        run_real(args, python)
    if not args.skip_sim:
        print()
        run_sim(args, python)
    print()
    print(f"total time {time.monotonic() - t:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
