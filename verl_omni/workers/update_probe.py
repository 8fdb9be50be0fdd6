"""What the update's wall time holds besides the GPU's work: Python's garbage collector and the CUDA allocator.

Why: an update's wall seconds can grow over a run with the same kernels, from process-wide causes: full garbage
collections over a growing heap (the vllm-omni worker process holds vllm's objects too), the caching allocator going
back to ``cudaMalloc`` as its pool fragments, or the GPU lowering its SM clock under a power or thermal limit. Each is
counted per update, per rank, in the step's metrics so a real-size run tells them apart:

- ``timing/update_gc_s/rank<k>``: seconds in garbage collection; ``perf/update_gc_frozen_objects/rank<k>``: the size
  of the heap the actor freezes after its first update (``workers/gc_heap.py``; 0 before);
- ``perf/update_cuda_mallocs/rank<k>``: ``cudaMalloc`` calls of the caching allocator;
- ``perf/update_sm_clock_mhz/rank<k>`` (mean) and ``..._min_mhz`` (lowest sample): the SM clock sampled through NVML
  during the update (a slow clock and a held-up launch thread look the same in wall seconds).

Where the GPU's peak memory comes from, per rank (``PeakMemory``): ``perf/update_peak_allocated_gb/rank<k>`` and
``perf/update_peak_reserved_gb/rank<k>``, the caching allocator's peaks during the update (tensors; tensors plus
the allocator's cache), and ``perf/rollout_peak_allocated_gb/rank<k>`` / ``perf/rollout_peak_reserved_gb/rank<k>``,
the same from the end of the previous update to the start of this one. With the hybrid engine the rollout runs in
the rank's process, so these hold the rollout's peak (step 1's: also the engine's start-up). Beside the GPU's peak
(``nvidia-smi``) they tell which phase sets it and what lies outside PyTorch's allocator.

Readings at the real size: ``docs/performance.md``.
"""

from __future__ import annotations

import functools
import gc
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Optional

import torch

from verl_omni.workers.activation_memory import CudaMemory

logger = logging.getLogger(__name__)


class UpdateProbe:
    """A ``with`` block's seconds inside Python's garbage collector (every generation, any thread of the process:
    a collection holds the GIL either way), its ``cudaMalloc`` calls on ``device`` (0 off CUDA), the objects in
    the collector's permanent generation (``gc.freeze``) when it ended, and the device's SM clock sampled every
    ``clock_interval_s`` while it ran (0 where there is no reading: off CUDA, or without NVML).

    ``read_sm_clock``: a callable giving the SM clock in MHz; by default NVML's (``torch.cuda.clock_rate``) on CUDA."""

    def __init__(
        self,
        device: torch.device,
        read_sm_clock: Optional[Callable[[], float]] = None,
        clock_interval_s: float = 0.1,
    ):
        self.device = device
        self.gc_s = 0.0
        self.gc_collections = 0
        self.cuda_mallocs = 0
        self.gc_frozen_objects = 0
        self._gc_started: Optional[float] = None
        self._mallocs_before = 0
        if read_sm_clock is None and device.type == "cuda":
            read_sm_clock = functools.partial(torch.cuda.clock_rate, device)
        self.clock = ClockSampler(read_sm_clock, clock_interval_s) if read_sm_clock is not None else None

    def __enter__(self) -> UpdateProbe:
        self._mallocs_before = self._device_mallocs()
        gc.callbacks.append(self._on_gc)
        if self.clock is not None:
            self.clock.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.clock is not None:
            self.clock.stop()
        gc.callbacks.remove(self._on_gc)
        self.cuda_mallocs = self._device_mallocs() - self._mallocs_before
        self.gc_frozen_objects = gc.get_freeze_count()

    def metrics(self) -> dict[str, float]:
        samples = self.clock.samples if self.clock is not None else []
        return {
            "gc_s": self.gc_s,
            "cuda_mallocs": float(self.cuda_mallocs),
            "gc_frozen_objects": float(self.gc_frozen_objects),
            "sm_clock_mhz": sum(samples) / len(samples) if samples else 0.0,
            "sm_clock_min_mhz": min(samples) if samples else 0.0,
        }

    def _on_gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._gc_started = time.perf_counter()
        elif self._gc_started is not None:  # "stop"
            self.gc_s += time.perf_counter() - self._gc_started
            self.gc_collections += 1
            self._gc_started = None

    def _device_mallocs(self) -> int:
        if self.device.type != "cuda":
            return 0
        stats = torch.cuda.memory_stats(self.device)
        if "num_device_alloc" not in stats:  # the caching allocator's cudaMalloc calls, in every torch we pin
            _warn_no_malloc_count()
            return 0
        return int(stats["num_device_alloc"])


