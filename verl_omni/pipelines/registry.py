"""Model families: name -> ``ModelFamily`` (the RL pipeline class, the diffusers classes it serves, its options
section, its tiny and real-size stand-in builders).

A family is one package under ``verl_omni/pipelines/`` whose ``__init__`` defines a ``ModelFamily`` subclass
decorated with ``@register_family``; that ``__init__`` stays cheap to import (no diffusers pipeline at module level:
the config reads it). The registry finds the families by importing every subpackage of ``verl_omni.pipelines``
once, so nothing lists their names; a family's pipeline class is imported only when asked for.
"""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
import threading
from types import ModuleType
from typing import Any, ClassVar, Optional

AUTO = "auto"  # actor_rollout_ref.model.pipeline: the family from the model directory's model_index.json
TINY_PREFIX = "tiny:"  # actor_rollout_ref.model.path=tiny:<family>: that family's tiny random model, built locally
MODEL_INDEX = "model_index.json"


class ModelFamily:
    """One model family. Subclasses set the class attributes and implement the static methods."""

    # actor_rollout_ref.model.pipeline's value (and the options section's key, actor_rollout_ref.model.<name>)
    name: ClassVar[str] = ""
    # model_index.json ``_class_name`` values this family serves (the diffusers pipeline classes it loads)
    diffusers_class_names: ClassVar[tuple[str, ...]] = ()
    # a ``Section`` dataclass of the family's own options (actor_rollout_ref.model.<name>.*), or None
    options_class: ClassVar[Optional[type]] = None
    # tiny models beyond ``tiny:<name>``: tiny model name -> the ``variant`` its ``build_tiny`` takes
    tiny_variants: ClassVar[dict[str, str]] = {}

    @staticmethod
    def pipeline_class() -> type:
        """The RL pipeline class (imported here, lazily: it imports diffusers)."""
        raise NotImplementedError("a model family names its RL pipeline class")

    @staticmethod
    def build_tiny(path: str | os.PathLike, seed: int = 0, dtype: Any = None) -> str:
        """Write the family's tiny random pipeline directory for CPU tests (``tiny:<name>``); return its path. A
        family with ``tiny_variants`` also takes ``variant=`` (one of their values)."""
        raise NotImplementedError("this model family has no tiny model builder")

    @staticmethod
    def build_standin(path: str | os.PathLike, *, layers: Optional[int] = None, device: str = "cpu", dtype: Any = None):
        """Write a random-weight pipeline directory at the real model's sizes; return its path."""
        raise NotImplementedError("this model family has no real-size stand-in builder")

    @classmethod
    def published(cls) -> ModuleType:
        """The family package's ``published.py``: the real checkpoint's published configs and the builder of its
        real-size stand-in (``verl_omni.pipelines.standins`` reads it; imported here, lazily)."""
        module = f"{cls.__module__}.published"
        try:
            return importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
            raise NotImplementedError(
                f"model family {cls.name!r} has no {module} (its real checkpoint's configs)"
            ) from e


_FAMILIES: dict[str, type[ModelFamily]] = {}
_DISCOVERED = False
_LOCK = threading.RLock()


def register_family(cls: type[ModelFamily]) -> type[ModelFamily]:
    """Class decorator: register a ``ModelFamily`` subclass under its ``name``. A second class with a name already
    registered is refused (naming both); re-running the same module (a reload) replaces its own entry."""
    if not (isinstance(cls, type) and issubclass(cls, ModelFamily)):
        raise TypeError(f"@register_family decorates ModelFamily subclasses, got {cls!r}")
    name = cls.name
    if not isinstance(name, str) or not name.isidentifier() or name == AUTO:
        raise ValueError(f"{cls.__qualname__}.name={name!r} must be a Python identifier other than {AUTO!r}")
    if not cls.diffusers_class_names:
        raise ValueError(f"{cls.__qualname__}.diffusers_class_names must name the model_index.json classes it serves")
    with _LOCK:
        known = _FAMILIES.get(name)
        same = known is not None and (known.__module__, known.__qualname__) == (cls.__module__, cls.__qualname__)
        if known is not None and not same:
            raise ValueError(
                f"model family {name!r} is already registered ({known.__module__}.{known.__qualname__}); "
                f"{cls.__module__}.{cls.__qualname__} needs another name"
            )
        _FAMILIES[name] = cls
    return cls


