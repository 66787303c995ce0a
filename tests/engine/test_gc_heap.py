"""The engine's GC heap freeze: frozen cycles survive collections until thawed, then are freed."""

import gc
import weakref

from engine.core.engine_core import freeze_heap, thaw_heap


class _Node:
    def __init__(self) -> None:
        self.me = self  # a reference cycle: only the cyclic collector frees it


def test_frozen_cycle_is_kept_until_thawed():
    node = _Node()
    alive = weakref.ref(node)
    try:
        freeze_heap()
        assert gc.get_freeze_count() > 0
        del node
        gc.collect()
        assert alive() is not None  # frozen: out of the collector's reach
        thaw_heap()
        assert gc.get_freeze_count() == 0
        assert alive() is None  # thawed and collected
    finally:
        gc.unfreeze()
