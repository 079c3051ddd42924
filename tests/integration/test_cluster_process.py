"""A replicated registry as 3 real processes on [::1] (issue 4, section 3).

A few clients write continuously (POST /nodes, unique ids) and read back
(linearizable GET /nodes/{id}) through random replicas while the leader is
killed with SIGKILL and restarted (CLUSTER_KILL_ROUNDS, default 5; 20 for a
soak), paused with SIGSTOP past the election timeout and resumed, and a
follower is restarted gracefully. Afterwards every acknowledged write must be
on every replica (stale reads, all pages) and the recorded history must be
linearizable (RegistryModel). Timeouts, 5xx and lost connections are
recorded as unknown outcomes.
"""

from __future__ import annotations

import itertools
import os
import random
import signal
import socket
import time

import httpx
import pytest
import trio

from registry_process import RegistryProcess
from trustnet.consensus.linearizability import CONFLICT, NOT_FOUND, OK, UNKNOWN, Operation, RegistryModel, check

KILL_ROUNDS = int(os.environ.get("CLUSTER_KILL_ROUNDS", "5"))
IDS = ("r1", "r2", "r3")


def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
            s.bind(("::1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class Cluster:
    def __init__(self, tmp_path, nursery):
        self.tmp_path = tmp_path
        self.nursery = nursery
        ports = free_ports(6)
        self.http = {rid: ports[2 * i] for i, rid in enumerate(IDS)}
        self.ws = {rid: ports[2 * i + 1] for i, rid in enumerate(IDS)}
        self.procs: dict[str, RegistryProcess] = {}
        self.all: list[RegistryProcess] = []
        self.stopped: set[str] = set()  # SIGSTOPped

    def config(self, rid: str) -> dict:
        return {
            "listen": {"host": "::1", "port": self.http[rid], "ws_port": self.ws[rid]},
            "database": {"path": str(self.tmp_path / rid / "registry.db")},
            "replication": {"enabled": True, "id": rid, "tick": "10ms",
                            "peers": [{"id": r, "address": f"ws://[::1]:{self.ws[r]}"} for r in IDS]},
            "logging": {"level": "info", "format": "json"},
        }

    async def start(self, rid: str) -> None:
        (self.tmp_path / rid).mkdir(exist_ok=True)
        proc = RegistryProcess(self.tmp_path / rid, config=self.config(rid), name=rid)
        self.all.append(proc)
        self.procs[rid] = proc
        await proc.start(self.nursery)

    def url(self, rid: str) -> str:
        return f"http://[::1]:{self.http[rid]}"

    def live(self) -> list[str]:
        return [r for r, p in self.procs.items() if p.returncode is None and r not in self.stopped]

    async def leader(self, client: httpx.AsyncClient, timeout: float = 10.0) -> str:
        with trio.fail_after(timeout):
            while True:
                for rid in self.live():
                    try:
                        st = (await client.get(self.url(rid) + "/cluster", timeout=1.0)).json()
                    except (httpx.HTTPError, ValueError):
                        continue
                    if st.get("leader") in self.live() and st.get("role") in ("leader", "follower"):
                        return st["leader"]
                await trio.sleep(0.05)

    async def aclose(self) -> None:
        for p in self.all:
            if p.process is not None and p.returncode is None:
                try:
                    p.process.send_signal(signal.SIGCONT)
                except OSError:
                    pass
            await p.aclose()


async def test_cluster_survives_kills_pauses_and_restarts(tmp_path):
    history: list[Operation] = []
    acked: dict[str, str] = {}  # node id -> ipv6 of acknowledged registrations
    counter = itertools.count(1)
    t0 = time.monotonic()
    rng = random.Random(int(os.environ.get("CLUSTER_SEED", "1")))
    async with trio.open_nursery() as nursery:
        cluster = Cluster(tmp_path, nursery)
        try:
            async with trio.open_nursery() as starting:
                for rid in IDS:
                    starting.start_soon(cluster.start, rid)
            limits = httpx.Limits(max_keepalive_connections=0)
            async with httpx.AsyncClient(limits=limits) as client:
                await cluster.leader(client, timeout=15)
                done = trio.Event()

                async def writer(client_id: int) -> None:
                    while not done.is_set():
                        live = cluster.live()
                        if not live:
                            await trio.sleep(0.05)
                            continue
                        rid = rng.choice(live)
                        if acked and rng.random() < 0.3:
                            node = rng.choice(sorted(acked))
                            call = time.monotonic() - t0
                            try:
                                r = await client.get(f"{cluster.url(rid)}/nodes/{node}", timeout=3.0)
                            except httpx.HTTPError:
                                continue  # a read that failed observes nothing
                            ret = time.monotonic() - t0
                            if r.status_code == 200:
                                history.append(Operation(client_id, node, ("get",), call, ret, r.json()))
                            elif r.status_code == 404:
                                history.append(Operation(client_id, node, ("get",), call, ret, NOT_FOUND))
                            continue
                        k = next(counter)
                        node, ipv6 = f"n{k}", f"fd00::{k:x}"
                        call = time.monotonic() - t0
                        try:
                            r = await client.post(f"{cluster.url(rid)}/nodes", json={"id": node, "ipv6": ipv6},
                                                  headers={"Idempotency-Key": f"w{k}"}, timeout=3.0)
                            status = r.status_code
                        except httpx.HTTPError:
                            status = None
                        ret = time.monotonic() - t0
                        if status in (200, 201):
                            acked[node] = ipv6
                            history.append(Operation(client_id, node, ("register", ipv6), call, ret, OK))
                        elif status == 409:
                            history.append(Operation(client_id, node, ("register", ipv6), call, ret, CONFLICT))
                        else:
                            history.append(Operation(client_id, node, ("register", ipv6), call, None, UNKNOWN))
                            await trio.sleep(0.02)

                async with trio.open_nursery() as clients:
                    for c in range(4):
                        clients.start_soon(writer, c)
                    await trio.sleep(0.5)
                    for _ in range(KILL_ROUNDS):
                        leader = await cluster.leader(client)
                        cluster.procs[leader].process.kill()
                        await cluster.procs[leader].wait()
                        await trio.sleep(0.6)
                        await cluster.start(leader)
                        await trio.sleep(0.4)
                    # pause the leader past the election timeout, then resume it
                    leader = await cluster.leader(client)
                    cluster.stopped.add(leader)
                    cluster.procs[leader].send_signal(signal.SIGSTOP)
                    await trio.sleep(1.0)
                    cluster.procs[leader].send_signal(signal.SIGCONT)
                    cluster.stopped.discard(leader)
                    await trio.sleep(0.5)
                    # graceful restart of a follower
                    leader = await cluster.leader(client)
                    follower = next(r for r in IDS if r != leader)
                    assert await cluster.procs[follower].stop() == 0
                    await cluster.start(follower)
                    await trio.sleep(0.5)
                    # graceful stop of the leader (transfer), then back
                    leader = await cluster.leader(client)
                    assert await cluster.procs[leader].stop() == 0
                    await cluster.start(leader)
                    await trio.sleep(0.5)
                    done.set()

                assert len(acked) > 20, f"too few acknowledged writes: {len(acked)}"
                # every acknowledged write on every replica
                with trio.fail_after(20):
                    while True:
                        missing = {}
                        for rid in IDS:
                            have: dict[str, str] = {}
                            after = None
                            while True:
                                params = {"consistency": "stale", "limit": "1000"}
                                if after:
                                    params["after"] = after
                                page = (await client.get(cluster.url(rid) + "/nodes", params=params,
                                                         timeout=5.0)).json()
                                have.update({n["id"]: n["ipv6"] for n in page["nodes"]})
                                after = page.get("next")
                                if not after:
                                    break
                            lost = [n for n in acked if n not in have]
                            if lost:
                                missing[rid] = lost
                        if not missing:
                            break
                        await trio.sleep(0.2)
        finally:
            with trio.CancelScope(shield=True):
                await cluster.aclose()
            nursery.cancel_scope.cancel()

    unknown = sum(op.unknown for op in history)
    print(f"{len(history)} operations, {len(acked)} acknowledged writes, {unknown} unknown, "
          f"{KILL_ROUNDS} kill rounds")
    result = check(RegistryModel(), history, timeout=30.0)
    assert result.ok, str(result)
