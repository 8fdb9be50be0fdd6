"""The rollout batch's trip from the agent-loop workers to the trainer, old path vs new, side by side (CPU, Ray).

What the 4-GPU recipe step moves after its groups return: 128 samples at the real size (512x512 images, packed
latents of 1024 tokens x 64 channels, float32; Qwen-Image prompt embeddings of ``--prompt-tokens`` x 3584 in bf16,
the negative's of 6 tokens), gathered by ``--workers`` agent-loop workers from 4 replica actors (Ray), stacked, sent
to the driver and concatenated. Variants:

- ``dataproto_full``:  the whole trajectory (11 latents per image), verl's DataProto pickling (the code before)
- ``dataproto_window``: the window's 3 latents, DataProto pickling
- ``packed_window``:    the window's 3 latents, numpy bytes (``agent_loop/transport.py``: the code now)

Seconds are medians of ``--repeats`` after one warm-up, of the driver's wall time from the call to the workers until
the concatenated batch exists. JSON: ``device``, ``config``, ``seconds`` {variant: s}, ``ratios`` (old / each).

    python benchmarks/rollout_transport_cpu.py --out docs/benchmarks/rollout_transport_cpu.json
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_common import log, write_report  # noqa: E402


def main() -> None:
    import numpy as np
    import ray
    import torch
    from verl import DataProto

    from verl_omni.agent_loop.diffusion_agent_loop import records_to_data_proto
    from verl_omni.agent_loop.transport import pack, unpack_concat
    from verl_omni.config.sampling import DiffusionSamplingParams
    from verl_omni.core.outputs import RLBatchOutput

    ap = argparse.ArgumentParser()
    ap.add_argument("--groups", type=int, default=8)
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--replicas", type=int, default=4)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    def group(kept: int) -> RLBatchOutput:
        """One group's rollout record (B = n), as a replica returns it."""
        g, n = torch.Generator().manual_seed(kept), args.n
        return RLBatchOutput(
            media=torch.from_numpy(np.random.default_rng(kept).integers(0, 255, (n, 1, 512, 512, 3), dtype=np.uint8)),
            latents=torch.randn(n, kept, 1024, 64, generator=g),
            log_probs=torch.randn(n, 10, generator=g),
            window_mask=torch.zeros(10, dtype=torch.bool),
            timesteps=torch.rand(10, generator=g),
            sigmas=torch.rand(11, generator=g),
            latent_steps=torch.arange(kept),
            prompt_embeds=torch.randn(n, args.prompt_tokens, 3584, generator=g).bfloat16(),
            seeds=list(range(n)),
            prompt_embeds_mask=torch.ones(n, args.prompt_tokens, dtype=torch.long),
            negative_prompt_embeds=torch.randn(n, 6, 3584, generator=g).bfloat16(),
            negative_prompt_embeds_mask=torch.ones(n, 6, dtype=torch.long),
            sampling=DiffusionSamplingParams(num_inference_steps=10).to_dict(),
        )

    @ray.remote(num_cpus=0)
    class Replica:
        def __init__(self):
            self.records = {k: group(k) for k in (3, 11)}

        async def generate(self, kept: int) -> dict:
            return self.records[kept].to_payload()

    @ray.remote(num_cpus=0)
    class Worker:
        def __init__(self, replicas):
            self.replicas = replicas

        async def run(self, groups: list[int], kept: int, packed: bool):
            outs = await asyncio.gather(*[self.replicas[g % len(self.replicas)].generate.remote(kept) for g in groups])
            records = [RLBatchOutput.from_payload(p) for p in outs]
            rows = sum(r.batch_size for r in records)
            non_tensor = {
                "raw_prompt": np.array(["a sign"] * rows, dtype=object),
                "uid": np.array([str(i // args.n) for i in range(rows)], dtype=object),
            }
            parts = [(list(range(k * args.n, (k + 1) * args.n)), r) for k, r in enumerate(records)]
            data = records_to_data_proto(parts, non_tensor, {})
            return pack(data) if packed else data

    ray.init(num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False, log_to_driver=False)
    replicas = [Replica.remote() for _ in range(args.replicas)]
    workers = [Worker.remote(replicas) for _ in range(args.workers)]
    chunks = [list(range(args.groups))[w :: args.workers] for w in range(args.workers)]

    def once(kept: int, packed: bool) -> float:
        start = time.perf_counter()
        parts = ray.get([w.run.remote(c, kept, packed) for w, c in zip(workers, chunks, strict=True)])
        batch = unpack_concat(parts) if packed else DataProto.concat(parts)
        assert len(batch) == args.groups * args.n
        return time.perf_counter() - start

    variants = {"dataproto_full": (11, False), "dataproto_window": (3, False), "packed_window": (3, True)}
    seconds = {}
    for name, (kept, packed) in variants.items():
        once(kept, packed)  # warm-up
        seconds[name] = statistics.median(once(kept, packed) for _ in range(args.repeats))
        log(f"{name}: {seconds[name]:.3f} s")
    ray.shutdown()
    report = {
        "device": f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "config": {**vars(args), "rows": args.groups * args.n},
        "seconds": seconds,
        "ratios": {f"dataproto_full_over_{k}": seconds["dataproto_full"] / v for k, v in seconds.items()},
    }
    if args.out:
        write_report(report, args.out)


if __name__ == "__main__":
    main()
