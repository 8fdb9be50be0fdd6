"""FLUX.1-dev, SD3.5 and Wan2.1 text-to-video through the vllm-omni engine on the GPU (run on the device:
scripts/device/run_gpu.sh), the same path as Qwen-Image: our RL pipeline class re-initialised inside vllm-omni's
worker, its attention through vllm-omni's FA3 (``use_attention_function``), its blocks compiled regionally
(``_repeated_blocks``).

Per family (tiny random models in bf16 at head dims FA3 takes: FLUX 128, SD3.5 64, Wan 64): a rollout of B=4; B=4
equals 4 x B=1 within bf16 tolerance; the vllm-omni engine equals the diffusers engine (same seeds); the hybrid
engine's first update sees ratios within 1e-4 of 1 (tests/gpu/test_families_hybrid_gpu.py). FLUX runs as flow_grpo
trains it (distilled guidance, no CFG branch); SD3 and Wan with CFG 4.5 (their recipes'), Wan making 5-frame clips
(media [B, 5, H, W, 3]; images are one frame).

bf16 bounds as tests/gpu/test_vllm_omni_engine_gpu.py's: final latents relative L2 <= 5e-2 and images mean |diff|
<= 4 levels for B=4 vs 4 x B=1 (different GEMM kernels per batch size); <= 2e-2 and 2 levels between the engines
(FA3 + compiled blocks against diffusers' SDPA). Measured figures are printed and written to $OUT.
"""

from __future__ import annotations

import time

import pytest
import torch
from gpu_helpers import requires_cuda, requires_vllm_omni, write_figures

from verl_omni.config.base import build
from verl_omni.config.model import ModelConfig
from verl_omni.config.rollout import RolloutConfig
from verl_omni.config.sampling import DiffusionSamplingParams
from verl_omni.rollout.engines import get_engine_class

pytestmark = [pytest.mark.gpu, requires_cuda, requires_vllm_omni]

PROMPT = "a red bicycle leaning on a blue wall"
SEEDS = [11, 12, 13, 14]
FAMILIES = ["flux", "sd3", "wan"]  # also read by test_families_hybrid_gpu.py
# The families' rollouts as their recipes run them: FLUX without a CFG branch, SD3 and Wan with CFG 4.5 (the empty
# negative prompt).
TRUE_CFG = {"flux": 1.0, "sd3": 4.5, "wan": 4.5}  # also read by test_families_hybrid_gpu.py
# Frames per sample: Wan's clips of 5 frames (2 latent frames; actor_rollout_ref.model.wan.num_frames), images 1.
FRAMES = {"wan": 5}
# Each family's own options section (actor_rollout_ref.model.<family>)
FAMILY_OPTIONS = {"wan": {"wan": {"num_frames": FRAMES["wan"]}}}
# The families whose text conditioning carries pooled embeddings (CLIP's); Wan's UMT5 has none.
POOLED = {"flux", "sd3"}
LORA = dict(lora_rank=4, lora_alpha=4.0, target_modules=("to_q", "to_k", "to_v", "to_out.0"))


def _params(family: str) -> DiffusionSamplingParams:
    return DiffusionSamplingParams(
        num_inference_steps=4,
        height=128,
        width=128,
        max_sequence_length=64,
        guidance_scale=TRUE_CFG[family],
        sde_window_size=2,
        window_start=1,
    )


def _config(family: str, model_dir: str, name: str) -> tuple[ModelConfig, RolloutConfig]:
    # compiled blocks (enforce_eager off) as in training; room left for the diffusers engine beside it
    settings = {"name": name, "device": "cuda", "dtype": "bfloat16", "enforce_eager": False}
    rollout = build(RolloutConfig, {**settings, "gpu_memory_utilization": 0.4})
    return ModelConfig(path=model_dir, pipeline=family, **LORA, **FAMILY_OPTIONS.get(family, {})), rollout


def _rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def _img_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().mean())


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture(scope="module")
def model_dir(family, request):
    return request.getfixturevalue(f"gpu_{family}_dir")


