"""What the update's wall time holds besides the GPU's work: Python's garbage collector and the CUDA allocator.

Why: at the real size the update's compute seconds grew over a run in the vllm-omni worker (8.98, 9.51, 10.24 s at
steps 2-4, one H200, fifteenth session) and stayed flat in the diffusers engine's process, with the same actor code.
Two process-wide causes could do that without any kernel changing: full garbage collections over a growing heap
(the worker process holds vllm's objects too) and the caching allocator going back to ``cudaMalloc`` as its pool
fragments. Both are counted per update, per rank, in the step's metrics (``timing/update_gc_s/rank<k>``,
``perf/update_cuda_mallocs/rank<k>``) so a real-size run tells them apart. The sixteenth session's did: full
collections (0.8-1.1 s) came with the slow updates of both engines, so the actor now freezes the heap after its first
update (``workers/gc_heap.py``); ``perf/update_gc_frozen_objects/rank<k>`` shows the frozen heap's size (0 before).
"""

from __future__ import annotations

import functools
import gc
import logging
import time
from typing import Any, Optional

import torch

logger = logging.getLogger(__name__)


class UpdateProbe:
    """A ``with`` block's seconds inside Python's garbage collector (every generation, any thread of the process:
    a collection holds the GIL either way), its ``cudaMalloc`` calls on ``device`` (0 off CUDA), and the objects in
    the collector's permanent generation (``gc.freeze``) when it ended."""

    def __init__(self, device: torch.device):
        self.device = device
        self.gc_s = 0.0
        self.gc_collections = 0
        self.cuda_mallocs = 0
        self.gc_frozen_objects = 0
        self._gc_started: Optional[float] = None
        self._mallocs_before = 0

    def __enter__(self) -> UpdateProbe:
        self._mallocs_before = self._device_mallocs()
        gc.callbacks.append(self._on_gc)
        return self

    def __exit__(self, *exc: Any) -> None:
        gc.callbacks.remove(self._on_gc)
        self.cuda_mallocs = self._device_mallocs() - self._mallocs_before
        self.gc_frozen_objects = gc.get_freeze_count()

    def metrics(self) -> dict[str, float]:
        return {
            "gc_s": self.gc_s,
            "cuda_mallocs": float(self.cuda_mallocs),
            "gc_frozen_objects": float(self.gc_frozen_objects),
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


@functools.cache
def _warn_no_malloc_count() -> None:  # once per process
    logger.warning("torch.cuda.memory_stats has no num_device_alloc: cuda_mallocs is reported as 0")
