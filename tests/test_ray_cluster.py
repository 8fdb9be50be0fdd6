"""The trainer on a Ray cluster started by hand (`ray start --head`, as on a multi-node job), on one host: it joins
through RAY_ADDRESS instead of starting its own Ray, and the hybrid engine's replicas and ranks run there."""

import os
import signal
import socket
import subprocess
import sys
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
    # --block keeps this cluster's processes children of one process group we own: stopping it stops only them
    # (`ray stop` would also stop the test session's own Ray).
    head = subprocess.Popen(
        [
            ray_bin,
            "start",
            "--head",
            f"--port={port}",
            "--num-cpus=4",
            "--num-gpus=0",
            "--disable-usage-stats",
            "--include-dashboard=false",
            f"--temp-dir={tmp_path / 'ray'}",
            "--block",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        address = f"127.0.0.1:{port}"
        deadline = time.time() + 120
        while time.time() < deadline:  # the head is up once its GCS port accepts connections
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(1)
        train, test = ocr_data_files
        env = {**os.environ, "RAY_ADDRESS": address}
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "verl_omni.trainer.main_flowgrpo",
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
                "trainer.logger=[console]",
                f"trainer.default_local_dir={tmp_path / 'run'}",
            ],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert out.returncode == 0, out.stderr[-3000:]
        assert "Started a local Ray instance" not in out.stderr  # it joined the cluster
        assert "Connected to Ray cluster" in out.stderr or address in out.stderr, out.stderr[-2000:]
        assert "step:1" in out.stdout and "actor/grad_norm" in out.stdout
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
