"""JPEG (in)compressibility rewards, as FlowGRPO defines them (yifan123/flow_grpo, flow_grpo/rewards.py).

``jpeg_incompressibility``: size in kB (1 kB = 1000 bytes) of the image saved as JPEG at quality 95.
``jpeg_compressibility``: ``-size_kB / 500`` (FlowGRPO divides by 500 to keep the reward near unit scale;
DDPO's original used ``-size_kB``). ``jpeg`` is an alias of ``jpeg_compressibility``.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from verl_omni.rewards.registry import register_reward

JPEG_QUALITY = 95
COMPRESSIBILITY_SCALE = 500.0


def jpeg_size_kb(image: np.ndarray) -> float:
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)).save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.tell() / 1000


@register_reward("jpeg_incompressibility")
def jpeg_incompressibility(images: list, prompts: list[str], metadata: list[dict]) -> list[float]:
    return [jpeg_size_kb(image) for image in images]


@register_reward("jpeg")
@register_reward("jpeg_compressibility")
def jpeg_compressibility(images: list, prompts: list[str], metadata: list[dict]) -> list[float]:
    return [-jpeg_size_kb(image) / COMPRESSIBILITY_SCALE for image in images]
