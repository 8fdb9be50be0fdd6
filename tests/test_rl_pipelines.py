"""The RL pipelines on tiny random Qwen-Image and SD3: log-prob consistency with the trainer's recomputation,
batch invariance, the SDE window, equality with the stock diffusers pipelines at noise_level 0, guidance, what the
scheduler rejects, aborts and prompt truncation. (Request validation is the server's: tests/test_request.py; CFG
batching: tests/test_cfg_batching.py.)"""

import logging
import types

import numpy as np
import pytest
import torch
from diffusers import QwenImagePipeline, StableDiffusion3Pipeline

from verl_omni.config.sampling import DiffusionSamplingParams
from verl_omni.core.conditioning import Conditioning
from verl_omni.pipelines.common import RequestAborted
from verl_omni.pipelines.qwen_image.pipeline import STOCK_TEMPLATE_START_IDX
from verl_omni.schedulers.flow_match_sde import compute_log_prob, reference_sigma_max

PROMPT = "a red cat"
SEEDS = [11, 22, 33, 44]


@pytest.fixture(params=["qwen_image", "sd3"])
def pipe(request):
    return request.getfixturevalue(f"{request.param}_rl_pipe")


def _params(**kw):
    base = dict(num_inference_steps=4, height=64, width=64, noise_level=0.7, sde_window_size=2, window_start=1)
    base.update(kw)
    return DiffusionSamplingParams(**base)


def _cond(out, rows=slice(None)):
    return Conditioning.from_fields(out).select(rows)


@pytest.mark.parametrize("sde_type,guidance_scale", [("sde", 1.0), ("cps", 1.0), ("sde", 3.0)])
def test_rollout_log_prob_equals_trainer_recomputation(pipe, sde_type, guidance_scale):
    params = _params(sde_type=sde_type, guidance_scale=guidance_scale)
    out = pipe.rl_generate(PROMPT, SEEDS[:2], params)
    sigma_max = reference_sigma_max(out.sigmas)
    max_err = 0.0
    for t in torch.nonzero(out.window_mask).flatten().tolist():
        for i in range(out.batch_size):  # per-sample micro-batches, as the trainer may regroup samples
            rows = slice(i, i + 1)
            with torch.enable_grad():  # the trainer's path: gradients allowed
                velocity = pipe.predict_velocity(
                    out.latents[rows, t],
                    out.timesteps[t],
                    _cond(out, rows),
                    guidance_scale,
                    params.height,
                    params.width,
                )
            assert velocity.requires_grad
            recomputed = compute_log_prob(
                velocity.detach(),
                out.latents[rows, t],
                out.latents[rows, t + 1],
                out.sigmas[t],
                out.sigmas[t + 1],
                noise_level=params.noise_level,
                sde_type=sde_type,
                sigma_max=sigma_max,
            )
            max_err = max(max_err, (recomputed - out.log_probs[rows, t]).abs().max().item())
    print(
        f"[{type(pipe).__name__} {sde_type} cfg={guidance_scale}] rollout vs recomputed log-prob "
        f"max abs err {max_err:.2e}"
    )
    assert max_err < 1e-5


def test_batched_call_equals_single_calls_with_the_same_seeds(pipe):
    params = _params(guidance_scale=2.0)
    batched = pipe.rl_generate(PROMPT, SEEDS, params)
    singles = [pipe.rl_generate(PROMPT, [s], params) for s in SEEDS]
    pixel = max((batched.images[i].int() - o.images[0].int()).abs().max().item() for i, o in enumerate(singles))
    latent = max((batched.latents[i] - o.latents[0]).abs().max().item() for i, o in enumerate(singles))
    logp = max((batched.log_probs[i] - o.log_probs[0]).abs().max().item() for i, o in enumerate(singles))
    print(
        f"[{type(pipe).__name__}] B=4 vs 4xB=1: max pixel diff {pixel}, max latent diff {latent:.2e}, "
        f"max log-prob diff {logp:.2e}"
    )
    assert pixel <= 1 and latent < 1e-4
    # Different seeds really give different samples (so the check above is not vacuous).
    assert (batched.latents[0, 0] - batched.latents[1, 0]).abs().max() > 0.1
    assert batched.seeds == SEEDS


def _flash_params(**kw):
    """MixGRPO-Flash sampling: DPM-Solver++ on a compressed schedule after the window (8 steps: 3 tail steps)."""
    base = dict(
        num_inference_steps=8,
        sde_window_size=2,
        window_start=1,
        ode_solver="dpmsolver++",
        ode_compress_ratio=0.6,
        trajectory_window_only=True,
    )
    return _params(**(base | kw)).validate()


