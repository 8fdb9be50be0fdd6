"""Failures are loud and recoverable: dead engines, taken ports, NaNs, half-written checkpoints, bad data."""

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pandas as pd
import pytest
import ray
import torch
from helpers import make_config, start_servers, trainer_config

from verl_omni.core.errors import NonFiniteError
from verl_omni.models.lora import LoRASpec, add_lora_adapter
from verl_omni.trainer.checkpoint import LATEST, find_latest_checkpoint, read_checkpoint, save_checkpoint
from verl_omni.trainer.data import PromptDataset
from verl_omni.trainer.ray_trainer import FlowGRPOTrainer


def _cfg(ocr_data_files, model_dir, out_dir, **extra):
    return trainer_config(ocr_data_files, model_dir, out_dir, **{"trainer.save_freq": 1, **extra})


@pytest.mark.e2e
def test_engine_killed_mid_rollout_fails_fast_and_resume_loses_only_that_step(
    ray_session, ocr_data_files, tiny_qwen_image_dir, tmp_path
):
    cfg = _cfg(
        ocr_data_files,
        tiny_qwen_image_dir,
        tmp_path,
        **{"trainer.total_training_steps": 3, "actor_rollout_ref.rollout.pipeline.num_inference_steps": 8},
    )
    trainer = FlowGRPOTrainer(cfg).init()
    try:
        trainer.train_step(1)
        trainer.global_step = 1
        trainer.save(1)
        saved = trainer.actor.lora_state_dict()
        server = trainer.servers.replicas[0].server_handle
        killer = threading.Timer(0.3, lambda: ray.kill(server))
        killer.start()
        start = time.perf_counter()
        with pytest.raises(Exception, match="died during request"):
            trainer.train_step(2)
        elapsed = time.perf_counter() - start
        assert elapsed < 60, f"a dead engine took {elapsed:.0f}s to surface"
    finally:
        killer.cancel()
        trainer.shutdown()
    assert find_latest_checkpoint(str(tmp_path)).endswith("global_step_1")  # untouched by the failed step

    resumed = FlowGRPOTrainer(
        _cfg(
            ocr_data_files,
            tiny_qwen_image_dir,
            tmp_path,
            **{"trainer.total_training_steps": 3, "actor_rollout_ref.rollout.pipeline.num_inference_steps": 8},
        )
    ).init()
    try:
        assert resumed.global_step == 1
        assert all(torch.equal(saved[k], v) for k, v in resumed.actor.lora_state_dict().items())
        history = resumed.fit()
        assert len(history) == 2 and resumed.global_step == 3
    finally:
        resumed.shutdown()


@pytest.mark.e2e
def test_nan_policy_skip_refuses_the_step_and_stop_raises(ray_session, ocr_data_files, tiny_qwen_image_dir, tmp_path):
    for policy in ("skip", "stop"):
        out = tmp_path / policy
        trainer = FlowGRPOTrainer(
            _cfg(
                ocr_data_files,
                tiny_qwen_image_dir,
                out,
                **{"trainer.total_training_steps": 3, "trainer.nan_policy": policy},
            )
        ).init()
        real_rollout = trainer.rollout

        def poisoned(step, validate=False, real_rollout=real_rollout):
            output = real_rollout(step, validate)
            if step == 2:
                output.batch["old_log_probs"][5, 0] = float("nan")
            return output

        trainer.rollout = poisoned
        try:
            if policy == "stop":
                with pytest.raises(NonFiniteError, match=r"old_log_probs.*\[5\]"):
                    trainer.fit()
                assert find_latest_checkpoint(str(out)).endswith("global_step_1")
                continue
            lora_per_step = {}
            original_save = trainer.save

            def save(step, trainer=trainer, lora_per_step=lora_per_step, original_save=original_save):
                lora_per_step[step] = trainer.actor.lora_state_dict()
                return original_save(step)

            trainer.save = save
            history = trainer.fit()
            assert len(history) == 2 and trainer.global_step == 3
            assert all(torch.equal(lora_per_step[1][k], lora_per_step[2][k]) for k in lora_per_step[1])
            assert any(not torch.equal(lora_per_step[2][k], lora_per_step[3][k]) for k in lora_per_step[2])
        finally:
            trainer.shutdown()


