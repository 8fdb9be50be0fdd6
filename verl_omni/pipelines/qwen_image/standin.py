"""Qwen-Image's random-weight pipeline directories, built offline and deterministically from a seed.

- :func:`build_tiny_qwen_image`: a few MB, written in about a second (``tiny:qwen_image``, CPU tests).
- :func:`build_qwen_image`: the Qwen-Image layout at full transformer width with a chosen number of layers
  (``qwen_image_transformer_config(num_layers, full_width=True)``), initialised directly in bf16.

Tiny Qwen-Image: VAE factor 8 (as the real one; ``len(temperal_downsample) == 3``), z_dim 4, so the transformer
takes 16 packed channels; image sides must be multiples of 16.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from verl_omni.models.tiny import _byte_level_alphabet, _randomize_zero_params, _seeded_init
from verl_omni.pipelines.qwen_image.published import QWEN_IMAGE_SCHEDULER_CONFIG, qwen_image_transformer_config

__all__ = [
    "QWEN_IMAGE_NUM_LAYERS",
    "QWEN_IMAGE_SCHEDULER_CONFIG",
    "build_qwen_image",
    "build_tiny_qwen_image",
    "qwen_image_transformer_config",
]

QWEN_IMAGE_NUM_LAYERS = 60  # Qwen/Qwen-Image transformer/config.json num_layers
QWEN_IMAGE_TEMPLATE_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def build_qwen_image_tokenizer():
    """Qwen2Tokenizer over the 256 byte-level symbols (no merges) plus Qwen's chat special tokens."""
    from transformers import Qwen2Tokenizer

    vocab = {symbol: i for i, symbol in enumerate(_byte_level_alphabet())}
    for special in QWEN_IMAGE_TEMPLATE_SPECIAL_TOKENS:
        vocab[special] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[], model_max_length=32768)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    return tokenizer


def _qwen_text_encoder_config(vocab_size: int, tokenizer, full_width: bool):
    from transformers import Qwen2_5_VLConfig

    if full_width:  # Qwen2.5-VL-7B width (hidden 3584 = joint_attention_dim), fewer layers and a narrower MLP
        text = dict(
            hidden_size=3584,
            intermediate_size=4096,
            num_hidden_layers=2,
            num_attention_heads=28,
            num_key_value_heads=4,
            mrope_section=[16, 24, 24],
        )
    else:
        text = dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            mrope_section=[2, 3, 3],
        )  # head_dim 16: sections sum to 8
    mrope = text.pop("mrope_section")
    assert sum(mrope) * 2 == text["hidden_size"] // text["num_attention_heads"]
    return Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=vocab_size,
            max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "mrope_section": mrope, "rope_theta": 1000000.0},
            bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
            eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
            pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
            **text,
        ),
        # The pipeline never runs the vision tower; keep it minimal.
        vision_config=dict(
            depth=1,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=text["hidden_size"],
            fullatt_block_indexes=[0],
        ),
    )


def _qwen_vae_config(full_width: bool) -> dict[str, Any]:
    if full_width:  # the real AutoencoderKLQwenImage (diffusers defaults: base 96, z 16, factor 8)
        return {}
    return {
        "base_dim": 16,
        "z_dim": 4,
        "dim_mult": [1, 2, 2, 2],
        "num_res_blocks": 1,
        "attn_scales": [],
        "temperal_downsample": [False, True, True],  # 3 downsamples -> factor 8, as the real VAE
        "latents_mean": [0.1, -0.2, 0.05, 0.0],
        "latents_std": [1.5, 2.0, 1.2, 1.8],
    }


def build_qwen_image(
    path: str | os.PathLike,
    *,
    num_layers: int = 2,
    full_width: bool = False,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
    **transformer_overrides: Any,
) -> str:
    """Write a random-weight Qwen-Image pipeline directory; return its path.

    ``full_width=True`` gives the real transformer width, a 3584-wide 2-layer text encoder and the real-size VAE;
    modules are constructed directly in ``dtype`` (use bf16) so no float32 copy of the weights is materialised.
    ``device`` (default: the CPU) is where the modules are constructed and their random weights drawn. PyTorch's
    CPU random fills run on one thread, so a full-width build on the GPU takes seconds where the CPU takes
    minutes. ``device="cuda"`` gives other values than a CPU build, equally seeded.
    """
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )
    from transformers import Qwen2_5_VLForConditionalGeneration

    device = torch.device(device) if device is not None else None

    init_dtype = dtype if full_width else torch.float32  # tiny: init in fp32 so every dtype sees the same values
    tokenizer = build_qwen_image_tokenizer()
    transformer_kwargs = {**qwen_image_transformer_config(num_layers, full_width), **transformer_overrides}

    with _seeded_init(seed, init_dtype, device):
        transformer = QwenImageTransformer2DModel(**transformer_kwargs)
    with _seeded_init(seed + 1, init_dtype, device):
        vae = AutoencoderKLQwenImage(**_qwen_vae_config(full_width))
    with _seeded_init(seed + 2, init_dtype, device):
        text_encoder = Qwen2_5_VLForConditionalGeneration(
            _qwen_text_encoder_config(len(tokenizer), tokenizer, full_width)
        )
    if vae.config.z_dim * 4 != transformer.config.in_channels:
        raise ValueError(
            f"transformer in_channels={transformer.config.in_channels} must be 4 x VAE z_dim={vae.config.z_dim}"
        )
    for offset, module in enumerate((transformer, vae, text_encoder)):
        _randomize_zero_params(module, seed + 100 + offset)

    pipe = QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_SCHEDULER_CONFIG),
        vae=vae.to(dtype).eval(),
        text_encoder=text_encoder.to(dtype).eval(),
        tokenizer=tokenizer,
        transformer=transformer.to(dtype).eval(),
    )
    pipe.save_pretrained(str(path))
    return str(path)


def build_tiny_qwen_image(
    path: str | os.PathLike, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: Any
) -> str:
    """Tiny random Qwen-Image (2 transformer layers, 2 heads x 128; ~3 MB in float32). ``overrides`` go to the
    transformer config (e.g. ``num_layers=1``). Save in bf16 for vllm-omni (it rejects a float32 text encoder).

    Note: the stock ``QwenImagePipeline`` drops a hard-coded 34 template tokens; with this byte-level tokenizer
    the template prefix is longer. ``QwenImageRLPipeline`` computes the right value from its tokenizer.
    """
    num_layers = int(overrides.pop("num_layers", 2))
    return build_qwen_image(path, num_layers=num_layers, full_width=False, seed=seed, dtype=dtype, **overrides)
