"""Rollout throughput of our product through the engine seam (``DiffusionEngine.generate``), log-probs and
latents returned, on one GPU, all paths in one run:

  (a) vllm-omni, 16 concurrent requests of B=1 (max_num_seqs=1: the engine runs them one after another)
  (b) vllm-omni, 1 request of B=16 (``num_outputs_per_prompt=16``: the batched rollout path)
  (c) vllm-omni, 16 concurrent requests of B=1 with engine-side request batching (max_num_seqs=16)
  (d) diffusers engine, 1 call of B=16
  (e) diffusers engine, 16 calls of B=1

Model: the Qwen-Image architecture at full width (3072 wide, 24 heads x 128, joint dim 3584, real-size VAE) with
``--layers`` transformer layers and random bf16 weights written locally (real model: 60 layers). 512x512, n=16
per prompt, 2+ prompts, ``--steps`` steps, no CFG, VAE decode included. Warm-up (engine start, compile, every
batch shape) excluded; each repeat generates n images for every prompt; figures are medians over repeats.

Transformer MFU = analytic FLOPs / wall time / measured bf16 matmul peak, with FLOPs counted as:
per forward per sample, 2 * (12 * L * D^2) * (S_img + S_txt)  [each token passes one stream's qkv/out/MLP linears]
+ L * 4 * (S_img + S_txt)^2 * D  [attention]; times steps (x2 with CFG). Modulation and embedders are ignored.

Run on the device:  python benchmarks/rollout_throughput.py --layers 20 --steps 10 --out docs/benchmarks/x.json
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_common import (  # noqa: E402
    build_model,
    log,
    measured_bf16_peak_tflops,
    model_summary,
    params_billion,
    transformer_flops_per_image,
    write_report,
)

PROMPTS = [
    "A sunlit reading room in an old library: tall oak shelves full of leather books, a brass telescope by the "
    "arched window, dust drifting in warm light beams, a sleeping cat curled on a green velvet armchair, a chalk "
    "board with the words OPEN LATE written neatly in white, and a steaming cup of tea on a small round table.",
    "A rainy night street in a harbour town: neon shop signs reflected in puddles, a red tram turning the corner, "
    "people with umbrellas waiting at a stop, a fish market stall under a striped awning, the sign FRESH CATCH "
    "painted on a wooden board, fog rolling in from the sea and a lighthouse beam sweeping across low clouds.",
]


async def timed_repeats(fn: Callable, prompts: list[str], n: int, repeats: int, seed_base: int) -> dict[str, Any]:
    """fn(prompt, seeds) -> awaitable of a list of RLBatchOutput. One repeat = n images for every prompt."""
    times = []
    checked = None
    for r in range(repeats):
        t0 = time.perf_counter()
        for p, prompt in enumerate(prompts):
            seeds = [seed_base + 1000 * r + 100 * p + i for i in range(n)]
            outs = await fn(prompt, seeds)
            if checked is None:  # what the product returns: per-step log-probs and latents for every image
                got = sum(o.batch_size for o in outs)
                assert got == n, f"expected {n} images, got {got}"
                o = outs[0]
                checked = {
                    "log_probs_shape_per_call": list(o.log_probs.shape),
                    "latents_shape_per_call": list(o.latents.shape),
                    "text_tokens": int(o.prompt_embeds.shape[1]),
                    "negative_text_tokens": (
                        int(o.negative_prompt_embeds.shape[1]) if o.negative_prompt_embeds is not None else None
                    ),
                    "image_tokens": int(o.latents.shape[2]),
                }
        times.append(time.perf_counter() - t0)
    images = n * len(prompts)
    med = statistics.median(times)
    return {
        "repeat_seconds": times,
        "median_seconds": med,
        "images_per_repeat": images,
        "img_per_s": images / med,
        "returned": checked,
    }


def path_fns(engine, params, n: int) -> dict[str, Callable]:
    async def batched(prompt, seeds):
        return [await engine.generate(prompt, seeds, params)]

    async def concurrent_singles(prompt, seeds):
        return list(await asyncio.gather(*(engine.generate(prompt, [s], params) for s in seeds)))

    return {"batched": batched, "singles": concurrent_singles}


async def warm(fn, prompts, n):
    t0 = time.perf_counter()
    await fn(prompts[0], list(range(900000, 900000 + n)))
    return time.perf_counter() - t0


async def profile_one_call(fn, prompt: str, n: int) -> dict[str, Any]:
    """torch.profiler over one batched call (in-process engines only: vllm-omni runs in worker processes).

    Splits device time into GEMMs, attention and the rest, and compares device-busy time with wall time: the
    gap is host work (Python per step, syncs) the GPU waits on."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        await fn(prompt, list(range(700000, 700000 + n)))
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    events = prof.key_averages()

    def self_device_us(e) -> float:
        return float(getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0.0))

    buckets = {"gemm": 0.0, "attention": 0.0, "other": 0.0}
    for e in events:
        key = e.key.lower()
        t = self_device_us(e)
        # attention first: flash kernels carry "cutlass" in their template names
        if any(k in key for k in ("attention", "flash", "fmha", "sdpa")):
            buckets["attention"] += t
        elif any(k in key for k in ("gemm", "matmul", "aten::mm", "addmm", "cutlass", "sm90_xmma", "nvjet")):
            buckets["gemm"] += t
        else:
            buckets["other"] += t
    top = sorted(events, key=self_device_us, reverse=True)[:15]
    table = [{"name": e.key[:90], "self_device_ms": self_device_us(e) / 1e3, "calls": e.count} for e in top]
    log(
        "  profile (top self device time):\n"
        + "\n".join(f"    {r['self_device_ms']:9.1f} ms  {r['calls']:6d}  {r['name']}" for r in table)
    )
    device_s = sum(buckets.values()) / 1e6
    out = {
        "wall_seconds": wall,
        "device_busy_seconds_upper_bound": device_s,
        "device_ms_by_kind": {k: v / 1e3 for k, v in buckets.items()},
        "top": table,
    }
    log(f"  profile: wall {wall:.2f} s, device self time {device_s:.2f} s, by kind (ms) {out['device_ms_by_kind']}")
    return out


