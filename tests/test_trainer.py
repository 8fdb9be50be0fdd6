"""FlowGRPO end to end on the tiny Qwen-Image (diffusers engine, Ray): learning, sync, resume, refusals."""

import copy
import glob
import json
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from helpers import compose_preset, make_config, trainer_config

from verl_omni.core.checksum import tensors_checksum
from verl_omni.trainer.checkpoint import find_latest_checkpoint
from verl_omni.trainer.ray_trainer import FlowGRPOTrainer
from verl_omni.trainer.run_summary import TAIL_STEPS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


_cfg = trainer_config


def _train(cfg):
    trainer = FlowGRPOTrainer(cfg).init()
    try:
        asked, checksums = [], trainer.servers.lora_checksums  # the engines' checksums computed during fit()
        trainer.servers.lora_checksums = lambda: asked.append(1) or checksums()
        history = trainer.fit()
        trainer.checksum_requests = len(asked)
        engine_sums = trainer._run(trainer.servers.lora_checksums())
        # The actor's ranks (FSDP, or the hybrid engine's inside the replicas) are gone after shutdown.
        trainer.final_lora = trainer.actor.lora_state_dict()
        trainer.final_optimizer = trainer.actor.optimizer.state_dict()
        return trainer, history, engine_sums
    finally:
        trainer.shutdown()


DEMO_SCRIPT = os.path.join(REPO, "examples", "flowgrpo_trainer", "qwen_image", "run_qwen_image_tiny_cpu.sh")
# The README's CPU demo recipe (the preset configs/qwen_image_flowgrpo_tiny_cpu.yaml, which
# examples/flowgrpo_trainer/qwen_image/run_qwen_image_tiny_cpu.sh loads): the learning check below trains with it,
# and test_the_learning_check_trains_the_demo_recipe keeps the two in step.
DEMO_RECIPE = {
    "data.train_batch_size": 2,
    "actor_rollout_ref.model.lora_rank": 4,
    "actor_rollout_ref.model.lora_alpha": 8,
    "actor_rollout_ref.model.target_modules": ["to_out.0", "img_mlp.net.2", "norm_out.linear", "proj_out"],
    "actor_rollout_ref.actor.optim.lr": 2e-2,
    "actor_rollout_ref.rollout.n": 8,
    "actor_rollout_ref.rollout.pipeline.num_inference_steps": 6,
    "actor_rollout_ref.rollout.pipeline.height": 64,
    "actor_rollout_ref.rollout.pipeline.width": 64,
    "actor_rollout_ref.rollout.pipeline.max_sequence_length": 128,
    "actor_rollout_ref.rollout.algo.noise_level": 1.5,
    "actor_rollout_ref.rollout.algo.sde_window_size": 2,
    "actor_rollout_ref.rollout.algo.sde_window_range": [0, 3],
    "reward.rewards": [{"name": "brightness", "weight": 1.0}],
}
LEARNING_CHECK_STEPS = 20  # half the demo's 40
LEARNING_CHECK_MARGIN = 0.005  # two thirds of the smallest measured gain: see the test


def test_the_learning_check_trains_the_demo_recipe():
    from omegaconf import OmegaConf

    preset = compose_preset("qwen_image_flowgrpo_tiny_cpu")
    in_preset = {
        key: OmegaConf.to_container(OmegaConf.create({"v": OmegaConf.select(preset, key)}))["v"] for key in DEMO_RECIPE
    }
    assert in_preset == DEMO_RECIPE


def _flowgrpo_settings(cfg):
    assert cfg.actor_rollout_ref.rollout.algo.sde_window_size == 2 and cfg.actor_rollout_ref.rollout.n == 16
    assert cfg.actor_rollout_ref.rollout.pipeline.true_cfg_scale == 4.0


def _mixgrpo_settings(cfg):
    mix = cfg.algorithm.mixgrpo
    assert (mix.window_size, mix.shift_interval, mix.stride, mix.strategy, mix.roll_back) == (
        4,
        20,
        1,
        "progressive",
        True,
    )
    assert (mix.ode_solver, mix.ode_solver_order, mix.ode_compress_ratio) == ("dpmsolver++", 2, 0.4)
    assert cfg.actor_rollout_ref.rollout.algo.noise_level == 0.7 and cfg.actor_rollout_ref.rollout.n == 12


