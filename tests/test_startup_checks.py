"""Start-up refuses, before Ray starts, what would fail later: a model the configured pipeline cannot load, and
requests (training or validation) that the servers' request limits would refuse at the first rollout."""

import glob
import os

import pytest
import ray
from helpers import PRESETS, compose_preset, make_config
from omegaconf import OmegaConf

from verl_omni.config.model import ModelConfig
from verl_omni.config.trainer import FlowGRPOConfig
from verl_omni.pipelines.loading import check_pipeline_matches, load_rl_pipeline
from verl_omni.trainer.ray_trainer import FlowGRPOTrainer

REPO = os.path.join(os.path.dirname(__file__), "..")
R = "actor_rollout_ref.rollout"
LIMITS = f"{R}.limits"


# ---------------------------------------------------------------- the model and the pipeline


def test_a_tiny_model_of_another_family_than_the_pipeline_is_refused_naming_both_keys():
    with pytest.raises(
        ValueError,
        match=r"actor_rollout_ref.model.path='tiny:sd3' is a sd3 model but actor_rollout_ref.model.pipeline="
        r"'qwen_image': set actor_rollout_ref.model.pipeline=sd3 or auto \(allowed pipelines: .*qwen_image, .*sd3",
    ):
        FlowGRPOTrainer(
            make_config({"actor_rollout_ref.model.path": "tiny:sd3", "actor_rollout_ref.model.pipeline": "qwen_image"})
        )
    with pytest.raises(
        ValueError,
        match=r"'tiny:no_such_family': no tiny model of that name; allowed: "
        r".*tiny:flux, .*tiny:qwen_image, .*tiny:sd3, tiny:wan, tiny:wan2_2_t2v, tiny:wan2_2_ti2v",
    ):
        ModelConfig(path="tiny:no_such_family")
    assert ModelConfig(path="tiny:sd3", pipeline="sd3").pipeline == "sd3"
    assert ModelConfig(path="tiny:sd3").pipeline == "sd3"  # auto: the tiny model's family
    assert ModelConfig(path="tiny:wan2_2_ti2v").pipeline == "wan"  # a family's tiny variant: that family


def test_a_model_directory_of_another_pipeline_is_refused_before_ray_starts(tiny_sd3_dir, tmp_path, monkeypatch):
    cfg = make_config(
        {
            "actor_rollout_ref.model.path": tiny_sd3_dir,
            "actor_rollout_ref.model.pipeline": "qwen_image",
            "trainer.default_local_dir": str(tmp_path),
        }
    )
    trainer = FlowGRPOTrainer(cfg)

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started before the model check")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", no_ray)
    with pytest.raises(
        ValueError,
        match=r"model.path=.*sd3.* holds a StableDiffusion3Pipeline \(model_index.json _class_name\), but "
        r"actor_rollout_ref.model.pipeline='qwen_image' loads QwenImagePipeline: set "
        r"actor_rollout_ref.model.pipeline=sd3 \(or auto\) \(allowed pipelines: .*qwen_image for QwenImagePipeline, "
        r".*sd3 for StableDiffusion3Pipeline",
    ):
        trainer.init()


def test_engines_and_actors_loading_a_mismatched_model_get_the_same_error(tiny_sd3_dir, tiny_qwen_image_dir):
    with pytest.raises(
        ValueError, match="holds a StableDiffusion3Pipeline .* set actor_rollout_ref.model.pipeline=sd3"
    ):
        load_rl_pipeline(tiny_sd3_dir, "qwen_image", "float32")
    with pytest.raises(
        ValueError, match="holds a QwenImagePipeline .* set actor_rollout_ref.model.pipeline=qwen_image"
    ):
        check_pipeline_matches(tiny_qwen_image_dir, "sd3")
    check_pipeline_matches(tiny_qwen_image_dir, "qwen_image")
    check_pipeline_matches(tiny_sd3_dir, "sd3")


# ---------------------------------------------------------------- requests against the request limits


