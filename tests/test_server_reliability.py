"""The server under clients that give up or send bad values: a request whose caller has gone stops in the engine,
sampling values out of range, seeds outside int64, blank prompts, wrong types and requests over the memory budget
are refused naming the field (HTTP 422), before the engine runs. Tiny Qwen-Image, diffusers engine."""

import asyncio
import http.client
import json
import socket
import time
import urllib.error
import urllib.request

import pytest
import ray
from helpers import model_config, rollout_config

from verl_omni.rollout.server import DiffusionHttpServer

PROMPT = 'a shop sign that says "open"'
SP = {"num_inference_steps": 2, "height": 64, "width": 64}
# Minutes on 2 cores if it ran to the end: a request that is not stopped cannot finish within the test.
SLOW_N, SLOW = 16, {"num_inference_steps": 100, "height": 128, "width": 128}


@pytest.fixture(scope="module")
def server(ray_session, tiny_qwen_image_dir):
    """A replica with the default request limits."""
    actor = (
        ray.remote(DiffusionHttpServer)
        .options(num_cpus=0)
        .remote(model_config(tiny_qwen_image_dir), rollout_config(), 0)
    )
    ray.get(actor.launch_server.remote())

    def count_forwards(self):  # runs in the server actor: the transformer's forwards, by batch size
        self.forwards = {}

        def hook(module, args, kwargs):
            rows = kwargs["hidden_states"].shape[0] if "hidden_states" in kwargs else args[0].shape[0]
            self.forwards[rows] = self.forwards.get(rows, 0) + 1

        self.engine.pipe.transformer.register_forward_pre_hook(hook, with_kwargs=True)

    ray.get(actor.__ray_call__.remote(count_forwards))
    yield actor
    ray.kill(actor)


def _forwards(server, rows: int) -> int:
    return ray.get(server.__ray_call__.remote(lambda self: self.forwards.get(rows, 0)))


def _wait_until(condition, what: str, limit_s: float = 120.0) -> None:
    deadline = time.monotonic() + limit_s
    while not condition():
        assert time.monotonic() < deadline, f"{what} did not happen within {limit_s} s"
        time.sleep(0.02)


def _assert_slow_request_stopped_and_next_served(server, before: int) -> None:
    # The next request needs the pipeline: it is served once the slow one has let go of it.
    quick = ray.get(server.generate_batched.remote("quick", PROMPT, 1, [1], SP))
    assert quick["media"].shape == (1, 1, 64, 64, 3)
    ran = _forwards(server, SLOW_N) - before
    assert 1 <= ran < SLOW["num_inference_steps"], f"the abandoned request ran {ran} denoising steps"
    stats = ray.get(server.get_stats.remote())
    assert stats["inflight"] == 0 and stats["batch_sizes"][-1] == 1 and SLOW_N not in stats["batch_sizes"]


def test_a_request_whose_ray_caller_cancelled_is_stopped_in_the_engine(server):
    before = _forwards(server, SLOW_N)
    ref = server.generate_batched.remote("slow-ray", PROMPT, SLOW_N, list(range(SLOW_N)), SLOW)
    _wait_until(lambda: _forwards(server, SLOW_N) > before, "the slow request's first denoising step")
    ray.cancel(ref)
    with pytest.raises((ray.exceptions.TaskCancelledError, ray.exceptions.RayTaskError)):
        ray.get(ref)
    _assert_slow_request_stopped_and_next_served(server, before)


def test_a_request_whose_http_client_disconnected_is_stopped_in_the_engine(server):
    host, port = ray.get(server.get_server_address.remote())
    before = _forwards(server, SLOW_N)
    body = json.dumps(
        {"prompt": PROMPT, "num_outputs_per_prompt": SLOW_N, "seeds": list(range(SLOW_N)), "sampling_params": SLOW}
    ).encode()
    conn = http.client.HTTPConnection(host, port, timeout=60)
    conn.request("POST", "/v1/generate_batched", body=body, headers={"Content-Type": "application/json"})
    _wait_until(lambda: _forwards(server, SLOW_N) > before, "the slow request's first denoising step")
    conn.sock.shutdown(socket.SHUT_RDWR)  # the client gives up
    conn.close()
    _wait_until(lambda: ray.get(server.get_stats.remote())["inflight"] == 0, "the server dropping the request")
    _assert_slow_request_stopped_and_next_served(server, before)


