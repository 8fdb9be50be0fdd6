"""What the actor trains on: the tensors of a rollout batch that the log-prob recomputation needs.

A plain dict of tensors (plus the image size), so it crosses process boundaries as plain data: Ray sends it as
tensors, and the vllm-omni engine hands it to its worker as a file that ``torch.load(weights_only=True)`` reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from verl_omni.config.sampling import ROW_SETTINGS, RowSettings
from verl_omni.core.conditioning import FIELDS as CONDITIONING_FIELDS
from verl_omni.core.conditioning import Conditioning
from verl_omni.schedulers.flow_match_sde import reference_sigma_max

# The rollout's fields the actor reads (conditioning fields come on top, where present; ``latent_steps`` is absent
# from a batch that holds the whole trajectory), and the sampling settings of every row (``ROW_SETTINGS``).
ROLLOUT_FIELDS = ("latents", "latent_steps", "timesteps", "sigmas", "old_log_probs", "window_mask", *ROW_SETTINGS)


@dataclass
class TrainBatch:
    """Rows of a rollout with their advantages. Shapes (B rows, T steps, K kept latents):
    latents [B, K, ...] at the trajectory positions latent_steps [B, K] (no latent_steps: K = T+1, all of them),
    timesteps [B, T], sigmas [B, T+1], old_log_probs [B, T], window_mask bool [B, T], advantages [B], the
    conditioning fields [B, ...], each row's sampling settings (``ROW_SETTINGS``: noise_level, sde_type,
    guidance_scale, num_inference_steps [B]); ``height`` / ``width`` / ``num_frames`` of the media."""

    tensors: dict[str, torch.Tensor]
    height: int
    width: int
    num_frames: int = 1

    def __len__(self) -> int:
        return int(self.tensors["latents"].shape[0])

    @classmethod
    def from_data_proto(cls, data: Any, advantages: torch.Tensor) -> TrainBatch:
        batch = data.batch
        keys = set(batch.keys())
        tensors = {name: batch[name] for name in (*ROLLOUT_FIELDS, *CONDITIONING_FIELDS) if name in keys}
        tensors["advantages"] = torch.as_tensor(advantages).float()
        num_frames, height, width = (int(x) for x in batch["media"].shape[1:4])  # media: [B, F, H, W, 3]
        return cls(tensors, height, width, num_frames)

    @property
    def window(self) -> torch.Tensor:
        return self.tensors["window_mask"].bool()

    def row_settings(self) -> Optional[RowSettings]:
        """The sampling settings the rows were produced with (None without rows); ``ValueError`` naming the field
        when a row lacks them, or rows differ (``RowSettings.of_rows``), or they disagree with the rows' steps."""
        settings = RowSettings.of_rows(self.tensors)
        steps = int(self.tensors["timesteps"].shape[1])
        if settings is not None and settings.num_inference_steps != steps:
            raise ValueError(
                f"the rollout batch's num_inference_steps={settings.num_inference_steps} disagrees with its "
                f"timesteps ({steps} per row)"
            )
        return settings

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
            return self._with({k: v[rows].clone() for k, v in self.tensors.items()})
        return self._with({k: v[rows] for k, v in self.tensors.items()})

    def _with(self, tensors: dict[str, torch.Tensor]) -> TrainBatch:
        return TrainBatch(tensors, self.height, self.width, self.num_frames)

    def to(self, device: torch.device | str) -> TrainBatch:
        """Every tensor on ``device`` in one pass (the update then makes no host-device copies)."""
        return self._with({k: v.to(device, non_blocking=True) for k, v in self.tensors.items()})

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
        return {"tensors": self.tensors, "height": self.height, "width": self.width, "num_frames": self.num_frames}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | TrainBatch) -> TrainBatch:
        if isinstance(data, TrainBatch):
            return data
        return cls(dict(data["tensors"]), int(data["height"]), int(data["width"]), int(data.get("num_frames", 1)))
