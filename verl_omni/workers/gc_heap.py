"""Python's garbage collector in the process that trains: freeze the long-lived heap once it is built.

Why: a full (generation-2) collection walks every tracked object of the process, and the process that trains holds
millions that live as long as it does: the modules and their parameters, ``torch.compile``'s graphs and guards, in
the hybrid engine the engine's own objects too. At the real size (60 layers, one H200, sixteenth session) such a
collection took 0.8-1.1 s inside every third update or so, in both engines' processes, and the update's compute grew
by about as much: 9.83 / 9.74 s with one against 8.76-8.89 s without (diffusers), 9.63 against 8.60-8.79 s
(vllm_omni). The launch thread stops while it runs, so the GPU waits.

``gc.freeze()`` moves every live object to the permanent generation, which collections skip: later full collections
walk only what was made since. vLLM does the same after its warm-up (``vllm.utils.gc_utils.freeze_gc_heap``); the
actor does it after its first update, the warm-up that builds the compiled training graphs (``actor.freeze_gc_heap``).
Frozen objects are still freed by reference counting; only a cycle among them is never collected, so what can stay
behind is bounded by what was alive after that first update.
"""

from __future__ import annotations

import gc
import time


def freeze_gc_heap() -> tuple[int, float]:
    """Collect every generation, then freeze what survived; returns (objects frozen in total, seconds taken)."""
    start = time.perf_counter()
    gc.collect()  # garbage first: frozen cycles would never be collected
    gc.freeze()
    return gc.get_freeze_count(), time.perf_counter() - start
