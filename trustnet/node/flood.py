"""Mesh message logic (pure): dedup with bounded memory, hop limit, inbox.

A broadcast gets a random id at its origin. Every node delivers it to its
inbox the first time it sees the id and forwards it, with one hop less, to
every linked peer except the one it came from (and the origin); later copies
are dropped. So each node delivers it exactly once while the seen-set
remembers the id; the seen-set keeps the newest `capacity` ids and forgets
ids older than `max_age` seconds.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from typing import Any, Iterable

import orjson

DEFAULT_HOPS = 16


class SeenSet:
    """The message ids seen lately: at most `capacity`, none older than `max_age`."""

    def __init__(self, capacity: int = 100_000, max_age: float = 600.0):
        self.capacity = capacity
        self.max_age = max_age
        self._ids: OrderedDict[str, float] = OrderedDict()
        self._hops: dict[str, int] = {}  # the most hops left any forwarded copy had

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, msg_id: str) -> bool:
        return msg_id in self._ids

    def add(self, msg_id: str, now: float) -> bool:
        """Record `msg_id`; False if it was already there (a duplicate)."""
        self._expire(now)
        if msg_id in self._ids:
            return False
        self._ids[msg_id] = now
        while len(self._ids) > self.capacity:
            gone, _ = self._ids.popitem(last=False)
            self._hops.pop(gone, None)
        return True

    def better_hops(self, msg_id: str, hops_left: int) -> bool:
        """Record `hops_left` for `msg_id`; True when no copy seen before had as many."""
        best = self._hops.get(msg_id)
        if best is not None and hops_left <= best:
            return False
        self._hops[msg_id] = hops_left
        return True

    def _expire(self, now: float) -> None:
        horizon = now - self.max_age
        while self._ids:
            oldest, seen = next(iter(self._ids.items()))
            if seen >= horizon:
                return
            del self._ids[oldest]
            self._hops.pop(oldest, None)


# The largest payload a node delivers or forwards: what its own API accepts
# in a request (trustnet.node.http.MAX_BODY). A peer's bigger ones are dropped.
MAX_PAYLOAD = 64 * 1024


def arriving_hops(hops_left: int, hops: int) -> int:
    """The hops left of a copy that arrives, as far as we believe it: a fresh
    broadcast starts with `hops` - 1 left and a copy has used one more, so a
    peer claiming more (10**9, say) is only making its copy travel further and
    be forwarded again for each larger claim."""
    return min(hops_left, hops - 1)


def flood_step(seen: SeenSet, now: float, me: str, msg_id: str, origin: str, via: str,
               hops_left: int, target: str | None, links: Iterable[str]
               ) -> tuple[bool, list[str]]:
    """What to do with a flooded message: (deliver here?, peers to forward to).

    A new message is delivered when it is for everyone or for us, and
    forwarded (unless its hops are used up, or it was for us) to every link
    but `via` and `origin`. A copy seen before is never delivered again, but
    it is forwarded when it has more hops left than any earlier copy: the
    first copy to arrive may have come the long way round with its hops used
    up, and dropping the shorter-path copy would cut off the nodes beyond.
    """
    onward = [p for p in links if p not in (via, origin, me)]
    if not seen.add(msg_id, now):
        if target != me and hops_left > 0 and seen.better_hops(msg_id, hops_left):
            return False, onward
        return False, []
    seen.better_hops(msg_id, hops_left)
    deliver = target is None or target == me
    if hops_left <= 0 or target == me:
        return deliver, []
    return deliver, onward


class Inbox:
    """Received messages, newest `capacity` kept; each gets a growing sequence number."""

    def __init__(self, capacity: int = 1000):
        self._items: deque[dict[str, Any]] = deque(maxlen=capacity)
        self.last_seq = 0

    def add(self, *, msg_id: str, origin: str, kind: str, payload: str, at: float,
            hops: int | None = None) -> dict[str, Any]:
        self.last_seq += 1
        # Kept as the text it came as: parsed, a payload of nested empty
        # objects takes ~20x its size, and a peer chooses the payload.
        item = {"seq": self.last_seq, "id": msg_id, "from": origin, "kind": kind,
                "payload": payload, "received_at": at, "hops": hops}
        self._items.append(item)
        return _shown(item)

    def since(self, seq: int, limit: int = 100) -> list[dict[str, Any]]:
        return [_shown(i) for i in self._items if i["seq"] > seq][:limit]

    def ids(self) -> list[str]:
        return [i["id"] for i in self._items]


def _shown(item: dict[str, Any]) -> dict[str, Any]:
    """An inbox item with its payload as the JSON value it encodes."""
    try:
        value = orjson.loads(item["payload"])
    except orjson.JSONDecodeError:
        value = item["payload"]
    return item | {"payload": value}
