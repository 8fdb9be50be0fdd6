"""Which of PyTorch's SDPA kernels serves the actor's attention fastest (flash, cuDNN, memory-efficient, math).

One joint-attention call of Qwen-Image at the recipe's shapes (24 heads x 128, 1024 image tokens + the text of one
CFG branch), forward + backward in bf16, for one training micro-batch of ``--rows`` samples, in the two CFG layouts:

- batched: ONE call of 2 x rows with the shorter text padded and a boolean key mask (``actor.batch_cfg=true``);
- two calls: rows each, unmasked (``actor.batch_cfg=false``; what ``auto`` picks on a GPU).

Each layout under each backend (flash, cuDNN, memory-efficient, and PyTorch's own choice); a backend that refuses
the call (flash takes no mask) is recorded with its reason.
Milliseconds per layer-call are medians of ``--iters`` after warm-up. JSON: top-level ``device``, ``shapes`` and
``results`` ({layout: {backend: ms or the error}}), plus ``per_update_s``: the median times x the calls one
60-layer update makes (64 transitions / rows micro-batches x 60 layers; x 2 forwards with recomputation).

Run on the device:  python benchmarks/attention_backends.py --out docs/benchmarks/attention_backends_h100.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_common import log, write_report  # noqa: E402


def _time_ms(fn, iters: int) -> float:
    import torch

    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> None:
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--image-tokens", type=int, default=1024)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--negative-tokens", type=int, default=4)
    ap.add_argument("--heads", type=int, default=24)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--transitions", type=int, default=64)
    ap.add_argument("--layers", type=int, default=60)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    dev, dtype = "cuda", torch.bfloat16
    lc, lu = args.image_tokens + args.prompt_tokens, args.image_tokens + args.negative_tokens

    def qkv(rows: int, seq: int):
        return [
            torch.randn(rows, args.heads, seq, args.head_dim, device=dev, dtype=dtype, requires_grad=True)
            for _ in range(3)
        ]

    # batched: [unconditional; conditional], the shorter (negative) text padded at the end of its text tokens
    batched = qkv(2 * args.rows, lc)
    mask = torch.ones(2 * args.rows, 1, 1, lc, dtype=torch.bool, device=dev)
    mask[: args.rows, ..., lu:] = False
    cond, uncond = qkv(args.rows, lc), qkv(args.rows, lu)

    def step(calls):
        def run():
            outs = [F.scaled_dot_product_attention(q, k, v, attn_mask=m) for q, k, v, m in calls]
            torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])

        return run

    layouts = {
        "batched_masked": step([(*batched, mask)]),
        "two_calls_unmasked": step([(*cond, None), (*uncond, None)]),
    }
    backends = {
        "flash": SDPBackend.FLASH_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "default": None,
    }
    results: dict = {}
    for layout, fn in layouts.items():
        results[layout] = {}
        for name, backend in backends.items():
            try:
                if backend is None:
                    ms = _time_ms(fn, args.iters)
                else:
                    with sdpa_kernel([backend]):
                        ms = _time_ms(fn, args.iters)
                results[layout][name] = round(ms, 4)
            except RuntimeError as exc:  # the backend refuses this call (e.g. flash with a mask)
                results[layout][name] = f"unsupported: {str(exc).splitlines()[0][:160]}"
            log(f"{layout:20s} {name:10s} {results[layout][name]}")
    calls = args.transitions / args.rows * args.layers * 2  # + the recomputed forward: roughly one more forward
    per_update = {
        layout: {k: round(v * calls / 1000, 3) for k, v in r.items() if isinstance(v, float)}
        for layout, r in results.items()
    }
    report = {
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "shapes": {
            "rows": args.rows,
            "heads": args.heads,
            "head_dim": args.head_dim,
            "conditional_tokens": lc,
            "unconditional_tokens": lu,
        },
        "results": results,
        "per_update_s": per_update,
        "note": "ms per forward+backward of one layer's joint attention for one micro-batch, bf16; per_update_s "
        "scales by the micro-batches and layers of one update (64 transitions, 60 layers) and x2 for the "
        "recomputed forward (an upper bound: the recomputation repeats only the forward).",
    }
    log(str(per_update))
    if args.out:
        write_report(report, args.out)


if __name__ == "__main__":
    main()
