"""Atomic, verifiable checkpoints of the LoRA actor, in verl's layout.

``<dir>/global_step_<k>/`` holds

- ``lora.safetensors``: the adapter tensors; with full fine-tuning (``lora_rank=0``) the transformer's weights,
  written by rank 0 itself (a ``WeightsWriter``), which returns only the file's sha256 and size to the driver;
- ``ema.safetensors`` (with ``actor_rollout_ref.actor.ema.enable``): the policy EMA as adapter tensors under the same
  names (loadable as the adapter itself, the weights flow_grpo's checkpoints hold), its optimizer-step count in the
  file's metadata;
- ``optim.pt``: the optimizer state dict and torch's RNG state, only tensors and plain containers, so it is read
  with ``torch.load(weights_only=True)`` (a planted pickle cannot run code on resume);
- ``optim_shard_rank<k>.pt`` (full fine-tuning): each rank's shard of the master weights and AdamW state, written
  by the rank itself (an optimizer with ``write_shards``); ``optim.pt`` then names them (``SHARD_FILES``);
- ``rng.json``: Python's and numpy's RNG states as JSON lists (no pickle);
- ``meta.json``: the global step, the sha256 of every other file (``files``) and the caller's metadata.

``<dir>/latest_checkpointed_iteration.txt`` names the newest complete one. Each checkpoint is written to a
temporary directory and renamed, and the marker is replaced last, so a run killed mid-write never leaves a
checkpoint that resume would pick.

Resume (:func:`load_resumable_checkpoint`) verifies before it trusts: every file's sha256 against ``meta.json``,
then a safe read of each file (``weights_in_memory=False``: the weights file's header only, each rank then reads
the file itself from the shared checkpoint directory). A damaged checkpoint (missing file, zeroed or truncated
bytes, a foreign pickle) is named with the file and the reason; the newest intact older checkpoint is used instead
(``trainer.resume_on_damage=fallback``) or the run stops (``stop``). Weights are never resumed unverified.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import random
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional, Union

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from verl_omni.core.weights_file import safetensors_shapes

logger = logging.getLogger(__name__)

LATEST = "latest_checkpointed_iteration.txt"
LORA_FILE = "lora.safetensors"
EMA_FILE = "ema.safetensors"
OPTIM_FILE = "optim.pt"
RNG_FILE = "rng.json"
SHARD_FILES = "shard_files"  # optim.pt's optimizer state of a sharded optimizer: its files, one per rank
META_FILE = "meta.json"
CHECKSUMMED_FILES = (LORA_FILE, OPTIM_FILE, RNG_FILE)
FORMAT_VERSION = 2  # 1: optim.pt held numpy/python RNG states as pickles and meta.json had no checksums
ON_DAMAGE_CHOICES = ("fallback", "stop")
RESUME_MODES = ("auto", "disable", "overwrite")
_STEP_DIR = re.compile(r"^global_step_(\d+)$")
_TEMP_DIR = re.compile(r"^\.global_step_\d+\.")
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)

# Writes the weights file at the path it is given (from the process that holds the weights: full fine-tuning's
# rank 0) and returns (sha256 hex digest, size in bytes) of what it wrote.
WeightsWriter = Callable[[str], tuple[str, int]]


class DamagedCheckpointError(RuntimeError):
    """A checkpoint that failed verification; ``path``, ``file`` and ``reason`` say where and why."""

    def __init__(self, path: str, file: str, reason: str):
        self.path, self.file, self.reason = path, file, reason
        super().__init__(f"checkpoint {path} is damaged: {file}: {reason}")


@dataclass
class Checkpoint:
    """A verified checkpoint read into memory; :meth:`restore` applies its optimizer and RNG states."""

    path: str
    step: int
    lora: Optional[dict[str, torch.Tensor]]  # None when read with weights_in_memory=False: see ``lora_file``
    optimizer_state: dict
    torch_rng: torch.Tensor
    numpy_rng: dict
    python_rng: list
    meta: dict[str, Any]
    # The policy EMA ({"lora": tensors, "optimizer_steps": int}), None when the run saved none.
    ema: Optional[dict[str, Any]] = None

    @property
    def lora_file(self) -> str:
        """The verified weights file, for the processes that read it themselves (full fine-tuning's ranks)."""
        return os.path.join(self.path, LORA_FILE)

    def lora_shapes(self) -> dict[str, tuple[int, ...]]:
        """The weights' shapes by name (from the file's header when the tensors were not read)."""
        if self.lora is not None:
            return {name: tuple(t.shape) for name, t in self.lora.items()}
        return safetensors_shapes(self.lora_file)

    def restore(self, optimizer) -> None:
        """Load the optimizer state and every RNG state (the LoRA tensors are the caller's to load)."""
        optimizer.load_state_dict(self.optimizer_state)
        torch.set_rng_state(self.torch_rng)
        np.random.set_state(_numpy_state_from_json(self.numpy_rng))
        random.setstate(_python_state_from_json(self.python_rng))


# ------------------------------------------------------------------------------------------------ save
def save_checkpoint(
    root: str,
    step: int,
    lora: Union[dict[str, torch.Tensor], WeightsWriter],
    optimizer,
    meta: Optional[dict[str, Any]] = None,
    ema: Optional[dict[str, Any]] = None,
) -> str:
    """Write ``<root>/global_step_<step>`` atomically and point the latest marker at it; returns its path.
    ``lora``: the tensors, or a ``WeightsWriter`` that writes ``lora.safetensors`` into the temporary directory
    itself (the directory must be visible to it: full fine-tuning's rank 0 on a shared filesystem).
    ``ema``: the policy EMA as the actor's ``ema_state_dict`` returns it (written to ``ema.safetensors``).

    A full disk (ENOSPC / EDQUOT anywhere in the error's chain: torch.save reports it as ``unexpected pos``) raises
    OSError(ENOSPC) naming the checkpoint and the free space; the earlier checkpoints and the marker stay as they were.
    """
    os.makedirs(root, exist_ok=True)
    final = os.path.join(root, f"global_step_{step}")
    tmp = tempfile.mkdtemp(prefix=f".global_step_{step}.", dir=root)
    try:
        try:
            _write_checkpoint_files(tmp, step, lora, optimizer, meta, ema)
            if os.path.exists(final):
                shutil.rmtree(final)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)  # no half-written temp dir left behind
            raise
        _atomic_write(os.path.join(root, LATEST), str(step))
    except Exception as exc:  # noqa: BLE001 - re-raised, named when it is a full disk
        if _is_disk_full(exc):
            raise _disk_full_error(root, final) from exc
        raise
    return final


