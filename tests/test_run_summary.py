"""End-of-run summary: the reward curve PNG and the text that says what the run did and where its outputs are."""

import numpy as np
from PIL import Image

from verl_omni.trainer.run_summary import CURVE_FILE, _plot_with_pillow, write_run_summary


def _history(means, std=0.002):
    return [{"reward/total/mean": m, "reward/total/std": std} for m in means]


def test_summary_reports_start_end_change_and_the_newest_outputs(tmp_path):
    for name in ("samples/train_step_9", "samples/train_step_10", "global_step_9", "global_step_10", "tensorboard"):
        (tmp_path / name).mkdir(parents=True)
    (tmp_path / "validation").mkdir()
    for step in (9, 10):
        Image.new("RGB", (4, 4)).save(tmp_path / "validation" / f"step_{step}.png")
    means = [0.50, 0.52, 0.54, 0.56, 0.58, 0.60, 0.62]

    text = write_run_summary(str(tmp_path), _history(means), steps=list(range(4, 11)))

    assert "steps trained: 7 (global steps 4..10)" in text
    assert "reward/total/mean at step 4: 0.5000 (std over its images 0.0020)" in text
    assert "reward/total/mean at step 10: 0.6200; mean of the last 5 steps: 0.5800" in text
    assert "change (last-5 mean - step 4): +0.0800 = +40.0 x the step-4 std" in text
    for line in (
        f"reward curve:    {tmp_path / CURVE_FILE}",
        f"sample images:   {tmp_path / 'samples/train_step_10'}",
        f"validation grid: {tmp_path / 'validation/step_10.png'}",
        f"checkpoint:      {tmp_path / 'global_step_10'}",
        f"tensorboard:     {tmp_path / 'tensorboard'}",
    ):
        assert line in text, text


def test_reward_curve_png_draws_the_rising_line(tmp_path):
    path = str(tmp_path / "curve.png")
    _plot_with_pillow([1, 2, 3], [0.1, 0.2, 0.3], [0.01, 0.01, 0.01], path)
    pixels = np.asarray(Image.open(path).convert("RGB")).astype(int)
    assert pixels.shape == (360, 640, 3)
    line = np.argwhere(abs(pixels - (31, 119, 180)).sum(axis=2) < 10)  # the curve's colour
    assert len(line) > 100
    # Rising rewards: the leftmost curve pixels sit lower in the image (larger y) than the rightmost.
    left, right = line[line[:, 1] < line[:, 1].min() + 5], line[line[:, 1] > line[:, 1].max() - 5]
    assert left[:, 0].mean() > right[:, 0].mean() + 100


def test_a_run_that_trained_nothing_says_so_and_writes_no_curve(tmp_path):
    text = write_run_summary(str(tmp_path), [], [])
    assert "no step was trained in this run" in text
    assert not (tmp_path / CURVE_FILE).exists()
