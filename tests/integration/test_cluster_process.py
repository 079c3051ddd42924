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

import contextlib
import itertools
import os
import random
import secrets
import signal
import socket
import ssl
import time

import httpx
import pytest
import trio

from node_process import NodeProcess
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
    def __init__(self, tmp_path, nursery, spare: tuple[str, ...] = (),
                 tls: dict[str, str] | None = None):
        self.tmp_path = tmp_path
        self.nursery = nursery
        self.tls = tls  # trustnet.tls.write_certificates' paths: https:// and wss://
        ids = IDS + spare  # spare: replicas that may join later
        ports = free_ports(2 * len(ids))
        self.http = {rid: ports[2 * i] for i, rid in enumerate(ids)}
        self.ws = {rid: ports[2 * i + 1] for i, rid in enumerate(ids)}
        self.procs: dict[str, RegistryProcess] = {}
        self.all: list[RegistryProcess] = []
        self.stopped: set[str] = set()  # SIGSTOPped
        self.secret = secrets.token_hex(24)  # REGISTRY_CLUSTER_SECRET, shared by the replicas

    def address(self, rid: str) -> str:
        return f"{'wss' if self.tls else 'ws'}://[::1]:{self.ws[rid]}"

    def config(self, rid: str, join: bool = False) -> dict:
        return {
            "listen": {"host": "::1", "port": self.http[rid], "ws_port": self.ws[rid]},
            "database": {"path": str(self.tmp_path / rid / "registry.db")},
            "replication": {"enabled": True, "id": rid, "tick": "10ms", "join": join,
                            "peers": [{"id": r, "address": self.address(r)} for r in IDS]},
            "logging": {"level": "info", "format": "json"},
            **({"tls": {"cert_file": self.tls["cert.pem"], "key_file": self.tls["key.pem"],
                        "ca_file": self.tls["ca.pem"]}} if self.tls else {}),
        }

    async def start(self, rid: str, join: bool = False) -> None:
        (self.tmp_path / rid).mkdir(exist_ok=True)
        proc = RegistryProcess(self.tmp_path / rid, config=self.config(rid, join), name=rid,
                               env={"REGISTRY_CLUSTER_SECRET": self.secret})
        self.all.append(proc)
        self.procs[rid] = proc
        await proc.start(self.nursery)

    async def start_all(self) -> None:
        """The founding replicas, started together."""
        async with trio.open_nursery() as starting:
            for rid in IDS:
                starting.start_soon(self.start, rid)

    def url(self, rid: str) -> str:
        return f"{'https' if self.tls else 'http'}://[::1]:{self.http[rid]}"

    def client(self, **kw) -> httpx.AsyncClient:
        """An HTTP client for the replicas' API (trusting the group's CA with TLS)."""
        if self.tls:
            kw["verify"] = ssl.create_default_context(cafile=self.tls["ca.pem"])
        return httpx.AsyncClient(**kw)

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
            await cluster.start_all()
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


async def _status(client: httpx.AsyncClient, cluster: Cluster, rid: str) -> dict:
    try:
        return (await client.get(cluster.url(rid) + "/cluster", timeout=2.0)).json()
    except (httpx.HTTPError, ValueError):
        return {}


async def _until(predicate, what: str, timeout: float = 20.0):
    with trio.fail_after(timeout):
        while not (found := await predicate()):
            await trio.sleep(0.1)
    return found


def _raft_position(r: httpx.Response) -> tuple[int, int]:
    return int(r.headers["X-Raft-Index"]), int(r.headers["X-Raft-Term"])


