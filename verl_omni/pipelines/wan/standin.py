"""Wan2.1 text-to-video's random-weight pipeline directory for CPU tests (``tiny:wan``), built offline and
deterministically from a seed: a 2-layer WanTransformer3DModel, a 2-layer UMT5 encoder with a scratch T5 tokenizer,
and an AutoencoderKLWan at the real factors (4x temporal, 8x spatial: ``num_frames`` = 4k + 1, sides multiples of
16) but 8 channels wide with 4 latent channels, so a 5-frame 32x32 clip decodes in milliseconds.

The scheduler is ``FlowMatchEulerDiscreteScheduler`` with Wan2.1's static shift 3: the stock ``WanPipeline`` then
steps exactly as the RL pipeline's ODE steps do, which the equivalence tests rely on. The published checkpoints'
UniPC scheduler (``models/standins/wan2_1_t2v.py``) gives the same sigmas; ``WanRLPipeline.rl_schedule`` reads
either.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from verl_omni.models.standins.wan2_1_t2v import SCHEDULER as PUBLISHED_SCHEDULER
from verl_omni.models.tiny import _randomize_zero_params, _seeded_init, build_t5_tokenizer

__all__ = ["TINY_SCHEDULER_CONFIG", "build_tiny_wan"]

TINY_SCHEDULER_CONFIG: dict[str, Any] = {"num_train_timesteps": 1000, "shift": PUBLISHED_SCHEDULER["flow_shift"]}
TINY_Z_DIM = 4


def build_tiny_wan(
    path: str | os.PathLike, seed: int = 0, dtype: torch.dtype = torch.float32, **transformer_overrides: Any
) -> str:
    """Tiny random Wan2.1-style T2V pipeline. ``transformer_overrides``: ``WanTransformer3DModel`` keyword
    arguments (e.g. ``attention_head_dim=128``, the real head dim; the tiny default is 16)."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    tokenizer = build_t5_tokenizer()
    text_dim = 32
    transformer_config = dict(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=TINY_Z_DIM,
        out_channels=TINY_Z_DIM,
        text_dim=text_dim,
        freq_dim=32,
        ffn_dim=64,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=64,
    )
    with _seeded_init(seed, torch.float32):
        transformer = WanTransformer3DModel(**{**transformer_config, **transformer_overrides})
    with _seeded_init(seed + 1, torch.float32):
        vae = AutoencoderKLWan(
            base_dim=8,
            z_dim=TINY_Z_DIM,
            dim_mult=[1, 1, 1, 1],
            num_res_blocks=1,
            attn_scales=[],
            temperal_downsample=[False, True, True],
            latents_mean=[0.1, -0.2, 0.05, 0.3][:TINY_Z_DIM],
            latents_std=[1.5, 2.0, 1.2, 2.5][:TINY_Z_DIM],
        )
    with _seeded_init(seed + 2, torch.float32):
        text_encoder = UMT5EncoderModel(
            UMT5Config(
                vocab_size=len(tokenizer),
                d_model=text_dim,
                d_kv=8,
                d_ff=64,
                num_layers=2,
                num_heads=4,
                relative_attention_num_buckets=8,
                feed_forward_proj="gated-gelu",
                pad_token_id=0,
                eos_token_id=1,
                decoder_start_token_id=0,
            )
        )
    for offset, module in enumerate((transformer, vae, text_encoder)):
        _randomize_zero_params(module, seed + 100 + offset)

    pipe = WanPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder.to(dtype).eval(),
        vae=vae.to(dtype).eval(),
        scheduler=FlowMatchEulerDiscreteScheduler(**TINY_SCHEDULER_CONFIG),
        transformer=transformer.to(dtype).eval(),
    )
    pipe.save_pretrained(str(path))
    return str(path)
