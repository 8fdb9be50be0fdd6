"""Wan text-to-video (Wan-AI/Wan2.1-T2V-1.3B-Diffusers and Wan-AI/Wan2.1-T2V-14B-Diffusers; Wan2.2's
Wan-AI/Wan2.2-TI2V-5B-Diffusers and Wan-AI/Wan2.2-T2V-A14B-Diffusers, their figures in ``published_wan2_2.py``) at
their real size with random weights: the WanTransformer3DModel of the chosen variant (A14B: two experts,
``transformer`` and ``transformer_2``), the UMT5-XXL text encoder (google/umt5-xxl's encoder, vocabulary 256,384) with
a tokenizer of that size, the 3D causal VAE (Wan2.1's AutoencoderKLWan: 4x temporal, 8x spatial, 16 latent
channels; TI2V-5B's own: 16x spatial, 48 latent channels) and the published UniPC flow scheduler. Every variant shares
the text encoder."""

from __future__ import annotations

from typing import Any, Optional

import torch

from verl_omni.models.standins._common import build_module, t5_tokenizer, transformer_layers
from verl_omni.pipelines.wan import published_wan2_2 as wan2_2

REPOS = {"1.3B": "Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "14B": "Wan-AI/Wan2.1-T2V-14B-Diffusers", **wan2_2.REPOS}
VARIANTS = tuple(REPOS)
DEFAULT_VARIANT = "1.3B"

# transformer/config.json (WanTransformer3DModel) of each variant
_TRANSFORMER_COMMON: dict[str, Any] = {
    "patch_size": [1, 2, 2],
    "attention_head_dim": 128,
    "in_channels": 16,
    "out_channels": 16,
    "text_dim": 4096,
    "freq_dim": 256,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-06,
    "image_dim": None,
    "added_kv_proj_dim": None,
    "rope_max_seq_len": 1024,
}
TRANSFORMERS: dict[str, dict[str, Any]] = {
    "1.3B": {**_TRANSFORMER_COMMON, "num_attention_heads": 12, "ffn_dim": 8960, "num_layers": 30},
    "14B": {**_TRANSFORMER_COMMON, "num_attention_heads": 40, "ffn_dim": 13824, "num_layers": 40},
}
TRANSFORMERS["TI2V-5B"] = wan2_2.TI2V_5B_TRANSFORMER
TRANSFORMERS["T2V-A14B"] = TRANSFORMERS["14B"]  # each of its two experts

# text_encoder/config.json: google/umt5-xxl's encoder (UMT5EncoderModel; a relative-position bias in every layer)
UMT5_XXL: dict[str, Any] = {
    "model_type": "umt5",
    "architectures": ["UMT5EncoderModel"],
    "vocab_size": 256384,
    "d_model": 4096,
    "d_kv": 64,
    "d_ff": 10240,
    "num_layers": 24,
    "num_decoder_layers": 24,
    "num_heads": 64,
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "feed_forward_proj": "gated-gelu",
    "dense_act_fn": "gelu_new",
    "is_gated_act": True,
    "layer_norm_epsilon": 1e-06,
    "dropout_rate": 0.1,
    "initializer_factor": 1.0,
    "is_encoder_decoder": True,
    "tie_word_embeddings": False,
    "scalable_attention": True,
    "decoder_start_token_id": 0,
    "pad_token_id": 0,
    "eos_token_id": 1,
}
# google/umt5-xxl's SentencePiece model: 256,000 pieces plus 300 sentinels (<extra_id_0> at 256,299); the
# embedding table is padded to 256,384 rows.
UMT5_TOKENIZER: dict[str, Any] = {"piece_count": 256000, "extra_ids": 300, "model_max_length": 512}

# vae/config.json (AutoencoderKLWan); latents_mean / latents_std are the class defaults, as published
VAE: dict[str, Any] = {
    "base_dim": 96,
    "z_dim": 16,
    "dim_mult": [1, 2, 4, 4],
    "num_res_blocks": 2,
    "attn_scales": [],
    "temperal_downsample": [False, True, True],
    "dropout": 0.0,
    "latents_mean": [
        -0.7571,
        -0.7089,
        -0.9113,
        0.1075,
        -0.1745,
        0.9653,
        -0.1517,
        1.5508,
        0.4134,
        -0.0715,
        0.5517,
        -0.3632,
        -0.1922,
        -0.9497,
        0.2503,
        -0.2921,
    ],
    "latents_std": [
        2.8184,
        1.4541,
        2.3275,
        2.6558,
        1.2196,
        1.7708,
        2.6052,
        2.0743,
        3.2687,
        2.1526,
        2.8652,
        1.5579,
        1.6382,
        1.1253,
        2.8251,
        1.9160,
    ],
}

# scheduler/scheduler_config.json: UniPC over flow-matching sigmas with a static shift of 3
SCHEDULER: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "solver_order": 2,
    "prediction_type": "flow_prediction",
    "predict_x0": True,
    "solver_type": "bh2",
    "lower_order_final": True,
    "disable_corrector": [],
    "final_sigmas_type": "zero",
    "timestep_spacing": "linspace",
    "use_flow_sigmas": True,
    "flow_shift": 3.0,
}


