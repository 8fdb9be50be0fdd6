"""The RL pipelines on tiny random Qwen-Image and SD3: log-prob consistency with the trainer's recomputation,
batch invariance, the SDE window, equality with the stock diffusers pipelines at noise_level 0, guidance and
validation."""

import numpy as np
import pytest
import torch
from diffusers import QwenImagePipeline, StableDiffusion3Pipeline

from verl_omni.config.sampling import DiffusionSamplingParams
from verl_omni.pipelines.qwen_image import STOCK_TEMPLATE_START_IDX
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
    names = ("prompt_embeds", "prompt_embeds_mask", "negative_prompt_embeds", "negative_prompt_embeds_mask",
             "pooled_prompt_embeds", "negative_pooled_prompt_embeds")
    return {n: getattr(out, n)[rows] for n in names if getattr(out, n) is not None}


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
                velocity = pipe.predict_velocity(out.latents[rows, t], out.timesteps[t], _cond(out, rows),
                                                 guidance_scale, params.height, params.width)
            assert velocity.requires_grad
            recomputed = compute_log_prob(velocity.detach(), out.latents[rows, t], out.latents[rows, t + 1],
                                          out.sigmas[t], out.sigmas[t + 1], noise_level=params.noise_level,
                                          sde_type=sde_type, sigma_max=sigma_max)
            max_err = max(max_err, (recomputed - out.log_probs[rows, t]).abs().max().item())
    print(f"[{type(pipe).__name__} {sde_type} cfg={guidance_scale}] rollout vs recomputed log-prob max abs err {max_err:.2e}")
    assert max_err < 1e-5


def test_batched_call_equals_single_calls_with_the_same_seeds(pipe):
    params = _params(guidance_scale=2.0)
    batched = pipe.rl_generate(PROMPT, SEEDS, params)
    singles = [pipe.rl_generate(PROMPT, [s], params) for s in SEEDS]
    pixel = max((batched.images[i].int() - o.images[0].int()).abs().max().item() for i, o in enumerate(singles))
    latent = max((batched.latents[i] - o.latents[0]).abs().max().item() for i, o in enumerate(singles))
    logp = max((batched.log_probs[i] - o.log_probs[0]).abs().max().item() for i, o in enumerate(singles))
    print(f"[{type(pipe).__name__}] B=4 vs 4xB=1: max pixel diff {pixel}, max latent diff {latent:.2e}, "
          f"max log-prob diff {logp:.2e}")
    assert pixel <= 1 and latent < 1e-4
    # Different seeds really give different samples (so the check above is not vacuous).
    assert (batched.latents[0, 0] - batched.latents[1, 0]).abs().max() > 0.1
    assert batched.seeds == SEEDS


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
    assert a.window_mask.tolist() == [True, False, False, False] and b.window_mask.tolist() == [False, False, True, False]
    assert torch.equal(a.latents[:, 0], b.latents[:, 0])  # same seed, same x_T
    assert not torch.allclose(a.latents[:, -1], b.latents[:, -1])


def _stock_qwen(pipe, x_t, params):
    stock = QwenImagePipeline(**pipe.components)
    stock.set_progress_bar_config(disable=True)
    # The trap: the stock class hard-codes 34 template tokens (right only for the real tokenizer).
    assert stock.prompt_template_encode_start_idx == STOCK_TEMPLATE_START_IDX != pipe.prompt_template_encode_start_idx
    stock.prompt_template_encode_start_idx = pipe.prompt_template_encode_start_idx
    kw = dict(prompt=[PROMPT] * x_t.shape[0], height=params.height, width=params.width, num_inference_steps=params.num_inference_steps,
              latents=x_t, max_sequence_length=params.max_sequence_length, true_cfg_scale=params.guidance_scale,
              negative_prompt=[""] * x_t.shape[0] if params.guidance_scale > 1 else None)
    latents = stock(**kw, output_type="latent").images
    images = stock(**kw, output_type="np").images
    return latents, images


def _stock_sd3(pipe, x_t, params):
    stock = StableDiffusion3Pipeline(**pipe.components)
    stock.set_progress_bar_config(disable=True)
    kw = dict(prompt=[PROMPT] * x_t.shape[0], height=params.height, width=params.width, num_inference_steps=params.num_inference_steps,
              latents=x_t, max_sequence_length=params.max_sequence_length, guidance_scale=params.guidance_scale)
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
    print(f"[{type(pipe).__name__} cfg={guidance_scale}] noise_level=0 vs stock diffusers: "
          f"max latent diff {latent_err:.2e}, max pixel diff {pixel_err}")
    assert latent_err < 1e-5 and pixel_err <= 1


def test_initial_noise_matches_diffusers_with_per_sample_generators(pipe):
    """x_T is what the stock prepare_latents draws from a list of per-sample generators seeded with the seeds."""
    out = pipe.rl_generate(PROMPT, SEEDS[:3], _params(num_inference_steps=2, sde_window_size=0, window_start=None))
    channels = pipe.transformer.config.in_channels // (4 if "Qwen" in type(pipe).__name__ else 1)
    expected = pipe.prepare_latents(3, channels, 64, 64, torch.float32, torch.device("cpu"),
                                    [torch.Generator().manual_seed(s) for s in SEEDS[:3]])
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


