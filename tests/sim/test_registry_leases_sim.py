"""Leases of the replicated registry (and a lone one) under MockClock: the
cases a review found (session 9), each failing before its fix.

Three real replicas (ConsensusActor + RegistryActor in replicated mode) on
the simulated network; the lone-registry cases run one RegistryActor.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import random
import threading

import orjson
import pytest
import trio

from actors import ActorSystem, Refused
from actors.simnet import FaultModel, SimNetwork
from trustnet.consensus.actor import ConsensusConfig, TransferLeadership, decode_command
from trustnet.consensus.core import LEADER
from trustnet.consensus.replica import ReplicaSpec, run_replica
from trustnet.identity import NodeIdentity, session_share
from trustnet.registry import messages as m
from trustnet.registry import node_protocol as np
from trustnet.registry.actor import RegistryActor
from trustnet.registry.commands import CheckpointLeases, ExpireNodes
from trustnet.registry.state import RegistryState

T0 = 1_769_774_400.0
TTL = 3.0
HB = 1.0


def clock() -> float:
    return T0 + trio.current_time()


class Group:
    def __init__(self) -> None:
        self.replicas: dict = {}
        self.regs: dict[str, RegistryActor] = {}
        self.addr = {i: f"sim://{i}" for i in ("r1", "r2", "r3")}

    def leader(self) -> str | None:
        return next((r for r, rep in self.replicas.items()
                     if rep.actor.core is not None and rep.actor.core.role == LEADER), None)

    def follower(self) -> str:
        return next(r for r in sorted(self.replicas) if r != self.leader())

    async def ask(self, rid: str, msg, timeout: float = 10):
        return await self.replicas[rid].system.ref("registry").ask(msg, timeout=timeout)

    def has_row(self, rid: str, node_id: str) -> bool:
        return self.replicas[rid].actor.state.has_node(node_id)


async def start_group(nursery, net: SimNetwork, tmp_path, *, sweep: float = 0.1,
                      wall=None, seed: int = 0) -> Group:
    cfg = ConsensusConfig(io_in_thread=False, propose_timeout=2.0)
    g = Group()

    def main(rid: str):
        async def run(transport):
            spec = ReplicaSpec(id=rid, addresses=dict(g.addr), voters=tuple(g.addr), config=cfg,
                               registry_path=str(tmp_path / f"{rid}.db"),
                               raft_path=str(tmp_path / f"{rid}.raft.db"))
            async with trio.open_nursery() as own:
                rep = await own.start(functools.partial(
                    run_replica, transport, spec, rng=random.Random(f"{seed}:{rid}")))
                reg = RegistryActor(rep.actor.state, ttl=TTL, checkpoint_interval=0.5,
                                    sweep_interval=sweep, heartbeat_interval=HB,
                                    clock=wall or clock,
                                    consensus=rep.system.ref("consensus"), propose_timeout=2.0)
                await rep.system.spawn(own, reg, "registry", mailbox_size=1000)
                g.replicas[rid], g.regs[rid] = rep, reg
                await trio.sleep_forever()
        return run

    for rid in g.addr:
        await net.start_process(nursery, g.addr[rid], main(rid))
    await trio.sleep(1.2)
    lead = g.leader()
    assert lead is not None and g.regs[lead].leader_term
    return g


async def beats(g: Group, rid: str, node_id: str, count: int) -> list[str]:
    out = []
    for _ in range(count):
        try:
            await g.ask(rid, m.Heartbeat(node_id))
            out.append("ok")
        except Refused as exc:
            out.append(exc.code)
        await trio.sleep(HB)
    return out


async def test_a_deregistration_through_a_follower_ends_the_lease_on_the_leader(
        tmp_path, autojump_clock):
    """It used to leave the lease on the leader: heartbeats answered ok for
    ever for a node no replica lists, which therefore never registered again."""
    net = SimNetwork(1, FaultModel(delay=(0.001, 0.002)))
    async with trio.open_nursery() as nursery:
        g = await start_group(nursery, net, tmp_path)
        fol = g.follower()
        await g.ask(fol, m.Register(node_id="n1", ipv6="fd10::1", port=7000))
        await g.ask(fol, m.Heartbeat("n1"))
        await g.ask(fol, m.Deregister("n1"))
        await trio.sleep(0.2)
        assert not any(g.has_row(r, "n1") for r in g.replicas)
        assert await beats(g, fol, "n1", 3) == ["not_found"] * 3
        assert "n1" not in g.regs[g.leader()].leases
        nursery.cancel_scope.cancel()


async def test_a_follower_offers_live_candidates(tmp_path, autojump_clock):
    """A follower keeps no leases; it used to offer no peers at all."""
    net = SimNetwork(2, FaultModel(delay=(0.001, 0.002)))
    async with trio.open_nursery() as nursery:
        g = await start_group(nursery, net, tmp_path)
        fol = g.follower()
        for i, n in enumerate(("a", "b", "c"), 1):
            await g.ask(fol, m.Register(node_id=n, ipv6=f"fd10::{i}", port=7000))
        await trio.sleep(0.2)
        peers = (await g.ask(fol, np.Candidates("a", 10)))["peers"]
        assert sorted(p["id"] for p in peers) == ["b", "c"]
        # a heartbeats, b and c go silent: the leader expires them
        assert await beats(g, fol, "a", int(2 * TTL / HB)) == ["ok"] * int(2 * TTL / HB)
        assert (await g.ask(fol, np.Candidates("a", 10)))["peers"] == []
        nursery.cancel_scope.cancel()


def _expiry_index(core, node_id: str) -> int | None:
    for e in core._entries:
        if e.kind == "normal":
            cmd = decode_command(e.data).command
            if isinstance(cmd, ExpireNodes) and node_id in cmd.node_ids:
                return e.index
    return None


async def test_a_new_leader_does_not_keep_a_lease_its_inherited_expiry_removes(
        tmp_path, autojump_clock):
    """L1 expires silent n1; the entry reaches X uncommitted; L1 dies and X
    is elected. X's registry used to adopt n1's lease before it applied the
    expiry it inherited; n1 (only slow) heartbeats again: it must be told
    to register, not renewed for ever without a row."""
    net = SimNetwork(5, FaultModel(delay=(0.001, 0.002)))
    async with trio.open_nursery() as nursery:
        g = await start_group(nursery, net, tmp_path, sweep=0.02)
        l1 = g.leader()
        x, y = [r for r in sorted(g.replicas) if r != l1]
        t = trio.current_time()
        await g.ask(l1, m.Register(node_id="n1", ipv6="fd10::1", port=7000))
        await trio.sleep_until(t + TTL - 0.03)
        net.partition_one_way(g.addr[x], g.addr[l1])  # X's acks to L1 are lost
        net.partition(g.addr[l1], g.addr[y])
        with trio.fail_after(2):
            while _expiry_index(g.replicas[x].actor.core, "n1") is None:
                await trio.sleep(0.005)
        net.crash(g.addr[l1])
        net.heal()
        with trio.fail_after(5):
            while g.replicas[x].actor.core.role != LEADER:
                await trio.sleep(0.001)
        net.isolate(g.addr[x])  # no quorum for a moment: its no-op cannot commit
        # Its registry used to adopt the stored leases at once, n1's among
        # them; now it waits until its term's first entry is committed and
        # applied (a read barrier), i.e. after the inherited expiry.
        await trio.sleep(0.05)  # (less than an election timeout: it still leads)
        assert g.replicas[x].actor.core.role == LEADER and not g.regs[x].leader_term
        net.heal()
        await trio.sleep(0.3)
        assert not g.has_row(x, "n1")
        assert (await beats(g, y, "n1", 2))[-1] == "not_found"
        assert "n1" not in g.regs[g.leader()].leases
        nursery.cancel_scope.cancel()


async def test_a_signed_heartbeat_verified_while_the_lead_moved_goes_to_the_new_leader(
        tmp_path, autojump_clock):
    """The signature is checked in a worker thread; the lead moved meanwhile.
    The ex-leader used to renew a lease of its own (kept for ever: followers
    never sweep) and answer for a leader it no longer was."""
    net = SimNetwork(3, FaultModel(delay=(0.001, 0.002)))
    ident = NodeIdentity.generate()

    def stmt(purpose: str, body: dict) -> str:
        return orjson.dumps(ident.statement(purpose, "n1", body, now=clock())).decode()

    async with trio.open_nursery() as nursery:
        g = await start_group(nursery, net, tmp_path)
        lead = g.leader()
        other = next(r for r in sorted(g.replicas) if r != lead)
        await g.ask(lead, np.SignedRegister(stmt("register", {
            "ipv6": "fd10::1", "port": 7000, "domain": "default",
            "public_key": ident.public_key})))
        reg = g.regs[lead]
        started, proceed = threading.Event(), threading.Event()
        real = reg.gate.verify_all

        def slow_verify(pairs):
            started.set()
            proceed.wait(10)
            return real(pairs)

        reg.gate.verify_all = slow_verify
        out: dict = {}

        async def beat() -> None:
            try:
                out["answer"] = await g.ask(lead, np.SignedHeartbeat(stmt("heartbeat", {})))
            except Refused as exc:
                out["answer"] = exc.code

        nursery.start_soon(beat)
        while not started.is_set():
            await trio.sleep(0.001)
        await g.replicas[lead].system.ref("consensus").ask(TransferLeadership(other), timeout=5)
        while reg.leader_term:
            await trio.sleep(0.01)
        released = clock()
        proceed.set()
        while "answer" not in out:
            await trio.sleep(0.01)
        reg.gate.verify_all = real
        assert "n1" not in reg.leases
        assert isinstance(out["answer"], dict), out  # answered by the new leader
        assert g.regs[g.leader()].leases.last_renewal("n1") >= released
        nursery.cancel_scope.cancel()


async def test_an_expiry_confirmed_late_is_still_logged(tmp_path, autojump_clock, caplog):
    """The expiry's answer timed out but it committed: the next sweep finds
    nothing to remove, and the required "node expired" line used to be lost."""
    from trustnet.consensus.actor import CommitUnknown

    caplog.set_level(logging.INFO, logger="trustnet.registry")
    net = SimNetwork(4, FaultModel(delay=(0.001, 0.002)))
    async with trio.open_nursery() as nursery:
        g = await start_group(nursery, net, tmp_path)
        reg = g.regs[g.leader()]
        await g.ask(g.leader(), m.Register(node_id="n1", ipv6="fd10::1", port=7000))
        real, calls = reg._propose_local, []

        async def late_answer(cmd):
            result = await real(cmd)
            if isinstance(cmd, ExpireNodes) and not calls:
                calls.append(result)
                raise CommitUnknown("no answer in time (test)")
            return result

        reg._propose_local = late_answer
        await trio.sleep(2 * TTL)
        assert calls and calls[0]["expired"] == ["n1"]
        assert [r.node_id for r in caplog.records if r.getMessage() == "node expired"] == ["n1"]
        nursery.cancel_scope.cancel()


def test_an_expiry_decided_in_another_term_is_not_applied():
    from trustnet.consensus.actor import _stale_expiries
    from trustnet.registry.state import Session

    items = [(5, Session("", ExpireNodes(("a",), T0, term=3))),
             (6, Session("", ExpireNodes(("b",), T0, term=4))),
             (7, Session("", ExpireNodes(("c",), T0))),  # a lone registry's: no term
             (8, None)]
    stale = _stale_expiries(items, {5: 4, 6: 4, 7: 4, 8: 4})
    assert list(stale) == [5] and stale[5].code == "stale_term"


# ------------------------------------------------------------ a lone registry


class _Clock:
    """The wall clock, which a test can step (`offset`) as NTP or an operator would."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return T0 + trio.current_time() + self.offset


