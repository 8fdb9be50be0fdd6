"""RL pipelines: diffusers pipelines that also return latents, per-step log-probs and embeddings.

``PIPELINE_REGISTRY`` maps a name (``qwen_image``, ``sd3``) to a loader of the pipeline class, so engines
and the actor pick a pipeline by config without importing every model.
"""

from typing import Callable

PIPELINE_REGISTRY: dict[str, Callable[[], type]] = {}


def register_pipeline(name: str, loader: Callable[[], type]) -> None:
    PIPELINE_REGISTRY[name] = loader


def get_pipeline_class(name: str) -> type:
    if name not in PIPELINE_REGISTRY:
        raise ValueError(f"unknown pipeline {name!r}; allowed: {sorted(PIPELINE_REGISTRY)}")
    return PIPELINE_REGISTRY[name]()


def _qwen_image():
    from verl_omni.pipelines.qwen_image import QwenImageRLPipeline

    return QwenImageRLPipeline


def _sd3():
    from verl_omni.pipelines.sd3 import SD3RLPipeline

    return SD3RLPipeline


register_pipeline("qwen_image", _qwen_image)
register_pipeline("sd3", _sd3)
