"""Classifier-free guidance's two branches as ONE transformer forward of 2B rows vs two forwards of B
rows, on the tiny random models in float32 (CPU, CI); and how ``ModelInputs`` lays the branches out.

Bounds. Both layouts compute the same function: padded text keys get an attention weight of exactly 0 (the mask
adds -inf), every other text operation is per token, and text RoPE positions are token indices. What differs is
float32 rounding: GEMMs over 2B instead of B rows may block their reductions differently and the masked softmax
sums extra zero terms -- a few float32 ulps (2^-23 = 1.2e-7 relative) per operation, through the tiny models'
two blocks. Measured: velocity errors 0.7e-6 to 1.4e-6 of max |v| (|v| ~ 2), log-prob errors <= 1.2e-7.
Bounds: velocities within 1e-5 x max |v| (84 ulps of the largest value, ~7x the measured error); log-probs
(means over latent elements, ~1 in magnitude, whose error is the velocity error scaled by |x' - mean| dt / std^2
and averaged) within 1e-6 (8 ulps at 1). A real difference is orders of magnitude above: the padding left
unmasked, checked below as a negative control, moves velocities by > 1e-3 x max |v|.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from verl_omni.config.sampling import DiffusionSamplingParams
from verl_omni.core.conditioning import Conditioning
from verl_omni.pipelines.model_inputs import MASKED_TEXT_MULTIPLE, ModelInputs, prepare_model_inputs
from verl_omni.schedulers.flow_match_sde import reference_sigma_max, sde_step_with_logprob

VELOCITY_REL_BOUND = 1e-5  # of max |v|
LOG_PROB_BOUND = 1e-6
GUIDANCE = 4.0
SIZE = 64
# Rows of a training micro-batch: different prompts, hence different text lengths (one token per byte + template).
PROMPTS = ["a red cat", "a much longer prompt: a blue dog on a sunny beach at noon", "x"]
NEGATIVES = {
    "shorter than every prompt": "",
    "between the prompts": "blurry, dull",
    "longer than every prompt": "blurry, low quality, oversaturated, extra fingers, watermark, jpeg artifacts, text",
}


def _training_batch(pipe, prompts, negatives, max_sequence_length=128, extra_padding=5):
    """The conditioning of one row per (prompt, negative) as the actor sees it: with a text mask (Qwen-Image),
    every row's texts right-padded to one length longer than any row (a DataProto of a larger batch), then
    ``without_padding()`` as the actor does; without one (SD3) the rows have one length already."""
    params = DiffusionSamplingParams(max_sequence_length=max_sequence_length)
    rows = [pipe.encode_conditions(p, n, params).conditioning for p, n in zip(prompts, negatives, strict=False)]
    length = max(max(r.prompt_embeds.shape[1], r.negative_prompt_embeds.shape[1]) for r in rows) + extra_padding
    fields = {}
    for name, value in rows[0].as_fields().items():
        if value is None:
            continue
        values = [getattr(r, name) for r in rows]
        if rows[0].prompt_embeds_mask is not None and not name.endswith("pooled_prompt_embeds"):
            values = [torch.nn.functional.pad(v, [0, 0] * (v.ndim - 2) + [0, length - v.shape[1]]) for v in values]
        fields[name] = torch.cat(values)
    return Conditioning(**fields).without_padding(), rows


def _latents(pipe, batch_size, seed=0):
    generators = [torch.Generator().manual_seed(seed + i) for i in range(batch_size)]
    return pipe.prepare_rl_latents(batch_size, DiffusionSamplingParams(height=SIZE, width=SIZE), generators, "cpu")


def _transition_log_probs(pipe, velocities: dict, latents, reference_velocity):
    """Log-probs of one stored SDE transition (drawn with ``reference_velocity``) under each velocity, as the actor
    scores it (``sde_step_with_logprob(prev_sample=...)``)."""
    sigmas, _ = pipe.rl_schedule(DiffusionSamplingParams(num_inference_steps=4, height=SIZE, width=SIZE))
    kw = dict(noise_level=0.7, sde_type="sde", sigma_max=reference_sigma_max(sigmas))
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(7))
    prev = sde_step_with_logprob(reference_velocity, latents, sigmas[1], sigmas[2], noise=noise, **kw).prev_sample
    return {
        name: sde_step_with_logprob(v, latents, sigmas[1], sigmas[2], prev_sample=prev, **kw).log_prob
        for name, v in velocities.items()
    }


@pytest.mark.parametrize("negative_case", list(NEGATIVES))
def test_qwen_image_batched_cfg_equals_two_forwards(qwen_image_rl_pipe, negative_case):
    """B=3 rows of different prompts (padded differently), with a negative prompt shorter than, between or longer
    than them: the one 2B-row forward gives the two-forward velocities and log-probs, and both equal each row
    computed alone without any padding (what diffusers' QwenImagePipeline computes for that prompt)."""
    pipe = qwen_image_rl_pipe
    negative = NEGATIVES[negative_case]
    cond, rows = _training_batch(pipe, PROMPTS, [negative] * len(PROMPTS))
    lengths = cond.prompt_embeds_mask.sum(1).tolist()
    negative_length = int(cond.negative_prompt_embeds_mask.sum(1)[0])
    assert len(set(lengths)) == len(PROMPTS)  # the rows really are padded differently
    latents = _latents(pipe, len(PROMPTS))
    timestep = torch.tensor([0.9, 0.5, 0.2])
    with torch.no_grad():
        batched = pipe.predict_velocity(latents, timestep, cond, GUIDANCE, SIZE, SIZE, batch_cfg=True)
        two = pipe.predict_velocity(latents, timestep, cond, GUIDANCE, SIZE, SIZE, batch_cfg=False)
        alone = torch.cat(
            [
                pipe.predict_velocity(
                    latents[i : i + 1], timestep[i : i + 1], rows[i], GUIDANCE, SIZE, SIZE, batch_cfg=False
                )
                for i in range(len(PROMPTS))
            ]
        )
        inputs = pipe.prepare_model_inputs(cond, GUIDANCE, batch_cfg=True)
        unmasked = ModelInputs(inputs.batch_size, joint=dataclasses.replace(inputs.joint, mask=None))
        leaky = pipe.predict_velocity(latents, timestep, unmasked, GUIDANCE, SIZE, SIZE)
    log_probs = _transition_log_probs(pipe, {"batched": batched, "two": two, "alone": alone}, latents, two)
    scale = two.abs().max().item()
    errors = {  # velocities relative to max |v|
        "velocity batched vs two": (batched - two).abs().max().item() / scale,
        "velocity batched vs alone": (batched - alone).abs().max().item() / scale,
        "velocity two vs alone": (two - alone).abs().max().item() / scale,
        "log-prob batched vs two": (log_probs["batched"] - log_probs["two"]).abs().max().item(),
        "log-prob batched vs alone": (log_probs["batched"] - log_probs["alone"]).abs().max().item(),
    }
    print(
        f"[qwen_image, prompt tokens {lengths}, negative {negative_length} ({negative_case})] "
        + ", ".join(f"{k} {v:.2e}" for k, v in errors.items())
        + f"; max |v| {scale:.2f}; padding left unmasked: {(leaky - two).abs().max().item() / scale:.2e}"
    )
    for name, error in errors.items():
        assert error < (VELOCITY_REL_BOUND if name.startswith("velocity") else LOG_PROB_BOUND), name
    # Negative control: the same comparison detects padding that the mask does not hide.
    assert (leaky - two).abs().max().item() / scale > 1e-3


def test_qwen_image_batched_cfg_with_per_row_negative_prompts(qwen_image_rl_pipe):
    """Rows whose negative prompts differ (a row-level override) pad both branches per row: still equal."""
    pipe = qwen_image_rl_pipe
    cond, _ = _training_batch(pipe, PROMPTS, list(NEGATIVES.values()))
    latents = _latents(pipe, len(PROMPTS), seed=3)
    with torch.no_grad():
        batched = pipe.predict_velocity(latents, 0.6, cond, GUIDANCE, SIZE, SIZE)  # batch_cfg defaults to True
        two = pipe.predict_velocity(latents, 0.6, cond, GUIDANCE, SIZE, SIZE, batch_cfg=False)
    error = (batched - two).abs().max().item() / two.abs().max().item()
    print(f"[qwen_image, per-row negatives] velocity batched vs two forwards max abs err / max |v| {error:.2e}")
    assert error < VELOCITY_REL_BOUND


def test_sd3_batched_cfg_equals_two_forwards(sd3_rl_pipe):
    """SD3's texts have one length (CLIP 77 + T5 max_sequence_length): stacked without a mask."""
    pipe = sd3_rl_pipe
    cond, _ = _training_batch(pipe, PROMPTS[:2], ["", "blurry"], max_sequence_length=32)
    assert cond.prompt_embeds_mask is None and cond.prompt_embeds.shape == cond.negative_prompt_embeds.shape
    latents = _latents(pipe, 2)
    timestep = torch.tensor([900.0, 300.0])
    with torch.no_grad():
        batched = pipe.predict_velocity(latents, timestep, cond, GUIDANCE, SIZE, SIZE, batch_cfg=True)
        two = pipe.predict_velocity(latents, timestep, cond, GUIDANCE, SIZE, SIZE, batch_cfg=False)
    log_probs = _transition_log_probs(pipe, {"batched": batched, "two": two}, latents, two)
    scale = two.abs().max().item()
    velocity_error = (batched - two).abs().max().item() / scale
    log_prob_error = (log_probs["batched"] - log_probs["two"]).abs().max().item()
    print(
        f"[sd3] velocity batched vs two forwards max abs err / max |v| {velocity_error:.2e} (max |v| {scale:.2f}), "
        f"log-prob {log_prob_error:.2e}"
    )
    assert velocity_error < VELOCITY_REL_BOUND and log_prob_error < LOG_PROB_BOUND
    with torch.no_grad():  # guidance does change the prediction, so the comparison is not between no-ops
        unguided = pipe.predict_velocity(latents, timestep, cond, 1.0, SIZE, SIZE)
    assert (two - unguided).abs().max() > 1e-3


@pytest.fixture(params=["qwen_image", "sd3"])
def pipe(request):
    return request.getfixturevalue(f"{request.param}_rl_pipe")


@pytest.mark.parametrize("negative_prompt", [None, "blurry, low quality, oversaturated, extra fingers, watermark"])
def test_rl_generate_with_batch_cfg_on_and_off(pipe, negative_prompt):
    """The batched rollout equals the two-forward rollout: same inputs exactly, latents, log-probs and pixels within
    float32 rounding (the empty default negative is shorter than the prompt, the other longer)."""
    params = DiffusionSamplingParams(
        num_inference_steps=4,
        height=SIZE,
        width=SIZE,
        guidance_scale=3.0,
        negative_prompt=negative_prompt,
        sde_window_size=2,
        window_start=1,
        batch_cfg=True,
    )
    on = pipe.rl_generate("a red cat", [11, 22, 33], params)
    off = pipe.rl_generate("a red cat", [11, 22, 33], params.replace(batch_cfg=False))
    for name, value in Conditioning.from_fields(on).as_fields().items():
        assert (value is None and getattr(off, name) is None) or torch.equal(value, getattr(off, name)), name
    latent = (on.latents - off.latents).abs().max().item()
    log_prob = (on.log_probs - off.log_probs).abs().max().item()
    pixel = (on.images.int() - off.images.int()).abs().max().item()
    print(
        f"[{type(pipe).__name__} negative={negative_prompt!r:.20}] rl_generate batch_cfg on vs off: "
        f"max latent diff {latent:.2e}, max log-prob diff {log_prob:.2e}, max pixel diff {pixel}"
    )
    assert latent < 1e-4 and log_prob < LOG_PROB_BOUND and pixel <= 1
    assert torch.all(on.log_probs[:, on.window_mask] != 0)


def test_predict_velocity_on_prepared_inputs_never_reads_the_device(qwen_image_rl_pipe, monkeypatch):
    """With prepared inputs a forward has no host sync (nothing reads a tensor's value on the host); a
    Conditioning passed directly is prepared on the spot, which reads the mask once."""
    pipe = qwen_image_rl_pipe
    cond, _ = _training_batch(pipe, PROMPTS, [""] * len(PROMPTS))
    latents, timestep = _latents(pipe, len(PROMPTS)), torch.tensor([0.9, 0.5, 0.2])
    inputs = pipe.prepare_model_inputs(cond, GUIDANCE, batch_cfg=True)
    reads = []

    def host_read(name):
        real = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            reads.append(name)
            return real(self, *args, **kwargs)

        return read

    for name in ("__bool__", "item", "tolist", "__int__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, host_read(name))
    with torch.no_grad():
        pipe.predict_velocity(latents, timestep, inputs, GUIDANCE, SIZE, SIZE)
        assert reads == []
        pipe.predict_velocity(latents, timestep, cond, GUIDANCE, SIZE, SIZE)
    assert reads == ["__bool__"]


# ----------------------------------------------------------------------------------------- the layouts
def _cond(prompt_tokens, negative_tokens=None, padded_rows=(), rows=2, dim=4, pooled=False):
    """A synthetic conditioning: ``prompt_tokens`` real tokens per row (``padded_rows`` get 2 fewer, mask 0)."""

    def branch(tokens, seed):
        embeds = torch.randn(rows, tokens, dim, generator=torch.Generator().manual_seed(seed))
        mask = torch.ones(rows, tokens, dtype=torch.long)
        for r in padded_rows:
            mask[r, tokens - 2 :] = 0
            embeds[r, tokens - 2 :] = 0
        return embeds, mask

    embeds, mask = branch(prompt_tokens, 0)
    fields = dict(prompt_embeds=embeds, prompt_embeds_mask=mask)
    if negative_tokens is not None:
        fields["negative_prompt_embeds"], fields["negative_prompt_embeds_mask"] = branch(negative_tokens, 1)
    if pooled:
        fields = {k: v for k, v in fields.items() if not k.endswith("_mask")}
        fields["pooled_prompt_embeds"] = torch.randn(rows, 3)
        if negative_tokens is not None:
            fields["negative_pooled_prompt_embeds"] = torch.randn(rows, 3)
    return Conditioning(**fields)


def _prepare(cond, guided=True, batch_cfg=True, mask=True, pooled=False, unmasked_kernel=False):
    return prepare_model_inputs(
        cond,
        guided=guided,
        batch_cfg=batch_cfg,
        dtype=torch.float32,
        device="cpu",
        supports_text_mask=mask,
        requires_pooled=pooled,
        model_name="M",
        unmasked_kernel=unmasked_kernel,
    )


def test_layout_without_guidance_keeps_only_a_needed_mask():
    plain = _prepare(_cond(5, 3), guided=False)
    assert not plain.guided and plain.unconditional is None and plain.joint is None
    assert plain.conditional.mask is None and torch.equal(plain.conditional.embeds, _cond(5).prompt_embeds)
    padded = _prepare(_cond(5, padded_rows=[1]), guided=False)
    given = _cond(5, padded_rows=[1])
    assert padded.conditional.length == MASKED_TEXT_MULTIPLE  # a kept mask: the text padded to a multiple of 8
    assert torch.equal(padded.conditional.mask[:, :5], given.prompt_embeds_mask)
    assert torch.equal(padded.conditional.embeds[:, :5], given.prompt_embeds)
    assert not padded.conditional.mask[:, 5:].any() and not padded.conditional.embeds[:, 5:].any()


@pytest.mark.parametrize("tokens", [1, 7, 8, 9, 16, 21])
def test_a_masked_text_is_padded_to_a_multiple_of_8_and_an_unmasked_one_is_not(tokens):
    """The compiled training graphs guard on whether the joint mask's row (text + image tokens) is a multiple of
    8: with masked texts always a multiple, every prompt length of a run reuses one graph (the module doc)."""
    masked = _prepare(_cond(tokens, 3))  # unequal lengths: the shorter branch is padded, a mask kept
    assert masked.joint.mask is not None
    assert masked.joint.length % MASKED_TEXT_MULTIPLE == 0
    assert masked.joint.length - max(tokens, 3) < MASKED_TEXT_MULTIPLE
    unmasked = _prepare(_cond(tokens, tokens))
    assert unmasked.joint.mask is None and unmasked.joint.length == tokens
    two_calls = _prepare(_cond(tokens, 3), batch_cfg=False)
    assert two_calls.conditional.length == tokens and two_calls.unconditional.length == 3


def test_layout_two_forwards_keeps_each_branch_as_given():
    two = _prepare(_cond(5, 3), batch_cfg=False)
    assert two.guided and not two.batch_cfg and two.joint is None
    assert two.conditional.length == 5 and two.unconditional.length == 3
    assert two.conditional.mask is None and two.unconditional.mask is None


def test_layout_batched_equal_lengths_needs_no_mask():
    """Equal lengths, nothing padded: one unmasked call (an engine's fused kernel can serve it)."""
    cond = _cond(5, 5)
    joint = _prepare(cond).joint
    assert joint.mask is None and joint.rows == 4
    assert torch.equal(joint.embeds, torch.cat([cond.negative_prompt_embeds, cond.prompt_embeds]))


@pytest.mark.parametrize("prompt_tokens,negative_tokens", [(6, 3), (3, 6)])
def test_layout_batched_pads_the_shorter_branch_with_masked_zeros(prompt_tokens, negative_tokens):
    cond = _cond(prompt_tokens, negative_tokens, padded_rows=[1])
    joint = _prepare(cond).joint
    length = MASKED_TEXT_MULTIPLE  # max(prompt_tokens, negative_tokens) rounded up to the multiple
    assert joint.rows == 4 and joint.length == length
    unconditional, conditional = joint.embeds[:2], joint.embeds[2:]
    assert torch.equal(unconditional[:, :negative_tokens], cond.negative_prompt_embeds)
    assert torch.equal(conditional[:, :prompt_tokens], cond.prompt_embeds)
    assert not unconditional[:, negative_tokens:].any() and not conditional[:, prompt_tokens:].any()
    expected_real = [negative_tokens, negative_tokens - 2, prompt_tokens, prompt_tokens - 2]  # row 1 had padding
    for row, real in enumerate(expected_real):
        assert joint.mask[row].tolist() == [1] * real + [0] * (length - real), row


@pytest.mark.parametrize("unmasked_kernel", [False, True])
def test_layout_auto_batches_unless_a_mask_would_keep_the_kernel_out(unmasked_kernel):
    """ "auto": equal texts -> one unmasked call (either way); unequal texts -> one masked call through SDPA, or,
    with an engine's unmasked-only kernel, two unmasked calls; a model without a text mask (SD3) -> two calls."""
    equal = _prepare(_cond(5, 5), batch_cfg="auto", unmasked_kernel=unmasked_kernel)
    assert equal.batch_cfg and equal.joint.mask is None
    unequal = _prepare(_cond(5, 3), batch_cfg="auto", unmasked_kernel=unmasked_kernel)
    if unmasked_kernel:
        assert not unequal.batch_cfg and unequal.conditional.mask is None and unequal.unconditional.mask is None
    else:
        assert unequal.batch_cfg and unequal.joint.mask is not None
        assert torch.equal(unequal.joint.embeds, _prepare(_cond(5, 3)).joint.embeds)
    padded_rows = _prepare(_cond(5, 5, padded_rows=[1]), batch_cfg="auto", unmasked_kernel=unmasked_kernel)
    assert padded_rows.batch_cfg != unmasked_kernel  # equal lengths, but a row's padding needs the mask
    no_mask_model = _prepare(
        _cond(5, 3, pooled=True), batch_cfg="auto", mask=False, pooled=True, unmasked_kernel=unmasked_kernel
    )
    assert not no_mask_model.batch_cfg and no_mask_model.conditional.length == 5
    with pytest.raises(ValueError, match=r"batch_cfg='yes' must be true, false or 'auto'"):
        _prepare(_cond(5, 5), batch_cfg="yes")


def test_layout_errors_name_the_field():
    with pytest.raises(ValueError, match="negative_prompt_embeds"):
        _prepare(_cond(5))
    with pytest.raises(ValueError, match="negative_pooled_prompt_embeds"):
        _prepare(
            dataclasses.replace(_cond(5, 5, pooled=True), negative_pooled_prompt_embeds=None), mask=False, pooled=True
        )
    with pytest.raises(ValueError, match="prompt_embeds_mask"):
        _prepare(_cond(5, 5), mask=False)
    with pytest.raises(ValueError, match="batch_cfg=False"):  # no mask: unequal texts cannot share a call
        _prepare(_cond(5, 3, pooled=True), mask=False, pooled=True)
    two = _prepare(_cond(5, 3, pooled=True), batch_cfg=False, mask=False, pooled=True)
    assert two.conditional.pooled.shape == (2, 3)


def test_predict_velocity_refuses_inputs_prepared_for_something_else(qwen_image_rl_pipe):
    pipe = qwen_image_rl_pipe
    cond, _ = _training_batch(pipe, PROMPTS[:2], ["", ""])
    latents = _latents(pipe, 2)
    inputs = pipe.prepare_model_inputs(cond, GUIDANCE)
    with pytest.raises(ValueError, match="prepared with guidance"):
        pipe.predict_velocity(latents, 0.5, inputs, 1.0, SIZE, SIZE)
    with pytest.raises(ValueError, match="batch_cfg=False"):
        pipe.predict_velocity(latents, 0.5, inputs, GUIDANCE, SIZE, SIZE, batch_cfg=False)
    with pytest.raises(ValueError, match="latents have 1 rows"):
        pipe.predict_velocity(latents[:1], 0.5, inputs, GUIDANCE, SIZE, SIZE)
    with pytest.raises(TypeError, match="Conditioning or ModelInputs"):
        pipe.predict_velocity(latents, 0.5, cond.as_fields(), GUIDANCE, SIZE, SIZE)


# ----------------------------------------------------------------------------------------- the switch
def test_batch_cfg_is_rollout_wide_not_per_row():
    """One config key switches the rollout and the actor's recomputation; a row may not set it (the actor
    recomputes with the rollout-wide layout)."""
    from helpers import rollout_config

    from verl_omni.agent_loop.diffusion_agent_loop import ROW_OVERRIDABLE, _row_params

    rollout = rollout_config(pipeline={"batch_cfg": False, "true_cfg_scale": 3.0})
    assert rollout.sampling_params().batch_cfg is False and rollout.sampling_params(validate=True).batch_cfg is False
    assert rollout_config().sampling_params().batch_cfg == "auto"
    with pytest.raises(ValueError, match=r"actor_rollout_ref.rollout.pipeline.batch_cfg='no' must be true, false"):
        rollout_config(pipeline={"batch_cfg": "no"})
    assert "batch_cfg" not in ROW_OVERRIDABLE
    with pytest.raises(ValueError, match=r"\['batch_cfg'\] cannot be set per row"):
        _row_params(rollout.sampling_params(), {"sampling_params": {"batch_cfg": True}})
