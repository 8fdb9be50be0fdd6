"""Ship a trained adapter: a diffusers LoRA file, or a pipeline directory with the adapter merged into the weights;
a full fine-tuning run's checkpoint (``lora_rank=0``): a pipeline directory with its transformer weights.

``export_lora`` writes ``<out>/pytorch_lora_weights.safetensors`` in diffusers' layout (``transformer.``-prefixed
peft names, the adapter's rank / alpha / target modules in the file's metadata), so
``pipe.load_lora_weights(out)`` works on the base pipeline. ``export_merged`` writes a whole pipeline directory whose
transformer holds base + adapter (``DiffusionPipeline.from_pretrained(out)`` needs no peft). Both read the adapter
from one of our checkpoints (``trainer/checkpoint.py``), verified by its checksums before anything is written.

A two-expert adapter (Wan2.2-T2V-A14B: tensors named ``transformer.*`` and ``transformer_2.*``) is written as one file
per expert, as diffusers' ``WanLoraLoaderMixin`` loads it: ``pytorch_lora_weights.safetensors`` for the high-noise
``transformer`` (``pipe.load_lora_weights(out)``) and ``pytorch_lora_weights_transformer_2.safetensors`` for the
low-noise expert (``pipe.load_lora_weights(out, weight_name=..., load_into_transformer_2=True)``); the merged
directory holds both experts fused.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from typing import Optional

import torch

from verl_omni.core.checksum import tensors_checksum
from verl_omni.trainer.checkpoint import (
    META_FILE,
    DamagedCheckpointError,
    _sha256,
    find_latest_checkpoint,
    read_checkpoint,
)

EMA_FILE = "ema.safetensors"  # written beside lora.safetensors by runs with actor_rollout_ref.actor.ema.enable
WEIGHTS_CHOICES = ("lora", "ema")
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
# the low-noise expert's file of a two-expert adapter (WanLoraLoaderMixin: load_into_transformer_2=True)
LORA_WEIGHT_NAME_2 = "pytorch_lora_weights_transformer_2.safetensors"
EXPERT_FILES = {"transformer": LORA_WEIGHT_NAME, "transformer_2": LORA_WEIGHT_NAME_2}
EXPORT_INFO = "verl_omni_export.json"


@dataclass
class TrainedAdapter:
    """An adapter read from a checkpoint: peft state-dict tensors and what it takes to rebuild its config."""

    checkpoint: str
    step: int
    weights: str  # "lora" (the trained adapter) or "ema" (the policy EMA)
    tensors: dict[str, torch.Tensor]
    rank: int
    alpha: float
    target_modules: list[str]
    checksum: str  # tensors_checksum of ``tensors``: the same figure the engines report for the adapter they serve

    def info(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "tensors"}


def resolve_base(path: str) -> str:
    """A pipeline directory, or ``tiny:<family>`` (that family's tiny random model, built locally)."""
    from verl_omni.pipelines.tiny import resolve_model_path

    return resolve_model_path(path)


def resolve_checkpoint_dir(path: str) -> str:
    """``path`` itself when it is a ``global_step_<k>`` directory, else the newest one a run directory names."""
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.exists(os.path.join(path, META_FILE)):
        return path
    latest = find_latest_checkpoint(path) if os.path.isdir(path) else None
    if latest is None:
        raise FileNotFoundError(
            f"--checkpoint {path} is neither a checkpoint directory (global_step_<k>/ with {META_FILE}) nor a run "
            "directory with a latest_checkpointed_iteration.txt (trainer.default_local_dir)"
        )
    return latest


def read_adapter(
    checkpoint: str, weights: str = "lora", alpha: Optional[float] = None, target_modules: Optional[list[str]] = None
) -> TrainedAdapter:
    """The adapter of ``checkpoint`` (a ``global_step_<k>`` dir or a run dir: its newest), verified.

    ``weights='ema'`` reads the policy EMA the run saved beside the adapter. The rank is read from the tensors'
    shapes; alpha and the target modules from the checkpoint's meta (``lora``) when it records them, else from the
    arguments (the run's ``actor_rollout_ref.model.lora_alpha`` / ``target_modules``)."""
    if weights not in WEIGHTS_CHOICES:
        raise ValueError(f"--weights={weights!r} is not one of {list(WEIGHTS_CHOICES)}")
    path = resolve_checkpoint_dir(checkpoint)
    loaded = read_checkpoint(path)  # verifies every checksummed file, raises DamagedCheckpointError
    if weights == "lora":
        tensors = loaded.lora
    else:  # checkpoint readers that know the EMA return it verified (Checkpoint.ema); else it is read here
        ema = getattr(loaded, "ema", None)
        tensors = ema["lora"] if ema is not None else _read_ema(path, loaded.meta)
    recorded = loaded.meta.get("lora") or {}
    if recorded.get("rank") == 0:  # full fine-tuning (lora_rank=0): the transformer's own weights, by name
        return TrainedAdapter(path, loaded.step, weights, tensors, 0, 0.0, [], tensors_checksum(tensors))
    alpha = recorded.get("alpha", alpha)
    if alpha is None:
        raise ValueError(
            f"{path}/{META_FILE} does not record the adapter's alpha: pass --lora-alpha (the run's "
            "actor_rollout_ref.model.lora_alpha; the trainer's default is 16.0)"
        )
    targets = recorded.get("target_modules") or target_modules or _target_modules_of(tensors)
    return TrainedAdapter(
        checkpoint=path,
        step=loaded.step,
        weights=weights,
        tensors=tensors,
        rank=_rank_of(tensors),
        alpha=float(alpha),
        target_modules=list(targets),
        checksum=tensors_checksum(tensors),
    )


def _read_ema(path: str, meta: dict) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    file = os.path.join(path, EMA_FILE)
    if not os.path.isfile(file):
        raise FileNotFoundError(
            f"{path} holds no policy EMA ({EMA_FILE}; saved only with actor_rollout_ref.actor.ema.enable=true): "
            "use --weights lora"
        )
    expected = (meta.get("files") or {}).get(EMA_FILE)
    if expected is None or _sha256(file) != expected:
        raise DamagedCheckpointError(path, EMA_FILE, f"sha256 does not match the one recorded in {META_FILE}")
    return load_file(file)


def _rank_of(tensors: dict[str, torch.Tensor]) -> int:
    ranks = {int(v.shape[0]) for k, v in tensors.items() if "lora_A" in k}
    if len(ranks) != 1:
        raise ValueError(f"the adapter's lora_A tensors disagree on the rank: {sorted(ranks)}")
    return ranks.pop()


def _target_modules_of(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Module-name suffixes the adapter wraps, read from its tensor names (``...attn.to_q.lora_A.weight``)."""
    from verl_omni.models.lora import DEFAULT_TARGET_MODULES

    names = {k.rsplit(".lora_", 1)[0] for k in tensors if ".lora_" in k}
    found = [t for t in DEFAULT_TARGET_MODULES if any(n == t or n.endswith("." + t) for n in names)]
    return found or sorted({n.rsplit(".", 1)[-1] for n in names})


def pipeline_class_of(base: str):
    """The diffusers pipeline class named by ``<base>/model_index.json`` (its LoRA loader saves the file)."""
    import diffusers

    index = os.path.join(base, "model_index.json")
    if not os.path.isfile(index):
        raise FileNotFoundError(f"--base {base} is not a diffusers pipeline directory (no model_index.json)")
    with open(index) as f:
        name = json.load(f).get("_class_name")
    cls = getattr(diffusers, str(name), None)
    if cls is None or not hasattr(cls, "save_lora_weights"):
        raise ValueError(f"{index}: _class_name={name!r} is not a diffusers pipeline with a LoRA loader")
    return cls


def _has_component(base: str, name: str) -> bool:
    """Whether ``<base>/model_index.json`` declares component ``name`` (an entry that is not ``[null, null]``)."""
    with open(os.path.join(base, "model_index.json")) as f:
        entry = json.load(f).get(name)
    return isinstance(entry, list) and any(part is not None for part in entry)


def diffusers_lora_metadata(adapter: TrainedAdapter) -> dict:
    """The peft config diffusers rebuilds the adapter from (``transformer_lora_adapter_metadata``): all of
    ``LoraConfig``'s fields, as diffusers' own training scripts save them."""
    from peft import LoraConfig

    config = LoraConfig(r=adapter.rank, lora_alpha=adapter.alpha, target_modules=list(adapter.target_modules))
    return config.to_dict()


def expert_tensors(adapter: TrainedAdapter) -> dict[str, dict[str, torch.Tensor]]:
    """The adapter's tensors per denoiser, under the names diffusers' file holds for one transformer: a one-transformer
    adapter as it is (``{"transformer": tensors}``), a two-expert one split by its ``transformer.`` /
    ``transformer_2.`` prefixes."""
    if not any(k.startswith("transformer_2.") for k in adapter.tensors):
        return {"transformer": dict(adapter.tensors)}
    split: dict[str, dict[str, torch.Tensor]] = {name: {} for name in EXPERT_FILES}
    for key, value in adapter.tensors.items():
        expert, _, rest = key.partition(".")
        if expert not in split or not rest:
            raise ValueError(
                f"{adapter.checkpoint} holds a two-expert adapter whose tensor {key!r} names neither expert "
                f"(allowed prefixes: {[e + '.' for e in EXPERT_FILES]})"
            )
        split[expert][rest] = value
    return split


def export_lora(adapter: TrainedAdapter, base: str, out: str) -> str:
    """Write the adapter as ``<out>/pytorch_lora_weights.safetensors`` for ``pipe.load_lora_weights(out)``; a
    two-expert adapter as one file per expert (the module doc). Returns the (first) file written."""
    experts = expert_tensors(adapter)
    pipeline_class = pipeline_class_of(base)
    if len(experts) > 1 and not _has_component(base, "transformer_2"):
        raise ValueError(
            f"{adapter.checkpoint} holds a two-expert adapter but --base {base} has no transformer_2 "
            "(model_index.json): pass the two-expert pipeline the run trained on (Wan2.2-T2V-A14B)"
        )
    os.makedirs(out, exist_ok=True)
    for expert, tensors in experts.items():
        pipeline_class.save_lora_weights(
            out,
            transformer_lora_layers={k: v.contiguous() for k, v in tensors.items()},
            weight_name=EXPERT_FILES[expert],
            transformer_lora_adapter_metadata=diffusers_lora_metadata(adapter),
        )
    _write_info(out, adapter, base, merged=False)
    return os.path.join(out, LORA_WEIGHT_NAME)


def load_exported_lora(pipe, out: str, adapter_name: Optional[str] = None) -> list[str]:
    """Load what :func:`export_lora` wrote in ``out`` into ``pipe`` (every expert's file it finds), as a user would
    with diffusers; returns the components loaded."""
    loaded = []
    for expert, weight_name in EXPERT_FILES.items():
        if not os.path.isfile(os.path.join(out, weight_name)):
            continue
        into_2 = {"load_into_transformer_2": True} if expert == "transformer_2" else {}
        pipe.load_lora_weights(out, weight_name=weight_name, adapter_name=adapter_name, **into_2)
        loaded.append(expert)
    return loaded


def export_merged(adapter: TrainedAdapter, base: str, out: str) -> str:
    """Write a pipeline directory whose transformer weights (both experts' for a two-expert adapter) are base +
    adapter (fused, peft layers removed)."""
    import tempfile

    pipe = pipeline_class_of(base).from_pretrained(base, torch_dtype=_base_dtype(base))
    with tempfile.TemporaryDirectory() as tmp:
        export_lora(adapter, base, tmp)
        components = load_exported_lora(pipe, tmp, adapter_name="verl_omni")
    pipe.fuse_lora(components=components, lora_scale=1.0)
    pipe.unload_lora_weights()  # keeps the fused weights, drops the adapter modules
    pipe.save_pretrained(out)
    _write_info(out, adapter, base, merged=True)
    return out


def export_full_weights(adapter: TrainedAdapter, base: str, out: str) -> str:
    """Write a pipeline directory whose transformer holds a full fine-tuning run's weights (``adapter.rank == 0``),
    every other component the base's, saved in the base's precision (``from_pretrained(out)`` loads it)."""
    pipe = pipeline_class_of(base).from_pretrained(base, torch_dtype=_base_dtype(base))
    transformer = pipe.transformer
    expected = set(transformer.state_dict())
    if set(adapter.tensors) != expected:
        missing, unexpected = sorted(expected - set(adapter.tensors)), sorted(set(adapter.tensors) - expected)
        raise ValueError(
            f"{adapter.checkpoint} holds full weights that do not match --base {base}'s transformer: missing "
            f"{missing[:5]}, unexpected {unexpected[:5]}"
        )
    dtype = transformer.dtype
    transformer.load_state_dict({k: v.to(dtype) for k, v in adapter.tensors.items()}, strict=True)
    pipe.save_pretrained(out)
    _write_info(out, adapter, base, merged=True)
    return out


def _base_dtype(base: str) -> torch.dtype:
    """The transformer's stored dtype, so the merged copy is saved in the base's precision."""
    from safetensors import safe_open

    folder = os.path.join(base, "transformer")
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(folder, name), "pt") as f:
                return f.get_tensor(next(iter(f.keys()))).dtype
    return torch.float32


def _write_info(out: str, adapter: TrainedAdapter, base: str, merged: bool) -> None:
    with open(os.path.join(out, EXPORT_INFO), "w") as f:
        json.dump({**adapter.info(), "base": os.path.abspath(base), "merged": merged}, f, indent=2)
