"""What crosses between the server-side engine and vllm-omni's worker: the request's extra args and the output.

Imports nothing from ``vllm_omni``: the worker passes its ``DiffusionOutput`` class in, and the engine receives
plain ``OmniRequestOutput`` objects.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import numpy as np
import torch

from verl_omni.config.sampling import DiffusionSamplingParams
from verl_omni.core.conditioning import FIELDS as CONDITIONING_FIELDS
from verl_omni.core.outputs import PER_SAMPLE_FIELDS, SHARED_FIELDS, RLBatchOutput
from verl_omni.core.workarounds import dummy_run_sampling

PIPELINE_CLASS = "verl_omni.rollout.engines.vllm_omni.worker.VllmOmniRLPipeline"
WORKER_EXTENSION_CLASS = "verl_omni.rollout.engines.vllm_omni.worker.VllmOmniRLWorkerExtension"
# A model class name vllm-omni does not know, so it applies no Qwen-Image specific pre/post-processing to our
# output (its Qwen post-process expects [-1, 1] NCHW floats).
MODEL_CLASS_NAME = "VerlOmniRLPipeline"
EXTRA_KEY = "verl_omni"  # key in custom_pipeline_args, extra_args and custom_output
SHARED_ROWS_KEY = "shared_rows"  # custom_output fields sent as one row for all samples of the request
ROW_PROMPTS_KEY = "prompts"  # extra_args: one prompt per row (a request of several prompts)
# Fields that travel in DiffusionOutput's own trajectory slots rather than in custom_output.
_TRAJECTORY = {
    "latents": "trajectory_latents",
    "log_probs": "trajectory_log_probs",
    "timesteps": "trajectory_timesteps",
}


ACTOR_ERROR_FILE = "error.pt"  # beside an actor call's result: the exception the worker's rank raised


def actor_error(exc: BaseException, traceback_text: str) -> dict[str, str]:
    """What the worker writes to ``ACTOR_ERROR_FILE`` when its actor rank raises: vllm-omni's ``collective_rpc``
    logs a worker's exception but need not raise it in the caller."""
    return {"type": type(exc).__name__, "message": str(exc), "traceback": traceback_text}


def actor_call_failed(verb: str, error: dict[str, str]) -> RuntimeError:
    """The engine's exception for an actor call the worker's rank failed: the rank's own exception and traceback,
    with what to change when the GPU ran out of memory."""
    text = f"{error['type']}: {error['message']}"
    hint = ""
    if "out of memory" in text.lower():
        hint = (
            " The GPU ran out of memory in the update or around it: lower actor_rollout_ref.actor."
            "ppo_micro_batch_size_per_gpu or actor_rollout_ref.rollout.gpu_memory_utilization, or checkpoint "
            "more blocks (actor_rollout_ref.model.gradient_checkpointing_blocks)."
        )
    return RuntimeError(
        f"the actor rank in vllm-omni's worker failed in {verb!r}: {text}.{hint}\nThe rank's traceback:\n"
        f"{error['traceback']}"
    )


def plain(value: Any) -> Any:
    """Tuples -> lists, recursively (the request crosses process boundaries; keep it JSON-like)."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


# ------------------------------------------------------------------------------------------ request
def request_extra(
    seeds: Sequence[int], params: DiffusionSamplingParams, prompts: Optional[Sequence[str]] = None
) -> dict[str, Any]:
    """Our part of a request, for ``OmniDiffusionSamplingParams.extra_args[EXTRA_KEY]``; ``prompts``: one per seed
    when the rows have prompts of their own (``generate_rows``), else the request's prompt serves every row."""
    extra = {"seeds": [int(s) for s in seeds], "params": plain(params.to_dict())}
    if prompts is not None:
        extra[ROW_PROMPTS_KEY] = [str(p) for p in prompts]
    return extra


def row_prompts(req: Any) -> Optional[list[str]]:
    """The per-row prompts of a request the worker received (None: its one prompt serves every row)."""
    extra = (getattr(req.sampling_params, "extra_args", None) or {}).get(EXTRA_KEY) or {}
    rows = extra.get(ROW_PROMPTS_KEY)
    return None if rows is None else [str(p) for p in rows]


def decode_request(req: Any) -> tuple[str, list[int], DiffusionSamplingParams]:
    """(prompt, seeds, params) of a request the worker received."""
    prompt = req.prompt
    if isinstance(prompt, dict):
        prompt = prompt.get("prompt", "")
    sp = req.sampling_params
    extra = (getattr(sp, "extra_args", None) or {}).get(EXTRA_KEY)
    if extra is not None:
        return str(prompt), [int(s) for s in extra["seeds"]], DiffusionSamplingParams.from_dict(extra["params"])
    # A request that did not come from VllmOmniEngine: vllm-omni's start-up dummy run (core/workarounds.py).
    seeds, fields = dummy_run_sampling(sp)
    return str(prompt), seeds, DiffusionSamplingParams(**fields)


