"""One engine serving the evaluated policy, and the evaluation of one prompt on it: its images generated as one
batch of ``images_per_prompt`` seeds, saved, and scored by the registered rewards."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Iterator
from typing import Any, Optional

from verl_omni.config.base import build
from verl_omni.config.model import ModelConfig
from verl_omni.config.rollout import RolloutConfig
from verl_omni.eval.job import EvalJob
from verl_omni.eval.ocr import RecordingOcr
from verl_omni.eval.prompts import EvalPrompt
from verl_omni.eval.report import save_images
from verl_omni.export import TrainedAdapter
from verl_omni.rewards import RewardManager
from verl_omni.rollout.engines import get_engine_class


def reward_names(job: EvalJob) -> list[str]:
    return [r["name"] for r in job.rewards]


def load_engine(job: EvalJob, adapter: Optional[TrainedAdapter]):
    """The engine behind the seam, serving ``adapter`` (verified by the checksum the engine reports)."""
    model = ModelConfig(
        path=job.base,
        pipeline=job.family(),
        lora_rank=adapter.rank if adapter else 0,
        lora_alpha=adapter.alpha if adapter else 16.0,
        target_modules=tuple(adapter.target_modules) if adapter else ModelConfig.target_modules,
        gelu_epilogue=job.device.startswith("cuda"),
    )
    rollout = build(RolloutConfig, {"name": job.engine, "device": job.device, "dtype": job.dtype})
    return get_engine_class(job.engine)(model, rollout)


class PromptEvaluator:
    """``evaluate(index, prompt)``: the report row of one prompt (its seeds, scores, image files, OCR readings)."""

    def __init__(self, job: EvalJob, loop: asyncio.AbstractEventLoop, engine) -> None:
        self.job, self.loop, self.engine = job, loop, engine
        self.names = reward_names(job)
        self.recorder = RecordingOcr()
        fns = {"ocr": self.recorder} if "ocr" in self.names else None
        self.manager = RewardManager({"rewards": job.rewards}, reward_fns=fns)
        self.params = job.protocol.sampling_params()

    def __call__(self, index: int, prompt: EvalPrompt) -> dict[str, Any]:
        seeds = self.job.protocol.seeds(index)
        output = self.loop.run_until_complete(
            self.engine.generate(prompt.text, seeds, self.params, request_id=f"eval-{index}")
        )
        images = output.images.numpy()
        n = len(seeds)
        result = self.manager(list(images), [prompt.text] * n, [prompt.metadata] * n)
        row = {
            "index": index,
            "prompt": prompt.text,
            "seeds": seeds,
            "scores": {"total": result.total.tolist(), **{k: v.tolist() for k, v in result.per_reward.items()}},
            "images": save_images(os.path.join(self.job.out, "images"), index, images),
        }
        if "ocr" in self.names:
            row["ocr"] = self.recorder.take()
        return row


@contextlib.contextmanager
def engine_session(job: EvalJob, adapter: Optional[TrainedAdapter]) -> Iterator[PromptEvaluator]:
    """Build the engine on its own event loop, load the adapter, yield the prompt evaluator, shut the engine down."""
    loop = asyncio.new_event_loop()

    async def build_engine():  # inside the loop: an engine may bind background tasks to the loop that builds it
        return load_engine(job, adapter)

    engine = None
    try:
        engine = loop.run_until_complete(build_engine())
        if adapter is not None:
            served = loop.run_until_complete(engine.update_lora(adapter.tensors))
            if served != adapter.checksum:
                raise RuntimeError(f"the engine serves adapter {served[:12]}…, not the checkpoint's {adapter.checksum}")
        yield PromptEvaluator(job, loop, engine)
    finally:
        if engine is not None:
            loop.run_until_complete(engine.shutdown())
        loop.close()