@contextlib.asynccontextmanager
async def lone_registry(tmp_path, clock=None):
    """(actor, ref) of a lone RegistryActor (TTL 30 s) on a fresh database."""
    state = RegistryState.open(str(tmp_path / "r.db"))
    actor = RegistryActor(state, ttl=30.0, checkpoint_interval=10.0, sweep_interval=1.0,
                          clock=clock or _Clock())
    system = ActorSystem()
    try:
        async with trio.open_nursery() as nursery:
            await system.spawn(nursery, actor, "registry", mailbox_size=1000)
            yield actor, system.ref("registry")
            nursery.cancel_scope.cancel()
    finally:
        state.close()


async def test_a_checkpoint_does_not_rewind_a_registration_made_while_it_runs(
        tmp_path, autojump_clock):
    """Chunks of a checkpoint were all taken up front: a registration stored
    during the rest after chunk 1 was overwritten by chunk 2's older values."""
    async with lone_registry(tmp_path) as (actor, ref):
        ids = [f"n{i:03d}" for i in range(300)]
        for i, n in enumerate(ids):
            await ref.ask(m.Register(node_id=n, ipv6=f"fd10::{i + 1:x}", port=7000))
        await trio.sleep(5.0)
        for n in ids:
            await ref.ask(m.Heartbeat(n))
        target, real, chunks = ids[-1], actor._apply_soft, []

        async def apply_soft(commands, pace):
            await real(commands, pace)
            if isinstance(commands[0], CheckpointLeases):
                chunks.append(commands)
                if len(chunks) == 1:  # the rest after chunk 1
                    await trio.sleep(1.0)
                    await ref.ask(m.Register(node_id=target, ipv6="fd10::ffff", port=7001))

        actor._apply_soft = apply_soft
        await trio.sleep(8.0)  # the checkpoint at t=10 runs
        assert len(chunks) >= 1
        stored, _last = actor.state.lease_table()[target]
        assert stored == actor.leases.deadline(target)