def _config(**overrides):
    return FlowGRPOConfig.from_omega(make_config({"actor_rollout_ref.model.path": "tiny:qwen_image", **overrides}))


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({f"{R}.n": 100}, rf"{R}.n=100 must be in \[1, 64\] \({LIMITS}.max_num_outputs_per_prompt\)"),
        (
            {f"{R}.pipeline.num_inference_steps": 200},
            rf"{R}.pipeline.num_inference_steps=200; the limit is 100 \({LIMITS}.max_inference_steps\)",
        ),
        (
            {f"{R}.pipeline.height": 2048, f"{R}.pipeline.width": 2048},
            rf"{R}.pipeline.height x {R}.pipeline.width = 2048 x 2048 = 4194304 pixels; the limit is 1048576 "
            rf"\({LIMITS}.max_pixels\)",
        ),
        (
            {f"{R}.n": 64, f"{R}.pipeline.height": 1024, f"{R}.pipeline.width": 1024},
            rf"{R}.n x .* = 64 x 1024 x 1024 x 11 = 738197504; the limit is 100000000 "
            rf"\({LIMITS}.max_images_pixels_steps\)",
        ),
        ({f"{R}.val_kwargs.n": 65}, rf"{R}.val_kwargs.n=65 must be in \[1, 64\] \({LIMITS}.max_num_outputs_per_prompt"),
        (
            {f"{R}.val_kwargs.num_inference_steps": 101},
            rf"{R}.val_kwargs.num_inference_steps=101; the limit is 100 \({LIMITS}.max_inference_steps\)",
        ),
        (
            {f"{R}.n": 8, f"{LIMITS}.max_num_outputs_per_prompt": 4},
            rf"{R}.n=8 must be in \[1, 4\] \({LIMITS}.max_num_outputs_per_prompt\)",
        ),
    ],
)
def test_a_config_whose_requests_the_limits_would_refuse_fails_at_start_naming_both_keys(overrides, match):
    with pytest.raises(ValueError, match=match):
        _config(**overrides)
    with pytest.raises(ValueError, match=match):  # the trainer parses its config first: no Ray, no engine yet
        FlowGRPOTrainer(make_config({"actor_rollout_ref.model.path": "tiny:qwen_image", **overrides}))


def test_raising_the_limit_or_sending_one_image_per_request_lets_the_config_through():
    assert _config(**{f"{R}.n": 100, f"{LIMITS}.max_num_outputs_per_prompt": 128}).actor_rollout_ref.rollout.n == 100
    unbatched = _config(**{f"{R}.n": 100, f"{R}.enable_batched_diffusion": False})  # 100 requests of one image
    assert unbatched.actor_rollout_ref.rollout.n == 100
    big = {f"{R}.n": 64, f"{R}.pipeline.height": 1024, f"{R}.pipeline.width": 1024}
    assert _config(**big, **{f"{LIMITS}.max_images_pixels_steps": 64 * 1024 * 1024 * 11}).actor_rollout_ref


def test_seeds_outside_int64_are_refused_in_the_config():
    with pytest.raises(
        ValueError, match=rf"{R}.seed=1180591620717411303424 must be an int in \[-2\*\*63, 2\*\*63 - 1\]"
    ):
        _config(**{f"{R}.seed": 2**70})


@pytest.mark.parametrize(
    "preset",
    sorted(os.path.basename(p)[: -len(".yaml")] for p in glob.glob(os.path.join(PRESETS, "*.yaml"))),
)
def test_the_shipped_recipes_fit_the_default_request_limits(preset):
    model = compose_preset(preset).actor_rollout_ref.model
    # a recipe's required model path, given: the tiny model of its family; a preset with a path keeps it
    overrides = [f"actor_rollout_ref.model.path=tiny:{model.pipeline}"] if OmegaConf.is_missing(model, "path") else []
    cfg = compose_preset(preset, overrides)
    rollout = FlowGRPOConfig.from_omega(cfg).actor_rollout_ref.rollout  # raises if a request would be refused
    # groups of >= 8 images (flow_grpo's video recipe: groups of 4 clips of 33 frames)
    assert rollout.n >= (4 if model.pipeline == "wan" else 8) and rollout.pipeline.num_inference_steps >= 6


def test_a_data_row_of_zero_width_characters_is_an_empty_prompt(tmp_path):
    import pandas as pd

    from verl_omni.trainer.data import PromptDataset

    path = tmp_path / "d.parquet"
    pd.DataFrame({"prompt": ['a sign that says "open"', "\u200b\u200b \ufeff"]}).to_parquet(path)
    with pytest.raises(ValueError, match=r"row 1: empty prompt \(only whitespace, zero-width or control characters\)"):
        PromptDataset(str(path))


def test_a_negative_vae_decode_batch_fails_at_start_naming_the_key():
    with pytest.raises(ValueError, match=rf"{R}.pipeline.vae_decode_batch=-2 must be an int >= 0"):
        _config(**{f"{R}.pipeline.vae_decode_batch": -2})
    params = _config(**{f"{R}.pipeline.vae_decode_batch": 8}).actor_rollout_ref.rollout.sampling_params()
    assert params.vae_decode_batch == 8  # what every training request carries to the pipeline
