"""The faithful stand-ins built on the GPU (one transformer layer, every other component at its real size) load
through their pipeline's ``from_pretrained`` in bf16 and generate images; writes the build time and the
parameters per component."""

import shutil
import time

import pytest
import torch
from gpu_helpers import requires_cuda, write_figures

from verl_omni.config.sampling import DiffusionSamplingParams
from verl_omni.models.standins import build_standin, read_standin_record

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
