"""CLIP-family reward models (PickScore, CLIPScore) loaded from a local directory with transformers' own code.

Entry: ``{name: pickscore | clipscore, path: <dir with CLIPModel weights>, weight: ...}`` plus, optionally,
``processor_path`` (default ``path``; PickScore_v1 is usually paired with the laion CLIP-ViT-H-14 processor),
``device`` (auto | cpu | cuda[:i]), ``dtype`` (auto | float32 | bfloat16 | float16; auto = bf16 on a GPU, fp32 on CPU),
``batch_size`` (images per forward), ``preprocess`` (processor | tensor) and ``num_gpus`` (what a RewardPool's
reward-model actor asks Ray for: a fraction to share a GPU, 1 for its own; ignored when scored in-process).

Scores, with ``cos`` = cosine of the L2-normalised image and text embeddings (``get_image_features`` /
``get_text_features``, i.e. after the projections):

- ``pickscore = exp(logit_scale) * cos`` -- the PickScore model card's formula (the logits it softmaxes over images);
  flow_grpo's PickScoreScorer divides this by 26, i.e. ``weight: 0.03846`` gives its scale.
- ``clipscore = max(100 * cos, 0)`` -- torchmetrics' CLIPScore.

``preprocess: processor`` (default) runs the directory's CLIPProcessor (PIL resize, the reference). ``tensor`` does
the same steps (shortest-edge bicubic resize with antialias, center crop, rescale, normalise, with the processor's
own config values) in torch on the scorer's device: pixels differ from PIL by a few grey levels, and it keeps a
GPU scorer from waiting on one CPU core (~5 ms per 512x512 image through PIL).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import numpy as np

from verl_omni.rewards.registry import register_reward_factory

SCORE_KINDS = ("pickscore", "clipscore")
PREPROCESS_MODES = ("processor", "tensor")
DTYPE_NAMES = ("auto", "float32", "bfloat16", "float16")
CLIPSCORE_SCALE = 100.0
MODEL_OPTIONS = ("path", "processor_path", "device", "dtype", "batch_size", "preprocess", "num_gpus")


class CLIPScorer:
    """Batched image-text scorer around a ``CLIPModel``; callable as a reward function.

    ``offload()`` moves the weights to the CPU (e.g. while the actor trains on the same GPU) and refuses to score
    until ``onload()``: scoring a bf16 model on the CPU by accident would be silently slow.
    """

    def __init__(
        self,
        path: str,
        *,
        kind: str = "pickscore",
        processor_path: Optional[str] = None,
        device: str = "auto",
        dtype: str = "auto",
        batch_size: int = 32,
        preprocess: str = "processor",
    ):
        import torch
        from transformers import AutoProcessor, CLIPModel

        if kind not in SCORE_KINDS:
            raise ValueError(f"CLIP scorer kind={kind!r} is not one of {list(SCORE_KINDS)}")
        if preprocess not in PREPROCESS_MODES:
            raise ValueError(f"reward {kind!r}: preprocess={preprocess!r} is not one of {list(PREPROCESS_MODES)}")
        if dtype not in DTYPE_NAMES:
            raise ValueError(f"reward {kind!r}: dtype={dtype!r} is not one of {list(DTYPE_NAMES)}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"reward {kind!r}: batch_size={batch_size!r} must be an int >= 1")
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if dtype == "auto":
            dtype = "bfloat16" if device.startswith("cuda") else "float32"
        self.kind, self.batch_size, self.preprocess = kind, batch_size, preprocess
        self.device, self.home_device, self.offloaded = device, device, False
        self.dtype = getattr(torch, dtype)
        self.processor = AutoProcessor.from_pretrained(processor_path or path)
        self.model = CLIPModel.from_pretrained(path, dtype=self.dtype).eval().to(device)
        self.max_length = self.model.config.text_config.max_position_embeddings

    # -- placement --
    def offload(self) -> None:
        self.model.to("cpu")
        self.device, self.offloaded = "cpu", True

    def onload(self) -> None:
        self.model.to(self.home_device)
        self.device, self.offloaded = self.home_device, False

    # -- scoring --
    def __call__(self, images: list, prompts: list[str], metadata: Optional[list[dict]] = None) -> list[float]:
        if self.offloaded:
            raise RuntimeError(f"reward {self.kind!r} is offloaded to the CPU; call onload() before scoring")
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        scores: list[float] = []
        for start in range(0, len(images), self.batch_size):
            stop = start + self.batch_size
            scores.extend(self.score_batch(images[start:stop], prompts[start:stop]).tolist())
        return scores

    def score_batch(self, images: Sequence[np.ndarray], prompts: Sequence[str]):
        """One forward of both towers: float32 CPU tensor of scores, one per (image, prompt) pair."""
        import torch

        with torch.inference_mode():
            image_embeds = _pooled(self.model.get_image_features(pixel_values=self.pixel_values(images)))
            text = self.processor(
                text=list(prompts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
            )
            text_embeds = _pooled(
                self.model.get_text_features(
                    input_ids=text["input_ids"].to(self.device), attention_mask=text["attention_mask"].to(self.device)
                )
            )
            # Cosine in float32: a bf16 dot product of 1024-wide unit vectors loses the 3rd digit of the score.
            cos = (
                torch.nn.functional.normalize(image_embeds.float(), dim=-1)
                * torch.nn.functional.normalize(text_embeds.float(), dim=-1)
            ).sum(-1)
            if self.kind == "pickscore":
                scores = self.model.logit_scale.float().exp() * cos
            else:
                scores = (CLIPSCORE_SCALE * cos).clamp(min=0)
        return scores.cpu()

    def pixel_values(self, images: Sequence[np.ndarray]):
        """The model's pixel input for uint8 HxWx3 images, on the scorer's device and dtype."""
        import torch

        if self.preprocess == "processor":
            pixels = self.processor(images=[np.asarray(im) for im in images], return_tensors="pt")["pixel_values"]
        elif len({np.shape(im) for im in images}) == 1:  # a rollout group: one copy to the device, one resize
            pixels = self._tensor_pixels(np.stack(images))
        else:
            pixels = torch.cat([self._tensor_pixels(np.stack([im])) for im in images])
        return pixels.to(device=self.device, dtype=self.dtype)

    def _tensor_pixels(self, batch: np.ndarray):
        """CLIPImageProcessor's steps in torch on uint8 [B, H, W, 3], on the scorer's device (see module docstring)."""
        import torch
        import torch.nn.functional as F

        config = self.processor.image_processor
        x = torch.from_numpy(batch).to(self.device).permute(0, 3, 1, 2).float()
        height, width = x.shape[-2:]
        shortest = config.size["shortest_edge"]
        # transformers' get_resize_output_image_size: the short side becomes `shortest`, the long one
        # int(shortest * long / short).
        short, long = min(height, width), max(height, width)
        new_long = int(shortest * long / short)
        size = (shortest, new_long) if height <= width else (new_long, shortest)
        x = F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False)
        x = x.round().clamp(0, 255)  # PIL resizes to uint8
        crop_h, crop_w = config.crop_size["height"], config.crop_size["width"]
        top, left = (x.shape[-2] - crop_h) // 2, (x.shape[-1] - crop_w) // 2
        x = x[..., top : top + crop_h, left : left + crop_w] * config.rescale_factor
        mean = torch.tensor(config.image_mean, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(config.image_std, device=self.device).view(1, 3, 1, 1)
        return (x - mean) / std


def _pooled(output):
    """transformers >= 5 returns a model output whose pooler_output is the projected embedding; 4.x a tensor."""
    return output.pooler_output if hasattr(output, "pooler_output") else output


def _builder(kind: str):
    def build(
        path: str,
        processor_path: Optional[str] = None,
        device: str = "auto",
        dtype: str = "auto",
        batch_size: int = 32,
        preprocess: str = "processor",
        num_gpus: Optional[float] = None,
    ) -> CLIPScorer:
        del num_gpus  # placement of a RewardPool's model actor, not a scorer setting
        return CLIPScorer(
            path,
            kind=kind,
            processor_path=processor_path,
            device=device,
            dtype=dtype,
            batch_size=batch_size,
            preprocess=preprocess,
        )

    build.__name__ = build.__qualname__ = f"build_{kind}"
    return build


build_pickscore = register_reward_factory("pickscore", MODEL_OPTIONS, model=True)(_builder("pickscore"))
build_clipscore = register_reward_factory("clipscore", MODEL_OPTIONS, model=True)(_builder("clipscore"))
