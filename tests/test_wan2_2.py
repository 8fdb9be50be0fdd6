"""Wan2.2-TI2V-5B's text-to-video through the ``wan`` family, on its tiny random model (``tiny:wan2_2_ti2v``: the
Wan2.2 VAE at 16x spatial, ``expand_timesteps``): video rollouts, equality with the stock diffusers ``WanPipeline``
at noise level 0, batch invariance, the log-prob recomputation, the actor's step-1 ratio and a LoRA update; the
two-expert A14B's refusal; the real-size stand-ins' published figures."""

import numpy as np
import pytest
import torch
from diffusers import WanPipeline
from helpers import model_config, records_data_proto, rollout_config

from verl_omni.config.actor import ActorConfig, OptimConfig
from verl_omni.config.sampling import DiffusionSamplingParams
from verl_omni.core.conditioning import Conditioning
from verl_omni.pipelines.wan.options import WanOptions
from verl_omni.schedulers.flow_match_sde import compute_log_prob, reference_sigma_max

PROMPT = "a red cat walking"
NEGATIVE = "blurry, static"
SEEDS = [11, 22, 33]
FRAMES = 5  # 2 latent frames at the VAE's 4x temporal compression
SIDE = 64  # 4 x 4 latents at the Wan2.2 VAE's 16x, 2 x 2 tokens per frame


@pytest.fixture(scope="module")
def ti2v_pipe(tiny_wan2_2_ti2v_dir):
    from verl_omni.pipelines.loading import load_rl_pipeline

    return load_rl_pipeline(tiny_wan2_2_ti2v_dir, "wan", "float32", family_options=WanOptions(num_frames=FRAMES))


def _params(**kw):
    base = dict(
        num_inference_steps=4,
        height=SIDE,
        width=SIDE,
        noise_level=0.7,
        sde_window_size=2,
        window_start=1,
        guidance_scale=5.0,
        negative_prompt=NEGATIVE,
        max_sequence_length=32,
    )
    return DiffusionSamplingParams(**(base | kw)).validate()


