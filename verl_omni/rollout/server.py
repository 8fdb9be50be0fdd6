"""The Ray actor that serves one diffusion engine, over Ray calls and over HTTP.

verl's server manager acquires a server handle from its load balancer and calls ``generate`` on it as a
Ray method (like verl's vLLM server); the same verbs are also served over HTTP for health checks and
clients outside Ray. ``generate`` is ``generate_batched`` with N=1: one code path. Over Ray a call returns its
rollout record whole (``RLBatchOutput.to_payload()``: the N samples' tensors with their batch axis, never split per
sample); HTTP clients get a JSON summary per sample.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from typing import Any, Optional

# At module level: FastAPI reads the handler's (postponed) annotation by name from this module.
from starlette.requests import Request

from verl_omni.config.model import ModelConfig
from verl_omni.config.rollout import RolloutConfig
from verl_omni.core.outputs import RLBatchOutput
from verl_omni.rollout.engines import get_engine_class
from verl_omni.rollout.ports import reserve_socket
from verl_omni.rollout.request import ModelLimits, validate_request

logger = logging.getLogger(__name__)


class DiffusionHttpServer:
    """One engine replica. Build with ``ray.remote(DiffusionHttpServer)``; call ``launch_server`` once."""

    def __init__(self, model: ModelConfig, rollout: RolloutConfig, replica_rank: int = 0, host: str = "127.0.0.1"):
        self.replica_rank = replica_rank
        self.engine_name = rollout.name
        self.rollout = rollout
        self.model_limits = ModelLimits.of(model.path, model.pipeline)
        self.engine = get_engine_class(rollout.name)(model, rollout)
        self.host = host
        port_base = rollout.server_port_base
        self._port_base = None if port_base is None else port_base + replica_rank
        self._socket = None
        self._port: Optional[int] = None
        self._uvicorn = None
        self._inflight: dict[str, asyncio.Task] = {}
        self.stats = {"engine_calls": 0, "images": 0, "engine_seconds": 0.0, "batch_sizes": []}
        self._calls_in_flight, self._busy_since = 0, 0.0

    # ------------------------------------------------------------------ lifecycle
    async def launch_server(self) -> tuple[str, int]:
        import uvicorn

        self._actor_loop = asyncio.get_running_loop()
        self._socket = reserve_socket(self.host, self._port_base)
        self._port = self._socket.getsockname()[1]
        config = uvicorn.Config(self._build_app(), log_level="warning", lifespan="off")
        self._uvicorn = uvicorn.Server(config)
        # Serve on our own loop thread: the actor's loop keeps answering Ray calls.
        thread = threading.Thread(
            target=lambda: asyncio.run(self._uvicorn.serve(sockets=[self._socket])),
            daemon=True,
            name=f"diffusion-http-{self.replica_rank}",
        )
        thread.start()
        for _ in range(200):
            if self._uvicorn.started:
                break
            await asyncio.sleep(0.02)
        if not self._uvicorn.started:
            raise RuntimeError(
                f"replica {self.replica_rank}: HTTP server on {self.host}:{self._port} did not start within 4 s"
            )
        return self.host, self._port

    def get_server_address(self) -> tuple[str, int]:
        return self.host, self._port

    def _build_app(self):
        from fastapi import FastAPI, HTTPException
        from fastapi.responses import JSONResponse

        app = FastAPI(title=f"verl_omni diffusion server {self.replica_rank}")

        @app.get("/health")
        async def health() -> dict:
            return {"status": "ok", "engine": self.engine_name, "replica_rank": self.replica_rank}

        @app.get("/stats")
        async def stats() -> dict:
            return self.get_stats()

        @app.post("/v1/generate_batched")
        async def generate_batched(body: dict, request: Request) -> dict:
            allowed = {"request_id", "prompt", "num_outputs_per_prompt", "seeds", "sampling_params"}
            unknown = sorted(set(body) - allowed)
            if unknown:
                raise HTTPException(status_code=422, detail=f"unknown keys {unknown}; allowed: {sorted(allowed)}")
            try:
                outputs = await _unless_client_leaves(self._run_in_actor_loop(body), request)
            except _ClientGone as gone:  # nobody reads this answer; the engine work is already aborted
                return JSONResponse(status_code=499, content={"detail": str(gone)})
            except ValueError as exc:
                raise HTTPException(status_code=422, detail=str(exc)) from None
            except TimeoutError as exc:
                raise HTTPException(status_code=504, detail=str(exc)) from None
            record = RLBatchOutput.from_payload(outputs)
            return {"outputs": [_json_summary(record, i) for i in range(record.batch_size)]}

        return app

    async def _run_in_actor_loop(self, body: dict):
        # HTTP runs on its own loop thread; the engine belongs to the actor, so hop over to it.
        return await asyncio.wrap_future(
            asyncio.run_coroutine_threadsafe(
                self.generate_batched(
                    request_id=body.get("request_id") or uuid.uuid4().hex,  # unique: _inflight is keyed by it
                    prompt=body.get("prompt"),
                    num_outputs_per_prompt=body.get("num_outputs_per_prompt", 1),
                    seeds=body.get("seeds"),
                    sampling_params=body.get("sampling_params"),
                ),
                self._actor_loop,
            )
        )

    # ------------------------------------------------------------------ generation
    async def generate_batched(
        self,
        request_id: str,
        prompt: str,
        num_outputs_per_prompt: int,
        seeds: list[int],
        sampling_params: Optional[dict] = None,
    ) -> dict:
        """N samples of one prompt from ONE engine call of batch N; returns its rollout record as one payload
        (``RLBatchOutput.to_payload()``, with the settings it was sampled with)."""
        request = validate_request(
            prompt, num_outputs_per_prompt, seeds, sampling_params, self.rollout.limits, self.model_limits
        )
        task = asyncio.ensure_future(self._engine_call(request.prompt, request.seeds, request.params, request_id))
        self._inflight[request_id] = task
        try:
            batch = await asyncio.wait_for(asyncio.shield(task), timeout=self.rollout.request_timeout_s)
        except asyncio.CancelledError:
            # The caller has gone (a cancelled Ray call, a closed HTTP connection): stop the engine-side work, or
            # the next request waits behind a result nobody reads.
            await self._cancel(request_id, task)
            raise
        except asyncio.TimeoutError:
            # Stop the engine-side work too, so the next request is served (not queued behind an orphan).
            await self._cancel(request_id, task)
            raise TimeoutError(
                f"replica {self.replica_rank}: request {request_id} took longer than "
                f"actor_rollout_ref.rollout.request_timeout_s={self.rollout.request_timeout_s}s"
            ) from None
        finally:
            self._inflight.pop(request_id, None)
        if batch.sampling is None:  # an engine that did not say: it ran the validated request
            batch.sampling = request.params.to_dict()
        return batch.check().to_payload()

    async def generate(self, request_id: str, prompt: str, seed: int, sampling_params: Optional[dict] = None) -> dict:
        """One sample: the N=1 case of ``generate_batched`` (a record of batch 1)."""
        return await self.generate_batched(request_id, prompt, 1, [seed], sampling_params)

    async def _engine_call(self, prompt, seeds, params, request_id: Optional[str] = None):
        # engine_seconds: wall time with at least one call in flight (the union of the calls' intervals, not their
        # sum: concurrent calls queue in the engine, and a sum would count the queueing as work).
        if self._calls_in_flight == 0:
            self._busy_since = time.perf_counter()
        self._calls_in_flight += 1
        try:
            # The engine gets the caller's id so that abort(request_id) can find the engine-side request.
            batch = await self.engine.generate(prompt, seeds, params, request_id=request_id)
        finally:
            self._calls_in_flight -= 1
            if self._calls_in_flight == 0:
                self.stats["engine_seconds"] += time.perf_counter() - self._busy_since
        self.stats["engine_calls"] += 1
        self.stats["images"] += len(seeds)
        self.stats["batch_sizes"].append(len(seeds))
        return batch

    def get_stats(self) -> dict:
        return {**self.stats, "replica_rank": self.replica_rank, "inflight": len(self._inflight)}

    def reset_stats(self) -> None:
        self.stats = {"engine_calls": 0, "images": 0, "engine_seconds": 0.0, "batch_sizes": []}
        if self._calls_in_flight:  # a call spanning the reset counts from the reset on
            self._busy_since = time.perf_counter()

    # ------------------------------------------------------------------ verl's server verbs
    async def update_lora(self, tensors: dict) -> str:
        return await self.engine.update_lora(tensors)

    async def lora_checksum(self) -> Optional[str]:
        return await self.engine.lora_checksum()

    async def sleep(self, level: int = 1) -> None:
        await self.engine.sleep(level)

    async def wake_up(self, tags: Optional[list[str]] = None) -> None:
        await self.engine.wake_up()

    async def _cancel(self, request_id: str, task: asyncio.Task) -> None:
        await self.engine.abort(request_id)
        task.cancel()
        # Wait (bounded) until the engine call has really ended; it checks for aborts between denoising steps.
        await asyncio.wait([task], timeout=self.rollout.request_timeout_s)

    async def abort(self, request_id: str) -> bool:
        task = self._inflight.get(request_id)
        if task is None:
            await self.engine.abort(request_id)
            return False
        await self._cancel(request_id, task)
        return True

    async def abort_all_requests(self, reject_request: bool = False, **_: Any) -> dict:
        ids = list(self._inflight)
        for rid in ids:
            await self.abort(rid)
        return {"aborted": ids}

    async def resume_generation(self) -> None:
        return None

    async def clear_kv_cache(self) -> None:  # diffusion engines keep no KV cache between requests
        return None

    # ------------------------------------------------------------------ the hybrid engine's actor rank
    def rendezvous_address(self) -> tuple[str, int]:
        """(this node's IP, a free port) for the gradient all-reduce of the actor ranks (asked of replica 0)."""
        import ray

        sock = reserve_socket("0.0.0.0")
        port = sock.getsockname()[1]
        sock.close()  # the store binds it next, on the same node; the window between is short
        return ray.util.get_node_ip_address(), port

    async def init_actor(self, actor, rank: int, world_size: int, address, lora_seed: int, algorithm=None) -> None:
        await self.engine.init_actor(
            actor, rank, world_size, None if address is None else tuple(address), lora_seed, algorithm
        )

    async def actor_call(self, verb: str, *args: Any) -> Any:
        return await self.engine.actor_call(verb, *args)

    async def shutdown(self) -> None:
        if self._uvicorn is not None:
            self._uvicorn.should_exit = True
        await self.engine.shutdown()


class _ClientGone(Exception):
    """The HTTP client disconnected before its answer was ready."""


async def _unless_client_leaves(call, request: Request) -> Any:
    """Await ``call``; if the HTTP client disconnects first, cancel it (``generate_batched`` then aborts the engine
    work) and raise ``_ClientGone``. Starlette does not cancel a handler whose client has gone."""
    work = asyncio.ensure_future(call)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait([work, gone], return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:  # the handler itself was cancelled (the server stops): the call goes with it
        work.cancel()
        raise
    finally:
        gone.cancel()
    if not work.done():
        work.cancel()
        await asyncio.wait([work])
        raise _ClientGone(f"the client of {request.url.path} disconnected; its request was aborted")
    return work.result()


async def _disconnected(request: Request) -> None:
    """Return when the client of ``request`` (whose body is already read) disconnects."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _json_summary(record: RLBatchOutput, i: int) -> dict:
    """JSON-safe view of sample ``i`` of a record for HTTP clients: PNG of its (first) frame (base64), its number of
    frames and per-step log-probs."""
    import base64
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(record.media[i, 0].numpy()).save(buf, format="PNG")
    return {
        "seed": int(record.seeds[i]),
        "image_png_base64": base64.b64encode(buf.getvalue()).decode(),
        "num_frames": record.num_frames,
        "log_probs": record.log_probs[i].tolist(),
        "timesteps": record.timesteps.tolist(),
        "window_mask": record.window_mask.tolist(),
    }
