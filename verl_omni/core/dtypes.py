"""The dtype names configs accept, and their torch dtypes."""

from __future__ import annotations

import torch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPES = tuple(_DTYPES)


def resolve_dtype(name: str | torch.dtype) -> torch.dtype:
    """``"bfloat16"`` -> ``torch.bfloat16``; a torch dtype passes through. Unknown names name the allowed ones."""
    if isinstance(name, torch.dtype):
        return name
    if name not in _DTYPES:
        raise ValueError(f"dtype={name!r} is not one of {DTYPES}")
    return _DTYPES[name]


def use_tf32_for_float32_matmuls() -> None:
    """Run float32 matmuls on TF32 tensor cores (a process-wide CUDA setting).

    The float32 LoRA adapter over bf16 base weights multiplies in float32: in IEEE float32 those matmuls run at a
    fraction of the tensor-core rate and cost ~15% of a training step. Every process that runs the transformer on a
    GPU (both engines and the actor) sets this, so the rollout and the actor's recomputation round alike.
    """
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
