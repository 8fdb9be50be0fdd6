"""``python -m verl_omni.compare RUN_DIR... --out plot.png [--metric KEY ...] [--name NAME ...]``."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional

from verl_omni.compare import DEFAULT_METRICS, format_table, plot_runs, read_run, summary_rows


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="verl-omni-compare", description="Reward and validation curves of several runs.")
    p.add_argument("runs", nargs="+", help="run directories (trainer.default_local_dir) or .jsonl metrics files")
    p.add_argument("--out", required=True, help="the PNG to write")
    p.add_argument("--metric", action="append", help=f"a logged scalar to draw (default: {', '.join(DEFAULT_METRICS)})")
    p.add_argument("--name", action="append", help="a legend name per run, in order (default: the folder's name)")
    p.add_argument("--json", help="also write the table as JSON here")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = parser().parse_args(argv)
    names = args.name or []
    if names and len(names) != len(args.runs):
        raise SystemExit(f"--name given {len(names)} times for {len(args.runs)} runs: give one per run or none")
    runs = [read_run(path, names[i] if names else None) for i, path in enumerate(args.runs)]
    metrics = args.metric or list(DEFAULT_METRICS)
    plot_runs(runs, metrics, args.out)
    rows = summary_rows(runs, metrics)
    print(format_table(rows))
    print(f"[verl_omni] curves: {args.out}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
