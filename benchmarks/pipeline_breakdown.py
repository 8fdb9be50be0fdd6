"""Where the time of one batched rollout call goes, in-process on one GPU (a profile per phase).

Loads the RL pipeline (Qwen-Image architecture at full width, ``--layers`` layers, random bf16 weights: the model
``rollout_throughput.py`` builds) and times ``rl_generate`` with B=n for the ways the engines can run it:

  eager_sdpa      diffusers as is (what the diffusers engine runs: path (d) of rollout_throughput)
  eager_flash     + the fused attention processor with vllm-omni's flash kernel (FA3)
  compiled_sdpa   vllm-omni's regional torch.compile of the transformer blocks (dynamic=True), stock attention
  compiled_flash  both (what the vllm-omni engine runs: path (b), without the engine's process hops)
  compiledauto_flash / compiledstatic_flash
                  the same with torch.compile(dynamic=None) (dynamo's automatic dynamic) / dynamic=False
  <any>_flash_swapped
                  the fused processor with its "swapped" RoPE form (the same numbers, one elementwise expression)
  <any>_epilogue  (after the RoPE form, if any) the FFN's tanh GELU in the GEMM's cuBLASLt epilogue
                  (verl_omni/models/gelu_epilogue.py); variants without it put diffusers' GELU back
  <any>_flash[...]_qkkernel
                  q/k RMSNorm + RoPE + the joint cat in one Triton kernel (verl_omni/models/qk_norm_rope.py)
  <any>_flash[...]_qkkernel_lorain
                  the same kernel also adds the q/k LoRA's product, which then never goes through memory as a sum
  <any>_flash[...]_fusedqkv
                  each stream's q, k, v (and their LoRA's lora_A) as one matmul over stacked weights
                  (verl_omni/models/lora.fused_projections): the stream's input is read once
  <any>_flash[...]_outall
                  to_out over every row of the joint attention output (text rows dropped after), so the image rows
                  are not copied out first
  compiled*[...]_multikernel
                  inductor's multi-kernel reductions (triton.multi_kernel=1): persistent variants up to 16x the usual
                  row length (LayerNorm over 3072 lanes in one pass over its inputs), picked against the looped ones
                  by timing them
  compiled*[...]_tuned
                  inductor's coordinate-descent tuning of its generated kernels' launch configs (block sizes,
                  warps) for that variant's compile: longer compile, maybe faster norms and elementwise kernels
  compiled*[...]_autotune
                  inductor's max-autotune (what mode="max-autotune-no-cudagraphs" sets: GEMMs benchmarked against
                  Triton templates that can fuse their neighbours, plus the coordinate-descent tuning)

and splits a call into prompt encoding, denoising and VAE decode, plus a kernel profile of the last variant
(GEMM / attention / other device time vs wall time, and the largest stretches where the GPU idled, with the host
ops running then). ``--cfg 4 --lora-rank 64`` is the OCR recipe's rollout (true
CFG with the negative prompt " ", LoRA r64 on to_q/k/v/out as the hybrid engine serves it); MFU counts the real
token counts of both branches. Also checks that the fused processor computes
what diffusers computes (same seeds: relative L2 of the final latents, image difference).

Run on the device (vllm-omni bundle installed):  python benchmarks/pipeline_breakdown.py --out $OUT/breakdown.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import NamedTuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_common import (  # noqa: E402
    build_model,
    log,
    measured_bf16_peak_tflops,
    model_summary,
    transformer_flops_per_image,
)
from rollout_throughput import PROMPTS, add_workload_args, versions  # noqa: E402

# torch.compile's ``dynamic`` per variant prefix: vllm-omni's engine compiles with dynamic=True (every dim symbolic);
# None is dynamo's default (static first, then only the dims seen to change become symbolic); False: one graph per
# shape.
COMPILE_DYNAMIC = {"compiled": True, "compiledauto": None, "compiledstatic": False}


# After the RoPE form: "epilogue", the FFN's GELU in its GEMM's epilogue (models/gelu_epilogue.py; diffusers' GELU
# when absent); "qkkernel", q/k RMSNorm + RoPE + the joint cat in one Triton kernel (models/qk_norm_rope.py);
# "lorain", that kernel adds the q/k LoRA's product too (with qkkernel); "tuned", inductor's coordinate-descent
# tuning; "autotune", its max-autotune (compiled variants only); "fusedqkv", each stream's q/k/v projections as one
# matmul (models/lora.fused_projections); "outall", to_out over the whole joint attention output; "multikernel",
# inductor's multi-kernel reductions (compiled variants only)
VARIANT_OPTIONS = ("epilogue", "qkkernel", "lorain", "tuned", "autotune", "fusedqkv", "outall", "multikernel")


class Variant(NamedTuple):
    name: str
    compile: str  # "eager" or a key of COMPILE_DYNAMIC
    attention: str  # "sdpa" | "flash"
    rope: str  # a key of qwen_image.ROPE_FORMS
    epilogue: bool  # the flags below follow VARIANT_OPTIONS' order (parse_variant fills them positionally)
    qk_kernel: bool
    lora_in_kernel: bool
    tuned: bool
    autotune: bool
    fused_qkv: bool
    out_all: bool
    multi_kernel: bool


def parse_variant(variant: str) -> Variant:
    """``<compile>_<attention>[_<rope>][_<option>...]`` (options: ``VARIANT_OPTIONS``) -> :class:`Variant`, or
    exit naming what is allowed."""
    from verl_omni.pipelines.qwen_image.pipeline import ROPE_FORMS

    parts = variant.split("_")
    compiled, attention, options = parts[0], parts[1] if len(parts) > 1 else "", parts[2:]
    allowed = ["eager", *COMPILE_DYNAMIC]
    if compiled not in allowed or attention not in ("sdpa", "flash"):
        raise SystemExit(f"--variants {variant!r}: <compile>_<attention>, compile in {allowed}, attention sdpa|flash")
    flags = [name in options for name in VARIANT_OPTIONS]
    epilogue, qk_kernel, lora_in_kernel, tuned, autotune, fused_qkv, out_all, multi_kernel = flags
    ropes = [o for o in options if o not in VARIANT_OPTIONS]
    flash_only = ropes or qk_kernel or fused_qkv or out_all
    if (
        len(ropes) > 1
        or any(r not in ROPE_FORMS for r in ropes)
        or (flash_only and attention != "flash")
        or ((tuned or autotune or multi_kernel) and compiled == "eager")
        or (lora_in_kernel and not qk_kernel)
    ):
        raise SystemExit(
            f"--variants {variant!r}: options {sorted(ROPE_FORMS)} (one), qkkernel, fusedqkv and outall only after "
            f"_flash, lorain only with qkkernel, tuned, autotune and multikernel only when compiled; {VARIANT_OPTIONS}"
        )
    rope = ropes[0] if ropes else "pairs"
    return Variant(variant, compiled, attention, rope, *flags)


def _sync():
    import torch

    torch.cuda.synchronize()


def timed(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        _sync()
        t0 = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - t0)
    return times


def profile_call(fn) -> dict:
    from torch.profiler import ProfilerActivity, profile

    _sync()
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        _sync()
    wall = time.perf_counter() - t0
    events = prof.key_averages()

    def dev_us(e) -> float:
        return float(getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0.0))

    # Kernel records only: inductor also records each Triton launch as a CPU op named like its kernel, whose
    # device time would count that kernel twice.
    kernels = [e for e in events if "CUDA" in str(getattr(e, "device_type", "")) and dev_us(e) > 0]
    buckets = {"gemm": 0.0, "attention": 0.0, "conv": 0.0, "other": 0.0}
    for e in kernels:
        key = e.key.lower()
        t = dev_us(e)
        if any(k in key for k in ("flash", "fmha", "attention", "fwd_kernel")):
            buckets["attention"] += t
        elif any(k in key for k in ("fprop", "conv", "implicit_gemm", "dgrad", "wgrad")):
            buckets["conv"] += t
        elif any(k in key for k in ("gemm", "nvjet", "cutlass", "sm90_xmma", "matmul")):
            buckets["gemm"] += t
        else:
            buckets["other"] += t
    top = sorted(kernels, key=dev_us, reverse=True)[:20]
    table = [{"name": e.key[:100], "device_ms": dev_us(e) / 1e3, "calls": e.count} for e in top]
    busy = sum(buckets.values()) / 1e6
    try:  # diagnostics only: never lose the figures above to them
        gaps = idle_gaps(prof.events())
    except Exception as e:  # noqa: BLE001
        gaps = {"error": f"{type(e).__name__}: {e}"}
    return {
        "wall_seconds": wall,
        "device_busy_seconds": busy,
        "device_ms_by_kind": {k: v / 1e3 for k, v in buckets.items()},
        "top_kernels": table,
        "idle": gaps,
    }


# Idle stretches by length (µs): launch-bound gaps between kernels are short; a host sync, host work or a copy
# waiting on the host shows up as a long one.
GAP_CLASSES = ((0.0, 20.0), (20.0, 200.0), (200.0, 2000.0), (2000.0, float("inf")))


def idle_gaps(events, top: int = 10) -> dict:
    """Where the GPU idled between its first and last kernel of the profiled call: the total, the gaps by length
    class, and the ``top`` longest gaps, each with the innermost host ops running at its midpoint."""
    kernels, host = [], []
    for e in events:
        kind = str(getattr(e, "device_type", ""))
        (kernels if "CUDA" in kind else host if "CPU" in kind else []).append(e)
    spans = sorted((e.time_range.start, e.time_range.end) for e in kernels if e.time_range.end > e.time_range.start)
    if not spans:
        return {}
    gaps, end = [], spans[0][1]
    for start, stop in spans[1:]:
        if start > end:
            gaps.append((end, start))
        end = max(end, stop)
    classes = {}
    for lo, hi in GAP_CLASSES:
        inside = [b - a for a, b in gaps if lo <= b - a < hi]
        classes[f"{lo:g}-{hi:g}us"] = {"count": len(inside), "ms": sum(inside) / 1e3}
    longest = []
    for a, b in sorted(gaps, key=lambda g: g[1] - g[0], reverse=True)[:top]:
        mid = (a + b) / 2
        running = sorted(
            (h for h in host if h.time_range.start <= mid <= h.time_range.end),
            key=lambda h: h.time_range.end - h.time_range.start,
        )
        longest.append(
            {"at_ms": (a - spans[0][0]) / 1e3, "ms": (b - a) / 1e3, "host_ops": [h.name[:80] for h in running[:4]]}
        )
    return {
        "kernel_span_seconds": (end - spans[0][0]) / 1e6,
        "idle_seconds": sum(b - a for a, b in gaps) / 1e6,
        "gaps_by_length": classes,
        "longest": longest,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_args(ap)
    ap.add_argument("--variants", default="eager_sdpa,compiled_sdpa,compiled_flash")
    ap.add_argument("--lora-rank", type=int, default=0, help="LoRA rank on to_q/k/v/out (0: none; the recipe: 64)")
    ap.add_argument("--out", default="breakdown.json")
    args = ap.parse_args()

    import torch
    from diffusers.models.transformers.transformer_qwenimage import QwenDoubleStreamAttnProcessor2_0
    from vllm_omni.diffusion.compile import regionally_compile

    from verl_omni.config.sampling import DiffusionSamplingParams
    from verl_omni.models.gelu_epilogue import use_gelu_epilogue, use_plain_gelu
    from verl_omni.models.lora import LoRASpec
    from verl_omni.pipelines.loading import load_rl_pipeline
    from verl_omni.rollout.engines.vllm_omni.worker import resolve_flash_attention

    variants = [parse_variant(v.strip()) for v in args.variants.split(",") if v.strip()]  # before any loading
    peak = measured_bf16_peak_tflops()
    log(f"device {torch.cuda.get_device_name(0)}; bf16 matmul peak {peak:.0f} TFLOP/s")
    model_dir = build_model(args.model_dir, args.layers)
    # as the engines load it: frozen bf16 transformer, the adapter's weights in float32
    lora = LoRASpec(rank=args.lora_rank, alpha=2.0 * args.lora_rank) if args.lora_rank else None
    pipe = load_rl_pipeline(model_dir, "qwen_image", torch.bfloat16, lora).to("cuda")
    tcfg = dict(pipe.transformer.config)
    params = DiffusionSamplingParams(
        num_inference_steps=args.steps,
        height=args.size,
        width=args.size,
        max_sequence_length=args.max_text_tokens,
        noise_level=0.7,
        sde_type="sde",
        sde_window_size=0,
        return_trajectory=True,
        guidance_scale=args.cfg,
        negative_prompt=" " if args.cfg > 1 else None,
    )
    prompt = PROMPTS[0]
    seeds = list(range(args.n))
    flash = resolve_flash_attention()
    log(f"flash attention: {getattr(flash, '__module__', None)}")

    def set_attention(v: Variant) -> None:
        if v.attention == "flash":
            pipe.use_attention_function(
                flash,
                rope=v.rope,
                qk_kernel=v.qk_kernel,
                lora_in_kernel=v.lora_in_kernel,
                fuse_projections=v.fused_qkv,
                project_joint_output=v.out_all,
            )
        else:
            for block in pipe.transformer.transformer_blocks:
                block.attn.set_processor(QwenDoubleStreamAttnProcessor2_0())

    def set_gelu(epilogue: bool) -> None:
        use_plain_gelu(pipe.transformer)
        if epilogue:
            log(f"GELU epilogue on {use_gelu_epilogue(pipe.transformer)} feed-forwards")

    fx_graph_cache = torch._inductor.config.fx_graph_cache

    def set_compiled(kind: str, tuned: bool, autotune: bool, multi_kernel: bool) -> None:
        for block in pipe.transformer.transformer_blocks:
            block.__dict__.pop("forward", None)  # drop a compiled forward: the class's eager one is back
        torch._dynamo.reset()
        # read when inductor compiles, i.e. in this variant's first call
        torch._inductor.config.coordinate_descent_tuning = tuned or autotune
        torch._inductor.config.max_autotune = autotune
        torch._inductor.config.triton.multi_kernel = int(multi_kernel)
        # a multi-kernel graph loaded from the FX graph cache fails with torch 2.11 (the engine's worker.py says why)
        torch._inductor.config.fx_graph_cache = fx_graph_cache and not multi_kernel
        if kind != "eager":
            regionally_compile(pipe.transformer, dynamic=COMPILE_DYNAMIC[kind])

    call = lambda: pipe.rl_generate(prompt, seeds, params)  # noqa: E731
    image_tokens = (args.size // 16) ** 2
    text_tokens = int(pipe.encode_prompt_for_rl(prompt, args.max_text_tokens).embeds.shape[1])
    flops = transformer_flops_per_image(tcfg, image_tokens, text_tokens, args.steps, 1)
    negative_tokens = None
    if args.cfg > 1:  # the unconditional branch, with its own (real) token count
        negative_tokens = int(pipe.encode_prompt_for_rl(" ", args.max_text_tokens).embeds.shape[1])
        flops += transformer_flops_per_image(tcfg, image_tokens, negative_tokens, args.steps, 1)
    log(f"text tokens {text_tokens}, negative {negative_tokens}; {flops / 1e12:.1f} TFLOP per image")

    # stages of one call (eager, stock): prompt encoding, VAE decode; denoising = the rest
    enc = timed(lambda: pipe.encode_prompt_for_rl(prompt, args.max_text_tokens), 3)
    lat = torch.randn(args.n, image_tokens, tcfg["in_channels"], device="cuda")
    dec = timed(lambda: pipe.decode_latents(lat, args.size, args.size), 3)
    stages = {"encode_prompt_s": statistics.median(enc), "vae_decode_s": statistics.median(dec)}
    log(
        f"stages: encode {stages['encode_prompt_s'] * 1e3:.0f} ms, "
        f"VAE decode B={args.n} {stages['vae_decode_s'] * 1e3:.0f} ms"
    )

    results, reference = {}, {}
    for v in variants:
        variant = v.name
        if v.attention == "flash" and flash is None:
            log(f"{variant}: skipped (no flash attention)")
            continue
        set_attention(v)
        set_gelu(v.epilogue)
        set_compiled(v.compile, v.tuned, v.autotune, v.multi_kernel)
        t0 = time.perf_counter()
        out = call()
        first = time.perf_counter() - t0
        call()
        times = timed(call, args.repeats)
        med = statistics.median(times)
        res = {
            "seconds_per_call": times,
            "median_s": med,
            "first_call_s": first,
            "img_per_s": args.n / med,
            "mfu": flops * args.n / med / (peak * 1e12),
            "denoise_s_estimate": med - stages["encode_prompt_s"] - stages["vae_decode_s"],
        }
        res["transformer_mfu_denoise_only"] = flops * args.n / res["denoise_s_estimate"] / (peak * 1e12)
        if not reference:
            reference = {"latents": out.latents[:, -1].float(), "images": out.images.float(), "variant": variant}
        else:
            ref = reference["latents"]
            res["vs_" + reference["variant"]] = {
                "final_latents_rel_l2": float((out.latents[:, -1].float() - ref).norm() / ref.norm()),
                "image_mean_abs_diff": float((out.images.float() - reference["images"]).abs().mean()),
                "log_probs_finite": bool(torch.isfinite(out.log_probs).all()),
            }
        log(
            f"{variant}: {res['img_per_s']:.2f} img/s ({med:.3f} s per B={args.n} call, first {first:.1f} s), "
            f"MFU {res['mfu'] * 100:.1f}% (denoise only {res['transformer_mfu_denoise_only'] * 100:.1f}%) "
            f"{res.get('vs_' + reference['variant'], '')}"
        )
        results[variant] = res

    last = list(results)[-1]  # the variant still installed
    prof = profile_call(call)
    log(
        f"profile of {last}: wall {prof['wall_seconds']:.3f} s, device busy {prof['device_busy_seconds']:.3f} s, "
        f"by kind (ms) { {k: round(v) for k, v in prof['device_ms_by_kind'].items()} }"
    )
    for row in prof["top_kernels"]:
        log(f"    {row['device_ms']:8.1f} ms {row['calls']:6d}  {row['name']}")
    idle = prof["idle"]
    if "idle_seconds" in idle:
        span, by_length = idle["kernel_span_seconds"], idle["gaps_by_length"]
        log(f"idle {idle['idle_seconds']:.3f} s of a {span:.3f} s kernel span; {by_length}")
        for gap in idle["longest"]:
            log(f"    gap {gap['ms']:8.2f} ms at {gap['at_ms']:9.1f} ms: {gap['host_ops']}")
    else:
        log(f"idle: {idle}")
    report = {
        "benchmark": "pipeline_breakdown",
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "device": torch.cuda.get_device_name(0),
        "measured_bf16_peak_tflops": peak,
        "versions": versions(),
        "config": {
            **model_summary(model_dir),
            "layers": tcfg["num_layers"],
            "n": args.n,
            "steps": args.steps,
            "size": args.size,
            "text_tokens": text_tokens,
            "negative_text_tokens": negative_tokens,
            "cfg": args.cfg,
            "lora_rank": args.lora_rank,
            "transformer_tflop_per_image": flops / 1e12,
        },
        "stages_eager": stages,
        "variants": results,
        "profile_variant": last,
        "profile": prof,
    }
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