def _diffusion_nft_settings(cfg):
    nft = cfg.algorithm.diffusion_nft
    assert (nft.beta, nft.decay_type, nft.timestep_fraction, nft.global_std) == (0.1, 2, 0.99, True)
    assert cfg.actor_rollout_ref.rollout.pipeline.true_cfg_scale == 1.0  # CFG-free
    assert cfg.actor_rollout_ref.actor.kl_coef == 1e-4


@pytest.mark.parametrize(
    "preset_name, algorithm, settings",
    [
        ("qwen_image_flowgrpo_ocr_lora", "flowgrpo", _flowgrpo_settings),
        ("qwen_image_mixgrpo_ocr_lora", "mixgrpo", _mixgrpo_settings),
        ("qwen_image_diffusion_nft_ocr_lora", "diffusion_nft", _diffusion_nft_settings),
    ],
)
def test_the_gpu_recipe_sets_only_keys_the_config_knows_with_valid_values(preset_name, algorithm, settings):
    """Every key of a GPU recipe's preset is a key of the packaged YAML and holds a value its section accepts (a
    renamed or mistyped key would otherwise first fail on the user's GPU machine; Hydra merges a preset's unknown
    keys without a word), and the preset selects its algorithm with that algorithm's recipe settings."""
    from omegaconf import OmegaConf

    from verl_omni.config.trainer import FlowGRPOConfig

    preset = compose_preset(preset_name, ["actor_rollout_ref.model.path=tiny:qwen_image"])
    packaged = make_config()
    for key in _leaf_keys(OmegaConf.to_container(preset, resolve=False)):
        parent, name = key.rsplit(".", 1)
        assert name in OmegaConf.select(packaged, parent).keys(), key  # keys(): "???" (required) counts as present
    parsed = FlowGRPOConfig.from_omega(preset)
    assert parsed.algorithm.name == algorithm
    assert parsed.actor_rollout_ref.rollout.name == "vllm_omni" and parsed.actor_rollout_ref.model.lora_rank == 64
    assert parsed.actor_rollout_ref.model.gradient_checkpointing_blocks == "auto"  # the default, measured
    assert parsed.actor_rollout_ref.rollout.pipeline.batch_cfg == "auto"
    settings(parsed)


def _leaf_keys(tree, prefix=""):
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            yield from _leaf_keys(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}"


@pytest.mark.e2e
@pytest.mark.slow
def test_demo_recipe_raises_brightness_over_the_frozen_policy(
    ray_session, ocr_data_files, tiny_qwen_image_dir, tmp_path
):
    steps = LEARNING_CHECK_STEPS
    cfg = _cfg(ocr_data_files, tiny_qwen_image_dir, tmp_path, **DEMO_RECIPE, **{"trainer.total_training_steps": steps})
    last = list(range(steps - 4, steps + 1))
    trainer = FlowGRPOTrainer(cfg).init()
    try:
        initial = trainer.actor.lora_state_dict()  # LoRA B = 0: the adapter starts as the identity
        history = trainer.fit()
        # Rollout seeds depend only on (seed, step, prompt group): rolling step k out again with the initial
        # adapter gives what a run with lr=0 sees at step k, on the same noise (a paired comparison).
        trainer.actor.load_lora_state_dict(initial)
        trainer.sync_weights()
        frozen = {k: float(trainer.score(trainer.rollout(k))[0].mean()) for k in [1] + last}
    finally:
        trainer.shutdown()
    learned = [h["reward/total/mean"] for h in history]
    assert frozen[1] == pytest.approx(learned[0], abs=1e-6)  # the pairing holds: step 1 runs before any update
    paired = [learned[k - 1] - frozen[k] for k in last]
    gain = sum(paired) / len(paired)
    step1_std = history[0]["reward/total/std"]
    print(
        f"learning check: brightness over the frozen policy at steps {last[0]}..{steps}: mean {gain:+.4f} "
        f"({gain / step1_std:.1f} x the step-1 std {step1_std:.4f}); paired gaps {[round(d, 4) for d in paired]}; "
        f"frozen {[round(frozen[k], 4) for k in [1] + last]}; curve {[round(x, 4) for x in learned]}"
    )
    # Measured (trainer.seed 0 / 1 / 2, three LoRA initialisations and so three trajectories; the advantages' std
    # floor 1e-4): mean gaps over steps 16-20 of +0.0138 / +0.0158 / +0.0075 (6.8 / 7.8 / 3.7 x the step-1 std of
    # 0.0020), every paired gap positive. The margin, 0.005, is two thirds of the smallest (2.5 step-1 stds): a
    # recipe that stops learning fails it, a trajectory changed by float rounding on another CPU should not.
    assert all(d > 0 for d in paired)
    assert gain > LEARNING_CHECK_MARGIN


