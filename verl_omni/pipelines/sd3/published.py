"""Stable Diffusion 3.5 Medium (stabilityai/stable-diffusion-3.5-medium) at its real size with random weights:
the 24-layer MMDiT-X transformer (dual attention in layers 0-12, qk RMSNorm), CLIP-L and OpenCLIP bigG text
towers with projections, the T5-XXL v1.1 encoder, their tokenizers at the real vocabulary sizes, the 16-channel
VAE and the published scheduler."""

from __future__ import annotations

from typing import Any, Optional

import torch

from verl_omni.models.standins._common import build_module, clip_tokenizer, t5_tokenizer, transformer_layers
from verl_omni.models.standins._text_encoders import (
    CLIP_L_TEXT,
    CLIP_L_TOKENIZER,
    OPENCLIP_BIGG_TEXT,
    OPENCLIP_BIGG_TOKENIZER,
    T5_TOKENIZER,
    T5_V1_1_XXL,
    config_kwargs,
)

REPO = "stabilityai/stable-diffusion-3.5-medium"

# stabilityai/stable-diffusion-3.5-*/scheduler/scheduler_config.json: static shift 3.
SD35_SCHEDULER_CONFIG: dict[str, Any] = {"num_train_timesteps": 1000, "shift": 3.0}

# transformer/config.json (SD3Transformer2DModel, MMDiT-X)
TRANSFORMER: dict[str, Any] = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 16,
    "num_layers": 24,
    "attention_head_dim": 64,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 1536,
    "pooled_projection_dim": 2048,
    "pos_embed_max_size": 384,
    "dual_attention_layers": [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12],
    "qk_norm": "rms_norm",
}

# vae/config.json (AutoencoderKL, 16 latent channels, factor 8)
VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 16,
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "act_fn": "silu",
    "sample_size": 1024,
    "scaling_factor": 1.5305,
    "shift_factor": 0.0609,
    "force_upcast": True,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "mid_block_add_attention": True,
}

PUBLISHED: dict[str, dict[str, Any]] = {
    "transformer": TRANSFORMER,
    "vae": VAE,
    "text_encoder": {"architectures": ["CLIPTextModelWithProjection"], **CLIP_L_TEXT},
    "text_encoder_2": {"architectures": ["CLIPTextModelWithProjection"], **OPENCLIP_BIGG_TEXT},
    "text_encoder_3": {"architectures": ["T5EncoderModel"], **T5_V1_1_XXL},
    "tokenizer": CLIP_L_TOKENIZER,
    "tokenizer_2": OPENCLIP_BIGG_TOKENIZER,
    "tokenizer_3": T5_TOKENIZER,
    "scheduler": SD35_SCHEDULER_CONFIG,
}
PUBLISHED_LAYERS = TRANSFORMER["num_layers"]


def pipeline_class() -> type:
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline


def build_components(
    *, layers: Optional[int] = None, device: torch.device, dtype: torch.dtype, seed: int = 0
) -> dict[str, Any]:
    """Every pipeline component at the published configuration (``layers`` truncates the transformer only)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    transformer_kwargs = {**TRANSFORMER, "num_layers": transformer_layers(layers, PUBLISHED_LAYERS)}
    clip_l = CLIPTextConfig(**config_kwargs(CLIP_L_TEXT), architectures=["CLIPTextModelWithProjection"])
    bigg = CLIPTextConfig(**config_kwargs(OPENCLIP_BIGG_TEXT), architectures=["CLIPTextModelWithProjection"])
    t5 = T5Config(**config_kwargs(T5_V1_1_XXL), architectures=["T5EncoderModel"])
    return {
        "transformer": build_module(lambda: SD3Transformer2DModel(**transformer_kwargs), seed, dtype, device),
        "vae": build_module(lambda: AutoencoderKL(**VAE), seed + 1, dtype, device),
        "text_encoder": build_module(lambda: CLIPTextModelWithProjection(clip_l), seed + 2, dtype, device),
        "text_encoder_2": build_module(lambda: CLIPTextModelWithProjection(bigg), seed + 3, dtype, device),
        "text_encoder_3": build_module(lambda: T5EncoderModel(t5), seed + 4, dtype, device),
        "tokenizer": clip_tokenizer(**CLIP_L_TOKENIZER),
        "tokenizer_2": clip_tokenizer(**OPENCLIP_BIGG_TOKENIZER),
        "tokenizer_3": t5_tokenizer(**T5_TOKENIZER),
        "scheduler": FlowMatchEulerDiscreteScheduler(**SD35_SCHEDULER_CONFIG),
    }