def published(variant: str = DEFAULT_VARIANT) -> dict[str, dict[str, Any]]:
    """The published configs of ``variant`` (one of ``VARIANTS``), per component; Wan2.2's with ``pipeline``, what
    its model_index.json declares (``expand_timesteps`` / ``boundary_ratio``), and A14B's with ``transformer_2``."""
    check_variant(variant)
    configs = {
        "transformer": TRANSFORMERS[variant],
        "vae": wan2_2.TI2V_5B_VAE if variant == "TI2V-5B" else VAE,
        "text_encoder": UMT5_XXL,
        "tokenizer": UMT5_TOKENIZER,
        "scheduler": {**SCHEDULER, "flow_shift": wan2_2.FLOW_SHIFTS.get(variant, SCHEDULER["flow_shift"])},
    }
    if variant == "T2V-A14B":
        configs["transformer_2"] = TRANSFORMERS[variant]
    if variant in wan2_2.PIPELINE_CONFIGS:
        configs["pipeline"] = wan2_2.PIPELINE_CONFIGS[variant]
    return configs


def check_variant(variant: str) -> str:
    if variant not in REPOS:
        raise ValueError(f"Wan stand-in variant={variant!r} is not one of {list(VARIANTS)}")
    return variant


PUBLISHED = published(DEFAULT_VARIANT)
REPO = REPOS[DEFAULT_VARIANT]
PUBLISHED_LAYERS = TRANSFORMERS[DEFAULT_VARIANT]["num_layers"]


def pipeline_class() -> type:
    from diffusers import WanPipeline

    return WanPipeline


def accepted_by(cls: type, config: dict[str, Any]) -> dict[str, Any]:
    """The keys of ``config`` that ``cls.__init__`` takes (a published config.json may carry keys a later library
    version reads, e.g. TI2V-5B's VAE ``clip_output``)."""
    import inspect

    accepted = set(inspect.signature(cls.__init__).parameters)
    return {k: v for k, v in config.items() if k in accepted}


def umt5_config():
    """``UMT5Config`` of the published text encoder (keys the config class derives itself, such as
    ``dense_act_fn`` and ``is_gated_act`` from ``feed_forward_proj``, are left to it)."""
    from transformers import UMT5Config

    return UMT5Config(**accepted_by(UMT5Config, UMT5_XXL))


def build_components(
    *,
    layers: Optional[int] = None,
    device: torch.device,
    dtype: torch.dtype,
    seed: int = 0,
    variant: str = DEFAULT_VARIANT,
) -> dict[str, Any]:
    """Every pipeline component of ``variant`` at the published configuration (``layers`` truncates the
    transformers only), plus the pipeline's own settings of a Wan2.2 variant (``expand_timesteps`` /
    ``boundary_ratio``: ``WanPipeline`` keyword arguments, like the components)."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
    from transformers import UMT5EncoderModel

    configs = published(variant)
    transformer_kwargs = dict(configs["transformer"])
    transformer_kwargs["num_layers"] = transformer_layers(layers, transformer_kwargs["num_layers"])
    transformer_kwargs["patch_size"] = tuple(transformer_kwargs["patch_size"])
    text_config = umt5_config()
    components = {
        "transformer": build_module(lambda: WanTransformer3DModel(**transformer_kwargs), seed, dtype, device),
        "vae": build_module(
            lambda: AutoencoderKLWan(**accepted_by(AutoencoderKLWan, configs["vae"])), seed + 1, dtype, device
        ),
        "text_encoder": build_module(lambda: UMT5EncoderModel(text_config), seed + 2, dtype, device),
        "tokenizer": t5_tokenizer(**UMT5_TOKENIZER),
        "scheduler": UniPCMultistepScheduler(**configs["scheduler"]),
    }
    if "transformer_2" in configs:
        build = lambda: WanTransformer3DModel(**transformer_kwargs)  # noqa: E731
        components["transformer_2"] = build_module(build, seed + 3, dtype, device)
    return {**components, **configs.get("pipeline", {})}
