"""Reward registry and the weighted reward manager.

A reward function scores a whole batch at once, so expensive scorers (an OCR engine) are shared across samples:

    fn(images: list[np.ndarray uint8 HxWx3], prompts: list[str], metadata: list[dict]) -> list[float]

A sample may also be a video, uint8 ``[F, H, W, 3]`` (``verl_omni.core.media``). What a reward receives depends on
the ``media`` it registers with: ``image`` (the default) gets images, and a video's frames one by one, their scores
reduced by the entry's ``frame_reduction`` / ``frame_stride`` (``frames.py``); ``video`` gets every sample as
``[F, H, W, 3]`` frames (an image as one frame); ``any`` gets samples as they are (whole clips), or frames when its
entry sets ``frame_reduction``.

Rewards register by name (``@register_reward("ocr")``); ``RewardManager`` combines several by weight, plus an
optional custom function loaded from a file like verl's ``reward.custom_reward_function.path/name``.
A reward whose entry carries its own options (a model path, a service URL) registers a factory instead
(``@register_reward_factory("pickscore", options=("path", ...))``): the entry's extra keys go to it.
A failing, non-numeric or non-finite reward fails the step loudly: a silent 0 would be trained on as a real signal.
"""

from __future__ import annotations

import concurrent.futures
import functools
import importlib.util
import math
import numbers
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from verl_omni.core.media import as_frames
from verl_omni.rewards.frames import (
    DEFAULT_FRAME_REDUCTION,
    check_frame_options,
    frame_plan,
    reduce_frames,
)

RewardFn = Callable[[list, list, list], Sequence[float]]

# Seconds one reward may take for one call (a group or a piece of one) unless its entry sets ``timeout_s``
# (``reward.default_timeout_s``): a reward that never returns fails the step, naming itself, instead of hanging
# the run. Rewards that own their timeout (``http``: per request, retries included) keep their own default.
DEFAULT_REWARD_TIMEOUT_S = 300.0
DEFAULT_TIMEOUT_KEY = "reward.default_timeout_s"

_REWARD_REGISTRY: dict[str, RewardFn] = {}

MEDIA = ("image", "video", "any")  # what a reward scores (module docstring)
_MEDIA_OF: dict[str, str] = {}


def register_reward(name: str, *, media: str = "image") -> Callable[[RewardFn], RewardFn]:
    """Register ``fn`` under ``name``; stackable to register one function under several names."""
    _check_media(name, media)

    def decorator(fn: RewardFn) -> RewardFn:
        _refuse_taken_name(name, fn)
        _REWARD_REGISTRY[name] = fn
        _MEDIA_OF[name] = media
        return fn

    return decorator


@dataclass(frozen=True)
class RewardFactory:
    """A reward configured by its entry: ``build(**options) -> RewardFn`` with the entry's extra keys."""

    build: Callable[..., RewardFn]
    options: tuple[str, ...]  # entry keys it takes beyond name / weight / timeout_s
    # True: ``timeout_s`` is passed to ``build`` (e.g. per HTTP request, retries included) instead of bounding
    # the whole call from a thread, which would cut a reward's own retries short.
    owns_timeout: bool = False
    # True: a model that a RewardPool serves once from its own actor (it may hold a GPU), not in every worker.
    model: bool = False


_FACTORY_REGISTRY: dict[str, RewardFactory] = {}


def register_reward_factory(
    name: str, options: Sequence[str], *, owns_timeout: bool = False, model: bool = False, media: str = "image"
) -> Callable[[Callable[..., RewardFn]], Callable[..., RewardFn]]:
    """Register ``build(**options) -> RewardFn`` under ``name``; ``options`` are the entry keys it accepts."""
    _check_media(name, media)

    def decorator(build: Callable[..., RewardFn]) -> Callable[..., RewardFn]:
        _refuse_taken_name(name, build)
        _FACTORY_REGISTRY[name] = RewardFactory(build, tuple(options), owns_timeout, model)
        _MEDIA_OF[name] = media
        return build

    return decorator


