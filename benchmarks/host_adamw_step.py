"""The offloaded optimizer step's host cost: AdamW over one piece of ``HOST_STEP_PIECE`` float32 values, per
implementation, side by side in one process, then ``ShardedAdamW.step`` itself with the offload.

Full fine-tuning with ``actor_rollout_ref.actor.optimizer_offload=true`` steps AdamW on the CPU a piece at a time
(``workers/full_weights.py``). This times, on the same piece and gradient:

- ``forloop`` (PyTorch's default on the CPU: one tensor op per AdamW term), ``foreach`` and ``fused`` (one pass over
  the values; what ``ShardedAdamW`` uses), each the median of ``--repeats`` steps after one warm-up step;
- ``ShardedAdamW.step()`` with ``offload=True`` over ``--shard-values`` weights (on the GPU where there is one: the
  gradient pieces' copies to the host and the new weights' copy back included), its pieces stepped by ``forloop``
  and by ``fused``, as seconds per billion weights.

    python benchmarks/host_adamw_step.py --out docs/benchmarks/host_adamw_step.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import time
from typing import Any

import torch

from verl_omni.workers.full_weights import HOST_STEP_PIECE, ShardedAdamW
from verl_omni.workers.grad_sync import LoRAGradSync

IMPLEMENTATIONS = {"forloop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def piece_step_seconds(kwargs: dict[str, Any], values: int, repeats: int) -> float:
    """Median seconds of one AdamW step over ``values`` float32 values on the CPU."""
    torch.manual_seed(0)
    param = torch.nn.Parameter(torch.randn(values))
    optimizer = torch.optim.AdamW([param], lr=1e-4, weight_decay=1e-4, **kwargs)
    param.grad = torch.randn(values)
    optimizer.step()  # warm-up: the state's allocation
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def sharded_step_seconds(values: int, repeats: int, device: torch.device, implementation: str) -> float:
    """Median seconds of ``ShardedAdamW.step()`` with the offload over ``values`` bf16 weights on ``device``, its
    pieces stepped by ``implementation`` (the shipped one is ``fused``)."""
    weight = torch.nn.Parameter(torch.randn(values, dtype=torch.bfloat16, device=device))
    hyper = {"lr": 1e-4, "betas": (0.9, 0.999), "weight_decay": 1e-4}
    optimizer = ShardedAdamW([weight], LoRAGradSync(0, 1, None, device.type), **hyper, offload=True)
    if implementation != "fused":  # the same pieces and moments, stepped by another implementation
        optimizer.optimizer = torch.optim.AdamW(optimizer._pieces, **hyper, **IMPLEMENTATIONS[implementation])
        optimizer._reset_piece_state(0.0)
    optimizer.grad_shard.normal_()
    optimizer._coef = 1.0  # what reduce_and_clip sets (no clipping here)
    times = []
    for _ in range(repeats + 1):
        optimizer.grad_shard.normal_()  # step() zeroes the shard
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        optimizer.step()  # synchronizes the device itself (the weights' all-gather is timed as sync_s)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--piece-values", type=int, default=HOST_STEP_PIECE)
    parser.add_argument("--shard-values", type=int, default=256 * 2**20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="host_adamw_step.json")
    args = parser.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    per_piece = {name: piece_step_seconds(kw, args.piece_values, args.repeats) for name, kw in IMPLEMENTATIONS.items()}
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sharded = {
        name: sharded_step_seconds(args.shard_values, args.repeats, device, name) for name in ("forloop", "fused")
    }
    record = {
        "host_cpu": cpu_name(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "piece_values": args.piece_values,
        "piece_step_s": per_piece,
        "fused_speedup_over_forloop": per_piece["forloop"] / per_piece["fused"],
        "weights_device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "shard_values": args.shard_values,
        "sharded_offload_step_s_per_billion": {name: t * 1e9 / args.shard_values for name, t in sharded.items()},
        "repeats": args.repeats,
        "commit": commit,
    }
    print(json.dumps(record, indent=1), flush=True)
    with open(args.out, "w") as f:
        json.dump([record], f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
