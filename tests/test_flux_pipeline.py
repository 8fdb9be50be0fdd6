"""FLUX.1-dev on the tiny random FLUX (``tiny:flux``): equality with diffusers' ``FluxPipeline`` at noise level 0
(distilled guidance, optional true CFG), batch invariance, the engine attention processor, a rollout through the
diffusers engine, an actor update whose first ratios are 1, and one FlowGRPO step of the trainer."""

import asyncio

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline
from helpers import model_config, records_data_proto, rollout_config, trainer_config

from verl_omni.config.actor import ActorConfig, OptimConfig
from verl_omni.config.sampling import DiffusionSamplingParams
from verl_omni.core.conditioning import Conditioning
from verl_omni.pipelines import get_pipeline_class
from verl_omni.pipelines.flux.pipeline import DISTILLED_GUIDANCE_SCALE, FluxRLPipeline
from verl_omni.schedulers.flow_match_sde import compute_log_prob, reference_sigma_max

PROMPT = "a red cat"
SEEDS = [11, 22, 33, 44]


def _params(**kw):
    base = dict(num_inference_steps=4, height=64, width=64, noise_level=0.7, sde_window_size=2, window_start=1)
    return DiffusionSamplingParams(**(base | kw))


def _stock(pipe, seeds, params, distilled=DISTILLED_GUIDANCE_SCALE):
    """diffusers' FluxPipeline on the same components, per-sample generators seeded as ours: (latents, images)."""
    stock = FluxPipeline(**pipe.components)
    stock.set_progress_bar_config(disable=True)
    kw = dict(
        prompt=[PROMPT] * len(seeds),
        height=params.height,
        width=params.width,
        num_inference_steps=params.num_inference_steps,
        guidance_scale=distilled,
        max_sequence_length=params.max_sequence_length,
    )
    if params.guidance_scale > 1:  # true CFG, the empty prompt as the negative (what rl_generate uses by default)
        kw.update(true_cfg_scale=params.guidance_scale, negative_prompt=[""] * len(seeds))
    gens = lambda: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    latents = stock(**kw, generator=gens(), output_type="latent").images
    images = stock(**kw, generator=gens(), output_type="np").images
    return latents, images


def test_flux_is_registered_and_tiny_flux_is_a_flux_pipeline(tiny_flux_dir):
    import json
    import os

    assert get_pipeline_class("flux") is FluxRLPipeline
    with open(os.path.join(tiny_flux_dir, "model_index.json")) as f:
        assert json.load(f)["_class_name"] == "FluxPipeline"
    # flow_grpo's FLUX trainer: no CFG, every row trains
    assert FluxRLPipeline.REFERENCE_TRAINER_DEFAULTS["flowgrpo"] == {
        "detach_unconditional": False,
        "drop_zero_advantage": False,
    }


@pytest.mark.parametrize("true_cfg", [1.0, 2.5])
def test_noise_level_zero_reproduces_diffusers_flux_pipeline(flux_rl_pipe, true_cfg):
    """The same seeds through diffusers' FluxPipeline: the same final latents (float32) and images."""
    params = _params(noise_level=0.0, sde_window_size=0, window_start=None, guidance_scale=true_cfg)
    out = flux_rl_pipe.rl_generate(PROMPT, SEEDS[:2], params)
    assert not out.window_mask.any() and torch.all(out.log_probs == 0)
    assert (out.negative_prompt_embeds is not None) == (true_cfg > 1)
    latents, images = _stock(flux_rl_pipe, SEEDS[:2], params)
    latent_err = (out.latents[:, -1] - latents).abs().max().item()
    pixel_err = np.abs(out.images.numpy().astype(int) - (images * 255).round().astype(int)).max()
    print(f"[FLUX true_cfg={true_cfg}] noise_level=0 vs diffusers: latent diff {latent_err:.2e}, pixel {pixel_err}")
    assert latent_err < 1e-5 and pixel_err <= 1


