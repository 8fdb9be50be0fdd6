"""Wan2.2's published figures (Wan-AI/Wan2.2-TI2V-5B-Diffusers and Wan-AI/Wan2.2-T2V-A14B-Diffusers): what differs
from Wan2.1's (``published.py``, which builds both generations' stand-ins).

- TI2V-5B: one 30-block, 3072-wide transformer over 48 latent channels; its own VAE (``AutoencoderKLWan`` with
  ``is_residual``: 12 patchified pixel channels in and out, z_dim 48, 4x temporal and 16x spatial compression, 160 /
  256 channels wide in the encoder / decoder); ``expand_timesteps`` (the transformer takes one timestep per video
  token); UniPC over flow sigmas with shift 5.
- T2V-A14B: two Wan2.1-14B-shaped experts, ``transformer`` for timesteps >= ``boundary_ratio`` x 1000 (high noise)
  and ``transformer_2`` below, boundary_ratio 0.875; Wan2.1's VAE; UniPC over flow sigmas with shift 3.

Source: diffusers' ``scripts/convert_wan_to_diffusers.py`` (the conversion that wrote the published -Diffusers
repositories: ``get_transformer_config`` for "Wan2.2-TI2V-5B" / "Wan2.2-T2V-A14B", ``vae22_diffusers_config``, the
flow shifts and the pipelines' ``expand_timesteps`` / ``boundary_ratio``).
"""

from __future__ import annotations

from typing import Any

REPOS = {"TI2V-5B": "Wan-AI/Wan2.2-TI2V-5B-Diffusers", "T2V-A14B": "Wan-AI/Wan2.2-T2V-A14B-Diffusers"}

# transformer/config.json of TI2V-5B (WanTransformer3DModel)
TI2V_5B_TRANSFORMER: dict[str, Any] = {
    "patch_size": [1, 2, 2],
    "num_attention_heads": 24,
    "attention_head_dim": 128,
    "in_channels": 48,
    "out_channels": 48,
    "text_dim": 4096,
    "freq_dim": 256,
    "ffn_dim": 14336,
    "num_layers": 30,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-06,
    "image_dim": None,
    "added_kv_proj_dim": None,
    "rope_max_seq_len": 1024,
}

# vae/config.json of TI2V-5B (AutoencoderKLWan, the Wan2.2 VAE)
TI2V_5B_VAE: dict[str, Any] = {
    "base_dim": 160,
    "decoder_base_dim": 256,
    "z_dim": 48,
    "dim_mult": [1, 2, 4, 4],
    "num_res_blocks": 2,
    "attn_scales": [],
    "temperal_downsample": [False, True, True],
    "dropout": 0.0,
    "is_residual": True,
    "in_channels": 12,
    "out_channels": 12,
    "patch_size": 2,
    "scale_factor_temporal": 4,
    "scale_factor_spatial": 16,
    "clip_output": False,
    # fmt: off
    "latents_mean": [
        -0.2289,
        -0.0052,
        -0.1323,
        -0.2339,
        -0.2799,
        0.0174,
        0.1838,
        0.1557,
        -0.1382,
        0.0542,
        0.2813,
        0.0891,
        0.1570,
        -0.0098,
        0.0375,
        -0.1825,
        -0.2246,
        -0.1207,
        -0.0698,
        0.5109,
        0.2665,
        -0.2108,
        -0.2158,
        0.2502,
        -0.2055,
        -0.0322,
        0.1109,
        0.1567,
        -0.0729,
        0.0899,
        -0.2799,
        -0.1230,
        -0.0313,
        -0.1649,
        0.0117,
        0.0723,
        -0.2839,
        -0.2083,
        -0.0520,
        0.3748,
        0.0152,
        0.1957,
        0.1433,
        -0.2944,
        0.3573,
        -0.0548,
        -0.1681,
        -0.0667,
    ],
    "latents_std": [
        0.4765,
        1.0364,
        0.4514,
        1.1677,
        0.5313,
        0.4990,
        0.4818,
        0.5013,
        0.8158,
        1.0344,
        0.5894,
        1.0901,
        0.6885,
        0.6165,
        0.8454,
        0.4978,
        0.5759,
        0.3523,
        0.7135,
        0.6804,
        0.5833,
        1.4146,
        0.8986,
        0.5659,
        0.7069,
        0.5338,
        0.4889,
        0.4917,
        0.4069,
        0.4999,
        0.6866,
        0.4093,
        0.5709,
        0.6065,
        0.6415,
        0.4944,
        0.5726,
        1.2042,
        0.5458,
        1.6887,
        0.3971,
        1.0600,
        0.3943,
        0.5537,
        0.5444,
        0.4089,
        0.7468,
        0.7744,
    ],
    # fmt: on
}

# scheduler/scheduler_config.json: the flow shift of each (UniPC over flow sigmas otherwise as Wan2.1's)
FLOW_SHIFTS = {"TI2V-5B": 5.0, "T2V-A14B": 3.0}

# model_index.json: what the WanPipeline of each declares beyond its components
PIPELINE_CONFIGS: dict[str, dict[str, Any]] = {
    "TI2V-5B": {"expand_timesteps": True},
    "T2V-A14B": {"boundary_ratio": 0.875},
}
