"""Errors shared across layers."""

from __future__ import annotations

import torch


class NonFiniteError(ValueError):
    """NaN/inf where training needs finite numbers; the trainer refuses the step (``trainer.nan_policy``)."""


def assert_finite(name: str, tensor: torch.Tensor) -> None:
    """Raise NonFiniteError listing the samples (dim 0) that hold NaN/inf, so the trainer can refuse the step."""
    tensor = torch.as_tensor(tensor)
    finite = torch.isfinite(tensor)
    if bool(finite.all()):
        return
    per_sample = finite.reshape(finite.shape[0], -1).all(dim=1) if finite.dim() > 0 else finite.reshape(1)
    bad = torch.nonzero(~per_sample).flatten().tolist()
    shown = bad[:20]
    more = f" (+{len(bad) - len(shown)} more)" if len(bad) > len(shown) else ""
    raise NonFiniteError(f"{name} has non-finite values at sample indices {shown}{more} of {per_sample.numel()}")
