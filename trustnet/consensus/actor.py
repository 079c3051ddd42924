"""ConsensusActor: the shell around the pure RaftCore (DESIGN principles 1, 5, 7).

One per registry replica, registered as "consensus" in the replica's
ActorSystem. It is the only place where the core meets time (a tick task),
the network (Raft messages are tells to the "consensus" actor at each peer's
address), the Raft log (MemoryStorage / SqliteRaftStorage) and the registry
state machine (RegistryState). One driver task runs the Ready loop in the
order core.py prescribes:

    persist (snapshot + entries + hard state, one transaction)
    -> send -> restore snapshot / apply committed -> serve reads -> advance

so a message never leaves before what it depends on is durable (a leader's
appends excepted: they leave while its own copy is written, see
_may_send_early), and a write is answered only after it is committed and
applied here. Restores, applies and reads go, in order, to an apply task
through a bounded queue, so the next Ready's fsync and sends overlap this
one's registry transaction (etcd applies in its own goroutine too); the apply
task also takes the registry snapshots the driver compacts the log with.

Requests (asks; every refusal below is retryable with the same request_id,
which client sessions make safe):

    Propose(command, request_id)  -> the command's result dict, or its Refused
                                     (with_index: {"result", "index", "term"})
    ReadBarrier()                 -> {"index", "term", "applied"} once a
                                     linearizable read may be served locally
    ClusterStatus()               -> members, leader, term, commit, applied, lag
    TransferLeadership(to)        -> status after the hand-over
    AddMember(id, address) / RemoveMember(id)

Followers forward Propose/ReadIndex/TransferLeadership/membership changes to
the leader's consensus actor (an ask) and relay its answer.
"""

from __future__ import annotations

import itertools
import logging
import random
import typing
from typing import Any, Awaitable, Callable, Protocol

import attrs
import orjson
import trio
from cattrs.gen import make_dict_structure_fn, make_dict_unstructure_fn, override

from actors import Actor, Letter, Refused
from actors.codec import converter, from_wire, message, refusal, to_wire
from actors.errors import ActorError, AskTimeout, MailboxFull
from actors.ws import is_tls
from trustnet.registry.commands import Command, ExpireNodes, Invalid
from trustnet.registry.state import RegistryState, Session

from .core import (
    LEADER,
    ConfChangeInProgress,
    NotLeader,
    ProposalDropped,
    RaftConfig,
    RaftCore,
    ReadState,
    Ready,
    must_sync,
)
from .messages import ALL_MESSAGES as RAFT_MESSAGES

log = logging.getLogger("trustnet.consensus")

NAME = "consensus"
COMMAND_TYPES = typing.get_args(Command)


# ------------------------------------------------------------------ messages

def _any_message_fields(cls, *fields: str):
    """Fields typed `object` carry any wire message, tagged (to_wire/from_wire)."""
    hooks = {f: override(struct_hook=lambda v, _t: from_wire(v), unstruct_hook=to_wire)
             for f in fields}
    converter.register_unstructure_hook(cls, make_dict_unstructure_fn(cls, converter, **hooks))
    converter.register_structure_hook(
        cls, make_dict_structure_fn(cls, converter, _cattrs_forbid_extra_keys=True, **hooks))
    return cls


@message("consensus.raft", trusted=True)
@attrs.frozen
class RaftEnvelope:
    """A Raft message between replicas; `sender` is the sending process's
    address, so a replica learns how to reach a member added after it booted."""

    sender: str
    msg: object


@message("consensus.propose", trusted=True)
@attrs.frozen
class Propose:
    """Commit `command` (a registry command) and apply it. `hops` > 0 marks a
    request forwarded by a follower: the receiver must lead, never forward again
    (two replicas that each believe the other leads must not ping-pong)."""

    command: object
    request_id: str = ""
    hops: int = 0
    # answer {"result", "index", "term"} (where the command was committed)
    # rather than the bare result: the HTTP facade puts them in X-Raft-*
    with_index: bool = False


