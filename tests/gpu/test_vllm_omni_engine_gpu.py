"""The real vllm-omni engine on the GPU, through our engine seam (run on the device: scripts/device/run_gpu.sh).

One engine (enforce_eager, LoRA rank 4 with B=0 so it is the base model until updated) serves every test of this
module, in file order: generate / batched -> B=N vs N x B=1 -> sleep / wake -> LoRA update vs the diffusers engine.

bf16 tolerance for B=N vs N x B=1 (same seeds, same initial noise): the transformer's bf16 GEMMs pick different
kernels / reduction orders for different batch sizes, so results are close, not bit-equal. Asserted bounds:
relative L2 of the final latents <= 5e-2, images mean |diff| <= 4 levels (of 255), log-probs max |diff| <= 0.05
per step (log-probs are per-element means, O(1)). Measured figures are printed and written to $OUT.
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
from verl_omni.core.checksum import tensors_checksum
from verl_omni.rollout.engines import get_engine_class

pytestmark = [pytest.mark.gpu, requires_cuda, requires_vllm_omni]

PROMPT = "a red bicycle leaning on a blue wall"
PARAMS = DiffusionSamplingParams(num_inference_steps=4, height=64, width=64, max_sequence_length=64)
SEEDS = [11, 12, 13, 14]
LORA = dict(lora_rank=4, lora_alpha=4.0, target_modules=("to_q", "to_k", "to_v", "to_out.0"))


def _config(model_dir: str, name: str = "vllm_omni", **kw) -> tuple[ModelConfig, RolloutConfig]:
    """The engine's (model, rollout) sections: bf16 on the GPU, eager, LoRA rank 4."""
    rollout = build(RolloutConfig, {"name": name, "device": "cuda", "dtype": "bfloat16", "enforce_eager": True, **kw})
    return ModelConfig(path=model_dir, **LORA), rollout


@pytest.fixture(scope="module")
def engine(gpu_qwen_image_dir, event_loop_gpu):
    cls = get_engine_class("vllm_omni")

    async def make():
        return cls(*_config(gpu_qwen_image_dir))

    t0 = time.perf_counter()
    eng = event_loop_gpu.run_until_complete(make())
    print(f"\n[vllm-omni] engine start {time.perf_counter() - t0:.1f} s")
    yield eng
    event_loop_gpu.run_until_complete(eng.shutdown())


@pytest.fixture(scope="module")
def run(event_loop_gpu):
    return event_loop_gpu.run_until_complete


def _rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def _img_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().mean())


def test_generate_and_generate_batched(engine, run):
    one = run(engine.generate(PROMPT, [7], PARAMS))
    many = run(engine.generate(PROMPT, SEEDS, PARAMS))
    T = PARAMS.num_inference_steps
    assert one.images.shape == (1, 64, 64, 3) and one.images.dtype == torch.uint8
    assert many.images.shape == (4, 64, 64, 3)
    assert many.latents.shape[:2] == (4, T + 1) and many.log_probs.shape == (4, T)
    assert many.timesteps.shape == (T,) and many.sigmas.shape == (T + 1,) and many.window_mask.shape == (T,)
    assert many.prompt_embeds.shape[0] == 4 and many.seeds == SEEDS
    assert torch.isfinite(many.log_probs).all() and torch.isfinite(many.latents).all()
    for i in range(1, 4):  # distinct seeds -> distinct images
        assert _img_diff(many.images[0], many.images[i]) > 1.0
    again = run(engine.generate(PROMPT, SEEDS, PARAMS))
    assert torch.equal(again.images, many.images), "same seeds, same batch must be deterministic"
    # A training rollout's trajectory: only the window's latents cross vllm-omni's process hop, with their positions.
    windowed = PARAMS.replace(sde_window_size=2, window_start=1)
    full = run(engine.generate(PROMPT, SEEDS, windowed))
    kept = run(engine.generate(PROMPT, SEEDS, windowed.replace(trajectory_window_only=True)))
    assert full.latent_steps.tolist() == list(range(T + 1)) and kept.latent_steps.tolist() == [1, 2, 3]
    assert kept.latents.shape[:2] == (4, 3)
    assert torch.equal(kept.latents, full.latents[:, 1:4]) and torch.equal(kept.images, full.images)


