"""The one validation of a generate request, done by the server before the engine is touched.

Every check names the field and the limit, so a client (verl's agent loop, or HTTP) learns what to change.
Engines and pipelines trust what reaches them.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any, Optional

from verl_omni.config.rollout import RequestLimits
from verl_omni.config.sampling import DiffusionSamplingParams
from verl_omni.pipelines import get_pipeline_class
from verl_omni.pipelines.loading import vae_scale_factor_of


@dataclass(frozen=True)
class ModelLimits:
    """What the loaded model itself can take."""

    vae_scale_factor: Optional[int]  # image sides must be multiples of 2x this (VAE factor x 2x2 patches)
    max_sequence_length: int  # the pipeline's text-token limit

    @classmethod
    def of(cls, model_path: str, pipeline: str) -> ModelLimits:
        return cls(vae_scale_factor_of(model_path), get_pipeline_class(pipeline).MAX_SEQUENCE_LENGTH)


@dataclass(frozen=True)
class GenerateRequest:
    prompt: str
    seeds: list[int]
    params: DiffusionSamplingParams


def validate_request(
    prompt: Any,
    num_outputs_per_prompt: Any,
    seeds: Any,
    sampling_params: Optional[dict],
    limits: RequestLimits,
    model: ModelLimits,
) -> GenerateRequest:
    """Check a request against the configured limits and the model; raise ``ValueError`` naming what is wrong."""
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be a str, got {type(prompt).__name__}")
    if not prompt.strip():
        raise ValueError("prompt is empty")
    if len(prompt) > limits.max_prompt_chars:
        raise ValueError(
            f"prompt has {len(prompt)} characters; the limit is {limits.max_prompt_chars} "
            "(actor_rollout_ref.rollout.limits.max_prompt_chars)"
        )
    n = num_outputs_per_prompt
    if isinstance(n, bool) or not isinstance(n, int):
        raise ValueError(f"num_outputs_per_prompt must be an int, got {type(n).__name__}")
    if not 1 <= n <= limits.max_num_outputs_per_prompt:
        raise ValueError(
            f"num_outputs_per_prompt={n} must be in [1, {limits.max_num_outputs_per_prompt}] "
            "(actor_rollout_ref.rollout.limits.max_num_outputs_per_prompt)"
        )
    if not isinstance(seeds, (list, tuple)) or len(seeds) != n:
        got = len(seeds) if isinstance(seeds, (list, tuple)) else type(seeds).__name__
        raise ValueError(f"seeds must be a list of {n} ints (num_outputs_per_prompt), got {got}")
    if any(isinstance(s, bool) or not isinstance(s, numbers.Integral) for s in seeds):
        raise ValueError(f"seeds must be ints, got {[type(s).__name__ for s in seeds]}")
    params = DiffusionSamplingParams.from_dict(sampling_params).validate(model.vae_scale_factor)
    pixels = params.height * params.width
    if pixels > limits.max_pixels:
        raise ValueError(
            f"height x width = {params.height} x {params.width} = {pixels} pixels; the limit is "
            f"{limits.max_pixels} (actor_rollout_ref.rollout.limits.max_pixels)"
        )
    if params.num_inference_steps > limits.max_inference_steps:
        raise ValueError(
            f"num_inference_steps={params.num_inference_steps}; the limit is "
            f"{limits.max_inference_steps} (actor_rollout_ref.rollout.limits.max_inference_steps)"
        )
    if params.max_sequence_length > model.max_sequence_length:
        raise ValueError(
            f"max_sequence_length={params.max_sequence_length} must be <= "
            f"{model.max_sequence_length} (the pipeline's text-token limit)"
        )
    return GenerateRequest(prompt, [int(s) for s in seeds], params)
