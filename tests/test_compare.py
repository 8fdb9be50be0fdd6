"""Comparing runs (verl_omni/compare): curves read from tensorboard events and from verl's file logger, drawn in
one PNG, with a table of final and best values."""

import json

import numpy as np
import pytest
from PIL import Image

from verl_omni.compare import read_run
from verl_omni.compare.__main__ import main


def _tensorboard_run(folder, rewards, val):
    from torch.utils.tensorboard import SummaryWriter  # verl's tensorboard backend writes with this

    writer = SummaryWriter(str(folder / "tensorboard"))
    for step, value in enumerate(rewards, start=1):
        writer.add_scalar("reward/total/mean", value, step)
    for step, value in val.items():
        writer.add_scalar("val/reward_mean", value, step)
    writer.close()
    return folder


def _jsonl_run(path, rewards, val):
    lines = []
    for step, value in enumerate(rewards, start=1):
        data = {"reward/total/mean": value, "actor/grad_norm": 0.1}
        if step in val:
            data["val/reward_mean"] = val[step]
        lines.append(json.dumps({"step": step, "data": data}))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_two_runs_in_one_png_with_a_table_of_final_and_best(tmp_path, capsys):
    a = _tensorboard_run(tmp_path / "run_a", [0.1, 0.3, 0.25, 0.4], {2: 0.2, 4: 0.35})
    b = _jsonl_run(tmp_path / "run_b.jsonl", [0.2, 0.5, 0.45], {3: 0.6})
    out = tmp_path / "plots" / "compare.png"
    assert main([str(a), str(b), "--out", str(out), "--name", "flowgrpo", "--name", "nft"]) == 0
    image = np.asarray(Image.open(out).convert("RGB"))
    assert image.shape[:2] == (420, 1200)  # two panels: the training reward and the validation reward
    assert (image < 128).any() and (image > 128).any()
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["run", "metric", "final", "at", "step", "best", "at", "step"]
    rows = [line.split() for line in table[2:6]]
    assert rows[0] == ["flowgrpo", "reward/total/mean", "0.4000", "4", "0.4000", "4"]
    assert rows[1] == ["flowgrpo", "val/reward_mean", "0.3500", "4", "0.3500", "4"]
    assert rows[2] == ["nft", "reward/total/mean", "0.4500", "3", "0.5000", "2"]
    assert rows[3] == ["nft", "val/reward_mean", "0.6000", "3", "0.6000", "3"]


def test_a_run_without_metrics_or_the_metric_asked_for_is_named(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no tensorboard events"):
        read_run(str(tmp_path / "empty"))
    run = _jsonl_run(tmp_path / "r.jsonl", [0.1], {})
    with pytest.raises(ValueError, match="none of the runs has any of the metrics.*actor/grad_norm"):
        main([str(run), "--out", str(tmp_path / "x.png"), "--metric", "val/nothing"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"step": 1}\n')
    with pytest.raises(ValueError, match="line 1"):
        read_run(str(bad))
