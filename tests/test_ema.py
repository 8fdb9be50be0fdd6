"""Shadow weights and the policy EMA: flow_grpo's EMAModuleWrapper arithmetic and schedule, the swap into the live
LoRA parameters and back, and a tensors-only state that round-trips bit for bit."""

from __future__ import annotations

import io
from collections.abc import Iterable

import numpy as np
import pytest
import torch
from helpers import make_config, model_config, num_rows, records_data_proto, rollout_config, trainer_config
from safetensors.torch import load, save

from verl_omni.config.actor import ActorConfig, EMAConfig, OptimConfig
from verl_omni.config.sampling import DiffusionSamplingParams
from verl_omni.core.checksum import tensors_checksum
from verl_omni.core.errors import NonFiniteError
from verl_omni.models.ema import EMASchedule, PolicyEMA, ShadowWeights
from verl_omni.models.lora import LoRASpec, lora_parameters
from verl_omni.pipelines.loading import load_rl_pipeline
from verl_omni.trainer import ray_trainer
from verl_omni.trainer.checkpoint import read_checkpoint
from verl_omni.trainer.ray_trainer import FlowGRPOTrainer
from verl_omni.workers.actor import DiffusionLoRAActor


# --- Reference: flow_grpo's EMAModuleWrapper, transcribed from flow_grpo/ema.py as copied into NVlabs/DiffusionNFT
# (commit 24af5554898d85e93efa492f42b5e9cdf4156e9b; yifan123/flow_grpo's scripts/train_sd3.py at 74db691 builds it
# with decay=0.9, update_step_interval=8 and calls copy_ema_to(store_temp=True) / copy_temp_to around eval and
# save). Only the methods used below; `to`, `sync_with_model` and its state dict are left out.
class EMAModuleWrapper:
    def __init__(
        self,
        parameters: Iterable[torch.nn.Parameter],
        decay: float = 0.9999,
        update_step_interval: int = 1,
        device: torch.device | None = None,
    ):
        parameters = list(parameters)
        self.ema_parameters = [p.clone().detach().to(device) for p in parameters]
        self.temp_stored_parameters = None
        self.decay = decay
        self.update_step_interval = update_step_interval
        self.device = device

    def get_current_decay(self, optimization_step) -> float:
        return min((1 + optimization_step) / (10 + optimization_step), self.decay)

    @torch.no_grad()
    def step(self, parameters: Iterable[torch.nn.Parameter], optimization_step):
        parameters = list(parameters)
        one_minus_decay = 1 - self.get_current_decay(optimization_step)
        if (optimization_step + 1) % self.update_step_interval == 0:
            for ema_parameter, parameter in zip(self.ema_parameters, parameters, strict=True):
                if parameter.requires_grad:
                    if ema_parameter.device == parameter.device:
                        ema_parameter.add_(one_minus_decay * (parameter - ema_parameter))
                    else:
                        parameter_copy = parameter.detach().to(ema_parameter.device)
                        parameter_copy.sub_(ema_parameter)
                        parameter_copy.mul_(one_minus_decay)
                        ema_parameter.add_(parameter_copy)
                        del parameter_copy

    def copy_ema_to(self, parameters: Iterable[torch.nn.Parameter], store_temp: bool = True, grad=False) -> None:
        if store_temp:
            if grad:
                self.temp_stored_parameters = [parameter.data.clone() for parameter in parameters]
            else:
                self.temp_stored_parameters = [parameter.detach().cpu() for parameter in parameters]
        parameters = list(parameters)
        for ema_parameter, parameter in zip(self.ema_parameters, parameters, strict=True):
            parameter.data.copy_(ema_parameter.to(parameter.device).data)

    def copy_temp_to(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        for temp_parameter, parameter in zip(self.temp_stored_parameters, parameters, strict=True):
            parameter.data.copy_(temp_parameter.to(parameter.device))
        self.temp_stored_parameters = None


# --- end of reference


@pytest.fixture(scope="module")
def lora_params(tiny_qwen_image_dir):
    """The tiny Qwen-Image transformer's LoRA parameters, float32 and trainable, as the actor holds them."""
    pipe = load_rl_pipeline(tiny_qwen_image_dir, "qwen_image", torch.float32, LoRASpec(rank=4, alpha=8.0))
    params = lora_parameters(pipe.transformer)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in params:
            p.normal_()
            p.requires_grad_(True)
    return params


def _train_step(params: list[torch.Tensor], generator: torch.Generator) -> None:
    """A stand-in optimizer step: every parameter moves by a random amount."""
    with torch.no_grad():
        for p in params:
            p.add_(0.1 * torch.randn(p.shape, generator=generator))


def _snapshot(params) -> list[torch.Tensor]:
    return [p.detach().clone() for p in params]


def _assert_bitwise(actual, expected) -> None:
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected, strict=True):
        assert a.dtype == e.dtype and torch.equal(a, e)


