"""Per-sample diffusion outputs and the unpacking of a batched engine result into them.

A batched engine call returns tensors with a leading batch dimension B=N. FlowGRPO, the reward and
verl's DataProto want one record per sample, so every field is sliced and *cloned*: no sample shares
storage with another (a later in-place edit of one must never change its siblings).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Optional

import numpy as np
import torch

from verl_omni.core.conditioning import FIELDS as CONDITIONING_FIELDS


@dataclass
class RLBatchOutput:
    """What an RL pipeline returns for one call of batch B (all tensors on CPU).

    Shapes: T = num_inference_steps; latents are the packed transformer-space latents.
    - images:            uint8 [B, H, W, 3]
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
    """

    images: torch.Tensor
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

    @property
    def batch_size(self) -> int:
        return int(self.images.shape[0])


# Fields that have a leading batch dimension; the rest are shared per call (copied per sample).
PER_SAMPLE_FIELDS = ("images", "latents", "log_probs", *CONDITIONING_FIELDS)
SHARED_FIELDS = ("window_mask", "timesteps", "sigmas", "latent_steps")


@dataclass
class DiffusionSample:
    """One generated image with everything FlowGRPO needs to score and train on it."""

    image: np.ndarray  # uint8 [H, W, 3]
    latents: torch.Tensor  # [K, *latent_shape]: the trajectory at positions latent_steps
    log_probs: torch.Tensor  # [T]
    window_mask: torch.Tensor  # bool [T]
    timesteps: torch.Tensor  # [T]
    sigmas: torch.Tensor  # [T+1]
    latent_steps: torch.Tensor  # int64 [K]
    prompt_embeds: torch.Tensor  # [L, D]
    seed: int
    prompt_embeds_mask: Optional[torch.Tensor] = None
    negative_prompt_embeds: Optional[torch.Tensor] = None
    negative_prompt_embeds_mask: Optional[torch.Tensor] = None
    pooled_prompt_embeds: Optional[torch.Tensor] = None
    negative_pooled_prompt_embeds: Optional[torch.Tensor] = None
    extra: dict = field(default_factory=dict)

    def to_payload(self) -> dict:
        """Plain dict (numpy / tensors) for Ray or HTTP transport."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_payload(cls, payload: dict) -> DiffusionSample:
        return cls(**payload)


def unpack_batch(batch: RLBatchOutput) -> list[DiffusionSample]:
    """Split a batched result into independent per-sample outputs (cloned, contiguous, CPU)."""
    n = batch.batch_size
    if len(batch.seeds) != n:
        raise ValueError(f"engine returned {n} images for {len(batch.seeds)} seeds")
    samples = []
    for i in range(n):
        kwargs = {}
        for name in PER_SAMPLE_FIELDS:
            value = getattr(batch, name)
            if value is None:
                kwargs[name] = None
            elif value.shape[0] != n:
                raise ValueError(f"engine field {name} has batch {value.shape[0]}, expected {n}")
            else:
                kwargs[name] = value[i].detach().to("cpu").clone().contiguous()
        for name in SHARED_FIELDS:
            kwargs[name] = getattr(batch, name).detach().to("cpu").clone()
        image = kwargs.pop("images")
        extra = {"truncated_prompt_tokens": int(batch.truncated_prompt_tokens)}
        samples.append(DiffusionSample(image=image.numpy(), seed=int(batch.seeds[i]), extra=extra, **kwargs))
    return samples


def slice_batch(batch: RLBatchOutput, start: int, stop: int) -> RLBatchOutput:
    """Samples ``start:stop`` of a batched result (views; shared fields kept whole)."""
    kwargs = {
        name: None if getattr(batch, name) is None else getattr(batch, name)[start:stop] for name in PER_SAMPLE_FIELDS
    }
    kwargs.update({name: getattr(batch, name) for name in SHARED_FIELDS})
    # Every sample of a call shares its one prompt, hence its truncation.
    return RLBatchOutput(
        seeds=list(batch.seeds[start:stop]), truncated_prompt_tokens=batch.truncated_prompt_tokens, **kwargs
    )
