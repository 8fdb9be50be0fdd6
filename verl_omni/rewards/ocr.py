"""OCR reward: how well the image renders the text quoted in the prompt.

Score definition follows FlowGRPO (yifan123/flow_grpo, flow_grpo/ocr.py, ``OcrScorer.__call__``):
target = ``prompt.split('"')[1]``; recognised text = all boxes joined with ""; both lower-cased with spaces
removed; distance = 0 if the target is a substring of the recognised text, else the Levenshtein distance,
capped at len(target); reward = 1 - distance / len(target).
Differences, on purpose: rapidocr (PP-OCRv6 ONNX shipped in its wheel, offline) replaces PaddleOCR, and an OCR
exception propagates (FlowGRPO prints it and scores 0, which would silently train on a broken scorer).
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Optional

import numpy as np

from verl_omni.rewards.registry import register_reward

logger = logging.getLogger(__name__)

# Det.limit_type=max with 512 keeps detection at <=512 px: several times faster on CPU than rapidocr's default
# (min side upscaled to 736).
DET_LIMIT_SIDE_LEN = 512
_ENV_THREADS = "VERL_OMNI_OCR_THREADS"

_engine = None
_engine_pid: Optional[int] = None
_engine_lock = threading.Lock()


def ocr_num_threads() -> int:
    """onnxruntime intra-op threads: $VERL_OMNI_OCR_THREADS, else min(4, cpu count).

    Set explicitly: onnxruntime's default grabs every core, which oversubscribes reward workers sharing a host.
    """
    cpus = os.cpu_count() or 1
    requested = int(os.environ.get(_ENV_THREADS, min(4, cpus)))
    return max(1, min(requested, cpus))  # rapidocr ignores values outside 1..cpu_count


def get_ocr_engine():
    """One lazily created rapidocr engine per process (re-created after a fork)."""
    global _engine, _engine_pid
    with _engine_lock:
        if _engine is None or _engine_pid != os.getpid():
            from rapidocr import RapidOCR

            _engine = RapidOCR(
                params={
                    "Global.use_cls": False,  # FlowGRPO calls PaddleOCR with cls=False
                    "Global.log_level": "error",  # rapidocr warns on every image without text
                    "Det.limit_type": "max",
                    "Det.limit_side_len": DET_LIMIT_SIDE_LEN,
                    "EngineConfig.onnxruntime.intra_op_num_threads": ocr_num_threads(),
                    "EngineConfig.onnxruntime.inter_op_num_threads": 1,
                }
            )
            _engine_pid = os.getpid()
        return _engine


def recognize_text(image: np.ndarray) -> str:
    """All recognised boxes joined in reading order; "" when nothing is found (rapidocr gives txts=None)."""
    image = np.ascontiguousarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"OCR expects a uint8 HxWx3 image, got dtype {image.dtype} shape {image.shape}")
    engine = get_ocr_engine()
    with _engine_lock:  # one onnxruntime session per process, shared across reward threads
        result = engine(image)
    return "".join(result.txts) if result.txts else ""


def extract_quoted_target(prompt: str) -> str:
    """The text between the first pair of double quotes (FlowGRPO: ``prompt.split('"')[1]``)."""
    parts = prompt.split('"')
    if len(parts) < 3 or not parts[1].strip():
        raise ValueError(
            f"OCR reward needs the text to render inside double quotes in the prompt, found none in {prompt!r}"
        )
    return parts[1]


def levenshtein_distance(a: str, b: str) -> int:
    """Classic two-row dynamic programme; strings here are a few dozen characters."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        current = [i]
        for j, cb in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def ocr_text_score(recognized: str, target: str) -> float:
    """FlowGRPO's OCR reward in [0, 1] for already recognised text (see module docstring)."""
    recognized = recognized.replace(" ", "").lower()
    target = target.replace(" ", "").lower()
    if not target:
        raise ValueError("OCR target is empty after removing spaces")
    distance = 0 if target in recognized else levenshtein_distance(recognized, target)
    distance = min(distance, len(target))  # many unrelated characters cost no more than reading nothing
    return 1.0 - distance / len(target)


def _target_for(prompt: str, meta: Optional[dict]) -> str:
    # The trainer passes {"reward_model": {"ground_truth": ...}, ...} per sample (a flat "ground_truth" is
    # accepted too); the dataset's ground truth wins over the prompt's quoted text, which is the fallback.
    meta = meta or {}
    ground_truth = meta.get("ground_truth") or (meta.get("reward_model") or {}).get("ground_truth")
    return ground_truth if ground_truth else extract_quoted_target(prompt)


@register_reward("ocr")
def ocr_reward(images: list, prompts: list[str], metadata: list[dict]) -> list[float]:
    metadata = metadata or [{} for _ in prompts]
    targets = [_target_for(p, m) for p, m in zip(prompts, metadata, strict=False)]  # fail before spending OCR time
    return [ocr_text_score(recognize_text(img), target) for img, target in zip(images, targets, strict=False)]