@pytest.mark.e2e
def test_nan_policy_skip_stops_after_too_many_refused_steps_in_a_row(
    ray_session, ocr_data_files, tiny_qwen_image_dir, tmp_path
):
    trainer = FlowGRPOTrainer(
        _cfg(
            ocr_data_files,
            tiny_qwen_image_dir,
            tmp_path,
            **{"trainer.total_training_steps": 6, "trainer.nan_policy": "skip", "trainer.max_consecutive_skips": 2},
        )
    ).init()
    real_rollout = trainer.rollout

    def diverged(step, validate=False):  # every step from 2 on is non-finite: the run cannot learn any more
        output = real_rollout(step, validate)
        if step >= 2:
            output.batch["old_log_probs"][0, :] = float("nan")
        return output

    trainer.rollout = diverged
    try:
        with pytest.raises(NonFiniteError, match=r"2 consecutive steps refused .*trainer.max_consecutive_skips=2"):
            trainer.fit()
        assert trainer.global_step == 2  # step 1 trained, step 2 skipped, step 3 was the second refusal
    finally:
        trainer.shutdown()


@pytest.mark.e2e
def test_validation_over_several_calls_with_prompts_of_different_lengths(ray_session, tiny_qwen_image_dir, tmp_path):
    import sys as _sys

    _sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples", "flowgrpo_trainer", "data_process"))
    from qwenimage_ocr import write_ocr_parquet

    files = write_ocr_parquet(str(tmp_path / "data"), 8, 6, 3)
    trainer = FlowGRPOTrainer(
        _cfg(
            files,
            tiny_qwen_image_dir,
            tmp_path / "run",
            **{
                "data.val_batch_size": 2,
                "data.val_max_samples": 6,
                "trainer.test_freq": 1,
                "trainer.total_training_steps": 1,
            },
        )
    ).init()
    try:
        output = trainer.rollout(1, validate=True)  # 3 calls, each padding its prompts to its own longest one
        assert len(output) == 6 and output.batch["media"].shape[0] == 6
        metrics = trainer.validate(1)
        assert set(metrics) >= {"val/reward_mean", "val/reward/total/mean"}
    finally:
        trainer.shutdown()


def test_four_replicas_on_one_host_get_distinct_ports_even_when_one_is_taken(ray_session, tiny_qwen_image_dir):
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    base = blocker.getsockname()[1]
    cfg = make_config(
        {
            "actor_rollout_ref.model.path": tiny_qwen_image_dir,
            "actor_rollout_ref.model.lora_rank": 4,
            "trainer.n_gpus_per_node": 4,
            "actor_rollout_ref.rollout.server_port_base": base,
        }
    )
    loop = asyncio.new_event_loop()
    _, manager, _ = start_servers(loop, cfg)
    try:
        ports = [int(a.rsplit(":", 1)[1]) for a in manager.addresses]
        assert len(set(ports)) == 4 and base not in ports
        assert len(loop.run_until_complete(manager.stats())) == 4
    finally:
        loop.run_until_complete(manager.shutdown())
        loop.close()
        blocker.close()


def test_half_written_checkpoints_are_never_picked(tmp_path):
    params = [torch.nn.Parameter(torch.ones(2))]
    opt = torch.optim.AdamW(params)
    save_checkpoint(str(tmp_path), 1, {"w": torch.ones(2)}, opt)
    # a crash while writing step 2 leaves only a temporary directory: resume still picks step 1
    os.makedirs(tmp_path / ".global_step_2.abc123")
    (tmp_path / ".global_step_2.abc123" / "lora.safetensors").write_bytes(b"partial")
    assert find_latest_checkpoint(str(tmp_path)).endswith("global_step_1")
    # a marker naming an incomplete directory is an error, not a silent fresh start
    (tmp_path / LATEST).write_text("7")
    os.makedirs(tmp_path / "global_step_7")
    with pytest.raises(FileNotFoundError, match="incomplete"):
        find_latest_checkpoint(str(tmp_path))