def test_the_distilled_guidance_is_the_pipelines_and_reaches_every_forward(tiny_flux_dir):
    pipe = FluxRLPipeline.from_pretrained(tiny_flux_dir)
    pipe.set_progress_bar_config(disable=True)
    params = _params(noise_level=0.0, sde_window_size=0, window_start=None)
    default = pipe.rl_generate(PROMPT, SEEDS[:1], params)
    pipe.distilled_guidance_scale = 6.0
    stronger = pipe.rl_generate(PROMPT, SEEDS[:1], params)
    assert (default.latents[:, -1] - stronger.latents[:, -1]).abs().max() > 1e-3
    latents, _ = _stock(pipe, SEEDS[:1], params, distilled=6.0)
    assert (stronger.latents[:, -1] - latents).abs().max() < 1e-5


def test_the_configured_distilled_guidance_reaches_the_diffusers_engines_pipeline(tiny_flux_dir):
    """actor_rollout_ref.model.flux.distilled_guidance_scale reaches the engine's pipeline: other images than the
    default, the same as diffusers' FluxPipeline with that guidance_scale."""
    from verl_omni.rollout.engines.diffusers import DiffusersEngine

    params = _params(noise_level=0.0, sde_window_size=0, window_start=None)
    default = DiffusersEngine(model_config(tiny_flux_dir, lora_rank=0), rollout_config())
    engine = DiffusersEngine(
        model_config(tiny_flux_dir, lora_rank=0, flux={"distilled_guidance_scale": 6.0}), rollout_config()
    )
    assert default.pipe.distilled_guidance_scale == DISTILLED_GUIDANCE_SCALE == 3.5
    assert engine.pipe.distilled_guidance_scale == 6.0
    ours = asyncio.run(engine.generate(PROMPT, SEEDS[:2], params))
    theirs = asyncio.run(default.generate(PROMPT, SEEDS[:2], params))
    assert (ours.images.int() - theirs.images.int()).abs().max() > 0
    latents, images = _stock(engine.pipe, SEEDS[:2], params, distilled=6.0)
    assert (ours.latents[:, -1] - latents).abs().max() < 1e-5
    assert np.abs(ours.images.numpy().astype(int) - (images * 255).round().astype(int)).max() <= 1


@pytest.mark.parametrize("bad", [0, -1.0, float("inf"), float("nan"), "3.5", True])
def test_a_bad_distilled_guidance_is_refused_naming_the_key(bad):
    from verl_omni.config.model import ModelConfig

    key = r"actor_rollout_ref\.model\.flux\.distilled_guidance_scale"
    with pytest.raises(ValueError, match=rf"{key}=.* must be a positive finite number"):
        ModelConfig(path="tiny:flux", flux={"distilled_guidance_scale": bad})


def test_batched_call_equals_single_calls_with_the_same_seeds(flux_rl_pipe):
    params = _params(guidance_scale=2.0)
    batched = flux_rl_pipe.rl_generate(PROMPT, SEEDS, params)
    singles = [flux_rl_pipe.rl_generate(PROMPT, [s], params) for s in SEEDS]
    latent = max((batched.latents[i] - o.latents[0]).abs().max().item() for i, o in enumerate(singles))
    logp = max((batched.log_probs[i] - o.log_probs[0]).abs().max().item() for i, o in enumerate(singles))
    pixel = max((batched.images[i].int() - o.images[0].int()).abs().max().item() for i, o in enumerate(singles))
    print(f"[FLUX] B=4 vs 4xB=1: latent {latent:.2e}, log-prob {logp:.2e}, pixel {pixel}")
    assert latent < 1e-4 and logp < 1e-4 and pixel <= 1
    assert (batched.latents[0, 0] - batched.latents[1, 0]).abs().max() > 0.1  # different seeds, different samples


@pytest.mark.parametrize("true_cfg", [1.0, 3.0])
def test_rollout_log_prob_equals_trainer_recomputation(flux_rl_pipe, true_cfg):
    params = _params(guidance_scale=true_cfg)
    out = flux_rl_pipe.rl_generate(PROMPT, SEEDS[:2], params)
    sigma_max = reference_sigma_max(out.sigmas)
    errors = []
    for t in torch.nonzero(out.window_mask).flatten().tolist():
        with torch.enable_grad():
            velocity = flux_rl_pipe.predict_velocity(
                out.latents[:, t], out.timesteps[t], Conditioning.from_fields(out), true_cfg, 64, 64
            )
        assert velocity.requires_grad
        recomputed = compute_log_prob(
            velocity.detach(),
            out.latents[:, t],
            out.latents[:, t + 1],
            out.sigmas[t],
            out.sigmas[t + 1],
            noise_level=params.noise_level,
            sde_type=params.sde_type,
            sigma_max=sigma_max,
        )
        errors.append((recomputed - out.log_probs[:, t]).abs().max().item())
    assert len(errors) == 2 and max(errors) < 1e-5


