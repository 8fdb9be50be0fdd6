"""The diffusion agent loop through verl's agent-loop workers, Ray and 2 diffusers replicas."""

import asyncio

import numpy as np
import pytest
import torch
from helpers import make_config, prompt_batch, start_servers

from verl_omni.agent_loop.diffusion_agent_loop import DiffusionAgentLoopManager
from verl_omni.config.sampling import ROW_SETTINGS
from verl_omni.config.trainer import FlowGRPOConfig

PROMPTS = ['a sign that says "one"', 'a mug that says "two"', 'a cake that says "three"', 'a flag that says "four"']
N = 4


def _cfg(model_dir, **extra):
    return make_config(
        {
            "actor_rollout_ref.model.path": model_dir,
            "actor_rollout_ref.model.lora_rank": 4,
            "actor_rollout_ref.rollout.n": N,
            "trainer.n_gpus_per_node": 2,  # the hybrid engine: one replica per device
            "actor_rollout_ref.rollout.pipeline.num_inference_steps": 4,
            "actor_rollout_ref.rollout.algo.sde_window_size": 2,
            **extra,
        }
    )


@pytest.fixture(scope="module")
def rig(ray_session, tiny_qwen_image_dir):
    loop = asyncio.new_event_loop()
    _, servers, client = start_servers(loop, _cfg(tiny_qwen_image_dir))
    managers = {
        flag: DiffusionAgentLoopManager.create(
            FlowGRPOConfig.from_omega(
                _cfg(tiny_qwen_image_dir, **{"actor_rollout_ref.rollout.enable_batched_diffusion": flag})
            ),
            client,
        )
        for flag in (True, False)
    }

    def run(flag, batch):
        loop.run_until_complete(servers.reset_stats())
        out = loop.run_until_complete(managers[flag].generate_sequences(batch))
        return out, loop.run_until_complete(servers.stats())

    yield run
    loop.run_until_complete(servers.shutdown())
    loop.close()


def test_batched_and_per_row_paths_return_the_same_samples_in_row_order(rig):
    batch = prompt_batch(PROMPTS, N)
    batched, stats_on = rig(True, batch)
    per_row, stats_off = rig(False, prompt_batch(PROMPTS, N))
    # Same seeds, same window: the same samples. Exact for the discrete fields; float32 kernels of a B=N
    # forward round differently from B=1, so images may differ by 1/255 and latents by ~1e-6.
    for key in ("window_mask", "timesteps", "prompt_embeds", "seeds", *ROW_SETTINGS):
        assert torch.equal(batched.batch[key], per_row.batch[key]), key
    assert batched.batch["media"].shape == (len(PROMPTS) * N, 1, 64, 64, 3)  # images: one frame each
    pixel_diff = (batched.batch["media"].int() - per_row.batch["media"].int()).abs().max().item()
    latent_diff = (batched.batch["latents"] - per_row.batch["latents"]).abs().max().item()
    logp_diff = (batched.batch["old_log_probs"] - per_row.batch["old_log_probs"]).abs().max().item()
    print(f"batched vs per-row: max pixel diff {pixel_diff}, latents {latent_diff:.2e}, log-probs {logp_diff:.2e}")
    assert pixel_diff <= 1 and latent_diff < 1e-4 and logp_diff < 1e-3
    assert list(batched.non_tensor_batch["uid"]) == list(batch.non_tensor_batch["uid"])
    assert list(batched.non_tensor_batch["prompt_text"]) == [p for p in PROMPTS for _ in range(N)]
    # every group shares one SDE window; different samples of a group have different seeds and images
    masks = batched.batch["window_mask"].view(len(PROMPTS), N, -1)
    assert (masks == masks[:, :1]).all() and masks.sum(-1).eq(2).all()
    assert len(set(batched.batch["seeds"].tolist())) == len(PROMPTS) * N
    # every row carries the settings it was sampled with (the config's: noise 0.7, sde, no CFG, 4 steps)
    rows = len(PROMPTS) * N
    assert torch.equal(batched.batch["noise_level"], torch.full((rows,), 0.7, dtype=torch.float64))
    assert batched.batch["sde_type"].eq(0).all() and batched.batch["guidance_scale"].eq(1.0).all()
    assert batched.batch["num_inference_steps"].eq(4).all()
    # engine calls counted in the engines themselves: one per group batched, one per row otherwise
    assert sum(s["engine_calls"] for s in stats_on) == len(PROMPTS)
    assert sorted(b for s in stats_on for b in s["batch_sizes"]) == [N] * len(PROMPTS)
    assert sum(s["engine_calls"] for s in stats_off) == len(PROMPTS) * N
    assert batched.meta_info["metrics"]["rollout/batched_groups"] == len(PROMPTS)
    assert per_row.meta_info["metrics"]["rollout/fallback_reason/disabled"] == len(PROMPTS)


