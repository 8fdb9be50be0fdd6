"""The user-facing docs and presets stay true to the code: every config key has a row in docs/configuration.md, the
README stays short and names only files that exist, and the recipe presets in configs/ compose with Hydra into a
valid config (the CPU demo's preset into exactly the config its script passed as overrides before)."""

import dataclasses
import glob
import os
import re

import pytest
from helpers import CONFIG, PRESETS, compose_preset
from omegaconf import OmegaConf

from verl_omni.config.sampling import DiffusionSamplingParams
from verl_omni.config.trainer import FlowGRPOConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGURATION_MD = os.path.join(REPO, "docs", "configuration.md")
README = os.path.join(REPO, "README.md")
PACKAGED = os.path.dirname(os.path.abspath(CONFIG))
SAMPLING_PREFIX = "sampling_params"  # a server request's sampling_params (DiffusionSamplingParams)


def _dataclass_keys(cls, prefix=""):
    """Every dotted key of a config dataclass tree (a nested section recurses; its own name is not a key)."""
    for f in dataclasses.fields(cls):
        if f.name == "_target_" or not f.init:
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            yield from _dataclass_keys(type(default), f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}"


def config_keys() -> set[str]:
    return set(_dataclass_keys(FlowGRPOConfig)) | set(_dataclass_keys(DiffusionSamplingParams, SAMPLING_PREFIX + "."))


def documented_keys() -> set[str]:
    """The key of every table row of docs/configuration.md: the row's first cell, in backticks."""
    keys = set()
    for line in open(CONFIGURATION_MD, encoding="utf-8"):
        match = re.match(r"\|\s*`([A-Za-z_][A-Za-z0-9_.]*)`\s*\|", line)
        if match:
            keys.add(match.group(1))
    return keys


def test_the_key_walk_finds_nested_sections_and_their_leaves():
    keys = config_keys()
    assert "actor_rollout_ref.rollout.algo.noise_level" in keys and "trainer.nan_policy" in keys
    assert "actor_rollout_ref.rollout.algo" not in keys  # a section is not a key of its own
    assert "sampling_params.sde_window_size" in keys and len(keys) > 90


def test_every_config_key_has_a_row_in_configuration_md():
    missing = sorted(config_keys() - documented_keys())
    assert not missing, (
        f"docs/configuration.md has no row for {len(missing)} config key(s): {missing}. Add one row per key: "
        "| `dotted.key` | default | meaning |"
    )


def test_configuration_md_documents_no_key_the_config_lacks():
    """A renamed or removed key leaves no stale row (the sub-keys of a plain dict field, such as
    reward.custom_reward_function.path, belong to their documented field)."""
    keys = config_keys()
    stale = sorted(k for k in documented_keys() if k not in keys and not any(k.startswith(p + ".") for p in keys))
    assert not stale, f"docs/configuration.md documents keys the config does not have: {stale}"


def test_readme_is_short():
    with open(README, encoding="utf-8") as f:
        lines = f.read().splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines; keep it <= 250 (details go to docs/)"


def test_every_repository_path_the_docs_name_exists():
    """Paths in backticks or links in the README and docs/*.md (examples/, configs/, docs/, scripts/, benchmarks/,
    tests/, verl_omni/) exist, so a command copied from them finds its files."""
    roots = "|".join(("examples/", "configs/", "docs/", "scripts/", "benchmarks/", "tests/", "verl_omni/"))
    pattern = re.compile(rf"[`(]((?:{roots})[A-Za-z0-9_./-]*[A-Za-z0-9_])")
    missing = []
    for doc in [README, *glob.glob(os.path.join(REPO, "docs", "*.md")), os.path.join(REPO, "CHANGELOG.md")]:
        text = open(doc, encoding="utf-8").read()
        for path in set(pattern.findall(text)):
            if "*" not in path and "<" not in path and not os.path.exists(os.path.join(REPO, path)):
                missing.append(f"{os.path.relpath(doc, REPO)}: {path}")
    assert not missing, missing


# ------------------------------------------------------------------------------------------------------ presets
def _presets():
    return sorted(os.path.splitext(os.path.basename(p))[0] for p in glob.glob(os.path.join(PRESETS, "*.yaml")))


