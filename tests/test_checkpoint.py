"""Checkpoints: atomic writes, no pickle on load, checksums verified on resume, damage named and survived."""

import errno
import io
import json
import os
import pickle
import random
import re

import numpy as np
import pytest
import torch

from verl_omni.trainer import checkpoint
from verl_omni.trainer.checkpoint import (
    LATEST,
    DamagedCheckpointError,
    ExistingRunError,
    IncompatibleCheckpointError,
    check_lora_fits,
    find_latest_checkpoint,
    load_checkpoint,
    load_resumable_checkpoint,
    lora_meta,
    prepare_run_directory,
    read_checkpoint,
    resume_past_total_message,
    save_checkpoint,
)


def _trained_optimizer(seed: int = 0):
    torch.manual_seed(seed)
    param = torch.nn.Parameter(torch.randn(3, 2))
    optimizer = torch.optim.AdamW([param], lr=0.1)
    for _ in range(2):
        optimizer.zero_grad()
        (param**2).sum().backward()
        optimizer.step()
    return param, optimizer


def _two_checkpoints(root):
    """Steps 1 and 2 with different LoRA tensors; returns (lora of step 1, lora of step 2)."""
    _, optimizer = _trained_optimizer()
    lora1, lora2 = {"a": torch.full((2, 2), 1.0)}, {"a": torch.full((2, 2), 2.0)}
    save_checkpoint(str(root), 1, lora1, optimizer)
    save_checkpoint(str(root), 2, lora2, optimizer)
    return lora1, lora2


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


def test_round_trip_restores_optimizer_and_every_rng_without_pickle(tmp_path):
    _, optimizer = _trained_optimizer()
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    path = save_checkpoint(str(tmp_path), 5, {"a": torch.arange(4.0)}, optimizer, {"note": "x"})
    expected_draws = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    saved_state = optimizer.state_dict()

    # Everything on disk is readable without unpickling arbitrary objects.
    torch.load(os.path.join(path, "optim.pt"), weights_only=True)
    rng = json.load(open(os.path.join(path, "rng.json")))
    assert len(rng["numpy"]["keys"]) == 624 and len(rng["python"][1]) == 625
    meta = json.load(open(os.path.join(path, "meta.json")))
    assert meta["global_step"] == 5 and meta["note"] == "x"
    assert sorted(meta["files"]) == ["lora.safetensors", "optim.pt", "rng.json"]
    assert all(meta["files"][name] == checkpoint._sha256(os.path.join(path, name)) for name in meta["files"])

    _, fresh = _trained_optimizer(seed=9)  # different state, overwritten by the load
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    lora, meta = load_checkpoint(path, fresh)
    assert torch.equal(lora["a"], torch.arange(4.0)) and meta["global_step"] == 5
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected_draws
    restored = fresh.state_dict()
    for key, state in saved_state["state"].items():
        for name, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(restored["state"][key][name])), name


