"""What a VAE decode keeps alive: the bytes of the tensors its operators create that exist at once.

``LiveBytes`` counts them for any code run inside it. ``decode_activation_bytes`` runs a pipeline's VAE, built from
its ``config.json`` on fake tensors (no memory, no compute: a second or two), through one decode of a rollout call's
rows, so the full fine-tuning memory plan counts what the rollout's decode adds beside the optimizer's shards.
The same count on real tensors on the CPU (``benchmarks/vae_decode_memory.py``) gives the same bytes; a GPU adds its
convolution workspaces on top.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

logger = logging.getLogger(__name__)


class LiveBytes(TorchDispatchMode):
    """The most bytes of operator outputs alive at once inside the mode (``peak``): each new storage an operator
    returns counts until it is freed. What existed before (inputs, weights) does not count."""

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


@contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def decode_latent_shape(
    vae_config: dict[str, Any], height: int, width: int, vae_scale_factor: int, num_frames: int = 1
) -> tuple[int, ...]:
    """One row's latents as the VAE decodes them: [C, h, w] for an image VAE (``latent_channels``), [C, F, h, w] for
    a 3D one (``z_dim``: Qwen-Image's one frame, Wan's ``(num_frames - 1) / scale_factor_temporal + 1``)."""
    spatial = (height // vae_scale_factor, width // vae_scale_factor)
    if "z_dim" not in vae_config:
        return (int(vae_config.get("latent_channels", 4)), *spatial)
    temporal = int(vae_config.get("scale_factor_temporal") or 4)
    return (int(vae_config["z_dim"]), (num_frames - 1) // temporal + 1, *spatial)


def decode_activation_bytes(
    vae_config: dict[str, Any],
    rows: int,
    height: int,
    width: int,
    vae_scale_factor: int,
    num_frames: int = 1,
    dtype: torch.dtype = torch.bfloat16,
    *,
    decode: Callable[[torch.nn.Module, torch.Tensor], Any],
) -> int:
    """The activation bytes of one decode of ``rows`` rows at ``height`` x ``width`` (x ``num_frames``) in ``dtype``:
    ``decode(vae, latents)`` (the family pipeline's ``vae_decode``) for the diffusers VAE class
    ``vae_config["_class_name"]`` (a pipeline directory's vae/config.json). 0, with a warning, where the config names
    no diffusers VAE or the decode cannot run on fake tensors."""
    import diffusers
    from torch._subclasses.fake_tensor import FakeTensorMode

    name = vae_config.get("_class_name")
    cls = getattr(diffusers, str(name), None)
    if cls is None:
        logger.warning("the memory plan leaves out the rollout's VAE decode: vae/config.json names no diffusers VAE")
        return 0
    config = {k: v for k, v in vae_config.items() if not k.startswith("_")}
    shape = decode_latent_shape(vae_config, height, width, vae_scale_factor, num_frames)
    try:
        with _default_dtype(dtype), FakeTensorMode(), torch.no_grad():
            vae = cls.from_config(config).eval()
            latents = torch.zeros(rows, *shape, dtype=dtype)
            with LiveBytes() as live:
                decode(vae, latents)
    except Exception as exc:  # a VAE that fake tensors cannot run: plan without it, say so
        logger.warning("the memory plan leaves out the rollout's VAE decode: %s on fake tensors failed: %s", name, exc)
        return 0
    return live.peak


__all__ = ["LiveBytes", "decode_activation_bytes", "decode_latent_shape"]