def test_batched_call_equals_single_calls_with_the_dpm_solver_tail(pipe):
    params = _flash_params(guidance_scale=2.0)
    batched = pipe.rl_generate(PROMPT, SEEDS, params)
    singles = [pipe.rl_generate(PROMPT, [s], params) for s in SEEDS]
    pixel = max((batched.images[i].int() - o.images[0].int()).abs().max().item() for i, o in enumerate(singles))
    latent = max((batched.latents[i] - o.latents[0]).abs().max().item() for i, o in enumerate(singles))
    logp = max((batched.log_probs[i] - o.log_probs[0]).abs().max().item() for i, o in enumerate(singles))
    assert pixel <= 1 and latent < 1e-4 and logp < 1e-4
    assert (batched.latents[0, 0] - batched.latents[1, 0]).abs().max() > 0.1


@pytest.fixture(params=["qwen_image", "sd3", "flux"])
def family_pipe(request):
    return request.getfixturevalue(f"{request.param}_rl_pipe")


# Prompts of different token counts (Qwen-Image's call of several is then padded and masked); rows 0 and 2 share a
# seed, so what tells them apart is their prompt.
ROW_PROMPTS = [PROMPT, PROMPT, "a dog", 'a shop sign that says "OPEN LATE" above a blue door']
ROW_SEEDS = [11, 22, 11, 44]


@pytest.mark.parametrize("guidance_scale", [1.0, 2.0])
def test_a_call_of_several_prompts_equals_one_call_per_prompt(family_pipe, guidance_scale):
    """``rl_generate_rows``: row i equals ``rl_generate(prompts[i], [seeds[i]])``. Within the bounds of the batched
    single-prompt call above (B=4 vs 4 x B=1): a batch of another composition changes only float rounding -- GEMMs
    over other row counts, and for Qwen-Image a masked softmax over padded text keys (mask 0: no weight) where a
    call of one prompt runs unmasked. Each prompt's text embeddings, and the one negative prompt's under CFG, are
    exactly the single call's (each prompt encoded alone)."""
    pipe = family_pipe
    params = _params(guidance_scale=guidance_scale, max_sequence_length=64)
    rows = pipe.rl_generate_rows(ROW_PROMPTS, ROW_SEEDS, params)
    singles = [pipe.rl_generate(p, [s], params) for p, s in zip(ROW_PROMPTS, ROW_SEEDS, strict=True)]
    pixel = max((rows.images[i].int() - o.images[0].int()).abs().max().item() for i, o in enumerate(singles))
    latent = max((rows.latents[i] - o.latents[0]).abs().max().item() for i, o in enumerate(singles))
    logp = max((rows.log_probs[i] - o.log_probs[0]).abs().max().item() for i, o in enumerate(singles))
    print(f"[{type(pipe).__name__} cfg={guidance_scale}] rows vs single calls: pixel {pixel}, latent {latent:.2e}, "
          f"log-prob {logp:.2e}")  # fmt: skip
    assert pixel <= 1 and latent < 1e-4 and logp < 1e-4 and rows.seeds == ROW_SEEDS
    assert (rows.latents[0, -1] - rows.latents[2, -1]).abs().max() > 1e-3  # same seed, another prompt
    for i, single in enumerate(singles):
        own = _cond(rows, slice(i, i + 1)).without_padding()
        assert torch.equal(own.prompt_embeds, single.prompt_embeds)
        assert (own.negative_prompt_embeds is None) == (guidance_scale == 1.0)
        if own.negative_prompt_embeds is not None:
            assert torch.equal(own.negative_prompt_embeds, single.negative_prompt_embeds)
    masked = rows.prompt_embeds_mask is not None and not bool(rows.prompt_embeds_mask.all())
    assert masked == ("Qwen" in type(pipe).__name__)  # SD3 / FLUX: T5 padded to a fixed length, no mask


def test_a_call_of_one_prompt_for_every_row_is_rl_generate(qwen_image_rl_pipe):
    params = _params()
    rows = qwen_image_rl_pipe.rl_generate_rows([PROMPT] * 2, SEEDS[:2], params)
    one = qwen_image_rl_pipe.rl_generate(PROMPT, SEEDS[:2], params)
    assert torch.equal(rows.images, one.images) and torch.equal(rows.latents, one.latents)
    with pytest.raises(ValueError, match="one prompt per seed, got 3 prompts and 2"):
        qwen_image_rl_pipe.rl_generate_rows([PROMPT] * 3, SEEDS[:2], params)