@message("consensus.read_barrier", trusted=True)
@attrs.frozen
class ReadBarrier:
    pass


@message("consensus.read_index", trusted=True)
@attrs.frozen
class ReadIndex:
    """Follower -> leader: the leader's confirmed commit index (ReadIndex, thesis §6.4)."""

    hops: int = 0


@message("consensus.cluster_status", trusted=True)
@attrs.frozen
class ClusterStatus:
    hops: int = 0


@message("consensus.transfer_leadership", trusted=True)
@attrs.frozen
class TransferLeadership:
    to: str = ""  # empty: the most caught-up other voter
    hops: int = 0


@message("consensus.add_member", trusted=True)
@attrs.frozen
class AddMember:
    id: str
    address: str
    hops: int = 0


@message("consensus.remove_member", trusted=True)
@attrs.frozen
class RemoveMember:
    id: str
    hops: int = 0


for _cls, _fields in ((RaftEnvelope, ("msg",)), (Propose, ("command",))):
    _any_message_fields(_cls, *_fields)


# ------------------------------------------------------------------ refusals

@refusal
class NoLeader(Refused):
    """No leader could be found in time (HTTP 503). Retry later, same request_id."""

    def __init__(self, message: str, details: dict | None = None):
        super().__init__("no_leader", message, details)


@refusal
class NotLeaderHere(Refused):
    """A forwarded request reached a replica that does not lead (any more)."""

    def __init__(self, message: str, details: dict | None = None):
        super().__init__("not_leader", message, details)


@refusal
class NotCommitted(Refused):
    """The entry of this write was overwritten by another leader's: this copy
    was not applied. Retry (same request_id) is safe."""

    def __init__(self, message: str, details: dict | None = None):
        super().__init__("not_committed", message, details)


@refusal
class CommitUnknown(Refused):
    """No answer in time (or the replica stopped): the write may or may not be
    applied. Retry with the same request_id; the session returns the first result."""

    def __init__(self, message: str, details: dict | None = None):
        super().__init__("commit_unknown", message, details)


@refusal
class MembershipRefused(Refused):
    """code: "conf_change_in_progress" (retry later) or "invalid_member"."""

    def __init__(self, code: str, message: str, details: dict | None = None):
        super().__init__(code, message, details)


# ------------------------------------------------------------------ config

@attrs.frozen
class ConsensusConfig:
    tick: float = 0.010  # seconds per core tick (heartbeat 5 ticks, election 15-30)
    raft: RaftConfig = RaftConfig()
    snapshot_threshold: int = 10_000  # compact when this many entries were applied since
    propose_timeout: float = 5.0  # a write not applied by then: CommitUnknown
    no_leader_wait: float = 2.0  # how long a request waits for a leader to appear
    read_timeout: float = 5.0
    stop_transfer_timeout: float = 1.0  # on_stop: bounded leadership hand-over
    io_in_thread: bool = True  # fsyncs off the event loop; the sim sets False (determinism)
    max_apply_batch: int = 512  # committed entries per registry transaction
    send_while_persisting: bool = True  # a leader sends appends before its own fsync ends
    apply_queue: int = 64  # Ready parts handed to the apply task before the driver waits
    inline_apply_max: int = 16  # committed entries applied on the event loop, not in a thread
    inline_persist_max: int = 16  # entries a follower fsyncs on the event loop, not in a thread

    @property
    def election_timeout(self) -> float:
        """The longest randomized election timeout, in seconds."""
        return 2 * self.raft.election_ticks * self.tick


class Observer(Protocol):
    """Test hook (the simulation checks invariants through it)."""

    def leader(self, replica: str, term: int) -> None: ...

    def applied(self, replica: str, index: int, state: RegistryState) -> None: ...


def encode_command(request_id: str, command: Any) -> bytes:
    return orjson.dumps({"rid": request_id, "cmd": to_wire(command)})


