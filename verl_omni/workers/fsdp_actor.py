"""The LoRA actor, data-parallel over W ranks (one Ray actor per rank), the transformer sharded with FSDP2.

Each rank is a :class:`DiffusionLoRAActor` (same pipeline, LoRA, log-prob recomputation and loss: the math
exists once, in ``actor.py``); this module only changes *which rows* a rank trains on and how gradients and
state are gathered:

- ``fully_shard`` (FSDP2) on every transformer block and the root. It works on CPU with gloo in torch 2.13
  (all-gather and reduce-scatter are both supported there), so the CPU tests run the same code as the GPUs.
  Base weights, LoRA weights, their gradients and the AdamW state are all sharded (DTensor, ``Shard(0)``).
- Rows: every window step's rows are cut into global micro-batches of ``micro_batch_size * W`` rows; rank r
  trains on the r-th of W contiguous slices (so ``micro_batch_size`` stays a per-rank, i.e. per-GPU, size).
  Each rank weights its loss by ``len(rows) / num_terms`` with the *global* ``num_terms`` and FSDP sums the
  gradients (divide factor 1), so the reduced gradient is exactly the single-process one.
- FSDP all-gathers parameters in every forward, so all ranks must run the same sequence of forwards and
  backwards: a rank whose slice of a global micro-batch is empty runs an idle pass (loss * 0).
- Metrics: every rank reports its partial sums (already divided by the global ``num_terms``); the driver adds
  them, so means (loss, clip_frac, kl...) equal the single-process ones. ``ratio_min`` / ``ratio_max`` are, as
  in DiffusionLoRAActor, row-weighted means of per-micro-batch extremes, the micro-batch being the rank's
  slice. ``grad_norm`` is the global norm (identical on all ranks).

Limitation: a non-finite log-prob raised on one rank only (the model produced NaN for its rows) leaves the
other ranks waiting in a collective; the group is then unusable and must be rebuilt (data-level checks run on
every rank before any collective, so they raise everywhere).
"""

from __future__ import annotations

import os
import socket
import warnings
from dataclasses import replace
from typing import Any, Optional

import ray
import torch
import torch.distributed as dist
from peft.utils import get_peft_model_state_dict
from verl import DataProto

from verl_omni.config.actor import ActorConfig
from verl_omni.config.model import ModelConfig
from verl_omni.config.rollout import RolloutConfig
from verl_omni.models.lora import lora_parameters, set_lora_state_dict
from verl_omni.pipelines.loading import denoiser_components
from verl_omni.workers.actor import DiffusionLoRAActor
from verl_omni.workers.rank_group import OptimizerHandle, gather_ranks

# Metrics that are not per-row partial sums: the same value on every rank.
_GLOBAL_METRICS = (
    "actor/grad_norm",
    "actor/num_train_terms",
    "actor/busy_s",
    "actor/compute_s",
    "actor/gc_s",
    "actor/cuda_mallocs",
    "actor/gc_frozen_objects",
    "actor/sm_clock_mhz",
    "actor/sm_clock_min_mhz",
    "actor/peak_allocated_gb",
    "actor/peak_reserved_gb",
    "actor/rollout_peak_allocated_gb",
    "actor/rollout_peak_reserved_gb",
    "actor/recomputed_blocks",
)