@pytest.fixture(scope="module")
def engine(family, model_dir, event_loop_gpu):
    cls = get_engine_class("vllm_omni")

    async def make():
        return cls(*_config(family, model_dir, "vllm_omni"))

    t0 = time.perf_counter()
    eng = event_loop_gpu.run_until_complete(make())
    print(f"\n[vllm-omni {family}] engine start {time.perf_counter() - t0:.1f} s")
    yield eng
    event_loop_gpu.run_until_complete(eng.shutdown())


@pytest.fixture(scope="module")
def run(event_loop_gpu):
    return event_loop_gpu.run_until_complete


def test_rollout_of_four_samples(family, engine, run):
    params = _params(family)
    out = run(engine.generate(PROMPT, SEEDS, params))
    T, frames = params.num_inference_steps, FRAMES.get(family, 1)
    assert out.media.shape == (4, frames, 128, 128, 3) and out.media.dtype == torch.uint8
    assert out.latents.shape[:2] == (4, T + 1) and out.log_probs.shape == (4, T)
    if family == "wan":  # video latents [B, T+1, C, F', h, w]: 2 latent frames of 128 / 8
        assert out.latents.shape[3:] == ((frames - 1) // 4 + 1, 16, 16)
        assert (out.media[:, 0].float() - out.media[:, -1].float()).abs().mean() > 1.0  # frames, not one image
    assert out.window_mask.tolist() == [False, True, True, False]
    assert out.prompt_embeds.shape[0] == 4 and out.seeds == SEEDS
    assert (out.pooled_prompt_embeds is not None) == (family in POOLED)
    assert out.pooled_prompt_embeds is None or out.pooled_prompt_embeds.shape[0] == 4
    assert (out.negative_prompt_embeds is not None) == (TRUE_CFG[family] > 1)
    assert torch.isfinite(out.log_probs).all() and torch.isfinite(out.latents).all()
    for i in range(1, 4):  # distinct seeds -> distinct samples
        assert _img_diff(out.media[0], out.media[i]) > 1.0
    again = run(engine.generate(PROMPT, SEEDS, params))
    assert torch.equal(again.media, out.media), "same seeds, same batch must be deterministic"


def test_batched_equals_single_requests(family, engine, run):
    params = _params(family)
    batched = run(engine.generate(PROMPT, SEEDS, params))
    singles = [run(engine.generate(PROMPT, [s], params)) for s in SEEDS]
    latents = torch.cat([s.latents for s in singles])
    figures = {
        "family": family,
        "latents_initial_equal": bool(torch.equal(batched.latents[:, 0], latents[:, 0])),
        "final_latents_rel_l2": _rel_l2(batched.latents[:, -1], latents[:, -1]),
        "log_probs_max_abs_diff": float((batched.log_probs - torch.cat([s.log_probs for s in singles])).abs().max()),
        "images_mean_abs_diff": _img_diff(batched.media, torch.cat([s.media for s in singles])),
    }
    write_figures(f"gpu_{family}_batched_vs_single.json", figures)
    assert figures["latents_initial_equal"], "sample i's initial noise must depend only on seeds[i]"
    assert figures["final_latents_rel_l2"] <= 5e-2
    assert figures["log_probs_max_abs_diff"] <= 5e-2
    assert figures["images_mean_abs_diff"] <= 4.0


def test_vllm_omni_engine_equals_the_diffusers_engine(family, engine, model_dir, run):
    params = _params(family)
    reference = get_engine_class("diffusers")(*_config(family, model_dir, "diffusers"))
    try:
        served = run(engine.generate(PROMPT, SEEDS, params))
        expected = run(reference.generate(PROMPT, SEEDS, params))
    finally:
        run(reference.shutdown())
    figures = {
        "family": family,
        "initial_latents_equal": bool(torch.equal(served.latents[:, 0], expected.latents[:, 0])),
        "final_latents_rel_l2": _rel_l2(served.latents[:, -1], expected.latents[:, -1]),
        "log_probs_max_abs_diff": float((served.log_probs - expected.log_probs).abs().max()),
        "images_mean_abs_diff": _img_diff(served.media, expected.media),
    }
    write_figures(f"gpu_{family}_vllm_omni_vs_diffusers.json", figures)
    assert figures["initial_latents_equal"]
    assert figures["final_latents_rel_l2"] <= 2e-2
    assert figures["images_mean_abs_diff"] <= 2.0
