"""Diffusion agent loop: verl's agent-loop workers, with rollout.n rows of a prompt sent as one B=N call.

- ``DiffusionServerClient``: verl's ``LLMServerClient`` (acquire a server from the global load balancer,
  release it in ``finally``) with the two diffusion verbs.
- ``DiffusionAgentLoop``: registered in verl's agent-loop registry; ``run`` is one row (per-row path),
  ``run_group`` is one group of n rows (batched path); each returns one rollout record (``RLBatchOutput``).
- ``DiffusionAgentLoopWorker`` / ``DiffusionAgentLoopManager``: verl's worker and manager, subclassed
  because verl offers no hook to hand a *group* of rows to one agent loop, nor to build a non-token batch.

A group's record stays whole from the engine to the ``DataProto``: ``records_to_data_proto`` concatenates the
records' fields once (no per-sample dicts), and every row carries the sampling settings it was produced with.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from typing import Any, Optional

import hydra
import numpy as np
import ray
import torch
from ray.experimental import tqdm_ray
from verl import DataProto
from verl.experimental.agent_loop.agent_loop import (
    AgentLoopBase,
    AgentLoopManager,
    AgentLoopWorker,
    DictConfigWrap,
    _agent_loop_registry,
    register,
)
from verl.workers.rollout.llm_server import LLMServerClient

from verl_omni.agent_loop.grouping import RolloutGroup, derive_seed, plan_groups
from verl_omni.agent_loop.transport import PackedBatch, pack, unpack_concat
from verl_omni.config.rollout import RolloutConfig
from verl_omni.config.sampling import row_settings_tensors
from verl_omni.core.errors import NonFiniteError
from verl_omni.core.media import media_samples
from verl_omni.core.names import AGENT_LOOP_NAME
from verl_omni.core.outputs import SHARED_FIELDS, RLBatchOutput
from verl_omni.core.prompts import prompt_text
from verl_omni.core.workarounds import quiet_accelerator_warnings_on_cpu
from verl_omni.pipelines import get_pipeline_class
from verl_omni.rewards.pool import RewardPool
from verl_omni.rewards.registry import RewardResult, row_metadata

logger = logging.getLogger(__name__)


class DiffusionServerClient(LLMServerClient):
    """Routes diffusion requests through verl's global load balancer (least in-flight, sticky by id)."""

    async def generate_batched(self, request_id: str, *, prompt: str, seeds: list[int], sampling_params: dict) -> dict:
        return await self._call(
            request_id,
            "generate_batched",
            prompt=prompt,
            num_outputs_per_prompt=len(seeds),
            seeds=seeds,
            sampling_params=sampling_params,
        )

    async def generate(self, request_id: str, *, prompt: str, seed: int, sampling_params: dict) -> dict:  # type: ignore[override]
        return await self._call(request_id, "generate", prompt=prompt, seed=seed, sampling_params=sampling_params)

    async def _call(self, request_id: str, method: str, **kwargs):
        server_id, server = await self._acquire_server(request_id)
        ref = None
        try:
            ref = getattr(server, method).remote(request_id=request_id, **kwargs)
            return await ref
        except asyncio.CancelledError:
            # This caller gave up (its step was abandoned): cancel the server's call too, which aborts the engine
            # work; awaiting a Ray call and then dropping it would leave the engine generating for nobody.
            if ref is not None:
                ray.cancel(ref)
            raise
        except ray.exceptions.RayActorError as exc:
            # A dead engine must stop the step loudly (the trainer's last checkpoint stays as it was).
            raise RuntimeError(f"rollout server {server_id} died during request {request_id}: {exc}") from None
        finally:
            self._release_server(server_id, request_id=request_id)


