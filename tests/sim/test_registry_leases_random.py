"""Seeded random faults against the replicated registry's leases (MockClock).

Three replicas (ConsensusActor + RegistryActor, Raft logs on disk) on the
simulated network; nodes that heartbeat every interval through a random
replica, as real nodes do, and nodes that fall silent at random times; and,
every half TTL or so, one of: a leadership transfer, a follower's or the
leader's crash and restart, a step of every replica's clock, an outage of
the whole group. Checked: a node that keeps heartbeating is never expired
(the registry never answers it "not_found"), and every silent node is gone
once things have been quiet for a while. Every failure names its seed and
prints the run's events; a seed replays identically (seeded network and
Raft timers, MockClock).

Written in session 10; its first 200 seeds found three ways the leases went
wrong, all fixed: after two outages in a row (or one, then a leadership
transfer) the nodes' last heartbeats from before the first outage bounded
their grace, and live nodes were expired; a deadline stored before a step
back of the clock was adopted by a new leader as it was (far ahead); and a
row whose stored deadline was such could never be expired (an expiry only
removes rows whose stored deadline has passed).
"""

from __future__ import annotations

import random

import pytest
import trio

from actors import ActorError, Refused
from actors.simnet import FaultModel, SimNetwork
from trustnet.consensus.actor import TransferLeadership
from trustnet.registry import messages as m

from test_registry_leases_sim import HB, TTL, _Clock, start_group

LIVE, SILENT = ["live-1", "live-2", "live-3"], ["silent-1", "silent-2", "silent-3"]
EVENTS = ("transfer", "crash_follower", "crash_leader", "clock_step", "outage")


async def run_seed(seed: int, tmp_path) -> list[str]:
    """The trace of one run; raises AssertionError naming the seed."""
    rng = random.Random(seed)
    wall = _Clock()
    net = SimNetwork(seed, FaultModel(delay=(0.001, 0.003)))
    trace: list[str] = []
    wrong: list[str] = []
    down: set[str] = set()  # replicas crashed and not yet restarted

    def note(what: str) -> None:
        trace.append(f"{trio.current_time():8.3f} {what}")

    async with trio.open_nursery() as nursery:
        g = await start_group(nursery, net, tmp_path, wall=wall, seed=seed)
        for i, n in enumerate(LIVE + SILENT, 1):
            await g.ask(g.leader(), m.Register(node_id=n, ipv6=f"fd10::{i:x}", port=7000))
        silent_from = {n: trio.current_time() + rng.uniform(0, 2 * TTL) for n in SILENT}

        async def node(name: str) -> None:
            while True:
                if name in silent_from and trio.current_time() >= silent_from[name]:
                    return
                up = sorted(set(g.replicas) - down)
                if up:
                    rid = rng.choice(up)
                    try:
                        await g.ask(rid, m.Heartbeat(name), timeout=HB)
                    except Refused as exc:
                        if exc.code == "not_found":
                            wrong.append(f"{name} told not_found by {rid} at "
                                         f"{trio.current_time():.3f}")
                            lead = g.leader()
                            held = g.regs[lead].leases.deadline(name) if lead else None
                            note(f"!! {name} not_found by {rid} ({exc.message}); the "
                                 f"leader {lead} holds its lease to {held}, now {wall():.3f}")
                            await g.ask(rid, m.Register(node_id=name,
                                                        ipv6=f"fd10::{(LIVE + SILENT).index(name) + 1:x}",
                                                        port=7000), timeout=HB)
                    except ActorError:
                        pass  # no leader for a moment, a replica down: a node retries
                await trio.sleep(HB)

        for n in LIVE + SILENT:
            nursery.start_soon(node, n)

        for _ in range(8):
            await trio.sleep(rng.uniform(0.3, 0.7) * TTL)
            kind = rng.choice(EVENTS)
            lead = g.leader()
            if kind == "transfer" and lead is not None:
                note(f"transfer from {lead}")
                try:
                    await g.replicas[lead].system.ref("consensus").ask(TransferLeadership(), timeout=2)
                except ActorError:
                    pass
            elif kind in ("crash_follower", "crash_leader"):
                others = [r for r in sorted(g.replicas) if r != lead]
                victim = lead if kind == "crash_leader" and lead else rng.choice(others)
                note(f"crash {victim}")
                down.add(victim)
                net.crash(g.addr[victim])
                await trio.sleep(rng.uniform(0.2, 1.5) * TTL)
                await net.restart(g.addr[victim])
                down.discard(victim)
                note(f"restart {victim}")
            elif kind == "clock_step":
                step = rng.choice([-1, 1]) * rng.uniform(2, 20) * TTL
                wall.offset += step
                note(f"clock step {step:+.1f}")
            elif kind == "outage":
                note("outage")
                down.update(g.replicas)
                for rid in sorted(g.replicas):
                    net.crash(g.addr[rid])
                await trio.sleep(rng.uniform(1, 6) * TTL)
                for rid in sorted(g.replicas):
                    await net.restart(g.addr[rid])
                down.clear()
                note("back")
        await trio.sleep(4 * TTL)  # quiet: every silent node's time is up
        listed = {n for n in SILENT if any(g.has_row(r, n) for r in g.replicas if r not in down)}
        lead = g.leader()
        missing = [n for n in LIVE if lead is None or not g.has_row(lead, n)]
        nursery.cancel_scope.cancel()
    problems = wrong + [f"silent {n} still listed" for n in sorted(listed)] + [
        f"live {n} not listed on the leader" for n in missing]
    assert not problems, f"seed {seed}: {problems}\n" + "\n".join(trace)
    return trace


# 74 and 124: a row stored before every clock stepped back, which no expiry
# could remove (found by this test, 500 seeds run when it was written).
@pytest.mark.parametrize("seed", [*range(12), 74, 124])
async def test_live_nodes_stay_and_silent_ones_go_through_random_faults(
        seed, tmp_path, autojump_clock):
    await run_seed(seed, tmp_path)