def test_prompt_truncation_is_counted_in_the_output(flux_rl_pipe, caplog):
    """T5 cuts a prompt at max_sequence_length; the output says by how many tokens, our logs say it at DEBUG only."""
    import logging

    long_prompt, limit = "a very long prompt " * 4, 8
    full = len(flux_rl_pipe.tokenizer_2(long_prompt).input_ids)
    params = _params(num_inference_steps=2, sde_window_size=0, window_start=None, max_sequence_length=limit)
    with caplog.at_level(logging.DEBUG, logger="verl_omni"):
        out = flux_rl_pipe.rl_generate(long_prompt, SEEDS[:1], params)
        short = flux_rl_pipe.rl_generate(PROMPT, SEEDS[:1], params.replace(max_sequence_length=64))
    assert full > limit and out.truncated_prompt_tokens == full - limit and short.truncated_prompt_tokens == 0
    assert out.prompt_embeds.shape[1] == limit  # T5's tokens only (CLIP gives the pooled embedding)
    ours = [r for r in caplog.records if r.name.startswith("verl_omni")]
    assert not [r for r in ours if r.levelno >= logging.WARNING]


def _sdpa_bshd(q, k, v, causal=False, softmax_scale=None):
    """A stand-in for the engine's flash kernel ([B, S, H, D] in and out), counting its calls."""
    _sdpa_bshd.calls += 1
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal, scale=softmax_scale
    )
    return out.transpose(1, 2)


def test_engine_attention_processor_computes_what_diffusers_computes(tiny_flux_dir, monkeypatch):
    """What the vllm-omni engine installs: every attention module (double- and single-stream blocks) calls the
    engine's kernel where it applies, with diffusers' result; training forwards keep diffusers' attention."""
    from verl_omni.pipelines import engine_attention
    from verl_omni.pipelines.flux.attention import FluxEngineAttnProcessor

    pipe = FluxRLPipeline.from_pretrained(tiny_flux_dir)
    pipe.set_progress_bar_config(disable=True)
    params = _params(guidance_scale=2.0)
    reference = pipe.rl_generate(PROMPT, SEEDS[:2], params)
    blocks = pipe.transformer.config.num_layers + pipe.transformer.config.num_single_layers
    assert pipe.use_attention_function(_sdpa_bshd) == blocks
    assert all(isinstance(p, FluxEngineAttnProcessor) for p in pipe.transformer.attn_processors.values())
    _sdpa_bshd.calls = 0
    pipe.rl_generate(PROMPT, SEEDS[:1], params)
    assert _sdpa_bshd.calls == 0 and not pipe.has_unmasked_attention_kernel  # float32: flash kernels take bf16/fp16
    monkeypatch.setattr(engine_attention, "FLASH_DTYPES", (torch.float32,))  # let the float32 stand-in run
    fused = pipe.rl_generate(PROMPT, SEEDS[:2], params)
    assert _sdpa_bshd.calls == blocks * params.num_inference_steps  # one joint call of both CFG branches per block
    assert torch.allclose(fused.latents, reference.latents, atol=1e-5)
    assert torch.allclose(fused.log_probs, reference.log_probs, atol=1e-5)
    _sdpa_bshd.calls = 0
    with torch.enable_grad():
        latents = reference.latents[:, 1].clone().requires_grad_(True)
        pipe.predict_velocity(latents, reference.timesteps[1], Conditioning.from_fields(reference), 2.0, 64, 64)
    assert _sdpa_bshd.calls == 0  # a forward that needs a gradient: diffusers' attention (the kernel has no backward)