@register(AGENT_LOOP_NAME)
class DiffusionAgentLoop(AgentLoopBase):
    """One text-to-image turn. Rows carry ``__seed__`` and ``__request_id__`` set by the worker."""

    def __init__(self, trainer_config: DictConfigWrap, server_manager: DiffusionServerClient, **_: Any):
        # verl's base __init__ builds a token builder from a tokenizer; a diffusion turn has none.
        self.config = trainer_config.config
        self.server_manager = server_manager

    async def run(self, sampling_params: dict[str, Any], **row: Any) -> RLBatchOutput:
        """One row: a record of batch 1."""
        payload = await self.server_manager.generate(
            row["__request_id__"], prompt=_row_prompt(row), seed=int(row["__seed__"]), sampling_params=sampling_params
        )
        return _postprocess(payload, [int(row["__seed__"])])

    async def run_group(self, sampling_params: dict[str, Any], rows: list[dict[str, Any]]) -> RLBatchOutput:
        """A group of rows asking for the same thing: one engine call, one record of batch ``len(rows)``."""
        seeds = [int(r["__seed__"]) for r in rows]
        payload = await self.server_manager.generate_batched(
            rows[0]["__request_id__"], prompt=_row_prompt(rows[0]), seeds=seeds, sampling_params=sampling_params
        )
        return _postprocess(payload, seeds)


def _row_prompt(row: dict[str, Any]) -> str:
    if "raw_prompt" not in row:
        raise ValueError(f"row has no 'raw_prompt' field (fields: {sorted(k for k in row if not k.startswith('__'))})")
    text = prompt_text(row["raw_prompt"])
    if not text.strip():
        raise ValueError(f"empty prompt in row {row.get('__request_id__')}")
    return text


def _postprocess(payload: dict, seeds: list[int]) -> RLBatchOutput:
    """The server's payload as a record, checked: one row per asked seed, finite model outputs (the rows that are
    not are named by their seeds)."""
    record = RLBatchOutput.from_payload(payload).check()
    if [int(s) for s in record.seeds] != seeds:
        raise ValueError(f"the server returned a record for seeds {list(record.seeds)}, asked for {seeds}")
    for name in ("latents", "log_probs", "prompt_embeds"):
        value = getattr(record, name)
        if value is None or not value.numel():
            continue
        finite = torch.isfinite(value.float()).reshape(value.shape[0], -1).all(dim=1)
        if not bool(finite.all()):
            bad = [record.seeds[i] for i in torch.nonzero(~finite).flatten().tolist()]
            raise NonFiniteError(f"engine returned non-finite {name} for the samples with seeds {bad}")
    return record


