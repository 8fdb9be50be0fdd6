"""A safetensors weights file written by the process that holds the weights, and read back by name and shape.

Full fine-tuning's checkpoint writes the transformer's weights from rank 0 straight into the checkpoint directory
(gigabytes that must not travel through the driver): the writer returns the file's sha256 and size, which the
driver records; :func:`safetensors_shapes` reads only the file's header (no tensor data) for the resume's check.
"""

from __future__ import annotations

import hashlib

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes


def write_safetensors_file(path: str, tensors: dict[str, torch.Tensor]) -> tuple[str, int]:
    """Write ``tensors`` to ``path`` in safetensors' format; (sha256 hex digest, size in bytes) of what was written.

    Through Python's open(): a full disk raises OSError(ENOSPC), where the library's own writer reports it
    without an errno."""
    data = safetensors_bytes({k: v.contiguous() for k, v in tensors.items()})
    with open(path, "wb") as f:
        f.write(data)
    return hashlib.sha256(data).hexdigest(), len(data)


def safetensors_shapes(path: str) -> dict[str, tuple[int, ...]]:
    """Each tensor's shape by name, from the file's header alone (no tensor data is read)."""
    with safe_open(path, "pt") as f:
        return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