async def test_a_refused_session_opening_leaves_no_session(tmp_path, autojump_clock):
    clock = _Clock()
    ident = NodeIdentity.generate()

    def stmt(purpose: str, body: dict) -> str:
        return orjson.dumps(ident.statement(purpose, "n1", body, now=clock())).decode()

    async with lone_registry(tmp_path, clock) as (actor, ref):
        await ref.ask(np.SignedRegister(stmt("register", {
            "ipv6": "fd10::1", "port": 7000, "domain": "default",
            "public_key": ident.public_key})), timeout=5)
        await trio.sleep(32.0)  # expired and swept
        _, share = session_share()
        with pytest.raises(Refused) as info:
            await ref.ask(np.OpenSession(stmt("session", {"share": share})), timeout=5)
        assert info.value.code == "not_found"
        assert len(actor.sessions) == 0


async def test_leases_get_back_the_time_the_registry_stood_still(tmp_path, autojump_clock, caplog):
    """A process or VM pause longer than the TTL: when it resumes, the
    heartbeats of that time are still queued in its sockets, and the first
    sweep used to expire every node before reading them."""
    caplog.set_level(logging.INFO, logger="trustnet.registry")
    async with lone_registry(tmp_path) as (actor, ref):
        await ref.ask(m.Register(node_id="n1", ipv6="fd10::1", port=7000))
        await trio.sleep(5.0)
        before = actor.leases.deadline("n1")
        autojump_clock.jump(100.0)  # the whole process stood still for 100 s
        await trio.sleep(2.0)
        assert "n1" in actor.leases and actor.leases.deadline("n1") >= before + 99.0
        assert not [r for r in caplog.records if r.getMessage() == "node expired"]
        await ref.ask(m.Heartbeat("n1"))  # what was queued is then served
        await trio.sleep(60.0)  # and a node that stays silent still expires
        assert [r.node_id for r in caplog.records if r.getMessage() == "node expired"] == ["n1"]


