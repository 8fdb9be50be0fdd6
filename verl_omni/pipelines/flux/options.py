"""``actor_rollout_ref.model.flux``: FLUX.1-dev's own options. ``FluxRLPipeline.apply_family_options`` takes them
wherever a pipeline is loaded (``pipelines/loading.py``): both engines' pipelines and the actor's, so the rollout and
the actor's recomputation see the same value."""

from __future__ import annotations

import math
from dataclasses import dataclass

from verl_omni.core.section import Section

DISTILLED_GUIDANCE_SCALE = 3.5  # FluxPipeline.__call__'s guidance_scale default; flow_grpo's FLUX configs


@dataclass
class FluxOptions(Section):
    _prefix = "actor_rollout_ref.model.flux"

    # What FLUX.1-dev's guidance embedding receives in every forward, rollout and training alike: diffusers
    # FluxPipeline's guidance_scale (flow_grpo's config.sample.guidance_scale for FLUX). Not a CFG branch.
    distilled_guidance_scale: float = DISTILLED_GUIDANCE_SCALE

    def __post_init__(self) -> None:
        value = self.distilled_guidance_scale
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
        if not ok:
            raise ValueError(
                f"{self.key('distilled_guidance_scale')}={value!r} must be a positive finite number "
                f"(FluxPipeline's guidance_scale; default {DISTILLED_GUIDANCE_SCALE})"
            )
        object.__setattr__(self, "distilled_guidance_scale", float(value))
