"""Wan2.1 text-to-video (the ``wan`` family) on its tiny random model, and what the tiny Wan2.2 models share with it
(each test over the variants it applies to: ``tiny:wan``, ``tiny:wan2_2_ti2v``, ``tiny:wan2_2_t2v``): video rollouts
with a frame axis, batch invariance, equality with the stock diffusers ``WanPipeline`` at noise level 0, the log-prob
recomputation, the actor's step-1 ratio and a LoRA update; Wan2.1's published UniPC schedule, the options and the
real-size stand-ins' published figures."""

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from diffusers import WanPipeline
from helpers import model_config, records_data_proto, rollout_config

from verl_omni.config.actor import ActorConfig, OptimConfig
from verl_omni.config.sampling import DiffusionSamplingParams
from verl_omni.core.conditioning import Conditioning
from verl_omni.core.media import as_frames, batch_is_video, media_samples
from verl_omni.pipelines.wan.options import WanOptions
from verl_omni.schedulers.flow_match_sde import compute_log_prob, reference_sigma_max

PROMPT = "a red cat walking"
NEGATIVE = "blurry, static"
SEEDS = [11, 22, 33]
FRAMES = 5  # 2 latent frames at the VAE's 4x temporal compression
SIDE = 32  # 4 x 4 latents, 2 x 2 tokens per frame


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


def test_the_frames_option_sets_the_clip_length_and_refuses_what_the_vae_cannot_make(wan_pipe):
    nine = _params(sde_window_size=0, window_start=None, num_inference_steps=2)
    wan_pipe.apply_family_options(WanOptions(num_frames=9))
    try:
        out = wan_pipe.rl_generate(PROMPT, SEEDS[:1], nine)
        assert out.media.shape[1] == 9 and out.latents.shape[3] == 3
    finally:
        wan_pipe.apply_family_options(WanOptions(num_frames=FRAMES, fps=8))
    with pytest.raises(ValueError, match=r"actor_rollout_ref.model.wan.num_frames=8 must be 4k \+ 1 .* e.g. 5 or 9"):
        WanOptions(num_frames=8)
    with pytest.raises(ValueError, match=r"actor_rollout_ref.model.wan.fps=0 must be a number > 0"):
        WanOptions(fps=0)
    wan_pipe.register_to_config(boundary_ratio=0.875)  # a two-expert Wan2.2 pipeline's boundary, without its expert
    try:
        with pytest.raises(ValueError, match="only one of transformer_2 / boundary_ratio: a two-expert Wan2.2"):
            wan_pipe.apply_family_options(WanOptions(num_frames=FRAMES))
    finally:
        wan_pipe.register_to_config(boundary_ratio=None)


@dataclass(frozen=True)
class Variant:
    """A tiny Wan model the shared tests run on: its session pipe and directory fixtures, its clip side (4 x 4
    latents at its VAE's spatial factor) and the label its measurements print under."""

    name: str
    pipe: str
    model_dir: str
    side: int
    spatial: int
    expand_timesteps: bool
    label: str

    def params(self, **kw):
        return _params(**({"height": self.side, "width": self.side} | kw))


WAN = Variant("wan", "wan_pipe", "tiny_wan_dir", SIDE, 8, False, "Wan")
TI2V = Variant("wan2_2_ti2v", "ti2v_pipe", "tiny_wan2_2_ti2v_dir", 64, 16, True, "Wan2.2-TI2V")
A14B = Variant("wan2_2_t2v", "a14b_pipe", "tiny_wan2_2_t2v_dir", SIDE, 8, False, "Wan2.2-A14B")
ONE_EXPERT = pytest.mark.parametrize("variant", [WAN, TI2V], ids=lambda v: v.name)


@pytest.fixture
def pipe(variant, request):
    return request.getfixturevalue(variant.pipe)


