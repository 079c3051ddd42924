"""The services' garbage-collector settings (trustnet.gc_tuning)."""

import gc

from trustnet.gc_tuning import YOUNG_THRESHOLD, settle_heap


def test_settle_heap_freezes_what_lives_and_raises_the_young_threshold():
    before = gc.get_threshold()
    try:
        survivor = [object() for _ in range(10)]
        settle_heap()
        assert gc.get_freeze_count() >= len(survivor)
        assert gc.get_threshold() == (YOUNG_THRESHOLD, *before[1:])
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
