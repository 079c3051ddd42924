"""The simulated network (actors.simnet) carrying a real ActorSystem.

Every async test runs under pytest-trio's `autojump_clock`
(MockClock(autojump_threshold=0)): time only moves when every task is
blocked, so the timings asserted below are exact virtual seconds.
"""

from __future__ import annotations

import logging
import random

import pytest
import trio
import trio.testing

from actors import (Actor, ActorCrashed, ActorSystem, AskTimeout, ChildSpec, Refused, Supervisor,
                    Unreachable, message)
from actors.simnet import FaultModel, SimNetwork, SimTransport, seeded_trio_scheduler


@pytest.fixture(autouse=True)
def seeded_trio():
    """Seed trio's scheduler RNG (it shuffles the order of tasks that wake
    together) so each test here replays exactly. A sync fixture on purpose:
    pytest-trio starts the loop after sync fixtures are set up."""
    with seeded_trio_scheduler(0):
        yield


@message("simnet-test.ping")
class Ping:
    n: int


@message("simnet-test.pong")
class Pong:
    n: int


@message("simnet-test.note")
class Note:
    text: str


@message("simnet-test.members-only", trusted=True)
class MembersOnly:
    text: str


class Echo(Actor):
    """Answers Ping(n) with Pong(n) (after `slow` seconds); records Notes."""

    def __init__(self, slow: float = 0.0):
        self.slow = slow
        self.notes: list[tuple[float, str]] = []  # (arrival time, text)

    async def receive(self, msg):
        if isinstance(msg, (Note, MembersOnly)):
            self.notes.append((trio.current_time(), msg.text))
            return None
        if isinstance(msg, Ping):
            await trio.sleep(self.slow)
            return Pong(msg.n)
        return await super().receive(msg)


class Node:
    """One simulated process: an ActorSystem over the sim with an Echo named "echo".
    Each (re)start builds a fresh system and actor, as a real process would."""

    def __init__(self, address: str, slow: float = 0.0):
        self.address = address
        self.slow = slow
        self.system: ActorSystem
        self.echo: Echo
        self.starts = 0

    async def main(self, transport: SimTransport) -> None:
        self.starts += 1
        self.system = ActorSystem(transport=transport)
        self.echo = Echo(self.slow)
        async with trio.open_nursery() as nursery:
            await nursery.start(self.system.serve)
            await self.system.spawn(nursery, self.echo, "echo")
            await trio.sleep_forever()

    def echo_at(self, address: str):
        return self.system.ref("echo", address)


async def start(nursery, net: SimNetwork, *names: str, slow: float = 0.0) -> list[Node]:
    nodes = [Node(f"sim://{name}", slow) for name in names]
    for node in nodes:
        await net.start_process(nursery, node.address, node.main)
    return nodes


def texts(node: Node) -> list[str]:
    return [text for _, text in node.echo.notes]


# ------------------------------------------------------------------ basics

async def test_remote_tell_and_ask(autojump_clock):
    net = SimNetwork(seed=1, faults=FaultModel())
    async with trio.open_nursery() as nursery:
        a, b = await start(nursery, net, "a", "b")
        assert await a.echo_at(b.address).ask(Ping(7)) == Pong(7)
        await a.echo_at(b.address).tell(Note("hello"))
        await trio.sleep(0.001)
        assert texts(b) == ["hello"]
        assert trio.current_time() == pytest.approx(0.001)  # no delay configured
        kinds = [(e.kind, e.src, e.dst) for e in net.trace]
        assert kinds[:4] == [("send", a.address, b.address), ("deliver", a.address, b.address),
                             ("send", b.address, a.address), ("deliver", b.address, a.address)]
        assert net.trace[0].what == "ask#1 echo Ping(n=7)"
        nursery.cancel_scope.cancel()


