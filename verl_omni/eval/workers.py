"""Evaluation over several devices of one host: ``gpus`` worker processes, one engine each.

Each worker is a spawned process started with ``CUDA_VISIBLE_DEVICES`` set to its one GPU (on ``--device cpu``,
a CPU process). Workers take the pending prompts one engine call at a time from a shared counter (the next
``prompts_per_call`` consecutive ones as soon as the engine is free, while the last call's images are saved and
scored), and send each prompt's report row to this
process, which keeps the report, the progress bar and the timing. A prompt's seeds depend on its index only, so the
report does not depend on how many workers made it. A worker that fails stops the run with its error, naming its
device and prompt; the rows already received stay in the report.
"""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing as mp
import os
import queue
import signal
import sys
import time
import traceback
from collections.abc import Iterator
from typing import Optional

from verl_omni.eval.generate import PromptFailed, engine_session
from verl_omni.eval.job import EvalJob
from verl_omni.eval.prompts import EvalPrompt
from verl_omni.eval.report import add_row, timing_entry, write_report
from verl_omni.export import TrainedAdapter

POLL_S = 1.0  # how often the parent looks for workers that died without a word (killed, out of memory)
EXIT_S = 60.0  # how long a finished worker may take to exit before it is terminated


def worker_devices(device: str, gpus: int) -> list[Optional[str]]:
    """Each worker's ``CUDA_VISIBLE_DEVICES`` (None on CPU): the GPUs this process sees, in order."""
    if device == "cpu":
        return [None] * gpus
    if device != "cuda":
        raise ValueError(
            f"--gpus {gpus} runs one worker per GPU with --device cuda (each worker sees its GPU as cuda) or "
            f"--device cpu; got --device {device}"
        )
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        ids = [v.strip() for v in visible.split(",") if v.strip()]
    else:
        import torch

        ids = [str(i) for i in range(torch.cuda.device_count())]
    if len(ids) < gpus:
        raise ValueError(f"--gpus {gpus}: only {len(ids)} GPU(s) visible (CUDA_VISIBLE_DEVICES={visible!r})")
    return ids[:gpus]


