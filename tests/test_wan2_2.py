"""Wan2.2 through the ``wan`` family, on tiny random models. TI2V-5B's text-to-video (``tiny:wan2_2_ti2v``: the Wan2.2
VAE at 16x spatial, ``expand_timesteps``) and the two-expert T2V-A14B (``tiny:wan2_2_t2v``: ``transformer`` above
``boundary_ratio``, ``transformer_2`` below, ``guidance_scale_2``). What they share with Wan2.1 (video rollouts, batch
invariance, equality with the stock diffusers ``WanPipeline`` at noise level 0, A14B's ``guidance_scale_2`` included,
the log-prob recomputation, the actor's step-1 ratio and a LoRA update) runs over the tiny variants in test_wan.py;
here: the per-token timesteps, the expert routing, the log-prob recomputation by the expert the rollout ran, the A14B
actor's LoRA on both experts, its adapter's export (a diffusers file per expert, a merged pipeline) and its low-noise
expert under the checkpointing plan; the real-size stand-ins' published figures."""

import numpy as np
import pytest
import torch
from diffusers import WanPipeline
from helpers import model_config, rollout_config
from test_vllm_omni_engine_adapter import fake_vllm_omni  # noqa: F401  (the test double of vllm-omni, a fixture)
from test_wan import A14B, FRAMES, NEGATIVE, PROMPT, SEEDS, TI2V, fit_two_steps, records_batch

from verl_omni.config.actor import ActorConfig, OptimConfig
from verl_omni.config.sampling import DiffusionSamplingParams
from verl_omni.core.conditioning import Conditioning
from verl_omni.pipelines.wan.options import WanOptions
from verl_omni.schedulers.flow_match_sde import compute_log_prob, reference_sigma_max

SIDE = TI2V.side  # 4 x 4 latents at the Wan2.2 VAE's 16x, 2 x 2 tokens per frame


def test_the_tiny_ti2v_is_a_wan_pipeline_with_per_token_timesteps_and_the_16x_vae(ti2v_pipe, tiny_wan2_2_ti2v_dir):
    from verl_omni.pipelines.loading import vae_scale_factor_of
    from verl_omni.pipelines.registry import family_for_model_dir
    from verl_omni.pipelines.standins import published_config

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


# ------------------------------------------------------------------------------------------- T2V-A14B: two experts
A14B_SIDE = A14B.side  # 4 x 4 latents at Wan2.1's 8x VAE


def _a14b_params(**kw):
    return A14B.params(**({"window_start": 0} | kw))


def test_the_a14b_schedule_runs_both_experts_and_a_row_runs_the_expert_of_its_timestep(a14b_pipe):
    """The tiny A14B's 4 steps straddle the boundary (875: one high-noise step, three low); a call of rows on both
    sides of it equals each row alone, and each row's velocity is its own expert's."""
    out = a14b_pipe.rl_generate(PROMPT, SEEDS[:2], _a14b_params(sde_window_size=0, window_start=None))
    boundary = a14b_pipe.boundary_timestep
    assert boundary == 875.0 and (out.timesteps >= boundary).any() and (out.timesteps < boundary).any()
    high, low = out.timesteps[0], out.timesteps[-2]
    assert high >= boundary > low
    latents = torch.cat([out.latents[:1, 0], out.latents[1:, -2]])  # row 0 at the high step, row 1 at a low one
    timesteps = torch.stack([high, low])
    text = Conditioning.from_fields(out)
    mixed = a14b_pipe.predict_velocity(latents, timesteps, text, 1.0, A14B_SIDE, A14B_SIDE)
    embeds = out.prompt_embeds
    by_high = a14b_pipe.transformer(latents[:1], high.reshape(1), embeds[:1], return_dict=False)[0]
    by_low = a14b_pipe.transformer_2(latents[1:], low.reshape(1), embeds[1:], return_dict=False)[0]
    torch.testing.assert_close(mixed, torch.cat([by_high, by_low]), rtol=0, atol=1e-6)
    other = a14b_pipe.transformer(latents[1:], low.reshape(1), embeds[1:], return_dict=False)[0]
    assert (other - by_low).abs().max() > 1e-2  # the experts differ: the routing matters


