"""save_checkpoint leaves no temporary directory behind when writing fails."""

import os

import pytest
import torch

from verl_omni.trainer import checkpoint
from verl_omni.trainer.checkpoint import find_latest_checkpoint, save_checkpoint


def test_a_failed_save_removes_its_temp_dir_and_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    param = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.SGD([param], lr=0.1)
    lora = {"a": torch.ones(2)}
    first = save_checkpoint(str(tmp_path), 1, lora, optimizer)

    def failing_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(str(tmp_path), 2, lora, optimizer)
    assert sorted(os.listdir(tmp_path)) == ["global_step_1", checkpoint.LATEST]
    assert find_latest_checkpoint(str(tmp_path)) == first
