"""VllmOmniEngine against a test double of the ``vllm_omni`` package (CPU, CI).

The double is installed in ``sys.modules`` for these tests only. Its ``AsyncOmni`` records every call and plays
the vllm-omni worker the way 0.24.0 does: it resolves ``custom_pipeline_args["pipeline_class"]`` by qualified
name, builds it with ``od_config=...``, calls ``forward(DiffusionRequestBatch)`` and wraps the returned
``DiffusionOutput`` into an ``OmniRequestOutput`` (images, trajectory_*, _custom_output) as its output formatter
does; ``collective_rpc`` calls the method on a worker that mixes in ``worker_extension_cls``. So the real adapter
code (engine side and worker side) runs on the tiny Qwen-Image, and its result is compared with the diffusers
engine's.
"""

from __future__ import annotations

import ast
import asyncio
import dataclasses
import importlib
import pathlib
import subprocess
import sys
import types
from dataclasses import dataclass, field
from typing import Any, Optional

import pytest
import torch
from helpers import model_config, rollout_config

from verl_omni.config.sampling import DiffusionSamplingParams
from verl_omni.core.checksum import tensors_checksum

PKG = pathlib.Path(__file__).resolve().parents[1] / "verl_omni"
PROMPT = "a red bicycle"
PARAMS = DiffusionSamplingParams(num_inference_steps=3, height=32, width=32, max_sequence_length=32)


# ----------------------------------------------------------------------------------------- the test double
@dataclass
class FakeSamplingParams:  # the fields of vllm_omni.inputs.data.OmniDiffusionSamplingParams we use
    num_inference_steps: Optional[int] = None
    height: Optional[int] = None
    width: Optional[int] = None
    num_outputs_per_prompt: int = 1
    seed: Optional[int] = None
    max_sequence_length: Optional[int] = None
    return_trajectory_latents: bool = False
    guidance_scale: float = 0.0
    true_cfg_scale: Optional[float] = None
    extra_args: dict = field(default_factory=dict)


@dataclass
class FakeDiffusionOutput:
    output: Any = None
    trajectory_timesteps: Any = None
    trajectory_latents: Any = None
    trajectory_log_probs: Any = None
    custom_output: dict = field(default_factory=dict)


@dataclass
class FakeOmniRequestOutput:
    request_id: str
    images: list
    trajectory_latents: Any
    trajectory_timesteps: Any
    trajectory_log_probs: Any
    _custom_output: dict
    error: Optional[str] = None

    @property
    def custom_output(self):
        return self._custom_output


@dataclass
class FakeRequest:
    prompt: Any
    sampling_params: FakeSamplingParams
    request_id: str


@dataclass
class FakeBatch:
    requests: list


@dataclass
class FakeAck:
    status: str = "SUCCESS"
    error_msg: Optional[str] = None


class FakeAsyncOmni:
    instances: list = []

    def __init__(self, *, model: str, **kwargs):
        self.model = model
        self.kwargs = kwargs
        self.calls: list = []  # (verb, payload) in order
        self.events = FakeAsyncOmni.events
        args = kwargs["custom_pipeline_args"]
        od_config = types.SimpleNamespace(
            model=model,
            dtype=getattr(torch, kwargs["dtype"]),
            custom_pipeline_args=args,
            model_class_name=kwargs.get("model_class_name"),
        )
        module_name, _, cls_name = args["pipeline_class"].rpartition(".")
        pipeline_cls = getattr(importlib.import_module(module_name), cls_name)
        module_name, _, ext_name = kwargs["worker_extension_cls"].rpartition(".")
        ext_cls = getattr(importlib.import_module(module_name), ext_name)

        class Worker(ext_cls):
            def __init__(self):
                self.model_runner = types.SimpleNamespace(pipeline=None)
                self.loaded = []

            def load_model(self, load_format, custom_pipeline_name):
                self.loaded.append((load_format, custom_pipeline_name))
                self.model_runner.pipeline = pipeline_cls(od_config=od_config)
                assert self.model_runner.pipeline.load_weights(iter(())) is None

        self.worker = Worker()
        self.worker.re_init_pipeline(args)  # what WorkerWrapperBase does with custom_pipeline_args
        FakeAsyncOmni.instances.append(self)

    async def generate(self, prompt, request_id="", *, sampling_params_list=None, **kw):
        assert not kw, kw
        (sp,) = sampling_params_list
        self.calls.append(("generate", dict(prompt=prompt, request_id=request_id, sp=sp)))
        req = FakeRequest(prompt=prompt, sampling_params=sp, request_id=request_id)
        with torch.inference_mode():  # as vllm-omni's model runner calls the pipeline
            (out,) = self.worker.model_runner.pipeline.forward(FakeBatch([req]))
        images = out.output if isinstance(out.output, list) else [out.output]
        yield FakeOmniRequestOutput(
            request_id,
            images,
            out.trajectory_latents,
            out.trajectory_timesteps,
            out.trajectory_log_probs,
            dict(out.custom_output),
        )

    async def collective_rpc(self, method, timeout=None, args=(), kwargs=None, stage_ids=None):
        self.calls.append(("rpc", method))
        self.events.append(f"rpc:{method}")
        return [getattr(self.worker, method)(*args, **(kwargs or {}))]

    async def sleep(self, stage_ids=None, level=2, mode="abort"):
        self.calls.append(("sleep", level))
        self.events.append(f"sleep:{level}")
        return [FakeAck()]

    async def wake_up(self, stage_ids=None, tags=None):
        self.calls.append(("wake_up", tags))
        self.events.append("wake_up")
        return [FakeAck()]

    async def abort(self, request_id):
        self.calls.append(("abort", request_id))

    def shutdown(self, timeout=None):
        self.calls.append(("shutdown", None))