async def run_engine_paths(
    name: str, config, paths: dict[str, str], prompts, n, repeats, params, profile: bool = False
) -> dict:
    """Start one engine, warm each path's shape, time the paths, shut it down. paths: label -> 'batched'|'singles'."""
    from verl_omni.rollout.engines import get_engine_class

    model, rollout = config
    t0 = time.perf_counter()
    engine = get_engine_class(name)(model, rollout)
    start_s = time.perf_counter() - t0
    log(
        f"{name} engine up in {start_s:.0f} s "
        f"(max_num_seqs={rollout.max_num_seqs}, enforce_eager={rollout.enforce_eager})"
    )
    fns = path_fns(engine, params, n)
    results = {}
    try:
        for label, kind in paths.items():
            w = await warm(fns[kind], prompts, n)
            w2 = await warm(fns[kind], prompts, n)
            log(f"  ({label}) warm-up {w:.1f} s, {w2:.1f} s")
            batch_sizes = getattr(engine, "take_batch_sizes", None)
            if batch_sizes is not None:
                await batch_sizes()  # drop the warm-up's
            res = await timed_repeats(fns[kind], prompts, n, repeats, seed_base=len(results) * 10000)
            if batch_sizes is not None:  # how the engine grouped the timed requests into pipeline calls
                sizes = await batch_sizes()
                res["pipeline_call_batch_sizes"] = {str(k): sizes.count(k) for k in sorted(set(sizes))}
                log(f"  ({label}) pipeline calls by batch size: {res['pipeline_call_batch_sizes']}")
            res.update(
                engine=name,
                kind=kind,
                warmup_seconds=[w, w2],
                engine_start_seconds=start_s,
                max_num_seqs=rollout.max_num_seqs,
            )
            log(
                f"  ({label}) {res['img_per_s']:.2f} img/s (median of {repeats}: {res['median_seconds']:.2f} s "
                f"for {res['images_per_repeat']} images)"
            )
            if profile and kind == "batched":
                res["profile"] = await profile_one_call(fns[kind], prompts[0], n)
            results[label] = res
    finally:
        await engine.shutdown()
        del engine
        gc.collect()
        import torch

        torch.cuda.empty_cache()
    return results


def versions() -> dict:
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for mod in ("torch", "vllm", "vllm_omni", "diffusers", "transformers", "verl"):
        try:
            m = __import__(mod)
            out[mod] = getattr(m, "__version__", "?")
        except Exception as exc:  # noqa: BLE001
            out[mod] = f"unavailable ({type(exc).__name__})"
    return out


