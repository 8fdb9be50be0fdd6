"""Qwen-Image (Qwen/Qwen-Image) at its real size with random weights: the 60-layer MMDiT transformer, the
Qwen2.5-VL-7B text encoder (28 layers, vision tower included) with a byte-level tokenizer of the real
vocabulary, the real-size VAE and the published scheduler."""

from __future__ import annotations

from typing import Any, Optional

import torch

from verl_omni.models.standins._common import build_module, qwen2_tokenizer, transformer_layers

REPO = "Qwen/Qwen-Image"

# Qwen/Qwen-Image scheduler/scheduler_config.json: dynamic (resolution-dependent) shifting ending at 0.02.
QWEN_IMAGE_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 0.9,
    "base_image_seq_len": 256,
    "max_image_seq_len": 8192,
    "shift_terminal": 0.02,
    "time_shift_type": "exponential",
    "invert_sigmas": False,
    "stochastic_sampling": False,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
}


def qwen_image_transformer_config(num_layers: int, full_width: bool) -> dict[str, Any]:
    """QwenImageTransformer2DModel kwargs: real Qwen-Image sizes when ``full_width`` (24 heads x 128 = 3072 wide,
    joint_attention_dim 3584, 64 in / 16 out channels; the real model has 60 layers), else the tiny CPU sizes.

    ``attention_head_dim`` stays 128 with rope axes (16, 56, 56) in both cases (FA3 needs head_dim >= 64).
    """
    if num_layers < 1:
        raise ValueError(f"num_layers={num_layers} must be >= 1")
    common = {"patch_size": 2, "attention_head_dim": 128, "axes_dims_rope": (16, 56, 56), "guidance_embeds": False}
    if full_width:
        return {
            **common,
            "num_layers": num_layers,
            "num_attention_heads": 24,
            "joint_attention_dim": 3584,
            "in_channels": 64,
            "out_channels": 16,
        }
    return {
        **common,
        "num_layers": num_layers,
        "num_attention_heads": 2,
        "joint_attention_dim": 64,
        "in_channels": 16,
        "out_channels": 4,
    }


# Qwen/Qwen-Image transformer/config.json
TRANSFORMER: dict[str, Any] = {
    "patch_size": 2,
    "in_channels": 64,
    "out_channels": 16,
    "num_layers": 60,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 3584,
    "guidance_embeds": False,
    "axes_dims_rope": [16, 56, 56],
}

# Qwen/Qwen-Image vae/config.json (AutoencoderKLQwenImage)
VAE: dict[str, Any] = {
    "base_dim": 96,
    "z_dim": 16,
    "dim_mult": [1, 2, 4, 4],
    "num_res_blocks": 2,
    "attn_scales": [],
    "temperal_downsample": [False, True, True],
    "dropout": 0.0,
    "latents_mean": [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508]
    + [0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921],
    "latents_std": [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743]
    + [3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.916],
}

# Qwen/Qwen-Image text_encoder/config.json (Qwen2.5-VL-7B-Instruct's), in its published flat layout
TEXT_ENCODER: dict[str, Any] = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"],
    "model_type": "qwen2_5_vl",
    "vocab_size": 152064,
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "hidden_act": "silu",
    "max_position_embeddings": 128000,
    "max_window_layers": 28,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "rope_scaling": {"mrope_section": [16, 24, 24], "rope_type": "default", "type": "default"},
    "attention_dropout": 0.0,
    "initializer_range": 0.02,
    "sliding_window": 32768,
    "use_sliding_window": False,
    "tie_word_embeddings": False,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "vision_token_id": 151654,
    "image_token_id": 151655,
    "video_token_id": 151656,
    "vision_config": {
        "depth": 32,
        "hidden_size": 1280,
        "intermediate_size": 3420,
        "num_heads": 16,
        "hidden_act": "silu",
        "in_channels": 3,
        "out_hidden_size": 3584,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "tokens_per_second": 2,
        "window_size": 112,
        "fullatt_block_indexes": [7, 15, 23, 31],
        "initializer_range": 0.02,
    },
}

# Qwen/Qwen-Image tokenizer: 151,643 byte-level BPE entries, then 22 special tokens (ids 151643..151664).
TOKENIZER: dict[str, Any] = {
    "regular_vocab_size": 151643,
    "added_tokens": [
        "<|endoftext|>",
        "<|im_start|>",
        "<|im_end|>",
        "<|object_ref_start|>",
        "<|object_ref_end|>",
        "<|box_start|>",
        "<|box_end|>",
        "<|quad_start|>",
        "<|quad_end|>",
        "<|vision_start|>",
        "<|vision_end|>",
        "<|vision_pad|>",
        "<|image_pad|>",
        "<|video_pad|>",
        "<tool_call>",
        "</tool_call>",
        "<|fim_prefix|>",
        "<|fim_middle|>",
        "<|fim_suffix|>",
        "<|fim_pad|>",
        "<|repo_name|>",
        "<|file_sep|>",
    ],
    "model_max_length": 131072,
}

PUBLISHED: dict[str, dict[str, Any]] = {
    "transformer": TRANSFORMER,
    "vae": VAE,
    "text_encoder": TEXT_ENCODER,
    "tokenizer": TOKENIZER,
    "scheduler": QWEN_IMAGE_SCHEDULER_CONFIG,
}
PUBLISHED_LAYERS = TRANSFORMER["num_layers"]


def pipeline_class() -> type:
    from diffusers import QwenImagePipeline

    return QwenImagePipeline


def build_components(
    *, layers: Optional[int] = None, device: torch.device, dtype: torch.dtype, seed: int = 0
) -> dict[str, Any]:
    """Every pipeline component at the published configuration (``layers`` truncates the transformer only).

    The transformer comes from ``qwen_image_transformer_config(..., full_width=True)``: the configuration every
    real-size benchmark model has had, equal to the published one."""
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    transformer_kwargs = qwen_image_transformer_config(transformer_layers(layers, PUBLISHED_LAYERS), full_width=True)
    text_config = Qwen2_5_VLConfig(**{k: v for k, v in TEXT_ENCODER.items() if k != "architectures"})
    text_config.architectures = list(TEXT_ENCODER["architectures"])
    return {
        "transformer": build_module(lambda: QwenImageTransformer2DModel(**transformer_kwargs), seed, dtype, device),
        "vae": build_module(lambda: AutoencoderKLQwenImage(**VAE), seed + 1, dtype, device),
        "text_encoder": build_module(lambda: Qwen2_5_VLForConditionalGeneration(text_config), seed + 2, dtype, device),
        "tokenizer": qwen2_tokenizer(**TOKENIZER),
        "scheduler": FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_SCHEDULER_CONFIG),
    }
