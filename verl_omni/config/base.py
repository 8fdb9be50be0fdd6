"""What every config section shares: verl's ``BaseConfig`` (a frozen, dict-like dataclass), a strict builder
from plain dicts / OmegaConf that names unknown keys by their dotted path, and validators whose messages name
the key and the allowed values."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Optional, TypeVar

from verl.base_config import BaseConfig

T = TypeVar("T")

DEVICE_HELP = "'cpu', 'cuda' or 'cuda:<index>'"


@dataclasses.dataclass
class Section(BaseConfig):
    """A config section at a fixed place of the YAML tree; ``_prefix`` is that place (for error messages)."""

    _prefix: ClassVar[str] = ""

    def key(self, name: str) -> str:
        return f"{self._prefix}.{name}" if self._prefix else name


def to_plain(section: Any) -> dict:
    """An OmegaConf node, a dataclass or a mapping as a plain dict (None -> {})."""
    if section is None:
        return {}
    if dataclasses.is_dataclass(section):
        return {f.name: getattr(section, f.name) for f in dataclasses.fields(section)}
    try:
        from omegaconf import OmegaConf

        if OmegaConf.is_config(section):
            return OmegaConf.to_container(section, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf ships with verl
        pass
    return dict(section)


def build(cls: type[T], data: Any, prefix: Optional[str] = None) -> T:
    """``cls`` from ``data`` (dict / OmegaConf / dataclass), recursively; unknown keys are refused by dotted name.

    A nested dataclass field takes a dict (or an instance, kept as it is); every section validates itself in
    ``__post_init__``.
    """
    if isinstance(data, cls):
        return data
    prefix = getattr(cls, "_prefix", "") if prefix is None else prefix
    data = to_plain(data)
    known = {f.name: f for f in dataclasses.fields(cls) if f.init and f.name != "_target_"}
    unknown = sorted(set(data) - set(known) - {"_target_"})
    if unknown:
        names = [f"{prefix}.{k}" if prefix else k for k in unknown]
        raise ValueError(f"unknown config keys {names}; allowed under {prefix or 'the root'}: {sorted(known)}")
    kwargs = {}
    for name, value in data.items():
        if name == "_target_":
            continue
        field = known[name]
        nested = field.default_factory if field.default_factory is not dataclasses.MISSING else None
        nested_cls = type(nested()) if nested is not None else None
        if nested_cls is not None and dataclasses.is_dataclass(nested_cls) and isinstance(value, dict):
            kwargs[name] = build(nested_cls, value, f"{prefix}.{name}" if prefix else name)
        else:
            kwargs[name] = value
    return cls(**kwargs)


# ----------------------------------------------------------------------------------------------- validators
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


def require_device(key: str, value: Any) -> None:
    if not isinstance(value, str) or not (value in ("cpu", "cuda") or value.startswith("cuda:")):
        raise ValueError(f"{key}={value!r} must be {DEVICE_HELP}")


def freeze_list(value: Any) -> Any:
    """Lists from YAML as tuples (the sections are frozen; a shared mutable list would not be)."""
    return tuple(value) if isinstance(value, list) else value
