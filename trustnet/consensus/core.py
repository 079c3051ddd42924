"""The pure Raft core: a state machine in the etcd-io/raft Ready/Advance style.

Nothing in here touches time, randomness (a seeded `random.Random` is passed
in), threads, trio, sockets or disks. The shell drives it:

    core.tick()                      every tick (10 ms by default)
    core.step(msg)                   for every Raft message received
    core.propose(data) -> index      on the leader (NotLeader elsewhere)
    core.read_index(ctx)             linearizable read, see ReadState
    core.transfer_leadership(to)     graceful hand-over (TimeoutNow)
    core.propose_conf_change(op, id) add/remove one voter
    core.compact(index, data)        after the application took a snapshot

and then, in a loop:

    rd = core.ready()
    if rd is not None:
        1. persist, in ONE durable transaction, in this order:
           rd.snapshot (replaces the whole stored log),
           rd.entries (first delete every stored entry with index >=
           rd.truncate_from, then append), rd.hard_state;
        2. send rd.messages (only now: they may depend on step 1);
        3. restore rd.snapshot into the state machine, then apply
           rd.committed in order (applied index in the same transaction);
        4. serve rd.read_states (their index is applied after step 3);
        5. core.advance(rd).

    Two liberties are allowed. A leader's messages may be sent before step 1
    when rd.hard_state keeps the stored term and vote and there is no
    snapshot: they depend only on those, and the leader counts its own copy
    of new entries towards a commit only once advance() says they are durable
    (thesis §10.2.1). And step 1 needs no fsync when must_sync() says so
    (only the commit index moved). Steps 3-4 may be handed, in order, to
    another task, as long as reads wait for their index to be applied.

`MemoryStorage` below implements step 1 in memory with exactly these rules;
the sim harness and the unit tests use it, the SQLite log mirrors it.

Algorithms follow the Raft thesis and etcd-io/raft: randomized election
timeout, pre-vote, check-quorum, pipelined/batched replication with a
conflict hint for fast back-off, commit by counting only entries of the
current term, ReadIndex, leadership transfer, single-server membership
changes (effective on append), snapshots sent in chunks.
"""

from __future__ import annotations

import random
from collections import deque
from typing import Iterable

import attrs

from actors.codec import from_wire, to_wire
from .messages import (
    AppendEntries,
    AppendResponse,
    ConfChange,
    Entry,
    Heartbeat,
    HeartbeatResponse,
    InstallSnapshot,
    InstallSnapshotResponse,
    TimeoutNow,
    VoteRequest,
    VoteResponse,
)

FOLLOWER = "follower"
PRE_CANDIDATE = "pre_candidate"
CANDIDATE = "candidate"
LEADER = "leader"


# ------------------------------------------------------------------ errors


class RaftError(Exception):
    """Base of the core's refusals."""


class NotLeader(RaftError):
    """Only the leader accepts this; `leader_hint` is who we think leads (or None)."""

    def __init__(self, leader_hint: str | None):
        super().__init__(f"not the leader (leader hint: {leader_hint})")
        self.leader_hint = leader_hint


class ProposalDropped(RaftError):
    """The leader refuses proposals for now (leadership transfer in progress)."""


class ConfChangeInProgress(RaftError):
    """A membership change is still uncommitted; only one may be pending."""


# ------------------------------------------------------------------ data


@attrs.frozen
class RaftConfig:
    heartbeat_ticks: int = 5
    # The election timeout is randomized in [election_ticks, 2*election_ticks).
    election_ticks: int = 15
    max_batch_entries: int = 256
    max_inflight: int = 64  # append messages in flight per follower
    pre_vote: bool = True
    check_quorum: bool = True
    snapshot_chunk_bytes: int = 64 * 1024

    def __attrs_post_init__(self):
        if not 0 < self.heartbeat_ticks < self.election_ticks:
            raise ValueError("need 0 < heartbeat_ticks < election_ticks")
        if self.max_batch_entries < 1 or self.max_inflight < 1 or self.snapshot_chunk_bytes < 1:
            raise ValueError("max_batch_entries, max_inflight, snapshot_chunk_bytes must be >= 1")


@attrs.frozen
class HardState:
    term: int = 0
    vote: str | None = None
    commit: int = 0


@attrs.frozen
class SoftState:
    leader: str | None
    role: str


@attrs.frozen
class Snapshot:
    """The application state up to and including `index` (whose term is `term`),
    and the voters as of that index."""

    index: int
    term: int
    voters: tuple[str, ...]
    data: bytes


@attrs.frozen
class ReadState:
    """A linearizable read: serve it once the state machine applied `index`.
    The core only emits it in a Ready whose committed entries reach `index`."""

    index: int
    ctx: object


@attrs.frozen
class PersistedState:
    """What the shell read back from disk on start."""

    hard_state: HardState = HardState()
    entries: tuple[Entry, ...] = ()  # the log after the snapshot, contiguous
    snapshot: Snapshot | None = None
    applied: int | None = None  # the state machine's applied index (default: snapshot index)


