"""The text conditioning of a batch, as a transformer call consumes it.

One typed object instead of a ``cond`` dict: the pipelines build it (``encode_conditions``), the rollout stores
its fields in ``RLBatchOutput`` under the same names, and the actor rebuilds it from a
training batch to recompute the very same forward. A pipeline turns it into what its transformer calls take
(``prepare_model_inputs``: dtype, device, the CFG branches stacked) once per request or training micro-batch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any, Optional

import torch

FIELDS = (
    "prompt_embeds",
    "prompt_embeds_mask",
    "pooled_prompt_embeds",
    "negative_prompt_embeds",
    "negative_prompt_embeds_mask",
    "negative_pooled_prompt_embeds",
)


@dataclass
class Conditioning:
    """Per-sample text conditioning of B samples (every field has a leading batch dimension).

    - ``prompt_embeds`` [B, L, D], ``prompt_embeds_mask`` [B, L] (1 = token, 0 = padding; None = no mask),
      ``pooled_prompt_embeds`` [B, P] (SD3's pooled CLIP embeddings; None for Qwen-Image);
    - the ``negative_*`` twins, present only under classifier-free guidance.
    """

    prompt_embeds: torch.Tensor
    prompt_embeds_mask: Optional[torch.Tensor] = None
    pooled_prompt_embeds: Optional[torch.Tensor] = None
    negative_prompt_embeds: Optional[torch.Tensor] = None
    negative_prompt_embeds_mask: Optional[torch.Tensor] = None
    negative_pooled_prompt_embeds: Optional[torch.Tensor] = None

    @property
    def has_negative(self) -> bool:
        return self.negative_prompt_embeds is not None

    @property
    def batch_size(self) -> int:
        return int(self.prompt_embeds.shape[0])

    def branch(self, negative: bool = False) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
        """(embeds, mask, pooled) of the conditional branch, or with ``negative=True`` of the unconditional one."""
        prefix = "negative_" if negative else ""
        embeds = getattr(self, f"{prefix}prompt_embeds")
        if embeds is None:
            raise ValueError(f"conditioning has no {prefix}prompt_embeds")
        return embeds, getattr(self, f"{prefix}prompt_embeds_mask"), getattr(self, f"{prefix}pooled_prompt_embeds")

    def _map(self, fn) -> Conditioning:
        return Conditioning(
            **{f.name: None if getattr(self, f.name) is None else fn(getattr(self, f.name)) for f in fields(self)}
        )

    def repeat(self, batch_size: int) -> Conditioning:
        """[1, ...] rows -> [B, ...] (real copies, so per-sample slices never alias)."""
        return self._map(lambda t: t.repeat(batch_size, *([1] * (t.ndim - 1))))

    def to(self, device: torch.device | str) -> Conditioning:
        return self._map(lambda t: t.to(device))

    def select(self, rows: torch.Tensor | slice) -> Conditioning:
        return self._map(lambda t: t[rows])

    def without_padding(self) -> Conditioning:
        """Right padding beyond the longest mask of each branch removed.

        The agent loop pads embeddings of different prompts to one length; cutting back to the longest prompt of
        the rows reproduces the rollout's tensors exactly when the rows are one prompt group.
        """
        out = self
        for prefix in ("", "negative_"):
            mask = getattr(self, f"{prefix}prompt_embeds_mask")
            if mask is None:
                continue
            length = int(mask.sum(dim=1).max())
            out = replace(
                out,
                **{
                    f"{prefix}prompt_embeds": getattr(self, f"{prefix}prompt_embeds")[:, :length],
                    f"{prefix}prompt_embeds_mask": mask[:, :length],
                },
            )
        return out

    @classmethod
    def cat(cls, parts: Sequence[Conditioning]) -> Conditioning:
        """The rows of ``parts`` (each of any batch size) as one conditioning, in order. Texts of different lengths
        are right-padded to the longest with zero embeddings and mask 0 (a missing mask counts as all ones); without
        masks they must have one length (SD3's and FLUX's fixed-length T5), else ``ValueError`` naming the field.
        Every part must carry the same fields (the negative branch in all or none)."""
        if not parts:
            raise ValueError("Conditioning.cat needs at least one part")
        out: dict[str, Optional[torch.Tensor]] = {}
        for prefix in ("", "negative_"):
            embeds = [getattr(p, f"{prefix}prompt_embeds") for p in parts]
            pooled = [getattr(p, f"{prefix}pooled_prompt_embeds") for p in parts]
            if all(e is None for e in embeds):
                continue
            if any(e is None for e in embeds) or len({p is None for p in pooled}) > 1:
                raise ValueError(f"Conditioning.cat: {prefix}prompt_embeds or its pooled twin is missing in some parts")
            masks = [getattr(p, f"{prefix}prompt_embeds_mask") for p in parts]
            out[f"{prefix}prompt_embeds"], out[f"{prefix}prompt_embeds_mask"] = _pad_rows(embeds, masks, prefix)
            out[f"{prefix}pooled_prompt_embeds"] = None if pooled[0] is None else torch.cat(pooled)
        return cls(**out)

    def as_fields(self) -> dict[str, Optional[torch.Tensor]]:
        """The fields under their ``RLBatchOutput`` names."""
        return {name: getattr(self, name) for name in FIELDS}

    @classmethod
    def from_fields(cls, source: Mapping[str, Any] | Any) -> Conditioning:
        """From a mapping (a TensorDict, a dict) or an object with the field names as attributes; absent = None."""
        if isinstance(source, Mapping) or hasattr(source, "keys"):
            keys = set(source.keys())
            values = {name: source[name] if name in keys else None for name in FIELDS}
        else:
            values = {name: getattr(source, name, None) for name in FIELDS}
        if values["prompt_embeds"] is None:
            raise ValueError("conditioning needs prompt_embeds")
        return cls(**values)


def _pad_rows(
    embeds: list[torch.Tensor], masks: list[Optional[torch.Tensor]], prefix: str
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """[B_i, L_i, D] parts -> ([sum B_i, max L_i, D], mask or None): see :meth:`Conditioning.cat`."""
    length = max(int(e.shape[1]) for e in embeds)
    if all(m is None for m in masks):
        lengths = sorted({int(e.shape[1]) for e in embeds})
        if len(lengths) > 1:
            raise ValueError(
                f"{prefix}prompt_embeds of lengths {lengths} cannot share one call without a "
                f"{prefix}prompt_embeds_mask to pad them with"
            )
        return torch.cat(embeds), None
    padded, padded_masks = [], []
    for e, m in zip(embeds, masks, strict=True):
        extra = length - int(e.shape[1])
        m = torch.ones(e.shape[:2], dtype=torch.long, device=e.device) if m is None else m
        padded.append(torch.nn.functional.pad(e, (0, 0, 0, extra)))
        padded_masks.append(torch.nn.functional.pad(m, (0, extra)))
    return torch.cat(padded), torch.cat(padded_masks)
