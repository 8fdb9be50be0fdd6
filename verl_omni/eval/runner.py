"""Evaluate a base pipeline, or a checkpoint's adapter on it, over a prompt file with one protocol.

Each prompt is one engine call of ``images_per_prompt`` seeds (a batch of B=N, as a rollout group), through the
engine seam (``rollout.engines``: diffusers on CPU, vllm_omni on a GPU). Scores come from the registered rewards
(``rewards.registry.RewardManager``), exactly as training and validation compute them.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from tqdm import tqdm

from verl_omni.config.base import build
from verl_omni.config.model import ModelConfig
from verl_omni.config.rollout import RolloutConfig
from verl_omni.eval.ocr import RecordingOcr
from verl_omni.eval.prompts import EvalPrompt, file_sha256, load_prompts
from verl_omni.eval.protocol import EvalProtocol
from verl_omni.eval.report import (
    check_resumable,
    read_report,
    save_images,
    summarize,
    write_grids,
    write_report,
)
from verl_omni.export import TrainedAdapter, read_adapter
from verl_omni.pipelines import AUTO, family_for_model_dir
from verl_omni.pipelines.loading import check_schedule, vae_scale_factor_of
from verl_omni.rewards import RewardManager
from verl_omni.rollout.engines import get_engine_class


@dataclass
class EvalJob:
    """Everything one evaluation needs; ``run_evaluation`` writes its report under ``out``."""

    base: str  # a diffusers pipeline directory
    prompts: str  # a prompt file (prompts.py)
    out: str
    protocol: EvalProtocol = field(default_factory=EvalProtocol)
    rewards: list[dict] = field(default_factory=lambda: [{"name": "ocr", "weight": 1.0}])
    checkpoint: Optional[str] = None  # a global_step_<k> dir or a run dir; None: the base pipeline alone
    weights: str = "lora"  # lora | ema (export.WEIGHTS_CHOICES)
    lora_alpha: Optional[float] = None  # only for checkpoints that do not record it
    pipeline: str = AUTO  # the model family; auto: from the base's model_index.json
    engine: str = "diffusers"
    device: str = "cpu"
    dtype: str = "float32"
    prompt_key: str = "prompt"
    limit: Optional[int] = None  # the first ``limit`` prompts of the file
    save_every: int = 16  # prompts between report rewrites
    prompts_per_grid: int = 16
    overwrite: bool = False
    progress: Optional[bool] = None  # tqdm's disable=None: a bar on a terminal only


def run_evaluation(job: EvalJob) -> dict[str, Any]:
    """Evaluate (resuming an existing report of the same evaluation) and return the report."""
    adapter = read_adapter(job.checkpoint, job.weights, alpha=job.lora_alpha) if job.checkpoint else None
    prompts = load_prompts(job.prompts, job.prompt_key)[: job.limit]
    check_protocol_fits(job.protocol, job.base)
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
        _evaluate_prompts(job, adapter, prompts, pending, report)
    report["summary"] = summarize(sorted(report["per_prompt"], key=lambda p: p["index"]), _reward_names(job))
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


def _header(job: EvalJob, adapter: Optional[TrainedAdapter], num_prompts: int) -> dict[str, Any]:
    return {
        "model": {
            "base": os.path.abspath(job.base),
            "pipeline": _family(job),
            "engine": job.engine,
            "dtype": job.dtype,
        },
        "checkpoint": adapter.info() if adapter else None,
        "protocol": job.protocol.to_dict(),
        "rewards": [dict(r) for r in job.rewards],
        "prompts": {"path": os.path.abspath(job.prompts), "sha256": file_sha256(job.prompts), "count": num_prompts},
    }


def _family(job: EvalJob) -> str:
    return family_for_model_dir(job.base) if job.pipeline == AUTO else job.pipeline


def _reward_names(job: EvalJob) -> list[str]:
    return [r["name"] for r in job.rewards]


def load_engine(job: EvalJob, adapter: Optional[TrainedAdapter]):
    """The engine behind the seam, serving ``adapter`` (verified by the checksum the engine reports)."""
    model = ModelConfig(
        path=job.base,
        pipeline=_family(job),
        lora_rank=adapter.rank if adapter else 0,
        lora_alpha=adapter.alpha if adapter else 16.0,
        target_modules=tuple(adapter.target_modules) if adapter else ModelConfig.target_modules,
        gelu_epilogue=job.device.startswith("cuda"),
    )
    rollout = build(RolloutConfig, {"name": job.engine, "device": job.device, "dtype": job.dtype})
    return get_engine_class(job.engine)(model, rollout)


def _evaluate_prompts(job: EvalJob, adapter, prompts: list[EvalPrompt], pending: list[int], report: dict) -> None:
    loop = asyncio.new_event_loop()

    async def build():  # inside the loop: an engine may bind background tasks to the loop that builds it
        return load_engine(job, adapter)

    engine = None
    try:
        engine = loop.run_until_complete(build())
        if adapter is not None:
            served = loop.run_until_complete(engine.update_lora(adapter.tensors))
            if served != adapter.checksum:
                raise RuntimeError(f"the engine serves adapter {served[:12]}…, not the checkpoint's {adapter.checksum}")
        recorder = RecordingOcr()
        names = _reward_names(job)
        manager = RewardManager({"rewards": job.rewards}, reward_fns={"ocr": recorder} if "ocr" in names else None)
        params = job.protocol.sampling_params()
        bar = tqdm(
            total=len(prompts), initial=len(prompts) - len(pending), desc="eval", disable=_tqdm_disable(job.progress)
        )
        start, images_done = time.perf_counter(), 0
        for k, index in enumerate(pending):
            prompt = prompts[index]
            seeds = job.protocol.seeds(index)
            output = loop.run_until_complete(engine.generate(prompt.text, seeds, params, request_id=f"eval-{index}"))
            images = output.images.numpy()
            n = len(seeds)
            result = manager(list(images), [prompt.text] * n, [prompt.metadata] * n)
            row = {
                "index": index,
                "prompt": prompt.text,
                "seeds": seeds,
                "scores": {"total": result.total.tolist(), **{k: v.tolist() for k, v in result.per_reward.items()}},
                "images": save_images(os.path.join(job.out, "images"), index, images),
            }
            if "ocr" in names:
                row["ocr"] = recorder.take()
            report["per_prompt"].append(row)
            report["done"].append(index)
            images_done += n
            bar.update(1)
            if (k + 1) % job.save_every == 0:
                write_report(job.out, report)
        bar.close()
        seconds = time.perf_counter() - start
        report.setdefault("timing", []).append(
            {"prompts": len(pending), "images": images_done, "seconds": seconds, "images_per_s": images_done / seconds}
        )
    finally:
        if engine is not None:
            loop.run_until_complete(engine.shutdown())
        loop.close()


def _tqdm_disable(progress: Optional[bool]) -> Optional[bool]:
    return None if progress is None else not progress
