"""Qwen-Image's q/k preparation for joint attention in one Triton kernel per tensor: RMSNorm over the head dim,
RoPE, and the write into the joint [text, image] sequence, for forwards without a gradient on CUDA.

Why: at the real size the compiled rollout spends ~0.8 s of a 10.5 s call on these steps (inductor's kernels for
them reach ~30% of HBM bandwidth: ``docs/benchmarks/pipeline_breakdown_h200_L60.json``), and a single pass that
reads the projection once and writes the joint buffer once is the least traffic there is. The numbers are those of
diffusers' ``RMSNorm`` followed by ``pipelines/qwen_image._rotate`` and ``torch.cat``, rounding for rounding:
``n = bf16(x · rsqrt(mean(x²) + eps))``, ``m = bf16(n · w)``, then the rotation in float32 rounded once; only the
order of the mean's sum differs. One program handles one token's heads (their even and odd lanes as two strided
loads, so the rotation's partner is in registers).

``joint_qk_norm_rope`` is a ``torch.library`` custom op (with a fake implementation), so the engines' regional
``torch.compile`` keeps it as one opaque call. It has no backward: the attention processor uses it only where
nothing needs a gradient. On CPU, tests run the same kernel through Triton's interpreter (``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Triton's interpreter (CPU tensors, numpy underneath) is chosen when the kernel is decorated: read it once here.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _norm_rope_rows(
    x_ptr,  # [B, S, H * D] contiguous
    w_ptr,  # [D]
    rope_ptr,  # [S, D / 2, 2] float32: (cos, sin) per pair, torch.view_as_real of the complex frequencies
    out_ptr,  # [B, out_seq, H, D] contiguous
    seq_len,
    out_seq_len,
    out_offset,
    eps,
    HEADS: tl.constexpr,
    BLOCK_HEADS: tl.constexpr,
    HALF: tl.constexpr,
):
    row = tl.program_id(0)  # b * seq_len + s
    b = row // seq_len
    s = row % seq_len
    heads = tl.arange(0, BLOCK_HEADS)[:, None]
    pairs = tl.arange(0, HALF)[None, :]
    mask = (heads < HEADS) & (pairs < HALF)
    lanes = heads * (2 * HALF) + 2 * pairs  # the even lane of each pair; its odd partner is lanes + 1
    x_row = x_ptr + row.to(tl.int64) * (HEADS * 2 * HALF)
    x_even = tl.load(x_row + lanes, mask=mask, other=0.0).to(tl.float32)
    x_odd = tl.load(x_row + lanes + 1, mask=mask, other=0.0).to(tl.float32)
    mean_sq = (tl.sum(x_even * x_even, axis=1) + tl.sum(x_odd * x_odd, axis=1)) / (2 * HALF)
    inv_rms = (1.0 / tl.sqrt(mean_sq + eps))[:, None]
    dtype = out_ptr.dtype.element_ty
    w_even = tl.load(w_ptr + 2 * pairs).to(tl.float32)
    w_odd = tl.load(w_ptr + 2 * pairs + 1).to(tl.float32)
    # RMSNorm as diffusers rounds it: normalised in float32, cast to the weight's dtype, times the weight.
    m_even = ((x_even * inv_rms).to(dtype).to(tl.float32) * w_even).to(dtype).to(tl.float32)
    m_odd = ((x_odd * inv_rms).to(dtype).to(tl.float32) * w_odd).to(dtype).to(tl.float32)
    rope_row = rope_ptr + s * (2 * HALF) + 2 * pairs
    cos = tl.load(rope_row)
    sin = tl.load(rope_row + 1)
    out_row = out_ptr + (b.to(tl.int64) * out_seq_len + out_offset + s) * (HEADS * 2 * HALF)
    tl.store(out_row + lanes, (m_even * cos - m_odd * sin).to(dtype), mask=mask)
    tl.store(out_row + lanes + 1, (m_even * sin + m_odd * cos).to(dtype), mask=mask)


def _launch(x: torch.Tensor, weight: torch.Tensor, rope: torch.Tensor, out: torch.Tensor, offset: int, eps: float):
    batch, seq, width = x.shape
    heads, head_dim = out.shape[2], out.shape[3]
    if seq == 0:
        return
    _norm_rope_rows[(batch * seq,)](
        x,
        weight,
        rope,
        out,
        seq,
        out.shape[1],
        offset,
        eps,
        HEADS=heads,
        BLOCK_HEADS=triton.next_power_of_2(heads),
        HALF=head_dim // 2,
    )


@torch.library.custom_op("verl_omni::joint_qk_norm_rope", mutates_args=())
def joint_qk_norm_rope(
    txt: torch.Tensor,
    img: torch.Tensor,
    txt_weight: torch.Tensor,
    img_weight: torch.Tensor,
    txt_rope: torch.Tensor,
    img_rope: torch.Tensor,
    heads: int,
    eps: float,
) -> torch.Tensor:
    """txt [B, S_t, H·D], img [B, S_i, H·D] (projections), weights [D], ropes [S, D/2, 2] float32 (cos, sin)
    -> the joint [B, S_t + S_i, H, D]: each part RMS-normalised with its weight and rotated with its frequencies."""
    batch, seq_txt, width = txt.shape
    out = torch.empty(batch, seq_txt + img.shape[1], heads, width // heads, dtype=txt.dtype, device=txt.device)
    _launch(txt.contiguous(), txt_weight.contiguous(), txt_rope.contiguous(), out, 0, eps)
    _launch(img.contiguous(), img_weight.contiguous(), img_rope.contiguous(), out, seq_txt, eps)
    return out


@joint_qk_norm_rope.register_fake
def _(txt, img, txt_weight, img_weight, txt_rope, img_rope, heads, eps):
    batch, seq_txt, width = txt.shape
    return txt.new_empty(batch, seq_txt + img.shape[1], heads, width // heads)


def kernel_applies(x: torch.Tensor, norm: torch.nn.Module, freqs: torch.Tensor, heads: int) -> bool:
    """Whether ``joint_qk_norm_rope`` computes what the eager path would for this projection ``x``, its RMSNorm
    ``norm`` and its complex ``freqs``: a half-precision tensor with the norm's weight in the same dtype, no bias,
    an even head dim whose half is a power of two, [S, D/2] complex64 frequencies, no gradient needed, and a
    device Triton runs on (CUDA, or the CPU under Triton's interpreter)."""
    if not (x.is_cuda or INTERPRETED):
        return False
    weight = getattr(norm, "weight", None)
    head_dim = x.shape[-1] // heads
    return (
        x.dtype in (torch.bfloat16, torch.float16)
        and weight is not None
        and weight.dtype == x.dtype
        and getattr(norm, "bias", None) is None
        and head_dim % 2 == 0
        and triton.next_power_of_2(head_dim // 2) == head_dim // 2
        and freqs.dim() == 2
        and freqs.shape[-1] == head_dim // 2
        and freqs.dtype == torch.complex64  # float32 (cos, sin), as the eager path multiplies them
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
    )
