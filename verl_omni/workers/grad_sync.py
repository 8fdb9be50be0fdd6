"""Data parallel over the LoRA only: one all-reduce of the flattened LoRA gradients per optimizer step.

The ranks live in processes that may already own a ``torch.distributed`` default group (vllm-omni's worker
initialises its own, of world size 1), so this group is built directly from a store, without touching the
default one: ``ProcessGroupNCCL`` for CUDA tensors, ``ProcessGroupGloo`` on CPU. Rank 0 hosts the TCP store.
"""

from __future__ import annotations

import datetime
import logging
from typing import Optional

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

TIMEOUT = datetime.timedelta(minutes=30)  # a rank may wait for the slowest one's whole update


class LoRAGradSync:
    """Sum tensors over the ranks of one run, or send rank 0's to all (world size 1: a no-op)."""

    def __init__(self, rank: int, world_size: int, address: Optional[tuple[str, int]], device: torch.device):
        self.rank, self.world_size, self.device = rank, world_size, torch.device(device)
        self._group = None
        if world_size == 1:
            return
        host, port = address
        store = dist.TCPStore(host, port, world_size, is_master=rank == 0, timeout=TIMEOUT)
        prefix = dist.PrefixStore("verl_omni_lora", store)
        if self.device.type == "cuda":
            self._group = dist.ProcessGroupNCCL(prefix, rank, world_size)
        else:
            self._group = dist.ProcessGroupGloo(prefix, rank, world_size, TIMEOUT)

    def all_reduce_(self, flat: torch.Tensor) -> torch.Tensor:
        """In-place sum of ``flat`` over the ranks."""
        if self._group is not None:
            opts = dist.AllreduceOptions()
            opts.reduceOp = dist.ReduceOp.SUM
            self._group.allreduce([flat], opts).wait()
        return flat

    def broadcast_(self, flat: torch.Tensor) -> torch.Tensor:
        """In place: every rank's ``flat`` becomes rank 0's."""
        if self._group is not None:
            opts = dist.BroadcastOptions()
            opts.rootRank, opts.rootTensor = 0, 0
            self._group.broadcast([flat], opts).wait()
        return flat
