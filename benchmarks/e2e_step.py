"""Training steps end to end with the OCR recipe's settings on 1..8 GPUs of one host.

Runs the real trainer (``FlowGRPOTrainer``: Ray, replicas, agent loop, rewards, the actor, the weight sync) on a
random-weight Qwen-Image at full width with ``--layers`` layers, for ``--steps`` steps, and appends one record per
run to ``--out`` (a JSON list): device, gpus, layers, engine, micro_batch, images_per_step, the medians over the
steady steps (all but the first) of step_s / rollout_s / reward_s / update_s / sync_s / swap_s, img_per_s,
img_per_s_per_gpu, and peak_mem_gb_per_gpu (the most any GPU held, from ``nvidia-smi``, sampled every 0.5 s);
text_encoder_offload (the setting) and text_encoder_offload_s (median seconds per update moving the text encoders,
the ranks' mean); full fine-tuning (``--set actor_rollout_ref.model.lora_rank=0``) adds weight_sync_s (the
all-gather of the updated shards into the engines' weights, inside update_s), optimizer_step_s (AdamW over the
shard, on the host with the offload, inside update_s) and offload (``actor.optimizer_offload``).
The algorithm is the config's ``algorithm.name`` (``--set algorithm.name=...``); ``--commit`` labels the record.

Weak scaling: ``data.train_batch_size = --prompts-per-gpu x --gpus`` prompts of n=16 images per step.
The recipe: 512x512, 10 steps, true CFG 4 with the negative prompt " ", SDE window 2 in [0, 5], noise level 1.2,
LoRA r64 / alpha 128 on to_q/k/v/out, lr 3e-4, bf16, the hybrid engine (one replica + one actor rank per GPU).

    python benchmarks/e2e_step.py --layers 60 --gpus 4 --engine vllm_omni --out $OUT/e2e_scaling.json
    (a variant: --name two_cfg_forwards --set actor_rollout_ref.rollout.pipeline.batch_cfg=false)
    (the text encoders off the GPU during the update: --name te_offload
     --set actor_rollout_ref.model.text_encoder_offload=true)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from typing import Any

import yaml

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_common import append_run, build_model, log, model_summary  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class GpuMemoryPeak:
    """The most memory each of this run's GPUs held (nvidia-smi every ``interval`` s, on a thread). nvidia-smi
    lists every GPU of the host whatever CUDA_VISIBLE_DEVICES says: only the visible ones are kept, so runs side by
    side on one machine each report their own cards (keys: physical indices)."""

    def __init__(self, interval: float = 0.5):
        self.interval, self.peak_mib = interval, {}
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
        self.visible = {int(x) for x in visible.split(",") if x.strip().isdigit()} if visible else None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.is_set():
            try:
                out = subprocess.run(
                    ["nvidia-smi", "--query-gpu=index,memory.used", "--format=csv,noheader,nounits"],
                    capture_output=True,
                    text=True,
                    timeout=10,
                ).stdout
                for line in out.strip().splitlines():
                    index, used = (int(x) for x in line.split(","))
                    if self.visible is not None and index not in self.visible:
                        continue
                    self.peak_mib[index] = max(self.peak_mib.get(index, 0), used)
            except (OSError, ValueError, subprocess.TimeoutExpired):
                pass
            self._stop.wait(self.interval)

    def __enter__(self) -> GpuMemoryPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def recipe_config(args, model_dir: str, data_dir: str, out_dir: str):
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(os.path.join(REPO, "verl_omni", "trainer", "config", "flowgrpo_trainer.yaml"))
    overrides = {
        "data.train_batch_size": args.prompts_per_gpu * args.gpus,
        "actor_rollout_ref.hybrid_engine": True,
        "actor_rollout_ref.model.lora_rank": 64,
        "actor_rollout_ref.model.lora_alpha": 128,
        "actor_rollout_ref.actor.device": "cuda",
        "actor_rollout_ref.actor.dtype": "bfloat16",
        "actor_rollout_ref.actor.optim.lr": 3e-4,
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu": args.micro_batch,
        "actor_rollout_ref.rollout.name": args.engine,
        "actor_rollout_ref.rollout.device": "cuda",
        "actor_rollout_ref.rollout.dtype": "bfloat16",
        "actor_rollout_ref.rollout.n": 16,
        "actor_rollout_ref.rollout.gpu_memory_utilization": 0.9,
        "actor_rollout_ref.rollout.algo.noise_level": 1.2,
        "actor_rollout_ref.rollout.algo.sde_window_size": 2,
        "actor_rollout_ref.rollout.algo.sde_window_range": [0, 5],
        "actor_rollout_ref.rollout.pipeline.num_inference_steps": 10,
        "actor_rollout_ref.rollout.pipeline.height": 512,
        "actor_rollout_ref.rollout.pipeline.width": 512,
        "actor_rollout_ref.rollout.pipeline.true_cfg_scale": 4.0,
        "actor_rollout_ref.rollout.pipeline.negative_prompt": " ",
        "actor_rollout_ref.rollout.pipeline.max_sequence_length": 256,
        **run_settings(args, model_dir, data_dir, out_dir, args.gpus),
    }
    return with_settings(cfg, overrides, args.set)


def run_settings(args, model_dir: str, data_dir: str, out_dir: str, gpus: int) -> dict[str, Any]:
    """What every benchmark run sets beside its recipe: the OCR prompts of ``data_dir``, the model, ``args.rewards``
    (weight 1 each), ``args.steps`` steps on ``gpus`` GPUs, console metrics only, no checkpoints, validation, sample
    images or resume."""
    return {
        "data.train_files": os.path.join(data_dir, "train.parquet"),
        "data.val_files": None,
        "actor_rollout_ref.model.path": model_dir,
        "reward.rewards": [{"name": r, "weight": 1.0} for r in args.rewards.split(",")],
        "trainer.total_training_steps": args.steps,
        "trainer.save_freq": -1,
        "trainer.test_freq": -1,
        "trainer.logger": ["console"],
        "trainer.sample_images_per_step": 0,
        "trainer.n_gpus_per_node": gpus,
        "trainer.default_local_dir": out_dir,
        "trainer.resume_mode": "disable",
        # random weights score 0 under OCR: no learning signal, yet every step does all of its work
        "trainer.max_steps_without_signal": 0,
    }


def with_settings(cfg, overrides: dict[str, Any], sets: list[str]):
    """``cfg`` with ``overrides`` (dotted keys) and then the ``--set`` variants applied; returns it."""
    from omegaconf import OmegaConf

    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value, merge=False)
    apply_sets(cfg, sets)
    return cfg


def apply_sets(cfg, items: list[str]) -> None:
    """A variant of the recipe: each ``KEY=VALUE`` (the value read as YAML) set in ``cfg``."""
    from omegaconf import OmegaConf

    for item in items:
        key, value = item.split("=", 1)
        OmegaConf.update(cfg, key, yaml.safe_load(value), merge=False)


STEP_KEYS = (
    "timing/",
    "perf/",
    "actor/ratio",
    "actor/recomputed",
    "actor/weight_sync_s",
    "actor/optimizer_step_s",
    "reward/total",
    "reward/tail_s",
    "rollout/generate_s",
)


def run_trainer(cfg, run_name: str, record: dict[str, Any]) -> list[dict[str, Any]]:
    """Run the trainer on ``cfg``; returns its per-step metrics. Adds to ``record``: start_up_s, the GPUs' peak
    memory (peak_mem_gb_per_gpu, peak_mem_gb, peak_mem_gb_by_gpu), each step's timing and ratio metrics
    (``steps``), and ``error`` when the run failed (so a failed run still says why; the steps it finished are
    kept)."""
    from verl_omni.trainer.ray_trainer import FlowGRPOTrainer
    from verl_omni.trainer.stopping import TrainingInterrupted

    t0 = time.perf_counter()
    with GpuMemoryPeak() as memory:
        trainer = FlowGRPOTrainer(cfg)
        try:
            trainer.init()
            record["start_up_s"] = time.perf_counter() - t0
            log(f"{run_name}: up in {record['start_up_s']:.0f} s")
            history = trainer.fit()
        # Recorded, so a failed or stopped (SIGTERM: TrainingInterrupted) run still says why and what its finished
        # steps measured.
        except (Exception, TrainingInterrupted) as exc:
            record["error"] = f"{type(exc).__name__}: {str(exc)[:2000]}"
            history = list(trainer.history)
            log(f"{run_name}: FAILED after {len(history)} step(s): {record['error'][:500]}")
        finally:
            trainer.shutdown()
    record["steps"] = [{k: v for k, v in h.items() if k.startswith(STEP_KEYS)} for h in history]
    record["peak_mem_gb_per_gpu"] = max(memory.peak_mib.values(), default=0) * 1.048576e-3  # MiB -> GB
    record["peak_mem_gb"] = record["peak_mem_gb_per_gpu"]  # the key e2e_single_gpu.json's readers use
    record["peak_mem_gb_by_gpu"] = {str(k): v * 1.048576e-3 for k, v in sorted(memory.peak_mib.items())}
    return history


def summarize(history: list[dict[str, Any]], record: dict[str, Any], cfg, *, gpus: int) -> None:
    """The medians over the steady steps (all but the first) of each phase's seconds, images/s (needs
    record["images_per_step"]), the text encoders' offload seconds, the actor's allocator peaks per phase (the
    largest of the run) and, for full fine-tuning (``lora_rank=0``), weight_sync_s, optimizer_step_s and offload."""
    steady = history[1:] or history
    if not steady:
        return

    def median(key: str) -> float:
        return statistics.median(h[key] for h in steady)

    for phase in ("step", "rollout", "reward", "update", "sync", "swap"):
        record[f"{phase}_s"] = median(f"timing/{phase}_s")
    if int(cfg.actor_rollout_ref.model.lora_rank) == 0:
        # Full fine-tuning: the all-gather of the updated shards into the engines' weights (inside update_s),
        # and whether the master weights and AdamW state lived in host memory.
        record["weight_sync_s"] = median("actor/weight_sync_s")
        record["optimizer_step_s"] = median("actor/optimizer_step_s")
        record["offload"] = bool(cfg.actor_rollout_ref.actor.get("optimizer_offload", False))
    record["img_per_s"] = record["images_per_step"] / record["step_s"]
    record["text_encoder_offload_s"] = statistics.median(
        statistics.mean([v for k, v in h.items() if k.startswith("timing/update_text_encoder_offload_s/")] or [0])
        for h in steady
    )
    record["img_per_s_per_gpu"] = record["img_per_s"] / gpus
    # The actor's allocator peaks per phase, the largest over every step and rank (step 1 included, as the GPU's
    # peak is): which phase sets the GPU's peak.
    for name in (
        "update_peak_allocated_gb",
        "update_peak_reserved_gb",
        "rollout_peak_allocated_gb",
        "rollout_peak_reserved_gb",
    ):
        values = [v for h in history for k, v in h.items() if k.startswith(f"perf/{name}/")]
        if values:
            record[name] = max(values)


def ocr_data_dir(work_dir: str) -> str:
    """``<work_dir>/data`` with the OCR prompts' train.parquet / test.parquet (written on first use)."""
    sys.path.insert(0, os.path.join(REPO, "examples", "flowgrpo_trainer", "data_process"))
    from qwenimage_ocr import write_ocr_parquet

    data_dir = os.path.join(work_dir, "data")
    if not os.path.exists(os.path.join(data_dir, "train.parquet")):
        write_ocr_parquet(data_dir, 256, 4, 0)
    return data_dir


