"""Shadow weights: a float32 copy of a list of parameters, moved towards them, and swapped in on demand.

Two users keep such a copy of the LoRA's trainable parameters on the actor rank:

- the policy EMA (flow_grpo's ``EMAModuleWrapper``): validation, sample images and checkpoints use the moving
  average of the adapter instead of its latest values;
- an algorithm's frozen copy of an earlier policy (DiffusionNFT's "old" adapter), moved by its own decay schedule.

:class:`ShadowWeights` is the mechanism (update with a given decay, copy from the live values, swap into the live
parameters and back, tensors-only state); :class:`EMASchedule` is flow_grpo's schedule (decay warm-up, update every
``update_interval`` optimizer steps); :class:`PolicyEMA` puts the two together with an optimizer-step counter that
checkpoints carry.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Optional

import torch

from verl_omni.core.checksum import tensors_checksum

_SHADOW_PREFIX = "shadow."


class ShadowWeights:
    """A float32 copy of ``params`` (same order, same device as each parameter).

    ``update(decay)``: ``shadow += (1 - decay) * (live - shadow)``, the exponential moving average step of
    flow_grpo's ``EMAModuleWrapper.step`` (same arithmetic, so float32 parameters give the same bits).
    ``swapped_in()``: the live parameters hold the shadow's values inside the block; their own values wait beside
    them on the same device and come back on exit, also when the block raises.
    """

    def __init__(self, params: Sequence[torch.Tensor]):
        self.params = list(params)
        if not self.params:
            raise ValueError("ShadowWeights needs at least one parameter to shadow")
        # Normal tensors even when built under inference mode (vllm-omni's worker): they are updated in place later.
        with torch.inference_mode(False), torch.no_grad():
            self.shadow = [p.detach().to(torch.float32).clone() for p in self.params]
        self._kept: list[torch.Tensor] | None = None

    # ------------------------------------------------------------------ moving the shadow
    def update(self, decay: float) -> None:
        """One moving-average step towards the live values: ``shadow += (1 - decay) * (live - shadow)``."""
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay={decay} must lie in [0, 1]")
        self._refuse_while_swapped("update")
        one_minus_decay = 1.0 - decay
        with torch.inference_mode(False), torch.no_grad():
            for shadow, param in zip(self.shadow, self.params, strict=True):
                live = param.detach()
                if live.dtype != torch.float32 or live.device != shadow.device:
                    live = live.to(shadow.device, torch.float32)
                shadow.add_(one_minus_decay * (live - shadow))

    def copy_from_live(self) -> None:
        """Make the shadow an exact copy of the live values (flow_grpo's ``sync_with_model``)."""
        self._refuse_while_swapped("copy_from_live")
        with torch.inference_mode(False), torch.no_grad():
            for shadow, param in zip(self.shadow, self.params, strict=True):
                shadow.copy_(param.detach())

    # ------------------------------------------------------------------ swapping into the live parameters
    @contextmanager
    def swapped_in(self) -> Iterator[None]:
        """Inside the block the live parameters hold the shadow's values; on exit (also on an exception) they hold
        their own again, bit for bit. Not re-entrant."""
        self.swap_in()
        try:
            yield
        finally:
            self.swap_out()

    def swap_in(self) -> None:
        """Keep the live values aside (on their device) and copy the shadow into the live parameters. Prefer
        :meth:`swapped_in`; the two halves exist for callers that cross a process boundary between them."""
        if self._kept is not None:
            raise RuntimeError("the shadow weights are already swapped in (swap_out first)")
        with torch.inference_mode(False), torch.no_grad():
            self._kept = [p.detach().clone() for p in self.params]
            for shadow, param in zip(self.shadow, self.params, strict=True):
                param.copy_(shadow)

    def swap_out(self) -> None:
        """Put the live values kept by :meth:`swap_in` back; the shadow keeps its own values."""
        if self._kept is None:
            raise RuntimeError("the shadow weights are not swapped in")
        with torch.inference_mode(False), torch.no_grad():
            for kept, param in zip(self._kept, self.params, strict=True):
                param.copy_(kept)
        self._kept = None

    @property
    def is_swapped_in(self) -> bool:
        return self._kept is not None

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, torch.Tensor]:
        """``shadow.<i>`` -> float32 tensor, on the CPU: tensors only (safetensors / ``weights_only=True``)."""
        return {f"{_SHADOW_PREFIX}{i}": s.detach().to("cpu").clone() for i, s in enumerate(self.shadow)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load tensors written by :meth:`state_dict`; their count and shapes must match the shadowed parameters."""
        self._refuse_while_swapped("load_state_dict")
        expected = [f"{_SHADOW_PREFIX}{i}" for i in range(len(self.shadow))]
        names = sorted(k for k in state if k.startswith(_SHADOW_PREFIX))
        if sorted(expected) != names:
            raise ValueError(
                f"shadow weights state holds {len(names)} tensors, expected {len(expected)} "
                f"({expected[0]} .. {expected[-1]}): saved for another adapter?"
            )
        for name, shadow in zip(expected, self.shadow, strict=True):
            if tuple(state[name].shape) != tuple(shadow.shape):
                raise ValueError(f"shadow weights {name}: shape {tuple(state[name].shape)}, expected {shadow.shape}")
        with torch.inference_mode(False), torch.no_grad():
            for name, shadow in zip(expected, self.shadow, strict=True):
                shadow.copy_(state[name])

    def checksum(self) -> str:
        """The fingerprint of the shadow's values (``core.checksum.tensors_checksum`` over ``state_dict``)."""
        return tensors_checksum(self.state_dict())

    def _refuse_while_swapped(self, what: str) -> None:
        if self._kept is not None:
            raise RuntimeError(f"{what} while the shadow weights are swapped in would mix the two copies")


@dataclass(frozen=True)
class EMASchedule:
    """flow_grpo's policy-EMA schedule (``EMAModuleWrapper``; its SD3 trainer uses decay 0.9, interval 8).

    After optimizer step ``step`` (counted from 1), the average moves when ``(step + 1) % update_interval == 0``,
    with decay ``min((1 + step) / (10 + step), decay)``: a warm-up that lets the early average follow the policy
    closely (with decay 0.9 it reaches 0.9 at step 80)."""

    decay: float = 0.9
    update_interval: int = 8

    def __post_init__(self):
        if not 0.0 <= self.decay < 1.0:
            raise ValueError(f"EMA decay={self.decay} must lie in [0, 1)")
        if self.update_interval < 1:
            raise ValueError(f"EMA update_interval={self.update_interval} must be >= 1")

    def decay_at(self, step: int) -> float:
        return min((1 + step) / (10 + step), self.decay)

    def updates_at(self, step: int) -> bool:
        return (step + 1) % self.update_interval == 0


class PolicyEMA:
    """The policy's moving average: :class:`ShadowWeights` of the trainable parameters moved by an
    :class:`EMASchedule` after every optimizer step.

    One call per optimizer step. (flow_grpo's SD3 trainer calls ``ema.step`` once per micro-batch with the
    optimizer-step count, so under gradient accumulation a due step is applied once per micro-batch; here it is
    applied once.)"""

    def __init__(self, params: Sequence[torch.Tensor], schedule: EMASchedule, weights: Optional[Any] = None):
        """``weights``: the shadow to move (default ``ShadowWeights(params)``; full fine-tuning passes its sharded
        one, workers/full_weights.py ``ShardedShadowWeights``, with the same verbs)."""
        self.weights = ShadowWeights(params) if weights is None else weights
        self.schedule = schedule
        self.optimizer_steps = 0

    def after_optimizer_step(self) -> bool:
        """Count one optimizer step; move the average if the schedule says so. Whether it moved."""
        self.optimizer_steps += 1
        step = self.optimizer_steps
        if not self.schedule.updates_at(step):
            return False
        self.weights.update(self.schedule.decay_at(step))
        return True

    def snapshot(self) -> tuple[list[torch.Tensor], int]:
        """A copy of the average (on its device) and the step count, for :meth:`restore` after a refused update."""
        with torch.inference_mode(False), torch.no_grad():
            return [s.detach().clone() for s in self.weights.shadow], self.optimizer_steps

    def restore(self, snapshot: tuple[list[torch.Tensor], int]) -> None:
        values, self.optimizer_steps = snapshot
        with torch.inference_mode(False), torch.no_grad():
            for shadow, value in zip(self.weights.shadow, values, strict=True):
                shadow.copy_(value)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {**self.weights.state_dict(), "optimizer_steps": torch.tensor(self.optimizer_steps, dtype=torch.int64)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if "optimizer_steps" not in state:
            raise ValueError("policy EMA state has no 'optimizer_steps'")
        self.weights.load_state_dict(state)
        self.optimizer_steps = int(state["optimizer_steps"])
