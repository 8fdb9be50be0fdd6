"""FLUX.1-dev's tiny random pipeline for CPU tests (``tiny:flux``); the real checkpoint's published figures and its
real-size stand-in are in ``models/standins/flux_1_dev.py``.

Tiny FLUX: one double-stream and one single-stream block (head dim 128 with RoPE axes (16, 56, 56) as the real
model, so a GPU's FA3 takes it), the guidance embedding, CLIP-L-style and T5-style text encoders with tokenizers
built locally (``models/tiny.py``), a 16-channel ``AutoencoderKL`` with VAE factor 8. Image sides must be multiples
of 16 (VAE factor x the 2x2 packing). Built offline, deterministically from the seed, in about a second.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from verl_omni.models.standins import flux_1_dev
from verl_omni.models.tiny import (
    _randomize_zero_params,
    _seeded_init,
    build_clip_tokenizer,
    build_t5_tokenizer,
    tiny_clip_text_config,
)

# The published scheduler and VAE latent scaling (black-forest-labs/FLUX.1-dev scheduler/ and vae/config.json)
FLUX_SCHEDULER_CONFIG: dict[str, Any] = flux_1_dev.SCHEDULER

CLIP_HIDDEN, T5_HIDDEN = 32, 64


def _t5_config(tokenizer):
    from transformers import T5Config

    return T5Config(
        vocab_size=len(tokenizer),
        d_model=T5_HIDDEN,
        d_kv=16,
        d_ff=128,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu",
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )


def build_tiny_flux(path: str | os.PathLike, seed: int = 0, dtype: torch.dtype = torch.float32) -> str:
    """Tiny random FLUX.1-dev-style pipeline directory at ``path`` (loadable by ``FluxPipeline.from_pretrained``)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5EncoderModel

    clip_tokenizer, t5_tokenizer = build_clip_tokenizer(), build_t5_tokenizer()
    with _seeded_init(seed, torch.float32):
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=64,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=128,
            num_attention_heads=2,
            joint_attention_dim=T5_HIDDEN,
            pooled_projection_dim=CLIP_HIDDEN,
            guidance_embeds=True,
            axes_dims_rope=(16, 56, 56),
        )
    with _seeded_init(seed + 1, torch.float32):
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            latent_channels=16,
            layers_per_block=1,
            norm_num_groups=8,
            block_out_channels=(8, 16, 16, 16),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            sample_size=64,
            scaling_factor=flux_1_dev.VAE["scaling_factor"],
            shift_factor=flux_1_dev.VAE["shift_factor"],
            use_quant_conv=False,
            use_post_quant_conv=False,
        )
    with _seeded_init(seed + 2, torch.float32):
        text_encoder = CLIPTextModel(tiny_clip_text_config(clip_tokenizer, CLIP_HIDDEN))
    with _seeded_init(seed + 3, torch.float32):
        text_encoder_2 = T5EncoderModel(_t5_config(t5_tokenizer))
    for offset, module in enumerate((transformer, vae, text_encoder, text_encoder_2)):
        _randomize_zero_params(module, seed + 100 + offset)

    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER_CONFIG),
        vae=vae.to(dtype).eval(),
        text_encoder=text_encoder.to(dtype).eval(),
        tokenizer=clip_tokenizer,
        text_encoder_2=text_encoder_2.to(dtype).eval(),
        tokenizer_2=t5_tokenizer,
        transformer=transformer.to(dtype).eval(),
    )
    pipe.save_pretrained(str(path))
    return str(path)


__all__ = ["FLUX_SCHEDULER_CONFIG", "build_tiny_flux"]