def _check_media(name: str, media: str) -> None:
    if media not in MEDIA:
        raise ValueError(f"reward {name!r}: media={media!r} must be one of {list(MEDIA)}")


def reward_media(name: str) -> str:
    """What the registered reward ``name`` scores: ``image``, ``video`` or ``any`` (module docstring)."""
    get_reward_factory(name) or get_reward_fn(name)  # an unknown name raises, listing the registered ones
    return _MEDIA_OF.get(name, "image")


def _refuse_taken_name(name: str, fn: Callable) -> None:
    existing = _REWARD_REGISTRY.get(name) or getattr(_FACTORY_REGISTRY.get(name), "build", None)
    if existing is not None and existing is not fn:
        raise ValueError(f"reward {name!r} is already registered by {existing.__module__}.{existing.__qualname__}")


def registered_rewards() -> list[str]:
    return sorted({*_REWARD_REGISTRY, *_FACTORY_REGISTRY})


def get_reward_fn(name: str) -> RewardFn:
    if name in _FACTORY_REGISTRY:
        raise ValueError(
            f"reward {name!r} needs options {list(_FACTORY_REGISTRY[name].options)}: build it from its "
            "entry with build_reward_fn({'name': ..., <options>})"
        )
    try:
        return _REWARD_REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown reward {name!r}; registered rewards: {registered_rewards()}") from None


def get_reward_factory(name: str) -> Optional[RewardFactory]:
    """The factory registered under ``name``, or None for a plain reward function (or an unknown name)."""
    return _FACTORY_REGISTRY.get(name)


def allowed_entry_keys(name: str) -> tuple[str, ...]:
    factory = _FACTORY_REGISTRY.get(name)
    return _REWARD_KEYS + (factory.options if factory else ())


def build_reward_fn(entry: Mapping[str, Any]) -> RewardFn:
    """The reward function of one ``reward.rewards`` entry: the registered function, or its factory's product."""
    name = entry["name"]
    factory = _FACTORY_REGISTRY.get(name)
    if factory is None:
        return get_reward_fn(name)
    options = {key: entry[key] for key in factory.options if key in entry}
    if factory.owns_timeout and entry.get("timeout_s") is not None:
        options["timeout_s"] = entry["timeout_s"]
    return factory.build(**options)


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


class RewardSampleError(RewardComputationError):
    """Raised by a reward that knows which samples it failed on (e.g. a bad answer from a scoring service).

    ``indices`` are positions in the batch the reward function received; the manager names them (with their
    prompts) instead of re-running the reward one sample at a time to find the culprit.
    """

    def __init__(self, indices: Sequence[int], detail: str):
        self.indices = [int(i) for i in indices]
        self.detail = detail
        super().__init__(f"{_name_samples(self.indices)}: {detail}")

    def __reduce__(self):  # Exception pickles its message as the only argument: keep both fields across Ray
        return type(self), (self.indices, self.detail)


class RewardTimeoutError(TimeoutError):
    """A reward exceeded its ``timeout_s``; the message names the reward."""


@dataclass
class RewardSpec:
    name: str  # key in results and metrics
    fn: RewardFn
    weight: float = 1.0
    timeout_s: Optional[float] = None
    timeout_key: str = DEFAULT_TIMEOUT_KEY  # the config key that set timeout_s (named when it expires)


