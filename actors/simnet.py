"""An in-memory simulated network for deterministic tests (DESIGN principle 7).

`SimTransport` implements the Transport protocol (like the websocket
transport), so an ActorSystem and its actors run over it unchanged. Every
envelope is encoded with the real codec when it is sent and decoded by the
receiver, so the simulation exercises the wire format too.

    net = SimNetwork(seed=7, faults=FaultModel(drop=0.05, delay=(0.001, 0.02)))
    await net.start_process(nursery, "sim://a", main)   # main(transport)
    net.partition(["sim://a"], ["sim://b"]); net.heal()
    net.crash("sim://a"); await net.restart("sim://a")

Faults come from one `random.Random(seed)` owned by the network: drop,
duplicate, delay (uniform in a range), reorder (a frame held back so later
frames on its link overtake it; without it every link is FIFO), partitions
(symmetric, one way, isolation) and process crash/restart. A partitioned or
dropped frame vanishes silently, as on a real network; only a send to an
address that was never registered raises Unreachable. The network never
calls `link_down` on its own: a crashed or cut-off peer looks like a silent
host, so asks to it end by their timeouts (`crash(..., close_links=True)`
models a process whose sockets the OS closes instead).

Determinism. Identical seeds give identical `trace`s under
`trio.testing.MockClock(autojump_threshold=0)`:
- A send is not scheduled when it is made. The network's pump task waits
  until every task is blocked (the instant has settled), then schedules the
  instant's sends sorted by (sender address, sender's send counter). So the
  draws from the RNG and the trace do not depend on the order in which trio
  ran the senders of different processes (e.g. timers that expire at the same
  instant, whose order trio breaks by object id).
- Scheduled frames wait in one heap keyed by (due time, seq); the pump
  delivers them in that order, after the timers of their instant have run.
- What remains is the order trio runs the tasks of one process that became
  runnable together; trio shuffles it with a module-level RNG. Seed it with
  `seeded_trio_scheduler` to replay a run exactly.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import math
import random
from typing import Any, Awaitable, Callable, Iterable, Iterator

import attrs
import trio
import trio.testing

from . import codec
from .actor import ActorSystem
from .codec import Envelope
from .errors import ProtocolError, Unreachable
from .transport import Deliver, LinkDown

log = logging.getLogger("actors.simnet")

Main = Callable[["SimTransport"], Awaitable[None]]


# ------------------------------------------------------------------- faults

def _probability(_inst: Any, attr: attrs.Attribute, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"FaultModel.{attr.name} must be within [0, 1], got {value!r}")


def _delay_range(_inst: Any, _attr: attrs.Attribute, value: tuple[float, float]) -> None:
    if len(value) != 2 or not 0.0 <= value[0] <= value[1]:
        raise ValueError(f"FaultModel.delay must be (min, max) with 0 <= min <= max, got {value!r}")


@attrs.frozen
class FaultModel:
    """What the network does to each frame.

    drop:          probability that a frame is lost.
    duplicate:     probability that a frame arrives twice (the copy has its own delay).
    delay:         (min, max) seconds from send to arrival, uniform.
    reorder:       probability that a frame is held back by an extra
                   uniform(0, reorder_delay) seconds so that later frames on
                   its link overtake it. Frames not held back keep FIFO order.
    """

    drop: float = attrs.field(default=0.0, validator=_probability)
    duplicate: float = attrs.field(default=0.0, validator=_probability)
    delay: tuple[float, float] = attrs.field(default=(0.0, 0.0), converter=tuple,
                                             validator=_delay_range)
    reorder: float = attrs.field(default=0.0, validator=_probability)
    reorder_delay: float = attrs.field(default=0.05, validator=attrs.validators.ge(0.0))


@attrs.frozen
class TraceEvent:
    """One thing the network did.

    kind: send | deliver | drop | dup, or crash | restart | partition | heal.
    what: a short summary of the frame ("ask#3 echo Ping(n=1)").
    why:  for a drop: fault | partition | down (nobody serves that incarnation).
    """

    time: float
    kind: str
    src: str
    dst: str
    what: str = ""
    why: str = ""


@attrs.frozen
class _Frame:
    src: str
    dst: str
    data: bytes
    what: str
    target: SimTransport  # the incarnation of dst current at send time


def _summary(env: Envelope) -> str:
    cid = "" if env.cid is None else f"#{env.cid}"
    to = f" {env.to}" if env.to else ""
    body = repr(env.body)
    return f"{env.kind}{cid}{to} {body if len(body) <= 60 else body[:57] + '...'}"


def _now() -> float:
    try:
        return trio.current_time()
    except RuntimeError:  # outside trio.run (e.g. setting up a partition first)
        return 0.0


# ---------------------------------------------------------------- transport

class SimTransport:
    """One incarnation of a process's endpoint on a SimNetwork."""

    def __init__(self, network: SimNetwork, address: str):
        self.address = address
        self.alive = True  # False once crashed or replaced by a new incarnation
        self._net = network
        self._inbox: trio.MemorySendChannel[tuple[str, bytes]] | None = None  # while serving
        self._link_down: LinkDown | None = None
        self._sends = itertools.count()  # orders this endpoint's sends within an instant

    def __repr__(self) -> str:
        return f"SimTransport({self.address}, alive={self.alive})"

    async def serve(self, deliver: Deliver, link_down: LinkDown, *,
                    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        if self._inbox is not None:
            raise RuntimeError(f"{self.address} is already being served")
        send, receive = trio.open_memory_channel[tuple[str, bytes]](math.inf)
        self._inbox, self._link_down = send, link_down
        try:
            task_status.started()
            async for src, data in receive:
                if not self.alive:
                    continue  # crashed: what was queued is lost
                try:
                    env = codec.decode(data)
                    # Processes marked untrusted stand for strangers on a
                    # real network (no shared secret: see actors.linkauth).
                    codec.check_trust([env], src not in self._net.untrusted)
                except ProtocolError as exc:
                    # Like the websocket transport: the link to the peer that
                    # sent garbage is dropped; the process keeps serving.
                    log.warning("protocol error, link dropped",
                                extra={"peer": src, "error": f"ProtocolError: {exc}"})
                    link_down(src)
                    continue
                await deliver(env, src, src not in self._net.untrusted)
        finally:
            self._inbox = self._link_down = None

    def link_address(self, address: str) -> str:
        return address

    async def send(self, address: str, envelope: Envelope) -> None:
        await trio.lowlevel.checkpoint()
        self.send_nowait(address, envelope)

    def send_nowait(self, address: str, envelope: Envelope) -> None:
        # Encoding here makes a body that cannot be encoded fail at the sender.
        self._net._post(self, address, codec.encode(envelope), _summary(envelope))


# ------------------------------------------------------------------ network

@attrs.define
class _Process:
    main: Main
    nursery: trio.Nursery
    scope: trio.CancelScope | None = None


class SimNetwork:
    def __init__(self, seed: int, faults: FaultModel = FaultModel()):
        self.seed = seed
        self.faults = faults  # may be replaced between steps of a test
        self.random = random.Random(seed)
        self.trace: list[TraceEvent] = []
        self._current: dict[str, SimTransport] = {}  # address -> latest incarnation
        self._procs: dict[str, _Process] = {}
        self._cut: set[tuple[str, str]] = set()  # directed (src, dst) links that drop all
        self._isolated: set[str] = set()
        self._outbox: list[tuple[str, int, _Frame]] = []  # this instant's sends
        self._heap: list[tuple[float, int, _Frame]] = []  # (due, seq, frame)
        self._seq = itertools.count()
        self._fifo_due: dict[tuple[str, str], float] = {}  # per link: due time of its last frame
        self._wake: trio.Event | None = None
        self._running = False
        # Addresses whose links are not trusted (start_process(trusted=False)):
        # what they send that is declared `trusted` is a ProtocolError.
        self.untrusted: set[str] = set()

    # -- endpoints and processes
    def transport(self, address: str) -> SimTransport:
        """A new incarnation of `address` (any older one is dead from now on)."""
        old = self._current.get(address)
        if old is not None:
            old.alive = False
        transport = self._current[address] = SimTransport(self, address)
        return transport

    async def start_process(self, nursery: trio.Nursery, address: str, main: Main, *,
                            trusted: bool = True) -> None:
        """Run `await main(transport)` in `nursery` under its own cancel scope.

        The network's pump also starts in `nursery` if it is not running yet.
        `trusted=False`: a process without the group's secret, whose
        `trusted` messages everyone refuses.
        """
        if address in self._procs:
            raise ValueError(f"a process is already registered at {address}")
        if not trusted:
            self.untrusted.add(address)
        if not self._running:
            await nursery.start(self.run)
        self._procs[address] = _Process(main, nursery)
        await nursery.start(self._run_process, address)

    async def start_system(self, nursery: trio.Nursery, address: str,
                           body: Callable[[ActorSystem], Awaitable[None]], *,
                           trusted: bool = True) -> None:
        """A process that is only an ActorSystem running `await body(system)`,
        then idle: a peer written in a test (one that sends what real peers
        do not, say)."""
        async def main(transport: SimTransport) -> None:
            system = ActorSystem(transport=transport)
            async with trio.open_nursery() as inner:
                await inner.start(system.serve)
                await body(system)
                await trio.sleep_forever()

        await self.start_process(nursery, address, main, trusted=trusted)

    async def _run_process(self, address: str, *,
                           task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        proc = self._procs[address]
        with trio.CancelScope() as proc.scope:
            transport = self.transport(address)
            task_status.started()
            await proc.main(transport)

    def crash(self, address: str, *, close_links: bool = False) -> None:
        """Kill the process at once: it sends and receives nothing more, and
        frames in flight to it are lost. With close_links, every other serving
        endpoint is told the link to it is down (as when the OS closes a dead
        process's sockets); otherwise its peers only notice by timeouts."""
        self._current[address].alive = False
        proc = self._procs.get(address)
        if proc is not None and proc.scope is not None:
            proc.scope.cancel()
        self._note("crash", address, address)
        if close_links:
            for peer, transport in sorted(self._current.items()):
                if peer != address and transport.alive and transport._link_down is not None:
                    transport._link_down(address)

    async def restart(self, address: str) -> None:
        """Run the process's main again with a fresh transport at the same
        address (crashing the running incarnation first, if any)."""
        if self._current[address].alive:
            self.crash(address)
        self._note("restart", address, address)
        await self._procs[address].nursery.start(self._run_process, address)

    # -- partitions
    def partition(self, group_a: Iterable[str] | str, group_b: Iterable[str] | str) -> None:
        """Cut every link between the two groups, both ways."""
        a, b = _group(group_a), _group(group_b)
        for x in a:
            for y in b:
                self._cut |= {(x, y), (y, x)}
        self._note("partition", ",".join(a), ",".join(b))

    def partition_one_way(self, src: str, dst: str) -> None:
        """Frames from src to dst are lost; dst to src still flow."""
        self._cut.add((src, dst))
        self._note("partition", src, dst, "one way")

    def isolate(self, address: str) -> None:
        """Cut every link to and from `address` (also to addresses added later)."""
        self._isolated.add(address)
        self._note("partition", address, "*", "isolate")

    def heal(self) -> None:
        """Remove every partition."""
        self._cut.clear()
        self._isolated.clear()
        self._note("heal", "*", "*")

    def _blocked(self, src: str, dst: str) -> bool:
        return src != dst and (src in self._isolated or dst in self._isolated
                               or (src, dst) in self._cut)

    # -- sending
    def inject_raw(self, src: str, dst: str, data: bytes) -> None:
        """Deliver raw bytes to dst as if src had sent them, with no faults
        (for garbage-on-the-link tests)."""
        target = self._current.get(dst)
        if target is None:
            raise Unreachable(f"{dst} is not an address on this simulated network")
        frame = _Frame(src, dst, data, f"raw {data[:40]!r}", target)
        now = _now()
        self._record(now, "send", frame, "raw")
        heapq.heappush(self._heap, (now, next(self._seq), frame))
        self._poke()

    def _post(self, sender: SimTransport, dst: str, data: bytes, what: str) -> None:
        target = self._current.get(dst)
        if target is None:
            raise Unreachable(f"{dst} is not an address on this simulated network")
        if not sender.alive:
            return  # a crashed process's last gasps go nowhere
        frame = _Frame(sender.address, dst, data, what, target)
        self._outbox.append((sender.address, next(sender._sends), frame))
        self._poke()

    def _poke(self) -> None:
        if self._wake is not None:
            self._wake.set()

    # -- the pump
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Move frames until cancelled (start_process starts it for you)."""
        if self._running:
            raise RuntimeError("this SimNetwork is already running")
        self._running = True
        try:
            task_status.started()
            while True:
                # Let everything that runs at this instant run, then act on it.
                await trio.testing.wait_all_tasks_blocked()
                now = trio.current_time()
                self._schedule_sends(now)
                if self._heap and self._heap[0][0] <= now:
                    while self._heap and self._heap[0][0] <= now:
                        self._arrive(now, heapq.heappop(self._heap)[2])
                    continue  # receivers react at this same instant
                self._wake = trio.Event()
                with trio.move_on_at(self._heap[0][0] if self._heap else math.inf):
                    await self._wake.wait()
        finally:
            self._running = False
            self._wake = None

    def _schedule_sends(self, now: float) -> None:
        sends, self._outbox = sorted(self._outbox, key=lambda s: s[:2]), []
        rng, faults = self.random, self.faults
        for _, _, frame in sends:
            self._record(now, "send", frame)
            if self._blocked(frame.src, frame.dst):
                self._record(now, "drop", frame, "partition")
                continue
            if rng.random() < faults.drop:
                self._record(now, "drop", frame, "fault")
                continue
            self._schedule(now, frame)
            if rng.random() < faults.duplicate:
                self._record(now, "dup", frame)
                self._schedule(now, frame)

    def _schedule(self, now: float, frame: _Frame) -> None:
        rng, faults = self.random, self.faults
        due = now + rng.uniform(*faults.delay)
        if rng.random() < faults.reorder:
            due += rng.uniform(0.0, faults.reorder_delay)  # later frames may overtake it
        else:
            link = (frame.src, frame.dst)
            due = self._fifo_due[link] = max(due, self._fifo_due.get(link, due))
        heapq.heappush(self._heap, (due, next(self._seq), frame))

    def _arrive(self, now: float, frame: _Frame) -> None:
        target = frame.target
        if self._blocked(frame.src, frame.dst):
            self._record(now, "drop", frame, "partition")  # cut while in flight
        elif not target.alive or target._inbox is None:
            self._record(now, "drop", frame, "down")
        else:
            self._record(now, "deliver", frame)
            target._inbox.send_nowait((frame.src, frame.data))

    # -- trace
    def _record(self, now: float, kind: str, frame: _Frame, why: str = "") -> None:
        self.trace.append(TraceEvent(now, kind, frame.src, frame.dst, frame.what, why))

    def _note(self, kind: str, src: str, dst: str, what: str = "") -> None:
        self.trace.append(TraceEvent(_now(), kind, src, dst, what))

    def format_trace(self) -> str:
        """The trace, one event per line (for failure messages)."""
        return "\n".join(f"{e.time:10.6f} {e.kind:9} {e.src} -> {e.dst} {e.what} {e.why}".rstrip()
                         for e in self.trace)


def _group(group: Iterable[str] | str) -> list[str]:
    return [group] if isinstance(group, str) else sorted(group)


@contextlib.contextmanager
def seeded_trio_scheduler(seed: int) -> Iterator[None]:
    """Make trio's task scheduling repeatable for the duration of the block.

    trio runs each batch of runnable tasks in a randomly chosen order (on
    purpose, to shake out hidden ordering assumptions), drawing from the
    module-level RNG `trio._core._run._r`. The network orders what crosses it
    itself, but the tasks inside one process that wake together (an actor and
    a driver woken by the same delivery, say) run in that random order, and it
    can change which of them sends first. Seeding that RNG makes a whole run
    replay. Enter it before trio.run starts: around trio.run, or in a *sync*
    pytest fixture (pytest-trio starts the loop after those). It touches a
    private trio name; if trio moves it, this fails loudly.
    """
    from trio._core import _run

    rng: random.Random = _run._r
    state = rng.getstate()
    rng.seed(seed)
    try:
        yield
    finally:
        rng.setstate(state)
