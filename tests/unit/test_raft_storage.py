"""The durable Raft log (SqliteRaftStorage) and the registry's snapshot/restore.

SqliteRaftStorage must persist a Ready with exactly MemoryStorage's rules, in
one transaction, and read back after a crash exactly what was committed.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys

import pytest

from trustnet.consensus.core import (
    LEADER,
    ConfChange,
    HardState,
    MemoryStorage,
    NotLeader,
    PersistedState,
    ProposalDropped,
    RaftConfig,
    RaftCore,
    Ready,
    Snapshot,
    encode_conf_change,
)
from trustnet.consensus.messages import Entry
from trustnet.consensus.storage import RaftStorageError, SqliteRaftStorage
from trustnet.registry.commands import AddPeer, CheckpointLeases, DeleteNode, LeaseEntry, RegisterNode
from trustnet.registry.state import AlreadyApplied, RegistryState


def ready(entries=(), hard_state=None, snapshot=None) -> Ready:
    return Ready(hard_state, tuple(entries), snapshot, (), (), (), None)


def ents(lo: int, hi: int, term: int, kind: str = "normal") -> list[Entry]:
    """Entries lo..hi (inclusive) of `term`, with data naming them."""
    return [Entry(i, term, kind, f"cmd{i}@{term}".encode()) for i in range(lo, hi + 1)]


def conf(index: int, term: int, op: str, node_id: str = "", voters=()) -> Entry:
    return Entry(index, term, "conf", encode_conf_change(ConfChange(op, node_id, list(voters))))


@pytest.fixture
def path(tmp_path):
    return str(tmp_path / "raft.db")


@pytest.fixture
def st(path):
    s = SqliteRaftStorage(path, node_id="n1")
    yield s
    s.close()


def reopen(st: SqliteRaftStorage) -> SqliteRaftStorage:
    st.close()
    return SqliteRaftStorage(st.path)


def assert_same(sql: SqliteRaftStorage, mem: MemoryStorage, applied=None) -> None:
    assert sql.load(applied) == mem.state(applied)
    assert sql.hard_state == mem.hard_state
    assert sql.snapshot == mem.snapshot
    assert sql.first_index == mem.first_index
    assert sql.last_index() == mem.last_index()
    for i in range(mem.first_index - 2, mem.last_index() + 2):
        assert sql.term(i) == mem.term(i), i


# ------------------------------------------------------------------ basics


def test_fresh_log_is_empty(st):
    assert st.load() == PersistedState()
    assert st.first_index == 1 and st.first_index() == 1  # property (MemoryStorage) or call
    assert st.last_index() == 0
    assert st.term(0) == 0 and st.term(1) is None
    assert st.entries(1, 1) == []


def test_round_trip_through_close_and_reopen(st):
    voters = ("n1", "n2", "n3")
    st.save_ready(ready([conf(1, 1, "set", voters=voters)], HardState(1, None, 1)))
    st.save_ready(ready(ents(2, 5, 2) + [Entry(6, 2, "empty", b"")], HardState(2, "n2", 4)))
    st.compact(3, b"\x00state\xffat 3")
    st.save_ready(ready(ents(7, 9, 3), HardState(3, None, 8)))
    before = st.load(applied=7)

    st = reopen(st)
    try:
        after = st.load(applied=7)
        assert after == before
        assert after.hard_state == HardState(3, None, 8)
        assert after.snapshot == Snapshot(3, 2, voters, b"\x00state\xffat 3")
        assert [e.index for e in after.entries] == [4, 5, 6, 7, 8, 9]
        assert after.entries[2] == Entry(6, 2, "empty", b"")
        assert all(type(e.data) is bytes for e in after.entries)
        assert (st.first_index, st.last_index()) == (4, 9)
        assert st.term(3) == 2 and st.term(2) is None and st.term(9) == 3 and st.term(10) is None
        assert st.entries(5, 8) == list(after.entries[1:4])
        with pytest.raises(ValueError, match="compacted"):
            st.entries(3, 5)
        with pytest.raises(ValueError, match="last index"):
            st.entries(4, 11)
        # A core boots from it as from MemoryStorage's state.
        core = RaftCore("n1", voters, rng=random.Random(1), storage=st.load(applied=7))
        assert (core.term, core.commit, core.applied, core.last_index) == (3, 8, 7, 9)
    finally:
        st.close()


def test_a_ready_with_nothing_durable_writes_nothing(st):
    st.fault_hook = lambda stage: pytest.fail(f"transaction opened ({stage})")
    st.save_ready(Ready(None, (), None, ("a message",), (), (), None))


def test_replica_id_is_checked(path):
    SqliteRaftStorage(path, node_id="n1").close()
    SqliteRaftStorage(path).close()  # not named: not checked
    with pytest.raises(RaftStorageError, match="replica 'n1', not of 'n2'"):
        SqliteRaftStorage(path, node_id="n2")


def test_refuses_other_files(tmp_path):
    reg = RegistryState.open(str(tmp_path / "registry.db"))
    reg.close()
    with pytest.raises(RaftStorageError, match="not a TrustNet Raft log"):
        SqliteRaftStorage(str(tmp_path / "registry.db"))
    (tmp_path / "junk.db").write_bytes(b"not sqlite at all" * 100)
    with pytest.raises(RaftStorageError):
        SqliteRaftStorage(str(tmp_path / "junk.db"))
    with pytest.raises(RaftStorageError, match="does not exist"):
        SqliteRaftStorage(str(tmp_path / "nowhere" / "raft.db"))


def test_wal_and_full_sync(st):
    assert st._conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert st._conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


# ------------------------------------------------------------------ truncation


def test_conflicting_suffix_is_truncated(st):
    mem = MemoryStorage()
    for rd in (ready(ents(1, 6, 1), HardState(1, "n1", 2)),
               # a new leader of term 2 overwrites 4..6 with a shorter suffix
               ready(ents(4, 4, 2), HardState(2, "n2", 3)),
               # and term 3 replaces index 4 again and goes on
               ready(ents(4, 7, 3), HardState(3, None, 3))):
        st.save_ready(rd)
        mem.apply(rd)
        assert_same(st, mem)
    assert [(e.index, e.term) for e in st.entries(1, 8)] == [(1, 1), (2, 1), (3, 1), (4, 3), (5, 3), (6, 3), (7, 3)]
    st = reopen(st)
    try:
        assert_same(st, mem)
    finally:
        st.close()


def test_truncation_to_a_shorter_log_drops_the_rest(st):
    st.save_ready(ready(ents(1, 10, 1), HardState(1, None, 1)))
    st.save_ready(ready(ents(3, 3, 2), HardState(2, None, 1)))
    assert st.last_index() == 3 and st.term(3) == 2 and st.term(4) is None
    assert [e.index for e in reopen(st).load().entries] == [1, 2, 3]


def test_gaps_and_holes_are_refused(st):
    st.save_ready(ready(ents(1, 3, 1), HardState(1, None, 0)))
    with pytest.raises(AssertionError, match="gap"):
        st.save_ready(ready(ents(5, 6, 1)))
    with pytest.raises(AssertionError, match="not contiguous"):
        st.save_ready(ready([*ents(4, 4, 1), *ents(6, 6, 1)]))
    assert st.last_index() == 3


# ------------------------------------------------------------------ the commit assertion


def test_commit_is_never_persisted_ahead_of_the_log(st):
    st.save_ready(ready(ents(1, 3, 1), HardState(1, None, 2)))
    before = st.load()
    with pytest.raises(AssertionError, match="ahead of the log"):
        st.save_ready(ready(ents(4, 4, 1), HardState(1, None, 5)))
    with pytest.raises(AssertionError, match="ahead of the log"):
        st.save_ready(ready((), HardState(1, None, 4)))
    # Truncating below the stored commit would leave it covering other entries.
    with pytest.raises(AssertionError, match="truncating committed entry 2"):
        st.save_ready(ready(ents(2, 2, 2), HardState(2, None, 2)))
    # Nothing of the refused Readies was written, not even their entries.
    assert st.load() == before
    assert reopen(st).load() == before


def test_hard_state_never_goes_back(st):
    st.save_ready(ready(ents(1, 2, 3), HardState(3, "n2", 2)))
    with pytest.raises(AssertionError, match="term going back"):
        st.save_ready(ready((), HardState(2, None, 2)))
    with pytest.raises(AssertionError, match="vote changing"):
        st.save_ready(ready((), HardState(3, "n3", 2)))
    with pytest.raises(AssertionError, match="commit going back"):
        st.save_ready(ready((), HardState(3, "n2", 1)))
    st.save_ready(ready((), HardState(4, None, 2)))  # a new term may clear the vote
    assert st.hard_state == HardState(4, None, 2)


# ------------------------------------------------------------------ snapshots and compaction


def test_compaction_keeps_term_and_voters_then_loads(st):
    st.save_ready(ready([conf(1, 1, "set", voters=("n1", "n2", "n3"))], HardState(1, None, 1)))
    st.save_ready(ready(ents(2, 4, 2) + [conf(5, 2, "add", "n4")] + ents(6, 10, 3), HardState(3, "n1", 8)))
    with pytest.raises(ValueError, match="persisted commit is 8"):
        st.compact(9, b"too far")
    snap = st.compact(6, b"image@6")
    assert snap == Snapshot(6, 3, ("n1", "n2", "n3", "n4"), b"image@6")
    assert (st.first_index, st.last_index(), st.term(6), st.term(5)) == (7, 10, 3, None)
    assert st.compact(6, b"again") is None and st.compact(4, b"older") is None  # no-ops
    assert st.snapshot.data == b"image@6"

    # Compact again: voters continue from the snapshot's.
    st.save_ready(ready([conf(11, 3, "remove", "n2")] + ents(12, 12, 3), HardState(3, "n1", 12)))
    st.compact(11, b"image@11")
    st = reopen(st)
    try:
        state = st.load()
        assert state.snapshot == Snapshot(11, 3, ("n1", "n3", "n4"), b"image@11")
        assert state.entries == tuple(ents(12, 12, 3))
        assert state.hard_state == HardState(3, "n1", 12)
        # Compaction up to the last entry leaves an empty log that continues after it.
        st.compact(12, b"image@12")
        st = reopen(st)
        assert st.load().entries == () and (st.first_index, st.last_index(), st.term(12)) == (13, 12, 3)
        st.save_ready(ready(ents(13, 13, 4), HardState(4, None, 13)))
        assert reopen(st).load().entries == tuple(ents(13, 13, 4))
    finally:
        st.close()


def test_compact_takes_the_cores_snapshot_like_memory_storage(st):
    mem = MemoryStorage()
    for rd in (ready(ents(1, 5, 1), HardState(1, None, 4)),):
        st.save_ready(rd)
        mem.apply(rd)
    snap = Snapshot(3, 1, ("a", "b", "c"), b"img")
    mem.compact(snap)
    assert st.compact(snap) == snap
    assert_same(st, mem)
    with pytest.raises(AssertionError, match="has term 7"):
        st.compact(Snapshot(4, 7, ("a",), b"bad"))


def test_installed_snapshot_replaces_the_whole_log(st):
    mem = MemoryStorage()
    snap = Snapshot(20, 4, ("n1", "n2", "n3"), b"received")
    for rd in (ready(ents(1, 8, 1), HardState(1, None, 5)),
               ready(ents(21, 22, 4), HardState(4, None, 20), snapshot=snap)):
        st.save_ready(rd)
        mem.apply(rd)
        assert_same(st, mem)
    st = reopen(st)
    try:
        assert_same(st, mem)
        assert st.load().snapshot == snap and [e.index for e in st.load().entries] == [21, 22]
    finally:
        st.close()


# ------------------------------------------------------------------ crash safety


def _truncating_ready():
    return ready(ents(3, 7, 2), HardState(2, "n2", 2))


def _snapshot_ready():
    return ready(ents(31, 32, 5), HardState(5, None, 30), snapshot=Snapshot(30, 5, ("n1",), b"s"))


@pytest.mark.parametrize("make,stage", [
    (_truncating_ready, "truncate"), (_truncating_ready, "append"),
    (_truncating_ready, "hard_state"), (_truncating_ready, "commit"),
    (_snapshot_ready, "snapshot"), (_snapshot_ready, "append"), (_snapshot_ready, "commit"),
])
def test_a_crash_inside_the_transaction_leaves_nothing_partial(st, make, stage):
    st.save_ready(ready(ents(1, 5, 1), HardState(1, "n1", 2)))
    before = st.load()

    class Crash(Exception):
        pass

    def hook(at):
        if at == stage:
            raise Crash(at)

    st.fault_hook = hook
    with pytest.raises(Crash):
        st.save_ready(make())
    assert st.load() == before and st.last_index() == 5 and st.term(5) == 1
    st.fault_hook = None
    assert SqliteRaftStorage(st.path).load() == before  # another connection sees the same
    st.save_ready(make())  # and the storage still works
    mem = MemoryStorage(before)
    mem.apply(make())
    assert_same(st, mem)


def test_a_crash_inside_compaction_leaves_nothing_partial(st):
    st.save_ready(ready(ents(1, 5, 1), HardState(1, "n1", 4)))
    before = st.load()

    def hook(at):
        raise RuntimeError(at)

    st.fault_hook = hook
    with pytest.raises(RuntimeError, match="compact"):
        st.compact(3, b"img")
    assert st.load() == before and st.first_index == 1 and st.snapshot is None


def scripted_readies() -> list[Ready]:
    """A deterministic history: appends, a truncation, a snapshot, more appends."""
    rng = random.Random(7)

    def data(i):
        return rng.randbytes(rng.randrange(0, 300)) + str(i).encode()

    out = [ready([Entry(i, 1, "normal", data(i)) for i in range(1, 41)], HardState(1, "n1", 10))]
    out.append(ready([Entry(i, 2, "normal", data(i)) for i in range(31, 61)], HardState(2, "n2", 30)))
    out.append(ready([Entry(61, 2, "empty", b"")], HardState(2, "n2", 61)))
    out.append(ready([Entry(i, 3, "normal", data(i)) for i in range(81, 101)], HardState(3, None, 90),
                     snapshot=Snapshot(80, 3, ("n1", "n2", "n3"), rng.randbytes(5000))))
    return out


_CHILD = r"""
import os, signal, sys
sys.path.insert(0, sys.argv[3])
from test_raft_storage import scripted_readies, ready
from trustnet.consensus.core import HardState
from trustnet.consensus.messages import Entry
from trustnet.consensus.storage import SqliteRaftStorage

