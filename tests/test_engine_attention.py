"""The engine attention of SD3, FLUX and Wan2.1 (what the vllm-omni engine installs, ``use_attention_function``): the
engine's kernel serves every call it can, with diffusers' result; regional compile finds each family's blocks.
(Qwen-Image's processor: tests/test_rl_pipelines.py; FLUX's rollout with it: tests/test_flux_pipeline.py.)"""

import pytest
import torch
from helpers import model_config, rollout_config
from test_vllm_omni_engine_adapter import fake_vllm_omni  # noqa: F401  (the test double of vllm-omni, a fixture)

from verl_omni.config.sampling import DiffusionSamplingParams
from verl_omni.core.conditioning import Conditioning
from verl_omni.pipelines import engine_attention
from verl_omni.pipelines.loading import load_rl_pipeline

PROMPT = "a red cat"
SEEDS = [11, 22]


def _sdpa_bshd(q, k, v, causal=False, softmax_scale=None):
    """A stand-in for the engine's flash kernel ([B, S, H, D] in and out), counting its calls."""
    _sdpa_bshd.calls += 1
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal, scale=softmax_scale
    )
    return out.transpose(1, 2)


def _params(**kw):
    base = dict(num_inference_steps=3, height=64, width=64, noise_level=0.7, sde_window_size=2, window_start=0)
    return DiffusionSamplingParams(**(base | kw))


@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_sd3_engine_attention_computes_what_diffusers_computes(tiny_sd3_dir, monkeypatch, guidance_scale):
    from verl_omni.pipelines.sd3.attention import SD3EngineAttnProcessor

    pipe = load_rl_pipeline(tiny_sd3_dir, "sd3", "float32")
    params = _params(guidance_scale=guidance_scale)
    reference = pipe.rl_generate(PROMPT, SEEDS, params)
    layers = pipe.transformer.config.num_layers
    assert pipe.use_attention_function(_sdpa_bshd) == layers
    assert all(isinstance(p, SD3EngineAttnProcessor) for p in pipe.transformer.attn_processors.values())
    assert not pipe.has_unmasked_attention_kernel  # float32: flash kernels take bf16 / fp16 only
    # let the float32 stand-in run, at the tiny model's head dim 32 (FA3 takes 64..256)
    monkeypatch.setattr(engine_attention, "FLASH_DTYPES", (torch.float32,))
    monkeypatch.setattr(engine_attention, "KERNEL_HEAD_DIMS", (32, 256))
    _sdpa_bshd.calls = 0
    fused = pipe.rl_generate(PROMPT, SEEDS, params)
    assert _sdpa_bshd.calls == layers * params.num_inference_steps  # CFG: both branches in one call (same lengths)
    rel = ((fused.latents - reference.latents).norm() / reference.latents.norm()).item()
    print(f"[SD3 cfg={guidance_scale}] engine attention vs diffusers: final latents rel L2 {rel:.2e}")
    assert rel < 1e-5
    assert torch.allclose(fused.log_probs, reference.log_probs, atol=1e-5)
    assert (fused.images.int() - reference.images.int()).abs().max().item() <= 1
    _sdpa_bshd.calls = 0
    with torch.enable_grad():  # a training forward: diffusers' attention (the engine's kernel has no backward)
        x = reference.latents[:, 1].clone().requires_grad_(True)
        pipe.predict_velocity(x, reference.timesteps[1], Conditioning.from_fields(reference), guidance_scale, 64, 64)
    assert _sdpa_bshd.calls == 0


@pytest.mark.parametrize("guidance_scale", [1.0, 5.0])
def test_wan_engine_attention_computes_what_diffusers_computes(tiny_wan_dir, monkeypatch, guidance_scale):
    """Wan2.1's self- and cross-attention (no text mask: UMT5's embeddings are zero-padded) both go through the
    engine's kernel, one call per module and step with CFG's branches batched, with diffusers' result."""
    from verl_omni.pipelines.wan.attention import WanEngineAttnProcessor
    from verl_omni.pipelines.wan.options import WanOptions

    pipe = load_rl_pipeline(tiny_wan_dir, "wan", "float32", family_options=WanOptions(num_frames=5))
    params = _params(height=32, width=32, guidance_scale=guidance_scale, negative_prompt="blurry")
    reference = pipe.rl_generate(PROMPT, SEEDS, params)
    modules = 2 * pipe.transformer.config.num_layers  # attn1 (self) and attn2 (cross) per block
    assert pipe.use_attention_function(_sdpa_bshd) == modules
    assert all(isinstance(p, WanEngineAttnProcessor) for p in pipe.transformer.attn_processors.values())
    assert not pipe.has_unmasked_attention_kernel  # float32: flash kernels take bf16 / fp16 only
    monkeypatch.setattr(engine_attention, "FLASH_DTYPES", (torch.float32,))
    monkeypatch.setattr(engine_attention, "KERNEL_HEAD_DIMS", (16, 256))  # the tiny model's head dim 16
    _sdpa_bshd.calls = 0
    fused = pipe.rl_generate(PROMPT, SEEDS, params)
    assert _sdpa_bshd.calls == modules * params.num_inference_steps
    rel = ((fused.latents - reference.latents).norm() / reference.latents.norm()).item()
    print(f"[Wan cfg={guidance_scale}] engine attention vs diffusers: final latents rel L2 {rel:.2e}")
    assert rel < 1e-5
    assert torch.allclose(fused.log_probs, reference.log_probs, atol=1e-5)
    assert (fused.media.int() - reference.media.int()).abs().max().item() <= 1
    _sdpa_bshd.calls = 0
    with torch.enable_grad():  # a training forward: diffusers' attention (the engine's kernel has no backward)
        x = reference.latents[:, 1].clone().requires_grad_(True)
        pipe.predict_velocity(x, reference.timesteps[1], Conditioning.from_fields(reference), guidance_scale, 32, 32)
    assert _sdpa_bshd.calls == 0


