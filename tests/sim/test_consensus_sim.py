"""Deterministic simulation of replicated registries (DESIGN principle 7).

3 or 5 ConsensusActor replicas, each a process on the simulated network
(actors.simnet) under MockClock, with its Raft log in a MemoryStorage "disk"
or a SqliteRaftStorage file and its RegistryState file on tmp_path. Clients
in a separate process send random registry writes (Propose, retried with the
same request id) and linearizable reads (ReadBarrier, then a local read) to
random replicas, while a director, driven by the seed, injects faults phase
by phase: drops (0-20 %), duplicates, reordering, delays, symmetric and one
way partitions, an isolated leader (a pause longer than the election
timeout), crashes and restarts (restart re-opens log and registry from
disk), graceful leader stops (on_stop hands leadership over), leadership
transfers, and snapshots (a small compaction threshold, small chunks).

Checked:
  * at most one leader per term (every soft-state change is observed);
  * every replica that applied index i has the same registry state_hash at i;
  * after healing, a write commits within 3 election timeouts;
  * after healing, all replicas converge to the same applied index and hash,
    and every acknowledged write (its request id) is in every replica's
    session table;
  * the client history (timeouts as unknown) is linearizable
    (trustnet.consensus.linearizability, RegistryModel).

A failure prints its seed; `run_sim(seed, path)` replays it exactly:

    pytest tests/sim/test_consensus_sim.py -k 'seed17]'

TRUSTNET_SIM_SEEDS scales the number of seeds (default 60; `make soak` runs many more).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
from functools import partial

import attrs
import pytest
import trio
import trio.testing

from actors import Actor, ActorError, ActorSystem, AskTimeout, message
from actors.simnet import FaultModel, SimNetwork, seeded_trio_scheduler
from trustnet.consensus.actor import (
    AddMember,
    ClusterStatus,
    ConsensusActor,
    ConsensusConfig,
    NAME,
    Propose,
    ReadBarrier,
    RemoveMember,
    TransferLeadership,
)
from trustnet.consensus.core import LEADER, MemoryStorage, RaftConfig
from trustnet.consensus.linearizability import (
    CONFLICT,
    NOT_FOUND,
    OK,
    UNKNOWN,
    Operation,
    RegistryModel,
    check,
)
from trustnet.consensus.replica import ReplicaSpec, run_replica
from trustnet.consensus.storage import SqliteRaftStorage
from trustnet.registry.commands import Conflict, DeleteNode, NotFound, RegisterNode
from trustnet.registry.state import RegistryState, Session

SEEDS = int(os.environ.get("TRUSTNET_SIM_SEEDS", "60"))
# Seeds that once failed (in CI or in `make soak`) stay here for good.
REGRESSION_SEEDS: list[int] = []
T0 = 1_700_000_000.0  # client timestamps: T0 + mock time
NODES = [f"node{k}" for k in range(6)]
IPS = [f"fd10:1234::{k}" for k in range(1, 5)]  # fewer addresses than nodes: conflicts happen
CLIENT = "sim://client"
CLIENTS = 5


class Violation(AssertionError):
    pass


# ------------------------------------------------------------------ test-only reader

@message("consensus-sim.read_node")
class ReadNode:
    node_id: str


class Reader(Actor):
    """How the RegistryActor serves a linearizable read: ReadBarrier on the
    local consensus actor, then read the local state."""

    def __init__(self, state: RegistryState):
        self.state = state

    async def receive(self, msg):
        if isinstance(msg, ReadNode):
            await self.system.ref(NAME).ask(ReadBarrier(), timeout=1.2)
            return self.state.get_node(msg.node_id)["ipv6"]
        return await super().receive(msg)


# ------------------------------------------------------------------ invariants

class Checker:
    """The ConsensusActor's observer: global knowledge for the invariants."""

    def __init__(self):
        self.leader_of_term: dict[int, str] = {}
        self.hash_at: dict[int, tuple[str, str]] = {}  # index -> (hash, first replica)
        self.violations: list[str] = []
        self.applied_max = 0

    def leader(self, replica: str, term: int) -> None:
        other = self.leader_of_term.setdefault(term, replica)
        if other != replica:
            self.violations.append(f"two leaders in term {term}: {other} and {replica}")

    def applied(self, replica: str, index: int, state: RegistryState) -> None:
        digest = state.state_hash()
        self.applied_max = max(self.applied_max, index)
        first = self.hash_at.setdefault(index, (digest, replica))
        if first[0] != digest:
            self.violations.append(f"state at index {index} differs: {first[1]} vs {replica}")


