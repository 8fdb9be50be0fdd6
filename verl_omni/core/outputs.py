"""The rollout record: what one engine call returns for one prompt group, carried whole from the engine to the actor.

A batched engine call returns tensors with a leading batch dimension B=N (the n samples of one prompt). That
record travels as one object from the engine through the server and the agent loop, and becomes rows of verl's
``DataProto`` by one concatenation per field (``agent_loop.records_to_data_proto``): it is never split into
per-sample dicts and stacked again. Media carry a frame axis (``core/media.py``): an image is one frame.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Optional

import torch

from verl_omni.core.conditioning import FIELDS as CONDITIONING_FIELDS


@dataclass
class RLBatchOutput:
    """The rollout record of one engine call of batch B (all tensors on CPU).

    Shapes: T = num_inference_steps; latents are the packed transformer-space latents.
    - media:             uint8 [B, F, H, W, 3] (an image is F = 1; a [B, H, W, 3] tensor is given its frame axis)
    - latents:           [B, K, *latent_shape]: the trajectory's latents at positions ``latent_steps`` (all T+1,
                         x_T ... x_0, by default; the SDE window's W+1 with ``trajectory_window_only``, plus the
                         positions in ``keep_latent_steps``; K = 0 when return_trajectory=False)
    - latent_steps:      int64 [K]      (position j = the latent entering step j; T = x_0)
    - log_probs:         float32 [B, T]   (0 outside the SDE window)
    - window_mask:       bool [T]         (True where the step was stochastic and counts for training)
    - timesteps:         float32 [T]      (the transformer's timestep input, per step)
    - sigmas:            float32 [T+1]    (scheduler sigmas incl. the terminal one)
    - prompt_embeds:     [B, L, D]; prompt_embeds_mask: [B, L] (None where the model has no mask)
    - negative_*:        same, only when guidance is on
    - pooled_*:          SD3's pooled text embeddings [B, D'] (None for Qwen-Image)
    - seeds:             the B seeds used
    - truncated_prompt_tokens: text tokens of this call's prompt cut off at max_sequence_length (0 = none); the
                         pipelines log each cut at DEBUG only, the trainer reports a count per step
    - sampling:          the sampling settings this call ran with (``DiffusionSamplingParams.to_dict()``), shared
                         by its B rows: the actor recomputes log-probs with them (``config/sampling.RowSettings``)
    """

    media: torch.Tensor
    latents: torch.Tensor
    log_probs: torch.Tensor
    window_mask: torch.Tensor
    timesteps: torch.Tensor
    sigmas: torch.Tensor
    latent_steps: torch.Tensor
    prompt_embeds: torch.Tensor
    seeds: list[int]
    prompt_embeds_mask: Optional[torch.Tensor] = None
    negative_prompt_embeds: Optional[torch.Tensor] = None
    negative_prompt_embeds_mask: Optional[torch.Tensor] = None
    pooled_prompt_embeds: Optional[torch.Tensor] = None
    negative_pooled_prompt_embeds: Optional[torch.Tensor] = None
    truncated_prompt_tokens: int = 0
    sampling: Optional[dict[str, Any]] = None

    def __post_init__(self) -> None:
        self.media = media_with_frame_axis(self.media)

    @property
    def batch_size(self) -> int:
        return int(self.media.shape[0])

    @property
    def num_frames(self) -> int:
        return int(self.media.shape[1])

    @property
    def images(self) -> torch.Tensor:
        """The media as images, uint8 [B, H, W, 3] (a view); a video record is refused."""
        if self.num_frames != 1:
            raise ValueError(f"media: a video record of {self.num_frames} frames has no images; read .media")
        return self.media[:, 0]

    def to_payload(self) -> dict[str, Any]:
        """The record as a plain dict (tensors, ints, lists) for Ray or HTTP transport."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_payload(cls, payload: dict[str, Any]) -> RLBatchOutput:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(payload) - names)
        if unknown:
            raise ValueError(f"rollout record with unknown fields {unknown}; known: {sorted(names)}")
        return cls(**payload)

    def check(self) -> RLBatchOutput:
        """Raise ``ValueError`` naming the field whose batch dimension is not the record's B; return self."""
        n = self.batch_size
        if len(self.seeds) != n:
            raise ValueError(f"engine returned {n} samples (media) for {len(self.seeds)} seeds")
        for name in PER_SAMPLE_FIELDS:
            value = getattr(self, name)
            if value is not None and value.shape[0] != n:
                raise ValueError(f"engine field {name} has batch {value.shape[0]}, expected {n}")
        return self


def media_with_frame_axis(media: Any) -> torch.Tensor:
    """uint8 ``[B, F, H, W, 3]`` from ``[B, F, H, W, 3]`` or ``[B, H, W, 3]`` (images: F = 1, a view); else a
    ``ValueError`` naming ``media``."""
    media = torch.as_tensor(media)
    if media.dtype != torch.uint8:
        raise ValueError(f"media: expected uint8 RGB (0-255), got dtype {media.dtype}")
    if media.ndim == 4:
        media = media.unsqueeze(1)
    if media.ndim != 5 or media.shape[-1] != 3:
        raise ValueError(f"media: expected shape [B, F, H, W, 3] (or [B, H, W, 3] images), got {list(media.shape)}")
    return media


# Fields that have a leading batch dimension; the rest are shared per call (one value for all B rows).
PER_SAMPLE_FIELDS = ("media", "latents", "log_probs", *CONDITIONING_FIELDS)
SHARED_FIELDS = ("window_mask", "timesteps", "sigmas", "latent_steps")


def slice_batch(batch: RLBatchOutput, start: int, stop: int) -> RLBatchOutput:
    """Samples ``start:stop`` of a batched result (views; shared fields kept whole): one request's share of an
    engine call that served several requests of the same prompt and settings."""
    kwargs = {
        name: None if getattr(batch, name) is None else getattr(batch, name)[start:stop] for name in PER_SAMPLE_FIELDS
    }
    kwargs.update({name: getattr(batch, name) for name in SHARED_FIELDS})
    # Every sample of a call shares its one prompt, hence its truncation, and its sampling settings.
    return RLBatchOutput(
        seeds=list(batch.seeds[start:stop]),
        truncated_prompt_tokens=batch.truncated_prompt_tokens,
        sampling=batch.sampling,
        **kwargs,
    )


__all__ = [
    "PER_SAMPLE_FIELDS",
    "SHARED_FIELDS",
    "RLBatchOutput",
    "media_with_frame_axis",
    "slice_batch",
]
