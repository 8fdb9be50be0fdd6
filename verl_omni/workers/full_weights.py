"""Full fine-tuning's optimizer: the transformer's own weights train, ZeRO-1 style over the ranks' gradient group.

Every rank keeps one copy of the weights in their dtype (bf16 on the GPU): the very tensors its engine serves. The
gradients accumulate in one flat bucket of the same dtype (every parameter's ``.grad`` is a view into it); once per
optimizer step the bucket is reduce-scattered over the ranks, each rank steps the float32 master values of its
contiguous shard with its own AdamW state (``torch.optim.AdamW`` over the shard as one flat parameter), and the new
values of every shard are all-gathered back into the bucket and copied into the weights in place. So the update
moves no model copy between actor and engine: the sync is the all-gather (``sync_s``).

``offload``: the master shard, its gradient and the AdamW state live in host memory (pinned when the weights are
on a GPU) and AdamW steps on the CPU; the device holds the weights, the gradient bucket and one shard in their dtype.

Clipping uses the global norm: each rank's shard norm squared, summed over the ranks (one all-reduce of two
numbers, which also carries the non-finite count the loss saw).
"""

from __future__ import annotations

import glob
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from verl_omni.workers.grad_sync import LoRAGradSync

logger = logging.getLogger(__name__)

OFFLOAD_KEY = "actor_rollout_ref.actor.optimizer_offload"
STATE_FORMAT = "verl_omni.full_weights_shard.v1"


