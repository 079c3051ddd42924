"""The actor kernel: tell/ask, replies, timeouts, crashes, mailboxes, stopping.

Everything time-related runs on trio's MockClock (the `autojump_clock`
fixture), so timeouts are instant and nothing asserts on wall-clock time.
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing

from actors import (
    Actor,
    ActorCrashed,
    ActorNotFound,
    ActorStopped,
    ActorSystem,
    AskTimeout,
    ChildSpec,
    MailboxFull,
    Refused,
    Restart,
    Supervisor,
    UseMailbox,
)

# A test must never hang: every scenario runs under this (mock-time) bound.
BOUND = 60


class Worker(Actor):
    """Does what its letters say, and records its life in `events`."""

    def __init__(self, name: str, events: list, generation: int = 1):
        self.name = name
        self.events = events
        self.generation = generation
        self.count = 0

    async def on_start(self) -> None:
        self.events.append(("start", self.name, self.generation))

    async def on_stop(self) -> None:
        self.events.append(("stop", self.name, self.generation))

    async def receive(self, msg: Any) -> Any:
        match msg:
            case "ping":
                return ("pong", self.generation)
            case "inc":
                self.count += 1
                return None
            case "count":
                return self.count
            case "crash":
                raise RuntimeError(f"{self.name} crashed on purpose")
            case "refuse":
                raise Refused("nope", "refused on purpose", {"why": "test"})
            case "exit":
                self.stop()
                return "bye"
            case "exit_then_await":
                self.stop()
                await trio.sleep(1)  # stop() must not cut the current letter short
                return "bye later"
            case ("wait", event):
                await event.wait()
                return "waited"
            case ("wait_then_crash", event):
                await event.wait()
                raise RuntimeError("crashed after waiting")
            case "hang":
                await trio.sleep_forever()
        return await super().receive(msg)


def factory(name: str, events: list, cls: type[Worker] = Worker, **kw):
    """A ChildSpec start function that numbers the instances it makes."""
    generation = 0

    def start() -> Worker:
        nonlocal generation
        generation += 1
        return cls(name, events, generation, **kw)

    return start


@asynccontextmanager
async def supervised(system: ActorSystem, *specs: ChildSpec, **kw):
    sup = Supervisor(system, "sup", list(specs), **kw)
    with trio.fail_after(BOUND):
        async with trio.open_nursery() as nursery:
            await nursery.start(sup.run)
            yield sup
            nursery.cancel_scope.cancel()


def spec(name: str, events: list, restart: Restart = Restart.PERMANENT, **kw) -> ChildSpec:
    return ChildSpec(name, factory(name, events), restart, **kw)


# ----------------------------------------------------------------- tell / ask

async def test_tell_is_handled_in_order_before_a_later_ask(autojump_clock):
    system, events = ActorSystem(), []
    async with supervised(system, spec("w", events)):
        ref = system.ref("w")
        for _ in range(3):
            await ref.tell("inc")
        ref.tell_nowait("inc")
        assert await ref.ask("count") == 4
        assert await ref.ask("ping") == ("pong", 1)


async def test_ask_timeout_raises_a_clear_askTimeout(autojump_clock):
    system, events = ActorSystem(), []
    async with supervised(system, spec("w", events)):
        before = trio.current_time()
        with pytest.raises(AskTimeout) as info:
            await system.ref("w").ask("hang", timeout=2.5)
        assert trio.current_time() - before == pytest.approx(2.5)
        text = str(info.value)
        assert "'w'" in text and "str" in text and "2.5s" in text
        assert isinstance(info.value, TimeoutError)  # catchable as the builtin too


async def test_ask_timeout_applies_while_waiting_for_mailbox_space(autojump_clock):
    system, events = ActorSystem(), []
    gate = trio.Event()
    async with supervised(system, spec("w", events, mailbox_size=1)):
        ref = system.ref("w")
        await ref.tell(("wait", gate))  # taken by the actor, which now waits
        await ref.tell("inc")  # fills the one slot
        with pytest.raises(AskTimeout):
            await ref.ask("ping", timeout=1)
        gate.set()
        assert await ref.ask("count") == 1


async def test_crash_fails_the_inflight_ask_and_those_queued_before_it(autojump_clock):
    system, events = ActorSystem(), []
    gate = trio.Event()
    outcomes: dict[str, Any] = {}

    async def ask(ref, key, msg):
        try:
            outcomes[key] = await ref.ask(msg, timeout=BOUND)
        except Exception as exc:
            outcomes[key] = exc

    async with supervised(system, spec("w", events)):
        ref = system.ref("w")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ask, ref, "inflight", ("wait_then_crash", gate))
            await trio.testing.wait_all_tasks_blocked()
            for i in range(3):
                nursery.start_soon(ask, ref, f"queued{i}", "ping")
            await trio.testing.wait_all_tasks_blocked()
            gate.set()
        assert set(outcomes) == {"inflight", "queued0", "queued1", "queued2"}
        for key, outcome in outcomes.items():
            assert isinstance(outcome, ActorCrashed), (key, outcome)
        assert "'w'" in str(outcomes["inflight"])
        # A letter sent after the crash reaches the restarted instance.
        assert await ref.ask("ping") == ("pong", 2)


async def test_letter_told_after_crash_reaches_the_restarted_instance(autojump_clock):
    system, events = ActorSystem(), []
    async with supervised(system, spec("w", events)):
        ref = system.ref("w")
        with pytest.raises(ActorCrashed):
            await ref.ask("crash")
        await ref.tell("inc")  # possibly before the restart finished: it waits
        assert await ref.ask("count") == 1
        assert await ref.ask("ping") == ("pong", 2)


async def test_a_crash_fails_asks_the_actor_was_answering_later(autojump_clock):
    """An actor may keep a letter and answer it later; a crash must not strand it."""

    class Deferring(Worker):
        async def handle(self, letter):
            if letter.msg == "later":
                self.kept = letter  # answered by some future event
                return
            await super().handle(letter)

    system, events = ActorSystem(), []
    sp = ChildSpec("d", factory("d", events, Deferring))
    async with supervised(system, sp):
        ref = system.ref("d")
        async with trio.open_nursery() as nursery:
            async def later():
                with pytest.raises(ActorCrashed):
                    await ref.ask("later", timeout=BOUND)
            nursery.start_soon(later)
            await trio.testing.wait_all_tasks_blocked()
            before = trio.current_time()
            with pytest.raises(ActorCrashed):
                await ref.ask("crash")
        assert trio.current_time() == before  # failed at once, not by a timeout


async def test_unsupervised_actor_crash_fails_asks_and_reaches_its_nursery(autojump_clock):
    system, events = ActorSystem(), []
    gate = trio.Event()
    with pytest.RaisesGroup(pytest.RaisesExc(RuntimeError, match="after waiting")):
        async with trio.open_nursery() as nursery:
            ref = await system.spawn(nursery, Worker("w", events), "w")
            outcome = []

            async def ask():
                try:
                    await ref.ask(("wait_then_crash", gate))
                except ActorCrashed as exc:
                    outcome.append(exc)

            nursery.start_soon(ask)
            await trio.testing.wait_all_tasks_blocked()
            gate.set()
            await trio.sleep_forever()
    assert len(outcome) == 1
    with pytest.raises(ActorNotFound):
        await ref.ask("ping")


async def test_spawn_refuses_a_name_in_use(autojump_clock):
    system, events = ActorSystem(), []
    async with trio.open_nursery() as nursery:
        await system.spawn(nursery, Worker("w", events), "w")
        with pytest.raises(ValueError, match="'w'"):
            await system.spawn(nursery, Worker("w", events), "w")
        assert await system.ref("w").ask("ping") == ("pong", 1)
        nursery.cancel_scope.cancel()


async def test_spawn_raises_the_start_error_itself_not_a_group(autojump_clock):
    class BadStart(Actor):
        async def on_start(self):
            raise KeyError("no config")

    system = ActorSystem()
    async with trio.open_nursery() as nursery:
        with pytest.raises(KeyError, match="no config"):
            await system.spawn(nursery, BadStart(), "bad")
    with pytest.raises(ActorNotFound):
        system.ref("bad").tell_nowait("x")


async def test_unknown_name_is_actorNotFound(autojump_clock):
    system = ActorSystem()
    ref = system.ref("nobody")
    with pytest.raises(ActorNotFound, match="'nobody'"):
        await ref.ask("ping")
    with pytest.raises(ActorNotFound):
        await ref.tell("ping")
    with pytest.raises(ActorNotFound):
        ref.tell_nowait("ping")


async def test_stopped_temporary_child_is_gone(autojump_clock):
    system, events = ActorSystem(), []
    async with supervised(system, spec("t", events, Restart.TEMPORARY)):
        ref = system.ref("t")
        assert await ref.ask("exit") == "bye"
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises((ActorNotFound, ActorStopped)):
            await ref.ask("ping")
        with pytest.raises((ActorNotFound, ActorStopped)):
            await ref.tell("ping")


async def test_asks_queued_when_an_actor_stops_for_good_get_actorStopped(autojump_clock):
    system, events = ActorSystem(), []
    gate = trio.Event()
    outcomes = []
    async with supervised(system, spec("t", events, Restart.TEMPORARY)) as sup:
        ref = system.ref("t")

        async def ask(msg):
            try:
                outcomes.append(await ref.ask(msg))
            except Exception as exc:
                outcomes.append(exc)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ask, ("wait", gate))
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(ask, "ping")
            nursery.start_soon(ask, "ping")
            await trio.testing.wait_all_tasks_blocked()
            await sup.stop_child("t")
    assert len(outcomes) == 3
    assert all(isinstance(o, ActorStopped) for o in outcomes), outcomes
    assert ("stop", "t", 1) in events


# ------------------------------------------------------------------ mailboxes

async def test_full_mailbox_tell_nowait_fails_fast_and_tell_waits(autojump_clock):
    system, events = ActorSystem(), []
    gate = trio.Event()
    async with supervised(system, spec("w", events, mailbox_size=2)):
        ref = system.ref("w")
        await ref.tell(("wait", gate))  # the actor takes it and blocks
        await trio.testing.wait_all_tasks_blocked()
        ref.tell_nowait("inc")
        ref.tell_nowait("inc")
        with pytest.raises(MailboxFull, match=r"'w'.*2 letters"):
            ref.tell_nowait("inc")

        told = trio.Event()

        async def blocked_tell():
            await ref.tell("inc")  # backpressure: waits for space
            told.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(blocked_tell)
            await trio.sleep(10)
            assert not told.is_set()
            gate.set()
            await told.wait()
        assert await ref.ask("count") == 3


async def _blocked_tell(ref, first, error: type[Exception], then) -> list:
    """Send `first` to a one-slot mailbox, fill the slot, start a tell that
    must wait, await then(); what that waiting tell got ("delivered" or `error`)."""
    outcome: list = []
    await ref.tell(first)
    await trio.testing.wait_all_tasks_blocked()
    await ref.tell("inc")  # fills the mailbox

    async def blocked_tell():
        try:
            await ref.tell("inc")
            outcome.append("delivered")
        except error as exc:
            outcome.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(blocked_tell)
        await trio.testing.wait_all_tasks_blocked()
        await then()
    return outcome


async def test_blocked_tell_gets_actorStopped_when_the_mailbox_closes(autojump_clock):
    system, events = ActorSystem(), []
    gate = trio.Event()
    async with supervised(system, spec("t", events, Restart.TEMPORARY, mailbox_size=1)) as sup:
        outcome = await _blocked_tell(system.ref("t"), ("wait", gate), ActorStopped,
                                      lambda: sup.stop_child("t"))
    assert len(outcome) == 1 and isinstance(outcome[0], ActorStopped), outcome


async def test_tell_to_a_stopped_mailbox_is_actorStopped():
    from actors import Mailbox
    from actors.actor import Letter

    box = Mailbox("m", 1)
    box.close()
    with pytest.raises(ActorStopped):
        await box.put(Letter("x"))
    with pytest.raises(ActorStopped):
        box.put_nowait(Letter("x"))


# ------------------------------------------------------------------ refusals

async def test_refused_answers_the_ask_and_the_actor_lives_on(autojump_clock):
    system, events = ActorSystem(), []
    async with supervised(system, spec("w", events)):
        ref = system.ref("w")
        await ref.tell("inc")
        with pytest.raises(Refused) as info:
            await ref.ask("refuse")
        assert (info.value.code, info.value.message, info.value.details) == (
            "nope", "refused on purpose", {"why": "test"})
        await ref.tell("refuse")  # a refused tell is logged, not a crash
        assert await ref.ask("count") == 1  # same instance, state kept
        assert [e for e in events if e[0] == "start"] == [("start", "w", 1)]


async def test_unhandled_message_type_is_refused(autojump_clock):
    system, events = ActorSystem(), []
    async with supervised(system, spec("w", events)):
        with pytest.raises(Refused) as info:
            await system.ref("w").ask(12345)
        assert info.value.code == "unhandled_message"
        assert "Worker" in info.value.message and "int" in info.value.message
        assert await system.ref("w").ask("ping") == ("pong", 1)


# ------------------------------------------------------------------- stopping

async def test_stop_ends_normally_and_answers_the_current_letter(autojump_clock):
    system, events = ActorSystem(), []
    async with supervised(system, spec("t", events, Restart.TRANSIENT)) as sup:
        ref = system.ref("t")
        assert await ref.ask("exit_then_await") == "bye later"
        await trio.testing.wait_all_tasks_blocked()
        assert ("stop", "t", 1) in events  # on_stop ran: an orderly end
        assert sup.which_children() == []  # transient + normal exit: not restarted
        with pytest.raises(ActorNotFound):
            await ref.ask("ping")


async def test_stop_called_in_on_start_ends_before_any_letter(autojump_clock):
    class Quitter(Worker):
        async def on_start(self):
            await super().on_start()
            self.stop()

    system, events = ActorSystem(), []
    async with supervised(system, ChildSpec("q", factory("q", events, Quitter),
                                            Restart.TRANSIENT)) as sup:
        await trio.testing.wait_all_tasks_blocked()
        assert events == [("start", "q", 1), ("stop", "q", 1)]
        assert sup.which_children() == []


async def test_stop_from_a_helper_while_idle(autojump_clock):
    class SelfStopping(Worker):
        async def on_start(self):
            async def later():
                await trio.sleep(3)
                self.stop()
            self.nursery.start_soon(later)

    system, events = ActorSystem(), []
    async with supervised(system, ChildSpec("s", factory("s", events, SelfStopping),
                                            Restart.TRANSIENT)) as sup:
        assert await system.ref("s").ask("ping") == ("pong", 1)
        await trio.sleep(5)
        assert events == [("stop", "s", 1)]
        assert sup.which_children() == []


# --------------------------------------------------------------- helper tasks

class Ticking(Worker):
    """Runs a helper task; letter "helper_fail" makes the helper raise."""

    def __init__(self, name, events, generation, log):
        super().__init__(name, events, generation)
        self.log = log
        self.fail = trio.Event()

    async def on_start(self):
        await super().on_start()

        async def helper():
            try:
                await self.fail.wait()
                raise ValueError(f"helper of generation {self.generation} failed")
            finally:
                self.log.append(("helper ended", self.generation))

        self.nursery.start_soon(helper)

    async def receive(self, msg):
        if msg == "helper_fail":
            self.fail.set()
            return "ok"
        return await super().receive(msg)


async def test_helper_that_raises_crashes_its_actor(autojump_clock):
    system, events, log = ActorSystem(), [], []
    sp = ChildSpec("h", factory("h", events, Ticking, log=log))
    async with supervised(system, sp):
        ref = system.ref("h")
        assert await ref.ask("helper_fail") == "ok"
        await trio.testing.wait_all_tasks_blocked()
        assert log == [("helper ended", 1)]
        assert await ref.ask("ping") == ("pong", 2)  # restarted: it was a crash
        assert ("stop", "h", 1) not in events  # a crash does not run on_stop


async def test_helpers_die_with_their_actor_and_on_stop_still_runs(autojump_clock):
    """Cancelling an actor with helpers gives a group of Cancelled: still orderly."""
    system, events, log = ActorSystem(), [], []
    sp = ChildSpec("h", factory("h", events, Ticking, log=log), Restart.PERMANENT)
    async with supervised(system, sp) as sup:
        assert await system.ref("h").ask("ping") == ("pong", 1)
        await sup.stop_child("h")
        assert log == [("helper ended", 1)]
        assert events == [("start", "h", 1), ("stop", "h", 1)]


async def test_helper_ends_when_actor_stops_itself(autojump_clock):
    system, events, log = ActorSystem(), [], []
    sp = ChildSpec("h", factory("h", events, Ticking, log=log), Restart.TRANSIENT)
    async with supervised(system, sp):
        assert await system.ref("h").ask("exit") == "bye"
        await trio.testing.wait_all_tasks_blocked()
        assert log == [("helper ended", 1)]
        assert events[-1] == ("stop", "h", 1)


async def test_a_timeout_error_in_the_answer_is_not_taken_for_the_ask_timeout(autojump_clock):
    class Relaying(Worker):
        async def handle(self, letter):
            letter.fail(trio.TooSlowError("the upstream was slow"))

    system, events = ActorSystem(), []
    async with supervised(system, ChildSpec("r", factory("r", events, Relaying))):
        with pytest.raises(trio.TooSlowError, match="upstream"):
            await system.ref("r").ask("ping", timeout=10)
        assert trio.current_time() == 0


async def test_stop_before_run_is_harmless(autojump_clock):
    system, events = ActorSystem(), []
    actor = Worker("early", events)
    actor.stop()
    async with trio.open_nursery() as nursery:
        await system.spawn(nursery, actor, "early")
    assert events == [("start", "early", 1), ("stop", "early", 1)]


async def test_blocked_tell_learns_its_letter_was_dropped_by_a_crash(autojump_clock):
    system, events = ActorSystem(), []
    gate = trio.Event()

    async def release() -> None:
        gate.set()

    async with supervised(system, spec("w", events, mailbox_size=1)):
        ref = system.ref("w")
        outcome = await _blocked_tell(ref, ("wait_then_crash", gate), ActorCrashed, release)
        assert len(outcome) == 1 and isinstance(outcome[0], ActorCrashed), outcome
        assert await ref.ask("count") == 0  # the restarted instance got neither "inc"
        assert await ref.ask("ping") == ("pong", 2)


# ------------------------------------------------ answers in the caller's task

class Probe:
    """A message the Quick actor may answer inline."""

    def __init__(self, op: str):
        self.op = op


class Quick(Worker):
    inline = (Probe,)

    def answer_now(self, msg: Probe) -> Any:
        self.events.append(("inline", msg.op, trio.lowlevel.current_task().name))
        return self._probe(msg)

    async def receive(self, msg: Any) -> Any:
        if isinstance(msg, Probe):
            self.events.append(("mailbox", msg.op))
            return "via mailbox" if msg.op == "decline" else self._probe(msg)
        return await super().receive(msg)

    def _probe(self, msg: Probe) -> Any:
        match msg.op:
            case "count":
                return self.count
            case "refuse":
                raise Refused("nope", "refused inline")
            case "crash":
                raise RuntimeError("crashed inline")
            case "decline":
                raise UseMailbox()


def quick(name: str, events: list, **kw) -> ChildSpec:
    return ChildSpec(name, factory(name, events, Quick), Restart.PERMANENT, **kw)


def routes(events: list) -> list[str]:
    return [e[0] for e in events if e[0] in ("inline", "mailbox")]


async def test_an_idle_actor_answers_an_inline_ask_in_the_asking_task(autojump_clock):
    system, events = ActorSystem(), []
    async with supervised(system, quick("q", events)):
        await trio.testing.wait_all_tasks_blocked()
        assert await system.ref("q").ask(Probe("count")) == 0
        [(route, _, task)] = [e for e in events if e[0] in ("inline", "mailbox")]
        assert route == "inline" and task == trio.lowlevel.current_task().name


async def test_an_inline_ask_never_overtakes_a_letter_on_its_way(autojump_clock):
    system, events = ActorSystem(), []
    async with supervised(system, quick("q", events)):
        ref = system.ref("q")
        await trio.testing.wait_all_tasks_blocked()  # idle, waiting in get()
        # Handed straight to the waiting actor: in no buffer, not yet handled.
        ref.tell_nowait("inc")
        assert await ref.ask(Probe("count")) == 1
        for _ in range(3):
            ref.tell_nowait("inc")  # queued
        assert await ref.ask(Probe("count")) == 4
        assert routes(events) == ["mailbox", "mailbox"]
        await trio.testing.wait_all_tasks_blocked()
        assert await ref.ask(Probe("count")) == 4
        assert routes(events)[-1] == "inline"


async def test_a_busy_actor_takes_the_inline_ask_through_its_mailbox(autojump_clock):
    system, events = ActorSystem(), []
    gate = trio.Event()
    answers: list = []
    async with supervised(system, quick("q", events)):
        ref = system.ref("q")
        await ref.tell(("wait", gate))
        await trio.testing.wait_all_tasks_blocked()  # it waits inside a letter
        async with trio.open_nursery() as nursery:
            async def ask() -> None:
                answers.append(await ref.ask(Probe("count")))
            nursery.start_soon(ask)
            await trio.testing.wait_all_tasks_blocked()
            assert answers == []  # not answered while the letter is in hand
            await ref.tell("inc")  # queued behind the ask: answered after it
            gate.set()
        assert answers == [0] and routes(events) == ["mailbox"]


async def test_answer_now_may_send_a_message_through_the_mailbox(autojump_clock):
    system, events = ActorSystem(), []
    async with supervised(system, quick("q", events)):
        await trio.testing.wait_all_tasks_blocked()
        assert await system.ref("q").ask(Probe("decline")) == "via mailbox"
        assert routes(events) == ["inline", "mailbox"]


async def test_a_refusal_inline_answers_the_ask_and_the_actor_lives_on(autojump_clock):
    system, events = ActorSystem(), []
    async with supervised(system, quick("q", events)):
        ref = system.ref("q")
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(Refused) as info:
            await ref.ask(Probe("refuse"))
        assert info.value.code == "nope"
        assert await ref.ask("ping") == ("pong", 1)


async def test_a_crash_inline_crashes_the_actor_and_its_supervisor_restarts_it(autojump_clock):
    system, events = ActorSystem(), []
    async with supervised(system, quick("q", events)):
        ref = system.ref("q")
        await ref.tell("inc")
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(ActorCrashed) as info:
            await ref.ask(Probe("crash"))
        assert "'q'" in str(info.value) and "RuntimeError" in str(info.value)
        assert await ref.ask("ping") == ("pong", 2)  # a new instance...
        assert await ref.ask("count") == 0  # ...with fresh state
        assert ("stop", "q", 1) not in events  # a crash, not an orderly stop


async def test_a_cancelled_inline_ask_is_not_answered(autojump_clock):
    system, events = ActorSystem(), []
    async with supervised(system, quick("q", events)):
        await trio.testing.wait_all_tasks_blocked()
        with trio.CancelScope() as scope:
            scope.cancel()
            await system.ref("q").ask(Probe("count"))
        assert scope.cancelled_caught and routes(events) == []