FakeAsyncOmni.events = []


@pytest.fixture
def fake_vllm_omni(monkeypatch):
    root = types.ModuleType("vllm_omni")
    root.AsyncOmni = FakeAsyncOmni
    inputs = types.ModuleType("vllm_omni.inputs")
    inputs_data = types.ModuleType("vllm_omni.inputs.data")
    inputs_data.OmniDiffusionSamplingParams = FakeSamplingParams
    diffusion = types.ModuleType("vllm_omni.diffusion")
    diffusion_data = types.ModuleType("vllm_omni.diffusion.data")
    diffusion_data.DiffusionOutput = FakeDiffusionOutput
    for name, mod in {
        "vllm_omni": root,
        "vllm_omni.inputs": inputs,
        "vllm_omni.inputs.data": inputs_data,
        "vllm_omni.diffusion": diffusion,
        "vllm_omni.diffusion.data": diffusion_data,
    }.items():
        monkeypatch.setitem(sys.modules, name, mod)
    FakeAsyncOmni.instances.clear()
    FakeAsyncOmni.events = []
    return root


def run(coro):
    return asyncio.run(coro)


def make_engine(model_dir, lora: Optional[dict] = None, **rollout):
    """The vllm_omni engine on the test double: no LoRA unless ``lora`` gives the model's LoRA keys."""
    from verl_omni.rollout.engines import get_engine_class

    model = model_config(model_dir, **(lora or {"lora_rank": 0}))
    return get_engine_class("vllm_omni")(model, rollout_config(dtype="float32", **rollout))


def diffusers_engine(model_dir):
    from verl_omni.rollout.engines import get_engine_class

    return get_engine_class("diffusers")(model_config(model_dir, lora_rank=0), rollout_config(dtype="float32"))