def test_conditionings_of_different_lengths_join_only_with_a_mask():
    short, long = torch.ones(1, 2, 4), torch.ones(2, 5, 4)
    joined = Conditioning.cat([Conditioning(short, torch.ones(1, 2, dtype=torch.long)), Conditioning(long)])
    assert joined.prompt_embeds.shape == (3, 5, 4) and joined.prompt_embeds[0, 2:].abs().sum() == 0
    assert joined.prompt_embeds_mask.tolist() == [[1, 1, 0, 0, 0]] + [[1] * 5] * 2
    with pytest.raises(ValueError, match=r"prompt_embeds of lengths \[2, 5\] cannot share one call without"):
        Conditioning.cat([Conditioning(short), Conditioning(long)])


def test_dpm_solver_tail_changes_only_what_follows_the_window(pipe):
    flash = pipe.rl_generate(PROMPT, SEEDS[:2], _flash_params())
    euler = pipe.rl_generate(PROMPT, SEEDS[:2], _flash_params(ode_solver="euler"))
    # The schedule, the window's latents and log-probs are the Euler sampler's: the actor trains the same transitions.
    assert torch.equal(flash.sigmas, euler.sigmas) and torch.equal(flash.latent_steps, euler.latent_steps)
    torch.testing.assert_close(flash.latents, euler.latents, rtol=0, atol=1e-6)
    torch.testing.assert_close(flash.log_probs, euler.log_probs, rtol=0, atol=1e-6)
    # The image comes from the solver's tail (fewer model calls, different numbers).
    assert (flash.images.int() - euler.images.int()).abs().max() > 0


def test_dpm_solver_without_a_window_that_ends_early_is_refused():
    with pytest.raises(ValueError, match="sde_window_size"):
        _flash_params(sde_window_size=0)
    with pytest.raises(ValueError, match="window_start"):
        _flash_params(window_start=6)
    with pytest.raises(ValueError, match="trajectory_window_only"):
        _flash_params(trajectory_window_only=False)
    with pytest.raises(ValueError, match="ode_solver"):
        _flash_params(ode_solver="heun")


def test_only_window_steps_are_stochastic(pipe):
    params = _params(num_inference_steps=5, sde_window_size=2, window_start=2)
    out = pipe.rl_generate(PROMPT, SEEDS[:2], params)
    assert out.window_mask.tolist() == [False, False, True, True, False]
    assert torch.all(out.log_probs[:, out.window_mask] != 0)
    assert torch.all(out.log_probs[:, ~out.window_mask] == 0)
    cond = _cond(out)
    for t in range(params.num_inference_steps):
        velocity = pipe.predict_velocity(out.latents[:, t], out.timesteps[t], cond, 1.0, params.height, params.width)
        euler = out.latents[:, t] + (out.sigmas[t + 1] - out.sigmas[t]) * velocity
        gap = (out.latents[:, t + 1] - euler).abs().max().item()
        if out.window_mask[t]:
            assert gap > 1e-2, f"step {t} is in the window but added no noise"
        else:
            assert gap < 1e-5, f"step {t} is outside the window but is not the Euler step ({gap:.2e})"


def test_window_start_moves_the_noise(pipe):
    a = pipe.rl_generate(PROMPT, [5], _params(sde_window_size=1, window_start=0))
    b = pipe.rl_generate(PROMPT, [5], _params(sde_window_size=1, window_start=2))
    assert a.window_mask.tolist() == [True, False, False, False]
    assert b.window_mask.tolist() == [False, False, True, False]
    assert torch.equal(a.latents[:, 0], b.latents[:, 0])  # same seed, same x_T
    assert not torch.allclose(a.latents[:, -1], b.latents[:, -1])


def _stock_qwen(pipe, x_t, params):
    stock = QwenImagePipeline(**pipe.components)
    stock.set_progress_bar_config(disable=True)
    # The trap: the stock class hard-codes 34 template tokens (right only for the real tokenizer).
    assert stock.prompt_template_encode_start_idx == STOCK_TEMPLATE_START_IDX != pipe.prompt_template_encode_start_idx
    stock.prompt_template_encode_start_idx = pipe.prompt_template_encode_start_idx
    kw = dict(
        prompt=[PROMPT] * x_t.shape[0],
        height=params.height,
        width=params.width,
        num_inference_steps=params.num_inference_steps,
        latents=x_t,
        max_sequence_length=params.max_sequence_length,
        true_cfg_scale=params.guidance_scale,
        negative_prompt=[""] * x_t.shape[0] if params.guidance_scale > 1 else None,
    )
    latents = stock(**kw, output_type="latent").images
    images = stock(**kw, output_type="np").images
    return latents, images


