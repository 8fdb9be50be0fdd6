"""Gradient checkpointing of the first k transformer blocks only (``model.gradient_checkpointing_blocks``).

Recomputing a block costs one more forward of it in the backward pass; keeping its activations costs memory from
its forward until its backward. With all blocks recomputed the update does three forwards' work for two forwards'
worth of useful gradient (forward + activation gradient): where memory is left over, keeping some blocks is the
cheapest speed-up there is. The first k recompute, as Megatron's ``recompute_method=block``: the backward reaches
them last, when the kept blocks' activations are already freed, so a recomputation never adds to the peak (which
is at the end of the forward).

diffusers' transformers call ``self._gradient_checkpointing_func(block, *args)`` for every block when
checkpointing is on (and gradients are enabled); ``enable_gradient_checkpointing(gradient_checkpointing_func=...)``
is its public way to choose that function, which here checkpoints only the chosen blocks and, when asked, measures
what each kept block's forward leaves allocated for its backward (the number the ``auto`` plan needs).

A two-expert pipeline (Wan2.2-T2V-A14B) gives its low-noise expert to the same ``BlockCheckpointing``: the experts
have one architecture, so block i of either recomputes when block i of the other does, and a kept block's measured
size is the larger of the two experts' (a FlowGRPO step runs one expert on all its rows; a micro-batch whose rows
straddle the boundary, DiffusionNFT's random timesteps, runs each expert on its share, and the ``auto`` plan's
out-of-memory fallback covers what the two shares together keep beyond the larger one).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Optional

import torch
from torch.utils.checkpoint import checkpoint

# diffusers' names of the block lists, in execution order (Wan's transformer names its list ``blocks``)
BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks", "blocks")
KEY = "actor_rollout_ref.model.gradient_checkpointing_blocks"


def transformer_blocks(transformer: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks a diffusers transformer checkpoints, in the order its forward runs them."""
    blocks: list[torch.nn.Module] = []
    for name in BLOCK_LISTS:
        blocks.extend(getattr(transformer, name, None) or [])
    return blocks


class BlockCheckpointing:
    """Which blocks recompute (``recomputed``: the first k, None for all; changeable between updates) and, with
    ``allocated`` (a host-side read of the bytes the allocator has handed out, e.g. ``torch.cuda.memory_allocated``),
    the most bytes each kept block's forward left allocated (``kept_bytes[i]``; 0: never measured): its saved
    activations."""

    def __init__(
        self,
        transformer: torch.nn.Module,
        recomputed: Optional[int],
        allocated: Optional[Callable[[], int]] = None,
        others: Sequence[torch.nn.Module] = (),
    ) -> None:
        self.blocks = transformer_blocks(transformer)
        self._index = {id(block): i for i, block in enumerate(self.blocks)}
        for other in others:  # another expert of the pipeline: its block i follows block i (the module doc)
            self._index.update({id(block): i for i, block in enumerate(self._same_blocks(other))})
        self.recomputed = self.check(recomputed)
        self._allocated = allocated
        self.kept_bytes = [0] * len(self.blocks)
        for module in (transformer, *others):
            module.enable_gradient_checkpointing(gradient_checkpointing_func=self._call)

    def _same_blocks(self, other: torch.nn.Module) -> list[torch.nn.Module]:
        blocks = transformer_blocks(other)
        if len(blocks) != len(self.blocks):
            raise ValueError(
                f"{KEY}: the pipeline's experts differ in depth ({len(self.blocks)} and {len(blocks)} blocks); one "
                "plan covers experts of one architecture"
            )
        return blocks

    def check(self, recomputed: Optional[int]) -> int:
        """``recomputed`` blocks (None: every one), refused naming the key when the transformer has fewer."""
        if recomputed is None:
            return len(self.blocks)
        if recomputed > len(self.blocks):
            raise ValueError(
                f"{KEY}={recomputed} but the transformer has {len(self.blocks)} blocks "
                f"(allowed: 0 to {len(self.blocks)}, null for all, or auto)"
            )
        return recomputed

    def _call(self, block: Callable, *args):
        index = self._index[id(block)]
        if index < self.recomputed:
            return checkpoint(block.__call__, *args, use_reentrant=False)
        if self._allocated is None:
            return block(*args)
        before = self._allocated()
        out = block(*args)
        # What stays allocated after the forward: the tensors saved for the backward (and the output, which the
        # next block's input is anyway).
        self.kept_bytes[index] = max(self.kept_bytes[index], self._allocated() - before)
        return out


__all__ = ["BlockCheckpointing", "transformer_blocks"]
