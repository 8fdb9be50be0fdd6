"""Loading an RL pipeline from a diffusers directory, the same way for both engines and the actor."""

from __future__ import annotations

import json
import os
from typing import Any, Optional

import torch

from verl_omni.core.dtypes import resolve_dtype
from verl_omni.core.logs import quiet_loading_bars
from verl_omni.models.gelu_epilogue import use_gelu_epilogue
from verl_omni.models.lora import LoRASpec, add_lora_adapter
from verl_omni.pipelines.registry import (
    families_serving,
    get_family,
    get_pipeline_class,
    model_class_name,
    registered_families,
)


def load_rl_pipeline(
    path: str,
    pipeline: str,
    dtype: str | torch.dtype,
    lora: Optional[LoRASpec] = None,
    lora_dtype: torch.dtype = torch.float32,
    gelu_epilogue: bool = False,
    family_options: Any = None,
) -> Any:
    """``get_pipeline_class(pipeline).from_pretrained(path)`` in ``dtype`` (on CPU), progress bars off, with a
    frozen transformer and, when ``lora`` is given, a peft adapter on it, its weights in ``lora_dtype``.

    float32 by default, in every engine too: the actor trains the adapter in float32 over bf16 base weights, and
    the hybrid engine's engines serve that very tensor (an engine compiled with a bf16 adapter would recompile).
    A split-placement sync sends rollout-dtype values; a float32 adapter holds them exactly.

    ``gelu_epilogue``: the transformer's tanh GELUs computed in their GEMM's epilogue where nothing needs a
    gradient (``models/gelu_epilogue.py``; ``actor_rollout_ref.model.gelu_epilogue``).

    ``family_options``: the family's own options section (``ModelConfig.family_options``), handed to the
    pipeline's ``apply_family_options``: the one place every engine's and actor's pipeline gets it."""
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"actor_rollout_ref.model.path={path!r} is not a directory (a diffusers pipeline "
            "dir with model_index.json, or tiny:<family>)"
        )
    check_pipeline_matches(path, pipeline)
    quiet_loading_bars()
    pipe = get_pipeline_class(pipeline).from_pretrained(path, torch_dtype=resolve_dtype(dtype))
    pipe.set_progress_bar_config(disable=True)
    pipe.apply_family_options(family_options)
    for denoiser in pipe.denoisers.values():
        denoiser.requires_grad_(False)
    name_repeated_blocks(pipe)
    if gelu_epilogue:
        for denoiser in pipe.denoisers.values():
            use_gelu_epilogue(denoiser)
    if lora is not None:
        add_lora_adapter(pipe.lora_module, lora)
        for name, param in pipe.lora_module.named_parameters():
            if "lora_" in name:
                param.data = param.data.to(lora_dtype)
    return pipe


def name_repeated_blocks(pipe: Any) -> None:
    """Give the transformer ``_repeated_blocks`` (what diffusers' ``compile_repeated_blocks`` and vllm-omni's regional
    compile look up) from the pipeline class's ``REPEATED_BLOCKS`` when diffusers' class names none (SD3's)."""
    blocks = tuple(getattr(type(pipe), "REPEATED_BLOCKS", ()))
    if blocks and not getattr(pipe.transformer, "_repeated_blocks", None):
        pipe.transformer._repeated_blocks = list(blocks)


def loaded_class_names(pipeline: str) -> tuple[str, ...]:
    """The ``model_index.json`` ``_class_name`` values the family ``pipeline`` loads: those it declares (e.g.
    ``QwenImagePipeline``) and its RL pipeline class's own name."""
    return (*get_family(pipeline).diffusers_class_names, get_pipeline_class(pipeline).__name__)


def check_pipeline_matches(model_path: str, pipeline: str) -> None:
    """Raise ``ValueError`` naming both keys when the model directory's ``_class_name`` (``model_index.json``) is
    not what ``pipeline`` loads: loading it anyway fails deep inside diffusers (e.g. an SD3 VAE read as
    Qwen-Image's: ``AttributeError: ... 'temperal_downsample'``)."""
    class_name = model_class_name(model_path)
    if class_name is None or class_name in loaded_class_names(pipeline):
        return
    fits = families_serving(class_name)
    fix = f"set actor_rollout_ref.model.pipeline={fits[0]} (or auto)" if fits else "no registered family loads it"
    families = registered_families()
    raise ValueError(
        f"actor_rollout_ref.model.path={model_path!r} holds a {class_name} (model_index.json _class_name), but "
        f"actor_rollout_ref.model.pipeline={pipeline!r} loads {families[pipeline].diffusers_class_names[0]}: {fix} "
        "(allowed pipelines: "
        + ", ".join(f"{name} for {family.diffusers_class_names[0]}" for name, family in sorted(families.items()))
        + ")"
    )


DENOISER_COMPONENTS = ("transformer", "transformer_2")  # model_index.json's denoisers (transformer_2: Wan2.2's expert)


def denoiser_components(model_path: str) -> list[str]:
    """The denoising transformers ``<model_path>/model_index.json`` declares (``["transformer", "transformer_2"]``
    for a two-expert Wan2.2 pipeline); read without loading anything."""
    path = os.path.join(model_path, "model_index.json")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        index = json.load(f)
    return [name for name in DENOISER_COMPONENTS if isinstance(index.get(name), list) and index[name][0] is not None]


def vae_scale_factor_of(model_path: str) -> Optional[int]:
    """The pipeline's VAE factor from ``vae/config.json`` (Qwen-Image: 2 ** len(temperal_downsample))."""
    path = os.path.join(model_path, "vae", "config.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return vae_scale_factor_of_config(json.load(f))


def vae_scale_factor_of_config(cfg: dict) -> Optional[int]:
    """``vae_scale_factor_of`` from the VAE's config itself (None where it names no downsampling). A VAE that
    states its spatial factor (Wan's ``scale_factor_spatial``: 16 for Wan2.2's, whose 2x2 pixel patches add to its
    three halvings) is taken at its word."""
    if "scale_factor_spatial" in cfg:
        return int(cfg["scale_factor_spatial"])
    for key in ("temperal_downsample", "temporal_downsample"):
        if key in cfg:
            return 2 ** len(cfg[key])
    if "block_out_channels" in cfg:  # SD3-style AutoencoderKL
        return 2 ** (len(cfg["block_out_channels"]) - 1)
    return None


def check_schedule(model_path: str, num_inference_steps: int) -> None:
    """Compute the pipeline's sigma schedule for ``num_inference_steps`` from its scheduler config, so settings
    the scheduler rejects (e.g. 1 step with ``shift_terminal``) fail at start-up, not in the first rollout."""
    from verl_omni.schedulers.flow_match_sde import flow_match_sigmas

    path = os.path.join(model_path, "scheduler", "scheduler_config.json")
    if not os.path.exists(path):
        return
    with open(path) as f:
        config = json.load(f)
    flow_match_sigmas(config, num_inference_steps, image_seq_len=256)