def test_a14b_rollout_log_probs_equal_the_recomputation_and_batched_equals_single(a14b_pipe):
    """The window covers a high-noise and a low-noise step: each step's recomputation runs the rollout's expert."""
    a14b_pipe.apply_family_options(WanOptions(num_frames=FRAMES, guidance_scale_2=3.0))
    try:
        params = _a14b_params()
        out = a14b_pipe.rl_generate(PROMPT, SEEDS, params)
        window = torch.nonzero(out.window_mask).flatten().tolist()
        assert out.timesteps[window[0]] >= a14b_pipe.boundary_timestep > out.timesteps[window[-1]]
        sigma_max, max_err = reference_sigma_max(out.sigmas), 0.0
        for t in window:
            velocity = a14b_pipe.predict_velocity(
                out.latents[:, t], out.timesteps[t], Conditioning.from_fields(out), 5.0, A14B_SIDE, A14B_SIDE
            )
            recomputed = compute_log_prob(
                velocity,
                out.latents[:, t],
                out.latents[:, t + 1],
                out.sigmas[t],
                out.sigmas[t + 1],
                noise_level=params.noise_level,
                sde_type=params.sde_type,
                sigma_max=sigma_max,
            )
            max_err = max(max_err, (recomputed - out.log_probs[:, t]).abs().max().item())
        single = a14b_pipe.rl_generate(PROMPT, SEEDS[1:2], params)
    finally:
        a14b_pipe.apply_family_options(WanOptions(num_frames=FRAMES))
    assert max_err < 1e-5
    assert (single.latents[0] - out.latents[1]).abs().max() < 1e-4
    assert (single.log_probs[0] - out.log_probs[1]).abs().max() < 1e-4


def _a14b_actor_and_batch(tiny_wan2_2_t2v_dir, **model):
    """A LoRA actor on the tiny A14B (``guidance_scale_2`` 3.0) and a batch of 4 rollouts (2 prompts x 2) whose window
    covers step 0 (high noise) and step 1 (low noise)."""
    from verl_omni.workers.actor import DiffusionLoRAActor

    rollout = rollout_config(
        pipeline={"true_cfg_scale": 4.0, "negative_prompt": NEGATIVE, "max_sequence_length": 32,
                  "height": A14B_SIDE, "width": A14B_SIDE, "num_inference_steps": 4},
        algo={"noise_level": 0.7, "sde_window_size": 2},
    )  # fmt: skip
    actor = DiffusionLoRAActor(
        model_config(tiny_wan2_2_t2v_dir, pipeline="wan", wan={"num_frames": FRAMES, "guidance_scale_2": 3.0}, **model),
        ActorConfig(optim=OptimConfig(lr=1e-2), ppo_micro_batch_size_per_gpu=4),
        rollout,
        lora_seed=3,
    )
    params = rollout.sampling_params().replace(window_start=0).validate()
    records = [actor.pipe.rl_generate(p, [3 + 2 * i, 4 + 2 * i], params) for i, p in enumerate([PROMPT, "a sign"])]
    return actor, records_batch(records)


A14B_ADVANTAGES = torch.tensor([1.0, -1.0, 0.5, -0.5])


def test_the_a14b_actors_step_one_ratio_is_one_and_its_lora_trains_both_experts(tiny_wan2_2_t2v_dir):
    """LoRA on both experts (tensors named by expert); the actor recomputes each window step with the rollout's
    expert and ``guidance_scale_2`` (ratio 1 at step 1), and one update moves both experts' adapters."""
    actor, data = _a14b_actor_and_batch(tiny_wan2_2_t2v_dir)
    before = actor.lora_state_dict()
    assert {k.split(".", 1)[0] for k in before} == {"transformer", "transformer_2"}
    first = actor.update(data, A14B_ADVANTAGES)
    print(f"[Wan2.2-A14B] step-1 ratios [{first['actor/ratio_min']:.7f}, {first['actor/ratio_max']:.7f}]")
    assert first["actor/ratio_min"] == pytest.approx(1.0, abs=1e-4)
    assert first["actor/ratio_max"] == pytest.approx(1.0, abs=1e-4)
    assert first["actor/grad_norm"] > 0 and np.isfinite(first["actor/policy_loss"])
    after = actor.lora_state_dict()
    for expert in ("transformer", "transformer_2"):
        assert any(not torch.equal(before[k], v) for k, v in after.items() if k.startswith(expert + ".")), expert