def add_run_args(ap: argparse.ArgumentParser, work_dir: str) -> None:
    """The flags every trainer benchmark takes: where models and runs go, the JSON list, variants, the commit."""
    ap.add_argument("--model-dir", default="/tmp/verl_omni_models")
    ap.add_argument("--work-dir", default=work_dir)
    ap.add_argument("--out", required=True)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a config override (repeatable)")
    ap.add_argument("--name", default="", help="a label for this variant in the JSON")
    ap.add_argument("--commit", default="", help="the project commit measured (recorded as is)")


def parse_run_args(ap: argparse.ArgumentParser) -> argparse.Namespace:
    """``ap``'s arguments; every ``--set`` must be KEY=VALUE."""
    args = ap.parse_args()
    bad = [item for item in args.set if "=" not in item]
    if bad:
        ap.error(f"--set takes KEY=VALUE, got {bad}")
    return args


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=60)
    ap.add_argument("--gpus", type=int, default=1)
    ap.add_argument("--engine", default="vllm_omni", choices=("vllm_omni", "diffusers"))
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--prompts-per-gpu", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--rewards", default="ocr", help="comma-separated reward names (weight 1 each)")
    ap.add_argument(
        "--light-text-encoder",
        action="store_true",
        help="the model with a 2-layer text encoder in place of Qwen2.5-VL-7B (the figures of earlier code were "
        "measured on it)",
    )
    add_run_args(ap, "/tmp/verl_omni_e2e")
    args = parse_run_args(ap)

    import torch

    model_dir = build_model(args.model_dir, args.layers, light_text_encoder=args.light_text_encoder)
    data_dir = ocr_data_dir(args.work_dir)
    run_name = f"{args.engine}_g{args.gpus}_L{args.layers}_mb{args.micro_batch}"
    cfg = recipe_config(args, model_dir, data_dir, os.path.join(args.work_dir, run_name))
    record: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0),
        "gpus": args.gpus,
        "layers": args.layers,
        **model_summary(model_dir),
        "engine": args.engine,
        "micro_batch": args.micro_batch,
        "rewards": args.rewards,
        "images_per_step": args.prompts_per_gpu * args.gpus * 16,
        "algorithm": str(cfg.algorithm.get("name", "flowgrpo")),
        "text_encoder_offload": cfg.actor_rollout_ref.model.get("text_encoder_offload", "auto"),
        "commit": args.commit,
    }
    if args.set or args.name:
        record["variant"] = args.name
        record["overrides"] = list(args.set)
    history = run_trainer(cfg, run_name, record)
    summarize(history, record, cfg, gpus=args.gpus)
    log(json.dumps({k: v for k, v in record.items() if k != "steps"}))
    append_run(record, args.out)


if __name__ == "__main__":
    main()