# ----------------------------------------------------------------------------------------- import hygiene
def test_import_verl_omni_and_registry_work_without_vllm_omni():
    code = (
        "import sys\n"
        "sys.modules['vllm_omni'] = None  # any import of vllm_omni now raises ImportError\n"
        "import verl_omni\n"
        "from verl_omni.rollout.engines import get_engine_class\n"
        "from verl_omni.config import ModelConfig, RolloutConfig\n"
        "cls = get_engine_class('vllm_omni')\n"
        "assert cls.__name__ == 'VllmOmniEngine', cls\n"
        "try:\n"
        "    cls(ModelConfig(path='/nonexistent', pipeline='qwen_image'), RolloutConfig(name='vllm_omni'))\n"
        "except ImportError as e:\n"
        "    assert 'vllm-omni' in str(e), e\n"
        "else:\n"
        "    raise AssertionError('building the engine without vllm_omni must raise ImportError')\n"
        "print('ok')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-2000:]


def _vllm_omni_imports(path: pathlib.Path) -> list[tuple[int, bool]]:
    """(line, at module level) of every import of vllm_omni in a file."""
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    found = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        if any(n == "vllm_omni" or n.startswith("vllm_omni.") for n in names):
            found.append((node.lineno, id(node) in top))
    return found


def test_only_the_engine_package_imports_vllm_omni_and_only_lazily():
    engine_package = PKG / "rollout" / "engines" / "vllm_omni"
    offenders, inside = {}, {}
    for path in PKG.rglob("*.py"):
        hits = _vllm_omni_imports(path)
        if engine_package in path.parents:
            inside[path.name] = hits
            assert not [line for line, top in hits if top], f"module-level vllm_omni import in {path}"
        elif hits:
            offenders[str(path.relative_to(PKG.parent))] = [line for line, _ in hits]
    assert not offenders, f"only rollout/engines/vllm_omni/ may import vllm_omni: {offenders}"
    assert inside["engine.py"] and inside["worker.py"], "the server side and the worker side import it (lazily)"
    assert not inside["wire.py"], "the wire format needs no vllm_omni"
    # Also no importlib / __import__ tricks with the name elsewhere.
    for path in PKG.rglob("*.py"):
        if engine_package not in path.parents:
            text = path.read_text()
            assert 'import_module("vllm_omni' not in text and "__import__('vllm_omni" not in text, path


# ----------------------------------------------------------------------------------------- construction
def test_engine_options_reach_async_omni(fake_vllm_omni, tiny_qwen_image_dir):
    from verl_omni.rollout.engines.vllm_omni import wire as mod

    make_engine(
        tiny_qwen_image_dir,
        lora={"lora_rank": 4, "lora_alpha": 8.0, "target_modules": ["to_q", "to_v"]},
        max_num_seqs=8,
        enforce_eager=True,
        gpu_memory_utilization=0.5,
    )
    (omni,) = FakeAsyncOmni.instances
    kw = omni.kwargs
    assert omni.model == tiny_qwen_image_dir
    assert (
        kw["custom_pipeline_args"]["pipeline_class"]
        == mod.PIPELINE_CLASS
        == "verl_omni.rollout.engines.vllm_omni.worker.VllmOmniRLPipeline"
    )
    assert kw["custom_pipeline_args"]["verl_omni"] == {
        "pipeline": "qwen_image",
        "gelu_epilogue": True,  # actor_rollout_ref.model.gelu_epilogue's default
        "inductor_multi_kernel": True,  # actor_rollout_ref.model.inductor_multi_kernel's default
        "family_options": {  # actor_rollout_ref.model.qwen_image's defaults
            "qk_norm_rope_kernel": True,
            "qk_kernel_adds_lora": True,
            "fuse_qkv_projections": False,
            "project_joint_attention_output": True,
        },
        "lora": {"rank": 4, "alpha": 8.0, "target_modules": ["to_q", "to_v"]},
    }
    assert kw["worker_extension_cls"] == mod.WORKER_EXTENSION_CLASS
    assert kw["model_class_name"] == mod.MODEL_CLASS_NAME
    assert (kw["max_num_seqs"], kw["enforce_eager"], kw["gpu_memory_utilization"]) == (8, True, 0.5)
    assert kw["enable_sleep_mode"] is True and kw["dtype"] == "float32"
    assert kw["request_batch_max_wait_ms"] > 0  # engine-side batching waits for concurrent requests to land
    assert omni.worker.loaded == [("custom_pipeline", mod.PIPELINE_CLASS)]


@pytest.mark.parametrize("joint_output", [False, True])
def test_attention_options_reach_the_worker_processor(fake_vllm_omni, tiny_qwen_image_dir, monkeypatch, joint_output):
    """With an attention kernel served (a stand-in here: CPU has no FA3), the family's own option
    model.qwen_image.project_joint_attention_output reaches every block's processor."""
    from verl_omni.pipelines.qwen_image.pipeline import QwenImageFusedAttnProcessor
    from verl_omni.rollout.engines.vllm_omni import worker

    monkeypatch.setattr(worker, "resolve_flash_attention", lambda: torch.nn.functional.scaled_dot_product_attention)
    qwen_image = {"qk_norm_rope_kernel": False, "project_joint_attention_output": joint_output}
    options = {"lora_rank": 0, "qwen_image": qwen_image}
    make_engine(tiny_qwen_image_dir, lora=options)
    (omni,) = FakeAsyncOmni.instances
    blocks = omni.worker.model_runner.pipeline.pipe.transformer.transformer_blocks
    processors = [block.attn.processor for block in blocks]
    assert processors and all(isinstance(p, QwenImageFusedAttnProcessor) for p in processors)
    assert [p.project_joint_output for p in processors] == [joint_output] * len(blocks)


def test_flux_options_reach_the_worker_pipeline(fake_vllm_omni, tiny_flux_dir):
    """actor_rollout_ref.model.flux travels as family_options and reaches the worker's FluxRLPipeline: the images
    are the diffusers engine's with the same setting."""
    from verl_omni.rollout.engines import get_engine_class

    options = {"lora_rank": 0, "flux": {"distilled_guidance_scale": 6.0}}
    engine = make_engine(tiny_flux_dir, lora=options)
    (omni,) = FakeAsyncOmni.instances
    assert omni.kwargs["custom_pipeline_args"]["verl_omni"]["family_options"] == {"distilled_guidance_scale": 6.0}
    assert omni.worker.model_runner.pipeline.pipe.distilled_guidance_scale == 6.0
    reference = get_engine_class("diffusers")(model_config(tiny_flux_dir, **options), rollout_config(dtype="float32"))
    out, ref = run(engine.generate(PROMPT, [3], PARAMS)), run(reference.generate(PROMPT, [3], PARAMS))
    assert torch.equal(out.images, ref.images) and torch.equal(out.latents, ref.latents)


@pytest.mark.parametrize("multi_kernel", [False, True])
def test_inductor_multi_kernel_is_set_only_while_the_rollout_runs(fake_vllm_omni, tiny_qwen_image_dir, multi_kernel):
    """model.inductor_multi_kernel holds while rl_generate runs (when vllm-omni compiles the rollout's graphs) and
    not after it, so the hybrid engine's actor compiles its training graphs with inductor's defaults."""
    import torch._inductor.config as inductor_config

    engine = make_engine(tiny_qwen_image_dir, lora={"lora_rank": 0, "inductor_multi_kernel": multi_kernel})
    (omni,) = FakeAsyncOmni.instances
    pipe = omni.worker.model_runner.pipeline.pipe
    generate, seen = pipe.rl_generate, []

    def recording_generate(*args, **kwargs):
        seen.append((inductor_config.triton.multi_kernel, inductor_config.fx_graph_cache))
        return generate(*args, **kwargs)

    pipe.rl_generate = recording_generate
    before = (inductor_config.triton.multi_kernel, inductor_config.fx_graph_cache)
    out = run(engine.generate(PROMPT, [3, 5], PARAMS))
    assert out.batch_size == 2
    assert seen == [(1, False) if multi_kernel else before]  # the FX graph cache off with it (worker.py says why)
    assert (inductor_config.triton.multi_kernel, inductor_config.fx_graph_cache) == before


# ----------------------------------------------------------------------------------------- generate
def test_generate_is_one_request_of_batch_n_and_matches_diffusers(fake_vllm_omni, tiny_qwen_image_dir):
    engine = make_engine(tiny_qwen_image_dir)
    (omni,) = FakeAsyncOmni.instances
    seeds = [3, 5, 7]
    out = run(engine.generate(PROMPT, seeds, PARAMS))

    gens = [c for c in omni.calls if c[0] == "generate"]
    assert len(gens) == 1, "one generate = one engine request"
    sp = gens[0][1]["sp"]
    assert gens[0][1]["prompt"] == PROMPT
    assert sp.num_outputs_per_prompt == len(seeds) == 3
    assert (sp.num_inference_steps, sp.height, sp.width, sp.seed) == (3, 32, 32, 3)
    assert sp.max_sequence_length == 32 and sp.return_trajectory_latents is True
    assert sp.extra_args["verl_omni"]["seeds"] == seeds
    assert DiffusionSamplingParams.from_dict(sp.extra_args["verl_omni"]["params"]) == PARAMS
    assert sp.true_cfg_scale is None  # no CFG requested

    T = PARAMS.num_inference_steps
    assert out.seeds == seeds and out.batch_size == 3
    assert out.images.shape == (3, 32, 32, 3) and out.images.dtype == torch.uint8
    assert out.latents.shape[:2] == (3, T + 1) and out.log_probs.shape == (3, T)
    assert out.timesteps.shape == (T,) and out.sigmas.shape == (T + 1,) and out.window_mask.shape == (T,)
    assert out.prompt_embeds.shape[0] == 3 and torch.isfinite(out.log_probs).all()

    reference = diffusers_engine(tiny_qwen_image_dir)
    ref = run(reference.generate(PROMPT, seeds, PARAMS))
    for name in ("images", "latents", "log_probs", "timesteps", "sigmas", "window_mask", "prompt_embeds"):
        assert torch.equal(getattr(out, name), getattr(ref, name)), name


@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_generate_rows_is_one_request_of_several_prompts_and_matches_diffusers(
    fake_vllm_omni, tiny_qwen_image_dir, guidance_scale
):
    """A call whose rows have prompts of their own is ONE request: the rows' prompts travel in extra_args, the
    worker runs one rl_generate_rows and sends every row's embeddings (no shared row); the result is the diffusers
    engine's bit for bit (the same pipeline call). One prompt for every row is generate's request."""
    engine = make_engine(tiny_qwen_image_dir)
    (omni,) = FakeAsyncOmni.instances
    prompts, seeds = [PROMPT, PROMPT, "a dog on a long sandy beach at noon"], [3, 5, 3]
    params = PARAMS.replace(guidance_scale=guidance_scale)
    out = run(engine.generate_rows(prompts, seeds, params))
    ((_, call),) = [c for c in omni.calls if c[0] == "generate"]
    assert call["prompt"] == PROMPT and call["sp"].num_outputs_per_prompt == 3
    assert call["sp"].extra_args["verl_omni"]["prompts"] == prompts and out.seeds == seeds

    reference = run(diffusers_engine(tiny_qwen_image_dir).generate_rows(prompts, seeds, params))
    for name in ("images", "latents", "log_probs", "prompt_embeds", "prompt_embeds_mask", "negative_prompt_embeds"):
        assert _equal_or_none(getattr(out, name), getattr(reference, name)), name
    assert not torch.equal(out.prompt_embeds[0], out.prompt_embeds[2])  # each row its own prompt's embeddings
    # Over the wire: every row of the prompts' embeddings, one row of the negative prompt's (one per request).
    pipeline = omni.worker.model_runner.pipeline
    request = FakeRequest(PROMPT, engine.build_sampling_params(seeds, params, prompts), "r")
    (sent,) = pipeline.forward(FakeBatch([request]))
    extra = sent.custom_output["verl_omni"]
    negative = ["negative_prompt_embeds", "negative_prompt_embeds_mask"] if guidance_scale > 1 else []
    assert extra["shared_rows"] == negative and extra["prompt_embeds"].shape[0] == 3

    run(engine.generate_rows([PROMPT] * 2, [1, 2], params))
    last = [c for c in omni.calls if c[0] == "generate"][-1][1]["sp"]
    assert "prompts" not in last.extra_args["verl_omni"]  # one prompt: generate's request
    with pytest.raises(ValueError, match="one prompt per seed"):
        run(engine.generate_rows([PROMPT], [1, 2], params))


def _equal_or_none(a, b) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))


