"""Reward registry and the weighted reward manager.

A reward function scores a whole batch at once, so expensive scorers (an OCR engine) are shared across samples:

    fn(images: list[np.ndarray uint8 HxWx3], prompts: list[str], metadata: list[dict]) -> list[float]

Rewards register by name (``@register_reward("ocr")``); ``RewardManager`` combines several by weight, plus an
optional custom function loaded from a file like verl's ``reward.custom_reward_function.path/name``.
A failing or non-finite reward fails the step loudly: a silent 0 would be trained on as a real signal.
"""

from __future__ import annotations

import concurrent.futures
import functools
import importlib.util
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

RewardFn = Callable[[list, list, list], Sequence[float]]

_REWARD_REGISTRY: dict[str, RewardFn] = {}


def register_reward(name: str) -> Callable[[RewardFn], RewardFn]:
    """Register ``fn`` under ``name``; stackable to register one function under several names."""

    def decorator(fn: RewardFn) -> RewardFn:
        existing = _REWARD_REGISTRY.get(name)
        if existing is not None and existing is not fn:
            raise ValueError(f"reward {name!r} is already registered by {existing.__module__}.{existing.__qualname__}")
        _REWARD_REGISTRY[name] = fn
        return fn

    return decorator


def registered_rewards() -> list[str]:
    return sorted(_REWARD_REGISTRY)


def get_reward_fn(name: str) -> RewardFn:
    try:
        return _REWARD_REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown reward {name!r}; registered rewards: {registered_rewards()}") from None