async def test_a_link_report_through_a_follower_counts_on_the_leader(tmp_path, autojump_clock):
    """Reputation lives on the leader. A report a follower took used to be
    committed (the peers table) but counted in the follower's book, which
    holds no leases, so it counted nowhere: with 3 replicas, two thirds of
    the nodes' reports."""
    net = SimNetwork(4, FaultModel(delay=(0.001, 0.002)))
    idents = {n: NodeIdentity.generate() for n in ("a", "b")}

    def stmt(node_id: str, purpose: str, body: dict) -> str:
        return orjson.dumps(idents[node_id].statement(purpose, node_id, body, now=clock())).decode()

    async with trio.open_nursery() as nursery:
        g = await start_group(nursery, net, tmp_path)
        lead, fol = g.leader(), g.follower()
        for i, n in enumerate(idents, 1):
            await g.ask(fol, np.SignedRegister(stmt(n, "register", {
                "ipv6": f"fd10::{i}", "port": 7000, "domain": "default",
                "public_key": idents[n].public_key})))
        await g.ask(fol, np.SignedHeartbeat(stmt("b", "heartbeat", {})))  # the leader holds b's lease
        for state in ("open", "failed", "open"):
            answer = await g.ask(fol, np.LinkReport(stmt("a", "link", {"peer": "b", "state": state})))
            assert answer["recorded"]
        await trio.sleep(0.1)
        links = (await g.ask(lead, m.ReputationOf("b")))["links"]
        assert (links["opened"], links["failed"]) == (2, 1)
        assert not g.regs[fol].reputation.tracks  # nothing kept where it is never stored
        # and the leader's checkpoint stores the score, on every replica
        await trio.sleep(1.0)
        expected = g.regs[lead].reputation.score("b")
        assert expected != 0.5
        for rid in g.replicas:
            assert g.regs[rid].state.get_node("b")["reputation"] == pytest.approx(expected)
        nursery.cancel_scope.cancel()


