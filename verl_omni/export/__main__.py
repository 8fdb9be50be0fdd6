"""``python -m verl_omni.export --checkpoint DIR --base PATH --out DIR [--merge] [--weights lora|ema]``."""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from verl_omni.export import (
    EXPERT_FILES,
    WEIGHTS_CHOICES,
    expert_tensors,
    export_full_weights,
    export_lora,
    export_merged,
    read_adapter,
    resolve_base,
)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="verl-omni-export",
        description="Export a trained LoRA as a diffusers LoRA file, or merged into a pipeline directory.",
    )
    p.add_argument("--checkpoint", required=True, help="a global_step_<k> directory, or a run directory (its newest)")
    p.add_argument("--base", required=True, help="the base pipeline directory the run trained on (or tiny:<family>)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--merge", action="store_true", help="write a whole pipeline with the adapter fused in")
    p.add_argument("--weights", default="lora", choices=WEIGHTS_CHOICES, help="the adapter or the policy EMA")
    p.add_argument("--lora-alpha", type=float, default=None, help="the run's lora_alpha, if the checkpoint lacks it")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = parser().parse_args(argv)
    base = resolve_base(args.base)
    adapter = read_adapter(args.checkpoint, args.weights, alpha=args.lora_alpha)
    if adapter.rank == 0:  # full fine-tuning: always a whole pipeline directory
        written = export_full_weights(adapter, base, args.out)
        print(f"[verl_omni] exported the full weights of {adapter.checkpoint} (step {adapter.step}) to {written}")
        return 0
    written = export_merged(adapter, base, args.out) if args.merge else export_lora(adapter, base, args.out)
    if not args.merge and len(expert_tensors(adapter)) > 1:
        written = f"{args.out} (one file per expert: {', '.join(EXPERT_FILES.values())})"
    print(
        f"[verl_omni] exported {adapter.weights} of {adapter.checkpoint} (step {adapter.step}, rank {adapter.rank}, "
        f"alpha {adapter.alpha:g}, checksum {adapter.checksum[:12]}) to {written}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