@ONE_EXPERT
def test_a_rollout_is_uint8_videos_with_video_latents(pipe, variant):
    side = variant.side
    out = pipe.rl_generate(PROMPT, SEEDS[:2], variant.params(sde_window_size=0, window_start=None))
    assert out.media.shape == (2, FRAMES, side, side, 3) and out.media.dtype == torch.uint8
    assert batch_is_video(out.media.numpy()) and out.num_frames == FRAMES
    z_dim, h = pipe.vae.config.z_dim, side // variant.spatial
    assert out.latents.shape == (2, 5, z_dim, 2, h, h)  # [B, T+1, C, F', h, w]
    assert out.log_probs.shape == (2, 4) and torch.all(out.log_probs != 0)
    assert out.prompt_embeds.shape == (2, 32, pipe.text_encoder.config.d_model)
    assert out.negative_prompt_embeds.shape == out.prompt_embeds.shape and out.prompt_embeds_mask is None
    first, _ = media_samples(out.media)  # what a reward gets: one clip per sample
    assert first.shape == (FRAMES, side, side, 3) and as_frames(first).shape[0] == FRAMES
    assert np.abs(np.diff(first.astype(int), axis=0)).max() > 0  # the frames are not copies of one image
    assert out.sampling["guidance_scale"] == 5.0  # the record carries the settings the actor recomputes with


@ONE_EXPERT
def test_batched_call_equals_single_calls_with_the_same_seeds(pipe, variant):
    params = variant.params()
    batched = pipe.rl_generate(PROMPT, SEEDS, params)
    singles = [pipe.rl_generate(PROMPT, [s], params) for s in SEEDS]
    pixel = max((batched.media[i].int() - o.media[0].int()).abs().max().item() for i, o in enumerate(singles))
    latent = max((batched.latents[i] - o.latents[0]).abs().max().item() for i, o in enumerate(singles))
    logp = max((batched.log_probs[i] - o.log_probs[0]).abs().max().item() for i, o in enumerate(singles))
    print(f"[{variant.label}] B=3 vs 3xB=1: max pixel diff {pixel}, latent {latent:.2e}, log-prob {logp:.2e}")
    assert pixel <= 1 and latent < 1e-4 and logp < 1e-4
    assert (batched.latents[0, 0] - batched.latents[1, 0]).abs().max() > 0.1  # the seeds differ
    assert batched.seeds == SEEDS


@pytest.mark.parametrize(
    "variant, guidance_scale, guidance_scale_2",
    [(v, cfg, None) for v in (WAN, TI2V, A14B) for cfg in (1.0, 5.0)] + [(A14B, 4.0, 3.0)],
    ids=lambda x: x.name if isinstance(x, Variant) else str(x),
)
def test_noise_level_zero_reproduces_the_stock_diffusers_wan_pipeline(
    pipe, variant, request, guidance_scale, guidance_scale_2
):
    """The rollout at noise level 0 is ``WanPipeline``'s sampling: its first noise and its clips (A14B: switching
    experts where the stock pipeline does, with ``guidance_scale_2`` on the low-noise steps)."""
    side = variant.side
    params = variant.params(noise_level=0.0, sde_window_size=0, window_start=None, guidance_scale=guidance_scale)
    if guidance_scale_2 is None:
        out = pipe.rl_generate(PROMPT, SEEDS[:2], params)
    else:
        pipe.apply_family_options(WanOptions(num_frames=FRAMES, guidance_scale_2=guidance_scale_2))
        try:
            out = pipe.rl_generate(PROMPT, SEEDS[:2], params)
        finally:
            pipe.apply_family_options(WanOptions(num_frames=FRAMES))
    assert not out.window_mask.any() and torch.all(out.log_probs == 0)
    stock = WanPipeline.from_pretrained(request.getfixturevalue(variant.model_dir))
    stock.set_progress_bar_config(disable=True)
    assert bool(stock.config.expand_timesteps) == variant.expand_timesteps
    kw = dict(
        prompt=PROMPT,
        negative_prompt=NEGATIVE,
        height=side,
        width=side,
        num_frames=FRAMES,
        num_inference_steps=params.num_inference_steps,
        guidance_scale=guidance_scale,
        guidance_scale_2=guidance_scale_2,
        num_videos_per_prompt=2,
        max_sequence_length=params.max_sequence_length,
    )
    latents = stock(**kw, generator=[torch.Generator().manual_seed(s) for s in SEEDS[:2]], output_type="latent")
    frames = stock(**kw, generator=[torch.Generator().manual_seed(s) for s in SEEDS[:2]], output_type="np")
    latent_err = (out.latents[:, -1] - latents.frames).abs().max().item()
    pixel_err = np.abs(out.media.numpy().astype(int) - (frames.frames * 255).round().astype(int)).max()
    label = f"{variant.label} cfg={guidance_scale}" + (f"/{guidance_scale_2}" if guidance_scale_2 else "")
    print(f"[{label}] noise_level=0 vs WanPipeline: latent {latent_err:.2e}, pixel {pixel_err}")
    generators = [torch.Generator().manual_seed(s) for s in SEEDS[:2]]
    channels = stock.transformer.config.in_channels
    x_t = stock.prepare_latents(2, channels, side, side, FRAMES, torch.float32, torch.device("cpu"), generators)
    assert torch.equal(out.latents[:, 0], x_t)
    assert latent_err < 1e-5 and pixel_err <= 1


