"""The faithful stand-ins built on the GPU load through their pipeline's ``from_pretrained`` in bf16 and generate:
the image families' with one transformer layer (every other component at its real size) make images, Wan2.1-T2V-1.3B's
at its full depth makes clips at its recipe's frame count and size (configs/wan2_1_t2v_1_3b_flowgrpo_lora.yaml).
Writes the build time and the parameters per component."""

import shutil
import time

import pytest
import torch
from gpu_helpers import requires_cuda, write_figures

from verl_omni.config.sampling import DiffusionSamplingParams
from verl_omni.models.standins import read_standin_record
from verl_omni.pipelines.standins import build_standin

pytestmark = [pytest.mark.gpu, requires_cuda]

# Whole text encoders whatever the transformer depth: the published checkpoints' values (safetensors index / 2).
TEXT_ENCODER_PARAMS = {
    "qwen_image": ("text_encoder", 8_292_166_656),
    "sd3": ("text_encoder_3", 4_762_310_656),
    "flux": ("text_encoder_2", 4_762_310_656),
}


def _generate(family: str, path: str) -> torch.Tensor:
    if family == "flux":
        from diffusers import FluxPipeline

        pipe = FluxPipeline.from_pretrained(path, torch_dtype=torch.bfloat16).to("cuda")
        pipe.set_progress_bar_config(disable=True)
        out = pipe(["a red cat"] * 2, height=256, width=256, num_inference_steps=2, output_type="pt")
        return out.images
    from verl_omni.pipelines.loading import load_rl_pipeline

    pipe = load_rl_pipeline(path, family, torch.bfloat16).to("cuda")
    params = DiffusionSamplingParams(
        num_inference_steps=2, height=256, width=256, noise_level=0.7, sde_window_size=1, window_start=0
    )
    return pipe.rl_generate("a red cat", [1, 2], params).images


@pytest.mark.parametrize("family", ["qwen_image", "sd3", "flux"])
def test_a_one_layer_standin_built_on_the_gpu_loads_in_bf16_and_generates(tmp_path, family):
    t0 = time.perf_counter()
    path = build_standin(family, tmp_path / family, layers=1, device="cuda")
    build_s = time.perf_counter() - t0
    try:
        record = read_standin_record(path)
        assert record["weights"] and record["layers"] == 1 and record["dtype"] == "bfloat16"
        name, published = TEXT_ENCODER_PARAMS[family]
        assert record["params"][name] == published
        t0 = time.perf_counter()
        images = _generate(family, path).float()
        generate_s = time.perf_counter() - t0
        assert images.shape[0] == 2 and torch.isfinite(images).all() and images.std() > 0
        write_figures(
            f"standin_{family}_L1.json",
            {"build_on_gpu_s": round(build_s, 1), "load_and_generate_s": round(generate_s, 1), **record},
        )
    finally:
        torch.cuda.empty_cache()
        shutil.rmtree(path, ignore_errors=True)


# configs/wan2_1_t2v_1_3b_flowgrpo_lora.yaml: 33-frame clips of 240 x 416, CFG 4.5 with the empty negative prompt
WAN_FRAMES, WAN_HEIGHT, WAN_WIDTH = 33, 240, 416
# Wan-AI/Wan2.1-T2V-1.3B-Diffusers: 30 blocks; parameters per component (as tests/test_wan.py's WAN_PARAMS)
WAN_1_3B_PARAMS = {"transformer": 1_418_996_800, "text_encoder": 5_680_910_336, "vae": 126_892_531}


def test_the_wan2_1_1_3b_standin_built_on_the_gpu_loads_in_bf16_and_generates_clips(tmp_path):
    """Every component of Wan2.1-T2V-1.3B at its real size and depth (the UMT5-XXL encoder, the 30-block
    transformer, the 3D VAE, the published UniPC scheduler): one rollout of 2 clips, 2 steps (the first an SDE step),
    at the recipe's frames and size, as ``WanRLPipeline`` on the GPU."""
    from verl_omni.pipelines.loading import load_rl_pipeline
    from verl_omni.pipelines.wan.options import WanOptions

    t0 = time.perf_counter()
    path = build_standin("wan", tmp_path / "wan", device="cuda", variant="1.3B")
    build_s = time.perf_counter() - t0
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    try:
        record = read_standin_record(path)
        assert record["weights"] and record["dtype"] == "bfloat16"
        assert record["checkpoint"] == "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
        assert record["layers"] == record["published_layers"] == 30
        for name, published in WAN_1_3B_PARAMS.items():
            assert record["params"][name] == pytest.approx(published, rel=1e-3), name
        t0 = time.perf_counter()
        pipe = load_rl_pipeline(path, "wan", torch.bfloat16, family_options=WanOptions(num_frames=WAN_FRAMES))
        pipe = pipe.to("cuda")
        assert type(pipe.scheduler).__name__ == "UniPCMultistepScheduler"
        params = DiffusionSamplingParams(
            num_inference_steps=2,
            height=WAN_HEIGHT,
            width=WAN_WIDTH,
            guidance_scale=4.5,
            negative_prompt="",
            max_sequence_length=128,
            noise_level=0.7,
            sde_window_size=1,
            window_start=0,
        ).validate()
        out = pipe.rl_generate("a red cat walking along a wall", [1, 2], params)
        generate_s = time.perf_counter() - t0
        latent_frames = (WAN_FRAMES - 1) // 4 + 1  # the VAE's 4x temporal compression after the first frame
        assert out.media.shape == (2, WAN_FRAMES, WAN_HEIGHT, WAN_WIDTH, 3) and out.media.dtype == torch.uint8
        assert out.latents.shape == (2, 3, 16, latent_frames, WAN_HEIGHT // 8, WAN_WIDTH // 8)
        assert out.log_probs.shape == (2, 2) and out.window_mask.tolist() == [True, False]
        assert out.prompt_embeds.shape == (2, 128, 4096) and out.negative_prompt_embeds.shape == (2, 128, 4096)
        assert torch.isfinite(out.latents).all() and torch.isfinite(out.log_probs).all()
        assert bool((out.log_probs[:, 0] != 0).all()) and bool((out.log_probs[:, 1] == 0).all())
        media = out.media.float()
        assert media.std() > 0 and (media[0] - media[1]).abs().mean() > 0  # two seeds, two clips
        assert (media[:, 0] - media[:, -1]).abs().mean() > 0  # the frames are not copies of one image
        write_figures(
            "standin_wan_1.3B.json",
            {
                "build_on_gpu_s": round(build_s, 1),
                "load_and_generate_s": round(generate_s, 1),
                "clip": [WAN_FRAMES, WAN_HEIGHT, WAN_WIDTH],
                "load_and_generate_peak_mem_gb": round(torch.cuda.max_memory_allocated() / 2**30, 1),
                **record,
            },
        )
    finally:
        torch.cuda.empty_cache()
        shutil.rmtree(path, ignore_errors=True)