def test_batched_equals_single_requests(engine, run):
    batched = run(engine.generate(PROMPT, SEEDS, PARAMS))
    singles = [run(engine.generate(PROMPT, [s], PARAMS)) for s in SEEDS]
    lat = torch.cat([s.latents for s in singles])
    lp = torch.cat([s.log_probs for s in singles])
    img = torch.cat([s.images for s in singles])
    figures = {
        "latents_initial_equal": bool(torch.equal(batched.latents[:, 0], lat[:, 0])),
        "final_latents_rel_l2": _rel_l2(batched.latents[:, -1], lat[:, -1]),
        "log_probs_max_abs_diff": float((batched.log_probs - lp).abs().max()),
        "images_mean_abs_diff": _img_diff(batched.images, img),
        "images_max_abs_diff": float((batched.images.float() - img.float()).abs().max()),
        "bitwise_equal_images": bool(torch.equal(batched.images, img)),
    }
    write_figures("gpu_batched_vs_single.json", figures)
    assert figures["latents_initial_equal"], "sample i's initial noise must depend only on seeds[i]"
    assert figures["final_latents_rel_l2"] <= 5e-2
    assert figures["log_probs_max_abs_diff"] <= 5e-2
    assert figures["images_mean_abs_diff"] <= 4.0


def test_sleep_frees_memory_and_wake_restores(engine, run):
    before_out = run(engine.generate(PROMPT, SEEDS[:2], PARAMS))
    # wake_up empties the CUDA caches (colocation needs the room): one sleep/wake cycle first, so "awake" is not
    # inflated by blocks earlier generations left cached.
    run(engine.sleep(level=1))
    run(engine.wake_up())
    mem_awake = run(engine.memory_info())
    t0 = time.perf_counter()
    run(engine.sleep(level=1))
    t_sleep = time.perf_counter() - t0
    mem_asleep = run(engine.memory_info())
    with pytest.raises(RuntimeError):
        run(engine.generate(PROMPT, [1], PARAMS))
    t0 = time.perf_counter()
    run(engine.wake_up())
    t_wake = time.perf_counter() - t0
    mem_woken = run(engine.memory_info())
    after_out = run(engine.generate(PROMPT, SEEDS[:2], PARAMS))
    figures = {
        "used_gib_awake": mem_awake["used_gib"],
        "used_gib_asleep": mem_asleep["used_gib"],
        "used_gib_after_wake": mem_woken["used_gib"],
        "freed_gib": mem_awake["used_gib"] - mem_asleep["used_gib"],
        "restored_gib": mem_woken["used_gib"] - mem_asleep["used_gib"],
        "sleep_s": t_sleep,
        "wake_s": t_wake,
        "outputs_identical_after_wake": bool(torch.equal(before_out.images, after_out.images)),
        "lora_checksum_survives": None,
    }
    write_figures("gpu_sleep_wake.json", figures)
    # ~1.3 GiB of weights live in vllm-omni's CuMem pool; device-wide free memory also moves with caches.
    assert figures["freed_gib"] >= 0.7, figures
    assert figures["restored_gib"] >= 0.8 * figures["freed_gib"], figures
    assert figures["outputs_identical_after_wake"]


def test_lora_update_changes_images_and_matches_diffusers(engine, run, gpu_qwen_image_dir):
    from verl_omni.models.lora import get_lora_state_dict

    reference = get_engine_class("diffusers")(*_config(gpu_qwen_image_dir, name="diffusers"))
    try:
        base = run(engine.generate(PROMPT, SEEDS, PARAMS))
        ref_base = run(reference.generate(PROMPT, SEEDS, PARAMS))
        names = get_lora_state_dict(reference.pipe.transformer)
        gen = torch.Generator().manual_seed(0)
        tensors = {k: (torch.randn(v.shape, generator=gen) * 0.05).to(v.dtype) for k, v in names.items()}
        expected = tensors_checksum(tensors)
        served = run(engine.update_lora(tensors))
        assert served == expected == run(engine.lora_checksum())
        assert run(reference.update_lora(tensors)) == expected
        adapted = run(engine.generate(PROMPT, SEEDS, PARAMS))
        ref_adapted = run(reference.generate(PROMPT, SEEDS, PARAMS))
        figures = {
            "base_vllm_vs_diffusers_mean_abs_diff": _img_diff(base.images, ref_base.images),
            "lora_change_mean_abs_diff": _img_diff(adapted.images, base.images),
            "lora_vllm_vs_diffusers_mean_abs_diff": _img_diff(adapted.images, ref_adapted.images),
            "lora_vllm_vs_diffusers_final_latents_rel_l2": _rel_l2(adapted.latents[:, -1], ref_adapted.latents[:, -1]),
            "lora_vllm_vs_diffusers_bitwise_equal": bool(torch.equal(adapted.images, ref_adapted.images)),
            "checksum": served,
        }
        write_figures("gpu_lora.json", figures)
        assert not torch.equal(adapted.images, base.images), "a LoRA update must change the images"
        assert _rel_l2(adapted.latents[:, -1], base.latents[:, -1]) > 1e-3
        assert figures["lora_vllm_vs_diffusers_mean_abs_diff"] <= 2.0
        assert figures["lora_vllm_vs_diffusers_final_latents_rel_l2"] <= 2e-2
    finally:
        run(reference.shutdown())
