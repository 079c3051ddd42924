"""Node leases held in memory: renewing one costs no disk write.

Deadlines are kept in one-second buckets (a coarse timing wheel), so a
renewal is O(1) and a sweep only looks at the buckets that are due, however
many nodes there are. Persisting deadlines is the RegistryActor's job: it
takes the renewals since the last checkpoint with `dirty_chunks()` (or
`take_dirty()`) and writes them in batches.
"""

from __future__ import annotations

import math
import sys
from collections import defaultdict
from collections.abc import Iterable, Iterator
from typing import Callable

import orjson


class LeaseTable:
    def __init__(self, ttl: float):
        self.ttl = ttl
        self._deadline: dict[str, float] = {}
        self._last_renewal: dict[str, float] = {}
        # Called with a node's id whenever its lease starts, changes or ends:
        # the registry's cache of rows as pages show them hooks in here.
        self.on_change: Callable[[str], None] | None = None
        self._buckets: defaultdict[int, set[str]] = defaultdict(set)
        self._dirty: set[str] = set()

    def __len__(self) -> int:
        return len(self._deadline)

    def __contains__(self, node_id: str) -> bool:
        return node_id in self._deadline

    def deadline(self, node_id: str) -> float | None:
        return self._deadline.get(node_id)

    def last_renewal(self, node_id: str) -> float | None:
        return self._last_renewal.get(node_id)

    def live_fields(self, node_id: str, fmt: Callable[[float], str]) -> dict | None:
        """The node's lease as the fields of its row it overrides (the stored
        ones lag by a checkpoint): {"last_heartbeat": fmt(last renewal),
        "lease_deadline": deadline}, or None without a lease."""
        deadline = self._deadline.get(node_id)
        if deadline is None:
            return None
        return {"last_heartbeat": fmt(self._last_renewal[node_id]), "lease_deadline": deadline}

    def lease_fields(self, node_ids: list[str], fmt: Callable[[float], str]) -> list[bytes | None]:
        """live_fields of each node as the closing fields of its JSON object,
        `,"last_heartbeat":..,"lease_deadline":..}`, or None without a lease."""
        return [None if (fields := self.live_fields(node_id, fmt)) is None
                else b"," + orjson.dumps(fields)[1:] for node_id in node_ids]

    def grant(self, node_id: str, now: float, deadline: float | None = None, *,
              stored: bool = False) -> float:
        """Start or renew a lease; returns its deadline (now + ttl by default).
        stored=True: the node's row already holds this lease (a registration
        just wrote it), so there is nothing to checkpoint."""
        if deadline is None:
            deadline = now + self.ttl
        old = self._deadline.get(node_id)
        if old is not None:
            self._bucket_of(old).discard(node_id)
        else:  # a new key: interned, see NodeOrder.place
            node_id = sys.intern(node_id)
        self._deadline[node_id] = deadline
        self._last_renewal[node_id] = now
        if self.on_change is not None:
            self.on_change(node_id)
        self._buckets[_slot(deadline)].add(node_id)
        if stored:
            self._dirty.discard(node_id)
        else:
            self._dirty.add(node_id)
        return deadline

    def renew(self, node_id: str, now: float) -> float | None:
        """Renew a known lease; None when the node holds none (it must register)."""
        if node_id not in self._deadline:
            return None
        return self.grant(node_id, now)

    def drop(self, node_id: str) -> None:
        old = self._deadline.pop(node_id, None)
        if old is not None:
            self._bucket_of(old).discard(node_id)
        self._last_renewal.pop(node_id, None)
        if self.on_change is not None and old is not None:
            self.on_change(node_id)
        self._dirty.discard(node_id)

    def expired(self, now: float) -> list[str]:
        """Ids whose deadline has passed, in a stable order. They stay in the
        table until dropped, so an expiry that fails to commit is retried."""
        due: list[str] = []
        for slot in sorted(s for s in self._buckets if s <= _slot(now)):
            ids = self._buckets[slot]
            if not ids:
                del self._buckets[slot]
                continue
            due.extend(n for n in ids if self._deadline[n] <= now)
        return sorted(due)

    def extend(self, seconds: float, *, stored_too: bool = False) -> None:
        """Move every deadline `seconds` later (the registry could not serve
        heartbeats that long, or the clock stepped): O(n), for the rare
        stall, not per renewal. `stored_too` (a clock step) marks every
        lease dirty: the stored deadlines must move as well, or an expiry
        (which removes a row only once its stored deadline has passed) or a
        new leader would go by the old ones. After a stall they need not: a
        stored deadline only lags, never holds an expiry back."""
        self._buckets.clear()
        for node_id in self._deadline:
            deadline = self._deadline[node_id] = self._deadline[node_id] + seconds
            self._buckets[_slot(deadline)].add(node_id)
            if stored_too:
                self._dirty.add(node_id)
            if self.on_change is not None:
                self.on_change(node_id)

    def take_dirty(self, ids: Iterable[str] | None = None) -> list[tuple[str, float, float]]:
        """(node_id, deadline, last_renewal), as they are now, of the leases
        changed since they were last taken: all, or those of `ids` that
        still are."""
        taken = sorted(self._dirty) if ids is None else [n for n in ids if n in self._dirty]
        self._dirty.difference_update(taken)
        return [(n, self._deadline[n], self._last_renewal[n]) for n in taken]

    def dirty_chunks(self, size: int) -> Iterator[list[tuple[str, float, float]]]:
        """take_dirty in chunks of the leases dirty now, each taken only when
        the caller asks for it: a checkpoint that writes one and waits before
        the next never writes a value older than one stored meanwhile."""
        ids = sorted(self._dirty)
        for i in range(0, len(ids), size):
            if chunk := self.take_dirty(ids[i:i + size]):
                yield chunk

    def mark_dirty(self, node_ids: Iterable[str]) -> None:
        """Write these again at the next checkpoint (a chunk that failed); ids
        that hold no lease any more are skipped."""
        self._dirty.update(n for n in node_ids if n in self._deadline)

    def _bucket_of(self, deadline: float) -> set[str]:
        return self._buckets.get(_slot(deadline), set())


def _slot(t: float) -> int:
    return math.floor(t)
