"""``python -m verl_omni.eval --base PATH --prompts FILE --out DIR [--checkpoint DIR] [--preset flowgrpo_ocr] ...``

A preset sets the protocol and the rewards; every flag given explicitly overrides it."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional

from verl_omni.core.names import ENGINE_NAMES
from verl_omni.eval.protocol import PRESETS, SEED_SCHEMES, EvalProtocol
from verl_omni.eval.report import REPORT_FILE
from verl_omni.eval.runner import EvalJob, run_evaluation
from verl_omni.export import WEIGHTS_CHOICES, resolve_base
from verl_omni.pipelines import AUTO

# command-line flag -> EvalProtocol field
PROTOCOL_FLAGS = {
    "steps": "num_inference_steps",
    "cfg": "guidance_scale",
    "noise_level": "noise_level",
    "height": "height",
    "width": "width",
    "images_per_prompt": "images_per_prompt",
    "negative_prompt": "negative_prompt",
    "max_sequence_length": "max_sequence_length",
    "seed": "seed",
    "seed_scheme": "seed_scheme",
    "validation_step": "validation_step",
    "val_batch_size": "val_batch_size",
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="verl-omni-eval", description=__doc__.splitlines()[0])
    p.add_argument("--base", required=True, help="base pipeline directory (or tiny:<family>)")
    p.add_argument("--prompts", required=True, help="prompt file: .txt (one per line), .jsonl or a verl .parquet")
    p.add_argument("--out", required=True, help="output directory: report.json, images/, grids/")
    p.add_argument("--checkpoint", help="global_step_<k> or run directory; omitted: the base pipeline alone")
    p.add_argument("--weights", default="lora", choices=WEIGHTS_CHOICES, help="the adapter or the policy EMA")
    p.add_argument("--lora-alpha", type=float, help="the run's lora_alpha, if the checkpoint does not record it")
    p.add_argument("--preset", choices=sorted(PRESETS), help="a named protocol with its rewards")
    p.add_argument("--steps", type=int, help="denoising steps (flowgrpo_ocr: 40)")
    p.add_argument("--cfg", type=float, help="guidance scale (1 = none; flowgrpo_ocr: 4.5)")
    p.add_argument("--noise-level", type=float, help="SDE noise level (0 = deterministic ODE sampling)")
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--images-per-prompt", type=int, help="images per prompt, generated as one batch")
    p.add_argument("--negative-prompt")
    p.add_argument("--max-sequence-length", type=int)
    p.add_argument("--seed", type=int, help="base seed (validation scheme: the run's actor_rollout_ref.rollout.seed)")
    p.add_argument("--seed-scheme", choices=SEED_SCHEMES)
    p.add_argument("--validation-step", type=int, help="seed-scheme validation: the run's step of that validation")
    p.add_argument("--val-batch-size", type=int, help="seed-scheme validation: the run's data.val_batch_size")
    p.add_argument("--reward", action="append", metavar="NAME[:WEIGHT]", help="a registered reward; repeat for several")
    p.add_argument("--rewards-json", help='reward entries as JSON, e.g. \'[{"name": "http", "url": "..."}]\'')
    p.add_argument("--reward-url", help="the http reward's service URL (e.g. a GenEval scorer, --preset geneval)")
    p.add_argument(
        "--pipeline",
        default=AUTO,
        help="the model family (actor_rollout_ref.model.pipeline); auto: from the base's model_index.json",
    )
    p.add_argument(
        "--family-option",
        action="append",
        metavar="KEY=VALUE",
        help="an option of the family's own section (actor_rollout_ref.model.<family>.KEY, e.g. FLUX's "
        "distilled_guidance_scale=3.5); repeat for several; VALUE is read as YAML",
    )
    p.add_argument("--engine", default="diffusers", choices=ENGINE_NAMES)
    p.add_argument(
        "--device",
        default=AUTO,
        help="cpu, or cuda (with --gpus N: each worker's own GPU); auto: cuda where a GPU is visible, else cpu",
    )
    p.add_argument(
        "--gpus",
        type=int,
        default=1,
        help="worker processes, one engine on one GPU each (CUDA_VISIBLE_DEVICES), sharing the prompts; "
        "with --device cpu, CPU processes",
    )
    p.add_argument(
        "--prefetch",
        type=int,
        help="prompts whose images may wait for saving and scoring while the engine generates the next call; "
        "0: serial; default: the prompts of one call (--batch-images), at least 2",
    )
    p.add_argument(
        "--batch-images",
        type=int,
        default=16,
        help="images per engine call: consecutive prompts share one call, whole prompts only (images-per-prompt "
        "16 and 4: 4 prompts a call); a prompt of more images is a call of its own; 1: one prompt per call",
    )
    p.add_argument(
        "--dtype",
        default=AUTO,
        help="the engine's dtype (float32, bfloat16, float16); auto: bfloat16 on cuda, else float32",
    )
    p.add_argument("--prompt-key", default="prompt")
    p.add_argument("--limit", type=int, help="evaluate only the first LIMIT prompts")
    p.add_argument("--overwrite", action="store_true", help="discard an existing report in --out")
    p.add_argument("--no-progress", action="store_true")
    return p


def rewards_from(args, preset: Optional[dict]) -> list[dict]:
    if args.rewards_json:
        rewards = json.loads(args.rewards_json)
    elif args.reward:
        rewards = []
        for item in args.reward:
            name, _, weight = item.partition(":")
            rewards.append({"name": name, "weight": float(weight) if weight else 1.0})
    elif preset:
        rewards = [dict(r) for r in preset["rewards"]]
    else:
        raise ValueError("no reward: pass --reward NAME (repeatable), --rewards-json, or --preset")
    for entry in rewards:
        if entry.get("name") == "http" and "url" not in entry:
            if not args.reward_url:
                raise ValueError("the http reward needs --reward-url (the scoring service, e.g. a GenEval server)")
            entry["url"] = args.reward_url
    return rewards


def family_options_from(items: Optional[list[str]]) -> dict:
    """``--family-option KEY=VALUE`` flags as a dict, each VALUE read as YAML (``3.5`` a number, ``true`` a bool)."""
    import yaml

    options = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--family-option {item!r} must be KEY=VALUE (e.g. distilled_guidance_scale=3.5)")
        options[key] = yaml.safe_load(value)
    return options


def job_from(args) -> EvalJob:
    preset = PRESETS[args.preset] if args.preset else None
    protocol = preset["protocol"] if preset else EvalProtocol()
    given = {field: getattr(args, flag) for flag, field in PROTOCOL_FLAGS.items() if getattr(args, flag) is not None}
    return EvalJob(
        base=resolve_base(args.base),
        prompts=args.prompts,
        out=args.out,
        protocol=protocol.replace(**given),
        rewards=rewards_from(args, preset),
        checkpoint=args.checkpoint,
        weights=args.weights,
        lora_alpha=args.lora_alpha,
        pipeline=args.pipeline,
        engine=args.engine,
        device=args.device,
        dtype=args.dtype,
        prompt_key=args.prompt_key,
        limit=args.limit,
        overwrite=args.overwrite,
        progress=False if args.no_progress else None,
        gpus=args.gpus,
        prefetch=args.prefetch,
        batch_images=args.batch_images,
        family_options=family_options_from(args.family_option),
    )


def main(argv: Optional[list[str]] = None) -> int:
    job = job_from(parser().parse_args(argv))
    report = run_evaluation(job)
    summary = report["summary"]
    for name, value in summary.items():
        if isinstance(value, dict):
            print(f"{name:>24}: {value['mean']:.4f} ± {value['stderr']:.4f} (stderr over {value['n']} prompts)")
        else:
            print(f"{name:>24}: {value}")
    print(f"[verl_omni] report: {os.path.join(job.out, REPORT_FILE)}; grids: {os.path.join(job.out, 'grids')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
