"""FLUX.1-dev (``FluxPipeline``): the registered family. ``pipeline.py`` holds the RL pipeline (``FluxRLPipeline``,
the diffusers ``FluxPipeline`` with the RL hooks), ``attention.py`` the processor that serves an engine's fused
attention kernel, ``standin.py`` the tiny random pipeline, ``published.py`` FLUX.1-dev's published configs (its
real-size stand-in), ``options.py`` its options (``actor_rollout_ref.model.flux.*``: the distilled guidance).

Cheap to import: the diffusers pipeline class loads only when ``pipeline_class()`` is called.
"""

from __future__ import annotations

import os
from typing import Any, Optional

from verl_omni.pipelines.flux.options import FluxOptions
from verl_omni.pipelines.registry import ModelFamily, register_family


@register_family
class FluxFamily(ModelFamily):
    name = "flux"
    diffusers_class_names = ("FluxPipeline",)
    options_class = FluxOptions

    @staticmethod
    def pipeline_class() -> type:
        from verl_omni.pipelines.flux.pipeline import FluxRLPipeline

        return FluxRLPipeline

    @staticmethod
    def build_tiny(path: str | os.PathLike, seed: int = 0, dtype: Any = None) -> str:
        import torch

        from verl_omni.pipelines.flux.standin import build_tiny_flux

        return build_tiny_flux(path, seed=seed, dtype=dtype or torch.float32)

    @staticmethod
    def build_standin(
        path: str | os.PathLike, *, layers: Optional[int] = None, device: str = "cpu", dtype: Any = None
    ) -> str:
        """black-forest-labs/FLUX.1-dev at its real size with random weights (every component; 19 double-stream
        and 38 single-stream blocks, or ``layers`` and twice as many)."""
        import torch

        from verl_omni.pipelines.standins import build_standin

        return build_standin("flux", path, layers=layers, device=device, dtype=dtype or torch.bfloat16)


__all__ = ["FluxFamily"]