@ONE_EXPERT
def test_rollout_log_probs_equal_the_recomputation_from_the_stored_trajectory(pipe, variant):
    params = variant.params()
    out = pipe.rl_generate(PROMPT, SEEDS[:2], params)
    sigma_max, max_err = reference_sigma_max(out.sigmas), 0.0
    for t in torch.nonzero(out.window_mask).flatten().tolist():
        with torch.enable_grad():
            velocity = pipe.predict_velocity(
                out.latents[:, t], out.timesteps[t], Conditioning.from_fields(out), 5.0, variant.side, variant.side
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


def records_batch(records):
    """The actor's batch of 2 rollouts of 2 samples: 4 rows, one group (uid) per rollout."""
    raw = np.empty(4, dtype=object)
    for i in range(4):
        raw[i] = [{"role": "user", "content": "p"}]
    uid = np.array([f"g{i // 2}" for i in range(4)], dtype=object)
    return records_data_proto(records, {"raw_prompt": raw, "uid": uid})


@ONE_EXPERT
def test_the_actors_step_one_ratio_is_one_and_a_lora_update_changes_the_loss(variant, request):
    """The hybrid engine's actor recomputes the rollout's log-probs (TI2V: with the per-token timesteps; ratio 1 at
    step 1, both CFG branches batched as in the rollout), and its LoRA update on the attention projections moves the
    loss."""
    from verl_omni.workers.actor import DiffusionLoRAActor

    side = variant.side
    rollout = rollout_config(
        pipeline={"true_cfg_scale": 5.0, "negative_prompt": NEGATIVE, "max_sequence_length": 32, "height": side,
                  "width": side, "num_inference_steps": 4},
        algo={"noise_level": 0.7, "sde_window_size": 2},
    )  # fmt: skip
    actor = DiffusionLoRAActor(
        model_config(request.getfixturevalue(variant.model_dir), pipeline="wan", wan={"num_frames": FRAMES}),
        ActorConfig(optim=OptimConfig(lr=1e-2), ppo_micro_batch_size_per_gpu=4),
        rollout,
        lora_seed=3,
    )
    assert actor.pipe.num_frames == FRAMES
    assert bool(actor.pipe.config.expand_timesteps) == variant.expand_timesteps
    lora_targets = {n.rsplit(".lora_A", 1)[0].split(".")[-2:][0] for n in actor.lora_state_dict() if "lora_A" in n}
    assert {"attn1", "attn2"} <= lora_targets  # self- and cross-attention projections carry the adapter
    params = rollout.sampling_params().replace(window_start=1).validate()
    records = []
    for i, prompt in enumerate([PROMPT, "text 'OK' on a sign"]):
        records.append(actor.pipe.rl_generate(prompt, [3 + 2 * i, 4 + 2 * i], params))
    data = records_batch(records)
    assert tuple(data.batch["media"].shape) == (4, FRAMES, side, side, 3)
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5])
    before = actor.lora_state_dict()
    first = actor.update(data, advantages)
    print(f"[{variant.label}] step-1 ratios [{first['actor/ratio_min']:.7f}, {first['actor/ratio_max']:.7f}]")
    assert first["actor/ratio_min"] == pytest.approx(1.0, abs=1e-4)
    assert first["actor/ratio_max"] == pytest.approx(1.0, abs=1e-4)
    assert first["actor/grad_norm"] > 0 and np.isfinite(first["actor/policy_loss"])
    assert any(not torch.equal(before[k], v) for k, v in actor.lora_state_dict().items())
    second = actor.update(data, advantages)
    assert second["actor/policy_loss"] != first["actor/policy_loss"]
    assert abs(second["actor/ratio_max"] - 1.0) > 1e-6 or abs(second["actor/ratio_min"] - 1.0) > 1e-6


