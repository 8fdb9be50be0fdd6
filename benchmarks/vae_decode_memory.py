"""The VAE decode's working memory per row, at each family's real VAE architecture and its recipe's media size.

The rollout decodes a call's final latents in calls of ``rollout.pipeline.vae_decode_batch`` rows (0: all at once).
This measures what one row adds to the decode's peak: a dispatch mode counts the bytes of the tensors the decode's
operators create that are alive at once (the inputs and weights not counted), for a decode of 1 and of 2 rows (random
bfloat16 weights, on the CPU: the tensors the decode keeps alive are the same on a GPU; the GPU's convolution
workspaces come on top), and the difference is one row's share.

    python benchmarks/vae_decode_memory.py --out docs/benchmarks/vae_decode_memory.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from collections.abc import Callable
from typing import Any

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from verl_omni.models.standins import flux_1_dev, qwen_image, sd3_5_medium, wan2_1_t2v

DTYPE = torch.bfloat16


def _autoencoder_kl(config: dict[str, Any]) -> tuple[torch.nn.Module, Callable]:
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(**config)
    return vae, lambda z: vae.decode(z, return_dict=False)[0]


def _qwen_image() -> tuple[torch.nn.Module, Callable]:
    from diffusers import AutoencoderKLQwenImage

    vae = AutoencoderKLQwenImage(**qwen_image.VAE)
    # The RL pipeline's single-frame decode (pipelines/qwen_image/pipeline.py): the decoder without its frame cache.
    return vae, lambda z: vae.decoder(vae.post_quant_conv(z))


def _wan() -> tuple[torch.nn.Module, Callable]:
    from diffusers import AutoencoderKLWan

    vae = AutoencoderKLWan(**wan2_1_t2v.VAE)
    return vae, lambda z: vae.decode(z, return_dict=False)[0]


# family -> (builder, latent shape of one row at the recipe's size without the batch axis, the media it decodes to)
FAMILIES: dict[str, tuple[Callable, tuple[int, ...], str]] = {
    "sd3": (lambda: _autoencoder_kl(sd3_5_medium.VAE), (16, 64, 64), "512x512 image"),
    "flux": (lambda: _autoencoder_kl(flux_1_dev.VAE), (16, 64, 64), "512x512 image"),
    "qwen_image": (_qwen_image, (16, 1, 64, 64), "512x512 image"),
    "wan": (_wan, (16, 9, 30, 52), "33 frames of 240x416"),
}


class LiveBytes(TorchDispatchMode):
    """The most bytes of operator outputs alive at once inside the mode: each new storage an operator returns is
    counted until it is freed (a weak reference that expires)."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[StorageWeakRef, int] = {}
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.live = {ref: n for ref, n in self.live.items() if not ref.expired()}
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                self.live.setdefault(StorageWeakRef(storage), storage.nbytes())
        self.peak = max(self.peak, sum(self.live.values()))
        return out


def activation_peak(decode: Callable, latents: torch.Tensor) -> int:
    with torch.no_grad(), LiveBytes() as tracker:
        decode(latents)
    return tracker.peak


def measure(family: str) -> dict[str, Any]:
    build, shape, media = FAMILIES[family]
    torch.manual_seed(0)
    vae, decode = build()
    vae = vae.to(DTYPE).eval()
    start = time.perf_counter()
    peaks = {rows: activation_peak(decode, torch.randn(rows, *shape, dtype=DTYPE)) for rows in (1, 2)}
    return {
        "family": family,
        "vae": type(vae).__name__,
        "media": media,
        "latent_shape": list(shape),
        "dtype": "bfloat16",
        "device": "cpu",
        "activation_peak_gb_1_row": peaks[1] / 1e9,
        "activation_peak_gb_2_rows": peaks[2] / 1e9,
        "gb_per_row": (peaks[2] - peaks[1]) / 1e9,
        "seconds": time.perf_counter() - start,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--out", default="vae_decode_memory.json")
    args = parser.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    records = []
    for family in args.families:
        record = measure(family)
        record["commit"] = commit
        print(json.dumps(record), flush=True)
        records.append(record)
    with open(args.out, "w") as f:
        json.dump(records, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
