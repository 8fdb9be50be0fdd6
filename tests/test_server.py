"""The Ray server actor on the tiny Qwen-Image with the diffusers engine: generate / generate_batched,
bad requests refused before the engine runs, HTTP, ports, LoRA sync, sleep / wake."""

import asyncio
import json
import socket
import urllib.error
import urllib.request

import numpy as np
import pytest
import ray
import torch
from helpers import model_config, rollout_config

from verl_omni.config.sampling import DiffusionSamplingParams
from verl_omni.core.checksum import tensors_checksum
from verl_omni.core.outputs import RLBatchOutput
from verl_omni.rollout.ports import reserve_socket
from verl_omni.rollout.request import ModelLimits
from verl_omni.rollout.server import DiffusionHttpServer

PROMPT = 'a shop sign that says "open"'
SP = {"num_inference_steps": 4, "height": 64, "width": 64}


@pytest.fixture(scope="module")
def server(ray_session, tiny_qwen_image_dir):
    limits = {
        "max_num_outputs_per_prompt": 8,
        "max_pixels": 128 * 128,
        "max_inference_steps": 20,
        "max_prompt_chars": 200,
    }
    actor = (
        ray.remote(DiffusionHttpServer)
        .options(num_cpus=0)
        .remote(model_config(tiny_qwen_image_dir), rollout_config(limits=limits), 0)
    )
    ray.get(actor.launch_server.remote())
    yield actor
    ray.kill(actor)


def test_generate_batched_returns_one_record_of_n_independent_samples(server):
    """One engine call, one record: the N samples' tensors keep their batch axis (never split per sample), with the
    settings they were sampled with."""
    out = ray.get(server.generate_batched.remote("g", PROMPT, 4, [11, 12, 13, 14], SP))
    record = RLBatchOutput.from_payload(out)
    assert record.seeds == [11, 12, 13, 14]
    assert record.media.shape == (4, 1, 64, 64, 3) and record.media.dtype == torch.uint8  # images: one frame
    assert record.latents.shape[:2] == (4, SP["num_inference_steps"] + 1)
    assert record.log_probs.shape == (4, 4) and torch.isfinite(record.log_probs).all()
    assert record.timesteps.shape == (4,) and record.prompt_embeds.ndim == 3 and record.prompt_embeds.shape[0] == 4
    assert DiffusionSamplingParams.from_dict(record.sampling) == DiffusionSamplingParams.from_dict(SP)
    images = record.images.numpy().astype(np.int16)
    assert all(np.abs(images[i] - images[j]).max() > 0 for i in range(4) for j in range(i + 1, 4))


def test_generate_is_generate_batched_with_one_output(server):
    ray.get(server.reset_stats.remote())
    single = ray.get(server.generate.remote("s", PROMPT, 13, SP))
    batched = ray.get(server.generate_batched.remote("b", PROMPT, 1, [13], SP))
    assert single["media"].shape == (1, 1, 64, 64, 3) and torch.equal(single["media"], batched["media"])
    assert torch.equal(single["latents"], batched["latents"])
    assert ray.get(server.get_stats.remote())["batch_sizes"] == [1, 1]


@pytest.mark.parametrize(
    "n, seeds, match",
    [
        (0, [], r"num_outputs_per_prompt=0 must be in \[1, 8\]"),
        (9, list(range(9)), r"num_outputs_per_prompt=9 must be in \[1, 8\] \(actor_rollout_ref.rollout.limits"),
        (2.0, [1, 2], "num_outputs_per_prompt must be an int"),
        (True, [1], "num_outputs_per_prompt must be an int"),
        (3, [1, 2], "seeds must be a list of 3"),
        (2, [1, "2"], "seeds must be ints"),
    ],
)
def test_bad_requests_fail_before_the_engine_runs(server, n, seeds, match):
    ray.get(server.reset_stats.remote())
    with pytest.raises(ValueError, match=match):
        ray.get(server.generate_batched.remote("bad", PROMPT, n, seeds, SP))
    assert ray.get(server.get_stats.remote())["engine_calls"] == 0


@pytest.mark.parametrize(
    "prompt, params, match",
    [
        (
            PROMPT,
            {**SP, "height": 256, "width": 128},
            r"256 x 128 = 32768 pixels; the limit is 16384 "
            r"\(actor_rollout_ref.rollout.limits.max_pixels\)",
        ),
        (PROMPT, {**SP, "num_inference_steps": 21}, r"num_inference_steps=21; the limit is 20"),
        ("x" * 201, SP, r"prompt has 201 characters; the limit is 200"),
        ("   ", SP, "prompt is empty"),
        (PROMPT, {**SP, "max_sequence_length": 2000}, r"max_sequence_length=2000 must be <= 1024"),
    ],
)
def test_requests_over_the_limits_are_refused_naming_the_limit(server, prompt, params, match):
    ray.get(server.reset_stats.remote())
    with pytest.raises(ValueError, match=match):
        ray.get(server.generate_batched.remote("big", prompt, 1, [1], params))
    assert ray.get(server.get_stats.remote())["engine_calls"] == 0


