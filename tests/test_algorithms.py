"""The algorithm seam: the registry, ``algorithm.name`` and the per-algorithm typed sections, and what the actor,
trainer and agent loop take from the chosen algorithm."""

import dataclasses
import pathlib
import tokenize

import pytest
import torch
from helpers import make_config

from verl_omni.algorithms import Algorithm, AlgorithmSection, get_algorithm, register_algorithm, registered_algorithms
from verl_omni.algorithms.flowgrpo import FlowGRPO, compute_group_advantages
from verl_omni.config.algorithm import algorithm_config_class, make_algorithm
from verl_omni.config.base import build
from verl_omni.config.sampling import DiffusionSamplingParams
from verl_omni.config.trainer import FlowGRPOConfig
from verl_omni.schedulers.flow_match_sde import choose_window


def _parse(**overrides):
    return FlowGRPOConfig.from_omega(make_config({"actor_rollout_ref.model.path": "tiny:qwen_image", **overrides}))


def test_flowgrpo_is_the_default_and_registered_on_import():
    assert get_algorithm("flowgrpo") is FlowGRPO and "flowgrpo" in registered_algorithms()
    cfg = _parse()
    assert cfg.algorithm.name == "flowgrpo" and cfg.algorithm.section.global_std is False
    assert isinstance(cfg.algorithm.make(cfg.actor_rollout_ref.actor, cfg.actor_rollout_ref.rollout), FlowGRPO)


def test_an_unknown_algorithm_name_lists_the_registered_ones():
    with pytest.raises(ValueError, match=r"algorithm.name='grpo_typo' is not a registered algorithm; registered: \["):
        _parse(**{"algorithm.name": "grpo_typo"})


def test_a_typo_in_an_algorithm_section_names_its_dotted_key():
    with pytest.raises(ValueError, match=r"unknown config keys \['algorithm.flowgrpo.global_sdt'\]"):
        tree = {
            "actor_rollout_ref": {"model": {"path": "tiny:qwen_image"}},
            "algorithm": {"flowgrpo": {"global_sdt": 1}},
        }
        build(FlowGRPOConfig, tree)
    with pytest.raises(ValueError, match=r"algorithm.flowgrpo.global_std='yes' must be true or false"):
        _parse(**{"algorithm.flowgrpo.global_std": "yes"})


def test_a_registered_algorithm_gets_its_own_typed_section_and_runs_behind_the_seam():
    @dataclasses.dataclass
    class EchoSection(AlgorithmSection):
        _prefix = "algorithm.echo_test"
        scale: float = 2.0

    class Echo(Algorithm):
        Config = EchoSection

        def advantages(self, rewards, group_ids):
            return torch.as_tensor(rewards, dtype=torch.float32) * self.config.scale, {"echo/calls": 1.0}

    try:
        register_algorithm("echo_test")(Echo)
        cls = algorithm_config_class()
        assert {f.name for f in dataclasses.fields(cls)} >= {"name", "flowgrpo", "echo_test"}
        section = build(cls, {"name": "echo_test", "echo_test": {"scale": 3.0}})
        algo = make_algorithm(dataclasses.asdict(section))  # a plain dict, as it crosses processes
        assert isinstance(algo, Echo) and algo.name == "echo_test"
        adv, metrics = algo.advantages([1.0, 2.0], ["a", "a"])
        assert adv.tolist() == [3.0, 6.0] and metrics == {"echo/calls": 1.0}
        with pytest.raises(ValueError, match="already registered"):
            register_algorithm("flowgrpo")(Echo)
    finally:
        from verl_omni.algorithms import registry

        registry._ALGORITHMS.pop("echo_test", None)


def test_no_module_outside_algorithms_names_an_algorithm():
    """Code outside ``verl_omni/algorithms/`` reads what an algorithm declares through the seam, never its name: a
    string literal equal to a registered algorithm's name is allowed only as a key of a family's
    ``REFERENCE_TRAINER_DEFAULTS`` (what flow_grpo's own trainer for that family does)."""
    package = pathlib.Path(__file__).resolve().parents[1] / "verl_omni"
    names = set(registered_algorithms())
    found = []
    for path in sorted(package.rglob("*.py")):
        if (package / "algorithms") in path.parents:
            continue
        with open(path, "rb") as f:
            for token in tokenize.tokenize(f.readline):
                if token.type != tokenize.STRING or token.string.strip("\"'") not in names:
                    continue
                if "REFERENCE_TRAINER_DEFAULTS" not in token.line:
                    found.append(f"{path.relative_to(package.parent)}:{token.start[0]}: {token.line.strip()}")
    assert not found, "\n".join(found)


def test_flowgrpo_advantages_behind_the_seam_equal_its_math():
    rewards, groups = torch.tensor([1.0, 2.0, 3.0, 2.0, 0.5, 0.5], dtype=torch.float64), ["a", "b", "a", "b", "c", "c"]
    for global_std in (False, True):
        algo = FlowGRPO(FlowGRPO.Config(global_std=global_std))
        adv, _ = algo.advantages(rewards.numpy(), groups)
        assert torch.equal(adv, compute_group_advantages(rewards, groups, global_std=global_std))


def test_flowgrpo_sampling_draws_the_window_per_group_and_leaves_validation_alone():
    algo = FlowGRPO()
    params = DiffusionSamplingParams(num_inference_steps=10, sde_window_size=2, sde_window_range=(0, 5))
    out = algo.sampling(params, step=3, group_seed=1234, validate=False)
    assert out.window_start == choose_window(1234, 10, 2, (0, 5))
    assert algo.sampling(params, step=3, group_seed=1234, validate=True) is params
    every_step = params.replace(sde_window_size=0, sde_window_range=None)
    assert algo.sampling(every_step, step=3, group_seed=1234, validate=False) is every_step