# ------------------------------------------------------------------ the simulation

class Sim:
    def __init__(self, seed: int, path: str):
        self.seed = seed
        self.path = path
        self.rng = random.Random(seed)
        rng = self.rng
        self.n = rng.choice([3, 5])
        self.sqlite = rng.random() < 0.5
        self.ids = [f"r{k}" for k in range(1, self.n + 1)]
        self.addr = {i: f"sim://{i}" for i in self.ids}
        raft = RaftConfig(heartbeat_ticks=5, election_ticks=15, max_batch_entries=rng.choice([4, 64]),
                          max_inflight=rng.choice([2, 16]), snapshot_chunk_bytes=rng.choice([256, 4096]))
        self.cfg = ConsensusConfig(tick=0.010, raft=raft, io_in_thread=False,
                                   snapshot_threshold=rng.choice([8, 20, 10_000]),
                                   propose_timeout=1.0, no_leader_wait=0.6, read_timeout=1.0,
                                   stop_transfer_timeout=0.3, max_apply_batch=1)
        self.disks = {i: MemoryStorage() for i in self.ids}
        self.net = SimNetwork(seed, FaultModel())
        self.checker = Checker()
        self.replicas: dict[str, object] = {}
        self.states: dict[str, RegistryState] = {}
        self.down: set[str] = set()
        self.history: list[Operation] = []
        self.acked: list[str] = []  # request ids whose write was answered (applied)
        self.incarnation = 0
        self.stop_clients = False
        self.log: list[str] = []

    def note(self, what: str) -> None:
        self.log.append(f"{trio.current_time():8.3f} {what}")

    # -- replica processes
    def _spec(self, rid: str) -> ReplicaSpec:
        return ReplicaSpec(id=rid, addresses=dict(self.addr), voters=tuple(self.ids),
                           registry_path=os.path.join(self.path, f"{rid}-registry.db"),
                           raft_path=os.path.join(self.path, f"{rid}-raft.db") if self.sqlite else None,
                           config=self.cfg)

    def _main(self, rid: str):
        async def main(transport) -> None:
            spec = self._spec(rid)
            state = RegistryState.open(spec.registry_path)
            # Only process crashes are simulated; a committed WAL transaction
            # survives those without fsync, so skip the fsyncs (speed).
            state._conn.execute("PRAGMA synchronous = OFF")
            if self.sqlite:
                storage = SqliteRaftStorage(spec.raft_path, node_id=rid)
                storage._conn.execute("PRAGMA synchronous = OFF")
            else:
                storage = self.disks[rid]
            self.incarnation += 1
            rng = random.Random(f"{self.seed}/{rid}/{self.incarnation}")
            try:
                async with trio.open_nursery() as nursery:
                    replica = await nursery.start(partial(
                        run_replica, transport, spec, storage=storage, state=state, rng=rng,
                        observer=self.checker))
                    await replica.system.spawn(nursery, Reader(state), "reader")
                    self.replicas[rid], self.states[rid] = replica, state
                    await trio.sleep_forever()
            finally:
                state.close()
                if self.sqlite:
                    storage.close()
        return main

    def actor(self, rid: str) -> ConsensusActor:
        return self.replicas[rid].actor

    def leader(self) -> str | None:
        leaders = [(self.actor(r).core.term, r) for r in self.ids
                   if r not in self.down and r in self.replicas and self.actor(r).core is not None
                   and self.actor(r).core.role == LEADER]
        return max(leaders)[1] if leaders else None

    def crash(self, rid: str) -> None:
        self.note(f"crash {rid}")
        self.actor(rid).abandon()  # kill -9: no on_stop
        self.net.crash(self.addr[rid])
        self.down.add(rid)

    def stop_gracefully(self, rid: str) -> None:
        """SIGTERM: the process is cancelled but its sockets still work while
        on_stop hands leadership over (simnet has no API for it: cancel the
        process scope directly)."""
        self.note(f"graceful stop {rid}")
        self.net._procs[self.addr[rid]].scope.cancel()
        self.down.add(rid)

    async def restart(self, rid: str) -> None:
        self.note(f"restart {rid}")
        await self.net.restart(self.addr[rid])
        self.down.discard(rid)

    # -- clients
    async def client_main(self, transport) -> None:
        self.csys = ActorSystem(transport=transport)
        await self.csys.serve()

    async def write(self, crng: random.Random, cmd, rid: str):
        for _attempt in range(3):
            target = crng.choice(self.ids)
            try:
                await self.csys.ref(NAME, self.addr[target]).ask(Propose(cmd, rid), timeout=1.5)
                self.acked.append(rid)
                return OK
            except Conflict:
                self.acked.append(rid)
                return CONFLICT
            except NotFound:
                self.acked.append(rid)
                return NOT_FOUND
            except (ActorError, AskTimeout):
                # NoLeader / NotCommitted / CommitUnknown / timeouts: retry the
                # same request id elsewhere; the session applies it once.
                await trio.sleep(0.05)
        return UNKNOWN

    async def read(self, crng: random.Random, node: str):
        target = crng.choice(self.ids)
        try:
            return await self.csys.ref("reader", self.addr[target]).ask(ReadNode(node), timeout=1.5)
        except NotFound:
            return NOT_FOUND
        except (ActorError, AskTimeout):
            return UNKNOWN

    async def one_op(self, k: int, crng: random.Random, seq: int, node: str, kind: str) -> None:
        call = trio.current_time()
        if kind == "register":
            ipv6 = crng.choice(IPS)
            cmd = RegisterNode(node_id=node, ipv6=ipv6, port=9000, domain="default",
                               at=T0 + call, lease_deadline=T0 + call + 90.0)
            out, inp = await self.write(crng, cmd, f"c{k}-{seq}"), ("register", ipv6)
        elif kind == "delete":
            out, inp = await self.write(crng, DeleteNode(node_id=node), f"c{k}-{seq}"), ("delete",)
        else:
            out, inp = await self.read(crng, node), ("get",)
        ret = None if out is UNKNOWN else trio.current_time()
        self.history.append(Operation(k, node, inp, call, ret, out))

    async def client(self, k: int) -> None:
        crng = random.Random(f"{self.seed}/client{k}")
        seq = 0
        while not self.stop_clients:
            await trio.sleep(crng.uniform(0.0, 0.08))
            seq += 1
            kind = crng.choice(["register", "register", "delete", "get", "get"])
            await self.one_op(k, crng, seq, crng.choice(NODES), kind)

    # -- faults
    def lossy(self) -> FaultModel:
        r = self.rng
        return FaultModel(drop=r.uniform(0.0, 0.2), duplicate=r.choice([0.0, 0.05]),
                          delay=(0.0005, r.choice([0.002, 0.02])), reorder=r.choice([0.0, 0.2]),
                          reorder_delay=0.03)

    async def phase(self) -> None:
        r = self.rng
        kind = r.choice(["calm", "lossy", "partition", "one_way", "isolate_leader", "crash",
                         "crash_leader", "graceful_leader", "transfer", "lossy_crash"])
        self.net.faults = self.lossy() if kind.startswith("lossy") or r.random() < 0.3 else FaultModel(
            delay=(0.0005, 0.002))
        self.note(f"phase {kind} {self.net.faults}")
        minority = (self.n - 1) // 2
        crashed: list[str] = []
        if kind == "partition":
            ids = self.ids[:]
            r.shuffle(ids)
            cut = r.randint(1, self.n - 1)
            self.net.partition([self.addr[i] for i in ids[:cut]], [self.addr[i] for i in ids[cut:]])
        elif kind == "one_way":
            for _ in range(r.randint(1, 3)):
                a, b = r.sample(self.ids, 2)
                self.net.partition_one_way(self.addr[a], self.addr[b])
        elif kind == "isolate_leader":
            lead = self.leader()
            if lead is not None:
                self.net.isolate(self.addr[lead])  # a pause longer than the election timeout
        elif kind in ("crash", "lossy_crash"):
            crashed = r.sample([i for i in self.ids if i not in self.down], r.randint(1, minority))
            for rid in crashed:
                self.crash(rid)
        elif kind == "crash_leader":
            lead = self.leader()
            if lead is not None:
                self.crash(lead)
                crashed = [lead]
        elif kind == "graceful_leader":
            lead = self.leader()
            if lead is not None:
                self.stop_gracefully(lead)
                crashed = [lead]
        elif kind == "transfer":
            try:
                await self.csys.ref(NAME, self.addr[r.choice(self.ids)]).ask(
                    TransferLeadership(), timeout=1.0)
            except (ActorError, AskTimeout):
                pass
        await trio.sleep(r.uniform(0.4, 1.2))
        self.net.heal()
        for rid in crashed:
            await self.restart(rid)

    # -- the run
    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            for rid in self.ids:
                await self.net.start_process(nursery, self.addr[rid], self._main(rid))
            await self.net.start_process(nursery, CLIENT, self.client_main)
            await trio.sleep(0.01)  # every process has built its actors
            clients = trio.CancelScope()

            async def run_clients():
                with clients:
                    async with trio.open_nursery() as cn:
                        for k in range(CLIENTS):
                            cn.start_soon(self.client, k)

            nursery.start_soon(run_clients)
            await trio.sleep(0.4)  # a first leader, and some load, before the faults
            for _ in range(self.rng.randint(4, 8)):
                await self.phase()

            # Heal: no faults, everybody up; a write must commit within 3 election timeouts.
            self.net.heal()
            self.net.faults = FaultModel(delay=(0.0005, 0.002))
            for rid in sorted(self.down):
                await self.restart(rid)
            self.note("healed")
            healed = trio.current_time()
            limit = 3 * self.cfg.election_timeout
            acked_at = None
            with trio.move_on_after(limit + 0.2):
                while acked_at is None:
                    try:
                        cmd = RegisterNode(node_id="heal", ipv6="fd10:1234::ff", port=1, domain="d",
                                           at=T0, lease_deadline=T0)
                        await self.csys.ref(NAME, self.addr[self.ids[0]]).ask(
                            Propose(cmd, "heal"), timeout=limit)
                        acked_at = trio.current_time()
                    except (ActorError, AskTimeout):
                        await trio.sleep(0.01)
            if acked_at is None or acked_at - healed > limit + 0.05:
                self.checker.violations.append(
                    f"no commit within 3 election timeouts ({limit:.2f}s) after healing")
            self.acked.append("heal")

            # Let the clients stop, then everyone catch up.
            self.stop_clients = True
            await trio.sleep(3.5)
            clients.cancel()
            for node in NODES:  # final linearizable reads, in the history too
                await self.one_op(99, random.Random(node), 0, node, "get")
            await trio.sleep(1.0)
            self.final_checks()
            nursery.cancel_scope.cancel()

    def final_checks(self) -> None:
        v = self.checker.violations
        applied = {r: self.states[r].applied_index for r in self.ids}
        hashes = {r: self.states[r].state_hash() for r in self.ids}
        if len(set(applied.values())) != 1 or len(set(hashes.values())) != 1:
            v.append(f"replicas did not converge: applied {applied}")
        for rid in self.acked:
            for r in self.ids:
                try:
                    self.states[r].session_result(rid)
                except KeyError:
                    v.append(f"acknowledged write {rid} missing on {r}")
                    break