def test_a_reported_link_travels_only_on_the_replicas_links():
    """A node cannot count reports it never signed by sending ReportedLink:
    the transport takes it only on a link that proved the cluster secret."""
    from actors.codec import needs_trust
    assert needs_trust(m.ReportedLink("b", "open"))


@pytest.mark.parametrize("step", [+3600.0, -3600.0])
async def test_a_step_of_the_system_clock_does_not_change_how_long_leases_last(
        tmp_path, autojump_clock, caplog, step):
    """Leases are in wall-clock time. A step forward of more than the TTL
    used to expire every node at the next sweep (each was heartbeating); a
    step back kept a silent node listed for the length of the step."""
    caplog.set_level(logging.INFO, logger="trustnet.registry")
    wall = _Clock()
    expired = lambda: [r.node_id for r in caplog.records if r.getMessage() == "node expired"]
    async with lone_registry(tmp_path, wall) as (actor, ref):
        for n in ("live", "silent"):
            await ref.ask(m.Register(node_id=n, ipv6=f"fd10::{len(n)}", port=7000))
        for i in range(40):  # "live" heartbeats every 10 s (TTL 30 s), "silent" never
            if i == 1:
                wall.offset += step
            await ref.ask(m.Heartbeat("live"))
            await trio.sleep(10.0)
            if i == 5:  # 60 s of real time: the silent one's TTL is long gone
                assert expired() == ["silent"]
        assert expired() == ["silent"]
        assert "live" in actor.leases
        assert any(r.getMessage().startswith("the system clock stepped") for r in caplog.records)


async def _transfer(g: Group) -> None:
    """Hand the lead to another replica and wait until its registry leads."""
    lead = g.leader()
    other = next(r for r in sorted(g.replicas) if r != lead)
    await g.replicas[lead].system.ref("consensus").ask(TransferLeadership(other), timeout=5)
    with trio.fail_after(3):
        while g.leader() != other or not g.regs[other].leader_term:
            await trio.sleep(0.01)


async def test_frequent_elections_do_not_keep_a_silent_node_listed(tmp_path, autojump_clock):
    """etcd's complaint: each new leader granted every lease a fresh TTL, so
    with elections more often than the TTL a dead node stayed for ever. The
    grace is bounded by the node's last heartbeat (+ 2 TTL)."""
    net = SimNetwork(6, FaultModel(delay=(0.001, 0.002)))
    async with trio.open_nursery() as nursery:
        g = await start_group(nursery, net, tmp_path)
        await g.ask(g.leader(), m.Register(node_id="dead", ipv6="fd10::1", port=7000))
        await g.ask(g.leader(), m.Register(node_id="live", ipv6="fd10::2", port=7000))
        silent_since = trio.current_time()
        while trio.current_time() - silent_since < 4 * TTL:
            await _transfer(g)  # a new leader every TTL / 2
            for _ in range(2):
                await g.ask(g.follower(), m.Heartbeat("live"))
                await trio.sleep(TTL / 4)
        assert not any(g.has_row(r, "dead") for r in g.replicas)
        assert all(g.has_row(r, "live") for r in g.replicas)
        nursery.cancel_scope.cancel()