def test_the_policy_ema_equals_flow_grpos_wrapper_bit_for_bit_over_its_warm_up_and_interval(lora_params):
    start = _snapshot(lora_params)
    reference = EMAModuleWrapper(lora_params, decay=0.9, update_step_interval=8)
    ours = PolicyEMA(lora_params, EMASchedule(decay=0.9, update_interval=8))
    generator = torch.Generator().manual_seed(1)
    moved = []
    try:
        for step in range(1, 100):  # past the warm-up: (1 + s) / (10 + s) reaches 0.9 at s = 80
            _train_step(lora_params, generator)
            reference.step(lora_params, step)
            moved.append(ours.after_optimizer_step())
            _assert_bitwise(ours.weights.shadow, reference.ema_parameters)
    finally:
        with torch.no_grad():
            for p, s in zip(lora_params, start, strict=True):
                p.copy_(s)
    assert [i + 1 for i, m in enumerate(moved) if m] == list(range(7, 100, 8))
    assert not torch.equal(ours.weights.shadow[0], start[0])  # it did move


def test_update_with_a_given_decay_is_the_wrappers_step_with_that_decay():
    torch.manual_seed(2)
    live = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(7))]
    reference = EMAModuleWrapper(live, decay=0.3, update_step_interval=1)
    shadow = ShadowWeights(live)
    for _ in range(5):
        _train_step(live, torch.Generator().manual_seed(3))
        reference.step(live, 10**6)  # past the warm-up: the decay is 0.3
        shadow.update(0.3)
        _assert_bitwise(shadow.shadow, reference.ema_parameters)


def test_swapped_in_serves_the_shadow_and_restores_the_live_values_as_flow_grpos_copy_ema_to_and_back(lora_params):
    live = _snapshot(lora_params)
    reference = EMAModuleWrapper(lora_params, decay=0.9, update_step_interval=1)
    shadow = ShadowWeights(lora_params)
    generator = torch.Generator().manual_seed(4)
    _train_step(lora_params, generator)
    reference.step(lora_params, 50)
    shadow.update(EMASchedule(0.9, 1).decay_at(50))
    trained = _snapshot(lora_params)

    # grad=True keeps a clone; the default keeps `parameter.detach().cpu()`, which on a CPU tensor is the parameter
    # itself (flow_grpo runs this on the GPU, where .cpu() copies).
    reference.copy_ema_to(lora_params, store_temp=True, grad=True)
    served_by_reference = _snapshot(lora_params)
    reference.copy_temp_to(lora_params)
    _assert_bitwise(_snapshot(lora_params), trained)

    with shadow.swapped_in():
        assert shadow.is_swapped_in
        _assert_bitwise(_snapshot(lora_params), served_by_reference)
        assert all(p.requires_grad for p in lora_params)
    assert not shadow.is_swapped_in
    _assert_bitwise(_snapshot(lora_params), trained)
    assert not torch.equal(trained[0], live[0]) and not torch.equal(served_by_reference[0], trained[0])


def test_swapped_in_restores_the_live_values_when_the_block_raises(lora_params):
    shadow = ShadowWeights(lora_params)
    _train_step(lora_params, torch.Generator().manual_seed(5))
    trained = _snapshot(lora_params)
    with pytest.raises(KeyError, match="in the block"), shadow.swapped_in():
        _assert_bitwise(_snapshot(lora_params), shadow.shadow)
        raise KeyError("in the block")
    _assert_bitwise(_snapshot(lora_params), trained)
    with shadow.swapped_in():  # usable again afterwards
        pass