@pytest.mark.parametrize(
    "changes,field",
    [
        ({"height": 40}, "height"),
        ({"width": 72}, "width"),
        ({"sde_type": "ode"}, "sde_type"),
        ({"guidance_scale": 0.5}, "guidance_scale"),
        ({"window_start": 3}, "window_start"),
        ({"noise_level": -0.1}, "noise_level"),
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"max_sequence_length": 4096}, "max_sequence_length"),
    ],
)
def test_bad_params_raise_before_any_compute(pipe, monkeypatch, changes, field):
    def forbidden(*args, **kwargs):
        raise AssertionError("compute ran before validation")

    monkeypatch.setattr(pipe, "predict_velocity", forbidden)
    monkeypatch.setattr(pipe, "prepare_latents", forbidden)
    params = _params(**changes)
    with pytest.raises(ValueError, match=field):
        pipe.rl_generate(PROMPT, SEEDS[:1], params)


def test_one_step_with_shift_terminal_is_rejected_before_compute(qwen_image_rl_pipe, monkeypatch):
    monkeypatch.setattr(qwen_image_rl_pipe, "predict_velocity", None)
    with pytest.raises(ValueError, match="shift_terminal"):  # stock diffusers would produce NaN sigmas
        qwen_image_rl_pipe.rl_generate(PROMPT, [1], _params(num_inference_steps=1, sde_window_size=0, window_start=None))


def test_bad_requests_raise(pipe):
    with pytest.raises(ValueError, match="seeds"):
        pipe.rl_generate(PROMPT, [], _params())
    with pytest.raises(ValueError, match="seeds"):
        pipe.rl_generate(PROMPT, [1.5], _params())
    with pytest.raises(ValueError, match="prompt"):
        pipe.rl_generate(["a", "b"], [1], _params())


def test_qwen_image_embeddings_drop_exactly_the_template_prefix(qwen_image_rl_pipe):
    """Loaded from disk, the pipeline drops the scratch tokenizer's template prefix, not the stock 34 tokens:
    what is left is the prompt (one token per byte) plus the template suffix '<|im_end|>\\n<|im_start|>assistant\\n'."""
    pipe = qwen_image_rl_pipe
    suffix_tokens = 1 + 1 + 1 + len("assistant") + 1
    embeds, mask = pipe.encode_prompt_for_rl(PROMPT, max_sequence_length=1024)
    assert embeds.shape[1] == len(PROMPT.encode()) + suffix_tokens and mask.all()
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
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal, scale=softmax_scale)
    return out.transpose(1, 2), None  # like FA3: (out, lse)


def test_fused_attention_processor_computes_what_diffusers_computes(tiny_qwen_image_dir, monkeypatch):
    """The processor the vllm-omni engine installs (real-arithmetic RoPE, an engine's flash kernel when there is no
    mask) gives diffusers' result: same seeds -> same latents within float32 rounding, and the kernel is called."""
    from verl_omni.pipelines import qwen_image
    from verl_omni.pipelines.qwen_image import QwenImageFusedAttnProcessor, QwenImageRLPipeline

    pipe = QwenImageRLPipeline.from_pretrained(tiny_qwen_image_dir)
    pipe.set_progress_bar_config(disable=True)
    params = _params(guidance_scale=2.0, negative_prompt="blurry, a much longer negative prompt")
    stock = pipe.rl_generate(PROMPT, SEEDS[:2], params)
    _sdpa_bshd.calls = 0
    changed = pipe.use_attention_function(_sdpa_bshd)
    assert changed == pipe.transformer.config.num_layers > 0
    assert all(isinstance(p, QwenImageFusedAttnProcessor) for p in pipe.transformer.attn_processors.values())
    pipe.rl_generate(PROMPT, SEEDS[:1], params)
    assert _sdpa_bshd.calls == 0  # float32: flash kernels take bf16/fp16 only, so diffusers' attention runs
    monkeypatch.setattr(qwen_image, "FLASH_DTYPES", (torch.float32,))  # let this float32 stand-in kernel run
    fused = pipe.rl_generate(PROMPT, SEEDS[:2], params)
    assert _sdpa_bshd.calls > 0
    rel = ((fused.latents - stock.latents).norm() / stock.latents.norm()).item()
    print(f"fused processor vs diffusers: final latents rel L2 {rel:.2e}")
    assert rel < 1e-5
    assert torch.allclose(fused.log_probs, stock.log_probs, atol=1e-5)
    assert (fused.images.int() - stock.images.int()).abs().max().item() <= 1
    # padded text (a mask that is not all ones) goes through diffusers' masked attention, not the kernel
    _sdpa_bshd.calls = 0
    latents = stock.latents[:, 1].to(pipe.transformer.dtype)
    cond = {"prompt_embeds": torch.cat([stock.prompt_embeds, torch.zeros_like(stock.prompt_embeds[:, :3])], 1),
            "prompt_embeds_mask": torch.cat([stock.prompt_embeds_mask,
                                             torch.zeros_like(stock.prompt_embeds_mask[:, :3])], 1)}
    masked = pipe.predict_velocity(latents, stock.timesteps[1], cond, 1.0, 64, 64)
    assert _sdpa_bshd.calls == 0 and torch.isfinite(masked).all()


def test_single_frame_vae_decode_equals_diffusers_decode(tiny_qwen_image_dir):
    """decode_latents runs the decoder without its frame cache and with 2D convs: the same pixels as vae.decode."""
    from verl_omni.pipelines.qwen_image import QwenImageRLPipeline, SingleFrameCausalConv3d

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

