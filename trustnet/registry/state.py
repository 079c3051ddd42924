"""The registry's deterministic state machine on SQLite.

Consensus commits commands to a log and every replica applies them here, in
log order. Replicas must end in the same state, so `apply` reads no clock,
draws no random number and iterates nothing in an unspecified order: every
timestamp comes inside the command and every query that decides something
has an ORDER BY or a key.

Applying a command and recording its log index happen in one transaction,
so after a crash the replica knows exactly which entries it still has to
apply, and replaying an entry it already applied is a no-op.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import hashlib
import ipaddress
import math
import os
import sqlite3
import threading
import urllib.parse
from datetime import UTC, datetime
from typing import Any, Callable, Iterator

import attrs
import orjson
import sqlite_utils

from actors.codec import error_body, error_from_body
from actors.errors import Refused
from trustnet.addressing import compressed_ipv6_bytes
from trustnet.sqlite import Transaction, unsynced_transaction

from .commands import (
    AddPeer,
    CheckpointLeases,
    Conflict,
    CreateDomain,
    DeleteNode,
    ExpireNodes,
    Invalid,
    LeaseEntry,
    NotFound,
    RegisterNode,
    ReleaseIdentity,
    RemovePeer,
    SetReputation,
)
from .leases import LeaseTable
from .node_order import NodeOrder

__all__ = [
    "AlreadyApplied",
    "SESSION_WINDOW",
    "Session",
    "DatabaseUnavailable",
    "NotARegistryDatabase",
    "RegistryState",
    "StorageError",
    "domain_id_for",
]

APP = "trustnet-registry"
SCHEMA_VERSION = 1
MAX_PAGE = 1000
BUSY_TIMEOUT_MS = 5000
KEY_CACHE_MAX = 1_000_000  # names whose key public_key_of keeps in memory
# fromtimestamp() and ISO 8601 stop at year 9999; a bigger value must be
# refused, not crash every replica that replays it.
_MAX_SECONDS = 253402300799.0

_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value);
CREATE TABLE domains (
    id TEXT PRIMARY KEY,
    name TEXT UNIQUE NOT NULL,
    created_at TEXT
);
CREATE TABLE nodes (
    id TEXT PRIMARY KEY,
    domain_id TEXT NOT NULL REFERENCES domains(id),
    ipv6_addr TEXT UNIQUE NOT NULL,
    port INTEGER NOT NULL,
    reputation REAL NOT NULL DEFAULT 0.5,
    last_heartbeat TEXT,
    registered_at TEXT,
    lease_deadline REAL,
    public_key TEXT
);
CREATE INDEX nodes_domain_id ON nodes(domain_id, id);
CREATE TABLE peers (
    node_a TEXT NOT NULL REFERENCES nodes(id) ON DELETE CASCADE,
    node_b TEXT NOT NULL REFERENCES nodes(id) ON DELETE CASCADE,
    connected_at TEXT,
    PRIMARY KEY (node_a, node_b),
    CHECK (node_a < node_b)
);
-- without it, the cascade from deleting a node scans every peer row
CREATE INDEX peers_node_b ON peers(node_b);
"""

# CROSS JOIN pins nodes as the outer loop: rows are found by their id (the
# primary key), then each one's domain.
_NODE_SELECT = """
SELECT n.id, d.name AS domain, n.ipv6_addr AS ipv6, n.port, n.reputation,
       n.registered_at, n.public_key, n.last_heartbeat, n.lease_deadline
FROM nodes AS n CROSS JOIN domains AS d ON d.id = n.domain_id
"""
# _NODE_SELECT's columns. The lease's two come last: a page's JSON takes
# them from the live lease table (see node_page_json).
_NODE_FIELDS = ("id", "domain", "ipv6", "port", "reputation", "registered_at", "public_key",
                "last_heartbeat", "lease_deadline")
_LEASE_FIELDS = 2
_LEASE_HEAD = b',"last_heartbeat":'  # where a row's closing lease fields start
# Node rows kept for pages, as JSON (~0.3 KB a node, so ~45 MB at most);
# past this many the cache starts over.
ROW_CACHE_LIMIT = 150_000

_HASHED_TABLES = (
    ("domains", "id, name, created_at", "id"),
    ("nodes", "id, domain_id, ipv6_addr, port, reputation, last_heartbeat, "
              "registered_at, lease_deadline, public_key", "id"),
    ("peers", "node_a, node_b, connected_at", "node_a, node_b"),
    ("identities", "node_id, public_key, bound_at", "node_id"),
)

# A name is bound to the key of its first signed registration and stays bound
# when its lease expires (the node row goes, the binding does not), so nobody
# else can take the name while its owner is offline. Only an administrator
# releases it.
_IDENTITIES_SCHEMA = """
CREATE TABLE IF NOT EXISTS identities (
    node_id TEXT PRIMARY KEY,
    public_key TEXT NOT NULL,
    bound_at TEXT NOT NULL
);
"""


# Client sessions (Raft thesis section 6.3): a write carries a request id; the
# first application of that id records its result, a later entry with the same
# id (a client retry after a timeout or a leader change) returns that result
# without applying again. Rows older than SESSION_WINDOW log entries are
# evicted, deterministically (by log index, never by clock), so every replica
# evicts the same rows at the same index.
SESSION_WINDOW = 100_000

_SESSIONS_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    request_id TEXT PRIMARY KEY,
    idx INTEGER NOT NULL,
    result TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS sessions_idx ON sessions(idx);
"""


@attrs.frozen
class Session:
    """A command wrapped with the client's request id: applied at most once per id.

    Hand it to `apply_batch` like a command. Its result is the command's
    result (or refusal) from the first time this request id was applied."""

    request_id: str
    command: Any


class StorageError(Exception):
    """The registry database cannot be used; the message says which file and why."""


class DatabaseUnavailable(StorageError):
    """The database file cannot be opened or written (missing directory, permissions...)."""


class NotARegistryDatabase(StorageError):
    """The file opens, but is not a TrustNet registry this version can use."""


class _Skip(enum.Enum):
    ALREADY_APPLIED = "already_applied"

    def __repr__(self) -> str:
        return "AlreadyApplied"


AlreadyApplied = _Skip.ALREADY_APPLIED
"""The result slot of an entry whose index was already applied (a replay): it
was applied before, possibly by an earlier process, and was not applied again.
Its original result is not kept; it is neither a result nor a refusal."""


def domain_id_for(name: str) -> str:
    """A domain's id, derived from its name so every replica derives the same."""
    return "dom-" + hashlib.sha256(name.encode()).hexdigest()[:16]