def test_cfg_params_are_forwarded(fake_vllm_omni, tiny_qwen_image_dir):
    engine = make_engine(tiny_qwen_image_dir)
    params = PARAMS.replace(guidance_scale=3.0, negative_prompt="blurry")
    out = run(engine.generate(PROMPT, [1, 2], params))
    sp = FakeAsyncOmni.instances[0].calls[0][1]["sp"]
    assert sp.true_cfg_scale == 3.0 and sp.extra_args["verl_omni"]["params"]["negative_prompt"] == "blurry"
    assert out.negative_prompt_embeds is not None and out.negative_prompt_embeds.shape[0] == 2


def test_engine_side_batch_is_merged_into_one_pipeline_call(fake_vllm_omni, tiny_qwen_image_dir, monkeypatch):
    """max_num_seqs > 1: the worker gets several requests in one forward; same prompt+params -> one rl_generate."""
    from verl_omni.rollout.engines.vllm_omni.engine import VllmOmniEngine

    engine = make_engine(tiny_qwen_image_dir, max_num_seqs=4)
    pipeline = FakeAsyncOmni.instances[0].worker.model_runner.pipeline
    calls = []
    real = pipeline.pipe.rl_generate

    def spy(prompt, seeds, params):
        calls.append((prompt, list(seeds)))
        return real(prompt, seeds, params)

    monkeypatch.setattr(pipeline.pipe, "rl_generate", spy)
    reqs = [
        FakeRequest(PROMPT, engine.build_sampling_params(s, PARAMS), f"r{i}") for i, s in enumerate([[1], [2, 3], [4]])
    ]
    reqs.append(FakeRequest("another prompt", engine.build_sampling_params([9], PARAMS), "r3"))
    outs = pipeline.forward(FakeBatch(reqs))
    assert calls == [(PROMPT, [1, 2, 3, 4]), ("another prompt", [9])]
    assert [o.output.shape[0] for o in outs] == [1, 2, 1, 1]
    assert [o.custom_output["verl_omni"]["seeds"] for o in outs] == [[1], [2, 3], [4], [9]]
    # A merged sample equals the same seed generated alone.
    alone = real(PROMPT, [2, 3], PARAMS)
    assert torch.equal(outs[1].output, alone.images) and torch.equal(outs[1].trajectory_log_probs, alone.log_probs)
    assert isinstance(engine, VllmOmniEngine)
    # the engine reports how the worker grouped samples into pipeline calls (the benchmark's path (c) reads it)
    assert run(engine.take_batch_sizes()) == [4, 1]
    assert run(engine.take_batch_sizes()) == []