def test_sd35_image_only_attention_goes_through_the_engine_processor_too(monkeypatch):
    """SD3.5's dual-attention blocks (attn2: image tokens only, no text) take the same processor and give diffusers'
    result."""
    from diffusers import SD3Transformer2DModel
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    from verl_omni.pipelines.sd3.attention import SD3EngineAttnProcessor

    torch.manual_seed(0)
    kw = dict(sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=32)
    model = SD3Transformer2DModel(
        **kw,
        num_attention_heads=2,
        joint_attention_dim=64,
        caption_projection_dim=64,
        pooled_projection_dim=64,
        pos_embed_max_size=32,
        qk_norm="rms_norm",
        dual_attention_layers=(0,),
    ).eval()
    inputs = dict(
        hidden_states=torch.randn(2, 16, 8, 8),
        encoder_hidden_states=torch.randn(2, 7, 64),
        pooled_projections=torch.randn(2, 64),
        timestep=torch.tensor([500.0, 300.0]),
        return_dict=False,
    )
    with torch.no_grad():
        expected = model(**inputs)[0]
        monkeypatch.setattr(engine_attention, "FLASH_DTYPES", (torch.float32,))
        monkeypatch.setattr(engine_attention, "KERNEL_HEAD_DIMS", (32, 256))
        changed = engine_attention.install_processor(
            model,
            (JointAttnProcessor2_0, SD3EngineAttnProcessor),
            lambda: SD3EngineAttnProcessor(_sdpa_bshd),
        )
        assert changed == 3  # two joint attentions and one image-only attn2
        _sdpa_bshd.calls = 0
        got = model(**inputs)[0]
    assert _sdpa_bshd.calls == 3
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_the_kernel_serves_only_unmasked_flash_dtype_calls_at_head_dims_it_takes():
    def q(head_dim, dtype=torch.bfloat16, grad=False):
        return torch.zeros(1, 4, 2, head_dim, dtype=dtype, requires_grad=grad)

    assert engine_attention.kernel_applies(q(64), None) and engine_attention.kernel_applies(q(256), None)
    assert not engine_attention.kernel_applies(q(32), None)  # FA3 takes 64..256
    assert not engine_attention.kernel_applies(q(512), None)
    assert not engine_attention.kernel_applies(q(128, torch.float32), None)
    assert not engine_attention.kernel_applies(q(128), torch.ones(1, 4, dtype=torch.bool))
    with torch.enable_grad():
        assert not engine_attention.kernel_applies(q(128, grad=True), None)  # the kernel has no backward
    with torch.no_grad():
        assert engine_attention.kernel_applies(q(128, grad=True), None)


@pytest.mark.parametrize(
    "family, blocks", [("sd3", ["JointTransformerBlock"]), ("flux", None), ("wan", ["WanTransformerBlock"])]
)
def test_regional_compile_finds_each_familys_blocks(request, family, blocks):
    """diffusers' SD3 transformer names no repeated blocks: the pipeline class names them, so the actor's
    ``compile_repeated_blocks`` and vllm-omni's regional compile find them (FLUX's own list stays)."""
    pipe = load_rl_pipeline(request.getfixturevalue(f"tiny_{family}_dir"), family, "float32")
    expected = blocks if family != "flux" else ["FluxTransformerBlock", "FluxSingleTransformerBlock"]
    assert list(pipe.transformer._repeated_blocks) == expected
    pipe.transformer.compile_repeated_blocks(dynamic=True)  # wraps only; nothing compiles until a forward
    compiled = [m for m in pipe.transformer.modules() if getattr(m, "_compiled_call_impl", None) is not None]
    assert compiled and all(type(m).__name__ in expected for m in compiled)


