"""The LoRA actor: one update of the configured algorithm (``algorithm.name``) over a rollout batch.

It trains a peft LoRA on an RL pipeline's transformer. The algorithm (``verl_omni/algorithms``) says which forward
passes an update makes (its units: e.g. FlowGRPO's (window step, rows) transitions) and computes each micro-batch's
loss through an ``UpdateContext``: the policy's velocity from the pipeline's own ``predict_velocity``, the
reference policy (the same transformer with the adapter disabled, so no second copy of the weights exists) and
the staged rollout tensors. The actor does the rest: planning, staging, micro-batching, backward, the gradient
all-reduce, clipping, the optimizer step, metric reduction and the non-finite check.

Where the transformer comes from:
- the hybrid engine (``actor_rollout_ref.hybrid_engine=true``): the engine's own pipeline on the same GPU
  (``pipe=``), so the frozen base weights exist once per GPU and the engine serves the trained adapter as it is;
- the split placement: a copy loaded here.

What makes the update fast without changing its result (each has an equivalence test):
- CFG's two branches as one batched forward (``actor.batch_cfg``: true; false / auto take two unmasked forwards,
  whose attention kernel is faster but whose GEMMs get half the rows: measured slower overall);
- every tensor of the step staged on the device once; no host sync inside the loop (metrics and the finite
  check are summed on the device and read once per epoch);
- gradient checkpointing of the transformer blocks (``model.enable_gradient_checkpointing``), so larger
  micro-batches fit, of the first ``model.gradient_checkpointing_blocks`` only where memory allows; regional
  ``torch.compile`` of the blocks (``actor.use_torch_compile``; explicitly false, the update runs the blocks'
  original forwards even where the engine compiled them, ``models/eager.py``); fused AdamW on GPU;
- the LoRA's matmuls in the activations' dtype (bf16), its weights float32 (``models/lora.py``);
- every SDPA backend on for the update (``core/workarounds.py`` ``update_sdpa_backends``; cuDNN's only where the
  family allows it), also in the vllm-omni worker, where vllm's import switched cuDNN's off.

Data parallel: with ``grad_sync`` (one rank per GPU) the flattened LoRA gradients and the metric sums are
all-reduced once per epoch; every rank weights its rows by the *global* number of transitions, so the summed
gradient is exactly the single-process one and every rank takes the same optimizer step.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from verl_omni.algorithms import Algorithm
from verl_omni.config.actor import ActorConfig
from verl_omni.config.algorithm import make_algorithm
from verl_omni.config.model import ModelConfig
from verl_omni.config.rollout import RolloutConfig
from verl_omni.config.sampling import ROW_SETTINGS_CONFIG_KEYS, RowSettings
from verl_omni.core.checksum import tensors_checksum
from verl_omni.core.dtypes import use_tf32_for_float32_matmuls
from verl_omni.core.errors import NonFiniteError, assert_finite
from verl_omni.core.workarounds import update_sdpa_backends
from verl_omni.models.checkpointing import KEY as CHECKPOINTING_KEY
from verl_omni.models.checkpointing import BlockCheckpointing
from verl_omni.models.eager import compiled_modules, eager_forwards
from verl_omni.models.ema import EMASchedule, PolicyEMA, ShadowWeights
from verl_omni.models.lora import get_lora_state_dict, init_lora_weights, lora_parameters, set_lora_state_dict
from verl_omni.pipelines.loading import load_rl_pipeline
from verl_omni.workers.activation_memory import AUTO, AutoCheckpointing, CudaMemory
from verl_omni.workers.gc_heap import freeze_gc_heap
from verl_omni.workers.grad_sync import LoRAGradSync
from verl_omni.workers.train_batch import TrainBatch
from verl_omni.workers.update_probe import PeakMemory, UpdateProbe

logger = logging.getLogger(__name__)


class DiffusionLoRAActor:
    # Whether an update that ran out of memory under gradient_checkpointing_blocks=auto may be retried (FSDP ranks
    # gather weights inside the forward: one rank retrying alone would break the others' collectives).
    retries_after_oom = True

    def __init__(
        self,
        model: ModelConfig,
        actor: ActorConfig,
        rollout: RolloutConfig,
        *,
        pipe: Any = None,
        grad_sync: Optional[LoRAGradSync] = None,
        device: Optional[str] = None,
        lora_seed: Optional[int] = None,
        algorithm: Any = None,
    ):
        """``pipe``: an engine's loaded pipeline to train in place (hybrid engine); None loads a copy.
        ``device``: where to train (default ``actor.device``). ``lora_seed``: initialise the adapter from this seed
        (the same adapter in every process), else keep peft's initialisation. ``algorithm``: the ``algorithm``
        config section (or its plain dict, or an ``Algorithm``); None: the default algorithm with its defaults."""
        self._check_model(model, actor)
        self.model, self.config, self.rollout = model, actor, rollout
        self.algorithm: Algorithm = make_algorithm(algorithm, actor=actor, rollout=rollout)
        self._reported_settings: set[tuple] = set()  # row settings that differ from this config, logged once each
        self.optimizer_steps = 0
        self.device = torch.device(device or actor.device)
        if pipe is None:
            # Only the transformer is needed: the VAE and text encoders stay on the CPU.
            pipe = load_rl_pipeline(
                model.path,
                model.pipeline,
                actor.dtype,
                model.lora,
                gelu_epilogue=model.gelu_epilogue,
                family_options=model.family_options,
            )
            for denoiser in pipe.denoisers.values():
                denoiser.to(self.device)
        self.pipe = pipe
        self.algorithm.bind_pipeline(pipe)
        self.transformer = pipe.transformer
        # What the adapter wraps: the transformer, or every expert of a two-expert pipeline (pipelines/base.py)
        self.lora_module = pipe.lora_module
        self.trainable = self._trainable_parameters(lora_seed)
        self.grad_sync = grad_sync or LoRAGradSync(0, 1, None, self.device)
        self._gc_heap_frozen = False
        if self.device.type == "cuda":
            use_tf32_for_float32_matmuls()
        self._set_up_speed(model, actor)
        self.optimizer = self._make_optimizer(actor)
        self._set_up_ema()
        self.algorithm.attach(self)  # after the optimizer: full fine-tuning shards the algorithm's copies like it

    # ------------------------------------------------------------------ what trains (the full actor overrides these)
    def _check_model(self, model: ModelConfig, actor: ActorConfig) -> None:
        if model.lora is None:
            raise ValueError(
                f"actor_rollout_ref.model.lora_rank={model.lora_rank} must be >= 1 (the LoRA actor trains a LoRA; "
                "lora_rank=0 trains every weight: workers/full_actor.py)"
            )

    def _trainable_parameters(self, lora_seed: Optional[int]) -> list[torch.nn.Parameter]:
        trainable = lora_parameters(self.lora_module)
        if not trainable:
            raise ValueError("the pipeline's transformer has no LoRA adapter to train")
        for p in trainable:  # the adapter trains in float32 over bf16 base weights
            p.data = p.data.float()
            p.requires_grad_(True)
        if lora_seed is not None:
            init_lora_weights(self.lora_module, lora_seed)
        return trainable

    def _make_optimizer(self, actor: ActorConfig) -> Any:
        optim = actor.optim
        fused = {"fused": True} if self.device.type == "cuda" else {}  # one kernel for the whole AdamW step
        return torch.optim.AdamW(
            self.trainable, lr=optim.lr, betas=tuple(optim.betas), weight_decay=optim.weight_decay, **fused
        )

    def _set_up_ema(self) -> None:
        """The policy EMA over ``self.trainable`` (``actor.ema.enable``), starting from the adapter's values."""
        ema = self.config.ema
        self.ema = PolicyEMA(self.trainable, EMASchedule(ema.decay, ema.update_interval)) if ema.enable else None

    def _set_up_speed(self, model: ModelConfig, actor: ActorConfig) -> None:
        on_gpu = self.device.type == "cuda"
        checkpointing = on_gpu if model.enable_gradient_checkpointing is None else model.enable_gradient_checkpointing
        self.checkpointing: Optional[BlockCheckpointing] = None
        self.memory_plan: Optional[AutoCheckpointing] = None
        self._all_reduce_started = False
        if checkpointing:
            # Only takes effect with gradients enabled: rollouts through the same module are unaffected.
            blocks = model.gradient_checkpointing_blocks
            memory = CudaMemory(self.device) if blocks == AUTO and on_gpu else None
            recomputed = None if blocks == AUTO else blocks  # auto starts from every block (None)
            self.checkpointing = self._block_checkpointing(recomputed, memory and memory.allocated)
            if memory is not None:
                utilization = model.gradient_checkpointing_memory_utilization
                self.memory_plan = AutoCheckpointing(self.checkpointing, memory, utilization)
            elif blocks == AUTO:
                logger.info("%s=auto measures GPU memory; on %s every block recomputes", CHECKPOINTING_KEY, self.device)
        else:
            for denoiser in self.pipe.denoisers.values():
                denoiser.disable_gradient_checkpointing()
        engine_compiled = bool(compiled_modules(self.lora_module))  # vllm-omni compiles the blocks it serves
        # Explicitly false: the update runs the blocks' original forwards even where the engine compiled them.
        self.eager_update = actor.use_torch_compile is False
        if self.eager_update and engine_compiled:
            logger.info(
                "actor.use_torch_compile=false: the update runs the transformer blocks' original forwards; the "
                "engine's rollouts keep its compiled blocks"
            )
        if actor.compile_blocks and not engine_compiled:
            # Regional compile (one graph reused by every block), as diffusers' compile_repeated_blocks does.
            for denoiser in self.pipe.denoisers.values():
                denoiser.compile_repeated_blocks(dynamic=True)

    def _block_checkpointing(
        self, recomputed: Optional[int], allocated: Optional[Callable[[], int]]
    ) -> BlockCheckpointing:
        """The blocks' checkpointing: the transformer's and, in a two-expert pipeline, the low-noise expert's with
        the same blocks recomputed (with ``auto``, the memory plan's choice for both)."""
        return BlockCheckpointing(self.transformer, recomputed, allocated, others=self._other_experts())

    def _other_experts(self) -> list[torch.nn.Module]:
        """The denoisers besides ``transformer`` (a two-expert pipeline's low-noise expert)."""
        return [d for d in self.pipe.denoisers.values() if d is not self.transformer]

    @property
    def checkpointed_blocks(self) -> int:
        """How many transformer blocks recompute in the backward pass (this update's, with ``auto``)."""
        return self.checkpointing.recomputed if self.checkpointing is not None else 0

    # ------------------------------------------------------------------ weights
    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        return get_lora_state_dict(self.lora_module)

    def load_lora_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        set_lora_state_dict(self.lora_module, tensors)
        self.algorithm.attach(self)  # state kept beside the adapter restarts from the loaded one

    def shadow_weights(self) -> ShadowWeights:
        """A float32 copy of the trainable weights for an algorithm to keep beside them (DiffusionNFT's old
        policy): the adapter's tensors whole on every rank. Full fine-tuning shards it like its master."""
        return ShadowWeights(self.trainable)

    # ------------------------------------------------------------------ the weights training rollouts sample from
    def swap_in_rollout_weights(self) -> None:
        """Put the algorithm's rollout weights (if it has any) into the adapter the engine serves (hybrid engine)."""
        weights = self.algorithm.rollout_weights()
        if weights is not None:
            weights.swap_in()

    def swap_out_rollout_weights(self) -> None:
        """The adapter's own values back after a rollout (a no-op when nothing is swapped in)."""
        weights = self.algorithm.rollout_weights()
        if weights is not None and weights.is_swapped_in:
            weights.swap_out()

    def rollout_lora_state_dict(self) -> dict[str, torch.Tensor]:
        """The adapter's tensors as training rollouts use them: the algorithm's rollout weights, or the adapter."""
        weights = self.algorithm.rollout_weights()
        if weights is None:
            return self.lora_state_dict()
        with weights.swapped_in():
            return self.lora_state_dict()

    def lora_checksum(self) -> str:
        return tensors_checksum(self.lora_state_dict())

    def lora_matches_rank0(self) -> bool:
        """Whether this rank's adapter is bitwise rank 0's (a collective: every rank calls it). Rank 0's is sent to
        every rank over the gradients' group: one broadcast of the flattened adapter on the device, cheaper than
        hashing it on the host at the real size."""
        with torch.no_grad():
            mine = torch.cat([p.detach().reshape(-1) for p in self.trainable])
            return bool(torch.equal(mine, self.grad_sync.broadcast_(mine.clone())))

    def optimizer_state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_optimizer_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)

    # ------------------------------------------------------------------ the policy EMA
    def _after_optimizer_step(self) -> None:
        """What follows every optimizer step besides the adapter: the policy EMA's schedule, then the algorithm's
        own state (``Algorithm.after_optimizer_step``)."""
        self.optimizer_steps += 1
        if self.ema is not None:
            self.ema.after_optimizer_step()
        self.algorithm.after_optimizer_step(self, self.optimizer_steps)

    def _policy_ema(self) -> PolicyEMA:
        if self.ema is None:
            raise RuntimeError("the policy EMA is off (actor_rollout_ref.actor.ema.enable=false)")
        return self.ema

    def swap_in_ema(self) -> None:
        """The adapter's parameters hold the EMA until :meth:`swap_out_ema` (the engines of the hybrid engine serve
        these very parameters; a split placement pushes ``lora_state_dict()`` now to serve it)."""
        self._policy_ema().weights.swap_in()

    def swap_out_ema(self) -> None:
        """The trained adapter's values back in its parameters, bit for bit."""
        self._policy_ema().weights.swap_out()

    def ema_state_dict(self) -> Optional[dict]:
        """``{"lora": the EMA as adapter tensors (peft names, like lora_state_dict), "optimizer_steps": int}``:
        plain data, loadable as the adapter itself. None where ``lora_state_dict`` is (FSDP ranks other than 0)."""
        with self._ema_in_params():
            tensors = self.lora_state_dict()
        return None if tensors is None else {"lora": tensors, "optimizer_steps": self.ema.optimizer_steps}

    def load_ema_state_dict(self, state: dict) -> None:
        """Restore what :meth:`ema_state_dict` returned; the adapter's own values are left as they were."""
        ema = self._policy_ema()
        with torch.no_grad():
            live = [p.detach().clone() for p in self.trainable]
            self.load_lora_state_dict(state["lora"])
            ema.weights.copy_from_live()
            for p, value in zip(self.trainable, live, strict=True):
                p.copy_(value)
        ema.optimizer_steps = int(state["optimizer_steps"])

    def ema_checksum(self) -> Optional[str]:
        """The checksum of the EMA as adapter tensors (what the engines serve while it is swapped in); None where
        ``ema_state_dict`` is."""
        state = self.ema_state_dict()
        return None if state is None else tensors_checksum(state["lora"])

    @contextmanager
    def _ema_in_params(self):
        """The EMA in the adapter's parameters inside the block (already there between swap_in / swap_out)."""
        weights = self._policy_ema().weights
        if weights.is_swapped_in:
            yield
        else:
            with weights.swapped_in():
                yield

    @contextmanager
    def _adapter_disabled(self):
        self.lora_module.disable_adapters()
        try:
            yield
        finally:
            self.lora_module.enable_adapters()

    # ------------------------------------------------------------------ the update's plan
    def plan(self, batch: TrainBatch) -> list[MicroBatch]:
        """Every micro-batch of an epoch, from the batch on the host: the algorithm's units split into micro-batches,
        each with its rows and tensors (on the device) and its model inputs, prepared once (their host work --
        trimming padding, dropping all-ones masks -- happens here, before any training compute is queued, so the
        loop itself never waits for the device). CFG's scale is the rows' own (``row_settings``)."""
        guidance = self._guidance(self.row_settings(batch))
        out = []
        for step, unit_rows in self.algorithm.units(batch):
            for rows, idle in self._micro_batches(unit_rows):
                cond = batch.conditioning(rows).without_padding()
                inputs = self._model_inputs(cond, guidance)
                tensors = {k: v.to(self.device) for k, v in self.algorithm.micro_tensors(batch, step, rows).items()}
                out.append(MicroBatch(step, rows.to(self.device), inputs, idle, tensors))
        return out

    def compute_log_probs(self, data: Any, step: int, rows: torch.Tensor):
        """The algorithm's log-probs of ``rows`` at its step ``step`` of a verl ``DataProto`` rollout batch (tests,
        tools); for FlowGRPO (log_prob [b], prev_sample_mean, std_dev_t) of the window transition."""
        host = TrainBatch.from_data_proto(data, torch.zeros(len(data)))
        inputs = self._model_inputs(host.conditioning(rows).without_padding(), self._guidance(self.row_settings(host)))
        tensors = {k: v.to(self.device) for k, v in self.algorithm.micro_tensors(host, step, rows).items()}
        micro = MicroBatch(step, rows.to(self.device), inputs, False, tensors)
        return self.algorithm.log_probs(self._context(host), micro)

    def _context(self, host: TrainBatch) -> UpdateContext:
        """The algorithm's view of one update: ``host``'s tensors staged on the device, its update-wide constants
        and the sampling settings its rows were produced with."""
        staged = _stage(host, self.algorithm.staged_fields, self.device)
        return UpdateContext(self, staged, self.algorithm.update_constants(host), self.row_settings(host))

    # ------------------------------------------------------------------ the rows' sampling settings
    def row_settings(self, batch: TrainBatch) -> Optional[RowSettings]:
        """The settings ``batch``'s rows were sampled with (None without rows), which the update recomputes their
        log-probs with; ``ValueError`` naming the field for a batch without them or with rows that differ. Where
        they differ from what this actor's config would sample (``Algorithm.sampling`` of the rollout's params),
        the rows win and the difference is logged once."""
        settings = batch.row_settings()
        if settings is not None:
            self._report_differences(settings)
        return settings

    def _report_differences(self, settings: RowSettings) -> None:
        expected = self.algorithm.sampling(self.rollout.sampling_params(), step=1, group_seed=0, validate=False)
        for name, (rows, config) in settings.differences(expected).items():
            if (name, rows, config) in self._reported_settings:
                continue
            self._reported_settings.add((name, rows, config))
            logger.warning(
                "the rollout rows were sampled with %s=%r, the actor's config gives %r (%s): the update uses the "
                "rows' value",
                name,
                rows,
                config,
                ROW_SETTINGS_CONFIG_KEYS[name],
            )

    def _guidance(self, settings: Optional[RowSettings]) -> float:
        """CFG's scale for the update's forwards: the rows' (the algorithm's for a rank without rows)."""
        return self.algorithm.guidance_scale if settings is None else settings.guidance_scale

    def _model_inputs(self, cond: Any, guidance: float) -> Any:
        return self.pipe.prepare_model_inputs(
            cond,
            guidance,
            batch_cfg=self.config.batch_cfg,
            device=self.device,
            unmasked_kernel=sdpa_has_unmasked_kernel(self.device, self.transformer.dtype),
        )

    # ------------------------------------------------------------------ hooks of the FSDP actor (split placement)
    def _micro_batches(self, step_rows: torch.Tensor) -> list[tuple[torch.Tensor, bool]]:
        """(rows, idle) chunks of one window step's rows this process trains on; idle: a pass with gradient 0."""
        return [(rows, False) for rows in step_rows.split(self.config.ppo_micro_batch_size_per_gpu)]

    def _clip_grad_norm(self) -> torch.Tensor:
        """Clip the accumulated LoRA gradients; the total norm as a plain scalar tensor."""
        return torch.nn.utils.clip_grad_norm_(self.trainable, self.config.grad_clip)

    # ------------------------------------------------------------------ update
    def update(self, data: Any, advantages: torch.Tensor) -> dict[str, float]:
        """One update of the algorithm over a verl ``DataProto`` rollout batch."""
        return self.update_batch(TrainBatch.from_data_proto(data, advantages))

    def update_batch(self, batch: TrainBatch, num_terms: Optional[int] = None) -> dict[str, float]:
        """One update over ``batch`` (on the host); ``num_terms``: the algorithm's loss terms of the whole step over
        all ranks (default: this batch's). Raises ``NonFiniteError`` before stepping on NaN/inf (LoRA unchanged)."""
        for name in self.algorithm.checked_fields:
            assert_finite(name, batch.tensors[name])
        num_terms = self.algorithm.num_terms(batch) if num_terms is None else num_terms
        if num_terms == 0:
            message = self.algorithm.no_terms_message(batch)
            if message is not None:
                raise ValueError(message)
            logger.info("the update has no terms over all ranks (algorithm %r): no optimizer step", self.algorithm.name)
        with PeakMemory(self.device) as peaks:
            metrics = self._update_retrying_oom(batch, num_terms)
        metrics.update({f"actor/{k}": v for k, v in peaks.metrics().items()})
        if self.config.freeze_gc_heap and not self._gc_heap_frozen:
            # After the warm-up (the compiled training graphs exist): later full collections skip what lives on.
            objects, seconds = freeze_gc_heap()
            self._gc_heap_frozen = True
            logger.info(
                "froze the GC heap after the first update: %d objects, %.2f s (actor.freeze_gc_heap)", objects, seconds
            )
        return metrics

    def _update_retrying_oom(self, batch: TrainBatch, num_terms: int) -> dict[str, float]:
        start = time.perf_counter()
        try:
            return self._update_once(batch, num_terms, start)
        except torch.OutOfMemoryError as exc:
            if not self._may_retry_after_oom():
                raise
            error = str(exc).splitlines()[0][:200]
        # Outside the except block: the failed attempt's frames (and the activations they hold) are gone by now.
        self.memory_plan.after_oom(error)
        torch.cuda.empty_cache()
        return self._update_once(batch, num_terms, start)

    def _may_retry_after_oom(self) -> bool:
        """Whether an out-of-memory error may be retried with every block recomputed: only under ``auto`` (a fixed
        count is the user's), and only if no rank can be waiting for this one in a collective of the failed
        attempt (the gradients' all-reduce is the first; with one rank there is none)."""
        alone_or_before_all_reduce = self.grad_sync.world_size == 1 or not self._all_reduce_started
        return self.memory_plan is not None and self.retries_after_oom and alone_or_before_all_reduce

    def _update_once(self, batch: TrainBatch, num_terms: int, start: float) -> dict[str, float]:
        if self.memory_plan is not None:  # before the batch is staged: the plan counts it
            self.memory_plan.before_update()
        self._all_reduce_started = False
        plan = self.plan(batch)
        ctx = self._context(batch)
        # With several epochs an epoch can fail after an earlier one stepped: keep what to restore (on the device).
        snapshot = self._snapshot() if self.config.ppo_epochs > 1 else None
        self.lora_module.train()
        try:
            # vllm-omni runs its worker's calls under inference mode: training needs autograd back.
            with (
                torch.inference_mode(False),
                torch.enable_grad(),
                update_sdpa_backends(self.pipe),
                self._update_forwards(),
                UpdateProbe(self.device) as probe,
            ):
                metrics = self._update(ctx, plan, num_terms)
            metrics.update({f"actor/{k}": v for k, v in probe.metrics().items()})
            # This process's own wall time (the all-reduce waited for the slowest rank): shows idle ranks.
            metrics["actor/busy_s"] = time.perf_counter() - start
            metrics["actor/recomputed_blocks"] = self.checkpointed_blocks
            if self.memory_plan is not None:
                self.memory_plan.after_update()
            return metrics
        except (NonFiniteError, torch.OutOfMemoryError):
            self.optimizer.zero_grad(set_to_none=True)  # nothing of the failed attempt carries over
            if snapshot is not None:
                self._restore(snapshot)
            raise
        finally:
            self.lora_module.eval()

    def _update_forwards(self) -> AbstractContextManager:
        """Which forwards the update's blocks run, their backward's recomputations included (the backward runs
        inside ``_update``): the originals with ``actor.use_torch_compile=false``, else the blocks as they are."""
        return eager_forwards(self.lora_module) if self.eager_update else nullcontext()

    def _snapshot(self) -> tuple[list[torch.Tensor], dict, Any]:
        ema = self.ema.snapshot() if self.ema is not None else None
        return [p.detach().clone() for p in self.trainable], copy.deepcopy(self.optimizer.state_dict()), ema

    def _restore(self, snapshot: tuple[list[torch.Tensor], dict, Any]) -> None:
        params, optimizer_state, ema = snapshot
        with torch.no_grad():
            for p, saved in zip(self.trainable, params, strict=False):
                p.copy_(saved)
        self.optimizer.load_state_dict(optimizer_state)
        if ema is not None:
            self.ema.restore(ema)

    def _update(self, ctx: UpdateContext, plan: list[MicroBatch], num_terms: int) -> dict[str, float]:
        cfg = self.config
        sums: dict[str, torch.Tensor] = {}
        grad_norms = []
        self._prepare_grads()
        compute_s = 0.0
        if num_terms == 0:  # nothing to train on anywhere (every rank sees the same global count): no step
            return {"actor/compute_s": compute_s, "actor/grad_norm": 0.0, "actor/num_train_terms": 0}
        for _ in range(cfg.ppo_epochs):
            epoch_start = time.perf_counter()
            self.optimizer.zero_grad(set_to_none=False)
            self.algorithm.prepare_epoch(ctx, plan)
            bad = torch.zeros((), device=self.device)  # non-finite values the loss saw (read once, below)
            for micro in plan:
                out = self.algorithm.loss(ctx, micro)
                if micro.idle:  # keeps FSDP's collectives in step; contributes nothing
                    self._backward(out.loss * 0.0)
                    continue
                bad = bad + out.bad
                # Weight by rows so the accumulated gradient is the mean over all the update's terms.
                weight = len(micro.rows) / num_terms
                self._backward(out.loss * weight)
                for key, value in out.metrics.items():
                    sums[key] = sums.get(key, 0.0) + value * (weight / cfg.ppo_epochs)
            if self.device.type == "cuda":  # the all-reduce waits for the device anyway: no extra stall
                torch.cuda.synchronize(self.device)
            compute_s += time.perf_counter() - epoch_start
            self._all_reduce_started = True
            grad_norms.append(self._reduce_and_clip(bad))
            self.optimizer.step()
            self._after_optimizer_step()
        metrics = self._reduce_metrics(sums)
        # This rank's forward/backward seconds, without the wait for the other ranks in the all-reduce.
        metrics["compute_s"] = compute_s
        metrics["grad_norm"] = sum(grad_norms) / len(grad_norms)
        metrics["num_train_terms"] = num_terms
        return {f"actor/{k}": v for k, v in metrics.items()}

    def _prepare_grads(self) -> None:
        """Zero gradients where there are none: a rank without rows still joins the all-reduce with zeros."""
        for p in self.trainable:
            if p.grad is None:
                p.grad = torch.zeros_like(p)

    def _backward(self, loss: torch.Tensor) -> None:
        """One micro-batch's backward: the gradients accumulate in the parameters' ``.grad``."""
        loss.backward()

    def _reduce_and_clip(self, bad: torch.Tensor) -> float:
        """All-reduce the LoRA gradients (and the non-finite count) over the ranks, clip; the one host sync of
        an epoch. Raises NonFiniteError on every rank alike, before any optimizer step."""
        if self.grad_sync.world_size > 1:
            grads = [p.grad for p in self.trainable]
            flat = torch.cat([g.reshape(-1) for g in grads] + [bad.reshape(1).float()])
            self.grad_sync.all_reduce_(flat)
            offset = 0
            for g in grads:
                g.copy_(flat[offset : offset + g.numel()].view_as(g))
                offset += g.numel()
            bad = flat[-1]
        grad_norm = self._clip_grad_norm()
        bad_count, norm = (float(x) for x in torch.stack([bad.float(), grad_norm.float()]).tolist())
        if bad_count > 0 or not torch.isfinite(torch.tensor(norm)):
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteError(
                f"non-finite log-probs/KL ({int(bad_count)} values) or LoRA gradient norm ({norm}); "
                "step refused, LoRA unchanged"
            )
        return norm

    def _reduce_metrics(self, sums: dict[str, torch.Tensor]) -> dict[str, float]:
        names = sorted(sums)
        if not names:
            return {}
        stacked = torch.stack([torch.as_tensor(sums[n], device=self.device).float() for n in names])
        if self.grad_sync.world_size > 1:
            self.grad_sync.all_reduce_(stacked)
        return dict(zip(names, stacked.tolist(), strict=False))


