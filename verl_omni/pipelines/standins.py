"""Faithful stand-ins by family name: each registered family's ``published.py`` (its real checkpoint's published
configs and the builder of every component from them) found through the family registry, so that a family's
stand-in lives in its own package and nothing here names one.

A family's ``published.py`` defines ``REPO`` (or ``REPOS`` by variant, with ``check_variant`` and ``published``),
``PUBLISHED`` (component -> config dict), ``PUBLISHED_LAYERS`` (or ``TRANSFORMERS[variant]["num_layers"]``),
``pipeline_class()`` (the diffusers pipeline class it saves as) and ``build_components(layers=, device=, dtype=,
seed=[, variant=])``. The shared pieces (tokenizers, text encoders, the directory writer) are in
``verl_omni.models.standins``.
"""

from __future__ import annotations

import copy
import os
from types import ModuleType
from typing import Any, Optional

import torch

from verl_omni.models.standins import save_standin
from verl_omni.pipelines.registry import get_family


def family_module(family: str) -> ModuleType:
    """The ``published.py`` module of the registered family ``family`` (an unknown name lists the registered ones)."""
    return get_family(family, key="stand-in family").published()


def published_config(family: str, variant: Optional[str] = None) -> dict[str, dict[str, Any]]:
    """The real checkpoint's published configs of ``family`` (its ``variant``, where it has several), per component
    (a copy)."""
    module = family_module(family)
    return copy.deepcopy(module.PUBLISHED if variant is None else _variant_module(module, variant).published(variant))


def _variant_module(module: ModuleType, variant: str) -> ModuleType:
    if not hasattr(module, "REPOS"):
        raise ValueError(
            f"{module.__name__} has one published checkpoint ({module.REPO}); variant={variant!r} is not one of its"
        )
    module.check_variant(variant)
    return module


def _variant_kwargs(module: ModuleType, variant: Optional[str]) -> dict[str, str]:
    return {} if variant is None else {"variant": _variant_module(module, variant).check_variant(variant)}


def build_components(
    family: str,
    *,
    layers: Optional[int] = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    variant: Optional[str] = None,
) -> dict[str, Any]:
    """``family``'s pipeline components (models, tokenizers, scheduler), models constructed in ``dtype`` on
    ``device``. ``device="meta"`` allocates nothing: shapes, configs and parameter counts only. ``variant``: which
    published checkpoint, for a family with several (Wan2.1: "1.3B", "14B"); None: its default."""
    module = family_module(family)
    return module.build_components(
        layers=layers, device=torch.device(device), dtype=dtype, seed=seed, **_variant_kwargs(module, variant)
    )


def build_standin(
    family: str,
    path: str | os.PathLike,
    *,
    layers: Optional[int] = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    variant: Optional[str] = None,
) -> str:
    """Write ``family``'s real-size random-weight pipeline directory to ``path``; return the path.

    ``layers`` truncates the transformer's depth only (for quick runs; recorded in ``standin.json``). Weights are
    drawn on ``device`` (use "cuda" on a GPU machine) in ``dtype`` and saved so; the same seed and device give the
    same weights. ``device="meta"`` writes configs, tokenizers and the scheduler but no weights. ``variant``: as
    in :func:`build_components`."""
    module = family_module(family)
    components = build_components(family, layers=layers, device=device, dtype=dtype, seed=seed, variant=variant)
    checkpoint = module.REPO if variant is None else module.REPOS[variant]
    record = {
        "family": family,
        "checkpoint": checkpoint,
        "layers": components["transformer"].config.num_layers,
        "published_layers": module.PUBLISHED_LAYERS if variant is None else module.TRANSFORMERS[variant]["num_layers"],
        "dtype": str(dtype).removeprefix("torch."),
        "seed": seed,
        "device": str(torch.device(device)),
    }
    return save_standin(path, module.pipeline_class(), components, record)


__all__ = ["build_components", "build_standin", "family_module", "published_config"]
