"""``actor.use_torch_compile=false`` in the hybrid engine: the engine compiled the transformer's blocks for its
rollouts (regional ``torch.compile``, lazily: nothing compiles before a call), and the actor trains that same
transformer. Explicitly false, the update (its forwards and the backward's recomputations) runs every block's
original forward and the rollouts keep the compiled blocks; null / true train through the compiled blocks.

Both forms of regional compile are covered, on the tiny Qwen-Image and FLUX in float32 on CPU: ``module.compile()``
(``_compiled_call_impl``) and a compiled ``forward`` attribute (what vllm-omni's ``regionally_compile`` sets). The
backend records its compilations and every call of a compiled graph, and runs the traced graph as it is.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import model_config, num_rows, records_data_proto, rollout_config

from verl_omni.config.actor import ActorConfig, OptimConfig
from verl_omni.config.sampling import DiffusionSamplingParams
from verl_omni.models.checkpointing import transformer_blocks
from verl_omni.models.eager import compiled_modules, eager_forwards
from verl_omni.pipelines.loading import load_rl_pipeline
from verl_omni.workers.actor import DiffusionLoRAActor

PROMPTS = ["a red cat", "a blue house on a hill"]


class RecordingBackend:
    """A ``torch.compile`` backend that counts its compilations and the calls of the graphs it returned."""

    def __init__(self) -> None:
        self.compilations = 0
        self.calls = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs):
        self.compilations += 1

        def run(*args):
            self.calls += 1
            return gm.forward(*args)

        return run

    def seen(self) -> int:
        return self.compilations + self.calls


def _compile_blocks(transformer, form: str, backend: RecordingBackend) -> None:
    """Regional compile of the transformer's blocks, as the engine does it (nothing compiles until a call)."""
    for block in transformer_blocks(transformer):
        if form == "module":
            block.compile(backend=backend, dynamic=True)
        else:
            block.forward = torch.compile(block.forward, backend=backend, dynamic=True)


def _entry_points(transformer) -> list[tuple[object, object]]:
    return [(b.__dict__.get("forward"), b._compiled_call_impl) for b in transformer_blocks(transformer)]


def _engine_and_actor(family: str, model_dir: str, form: str, use_torch_compile, backend: RecordingBackend):
    """The engine's pipeline with its blocks compiled, then the actor made on it (the hybrid engine's order)."""
    model = model_config(model_dir, pipeline=family, enable_gradient_checkpointing=True)  # recomputation in backward
    actor_cfg = ActorConfig(
        optim=OptimConfig(lr=1e-2), ppo_micro_batch_size_per_gpu=2, use_torch_compile=use_torch_compile
    )
    pipe = load_rl_pipeline(model.path, family, actor_cfg.dtype, model.lora)
    _compile_blocks(pipe.transformer, form, backend)
    rollout = rollout_config(pipeline={"true_cfg_scale": 2.0})
    return DiffusionLoRAActor(model, actor_cfg, rollout, pipe=pipe, lora_seed=5)


def _params(window_start: int) -> DiffusionSamplingParams:
    return DiffusionSamplingParams(
        num_inference_steps=2, height=32, width=32, sde_window_size=1, window_start=window_start, guidance_scale=2.0
    )


