"""Wan text-to-video (``WanPipeline``: Wan2.1, Wan2.2-TI2V-5B, the two-expert Wan2.2-T2V-A14B): the registered
family. ``pipeline.py`` holds the RL pipeline (``WanRLPipeline``, the diffusers ``WanPipeline`` with the RL hooks over
video latents), ``attention.py`` the processor that serves an engine's fused attention kernel, ``standin.py`` the tiny
random pipelines (``tiny:wan``, ``tiny:wan2_2_ti2v``, ``tiny:wan2_2_t2v``); ``published.py`` and
``published_wan2_2.py`` the published configs of its real-size stand-ins (Wan2.1-T2V-1.3B, -14B, Wan2.2-TI2V-5B,
-T2V-A14B), ``options.py`` its options
(``actor_rollout_ref.model.wan.*``: frames per clip, the clips' frame rate, the low-noise expert's CFG scale).

Cheap to import: the diffusers pipeline class loads only when ``pipeline_class()`` is called.
"""

from __future__ import annotations

import os
from typing import Any, Optional

from verl_omni.pipelines.registry import ModelFamily, register_family
from verl_omni.pipelines.wan.options import WanOptions


@register_family
class WanFamily(ModelFamily):
    name = "wan"
    diffusers_class_names = ("WanPipeline",)
    options_class = WanOptions
    # tiny:wan is Wan2.1's; these are shaped after Wan2.2's published variants (``standin.py``)
    tiny_variants = {"wan2_2_ti2v": "TI2V-5B", "wan2_2_t2v": "T2V-A14B"}

    @staticmethod
    def pipeline_class() -> type:
        from verl_omni.pipelines.wan.pipeline import WanRLPipeline

        return WanRLPipeline

    @staticmethod
    def build_tiny(path: str | os.PathLike, seed: int = 0, dtype: Any = None, variant: Optional[str] = None) -> str:
        import torch

        from verl_omni.pipelines.wan.standin import build_tiny_wan

        return build_tiny_wan(path, seed=seed, dtype=dtype or torch.float32, variant=variant)

    @staticmethod
    def build_standin(
        path: str | os.PathLike,
        *,
        layers: Optional[int] = None,
        device: str = "cpu",
        dtype: Any = None,
        variant: str = "1.3B",
    ) -> str:
        """Wan-AI/Wan2.1-T2V-1.3B-Diffusers (``variant="1.3B"``: 30 blocks, 1536 wide), -14B (``"14B"``: 40 blocks,
        5120 wide), Wan-AI/Wan2.2-TI2V-5B-Diffusers (``"TI2V-5B"``: 30 blocks, 3072 wide, the Wan2.2 VAE) or
        Wan-AI/Wan2.2-T2V-A14B-Diffusers (``"T2V-A14B"``: two 14B experts) at the real size with random weights:
        every component, the UMT5-XXL encoder included (or ``layers`` transformer blocks)."""
        import torch

        from verl_omni.pipelines.standins import build_standin

        return build_standin("wan", path, layers=layers, device=device, dtype=dtype or torch.bfloat16, variant=variant)


__all__ = ["WanFamily"]