class QuickEcho(Echo):
    """Answers Ping(n) with Pong(n + notes seen), inline when idle; refuses
    a negative n and crashes on 13, whichever way the ask came in."""

    inline = (Ping,)

    def __init__(self) -> None:
        super().__init__()
        self.inline_answers = 0

    def answer_now(self, msg: Ping) -> Pong:
        self.inline_answers += 1
        return self._pong(msg)

    async def receive(self, msg):
        return self._pong(msg) if isinstance(msg, Ping) else await super().receive(msg)

    def _pong(self, msg: Ping) -> Pong:
        if msg.n < 0:
            raise Refused("negative", "no negative pings")
        if msg.n == 13:
            raise RuntimeError("unlucky")
        return Pong(msg.n + len(self.notes))


async def test_a_remote_ask_is_answered_inline_by_an_idle_actor_and_in_order(autojump_clock):
    net = SimNetwork(seed=1, faults=FaultModel())
    instances: list[QuickEcho] = []

    def quick() -> QuickEcho:
        instances.append(QuickEcho())
        return instances[-1]

    async def server(transport: SimTransport) -> None:
        system = ActorSystem(transport=transport)
        async with trio.open_nursery() as nursery:
            await nursery.start(system.serve)
            await nursery.start(Supervisor(system, "sup", [ChildSpec("echo", quick)]).run)
            await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        [a] = await start(nursery, net, "a")
        await net.start_process(nursery, "sim://b", server)
        echo = a.echo_at("sim://b")
        assert await echo.ask(Ping(1)) == Pong(1)
        assert instances[0].inline_answers == 1
        # A tell then an ask on the same link: the ask must not overtake it.
        await echo.tell(Note("first"))
        assert await echo.ask(Ping(2)) == Pong(3)
        with pytest.raises(Refused) as info:
            await echo.ask(Ping(-1))
        assert info.value.code == "negative"
        await trio.testing.wait_all_tasks_blocked()
        answered = instances[0].inline_answers
        with pytest.raises(ActorCrashed):
            await echo.ask(Ping(13))
        assert instances[0].inline_answers == answered + 1  # it crashed inline
        assert await echo.ask(Ping(5)) == Pong(5)  # a new instance, no notes
        assert len(instances) == 2
        nursery.cancel_scope.cancel()


async def test_unregistered_address_and_unencodable_body_raise_at_send(autojump_clock):
    net = SimNetwork(seed=1, faults=FaultModel())
    async with trio.open_nursery() as nursery:
        a, b = await start(nursery, net, "a", "b")
        with pytest.raises(Unreachable):
            await a.echo_at("sim://nobody").tell(Note("x"))
        with pytest.raises(TypeError, match="not a wire message"):
            await a.echo_at(b.address).tell(object())
        nursery.cancel_scope.cancel()


def test_fault_model_is_validated():
    with pytest.raises(ValueError, match="drop"):
        FaultModel(drop=1.5)
    with pytest.raises(ValueError, match="delay"):
        FaultModel(delay=(0.2, 0.1))


# ------------------------------------------------------------------ faults

async def test_drop_all_makes_ask_time_out(autojump_clock):
    net = SimNetwork(seed=1, faults=FaultModel(drop=1.0))
    async with trio.open_nursery() as nursery:
        a, b = await start(nursery, net, "a", "b")
        with pytest.raises(AskTimeout):
            await a.echo_at(b.address).ask(Ping(1), timeout=2.0)
        assert trio.current_time() == pytest.approx(2.0)
        assert [(e.kind, e.why) for e in net.trace] == [("send", ""), ("drop", "fault")]
        nursery.cancel_scope.cancel()


async def test_duplicates_are_delivered_twice(autojump_clock):
    net = SimNetwork(seed=1, faults=FaultModel(duplicate=1.0))
    async with trio.open_nursery() as nursery:
        a, b = await start(nursery, net, "a", "b")
        await a.echo_at(b.address).tell(Note("twice"))
        # The ask is handled twice and answered twice; the late answer is ignored.
        assert await a.echo_at(b.address).ask(Ping(3)) == Pong(3)
        await trio.sleep(0.1)
        assert texts(b) == ["twice", "twice"]
        assert sum(e.kind == "dup" for e in net.trace) == 4  # note, ask, two replies
        nursery.cancel_scope.cancel()


