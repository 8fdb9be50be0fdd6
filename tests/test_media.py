"""The media convention (uint8 [F, H, W, 3], an image one frame), videos written as MP4 / WebP / GIF, and the
sample / validation files a run writes for images and videos."""

import logging
import os

import numpy as np
import pytest
from PIL import Image

from verl_omni.core import video_io
from verl_omni.core.media import as_frames, as_image, batch_is_video, check_media, is_video, num_frames
from verl_omni.core.video_io import encode_mp4, mp4_unavailable_reason, read_video, write_video
from verl_omni.trainer.media_outputs import validation_grid, write_samples, write_validation
from verl_omni.trainer.run_summary import summary_text

needs_mp4 = pytest.mark.skipif(bool(mp4_unavailable_reason()), reason="PyAV with libx264 is not installed")


def moving_square(frames: int = 6, height: int = 32, width: int = 48) -> np.ndarray:
    """A white square moving right on black: every frame differs, and the motion survives lossy coding."""
    clip = np.zeros((frames, height, width, 3), np.uint8)
    for t in range(frames):
        clip[t, 8:24, 4 + 4 * t : 20 + 4 * t] = 255
    return clip


def test_an_image_is_one_frame_and_a_video_keeps_its_frames():
    image = np.zeros((4, 5, 3), np.uint8)
    assert as_frames(image).shape == (1, 4, 5, 3) and num_frames(image) == 1 and not is_video(image)
    assert np.shares_memory(as_frames(image), image)
    video = np.zeros((3, 4, 5, 3), np.uint8)
    assert as_frames(video).shape == (3, 4, 5, 3) and num_frames(video) == 3 and is_video(video)
    assert not is_video(video[:1]) and as_image(video[:1]).shape == (4, 5, 3)
    assert batch_is_video(np.zeros((2, 3, 4, 5, 3), np.uint8))
    assert not batch_is_video(np.zeros((2, 4, 5, 3), np.uint8)) and not batch_is_video(np.zeros((2, 1, 4, 5, 3)))


@pytest.mark.parametrize(
    "value, message",
    [
        (np.zeros((4, 5, 3), np.float32), r"videos\[2\]: expected uint8 RGB .* got dtype float32"),
        (np.zeros((4, 5), np.uint8), r"videos\[2\]: expected shape \[H, W, 3\] .* got \[4, 5\]"),
        (np.zeros((2, 4, 5, 4), np.uint8), r"got \[2, 4, 5, 4\]"),
        (np.zeros((0, 4, 5, 3), np.uint8), r"videos\[2\]: has an empty axis"),
    ],
)
def test_bad_media_is_refused_naming_the_field(value, message):
    with pytest.raises(ValueError, match=message):
        check_media(value, "videos[2]")


def test_as_image_refuses_a_video():
    with pytest.raises(ValueError, match=r"sample 0: expected an image \(one frame\), got a video of 3 frames"):
        as_image(np.zeros((3, 4, 5, 3), np.uint8), "sample 0")


@needs_mp4
@pytest.mark.parametrize("size", [(32, 48), (31, 47)])
def test_mp4_is_written_and_read_back_with_its_frame_count_and_size(tmp_path, size):
    clip = moving_square(7, *size)
    path = write_video(str(tmp_path / "clip.mp4"), clip, fps=8)
    assert path.endswith(".mp4")
    back = read_video(path)
    even = (size[0] + size[0] % 2, size[1] + size[1] % 2)  # yuv420p: an odd side gains one edge row / column
    assert back.shape == (7, *even, 3)
    assert np.abs(back[:, : size[0], : size[1]].astype(int) - clip).mean() < 8  # lossy, yet the same frames
    import av

    with av.open(path) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264" and stream.average_rate == 8


@needs_mp4
def test_mp4_bytes_decode_to_the_clip(tmp_path):
    clip = moving_square(5)
    (tmp_path / "b.mp4").write_bytes(encode_mp4(clip, fps=16))
    back = read_video(str(tmp_path / "b.mp4"))
    assert back.shape == clip.shape and np.abs(back.astype(int) - clip).mean() < 8


