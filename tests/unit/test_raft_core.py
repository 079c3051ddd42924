"""Focused tests of the pure Raft core (in the spirit of etcd's raft_test.go)."""

from __future__ import annotations

import random

import attrs
import pytest

from actors.codec import from_wire, to_wire
from trustnet.consensus.core import (
    CANDIDATE,
    FOLLOWER,
    LEADER,
    PRE_CANDIDATE,
    ConfChangeInProgress,
    HardState,
    MemoryStorage,
    NotLeader,
    PersistedState,
    ProposalDropped,
    RaftConfig,
    RaftCore,
    ReadState,
    Ready,
    decode_conf_change,
    encode_conf_change,
    must_sync,
)
from trustnet.consensus.messages import (
    ALL_MESSAGES,
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

CFG = RaftConfig(heartbeat_ticks=2, election_ticks=10)


class Net:
    """A tiny synchronous network of cores (etcd's `network`): every Ready is
    persisted to a MemoryStorage, its messages queued, its entries applied."""

    def __init__(self, ids=("a", "b", "c"), cfg=CFG, seed=1, joiners=()):
        self.cfg = cfg
        self.rng = random.Random(seed)
        self.disks = {i: MemoryStorage() for i in list(ids) + list(joiners)}
        self.applied = {i: [] for i in self.disks}
        self.reads = {i: [] for i in self.disks}
        self.readies = {i: [] for i in self.disks}
        self.cores = {i: self._core(i, ids if i in ids else ()) for i in self.disks}
        self.queue: list = []
        self.cut: set[tuple[str, str]] = set()
        self.dropped: list = []

    def _core(self, id, voters, storage=None):
        return RaftCore(id, voters, rng=random.Random(self.rng.getrandbits(32)), storage=storage, config=self.cfg)

    def process(self, id) -> bool:
        core = self.cores[id]
        rd = core.ready()
        if rd is None:
            return False
        self.readies[id].append(rd)
        self.disks[id].apply(rd)
        self.queue.extend(rd.messages)
        if rd.snapshot is not None:
            self.applied[id] = [("snapshot", rd.snapshot.index)]
        self.applied[id].extend(rd.committed)
        self.reads[id].extend(rd.read_states)
        core.advance(rd)
        return True

    def stabilize(self, drop=lambda m: False) -> None:
        while True:
            moved = any([self.process(i) for i in self.cores])
            batch, self.queue = self.queue, []
            for m in batch:
                if (m.from_id, m.to_id) in self.cut or drop(m) or m.to_id not in self.cores:
                    self.dropped.append(m)
                else:
                    self.cores[m.to_id].step(m)
            if not moved and not batch:
                return

    def isolate(self, id) -> None:
        self.cut |= {(a, b) for a in self.cores for b in self.cores if a != b and id in (a, b)}

    def heal(self) -> None:
        self.cut = set()

    def elect(self, id) -> RaftCore:
        """Time out `id` (only) and let the election run."""
        core = self.cores[id]
        for _ in range(3 * self.cfg.election_ticks):
            core.tick()
            if core.role != FOLLOWER:
                break
        self.stabilize()
        assert core.role == LEADER, (id, core.role)
        return core

    def tick_all(self, n: int) -> None:
        for _ in range(n):
            for c in self.cores.values():
                c.tick()
            self.stabilize()

    def leaders(self):
        return [c for c in self.cores.values() if c.role == LEADER]

    def restart(self, id, voters=("a", "b", "c")) -> None:
        """Crash (dropping anything not persisted) and restart from disk."""
        applied = self.applied[id][-1].index if self.applied[id] and not isinstance(self.applied[id][-1], tuple) else None
        self.cores[id] = self._core(id, voters, self.disks[id].state(applied=applied))


def data_of(entries):
    return [e.data for e in entries if isinstance(e, Entry) and e.kind == "normal"]


# ------------------------------------------------------------------ messages


def sample_messages():
    ents = [Entry(1, 1, "conf", b"x"), Entry(2, 1, "normal", b"\x00\xffbin"), Entry(3, 2, "empty", b"")]
    return [
        VoteRequest(term=3, from_id="a", to_id="b", last_log_index=7, last_log_term=2, pre_vote=True),
        VoteResponse(term=3, from_id="b", to_id="a", granted=True, pre_vote=False),
        TimeoutNow(term=3, from_id="a", to_id="b"),
        AppendEntries(term=3, from_id="a", to_id="b", prev_index=0, prev_term=0, entries=ents, commit=1),
        AppendResponse(term=3, from_id="b", to_id="a", success=False, index=5, hint_index=3, hint_term=1),
        Heartbeat(term=3, from_id="a", to_id="b", commit=2, ctx=9),
        HeartbeatResponse(term=3, from_id="b", to_id="a", ctx=9),
        InstallSnapshot(term=3, from_id="a", to_id="b", last_index=9, last_term=2, voters=["a", "b"],
                        offset=4, data=b"\x01\x02", done=False),
        InstallSnapshotResponse(term=3, from_id="b", to_id="a", last_index=9, offset=6, done=True),
    ]


def test_every_message_round_trips_the_wire():
    import orjson

    msgs = sample_messages()
    assert {type(m) for m in msgs} == set(ALL_MESSAGES)
    for m in msgs:
        wire = orjson.loads(orjson.dumps(to_wire(m)))  # really JSON, bytes as base64
        assert from_wire(wire) == m
        assert {"term", "from_id", "to_id"} <= set(wire)
    for extra in (Entry(4, 2, "normal", b"abc"), ConfChange("add", "d")):
        assert from_wire(orjson.loads(orjson.dumps(to_wire(extra)))) == extra


def test_wire_decoding_is_strict():
    from actors.errors import ProtocolError

    wire = to_wire(sample_messages()[3])
    wire["entries"][0]["data"] = "not base64!!"
    with pytest.raises(ProtocolError):
        from_wire(wire)
    wire = to_wire(sample_messages()[0])
    wire["term"] = "3"
    with pytest.raises(ProtocolError):
        from_wire(wire)


def test_conf_change_codec():
    cc = ConfChange("remove", "b")
    assert decode_conf_change(encode_conf_change(cc)) == cc


# ------------------------------------------------------------------ election


def test_single_node_becomes_leader_and_commits():
    net = Net(ids=("a",))
    ldr = net.elect("a")
    idx = ldr.propose(b"x")
    net.stabilize()
    assert data_of(net.applied["a"]) == [b"x"]
    assert net.disks["a"].hard_state.commit == idx


def test_three_nodes_elect_exactly_one_leader():
    net = Net()
    net.tick_all(4 * CFG.election_ticks)
    leaders = net.leaders()
    assert len(leaders) == 1
    ldr = leaders[0]
    for c in net.cores.values():
        assert c.term == ldr.term and c.lead == ldr.id
    # The leader's empty entry of its own term committed everywhere.
    for i in net.cores:
        assert net.applied[i][-1].kind == "empty" and net.applied[i][-1].term == ldr.term


def test_election_timeout_is_randomized_in_range():
    timeouts = set()
    for seed in range(50):
        c = RaftCore("a", ("a", "b", "c"), rng=random.Random(seed), config=CFG)
        timeouts.add(c._randomized_timeout)
    assert min(timeouts) >= CFG.election_ticks and max(timeouts) < 2 * CFG.election_ticks
    assert len(timeouts) > 3


def test_vote_refused_for_stale_log():
    net = Net()
    net.elect("a")
    net.isolate("c")
    net.cores["a"].propose(b"x")
    net.stabilize()
    net.heal()
    c = net.cores["c"]
    # c asks b for a vote with a log that lacks the committed entry.
    req = VoteRequest(term=c.term + 5, from_id="c", to_id="b", last_log_index=c.last_index,
                      last_log_term=c.last_term())
    b = net.cores["b"]
    b.election_elapsed = CFG.election_ticks  # lease expired: b will consider the vote
    b.step(req)
    rd = b.ready()
    resp = [m for m in rd.messages if isinstance(m, VoteResponse)]
    assert resp and not resp[0].granted
    assert rd.hard_state.vote is None  # b moved to the higher term but voted for nobody


def test_vote_granted_once_per_term():
    core = RaftCore("b", ("a", "b", "c"), rng=random.Random(1), config=CFG)
    core.step(VoteRequest(term=2, from_id="a", to_id="b", last_log_index=1, last_log_term=1))
    core.step(VoteRequest(term=2, from_id="c", to_id="b", last_log_index=1, last_log_term=1))
    granted = {m.to_id: m.granted for m in core.ready().messages}
    assert granted == {"a": True, "c": False}


def test_prevote_keeps_a_partitioned_node_from_bumping_terms():
    net = Net()
    ldr = net.elect("a")
    term = ldr.term
    net.isolate("c")
    net.tick_all(10 * CFG.election_ticks)  # c times out again and again
    assert net.cores["c"].term == term  # pre-vote never won, so the term never moved
    assert net.cores["c"].role == PRE_CANDIDATE
    net.heal()
    net.tick_all(3 * CFG.election_ticks)
    assert ldr.role == LEADER and ldr.term == term  # the rejoining node did not disrupt anything
    assert net.cores["c"].lead == "a"


def test_prevote_refused_while_leader_is_live():
    net = Net()
    net.elect("a")
    b = net.cores["b"]
    b.step(VoteRequest(term=b.term + 1, from_id="c", to_id="b", last_log_index=99, last_log_term=99, pre_vote=True))
    assert b.ready() is None  # in lease: ignored, not even answered
    b.election_elapsed = CFG.election_ticks  # the lease ran out
    b.step(VoteRequest(term=b.term + 1, from_id="c", to_id="b", last_log_index=99, last_log_term=99, pre_vote=True))
    rd = b.ready()
    assert rd.hard_state is None  # a pre-vote changes nothing durable
    (resp,) = rd.messages
    assert resp.granted and resp.pre_vote and resp.term == b.term + 1


def test_without_prevote_a_rejoining_node_disrupts():
    """The counterpart of the pre-vote test: the term inflation pre-vote prevents."""
    net = Net(cfg=attrs.evolve(CFG, pre_vote=False, check_quorum=False))
    ldr = net.elect("a")
    term = ldr.term
    net.isolate("c")
    net.tick_all(5 * CFG.election_ticks)
    assert net.cores["c"].term > term + 1


def test_check_quorum_leader_steps_down_when_isolated():
    net = Net()
    ldr = net.elect("a")
    net.isolate("a")
    # Activity is judged per election timeout: the one in progress still saw
    # the followers, the next one does not.
    for _ in range(2 * CFG.election_ticks):
        ldr.tick()
        net.stabilize()
    assert ldr.role == FOLLOWER
    with pytest.raises(NotLeader):
        ldr.propose(b"x")


def test_stale_leader_steps_down_on_higher_term_answer():
    net = Net()
    old = net.elect("a")
    net.isolate("a")
    net.cores["c"].election_elapsed = CFG.election_ticks  # c's lease on a ran out
    net.elect("b")
    net.heal()
    old.tick()  # still thinks it leads (check-quorum has not fired yet)
    assert old.role == LEADER
    for _ in range(CFG.heartbeat_ticks):
        old.tick()
    net.stabilize()
    assert old.role == FOLLOWER and old.term == net.cores["b"].term
    net.tick_all(CFG.heartbeat_ticks)
    assert old.lead == "b"


def test_leader_transfer():
    net = Net()
    ldr = net.elect("a")
    ldr.propose(b"x")
    net.stabilize()
    ldr.transfer_leadership("c")
    with pytest.raises(ProposalDropped):
        ldr.propose(b"during transfer")
    net.stabilize()
    c = net.cores["c"]
    assert c.role == LEADER and c.term == ldr.term and ldr.role == FOLLOWER


def test_leader_transfer_to_lagging_follower_catches_it_up_first():
    net = Net()
    ldr = net.elect("a")
    net.isolate("c")
    ldr.propose(b"x")
    net.stabilize()
    net.heal()
    ldr.transfer_leadership("c")
    net.stabilize()
    assert net.cores["c"].role == LEADER
    assert b"x" in data_of(net.applied["c"])


def test_leader_transfer_aborts_after_election_timeout():
    net = Net()
    ldr = net.elect("a")
    net.isolate("c")
    ldr.transfer_leadership("c")
    for _ in range(CFG.election_ticks):
        ldr.tick()
    net.cut -= {("a", "b"), ("b", "a")}
    net.stabilize()
    assert ldr.lead_transferee is None
    ldr.propose(b"accepted again")


# ------------------------------------------------------------------ replication


def test_replication_batches_and_commits():
    net = Net(cfg=attrs.evolve(CFG, max_batch_entries=4))
    ldr = net.elect("a")
    for k in range(10):
        ldr.propose(f"v{k}".encode())
    net.stabilize()
    for i in net.cores:
        assert data_of(net.applied[i]) == [f"v{k}".encode() for k in range(10)]
    appends = [rd for rd in net.readies["a"] for m in rd.messages if isinstance(m, AppendEntries) and m.entries]
    assert appends and all(len(m.entries) <= 4 for rd in appends for m in rd.messages
                           if isinstance(m, AppendEntries))


def test_pipelining_respects_inflight_window():
    net = Net(cfg=attrs.evolve(CFG, max_batch_entries=1, max_inflight=3))
    ldr = net.elect("a")
    for k in range(10):
        ldr.propose(b"v")
    rd = ldr.ready()
    to_b = [m for m in rd.messages if isinstance(m, AppendEntries) and m.to_id == "b"]
    assert len(to_b) == 3  # window full; the rest waits for acks
    assert [m.prev_index for m in to_b] == [to_b[0].prev_index + k for k in range(3)]
    ldr.advance(rd)
    net.disks["a"].apply(rd)
    net.queue.extend(rd.messages)
    net.stabilize()
    assert all(len(data_of(net.applied[i])) == 10 for i in net.cores)


def test_follower_truncates_conflicting_suffix_explicitly():
    core = RaftCore("b", ("a", "b", "c"), rng=random.Random(1), config=CFG)
    disk = MemoryStorage()

    def sync():
        rd = core.ready()
        disk.apply(rd)
        core.advance(rd)
        return rd

    sync()
    old = [Entry(2, 2, "normal", b"old2"), Entry(3, 2, "normal", b"old3"), Entry(4, 2, "normal", b"old4")]
    core.step(AppendEntries(term=2, from_id="a", to_id="b", prev_index=1, prev_term=1, entries=old, commit=1))
    sync()
    new = [Entry(3, 3, "normal", b"new3")]
    core.step(AppendEntries(term=3, from_id="c", to_id="b", prev_index=2, prev_term=2, entries=new, commit=2))
    rd = sync()
    assert rd.truncate_from == 3 and rd.entries == tuple(new)
    assert [(e.index, e.term) for e in disk.entries] == [(1, 1), (2, 2), (3, 3)]
    # A delayed duplicate of the old append must not truncate anything.
    core.step(AppendEntries(term=3, from_id="c", to_id="b", prev_index=1, prev_term=1, entries=old[:1], commit=2))
    rd = sync()
    assert rd.entries == () and [(e.index, e.term) for e in disk.entries] == [(1, 1), (2, 2), (3, 3)]


def test_follower_commits_only_what_the_append_vouches_for():
    core = RaftCore("b", ("a", "b", "c"), rng=random.Random(1), config=CFG)
    stale = [Entry(2, 2, "normal", b"s2"), Entry(3, 2, "normal", b"s3")]
    core.step(AppendEntries(term=2, from_id="a", to_id="b", prev_index=1, prev_term=1, entries=stale, commit=1))
    # A leader of term 3 whose log agrees only up to 2 says commit=3: our 3@2 is not its 3.
    core.step(AppendEntries(term=3, from_id="c", to_id="b", prev_index=1, prev_term=1, entries=stale[:1], commit=3))
    assert core.commit == 2


def test_fast_backoff_uses_conflict_hint():
    """A follower with 50 divergent entries of an old term is repaired in a
    couple of round trips, not 50."""
    net = Net()
    boot = net.disks["a"].entries or list(net.cores["a"].ready().entries)
    good = PersistedState(HardState(3, None, 1), (boot[0], *[Entry(i, 3, "normal", b"good") for i in range(2, 52)]))
    bad = PersistedState(HardState(2, None, 1), (boot[0], *[Entry(i, 2, "normal", b"bad") for i in range(2, 52)]))
    for id, st in (("a", good), ("b", good), ("c", bad)):
        net.disks[id] = MemoryStorage(st)
        net.cores[id] = net._core(id, ("a", "b", "c"), st)
    net.cores["b"].election_elapsed = CFG.election_ticks
    ldr = net.elect("a")
    for _ in range(CFG.heartbeat_ticks):
        ldr.tick()
    net.stabilize()
    rejects = [m for rd in net.readies["c"] for m in rd.messages
               if isinstance(m, AppendResponse) and not m.success]
    assert 1 <= len(rejects) <= 3, rejects
    assert [e.data for e in net.disks["c"].entries] == [e.data for e in net.disks["a"].entries]


def test_commit_only_by_counting_current_term_entries_figure8():
    """Raft Figure 8: an entry of an older term replicated on a majority is not
    committed by counting; only once an entry of the leader's term is."""
    boot = RaftCore("x", ("a", "b", "c"), rng=random.Random(0), config=CFG).ready().entries[0]
    old = Entry(2, 2, "normal", b"from term 2")
    a = RaftCore("a", ("a", "b", "c"), rng=random.Random(1), config=CFG,
                 storage=PersistedState(HardState(3, None, 1), (boot, old)))
    a.step(VoteResponse(term=0, from_id="b", to_id="a", granted=True))  # ignored (stale)
    for _ in range(3 * CFG.election_ticks):
        a.tick()
        if a.role != FOLLOWER:
            break
    assert a.role == PRE_CANDIDATE
    a.step(VoteResponse(term=4, from_id="b", to_id="a", granted=True, pre_vote=True))
    assert a.role == CANDIDATE and a.term == 4
    a.step(VoteResponse(term=4, from_id="b", to_id="a", granted=True))
    assert a.role == LEADER and a.last_index == 3  # 3 is its empty entry of term 4
    a.advance(a.ready())  # persisted: the leader's own copy of 3 counts from now on
    a.step(AppendResponse(term=4, from_id="b", to_id="a", success=True, index=2))
    assert a.commit == 1  # 2@2 is on a majority, but of an older term
    a.step(AppendResponse(term=4, from_id="b", to_id="a", success=True, index=3))
    assert a.commit == 3  # committing 3@4 commits 2@2 indirectly


def test_the_leaders_own_copy_counts_only_once_persisted():
    """The shell may send a leader's appends while its own copy is written
    (thesis §10.2.1): the leader's vote for an entry waits for advance()."""
    net = Net()
    ldr = net.elect("a")
    index = ldr.propose(b"x")
    rd = ldr.ready()
    assert [e.index for e in rd.entries] == [index]
    # b alone has it durable; the leader's copy is still being written: no majority.
    ldr.step(AppendResponse(term=ldr.term, from_id="b", to_id="a", success=True, index=index))
    assert ldr.commit < index
    ldr.advance(rd)
    assert ldr.commit == index
    # Two followers make a majority without the leader's copy.
    index = ldr.propose(b"y")
    rd = ldr.ready()
    for f in ("b", "c"):
        ldr.step(AppendResponse(term=ldr.term, from_id=f, to_id="a", success=True, index=index))
    assert ldr.commit == index
    ldr.advance(rd)
    assert [e.data for e in ldr.ready().committed] == [b"y"]


def test_must_sync_only_for_entries_snapshots_terms_and_votes():
    base = HardState(3, "a", 10)
    def rd(hs=None, entries=()):
        return Ready(hs, tuple(entries), None, (), (), (), None)
    assert not must_sync(rd(HardState(3, "a", 12)), base)  # only the commit moved
    assert not must_sync(rd(), base)
    assert must_sync(rd(HardState(4, None, 10)), base)
    assert must_sync(rd(HardState(3, "b", 10)), base)
    assert must_sync(rd(entries=[Entry(11, 3, "normal", b"x")]), base)


def test_two_pre_candidates_do_not_split_the_vote():
    """Both survivors time out together: the smaller id gives way to the
    larger (equal logs), backs it, and the larger wins in one round."""
    boot = RaftCore("x", ("a", "b", "c"), rng=random.Random(0), config=CFG).ready().entries[0]
    state = PersistedState(HardState(2, "a", 1), (boot,))
    b = RaftCore("b", ("a", "b", "c"), rng=random.Random(1), config=CFG, storage=state)
    c = RaftCore("c", ("a", "b", "c"), rng=random.Random(2), config=CFG, storage=state)
    out = {}
    for core in (b, c):
        core._campaign(pre_vote=True)
        assert core.role == PRE_CANDIDATE
        out[core.id] = [m for m in core.ready().messages if m.to_id in ("b", "c")]
    b_asks, c_asks = out["b"][0], out["c"][0]
    c.step(b_asks)  # c could win too and is larger: it refuses
    b.step(c_asks)  # b gives way: grants, and waits a whole new timeout
    assert b.role == FOLLOWER and b.lead is None
    answers = {m.to_id: m for core in (b, c) for m in core._msgs if isinstance(m, VoteResponse)}
    assert answers["b"].granted is False and answers["c"].granted is True
    c.step(answers["c"])
    assert c.role == CANDIDATE and c.term == 3
    vote_request = next(m for m in c._msgs if isinstance(m, VoteRequest) and m.to_id == "b" and not m.pre_vote)
    b.step(vote_request)
    vote = next(m for m in b._msgs if isinstance(m, VoteResponse) and m.to_id == "c" and not m.pre_vote)
    assert vote.granted and b.vote == "c"
    c.step(vote)
    assert c.role == LEADER and c.term == 3


def test_a_pre_candidate_asks_again_a_voter_that_ignored_it_inside_the_lease():
    """The leader dies. The larger survivor times out first, while the smaller
    one still heard the leader within its lease and ignores the pre-vote. When
    the smaller one campaigns in turn, the larger refuses it (tie-break) but
    asks again, and wins at once instead of both waiting for another timeout
    (one failover trial in ~40 took 0.6-0.8 s that way)."""
    net = Net()
    net.elect("a")
    b, c = net.cores["b"], net.cores["c"]
    net.isolate("a")  # a is dead from here on
    b.election_elapsed = 0  # b heard a just now; c a while ago
    c.election_elapsed = c._randomized_timeout - 1
    c.tick()
    assert c.role == PRE_CANDIDATE
    net.stabilize()  # b is inside a's lease: c's request goes unanswered
    assert c.role == PRE_CANDIDATE and b.role == FOLLOWER
    for _ in range(b._randomized_timeout):
        b.tick()
    assert b.role == PRE_CANDIDATE
    assert c.election_elapsed < c._randomized_timeout  # c's next timeout is still ahead
    net.stabilize()  # no more ticks: only messages
    assert c.role == LEADER and b.role == FOLLOWER and b.lead == "c"


def test_a_pre_candidate_with_the_better_log_does_not_give_way():
    boot = RaftCore("x", ("a", "b", "c"), rng=random.Random(0), config=CFG).ready().entries[0]
    longer = PersistedState(HardState(2, "a", 1), (boot, Entry(2, 2, "normal", b"x")))
    shorter = PersistedState(HardState(2, "a", 1), (boot,))
    b = RaftCore("b", ("a", "b", "c"), rng=random.Random(1), config=CFG, storage=longer)
    c = RaftCore("c", ("a", "b", "c"), rng=random.Random(2), config=CFG, storage=shorter)
    for core in (b, c):
        core._campaign(pre_vote=True)
    b_asks = next(m for m in b.ready().messages if m.to_id == "c")
    c.step(b_asks)  # c is larger but could not win b's vote: it backs b
    assert c.role == FOLLOWER
    assert next(m for m in c._msgs if isinstance(m, VoteResponse) and m.to_id == "b").granted


def test_leader_commit_needs_quorum():
    net = Net(ids=("a", "b", "c", "d", "e"))
    ldr = net.elect("a")
    for x in ("c", "d", "e"):
        net.isolate(x)
    ldr.propose(b"x")
    net.stabilize()
    assert b"x" not in data_of(net.applied["a"])
    net.cut -= {("a", "c"), ("c", "a")}
    for _ in range(CFG.heartbeat_ticks):
        ldr.tick()
    net.stabilize()
    assert b"x" in data_of(net.applied["a"])


# ------------------------------------------------------------------ persistence contract


def test_messages_never_precede_what_they_depend_on():
    """Every message in a Ready is backed by the hard state and entries of the
    same or an earlier Ready (persist before send)."""
    net = Net(ids=("a", "b", "c"))
    ldr = net.elect("a")
    for k in range(5):
        ldr.propose(b"v")
        net.stabilize()
    net.tick_all(2 * CFG.election_ticks)
    for node, readies in net.readies.items():
        disk = MemoryStorage()
        for rd in readies:
            disk.apply(rd)
            hs = disk.hard_state
            for m in rd.messages:
                if isinstance(m, VoteRequest) and not m.pre_vote:
                    assert (hs.term, hs.vote) == (m.term, node)
                if isinstance(m, VoteResponse) and m.granted and not m.pre_vote:
                    assert (hs.term, hs.vote) == (m.term, m.to_id)
                if isinstance(m, AppendResponse) and m.success:
                    assert disk.last_index() >= m.index
                if isinstance(m, AppendEntries) and m.entries:
                    assert disk.term(m.entries[-1].index) == m.entries[-1].term
                if not (isinstance(m, VoteRequest) and m.pre_vote) and not (
                        isinstance(m, VoteResponse) and m.pre_vote and m.granted):
                    assert m.term <= hs.term
            # The commit index is never persisted ahead of the log it covers.
            assert hs.commit <= disk.last_index()
            for e in rd.committed:
                assert e.index <= hs.commit


def test_candidate_vote_request_travels_with_its_hard_state():
    core = RaftCore("a", ("a", "b", "c"), rng=random.Random(1), config=attrs.evolve(CFG, pre_vote=False))
    rd = core.ready()
    core.advance(rd)
    while core.role != CANDIDATE:
        core.tick()
    rd = core.ready()
    assert rd.hard_state == HardState(core.term, "a", 1)
    assert {m.to_id for m in rd.messages if isinstance(m, VoteRequest)} == {"b", "c"}


def test_ready_requires_advance():
    core = RaftCore("a", ("a",), rng=random.Random(1), config=CFG)
    rd = core.ready()
    with pytest.raises(RuntimeError):
        core.ready()
    core.advance(rd)


def test_restart_keeps_term_vote_and_log_but_loses_unpersisted():
    net = Net()
    ldr = net.elect("a")
    ldr.propose(b"durable")
    net.stabilize()
    ldr.propose(b"lost")  # never reaches a Ready
    term = ldr.term
    net.restart("a")
    a = net.cores["a"]
    assert a.term == term and a.vote == "a" and a.role == FOLLOWER
    assert [e.data for e in a.entries_between(1, a.last_index + 1)][-1] == b"durable"
    assert a.applied == a.commit  # nothing re-applied twice


def test_advance_does_not_mark_replaced_entries_stable():
    """A conflicting append between ready() and advance(): the new entries must
    show up in the next Ready even though the old Ready covered their indexes."""
    core = RaftCore("b", ("a", "b", "c"), rng=random.Random(1), config=CFG)
    disk = MemoryStorage()
    rd = core.ready()
    disk.apply(rd)
    core.advance(rd)
    core.step(AppendEntries(term=2, from_id="a", to_id="b", prev_index=1, prev_term=1,
                            entries=[Entry(2, 2, "normal", b"old")], commit=1))
    rd = core.ready()
    disk.apply(rd)
    core.step(AppendEntries(term=3, from_id="c", to_id="b", prev_index=1, prev_term=1,
                            entries=[Entry(2, 3, "normal", b"new")], commit=1))
    core.advance(rd)
    rd = core.ready()
    assert rd.entries == (Entry(2, 3, "normal", b"new"),)


# ------------------------------------------------------------------ ReadIndex


def test_read_index_needs_a_heartbeat_round():
    net = Net()
    ldr = net.elect("a")
    ldr.propose(b"x")
    net.stabilize()
    net.isolate("a")
    ldr.read_index("r1")
    net.stabilize()
    assert net.reads["a"] == []  # no majority confirmed our leadership
    net.heal()
    for _ in range(CFG.heartbeat_ticks):
        ldr.tick()
    net.stabilize()
    assert net.reads["a"] == [ReadState(ldr.commit, "r1")]


def test_read_index_on_a_new_leader_waits_for_its_own_commit():
    net = Net()
    ldr = net.elect("a")
    net.isolate("b")
    net.isolate("c")
    net.cores["a"].tick()
    # Force a fresh leader whose empty entry is not committed yet.
    net.heal()
    b = net.cores["b"]
    b.election_elapsed = CFG.election_ticks
    net.cores["c"].election_elapsed = CFG.election_ticks
    ldr.step(TimeoutNow(term=0, from_id="x", to_id="a"))  # stale: ignored
    b._campaign(pre_vote=False)
    net.stabilize(drop=lambda m: isinstance(m, AppendEntries) and m.from_id == "b")
    assert b.role == LEADER and b.term_at(b.commit) != b.term
    b.read_index("r")
    net.stabilize(drop=lambda m: isinstance(m, AppendEntries) and m.from_id == "b")
    assert net.reads["b"] == []
    for _ in range(CFG.heartbeat_ticks):
        b.tick()
    net.stabilize()
    assert net.reads["b"] == [ReadState(b.commit, "r")] and b.term_at(b.commit) == b.term


def test_read_index_single_node_and_follower():
    net = Net(ids=("a",))
    ldr = net.elect("a")
    ldr.read_index(7)
    net.stabilize()
    assert net.reads["a"] == [ReadState(ldr.commit, 7)]
    net3 = Net()
    net3.elect("a")
    with pytest.raises(NotLeader) as err:
        net3.cores["b"].read_index(1)
    assert err.value.leader_hint == "a"


# ------------------------------------------------------------------ membership


def test_add_a_member():
    net = Net(joiners=("d",))
    ldr = net.elect("a")
    assert net.cores["d"].voters == frozenset()
    ldr.propose(b"before")
    net.stabilize()
    idx = ldr.propose_conf_change("add", "d")
    with pytest.raises(ConfChangeInProgress):
        ldr.propose_conf_change("add", "e")
    assert ldr.voters == {"a", "b", "c", "d"}  # effective on append, before commit
    net.stabilize()
    d = net.cores["d"]
    assert d.voters == {"a", "b", "c", "d"} and d.commit >= idx
    assert b"before" in data_of(net.applied["d"])
    ldr.propose_conf_change("remove", "b")  # the previous one committed: allowed now


def test_remove_the_leader_steps_it_down():
    net = Net()
    ldr = net.elect("a")
    ldr.propose_conf_change("remove", "a")
    net.stabilize()
    assert ldr.role == FOLLOWER and not ldr.promotable
    assert net.cores["b"].voters == {"b", "c"}
    net.tick_all(4 * CFG.election_ticks)
    (new,) = net.leaders()
    assert new.id in ("b", "c")
    new.propose(b"after")
    net.stabilize()
    assert b"after" in data_of(net.applied["b"]) and b"after" in data_of(net.applied["c"])


def test_new_leader_must_commit_own_entry_before_conf_change():
    net = Net()
    ldr = net.elect("a")
    net.isolate("a")
    ldr.propose(b"x")  # keeps a's empty entry committed; irrelevant to b
    b = net.cores["b"]
    b.election_elapsed = CFG.election_ticks
    net.cores["c"].election_elapsed = CFG.election_ticks
    b._campaign(pre_vote=False)
    net.stabilize(drop=lambda m: isinstance(m, AppendEntries))
    assert b.role == LEADER
    with pytest.raises(ConfChangeInProgress):
        b.propose_conf_change("remove", "a")


def test_conf_entry_reverted_when_truncated():
    core = RaftCore("b", ("a", "b", "c"), rng=random.Random(1), config=CFG)
    cc = Entry(2, 2, "conf", encode_conf_change(ConfChange("add", "d")))
    core.step(AppendEntries(term=2, from_id="a", to_id="b", prev_index=1, prev_term=1, entries=[cc], commit=1))
    assert core.voters == {"a", "b", "c", "d"}
    core.step(AppendEntries(term=3, from_id="c", to_id="b", prev_index=1, prev_term=1,
                            entries=[Entry(2, 3, "empty")], commit=1))
    assert core.voters == {"a", "b", "c"}


# ------------------------------------------------------------------ snapshots


def test_snapshot_installed_in_chunks():
    cfg = attrs.evolve(CFG, snapshot_chunk_bytes=10)
    net = Net(cfg=cfg)
    ldr = net.elect("a")
    net.isolate("c")
    for k in range(20):
        ldr.propose(f"v{k}".encode())
    net.stabilize()
    snap_data = b"state-machine-image:" + b"0123456789" * 5  # 70 bytes -> 7 chunks
    ldr.compact(ldr.applied, snap_data)
    net.disks["a"].compact(ldr._snapshot)
    net.heal()
    seen = []
    for _ in range(CFG.heartbeat_ticks):
        ldr.tick()
    net.stabilize(drop=lambda m: seen.append(m) and False)
    chunks = [m for m in seen if isinstance(m, InstallSnapshot) and m.to_id == "c"]
    assert len({m.offset for m in chunks}) == 7 and chunks[-1].done
    (rd,) = [rd for rd in net.readies["c"] if rd.snapshot is not None]
    assert rd.snapshot.data == snap_data and rd.snapshot.index == ldr._snap_index
    assert set(rd.snapshot.voters) == {"a", "b", "c"}
    c = net.cores["c"]
    assert c.commit == ldr.commit
    ldr.propose(b"after")
    net.stabilize()
    assert data_of(net.applied["c"])[-1] == b"after"
    assert net.disks["c"].snapshot.index == ldr._snap_index


def test_snapshot_chunks_survive_loss_and_duplication():
    cfg = attrs.evolve(CFG, snapshot_chunk_bytes=8)
    net = Net(cfg=cfg)
    ldr = net.elect("a")
    net.isolate("c")
    for k in range(5):
        ldr.propose(b"v")
    net.stabilize()
    ldr.compact(ldr.applied, bytes(range(60)))
    net.heal()
    n = [0]

    def flaky(m):
        n[0] += 1
        if isinstance(m, InstallSnapshot) and n[0] % 3 == 0:
            return True  # lose every third chunk
        if isinstance(m, InstallSnapshot) and n[0] % 5 == 0:
            net.queue.append(m)  # and deliver some twice
        return False

    for _ in range(20 * CFG.heartbeat_ticks):
        ldr.tick()
        net.stabilize(drop=flaky)
    snaps = [rd.snapshot for rd in net.readies["c"] if rd.snapshot is not None]
    assert len(snaps) == 1 and snaps[0].data == bytes(range(60))
    assert ldr.progress["c"].match == ldr.last_index


def test_compact_refuses_unapplied_index():
    net = Net(ids=("a",))
    ldr = net.elect("a")
    with pytest.raises(ValueError):
        ldr.compact(ldr.applied + 1, b"")


def test_restart_from_snapshot():
    net = Net(ids=("a",))
    ldr = net.elect("a")
    for k in range(5):
        ldr.propose(b"v")
    net.stabilize()
    ldr.compact(ldr.applied, b"img")
    net.disks["a"].compact(ldr._snapshot)
    ldr.propose(b"tail")
    net.stabilize()
    a = RaftCore("a", ("a",), rng=random.Random(2), config=CFG,
                 storage=net.disks["a"].state(applied=ldr._snap_index))
    rd = a.ready()
    assert data_of(rd.committed) == [b"tail"]  # only what the snapshot does not hold
    assert a.voters == {"a"}
