"""The FLUX.1-dev family: ``actor_rollout_ref.model.pipeline=flux``, served for ``FluxPipeline`` directories.

Cheap to import: the diffusers pipeline class loads only when ``pipeline_class()`` is called.
"""

from __future__ import annotations

import os

import torch

from verl_omni.pipelines.registry import ModelFamily, register_family


@register_family
class FluxFamily(ModelFamily):
    name = "flux"
    diffusers_class_names = ("FluxPipeline",)
    options_class = None  # its engine attention has no switches (pipelines/flux/attention.py)

    @staticmethod
    def pipeline_class() -> type:
        from verl_omni.pipelines.flux.pipeline import FluxRLPipeline

        return FluxRLPipeline

    @staticmethod
    def build_tiny(path: str | os.PathLike, seed: int = 0, dtype: torch.dtype = torch.float32) -> str:
        from verl_omni.pipelines.flux.standin import build_tiny_flux

        return build_tiny_flux(path, seed=seed, dtype=dtype)

    @staticmethod
    def build_standin(path: str | os.PathLike, *, layers=None, device="cpu", dtype=torch.bfloat16) -> str:
        """The real-size random FLUX.1-dev (``standin.PUBLISHED_CONFIG``) is not built yet: refused, naming it."""
        raise NotImplementedError(
            "no real-size FLUX.1-dev stand-in yet (its published sizes: "
            "verl_omni.pipelines.flux.standin.PUBLISHED_CONFIG); use a FLUX.1-dev checkpoint directory"
        )


__all__ = ["FluxFamily"]
