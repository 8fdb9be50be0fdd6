"""The FSDP LoRA actor group (world size 2, gloo on CPU) against the single-process DiffusionLoRAActor.

Same initial LoRA, same rollout batch, same advantages: the sharded update must give the same LoRA, the same
metrics and the same optimizer state as the single-process one.
"""

import time
from dataclasses import replace

import numpy as np
import pytest
import torch
from helpers import model_config, num_rows, records_data_proto, rollout_config

from verl_omni.config.actor import ActorConfig, EMAConfig, OptimConfig
from verl_omni.config.sampling import DiffusionSamplingParams
from verl_omni.core.checksum import tensors_checksum
from verl_omni.core.errors import NonFiniteError
from verl_omni.trainer.checkpoint import load_checkpoint, save_checkpoint
from verl_omni.workers.actor import DiffusionLoRAActor
from verl_omni.workers.fsdp_actor import FSDPLoRAActorGroup

PROMPTS = ["a red cat", "a blue house on a hill"]  # different lengths: padded prompt embeddings
SEEDS = [11, 22, 33, 44]


def _rollout(pipe) -> "DataProto":  # noqa: F821
    records = []
    for i, prompt in enumerate(PROMPTS):  # different SDE windows per prompt: steps with 4 and with 8 rows
        params = DiffusionSamplingParams(num_inference_steps=4, height=32, width=32, sde_window_size=2, window_start=i)
        records.append(pipe.rl_generate(prompt, [s + i for s in SEEDS], params))
    raw = np.empty(num_rows(records), dtype=object)
    for i in range(num_rows(records)):
        raw[i] = [{"role": "user", "content": PROMPTS[i // len(SEEDS)]}]
    uid = np.array([f"g{i // len(SEEDS)}" for i in range(num_rows(records))], dtype=object)
    return records_data_proto(records, {"raw_prompt": raw, "uid": uid})


def _on_policy(actor: DiffusionLoRAActor, data) -> None:
    """old_log_probs := the log-probs under the actor's (random) LoRA, so ratios start at 1 and nothing is
    clipped in the first epoch (the rollout ran without that LoRA)."""
    window = data.batch["window_mask"].bool()
    with torch.no_grad():
        for step in range(window.shape[1]):
            rows = torch.nonzero(window[:, step]).flatten()
            if len(rows):
                data.batch["old_log_probs"][rows, step] = actor.compute_log_probs(data, step, rows).log_prob


def _max_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def _compare_metrics(single: dict, group: dict, label: str) -> None:
    assert set(single) == set(group)
    # Wall seconds are not the update's result: present on both sides, compared for nothing else.
    for name in ("actor/busy_s", "actor/compute_s"):
        assert single.pop(name) > 0 and group.pop(name) > 0
    # Process-wide counters inside the update (>= 0; no cudaMalloc off CUDA; the frozen heap: 0 before any freeze;
    # no SM clock off CUDA).
    for name in ("actor/gc_s", "actor/cuda_mallocs", "actor/gc_frozen_objects"):
        assert single.pop(name) >= 0 and group.pop(name) >= 0
    for name in ("actor/sm_clock_mhz", "actor/sm_clock_min_mhz"):
        assert single.pop(name) == group.pop(name) == 0
    diffs = {k: abs(single[k] - group[k]) for k in single}
    print(
        f"[{label}] metric max abs diff {max(diffs.values()):.2e} "
        f"(policy_loss {single['actor/policy_loss']:.4e}, clip_frac {single['actor/clip_frac']:.3f}, "
        f"grad_norm {single['actor/grad_norm']:.4e}, kl_loss {single['actor/kl_loss']:.3e})"
    )
    for k in single:
        assert group[k] == pytest.approx(single[k], rel=1e-4, abs=1e-6), k


def test_fsdp_group_update_equals_single_process_update(ray_session, qwen_image_rl_pipe, tiny_qwen_image_dir, tmp_path):
    start = time.perf_counter()
    # kl_coef > 0: the reference forward (adapter disabled) runs too; two epochs: the second one clips.
    model, rollout = model_config(tiny_qwen_image_dir), rollout_config()
    # The policy EMA on, moving after every optimizer step: each rank averages its own shard.
    actor = ActorConfig(
        optim=OptimConfig(lr=1e-2),
        clip_ratio=1e-4,
        kl_coef=0.1,
        ppo_micro_batch_size_per_gpu=2,
        ppo_epochs=2,
        ema=EMAConfig(enable=True, decay=0.9, update_interval=1),
    )
    group = FSDPLoRAActorGroup(model, replace(actor, world_size=2), rollout)
    try:
        (held0, full), (held1, full1) = group.shard_sizes()  # FSDP: each rank holds half the transformer
        print(f"transformer elements per rank: {held0} + {held1} of {full}")
        assert full == full1 and held0 + held1 == full and max(held0, held1) < 0.55 * full
        single = DiffusionLoRAActor(model, actor, rollout)
        gen = torch.Generator().manual_seed(0)
        init = {k: 0.05 * torch.randn(v.shape, generator=gen) for k, v in single.lora_state_dict().items()}
        single.load_lora_state_dict(init)
        group.load_lora_state_dict(init)
        for side in (single, group):  # the EMA starts from the same adapter too
            side.load_ema_state_dict({"lora": init, "optimizer_steps": 0})
        loaded = group.lora_state_dict()  # gathered: same peft names, shapes, dtype and checksum as loaded
        assert {k: (v.shape, v.dtype) for k, v in loaded.items()} == {k: (v.shape, v.dtype) for k, v in init.items()}
        assert tensors_checksum(loaded) == tensors_checksum(single.lora_state_dict())

        data = _rollout(qwen_image_rl_pipe)
        _on_policy(single, data)
        advantages = torch.randn(len(data), generator=gen)

        # 1) the full batch (8 rows; window steps of 4 and 8 rows: 2 rows per rank per micro-batch)
        m_single, m_group = single.update(data, advantages), group.update(data, advantages)
        lora_diff = _max_diff(single.lora_state_dict(), group.lora_state_dict())
        print(
            f"[full batch] LoRA max abs diff {lora_diff:.2e} "
            f"(LoRA moved {_max_diff(init, single.lora_state_dict()):.2e})"
        )
        _compare_metrics(m_single, m_group, "full batch")
        assert 0 < m_single["actor/clip_frac"] < 1  # epoch 1 unclipped, epoch 2 partly clipped
        assert lora_diff < 1e-5

        # 2) 5 rows: the last micro-batch has 1 row, so rank 1 runs an idle pass; Adam continues from step 1
        subset = data.select_idxs(torch.arange(5))
        m_single = single.update(subset, advantages[:5])
        m_group = group.update(subset, advantages[:5])
        lora_diff = _max_diff(single.lora_state_dict(), group.lora_state_dict())
        print(f"[5 rows, idle rank] LoRA max abs diff {lora_diff:.2e}")
        _compare_metrics(m_single, m_group, "5 rows")
        assert lora_diff < 1e-5

        # The policy EMA: gathered from the shards, it is the single process's; swapped in and out on every rank.
        ema_single, ema_group = single.ema_state_dict(), group.ema_state_dict()
        assert ema_single["optimizer_steps"] == ema_group["optimizer_steps"] == 4
        assert _max_diff(ema_single["lora"], ema_group["lora"]) < 1e-5
        assert _max_diff(ema_group["lora"], group.lora_state_dict()) > 1e-4  # it lags the adapter
        live = tensors_checksum(group.lora_state_dict())
        group.swap_in_ema()
        assert tensors_checksum(group.lora_state_dict()) == group.ema_checksum() == tensors_checksum(ema_group["lora"])
        group.swap_out_ema()
        assert tensors_checksum(group.lora_state_dict()) == live

        # Optimizer state: the single-process format, same values.
        opt_single, opt_group = single.optimizer.state_dict(), group.optimizer.state_dict()
        assert opt_group["param_groups"] == opt_single["param_groups"]
        worst = {}
        for i, state in opt_single["state"].items():
            for name, value in state.items():
                got = opt_group["state"][i][name]
                assert got.shape == value.shape
                worst[name] = max(
                    worst.get(name, 0.0), ((got - value).abs().max() / value.abs().max().clamp_min(1e-30)).item()
                )
        print(f"optimizer state max relative diff: {worst}")
        assert all(v < 1e-3 for v in worst.values()), worst

        # Checkpoint round trip through the trainer's own functions (the group's optimizer handle).
        path = save_checkpoint(str(tmp_path), 2, group.lora_state_dict(), group.optimizer)
        group.optimizer.load_state_dict(opt_single)  # overwrite, then restore from disk
        assert all(
            torch.equal(group.optimizer.state_dict()["state"][i]["exp_avg"], s["exp_avg"])
            for i, s in opt_single["state"].items()
        )
        lora, _ = load_checkpoint(path, group.optimizer)
        restored = group.optimizer.state_dict()
        for i, state in opt_group["state"].items():
            for name, value in state.items():
                assert torch.equal(torch.as_tensor(restored["state"][i][name]), torch.as_tensor(value)), (i, name)
        assert tensors_checksum(lora) == tensors_checksum(group.lora_state_dict())

        # Non-finite input: refused on every rank before any collective, LoRA unchanged.
        before = group.lora_state_dict()
        bad = data.select_idxs(torch.arange(8))
        bad.batch["old_log_probs"][3, :] = float("nan")
        with pytest.raises(NonFiniteError, match=r"old_log_probs.*\[3\]"):
            group.update(bad, advantages)
        assert tensors_checksum(group.lora_state_dict()) == tensors_checksum(before)
    finally:
        group.shutdown()
    print(f"test wall time {time.perf_counter() - start:.1f}s")