def evaluate_in_workers(
    job: EvalJob, adapter: Optional[TrainedAdapter], prompts: list[EvalPrompt], pending: list[int], report: dict, bar
) -> None:
    """Evaluate ``pending`` on ``job.gpus`` workers, adding each row to ``report`` as it arrives."""
    calls = -(-len(pending) // job.prompts_per_call())
    visible = worker_devices(job.device, job.gpus)[:calls]  # no worker without a call to make
    ctx = mp.get_context("spawn")
    results, go, counter = ctx.Queue(), ctx.Event(), ctx.Value("q", 0)
    worker_job = dataclasses.replace(job, gpus=1, progress=False)
    procs = []
    try:
        for rank, gpu in enumerate(visible):
            with _cuda_visible(gpu):  # the spawned interpreter inherits this environment
                proc = ctx.Process(
                    target=_work,
                    args=(rank, worker_job, adapter, prompts, pending, counter, results, go, os.getpid()),
                    name=f"verl-omni-eval-{rank}",
                    daemon=False,  # an engine may start processes of its own (vllm-omni's)
                )
                proc.start()
            procs.append(proc)
        _collect(job, visible, procs, prompts, report, bar, results, go)
        for proc in procs:  # every worker said it finished: let it exit by itself
            proc.join(timeout=EXIT_S)
    finally:
        _stop(procs)


def _collect(job, visible, procs, prompts, report, bar, results, go) -> None:
    """The parent's loop: start the workers together once every engine is ready, record rows, raise on a failure."""
    ready, finished, current = 0, set(), {}  # current: each worker's prompts taken and not yet reported
    start = end = time.perf_counter()
    rows = images = 0
    while len(finished) < len(procs):
        try:
            kind, rank, payload = results.get(timeout=POLL_S)
        except queue.Empty:
            _raise_if_dead(job.device, visible, procs, current, prompts)
            continue
        if kind == "ready":
            ready += 1
            if ready == len(procs):
                start = time.perf_counter()
                go.set()
        elif kind == "start":
            current.setdefault(rank, []).append(payload)
        elif kind == "row":
            add_row(report, payload)
            if payload["index"] in current.get(rank, ()):
                current[rank].remove(payload["index"])
            rows += 1
            images += len(payload["seeds"])
            end = time.perf_counter()
            bar.update(1)
            if len(report["done"]) % job.save_every == 0:
                write_report(job.out, report)
        elif kind == "finished":
            finished.add(rank)
        else:  # "error"
            raise RuntimeError(
                f"evaluation worker {rank} ({_device_name(job.device, visible[rank])}) failed "
                f"{_where(payload['index'], prompts)}: {payload['error']}\n--- worker traceback ---\n"
                f"{payload['traceback']}"
            )
    report.setdefault("timing", []).append(timing_entry(rows, images, end - start, len(procs), job.batch_images))


def _stop(procs) -> None:
    """Workers still running (after an error or an interrupt) get SIGTERM, which shuts their engine down; one that
    does not exit in ``EXIT_S`` is killed."""
    for proc in procs:
        if proc.is_alive():
            proc.terminate()
    for proc in procs:
        proc.join(timeout=EXIT_S)
        if proc.is_alive():
            proc.kill()
            proc.join()


def _raise_if_dead(device, visible, procs, current, prompts) -> None:
    """A worker killed from outside (out of memory, a signal) sends no error: its exit code tells."""
    for rank, proc in enumerate(procs):
        if proc.exitcode not in (None, 0):
            raise RuntimeError(
                f"evaluation worker {rank} ({_device_name(device, visible[rank])}) exited with code "
                f"{proc.exitcode} {_where((current.get(rank) or [None])[0], prompts)}"
            )


def _work(rank, job, adapter, prompts, pending, counter, results, go, parent) -> None:
    """A worker: build the engine, wait for the others, then evaluate prompts until none is left (or the parent
    process is gone)."""
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    taken = [None]  # the prompt this worker took last

    def items():  # one call's prompts taken together, so the evaluator's calls hold consecutive prompts
        per_call = job.prompts_per_call()
        while os.getppid() == parent and (call := _take(counter, pending, per_call)):
            taken[0] = call[0]
            for index in call:
                results.put(("start", rank, index))
            for index in call:
                yield index, prompts[index]

    try:
        with engine_session(job, adapter) as evaluate:
            results.put(("ready", rank, None))
            while not go.wait(POLL_S):
                if os.getppid() != parent:
                    return
            for row in evaluate.rows(items()):
                results.put(("row", rank, row))
        results.put(("finished", rank, None))
    except BaseException as exc:  # noqa: BLE001 - every failure goes to the parent, which stops the run
        index, cause = (exc.index, exc.cause) if isinstance(exc, PromptFailed) else (taken[0], exc)
        error = {"index": index, "error": f"{type(cause).__name__}: {cause}", "traceback": traceback.format_exc()}
        results.put(("error", rank, error))


def _exit_on_sigterm(signum, frame) -> None:
    sys.exit(128 + signum)  # unwinds through engine_session, which shuts the engine down


def _take(counter, pending: list[int], count: int) -> list[int]:
    """The next ``count`` pending prompts (fewer at the end, none when all are taken)."""
    with counter.get_lock():
        k = counter.value
        counter.value = k + count
    return pending[k : k + count]


def _device_name(device: str, gpu: Optional[str]) -> str:
    return device if gpu is None else f"{device}, CUDA_VISIBLE_DEVICES={gpu}"


def _where(index: Optional[int], prompts: list[EvalPrompt]) -> str:
    if index is None:
        return "outside any prompt (loading or closing its engine)"
    return f"on prompt {index} ({prompts[index].text[:80]!r})"


@contextlib.contextmanager
def _cuda_visible(gpu: Optional[str]) -> Iterator[None]:
    saved = os.environ.get("CUDA_VISIBLE_DEVICES")
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    try:
        yield
    finally:
        if gpu is not None:
            if saved is None:
                del os.environ["CUDA_VISIBLE_DEVICES"]
            else:
                os.environ["CUDA_VISIBLE_DEVICES"] = saved