def test_a_request_exactly_at_the_limits_is_served(server):
    at_limit = {**SP, "height": 128, "width": 128, "num_inference_steps": 2}  # 16384 pixels, the limit
    out = ray.get(server.generate_batched.remote("edge", "y" * 200, 8, list(range(8)), at_limit))
    assert out["media"].shape == (8, 1, 128, 128, 3)


def test_unknown_or_invalid_sampling_params_are_rejected(server):
    with pytest.raises(ValueError, match="unknown sampling_params keys \\['num_steps'\\]"):
        ray.get(server.generate_batched.remote("bad", PROMPT, 1, [1], {"num_steps": 3}))
    with pytest.raises(ValueError, match="height=60 must be a multiple of 16"):
        ray.get(server.generate_batched.remote("bad", PROMPT, 1, [1], {**SP, "height": 60}))
    with pytest.raises(ValueError, match="sde_type='ode' is not one of"):
        ray.get(server.generate_batched.remote("bad", PROMPT, 1, [1], {**SP, "sde_type": "ode"}))


def test_http_health_generate_and_unknown_keys(server):
    host, port = ray.get(server.get_server_address.remote())
    health = json.loads(urllib.request.urlopen(f"http://{host}:{port}/health", timeout=10).read())
    assert health == {"status": "ok", "engine": "diffusers", "replica_rank": 0}

    def post(body):
        req = urllib.request.Request(
            f"http://{host}:{port}/v1/generate_batched",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        return json.loads(urllib.request.urlopen(req, timeout=60).read())

    out = post({"prompt": PROMPT, "num_outputs_per_prompt": 2, "seeds": [1, 2], "sampling_params": SP})
    assert [o["seed"] for o in out["outputs"]] == [1, 2] and len(out["outputs"][0]["log_probs"]) == 4
    with pytest.raises(urllib.error.HTTPError) as err:
        post({"prompt": PROMPT, "num_outputs_per_prompt": 1, "seeds": [1], "guidance": 3})
    assert err.value.code == 422 and "guidance" in err.value.read().decode()


def test_lora_update_changes_images_and_survives_sleep_wake(server):
    base = ray.get(server.generate.remote("l0", PROMPT, 5, SP))
    lora_keys = ray.get(
        server.__ray_call__.remote(
            lambda self: sorted(
                __import__("verl_omni.models.lora", fromlist=["x"])
                .get_lora_state_dict(self.engine.pipe.transformer)
                .items(),
                key=lambda kv: kv[0],
            )
        )
    )
    gen = torch.Generator().manual_seed(0)
    tensors = {k: torch.randn(v.shape, generator=gen) * 0.5 for k, v in lora_keys}
    checksum = ray.get(server.update_lora.remote(tensors))
    assert checksum == tensors_checksum(tensors)
    changed = ray.get(server.generate.remote("l1", PROMPT, 5, SP))
    assert np.abs(changed["media"].int() - base["media"].int()).max() > 0

    ray.get(server.sleep.remote())
    with pytest.raises(RuntimeError, match="asleep"):
        ray.get(server.generate.remote("l2", PROMPT, 5, SP))
    ray.get(server.wake_up.remote())
    assert ray.get(server.lora_checksum.remote()) == checksum
    again = ray.get(server.generate.remote("l3", PROMPT, 5, SP))
    assert torch.equal(again["media"], changed["media"])

    with pytest.raises(ValueError, match="LoRA tensors do not match"):
        ray.get(server.update_lora.remote({"not_a_lora_key": torch.zeros(1)}))
    zeros = {k: torch.zeros_like(v) for k, v in tensors.items()}
    ray.get(server.update_lora.remote(zeros))  # B = 0: the adapter is the identity again
    restored = ray.get(server.generate.remote("l4", PROMPT, 5, SP))
    assert torch.equal(restored["media"], base["media"])


def test_reserved_ports_never_collide_and_busy_ports_are_skipped():
    socks = [reserve_socket("127.0.0.1") for _ in range(4)]
    ports = {s.getsockname()[1] for s in socks}
    assert len(ports) == 4
    busy = socks[0].getsockname()[1]
    nxt = reserve_socket("127.0.0.1", preferred_port=busy)
    assert nxt.getsockname()[1] != busy and nxt.getsockname()[1] > busy
    with socket.socket() as probe:  # the reserved port really is held
        with pytest.raises(OSError):
            probe.bind(("127.0.0.1", nxt.getsockname()[1]))
    for s in socks + [nxt]:
        s.close()


def test_an_unbindable_host_with_an_os_assigned_port_names_the_host():
    # 203.0.113.1 is TEST-NET-3, not on this machine: bind fails at once (EADDRNOTAVAIL); nothing is sent.
    with pytest.raises(OSError, match=r"203\.0\.113\.1"):
        reserve_socket("203.0.113.1")
    with pytest.raises(OSError, match=r"no free port in \[40000, 40002\) on 203\.0\.113\.1"):
        reserve_socket("203.0.113.1", preferred_port=40000, search=2)


class _RecordingEngine:
    """Engine stand-in: records the request ids it is given, and blocks until released."""

    vae_scale_factor = 8

    def __init__(self):
        self.request_ids = []
        self.release = asyncio.Event()

    async def generate(self, prompt, seeds, params, request_id=None):
        self.request_ids.append(request_id)
        await self.release.wait()
        raise RuntimeError("not generating in this test")

    async def abort(self, request_id):
        return None


def _bare_server(engine) -> DiffusionHttpServer:
    srv = DiffusionHttpServer.__new__(DiffusionHttpServer)
    srv.replica_rank, srv.engine, srv.host, srv._port = 3, engine, "127.0.0.1", None
    srv.rollout, srv.model_limits = rollout_config(), ModelLimits(vae_scale_factor=8, max_sequence_length=1024)
    srv._inflight, srv._uvicorn = {}, None
    srv._calls_in_flight, srv._busy_since = 0, 0.0
    srv.reset_stats()
    return srv


class _SleepingEngine:
    """Engine stand-in: each call takes ``seconds`` and returns nothing."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    async def generate(self, prompt, seeds, params, request_id=None):
        await asyncio.sleep(self.seconds)


def test_engine_seconds_is_the_wall_time_with_a_call_in_flight_not_the_sum_of_calls():
    """timing/rollout_busy_s/replica<k> reads engine_seconds: two overlapping calls of 0.3 s are 0.3 s of work
    (the engine queues them), two calls one after the other are 0.6 s."""

    async def main():
        srv = _bare_server(_SleepingEngine(0.3))
        await asyncio.gather(*(srv._engine_call(PROMPT, [s], None) for s in (1, 2)))
        overlapping = srv.get_stats()["engine_seconds"]
        srv.reset_stats()
        for s in (1, 2):
            await srv._engine_call(PROMPT, [s], None)
        one_after_the_other = srv.get_stats()["engine_seconds"]
        return overlapping, one_after_the_other, srv.get_stats()["engine_calls"]

    overlapping, sequential, calls = asyncio.run(main())
    assert 0.3 <= overlapping < 0.45, overlapping
    assert 0.6 <= sequential < 0.75, sequential
    assert calls == 2


def test_http_requests_without_request_id_get_distinct_ids_passed_to_the_engine():
    async def main():
        engine = _RecordingEngine()
        srv = _bare_server(engine)
        srv._actor_loop = asyncio.get_running_loop()
        body = {"prompt": PROMPT, "num_outputs_per_prompt": 1, "seeds": [1], "sampling_params": SP}
        calls = [asyncio.ensure_future(srv._run_in_actor_loop(dict(body))) for _ in range(2)]
        calls.append(asyncio.ensure_future(srv.generate_batched("mine", PROMPT, 1, [1], SP)))
        for _ in range(200):
            if len(engine.request_ids) == 3:
                break
            await asyncio.sleep(0.01)
        ids = list(srv._inflight)
        engine.release.set()
        await asyncio.gather(*calls, return_exceptions=True)
        return ids, engine.request_ids

    inflight, engine_ids = asyncio.run(main())
    assert len(inflight) == 3 and "mine" in inflight and "http" not in inflight
    assert sorted(engine_ids) == sorted(inflight)  # the engine sees the ids abort() will be called with


def test_launch_server_raises_when_uvicorn_never_starts(monkeypatch):
    import uvicorn

    async def never_serve(self, sockets=None):
        await asyncio.sleep(3600)

    monkeypatch.setattr(uvicorn.Server, "serve", never_serve)
    monkeypatch.setattr(DiffusionHttpServer, "_build_app", lambda self: None)
    srv = _bare_server(_RecordingEngine())
    srv._port_base = None
    with pytest.raises(RuntimeError, match=r"replica 3: HTTP server on 127\.0\.0\.1:\d+ did not start"):
        asyncio.run(srv.launch_server())
    srv._socket.close()


def test_a_timed_out_request_is_stopped_in_the_engine_and_the_next_one_is_served(ray_session, tiny_qwen_image_dir):
    actor = (
        ray.remote(DiffusionHttpServer)
        .options(num_cpus=0)
        .remote(model_config(tiny_qwen_image_dir), rollout_config(request_timeout_s=1.0), 0)
    )
    try:
        ray.get(actor.launch_server.remote())
        slow = {"num_inference_steps": 100, "height": 128, "width": 128}  # tens of seconds on 2 cores
        with pytest.raises(TimeoutError, match="request_timeout_s=1.0"):
            ray.get(actor.generate_batched.remote("slow", PROMPT, 16, list(range(16)), slow))
        stats = ray.get(actor.get_stats.remote())
        assert stats["inflight"] == 0 and stats["engine_calls"] == 0  # the slow call ended, unfinished
        quick = ray.get(actor.generate_batched.remote("quick", PROMPT, 1, [1], {**SP, "num_inference_steps": 2}))
        assert quick["seeds"] == [1]
        # The engine-side work really stopped: the pipeline lock is free again (a new call did not wait).
        assert ray.get(actor.__ray_call__.remote(lambda self: self.engine._lock.locked())) is False
    finally:
        ray.kill(actor)
