"""PickScore at the real CLIP-ViT-H-14 size (random weights) on the GPU: sane scores, offload, and its throughput."""

import time

import numpy as np
import pytest
from gpu_helpers import requires_cuda, write_figures

pytestmark = [pytest.mark.gpu, requires_cuda]


@pytest.fixture(scope="module")
def clip_h14_dir(tmp_path_factory):
    from verl_omni.models.tiny import build_clip_vit_h14

    return build_clip_vit_h14(tmp_path_factory.mktemp("clip_h14"), device="cuda")


def workload(count: int):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (512, 512, 3), dtype=np.uint8) for _ in range(count)]
    return images, [f'a poster that says "word {i % 16}"' for i in range(count)]


def test_pickscore_at_clip_h_size_bf16_throughput_and_offload(clip_h14_dir):
    import torch

    from verl_omni.rewards.pickscore import CLIPScorer

    images, prompts = workload(256)
    scorer = CLIPScorer(clip_h14_dir, device="cuda", batch_size=64, preprocess="tensor")
    assert scorer.dtype == torch.bfloat16  # dtype auto on a GPU
    scorer(images[:64], prompts[:64])  # warm-up
    torch.cuda.synchronize()
    start = time.perf_counter()
    scores = np.asarray(scorer(images, prompts))
    seconds = time.perf_counter() - start
    assert np.isfinite(scores).all() and len(set(scores.round(4))) > 1

    held = torch.cuda.memory_allocated()
    scorer.offload()
    assert held - torch.cuda.memory_allocated() > 1.5e9  # ~1B bf16 parameters left the GPU
    with pytest.raises(RuntimeError, match="offloaded"):
        scorer(images[:1], prompts[:1])
    scorer.onload()
    assert np.isfinite(scorer(images[:2], prompts[:2])).all()
    write_figures(
        "pickscore_gpu.json",
        {
            "images": len(images),
            "batch_size": 64,
            "dtype": "bfloat16",
            "img_per_s": len(images) / seconds,
            "device": torch.cuda.get_device_name(0),
        },
    )


def test_batched_equals_one_by_one_in_float32_on_the_gpu(clip_h14_dir):
    from verl_omni.rewards.pickscore import CLIPScorer

    images, prompts = workload(6)
    batched = CLIPScorer(clip_h14_dir, device="cuda", dtype="float32", batch_size=6)(images, prompts)
    single = CLIPScorer(clip_h14_dir, device="cuda", dtype="float32", batch_size=1)(images, prompts)
    # fp32 (cuDNN may run the patch conv in TF32): only the batch shape differs between the two
    np.testing.assert_allclose(batched, single, rtol=1e-2, atol=1e-3)  # random CLIP-H scores are ~0.05
