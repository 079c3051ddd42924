"""The durable Raft log on SQLite: entries, hard state and the snapshot.

`SqliteRaftStorage` persists a `Ready` with exactly the rules of
`core.MemoryStorage` (see core's module docstring), so the shell swaps one
for the other:

    storage = SqliteRaftStorage("data/raft.db", node_id="n1")
    core = RaftCore("n1", voters, rng=rng, storage=storage.load(applied=registry.applied_index))
    ...
    rd = core.ready()
    storage.save_ready(rd)    # ONE transaction, fsync'd unless only the commit moved
    send(rd.messages)         # only now
    ...
    core.compact(i, data); storage.compact(i, data)

Its own file, beside registry.db (not tables inside it), because:

- the log is written on the hot path, before any message may be sent, while
  the registry is written after (apply) and read all the time (queries,
  snapshot()). Separate files have separate write locks and separate WALs:
  a long apply batch or a registry snapshot never delays a log append, and
  the shell may run the two fsyncs in different threads;
- nothing needs to be atomic across the two. The Ready contract orders them
  (entries durable in step 1, applied in step 3), and the applied index
  lives with the registry rows it describes. After a crash at any point:
  the registry's applied index may be ahead of the stored commit (a commit
  index alone is written without an fsync, see core.must_sync; the core
  takes the larger); a replica's registry (synchronous=NORMAL) may lose its
  last transactions to a power cut, and they are applied again from this
  log; a snapshot stored here may be ahead of the registry
  (crash between storing a received snapshot and restoring it), and then the
  shell restores the registry from `storage.snapshot` before building the core;
- compaction deletes log rows in bulk; it touches neither the registry's
  pages nor its checkpoints.

Layout: `entries(idx INTEGER PRIMARY KEY, term, kind, data BLOB)` (the index
is the rowid: appends go to the end of the B-tree, truncation and compaction
are range deletes), one-row tables `hard_state` and `snapshot` (metadata and
data BLOB; its (idx, term) is the point the log continues from, the term of
the last compacted entry), and `meta` (app, schema version, replica id).

Invariants enforced on every write (AssertionError before anything is
written: a violation is a bug in the caller or the core, never a disk
state): entries of a Ready are contiguous and leave no gap; the persisted
commit never runs ahead of the persisted log; a committed entry is never
truncated; the persisted term and commit never go back, nor does a vote
change within a term.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
from typing import Callable, Iterable

import orjson

from trustnet.sqlite import Transaction, unsynced_transaction

from .core import HardState, PersistedState, Ready, Snapshot, decode_conf_change, must_sync
from .messages import ENTRY_KINDS, Entry

__all__ = ["RaftStorageError", "SqliteRaftStorage"]

APP = "trustnet-raft"
SCHEMA_VERSION = 1
BUSY_TIMEOUT_MS = 5000

_SCHEMA = f"""
CREATE TABLE meta (key TEXT PRIMARY KEY, value);
CREATE TABLE hard_state (
    one INTEGER PRIMARY KEY CHECK (one = 1),
    term INTEGER NOT NULL,
    vote TEXT,
    commit_index INTEGER NOT NULL
);
CREATE TABLE snapshot (
    one INTEGER PRIMARY KEY CHECK (one = 1),
    idx INTEGER NOT NULL,
    term INTEGER NOT NULL,
    voters TEXT NOT NULL,
    data BLOB NOT NULL
);
CREATE TABLE entries (
    idx INTEGER PRIMARY KEY,
    term INTEGER NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ({", ".join(repr(k) for k in ENTRY_KINDS)})),
    data BLOB NOT NULL
);
"""


class RaftStorageError(Exception):
    """The Raft log file cannot be used; the message says which file and why."""


class _Index(int):
    """An index that reads both ways: `storage.first_index` (as
    MemoryStorage's property) and `storage.first_index()`."""

    __slots__ = ()

    def __call__(self) -> int:
        return int(self)


class SqliteRaftStorage:
    """Raft's durable state in one SQLite file (WAL, synchronous=FULL).

    Thread-safe (one lock): the shell may save a Ready in a worker thread
    while it reads `term()` or `entries()` elsewhere. Reads of the metadata
    (`hard_state`, `snapshot`, `first_index`, `last_index()`) come from a
    cache that is updated only after a transaction commits.
    """

    def __init__(self, path: str, *, node_id: str | None = None):
        self._path = path
        self._lock = threading.RLock()
        # Test hook: called with a stage name inside every write transaction
        # ("snapshot", "truncate", "append", "hard_state", "commit",
        # "compact"); raising from it (or killing the process) is a crash there.
        self.fault_hook: Callable[[str], None] | None = None
        self._conn = _connect(path)
        try:
            self._prepare(node_id)
            st = self._read_state()
        except sqlite3.DatabaseError as exc:
            self._conn.close()
            raise RaftStorageError(f"cannot use Raft log {path!r}: {exc}") from exc
        except BaseException:
            self._conn.close()
            raise
        self._hard = st.hard_state
        self._snap = st.snapshot
        self._first = (st.snapshot.index if st.snapshot else 0) + 1
        self._last = self._first - 1 + len(st.entries)
        self._last_term = st.entries[-1].term if st.entries else (st.snapshot.term if st.snapshot else 0)

    # ------------------------------------------------------------ lifecycle

    def _prepare(self, node_id: str | None) -> None:
        conn = self._conn
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if tables:
            self._verify(tables, node_id)
        # WAL only after verifying: it rewrites the header of whatever file this is.
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode != "wal" and self._path != ":memory:":
            raise RaftStorageError(f"cannot use Raft log {self._path!r}: journal_mode is {mode}, not wal")
        conn.execute("PRAGMA synchronous = FULL")
        if not tables:
            with self._transaction():
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.executemany("INSERT INTO meta (key, value) VALUES (?, ?)", [
                    ("app", APP), ("schema_version", SCHEMA_VERSION), ("node_id", node_id)])
                conn.execute("INSERT INTO hard_state (one, term, vote, commit_index) VALUES (1, 0, NULL, 0)")

    def _verify(self, tables: set[str], node_id: str | None) -> None:
        def refuse(why: str) -> RaftStorageError:
            return RaftStorageError(f"{self._path!r} is not a TrustNet Raft log: {why}")

        if "meta" not in tables:
            raise refuse(f"it has no 'meta' table (tables: {', '.join(sorted(tables))})")
        try:
            meta = dict(self._conn.execute("SELECT key, value FROM meta"))
        except sqlite3.OperationalError as exc:
            raise refuse(f"its 'meta' table is not ours ({exc})") from None
        if meta.get("app") != APP:
            raise refuse(f"meta 'app' is {meta.get('app')!r}, expected {APP!r}")
        if meta.get("schema_version") != SCHEMA_VERSION:
            raise refuse(f"schema_version is {meta.get('schema_version')!r}, "
                         f"this TrustNet reads version {SCHEMA_VERSION}")
        missing = {"hard_state", "snapshot", "entries"} - tables
        if missing:
            raise refuse(f"tables missing: {', '.join(sorted(missing))}")
        stored = meta.get("node_id")
        if node_id is not None:
            if stored is None:
                with self._transaction():
                    self._conn.execute("UPDATE meta SET value = ? WHERE key = 'node_id'", [node_id])
            elif stored != node_id:
                raise RaftStorageError(f"{self._path!r} is the Raft log of replica {stored!r}, "
                                       f"not of {node_id!r} (replica ids are never reused)")

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> SqliteRaftStorage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def path(self) -> str:
        return self._path

    # ------------------------------------------------------------ reading

    def load(self, applied: int | None = None) -> PersistedState:
        """Everything durable, read back from the file (what a restart sees).
        `applied` is the state machine's applied index, passed through."""
        with self._lock:
            st = self._read_state()
        return PersistedState(st.hard_state, st.entries, st.snapshot, applied)

    state = load  # MemoryStorage's name

    def _read_state(self) -> PersistedState:
        conn = self._conn
        conn.execute("BEGIN")  # one read snapshot of the file for all three tables
        try:
            term, vote, commit = conn.execute(
                "SELECT term, vote, commit_index FROM hard_state WHERE one = 1").fetchone()
            row = conn.execute("SELECT idx, term, voters, data FROM snapshot WHERE one = 1").fetchone()
            entries = tuple(Entry(i, t, k, d) for i, t, k, d in
                            conn.execute("SELECT idx, term, kind, data FROM entries ORDER BY idx"))
        finally:
            conn.execute("COMMIT")
        snap = None if row is None else Snapshot(row[0], row[1], tuple(orjson.loads(row[2])), bytes(row[3]))
        base = snap.index if snap else 0
        for k, e in enumerate(entries):
            if e.index != base + 1 + k:
                raise RaftStorageError(f"{self._path!r}: the log is not contiguous after "
                                       f"index {base}: entry {e.index} at position {k}")
        if commit > base + len(entries):
            raise RaftStorageError(f"{self._path!r}: stored commit {commit} is ahead of "
                                   f"the stored log (last index {base + len(entries)})")
        return PersistedState(HardState(term, vote, commit), entries, snap, None)

    @property
    def hard_state(self) -> HardState:
        return self._hard

    @property
    def snapshot(self) -> Snapshot | None:
        return self._snap

    @property
    def first_index(self) -> _Index:
        """The first index held in the log (snapshot index + 1)."""
        return _Index(self._first)

    def last_index(self) -> int:
        return self._last

    def term(self, index: int) -> int | None:
        """The term at `index`: the snapshot's term at first_index - 1; None
        when compacted away or beyond the log."""
        with self._lock:
            base = self._first - 1
            if index == base:
                return self._snap.term if self._snap else 0
            if index == self._last:
                return self._last_term
            if not base < index < self._last:
                return None
            row = self._conn.execute("SELECT term FROM entries WHERE idx = ?", [index]).fetchone()
        return row[0]

    def entries(self, lo: int, hi: int) -> list[Entry]:
        """Entries with lo <= index < hi. ValueError if lo was compacted away
        or hi is beyond last_index() + 1."""
        with self._lock:
            if lo < self._first:
                raise ValueError(f"entries from {lo} were compacted (first index {self._first})")
            if hi > self._last + 1:
                raise ValueError(f"entries up to {hi - 1} requested, last index is {self._last}")
            if hi <= lo:
                return []
            rows = self._conn.execute(
                "SELECT idx, term, kind, data FROM entries WHERE idx >= ? AND idx < ? ORDER BY idx",
                [lo, hi]).fetchall()
        return [Entry(i, t, k, d) for i, t, k, d in rows]

    # ------------------------------------------------------------ writing

    def save_ready(self, rd: Ready) -> None:
        """Step 1 of the Ready contract, in ONE transaction: the snapshot
        (replaces the whole log), the entries (delete stored ones from
        rd.truncate_from on, append), the hard state. Durable on return."""
        snap, entries, hs = rd.snapshot, tuple(rd.entries), rd.hard_state
        if snap is None and not entries and hs is None:
            return
        with self._lock:
            first, last = self._first, self._last
            last_term = self._last_term
            old = self._hard
            if snap is not None:
                first, last, last_term = snap.index + 1, snap.index, snap.term
            cut = None
            if entries:
                cut = entries[0].index
                for k, e in enumerate(entries):
                    if e.index != cut + k:
                        raise AssertionError(f"entries of a Ready are not contiguous: {e.index} at {k}")
                if not first <= cut <= last + 1:
                    raise AssertionError(f"gap: storing {cut} after {last} (first index {first})")
                if cut <= last and cut <= old.commit and snap is None:
                    raise AssertionError(f"truncating committed entry {cut} (persisted commit {old.commit})")
                last, last_term = entries[-1].index, entries[-1].term
            new = hs if hs is not None else old
            if new.commit > last:
                raise AssertionError(f"commit {new.commit} persisted ahead of the log (last index {last})")
            if hs is not None:
                if hs.term < old.term:
                    raise AssertionError(f"persisted term going back: {old.term} -> {hs.term}")
                if hs.term == old.term and old.vote is not None and hs.vote != old.vote:
                    raise AssertionError(f"vote changing within term {hs.term}: {old.vote} -> {hs.vote}")
                if hs.commit < old.commit:
                    raise AssertionError(f"persisted commit going back: {old.commit} -> {hs.commit}")

            conn = self._conn
            with self._transaction(durable=must_sync(rd, old)):
                if snap is not None:
                    conn.execute("DELETE FROM entries")
                    self._write_snapshot(snap)
                    self._hook("snapshot")
                if entries:
                    if cut <= self._last and snap is None:
                        conn.execute("DELETE FROM entries WHERE idx >= ?", [cut])
                        self._hook("truncate")
                    conn.executemany("INSERT INTO entries (idx, term, kind, data) VALUES (?, ?, ?, ?)",
                                     [(e.index, e.term, e.kind, e.data) for e in entries])
                    self._hook("append")
                if hs is not None:
                    conn.execute("UPDATE hard_state SET term = ?, vote = ?, commit_index = ? WHERE one = 1",
                                 [hs.term, hs.vote, hs.commit])
                    self._hook("hard_state")
                self._hook("commit")
            # Durable: only now does the cache move.
            if snap is not None:
                self._snap = snap
            self._first, self._last, self._last_term, self._hard = first, last, last_term, new

    apply = save_ready  # MemoryStorage's name

    def compact(self, index: int | Snapshot, snapshot_data: bytes | None = None) -> Snapshot | None:
        """The application took a snapshot of its state at `index`: store it
        and drop the log up to `index`, keeping that entry's term as the
        snapshot's term. Voters are those in force at `index` (the stored
        snapshot's, then the conf entries up to `index`). A `Snapshot` (e.g.
        the core's, as MemoryStorage.compact takes) may be passed instead.
        A no-op (None) if the stored snapshot already covers `index`; the
        stored Snapshot otherwise."""
        with self._lock:
            if isinstance(index, Snapshot):
                snap = index
                if snapshot_data is not None:
                    raise TypeError("pass a Snapshot or (index, snapshot_data), not both")
            else:
                if snapshot_data is None:
                    raise TypeError("compact(index, snapshot_data) needs the snapshot data")
                snap = None
            at = snap.index if snap is not None else index
            if self._snap is not None and at <= self._snap.index:
                return None
            if at > self._hard.commit:
                raise ValueError(f"cannot compact at {at}: persisted commit is {self._hard.commit}")
            stored_term = self.term(at)
            if snap is None:
                if stored_term is None:
                    raise ValueError(f"cannot compact at {at}: not in the log "
                                     f"({self._first}..{self._last})")
                snap = Snapshot(at, stored_term, self._voters_at(at), bytes(snapshot_data))
            elif stored_term is not None and stored_term != snap.term:
                raise AssertionError(f"snapshot at {at} has term {snap.term}, the log has {stored_term}")
            with self._transaction():
                self._conn.execute("DELETE FROM entries WHERE idx <= ?", [at])
                self._write_snapshot(snap)
                self._hook("compact")
                self._hook("commit")
            self._snap = snap
            if at >= self._last:  # (a Snapshot beyond the log: the log restarts after it)
                self._last, self._last_term = at, snap.term
            self._first = at + 1
            return snap

    def _voters_at(self, index: int) -> tuple[str, ...]:
        voters = set(self._snap.voters) if self._snap else set()
        for (data,) in self._conn.execute(
                "SELECT data FROM entries WHERE idx <= ? AND kind = 'conf' ORDER BY idx", [index]):
            cc = decode_conf_change(data)
            if cc.op == "set":
                voters = set(cc.voters)
            elif cc.op == "add":
                voters.add(cc.node_id)
            else:
                voters.discard(cc.node_id)
        return tuple(sorted(voters))

    def _write_snapshot(self, snap: Snapshot) -> None:
        self._conn.execute(
            "INSERT OR REPLACE INTO snapshot (one, idx, term, voters, data) VALUES (1, ?, ?, ?, ?)",
            [snap.index, snap.term, orjson.dumps(list(snap.voters)).decode(), bytes(snap.data)])

    def _hook(self, stage: str) -> None:
        if self.fault_hook is not None:
            self.fault_hook(stage)

    def _transaction(self, durable: bool = True) -> contextlib.AbstractContextManager:
        # Not durable: a commit index alone, never needed for safety (core.must_sync).
        return Transaction(self._conn) if durable else unsynced_transaction(self._conn)


def _connect(path: str) -> sqlite3.Connection:
    if path != ":memory:":
        parent = os.path.dirname(os.path.abspath(path))
        if os.path.isdir(path):
            raise RaftStorageError(f"cannot open Raft log {path!r}: it is a directory")
        if not os.path.isdir(parent):
            raise RaftStorageError(f"cannot open Raft log {path!r}: directory {parent!r} does not exist")
    try:
        # isolation_level=None: transactions are ours, never implicit.
        return sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    except sqlite3.Error as exc:
        raise RaftStorageError(f"cannot open Raft log {path!r}: {exc}") from exc


# ---------------------------------------------------------------- benchmark


def _bench(directory: str, *, batches: int = 200, singles: int = 2000, size: int = 128) -> None:
    """Print append throughput (256-entry Readies) and single-entry Ready
    commits per second, with synchronous=FULL on `directory`'s disk."""
    payload = os.urandom(size)

    def ready(entries: Iterable[Entry], hs: HardState) -> Ready:
        return Ready(hs, tuple(entries), None, (), (), (), None)

    path = os.path.join(directory, "bench-raft.db")
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(path + suffix):
            os.remove(path + suffix)
    st = SqliteRaftStorage(path, node_id="bench")
    index = 0
    t0 = time.perf_counter()
    for _ in range(batches):
        batch = [Entry(index + k, 1, "normal", payload) for k in range(1, 257)]
        index += 256
        st.save_ready(ready(batch, HardState(1, "bench", index - 256)))
    dt = time.perf_counter() - t0
    print(f"append 256-entry Readies: {batches * 256 / dt:,.0f} entries/s "
          f"({batches / dt:,.0f} transactions/s, {size}-byte entries)")

    t0 = time.perf_counter()
    for _ in range(singles):
        index += 1
        st.save_ready(ready([Entry(index, 1, "normal", payload)], HardState(1, "bench", index - 1)))
    dt = time.perf_counter() - t0
    print(f"single-entry Ready commits: {singles / dt:,.0f}/s ({dt / singles * 1e6:,.0f} us each)")

    t0 = time.perf_counter()
    st.compact(index - 1000, os.urandom(64 * 1024))
    print(f"compact {index - 1000:,} entries + 64 KiB snapshot: {(time.perf_counter() - t0) * 1e3:.1f} ms")
    st.close()
    t0 = time.perf_counter()
    st = SqliteRaftStorage(path)
    n = len(st.load().entries)
    print(f"reopen + load() of {n:,} entries: {(time.perf_counter() - t0) * 1e3:.1f} ms")
    st.close()
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(path + suffix):
            os.remove(path + suffix)


if __name__ == "__main__":
    import sys
    import tempfile

    _bench(sys.argv[1] if len(sys.argv) > 1 else tempfile.gettempdir())
