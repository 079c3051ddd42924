"""Node ids in id order, over all nodes and per domain, held in memory.

A page of nodes takes its ids from here: walking SQLite's index for them
cost ~0.3 us a row (~35-50 us for a page of 100, most of what was left of a
domain query's own cost once the rows came from a cache); a slice of a
sorted list costs a few. RegistryState keeps it exact: it is built from the
table, and after every committed batch each node row the batch wrote (temp
triggers note them) is looked up again and moved, added or dropped here.
"""

from __future__ import annotations

import sys
from itertools import islice
from typing import Iterable

from sortedcontainers import SortedList


class NodeOrder:
    def __init__(self, rows: Iterable[tuple[str, str]] = ()):
        """`rows`: (node id, domain id) of every node, each id once."""
        # Interned, see place(); the lists are sorted once, not id by id.
        self._domain_of = {sys.intern(node_id): sys.intern(domain_id)
                           for node_id, domain_id in rows}
        self._all = SortedList(self._domain_of)
        members: dict[str, list[str]] = {}
        for node_id, domain_id in self._domain_of.items():
            members.setdefault(domain_id, []).append(node_id)
        self._by_domain = {domain_id: SortedList(ids) for domain_id, ids in members.items()}

    def __len__(self) -> int:
        return len(self._all)

    def __contains__(self, node_id: object) -> bool:
        return node_id in self._domain_of

    def place(self, node_id: str, domain_id: str | None) -> None:
        """Node `node_id` is now in domain `domain_id`, or gone (None)."""
        old = self._domain_of.get(node_id)
        if old == domain_id:
            return
        if old is not None:
            self._by_domain[old].remove(node_id)
            if not self._by_domain[old]:
                del self._by_domain[old]
            if domain_id is None:
                del self._domain_of[node_id]
                self._all.remove(node_id)
                return
        else:
            # Interned, as the row cache's and the lease table's keys are: a
            # page's lookups of these ids then match by identity, without
            # reading another copy of each id (cache misses at 100,000 nodes).
            node_id = sys.intern(node_id)
            self._all.add(node_id)
        # One string per domain, not one per node (ids of 16 hex digits).
        domain_id = sys.intern(domain_id)
        self._domain_of[node_id] = domain_id
        self._by_domain.setdefault(domain_id, SortedList()).add(node_id)

    def page(self, domain_id: str | None, after: str | None, count: int) -> list[str]:
        """Up to `count` ids after `after` (exclusive) in id order, of one
        domain or (domain_id None) of all nodes."""
        ids = self._all if domain_id is None else self._by_domain.get(domain_id)
        if ids is None:
            return []
        if after is None:
            return list(ids.islice(0, count))
        return list(islice(ids.irange(after, inclusive=(False, True)), count))