async def test_delay_is_respected_and_links_stay_fifo(autojump_clock):
    net = SimNetwork(seed=3, faults=FaultModel(delay=(0.1, 0.3)))
    async with trio.open_nursery() as nursery:
        a, b = await start(nursery, net, "a", "b")
        t0 = trio.current_time()
        for i in range(20):
            await a.echo_at(b.address).tell(Note(str(i)))
        await trio.sleep(1.0)
        assert texts(b) == [str(i) for i in range(20)]  # FIFO without reorder
        delays = [t - t0 for t, _ in b.echo.notes]
        assert all(0.1 <= d <= 0.3 for d in delays)
        assert len(set(delays)) > 1

        t1 = trio.current_time()
        await a.echo_at(b.address).ask(Ping(1))
        assert 0.2 <= trio.current_time() - t1 <= 0.6  # there and back
        nursery.cancel_scope.cancel()


async def test_reorder_lets_frames_overtake(autojump_clock):
    net = SimNetwork(seed=3, faults=FaultModel(reorder=0.5, reorder_delay=0.1))
    async with trio.open_nursery() as nursery:
        a, b = await start(nursery, net, "a", "b")
        for i in range(20):
            await a.echo_at(b.address).tell(Note(f"{i:02}"))
        await trio.sleep(1.0)
        sent = [f"{i:02}" for i in range(20)]
        assert sorted(texts(b)) == sent and texts(b) != sent
        nursery.cancel_scope.cancel()


# -------------------------------------------------------------- partitions

async def test_one_way_partition_and_heal(autojump_clock):
    net = SimNetwork(seed=1, faults=FaultModel())
    async with trio.open_nursery() as nursery:
        a, b = await start(nursery, net, "a", "b")
        net.partition_one_way(a.address, b.address)
        await a.echo_at(b.address).tell(Note("a->b"))  # silently lost, no error
        await b.echo_at(a.address).tell(Note("b->a"))
        await trio.sleep(0.1)
        assert texts(b) == [] and texts(a) == ["b->a"]
        with pytest.raises(AskTimeout):  # the request is lost
            await a.echo_at(b.address).ask(Ping(1), timeout=1.0)
        with pytest.raises(AskTimeout):  # the request arrives, the reply is lost
            await b.echo_at(a.address).ask(Ping(2), timeout=1.0)
        assert any(e.kind == "drop" and e.why == "partition" for e in net.trace)

        net.heal()
        assert await a.echo_at(b.address).ask(Ping(3)) == Pong(3)
        nursery.cancel_scope.cancel()


async def test_partition_and_isolate(autojump_clock):
    net = SimNetwork(seed=1, faults=FaultModel())
    async with trio.open_nursery() as nursery:
        a, b, c = await start(nursery, net, "a", "b", "c")
        net.partition([a.address], [b.address, c.address])
        for src, dst in [(a, b), (b, a), (a, c), (b, c), (c, b)]:
            await src.echo_at(dst.address).tell(Note(f"{src.address}>{dst.address}"))
        await trio.sleep(0.1)
        assert (texts(a), texts(b), texts(c)) == ([], ["sim://c>sim://b"], ["sim://b>sim://c"])

        net.heal()
        net.isolate(c.address)
        with pytest.raises(AskTimeout):
            await b.echo_at(c.address).ask(Ping(1), timeout=0.5)
        assert await a.echo_at(b.address).ask(Ping(2)) == Pong(2)
        net.heal()
        assert await b.echo_at(c.address).ask(Ping(3)) == Pong(3)
        nursery.cancel_scope.cancel()


# ---------------------------------------------------------- crash, restart

