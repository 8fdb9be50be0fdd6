"""The trainer on a Ray cluster started by hand (`ray start --head`, as on a multi-node job), on one host: it joins
through RAY_ADDRESS instead of starting its own Ray, and the hybrid engine's replicas and ranks run there."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.e2e
@pytest.mark.slow
def test_the_trainer_joins_a_ray_cluster_given_by_ray_address(ocr_data_files, tiny_qwen_image_dir, tmp_path):
    port = _free_port()
    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    head_log = tmp_path / "ray_head.log"
    # A short folder of its own: Ray's unix sockets live under it (at most 107 bytes a path).
    ray_dir = tempfile.mkdtemp(prefix="vo_ray_", dir="/tmp")
    # Loopback only (the cluster's services listen on 127.0.0.1). --block keeps this cluster's processes in one
    # process group we own: stopping it stops only them (`ray stop` would also stop the test session's own Ray).
    command = [
        ray_bin,
        "start",
        "--head",
        "--node-ip-address=127.0.0.1",
        f"--port={port}",
        "--num-cpus=4",
        "--num-gpus=0",
        "--disable-usage-stats",
        "--include-dashboard=false",
        f"--temp-dir={ray_dir}",
        "--block",
    ]
    # Ray 2.60 would also make the driver present a cluster token it keeps under its own temp dir: a loopback-only
    # test cluster goes without.
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    with open(head_log, "w") as log:
        head = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    try:
        deadline = time.time() + 120
        while "Ray runtime started" not in head_log.read_text():
            assert head.poll() is None and time.time() < deadline, head_log.read_text()[-2000:]
            time.sleep(1)
        train, test = ocr_data_files
        address = f"127.0.0.1:{port}"
        overrides = [
            f"data.train_files={train}",
            f"data.val_files={test}",
            f"actor_rollout_ref.model.path={tiny_qwen_image_dir}",
            "actor_rollout_ref.model.lora_rank=4",
            "actor_rollout_ref.rollout.n=4",
            "actor_rollout_ref.rollout.pipeline.num_inference_steps=4",
            "actor_rollout_ref.rollout.algo.sde_window_size=2",
            "reward.rewards=[{name: brightness, weight: 1.0}]",
            "trainer.n_gpus_per_node=2",
            "trainer.total_training_steps=1",
            "trainer.save_freq=-1",
            "trainer.logger=[console,file]",
            f"trainer.default_local_dir={tmp_path / 'run'}",
        ]
        metrics_file = tmp_path / "metrics.jsonl"  # every metric; the console prints the key figures
        out = subprocess.run(
            [sys.executable, "-m", "verl_omni.trainer.main_flowgrpo", *overrides],
            cwd=REPO,
            env={**env, "RAY_ADDRESS": address, "VERL_FILE_LOGGER_PATH": str(metrics_file)},
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert out.returncode == 0, out.stderr[-3000:]
        assert "Started a local Ray instance" not in out.stderr  # it joined the cluster
        assert "Connected to Ray cluster" in out.stderr, out.stderr[-2000:]
        assert "step 1 | reward " in out.stdout
        records = [json.loads(line) for line in metrics_file.read_text().splitlines()]
        assert records[0]["step"] == 1 and "timing/update_busy_s/rank1" in records[0]["data"]  # two ranks trained
    finally:
        if head.poll() is None:
            os.killpg(head.pid, signal.SIGTERM)
            try:
                head.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(head.pid, signal.SIGKILL)
        shutil.rmtree(ray_dir, ignore_errors=True)
