"""Evaluate a base pipeline, or a checkpoint's adapter on it, over a prompt file with one protocol.

Consecutive prompts share an engine call of up to ``batch_images`` images (whole prompts, each with its
``images_per_prompt`` seeds), through the engine seam (``rollout.engines``: diffusers on CPU, vllm_omni on a GPU);
their images are saved and scored while the engine generates the next call (``generate.PromptEvaluator``). Scores
come from the registered rewards (``rewards.registry.RewardManager``), exactly as training and validation compute
them. With ``gpus > 1`` the prompts are shared by that many worker processes, one engine each (workers.py); the
report is the same. A prompt's seeds depend on its index only, so the report does not depend on ``batch_images``
beyond float rounding (the engine's batch of different composition).
"""

from __future__ import annotations

import os
import shutil
import time
from typing import Any, Optional

from tqdm import tqdm

from verl_omni.config.model import ModelConfig
from verl_omni.eval.generate import engine_session, reward_names
from verl_omni.eval.job import EvalJob
from verl_omni.eval.prompts import EvalPrompt, file_sha256, load_prompts
from verl_omni.eval.protocol import EvalProtocol
from verl_omni.eval.report import (
    add_row,
    check_resumable,
    read_report,
    sort_rows,
    summarize,
    timing_entry,
    write_grids,
    write_report,
)
from verl_omni.eval.workers import evaluate_in_workers, worker_devices
from verl_omni.export import TrainedAdapter, read_adapter
from verl_omni.pipelines.loading import check_schedule, vae_scale_factor_of

__all__ = ["EvalJob", "check_family_options", "check_protocol_fits", "run_evaluation"]


def run_evaluation(job: EvalJob) -> dict[str, Any]:
    """Evaluate (resuming an existing report of the same evaluation) and return the report."""
    adapter = read_adapter(job.checkpoint, job.weights, alpha=job.lora_alpha) if job.checkpoint else None
    prompts = load_prompts(job.prompts, job.prompt_key)[: job.limit]
    check_protocol_fits(job.protocol, job.base)
    check_family_options(job)
    if job.gpus > 1:
        worker_devices(job.device, job.gpus)  # --device and --gpus agree: checked before any loading
    header = _header(job, adapter, len(prompts))
    if job.overwrite and os.path.isdir(job.out):
        shutil.rmtree(job.out)
    os.makedirs(job.out, exist_ok=True)
    report = read_report(job.out)
    if report is not None:
        check_resumable(report, header, job.out)
    else:
        report = {**header, "per_prompt": [], "done": []}
    done = set(report["done"])
    pending = [i for i in range(len(prompts)) if i not in done]
    if pending:
        evaluate = _evaluate_prompts if job.gpus == 1 else evaluate_in_workers
        bar = tqdm(total=len(prompts), initial=len(done), desc="eval", disable=_tqdm_disable(job.progress))
        try:
            evaluate(job, adapter, prompts, pending, report, bar)
        except BaseException:
            write_report(job.out, report)  # what finished is kept: a rerun evaluates the rest
            raise
        finally:
            bar.close()
    sort_rows(report)
    report["summary"] = summarize(report["per_prompt"], reward_names(job))
    write_report(job.out, report)
    report["grids"] = write_grids(job.out, report["per_prompt"], job.prompts_per_grid)
    write_report(job.out, report)
    return report


def check_protocol_fits(protocol: EvalProtocol, base: str) -> None:
    """The image size fits the model's VAE and its scheduler takes the step count: checked before any loading."""
    if not os.path.isfile(os.path.join(base, "model_index.json")):
        raise FileNotFoundError(f"--base {base} is not a diffusers pipeline directory (no model_index.json)")
    try:
        protocol.sampling_params().validate(vae_scale_factor_of(base))
        check_schedule(base, protocol.num_inference_steps)
    except ValueError as exc:
        raise ValueError(f"evaluation protocol: {exc}") from None


def check_family_options(job: EvalJob) -> None:
    """Build the engine's model section from ``job.family_options`` before anything loads: a bad option is refused
    by its key (``actor_rollout_ref.model.<family>.<key>``)."""
    if job.family_options:
        ModelConfig(path=job.base, pipeline=job.family(), lora_rank=0, **job.model_options())


def _header(job: EvalJob, adapter: Optional[TrainedAdapter], num_prompts: int) -> dict[str, Any]:
    return {
        "model": {
            "base": os.path.abspath(job.base),
            "pipeline": job.family(),
            "engine": job.engine,
            "dtype": job.dtype,
            **({"family_options": dict(job.family_options)} if job.family_options else {}),
        },
        "checkpoint": adapter.info() if adapter else None,
        "protocol": job.protocol.to_dict(),
        "rewards": [dict(r) for r in job.rewards],
        "prompts": {"path": os.path.abspath(job.prompts), "sha256": file_sha256(job.prompts), "count": num_prompts},
    }


def _evaluate_prompts(
    job: EvalJob, adapter, prompts: list[EvalPrompt], pending: list[int], report: dict, bar: tqdm
) -> None:
    """The pending prompts on one engine in this process."""
    with engine_session(job, adapter) as evaluate:
        start, images = time.perf_counter(), 0
        first_call, first = job.prompts_per_call(), None  # first: (images, time) once the first call's rows are in
        for k, row in enumerate(evaluate.rows((index, prompts[index]) for index in pending)):
            add_row(report, row)
            images += len(row["seeds"])
            if k + 1 == first_call:
                first = (images, time.perf_counter())
            bar.update(1)
            if (k + 1) % job.save_every == 0:
                write_report(job.out, report)
        end = time.perf_counter()
        steady = (images - first[0], end - first[1]) if first else None
        entry = timing_entry(len(pending), images, end - start, 1, job.batch_images, steady)
        report.setdefault("timing", []).append(entry)


def _tqdm_disable(progress: Optional[bool]) -> Optional[bool]:
    return None if progress is None else not progress
