"""Prompt files for evaluation: plain text, JSON lines or a verl parquet.

- ``.txt`` (flow_grpo's format): one prompt per line, blank lines skipped; an OCR target is the text in quotes.
- ``.jsonl`` (GenEval's ``evaluation_metadata.jsonl``): one object per line with a ``prompt``; its other fields
  reach the rewards as the sample's ``extra_info`` (a GenEval service reads its tag and objects from there).
- ``.parquet``: the trainer's data files (``data.val_files``), prompt in ``--prompt-key``; ``reward_model``,
  ``data_source``, ``extra_info`` reach the rewards as in training.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field

from verl_omni.core.prompts import prompt_text
from verl_omni.rewards.registry import METADATA_KEYS

PROMPT_FORMATS = (".txt", ".jsonl", ".parquet")


@dataclass(frozen=True)
class EvalPrompt:
    text: str
    metadata: dict = field(default_factory=dict)  # what the rewards see for this prompt's images


def load_prompts(path: str, prompt_key: str = "prompt") -> list[EvalPrompt]:
    path = os.path.expanduser(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--prompts {path} does not exist")
    ext = os.path.splitext(path)[1].lower()
    if ext not in PROMPT_FORMATS:
        raise ValueError(f"--prompts {path}: unknown format {ext!r}; allowed: {list(PROMPT_FORMATS)}")
    prompts = {".txt": _from_text, ".jsonl": _from_jsonl, ".parquet": _from_parquet}[ext](path, prompt_key)
    if not prompts:
        raise ValueError(f"--prompts {path} holds no prompt")
    return prompts


def file_sha256(path: str) -> str:
    with open(os.path.expanduser(path), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _from_text(path: str, _key: str) -> list[EvalPrompt]:
    with open(path, encoding="utf-8") as f:
        return [EvalPrompt(line.strip()) for line in f if line.strip()]


def _from_jsonl(path: str, key: str) -> list[EvalPrompt]:
    prompts = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:
                raise ValueError(f"--prompts {path} line {number}: not JSON ({exc})") from None
            if not isinstance(row, dict) or not isinstance(row.get(key), str):
                raise ValueError(f"--prompts {path} line {number}: no string {key!r} field (--prompt-key)")
            prompts.append(EvalPrompt(row[key], {"extra_info": {k: v for k, v in row.items() if k != key}}))
    return prompts


def _from_parquet(path: str, key: str) -> list[EvalPrompt]:
    import pandas as pd

    frame = pd.read_parquet(path)
    if key not in frame.columns:
        raise ValueError(f"--prompts {path} has no column {key!r} (--prompt-key); columns: {list(frame.columns)}")
    prompts = []
    for i, row in frame.iterrows():
        try:
            text = prompt_text(row[key])
        except ValueError as exc:
            raise ValueError(f"--prompts {path} row {i}: {exc}") from None
        metadata = {k: _plain(row[k]) for k in METADATA_KEYS if k in frame.columns}
        prompts.append(EvalPrompt(text, metadata))
    return prompts


def _plain(value):
    """numpy containers from parquet as plain Python values (JSON-able, as the rewards expect)."""
    import numpy as np

    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        return value.item()
    return value