def test_the_tiny_ti2v_is_a_wan_pipeline_with_per_token_timesteps_and_the_16x_vae(ti2v_pipe, tiny_wan2_2_ti2v_dir):
    from verl_omni.models.standins import published_config
    from verl_omni.pipelines.loading import vae_scale_factor_of
    from verl_omni.pipelines.registry import family_for_model_dir

    assert family_for_model_dir(tiny_wan2_2_ti2v_dir) == "wan"
    assert family_for_model_dir("tiny:wan2_2_ti2v") == "wan"
    assert ti2v_pipe.config.expand_timesteps and ti2v_pipe.transformer_2 is None
    assert (ti2v_pipe.vae_scale_factor_temporal, ti2v_pipe.vae_scale_factor_spatial) == (4, 16)
    assert vae_scale_factor_of(tiny_wan2_2_ti2v_dir) == 16  # request validation: sides multiples of 32
    with pytest.raises(ValueError, match="multiples? of 32"):
        DiffusionSamplingParams(height=48, width=48).validate(vae_scale_factor_of(tiny_wan2_2_ti2v_dir))
    published = published_config("wan", "TI2V-5B")
    assert ti2v_pipe.scheduler.config.shift == published["scheduler"]["flow_shift"]
    assert ti2v_pipe.vae.config.is_residual and ti2v_pipe.vae.config.patch_size == 2
    assert ti2v_pipe.transformer.config.in_channels == ti2v_pipe.vae.config.z_dim
    latents = torch.zeros(3, ti2v_pipe.vae.config.z_dim, 2, SIDE // 16, SIDE // 16)
    tokens = ti2v_pipe.token_timesteps(latents, torch.tensor([900.0, 500.0, 20.0]))
    assert tokens.shape == (3, 2 * 2 * 2) and torch.equal(tokens[:, 0], tokens[:, -1])


def test_a_rollout_is_uint8_videos_with_48_channel_shaped_latents(ti2v_pipe):
    out = ti2v_pipe.rl_generate(PROMPT, SEEDS[:2], _params(sde_window_size=0, window_start=None))
    z_dim = ti2v_pipe.vae.config.z_dim
    assert out.media.shape == (2, FRAMES, SIDE, SIDE, 3) and out.media.dtype == torch.uint8
    assert out.latents.shape == (2, 5, z_dim, 2, SIDE // 16, SIDE // 16)  # [B, T+1, C, F', h, w]
    assert out.log_probs.shape == (2, 4) and torch.all(out.log_probs != 0)
    first = out.media[0].numpy()
    assert np.abs(np.diff(first.astype(int), axis=0)).max() > 0  # the frames are not copies of one image


@pytest.mark.parametrize("guidance_scale", [1.0, 5.0])
def test_noise_level_zero_reproduces_the_stock_diffusers_wan_pipeline(ti2v_pipe, tiny_wan2_2_ti2v_dir, guidance_scale):
    params = _params(noise_level=0.0, sde_window_size=0, window_start=None, guidance_scale=guidance_scale)
    out = ti2v_pipe.rl_generate(PROMPT, SEEDS[:2], params)
    assert not out.window_mask.any() and torch.all(out.log_probs == 0)
    stock = WanPipeline.from_pretrained(tiny_wan2_2_ti2v_dir)
    stock.set_progress_bar_config(disable=True)
    assert stock.config.expand_timesteps
    kw = dict(
        prompt=PROMPT,
        negative_prompt=NEGATIVE,
        height=SIDE,
        width=SIDE,
        num_frames=FRAMES,
        num_inference_steps=params.num_inference_steps,
        guidance_scale=guidance_scale,
        num_videos_per_prompt=2,
        max_sequence_length=params.max_sequence_length,
    )
    latents = stock(**kw, generator=[torch.Generator().manual_seed(s) for s in SEEDS[:2]], output_type="latent")
    frames = stock(**kw, generator=[torch.Generator().manual_seed(s) for s in SEEDS[:2]], output_type="np")
    latent_err = (out.latents[:, -1] - latents.frames).abs().max().item()
    pixel_err = np.abs(out.media.numpy().astype(int) - (frames.frames * 255).round().astype(int)).max()
    print(
        f"[Wan2.2-TI2V cfg={guidance_scale}] noise_level=0 vs WanPipeline: latent {latent_err:.2e}, pixel {pixel_err}"
    )
    assert latent_err < 1e-5 and pixel_err <= 1


def test_batched_call_equals_single_calls_with_the_same_seeds(ti2v_pipe):
    params = _params()
    batched = ti2v_pipe.rl_generate(PROMPT, SEEDS, params)
    singles = [ti2v_pipe.rl_generate(PROMPT, [s], params) for s in SEEDS]
    pixel = max((batched.media[i].int() - o.media[0].int()).abs().max().item() for i, o in enumerate(singles))
    latent = max((batched.latents[i] - o.latents[0]).abs().max().item() for i, o in enumerate(singles))
    logp = max((batched.log_probs[i] - o.log_probs[0]).abs().max().item() for i, o in enumerate(singles))
    print(f"[Wan2.2-TI2V] B=3 vs 3xB=1: max pixel diff {pixel}, latent {latent:.2e}, log-prob {logp:.2e}")
    assert pixel <= 1 and latent < 1e-4 and logp < 1e-4
    assert (batched.latents[0, 0] - batched.latents[1, 0]).abs().max() > 0.1  # the seeds differ


def test_rollout_log_probs_equal_the_recomputation_from_the_stored_trajectory(ti2v_pipe):
    params = _params()
    out = ti2v_pipe.rl_generate(PROMPT, SEEDS[:2], params)
    sigma_max, max_err = reference_sigma_max(out.sigmas), 0.0
    for t in torch.nonzero(out.window_mask).flatten().tolist():
        with torch.enable_grad():
            velocity = ti2v_pipe.predict_velocity(
                out.latents[:, t], out.timesteps[t], Conditioning.from_fields(out), 5.0, SIDE, SIDE
            )
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
        max_err = max(max_err, (recomputed - out.log_probs[:, t]).abs().max().item())
    assert max_err < 1e-5


def test_the_actors_step_one_ratio_is_one_and_a_lora_update_changes_the_loss(tiny_wan2_2_ti2v_dir):
    """The hybrid engine's actor recomputes the rollout's log-probs with the per-token timesteps (ratio 1 at step 1,
    both CFG branches batched as in the rollout), and its LoRA update moves the loss."""
    from verl_omni.workers.actor import DiffusionLoRAActor

    rollout = rollout_config(
        pipeline={"true_cfg_scale": 5.0, "negative_prompt": NEGATIVE, "max_sequence_length": 32, "height": SIDE,
                  "width": SIDE, "num_inference_steps": 4},
        algo={"noise_level": 0.7, "sde_window_size": 2},
    )  # fmt: skip
    actor = DiffusionLoRAActor(
        model_config(tiny_wan2_2_ti2v_dir, pipeline="wan", wan={"num_frames": FRAMES}),
        ActorConfig(optim=OptimConfig(lr=1e-2), ppo_micro_batch_size_per_gpu=4),
        rollout,
        lora_seed=3,
    )
    assert actor.pipe.config.expand_timesteps and actor.pipe.num_frames == FRAMES
    params = rollout.sampling_params().replace(window_start=1).validate()
    records = [actor.pipe.rl_generate(p, [3 + 2 * i, 4 + 2 * i], params) for i, p in enumerate([PROMPT, "a sign"])]
    raw = np.empty(4, dtype=object)
    for i in range(4):
        raw[i] = [{"role": "user", "content": "p"}]
    uid = np.array([f"g{i // 2}" for i in range(4)], dtype=object)
    data = records_data_proto(records, {"raw_prompt": raw, "uid": uid})
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5])
    before = actor.lora_state_dict()
    first = actor.update(data, advantages)
    print(f"[Wan2.2-TI2V] step-1 ratios [{first['actor/ratio_min']:.7f}, {first['actor/ratio_max']:.7f}]")
    assert first["actor/ratio_min"] == pytest.approx(1.0, abs=1e-4)
    assert first["actor/ratio_max"] == pytest.approx(1.0, abs=1e-4)
    assert first["actor/grad_norm"] > 0 and np.isfinite(first["actor/policy_loss"])
    assert any(not torch.equal(before[k], v) for k, v in actor.lora_state_dict().items())
    second = actor.update(data, advantages)
    assert second["actor/policy_loss"] != first["actor/policy_loss"]