def test_lora_targets_that_match_nothing_are_named(qwen_image_rl_pipe):
    import copy

    transformer = copy.deepcopy(qwen_image_rl_pipe.transformer)
    with pytest.raises(ValueError, match=r"target_modules \['to_qkv_typo'\] match no module"):
        add_lora_adapter(transformer, LoRASpec(4, 8.0, ("to_q", "to_qkv_typo")))


def _write(tmp_path, frame):
    path = tmp_path / "d.parquet"
    frame.to_parquet(path)
    return str(path)


def test_bad_data_files_are_named(tmp_path):
    with pytest.raises(ValueError, match="no column 'prompt'"):
        PromptDataset(_write(tmp_path, pd.DataFrame({"text": ["a"]})))
    with pytest.raises(ValueError, match="row 1: empty prompt"):
        PromptDataset(_write(tmp_path, pd.DataFrame({"prompt": ['a "b"', "  "]})))
    with pytest.raises(ValueError, match="row 0: raw_prompt is not valid UTF-8"):
        PromptDataset(_write(tmp_path, pd.DataFrame({"prompt": [b"\xff\xfe bad"]})))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        PromptDataset(str(tmp_path / "missing.parquet"))


@pytest.mark.e2e
def test_validation_writes_a_grid_image(ray_session, ocr_data_files, tiny_qwen_image_dir, tmp_path):
    trainer = FlowGRPOTrainer(
        _cfg(
            ocr_data_files,
            tiny_qwen_image_dir,
            tmp_path,
            **{"trainer.total_training_steps": 1, "trainer.test_freq": 1, "trainer.save_freq": -1},
        )
    ).init()
    try:
        trainer.fit()
    finally:
        trainer.shutdown()
    from PIL import Image

    grid = np.asarray(Image.open(tmp_path / "validation" / "step_1.png").convert("RGB")).astype(int)
    # val_max_samples=4 prompts x val n=1 -> one row of 4 cells, each 192 px wide (64 px image + caption space)
    # and 64 + 36 px high (image + two caption lines).
    assert grid.shape == (64 + 36, 4 * 192, 3)
    for cell in range(4):
        image = grid[:64, cell * 192 : cell * 192 + 64]
        caption = grid[64:, cell * 192 : (cell + 1) * 192]
        assert image.std() > 0, f"cell {cell}: no image pasted"
        assert (caption.sum(-1) < 200).any(), f"cell {cell}: no caption text"
        assert (grid[:64, cell * 192 + 64 : (cell + 1) * 192] == 255).all(), f"cell {cell}: blank margin expected"


# ------------------------------------------------------------------------------------------------ stopping on purpose
@pytest.fixture
def stub_trainer(tmp_path):
    """Makes trainers whose loop runs for real around a stand-in step (no Ray, no model): ``metrics_of_step(step)``;
    closes their event loops afterwards."""
    made = []

    def make(metrics_of_step, **extra):
        made.append(_stub_trainer(tmp_path, metrics_of_step, **extra))
        return made[-1]

    yield make
    for trainer in made:
        trainer.loop.close()


def _stub_trainer(tmp_path, metrics_of_step, **extra):
    from types import SimpleNamespace

    cfg = make_config(
        {
            "actor_rollout_ref.model.path": "tiny:qwen_image",
            "trainer.default_local_dir": str(tmp_path),
            "trainer.logger": ["console"],
            "trainer.test_freq": -1,
            **extra,
        }
    )
    trainer = FlowGRPOTrainer(cfg)
    trainer.tracker = SimpleNamespace(log=lambda data, step: None)
    trainer.val_data = None
    trainer.saved = []
    trainer.save = lambda step: trainer.saved.append(step) or str(tmp_path / f"global_step_{step}")
    trainer._train_step = metrics_of_step
    return trainer