class DiffusionAgentLoopWorker(AgentLoopWorker):
    """Runs a chunk of rows: batched groups as one call, the rest row by row; returns a diffusion batch."""

    def __init__(self, config, llm_client: DiffusionServerClient, reward_pool: Optional[RewardPool] = None):
        # verl's worker loads a tokenizer, tools and traces for text turns; none apply here.
        self.config = config  # the run's FlowGRPOConfig (parsed once by the trainer)
        self.llm_client = llm_client
        self.reward_pool = reward_pool  # None: the trainer scores the whole batch after the rollout
        self.rollout: RolloutConfig = config.actor_rollout_ref.rollout
        # algorithm.name's algorithm: it sets each group's sampling settings (its SDE window, ODE steps, CFG ...)
        self.algorithm = config.algorithm.make(config.actor_rollout_ref.actor, self.rollout)
        self.algorithm.bind_pipeline(get_pipeline_class(config.actor_rollout_ref.model.pipeline))
        self._logged_reasons: set[str] = set()
        quiet_accelerator_warnings_on_cpu()

    async def generate_sequences(self, batch: DataProto) -> PackedBatch:
        """The rows of ``batch`` rolled out (and scored, when streaming), packed for the hop to the manager."""
        validate = bool(batch.meta_info.get("validate", False))
        n = int(batch.meta_info.get("n", self.rollout.val_kwargs.n if validate else self.rollout.n))
        params = self.rollout.sampling_params(validate=validate)
        non_tensor = dict(batch.non_tensor_batch)  # the caller's batch stays as it was
        if "agent_name" not in non_tensor:
            non_tensor["agent_name"] = np.array([self.rollout.agent.default_agent_loop] * len(batch), dtype=object)
        groups = plan_groups(non_tensor, len(batch), n, enabled=self.rollout.enable_batched_diffusion)
        step = batch.meta_info.get("global_steps", 0)
        # Ray's tqdm shows this worker's bar on the driver's console, when the driver writes to a terminal.
        bar = (
            tqdm_ray.tqdm(total=len(batch), desc=f"{'val' if validate else 'rollout'} step {step}")
            if batch.meta_info.get("progress_bar", False)
            else _NoBar()
        )

        timeline = _StreamTimeline()

        async def run(group: RolloutGroup):
            records = await self._run_group(group, non_tensor, params, step, validate)
            bar.update(len(group.rows))
            timeline.generated()
            if self.reward_pool is None:
                return records, None
            # Scored now, while the other groups are still generating (this coroutine alone waits for it).
            scores = await self.reward_pool.submit(
                [sample for record in records for sample in media_samples(record.media)],
                [prompt_text(non_tensor["raw_prompt"][i]) for i in group.rows],
                [row_metadata(non_tensor, i) for i in group.rows],
                sample_ids=group.rows,
            )
            timeline.scored()
            return records, scores

        start = time.perf_counter()
        try:
            results = await asyncio.gather(*[run(group) for group in groups])
        finally:
            bar.close()
        elapsed = time.perf_counter() - start

        parts = [
            (rows, record)
            for group, (records, _) in zip(groups, results, strict=True)
            for rows, record in _record_rows(group, records)
        ]
        reasons = Counter(g.reason for g in groups if not g.batched)
        for reason in reasons:
            if reason not in self._logged_reasons:
                self._logged_reasons.add(reason)
                # n=1 (validation's default) has nothing to batch: expected, not a warning.
                level = logging.INFO if reason == "n_is_1" else logging.WARNING
                logger.log(level, "diffusion rollout: groups fall back to per-row calls (reason: %s)", reason)
        metrics = {
            "rollout/batched_groups": sum(g.batched for g in groups),
            "rollout/fallback_groups": sum(not g.batched for g in groups),
            **{f"rollout/fallback_reason/{r}": c for r, c in reasons.items()},
            "rollout/generate_s": elapsed,
            "rollout/rows": len(batch),
            # rows whose prompt lost tokens at max_sequence_length (the trainer says so once per step)
            "rollout/truncated_prompts": sum(len(rows) for rows, r in parts if r.truncated_prompt_tokens > 0),
        }
        rewards = None
        if self.reward_pool is not None:
            rewards = _scatter_rewards(groups, [scores for _, scores in results], len(batch))
            metrics.update({f"reward/{name}/seconds": value for name, value in rewards.seconds.items()})
            metrics.update(timeline.metrics())
        return pack(records_to_data_proto(parts, non_tensor, metrics, rewards, batch_len=len(batch)))

    async def _run_group(
        self, group: RolloutGroup, non_tensor: dict, params, step: int, validate: bool
    ) -> list[RLBatchOutput]:
        """The group's records, in its rows' order: one of batch n (batched), or one of batch 1 per row."""
        # Seeds and the algorithm's per-group settings (e.g. FlowGRPO's SDE window) come from (seed, step, group,
        # index): the same on both paths, and the settings are drawn per group so the n samples of a prompt share them.
        group_key = f"{step}/{group.key}"
        group_seed = derive_seed(self.rollout.seed, group_key, -1)

        def row_params(row: dict) -> dict:
            p = _row_params(params, row)
            return self.algorithm.sampling(p, step=step, group_seed=group_seed, validate=validate).to_dict()

        rows = []
        for k, i in enumerate(group.rows):
            row = {key: value[i] for key, value in non_tensor.items()}
            row["__seed__"] = derive_seed(self.rollout.seed, group_key, k)
            row["__request_id__"] = f"{group.key}-{k}" if not group.batched else group.key
            rows.append(row)
        agent_name = str(rows[0]["agent_name"])
        loop = _instantiate_agent_loop(agent_name, self.config, self.llm_client)
        if group.batched:  # rows of a batched group ask for the same thing: the first row's params serve all
            return [await loop.run_group(row_params(rows[0]), rows)]
        outputs = []
        for row in rows:
            row_loop = (
                loop
                if str(row["agent_name"]) == agent_name
                else _instantiate_agent_loop(str(row["agent_name"]), self.config, self.llm_client)
            )
            row_args = {k: v for k, v in row.items() if k != "sampling_params"}
            outputs.append(row_loop.run(row_params(row), **row_args))
        return list(await asyncio.gather(*outputs))


