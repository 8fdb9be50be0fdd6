"""The full fine-tuning memory tables of the README and docs/architecture.md are what scripts/full_ft_memory_table.py
prints from the start-up check's plan, and that plan, computed from a stand-in built on the meta device, is the one
the start-up check computes from a pipeline directory."""

import importlib.util
import os
import sys

import pytest
from helpers import compose_preset

from verl_omni.config.trainer import FlowGRPOConfig
from verl_omni.workers.full_weights import HOST_STEP_PIECE, PipelineShape, plan_full_weights_memory

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_script():
    path = os.path.join(REPO, "scripts", "full_ft_memory_table.py")
    spec = importlib.util.spec_from_file_location("full_ft_memory_table", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses resolve their annotations through it
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def script():
    return _load_script()


@pytest.fixture(scope="module")
def all_plans(script):
    return script.all_recipe_plans()


def test_the_readme_table_is_the_scripts_output(script, all_plans):
    table = script.readme_table(all_plans)
    readme = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
    assert table in readme, f"README.md's table is stale: python scripts/full_ft_memory_table.py --write\n{table}"


def test_the_architecture_table_is_the_scripts_output(script, all_plans):
    table = script.full_table(all_plans)
    doc = open(os.path.join(REPO, "docs", "architecture.md"), encoding="utf-8").read()
    assert table in doc, "docs/architecture.md's table is stale: python scripts/full_ft_memory_table.py --write"


def test_the_tables_plan_the_published_checkpoints_at_their_recipe_settings(script, all_plans):
    # the published transformer sizes: SD3.5-Medium 2.47B (with its positional-embedding buffer), FLUX.1-dev 11.9B,
    # Qwen-Image 20.4B
    sizes = {model: round(plans[1, False].num_params / 1e9, 2) for model, plans in all_plans.items()}
    assert sizes == {"SD3.5-Medium": 2.47, "FLUX.1-dev": 11.9, "Qwen-Image": 20.43}
    sd3 = all_plans["SD3.5-Medium"]
    # the SD3.5 full recipe keeps flow_grpo's policy EMA (one float32 copy, sharded over the GPUs); Qwen-Image's
    # recipe has none
    assert sd3[1, False].sharded_copies == 4 * sd3[1, False].num_params == 2 * sd3[2, False].sharded_copies
    assert all_plans["Qwen-Image"][1, False].sharded_copies == 0
    # more GPUs shrink only the shards; the offload takes the master, its float32 gradient and the AdamW shards off
    # the GPU, keeps the gradient shard there in the weights' dtype (during the update only, as the float32 one
    # without the offload), and holds the master, the moments and one piece's float32 gradient in host memory (its
    # step goes piece by piece)
    for model, plans in all_plans.items():
        totals = [plans[n, False].device_total for n in script.GPUS]
        assert totals == sorted(totals, reverse=True), model
        for n in script.GPUS:
            on, off = plans[n, True], plans[n, False]
            shard = off.master // 4
            assert on.host_total == on.master + on.optimizer + on.sharded_copies > 0 and off.host_total == 0
            assert (off.grads, on.grads) == (4 * shard, 2 * shard)
            shards = off.master + off.optimizer + off.sharded_copies
            assert off.update_total - on.update_total == shards + off.grads - on.grads
            assert off.rollout_total - on.rollout_total == shards
            assert on.master == 4 * shard + 4 * min(shard, HOST_STEP_PIECE)


def test_a_stand_ins_meta_shape_is_what_the_start_up_check_reads_from_its_directory(script, tiny_sd3_dir):
    """The table's parameter counts (a meta-device build's ``stored_counts``) and the start-up check's (the
    directory's safetensors headers) agree, SD3's persistent positional-embedding buffer included."""
    from diffusers import StableDiffusion3Pipeline

    from verl_omni.models.standins import stored_counts
    from verl_omni.trainer.ray_trainer import full_fine_tuning_plan_inputs

    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_dir)
    components = {name: c for name, c in pipe.components.items() if c is not None}
    from_modules = PipelineShape(
        counts=stored_counts(components),
        transformer=dict(pipe.transformer.config),
        vae={**pipe.vae.config, "_class_name": type(pipe.vae).__name__},
    )
    from_dir = PipelineShape.from_model_dir(tiny_sd3_dir)
    assert from_modules.counts == from_dir.counts
    cfg = FlowGRPOConfig.from_omega(
        compose_preset("sd3_5_medium_flowgrpo_ocr_full", [f"actor_rollout_ref.model.path={tiny_sd3_dir}"])
    )
    a, a_kwargs = full_fine_tuning_plan_inputs(cfg, from_modules)
    b, b_kwargs = full_fine_tuning_plan_inputs(cfg, from_dir)
    assert (a, a_kwargs) == (b, b_kwargs)
    assert plan_full_weights_memory(a, 2, True, **a_kwargs) == plan_full_weights_memory(b, 2, True, **b_kwargs)


