"""Remote reward: a scoring service of the user's own, called over HTTP.

Entry: ``{name: http, url: http://host:port/score, weight: 1.0, timeout_s: 60, batch_size: 16,
max_concurrency: 4, retries: 3, backoff_s: 0.5, video_format: frames, fps: 16}`` (only ``url`` is required).

Request: ``POST <url>`` with ``Content-Type: application/json`` and the body::

    {"images":   ["<base64 of a PNG>", ...],   # RGB, the rollout's size, one per sample
     "prompts":  ["<prompt text>", ...],
     "metadata": [{...}, ...]}                # per sample: reward_model (ground_truth), data_source, extra_info

Videos (uint8 ``[F, H, W, 3]`` samples, F > 1): when any sample of a call is a video, every sample of it is sent as
one, in ``"videos"`` instead of ``"images"`` (an image as a clip of one frame), as the entry's ``video_format`` says::

    video_format: frames -> {"videos": [["<base64 PNG>", ...], ...],   # per sample its frames, in order
                             "video_format": "frames", "fps": 16, "prompts": [...], "metadata": [...]}
    video_format: mp4    -> {"videos": ["<base64 of an MP4 file>", ...],  # H.264, yuv420p (core/video_io.py)
                             "video_format": "mp4", "fps": 16, "prompts": [...], "metadata": [...]}

PNG frames are lossless and the service decodes them with any image library; an MP4 is much smaller but lossy,
and an odd width or height is padded by one edge row / column. With ``frame_reduction`` in the entry the service
gets each video's frames as images instead, and their scores are reduced per clip (``frames.py``).

Response: status 200, ``application/json`` body ``{"scores": [<number>, ...]}`` -- one finite real number per sample,
in request order. Anything else is an error naming the URL and the samples (never a silent 0): a wrong count,
NaN/inf, a string / bool / null score, a body that is not JSON or has no ``scores`` list, a 4xx status.

A batch is sent as chunks of ``batch_size`` images, at most ``max_concurrency`` requests in flight. A connection
error, a timeout (``timeout_s`` per request) or a 5xx status is retried ``retries`` times, waiting
``backoff_s * 2**attempt`` between attempts; then the error names the URL and the attempts.
"""

from __future__ import annotations

import base64
import concurrent.futures
import io
import json
import math
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any, Optional

import numpy as np
from PIL import Image

from verl_omni.core.media import as_frames, as_image, is_video
from verl_omni.core.video_io import check_fps, encode_mp4, mp4_unavailable_reason
from verl_omni.rewards.registry import RewardSampleError, is_real_number, register_reward_factory

HTTP_OPTIONS = ("url", "batch_size", "max_concurrency", "retries", "backoff_s", "video_format", "fps")
VIDEO_FORMATS = ("frames", "mp4")
_BODY_EXCERPT = 200


class _Retryable(Exception):
    """A failure worth another attempt: the service may be restarting or overloaded."""


def encode_png(image: np.ndarray) -> str:
    """base64 (ASCII) of the PNG of a uint8 HxWx3 image: lossless, so the service scores the exact pixels."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _json_default(value: Any):
    """Metadata from a DataProto holds numpy scalars and arrays; JSON needs their Python twins."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"metadata value {value!r} of type {type(value).__name__} is not JSON serialisable")


