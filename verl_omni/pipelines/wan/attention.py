"""Wan2.1's attention as diffusers' ``WanAttnProcessor`` computes it, the attention itself through an engine's fused
kernel where it applies (``pipelines/engine_attention.py``).

Wan's text-to-video transformer takes no text mask (UMT5's embeddings are zero-padded to ``max_sequence_length``
and every token attends), so its self-attention and cross-attention calls are unmasked: the kernel serves both in
bf16 / fp16. Image-conditioned modules (``add_k_proj``: Wan's I2V) keep diffusers' processor as it is.
"""

from __future__ import annotations

import torch
from diffusers.models.transformers.transformer_wan import WanAttnProcessor, _get_qkv_projections

from verl_omni.pipelines.engine_attention import AttentionFn, attend


def apply_wan_rotary(hidden_states: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    """Wan's rotary embedding on interleaved (even, odd) channel pairs, as ``WanAttnProcessor`` applies it."""
    x1, x2 = hidden_states.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = freqs_cos[..., 0::2], freqs_sin[..., 1::2]
    out = torch.empty_like(hidden_states)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(hidden_states)


class WanEngineAttnProcessor(WanAttnProcessor):
    """``WanAttnProcessor`` with the attention through :func:`~verl_omni.pipelines.engine_attention.attend`."""

    def __init__(self, attention_fn: AttentionFn):
        super().__init__()
        self.attention_fn = attention_fn

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        if attn.add_k_proj is not None:  # image-conditioned (I2V): diffusers' own path
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        query, key, value = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        query = attn.norm_q(query).unflatten(2, (attn.heads, -1))
        key = attn.norm_k(key).unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            query, key = apply_wan_rotary(query, *rotary_emb), apply_wan_rotary(key, *rotary_emb)
        out = attend(query, key, value, attention_mask, self.attention_fn).flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))


__all__ = ["WanEngineAttnProcessor", "apply_wan_rotary"]
