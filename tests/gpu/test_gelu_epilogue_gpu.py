"""The FFN's tanh GELU in cuBLASLt's GEMM epilogue (models/gelu_epilogue.py) on the GPU, bf16, at the real width.

Asserted: the epilogue is taken without a gradient and not in a training forward; its output is at least as close
to the float32 reference as diffusers' two-kernel path (it rounds once, after the GELU), within bf16 tolerance of
it; torch.compile keeps it (the compiled module gives the eager epilogue's numbers); a whole 2-layer transformer
forward moves by less than 1e-2 relative L2. Figures go to $OUT/gelu_epilogue_gpu.json.
"""

from __future__ import annotations

import pytest
import torch
from diffusers.models.activations import GELU
from gpu_helpers import requires_cuda, write_figures

from verl_omni.models.gelu_epilogue import EpilogueGELU, use_gelu_epilogue, use_plain_gelu

pytestmark = [pytest.mark.gpu, requires_cuda]


def _rel_l2(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_epilogue_matches_the_two_kernel_path_and_survives_compile():
    torch.manual_seed(0)
    plain = GELU(3072, 12288, approximate="tanh").to("cuda", torch.bfloat16)
    fused = EpilogueGELU.wrapping(plain)
    x = torch.randn(4, 1024, 3072, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        reference = torch.nn.functional.gelu(
            torch.nn.functional.linear(x.float(), plain.proj.weight.float(), plain.proj.bias.float()),
            approximate="tanh",
        )
        two_kernels, epilogue = plain(x), fused(x)
        compiled = torch.compile(fused, dynamic=True)(x)
    with torch.no_grad():
        assert fused.takes_epilogue(x)
    assert not fused.takes_epilogue(x.clone().requires_grad_())  # a training forward keeps autograd's path
    figures = {
        "two_kernels_vs_f32_rel_l2": _rel_l2(two_kernels, reference),
        "epilogue_vs_f32_rel_l2": _rel_l2(epilogue, reference),
        "epilogue_vs_two_kernels_rel_l2": _rel_l2(epilogue, two_kernels),
        "compiled_vs_eager_epilogue_rel_l2": _rel_l2(compiled, epilogue),
    }
    write_figures("gelu_epilogue_gpu.json", figures)
    assert figures["epilogue_vs_f32_rel_l2"] <= 1.5 * figures["two_kernels_vs_f32_rel_l2"]
    assert figures["epilogue_vs_two_kernels_rel_l2"] < 1e-2
    assert figures["compiled_vs_eager_epilogue_rel_l2"] < 1e-3


def test_transformer_forward_with_the_epilogue(gpu_qwen_image_dir):
    from verl_omni.pipelines.qwen_image.pipeline import QwenImageRLPipeline

    pipe = QwenImageRLPipeline.from_pretrained(gpu_qwen_image_dir, torch_dtype=torch.bfloat16).to("cuda")
    transformer = pipe.transformer
    cfg = transformer.config
    g = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(2, 256, cfg.in_channels, device="cuda", dtype=torch.bfloat16, generator=g)
    encoder = torch.randn(2, 20, cfg.joint_attention_dim, device="cuda", dtype=torch.bfloat16, generator=g)

    def forward():
        with torch.no_grad():
            return transformer(
                hidden_states=hidden,
                encoder_hidden_states=encoder,
                encoder_hidden_states_mask=torch.ones(2, 20, dtype=torch.long, device="cuda"),
                timestep=torch.tensor([0.5, 0.25], device="cuda", dtype=torch.bfloat16),
                img_shapes=[[(1, 16, 16)]] * 2,
                return_dict=False,
            )[0]

    before = forward()
    assert use_gelu_epilogue(transformer) == 2 * cfg.num_layers
    after = forward()
    assert use_plain_gelu(transformer) == 2 * cfg.num_layers
    write_figures("gelu_epilogue_gpu_transformer.json", {"forward_rel_l2": _rel_l2(after, before)})
    assert _rel_l2(after, before) < 1e-2
