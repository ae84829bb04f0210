"""Whole-volume facts kept with a volume that cannot change (volume_facts), and asked again of one that can."""
import gc

import numpy as np
import pytest

from SAMFineTuneLib import volume_facts, windows
from SAMFineTuneLib.input_checks import validate_volume
from SAMFineTuneLib.volume_facts import freeze, frozen, remembered
from SAMFineTuneLib.volume_io import Volume


def counted():
    calls = []
    return calls, lambda: calls.append(1) or len(calls)


def test_a_frozen_volume_keeps_its_facts_until_it_is_freed_and_a_writeable_one_never_does():
    writeable = np.zeros((4, 5, 6), np.float32)
    calls, compute = counted()
    assert remembered(writeable, "fact", compute) == 1 and remembered(writeable, "fact", compute) == 2
    view = writeable[1:]
    view.setflags(write=False)  # read-only here, but its owner can still change the voxels
    assert not frozen(view) and remembered(view, "fact", compute) == 3 and remembered(view, "fact", compute) == 4

    held = freeze(np.ones((4, 5, 6), np.float32))
    assert frozen(held) and not held.flags.writeable
    with pytest.raises(ValueError):
        held[0, 0, 0] = 2
    calls, compute = counted()
    assert remembered(held, "fact", compute) == 1 and remembered(held, "fact", compute) == 1
    assert remembered(held, "other", compute) == 2 and len(calls) == 2
    before = len(volume_facts._FACTS)
    del held
    gc.collect()
    assert len(volume_facts._FACTS) == before - 1


def test_windows_and_checks_of_a_frozen_volume_are_those_of_a_writeable_one_worked_out_once(monkeypatch):
    rng = np.random.default_rng(0)
    array = rng.normal(300, 80, (20, 32, 32)).astype(np.float32)
    held = freeze(array.copy())
    box = (4, 4, 5, 20, 20, 12)
    for window in ("auto", "percentile", "roi", "abdomen"):
        assert windows.window_range(held, window, box) == windows.window_range(array, window, box)
    work = []
    original = windows._percentiles
    monkeypatch.setattr(windows, "_percentiles", lambda a: work.append(a.shape) or original(a))
    for _ in range(3):
        windows.window_range(held, "roi", box)
        windows.window_range(array, "roi", box)
    assert len(work) == 6  # only the writeable array's: the whole volume and the block, three times each
    bad = freeze(np.where(np.arange(600).reshape(6, 10, 10) == 7, np.nan, 1.0))
    for _ in range(2):
        with pytest.raises(ValueError, match="volume contains 1 NaN or infinite voxels"):
            validate_volume(Volume(bad))


def test_the_worker_freezes_the_volumes_it_holds():
    from SAMFineTuneLib.worker.core import VolumeStore

    store = VolumeStore()
    sent = np.zeros((4, 8, 8), np.int16)
    store.remember("ct", sent, {})
    assert store.held("ct", "").array is sent and frozen(sent)