def test_the_workers_autograd_hook_takes_a_single_tensor_position_embedding(tiny_sd3_dir):
    """The hybrid engine's actor trains through the engine's transformer; the worker hooks every family's
    ``pos_embed``. SD3's patch embedding returns one tensor (FLUX's RoPE a pair, Qwen-Image's a pair): a training
    forward through the hooked SD3 transformer gets gradients."""
    from verl_omni.core.workarounds import allow_autograd_through_rope

    pipe = load_rl_pipeline(tiny_sd3_dir, "sd3", "float32")
    allow_autograd_through_rope(pipe.transformer)
    params = _params()
    cond = pipe.encode_conditions(PROMPT, None, params).conditioning
    latents = pipe.prepare_rl_latents(1, params, [torch.Generator().manual_seed(0)], "cpu").requires_grad_(True)
    with torch.inference_mode():  # a rollout forward first, as the engine runs it
        pipe.predict_velocity(latents.detach(), torch.tensor([500.0]), cond, 1.0, 64, 64)
    with torch.enable_grad():
        velocity = pipe.predict_velocity(latents, torch.tensor([500.0]), cond, 1.0, 64, 64)
        (grad,) = torch.autograd.grad(velocity.sum(), latents)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


@pytest.mark.usefixtures("fake_vllm_omni")
@pytest.mark.parametrize("tiny", ["flux", "sd3", "wan", "wan2_2_ti2v", "wan2_2_t2v"])
def test_each_family_goes_through_the_vllm_omni_workers_path(tiny, request, monkeypatch):
    """On vllm-omni's test double (tests/test_vllm_omni_engine_adapter.py): the worker loads the family's RL pipeline,
    installs its engine attention with the served kernel (a stand-in here: CPU has no FA3) and none of Qwen-Image's
    switches, and the engine's images, latents and log-probs are the diffusers engine's for the same seeds (Wan2.2's
    TI2V-5B shape too: per-token timesteps, the 16x VAE; and A14B's two experts, both served by the kernel)."""
    from test_vllm_omni_engine_adapter import FakeAsyncOmni, make_engine, run

    from verl_omni.pipelines.registry import tiny_model
    from verl_omni.rollout.engines import get_engine_class
    from verl_omni.rollout.engines.vllm_omni import worker

    family = tiny_model(tiny)[0].name
    model_dir = request.getfixturevalue(f"tiny_{tiny}_dir")
    monkeypatch.setattr(worker, "resolve_flash_attention", lambda: _sdpa_bshd)
    monkeypatch.setattr(engine_attention, "FLASH_DTYPES", (torch.float32,))
    monkeypatch.setattr(engine_attention, "KERNEL_HEAD_DIMS", (16, 256))  # the tiny models' head dims 16 / 32
    guidance = {"flux": 1.0, "sd3": 3.0, "wan": 5.0}[family]
    params = _params(height=32, width=32, guidance_scale=guidance)
    options = {"wan": {"wan": {"num_frames": 5}}}.get(family, {})  # Wan: 5-frame clips
    engine = make_engine(model_dir, lora={"lora_rank": 0, "pipeline": family, **options})
    (omni,) = FakeAsyncOmni.instances[-1:]
    pipe = omni.worker.model_runner.pipeline.pipe
    assert type(pipe).__name__ == {"flux": "FluxRLPipeline", "sd3": "SD3RLPipeline", "wan": "WanRLPipeline"}[family]
    assert pipe.has_unmasked_attention_kernel
    _sdpa_bshd.calls = 0
    served = run(engine.generate(PROMPT, SEEDS, params))
    assert _sdpa_bshd.calls > 0  # the engine's kernel ran in the rollout
    reference = get_engine_class("diffusers")(
        model_config(model_dir, lora_rank=0, pipeline=family, **options), rollout_config(dtype="float32")
    )
    expected = run(reference.generate(PROMPT, SEEDS, params))
    assert torch.equal(served.latents[:, 0], expected.latents[:, 0])
    torch.testing.assert_close(served.latents, expected.latents, rtol=0, atol=1e-5)
    torch.testing.assert_close(served.log_probs, expected.log_probs, rtol=0, atol=1e-5)
    assert (served.media.int() - expected.media.int()).abs().max() <= 1


def test_the_engine_passes_each_family_only_the_attention_switches_its_options_section_declares():
    """The switches come from the family's own options section: Qwen-Image's names its processor's keywords, FLUX
    and SD3 declare none, so their ``use_attention_function`` gets no keyword at all."""
    import inspect

    from verl_omni.rollout.engines.vllm_omni.worker import attention_options

    qwen = attention_options({"pipeline": "qwen_image", "family_options": {"qk_norm_rope_kernel": False}})
    assert qwen == {
        "qk_kernel": False,
        "lora_in_kernel": False,
        "fuse_projections": False,
        "project_joint_output": True,
    }
    from verl_omni.pipelines.qwen_image.pipeline import QwenImageFusedAttnProcessor

    assert set(qwen) <= set(inspect.signature(QwenImageFusedAttnProcessor).parameters)  # the processor's keywords
    for family in ("flux", "sd3"):
        assert attention_options({"pipeline": family, "family_options": None}) == {}
    assert attention_options({"pipeline": "wan", "family_options": {"num_frames": 33}}) == {}  # options, no switch
