"""RegistryActor: the one owner of the registry state, in an ActorSystem.

Time has two sources here, both under the test's control: the actor's
`clock` (wall-clock Unix seconds stamped into commands) is `FakeClock`,
which follows trio's MockClock (autojump) plus an offset the test can jump;
the actor's sweep and checkpoint loops sleep on trio's clock.
"""

from __future__ import annotations

import contextlib
import logging
from typing import AsyncIterator

import orjson
import pytest
import trio

from actors import ActorSystem, Letter, Reply
from trustnet.registry import messages as m
from trustnet.registry.actor import RegistryActor
from trustnet.registry.state import iso_utc as _iso
from trustnet.registry.commands import CheckpointLeases, Conflict, NotFound
from trustnet.registry.state import RegistryState

T0 = 1_769_774_400.0  # 2026-01-30T12:00:00Z
TTL = 30.0
CHECKPOINT = 20.0
SWEEP = 1.0


class FakeClock:
    """Unix time = T0 + trio's (mock) time + whatever the test jumped."""

    def __init__(self, base: float = T0):
        self.base = base
        self.offset = 0.0

    def __call__(self) -> float:
        return self.base + trio.current_time() + self.offset

    def jump(self, seconds: float) -> None:
        """Move the wall clock without letting trio time (and the loops) run."""
        self.offset += seconds


class Spy:
    """Counts RegistryState.apply_batch calls (each is one transaction, one fsync)."""

    def __init__(self, state: RegistryState, monkeypatch: pytest.MonkeyPatch):
        self.batches: list[list] = []
        self.unsynced: list[list] = []  # the batches committed without an fsync
        real = state.apply_batch

        def apply_batch(items, *, durable=True):
            self.batches.append([cmd for _, cmd in items])
            if not durable:
                self.unsynced.append(self.batches[-1])
            return real(items, durable=durable)

        monkeypatch.setattr(state, "apply_batch", apply_batch)

    def lease_checkpoints(self) -> list[CheckpointLeases]:
        return [cmd for batch in self.batches for cmd in batch
                if isinstance(cmd, CheckpointLeases)]


class Registry:
    """A running RegistryActor and the handles a test needs."""

    def __init__(self, system: ActorSystem, actor: RegistryActor, scope: trio.CancelScope):
        self.system, self.actor, self.scope = system, actor, scope
        self.ref = system.ref("registry")

    async def ask(self, msg):
        return await self.ref.ask(msg, timeout=30)

    async def register(self, node_id: str, ipv6: str, **kw):
        return await self.ask(m.Register(node_id=node_id, ipv6=ipv6, **kw))

    def stop(self) -> None:
        self.scope.cancel()


@contextlib.asynccontextmanager
async def running(state: RegistryState, clock: FakeClock, *, ttl: float = TTL,
                  checkpoint_interval: float = CHECKPOINT, sweep_interval: float = SWEEP,
                  system: ActorSystem | None = None, mailbox_size: int = 1000
                  ) -> AsyncIterator[Registry]:
    system = system or ActorSystem()
    actor = RegistryActor(state, ttl=ttl, checkpoint_interval=checkpoint_interval,
                          sweep_interval=sweep_interval, clock=clock)
    async with trio.open_nursery() as nursery:
        await system.spawn(nursery, actor, "registry", mailbox_size=mailbox_size)
        registry = Registry(system, actor, nursery.cancel_scope)
        yield registry
        nursery.cancel_scope.cancel()


@pytest.fixture
def db_path(tmp_path) -> str:
    return str(tmp_path / "registry.db")


@pytest.fixture
def state(db_path) -> RegistryState:
    state = RegistryState.open(db_path)
    yield state
    state.close()


@pytest.fixture
def clock() -> FakeClock:
    # Every test also takes `autojump_clock`: pytest-trio runs the test under
    # a Clock only when the test itself takes it as an argument.
    return FakeClock()


def stored_deadline(state: RegistryState, node_id: str) -> float | None:
    """The lease deadline on disk (what a restart or a new leader would see)."""
    return state.lease_table()[node_id][0]


def ipv6(i: int) -> str:
    return f"fd10:1234::{i:x}"


