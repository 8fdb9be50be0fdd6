"""The fingerprint of a LoRA adapter that both sides of a weight sync compute and compare."""

from __future__ import annotations

import hashlib

import torch


def tensors_checksum(tensors: dict[str, torch.Tensor]) -> str:
    """Order-independent sha256 over names, shapes and float32 values of LoRA tensors.

    The actor and every engine compute this over the same peft names, so a sync can be verified.
    """
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu", torch.float32).contiguous()
        digest.update(name.encode())
        digest.update(str(tuple(t.shape)).encode())
        digest.update(t.numpy().tobytes())
    return digest.hexdigest()