def test_there_is_a_preset_per_shipped_recipe():
    assert {
        "qwen_image_flowgrpo_tiny_cpu",
        "qwen_image_flowgrpo_ocr_lora",
        "qwen_image_mixgrpo_ocr_lora",
        "qwen_image_diffusion_nft_ocr_lora",
        "flux_flowgrpo_ocr_lora",
        "sd3_5_medium_flowgrpo_ocr_lora",
        "sd3_5_medium_flowgrpo_ocr_full",
        "qwen_image_flowgrpo_ocr_full",
        "wan2_1_t2v_1_3b_flowgrpo_lora",
        "wan2_2_ti2v_5b_flowgrpo_lora",
    } <= set(_presets())


@pytest.mark.parametrize("name", _presets())
def test_each_preset_composes_over_the_packaged_config_into_a_valid_config(name):
    preset = compose_preset(name)
    overrides = []
    if OmegaConf.is_missing(preset.actor_rollout_ref.model, "path"):
        # the recipe's required key, given: the tiny model of its family
        overrides.append(f"actor_rollout_ref.model.path=tiny:{preset.actor_rollout_ref.model.pipeline}")
    preset = compose_preset(name, overrides)
    packaged = compose_preset("flowgrpo_trainer", config_dir=PACKAGED)
    assert set(_leaves(preset)) == set(_leaves(packaged)), "a preset sets a key the packaged config does not have"
    parsed = FlowGRPOConfig.from_omega(preset)
    assert parsed.actor_rollout_ref.rollout.n >= 2


def _leaves(cfg):
    def walk(tree, prefix):
        for key, value in tree.items():
            if isinstance(value, dict) and value:
                yield from walk(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}"

    return list(walk(OmegaConf.to_container(cfg, resolve=False), ""))


# The CPU demo's overrides as examples/flowgrpo_trainer/qwen_image/run_qwen_image_tiny_cpu.sh passed them before
# the preset held them (OUT_DIR unset): the preset must give the same config, so the README's figures still hold.
DEMO_OVERRIDES_BEFORE_THE_PRESET = [
    "data.train_files=outputs/tiny_cpu_demo/data/train.parquet",
    "data.val_files=outputs/tiny_cpu_demo/data/test.parquet",
    "data.train_batch_size=2",
    "data.val_batch_size=4",
    "actor_rollout_ref.model.path=tiny:qwen_image",
    "actor_rollout_ref.model.lora_rank=4",
    "actor_rollout_ref.model.lora_alpha=8",
    "actor_rollout_ref.model.target_modules=[to_out.0,img_mlp.net.2,norm_out.linear,proj_out]",
    "actor_rollout_ref.actor.optim.lr=2e-2",
    "actor_rollout_ref.rollout.name=diffusers",
    "actor_rollout_ref.rollout.n=8",
    "actor_rollout_ref.rollout.pipeline.num_inference_steps=6",
    "actor_rollout_ref.rollout.pipeline.height=64",
    "actor_rollout_ref.rollout.pipeline.width=64",
    "actor_rollout_ref.rollout.pipeline.max_sequence_length=128",
    "actor_rollout_ref.rollout.algo.noise_level=1.5",
    "actor_rollout_ref.rollout.algo.sde_window_size=2",
    "actor_rollout_ref.rollout.algo.sde_window_range=[0,3]",
    "reward.rewards=[{name: brightness, weight: 1.0}]",
    "trainer.total_training_steps=40",
    "trainer.save_freq=10",
    "trainer.test_freq=20",
    "trainer.default_local_dir=outputs/tiny_cpu_demo/checkpoints",
    "trainer.logger=[console,tensorboard]",
]
# The same for the GPU recipe (run_qwen_image_ocr_lora.sh; its negative_prompt=" " reached Hydra as the empty
# string, which the preset writes out). The data and model paths stay on the script's command line.
GPU_RECIPE_OVERRIDES_BEFORE_THE_PRESET = [
    "data.train_batch_size=4",
    "actor_rollout_ref.model.pipeline=qwen_image",
    "actor_rollout_ref.model.lora_rank=64",
    "actor_rollout_ref.model.lora_alpha=128",
    "actor_rollout_ref.actor.device=cuda",
    "actor_rollout_ref.actor.dtype=bfloat16",
    "actor_rollout_ref.actor.optim.lr=3e-4",
    "actor_rollout_ref.actor.clip_ratio=1e-4",
    "actor_rollout_ref.actor.kl_coef=0.0",
    "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4",
    "actor_rollout_ref.rollout.name=vllm_omni",
    "actor_rollout_ref.rollout.device=cuda",
    "actor_rollout_ref.rollout.dtype=bfloat16",
    "actor_rollout_ref.rollout.n=16",
    "actor_rollout_ref.rollout.enable_batched_diffusion=True",
    "actor_rollout_ref.rollout.gpu_memory_utilization=0.5",
    "actor_rollout_ref.rollout.algo.noise_level=1.2",
    "actor_rollout_ref.rollout.algo.sde_type=sde",
    "actor_rollout_ref.rollout.algo.sde_window_size=2",
    "actor_rollout_ref.rollout.algo.sde_window_range=[0,5]",
    "actor_rollout_ref.rollout.pipeline.num_inference_steps=10",
    "actor_rollout_ref.rollout.pipeline.height=512",
    "actor_rollout_ref.rollout.pipeline.width=512",
    "actor_rollout_ref.rollout.pipeline.true_cfg_scale=4.0",
    "actor_rollout_ref.rollout.pipeline.negative_prompt= ",
    "actor_rollout_ref.rollout.pipeline.max_sequence_length=256",
    "actor_rollout_ref.rollout.val_kwargs.num_inference_steps=20",
    "reward.rewards=[{name: ocr, weight: 1.0}]",
    "trainer.project_name=verl_omni_flowgrpo",
    "trainer.experiment_name=qwen_image_ocr_lora",
    "trainer.logger=[console,tensorboard]",
    "trainer.total_training_steps=300",
    "trainer.save_freq=20",
    "trainer.test_freq=10",
]