def test_swapping_twice_or_updating_while_swapped_in_is_refused():
    live = [torch.nn.Parameter(torch.randn(3))]
    shadow = ShadowWeights(live)
    with pytest.raises(RuntimeError, match="not swapped in"):
        shadow.swap_out()
    with shadow.swapped_in():
        with pytest.raises(RuntimeError, match="already swapped in"):
            shadow.swap_in()
        with pytest.raises(RuntimeError, match="update while the shadow weights are swapped in"):
            shadow.update(0.5)
    with pytest.raises(ValueError, match=r"decay=1.5 must lie in \[0, 1\]"):
        shadow.update(1.5)


def test_a_shadow_built_under_inference_mode_updates_and_swaps_outside_it():
    """vllm-omni's worker builds the actor under inference mode; the actor's update runs outside it."""
    live = [torch.nn.Parameter(torch.randn(4, 2))]
    with torch.inference_mode():
        shadow = ShadowWeights(live)
    _train_step(live, torch.Generator().manual_seed(6))
    shadow.update(0.5)
    with torch.inference_mode(), shadow.swapped_in():
        assert torch.equal(live[0].detach(), shadow.shadow[0])
    shadow.update(0.5)


def test_the_state_round_trips_through_safetensors_and_weights_only_torch_load_bit_for_bit(lora_params):
    ema = PolicyEMA(lora_params, EMASchedule(decay=0.9, update_interval=1))
    generator = torch.Generator().manual_seed(7)
    start = _snapshot(lora_params)
    for _ in range(3):
        _train_step(lora_params, generator)
        ema.after_optimizer_step()
    state = ema.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in state.values())

    via_safetensors = load(save(state))
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    via_torch = torch.load(buffer, weights_only=True)
    for restored_state in (via_safetensors, via_torch):
        restored = PolicyEMA(start, EMASchedule(decay=0.9, update_interval=1))
        assert not torch.equal(restored.weights.shadow[0], ema.weights.shadow[0])
        restored.load_state_dict(restored_state)
        assert restored.optimizer_steps == 3
        _assert_bitwise(restored.weights.shadow, ema.weights.shadow)
        assert restored.weights.checksum() == ema.weights.checksum()
    with torch.no_grad():
        for p, s in zip(lora_params, start, strict=True):
            p.copy_(s)


def test_a_state_for_another_adapter_is_refused_by_name():
    shadow = ShadowWeights([torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))])
    with pytest.raises(ValueError, match="holds 1 tensors, expected 2"):
        shadow.load_state_dict({"shadow.0": torch.zeros(2)})
    with pytest.raises(ValueError, match=r"shadow.1: shape \(4,\), expected"):
        shadow.load_state_dict({"shadow.0": torch.zeros(2), "shadow.1": torch.zeros(4)})


def test_the_schedule_refuses_bad_settings():
    with pytest.raises(ValueError, match="decay=1.0"):
        EMASchedule(decay=1.0)
    with pytest.raises(ValueError, match="update_interval=0"):
        EMASchedule(update_interval=0)


