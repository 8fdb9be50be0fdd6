"""The http reward against a scoring service started here (stdlib server on 127.0.0.1), good and bad answers,
images and videos."""

import base64
import io
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

from verl_omni.core.video_io import mp4_unavailable_reason, read_video
from verl_omni.rewards import RewardComputationError, RewardManager, get_reward_fn


def decode_png(text: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(text))).convert("RGB"))


class ScoringService:
    """A scoring service whose answer the test chooses: ``answer(payload) -> (status, body bytes)``.

    Default answer: the mean pixel value of each decoded PNG in [0, 1] (so a correct round trip of the pixels
    gives exactly the brightness reward's scores).
    """

    def __init__(self):
        self.requests: list[dict] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.lock = threading.Lock()
        self.answer = self.brightness
        service = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with service.lock:
                    service.requests.append(payload)
                    service.in_flight += 1
                    service.max_in_flight = max(service.max_in_flight, service.in_flight)
                try:
                    status, body = service.answer(payload)
                finally:
                    with service.lock:
                        service.in_flight -= 1
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):  # keep pytest output clean
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/score"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @staticmethod
    def brightness(payload):
        scores = [float((decode_png(img).astype(np.float64) / 255.0).mean()) for img in payload["images"]]
        return 200, json.dumps({"scores": scores}).encode()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def service():
    s = ScoringService()
    yield s
    s.close()


def images(count: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (16, 24, 3), dtype=np.uint8) for _ in range(count)]


def http_manager(url: str, **options) -> RewardManager:
    return RewardManager({"rewards": [{"name": "http", "url": url, "timeout_s": 5, "backoff_s": 0.01, **options}]})


def test_scores_come_back_in_order_from_chunks_sent_with_bounded_concurrency(service):
    batch = images(7)
    prompts = [f"prompt {i}" for i in range(7)]
    metadata = [{"extra_info": {"index": np.int64(i)}, "reward_model": {"ground_truth": f"gt{i}"}} for i in range(7)]
    result = http_manager(service.url, batch_size=2, max_concurrency=2)(batch, prompts, metadata)

    expected = get_reward_fn("brightness")(batch, prompts, metadata)
    np.testing.assert_array_equal(result.per_reward["http"], expected)  # PNG is lossless: the exact pixels
    assert sorted(len(r["images"]) for r in service.requests) == [1, 2, 2, 2]
    assert service.max_in_flight <= 2
    sent = sorted(
        (p, m["extra_info"]["index"], m["reward_model"]["ground_truth"])
        for r in service.requests
        for p, m in zip(r["prompts"], r["metadata"], strict=True)
    )
    assert sent == [(f"prompt {i}", i, f"gt{i}") for i in range(7)]


@pytest.mark.parametrize(
    "body, expected",
    [
        (lambda n: {"scores": [0.5] * (n - 1)}, r"samples 0-2 .*2 scores for 3 images"),
        (lambda n: {"scores": [0.5, float("nan"), 0.5]}, r"sample 1 \(prompt 'p1'\).*nan is not finite"),
        (lambda n: {"scores": [0.5, 0.5, "0.7"]}, r"sample 2 \(prompt 'p2'\).*'0.7' \(str\) is not a number"),
        (lambda n: {"scores": [None, 0.5, 0.5]}, r"sample 0 \(prompt 'p0'\).*None \(NoneType\) is not a number"),
        (lambda n: {"score": [0.5] * n}, r'samples 0-2 .*expected \{"scores": \[numbers\]\}'),
        (lambda n: "not json at all", r"samples 0-2 .*not JSON"),
    ],
)
def test_a_bad_response_is_an_error_naming_the_url_and_the_sample(service, body, expected):
    def answer(payload):
        value = body(len(payload["images"]))
        return 200, (value.encode() if isinstance(value, str) else json.dumps(value).encode())

    service.answer = answer
    with pytest.raises(RewardComputationError, match=expected) as err:
        http_manager(service.url, retries=0)(images(3), ["p0", "p1", "p2"], None)
    assert service.url in str(err.value) and "reward 'http'" in str(err.value)
    assert len(service.requests) == 1  # a bad answer is not the kind of failure a retry fixes


def test_a_5xx_answer_is_retried_and_then_scored(service):
    def answer(payload):
        if len(service.requests) < 3:
            return 503, b'{"error": "warming up"}'
        return ScoringService.brightness(payload)

    service.answer = answer
    batch = images(2)
    result = http_manager(service.url, retries=3)(batch, ["a", "b"], None)
    assert len(service.requests) == 3
    np.testing.assert_array_equal(result.per_reward["http"], get_reward_fn("brightness")(batch, ["a", "b"], None))


def test_retries_run_out_with_an_error_naming_the_url_attempts_and_status(service):
    service.answer = lambda payload: (500, b"boom")
    with pytest.raises(RewardComputationError, match=r"samples 0-1 .*failed after 3 attempts.*HTTP 500: 'boom'"):
        http_manager(service.url, retries=2)(images(2), ["a", "b"], None)
    assert len(service.requests) == 3