def test_rollout_through_the_diffusers_engine(tiny_flux_dir):
    from verl_omni.rollout.engines.diffusers import DiffusersEngine

    engine = DiffusersEngine(model_config(tiny_flux_dir, pipeline="flux"), rollout_config())
    out = asyncio.run(engine.generate(PROMPT, SEEDS, _params()))
    assert out.images.shape == (4, 64, 64, 3) and out.images.dtype == torch.uint8
    assert out.latents.shape[0] == 4 and out.window_mask.sum() == 2
    assert torch.isfinite(out.log_probs).all() and out.pooled_prompt_embeds.shape[0] == 4
    assert "lora" in " ".join(n for n, _ in engine.pipe.transformer.named_parameters())  # the LoRA the actor trains


@pytest.mark.parametrize("distilled", [None, 6.0])
def test_an_actor_update_starts_at_ratio_one_and_moves_the_lora(tiny_flux_dir, distilled):
    """Rollout by the diffusers engine's FluxRLPipeline, update by the actor's own copy (split placement; identity
    LoRA at start), both from one model config: the first ratios are 1 within 1e-4 -- with a non-default distilled
    guidance too, which both pipelines take from actor_rollout_ref.model.flux -- and the update changes the LoRA."""
    from verl_omni.rollout.engines.diffusers import DiffusersEngine
    from verl_omni.workers.actor import DiffusionLoRAActor

    model = model_config(tiny_flux_dir, pipeline="flux")
    if distilled is not None:
        model = model_config(tiny_flux_dir, pipeline="flux", flux={"distilled_guidance_scale": distilled})
    engine = DiffusersEngine(model, rollout_config())
    records, prompts = [], ["a red cat", "text 'OK'"]
    for i, prompt in enumerate(prompts):
        params = _params(height=32, width=32, window_start=i)
        out = asyncio.run(engine.generate(prompt, [s + i for s in SEEDS[:2]], params))
        records.append(out)
    raw = np.empty(4, dtype=object)
    for i in range(4):
        raw[i] = [{"role": "user", "content": prompts[i // 2]}]
    uid = np.array([f"g{i // 2}" for i in range(4)], dtype=object)
    data = records_data_proto(records, {"raw_prompt": raw, "uid": uid})
    actor = DiffusionLoRAActor(
        model,
        ActorConfig(optim=OptimConfig(lr=1e-2), ppo_micro_batch_size_per_gpu=2),
        rollout_config(),
        algorithm={"name": "flowgrpo", "flowgrpo": {}},
    )
    expected = DISTILLED_GUIDANCE_SCALE if distilled is None else distilled
    assert engine.pipe.distilled_guidance_scale == actor.pipe.distilled_guidance_scale == expected
    assert actor.pipe is not engine.pipe
    before = actor.lora_state_dict()
    metrics = actor.update(data, torch.tensor([1.0, -1.0, 0.5, -0.5]))
    ratios = f"[{metrics['actor/ratio_min']:.7f}, {metrics['actor/ratio_max']:.7f}]"
    print(f"[FLUX distilled guidance {expected}] step-1 ratios {ratios}")
    assert metrics["actor/ratio_min"] == pytest.approx(1.0, abs=1e-4)
    assert metrics["actor/ratio_max"] == pytest.approx(1.0, abs=1e-4)
    assert metrics["actor/grad_norm"] > 0
    assert any(not torch.equal(before[k], v) for k, v in actor.lora_state_dict().items())


@pytest.mark.e2e
def test_one_flowgrpo_step_of_the_trainer_on_tiny_flux(ray_session, ocr_data_files, tmp_path):
    from verl_omni.trainer.ray_trainer import FlowGRPOTrainer

    cfg = trainer_config(
        ocr_data_files,
        "tiny:flux",
        tmp_path,
        **{
            "actor_rollout_ref.model.pipeline": "flux",
            "actor_rollout_ref.rollout.pipeline.height": 32,
            "actor_rollout_ref.rollout.pipeline.width": 32,
            "trainer.total_training_steps": 1,
        },
    )
    trainer = FlowGRPOTrainer(cfg).init()
    try:
        (metrics,) = trainer.fit()
    finally:
        trainer.shutdown()
    assert metrics["actor/ratio_min"] == pytest.approx(1.0, abs=1e-4)
    assert metrics["actor/ratio_max"] == pytest.approx(1.0, abs=1e-4)
    assert np.isfinite(metrics["actor/policy_loss"])
