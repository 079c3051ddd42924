"""Supervisors with OTP semantics.

A Supervisor starts its children in order, watches them, and restarts them
according to each ChildSpec's restart type and its own strategy. More than
`intensity` restarts within `period` seconds (on trio.current_time(), so a
MockClock drives it) and it gives up: it stops every child in reverse start
order and raises SupervisorGaveUp, which its own parent treats as a crash.

Each child runs in a shielded cancel scope of its own, so cancelling the
supervisor does not tear all children down at once: the supervisor stops
them one by one, last started first, as OTP does.
"""

from __future__ import annotations

import enum
import logging
from collections import deque
from typing import Callable, Union

import attrs
import trio

from .actor import DEFAULT_MAILBOX, Actor, ActorSystem, Ref
from .errors import SupervisorGaveUp
from .groups import collapsed, sole_exception

log = logging.getLogger("actors.supervisor")


class Restart(enum.Enum):
    PERMANENT = "permanent"  # always restarted
    TRANSIENT = "transient"  # restarted only after a crash
    TEMPORARY = "temporary"  # never restarted


class Strategy(enum.Enum):
    ONE_FOR_ONE = "one_for_one"  # restart the crashed child only
    ONE_FOR_ALL = "one_for_all"  # stop all, restart all


Child = Union[Actor, "Supervisor"]


@attrs.frozen
class ChildSpec:
    name: str
    start: Callable[[], Child]  # a fresh instance for every (re)start
    restart: Restart = Restart.PERMANENT
    mailbox_size: int = DEFAULT_MAILBOX
    shutdown_timeout: float = 5.0


class _Slot:
    """A running (or restarting) child and what is needed to stop it."""

    def __init__(self, spec: ChildSpec):
        self.spec = spec
        self.generation = 0
        self.scope: trio.CancelScope | None = None
        self.done = trio.Event()
        self.child: Child | None = None

    @property
    def running(self) -> bool:
        return self.scope is not None and not self.done.is_set()


