"""Qwen-Image's q/k preparation for joint attention in one Triton kernel per tensor: RMSNorm over the head dim,
RoPE, and the write into the joint [text, image] sequence, for forwards without a gradient on CUDA.

Why: inductor's kernels for these steps use a small part of HBM bandwidth in the compiled rollout
(``docs/benchmarks/pipeline_breakdown_h200_L60.json``), and a single pass that
reads the projection once and writes the joint buffer once is the least traffic there is. The numbers are those of
diffusers' ``RMSNorm`` followed by ``pipelines/qwen_image/pipeline._rotate`` and ``torch.cat``, rounding for rounding:
``n = bf16(x · rsqrt(mean(x²) + eps))``, ``m = bf16(n · w)``, then the rotation in float32 rounded once; only the
order of the mean's sum differs. One program handles 32 rows of one head's D lanes each, loaded and stored
contiguously; the rotation pairs lanes (2i, 2i+1) by splitting the row in registers.

Even and odd lanes as two strided loads (one program per token) would be slower than inductor's kernels: strided
2-byte loads and stores do not vectorise.

``joint_qk_norm_rope`` is a ``torch.library`` custom op (with a fake implementation), so the engines' regional
``torch.compile`` keeps it as one opaque call. It has no backward: the attention processor uses it only where
nothing needs a gradient. On CPU, tests run the same kernel through Triton's interpreter (``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

# Triton's interpreter (CPU tensors, numpy underneath) is chosen when the kernel is decorated: read it once here.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


# Head rows per program: 32 rows of 128 lanes is 8 KB of bf16 in, 8 KB out, which keeps enough loads in flight.
ROWS_PER_PROGRAM = 32


@triton.jit
def _norm_rope_rows(
    x_ptr,  # [B, S, H * D], tokens x_stride elements apart (a column slice of a wider projection is fine)
    delta_ptr,  # like x: a LoRA's product before its scaling (read only with HAS_DELTA)
    x_stride,
    delta_stride,
    delta_scale,
    w_ptr,  # [D]
    rope_ptr,  # [S, D / 2, 2] float32: (cos, sin) per pair, torch.view_as_real of the complex frequencies
    out_ptr,  # [B, out_seq, H, D] contiguous
    rows,  # B * S * H
    seq_heads,  # S * H: rows of one sample
    out_seq_heads,  # out_seq * H
    out_offset_heads,  # the part's first token in the joint sequence, times H
    heads,
    eps,
    D: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    HAS_DELTA: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)  # [R]
    lanes = tl.arange(0, D)  # [D]
    live = (row < rows)[:, None]
    head_lanes = (row % heads)[:, None] * D + lanes[None, :]  # this row's lanes within its token
    token = row // heads  # over all B * S tokens
    x = tl.load(x_ptr + token[:, None] * x_stride + head_lanes, mask=live, other=0.0).to(tl.float32)
    dtype = out_ptr.dtype.element_ty
    if HAS_DELTA:  # peft's ``result + lora_B(lora_A(x)) * scaling``, each op rounded to the activations' dtype
        delta_offsets = token[:, None] * delta_stride + head_lanes
        delta = (tl.load(delta_ptr + delta_offsets, mask=live, other=0.0).to(tl.float32) * delta_scale).to(dtype)
        x = (x + delta.to(tl.float32)).to(dtype).to(tl.float32)
    inv_rms = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / D + eps)
    w = tl.load(w_ptr + lanes).to(tl.float32)
    # RMSNorm as diffusers rounds it: normalised in float32, cast to the weight's dtype, times the weight.
    m = ((x * inv_rms[:, None]).to(dtype).to(tl.float32) * w[None, :]).to(dtype).to(tl.float32)
    position = (row % seq_heads) // heads  # the token's position in this part: its RoPE row
    rope = tl.load(rope_ptr + position[:, None] * D + lanes[None, :], mask=live, other=0.0)  # (cos, sin) pairs
    cos, sin = tl.split(tl.reshape(rope, (BLOCK_ROWS, D // 2, 2)))
    m_even, m_odd = tl.split(tl.reshape(m, (BLOCK_ROWS, D // 2, 2)))
    rotated = tl.reshape(tl.join(m_even * cos - m_odd * sin, m_even * sin + m_odd * cos), (BLOCK_ROWS, D))
    out_row = (row // seq_heads) * out_seq_heads + out_offset_heads + row % seq_heads
    tl.store(out_ptr + out_row[:, None] * D + lanes[None, :], rotated.to(dtype), mask=live)


def _launch(
    x: tuple[torch.Tensor, int],
    delta: Optional[tuple[torch.Tensor, int]],
    scale: float,
    weight: torch.Tensor,
    rope: torch.Tensor,
    out: torch.Tensor,
    offset: int,
    eps: float,
):
    (x, x_stride), (delta, delta_stride) = x, delta or (None, 0)
    batch, seq, _ = x.shape
    heads, head_dim = out.shape[2], out.shape[3]
    rows = batch * seq * heads
    if rows == 0:
        return
    _norm_rope_rows[(triton.cdiv(rows, ROWS_PER_PROGRAM),)](
        x,
        x if delta is None else delta,
        x_stride,
        delta_stride,
        scale,
        weight,
        rope,
        out,
        rows,
        seq * heads,
        out.shape[1] * heads,
        offset * heads,
        heads,
        eps,
        D=head_dim,
        BLOCK_ROWS=ROWS_PER_PROGRAM,
        HAS_DELTA=delta is not None,
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
    txt_delta: Optional[torch.Tensor] = None,
    img_delta: Optional[torch.Tensor] = None,
    txt_scale: float = 1.0,
    img_scale: float = 1.0,
) -> torch.Tensor:
    """txt [B, S_t, H·D], img [B, S_i, H·D] (projections), weights [D], ropes [S, D/2, 2] float32 (cos, sin)
    -> the joint [B, S_t + S_i, H, D]: each part RMS-normalised with its weight and rotated with its frequencies.
    ``*_delta`` (like the projection, optional): a LoRA's ``lora_B(lora_A(x))``, added times ``*_scale`` first, as
    peft adds it (see :func:`verl_omni.models.lora.lora_parts`): the sum is never written to memory."""
    batch, seq_txt, width = txt.shape
    out = torch.empty(batch, seq_txt + img.shape[1], heads, width // heads, dtype=txt.dtype, device=txt.device)
    parts = (
        (txt, txt_delta, txt_scale, txt_weight, txt_rope, 0),
        (img, img_delta, img_scale, img_weight, img_rope, seq_txt),
    )
    for x, delta, scale, weight, rope, offset in parts:
        delta = None if delta is None else _token_rows(delta)
        _launch(_token_rows(x), delta, scale, weight.contiguous(), rope.contiguous(), out, offset, eps)
    return out


def _token_rows(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``x`` [B, S, W] as the kernel reads it, with its token stride: each token's W lanes contiguous and tokens one
    stride apart across the batch too. A column slice of a wider projection (``models.lora.fused_projections``)
    already is laid out so: no copy."""
    if x.is_contiguous():
        return x, x.shape[2]
    if x.stride(2) == 1 and x.stride(0) == x.shape[1] * x.stride(1):
        return x, x.stride(1)
    return x.contiguous(), x.shape[2]


@joint_qk_norm_rope.register_fake
def _(
    txt,
    img,
    txt_weight,
    img_weight,
    txt_rope,
    img_rope,
    heads,
    eps,
    txt_delta=None,
    img_delta=None,
    txt_scale=1.0,
    img_scale=1.0,
):
    batch, seq_txt, width = txt.shape
    return txt.new_empty(batch, seq_txt + img.shape[1], heads, width // heads)


def kernel_applies(x: torch.Tensor, norm: torch.nn.Module, freqs: torch.Tensor, heads: int) -> bool:
    """Whether ``joint_qk_norm_rope`` computes what the eager path would for this projection ``x``, its RMSNorm
    ``norm`` and its complex ``freqs``: a half-precision tensor with the norm's weight in the same dtype, no bias,
    a power-of-two head dim, [S, D/2] complex64 frequencies, no gradient needed, and a
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
        and head_dim >= 2
        and triton.next_power_of_2(head_dim) == head_dim
        and freqs.dim() == 2
        and freqs.shape[-1] == head_dim // 2
        and freqs.dtype == torch.complex64  # float32 (cos, sin), as the eager path multiplies them
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
    )
