"""RL pipelines: diffusers pipelines that also return latents, per-step log-probs and embeddings.

- ``base.py``: ``RLPipelineMixin``, ``rl_generate`` and ``predict_velocity`` written once over per-model hooks;
- ``model_inputs.py``: ``ModelInputs``, a conditioning prepared once for many forwards (CFG branches batched);
- ``common.py``: per-sample randomness, the windowed SDE denoising loop, image conversion;
- ``qwen_image.py``, ``sd3.py``: the hooks of each model; ``loading.py``: ``load_rl_pipeline``.

``get_pipeline_class(name)`` maps a config name (``qwen_image``, ``sd3``) to its class, importing only that
model's module.
"""

from __future__ import annotations

from collections.abc import Callable

from verl_omni.core.names import PIPELINE_NAMES


def _qwen_image() -> type:
    from verl_omni.pipelines.qwen_image import QwenImageRLPipeline

    return QwenImageRLPipeline


def _sd3() -> type:
    from verl_omni.pipelines.sd3 import SD3RLPipeline

    return SD3RLPipeline


PIPELINE_REGISTRY: dict[str, Callable[[], type]] = {"qwen_image": _qwen_image, "sd3": _sd3}
assert set(PIPELINE_REGISTRY) == set(PIPELINE_NAMES), "core.names.PIPELINE_NAMES must list every pipeline"


def get_pipeline_class(name: str) -> type:
    if name not in PIPELINE_REGISTRY:
        raise ValueError(f"unknown pipeline {name!r}; allowed: {sorted(PIPELINE_REGISTRY)}")
    return PIPELINE_REGISTRY[name]()
