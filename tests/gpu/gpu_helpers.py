"""Helpers shared by the GPU tests (imported as ``gpu_helpers``: pytest puts tests/gpu on sys.path)."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


HAS_CUDA = _cuda_available()
HAS_VLLM_OMNI = importlib.util.find_spec("vllm_omni") is not None

requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
requires_vllm_omni = pytest.mark.skipif(
    not (HAS_CUDA and HAS_VLLM_OMNI), reason="needs a CUDA GPU and vllm-omni (scripts/device/)"
)


def gpu_out_path(name: str) -> str | None:
    """Where a test may write figures (set by scripts/device/run_gpu.sh); None when unset."""
    root = os.environ.get("VERL_OMNI_GPU_OUT")
    return os.path.join(root, name) if root else None


def write_figures(name: str, figures: dict) -> None:
    print(f"\n[figures] {name}: {json.dumps(figures, indent=1, sort_keys=True)}")
    path = gpu_out_path(name)
    if path:
        with open(path, "w") as f:
            json.dump(figures, f, indent=1, sort_keys=True)
