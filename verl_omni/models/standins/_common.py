"""What every family's stand-in shares: tokenizers of the real vocabulary sizes built offline, seeded module
construction on a chosen device, per-component parameter counts and the directory writer."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from typing import Any, Optional

import torch

from verl_omni.models.tiny import _byte_level_alphabet, _randomize_zero_params, _seeded_init

STANDIN_FILE = "standin.json"  # what was built: family, depth, parameters per component, whether weights exist


# ------------------------------------------------------------------------------------------- tokenizers
def _filler(index: int) -> str:
    """A vocabulary entry no ordinary text produces (a private-use character and a number): it fills the table
    up to the real size so that ids, and the embedding tables read from them, have the real extent."""
    return f"\U000f0000{index:06d}"


def qwen2_tokenizer(regular_vocab_size: int, added_tokens: Sequence[str], model_max_length: int):
    """Byte-level ``Qwen2Tokenizer`` with ``regular_vocab_size`` entries (the 256 byte symbols, then fillers; no
    merges, so text encodes one token per byte) followed by ``added_tokens`` as special tokens at the real ids."""
    from transformers import Qwen2Tokenizer

    alphabet = _byte_level_alphabet()
    vocab = {symbol: i for i, symbol in enumerate(alphabet)}
    vocab.update({_filler(i): i for i in range(len(alphabet), regular_vocab_size)})
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=[],
        model_max_length=model_max_length,
        unk_token=None,
        bos_token=None,
        eos_token=added_tokens[0],
        pad_token=added_tokens[0],
    )
    tokenizer.add_special_tokens({"additional_special_tokens": list(added_tokens[1:])})
    return tokenizer


def clip_tokenizer(vocab_size: int, pad_token: str = "<|endoftext|>", model_max_length: int = 77):
    """``CLIPTokenizer`` of ``vocab_size`` entries laid out as CLIP's: the 256 byte symbols, their 256 end-of-word
    forms, fillers where CLIP has its merges, then ``<|startoftext|>`` and ``<|endoftext|>`` as the last two ids."""
    from transformers import CLIPTokenizer

    alphabet = _byte_level_alphabet()
    vocab = {symbol: i for i, symbol in enumerate(alphabet)}
    for symbol in alphabet:
        vocab[symbol + "</w>"] = len(vocab)
    vocab.update({_filler(i): i for i in range(len(vocab), vocab_size - 2)})
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=model_max_length, pad_token=pad_token)


def t5_tokenizer(piece_count: int, extra_ids: int, model_max_length: int = 512):
    """Unigram ``T5Tokenizer`` of ``piece_count`` pieces (``<pad>``, ``</s>``, ``<unk>``, the word boundary, the
    printable ASCII characters, then fillers) plus ``extra_ids`` sentinel tokens, as T5's 32,000 + 100
    (``<extra_id_0>`` at 32099)."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(chr(c), -3.0) for c in range(33, 127)]
    pieces += [(_filler(i), -20.0) for i in range(len(pieces), piece_count)]
    tokenizer = T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=model_max_length)
    # T5 numbers its sentinels downwards: <extra_id_0> is the last id.
    sentinels = [f"<extra_id_{i}>" for i in reversed(range(extra_ids))]
    tokenizer.add_special_tokens({"additional_special_tokens": sentinels})
    return tokenizer


# ------------------------------------------------------------------------------------------- modules
def build_module(factory: Callable[[], torch.nn.Module], seed: int, dtype: torch.dtype, device: torch.device):
    """``factory()`` constructed directly in ``dtype`` on ``device`` with torch seeded to ``seed``; weights a
    random init leaves at zero get small random values (a zero output projection would make the output constant).
    On the meta device nothing is allocated or drawn (shapes and configs only)."""
    with _seeded_init(seed, dtype, device):
        module = factory()
    if device.type != "meta":
        _randomize_zero_params(module, seed + 100)
    return module.eval()


def param_counts(components: dict[str, Any]) -> dict[str, int]:
    """Parameters per model component (tokenizers and schedulers have none)."""
    return {
        name: sum(p.numel() for p in component.parameters())
        for name, component in components.items()
        if isinstance(component, torch.nn.Module)
    }


def _persistent_buffer_numel(module: torch.nn.Module) -> int:
    seen: set[int] = set()
    total = 0
    for sub in module.modules():
        for name, buffer in sub._buffers.items():
            if buffer is not None and name not in sub._non_persistent_buffers_set and id(buffer) not in seen:
                seen.add(id(buffer))
                total += buffer.numel()
    return total


def stored_counts(components: dict[str, Any]) -> dict[str, int]:
    """Values per model component as its checkpoint stores them: parameters plus persistent buffers (SD3's
    384 x 384 positional-embedding table is a buffer of 226M values, counted in its published 2.47B)."""
    return {
        name: count + _persistent_buffer_numel(components[name]) for name, count in param_counts(components).items()
    }


def transformer_layers(layers: Optional[int], published: int) -> int:
    """The transformer depth to build: the published one, or ``layers`` (1..published) to truncate it."""
    if layers is None:
        return published
    if not 1 <= int(layers) <= published:
        raise ValueError(f"layers={layers} must be between 1 and the published depth {published} (or None)")
    return int(layers)


# ------------------------------------------------------------------------------------------- writing
def save_standin(
    path: str | os.PathLike,
    pipeline_class: type,
    components: dict[str, Any],
    record: dict[str, Any],
) -> str:
    """Write ``components`` as a diffusers pipeline directory of ``pipeline_class`` (``from_pretrained`` loads
    it) plus ``standin.json`` (``record`` and the parameters per component).

    Components on the meta device have no values: then only ``model_index.json``, every component's config,
    the tokenizers and the scheduler are written (a skeleton to inspect; ``weights: false`` in the record)."""
    path = str(path)
    pipe = pipeline_class(**components)
    on_meta = any(p.is_meta for c in components.values() if isinstance(c, torch.nn.Module) for p in c.parameters())
    if on_meta:
        os.makedirs(path, exist_ok=True)
        pipe.save_config(path)
        for name, component in components.items():
            target = os.path.join(path, name)
            if component is None or isinstance(component, (bool, int, float)):  # a pipeline setting, not a component
                continue
            if isinstance(component, torch.nn.Module):
                config = component.config
                config.save_pretrained(target) if hasattr(config, "save_pretrained") else component.save_config(target)
            else:
                component.save_pretrained(target)
    else:
        pipe.save_pretrained(path)
    record = {**record, "weights": not on_meta, "params": param_counts(components), "stored": stored_counts(components)}
    with open(os.path.join(path, STANDIN_FILE), "w") as f:
        json.dump(record, f, indent=1)
    return path


def read_standin_record(path: str | os.PathLike) -> dict[str, Any]:
    """The ``standin.json`` of a stand-in directory (family, depth, parameters per component)."""
    with open(os.path.join(path, STANDIN_FILE)) as f:
        return json.load(f)