class FSDPActorRank(DiffusionLoRAActor):
    """One rank: a DiffusionLoRAActor whose transformer is sharded with FSDP2 over the process group."""

    retries_after_oom = False  # the forward all-gathers weights: a rank retrying alone would desynchronise them

    def __init__(
        self,
        model: ModelConfig,
        actor: ActorConfig,
        rollout: RolloutConfig,
        rank: int,
        world_size: int,
        master_port: int,
        lora_seed: Optional[int] = None,
        algorithm: Any = None,
    ):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import FSDPModule, fully_shard

        experts = denoiser_components(model.path)
        if len(experts) > 1:
            raise ValueError(
                f"the sharded (FSDP) LoRA actor shards one transformer; actor_rollout_ref.model.path={model.path!r} "
                f"has {len(experts)} experts ({', '.join(experts)}): train it in the hybrid engine (one model copy "
                "per GPU)"
            )
        self.rank, self.world_size = rank, world_size
        cuda = actor.on_cuda
        if cuda:
            torch.cuda.set_device(0)  # Ray gives each rank one GPU (num_gpus=1): it is device 0 here
            actor = replace(actor, device="cuda:0")
        else:  # W ranks share the CPU cores
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(master_port))
        dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world_size)
        super().__init__(model, actor, rollout, lora_seed=lora_seed, algorithm=algorithm)
        # The LoRA A matrices are drawn from each process's RNG: start every rank from rank 0's.
        for p in self.trainable:
            dist.broadcast(p.data, src=0)
        self.mesh = init_device_mesh("cuda" if cuda else "cpu", (world_size,))
        # predict_velocity only uses out-of-place ops on the transformer output (FSDP2 warns about views).
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
        block_types = tuple(getattr(self.transformer, "_no_split_modules", None) or ())
        for module in self.transformer.modules():
            if type(module).__name__ in block_types:
                fully_shard(module, mesh=self.mesh)
        fully_shard(self.transformer, mesh=self.mesh)
        for module in self.transformer.modules():
            if isinstance(module, FSDPModule):
                # Sum, not mean: each rank's loss already carries rows / global num_terms. Forcing a plain SUM
                # collective keeps gloo working (it has no PREMUL_SUM, which a divide factor alone would use).
                module.set_gradient_divide_factor(1.0)
                module.set_force_sum_reduction_for_comms(True)
        # fully_shard swapped the parameters for DTensors: the optimizer must hold the new ones.
        self.trainable = lora_parameters(self.transformer)
        self.algorithm.attach(self)  # and the algorithm's state kept beside them (each rank: its own shard)
        optim = actor.optim
        self.optimizer = torch.optim.AdamW(
            self.trainable, lr=optim.lr, betas=tuple(optim.betas), weight_decay=optim.weight_decay
        )
        self._set_up_ema()  # over the sharded parameters: each rank averages its own shard

    # ------------------------------------------------------------------ hooks of DiffusionLoRAActor.update
    def _micro_batches(self, step_rows: torch.Tensor) -> list[tuple[torch.Tensor, bool]]:
        out = []
        for chunk in step_rows.split(self.config.ppo_micro_batch_size_per_gpu * self.world_size):
            mine = chunk.tensor_split(self.world_size)[self.rank]
            # An empty slice still runs a pass (on one row, gradient discarded): FSDP's collectives stay in step.
            out.append((mine, False) if len(mine) else (chunk[:1], True))
        return out

    def _clip_grad_norm(self) -> torch.Tensor:
        norm = super()._clip_grad_norm()  # DTensor grads: torch reduces the norm over the ranks
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    # ------------------------------------------------------------------ weights and optimizer state
    # Every rank must call these (full_tensor is a collective); rank 0 returns the result.
    def lora_state_dict(self) -> Optional[dict[str, torch.Tensor]]:
        full = {k: _full(v).detach().to("cpu").clone() for k, v in get_peft_model_state_dict(self.transformer).items()}
        return full if self.rank == 0 else None

    def load_lora_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        # Every LoRA parameter is a Shard(0) DTensor on self.mesh: slice each full tensor locally.
        ref = self.trainable[0]
        set_lora_state_dict(
            self.transformer, {k: _shard(v.to(device=ref.device, dtype=ref.dtype), ref) for k, v in tensors.items()}
        )
        self.algorithm.attach(self)

    def optimizer_state_dict(self) -> Optional[dict]:
        """The single-process format (``DiffusionLoRAActor.optimizer.state_dict()``): full tensors on CPU."""
        sd = self.optimizer.state_dict()
        state = {
            i: {k: _full(v).to("cpu") if torch.is_tensor(v) else v for k, v in s.items()}
            for i, s in sd["state"].items()
        }
        return {"state": state, "param_groups": sd["param_groups"]} if self.rank == 0 else None

    def load_optimizer_state_dict(self, sd: dict) -> None:
        state = {}
        for i, s in sd["state"].items():
            param = self.trainable[int(i)]
            state[i] = {
                k: _shard(v, param) if torch.is_tensor(v) and v.shape == param.shape else v for k, v in s.items()
            }
        self.optimizer.load_state_dict({"state": state, "param_groups": sd["param_groups"]})

    def shard_sizes(self) -> tuple[int, int]:
        """(elements of the transformer this rank holds, elements of the full transformer)."""
        params = list(self.transformer.parameters())
        return sum(getattr(p, "_local_tensor", p).numel() for p in params), sum(p.numel() for p in params)