@dataclass
class MicroBatch:
    """One forward/backward of an epoch: the algorithm's step (e.g. a window step), rows (on the device), their
    prepared model inputs; ``idle``: a pass whose gradient is discarded (FSDP ranks without rows must still join
    every collective); ``tensors``: what the algorithm asked for this micro-batch (``micro_tensors``, on the device)."""

    step: int
    rows: torch.Tensor
    inputs: Any
    idle: bool = False
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)


class UpdateContext:
    """What an algorithm's ``loss`` sees of the actor during one update.

    ``tensors``: the staged rollout tensors on the device (the algorithm's ``staged_fields``); ``constants``: its
    ``update_constants``; ``velocity(...)``: the policy's velocity through the pipeline's ``predict_velocity``;
    ``reference()``: a context in which the same transformer is the reference policy (adapter disabled);
    ``settings``: the sampling settings of the update's rows (``RowSettings``; None on a rank without rows), which
    the log-prob recomputation uses; ``config`` / ``rollout``: the shared actor / rollout sections."""

    def __init__(
        self,
        actor: DiffusionLoRAActor,
        batch: TrainBatch,
        constants: dict[str, Any],
        settings: Optional[RowSettings] = None,
    ):
        self._actor = actor
        self.batch, self.tensors, self.constants = batch, batch.tensors, constants
        self.settings = settings
        self.config, self.rollout = actor.config, actor.rollout
        self.cache: dict[Any, Any] = {}  # the algorithm's own, for this update (e.g. values kept from epoch 1)

    def velocity(
        self,
        sample: torch.Tensor,
        timesteps: torch.Tensor,
        micro: MicroBatch,
        guidance: Optional[float] = None,
        *,
        detach_unconditional: bool = False,
    ) -> torch.Tensor:
        """The transformer's (CFG-combined) velocity at ``sample`` / ``timesteps`` for ``micro``'s conditioning;
        ``guidance`` must be the scale its inputs were prepared for (default: the rows' own, as ``plan`` prepared
        them); ``detach_unconditional``: no gradient through CFG's unconditional branch."""
        actor = self._actor
        scale = actor._guidance(self.settings) if guidance is None else guidance
        return actor.pipe.predict_velocity(
            sample.to(actor.transformer.dtype),
            timesteps,
            micro.inputs,
            scale,
            self.batch.height,
            self.batch.width,
            detach_unconditional=detach_unconditional,
        )

    def reference(self) -> AbstractContextManager:
        return self._actor._adapter_disabled()

    @property
    def device(self) -> torch.device:
        return self._actor.device


def _stage(batch: TrainBatch, fields: tuple[str, ...], device: torch.device) -> TrainBatch:
    """The rollout tensors the loop indexes, on the device in one pass (the text goes with each micro-batch's
    prepared inputs)."""
    return batch._with({k: v for k, v in batch.tensors.items() if k in fields}).to(device)


def sdpa_has_unmasked_kernel(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether PyTorch's SDPA serves unmasked calls faster than masked ones: on a GPU in bf16 / fp16 (flash takes no
    mask; cuDNN, its default there, is faster unmasked: ``docs/benchmarks/attention_backends_h200.json``)."""
    return torch.device(device).type == "cuda" and dtype in (torch.bfloat16, torch.float16)
