"""Learning on a GPU: train one algorithm on a reward a random model can move, then evaluate base and trained.

Trains the random full-width Qwen-Image of ``--layers`` layers (the real architecture, 20 layers by default) with
the hybrid engine for ``--steps`` steps on the ``--reward`` reward (brightness: a random model's images differ in
it, so every group has a learning signal), saves the adapter at the last step, then runs the evaluation command
(``python -m verl_omni.eval``) on held-out prompts for the base pipeline and for the trained adapter with the same
protocol (deterministic ODE sampling, the algorithm's CFG, fixed seeds). Appends one record to ``--out`` (a JSON
list) with the keys ``algorithm``, ``engine``, ``device``, ``layers``, ``steps``, ``reward_name``,
``reward_first``, ``reward_last5_mean``, ``eval_base_mean``, ``eval_trained_mean``, ``gpu_minutes``, ``commit``,
plus the evaluations' standard errors, the settings and the throughput: ``eval_images_per_s`` (the trained
adapter's evaluation, ``--eval-batch-images`` images per engine call; ``eval_steady_images_per_s`` without its
first call, which compiles) beside ``rollout_images_per_s`` (the training
rollout on the same model, same steps and CFG).

    python benchmarks/learning_gpu.py --algorithm flowgrpo --layers 20 --steps 20 --out $OUT/learning_gpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from types import SimpleNamespace
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_common import append_run, build_model, log, model_summary  # noqa: E402
from e2e_step import REPO, apply_sets, ocr_data_dir, recipe_config  # noqa: E402

# Each algorithm's settings on top of the e2e recipe (512² there; --resolution here): FlowGRPO as the OCR recipe;
# MixGRPO-Flash with its window sliding every 5 steps so a short run sees it move; DiffusionNFT as its preset
# (CFG-free; the values of NVlabs/DiffusionNFT's OCR config).
ALGORITHMS: dict[str, dict[str, Any]] = {
    "flowgrpo": {},
    "mixgrpo": {
        "algorithm.name": "mixgrpo",
        "algorithm.mixgrpo.window_size": 2,
        "algorithm.mixgrpo.shift_interval": 5,
        "algorithm.mixgrpo.ode_solver": "dpmsolver++",
    },
    "diffusion_nft": {
        "algorithm.name": "diffusion_nft",
        "algorithm.diffusion_nft.beta": 0.1,
        "algorithm.diffusion_nft.decay_type": 2,
        "actor_rollout_ref.rollout.pipeline.true_cfg_scale": 1.0,
        "actor_rollout_ref.actor.kl_coef": 1.0e-4,
    },
}
REWARD_KEY = "reward/total/mean"


def train(args, model_dir: str, work_dir: str) -> tuple[list[dict], str, Any]:
    """The run's per-step metrics, its last checkpoint directory and its config."""
    from omegaconf import OmegaConf

    from verl_omni.trainer.ray_trainer import FlowGRPOTrainer

    data_dir = ocr_data_dir(args.work_dir)
    e2e_args = SimpleNamespace(
        prompts_per_gpu=args.prompts, gpus=1, micro_batch=args.micro_batch, engine=args.engine, rewards=args.reward,
        steps=args.steps, set=[],
    )  # fmt: skip
    cfg = recipe_config(e2e_args, model_dir, data_dir, work_dir)
    overrides = {
        "actor_rollout_ref.rollout.pipeline.height": args.resolution,
        "actor_rollout_ref.rollout.pipeline.width": args.resolution,
        "trainer.save_freq": args.steps,
        "trainer.max_steps_without_signal": 3,
        **ALGORITHMS[args.algorithm],
    }
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value, merge=False)
    apply_sets(cfg, args.set)  # the user's overrides last
    trainer = FlowGRPOTrainer(cfg)
    try:
        trainer.init()
        history = trainer.fit()
    finally:
        trainer.shutdown()
    return history, os.path.join(work_dir, f"global_step_{args.steps}"), cfg


def evaluate(args, model_dir: str, out: str, cfg_scale: float, checkpoint: str | None) -> dict:
    """The evaluation command's summary for the reward (mean, stderr over prompts) and its images/s."""
    command = [
        sys.executable, "-m", "verl_omni.eval", "--base", model_dir, "--prompts", args.eval_prompts_file,
        "--out", out, "--steps", "10", "--cfg", str(cfg_scale), "--noise-level", "0",
        "--height", str(args.resolution), "--width", str(args.resolution),
        "--images-per-prompt", str(args.eval_images_per_prompt), "--reward", args.reward,
        "--engine", args.engine, "--device", args.device, "--dtype", args.dtype, "--max-sequence-length", "256",
        "--negative-prompt", " ", "--limit", str(args.eval_prompts), "--no-progress",
        "--batch-images", str(args.eval_batch_images),
    ]  # fmt: skip
    if checkpoint:
        command += ["--checkpoint", checkpoint]
    log(" ".join(command))
    subprocess.run(command, check=True, cwd=REPO)
    with open(os.path.join(out, "report.json")) as f:
        report = json.load(f)
    summary = report["summary"][args.reward]
    return {"mean": summary["mean"], "stderr": summary["stderr"], "n": summary["n"], "timing": report.get("timing")}