# Each algorithm's learning check: the CPU demo recipe with the overrides given for that algorithm (its section,
# its learning rate), judged as the run summary does (the mean of the last TAIL_STEPS steps minus step 1, in units of
# step 1's std over its images): name -> (steps, overrides).
ALGORITHM_LEARNING_CHECKS = {
    # Measured here: +0.0230 after 24 steps, 10.9 x the step-1 std (0.0021); on the demo's own data (trainer.seed
    # 0 / 1): 5.6 / 8.7 x (lr 2e-2: 3.3 / 4.5 x in 20 steps; lr 5e-2 overshot on seed 1).
    "diffusion_nft": (24, {"algorithm.name": "diffusion_nft", "actor_rollout_ref.actor.optim.lr": 3e-2}),
    # A window of 2 of the 6 steps that moves one step every 4 training steps (the 20 steps visit every start, 0..4);
    # Euler ODE steps, or MixGRPO-Flash's DPM-Solver++ steps on a compressed schedule after the window. Measured on
    # 2 cores: +13.2 x the step-1 std with Euler steps, +9.6 x with DPM-Solver++.
    "mixgrpo": (
        LEARNING_CHECK_STEPS,
        {
            "algorithm.name": "mixgrpo",
            "algorithm.mixgrpo.window_size": 2,
            "algorithm.mixgrpo.shift_interval": 4,
            "algorithm.mixgrpo.stride": 1,
        },
    ),
    "mixgrpo_flash": (
        LEARNING_CHECK_STEPS,
        {
            "algorithm.name": "mixgrpo",
            "algorithm.mixgrpo.window_size": 2,
            "algorithm.mixgrpo.shift_interval": 4,
            "algorithm.mixgrpo.stride": 1,
            "algorithm.mixgrpo.ode_solver": "dpmsolver++",
            "algorithm.mixgrpo.ode_compress_ratio": 0.6,
        },
    ),
}


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.parametrize("algorithm", sorted(ALGORITHM_LEARNING_CHECKS))
def test_demo_recipe_raises_brightness_with_each_algorithm(
    algorithm, ray_session, ocr_data_files, tiny_qwen_image_dir, tmp_path
):
    steps, overrides = ALGORITHM_LEARNING_CHECKS[algorithm]
    recipe = {**DEMO_RECIPE, **overrides, "trainer.total_training_steps": steps}
    trainer, history, engine_sums = _train(_cfg(ocr_data_files, tiny_qwen_image_dir, tmp_path, **recipe))
    rewards = [h["reward/total/mean"] for h in history]
    tail = rewards[-TAIL_STEPS:]
    change = sum(tail) / len(tail) - rewards[0]
    step1_std = history[0]["reward/total/std"]
    print(f"{algorithm}: change {change:+.4f} = {change / step1_std:.1f} x the step-1 std {step1_std:.4f}; {rewards}")
    assert len(history) == steps
    # after the last rollout the engine serves the trained adapter again (an algorithm's rollout weights swapped out)
    assert engine_sums == [tensors_checksum(trainer.final_lora)]
    assert change >= 5 * step1_std


