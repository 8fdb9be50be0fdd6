"""Faithful stand-ins: random-weight pipelines whose every component has the real checkpoint's architecture,
size and dtype.

Real-size figures (throughput, memory, step time) need the real model's shapes, but not its weights. For each
family, a module here holds the real checkpoint's published configs as plain dicts (transformer, every text
encoder, tokenizer vocabulary sizes, VAE, scheduler; ``published_config``) and builds every component from them
with seeded random weights drawn on ``device`` (a GPU builds the largest in under a minute; PyTorch's CPU random
fills run on one thread). Tokenizers are built offline with the real vocabulary sizes and special-token ids
(byte-level, so a prompt's token count is not the real tokenizer's). The result is a diffusers pipeline directory
the family's ``from_pretrained`` loads, plus ``standin.json`` (family, depth, parameters and stored values per
component).

Families: ``qwen_image`` (Qwen/Qwen-Image), ``sd3`` (stabilityai/stable-diffusion-3.5-medium), ``flux``
(black-forest-labs/FLUX.1-dev), ``wan`` (Wan-AI/Wan2.1-T2V-1.3B-Diffusers, or its 14B sibling with
``variant="14B"``: a family module with several published checkpoints names them in ``REPOS``).
"""

from __future__ import annotations

import copy
import importlib
import os
from types import ModuleType
from typing import Any, Optional

import torch

from verl_omni.models.standins._common import (
    STANDIN_FILE,
    param_counts,
    read_standin_record,
    save_standin,
    stored_counts,
)

FAMILY_MODULES = {"qwen_image": "qwen_image", "sd3": "sd3_5_medium", "flux": "flux_1_dev", "wan": "wan2_1_t2v"}


def family_module(family: str) -> ModuleType:
    """The module of ``family``'s stand-in (its published configs and builder)."""
    if family not in FAMILY_MODULES:
        raise ValueError(f"unknown stand-in family {family!r}; allowed: {sorted(FAMILY_MODULES)}")
    return importlib.import_module(f"{__name__}.{FAMILY_MODULES[family]}")


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


__all__ = [
    "FAMILY_MODULES",
    "STANDIN_FILE",
    "build_components",
    "build_standin",
    "family_module",
    "param_counts",
    "published_config",
    "read_standin_record",
    "stored_counts",
]
