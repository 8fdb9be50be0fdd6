"""name -> Algorithm class (verl's style: ``register_adv_est`` / ``register_policy_loss``).

``@register_algorithm("name")`` on an ``Algorithm`` subclass in its own module under ``verl_omni/algorithms/``;
the package ``__init__`` imports every built-in module, so they register on ``import verl_omni``. A plugin module
outside the package registers the same way once imported (``VERL_USE_EXTERNAL_MODULES``)."""

from __future__ import annotations

from collections.abc import Callable

from verl_omni.algorithms.base import Algorithm

DEFAULT_ALGORITHM = "flowgrpo"

_ALGORITHMS: dict[str, type[Algorithm]] = {}


def register_algorithm(name: str) -> Callable[[type[Algorithm]], type[Algorithm]]:
    """Class decorator: register ``cls`` as ``name`` (``algorithm.name=<name>``; its section ``algorithm.<name>``)."""
    if not name.isidentifier() or name == "name":
        raise ValueError(f"algorithm name {name!r} must be a Python identifier other than 'name' (it is a config key)")

    def decorate(cls: type[Algorithm]) -> type[Algorithm]:
        if not (isinstance(cls, type) and issubclass(cls, Algorithm)):
            raise TypeError(f"@register_algorithm({name!r}) decorates Algorithm subclasses, got {cls!r}")
        known = _ALGORITHMS.get(name)
        if known is not None and known is not cls and known.__qualname__ != cls.__qualname__:
            raise ValueError(f"algorithm {name!r} is already registered ({known.__module__}.{known.__qualname__})")
        cls.name = name
        _ALGORITHMS[name] = cls
        return cls

    return decorate


def get_algorithm(name: str) -> type[Algorithm]:
    """The class registered as ``name``; an unknown name is an error listing the registered ones."""
    if name not in _ALGORITHMS:
        raise ValueError(f"algorithm.name={name!r} is not a registered algorithm; registered: {sorted(_ALGORITHMS)}")
    return _ALGORITHMS[name]


def registered_algorithms() -> dict[str, type[Algorithm]]:
    """Every registered algorithm, by name (a copy)."""
    return dict(_ALGORITHMS)
