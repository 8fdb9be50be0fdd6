"""RL pipelines: diffusers pipelines that also return latents, per-step log-probs and embeddings.

- ``base.py``: ``RLPipelineMixin``, ``rl_generate`` and ``predict_velocity`` written once over per-model hooks;
- ``model_inputs.py``: ``ModelInputs``, a conditioning prepared once for many forwards (CFG branches batched);
- ``common.py``: per-sample randomness, the windowed SDE denoising loop, image conversion;
- ``qwen_image.py``, ``sd3.py``, ``flux/``: the hooks of each model; ``loading.py``: ``load_rl_pipeline``;
- ``engine_attention.py``: attention through an engine's fused kernel, what ``use_attention_function`` installs.

``get_pipeline_class(name)`` maps a config name (``qwen_image``, ``sd3``, ``flux``) to its class, importing only that
model's module. Tiny builders that live with their family (``flux/standin.py``) join ``models.tiny.TINY_BUILDERS``
here, so ``tiny:<name>`` finds them.
"""

from __future__ import annotations

from collections.abc import Callable

from verl_omni.core.names import PIPELINE_NAMES
from verl_omni.models.tiny import TINY_BUILDERS
from verl_omni.pipelines.flux.standin import build_tiny_flux


def _qwen_image() -> type:
    from verl_omni.pipelines.qwen_image import QwenImageRLPipeline

    return QwenImageRLPipeline


def _sd3() -> type:
    from verl_omni.pipelines.sd3 import SD3RLPipeline

    return SD3RLPipeline


def _flux() -> type:
    from verl_omni.pipelines.flux.pipeline import FluxRLPipeline

    return FluxRLPipeline


PIPELINE_REGISTRY: dict[str, Callable[[], type]] = {"qwen_image": _qwen_image, "sd3": _sd3, "flux": _flux}
assert set(PIPELINE_REGISTRY) == set(PIPELINE_NAMES), "core.names.PIPELINE_NAMES must list every pipeline"
TINY_BUILDERS.setdefault("flux", build_tiny_flux)


def get_pipeline_class(name: str) -> type:
    if name not in PIPELINE_REGISTRY:
        raise ValueError(f"unknown pipeline {name!r}; allowed: {sorted(PIPELINE_REGISTRY)}")
    return PIPELINE_REGISTRY[name]()