@contextlib.contextmanager
def deterministic_trio(seed: int):
    """seeded_trio_scheduler, plus trio's own switch (the one its Hypothesis
    plugin flips) that orders each batch of runnable tasks by spawn order
    before the seeded shuffle. Without it, tasks of one process woken at the
    same instant (a tick and a request timeout, say) run in an order that
    depends on object ids, and a seed does not replay."""
    from trio._core import _run

    saved = _run._ALLOW_DETERMINISTIC_SCHEDULING
    _run._ALLOW_DETERMINISTIC_SCHEDULING = True
    try:
        with seeded_trio_scheduler(seed):
            yield
    finally:
        _run._ALLOW_DETERMINISTIC_SCHEDULING = saved


def run_sim(seed: int, path: str) -> Sim:
    sim = Sim(seed, path)
    with deterministic_trio(seed):
        trio.run(sim.run, clock=trio.testing.MockClock(autojump_threshold=0))
    return sim


def describe(sim: Sim) -> str:
    return (f"seed={sim.seed} replicas={sim.n} storage={'sqlite' if sim.sqlite else 'memory'} "
            f"snapshot_threshold={sim.cfg.snapshot_threshold}\n  " + "\n  ".join(sim.log[-30:]))


# ------------------------------------------------------------------ tests

