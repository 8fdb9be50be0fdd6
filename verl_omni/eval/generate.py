"""One engine serving the evaluated policy, and the evaluation of prompts on it: consecutive prompts' images generated
as one batch of up to ``batch_images`` (whole prompts of ``images_per_prompt`` seeds each), then saved and scored by
the registered rewards on a scoring thread while the engine generates the next batch."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Optional

from verl_omni.config.base import build
from verl_omni.config.model import ModelConfig
from verl_omni.config.rollout import RolloutConfig
from verl_omni.core.media import media_samples
from verl_omni.eval.job import EvalJob
from verl_omni.eval.ocr import RecordingOcr
from verl_omni.eval.prompts import EvalPrompt
from verl_omni.eval.report import save_images
from verl_omni.export import TrainedAdapter
from verl_omni.rewards import RewardManager
from verl_omni.rollout.engines import get_engine_class
from verl_omni.trainer.media_outputs import DEFAULT_VIDEO_FPS


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
        **job.model_options(),
    )
    rollout = build(RolloutConfig, {"name": job.engine, "device": job.device, "dtype": job.dtype})
    return get_engine_class(job.engine)(model, rollout)


class PromptFailed(RuntimeError):
    """The evaluation of one prompt failed (its generation, saving or scoring); ``index`` names it. A failed engine
    call of several prompts names its first prompt and says how many it held."""

    def __init__(self, index: int, prompt: EvalPrompt, cause: BaseException, call_prompts: int = 1) -> None:
        shared = f", the first of the {call_prompts} prompts of its engine call" if call_prompts > 1 else ""
        super().__init__(f"prompt {index} ({prompt.text[:80]!r}{shared}): {type(cause).__name__}: {cause}")
        self.index, self.cause = index, cause


class PromptEvaluator:
    """``rows(items)``: the report rows of ``(index, prompt)`` items (seeds, scores, image files, OCR readings), in
    the items' order.

    The engine generates consecutive items together on this thread: one call of ``job.prompts_per_call()`` prompts
    (up to ``--batch-images`` images, whole prompts; each prompt's seeds as with one call per prompt). Each prompt's
    images are saved and scored on one scoring thread, in order (the OCR recorder and the reward functions see one
    prompt at a time, as serially), while the engine goes on with the next call. The engine starts a call only once
    at most ``job.prefetch_prompts()`` prompts wait for their scoring (0: serial). The engine gets one call at a
    time: concurrent calls would not make larger batches (diffusers serialises calls on its lock; the vllm-omni
    worker merges only requests of the same prompts and parameters), and would take prompts ahead of the other
    ``--gpus`` workers.
    """

    def __init__(self, job: EvalJob, loop: asyncio.AbstractEventLoop, engine) -> None:
        self.job, self.loop, self.engine = job, loop, engine
        self.names = reward_names(job)
        self.recorder = RecordingOcr()
        fns = {"ocr": self.recorder} if "ocr" in self.names else None
        self.manager = RewardManager({"rewards": job.rewards}, reward_fns=fns)
        self.params = job.protocol.sampling_params()

    def rows(self, items: Iterable[tuple[int, EvalPrompt]]) -> Iterator[dict[str, Any]]:
        """Rows in the items' order; a failure raises ``PromptFailed`` after the rows of the prompts before it."""
        waiting: deque[tuple[int, EvalPrompt, Future]] = deque()
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="verl-omni-eval-score")
        prefetch = self.job.prefetch_prompts()
        try:
            for call in engine_calls(items, self.job.prompts_per_call()):
                try:
                    generated = self._generate(call)
                except BaseException:
                    yield from self._drain(waiting)  # the prompts before this call keep their rows
                    raise
                for index, prompt, seeds, images in generated:
                    waiting.append((index, prompt, pool.submit(self._score, index, prompt, seeds, images)))
                while waiting and (len(waiting) > prefetch or waiting[0][2].done()):
                    yield _finished(*waiting.popleft())  # rows leave as soon as scored, in order
            yield from self._drain(waiting)
        finally:  # after a failure: prompts queued behind it are dropped, the one being scored finishes first
            pool.shutdown(wait=True, cancel_futures=True)

    def _generate(self, call: list[tuple[int, EvalPrompt]]) -> list[tuple[int, EvalPrompt, list[int], Any]]:
        """One engine call for the prompts of ``call``: (index, prompt, seeds, images) per prompt. One prompt is the
        engine's ``generate``; several are one ``generate_rows`` call, each prompt's rows in order."""
        seeds = [self.job.protocol.seeds(index) for index, _ in call]
        first = call[0][0]
        try:
            if len(call) == 1:
                request = self.engine.generate(call[0][1].text, seeds[0], self.params, request_id=f"eval-{first}")
            else:
                prompts = [prompt.text for (_, prompt), s in zip(call, seeds, strict=True) for _ in s]
                flat = [seed for s in seeds for seed in s]
                request_id = f"eval-{first}-{call[-1][0]}"
                request = self.engine.generate_rows(prompts, flat, self.params, request_id=request_id)
            # images [H, W, 3], video clips [F, H, W, 3]
            images = media_samples(self.loop.run_until_complete(request).media)
        except Exception as exc:
            raise PromptFailed(first, call[0][1], exc, len(call)) from exc
        out, start = [], 0
        for (index, prompt), s in zip(call, seeds, strict=True):
            out.append((index, prompt, s, images[start : start + len(s)]))
            start += len(s)
        return out

    @property
    def video_fps(self) -> float:
        """Frames per second of saved clips: the family's ``fps`` option (``--family-option fps=...``), else the
        trainer's default."""
        return float(self.job.family_options.get("fps") or DEFAULT_VIDEO_FPS)

    def _score(self, index: int, prompt: EvalPrompt, seeds: list[int], images) -> dict[str, Any]:
        n = len(seeds)
        result = self.manager(list(images), [prompt.text] * n, [prompt.metadata] * n)
        row = {
            "index": index,
            "prompt": prompt.text,
            "seeds": seeds,
            "scores": {"total": result.total.tolist(), **{k: v.tolist() for k, v in result.per_reward.items()}},
            "images": save_images(os.path.join(self.job.out, "images"), index, images, self.video_fps),
        }
        if "ocr" in self.names:
            row["ocr"] = self.recorder.take()
        return row

    @staticmethod
    def _drain(waiting: deque) -> Iterator[dict[str, Any]]:
        while waiting:
            yield _finished(*waiting.popleft())


def engine_calls(items: Iterable[tuple[int, EvalPrompt]], prompts_per_call: int) -> Iterator[list]:
    """Consecutive items in lists of ``prompts_per_call`` (the last one shorter), each one engine call; an item is
    taken from ``items`` only when its call is formed."""
    it = iter(items)
    while call := list(itertools.islice(it, prompts_per_call)):
        yield call


def _finished(index: int, prompt: EvalPrompt, future: Future) -> dict[str, Any]:
    try:
        return future.result()
    except Exception as exc:
        raise PromptFailed(index, prompt, exc) from exc


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