class PeakMemory:
    """A ``with`` block around the whole update: entering reads the allocator's peaks since the previous update's
    end (then resets them), leaving reads the update's own (then resets them for the next reading). Whatever resets
    the peaks inside the block (``activation_memory.AutoCheckpointing`` does, when its update starts) reads them
    inside it too: the update's peak is then measured from that reset, still the update's start.

    ``memory``: where the peaks come from (``activation_memory.CudaMemory``'s ``reset_peak`` / ``peak`` /
    ``peak_reserved``); by default the CUDA allocator's on a CUDA ``device``, none elsewhere (every figure 0)."""

    def __init__(self, device: torch.device, memory: Optional[CudaMemory] = None):
        self.memory = memory if memory is not None else (CudaMemory(device) if device.type == "cuda" else None)
        self.before = (0, 0)  # (allocated, reserved) bytes between the previous update and this one
        self.during = (0, 0)  # the same during this update

    def __enter__(self) -> PeakMemory:
        self.before = self._read_and_reset()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.during = self._read_and_reset()

    def _read_and_reset(self) -> tuple[int, int]:
        if self.memory is None:
            return (0, 0)
        peaks = (self.memory.peak(), self.memory.peak_reserved())
        self.memory.reset_peak()
        return peaks

    def metrics(self) -> dict[str, float]:
        return {
            "peak_allocated_gb": self.during[0] / 1e9,
            "peak_reserved_gb": self.during[1] / 1e9,
            "rollout_peak_allocated_gb": self.before[0] / 1e9,
            "rollout_peak_reserved_gb": self.before[1] / 1e9,
        }


@functools.cache
def _warn_no_malloc_count() -> None:  # once per process
    logger.warning("torch.cuda.memory_stats has no num_device_alloc: cuda_mallocs is reported as 0")


class ClockSampler:
    """Reads a clock (``read``, MHz) at ``start``, every ``interval_s`` on a daemon thread, and at ``stop``.

    A failing read (no NVML in this environment, a driver without the query) is logged once per process and ends the
    sampling: the probe must never fail or slow the update it watches. NVML's reading is the SM clock over its last
    sample period (1/6 to 1 s), so the samples overlap a little; their mean and minimum are what the probe reports."""

    def __init__(self, read: Callable[[], float], interval_s: float):
        self.read = read
        self.interval_s = interval_s
        self.samples: list[float] = []
        self._stopped = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._failed = False

    def start(self) -> None:
        self.samples, self._failed = [], False
        self._stopped.clear()
        self._sample()
        self._thread = threading.Thread(target=self._run, name="update-clock-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._sample()

    def _run(self) -> None:
        while not self._stopped.wait(self.interval_s):
            self._sample()

    def _sample(self) -> None:
        if self._failed:
            return
        try:
            self.samples.append(float(self.read()))
        except Exception as exc:  # noqa: BLE001 - any failure of the query only ends the sampling
            self._failed = True
            _warn_no_clock(f"{type(exc).__name__}: {exc}")


@functools.cache
def _warn_no_clock(error: str) -> None:  # once per process (per distinct error)
    logger.warning(
        "the update probe cannot read the GPU's SM clock (%s): sm_clock_mhz covers the samples read before (0: none)",
        error,
    )
