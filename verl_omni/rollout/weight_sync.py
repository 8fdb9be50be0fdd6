"""The actor's LoRA into every engine, verified once: cast to what the engines serve, fan out, compare checksums.

The engines serve the adapter in the rollout dtype (bf16 on GPU) while the actor keeps float32 master weights,
so the tensors are cast before sending and the expected checksum is computed over exactly what is sent; every
replica returns the checksum of the adapter it now serves. One mismatch stops the run: training on samples from
an adapter other than the actor's would be silently wrong.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from verl_omni.core.checksum import tensors_checksum
from verl_omni.core.dtypes import resolve_dtype
from verl_omni.rollout.server_manager import DiffusionServerManager


class LoRASyncError(RuntimeError):
    """A replica serves an adapter other than the actor's."""


def check_ranks_agree(matches_rank0: Sequence[bool]) -> None:
    """The hybrid engine's replicas each serve the adapter their own rank trained: all must hold rank 0's."""
    bad = [i for i, same in enumerate(matches_rank0) if not same]
    if bad:
        raise LoRASyncError(
            f"LoRA sync failed: replicas {bad} serve an adapter that differs from replica 0's (every hybrid-engine "
            "rank takes the same all-reduced optimizer step, so their adapters must be bitwise equal)"
        )


def check_checksums(expected: str, served: Sequence[str]) -> None:
    bad = [i for i, checksum in enumerate(served) if checksum != expected]
    if bad:
        raise LoRASyncError(f"LoRA sync failed: replicas {bad} report a checksum different from the actor's")


async def push_lora(servers: DiffusionServerManager, tensors: dict[str, torch.Tensor], dtype: str) -> str:
    """Send ``tensors`` (cast to ``dtype``) to every replica; returns the verified checksum."""
    sent = {name: t.detach().to("cpu", resolve_dtype(dtype)).contiguous() for name, t in tensors.items()}
    expected = tensors_checksum(sent)
    check_checksums(expected, await servers.update_lora(sent))
    return expected