class ShardedAdamW:
    """AdamW over ``params`` with the float32 master values and optimizer state sharded over ``grad_sync``'s ranks.

    Has the optimizer verbs the actor calls (``zero_grad``, ``step``, ``state_dict``, ``load_state_dict``) plus
    ``reduce_and_clip``, which comes first in every step."""

    def __init__(
        self,
        params: Sequence[torch.nn.Parameter],
        grad_sync: LoRAGradSync,
        *,
        lr: float,
        betas: tuple[float, float],
        weight_decay: float,
        offload: bool = False,
    ):
        self.params = list(params)
        dtypes = {p.dtype for p in self.params}
        if len(dtypes) != 1:
            found = sorted(map(str, dtypes))
            raise ValueError(f"full fine-tuning needs the transformer's weights in one dtype; found {found}")
        self.grad_sync, self.offload = grad_sync, offload
        self.rank, self.world_size = grad_sync.rank, grad_sync.world_size
        first = self.params[0]
        self.device, self.dtype = first.device, first.dtype
        self.numel = sum(p.numel() for p in self.params)
        self.shard_numel = math.ceil(self.numel / self.world_size)
        self.start = self.rank * self.shard_numel
        # The bucket also receives the all-gather of the new weights (then it is zeroed for the next gradients).
        self.bucket = torch.zeros(self.shard_numel * self.world_size, dtype=self.dtype, device=self.device)
        self._attach_grads()
        host = torch.device("cpu")
        master_device = host if offload else self.device
        pin = offload and self.device.type == "cuda"
        self.master = torch.nn.Parameter(
            torch.zeros(self.shard_numel, dtype=torch.float32, device=master_device, pin_memory=pin)
        )
        self.master.grad = torch.zeros(self.shard_numel, dtype=torch.float32, device=master_device, pin_memory=pin)
        self.reset_master_from_params()
        fused = {"fused": True} if master_device.type == "cuda" else {}
        self.optimizer = torch.optim.AdamW([self.master], lr=lr, betas=tuple(betas), weight_decay=weight_decay, **fused)
        self.last_sync_s = 0.0

    # ------------------------------------------------------------------ the flat layout
    def _spans(self):
        """(param, start, end) of each parameter in the flat layout."""
        offset = 0
        for p in self.params:
            yield p, offset, offset + p.numel()
            offset += p.numel()

    def _attach_grads(self) -> None:
        """Every parameter's ``.grad`` a view of its span of the bucket (autograd accumulates into it in place)."""
        for p, a, b in self._spans():
            p.grad = self.bucket[a:b].view_as(p)

    def _grads_attached(self) -> bool:
        ptr, size = self.bucket.data_ptr(), self.bucket.element_size()
        return all(p.grad is not None and p.grad.data_ptr() == ptr + a * size for p, a, _ in self._spans())

    @torch.no_grad()
    def reset_master_from_params(self) -> None:
        """The master shard from the weights' current values (after loading weights without optimizer state)."""
        end = self.start + self.shard_numel
        self.master.zero_()
        for p, a, b in self._spans():
            lo, hi = max(a, self.start), min(b, end)
            if lo < hi:
                self.master[lo - self.start : hi - self.start].copy_(p.reshape(-1)[lo - a : hi - a])

    # ------------------------------------------------------------------ the optimizer verbs
    def zero_grad(self, set_to_none: bool = False) -> None:
        """Zero the bucket; the views stay (``set_to_none`` is accepted and ignored: the bucket is the storage)."""
        if not self._grads_attached():
            self._attach_grads()
        self.bucket.zero_()
        self.master.grad.zero_()

    @torch.no_grad()
    def reduce_and_clip(self, bad: torch.Tensor, max_norm: float) -> tuple[float, float]:
        """Reduce-scatter the summed gradients (this rank's shard into the master's gradient), clip every shard by
        the global norm. Returns (global norm before clipping, the non-finite count summed over the ranks): the one
        host sync of the step."""
        if not self._grads_attached():
            raise RuntimeError("a parameter's .grad is no longer a view of the gradient bucket (set to None?)")
        shard = self.grad_sync.reduce_scatter(self.bucket)
        grad = self.master.grad
        grad.copy_(shard, non_blocking=grad.device != shard.device)
        if grad.device != shard.device and self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        stats = torch.stack([shard.float().pow(2).sum(), bad.to(self.device).float().reshape(())])
        self.grad_sync.all_reduce_(stats)
        norm_sq, bad_count = stats.tolist()
        norm = math.sqrt(norm_sq)
        # torch.nn.utils.clip_grad_norm_'s rule: scale by max_norm / (norm + 1e-6), clamped to 1
        coef = min(max_norm / (norm + 1e-6), 1.0)
        grad.mul_(coef)
        return norm, bad_count

    @torch.no_grad()
    def step(self) -> None:
        """AdamW on this rank's master shard, then every rank's new values all-gathered into the weights in place."""
        self.optimizer.step()
        start = time.perf_counter()
        new = self.master.detach().to(self.device, self.dtype, non_blocking=True)
        gathered = self.grad_sync.all_gather(self.bucket, new)
        for p, a, b in self._spans():
            p.copy_(gathered[a:b].view_as(p))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.last_sync_s = time.perf_counter() - start
        self.bucket.zero_()

    def state_dict(self) -> dict:
        """This rank's shard: its master values and AdamW state (plain tensors on the host)."""
        return {
            "format": STATE_FORMAT,
            "rank": self.rank,
            "world_size": self.world_size,
            "numel": self.numel,
            "master": self.master.detach().to("cpu", copy=True),
            "optimizer": _to_host(self.optimizer.state_dict()),
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        if not is_shard_state(state):
            raise ValueError(f"not a full-weights optimizer shard (format {STATE_FORMAT!r} expected)")
        mine = (self.rank, self.world_size, self.numel)
        theirs = (state["rank"], state["world_size"], state["numel"])
        if mine != theirs:
            raise ValueError(
                f"the optimizer shard is rank {theirs[0]} of {theirs[1]} over {theirs[2]} weights; this rank is "
                f"{mine[0]} of {mine[1]} over {mine[2]}: resume with the same number of ranks and model"
            )
        # AdamW's loaded state must be normal tensors (a worker may call under inference mode)
        with torch.inference_mode(False), torch.no_grad():
            self.master.copy_(state["master"])
            self.optimizer.load_state_dict(state["optimizer"])


def is_shard_state(state: object) -> bool:
    """Whether ``state`` is a ``ShardedAdamW.state_dict`` (one rank's shard), not a whole optimizer's."""
    return isinstance(state, dict) and state.get("format") == STATE_FORMAT


def _to_host(state):
    if isinstance(state, torch.Tensor):
        return state.detach().to("cpu", copy=True)
    if isinstance(state, dict):
        return {k: _to_host(v) for k, v in state.items()}
    if isinstance(state, list):
        return [_to_host(v) for v in state]
    return state


# ---------------------------------------------------------------------- memory planning

GiB = 1024**3


@dataclass(frozen=True)
class FullWeightsMemory:
    """Bytes per GPU (and per GPU on the host, offloaded) of full fine-tuning for one configuration."""

    num_params: int
    num_gpus: int
    offload: bool
    weights: int  # the trained weights, one copy shared by engine and actor
    grads: int  # the gradient bucket (every weight's gradient, in the weights' dtype)
    shard: int  # the reduce-scatter output / all-gather input: one shard in the weights' dtype
    master: int  # float32 master shard + its float32 gradient
    optimizer: int  # AdamW's two float32 moments of the shard
    frozen: int  # the engine's other components on the GPU (text encoders, VAE)
    copies: int  # float32 copies of every weight kept beside them (the policy EMA, DiffusionNFT's old policy)
    activations: int

    @property
    def device_total(self) -> int:
        on_device = 0 if self.offload else self.master + self.optimizer
        fixed = self.weights + self.grads + self.shard + self.frozen + self.copies
        return fixed + on_device + self.activations

    @property
    def host_total(self) -> int:
        return self.master + self.optimizer if self.offload else 0

    def describe(self) -> str:
        parts = [
            ("weights", self.weights),
            ("gradients", self.grads),
            ("gathered shard", self.shard),
            ("master shard" + (" (host)" if self.offload else ""), self.master),
            ("AdamW shard" + (" (host)" if self.offload else ""), self.optimizer),
            ("frozen components", self.frozen),
            ("policy copies", self.copies),
            ("activations", self.activations),
        ]
        items = ", ".join(f"{name} {_gib(n)}" for name, n in parts)
        return (
            f"{self.num_params / 1e9:.2f}B trained weights on {self.num_gpus} GPU(s), {OFFLOAD_KEY}="
            f"{str(self.offload).lower()}: {_gib(self.device_total)} per GPU ({items})"
        )


def _gib(n: int) -> str:
    return f"{n / GiB:.2f} GiB"


def plan_full_weights_memory(
    num_params: int,
    num_gpus: int,
    offload: bool,
    *,
    weight_bytes: int = 2,
    frozen_bytes: int = 0,
    activation_bytes: int = 0,
    policy_copies: int = 0,
) -> FullWeightsMemory:
    """The per-GPU footprint of full fine-tuning ``num_params`` weights of ``weight_bytes`` each over ``num_gpus``."""
    shard = math.ceil(num_params / num_gpus)
    return FullWeightsMemory(
        num_params=num_params,
        num_gpus=num_gpus,
        offload=offload,
        weights=num_params * weight_bytes,
        grads=shard * num_gpus * weight_bytes,
        shard=shard * weight_bytes,
        master=shard * 8,
        optimizer=shard * 8,
        frozen=frozen_bytes,
        copies=policy_copies * num_params * 4,
        activations=activation_bytes,
    )


def activation_bytes_estimate(
    num_blocks: int, hidden: int, tokens: int, rows: int, dtype_bytes: int = 2, recomputed: bool = True
) -> int:
    """A coarse estimate of one micro-batch's activations: Korthikanti et al. 2022 ("Reducing Activation
    Recomputation in Large Transformer Models") count 34·s·b·h bytes per 16-bit transformer layer with a fused
    attention kernel; with every block recomputed only each block's input (s·b·h values) stays, plus one block's
    working set. ``rows``: the forward's batch (CFG's two branches count twice)."""
    per_layer = 34 * tokens * rows * hidden * dtype_bytes // 2
    block_input = tokens * rows * hidden * dtype_bytes
    if recomputed:
        return num_blocks * block_input + per_layer
    return num_blocks * per_layer


def check_full_weights_fit(
    num_params: int,
    num_gpus: int,
    offload: bool,
    gpu_bytes: int,
    *,
    weight_bytes: int = 2,
    frozen_bytes: int = 0,
    activation_bytes: int = 0,
    policy_copies: int = 0,
    gpus_key: str = "trainer.n_gpus_per_node x trainer.nnodes",
    max_gpus: int = 1024,
) -> FullWeightsMemory:
    """The plan for this configuration, or a ``ValueError`` with its numbers and the option that would fit (the
    offload, else the fewest GPUs, with or without it)."""

    def plan(n: int, off: bool) -> FullWeightsMemory:
        return plan_full_weights_memory(
            num_params,
            n,
            off,
            weight_bytes=weight_bytes,
            frozen_bytes=frozen_bytes,
            activation_bytes=activation_bytes,
            policy_copies=policy_copies,
        )

    chosen = plan(num_gpus, offload)
    if chosen.device_total <= gpu_bytes:
        return chosen
    message = f"full fine-tuning does not fit: {chosen.describe()}, more than the GPU's {_gib(gpu_bytes)}. "
    if not offload and plan(num_gpus, True).device_total <= gpu_bytes:
        fix = plan(num_gpus, True)
        per_gpu = f"{_gib(fix.device_total)} per GPU, {_gib(fix.host_total)} host per GPU"
        raise ValueError(message + f"Set {OFFLOAD_KEY}=true ({per_gpu})")
    options = []
    for off in sorted({offload, True}):
        fewest = next((n for n in range(num_gpus + 1, max_gpus + 1) if plan(n, off).device_total <= gpu_bytes), None)
        if fewest is not None:
            extra = f" with {OFFLOAD_KEY}=true" if off and not offload else ""
            options.append(f"{fewest} GPUs{extra} ({_gib(plan(fewest, off).device_total)} per GPU)")
    if options:
        raise ValueError(message + f"Use {' or '.join(options)}; GPUs: {gpus_key}")
    raise ValueError(
        message + "No GPU count fits: the weights, their gradients, the frozen components and the policy copies "
        f"alone take {_gib(chosen.weights + chosen.grads + chosen.frozen + chosen.copies)}; train a LoRA "
        "(actor_rollout_ref.model.lora_rank >= 1)"
    )


def stored_parameter_counts(model_dir: str) -> dict[str, int]:
    """Every component's parameter count read from its safetensors headers (no weights loaded): {component: n}."""
    from safetensors import safe_open

    counts: dict[str, int] = {}
    for path in sorted(glob.glob(os.path.join(model_dir, "*", "*.safetensors"))):
        component = os.path.basename(os.path.dirname(path))
        with safe_open(path, framework="pt") as f:
            counts[component] = counts.get(component, 0) + sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    return counts


def media_tokens(
    model_dir: str, patch_size: Any, height: int, width: int, vae_scale_factor: int, num_frames: int = 1
) -> int:
    """The transformer's media tokens per sample: ``patch_size`` an int (image transformers) or (t, h, w) (video
    transformers: Wan's [1, 2, 2]); ``num_frames`` video frames become ``(num_frames - 1) / s + 1`` latent frames for
    the VAE's temporal factor ``s`` (``vae/config.json`` ``scale_factor_temporal``; 1 frame for an image)."""
    vae = _read_config(model_dir, "vae") if num_frames > 1 else {}
    return _media_tokens(vae, patch_size, height, width, vae_scale_factor, num_frames)


def _media_tokens(
    vae_config: dict[str, Any], patch_size: Any, height: int, width: int, vae_scale_factor: int, num_frames: int
) -> int:
    patch_t, patch_h, patch_w = (1, patch_size, patch_size) if isinstance(patch_size, int) else patch_size
    temporal = int(vae_config.get("scale_factor_temporal") or 1) if num_frames > 1 else 1
    latent_frames = (num_frames - 1) // temporal + 1
    side_h, side_w = vae_scale_factor * int(patch_h), vae_scale_factor * int(patch_w)
    return max(1, latent_frames // int(patch_t)) * (height // side_h) * (width // side_w)


@dataclass(frozen=True)
class PipelineShape:
    """What the memory plan reads of a pipeline: every component's stored values (parameters and persistent
    buffers, as its safetensors hold them), the transformer's config and the VAE's config."""

    counts: dict[str, int]
    transformer: dict[str, Any]
    vae: dict[str, Any]

    @classmethod
    def from_model_dir(cls, model_dir: str) -> PipelineShape:
        """Read from a diffusers pipeline directory: the safetensors headers (no weights loaded) and the configs."""
        counts = stored_parameter_counts(model_dir)
        if "transformer" not in counts:
            raise ValueError(f"{model_dir!r} has no transformer/*.safetensors to plan full fine-tuning from")
        return cls(
            counts=counts,
            transformer=_read_config(model_dir, "transformer"),
            vae=_read_config(model_dir, "vae"),
        )


def _read_config(model_dir: str, component: str) -> dict[str, Any]:
    """``<component>/config.json`` of a pipeline directory ({} where it has none)."""
    path = os.path.join(model_dir, component, "config.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def plan_inputs(
    shape: PipelineShape,
    *,
    dtype_bytes: int,
    rows: int,
    text_tokens: int,
    height: int,
    width: int,
    vae_scale_factor: int,
    num_frames: int = 1,
) -> tuple[int, int, int]:
    """(trained weights, bytes of the frozen components, activation bytes) of a pipeline of ``shape``: the
    transformer trains; everything else the engine keeps on the GPU counts as frozen; the activations are
    ``activation_bytes_estimate`` for one micro-batch of ``rows`` at ``height`` x ``width`` (x ``num_frames`` for a
    video family) plus ``text_tokens``."""
    cfg = shape.transformer
    image_tokens = _media_tokens(shape.vae, cfg.get("patch_size", 2), height, width, vae_scale_factor, num_frames)
    hidden = int(cfg["num_attention_heads"]) * int(cfg["attention_head_dim"])
    activations = activation_bytes_estimate(
        int(cfg["num_layers"]), hidden, image_tokens + text_tokens, rows, dtype_bytes=dtype_bytes
    )
    frozen = sum(n for name, n in shape.counts.items() if name != "transformer") * dtype_bytes
    return shape.counts["transformer"], frozen, activations


def plan_for_model_dir(
    model_dir: str,
    num_gpus: int,
    offload: bool,
    *,
    dtype_bytes: int,
    rows: int,
    text_tokens: int,
    height: int,
    width: int,
    vae_scale_factor: int,
    num_frames: int = 1,
) -> tuple[int, int, int]:
    """``plan_inputs`` of a diffusers pipeline directory (``PipelineShape.from_model_dir``)."""
    return plan_inputs(
        PipelineShape.from_model_dir(model_dir),
        dtype_bytes=dtype_bytes,
        rows=rows,
        text_tokens=text_tokens,
        height=height,
        width=width,
        vae_scale_factor=vae_scale_factor,
        num_frames=num_frames,
    )
