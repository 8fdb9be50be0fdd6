"""A model family's shipped recipe end to end on its faithful stand-in: training steps, then (optionally) the B=16
rollout on both engines, on the preset's GPUs (``trainer.n_gpus_per_node``; ``--gpus`` sets another count; the
comparison on one GPU).

Builds the family's real-size random-weight pipeline (``verl_omni.pipelines.standins``: every component at the real
checkpoint's architecture and size; ``--layers`` truncates the transformer only), composes the family's recipe
preset from ``configs/`` (``--preset``; the settings a user runs) and runs the real trainer for ``--steps`` steps.
Random weights score every image 0 under OCR, so ``--rewards`` (default brightness) replaces the preset's rewards:
the update then has a signal and does all of its work. Appends one record per run to ``--out`` (a JSON list) with
the keys of ``docs/benchmarks/models.json``: family, device, params_b (all components), text_encoder_params_b,
resolution, steps (denoising), cfg, images_per_step, step_s / rollout_s / update_s (medians of the steady steps,
all but the first), img_per_s, peak_mem_gb (the GPU's peak from ``nvidia-smi``), step1_ratio_max_dev (the largest
|ratio - 1| of step 1's update: the actor's recomputed log-probs against the rollout's), rollout_vs_diffusers
(``--rollout-compare``: ``rollout_throughput.py``'s batched B=16 vllm-omni path over the diffusers engine's, same
model and sampling, in a child process after the trainer exits) and commit; plus each step's metrics. A video family
(its option ``num_frames`` > 1) adds the keys of ``docs/benchmarks/video.json``: frames, videos_per_step,
videos_per_s (``--variant`` picks the checkpoint, e.g. Wan2.1's 1.3B or 14B).

    python benchmarks/family_step.py --family sd3 --preset sd3_5_medium_flowgrpo_ocr_lora --steps 3 \\
        --rollout-compare --out $OUT/models.json --commit $(git rev-parse --short HEAD)
    (variants: --set KEY=VALUE, e.g. --set actor_rollout_ref.model.text_encoder_offload=true --name te_offload)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_common import append_run, build_model, component_params, log, model_summary  # noqa: E402
from e2e_step import (  # noqa: E402
    add_run_args,
    ocr_data_dir,
    parse_run_args,
    run_settings,
    run_trainer,
    summarize,
    with_settings,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.dirname(os.path.abspath(__file__))

# The stand-in's components that encode text (the rest: transformer, VAE).
TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")


def preset_config(args, model_dir: str, data_dir: str, out_dir: str):
    """The recipe preset ``configs/<preset>.yaml`` as a user runs it, pointed at the stand-in, for ``--steps``
    steps without checkpoints, validation or sample images."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=os.path.join(REPO, "configs"), version_base=None):
        cfg = compose(args.preset)
    gpus = args.gpus or int(cfg.trainer.n_gpus_per_node)  # the preset's GPUs unless --gpus says otherwise
    return with_settings(cfg, run_settings(args, model_dir, data_dir, out_dir, gpus=gpus), args.set)


def step1_ratio_max_dev(history: list[dict[str, Any]]) -> float | None:
    """The largest |ratio - 1| over step 1's update (the trainer logs the ratio's min and max per step)."""
    if not history or "actor/ratio_max" not in history[0]:
        return None
    first = history[0]
    return max(abs(first["actor/ratio_max"] - 1.0), abs(first["actor/ratio_min"] - 1.0))


def family_options(cfg) -> dict[str, Any]:
    """The model section's options of the run's family (``{"wan": {"num_frames": 33, ...}}``; {} without any)."""
    from omegaconf import OmegaConf

    from verl_omni.pipelines.registry import family_for_model_dir

    model = cfg.actor_rollout_ref.model
    family = model.pipeline if model.pipeline not in (None, "auto") else family_for_model_dir(model.path)
    section = model.get(family)
    return {family: OmegaConf.to_container(section, resolve=True)} if section else {}


def num_frames(cfg) -> int:
    """Frames per sample: the family option ``num_frames`` of a video family, else 1 (an image)."""
    for options in family_options(cfg).values():
        return int(options.get("num_frames") or 1)
    return 1


def rollout_vs_diffusers(model_dir: str, cfg, work_dir: str) -> dict[str, Any]:
    """``rollout_throughput.py`` paths b (vllm-omni, one B=16 call) and d (diffusers engine, one B=16 call) on the
    same model and sampling as the recipe's rollout, in a child process (this one holds no engine)."""
    pipe = cfg.actor_rollout_ref.rollout.pipeline
    out = os.path.join(work_dir, "rollout_compare.json")
    if os.path.exists(out):
        os.remove(out)
    cmd = [
        sys.executable,
        os.path.join(HERE, "rollout_throughput.py"),
        "--model-path",
        model_dir,
        "--paths",
        "b,d",
        "--n",
        "16",
        "--repeats",
        "2",
        "--prompts",
        "1",
        "--steps",
        str(int(pipe.num_inference_steps)),
        "--size",
        str(int(pipe.height)),
        "--max-text-tokens",
        str(int(pipe.max_sequence_length)),
        "--cfg",
        str(float(pipe.true_cfg_scale)),
        "--out",
        out,
    ]
    options = family_options(cfg)
    if options:
        cmd += ["--model-options", json.dumps(options)]
    log("rollout comparison: " + " ".join(cmd))
    proc = subprocess.run(cmd, check=False)
    if proc.returncode != 0 or not os.path.exists(out):
        return {"rollout_vs_diffusers": None, "rollout_compare_error": f"exit {proc.returncode}"}
    with open(out) as f:
        report = json.load(f)
    results = report["results"]
    return {
        "rollout_vs_diffusers": report["ratios"]["b_over_d"],
        "rollout_vllm_omni_b16_img_per_s": results["b"]["img_per_s"],
        "rollout_diffusers_b16_img_per_s": results["d"]["img_per_s"],
    }