def _stock_sd3(pipe, x_t, params):
    stock = StableDiffusion3Pipeline(**pipe.components)
    stock.set_progress_bar_config(disable=True)
    kw = dict(
        prompt=[PROMPT] * x_t.shape[0],
        height=params.height,
        width=params.width,
        num_inference_steps=params.num_inference_steps,
        latents=x_t,
        max_sequence_length=params.max_sequence_length,
        guidance_scale=params.guidance_scale,
    )
    return stock(**kw, output_type="latent").images, stock(**kw, output_type="np").images


@pytest.mark.parametrize("guidance_scale", [1.0, 2.5])
def test_noise_level_zero_reproduces_the_stock_diffusers_pipeline(pipe, guidance_scale):
    params = _params(noise_level=0.0, sde_window_size=0, window_start=None, guidance_scale=guidance_scale)
    out = pipe.rl_generate(PROMPT, SEEDS[:2], params)
    assert not out.window_mask.any() and torch.all(out.log_probs == 0)
    stock = _stock_qwen if "Qwen" in type(pipe).__name__ else _stock_sd3
    latents, images = stock(pipe, out.latents[:, 0], params)
    latent_err = (out.latents[:, -1] - latents).abs().max().item()
    pixel_err = np.abs(out.images.numpy().astype(int) - (images * 255).round().astype(int)).max()
    print(
        f"[{type(pipe).__name__} cfg={guidance_scale}] noise_level=0 vs stock diffusers: "
        f"max latent diff {latent_err:.2e}, max pixel diff {pixel_err}"
    )
    assert latent_err < 1e-5 and pixel_err <= 1


def test_initial_noise_matches_diffusers_with_per_sample_generators(pipe):
    """x_T is what the stock prepare_latents draws from a list of per-sample generators seeded with the seeds."""
    out = pipe.rl_generate(PROMPT, SEEDS[:3], _params(num_inference_steps=2, sde_window_size=0, window_start=None))
    channels = pipe.transformer.config.in_channels // (4 if "Qwen" in type(pipe).__name__ else 1)
    expected = pipe.prepare_latents(
        3, channels, 64, 64, torch.float32, torch.device("cpu"), [torch.Generator().manual_seed(s) for s in SEEDS[:3]]
    )
    assert torch.equal(out.latents[:, 0], expected)


def test_guidance_adds_negative_embeddings_and_changes_the_result(pipe):
    off = pipe.rl_generate(PROMPT, SEEDS[:2], _params(guidance_scale=1.0))
    on = pipe.rl_generate(PROMPT, SEEDS[:2], _params(guidance_scale=3.0))
    custom = pipe.rl_generate(PROMPT, SEEDS[:2], _params(guidance_scale=3.0, negative_prompt="blurry"))
    assert off.negative_prompt_embeds is None and off.negative_pooled_prompt_embeds is None
    assert on.negative_prompt_embeds is not None and on.negative_prompt_embeds.shape[0] == 2
    is_sd3 = "SD3" in type(pipe).__name__
    assert (on.negative_pooled_prompt_embeds is not None) == is_sd3
    assert (on.negative_prompt_embeds_mask is not None) == (not is_sd3)
    assert torch.equal(off.latents[:, 0], on.latents[:, 0])  # same seeds, same start
    assert (off.latents[:, -1] - on.latents[:, -1]).abs().max() > 1e-3
    assert not torch.equal(on.negative_prompt_embeds, custom.negative_prompt_embeds)


def test_output_shapes_and_types(pipe):
    params = _params(num_inference_steps=3, sde_window_size=0, window_start=None, height=32, width=48)
    out = pipe.rl_generate(PROMPT, SEEDS[:2], params)
    assert out.images.shape == (2, 32, 48, 3) and out.images.dtype == torch.uint8
    assert out.latents.shape[:2] == (2, 4) and out.log_probs.shape == (2, 3) and out.log_probs.dtype == torch.float32
    assert out.timesteps.shape == (3,) and out.sigmas.shape == (4,) and out.sigmas[-1] == 0
    assert out.window_mask.tolist() == [True, True, True] and torch.all(out.log_probs != 0)
    no_traj = pipe.rl_generate(PROMPT, SEEDS[:2], params.replace(return_trajectory=False))
    assert no_traj.latents.shape[:2] == (2, 0)
    assert torch.equal(no_traj.images, out.images)