def test_a_4xx_answer_is_not_retried(service):
    service.answer = lambda payload: (422, b'{"detail": "images must be 512x512"}')
    with pytest.raises(RewardComputationError, match=r"HTTP 422.*512x512"):
        http_manager(service.url, retries=3)(images(1), ["a"], None)
    assert len(service.requests) == 1


def test_connection_refused_is_retried_then_names_the_url():
    with socket.socket() as probe:  # a port that was free a moment ago and has no listener now
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/score"
    with pytest.raises(RewardComputationError) as err:
        http_manager(url, retries=2)(images(2), ["first prompt", "b"], None)
    message = str(err.value)
    assert url in message and "failed after 3 attempts" in message and "first prompt" in message
    assert "refused" in message.lower()


def test_bad_options_are_refused_naming_the_key_and_unknown_keys_list_the_allowed_ones():
    with pytest.raises(ValueError, match=r"max_concurrency=0 must be an int >= 1"):
        http_manager("http://127.0.0.1:1/score", max_concurrency=0)
    with pytest.raises(ValueError, match=r"url='127.0.0.1:1' must start with http"):
        http_manager("127.0.0.1:1")
    with pytest.raises(ValueError) as err:
        http_manager("http://127.0.0.1:1/score", retry=3)
    message = str(err.value)
    assert "retry" in message and all(k in message for k in ("url", "timeout_s", "max_concurrency", "retries"))


# ---------------------------------------------------------------- videos


def clips(count: int, frames: int = 4, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (frames, 16, 24, 3), dtype=np.uint8) for _ in range(count)]


def decode_mp4(text: str, tmp_path) -> np.ndarray:
    path = tmp_path / f"clip_{abs(hash(text))}.mp4"
    path.write_bytes(base64.b64decode(text))
    return read_video(str(path))


def test_videos_are_posted_as_lists_of_png_frames_in_the_documented_json(service):
    def answer(payload):  # per clip: the mean brightness of its decoded frames
        scores = [float(np.mean([decode_png(f).astype(np.float64) / 255 for f in v])) for v in payload["videos"]]
        return 200, json.dumps({"scores": scores}).encode()

    service.answer = answer
    batch = [*clips(2, frames=3), images(1)[0]]  # two videos and an image: all sent as clips
    result = http_manager(service.url, batch_size=2, fps=8)(batch, ["a", "b", "c"], [{"data_source": "x"}] * 3)

    first, second = sorted(service.requests, key=lambda r: r["prompts"])
    assert set(first) == {"videos", "video_format", "fps", "prompts", "metadata"}
    assert first["video_format"] == "frames" and first["fps"] == 8 and first["metadata"] == [{"data_source": "x"}] * 2
    assert [len(v) for v in first["videos"]] == [3, 3] and [len(v) for v in second["videos"]] == [1]
    np.testing.assert_array_equal(decode_png(first["videos"][1][2]), batch[1][2])  # lossless, frames in order
    expected = [np.mean(clip.astype(np.float64) / 255) for clip in batch]
    np.testing.assert_allclose(result.per_reward["http"], expected, rtol=1e-12)


@pytest.mark.skipif(bool(mp4_unavailable_reason()), reason="PyAV with libx264 is not installed")
def test_videos_are_posted_as_base64_mp4_clips_with_video_format_mp4(service, tmp_path):
    decoded = []

    def answer(payload):
        decoded.extend(decode_mp4(v, tmp_path) for v in payload["videos"])
        return 200, json.dumps({"scores": [0.5] * len(payload["videos"])}).encode()

    service.answer = answer
    batch = clips(2, frames=5)
    batch[1] = np.repeat(np.linspace(0, 255, 5, dtype=np.uint8)[:, None, None, None], 16 * 24 * 3, 1).reshape(
        5, 16, 24, 3
    )  # grey levels rising frame by frame: survives lossy coding
    http_manager(service.url, video_format="mp4")(batch, ["a", "b"], None)

    assert service.requests[0]["video_format"] == "mp4" and service.requests[0]["fps"] == 16
    assert [d.shape for d in decoded] == [(5, 16, 24, 3)] * 2
    np.testing.assert_allclose(decoded[1].mean(axis=(1, 2, 3)), batch[1].mean(axis=(1, 2, 3)), atol=3)


def test_image_batches_and_per_frame_entries_still_post_images(service):
    http_manager(service.url)(images(2), ["a", "b"], None)
    video = clips(1, frames=3)[0]
    result = http_manager(service.url, frame_reduction="max")([video], ["v"], None)
    assert [set(r) for r in service.requests] == [{"images", "prompts", "metadata"}] * 2
    assert len(service.requests[1]["images"]) == 3 and service.requests[1]["prompts"] == ["v"] * 3
    assert result.per_reward["http"][0] == pytest.approx(max(f.astype(np.float64).mean() / 255 for f in video))


def test_bad_video_options_are_refused_naming_the_key():
    with pytest.raises(ValueError, match=r"video_format='avi' must be one of \['frames', 'mp4'\]"):
        http_manager("http://127.0.0.1:1/score", video_format="avi")
    with pytest.raises(ValueError, match=r"reward 'http': fps=0 must be a number"):
        http_manager("http://127.0.0.1:1/score", fps=0)