def _write_checkpoint_files(
    tmp: str,
    step: int,
    lora: Union[dict, WeightsWriter],
    optimizer,
    meta: Optional[dict[str, Any]],
    ema: Optional[dict[str, Any]],
) -> None:
    # Every file through Python's open(): a full disk then raises OSError(ENOSPC) (as the cause of torch's error),
    # where the libraries' own C++ / Rust writers report it without an errno.
    known = {}  # sha256 by name, of the files written by another process
    if callable(lora):
        known[LORA_FILE] = _rank_written(tmp, LORA_FILE, *lora(os.path.join(tmp, LORA_FILE)))
    else:
        with open(os.path.join(tmp, LORA_FILE), "wb") as f:
            f.write(safetensors_bytes({k: v.contiguous() for k, v in lora.items()}))
    names = list(CHECKSUMMED_FILES)
    if ema is not None:
        with open(os.path.join(tmp, EMA_FILE), "wb") as f:
            f.write(
                safetensors_bytes(
                    {k: v.contiguous() for k, v in ema["lora"].items()},
                    metadata={"optimizer_steps": str(int(ema["optimizer_steps"]))},
                )
            )
        names.append(EMA_FILE)
    write_shards = getattr(optimizer, "write_shards", None)
    shards = write_shards(tmp) if write_shards is not None else None  # file names in tmp, or None: not sharded
    state = {SHARD_FILES: list(shards)} if shards else optimizer.state_dict()
    names += list(shards or [])
    with open(os.path.join(tmp, OPTIM_FILE), "wb") as f:
        torch.save({"optimizer": state, "torch_rng": torch.get_rng_state()}, f)
    with open(os.path.join(tmp, RNG_FILE), "w") as f:
        json.dump(
            {"numpy": _numpy_state_to_json(np.random.get_state()), "python": _python_state_to_json(random.getstate())},
            f,
        )
    files = {name: known.get(name) or _sha256(os.path.join(tmp, name)) for name in names}
    with open(os.path.join(tmp, META_FILE), "w") as f:
        json.dump(
            {**(meta or {}), "global_step": step, "format_version": FORMAT_VERSION, "files": files},
            f,
            indent=2,
            default=str,
        )