@pytest.mark.parametrize(
    "setting, device, offloaded",
    [(True, "cuda", True), ("auto", "cuda", True), ("auto", "cpu", False), (False, "cuda", False)],
)
def test_the_plan_counts_the_text_encoders_off_the_gpu_where_text_encoder_offload_is_on(
    setting, device, offloaded, tiny_sd3_dir
):
    """SD3's three text encoders leave the GPU for the update with ``model.text_encoder_offload`` (``auto``: where
    the actor trains on a GPU); the CLIP, OpenCLIP and T5 encoders' bytes, read from the directory."""
    from verl_omni.trainer.ray_trainer import full_fine_tuning_plan_inputs
    from verl_omni.workers.full_weights import stored_parameter_counts

    overrides = [
        f"actor_rollout_ref.model.path={tiny_sd3_dir}",
        f"actor_rollout_ref.model.text_encoder_offload={str(setting).lower()}",
        f"actor_rollout_ref.actor.device={device}",
        f"actor_rollout_ref.rollout.device={device}",
    ]
    cfg = FlowGRPOConfig.from_omega(compose_preset("sd3_5_medium_flowgrpo_ocr_full", overrides))
    _, kwargs = full_fine_tuning_plan_inputs(cfg, PipelineShape.from_model_dir(tiny_sd3_dir))
    counts = stored_parameter_counts(tiny_sd3_dir)
    encoders = sum(counts[f"text_encoder{suffix}"] for suffix in ("", "_2", "_3")) * 2  # bf16
    assert kwargs["offloaded_frozen_bytes"] == (encoders if offloaded else 0)
    assert 0 < encoders < kwargs["frozen_bytes"]  # the VAE stays


@pytest.mark.parametrize("algorithm", ["flowgrpo", "mixgrpo", "diffusion_nft"])
@pytest.mark.parametrize("ema", [False, True])
def test_the_plan_counts_the_weight_copies_the_policy_ema_and_the_algorithm_keep(algorithm, ema, tiny_sd3_dir):
    """With full fine-tuning each copy of the weights kept on the actor rank is a float32 shard like the master's:
    the policy EMA's, and those the algorithm declares (DiffusionNFT's old policy); FlowGRPO and MixGRPO keep none."""
    from verl_omni.trainer.ray_trainer import full_fine_tuning_plan_inputs

    overrides = [
        f"actor_rollout_ref.model.path={tiny_sd3_dir}",
        f"algorithm.name={algorithm}",
        f"actor_rollout_ref.actor.ema.enable={str(ema).lower()}",
    ]
    if algorithm == "diffusion_nft":  # CFG-free, as DiffusionNFT's start-up check asks
        overrides.append("actor_rollout_ref.rollout.pipeline.true_cfg_scale=1.0")
    cfg = FlowGRPOConfig.from_omega(compose_preset("sd3_5_medium_flowgrpo_ocr_full", overrides))
    num_params, kwargs = full_fine_tuning_plan_inputs(cfg, PipelineShape.from_model_dir(tiny_sd3_dir))
    assert kwargs["sharded_copies"] == int(ema) + (algorithm == "diffusion_nft")
    one = plan_full_weights_memory(num_params, 1, False, **{**kwargs, "sharded_copies": 1})
    assert plan_full_weights_memory(num_params, 1, False, **kwargs).sharded_copies == kwargs["sharded_copies"] * (
        one.sharded_copies
    )
