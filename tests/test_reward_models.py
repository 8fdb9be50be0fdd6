"""Model rewards (pickscore / clipscore) on a tiny random CLIP built here: the real loading code, no hub."""

import asyncio

import numpy as np
import pytest
import torch

from verl_omni.rewards import RewardManager, register_reward_factory
from verl_omni.rewards.model_actor import RewardModelActor
from verl_omni.rewards.pickscore import CLIPScorer


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    from verl_omni.models.tiny import build_tiny_clip

    return build_tiny_clip(tmp_path_factory.mktemp("tiny_clip"))


PROMPTS = ['a red "STOP" sign', "a cat on a sofa", "a bowl of fruit, oil painting", "a blue car"]


def sample_images(count=4, size=(48, 64), seed=0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (*size, 3), dtype=np.uint8) for _ in range(count)]


def reference_logits(path: str, images, prompts) -> torch.Tensor:
    """CLIPModel.forward's logits_per_image (logit_scale * cosine), from the processor's own inputs."""
    from transformers import AutoProcessor, CLIPModel

    processor, model = AutoProcessor.from_pretrained(path), CLIPModel.from_pretrained(path).eval()
    inputs = processor(text=prompts, images=images, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**inputs).logits_per_image, model.logit_scale.exp()


def test_pickscore_matches_clip_forward_logits_and_is_deterministic(tiny_clip_dir):
    images = sample_images()
    scores = CLIPScorer(tiny_clip_dir, kind="pickscore", batch_size=4)(images, PROMPTS)
    logits, _ = reference_logits(tiny_clip_dir, images, PROMPTS)
    np.testing.assert_allclose(scores, torch.diagonal(logits).numpy(), rtol=1e-5, atol=1e-5)
    assert all(np.isfinite(scores))
    again = CLIPScorer(tiny_clip_dir, kind="pickscore")(images, PROMPTS)  # a fresh load, the same numbers
    assert again == scores


def test_scores_differ_between_prompts_for_the_same_image(tiny_clip_dir):
    image = sample_images(1)[0]
    scores = CLIPScorer(tiny_clip_dir)([image] * len(PROMPTS), PROMPTS)
    assert len(set(np.round(scores, 6))) == len(PROMPTS)


def test_clipscore_is_100_times_the_clipped_cosine(tiny_clip_dir):
    images = sample_images()
    scores = np.asarray(CLIPScorer(tiny_clip_dir, kind="clipscore")(images, PROMPTS))
    logits, logit_scale = reference_logits(tiny_clip_dir, images, PROMPTS)
    cosine = torch.diagonal(logits) / logit_scale
    np.testing.assert_allclose(scores, (100 * cosine).clamp(min=0).numpy(), rtol=1e-5, atol=1e-4)
    assert (scores >= 0).all()


def test_batched_scoring_equals_one_by_one(tiny_clip_dir):
    images = sample_images(5, seed=1)
    prompts = PROMPTS + ["a much longer prompt that pads every other prompt of the batch with many tokens"]
    batched = CLIPScorer(tiny_clip_dir, batch_size=4)(images, prompts)  # chunks of 4 and 1
    single = CLIPScorer(tiny_clip_dir, batch_size=1)(images, prompts)
    np.testing.assert_allclose(batched, single, rtol=1e-5, atol=1e-5)


def test_tensor_preprocessing_follows_the_processor_config(tiny_clip_dir):
    scorer = CLIPScorer(tiny_clip_dir, preprocess="tensor")
    images = sample_images(2, size=(90, 60), seed=2) + [np.full((50, 80, 3), 200, dtype=np.uint8)]
    reference = scorer.processor(images=images, return_tensors="pt")["pixel_values"]
    ours = scorer.pixel_values(images)
    assert ours.shape == reference.shape
    flat_image_error = (ours[2] - reference[2]).abs().max().item()
    assert flat_image_error < 1e-5  # a flat image resizes to itself: only the arithmetic may differ
    # bicubic in torch vs PIL: at most a few grey levels apart on noise (1 level = 1/255/std ~ 0.015 here)
    assert (ours - reference).abs().mean().item() < 0.01
    tensor_scores = scorer(images, ["a", "b", "c"])
    processor_scores = CLIPScorer(tiny_clip_dir)(images, ["a", "b", "c"])
    np.testing.assert_allclose(tensor_scores, processor_scores, atol=0.02)


