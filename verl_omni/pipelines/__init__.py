"""RL pipelines: diffusers pipelines that also return latents, per-step log-probs and embeddings, one package per
model family.

- ``registry.py``: the model families (``@register_family``), found by importing every subpackage here once;
- ``<family>/``: ``__init__`` (the registered ``ModelFamily``, cheap to import), ``pipeline.py`` (the RL pipeline:
  the diffusers pipeline plus the hooks of ``base.py``), ``options.py`` (its own options section, if any),
  ``standin.py`` (its tiny and real-size random-weight builders);
- ``base.py``: ``RLPipelineMixin``, ``rl_generate`` and ``predict_velocity`` written once over per-model hooks;
- ``model_inputs.py``: ``ModelInputs``, a conditioning prepared once for many forwards (CFG branches batched);
- ``common.py``: per-sample randomness, the windowed SDE denoising loop, image conversion;
- ``loading.py``: ``load_rl_pipeline``; ``tiny.py``: ``tiny_model_dir`` (``tiny:<family>`` model paths).
- ``engine_attention.py``: attention through an engine's fused kernel, what a family's ``use_attention_function``
  installs.
"""

from verl_omni.pipelines.registry import (
    AUTO,
    TINY_PREFIX,
    ModelFamily,
    family_for_model_dir,
    family_names,
    get_family,
    get_pipeline_class,
    register_family,
    registered_families,
)

__all__ = [
    "AUTO",
    "TINY_PREFIX",
    "ModelFamily",
    "family_for_model_dir",
    "family_names",
    "get_family",
    "get_pipeline_class",
    "register_family",
    "registered_families",
]