def _step_metrics(rewards):
    """What a step reports of its advantages, from the rewards of 2 prompts x 4 images (FlowGRPO's advantages)."""
    from verl_omni.algorithms.flowgrpo import compute_group_advantages

    advantages = compute_group_advantages(torch.tensor(rewards, dtype=torch.float32), np.repeat(["a", "b"], 4))
    return {"advantages/abs_max": float(advantages.abs().max()), "reward/total/mean": float(np.mean(rewards))}


CONSTANT = [0.3] * 8  # the group mean of equal rewards may round: |A| ~1e-11, not 0, is still no signal
VARIED = [0.1, 0.2, 0.3, 0.4] * 2


def test_steps_without_learning_signal_warn_at_once_and_stop_the_run_after_the_limit(stub_trainer, capsys):
    from verl_omni.trainer.stopping import NO_SIGNAL_EXIT_CODE, NoLearningSignalError

    rewards = {1: CONSTANT, 2: VARIED, 3: CONSTANT, 4: CONSTANT, 5: CONSTANT, 6: VARIED}
    trainer = stub_trainer(
        lambda step: _step_metrics(rewards[step]),
        **{"trainer.total_training_steps": 6, "trainer.max_steps_without_signal": 3, "trainer.save_freq": -1},
    )
    with pytest.raises(NoLearningSignalError) as info:
        trainer.fit()
    assert trainer.global_step == 5 and info.value.exit_code == NO_SIGNAL_EXIT_CODE != 0
    assert re.search(
        r"no learning signal in 3 steps in a row .*max_steps_without_signal=3; last: step 5", str(info.value)
    )
    out = capsys.readouterr().out
    # warned on the first such step; a step with signal (2) resets the count
    assert "WARNING step 1 carried no learning signal (1 in a row)" in out and "stops after 2 more" in out
    assert "step 3 carried no learning signal (1 in a row)" in out and "step 4 carried no learning signal (2 in" in out
    assert "step 2 carried" not in out


def test_max_steps_without_signal_zero_only_warns(stub_trainer, capsys):
    trainer = stub_trainer(
        lambda step: _step_metrics(CONSTANT),
        **{"trainer.total_training_steps": 4, "trainer.max_steps_without_signal": 0, "trainer.save_freq": -1},
    )
    trainer.fit()
    assert trainer.global_step == 4 and "step 4 carried no learning signal (4 in a row)" in capsys.readouterr().out


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_stop_signal_finishes_the_step_saves_it_and_stops_with_128_plus_the_signal(
    stub_trainer, tmp_path, capfd, signum, code
):
    from verl_omni.trainer.stopping import TrainingInterrupted

    finished = []

    def step_that_gets_a_signal(step):
        if step == 2:
            os.kill(os.getpid(), signum)  # Python runs the handler in this (main) thread right away
        finished.append(step)
        return _step_metrics(VARIED)

    trainer = stub_trainer(step_that_gets_a_signal, **{"trainer.total_training_steps": 10, "trainer.save_freq": 5})
    trainer.graceful_stop.install()
    try:
        with pytest.raises(TrainingInterrupted) as info:
            trainer.fit()
    finally:
        trainer.graceful_stop.uninstall()
    assert finished == [1, 2] and trainer.global_step == 2 and trainer.saved == [2]  # saved though 2 % 5 != 0
    assert len(trainer.history) == 2  # the finished steps' metrics stay readable after the exception
    assert info.value.exit_code == code
    name = signal.Signals(signum).name
    assert str(info.value) == (
        f"stopped by {name} after step 2 of 10; latest checkpoint: {tmp_path / 'global_step_2'}. The same command "
        "resumes the run (trainer.resume_mode=auto)"
    )
    assert f"{name} received: finishing the current step" in capfd.readouterr().err
    assert signal.getsignal(signum) is not trainer.graceful_stop._on_signal  # uninstalled


