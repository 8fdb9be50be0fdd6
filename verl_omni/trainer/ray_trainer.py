"""The training loop of any registered algorithm: rollout → reward → advantages → LoRA update → weight sync.

The driver owns the LoRA actor (one device; plain module) and talks to the engine replicas through the
agent-loop manager (rollout) and the server manager (sleep / wake / LoRA sync). Nothing here knows which
engine runs behind the replicas.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from contextlib import contextmanager
from dataclasses import asdict, replace
from typing import Any, Optional

import numpy as np
import ray
import torch
from tqdm import tqdm
from verl import DataProto

from verl_omni.agent_loop.diffusion_agent_loop import DiffusionAgentLoopManager, DiffusionServerClient
from verl_omni.algorithms import get_algorithm
from verl_omni.config.trainer import FlowGRPOConfig
from verl_omni.core.dtypes import resolve_dtype
from verl_omni.core.errors import NonFiniteError
from verl_omni.core.logs import output_is_a_terminal
from verl_omni.core.media import media_samples
from verl_omni.core.workarounds import quiet_accelerator_warnings_on_cpu
from verl_omni.models.vae_memory import decode_activation_bytes
from verl_omni.pipelines import get_pipeline_class
from verl_omni.pipelines.loading import (
    check_pipeline_matches,
    check_schedule,
    vae_scale_factor_of,
    vae_scale_factor_of_config,
)
from verl_omni.pipelines.tiny import resolve_model_path
from verl_omni.rewards import RewardManager
from verl_omni.rewards.pool import RewardPool, resolve_num_reward_workers
from verl_omni.rewards.registry import RewardResult, row_metadata
from verl_omni.rollout.server_manager import DiffusionServerManager
from verl_omni.rollout.weight_sync import check_ranks_agree, push_lora
from verl_omni.trainer.checkpoint import (
    check_lora_fits,
    load_resumable_checkpoint,
    lora_meta,
    prepare_run_directory,
    resume_past_total_message,
    save_checkpoint,
)
from verl_omni.trainer.colocated_actor import ColocatedActorGroup
from verl_omni.trainer.console import use_short_console_line
from verl_omni.trainer.data import PromptDataset
from verl_omni.trainer.media_outputs import video_fps, write_samples, write_validation
from verl_omni.trainer.ray_watchdog import start_ray_watchdog
from verl_omni.trainer.run_lock import acquire_run_lock
from verl_omni.trainer.run_summary import write_run_summary
from verl_omni.trainer.stopping import GracefulStop, NoSignalWatch
from verl_omni.workers.actor import DiffusionLoRAActor
from verl_omni.workers.fsdp_actor import FSDPLoRAActorGroup
from verl_omni.workers.full_weights import (
    GiB,
    HostBudget,
    PipelineShape,
    check_full_weights_fit,
    check_host_memory_fits,
    plan_full_weights_memory,
    plan_inputs,
    text_encoder_bytes,
)
from verl_omni.workers.text_encoder_offload import offload_enabled

logger = logging.getLogger(__name__)


def largest_decode_rows(cfg: FlowGRPOConfig) -> int:
    """Rows of the largest VAE decode one engine call makes: a training group's ``rollout.n`` and, where the run
    validates (``trainer.test_freq > 0`` with ``data.val_files``), a validation group's ``val_kwargs.n`` (a replica
    joins the requests of one prompt), ``rollout.pipeline.vae_decode_batch`` at a time."""
    rollout = cfg.actor_rollout_ref.rollout
    groups = [rollout.n]
    if cfg.trainer.test_freq > 0 and cfg.data.val_files:
        groups.append(rollout.val_kwargs.n)
    batch = rollout.pipeline.vae_decode_batch
    return max(min(n, batch or n) for n in groups)


def full_fine_tuning_plan_inputs(cfg: FlowGRPOConfig, shape: PipelineShape) -> tuple[int, dict[str, int]]:
    """(trained weights, ``plan_full_weights_memory``'s keyword arguments) of ``cfg``'s full fine-tuning on a
    pipeline of ``shape``: what the start-up check plans, for any number of GPUs and either offload setting."""
    ref = cfg.actor_rollout_ref
    params = ref.rollout.sampling_params()
    dtype = resolve_dtype(ref.actor.dtype)
    dtype_bytes = dtype.itemsize
    vae_scale_factor = vae_scale_factor_of_config(shape.vae) or 8
    num_frames = getattr(ref.model.family_options, "num_frames", 1)  # a video family's clip length
    num_params, frozen, activations = plan_inputs(
        shape,
        dtype_bytes=dtype_bytes,
        rows=2 * ref.actor.ppo_micro_batch_size_per_gpu,  # CFG's two branches, batched
        text_tokens=params.max_sequence_length,
        height=params.height,
        width=params.width,
        vae_scale_factor=vae_scale_factor,
        num_frames=num_frames,
    )
    decode = decode_activation_bytes(
        shape.vae,
        largest_decode_rows(cfg),
        params.height,
        params.width,
        vae_scale_factor,
        num_frames,
        dtype=dtype,
        decode=get_pipeline_class(ref.model.pipeline).vae_decode,
    )
    # model.text_encoder_offload: the text encoders leave the GPU for each update (workers/text_encoder_offload.py)
    offloaded = offload_enabled(ref.model.text_encoder_offload, torch.device(ref.actor.device))
    kwargs = dict(
        weight_bytes=dtype_bytes,
        frozen_bytes=frozen,
        activation_bytes=activations,
        # float32 copies of the weights, each sharded like the master (workers/full_weights.py
        # ShardedShadowWeights): the policy EMA and those the algorithm keeps (e.g. an old policy)
        sharded_copies=int(ref.actor.ema.enable) + get_algorithm(cfg.algorithm.name).shadow_weight_copies,
        bucket_mb=ref.actor.grad_bucket_mb,
        offloaded_frozen_bytes=text_encoder_bytes(shape, dtype_bytes) if offloaded else 0,
        decode_bytes=decode,
    )
    return num_params, kwargs


def check_full_fine_tuning_memory(cfg: FlowGRPOConfig, path: str, host: Optional[HostBudget] = None) -> None:
    """Full fine-tuning's per-GPU footprint (workers/full_weights.py), printed before Ray starts; refused with its
    numbers and the option that fits when it exceeds the GPU the driver sees (no GPU here: the GPU is not checked),
    or, with the optimizer offload, when a node's share of host memory exceeds what this node leaves for it
    (``host``; default: ``HostBudget.of_this_node``, below Ray's memory monitor's limit; the nodes taken to be
    alike)."""
    ref = cfg.actor_rollout_ref
    num_params, kwargs = full_fine_tuning_plan_inputs(cfg, PipelineShape.from_model_dir(path))
    plan = plan_full_weights_memory(num_params, cfg.num_replicas, ref.actor.optimizer_offload, **kwargs)
    gpu_bytes = None
    if ref.actor.on_cuda and torch.cuda.is_available():
        gpu_bytes = torch.cuda.get_device_properties(0).total_memory
        plan = check_full_weights_fit(num_params, cfg.num_replicas, ref.actor.optimizer_offload, gpu_bytes, **kwargs)
    print(f"[verl_omni] full fine-tuning memory plan: {plan.describe()}")
    if plan.host_total:
        host = HostBudget.of_this_node(cfg.trainer.n_gpus_per_node) if host is None else host
        need = check_host_memory_fits(
            plan,
            cfg.trainer.n_gpus_per_node,
            host.for_shards,
            # each GPU's process keeps its own host copy of the text encoders (workers/text_encoder_offload.py)
            text_encoder_host_bytes=kwargs["offloaded_frozen_bytes"],
            replan=lambda gpus, offload: plan_full_weights_memory(num_params, gpus, offload, **kwargs),
            gpu_bytes=gpu_bytes,
            budget=f"this node leaves for them ({host.reckoning()})",
        )
        print(f"[verl_omni] full fine-tuning host memory per node: {need / GiB:.2f} GiB of the {host.describe()}")


class FlowGRPOTrainer:
    def __init__(self, config: Any):
        """``config``: the Hydra tree (or a ``FlowGRPOConfig``); parsed and validated here, once."""
        self.config = FlowGRPOConfig.from_omega(config)
        self.rollout_cfg = self.config.actor_rollout_ref.rollout
        # algorithm.name's algorithm: its advantages here, its sampling in the agent loops, its loss on the actor
        self.algorithm = self.config.algorithm.make(self.config.actor_rollout_ref.actor, self.rollout_cfg)
        self.algorithm.bind_pipeline(get_pipeline_class(self.config.actor_rollout_ref.model.pipeline))
        self.loop = asyncio.new_event_loop()
        self.global_step = 0
        # each trained step's metrics, filled as fit() goes: what a run that stops with an exception completed
        self.history: list[dict[str, float]] = []
        self._lora_checksum: Optional[str] = None  # last_lora_checksum
        self.output_dir = os.path.abspath(os.path.expanduser(self.config.trainer.default_local_dir))
        self.graceful_stop = GracefulStop()  # SIGTERM / Ctrl-C: finish the step, stop, exit 143 / 130
        self.no_signal = NoSignalWatch(self.config.trainer.max_steps_without_signal)
        self._ray_watchdog = None

    # ------------------------------------------------------------------ setup
    def init(self) -> FlowGRPOTrainer:
        # One writer per run directory: a second trainer on trainer.default_local_dir refuses to start.
        self.run_lock = acquire_run_lock(self.output_dir)
        try:
            self.graceful_stop.install()
            # Never mix a new run into another run's checkpoints (resume_mode=disable there is refused).
            prepare_run_directory(self.output_dir, self.config.trainer.resume_mode)
            return self._init()
        except BaseException:
            self.graceful_stop.uninstall()
            self.run_lock.release()  # a failed start leaves the directory free (shutdown may never be called)
            raise

    def _init(self) -> FlowGRPOTrainer:
        quiet_accelerator_warnings_on_cpu()
        ref = self.config.actor_rollout_ref
        model = replace(
            ref.model, path=resolve_model_path(ref.model.path, os.path.join(self.output_dir, "tiny_models"))
        )
        self.config = replace(self.config, actor_rollout_ref=replace(ref, model=model))
        cfg = self.config
        self._check_model(model.path)
        torch.manual_seed(cfg.trainer.seed)
        np.random.seed(cfg.trainer.seed)
        self._started_ray = not ray.is_initialized()
        if self._started_ray and os.environ.get("RAY_ADDRESS"):
            # A Ray cluster of several nodes (`ray start --head` / `ray start --address=...`): join it; its nodes
            # bring their own CPUs and GPUs, and the replicas' placement group spans them.
            ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
        elif self._started_ray:
            num_cpus = cfg.trainer.ray_num_cpus or max(4, os.cpu_count() or 1)
            ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=True)
            # The local instance's processes die with this one even when it is SIGKILLed.
            self._ray_watchdog = start_ray_watchdog()
        self.graceful_stop.install()  # ray.init replaced the SIGTERM handler with its own
        self._check_gpus()
        self.train_data = PromptDataset(cfg.data.train_files, cfg.data.prompt_key)
        self.val_data = None
        if cfg.trainer.test_freq > 0 and cfg.data.get("val_files"):
            self.val_data = PromptDataset(cfg.data.val_files, cfg.data.prompt_key, cfg.data.get("val_max_samples"))
        self.servers = self._run(DiffusionServerManager(self.rollout_cfg, model, cfg.num_replicas).start())
        self.reward_pool = self._start_reward_pool()
        client = DiffusionServerClient(config=cfg, load_balancer_handle=self.servers.load_balancer)
        # verl's create() runs the async set-up to completion
        self.agent_loops = DiffusionAgentLoopManager.create(cfg, client, reward_pool=self.reward_pool)
        self.actor = self._build_actor()
        if cfg.trainer.resume_mode == "auto":
            self._maybe_resume()
        # The engines start from the actor's adapter (fresh or resumed): one verified sync before step 1.
        self.sync_weights()
        from verl.utils.tracking import Tracking

        loggers = list(cfg.trainer.logger)
        # verl's tensorboard backend reads TENSORBOARD_DIR; default it to the run directory for this call only.
        user_dir = os.environ.get("TENSORBOARD_DIR")
        os.environ["TENSORBOARD_DIR"] = user_dir or os.path.join(self.output_dir, "tensorboard")
        try:
            self.tracker = Tracking(cfg.trainer.project_name, cfg.trainer.experiment_name, loggers, asdict(cfg))
        finally:
            if user_dir is None:
                del os.environ["TENSORBOARD_DIR"]
        use_short_console_line(self.tracker)  # the key figures on the console; every metric in the other backends
        return self

    def _start_reward_pool(self) -> Optional[RewardPool]:
        """``reward.streaming``: a pool of reward workers that scores each group as it returns (else the driver scores
        the whole batch after the rollout)."""
        reward = self.config.reward
        if not reward.streaming:
            self._post_hoc_rewards = RewardManager(reward.as_dict())
            return None
        workers = resolve_num_reward_workers(
            reward.num_workers,
            cpu_cores=int(ray.cluster_resources().get("CPU", 1)),
            num_replicas=self.config.num_replicas,
            agent_loop_workers=self.rollout_cfg.agent.num_workers,
        )
        # Hybrid engine on GPUs: the replicas' placement group holds every GPU; model rewards sit beside them.
        return RewardPool(reward.as_dict(), workers, colocate_models_with=self.servers.placement_group)

    def _check_model(self, path: str) -> None:
        """Start-up checks that need the model directory, before Ray starts: it exists, it holds the model that
        ``model.pipeline`` loads, the image size fits its VAE, and its scheduler accepts the step counts (training
        and validation)."""
        if not os.path.isdir(path) or not os.path.exists(os.path.join(path, "model_index.json")):
            raise FileNotFoundError(
                f"actor_rollout_ref.model.path={path!r} is not a diffusers pipeline directory "
                "(no model_index.json there); or use tiny:<family>, a family's tiny random model"
            )
        check_pipeline_matches(path, self.config.actor_rollout_ref.model.pipeline)
        if self.config.actor_rollout_ref.model.lora_rank == 0:
            check_full_fine_tuning_memory(self.config, path)
        for validate in (False, True):
            params = self.rollout_cfg.sampling_params(validate=validate)
            where = "val_kwargs" if validate else "pipeline"
            try:
                params.validate(vae_scale_factor_of(path))
                check_schedule(path, params.num_inference_steps)
            except ValueError as exc:
                raise ValueError(f"actor_rollout_ref.rollout.{where}: {exc}") from None

    def _build_actor(self):
        """The hybrid engine's ranks (one beside each replica's engine), or, split: one process or W FSDP ranks.
        All three have the same interface; all start from the adapter seeded by ``trainer.seed``."""
        ref, seed, algorithm = self.config.actor_rollout_ref, self.config.trainer.seed, self.config.algorithm
        if ref.hybrid_engine:
            return ColocatedActorGroup(
                self.servers,
                ref.actor,
                lora_seed=seed,
                algorithm=algorithm,
                pipeline=ref.model.pipeline,
                full_weights=ref.model.lora_rank == 0,
            )
        if ref.actor.world_size > 1:
            return FSDPLoRAActorGroup(ref.model, ref.actor, self.rollout_cfg, lora_seed=seed, algorithm=algorithm)
        return DiffusionLoRAActor(ref.model, ref.actor, self.rollout_cfg, lora_seed=seed, algorithm=algorithm)

    def _check_gpus(self) -> None:
        """Each cuda replica and each FSDP rank holds a whole GPU: fail now, naming the keys, not hang in Ray."""
        actor = self.config.actor_rollout_ref.actor
        needed = self.config.num_replicas if self.rollout_cfg.on_cuda else 0
        if actor.world_size > 1 and actor.on_cuda:
            needed += actor.world_size
        available = ray.cluster_resources().get("GPU", 0)
        if needed > available:
            raise ValueError(
                f"actor_rollout_ref.rollout.num_replicas={self.rollout_cfg.num_replicas} and "
                f"actor_rollout_ref.actor.world_size={actor.world_size} need {needed} GPUs; the Ray cluster has "
                f"{available:g} (sharing one GPU between a replica and an FSDP rank is not supported yet)"
            )

    def _run(self, coro):
        if self.loop.is_closed():  # after shutdown(): the engines and the loop that reached them are gone
            coro.close()  # never run: no "was never awaited" warning on top of the error
            raise RuntimeError(
                "the trainer was shut down: read what needs its engines (e.g. last_lora_checksum in the hybrid "
                "engine, which is computed from them) before shutdown()"
            )
        return self.loop.run_until_complete(coro)

    def _maybe_resume(self) -> None:
        # Verified before anything is loaded; a damaged newest checkpoint is named, then skipped or fatal.
        # Full fine-tuning: the weights file is verified here, then every rank reads it itself (no weights in
        # the driver); the shape check reads the file's header.
        full = self.full_weights
        checkpoint = load_resumable_checkpoint(
            self.output_dir, self.config.trainer.resume_on_damage, weights_in_memory=not full
        )
        if checkpoint is None:
            return
        # A changed lora_rank / alpha / target_modules is named here, not as a size mismatch inside a rank.
        if full:
            expected = self.actor.weight_shapes()
        else:
            expected = {name: tensor.shape for name, tensor in self.actor.lora_state_dict().items()}
        check_lora_fits(checkpoint, self._lora_meta(), expected)
        if full:
            self.actor.load_weights_file(checkpoint.lora_file)
        else:
            self.actor.load_lora_state_dict(checkpoint.lora)
        checkpoint.restore(self.actor.optimizer)
        self._resume_ema(checkpoint)
        self.global_step = checkpoint.step
        print(f"[verl_omni] resumed from {checkpoint.path} at global step {self.global_step}")
        past_total = resume_past_total_message(self.global_step, self.config.trainer.total_training_steps)
        if past_total:
            logger.warning(past_total)
            print(f"[verl_omni] {past_total}")

    @property
    def full_weights(self) -> bool:
        """Full fine-tuning (``lora_rank=0``, hybrid engine): the ranks write and read the weights file themselves."""
        return self.config.actor_rollout_ref.model.lora_rank == 0

    @property
    def ema_enabled(self) -> bool:
        return self.config.actor_rollout_ref.actor.ema.enable

    def _resume_ema(self, checkpoint) -> None:
        if not self.ema_enabled:
            if checkpoint.ema is not None:
                logger.info("%s holds a policy EMA, unused (actor_rollout_ref.actor.ema.enable=false)", checkpoint.path)
            return
        if checkpoint.ema is None:
            message = (
                f"{checkpoint.path} holds no policy EMA (saved with actor_rollout_ref.actor.ema.enable=false): "
                "the EMA starts from the resumed adapter"
            )
            logger.warning(message)
            print(f"[verl_omni] {message}")
            return
        self.actor.load_ema_state_dict(checkpoint.ema)

    # ------------------------------------------------------------------ pieces of a step
    def sync_weights(self) -> None:
        """Make every replica serve the actor's adapter, verified (raises on any mismatch).

        Hybrid engine: the engines serve the adapter their ranks trained in place, so this only checks that every
        rank holds rank 0's, bitwise (one broadcast on the devices; one replica: nothing to compare). The checksum
        is computed when asked for (``last_lora_checksum``: a checkpoint's meta): hashing the recipe's float32 adapter
        (hundreds of MB) on the host every step would cost about a second. Split: LoRA tensors -> every replica, in
        memory, checksums compared: the weights training rollouts sample from (the algorithm's rollout weights,
        e.g. DiffusionNFT's old policy, else the adapter)."""
        if self.config.actor_rollout_ref.hybrid_engine:
            if len(self.servers.replicas) > 1:
                check_ranks_agree(self.actor.lora_matches_rank0())
            self._lora_checksum = None
        else:
            self._push(self.actor.rollout_lora_state_dict())

    def _push(self, tensors: dict[str, torch.Tensor]) -> None:
        self._lora_checksum = self._run(push_lora(self.servers, tensors, self.rollout_cfg.dtype))

    @contextmanager
    def _serving(self, rollout_weights: bool):
        """The engines serve the weights of a training rollout (``rollout_weights``) or the adapter being trained
        (validation) inside the block. Only an algorithm with rollout weights of its own changes anything: the
        hybrid engine's ranks swap them into the adapter and back; a split placement pushes the adapter for
        validation and the rollout weights back after it."""
        if not self.algorithm.serves_rollout_weights:
            yield
            return
        hybrid = self.config.actor_rollout_ref.hybrid_engine
        if hybrid and rollout_weights:
            self.actor.swap_in_rollout_weights()
            try:
                yield
            finally:
                self.actor.swap_out_rollout_weights()
        elif not hybrid and not rollout_weights:
            self._push(self.actor.lora_state_dict())
            try:
                yield
            finally:
                self._push(self.actor.rollout_lora_state_dict())
        else:  # the hybrid engine's validation (the adapter itself), or a split training rollout (pushed at sync)
            yield

    @property
    def last_lora_checksum(self) -> str:
        """The checksum of the adapter the engines serve since the last sync."""
        if self._lora_checksum is None and self.config.actor_rollout_ref.model.lora_rank == 0:
            # Full fine-tuning: the engines serve their ranks' own parameters (bitwise alike at sync): rank 0's.
            self._lora_checksum = self.actor.lora_checksums()[0]
        elif self._lora_checksum is None:  # the hybrid engine: computed on demand, from replica 0 (all agree)
            self._lora_checksum = self._run(self.servers.lora_checksums())[0]
        return self._lora_checksum

    def rollout(self, step: int, validate: bool = False):
        with self._serving(rollout_weights=not validate):
            return self._rollout(step, validate)

    def _rollout(self, step: int, validate: bool):
        cfg = self.config
        if not validate:
            indices = self.train_data.indices_for_step(step, cfg.data.train_batch_size, cfg.data.seed, cfg.data.shuffle)
            return self._rollout_batch(self.train_data, indices, self.rollout_cfg.n, step, False)
        # validation: the whole validation set, data.val_batch_size prompts per rollout call
        indices = list(range(len(self.val_data)))
        size = cfg.data.val_batch_size
        outputs = [
            self._rollout_batch(self.val_data, indices[i : i + size], self.rollout_cfg.val_kwargs.n, step, True)
            for i in range(0, len(indices), size)
        ]
        weights = outputs[0].meta_info.get("reward_weights")
        # Validation keeps what it scores and shows: each call padded its prompt embeddings to its own longest
        # prompt, so those (and the empty trajectories) cannot be concatenated, and nothing trains on them.
        kept = [out.select(batch_keys=[k for k in ("media", "rewards") if k in out.batch.keys()]) for out in outputs]
        merged = DataProto.concat(kept)
        merged.meta_info = {"reward_weights": weights} if weights is not None else {}
        return merged

    def _rollout_batch(self, data: PromptDataset, indices: list[int], n: int, step: int, validate: bool):
        tag = f"val{step}-{indices[0]}" if validate else f"train{step}"
        batch = data.batch(indices, n, tag=tag)
        batch.meta_info.update(
            {"global_steps": step, "validate": validate, "n": n, "progress_bar": output_is_a_terminal()}
        )
        return self._run(self.agent_loops.generate_sequences(batch))

    def score(self, output) -> tuple[np.ndarray, dict[str, float]]:
        """(total reward per row, reward metrics): streamed by the agent loop, or computed here."""
        if "rewards" in output.batch.keys():
            rows = output.non_tensor_batch["reward_scores"]
            result = RewardResult(
                total=output.batch["rewards"].numpy().astype(np.float64),
                per_reward={name: np.array([r[name] for r in rows], dtype=np.float64) for name in rows[0]},
                weights=output.meta_info.get("reward_weights", {}),
            )
        else:
            non_tensor = output.non_tensor_batch
            result = self._post_hoc_rewards(
                media_samples(output.batch["media"]),
                list(non_tensor["prompt_text"]),
                [row_metadata(non_tensor, i) for i in range(len(output))],
            )
        return np.asarray(result.total, dtype=np.float64), result.metrics("reward")

    # ------------------------------------------------------------------ the loop
    def fit(self) -> list[dict[str, float]]:
        cfg = self.config
        history, trained_steps = self.history, []
        history.clear()
        total = cfg.trainer.total_training_steps
        # disable=None: no bar when stderr is not a TTY (a log file); the console logger prints one line per step.
        bar = tqdm(total=total, initial=self.global_step, desc=cfg.algorithm.name, dynamic_ncols=True, disable=None)
        self.graceful_stop.finish_step = True  # a first SIGTERM / SIGINT lets the step in progress finish
        checkpoint = None
        while self.global_step < total:
            step = self.global_step + 1
            metrics = self.train_step(step)
            self.global_step = step
            if metrics is not None:
                history.append(metrics)
                trained_steps.append(step)
                self.tracker.log(data=metrics, step=step)
                self.no_signal.observe(step, metrics["advantages/abs_max"])  # warns; stops after too many in a row
            saves = cfg.trainer.save_freq > 0
            if saves and (step % cfg.trainer.save_freq == 0 or step == total or self.graceful_stop.signum):
                checkpoint = self.save(step)
            if self.val_data is not None and (step % cfg.trainer.test_freq == 0 or step == total):
                self.tracker.log(data=self.validate(step), step=step)
            bar.update(1)
            self.graceful_stop.raise_if_requested(step, total, checkpoint)
        self.graceful_stop.finish_step = False
        bar.close()
        # What the run did and where its outputs are; writes <default_local_dir>/reward_curve.png.
        print(write_run_summary(self.output_dir, history, trained_steps), flush=True)
        return history

    def train_step(self, step: int) -> Optional[dict[str, float]]:
        """One step; None when it was refused for non-finite numbers under ``trainer.nan_policy=skip``."""
        try:
            metrics = self._train_step(step)
        except NonFiniteError as exc:  # the actor has restored its LoRA and optimizer state (see its update)
            trainer = self.config.trainer
            if trainer.nan_policy == "stop":
                raise
            self.skipped_in_a_row = getattr(self, "skipped_in_a_row", 0) + 1
            if self.skipped_in_a_row >= trainer.max_consecutive_skips:
                # A run that refuses every step learns nothing: stop, loudly, instead of exiting 0 later.
                raise NonFiniteError(
                    f"{self.skipped_in_a_row} consecutive steps refused for non-finite numbers (the limit is "
                    f"trainer.max_consecutive_skips={trainer.max_consecutive_skips}); last: {exc}"
                ) from exc
            logger.error("step %d refused (%s); trainer.nan_policy=skip: LoRA unchanged, continuing", step, exc)
            print(f"[verl_omni] step {step} skipped ({self.skipped_in_a_row} in a row): {exc}")
            return None
        self.skipped_in_a_row = 0
        truncated = metrics.get("rollout/truncated_prompts", 0)
        if truncated:  # one line per step, not one per prompt
            logger.warning(
                "step %d: %d of %d rows had their prompt cut at actor_rollout_ref.rollout.pipeline."
                "max_sequence_length=%d tokens",
                step,
                truncated,
                metrics.get("rollout/rows", 0),
                self.rollout_cfg.pipeline.max_sequence_length,
            )
        return metrics

    def _train_step(self, step: int) -> dict[str, float]:
        cfg = self.config
        timer = _PhaseTimer()
        self._run(self.servers.reset_stats())
        with timer("rollout"):
            output = self.rollout(step)
        # Seconds each replica's engine worked during the rollout: a replica far below the others idled.
        busy = {
            f"timing/rollout_busy_s/replica{s['replica_rank']}": s["engine_seconds"]
            for s in self._run(self.servers.stats())
        }
        with timer("reward"):
            scores, reward_metrics = self.score(output)
        advantages, advantage_metrics = self.algorithm.advantages(scores, output.non_tensor_batch["uid"])
        # Split placement on shared devices: the engines free their memory while the actor trains. The hybrid
        # engine's ranks train on the engines' own weights: nothing to free, nothing to move.
        swap = self.rollout_cfg.free_cache_engine and not cfg.actor_rollout_ref.hybrid_engine
        models = self.reward_pool is not None and self.reward_pool.model_actors
        if swap or models:
            with timer("swap"):
                if swap:
                    self._run(self.servers.sleep())
                if models:  # reward models free the GPU they share with the actor
                    self.reward_pool.offload_models()
        try:
            with timer("update"):
                actor_metrics = self.actor.update(output, advantages.float())
        finally:
            if swap or models:
                with timer("swap"):
                    if swap:
                        self._run(self.servers.wake_up())
                    if models:
                        self.reward_pool.onload_models()
        with timer("sync"):
            self.sync_weights()
        self._write_samples(step, output, scores)
        n_images = len(scores)
        return {
            **reward_metrics,
            **actor_metrics,
            **output.meta_info.get("metrics", {}),
            "advantages/mean": float(advantages.mean()),
            "advantages/abs_max": float(advantages.abs().max()),
            **advantage_metrics,
            **timer.metrics(),
            **busy,
            "perf/img_per_s_rollout": n_images / max(timer.seconds["rollout"], 1e-9),
            "perf/img_per_s": n_images / max(timer.total, 1e-9),
        }

    def validate(self, step: int) -> dict[str, float]:
        """The validation set's rewards under the trained adapter (``val/*``, ``validation/step_<k>.png``) and, with
        the policy EMA on, under the EMA too (``val/ema/*``, ``validation/ema_step_<k>.png``), from the same
        prompts and seeds. Videos also give ``.mp4`` grids beside the PNG of their first frame (media_outputs.py)."""
        metrics = self._validate(step, "val", f"step_{step}")
        if self.ema_enabled:
            with self.serving_ema():
                metrics.update(self._validate(step, "val/ema", f"ema_step_{step}"))
        return metrics

    def _validate(self, step: int, prefix: str, image_name: str) -> dict[str, float]:
        output = self.rollout(step, validate=True)
        scores, metrics = self.score(output)
        grid, _ = write_validation(
            os.path.join(self.output_dir, "validation"),
            image_name,
            output.batch["media"].numpy(),
            list(output.non_tensor_batch["prompt_text"]),
            scores,
            video_fps(output.meta_info, self.config.actor_rollout_ref.model.family_options),
        )
        writer = getattr(getattr(self, "tracker", None), "logger", {}).get("tensorboard")
        if writer is not None and hasattr(writer, "writer"):
            writer.writer.add_image(f"{prefix}/grid", np.asarray(grid), step, dataformats="HWC")
        return {f"{prefix}/reward_mean": float(scores.mean()), **{f"{prefix}/{k}": v for k, v in metrics.items()}}

    @contextmanager
    def serving_ema(self):
        """The engines serve the policy EMA inside the block, the trained adapter again after it (also on an error).

        The actor's ranks swap the EMA into the adapter's own parameters, keeping its values aside: the hybrid
        engine's engines serve those parameters as they are; a split placement then pushes them to the replicas
        (verified). On exit the ranks swap back and ``sync_weights`` verifies (hybrid) or pushes (split) the
        trained adapter again."""
        self.actor.swap_in_ema()
        try:
            self.sync_weights()
            yield
        finally:
            self.actor.swap_out_ema()
            self.sync_weights()

    def _write_samples(self, step: int, output, scores: np.ndarray, prefix: str = "train") -> None:
        limit = self.config.trainer.sample_images_per_step
        if limit <= 0:
            return
        folder = os.path.join(self.output_dir, "samples", f"{prefix}_step_{step}")
        fps = video_fps(output.meta_info, self.config.actor_rollout_ref.model.family_options)
        write_samples(folder, output.batch["media"].numpy(), scores, limit, fps)

    def save(self, step: int) -> str:
        return save_checkpoint(
            self.output_dir,
            step,
            self.actor.write_weights_file if self.full_weights else self.actor.lora_state_dict(),
            self.actor.optimizer,
            {"lora_checksum": self.last_lora_checksum, "lora": self._lora_meta()},
            ema=self.actor.ema_state_dict() if self.ema_enabled else None,
        )

    def _lora_meta(self) -> dict:
        """The adapter's config in a checkpoint's meta: what resume checks and an export rebuilds it from."""
        model = self.config.actor_rollout_ref.model
        return lora_meta(model.lora_rank, model.lora_alpha, model.target_modules)

    def shutdown(self) -> None:
        try:
            for worker in getattr(getattr(self, "agent_loops", None), "agent_loop_workers", []):
                ray.kill(worker)
            if getattr(self, "servers", None) is not None:
                self._run(self.servers.shutdown())
            if getattr(self, "reward_pool", None) is not None:
                self.reward_pool.shutdown()
        finally:
            if hasattr(getattr(self, "actor", None), "shutdown"):
                self.actor.shutdown()
            self.loop.close()
            if getattr(self, "_started_ray", False):
                ray.shutdown()
            if self._ray_watchdog is not None:
                self._ray_watchdog.stop()
            self.graceful_stop.uninstall()
            if getattr(self, "run_lock", None) is not None:
                self.run_lock.release()


class _PhaseTimer:
    """Wall seconds per phase of a step (a phase may run several times: its seconds add up)."""

    PHASES = ("rollout", "reward", "swap", "update", "sync")

    def __init__(self):
        self.start = time.perf_counter()
        self.seconds = dict.fromkeys(self.PHASES, 0.0)

    @contextmanager
    def __call__(self, phase: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] += time.perf_counter() - t0

    @property
    def total(self) -> float:
        return time.perf_counter() - self.start

    def metrics(self) -> dict[str, float]:
        return {**{f"timing/{phase}_s": value for phase, value in self.seconds.items()}, "timing/step_s": self.total}