@dataclass
class RewardResult:
    total: np.ndarray  # [B] float64, weighted sum
    per_reward: dict[str, np.ndarray] = field(default_factory=dict)  # name -> [B] unweighted scores
    weights: dict[str, float] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)  # name -> wall seconds spent scoring (summed by concat)

    def metrics(self, prefix: str = "reward") -> dict[str, float]:
        out = {f"{prefix}/total/mean": float(self.total.mean()), f"{prefix}/total/std": float(self.total.std())}
        for name, scores in self.per_reward.items():
            out[f"{prefix}/{name}/mean"] = float(scores.mean())
            out[f"{prefix}/{name}/std"] = float(scores.std())
        for name, seconds in self.seconds.items():
            out[f"{prefix}/{name}/seconds"] = float(seconds)
        return out

    @staticmethod
    def concat(results: Sequence[RewardResult]) -> RewardResult:
        """Results of consecutive sample ranges (e.g. groups scored one by one) as one batch, in order."""
        if not results:
            raise ValueError("RewardResult.concat needs at least one result")
        names = list(results[0].per_reward)
        for r in results[1:]:
            if list(r.per_reward) != names or r.weights != results[0].weights:
                raise ValueError(f"cannot concat results of different rewards: {names} vs {list(r.per_reward)}")
        return RewardResult(
            total=np.concatenate([r.total for r in results]),
            per_reward={n: np.concatenate([r.per_reward[n] for r in results]) for n in names},
            weights=dict(results[0].weights),
            seconds={n: float(sum(r.seconds.get(n, 0.0) for r in results)) for n in results[0].seconds},
        )


METADATA_KEYS = ("reward_model", "data_source", "extra_info")  # verl's row columns a reward may read


def row_metadata(non_tensor: Mapping[str, Any], index: int) -> dict:
    """The reward metadata of row ``index`` of a verl batch's non-tensor columns (``reward_model`` with its
    ``ground_truth``, ``data_source``, ``extra_info``: the ones present)."""
    return {key: non_tensor[key][index] for key in METADATA_KEYS if key in non_tensor}


def _short(prompt: str, limit: int = 120) -> str:
    return prompt if len(prompt) <= limit else prompt[: limit - 3] + "..."