@pytest.mark.e2e
def test_weight_sync_checksums_and_resume_is_bit_identical(
    ray_session, ocr_data_files, tiny_qwen_image_dir, tmp_path, capsys
):
    cfg = _cfg(
        ocr_data_files, tiny_qwen_image_dir, tmp_path, **{"trainer.total_training_steps": 2, "trainer.save_freq": 1}
    )
    first, history, engine_sums = _train(cfg)
    lora = first.final_lora
    assert all(s == tensors_checksum(lora) for s in engine_sums)  # every replica serves the actor's adapter
    # The hybrid engine's one replica trains its adapter in place: a step has nothing to compare, so the engine
    # hashes it only for each checkpoint's meta (save_freq 1: two), where it is the saved adapter's checksum.
    assert first.checksum_requests == 2
    with open(tmp_path / "global_step_2" / "meta.json") as f:
        assert json.load(f)["lora_checksum"] == tensors_checksum(lora)
    assert len(history) == 2 and history[-1]["actor/grad_norm"] > 0
    assert any(v.abs().sum() > 0 for v in lora.values())
    assert find_latest_checkpoint(str(tmp_path)).endswith("global_step_2")

    cfg3 = _cfg(
        ocr_data_files, tiny_qwen_image_dir, tmp_path, **{"trainer.total_training_steps": 3, "trainer.save_freq": 1}
    )
    resumed = FlowGRPOTrainer(cfg3).init()
    try:
        assert resumed.global_step == 2
        resumed_lora = resumed.actor.lora_state_dict()
        assert all(torch.equal(lora[k], resumed_lora[k]) for k in lora)
        a, b = first.final_optimizer, resumed.actor.optimizer.state_dict()
        for key, state in a["state"].items():
            for name, value in state.items():
                assert torch.equal(torch.as_tensor(value), torch.as_tensor(b["state"][key][name])), (key, name)
        assert resumed._run(resumed.servers.lora_checksums()) == [tensors_checksum(resumed_lora)]
        history = resumed.fit()
        assert len(history) == 1 and resumed.global_step == 3
    finally:
        resumed.shutdown()
    assert find_latest_checkpoint(str(tmp_path)).endswith("global_step_3")

    # Zeroed bytes in the newest adapter: named, the previous checkpoint resumed instead (the trainer's default
    # trainer.resume_on_damage=fallback); and a saved step >= trainer.total_training_steps is said, not silent.
    step3 = tmp_path / "global_step_3" / "lora.safetensors"
    data = bytearray(step3.read_bytes())
    data[len(data) // 2 :] = bytes(len(data) - len(data) // 2)
    step3.write_bytes(bytes(data))
    capsys.readouterr()
    again = FlowGRPOTrainer(cfg).init()
    try:
        assert again.global_step == 2
        assert all(torch.equal(lora[k], v) for k, v in again.actor.lora_state_dict().items())
        assert again.fit() == []
    finally:
        again.shutdown()
    out = capsys.readouterr().out
    assert "global_step_3 is damaged: lora.safetensors: sha256" in out and "resuming from" in out
    assert "resumed at global step 2, which is >= trainer.total_training_steps=2" in out


@pytest.mark.e2e
def test_non_finite_rollout_is_refused_and_lora_unchanged(ray_session, ocr_data_files, tiny_qwen_image_dir, tmp_path):
    cfg = _cfg(ocr_data_files, tiny_qwen_image_dir, tmp_path, **{"trainer.total_training_steps": 1})
    trainer = FlowGRPOTrainer(cfg).init()
    try:
        output = trainer.rollout(1)
        before = trainer.actor.lora_state_dict()
        output.batch["old_log_probs"][3, :] = float("nan")
        with pytest.raises(ValueError, match=r"old_log_probs.*\[3\]"):
            trainer.actor.update(output, torch.zeros(len(output)))
        after = trainer.actor.lora_state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)
    finally:
        trainer.shutdown()


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("actor_rollout_ref.rollout.n", 0, "actor_rollout_ref.rollout.n=0 must be an int >= 1"),
        ("actor_rollout_ref.rollout.n", 1, "actor_rollout_ref.rollout.n=1 must be >= 2: FlowGRPO's advantages"),
        ("actor_rollout_ref.model.lora_rank", -1, "actor_rollout_ref.model.lora_rank=-1 must be an int >= 0"),
        ("actor_rollout_ref.rollout.limits.max_pixels", 0, "actor_rollout_ref.rollout.limits.max_pixels=0 must be"),
        ("trainer.n_gpus_per_node", 0, "trainer.n_gpus_per_node=0 must be an int >= 1"),
        ("actor_rollout_ref.rollout.name", "sglang", "actor_rollout_ref.rollout.name='sglang' is not one of"),
        ("actor_rollout_ref.rollout.algo.sde_type", "ode", "sde_type='ode' is not one of"),
        ("actor_rollout_ref.rollout.pipeline.num_inference_steps", 0, "num_inference_steps=0 must be >= 1"),
        ("actor_rollout_ref.rollout.algo.sde_window_size", 20, "sde_window_size=20 exceeds num_inference_steps=10"),
        (
            "actor_rollout_ref.model.pipeline",
            "no_such_family",
            "actor_rollout_ref.model.pipeline='no_such_family' is not a registered model family; registered: ",
        ),
        ("actor_rollout_ref.actor.clip_ratio", 0.0, "actor_rollout_ref.actor.clip_ratio=0.0 must be a number > 0"),
        ("trainer.resume_mode", "sometimes", "trainer.resume_mode='sometimes' is not one of"),
        ("trainer.logger", ["console", "papyrus"], "trainer.logger has \\['papyrus'\\]"),
        ("actor_rollout_ref.rollout.dtype", "bf16", "actor_rollout_ref.rollout.dtype='bf16' is not one of"),
        ("actor_rollout_ref.actor.device", "tpu", "actor_rollout_ref.actor.device='tpu' must be 'cpu', 'cuda'"),
        ("actor_rollout_ref.rollout.algo.noise_level", 0.0, "algo.noise_level=0.0 must be > 0 for training"),
        ("actor_rollout_ref.rollout.agent.num_workers", 0, "agent.num_workers=0 must be an int >= 1"),
        ("actor_rollout_ref.rollout.val_kwargs.n", 1.5, "val_kwargs.n=1.5 must be an int >= 1"),
        ("trainer.max_steps_without_signal", -1, "trainer.max_steps_without_signal=-1 must be an int >= 0"),
        (
            "reward.rewards",
            [{"name": "ocr", "weight": 0}, {"name": "jpeg", "weight": 0.0}],
            r"every reward weight is 0 \(reward.rewards\[0\].weight, reward.rewards\[1\].weight\)",
        ),
    ],
)
def test_bad_config_fails_at_start_naming_the_key(key, value, match):
    cfg = make_config({"actor_rollout_ref.model.path": "tiny:qwen_image", key: value})
    with pytest.raises(ValueError, match=match):
        FlowGRPOTrainer(cfg)


