"""A rollout batch on the Ray hop from an agent-loop worker to the manager: tensors as flat numpy byte arrays.

verl's ``DataProto`` pickles its tensors with ``torch.save`` into one ``bytes`` object (after consolidating them), and
the receiver ``torch.load``s it again: four full copies of a batch that is hundreds of MB at the real size
(``benchmarks/rollout_transport_cpu.py`` measures the difference). Ray
ships numpy arrays out of band instead (one copy into its object store, read back as a view), so a worker sends
each tensor as its raw bytes and the manager concatenates the workers' rows straight into fresh tensors: one copy
on each side. bfloat16 travels as bytes too (numpy has no such dtype).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from verl import DataProto


@dataclass
class PackedBatch:
    """A ``DataProto`` as plain data: per tensor (dtype name, shape, the row-major bytes as uint8 numpy)."""

    tensors: dict[str, tuple[str, tuple[int, ...], np.ndarray]]
    non_tensor: dict[str, np.ndarray]
    meta_info: dict[str, Any]


def pack(data: DataProto) -> PackedBatch:
    tensors = {}
    for name, value in data.batch.items() if data.batch is not None else ():
        value = value.detach().to("cpu").contiguous()
        raw = value.reshape(-1).view(torch.uint8).numpy()  # a view: Ray copies it into its object store once
        tensors[name] = (str(value.dtype).removeprefix("torch."), tuple(value.shape), raw)
    return PackedBatch(tensors, dict(data.non_tensor_batch), dict(data.meta_info))


def unpack_concat(parts: list[PackedBatch]) -> DataProto:
    """The rows of ``parts`` in order, as one ``DataProto`` whose tensors own their memory (one copy; the arrays
    Ray hands back are read-only views of its object store). ``meta_info`` is the first part's."""
    if not parts:
        raise ValueError("no rollout batches to concatenate")
    names = list(parts[0].tensors)
    for part in parts[1:]:
        if list(part.tensors) != names:
            raise ValueError(f"rollout batches with different tensors: {names} vs {list(part.tensors)}")
    tensors = {}
    for name in names:
        dtype, shape, _ = parts[0].tensors[name]
        for part in parts[1:]:
            other_dtype, other_shape, _ = part.tensors[name]
            if other_dtype != dtype or tuple(other_shape[1:]) != tuple(shape[1:]):
                raise ValueError(
                    f"rollout batches disagree on {name}: {dtype}{list(shape[1:])} vs "
                    f"{other_dtype}{list(other_shape[1:])}"
                )
        rows = sum(int(part.tensors[name][1][0]) for part in parts)
        raw = np.concatenate([part.tensors[name][2] for part in parts])  # a new, writable array
        if raw.size == 0:  # no bytes to view (e.g. validation's empty trajectories)
            tensors[name] = torch.empty((rows, *shape[1:]), dtype=getattr(torch, dtype))
            continue
        tensors[name] = torch.from_numpy(raw).view(getattr(torch, dtype)).view(rows, *shape[1:])
    keys = list(parts[0].non_tensor)
    non_tensor = {key: np.concatenate([part.non_tensor[key] for part in parts]) for key in keys}
    return DataProto.from_dict(tensors=tensors, non_tensors=non_tensor, meta_info=dict(parts[0].meta_info))