def _zero_bytes(path):
    size = os.path.getsize(path)
    with open(path, "r+b") as f:  # same size, the middle zeroed: only the checksum can tell
        f.seek(size // 3)
        f.write(b"\0" * (size // 3))


def _truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


@pytest.mark.parametrize(
    "damage, file, reason",
    [
        (_zero_bytes, "lora.safetensors", "sha256 .* does not match"),
        (_truncate, "optim.pt", "sha256 .* does not match"),
        (os.remove, "rng.json", "missing"),
        (os.remove, "meta.json", "missing"),
        (_truncate, "meta.json", "not valid JSON"),
    ],
)
def test_damaged_latest_checkpoint_is_named_and_the_previous_one_resumed(tmp_path, capsys, damage, file, reason):
    lora1, _ = _two_checkpoints(tmp_path)
    damage(str(tmp_path / "global_step_2" / file))

    resumed = load_resumable_checkpoint(str(tmp_path), on_damage="fallback")

    assert resumed.step == 1 and torch.equal(resumed.lora["a"], lora1["a"])
    out = capsys.readouterr().out
    assert f"global_step_2 is damaged: {file}:" in out
    assert re.search(reason, out), out
    assert "resuming from" in out and "global_step_1" in out and "skipped damaged global_step_2" in out


def test_damage_with_resume_on_damage_stop_raises_naming_file_and_setting(tmp_path):
    _two_checkpoints(tmp_path)
    _zero_bytes(str(tmp_path / "global_step_2" / "lora.safetensors"))
    with pytest.raises(
        DamagedCheckpointError,
        match=r"global_step_2 is damaged: lora.safetensors: sha256.*"
        r"trainer.resume_on_damage=stop",
    ) as info:
        load_resumable_checkpoint(str(tmp_path), on_damage="stop")
    assert info.value.file == "lora.safetensors"


class _Payload:
    """A pickle that creates ``marker`` when unpickled by a full unpickler (what a planted optim.pt would do)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.mark.parametrize("checksum_forged", [False, True])
def test_a_planted_pickle_in_optim_pt_is_never_executed(tmp_path, capsys, checksum_forged):
    lora1, _ = _two_checkpoints(tmp_path)
    marker = tmp_path / "pwned"
    optim = tmp_path / "global_step_2" / "optim.pt"
    torch.save({"optimizer": _Payload(marker), "torch_rng": torch.get_rng_state()}, str(optim))
    if checksum_forged:  # the attacker rewrote meta.json too: the weights-only reader is the last line
        meta_path = tmp_path / "global_step_2" / "meta.json"
        meta = json.loads(meta_path.read_text())
        meta["files"]["optim.pt"] = checkpoint._sha256(str(optim))
        meta_path.write_text(json.dumps(meta))

    resumed = load_resumable_checkpoint(str(tmp_path))

    assert not marker.exists()
    assert resumed.step == 1 and torch.equal(resumed.lora["a"], lora1["a"])
    expected = "refused by torch.load\\(weights_only=True\\)" if checksum_forged else "sha256 .* does not match"
    assert re.search(f"global_step_2 is damaged: optim.pt: {expected}", capsys.readouterr().out)
    # Control: the payload is live, a full unpickler would have run it.
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(_Payload(control))).close()
    assert control.exists()


def test_marker_naming_a_missing_directory_falls_back(tmp_path, capsys):
    lora1, _ = _two_checkpoints(tmp_path)
    (tmp_path / LATEST).write_text("7")
    assert load_resumable_checkpoint(str(tmp_path)).step == 2
    assert "global_step_7 is damaged: global_step_7: directory missing" in capsys.readouterr().out


def test_unreadable_marker_uses_the_directories_on_disk(tmp_path, capsys):
    _two_checkpoints(tmp_path)
    (tmp_path / LATEST).write_bytes(b"\0\0\0")
    assert load_resumable_checkpoint(str(tmp_path)).step == 2
    assert "missing or unreadable" in capsys.readouterr().out


def test_every_checkpoint_damaged_refuses_to_start_over(tmp_path):
    _two_checkpoints(tmp_path)
    for step in (1, 2):
        os.remove(tmp_path / f"global_step_{step}" / "optim.pt")
    with pytest.raises(RuntimeError, match="every checkpoint under .* is damaged.*trainer.resume_mode=overwrite"):
        load_resumable_checkpoint(str(tmp_path))


def test_no_checkpoint_is_a_fresh_start_and_bad_setting_is_named(tmp_path):
    assert load_resumable_checkpoint(str(tmp_path / "nothing_here")) is None
    with pytest.raises(ValueError, match=r"trainer.resume_on_damage='maybe' is not one of \['fallback', 'stop'\]"):
        load_resumable_checkpoint(str(tmp_path), on_damage="maybe")


def test_a_checkpoint_without_checksums_is_not_trusted(tmp_path):
    _, optimizer = _trained_optimizer()
    path = save_checkpoint(str(tmp_path), 1, {"a": torch.ones(1)}, optimizer)
    meta = json.load(open(os.path.join(path, "meta.json")))
    del meta["files"], meta["format_version"]
    json.dump(meta, open(os.path.join(path, "meta.json"), "w"))
    with pytest.raises(DamagedCheckpointError, match="meta.json: format_version=None, expected 2"):
        read_checkpoint(path)


def test_resume_past_total_names_both_numbers_and_suggests_nothing_destructive():
    assert resume_past_total_message(2, 3) is None
    message = resume_past_total_message(5, 3)
    assert "global step 5" in message and "trainer.total_training_steps=3" in message
    assert "global step 3" in resume_past_total_message(3, 3)
    assert "resume_mode" not in message and "another directory" in message


def test_a_new_run_in_a_directory_with_checkpoints_is_refused_and_leaves_them_untouched(tmp_path):
    lora1, lora2 = _two_checkpoints(tmp_path)
    before = {name: (tmp_path / name).stat().st_mtime_ns for name in ("global_step_1", "global_step_2", LATEST)}
    with pytest.raises(
        ExistingRunError,
        match=rf"trainer.resume_mode=disable .*trainer.default_local_dir={tmp_path} holds the checkpoints of another "
        r"run \(steps 1, 2, latest marker: 2\).*another directory.*trainer.resume_mode=overwrite",
    ):
        prepare_run_directory(str(tmp_path), "disable")
    assert {name: (tmp_path / name).stat().st_mtime_ns for name in before} == before
    resumed = load_resumable_checkpoint(str(tmp_path))
    assert resumed.step == 2 and torch.equal(resumed.lora["a"], lora2["a"])
    prepare_run_directory(str(tmp_path), "auto")  # continuing the run is what auto does: nothing changes
    assert sorted(os.listdir(tmp_path)) == ["global_step_1", "global_step_2", LATEST]


def test_a_marker_alone_counts_as_another_run_and_an_empty_directory_is_free(tmp_path):
    prepare_run_directory(str(tmp_path / "new"), "disable")  # nothing there (not even the directory)
    (tmp_path / "samples").mkdir()
    prepare_run_directory(str(tmp_path), "disable")  # outputs other than checkpoints: nothing to overwrite
    (tmp_path / LATEST).write_text("4")
    with pytest.raises(ExistingRunError, match=r"no step directory, latest marker: 4"):
        prepare_run_directory(str(tmp_path), "disable")


def test_resume_mode_overwrite_deletes_the_previous_run_and_says_so(tmp_path, capsys):
    _two_checkpoints(tmp_path)
    os.makedirs(tmp_path / ".global_step_3.abc")  # a save cut short
    (tmp_path / "samples").mkdir()
    prepare_run_directory(str(tmp_path), "overwrite")
    assert sorted(os.listdir(tmp_path)) == ["samples"]
    assert load_resumable_checkpoint(str(tmp_path)) is None
    assert f"trainer.resume_mode=overwrite: deleted the checkpoints of the previous run in {tmp_path}" in (
        capsys.readouterr().out
    )
    with pytest.raises(ValueError, match=r"trainer.resume_mode='maybe' is not one of"):
        prepare_run_directory(str(tmp_path), "maybe")


class _FullDisk(io.BufferedWriter):
    """A file that takes ``budget`` bytes in all (shared by every file opened), then fails as a full disk does."""

    def __init__(self, raw, budget):
        super().__init__(raw)
        self.budget = budget

    def write(self, data):
        if len(data) > self.budget[0]:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.budget[0] -= len(data)
        return super().write(data)


def _disk_with(budget, real_open=open):
    def fake_open(path, mode="r", *args, **kwargs):
        if "w" not in mode:
            return real_open(path, mode, *args, **kwargs)
        f = _FullDisk(io.FileIO(path, "w"), budget)
        return f if "b" in mode else io.TextIOWrapper(f, write_through=True)

    return fake_open


def _write_sizes(tmp_path):
    """Bytes each file of a checkpoint of _two_checkpoints' tensors takes, in the order they are written."""
    path = tmp_path / "sizes"
    _two_checkpoints(path)
    return [os.path.getsize(path / "global_step_2" / n) for n in ("lora.safetensors", "optim.pt", "rng.json")]


@pytest.mark.parametrize("fails_in", ["lora.safetensors", "optim.pt", "rng.json", "meta.json"])
def test_a_full_disk_names_no_space_and_the_path_and_keeps_the_earlier_checkpoints(tmp_path, monkeypatch, fails_in):
    sizes = _write_sizes(tmp_path)
    budget = {"lora.safetensors": 0, "optim.pt": sizes[0] + 100, "rng.json": sum(sizes[:2]) + 10}
    budget["meta.json"] = sum(sizes) + 10
    root = tmp_path / "run"
    lora1, lora2 = _two_checkpoints(root)
    _, optimizer = _trained_optimizer()
    monkeypatch.setattr(checkpoint, "open", _disk_with([budget[fails_in]]), raising=False)
    with pytest.raises(OSError) as info:
        save_checkpoint(str(root), 3, {"a": torch.full((2, 2), 3.0)}, optimizer)
    monkeypatch.undo()
    assert info.value.errno == errno.ENOSPC
    message = str(info.value)
    assert f"no space left on device while saving checkpoint {root / 'global_step_3'}" in message
    assert "the latest marker still names step 2" in message and "trainer.default_local_dir" in message
    assert sorted(os.listdir(root)) == ["global_step_1", "global_step_2", LATEST]  # no temp dir left
    assert torch.equal(read_checkpoint(str(root / "global_step_1")).lora["a"], lora1["a"])
    resumed = load_resumable_checkpoint(str(root))
    assert resumed.step == 2 and torch.equal(resumed.lora["a"], lora2["a"])


def test_other_write_errors_are_not_called_a_full_disk(tmp_path, monkeypatch):
    _, optimizer = _trained_optimizer()

    def read_only(path, mode="r", *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", path)

    monkeypatch.setattr(checkpoint, "open", read_only, raising=False)
    with pytest.raises(PermissionError) as info:
        save_checkpoint(str(tmp_path), 1, {"a": torch.ones(1)}, optimizer)
    assert "no space" not in str(info.value) and "lora.safetensors" in str(info.value)


def _lora(rank, modules=("to_q", "to_k")):
    return {
        f"block.{m}.lora_{ab}.weight": torch.zeros(shape)
        for m in modules
        for ab, shape in (("A", (rank, 8)), ("B", (8, rank)))
    }


def _saved_with(tmp_path, rank, modules=("to_q", "to_k"), alpha=8.0, record_meta=True):
    _, optimizer = _trained_optimizer()
    meta = {"lora": lora_meta(rank, alpha, modules)} if record_meta else {}
    return read_checkpoint(save_checkpoint(str(tmp_path), 1, _lora(rank, modules), optimizer, meta))


def _shapes(lora):
    return {name: tensor.shape for name, tensor in lora.items()}


def test_a_changed_lora_rank_is_named_with_the_checkpoint_and_the_shapes(tmp_path):
    saved = _saved_with(tmp_path, rank=4)
    check_lora_fits(saved, lora_meta(4, 8.0, ("to_q", "to_k")), _shapes(_lora(4)))  # the same adapter: fits
    with pytest.raises(IncompatibleCheckpointError) as info:
        check_lora_fits(saved, lora_meta(8, 8.0, ("to_q", "to_k")), _shapes(_lora(8)))
    message = str(info.value)
    assert f"checkpoint {tmp_path / 'global_step_1'} holds a LoRA adapter this run cannot resume" in message
    assert "actor_rollout_ref.model.lora_rank=8 (the checkpoint's: 4)" in message
    assert (
        "tensors shapes changed: block.to_k.lora_A.weight [4, 8] -> [8, 8], block.to_k.lora_B.weight [8, 4] -> [8, 8]"
        in message
    )
    with pytest.raises(IncompatibleCheckpointError, match=r"lora_alpha=16.0 \(the checkpoint's: 8.0\)"):
        check_lora_fits(saved, lora_meta(4, 16.0, ("to_q", "to_k")), _shapes(_lora(4)))


def test_changed_target_modules_name_the_tensors_even_without_recorded_meta(tmp_path):
    saved = _saved_with(tmp_path, rank=4, record_meta=False)  # a checkpoint written before the meta had "lora"
    with pytest.raises(IncompatibleCheckpointError) as info:
        check_lora_fits(saved, lora_meta(4, 8.0, ("to_q", "to_v")), _shapes(_lora(4, ("to_q", "to_v"))))
    message = str(info.value)
    assert "model.target_modules" not in message  # nothing recorded to compare: the tensors say it
    assert "not in the checkpoint: block.to_v.lora_A.weight, block.to_v.lora_B.weight" in message
    assert "in the checkpoint only: block.to_k.lora_A.weight, block.to_k.lora_B.weight" in message
    recorded = _saved_with(tmp_path / "meta", rank=4)
    with pytest.raises(IncompatibleCheckpointError, match=r"target_modules=\['to_q', 'to_v'\] \(the checkpoint's"):
        check_lora_fits(recorded, lora_meta(4, 8.0, ("to_q", "to_v")), _shapes(_lora(4, ("to_q", "to_v"))))


def test_the_policy_ema_is_saved_beside_the_adapter_verified_and_read_back_bit_for_bit(tmp_path):
    _, optimizer = _trained_optimizer()
    torch.manual_seed(3)
    lora = {"a.lora_A.weight": torch.randn(4, 8), "a.lora_B.weight": torch.randn(8, 4)}
    ema = {"lora": {k: torch.randn(v.shape) for k, v in lora.items()}, "optimizer_steps": 17}
    path = save_checkpoint(str(tmp_path), 1, lora, optimizer, ema=ema)
    with open(os.path.join(path, "meta.json")) as f:
        assert set(json.load(f)["files"]) == {"lora.safetensors", "optim.pt", "rng.json", "ema.safetensors"}
    loaded = read_checkpoint(path)
    assert loaded.ema["optimizer_steps"] == 17 and set(loaded.ema["lora"]) == set(lora)
    assert all(torch.equal(loaded.ema["lora"][k], ema["lora"][k]) for k in lora)
    assert all(torch.equal(loaded.lora[k], lora[k]) for k in lora)

    without = save_checkpoint(str(tmp_path), 2, lora, optimizer)
    assert not os.path.exists(os.path.join(without, "ema.safetensors")) and read_checkpoint(without).ema is None

    ema_file = os.path.join(path, "ema.safetensors")
    data = bytearray(open(ema_file, "rb").read())
    data[-8:] = bytes(8)
    with open(ema_file, "wb") as f:
        f.write(bytes(data))
    with pytest.raises(DamagedCheckpointError, match=r"global_step_1 is damaged: ema.safetensors: sha256"):
        read_checkpoint(path)
    os.remove(ema_file)
    with pytest.raises(DamagedCheckpointError, match=r"ema.safetensors: missing"):
        read_checkpoint(path)
