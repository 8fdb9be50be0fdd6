"""MixGRPO behind the algorithm seam: its section and start-up checks, each group's sampling settings per training
step, its advantages, and its GPU recipe's keys. (Parity with the original code: tests/test_mixgrpo_parity.py;
learning on the tiny model: tests/test_trainer.py.)"""

import numpy as np
import pytest
import torch
from helpers import compose_preset, make_config

from verl_omni.algorithms import get_algorithm
from verl_omni.algorithms.flowgrpo import FlowGRPO
from verl_omni.algorithms.mixgrpo import MixGRPO, group_advantages, window_steps
from verl_omni.config.sampling import DiffusionSamplingParams
from verl_omni.config.trainer import FlowGRPOConfig


def _parse(**overrides):
    base = {"actor_rollout_ref.model.path": "tiny:qwen_image", "algorithm.name": "mixgrpo"}
    return FlowGRPOConfig.from_omega(make_config({**base, **overrides}))


def _algorithm(**section):
    cfg = _parse(**{f"algorithm.mixgrpo.{k}": v for k, v in section.items()})
    return cfg.algorithm.make(cfg.actor_rollout_ref.actor, cfg.actor_rollout_ref.rollout)


def _training_params(**kw):
    """The training rollout's params as config/rollout.py builds them (window-only trajectory)."""
    base = dict(num_inference_steps=10, noise_level=0.7, sde_window_size=2, trajectory_window_only=True)
    return DiffusionSamplingParams(**(base | kw))


def test_mixgrpo_is_registered_with_the_originals_defaults_and_flowgrpos_loss():
    cfg = _parse()
    section = cfg.algorithm.section
    assert get_algorithm("mixgrpo") is MixGRPO and issubclass(MixGRPO, FlowGRPO)
    assert (section.window_size, section.shift_interval, section.stride, section.strategy) == (4, 25, 1, "progressive")
    assert section.roll_back is True and section.ode_solver == "euler"
    # FlowGRPO's loss options at the original's values: every row trained, no detached CFG branch, no GRPO-Guard
    assert (section.detach_unconditional, section.drop_zero_advantage, section.grpo_guard) == (False, False, False)
    assert MixGRPO.loss is FlowGRPO.loss and MixGRPO.units is FlowGRPO.units  # the update is FlowGRPO's


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("algorithm.mixgrpo.window_size", 0, r"algorithm.mixgrpo.window_size=0 must be an int >= 1"),
        ("algorithm.mixgrpo.shift_interval", 0, r"algorithm.mixgrpo.shift_interval=0"),
        ("algorithm.mixgrpo.stride", -1, r"algorithm.mixgrpo.stride=-1"),
        ("algorithm.mixgrpo.strategy", "decay", r"algorithm.mixgrpo.strategy='decay' is not one of"),
        ("algorithm.mixgrpo.roll_back", "yes", r"algorithm.mixgrpo.roll_back='yes' must be true or false"),
        ("algorithm.mixgrpo.ode_solver", "heun", r"algorithm.mixgrpo.ode_solver='heun' is not one of"),
        ("algorithm.mixgrpo.ode_solver_order", 4, r"algorithm.mixgrpo.ode_solver_order=4"),
        ("algorithm.mixgrpo.ode_solver_type", "rk4", r"algorithm.mixgrpo.ode_solver_type='rk4'"),
        ("algorithm.mixgrpo.ode_compress_ratio", 1.5, r"algorithm.mixgrpo.ode_compress_ratio=1.5 must be <= 1"),
        ("algorithm.mixgrpo.window_size", 10, r"algorithm.mixgrpo.window_size=10 must be <= .*num_inference_steps - 1"),
        ("actor_rollout_ref.rollout.algo.noise_level", 0.0, r"actor_rollout_ref.rollout.algo.noise_level=0.0"),
        ("actor_rollout_ref.rollout.n", 1, r"actor_rollout_ref.rollout.n=1 must be >= 2"),
    ],
)
def test_bad_settings_fail_at_start_naming_the_key(key, value, match):
    with pytest.raises(ValueError, match=match):
        _parse(**{key: value})


