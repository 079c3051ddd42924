"""The cyclic garbage collector, tuned for a long-running service.

Two settings, both made once the service has started (`settle_heap`):

- What is loaded by then (modules, the lease table of every node) lives as
  long as the process, so it is frozen: kept out of the collector's full
  collections, which would otherwise walk all of it (a 32 ms pause at
  100,000 nodes, measured; none in the same run after the freeze).
- The young generation is collected once this many more container objects
  were allocated than freed. CPython's default, 2,000, is below what a busy
  registry holds in flight (1,000 node connections with a heartbeat each,
  its frames, envelopes and tasks): the count crossed it some 25 times a
  second, a young collection took ~1.2 ms, every tenth an older one ~11 ms,
  about 30 us of each heartbeat in all. At 50,000 the count rarely gets
  there (5 collections in a 30 s run instead of 870), and the garbage cycles
  that wait longer for a collection are a few MB at most. Measured with
  bench/heartbeats.py, one connection per node: 7,966-9,145 -> 10,750-10,889
  heartbeats/s.
"""

from __future__ import annotations

import gc

YOUNG_THRESHOLD = 50_000


def settle_heap() -> None:
    """Freeze what is alive now and raise the young generation's threshold."""
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, older, oldest)