def test_the_low_noise_expert_recomputes_the_blocks_the_memory_plan_chooses(tiny_wan2_2_t2v_dir, monkeypatch):
    """``gradient_checkpointing_blocks=auto`` (its plan fed by a host-side allocator, as on a GPU): update 1 keeps the
    last block of both experts, and with room for every block update 2 recomputes none in either; the low-noise
    expert's kept blocks are measured like the high-noise one's; the adapter after both updates is the one every
    block recomputing gives."""
    from collections import Counter

    from test_activation_memory import LiveActivations

    import verl_omni.models.checkpointing as checkpointing
    from verl_omni.models.checkpointing import transformer_blocks
    from verl_omni.workers.activation_memory import AutoCheckpointing

    recomputations = Counter()  # checkpointed block calls by expert
    real = checkpointing.checkpoint

    def counted(fn, *args, **kw):
        recomputations[owner[id(fn.__self__)]] += 1
        return real(fn, *args, **kw)

    monkeypatch.setattr(checkpointing, "checkpoint", counted)
    results = {}
    for planned in (True, False):
        actor, data = _a14b_actor_and_batch(tiny_wan2_2_t2v_dir, enable_gradient_checkpointing=True)
        owner = {id(b): name for name, e in actor.pipe.denoisers.items() for b in transformer_blocks(e)}
        blocks = len(transformer_blocks(actor.pipe.transformer_2))
        if not planned:  # auto off a GPU: every block of both experts recomputes
            for _ in range(2):
                actor.update(data, A14B_ADVANTAGES)
            results[planned] = actor.lora_state_dict()
            continue
        memory = LiveActivations()  # a card with room for every block
        actor.checkpointing = actor._block_checkpointing(None, memory.allocated)
        actor.memory_plan = AutoCheckpointing(actor.checkpointing, memory)
        counts = []
        with memory.hooks():
            for _ in range(2):
                recomputations.clear()
                metrics = actor.update(data, A14B_ADVANTAGES)
                counts.append((metrics["actor/recomputed_blocks"], dict(recomputations)))
        assert blocks >= 2 and actor.checkpointing.kept_bytes[-1] > 0
        (first, calls_1), (second, calls_2) = counts
        assert first == blocks - 1 and second == 0, counts
        # update 1: the window's low-noise step checkpoints the first blocks - 1 of transformer_2 (once per
        # micro-batch's forward), exactly as many as the high-noise step does of transformer; update 2: none
        assert calls_1.get("transformer_2", 0) == calls_1.get("transformer", 0) > 0, calls_1
        assert calls_2 == {}, calls_2
        results[planned] = actor.lora_state_dict()
    for name, value in results[True].items():
        torch.testing.assert_close(value, results[False][name], rtol=0, atol=1e-6, msg=name)


