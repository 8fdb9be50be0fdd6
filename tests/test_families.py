"""Model families as registered units: found by importing the packages under verl_omni/pipelines, looked up by
name or by a model directory's model_index.json ``_class_name``, each with its own options section and tiny model."""

import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import pytest
from helpers import make_config

import verl_omni.pipelines as pipelines
from verl_omni.config.base import build
from verl_omni.config.model import ModelConfigBase, model_config_class
from verl_omni.config.trainer import FlowGRPOConfig
from verl_omni.core.section import Section, require_number
from verl_omni.pipelines import registry
from verl_omni.pipelines.registry import (
    ModelFamily,
    family_for_model_dir,
    family_names,
    get_family,
    get_pipeline_class,
    model_class_name,
    register_family,
)
from verl_omni.pipelines.tiny import resolve_model_path, tiny_model_dir

PIPELINES_DIR = pathlib.Path(pipelines.__file__).parent


def test_every_package_under_pipelines_is_a_registered_family_with_its_pipeline_class():
    packages = sorted(p.name for p in PIPELINES_DIR.iterdir() if (p / "__init__.py").is_file())
    assert set(family_names()) == set(packages) and {"qwen_image", "sd3"} <= set(packages)
    for name in family_names():
        family = get_family(name)
        assert family.name == name and family.__module__ == f"verl_omni.pipelines.{name}"
        cls = get_pipeline_class(name)
        assert cls.__module__ == f"verl_omni.pipelines.{name}.pipeline"
        bases = {c.__name__ for c in cls.__mro__}
        assert set(family.diffusers_class_names) <= bases  # the diffusers class it serves is what it loads


def test_finding_the_families_imports_no_pipeline_and_no_diffusers():
    """The config reads the registry: the family declarations stay cheap (the RL pipelines load diffusers)."""
    code = (
        "import sys\n"
        "from verl_omni.pipelines import family_names\n"
        "from verl_omni.config.model import ModelConfig\n"
        "assert family_names()\n"
        "assert ModelConfig(path='tiny:' + family_names()[0]).pipeline == family_names()[0]\n"
        "loaded = [m for m in sys.modules if m == 'diffusers' or m.startswith('verl_omni.pipelines.') and "
        "m.endswith('.pipeline')]\n"
        "print(loaded)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_the_decorator_refuses_a_second_family_of_a_registered_name_and_what_is_no_family():
    class Another(ModelFamily):
        name = "qwen_image"
        diffusers_class_names = ("SomethingElsePipeline",)

    with pytest.raises(ValueError, match=r"model family 'qwen_image' is already registered \(verl_omni.pipelines"):
        register_family(Another)
    assert get_family("qwen_image") is not Another
    with pytest.raises(TypeError, match="decorates ModelFamily subclasses"):
        register_family(dict)

    class Auto(ModelFamily):
        name = "auto"
        diffusers_class_names = ("X",)

    with pytest.raises(ValueError, match=r"Auto.name='auto' must be a Python identifier other than 'auto'"):
        register_family(Auto)
    with pytest.raises(ValueError, match=r"actor_rollout_ref.model.pipeline='flux_typo' is not a registered model"):
        get_family("flux_typo")


def test_the_class_name_of_the_tiny_models_saved_dirs_finds_their_family(tiny_qwen_image_dir, tiny_sd3_dir):
    assert model_class_name(tiny_qwen_image_dir) == "QwenImagePipeline"
    assert model_class_name(tiny_sd3_dir) == "StableDiffusion3Pipeline"
    assert family_for_model_dir(tiny_qwen_image_dir) == "qwen_image"
    assert family_for_model_dir(tiny_sd3_dir) == "sd3"
    assert family_for_model_dir("tiny:sd3") == "sd3"
    assert resolve_model_path("tiny:sd3") == tiny_model_dir("sd3") == tiny_sd3_dir


def test_pipeline_auto_is_the_default_and_reads_the_model_dir(tiny_sd3_dir, tiny_qwen_image_dir):
    assert ModelConfigBase.pipeline == "auto"
    parsed = FlowGRPOConfig.from_omega(make_config({"actor_rollout_ref.model.path": tiny_sd3_dir}))
    assert parsed.actor_rollout_ref.model.pipeline == "sd3"
    parsed = FlowGRPOConfig.from_omega(make_config({"actor_rollout_ref.model.path": "tiny:qwen_image"}))
    assert parsed.actor_rollout_ref.model.pipeline == "qwen_image"
    model = model_config_class()
    assert model(path=tiny_qwen_image_dir, pipeline=None).pipeline == "qwen_image"  # null means auto too
    assert model(path=tiny_qwen_image_dir, pipeline="qwen_image").pipeline == "qwen_image"


def test_auto_on_a_model_no_family_serves_names_the_key_the_class_and_the_families(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "NoSuchPipeline"}))
    with pytest.raises(
        ValueError,
        match=r"actor_rollout_ref.model.pipeline=auto: .*model_index.json has _class_name 'NoSuchPipeline', which no "
        r"registered model family serves; registered: .*qwen_image \(QwenImagePipeline\).*sd3 "
        r"\(StableDiffusion3Pipeline\)",
    ):
        FlowGRPOConfig.from_omega(make_config({"actor_rollout_ref.model.path": str(tmp_path)}))
    missing = tmp_path / "no_model_here"
    with pytest.raises(FileNotFoundError, match=r"actor_rollout_ref.model.pipeline=auto reads _class_name .*no_model"):
        model_config_class()(path=str(missing))


