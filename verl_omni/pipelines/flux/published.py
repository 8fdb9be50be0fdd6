"""FLUX.1-dev (black-forest-labs/FLUX.1-dev) at its real size with random weights: the transformer of 19 double-
and 38 single-stream blocks with guidance embeddings, the CLIP-L text tower and the T5-XXL v1.1 encoder with
their tokenizers at the real vocabulary sizes, the 16-channel VAE and the published scheduler."""

from __future__ import annotations

from typing import Any, Optional

import torch

from verl_omni.models.standins._common import build_module, clip_tokenizer, t5_tokenizer, transformer_layers
from verl_omni.models.standins._text_encoders import (
    CLIP_L_TEXT,
    CLIP_L_TOKENIZER,
    T5_TOKENIZER,
    T5_V1_1_XXL,
    config_kwargs,
)

REPO = "black-forest-labs/FLUX.1-dev"

# transformer/config.json (FluxTransformer2DModel)
TRANSFORMER: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": True,
    "axes_dims_rope": [16, 56, 56],
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
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "force_upcast": True,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "mid_block_add_attention": True,
}

# scheduler/scheduler_config.json: resolution-dependent shift
SCHEDULER: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}

PUBLISHED: dict[str, dict[str, Any]] = {
    "transformer": TRANSFORMER,
    "vae": VAE,
    "text_encoder": {"architectures": ["CLIPTextModel"], **CLIP_L_TEXT},
    "text_encoder_2": {"architectures": ["T5EncoderModel"], **T5_V1_1_XXL},
    "tokenizer": CLIP_L_TOKENIZER,
    "tokenizer_2": T5_TOKENIZER,
    "scheduler": SCHEDULER,
}
PUBLISHED_LAYERS = TRANSFORMER["num_layers"]


def depth(layers: Optional[int]) -> dict[str, int]:
    """``layers`` double-stream blocks and twice as many single-stream ones (the published 19 : 38)."""
    double = transformer_layers(layers, PUBLISHED_LAYERS)
    return {"num_layers": double, "num_single_layers": 2 * double}


def pipeline_class() -> type:
    from diffusers import FluxPipeline

    return FluxPipeline


def build_components(
    *, layers: Optional[int] = None, device: torch.device, dtype: torch.dtype, seed: int = 0
) -> dict[str, Any]:
    """Every pipeline component at the published configuration (``layers`` truncates the transformer only)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    transformer_kwargs = {**TRANSFORMER, **depth(layers)}
    clip_l = CLIPTextConfig(**config_kwargs(CLIP_L_TEXT), architectures=["CLIPTextModel"])
    t5 = T5Config(**config_kwargs(T5_V1_1_XXL), architectures=["T5EncoderModel"])
    return {
        "transformer": build_module(lambda: FluxTransformer2DModel(**transformer_kwargs), seed, dtype, device),
        "vae": build_module(lambda: AutoencoderKL(**VAE), seed + 1, dtype, device),
        "text_encoder": build_module(lambda: CLIPTextModel(clip_l), seed + 2, dtype, device),
        "text_encoder_2": build_module(lambda: T5EncoderModel(t5), seed + 3, dtype, device),
        "tokenizer": clip_tokenizer(**CLIP_L_TOKENIZER),
        "tokenizer_2": t5_tokenizer(**T5_TOKENIZER),
        "scheduler": FlowMatchEulerDiscreteScheduler(**SCHEDULER),
    }
