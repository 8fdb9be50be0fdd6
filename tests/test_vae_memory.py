"""The rollout's VAE decode in the full fine-tuning memory plan: ``LiveBytes`` counts what a decode keeps alive, and
``decode_activation_bytes`` counts it on fake tensors built from a model directory's vae/config.json; the fake count
must match the count of the same decode of the real tiny VAE on real tensors."""

import json
import logging
import os

import pytest
import torch

from verl_omni.models.vae_memory import LiveBytes, decode_activation_bytes, decode_latent_shape
from verl_omni.pipelines import get_pipeline_class
from verl_omni.pipelines.loading import load_rl_pipeline


def _vae_config(model_dir):
    with open(os.path.join(model_dir, "vae", "config.json")) as f:
        return json.load(f)


@pytest.mark.parametrize(
    ("family", "height", "width", "frames"), [("sd3", 64, 48, 1), ("qwen_image", 64, 64, 1), ("wan", 32, 48, 5)]
)
def test_the_fake_count_of_a_decode_is_the_real_decodes(family, height, width, frames, request):
    model_dir = request.getfixturevalue(f"tiny_{family}_dir")
    config = _vae_config(model_dir)
    vae = load_rl_pipeline(model_dir, family, "float32").vae
    decode = get_pipeline_class(family).vae_decode
    factor = 8
    shape = decode_latent_shape(config, height, width, factor, frames)
    assert shape[0] == vae.config.get("latent_channels", vae.config.get("z_dim"))
    counts = []
    for rows in (1, 3):
        with torch.no_grad(), LiveBytes() as live:
            media = decode(vae, torch.randn(rows, *shape))
        assert media.shape[0] == rows and media.shape[-2:] == (height, width)  # the decode the plan counts ran
        fake = decode_activation_bytes(config, rows, height, width, factor, frames, torch.float32, decode=decode)
        # Within 1%: a CPU kernel may return a small tensor its fake (meta) counterpart does not, e.g. 0.2% at
        # these tiny sizes.
        assert live.peak > 0 and abs(fake - live.peak) <= 0.01 * live.peak, (fake, live.peak)
        counts.append(fake)
    assert counts[1] > counts[0]  # more rows, more activations


def test_a_config_naming_no_diffusers_vae_plans_no_decode_and_says_so(caplog):
    with caplog.at_level(logging.WARNING, logger="verl_omni.models.vae_memory"):
        config = {"_class_name": "NoSuchVAE", "latent_channels": 4}
        assert decode_activation_bytes(config, 2, 64, 64, 8, decode=get_pipeline_class("sd3").vae_decode) == 0
    assert "leaves out the rollout's VAE decode" in caplog.text


def test_the_start_up_plan_counts_a_decode_of_vae_decode_batch_rows(tiny_sd3_dir):
    """``full_fine_tuning_plan_inputs``: one decode of the group's n rows, or of ``vae_decode_batch`` of them."""
    from helpers import compose_preset

    from verl_omni.config.trainer import FlowGRPOConfig
    from verl_omni.trainer.ray_trainer import full_fine_tuning_plan_inputs
    from verl_omni.workers.full_weights import PipelineShape

    shape = PipelineShape.from_model_dir(tiny_sd3_dir)

    def decode_bytes(**overrides):
        settings = [f"actor_rollout_ref.model.path={tiny_sd3_dir}", *(f"{k}={v}" for k, v in overrides.items())]
        cfg = FlowGRPOConfig.from_omega(compose_preset("sd3_5_medium_flowgrpo_ocr_full", settings))
        return full_fine_tuning_plan_inputs(cfg, shape)[1]["decode_bytes"]

    p = "actor_rollout_ref.rollout.pipeline"
    eight = decode_bytes()  # the preset: 8 of the group's 24 rows a call
    whole = decode_bytes(**{f"{p}.vae_decode_batch": 0})
    config, decode = _vae_config(tiny_sd3_dir), get_pipeline_class("sd3").vae_decode
    one = decode_activation_bytes(config, 1, 512, 512, 8, decode=decode)
    assert eight == decode_activation_bytes(config, 8, 512, 512, 8, decode=decode) and whole > eight > one > 0
    assert decode_bytes(**{f"{p}.vae_decode_batch": 64}) == whole  # never more rows than the group's
    # A validation group larger than the training group decodes more rows at once: counted where the run validates.
    small = {"actor_rollout_ref.rollout.n": 4, "data.train_batch_size": 12}  # groups of 4, 48 images a step
    four = decode_bytes(**small)
    assert four == decode_activation_bytes(config, 4, 512, 512, 8, decode=decode) < eight
    v = "actor_rollout_ref.rollout.val_kwargs.n"
    assert decode_bytes(**small, **{v: 8}) == eight
    assert decode_bytes(**small, **{v: 8, "trainer.test_freq": -1}) == four
