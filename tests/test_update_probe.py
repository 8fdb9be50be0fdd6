"""The update's probe counts the garbage collector's time and samples the SM clock inside its block only, and leaves
no callback or thread behind."""

import gc
import logging
import threading
import time

import torch

from verl_omni.workers.update_probe import PeakMemory, UpdateProbe


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
    # No CUDA device: no cudaMalloc counted, no SM clock read; nothing frozen in this test (conftest unfreezes after
    # each test).
    assert probe.metrics() == {
        "gc_s": probe.gc_s,
        "cuda_mallocs": 0.0,
        "gc_frozen_objects": 0.0,
        "sm_clock_mhz": 0.0,
        "sm_clock_min_mhz": 0.0,
    }


def test_probe_removes_its_callback_when_the_block_raises():
    callbacks_before = list(gc.callbacks)
    try:
        with UpdateProbe(torch.device("cpu")):
            raise RuntimeError("the update failed")
    except RuntimeError:
        pass
    assert gc.callbacks == callbacks_before


class _Clock:
    """A stand-in SM clock (MHz) that records what it returned: 1980, 1979, ... one lower per read."""

    def __init__(self, fail_after: int | None = None):
        self.returned: list[float] = []
        self.calls = 0
        self.fail_after = fail_after

    def __call__(self) -> float:
        self.calls += 1
        if self.fail_after is not None and len(self.returned) == self.fail_after:
            raise RuntimeError("NVML: not supported")
        self.returned.append(1980.0 - len(self.returned))
        return self.returned[-1]


def test_probe_samples_the_clock_while_its_block_runs_and_stops_after():
    clock = _Clock()
    with UpdateProbe(torch.device("cpu"), read_sm_clock=clock, clock_interval_s=0.02) as probe:
        deadline = time.monotonic() + 10  # the read at start, then at least two by the thread (a busy CI machine)
        while len(clock.returned) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
    read_inside = len(clock.returned)
    time.sleep(0.1)  # the sampling thread ended with the block: no read after it
    assert len(clock.returned) == read_inside >= 4  # at start, several in between, at stop
    metrics = probe.metrics()
    assert metrics["sm_clock_mhz"] == sum(clock.returned) / read_inside
    assert metrics["sm_clock_min_mhz"] == clock.returned[-1] < metrics["sm_clock_mhz"] < clock.returned[0]
    assert not any(t.name == "update-clock-sampler" for t in threading.enumerate())


def test_a_failing_clock_read_ends_the_sampling_with_a_warning_and_not_the_update(caplog):
    clock = _Clock(fail_after=2)
    with caplog.at_level(logging.WARNING, logger="verl_omni.workers.update_probe"):
        with UpdateProbe(torch.device("cpu"), read_sm_clock=clock, clock_interval_s=0.01) as probe:
            time.sleep(0.1)
    assert clock.returned == [1980.0, 1979.0] and clock.calls == 3  # no read after the failure
    assert probe.metrics()["sm_clock_mhz"] == 1979.5 and probe.metrics()["sm_clock_min_mhz"] == 1979.0
    assert "cannot read the GPU's SM clock (RuntimeError: NVML: not supported)" in caplog.text
    # A first read that fails: no sample, reported as 0 (the figure for "no reading").
    with UpdateProbe(torch.device("cpu"), read_sm_clock=_Clock(fail_after=0)) as probe:
        pass
    assert probe.metrics()["sm_clock_mhz"] == probe.metrics()["sm_clock_min_mhz"] == 0.0


def test_probe_stops_its_clock_thread_when_the_block_raises():
    clock = _Clock()
    try:
        with UpdateProbe(torch.device("cpu"), read_sm_clock=clock, clock_interval_s=0.01):
            raise RuntimeError("the update failed")
    except RuntimeError:
        pass
    read = len(clock.returned)
    time.sleep(0.05)
    assert len(clock.returned) == read and not any(t.name == "update-clock-sampler" for t in threading.enumerate())


class _Allocator:
    """A stand-in allocator with ``CudaMemory``'s peak interface: ``alloc``/``free`` move the allocated bytes
    (reserved = the most ever allocated, as a cache that never releases); the peaks follow since the last reset."""

    def __init__(self):
        self.allocated = self.reserved = 0
        self.peak_allocated = self.peak_reserved_bytes = 0

    def alloc(self, n: int) -> None:
        self.allocated += n
        self.reserved = max(self.reserved, self.allocated)
        self.peak_allocated = max(self.peak_allocated, self.allocated)
        self.peak_reserved_bytes = max(self.peak_reserved_bytes, self.reserved)

    def free(self, n: int) -> None:
        self.allocated -= n

    def peak(self) -> int:
        return self.peak_allocated

    def peak_reserved(self) -> int:
        return self.peak_reserved_bytes

    def reset_peak(self) -> None:
        self.peak_allocated, self.peak_reserved_bytes = self.allocated, self.reserved


def test_peak_memory_tells_the_rollouts_peak_from_the_updates():
    memory = _Allocator()
    memory.alloc(10**9)  # the weights, resident throughout
    memory.alloc(6 * 10**9)  # a rollout's working memory, then freed (its cache stays reserved)
    memory.free(6 * 10**9)
    with PeakMemory(torch.device("cpu"), memory=memory) as first:
        memory.reset_peak()  # what AutoCheckpointing does when the update starts: the update's peak is still read
        memory.alloc(3 * 10**9)
        memory.free(3 * 10**9)
    assert first.metrics() == {
        "peak_allocated_gb": 4.0,
        "peak_reserved_gb": 7.0,
        "rollout_peak_allocated_gb": 7.0,
        "rollout_peak_reserved_gb": 7.0,
    }
    memory.alloc(2 * 10**9)  # the next rollout: smaller than the update before it, and read alone
    memory.free(2 * 10**9)
    with PeakMemory(torch.device("cpu"), memory=memory) as second:
        pass
    assert second.metrics()["rollout_peak_allocated_gb"] == 3.0 and second.metrics()["peak_allocated_gb"] == 1.0


def test_peak_memory_reads_nothing_off_cuda():
    with PeakMemory(torch.device("cpu")) as peaks:
        torch.ones(1000)
    assert set(peaks.metrics().values()) == {0.0}