def rollout_images_per_s(history: list[dict], images_per_step: int) -> float | None:
    """The training rollout's images per second (``timing/rollout_s``), the median over the steps after the first
    (which compiles): what the evaluation's ``eval_images_per_s`` compares with on the same model."""
    seconds = [h["timing/rollout_s"] for h in history if "timing/rollout_s" in h]
    seconds = seconds[1:] or seconds
    return images_per_step / statistics.median(seconds) if seconds else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--algorithm", required=True, choices=sorted(ALGORITHMS))
    ap.add_argument("--layers", type=int, default=20)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--prompts", type=int, default=2, help="prompts per step (16 images each)")
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--engine", default="vllm_omni", choices=("vllm_omni", "diffusers"))
    ap.add_argument("--reward", default="brightness")
    ap.add_argument("--eval-prompts", type=int, default=16, help="held-out prompts evaluated")
    ap.add_argument("--eval-images-per-prompt", type=int, default=4)
    ap.add_argument(
        "--eval-batch-images", type=int, default=16, help="the evaluation's --batch-images (images per engine call)"
    )
    ap.add_argument("--model-dir", default="/tmp/verl_omni_models")
    ap.add_argument("--model-path", help="an existing pipeline directory instead of the random full-width build")
    ap.add_argument("--work-dir", default="/tmp/verl_omni_learning")
    ap.add_argument("--out", required=True)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a config override (repeatable)")
    ap.add_argument("--commit", default="")
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run (with --model-path tiny and --set devices)")
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args()

    import torch

    sys.path.insert(0, os.path.join(REPO, "examples", "flowgrpo_trainer", "data_process"))
    from eval_prompts import write_eval_prompts

    t0 = time.perf_counter()
    model_dir = args.model_path or build_model(args.model_dir, args.layers, device=args.device)
    args.eval_prompts_file, _ = write_eval_prompts(os.path.join(args.work_dir, "eval_prompts"), 64, 5, 0)
    run_dir = os.path.join(args.work_dir, args.algorithm)
    history, checkpoint, cfg = train(args, model_dir, run_dir)
    rewards = [h[REWARD_KEY] for h in history]
    cfg_scale = float(cfg.actor_rollout_ref.rollout.pipeline.true_cfg_scale)
    base_dir = os.path.join(args.work_dir, f"eval_base_cfg{cfg_scale:g}")  # shared by algorithms of one protocol
    base = evaluate(args, model_dir, base_dir, cfg_scale, None)
    trained = evaluate(args, model_dir, os.path.join(run_dir, "eval_trained"), cfg_scale, checkpoint)
    record = {
        "algorithm": args.algorithm,
        "engine": args.engine,
        "device": torch.cuda.get_device_name(0) if args.device == "cuda" else args.device,
        "layers": None if args.model_path else args.layers,
        "steps": len(history),
        "reward_name": args.reward,
        "reward_first": rewards[0],
        "reward_last5_mean": sum(rewards[-5:]) / len(rewards[-5:]),
        "eval_base_mean": base["mean"],
        "eval_trained_mean": trained["mean"],
        "gpu_minutes": (time.perf_counter() - t0) / 60,
        "commit": args.commit,
        "model": model_summary(model_dir)["model"],
        "eval_base_stderr": base["stderr"],
        "eval_trained_stderr": trained["stderr"],
        "eval_gain_over_base_stderr": (trained["mean"] - base["mean"]) / max(base["stderr"], 1e-12),
        "eval_images_per_s": trained["timing"][-1]["images_per_s"] if trained["timing"] else None,
        "eval_steady_images_per_s": trained["timing"][-1].get("steady_images_per_s") if trained["timing"] else None,
        "eval_batch_images": args.eval_batch_images,
        "rollout_images_per_s": rollout_images_per_s(history, args.prompts * int(cfg.actor_rollout_ref.rollout.n)),
        "reward_by_step": rewards,
        "settings": (
            f"{args.resolution}x{args.resolution}, 10 steps, CFG {cfg_scale:g}, {args.prompts} prompts x "
            f"{cfg.actor_rollout_ref.rollout.n} images "
            f"per step, LoRA r64, lr 3e-4; evaluation: {args.eval_prompts} held-out prompts x "
            f"{args.eval_images_per_prompt} images, ODE sampling (noise 0), seeds fixed"
        ),
        "overrides": {**ALGORITHMS[args.algorithm], **dict(s.split("=", 1) for s in args.set)},
    }
    log(json.dumps({k: v for k, v in record.items() if k != "reward_by_step"}))
    append_run(record, args.out)


if __name__ == "__main__":
    main()
