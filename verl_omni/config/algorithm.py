"""``algorithm``: which registered algorithm trains (``algorithm.name``) and each algorithm's typed section.

The section's fields are ``name`` plus one ``algorithm.<name>`` sub-section per registered algorithm, each that
algorithm's own ``Config`` dataclass (so the YAML carries every algorithm's defaults, and a typo under any of them
is refused by its dotted key). The class is assembled from the registry (``algorithm_config_class``): adding an
algorithm adds its section without touching this file.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

from verl_omni.algorithms import Algorithm, get_algorithm, registered_algorithms
from verl_omni.algorithms.registry import DEFAULT_ALGORITHM
from verl_omni.config.base import Section, build


@dataclasses.dataclass
class AlgorithmConfigBase(Section):
    _prefix = "algorithm"

    name: str = DEFAULT_ALGORITHM

    def __post_init__(self) -> None:
        get_algorithm(self.name)  # an unknown name lists the registered ones

    @property
    def section(self) -> Any:
        """The chosen algorithm's own section (``algorithm.<name>``)."""
        return getattr(self, self.name)

    def make(self, actor: Any = None, rollout: Any = None) -> Algorithm:
        """An instance of the chosen algorithm with its section and the shared actor / rollout sections."""
        return get_algorithm(self.name)(self.section, actor=actor, rollout=rollout)


_classes: dict[tuple[str, ...], type] = {}


def algorithm_config_class() -> type[AlgorithmConfigBase]:
    """The ``algorithm`` section's dataclass for the algorithms registered now (one class per registry state)."""
    algorithms = registered_algorithms()
    names = tuple(sorted(algorithms))
    cls = _classes.get(names)
    if cls is None:
        fields = [(n, algorithms[n].Config, dataclasses.field(default_factory=algorithms[n].Config)) for n in names]
        cls = dataclasses.make_dataclass(
            "AlgorithmConfig", fields, bases=(AlgorithmConfigBase,), namespace={"__module__": __name__}
        )
        _classes[names] = cls
    globals()["AlgorithmConfig"] = cls  # pickled by reference (Ray): the module attribute is the current class
    return cls


AlgorithmConfig = algorithm_config_class()


def make_algorithm(config: Optional[Any], actor: Any = None, rollout: Any = None, pipeline: Any = None) -> Algorithm:
    """An algorithm from the ``algorithm`` section (an instance, its plain dict, or None for the defaults), bound to
    ``pipeline`` (the RL pipeline or its class) when given."""
    if isinstance(config, Algorithm):
        algorithm = config
    else:
        algorithm = build(algorithm_config_class(), config or {}).make(actor=actor, rollout=rollout)
    if pipeline is not None:
        algorithm.bind_pipeline(pipeline)
    return algorithm
