"""The Triton q/k kernel (models/qk_norm_rope.py) on the GPU in bfloat16 at the real width (24 heads x 128, the
recipe's 256 text + 1024 image tokens, B=4).

Asserted: the kernel's joint q equals diffusers' RMSNorm + the processor's RoPE + cat to within one bfloat16
rounding of the largest value, on all but a small fraction of elements (only the mean's sum order differs; CUDA
rounds to nearest like PyTorch); inside torch.compile (inductor) it gives the eager kernel's numbers. Timings of
the kernel and of the compiled eager path (what inductor makes of the same steps) go to $OUT/qk_norm_rope_gpu.json.
"""

from __future__ import annotations

import pytest
import torch
from gpu_helpers import requires_cuda, write_figures

pytestmark = [pytest.mark.gpu, requires_cuda]


def _timed(fn, repeats=20):
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def test_kernel_matches_eager_in_bf16_and_times():
    from diffusers.models.normalization import RMSNorm

    from verl_omni.models.qk_norm_rope import joint_qk_norm_rope
    from verl_omni.pipelines.qwen_image.pipeline import _rotate

    batch, seq_txt, seq_img, heads, head_dim = 4, 256, 1024, 24, 128
    g = torch.Generator(device="cuda").manual_seed(0)
    dt = torch.bfloat16
    txt = 3 * torch.randn(batch, seq_txt, heads * head_dim, device="cuda", generator=g).to(dt)
    img = torch.randn(batch, seq_img, heads * head_dim, device="cuda", generator=g).to(dt)
    norms = [RMSNorm(head_dim, eps=1e-6).to("cuda", dt).requires_grad_(False) for _ in range(2)]
    for norm in norms:
        norm.weight.data = torch.rand(head_dim, device="cuda", generator=g).to(dt) + 0.5
    phases = [6 * torch.rand(s, head_dim // 2, device="cuda", generator=g) for s in (seq_txt, seq_img)]
    freqs = [torch.polar(torch.ones_like(p), p) for p in phases]
    ropes = [torch.view_as_real(f) for f in freqs]

    def eager():
        def one(x, norm, f):
            return _rotate(norm(x.unflatten(-1, (heads, -1))), f.real[:, None], f.imag[:, None])

        return torch.cat([one(txt, norms[0], freqs[0]), one(img, norms[1], freqs[1])], dim=1)

    def kernel():
        return joint_qk_norm_rope(txt, img, norms[0].weight, norms[1].weight, ropes[0], ropes[1], heads, 1e-6)

    compiled_eager = torch.compile(eager, dynamic=True)
    compiled_kernel = torch.compile(kernel, dynamic=True)
    with torch.no_grad():
        ref, out, out_compiled = eager(), kernel(), compiled_kernel()
        figures = {
            "max_abs_diff": (out.float() - ref.float()).abs().max().item(),
            "max_abs_ref": ref.float().abs().max().item(),
            "differing_fraction": (out != ref).float().mean().item(),
            "compiled_kernel_equal": bool(torch.equal(out_compiled, out)),
            "ms_kernel": _timed(kernel),
            "ms_compiled_eager": _timed(compiled_eager),
            "ms_eager": _timed(eager),
        }
    moved = 2 * (txt.numel() + img.numel()) * txt.element_size()  # read the projections, write the joint buffer
    figures["kernel_tb_per_s"] = moved / figures["ms_kernel"] / 1e9
    figures["compiled_eager_tb_per_s"] = moved / figures["ms_compiled_eager"] / 1e9
    write_figures("qk_norm_rope_gpu.json", figures)
    assert figures["max_abs_diff"] <= 2**-7 * figures["max_abs_ref"]
    assert figures["differing_fraction"] < 0.01
    assert figures["compiled_kernel_equal"]


def test_lora_product_added_inside_the_kernel_equals_peft_addition_in_bf16():
    """``*_delta``: the kernel adds a LoRA's scaled product before the norm, rounding as peft's two operations."""
    from verl_omni.models.qk_norm_rope import joint_qk_norm_rope

    batch, seq_txt, seq_img, heads, head_dim, scale = 4, 256, 1024, 24, 128, 2.0
    g = torch.Generator(device="cuda").manual_seed(1)
    dt = torch.bfloat16

    def rand(*shape):
        return torch.randn(*shape, device="cuda", generator=g).to(dt)

    txt, img = rand(batch, seq_txt, heads * head_dim), rand(batch, seq_img, heads * head_dim)
    txt_delta, img_delta = 0.1 * rand(*txt.shape), 0.1 * rand(*img.shape)
    weights = [rand(head_dim) + 1 for _ in range(2)]
    ropes = [torch.view_as_real(torch.polar(torch.ones(s, head_dim // 2, device="cuda"),
                                            6 * torch.rand(s, head_dim // 2, device="cuda", generator=g)))
             for s in (seq_txt, seq_img)]  # fmt: skip
    with torch.no_grad():
        fused = joint_qk_norm_rope(
            txt, img, *weights, *ropes, heads, 1e-6, txt_delta, img_delta, scale, scale
        )  # fmt: skip
        summed = joint_qk_norm_rope(
            txt + txt_delta * scale, img + img_delta * scale, *weights, *ropes, heads, 1e-6
        )  # fmt: skip
    differing = (fused != summed).float().mean().item()
    write_figures("qk_norm_rope_lora_gpu.json", {"differing_fraction": differing})
    assert torch.equal(fused, summed), f"{differing:.2e} of the elements differ"