def _record_rows(group: RolloutGroup, records: list[RLBatchOutput]) -> list[tuple[list[int], RLBatchOutput]]:
    """(batch rows, record) pairs of a group: its rows in order, each record taking as many as it has samples."""
    out, start = [], 0
    for record in records:
        out.append((group.rows[start : start + record.batch_size], record))
        start += record.batch_size
    if start != len(group.rows):
        raise ValueError(f"group {group.key}: {start} samples returned for {len(group.rows)} rows")
    return out


# What a row may set for itself. The SDE settings (noise_level, sde_type, window) and guidance_scale stay
# rollout-wide: every row carries the settings it was sampled with, and one update trains rows of one noise level,
# SDE type and CFG scale (config/sampling.RowSettings refuses a mixed batch).
ROW_OVERRIDABLE = ("negative_prompt", "num_inference_steps", "height", "width", "max_sequence_length")


def _row_params(params, row: dict):
    """The rollout's sampling params with a row's own ``negative_prompt`` / ``sampling_params`` applied."""
    overrides = dict(row.get("sampling_params") or {})
    refused = sorted(set(overrides) - set(ROW_OVERRIDABLE))
    if refused:
        raise ValueError(
            f"row {row.get('__request_id__')}: sampling_params keys {refused} cannot be set per row "
            f"(allowed: {list(ROW_OVERRIDABLE)}; SDE and guidance settings are "
            "actor_rollout_ref.rollout.algo.* / .pipeline.*)"
        )
    negative = row.get("negative_prompt")
    if isinstance(negative, str):
        overrides.setdefault("negative_prompt", negative)
    return params.replace(**overrides).validate() if overrides else params


def _instantiate_agent_loop(agent_name: str, config, client) -> DiffusionAgentLoop:
    if agent_name not in _agent_loop_registry:
        raise ValueError(
            f"agent_name={agent_name!r} is not a registered agent loop; known: {sorted(_agent_loop_registry)}"
        )
    return hydra.utils.instantiate(
        _agent_loop_registry[agent_name], trainer_config=DictConfigWrap(config=config), server_manager=client
    )


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


class _StreamTimeline:
    """When this worker's last group finished generating, and its last group's scores arrived (wall clock, so the
    manager can compare workers): the reward time the rollout did not hide is the difference."""

    def __init__(self):
        self.last_generated = self.last_scored = 0.0

    def generated(self) -> None:
        self.last_generated = max(self.last_generated, time.time())

    def scored(self) -> None:
        self.last_scored = max(self.last_scored, time.time())

    def metrics(self) -> dict[str, float]:
        return {_LAST_GENERATED: self.last_generated, _LAST_SCORED: self.last_scored}


_LAST_GENERATED, _LAST_SCORED = "reward/_last_generated_at", "reward/_last_scored_at"


def _scatter_rewards(groups: list[RolloutGroup], results: list[RewardResult], batch_len: int) -> RewardResult:
    """Per-group reward results as one result in row order."""
    first = results[0]
    total = np.zeros(batch_len, dtype=np.float64)
    per_reward = {name: np.zeros(batch_len, dtype=np.float64) for name in first.per_reward}
    for group, result in zip(groups, results, strict=True):
        total[group.rows] = result.total
        for name, scores in result.per_reward.items():
            per_reward[name][group.rows] = scores
    seconds = {name: float(sum(r.seconds.get(name, 0.0) for r in results)) for name in first.seconds}
    return RewardResult(total=total, per_reward=per_reward, weights=dict(first.weights), seconds=seconds)


