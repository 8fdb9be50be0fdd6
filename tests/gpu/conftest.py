"""GPU-only fixtures: skip cleanly without CUDA / vllm-omni; one vllm-omni engine per module on one event loop.

The ``gpu`` marker is registered in pytest.ini; ``pytest_configure`` below registers it too so this folder also
works when run from another rootdir.
"""

from __future__ import annotations

import asyncio

import pytest
from gpu_helpers import HAS_CUDA


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (and vllm-omni for engine tests); run on the device")


def pytest_runtest_logreport(report):
    """A failure's traceback printed when it happens: a device call's time limit can stop pytest before its
    closing summary, which is where pytest prints them."""
    if report.failed:
        print(f"\n[failure] {report.nodeid} ({report.when}):\n{report.longreprtext}\n", flush=True)


@pytest.fixture(scope="module")
def event_loop_gpu():
    """One loop for everything an AsyncOmni client does (its output task lives on the loop of the first call)."""
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture(scope="session")
def gpu_qwen_image_dir(tmp_path_factory):
    """A small-but-wide random Qwen-Image saved in bf16: 2 layers of the real 3072 width (24 heads x 128),
    tiny text encoder and VAE. ~0.7B transformer params (~1.4 GB), so sleep/wake moves a visible amount."""
    if not HAS_CUDA:
        pytest.skip("needs a CUDA GPU")
    import torch

    from verl_omni.pipelines.qwen_image.standin import build_tiny_qwen_image

    path = tmp_path_factory.mktemp("qwen_image_gpu")
    return build_tiny_qwen_image(str(path), seed=0, dtype=torch.bfloat16, num_layers=2, num_attention_heads=24)


@pytest.fixture(scope="session")
def gpu_flux_dir(tmp_path_factory):
    """The tiny random FLUX (head dim 128, which FA3 takes) saved in bf16, as vllm-omni loads it."""
    if not HAS_CUDA:
        pytest.skip("needs a CUDA GPU")
    import torch

    from verl_omni.pipelines.flux.standin import build_tiny_flux

    return build_tiny_flux(str(tmp_path_factory.mktemp("flux_gpu")), seed=0, dtype=torch.bfloat16)


@pytest.fixture(scope="session")
def gpu_sd3_dir(tmp_path_factory):
    """The tiny random SD3.5 at SD3.5's head dim 64 (which FA3 takes), saved in bf16."""
    if not HAS_CUDA:
        pytest.skip("needs a CUDA GPU")
    import torch

    from verl_omni.pipelines.sd3.standin import build_tiny_sd3

    path = str(tmp_path_factory.mktemp("sd3_gpu"))
    return build_tiny_sd3(path, seed=0, dtype=torch.bfloat16, attention_head_dim=64)


@pytest.fixture(scope="session")
def gpu_wan_dir(tmp_path_factory):
    """The tiny random Wan2.1 text-to-video model at head dim 64 (2 heads, which FA3 takes; the tiny default is 16),
    saved in bf16. Its VAE has Wan2.1's factors: clips of 4k + 1 frames, sides multiples of 16."""
    if not HAS_CUDA:
        pytest.skip("needs a CUDA GPU")
    import torch

    from verl_omni.pipelines.wan.standin import build_tiny_wan

    path = str(tmp_path_factory.mktemp("wan_gpu"))
    return build_tiny_wan(path, seed=0, dtype=torch.bfloat16, attention_head_dim=64)
