"""The console's line per step: the key figures of a real actor update and the trainer's step figures, short,
through verl's own ``Tracking`` with the ``console`` backend; the other backends keep every metric."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from helpers import model_config, num_rows, records_data_proto, rollout_config
from verl.utils.logger import LocalLogger
from verl.utils.tracking import Tracking

from verl_omni.config.actor import ActorConfig, OptimConfig
from verl_omni.config.sampling import DiffusionSamplingParams
from verl_omni.trainer.console import ConsoleStepLogger, format_step_line, use_short_console_line
from verl_omni.workers.actor import DiffusionLoRAActor

MAX_LINE = 250


@pytest.fixture(scope="module")
def step_metrics(qwen_image_rl_pipe, tiny_qwen_image_dir):
    """A step's metrics as the trainer logs them: a real actor update's, plus the trainer's own keys (per-replica
    engine seconds, reward terms, timings) in the numbers a 4-replica run has."""
    records = []
    for i, prompt in enumerate(["a red cat", "a blue house"]):
        params = DiffusionSamplingParams(num_inference_steps=4, height=32, width=32, sde_window_size=2, window_start=i)
        records.append(qwen_image_rl_pipe.rl_generate(prompt, [3 + i, 4 + i], params))
    uid = np.array([f"g{i // 2}" for i in range(num_rows(records))], dtype=object)
    raw = np.array(["p"] * num_rows(records), dtype=object)
    data = records_data_proto(records, {"raw_prompt": raw, "uid": uid})
    actor = DiffusionLoRAActor(
        model_config(tiny_qwen_image_dir), ActorConfig(optim=OptimConfig(lr=1e-2)), rollout_config(), lora_seed=5
    )
    metrics = dict(actor.update(data, torch.tensor([1.0, -1.0, 0.5, -0.5])))
    metrics.update({"reward/total/mean": 0.41237, "reward/total/std": 0.1, "reward/ocr/mean": 0.4})
    metrics.update({"advantages/mean": 0.0, "advantages/abs_max": 1.7321})
    metrics.update({f"timing/{p}_s": s for p, s in [("rollout", 19.11), ("reward", 0.2), ("update", 9.59)]})
    metrics.update({"timing/sync_s": 0.01, "timing/swap_s": 0.0, "timing/step_s": 28.74, "perf/img_per_s": 1.1134})
    for r in range(4):
        metrics[f"timing/rollout_busy_s/replica{r}"] = 18.9 + r / 10
        metrics.update({f"actor/gc_s/rank{r}": 0.0, f"actor/cuda_mallocs/rank{r}": 3.0})
    return metrics


def test_the_step_line_is_short_and_holds_the_key_figures(step_metrics, capsys):
    tracker = Tracking("p", "e", ["console"], config={})
    use_short_console_line(tracker)
    tracker.log(data=step_metrics, step=3)
    line = capsys.readouterr().out.strip()
    assert "\n" not in line and len(line) <= MAX_LINE, line
    m = step_metrics
    assert line.startswith("step 3 | reward 0.4124 | adv 0.000 | adv_absmax 1.732 | ")
    for label, key, spec in [("loss", "actor/loss", ".4g"), ("grad_norm", "actor/grad_norm", ".4g")]:
        assert re.search(rf"\| {label} (\S+) \|", line).group(1) == format(m[key], spec)
    assert f"| clip_frac {m['actor/clip_frac']:.3f} |" in line
    assert f"ratio [{m['actor/ratio_min']:.3f}, {m['actor/ratio_max']:.3f}]" in line
    assert "| s rollout 19.1 update 9.6 step 28.7 | img/s 1.11" in line
    # verl's own console backend prints every metric: what the selection replaces
    LocalLogger(print_to_console=True).log(step_metrics, step=3)
    assert len(capsys.readouterr().out) > 4 * len(line)


def test_validation_and_unknown_records_get_a_line_of_their_own(capsys):
    logger = ConsoleStepLogger()
    logger.log({"val/reward_mean": 0.5, "val/ocr/mean": 0.5}, step=4)
    logger.log({"something/else": 1.0, "another": "x"}, step=5)
    assert capsys.readouterr().out.splitlines() == ["step 4 | val reward 0.5000", "step 5 | 2 metrics"]
    odd = {"actor/loss": "n/a", "actor/grad_norm": float("nan")}
    assert format_step_line(odd, 1) == "step 1 | loss ? | grad_norm nan"


def test_only_the_console_backend_is_replaced(tmp_path, monkeypatch):
    monkeypatch.setenv("TENSORBOARD_DIR", str(tmp_path))
    tracker = Tracking("p", "e", ["console", "tensorboard"], config={})
    tensorboard = tracker.logger["tensorboard"]
    use_short_console_line(tracker)
    assert isinstance(tracker.logger["console"], ConsoleStepLogger) and tracker.logger["tensorboard"] is tensorboard
    quiet = Tracking("p", "e", ["tensorboard"], config={})
    use_short_console_line(quiet)
    assert "console" not in quiet.logger
    for t in (tracker, quiet):
        t.finish()