def test_startup_dummy_request_without_our_payload_is_served(fake_vllm_omni, tiny_qwen_image_dir):
    """vllm-omni warms up with its own request (no extra_args): the pipeline must answer it, not crash."""
    make_engine(tiny_qwen_image_dir)
    pipeline = FakeAsyncOmni.instances[0].worker.model_runner.pipeline
    sp = FakeSamplingParams(
        num_inference_steps=1, height=32, width=32, num_outputs_per_prompt=1, extra_args={"cfg_text_scale": 1.0}
    )
    (out,) = pipeline.forward(FakeBatch([FakeRequest({"prompt": "dummy run"}, sp, "dummy")]))
    assert out.output.shape == (1, 32, 32, 3)


# ----------------------------------------------------------------------------------------- LoRA
def test_update_lora_from_memory_tensors(fake_vllm_omni, tiny_qwen_image_dir):
    from verl_omni.models.lora import get_lora_state_dict

    engine = make_engine(tiny_qwen_image_dir, lora={"lora_rank": 4, "lora_alpha": 4.0})
    omni = FakeAsyncOmni.instances[0]
    base = run(engine.generate(PROMPT, [1, 2], PARAMS))
    names = get_lora_state_dict(omni.worker.model_runner.pipeline.transformer)
    assert names and all("lora" in k for k in names)
    gen = torch.Generator().manual_seed(0)
    tensors = {k: torch.randn(v.shape, generator=gen) * 0.1 for k, v in names.items()}
    checksum = run(engine.update_lora(tensors))
    assert checksum == tensors_checksum(tensors) == run(engine.lora_checksum())
    assert ("rpc", "verl_omni_update_lora") in omni.calls and ("rpc", "verl_omni_lora_checksum") in omni.calls
    adapted = run(engine.generate(PROMPT, [1, 2], PARAMS))
    assert not torch.equal(adapted.images, base.images), "a LoRA update must change the images"
    with pytest.raises(ValueError):
        run(engine.update_lora({"not.a.lora.weight": torch.zeros(1)}))


def test_a_replica_serving_another_adapter_stops_the_sync(fake_vllm_omni, tiny_qwen_image_dir, monkeypatch):
    from verl_omni.rollout.weight_sync import LoRASyncError, push_lora

    engine = make_engine(tiny_qwen_image_dir, lora={"lora_rank": 4, "lora_alpha": 4.0})
    worker = FakeAsyncOmni.instances[0].worker
    tensors = get_lora(worker)

    class Replicas:  # the two verbs of DiffusionServerManager that push_lora uses: two replicas, one engine
        async def update_lora(self, sent):
            return [await engine.update_lora(sent), await engine.update_lora(sent)]

    assert run(push_lora(Replicas(), tensors, "float32")) == tensors_checksum(tensors)
    monkeypatch.setattr(type(worker), "verl_omni_update_lora", lambda self, t: "deadbeef")
    with pytest.raises(LoRASyncError, match=r"LoRA sync failed: replicas \[0, 1\]"):
        run(push_lora(Replicas(), tensors, "float32"))