async def test_crash_times_out_pending_asks_and_restart_serves_again(autojump_clock):
    net = SimNetwork(seed=1, faults=FaultModel())
    async with trio.open_nursery() as nursery:
        a, b = await start(nursery, net, "a", "b", slow=1.0)
        outcome = {}

        async def ask_b():
            try:
                outcome["reply"] = await a.echo_at(b.address).ask(Ping(1), timeout=3.0)
            except AskTimeout as exc:
                outcome["error"] = (exc, trio.current_time())

        nursery.start_soon(ask_b)
        await trio.sleep(0.5)  # b is busy with the ask
        net.crash(b.address)
        await a.echo_at(b.address).tell(Note("into the void"))  # no error: silent host
        await trio.sleep(3.0)
        assert "reply" not in outcome
        assert outcome["error"][1] == pytest.approx(3.0)  # by timeout, not earlier

        await net.restart(b.address)
        assert b.starts == 2
        assert await a.echo_at(b.address).ask(Ping(2)) == Pong(2)
        assert texts(b) == []  # the note sent while it was down is gone
        assert [e.kind for e in net.trace if e.kind in ("crash", "restart")] == ["crash", "restart"]
        nursery.cancel_scope.cancel()


async def test_frames_in_flight_to_a_crashed_process_are_lost(autojump_clock):
    net = SimNetwork(seed=1, faults=FaultModel(delay=(0.5, 0.5)))
    async with trio.open_nursery() as nursery:
        a, b = await start(nursery, net, "a", "b")
        await a.echo_at(b.address).tell(Note("in flight"))
        await trio.sleep(0.2)
        net.crash(b.address)
        await trio.sleep(0.1)
        await net.restart(b.address)  # up again before the frame arrives
        await trio.sleep(1.0)
        assert texts(b) == []
        assert [(e.kind, e.why) for e in net.trace if e.kind == "drop"] == [("drop", "down")]
        nursery.cancel_scope.cancel()


async def test_crash_with_closed_links_fails_pending_asks_at_once(autojump_clock):
    net = SimNetwork(seed=1, faults=FaultModel())
    async with trio.open_nursery() as nursery:
        a, b = await start(nursery, net, "a", "b", slow=1.0)

        async def crash_soon():
            await trio.sleep(0.5)
            net.crash(b.address, close_links=True)

        nursery.start_soon(crash_soon)
        with pytest.raises(Unreachable):
            await a.echo_at(b.address).ask(Ping(1), timeout=3.0)
        assert trio.current_time() == pytest.approx(0.5)
        nursery.cancel_scope.cancel()


# ----------------------------------------------------------------- garbage

async def test_an_untrusted_process_cannot_send_trusted_messages(autojump_clock, caplog):
    """Like the websocket transport without the shared secret: a process
    started trusted=False gets its open messages through, and its trusted
    ones are ProtocolErrors at the receiver."""
    caplog.set_level(logging.WARNING, logger="actors.simnet")
    net = SimNetwork(seed=1, faults=FaultModel())
    async with trio.open_nursery() as nursery:
        a, b = await start(nursery, net, "a", "b")
        stranger = Node("sim://stranger")
        await net.start_process(nursery, stranger.address, stranger.main, trusted=False)
        await a.echo_at(b.address).tell(MembersOnly("from a"))
        await stranger.echo_at(b.address).tell(Note("open"))
        await stranger.echo_at(b.address).tell(MembersOnly("from the stranger"))
        await trio.sleep(0.001)
        assert texts(b) == ["from a", "open"]
        assert [r.error for r in caplog.records if r.name == "actors.simnet"] == [
            "ProtocolError: message 'simnet-test.members-only' is only accepted on a trusted "
            "link (a peer that proved the shared secret)"]
        nursery.cancel_scope.cancel()


async def test_garbage_frame_is_logged_and_the_receiver_keeps_serving(autojump_clock, caplog):
    caplog.set_level(logging.WARNING, logger="actors.simnet")
    net = SimNetwork(seed=1, faults=FaultModel())
    async with trio.open_nursery() as nursery:
        a, b, c = await start(nursery, net, "a", "b", "c", slow=1.0)
        pending = {}

        async def b_asks_a():
            try:
                await b.echo_at(a.address).ask(Ping(1), timeout=5.0)
            except Unreachable as exc:
                pending["error"] = (exc, trio.current_time())

        nursery.start_soon(b_asks_a)
        await trio.sleep(0.5)
        for junk in [b"not json", b"[]", b'{"from": "x"}',
                     b'{"from":"sim://a/","to":"echo","kind":"tell","cid":null,'
                     b'"body":{"$t":"no.such.tag"}}']:
            net.inject_raw(a.address, b.address, junk)
        await trio.sleep(0.001)

        errors = [r for r in caplog.records if r.name == "actors.simnet"]
        assert len(errors) == 4
        assert all(r.peer == a.address and r.error.startswith("ProtocolError") for r in errors)
        # The link to the peer that sent garbage was dropped: b's ask to it fails now.
        assert pending["error"][1] == pytest.approx(0.5)
        # b keeps serving, the offender included.
        assert await c.echo_at(b.address).ask(Ping(2)) == Pong(2)
        assert await a.echo_at(b.address).ask(Ping(3)) == Pong(3)
        nursery.cancel_scope.cancel()


