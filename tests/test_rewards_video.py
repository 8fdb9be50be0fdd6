"""Rewards on videos: image rewards per frame with a reduction, temporal consistency, custom video functions."""

import numpy as np
import pytest

from verl_omni.rewards import RewardComputationError, RewardManager, get_reward_fn, register_reward
from verl_omni.rewards.registry import RewardSampleError, reward_media
from verl_omni.rewards.temporal import temporal_consistency_score


def clips(count: int, frames: int = 5, size=(16, 24), seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (frames, *size, 3), dtype=np.uint8) for _ in range(count)]


def manager(name: str, **entry) -> RewardManager:
    return RewardManager({"rewards": [{"name": name, **entry}]})


CALLS: list[list[tuple]] = []  # the shapes each call of the recording reward received


@register_reward("test_video_recorded_brightness")
def recorded_brightness(images, prompts, metadata):
    CALLS.append([np.shape(i) for i in images])
    return get_reward_fn("brightness")(images, prompts, metadata)


REDUCE = {"mean": np.mean, "min": np.min, "max": np.max, "first": lambda s: s[0], "last": lambda s: s[-1]}


@pytest.mark.parametrize("name", ["brightness", "jpeg_incompressibility"])
@pytest.mark.parametrize("reduction", list(REDUCE))
def test_an_image_reward_on_a_video_is_its_frame_by_frame_score_reduced(name, reduction):
    videos = clips(3, frames=4)
    prompts, metadata = ["a", "b", "c"], [{}, {}, {}]
    scores = manager(name, frame_reduction=reduction)(videos, prompts, metadata).per_reward[name]

    image_reward = get_reward_fn(name)
    per_frame = [[image_reward([frame], [p], [{}])[0] for frame in v] for v, p in zip(videos, prompts, strict=True)]
    expected = [REDUCE[reduction](scores) for scores in per_frame]
    np.testing.assert_allclose(scores, expected, rtol=1e-12)


def test_the_default_reduction_is_the_mean_over_every_frame():
    videos = clips(2, frames=6)
    scores = manager("brightness")(videos, ["a", "b"], None).per_reward["brightness"]
    np.testing.assert_allclose(scores, [v.astype(np.float64).mean() / 255 for v in videos], rtol=1e-12)


def test_frame_stride_scores_every_kth_frame_and_all_frames_go_in_one_call():
    videos = clips(2, frames=7)
    CALLS.clear()
    scores = manager("test_video_recorded_brightness", frame_reduction="max", frame_stride=3)(
        videos, ["a", "b"], None
    ).per_reward["test_video_recorded_brightness"]
    assert CALLS == [[(16, 24, 3)] * 6]  # frames 0, 3, 6 of both clips, in one batch
    expected = [max(v[t].astype(np.float64).mean() / 255 for t in (0, 3, 6)) for v in videos]
    np.testing.assert_allclose(scores, expected, rtol=1e-12)


def test_a_batch_of_images_reaches_an_image_reward_unchanged():
    images = [c[0] for c in clips(3)]
    CALLS.clear()
    result = manager("test_video_recorded_brightness", frame_reduction="min")(images, ["a", "b", "c"], None)
    assert CALLS == [[(16, 24, 3)] * 3]
    np.testing.assert_allclose(
        result.per_reward["test_video_recorded_brightness"], get_reward_fn("brightness")(images, [""] * 3, [{}] * 3)
    )


def test_an_image_with_a_frame_axis_scores_as_the_image():
    image = clips(1, frames=1)[0]
    scores = manager("brightness")([image, image[0]], ["a", "b"], None).per_reward["brightness"]
    assert scores[0] == scores[1] == pytest.approx(image.astype(np.float64).mean() / 255)


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"frame_reduction": "median"}, r"reward.rewards\[0\].frame_reduction='median' must be one of \['mean'"),
        ({"frame_stride": 0}, r"reward.rewards\[0\].frame_stride=0 must be an int >= 1"),
        ({"frame_stride": True}, r"frame_stride=True must be an int >= 1"),
        ({"frame_reduction": "first", "frame_stride": 2}, r"frame_stride=2 does nothing with frame_reduction='first'"),
    ],
)
def test_bad_frame_options_are_refused_naming_the_key(entry, message):
    with pytest.raises(ValueError, match=message):
        manager("brightness", **entry)


def test_a_non_number_for_a_frame_names_the_sample_and_the_frame(tmp_path):
    path = tmp_path / "r.py"
    path.write_text(
        "def score(images, prompts, metadata):\n    return [None if image.mean() == 7 else 0.5 for image in images]\n"
    )
    videos = clips(3, frames=3)
    videos[2][1] = 7
    custom = RewardManager({"custom_reward_function": {"path": str(path), "name": "score"}})
    with pytest.raises(RewardComputationError, match=r"sample 2 \(prompt 'c'\).*its frame 1: None"):
        custom(videos, ["a", "b", "c"], None)


@register_reward("test_video_failing_frames")
def failing_frames(images, prompts, metadata):
    raise RewardSampleError([3], "frame scorer refused it")


