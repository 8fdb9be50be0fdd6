"""The config: the YAML inside the package and the typed sections are twins, and it is parsed once into them."""

import dataclasses

import pytest
from helpers import CONFIG, make_config
from omegaconf import OmegaConf

from verl_omni.config.base import build
from verl_omni.config.trainer import FlowGRPOConfig


def _yaml_tree():
    return OmegaConf.to_container(OmegaConf.load(CONFIG), resolve=False)


def _field_tree(cls):
    out = {}
    for f in dataclasses.fields(cls):
        if f.name == "_target_":
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        out[f.name] = _field_tree(type(default)) if dataclasses.is_dataclass(default) else default
    return out


def _paths(tree, prefix=""):
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and key not in ("custom_reward_function",):
            yield from _paths(value, path + ".")
        else:
            yield path, value


def test_the_yaml_and_the_dataclasses_have_the_same_keys_and_defaults():
    yaml, fields = dict(_paths(_yaml_tree())), dict(_paths(_field_tree(FlowGRPOConfig)))
    assert sorted(yaml) == sorted(fields), set(yaml) ^ set(fields)
    # Where they may differ: the model path is required in the YAML; interpolations are resolved by Hydra.
    differ = {"actor_rollout_ref.model.path", "trainer.default_local_dir"}
    for path in sorted(set(yaml) - differ):
        a, b = yaml[path], fields[path]
        a = tuple(a) if isinstance(a, list) else a
        b = tuple(b) if isinstance(b, list) else b
        if path == "reward.rewards":
            a, b = [dict(x) for x in a], [dict(x) for x in b]
        assert a == b, f"{path}: yaml {a!r} != dataclass {b!r}"


def test_parsed_once_into_typed_frozen_sections():
    cfg = FlowGRPOConfig.from_omega(make_config({"actor_rollout_ref.model.path": "tiny:qwen_image"}))
    assert cfg.actor_rollout_ref.rollout.algo.noise_level == 0.7
    assert cfg.actor_rollout_ref.model.target_modules == ("to_q", "to_k", "to_v", "to_out.0")
    assert FlowGRPOConfig.from_omega(cfg) is cfg  # already parsed: the same object
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.actor_rollout_ref.rollout.n = 8
    assert cfg["trainer"]["seed"] == 0  # verl's BaseConfig: dict-like access too


def test_unknown_keys_name_their_dotted_path():
    with pytest.raises(ValueError, match=r"unknown config keys \['actor_rollout_ref.rollout.algo.noise'\]"):
        build(
            FlowGRPOConfig,
            {"actor_rollout_ref": {"model": {"path": "tiny:qwen_image"}, "rollout": {"algo": {"noise": 1}}}},
        )


@pytest.mark.parametrize("key, default", [("gelu_epilogue", True), ("inductor_multi_kernel", True)])
def test_rollout_kernel_switches_are_booleans_named_in_the_error(key, default):
    from verl_omni.config.model import ModelConfig

    assert getattr(ModelConfig(path="tiny:qwen_image"), key) is default
    assert getattr(ModelConfig(path="tiny:qwen_image", **{key: not default}), key) is (not default)
    with pytest.raises(ValueError, match=rf"actor_rollout_ref\.model\.{key}='yes' must be true or false"):
        ModelConfig(path="tiny:qwen_image", **{key: "yes"})


@pytest.mark.parametrize(
    "key, default",
    [
        ("qk_norm_rope_kernel", True),
        ("qk_kernel_adds_lora", True),
        ("fuse_qkv_projections", False),
        ("project_joint_attention_output", True),
    ],
)
def test_qwen_image_options_are_its_own_section_validated_by_the_family(key, default):
    """Qwen-Image's attention switches live under actor_rollout_ref.model.qwen_image (its family's options class),
    parsed from the YAML like every section, refused by their dotted key; the chosen family's section is
    ``family_options`` (none for SD3)."""
    from verl_omni.config.model import ModelConfig

    parsed = FlowGRPOConfig.from_omega(
        make_config(
            {
                "actor_rollout_ref.model.path": "tiny:qwen_image",
                f"actor_rollout_ref.model.qwen_image.{key}": not default,
            }
        )
    )
    assert getattr(parsed.actor_rollout_ref.model.family_options, key) is (not default)
    assert getattr(ModelConfig(path="tiny:qwen_image").family_options, key) is default
    with pytest.raises(ValueError, match=rf"actor_rollout_ref\.model\.qwen_image\.{key}='yes' must be true or false"):
        ModelConfig(path="tiny:qwen_image", qwen_image={key: "yes"})
    with pytest.raises(ValueError, match=r"unknown config keys \['actor_rollout_ref.model.qwen_image.qk_kernel'\]"):
        build(
            FlowGRPOConfig,
            {"actor_rollout_ref": {"model": {"path": "tiny:qwen_image", "qwen_image": {"qk_kernel": 1}}}},
        )
    assert ModelConfig(path="tiny:sd3").family_options is None


def test_flux_distilled_guidance_is_its_families_section_read_from_the_yaml():
    """actor_rollout_ref.model.flux.distilled_guidance_scale: 3.5 in the packaged YAML, overridable, FLUX's
    ``family_options``; the FLUX preset sets flow_grpo's value."""
    from verl_omni.config.model import ModelConfig
    from verl_omni.pipelines.flux.options import FluxOptions

    parsed = FlowGRPOConfig.from_omega(make_config({"actor_rollout_ref.model.path": "tiny:flux"}))
    assert parsed.actor_rollout_ref.model.family_options == FluxOptions(distilled_guidance_scale=3.5)
    overridden = FlowGRPOConfig.from_omega(
        make_config(
            {"actor_rollout_ref.model.path": "tiny:flux", "actor_rollout_ref.model.flux.distilled_guidance_scale": 5}
        )
    )
    assert overridden.actor_rollout_ref.model.family_options.distilled_guidance_scale == 5.0
    assert ModelConfig(path="tiny:flux").family_options.distilled_guidance_scale == 3.5
    with pytest.raises(ValueError, match=r"unknown config keys \['actor_rollout_ref.model.flux.guidance_scale'\]"):
        build(FlowGRPOConfig, {"actor_rollout_ref": {"model": {"path": "tiny:flux", "flux": {"guidance_scale": 1}}}})


def test_freezing_the_gc_heap_is_a_boolean_named_in_the_error():
    from verl_omni.config.actor import ActorConfig

    assert ActorConfig().freeze_gc_heap is True and ActorConfig(freeze_gc_heap=False).freeze_gc_heap is False
    with pytest.raises(ValueError, match=r"actor_rollout_ref\.actor\.freeze_gc_heap='yes' must be true or false"):
        ActorConfig(freeze_gc_heap="yes")


def test_turning_the_qk_kernel_off_alone_is_valid():
    """qk_kernel_adds_lora (on by default) only refines the q/k kernel: switching the kernel off needs nothing else."""
    from verl_omni.config.model import ModelConfig

    options = ModelConfig(path="tiny:qwen_image", qwen_image={"qk_norm_rope_kernel": False}).family_options
    assert options.qk_norm_rope_kernel is False and options.qk_kernel_adds_lora is True
    assert options.attention_options()["lora_in_kernel"] is False