def _rank_written(tmp: str, name: str, digest: str, size: int) -> str:
    """The sha256 another process reports for the file it wrote into ``tmp``, once the file is there at its size."""
    path = os.path.join(tmp, name)
    on_disk = os.path.getsize(path) if os.path.isfile(path) else None
    if on_disk != size:
        raise RuntimeError(
            f"the weights' writer reported {size} bytes for {path}, the driver sees "
            f"{'no file' if on_disk is None else f'{on_disk} bytes'}: trainer.default_local_dir must be one "
            "directory shared by the driver and the actor's ranks (a shared filesystem on several nodes)"
        )
    return digest


def _is_disk_full(exc: BaseException) -> bool:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _DISK_FULL:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _disk_full_error(root: str, final: str) -> OSError:
    try:
        free = f"{shutil.disk_usage(root).free / 2**20:.1f} MiB free there now"
    except OSError:
        free = "free space unknown"
    marker = _marker_step(root)
    kept = f"the latest marker still names step {marker}" if marker is not None else "no earlier checkpoint"
    return OSError(
        errno.ENOSPC,
        f"no space left on device while saving checkpoint {final} ({free}); resume will not use it and the earlier "
        f"checkpoints are untouched ({kept}). Free space on that filesystem or set trainer.default_local_dir to "
        "a larger disk, then start the same command again to resume",
    )