# ------------------------------------------------------------------ register


async def test_register_grants_a_lease_and_stores_the_node(state, clock, autojump_clock):
    async with running(state, clock) as reg:
        now = clock()
        answer = await reg.register("n1", ipv6(1), port=7000, domain="alpha")
        assert answer["created"] is True
        node = answer["node"]
        assert (node["id"], node["ipv6"], node["port"], node["domain"]) == \
            ("n1", ipv6(1), 7000, "alpha")
        assert node["lease_deadline"] == now + TTL
        assert reg.actor.leases.deadline("n1") == now + TTL
        assert stored_deadline(state, "n1") == now + TTL  # registration is durable
        assert state.applied_index == 1


async def test_register_defaults_port_and_domain(state, clock, autojump_clock):
    async with running(state, clock) as reg:
        node = (await reg.register("n1", ipv6(1)))["node"]
        assert node["port"] == m.DEFAULT_PORT == 9000
        assert node["domain"] == m.DEFAULT_DOMAIN
        assert [d["name"] for d in await reg.ask(m.ListDomains())] == [m.DEFAULT_DOMAIN]


async def test_reregister_updates_and_renews(state, clock, autojump_clock):
    async with running(state, clock) as reg:
        await reg.register("n1", ipv6(1))
        await trio.sleep(10)
        answer = await reg.register("n1", ipv6(2), port=9100)
        assert answer["created"] is False
        assert answer["node"]["ipv6"] == ipv6(2) and answer["node"]["port"] == 9100
        assert reg.actor.leases.deadline("n1") == clock() + TTL
        assert state.node_count() == 1


async def test_status_reports_ready(state, clock, autojump_clock):
    async with running(state, clock) as reg:
        await reg.register("n1", ipv6(1))
        status = await reg.ask(m.Status())
        assert status == {"ready": True, "nodes": 1, "applied_index": 1}


# ------------------------------------------------------------------ heartbeats


async def test_heartbeat_renews_in_memory_without_a_durable_write(
        state, clock, monkeypatch, autojump_clock):
    async with running(state, clock, checkpoint_interval=CHECKPOINT) as reg:
        await reg.register("n1", ipv6(1))
        registered_deadline = stored_deadline(state, "n1")
        index = state.applied_index
        spy = Spy(state, monkeypatch)

        for t in (5, 10, 15):  # all before the first checkpoint at 20
            await trio.sleep(5)
            answer = await reg.ask(m.Heartbeat("n1"))
            assert answer == {"node_id": "n1", "lease_deadline": clock() + TTL, "ttl": TTL}
            assert reg.actor.leases.deadline("n1") == T0 + t + TTL
            assert stored_deadline(state, "n1") == registered_deadline
            assert state.applied_index == index
        assert spy.batches == []

        # reads show the live lease, not the lagging disk copy
        node = await reg.ask(m.GetNode("n1"))
        assert node["lease_deadline"] == T0 + 15 + TTL
        assert node["last_heartbeat"] == "2026-01-30T12:00:15.000000Z"
        # and so do pages, decoded or as the JSON the HTTP API sends
        page = await reg.ask(m.ListNodes())
        assert page == {"nodes": [node], "next": None}
        assert orjson.loads(await reg.ask(m.ListNodes(encoded=True))) == page


