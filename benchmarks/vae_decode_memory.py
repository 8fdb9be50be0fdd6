"""The VAE decode's working memory per row, at each family's real VAE architecture and its recipe's media size.

The rollout decodes a call's final latents in calls of ``rollout.pipeline.vae_decode_batch`` rows (0: all at once).
This measures what one row adds to the decode's peak: ``LiveBytes`` (models/vae_memory.py) counts the bytes of the
tensors the family's decode (its pipeline's ``vae_decode``) creates that are alive at once, for a decode of 1 and of 2
rows (random bfloat16 weights, on the CPU: the tensors the decode keeps alive are the same on a GPU; the GPU's
convolution workspaces come on top), and the difference is one row's share. The full fine-tuning memory plan counts
the same decode on fake tensors.

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

from verl_omni.models.vae_memory import LiveBytes, decode_latent_shape
from verl_omni.pipelines.registry import get_pipeline_class
from verl_omni.pipelines.standins import published_config

DTYPE = torch.bfloat16

# family -> (its stand-in's VAE: diffusers class name and config, the recipe's media: height, width, frames)
FAMILIES: dict[str, tuple[str, dict[str, Any], tuple[int, int, int]]] = {
    "sd3": ("AutoencoderKL", published_config("sd3")["vae"], (512, 512, 1)),
    "flux": ("AutoencoderKL", published_config("flux")["vae"], (512, 512, 1)),
    "qwen_image": ("AutoencoderKLQwenImage", published_config("qwen_image")["vae"], (512, 512, 1)),
    "wan": ("AutoencoderKLWan", published_config("wan")["vae"], (240, 416, 33)),
}


def activation_peak(decode: Callable, vae: torch.nn.Module, latents: torch.Tensor) -> int:
    with torch.no_grad(), LiveBytes() as live:
        decode(vae, latents)
    return live.peak


def measure(family: str) -> dict[str, Any]:
    import diffusers

    class_name, config, (height, width, frames) = FAMILIES[family]
    torch.manual_seed(0)
    vae = getattr(diffusers, class_name)(**config).to(DTYPE).eval()
    shape = decode_latent_shape(config, height, width, 8, frames)
    decode = get_pipeline_class(family).vae_decode  # the VAE call of the family's rollout decode
    start = time.perf_counter()
    peaks = {rows: activation_peak(decode, vae, torch.randn(rows, *shape, dtype=DTYPE)) for rows in (1, 2)}
    return {
        "family": family,
        "vae": class_name,
        "media": f"{frames} frames of {height}x{width}" if frames > 1 else f"{height}x{width} image",
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
