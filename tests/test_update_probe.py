"""The update's probe counts the garbage collector's time inside its block only, and leaves no callback behind."""

import gc

import torch

from verl_omni.workers.update_probe import UpdateProbe


class _Cycle:
    def __init__(self):
        self.me = self


def test_probe_counts_collections_inside_its_block_only():
    callbacks_before = list(gc.callbacks)
    with UpdateProbe(torch.device("cpu")) as probe:
        for _ in range(20_000):
            _Cycle()  # unreachable cycles: only the collector frees them
        gc.collect()
    inside = (probe.gc_collections, probe.gc_s)
    gc.collect()  # after the block: not counted
    assert probe.gc_collections == inside[0] >= 1 and probe.gc_s == inside[1] > 0
    assert gc.callbacks == callbacks_before
    # No CUDA device: no cudaMalloc counted; nothing frozen in this test (conftest unfreezes after each test).
    assert probe.metrics() == {"gc_s": probe.gc_s, "cuda_mallocs": 0.0, "gc_frozen_objects": 0.0}


def test_probe_removes_its_callback_when_the_block_raises():
    callbacks_before = list(gc.callbacks)
    try:
        with UpdateProbe(torch.device("cpu")):
            raise RuntimeError("the update failed")
    except RuntimeError:
        pass
    assert gc.callbacks == callbacks_before