def _full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def _shard(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``full`` (the same on every rank) as a DTensor placed like ``like``; each rank slices locally."""
    from torch.distributed.tensor import distribute_tensor

    if not hasattr(like, "device_mesh"):
        return full
    return distribute_tensor(full.to(like.device), like.device_mesh, like.placements, src_data_rank=None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Rank:
    """Ray wrapper: the rank is built in the worker process (where the process group lives)."""

    def __init__(self, *args):
        self.actor = FSDPActorRank(*args)

    def call(self, method: str, *args):
        return getattr(self.actor, method)(*args)


class FSDPLoRAActorGroup:
    """Driver-side handle on W FSDP ranks with the interface the trainer uses on DiffusionLoRAActor.

    ``optimizer`` is a small handle with ``state_dict()`` / ``load_state_dict()`` so the checkpoint code,
    which only calls those two, takes the group unchanged.
    """

    def __init__(
        self,
        model: ModelConfig,
        actor: ActorConfig,
        rollout: RolloutConfig,
        lora_seed: Optional[int] = None,
        algorithm: Any = None,
    ):
        world_size = actor.world_size
        self.config, self.world_size = actor, world_size
        # All ranks on this host (MASTER_ADDR=127.0.0.1); the 2-core CI machine has no CPU to reserve.
        resources = {"num_gpus": 1} if actor.on_cuda else {"num_cpus": 0}
        remote = ray.remote(**resources)(_Rank)
        port = _free_port()
        self.ranks = [
            remote.remote(model, actor, rollout, r, world_size, port, lora_seed, algorithm) for r in range(world_size)
        ]
        try:
            gather_ranks([r.__ray_ready__.remote() for r in self.ranks])  # every rank built, or its error raised
        except Exception:
            self.shutdown()  # the other ranks would wait for the failed one in a collective
            raise
        self.optimizer = OptimizerHandle(self)

    def _all(self, method: str, *args) -> list:
        return gather_ranks([r.call.remote(method, *args) for r in self.ranks])

    def update(self, data: DataProto, advantages: torch.Tensor) -> dict[str, float]:
        per_rank = self._all("update", ray.put(data), advantages)
        keys = dict.fromkeys(k for m in per_rank for k in m)  # union, in rank 0's order
        return {k: per_rank[0][k] if k in _GLOBAL_METRICS else sum(m.get(k, 0.0) for m in per_rank) for k in keys}

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        return self._all("lora_state_dict")[0]

    def rollout_lora_state_dict(self) -> dict[str, torch.Tensor]:
        return self._all("rollout_lora_state_dict")[0]

    def load_lora_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        self._all("load_lora_state_dict", ray.put(tensors))

    def optimizer_state_dict(self) -> dict:
        return self._all("optimizer_state_dict")[0]

    def load_optimizer_state_dict(self, state: dict) -> None:
        self._all("load_optimizer_state_dict", ray.put(state))

    def shard_sizes(self) -> list[tuple[int, int]]:
        return self._all("shard_sizes")

    # The policy EMA: every rank swaps / saves / loads its shard (lora_state_dict gathers the full tensors).
    def swap_in_ema(self) -> None:
        self._all("swap_in_ema")

    def swap_out_ema(self) -> None:
        self._all("swap_out_ema")

    def ema_state_dict(self) -> dict:
        return self._all("ema_state_dict")[0]

    def load_ema_state_dict(self, state: dict) -> None:
        self._all("load_ema_state_dict", ray.put(state))

    def ema_checksum(self) -> str:
        return self._all("ema_checksum")[0]

    def shutdown(self) -> None:
        for r in self.ranks:
            ray.kill(r)
        self.ranks = []