@pytest.mark.parametrize("suffix", [".webp", ".gif"])
def test_animations_are_written_and_read_back_with_their_frames(tmp_path, suffix):
    clip = moving_square(6)
    clip[3] = clip[2]  # a repeated frame: stored once, for two frame periods
    path = write_video(str(tmp_path / f"clip{suffix}"), clip, fps=8)
    back = read_video(path, fps=8)
    assert back.shape == clip.shape
    assert np.abs(back.astype(int) - clip).mean() < 8


def test_without_an_mp4_encoder_an_animated_webp_is_written_and_that_is_logged_once(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(video_io, "mp4_unavailable_reason", lambda: "PyAV is not installed (pip install av)")
    video_io._log_fallback_once.cache_clear()
    with caplog.at_level(logging.WARNING, logger=video_io.__name__):
        paths = [write_video(str(tmp_path / f"{i}.mp4"), moving_square(3), fps=4) for i in range(2)]
    assert paths == [str(tmp_path / "0.webp"), str(tmp_path / "1.webp")]
    assert read_video(paths[0], fps=4).shape == (3, 32, 48, 3)
    warnings = [r.getMessage() for r in caplog.records if "animated WebP instead of MP4" in r.getMessage()]
    assert warnings == ["videos are written as animated WebP instead of MP4: PyAV is not installed (pip install av)"]
    video_io._log_fallback_once.cache_clear()


def test_an_unknown_suffix_or_fps_is_refused_naming_it(tmp_path):
    with pytest.raises(ValueError, match=r"must end in one of \['.mp4', '.webp', '.gif'\]"):
        write_video(str(tmp_path / "clip.avi"), moving_square(2))
    with pytest.raises(ValueError, match=r"fps=-1 must be a number"):
        write_video(str(tmp_path / "clip.gif"), moving_square(2), fps=-1)


# ---------------------------------------------------------------- what a run writes


def test_sample_images_stay_png_and_sample_videos_become_mp4(tmp_path):
    images = np.stack([moving_square(1)[0]] * 3)
    paths = write_samples(str(tmp_path / "img"), images, np.array([0.5, 0.25, 1.0]), limit=2, fps=8)
    assert [os.path.basename(p) for p in paths] == ["000_reward0.500.png", "001_reward0.250.png"]
    np.testing.assert_array_equal(np.asarray(Image.open(paths[1])), images[1])

    videos = np.stack([moving_square(5)] * 2)
    paths = write_samples(str(tmp_path / "vid"), videos, np.array([0.5, 0.25]), limit=4, fps=8)
    assert [os.path.splitext(os.path.basename(p)) for p in paths] == [
        ("000_reward0.500", ".mp4" if not mp4_unavailable_reason() else ".webp"),
        ("001_reward0.250", ".mp4" if not mp4_unavailable_reason() else ".webp"),
    ]
    assert read_video(paths[0], fps=8).shape == (5, 32, 48, 3)


def test_a_validation_video_is_a_clip_of_per_frame_grids_beside_a_png_of_its_first_frame(tmp_path):
    videos = np.stack([moving_square(4), 255 - moving_square(4)])
    prompts, scores = ["a square", "its negative"], np.array([0.1, 0.9])
    grid, clip_path = write_validation(str(tmp_path / "validation"), "step_3", videos, prompts, scores, fps=8)

    first = np.asarray(validation_grid(videos[:, 0], prompts, scores))
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "validation" / "step_3.png")), first)
    np.testing.assert_array_equal(np.asarray(grid), first)
    clip = read_video(clip_path, fps=8)
    assert clip.shape == (4, *first.shape)
    last = np.asarray(validation_grid(videos[:, 3], prompts, scores))
    assert np.abs(clip[3].astype(int) - last).mean() < np.abs(clip[3].astype(int) - first).mean()
    assert f"validation clip: {clip_path}" in summary_text(str(tmp_path), [], [])  # the run summary names it


def test_a_validation_batch_of_images_gives_the_png_grid_only(tmp_path):
    images = np.stack([moving_square(1)[0]] * 2)
    grid, clip_path = write_validation(str(tmp_path), "step_1", images, ["a", "b"], np.array([0.0, 1.0]), fps=8)
    assert clip_path is None and sorted(os.listdir(tmp_path)) == ["step_1.png"]
    np.testing.assert_array_equal(np.asarray(grid), np.asarray(validation_grid(images, ["a", "b"], [0.0, 1.0])))