def test_the_window_slides_with_the_training_step_and_is_shared_by_every_group():
    algo = _algorithm(window_size=3, shift_interval=2, stride=1)
    params = _training_params()
    starts = []
    for step in range(1, 22):
        per_group = [algo.sampling(params, step=step, group_seed=seed, validate=False) for seed in (1, 2, 3)]
        assert len({(p.window_start, p.sde_window_size) for p in per_group}) == 1  # one window per step
        out = per_group[0].validate()
        assert out.window_steps() == window_steps(step - 1, num_steps=10, window_size=3, shift_interval=2, stride=1)
        starts.append(out.window_start)
    # Two training steps per position, starts 0..8 (the last step is never trained), then back to 0.
    assert starts == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 0, 0, 1]
    # Near the end the window is cut before the last step: start 8 keeps one SDE step.
    late = algo.sampling(params, step=17, group_seed=0, validate=False)
    assert late.window_steps() == (8, 9) and late.sde_window_range is None


def test_random_windows_are_drawn_per_group_and_validation_samples_as_given():
    algo = _algorithm(strategy="random", window_size=2)
    params = _training_params(sde_window_range=(0, 3))
    starts = {algo.sampling(params, step=5, group_seed=s, validate=False).window_start for s in range(30)}
    assert len(starts) > 1 and starts <= set(range(0, 10 - 2 - 2 + 1))
    again = algo.sampling(params, step=5, group_seed=7, validate=False).window_start
    assert again == algo.sampling(params, step=5, group_seed=7, validate=False).window_start
    assert algo.sampling(params, step=5, group_seed=7, validate=True) is params


def test_the_flash_solver_travels_in_the_sampling_params():
    algo = _algorithm(ode_solver="dpmsolver++", ode_solver_order=3, ode_solver_type="heun", ode_compress_ratio=0.5)
    out = algo.sampling(_training_params(), step=1, group_seed=0, validate=False)
    assert (out.ode_solver, out.ode_solver_order, out.ode_solver_type, out.ode_compress_ratio) == (
        "dpmsolver++",
        3,
        "heun",
        0.5,
    )
    # What the server validates: a plain dict, rebuilt and checked.
    assert DiffusionSamplingParams.from_dict(out.to_dict()).validate() == out


def test_advantages_are_mixgrpos_sample_std_normalisation_in_float32():
    algo = _algorithm()
    rewards = np.array([0.1, 0.4, 0.3, 0.9, 0.5, 0.5])
    groups = ["a", "a", "a", "b", "b", "c"]
    adv, metrics = algo.advantages(rewards, groups)
    assert adv.dtype == torch.float32 and metrics == {}
    torch.testing.assert_close(adv, group_advantages(torch.as_tensor(rewards), groups).float())
    a = torch.tensor([0.1, 0.4, 0.3], dtype=torch.float64)
    torch.testing.assert_close(adv[:3], ((a - a.mean()) / (a.std() + 1e-8)).float())  # Bessel's correction
    assert adv[5] == 0  # a group of one


@pytest.mark.parametrize("ode_solver, shift_interval", [(None, 20), ("euler", 25)])
def test_the_gpu_recipe_samples_its_first_window_with_its_solver(ode_solver, shift_interval):
    """The recipe's preset (configs/qwen_image_mixgrpo_ocr_lora.yaml, MixGRPO-Flash), and plain MixGRPO as the
    script's ODE_SOLVER=euler overrides it, parse and give the first training step the window's first 4 steps."""
    overrides = ["actor_rollout_ref.model.path=/models/Qwen-Image"]
    if ode_solver is not None:
        overrides += [
            f"algorithm.mixgrpo.ode_solver={ode_solver}",
            f"algorithm.mixgrpo.shift_interval={shift_interval}",
        ]
    parsed = FlowGRPOConfig.from_omega(compose_preset("qwen_image_mixgrpo_ocr_lora", overrides))
    section = parsed.algorithm.section
    assert parsed.algorithm.name == "mixgrpo" and section.ode_solver == (ode_solver or "dpmsolver++")
    assert section.shift_interval == shift_interval
    algo = parsed.algorithm.make(parsed.actor_rollout_ref.actor, parsed.actor_rollout_ref.rollout)
    params = parsed.actor_rollout_ref.rollout.sampling_params(validate=False)
    sampled = algo.sampling(params, step=1, group_seed=0, validate=False).validate()
    assert sampled.window_steps() == (0, 4) and sampled.ode_solver == section.ode_solver