def test_a_second_stop_signal_abandons_the_step_at_once(stub_trainer):
    from verl_omni.trainer.stopping import TrainingInterrupted

    def step_that_gets_two_signals(step):
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("the second signal did not interrupt the step")

    trainer = stub_trainer(step_that_gets_two_signals, **{"trainer.total_training_steps": 3})
    trainer.graceful_stop.install()
    try:
        with pytest.raises(TrainingInterrupted, match="stopped by SIGTERM; the step in progress was abandoned"):
            trainer.fit()
    finally:
        trainer.graceful_stop.uninstall()
    assert trainer.global_step == 0 and trainer.saved == [] and trainer.history == []


def test_resume_mode_disable_in_a_directory_with_checkpoints_is_refused_before_anything_starts(tmp_path):
    from verl_omni.trainer.checkpoint import ExistingRunError
    from verl_omni.trainer.run_lock import acquire_run_lock

    save_checkpoint(str(tmp_path), 4, {"w": torch.ones(2)}, torch.optim.AdamW([torch.nn.Parameter(torch.ones(2))]))
    cfg = make_config(
        {
            "actor_rollout_ref.model.path": "tiny:qwen_image",
            "trainer.default_local_dir": str(tmp_path),
            "trainer.resume_mode": "disable",
        }
    )
    with pytest.raises(ExistingRunError, match=f"trainer.default_local_dir={tmp_path} holds the checkpoints"):
        FlowGRPOTrainer(cfg).init()
    assert not (tmp_path / "tiny_models").exists()  # refused before building or starting anything
    assert find_latest_checkpoint(str(tmp_path)).endswith("global_step_4")
    acquire_run_lock(str(tmp_path)).release()  # the refusal released the run directory


# ------------------------------------------------------------------------------------------------ the trainer process
def _cli_overrides(data_files, model_dir, out_dir, **extra):
    """Hydra command-line overrides for a small run on the tiny model (brightness reward, console logger)."""
    train, test = data_files
    values = {
        "data.train_files": train,
        "data.val_files": test,
        "data.train_batch_size": 2,
        "actor_rollout_ref.model.path": model_dir,
        "actor_rollout_ref.model.lora_rank": 4,
        "actor_rollout_ref.model.lora_alpha": 8,
        "actor_rollout_ref.rollout.n": 4,
        "actor_rollout_ref.rollout.pipeline.num_inference_steps": 4,
        "actor_rollout_ref.rollout.algo.sde_window_size": 2,
        "reward.rewards": "[{name:brightness,weight:1.0}]",
        "trainer.logger": "[console]",
        "trainer.sample_images_per_step": 0,
        "trainer.default_local_dir": str(out_dir),
        "hydra.run.dir": str(out_dir / "hydra"),
        **extra,
    }
    return [f"{key}={value}" for key, value in values.items()]


def _start_trainer(argv, cwd):
    """The trainer in a process of its own; returns it once it printed its first step's metrics."""
    process = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=cwd,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    lines = []
    for line in process.stdout:
        lines.append(line)
        if re.match(r"step[: ]1 ", line):  # verl's console line (step:1 - ...) or the short one (step 1 | ...)
            return process
    process.wait()
    raise AssertionError(
        f"the trainer exited {process.returncode} before step 1:\n{''.join(lines)}{process.stderr.read()}"
    )


