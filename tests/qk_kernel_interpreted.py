"""Checks of models/qk_norm_rope.py under Triton's CPU interpreter, run by tests/test_qk_norm_rope.py in a process
of their own (TRITON_INTERPRET=1 must be set before the kernel is decorated). Prints one JSON object.

The interpreter rounds float32 -> bfloat16 by truncation (CUDA rounds to nearest even), so bit-for-bit checks use
float16, where both round to nearest; the bfloat16 figures here only bound that truncation. The GPU test checks
bfloat16 on the device."""

import json
import os
import sys

import torch

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"

from diffusers.models.normalization import RMSNorm  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from verl_omni.models.lora import LoRASpec, add_lora_adapter, lora_parts  # noqa: E402
from verl_omni.models.qk_norm_rope import joint_qk_norm_rope, kernel_applies  # noqa: E402
from verl_omni.pipelines.qwen_image.pipeline import QwenImageRLPipeline, _rotate  # noqa: E402


def eager_joint(txt, img, txt_norm, img_norm, txt_freqs, img_freqs, heads):
    def one(x, norm, freqs):
        return _rotate(norm(x.unflatten(-1, (heads, -1))), freqs.real[:, None], freqs.imag[:, None])

    return torch.cat([one(txt, txt_norm, txt_freqs), one(img, img_norm, img_freqs)], dim=1)


def op_figures(dtype, batch=2, seq_txt=5, seq_img=12, heads=3, head_dim=128):
    g = torch.Generator().manual_seed(0)
    txt = (3 * torch.randn(batch, seq_txt, heads * head_dim, generator=g)).to(dtype)
    img = torch.randn(batch, seq_img, heads * head_dim, generator=g).to(dtype)
    norms = [RMSNorm(head_dim, eps=1e-6).to(dtype) for _ in range(2)]
    for norm in norms:
        norm.weight.data = (torch.rand(head_dim, generator=g) + 0.5).to(dtype)
    freqs = [
        torch.polar(torch.ones(s, head_dim // 2), 6 * torch.rand(s, head_dim // 2, generator=g))
        for s in (seq_txt, seq_img)
    ]
    with torch.no_grad():
        ref = eager_joint(txt, img, norms[0], norms[1], freqs[0], freqs[1], heads)
        args = (txt, img, norms[0].weight, norms[1].weight, torch.view_as_real(freqs[0]), torch.view_as_real(freqs[1]))
        out = joint_qk_norm_rope(*args, heads, 1e-6)
        compiled = torch.compile(joint_qk_norm_rope, backend="aot_eager", dynamic=True)(*args, heads, 1e-6)
    diff = (out.float() - ref.float()).abs()
    return {
        "shape_ok": list(out.shape) == [batch, seq_txt + seq_img, heads, head_dim],
        "max_abs_diff": diff.max().item(),
        "max_abs_ref": ref.float().abs().max().item(),
        "differing_fraction": (diff > 0).float().mean().item(),
        "compiled_equal": bool(torch.equal(compiled, out)),
        "applies_without_grad": applies(txt, norms[1], freqs[1], heads, grad=False),
        "applies_with_grad": applies(txt.clone().requires_grad_(), norms[1], freqs[1], heads, grad=True),
        "applies_float32": applies(txt.float(), norms[1].float(), freqs[1], heads, grad=False),
        "applies_odd_head_dim": applies(txt[..., :-3], norms[1], freqs[1], heads, grad=False),
    }


def applies(x, norm, freqs, heads, grad):
    with torch.set_grad_enabled(grad):
        return kernel_applies(x, norm, freqs, heads)


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.kernel_calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.kernel_calls += func.name().startswith("verl_omni::joint_qk_norm_rope")
        return func(*args, **(kwargs or {}))


def pipeline_figures(model_dir, lora=False):
    """One transformer forward of the tiny model in float16 through the fused processor, with and without the
    kernel (SDPA stands in for the engine's attention function). With ``lora``: a rank-4 adapter on to_q/k/v/out
    with non-zero weights, and a third forward whose kernel adds the q/k adapter's product itself."""

    def sdpa(q, k, v, causal=False, softmax_scale=None):
        out = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2)

    pipe = QwenImageRLPipeline.from_pretrained(model_dir, torch_dtype=torch.float16)
    transformer = pipe.transformer
    if lora:
        add_lora_adapter(transformer, LoRASpec(rank=4, alpha=8.0))
        with torch.no_grad():
            for name, param in sorted(transformer.named_parameters()):
                if "lora_" in name:  # B starts at zero: give the product a size the test can see
                    param.copy_(0.2 * torch.randn(param.shape, generator=torch.Generator().manual_seed(len(name))))
        transformer.half()
    cfg = transformer.config
    g = torch.Generator().manual_seed(1)
    inputs = dict(
        hidden_states=torch.randn(2, 16, cfg.in_channels, generator=g).half(),
        encoder_hidden_states=torch.randn(2, 7, cfg.joint_attention_dim, generator=g).half(),
        encoder_hidden_states_mask=None,
        timestep=torch.tensor([0.5, 0.25]).half(),
        img_shapes=[[(1, 4, 4)]] * 2,
        return_dict=False,
    )
    outs, calls = {}, {}
    # (qk_kernel, lora_in_kernel, fuse_projections); fused, the kernel reads q and k as column slices of one matmul
    for options in (
        (False, False, False),
        (True, False, False),
        (True, True, False),
        (True, False, True),
        (True, True, True),
        (False, False, True),
    ):
        pipe.use_attention_function(sdpa, qk_kernel=options[0], lora_in_kernel=options[1], fuse_projections=options[2])
        with torch.no_grad(), OpCounter() as counter:
            outs[options] = transformer(**inputs)[0].float()
        calls[options] = counter.kernel_calls
    off, on, lora_in = outs[False, False, False], outs[True, False, False], outs[True, True, False]
    probe = torch.zeros(1, 2, cfg.num_attention_heads * cfg.attention_head_dim).half()
    attn = transformer.transformer_blocks[0].attn
    split = [lora_parts(layer, probe) is not None for layer in (attn.to_q, attn.to_k, attn.add_q_proj)]
    return {
        "forward_max_abs_diff": (on - off).abs().max().item(),
        "forward_max_abs": off.abs().max().item(),
        "lora_in_kernel_max_abs_diff": (lora_in - on).abs().max().item(),
        "fused_max_abs_diff": (outs[True, False, True] - on).abs().max().item(),
        "fused_without_kernel_max_abs_diff": (outs[False, False, True] - off).abs().max().item(),
        "fused_lora_in_kernel_max_abs_diff": (outs[True, True, True] - lora_in).abs().max().item(),
        "kernel_calls_off": calls[False, False, False],
        "kernel_calls_on": calls[True, False, False],  # q and k of every block
        "kernel_calls_lora_in_kernel": calls[True, True, False],
        "kernel_calls_fused": [calls[True, False, True], calls[True, True, True]],
        "splits_to_q_to_k_add_q_proj": split,  # which q/k projections hand the kernel their LoRA parts
        "blocks": cfg.num_layers,
    }


if __name__ == "__main__":
    report = {"float16": op_figures(torch.float16), "bfloat16": op_figures(torch.bfloat16)}
    report["pipeline_float16"] = pipeline_figures(sys.argv[1])
    report["pipeline_float16_lora"] = pipeline_figures(sys.argv[1], lora=True)
    print(json.dumps(report))
