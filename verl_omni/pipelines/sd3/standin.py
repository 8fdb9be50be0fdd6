"""Stable Diffusion 3.5's random-weight pipeline directory for CPU tests (``tiny:sd3``), built offline and
deterministically from a seed. Tiny SD3: VAE factor 8, 16 latent channels, patch 2, image sides multiples of 16.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from verl_omni.models.tiny import (
    _randomize_zero_params,
    _seeded_init,
    build_clip_tokenizer,
    build_t5_tokenizer,
    tiny_autoencoder_kl,
    tiny_clip_text_config,
    tiny_t5_encoder_config,
)
from verl_omni.pipelines.sd3.published import SD35_SCHEDULER_CONFIG

__all__ = ["SD35_SCHEDULER_CONFIG", "build_tiny_sd3"]


def build_tiny_sd3(
    path: str | os.PathLike, seed: int = 0, dtype: torch.dtype = torch.float32, **transformer_overrides: Any
) -> str:
    """Tiny random SD3.5-style pipeline (2 MMDiT layers with qk RMSNorm, two CLIPs + T5, 16-channel VAE).
    ``transformer_overrides``: ``SD3Transformer2DModel`` keyword arguments (e.g. ``attention_head_dim=64``, the
    real head dim, which a GPU's FA3 takes; the tiny default is 32). The caption projection follows the blocks'
    width (heads x head dim), as in SD3.5, unless ``caption_projection_dim`` is given."""
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    clip_tokenizer = build_clip_tokenizer()
    t5_tokenizer = build_t5_tokenizer()
    clip_hidden, t5_hidden = 32, 64  # T5 width >= the two CLIP widths concatenated (the pipeline pads CLIP to it)

    transformer_config = dict(
        sample_size=8,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=2,
        attention_head_dim=32,
        num_attention_heads=2,
        joint_attention_dim=t5_hidden,
        pooled_projection_dim=2 * clip_hidden,
        pos_embed_max_size=32,
        qk_norm="rms_norm",
    )
    transformer_config.update(transformer_overrides)
    if "caption_projection_dim" not in transformer_overrides:  # the joint blocks norm the text stream at their width
        width = transformer_config["attention_head_dim"] * transformer_config["num_attention_heads"]
        transformer_config["caption_projection_dim"] = width
    with _seeded_init(seed, torch.float32):
        transformer = SD3Transformer2DModel(**transformer_config)
    with _seeded_init(seed + 1, torch.float32):
        vae = tiny_autoencoder_kl(scaling_factor=1.5305, shift_factor=0.0609)
    with _seeded_init(seed + 2, torch.float32):
        text_encoder = CLIPTextModelWithProjection(tiny_clip_text_config(clip_tokenizer, clip_hidden))
    with _seeded_init(seed + 3, torch.float32):
        text_encoder_2 = CLIPTextModelWithProjection(tiny_clip_text_config(clip_tokenizer, clip_hidden))
    with _seeded_init(seed + 4, torch.float32):
        text_encoder_3 = T5EncoderModel(tiny_t5_encoder_config(t5_tokenizer, t5_hidden))
    modules = (transformer, vae, text_encoder, text_encoder_2, text_encoder_3)
    for offset, module in enumerate(modules):
        _randomize_zero_params(module, seed + 100 + offset)

    pipe = StableDiffusion3Pipeline(
        transformer=transformer.to(dtype).eval(),
        scheduler=FlowMatchEulerDiscreteScheduler(**SD35_SCHEDULER_CONFIG),
        vae=vae.to(dtype).eval(),
        text_encoder=text_encoder.to(dtype).eval(),
        tokenizer=clip_tokenizer,
        text_encoder_2=text_encoder_2.to(dtype).eval(),
        tokenizer_2=build_clip_tokenizer(),
        text_encoder_3=text_encoder_3.to(dtype).eval(),
        tokenizer_3=t5_tokenizer,
    )
    pipe.save_pretrained(str(path))
    return str(path)
