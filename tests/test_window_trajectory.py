"""A training rollout keeps only the latents its SDE window's transitions read (``trajectory_window_only``), and the
actor trains on them exactly as on the whole trajectory (tiny Qwen-Image, float32, CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import model_config, num_rows, records_data_proto, rollout_config

from verl_omni.config.actor import ActorConfig, OptimConfig
from verl_omni.config.sampling import DiffusionSamplingParams
from verl_omni.workers.actor import DiffusionLoRAActor
from verl_omni.workers.train_batch import TrainBatch

PROMPTS = ["a red cat", "a blue house on a hill"]


def _params(start: int, window_only: bool) -> DiffusionSamplingParams:
    return DiffusionSamplingParams(
        num_inference_steps=5,
        height=32,
        width=32,
        sde_window_size=2,
        window_start=start,
        guidance_scale=2.0,
        trajectory_window_only=window_only,
    )


def _rollout(pipe, window_only: bool):
    records = []
    for i, prompt in enumerate(PROMPTS):  # the two groups have different windows: steps 1-2 and 3-4
        records.append(pipe.rl_generate(prompt, [3 + i, 4 + i], _params(1 + 2 * i, window_only)))
    raw = np.array([PROMPTS[i // 2] for i in range(num_rows(records))], dtype=object)
    uid = np.array([f"g{i // 2}" for i in range(num_rows(records))], dtype=object)
    return records_data_proto(records, {"raw_prompt": raw, "uid": uid})


def test_the_window_only_trajectory_is_the_full_one_at_the_window_positions(qwen_image_rl_pipe):
    full = qwen_image_rl_pipe.rl_generate(PROMPTS[0], [3, 4], _params(2, False))
    kept = qwen_image_rl_pipe.rl_generate(PROMPTS[0], [3, 4], _params(2, True))
    assert full.latent_steps.tolist() == list(range(6)) and kept.latent_steps.tolist() == [2, 3, 4]
    assert full.latents.shape[1] == 6 and kept.latents.shape[1] == 3
    assert torch.equal(kept.latents, full.latents[:, 2:5])
    assert torch.equal(kept.images, full.images) and torch.equal(kept.log_probs, full.log_probs)
    # no trajectory at all: nothing kept, positions empty
    none = qwen_image_rl_pipe.rl_generate(PROMPTS[0], [3], _params(2, True).replace(return_trajectory=False))
    assert none.latents.shape[1] == 0 and none.latent_steps.numel() == 0


def test_the_actor_trains_on_window_latents_exactly_as_on_the_whole_trajectory(qwen_image_rl_pipe, tiny_qwen_image_dir):
    full, kept = _rollout(qwen_image_rl_pipe, False), _rollout(qwen_image_rl_pipe, True)
    assert kept.batch["latents"].shape[1] == 3 and full.batch["latents"].shape[1] == 6
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5])
    rollout = rollout_config(pipeline={"true_cfg_scale": 2.0})
    actor_cfg = ActorConfig(optim=OptimConfig(lr=1e-2), ppo_micro_batch_size_per_gpu=2)
    states, log_probs = [], []
    for data in (full, kept):
        actor = DiffusionLoRAActor(model_config(tiny_qwen_image_dir), actor_cfg, rollout, lora_seed=5)
        with torch.no_grad():
            log_probs.append(actor.compute_log_probs(data, 3, torch.tensor([2, 3])).log_prob)
        actor.update(data, advantages)
        states.append(actor.lora_state_dict())
    assert torch.equal(log_probs[0], log_probs[1])
    for name in states[0]:
        assert torch.equal(states[0][name], states[1][name]), name


def test_rows_without_the_latents_of_a_window_step_are_refused_naming_them(qwen_image_rl_pipe):
    batch = TrainBatch.from_data_proto(_rollout(qwen_image_rl_pipe, True), torch.zeros(4))
    assert batch.latent_columns(torch.tensor([0, 1]), 1).tolist() == [0, 0]
    assert batch.latent_columns(torch.tensor([2, 3]), 4).tolist() == [1, 1]
    with pytest.raises(ValueError, match=r"rollout rows \[0, 1\] lack the latents of window step 3 -> 4"):
        batch.latent_columns(torch.tensor([0, 1]), 3)


def test_keep_latent_steps_adds_positions_and_alone_keeps_only_them(qwen_image_rl_pipe):
    full = qwen_image_rl_pipe.rl_generate(PROMPTS[0], [3, 4], _params(2, False))
    # With the window: its latents plus x_0 (-1 counts from the end) and x_T.
    both = qwen_image_rl_pipe.rl_generate(PROMPTS[0], [3, 4], _params(2, True).replace(keep_latent_steps=(-1, 0)))
    assert both.latent_steps.tolist() == [0, 2, 3, 4, 5]
    assert torch.equal(both.latents, full.latents[:, [0, 2, 3, 4, 5]])
    # ODE sampling (no window) that keeps only the final clean latent: one column, x_0 of the whole trajectory.
    ode = DiffusionSamplingParams(num_inference_steps=5, height=32, width=32, noise_level=0.0)
    whole = qwen_image_rl_pipe.rl_generate(PROMPTS[0], [3, 4], ode)
    x0 = qwen_image_rl_pipe.rl_generate(
        PROMPTS[0], [3, 4], ode.replace(trajectory_window_only=True, keep_latent_steps=[5])
    )
    assert x0.latent_steps.tolist() == [5] and x0.latents.shape[1] == 1
    assert torch.equal(x0.latents[:, 0], whole.latents[:, -1]) and torch.equal(x0.images, whole.images)


@pytest.mark.parametrize("bad", [(6,), (-7,), (1.0,), (True,)])
def test_keep_latent_steps_outside_the_trajectory_are_refused_naming_the_field(bad):
    params = DiffusionSamplingParams(num_inference_steps=5, keep_latent_steps=bad)
    with pytest.raises(ValueError, match=r"keep_latent_steps=.*\[-6, 5\]"):
        params.validate()