path, stage = sys.argv[1], sys.argv[2]
st = SqliteRaftStorage(path)
for rd in scripted_readies():
    st.save_ready(rd)
st._conn.execute("PRAGMA cache_size = 8")  # spill the big transaction's pages into the WAL early
wal = path + "-wal"
before = os.path.getsize(wal)

def die(at):
    if at == stage:
        print(before, os.path.getsize(wal), flush=True)
        os.kill(os.getpid(), signal.SIGKILL)

st.fault_hook = die
if stage == "compact":
    st.compact(88, os.urandom(2_000_000))
else:
    big = [Entry(i, 4, "normal", os.urandom(1000)) for i in range(91, 2101)]
    st.save_ready(ready(big, HardState(4, "n3", 2000)))
print("not killed", flush=True)
"""


@pytest.mark.parametrize("stage", ["append", "hard_state", "commit", "compact"])
def test_a_killed_process_leaves_nothing_partial(tmp_path, stage):
    """kill -9 inside a big transaction whose pages already reached the WAL:
    on reopen only the committed Readies are visible."""
    path = str(tmp_path / "raft.db")
    proc = subprocess.run([sys.executable, "-c", _CHILD, path, stage, os.path.dirname(__file__)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    wal_before, wal_at_kill = map(int, proc.stdout.split())
    assert wal_at_kill > wal_before  # uncommitted frames were on disk when it died

    mem = MemoryStorage()
    for rd in scripted_readies():
        mem.apply(rd)
    st = SqliteRaftStorage(path)
    try:
        assert_same(st, mem)
        assert st.load() == mem.state()
    finally:
        st.close()


# ------------------------------------------------------------------ replay against MemoryStorage


class App:
    """A hash chain over applied entries (durable with its applied index)."""

    def __init__(self):
        self.applied = 0
        self.digest = b"\0" * 32

    def apply(self, e: Entry) -> None:
        assert e.index == self.applied + 1, (e.index, self.applied)
        self.digest = hashlib.sha256(self.digest + f"{e.index}:{e.term}:{e.kind}:".encode() + e.data).digest()
        self.applied = e.index

    def snapshot_data(self) -> bytes:
        return f"{self.applied}:".encode() + self.digest.hex().encode()

    def restore(self, snap: Snapshot) -> None:
        applied, digest = snap.data.split(b":", 1)
        self.applied, self.digest = int(applied), bytes.fromhex(digest.decode())


def open_fast(path: str) -> SqliteRaftStorage:
    # The replay compares logic, not durability (the crash tests above do
    # that): skip the fsyncs so thousands of Readies run quickly.
    s = SqliteRaftStorage(path)
    s._conn.execute("PRAGMA synchronous = OFF")
    return s


class Node:
    def __init__(self, id, voters, tmp_path, rng):
        self.id, self.voters, self.rng = id, voters, rng
        self.path = str(tmp_path / f"{id}-raft.db")
        self.mem = MemoryStorage()
        self.sql = open_fast(self.path)
        self.app = App()
        self.boot()

    def boot(self):
        if self.sql.snapshot is not None and self.sql.snapshot.index > self.app.applied:
            self.app.restore(self.sql.snapshot)  # crashed between storing and restoring it
        loaded = self.sql.load(applied=self.app.applied)
        assert loaded == self.mem.state(applied=self.app.applied)
        self.core = RaftCore(self.id, self.voters, rng=random.Random(self.rng.getrandbits(64)),
                             storage=loaded, config=CFG)

    def crash_and_restart(self):
        self.sql.close()
        self.sql = open_fast(self.path)
        self.boot()


CFG = RaftConfig(heartbeat_ticks=2, election_ticks=8, max_batch_entries=16, max_inflight=4,
                 snapshot_chunk_bytes=40)


def run_cluster(seed: int, tmp_path, steps: int = 6000) -> tuple[dict, dict[str, Node]]:
    rng = random.Random(seed)
    ids = ("n1", "n2", "n3")
    nodes = {i: Node(i, ids, tmp_path, rng) for i in ids}
    queue: list = []
    cut: set[str] = set()
    seen = dict(readies=0, truncations=0, snapshot_readies=0, compactions=0, restarts=0, committed=0)

    def process(node: Node) -> None:
        rd = node.core.ready()
        if rd is None:
            return
        if rd.entries and rd.entries[0].index <= node.mem.last_index():
            seen["truncations"] += 1
        seen["snapshot_readies"] += rd.snapshot is not None
        node.mem.apply(rd)
        node.sql.save_ready(rd)
        assert node.sql.hard_state == node.mem.hard_state
        assert (node.sql.first_index, node.sql.last_index()) == (node.mem.first_index, node.mem.last_index())
        assert node.sql.term(node.mem.last_index()) == node.mem.term(node.mem.last_index())
        seen["readies"] += 1
        queue.extend(m for m in rd.messages if rng.random() > 0.1)
        if rd.snapshot is not None:
            node.app.restore(rd.snapshot)
        for e in rd.committed:
            node.app.apply(e)
            seen["committed"] += 1
        node.core.advance(rd)

    for _ in range(steps):
        r = rng.random()
        node = nodes[rng.choice(ids)]
        if r < 0.45 and queue:
            m = queue.pop(rng.randrange(min(len(queue), 4)))
            if m.from_id not in cut and m.to_id not in cut:
                nodes[m.to_id].core.step(m)
        elif r < 0.75:
            process(node)
        elif r < 0.85:
            for n in nodes.values():
                n.core.tick()
        elif r < 0.95:
            leaders = [n for n in nodes.values() if n.core.role == LEADER]
            if leaders:
                try:
                    rng.choice(leaders).core.propose(rng.randbytes(rng.randrange(1, 40)))
                except (NotLeader, ProposalDropped):
                    pass
        elif r < 0.97:
            if node.app.applied - node.core._snap_index >= 5:
                data = node.app.snapshot_data()
                node.core.compact(node.app.applied, data)
                node.mem.compact(node.core._snapshot)
                # The SQLite log derives term and voters itself: they must match the core's.
                assert node.sql.compact(node.app.applied, data) == node.core._snapshot
                seen["compactions"] += 1
        elif r < 0.975:
            node.crash_and_restart()  # loses everything not saved
            seen["restarts"] += 1
        elif r < 0.993:
            cut = {node.id} if not cut else set()  # isolate one node (a leader, often) or heal
        else:
            node.sql.close()  # reopen: the cache is rebuilt from the file
            node.sql = open_fast(node.path)
    for node in nodes.values():
        assert node.sql.load(node.app.applied) == node.mem.state(node.app.applied)
        node.crash_and_restart()  # asserts equal load() from a fresh connection
        node.sql.close()
    return seen, nodes


def test_sqlite_and_memory_storage_agree_on_a_real_cluster_run(tmp_path):
    totals: dict[str, int] = {}
    for seed in range(8):
        d = tmp_path / f"seed{seed}"
        d.mkdir()
        seen, _ = run_cluster(seed, d)
        for k, v in seen.items():
            totals[k] = totals.get(k, 0) + v
    # The run went through every kind of write.
    assert totals["committed"] > 2000, totals
    for k in ("truncations", "snapshot_readies", "compactions", "restarts"):
        assert totals[k] >= 5, totals


# ------------------------------------------------------------------ registry snapshot / restore

T0 = 1_769_774_400.0


def _reg(node_id, ipv6, domain="alpha", at=T0, key=None):
    return RegisterNode(node_id=node_id, ipv6=ipv6, port=7000, domain=domain, at=at,
                        lease_deadline=at + 30.25, public_key=key)


def _history():
    return [
        _reg("n1", "fd10::1", key="pk1"), _reg("n2", "fd10::2", "beta"), _reg("n3", "fd10::3"),
        AddPeer(node_a="n2", node_b="n1", at=T0 + 1), AddPeer(node_a="n3", node_b="n1", at=T0 + 2),
        CheckpointLeases(entries=(LeaseEntry(node_id="n1", deadline=T0 + 99.5, last_heartbeat=T0 + 60),)),
        DeleteNode(node_id="n3"), _reg("n4", "fd10::4", "gamma", at=T0 + 0.000001),
    ]


def _registry(path: str, cmds, first: int = 1) -> RegistryState:
    s = RegistryState.open(path)
    s.apply_batch([(first + k, c) for k, c in enumerate(cmds)])
    return s


def test_registry_snapshot_is_deterministic(tmp_path):
    a = _registry(str(tmp_path / "a.db"), _history())
    # Same rows and index through another history (a refused command, split batches, in memory).
    b = RegistryState.open(":memory:")
    cmds = _history()
    b.apply_batch([(k + 1, c) for k, c in enumerate(cmds[:4])])
    b.apply_batch([(k + 5, c) for k, c in enumerate(cmds[4:])])
    try:
        assert a.state_hash() == b.state_hash()
        assert a.snapshot() == b.snapshot() == a.snapshot()
        b.apply(9, DeleteNode(node_id="n4"))
        assert b.snapshot() != a.snapshot()
    finally:
        a.close()
        b.close()


def test_registry_snapshot_of_a_file_with_an_awkward_name(tmp_path):
    odd = tmp_path / "a dir?#%20" / "reg #1?.db"
    odd.parent.mkdir()
    a = _registry(str(odd), _history())
    expected = _registry(":memory:", _history())
    try:
        assert a.snapshot() == expected.snapshot()
    finally:
        a.close()
        expected.close()


def test_registry_snapshot_reads_beside_the_writer_not_under_its_lock(tmp_path):
    """A replica snapshots its registry while its event loop goes on reading
    it: the snapshot must not wait for (or hold) the state's lock, and must
    be the state at its applied index even with a transaction open."""
    import threading

    a = _registry(str(tmp_path / "a.db"), _history())
    expected = _registry(":memory:", _history())
    held, release, out = threading.Event(), threading.Event(), {}

    def hold_the_lock_mid_transaction() -> None:
        with a._lock:
            a._conn.execute("BEGIN IMMEDIATE")
            a._conn.execute("DELETE FROM peers")  # uncommitted: must not show
            held.set()
            release.wait(30)
            a._conn.execute("ROLLBACK")

    holder = threading.Thread(target=hold_the_lock_mid_transaction)
    holder.start()
    try:
        assert held.wait(10)
        taker = threading.Thread(target=lambda: out.setdefault("data", a.snapshot()))
        taker.start()
        taker.join(10)
        assert not taker.is_alive(), "snapshot() waited for the state's lock"
    finally:
        release.set()
        holder.join()
    try:
        assert out["data"] == expected.snapshot()
    finally:
        a.close()
        expected.close()


def test_registry_restore_into_a_fresh_database(tmp_path):
    src = _registry(str(tmp_path / "src.db"), _history())
    data, index, digest = src.snapshot(), src.applied_index, src.state_hash()
    src.close()
    assert index == 8

    dst = RegistryState.open(str(tmp_path / "dst.db"))
    dst.restore(data, index)
    assert (dst.state_hash(), dst.applied_index) == (digest, 8)
    assert dst.snapshot() == data  # a fixpoint
    dst.close()
    dst = RegistryState.open(str(tmp_path / "dst.db"))  # durable, with its applied index
    try:
        assert (dst.state_hash(), dst.applied_index) == (digest, 8)
        assert dst.get_node("n1")["lease_deadline"] == T0 + 99.5
        assert [(p["node_a"], p["node_b"]) for p in dst.list_peers()] == [("n1", "n2")]
        # It goes on applying from the snapshot's index; replays are skipped.
        assert dst.apply_batch([(8, DeleteNode(node_id="n1"))]) == [AlreadyApplied]
        dst.apply(9, DeleteNode(node_id="n1"))
        assert dst.list_peers() == []
    finally:
        dst.close()


def test_registry_restore_replaces_everything(tmp_path):
    small = _registry(":memory:", [_reg("x1", "fd10::99", "other")])
    data, digest = small.snapshot(), small.state_hash()
    big = _registry(str(tmp_path / "big.db"), _history())
    try:
        big.restore(data, 1)  # backwards is allowed: the log replays from there
        assert (big.state_hash(), big.applied_index) == (digest, 1)
        assert [d["name"] for d in big.list_domains()] == ["other"]
    finally:
        small.close()
        big.close()


def test_registry_restore_refuses_bad_snapshots_and_changes_nothing(tmp_path):
    import zlib

    import orjson

    s = _registry(str(tmp_path / "r.db"), _history())
    try:
        good, digest = s.snapshot(), s.state_hash()
        payload = orjson.loads(zlib.decompress(good))
        payload["tables"]["peers"]["rows"].append(["n1", "nobody", None])  # foreign key
        dangling = zlib.compress(orjson.dumps(payload))
        payload = orjson.loads(zlib.decompress(good))
        payload["schema_version"] = 99
        future = zlib.compress(orjson.dumps(payload))
        for data, index, why in [(b"garbage", 8, "not a registry snapshot"),
                                 (zlib.compress(b"[1,2]"), 8, "not a registry snapshot"),
                                 (good, 7, "taken at index 8"),
                                 (good, -1, "non-negative"),
                                 (future, 8, "schema_version 99"),
                                 (dangling, 8, "violates the schema")]:
            with pytest.raises(ValueError, match=why):
                s.restore(data, index)
            assert (s.state_hash(), s.applied_index) == (digest, 8)
    finally:
        s.close()


def test_a_registry_ahead_of_its_raft_log_refuses_to_start(tmp_path):
    """raft.db lost (or swapped) while registry.db was kept: Raft would hand
    out indices the registry already applied, and it would skip them. The
    replica must not start, and must say which files and what to do."""
    from trustnet.consensus.replica import ReplicaSpec, open_stores

    spec = ReplicaSpec(id="r1", addresses={"r1": "ws://[::1]:7001"}, voters=("r1",),
                       registry_path=str(tmp_path / "registry.db"),
                       raft_path=str(tmp_path / "raft.db"))
    storage, state = open_stores(spec)
    state.apply_batch([(1, RegisterNode(node_id="a", ipv6="fd10::1", port=1, domain="d",
                                        at=1.0e9, lease_deadline=1.0e9 + 90))])
    state.close()
    storage.close()
    os.remove(spec.raft_path)
    with pytest.raises(ValueError, match=r"applied the log up to index 1.*ends at 0.*same backup"):
        open_stores(spec)
    os.remove(spec.registry_path)  # the remedy it names: the registry is rebuilt
    storage, state = open_stores(spec)
    assert state.applied_index == 0
    state.close()
    storage.close()