def test_an_offloaded_scorer_refuses_to_score_until_onloaded(tiny_clip_dir):
    scorer = CLIPScorer(tiny_clip_dir)
    images = sample_images(2)
    before = scorer(images, PROMPTS[:2])
    scorer.offload()
    with pytest.raises(RuntimeError, match="offloaded.*onload"):
        scorer(images, PROMPTS[:2])
    scorer.onload()
    assert scorer(images, PROMPTS[:2]) == before


def test_model_entries_through_the_manager_and_their_key_checks(tiny_clip_dir):
    images = sample_images()
    manager = RewardManager(
        {
            "rewards": [
                {
                    "name": "pickscore",
                    "path": tiny_clip_dir,
                    "weight": 0.5,
                    "batch_size": 2,
                    "device": "cpu",
                    "num_gpus": 0,
                },
                {"name": "clipscore", "path": tiny_clip_dir, "processor_path": tiny_clip_dir, "dtype": "float32"},
            ]
        }
    )
    result = manager(images, PROMPTS, None)
    # batch_size 2 here against the scorer's default batch: float32 GEMMs over other row counts round differently
    # (a CI run saw 1.2e-6 relative), far below what a wrong image/prompt pairing would change.
    direct = CLIPScorer(tiny_clip_dir)(images, PROMPTS)
    np.testing.assert_allclose(result.per_reward["pickscore"], direct, rtol=1e-5)
    np.testing.assert_allclose(result.total, 0.5 * result.per_reward["pickscore"] + result.per_reward["clipscore"])

    with pytest.raises(ValueError) as err:
        RewardManager({"rewards": [{"name": "pickscore", "path": tiny_clip_dir, "batchsize": 8}]})
    message = str(err.value)
    assert "batchsize" in message and "'pickscore'" in message
    assert all(k in message for k in ("path", "batch_size", "num_gpus", "device", "dtype", "weight", "timeout_s"))
    with pytest.raises(ValueError, match=r"preprocess='gpu' is not one of \['processor', 'tensor'\]"):
        RewardManager({"rewards": [{"name": "clipscore", "path": tiny_clip_dir, "preprocess": "gpu"}]})
    with pytest.raises(ValueError, match=r"unknown keys \['url'\]"):  # another reward's option is still unknown here
        RewardManager({"rewards": [{"name": "brightness", "url": "http://127.0.0.1:1"}]})


# ---------------------------------------------------------------- the reward-model actor's request merging


@register_reward_factory("test_prompt_length_model", options=("offset",), model=True)
def _build_prompt_length_model(offset: float = 0.0):
    def prompt_length(images, prompts, metadata):
        if any("bad" in p for p in prompts):
            raise ValueError("bad prompt")
        return [offset + len(p) for p in prompts]

    return prompt_length


def _score_concurrently(actor, prompt_sets):
    async def run():
        return await asyncio.gather(
            *[actor.score([None] * len(ps), ps, [{}] * len(ps)) for ps in prompt_sets], return_exceptions=True
        )

    return asyncio.run(run())


def test_the_model_actor_merges_requests_that_wait_for_the_model():
    actor = RewardModelActor({"name": "test_prompt_length_model", "offset": 0.5})
    results = _score_concurrently(actor, [["a"], ["bb", "ccc"], ["dddd"]])
    assert results == [[1.5], [2.5, 3.5], [4.5]]
    assert actor.calls == [1, 3]  # the first request found the model free; the two that waited went together


def test_a_failing_request_in_a_merged_call_fails_alone():
    actor = RewardModelActor({"name": "test_prompt_length_model"})
    results = _score_concurrently(actor, [["a"], ["a bad one", "x"], ["yy"]])
    assert results[0] == [1.0] and results[2] == [2.0]
    assert isinstance(results[1], ValueError) and "bad prompt" in str(results[1])
    assert actor.calls == [1, 3, 2, 1]  # merged call failed, then each waiting request alone