def test_the_two_expert_a14b_is_refused_naming_what_the_family_serves(tiny_wan2_2_ti2v_dir):
    """Wan2.2-T2V-A14B (``transformer_2`` switched in below ``boundary_ratio``) is refused where any pipeline loads,
    with the models the family serves named."""
    from verl_omni.pipelines.loading import load_rl_pipeline
    from verl_omni.pipelines.tiny import tiny_model_dir

    with pytest.raises(ValueError, match="two-expert Wan2.2 pipeline .*Wan2.2-T2V-A14B.* Wan2.1 T2V or Wan2.2-TI2V-5B"):
        load_rl_pipeline(tiny_model_dir("wan2_2_t2v"), "wan", "float32", family_options=WanOptions(num_frames=FRAMES))


# ------------------------------------------------------------------------------------------- real-size stand-ins
# Wan-AI/Wan2.2-TI2V-5B-Diffusers: transformer/config.json, vae/config.json, scheduler's flow_shift and
# model_index.json's expand_timesteps, as diffusers' scripts/convert_wan_to_diffusers.py writes them
# (get_transformer_config("Wan2.2-TI2V-5B"), vae22_diffusers_config, flow_shift 5.0 for TI2V).
TI2V_5B_TRANSFORMER = {
    "patch_size": [1, 2, 2],
    "num_attention_heads": 24,
    "attention_head_dim": 128,
    "in_channels": 48,
    "out_channels": 48,
    "text_dim": 4096,
    "freq_dim": 256,
    "ffn_dim": 14336,
    "num_layers": 30,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
}
TI2V_5B_VAE = {
    "base_dim": 160,
    "decoder_base_dim": 256,
    "z_dim": 48,
    "dim_mult": [1, 2, 4, 4],
    "num_res_blocks": 2,
    "temperal_downsample": [False, True, True],
    "is_residual": True,
    "in_channels": 12,
    "out_channels": 12,
    "patch_size": 2,
    "scale_factor_temporal": 4,
    "scale_factor_spatial": 16,
}
# Wan-AI/Wan2.2-T2V-A14B-Diffusers: two experts of Wan2.1-T2V-14B's shape (get_transformer_config
# ("Wan2.2-T2V-A14B")), boundary_ratio 0.875, Wan2.1's VAE, flow_shift 3.0
A14B_EXPERT = {"num_attention_heads": 40, "attention_head_dim": 128, "ffn_dim": 13824, "num_layers": 40}