def test_a_new_family_is_one_registered_class_with_its_options_section_and_tiny_model(tmp_path):
    """Registering a family adds its name, its ``actor_rollout_ref.model.<name>`` section (validated by its own
    class, chosen as ``family_options``) and its ``tiny:<name>`` model, with no other edit."""

    @dataclasses.dataclass
    class EchoOptions(Section):
        _prefix = "actor_rollout_ref.model.echo_family"
        scale: float = 2.0

        def __post_init__(self):
            require_number(self.key("scale"), self.scale, 0, strict=True)

    class EchoFamily(ModelFamily):
        name = "echo_family"
        diffusers_class_names = ("EchoPipeline",)
        options_class = EchoOptions

        @staticmethod
        def build_tiny(path, seed=0, dtype=None):
            os.makedirs(path, exist_ok=True)
            pathlib.Path(path, "model_index.json").write_text(json.dumps({"_class_name": "EchoPipeline"}))
            return str(path)

    try:
        register_family(EchoFamily)
        assert "echo_family" in family_names()
        cls = model_config_class()
        config = build(cls, {"path": "tiny:echo_family", "echo_family": {"scale": 3.0}})
        assert config.pipeline == "echo_family" and config.family_options == EchoOptions(scale=3.0)
        with pytest.raises(ValueError, match=r"actor_rollout_ref.model.echo_family.scale=0 must be a number > 0"):
            build(cls, {"path": "tiny:echo_family", "echo_family": {"scale": 0}})
        built = tiny_model_dir("echo_family", root=tmp_path)
        assert family_for_model_dir(built) == "echo_family"
        assert build(cls, {"path": built}).pipeline == "echo_family"
    finally:
        registry._FAMILIES.pop("echo_family", None)
        model_config_class()  # the module's ModelConfig without it again


@pytest.mark.parametrize("name", ["qwen_image", "sd3", "flux", "wan"])
def test_each_familys_real_size_stand_in_is_a_model_that_family_serves(name, tmp_path):
    """The family's ``build_standin`` (on the meta device: configs, tokenizers and scheduler, no weights) writes a
    pipeline directory whose ``model_index.json`` class the registry maps back to that family."""
    path = get_family(name).build_standin(tmp_path / name, layers=1, device="meta")
    assert family_for_model_dir(path) == name
    with open(os.path.join(path, "standin.json")) as f:
        assert json.load(f)["layers"] == 1
