"""The FlowGRPO training loop: rollout → reward → advantages → LoRA update → weight sync.

The driver owns the LoRA actor (one device; plain module) and talks to the engine replicas through the
agent-loop manager (rollout) and the server manager (sleep / wake / LoRA sync). Nothing here knows which
engine runs behind the replicas.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import os
import time
from typing import Any, Optional

import numpy as np
import ray
import torch
from omegaconf import OmegaConf
from PIL import Image
from tqdm import tqdm
from verl import DataProto

from verl_omni.agent_loop.diffusion_agent_loop import DiffusionAgentLoopManager
from verl_omni.rewards import RewardManager
from verl_omni.rollout.engines.base import resolve_dtype, tensors_checksum, vae_scale_factor_of
from verl_omni.rollout.server_manager import DiffusionServerManager
from verl_omni.trainer.checkpoint import load_resumable_checkpoint, resume_past_total_message, save_checkpoint
from verl_omni.trainer.config_checks import check_config
from verl_omni.trainer.data import PromptDataset
from verl_omni.trainer.flowgrpo import NonFiniteError, compute_group_advantages
from verl_omni.trainer.run_lock import acquire_run_lock
from verl_omni.trainer.run_summary import write_run_summary
from verl_omni.workers.actor import ActorConfig, DiffusionLoRAActor
from verl_omni.workers.fsdp_actor import FSDPLoRAActorGroup

logger = logging.getLogger(__name__)


def resolve_model_path(path: str, cache_root: str) -> str:
    """``tiny:qwen_image`` / ``tiny:sd3`` → a tiny random pipeline built locally (no hub); else the path."""
    if not path.startswith("tiny:"):
        return os.path.expanduser(path)
    from verl_omni.models.tiny import tiny_model_dir

    return tiny_model_dir(path.split(":", 1)[1], root=cache_root)


class FlowGRPOTrainer:
    def __init__(self, config: Any):
        self.config = config
        self.rollout_cfg = check_config(config)
        self.loop = asyncio.new_event_loop()
        self.global_step = 0
        self.output_dir = os.path.abspath(os.path.expanduser(config.trainer.default_local_dir))

    # ------------------------------------------------------------------ setup
    def init(self) -> "FlowGRPOTrainer":
        # One writer per run directory: a second trainer on trainer.default_local_dir refuses to start.
        self.run_lock = acquire_run_lock(self.output_dir)
        try:
            return self._init()
        except BaseException:
            self.run_lock.release()  # a failed start leaves the directory free (shutdown may never be called)
            raise

    def _init(self) -> "FlowGRPOTrainer":
        cfg = self.config
        OmegaConf.set_struct(cfg, False)
        cfg.actor_rollout_ref.model.path = resolve_model_path(
            cfg.actor_rollout_ref.model.path, os.path.join(self.output_dir, "tiny_models"))
        OmegaConf.set_struct(cfg, True)
        # Start-up checks that need the model: image size vs the VAE factor.
        try:
            self.rollout_cfg.sampling_params().validate(vae_scale_factor_of(cfg.actor_rollout_ref.model.path))
        except ValueError as exc:
            raise ValueError(f"actor_rollout_ref.rollout.pipeline: {exc}") from None
        torch.manual_seed(cfg.trainer.seed)  # the LoRA A-matrices' initialisation
        np.random.seed(cfg.trainer.seed)
        self._started_ray = not ray.is_initialized()
        if self._started_ray:
            num_cpus = cfg.trainer.ray_num_cpus or max(4, os.cpu_count() or 1)
            ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=True)
        self._check_gpus()
        self.train_data = PromptDataset(cfg.data.train_files, cfg.data.prompt_key)
        self.val_data = None
        if cfg.trainer.test_freq > 0 and cfg.data.get("val_files"):
            self.val_data = PromptDataset(cfg.data.val_files, cfg.data.prompt_key, cfg.data.get("val_max_samples"))
        self.rewards = RewardManager(OmegaConf.to_container(cfg.reward, resolve=True))
        self.servers = self._run(DiffusionServerManager(cfg).start())
        self.agent_loops = DiffusionAgentLoopManager.create(cfg, self.servers.get_client())  # verl runs it to completion
        model, actor = cfg.actor_rollout_ref.model, cfg.actor_rollout_ref.actor
        algo = self.rollout_cfg.algo
        actor_config = ActorConfig(
            model_path=model.path, pipeline=model.pipeline, dtype=actor.dtype, device=actor.device,
            lora_rank=model.lora_rank, lora_alpha=model.lora_alpha, target_modules=tuple(model.target_modules),
            lr=actor.optim.lr, weight_decay=actor.optim.weight_decay, betas=tuple(actor.optim.betas),
            clip_ratio=actor.clip_ratio, kl_coef=actor.kl_coef, adv_clip_max=actor.adv_clip_max,
            micro_batch_size=actor.ppo_micro_batch_size_per_gpu, ppo_epochs=actor.ppo_epochs,
            grad_clip=actor.grad_clip, noise_level=algo.noise_level, sde_type=algo.sde_type,
            guidance_scale=self.rollout_cfg.pipeline.true_cfg_scale,
        )
        # One process, or W FSDP ranks (Ray actors) with the same interface.
        self.actor = (FSDPLoRAActorGroup(actor_config, actor.world_size) if actor.world_size > 1
                      else DiffusionLoRAActor(actor_config))
        if cfg.trainer.resume_mode == "auto":
            self._maybe_resume()
        # The engines start from the actor's adapter (fresh or resumed): one verified sync before step 1.
        self.sync_weights()
        from verl.utils.tracking import Tracking

        loggers = [cfg.trainer.logger] if isinstance(cfg.trainer.logger, str) else list(cfg.trainer.logger)
        # verl's tensorboard backend reads TENSORBOARD_DIR; default it to the run directory for this call only.
        user_dir = os.environ.get("TENSORBOARD_DIR")
        os.environ["TENSORBOARD_DIR"] = user_dir or os.path.join(self.output_dir, "tensorboard")
        try:
            self.tracker = Tracking(cfg.trainer.project_name, cfg.trainer.experiment_name, loggers,
                                    OmegaConf.to_container(cfg, resolve=True))
        finally:
            if user_dir is None:
                del os.environ["TENSORBOARD_DIR"]
        return self

    def _check_gpus(self) -> None:
        """Each cuda replica and each FSDP rank holds a whole GPU: fail now, naming the keys, not hang in Ray."""
        actor = self.config.actor_rollout_ref.actor
        needed = self.rollout_cfg.num_replicas if self.rollout_cfg.device.startswith("cuda") else 0
        if actor.world_size > 1 and str(actor.device).startswith("cuda"):
            needed += actor.world_size
        available = ray.cluster_resources().get("GPU", 0)
        if needed > available:
            raise ValueError(
                f"actor_rollout_ref.rollout.num_replicas={self.rollout_cfg.num_replicas} and "
                f"actor_rollout_ref.actor.world_size={actor.world_size} need {needed} GPUs; the Ray cluster has "
                f"{available:g} (sharing one GPU between a replica and an FSDP rank is not supported yet)"
            )

    def _run(self, coro):
        return self.loop.run_until_complete(coro)

    def _maybe_resume(self) -> None:
        # Verified before anything is loaded; a damaged newest checkpoint is named, then skipped or fatal.
        checkpoint = load_resumable_checkpoint(self.output_dir, self.config.trainer.get("resume_on_damage", "fallback"))
        if checkpoint is None:
            return
        self.actor.load_lora_state_dict(checkpoint.lora)
        checkpoint.restore(self.actor.optimizer)
        self.global_step = checkpoint.step
        print(f"[verl_omni] resumed from {checkpoint.path} at global step {self.global_step}")
        past_total = resume_past_total_message(self.global_step, self.config.trainer.total_training_steps)
        if past_total:
            logger.warning(past_total)
            print(f"[verl_omni] {past_total}")

    # ------------------------------------------------------------------ pieces of a step
    def sync_weights(self) -> dict[str, float]:
        """LoRA tensors → every replica (in memory); raises unless every engine checksum equals the actor's."""
        start = time.perf_counter()
        # The engines serve the adapter in the rollout dtype (bf16 on GPU) while the actor keeps float32
        # master weights: send what they will serve, so the checksums compare the same numbers.
        rollout_dtype = resolve_dtype(self.rollout_cfg.dtype)
        tensors = {k: v.to(rollout_dtype) for k, v in self.actor.lora_state_dict().items()}
        expected = tensors_checksum(tensors)
        checksums = self._run(self.servers.update_lora(tensors))
        bad = [i for i, c in enumerate(checksums) if c != expected]
        if bad:
            raise RuntimeError(f"LoRA sync failed: replicas {bad} report a checksum different from the actor's")
        self.last_lora_checksum = expected
        return {"timing/sync_s": time.perf_counter() - start}

    def rollout(self, step: int, validate: bool = False):
        cfg = self.config
        if not validate:
            indices = self.train_data.indices_for_step(step, cfg.data.train_batch_size, cfg.data.seed, cfg.data.shuffle)
            return self._rollout_batch(self.train_data, indices, self.rollout_cfg.n, step, False)
        # validation: the whole validation set, data.val_batch_size prompts per rollout call
        indices = list(range(len(self.val_data)))
        size = cfg.data.val_batch_size
        outputs = [self._rollout_batch(self.val_data, indices[i:i + size], self.rollout_cfg.val_kwargs.n, step, True)
                   for i in range(0, len(indices), size)]
        for out in outputs:
            out.meta_info = {}
        return DataProto.concat(outputs)

    def _rollout_batch(self, data: PromptDataset, indices: list[int], n: int, step: int, validate: bool):
        tag = f"val{step}-{indices[0]}" if validate else f"train{step}"
        batch = data.batch(indices, n, tag=tag)
        batch.meta_info.update({"global_steps": step, "validate": validate, "n": n})
        return self._run(self.agent_loops.generate_sequences(batch))

    def score(self, output) -> tuple[np.ndarray, dict[str, float]]:
        images = list(output.batch["images"].numpy())
        prompts = list(output.non_tensor_batch["prompt_text"])
        metadata = [
            {key: output.non_tensor_batch[key][i] for key in ("reward_model", "data_source", "extra_info")
             if key in output.non_tensor_batch}
            for i in range(len(images))
        ]
        result = self.rewards(images, prompts, metadata)
        return np.asarray(result.total, dtype=np.float64), result.metrics("reward")

    # ------------------------------------------------------------------ the loop
    def fit(self) -> list[dict[str, float]]:
        cfg = self.config
        history, trained_steps = [], []
        total = cfg.trainer.total_training_steps
        # disable=None: no bar when stderr is not a TTY (a log file); the console logger prints one line per step.
        bar = tqdm(total=total, initial=self.global_step, desc="FlowGRPO", dynamic_ncols=True, disable=None)
        while self.global_step < total:
            step = self.global_step + 1
            metrics = self.train_step(step)
            self.global_step = step
            if metrics is not None:
                history.append(metrics)
                trained_steps.append(step)
                self.tracker.log(data=metrics, step=step)
            if cfg.trainer.save_freq > 0 and (step % cfg.trainer.save_freq == 0 or step == total):
                self.save(step)
            if self.val_data is not None and (step % cfg.trainer.test_freq == 0 or step == total):
                self.tracker.log(data=self.validate(step), step=step)
            bar.update(1)
        bar.close()
        # What the run did and where its outputs are; writes <default_local_dir>/reward_curve.png.
        print(write_run_summary(self.output_dir, history, trained_steps), flush=True)
        return history

    def train_step(self, step: int) -> Optional[dict[str, float]]:
        """One step; None when it was refused for non-finite numbers under ``trainer.nan_policy=skip``."""
        # With several epochs an update can fail after an optimizer step: keep what to restore.
        lora_before = self.actor.lora_state_dict()
        optim_before = copy.deepcopy(self.actor.optimizer.state_dict())
        try:
            return self._train_step(step)
        except NonFiniteError as exc:
            self.actor.load_lora_state_dict(lora_before)
            self.actor.optimizer.load_state_dict(optim_before)
            if self.config.trainer.nan_policy == "stop":
                raise
            logger.error("step %d refused (%s); trainer.nan_policy=skip: LoRA unchanged, continuing", step, exc)
            print(f"[verl_omni] step {step} skipped: {exc}")
            return None

    def _train_step(self, step: int) -> dict[str, float]:
        cfg = self.config
        t0 = time.perf_counter()
        output = self.rollout(step)
        t_rollout = time.perf_counter() - t0
        scores, reward_metrics = self.score(output)
        advantages = compute_group_advantages(
            torch.as_tensor(scores), output.non_tensor_batch["uid"], global_std=cfg.algorithm.global_std)
        t1 = time.perf_counter()
        if self.rollout_cfg.free_cache_engine:
            self._run(self.servers.sleep())
        try:
            actor_metrics = self.actor.update(output, advantages.float())
        finally:
            if self.rollout_cfg.free_cache_engine:
                self._run(self.servers.wake_up())
        t_train = time.perf_counter() - t1
        sync_metrics = self.sync_weights()
        self._write_samples(step, output, scores)
        step_time = time.perf_counter() - t0
        n_images = len(scores)
        return {
            **reward_metrics,
            **actor_metrics,
            **output.meta_info.get("metrics", {}),
            **sync_metrics,
            "reward/mean": float(scores.mean()),
            "reward/std": float(scores.std()),
            "advantages/mean": float(advantages.mean()),
            "advantages/abs_max": float(advantages.abs().max()),
            "timing/rollout_s": t_rollout,
            "timing/train_s": t_train,
            "timing/step_s": step_time,
            "perf/img_per_s_rollout": n_images / max(t_rollout, 1e-9),
        }

    def validate(self, step: int) -> dict[str, float]:
        output = self.rollout(step, validate=True)
        scores, metrics = self.score(output)
        grid = validation_grid(output.batch["images"].numpy(), list(output.non_tensor_batch["prompt_text"]), scores)
        folder = os.path.join(self.output_dir, "validation")
        os.makedirs(folder, exist_ok=True)
        grid.save(os.path.join(folder, f"step_{step}.png"))
        writer = getattr(getattr(self, "tracker", None), "logger", {}).get("tensorboard")
        if writer is not None and hasattr(writer, "writer"):
            writer.writer.add_image("val/grid", np.asarray(grid), step, dataformats="HWC")
        return {"val/reward_mean": float(scores.mean()), **{f"val/{k}": v for k, v in metrics.items()}}

    def _write_samples(self, step: int, output, scores: np.ndarray, prefix: str = "train") -> None:
        limit = self.config.trainer.sample_images_per_step
        if limit <= 0:
            return
        folder = os.path.join(self.output_dir, "samples", f"{prefix}_step_{step}")
        os.makedirs(folder, exist_ok=True)
        images = output.batch["images"].numpy()
        for i in range(min(limit, len(images))):
            Image.fromarray(images[i]).save(os.path.join(folder, f"{i:03d}_reward{scores[i]:.3f}.png"))

    def save(self, step: int) -> str:
        return save_checkpoint(self.output_dir, step, self.actor.lora_state_dict(), self.actor.optimizer,
                               {"lora_checksum": self.last_lora_checksum})

    def shutdown(self) -> None:
        try:
            for worker in getattr(getattr(self, "agent_loops", None), "agent_loop_workers", []):
                ray.kill(worker)
            if getattr(self, "servers", None) is not None:
                self._run(self.servers.shutdown())
        finally:
            if hasattr(getattr(self, "actor", None), "shutdown"):
                self.actor.shutdown()
            self.loop.close()
            if getattr(self, "_started_ray", False):
                ray.shutdown()
            if getattr(self, "run_lock", None) is not None:
                self.run_lock.release()


def validation_grid(images: np.ndarray, prompts: list[str], scores: np.ndarray, columns: int = 4,
                    caption_height: int = 36) -> Image.Image:
    """One image per validation sample with its prompt and reward written under it."""
    from PIL import ImageDraw

    n, h, w = images.shape[:3]
    cell_w = max(w, 192)
    rows = -(-n // columns)
    grid = Image.new("RGB", (columns * cell_w, rows * (h + caption_height)), "white")
    draw = ImageDraw.Draw(grid)
    for i in range(n):
        x, y = (i % columns) * cell_w, (i // columns) * (h + caption_height)
        grid.paste(Image.fromarray(images[i]), (x, y))
        draw.text((x + 2, y + h + 2), prompts[i][:32], fill="black")
        draw.text((x + 2, y + h + 18), f"reward {scores[i]:.3f}", fill="black")
    return grid
