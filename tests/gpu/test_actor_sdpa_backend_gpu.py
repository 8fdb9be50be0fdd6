"""The actor's attention kernels where vllm was imported (the vllm-omni worker, in which the hybrid engine's actor
trains): vllm 0.24 switches cuDNN's SDPA off for the whole process at import; the update still runs cuDNN's
attention forward and backward, as it does in the diffusers engine's process (the GPU fixture's 2-layer Qwen-Image
at the real width, bf16, eager)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from gpu_helpers import requires_cuda
from test_activation_memory_gpu import bf16_actor, fixture_rollout

pytestmark = [pytest.mark.gpu, requires_cuda]

CUDNN_FORWARD = "aten::_scaled_dot_product_cudnn_attention"
CUDNN_BACKWARD = "aten::_scaled_dot_product_cudnn_attention_backward"


@pytest.fixture
def cudnn_sdpa_switched_off():
    was = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(False)  # what vllm/platforms/cuda.py does at import
    yield
    torch.backends.cuda.enable_cudnn_sdp(was)


def _cudnn_sdpa_enabled_in_a_fresh_process(imports: str) -> bool:
    code = f"import torch{imports}; print(torch.backends.cuda.cudnn_sdp_enabled())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    return out.stdout.strip().splitlines()[-1] == "True"


def test_importing_vllm_switches_cudnn_sdpa_off():
    """The cause, kept visible: when a vllm release stops doing this, update_sdpa_backends can go. In fresh
    processes: this one may have imported vllm already (``import vllm`` itself loads ``vllm.platforms.cuda``)."""
    pytest.importorskip("vllm")
    assert _cudnn_sdpa_enabled_in_a_fresh_process("")
    assert not _cudnn_sdpa_enabled_in_a_fresh_process(", vllm")


def test_the_update_runs_cudnn_attention_where_the_process_switched_it_off(gpu_qwen_image_dir, cudnn_sdpa_switched_off):
    data = fixture_rollout(gpu_qwen_image_dir)
    actor = bf16_actor(gpu_qwen_image_dir, enable_gradient_checkpointing=False)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        actor.update(data, torch.tensor([1.0, -1.0, 0.5, -0.5]))
    ops = {event.key for event in prof.key_averages()}
    assert CUDNN_FORWARD in ops and CUDNN_BACKWARD in ops, sorted(op for op in ops if "attention" in op)
    assert not torch.backends.cuda.cudnn_sdp_enabled()  # the process's setting is back
