"""The rollout record: one object per engine call (media with a frame axis, the sampling settings of its rows) from
the engine to the actor. Its rows through the transport, videos (F > 1) through transport and rewards, and the
actor recomputing log-probs with the settings the rows carry rather than its own copy of the rollout config."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from helpers import model_config, records_data_proto, rollout_config

from verl_omni.agent_loop.diffusion_agent_loop import records_to_data_proto
from verl_omni.agent_loop.transport import pack, unpack_concat
from verl_omni.config.actor import ActorConfig, OptimConfig
from verl_omni.config.sampling import ROW_SETTINGS, DiffusionSamplingParams, RowSettings
from verl_omni.core.media import media_samples
from verl_omni.core.outputs import RLBatchOutput
from verl_omni.rewards.registry import RewardManager
from verl_omni.workers.actor import DiffusionLoRAActor
from verl_omni.workers.train_batch import TrainBatch

PROMPTS = ["a red cat", "a blue house on a hill"]  # different lengths: padded prompt embeddings


def _params(**overrides) -> DiffusionSamplingParams:
    base = dict(num_inference_steps=4, height=32, width=32, sde_window_size=2, trajectory_window_only=True)
    return DiffusionSamplingParams(**{**base, **overrides})


def _info(rows: int, per_group: int) -> dict:
    raw = np.array([PROMPTS[i // per_group] for i in range(rows)], dtype=object)
    return {"raw_prompt": raw, "uid": np.array([f"g{i // per_group}" for i in range(rows)], dtype=object)}


def _video_record(seeds: list[int], frames: int, sampling: DiffusionSamplingParams, tokens: int) -> RLBatchOutput:
    """A synthetic record of ``len(seeds)`` clips of ``frames`` frames (what a video family's engine returns)."""
    g, b, t = torch.Generator().manual_seed(seeds[0]), len(seeds), sampling.num_inference_steps
    return RLBatchOutput(
        media=torch.randint(0, 256, (b, frames, 8, 12, 3), generator=g, dtype=torch.uint8),
        latents=torch.randn(b, 3, 5, 4, generator=g),
        log_probs=torch.randn(b, t, generator=g),
        window_mask=torch.arange(t) < 2,
        timesteps=torch.linspace(1, 0, t),
        sigmas=torch.linspace(1, 0, t + 1),
        latent_steps=torch.arange(3),
        prompt_embeds=torch.randn(b, tokens, 6, generator=g),
        prompt_embeds_mask=torch.ones(b, tokens, dtype=torch.long),
        seeds=seeds,
        sampling=sampling.to_dict(),
    )


# ----------------------------------------------------------------------------------------------- the record's path
def test_records_become_rows_whole_and_round_trip_through_the_transport(qwen_image_rl_pipe, ray_session):
    """Two groups' records (B=2 each) fill their rows by one concatenation per field, in the batch's row order even
    when the groups are not contiguous; every row carries its call's settings; the packed batch crosses Ray intact."""
    first = qwen_image_rl_pipe.rl_generate(PROMPTS[0], [3, 4], _params(window_start=0))
    second = qwen_image_rl_pipe.rl_generate(PROMPTS[1], [5, 6], _params(window_start=1))
    assert first.media.shape == (2, 1, 32, 32, 3) and first.sampling == _params(window_start=0).to_dict()
    rows = [[0, 2], [1, 3]]  # interleaved groups: rows 0 and 2 are the first prompt's
    info = {
        "raw_prompt": np.array([PROMPTS[0], PROMPTS[1], PROMPTS[0], PROMPTS[1]], dtype=object),
        "uid": np.array(["a", "b", "a", "b"], dtype=object),
    }
    data = records_to_data_proto([(rows[0], first), (rows[1], second)], info, {})
    for record, where in ((first, rows[0]), (second, rows[1])):
        assert torch.equal(data.batch["media"][where], record.media)
        assert torch.equal(data.batch["latents"][where], record.latents)
        assert torch.equal(data.batch["old_log_probs"][where], record.log_probs)
        assert torch.equal(data.batch["window_mask"][where], record.window_mask.expand(2, -1))
        assert data.batch["seeds"][where].tolist() == record.seeds
        length = record.prompt_embeds.shape[1]
        assert torch.equal(data.batch["prompt_embeds"][where][:, :length], record.prompt_embeds)
    settings = RowSettings.of_rows(data.batch)
    assert settings == RowSettings(noise_level=0.7, sde_type="sde", guidance_scale=1.0, num_inference_steps=4)
    # the windows differ per group (window_start 0 / 1): each row keeps its own
    assert data.batch["window_mask"][:, 0].tolist() == [True, False, True, False]

    received = unpack_concat(ray_session.get([ray_session.put(pack(data[:2])), ray_session.put(pack(data[2:]))]))
    assert set(received.batch.keys()) == set(data.batch.keys())
    for name in data.batch.keys():
        assert received.batch[name].dtype == data.batch[name].dtype, name
        assert torch.equal(received.batch[name], data.batch[name]), name
    assert RowSettings.of_rows(received.batch) == settings
    assert TrainBatch.from_data_proto(received, torch.zeros(4)).row_settings() == settings


def test_a_record_payload_round_trips_and_refuses_what_it_does_not_know(qwen_image_rl_pipe):
    record = qwen_image_rl_pipe.rl_generate(PROMPTS[0], [3, 4], _params())
    again = RLBatchOutput.from_payload(record.to_payload())
    assert torch.equal(again.media, record.media) and again.sampling == record.sampling and again.seeds == [3, 4]
    assert torch.equal(record.images, record.media[:, 0])
    with pytest.raises(ValueError, match=r"unknown fields \['image'\]"):
        RLBatchOutput.from_payload({**record.to_payload(), "image": None})
    with pytest.raises(ValueError, match="media: expected uint8"):
        RLBatchOutput(**{**record.to_payload(), "media": record.media.float()})
    with pytest.raises(ValueError, match="a video record of 3 frames has no images"):
        _ = _video_record([1], 3, _params(), 4).images
    with pytest.raises(ValueError, match="carries no sampling settings"):
        records_data_proto([RLBatchOutput(**{**record.to_payload(), "sampling": None})], _info(2, 2))


def test_video_records_pass_through_transport_and_rewards_with_their_frame_axis(ray_session):
    """Clips of F=3 frames: their rows keep [B, F, H, W, 3] through the Ray hop, and an image reward scores each
    clip frame by frame (mean over frames); a one-frame record reaches the same reward as plain images."""
    sampling = _params()
    records = [_video_record([1, 2], 3, sampling, tokens=4), _video_record([3, 4], 3, sampling, tokens=7)]
    data = records_data_proto(records, _info(4, 2))
    assert data.batch["media"].shape == (4, 3, 8, 12, 3)
    received = unpack_concat(ray_session.get([ray_session.put(pack(data))]))
    assert torch.equal(received.batch["media"], torch.cat([r.media for r in records]))
    assert received.batch["prompt_embeds_mask"].sum(1).tolist() == [4, 4, 7, 7]  # padded to the longest

    manager = RewardManager({"rewards": [{"name": "brightness", "weight": 1.0}]})
    clips = media_samples(received.batch["media"])
    assert [c.shape for c in clips] == [(3, 8, 12, 3)] * 4
    scores = manager(clips, ["p"] * 4, [{}] * 4).total
    per_frame = received.batch["media"].double().div(255).mean(dim=(2, 3, 4)).mean(dim=1).numpy()
    np.testing.assert_allclose(scores, per_frame, rtol=1e-12)

    images = records_data_proto([_video_record([5, 6], 1, sampling, tokens=4)], _info(2, 2)).batch["media"]
    as_images = media_samples(images)
    assert [i.shape for i in as_images] == [(8, 12, 3)] * 2  # image rewards get [H, W, 3] as always
    np.testing.assert_allclose(
        manager(as_images, ["p"] * 2, [{}] * 2).total, images.double().div(255).mean(dim=(1, 2, 3, 4)).numpy()
    )


# ----------------------------------------------------------------------------------------------- the actor's side
def _actor(model_dir, **rollout) -> DiffusionLoRAActor:
    cfg = ActorConfig(optim=OptimConfig(lr=1e-2), ppo_micro_batch_size_per_gpu=2)
    return DiffusionLoRAActor(model_config(model_dir), cfg, rollout_config(**rollout), lora_seed=3)


def _rollout(pipe, **overrides):
    records = [
        pipe.rl_generate(prompt, [3 + 2 * i, 4 + 2 * i], _params(window_start=i, **overrides))
        for i, prompt in enumerate(PROMPTS)
    ]
    return records_data_proto(records, _info(4, 2))


@pytest.mark.parametrize("rows", [{"noise_level": 0.4}, {"noise_level": 0.5, "sde_type": "cps"}])
def test_the_update_recomputes_with_the_rows_settings_not_the_actors_config(tiny_qwen_image_dir, rows, caplog):
    """The actor's config says noise 0.7 / sde; the rows were sampled otherwise. The first update's ratios are 1 (the
    rows' settings were used) and the difference is logged, naming the config key. Recomputed with the config's
    settings instead, the same transitions' log-probs differ from the rollout's."""
    actor = _actor(tiny_qwen_image_dir, algo={"noise_level": 0.7, "sde_type": "sde"})
    data = _rollout(actor.pipe, **rows)
    step_rows = torch.tensor([0, 1])
    recomputed = actor.compute_log_probs(data, 0, step_rows).log_prob
    assert torch.allclose(recomputed, data.batch["old_log_probs"][step_rows, 0], atol=1e-5)
    as_config = data.select(batch_keys=list(data.batch.keys()))
    as_config.batch["noise_level"] = torch.full((4,), 0.7, dtype=torch.float64)
    as_config.batch["sde_type"] = torch.zeros(4, dtype=torch.int64)
    wrong = actor.compute_log_probs(as_config, 0, step_rows).log_prob
    assert (wrong - data.batch["old_log_probs"][step_rows, 0]).abs().min() > 1e-2

    with caplog.at_level(logging.WARNING, logger="verl_omni.workers.actor"):
        metrics = actor.update(data, torch.tensor([1.0, -1.0, 0.5, -0.5]))
    assert metrics["actor/ratio_mean"] == pytest.approx(1.0, abs=1e-5)
    assert metrics["actor/ratio_min"] == pytest.approx(1.0, abs=1e-5)
    assert metrics["actor/ratio_max"] == pytest.approx(1.0, abs=1e-5)
    assert f"noise_level={rows['noise_level']!r}" in caplog.text
    assert "actor_rollout_ref.rollout.algo.noise_level" in caplog.text
    assert ("sde_type='cps'" in caplog.text) is ("sde_type" in rows)


def test_rows_sampled_as_the_config_says_log_nothing_and_cfg_comes_from_the_rows(tiny_qwen_image_dir, caplog):
    """Rows with CFG 2 trained by an actor whose config has the same: ratio 1, nothing logged."""
    actor = _actor(tiny_qwen_image_dir, pipeline={"true_cfg_scale": 2.0})
    data = _rollout(actor.pipe, guidance_scale=2.0, negative_prompt="blurry")
    assert data.batch["guidance_scale"].eq(2.0).all()
    with caplog.at_level(logging.WARNING, logger="verl_omni.workers.actor"):
        metrics = actor.update(data, torch.tensor([1.0, -1.0, 0.5, -0.5]))
    assert metrics["actor/ratio_mean"] == pytest.approx(1.0, abs=1e-5)
    assert "the actor's config gives" not in caplog.text


def test_a_batch_without_settings_or_with_mixed_ones_is_refused_naming_the_field(tiny_qwen_image_dir):
    actor = _actor(tiny_qwen_image_dir)
    records = [
        actor.pipe.rl_generate(PROMPTS[0], [3, 4], _params(window_start=0)),
        actor.pipe.rl_generate(PROMPTS[1], [5, 6], _params(window_start=0, noise_level=0.3)),
    ]
    mixed = records_data_proto(records, _info(4, 2))
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5])
    with pytest.raises(ValueError, match=r"mixes rows sampled with different noise_level \(\[0.3, 0.7\]\)"):
        actor.update(mixed, advantages)
    for name in ROW_SETTINGS:
        data = records_data_proto(records[:1], _info(2, 2))
        data.pop(batch_keys=[name])
        with pytest.raises(ValueError, match=f"has no '{name}' tensor"):
            actor.update(data, advantages[:2])
    data = records_data_proto(records[:1], _info(2, 2))
    data.batch["num_inference_steps"] = torch.full((2,), 6, dtype=torch.int64)
    with pytest.raises(ValueError, match="num_inference_steps=6 disagrees with its timesteps"):
        actor.update(data, advantages[:2])
    data.batch["num_inference_steps"] = torch.full((2,), 4, dtype=torch.int64)
    data.batch["sde_type"] = torch.full((2,), 7, dtype=torch.int64)
    with pytest.raises(ValueError, match="sde_type 7 is not an index"):
        actor.update(data, advantages[:2])


