"""What the actor trains on: the tensors of a rollout batch that the log-prob recomputation needs.

A plain dict of tensors (plus the image size), so it crosses process boundaries as plain data: Ray sends it as
tensors, and the vllm-omni engine hands it to its worker as a file that ``torch.load(weights_only=True)`` reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from verl_omni.core.conditioning import FIELDS as CONDITIONING_FIELDS
from verl_omni.core.conditioning import Conditioning
from verl_omni.schedulers.flow_match_sde import reference_sigma_max

# The rollout's fields the actor reads (conditioning fields come on top, where present; ``latent_steps`` is absent
# from a batch that holds the whole trajectory).
ROLLOUT_FIELDS = ("latents", "latent_steps", "timesteps", "sigmas", "old_log_probs", "window_mask")


@dataclass
class TrainBatch:
    """Rows of a rollout with their advantages. Shapes (B rows, T steps, K kept latents):
    latents [B, K, ...] at the trajectory positions latent_steps [B, K] (no latent_steps: K = T+1, all of them),
    timesteps [B, T], sigmas [B, T+1], old_log_probs [B, T], window_mask bool [B, T], advantages [B], the
    conditioning fields [B, ...]; ``height`` / ``width`` of the images (of the frames, for videos)."""

    tensors: dict[str, torch.Tensor]
    height: int
    width: int

    def __len__(self) -> int:
        return int(self.tensors["latents"].shape[0])

    @classmethod
    def from_data_proto(cls, data: Any, advantages: torch.Tensor) -> TrainBatch:
        batch = data.batch
        keys = set(batch.keys())
        tensors = {name: batch[name] for name in (*ROLLOUT_FIELDS, *CONDITIONING_FIELDS) if name in keys}
        tensors["advantages"] = torch.as_tensor(advantages).float()
        height, width = (int(x) for x in batch["images"].shape[-3:-1])  # images [B, H, W, 3] or [B, F, H, W, 3]
        return cls(tensors, height, width)

    @property
    def window(self) -> torch.Tensor:
        return self.tensors["window_mask"].bool()

    @property
    def sigma_max(self) -> float:
        """FlowGRPO's ``sigma_max`` of the schedule (``reference_sigma_max``: sigmas[1]); rows share one schedule."""
        return reference_sigma_max(self.tensors["sigmas"][0])

    @property
    def num_terms(self) -> int:
        """(sample, window step) transitions in this batch."""
        return int(self.window.sum())

    def latent_columns(self, rows: torch.Tensor, step: int) -> torch.Tensor:
        """int64 [len(rows)]: the column of ``latents`` that holds x_step for each row (x_{step+1} is the next one).
        Raises ``ValueError`` naming the rows whose stored latents lack that transition."""
        positions = self.tensors.get("latent_steps")
        if positions is None:  # the whole trajectory: column = position
            return torch.full((len(rows),), step, dtype=torch.int64)
        positions = positions[rows]
        columns = (positions == step).int().argmax(dim=1)
        following = positions.gather(1, (columns + 1).clamp(max=positions.shape[1] - 1).unsqueeze(1)).squeeze(1)
        present = (positions == step).any(dim=1) & (columns + 1 < positions.shape[1]) & (following == step + 1)
        if not bool(present.all()):
            missing = rows[~present].tolist()
            raise ValueError(
                f"rollout rows {missing} lack the latents of window step {step} -> {step + 1} "
                f"(their latent_steps: {positions[~present][0].tolist()})"
            )
        return columns

    def conditioning(self, rows: Optional[torch.Tensor] = None) -> Conditioning:
        cond = Conditioning.from_fields(self.tensors)
        return cond if rows is None else cond.select(rows)

    def select(self, rows: torch.Tensor | slice) -> TrainBatch:
        """The rows ``rows``, in tensors of their own: a slice is copied, because a view pickles (Ray, torch.save)
        with its whole base storage — each of W shards would carry the full batch (one full-batch transfer per
        rank)."""
        if isinstance(rows, slice):
            return TrainBatch({k: v[rows].clone() for k, v in self.tensors.items()}, self.height, self.width)
        return TrainBatch({k: v[rows] for k, v in self.tensors.items()}, self.height, self.width)

    def to(self, device: torch.device | str) -> TrainBatch:
        """Every tensor on ``device`` in one pass (the update then makes no host-device copies)."""
        return TrainBatch(
            {k: v.to(device, non_blocking=True) for k, v in self.tensors.items()}, self.height, self.width
        )

    def shards(self, world_size: int) -> list[TrainBatch]:
        """``world_size`` contiguous row ranges with about equal numbers of window transitions (whole rows)."""
        per_row = self.window.sum(dim=1).cumsum(0)
        total = int(per_row[-1]) if len(per_row) else 0
        bounds = [0]
        for k in range(1, world_size):
            bounds.append(max(bounds[-1], int(torch.searchsorted(per_row, total * k / world_size))))
        bounds.append(len(self))
        return [self.select(slice(lo, hi)) for lo, hi in zip(bounds, bounds[1:], strict=False)]

    # ------------------------------------------------------------------ transport (no pickle needed)
    def as_dict(self) -> dict[str, Any]:
        """Tensors and ints only (loadable with ``torch.load(weights_only=True)``)."""
        return {"tensors": self.tensors, "height": self.height, "width": self.width}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | TrainBatch) -> TrainBatch:
        if isinstance(data, TrainBatch):
            return data
        return cls(dict(data["tensors"]), int(data["height"]), int(data["width"]))
