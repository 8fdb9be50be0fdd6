"""FLUX's attention as diffusers' ``FluxAttnProcessor`` computes it, the attention itself through an engine's fused
kernel where it applies (``pipelines/engine_attention.py``).

FLUX's transformer takes no text mask (T5 is padded to ``max_sequence_length`` and every token attends), so every
rollout call is unmasked: the kernel serves all of them in bf16 / fp16.
"""

from __future__ import annotations

import torch
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor, _get_qkv_projections

from verl_omni.pipelines.engine_attention import AttentionFn, attend


class FluxEngineAttnProcessor(FluxAttnProcessor):
    """``FluxAttnProcessor`` for both FLUX block kinds (the double-stream blocks, with ``encoder_hidden_states``, and
    the single-stream ones, without) with the attention through :func:`~verl_omni.pipelines.engine_attention.attend`."""

    def __init__(self, attention_fn: AttentionFn):
        super().__init__()
        self.attention_fn = attention_fn

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        query, key, value, encoder_query, encoder_key, encoder_value = _get_qkv_projections(
            attn, hidden_states, encoder_hidden_states
        )
        query = attn.norm_q(query.unflatten(-1, (attn.heads, -1)))
        key = attn.norm_k(key.unflatten(-1, (attn.heads, -1)))
        value = value.unflatten(-1, (attn.heads, -1))
        if attn.added_kv_proj_dim is not None:
            encoder_query = attn.norm_added_q(encoder_query.unflatten(-1, (attn.heads, -1)))
            encoder_key = attn.norm_added_k(encoder_key.unflatten(-1, (attn.heads, -1)))
            query = torch.cat([encoder_query, query], dim=1)
            key = torch.cat([encoder_key, key], dim=1)
            value = torch.cat([encoder_value.unflatten(-1, (attn.heads, -1)), value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        out = attend(query, key, value, attention_mask, self.attention_fn).flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is None:
            return out
        text_len = encoder_hidden_states.shape[1]
        text, image = out.split_with_sizes([text_len, out.shape[1] - text_len], dim=1)
        image = attn.to_out[1](attn.to_out[0](image.contiguous()))
        return image, attn.to_add_out(text.contiguous())


__all__ = ["FluxEngineAttnProcessor"]