# ---------------------------------------------------------------------------------------------- the actor's EMA
def _rollout(pipe):
    """6 rows of 2 prompts (4 steps, SDE window 2, CFG 2) in verl's layout, as the actor receives them."""
    prompts, seeds, records = ["a red cat", "a blue house on a hill"], [11, 22, 33], []
    for i, prompt in enumerate(prompts):
        params = DiffusionSamplingParams(
            num_inference_steps=4, height=32, width=32, sde_window_size=2, window_start=i, guidance_scale=2.0
        )
        records.append(pipe.rl_generate(prompt, [s + i for s in seeds], params))
    raw = np.empty(num_rows(records), dtype=object)
    for i in range(num_rows(records)):
        raw[i] = prompts[i // len(seeds)]
    uid = np.array([f"g{i // len(seeds)}" for i in range(num_rows(records))], dtype=object)
    return records_data_proto(records, {"raw_prompt": raw, "uid": uid})


def _ema_actor(model_dir: str, seed: int = 5, **actor) -> DiffusionLoRAActor:
    ema = EMAConfig(enable=True, decay=0.9, update_interval=actor.pop("update_interval", 1))
    config = ActorConfig(optim=OptimConfig(lr=1e-2), ema=ema, **actor)
    return DiffusionLoRAActor(
        model_config(model_dir), config, rollout_config(pipeline={"true_cfg_scale": 2.0}), lora_seed=seed
    )


def test_the_actor_moves_its_ema_after_each_optimizer_step_as_flow_grpos_wrapper(
    qwen_image_rl_pipe, tiny_qwen_image_dir
):
    actor = _ema_actor(tiny_qwen_image_dir, update_interval=2)
    reference = EMAModuleWrapper(actor.trainable, decay=0.9, update_step_interval=2)
    data = _rollout(qwen_image_rl_pipe)
    advantages = torch.randn(len(data), generator=torch.Generator().manual_seed(0))
    for step in (1, 2, 3):
        actor.update(data, advantages)
        reference.step(actor.trainable, step)
        _assert_bitwise(actor.ema.weights.shadow, reference.ema_parameters)
    assert actor.ema.optimizer_steps == 3
    assert actor.ema_checksum() != actor.lora_checksum()  # it lags the adapter

    live = actor.lora_checksum()
    actor.swap_in_ema()
    assert actor.lora_checksum() == actor.ema_checksum() == tensors_checksum(actor.ema_state_dict()["lora"])
    actor.swap_out_ema()
    assert actor.lora_checksum() == live

    other = _ema_actor(tiny_qwen_image_dir, seed=6)
    other_live = other.lora_checksum()
    other.load_ema_state_dict(actor.ema_state_dict())
    assert other.lora_checksum() == other_live  # the adapter itself is left as it was
    _assert_bitwise(other.ema.weights.shadow, actor.ema.weights.shadow)
    assert other.ema.optimizer_steps == 3


def test_a_refused_second_epoch_leaves_the_ema_as_it_was_before_the_update(
    qwen_image_rl_pipe, tiny_qwen_image_dir, monkeypatch
):
    actor = _ema_actor(tiny_qwen_image_dir, ppo_epochs=2)
    data = _rollout(qwen_image_rl_pipe)
    before, steps_before = [s.clone() for s in actor.ema.weights.shadow], actor.ema.optimizer_steps
    clip, calls = actor._reduce_and_clip, []

    def refuse_the_second_epoch(bad):
        calls.append(1)
        if len(calls) == 2:
            raise NonFiniteError("planted in the second epoch")
        return clip(bad)

    monkeypatch.setattr(actor, "_reduce_and_clip", refuse_the_second_epoch)
    with pytest.raises(NonFiniteError, match="planted"):
        actor.update(data, torch.randn(len(data), generator=torch.Generator().manual_seed(1)))
    assert len(calls) == 2  # the first epoch stepped the optimizer and the EMA
    _assert_bitwise(actor.ema.weights.shadow, before)
    assert actor.ema.optimizer_steps == steps_before


def test_the_actor_refuses_ema_verbs_when_the_ema_is_off(tiny_qwen_image_dir):
    actor = DiffusionLoRAActor(model_config(tiny_qwen_image_dir), ActorConfig(), rollout_config(), lora_seed=5)
    assert actor.ema is None
    with pytest.raises(RuntimeError, match=r"actor_rollout_ref.actor.ema.enable=false"):
        actor.swap_in_ema()


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("decay", 1.0, r"actor_rollout_ref.actor.ema.decay=1.0 must be a number in \[0, 1\)"),
        ("update_interval", 0, r"actor_rollout_ref.actor.ema.update_interval=0 must be an int >= 1"),
        ("enable", "yes", r"actor_rollout_ref.actor.ema.enable='yes' must be true or false"),
    ],
)
def test_bad_ema_settings_are_refused_naming_the_key(key, value, match):
    with pytest.raises(ValueError, match=match):
        EMAConfig(**{key: value})


# ---------------------------------------------------------------------------------------------- validation
def test_the_split_placement_pushes_the_ema_for_validation_and_the_adapter_after(tiny_qwen_image_dir, monkeypatch):
    """Actor in the driver, replicas elsewhere: validation's rollouts see the EMA, training's the adapter."""
    cfg = make_config(
        {
            "actor_rollout_ref.hybrid_engine": False,
            "actor_rollout_ref.model.path": tiny_qwen_image_dir,
            "actor_rollout_ref.model.lora_rank": 4,
            "actor_rollout_ref.actor.ema.enable": True,
        }
    )
    trainer = FlowGRPOTrainer(cfg)
    trainer.actor, trainer.servers = _ema_actor(tiny_qwen_image_dir), None  # push_lora below stands in for them
    with torch.no_grad():  # the adapter trained on: it now differs from its EMA
        for p in trainer.actor.trainable:
            p.add_(0.01)
    served = []

    async def push_lora(servers, tensors, dtype):
        served.append(tensors_checksum(tensors))
        return served[-1]

    monkeypatch.setattr(ray_trainer, "push_lora", push_lora)
    seen = {}
    monkeypatch.setattr(
        trainer, "_validate", lambda step, prefix, name: seen.update({prefix: served[-1]}) or {f"{prefix}/r": 0.0}
    )
    try:
        trainer.sync_weights()  # as init() does
        live, ema = trainer.actor.lora_checksum(), trainer.actor.ema_checksum()
        assert live != ema and served == [live]
        assert set(trainer.validate(3)) == {"val/r", "val/ema/r"}
        assert seen == {"val": live, "val/ema": ema}
        assert served[-1] == trainer.last_lora_checksum == trainer.actor.lora_checksum() == live
        with pytest.raises(KeyError, match="during validation"), trainer.serving_ema():
            raise KeyError("during validation")
        assert served[-2:] == [ema, live] and trainer.actor.lora_checksum() == live
    finally:
        trainer.loop.close()