def test_the_hybrid_engine_needs_the_actor_and_rollout_on_the_same_kind_of_device_and_dtype():
    dtypes = make_config(
        {"actor_rollout_ref.model.path": "tiny:qwen_image", "actor_rollout_ref.rollout.dtype": "bfloat16"}
    )
    with pytest.raises(ValueError, match="trains the engine's own weights: actor_rollout_ref.actor.dtype='float32'"):
        FlowGRPOTrainer(dtypes)
    mixed = make_config(
        {
            "actor_rollout_ref.model.path": "tiny:qwen_image",
            "actor_rollout_ref.hybrid_engine": True,
            "actor_rollout_ref.actor.device": "cuda",
        }
    )
    with pytest.raises(
        ValueError, match="hybrid_engine=true colocates .*actor.device='cuda' and .*rollout.device='cpu'"
    ):
        FlowGRPOTrainer(mixed)
    fsdp = make_config(
        {
            "actor_rollout_ref.model.path": "tiny:qwen_image",
            "actor_rollout_ref.hybrid_engine": True,
            "actor_rollout_ref.actor.world_size": 2,
        }
    )
    with pytest.raises(ValueError, match="world_size=2 applies to the split placement only.*trainer.n_gpus_per_node"):
        FlowGRPOTrainer(fsdp)


def test_unknown_keys_are_rejected_by_the_entry_point():
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "verl_omni.trainer.main_flowgrpo",
            "actor_rollout_ref.model.path=tiny:qwen_image",
            "actor_rollout_ref.rollout.nn=4",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert out.returncode != 0 and "actor_rollout_ref.rollout.nn" in out.stderr