@attrs.frozen
class Ready:
    hard_state: HardState | None  # persist if not None
    entries: tuple[Entry, ...]  # persist: delete stored entries >= truncate_from, append these
    snapshot: Snapshot | None  # persist (replaces the stored log) and restore
    messages: tuple  # send only after the above are durable
    committed: tuple[Entry, ...]  # apply in order, after the above
    read_states: tuple[ReadState, ...]  # serve after applying `committed`
    soft_state: SoftState | None  # leader/role changed (informational)

    @property
    def truncate_from(self) -> int | None:
        """Stored entries with index >= this are replaced by `entries`."""
        return self.entries[0].index if self.entries else None


def must_sync(rd: Ready, stored: HardState) -> bool:
    """Whether persisting `rd` needs a durable write (etcd's MustSync): new
    entries, a snapshot, or a new term or vote. A commit index alone does
    not: it is learnt again from the leader or from the applied index."""
    if rd.entries or rd.snapshot is not None:
        return True
    hs = rd.hard_state
    return hs is not None and (hs.term, hs.vote) != (stored.term, stored.vote)


def encode_conf_change(cc: ConfChange) -> bytes:
    import orjson  # local: only conf entries need it

    return orjson.dumps(to_wire(cc))


def decode_conf_change(data: bytes) -> ConfChange:
    import orjson

    cc = from_wire(orjson.loads(data))
    if not isinstance(cc, ConfChange) or cc.op not in ("add", "remove", "set"):
        raise ValueError(f"not a conf change: {data!r}")
    return cc


# ------------------------------------------------------------------ storage


class MemoryStorage:
    """Durable state kept in memory, updated with the exact Ready rules.

    Used by tests and the simulation; `state()` is what a restart reads back."""

    def __init__(self, state: PersistedState | None = None):
        state = state or PersistedState()
        self.hard_state = state.hard_state
        self.snapshot = state.snapshot
        self.entries: list[Entry] = list(state.entries)

    @property
    def first_index(self) -> int:
        return (self.snapshot.index if self.snapshot else 0) + 1

    def last_index(self) -> int:
        return self.first_index - 1 + len(self.entries)

    def term(self, index: int) -> int | None:
        base = self.first_index - 1
        if index == base:
            return self.snapshot.term if self.snapshot else 0
        if base < index <= self.last_index():
            return self.entries[index - base - 1].term
        return None

    def apply(self, rd: Ready) -> None:
        if rd.snapshot is not None:
            self.snapshot = rd.snapshot
            self.entries = []
        if rd.entries:
            first = rd.entries[0].index
            if not self.first_index <= first <= self.last_index() + 1:
                raise AssertionError(f"gap: storing {first} after {self.last_index()}")
            del self.entries[first - self.first_index:]
            self.entries.extend(rd.entries)
        if rd.hard_state is not None:
            if rd.hard_state.commit > self.last_index():
                raise AssertionError("commit persisted ahead of the log")
            self.hard_state = rd.hard_state

    def compact(self, snapshot: Snapshot) -> None:
        """The application took `snapshot`: drop the covered log prefix."""
        if self.snapshot is not None and snapshot.index <= self.snapshot.index:
            return
        keep = [e for e in self.entries if e.index > snapshot.index]
        self.snapshot = snapshot
        self.entries = keep

    def state(self, applied: int | None = None) -> PersistedState:
        return PersistedState(self.hard_state, tuple(self.entries), self.snapshot, applied)


# ------------------------------------------------------------------ progress

PROBE, REPLICATE, SNAPSHOT = "probe", "replicate", "snapshot"


class Progress:
    """The leader's view of one follower (etcd's tracker.Progress)."""

    __slots__ = ("match", "next", "state", "probe_sent", "inflight", "recent_active",
                 "sent_commit", "want_append", "snap_index", "snap_offset")

    def __init__(self, next_index: int):
        self.match = 0
        self.next = next_index
        self.state = PROBE
        self.probe_sent = False  # probe: one append in flight, wait for its answer
        self.inflight: deque[int] = deque()  # replicate: last index of each append in flight
        self.recent_active = False
        self.sent_commit = 0
        self.want_append = False  # send an append even if it carries nothing new
        self.snap_index = 0
        self.snap_offset = 0

    def become_probe(self) -> None:
        self.state = PROBE
        self.next = self.match + 1
        self.probe_sent = False
        self.inflight.clear()

    def become_replicate(self) -> None:
        self.state = REPLICATE
        self.next = self.match + 1
        self.inflight.clear()

    def become_snapshot(self, index: int) -> None:
        self.state = SNAPSHOT
        self.snap_index = index
        self.snap_offset = 0
        self.inflight.clear()

    def paused(self, max_inflight: int) -> bool:
        if self.state == PROBE:
            return self.probe_sent
        if self.state == REPLICATE:
            return len(self.inflight) >= max_inflight
        return True

    def maybe_update(self, index: int) -> bool:
        """A success ack up to `index`; True if match advanced."""
        while self.inflight and self.inflight[0] <= index:
            self.inflight.popleft()
        if index <= self.match:
            return False
        self.match = index
        self.next = max(self.next, index + 1)
        return True

    def maybe_decrease(self, rejected: int, probe_hint: int) -> bool:
        """A reject of prev_index `rejected`; False if the reject is stale."""
        if self.state == REPLICATE:
            if rejected <= self.match:
                return False
            self.become_probe()  # next = match+1; refined below by the hint
        elif self.next - 1 != rejected:
            return False  # answers an older probe
        self.next = max(min(rejected, probe_hint + 1), self.match + 1)
        self.probe_sent = False
        return True


