"""What the driver-side handles on several actor ranks share (the FSDP group and the hybrid engine's group)."""

from __future__ import annotations

from typing import Any, Optional, Protocol

import ray


def gather_ranks(refs: list) -> list:
    """``ray.get`` of every ref, raising the first error as soon as it arrives: the other ranks may be stuck in a
    collective waiting for the failed one, so waiting for all of them would hang."""
    results, pending = {}, list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        results[done[0]] = ray.get(done[0])
    return [results[ref] for ref in refs]


class _HasOptimizerState(Protocol):
    def optimizer_state_dict(self) -> dict: ...

    def load_optimizer_state_dict(self, state: dict) -> None: ...


class OptimizerHandle:
    """Stands in for ``torch.optim.Optimizer`` in the checkpoint code, which calls only these two."""

    def __init__(self, group: _HasOptimizerState):
        self._group = group

    def state_dict(self) -> dict[str, Any]:
        return self._group.optimizer_state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._group.load_optimizer_state_dict(state)

    def write_shards(self, folder: str) -> Optional[list[str]]:
        """Where each rank writes its own optimizer shard into ``folder`` (full fine-tuning): the file names; else
        None (the checkpoint holds ``state_dict()``)."""
        write = getattr(self._group, "write_optimizer_shards", None)
        return write(folder) if write is not None else None