def _stale_expiries(items, terms: dict[int, int]) -> dict[int, Refused]:
    """Entries carrying an ExpireNodes decided under another term than the
    one they were committed in: the leader decided it from the leases of an
    earlier leadership (it lost and regained the lead in between), which
    may miss renewals made elsewhere meanwhile. Refused, index -> why."""
    out = {}
    for index, cmd in items:
        command = getattr(cmd, "command", None)
        if isinstance(command, ExpireNodes) and command.term and command.term != terms[index]:
            out[index] = Refused("stale_term", f"an expiry decided in term {command.term} "
                                 f"reached the log in term {terms[index]}: not applied")
    return out


def decode_command(data: bytes) -> Session:
    # A ProtocolError here means an entry this version cannot read: crash
    # loudly rather than skip it and diverge from replicas that can.
    value = orjson.loads(data)
    return Session(value["rid"], from_wire(value["cmd"]))


class _Slot:
    """Where a request task waits for the driver (an apply result, a read index)."""

    __slots__ = ("term", "event", "value", "error")

    def __init__(self, term: int = 0):
        self.term = term
        self.event = trio.Event()
        self.value: Any = None
        self.error: BaseException | None = None

    def set(self, value: Any) -> None:
        if not self.event.is_set():
            self.value = value
            self.event.set()

    def fail(self, error: BaseException) -> None:
        if not self.event.is_set():
            self.error = error
            self.event.set()

    async def wait(self) -> Any:
        await self.event.wait()
        if self.error is not None:
            raise self.error
        return self.value


# ------------------------------------------------------------------ the actor

