"""``actor_rollout_ref.model.text_encoder_offload``: the pipeline's text encoders hold no GPU memory during the
hybrid engine's update.

The update reads the prompt embeddings the rollout returned (the batch's conditioning), never a text encoder; yet in
the hybrid engine the text encoders sit on the GPU beside the transformer the actor trains (Qwen-Image's
Qwen2.5-VL-7B: ~16 GB in bf16), memory the update's activations could use (``gradient_checkpointing_blocks: auto``
keeps more blocks). :class:`TextEncoderOffload` moves them to host memory right before each update and back right
after it, before the next rollout:

- each frozen weight is copied once into host memory and that copy is kept: later offloads only drop the device
  tensors, and each restore is one host-to-device copy; buffers and trainable tensors are copied every time;
- the kept copies share one host buffer of their exact size (:class:`HostArena`), page-locked by one
  ``cudaHostRegister`` where they come from a GPU: PyTorch's pinned allocator (``pin_memory=True``) rounds every
  allocation up to a power of two, which would page-lock 31.4 GB of host memory per GPU for Qwen2.5-VL-7B's
  16.6 GB (1.3-1.4x for FLUX's, SD3.5's and Wan's encoders);
- the freed memory goes back to the device (``release``: the CUDA cache emptied), so the update's memory planner
  (``workers/activation_memory.py``) counts it as free; on restore the cache is emptied again first, so the memory
  the update's activations used is there for the encoders;
- tensors in an engine's own memory pool, which a freed tensor cannot leave (vllm-omni's CuMem pool of sleep mode),
  go through a :class:`PoolSegments`: every pool segment that holds only text-encoder tensors is unmapped (its
  tensors keep their addresses) and mapped back and refilled on restore; pool segments shared with other weights
  stay (their bytes are reported as kept);
- while the encoders are off, calling one raises: the update must not encode prompts.
"""

from __future__ import annotations

import logging
import mmap
import time
import weakref
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Optional, Protocol, Union

import torch

logger = logging.getLogger(__name__)

KEY = "actor_rollout_ref.model.text_encoder_offload"
AUTO = "auto"


def offload_enabled(setting: Union[bool, str], device: torch.device) -> bool:
    """``text_encoder_offload`` for an actor rank on ``device``: ``auto`` is on where the rank trains on a GPU."""
    if setting == AUTO:
        return torch.device(device).type == "cuda"
    return bool(setting)


class PoolSegments(Protocol):
    """An engine's memory pool seen by segment (``address``: the segment's start)."""

    def segments(self) -> list[tuple[int, int, list[int]]]:
        """Every segment of the pool as (address, size in bytes, start addresses of its live allocations)."""

    def unmap(self, address: int) -> None:
        """Free the segment's device memory; its addresses stay reserved (contents lost)."""

    def map(self, address: int) -> None:
        """Back the segment at ``address`` with device memory again (contents undefined)."""