async def test_checkpoint_writes_renewed_deadlines(state, clock, monkeypatch, autojump_clock):
    ttl = 100.0  # nobody expires during the test
    async with running(state, clock, ttl=ttl, checkpoint_interval=CHECKPOINT) as reg:
        spy = Spy(state, monkeypatch)
        for i in range(5):
            await reg.register(f"n{i}", ipv6(i + 1))
        await trio.sleep(CHECKPOINT + 0.5)
        # a registration stores its lease: nothing to checkpoint
        assert spy.lease_checkpoints() == []
        spy = Spy(state, monkeypatch)
        await trio.sleep(2)
        for i in range(3):  # n3 and n4 stay silent
            await reg.ask(m.Heartbeat(f"n{i}"))
        renewed = T0 + CHECKPOINT + 2.5 + ttl
        assert stored_deadline(state, "n0") != renewed
        index = state.applied_index

        await trio.sleep(CHECKPOINT)  # the next checkpoint
        for i in range(3):
            assert stored_deadline(state, f"n{i}") == renewed
            assert state.lease_table()[f"n{i}"][1] == T0 + CHECKPOINT + 2.5
        for i in (3, 4):
            assert stored_deadline(state, f"n{i}") == T0 + ttl
        # one command for all of them, and nothing when nothing changed
        # (other checkpointed data, e.g. reputation, may travel in other commands)
        [checkpoint] = spy.lease_checkpoints()
        assert [e.node_id for e in checkpoint.entries] == ["n0", "n1", "n2"]
        assert state.applied_index == index + len(spy.batches)
        # soft state: checkpoints (leases, scores) are committed without an fsync
        assert spy.unsynced == spy.batches and spy.batches
        await trio.sleep(CHECKPOINT)
        assert len(spy.lease_checkpoints()) == 1


async def test_stopping_the_actor_checkpoints_pending_renewals(state, clock, autojump_clock):
    async with running(state, clock, checkpoint_interval=1000) as reg:
        await reg.register("n1", ipv6(1))
        await trio.sleep(7)
        await reg.ask(m.Heartbeat("n1"))
        assert stored_deadline(state, "n1") == T0 + TTL
        reg.stop()
    assert stored_deadline(state, "n1") == T0 + 7 + TTL


async def test_heartbeat_of_an_unknown_node_is_not_found(state, clock, autojump_clock):
    async with running(state, clock) as reg:
        with pytest.raises(NotFound) as err:
            await reg.ask(m.Heartbeat("ghost"))
        assert err.value.code == "not_found"
        assert "register" in err.value.message
        assert "ghost" not in reg.actor.leases


async def test_heartbeats_keep_a_node_alive_past_many_ttls(state, clock, autojump_clock):
    async with running(state, clock) as reg:
        await reg.register("n1", ipv6(1))
        for _ in range(20):  # 20 * 10 s = 200 s, far past the 30 s lease
            await trio.sleep(10)
            await reg.ask(m.Heartbeat("n1"))
        assert (await reg.ask(m.GetNode("n1")))["id"] == "n1"


# ------------------------------------------------------------------ expiry


def expired_records(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.getMessage() == "node expired"]


async def test_expiry_removes_the_node_and_it_must_register_again(
        state, clock, caplog, autojump_clock):
    caplog.set_level(logging.INFO, logger="trustnet.registry")
    async with running(state, clock) as reg:
        await reg.register("n1", ipv6(1))
        await reg.register("n2", ipv6(2))
        await trio.sleep(TTL - 1)
        await reg.ask(m.Heartbeat("n2"))
        assert expired_records(caplog) == []

        await trio.sleep(1 + SWEEP)  # n1's deadline passed and a sweep ran
        assert [r.node_id for r in expired_records(caplog)] == ["n1"]
        record = expired_records(caplog)[0]
        assert record.levelno == logging.ERROR
        assert record.name == "trustnet.registry"
        with pytest.raises(NotFound):
            state.get_node("n1")
        assert "n1" not in reg.actor.leases
        assert state.get_node("n2")["id"] == "n2"

        with pytest.raises(NotFound):
            await reg.ask(m.Heartbeat("n1"))
        with pytest.raises(NotFound):
            await reg.ask(m.GetNode("n1"))

        again = await reg.register("n1", ipv6(1))
        assert again["created"] is True
        assert (await reg.ask(m.Heartbeat("n1")))["node_id"] == "n1"


async def test_expiry_of_many_nodes_is_one_command(
        state, clock, caplog, monkeypatch, autojump_clock):
    caplog.set_level(logging.INFO, logger="trustnet.registry")
    async with running(state, clock, checkpoint_interval=1000) as reg:
        async with trio.open_nursery() as nursery:
            for i in range(50):
                nursery.start_soon(reg.register, f"n{i:02d}", ipv6(i + 1))
        spy = Spy(state, monkeypatch)
        await trio.sleep(TTL + SWEEP)
        assert state.node_count() == 0
        assert len(spy.batches) == 1
        assert sorted(r.node_id for r in expired_records(caplog)) == \
            [f"n{i:02d}" for i in range(50)]