class Supervisor:
    def __init__(self, system: ActorSystem, name: str, children: list[ChildSpec],
                 strategy: Strategy = Strategy.ONE_FOR_ONE,
                 intensity: int = 3, period: float = 5.0):
        self.system = system
        self.name = name
        self.strategy = strategy
        self.intensity = intensity
        self.period = period
        self._specs = list(children)
        self._slots: list[_Slot] = []
        self._restarts: deque[float] = deque()
        self._exits_send, self._exits = trio.open_memory_channel[tuple[_Slot, int, BaseException | None]](
            float("inf"))
        self._nursery: trio.Nursery | None = None

    # -- introspection
    def which_children(self) -> list[tuple[str, bool]]:
        return [(s.spec.name, s.running) for s in self._slots]

    def child(self, name: str) -> Child | None:
        """The current instance of a child (changes on every restart)."""
        for s in self._slots:
            if s.spec.name == name:
                return s.child
        return None

    # -- running
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with collapsed():
            await self._run(task_status)

    async def _run(self, task_status: trio.TaskStatus[None]) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            try:
                for spec in self._specs:
                    slot = _Slot(spec)
                    self._slots.append(slot)
                    await self._start(slot)
                task_status.started()
                async for slot, generation, error in self._exits:
                    if generation == slot.generation and slot in self._slots:
                        await self._on_exit(slot, error)
            finally:
                with trio.CancelScope(shield=True):
                    await self._stop_all()

    async def start_child(self, spec: ChildSpec) -> Ref | None:
        """Add and start a child at run time (e.g. one link per peer)."""
        if self._nursery is None:
            raise RuntimeError(f"supervisor {self.name!r} is not running")
        if any(s.spec.name == spec.name for s in self._slots):
            raise ValueError(f"supervisor {self.name!r} already has a child {spec.name!r}")
        slot = _Slot(spec)
        self._slots.append(slot)
        try:
            await self._start(slot)
        except BaseException:
            self._forget(slot)
            raise
        return self.system.ref(spec.name) if isinstance(slot.child, Actor) else None

    async def stop_child(self, name: str) -> None:
        """Stop a child and forget it (it is not restarted)."""
        for slot in self._slots:
            if slot.spec.name == name:
                await self._stop(slot)
                self._forget(slot)
                return

    # -- internals
    async def _start(self, slot: _Slot) -> None:
        """Start a child and wait until it is ready; raise what failed its start.

        The child task is spawned straight into the supervisor's nursery, not
        through nursery.start: a cancelled nursery.start keeps its task in the
        caller until the task ends, and a shielded child never ends by itself,
        so cancelling the supervisor while it (re)started a child hung.
        """
        slot.generation += 1
        slot.child = slot.spec.start()  # first: if it raises, the slot is not running
        slot.done = trio.Event()
        # Shielded: only this supervisor stops a child, through slot.scope.
        # Made here, before the task runs, so a _stop() can never miss it.
        slot.scope = trio.CancelScope(shield=True)
        ready = _Ready()
        self._nursery.start_soon(  # type: ignore[union-attr]
            self._child_task, slot, slot.generation, slot.scope, slot.done, ready)
        try:
            await ready.event.wait()
        except BaseException:
            # Cancelled while the child starts: it is ours to stop.
            with trio.CancelScope(shield=True):
                await self._stop(slot)
            raise
        if ready.error is not None:
            raise ready.error

    async def _child_task(self, slot: _Slot, generation: int, scope: trio.CancelScope,
                          done: trio.Event, ready: "_Ready") -> None:
        error: BaseException | None = None
        with scope:
            try:
                await self._run_child(slot, ready)
            except Exception as exc:
                if not ready.event.is_set():
                    done.set()
                    ready.fail(exc)  # a failed start fails the starter
                    return
                error = exc  # (the actor already failed the asks it had queued)
        done.set()
        ready.started()  # a no-op unless it ended (or was stopped) before ready
        self._exits_send.send_nowait((slot, generation, error))

    async def _run_child(self, slot: _Slot, status: "_Ready") -> None:
        with collapsed():
            child = slot.child
            if isinstance(child, Actor):
                box = self.system.open_mailbox(slot.spec.name, slot.spec.mailbox_size)
                await child.run(self.system, box, task_status=status)
            else:
                await child.run(task_status=status)  # type: ignore[union-attr]

    async def _on_exit(self, slot: _Slot, error: BaseException | None) -> None:
        name = slot.spec.name
        if error is not None:
            log.error("child crashed", extra={"supervisor": self.name, "child": name,
                                              "error": _describe(error)})
        restart = slot.spec.restart
        if restart is Restart.TEMPORARY or (restart is Restart.TRANSIENT and error is None):
            self._forget(slot)
            return
        while True:
            self._note_restart(name, error)
            try:
                if self.strategy is Strategy.ONE_FOR_ALL:
                    await self._restart_all(slot)
                else:
                    await self._start(slot)
                log.info("child restarted", extra={"supervisor": self.name, "child": name})
                return
            except Exception as exc:  # failing to restart counts as another crash
                error = exc
                log.error("child restart failed", extra={"supervisor": self.name, "child": name,
                                                         "error": _describe(exc)})

    def _note_restart(self, name: str, error: BaseException | None) -> None:
        now = trio.current_time()
        self._restarts.append(now)
        while self._restarts and self._restarts[0] < now - self.period:
            self._restarts.popleft()
        if len(self._restarts) > self.intensity:
            raise SupervisorGaveUp(
                f"supervisor {self.name!r}: more than {self.intensity} restarts in "
                f"{self.period}s (last: child {name!r}: {_describe(error)})") from error

    async def _restart_all(self, crashed: _Slot) -> None:
        # Stop every child still running, not just "all but the crashed one":
        # on a retry after a failed restart the crashed child may be running
        # again, and starting it twice would put two actors on one mailbox.
        for slot in reversed(self._slots):
            await self._stop(slot)
        for slot in list(self._slots):
            if slot is not crashed and slot.spec.restart is Restart.TEMPORARY:
                self._forget(slot)  # OTP: never restarted, also not as a sibling
            else:
                await self._start(slot)

    async def _stop(self, slot: _Slot) -> None:
        if not slot.running:
            return
        slot.generation += 1  # its exit is expected, not a crash
        slot.scope.cancel()  # type: ignore[union-attr]
        with trio.move_on_after(slot.spec.shutdown_timeout):
            await slot.done.wait()

    async def _stop_all(self) -> None:
        for slot in reversed(self._slots):
            await self._stop(slot)
        for slot in list(self._slots):
            self._forget(slot)

    def _forget(self, slot: _Slot) -> None:
        if slot in self._slots:
            self._slots.remove(slot)
        if isinstance(slot.child, Actor):
            self.system.close_mailbox(slot.spec.name)


class _Ready:
    """The task_status a child gets: tells its starter it is ready, or why not."""

    def __init__(self) -> None:
        self.event = trio.Event()
        self.error: BaseException | None = None

    def started(self, value: None = None) -> None:
        self.event.set()

    def fail(self, error: BaseException) -> None:
        if not self.event.is_set():
            self.error = error
            self.event.set()


def _describe(error: BaseException | None) -> str:
    if error is None:
        return "normal exit"
    error = sole_exception(error) or error
    return f"{type(error).__name__}: {error}"


async def run_root(supervisor: Supervisor,
                   *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> int:
    """Run the top supervisor; 0 on orderly shutdown, 1 when it gave up."""
    try:
        await supervisor.run(task_status=task_status)
    except SupervisorGaveUp as exc:
        log.critical("supervisor gave up, exiting", extra={"error": str(exc)})
        return 1
    return 0
