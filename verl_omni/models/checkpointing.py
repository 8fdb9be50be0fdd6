"""Gradient checkpointing of the first k transformer blocks only (``model.gradient_checkpointing_blocks``).

Recomputing a block costs one more forward of it in the backward pass; keeping its activations costs memory from
its forward until its backward. With all blocks recomputed the update does three forwards' work for two forwards'
worth of useful gradient (forward + activation gradient): where memory is left over, keeping some blocks is the
cheapest speed-up there is. Which blocks does not change the peak (every block's activations are alive when the
backward starts), so, as Megatron's ``recompute_method=block``, the first k recompute.

diffusers' transformers call ``self._gradient_checkpointing_func(block, *args)`` for every block when
checkpointing is on; ``enable_gradient_checkpointing(gradient_checkpointing_func=...)`` is its public way to choose
that function, which here checkpoints only the chosen blocks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

import torch
from torch.utils.checkpoint import checkpoint

BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks")  # diffusers' names, in execution order


def transformer_blocks(transformer: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks a diffusers transformer checkpoints, in the order its forward runs them."""
    blocks: list[torch.nn.Module] = []
    for name in BLOCK_LISTS:
        blocks.extend(getattr(transformer, name, None) or [])
    return blocks


def enable_block_checkpointing(transformer: torch.nn.Module, blocks: Optional[int] = None) -> int:
    """Turn on gradient checkpointing for the first ``blocks`` blocks (None: all). Returns how many recompute.

    Raises ``ValueError`` naming ``actor_rollout_ref.model.gradient_checkpointing_blocks`` when ``blocks`` exceeds
    the transformer's block count."""
    every = transformer_blocks(transformer)
    if blocks is None:
        blocks = len(every)
    if blocks > len(every):
        raise ValueError(
            f"actor_rollout_ref.model.gradient_checkpointing_blocks={blocks} but the transformer has "
            f"{len(every)} blocks (allowed: 0 to {len(every)}, or null for all)"
        )
    recomputed = {id(block) for block in every[:blocks]}

    def checkpoint_chosen_blocks(block: Callable, *args):
        if id(block) in recomputed:
            return checkpoint(block.__call__, *args, use_reentrant=False)
        return block(*args)

    transformer.enable_gradient_checkpointing(gradient_checkpointing_func=checkpoint_chosen_blocks)
    return blocks


__all__ = ["enable_block_checkpointing", "transformer_blocks"]