def _empty_cuda_cache() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _storage_ptr(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr()


def _bytes_of(storage: torch.UntypedStorage, device: torch.device) -> torch.Tensor:
    """A uint8 tensor over the whole ``storage`` (no copy)."""
    return torch.empty(0, dtype=torch.uint8, device=device).set_(storage)


def _host_empty_like(tensor: torch.Tensor) -> torch.Tensor:
    pin = tensor.device.type == "cuda"
    return torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu", pin_memory=pin)


ALIGN = 512  # bytes between the starts of two copies in a HostArena (any dtype's alignment, a whole DMA burst)


def _aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


def _unregister(ptr: int) -> None:
    try:
        torch.cuda.cudart().cudaHostUnregister(ptr)
    except Exception:  # the CUDA context is gone at interpreter exit: the process's memory goes with it
        pass


class HostArena:
    """``nbytes`` of host memory handed out as tensors of any shape (``take``), page-locked as one region by
    ``cudaHostRegister`` when ``pin`` (so host-to-device copies from it run asynchronously at full bandwidth). Where
    the registration fails, the copies stay in pageable memory (a logged fallback: slower copies, same bytes)."""

    def __init__(self, nbytes: int, pin: bool) -> None:
        page = mmap.PAGESIZE
        raw = torch.empty(nbytes + page, dtype=torch.uint8)
        start = -raw.data_ptr() % page
        self.buffer = raw[start : start + nbytes]  # page-aligned: the region registered is exactly these bytes
        self.nbytes = nbytes
        self.used = 0
        self.pinned = pin and nbytes > 0 and self._register()
        if self.pinned:
            weakref.finalize(self, _unregister, self.buffer.data_ptr())

    def _register(self) -> bool:
        try:
            error = torch.cuda.cudart().cudaHostRegister(self.buffer.data_ptr(), self.nbytes, 0)
            code = int(getattr(error, "value", error))
        except Exception as exc:  # noqa: BLE001 - any failure leaves the copies pageable, logged
            code, error = -1, exc
        if code != 0:
            logger.warning(
                "%s: page-locking %.2f GB of host memory for the text encoders' copies failed (%s): they stay in "
                "pageable memory, and moving them back to the GPU is slower",
                KEY,
                self.nbytes / 1e9,
                error,
            )
            return False
        return True

    def take(self, shape: torch.Size, dtype: torch.dtype) -> Optional[torch.Tensor]:
        """An uninitialised tensor of ``shape`` and ``dtype`` in the arena; None if it has no room left."""
        nbytes = torch.Size(shape).numel() * dtype.itemsize
        if self.used + nbytes > self.nbytes:
            return None
        view = self.buffer[self.used : self.used + nbytes]
        self.used += _aligned(nbytes)
        return view.view(dtype).view(shape)


@dataclass
class _Entry:
    """One tensor of an offloaded module: a parameter (moved by ``.data``) or a buffer (replaced in every module
    that holds it)."""

    tensor: torch.Tensor
    owners: list[tuple[torch.nn.Module, str]]
    is_param: bool
    frozen: bool  # a parameter without gradient: its host copy stays valid between offloads

    @property
    def key(self) -> tuple[int, str]:
        module, name = self.owners[0]
        return id(module), name


@dataclass
class _Moved:
    entry: _Entry
    device: torch.device
    host: torch.Tensor


@dataclass
class _Unmapped:
    address: int
    storages: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # (device bytes, host bytes)


def no_offload_metrics() -> dict[str, float]:
    """The update's offload metrics when nothing moved (``TextEncoderOffload.offloaded_during`` fills them in)."""
    return {"text_encoder_offload_s": 0.0, "text_encoder_offloaded_gb": 0.0, "text_encoder_kept_gb": 0.0}


class TextEncoderOffload:
    """Moves ``modules`` (name -> frozen text encoder) off their device and back; see the module docstring."""

    def __init__(
        self,
        modules: Mapping[str, torch.nn.Module],
        *,
        pool: Optional[PoolSegments] = None,
        release: Optional[Callable[[], None]] = None,
    ) -> None:
        self.modules = dict(modules)
        self.pool = pool
        self.release = release or _empty_cuda_cache
        self.offloaded = False
        self.offloaded_bytes = 0  # what the last offload took off the device
        self.kept_bytes = 0  # text-encoder bytes it could not move (pool segments shared with other weights)
        self._host: dict[tuple[int, str], torch.Tensor] = {}  # kept host copies of frozen parameters
        self._host_storages: dict[int, torch.Tensor] = {}  # kept host copies of frozen storages in pool segments
        self.arena: Optional[HostArena] = None  # where those kept copies live (made by the first offload)
        self._moved: list[_Moved] = []
        self._unmapped: list[_Unmapped] = []
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._logged = False

    # ------------------------------------------------------------------ what there is to move
    def _entries(self) -> list[_Entry]:
        entries: dict[int, _Entry] = {}
        for module in self.modules.values():
            for sub in module.modules():
                for table, is_param in ((sub._parameters, True), (sub._buffers, False)):
                    for name, tensor in table.items():
                        if tensor is None:
                            continue
                        entry = entries.get(id(tensor))
                        if entry is None:
                            frozen = is_param and not tensor.requires_grad
                            entries[id(tensor)] = _Entry(tensor, [(sub, name)], is_param, frozen)
                        elif not is_param:
                            entry.owners.append((sub, name))
        return list(entries.values())

    def _owned_segments(self, entries: list[_Entry]) -> tuple[list[tuple[int, list[int]]], set[int]]:
        """The pool's segments holding only these tensors' storages (address, storage starts), and every storage
        start inside any pool segment."""
        if self.pool is None:
            return [], set()
        starts = {_storage_ptr(e.tensor) for e in entries}
        owned, pooled = [], set()
        for address, _size, live in self.pool.segments():
            pooled.update(p for p in live if p in starts)
            if live and all(p in starts for p in live):
                owned.append((address, list(live)))
        return owned, pooled

    # ------------------------------------------------------------------ off and back
    # Both outside inference mode (vllm-omni's worker runs its calls under it): the host copies and the tensors
    # moved back are normal tensors, as the weights were when loaded.
    @torch.inference_mode(False)
    @torch.no_grad()
    def offload(self) -> None:
        if self.offloaded:
            raise RuntimeError("text encoders are already offloaded")
        entries = self._entries()
        owned, pooled = self._owned_segments(entries)
        in_owned = {p for _, live in owned for p in live}
        self.offloaded_bytes = self.kept_bytes = 0
        by_storage: dict[int, list[_Entry]] = {}
        for entry in entries:
            by_storage.setdefault(_storage_ptr(entry.tensor), []).append(entry)
        if self.arena is None:
            kept = self._kept_copy_bytes(by_storage, in_owned, pooled)
            self.arena = HostArena(kept, pin=any(e.tensor.device.type == "cuda" for e in entries))
        for ptr, group in by_storage.items():
            nbytes = group[0].tensor.untyped_storage().nbytes()
            if ptr in in_owned:
                continue
            if ptr in pooled:
                self.kept_bytes += nbytes
                continue
            for entry in group:
                self._swap_out(entry)
            self.offloaded_bytes += nbytes
        for address, live in owned:
            self._unmap(address, [by_storage[p] for p in live])
        self._guard()
        self.offloaded = True
        self.release()
        if not self._logged:
            self._logged = True
            logger.info(
                "%s: %s off the device during each update (%.2f GB moved, %.2f GB kept in pool segments shared with "
                "other weights; the frozen weights' host copies: %.2f GB%s)",
                KEY,
                ", ".join(self.modules),
                self.offloaded_bytes / 1e9,
                self.kept_bytes / 1e9,
                self.arena.nbytes / 1e9,
                ", page-locked" if self.arena.pinned else "",
            )

    def _kept_copy_bytes(self, by_storage: dict[int, list[_Entry]], in_owned: set[int], pooled: set[int]) -> int:
        """The host bytes the kept copies take (each start aligned): frozen parameters moved by ``.data`` and the
        storages of pool segments that hold only frozen parameters."""
        total = 0
        for ptr, group in by_storage.items():
            if ptr in in_owned:
                if all(e.frozen for e in group):
                    total += _aligned(group[0].tensor.untyped_storage().nbytes())
            elif ptr not in pooled:
                total += sum(_aligned(e.tensor.numel() * e.tensor.element_size()) for e in group if e.frozen)
        return total

    def _kept_empty_like(self, tensor: torch.Tensor) -> torch.Tensor:
        """A kept copy's tensor in the arena (made by the first offload; sized for every kept copy)."""
        host = self.arena.take(tensor.shape, tensor.dtype)
        return _host_empty_like(tensor) if host is None else host

    def _swap_out(self, entry: _Entry) -> None:
        tensor = entry.tensor
        host = self._host.get(entry.key) if entry.frozen else None
        if host is None:
            host = self._kept_empty_like(tensor) if entry.frozen else _host_empty_like(tensor)
            host.copy_(tensor.detach())
            if entry.frozen:
                self._host[entry.key] = host
        self._moved.append(_Moved(entry, tensor.device, host))
        self._set(entry, host)

    def _unmap(self, address: int, groups: list[list[_Entry]]) -> None:
        record = _Unmapped(address)
        for group in groups:
            storage = group[0].tensor.untyped_storage()
            device_bytes = _bytes_of(storage, group[0].tensor.device)
            frozen = all(e.frozen for e in group)
            host = self._host_storages.get(storage.data_ptr()) if frozen else None
            if host is None:
                host = self._kept_empty_like(device_bytes) if frozen else _host_empty_like(device_bytes)
                host.copy_(device_bytes)
                if frozen:
                    self._host_storages[storage.data_ptr()] = host
            record.storages.append((device_bytes, host))
            self.offloaded_bytes += storage.nbytes()
        self.pool.unmap(address)
        self._unmapped.append(record)

    @torch.inference_mode(False)
    @torch.no_grad()
    def restore(self) -> None:
        if not self.offloaded:
            raise RuntimeError("text encoders are not offloaded")
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        # The update's freed blocks stay cached by PyTorch's allocator; given back first, the device memory they
        # hold can back the segments mapped again and the tensors moved back (else a mapping runs out of memory
        # on a GPU the update filled).
        self.release()
        for record in self._unmapped:
            self.pool.map(record.address)
            for device_bytes, host in record.storages:
                device_bytes.copy_(host, non_blocking=True)
        for moved in self._moved:
            back = moved.host.to(moved.device, non_blocking=True)
            if back is moved.host:  # host and device are one (CPU): the module gets its own tensor back
                back = moved.host.clone()
            self._set(moved.entry, back)
        devices = {m.device for m in self._moved} | {d.device for r in self._unmapped for d, _ in r.storages}
        for device in devices:
            if device.type == "cuda":
                torch.cuda.synchronize(device)  # the copies are done before the rollout runs
        self._moved.clear()
        self._unmapped.clear()
        self.offloaded = False

    @staticmethod
    def _set(entry: _Entry, value: torch.Tensor) -> None:
        if entry.is_param:
            entry.tensor.data = value
        else:
            for module, name in entry.owners:
                module._buffers[name] = value
            entry.tensor = value

    def _guard(self) -> None:
        for name, module in self.modules.items():

            def refuse(mod, args, kwargs, name=name):
                raise RuntimeError(
                    f"the pipeline's {name} was called while offloaded for the actor's update ({KEY}): the update "
                    "uses the prompt embeddings its batch carries"
                )

            self._hooks.append(module.register_forward_pre_hook(refuse, with_kwargs=True))

    @contextmanager
    def offloaded_during(self) -> Iterator[dict[str, float]]:
        """Offload, run the block, restore (also when it raises); yields the seconds spent moving
        (``text_encoder_offload_s``, filled in on exit), the bytes taken off the device and the bytes that stayed in
        pool segments shared with other weights (``text_encoder_kept_gb``)."""
        metrics = no_offload_metrics()
        start = time.perf_counter()
        self.offload()
        metrics["text_encoder_offload_s"] = time.perf_counter() - start
        metrics["text_encoder_offloaded_gb"] = self.offloaded_bytes / 1e9
        metrics["text_encoder_kept_gb"] = self.kept_bytes / 1e9
        try:
            yield metrics
        finally:
            start = time.perf_counter()
            self.restore()
            metrics["text_encoder_offload_s"] += time.perf_counter() - start


__all__ = ["AUTO", "KEY", "PoolSegments", "TextEncoderOffload", "no_offload_metrics", "offload_enabled"]