@pytest.fixture(scope="module")
def a14b_trained(tiny_wan2_2_t2v_dir, tmp_path_factory):
    """A checkpoint of a two-expert adapter (B not zero, as after training; alpha != rank, so the files must carry the
    scaling) and the pipeline serving it."""
    from verl_omni.models.lora import LoRASpec, get_lora_state_dict, init_lora_weights, lora_parameters
    from verl_omni.pipelines.loading import load_rl_pipeline
    from verl_omni.trainer.checkpoint import save_checkpoint

    rank, alpha = 4, 12.0
    lora = LoRASpec(rank, alpha, ("to_q", "to_k", "to_v", "to_out.0"))
    pipe = load_rl_pipeline(tiny_wan2_2_t2v_dir, "wan", "float32", lora, family_options=WanOptions(num_frames=FRAMES))
    init_lora_weights(pipe.lora_module, seed=3)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in lora_parameters(pipe.lora_module):
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    root = tmp_path_factory.mktemp("a14b_run")
    meta = {"lora": {"rank": rank, "alpha": alpha, "target_modules": list(lora.target_modules)}}
    optimizer = torch.optim.AdamW(lora_parameters(pipe.lora_module))
    save_checkpoint(str(root), 2, get_lora_state_dict(pipe.lora_module), optimizer, meta)
    return root, pipe


def _expert_outputs(pipe) -> list[torch.Tensor]:
    """Each expert's velocity on the same latents, timestep and text (the high-noise expert's input at 900, the
    low-noise expert's at 300)."""
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, pipe.transformer.config.in_channels, 2, 4, 4, generator=g)
    text = torch.randn(2, 6, pipe.transformer.config.text_dim, generator=g)
    outs = []
    with torch.no_grad():
        for expert, t in ((pipe.transformer, 900.0), (pipe.transformer_2, 300.0)):
            kw = dict(hidden_states=latents, timestep=torch.full((2,), t), encoder_hidden_states=text)
            outs.append(expert(**kw, return_dict=False)[0])
    return outs


def test_a_two_expert_adapter_exports_one_diffusers_file_per_expert_and_a_merged_pipeline(
    a14b_trained, tiny_wan2_2_t2v_dir, tmp_path
):
    """``verl-omni-export`` of an A14B adapter: diffusers' ``WanPipeline.load_lora_weights`` loads the high-noise file
    into ``transformer`` and the low-noise one with ``load_into_transformer_2=True``; the merged directory loads with
    ``from_pretrained``; both give each expert's outputs of our adapted pipeline."""
    import json

    from verl_omni.export import LORA_WEIGHT_NAME, LORA_WEIGHT_NAME_2
    from verl_omni.export.__main__ import main as export_main

    root, ours_pipe = a14b_trained
    ours = _expert_outputs(ours_pipe)
    out = tmp_path / "lora"
    assert export_main(["--checkpoint", str(root), "--base", tiny_wan2_2_t2v_dir, "--out", str(out)]) == 0
    pipe = WanPipeline.from_pretrained(tiny_wan2_2_t2v_dir)
    base = _expert_outputs(pipe)
    pipe.load_lora_weights(str(out), weight_name=LORA_WEIGHT_NAME, adapter_name="rl")
    pipe.load_lora_weights(str(out), weight_name=LORA_WEIGHT_NAME_2, adapter_name="rl", load_into_transformer_2=True)
    loaded = _expert_outputs(pipe)
    for expert, (b, o, got) in enumerate(zip(base, ours, loaded, strict=True)):
        assert (b - o).abs().max() > 1e-3, expert  # the adapter changes each expert's output ...
        torch.testing.assert_close(got, o, rtol=1e-5, atol=1e-5)  # ... and each file carries that change
    info = json.loads((out / "verl_omni_export.json").read_text())
    assert (info["step"], info["rank"], info["alpha"], info["merged"]) == (2, 4, 12.0, False)

    merged_dir = tmp_path / "merged"
    export_main(["--checkpoint", str(root), "--base", tiny_wan2_2_t2v_dir, "--out", str(merged_dir), "--merge"])
    merged = WanPipeline.from_pretrained(str(merged_dir))
    for expert in (merged.transformer, merged.transformer_2):
        assert not any("lora" in name for name, _ in expert.named_parameters())
    for got, o in zip(_expert_outputs(merged), ours, strict=True):
        torch.testing.assert_close(got, o, rtol=1e-4, atol=1e-4)


