"""Wan text-to-video's random-weight pipeline directories for CPU tests, built offline and deterministically from a
seed: a 2-layer WanTransformer3DModel, a 2-layer UMT5 encoder with a scratch T5 tokenizer, and an AutoencoderKLWan
at the real factors but 8 channels wide, so a 5-frame clip decodes in milliseconds.

- ``tiny:wan`` (Wan2.1): the VAE at 4x temporal, 8x spatial (``num_frames`` = 4k + 1, sides multiples of 16), 4
  latent channels.
- ``tiny:wan2_2_ti2v`` (Wan2.2-TI2V-5B's shape): the Wan2.2 VAE (``is_residual``, 2x2 pixel patches: 16x spatial,
  sides multiples of 32), 8 latent channels, ``expand_timesteps`` (one timestep per video token), shift 5.
- ``tiny:wan2_2_t2v`` (Wan2.2-T2V-A14B's shape): two transformers (the high-noise ``transformer`` and the
  low-noise ``transformer_2``, differently seeded) switched at ``boundary_ratio`` 0.875, Wan2.1's VAE, shift 3.

The scheduler is ``FlowMatchEulerDiscreteScheduler`` with the published static shift: the stock ``WanPipeline`` then
steps exactly as the RL pipeline's ODE steps do, which the equivalence tests rely on. The published checkpoints'
UniPC scheduler (``published.py``) gives the same sigmas; ``WanRLPipeline.rl_schedule`` reads
either.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import torch

from verl_omni.models.tiny import _randomize_zero_params, _seeded_init, build_t5_tokenizer
from verl_omni.pipelines.standins import published_config
from verl_omni.pipelines.wan.published import SCHEDULER as PUBLISHED_SCHEDULER

__all__ = ["TINY_SCHEDULER_CONFIG", "build_tiny_wan"]

TINY_SCHEDULER_CONFIG: dict[str, Any] = {"num_train_timesteps": 1000, "shift": PUBLISHED_SCHEDULER["flow_shift"]}
TINY_Z_DIM = 4
TINY_Z_DIM_2_2 = 8  # the Wan2.2 VAE's tiny latent width (48 published)


def build_tiny_wan(
    path: str | os.PathLike,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    variant: Optional[str] = None,
    **transformer_overrides: Any,
) -> str:
    """Tiny random Wan T2V pipeline: Wan2.1's (``variant=None``) or shaped after a Wan2.2 variant ("TI2V-5B",
    "T2V-A14B"; the module doc). ``transformer_overrides``: ``WanTransformer3DModel`` keyword arguments (e.g.
    ``attention_head_dim=128``, the real head dim; the tiny default is 16)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

    published = published_config("wan", variant) if variant is not None else {}
    pipeline_config = published.get("pipeline", {})
    z_dim = TINY_Z_DIM_2_2 if variant == "TI2V-5B" else TINY_Z_DIM
    tokenizer = build_t5_tokenizer()
    text_dim = 32
    transformer_config = dict(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=z_dim,
        out_channels=z_dim,
        text_dim=text_dim,
        freq_dim=32,
        ffn_dim=64,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=64,
    )
    transformer_config = {**transformer_config, **transformer_overrides}
    with _seeded_init(seed, torch.float32):
        transformer = WanTransformer3DModel(**transformer_config)
    experts = {"transformer": transformer}
    if "transformer_2" in published:  # A14B: the low-noise expert, its own weights
        with _seeded_init(seed + 3, torch.float32):
            experts["transformer_2"] = WanTransformer3DModel(**transformer_config)
    with _seeded_init(seed + 1, torch.float32):
        vae = _tiny_vae(z_dim, wan2_2=variant == "TI2V-5B")
    text_encoder = _tiny_umt5(tokenizer, text_dim, seed + 2)
    for offset, module in enumerate((*experts.values(), vae, text_encoder)):
        _randomize_zero_params(module, seed + 100 + offset)
    shift = published.get("scheduler", {}).get("flow_shift", TINY_SCHEDULER_CONFIG["shift"])
    pipe = WanPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder.to(dtype).eval(),
        vae=vae.to(dtype).eval(),
        scheduler=FlowMatchEulerDiscreteScheduler(**{**TINY_SCHEDULER_CONFIG, "shift": shift}),
        **{name: expert.to(dtype).eval() for name, expert in experts.items()},
        **pipeline_config,
    )
    pipe.save_pretrained(str(path))
    return str(path)


def _tiny_vae(z_dim: int, wan2_2: bool):
    """An 8-channel AutoencoderKLWan at the real factors: Wan2.1's, or the Wan2.2 VAE's (residual blocks, 2x2 pixel
    patches: 16x spatial)."""
    from diffusers import AutoencoderKLWan

    kwargs: dict[str, Any] = {}
    if wan2_2:
        kwargs = dict(decoder_base_dim=8, is_residual=True, in_channels=12, out_channels=12, patch_size=2)
        kwargs.update(scale_factor_spatial=16, scale_factor_temporal=4)
    return AutoencoderKLWan(
        base_dim=8,
        z_dim=z_dim,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        attn_scales=[],
        temperal_downsample=[False, True, True],
        latents_mean=[0.1, -0.2, 0.05, 0.3, -0.1, 0.2, 0.0, -0.3][:z_dim],
        latents_std=[1.5, 2.0, 1.2, 2.5, 0.8, 1.1, 0.6, 1.7][:z_dim],
        **kwargs,
    )


def _tiny_umt5(tokenizer, text_dim: int, seed: int):
    from transformers import UMT5Config, UMT5EncoderModel

    with _seeded_init(seed, torch.float32):
        return UMT5EncoderModel(
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