@pytest.mark.parametrize("seed", sorted(set(range(SEEDS)) | set(REGRESSION_SEEDS)),
                         ids=lambda s: f"seed{s}")
def test_consensus_sim(seed, tmp_path):
    sim = run_sim(seed, str(tmp_path))
    assert not sim.checker.violations, f"{sim.checker.violations[:5]}\n{describe(sim)}"
    result = check(RegistryModel(), sim.history, timeout=20.0)
    assert result.ok is not False, f"seed={seed}: {result.explanation}\n{describe(sim)}"
    known = sum(not op.unknown for op in sim.history)
    assert known > 40, f"seed={seed}: only {known} operations completed\n{describe(sim)}"


def test_same_seed_replays_identically(tmp_path):
    def fingerprint(sim: Sim) -> str:
        h = hashlib.sha256()
        for e in sim.net.trace:
            h.update(f"{e.time!r} {e.kind} {e.src} {e.dst} {e.what} {e.why}\n".encode())
        return h.hexdigest()

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    one = run_sim(3, str(tmp_path / "a"))
    two = run_sim(3, str(tmp_path / "b"))
    assert fingerprint(one) == fingerprint(two)
    assert one.history == two.history


# ------------------------------------------------------------------ focused scenarios

async def _cluster(nursery, net, tmp_path, n=3, cfg=None, ids=None):
    cfg = cfg or ConsensusConfig(io_in_thread=False, propose_timeout=2.0)
    ids = ids or [f"r{k}" for k in range(1, n + 1)]
    addr = {i: f"sim://{i}" for i in ids}
    replicas = {}

    def main(rid, voters):
        async def run(transport):
            spec = ReplicaSpec(id=rid, addresses=dict(addr), voters=voters, config=cfg,
                               registry_path=str(tmp_path / f"{rid}.db"))
            async with trio.open_nursery() as own:  # inside the process's cancel scope
                replicas[rid] = await own.start(run_replica, transport, spec)
                await trio.sleep_forever()
        return run

    for rid in ids:
        await net.start_process(nursery, addr[rid], main(rid, tuple(ids)))
    return replicas, addr, main