async def test_members_join_and_leave_and_answers_carry_raft_positions(tmp_path):
    """The admin routes over HTTP with real processes: a replica started with
    replication.join is added, catches up and serves; a founder is removed
    and the group goes on. Writes and reads say which index and term they
    reflect."""
    async with trio.open_nursery() as nursery:
        cluster = Cluster(tmp_path, nursery, spare=("r4",))
        try:
            await cluster.start_all()
            async with httpx.AsyncClient() as client:
                leader = await cluster.leader(client, timeout=15)
                follower = next(r for r in IDS if r != leader)
                # A write through a follower: forwarded, committed, positioned.
                r = await client.post(cluster.url(follower) + "/nodes",
                                      json={"id": "a", "ipv6": "fd00::a"}, timeout=5.0)
                assert r.status_code == 201, r.text
                written, term = _raft_position(r)
                assert written > 1 and term >= 1 and "raft" not in r.json()
                for rid in IDS:  # linearizable reads anywhere reflect it
                    r = await client.get(cluster.url(rid) + "/nodes/a", timeout=5.0)
                    assert r.status_code == 200 and _raft_position(r)[0] >= written
                r = await client.get(cluster.url(follower) + "/nodes/a",
                                     params={"consistency": "stale"}, timeout=5.0)
                assert r.status_code in (200, 404) and "X-Raft-Index" in r.headers
                # An HTTP heartbeat renews the lease on the leader, also when
                # sent to a follower (which forwards it instead of answering).
                deadlines = []
                for rid in (follower, leader, follower):
                    r = await client.post(cluster.url(rid) + "/nodes/a/heartbeat", timeout=5.0)
                    assert r.status_code == 200, r.text
                    deadlines.append(r.json()["lease_deadline"])
                    r = await client.get(cluster.url(leader) + "/nodes/a", timeout=5.0)
                    assert r.json()["lease_deadline"] == deadlines[-1]
                assert deadlines == sorted(deadlines) and deadlines[0] < deadlines[-1]

                # r4 starts as a joiner: no leader, no members of its own...
                await cluster.start("r4", join=True)
                st = await _status(client, cluster, "r4")
                assert "r4" not in st.get("voters", []), st
                # ...until it is added (through a follower: forwarded to the leader).
                r = await client.post(cluster.url(follower) + "/cluster/members",
                                      json={"id": "r4", "address": cluster.address("r4")},
                                      timeout=10.0)
                assert r.status_code == 201, r.text

                async def r4_serves():
                    st = await _status(client, cluster, "r4")
                    if "r4" not in st.get("voters", []) or st.get("applied", 0) < written:
                        return False
                    r = await client.get(cluster.url("r4") + "/nodes/a", timeout=5.0)
                    return r.status_code == 200 and r.json()["ipv6"] == "fd00::a"
                await _until(r4_serves, "r4 caught up and serving")
                assert sorted((await _status(client, cluster, leader))["voters"]) == [
                    "r1", "r2", "r3", "r4"]
                # An id already in the group, or a malformed request, is refused.
                r = await client.post(cluster.url(leader) + "/cluster/members",
                                      json={"id": "r4", "address": cluster.address("r4")})
                assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_member"
                r = await client.post(cluster.url(leader) + "/cluster/members", json={"id": "r5"})
                assert r.status_code == 400

                # Remove a founder (the leader itself, the hardest case).
                r = await client.delete(cluster.url(leader) + f"/cluster/members/{leader}",
                                        timeout=10.0)
                assert r.status_code == 200, r.text
                rest = [rid for rid in IDS + ("r4",) if rid != leader]

                async def three_voters_and_a_new_leader():
                    st = await _status(client, cluster, rest[0])
                    return (sorted(st.get("voters", [])) == sorted(rest)
                            and st.get("leader") in rest)
                await _until(three_voters_and_a_new_leader, "the group without the old leader")
                async def write_b():
                    try:
                        r = await client.post(cluster.url("r4") + "/nodes",
                                              json={"id": "b", "ipv6": "fd00::b"},
                                              headers={"Idempotency-Key": "b"}, timeout=5.0)
                    except httpx.HTTPError:
                        return False
                    return r.status_code in (200, 201) and _raft_position(r)[0] > written
                await _until(write_b, "a write after the removal")
        finally:
            with trio.CancelScope(shield=True):
                await cluster.aclose()
            nursery.cancel_scope.cancel()


# ------------------------------------------------------------------ a node against the group


@contextlib.asynccontextmanager
async def cluster_with_a_node(tmp_path, contacts, tls: dict[str, str] | None = None):
    """The 3 founders and a real node whose registry.ws lists the replicas
    `contacts(leader)` picks (followers): (cluster, client, leader, node, node API)."""
    async with trio.open_nursery() as nursery:
        cluster = Cluster(tmp_path, nursery, tls=tls)
        node = None
        try:
            await cluster.start_all()
            async with cluster.client() as client:
                leader = await cluster.leader(client, timeout=15)
                rids = contacts(leader)
                node = NodeProcess(tmp_path, "n1", "::1",
                                   registry_ws=",".join(cluster.address(r) for r in rids),
                                   registry_url=cluster.url(rids[0]),
                                   config={"registry": {"ca_file": tls["ca.pem"]}} if tls else None)
                api = await node.start(nursery)
                yield cluster, client, leader, node, api
        finally:
            with trio.CancelScope(shield=True):
                if node is not None:
                    await node.aclose()
                await cluster.aclose()
            nursery.cancel_scope.cancel()