def _serialized(method: Callable) -> Callable:
    # The actor may apply a batch in a worker thread while it reads on the
    # event loop; one lock keeps reads from seeing a half-applied batch.
    @functools.wraps(method)
    def locked(self: RegistryState, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            return method(self, *args, **kwargs)

    return locked


class RegistryState:
    """Domains, nodes and peers in one SQLite file, changed only by `apply`."""

    def __init__(self, db: sqlite_utils.Database, path: str, applied_index: int):
        self._db = db
        self._conn: sqlite3.Connection = db.conn
        self._path = path
        self._applied = applied_index
        self._lock = threading.RLock()
        self._keys: dict[str, str | None] = {}  # public_key_of's cache
        self._keys_touched: set[str] = set()  # names bound/released by the batch under way
        # node id -> its row's JSON as a page shows it, with its lease from
        # _rows_leases (see _live_rows): reading a page's 100 rows from
        # SQLite, then encoding them, was most of a domain query's own cost.
        # Any write to a node row, by any statement, drops it (temp
        # triggers, below); so does any change of its lease (on_change).
        self._rows: dict[str, bytes] = {}
        # A renewal only changes a row's closing lease fields: the row moves
        # here without them, and the next page that shows it appends the new
        # lease instead of reading the row from SQLite again. (Every node
        # renews within a heartbeat interval: dropping the whole row made
        # most of a page's rows misses.) A write to the row drops both.
        self._heads: dict[str, bytes] = {}
        self._rows_leases: LeaseTable | None = None
        # domain name -> id, as pages found them: a committed domain is only
        # ever removed by a restore, which clears this.
        self._domain_ids: dict[str, str] = {}
        _note_node_changes(self._conn)
        self._order = self._read_order()
        self._handlers: dict[type, Callable[[Any], dict]] = {
            RegisterNode: self._register_node,
            DeleteNode: self._delete_node,
            CreateDomain: self._create_domain,
            AddPeer: self._add_peer,
            RemovePeer: self._remove_peer,
            ExpireNodes: self._expire_nodes,
            CheckpointLeases: self._checkpoint_leases,
            ReleaseIdentity: self._release_identity,
            SetReputation: self._set_reputation,
        }

    # ------------------------------------------------------------ lifecycle

    @classmethod
    def open(cls, path: str, *, fsync_each_commit: bool = True) -> RegistryState:
        """Open (creating if empty) the registry at `path`; ":memory:" is allowed.

        fsync_each_commit=False (synchronous=NORMAL) is for a replica, whose
        Raft log is the durable record: a transaction is still atomic and
        survives the process dying, and what a power cut takes back (the last
        transactions and the applied index with them) is applied again from
        the log on restart. A lone registry has no log behind it: FULL.

        Raises DatabaseUnavailable or NotARegistryDatabase with the path and why.
        """
        conn = _connect(path)
        try:
            db = sqlite_utils.Database(conn, execute_plugins=False)
            applied = _prepare(db, path, "FULL" if fsync_each_commit else "NORMAL")
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise _storage_error(path, exc) from exc
        except BaseException:
            conn.close()
            raise
        return cls(db, path, applied)

    @_serialized
    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> RegistryState:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def path(self) -> str:
        return self._path

    @property
    def applied_index(self) -> int:
        """The log index of the last entry applied (0 for a new registry)."""
        return self._applied

    # ------------------------------------------------------------ applying

    def apply(self, index: int, cmd: Any) -> Any:
        """Apply one committed entry: its result, AlreadyApplied, or raise its refusal.

        A refused entry still counts as applied: its index is recorded, because
        replaying it would only be refused again.
        """
        [result] = self.apply_batch([(index, cmd)])
        if isinstance(result, Refused):
            raise result
        return result

    @_serialized
    def apply_batch(self, items: list[tuple[int, Any]], *, durable: bool = True) -> list[Any]:
        """Apply entries in one transaction (one fsync); one result per entry.

        A slot holds the command's result dict, the Refused it raised (only
        that command is rolled back) or AlreadyApplied for an index at or
        below applied_index. Any other exception rolls back the whole batch
        and propagates. Indices must increase; gaps are allowed (consensus
        may skip entries that are not commands).

        A command of None is a log entry that is not a registry command (a
        Raft no-op or membership change): it changes nothing but its index
        is recorded, so applied_index follows the log exactly (a snapshot
        taken now is a snapshot at the log's applied index). A `Session`
        applies its command at most once per request id.
        """
        _check_indices(items)
        applied = self._applied
        results: list[Any] = []
        with self._transaction(durable), self._forget_touched_keys():
            for index, cmd in items:
                if index <= applied:
                    results.append(AlreadyApplied)
                    continue
                if cmd is None:
                    results.append(None)
                elif isinstance(cmd, Session):
                    results.append(self._apply_session(index, cmd))
                else:
                    results.append(self._apply_one(cmd))
                applied = index
            if applied != self._applied:
                self._conn.execute("UPDATE meta SET value = ? WHERE key = 'applied_index'",
                                   [applied])
            changed = self._take_changed_nodes()
        for node_id, domain_id in changed:  # committed: the page order follows
            self._order.place(node_id, domain_id)
        self._applied = applied
        return results

    @_serialized
    def apply_next(self, commands: list[Any], *, durable: bool = True) -> list[Any]:
        """apply_batch of `commands` at the indices right after applied_index
        (a lone registry numbers its own commands), chosen under the lock so
        that two callers in different threads never take the same ones.
        durable=False: committed without an fsync (still atomic), for what a
        crash may lose without harm; the next durable commit syncs it too."""
        return self.apply_batch(list(enumerate(commands, self._applied + 1)), durable=durable)

    @contextlib.contextmanager
    def _forget_touched_keys(self):
        """Drop the cached keys of the names a batch bound or released, once
        it committed or rolled back (public_key_of caches nothing meanwhile)."""
        try:
            yield
        finally:
            for node_id in self._keys_touched:
                self._keys.pop(node_id, None)
            self._keys_touched.clear()

    def _apply_one(self, cmd: Any) -> Any:
        handler = self._handlers.get(type(cmd))
        if handler is None:
            # A bug, not a refusal: refusing would let replicas of different
            # versions silently diverge.
            raise TypeError(f"not a registry command: {type(cmd).__qualname__}")
        self._conn.execute("SAVEPOINT command")
        try:
            result = handler(cmd)
        except Refused as refusal:
            self._conn.execute("ROLLBACK TO command")
            self._conn.execute("RELEASE command")
            return refusal
        self._conn.execute("RELEASE command")
        return result

    def _apply_session(self, index: int, session: Session) -> Any:
        rid = session.request_id
        if not isinstance(rid, str) or not rid:
            return self._apply_one(session.command)  # no id: no deduplication
        row = self._conn.execute("SELECT result FROM sessions WHERE request_id = ?",
                                 [rid]).fetchone()
        if row is not None:
            return _session_result(row[0])
        result = self._apply_one(session.command)
        stored = ({"refused": error_body(result)} if isinstance(result, Refused)
                  else {"ok": result})
        self._conn.execute("INSERT INTO sessions (request_id, idx, result) VALUES (?, ?, ?)",
                           [rid, index, orjson.dumps(stored).decode()])
        self._conn.execute("DELETE FROM sessions WHERE idx <= ?", [index - SESSION_WINDOW])
        return result

    @_serialized
    def session_result(self, request_id: str) -> Any:
        """The recorded result (dict or Refused) of `request_id`; KeyError if
        no write with that id was applied (or it was evicted)."""
        row = self._conn.execute("SELECT result FROM sessions WHERE request_id = ?",
                                 [request_id]).fetchone()
        if row is None:
            raise KeyError(request_id)
        return _session_result(row[0])

    def _transaction(self, durable: bool = True) -> contextlib.AbstractContextManager:
        return Transaction(self._conn) if durable else unsynced_transaction(self._conn)

    # ------------------------------------------------------------ handlers

    def _register_node(self, cmd: RegisterNode) -> dict:
        node_id, ipv6, port, domain, at, deadline, key = _registration(cmd)
        holder = self._scalar("SELECT id FROM nodes WHERE ipv6_addr = ?", [ipv6])
        if holder is not None and holder != node_id:
            raise Conflict("ipv6_taken", f"{ipv6} is already registered by node {holder!r}",
                           {"ipv6": ipv6, "node_id": holder})
        key = self._bind_identity(node_id, key, at)
        domain_id = self._ensure_domain(domain, at)
        # RETURNING: the stored row in the same statement, not a second SELECT.
        # fetchall(): the statement is finished before the batch commits.
        [row] = self._conn.execute(
            """INSERT INTO nodes (id, domain_id, ipv6_addr, port, last_heartbeat,
                                  registered_at, lease_deadline, public_key)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?)
               ON CONFLICT (id) DO UPDATE SET
                 domain_id = excluded.domain_id, ipv6_addr = excluded.ipv6_addr,
                 port = excluded.port, last_heartbeat = excluded.last_heartbeat,
                 lease_deadline = excluded.lease_deadline,
                 public_key = coalesce(excluded.public_key, nodes.public_key)
               RETURNING id, ?, ipv6_addr, port, reputation, registered_at, public_key,
                         last_heartbeat, lease_deadline""",
            [node_id, domain_id, ipv6, port, at, at, deadline, key, domain]).fetchall()
        # _NODE_SELECT's columns; the domain is the one just ensured
        return dict(zip(_NODE_FIELDS, row))

    def _bind_identity(self, node_id: str, key: str | None, at: str) -> str | None:
        """The key the name is bound to after this registration (binding it on
        the first keyed one); a registration without that key is refused."""
        bound = self._scalar("SELECT public_key FROM identities WHERE node_id = ?", [node_id])
        if bound is None:
            if key is not None:
                self._keys_touched.add(node_id)
                self._conn.execute("INSERT INTO identities (node_id, public_key, bound_at) "
                                   "VALUES (?, ?, ?)", [node_id, key, at])
            return key
        if key != bound:
            how = ("its registration must be signed by that key" if key is None
                   else "this is another key")
            raise Conflict("name_taken", f"node name {node_id!r} is bound to a key; {how} "
                           "(an administrator can release the name)", {"node_id": node_id})
        return bound

    def _release_identity(self, cmd: ReleaseIdentity) -> dict:
        node_id = _text(cmd.node_id, "node_id")
        self._keys_touched.add(node_id)
        if not self._conn.execute("DELETE FROM identities WHERE node_id = ?", [node_id]).rowcount:
            raise NotFound(f"node name {node_id!r} is not bound to a key", {"node_id": node_id})
        self._conn.execute("UPDATE nodes SET public_key = NULL WHERE id = ?", [node_id])
        return {"node_id": node_id, "released": True}

    def _set_reputation(self, cmd: SetReputation) -> dict:
        if not isinstance(cmd.entries, (tuple, list)):
            raise Invalid("entries must be a sequence", {"field": "entries"})
        rows = []
        for entry in cmd.entries:
            score = _number(entry.reputation, "reputation")
            if not 0.0 <= score <= 1.0:
                raise Invalid(f"reputation must be within [0, 1], got {score}",
                              {"field": "reputation"})
            rows.append([score, _text(entry.node_id, "node_id")])
        cur = self._conn.executemany("UPDATE nodes SET reputation = ? WHERE id = ?", rows)
        return {"updated": max(cur.rowcount, 0)}

    def public_key_of(self, node_id: str) -> str | None:
        """The key a name is bound to (it outlives the node's lease). Every
        signed heartbeat asks: answered from memory, the SELECT runs once."""
        with self._lock:
            try:
                return self._keys[node_id]
            except KeyError:
                pass
            key = self._scalar("SELECT public_key FROM identities WHERE node_id = ?", [node_id])
            if not self._conn.in_transaction:  # (never cache what may roll back)
                if len(self._keys) >= KEY_CACHE_MAX:
                    self._keys.clear()
                self._keys[node_id] = key
            return key

    def _ensure_domain(self, name: str, at: str) -> str:
        domain_id = domain_id_for(name)
        known = self._scalar("SELECT name FROM domains WHERE id = ?", [domain_id])
        if known is None:
            self._db.execute("INSERT INTO domains (id, name, created_at) VALUES (?, ?, ?)",
                             [domain_id, name, at])
        elif known != name:  # a 64-bit hash collision: refuse rather than merge domains
            raise Conflict("domain_exists", f"domain {name!r} would share id {domain_id} "
                           f"with domain {known!r}", {"domain": name, "id": domain_id})
        return domain_id

    def _create_domain(self, cmd: CreateDomain) -> dict:
        name, at = _text(cmd.name, "name"), _iso(cmd.at, "at")
        if self._scalar("SELECT 1 FROM domains WHERE name = ?", [name]):
            raise Conflict("domain_exists", f"domain {name!r} already exists", {"domain": name})
        return self._domain_row(self._ensure_domain(name, at))

    def _delete_node(self, cmd: DeleteNode) -> dict:
        node_id = _text(cmd.node_id, "node_id")
        node = self._node_or_none(node_id)
        if node is None:
            raise NotFound(f"node {node_id!r} is not registered", {"node_id": node_id})
        self._db.execute("DELETE FROM nodes WHERE id = ?", [node_id])  # peers cascade
        return node

    def _add_peer(self, cmd: AddPeer) -> dict:
        a, b = _pair(cmd.node_a, cmd.node_b)
        at = _iso(cmd.at, "at")
        for node_id in (a, b):
            if not self._scalar("SELECT 1 FROM nodes WHERE id = ?", [node_id]):
                raise NotFound(f"node {node_id!r} is not registered", {"node_id": node_id})
        # Re-adding a known link keeps its first connected_at: AddPeer is idempotent.
        self._db.execute("INSERT INTO peers (node_a, node_b, connected_at) VALUES (?, ?, ?) "
                         "ON CONFLICT DO NOTHING", [a, b, at])
        return self._peer_rows("WHERE node_a = ? AND node_b = ?", [a, b])[0]

    def _remove_peer(self, cmd: RemovePeer) -> dict:
        a, b = _pair(cmd.node_a, cmd.node_b)
        cur = self._db.execute("DELETE FROM peers WHERE node_a = ? AND node_b = ?", [a, b])
        if cur.rowcount == 0:
            raise NotFound(f"no peer link between {a!r} and {b!r}", {"node_a": a, "node_b": b})
        return {"node_a": a, "node_b": b}

    def _expire_nodes(self, cmd: ExpireNodes) -> dict:
        node_ids = _text_tuple(cmd.node_ids, "node_ids")
        _iso(cmd.at, "at")
        if isinstance(cmd.term, int) and cmd.term > 0:
            expired = [node_id for node_id in node_ids if self._db.execute(
                "DELETE FROM nodes WHERE id = ? AND (lease_deadline IS NULL OR lease_deadline <= ?)",
                [node_id, cmd.at]).rowcount]
        else:
            expired = [node_id for node_id in node_ids
                       if self._db.execute("DELETE FROM nodes WHERE id = ?", [node_id]).rowcount]
        return {"expired": expired}

    def _checkpoint_leases(self, cmd: CheckpointLeases) -> dict:
        rows = [_lease_row(entry) for entry in _entries(cmd.entries)]
        at = _number(cmd.at, "at")
        if at > 0:
            # The last one in log order, i.e. the latest leader's, even if
            # an earlier leader's clock ran ahead of it.
            self._conn.execute(_PULSE_STORE, [at])
        cur = self._conn.executemany(
            "UPDATE nodes SET lease_deadline = ?, last_heartbeat = ? WHERE id = ?", rows)
        return {"updated": max(cur.rowcount, 0)}

    # ------------------------------------------------------------ reads

    @_serialized
    def leader_pulse(self) -> float | None:
        """The `at` of the last lease checkpoint applied that carried one
        (CheckpointLeases), None if none did."""
        return self._scalar(_PULSE_SELECT, [])

    @_serialized
    def get_node(self, node_id: str) -> dict:
        node = self._node_or_none(node_id)
        if node is None:
            raise NotFound(f"node {node_id!r} is not registered", {"node_id": node_id})
        return node

    def list_nodes(self, domain: str | None = None, limit: int = 100,
                   after: str | None = None, leases: LeaseTable | None = None) -> dict:
        """One page of node rows in id order: {"nodes": [...], "next": cursor
        or None}. Pass `next` back as `after` for the following page. The
        same page as node_page_json, decoded."""
        return orjson.loads(self.node_page_json(domain, limit, after, leases))

    @_serialized
    def node_page_json(self, domain: str | None = None, limit: int = 100,
                       after: str | None = None, leases: LeaseTable | None = None) -> bytes:
        """list_nodes's page as the JSON the HTTP API sends, each node's
        lease fields taken from `leases` where it holds the node's lease (the
        stored ones lag by a checkpoint), else as stored.

        Keyset pagination: a page costs the same at node 100,000 as at node 1.
        An unknown domain raises NotFound (an empty domain gives an empty page).
        """
        limit = _page_size(limit)
        domain_id = None
        if domain is not None:
            domain_id = self._domain_ids.get(domain)
            if domain_id is None:
                domain_id = self._domain_ids[domain] = self._domain_id(domain)
        if after is not None:
            after = _text(after, "after")
        ids = self._order.page(domain_id, after, limit + 1)
        more = len(ids) > limit
        del ids[limit:]
        if leases is None:
            rows = [head + stored for head, stored in self._read_rows(ids).values()]
        else:
            rows = self._live_rows(ids, leases)
        return b'{"nodes":[' + b",".join(rows) + b'],"next":' + orjson.dumps(
            ids[-1] if more else None) + b"}"

    def _live_rows(self, ids: list[str], leases: LeaseTable) -> list[bytes]:
        """The rows of `ids` as a page shows them with `leases`, from the row
        cache where it has them."""
        if leases is not self._rows_leases:  # another table: a restarted actor, a new leader
            self._forget_rows()
            self._rows_leases = leases
            leases.on_change = self._lease_changed
        rows = self._rows
        found = [rows.get(node_id) for node_id in ids]
        if None in found:
            missing = [node_id for node_id, row in zip(ids, found) if row is None]
            if len(rows) + len(self._heads) + len(missing) > ROW_CACHE_LIMIT:
                self._forget_rows()
            heads = self._heads
            unread: list[tuple[str, bytes | None]] = []  # (id, its live lease fields)
            for node_id, live in zip(missing, leases.lease_fields(missing, iso_utc)):
                head = heads.pop(node_id, None)
                if head is not None and live is not None:
                    rows[node_id] = head + live
                else:  # no head, or no lease: the row shows the stored one
                    unread.append((node_id, live))
            if unread:
                stored = self._read_rows([node_id for node_id, _ in unread])
                for node_id, live in unread:
                    head, stored_lease = stored[node_id]
                    rows[node_id] = head + (live or stored_lease)
            found = [rows[node_id] for node_id in ids]
        return found

    def _lease_changed(self, node_id: str) -> None:
        # Renewals come from the event loop while a batch may be applied in a
        # worker thread: filing the head must not race that batch dropping
        # the row it wrote (the old head would come back). When a batch holds
        # the lock the row is only dropped, never waited for.
        if not self._lock.acquire(blocking=False):
            self._rows.pop(node_id, None)
            return
        try:
            row = self._rows.pop(node_id, None)
            if row is not None:  # the lease fields close the row (_row_json)
                self._heads[node_id] = row[:row.rfind(_LEASE_HEAD)]
        finally:
            self._lock.release()

    def _forget_row(self, node_id: str) -> None:
        self._rows.pop(node_id, None)
        self._heads.pop(node_id, None)

    def _forget_rows(self) -> None:
        self._rows.clear()
        self._heads.clear()

    def _read_rows(self, ids: list[str]) -> dict[str, tuple[bytes, bytes]]:
        """id -> _row_json of its stored row, in the order of `ids`."""
        marks = ", ".join("?" * len(ids))
        found = {row[0]: _row_json(row) for row in
                 self._conn.execute(_NODE_SELECT + f" WHERE n.id IN ({marks})", ids)}
        return {node_id: found[node_id] for node_id in ids}

    def _take_changed_nodes(self) -> list[tuple[str, str | None]]:
        """(id, domain id or None if gone) of each node written since the
        last call, its cached row dropped. Called inside the writing
        transaction, so the notes go with it; the caller moves the nodes in
        the page order once that transaction has committed."""
        changed = self._conn.execute(
            "SELECT DISTINCT c.id, n.domain_id FROM temp.changed_nodes AS c "
            "LEFT JOIN main.nodes AS n ON n.id = c.id").fetchall()
        self._conn.execute("DELETE FROM temp.changed_nodes")
        for node_id, _domain_id in changed:
            self._forget_row(node_id)
        return changed

    def _read_order(self) -> NodeOrder:
        return NodeOrder(self._conn.execute("SELECT id, domain_id FROM nodes"))

    @_serialized
    def list_domains(self) -> list[dict]:
        return list(self._db.query("SELECT id, name, created_at FROM domains ORDER BY name"))

    @_serialized
    def list_peers(self, node_id: str | None = None) -> list[dict]:
        """All peer links, or those of one node (NotFound if it is not registered)."""
        if node_id is None:
            return self._peer_rows("", [])
        if self._node_or_none(node_id) is None:
            raise NotFound(f"node {node_id!r} is not registered", {"node_id": node_id})
        # OR across two columns defeats both indexes; a union uses each.
        return list(self._db.query(
            "SELECT node_a, node_b, connected_at FROM peers WHERE node_a = ? UNION ALL "
            "SELECT node_a, node_b, connected_at FROM peers WHERE node_b = ? "
            "ORDER BY node_a, node_b", [node_id, node_id]))

    @_serialized
    def lease_table(self) -> dict[str, tuple[float | None, float | None]]:
        """node id -> (lease deadline, last heartbeat), both Unix seconds or None."""
        return {node_id: (deadline, _seconds(heartbeat)) for node_id, deadline, heartbeat
                in self._conn.execute("SELECT id, lease_deadline, last_heartbeat FROM nodes")}

    @_serialized
    def leases_due(self, now: float, beyond: float = math.inf
                   ) -> list[tuple[str, float | None, float | None]]:
        """(id, stored lease deadline, last heartbeat) of nodes whose stored
        deadline is at or before `now` (or unknown), or after `beyond`: what
        a leader must track."""
        return [(node_id, deadline, _seconds(heartbeat)) for node_id, deadline, heartbeat
                in self._conn.execute("SELECT id, lease_deadline, last_heartbeat FROM nodes "
                                      "WHERE lease_deadline IS NULL OR lease_deadline <= ? "
                                      "OR lease_deadline > ?", [now, beyond])]

    @_serialized
    def node_count(self) -> int:
        return self._scalar("SELECT count(*) FROM nodes", [])

    def has_node(self, node_id: str) -> bool:
        """Whether a row for `node_id` exists (from memory: the page order,
        which every applied batch keeps exact; one dict lookup, no lock)."""
        return node_id in self._order

    @_serialized
    def state_hash(self) -> str:
        """sha256 over every row of domains, nodes and peers in key order.

        Two replicas at the same applied_index must report the same hash.
        """
        digest = hashlib.sha256()
        for table, columns, order in _HASHED_TABLES:
            digest.update(f"table {table}\n".encode())
            for row in self._conn.execute(f"SELECT {columns} FROM {table} ORDER BY {order}"):
                digest.update(orjson.dumps(row) + b"\n")
        # Sessions decide what a retried write does, so they are replicated
        # state too; hashed only when present so hashes of registries
        # without sessions stay what they were.
        sessions = self._conn.execute(f"SELECT {_SESSION_COLUMNS} FROM sessions "
                                      "ORDER BY request_id").fetchall()
        if sessions:
            digest.update(b"table sessions\n")
            for row in sessions:
                digest.update(orjson.dumps(row) + b"\n")
        return digest.hexdigest()

    # ------------------------------------------------------------ snapshots

    def snapshot(self) -> bytes:
        """The whole registry (every row of domains, nodes, peers in key order)
        and applied_index, as zlib-compressed JSON: the data of a Raft snapshot.

        Consistent (one read transaction, the applied index read in it) and
        deterministic: equal states give equal bytes with the same zlib.
        `restore(data, applied_index)` on any replica rebuilds this state.

        A file database is read through a connection of its own (WAL: it
        neither waits for writers nor holds them up), without the state's
        lock: at 10,000 nodes reading and compressing takes long enough that
        holding the lock would stall every query, heartbeat check and thus the
        event loop of a replica past an election timeout.
        """
        if self._path == ":memory:":
            with self._lock:
                return _snapshot_of(self._conn)
        uri = "file:" + urllib.parse.quote(os.path.abspath(self._path)) + "?mode=ro"
        conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
        try:
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            return _snapshot_of(conn)
        finally:
            conn.close()

    @_serialized
    def restore(self, data: bytes, index: int) -> None:
        """Replace every registry row by those of `data` (from `snapshot()`)
        and set applied_index to `index`, in one transaction.

        `index` must be the applied_index the snapshot was taken at (the Raft
        snapshot's index). ValueError, with nothing changed, if `data` is not
        a snapshot of this schema or was taken at another index.
        """
        import zlib

        if isinstance(index, bool) or not isinstance(index, int) or index < 0:
            raise ValueError(f"snapshot index must be a non-negative integer, got {index!r}")
        try:
            payload = orjson.loads(zlib.decompress(data))
        except (zlib.error, orjson.JSONDecodeError, TypeError) as exc:
            raise ValueError(f"not a registry snapshot: {exc}") from None
        if not isinstance(payload, dict) or payload.get("app") != APP:
            raise ValueError("not a registry snapshot: no 'app' marker")
        if payload.get("schema_version") != SCHEMA_VERSION:
            raise ValueError(f"registry snapshot of schema_version {payload.get('schema_version')!r}, "
                             f"this TrustNet reads version {SCHEMA_VERSION}")
        if payload.get("applied_index") != index:
            raise ValueError(f"registry snapshot taken at index {payload.get('applied_index')!r}, "
                             f"restored as index {index}")
        tables = payload.get("tables")
        plan = []
        for table, columns, _order in _HASHED_TABLES:
            names = [c.strip() for c in columns.split(",")]
            part = tables.get(table) if isinstance(tables, dict) else None
            if not isinstance(part, dict) or part.get("columns") != names:
                raise ValueError(f"registry snapshot: table {table!r} missing or with other columns")
            rows = part.get("rows")
            if not isinstance(rows, list) or any(
                    not isinstance(r, list) or len(r) != len(names) for r in rows):
                raise ValueError(f"registry snapshot: malformed rows in table {table!r}")
            marks = ", ".join("?" * len(names))
            plan.append((f"INSERT INTO {table} ({columns}) VALUES ({marks})", rows))
        session_rows = _snapshot_sessions(tables)
        pulse = payload.get("leader_pulse")
        if pulse is not None and (isinstance(pulse, bool) or not isinstance(pulse, (int, float))):
            raise ValueError("registry snapshot: leader_pulse is not a number")
        try:
            with self._transaction():
                # Children first; the foreign keys stay enforced throughout.
                for table, _columns, _order in reversed(_HASHED_TABLES):
                    self._conn.execute(f"DELETE FROM {table}")
                for sql, rows in plan:
                    self._conn.executemany(sql, rows)
                self._conn.execute("DELETE FROM sessions")
                self._conn.executemany(f"INSERT INTO sessions ({_SESSION_COLUMNS}) VALUES (?, ?, ?)",
                                       session_rows)
                self._conn.execute("UPDATE meta SET value = ? WHERE key = 'applied_index'", [index])
                self._conn.execute("DELETE FROM meta WHERE key = 'leader_pulse'")
                if pulse is not None:
                    self._conn.execute(_PULSE_STORE, [pulse])
        except sqlite3.IntegrityError as exc:
            raise ValueError(f"registry snapshot violates the schema: {exc}") from None
        finally:
            self._keys.clear()
            self._domain_ids.clear()
            self._forget_rows()
            self._conn.execute("DELETE FROM temp.changed_nodes")
        self._order = self._read_order()  # every row was replaced
        self._applied = index

    # ------------------------------------------------------------ helpers

    def _scalar(self, sql: str, params: list) -> Any:
        row = self._conn.execute(sql, params).fetchone()
        return None if row is None else row[0]

    def _node_or_none(self, node_id: str) -> dict | None:
        # (Not through the row cache: a write may ask in mid-batch, before the
        # batch's changes are forgotten.)
        # list(): drain the cursor so no statement stays open into COMMIT
        rows = list(self._db.query(_NODE_SELECT + " WHERE n.id = ?", [node_id]))
        return rows[0] if rows else None

    def _domain_row(self, domain_id: str) -> dict:
        [row] = self._db.query("SELECT id, name, created_at FROM domains WHERE id = ?",
                               [domain_id])
        return row

    def _domain_id(self, name: str) -> str:
        domain_id = self._scalar("SELECT id FROM domains WHERE name = ?", [name])
        if domain_id is None:
            raise NotFound(f"domain {name!r} does not exist", {"domain": name})
        return domain_id

    def _peer_rows(self, where: str, params: list) -> list[dict]:
        return list(self._db.query(
            f"SELECT node_a, node_b, connected_at FROM peers {where} ORDER BY node_a, node_b",
            params))


# ---------------------------------------------------------------- opening


def _connect(path: str) -> sqlite3.Connection:
    why = _unopenable(path)
    if why:
        raise DatabaseUnavailable(f"cannot open registry database {path!r}: {why}")
    try:
        # isolation_level=None: transactions are ours (BEGIN/SAVEPOINT), never implicit.
        return sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    except sqlite3.Error as exc:
        raise _storage_error(path, exc) from exc


def _unopenable(path: str) -> str | None:
    """Why `path` cannot be a database file, for the common cases SQLite words badly."""
    if path == ":memory:":
        return None
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        return "it is a directory"
    if not os.path.isdir(parent):
        return f"directory {parent!r} does not exist"
    if os.path.exists(path) and not os.access(path, os.R_OK | os.W_OK):
        return "no permission to read and write it"
    if not os.path.exists(path) and not os.access(parent, os.W_OK | os.X_OK):
        return f"no permission to create files in {parent!r}"
    return None


def _prepare(db: sqlite_utils.Database, path: str, synchronous: str) -> int:
    """Set the connection up, create or verify the schema; the applied index."""
    conn = db.conn
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    conn.execute("PRAGMA foreign_keys = ON")
    tables = db.table_names()  # the first read: a non-SQLite file fails here
    applied = _verify(conn, path, tables) if tables else None
    # WAL only after verifying: it rewrites the header of whatever file this is.
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute(f"PRAGMA synchronous = {synchronous}")
    applied = _create_schema(conn) if applied is None else applied
    with Transaction(conn):  # additive: registries created before these tables get them
        for statement in (_SESSIONS_SCHEMA + _IDENTITIES_SCHEMA).split(";"):
            if statement.strip():
                conn.execute(statement)
    return applied


def _create_schema(conn: sqlite3.Connection) -> int:
    with Transaction(conn):
        for statement in _SCHEMA.split(";"):
            if statement.strip():
                conn.execute(statement)
        conn.executemany("INSERT INTO meta (key, value) VALUES (?, ?)", [
            ("app", APP), ("schema_version", SCHEMA_VERSION), ("applied_index", 0)])
    return 0


def _verify(conn: sqlite3.Connection, path: str, tables: list[str]) -> int:
    def refuse(why: str) -> NotARegistryDatabase:
        return NotARegistryDatabase(f"{path!r} is not a TrustNet registry database: {why}")

    if "meta" not in tables:
        raise refuse(f"it has no 'meta' table (tables: {', '.join(sorted(tables))})")
    try:
        meta = dict(conn.execute("SELECT key, value FROM meta"))
    except sqlite3.OperationalError as exc:
        raise refuse(f"its 'meta' table is not ours ({exc})") from None
    if meta.get("app") != APP:
        raise refuse(f"meta 'app' is {meta.get('app')!r}, expected {APP!r}")
    if meta.get("schema_version") != SCHEMA_VERSION:
        raise refuse(f"schema_version is {meta.get('schema_version')!r}, "
                     f"this TrustNet reads version {SCHEMA_VERSION}")
    applied = meta.get("applied_index")
    if not isinstance(applied, int):
        raise refuse(f"meta 'applied_index' is {applied!r}, expected an integer")
    return applied


def _storage_error(path: str, exc: sqlite3.Error) -> StorageError:
    name = getattr(exc, "sqlite_errorname", type(exc).__name__)
    if name == "SQLITE_NOTADB":
        return NotARegistryDatabase(f"{path!r} is not a TrustNet registry database: "
                                    f"it is not an SQLite database ({exc})")
    return DatabaseUnavailable(f"cannot use registry database {path!r}: {exc} ({name})")


# ---------------------------------------------------------------- validation
# apply runs on data from the log; anything malformed must become a
# deterministic Invalid refusal, never an exception that would crash every
# replica replaying it.


def _invalid(field: str, what: str, value: Any) -> Invalid:
    return Invalid(f"{field} must be {what}, got {value!r}"[:300], {"field": field})


def _text(value: Any, field: str) -> str:
    if not isinstance(value, str) or not value:
        raise _invalid(field, "a non-empty string", value)
    return value


def _text_tuple(value: Any, field: str) -> tuple[str, ...]:
    if not isinstance(value, (tuple, list)):
        raise _invalid(field, "a sequence of strings", value)
    return tuple(_text(item, field) for item in value)


def _number(value: Any, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _invalid(field, "a number", value)
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise _invalid(field, "a finite number", value)
    return number


def _iso(value: Any, field: str) -> str:
    """Unix seconds as ISO 8601 UTC with microseconds, e.g. 2026-01-30T12:00:00.000000Z."""
    seconds = _number(value, field)
    if not 0 <= seconds < _MAX_SECONDS:
        raise _invalid(field, "Unix seconds between 1970 and 9999", value)
    return iso_utc(seconds)


def iso_utc(t: float | None) -> str | None:
    """Unix seconds as "2026-01-30T12:00:00.123456Z", exactly as
    datetime.fromtimestamp(t, UTC).isoformat() would put it. It runs for every
    command's timestamp and every lease renewal shown, so the date and time
    part is formatted once per second (cached) and only the microseconds here,
    rounded as datetime does."""
    if t is None:
        return None
    frac, whole = math.modf(t)
    us = round(frac * 1e6)
    if us >= 1_000_000:
        whole, us = whole + 1, us - 1_000_000
    elif us < 0:
        whole, us = whole - 1, us + 1_000_000
    return f"{_iso_second(int(whole))}.{us:06d}Z"


@functools.lru_cache(maxsize=4096)
def _iso_second(second: int) -> str:
    return datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")


def _row_json(row: tuple) -> tuple[bytes, bytes]:
    """A _NODE_SELECT row as two pieces of one JSON object: the head (no
    closing brace) and the stored lease fields with the brace, which a page
    replaces by the live lease's (LeaseTable.lease_fields)."""
    cut = len(_NODE_FIELDS) - _LEASE_FIELDS
    head = orjson.dumps(dict(zip(_NODE_FIELDS[:cut], row[:cut])))[:-1]
    stored = orjson.dumps(dict(zip(_NODE_FIELDS[cut:], row[cut:])))
    return head, b"," + stored[1:]


def _seconds(stamp: str | None) -> float | None:
    return None if stamp is None else datetime.fromisoformat(stamp).timestamp()


def _ipv6(value: Any) -> str:
    if not isinstance(value, str):  # IPv6Address() would also take an int or bytes
        raise _invalid("ipv6", "an IPv6 address string", value)
    if compressed_ipv6_bytes(value) is not None:  # what the API stores, checked fast
        return value
    try:
        address = ipaddress.IPv6Address(value)
    except ValueError:
        raise _invalid("ipv6", "an IPv6 address", value) from None
    if address.scope_id is not None:  # a zone means nothing on another host
        raise _invalid("ipv6", "an IPv6 address without a %zone", value)
    return address.compressed


def _port(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise _invalid("port", "an integer from 1 to 65535", value)
    return value


def _optional_text(value: Any, field: str) -> str | None:
    return None if value is None else _text(value, field)


def _registration(cmd: RegisterNode) -> tuple[str, str, int, str, str, float, str | None]:
    return (_text(cmd.node_id, "node_id"), _ipv6(cmd.ipv6), _port(cmd.port),
            _text(cmd.domain, "domain"), _iso(cmd.at, "at"),
            _number(cmd.lease_deadline, "lease_deadline"),
            _optional_text(cmd.public_key, "public_key"))


def _pair(node_a: Any, node_b: Any) -> tuple[str, str]:
    a, b = _text(node_a, "node_a"), _text(node_b, "node_b")
    if a == b:
        raise Invalid(f"a node cannot peer with itself ({a!r})", {"field": "node_b"})
    return (a, b) if a < b else (b, a)


def _entries(value: Any) -> Iterator[LeaseEntry]:
    if not isinstance(value, (tuple, list)):
        raise _invalid("entries", "a sequence of LeaseEntry", value)
    for entry in value:
        if not isinstance(entry, LeaseEntry):
            raise _invalid("entries", "a sequence of LeaseEntry", entry)
        yield entry


def _lease_row(entry: LeaseEntry) -> tuple[float, str, str]:
    return (_number(entry.deadline, "deadline"), _iso(entry.last_heartbeat, "last_heartbeat"),
            _text(entry.node_id, "node_id"))


def _page_size(limit: Any) -> int:
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_PAGE:
        raise _invalid("limit", f"an integer from 1 to {MAX_PAGE}", limit)
    return limit


_SESSION_COLUMNS = "request_id, idx, result"


def _session_result(stored: str) -> Any:
    value = orjson.loads(stored)
    if "refused" in value:
        return error_from_body(value["refused"])
    return value["ok"]


# The leader's pulse (CheckpointLeases.at): the last one applied.
_PULSE_SELECT = "SELECT value FROM meta WHERE key = 'leader_pulse'"
_PULSE_STORE = ("INSERT INTO meta (key, value) VALUES ('leader_pulse', ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value")


def _snapshot_of(conn: sqlite3.Connection) -> bytes:
    import zlib

    conn.execute("BEGIN")  # one read view for all tables and the applied index
    try:
        tables = {table: {"columns": [c.strip() for c in columns.split(",")],
                          "rows": conn.execute(
                              f"SELECT {columns} FROM {table} ORDER BY {order}").fetchall()}
                  for table, columns, order in _HASHED_TABLES}
        sessions = conn.execute(f"SELECT {_SESSION_COLUMNS} FROM sessions "
                                "ORDER BY request_id").fetchall()
        applied = int(conn.execute(
            "SELECT value FROM meta WHERE key = 'applied_index'").fetchone()[0])
        pulse = conn.execute(_PULSE_SELECT).fetchone()
    finally:
        conn.execute("COMMIT")
    if sessions:  # absent when empty: such snapshots stay byte-identical to older ones
        tables["sessions"] = {"columns": _SESSION_COLUMNS.split(", "), "rows": sessions}
    payload = {"app": APP, "schema_version": SCHEMA_VERSION,
               "applied_index": applied, "tables": tables}
    if pulse is not None:  # likewise
        payload["leader_pulse"] = pulse[0]
    return zlib.compress(orjson.dumps(payload), 6)


def _snapshot_sessions(tables: Any) -> list:
    part = tables.get("sessions") if isinstance(tables, dict) else None
    if part is None:
        return []  # a snapshot without sessions (none recorded, or an older version)
    rows = part.get("rows") if isinstance(part, dict) else None
    if (part.get("columns") != _SESSION_COLUMNS.split(", ") or not isinstance(rows, list)
            or any(not isinstance(r, list) or len(r) != 3 or not isinstance(r[0], str)
                   for r in rows)):
        raise ValueError("registry snapshot: malformed table 'sessions'")
    return rows


def _check_indices(items: list[tuple[int, Any]]) -> None:
    previous = 0
    for index, _ in items:
        if isinstance(index, bool) or not isinstance(index, int) or index <= previous:
            raise ValueError(f"log indices must be increasing positive integers, got {index!r} "
                             f"after {previous}")
        previous = index


def _note_node_changes(conn: sqlite3.Connection) -> None:
    """Temp triggers that record the id of every node row written on `conn`,
    whatever the statement, for RegistryState's row cache. Temp objects live
    with the connection, outside the database file, its snapshots and its
    hash; they roll back with the transaction that wrote them (so did the
    change they record)."""
    conn.execute("CREATE TEMP TABLE IF NOT EXISTS changed_nodes (id TEXT NOT NULL)")
    for event, row in (("INSERT", "new"), ("UPDATE", "old"), ("DELETE", "old")):
        conn.execute(f"CREATE TEMP TRIGGER IF NOT EXISTS node_{event.lower()}_noted "
                     f"AFTER {event} ON main.nodes "
                     f"BEGIN INSERT INTO changed_nodes (id) VALUES ({row}.id); END")