# ------------------------------------------------------------------------------------------ output
def to_diffusion_output(part: RLBatchOutput, output_cls: Any, model_class_name: str, one_prompt: bool = True) -> Any:
    """One request's share of an ``rl_generate`` result (one rollout record) as vllm-omni's ``DiffusionOutput``.

    The prompt embeddings of a request of ``one_prompt`` are the same row repeated, so one row is sent and
    :func:`request_output_to_batch` repeats it (B copies of [L, D] would cross two process hops); a request whose
    rows have prompts of their own sends every row of those, and one of its negative prompt's (one per request).
    Images travel in ``output`` as uint8 [B, H, W, 3]; videos (and images under a model class vllm-omni
    post-processes) travel exactly in ``custom_output`` with their frame axis.
    """
    extra: dict[str, Any] = {
        "seeds": list(part.seeds),
        "truncated_prompt_tokens": part.truncated_prompt_tokens,
        "sampling": part.sampling,
        SHARED_ROWS_KEY: [],
    }
    for name in PER_SAMPLE_FIELDS + SHARED_FIELDS:
        if name == "media" or name in _TRAJECTORY:
            continue
        value = getattr(part, name)
        if name in CONDITIONING_FIELDS and value is not None and (one_prompt or name.startswith("negative_")):
            value = value[:1].clone()
            extra[SHARED_ROWS_KEY].append(name)
        extra[name] = value
    images = part.media[:, 0]  # the first frames: what vllm-omni's own output slot holds
    if part.num_frames != 1:
        extra["media"] = part.media
    if model_class_name != MODEL_CLASS_NAME:
        # vllm-omni applies its model's post-process (VaeImageProcessor.postprocess) to ``output``:
        # give it [-1, 1] NCHW floats and carry our exact uint8 media in custom_output.
        extra["media"] = part.media
        images = images.permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return output_cls(
        output=images,
        **{slot: getattr(part, name) for name, slot in _TRAJECTORY.items()},
        custom_output={EXTRA_KEY: extra},
    )


def _images_to_uint8(images: Any) -> torch.Tensor:
    """OmniRequestOutput.images -> uint8 [B, H, W, 3]: a [B,H,W,3] tensor, a list of them, or PIL images."""
    if isinstance(images, torch.Tensor):
        images = [images]
    tensors = []
    for img in images:
        if isinstance(img, torch.Tensor):
            t = img.detach().to("cpu")
        else:  # PIL
            t = torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.uint8).copy())
        if t.dtype != torch.uint8:
            raise ValueError(f"expected uint8 images from the RL pipeline, got {t.dtype}")
        tensors.append(t if t.ndim == 4 else t.unsqueeze(0))
    if not tensors:
        raise ValueError("vllm-omni returned no images")
    return torch.cat(tensors, dim=0)


def request_output_to_batch(out: Any, seeds: Sequence[int]) -> RLBatchOutput:
    """Our rollout record from one vllm-omni ``OmniRequestOutput`` produced by VllmOmniRLPipeline."""
    custom = getattr(out, "custom_output", None) or getattr(out, "_custom_output", None) or {}
    extra = custom.get(EXTRA_KEY)
    if extra is None:
        raise RuntimeError(
            "vllm-omni output has no verl_omni payload in custom_output: was the engine started with "
            f"custom_pipeline_args.pipeline_class={PIPELINE_CLASS}?"
        )
    media = extra.get("media")
    media = media.detach().to("cpu") if media is not None else _images_to_uint8(out.images)
    fields: dict[str, Any] = {k: v for k, v in extra.items() if k not in ("media", "seeds", SHARED_ROWS_KEY)}
    for name in extra.get(SHARED_ROWS_KEY, ()):  # one row sent for the whole request: repeat it per sample
        fields[name] = fields[name].expand(len(seeds), *fields[name].shape[1:]).clone()
    for name, slot in _TRAJECTORY.items():
        fields[name] = getattr(out, slot)
        if fields[name] is None:
            raise RuntimeError(f"vllm-omni output lacks trajectory field for {name}")
    returned_seeds = [int(s) for s in extra.get("seeds", [])]
    if returned_seeds != [int(s) for s in seeds]:
        raise RuntimeError(f"engine returned seeds {returned_seeds}, asked for {list(seeds)}")
    batch = RLBatchOutput(media=media, seeds=returned_seeds, **fields)
    if batch.batch_size != len(seeds) or batch.log_probs.shape[0] != len(seeds):
        raise RuntimeError(
            f"engine returned {batch.batch_size} samples / {batch.log_probs.shape[0]} log-prob rows "
            f"for {len(seeds)} seeds"
        )
    return batch
