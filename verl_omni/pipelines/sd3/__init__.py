"""Stable Diffusion 3 / 3.5 (``StableDiffusion3Pipeline``): the registered family. ``pipeline.py`` holds the RL
pipeline, ``standin.py`` its tiny random-weight builder, ``published.py`` SD3.5 Medium's published configs (its
real-size stand-in). It has no options of its own."""

from __future__ import annotations

import os
from typing import Any, Optional

from verl_omni.pipelines.registry import ModelFamily, register_family


@register_family
class SD3Family(ModelFamily):
    name = "sd3"
    diffusers_class_names = ("StableDiffusion3Pipeline",)
    options_class = None

    @staticmethod
    def pipeline_class() -> type:
        from verl_omni.pipelines.sd3.pipeline import SD3RLPipeline

        return SD3RLPipeline

    @staticmethod
    def build_tiny(path: str | os.PathLike, seed: int = 0, dtype: Any = None) -> str:
        import torch

        from verl_omni.pipelines.sd3.standin import build_tiny_sd3

        return build_tiny_sd3(path, seed=seed, dtype=dtype or torch.float32)

    @staticmethod
    def build_standin(
        path: str | os.PathLike, *, layers: Optional[int] = None, device: str = "cpu", dtype: Any = None
    ) -> str:
        """stabilityai/stable-diffusion-3.5-medium at its real size with random weights (every component; 24
        transformer layers unless ``layers``)."""
        import torch

        from verl_omni.pipelines.standins import build_standin

        return build_standin("sd3", path, layers=layers, device=device, dtype=dtype or torch.bfloat16)