def test_groups_are_spread_evenly_over_both_replicas(rig):
    _, stats = rig(True, prompt_batch(PROMPTS, N))
    # verl's balancer sends each request to the least busy server: 4 concurrent groups, 2 replicas -> 2 + 2.
    assert sorted(s["engine_calls"] for s in stats) == [2, 2], stats
    assert sorted(s["images"] for s in stats) == [2 * N, 2 * N], stats


def test_a_mixed_group_falls_back_and_the_others_batch(rig):
    batch = prompt_batch(PROMPTS, N)
    batch.non_tensor_batch["raw_prompt"][5] = [{"role": "user", "content": 'a hat that says "odd"'}]
    out, stats = rig(True, batch)
    metrics = out.meta_info["metrics"]
    assert metrics["rollout/batched_groups"] == 3 and metrics["rollout/fallback_groups"] == 1
    assert metrics["rollout/fallback_reason/mixed_raw_prompt"] == 1
    assert sorted(b for s in stats for b in s["batch_sizes"]) == [1] * N + [N] * 3
    assert out.non_tensor_batch["prompt_text"][5] == 'a hat that says "odd"'


def test_odd_lengths_and_agent_names_take_the_per_row_path(rig):
    batch = prompt_batch(PROMPTS[:2], N)
    out, _ = rig(True, batch[:7])  # not a multiple of n
    assert out.meta_info["metrics"]["rollout/fallback_reason/length_not_multiple_of_n"] == 2 and len(out) == 7

    single = prompt_batch(PROMPTS[:2], 1)
    single.meta_info["n"] = 1
    out, stats = rig(True, single)
    assert out.meta_info["metrics"]["rollout/fallback_reason/n_is_1"] == 2

    named = prompt_batch(PROMPTS[:1], N)
    named.non_tensor_batch["agent_name"] = np.array(["diffusion_single_turn"] * 3 + ["custom"], dtype=object)
    with pytest.raises(Exception, match="custom"):  # unknown agent loop name: a clear error naming it
        rig(True, named)


def test_row_sampling_params_and_negative_prompts_are_applied_on_both_paths(rig):
    for flag in (True, False):
        batch = prompt_batch(PROMPTS[:2], N, tag=f"sp{flag}")
        batch.non_tensor_batch["sampling_params"] = np.array([{"num_inference_steps": 3}] * (2 * N), dtype=object)
        batch.non_tensor_batch["negative_prompt"] = np.array(["blurry"] * (2 * N), dtype=object)
        out, stats = rig(flag, batch)
        assert out.batch["timesteps"].shape[1] == 3
        # the training rollout keeps the window's latents only: x_s and x_{s+1} of its 2 steps
        window, kept = out.batch["window_mask"], out.batch["latent_steps"]
        assert out.batch["latents"].shape[1] == kept.shape[1] == 3
        for row in range(len(kept)):
            start = int(torch.nonzero(window[row])[0])
            assert kept[row].tolist() == [start, start + 1, start + 2]
        assert sum(s["engine_calls"] for s in stats) == (2 if flag else 2 * N)
    for overrides, match in (
        ({"steps": 3}, "\\['steps'\\] cannot be set per row"),
        ({"noise_level": 0.1}, "\\['noise_level'\\] cannot be set per row"),
    ):
        bad = prompt_batch(PROMPTS[:1], N, tag="spbad")
        bad.non_tensor_batch["sampling_params"] = np.array([overrides] * N, dtype=object)
        with pytest.raises(Exception, match=match):
            rig(True, bad)
    mixed = prompt_batch(PROMPTS[:2], N, tag="spmixed")
    mixed.non_tensor_batch["sampling_params"] = np.array([{"num_inference_steps": 3}] * N + [{}] * N, dtype=object)
    with pytest.raises(Exception, match="must share media size .* num_inference_steps"):
        rig(True, mixed)
