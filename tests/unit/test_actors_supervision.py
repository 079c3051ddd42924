"""Supervisors: restart types, strategies, intensity, escalation, shutdown order.

Restart windows are measured on trio.current_time(), so the MockClock
(`autojump_clock`) moves time forward here; nothing depends on wall time.
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
    ActorSystem,
    ChildSpec,
    Restart,
    Strategy,
    Supervisor,
    SupervisorGaveUp,
    run_root,
)

BOUND = 600  # mock seconds; a scenario that needs more is hung


class Worker(Actor):
    """Records its life in `events`: ("start"|"stop", name, generation)."""

    def __init__(self, name: str, events: list, generation: int):
        self.name, self.events, self.generation = name, events, generation

    async def on_start(self) -> None:
        self.events.append(("start", self.name, self.generation))

    async def on_stop(self) -> None:
        self.events.append(("stop", self.name, self.generation))

    async def receive(self, msg: Any) -> Any:
        if msg == "ping":
            return ("pong", self.name, self.generation)
        if msg == "crash":
            raise RuntimeError(f"{self.name} crashed on purpose")
        if msg == "exit":
            self.stop()
            return "bye"
        return await super().receive(msg)


class Counter:
    """A child start function that numbers instances; `fail_from` makes starts fail."""

    def __init__(self, name: str, events: list, cls: type = Worker,
                 fail_from: int | None = None, fail_only: set[int] = frozenset()):
        self.name, self.events, self.cls = name, events, cls
        self.fail_from, self.fail_only = fail_from, fail_only
        self.made = 0

    def __call__(self) -> Actor:
        self.made += 1
        actor = self.cls(self.name, self.events, self.made)
        if self.made in self.fail_only or (self.fail_from is not None
                                           and self.made >= self.fail_from):
            async def bad_start() -> None:
                self.events.append(("start failed", self.name, actor.generation))
                raise OSError(f"{self.name} cannot start")
            actor.on_start = bad_start
        return actor


def spec(name: str, events: list, restart: Restart = Restart.PERMANENT, **kw) -> ChildSpec:
    return ChildSpec(name, Counter(name, events, **kw), restart)


@asynccontextmanager
async def running(sup: Supervisor):
    with trio.fail_after(BOUND):
        async with trio.open_nursery() as nursery:
            await nursery.start(sup.run)
            yield sup
            nursery.cancel_scope.cancel()


async def crash(system: ActorSystem, name: str) -> None:
    with pytest.raises(ActorCrashed):
        await system.ref(name).ask("crash")
    await trio.testing.wait_all_tasks_blocked()  # let the supervisor react


async def exit_normally(system: ActorSystem, name: str) -> None:
    assert await system.ref(name).ask("exit") == "bye"
    await trio.testing.wait_all_tasks_blocked()


def starts(events: list, name: str) -> int:
    return sum(1 for e in events if e[0] == "start" and e[1] == name)


# -------------------------------------------------------------- restart types

async def test_permanent_is_restarted_after_crash_and_after_normal_exit(autojump_clock):
    system, events = ActorSystem(), []
    async with running(Supervisor(system, "sup", [spec("p", events)])) as sup:
        await crash(system, "p")
        assert await system.ref("p").ask("ping") == ("pong", "p", 2)
        await exit_normally(system, "p")
        assert await system.ref("p").ask("ping") == ("pong", "p", 3)
        assert sup.which_children() == [("p", True)]


async def test_transient_is_restarted_after_crash_only(autojump_clock):
    system, events = ActorSystem(), []
    async with running(Supervisor(system, "sup", [spec("t", events, Restart.TRANSIENT)])) as sup:
        await crash(system, "t")
        assert await system.ref("t").ask("ping") == ("pong", "t", 2)
        await exit_normally(system, "t")
        assert sup.which_children() == []
        with pytest.raises(ActorNotFound):
            await system.ref("t").ask("ping")
        assert events[-1] == ("stop", "t", 2)


async def test_temporary_is_never_restarted(autojump_clock):
    system, events = ActorSystem(), []
    sup = Supervisor(system, "sup", [spec("a", events, Restart.TEMPORARY),
                                     spec("b", events, Restart.TEMPORARY)])
    async with running(sup):
        await crash(system, "a")
        await exit_normally(system, "b")
        assert sup.which_children() == []
        assert starts(events, "a") == starts(events, "b") == 1


# ----------------------------------------------------------------- strategies

async def test_one_for_one_restarts_only_the_crashed_child(autojump_clock):
    system, events = ActorSystem(), []
    sup = Supervisor(system, "sup", [spec(n, events) for n in "abc"], Strategy.ONE_FOR_ONE)
    async with running(sup):
        events.clear()
        await crash(system, "b")
        assert events == [("start", "b", 2)]
        for name, generation in (("a", 1), ("b", 2), ("c", 1)):
            assert await system.ref(name).ask("ping") == ("pong", name, generation)


async def test_one_for_all_stops_others_in_reverse_and_restarts_all_in_order(autojump_clock):
    system, events = ActorSystem(), []
    sup = Supervisor(system, "sup", [spec(n, events) for n in "abcd"], Strategy.ONE_FOR_ALL)
    async with running(sup):
        assert events == [("start", n, 1) for n in "abcd"]
        events.clear()
        await crash(system, "b")
        # b crashed (no on_stop); the others stop last-started first, then all
        # start again in start order.
        assert events == [("stop", "d", 1), ("stop", "c", 1), ("stop", "a", 1),
                          ("start", "a", 2), ("start", "b", 2), ("start", "c", 2),
                          ("start", "d", 2)]
        for name in "abcd":
            assert await system.ref(name).ask("ping") == ("pong", name, 2)


async def test_one_for_all_does_not_restart_temporary_siblings(autojump_clock):
    """OTP: a temporary child is never restarted, also not as a sibling."""
    system, events = ActorSystem(), []
    sup = Supervisor(system, "sup", [spec("a", events), spec("tmp", events, Restart.TEMPORARY),
                                     spec("c", events)], Strategy.ONE_FOR_ALL)
    async with running(sup):
        await crash(system, "a")
        assert sup.which_children() == [("a", True), ("c", True)]
        assert ("stop", "tmp", 1) in events and starts(events, "tmp") == 1
        with pytest.raises(ActorNotFound):
            await system.ref("tmp").ask("ping")


async def test_one_for_all_normal_exit_of_transient_restarts_nobody(autojump_clock):
    system, events = ActorSystem(), []
    sup = Supervisor(system, "sup", [spec("a", events), spec("t", events, Restart.TRANSIENT)],
                     Strategy.ONE_FOR_ALL)
    async with running(sup):
        await exit_normally(system, "t")
        assert sup.which_children() == [("a", True)]
        assert starts(events, "a") == 1


async def test_one_for_all_retry_after_failed_restart_keeps_one_instance_each(autojump_clock):
    """If restarting the group fails midway, the retry must stop what did start."""
    system, events = ActorSystem(), []
    flaky = Counter("b", events, fail_only={2})  # b's first restart fails
    sup = Supervisor(system, "sup", [spec("a", events), ChildSpec("b", flaky)],
                     Strategy.ONE_FOR_ALL, intensity=5, period=10)
    async with running(sup):
        await crash(system, "a")
        assert ("start failed", "b", 2) in events
        # a restarted twice (once per attempt); the first restarted a was stopped
        # before the second, so exactly one a runs and it is the newest.
        assert [e for e in events if e[1] == "a"] == [
            ("start", "a", 1), ("start", "a", 2), ("stop", "a", 2), ("start", "a", 3)]
        assert await system.ref("a").ask("ping") == ("pong", "a", 3)
        assert await system.ref("b").ask("ping") == ("pong", "b", 3)


# ------------------------------------------------------------------ intensity

async def watch(sup: Supervisor, outcome: list, *,
                task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    try:
        await sup.run(task_status=task_status)
    except SupervisorGaveUp as exc:
        outcome.append(exc)


async def test_intensity_allows_n_restarts_in_period_and_gives_up_on_n_plus_one(autojump_clock):
    system, events = ActorSystem(), []
    outcome: list = []
    sup = Supervisor(system, "sup", [spec("a", events), spec("b", events)],
                     intensity=3, period=10)
    with trio.fail_after(BOUND):
        async with trio.open_nursery() as nursery:
            await nursery.start(watch, sup, outcome)
            for _ in range(3):
                await crash(system, "a")
                await trio.sleep(1)
            assert outcome == [] and await system.ref("a").ask("ping") == ("pong", "a", 4)
            await crash(system, "a")
    assert len(outcome) == 1
    text = str(outcome[0])
    assert "'sup'" in text and "3 restarts in 10" in text and "'a'" in text
    # Giving up stops every child (on_stop for the ones alive) and forgets them.
    assert events[-1] == ("stop", "b", 1)
    for name in "ab":
        with pytest.raises(ActorNotFound):
            await system.ref(name).ask("ping")


async def test_restarts_spread_beyond_the_period_do_not_accumulate(autojump_clock):
    system, events = ActorSystem(), []
    outcome: list = []
    sup = Supervisor(system, "sup", [spec("a", events)], intensity=2, period=5)
    with trio.fail_after(BOUND):
        async with trio.open_nursery() as nursery:
            await nursery.start(watch, sup, outcome)
            for _ in range(20):  # 40 restarts, never more than 2 within 5 seconds
                await crash(system, "a")
                await crash(system, "a")
                await trio.sleep(5.5)
            assert outcome == []
            assert await system.ref("a").ask("ping") == ("pong", "a", 41)
            nursery.cancel_scope.cancel()


async def test_intensity_zero_gives_up_at_the_first_crash(autojump_clock):
    system, events = ActorSystem(), []
    outcome: list = []
    sup = Supervisor(system, "sup", [spec("a", events)], intensity=0)
    with trio.fail_after(BOUND):
        async with trio.open_nursery() as nursery:
            await nursery.start(watch, sup, outcome)
            await crash(system, "a")
    assert len(outcome) == 1


async def test_a_child_failing_to_restart_counts_toward_intensity(autojump_clock):
    system, events = ActorSystem(), []
    outcome: list = []
    sup = Supervisor(system, "sup", [spec("a", events, fail_from=2)], intensity=3, period=10)
    with trio.fail_after(BOUND):
        async with trio.open_nursery() as nursery:
            await nursery.start(watch, sup, outcome)
            await crash(system, "a")
    assert len(outcome) == 1
    assert "OSError" in str(outcome[0]) and "cannot start" in str(outcome[0])
    # the crash, then 3 failed restarts; the 4th restart would exceed intensity 3
    assert [e for e in events if e[0] == "start failed"] == [
        ("start failed", "a", g) for g in (2, 3, 4)]


# ----------------------------------------------------------------- escalation

def inner_supervisor(system: ActorSystem, events: list, made: list) -> Any:
    def start() -> Supervisor:
        made.append(1)
        return Supervisor(system, f"inner{len(made)}", [spec("leaf", events)],
                          intensity=1, period=10)
    return start


async def test_a_child_supervisor_giving_up_is_a_crash_in_its_parent(autojump_clock):
    system, events, made = ActorSystem(), [], []
    root = Supervisor(system, "root", [spec("sibling", events),
                                       ChildSpec("inner", inner_supervisor(system, events, made))],
                      intensity=1, period=10)
    async with running(root):
        await crash(system, "leaf")  # inner restarts leaf (1 of 1)
        await crash(system, "leaf")  # inner gives up -> root restarts inner
        assert len(made) == 2
        assert await system.ref("leaf").ask("ping") == ("pong", "leaf", 1)
        assert await system.ref("sibling").ask("ping") == ("pong", "sibling", 1)
        assert root.which_children() == [("sibling", True), ("inner", True)]


async def test_run_root_returns_1_when_the_tree_gives_up(autojump_clock):
    system, events, made = ActorSystem(), [], []
    root = Supervisor(system, "root", [spec("sibling", events),
                                       ChildSpec("inner", inner_supervisor(system, events, made))],
                      intensity=0)
    codes = []

    async def main(task_status=trio.TASK_STATUS_IGNORED):
        codes.append(await run_root(root, task_status=task_status))

    with trio.fail_after(BOUND):
        async with trio.open_nursery() as nursery:
            await nursery.start(main)
            await crash(system, "leaf")
            await crash(system, "leaf")
    assert codes == [1]
    assert events[-1] == ("stop", "sibling", 1)


# -------------------------------------------------------- refs and lifecycle

async def test_refs_stay_valid_across_restarts(autojump_clock):
    system, events = ActorSystem(), []
    async with running(Supervisor(system, "sup", [spec("a", events)], intensity=10)):
        ref = system.ref("a")
        for generation in range(1, 6):
            assert await ref.ask("ping") == ("pong", "a", generation)
            with pytest.raises(ActorCrashed):
                await ref.ask("crash")


async def test_orderly_shutdown_stops_children_in_reverse_start_order(autojump_clock):
    system, events = ActorSystem(), []
    made: list = []

    def inner() -> Supervisor:
        made.append(1)
        return Supervisor(system, "inner", [spec("x", events), spec("y", events)])

    root = Supervisor(system, "root", [spec("a", events), ChildSpec("inner", inner),
                                       spec("b", events)])
    with trio.fail_after(BOUND):
        async with trio.open_nursery() as nursery:
            await nursery.start(root.run)
            assert events == [("start", n, 1) for n in "axyb"]
            events.clear()
            nursery.cancel_scope.cancel()
    assert events == [("stop", n, 1) for n in "byxa"]
    for name in "abxy":
        with pytest.raises(ActorNotFound):
            await system.ref(name).ask("ping")


async def test_a_child_failing_its_initial_start_fails_the_supervisor_start(autojump_clock):
    system, events = ActorSystem(), []
    sup = Supervisor(system, "sup", [spec("a", events), spec("b", events),
                                     spec("bad", events, fail_from=1), spec("never", events)])
    with trio.fail_after(BOUND):
        async with trio.open_nursery() as nursery:
            with pytest.raises(OSError, match="bad cannot start"):  # itself, not a group
                await nursery.start(sup.run)
    assert events == [("start", "a", 1), ("start", "b", 1), ("start failed", "bad", 1),
                      ("stop", "b", 1), ("stop", "a", 1)]
    for name in ("a", "b", "bad", "never"):
        with pytest.raises(ActorNotFound):
            await system.ref(name).ask("ping")


async def test_initial_start_failure_propagates_up_a_tree(autojump_clock):
    system, events = ActorSystem(), []

    def inner() -> Supervisor:
        return Supervisor(system, "inner", [spec("bad", events, fail_from=1)])

    root = Supervisor(system, "root", [spec("a", events), ChildSpec("inner", inner)])
    with trio.fail_after(BOUND):
        async with trio.open_nursery() as nursery:
            with pytest.raises(OSError):
                await nursery.start(root.run)
    assert events[-1] == ("stop", "a", 1)


async def test_start_child_and_stop_child_at_run_time(autojump_clock):
    system, events = ActorSystem(), []
    async with running(Supervisor(system, "sup", [spec("a", events)])) as sup:
        ref = await sup.start_child(spec("dyn", events))
        assert ref == system.ref("dyn")
        assert await ref.ask("ping") == ("pong", "dyn", 1)
        assert sup.which_children() == [("a", True), ("dyn", True)]
        with pytest.raises(ValueError, match="'dyn'"):
            await sup.start_child(spec("dyn", events))
        await crash(system, "dyn")  # supervised like the others
        assert await ref.ask("ping") == ("pong", "dyn", 2)
        await sup.stop_child("dyn")
        assert events[-1] == ("stop", "dyn", 2)
        assert sup.which_children() == [("a", True)]
        with pytest.raises(ActorNotFound):
            await ref.ask("ping")
        await sup.stop_child("unknown")  # stopping what is not there is a no-op
        # a failing dynamic child raises to the caller and is not kept
        with pytest.raises(OSError):
            await sup.start_child(spec("bad", events, fail_from=1))
        assert sup.which_children() == [("a", True)]


async def test_start_child_on_a_supervisor_not_running_is_an_error():
    sup = Supervisor(ActorSystem(), "sup", [])
    with pytest.raises(RuntimeError, match="not running"):
        await sup.start_child(ChildSpec("x", lambda: Worker("x", [], 1)))


async def test_helper_tasks_end_with_a_restart_and_a_failing_helper_crashes(autojump_clock):
    system, events = ActorSystem(), []
    ended: list = []

    class WithHelper(Worker):
        async def on_start(self) -> None:
            await super().on_start()
            self.nursery.start_soon(self.helper)

        async def helper(self) -> None:
            try:
                await trio.sleep(10)
                raise ValueError("helper failed")
            finally:
                ended.append(self.generation)

    sup = Supervisor(system, "sup", [ChildSpec("h", Counter("h", events, WithHelper))],
                     intensity=10, period=5)
    async with running(sup):
        await crash(system, "h")  # crash by a letter: the helper of 1 dies with it
        assert ended == [1]
        await trio.sleep(10.5)  # the helper of 2 raises: a crash, restarted as 3
        assert ended == [1, 2]
        assert await system.ref("h").ask("ping") == ("pong", "h", 3)
        assert ("stop", "h", 2) not in events


# ------------------------------------------------- cancellation while starting

class SlowStart(Worker):
    """Takes 1 (mock) second to start, like an actor opening a database."""

    async def on_start(self) -> None:
        await trio.sleep(1)
        await super().on_start()


async def test_cancelling_a_supervisor_while_it_restarts_a_child_does_not_hang(autojump_clock):
    system, events = ActorSystem(), []
    sup = Supervisor(system, "sup", [spec("a", events),
                                     ChildSpec("slow", Counter("slow", events, SlowStart))])
    with trio.fail_after(BOUND):
        async with trio.open_nursery() as nursery:
            await nursery.start(sup.run)
            with pytest.raises(ActorCrashed):
                await system.ref("slow").ask("crash")
            await trio.sleep(0.5)  # the restart of slow is half way through on_start
            nursery.cancel_scope.cancel()
    assert events[-1] == ("stop", "a", 1)
    assert trio.current_time() < 2  # nothing waited for a timeout


async def test_cancelling_the_initial_start_stops_what_started(autojump_clock):
    system, events = ActorSystem(), []
    sup = Supervisor(system, "sup", [spec("a", events),
                                     ChildSpec("slow", Counter("slow", events, SlowStart))])
    with trio.fail_after(BOUND):
        async with trio.open_nursery() as nursery:
            with trio.move_on_after(0.5):
                await nursery.start(sup.run)
    # slow was cancelled inside on_start: no on_stop for it (OTP: no terminate
    # without a completed init)
    assert events == [("start", "a", 1), ("stop", "a", 1)]
    for name in ("a", "slow"):
        with pytest.raises(ActorNotFound):
            await system.ref(name).ask("ping")


async def test_a_cancelled_start_child_leaves_no_child_behind(autojump_clock):
    system, events = ActorSystem(), []
    async with running(Supervisor(system, "sup", [spec("a", events)])) as sup:
        with trio.move_on_after(0.5):
            await sup.start_child(ChildSpec("slow", Counter("slow", events, SlowStart)))
        assert sup.which_children() == [("a", True)]
        with pytest.raises(ActorNotFound):
            await system.ref("slow").ask("ping")
        # and the name can be used again
        await sup.start_child(ChildSpec("slow", Counter("slow", events, SlowStart)))
        assert await system.ref("slow").ask("ping") == ("pong", "slow", 1)