def _rollout(pipe):
    records = [pipe.rl_generate(prompt, [3 + i, 4 + i], _params(i)) for i, prompt in enumerate(PROMPTS)]
    raw = np.array([PROMPTS[i // 2] for i in range(num_rows(records))], dtype=object)
    uid = np.array([f"g{i // 2}" for i in range(num_rows(records))], dtype=object)
    return records_data_proto(records, {"raw_prompt": raw, "uid": uid})


def _eager_rollout(pipe):
    """A rollout for the update's data, compiling nothing (the compiled rollout is checked after the update)."""
    with torch.compiler.set_stance("force_eager"):
        return _rollout(pipe)


ADVANTAGES = torch.tensor([1.0, -1.0, 0.5, -0.5])


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test starts from dynamo's empty caches (its recompile limit counts per code object, over every block
    of the same class ever compiled) and leaves none to the next."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("family, form", [("qwen_image", "forward"), ("qwen_image", "module"), ("flux", "forward")])
def test_an_eager_update_runs_the_original_forwards_and_rollouts_keep_the_compiled_blocks(request, family, form):
    backend = RecordingBackend()
    actor = _engine_and_actor(family, request.getfixturevalue(f"tiny_{family}_dir"), form, False, backend)
    compiled = _entry_points(actor.transformer)
    assert len(compiled_modules(actor.transformer)) == len(transformer_blocks(actor.transformer)) >= 2
    data = _eager_rollout(actor.pipe)
    counts = [0] * len(transformer_blocks(actor.transformer))
    for index, block in enumerate(transformer_blocks(actor.transformer)):
        block.register_forward_pre_hook(lambda *_, i=index: counts.__setitem__(i, counts[i] + 1))
    metrics = actor.update(data, ADVANTAGES)
    assert metrics["actor/num_train_terms"] > 0 and np.isfinite(metrics["actor/grad_norm"])
    # Every block ran its forward twice per micro-batch (the forward and the backward's recomputation), with
    # nothing compiled or called through a compiled graph.
    assert actor.checkpointed_blocks == len(counts) and all(c > 0 and c % 2 == 0 for c in counts)
    assert backend.seen() == 0
    # The very same compiled entry points are back: the next rollout goes through them.
    assert _entry_points(actor.transformer) == compiled
    actor.pipe.rl_generate(PROMPTS[0], [3], _params(0))
    assert backend.calls > 0


@pytest.mark.parametrize("form, use_torch_compile", [("forward", None), ("module", True)])
def test_an_update_otherwise_trains_through_the_engines_compiled_blocks(tiny_qwen_image_dir, form, use_torch_compile):
    """null (off on CPU for the actor's own compile) and true: the engine's compiled blocks serve the update too,
    and the actor does not wrap them a second time."""
    backend = RecordingBackend()
    actor = _engine_and_actor("qwen_image", tiny_qwen_image_dir, form, use_torch_compile, backend)
    compiled = _entry_points(actor.transformer)
    data = _eager_rollout(actor.pipe)
    actor.update(data, ADVANTAGES)
    assert backend.calls > 0
    assert _entry_points(actor.transformer) == compiled


@pytest.mark.parametrize("form", ["forward", "module"])
def test_an_update_that_raises_still_puts_the_compiled_blocks_back(tiny_qwen_image_dir, form):
    backend = RecordingBackend()
    actor = _engine_and_actor("qwen_image", tiny_qwen_image_dir, form, False, backend)
    compiled = _entry_points(actor.transformer)
    data = _eager_rollout(actor.pipe)
    inside = []

    def failing_update(*_):
        inside.append(compiled_modules(actor.transformer))
        raise RuntimeError("the update failed")

    actor._update = failing_update
    with pytest.raises(RuntimeError, match="the update failed"):
        actor.update(data, ADVANTAGES)
    assert inside == [[]]  # inside the update nothing was compiled
    assert _entry_points(actor.transformer) == compiled


class Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(3, 3)

    def forward(self, x):
        return self.linear(x).relu()


def test_eager_forwards_swaps_both_forms_and_leaves_plain_modules_alone():
    backend = RecordingBackend()
    plain, wrapped, module = Block(), Block(), Block()
    original = wrapped.forward
    wrapped.forward = torch.compile(wrapped.forward, backend=backend)
    module.compile(backend=backend)
    root = torch.nn.Sequential(plain, wrapped, module)
    compiled = wrapped.forward, module._compiled_call_impl
    assert compiled_modules(root) == [wrapped, module]
    x = torch.randn(2, 3)
    with eager_forwards(root) as swapped:
        assert swapped == 2 and compiled_modules(root) == []
        assert wrapped.forward == original and module._compiled_call_impl is None and "forward" not in plain.__dict__
        root(x)
    assert backend.seen() == 0
    assert (wrapped.forward, module._compiled_call_impl) == compiled and "forward" not in plain.__dict__
    root(x)
    assert backend.calls == 2  # both compiled entry points ran their graph