async def main_async(args) -> dict:
    import torch

    from verl_omni.config.base import build
    from verl_omni.config.model import ModelConfig
    from verl_omni.config.rollout import RolloutConfig
    from verl_omni.config.sampling import DiffusionSamplingParams

    wanted = [p.strip() for p in args.paths.split(",") if p.strip()]
    prompts = PROMPTS[: args.prompts]
    n = args.n
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
    peak = measured_bf16_peak_tflops()
    log(f"device {torch.cuda.get_device_name(0)}; measured bf16 matmul peak {peak:.0f} TFLOP/s")
    model_dir = args.model_path or build_model(args.model_dir, args.layers)
    with open(os.path.join(model_dir, "transformer", "config.json")) as f:
        tcfg = json.load(f)

    model_options = json.loads(args.model_options) if args.model_options else {}

    def cfg(**kw):  # (model, rollout) sections; no LoRA: the rollout alone is measured
        model = build(ModelConfig, {"path": model_dir, "lora_rank": 0, **model_options})
        return model, RolloutConfig(device="cuda", dtype="bfloat16", **kw)

    results: dict[str, Any] = {}
    if {"a", "b"} & set(wanted):
        paths = {k: v for k, v in (("b", "batched"), ("a", "singles")) if k in wanted}
        results.update(
            await run_engine_paths(
                "vllm_omni",
                cfg(name="vllm_omni", max_num_seqs=1, enforce_eager=args.eager),
                paths,
                prompts,
                n,
                args.repeats,
                params,
            )
        )
    if "c" in wanted:
        results.update(
            await run_engine_paths(
                "vllm_omni",
                cfg(name="vllm_omni", max_num_seqs=n, enforce_eager=args.eager),
                {"c": "singles"},
                prompts,
                n,
                args.repeats,
                params,
            )
        )
    if {"d", "e"} & set(wanted):
        paths = {k: v for k, v in (("d", "batched"), ("e", "singles")) if k in wanted}
        results.update(
            await run_engine_paths(
                "diffusers", cfg(name="diffusers"), paths, prompts, n, args.repeats, params, profile=args.profile
            )
        )

    image_tokens = (args.size // 16) ** 2
    for label, res in results.items():
        returned = res.get("returned") or {}
        text_tokens = returned.get("text_tokens", args.max_text_tokens)
        flops = transformer_flops_per_image(tcfg, image_tokens, text_tokens, args.steps, 1)
        if args.cfg > 1:  # the unconditional branch, with its own (real) token count
            negative = returned.get("negative_text_tokens") or text_tokens
            flops += transformer_flops_per_image(tcfg, image_tokens, negative, args.steps, 1)
        res["transformer_tflop_per_image"] = flops / 1e12
        res["mfu"] = flops * res["img_per_s"] / (peak * 1e12)

    def ratio(x, y):
        return results[x]["img_per_s"] / results[y]["img_per_s"] if x in results and y in results else None

    ratios = {
        "b_over_d": ratio("b", "d"),
        "b_over_a": ratio("b", "a"),
        "c_over_b": ratio("c", "b"),
        "d_over_e": ratio("d", "e"),
        "b_over_e": ratio("b", "e"),
    }
    targets = {
        "b_over_d >= 1.3": ratios["b_over_d"] is not None and ratios["b_over_d"] >= 1.3,
        "b_over_a >= 1.8": ratios["b_over_a"] is not None and ratios["b_over_a"] >= 1.8,
        "c within 10% of b": ratios["c_over_b"] is not None and ratios["c_over_b"] >= 0.9,
    }
    return {
        "benchmark": "rollout_throughput",
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "device": torch.cuda.get_device_name(0),
        "measured_bf16_peak_tflops": peak,
        "versions": versions(),
        "config": {
            **model_summary(model_dir),
            "transformer_layers": tcfg["num_layers"],
            "real_model_layers": 60,
            "transformer_params_billion": params_billion(os.path.join(model_dir, "transformer")),
            "width": tcfg["num_attention_heads"] * tcfg["attention_head_dim"],
            "resolution": [args.size, args.size],
            "n_per_prompt": n,
            "prompts": len(prompts),
            "steps": args.steps,
            "cfg": False,
            "repeats": args.repeats,
            "dtype": "bfloat16",
            "sampling": params.to_dict(),
            "vllm_omni_enforce_eager": args.eager,
            "image_tokens": image_tokens,
            "note": "all paths go through DiffusionEngine.generate and return images, latents (T+1 steps), "
            "per-step log-probs and prompt embeddings; VAE decode included",
            "engines": {
                "vllm_omni": "our RL pipeline in vllm-omni's diffusion worker: joint attention through vllm-omni's "
                "flash kernel (FA3, fa3-fwd) where there is no text mask, transformer blocks under "
                "vllm-omni's regional torch.compile (dynamic shapes) unless --eager",
                "diffusers": "the same RL pipeline in-process with stock diffusers modules (SDPA attention), eager",
                "both": "no host sync inside the denoising loop (step noise drawn up front), single-frame VAE "
                "decode with 2D convs, one pinned device-to-host copy of the outputs",
            },
        },
        "results": results,
        "ratios": ratios,
        "targets_met": targets,
    }


def add_workload_args(ap: argparse.ArgumentParser) -> None:
    """The model and workload flags both GPU benchmarks take (this one and pipeline_breakdown.py)."""
    ap.add_argument("--layers", type=int, default=20)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-text-tokens", type=int, default=256)
    ap.add_argument("--cfg", type=float, default=1.0, help="true CFG scale (> 1: negative prompt ' ', two branches)")
    ap.add_argument("--model-dir", default="/tmp/verl_omni_models")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_args(ap)
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--paths", default="a,b,c,d,e")
    ap.add_argument("--eager", action="store_true", help="vllm-omni enforce_eager (no torch.compile)")
    ap.add_argument("--profile", action="store_true", help="torch.profiler over one diffusers B=n call (path d)")
    ap.add_argument(
        "--model-path", default=None, help="a pipeline directory of any family (default: the Qwen-Image stand-in)"
    )
    ap.add_argument(
        "--model-options",
        default=None,
        help='the model section\'s family options as JSON, e.g. \'{"wan": {"num_frames": 33}}\'',
    )
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.prompts > len(PROMPTS):
        raise SystemExit(f"--prompts <= {len(PROMPTS)}")
    report = asyncio.run(main_async(args))
    write_report(
        report,
        args.out or os.path.join("docs", "benchmarks", f"rollout_throughput_{time.strftime('%Y%m%d_%H%M%S')}.json"),
    )


if __name__ == "__main__":
    main()