# the entry's keys are the constructor's; it takes images and whole videos (the module docstring)
@register_reward_factory("http", HTTP_OPTIONS, owns_timeout=True, media="any")
class HttpReward:
    """Reward function that POSTs samples to ``url`` (schema in the module docstring)."""

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float = 60.0,
        batch_size: int = 16,
        max_concurrency: int = 4,
        retries: int = 3,
        backoff_s: float = 0.5,
        video_format: str = "frames",
        fps: float = 16,
    ):
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ValueError(f"reward 'http': url={url!r} must start with http:// or https://")
        for key, value, low in (
            ("batch_size", batch_size, 1),
            ("max_concurrency", max_concurrency, 1),
            ("retries", retries, 0),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"reward 'http': {key}={value!r} must be an int >= {low}")
        for key, value in (("timeout_s", timeout_s), ("backoff_s", backoff_s)):
            if not is_real_number(value) or not value >= 0:
                raise ValueError(f"reward 'http': {key}={value!r} must be a number >= 0")
        if video_format not in VIDEO_FORMATS:
            raise ValueError(f"reward 'http': video_format={video_format!r} must be one of {list(VIDEO_FORMATS)}")
        if video_format == "mp4" and mp4_unavailable_reason():
            raise ValueError(
                f"reward 'http': video_format='mp4' cannot encode here: {mp4_unavailable_reason()}; "
                "use video_format: frames"
            )
        self.video_format, self.fps = video_format, check_fps(fps, "reward 'http': fps")
        self.url, self.timeout_s, self.batch_size = url, float(timeout_s), batch_size
        self.max_concurrency, self.retries, self.backoff_s = max_concurrency, retries, float(backoff_s)

    def __call__(self, images: list, prompts: list[str], metadata: Optional[list[dict]] = None) -> list[float]:
        metadata = metadata if metadata is not None else [{} for _ in images]
        chunks = [
            list(range(start, min(start + self.batch_size, len(images))))
            for start in range(0, len(images), self.batch_size)
        ]
        scores: list[float] = [math.nan] * len(images)
        videos = any(is_video(sample, f"sample {i}") for i, sample in enumerate(images))
        with concurrent.futures.ThreadPoolExecutor(self.max_concurrency, thread_name_prefix="http-reward") as pool:
            futures = {pool.submit(self._score_chunk, idx, images, prompts, metadata, videos): idx for idx in chunks}
            for future in concurrent.futures.as_completed(futures):
                for i, score in zip(futures[future], future.result(), strict=True):
                    scores[i] = score
        return scores

    def _score_chunk(self, indices: list[int], images, prompts, metadata, videos: bool) -> list[float]:
        try:
            media = (
                self._video_fields(indices, images)
                if videos
                else {"images": [encode_png(as_image(images[i], f"sample {i}")) for i in indices]}
            )
            body = json.dumps(
                {**media, "prompts": [prompts[i] for i in indices], "metadata": [metadata[i] for i in indices]},
                default=_json_default,
            ).encode()
        except TypeError as exc:
            raise RewardSampleError(indices, f"cannot encode the request to {self.url}: {exc}") from exc
        answer = self._post_with_retries(indices, body)
        return self._parse(indices, answer, "videos" if videos else "images")

    def _video_fields(self, indices: list[int], samples) -> dict[str, Any]:
        clips = [as_frames(samples[i], f"sample {i}") for i in indices]
        if self.video_format == "mp4":
            encoded = [base64.b64encode(encode_mp4(clip, self.fps)).decode("ascii") for clip in clips]
        else:
            encoded = [[encode_png(frame) for frame in clip] for clip in clips]
        return {"videos": encoded, "video_format": self.video_format, "fps": self.fps}

    def _post_with_retries(self, indices: list[int], body: bytes) -> bytes:
        last_error = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                return self._post(indices, body)
            except _Retryable as exc:
                last_error = str(exc)
        raise RewardSampleError(
            indices,
            f"scoring service {self.url} failed after {self.retries + 1} attempts "
            f"(retries={self.retries}); last error: {last_error}",
        )

    def _post(self, indices: list[int], body: bytes) -> bytes:
        request = urllib.request.Request(
            self.url, data=body, method="POST", headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                return response.read()
        except urllib.error.HTTPError as exc:  # a status >= 400: the service answered
            excerpt = exc.read()[:_BODY_EXCERPT].decode("utf-8", "replace")
            if exc.code >= 500:
                raise _Retryable(f"HTTP {exc.code}: {excerpt!r}") from exc
            detail = f"scoring service {self.url} answered HTTP {exc.code}: {excerpt!r}"
            raise RewardSampleError(indices, detail) from exc
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as exc:  # refused, reset, timed out
            raise _Retryable(f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}") from exc

    def _parse(self, indices: list[int], answer: bytes, sent: str = "images") -> list[float]:
        def bad(detail: str, at: Sequence[int] = indices) -> RewardSampleError:
            return RewardSampleError(at, f"bad response from scoring service {self.url}: {detail}")

        try:
            payload = json.loads(answer)
        except ValueError:
            raise bad(f"not JSON: {answer[:_BODY_EXCERPT]!r}") from None
        scores = payload.get("scores") if isinstance(payload, dict) else None
        if not isinstance(scores, list):
            raise bad(f'expected {{"scores": [numbers]}}, got {str(payload)[:_BODY_EXCERPT]!r}')
        if len(scores) != len(indices):
            raise bad(f"{len(scores)} scores for {len(indices)} {sent}")
        for i, score in zip(indices, scores, strict=True):
            if not is_real_number(score):
                raise bad(f"score {score!r} ({type(score).__name__}) is not a number", [i])
            if not math.isfinite(score):
                raise bad(f"score {score!r} is not finite", [i])
        return [float(s) for s in scores]