def test_mixgrpo_rows_carry_the_window_of_their_step_and_train_at_ratio_1(tiny_qwen_image_dir):
    """MixGRPO supplies each group's settings per training step (its sliding window): the rows' records hold exactly
    the params each group was sampled with, their window_mask that window, and the update recomputes them."""
    section = {"name": "mixgrpo", "mixgrpo": {"window_size": 2, "shift_interval": 1, "stride": 1}}
    cfg = ActorConfig(optim=OptimConfig(lr=1e-2), ppo_micro_batch_size_per_gpu=2)
    rollout = rollout_config(algo={"noise_level": 0.9})
    actor = DiffusionLoRAActor(model_config(tiny_qwen_image_dir), cfg, rollout, lora_seed=3, algorithm=section)
    base = _params(num_inference_steps=5, noise_level=0.9)
    sampled = [actor.algorithm.sampling(base, step=2, group_seed=i, validate=False) for i in range(2)]
    records = [actor.pipe.rl_generate(PROMPTS[i], [3 + i, 4 + i], sampled[i]) for i in range(2)]
    for record, params in zip(records, sampled, strict=True):
        assert DiffusionSamplingParams.from_dict(record.sampling) == params
    data = records_data_proto(records, _info(4, 2))
    start, end = sampled[0].window_steps()
    assert (start, end) == (1, 3)  # training step 2: the window moved one step from the first
    assert data.batch["window_mask"].tolist() == [[start <= s < end for s in range(5)]] * 4
    metrics = actor.update(data, torch.tensor([1.0, -1.0, 0.5, -0.5]))
    assert metrics["actor/ratio_mean"] == pytest.approx(1.0, abs=1e-5)
    assert metrics["actor/num_train_terms"] == 8


def test_a_video_record_crosses_the_vllm_omni_workers_wire_whole():
    """The worker's hop (``engines/vllm_omni/wire.py``): a record of clips keeps its frames and its settings."""
    import types

    from verl_omni.rollout.engines.vllm_omni.wire import MODEL_CLASS_NAME, request_output_to_batch, to_diffusion_output

    record = _video_record([7, 8], 3, _params(noise_level=0.4), tokens=5)
    sent = to_diffusion_output(record, types.SimpleNamespace, MODEL_CLASS_NAME)
    assert sent.output.shape == (2, 8, 12, 3)  # vllm-omni's own slot: the first frames, as images
    received = request_output_to_batch(types.SimpleNamespace(images=sent.output, **vars(sent)), [7, 8])
    assert torch.equal(received.media, record.media) and received.sampling == record.sampling
    assert torch.equal(received.prompt_embeds, record.prompt_embeds[:1].expand(2, -1, -1))