def test_one_step_with_shift_terminal_is_rejected_before_compute(qwen_image_rl_pipe, monkeypatch):
    """What the scheduler math rejects is the pipeline's only own check: the schedule comes first, so it raises
    before the text encoder, the latents or the transformer run."""

    def forbidden(*args, **kwargs):
        raise AssertionError("compute ran before the schedule was checked")

    for hook in ("encode_conditions", "prepare_rl_latents", "predict_velocity"):
        monkeypatch.setattr(qwen_image_rl_pipe, hook, forbidden)
    with pytest.raises(ValueError, match="shift_terminal"):  # stock diffusers would produce NaN sigmas
        qwen_image_rl_pipe.rl_generate(
            PROMPT, [1], _params(num_inference_steps=1, sde_window_size=0, window_start=None)
        )


def test_interrupt_stops_between_steps(pipe, monkeypatch):
    """``interrupt()`` is read before every denoising step; True raises RequestAborted and no further forward runs."""
    forwards, polls = [], []
    real = pipe.predict_velocity

    def counting(*args, **kwargs):
        forwards.append(1)
        return real(*args, **kwargs)

    def interrupt():
        polls.append(1)
        return len(polls) > 2  # steps 0 and 1 run, the abort is seen before step 2

    monkeypatch.setattr(pipe, "predict_velocity", counting)
    with pytest.raises(RequestAborted, match="step 2 of 4"):
        pipe.rl_generate(PROMPT, SEEDS[:2], _params(), interrupt=interrupt)
    assert len(forwards) == 2 and len(polls) == 3


def test_prompt_truncation_is_counted_in_the_output_not_warned(pipe, caplog):
    """A prompt longer than max_sequence_length is cut; the output says by how many tokens (the trainer reports
    the count per step) and the pipeline logs each cut at DEBUG only, never a WARNING per prompt."""
    long_prompt, limit = "a very long prompt " * 4, 8
    is_qwen = "Qwen" in type(pipe).__name__
    if is_qwen:  # its text tokens after the template prefix, uncut
        full = pipe.encode_prompt_for_rl(long_prompt, pipe.MAX_SEQUENCE_LENGTH).embeds.shape[1]
    else:  # SD3: max_sequence_length governs T5
        full = len(pipe.tokenizer_3(long_prompt).input_ids)
    params = _params(num_inference_steps=2, sde_window_size=0, window_start=None, max_sequence_length=limit)
    with caplog.at_level(logging.DEBUG, logger="verl_omni"):
        out = pipe.rl_generate(long_prompt, SEEDS[:2], params)
        again = pipe.rl_generate("another long prompt " * 4, SEEDS[:1], params)
        short = pipe.rl_generate(PROMPT, SEEDS[:1], params.replace(max_sequence_length=64))
    assert full > limit and out.truncated_prompt_tokens == full - limit
    assert again.truncated_prompt_tokens > 0 and short.truncated_prompt_tokens == 0
    clip_tokens = 0 if is_qwen else pipe.tokenizer_max_length  # SD3's embeddings: CLIP's 77 tokens, then T5's
    assert out.prompt_embeds.shape[1] == clip_tokens + limit
    ours = [r for r in caplog.records if r.name.startswith("verl_omni")]
    assert not [r.getMessage() for r in ours if r.levelno >= logging.WARNING]
    assert len([r for r in ours if r.levelno == logging.DEBUG and "truncated" in r.getMessage()]) == 2


def test_truncation_count_travels_with_every_part_of_a_call(qwen_image_rl_pipe):
    """The vllm-omni worker slices one call into its requests and sends each over the wire: the count goes along."""
    from verl_omni.core.outputs import slice_batch
    from verl_omni.rollout.engines.vllm_omni.wire import MODEL_CLASS_NAME, request_output_to_batch, to_diffusion_output

    params = _params(num_inference_steps=2, sde_window_size=0, window_start=None, max_sequence_length=8)
    out = qwen_image_rl_pipe.rl_generate("a very long prompt " * 4, SEEDS[:3], params)
    part = slice_batch(out, 1, 3)
    assert out.truncated_prompt_tokens > 0 and part.truncated_prompt_tokens == out.truncated_prompt_tokens
    sent = to_diffusion_output(part, types.SimpleNamespace, MODEL_CLASS_NAME)
    received = request_output_to_batch(types.SimpleNamespace(images=sent.output, **vars(sent)), part.seeds)
    assert received.truncated_prompt_tokens == out.truncated_prompt_tokens