def test_the_published_unipc_scheduler_gives_its_flow_sigmas_and_timesteps(wan_pipe):
    """The published checkpoints' scheduler (UniPC over flow sigmas, shift 3): the schedule is diffusers'
    ``UniPCMultistepScheduler.set_timesteps`` with ``use_flow_sigmas`` (scheduling_unipc_multistep.py, diffusers 0.38),
    transcribed here: linspace(1, 1/1000, T+1)[:-1], shifted, the first moved off 1 by 1e-6, terminal 0."""
    from diffusers import UniPCMultistepScheduler

    from verl_omni.pipelines.wan.published import SCHEDULER

    steps = 20
    sigmas = np.linspace(1, 1 / 1000, steps + 1)[:-1]
    sigmas = 3.0 * sigmas / (1 + 2.0 * sigmas)
    sigmas[0] -= 1e-6
    expected_timesteps = (sigmas * 1000).astype(np.int64)
    expected_sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)
    original = wan_pipe.scheduler
    wan_pipe.scheduler = UniPCMultistepScheduler(**SCHEDULER)
    try:
        got_sigmas, got_timesteps = wan_pipe.rl_schedule(_params(num_inference_steps=steps))
        with pytest.raises(NotImplementedError, match="ode_solver='dpmsolver\\+\\+' needs a FlowMatchEuler"):
            wan_pipe.rl_tail_schedule(_params(num_inference_steps=steps).replace(ode_solver="dpmsolver++"), 4, 5)
    finally:
        wan_pipe.scheduler = original
    np.testing.assert_allclose(got_sigmas.numpy(), expected_sigmas, rtol=0, atol=1e-7)
    assert got_timesteps.tolist() == expected_timesteps.astype(np.float32).tolist()


