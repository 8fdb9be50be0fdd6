"""Data parallel over the LoRA: one all-reduce of the flattened LoRA gradients per optimizer step (full
fine-tuning: a reduce-scatter and an all-gather over the same group, workers/full_weights.py).

The ranks live in processes that may already own a ``torch.distributed`` default group (vllm-omni's worker
initialises its own, of world size 1), so this group is built directly from a store, without touching the
default one: ``ProcessGroupNCCL`` for CUDA tensors, ``ProcessGroupGloo`` on CPU. Rank 0 hosts the TCP store.
"""

from __future__ import annotations

import datetime
import logging
import socket
from typing import Any, Optional

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

TIMEOUT = datetime.timedelta(minutes=30)  # a rank may wait for the slowest one's whole update


class LoRAGradSync:
    """Sum tensors over the ranks of one run, or send rank 0's to all (world size 1: a no-op)."""

    def __init__(self, rank: int, world_size: int, address: Optional[tuple[str, int]], device: torch.device):
        self.rank, self.world_size, self.device = rank, world_size, torch.device(device)
        self._group = None
        self.local_world_size = 1  # the ranks on this rank's host (this one included)
        if world_size == 1:
            return
        host, port = address
        store = dist.TCPStore(host, port, world_size, is_master=rank == 0, timeout=TIMEOUT)
        prefix = dist.PrefixStore("verl_omni_lora", store)
        me = socket.gethostname()
        prefix.set(f"host/{rank}", me)
        self.local_world_size = [prefix.get(f"host/{r}").decode() for r in range(world_size)].count(me)
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

    def reduce_scatter(self, flat: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous 1/world_size of the sum of ``flat`` over the ranks (``flat``'s length: a multiple
        of the world size); world size 1: ``flat`` itself."""
        out, work = self.reduce_scatter_async(flat)
        if work is not None:
            work.wait()
        return out

    def reduce_scatter_async(self, flat: torch.Tensor) -> tuple[torch.Tensor, Optional[Any]]:
        """``reduce_scatter`` started, not waited for: (the output, its work handle, or None with world size 1).
        ``out`` holds the sum after ``work.wait()`` (on CUDA: for the work enqueued after the wait on the current
        stream); ``flat`` must stay alive until then."""
        if self._group is None:
            return flat, None
        out = torch.empty(flat.numel() // self.world_size, dtype=flat.dtype, device=flat.device)
        opts = dist.ReduceScatterOptions()
        opts.reduceOp = dist.ReduceOp.SUM
        return out, self._group._reduce_scatter_base(out, flat, opts)

    def all_gather(self, out: torch.Tensor, shard: torch.Tensor) -> torch.Tensor:
        """Every rank's ``shard`` in rank order, in ``out``; world size 1: ``shard`` itself."""
        if self._group is None:
            return shard
        self._group._allgather_base(out, shard).wait()
        return out

    def broadcast_(self, flat: torch.Tensor) -> torch.Tensor:
        """In place: every rank's ``flat`` becomes rank 0's."""
        if self._group is not None:
            opts = dist.BroadcastOptions()
            opts.rootRank, opts.rootTensor = 0, 0
            self._group.broadcast([flat], opts).wait()
        return flat
