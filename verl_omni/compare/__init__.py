"""Compare runs: the training reward and validation curves of several runs in one PNG, and a table of each curve's
final and best values (``python -m verl_omni.compare RUN_DIR... --out plot.png``).

A run is read from its tensorboard events (``<run>/tensorboard``, where the trainer writes them, or any folder of
``events.out.tfevents.*`` files) or from verl's file logger (a ``.jsonl`` of ``{"step", "data"}`` lines: the path
itself, or the ``*.jsonl`` files in the run directory).
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

TRAIN_REWARD = "reward/total/mean"
VAL_REWARD = "val/reward_mean"
DEFAULT_METRICS = (TRAIN_REWARD, VAL_REWARD)
Curve = list[tuple[int, float]]  # (step, value), steps ascending


@dataclass
class Run:
    name: str
    source: str  # the files it was read from
    curves: dict[str, Curve] = field(default_factory=dict)


def read_run(path: str, name: str | None = None) -> Run:
    """Every scalar curve of the run at ``path`` (see the module docstring for what is read)."""
    path = os.path.expanduser(path)
    name = name or os.path.basename(os.path.normpath(path)).removesuffix(".jsonl") or path
    if os.path.isfile(path) and path.endswith(".jsonl"):
        return Run(name, path, _read_jsonl([path]))
    if not os.path.isdir(path):
        raise FileNotFoundError(f"run {path} is neither a run directory nor a .jsonl metrics file")
    events = sorted(glob.glob(os.path.join(path, "**", "events.out.tfevents.*"), recursive=True))
    if events:
        return Run(name, os.path.dirname(events[0]), _read_events(sorted({os.path.dirname(e) for e in events})))
    logs = sorted(glob.glob(os.path.join(path, "*.jsonl")))
    if logs:
        return Run(name, ", ".join(logs), _read_jsonl(logs))
    raise FileNotFoundError(
        f"run {path} holds no tensorboard events (events.out.tfevents.*) and no .jsonl metrics "
        "(trainer.logger with tensorboard, or file with VERL_FILE_LOGGER_PATH)"
    )


def _merge(points: dict[str, dict[int, float]]) -> dict[str, Curve]:
    return {key: sorted(by_step.items()) for key, by_step in points.items()}


def _read_events(folders: Sequence[str]) -> dict[str, Curve]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    points: dict[str, dict[int, float]] = {}
    for folder in folders:
        accumulator = EventAccumulator(folder, size_guidance={"scalars": 0})  # 0: keep every point
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            for event in accumulator.Scalars(tag):  # a resumed run rewrites steps: the last write wins
                points.setdefault(tag, {})[int(event.step)] = float(event.value)
    return _merge(points)


def _read_jsonl(files: Sequence[str]) -> dict[str, Curve]:
    points: dict[str, dict[int, float]] = {}
    for file in files:
        with open(file) as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    step, data = int(record["step"]), record["data"]
                except (ValueError, KeyError, TypeError) as exc:
                    raise ValueError(f"{file} line {number}: not a {{'step', 'data'}} record ({exc})") from None
                for key, value in data.items():
                    if isinstance(value, (int, float)) and not isinstance(value, bool):
                        points.setdefault(key, {})[step] = float(value)
    return _merge(points)


def summary_rows(runs: Sequence[Run], metrics: Sequence[str]) -> list[dict]:
    """Per run and metric: the final value and the best (highest) one, each with its step."""
    rows = []
    for run in runs:
        for metric in metrics:
            curve = run.curves.get(metric)
            if not curve:
                continue
            best_step, best = max(curve, key=lambda point: point[1])
            final_step, final = curve[-1]
            rows.append(
                {"run": run.name, "metric": metric, "final": final, "final_step": final_step}
                | {"best": best, "best_step": best_step, "points": len(curve)}
            )
    return rows


def format_table(rows: Sequence[dict]) -> str:
    header = ("run", "metric", "final", "at step", "best", "at step")
    body = [
        (r["run"], r["metric"], f"{r['final']:.4f}", str(r["final_step"]), f"{r['best']:.4f}", str(r["best_step"]))
        for r in rows
    ]
    widths = [max(len(str(c)) for c in column) for column in zip(header, *body, strict=True)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in (header, *body)]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def plot_runs(runs: Sequence[Run], metrics: Sequence[str], out: str) -> str:
    """One panel per metric, one line per run, a legend and axis labels; written to ``out`` (PNG)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        raise ImportError("verl_omni.compare draws with matplotlib: pip install matplotlib") from None
    shown = [m for m in metrics if any(run.curves.get(m) for run in runs)]
    if not shown:
        raise ValueError(
            f"none of the runs has any of the metrics {list(metrics)} (--metric); "
            f"they have e.g. {sorted({k for run in runs for k in run.curves})[:8]}"
        )
    figure = Figure(figsize=(6 * len(shown), 4.2), dpi=100)
    FigureCanvasAgg(figure)
    for i, metric in enumerate(shown):
        axes = figure.add_subplot(1, len(shown), i + 1)
        for run in runs:
            curve = run.curves.get(metric)
            if curve:
                steps, values = zip(*curve, strict=True)
                axes.plot(steps, values, marker="o" if len(curve) < 30 else None, markersize=3, label=run.name)
        axes.set_title(metric)
        axes.set_xlabel("training step")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.set_ylabel("validation reward" if metric.startswith("val/") else "reward (mean over the step's images)")
        axes.grid(alpha=0.3)
        axes.legend()
    figure.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    figure.savefig(out, format="png")
    return out
