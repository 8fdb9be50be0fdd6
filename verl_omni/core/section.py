"""A config section and the validators every section uses: verl's ``BaseConfig`` (a frozen, dict-like dataclass)
that knows its place in the YAML tree, and checks whose messages name the key and the allowed values.

Here, in the bottom layer, so that an algorithm (``verl_omni/algorithms``) can declare its own typed section;
``verl_omni.config.base`` re-exports all of it beside the strict builder."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from verl.base_config import BaseConfig

DEVICE_HELP = "'cpu', 'cuda' or 'cuda:<index>'"


@dataclasses.dataclass
class Section(BaseConfig):
    """A config section at a fixed place of the YAML tree; ``_prefix`` is that place (for error messages)."""

    _prefix: ClassVar[str] = ""

    def key(self, name: str) -> str:
        return f"{self._prefix}.{name}" if self._prefix else name


def require_int(key: str, value: Any, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{key}={value!r} must be an int >= {minimum}")


def require_number(key: str, value: Any, minimum: float, strict: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok and (value > minimum if strict else value >= minimum)
    if not ok:
        raise ValueError(f"{key}={value!r} must be a number {'>' if strict else '>='} {minimum}")


def require_choice(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{key}={value!r} is not one of {allowed}")


def require_bool(key: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{key}={value!r} must be true or false")


def require_device(key: str, value: Any) -> None:
    if not isinstance(value, str) or not (value in ("cpu", "cuda") or value.startswith("cuda:")):
        raise ValueError(f"{key}={value!r} must be {DEVICE_HELP}")


def freeze_list(value: Any) -> Any:
    """Lists from YAML as tuples (the sections are frozen; a shared mutable list would not be)."""
    return tuple(value) if isinstance(value, list) else value