def test_a_two_expert_adapter_on_a_one_transformer_base_is_refused_naming_why(tiny_wan_dir, tmp_path):
    from verl_omni.export import TrainedAdapter, export_lora

    tensors = {f"{e}.blocks.0.attn1.to_q.lora_A.weight": torch.zeros(4, 32) for e in ("transformer", "transformer_2")}
    adapter = TrainedAdapter("ckpt", 1, "lora", tensors, 4, 4.0, ["to_q"], "sum")
    with pytest.raises(ValueError, match=r"ckpt holds a two-expert adapter but --base .* has no transformer_2"):
        export_lora(adapter, tiny_wan_dir, str(tmp_path))
    adapter.tensors = tensors | {"other.blocks.0.attn1.to_q.lora_A.weight": torch.zeros(4, 32)}
    with pytest.raises(ValueError, match=r"tensor 'other.blocks.0.attn1.to_q.lora_A.weight' names neither expert"):
        export_lora(adapter, tiny_wan_dir, str(tmp_path))


def test_an_engines_attention_kernel_serves_both_experts(tiny_wan2_2_t2v_dir):
    """``use_attention_function`` installs the engine's processor in both experts: every attention module of each."""
    from torch.nn.functional import scaled_dot_product_attention

    from verl_omni.pipelines.loading import load_rl_pipeline
    from verl_omni.pipelines.wan.attention import WanEngineAttnProcessor

    pipe = load_rl_pipeline(tiny_wan2_2_t2v_dir, "wan", "float32", family_options=WanOptions(num_frames=FRAMES))
    modules = [2 * expert.config.num_layers for expert in pipe.experts]  # attn1 and attn2 per block
    assert pipe.use_attention_function(scaled_dot_product_attention) == sum(modules) and len(modules) == 2
    for expert in pipe.experts:
        assert all(isinstance(p, WanEngineAttnProcessor) for p in expert.attn_processors.values())


@pytest.mark.usefixtures("fake_vllm_omni")
def test_both_engines_serve_the_a14b_adapter_on_both_experts(tiny_wan2_2_t2v_dir):
    """The diffusers engine and vllm-omni's worker (its test double) take both experts' LoRA tensors (named by
    expert), report the same checksum, and roll out the same adapted clips."""
    from test_vllm_omni_engine_adapter import make_engine, run

    from verl_omni.core.checksum import tensors_checksum
    from verl_omni.models.lora import get_lora_state_dict
    from verl_omni.rollout.engines import get_engine_class

    lora = {"lora_rank": 4, "lora_alpha": 4.0, "pipeline": "wan", "wan": {"num_frames": FRAMES}}
    served = make_engine(tiny_wan2_2_t2v_dir, lora=lora)
    plain = get_engine_class("diffusers")(model_config(tiny_wan2_2_t2v_dir, **lora), rollout_config(dtype="float32"))
    params = _a14b_params(guidance_scale=4.0)
    base = run(plain.generate(PROMPT, SEEDS[:2], params))
    gen = torch.Generator().manual_seed(0)
    names = get_lora_state_dict(plain.pipe.lora_module)
    tensors = {k: torch.randn(v.shape, generator=gen) * 0.1 for k, v in names.items()}
    assert {k.split(".", 1)[0] for k in tensors} == {"transformer", "transformer_2"}
    assert run(plain.update_lora(tensors)) == run(served.update_lora(tensors)) == tensors_checksum(tensors)
    adapted, adapted_served = (run(e.generate(PROMPT, SEEDS[:2], params)) for e in (plain, served))
    assert (adapted.latents[:, -1] - base.latents[:, -1]).abs().max() > 1e-3  # the adapter changed the clips
    torch.testing.assert_close(adapted_served.latents, adapted.latents, rtol=0, atol=1e-5)


