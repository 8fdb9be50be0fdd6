"""The batching rule: which rows of a rollout batch may be merged into one B=N engine call.

verl repeats each prompt ``rollout.n`` times (p0 p0 … p1 p1 …). A group of n rows may become one
``generate_batched`` call only when the flag is on, n > 1, the batch length is a
multiple of n, and every row of the group asks for the same thing. Otherwise the group runs row by row,
and the reason is reported (logged once per reason, counted per step).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

# Row fields that must be equal inside a group for the rows to be merged into one request.
MERGE_FIELDS = ("agent_name", "raw_prompt", "negative_prompt", "sampling_params")


@dataclass
class RolloutGroup:
    key: str  # uid of the group (or "pos<k>" when the batch has no uid)
    rows: list[int]
    batched: bool
    reason: Optional[str] = None  # why a group falls back to per-row calls


def plan_groups(non_tensor: dict[str, np.ndarray], batch_len: int, n: int, *, enabled: bool) -> list[RolloutGroup]:
    """Partition row indices into groups and decide the path of each one."""
    uids = non_tensor.get("uid")
    if uids is not None:
        order: dict[str, list[int]] = {}
        for i, uid in enumerate(uids):
            order.setdefault(str(uid), []).append(i)
        raw_groups = list(order.items())
    else:
        size = n if n >= 1 else 1
        raw_groups = [
            (f"pos{k}", list(range(s, min(s + size, batch_len)))) for k, s in enumerate(range(0, batch_len, size))
        ]

    batch_reason = None
    if not enabled:
        batch_reason = "disabled"
    elif n <= 1:
        batch_reason = "n_is_1"
    elif batch_len % n:
        batch_reason = "length_not_multiple_of_n"

    groups = []
    for key, rows in raw_groups:
        reason = batch_reason or _group_reason(non_tensor, rows, n)
        groups.append(RolloutGroup(key=key, rows=rows, batched=reason is None, reason=reason))
    return groups


def _group_reason(non_tensor: dict[str, np.ndarray], rows: list[int], n: int) -> Optional[str]:
    if len(rows) != n:
        return "group_size_not_n"
    for name in MERGE_FIELDS:
        column = non_tensor.get(name)
        if column is None:
            continue
        first = _canonical(column[rows[0]])
        if any(_canonical(column[i]) != first for i in rows[1:]):
            return f"mixed_{name}"
    return None


def _canonical(value: Any) -> str:
    if isinstance(value, np.ndarray):
        value = value.tolist()
    return json.dumps(value, sort_keys=True, default=str)


def derive_seed(base_seed: int, uid: str, index_in_group: int) -> int:
    """Seed of one sample from (base seed, group uid, index in group): identical on both paths."""
    digest = hashlib.sha256(f"{base_seed}:{uid}:{index_in_group}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF
