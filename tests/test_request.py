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