def test_the_ti2v_5b_stand_in_has_the_published_configs_and_5b_parameters(tmp_path):
    from verl_omni.models.standins import build_components, param_counts, read_standin_record
    from verl_omni.pipelines.registry import family_for_model_dir, get_family

    c = build_components("wan", device="meta", variant="TI2V-5B")
    for key, value in TI2V_5B_TRANSFORMER.items():
        got = list(c["transformer"].config[key]) if isinstance(value, list) else c["transformer"].config[key]
        assert got == value, f"transformer.{key}: {got!r} != {value!r}"
    for key, value in TI2V_5B_VAE.items():
        got = list(c["vae"].config[key]) if isinstance(value, list) else c["vae"].config[key]
        assert got == value, f"vae.{key}: {got!r} != {value!r}"
    assert len(c["vae"].config.latents_mean) == len(c["vae"].config.latents_std) == 48
    assert c["expand_timesteps"] is True and "transformer_2" not in c
    assert c["scheduler"].config.use_flow_sigmas and c["scheduler"].config.flow_shift == 5.0
    transformer = param_counts(c)["transformer"]
    assert 4.95e9 < transformer < 5.05e9, f"{transformer:,}"  # the "5B" of its name
    path = get_family("wan").build_standin(tmp_path / "ti2v", layers=1, device="meta", variant="TI2V-5B")
    assert read_standin_record(path)["checkpoint"] == "Wan-AI/Wan2.2-TI2V-5B-Diffusers"
    assert family_for_model_dir(path) == "wan"
    assert WanPipeline.load_config(path)["expand_timesteps"] is True


def test_the_a14b_stand_in_has_two_14b_experts_and_the_published_boundary(tmp_path):
    from verl_omni.models.standins import build_components, param_counts

    c = build_components("wan", device="meta", variant="T2V-A14B")
    for name in ("transformer", "transformer_2"):
        for key, value in A14B_EXPERT.items():
            assert c[name].config[key] == value, f"{name}.{key}"
    counts = param_counts(c)
    assert (
        counts["transformer"]
        == counts["transformer_2"]
        == param_counts(build_components("wan", device="meta", variant="14B"))["transformer"]
    )
    assert c["boundary_ratio"] == 0.875 and c["vae"].config.z_dim == 16
    assert c["scheduler"].config.flow_shift == 3.0
    with pytest.raises(ValueError, match=r"variant='7B' is not one of \['1.3B', '14B', 'TI2V-5B', 'T2V-A14B'\]"):
        build_components("wan", device="meta", variant="7B")
