"""SD3's joint attention as diffusers' ``JointAttnProcessor2_0`` computes it, the attention itself through an
engine's fused kernel where it applies (``pipelines/engine_attention.py``).

SD3's transformer takes no text mask (CLIP padded to 77 tokens, T5 to ``max_sequence_length``), so every rollout
call is unmasked and the kernel serves all of them in bf16 / fp16. The same processor serves SD3.5's second,
image-only attention (``attn2``, no ``encoder_hidden_states``). Tensors stay [B, S, H, D] (the kernel's layout; the
q/k RMSNorms act on the last dim either way) instead of diffusers' [B, H, S, D].
"""

from __future__ import annotations

import torch
from diffusers.models.attention_processor import JointAttnProcessor2_0

from verl_omni.pipelines.engine_attention import AttentionFn, attend


class SD3EngineAttnProcessor(JointAttnProcessor2_0):
    """``JointAttnProcessor2_0`` with the attention through :func:`~verl_omni.pipelines.engine_attention.attend`."""

    def __init__(self, attention_fn: AttentionFn):
        super().__init__()
        self.attention_fn = attention_fn

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        batch, image_len = hidden_states.shape[0], hidden_states.shape[1]

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch, -1, attn.heads, x.shape[-1] // attn.heads)

        query, key, value = (
            heads(attn.to_q(hidden_states)),
            heads(attn.to_k(hidden_states)),
            heads(attn.to_v(hidden_states)),
        )
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if encoder_hidden_states is not None:
            text_q = heads(attn.add_q_proj(encoder_hidden_states))
            text_k = heads(attn.add_k_proj(encoder_hidden_states))
            text_v = heads(attn.add_v_proj(encoder_hidden_states))
            if attn.norm_added_q is not None:
                text_q = attn.norm_added_q(text_q)
            if attn.norm_added_k is not None:
                text_k = attn.norm_added_k(text_k)
            query, key = torch.cat([query, text_q], dim=1), torch.cat([key, text_k], dim=1)
            value = torch.cat([value, text_v], dim=1)
        out = attend(query, key, value, attention_mask, self.attention_fn).flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is not None:
            out, encoder_hidden_states = out[:, :image_len], out[:, image_len:]
            if not attn.context_pre_only:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        out = attn.to_out[1](attn.to_out[0](out))
        if encoder_hidden_states is not None:
            return out, encoder_hidden_states
        return out


__all__ = ["SD3EngineAttnProcessor"]