def test_qwen_image_embeddings_drop_exactly_the_template_prefix(qwen_image_rl_pipe):
    """Loaded from disk, the pipeline drops the scratch tokenizer's template prefix, not the stock 34 tokens:
    what is left is the prompt (one token per byte) plus the template suffix '<|im_end|>\\n<|im_start|>assistant\\n'."""
    pipe = qwen_image_rl_pipe
    suffix_tokens = 1 + 1 + 1 + len("assistant") + 1
    embeds, mask, truncated = pipe.encode_prompt_for_rl(PROMPT, max_sequence_length=1024)
    assert embeds.shape[1] == len(PROMPT.encode()) + suffix_tokens and mask.all() and truncated == 0
    # Same hidden states as running the encoder on the full template and slicing after the prefix by hand.
    text = pipe.prompt_template_encode.format(PROMPT)
    ids = pipe.tokenizer(text, return_tensors="pt").input_ids
    hidden = pipe.text_encoder(input_ids=ids, output_hidden_states=True).hidden_states[-1]
    start = ids.shape[1] - embeds.shape[1]
    assert pipe.tokenizer.decode(ids[0, :start]).endswith("<|im_start|>user\n")
    torch.testing.assert_close(embeds, hidden[:, start:], rtol=0, atol=1e-6)


def _sdpa_bshd(q, k, v, causal=False, softmax_scale=None):
    """An attention function with the flash-kernel signature ([B, S, H, D] in and out), through SDPA, counting calls."""
    _sdpa_bshd.calls += 1
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal, scale=softmax_scale
    )
    return out.transpose(1, 2), None  # like FA3: (out, lse)


_sdpa_bshd.calls = 0


def test_fused_attention_processor_computes_what_diffusers_computes(tiny_qwen_image_dir, monkeypatch):
    """The processor the vllm-omni engine installs (real-arithmetic RoPE, an engine's flash kernel when there is no
    mask) gives diffusers' result: same seeds -> same latents within float32 rounding. The kernel serves every
    unmasked call: batched CFG whose texts have equal lengths (one call of 2B rows), or CFG as two calls; batched
    CFG with padded text goes through diffusers' masked attention instead."""
    from verl_omni.pipelines.qwen_image import pipeline as qwen_image
    from verl_omni.pipelines.qwen_image.pipeline import QwenImageFusedAttnProcessor, QwenImageRLPipeline

    pipe = QwenImageRLPipeline.from_pretrained(tiny_qwen_image_dir)
    pipe.set_progress_bar_config(disable=True)
    same_length, longer = "dull gray", "blurry, a much longer negative prompt"
    assert pipe.encode_prompt_for_rl(same_length, 64).embeds.shape == pipe.encode_prompt_for_rl(PROMPT, 64).embeds.shape
    layers, steps = pipe.transformer.config.num_layers, _params().num_inference_steps
    # (negative prompt, batch_cfg, kernel calls per forward-step: unmasked transformer calls x layers)
    # "auto": the installed kernel takes no mask, so the padded batched call becomes two unmasked ones.
    cases = [
        (same_length, True, 1 * layers),
        (longer, True, 0),
        (longer, False, 2 * layers),
        (longer, "auto", 2 * layers),
    ]
    stock = {
        case: pipe.rl_generate(
            PROMPT, SEEDS[:2], _params(guidance_scale=2.0, negative_prompt=case[0], batch_cfg=case[1])
        )
        for case in cases
    }
    _sdpa_bshd.calls = 0
    changed = pipe.use_attention_function(_sdpa_bshd)
    assert changed == layers > 0
    assert all(isinstance(p, QwenImageFusedAttnProcessor) for p in pipe.transformer.attn_processors.values())
    pipe.rl_generate(PROMPT, SEEDS[:1], _params(guidance_scale=2.0, negative_prompt=same_length))
    assert _sdpa_bshd.calls == 0  # float32: flash kernels take bf16/fp16 only, so diffusers' attention runs
    monkeypatch.setattr(qwen_image, "FLASH_DTYPES", (torch.float32,))  # let this float32 stand-in kernel run
    for case in cases:
        negative_prompt, batch_cfg, calls_per_step = case
        _sdpa_bshd.calls = 0
        params = _params(guidance_scale=2.0, negative_prompt=negative_prompt, batch_cfg=batch_cfg)
        fused = pipe.rl_generate(PROMPT, SEEDS[:2], params)
        assert _sdpa_bshd.calls == calls_per_step * steps, case
        reference = stock[case]
        rel = ((fused.latents - reference.latents).norm() / reference.latents.norm()).item()
        print(f"fused processor vs diffusers {case}: final latents rel L2 {rel:.2e}")
        assert rel < 1e-5
        assert torch.allclose(fused.log_probs, reference.log_probs, atol=1e-5)
        assert (fused.images.int() - reference.images.int()).abs().max().item() <= 1
    # padded text (a mask that is not all ones) goes through diffusers' masked attention, not the kernel
    _sdpa_bshd.calls = 0
    reference = stock[cases[0]]
    latents = reference.latents[:, 1].to(pipe.transformer.dtype)
    cond = Conditioning(
        prompt_embeds=torch.cat([reference.prompt_embeds, torch.zeros_like(reference.prompt_embeds[:, :3])], 1),
        prompt_embeds_mask=torch.cat(
            [reference.prompt_embeds_mask, torch.zeros_like(reference.prompt_embeds_mask[:, :3])], 1
        ),
    )
    masked = pipe.predict_velocity(latents, reference.timesteps[1], cond, 1.0, 64, 64)
    assert _sdpa_bshd.calls == 0 and torch.isfinite(masked).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swapped_rope_form_gives_the_same_numbers_as_the_stacked_pairs(dtype):
    """The two RoPE forms the fused processor can use are the same float32 products (a sum of a negated product
    equals the difference), so they agree bit for bit."""
    from verl_omni.pipelines.qwen_image.pipeline import _rotate, _rotate_swapped

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 7, 3, 16, generator=g).to(dtype)
    angles = torch.randn(7, 1, 8, generator=g)
    cos, sin = angles.cos(), angles.sin()
    pairs, swapped = _rotate(x, cos, sin), _rotate_swapped(x, cos, sin)
    assert swapped.dtype == dtype and not torch.equal(pairs, x)  # it rotates
    assert torch.equal(pairs, swapped)