def _leader(replicas):
    return next((r for r, rep in replicas.items() if rep.actor.core.role == LEADER), None)


async def _settled(nursery, net, tmp_path):
    """Three replicas a second after their start: (replicas, addresses, leader, a follower)."""
    replicas, addr, _ = await _cluster(nursery, net, tmp_path)
    await trio.sleep(1.0)
    lead = _leader(replicas)
    return replicas, addr, lead, next(r for r in replicas if r != lead)


async def test_propose_forward_read_status_and_sessions(tmp_path, autojump_clock):
    net = SimNetwork(1, FaultModel(delay=(0.001, 0.002)))
    async with trio.open_nursery() as nursery:
        replicas, addr, lead, follower = await _settled(nursery, net, tmp_path)
        ref = replicas[follower].consensus
        cmd = RegisterNode(node_id="a", ipv6="fd10::1", port=1, domain="d", at=T0, lease_deadline=T0)
        first = await ref.ask(Propose(cmd, "req-1"))
        assert first["id"] == "a"
        # A retry with the same request id returns the first result, applies nothing.
        applied = replicas[lead].actor.state.applied_index
        again = await ref.ask(Propose(attrs.evolve(cmd, port=2), "req-1"))
        assert again == first
        assert replicas[lead].actor.state.get_node("a")["port"] == 1
        assert replicas[lead].actor.state.applied_index == applied + 1
        with pytest.raises(Conflict):
            await ref.ask(Propose(attrs.evolve(cmd, node_id="b"), "req-2"))
        barrier = await ref.ask(ReadBarrier())
        assert barrier["applied"] >= barrier["index"] >= applied + 2
        assert replicas[follower].actor.state.get_node("a")["ipv6"] == "fd10::1"
        status = await ref.ask(ClusterStatus())
        assert status["leader"] == lead and set(status["lag"]) == set(replicas)
        assert status["members"] == addr
        nursery.cancel_scope.cancel()


