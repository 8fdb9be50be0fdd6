"""The LoRA actor: recompute window-step log-probs under the current policy and take a FlowGRPO step.

It holds the RL pipeline (for ``predict_velocity``, the same forward the rollout used) with a peft LoRA on
the transformer, and scores each stored transition with the scheduler's ``sde_step_with_logprob`` — the
one log-prob formula. The reference policy for the KL term is the same transformer with the adapter
disabled, so no second copy of the weights exists.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

import torch
from verl import DataProto

from verl_omni.pipelines import get_pipeline_class
from verl_omni.rollout.engines.base import resolve_dtype
from verl_omni.schedulers.flow_match_sde import reference_sigma_max, sde_step_with_logprob
from verl_omni.trainer.flowgrpo import NonFiniteError, assert_finite, flowgrpo_kl, flowgrpo_policy_loss
from verl_omni.workers.lora import add_lora_adapter, get_lora_state_dict, set_lora_state_dict

logger = logging.getLogger(__name__)


@dataclass
class ActorConfig:
    model_path: str
    pipeline: str = "qwen_image"
    dtype: str = "float32"
    device: str = "cpu"
    lora_rank: int = 8
    lora_alpha: float = 16.0
    target_modules: tuple[str, ...] = ()
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    clip_ratio: float = 1e-4
    kl_coef: float = 0.0
    adv_clip_max: Optional[float] = 5.0
    micro_batch_size: int = 4
    ppo_epochs: int = 1
    grad_clip: float = 1.0
    # rollout settings the recomputation must match
    noise_level: float = 0.7
    sde_type: str = "sde"
    guidance_scale: float = 1.0


class DiffusionLoRAActor:
    def __init__(self, config: ActorConfig):
        if config.micro_batch_size < 1:
            raise ValueError(f"actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu={config.micro_batch_size} must be >= 1")
        if config.lora_rank < 1:
            raise ValueError(f"actor_rollout_ref.model.lora_rank={config.lora_rank} must be >= 1 (the actor trains a LoRA)")
        self.config = config
        pipeline_cls = get_pipeline_class(config.pipeline)
        self.pipe = pipeline_cls.from_pretrained(config.model_path, torch_dtype=resolve_dtype(config.dtype))
        self.pipe.set_progress_bar_config(disable=True)
        # Training needs the transformer only: drop the VAE and text encoders from device memory.
        for name in ("vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
            if getattr(self.pipe, name, None) is not None:
                getattr(self.pipe, name).to("cpu")
        self.transformer = self.pipe.transformer
        self.transformer.requires_grad_(False)
        add_lora_adapter(self.transformer, config.lora_rank, config.lora_alpha, config.target_modules)
        self.transformer.to(config.device)
        self.trainable = [p for p in self.transformer.parameters() if p.requires_grad]
        for p in self.trainable:  # LoRA weights train in float32 even when the base model is bf16
            p.data = p.data.float()
        self.optimizer = torch.optim.AdamW(self.trainable, lr=config.lr, betas=tuple(config.betas),
                                           weight_decay=config.weight_decay)

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
        cond = _trimmed_cond(batch, rows, device)
        height, width = batch["images"].shape[1:3]
        velocity = self.pipe.predict_velocity(
            sample.to(self.transformer.dtype), batch["timesteps"][rows, step].to(device), cond,
            self.config.guidance_scale, int(height), int(width),
        )
        sigmas = batch["sigmas"][rows].to(device)
        out = sde_step_with_logprob(
            velocity.float(), sample.float(), sigmas[:, step], sigmas[:, step + 1],
            noise_level=self.config.noise_level, sde_type=self.config.sde_type,
            sigma_max=reference_sigma_max(sigmas[0]), prev_sample=prev_sample.float(),
        )
        return out

    # Hooks for the data-parallel actor (verl_omni.workers.fsdp_actor), which overrides just these two.
    def _micro_batches(self, data: DataProto, step: int, step_rows: torch.Tensor):
        """The row chunks of window step ``step`` this process trains on."""
        return step_rows.split(self.config.micro_batch_size)

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


def _trimmed_cond(batch, rows: torch.Tensor, device: str) -> dict[str, torch.Tensor]:
    """Conditioning tensors of ``rows``, with right padding beyond the longest mask removed.

    The agent loop pads embeddings of different prompts to one length; cutting back to the longest prompt
    of the micro-batch reproduces the rollout's tensors exactly when the micro-batch is one prompt group.
    """
    cond = {}
    for prefix in ("", "negative_"):
        key = f"{prefix}prompt_embeds"
        if key not in batch.keys():
            continue
        embeds = batch[key][rows]
        mask_key = f"{key}_mask"
        if mask_key in batch.keys():
            mask = batch[mask_key][rows]
            length = int(mask.sum(dim=1).max())
            cond[mask_key] = mask[:, :length].to(device)
            embeds = embeds[:, :length]
        cond[key] = embeds.to(device)
        pooled = f"{prefix}pooled_prompt_embeds"
        if pooled in batch.keys():
            cond[pooled] = batch[pooled][rows].to(device)
    return cond


def _per_sample(std: torch.Tensor, batch: int) -> torch.Tensor:
    """The SDE std as [batch] (the scheduler may return it broadcastable, e.g. [B, 1, 1])."""
    flat = std.reshape(-1)
    return flat if flat.numel() == batch else flat[:1].expand(batch)