def get_lora(worker):
    from verl_omni.models.lora import get_lora_state_dict

    return get_lora_state_dict(worker.model_runner.pipeline.transformer)


def test_update_lora_needs_lora_rank(fake_vllm_omni, tiny_qwen_image_dir):
    engine = make_engine(tiny_qwen_image_dir)
    with pytest.raises(ValueError, match="lora_rank"):
        run(engine.update_lora({}))
    assert run(engine.lora_checksum()) is None


# ----------------------------------------------------------------------------------------- lifecycle
def test_sleep_then_wake_empties_cache_first(fake_vllm_omni, tiny_qwen_image_dir, monkeypatch):
    from verl_omni.rollout.engines.vllm_omni import engine as mod

    monkeypatch.setattr(mod, "_empty_cuda_cache", lambda: FakeAsyncOmni.events.append("local_empty_cache"))
    engine = make_engine(tiny_qwen_image_dir)
    run(engine.sleep())
    with pytest.raises(RuntimeError, match="asleep"):
        run(engine.generate(PROMPT, [1], PARAMS))
    run(engine.wake_up())
    # local cache emptied, then the worker's (its RPC empties its own cache), then wake_up
    assert FakeAsyncOmni.events == ["sleep:1", "local_empty_cache", "rpc:verl_omni_empty_cache", "wake_up"]
    assert run(engine.generate(PROMPT, [1], PARAMS)).batch_size == 1
    with pytest.raises(ValueError, match="level"):
        run(engine.sleep(level=2))  # vllm-omni 0.24 cannot wake from level 2


def test_failed_sleep_ack_raises(fake_vllm_omni, tiny_qwen_image_dir, monkeypatch):
    engine = make_engine(tiny_qwen_image_dir)

    async def bad_sleep(**kw):
        return [FakeAck(status="ERROR", error_msg="boom")]

    monkeypatch.setattr(FakeAsyncOmni.instances[0], "sleep", bad_sleep)
    with pytest.raises(RuntimeError, match="boom"):
        run(engine.sleep())


def test_abort_and_shutdown(fake_vllm_omni, tiny_qwen_image_dir):
    engine = make_engine(tiny_qwen_image_dir)
    omni = FakeAsyncOmni.instances[0]
    run(engine.abort())  # nothing in flight: no call
    run(engine.abort("req-1"))
    engine._inflight.update({"a": None, "b": "caller-b"})  # engine ids -> the server's request ids
    run(engine.abort("caller-b"))  # the server aborts by its own id: mapped to the engine's
    run(engine.abort())
    run(engine.shutdown())
    assert [c for c in omni.calls if c[0] in ("abort", "shutdown")] == [
        ("abort", ["req-1"]),
        ("abort", ["b"]),
        ("abort", ["a", "b"]),
        ("shutdown", None),
    ]


# ----------------------------------------------------------------------------------------- output assembly
def _fake_output(batch, images_as="tensor"):
    from verl_omni.rollout.engines.vllm_omni.wire import EXTRA_KEY

    extra = {
        k: getattr(batch, k)
        for k in (
            "window_mask",
            "sigmas",
            "latent_steps",
            "prompt_embeds",
            "prompt_embeds_mask",
            "negative_prompt_embeds",
            "negative_prompt_embeds_mask",
            "pooled_prompt_embeds",
            "negative_pooled_prompt_embeds",
            "sampling",
        )
    }
    extra["seeds"] = list(batch.seeds)
    if images_as == "pil":
        from PIL import Image

        images = [Image.fromarray(img.numpy()) for img in batch.images]
    else:
        images = [batch.images]
    return FakeOmniRequestOutput("r", images, batch.latents, batch.timesteps, batch.log_probs, {EXTRA_KEY: extra})


@pytest.mark.parametrize("images_as", ["tensor", "pil"])
def test_request_output_to_batch_assembles_every_field(qwen_image_rl_pipe, images_as):
    from verl_omni.rollout.engines.vllm_omni.wire import request_output_to_batch

    ref = qwen_image_rl_pipe.rl_generate(PROMPT, [4, 6], PARAMS)
    out = request_output_to_batch(_fake_output(ref, images_as), [4, 6])
    for f in dataclasses.fields(ref):
        a, b = getattr(out, f.name), getattr(ref, f.name)
        assert (a is None and b is None) or (torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b), f.name