async def test_expiry_cascades_to_peer_links(state, clock, autojump_clock):
    async with running(state, clock) as reg:
        await reg.register("a", ipv6(1))
        await reg.register("b", ipv6(2))
        await reg.ask(m.AddPeerReq("a", "b"))
        for _ in range(4):
            await trio.sleep(TTL / 2)
            await reg.ask(m.Heartbeat("b"))
        assert await reg.ask(m.ListPeers()) == []
        with pytest.raises(NotFound):
            await reg.ask(m.ListPeers("a"))


async def test_heartbeat_after_the_deadline_but_before_the_sweep_is_refused(
        state, clock, caplog, autojump_clock):
    """A lapsed lease is not brought back to life by a heartbeat the sweep beat."""
    caplog.set_level(logging.INFO, logger="trustnet.registry")
    async with running(state, clock, sweep_interval=10_000) as reg:
        await reg.register("n1", ipv6(1))
        # at the deadline (both clocks: a jump of the wall clock alone is a
        # step of the system clock, which moves the deadlines), no sweep yet
        autojump_clock.jump(TTL)
        with pytest.raises(NotFound):
            await reg.ask(m.Heartbeat("n1"))
        assert [r.node_id for r in expired_records(caplog)] == ["n1"]
        with pytest.raises(NotFound):
            state.get_node("n1")
        assert (await reg.register("n1", ipv6(1)))["created"] is True


async def test_deregistered_node_holds_no_lease(state, clock, caplog, autojump_clock):
    caplog.set_level(logging.INFO, logger="trustnet.registry")
    async with running(state, clock) as reg:
        await reg.register("n1", ipv6(1))
        removed = await reg.ask(m.Deregister("n1"))
        assert removed["id"] == "n1"
        assert "n1" not in reg.actor.leases
        with pytest.raises(NotFound):
            await reg.ask(m.Heartbeat("n1"))
        with pytest.raises(NotFound):
            await reg.ask(m.Deregister("n1"))
        await trio.sleep(TTL * 2)
        assert expired_records(caplog) == []


# ------------------------------------------------------------------ restart


async def test_restart_gives_every_lease_at_least_one_ttl_of_grace(
        state, clock, caplog, autojump_clock):
    caplog.set_level(logging.INFO, logger="trustnet.registry")
    async with running(state, clock) as reg:
        for i in range(10):
            await reg.register(f"n{i}", ipv6(i + 1))
        await trio.sleep(TTL / 2)
        await reg.ask(m.Heartbeat("n0"))
        reg.stop()

    clock.jump(1000)  # the registry was down far longer than any lease
    restarted_at = clock()
    async with running(state, clock) as reg:
        for i in range(10):
            assert reg.actor.leases.deadline(f"n{i}") >= restarted_at + TTL
        await trio.sleep(TTL - SWEEP)
        assert state.node_count() == 10
        assert expired_records(caplog) == []
        await reg.ask(m.Heartbeat("n3"))  # still registered: no re-registration needed

        await trio.sleep(2 * SWEEP)  # one TTL after the restart, the silent ones go
        assert [n["id"] for n in (await reg.ask(m.ListNodes()))["nodes"]] == ["n3"]
        assert len(expired_records(caplog)) == 9


async def test_restart_shows_the_last_real_heartbeat_and_counts_none_late(
        state, clock, autojump_clock):
    async with running(state, clock) as reg:
        await reg.register("n1", ipv6(1))
        await trio.sleep(5)
        await reg.ask(m.Heartbeat("n1"))
        reg.stop()
    clock.jump(1000)  # down for many heartbeat intervals
    async with running(state, clock) as reg:
        assert (await reg.ask(m.GetNode("n1")))["last_heartbeat"] == _iso(T0 + 5)
        assert (await reg.ask(m.ListNodes()))["nodes"][0]["last_heartbeat"] == _iso(T0 + 5)
        await trio.sleep(1)
        await reg.ask(m.Heartbeat("n1"))  # on time: the gap was the registry's
        breakdown = await reg.ask(m.ReputationOf("n1"))
        assert breakdown["heartbeats"]["late"] == 0, breakdown