@pytest.mark.e2e
def test_sigterm_finishes_the_step_saves_releases_the_lock_and_exits_143(ocr_data_files, tiny_qwen_image_dir, tmp_path):
    import psutil

    out = tmp_path / "run"
    # Through the console script: it finds its config wherever it runs from.
    script = os.path.join(os.path.dirname(sys.executable), "verl-omni-flowgrpo")
    overrides = _cli_overrides(
        ocr_data_files, tiny_qwen_image_dir, out, **{"trainer.total_training_steps": 50, "trainer.save_freq": 100}
    )
    process = _start_trainer([script, *overrides], tmp_path)
    ray_processes = psutil.Process(process.pid).children(recursive=True)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 143, stderr[-3000:]
    stopped = re.search(r"\[verl_omni\] stopped by SIGTERM after step (\d+) of 50; latest checkpoint: (\S+)\. ", stderr)
    assert stopped, stderr[-3000:]
    step = int(stopped.group(1))
    assert stopped.group(2) == str(out / f"global_step_{step}") == find_latest_checkpoint(str(out))
    assert read_checkpoint(stopped.group(2)).step == step  # the finished step, saved and verified
    assert "SIGTERM received: finishing the current step" in stderr
    assert "Aborted" not in stderr and "core dumped" not in stderr
    assert (out / "run.lock").read_text() == ""  # released cleanly
    _, alive = psutil.wait_procs(ray_processes, timeout=30)
    assert not alive, [(p.pid, p.name()) for p in alive]


@pytest.mark.e2e
def test_a_sigkilled_trainer_leaves_no_ray_process_behind(ocr_data_files, tiny_qwen_image_dir, tmp_path):
    """Without the watchdog, Ray's dashboard and runtime-env agents outlive a SIGKILLed driver by ~60 s."""
    import psutil

    out = tmp_path / "run"
    overrides = _cli_overrides(ocr_data_files, tiny_qwen_image_dir, out, **{"trainer.total_training_steps": 50})
    process = _start_trainer([sys.executable, "-m", "verl_omni.trainer.main_flowgrpo", *overrides], tmp_path)
    ray_processes = psutil.Process(process.pid).children(recursive=True)
    names = {p.name() for p in ray_processes}
    assert {"raylet", "gcs_server", "ray::DashboardAgent", "ray::RuntimeEnvAgent"} <= names, names
    process.kill()
    process.wait()
    _, alive = psutil.wait_procs(ray_processes, timeout=30)
    assert not alive, [(p.pid, p.name()) for p in alive]
    process.stdout.close()
    process.stderr.close()


def test_resuming_with_another_lora_rank_is_refused_before_loading_into_the_actor(tmp_path):
    from types import SimpleNamespace

    from verl_omni.trainer.checkpoint import IncompatibleCheckpointError, lora_meta

    def lora(rank):
        return {"t.to_q.lora_A.weight": torch.zeros(rank, 16), "t.to_q.lora_B.weight": torch.zeros(16, rank)}

    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.ones(2))])
    save_checkpoint(str(tmp_path), 2, lora(4), optimizer, {"lora": lora_meta(4, 8.0, ["to_q"])})
    cfg = make_config(
        {
            "actor_rollout_ref.model.path": "tiny:qwen_image",
            "actor_rollout_ref.model.lora_rank": 8,
            "actor_rollout_ref.model.lora_alpha": 8.0,
            "actor_rollout_ref.model.target_modules": ["to_q"],
            "trainer.default_local_dir": str(tmp_path),
        }
    )
    trainer = FlowGRPOTrainer(cfg)
    trainer.loop.close()  # no engine to reach
    loaded = []
    trainer.actor = SimpleNamespace(lora_state_dict=lambda: lora(8), load_lora_state_dict=loaded.append)
    with pytest.raises(IncompatibleCheckpointError) as info:
        trainer._maybe_resume()
    assert f"checkpoint {tmp_path / 'global_step_2'}" in str(info.value)
    assert "lora_rank=8 (the checkpoint's: 4)" in str(info.value) and "t.to_q.lora_A.weight [4, 16] -> [8, 16]" in str(
        info.value
    )
    assert loaded == [] and trainer.global_step == 0