def records_to_data_proto(
    parts: list[tuple[list[int], RLBatchOutput]],
    non_tensor: dict,
    metrics: dict,
    rewards: Optional[RewardResult] = None,
    *,
    batch_len: Optional[int] = None,
) -> DataProto:
    """The rollout records as one ``DataProto`` of ``batch_len`` rows: ``parts`` are (batch rows, record) pairs,
    each record filling its rows. Every field is one concatenation over the records (prompt embeddings right-padded
    with mask 0 to the longest); a record's per-call fields (window_mask, timesteps, sigmas, latent_steps) and its
    sampling settings (``config/sampling.ROW_SETTINGS``) become one value per row. ``media`` is uint8
    [B, F, H, W, 3]. With streamed ``rewards``: a ``rewards`` tensor (the weighted total) and a ``reward_scores``
    column (each reward's unweighted score) per row."""
    order = [row for rows, _ in parts for row in rows]
    batch_len = len(order) if batch_len is None else batch_len
    if sorted(order) != list(range(batch_len)):
        raise ValueError(f"the records fill rows {sorted(order)}, expected each of the batch's {batch_len} rows once")
    records = [record for _, record in parts]
    shapes = {
        (tuple(r.media.shape[1:]), tuple(r.latents.shape[1:]), tuple(r.timesteps.shape), tuple(r.latent_steps.shape))
        for r in records
    }
    if len(shapes) > 1:
        raise ValueError(
            "rows of one batch must share media size (frames, height, width), num_inference_steps and kept latents; "
            f"got (media, latents, timesteps, latent_steps) shapes {sorted(shapes)}"
        )
    tensors: dict[str, torch.Tensor] = {
        "media": _cat(records, "media"),
        "latents": _cat(records, "latents"),
        "old_log_probs": _cat(records, "log_probs").float(),
        "seeds": torch.tensor([int(s) for r in records for s in r.seeds], dtype=torch.int64),
    }
    for name in SHARED_FIELDS:  # one value per call: one per row
        tensors[name] = torch.cat([getattr(r, name).unsqueeze(0).expand(r.batch_size, -1) for r in records])
    for name in ("timesteps", "sigmas"):
        tensors[name] = tensors[name].float()
    settings = [row_settings_tensors(r.sampling, r.batch_size) for r in records]
    for name in settings[0]:
        tensors[name] = torch.cat([s[name] for s in settings])
    for prefix in ("", "negative_"):
        embeds = [getattr(r, f"{prefix}prompt_embeds") for r in records]
        if any(e is None for e in embeds):
            continue
        masks = [getattr(r, f"{prefix}prompt_embeds_mask") for r in records]
        stacked, mask = _pad_embeds(embeds, masks)
        tensors[f"{prefix}prompt_embeds"] = stacked
        if mask is not None:
            tensors[f"{prefix}prompt_embeds_mask"] = mask
        pooled = [getattr(r, f"{prefix}pooled_prompt_embeds") for r in records]
        if all(p is not None for p in pooled):
            tensors[f"{prefix}pooled_prompt_embeds"] = torch.cat(pooled)
    if order != list(range(batch_len)):  # records in another order than their rows (groups not contiguous)
        where = torch.argsort(torch.tensor(order))
        tensors = {name: value[where] for name, value in tensors.items()}
    out_non_tensor = {k: v for k, v in non_tensor.items()}
    out_non_tensor["prompt_text"] = np.array([None] * batch_len, dtype=object)
    for i in range(batch_len):
        out_non_tensor["prompt_text"][i] = prompt_text(non_tensor["raw_prompt"][i])
    meta = {"metrics": metrics}
    if rewards is not None:
        tensors["rewards"] = torch.from_numpy(rewards.total)
        out_non_tensor["reward_scores"] = np.array(
            [{name: float(scores[i]) for name, scores in rewards.per_reward.items()} for i in range(batch_len)],
            dtype=object,
        )
        meta["reward_weights"] = dict(rewards.weights)
    return DataProto.from_dict(tensors=tensors, non_tensors=out_non_tensor, meta_info=meta)