async def test_after_the_whole_group_was_down_nodes_get_time_to_heartbeat(
        tmp_path, autojump_clock, caplog):
    """Every replica down for longer than 2 TTL (an outage, an upgrade of
    all): nodes could not heartbeat meanwhile. The first leader after it used
    to expire every node at once (each was past its last heartbeat + 2 TTL),
    which dropped their rows, peers and reputation, as a lone registry's
    restart does not. A node that stays silent after the outage still goes."""
    caplog.set_level(logging.INFO, logger="trustnet.registry")
    net = SimNetwork(7, FaultModel(delay=(0.001, 0.002)))
    async with trio.open_nursery() as nursery:
        g = await start_group(nursery, net, tmp_path)
        for i, n in enumerate(("back", "gone"), 1):
            await g.ask(g.leader(), m.Register(node_id=n, ipv6=f"fd10::{i}", port=7000))
        assert await beats(g, g.leader(), "back", 3) == ["ok"] * 3
        for rid in sorted(g.replicas):
            net.crash(g.addr[rid])
        await trio.sleep(10 * TTL)
        for rid in sorted(g.replicas):
            await net.restart(g.addr[rid])
        with trio.fail_after(5):
            while g.leader() is None or not g.regs[g.leader()].leader_term:
                await trio.sleep(0.01)
        await trio.sleep(HB)  # the node's retry after a heartbeat interval
        assert await beats(g, g.follower(), "back", int(3 * TTL / HB)) == ["ok"] * int(3 * TTL / HB)
        assert all(g.has_row(r, "back") for r in g.replicas)
        assert not any(g.has_row(r, "gone") for r in g.replicas)
        assert [r.node_id for r in caplog.records if r.getMessage() == "node expired"] == ["gone"]
        nursery.cancel_scope.cancel()


async def test_a_slow_expiry_commit_is_not_taken_for_a_stall(tmp_path, autojump_clock, caplog):
    """The sweep measured its lateness from its previous wake-up, so the time
    it spent waiting for an expiry to commit counted as the process standing
    still, and every lease was extended by it."""
    caplog.set_level(logging.INFO, logger="trustnet.registry")
    net = SimNetwork(8, FaultModel(delay=(0.001, 0.002)))
    async with trio.open_nursery() as nursery:
        g = await start_group(nursery, net, tmp_path)
        lead = g.leader()
        reg = g.regs[lead]
        await g.ask(lead, m.Register(node_id="silent", ipv6="fd10::1", port=7000))
        await g.ask(lead, m.Register(node_id="live", ipv6="fd10::2", port=7000))
        real = reg._propose_local

        async def slow(cmd):
            if isinstance(cmd, ExpireNodes):
                await trio.sleep(1.5)  # a commit that takes its time
            return await real(cmd)

        reg._propose_local = slow
        await g.ask(lead, m.Heartbeat("live"))
        renewed = reg.leases.deadline("live")
        await trio.sleep(TTL + 2.0)  # silent's expiry is proposed, slowly
        assert not g.has_row(lead, "silent")
        assert reg.leases.deadline("live") == renewed
        assert not [r for r in caplog.records if "did not run" in r.getMessage()]
        nursery.cancel_scope.cancel()


async def test_a_step_back_of_the_clocks_does_not_keep_a_silent_node_in_a_group(
        tmp_path, autojump_clock, caplog):
    """Replicated, the leader moved its deadlines but not the stored ones, and
    an expiry removes a row only once its stored deadline has passed: the
    expiry did nothing, and the silent node stayed listed for the length of
    the step."""
    caplog.set_level(logging.INFO, logger="trustnet.registry")
    wall = _Clock()
    net = SimNetwork(9, FaultModel(delay=(0.001, 0.002)))
    async with trio.open_nursery() as nursery:
        g = await start_group(nursery, net, tmp_path, wall=wall)
        await g.ask(g.leader(), m.Register(node_id="silent", ipv6="fd10::1", port=7000))
        await g.ask(g.leader(), m.Register(node_id="live", ipv6="fd10::2", port=7000))
        await trio.sleep(HB)
        wall.offset -= 3600.0  # every replica's clock, one hour back
        for _ in range(int(3 * TTL / HB)):
            await g.ask(g.follower(), m.Heartbeat("live"))
            await trio.sleep(HB)
        assert not any(g.has_row(r, "silent") for r in g.replicas)
        assert all(g.has_row(r, "live") for r in g.replicas)
        assert [r.node_id for r in caplog.records if r.getMessage() == "node expired"] == ["silent"]
        nursery.cancel_scope.cancel()
