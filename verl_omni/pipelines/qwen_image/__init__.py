"""Qwen-Image (``QwenImagePipeline``): the registered family. ``pipeline.py`` holds the RL pipeline, ``options.py``
its speed options (``actor_rollout_ref.model.qwen_image.*``), ``standin.py`` its random-weight builders,
``published.py`` Qwen-Image's published configs (its real-size stand-in)."""

from __future__ import annotations

import os
from typing import Any, Optional

from verl_omni.pipelines.qwen_image.options import QwenImageOptions
from verl_omni.pipelines.registry import ModelFamily, register_family


@register_family
class QwenImageFamily(ModelFamily):
    name = "qwen_image"
    diffusers_class_names = ("QwenImagePipeline",)
    options_class = QwenImageOptions

    @staticmethod
    def pipeline_class() -> type:
        from verl_omni.pipelines.qwen_image.pipeline import QwenImageRLPipeline

        return QwenImageRLPipeline

    @staticmethod
    def build_tiny(path: str | os.PathLike, seed: int = 0, dtype: Any = None) -> str:
        import torch

        from verl_omni.pipelines.qwen_image.standin import build_tiny_qwen_image

        return build_tiny_qwen_image(path, seed=seed, dtype=dtype or torch.float32)

    @staticmethod
    def build_standin(
        path: str | os.PathLike, *, layers: Optional[int] = None, device: str = "cpu", dtype: Any = None
    ) -> str:
        """Qwen/Qwen-Image at its real size with random weights: every component (the 60-layer transformer, or
        ``layers``; the Qwen2.5-VL-7B text encoder with its vision tower and vocabulary; the VAE)."""
        import torch

        from verl_omni.pipelines.standins import build_standin

        return build_standin("qwen_image", path, layers=layers, device=device, dtype=dtype or torch.bfloat16)
