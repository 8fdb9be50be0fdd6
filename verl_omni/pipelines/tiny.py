"""``tiny:<name>`` model paths: each family's tiny random pipeline (``ModelFamily.build_tiny``, seed 0, float32;
``<name>`` is the family's name or one of its ``tiny_variants``), built once into a shared cache directory and
reused."""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
import threading
from pathlib import Path
from typing import Optional

from verl_omni.pipelines.registry import TINY_PREFIX, get_family, tiny_model

_BUILT: dict[tuple[str, str], str] = {}
_LOCK = threading.Lock()


def _builder_fingerprint(name: str) -> str:
    """Changes whenever the family's builder files (its package, without the RL pipeline: its published configs
    included), the shared building blocks (``models/tiny.py``, ``models/standins``) or the libraries that define the
    on-disk format change."""
    import diffusers
    import torch
    import transformers

    from verl_omni.models import standins, tiny

    family_dir = Path(sys.modules[get_family(name).__module__].__file__).parent
    files = sorted(p for p in family_dir.glob("*.py") if p.name != "pipeline.py") + [Path(tiny.__file__)]
    files += sorted(Path(standins.__file__).parent.glob("*.py"))  # the shared tokenizers and text encoders' figures
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.read_bytes())
    digest.update(f"{diffusers.__version__}|{transformers.__version__}|{torch.__version__}".encode())
    return digest.hexdigest()[:12]


def tiny_model_dir(name: str, root: Optional[str | os.PathLike] = None) -> str:
    """Path of the tiny pipeline ``name`` (a family's, or one of its ``tiny_variants``; seed 0, float32), built on
    first use.

    The directory lives under ``root`` (default ``$VERL_OMNI_TINY_MODELS`` or ``<tmp>/verl_omni_tiny_models``) and
    is keyed by a fingerprint of the builder, so processes share it and a changed builder never reuses a stale one.
    It is written to a scratch directory first and renamed into place, so readers never see half a model.
    """
    family, variant = tiny_model(name, key="tiny model")
    root = Path(
        root or os.environ.get("VERL_OMNI_TINY_MODELS") or Path(tempfile.gettempdir()) / "verl_omni_tiny_models"
    )
    target = root / f"{name}-{_builder_fingerprint(family.name)}"
    key = (name, str(target))
    with _LOCK:
        if key in _BUILT:
            return _BUILT[key]
        if not (target / "model_index.json").exists():
            root.mkdir(parents=True, exist_ok=True)
            scratch = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
            try:
                family.build_tiny(scratch, **({} if variant is None else {"variant": variant}))
                try:
                    os.replace(scratch, target)
                except OSError:  # another process won the race; its copy is identical
                    if not (target / "model_index.json").exists():
                        raise
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
        _BUILT[key] = str(target)
        return _BUILT[key]


def resolve_model_path(path: str, root: Optional[str | os.PathLike] = None) -> str:
    """``tiny:<family>`` -> that family's tiny pipeline directory (built locally, no hub); else ``path`` with ``~``
    expanded."""
    if path.startswith(TINY_PREFIX):
        return tiny_model_dir(path[len(TINY_PREFIX) :], root)
    return os.path.expanduser(path)
