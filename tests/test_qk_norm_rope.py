"""The Triton q/k kernel (models/qk_norm_rope.py) on CPU through Triton's interpreter, in a process of its own
(tests/qk_kernel_interpreted.py; the interpreter must be chosen before the kernel is decorated).

Asserted: float16 results equal the eager RMSNorm + RoPE + cat to within one rounding of the largest value (the
mean's sum order is the only difference); bfloat16 within the interpreter's truncating casts (CUDA rounds to
nearest; tests/gpu/test_qk_norm_rope_gpu.py checks bfloat16 there); the custom op traces under torch.compile with
dynamic shapes; the kernel is refused where it would not compute the eager numbers (a gradient needed, float32,
an odd head dim); a tiny Qwen-Image forward in float16 calls it for q and k of every block and moves by less
than 1% of its largest output, with and without a LoRA, and adding the q/k LoRA's product inside the kernel
(``lora_in_kernel``) gives exactly the numbers of peft's own addition."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")
HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def report(tiny_qwen_image_dir):
    env = dict(os.environ, TRITON_INTERPRET="1")
    run = subprocess.run(
        [sys.executable, os.path.join(HERE, "qk_kernel_interpreted.py"), tiny_qwen_image_dir],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("dtype, ulps", [("float16", 2**-10), ("bfloat16", 2**-6)])
def test_kernel_matches_eager(report, dtype, ulps):
    figures = report[dtype]
    assert figures["shape_ok"]
    assert figures["max_abs_diff"] <= ulps * figures["max_abs_ref"]
    assert figures["compiled_equal"]
    if dtype == "float16":  # both round to nearest: only the mean's sum order differs
        assert figures["differing_fraction"] < 0.01


def test_kernel_refused_where_it_would_differ(report):
    for dtype in ("float16", "bfloat16"):
        figures = report[dtype]
        assert figures["applies_without_grad"]
        assert not figures["applies_with_grad"]
        assert not figures["applies_float32"]
        assert not figures["applies_odd_head_dim"]


@pytest.mark.parametrize("model", ["pipeline_float16", "pipeline_float16_lora"])
def test_transformer_forward_uses_the_kernel(report, model):
    figures = report[model]
    assert figures["kernel_calls_off"] == 0
    assert figures["kernel_calls_on"] == figures["kernel_calls_lora_in_kernel"] == 2 * figures["blocks"]
    assert figures["forward_max_abs_diff"] <= 0.01 * figures["forward_max_abs"]


def test_lora_added_inside_the_kernel_as_peft_adds_it(report):
    """The kernel rounds the adapter's scaled product and the sum as peft's two operations do: the same numbers."""
    assert report["pipeline_float16_lora"]["splits_to_q_to_k_add_q_proj"] == [True, True, False]  # no LoRA there
    assert report["pipeline_float16"]["splits_to_q_to_k_add_q_proj"] == [False, False, False]
    assert report["pipeline_float16_lora"]["lora_in_kernel_max_abs_diff"] == 0.0
    assert report["pipeline_float16"]["lora_in_kernel_max_abs_diff"] == 0.0  # no adapter: nothing to add


@pytest.mark.parametrize("model", ["pipeline_float16", "pipeline_float16_lora"])
def test_kernel_reads_fused_projections_in_place(report, model):
    """With ``fuse_projections`` the kernel gets q and k as column slices of one stacked matmul (a token stride
    wider than the row): it reads them where they lie (a wrong stride would scramble heads, far beyond rounding)."""
    figures = report[model]
    assert figures["kernel_calls_fused"] == [2 * figures["blocks"]] * 2
    assert figures["fused_max_abs_diff"] <= 0.01 * figures["forward_max_abs"]
    assert figures["fused_lora_in_kernel_max_abs_diff"] <= 0.01 * figures["forward_max_abs"]
    assert figures["fused_without_kernel_max_abs_diff"] <= 0.01 * figures["forward_max_abs"]  # PyTorch's q/k path
