"""Fused kernels an engine may switch a loaded diffusers transformer to (the vllm-omni engine does; the diffusers
engine stays on stock modules, as the baseline).

``linear + tanh-GELU`` (the first layer of diffusers' ``FeedForward(activation_fn="gelu-approximate")``) as ONE
cuBLASLt matmul with a GELU epilogue (``torch._addmm_activation``): the activation is applied to the accumulator
before the store, which saves the separate pass that reads and writes the 4x-wide hidden tensor (at B=16, 512²,
Qwen-Image width: 0.8 GB per layer and step). Wrapped as a custom op so torch.compile keeps it whole instead of
decomposing it back into matmul + GELU.
"""

from __future__ import annotations

import torch
from torch import nn


@torch.library.custom_op("verl_omni::linear_gelu_tanh", mutates_args=())
def linear_gelu_tanh(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``gelu(x @ weight.T + bias, approximate="tanh")`` in one matmul call on CUDA (cuBLASLt's GELU epilogue is
    the tanh form). Elsewhere two ops: the CPU ``_addmm_activation`` applies the exact GELU, not the tanh form.
    Inference only (no autograd formula): the engine runs under ``inference_mode``."""
    if not x.is_cuda:
        return torch.nn.functional.gelu(torch.nn.functional.linear(x, weight, bias), approximate="tanh")
    flat = x.reshape(-1, x.shape[-1])
    out = torch._addmm_activation(bias, flat, weight.t(), use_gelu=True)
    return out.view(*x.shape[:-1], weight.shape[0])


@linear_gelu_tanh.register_fake
def _linear_gelu_tanh_fake(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])


class FusedTanhGELU(nn.Module):
    """Replaces a diffusers ``GELU(approximate="tanh")`` module; keeps its ``proj`` (same parameters, same names)."""

    def __init__(self, proj: nn.Linear):
        super().__init__()
        self.proj = proj

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return linear_gelu_tanh(hidden_states, self.proj.weight, self.proj.bias)


def fuse_tanh_gelu_projections(model: nn.Module) -> int:
    """Swap every diffusers tanh-GELU projection of ``model`` whose ``proj`` is a plain biased ``nn.Linear`` (not a
    LoRA-wrapped layer) for :class:`FusedTanhGELU`. Returns how many were swapped."""
    from diffusers.models.activations import GELU

    targets = []
    for parent in model.modules():
        for name, child in parent.named_children():
            if (type(child) is GELU and child.approximate == "tanh" and type(child.proj) is nn.Linear
                    and child.proj.bias is not None):
                targets.append((parent, name, child))
    for parent, name, child in targets:
        setattr(parent, name, FusedTanhGELU(child.proj))  # also right for ModuleList children ("0", "1", ...)
    return len(targets)


__all__ = ["FusedTanhGELU", "fuse_tanh_gelu_projections", "linear_gelu_tanh"]
