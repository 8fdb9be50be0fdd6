"""RL algorithms behind one seam (``base.Algorithm``), registered by name (``registry``): the math, no model code.

Each algorithm is one module here that registers itself on import; every module of this package is imported
below, so a new algorithm is one new file. ``algorithm.name`` in the config picks one (docs/algorithms.md).
"""

import importlib
import pkgutil

from verl_omni.algorithms.base import Algorithm, AlgorithmSection, Loss
from verl_omni.algorithms.registry import get_algorithm, register_algorithm, registered_algorithms

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    if _module not in ("base", "registry"):
        importlib.import_module(f"{__name__}.{_module}")

__all__ = ["Algorithm", "AlgorithmSection", "Loss", "get_algorithm", "register_algorithm", "registered_algorithms"]
