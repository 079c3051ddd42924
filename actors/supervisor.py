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
from .errors import ActorCrashed, SupervisorGaveUp
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
        slot.generation += 1
        slot.done = trio.Event()
        slot.child = slot.spec.start()
        with collapsed():
            await self._nursery.start(self._child_task, slot, slot.generation)  # type: ignore[union-attr]

    async def _child_task(self, slot: _Slot, generation: int,
                          task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        started = False

        def on_started(value: None = None) -> None:
            nonlocal started
            started = True
            task_status.started()

        status = _StartedHook(on_started)
        error: BaseException | None = None
        # Shielded: only this supervisor stops a child, through slot.scope.
        with trio.CancelScope(shield=True) as scope:
            slot.scope = scope
            try:
                await self._run_child(slot, status)
            except Exception as exc:
                if not started:
                    slot.done.set()
                    raise  # a failed start fails the starter (nursery.start)
                error = exc
                # Asks queued before the crash fail now; letters sent after it
                # wait for the restarted instance.
                self._fail_mailbox(slot)
        slot.done.set()
        if not started:
            # The child returned (or was stopped) before saying it was ready.
            task_status.started()
        self._exits_send.send_nowait((slot, generation, error))

    async def _run_child(self, slot: _Slot, status: "_StartedHook") -> None:
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
        for slot in reversed(self._slots):
            if slot is not crashed:
                await self._stop(slot)
        for slot in list(self._slots):
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

    def _fail_mailbox(self, slot: _Slot) -> None:
        if isinstance(slot.child, Actor):
            name = slot.spec.name
            box = self.system._mailboxes.get(name)
            if box is not None:
                box.fail_pending(lambda: ActorCrashed(f"actor {name!r} crashed"))


class _StartedHook:
    """A TaskStatus that tells the supervisor whether the child got ready."""

    def __init__(self, on_started: Callable[[None], None]):
        self._on_started = on_started

    def started(self, value: None = None) -> None:
        self._on_started(value)


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