# Full fine-tuning on two ranks: each rank keeps its shard of the EMA (workers/full_weights.py ShardedShadowWeights).
FULL_ON_TWO_RANKS = {
    "actor_rollout_ref.model.lora_rank": 0,
    "actor_rollout_ref.actor.optim.lr": 1e-4,
    "trainer.n_gpus_per_node": 2,
}


@pytest.mark.e2e
@pytest.mark.parametrize("trained", [{}, FULL_ON_TWO_RANKS], ids=["lora", "full_weights_two_ranks"])
def test_hybrid_engine_validates_the_ema_it_serves_and_resumes_it_bit_for_bit(
    ray_session, ocr_data_files, tiny_qwen_image_dir, tmp_path, trained
):
    overrides = {
        **trained,
        "actor_rollout_ref.actor.ema.enable": True,
        "actor_rollout_ref.actor.ema.update_interval": 1,
        "trainer.test_freq": 2,
        "trainer.save_freq": 2,
    }
    cfg = trainer_config(
        ocr_data_files, tiny_qwen_image_dir, tmp_path, **overrides, **{"trainer.total_training_steps": 2}
    )
    trainer = FlowGRPOTrainer(cfg).init()
    seen, metrics = {}, {}
    validate, validate_all = trainer._validate, trainer.validate

    def serving():  # what the engines serve: full fine-tuning's engines serve the actor ranks' own weights
        if trained:
            return trainer.actor.lora_checksums()
        return trainer._run(trainer.servers.lora_checksums())

    def recording_validate(step, prefix, name):
        seen[prefix] = serving()[0]
        return validate(step, prefix, name)

    trainer._validate = recording_validate
    trainer.validate = lambda step: metrics.update(validate_all(step)) or metrics
    try:
        assert trainer.config.actor_rollout_ref.hybrid_engine
        history = trainer.fit()
        assert len(history) == 2 and history[-1]["actor/grad_norm"] > 0
        live, ema = trainer.actor.lora_checksums()[0], trainer.actor.ema_checksums()[0]
        assert live != ema
        # The engine served the EMA during the EMA's validation and serves the trained adapter again after it.
        assert seen == {"val": live, "val/ema": ema}
        replicas = trainer.config.num_replicas
        assert trainer.actor.ema_checksums() == [ema] * replicas
        assert serving() == [live] * replicas
        assert {"val/reward_mean", "val/ema/reward_mean"} <= set(metrics)
        assert (tmp_path / "validation" / "ema_step_2.png").exists()
        saved = trainer.actor.ema_state_dict()
        assert saved["optimizer_steps"] == 2
    finally:
        trainer.shutdown()
    checkpoint = read_checkpoint(str(tmp_path / "global_step_2"))
    assert checkpoint.ema["optimizer_steps"] == 2 and tensors_checksum(checkpoint.ema["lora"]) == ema

    resumed = FlowGRPOTrainer(cfg).init()
    try:
        assert resumed.global_step == 2
        state = resumed.actor.ema_state_dict()
        assert state["optimizer_steps"] == 2 and set(state["lora"]) == set(saved["lora"])
        assert all(torch.equal(state["lora"][k], saved["lora"][k]) for k in saved["lora"])
        assert resumed.actor.lora_checksums() == [live] * replicas
        assert resumed.actor.ema_checksums() == [ema] * replicas
    finally:
        resumed.shutdown()
