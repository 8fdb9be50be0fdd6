"""The console's line per step (``trainer.logger`` with ``console``): the key figures only.

verl's console backend prints every metric of a step on one line (over a hundred, per replica and per rank); this
one prints the figures a person watches a run by. The full set still goes to every other backend (tensorboard,
file, wandb ...).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# (label, metric key, format) in the order printed; a key the step lacks is left out.
STEP_FIGURES = (
    ("reward", "reward/total/mean", ".4f"),
    ("adv", "advantages/mean", ".3f"),
    ("adv_absmax", "advantages/abs_max", ".3f"),
    ("loss", "actor/loss", ".4g"),
    ("grad_norm", "actor/grad_norm", ".4g"),
    ("clip_frac", "actor/clip_frac", ".3f"),
)
RATIO_RANGE = ("actor/ratio_min", "actor/ratio_max")
SECONDS = (("rollout", "timing/rollout_s"), ("update", "timing/update_s"), ("step", "timing/step_s"))
IMAGES_PER_S = "perf/img_per_s"
VALIDATION = ("val/reward_mean", ".4f")


def _fmt(value: Any, spec: str) -> str:
    """``value`` formatted as a number (nan / inf as Python writes them); ``?`` for anything not a number."""
    try:
        return format(float(value), spec)
    except (TypeError, ValueError):
        return "?"


def format_step_line(data: Mapping[str, Any], step: int) -> str:
    """``step 3 | reward 0.4120 | adv 0.000 | ... | ratio [0.981, 1.032] | s rollout 19.1 update 9.6 step 28.7 |
    img/s 1.11``: the key figures of a training step, or the validation reward of a validation record."""
    parts = [f"step {step}"]
    parts += [f"{label} {_fmt(data[key], spec)}" for label, key, spec in STEP_FIGURES if key in data]
    if all(key in data for key in RATIO_RANGE):
        low, high = (_fmt(data[key], ".3f") for key in RATIO_RANGE)
        parts.append(f"ratio [{low}, {high}]")
    seconds = [f"{label} {_fmt(data[key], '.1f')}" for label, key in SECONDS if key in data]
    if seconds:
        parts.append("s " + " ".join(seconds))
    if IMAGES_PER_S in data:
        parts.append(f"img/s {_fmt(data[IMAGES_PER_S], '.3g')}")
    if VALIDATION[0] in data:
        parts.append(f"val reward {_fmt(data[VALIDATION[0]], VALIDATION[1])}")
    if len(parts) == 1:  # none of the key figures: say how many there were, not nothing
        parts.append(f"{len(data)} metrics")
    return " | ".join(parts)


class ConsoleStepLogger:
    """A ``verl.utils.tracking.Tracking`` backend: one short line per ``log`` call (see ``format_step_line``)."""

    def log(self, data: Mapping[str, Any], step: int) -> None:
        print(format_step_line(data, step), flush=True)

    def flush(self) -> None:
        pass


def use_short_console_line(tracker: Any) -> None:
    """Replace the console backend of a verl ``Tracking`` (if it has one) with ``ConsoleStepLogger``."""
    loggers = getattr(tracker, "logger", None)
    if isinstance(loggers, dict) and "console" in loggers:
        tracker.console_logger = loggers["console"] = ConsoleStepLogger()