def add_comparison(out: str, family: str, preset: str, model_dir: str, cfg, run_dir: str, commit: str) -> None:
    """Time the B=16 rollouts on both engines and add the figures, and ``commit`` as rollout_compare_commit, to
    ``out``'s last record of ``family`` and ``preset`` (written back in place; an earlier attempt's error goes)."""
    with open(out) as f:
        runs = json.load(f)
    matches = [i for i, r in enumerate(runs) if r.get("family") == family and r.get("preset") == preset]
    index = matches[-1] if matches else None
    if index is None:
        raise SystemExit(f"{out} holds no run of family {family!r} with preset {preset!r} to add the comparison to")
    os.makedirs(run_dir, exist_ok=True)
    runs[index].pop("rollout_compare_error", None)
    runs[index].update(rollout_vs_diffusers(model_dir, cfg, tempfile.mkdtemp(dir=run_dir)))
    runs[index]["rollout_compare_commit"] = commit
    with open(out, "w") as f:
        json.dump(runs, f, indent=1)
    log(f"{family}: rollout_vs_diffusers {runs[index]['rollout_vs_diffusers']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", required=True, help="a registered family with a stand-in: qwen_image, sd3, flux")
    ap.add_argument("--preset", required=True, help="a recipe preset in configs/ (its name without .yaml)")
    ap.add_argument("--layers", type=int, default=None, help="transformer layers (default: the real depth)")
    ap.add_argument("--variant", default=None, help="a family's checkpoint variant (Wan2.1: 1.3B or 14B)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--gpus", type=int, default=None, help="GPUs of this node (default: the preset's n_gpus_per_node)")
    ap.add_argument("--rewards", default="brightness", help="comma-separated reward names (weight 1 each)")
    ap.add_argument("--rollout-compare", action="store_true", help="also time B=16 rollouts on both engines")
    ap.add_argument(
        "--compare-only",
        action="store_true",
        help="no training: time the B=16 rollouts and add them to --out's last record of this family and preset",
    )
    ap.add_argument("--model-path", default=None, help="an existing pipeline directory (default: build the stand-in)")
    add_run_args(ap, "/tmp/verl_omni_family")
    args = parse_run_args(ap)

    import torch

    model_dir = args.model_path or build_model(args.model_dir, args.layers, family=args.family, variant=args.variant)
    data_dir = ocr_data_dir(args.work_dir)
    run_name = f"{args.family}_{args.preset}_{args.name or 'recipe'}"
    run_dir = os.path.join(args.work_dir, run_name)
    cfg = preset_config(args, model_dir, data_dir, run_dir)
    pipe, rollout = cfg.actor_rollout_ref.rollout.pipeline, cfg.actor_rollout_ref.rollout
    gpus = int(cfg.trainer.n_gpus_per_node)
    params = component_params(model_dir)
    record: dict[str, Any] = {
        "family": args.family,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "gpus": gpus,
        "params_b": sum(params.values()) / 1e9,
        "text_encoder_params_b": sum(v for k, v in params.items() if k in TEXT_ENCODERS) / 1e9,
        "resolution": [int(pipe.height), int(pipe.width)],
        "steps": int(pipe.num_inference_steps),
        "cfg": float(pipe.true_cfg_scale),
        "images_per_step": int(cfg.data.train_batch_size) * int(rollout.n),
        "preset": args.preset,
        "layers": args.layers,
        **model_summary(model_dir),
        "engine": str(rollout.name),
        "algorithm": str(cfg.algorithm.get("name", "flowgrpo")),
        "rewards": args.rewards,
        "lora_rank": int(cfg.actor_rollout_ref.model.lora_rank),
        "text_encoder_offload": cfg.actor_rollout_ref.model.get("text_encoder_offload", False),
        "commit": args.commit,
    }
    if args.set or args.name:
        record["variant"] = args.name
        record["overrides"] = list(args.set)
    if args.compare_only:
        add_comparison(args.out, args.family, args.preset, model_dir, cfg, run_dir, args.commit)
        return
    frames = num_frames(cfg)
    if frames > 1:  # the keys of docs/benchmarks/video.json beside the image ones
        record.update(frames=frames, videos_per_step=record["images_per_step"], checkpoint_variant=args.variant)
    history = run_trainer(cfg, run_name, record)
    summarize(history, record, cfg, gpus=gpus)
    if frames > 1 and "img_per_s" in record:
        record["videos_per_s"] = record["img_per_s"]
    record["step1_ratio_max_dev"] = step1_ratio_max_dev(history)
    record["step_metrics"] = record.pop("steps")  # run_trainer's per-step metrics; "steps" is the denoising steps
    record["steps"] = int(pipe.num_inference_steps)
    record["rollout_vs_diffusers"] = None
    log(json.dumps({k: v for k, v in record.items() if k != "step_metrics"}))
    append_run(record, args.out)  # kept even if the comparison below does not finish
    if args.rollout_compare:
        add_comparison(args.out, args.family, args.preset, model_dir, cfg, run_dir, args.commit)


if __name__ == "__main__":
    main()