class ConsensusActor(Actor):
    def __init__(self, id: str, *, voters: tuple[str, ...], addresses: dict[str, str],
                 storage: Any, state: RegistryState, config: ConsensusConfig = ConsensusConfig(),
                 rng: random.Random | None = None, observer: Observer | None = None):
        self.id = id
        self.voters = tuple(voters)  # founding members; () for a replica that joins later
        self.addresses = dict(addresses)  # replica id -> actor-system address
        self.storage = storage
        self.state = state
        self.cfg = config
        self.rng = rng or random.Random()
        self.observer = observer
        self.core: RaftCore | None = None
        self.abandoned = False  # see abandon()
        self._wake = trio.Event()
        self._changed = trio.Event()  # set (and replaced) when leader/role or applied moves
        self._proposals: dict[int, _Slot] = {}  # log index -> the local proposer
        self._reads: dict[int, _Slot] = {}  # read ctx -> waiting ReadIndex
        self._read_ctx = itertools.count(1)
        self._compacted_at = 0
        self._in_flight: Ready | None = None  # a Ready between ready() and advance()
        # -> the apply task: ("restore", Snapshot) | ("apply", entries) | ("reads", states)
        self._applier: trio.MemorySendChannel | None = None
        self._snapshot_taken: tuple[int, bytes] | None = None  # for _maybe_compact
        self._compacting = False  # the log's compaction is being written

    # ------------------------------------------------------------ lifecycle

    async def on_start(self) -> None:
        snap = self.storage.snapshot
        if snap is not None and snap.index > self.state.applied_index:
            # Crashed after storing a received snapshot, before restoring it.
            self.state.restore(snap.data, snap.index)
        self._compacted_at = snap.index if snap is not None else 0
        self.core = RaftCore(self.id, self.voters, rng=self.rng,
                             storage=self.storage.state(applied=self.state.applied_index),
                             config=self.cfg.raft)
        self._applier, items = trio.open_memory_channel(self.cfg.apply_queue)
        self.nursery.start_soon(self._apply_loop, items)
        self.nursery.start_soon(self._tick_loop)
        self.nursery.start_soon(self._drive_loop)
        self._kick()  # a founding member's bootstrap entry is persisted at once

    def abandon(self) -> None:
        """The process is dying without ceremony (kill -9 in the simulation):
        on_stop must do nothing more."""
        self.abandoned = True

    async def on_stop(self) -> None:
        """Graceful stop of a leader: hand leadership to the most caught-up
        voter (TimeoutNow), bounded, so the cluster does not wait an election
        timeout. Our helper tasks are gone by now, so drive the core here."""
        self._applier = None  # the apply task is gone with the nursery
        core = self.core
        if self.abandoned or core is None or core.role != LEADER:
            return
        if self._in_flight is not None:
            # Cancelled inside a Ready (waiting on a thread): the core cannot go
            # on without it; a normal election will replace us.
            return
        target = self._best_transferee()
        if target is None:
            return
        try:
            core.transfer_leadership(target)
        except (NotLeader, ValueError):
            return
        try:
            box = self.system.mailbox_of(self.ref.name)
        except ActorError:
            return
        with trio.move_on_after(self.cfg.stop_transfer_timeout):
            while core.role == LEADER:
                while True:
                    try:
                        letter = box.get_nowait()
                    except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                        break
                    if isinstance(letter.msg, RaftEnvelope):
                        self._on_raft(letter.msg)
                    else:
                        letter.fail(NoLeader("replica is stopping"))
                await self._drain_ready()
                await trio.sleep(self.cfg.tick)
                core.tick()
        log.info("stopped", extra={"replica": self.id, "leader_after": core.lead})

    def _best_transferee(self) -> str | None:
        others = [(pr.match, v) for v, pr in self.core.progress.items() if v != self.id]
        return max(others)[1] if others else None

    # ------------------------------------------------------------ letters

    async def handle(self, letter: Letter) -> None:
        msg = letter.msg
        if isinstance(msg, RaftEnvelope):
            if self._from_its_sender(letter.sender, msg.sender):
                self._on_raft(msg)
            return
        handler = self._handlers().get(type(msg))
        if handler is None:
            await super().handle(letter)
            return
        # Requests wait for commits; the mailbox must keep flowing meanwhile.
        self.nursery.start_soon(self._answer, letter, handler)

    def _handlers(self) -> dict[type, Callable[[Any], Awaitable[Any]]]:
        return {Propose: self._propose, ReadBarrier: self._read_barrier,
                ReadIndex: self._read_index_request, ClusterStatus: self._status,
                TransferLeadership: self._transfer, AddMember: self._add_member,
                RemoveMember: self._remove_member}

    async def _answer(self, letter: Letter, handler) -> None:
        try:
            letter.answer(await handler(letter.msg))
        except Refused as refused:
            letter.fail(refused)
        finally:
            reply = letter.reply
            if reply is not None and not reply.done:  # cancelled: the replica stops
                letter.fail(CommitUnknown("replica stopped before answering"))

    def _from_its_sender(self, link: str | None, sender: str) -> bool:
        """A Raft message names the address its replica is reached at, and
        we route to that replica by it: it must be the link it came over
        (only members send these, but one must not redirect another's traffic)."""
        if link is None or self._same_address(sender, link):
            return True  # (None: sent in this process, in tests)
        log.warning("raft message whose sender is not the link it came over, dropped",
                    extra={"sender": sender, "link": link})
        return False

    def _on_raft(self, env: RaftEnvelope) -> None:
        m = env.msg
        if not isinstance(m, RAFT_MESSAGES):
            log.warning("not a raft message", extra={"type": type(m).__name__})
            return
        if m.from_id != self.id:
            known = self.addresses.get(m.from_id)
            if known is None:
                # a member added after we booted: this is how we learn where it is
                self.addresses[m.from_id] = env.sender
            elif not self._same_address(known, env.sender):
                # Ids are never reused: another process speaking for a member
                # we know elsewhere would take over its traffic.
                log.warning("raft message from a member at another address than its own, "
                            "dropped", extra={"member": m.from_id, "sender": env.sender,
                                              "known": known})
                return
        self.core.step(m)
        self._kick()

    def _same_address(self, a: str, b: str) -> bool:
        """Whether two spellings name one process (as the transport names links)."""
        if a == b:
            return True
        transport = self.system.transport
        try:
            return transport is not None and transport.link_address(a) == transport.link_address(b)
        except ValueError:
            return False

    # ------------------------------------------------------------ driver

    def _kick(self) -> None:
        self._wake.set()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def _tick_loop(self) -> None:
        while True:
            await trio.sleep(self.cfg.tick)
            self.core.tick()
            self._kick()

    async def _drive_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            await self._drain_ready()
            await self._maybe_compact()

    async def _drain_ready(self) -> None:
        while (rd := self.core.ready()) is not None:
            self._in_flight = rd
            await self._process(rd, self.core.term)
            self._in_flight = None

    async def _io(self, fn: Callable, *args: Any) -> Any:
        if self.cfg.io_in_thread:
            return await trio.to_thread.run_sync(fn, *args)
        return fn(*args)

    async def _process(self, rd: Ready, term: int) -> None:
        # 1. durable before anything that depends on it leaves, except that a
        # leader's appends may leave while its own copy is written (the core
        # counts our copy only once advance() says it is durable)
        early = self._may_send_early(rd)
        if early:
            for m in rd.messages:
                self._send(m)
        if self._compacting or (must_sync(rd, self.storage.hard_state)
                                and not self._persist_inline(rd, early)):
            await self._io(self.storage.apply, rd)
        else:
            self.storage.apply(rd)
        # 2. send
        if not early:
            for m in rd.messages:
                self._send(m)
        # 3. restore, apply, 4. serve reads (their index is applied by then):
        # in order, by the apply task, so that the next Ready's fsync and
        # sends do not wait for this one's registry transaction
        work = [(k, v) for k, v in (("restore", rd.snapshot), ("apply", rd.committed),
                                    ("reads", rd.read_states)) if v]
        if self._applier is not None:
            for item in work:
                await self._applier.send(item)
        else:  # stopping: the apply task is gone
            for item in work:
                await self._apply_one(*item)
        # 5.
        self.core.advance(rd)
        if rd.entries:
            self._fail_overwritten()
        if rd.soft_state is not None:
            self._on_soft_state(rd.soft_state.role, term)
            self._notify()

    async def _apply_loop(self, items: trio.MemoryReceiveChannel) -> None:
        async for kind, value in items:
            await self._apply_one(kind, value)
            if kind != "reads":
                self._notify()
                await self._maybe_snapshot()

    async def _apply_one(self, kind: str, value: Any) -> None:
        if kind == "restore":
            await self._io(self.state.restore, value.data, value.index)
            self._compacted_at = max(self._compacted_at, value.index)
            for index in [i for i in self._proposals if i <= value.index]:
                self._proposals.pop(index).fail(CommitUnknown(
                    f"entry {index} was covered by a snapshot from the leader"))
            if self.observer is not None:
                self.observer.applied(self.id, value.index, self.state)
        elif kind == "apply":
            await self._apply(value)
        else:
            self._serve_reads(value)

    def _persist_inline(self, rd: Ready, early: bool) -> bool:
        """Whether to write `rd` on the event loop rather than in a thread:
        a few entries whose acknowledgement waits for them (a follower's, or
        anything not sent early). The thread round trip costs about as much as
        the write itself here (0.2 of 0.3-0.5 ms), on the commit's critical path."""
        return (not early and rd.snapshot is None
                and len(rd.entries) <= self.cfg.inline_persist_max)

    def _may_send_early(self, rd: Ready) -> bool:
        """A leader's messages do not depend on its own new entries being on
        disk (thesis §10.2.1); they do on its term and vote, so not when those
        change (stepping down) or a snapshot is being installed."""
        if self.core.role != LEADER or rd.snapshot is not None or not self.cfg.send_while_persisting:
            return False
        hs, stored = rd.hard_state, self.storage.hard_state
        return hs is None or (hs.term, hs.vote) == (stored.term, stored.vote)

    def _send(self, m: Any) -> None:
        address = self.addresses.get(m.to_id)
        if address is None:
            return  # unknown yet: we learn it when that member sends to us
        try:
            self.system.ref(NAME, address).tell_nowait(RaftEnvelope(self.system.address, m))
        except (MailboxFull, ActorError) as exc:
            # Raft tolerates loss; the next heartbeat or append retries.
            log.debug("raft message dropped", extra={"to": m.to_id, "error": str(exc)})

    async def _apply(self, entries) -> None:
        items = [(e.index, decode_command(e.data) if e.kind == "normal" else None) for e in entries]
        terms = {e.index: e.term for e in entries}
        stale = _stale_expiries(items, terms)
        if stale:  # applied as no-ops (the same on every replica: both terms are in the log)
            items = [(index, None if index in stale else cmd) for index, cmd in items]
        step = self.cfg.max_apply_batch
        for k in range(0, len(items), step):
            chunk = items[k:k + step]
            if len(chunk) <= self.cfg.inline_apply_max:
                # A replica's registry commits without fsync: a small batch
                # costs less than the round trip to a worker thread.
                results = self.state.apply_batch(chunk)
            else:
                results = await self._io(self.state.apply_batch, chunk)
            if self.observer is not None:
                self.observer.applied(self.id, chunk[-1][0], self.state)
            for (index, _), result in zip(chunk, results):
                slot = self._proposals.pop(index, None)
                if slot is None:
                    continue
                if index in stale:
                    slot.fail(stale[index])
                elif terms[index] != slot.term:
                    slot.fail(NotCommitted(f"entry {index} of term {slot.term} was replaced "
                                           f"by one of term {terms[index]}"))
                elif isinstance(result, Refused):
                    slot.fail(result)
                else:
                    slot.set(result)

    def _fail_overwritten(self) -> None:
        for index in list(self._proposals):
            term = self.core.term_at(index)
            if term is not None and term != self._proposals[index].term:
                self._proposals.pop(index).fail(NotCommitted(
                    f"entry {index} was replaced by one of term {term}"))

    def _serve_reads(self, read_states: tuple[ReadState, ...]) -> None:
        for rs in read_states:
            slot = self._reads.pop(rs.ctx, None)
            if slot is not None:
                slot.set(rs.index)

    def _on_soft_state(self, role: str, term: int) -> None:
        if role == LEADER:
            if self.observer is not None:
                self.observer.leader(self.id, term)
            log.info("leader", extra={"replica": self.id, "term": term})
        elif self._reads:
            # A deposed leader's pending reads are dropped by the core: their
            # waiters retry through whoever leads now.
            reads, self._reads = self._reads, {}
            for slot in reads.values():
                slot.fail(NotLeaderHere("leadership lost during the read"))

    async def _maybe_snapshot(self) -> None:
        """(apply task) Take a registry snapshot once enough was applied since
        the last; the driver compacts the log with it between two Readys."""
        if (self._snapshot_taken is not None
                or self.state.applied_index - self._compacted_at < self.cfg.snapshot_threshold):
            return
        data = await self._io(self.state.snapshot)
        # The apply task is the only writer: nothing was applied meanwhile.
        self._snapshot_taken = (self.state.applied_index, data)
        self._kick()

    async def _maybe_compact(self) -> None:
        if self._snapshot_taken is None or self._compacting:
            return
        (index, data), self._snapshot_taken = self._snapshot_taken, None
        if index <= self._compacted_at:
            return  # a snapshot from the leader got there first
        self.core.compact(index, data)
        self._compacted_at = index
        # The core keeps the snapshot it sends to laggards; persist that same
        # one. In the background: deleting thousands of log rows takes long
        # enough that a driver waiting for it would miss heartbeats (and its
        # followers would elect another leader); meanwhile every write to the
        # log goes through a thread (see _process), as it waits for this one.
        self._compacting = True
        self.nursery.start_soon(self._store_compaction, self.core._snapshot)

    async def _store_compaction(self, snapshot) -> None:
        try:
            await self._io(self.storage.compact, snapshot)
        finally:
            self._compacting = False

    # ------------------------------------------------------------ finding the leader

    async def _wait_change(self, deadline: float) -> None:
        with trio.move_on_at(deadline):
            await self._changed.wait()

    async def _leader_or_forward(self, msg: Any, deadline: float,
                                 local: Callable[[], Awaitable[Any]]) -> Any:
        """Run `local()` if we lead; else forward `msg` (hops+1) to the leader,
        retrying across leader changes until `deadline`; wait at most
        no_leader_wait for a leader to show up."""
        give_up_at: float | None = None  # set while there is no leader
        while True:
            now = trio.current_time()
            if now >= deadline:
                raise CommitUnknown(f"no answer within the deadline ({type(msg).__name__})")
            core = self.core
            if core.role == LEADER:
                return await local()
            if msg.hops > 0:
                raise NotLeaderHere(f"{self.id} is not the leader", {"leader": core.lead})
            leader = core.lead
            address = self.addresses.get(leader) if leader is not None else None
            if address is None:
                if give_up_at is None:
                    give_up_at = now + self.cfg.no_leader_wait
                elif now >= give_up_at:  # (compare instants, never differences: floats)
                    raise NoLeader(f"no leader elected within {self.cfg.no_leader_wait}s",
                                   {"replica": self.id})
                await self._wait_change(min(deadline, give_up_at))
                continue
            give_up_at = None
            try:
                return await self.system.ref(NAME, address).ask(
                    attrs.evolve(msg, hops=msg.hops + 1), timeout=deadline - now)
            except NotLeaderHere:
                pass  # it lost leadership (or never had it): wait for news, retry
            except AskTimeout:
                raise CommitUnknown(f"leader {leader} did not answer in time") from None
            except (ActorError, MailboxFull) as exc:
                if isinstance(exc, Refused):
                    raise
            # Give the election a moment (bounded) before asking again.
            await self._wait_change(min(deadline, trio.current_time() + self.cfg.election_timeout / 2))

    # ------------------------------------------------------------ requests

    async def _propose(self, msg: Propose) -> Any:
        if not isinstance(msg.command, COMMAND_TYPES):
            raise Invalid(f"not a registry command: {type(msg.command).__name__}")
        deadline = trio.current_time() + self.cfg.propose_timeout
        data = encode_command(msg.request_id, msg.command)

        async def local() -> Any:
            core = self.core
            try:
                index = core.propose(data)
            except (NotLeader, ProposalDropped):
                # A transfer is under way (or we just lost the lead): try again soon.
                await self._wait_change(min(deadline, trio.current_time() + self.cfg.election_timeout / 2))
                return await self._leader_or_forward(msg, deadline, local)
            slot = self._proposals[index] = _Slot(core.term)
            self._kick()
            with trio.move_on_at(deadline):
                result = await slot.wait()
                if msg.with_index:
                    return {"result": result, "index": index, "term": slot.term}
                return result
            self._proposals.pop(index, None)
            raise CommitUnknown(f"entry {index} not applied within {self.cfg.propose_timeout}s")

        return await self._leader_or_forward(msg, deadline, local)

    async def _local_read_index(self, deadline: float) -> int:
        ctx = next(self._read_ctx)
        try:
            self.core.read_index(ctx)
        except NotLeader:
            raise NotLeaderHere(f"{self.id} is not the leader", {"leader": self.core.lead}) from None
        slot = self._reads[ctx] = _Slot()
        self._kick()
        with trio.move_on_at(deadline):
            return await slot.wait()
        self._reads.pop(ctx, None)
        raise CommitUnknown("leadership not confirmed in time for a read")

    async def _read_index_request(self, msg: ReadIndex) -> int:
        deadline = trio.current_time() + self.cfg.read_timeout
        return await self._leader_or_forward(msg, deadline, lambda: self._local_read_index(deadline))

    async def _read_barrier(self, msg: ReadBarrier) -> dict:
        deadline = trio.current_time() + self.cfg.read_timeout
        while True:
            try:
                index = await self._leader_or_forward(
                    ReadIndex(), deadline, lambda: self._local_read_index(deadline))
                break
            except NotLeaderHere:  # we led when asked, and lost it meanwhile
                await self._wait_change(min(deadline, trio.current_time() + self.cfg.election_timeout / 2))
                if trio.current_time() >= deadline:
                    raise CommitUnknown("no read index within the deadline") from None
        while self.state.applied_index < index:
            if trio.current_time() >= deadline:
                raise CommitUnknown(f"replica has not applied the read index {index} in time")
            await self._wait_change(deadline)
        return {"index": index, "term": self.core.term, "applied": self.state.applied_index}

    async def _status(self, msg: ClusterStatus) -> dict:
        st = self.core.status()
        st["members"] = {v: self.addresses.get(v) for v in st["voters"]}
        if self.core.role == LEADER:
            last = st["last_index"]
            st["lag"] = {p: last - pr["match"] for p, pr in st["progress"].items()}
        elif msg.hops == 0 and self.core.lead in self.addresses:
            try:  # the lag is only known on the leader
                lead = await self.system.ref(NAME, self.addresses[self.core.lead]).ask(
                    ClusterStatus(hops=1), timeout=self.cfg.election_timeout)
                st["progress"], st["lag"] = lead.get("progress", {}), lead.get("lag", {})
            except ActorError:
                pass
        return st

    async def _transfer(self, msg: TransferLeadership) -> dict:
        deadline = trio.current_time() + 2 * self.cfg.election_timeout

        async def local() -> dict:
            to = msg.to or self._best_transferee()
            try:
                self.core.transfer_leadership(to)
            except ValueError as exc:
                raise MembershipRefused("invalid_member", str(exc)) from None
            self._kick()
            while self.core.role == LEADER and trio.current_time() < deadline:
                await self._wait_change(deadline)
            return await self._status(ClusterStatus(hops=1))

        return await self._leader_or_forward(msg, deadline, local)

    async def _conf_change(self, msg: Any, op: str) -> dict:
        deadline = trio.current_time() + self.cfg.propose_timeout

        async def local() -> dict:
            core = self.core
            try:
                index = core.propose_conf_change(op, msg.id)
            except ConfChangeInProgress as exc:
                raise MembershipRefused("conf_change_in_progress", str(exc)) from None
            except ValueError as exc:
                raise MembershipRefused("invalid_member", str(exc)) from None
            except (NotLeader, ProposalDropped) as exc:
                raise NoLeader(str(exc)) from None
            slot = self._proposals[index] = _Slot(core.term)
            self._kick()
            with trio.move_on_at(deadline):
                await slot.wait()
                return {"index": index, "voters": sorted(self.core.voters)}
            self._proposals.pop(index, None)
            raise CommitUnknown(f"membership change at {index} not applied in time")

        return await self._leader_or_forward(msg, deadline, local)

    async def _add_member(self, msg: AddMember) -> dict:
        own = self.addresses.get(self.id)
        if own is not None and is_tls(msg.address) != is_tls(own):
            raise MembershipRefused("invalid_member", (
                f"address {msg.address!r}: the replicas of this group listen with "
                + ("TLS (wss://)" if is_tls(own) else "no TLS (ws://)")))
        self.addresses[msg.id] = msg.address
        return await self._conf_change(msg, "add")

    async def _remove_member(self, msg: RemoveMember) -> dict:
        return await self._conf_change(msg, "remove")
