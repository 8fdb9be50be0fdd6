"""``actor_rollout_ref.model``: which pipeline, from where, with which LoRA."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Union

from verl_omni.config.base import Section, freeze_list, require_choice, require_int, require_number
from verl_omni.core.names import PIPELINE_NAMES
from verl_omni.models.lora import DEFAULT_TARGET_MODULES, LoRASpec

# ModelConfig's speed switches for forwards without a gradient (true or false each)
ROLLOUT_KERNEL_SWITCHES = (
    "gelu_epilogue",
    "qk_norm_rope_kernel",
    "qk_kernel_adds_lora",
    "fuse_qkv_projections",
    "project_joint_attention_output",
    "inductor_multi_kernel",
)


@dataclass
class ModelConfig(Section):
    _prefix = "actor_rollout_ref.model"

    # A diffusers pipeline directory; "tiny:qwen_image" / "tiny:sd3" build a tiny random model locally.
    path: Optional[str] = None
    pipeline: str = "qwen_image"
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
    # The feed-forwards' tanh GELU inside the first projection's GEMM (cuBLASLt epilogue) in every forward without
    # a gradient on CUDA: the rollout, in either engine. Training forwards and CPU keep diffusers' two steps
    # (models/gelu_epilogue.py; measured in docs/performance.md).
    gelu_epilogue: bool = True
    # The vllm-omni engine's attention: q/k RMSNorm + RoPE + the joint [text, image] cat as one Triton kernel in
    # forwards without a gradient (models/qk_norm_rope.py). Only where the engine serves FA3 (the diffusers engine
    # keeps diffusers' attention). Measured in docs/performance.md.
    qk_norm_rope_kernel: bool = True
    # With the q/k kernel (ignored without it): a plain LoRA's product on the q/k projections is added inside the
    # kernel, rounded as peft adds it (the same numbers), so the sum is never written to memory.
    qk_kernel_adds_lora: bool = True
    # The vllm-omni engine's attention, forwards without a gradient: each stream's q, k, v projections (and their
    # adapters' lora_A) as one matmul over stacked weights (models/lora.fused_projections), so each stream's input
    # is read once. Equal within bf16 rounding (a wider GEMM may tile differently). Off: it gains nothing on top of
    # qk_kernel_adds_lora (docs/performance.md).
    fuse_qkv_projections: bool = False
    # The vllm-omni engine's attention, forwards without a gradient: to_out over every row of the joint [text, image]
    # attention output, the text rows then dropped, instead of copying the image rows out first (a GEMM cannot read
    # them in place: they are not evenly strided across the batch). Costs to_out FLOPs on the text rows and saves
    # more (docs/performance.md).
    project_joint_attention_output: bool = True
    # The vllm-omni engine's compiled transformer, rollout graphs only: inductor's multi-kernel reductions
    # (triton.multi_kernel=1), which also build a one-pass (persistent) kernel for reductions up to 16384 wide and
    # keep the one measured faster when the graph compiles. Inductor's default one-pass limit is 1024, so the
    # 3072-wide LayerNorm + modulation otherwise reads its input three times. The hybrid engine's actor keeps
    # inductor's defaults; these graphs skip the FX graph cache (rollout/engines/vllm_omni/worker.py says why), so
    # they compile afresh at each engine start.
    inductor_multi_kernel: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "target_modules", freeze_list(self.target_modules))
        if isinstance(self.path, os.PathLike):
            object.__setattr__(self, "path", os.fspath(self.path))
        if not self.path:
            raise ValueError(
                f"{self.key('path')} must be set (a diffusers pipeline dir, or tiny:qwen_image / tiny:sd3 / tiny:flux)"
            )
        require_choice(self.key("pipeline"), self.pipeline, PIPELINE_NAMES)
        if self.path.startswith("tiny:"):
            family = self.path.split(":", 1)[1]
            allowed = ", ".join(f"tiny:{name}" for name in PIPELINE_NAMES)
            if family not in PIPELINE_NAMES:
                raise ValueError(f"{self.key('path')}={self.path!r}: no tiny model of that family; allowed: {allowed}")
            if family != self.pipeline:
                raise ValueError(
                    f"{self.key('path')}={self.path!r} is a {family} model but {self.key('pipeline')}="
                    f"{self.pipeline!r}: set {self.key('pipeline')}={family} (allowed pipelines: "
                    f"{', '.join(PIPELINE_NAMES)}; tiny models: {allowed})"
                )
        require_int(self.key("lora_rank"), self.lora_rank, minimum=0)  # 0: no adapter (rollout-only engines)
        if self.lora_rank:
            require_number(self.key("lora_alpha"), self.lora_alpha, 0, strict=True)
        if self.enable_gradient_checkpointing not in (None, True, False):
            raise ValueError(
                f"{self.key('enable_gradient_checkpointing')}={self.enable_gradient_checkpointing!r} "
                "must be true, false or null (null: on for GPU actors)"
            )
        for name in ROLLOUT_KERNEL_SWITCHES:
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{self.key(name)}={getattr(self, name)!r} must be true or false")
        blocks = self.gradient_checkpointing_blocks
        if blocks is not None and blocks != "auto":
            if isinstance(blocks, bool) or not isinstance(blocks, int) or blocks < 0:
                raise ValueError(
                    f"{self.key('gradient_checkpointing_blocks')}={blocks!r} must be an int >= 0, auto or null "
                    "(null: every block)"
                )

    @property
    def lora(self) -> Optional[LoRASpec]:
        if not self.lora_rank:
            return None
        return LoRASpec(rank=self.lora_rank, alpha=float(self.lora_alpha), target_modules=tuple(self.target_modules))

    @property
    def rollout_kernel_switches(self) -> dict[str, bool]:
        """The ``ROLLOUT_KERNEL_SWITCHES`` by name (what the vllm-omni engine hands its worker)."""
        return {name: getattr(self, name) for name in ROLLOUT_KERNEL_SWITCHES}
