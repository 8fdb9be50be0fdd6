"""One trainer per run directory: a live owner refuses a second one; a SIGKILLed owner's lock is taken over."""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest

from verl_omni.trainer import run_lock
from verl_omni.trainer.run_lock import LOCK_FILE, RunDirectoryLocked, acquire_run_lock

# A stand-in trainer: takes the lock, says so, then sleeps until killed (or exits with the refusal). It loads
# run_lock.py by path: importing the verl_omni package imports verl (seconds per process on 2 busy cores).
HOLDER = textwrap.dedent("""
    import importlib.util, sys, time
    spec = importlib.util.spec_from_file_location("run_lock", sys.argv[3])
    run_lock = sys.modules["run_lock"] = importlib.util.module_from_spec(spec)  # @dataclass looks itself up
    spec.loader.exec_module(run_lock)
    lock = run_lock.acquire_run_lock(sys.argv[1])
    print("locked", flush=True)
    time.sleep(float(sys.argv[2]))
""")


def _start(directory, seconds=120):
    return subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(directory), str(seconds), run_lock.__file__],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_second_trainer_is_refused_then_takes_over_after_the_owner_is_killed(tmp_path):
    owner = _start(tmp_path)
    try:
        assert owner.stdout.readline().strip() == "locked", owner.stderr.read()

        second = _start(tmp_path, seconds=0)
        _, err = second.communicate(timeout=120)
        assert second.returncode != 0
        assert "RunDirectoryLocked" in err and f"trainer.default_local_dir={tmp_path} is in use" in err
        assert f"pid {owner.pid} on host {socket.gethostname()!r}" in err

        owner.send_signal(signal.SIGKILL)  # no cleanup runs: the record stays, the kernel drops the flock
        owner.wait(timeout=30)
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == owner.pid

        third = _start(tmp_path, seconds=0)
        out, err = third.communicate(timeout=120)
        assert third.returncode == 0 and out.strip() == "locked", err
        assert f"taking over the stale lock {tmp_path / LOCK_FILE} of pid {owner.pid}" in err and "it is gone" in err
    finally:
        owner.kill()
        owner.wait()


def test_in_process_second_acquire_is_refused_and_release_leaves_nothing_stale(tmp_path, capsys):
    with acquire_run_lock(str(tmp_path)):
        with pytest.raises(RunDirectoryLocked, match=f"in use by another trainer \\(pid {os.getpid()} "):
            acquire_run_lock(str(tmp_path))
    assert (tmp_path / LOCK_FILE).read_text() == ""  # released cleanly
    acquire_run_lock(str(tmp_path)).release()
    assert "taking over" not in capsys.readouterr().err


def test_a_lock_recorded_by_another_host_is_refused_with_how_to_clear_it(tmp_path):
    record = {"pid": 4242, "host": "gpu-node-7", "started": "2026-01-01T00:00:00", "command": "main_flowgrpo"}
    (tmp_path / LOCK_FILE).write_text(json.dumps(record))
    with pytest.raises(RunDirectoryLocked, match=r"another host \(pid 4242 on host 'gpu-node-7'.*delete .*run.lock"):
        acquire_run_lock(str(tmp_path))
    assert json.loads((tmp_path / LOCK_FILE).read_text()) == record  # untouched


def test_without_flock_the_recorded_pid_decides(tmp_path, monkeypatch, capsys):
    def no_flock(fd, op):
        raise OSError(run_lock.errno.ENOLCK, "No locks available")

    monkeypatch.setattr(run_lock.fcntl, "flock", no_flock)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": sleeper.pid, "host": socket.gethostname()}))
        with pytest.raises(RunDirectoryLocked, match=f"pid {sleeper.pid}"):
            acquire_run_lock(str(tmp_path))
    finally:
        sleeper.kill()
        sleeper.wait()
    lock = acquire_run_lock(str(tmp_path))  # the recorded pid is gone now
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()
    assert "it is gone" in capsys.readouterr().err


def test_the_trainer_refuses_a_run_directory_in_use_before_starting_anything(tmp_path):
    from helpers import make_config

    from verl_omni.trainer.ray_trainer import FlowGRPOTrainer

    cfg = make_config({"actor_rollout_ref.model.path": "tiny:qwen_image", "trainer.default_local_dir": str(tmp_path)})
    with acquire_run_lock(str(tmp_path)):
        with pytest.raises(RunDirectoryLocked, match=f"trainer.default_local_dir={tmp_path} is in use"):
            FlowGRPOTrainer(cfg).init()
    assert not (tmp_path / "tiny_models").exists()  # refused before building or starting anything