def test_a_reward_naming_a_failing_frame_names_its_sample():
    with pytest.raises(RewardComputationError, match=r"sample 1 \(prompt 'b'\).*frame scorer refused it"):
        manager("test_video_failing_frames")(clips(2, frames=3), ["a", "b"], None)  # frame 3 = sample 1, frame 0


def test_a_float_video_is_refused_naming_the_sample():
    videos = clips(2)
    videos[1] = videos[1].astype(np.float32) / 255
    with pytest.raises(RewardComputationError, match=r"sample 1 .*expected uint8 RGB"):
        manager("brightness")(videos, ["a", "b"], None)


# ---------------------------------------------------------------- temporal consistency


def static(value: int = 90, frames: int = 6) -> np.ndarray:
    rng = np.random.default_rng(value)
    return np.repeat(rng.integers(0, 256, (1, 32, 40, 3), dtype=np.uint8), frames, axis=0)


def flicker(frames: int = 6) -> np.ndarray:
    clip = np.zeros((frames, 32, 40, 3), np.uint8)
    clip[::2] = 255
    return clip


def panning(frames: int = 6) -> np.ndarray:
    """A smooth gradient moving one pixel per frame: slow motion."""
    ramp = np.tile(np.linspace(0, 255, 80).astype(np.uint8), (32, 1))
    return np.stack([np.repeat(ramp[:, t : t + 40, None], 3, axis=2) for t in range(frames)])


def test_temporal_consistency_ranks_static_over_slow_motion_over_flicker_within_0_and_1():
    scores = manager("temporal_consistency")([static(), panning(), flicker()], ["s", "p", "f"], None)
    s, p, f = scores.per_reward["temporal_consistency"]
    assert s == 1.0 and f == 0.0
    assert 0.9 < p < 1.0


def test_temporal_consistency_is_one_minus_the_mean_absolute_luma_change():
    """Two grey levels alternating by 51/255: every consecutive pair differs by 0.2 in luma."""
    clip = np.full((5, 8, 8, 3), 100, np.uint8)
    clip[1::2] = 151
    assert temporal_consistency_score(clip) == pytest.approx(0.8)
    half = clip.copy()
    half[:, :4] = 100  # half of each frame still: half the change
    assert temporal_consistency_score(half) == pytest.approx(0.9)


def test_temporal_consistency_refuses_images_naming_them():
    with pytest.raises(RewardComputationError, match=r"sample 1 \(prompt 'img'\).*2 or more frames"):
        manager("temporal_consistency")([static(), static()[0]], ["vid", "img"], None)


def test_temporal_consistency_takes_no_frame_options():
    assert reward_media("temporal_consistency") == "video" and reward_media("ocr") == "image"
    with pytest.raises(ValueError, match=r"reward.rewards\[0\].frame_reduction does not apply"):
        manager("temporal_consistency", frame_reduction="mean")


# ---------------------------------------------------------------- custom functions


def test_a_custom_video_function_receives_whole_clips_and_images_as_one_frame(tmp_path):
    path = tmp_path / "video_reward.py"
    path.write_text(
        "def frames_times(videos, prompts, metadata, scale=1.0):\n"
        "    assert all(v.ndim == 4 and v.shape[-1] == 3 for v in videos)\n"
        "    return [scale * v.shape[0] for v in videos]\n"
    )
    custom = {"path": str(path), "name": "frames_times", "media": "video", "reward_kwargs": {"scale": 2.0}}
    samples = [clips(1, frames=5)[0], clips(1, frames=1)[0][0]]  # a video and a plain [H, W, 3] image
    result = RewardManager({"custom_reward_function": custom})(samples, ["a", "b"])
    np.testing.assert_allclose(result.per_reward["custom/frames_times"], [10.0, 2.0])


def test_a_custom_image_function_scores_frames_with_the_chosen_reduction(tmp_path):
    path = tmp_path / "image_reward.py"
    path.write_text("def mean_pixel(images, prompts, metadata):\n    return [float(i.mean()) for i in images]\n")
    custom = {"path": str(path), "name": "mean_pixel", "frame_reduction": "last"}
    videos = clips(2, frames=3)
    result = RewardManager({"custom_reward_function": custom})(videos, ["a", "b"])
    np.testing.assert_allclose(result.per_reward["custom/mean_pixel"], [v[-1].mean() for v in videos])


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"media": "clip"}, r"reward.custom_reward_function.media='clip' must be 'image'"),
        ({"media": "video", "frame_stride": 2}, r"reward.custom_reward_function.frame_stride does not apply"),
    ],
)
def test_bad_custom_media_options_are_refused_naming_the_key(tmp_path, extra, message):
    path = tmp_path / "r.py"
    path.write_text("def f(videos, prompts, metadata):\n    return [0.0] * len(videos)\n")
    with pytest.raises(ValueError, match=message):
        RewardManager({"custom_reward_function": {"path": str(path), "name": "f", **extra}})