def test_fused_processor_with_swapped_rope_generates_the_same_images(tiny_qwen_image_dir, monkeypatch):
    """Through the whole pipeline: the "swapped" form's rollout equals the default "pairs" form's (same seeds);
    an unknown form is refused, naming the allowed ones."""
    from verl_omni.pipelines.qwen_image import pipeline as qwen_image
    from verl_omni.pipelines.qwen_image.pipeline import QwenImageFusedAttnProcessor, QwenImageRLPipeline

    monkeypatch.setattr(qwen_image, "FLASH_DTYPES", (torch.float32,))  # let the float32 stand-in kernel run
    pipe = QwenImageRLPipeline.from_pretrained(tiny_qwen_image_dir)
    pipe.set_progress_bar_config(disable=True)
    params = _params(guidance_scale=2.0, negative_prompt="dull", batch_cfg=False)
    outputs = {}
    for rope in ("pairs", "swapped"):
        assert pipe.use_attention_function(_sdpa_bshd, rope=rope) == pipe.transformer.config.num_layers
        outputs[rope] = pipe.rl_generate(PROMPT, SEEDS[:2], params)
    assert torch.equal(outputs["pairs"].latents, outputs["swapped"].latents)
    assert torch.equal(outputs["pairs"].log_probs, outputs["swapped"].log_probs)
    with pytest.raises(ValueError, match=r"rope='interleaved'.*\['pairs', 'swapped'\]"):
        QwenImageFusedAttnProcessor(_sdpa_bshd, rope="interleaved")


def test_fused_projections_and_joint_output_projection_generate_the_same_images(tiny_qwen_image_dir, monkeypatch):
    """The rollout-only speed options of the fused processor (q/k/v as one stacked matmul, to_out over the whole joint
    attention output) compute the same rollout as the default processor within float32 rounding, with a LoRA on
    to_q/k/v/out whose product is not zero."""
    from verl_omni.models.lora import LoRASpec, add_lora_adapter
    from verl_omni.pipelines.qwen_image import pipeline as qwen_image
    from verl_omni.pipelines.qwen_image.pipeline import QwenImageRLPipeline

    monkeypatch.setattr(qwen_image, "FLASH_DTYPES", (torch.float32,))  # let the float32 stand-in kernel run
    pipe = QwenImageRLPipeline.from_pretrained(tiny_qwen_image_dir)
    pipe.set_progress_bar_config(disable=True)
    add_lora_adapter(pipe.transformer, LoRASpec(rank=4, alpha=8.0))
    with torch.no_grad():
        for name, param in sorted(pipe.transformer.named_parameters()):
            if "lora_B" in name:  # B starts at zero: give the adapter a product
                param.copy_(0.1 * torch.randn(param.shape, generator=torch.Generator().manual_seed(len(name))))
    params = _params(guidance_scale=2.0, negative_prompt="dull", batch_cfg=False)
    fused_calls, to_out_rows = [], []
    original = qwen_image.fused_projections

    def counting(layers, x):
        parts = original(layers, x)
        fused_calls.append(parts is not None)
        return parts

    monkeypatch.setattr(qwen_image, "fused_projections", counting)
    to_out = pipe.transformer.transformer_blocks[0].attn.to_out[0]
    to_out.register_forward_pre_hook(lambda _, args: to_out_rows.append(args[0].shape[1]))
    outputs, calls, rows = {}, {}, {}
    for options in ({}, {"fuse_projections": True}, {"project_joint_output": True}):
        fused_calls.clear()
        to_out_rows.clear()
        pipe.use_attention_function(_sdpa_bshd, **options)
        outputs[tuple(options)] = pipe.rl_generate(PROMPT, SEEDS[:2], params)
        calls[tuple(options)], rows[tuple(options)] = sum(fused_calls), set(to_out_rows)
    # the options took effect: q/k/v stacked in every block and stream; to_out fed the text rows too
    assert calls[()] == 0 and calls[("fuse_projections",)] > 0
    assert max(rows[("project_joint_output",)]) > max(rows[()])
    reference = outputs[()]
    for key, out in outputs.items():
        rel = ((out.latents - reference.latents).norm() / reference.latents.norm()).item()
        assert rel < 1e-5, (key, rel)
        assert torch.allclose(out.log_probs, reference.log_probs, atol=1e-5), key