def test_a_request_whose_agent_loop_caller_was_cancelled_is_stopped_in_the_engine(server):
    """The agent loop's client (what the trainer's rollout awaits): cancelling its call cancels the server's."""
    from verl_omni.agent_loop.diffusion_agent_loop import DiffusionServerClient

    client = DiffusionServerClient.__new__(DiffusionServerClient)

    async def acquire(request_id):
        return "replica-0", server

    client._acquire_server, client._release_server = acquire, lambda server_id, request_id=None: None
    before = _forwards(server, SLOW_N)

    async def main():
        call = asyncio.ensure_future(
            client.generate_batched("slow-client", prompt=PROMPT, seeds=list(range(SLOW_N)), sampling_params=SLOW)
        )
        while _forwards(server, SLOW_N) == before:  # until the slow request is in the engine
            assert not call.done(), call
            await asyncio.sleep(0.02)
        call.cancel()
        await asyncio.gather(call, return_exceptions=True)
        return call.cancelled()

    assert asyncio.run(main())
    _wait_until(lambda: ray.get(server.get_stats.remote())["inflight"] == 0, "the server dropping the request")
    _assert_slow_request_stopped_and_next_served(server, before)


def _post(server, body):
    host, port = ray.get(server.get_server_address.remote())
    request = urllib.request.Request(
        f"http://{host}:{port}/v1/generate_batched",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _body(**changes):
    return {"prompt": PROMPT, "num_outputs_per_prompt": 1, "seeds": [1], "sampling_params": SP, **changes}


@pytest.mark.parametrize(
    "body, match",
    [
        # sampling values: finite and in range, the allowed range named
        (
            _body(sampling_params={**SP, "noise_level": float("inf")}),
            r"noise_level=inf must be a finite number in \[0, 10.0\]",
        ),
        (
            _body(sampling_params={**SP, "noise_level": 1e6}),
            r"noise_level=1000000.0 must be .* in \[0, 10.0\] for sde_type='sde'",
        ),
        (
            _body(sampling_params={**SP, "noise_level": 1.5, "sde_type": "cps"}),
            r"noise_level=1.5 must be .* in \[0, 1.0\] for sde_type='cps'",
        ),
        (_body(sampling_params={**SP, "guidance_scale": float("nan")}), r"guidance_scale=nan must be a finite number"),
        # seeds: 64-bit signed ints
        (_body(seeds=[2**63]), r"seeds \[9223372036854775808\] do not fit a 64-bit signed int"),
        (_body(seeds=[2**70]), r"seeds \[1180591620717411303424\] do not fit a 64-bit signed int"),
        # a prompt with nothing to draw
        (_body(prompt="\u200b\u200b\u200d\ufeff"), "prompt is empty"),
        (_body(prompt=" \u2060\t\u200b "), "prompt is empty"),
        # wrong types name the field
        (_body(sampling_params=[2, 64, 64]), "sampling_params must be an object of named fields .* got list"),
        (_body(sampling_params={**SP, "sde_window_range": 5}), "sde_window_range=5 must be a pair of ints"),
        (_body(sampling_params={**SP, "sde_window_range": ["a", "b"]}), "sde_window_range=.* must be a pair of ints"),
        (_body(sampling_params={**SP, "height": "64"}), "height must be an int, got str"),
        (_body(seeds="1"), "seeds must be a list of 1 ints"),
    ],
)
def test_bad_values_are_a_422_naming_the_field_and_the_engine_never_runs(server, body, match):
    import re

    ray.get(server.reset_stats.remote())
    status, answer = _post(server, body)
    assert status == 422, answer
    assert re.search(match, answer["detail"]), answer["detail"]
    assert ray.get(server.get_stats.remote())["engine_calls"] == 0


def test_seeds_outside_int64_are_refused_over_ray_too_naming_seeds(server):
    with pytest.raises(ValueError, match=r"seeds \[9223372036854775808\] do not fit a 64-bit signed int"):
        ray.get(server.generate.remote("s", PROMPT, 2**63, SP))
    with pytest.raises(ValueError, match=r"seeds \[-9223372036854775809\] do not fit"):
        ray.get(server.generate.remote("s", PROMPT, -(2**63) - 1, SP))
    # the int64 edges themselves are served
    out = ray.get(server.generate_batched.remote("edges", PROMPT, 2, [2**63 - 1, -(2**63)], SP))
    assert out["seeds"] == [2**63 - 1, -(2**63)]


def test_the_memory_budget_refuses_a_request_each_factor_of_which_is_allowed(server):
    """64 images (the limit), 1024^2 (the limit) and 50 steps (under 100) pass one by one; together they are over
    limits.max_images_pixels_steps."""
    ray.get(server.reset_stats.remote())
    big = {"num_inference_steps": 50, "height": 1024, "width": 1024}
    with pytest.raises(
        ValueError, match=r"64 x 1024 x 1024 x 51 = 3422552064; the limit is 100000000 .*max_images_pixels_steps"
    ):
        ray.get(server.generate_batched.remote("big", PROMPT, 64, list(range(64)), big))
    status, answer = _post(
        server,
        _body(num_outputs_per_prompt=64, seeds=list(range(64)), sampling_params={**big, "num_inference_steps": 2}),
    )
    assert status == 422 and "max_images_pixels_steps" in answer["detail"], answer
    assert ray.get(server.get_stats.remote())["engine_calls"] == 0