async def test_restart_never_shortens_a_lease(state, clock, autojump_clock):
    async with running(state, clock, ttl=100) as reg:
        await reg.register("long", ipv6(1))  # deadline T0 + 100 on disk
        reg.stop()
    async with running(state, clock, ttl=TTL) as reg:
        assert reg.actor.leases.deadline("long") == T0 + 100
        await trio.sleep(TTL + SWEEP)
        assert state.get_node("long")["id"] == "long"


async def test_restart_keeps_the_state_and_the_applied_index(db_path, clock, autojump_clock):
    state = RegistryState.open(db_path)
    async with running(state, clock) as reg:
        await reg.register("n1", ipv6(1), domain="alpha")
        await reg.register("n2", ipv6(2), domain="beta")
        await reg.ask(m.AddPeerReq("n1", "n2"))
        reg.stop()
    before = state.state_hash(), state.applied_index  # after the final checkpoint
    state.close()

    state = RegistryState.open(db_path)
    try:
        assert (state.state_hash(), state.applied_index) == before
        async with running(state, clock) as reg:
            assert [n["id"] for n in (await reg.ask(m.ListNodes()))["nodes"]] == ["n1", "n2"]
            assert len(await reg.ask(m.ListPeers("n1"))) == 1
            assert (await reg.register("n1", ipv6(1), domain="alpha"))["created"] is False
    finally:
        state.close()


# ------------------------------------------------------------------ batches


async def test_concurrent_writes_are_all_answered_and_applied_in_few_batches(
        state, clock, monkeypatch, autojump_clock):
    spy = Spy(state, monkeypatch)
    answers: dict[str, dict] = {}
    async with running(state, clock, checkpoint_interval=1000) as reg:
        async def one(i: int) -> None:
            answers[f"n{i:03d}"] = await reg.register(f"n{i:03d}", ipv6(i + 1),
                                                      domain=f"d{i % 4}")

        async with trio.open_nursery() as nursery:
            for i in range(200):
                nursery.start_soon(one, i)

        assert len(answers) == 200
        assert all(a["created"] and a["node"]["id"] == n for n, a in answers.items())
        assert state.node_count() == 200
        assert state.applied_index == 200
        assert sum(len(b) for b in spy.batches) == 200
        assert len(spy.batches) < 50, [len(b) for b in spy.batches]
        assert spy.unsynced == []  # a write is answered once it is on disk
        page = await reg.ask(m.ListNodes(domain="d1", limit=1000))
        assert len(page["nodes"]) == 50


def enqueue(reg: Registry, *msgs) -> list[Reply]:
    """Queue letters without yielding, so the actor finds them all at once."""
    box = reg.system.mailbox_of("registry")
    replies = []
    for msg in msgs:
        reply = Reply()
        box.put_nowait(Letter(msg, reply))
        replies.append(reply)
    return replies


async def outcome(reply: Reply):
    """The answer or the error of a queued ask; a lost letter fails, not hangs."""
    try:
        with trio.fail_after(30):
            return await reply.wait()
    except trio.TooSlowError:
        raise AssertionError("the actor never answered this letter") from None
    except Exception as exc:  # noqa: BLE001
        return exc


async def test_a_refused_write_fails_only_its_own_ask(state, clock, monkeypatch, autojump_clock):
    async with running(state, clock, checkpoint_interval=1000) as reg:
        await reg.register("holder", ipv6(1))
        await reg.ask(m.CreateDomainReq("taken"))
        spy = Spy(state, monkeypatch)
        replies = enqueue(
            reg,
            m.Register("a", ipv6(2)),
            m.Register("thief", ipv6(1)),  # ipv6 held by another node: 409
            m.Register("b", ipv6(3)),
            m.CreateDomainReq("taken"),  # exists: 409
            m.Deregister("ghost"),  # unknown: 404
            m.AddPeerReq("a", "b"),  # sees a and b from earlier in the same batch
        )
        results = [await outcome(r) for r in replies]
        assert [len(b) for b in spy.batches] == [6]  # one transaction

        assert results[0]["node"]["id"] == "a"
        assert isinstance(results[1], Conflict) and results[1].code == "ipv6_taken"
        assert results[2]["node"]["id"] == "b"
        assert isinstance(results[3], Conflict) and results[3].code == "domain_exists"
        assert isinstance(results[4], NotFound)
        assert (results[5]["node_a"], results[5]["node_b"]) == ("a", "b")

        ids = [n["id"] for n in (await reg.ask(m.ListNodes()))["nodes"]]
        assert ids == ["a", "b", "holder"]
        assert "thief" not in reg.actor.leases
        assert state.get_node("holder")["ipv6"] == ipv6(1)


