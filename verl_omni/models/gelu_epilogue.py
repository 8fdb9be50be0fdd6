"""The feed-forward's first projection and its tanh GELU as ONE GEMM on CUDA, for forwards without a gradient.

diffusers' ``GELU`` module runs ``proj`` (a Linear with bias) and then ``F.gelu(approximate="tanh")``: the GEMM
writes the [tokens, 4·dim] activation to HBM and a second kernel reads it back. ``torch._addmm_activation(...,
use_gelu=True)`` asks cuBLASLt for its GELU+bias epilogue instead, so the activation is written once, already
activated (the GELU kernels show in the rollout's profile: ``benchmarks/pipeline_breakdown.py``).
Inductor keeps that op as a call into cuBLASLt (it has no decomposition there), so it works inside the engines'
regional ``torch.compile`` too.

Why only forwards without a gradient and only ``approximate="tanh"``:
- CUDA's epilogue (and ATen's CUDA fallback when cuBLASLt declines the shapes) is the tanh approximation; on CPU
  the same op computes the exact GELU. Qwen-Image and SD3.5 both use "gelu-approximate" (tanh), so the swap
  changes no formula on CUDA, only the rounding: the epilogue activates the float32 accumulator before the one
  rounding to bf16, where the two-kernel path rounds the projection first.
- The op has no fused backward; the actor's training forward keeps diffusers' path (autograd through Linear and
  GELU), the rollout and every ``no_grad`` forward take the epilogue.
Anything else (CPU, an input dtype other than the weight's, a PEFT-wrapped ``proj``, no bias, DTensor weights) runs
diffusers' path. The rollout call is faster and the activation closer to the float32 result
(``docs/benchmarks/pipeline_breakdown_*``, ``docs/performance.md``).
"""

from __future__ import annotations

import torch
from diffusers.models.activations import GELU
from torch import nn
from torch.distributed.tensor import DTensor


class EpilogueGELU(GELU):
    """diffusers' ``GELU`` with the same ``proj`` (same parameters, same state-dict keys), computed as one
    cuBLASLt GEMM with a GELU epilogue where that is the same formula (see the module docstring)."""

    @classmethod
    def wrapping(cls, module: GELU) -> EpilogueGELU:
        return _gelu_around(cls, module.proj, module.approximate)

    def unwrapped(self) -> GELU:
        """diffusers' module again, around the same ``proj``."""
        return _gelu_around(GELU, self.proj, self.approximate)

    def takes_epilogue(self, hidden_states: torch.Tensor) -> bool:
        proj = self.proj
        if not (hidden_states.is_cuda and self.approximate == "tanh" and type(proj) is nn.Linear):
            return False
        if proj.bias is None or hidden_states.dtype != proj.weight.dtype:
            return False
        if isinstance(proj.weight, DTensor) or isinstance(hidden_states, DTensor):
            return False  # sharded (FSDP2 outside its forward hooks): DTensor has no rule for this op
        needs_grad = hidden_states.requires_grad or proj.weight.requires_grad or proj.bias.requires_grad
        return not (torch.is_grad_enabled() and needs_grad)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if not self.takes_epilogue(hidden_states):
            return super().forward(hidden_states)
        flat = hidden_states.reshape(-1, hidden_states.shape[-1])
        out = torch._addmm_activation(self.proj.bias, flat, self.proj.weight.t(), use_gelu=True)
        return out.view(*hidden_states.shape[:-1], out.shape[-1])


def _gelu_around(cls: type[GELU], proj: nn.Module, approximate: str) -> GELU:
    """A ``cls`` module around an existing ``proj``: shared, not copied, so the optimizer and the weight sync see
    one parameter (GELU's own constructor would build a new Linear)."""
    module = cls.__new__(cls)
    nn.Module.__init__(module)
    module.proj, module.approximate = proj, approximate
    return module


def use_gelu_epilogue(model: nn.Module) -> int:
    """Swap every tanh ``GELU`` module of ``model`` for an :class:`EpilogueGELU` sharing its ``proj``; returns how
    many were swapped (0 when the model has none, e.g. an exact-GELU model: nothing changes then)."""
    return _swap(model, lambda m: type(m) is GELU and m.approximate == "tanh", EpilogueGELU.wrapping)


def use_plain_gelu(model: nn.Module) -> int:
    """Undo :func:`use_gelu_epilogue` (the same ``proj`` modules); returns how many were swapped back."""
    return _swap(model, lambda m: isinstance(m, EpilogueGELU), EpilogueGELU.unwrapped)


def _swap(model: nn.Module, select, replace) -> int:
    targets = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()]
    targets = [(parent, name, child) for parent, name, child in targets if select(child)]
    for parent, name, child in targets:
        setattr(parent, name, replace(child))
    return len(targets)
