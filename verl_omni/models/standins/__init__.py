"""Faithful stand-ins: random-weight pipelines whose every component has the real checkpoint's architecture,
size and dtype.

Real-size figures (throughput, memory, step time) need the real model's shapes, but not its weights. Each model
family's package holds its real checkpoint's published configs as plain dicts and its builder
(``verl_omni/pipelines/<family>/published.py``); ``verl_omni.pipelines.standins`` finds them through the family
registry. This package holds what every family's stand-in shares: tokenizers built offline with the real vocabulary
sizes and special-token ids (byte-level, so a prompt's token count is not the real tokenizer's), the common text
encoders' published configs, seeded module construction on a chosen device (a GPU builds the largest in under a
minute; PyTorch's CPU random fills run on one thread), parameter counts, and the directory writer: a diffusers
pipeline directory the family's ``from_pretrained`` loads, plus ``standin.json`` (family, depth, parameters and
stored values per component).
"""

from __future__ import annotations

from verl_omni.models.standins._common import (
    STANDIN_FILE,
    param_counts,
    read_standin_record,
    save_standin,
    stored_counts,
)

__all__ = ["STANDIN_FILE", "param_counts", "read_standin_record", "save_standin", "stored_counts"]