# The same for the MixGRPO recipe (run_qwen_image_ocr_lora_mixgrpo.sh with its default ODE_SOLVER=dpmsolver++, which
# also set shift_interval 20) and the DiffusionNFT recipe (run_qwen_image_ocr_lora_nft.sh).
MIXGRPO_RECIPE_OVERRIDES_BEFORE_THE_PRESET = [
    "algorithm.name=mixgrpo",
    "algorithm.mixgrpo.window_size=4",
    "algorithm.mixgrpo.shift_interval=20",
    "algorithm.mixgrpo.stride=1",
    "algorithm.mixgrpo.strategy=progressive",
    "algorithm.mixgrpo.roll_back=True",
    "algorithm.mixgrpo.ode_solver=dpmsolver++",
    "algorithm.mixgrpo.ode_solver_order=2",
    "algorithm.mixgrpo.ode_solver_type=midpoint",
    "algorithm.mixgrpo.ode_compress_ratio=0.4",
    "data.train_batch_size=4",
    "actor_rollout_ref.model.pipeline=qwen_image",
    "actor_rollout_ref.model.lora_rank=64",
    "actor_rollout_ref.model.lora_alpha=128",
    "actor_rollout_ref.actor.device=cuda",
    "actor_rollout_ref.actor.dtype=bfloat16",
    "actor_rollout_ref.actor.optim.lr=3e-4",
    "actor_rollout_ref.actor.clip_ratio=1e-4",
    "actor_rollout_ref.actor.adv_clip_max=5.0",
    "actor_rollout_ref.actor.kl_coef=0.0",
    "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4",
    "actor_rollout_ref.rollout.name=vllm_omni",
    "actor_rollout_ref.rollout.device=cuda",
    "actor_rollout_ref.rollout.dtype=bfloat16",
    "actor_rollout_ref.rollout.n=12",
    "actor_rollout_ref.rollout.enable_batched_diffusion=True",
    "actor_rollout_ref.rollout.gpu_memory_utilization=0.5",
    "actor_rollout_ref.rollout.algo.noise_level=0.7",
    "actor_rollout_ref.rollout.algo.sde_type=sde",
    "actor_rollout_ref.rollout.pipeline.num_inference_steps=10",
    "actor_rollout_ref.rollout.pipeline.height=512",
    "actor_rollout_ref.rollout.pipeline.width=512",
    "actor_rollout_ref.rollout.pipeline.true_cfg_scale=4.0",
    "actor_rollout_ref.rollout.pipeline.negative_prompt= ",
    "actor_rollout_ref.rollout.pipeline.max_sequence_length=256",
    "actor_rollout_ref.rollout.val_kwargs.num_inference_steps=20",
    "reward.rewards=[{name: ocr, weight: 1.0}]",
    "trainer.project_name=verl_omni_mixgrpo",
    "trainer.experiment_name=qwen_image_ocr_lora_mixgrpo",
    "trainer.logger=[console,tensorboard]",
    "trainer.total_training_steps=300",
    "trainer.save_freq=20",
    "trainer.test_freq=10",
]
NFT_RECIPE_OVERRIDES_BEFORE_THE_PRESET = [
    "algorithm.name=diffusion_nft",
    "algorithm.diffusion_nft.beta=0.1",
    "algorithm.diffusion_nft.decay_type=2",
    "algorithm.diffusion_nft.timestep_fraction=0.99",
    "algorithm.diffusion_nft.adv_mode=all",
    "algorithm.diffusion_nft.global_std=true",
    "data.train_batch_size=4",
    "actor_rollout_ref.model.pipeline=qwen_image",
    "actor_rollout_ref.model.lora_rank=64",
    "actor_rollout_ref.model.lora_alpha=128",
    "actor_rollout_ref.actor.device=cuda",
    "actor_rollout_ref.actor.dtype=bfloat16",
    "actor_rollout_ref.actor.optim.lr=3e-4",
    "actor_rollout_ref.actor.optim.weight_decay=1e-4",
    "actor_rollout_ref.actor.kl_coef=1e-4",
    "actor_rollout_ref.actor.adv_clip_max=5.0",
    "actor_rollout_ref.actor.grad_clip=1.0",
    "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4",
    "actor_rollout_ref.rollout.name=vllm_omni",
    "actor_rollout_ref.rollout.device=cuda",
    "actor_rollout_ref.rollout.dtype=bfloat16",
    "actor_rollout_ref.rollout.n=16",
    "actor_rollout_ref.rollout.enable_batched_diffusion=True",
    "actor_rollout_ref.rollout.gpu_memory_utilization=0.5",
    "actor_rollout_ref.rollout.pipeline.num_inference_steps=10",
    "actor_rollout_ref.rollout.pipeline.height=512",
    "actor_rollout_ref.rollout.pipeline.width=512",
    "actor_rollout_ref.rollout.pipeline.true_cfg_scale=1.0",
    "actor_rollout_ref.rollout.pipeline.max_sequence_length=256",
    "actor_rollout_ref.rollout.val_kwargs.num_inference_steps=40",
    "reward.rewards=[{name: ocr, weight: 1.0}]",
    "trainer.project_name=verl_omni_diffusion_nft",
    "trainer.experiment_name=qwen_image_ocr_lora_nft",
    "trainer.logger=[console,tensorboard]",
    "trainer.total_training_steps=300",
    "trainer.save_freq=20",
    "trainer.test_freq=10",
]
GPU_SCRIPT_LINE = [
    "data.train_files=/data/qwenimage_ocr/train.parquet",
    "data.val_files=/data/qwenimage_ocr/test.parquet",
    "actor_rollout_ref.model.path=/models/Qwen-Image",
]


