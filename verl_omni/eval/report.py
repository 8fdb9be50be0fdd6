"""The evaluation report (``<out>/report.json``): what was evaluated, how, and every prompt's scores.

It is rewritten atomically as prompts finish, so a long evaluation can stop and resume: a rerun with the same
model, adapter, protocol, rewards and prompt file skips the prompts the report lists as done.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from typing import Any, Optional

import numpy as np
from PIL import Image, ImageDraw

from verl_omni.core.media import as_image, is_video
from verl_omni.core.video_io import read_video, write_video
from verl_omni.trainer.media_outputs import DEFAULT_VIDEO_FPS

REPORT_FILE = "report.json"
# The fields that must match for a rerun to continue an existing report instead of refusing it.
IDENTITY_KEYS = ("model", "checkpoint", "protocol", "rewards", "prompts")


def read_report(out_dir: str) -> Optional[dict]:
    path = os.path.join(out_dir, REPORT_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        try:
            return json.load(f)
        except ValueError as exc:
            raise ValueError(f"{path} is not valid JSON ({exc}); move it away or pass --overwrite") from None


def check_resumable(report: dict, header: dict, out_dir: str) -> None:
    """Raise naming the first field that differs between an existing report and this evaluation."""
    for key in IDENTITY_KEYS:
        if report.get(key) != header[key]:
            raise ValueError(
                f"{os.path.join(out_dir, REPORT_FILE)} was written by another evaluation ({key!r} differs: "
                f"{report.get(key)!r:.200} vs {header[key]!r:.200}); pass --overwrite to start over, or another --out"
            )


def write_report(out_dir: str, report: dict) -> str:
    path = os.path.join(out_dir, REPORT_FILE)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=1)
    os.replace(tmp, path)
    return path


def add_row(report: dict, row: dict) -> None:
    """One evaluated prompt: its row, and its index among those done."""
    report["per_prompt"].append(row)
    report["done"].append(row["index"])


def sort_rows(report: dict) -> None:
    """Rows by prompt index, whichever order (worker, resume) they were evaluated in."""
    report["per_prompt"].sort(key=lambda p: p["index"])
    report["done"].sort()


def timing_entry(
    prompts: int,
    images: int,
    seconds: float,
    devices: int,
    batch_images: Optional[int] = None,
    steady: Optional[tuple[int, float]] = None,
) -> dict[str, Any]:
    """One run's throughput: images per second over all its devices, from the engines ready to the last image;
    ``batch_images``: the images per engine call it asked for (``--batch-images``); ``steady``: (images, seconds)
    after the first engine call returned, which leaves out the compilation the first call pays
    (``steady_images_per_s``, the figure a training rollout's steady steps compare with)."""
    entry = {
        "prompts": prompts,
        "images": images,
        "seconds": seconds,
        "images_per_s": images / seconds if seconds > 0 else 0.0,
        "devices": devices,
    }
    if batch_images is not None:
        entry["batch_images"] = batch_images
    if steady is not None and steady[1] > 0 and steady[0] > 0:
        entry.update(steady_images=steady[0], steady_seconds=steady[1], steady_images_per_s=steady[0] / steady[1])
    return entry


def mean_and_stderr(values: Sequence[float]) -> dict[str, float]:
    """Mean and its standard error (sample std / sqrt(n); 0 for a single value)."""
    arr = np.asarray(values, dtype=np.float64)
    stderr = float(arr.std(ddof=1) / math.sqrt(len(arr))) if len(arr) > 1 else 0.0
    return {"mean": float(arr.mean()), "stderr": stderr, "n": len(arr)}


def summarize(per_prompt: Sequence[dict], reward_names: Sequence[str]) -> dict[str, Any]:
    """Per reward (and the weighted ``total``): the mean over images and the standard error over prompts (images
    of one prompt are not independent draws: the prompt means are). OCR accuracy and exact-match rate when the
    prompts carry OCR readings."""
    summary: dict[str, Any] = {"prompts": len(per_prompt), "images": sum(len(p["seeds"]) for p in per_prompt)}
    for name in ("total", *reward_names):
        images = [s for p in per_prompt for s in p["scores"][name]]
        by_prompt = [float(np.mean(p["scores"][name])) for p in per_prompt]
        summary[name] = {**mean_and_stderr(by_prompt), "mean": float(np.mean(images))}
    ocr = [row for p in per_prompt for row in p.get("ocr", [])]
    if ocr:
        summary["ocr_accuracy"] = summary["ocr"]["mean"]  # flow_grpo's figure: the OCR reward's mean
        summary["ocr_exact_match"] = float(np.mean([row["ocr_exact"] for row in ocr]))
    return summary


def save_images(folder: str, index: int, images: Sequence[np.ndarray], fps: float = DEFAULT_VIDEO_FPS) -> list[str]:
    """Each sample of a prompt as ``<index>_<j>.png`` (an image ``[H, W, 3]``) or ``.mp4`` (a clip ``[F, H, W, 3]``
    at ``fps``; animated WebP where MP4 cannot be encoded); the file names."""
    os.makedirs(folder, exist_ok=True)
    names = []
    for j, image in enumerate(images):
        stem = os.path.join(folder, f"{index:05d}_{j}")
        if is_video(image, f"prompt {index} sample {j}"):
            names.append(os.path.basename(write_video(stem + ".mp4", image, fps, field=f"prompt {index} sample {j}")))
            continue
        Image.fromarray(as_image(image, f"prompt {index} sample {j}")).save(stem + ".png")
        names.append(os.path.basename(stem) + ".png")
    return names


def _first_frame(path: str) -> Image.Image:
    """A saved sample as one picture: the image, or a clip's first frame."""
    if path.lower().endswith(".mp4"):
        return Image.fromarray(read_video(path)[0])
    with Image.open(path) as image:  # an animated WebP opens at its first frame
        return image.convert("RGB")


def write_grids(out_dir: str, per_prompt: Sequence[dict], prompts_per_grid: int = 16, caption: int = 30) -> list[str]:
    """Grids of the saved images (a clip's first frame): one row per prompt (its images side by side), the prompt and
    each image's total score written under it; ``grids/grid_<first>-<last>.png`` per ``prompts_per_grid`` prompts."""
    folder = os.path.join(out_dir, "grids")
    os.makedirs(folder, exist_ok=True)
    written = []
    rows = sorted(per_prompt, key=lambda p: p["index"])
    for start in range(0, len(rows), prompts_per_grid):
        chunk = rows[start : start + prompts_per_grid]
        images = [[_first_frame(os.path.join(out_dir, "images", n)) for n in p["images"]] for p in chunk]
        w, h = images[0][0].size
        cell_w = max(w, 160)
        columns = max(len(r) for r in images)
        grid = Image.new("RGB", (columns * cell_w, len(chunk) * (h + caption)), "white")
        draw = ImageDraw.Draw(grid)
        for r, (p, row) in enumerate(zip(chunk, images, strict=True)):
            y = r * (h + caption)
            for c, image in enumerate(row):
                grid.paste(image, (c * cell_w, y))
                draw.text((c * cell_w + 2, y + h + 14), f"{p['scores']['total'][c]:.3f}", fill="black")
            draw.text((2, y + h + 1), f"{p['index']}: {p['prompt'][:60]}", fill="black")
        path = os.path.join(folder, f"grid_{chunk[0]['index']:05d}-{chunk[-1]['index']:05d}.png")
        grid.save(path)
        written.append(path)
    return written
