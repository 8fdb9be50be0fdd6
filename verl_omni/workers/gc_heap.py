"""Python's garbage collector in the process that trains: freeze the long-lived heap once it is built.

Why: a full (generation-2) collection walks every tracked object of the process, and the process that trains holds
millions that live as long as it does: the modules and their parameters, ``torch.compile``'s graphs and guards, in
the hybrid engine the engine's own objects too. At the real size such a collection takes about a second inside
some updates, in both engines' processes (``docs/performance.md``); the launch thread stops while it runs, so the
GPU waits.

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