async def _node_health(client: httpx.AsyncClient, api: str) -> dict:
    try:
        return (await client.get(api + "/health", timeout=2.0)).json()
    except (httpx.HTTPError, ValueError):
        return {}


async def _lease_on(client: httpx.AsyncClient, cluster: Cluster, rid: str) -> float | None:
    """n1's lease deadline as replica `rid` shows it (live on the leader)."""
    try:
        r = await client.get(cluster.url(rid) + "/nodes/n1", timeout=2.0)
    except httpx.HTTPError:
        return None
    return r.json().get("lease_deadline") if r.status_code == 200 else None


async def _lease_advances(client: httpx.AsyncClient, cluster: Cluster, rid: str) -> None:
    """Three heartbeat intervals renew n1's lease on `rid` (the leader)."""
    before = await _until(lambda: _lease_on(client, cluster, rid), f"n1's lease on {rid}")
    await trio.sleep(1.5)
    assert (await _lease_on(client, cluster, rid)) > before


def _followers(leader: str) -> list[str]:
    return [r for r in IDS if r != leader]


async def test_a_node_heartbeats_through_a_follower_and_across_a_failover(tmp_path):
    """A real node whose registry address is a follower: its heartbeat
    session is opened on the leader (forwarded) and its MAC'd heartbeats
    renew the lease there. The leader is killed: the new leader knows no
    session and says "no_session", the node opens a new one through the
    same follower, and its lease goes on being renewed on the new leader."""
    async with cluster_with_a_node(tmp_path, lambda leader: _followers(leader)[:1]) as (
            cluster, client, leader, node, api):
        async def beating_in_one_session():
            h = await _node_health(client, api)
            return h.get("heartbeat_session") and h.get("sessions_opened") == 1
        await _until(beating_in_one_session, "the node heartbeating in a session")
        await _lease_advances(client, cluster, leader)
        assert (await _node_health(client, api))["sessions_opened"] == 1

        mark = len(node.lines)
        cluster.procs[leader].process.kill()
        await cluster.procs[leader].wait()
        new_leader = await cluster.leader(client, timeout=15)
        assert new_leader != leader
        refused = await node.wait_for_log(
            lambda d: d.get("message") == "heartbeat session refused, opening a new one",
            start=mark, timeout=20)
        assert refused["code"] == "no_session"

        async def new_session_renewing():
            h = await _node_health(client, api)
            return (h.get("sessions_opened") == 2 and h.get("heartbeat_misses") == 0
                    and h.get("registered"))
        await _until(new_session_renewing, "the node in a new session")
        await _lease_advances(client, cluster, new_leader)
        assert not node.logs("registry does not know this node (lease expired), "
                             "registering again")


async def test_a_node_moves_to_the_next_replica_when_its_replica_dies(tmp_path):
    """registry.ws lists two followers. The first is killed: the node's asks
    fail, it moves to the second and goes on heartbeating in the same session
    (sessions live on the leader, not on the replica a node talks to)."""
    async with cluster_with_a_node(tmp_path, _followers) as (cluster, client, leader, node, api):
        first, second = _followers(leader)

        async def beating() -> bool:
            h = await _node_health(client, api)
            return bool(h.get("heartbeat_session")) and h.get("heartbeat_misses") == 0
        await _until(beating, "the node heartbeating through its first replica")
        mark = len(node.lines)
        cluster.procs[first].process.kill()
        await cluster.procs[first].wait()
        moved = await node.wait_for_log(
            lambda d: d.get("message") == "registry replica not answering, trying the next",
            start=mark, timeout=20)
        assert moved["registry"] == cluster.address(first)
        assert moved["next"] == cluster.address(second)

        async def recovered() -> bool:
            return await beating() and len(node.logs("heartbeat recovered", start=mark)) > 0
        await _until(recovered, "heartbeats through the second replica")
        await _lease_advances(client, cluster, leader)
        h = await _node_health(client, api)
        assert h["sessions_opened"] == 1 and h["registered"], h
        assert not node.logs("heartbeat session refused, opening a new one")


