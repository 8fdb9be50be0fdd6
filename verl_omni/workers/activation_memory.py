"""``model.gradient_checkpointing_blocks: auto``: recompute only as many transformer blocks as the GPU needs.

Every block the backward does not recompute saves one forward of it (a third of the update's work when all
recompute), but keeps its activations from the forward to the backward. How many fit depends on the card, the
micro-batch (``ppo_micro_batch_size_per_gpu`` rows, doubled by batched CFG), the image and prompt tokens and what the
colocated engine keeps while it sleeps, so it is measured rather than configured:

- update 1 recomputes all blocks but the last, and measures what that block's forward leaves allocated (its saved
  activations, read from the allocator's host-side counters: no device sync) and the update's peak above its start;
- every later update reads the memory left on the card (``cudaMemGetInfo`` + the allocator's cached blocks, less
  the share of the card above ``model.gradient_checkpointing_memory_utilization``, by default ``1 - MARGIN``, left
  for fragmentation) and keeps as many blocks as fit, each counted ``SLACK`` times its largest measured size (a later
  batch's prompts may be longer); the first blocks recompute, the rest keep;
- should an update still run out of memory, the actor retries it with every block recomputed (when no other rank
  can be waiting for it, see ``DiffusionLoRAActor._may_retry_after_oom``) and later updates keep at most 3/4 of the
  blocks that did not fit: a logged fallback, not a lost step.

Blocks of one model may differ in size (SD3.5's last block has no text MLP): every kept block is measured in every
update, so the estimate is the largest block seen so far, and the out-of-memory fallback covers a first guess that
was too small.

The choice changes no result (recomputation is the same arithmetic; tests compare the LoRA after an update), only
speed and memory; ``actor/recomputed_blocks`` reports it every update.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import torch

from verl_omni.models.checkpointing import KEY, BlockCheckpointing

logger = logging.getLogger(__name__)

AUTO = "auto"
MARGIN = 0.08  # default share of the card left free: fragmentation of the caching allocator, the engine's wake-up
SLACK = 1.25  # a kept block's activations grow with the tokens: prompts up to 25% longer than measured still fit


def blocks_to_recompute(
    num_blocks: int, block_bytes: float, fixed_bytes: float, budget_bytes: float, slack: float = SLACK
) -> int:
    """How many of the first blocks must recompute so that ``fixed_bytes`` (the update's memory above its start
    apart from the kept blocks: recomputed blocks' inputs, gradients, one block's working set) plus ``slack`` x
    ``block_bytes`` per kept block fit in ``budget_bytes``. Nothing measured (``block_bytes`` <= 0): all of them."""
    if block_bytes <= 0:
        return num_blocks
    keep = int(max(0.0, budget_bytes - fixed_bytes) // (slack * block_bytes))
    return max(0, num_blocks - keep)


class CudaMemory:
    """The CUDA caching allocator's counters for ``device`` (host-side reads, no device sync)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def allocated(self) -> int:
        return torch.cuda.memory_allocated(self.device)

    def reset_peak(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self) -> int:
        return torch.cuda.max_memory_allocated(self.device)

    def peak_reserved(self) -> int:
        """The most the allocator held (its tensors and its cache) since ``reset_peak``."""
        return torch.cuda.max_memory_reserved(self.device)

    def budget(self, margin: float) -> float:
        """Bytes this process can still allocate, less ``margin`` of the card: free on the device (other processes
        and the sleeping engine already subtracted) plus what the allocator caches unused."""
        free, total = torch.cuda.mem_get_info(self.device)
        cached = torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
        return free + cached - margin * total


@dataclass
class _Update:
    start_bytes: int  # allocated when the update began
    peak_bytes: int  # the most allocated during it
    kept: int  # blocks that kept their activations


class AutoCheckpointing:
    """Sets ``checkpointing.recomputed`` before each update from the last one's measurement. ``memory``: where the
    numbers come from (``CudaMemory``; its ``allocated`` must be what ``checkpointing`` measures with);
    ``utilization``: the share of the card the update may fill (``model.gradient_checkpointing_memory_utilization``).

    Ranks may choose different counts: harmless, as the choice adds no collective (the colocated ranks all-reduce
    only gradients; FSDP2 gathers a block's weights in its pre-backward hook, not in the recomputation)."""

    def __init__(self, checkpointing: BlockCheckpointing, memory: CudaMemory, utilization: float = 1 - MARGIN) -> None:
        self.checkpointing, self.memory = checkpointing, memory
        self.margin = 1 - utilization
        self.num_blocks = len(checkpointing.blocks)
        self._last: Optional[_Update] = None
        self._start = 0
        self._max_kept: Optional[int] = None  # after an out-of-memory error: fewer than what failed
        self._recompute_all_once = False

    def before_update(self) -> int:
        """Choose this update's recomputed blocks; starts the peak measurement. Returns the count."""
        if self._recompute_all_once:  # the retry of an update that ran out of memory
            self._recompute_all_once = False
            recomputed = self.num_blocks
        elif self._last is None:
            recomputed = max(0, self.num_blocks - 1)  # keep the last block: its size is what the plan needs
        else:
            block_bytes = max(self.checkpointing.kept_bytes)
            last = self._last
            fixed = max(0, last.peak_bytes - last.start_bytes - last.kept * block_bytes)
            budget = self.memory.budget(self.margin)
            recomputed = blocks_to_recompute(self.num_blocks, block_bytes, fixed, budget)
            if self._max_kept is not None:
                recomputed = max(recomputed, self.num_blocks - self._max_kept)
            if recomputed != self.checkpointing.recomputed:
                logger.info(
                    "%s=auto: %d of %d blocks recompute (a kept block holds %.2f GB; %.1f GB left for activations, "
                    "%.1f GB of the update's peak is not kept blocks)",
                    KEY,
                    recomputed,
                    self.num_blocks,
                    block_bytes / 1e9,
                    budget / 1e9,
                    fixed / 1e9,
                )
        self.checkpointing.recomputed = recomputed
        self.memory.reset_peak()
        self._start = self.memory.allocated()
        return recomputed

    def after_oom(self, error: str) -> None:
        """The update ran out of memory: its retry recomputes every block, and later updates keep at most 3/4 of the
        blocks that did not fit (the estimate was too small: another process, fragmentation, longer prompts)."""
        kept = self.num_blocks - self.checkpointing.recomputed
        self._max_kept = kept * 3 // 4
        self._recompute_all_once = True
        logger.warning(
            "%s=auto: out of memory with %d of %d blocks keeping their activations (%s); retrying this update with "
            "every block recomputed, later updates keep at most %d",
            KEY,
            kept,
            self.num_blocks,
            error,
            self._max_kept,
        )

    def after_update(self) -> None:
        self._last = _Update(self._start, self.memory.peak(), self.num_blocks - self.checkpointing.recomputed)


__all__ = ["AUTO", "AutoCheckpointing", "CudaMemory", "blocks_to_recompute"]
