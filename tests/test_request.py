"""The one validation of a generate request (``rollout/request.py::validate_request``), without Ray or an engine.

These checks used to live in the pipelines; the server now runs them once, before the engine is touched, against
the model's own limits (``ModelLimits.of`` the tiny pipeline directories) and the configured ``RequestLimits``.
The server-level limits (N, pixels, steps, prompt length) are covered through the server in tests/test_server.py.
"""

import pytest

from verl_omni.config.rollout import RequestLimits
from verl_omni.config.sampling import DiffusionSamplingParams
from verl_omni.pipelines import get_pipeline_class
from verl_omni.rollout.request import GenerateRequest, ModelLimits, validate_request

PROMPT = "a red cat"
BASE = dict(num_inference_steps=4, height=64, width=64, noise_level=0.7, sde_window_size=2, window_start=1)


@pytest.fixture(params=["qwen_image", "sd3"])
def model_limits(request):
    path = request.getfixturevalue(f"tiny_{request.param}_dir")
    limits = ModelLimits.of(path, request.param)
    assert limits.vae_scale_factor == 8  # both tiny VAEs downsample 8x: image sides are multiples of 16
    assert limits.max_sequence_length == get_pipeline_class(request.param).MAX_SEQUENCE_LENGTH
    return limits


def _validate(model_limits, prompt=PROMPT, seeds=(1,), **changes):
    seeds = list(seeds) if isinstance(seeds, tuple) else seeds
    n = len(seeds) if isinstance(seeds, list) and seeds else 1
    return validate_request(prompt, n, seeds, {**BASE, **changes}, RequestLimits(), model_limits)


def test_a_good_request_passes_with_plain_int_seeds(model_limits):
    request = _validate(model_limits, seeds=[3, 4])
    assert isinstance(request, GenerateRequest) and request.prompt == PROMPT and request.seeds == [3, 4]
    assert request.params == DiffusionSamplingParams(**BASE) and request.params.batch_cfg == "auto"


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
        ({"batch_cfg": "yes"}, "batch_cfg"),
        ({"steps": 4}, "steps"),
    ],
)
def test_bad_params_are_refused_naming_the_field(model_limits, changes, field):
    with pytest.raises(ValueError, match=field):
        _validate(model_limits, **changes)


def test_max_sequence_length_is_the_pipelines_own_limit(model_limits):
    """The limit is the model's (1024 text tokens for Qwen-Image, 512 T5 tokens for SD3), not a shared constant."""
    _validate(model_limits, max_sequence_length=model_limits.max_sequence_length)
    with pytest.raises(
        ValueError,
        match=f"max_sequence_length={model_limits.max_sequence_length + 1} must be <= "
        f"{model_limits.max_sequence_length}",
    ):
        _validate(model_limits, max_sequence_length=model_limits.max_sequence_length + 1)


def test_bad_requests_are_refused(model_limits):
    with pytest.raises(ValueError, match="seeds"):
        _validate(model_limits, seeds=[])
    with pytest.raises(ValueError, match="seeds must be ints"):
        _validate(model_limits, seeds=[1.5])
    with pytest.raises(ValueError, match="seeds must be ints"):
        _validate(model_limits, seeds=[True])
    with pytest.raises(ValueError, match="prompt must be a str"):
        _validate(model_limits, prompt=["a", "b"])
    with pytest.raises(ValueError, match="prompt is empty"):
        _validate(model_limits, prompt="  ")


def test_the_images_pixels_steps_budget_holds_at_its_limit_and_refuses_one_more(model_limits):
    """limits.max_images_pixels_steps bounds N x height x width x (steps + 1), what no single limit bounds."""
    params = {**BASE, "height": 64, "width": 64, "num_inference_steps": 4}
    at = RequestLimits(max_images_pixels_steps=3 * 64 * 64 * 5)
    request = validate_request(PROMPT, 3, [1, 2, 3], params, at, model_limits)
    assert len(request.seeds) == 3
    with pytest.raises(
        ValueError,
        match=r"num_outputs_per_prompt x height x width x \(num_inference_steps \+ 1\) = 4 x 64 x 64 x 5 = 81920; "
        r"the limit is 61440 \(actor_rollout_ref.rollout.limits.max_images_pixels_steps\)",
    ):
        validate_request(PROMPT, 4, [1, 2, 3, 4], params, at, model_limits)
    # the default refuses the largest request each other limit allows on its own
    big = {**BASE, "height": 1024, "width": 1024, "num_inference_steps": 2, "window_start": 0}
    with pytest.raises(ValueError, match="64 x 1024 x 1024 x 3 = 201326592; the limit is 100000000"):
        validate_request(PROMPT, 64, list(range(64)), big, RequestLimits(), model_limits)


@pytest.mark.parametrize("prompt", ["\u200b", "\u200b \u200c\u200d", "\ufeff\u2060", "\t\n\x00", "\u3000"])
def test_a_prompt_with_nothing_to_draw_is_empty(model_limits, prompt):
    with pytest.raises(ValueError, match="prompt is empty"):
        _validate(model_limits, prompt=prompt)


def test_a_prompt_with_a_visible_character_among_zero_width_ones_is_served(model_limits):
    assert _validate(model_limits, prompt="\u200bA\u200b").prompt == "\u200bA\u200b"


@pytest.mark.parametrize(
    "sampling_params, match",
    [
        ([4, 64, 64], "sampling_params must be an object of named fields .* got list"),
        ("steps=4", "sampling_params must be an object of named fields .* got str"),
        ({**BASE, "noise_level": float("nan")}, r"noise_level=nan must be a finite number in \[0, 10.0\]"),
        ({**BASE, "noise_level": 10.5}, r"noise_level=10.5 must be a finite number in \[0, 10.0\] for sde_type='sde'"),
        ({**BASE, "sde_type": "cps", "noise_level": 1.01}, r"in \[0, 1.0\] for sde_type='cps'"),
        ({**BASE, "guidance_scale": float("inf")}, "guidance_scale=inf must be a finite number"),
        ({**BASE, "sde_window_range": 3}, "sde_window_range=3 must be a pair of ints"),
        ({**BASE, "sde_window_range": [0.5, 1]}, r"sde_window_range=\(0.5, 1\) must be a pair of ints"),
        ({**BASE, "sde_type": ["sde"]}, r"sde_type=\['sde'\] is not one of"),
    ],
)
def test_wrong_types_and_out_of_range_values_name_the_field(model_limits, sampling_params, match):
    with pytest.raises(ValueError, match=match):
        validate_request(PROMPT, 1, [1], sampling_params, RequestLimits(), model_limits)


def test_the_noise_level_edges_are_served(model_limits):
    assert _validate(model_limits, noise_level=10.0).params.noise_level == 10.0
    assert _validate(model_limits, noise_level=1.0, sde_type="cps").params.noise_level == 1.0
    assert _validate(model_limits, noise_level=0).params.noise_level == 0


@pytest.mark.parametrize("seed", [2**63, -(2**63) - 1, 2**70])
def test_seeds_outside_int64_are_refused_naming_seeds(model_limits, seed):
    with pytest.raises(ValueError, match=rf"seeds \[{seed}\] do not fit a 64-bit signed int"):
        _validate(model_limits, seeds=[seed])
