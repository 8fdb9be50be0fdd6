"""OCR accuracy as flow_grpo measures it, and an exact-match rate, from one OCR pass per image.

Accuracy is the ``ocr`` reward's own formula (``rewards.ocr.ocr_text_score``: 1 - capped edit distance / target
length, 1 when the target appears in the recognised text). Exact match is stricter: the recognised text equals the
target once both are lower-cased with spaces removed (nothing missing, nothing extra).
"""

from __future__ import annotations

import numpy as np

from verl_omni.rewards.ocr import extract_quoted_target, ocr_text_score, recognize_text


def _normalise(text: str) -> str:
    return text.replace(" ", "").lower()


def ocr_exact_match(recognized: str, target: str) -> bool:
    return _normalise(recognized) == _normalise(target)


def ocr_target(prompt: str, metadata: dict) -> str:
    """The dataset's ground truth when it has one, else the prompt's quoted text (as the ``ocr`` reward reads it)."""
    truth = (metadata.get("reward_model") or {}).get("ground_truth") or metadata.get("ground_truth")
    return truth if truth else extract_quoted_target(prompt)


class RecordingOcr:
    """The ``ocr`` reward's function that also keeps what it read: the evaluation passes it to the reward manager
    in place of the registered one (``RewardManager(reward_fns=...)``), so each image is read once."""

    def __init__(self):
        self.texts: list[str] = []
        self.targets: list[str] = []

    def __call__(self, images: list, prompts: list[str], metadata: list[dict]) -> list[float]:
        targets = [ocr_target(p, m or {}) for p, m in zip(prompts, metadata, strict=True)]
        texts = [recognize_text(np.asarray(image)) for image in images]
        self.texts, self.targets = texts, targets
        return [ocr_text_score(text, target) for text, target in zip(texts, targets, strict=True)]

    def take(self) -> list[dict]:
        """Per image of the last call: recognised text, target, exact match."""
        rows = [
            {"ocr_text": t, "ocr_target": g, "ocr_exact": ocr_exact_match(t, g)}
            for t, g in zip(self.texts, self.targets, strict=True)
        ]
        self.texts, self.targets = [], []
        return rows