async def test_only_replicas_speak_raft_and_forward_writes(tmp_path):
    """Every node reaches the replicas' websocket port. A process there
    without the cluster secret could once propose any registry command (a
    delete, bypassing the API key), send Raft messages, and renew any
    node's lease unsigned. Each of those now closes its connection with a
    ProtocolError, and the group goes on. (The kernel will not even send
    them without the secret, so the intruder writes raw frames.)"""
    from trio_websocket import ConnectionClosed, open_websocket_url

    from actors.codec import Envelope, encode
    from actors.ws import hello_frame
    from trustnet.consensus.actor import Propose, RaftEnvelope
    from trustnet.consensus.messages import Heartbeat as RaftHeartbeat
    from trustnet.registry.commands import DeleteNode
    from trustnet.registry.messages import LeaderHeartbeat

    async with trio.open_nursery() as nursery:
        cluster = Cluster(tmp_path, nursery)
        try:
            await cluster.start_all()
            async with httpx.AsyncClient() as client:
                leader = await cluster.leader(client, timeout=15)
                r = await client.post(cluster.url(leader) + "/nodes",
                                      json={"id": "victim", "ipv6": "fd00::1"}, timeout=5.0)
                assert r.status_code == 201, r.text
                marks = {rid: len(cluster.procs[rid].lines) for rid in IDS}
                me = "ws://[::1]:1"
                raft = RaftEnvelope(me, RaftHeartbeat(term=10**6, from_id="r9",
                                                      to_id=leader, commit=0))
                for rid in IDS:
                    for to, msg in (("consensus", Propose(DeleteNode("victim"), "evil-1")),
                                    ("consensus", raft), ("registry", LeaderHeartbeat("victim"))):
                        async with open_websocket_url(cluster.address(rid) + "/") as ws:
                            await ws.send_message(hello_frame(me))
                            await ws.send_message(encode(Envelope(me + "/", to, "ask", msg, 1))
                                                  .decode())
                            with trio.fail_after(10), pytest.raises(ConnectionClosed) as closed:
                                while True:
                                    await ws.get_message()
                        assert closed.value.reason.code == 1002
                for rid in IDS:
                    refused = cluster.procs[rid].logs("protocol error, closing link", start=marks[rid])
                    assert len(refused) == 3 and all(
                        "only accepted on a trusted link" in d["error"] for d in refused), refused
                assert await cluster.leader(client, timeout=15) == leader  # no term bump
                for rid in IDS:
                    r = await client.get(cluster.url(rid) + "/nodes/victim", timeout=5.0)
                    assert r.status_code == 200, (rid, r.text)
                r = await client.post(cluster.url(leader) + "/nodes",
                                      json={"id": "after", "ipv6": "fd00::2"}, timeout=5.0)
                assert r.status_code == 201, r.text
        finally:
            await cluster.aclose()
            nursery.cancel_scope.cancel()


async def test_a_group_with_tls_replicates_and_serves_a_node_over_wss(tmp_path):
    """tls.cert_file/key_file on every replica: the API is https:// only,
    the replicas reach each other at wss:// (checked against tls.ca_file),
    a node given the CA heartbeats through a follower over wss://, and a
    failover happens over those links as over plain ones. A member at a
    ws:// address cannot be added to the group."""
    from trustnet.tls import make_certificates, write_certificates

    tls = write_certificates(make_certificates(["::1"]), str(tmp_path / "certs"))
    async with cluster_with_a_node(tmp_path, lambda leader: _followers(leader)[:1], tls=tls) as (
            cluster, client, leader, node, api):
        async def beating() -> bool:
            h = await _node_health(client, api)
            return bool(h.get("heartbeat_session")) and h.get("heartbeat_misses") == 0
        await _until(beating, "the node heartbeating over wss:// through a follower")
        await _lease_advances(client, cluster, leader)
        status = (await client.get(cluster.url(leader) + "/cluster")).json()
        assert status["members"] == {r: cluster.address(r) for r in IDS}
        assert all(a.startswith("wss://") for a in status["members"].values())

        with pytest.raises(httpx.HTTPError):  # plain HTTP to the https:// port
            async with httpx.AsyncClient() as plain:
                await plain.get(cluster.url(leader).replace("https://", "http://") + "/health",
                                timeout=5.0)
        refused = await client.post(cluster.url(leader) + "/cluster/members",
                                    json={"id": "r9", "address": "ws://[::1]:1"})
        assert refused.status_code == 400 and refused.json()["error"]["code"] == "invalid_member", \
            refused.text

        follower = _followers(leader)[-1]
        cluster.procs[leader].process.kill()
        await cluster.procs[leader].wait()
        new_leader = await cluster.leader(client, timeout=15)
        assert new_leader != leader
        r = await client.post(cluster.url(follower) + "/nodes",
                              json={"id": "after-failover", "ipv6": "fd10:1234::99"})
        assert r.status_code == 201, r.text
        r = await client.get(cluster.url(new_leader) + "/nodes/after-failover")
        assert r.status_code == 200 and r.json()["ipv6"] == "fd10:1234::99", r.text