# ---------------------------------------------------------- reproducibility

CHAOS = FaultModel(drop=0.1, duplicate=0.05, delay=(0.001, 0.02), reorder=0.2, reorder_delay=0.03)
PROCS = [f"sim://p{i}" for i in range(5)]
MESSAGES_EACH = 60


def run_scenario(seed: int) -> list:
    """Five processes send a few hundred random tells and asks to each other
    under CHAOS, through a partition and a crash/restart; returns the trace."""

    async def main() -> list:
        net = SimNetwork(seed, CHAOS)
        drivers = {addr: random.Random(f"{seed}/{addr}") for addr in PROCS}

        def process(addr: str):
            async def run(transport: SimTransport) -> None:
                rng = drivers[addr]  # survives restarts, as a replayable input
                system = ActorSystem(transport=transport)
                async with trio.open_nursery() as nursery:
                    await nursery.start(system.serve)
                    await system.spawn(nursery, Echo(), "echo")
                    for i in range(MESSAGES_EACH):
                        await trio.sleep(rng.choice([0.0, 0.001, 0.01, 0.05]))
                        target = system.ref("echo", rng.choice([p for p in PROCS if p != addr]))
                        if rng.random() < 0.5:
                            target.tell_nowait(Note(f"{addr}:{i}"))
                        else:
                            try:
                                await target.ask(Ping(i), timeout=0.1)
                            except AskTimeout:
                                pass
                    await trio.sleep_forever()
            return run

        async with trio.open_nursery() as nursery:
            for addr in PROCS:
                await net.start_process(nursery, addr, process(addr))
            await trio.sleep(0.3013)
            net.partition(PROCS[:2], PROCS[2:])
            await trio.sleep(0.5)
            net.heal()
            net.crash(PROCS[3])
            await trio.sleep(0.2)
            await net.restart(PROCS[3])
            await trio.sleep(10.0)
            nursery.cancel_scope.cancel()
        return net.trace

    # Seeding trio's scheduler makes the order of tasks inside a process
    # repeatable too (see seeded_trio_scheduler).
    with seeded_trio_scheduler(seed):
        return trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_same_seed_same_trace_other_seed_other_trace():
    first = run_scenario(11)
    kinds = {k: sum(e.kind == k for e in first) for k in ("send", "deliver", "drop", "dup")}
    assert kinds["send"] > 400 and kinds["drop"] > 20 and kinds["dup"] > 5
    assert any(e.why == "partition" for e in first) and any(e.why == "down" for e in first)
    assert run_scenario(11) == first
    assert run_scenario(12) != first


async def test_a_letter_names_the_link_it_came_over(autojump_clock):
    """Letter.sender: the sending process's link address, None when local."""
    from actors import Letter

    class Senders(Actor):
        def __init__(self):
            self.seen: list[str | None] = []

        async def handle(self, letter: Letter) -> None:
            self.seen.append(letter.sender)
            letter.answer(None)

    net = SimNetwork(seed=1, faults=FaultModel())
    async with trio.open_nursery() as nursery:
        a, b = await start(nursery, net, "a", "b")
        senders = Senders()
        await b.system.spawn(nursery, senders, "senders")
        await a.system.ref("senders", b.address).ask(Note("remote"))
        await b.system.ref("senders").ask(Note("local"))
        assert senders.seen == [a.address, None]
        nursery.cancel_scope.cancel()