@attrs.define
class _PendingRead:
    seq: int
    index: int
    ctx: object
    acks: set


@attrs.define
class _IncomingSnapshot:
    key: tuple  # (leader, term, last_index, last_term): chunks of different snapshots never mix
    buf: bytearray


# ------------------------------------------------------------------ the core


class RaftCore:
    def __init__(
        self,
        id: str,
        voters: Iterable[str],
        *,
        rng: random.Random,
        storage: PersistedState | None = None,
        config: RaftConfig | None = None,
    ):
        self.id = id
        self.role = FOLLOWER
        self.cfg = config or RaftConfig()
        self._rng = rng
        st = storage or PersistedState()

        # The log: entries after the snapshot point (snap_index, snap_term).
        snap = st.snapshot
        voters = tuple(sorted(set(voters)))
        bootstrap = not st.entries and snap is None and st.hard_state.term == 0 and bool(voters)
        if bootstrap:
            # Every founding member writes the same committed entry 1 holding the
            # initial voters (term 1), so that a member added later learns them
            # from the log like any other configuration.
            first = Entry(1, 1, "conf", encode_conf_change(ConfChange("set", voters=list(voters))))
            st = attrs.evolve(st, entries=(first,), hard_state=HardState(1, None, 1))
        self._snapshot: Snapshot | None = snap  # newest snapshot we hold (sent to laggards)
        self._snap_index = snap.index if snap else 0
        self._snap_term = snap.term if snap else 0
        self._entries: list[Entry] = list(st.entries)
        if self._entries and self._entries[0].index != self._snap_index + 1:
            raise ValueError("stored entries do not start right after the snapshot")
        self._stabled = 0 if bootstrap else self.last_index  # everything up to here is durable
        # Voters before any conf entry of the log: the snapshot's, else the bootstrap set.
        self._base_voters = frozenset(snap.voters) if snap else frozenset(voters)
        self.voters: frozenset[str] = frozenset()
        self._last_conf_index = 0
        self._recompute_config()

        hs = st.hard_state
        self.term = hs.term
        self.vote = hs.vote
        self.applied = st.applied if st.applied is not None else self._snap_index
        self.applied = max(self.applied, self._snap_index)
        # The stored commit may lag (must_sync: a commit-only change is not
        # worth an fsync); what the state machine applied was committed.
        self.commit = max(hs.commit, self._snap_index, min(self.applied, self.last_index))
        if self.commit > self.last_index:
            raise ValueError("stored commit is ahead of the stored log")
        self._prev_hard = HardState() if bootstrap else HardState(self.term, self.vote, self.commit)

        self.role = FOLLOWER
        self.lead: str | None = None
        self._prev_soft = SoftState(None, FOLLOWER)
        self._msgs: list = []
        self._ready_out = False
        self._unstable_snapshot: Snapshot | None = None
        self._incoming: _IncomingSnapshot | None = None

        self.progress: dict[str, Progress] = {}
        self._votes: dict[str, bool] = {}
        self.lead_transferee: str | None = None
        self._pending_conf_index = 0
        self._read_seq = 0
        self._pending_reads: list[_PendingRead] = []
        self._reads_before_commit: list[object] = []  # until an entry of our term commits
        self._confirmed_reads: list[ReadState] = []

        self.election_elapsed = 0
        self.heartbeat_elapsed = 0
        self._randomized_timeout = 0
        self._reset_timers()

    # ============================================================ log helpers

    @property
    def last_index(self) -> int:
        return self._snap_index + len(self._entries)

    def last_term(self) -> int:
        return self._entries[-1].term if self._entries else self._snap_term

    def term_at(self, index: int) -> int | None:
        """Term of the entry at `index`; None if compacted away or beyond the log."""
        if index == self._snap_index:
            return self._snap_term
        if self._snap_index < index <= self.last_index:
            return self._entries[index - self._snap_index - 1].term
        return None

    def entries_between(self, lo: int, hi: int) -> list[Entry]:
        """Entries with lo <= index < hi (lo must be > the snapshot index)."""
        base = self._snap_index + 1
        return self._entries[lo - base: hi - base]

    def _append(self, entries: list[Entry]) -> None:
        """Append, replacing any suffix from entries[0].index on (a conflict)."""
        first = entries[0].index
        if first <= self.commit:
            raise AssertionError(f"{self.id}: truncating committed entry {first} (commit {self.commit})")
        cut = first - self._snap_index - 1
        removed_conf = any(e.kind == "conf" for e in self._entries[cut:])
        del self._entries[cut:]
        self._entries.extend(entries)
        # Entries from `first` on must be persisted again (the Ready's truncation point).
        self._stabled = min(self._stabled, first - 1)
        if removed_conf or any(e.kind == "conf" for e in entries):
            self._recompute_config()

    def _find_conflict_by_term(self, index: int, term: int) -> tuple[int, int]:
        """The largest index <= `index` whose term is <= `term`, with its term.
        A follower rejecting an append sends this as its hint; the leader uses it
        to skip whole terms at once (etcd's findConflictByTerm)."""
        i = min(index, self.last_index)
        while i > self._snap_index:
            t = self.term_at(i)
            if t <= term:
                return i, t
            i -= 1
        return self._snap_index, self._snap_term

    def _at_least_as_up_to_date_as(self, last_index: int, last_term: int) -> bool:
        """Whether a node whose log ends at (last_index, last_term) would vote for us."""
        return (self.last_term(), self.last_index) >= (last_term, last_index)

    def _is_up_to_date(self, last_index: int, last_term: int) -> bool:
        return (last_term, last_index) >= (self.last_term(), self.last_index)

    # ============================================================ configuration

    def _config_at(self, index: int) -> tuple[frozenset[str], int]:
        """Voters after applying the log's conf entries up to `index`, and the
        index of the last conf entry applied (0 if none)."""
        voters = set(self._base_voters)
        last_conf = 0
        for e in self._entries:
            if e.index > index:
                break
            if e.kind == "conf":
                cc = decode_conf_change(e.data)
                if cc.op == "set":
                    voters = set(cc.voters)
                elif cc.op == "add":
                    voters.add(cc.node_id)
                else:
                    voters.discard(cc.node_id)
                last_conf = e.index
        return frozenset(voters), last_conf

    def _recompute_config(self) -> None:
        """A configuration takes effect as soon as its entry is in the log
        (thesis §4.1), and is reverted if that entry is truncated."""
        old = self.voters
        self.voters, self._last_conf_index = self._config_at(self.last_index)
        if self.voters != old and self.role == LEADER:
            self._sync_progress()

    def _sync_progress(self) -> None:
        for v in sorted(self.voters):  # sorted: replays must not depend on str hashing
            if v not in self.progress:
                pr = self.progress[v] = Progress(self.last_index + 1)
                pr.recent_active = True  # give a new member a full timeout to show up
        for v in list(self.progress):
            if v not in self.voters:
                del self.progress[v]
        if self.id in self.progress:
            self.progress[self.id].match = self._stabled
        if self.lead_transferee is not None and self.lead_transferee not in self.voters:
            self.lead_transferee = None
        self._maybe_commit()

    @property
    def promotable(self) -> bool:
        return self.id in self.voters

    def _quorum(self, ids) -> bool:
        return sum(1 for v in self.voters if v in ids) > len(self.voters) // 2

    # ============================================================ inputs

    def tick(self) -> None:
        if self.role == LEADER:
            self._tick_leader()
        else:
            self._tick_election()

    def _tick_election(self) -> None:
        self.election_elapsed += 1
        if self.promotable and self.election_elapsed >= self._randomized_timeout:
            self._campaign(pre_vote=self.cfg.pre_vote)

    def _tick_leader(self) -> None:
        self.heartbeat_elapsed += 1
        self.election_elapsed += 1
        if self.election_elapsed >= self.cfg.election_ticks:
            self.election_elapsed = 0
            if self.cfg.check_quorum:
                active = {v for v, pr in self.progress.items() if pr.recent_active or v == self.id}
                if not self._quorum(active):
                    # We cannot reach a majority: stop acting as leader so clients
                    # go elsewhere and a deposed leader does not serve stale reads.
                    self._become_follower(self.term, None)
                    return
                for v, pr in self.progress.items():
                    pr.recent_active = v == self.id
            self.lead_transferee = None  # a transfer must finish within one election timeout
        if self.heartbeat_elapsed >= self.cfg.heartbeat_ticks:
            self.heartbeat_elapsed = 0
            self._broadcast_heartbeat()

    def propose(self, data: bytes) -> int:
        """Append a command; returns its index. It is committed once it shows up
        in a Ready's `committed` (with this index and the current term)."""
        self._check_can_propose()
        return self._append_as_leader("normal", bytes(data))

    def propose_conf_change(self, op: str, node_id: str) -> int:
        """Add or remove one voter. Only one change may be uncommitted at a time,
        and a new leader must first commit an entry of its own term."""
        self._check_can_propose()
        if op not in ("add", "remove"):
            raise ValueError(f"op must be add or remove, got {op!r}")
        if self._pending_conf_index > self.commit:
            raise ConfChangeInProgress(f"conf change at {self._pending_conf_index} not committed yet")
        if self.term_at(self.commit) != self.term:
            # Ongaro's single-server-change fix: a new leader first commits an
            # entry of its own term, so no older uncommitted change can come back.
            raise ConfChangeInProgress("no entry of the current term committed yet")
        if (op == "add") == (node_id in self.voters):
            raise ValueError(f"cannot {op} {node_id!r}: voters are {sorted(self.voters)}")
        if op == "remove" and self.voters == {node_id}:
            raise ValueError("cannot remove the last voter")
        index = self._append_as_leader("conf", encode_conf_change(ConfChange(op, node_id)))
        self._pending_conf_index = index
        return index

    def _check_can_propose(self) -> None:
        if self.role != LEADER:
            raise NotLeader(self.lead)
        if self.lead_transferee is not None:
            raise ProposalDropped(f"leadership transfer to {self.lead_transferee} in progress")

    def read_index(self, ctx: object) -> None:
        """Start a linearizable read; a ReadState(index, ctx) appears in a later
        Ready once a majority confirmed our leadership and `index` is applied."""
        if self.role != LEADER:
            raise NotLeader(self.lead)
        if self.term_at(self.commit) != self.term:
            # Our commit index may lag the true one until an entry of our own
            # term is committed (thesis §6.4): hold the read until then.
            self._reads_before_commit.append(ctx)
            return
        self._start_read(ctx)

    def _start_read(self, ctx: object) -> None:
        if self._quorum({self.id}):  # a single voter confirms itself
            self._confirmed_reads.append(ReadState(self.commit, ctx))
            return
        self._read_seq += 1
        self._pending_reads.append(_PendingRead(self._read_seq, self.commit, ctx, {self.id}))
        self._broadcast_heartbeat()

    def transfer_leadership(self, to: str) -> None:
        if self.role != LEADER:
            raise NotLeader(self.lead)
        if to == self.id or to not in self.voters:
            raise ValueError(f"cannot transfer leadership to {to!r}")
        self.lead_transferee = to
        self.election_elapsed = 0  # the transfer gets one election timeout
        if self.progress[to].match == self.last_index:
            self._send(TimeoutNow(term=self.term, from_id=self.id, to_id=to))
        else:
            self.progress[to].want_append = True

    def compact(self, index: int, snapshot_data: bytes) -> None:
        """The application took a snapshot of its state at `index` (<= applied):
        drop the log up to it. The shell stores the snapshot itself."""
        if index <= self._snap_index:
            return
        if index > self.applied:
            raise ValueError(f"cannot compact at {index}: only {self.applied} applied")
        voters, _ = self._config_at(index)
        term = self.term_at(index)
        self._snapshot = Snapshot(index, term, tuple(sorted(voters)), bytes(snapshot_data))
        self._entries = self._entries[index - self._snap_index:]
        self._snap_index, self._snap_term = index, term
        self._base_voters = voters

    # ============================================================ step

    def step(self, m) -> None:
        if m.to_id != self.id:
            return
        if m.term > self.term:
            if isinstance(m, VoteRequest):
                in_lease = (self.cfg.check_quorum and self.lead is not None
                            and self.election_elapsed < self.cfg.election_ticks)
                if in_lease and not m.transfer:
                    # We heard from a live leader recently: a node that was
                    # partitioned away must not depose it (and may not bump our term).
                    return
            if isinstance(m, VoteRequest) and m.pre_vote:
                pass  # a pre-vote never changes our term
            elif isinstance(m, VoteResponse) and m.pre_vote and m.granted:
                pass  # a granted pre-vote carries the term we would campaign in
            else:
                leader = m.from_id if isinstance(m, (AppendEntries, Heartbeat, InstallSnapshot)) else None
                self._become_follower(m.term, leader)
        elif m.term < self.term:
            if isinstance(m, (AppendEntries, Heartbeat)) and (self.cfg.check_quorum or self.cfg.pre_vote):
                # A stale leader: answer with our term so it steps down (it could
                # otherwise keep heartbeating a node that ignores it forever).
                self._send(AppendResponse(term=self.term, from_id=self.id, to_id=m.from_id,
                                          success=False, index=0))
            elif isinstance(m, VoteRequest) and m.pre_vote:
                self._send(VoteResponse(term=self.term, from_id=self.id, to_id=m.from_id,
                                        granted=False, pre_vote=True))
            return

        if isinstance(m, VoteRequest):
            self._handle_vote_request(m)
        elif self.role == LEADER:
            self._step_leader(m)
        elif self.role in (CANDIDATE, PRE_CANDIDATE):
            self._step_candidate(m)
        else:
            self._step_follower(m)

    def _handle_vote_request(self, m: VoteRequest) -> None:
        can_vote = (
            self.vote == m.from_id
            or (self.vote is None and self.lead is None)
            or (m.pre_vote and m.term > self.term)
        )
        granted = can_vote and self._is_up_to_date(m.last_log_index, m.last_log_term)
        if (m.pre_vote and self.role == PRE_CANDIDATE and m.from_id < self.id
                and self._at_least_as_up_to_date_as(m.last_log_index, m.last_log_term)):
            # Two pre-campaigns at once would go on to split the real vote
            # (both vote for themselves) and cost another election timeout:
            # of two that could each win, the larger id goes on.
            granted = False
            if m.from_id not in self._votes:
                # It did not answer our request: it still had a leader then
                # (requests inside a leader's lease go unanswered). It has
                # none now, so ask again, or both would sit out a whole
                # new election timeout.
                self._send(self._vote_request(m.from_id, pre_vote=True, transfer=False))
        if granted and not m.pre_vote:
            self.vote = m.from_id
            self.election_elapsed = 0
        elif granted and self.role in (FOLLOWER, PRE_CANDIDATE):
            # We back this candidate: leave it a whole (new, randomized)
            # timeout to win before campaigning ourselves. No leader any more
            # as far as we know, so its real vote request is not refused as
            # coming from outside a live leader's lease.
            self._become_follower(self.term, None)
        # A granted pre-vote answers with the term asked for, a refusal with ours.
        term = m.term if granted else self.term
        self._send(VoteResponse(term=term, from_id=self.id, to_id=m.from_id,
                                granted=granted, pre_vote=m.pre_vote))

    def _step_follower(self, m) -> None:
        if isinstance(m, (AppendEntries, Heartbeat, InstallSnapshot)):
            self.election_elapsed = 0
            self.lead = m.from_id
            if isinstance(m, AppendEntries):
                self._handle_append(m)
            elif isinstance(m, Heartbeat):
                self._commit_to(min(m.commit, self.last_index))
                self._send(HeartbeatResponse(term=self.term, from_id=self.id, to_id=m.from_id, ctx=m.ctx))
            else:
                self._handle_snapshot_chunk(m)
        elif isinstance(m, TimeoutNow):
            if self.promotable:
                self._campaign(pre_vote=False, transfer=True)

    def _step_candidate(self, m) -> None:
        if isinstance(m, (AppendEntries, Heartbeat, InstallSnapshot)):
            # Someone won this term (a pre-candidate may see its own term's leader).
            self._become_follower(self.term, m.from_id)
            self._step_follower(m)
        elif isinstance(m, VoteResponse):
            if m.pre_vote != (self.role == PRE_CANDIDATE):
                return  # a response to a campaign we are no longer running
            self._votes.setdefault(m.from_id, m.granted)
            granted = {v for v, g in self._votes.items() if g}
            refused = {v for v, g in self._votes.items() if not g}
            if self._quorum(granted):
                if self.role == PRE_CANDIDATE:
                    self._campaign(pre_vote=False)
                else:
                    self._become_leader()
            elif self._quorum(refused):
                self._become_follower(self.term, None)

    # ------------------------------------------------------------ follower side

    def _handle_append(self, m: AppendEntries) -> None:
        if m.prev_index < self.commit:
            # Everything up to our commit is known to match; tell the leader so.
            self._respond_append(m.from_id, True, self.commit)
            return
        if self.term_at(m.prev_index) != m.prev_term:
            hint_index, hint_term = self._find_conflict_by_term(m.prev_index, m.prev_term)
            self._send(AppendResponse(term=self.term, from_id=self.id, to_id=m.from_id, success=False,
                                      index=m.prev_index, hint_index=hint_index, hint_term=hint_term))
            return
        last_new = m.prev_index + len(m.entries)
        # Skip entries we already hold (a duplicate or reordered append must not
        # truncate anything); replace from the first conflicting one.
        for k, e in enumerate(m.entries):
            if self.term_at(e.index) != e.term:
                self._append(list(m.entries[k:]))
                break
        # Only up to the last entry this message vouches for: beyond it our log
        # may still hold a stale suffix.
        self._commit_to(min(m.commit, last_new))
        self._respond_append(m.from_id, True, last_new)

    def _respond_append(self, to: str, success: bool, index: int) -> None:
        self._send(AppendResponse(term=self.term, from_id=self.id, to_id=to, success=success, index=index))

    def _commit_to(self, index: int) -> None:
        if index > self.commit:
            if index > self.last_index:
                raise AssertionError(f"{self.id}: commit {index} beyond last index {self.last_index}")
            self.commit = index

    def _handle_snapshot_chunk(self, m: InstallSnapshot) -> None:
        def respond(offset: int, done: bool = False) -> None:
            self._send(InstallSnapshotResponse(term=self.term, from_id=self.id, to_id=m.from_id,
                                               last_index=m.last_index, offset=offset, done=done))

        if m.last_index <= self.commit:
            self._incoming = None
            respond(0, done=True)  # we already have all of it
            return
        key = (m.from_id, m.term, m.last_index, m.last_term)
        if self._incoming is None or self._incoming.key != key:
            if m.offset != 0:
                respond(0)  # restart from the beginning
                return
            self._incoming = _IncomingSnapshot(key, bytearray())
        buf = self._incoming.buf
        if m.offset != len(buf):
            respond(len(buf))  # a lost or duplicated chunk: ask for the next one we need
            return
        buf += m.data
        if not m.done:
            respond(len(buf))
            return
        self._incoming = None
        self._restore(Snapshot(m.last_index, m.last_term, tuple(m.voters), bytes(buf)))
        respond(len(buf), done=True)

    def _restore(self, snap: Snapshot) -> None:
        if self.term_at(snap.index) == snap.term:
            # Our log already holds the snapshot's last entry: just commit up to it.
            self._commit_to(snap.index)
            return
        self._snapshot = self._unstable_snapshot = snap
        self._snap_index, self._snap_term = snap.index, snap.term
        self._entries = []
        self._stabled = snap.index
        self.commit = snap.index
        self._base_voters = frozenset(snap.voters)
        self._recompute_config()

    # ------------------------------------------------------------ leader side

    def _step_leader(self, m) -> None:
        pr = self.progress.get(m.from_id)
        if pr is None:
            return
        if isinstance(m, AppendResponse):
            pr.recent_active = True
            if m.success:
                self._on_append_success(m.from_id, pr, m.index)
            else:
                self._on_append_reject(pr, m)
        elif isinstance(m, HeartbeatResponse):
            pr.recent_active = True
            pr.probe_sent = False
            if pr.state == REPLICATE and len(pr.inflight) >= self.cfg.max_inflight:
                pr.inflight.popleft()  # some append was probably lost; let one more through
            if pr.match < self.last_index:
                pr.want_append = True
            if m.ctx:
                self._ack_read(m.from_id, m.ctx)
        elif isinstance(m, InstallSnapshotResponse):
            pr.recent_active = True
            self._on_snapshot_response(m.from_id, pr, m)

    def _on_append_success(self, peer: str, pr: Progress, index: int) -> None:
        if pr.state == PROBE:
            pr.probe_sent = False
        if pr.maybe_update(index):
            if pr.state == PROBE:
                pr.become_replicate()
            elif pr.state == SNAPSHOT and pr.match >= pr.snap_index:
                pr.become_probe()
            self._maybe_commit()
        if peer == self.lead_transferee and pr.match == self.last_index:
            self._send(TimeoutNow(term=self.term, from_id=self.id, to_id=peer))

    def _on_append_reject(self, pr: Progress, m: AppendResponse) -> None:
        probe_hint = m.hint_index
        if m.hint_term > 0:
            # Skip every leader entry whose term is above the follower's hint term.
            probe_hint, _ = self._find_conflict_by_term(m.hint_index, m.hint_term)
        pr.maybe_decrease(m.index, probe_hint)

    def _on_snapshot_response(self, peer: str, pr: Progress, m: InstallSnapshotResponse) -> None:
        if m.done:
            if pr.maybe_update(m.last_index) or pr.state == SNAPSHOT:
                pr.become_probe()
                self._maybe_commit()
            return
        if pr.state != SNAPSHOT:
            return
        if m.last_index != self._snapshot.index:
            pr.become_snapshot(self._snapshot.index)  # we compacted again: start over
        elif m.offset != pr.snap_offset:
            pr.snap_offset = m.offset
        else:
            return  # a duplicate answer: the heartbeat resends if a chunk was lost
        self._send_snapshot_chunk(peer, pr)

    def _maybe_commit(self) -> None:
        """Commit the largest index a majority holds, if it is of our term
        (Figure 8: an older-term entry is committed only indirectly)."""
        if self.role != LEADER or not self.voters:
            return
        matches = sorted((self.progress[v].match for v in self.voters), reverse=True)
        n = matches[len(self.voters) // 2]
        if n <= self.commit or self.term_at(n) != self.term:
            return
        self.commit = n
        if self._reads_before_commit:
            waiting, self._reads_before_commit = self._reads_before_commit, []
            for ctx in waiting:
                self._start_read(ctx)
        if self.id not in self.voters and self._last_conf_index <= self.commit:
            # We were removed and the removal is committed: tell the others and step down.
            for peer, pr in self.progress.items():
                pr.want_append = True
            self._flush_appends()
            self._become_follower(self.term, None)

    def _append_as_leader(self, kind: str, data: bytes) -> int:
        e = Entry(self.last_index + 1, self.term, kind, data)
        self._entries.append(e)
        if kind == "conf":
            self._recompute_config()
        # Our own vote for the entry counts once it is durable (advance()), so
        # the shell may send it to followers while it is still being written
        # (thesis §10.2.1); a majority of followers can commit it before that.
        self._maybe_commit()
        return e.index

    def _broadcast_heartbeat(self) -> None:
        ctx = self._pending_reads[-1].seq if self._pending_reads else 0
        for peer, pr in self.progress.items():
            if peer == self.id:
                continue
            self._send(Heartbeat(term=self.term, from_id=self.id, to_id=peer,
                                 commit=min(pr.match, self.commit), ctx=ctx))
            if pr.state == SNAPSHOT:
                self._send_snapshot_chunk(peer, pr)  # chunks are stop-and-wait: resend if lost

    def _ack_read(self, peer: str, seq: int) -> None:
        # A heartbeat answer for round `seq` confirms every read started up to it.
        for r in self._pending_reads:
            if r.seq > seq:
                break
            r.acks.add(peer)
        confirmed = 0
        for k, r in enumerate(self._pending_reads):
            if self._quorum(r.acks):
                confirmed = k + 1
        for r in self._pending_reads[:confirmed]:
            self._confirmed_reads.append(ReadState(r.index, r.ctx))
        del self._pending_reads[:confirmed]

    def _flush_appends(self) -> None:
        """Send what each follower is missing. Deferred to ready() so that every
        proposal and ack since the last Ready travels in one batch."""
        for peer, pr in self.progress.items():
            if peer == self.id:
                continue
            force, pr.want_append = pr.want_append, False
            while self._maybe_send_append(peer, pr, force):
                force = False

    def _maybe_send_append(self, peer: str, pr: Progress, force: bool) -> bool:
        """Send one append if allowed; True if another may follow (pipelining)."""
        if pr.paused(self.cfg.max_inflight):
            return False
        prev = pr.next - 1
        prev_term = self.term_at(prev)
        if prev_term is None:  # compacted away: the follower needs the snapshot
            pr.become_snapshot(self._snapshot.index)
            self._send_snapshot_chunk(peer, pr)
            return False
        hi = min(self.last_index, prev + self.cfg.max_batch_entries)
        ents = self.entries_between(pr.next, hi + 1)
        if not ents and not force and pr.sent_commit >= self.commit:
            return False
        self._send(AppendEntries(term=self.term, from_id=self.id, to_id=peer, prev_index=prev,
                                 prev_term=prev_term, entries=ents, commit=self.commit))
        pr.sent_commit = self.commit
        if pr.state == PROBE:
            pr.probe_sent = True
            return False
        if ents:  # replicate: optimistically assume it arrives
            pr.next = ents[-1].index + 1
            pr.inflight.append(ents[-1].index)
            return pr.next <= self.last_index
        return False

    def _send_snapshot_chunk(self, peer: str, pr: Progress) -> None:
        snap = self._snapshot
        off = pr.snap_offset
        chunk = snap.data[off: off + self.cfg.snapshot_chunk_bytes]
        self._send(InstallSnapshot(term=self.term, from_id=self.id, to_id=peer, last_index=snap.index,
                                   last_term=snap.term, voters=list(snap.voters), offset=off,
                                   data=chunk, done=off + len(chunk) >= len(snap.data)))

    # ============================================================ role changes

    def _reset_timers(self) -> None:
        self.election_elapsed = 0
        self.heartbeat_elapsed = 0
        # Randomized in [T, 2T) so that split votes are rare and resolve quickly.
        self._randomized_timeout = self.cfg.election_ticks + self._rng.randrange(self.cfg.election_ticks)

    def _reset(self, term: int) -> None:
        if term != self.term:
            self.term = term
            self.vote = None
        self.lead = None
        self._reset_timers()
        self._votes = {}
        self.lead_transferee = None
        self._pending_reads.clear()  # a deposed leader cannot confirm reads any more
        self._reads_before_commit.clear()

    def _become_follower(self, term: int, leader: str | None) -> None:
        self._reset(term)
        self.role = FOLLOWER
        self.lead = leader
        self.progress = {}

    def _campaign(self, pre_vote: bool, transfer: bool = False) -> None:
        if pre_vote:
            # Ask whether we *could* win term+1 before disturbing anyone's term.
            self._reset(self.term)
            self.role = PRE_CANDIDATE
        else:
            self._reset(self.term + 1)
            self.role = CANDIDATE
            self.vote = self.id
        self.progress = {}
        self._votes = {self.id: True}
        if self._quorum({self.id}):
            if pre_vote:
                self._campaign(pre_vote=False, transfer=transfer)
            else:
                self._become_leader()
            return
        for v in sorted(self.voters):
            if v != self.id:
                self._send(self._vote_request(v, pre_vote, transfer))

    def _vote_request(self, to: str, pre_vote: bool, transfer: bool) -> VoteRequest:
        # A pre-vote asks for the term we would campaign in; a vote is in ours.
        return VoteRequest(term=self.term + 1 if pre_vote else self.term, from_id=self.id, to_id=to,
                           last_log_index=self.last_index, last_log_term=self.last_term(),
                           pre_vote=pre_vote, transfer=transfer)

    def _become_leader(self) -> None:
        self._reset(self.term)
        self.role = LEADER
        self.lead = self.id
        self.progress = {v: Progress(self.last_index + 1) for v in sorted(self.voters)}
        # Conservatively treat any conf entry in our log as pending: it (and the
        # one after) can only go once an entry of our own term is committed.
        self._pending_conf_index = self.last_index
        # The empty entry of our term lets us commit what predecessors left behind.
        self._append_as_leader("empty", b"")

    def _send(self, m) -> None:
        self._msgs.append(m)

    # ============================================================ ready / advance

    def _soft_state(self) -> SoftState:
        return SoftState(self.lead, self.role)

    def ready(self) -> Ready | None:
        """What to persist, send, apply and serve now; None if nothing."""
        if self._ready_out:
            raise RuntimeError("advance() the previous Ready first")
        if self.role == LEADER:
            self._flush_appends()
        hs = HardState(self.term, self.vote, self.commit)
        hard = hs if hs != self._prev_hard else None
        soft = self._soft_state()
        soft = soft if soft != self._prev_soft else None
        entries = tuple(self._entries[self._stabled - self._snap_index:])
        snap = self._unstable_snapshot
        applied = snap.index if snap is not None else self.applied
        committed = tuple(self.entries_between(applied + 1, self.commit + 1)) if self.commit > applied else ()
        applied_after = committed[-1].index if committed else applied
        reads = tuple(r for r in self._confirmed_reads if r.index <= applied_after)
        if not (hard or soft or entries or snap or self._msgs or committed or reads):
            return None
        rd = Ready(hard, entries, snap, tuple(self._msgs), committed, reads, soft)
        self._msgs = []
        self._confirmed_reads = [r for r in self._confirmed_reads if r.index > applied_after]
        if soft is not None:
            self._prev_soft = soft
        self._ready_out = True
        return rd

    def advance(self, rd: Ready) -> None:
        """`rd` was persisted, sent and applied."""
        self._ready_out = False
        if rd.hard_state is not None:
            self._prev_hard = rd.hard_state
        if rd.snapshot is not None:
            if self._unstable_snapshot is rd.snapshot:
                self._unstable_snapshot = None
            self.applied = max(self.applied, rd.snapshot.index)
        if rd.entries:
            last = rd.entries[-1]
            # Only if that entry is still ours: a conflicting append may have
            # replaced it after ready() and then it must be persisted again.
            if last.index > self._stabled and self.term_at(last.index) == last.term:
                self._stabled = last.index
                if self.role == LEADER and self.id in self.progress:
                    pr = self.progress[self.id]
                    pr.match = max(pr.match, self._stabled)
                    self._maybe_commit()
        if rd.committed:
            self.applied = max(self.applied, rd.committed[-1].index)

    # ============================================================ status

    def status(self) -> dict:
        """For GET /cluster: who leads, where the log is, how far each member lags."""
        return {
            "id": self.id, "role": self.role, "leader": self.lead, "term": self.term,
            "commit": self.commit, "applied": self.applied, "last_index": self.last_index,
            "snapshot_index": self._snap_index, "voters": sorted(self.voters),
            "progress": {p: {"match": pr.match, "next": pr.next, "state": pr.state}
                         for p, pr in sorted(self.progress.items())},
        }