def test_request_output_to_batch_rejects_wrong_payloads(qwen_image_rl_pipe):
    from verl_omni.rollout.engines.vllm_omni.wire import request_output_to_batch

    ref = qwen_image_rl_pipe.rl_generate(PROMPT, [4, 6], PARAMS)
    good = _fake_output(ref)
    with pytest.raises(RuntimeError, match="seeds"):
        request_output_to_batch(good, [4, 7])
    with pytest.raises(RuntimeError, match="custom_output"):
        request_output_to_batch(dataclasses.replace(good, _custom_output={}), [4, 6])
    with pytest.raises(RuntimeError, match="trajectory"):
        request_output_to_batch(dataclasses.replace(good, trajectory_log_probs=None), [4, 6])


# ----------------------------------------------------------------------------------------- the hybrid engine
def test_an_actor_rank_trains_inside_the_worker_on_the_engines_own_transformer(fake_vllm_omni, tiny_qwen_image_dir):
    """init_actor / actor_call reach the worker through collective_rpc (arguments and results as files); the rank
    trains the very module the engine serves, after rollouts that ran under inference mode (RoPE caches included)."""
    import numpy as np
    from helpers import records_data_proto

    from verl_omni.config.actor import ActorConfig
    from verl_omni.workers.train_batch import TrainBatch

    # The rank recomputes with the run's rollout settings (guidance 2): the requests below use the same.
    engine = make_engine(
        tiny_qwen_image_dir, lora={"lora_rank": 4, "lora_alpha": 8.0}, pipeline={"true_cfg_scale": 2.0}
    )
    worker = FakeAsyncOmni.instances[0].worker
    params = PARAMS.replace(sde_window_size=2, window_start=0, guidance_scale=2.0)
    out = run(engine.generate(PROMPT, [1, 2, 3], params))  # fills diffusers' RoPE caches under inference mode
    run(engine.init_actor(ActorConfig(ppo_micro_batch_size_per_gpu=2), 0, 1, None, lora_seed=5))
    served_before = run(engine.lora_checksum())
    assert served_before == run(engine.actor_call("lora_checksum"))  # the rank's adapter is the engine's

    raw = np.array([PROMPT] * 3, dtype=object)
    data = records_data_proto([out], {"raw_prompt": raw, "uid": np.array(["g"] * 3, dtype=object)})
    assert data.batch["guidance_scale"].eq(2.0).all()  # the settings crossed the worker's wire with the record
    batch = TrainBatch.from_data_proto(data, torch.tensor([1.0, -1.0, 0.5]))
    # The rollout ran with peft's initial adapter (B = 0: the identity) and so does the rank (seeded A, B = 0):
    # the recomputed log-probs equal the rollout's, ratio 1.
    metrics = run(engine.actor_call("update", batch.as_dict(), batch.num_terms))
    assert metrics["actor/num_train_terms"] == 6 and metrics["actor/grad_norm"] > 0
    assert metrics["actor/ratio_mean"] == pytest.approx(1.0, abs=1e-5)
    served_after = run(engine.lora_checksum())
    assert served_after != served_before and served_after == run(engine.actor_call("lora_checksum"))
    assert ("rpc", "verl_omni_actor_call") in FakeAsyncOmni.instances[0].calls
    # The next rollout (inference mode again) serves the trained adapter (one small step: the latents move).
    assert not torch.equal(run(engine.generate(PROMPT, [1], params)).latents[:, -1], out.latents[:1, -1])
    assert worker._verl_omni_actor.actor.transformer is worker.model_runner.pipeline.transformer


def test_the_worker_rank_takes_the_text_encoder_off_for_its_update(fake_vllm_omni, tiny_qwen_image_dir):
    """``model.text_encoder_offload=true`` reaches the rank inside the worker: its update moves the pipeline's text
    encoder off and back (no vllm CuMem pool here: host copies), and the next rollout encodes as before."""
    import numpy as np
    from helpers import records_data_proto

    from verl_omni.config.actor import ActorConfig
    from verl_omni.workers.train_batch import TrainBatch

    lora = {"lora_rank": 4, "lora_alpha": 8.0, "text_encoder_offload": True}
    engine = make_engine(tiny_qwen_image_dir, lora=lora, pipeline={"true_cfg_scale": 2.0})
    params = PARAMS.replace(sde_window_size=2, window_start=0, guidance_scale=2.0)
    out = run(engine.generate(PROMPT, [1, 2], params))
    run(engine.init_actor(ActorConfig(ppo_micro_batch_size_per_gpu=2), 0, 1, None, lora_seed=5))
    offload = FakeAsyncOmni.instances[0].worker._verl_omni_actor.text_encoders
    assert list(offload.modules) == ["text_encoder"] and offload.pool is None
    info = {"raw_prompt": np.array([PROMPT] * 2, dtype=object), "uid": np.array(["g"] * 2, dtype=object)}
    batch = TrainBatch.from_data_proto(records_data_proto([out], info), torch.tensor([1.0, -1.0]))
    metrics = run(engine.actor_call("update", batch.as_dict(), batch.num_terms))
    assert metrics["actor/text_encoder_offloaded_gb"] > 0 and metrics["actor/grad_norm"] > 0
    assert not offload.offloaded
    again = run(engine.generate(PROMPT, [1, 2], params))
    assert torch.equal(again.prompt_embeds, out.prompt_embeds)
    assert torch.equal(again.negative_prompt_embeds, out.negative_prompt_embeds)


