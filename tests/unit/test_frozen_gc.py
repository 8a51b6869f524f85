"""recipe.frozen_gc: the objects alive at the start leave the garbage collector's scans for the loop, and
come back after it, also when the loop raises (a run stopped by Ctrl-C or an error)."""

import gc

import pytest

from ppalli.train.recipe import frozen_gc


def test_freezes_for_the_loop_and_unfreezes_after():
    gc.unfreeze()
    kept = [object() for _ in range(1000)]
    with frozen_gc():
        assert gc.get_freeze_count() >= len(kept)
    assert gc.get_freeze_count() == 0


def test_unfreezes_when_the_loop_raises():
    gc.unfreeze()
    with pytest.raises(KeyboardInterrupt), frozen_gc():
        assert gc.get_freeze_count() > 0
        raise KeyboardInterrupt
    assert gc.get_freeze_count() == 0
