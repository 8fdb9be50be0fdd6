"""Prompts from verl-format parquet files, batched deterministically by step (so resume replays them)."""

from __future__ import annotations

import os
from typing import Optional

import numpy as np
import pandas as pd
from verl import DataProto

from verl_omni.core.prompts import is_blank, prompt_text


class PromptDataset:
    def __init__(self, path: str, prompt_key: str = "prompt", max_samples: Optional[int] = None):
        path = os.path.expanduser(path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"data file {path} does not exist (see examples/flowgrpo_trainer/data_process)")
        frame = pd.read_parquet(path)
        if prompt_key not in frame.columns:
            raise ValueError(f"{path} has no column {prompt_key!r} (data.prompt_key); columns: {list(frame.columns)}")
        if max_samples is not None:
            frame = frame.iloc[:max_samples]
        if len(frame) == 0:
            raise ValueError(f"{path} has no rows")
        self.frame = frame.reset_index(drop=True)
        self.prompt_key = prompt_key
        for i, raw in enumerate(self.frame[prompt_key]):
            try:
                text = prompt_text(raw)
            except ValueError as exc:
                raise ValueError(f"{path} row {i}: {exc}") from None
            if is_blank(text):
                raise ValueError(f"{path} row {i}: empty prompt (only whitespace, zero-width or control characters)")

    def __len__(self) -> int:
        return len(self.frame)

    def batch(self, indices: list[int], n: int, *, tag: str) -> DataProto:
        """DataProto of ``len(indices)`` prompts, each repeated n times interleaved (p0 p0 … p1 p1 …)."""
        rows = self.frame.iloc[indices]
        non_tensor = {
            "raw_prompt": _objects(list(rows[self.prompt_key])),
            "uid": _objects([f"{tag}-{k}-{i}" for k, i in enumerate(indices)]),
            "index": np.asarray(indices, dtype=np.int64),
        }
        for column in ("data_source", "reward_model", "extra_info", "negative_prompt"):
            if column in rows.columns:
                non_tensor[column] = _objects(list(rows[column]))
        data = DataProto.from_dict(non_tensors=non_tensor)
        return data.repeat(repeat_times=n, interleave=True)

    def indices_for_step(self, step: int, batch_size: int, seed: int, shuffle: bool) -> list[int]:
        """Indices of the prompts of training step ``step`` (1-based): epoch-wise permutations by seed."""
        total = len(self.frame)
        start = (step - 1) * batch_size
        out = []
        for pos in range(start, start + batch_size):
            epoch, offset = divmod(pos, total)
            order = np.random.default_rng(seed + epoch).permutation(total) if shuffle else np.arange(total)
            out.append(int(order[offset]))
        return out


def _objects(values: list) -> np.ndarray:
    arr = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):
        arr[i] = v.tolist() if isinstance(v, np.ndarray) else v
    return arr
