"""The text of a verl prompt row (a plain string, or chat messages)."""

from __future__ import annotations

import unicodedata
from typing import Any

import numpy as np


def prompt_text(raw_prompt: Any) -> str:
    """The text to draw from a verl row: a plain string, or the last user turn of chat messages."""
    if isinstance(raw_prompt, np.ndarray):
        raw_prompt = raw_prompt.tolist()
    if isinstance(raw_prompt, bytes):
        try:
            raw_prompt = raw_prompt.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"raw_prompt is not valid UTF-8 ({exc}): {raw_prompt[:80]!r}") from None
    if isinstance(raw_prompt, str):
        return raw_prompt
    if isinstance(raw_prompt, (list, tuple)) and raw_prompt:
        for message in reversed(raw_prompt):
            if isinstance(message, dict) and message.get("role", "user") == "user":
                content = message.get("content")
                if isinstance(content, str):
                    return content
    raise ValueError(
        f"raw_prompt must be a string or a list of chat messages with a user turn, got {raw_prompt!r:.200}"
    )


def is_blank(text: str) -> bool:
    """True when ``text`` has nothing to draw: only whitespace, format characters (zero-width spaces and joiners,
    byte-order marks) or control characters, which ``str.strip`` keeps."""
    return all(ch.isspace() or unicodedata.category(ch) in ("Cf", "Cc") for ch in text)