@pytest.mark.e2e
@pytest.mark.parametrize("tiny, side, guidance_scale_2", [("wan2_2_ti2v", SIDE, None), ("wan2_2_t2v", A14B_SIDE, 3.0)])
def test_the_trainer_trains_the_tiny_wan2_2_models_two_steps(
    ray_session, ocr_data_files, tmp_path, tiny, side, guidance_scale_2
):
    """Two FlowGRPO steps of each tiny Wan2.2 model through the real trainer (hybrid engine, diffusers engine): the
    rollout engine serves the actor's adapter (A14B: on both experts; step-1 ratios 1), and every step trains."""
    from helpers import trainer_config

    cfg = trainer_config(
        ocr_data_files,
        f"tiny:{tiny}",
        tmp_path,
        **{
            "actor_rollout_ref.model.wan.num_frames": FRAMES,
            "actor_rollout_ref.model.wan.guidance_scale_2": guidance_scale_2,
            "actor_rollout_ref.rollout.pipeline.height": side,
            "actor_rollout_ref.rollout.pipeline.width": side,
            "actor_rollout_ref.rollout.pipeline.true_cfg_scale": 4.0,
            "actor_rollout_ref.rollout.pipeline.negative_prompt": NEGATIVE,
            "reward.rewards": [{"name": "temporal_consistency", "weight": 1.0}],
            "trainer.total_training_steps": 2,
        },
    )
    fit_two_steps(cfg)


def test_the_two_expert_options_are_checked_naming_their_key(a14b_pipe, ti2v_pipe, tiny_wan2_2_t2v_dir):
    from verl_omni.workers.fsdp_actor import FSDPActorRank
    from verl_omni.workers.full_actor import DiffusionFullActor

    with pytest.raises(ValueError, match=r"actor_rollout_ref.model.wan.guidance_scale_2=0.5 must be a number >= 1"):
        WanOptions(guidance_scale_2=0.5)
    with pytest.raises(ValueError, match=r"wan.guidance_scale_2=3.0 is the low-noise expert's .* \(no transformer_2\)"):
        ti2v_pipe.apply_family_options(WanOptions(num_frames=FRAMES, guidance_scale_2=3.0))
    a14b_pipe.register_to_config(boundary_ratio=None)  # transformer_2 without its boundary
    try:
        with pytest.raises(ValueError, match="only one of transformer_2 / boundary_ratio"):
            a14b_pipe.apply_family_options(WanOptions(num_frames=FRAMES))
    finally:
        a14b_pipe.register_to_config(boundary_ratio=0.875)
    with pytest.raises(ValueError, match=r"FSDP\) LoRA actor shards one transformer; .* 2 experts \(transformer, "):
        FSDPActorRank(
            model_config(tiny_wan2_2_t2v_dir, pipeline="wan"), ActorConfig(), rollout_config(), 0, 2, master_port=1
        )
    with pytest.raises(ValueError, match=r"lora_rank=0 trains one transformer's .* 2 experts \(transformer, "):
        DiffusionFullActor(
            model_config(tiny_wan2_2_t2v_dir, pipeline="wan", lora_rank=0, wan={"num_frames": FRAMES}),
            ActorConfig(optim=OptimConfig(lr=1e-5)),
            rollout_config(),
        )


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
    from verl_omni.models.standins import param_counts, read_standin_record
    from verl_omni.pipelines.registry import family_for_model_dir, get_family
    from verl_omni.pipelines.standins import build_components

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
    from verl_omni.models.standins import param_counts
    from verl_omni.pipelines.standins import build_components

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
    from verl_omni.models.standins import read_standin_record
    from verl_omni.pipelines.loading import denoiser_components
    from verl_omni.pipelines.registry import family_for_model_dir, get_family

    path = get_family("wan").build_standin(tmp_path / "a14b", layers=1, device="meta", variant="T2V-A14B")
    assert read_standin_record(path)["checkpoint"] == "Wan-AI/Wan2.2-T2V-A14B-Diffusers"
    assert family_for_model_dir(path) == "wan" and denoiser_components(path) == ["transformer", "transformer_2"]
    assert WanPipeline.load_config(path)["boundary_ratio"] == 0.875
    with pytest.raises(ValueError, match=r"variant='7B' is not one of \['1.3B', '14B', 'TI2V-5B', 'T2V-A14B'\]"):
        build_components("wan", device="meta", variant="7B")
