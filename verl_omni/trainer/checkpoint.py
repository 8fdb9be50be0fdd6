"""Atomic checkpoints of the LoRA actor, in verl's layout.

``<dir>/global_step_<k>/`` holds ``lora.safetensors`` (adapter), ``optim.pt`` (optimizer + RNG) and
``meta.json``; ``<dir>/latest_checkpointed_iteration.txt`` names the newest complete one. Each is written to
a temporary name and renamed, so a run killed mid-write never leaves a checkpoint that resume would pick.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from typing import Any, Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_file

LATEST = "latest_checkpointed_iteration.txt"


def save_checkpoint(root: str, step: int, lora: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
                    meta: Optional[dict[str, Any]] = None) -> str:
    os.makedirs(root, exist_ok=True)
    final = os.path.join(root, f"global_step_{step}")
    tmp = tempfile.mkdtemp(prefix=f".global_step_{step}.", dir=root)
    try:
        save_file({k: v.contiguous() for k, v in lora.items()}, os.path.join(tmp, "lora.safetensors"))
        torch.save({
            "optimizer": optimizer.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "numpy_rng": np.random.get_state(),
            "python_rng": random.getstate(),
        }, os.path.join(tmp, "optim.pt"))
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump({"global_step": step, **(meta or {})}, f, indent=2, default=str)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # no half-written temp dir left behind
        raise
    _atomic_write(os.path.join(root, LATEST), str(step))
    return final


def find_latest_checkpoint(root: str) -> Optional[str]:
    """The newest complete checkpoint directory, or None. Half-written (temporary) ones are ignored."""
    marker = os.path.join(root, LATEST)
    if not os.path.exists(marker):
        return None
    with open(marker) as f:
        step = int(f.read().strip())
    path = os.path.join(root, f"global_step_{step}")
    required = ("lora.safetensors", "optim.pt", "meta.json")
    if not all(os.path.exists(os.path.join(path, name)) for name in required):
        raise FileNotFoundError(f"{marker} names step {step} but {path} is incomplete")
    return path


def load_checkpoint(path: str, optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    lora = load_file(os.path.join(path, "lora.safetensors"))
    state = torch.load(os.path.join(path, "optim.pt"), weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng"])
    np.random.set_state(state["numpy_rng"])
    random.setstate(state["python_rng"])
    with open(os.path.join(path, "meta.json")) as f:
        meta = json.load(f)
    return lora, meta


def _atomic_write(path: str, text: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