def test_the_console_script_finds_its_config_from_any_directory(tmp_path):
    script = os.path.join(os.path.dirname(sys.executable), "verl-omni-flowgrpo")
    shown = subprocess.run([script, "--help"], capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert "== Config ==" in shown.stdout and "max_steps_without_signal: 3" in shown.stdout
    job = subprocess.run(
        [script, "--cfg", "job", "actor_rollout_ref.model.path=tiny:sd3", "trainer.total_training_steps=7"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=600,
    )
    assert job.returncode == 0, job.stderr[-2000:]
    assert "path: tiny:sd3" in job.stdout and "total_training_steps: 7" in job.stdout


def test_a_zero_weight_beside_a_weighted_reward_is_accepted():
    cfg = make_config(
        {
            "actor_rollout_ref.model.path": "tiny:qwen_image",
            "reward.rewards": [{"name": "ocr", "weight": 1.0}, {"name": "jpeg", "weight": 0}],
        }
    )
    assert FlowGRPOTrainer(cfg).config.reward.rewards[1]["weight"] == 0


@pytest.mark.e2e
@pytest.mark.slow
def test_readme_cpu_demo_learns_within_five_minutes_and_says_where_its_outputs_are(tmp_path):
    metrics_file = tmp_path / "metrics.jsonl"  # every metric (verl's file logger); the console prints the key figures
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "OUT_DIR": str(tmp_path / "demo"),
        "VERL_FILE_LOGGER_PATH": str(metrics_file),
    }
    start = time.perf_counter()
    out = subprocess.run(
        ["bash", DEMO_SCRIPT, "trainer.logger=[console,tensorboard,file]"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    elapsed = time.perf_counter() - start
    assert out.returncode == 0, out.stderr[-3000:]
    print(f"CPU demo wall time: {elapsed:.1f}s")
    assert elapsed < 300
    demo = tmp_path / "demo" / "checkpoints"
    assert "step 40 | reward " in out.stdout
    steps = [r["data"] for r in map(json.loads, metrics_file.read_text().splitlines()) if "timing/step_s" in r["data"]]
    assert len(steps) == 40 and all("reward/brightness/mean" in data for data in steps)
    # The demo's prompts fit max_sequence_length: no row was cut in any step, and no per-step warning says so.
    assert "prompt cut at" not in out.stdout + out.stderr
    assert [data["rollout/truncated_prompts"] for data in steps] == [0] * 40
    # The summary: the bar is +0.05 on a [0, 1] reward (measured: +0.084 on 2 cores, 40 steps).
    change = float(re.search(r"change \(last-5 mean - step 1\): ([+-][0-9.]+)", out.stdout).group(1))
    assert change > 0.05, out.stdout[-2000:]
    for line in (
        f"reward curve:    {demo / 'reward_curve.png'}",
        f"checkpoint:      {demo / 'global_step_40'}",
        f"validation grid: {demo / 'validation' / 'step_40.png'}",
    ):
        assert line in out.stdout
    assert (demo / "reward_curve.png").stat().st_size > 0
    assert find_latest_checkpoint(str(demo)).endswith("global_step_40")
    assert glob.glob(str(demo / "samples" / "train_step_1" / "*.png"))
    assert glob.glob(str(demo / "tensorboard" / "events.*"))


@pytest.mark.e2e
def test_sd3_with_cfg_and_kl_trains_and_recomputes_rollout_log_probs(
    ray_session, ocr_data_files, tiny_sd3_dir, tmp_path
):
    cfg = _cfg(
        ocr_data_files,
        tiny_sd3_dir,
        tmp_path,
        **{
            "actor_rollout_ref.model.pipeline": "sd3",
            "actor_rollout_ref.actor.kl_coef": 0.1,
            "actor_rollout_ref.rollout.pipeline.true_cfg_scale": 3.0,
            "actor_rollout_ref.rollout.pipeline.negative_prompt": "blurry",
            "trainer.total_training_steps": 2,
        },
    )
    trainer, history, engine_sums = _train(cfg)
    first, second = history
    # Before the first update the policy is the rollout policy: recomputed log-probs equal the rollout's.
    assert first["actor/ratio_min"] == pytest.approx(1.0, abs=1e-4)
    assert first["actor/ratio_max"] == pytest.approx(1.0, abs=1e-4)
    assert first["actor/kl_loss"] == pytest.approx(0.0, abs=1e-8)  # adapter starts as the identity
    assert second["actor/kl_loss"] > 0  # after one update the policy moved away from the reference
    assert engine_sums == [tensors_checksum(trainer.final_lora)]
    assert trainer.checksum_requests == 0  # the hybrid engine's one replica, no checkpoint: nothing hashed in fit()
    with pytest.raises(RuntimeError, match="before shutdown"):  # the engines are gone: a clear error, not asyncio's
        _ = trainer.last_lora_checksum


@pytest.mark.e2e
def test_bf16_engines_verify_against_fp32_master_weights(ray_session, ocr_data_files, tiny_qwen_image_dir, tmp_path):
    # The actor trains float32 LoRA weights; a bf16 engine serves them rounded. The sync sends the rounded
    # tensors, so the engine's checksum still equals what the actor sent after every update.
    cfg = _cfg(
        ocr_data_files,
        tiny_qwen_image_dir,
        tmp_path,
        **{
            "actor_rollout_ref.hybrid_engine": False,  # the split placement's sync (the hybrid engine copies nothing)
            "actor_rollout_ref.rollout.dtype": "bfloat16",
            "trainer.total_training_steps": 2,
        },
    )
    trainer, history, engine_sums = _train(cfg)
    sent = {k: v.to(torch.bfloat16) for k, v in trainer.final_lora.items()}
    assert engine_sums == [tensors_checksum(sent)] and len(history) == 2


@pytest.mark.e2e
def test_fsdp_world_size_two_trains_syncs_and_resumes(ray_session, ocr_data_files, tiny_qwen_image_dir, tmp_path):
    cfg = _cfg(
        ocr_data_files,
        tiny_qwen_image_dir,
        tmp_path,
        **{
            "actor_rollout_ref.hybrid_engine": False,
            "actor_rollout_ref.actor.world_size": 2,
            "trainer.total_training_steps": 2,
            "trainer.save_freq": 2,
        },
    )
    trainer, history, engine_sums = _train(cfg)
    lora = trainer.final_lora
    assert len(history) == 2 and engine_sums == [tensors_checksum(lora)]
    resumed = FlowGRPOTrainer(cfg).init()
    try:
        assert resumed.global_step == 2
        assert all(torch.equal(lora[k], v) for k, v in resumed.actor.lora_state_dict().items())
    finally:
        resumed.shutdown()


def test_cps_with_kl_needs_a_window_before_the_last_step():
    cfg = make_config(
        {
            "actor_rollout_ref.model.path": "tiny:qwen_image",
            "actor_rollout_ref.rollout.algo.sde_type": "cps",
            "actor_rollout_ref.actor.kl_coef": 0.1,
        }
    )
    with pytest.raises(ValueError, match="sde_type='cps' with actor_rollout_ref.actor.kl_coef>0"):
        FlowGRPOTrainer(cfg)
    ok = make_config(
        {
            "actor_rollout_ref.model.path": "tiny:qwen_image",
            "actor_rollout_ref.rollout.algo.sde_type": "cps",
            "actor_rollout_ref.actor.kl_coef": 0.1,
            "actor_rollout_ref.rollout.algo.sde_window_size": 2,
            "actor_rollout_ref.rollout.algo.sde_window_range": [0, 5],
        }
    )
    FlowGRPOTrainer(ok)


@pytest.mark.e2e
def test_start_up_checks_that_need_the_model_or_the_cluster(ray_session, ocr_data_files, tiny_qwen_image_dir, tmp_path):
    bad_size = _cfg(ocr_data_files, tiny_qwen_image_dir, tmp_path, **{"actor_rollout_ref.rollout.pipeline.height": 60})
    with pytest.raises(ValueError, match="actor_rollout_ref.rollout.pipeline: height=60 must be a multiple of 16"):
        FlowGRPOTrainer(bad_size).init()
    gpu = _cfg(
        ocr_data_files,
        tiny_qwen_image_dir,
        tmp_path,
        **{"actor_rollout_ref.rollout.device": "cuda", "actor_rollout_ref.actor.device": "cuda"},
    )
    with pytest.raises(ValueError, match="need 1 GPUs; the Ray cluster has 0"):
        FlowGRPOTrainer(gpu).init()
    missing = _cfg(ocr_data_files, tmp_path / "no_such_model", tmp_path)
    with pytest.raises(FileNotFoundError, match="actor_rollout_ref.model.path=.*no_such_model.*model_index.json"):
        FlowGRPOTrainer(missing).init()
    one_step = _cfg(
        ocr_data_files,
        tiny_qwen_image_dir,
        tmp_path,
        **{
            "actor_rollout_ref.rollout.pipeline.num_inference_steps": 1,
            "actor_rollout_ref.rollout.algo.sde_window_size": 1,
        },
    )
    with pytest.raises(
        ValueError, match="actor_rollout_ref.rollout.pipeline: shift_terminal needs num_inference_steps >= 2"
    ):
        FlowGRPOTrainer(one_step).init()
    val_one_step = _cfg(
        ocr_data_files, tiny_qwen_image_dir, tmp_path, **{"actor_rollout_ref.rollout.val_kwargs.num_inference_steps": 1}
    )
    with pytest.raises(ValueError, match="actor_rollout_ref.rollout.val_kwargs: shift_terminal needs"):
        FlowGRPOTrainer(val_one_step).init()


@pytest.mark.e2e
def test_a_refused_step_after_a_partial_update_restores_lora_and_optimizer(
    ray_session, ocr_data_files, tiny_qwen_image_dir, tmp_path
):
    # The split placement keeps the actor in this process, so the test can make its second epoch fail; the
    # hybrid engine's ranks run the same DiffusionLoRAActor code in the replicas.
    cfg = _cfg(
        ocr_data_files,
        tiny_qwen_image_dir,
        tmp_path,
        **{
            "actor_rollout_ref.hybrid_engine": False,
            "actor_rollout_ref.actor.ppo_epochs": 2,
            "trainer.nan_policy": "skip",
            "trainer.total_training_steps": 2,
        },
    )
    trainer = FlowGRPOTrainer(cfg).init()
    try:
        trainer.global_step = 1
        assert trainer.train_step(1) is not None
        lora = trainer.actor.lora_state_dict()
        optim = copy.deepcopy(trainer.actor.optimizer.state_dict())  # state_dict() holds the live tensors
        real_clip, calls = trainer.actor._clip_grad_norm, []

        def clip_then_fail():  # epoch 1 steps the optimizer, epoch 2 meets an inf gradient
            calls.append(1)
            return real_clip() if len(calls) == 1 else torch.tensor(float("inf"))

        trainer.actor._clip_grad_norm = clip_then_fail
        assert trainer.train_step(2) is None and len(calls) == 2
        after = trainer.actor.lora_state_dict()
        assert all(torch.equal(lora[k], after[k]) for k in lora)
        restored = trainer.actor.optimizer.state_dict()
        assert all(torch.equal(optim["state"][i]["exp_avg"], restored["state"][i]["exp_avg"]) for i in optim["state"])
        assert not trainer.actor.transformer.training
        assert trainer._run(trainer.servers.lora_checksums()) == [trainer.last_lora_checksum]
    finally:
        trainer.shutdown()


@pytest.mark.e2e
def test_streamed_rewards_equal_rewards_scored_after_the_rollout(
    ray_session, ocr_data_files, tiny_qwen_image_dir, tmp_path
):
    rewards = [{"name": "brightness", "weight": 1.0}, {"name": "jpeg_compressibility", "weight": 0.5}]
    scores = {}
    for streaming in (True, False):
        cfg = _cfg(
            ocr_data_files,
            tiny_qwen_image_dir,
            tmp_path / str(streaming),
            **{"reward.rewards": rewards, "reward.streaming": streaming, "trainer.total_training_steps": 1},
        )
        trainer = FlowGRPOTrainer(cfg).init()
        try:
            assert (trainer.reward_pool is not None) == streaming
            output = trainer.rollout(1)
            assert ("rewards" in output.batch.keys()) == streaming
            scores[streaming] = trainer.score(output)
            if streaming:
                metrics = output.meta_info["metrics"]
                assert metrics["reward/tail_s"] >= 0 and metrics["reward/brightness/seconds"] > 0
        finally:
            trainer.shutdown()
    (streamed, streamed_metrics), (post_hoc, post_hoc_metrics) = scores[True], scores[False]
    assert np.array_equal(streamed, post_hoc)  # same seeds, same images, same scores, row for row

    def means(metrics):  # seconds differ run to run (streamed seconds arrive with the rollout's metrics)
        return {k: v for k, v in metrics.items() if not k.endswith("/seconds")}

    assert means(streamed_metrics) == means(post_hoc_metrics) and len(means(streamed_metrics)) == 6
