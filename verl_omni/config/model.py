"""``actor_rollout_ref.model``: which model family, from where, with which LoRA, and each family's own options.

The section's fields are the generic ones plus one ``actor_rollout_ref.model.<family>`` sub-section per registered
family that declares options (its ``ModelFamily.options_class``), so the YAML carries every family's defaults and a
typo under any of them is refused by its dotted key. The class is assembled from the family registry
(``model_config_class``): adding a family adds its section without touching this file."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, make_dataclass
from typing import Optional, Union

from verl_omni.config.base import Section, build, freeze_list, require_bool, require_int, require_number
from verl_omni.models.lora import DEFAULT_TARGET_MODULES, LoRASpec
from verl_omni.pipelines.registry import (
    AUTO,
    TINY_PREFIX,
    family_for_model_dir,
    family_names,
    get_family,
    registered_families,
    tiny_model,
    tiny_model_names,
)

# ModelConfig's speed switches for forwards without a gradient (true or false each), for every family
ROLLOUT_KERNEL_SWITCHES = ("gelu_epilogue", "inductor_multi_kernel")


@dataclass
class ModelConfigBase(Section):
    _prefix = "actor_rollout_ref.model"

    # A diffusers pipeline directory; "tiny:<family>" builds that family's tiny random model locally.
    path: Optional[str] = None
    # The model family (a registered one, verl_omni/pipelines/<family>/); auto: the one serving model_index.json's
    # _class_name in the model directory (tiny:<family> paths: that family).
    pipeline: Optional[str] = AUTO
    lora_rank: int = 8
    lora_alpha: float = 16.0
    target_modules: tuple[str, ...] = DEFAULT_TARGET_MODULES
    # Recompute each transformer block in the backward pass instead of keeping its activations
    # (what lets micro-batch 4 fit at the real size). None: on when the actor trains on a GPU.
    enable_gradient_checkpointing: Optional[bool] = None
    # With checkpointing on: how many transformer blocks recompute (the first k, as Megatron's recompute_method=
    # block with recompute_num_layers=k); the others keep their activations, which trades memory for the
    # recomputation's forward. None: every block. "auto": as few as the GPU's memory allows, measured
    # (workers/activation_memory.py; every block off a GPU).
    gradient_checkpointing_blocks: Optional[Union[int, str]] = "auto"
    # With "auto" on a GPU: the share of the card (every process's use, as nvidia-smi shows it) up to which the
    # update keeps blocks' activations; the rest of the card is left free (the caching allocator's fragmentation,
    # the engine's wake-up). Lower: a lower peak and more recomputation.
    gradient_checkpointing_memory_utilization: float = 0.92
    # The feed-forwards' tanh GELU inside the first projection's GEMM (cuBLASLt epilogue) in every forward without
    # a gradient on CUDA: the rollout, in either engine. Training forwards and CPU keep diffusers' two steps
    # (models/gelu_epilogue.py; measured in docs/performance.md).
    gelu_epilogue: bool = True
    # The vllm-omni engine's compiled transformer, rollout graphs only: inductor's multi-kernel reductions
    # (triton.multi_kernel=1), which also build a one-pass (persistent) kernel for reductions up to 16384 wide and
    # keep the one measured faster when the graph compiles. Inductor's default one-pass limit is 1024, so the
    # 3072-wide LayerNorm + modulation otherwise reads its input three times. The hybrid engine's actor keeps
    # inductor's defaults; these graphs skip the FX graph cache (rollout/engines/vllm_omni/worker.py says why), so
    # they compile afresh at each engine start.
    inductor_multi_kernel: bool = True
    # The hybrid engine: every text encoder of the engine's pipeline in host memory during the actor's update (the
    # update reads the prompt embeddings its batch carries) and back before the next rollout, so the update's
    # activations can use that memory (workers/text_encoder_offload.py). auto: on where the actor rank trains on a GPU.
    text_encoder_offload: Union[bool, str] = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "target_modules", freeze_list(self.target_modules))
        if isinstance(self.path, os.PathLike):
            object.__setattr__(self, "path", os.fspath(self.path))
        if not self.path:
            raise ValueError(f"{self.key('path')} must be set (a diffusers pipeline dir, or tiny:<family>)")
        self._resolve_family()
        self._build_family_options()
        require_int(self.key("lora_rank"), self.lora_rank, minimum=0)  # 0: no adapter (rollout-only engines)
        if self.lora_rank:
            require_number(self.key("lora_alpha"), self.lora_alpha, 0, strict=True)
        if self.enable_gradient_checkpointing not in (None, True, False):
            raise ValueError(
                f"{self.key('enable_gradient_checkpointing')}={self.enable_gradient_checkpointing!r} "
                "must be true, false or null (null: on for GPU actors)"
            )
        for name in ROLLOUT_KERNEL_SWITCHES:
            require_bool(self.key(name), getattr(self, name))
        if self.text_encoder_offload not in (True, False, "auto"):
            raise ValueError(
                f"{self.key('text_encoder_offload')}={self.text_encoder_offload!r} must be true, false or auto "
                "(auto: on where the hybrid engine's actor trains on a GPU)"
            )
        utilization = self.gradient_checkpointing_memory_utilization
        if isinstance(utilization, bool) or not (isinstance(utilization, (int, float)) and 0 < utilization <= 1):
            raise ValueError(
                f"{self.key('gradient_checkpointing_memory_utilization')}={utilization!r} must be in (0, 1] (the "
                "share of the GPU that gradient_checkpointing_blocks=auto may fill)"
            )
        blocks = self.gradient_checkpointing_blocks
        if blocks is not None and blocks != "auto":
            if isinstance(blocks, bool) or not isinstance(blocks, int) or blocks < 0:
                raise ValueError(
                    f"{self.key('gradient_checkpointing_blocks')}={blocks!r} must be an int >= 0, auto or null "
                    "(null: every block)"
                )

    def _resolve_family(self) -> None:
        """``pipeline``: a registered family, or auto / null (then the one serving the model directory)."""
        names = family_names()
        if self.pipeline not in (None, AUTO):
            get_family(self.pipeline, key=self.key("pipeline"))  # an unknown name lists the registered ones
        if self.path.startswith(TINY_PREFIX):
            tiny = self.path[len(TINY_PREFIX) :]
            allowed = ", ".join(f"{TINY_PREFIX}{name}" for name in tiny_model_names())
            if tiny not in tiny_model_names():
                raise ValueError(f"{self.key('path')}={self.path!r}: no tiny model of that name; allowed: {allowed}")
            family = tiny_model(tiny)[0].name
            if self.pipeline not in (None, AUTO, family):
                raise ValueError(
                    f"{self.key('path')}={self.path!r} is a {family} model but {self.key('pipeline')}="
                    f"{self.pipeline!r}: set {self.key('pipeline')}={family} or {AUTO} (allowed pipelines: "
                    f"{', '.join(names)}, {AUTO}; tiny models: {allowed})"
                )
        if self.pipeline in (None, AUTO):
            family = family_for_model_dir(os.path.expanduser(self.path), key=self.key("pipeline"))
            object.__setattr__(self, "pipeline", family)

    def _build_family_options(self) -> None:
        """Each family's options section from a plain dict too (``ModelConfig(path=..., <family>={...})``)."""
        for name, options_class in family_options_classes().items():
            value = getattr(self, name, None)
            if isinstance(value, dict):
                object.__setattr__(self, name, build(options_class, value, self.key(name)))

    @property
    def family_options(self) -> Optional[Section]:
        """The chosen family's own options section (``actor_rollout_ref.model.<pipeline>``), None if it has none."""
        return getattr(self, self.pipeline, None) if self.pipeline in family_options_classes() else None

    @property
    def lora(self) -> Optional[LoRASpec]:
        if not self.lora_rank:
            return None
        return LoRASpec(rank=self.lora_rank, alpha=float(self.lora_alpha), target_modules=tuple(self.target_modules))

    @property
    def rollout_kernel_switches(self) -> dict[str, bool]:
        """The ``ROLLOUT_KERNEL_SWITCHES`` by name (what the vllm-omni engine hands its worker)."""
        return {name: getattr(self, name) for name in ROLLOUT_KERNEL_SWITCHES}


def family_options_classes() -> dict[str, type]:
    """The registered families that declare options: name -> options section class."""
    return {n: f.options_class for n, f in sorted(registered_families().items()) if f.options_class is not None}


_classes: dict[tuple, type] = {}


def model_config_class() -> type[ModelConfigBase]:
    """The ``actor_rollout_ref.model`` section's dataclass for the families registered now: the generic fields plus
    one ``actor_rollout_ref.model.<family>`` sub-section per family with options (one class per registry state)."""
    options = family_options_classes()
    clash = sorted(set(options) & {f.name for f in fields(ModelConfigBase)})
    if clash:
        raise ValueError(f"model families {clash} are named like actor_rollout_ref.model keys: rename the families")
    key = tuple(options.items())
    cls = _classes.get(key)
    if cls is None:
        extra = [(name, c, field(default_factory=c)) for name, c in options.items()]
        cls = make_dataclass("ModelConfig", extra, bases=(ModelConfigBase,), namespace={"__module__": __name__})
        _classes[key] = cls
    globals()["ModelConfig"] = cls  # pickled by reference (Ray): the module attribute is the current class
    return cls


ModelConfig = model_config_class()
