"""Rewards at recipe scale: OCR throughput of the reward pool, PickScore throughput, and the streaming overlap.

    python benchmarks/rewards_scale.py                       # 16-core GPU machine, ~2-3 min
    python benchmarks/rewards_scale.py --quick --out /tmp/rewards_scale_quick.json   # a 2-core CPU machine

Writes JSON (default docs/benchmarks/rewards_scale.json) with, at the top level:
- ``ocr_img_per_s_1_worker`` / ``ocr_img_per_s_16_workers``: OCR images per second through a RewardPool of 1 and of
  ``--workers`` workers (one onnxruntime thread each), groups of ``--group-size`` 512x512 rendered-text images;
  ``ocr_workers`` and ``cpu_cores`` record what ran.
- ``pickscore_img_per_s``: a random CLIP at the CLIP-ViT-H-14 (PickScore) sizes built here, bf16, batched, scored in
  process on the GPU with tensor preprocessing (``pickscore_img_per_s_processor``: PIL preprocessing;
  ``pickscore_pool_img_per_s``: through the pool's workers and its model actor on 1 GPU); null on CPU.
- ``reward_overhead_frac``: a producer emits ``--groups`` groups at ``--group-interval-s`` (the rollout's group
  interval) while the pool scores them; overhead = reward seconds after the last group arrives / step seconds
  (first emission to last score). Every input is under ``streaming``.
- ``per_image_ms``: in-process cost of each reward on one core (the README's reward table).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from typing import Optional

import numpy as np
import ray
from PIL import Image, ImageDraw, ImageFont

from verl_omni.rewards import RewardManager, get_reward_fn
from verl_omni.rewards.pool import RewardPool

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import log, write_report  # noqa: E402

WORDS = [
    "Open Cafe",
    "Golden Tiger",
    "Pixel Robot",
    "Silver Moon",
    "Hello World",
    "Night Market",
    "Blue Ocean",
    "Sunday Brunch",
    "Quantum Leap",
    "Paper Lantern",
    "Iron Bridge",
    "Spring Sale",
    "Lucky Star",
    "Red Panda",
]


def rendered_group(size: int, count: int, offset: int) -> tuple[list[np.ndarray], list[str]]:
    """``count`` size x size images of a word in black on a light background, and prompts quoting the word."""
    font = ImageFont.load_default(size=max(12, size // 9))
    images, prompts = [], []
    for k in range(count):
        word = WORDS[(offset + k) % len(WORDS)]
        image = Image.new("RGB", (size, size), (250 - 3 * (k % 8), 248, 240))
        ImageDraw.Draw(image).text((size // 12, size // 3 + (k % 5) * size // 20), word, fill="black", font=font)
        images.append(np.asarray(image))
        prompts.append(f'a poster that says "{word}"')
    return images, prompts


def started_pool(reward_config: dict, num_workers: int, args) -> RewardPool:
    """A pool whose workers have each scored one image (OCR engines created), so timings leave startup out."""
    pool = RewardPool(reward_config, num_workers=num_workers)
    RewardPool.gather([pool.submit(*rendered_group(args.size, 1, w)) for w in range(num_workers)])
    return pool


def pool_throughput(pool: RewardPool, num_images: int, args) -> dict:
    """Images per second through ``pool``, every group submitted at once."""
    groups = [
        rendered_group(args.size, args.group_size, g * args.group_size)
        for g in range(max(1, num_images // args.group_size))
    ]
    start = time.perf_counter()
    result = RewardPool.gather([pool.submit(images, prompts) for images, prompts in groups])
    seconds = time.perf_counter() - start
    images = len(result.total)
    return {
        "workers": pool.num_workers,
        "images": images,
        "seconds": seconds,
        "img_per_s": images / seconds,
        "mean_score": float(result.total.mean()),
    }


def streaming_overlap(pool: RewardPool, args) -> dict:
    """Groups arrive every ``group_interval_s`` (the rollout); the pool scores each as it comes."""
    groups = [rendered_group(args.size, args.group_size, g * args.group_size) for g in range(args.groups)]
    pending: dict = {}  # ref of a piece -> its group's index
    pieces_left: dict[int, int] = {}
    done_at: dict[int, float] = {}  # group -> when its last piece was scored
    arrived_at: list[float] = []

    def harvest(until: Optional[float]) -> None:  # record completions until `until` (None: all of them)
        while pending:
            timeout = None if until is None else max(0.0, until - time.perf_counter())
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=timeout)
            for ref in ready:
                g = pending.pop(ref)
                pieces_left[g] -= 1
                if not pieces_left[g]:
                    done_at[g] = time.perf_counter()
            if not ready:
                return
        if until is not None:
            time.sleep(max(0.0, until - time.perf_counter()))

    start = time.perf_counter()
    futures = []
    for g, (images, prompts) in enumerate(groups):
        harvest(start + g * args.group_interval_s)
        arrived_at.append(time.perf_counter())
        futures.append(pool.submit(images, prompts))
        pieces_left[g] = len(futures[-1].pieces)
        pending.update({piece.ref: g for piece in futures[-1].pieces})
    last_arrival = arrived_at[-1]
    harvest(None)
    results = [f.result() for f in futures]
    end = max(done_at.values())
    latency = [done_at[g] - arrived_at[g] for g in range(len(groups))]
    step_s, tail_s = end - start, end - last_arrival
    return {
        "groups": args.groups,
        "group_size": args.group_size,
        "image_size": args.size,
        "group_interval_s": args.group_interval_s,
        "workers": pool.num_workers,
        "rewards": ["ocr"],
        "rollout_seconds": last_arrival - start,
        "step_seconds": step_s,
        "reward_tail_seconds": tail_s,
        "reward_overhead_frac": tail_s / step_s,
        "group_latency_s": {"median": statistics.median(latency), "max": max(latency)},
        "reward_worker_seconds": sum(r.seconds["ocr"] for r in results),
    }


def per_image_ms(args, clip_dir: str) -> dict:
    """In-process cost per 512x512 image of each reward on one thread (median of ``--repeats``)."""
    import torch

    os.environ["VERL_OMNI_OCR_THREADS"] = "1"  # read when the OCR engine is created (first call below)
    torch.set_num_threads(1)
    images, prompts = rendered_group(args.size, 8, 0)
    costs = {}
    for name in ("ocr", "jpeg", "brightness"):
        fn = get_reward_fn(name)
        fn(images[:1], prompts[:1], [{}])  # engine creation out of the timing
        costs[name] = _median_ms(lambda fn=fn: fn(images, prompts, [{}] * len(images)), len(images), args.repeats)
    scorer = RewardManager({"rewards": [{"name": "pickscore", "path": clip_dir, "device": "cpu"}]})
    scorer(images[:1], prompts[:1])
    costs["pickscore_tiny_cpu"] = _median_ms(lambda: scorer(images, prompts), len(images), args.repeats)
    torch.set_num_threads(os.cpu_count() or 1)
    return costs


def _median_ms(call, count: int, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times) / count


def pickscore_throughput(args, model_dir: str) -> dict:
    """Real-size random CLIP-H on the GPU, bf16, batched; PIL vs tensor preprocessing."""
    import torch

    from verl_omni.models.tiny import build_clip_vit_h14
    from verl_omni.rewards.pickscore import CLIPScorer

    path = os.path.join(model_dir, "clip_vit_h14_random")
    if not os.path.exists(os.path.join(path, "config.json")):
        log("building a random CLIP-ViT-H-14-size model on the GPU")
        build_clip_vit_h14(path, device="cuda")
    images, prompts = [], []
    for g in range(max(1, args.pickscore_images // args.group_size)):
        group_images, group_prompts = rendered_group(args.size, args.group_size, g * args.group_size)
        images += group_images
        prompts += group_prompts
    out = {"images": len(images), "batch_size": args.pickscore_batch, "dtype": "bfloat16", "path": path}
    for mode in ("tensor", "processor"):
        scorer = CLIPScorer(path, kind="pickscore", device="cuda", batch_size=args.pickscore_batch, preprocess=mode)
        scorer(images[: args.pickscore_batch], prompts[: args.pickscore_batch])  # warm-up (kernels, allocator)
        torch.cuda.synchronize()
        start = time.perf_counter()
        scores = scorer(images, prompts)
        seconds = time.perf_counter() - start
        out[mode] = {"seconds": seconds, "img_per_s": len(images) / seconds, "finite": bool(np.isfinite(scores).all())}
        del scorer
        torch.cuda.empty_cache()
    return out


def device_name() -> str:
    import torch

    cores = os.cpu_count()
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} + {cores} CPU cores"
    return f"CPU only: {platform.processor() or platform.machine()}, {cores} cores"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=16, help="pool size for the many-worker figures")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--group-size", type=int, default=16)
    ap.add_argument("--ocr-images-1", type=int, default=32, help="images for the 1-worker throughput")
    ap.add_argument("--ocr-images-many", type=int, default=256, help="images for the many-worker throughput")
    ap.add_argument("--groups", type=int, default=32, help="groups in the streaming run (32 x 16 = the recipe's 512)")
    ap.add_argument(
        "--group-interval-s",
        type=float,
        default=0.75,
        help="seconds between groups (default: 16 images / 2.73 img/s per H200 at the real size / 8 GPUs)",
    )
    ap.add_argument("--pickscore-images", type=int, default=512)
    ap.add_argument("--pickscore-batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--model-dir", default="/tmp/verl_omni_models")
    ap.add_argument("--quick", action="store_true", help="small settings for a 2-core machine")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.quick:
        args.workers, args.group_size, args.ocr_images_1, args.ocr_images_many = 2, 8, 8, 16
        args.groups, args.group_interval_s, args.repeats = 4, 4.0, 2
    out = args.out or ("/tmp/rewards_scale_quick.json" if args.quick else "docs/benchmarks/rewards_scale.json")

    import torch

    cores = os.cpu_count() or 1
    ray.init(num_cpus=max(cores, args.workers + 1), include_dashboard=False, log_to_driver=False)
    report: dict = {
        "benchmark": "rewards at recipe scale (benchmarks/rewards_scale.py)",
        "device": device_name(),
        "cpu_cores": cores,
        "quick": args.quick,
    }
    with tempfile.TemporaryDirectory() as scratch:
        from verl_omni.models.tiny import build_tiny_clip

        log("per-image cost of each reward, in process")
        report["per_image_ms"] = per_image_ms(args, build_tiny_clip(os.path.join(scratch, "tiny_clip")))
    ocr = {"rewards": [{"name": "ocr"}]}
    log("OCR through a pool of 1 worker")
    pool = started_pool(ocr, 1, args)
    one = pool_throughput(pool, args.ocr_images_1, args)
    pool.shutdown()
    log(f"OCR through a pool of {args.workers} workers")
    pool = started_pool(ocr, args.workers, args)
    many = pool_throughput(pool, args.ocr_images_many, args)
    report.update(
        {
            "ocr_img_per_s_1_worker": one["img_per_s"],
            "ocr_img_per_s_16_workers": many["img_per_s"],
            "ocr_workers": args.workers,
            "ocr_speedup": many["img_per_s"] / one["img_per_s"],
            "ocr_runs": {"1_worker": one, "many_workers": many},
        }
    )
    log(f"streaming: {args.groups} groups of {args.group_size} every {args.group_interval_s} s")
    stream = streaming_overlap(pool, args)
    pool.shutdown()
    report.update({"reward_overhead_frac": stream["reward_overhead_frac"], "streaming": stream})
    if torch.cuda.is_available():
        log("PickScore (CLIP-ViT-H-14 size, random bf16) on the GPU, in process")
        pick = pickscore_throughput(args, args.model_dir)
        log(f"PickScore through a pool of {args.workers} workers and its model actor (1 GPU)")
        entry = {
            "name": "pickscore",
            "path": pick["path"],
            "num_gpus": 1,
            "preprocess": "tensor",
            "batch_size": args.pickscore_batch,
        }
        pool = started_pool({"rewards": [entry]}, args.workers, args)
        pick["pool"] = pool_throughput(pool, args.pickscore_images, args)
        pick["pool"]["model_call_sizes"] = ray.get(next(iter(pool.model_actors.values())).call_sizes.remote())[-64:]
        pool.shutdown()
        report.update(
            {
                "pickscore_img_per_s": pick["tensor"]["img_per_s"],
                "pickscore_img_per_s_processor": pick["processor"]["img_per_s"],
                "pickscore_pool_img_per_s": pick["pool"]["img_per_s"],
                "pickscore": pick,
            }
        )
    else:
        report.update(
            {
                "pickscore_img_per_s": None,
                "pickscore_note": "skipped: no GPU here (the real-size CLIP-H figure needs a CUDA device)",
            }
        )
    report["load_average_1min_at_end"] = os.getloadavg()[0]
    ray.shutdown()
    write_report(report, out)


if __name__ == "__main__":
    main()