def test_an_actor_call_that_fails_in_the_worker_raises_the_ranks_own_error(fake_vllm_omni, tiny_qwen_image_dir):
    """vllm-omni's collective_rpc logs a worker's exception without raising it in the caller: the worker writes the
    rank's exception beside the call's result and the engine raises it, naming the verb; the rank goes on serving."""
    from verl_omni.config.actor import ActorConfig

    engine = make_engine(tiny_qwen_image_dir, lora={"lora_rank": 4, "lora_alpha": 8.0})
    run(engine.init_actor(ActorConfig(ppo_micro_batch_size_per_gpu=2), 0, 1, None, lora_seed=5))
    before = run(engine.actor_call("lora_checksum"))
    with pytest.raises(RuntimeError) as failure:
        run(engine.actor_call("load_lora_state_dict", {"not_a_lora_weight": torch.zeros(2)}))
    text = str(failure.value)
    assert "failed in 'load_lora_state_dict'" in text and "not_a_lora_weight" in text
    assert "The rank's traceback" in text and "set_lora_state_dict" in text
    assert "out of memory" not in text
    assert run(engine.actor_call("lora_checksum")) == before


def test_an_engine_that_does_not_start_says_whether_its_weights_fit_the_gpu(fake_vllm_omni, tiny_qwen_image_dir):
    """vllm-omni's start-up error can be empty; the engine's names the model and compares the weights, in the
    rollout's dtype, with what the engine may take of the GPU."""
    from verl_omni.rollout.engines.vllm_omni.engine import start_failure
    from verl_omni.workers.full_weights import stored_parameter_counts

    class NoStart(FakeAsyncOmni):
        def __init__(self, **kwargs):
            raise RuntimeError("Orchestrator initialization failed: ")

    fake_vllm_omni.AsyncOmni = NoStart
    with pytest.raises(
        RuntimeError, match=r"vllm-omni's engine did not start for .*Orchestrator initialization"
    ) as info:
        make_engine(tiny_qwen_image_dir)
    assert isinstance(info.value.__cause__, RuntimeError)
    params = sum(stored_parameter_counts(tiny_qwen_image_dir).values())
    error = RuntimeError("Orchestrator initialization failed: ")
    gpu = 3 * params  # a GPU between the weights in bfloat16 (2 bytes each, at 0.9 of it) and in float32
    too_big = start_failure(tiny_qwen_image_dir, rollout_config(dtype="float32"), error, gpu_bytes=gpu)
    assert f"{4 * params / 1e9:.1f} GB in float32" in too_big and "do not fit" in too_big
    assert "actor_rollout_ref.rollout.dtype=bfloat16" in too_big and "--dtype bfloat16" in too_big
    fits = start_failure(tiny_qwen_image_dir, rollout_config(dtype="bfloat16"), error, gpu_bytes=gpu)
    assert "in bfloat16" in fits and "do not fit" not in fits and fits.endswith("The engine's log above says why.")


def test_an_out_of_memory_in_the_worker_says_which_keys_lower_the_update_memory():
    from verl_omni.rollout.engines.vllm_omni.wire import actor_call_failed, actor_error

    try:
        raise RuntimeError("CUDA Error: out of memory at /workspace/csrc/cumem_allocator.cpp:163")
    except RuntimeError as exc:
        error = actor_error(exc, "Traceback ...")
    text = str(actor_call_failed("update", error))
    assert text.startswith("the actor rank in vllm-omni's worker failed in 'update': RuntimeError: CUDA Error: out of")
    for key in ("ppo_micro_batch_size_per_gpu", "gpu_memory_utilization", "gradient_checkpointing_blocks"):
        assert key in text


def test_rope_frequencies_cached_under_inference_mode_can_train():
    """diffusers caches Qwen-Image's RoPE tables per device; on a GPU the first rollout (vllm-omni runs it under
    inference mode) fills that cache with inference tensors, which autograd refuses. The worker's hook hands
    training calls normal copies."""
    from verl_omni.core.workarounds import allow_autograd_through_rope

    class CachingRope(torch.nn.Module):  # what the per-device cache does: the first call's tensors, kept
        def forward(self):
            if not hasattr(self, "cached"):
                self.cached = (torch.randn(4), torch.randn(3))
            return self.cached

    transformer = torch.nn.Module()
    transformer.pos_embed = CachingRope()
    with torch.inference_mode():
        transformer.pos_embed()  # the rollout fills the cache
    x = torch.randn(4, requires_grad=True)
    with pytest.raises(RuntimeError, match="Inference tensors cannot be saved for backward"):
        (x * transformer.pos_embed()[0]).sum().backward()
    allow_autograd_through_rope(transformer)
    allow_autograd_through_rope(transformer)  # idempotent: one hook
    (x * transformer.pos_embed()[0]).sum().backward()
    assert torch.equal(x.grad, transformer.pos_embed.cached[0])
    with torch.inference_mode():  # rollouts still get the cached tensors themselves
        assert transformer.pos_embed()[0] is transformer.pos_embed.cached[0]
