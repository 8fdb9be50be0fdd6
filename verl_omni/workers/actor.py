"""The LoRA actor: recompute window-step log-probs under the current policy and take a FlowGRPO step.

It holds the RL pipeline (for ``predict_velocity``, the same forward the rollout used) with a peft LoRA on
the transformer, and scores each stored transition with the scheduler's ``sde_step_with_logprob`` — the
one log-prob formula. The reference policy for the KL term is the same transformer with the adapter
disabled, so no second copy of the weights exists.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager

import torch
from verl import DataProto

from verl_omni.algorithms.flowgrpo import flowgrpo_kl, flowgrpo_policy_loss
from verl_omni.config.actor import ActorConfig
from verl_omni.config.model import ModelConfig
from verl_omni.config.rollout import RolloutConfig
from verl_omni.core.conditioning import Conditioning
from verl_omni.core.errors import NonFiniteError, assert_finite
from verl_omni.models.lora import get_lora_state_dict, lora_parameters, set_lora_state_dict
from verl_omni.pipelines.loading import load_rl_pipeline
from verl_omni.schedulers.flow_match_sde import reference_sigma_max, sde_step_with_logprob

logger = logging.getLogger(__name__)


class DiffusionLoRAActor:
    def __init__(self, model: ModelConfig, actor: ActorConfig, rollout: RolloutConfig):
        self.model, self.config, self.rollout = model, actor, rollout
        if model.lora is None:
            raise ValueError(f"actor_rollout_ref.model.lora_rank={model.lora_rank} must be >= 1 (the actor trains a LoRA)")
        # LoRA weights train in float32 even when the base model is bf16.
        self.pipe = load_rl_pipeline(model.path, model.pipeline, actor.dtype, model.lora, lora_dtype=torch.float32)
        # Training needs the transformer only: the VAE and text encoders stay on the CPU.
        self.transformer = self.pipe.transformer
        self.transformer.to(actor.device)
        self.trainable = lora_parameters(self.transformer)
        optim = actor.optim
        self.optimizer = torch.optim.AdamW(self.trainable, lr=optim.lr, betas=tuple(optim.betas),
                                           weight_decay=optim.weight_decay)

    # ------------------------------------------------------------------ weights
    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        return get_lora_state_dict(self.transformer)

    def load_lora_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        set_lora_state_dict(self.transformer, tensors)

    @contextmanager
    def _adapter_disabled(self):
        self.transformer.disable_adapters()
        try:
            yield
        finally:
            self.transformer.enable_adapters()

    # ------------------------------------------------------------------ update
    def compute_log_probs(self, data: DataProto, step: int, rows: torch.Tensor, reference: bool = False):
        """(log_prob [b], prev_sample_mean, std_dev_t) of transition ``step`` for ``rows`` under the policy."""
        batch = data.batch
        device = self.config.device
        latents = batch["latents"][rows]
        sample, prev_sample = latents[:, step].to(device), latents[:, step + 1].to(device)
        cond = Conditioning.from_fields(batch).select(rows).without_padding().to(device)
        height, width = batch["images"].shape[1:3]
        velocity = self.pipe.predict_velocity(
            sample.to(self.transformer.dtype), batch["timesteps"][rows, step].to(device), cond,
            float(self.rollout.pipeline.true_cfg_scale), int(height), int(width),
        )
        sigmas = batch["sigmas"][rows].to(device)
        algo = self.rollout.algo
        out = sde_step_with_logprob(
            velocity.float(), sample.float(), sigmas[:, step], sigmas[:, step + 1],
            noise_level=float(algo.noise_level), sde_type=algo.sde_type,
            sigma_max=reference_sigma_max(sigmas[0]), prev_sample=prev_sample.float(),
        )
        return out

    # Hooks for the data-parallel actor (verl_omni.workers.fsdp_actor), which overrides just these two.
    def _micro_batches(self, data: DataProto, step: int, step_rows: torch.Tensor):
        """The row chunks of window step ``step`` this process trains on."""
        return step_rows.split(self.config.ppo_micro_batch_size_per_gpu)

    def _clip_grad_norm(self) -> torch.Tensor:
        """Clip the accumulated LoRA gradients; the total norm as a plain scalar tensor."""
        return torch.nn.utils.clip_grad_norm_(self.trainable, self.config.grad_clip)

    def update(self, data: DataProto, advantages: torch.Tensor) -> dict[str, float]:
        """One FlowGRPO update over all window transitions of ``data``. Raises before stepping on NaN/inf."""
        assert_finite("advantages", advantages)
        assert_finite("old_log_probs", data.batch["old_log_probs"])
        assert_finite("latents", data.batch["latents"])
        window = data.batch["window_mask"].bool()  # [B, T]
        num_terms = int(window.sum())
        if num_terms == 0:
            raise ValueError("no SDE-window steps in the batch: nothing to train on (check "
                             "actor_rollout_ref.rollout.algo.noise_level > 0 and .sde_window_size)")
        self.transformer.train()
        try:
            return self._update(data, advantages, window, num_terms)
        finally:
            self.transformer.eval()

    def _update(self, data: DataProto, advantages: torch.Tensor, window: torch.Tensor, num_terms: int) -> dict:
        cfg = self.config
        totals: dict[str, float] = {}
        grad_norms = []
        for _ in range(cfg.ppo_epochs):
            self.optimizer.zero_grad(set_to_none=True)
            for step in range(window.shape[1]):
                step_rows = torch.nonzero(window[:, step]).flatten()
                if step_rows.numel() == 0:
                    continue
                for chunk in self._micro_batches(data, step, step_rows):
                    out = self.compute_log_probs(data, step, chunk)
                    kl = None
                    if cfg.kl_coef > 0:
                        with torch.no_grad(), self._adapter_disabled():
                            ref = self.compute_log_probs(data, step, chunk)
                        kl = flowgrpo_kl(out.prev_sample_mean, ref.prev_sample_mean, _per_sample(out.std_dev_t, len(chunk)))
                    loss, metrics = flowgrpo_policy_loss(
                        out.log_prob, data.batch["old_log_probs"][chunk, step].to(out.log_prob.device),
                        advantages[chunk].to(out.log_prob.device), cfg.clip_ratio, adv_clip_max=cfg.adv_clip_max,
                        kl=kl, kl_beta=cfg.kl_coef,
                    )
                    # Weight by rows so the accumulated gradient is the mean over all (sample, step) terms.
                    (loss * (len(chunk) / num_terms)).backward()
                    for key, value in metrics.items():
                        totals[key] = totals.get(key, 0.0) + value * len(chunk) / num_terms / cfg.ppo_epochs
            grad_norm = self._clip_grad_norm()
            if not torch.isfinite(grad_norm):
                self.optimizer.zero_grad(set_to_none=True)
                raise NonFiniteError(f"non-finite LoRA gradient norm ({grad_norm}); step refused, LoRA unchanged")
            self.optimizer.step()
            grad_norms.append(float(grad_norm))
        totals["grad_norm"] = sum(grad_norms) / len(grad_norms)
        totals["num_train_terms"] = num_terms
        return {f"actor/{k}": v for k, v in totals.items()}


def _per_sample(std: torch.Tensor, batch: int) -> torch.Tensor:
    """The SDE std as [batch] (the scheduler may return it broadcastable, e.g. [B, 1, 1])."""
    flat = std.reshape(-1)
    return flat if flat.numel() == batch else flat[:1].expand(batch)
