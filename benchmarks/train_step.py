"""The actor's LoRA update at the real width: seconds per update, transitions/s, MFU and peak memory,
for several actor settings side by side in one run, on one GPU.

Workload (the OCR recipe's): Qwen-Image at full width (3072 wide, 24 heads x 128, joint dim 3584) with ``--layers``
layers and random bf16 weights, 512x512 (1024 image tokens), true CFG 4 with the negative prompt " ", ``--prompts``
prompts x n=16 rows, 10 steps with an SDE window of 2 -> prompts x 32 transitions, LoRA r64 on to_q/k/v/out.
The rollout batch is built once, on the GPU, with the real shapes (latents, timesteps and sigmas of the real
schedule, prompt embeddings of ``--prompt-tokens`` / ``--negative-tokens`` real tokens); its values are random, old
log-probs 0 and advantages random: ratios far from 1 change the gradient's values, not the work per update.

MFU = useful FLOPs / seconds / the measured bf16 matmul peak. Useful FLOPs per update: for every transition, both
CFG branches, forward + the activation-gradient backward (about one forward again: the frozen weights need no weight
gradient), from the real token counts (padding tokens of the batched CFG branches and the recomputation of
gradient checkpointing are not counted):
    2 x sum over branches of [ 2 * 12 * L * D^2 * S + 4 * L * S^2 * D ],  S = image tokens + that branch's text tokens.

Variants (``--variants``, comma separated; each: a name from VARIANTS): the actor's knobs
``actor.batch_cfg``, ``actor.use_torch_compile``, ``model.enable_gradient_checkpointing``,
``actor.ppo_micro_batch_size_per_gpu``, ``model.gradient_checkpointing_blocks`` and the LoRA matmuls' dtype.
A variant that runs out of memory is recorded as such and the run goes on.

Run on the device:  python benchmarks/train_step.py --layers 60 --out docs/benchmarks/train_step_h100_L60.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_common import (  # noqa: E402
    build_model,
    log,
    measured_bf16_peak_tflops,
    model_summary,
    transformer_flops_per_image,
    write_report,
)

# name -> (batch_cfg, torch.compile, gradient checkpointing, micro-batch rows, share of the blocks recomputed
# (model.gradient_checkpointing_blocks = round(share x layers); 1.0 = all; "auto" = auto), LoRA matmuls in the
# activations' dtype (False: peft's default, every activation cast to the float32 adapter's dtype)).
# The first is the actor at commit c902450 (two CFG forwards, eager, no checkpointing, micro-batch 1) as far as the
# knobs go; "default" is the default configuration on a GPU.
VARIANTS = {
    "c902450_like": (False, False, False, 1, 1.0, False),
    "batch_cfg_mb1": (True, False, False, 1, 1.0, True),
    "ckpt_mb1_two_forwards": (False, False, True, 1, 1.0, True),
    "ckpt_mb4_eager": (True, False, True, 4, 1.0, True),
    "ckpt_mb4_eager_lora_f32": (True, False, True, 4, 1.0, False),
    # the actor's GPU defaults: gradient_checkpointing_blocks=auto (as few recomputed as the free memory allows,
    # measured in the warm-up update) at micro-batch 4
    "default": (True, True, True, 4, "auto", True),
    "ckpt_all_mb4": (True, True, True, 4, 1.0, True),  # the default before auto: every block recomputed
    "auto_mb2": (True, True, True, 2, "auto", True),
    "compiled_ckpt75_mb4": (True, True, True, 4, 0.75, True),
    "compiled_ckpt50_mb4": (True, True, True, 4, 0.5, True),
    "compiled_ckpt_mb8": (True, True, True, 8, 1.0, True),
    "compiled_ckpt_mb2": (True, True, True, 2, 1.0, True),
    # CFG as two unmasked forwards (SDPA's flash kernel) instead of one masked one (what actor.batch_cfg=auto picks
    # on a GPU)
    "two_forwards": (False, True, True, 4, 1.0, True),
    "two_forwards_ckpt75": (False, True, True, 4, 0.75, True),
    "two_forwards_ckpt50": (False, True, True, 4, 0.5, True),
    # Smaller micro-batches that keep every block's activations (no recomputation at all): the activations of a
    # block scale with the rows, so micro-batch 2 without checkpointing holds about what micro-batch 4 with half of
    # the blocks recomputed does
    "nockpt_mb1": (True, True, False, 1, 0.0, True),
    "nockpt_mb2": (True, True, False, 2, 0.0, True),
    "ckpt25_mb2": (True, True, True, 2, 0.25, True),
    "nockpt_mb2_two_forwards": (False, True, False, 2, 0.0, True),
}
KNOBS = (
    "batch_cfg",
    "compiled",
    "gradient_checkpointing",
    "micro_batch",
    "recomputed_share",
    "lora_in_activation_dtype",
)


def _synthetic_batch(args, tcfg: dict, scheduler_config: dict, device: str):
    """A TrainBatch with the recipe's real shapes on ``device`` (built once)."""
    import torch

    from verl_omni.schedulers.flow_match_sde import flow_match_sigmas
    from verl_omni.workers.train_batch import TrainBatch

    g = torch.Generator().manual_seed(0)
    rows, steps = args.prompts * args.n, args.steps
    image_tokens = (args.size // 16) ** 2
    channels = tcfg["in_channels"]
    base = torch.linspace(1.0, 1 / steps, steps).tolist()
    sigmas, timesteps = flow_match_sigmas(scheduler_config, steps, image_tokens, base_sigmas=base)
    window = torch.zeros(rows, steps, dtype=torch.bool)
    latent_steps = torch.zeros(rows, args.window + 1, dtype=torch.int64)
    for p in range(args.prompts):  # one window of 2 per prompt group, starts in [0, 5] as the recipe
        start = int(torch.randint(0, 6, (1,), generator=g))
        window[p * args.n : (p + 1) * args.n, start : start + args.window] = True
        latent_steps[p * args.n : (p + 1) * args.n] = torch.arange(start, start + args.window + 1)
    dim = tcfg["joint_attention_dim"]
    tensors = {
        # what the rollout keeps (trajectory_window_only): the window's W+1 latents and their positions
        "latents": torch.randn(rows, args.window + 1, image_tokens, channels, generator=g),
        "latent_steps": latent_steps,
        "timesteps": (timesteps / 1000).expand(rows, steps).clone(),
        "sigmas": sigmas.expand(rows, steps + 1).clone(),
        "old_log_probs": torch.zeros(rows, steps),
        "window_mask": window,
        "advantages": torch.randn(rows, generator=g),
        "prompt_embeds": torch.randn(rows, args.prompt_tokens, dim, generator=g).to(torch.bfloat16),
        "prompt_embeds_mask": torch.ones(rows, args.prompt_tokens, dtype=torch.long),
        "negative_prompt_embeds": torch.randn(rows, args.negative_tokens, dim, generator=g).to(torch.bfloat16),
        "negative_prompt_embeds_mask": torch.ones(rows, args.negative_tokens, dtype=torch.long),
    }
    return TrainBatch(tensors, args.size, args.size).to(device)


def _configs(args, model_dir: str, variant: tuple):
    from verl_omni.config.actor import ActorConfig, OptimConfig
    from verl_omni.config.base import build
    from verl_omni.config.model import ModelConfig
    from verl_omni.config.rollout import RolloutConfig

    batch_cfg, compiled, checkpointing, micro_batch, share = variant[:5]
    model = ModelConfig(
        path=model_dir,
        lora_rank=64,
        lora_alpha=128.0,
        enable_gradient_checkpointing=checkpointing,
        gradient_checkpointing_blocks=share if share == "auto" else round(share * args.layers),
    )
    actor = ActorConfig(
        device="cuda",
        dtype="bfloat16",
        optim=OptimConfig(lr=3e-4),
        clip_ratio=1e-4,
        ppo_micro_batch_size_per_gpu=micro_batch,
        batch_cfg=batch_cfg,
        use_torch_compile=compiled,
    )
    rollout = build(
        RolloutConfig,
        {
            "device": "cuda",
            "dtype": "bfloat16",
            "n": args.n,
            "algo": {"noise_level": 1.2, "sde_window_size": args.window, "sde_window_range": [0, 5]},
            "pipeline": {
                "true_cfg_scale": 4.0,
                "negative_prompt": " ",
                "num_inference_steps": args.steps,
                "height": args.size,
                "width": args.size,
                "max_sequence_length": 256,
            },
        },
    )
    return model, actor, rollout


def run_variant(name: str, args, pipe, batch, model_dir: str, useful_flops: float, peak: float) -> dict[str, Any]:
    import torch

    from verl_omni.models.lora import compute_lora_in_activation_dtype
    from verl_omni.workers.actor import DiffusionLoRAActor

    variant = VARIANTS[name]
    model, actor_cfg, rollout = _configs(args, model_dir, variant)
    compute_lora_in_activation_dtype(pipe.transformer, enabled=variant[5])
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    actor = DiffusionLoRAActor(model, actor_cfg, rollout, pipe=pipe, device="cuda", lora_seed=0)
    times, recomputed, gc_seconds, sm_clock = [], [], [], []
    try:
        for i in range(1 + args.repeats):  # the first update warms up (compile, cuBLAS plans, allocator)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            metrics = actor.update_batch(batch)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            recomputed.append(metrics["actor/recomputed_blocks"])
            gc_seconds.append(metrics["actor/gc_s"])
            sm_clock.append(metrics["actor/sm_clock_mhz"])
            log(
                f"  {name}: update {i} {times[-1]:.2f} s, {recomputed[-1]} blocks recomputed "
                f"(ratio_mean {metrics['actor/ratio_mean']:.4f})"
            )
    except torch.OutOfMemoryError as exc:
        log(f"  {name}: out of memory ({str(exc).splitlines()[0][:120]})")
        return {
            "error": "out of memory",
            "peak_mem_gb": torch.cuda.max_memory_allocated() / 1e9,
            "knobs": dict(zip(KNOBS, variant, strict=True)),
        }
    finally:
        del actor
        pipe.transformer.zero_grad(set_to_none=True)
    seconds = statistics.median(times[1:])
    return {
        "seconds": seconds,
        "first_update_seconds": times[0],
        "update_seconds": times,
        "recomputed_blocks": recomputed,  # per update (auto: all but one in the warm-up, then what fits)
        # per update: seconds in Python's garbage collector (the process's heap is frozen after the first update of
        # the first variant: actor.freeze_gc_heap)
        "gc_seconds": gc_seconds,
        "sm_clock_mhz": sm_clock,  # per update: the GPU's mean SM clock while it ran (NVML; 0: no reading)
        "transitions_per_s": batch.num_terms / seconds,
        "mfu": useful_flops / seconds / (peak * 1e12),
        "peak_mem_gb": torch.cuda.max_memory_allocated() / 1e9,
        "knobs": dict(zip(KNOBS, variant, strict=True)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=20)
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--window", type=int, default=2)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--negative-tokens", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--variants", default="c902450_like,batch_cfg_mb1,ckpt_mb4_eager,default,compiled_ckpt_mb8")
    ap.add_argument("--model-dir", default="/tmp/verl_omni_models")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; known: {sorted(VARIANTS)}")
    # Compiled variants last: a compiled block stays compiled for the rest of the process.
    names.sort(key=lambda v: VARIANTS[v][1])

    import torch

    from verl_omni.pipelines.loading import load_rl_pipeline

    peak = measured_bf16_peak_tflops()
    device_name = torch.cuda.get_device_name(0)
    log(f"device {device_name}; measured bf16 matmul peak {peak:.0f} TFLOP/s")
    model_dir = build_model(args.model_dir, args.layers)
    with open(os.path.join(model_dir, "transformer", "config.json")) as f:
        tcfg = json.load(f)
    with open(os.path.join(model_dir, "scheduler", "scheduler_config.json")) as f:
        scheduler_config = json.load(f)
    t0 = time.perf_counter()
    model, _, _ = _configs(args, model_dir, VARIANTS["default"])
    pipe = load_rl_pipeline(model_dir, "qwen_image", "bfloat16", model.lora)
    pipe.transformer.to("cuda")
    log(f"transformer on the GPU in {time.perf_counter() - t0:.0f} s")
    batch = _synthetic_batch(args, tcfg, scheduler_config, "cuda")
    image_tokens = (args.size // 16) ** 2
    per_transition = 2 * (
        transformer_flops_per_image(tcfg, image_tokens, args.prompt_tokens, 1, 1)
        + transformer_flops_per_image(tcfg, image_tokens, args.negative_tokens, 1, 1)
    )
    useful = per_transition * batch.num_terms
    log(f"{batch.num_terms} transitions per update, {useful / 1e15:.2f} PFLOP useful")

    variants = {}
    for name in names:
        variants[name] = run_variant(name, args, pipe, batch, model_dir, useful, peak)
        if "seconds" in variants[name]:
            r = variants[name]
            log(
                f"{name}: {r['seconds']:.2f} s per update, {r['transitions_per_s']:.2f} transitions/s, "
                f"MFU {100 * r['mfu']:.1f}%, peak {r['peak_mem_gb']:.1f} GB"
            )
    default = variants.get("default", {})
    report = {
        "device": device_name,
        **model_summary(model_dir),
        "layers": args.layers,
        "mfu": default.get("mfu"),
        "variants": variants,
        "measured_bf16_peak_tflops": peak,
        "workload": {
            "prompts": args.prompts,
            "n": args.n,
            "steps": args.steps,
            "sde_window": args.window,
            "size": args.size,
            "image_tokens": image_tokens,
            "prompt_tokens": args.prompt_tokens,
            "negative_tokens": args.negative_tokens,
            "true_cfg_scale": 4.0,
            "lora_rank": 64,
            "transitions_per_update": batch.num_terms,
            "useful_pflop_per_update": useful / 1e15,
        },
        "note": "c902450_like: the knobs of the actor at c902450 (two CFG forwards, eager, no checkpointing, "
        "micro-batch 1); the host syncs that actor made per forward are gone in every variant.",
    }
    write_report(report, args.out or os.path.join("docs", "benchmarks", f"train_step_L{args.layers}.json"))


if __name__ == "__main__":
    main()