def discover() -> None:
    """Import every subpackage of ``verl_omni.pipelines`` once (each registers its family)."""
    global _DISCOVERED
    if _DISCOVERED:
        return
    with _LOCK:
        if _DISCOVERED:
            return
        package = importlib.import_module("verl_omni.pipelines")
        for module in pkgutil.iter_modules(package.__path__):
            if module.ispkg:
                importlib.import_module(f"{package.__name__}.{module.name}")
        _DISCOVERED = True


def registered_families() -> dict[str, type[ModelFamily]]:
    """Every registered family, by name (a copy)."""
    discover()
    return dict(_FAMILIES)


def family_names() -> tuple[str, ...]:
    """The registered families' names, sorted (the allowed ``actor_rollout_ref.model.pipeline`` values)."""
    return tuple(sorted(registered_families()))


def get_family(name: str, key: str = "actor_rollout_ref.model.pipeline") -> type[ModelFamily]:
    """The family registered as ``name``; an unknown name is an error naming ``key`` and the registered ones."""
    families = registered_families()
    if name not in families:
        raise ValueError(f"{key}={name!r} is not a registered model family; registered: {sorted(families)}")
    return families[name]


def tiny_model_names() -> tuple[str, ...]:
    """Every ``tiny:<name>`` name, sorted: each family's own name and its ``tiny_variants``."""
    names = [n for family in registered_families().values() for n in (family.name, *family.tiny_variants)]
    return tuple(sorted(names))


def tiny_model(
    name: str, key: str = "actor_rollout_ref.model.path (tiny:<family>)"
) -> tuple[type[ModelFamily], Optional[str]]:
    """The family of the tiny model ``name`` and the variant its ``build_tiny`` takes (None: the family's own);
    an unknown name is an error naming ``key`` and the tiny models there are."""
    for family in registered_families().values():
        if name == family.name:
            return family, None
        if name in family.tiny_variants:
            return family, family.tiny_variants[name]
    raise ValueError(f"{key}={name!r} is not a tiny model; allowed: {', '.join(tiny_model_names())}")


def get_pipeline_class(name: str) -> type:
    """The RL pipeline class of the family ``name`` (imports only that family's pipeline module)."""
    return get_family(name).pipeline_class()


def describe_families() -> str:
    """``name (DiffusersClass, ...)`` for every registered family: what an error lists as allowed."""
    return ", ".join(f"{n} ({', '.join(f.diffusers_class_names)})" for n, f in sorted(registered_families().items()))


def families_serving(class_name: str) -> list[str]:
    """Names of the families whose ``diffusers_class_names`` include ``class_name``."""
    return [n for n, f in sorted(registered_families().items()) if class_name in f.diffusers_class_names]


def model_class_name(path: str | os.PathLike) -> Optional[str]:
    """The ``_class_name`` of ``<path>/model_index.json``; None when the file is missing or names none."""
    index = os.path.join(os.fspath(path), MODEL_INDEX)
    if not os.path.isfile(index):
        return None
    with open(index) as f:
        return json.load(f).get("_class_name")


def family_for_model_dir(path: str | os.PathLike, key: str = "actor_rollout_ref.model.pipeline") -> str:
    """The family serving the pipeline directory ``path``, from its ``model_index.json`` ``_class_name``
    (``tiny:<name>`` is the family ``<name>``). A directory no family serves is an error naming ``key``, the class
    found and the registered families."""
    path = os.fspath(path)
    if path.startswith(TINY_PREFIX):
        return tiny_model(path[len(TINY_PREFIX) :])[0].name
    index = os.path.join(path, MODEL_INDEX)
    if not os.path.isfile(index):
        raise FileNotFoundError(
            f"{key}={AUTO} reads _class_name from {MODEL_INDEX}, but actor_rollout_ref.model.path={path!r} has no "
            f"{index}: give a diffusers pipeline directory or tiny:<family>, or set {key} to one of {family_names()}"
        )
    class_name = model_class_name(path)
    fits = families_serving(class_name) if class_name else []
    if not fits:
        raise ValueError(
            f"{key}={AUTO}: {index} has _class_name {class_name!r}, which no registered model family serves; "
            f"registered: {describe_families()}"
        )
    return fits[0]
