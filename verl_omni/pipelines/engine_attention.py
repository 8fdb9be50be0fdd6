"""Attention through an engine's fused kernel (vllm-omni's FA3) where it applies, diffusers' dispatcher elsewhere:
what a family's attention processor (``<family>/attention.py``) calls from its ``use_attention_function``.

The kernel takes [B, S, H, D] tensors, no mask, bf16 / fp16 and has no backward: masked calls, float32, head dims
past its limit and forwards that need a gradient (the hybrid engine's actor trains through the same modules) go
through diffusers' ``dispatch_attention_fn`` (SDPA) instead.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn

# (q, k, v) [B, S, H, D] -> [B, S, H, D] (or (out, lse)): a fused attention kernel without a mask, e.g. FA3.
AttentionFn = Callable[..., torch.Tensor]
FLASH_DTYPES = (torch.bfloat16, torch.float16)  # what flash kernels take
KERNEL_HEAD_DIMS = (64, 256)  # the head dims FA3 serves (multiples of 8 in this range); others: SDPA


def serves_dtype(dtype: torch.dtype) -> bool:
    """Whether flash kernels take tensors of ``dtype``."""
    return dtype in FLASH_DTYPES


def kernel_applies(query: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> bool:
    """The fused kernel computes this call: no mask, a flash dtype, a head dim it takes, no gradient needed."""
    head_dim = query.shape[-1]
    lo, hi = KERNEL_HEAD_DIMS
    fused = attention_mask is None and query.dtype in FLASH_DTYPES and lo <= head_dim <= hi and head_dim % 8 == 0
    return fused and not (torch.is_grad_enabled() and query.requires_grad)


def attend(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    attention_fn: AttentionFn,
) -> torch.Tensor:
    """Attention over [B, S, H, D] tensors -> [B, S, H, D]: ``attention_fn`` where :func:`kernel_applies`, else
    diffusers' dispatcher."""
    if kernel_applies(query, attention_mask):
        out = attention_fn(query, key, value, causal=False, softmax_scale=query.shape[-1] ** -0.5)
        return out[0] if isinstance(out, tuple) else out
    return dispatch_attention_fn(query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False)


def install_processor(transformer: torch.nn.Module, kinds: tuple[type, ...], make: Callable[[], object]) -> int:
    """Give every attention module of ``transformer`` whose processor is one of ``kinds`` (diffusers' stock class and
    the one ``make`` builds, so a second call replaces the first) a processor from ``make()``; returns how many."""
    modules = [m for m in transformer.modules() if isinstance(getattr(m, "processor", None), kinds)]
    for module in modules:
        module.set_processor(make())
    return len(modules)


__all__ = ["AttentionFn", "FLASH_DTYPES", "attend", "install_processor", "kernel_applies", "serves_dtype"]