def load_custom_reward_fn(path: str, name: str, reward_kwargs: Optional[Mapping[str, Any]] = None) -> RewardFn:
    """Load ``name`` from the Python file at ``path`` (as verl's ``get_custom_reward_fn`` does)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"custom reward function file {path!r} not found")
    spec = importlib.util.spec_from_file_location("verl_omni_custom_reward", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    fn = getattr(module, name, None)
    if fn is None or not callable(fn):
        raise AttributeError(f"custom reward function {name!r} not found (or not callable) in {path!r}")
    return functools.partial(fn, **reward_kwargs) if reward_kwargs else fn


class RewardComputationError(RuntimeError):
    """A reward raised or returned something unusable; the message names the reward and the sample."""


class RewardTimeoutError(TimeoutError):
    """A reward exceeded its ``timeout_s``; the message names the reward."""


@dataclass
class RewardSpec:
    name: str  # key in results and metrics
    fn: RewardFn
    weight: float = 1.0
    timeout_s: Optional[float] = None


@dataclass
class RewardResult:
    total: np.ndarray  # [B] float64, weighted sum
    per_reward: dict[str, np.ndarray] = field(default_factory=dict)  # name -> [B] unweighted scores
    weights: dict[str, float] = field(default_factory=dict)

    def metrics(self, prefix: str = "reward") -> dict[str, float]:
        out = {f"{prefix}/total/mean": float(self.total.mean()), f"{prefix}/total/std": float(self.total.std())}
        for name, scores in self.per_reward.items():
            out[f"{prefix}/{name}/mean"] = float(scores.mean())
            out[f"{prefix}/{name}/std"] = float(scores.std())
        return out


def _short(prompt: str, limit: int = 120) -> str:
    return prompt if len(prompt) <= limit else prompt[: limit - 3] + "..."


_REWARD_KEYS = ("name", "weight", "timeout_s")
_CUSTOM_KEYS = ("path", "name", "weight", "reward_kwargs", "timeout_s")


def _check_keys(entry: Mapping[str, Any], allowed: Sequence[str], what: str) -> None:
    """A misspelt key (``wieght``) would otherwise silently fall back to its default."""
    unknown = sorted(set(entry) - set(allowed))
    if unknown:
        raise ValueError(f"{what}: unknown keys {unknown}; allowed keys: {list(allowed)}")


class RewardManager:
    """Weighted sum of registered rewards and an optional custom function.

    config::

        {"rewards": [{"name": "ocr", "weight": 1.0, "timeout_s": 60}, {"name": "jpeg", "weight": 0.5}],
         "custom_reward_function": {"path": None, "name": None, "weight": 1.0, "reward_kwargs": {}}}
    """

    def __init__(self, config: Mapping[str, Any]):
        self.specs: list[RewardSpec] = []
        for entry in config.get("rewards") or []:
            _check_keys(entry, _REWARD_KEYS, f"reward {entry.get('name')!r}")
            self._add(RewardSpec(entry["name"], get_reward_fn(entry["name"]), float(entry.get("weight", 1.0)),
                                 entry.get("timeout_s")))
        custom = config.get("custom_reward_function") or {}
        _check_keys(custom, _CUSTOM_KEYS, f"custom_reward_function {custom.get('name')!r}")
        if custom.get("path"):
            if not custom.get("name"):
                raise ValueError("custom_reward_function.path is set but custom_reward_function.name is not")
            fn = load_custom_reward_fn(custom["path"], custom["name"], custom.get("reward_kwargs"))
            self._add(RewardSpec(f"custom/{custom['name']}", fn, float(custom.get("weight", 1.0)),
                                 custom.get("timeout_s")))
        if not self.specs:
            raise ValueError("RewardManager needs at least one reward in 'rewards' or a 'custom_reward_function'")

    def _add(self, spec: RewardSpec) -> None:
        if any(s.name == spec.name for s in self.specs):
            raise ValueError(f"reward {spec.name!r} is listed twice; give it one entry with the summed weight")
        if not math.isfinite(spec.weight):
            raise ValueError(f"reward {spec.name!r} has a non-finite weight {spec.weight}")
        self.specs.append(spec)

    def __call__(self, images: list, prompts: list[str], metadata: Optional[list[dict]] = None) -> RewardResult:
        batch = len(images)
        metadata = metadata if metadata is not None else [{} for _ in range(batch)]
        if not (len(prompts) == len(metadata) == batch):
            raise ValueError(
                f"images ({batch}), prompts ({len(prompts)}) and metadata ({len(metadata)}) differ in length"
            )
        total = np.zeros(batch, dtype=np.float64)
        result = RewardResult(total=total)
        for spec in self.specs:
            scores = self._score(spec, images, prompts, metadata)
            result.per_reward[spec.name] = scores
            result.weights[spec.name] = spec.weight
            total += spec.weight * scores
        return result

    # -- one reward, with the checks that keep a broken reward from being trained on --

    def _score(self, spec: RewardSpec, images, prompts, metadata) -> np.ndarray:
        try:
            raw = _call_with_timeout(spec, images, prompts, metadata)
        except RewardTimeoutError:
            raise
        except Exception as batch_error:
            # Re-run one sample at a time to name the culprit; re-raise with the batch error if none fails alone.
            for i in range(len(images)):
                try:
                    _call_with_timeout(spec, images[i : i + 1], prompts[i : i + 1], metadata[i : i + 1])
                except RewardTimeoutError:
                    raise
                except Exception as sample_error:
                    raise RewardComputationError(
                        f"reward {spec.name!r} failed on sample {i} (prompt {_short(prompts[i])!r}): "
                        f"{type(sample_error).__name__}: {sample_error}"
                    ) from sample_error
            raise RewardComputationError(
                f"reward {spec.name!r} failed on the batch of {len(images)} samples "
                f"(each sample alone succeeded): {type(batch_error).__name__}: {batch_error}"
            ) from batch_error
        return self._validate(spec, raw, prompts)

    @staticmethod
    def _validate(spec: RewardSpec, raw, prompts) -> np.ndarray:
        try:
            scores = np.asarray(raw, dtype=np.float64).reshape(-1)
        except (TypeError, ValueError) as e:
            raise RewardComputationError(f"reward {spec.name!r} returned values that are not numbers: {e}") from e
        if scores.shape[0] != len(prompts):
            raise RewardComputationError(
                f"reward {spec.name!r} returned {scores.shape[0]} scores for {len(prompts)} samples"
            )
        bad = np.flatnonzero(~np.isfinite(scores))
        if bad.size:
            details = ", ".join(f"sample {i} = {scores[i]} (prompt {_short(prompts[i], 60)!r})" for i in bad[:5])
            raise RewardComputationError(f"reward {spec.name!r} returned non-finite scores: {details}")
        return scores


def _call_with_timeout(spec: RewardSpec, images, prompts, metadata):
    if spec.timeout_s is None:
        return spec.fn(list(images), list(prompts), list(metadata))
    # A thread cannot be killed: on timeout the call is abandoned (it may keep running) and the step fails.
    executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"reward-{spec.name}")
    future = executor.submit(spec.fn, list(images), list(prompts), list(metadata))
    try:
        done, _ = concurrent.futures.wait([future], timeout=spec.timeout_s)
        if not done:
            raise RewardTimeoutError(
                f"reward {spec.name!r} did not finish {len(images)} samples within timeout_s={spec.timeout_s}"
            )
        return future.result()
    finally:
        executor.shutdown(wait=False)
