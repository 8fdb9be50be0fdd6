"""End of a run: the reward curve as a PNG and a short text summary of what the run did and where its outputs are.

A newcomer running the demo should see at a glance whether training worked (reward at the start and at the end,
measured in units of the first step's spread) and where to look next (samples, validation grid, checkpoint,
tensorboard). matplotlib draws the curve when it is installed; otherwise Pillow (a core dependency) does.
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Sequence
from typing import Optional

REWARD_KEY = "reward/total/mean"
REWARD_STD_KEY = "reward/total/std"
CURVE_FILE = "reward_curve.png"
TAIL_STEPS = 5  # the end of the run is the mean of this many last steps: one step's mean is noisy


def write_run_summary(
    output_dir: str, history: Sequence[dict], steps: Sequence[int], tensorboard_dir: Optional[str] = None
) -> str:
    """Write ``<output_dir>/reward_curve.png`` (when any step was trained) and return the summary text."""
    curve = None
    if history:
        curve = os.path.join(output_dir, CURVE_FILE)
        plot_reward_curve(steps, [h[REWARD_KEY] for h in history], [h.get(REWARD_STD_KEY, 0.0) for h in history], curve)
    return summary_text(output_dir, history, steps, curve, tensorboard_dir)


def summary_text(
    output_dir: str,
    history: Sequence[dict],
    steps: Sequence[int],
    curve: Optional[str] = None,
    tensorboard_dir: Optional[str] = None,
) -> str:
    lines = ["", "=" * 24 + " run summary " + "=" * 24]
    if not history:
        lines.append("no step was trained in this run")
    else:
        rewards = [h[REWARD_KEY] for h in history]
        first_std = history[0].get(REWARD_STD_KEY, 0.0)
        tail = rewards[-TAIL_STEPS:]
        tail_mean = sum(tail) / len(tail)
        change = tail_mean - rewards[0]
        lines.append(f"steps trained: {len(history)} (global steps {steps[0]}..{steps[-1]})")
        lines.append(f"{REWARD_KEY} at step {steps[0]}: {rewards[0]:.4f} (std over its images {first_std:.4f})")
        lines.append(
            f"{REWARD_KEY} at step {steps[-1]}: {rewards[-1]:.4f}; mean of the last {len(tail)} steps: {tail_mean:.4f}"
        )
        spread = f" = {change / first_std:+.1f} x the step-{steps[0]} std" if first_std > 0 else ""
        lines.append(f"change (last-{len(tail)} mean - step {steps[0]}): {change:+.4f}{spread}")
    outputs = [
        ("reward curve", curve),
        ("sample images", _newest(os.path.join(output_dir, "samples", "train_step_*"))),
        ("validation grid", _newest(os.path.join(output_dir, "validation", "step_*.png"))),
        ("validation clip", _newest_video(os.path.join(output_dir, "validation", "step_*"))),
        ("checkpoint", _newest(os.path.join(output_dir, "global_step_*"))),
    ]
    tensorboard_dir = tensorboard_dir or os.path.join(output_dir, "tensorboard")
    if os.path.isdir(tensorboard_dir):
        outputs.append(("tensorboard", f"{tensorboard_dir}  (tensorboard --logdir {tensorboard_dir})"))
    lines += [f"{name + ':':17}{path}" for name, path in outputs if path]
    lines.append("=" * 70)
    return "\n".join(lines)


def plot_reward_curve(steps: Sequence[int], means: Sequence[float], stds: Sequence[float], path: str) -> str:
    """Mean reward per step with a +-1 std band (over the step's images), written to ``path``."""
    try:
        import matplotlib  # noqa: F401  optional
    except ImportError:
        _plot_with_pillow(steps, means, stds, path)
    else:
        _plot_with_matplotlib(steps, means, stds, path)
    return path


def _plot_with_matplotlib(steps, means, stds, path) -> None:
    # Figure + Agg canvas directly: no pyplot, so the caller's global backend and figure state stay untouched.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    lower = [m - s for m, s in zip(means, stds, strict=False)]
    upper = [m + s for m, s in zip(means, stds, strict=False)]
    ax.fill_between(steps, lower, upper, alpha=0.25, label="+-1 std over the step's images")
    ax.plot(steps, means, marker="o", markersize=3, label=REWARD_KEY)
    ax.set_xlabel("global step")
    ax.set_ylabel("reward")
    ax.set_title("reward per step")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def _plot_with_pillow(steps, means, stds, path, size=(640, 360), margin=(64, 24, 24, 44)) -> None:
    """The same chart drawn with Pillow primitives (left, top, right, bottom margins in pixels)."""
    from PIL import Image, ImageDraw

    width, height = size
    left, top, right, bottom = margin
    lower = [m - s for m, s in zip(means, stds, strict=False)]
    upper = [m + s for m, s in zip(means, stds, strict=False)]
    y_min, y_max = min(lower), max(upper)
    if y_max - y_min < 1e-12:
        y_min, y_max = y_min - 0.5, y_max + 0.5
    pad = 0.05 * (y_max - y_min)
    y_min, y_max = y_min - pad, y_max + pad
    x_min, x_max = steps[0], max(steps[-1], steps[0] + 1)

    def point(step, value):
        x = left + (step - x_min) / (x_max - x_min) * (width - left - right)
        y = top + (y_max - value) / (y_max - y_min) * (height - top - bottom)
        return x, y

    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    band = [point(s, v) for s, v in zip(steps, upper, strict=True)]
    band += [point(s, v) for s, v in reversed(list(zip(steps, lower, strict=True)))]
    if len(band) > 2:
        draw.polygon(band, fill=(200, 220, 245))
    for i in range(5):  # horizontal grid lines with their values
        value = y_min + i * (y_max - y_min) / 4
        _, y = point(x_min, value)
        draw.line([(left, y), (width - right, y)], fill=(225, 225, 225))
        draw.text((4, y - 6), f"{value:.4f}", fill="black")
    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    line = [point(s, m) for s, m in zip(steps, means, strict=False)]
    if len(line) > 1:
        draw.line(line, fill=(31, 119, 180), width=2)
    for x, y in line:
        draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=(31, 119, 180))
    draw.text((left, height - bottom + 6), f"step {steps[0]}", fill="black")
    draw.text((width - right - 60, height - bottom + 6), f"step {steps[-1]}", fill="black")
    draw.text((left + 4, top + 4), f"{REWARD_KEY} per step (band: +-1 std over the step's images)", fill="black")
    draw.text((width // 2 - 30, height - 18), "global step", fill="black")
    image.save(path)


def _newest_video(stem_pattern: str) -> Optional[str]:
    """The newest MP4 of ``stem_pattern``, or the newest animated WebP (written where MP4 cannot be encoded)."""
    return _newest(stem_pattern + ".mp4") or _newest(stem_pattern + ".webp")


def _newest(pattern: str) -> Optional[str]:
    """The match of ``pattern`` with the highest number in its name (step_10 after step_9), or None."""
    matches = glob.glob(pattern)
    if not matches:
        return None
    return max(matches, key=lambda p: [int(n) for n in re.findall(r"\d+", os.path.basename(p))] or [-1])