def test_single_frame_vae_decode_equals_diffusers_decode(tiny_qwen_image_dir):
    """decode_latents runs the decoder without its frame cache and with 2D convs: the same pixels as vae.decode."""
    from verl_omni.pipelines.qwen_image.pipeline import QwenImageRLPipeline, SingleFrameCausalConv3d

    pipe = QwenImageRLPipeline.from_pretrained(tiny_qwen_image_dir)
    h = w = 64
    tokens = (h // pipe.vae_scale_factor // 2) * (w // pipe.vae_scale_factor // 2)
    latents = torch.randn(3, tokens, pipe.transformer.config.in_channels, generator=torch.Generator().manual_seed(0))
    z = pipe.vae.config.z_dim
    unpacked = pipe._unpack_latents(latents, h, w, pipe.vae_scale_factor)
    mean = torch.tensor(pipe.vae.config.latents_mean).view(1, z, 1, 1, 1)
    std = torch.tensor(pipe.vae.config.latents_std).view(1, z, 1, 1, 1)
    reference = pipe.vae.decode(unpacked * std + mean, return_dict=False)[0][:, :, 0]
    fast = pipe.decode_latents_to_pixels(latents, h, w)
    assert any(type(m) is SingleFrameCausalConv3d for m in pipe.vae.decoder.modules())
    rel = ((fast - reference).norm() / reference.norm()).item()
    print(f"single-frame decode vs vae.decode: rel L2 {rel:.2e}")
    assert rel < 1e-5
    # a video-shaped input (3 frames) still takes the 3D path of the switched convs
    video = pipe.vae.decode(unpacked.repeat(1, 1, 3, 1, 1) * std + mean, return_dict=False)[0]
    assert video.shape[2] > 1 and torch.isfinite(video).all()


@pytest.mark.parametrize("family", ["qwen_image_rl_pipe", "sd3_rl_pipe", "flux_rl_pipe", "wan_pipe"])
def test_decoding_a_few_rows_at_a_time_gives_the_media_of_one_decode(family, request, monkeypatch):
    """``vae_decode_batch``: the final latents decode in calls of that many rows (the last one shorter), and the media
    are one decode's of all rows within a unit of uint8 rounding (a convolution over another batch size may round
    differently, as in the batch-composition tests above); the latents and log-probs are untouched."""
    pipe = request.getfixturevalue(family)
    params = _params(num_inference_steps=2, sde_window_size=1, window_start=0)
    whole = pipe.rl_generate(PROMPT, SEEDS[:3], params)
    decoded_rows = []
    decode = type(pipe).decode_rl_latents

    def counting(self, latents, p):
        decoded_rows.append(latents.shape[0])
        return decode(self, latents, p)

    monkeypatch.setattr(type(pipe), "decode_rl_latents", counting)
    parts = pipe.rl_generate(PROMPT, SEEDS[:3], params.replace(vae_decode_batch=2))
    assert decoded_rows == [2, 1]
    assert parts.media.shape == whole.media.shape
    pixel = (parts.media.int() - whole.media.int()).abs().max().item()
    print(f"[{type(pipe).__name__}] decoded 2 + 1 rows vs 3 at once: pixel {pixel}")
    assert pixel <= 1
    assert torch.equal(parts.latents, whole.latents) and torch.equal(parts.log_probs, whole.log_probs)


def test_a_negative_vae_decode_batch_is_refused_naming_the_field():
    with pytest.raises(ValueError, match=r"vae_decode_batch=-1"):
        _params(vae_decode_batch=-1).validate()
