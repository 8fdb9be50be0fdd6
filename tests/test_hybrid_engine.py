"""The hybrid engine on CPU: two diffusers replicas, each hosting an actor rank on its engine's own pipeline
(gloo all-reduce of the LoRA gradients), against one process; and the trainer end to end with a checksum-verified
sync and a resume."""

import asyncio

import numpy as np
import pytest
import ray
import torch
from helpers import model_config, num_rows, records_data_proto, rollout_config, trainer_config

from verl_omni.config.actor import ActorConfig, OptimConfig
from verl_omni.config.sampling import DiffusionSamplingParams
from verl_omni.core.checksum import tensors_checksum
from verl_omni.rollout.server_manager import DiffusionServerManager
from verl_omni.rollout.weight_sync import LoRASyncError, check_ranks_agree
from verl_omni.trainer.checkpoint import find_latest_checkpoint
from verl_omni.trainer.colocated_actor import ColocatedActorGroup
from verl_omni.trainer.ray_trainer import FlowGRPOTrainer
from verl_omni.workers.actor import DiffusionLoRAActor

PROMPTS = ["a red cat", "a blue house on a hill"]  # different lengths: padded prompt embeddings
SEEDS = [11, 22, 33]


def _rollout(pipe):
    records = []
    for i, prompt in enumerate(PROMPTS):  # different SDE windows per prompt
        params = DiffusionSamplingParams(
            num_inference_steps=4, height=32, width=32, sde_window_size=2, window_start=i, guidance_scale=2.0
        )
        records.append(pipe.rl_generate(prompt, [s + i for s in SEEDS], params))
    raw = np.empty(num_rows(records), dtype=object)
    for i in range(num_rows(records)):
        raw[i] = PROMPTS[i // len(SEEDS)]
    uid = np.array([f"g{i // len(SEEDS)}" for i in range(num_rows(records))], dtype=object)
    return records_data_proto(records, {"raw_prompt": raw, "uid": uid})


def _max_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.mark.e2e
def test_two_colocated_ranks_update_exactly_like_one_process(ray_session, qwen_image_rl_pipe, tiny_qwen_image_dir):
    model = model_config(tiny_qwen_image_dir)
    rollout = rollout_config(pipeline={"true_cfg_scale": 2.0})
    actor = ActorConfig(optim=OptimConfig(lr=1e-2), kl_coef=0.1, ppo_micro_batch_size_per_gpu=2, ppo_epochs=2)
    loop = asyncio.new_event_loop()
    servers = loop.run_until_complete(DiffusionServerManager(rollout, model, num_replicas=2).start())
    try:
        group = ColocatedActorGroup(servers, actor, lora_seed=7, pipeline=model.pipeline)
        single = DiffusionLoRAActor(model, actor, rollout, lora_seed=7)
        # Same seed: every rank and the single process start from the same adapter, which the engines serve.
        start = single.lora_state_dict()
        assert _max_diff(group.lora_state_dict(), start) == 0
        served = loop.run_until_complete(servers.lora_checksums())
        assert served == [tensors_checksum(start)] * 2

        data = _rollout(qwen_image_rl_pipe)  # 6 rows, 12 transitions: 6 per rank
        advantages = torch.randn(len(data), generator=torch.Generator().manual_seed(0))
        m_single, m_group = single.update(data, advantages), group.update(data, advantages)
        # Each rank reports its own busy seconds (the single process: one figure); the rest is all-reduced.
        assert m_single.pop("actor/busy_s") >= m_single.pop("actor/compute_s") > 0
        busy = [m_group.pop(f"timing/update_busy_s/rank{k}") for k in range(2)]
        compute = [m_group.pop(f"timing/update_compute_s/rank{k}") for k in range(2)]
        assert all(b >= c > 0 for b, c in zip(busy, compute, strict=True))  # busy = compute + the all-reduce wait
        # Each rank's garbage-collector seconds and cudaMalloc calls (none on the CPU) inside its update.
        assert m_single.pop("actor/gc_s") >= 0 and m_single.pop("actor/cuda_mallocs") == 0
        assert all(m_group.pop(f"timing/update_gc_s/rank{k}") >= 0 for k in range(2))
        assert [m_group.pop(f"perf/update_cuda_mallocs/rank{k}") for k in range(2)] == [0, 0]
        # Each rank's frozen GC heap when its update ended: empty, as the freeze follows the first update.
        assert m_single.pop("actor/gc_frozen_objects") == 0
        assert [m_group.pop(f"perf/update_gc_frozen_objects/rank{k}") for k in range(2)] == [0, 0]
        # No SM clock to read off CUDA: each rank's figures are there, and 0.
        for name in ("sm_clock_mhz", "sm_clock_min_mhz"):
            assert m_single.pop(f"actor/{name}") == 0
            assert [m_group.pop(f"perf/update_{name}/rank{k}") for k in range(2)] == [0, 0]
        # No CUDA allocator off a GPU: each rank's memory peaks (the update's, and the rollout's before it) are 0.
        for name in (
            "update_peak_allocated_gb",
            "update_peak_reserved_gb",
            "rollout_peak_allocated_gb",
            "rollout_peak_reserved_gb",
        ):
            assert m_single.pop(f"actor/{name.removeprefix('update_')}") == 0
            assert [m_group.pop(f"perf/{name}/rank{k}") for k in range(2)] == [0, 0]
        # Off a GPU the text encoders stay where they are (text_encoder_offload: false): each rank moved nothing.
        assert [m_group.pop(f"timing/update_text_encoder_offload_s/rank{k}") for k in range(2)] == [0, 0]
        assert [m_group.pop(f"perf/update_text_encoder_offloaded_gb/rank{k}") for k in range(2)] == [0, 0]
        assert [m_group.pop(f"perf/update_text_encoder_kept_gb/rank{k}") for k in range(2)] == [0, 0]
        lora_diff = _max_diff(single.lora_state_dict(), group.lora_state_dict())
        moved = _max_diff(start, single.lora_state_dict())
        print(f"2 colocated ranks vs 1 process: LoRA max abs diff {lora_diff:.2e} (the update moved it {moved:.2e})")
        # Other micro-batches on the ranks round differently (float32, padded text); Adam's step divides by the
        # root of tiny second moments, so 1e-5 (the FSDP test's bound) against a move of ~1e-2.
        assert moved > 1e-4 and lora_diff < 1e-5
        assert set(m_single) == set(m_group)
        for key in m_single:
            if key in ("actor/ratio_min", "actor/ratio_max"):
                continue  # means of per-micro-batch extremes: the ranks cut their rows into other micro-batches
            assert m_group[key] == pytest.approx(m_single[key], rel=1e-4, abs=1e-6), key
        # The engines serve what their ranks trained, in place: equal on both replicas, equal to the actor's.
        served = loop.run_until_complete(servers.lora_checksums())
        assert served == group.lora_checksums() == [tensors_checksum(group.lora_state_dict())] * 2
        # The trainer's sync: every rank's adapter against rank 0's, bitwise (a broadcast over the ranks' group);
        # one changed element on rank 1 is named.
        assert group.lora_matches_rank0() == [True, True]
        trained = group.lora_state_dict()
        changed = {k: v.clone() for k, v in trained.items()}
        first_name = sorted(changed)[0]
        changed[first_name].view(-1)[0] += 1e-3
        ray.get(servers.replicas[1].server_handle.actor_call.remote("load_lora_state_dict", changed))
        assert group.lora_matches_rank0() == [True, False]
        with pytest.raises(LoRASyncError, match=r"replicas \[1\] serve an adapter that differs from replica 0's"):
            check_ranks_agree(group.lora_matches_rank0())
        group.load_lora_state_dict(trained)
        assert group.lora_matches_rank0() == [True, True]

        # Non-finite input is refused on every rank before any optimizer step.
        bad = data.select_idxs(torch.arange(len(data)))
        bad.batch["old_log_probs"][4, :] = float("nan")
        before = group.lora_state_dict()
        with pytest.raises(Exception, match=r"old_log_probs.*\[4\]"):
            group.update(bad, advantages)
        assert _max_diff(before, group.lora_state_dict()) == 0
    finally:
        loop.run_until_complete(servers.shutdown())
        loop.close()


@pytest.mark.e2e
def test_hybrid_trainer_syncs_by_checksum_and_resumes(ray_session, ocr_data_files, tiny_qwen_image_dir, tmp_path):
    overrides = {"actor_rollout_ref.hybrid_engine": True, "trainer.n_gpus_per_node": 2, "trainer.save_freq": 1}
    cfg = trainer_config(
        ocr_data_files, tiny_qwen_image_dir, tmp_path, **overrides, **{"trainer.total_training_steps": 2}
    )
    trainer = FlowGRPOTrainer(cfg).init()
    try:
        assert len(trainer.servers.replicas) == 2  # one replica (and one actor rank) per device
        history = trainer.fit()
        assert len(history) == 2 and history[-1]["actor/grad_norm"] > 0
        # The timeline: every replica generated and every rank trained in each step.
        for k in range(2):
            assert history[-1][f"timing/rollout_busy_s/replica{k}"] > 0
            assert history[-1][f"timing/update_busy_s/rank{k}"] > 0
        lora = trainer.actor.lora_state_dict()
        served = trainer._run(trainer.servers.lora_checksums())
        assert served == [tensors_checksum(lora)] * 2 == [trainer.last_lora_checksum] * 2
    finally:
        trainer.shutdown()
    assert find_latest_checkpoint(str(tmp_path)).endswith("global_step_2")

    cfg3 = trainer_config(
        ocr_data_files, tiny_qwen_image_dir, tmp_path, **overrides, **{"trainer.total_training_steps": 3}
    )
    resumed = FlowGRPOTrainer(cfg3).init()
    try:
        assert resumed.global_step == 2
        assert _max_diff(resumed.actor.lora_state_dict(), lora) == 0
        assert resumed._run(resumed.servers.lora_checksums()) == [tensors_checksum(lora)] * 2
        assert len(resumed.fit()) == 1 and resumed.global_step == 3
    finally:
        resumed.shutdown()


def test_a_rank_without_rows_joins_the_update_with_zero_gradients(qwen_image_rl_pipe, tiny_qwen_image_dir):
    from verl_omni.workers.train_batch import TrainBatch

    model, rollout = model_config(tiny_qwen_image_dir), rollout_config(pipeline={"true_cfg_scale": 2.0})
    actor = DiffusionLoRAActor(model, ActorConfig(), rollout, lora_seed=3)
    batch = TrainBatch.from_data_proto(_rollout(qwen_image_rl_pipe), torch.ones(6))
    shards = batch.shards(8)  # more ranks than rows: some shards are empty
    assert sum(len(s) for s in shards) == 6 and any(len(s) == 0 for s in shards)
    before = actor.lora_state_dict()
    empty = next(s for s in shards if len(s) == 0)
    metrics = actor.update_batch(empty, num_terms=batch.num_terms)
    assert metrics["actor/grad_norm"] == 0.0 and metrics["actor/num_train_terms"] == batch.num_terms
    assert _max_diff(before, actor.lora_state_dict()) == 0  # zero gradient: AdamW leaves the adapter as it was


def test_each_shard_serializes_only_its_own_rows(qwen_image_rl_pipe):
    """A shard crosses a process boundary (Ray, or torch.save for vllm-omni's worker): a view would pickle the whole
    batch's storage with it, so W ranks would receive W full batches."""
    import io

    from verl_omni.workers.train_batch import TrainBatch

    batch = TrainBatch.from_data_proto(_rollout(qwen_image_rl_pipe), torch.ones(6))

    def saved_bytes(b):
        buffer = io.BytesIO()
        torch.save(b.as_dict(), buffer)
        return buffer.tell()

    shards = batch.shards(3)
    assert sum(len(s) for s in shards) == 6 and all(len(s) > 0 for s in shards)
    whole = saved_bytes(batch)
    for shard in shards:
        for name, tensor in shard.tensors.items():
            assert tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size(), name
        assert saved_bytes(shard) < whole * len(shard) / len(batch) + 16384, (len(shard), whole)
    assert torch.equal(torch.cat([s.tensors["latents"] for s in shards]), batch.tensors["latents"])
