"""``actor_rollout_ref.actor``: the LoRA update (FlowGRPO's clipped loss over SDE-window transitions)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from verl_omni.config.base import (
    Section,
    freeze_list,
    require_choice,
    require_device,
    require_int,
    require_number,
)
from verl_omni.config.sampling import BatchCfg, check_batch_cfg
from verl_omni.core.dtypes import DTYPES

DEFAULT_GRAD_BUCKET_MB = 256  # full fine-tuning: MiB of gradients per reduce-scatter during the backward


@dataclass
class OptimConfig(Section):
    _prefix = "actor_rollout_ref.actor.optim"

    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", freeze_list(self.betas))
        require_number(self.key("lr"), self.lr, 0)
        require_number(self.key("weight_decay"), self.weight_decay, 0)
        if len(self.betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in self.betas):
            raise ValueError(f"{self.key('betas')}={list(self.betas)!r} must be two numbers in [0, 1)")


@dataclass
class EMAConfig(Section):
    """The policy's exponential moving average (flow_grpo's ``EMAModuleWrapper``), used for validation and saved in
    checkpoints beside the trained adapter. Moves after optimizer step s when ``(s + 1) % update_interval == 0``,
    with decay ``min((1 + s) / (10 + s), decay)``."""

    _prefix = "actor_rollout_ref.actor.ema"

    enable: bool = False
    decay: float = 0.9
    update_interval: int = 8

    def __post_init__(self) -> None:
        if not isinstance(self.enable, bool):
            raise ValueError(f"{self.key('enable')}={self.enable!r} must be true or false")
        if isinstance(self.decay, bool) or not isinstance(self.decay, (int, float)) or not 0 <= self.decay < 1:
            raise ValueError(f"{self.key('decay')}={self.decay!r} must be a number in [0, 1)")
        require_int(self.key("update_interval"), self.update_interval)


@dataclass
class ActorConfig(Section):
    _prefix = "actor_rollout_ref.actor"

    # Split placement only (actor_rollout_ref.hybrid_engine=false): >1 runs the actor as FSDP ranks, one per
    # GPU. With the hybrid engine the ranks are the replicas (trainer.n_gpus_per_node x trainer.nnodes).
    world_size: int = 1
    device: str = "cpu"
    dtype: str = "float32"  # the frozen base weights' dtype (the LoRA always trains in float32)
    optim: OptimConfig = field(default_factory=OptimConfig)
    clip_ratio: float = 1e-4  # FlowGRPO's clip range
    kl_coef: float = 0.0
    adv_clip_max: Optional[float] = 5.0
    ppo_micro_batch_size_per_gpu: int = 4  # rows (samples) per forward/backward; CFG doubles the forward batch
    ppo_epochs: int = 1
    grad_clip: float = 1.0
    # Speed (each keeps the result: equivalence tests compare them with the plain path):
    # CFG's conditional and unconditional branches as one batched forward (true), two forwards (false), or auto:
    # batched unless that needs a text mask on a GPU in bf16/fp16, where SDPA's unmasked kernels are faster. true
    # is the default by measurement: two forwards halve every GEMM's rows and the update was slower (README)
    batch_cfg: BatchCfg = True
    # Regional compile of the transformer blocks for the update; None: on for cuda. False also runs the update through
    # the blocks' original forwards where the engine compiled them (vllm-omni, hybrid engine; rollouts stay compiled)
    use_torch_compile: Optional[bool] = None
    # After the first update (the warm-up), gc.freeze() the process's heap so that later full garbage collections,
    # which stalled the update by ~1 s every few steps at the real size, skip the long-lived objects
    freeze_gc_heap: bool = True
    ema: EMAConfig = field(default_factory=EMAConfig)
    # Full fine-tuning (model.lora_rank=0): the float32 master weights and AdamW state of each rank's shard in host
    # memory (pinned), stepped on the CPU; the GPU keeps the weights and their gradients (workers/full_weights.py)
    optimizer_offload: bool = False
    # Full fine-tuning: the most MiB of gradients (in the weights' dtype) one bucket gathers before the backward
    # reduce-scatters it over the ranks; about three are held at once (workers/full_weights.py)
    grad_bucket_mb: float = DEFAULT_GRAD_BUCKET_MB

    def __post_init__(self) -> None:
        require_int(self.key("world_size"), self.world_size)
        require_device(self.key("device"), self.device)
        require_choice(self.key("dtype"), self.dtype, DTYPES)
        require_number(self.key("clip_ratio"), self.clip_ratio, 0, strict=True)
        require_number(self.key("kl_coef"), self.kl_coef, 0)
        if self.adv_clip_max is not None:
            require_number(self.key("adv_clip_max"), self.adv_clip_max, 0, strict=True)
        require_int(self.key("ppo_micro_batch_size_per_gpu"), self.ppo_micro_batch_size_per_gpu)
        require_int(self.key("ppo_epochs"), self.ppo_epochs)
        require_number(self.key("grad_clip"), self.grad_clip, 0, strict=True)
        check_batch_cfg(self.key("batch_cfg"), self.batch_cfg)
        require_number(self.key("grad_bucket_mb"), self.grad_bucket_mb, 0, strict=True)
        if not isinstance(self.optimizer_offload, bool):
            raise ValueError(f"{self.key('optimizer_offload')}={self.optimizer_offload!r} must be true or false")
        if not isinstance(self.freeze_gc_heap, bool):
            raise ValueError(f"{self.key('freeze_gc_heap')}={self.freeze_gc_heap!r} must be true or false")
        if self.use_torch_compile not in (None, True, False):
            raise ValueError(
                f"{self.key('use_torch_compile')}={self.use_torch_compile!r} must be true, false or "
                "null (null: on for cuda)"
            )

    @property
    def on_cuda(self) -> bool:
        return self.device.startswith("cuda")

    @property
    def compile_blocks(self) -> bool:
        return self.on_cuda if self.use_torch_compile is None else self.use_torch_compile