# ------------------------------------------------------------------------------------------------ verify / read
def read_checkpoint(path: str, weights_in_memory: bool = True) -> Checkpoint:
    """Verify ``path`` and read it into memory without changing any state. Raises DamagedCheckpointError.
    ``weights_in_memory=False``: ``lora.safetensors`` is verified (checksum, then its header) but not read; the
    caller's processes read ``Checkpoint.lora_file`` themselves."""
    meta = _read_meta(path)
    files = meta.get("files")
    if meta.get("format_version") != FORMAT_VERSION or not isinstance(files, dict):
        raise DamagedCheckpointError(
            path,
            META_FILE,
            f"format_version={meta.get('format_version')!r}, expected {FORMAT_VERSION} "
            "(written before checksums were recorded; it cannot be verified)",
        )
    # The EMA's file and the optimizer's shards are verified whenever the checkpoint recorded them.
    for name in (*CHECKSUMMED_FILES, *sorted(set(files) - set(CHECKSUMMED_FILES))):
        file_path = os.path.join(path, name)
        if not os.path.isfile(file_path):
            raise DamagedCheckpointError(path, name, "missing")
        expected = files.get(name)
        actual = _sha256(file_path)
        if actual != expected:
            size = os.path.getsize(file_path)
            raise DamagedCheckpointError(
                path,
                name,
                f"sha256 {actual[:12]}… does not match {str(expected)[:12]}… recorded in {META_FILE} "
                f"({size} bytes; changed, zeroed or truncated after it was written)",
            )
    # Checksums can be rewritten along with the files: the reads below stay safe on their own.
    try:
        lora = load_file(os.path.join(path, LORA_FILE)) if weights_in_memory else None
        if lora is None:
            safetensors_shapes(os.path.join(path, LORA_FILE))
    except Exception as exc:  # noqa: BLE001 - any parse failure means the file is unusable
        raise DamagedCheckpointError(path, LORA_FILE, f"not a readable safetensors file ({exc})") from None
    try:
        state = torch.load(os.path.join(path, OPTIM_FILE), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - includes pickle.UnpicklingError for a foreign global
        raise DamagedCheckpointError(
            path, OPTIM_FILE, f"refused by torch.load(weights_only=True): {_first_line(exc)}"
        ) from None
    if not isinstance(state, dict) or not {"optimizer", "torch_rng"} <= set(state):
        raise DamagedCheckpointError(path, OPTIM_FILE, "does not hold 'optimizer' and 'torch_rng'")
    shards = state["optimizer"].get(SHARD_FILES) if isinstance(state["optimizer"], dict) else None
    if shards is not None:  # verified above with the other files; each rank reads its own
        unrecorded = [n for n in shards if n not in files]
        if unrecorded:
            raise DamagedCheckpointError(path, OPTIM_FILE, f"names shard files {unrecorded} that {META_FILE} lacks")
        state["optimizer"] = {SHARD_FILES: [os.path.join(path, n) for n in shards]}
    try:
        with open(os.path.join(path, RNG_FILE)) as f:
            rng = json.load(f)
        numpy_rng, python_rng = rng["numpy"], rng["python"]
        _numpy_state_from_json(numpy_rng), _python_state_from_json(python_rng)
    except Exception as exc:  # noqa: BLE001
        raise DamagedCheckpointError(path, RNG_FILE, f"not a valid RNG state file ({exc})") from None
    return Checkpoint(
        ema=_read_ema(path) if EMA_FILE in files else None,
        path=path,
        step=int(meta["global_step"]),
        lora=lora,
        optimizer_state=state["optimizer"],
        torch_rng=state["torch_rng"],
        numpy_rng=numpy_rng,
        python_rng=python_rng,
        meta=meta,
    )


def _read_ema(path: str) -> dict[str, Any]:
    file_path = os.path.join(path, EMA_FILE)
    try:
        tensors = load_file(file_path)
        with safe_open(file_path, "pt") as f:
            steps = int((f.metadata() or {})["optimizer_steps"])
    except Exception as exc:  # noqa: BLE001 - any parse failure means the file is unusable
        raise DamagedCheckpointError(
            path, EMA_FILE, f"not a readable safetensors file with 'optimizer_steps' metadata ({exc})"
        ) from None
    return {"lora": tensors, "optimizer_steps": steps}


def load_resumable_checkpoint(
    root: str, on_damage: str = "fallback", weights_in_memory: bool = True
) -> Optional[Checkpoint]:
    """The newest intact checkpoint under ``root`` (verified, in memory), or None when there is none at all.
    ``weights_in_memory``: as :func:`read_checkpoint`'s.

    A damaged one is reported (log + print) naming the file and the reason; then ``on_damage='fallback'``
    tries the next older one and says which it resumes from, ``'stop'`` raises DamagedCheckpointError.
    If checkpoints exist but every one is damaged, this raises rather than silently starting from scratch.
    """
    if on_damage not in ON_DAMAGE_CHOICES:
        raise ValueError(f"trainer.resume_on_damage={on_damage!r} is not one of {list(ON_DAMAGE_CHOICES)}")
    candidates = _candidate_steps(root)
    damaged: list[DamagedCheckpointError] = []
    for step in candidates:
        path = os.path.join(root, f"global_step_{step}")
        try:
            checkpoint = read_checkpoint(path, weights_in_memory) if os.path.isdir(path) else _missing(path)
        except DamagedCheckpointError as exc:
            _say(f"{exc}", level=logging.ERROR)
            if on_damage == "stop":
                raise DamagedCheckpointError(
                    exc.path,
                    exc.file,
                    exc.reason
                    + (
                        "; trainer.resume_on_damage=stop: not resuming. Set trainer.resume_on_damage=fallback to "
                        f"resume from the newest intact checkpoint, or move {exc.path} away"
                    ),
                ) from None
            damaged.append(exc)
            continue
        if damaged:
            _say(
                f"resuming from {path} (step {step}), the newest intact checkpoint; skipped damaged "
                f"{', '.join(os.path.basename(e.path) for e in damaged)} (trainer.resume_on_damage=fallback)",
                level=logging.WARNING,
            )
        return checkpoint
    if damaged:
        raise RuntimeError(
            f"every checkpoint under {root} is damaged ({'; '.join(str(e) for e in damaged)}); refusing to start "
            "over silently. Move them away (or set trainer.default_local_dir to another directory) to train from "
            "scratch, or set trainer.resume_mode=overwrite to delete them and start a new run there"
        )
    return None


def find_latest_checkpoint(root: str) -> Optional[str]:
    """The directory the latest marker names, or None; its files are checked to exist, not verified
    (:func:`load_resumable_checkpoint` verifies). Half-written (temporary) directories are never named."""
    marker = os.path.join(root, LATEST)
    if not os.path.exists(marker):
        return None
    step = _marker_step(root)
    if step is None:
        raise ValueError(f"{marker} does not hold a step number")
    path = os.path.join(root, f"global_step_{step}")
    if not all(os.path.exists(os.path.join(path, name)) for name in (*CHECKSUMMED_FILES, META_FILE)):
        raise FileNotFoundError(f"{marker} names step {step} but {path} is incomplete")
    return path


def load_checkpoint(path: str, optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Verify ``path``, restore the optimizer and RNG states from it; (LoRA tensors, meta). Raises
    DamagedCheckpointError (naming the file) instead of loading anything unverified."""
    checkpoint = read_checkpoint(path)
    checkpoint.restore(optimizer)
    return checkpoint.lora, checkpoint.meta


def resume_past_total_message(saved_step: int, total_training_steps: int) -> Optional[str]:
    """What to tell the user when a resumed run has nothing left to train; None when steps remain."""
    if saved_step < total_training_steps:
        return None
    return (
        f"resumed at global step {saved_step}, which is >= trainer.total_training_steps={total_training_steps}: "
        f"no step left to train. Raise trainer.total_training_steps above {saved_step} to train further, "
        "or set trainer.default_local_dir to another directory to start a new run"
    )


class ExistingRunError(RuntimeError):
    """``trainer.resume_mode=disable`` in a directory that holds another run's checkpoints."""


def prepare_run_directory(root: str, resume_mode: str) -> None:
    """Before a run starts in ``root`` (its run lock held): never mix a new run into another run's checkpoints.

    ``auto`` continues the run found there (if any). ``disable`` starts a new run: refused when ``root`` holds
    checkpoints, which it would overwrite step by step (the latest marker moved back: two runs mixed).
    ``overwrite`` is the explicit way to replace that run: its checkpoints are deleted first, said loudly.
    """
    if resume_mode not in RESUME_MODES:
        raise ValueError(f"trainer.resume_mode={resume_mode!r} is not one of {list(RESUME_MODES)}")
    steps, marker = _steps_on_disk(root), _marker_step(root)
    if resume_mode == "auto" or (not steps and not os.path.exists(os.path.join(root, LATEST))):
        return
    found = f"steps {_short([str(s) for s in steps])}" if steps else "no step directory"
    found += f", latest marker: {marker}" if marker is not None else ""
    if resume_mode == "disable":
        raise ExistingRunError(
            f"trainer.resume_mode=disable starts a new run, but trainer.default_local_dir={root} holds the "
            f"checkpoints of another run ({found}), which the new run would overwrite. Set trainer.default_local_dir "
            "to another directory for the new run, trainer.resume_mode=auto to continue that run, or "
            "trainer.resume_mode=overwrite to delete its checkpoints and start the new run there"
        )
    for name in os.listdir(root):
        if _STEP_DIR.match(name) or _TEMP_DIR.match(name):
            shutil.rmtree(os.path.join(root, name))
    if os.path.exists(os.path.join(root, LATEST)):
        os.remove(os.path.join(root, LATEST))
    _say(
        f"trainer.resume_mode=overwrite: deleted the checkpoints of the previous run in {root} ({found}); "
        "a new run starts there",
        level=logging.WARNING,
    )


class IncompatibleCheckpointError(ValueError):
    """A checkpoint whose LoRA adapter is not the one this run trains (rank, alpha or target modules changed)."""


def lora_meta(rank: int, alpha: float, target_modules) -> dict[str, Any]:
    """What a checkpoint's meta records of the adapter, for :func:`check_lora_fits` on resume."""
    return {"rank": int(rank), "alpha": float(alpha), "target_modules": list(target_modules)}


def check_lora_fits(checkpoint: Checkpoint, lora: dict[str, Any], expected_shapes: dict[str, Any]) -> None:
    """Raise IncompatibleCheckpointError naming the checkpoint and what changed when its adapter does not fit this
    run's: ``lora`` is this run's :func:`lora_meta`, ``expected_shapes`` its adapter's tensor shapes by name. The meta
    is compared when the checkpoint recorded it; the tensors' names and shapes always."""
    changed = []
    saved = checkpoint.meta.get("lora")
    if isinstance(saved, dict):
        for key in ("rank", "alpha", "target_modules"):
            if key in saved and saved[key] != lora[key]:
                name = "target_modules" if key == "target_modules" else f"lora_{key}"
                changed.append(f"actor_rollout_ref.model.{name}={lora[key]!r} (the checkpoint's: {saved[key]!r})")
    saved_shapes = checkpoint.lora_shapes()
    names, saved_names = set(expected_shapes), set(saved_shapes)
    shapes = [
        f"{k} {list(saved_shapes[k])} -> {list(expected_shapes[k])}"
        for k in sorted(names & saved_names)
        if tuple(saved_shapes[k]) != tuple(expected_shapes[k])
    ]
    tensors = [
        f"{what}: {_short(sorted(keys))}"
        for what, keys in (
            ("shapes changed", shapes),
            ("not in the checkpoint", names - saved_names),
            ("in the checkpoint only", saved_names - names),
        )
        if keys
    ]
    if not changed and not tensors:
        return
    raise IncompatibleCheckpointError(
        f"checkpoint {checkpoint.path} holds a LoRA adapter this run cannot resume: "
        + "; ".join(changed + [f"tensors {t}" for t in tensors])
        + ". Set actor_rollout_ref.model.lora_rank / lora_alpha / target_modules back to the checkpoint's values to "
        "continue that run, or set trainer.default_local_dir to another directory to start a new one"
    )


# ------------------------------------------------------------------------------------------------ helpers
def _steps_on_disk(root: str) -> list[int]:
    """The steps of the ``global_step_*`` directories under ``root``, oldest first."""
    names = os.listdir(root) if os.path.isdir(root) else []
    return sorted(int(m.group(1)) for name in names if (m := _STEP_DIR.match(name)))


def _short(items: list[str], shown: int = 4) -> str:
    return ", ".join(items[:shown]) + (f" … ({len(items)} in all)" if len(items) > shown else "")


def _candidate_steps(root: str) -> list[int]:
    """Steps to try, newest first: the marker's step, then every older ``global_step_*`` directory."""
    on_disk = _steps_on_disk(root)[::-1]
    marker = _marker_step(root)
    if marker is None:
        if on_disk:
            _say(
                f"{os.path.join(root, LATEST)} is missing or unreadable; considering {len(on_disk)} checkpoint "
                "directories found beside it",
                level=logging.WARNING,
            )
        return on_disk
    # Directories above the marker belong to a save that never completed its marker update: not trusted.
    return [marker] + [s for s in on_disk if s < marker]


def _marker_step(root: str) -> Optional[int]:
    try:
        with open(os.path.join(root, LATEST)) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def _missing(path: str):
    raise DamagedCheckpointError(path, os.path.basename(path), f"directory missing (named by {LATEST})")


def _read_meta(path: str) -> dict:
    try:
        with open(os.path.join(path, META_FILE)) as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise DamagedCheckpointError(path, META_FILE, "missing") from None
    except (OSError, ValueError) as exc:
        raise DamagedCheckpointError(path, META_FILE, f"not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or "global_step" not in meta:
        raise DamagedCheckpointError(path, META_FILE, "has no 'global_step'")
    return meta


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _numpy_state_to_json(state: tuple) -> dict:
    name, keys, pos, has_gauss, cached = state
    return {
        "name": name,
        "keys": [int(k) for k in keys],
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached),
    }


def _numpy_state_from_json(state: dict) -> tuple:
    keys = np.asarray(state["keys"], dtype=np.uint32)
    if state["name"] != "MT19937" or keys.shape != (624,):
        raise ValueError("numpy RNG state must be MT19937 with 624 keys")
    return state["name"], keys, int(state["pos"]), int(state["has_gauss"]), float(state["cached_gaussian"])


def _python_state_to_json(state: tuple) -> list:
    version, internal, gauss_next = state
    return [version, list(internal), gauss_next]


def _python_state_from_json(state: list) -> tuple:
    version, internal, gauss_next = state
    return int(version), tuple(int(x) for x in internal), gauss_next


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def _say(message: str, level: int) -> None:
    """Log and print: resume decisions must reach the console even when logging is configured quietly."""
    logger.log(level, message)
    print(f"[verl_omni] {message}", flush=True)


def _atomic_write(path: str, text: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