@pytest.mark.parametrize(
    "name, before, on_the_script_line",
    [
        ("qwen_image_flowgrpo_tiny_cpu", DEMO_OVERRIDES_BEFORE_THE_PRESET, []),
        ("qwen_image_flowgrpo_ocr_lora", GPU_RECIPE_OVERRIDES_BEFORE_THE_PRESET, GPU_SCRIPT_LINE),
        ("qwen_image_mixgrpo_ocr_lora", MIXGRPO_RECIPE_OVERRIDES_BEFORE_THE_PRESET, GPU_SCRIPT_LINE),
        ("qwen_image_diffusion_nft_ocr_lora", NFT_RECIPE_OVERRIDES_BEFORE_THE_PRESET, GPU_SCRIPT_LINE),
    ],
)
def test_a_preset_resolves_to_the_config_its_recipe_passed_as_overrides(name, before, on_the_script_line):
    from_preset = compose_preset(name, on_the_script_line)
    from_overrides = compose_preset("flowgrpo_trainer", before + on_the_script_line, config_dir=PACKAGED)
    a = OmegaConf.to_container(from_preset, resolve=True)
    b = OmegaConf.to_container(from_overrides, resolve=True)
    differ = sorted(k for k in set(_flat(a)) | set(_flat(b)) if _flat(a).get(k, "<absent>") != _flat(b).get(k))
    assert not differ, {k: (_flat(a).get(k), _flat(b).get(k)) for k in differ}
    assert FlowGRPOConfig.from_omega(from_preset) == FlowGRPOConfig.from_omega(from_overrides)


def _flat(tree, prefix=""):
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def test_a_preset_stays_overridable_from_the_command_line():
    cfg = compose_preset(
        "qwen_image_flowgrpo_tiny_cpu", ["trainer.total_training_steps=3", "actor_rollout_ref.rollout.n=4"]
    )
    assert cfg.trainer.total_training_steps == 3 and cfg.actor_rollout_ref.rollout.n == 4
    assert cfg.actor_rollout_ref.rollout.algo.noise_level == 1.5  # the rest of the preset holds