def _cat(records: list[RLBatchOutput], name: str) -> torch.Tensor:
    values = [getattr(r, name) for r in records]
    return values[0] if len(values) == 1 else torch.cat(values)


def _pad_embeds(embeds: list[torch.Tensor], masks: list[Optional[torch.Tensor]]):
    """[b_r, L_r, D] embeddings of each record as one [B, L, D] (right-padded to the longest L) and its mask."""
    length = max(e.shape[1] for e in embeds)
    if all(m is None for m in masks):
        if any(e.shape[1] != length for e in embeds):
            raise ValueError("prompt embeddings of different lengths and no mask to pad them with")
        return torch.cat(embeds), None
    padded, padded_masks = [], []
    for e, m in zip(embeds, masks, strict=True):
        pad = length - e.shape[1]
        padded.append(torch.nn.functional.pad(e, (0, 0, 0, pad)))
        m = m if m is not None else torch.ones(e.shape[:2], dtype=torch.long)
        padded_masks.append(torch.nn.functional.pad(m, (0, pad)))
    return torch.cat(padded), torch.cat(padded_masks)


class DiffusionAgentLoopManager(AgentLoopManager):
    """verl's manager with diffusion workers; chunks the batch on group boundaries so no group is split."""

    agent_loop_workers_class = ray.remote(DiffusionAgentLoopWorker)

    def __init__(self, config, llm_client: DiffusionServerClient, reward_pool: Optional[RewardPool] = None):
        super().__init__(config, llm_client)
        self.reward_pool = reward_pool

    async def _init_agent_loop_workers(self):
        self.agent_loop_workers = [
            self.agent_loop_workers_class.options(num_cpus=0).remote(self.config, self.llm_client, self.reward_pool)
            for _ in range(self.rollout_config.agent.num_workers)
        ]

    async def generate_sequences(self, prompts: DataProto) -> DataProto:  # type: ignore[override]
        chunks = _chunk_on_groups(prompts, len(self.agent_loop_workers))
        workers = self.agent_loop_workers[: len(chunks)]
        outputs: list[PackedBatch] = await asyncio.gather(
            *[w.generate_sequences.remote(c) for w, c in zip(workers, chunks, strict=True)]
        )
        metrics = Counter()
        for out in outputs:
            for key, value in out.meta_info.pop("metrics").items():
                if key in ("rollout/generate_s", _LAST_GENERATED, _LAST_SCORED):
                    metrics[key] = max(metrics[key], value)
                else:
                    metrics[key] += value
        if _LAST_SCORED in metrics:
            # Scoring seconds after the last group of the whole rollout was generated: what streaming did not hide.
            metrics["reward/tail_s"] = max(0.0, metrics.pop(_LAST_SCORED) - metrics.pop(_LAST_GENERATED))
        weights = outputs[0].meta_info.get("reward_weights")
        output = unpack_concat(outputs)
        output.meta_info = {"metrics": dict(metrics), **({"reward_weights": weights} if weights is not None else {})}
        return output


def _chunk_on_groups(batch: DataProto, num_chunks: int) -> list[DataProto]:
    uids = batch.non_tensor_batch.get("uid")
    if uids is None or num_chunks <= 1:
        return [batch] if num_chunks <= 1 else [c for c in batch.chunk(num_chunks) if len(c)]
    # boundaries where the uid changes; split the list of groups as evenly as possible
    starts = [0] + [i for i in range(1, len(uids)) if uids[i] != uids[i - 1]]
    bounds = starts + [len(uids)]
    per_chunk = -(-len(starts) // num_chunks)
    chunks = []
    for k in range(0, len(starts), per_chunk):
        lo, hi = bounds[k], bounds[min(k + per_chunk, len(starts))]
        chunks.append(batch.slice(lo, hi))
    return chunks
