"""What every config section shares: verl's ``BaseConfig`` (a frozen, dict-like dataclass), a strict builder
from plain dicts / OmegaConf that names unknown keys by their dotted path, and validators whose messages name
the key and the allowed values."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, TypeVar

from verl_omni.core.section import (  # noqa: F401 (re-exported: the sections import them from here)
    DEVICE_HELP,
    Section,
    freeze_list,
    require_bool,
    require_choice,
    require_device,
    require_int,
    require_number,
)

T = TypeVar("T")


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