# ------------------------------------------------------------------------------------------- real-size stand-ins
# Wan-AI/Wan2.1-T2V-1.3B-Diffusers and -14B-Diffusers, transformer/config.json
WAN_TRANSFORMER = {
    "patch_size": [1, 2, 2],
    "attention_head_dim": 128,
    "in_channels": 16,
    "out_channels": 16,
    "text_dim": 4096,
    "freq_dim": 256,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-06,
    "image_dim": None,
    "added_kv_proj_dim": None,
    "rope_max_seq_len": 1024,
}
WAN_SIZES = {
    "1.3B": {"num_attention_heads": 12, "ffn_dim": 8960, "num_layers": 30},
    "14B": {"num_attention_heads": 40, "ffn_dim": 13824, "num_layers": 40},
}
# text_encoder/config.json: google/umt5-xxl's encoder
UMT5_XXL = {"vocab_size": 256384, "d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24, "num_heads": 64}
# vae/config.json (AutoencoderKLWan)
WAN_VAE = {
    "base_dim": 96,
    "z_dim": 16,
    "dim_mult": [1, 2, 4, 4],
    "num_res_blocks": 2,
    "temperal_downsample": [False, True, True],
    "scale_factor_temporal": 4,
    "scale_factor_spatial": 8,
}
# Parameters per component (transformer 1.42B / 14.29B; UMT5-XXL encoder 5.68B, its 256,384 x 4096 embedding
# included; the VAE 127M)
WAN_PARAMS = {
    "1.3B": {"transformer": 1_418_996_800, "text_encoder": 5_680_910_336, "vae": 126_892_531},
    "14B": {"transformer": 14_288_491_584, "text_encoder": 5_680_910_336, "vae": 126_892_531},
}


@pytest.mark.parametrize("variant", ["1.3B", "14B"])
def test_the_wan_stand_ins_have_the_published_configs_and_sizes(variant):
    from verl_omni.models.standins import param_counts
    from verl_omni.pipelines.standins import build_components

    c = build_components("wan", device="meta", variant=variant)
    transformer = c["transformer"].config
    for key, value in {**WAN_TRANSFORMER, **WAN_SIZES[variant]}.items():
        got = list(transformer[key]) if isinstance(value, list) else transformer[key]
        assert got == value, f"transformer.{key}: {got!r} != {value!r}"
    assert type(c["text_encoder"]).__name__ == "UMT5EncoderModel"
    for key, value in UMT5_XXL.items():
        assert getattr(c["text_encoder"].config, key) == value, key
    for key, value in WAN_VAE.items():
        got = list(c["vae"].config[key]) if isinstance(value, list) else c["vae"].config[key]
        assert got == value, f"vae.{key}: {got!r} != {value!r}"
    scheduler = c["scheduler"]
    assert type(scheduler).__name__ == "UniPCMultistepScheduler"
    assert scheduler.config.use_flow_sigmas and scheduler.config.flow_shift == 3.0
    assert len(c["tokenizer"]) == 256300  # 256,000 pieces + 300 sentinels
    counts = param_counts(c)
    for name, published in WAN_PARAMS[variant].items():
        assert counts[name] == pytest.approx(published, rel=1e-3), f"{variant} {name}: {counts[name]:,}"
    assert {p.dtype for p in c["transformer"].parameters()} == {torch.bfloat16}


def test_the_14b_skeleton_records_its_checkpoint_and_an_unknown_variant_is_named(tmp_path):
    from verl_omni.models.standins import read_standin_record
    from verl_omni.pipelines.registry import family_for_model_dir, get_family
    from verl_omni.pipelines.standins import build_components

    path = get_family("wan").build_standin(tmp_path / "wan14b", layers=1, device="meta", variant="14B")
    record = read_standin_record(path)
    assert record["checkpoint"] == "Wan-AI/Wan2.1-T2V-14B-Diffusers"
    assert (record["layers"], record["published_layers"], record["weights"]) == (1, 40, False)
    assert family_for_model_dir(path) == "wan"
    with pytest.raises(ValueError, match=r"variant='7B' is not one of \['1.3B', '14B', 'TI2V-5B', 'T2V-A14B'\]"):
        build_components("wan", device="meta", variant="7B")
    with pytest.raises(ValueError, match="has one published checkpoint"):
        build_components("flux", device="meta", variant="14B")


@pytest.mark.e2e
def fit_two_steps(cfg) -> list[dict]:
    """Two steps of the real trainer on ``cfg``: step 1's ratios within 1e-4 of 1, every step's loss finite and its
    gradient nonzero. Returns the steps' metrics."""
    from verl_omni.trainer.ray_trainer import FlowGRPOTrainer

    trainer = FlowGRPOTrainer(cfg).init()
    try:
        history = trainer.fit()
    finally:
        trainer.shutdown()
    assert len(history) == 2
    assert history[0]["actor/ratio_min"] == pytest.approx(1.0, abs=1e-4)
    assert history[0]["actor/ratio_max"] == pytest.approx(1.0, abs=1e-4)
    for metrics in history:
        assert np.isfinite(metrics["actor/policy_loss"]) and metrics["actor/grad_norm"] > 0
    return history


def test_the_cpu_demo_trains_tiny_wan_two_steps_and_writes_mp4_samples(ray_session, ocr_data_files, tmp_path):
    """Two FlowGRPO steps of the tiny Wan through the real trainer (hybrid engine, diffusers engine, the streamed
    temporal-consistency reward): step-1 ratios are 1, every step trains, and each step's samples are MP4 clips."""
    import glob
    import os

    import av
    from helpers import trainer_config

    from verl_omni.core.video_io import read_video

    cfg = trainer_config(
        ocr_data_files,
        "tiny:wan",
        tmp_path,
        **{
            "actor_rollout_ref.model.wan.num_frames": FRAMES,
            "actor_rollout_ref.model.wan.fps": 8.0,
            "actor_rollout_ref.rollout.pipeline.height": SIDE,
            "actor_rollout_ref.rollout.pipeline.width": SIDE,
            "actor_rollout_ref.rollout.pipeline.true_cfg_scale": 5.0,
            "actor_rollout_ref.rollout.pipeline.negative_prompt": NEGATIVE,
            "reward.rewards": [{"name": "temporal_consistency", "weight": 1.0}],
            "trainer.total_training_steps": 2,
            "trainer.sample_images_per_step": 2,
        },
    )
    history = fit_two_steps(cfg)
    for metrics in history:
        assert 0.0 <= metrics["reward/temporal_consistency/mean"] <= 1.0
    clips = sorted(glob.glob(os.path.join(str(tmp_path), "**", "train_step_*", "*.mp4"), recursive=True))
    assert len(clips) == 4, clips  # 2 per step
    assert read_video(clips[0]).shape == (FRAMES, SIDE, SIDE, 3)
    with av.open(clips[0]) as container:  # written at the family's fps (actor_rollout_ref.model.wan.fps)
        assert float(container.streams.video[0].average_rate) == pytest.approx(8.0)


def test_full_fine_tuning_plans_the_video_tokens_of_the_clip(tiny_wan_dir):
    """The start-up memory plan of full fine-tuning reads Wan's (t, h, w) patch and counts the clip's latent frames:
    5 frames are 2 latent frames at the VAE's 4x, so the media tokens double from an image's."""
    from verl_omni.workers.full_weights import media_tokens, plan_for_model_dir

    kw = dict(dtype_bytes=4, rows=4, text_tokens=32, height=SIDE, width=SIDE, vae_scale_factor=8)
    assert media_tokens(tiny_wan_dir, [1, 2, 2], SIDE, SIDE, 8, num_frames=1) == 4  # 2 x 2 tokens per frame
    assert media_tokens(tiny_wan_dir, [1, 2, 2], SIDE, SIDE, 8, num_frames=FRAMES) == 8
    assert media_tokens(tiny_wan_dir, [1, 2, 2], SIDE, SIDE, 8, num_frames=81) == 21 * 4
    params, frozen, one_frame = plan_for_model_dir(tiny_wan_dir, 1, False, **kw)
    _, _, clip = plan_for_model_dir(tiny_wan_dir, 1, False, **kw, num_frames=81)
    assert params == sum(p.numel() for p in WanPipeline.from_pretrained(tiny_wan_dir).transformer.parameters())
    assert frozen > 0 and clip > one_frame


def test_gradient_checkpointing_of_the_first_blocks_finds_wans_blocks(wan_pipe):
    """Wan's transformer names its block list ``blocks``: the first-k checkpointing finds them, and the gradient with
    one block recomputed is the gradient without checkpointing."""
    from verl_omni.models.checkpointing import BlockCheckpointing, transformer_blocks

    transformer = wan_pipe.transformer
    assert transformer_blocks(transformer) == list(transformer.blocks) and len(transformer.blocks) == 2
    out = wan_pipe.rl_generate(PROMPT, SEEDS[:1], _params(num_inference_steps=2, sde_window_size=0, window_start=None))
    cond = Conditioning.from_fields(out)

    def latent_grad() -> torch.Tensor:
        x = out.latents[:, 1].clone().requires_grad_(True)
        with torch.enable_grad():
            wan_pipe.predict_velocity(x, out.timesteps[1], cond, 5.0, SIDE, SIDE).square().sum().backward()
        return x.grad

    plain = latent_grad()
    try:
        reads = []  # the kept block's forward reads the allocator around it: proof the hook ran
        BlockCheckpointing(transformer, recomputed=1, allocated=lambda: reads.append(1) or 0)
        checkpointed = latent_grad()
        assert len(reads) == 2
    finally:
        transformer.disable_gradient_checkpointing()
    torch.testing.assert_close(checkpointed, plain, rtol=1e-5, atol=1e-6)


def test_the_tiny_wan_is_a_wan_pipeline_directory_at_the_real_compression_factors(wan_pipe, tiny_wan_dir):
    import json
    import os

    from verl_omni.pipelines.loading import vae_scale_factor_of
    from verl_omni.pipelines.registry import family_for_model_dir
    from verl_omni.pipelines.wan.published import SCHEDULER

    with open(os.path.join(tiny_wan_dir, "model_index.json")) as f:
        assert json.load(f)["_class_name"] == "WanPipeline"
    assert family_for_model_dir(tiny_wan_dir) == "wan"
    assert (wan_pipe.vae_scale_factor_temporal, wan_pipe.vae_scale_factor_spatial) == (4, 8)
    assert vae_scale_factor_of(tiny_wan_dir) == 8  # what request validation checks the sides against
    assert wan_pipe.scheduler.config.shift == SCHEDULER["flow_shift"]  # the published static shift
    assert wan_pipe.transformer.config.in_channels == wan_pipe.vae.config.z_dim
    assert wan_pipe.transformer.config.text_dim == wan_pipe.text_encoder.config.d_model
    assert wan_pipe.text_encoder.get_input_embeddings().num_embeddings >= len(wan_pipe.tokenizer)


def test_the_evaluation_command_scores_and_saves_wan_clips(tiny_wan_dir, tmp_path):
    """verl-omni-eval on a video family: each prompt's clips are scored by a video reward, saved as MP4 at the
    family's fps (``--family-option``), and the grid shows their first frames."""
    import os

    import av

    from verl_omni.core.video_io import read_video
    from verl_omni.eval.protocol import EvalProtocol
    from verl_omni.eval.runner import EvalJob, run_evaluation

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat walking\na blue car driving\n")
    protocol = EvalProtocol(num_inference_steps=2, guidance_scale=5.0, height=SIDE, width=SIDE, images_per_prompt=2)
    job = EvalJob(
        tiny_wan_dir,
        str(prompts),
        str(tmp_path / "out"),
        protocol,
        [{"name": "temporal_consistency"}],
        family_options={"num_frames": FRAMES, "fps": 8},
    )
    report = run_evaluation(job)
    rows = report["per_prompt"]
    assert len(rows) == 2 and all(len(r["images"]) == 2 and r["images"][0].endswith(".mp4") for r in rows)
    assert all(0.0 <= s <= 1.0 for r in rows for s in r["scores"]["temporal_consistency"])
    clip = os.path.join(tmp_path, "out", "images", rows[0]["images"][0])
    assert read_video(clip).shape == (FRAMES, SIDE, SIDE, 3)
    with av.open(clip) as container:
        assert float(container.streams.video[0].average_rate) == pytest.approx(8.0)
    assert os.listdir(os.path.join(tmp_path, "out", "grids"))