def _index_ranges(indices: Sequence[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5': a chunk of a batch stays one short phrase in an error message."""
    parts, start = [], None
    for k, i in enumerate(indices):
        if start is None:
            start = i
        if k + 1 == len(indices) or indices[k + 1] != i + 1:
            parts.append(str(start) if start == i else f"{start}-{i}")
            start = None
    return ", ".join(parts)


def _name_samples(labels: Sequence) -> str:
    """'sample 3', 'samples 16-31' (integer labels as ranges) or 'samples a, b, c'."""
    if len(labels) == 1:
        return f"sample {labels[0]}"
    if all(isinstance(x, (int, np.integer)) for x in labels):
        return f"samples {_index_ranges([int(x) for x in labels])}"
    return "samples " + ", ".join(str(x) for x in labels[:16]) + (" ..." if len(labels) > 16 else "")


_FRAME_KEYS = ("frame_reduction", "frame_stride")
_REWARD_KEYS = ("name", "weight", "timeout_s", *_FRAME_KEYS)
_CUSTOM_KEYS = ("path", "name", "weight", "reward_kwargs", "timeout_s", "media", *_FRAME_KEYS)


def _check_keys(entry: Mapping[str, Any], allowed: Sequence[str], what: str) -> None:
    """A misspelt key (``wieght``) would otherwise silently fall back to its default."""
    unknown = sorted(set(entry) - set(allowed))
    if unknown:
        raise ValueError(f"{what}: unknown keys {unknown}; allowed keys: {list(allowed)}")


class RewardManager:
    """Weighted sum of registered rewards and an optional custom function.

    config::

        {"rewards": [{"name": "ocr", "weight": 1.0, "timeout_s": 60}, {"name": "jpeg", "weight": 0.5},
                     {"name": "pickscore", "path": "/models/PickScore_v1", "weight": 1.0}],
         "custom_reward_function": {"path": None, "name": None, "weight": 1.0, "reward_kwargs": {}}}

    ``reward_fns`` replaces the function of the entries it names (``{"pickscore": client}``): a RewardPool's
    workers use it to call one shared reward-model actor instead of loading the model in every worker.
    ``default_timeout_s`` (default ``DEFAULT_REWARD_TIMEOUT_S``) bounds every entry without its own ``timeout_s``.
    Other top-level keys (``num_workers``, ...) belong to whoever places the manager and are ignored here.
    """

    def __init__(self, config: Mapping[str, Any], reward_fns: Optional[Mapping[str, RewardFn]] = None):
        self.specs: list[RewardSpec] = []
        reward_fns = dict(reward_fns or {})
        default_timeout = config.get("default_timeout_s", DEFAULT_REWARD_TIMEOUT_S)
        _check_timeout(DEFAULT_TIMEOUT_KEY, default_timeout)
        for index, entry in enumerate(config.get("rewards") or []):
            if "name" not in entry:
                raise ValueError(
                    f"reward entry {dict(entry)} has no 'name'; registered rewards: {registered_rewards()}"
                )
            name = entry["name"]
            if name not in _REWARD_REGISTRY and name not in _FACTORY_REGISTRY:
                raise ValueError(f"unknown reward {name!r}; registered rewards: {registered_rewards()}")
            _check_keys(entry, allowed_entry_keys(name), f"reward {name!r}")
            fn = reward_fns.pop(name) if name in reward_fns else build_reward_fn(entry)
            fn = media_adapter(name, fn, reward_media(name), entry, f"reward.rewards[{index}]")
            factory = _FACTORY_REGISTRY.get(name)
            own_key = f"reward.rewards[{index}].timeout_s"
            if entry.get("timeout_s") is not None:
                _check_timeout(own_key, entry["timeout_s"])
            if factory is not None and factory.owns_timeout:
                timeout_s, timeout_key = None, own_key
            elif entry.get("timeout_s") is not None:
                timeout_s, timeout_key = entry["timeout_s"], own_key
            else:
                timeout_s, timeout_key = default_timeout, DEFAULT_TIMEOUT_KEY
            self._add(RewardSpec(name, fn, float(entry.get("weight", 1.0)), timeout_s, timeout_key))
        if reward_fns:
            raise ValueError(f"reward_fns given for {sorted(reward_fns)}, which no entry of 'rewards' names")
        custom = config.get("custom_reward_function") or {}
        _check_keys(custom, _CUSTOM_KEYS, f"custom_reward_function {custom.get('name')!r}")
        if custom.get("path"):
            if not custom.get("name"):
                raise ValueError("custom_reward_function.path is set but custom_reward_function.name is not")
            fn = load_custom_reward_fn(custom["path"], custom["name"], custom.get("reward_kwargs"))
            media = custom.get("media", "image")
            if media not in ("image", "video"):
                raise ValueError(
                    f"reward.custom_reward_function.media={media!r} must be 'image' (the function scores images; "
                    "a video's frames one by one) or 'video' (it scores [F, H, W, 3] clips)"
                )
            fn = media_adapter(f"custom/{custom['name']}", fn, media, custom, "reward.custom_reward_function")
            timeout_s, timeout_key = default_timeout, DEFAULT_TIMEOUT_KEY
            if custom.get("timeout_s") is not None:
                timeout_key = "reward.custom_reward_function.timeout_s"
                timeout_s = custom["timeout_s"]
                _check_timeout(timeout_key, timeout_s)
            self._add(
                RewardSpec(f"custom/{custom['name']}", fn, float(custom.get("weight", 1.0)), timeout_s, timeout_key)
            )
        if not self.specs:
            raise ValueError("RewardManager needs at least one reward in 'rewards' or a 'custom_reward_function'")

    def _add(self, spec: RewardSpec) -> None:
        if any(s.name == spec.name for s in self.specs):
            raise ValueError(f"reward {spec.name!r} is listed twice; give it one entry with the summed weight")
        if not math.isfinite(spec.weight):
            raise ValueError(f"reward {spec.name!r} has a non-finite weight {spec.weight}")
        self.specs.append(spec)

    @property
    def names(self) -> list[str]:
        return [spec.name for spec in self.specs]

    def __call__(
        self,
        images: list,
        prompts: list[str],
        metadata: Optional[list[dict]] = None,
        *,
        sample_ids: Optional[Sequence] = None,
    ) -> RewardResult:
        """Score a batch. ``sample_ids`` (default: 0..B-1) are the names errors give the samples, e.g. their
        rows in the caller's larger batch when it scores one group at a time."""
        batch = len(images)
        metadata = metadata if metadata is not None else [{} for _ in range(batch)]
        if not (len(prompts) == len(metadata) == batch):
            raise ValueError(
                f"images ({batch}), prompts ({len(prompts)}) and metadata ({len(metadata)}) differ in length"
            )
        labels = list(sample_ids) if sample_ids is not None else list(range(batch))
        if len(labels) != batch:
            raise ValueError(f"sample_ids ({len(labels)}) and images ({batch}) differ in length")
        total = np.zeros(batch, dtype=np.float64)
        result = RewardResult(total=total)
        for spec in self.specs:
            start = time.perf_counter()
            scores = self._score(spec, images, prompts, metadata, labels)
            result.seconds[spec.name] = time.perf_counter() - start
            result.per_reward[spec.name] = scores
            result.weights[spec.name] = spec.weight
            total += spec.weight * scores
        return result

    # -- one reward, with the checks that keep a broken reward from being trained on --

    def _score(self, spec: RewardSpec, images, prompts, metadata, labels) -> np.ndarray:
        try:
            raw = _call_with_timeout(spec, images, prompts, metadata)
        except RewardTimeoutError:
            raise
        except RewardSampleError as known:  # the reward named its failing samples: no need to re-run
            first = known.indices[0] if known.indices else 0
            raise RewardComputationError(
                f"reward {spec.name!r} failed on {_name_samples([labels[i] for i in known.indices])} "
                f"({'first ' if len(known.indices) > 1 else ''}prompt {_short(prompts[first])!r}): {known.detail}"
            ) from known
        except Exception as batch_error:
            # Re-run one sample at a time to name the culprit; re-raise with the batch error if none fails alone.
            for i in range(len(images)):
                try:
                    _call_with_timeout(spec, images[i : i + 1], prompts[i : i + 1], metadata[i : i + 1])
                except RewardTimeoutError:
                    raise
                except Exception as sample_error:
                    raise RewardComputationError(
                        f"reward {spec.name!r} failed on sample {labels[i]} (prompt {_short(prompts[i])!r}): "
                        f"{type(sample_error).__name__}: {sample_error}"
                    ) from sample_error
            raise RewardComputationError(
                f"reward {spec.name!r} failed on the batch of {len(images)} samples "
                f"(each sample alone succeeded): {type(batch_error).__name__}: {batch_error}"
            ) from batch_error
        return self._validate(spec, raw, prompts, labels)

    @staticmethod
    def _validate(spec: RewardSpec, raw, prompts, labels) -> np.ndarray:
        values = _score_values(spec.name, raw)
        if len(values) != len(prompts):
            raise RewardComputationError(
                f"reward {spec.name!r} returned {len(values)} scores for {len(prompts)} samples"
            )
        for i, value in enumerate(values):
            if not is_real_number(value):
                raise RewardComputationError(
                    f"reward {spec.name!r} returned a non-number for sample {labels[i]} "
                    f"(prompt {_short(prompts[i], 60)!r}): {value!r} of type {type(value).__name__}; "
                    "rewards must return real numbers (int or float), not str, bool, None or complex"
                )
        scores = np.asarray(values, dtype=np.float64)
        bad = np.flatnonzero(~np.isfinite(scores))
        if bad.size:
            details = ", ".join(
                f"sample {labels[i]} = {scores[i]} (prompt {_short(prompts[i], 60)!r})" for i in bad[:5]
            )
            raise RewardComputationError(f"reward {spec.name!r} returned non-finite scores: {details}")
        return scores


def is_real_number(value: Any) -> bool:
    """int / float / numpy integer or floating scalars; not bool (an int subclass), str, None or complex."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _score_values(name: str, raw: Any) -> list:
    """A reward's return value as a flat list of Python/numpy scalars, each still to be checked.

    ``np.asarray(raw, dtype=float64)`` alone would turn "0.5" into 0.5 and True into 1.0: a reward that
    returns the wrong type is a bug to report, not a value to coerce.
    """
    if type(raw).__module__.split(".")[0] == "torch":  # a torch tensor, without importing torch here
        raw = raw.detach().cpu()
        raw = (raw.double() if raw.is_floating_point() else raw).numpy()
    if isinstance(raw, np.ndarray):  # bool / str / complex arrays give numpy scalars the caller refuses
        return list(raw.reshape(-1))
    if isinstance(raw, (str, bytes, Mapping)) or not hasattr(raw, "__iter__"):
        raise RewardComputationError(
            f"reward {name!r} returned a {type(raw).__name__}, not a sequence of one number per sample"
        )
    return list(raw)


def _check_timeout(key: str, value: Any) -> None:
    if not is_real_number(value) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{key}={value!r} must be a finite number of seconds > 0")


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
                f"reward {spec.name!r} did not finish {len(images)} samples within {spec.timeout_s} s "
                f"({spec.timeout_key}={spec.timeout_s}): raise it for a slow reward, or find why it hangs"
            )
        return future.result()
    finally:
        executor.shutdown(wait=False)


# -- videos: what each reward receives (module docstring) --


def media_adapter(name: str, fn: RewardFn, media: str, entry: Mapping[str, Any], where: str) -> RewardFn:
    """``fn`` wrapped to receive what its ``media`` takes; ``entry``'s frame keys are checked (``where`` names it)."""
    frame_keys = [key for key in ("frame_reduction", "frame_stride") if key in entry]
    if media == "video" and frame_keys:
        raise ValueError(
            f"{where}.{frame_keys[0]} does not apply to reward {name!r}: it scores whole clips, not frames"
        )
    if media == "video":
        return _WholeClips(fn)
    if media == "any" and not frame_keys:
        return fn
    reduction, stride = check_frame_options(
        where, entry.get("frame_reduction", DEFAULT_FRAME_REDUCTION), entry.get("frame_stride", 1)
    )
    return _PerFrame(name, fn, reduction, stride)


@dataclass
class _WholeClips:
    """Every sample as ``[F, H, W, 3]`` uint8 frames (an image as one frame)."""

    fn: RewardFn

    def __call__(self, samples: list, prompts: list[str], metadata: list[dict]):
        return self.fn([as_frames(s, f"sample {i}") for i, s in enumerate(samples)], prompts, metadata)


@dataclass
class _PerFrame:
    """An image reward on a video's frames, reduced per clip (``frames.py``); a batch of images passes unchanged."""

    name: str
    fn: RewardFn
    reduction: str
    stride: int

    def __call__(self, samples: list, prompts: list[str], metadata: list[dict]):
        if all(np.ndim(s) == 3 for s in samples):
            return self.fn(samples, prompts, metadata)
        frames, owners, times = frame_plan(samples, self.reduction, self.stride)
        try:
            raw = self.fn(frames, [prompts[i] for i in owners], [metadata[i] for i in owners])
        except RewardSampleError as known:  # its indices are frames: name their samples
            samples_hit = sorted({owners[k] for k in known.indices if 0 <= k < len(owners)})
            raise RewardSampleError(samples_hit, f"on frames of these samples: {known.detail}") from known
        values = _score_values(self.name, raw)
        if len(values) != len(frames):
            raise RewardComputationError(
                f"reward {self.name!r} returned {len(values)} scores for {len(frames)} frames "
                f"(of {len(samples)} samples)"
            )
        for k, value in enumerate(values):
            if not is_real_number(value):
                raise RewardSampleError(
                    [owners[k]],
                    f"returned a non-number for its frame {times[k]}: {value!r} of type {type(value).__name__}; "
                    "rewards must return real numbers (int or float)",
                )
        return reduce_frames(np.asarray(values, dtype=np.float64), owners, len(samples), self.reduction)