async def test_no_leader_is_refused_after_a_bounded_wait(tmp_path, autojump_clock):
    cfg = ConsensusConfig(io_in_thread=False, no_leader_wait=0.5, propose_timeout=5.0)
    net = SimNetwork(2, FaultModel())
    async with trio.open_nursery() as nursery:
        replicas, addr, _ = await _cluster(nursery, net, tmp_path, cfg=cfg)
        for a in addr.values():
            net.isolate(a)
        await trio.sleep(0.01)
        t0 = trio.current_time()
        cmd = DeleteNode(node_id="x")
        with pytest.raises(Exception) as err:
            await replicas["r1"].consensus.ask(Propose(cmd, "r"))
        assert getattr(err.value, "code", "") == "no_leader", repr(err.value)
        assert trio.current_time() - t0 == pytest.approx(0.5, abs=0.05)
        nursery.cancel_scope.cancel()


async def test_graceful_stop_of_the_leader_hands_over_quickly(tmp_path, autojump_clock):
    net = SimNetwork(3, FaultModel(delay=(0.001, 0.002)))
    async with trio.open_nursery() as nursery:
        replicas, addr, _ = await _cluster(nursery, net, tmp_path)
        await trio.sleep(1.0)
        lead = _leader(replicas)
        t0 = trio.current_time()
        net._procs[addr[lead]].scope.cancel()
        with trio.fail_after(5):
            while not [r for r, rep in replicas.items()
                       if r != lead and rep.actor.core.role == LEADER]:
                await trio.sleep(0.005)
        # Well below the 150 ms minimum election timeout: TimeoutNow, not a timeout.
        assert trio.current_time() - t0 < 0.1
        nursery.cancel_scope.cancel()


async def test_add_member_joins_by_snapshot_and_remove(tmp_path, autojump_clock):
    cfg = ConsensusConfig(io_in_thread=False, snapshot_threshold=5,
                          raft=RaftConfig(snapshot_chunk_bytes=128))
    net = SimNetwork(4, FaultModel(delay=(0.001, 0.002)))
    async with trio.open_nursery() as nursery:
        replicas, addr, main = await _cluster(nursery, net, tmp_path, cfg=cfg)
        await trio.sleep(1.0)
        ref = replicas["r1"].consensus
        for k in range(12):
            cmd = RegisterNode(node_id=f"n{k}", ipv6=f"fd10::{k + 1}", port=1, domain="d",
                               at=T0, lease_deadline=T0)
            await ref.ask(Propose(cmd, f"w{k}"))
        await net.start_process(nursery, "sim://r4", main("r4", ()))
        out = await ref.ask(AddMember("r4", "sim://r4"))
        assert out["voters"] == ["r1", "r2", "r3", "r4"]
        await trio.sleep(1.0)
        st4 = replicas["r4"].actor.state
        assert st4.node_count() == 12
        assert st4.state_hash() == replicas["r1"].actor.state.state_hash()
        out = await ref.ask(RemoveMember("r2"))
        assert out["voters"] == ["r1", "r3", "r4"]
        nursery.cancel_scope.cancel()


