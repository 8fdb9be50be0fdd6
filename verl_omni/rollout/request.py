"""The one validation of a generate request, done by the server before the engine is touched.

Every check names the field and the limit, so a client (verl's agent loop, or HTTP) learns what to change.
Engines and pipelines trust what reaches them.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any, Optional

from verl_omni.config.rollout import INT64_MAX, INT64_MIN, RequestLimits
from verl_omni.config.sampling import DiffusionSamplingParams
from verl_omni.core.prompts import is_blank
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
    if is_blank(prompt):
        raise ValueError("prompt is empty (only whitespace, zero-width or control characters)")
    if len(prompt) > limits.max_prompt_chars:
        raise ValueError(
            f"prompt has {len(prompt)} characters; the limit is {limits.max_prompt_chars} "
            "(actor_rollout_ref.rollout.limits.max_prompt_chars)"
        )
    n = num_outputs_per_prompt
    if isinstance(n, bool) or not isinstance(n, int):
        raise ValueError(f"num_outputs_per_prompt must be an int, got {type(n).__name__}")
    if not isinstance(seeds, (list, tuple)) or len(seeds) != n:
        got = len(seeds) if isinstance(seeds, (list, tuple)) else type(seeds).__name__
        raise ValueError(f"seeds must be a list of {n} ints (num_outputs_per_prompt), got {got}")
    if any(isinstance(s, bool) or not isinstance(s, numbers.Integral) for s in seeds):
        raise ValueError(f"seeds must be ints, got {[type(s).__name__ for s in seeds]}")
    outside = [int(s) for s in seeds if not INT64_MIN <= int(s) <= INT64_MAX]
    if outside:
        raise ValueError(
            f"seeds {outside[:4]} do not fit a 64-bit signed int: each seed must be in [-2**63, 2**63 - 1]"
        )
    params = DiffusionSamplingParams.from_dict(sampling_params).validate(model.vae_scale_factor)
    limits.check(n, params)
    if params.max_sequence_length > model.max_sequence_length:
        raise ValueError(
            f"max_sequence_length={params.max_sequence_length} must be <= "
            f"{model.max_sequence_length} (the pipeline's text-token limit)"
        )
    return GenerateRequest(prompt, [int(s) for s in seeds], params)
