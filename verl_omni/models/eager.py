"""A module tree's compiled modules, and their original forwards for a while (``eager_forwards``).

The engine may compile the transformer's repeated blocks for its rollouts (regional ``torch.compile``), in one of
two forms:
- ``module.compile()`` (diffusers' ``compile_repeated_blocks``): ``module._compiled_call_impl`` holds the compiled
  ``_call_impl``, which ``Module.__call__`` runs instead of the plain one;
- ``module.forward = torch.compile(module.forward)`` (vllm-omni's ``regionally_compile``): an instance attribute,
  dynamo's wrapper of the original (``_torchdynamo_orig_callable``).

In the hybrid engine the actor trains that same transformer; with ``actor.use_torch_compile=false`` its update runs
every block's original forward inside ``eager_forwards``, and the rollouts keep the compiled blocks.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

DYNAMO_ORIGINAL = "_torchdynamo_orig_callable"  # what dynamo's wrapper (torch.compile of a function) wraps


def _is_dynamo_wrapper(fn: Any) -> bool:
    return getattr(fn, DYNAMO_ORIGINAL, None) is not None


def compiled_modules(root: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules of ``root`` (itself included) whose call runs compiled code, in either form."""
    return [
        m
        for m in root.modules()
        if getattr(m, "_compiled_call_impl", None) is not None or _is_dynamo_wrapper(m.__dict__.get("forward"))
    ]


@contextmanager
def eager_forwards(root: torch.nn.Module) -> Iterator[int]:
    """Inside the block every compiled module of ``root`` runs its original forward: ``_compiled_call_impl`` is
    cleared and a compiled ``forward`` attribute is replaced by the callable it wraps. The entry points are looked
    up at call time, so a gradient-checkpointed block's recomputation in a backward inside the block runs eager too.
    On exit (also on an exception) the compiled entry points are back, the very same objects. Yields how many entry
    points were swapped."""
    swapped: list[tuple[torch.nn.Module, str, Any]] = []
    try:
        for m in compiled_modules(root):
            compiled_call = getattr(m, "_compiled_call_impl", None)
            if compiled_call is not None:
                swapped.append((m, "_compiled_call_impl", compiled_call))
                m._compiled_call_impl = None
            forward = m.__dict__.get("forward")
            if _is_dynamo_wrapper(forward):
                swapped.append((m, "forward", forward))
                m.forward = getattr(forward, DYNAMO_ORIGINAL)  # torch.compile wraps the innermost original
        yield len(swapped)
    finally:
        for m, name, compiled in reversed(swapped):
            setattr(m, name, compiled)


__all__ = ["compiled_modules", "eager_forwards"]