def test_session_state_survives_snapshot_and_restart(tmp_path):
    state = RegistryState.open(str(tmp_path / "a.db"))
    cmd = RegisterNode(node_id="a", ipv6="fd10::1", port=1, domain="d", at=T0, lease_deadline=T0)
    first = state.apply_batch([(1, Session("r1", cmd)), (2, None),
                               (3, Session("r2", attrs.evolve(cmd, node_id="b")))])
    assert first[1] is None and isinstance(first[2], Conflict)
    again = state.apply_batch([(4, Session("r1", attrs.evolve(cmd, port=5))),
                               (5, Session("r2", attrs.evolve(cmd, node_id="b")))])
    assert again[0] == first[0] and isinstance(again[1], Conflict)
    assert state.get_node("a")["port"] == 1 and state.applied_index == 5
    data = state.snapshot()
    other = RegistryState.open(str(tmp_path / "b.db"))
    other.restore(data, 5)
    assert other.state_hash() == state.state_hash()
    assert other.session_result("r1") == first[0]
    state.close()
    reopened = RegistryState.open(str(tmp_path / "a.db"))
    assert reopened.session_result("r1") == first[0]
    with pytest.raises(KeyError):
        reopened.session_result("nope")
    reopened.close()
    other.close()


async def test_real_clock_with_fsyncs_in_threads(tmp_path):
    """The production setting (io_in_thread, SQLite log with synchronous=FULL)
    on the real clock: not deterministic, so only a smoke test."""
    cfg = ConsensusConfig(io_in_thread=True, propose_timeout=5.0)
    ids = ["r1", "r2", "r3"]
    addr = {i: f"sim://{i}" for i in ids}
    net = SimNetwork(5, FaultModel(delay=(0.0, 0.001)))
    replicas = {}

    def main(rid):
        async def run(transport):
            spec = ReplicaSpec(id=rid, addresses=addr, voters=tuple(ids), config=cfg,
                               registry_path=str(tmp_path / f"{rid}.db"),
                               raft_path=str(tmp_path / f"{rid}-raft.db"))
            async with trio.open_nursery() as own:
                replicas[rid] = await own.start(run_replica, transport, spec)
                await trio.sleep_forever()
        return run

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            for rid in ids:
                await net.start_process(nursery, addr[rid], main(rid))
            while len(replicas) < len(ids):  # real clock: start-up takes what it takes
                await trio.sleep(0.01)
            for k in range(20):
                cmd = RegisterNode(node_id=f"n{k}", ipv6=f"fd10::{k + 1}", port=1, domain="d",
                                   at=T0, lease_deadline=T0)
                await replicas[ids[k % 3]].consensus.ask(Propose(cmd, f"w{k}"), timeout=10.0)
            await replicas["r2"].consensus.ask(ReadBarrier())
            assert replicas["r2"].actor.state.node_count() == 20
            nursery.cancel_scope.cancel()


async def test_a_raft_message_must_come_from_the_address_it_names(tmp_path, autojump_clock):
    """Replicas route to each other by the sender address in a Raft message.
    One that names another address than the link it came over is dropped,
    and so is one from a member id known at another address (here a trusted
    fourth process speaking for the leader both ways): no term change, no
    rerouting."""
    from trustnet.consensus.actor import RaftEnvelope
    from trustnet.consensus.messages import Heartbeat as RaftHeartbeat

    net = SimNetwork(3, FaultModel(delay=(0.001, 0.002)))
    async with trio.open_nursery() as nursery:
        replicas, addr, lead, follower = await _settled(nursery, net, tmp_path)
        term = replicas[follower].actor.core.term
        sent = trio.Event()

        async def other(system: ActorSystem) -> None:
            for sender in (addr[lead], "sim://other"):
                forged = RaftEnvelope(sender, RaftHeartbeat(term=term + 100, from_id=lead,
                                                            to_id=follower, commit=0))
                await system.ref("consensus", addr[follower]).tell(forged)
            sent.set()

        await net.start_system(nursery, "sim://other", other)
        await sent.wait()
        await trio.sleep(0.5)
        actor = replicas[follower].actor
        assert actor.core.term == term and actor.addresses[lead] == addr[lead]
        assert _leader(replicas) == lead
        nursery.cancel_scope.cancel()