async def test_reads_queued_after_writes_see_them(state, clock, monkeypatch, autojump_clock):
    async with running(state, clock) as reg:
        spy = Spy(state, monkeypatch)
        replies = enqueue(
            reg,
            m.Register("a", ipv6(1), domain="alpha"),
            m.Register("b", ipv6(2), domain="alpha"),
            m.ListNodes(domain="alpha"),
            m.GetNode("b"),
            m.Register("c", ipv6(3), domain="alpha"),
            m.ListNodes(domain="alpha"),
            m.Heartbeat("c"),
            m.ListDomains(),
        )
        results = [await outcome(r) for r in replies]
        assert [n["id"] for n in results[2]["nodes"]] == ["a", "b"]
        assert results[3]["id"] == "b"
        assert [n["id"] for n in results[5]["nodes"]] == ["a", "b", "c"]
        assert results[6]["node_id"] == "c"
        assert [d["name"] for d in results[7]] == ["alpha"]
        assert [len(b) for b in spy.batches] == [2, 1]


async def test_reads_after_writes_see_them(state, clock, autojump_clock):
    async with running(state, clock) as reg:
        await reg.register("a", ipv6(1), domain="alpha")
        await reg.ask(m.CreateDomainReq("beta"))
        await reg.register("b", ipv6(2), domain="beta")
        await reg.ask(m.AddPeerReq("b", "a"))
        assert (await reg.ask(m.GetNode("a")))["domain"] == "alpha"
        assert [d["name"] for d in await reg.ask(m.ListDomains())] == ["alpha", "beta"]
        assert [n["id"] for n in (await reg.ask(m.ListNodes(domain="beta")))["nodes"]] == ["b"]
        assert [(p["node_a"], p["node_b"]) for p in await reg.ask(m.ListPeers("b"))] == \
            [("a", "b")]
        await reg.ask(m.RemovePeerReq("a", "b"))
        assert await reg.ask(m.ListPeers()) == []
        await reg.ask(m.Deregister("a"))
        with pytest.raises(NotFound):
            await reg.ask(m.GetNode("a"))


async def test_pages_follow_the_cursor(state, clock, autojump_clock):
    async with running(state, clock) as reg:
        async with trio.open_nursery() as nursery:
            for i in range(25):
                nursery.start_soon(reg.register, f"n{i:02d}", ipv6(i + 1))
        seen, after = [], None
        for _ in range(10):  # a cursor that never ends must fail, not hang
            page = await reg.ask(m.ListNodes(limit=10, after=after))
            seen += [n["id"] for n in page["nodes"]]
            after = page["next"]
            if after is None:
                break
        assert seen == [f"n{i:02d}" for i in range(25)]


def test_iso_timestamps_match_datetime_to_the_microsecond():
    """_iso formats per second from a cache and rounds the microseconds itself:
    it must agree with datetime everywhere, the carries included."""
    import random
    from datetime import UTC, datetime

    rng = random.Random(7)
    values = ([rng.uniform(0, 4e9) for _ in range(20_000)]
              + [k + 0.9999995 for k in range(2_000)] + [k + 5e-7 for k in range(2_000)]
              + [k * 1.5e-6 for k in range(2_000)] + [0.0, 1e-7, 999_999.9999999])
    for t in values:
        want = datetime.fromtimestamp(t, UTC).isoformat(timespec="microseconds")[:-6] + "Z"
        assert _iso(t) == want, t
    assert _iso(None) is None

