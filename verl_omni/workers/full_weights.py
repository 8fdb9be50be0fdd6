"""Full fine-tuning's optimizer: the transformer's own weights train, ZeRO-2 style over the ranks' gradient group.

Every rank keeps one copy of the weights in their dtype (bf16 on the GPU): the very tensors its engine serves. The
weights are grouped into gradient buckets of at most ``actor_rollout_ref.actor.grad_bucket_mb`` (in the reverse of
their registration order, roughly the order the backward produces their gradients; a larger weight is a bucket of
its own). During the backward each weight's gradient is copied into its bucket as soon as autograd has accumulated
it (``register_post_accumulate_grad_hook``; the weight's ``.grad`` is freed at once), and a complete bucket is
reduce-scattered over the ranks, in bucket order, into each rank's gradient shard: its 1/world_size of every bucket.
Several backwards per optimizer step (micro-batches) add into the shard. No rank holds more than the buckets in
flight besides its shard. Each rank steps the float32 master values of its shard with its own AdamW state
(``torch.optim.AdamW`` over the shard as one flat parameter), and the new values are all-gathered back bucket by
bucket and copied into the weights in place. So the update moves no model copy between actor and engine: the sync
is the all-gather (``sync_s``).

Which weights take part in a backward is read from the loss's autograd graph before it runs (a weight the graph
does not reach, such as a last block's unused text stream, is not waited for); buckets are reduced strictly in
bucket order and each exactly once per backward, so every rank issues the same collectives in the same order.

``offload``: the master shard and the AdamW state live in host memory (the master pinned when the weights are on a
GPU) and AdamW steps on the CPU; the device holds the weights, the gradient shard in their dtype and the buckets in
flight. The step goes over the shard a piece of ``HOST_STEP_PIECE`` values at a time: the piece's gradient is copied
into one reused float32 host buffer and stepped, so no float32 gradient of the whole shard exists in host memory
(AdamW is elementwise: the pieces step exactly as the whole would). Without it the gradient shard is the float32
master's gradient itself.

The gradient shard exists during an update only: allocated (zeros) at the update's first use, released after the
optimizer step. So the rollouts between updates run without it (in the hybrid engine they share the process's CUDA
caching allocator, which hands them its memory).

The offloaded step runs its CPU work (AdamW, the clipping, the float32-to-bf16 conversion of the write-back) on this
rank's share of the host's cores (``host_threads``: the cores this process may use over the ranks on its host).
Ray starts its actors, and so the engines' processes, with one thread (``OMP_NUM_THREADS=1``).

AdamW is PyTorch's fused implementation on either device (``fused=True``: one pass over the values; on the CPU
``benchmarks/host_adamw_step.py`` measures it against the default per-tensor loop). Its CPU kernel splits the work
into units of one cache line and runs a unit's last partial vector through scalar code, whose rounding can differ:
so the pieces' bounds fall on multiples of ``PIECE_ALIGN`` values, and every value takes the same path as in one
step over the whole shard.

Clipping uses the global norm: each rank's shard norm squared, summed over the ranks (one all-reduce of two
numbers, which also carries the non-finite count the loss saw).
"""

from __future__ import annotations

import glob
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Optional

import torch

from verl_omni.config.actor import DEFAULT_GRAD_BUCKET_MB
from verl_omni.workers.grad_sync import LoRAGradSync

logger = logging.getLogger(__name__)

OFFLOAD_KEY = "actor_rollout_ref.actor.optimizer_offload"
BUCKET_KEY = "actor_rollout_ref.actor.grad_bucket_mb"
MiB = 1024**2
STATE_FORMAT = "verl_omni.full_weights_shard.v2"
OLD_STATE_FORMATS = ("verl_omni.full_weights_shard.v1",)
# Reduce-scatters a backward leaves running while it computes on (each holds its bucket): one, so a bucket reduces
# while the next ones fill.
REDUCTIONS_IN_FLIGHT = 1
# Buckets a rank holds at once during the backward, measured on the tiny Qwen-Image (9 MiB blocks): at most 4 once
# the reduction order is learned (the one reducing beside the backward, the one filling, one whose first gradients
# came early and whose last ones, a block's modulation weights used first in the forward, come at the end of the
# block's backward, and the next one starting); in the first backward, in bucket order, about one block's worth
# (8 buckets of 1 MiB, 22 of 0.25 MiB), 3 with 4 MiB buckets: the ratio of the default 256 MiB to Qwen-Image's 649
# MiB blocks.
BUCKETS_IN_FLIGHT = 4
# Values per piece of the offloaded step (a 64 MiB float32 gradient buffer in host memory, as much in the device's
# conversion of the piece)
HOST_STEP_PIECE = 16 * MiB
# Pieces start at multiples of this many values: a multiple of the fused CPU AdamW's unit (a 64-byte cache line of
# float32) and of its widest vector (16 float32 lanes), so a piece's values are computed as in the whole shard's step
PIECE_ALIGN = 64


@dataclass(frozen=True)
class Bucket:
    """One gradient bucket: weights ``members`` (indices into the parameter list) at ``offsets`` in a flat run of
    ``numel`` values, padded to ``padded`` (a multiple of the world size); each rank owns ``chunk`` of them, at
    ``shard_start`` in its shard."""

    members: tuple[int, ...]
    offsets: tuple[int, ...]
    numel: int
    padded: int
    chunk: int
    shard_start: int


def plan_buckets(numels: Sequence[int], world_size: int, cap: int) -> list[Bucket]:
    """Buckets of at most ``cap`` values over weights of ``numels`` values (a larger weight alone), the weights taken
    in reverse order: the order the backward roughly produces their gradients."""
    groups: list[list[int]] = [[]]
    size = 0
    for i in reversed(range(len(numels))):
        if groups[-1] and size + numels[i] > cap:
            groups.append([])
            size = 0
        groups[-1].append(i)
        size += numels[i]
    buckets, shard_start = [], 0
    for members in groups:
        offsets = [0]
        for i in members[:-1]:
            offsets.append(offsets[-1] + numels[i])
        numel = offsets[-1] + numels[members[-1]]
        chunk = math.ceil(numel / world_size)
        buckets.append(Bucket(tuple(members), tuple(offsets), numel, chunk * world_size, chunk, shard_start))
        shard_start += chunk
    return buckets


class ShardedAdamW:
    """AdamW over ``params`` with their gradients, float32 master values and optimizer state sharded over
    ``grad_sync``'s ranks.

    Has the optimizer verbs the actor calls (``zero_grad``, ``step``, ``state_dict``, ``load_state_dict``) plus
    ``backward`` (every backward of the update goes through it) and ``reduce_and_clip``, which comes first in every
    step."""

    def __init__(
        self,
        params: Sequence[torch.nn.Parameter],
        grad_sync: LoRAGradSync,
        *,
        lr: float,
        betas: tuple[float, float],
        weight_decay: float,
        offload: bool = False,
        bucket_mb: float = DEFAULT_GRAD_BUCKET_MB,
        host_step_piece: int = HOST_STEP_PIECE,
    ):
        self.params = list(params)
        dtypes = {p.dtype for p in self.params}
        if len(dtypes) != 1:
            found = sorted(map(str, dtypes))
            raise ValueError(f"full fine-tuning needs the transformer's weights in one dtype; found {found}")
        self.grad_sync, self.offload = grad_sync, offload
        self.rank, self.world_size = grad_sync.rank, grad_sync.world_size
        first = self.params[0]
        self.device, self.dtype = first.device, first.dtype
        self.numel = sum(p.numel() for p in self.params)
        cap = max(1, int(bucket_mb * MiB) // first.element_size())
        self.buckets = plan_buckets([p.numel() for p in self.params], self.world_size, cap)
        self.shard_numel = sum(b.chunk for b in self.buckets)
        self._where = {
            i: (k, off) for k, b in enumerate(self.buckets) for i, off in zip(b.members, b.offsets, strict=True)
        }
        host = torch.device("cpu")
        master_device = host if offload else self.device
        pin = offload and self.device.type == "cuda"
        self.master = torch.nn.Parameter(
            torch.zeros(self.shard_numel, dtype=torch.float32, device=master_device, pin_memory=pin)
        )
        hyper = dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay)
        self._coef = 1.0  # the last reduce_and_clip's clipping factor, applied piece by piece (offload)
        # Where each backward's reduce-scatter adds up, during an update only (``_shard_grads``): on the device in the
        # weights' dtype with the offload, else the float32 master's gradient.
        self.grad_shard: Optional[torch.Tensor] = None
        if offload:
            # AdamW steps the master a piece at a time (views of it, their moments views of two flat tensors).
            size = -(-max(1, host_step_piece) // PIECE_ALIGN) * PIECE_ALIGN  # rounded up to a multiple
            self._bounds = [(lo, min(lo + size, self.shard_numel)) for lo in range(0, self.shard_numel, size)]
            self._pieces = [torch.nn.Parameter(self.master.data[lo:hi]) for lo, hi in self._bounds]
            self._grad_buffer = torch.empty(
                min(self.shard_numel, size), dtype=torch.float32, device=master_device, pin_memory=pin
            )
            self.optimizer = torch.optim.AdamW(self._pieces, **hyper, fused=True)
            self._moments = (torch.zeros_like(self.master.data), torch.zeros_like(self.master.data))
            self._reset_piece_state(0.0)
        else:
            self.optimizer = torch.optim.AdamW([self.master], **hyper, fused=True)
        self.reset_master_from_params()
        self.host_threads = host_threads(grad_sync.local_world_size)
        self.last_step_s = 0.0  # the last step's AdamW (with the offload: its pieces' copies and CPU work)
        self.last_sync_s = 0.0
        self.backwards = 0  # backwards reduced into the shard since the last zero_grad
        self.peak_buckets = 0  # the most buckets held at once during a backward since the order was learned
        self.grads_seen = 0  # gradients the backwards delivered
        self.grads_during_reductions = 0  # ... of which arrived with a reduce-scatter started and not yet waited for
        # The order buckets are reduced in: bucket order until the first backward shows the order their gradients
        # complete in (rank 0's, sent to every rank); the same on every rank, each bucket once per backward.
        self.order = list(range(len(self.buckets)))
        self.order_learned = False
        self._reset_backward()
        self._hooks = [p.register_post_accumulate_grad_hook(self._grad_hook(i)) for i, p in enumerate(self.params)]

    # ------------------------------------------------------------------ this rank's shard of the weights
    def shard_pieces(self) -> Iterator[tuple[torch.nn.Parameter, int, int, int]]:
        """(param, lo, hi, at): values ``lo:hi`` of ``param`` (flattened) are this rank's, at ``at`` in its shard."""
        for b in self.buckets:
            mine_lo = self.rank * b.chunk
            mine_hi = mine_lo + b.chunk
            for i, off in zip(b.members, b.offsets, strict=True):
                p = self.params[i]
                lo, hi = max(off, mine_lo), min(off + p.numel(), mine_hi)
                if lo < hi:
                    yield p, lo - off, hi - off, b.shard_start + lo - mine_lo

    @torch.no_grad()
    def read_shard(self, out: torch.Tensor, tensors: Optional[Sequence[torch.Tensor]] = None) -> torch.Tensor:
        """This rank's shard of ``tensors`` (the weights' shapes, in their order; default the weights themselves)
        copied into ``out`` (values beyond the weights, the buckets' padding, are zero)."""
        out.zero_()
        index = {id(p): i for i, p in enumerate(self.params)} if tensors is not None else None
        for p, lo, hi, at in self.shard_pieces():
            source = p if tensors is None else tensors[index[id(p)]]
            out[at : at + hi - lo].copy_(source.reshape(-1)[lo:hi])
        return out

    @torch.no_grad()
    def write_from_shards(self, shard: torch.Tensor) -> None:
        """Every rank's ``shard`` (a collective) all-gathered bucket by bucket into the weights, in their dtype."""
        for b in self.buckets:
            mine = shard[b.shard_start : b.shard_start + b.chunk].to(self.device, self.dtype, non_blocking=True)
            full = mine
            if self.world_size > 1:
                full = self.grad_sync.all_gather(torch.empty(b.padded, dtype=self.dtype, device=self.device), mine)
            for i, off in zip(b.members, b.offsets, strict=True):
                p = self.params[i]
                p.copy_(full[off : off + p.numel()].view_as(p))

    def _reset_piece_state(self, step: float) -> None:
        """The offloaded pieces' AdamW state: views of the two flat moments, every piece at ``step``."""
        exp_avg, exp_avg_sq = self._moments
        for piece, (lo, hi) in zip(self._pieces, self._bounds, strict=True):
            self.optimizer.state[piece] = {
                "step": torch.tensor(step, dtype=torch.float32),
                "exp_avg": exp_avg[lo:hi],
                "exp_avg_sq": exp_avg_sq[lo:hi],
            }

    def _shard_grads(self) -> torch.Tensor:
        """The gradient shard of this update, allocated as zeros at its first use (a worker may call under inference
        mode: the shard must be a normal tensor, as every backward adds into it)."""
        if self.grad_shard is None:
            with torch.inference_mode(False):
                if self.offload:
                    self.grad_shard = torch.zeros(self.shard_numel, dtype=self.dtype, device=self.device)
                else:  # the backwards reduce into the master's gradient itself
                    self.master.grad = torch.zeros_like(self.master.data)
                    self.grad_shard = self.master.grad
        return self.grad_shard

    def _release_grads(self) -> None:
        """Free the gradient shard (after the step, or an update that failed): nothing of it lives between updates."""
        self.grad_shard = None
        self.master.grad = None

    def reset_master_from_params(self) -> None:
        """The master shard from the weights' current values (after loading weights without optimizer state)."""
        self.read_shard(self.master.data)

    # ------------------------------------------------------------------ the backward, bucket by bucket
    def _reset_backward(self) -> None:
        self._waiting: list[set[int]] = [set(b.members) for b in self.buckets]
        self._filled: list[Optional[torch.Tensor]] = [None] * len(self.buckets)
        self._position = {k: n for n, k in enumerate(self.order)}
        self._next = 0  # the position in ``order`` of the next bucket to reduce
        self._completed: list[int] = []  # buckets in the order their last gradient arrived
        self._in_backward = False
        # Reduce-scatters started and not yet added into the shard (bucket, its output, work, its input), oldest
        # first: the backward goes on computing while they run. Dropped unfinished only after an exception.
        self._pending: list[tuple[int, torch.Tensor, Any, torch.Tensor]] = []

    def _grad_hook(self, index: int):
        def hook(p: torch.Tensor) -> None:
            if not self._in_backward:  # a plain backward: the gradient stays in .grad (reduce_and_clip refuses it)
                return
            k, off = self._where[index]
            self.grads_seen += 1
            self.grads_during_reductions += bool(self._pending)
            if self._position[k] < self._next:
                raise RuntimeError(
                    f"weight {index} of {len(self.params)}: its gradient arrived after its bucket was reduced (the "
                    "loss's autograd graph did not reach it, yet autograd accumulated a gradient into it)"
                )
            if self._filled[k] is None:
                self._filled[k] = torch.zeros(self.buckets[k].padded, dtype=self.dtype, device=self.device)
                if self.order_learned:  # the buckets filling and the ones still reducing
                    held = sum(t is not None for t in self._filled) + len(self._pending)
                    self.peak_buckets = max(self.peak_buckets, held)
            self._filled[k][off : off + p.numel()].add_(p.grad.reshape(-1))
            p.grad = None
            if index in self._waiting[k]:  # (a weight whose gradient accumulates twice completes its bucket once)
                self._waiting[k].discard(index)
                if not self._waiting[k]:
                    self._completed.append(k)
            self._reduce_ready()

        return hook

    def _reduce_ready(self) -> None:
        """Reduce every bucket, in ``order`` from the next one, that waits for no more gradient."""
        while self._next < len(self.order) and not self._waiting[self.order[self._next]]:
            self._reduce_bucket(self.order[self._next])
            self._next += 1

    def _reduce_bucket(self, k: int) -> None:
        """Start bucket ``k``'s reduce-scatter; the one started before it is added into the shard first (at most
        ``REDUCTIONS_IN_FLIGHT`` run while the backward computes the next gradients)."""
        b = self.buckets[k]
        filled = self._filled[k]
        if filled is None:  # no weight of it took part in this backward: its gradients are zero on this rank
            filled = torch.zeros(b.padded, dtype=self.dtype, device=self.device)
        self._filled[k] = None
        while len(self._pending) >= REDUCTIONS_IN_FLIGHT:
            self._add_oldest_reduction()
        mine, work = self.grad_sync.reduce_scatter_async(filled)
        self._pending.append((k, mine, work, filled))

    def _add_oldest_reduction(self) -> None:
        k, mine, work, _ = self._pending.pop(0)
        if work is not None:
            work.wait()
        b = self.buckets[k]
        self._shard_grads()[b.shard_start : b.shard_start + b.chunk].add_(mine)

    def _reached(self, loss: torch.Tensor) -> set[int]:
        """The indices of the weights ``loss``'s autograd graph reaches (their AccumulateGrad nodes)."""
        ids = {id(p): i for i, p in enumerate(self.params)}
        found: set[int] = set()
        seen: set[Any] = set()
        stack = [loss.grad_fn]
        while stack:
            fn = stack.pop()
            if fn is None or fn in seen:
                continue
            seen.add(fn)
            variable = getattr(fn, "variable", None)
            if variable is not None and id(variable) in ids:
                found.add(ids[id(variable)])
            stack.extend(next_fn for next_fn, _ in fn.next_functions)
        return found

    def backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()`` with every weight's gradient reduce-scattered into this rank's gradient shard (a
        collective: every rank runs the same number of backwards per step, see :meth:`pad_backwards`)."""
        reached = self._reached(loss)
        self._begin(reached)
        try:
            loss.backward()
            self._finish()
        except BaseException:
            self._reset_backward()
            raise

    def pad_backwards(self, count: int) -> None:
        """Reduce zero gradients until this rank has run ``count`` backwards since ``zero_grad``: a rank with fewer
        micro-batches than another still joins each of its reduce-scatters."""
        while self.backwards < count:
            self._begin(set())
            self._finish()

    def _begin(self, reached: set[int]) -> None:
        if self._in_backward:
            raise RuntimeError("ShardedAdamW.backward is not re-entrant")
        self._reset_backward()
        self._waiting = [{i for i in b.members if i in reached} for b in self.buckets]
        self._in_backward = True
        self._reduce_ready()

    def _finish(self) -> None:
        """After the backward: every bucket not reduced yet (a weight whose gradient never came) is, in order."""
        completed = self._completed + [k for k in self.order if k not in set(self._completed)]
        self._waiting = [set() for _ in self.buckets]
        self._reduce_ready()
        while self._pending:  # every bucket of this backward in the shard before anything reads it
            self._add_oldest_reduction()
        if not self.order_learned:  # at the same point on every rank: its first backward, padded or not
            self._learn_order(completed)
        self._reset_backward()
        self.backwards += 1

    def _learn_order(self, completed: list[int]) -> None:
        """Rank 0's completion order of its first backward becomes every rank's reduction order (a broadcast)."""
        order = torch.tensor(completed, dtype=torch.float64, device=self.device)
        self.order = [int(k) for k in self.grad_sync.broadcast_(order).tolist()]
        self.order_learned = True

    # ------------------------------------------------------------------ the optimizer verbs
    def zero_grad(self, set_to_none: bool = False) -> None:
        """Zero the gradient shard (``set_to_none``: free it) and forget a backward left unfinished."""
        self._reset_backward()
        for p in self.params:
            p.grad = None
        if set_to_none:
            self._release_grads()
        else:
            self._shard_grads().zero_()
        self.backwards = 0

    @torch.no_grad()
    def reduce_and_clip(self, bad: torch.Tensor, max_norm: float) -> tuple[float, float]:
        """Clip every rank's gradient shard (the backwards reduced it already) by the global norm. Returns (global
        norm before clipping, the non-finite count summed over the ranks): the one host sync of the step."""
        if self._in_backward:
            raise RuntimeError("reduce_and_clip inside an unfinished ShardedAdamW.backward")
        if any(p.grad is not None for p in self.params):
            raise RuntimeError(
                "a weight holds a .grad: a backward ran outside ShardedAdamW.backward, so its gradients were never "
                "reduced into the shard"
            )
        grads = self._shard_grads()
        norm_sq = torch.zeros((), dtype=torch.float32, device=self.device)
        for b in self.buckets:  # float32 sums a bucket's chunk at a time: no float32 copy of a bf16 shard
            norm_sq += grads[b.shard_start : b.shard_start + b.chunk].float().pow(2).sum()
        stats = torch.stack([norm_sq, bad.to(self.device).float().reshape(())])
        self.grad_sync.all_reduce_(stats)
        norm_sq, bad_count = stats.tolist()
        norm = math.sqrt(norm_sq)
        # torch.nn.utils.clip_grad_norm_'s rule: scale by max_norm / (norm + 1e-6), clamped to 1
        self._coef = min(max_norm / (norm + 1e-6), 1.0)
        if not self.offload:
            self.master.grad.mul_(self._coef)
        return norm, bad_count

    @torch.no_grad()
    def step(self) -> None:
        """AdamW on this rank's master shard, then every rank's new values all-gathered into the weights in place."""
        with torch_threads(self.host_threads) if self.offload else nullcontext():
            start = time.perf_counter()
            if self.offload:
                self._step_pieces()
            else:
                self.optimizer.step()
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.last_step_s = time.perf_counter() - start
            start = time.perf_counter()
            self.write_from_shards(self.master.detach())
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.last_sync_s = time.perf_counter() - start
        self._release_grads()

    def _step_pieces(self) -> None:
        """The offloaded step: each piece's gradient from the device's shard into the host buffer (in float32,
        clipped), then AdamW on that piece alone."""
        on_cuda = self.device.type == "cuda"
        shard = self._shard_grads()
        for piece, (lo, hi) in zip(self._pieces, self._bounds, strict=True):
            grad = self._grad_buffer[: hi - lo]
            grad.copy_(shard[lo:hi], non_blocking=on_cuda)
            if on_cuda:
                torch.cuda.current_stream(self.device).synchronize()
            grad.mul_(self._coef)
            piece.grad = grad
            self.optimizer.step()  # steps the one piece holding a gradient
            piece.grad = None

    def _load_piece_state(self, optimizer_state: dict) -> None:
        """One AdamW's state over the whole shard (``state_dict``'s format) into the offloaded pieces: its
        hyperparameters and moments (a shard stepped on the GPU brings no implementation switch such as ``fused``)."""
        saved = optimizer_state["param_groups"][0]
        self.optimizer.param_groups[0].update({k: saved[k] for k in ("lr", "betas", "eps", "weight_decay")})
        state = optimizer_state["state"].get(0)
        exp_avg, exp_avg_sq = self._moments
        if state is None:  # saved before the first step
            exp_avg.zero_()
            exp_avg_sq.zero_()
            self._reset_piece_state(0.0)
            return
        exp_avg.copy_(state["exp_avg"])
        exp_avg_sq.copy_(state["exp_avg_sq"])
        self._reset_piece_state(float(torch.as_tensor(state["step"]).item()))

    def layout(self) -> list[int]:
        """The buckets' sizes: with the world size, what fixes which values a rank's shard holds."""
        return [b.numel for b in self.buckets]

    def state_dict(self) -> dict:
        """This rank's shard: its master values and AdamW state, as plain tensors on the host: the live tensors
        where they live there (``offload``, or an actor on the CPU), so that writing a checkpoint takes no second
        copy of them, and copies of those on a GPU. Like ``torch.optim.Optimizer.state_dict``: copy what must
        outlive the next step."""
        return {
            "format": STATE_FORMAT,
            "rank": self.rank,
            "world_size": self.world_size,
            "numel": self.numel,
            "buckets": self.layout(),
            "master": self.master.detach().to("cpu"),
            "optimizer": self._piece_state_dict() if self.offload else _to_host(self.optimizer.state_dict()),
        }

    def _piece_state_dict(self) -> dict:
        """The offloaded pieces' AdamW state in the format of one AdamW over the whole shard (the flat moments)."""
        group = {k: v for k, v in self.optimizer.param_groups[0].items() if k != "params"}
        step = self.optimizer.state[self._pieces[0]]["step"]
        state = {}
        if step.item() > 0:
            exp_avg, exp_avg_sq = self._moments
            state[0] = {"step": step.clone(), "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}
        return {"state": state, "param_groups": [{**group, "params": [0]}]}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        if isinstance(state, dict) and state.get("format") in OLD_STATE_FORMATS:
            raise ValueError(
                f"the optimizer shard has format {state['format']!r} (one contiguous slice of the weights per rank, "
                f"written before the gradients were sharded bucket by bucket); this version reads {STATE_FORMAT!r} "
                "only: resume from a checkpoint written by this version"
            )
        if not is_shard_state(state):
            raise ValueError(f"not a full-weights optimizer shard (format {STATE_FORMAT!r} expected)")
        mine = (self.rank, self.world_size, self.numel)
        theirs = (state["rank"], state["world_size"], state["numel"])
        if mine != theirs:
            raise ValueError(
                f"the optimizer shard is rank {theirs[0]} of {theirs[1]} over {theirs[2]} weights; this rank is "
                f"{mine[0]} of {mine[1]} over {mine[2]}: resume with the same number of ranks and model"
            )
        if list(state["buckets"]) != self.layout():
            raise ValueError(
                f"the optimizer shard was written with {len(state['buckets'])} gradient buckets, this run has "
                f"{len(self.buckets)}: resume with the same {BUCKET_KEY}"
            )
        # AdamW's loaded state must be normal tensors (a worker may call under inference mode)
        with torch.inference_mode(False), torch.no_grad():
            self.master.copy_(state["master"])
            if self.offload:
                self._load_piece_state(state["optimizer"])
            else:
                self.optimizer.load_state_dict(state["optimizer"])


def host_threads(ranks_on_host: int) -> int:
    """The CPU threads one rank's offloaded step may use: the cores this process may run on, shared by the ranks on
    its host (they step at the same time)."""
    return max(1, len(os.sched_getaffinity(0)) // max(1, ranks_on_host))


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """PyTorch's intra-op threads set to ``count`` inside the block, restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class ShardedShadowWeights:
    """``models/ema.py``'s ``ShadowWeights`` for full fine-tuning, sharded like ``optimizer``'s master: each rank
    keeps the float32 shadow of its shard only (beside the master: host memory with the offload), so the policy EMA
    costs 4·P/N bytes a rank instead of 4·P.

    ``update`` and ``copy_from_live`` are the unsharded arithmetic on this rank's values of the live weights (no
    collective). ``swap_in`` / ``swap_out`` are collectives: the shadow shards are all-gathered bucket by bucket
    into the weights (in their dtype, as ``param.copy_(shadow)`` rounds), this rank's live shard kept aside in the
    weights' dtype and all-gathered back on ``swap_out``, bit for bit."""

    def __init__(self, optimizer: ShardedAdamW):
        self.optimizer = optimizer
        self.params = optimizer.params
        device = optimizer.master.device
        pin = device.type == "cpu" and optimizer.device.type == "cuda"
        with torch.inference_mode(False), torch.no_grad():
            flat = torch.zeros(optimizer.shard_numel, dtype=torch.float32, device=device, pin_memory=pin)
            optimizer.read_shard(flat)
        self.shadow = [flat]
        self._kept: Optional[torch.Tensor] = None

    def update(self, decay: float) -> None:
        """One moving-average step towards the live values: ``shadow += (1 - decay) * (live - shadow)``."""
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay={decay} must lie in [0, 1]")
        self._refuse_while_swapped("update")
        one_minus_decay = 1.0 - decay
        flat = self.shadow[0]
        with torch.inference_mode(False), torch.no_grad():
            for p, lo, hi, at in self.optimizer.shard_pieces():
                shadow = flat[at : at + hi - lo]
                live = p.detach().reshape(-1)[lo:hi].to(shadow.device, torch.float32)
                shadow.add_(one_minus_decay * (live - shadow))

    def copy_from_live(self) -> None:
        self._refuse_while_swapped("copy_from_live")
        with torch.inference_mode(False), torch.no_grad():
            self.optimizer.read_shard(self.shadow[0])

    @contextmanager
    def swapped_in(self) -> Iterator[None]:
        self.swap_in()
        try:
            yield
        finally:
            self.swap_out()

    def swap_in(self) -> None:
        if self._kept is not None:
            raise RuntimeError("the shadow weights are already swapped in (swap_out first)")
        opt = self.optimizer
        with torch.inference_mode(False), torch.no_grad():
            kept = opt.read_shard(torch.empty(opt.shard_numel, dtype=opt.dtype, device=opt.device))
            opt.write_from_shards(self.shadow[0])
        self._kept = kept

    def swap_out(self) -> None:
        if self._kept is None:
            raise RuntimeError("the shadow weights are not swapped in")
        with torch.inference_mode(False), torch.no_grad():
            self.optimizer.write_from_shards(self._kept)
        self._kept = None

    @property
    def is_swapped_in(self) -> bool:
        return self._kept is not None

    def load_full(self, tensors: Sequence[torch.Tensor]) -> None:
        """The shadow from full tensors (the weights' shapes, in their order): this rank's shard of them."""
        self._refuse_while_swapped("load_full")
        with torch.inference_mode(False), torch.no_grad():
            self.optimizer.read_shard(self.shadow[0], tensors)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """``shadow.0``: this rank's float32 shard, on the CPU."""
        return {"shadow.0": self.shadow[0].detach().to("cpu").clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self._refuse_while_swapped("load_state_dict")
        value = state.get("shadow.0")
        if value is None or tuple(value.shape) != tuple(self.shadow[0].shape):
            found = None if value is None else tuple(value.shape)
            raise ValueError(f"sharded shadow weights: shard of shape {found}, expected {tuple(self.shadow[0].shape)}")
        with torch.inference_mode(False), torch.no_grad():
            self.shadow[0].copy_(value)

    def _refuse_while_swapped(self, what: str) -> None:
        if self._kept is not None:
            raise RuntimeError(f"{what} while the shadow weights are swapped in would mix the two copies")


def read_shard_file(path: str) -> dict:
    """A rank's optimizer shard file (``torch.save`` of ``ShardedAdamW.state_dict``), memory-mapped: its tensors are
    the file's pages, read as ``load_state_dict`` copies them into the live shards, so a resume holds no second copy
    of them in the process's own memory (with the offload, 12 bytes a weight beside the 12 the shards hold)."""
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def is_shard_state(state: object) -> bool:
    """Whether ``state`` is a ``ShardedAdamW.state_dict`` (one rank's shard), not a whole optimizer's."""
    return isinstance(state, dict) and state.get("format") in (STATE_FORMAT, *OLD_STATE_FORMATS)


def _to_host(state):
    """``state``'s tensors on the host: those already there as they are, the others copied."""
    if isinstance(state, torch.Tensor):
        return state.detach().to("cpu")
    if isinstance(state, dict):
        return {k: _to_host(v) for k, v in state.items()}
    if isinstance(state, list):
        return [_to_host(v) for v in state]
    return state


# ---------------------------------------------------------------------- memory planning

GiB = 1024**3


@dataclass(frozen=True)
class FullWeightsMemory:
    """Bytes per GPU (and per GPU on the host, offloaded) of full fine-tuning for one configuration."""

    num_params: int
    num_gpus: int
    offload: bool
    weights: int  # the trained weights, one copy shared by engine and actor
    # the gradient shard on the device during an update: in the weights' dtype with the offload, else the master's
    # float32 gradient
    grads: int
    buckets: int  # the gradient buckets held during the backward (BUCKETS_IN_FLIGHT of grad_bucket_mb)
    master: int  # the float32 master shard (offload: + one piece's float32 gradient buffer, on the host)
    optimizer: int  # AdamW's two float32 moments of the shard
    frozen: int  # the engine's other components on the GPU (text encoders, VAE)
    # float32 copies of the weights sharded like the master (the policy EMA, DiffusionNFT's old policy): on the host
    # with the offload
    sharded_copies: int
    activations: int
    # of ``frozen``: the text encoders, off the GPU during each update (model.text_encoder_offload)
    offloaded_frozen: int = 0
    # the rollout's VAE decode of one call's rows (models/vae_memory.py; rollout.pipeline.vae_decode_batch)
    decode: int = 0

    @property
    def resident(self) -> int:
        """What stays on the GPU through updates and rollouts: the weights (and the optimizer's shards without the
        offload)."""
        return self.weights + (0 if self.offload else self.master + self.optimizer + self.sharded_copies)

    @property
    def update_total(self) -> int:
        """The update's footprint: the gradient shard, the buckets and the activations beside what stays, the text
        encoders off the GPU where ``offloaded_frozen``."""
        return self.resident + self.grads + self.buckets + self.frozen - self.offloaded_frozen + self.activations

    @property
    def rollout_total(self) -> int:
        """The rollout's footprint: every component on the GPU and the VAE decode's activations; no gradient shard."""
        return self.resident + self.frozen + self.decode

    @property
    def device_total(self) -> int:
        """The larger of the update's footprint and the rollout's."""
        return max(self.update_total, self.rollout_total)

    @property
    def host_total(self) -> int:
        return self.master + self.optimizer + self.sharded_copies if self.offload else 0

    def describe(self) -> str:
        parts = [
            ("weights", self.weights),
            ("gradient shard", self.grads),
            ("gradient buckets", self.buckets),
            ("master shard" + (" (host)" if self.offload else ""), self.master),
            ("AdamW shard" + (" (host)" if self.offload else ""), self.optimizer),
            ("frozen components", self.frozen),
            *(
                [("of them off the GPU for the update (text encoders)", self.offloaded_frozen)]
                if self.offloaded_frozen
                else []
            ),
            ("policy copy shards" + (" (host)" if self.offload else ""), self.sharded_copies),
            ("activations", self.activations),
            *([("the rollout's VAE decode", self.decode)] if self.decode else []),
        ]
        items = ", ".join(f"{name} {_gib(n)}" for name, n in parts)
        return (
            f"{self.num_params / 1e9:.2f}B trained weights on {self.num_gpus} GPU(s), {OFFLOAD_KEY}="
            f"{str(self.offload).lower()}: {_gib(self.device_total)} per GPU ({items})"
        )


def _gib(n: int) -> str:
    return f"{n / GiB:.2f} GiB"


def plan_full_weights_memory(
    num_params: int,
    num_gpus: int,
    offload: bool,
    *,
    weight_bytes: int = 2,
    frozen_bytes: int = 0,
    activation_bytes: int = 0,
    sharded_copies: int = 0,
    bucket_mb: float = DEFAULT_GRAD_BUCKET_MB,
    offloaded_frozen_bytes: int = 0,
    decode_bytes: int = 0,
) -> FullWeightsMemory:
    """The per-GPU footprint of full fine-tuning ``num_params`` weights of ``weight_bytes`` each over ``num_gpus``
    (``ShardedAdamW``'s buffers; its per-bucket padding, under num_gpus values a bucket, is left out);
    ``offloaded_frozen_bytes`` of the ``frozen_bytes`` leave the GPU during each update; ``decode_bytes``: the
    rollout's VAE decode beside them."""
    if not 0 <= offloaded_frozen_bytes <= frozen_bytes:
        raise ValueError(
            f"offloaded_frozen_bytes={offloaded_frozen_bytes} must be within [0, frozen_bytes={frozen_bytes}]"
        )
    shard = math.ceil(num_params / num_gpus)
    bucket = max(1, int(bucket_mb * MiB) // weight_bytes)
    return FullWeightsMemory(
        num_params=num_params,
        num_gpus=num_gpus,
        offload=offload,
        weights=num_params * weight_bytes,
        grads=shard * weight_bytes if offload else shard * 4,
        buckets=min(BUCKETS_IN_FLIGHT * bucket, num_params) * weight_bytes,
        master=shard * 4 + (min(shard, HOST_STEP_PIECE) * 4 if offload else 0),
        optimizer=shard * 8,
        frozen=frozen_bytes,
        sharded_copies=sharded_copies * shard * 4,
        activations=activation_bytes,
        offloaded_frozen=offloaded_frozen_bytes,
        decode=decode_bytes,
    )


def activation_bytes_estimate(
    num_blocks: int, hidden: int, tokens: int, rows: int, dtype_bytes: int = 2, recomputed: bool = True
) -> int:
    """A coarse estimate of one micro-batch's activations: Korthikanti et al. 2022 ("Reducing Activation
    Recomputation in Large Transformer Models") count 34·s·b·h bytes per 16-bit transformer layer with a fused
    attention kernel; with every block recomputed only each block's input (s·b·h values) stays, plus one block's
    working set. ``rows``: the forward's batch (CFG's two branches count twice)."""
    per_layer = 34 * tokens * rows * hidden * dtype_bytes // 2
    block_input = tokens * rows * hidden * dtype_bytes
    if recomputed:
        return num_blocks * block_input + per_layer
    return num_blocks * per_layer


def check_full_weights_fit(
    num_params: int,
    num_gpus: int,
    offload: bool,
    gpu_bytes: int,
    *,
    weight_bytes: int = 2,
    frozen_bytes: int = 0,
    activation_bytes: int = 0,
    sharded_copies: int = 0,
    bucket_mb: float = DEFAULT_GRAD_BUCKET_MB,
    offloaded_frozen_bytes: int = 0,
    decode_bytes: int = 0,
    gpus_key: str = "trainer.n_gpus_per_node x trainer.nnodes",
    max_gpus: int = 1024,
) -> FullWeightsMemory:
    """The plan for this configuration, or a ``ValueError`` with its numbers and the option that would fit (the
    offload, else the fewest GPUs, with or without it)."""

    def plan(n: int, off: bool) -> FullWeightsMemory:
        return plan_full_weights_memory(
            num_params,
            n,
            off,
            weight_bytes=weight_bytes,
            frozen_bytes=frozen_bytes,
            activation_bytes=activation_bytes,
            sharded_copies=sharded_copies,
            bucket_mb=bucket_mb,
            offloaded_frozen_bytes=offloaded_frozen_bytes,
            decode_bytes=decode_bytes,
        )

    chosen = plan(num_gpus, offload)
    if chosen.device_total <= gpu_bytes:
        return chosen
    message = f"full fine-tuning does not fit: {chosen.describe()}, more than the GPU's {_gib(gpu_bytes)}. "
    if not offload and plan(num_gpus, True).device_total <= gpu_bytes:
        fix = plan(num_gpus, True)
        per_gpu = f"{_gib(fix.device_total)} per GPU, {_gib(fix.host_total)} host per GPU"
        raise ValueError(message + f"Set {OFFLOAD_KEY}=true ({per_gpu})")
    options = []
    for off in sorted({offload, True}):
        fewest = next((n for n in range(num_gpus + 1, max_gpus + 1) if plan(n, off).device_total <= gpu_bytes), None)
        if fewest is not None:
            extra = f" with {OFFLOAD_KEY}=true" if off and not offload else ""
            options.append(f"{fewest} GPUs{extra} ({_gib(plan(fewest, off).device_total)} per GPU)")
    if options:
        raise ValueError(message + f"Use {' or '.join(options)}; GPUs: {gpus_key}")
    # What no GPU count shards: the weights, with the update's buckets and frozen components or the rollout's
    unsharded = chosen.weights + max(
        chosen.buckets + chosen.frozen - chosen.offloaded_frozen, chosen.frozen + chosen.decode
    )
    raise ValueError(
        message + "No GPU count fits: the weights, the gradient buckets, the frozen components and the rollout's "
        f"VAE decode alone take {_gib(unsharded)}; train a LoRA (actor_rollout_ref.model.lora_rank >= 1)"
    )


# Host memory a run takes beside the offloaded shards (calibrated on one H100 node: the Qwen-Image stand-in's 20
# layers trained on one GPU used 17.6 GiB beside its 101.9 GiB of shards when Ray's memory monitor stopped it):
HOST_RESERVE_PER_NODE = 14 * GiB  # Ray's workers, the driver, and the model files' pages the monitor counts
HOST_RESERVE_PER_GPU = 6 * GiB  # each engine process beside its shards: CUDA context, libraries, pinned staging
# Ray's memory monitor stops workers once the node uses more than this fraction of its memory (its default)
RAY_KILL_FRACTION = 0.95


@dataclass(frozen=True)
class HostBudget:
    """One node's host memory for the offloaded shards: what Ray's memory monitor lets a node use (``kill_fraction``
    of ``total``), less what is in use now (``total - available``) and the run's own processes
    (``HOST_RESERVE_PER_NODE`` + ``HOST_RESERVE_PER_GPU`` per GPU)."""

    total: int
    available: int
    gpus_per_node: int
    kill_fraction: float = RAY_KILL_FRACTION

    @classmethod
    def of_this_node(cls, gpus_per_node: int, env: Optional[dict[str, str]] = None) -> HostBudget:
        """From the operating system's figures now and Ray's settings: ``RAY_memory_usage_threshold`` (the
        fraction; default 0.95) or ``RAY_memory_monitor_refresh_ms=0`` (no monitor: the whole of memory)."""
        import psutil

        env = os.environ if env is None else env
        fraction = float(env.get("RAY_memory_usage_threshold", RAY_KILL_FRACTION))
        if env.get("RAY_memory_monitor_refresh_ms", "").strip() == "0":
            fraction = 1.0
        memory = psutil.virtual_memory()
        return cls(memory.total, memory.available, gpus_per_node, fraction)

    @property
    def reserve(self) -> int:
        return HOST_RESERVE_PER_NODE + self.gpus_per_node * HOST_RESERVE_PER_GPU

    @property
    def for_shards(self) -> int:
        in_use = self.total - self.available
        return max(0, int(self.kill_fraction * self.total) - in_use - self.reserve)

    def reckoning(self) -> str:
        """How ``for_shards`` is reckoned, in words."""
        return (
            f"{self.kill_fraction:.0%} of the node's {_gib(self.total)} (Ray's memory monitor stops workers above "
            f"it), less {_gib(self.total - self.available)} in use and {_gib(self.reserve)} for the run's processes"
        )

    def describe(self) -> str:
        return f"{_gib(self.for_shards)} for the shards: {self.reckoning()}"


def check_host_memory_fits(
    plan: FullWeightsMemory,
    gpus_per_node: int,
    host_available: int,
    *,
    text_encoder_host_bytes: int = 0,
    replan: Optional[Callable[[int, bool], FullWeightsMemory]] = None,
    gpu_bytes: Optional[int] = None,
    max_nodes: int = 1024,
    budget: str = "",
) -> int:
    """The host memory one node needs for ``plan`` with the offload: each of its ``gpus_per_node`` GPUs keeps its
    shards of the master, AdamW and the policy copies (``plan.host_total``) and, with ``model.text_encoder_offload``,
    its own host copy of the text encoders (``text_encoder_host_bytes``). Returns the bytes, or raises a
    ``ValueError`` with the numbers when they exceed ``host_available``, naming what fits: ``replan(gpus, offload)``
    is the plan on that many GPUs in all, for the node count whose shards fit (more GPUs on one node do not shrink
    a node's share) and, where the GPU (``gpu_bytes``) holds it, the offload off. ``budget``: how
    ``host_available`` was reckoned, for the message (``HostBudget.describe``)."""
    per_gpu = plan.host_total + text_encoder_host_bytes
    need = gpus_per_node * per_gpu
    if plan.host_total == 0 or need <= host_available:
        return need
    parts = f"{_gib(plan.host_total)} of master, AdamW and policy-copy shards"
    if text_encoder_host_bytes:
        parts += f" + {_gib(text_encoder_host_bytes)} of text encoders (model.text_encoder_offload)"
    message = (
        f"full fine-tuning's host memory does not fit: {gpus_per_node} GPU(s) per node x {_gib(per_gpu)} ({parts}) "
        f"= {_gib(need)}, more than the {_gib(host_available)} {budget or 'available on this node'}. "
    )
    options = []
    shards_only = gpus_per_node * plan.host_total
    if text_encoder_host_bytes and shards_only <= host_available:
        options.append(f"model.text_encoder_offload=false ({_gib(shards_only)} of host memory)")
    if replan is not None:
        nodes = plan.num_gpus // gpus_per_node
        for more in range(nodes + 1, max_nodes + 1):
            wider = replan(gpus_per_node * more, True)
            node_need = gpus_per_node * (wider.host_total + text_encoder_host_bytes)
            if node_need <= host_available and (gpu_bytes is None or wider.device_total <= gpu_bytes):
                options.append(f"trainer.nnodes={more} ({_gib(node_need)} of host memory a node)")
                break
        on_gpu = replan(plan.num_gpus, False).device_total
        if gpu_bytes is not None and on_gpu <= gpu_bytes:
            options.append(f"{OFFLOAD_KEY}=false ({_gib(on_gpu)} per GPU)")
    if options:
        raise ValueError(message + "Use " + " or ".join(options))
    raise ValueError(message + "Add host memory, or train a LoRA (actor_rollout_ref.model.lora_rank >= 1)")


def stored_parameter_counts(model_dir: str) -> dict[str, int]:
    """Every component's parameter count read from its safetensors headers (no weights loaded): {component: n}."""
    from safetensors import safe_open

    counts: dict[str, int] = {}
    for path in sorted(glob.glob(os.path.join(model_dir, "*", "*.safetensors"))):
        component = os.path.basename(os.path.dirname(path))
        with safe_open(path, framework="pt") as f:
            counts[component] = counts.get(component, 0) + sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    return counts


def media_tokens(
    model_dir: str, patch_size: Any, height: int, width: int, vae_scale_factor: int, num_frames: int = 1
) -> int:
    """The transformer's media tokens per sample: ``patch_size`` an int (image transformers) or (t, h, w) (video
    transformers: Wan's [1, 2, 2]); ``num_frames`` video frames become ``(num_frames - 1) / s + 1`` latent frames for
    the VAE's temporal factor ``s`` (``vae/config.json`` ``scale_factor_temporal``; 1 frame for an image)."""
    vae = _read_config(model_dir, "vae") if num_frames > 1 else {}
    return _media_tokens(vae, patch_size, height, width, vae_scale_factor, num_frames)


def _media_tokens(
    vae_config: dict[str, Any], patch_size: Any, height: int, width: int, vae_scale_factor: int, num_frames: int
) -> int:
    patch_t, patch_h, patch_w = (1, patch_size, patch_size) if isinstance(patch_size, int) else patch_size
    temporal = int(vae_config.get("scale_factor_temporal") or 1) if num_frames > 1 else 1
    latent_frames = (num_frames - 1) // temporal + 1
    side_h, side_w = vae_scale_factor * int(patch_h), vae_scale_factor * int(patch_w)
    return max(1, latent_frames // int(patch_t)) * (height // side_h) * (width // side_w)


@dataclass(frozen=True)
class PipelineShape:
    """What the memory plan reads of a pipeline: every component's stored values (parameters and persistent
    buffers, as its safetensors hold them), the transformer's config and the VAE's config."""

    counts: dict[str, int]
    transformer: dict[str, Any]
    vae: dict[str, Any]

    @classmethod
    def from_model_dir(cls, model_dir: str) -> PipelineShape:
        """Read from a diffusers pipeline directory: the safetensors headers (no weights loaded) and the configs."""
        counts = stored_parameter_counts(model_dir)
        if "transformer" not in counts:
            raise ValueError(f"{model_dir!r} has no transformer/*.safetensors to plan full fine-tuning from")
        return cls(
            counts=counts,
            transformer=_read_config(model_dir, "transformer"),
            vae=_read_config(model_dir, "vae"),
        )


def _read_config(model_dir: str, component: str) -> dict[str, Any]:
    """``<component>/config.json`` of a pipeline directory ({} where it has none)."""
    path = os.path.join(model_dir, component, "config.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def plan_inputs(
    shape: PipelineShape,
    *,
    dtype_bytes: int,
    rows: int,
    text_tokens: int,
    height: int,
    width: int,
    vae_scale_factor: int,
    num_frames: int = 1,
) -> tuple[int, int, int]:
    """(trained weights, bytes of the frozen components, activation bytes) of a pipeline of ``shape``: the
    transformer trains; everything else the engine keeps on the GPU counts as frozen; the activations are
    ``activation_bytes_estimate`` for one micro-batch of ``rows`` at ``height`` x ``width`` (x ``num_frames`` for a
    video family) plus ``text_tokens``."""
    cfg = shape.transformer
    image_tokens = _media_tokens(shape.vae, cfg.get("patch_size", 2), height, width, vae_scale_factor, num_frames)
    hidden = int(cfg["num_attention_heads"]) * int(cfg["attention_head_dim"])
    activations = activation_bytes_estimate(
        int(cfg["num_layers"]), hidden, image_tokens + text_tokens, rows, dtype_bytes=dtype_bytes
    )
    frozen = sum(n for name, n in shape.counts.items() if name != "transformer") * dtype_bytes
    return shape.counts["transformer"], frozen, activations


def text_encoder_bytes(shape: PipelineShape, dtype_bytes: int) -> int:
    """The bytes of a pipeline's text encoders (its components named ``text_encoder*``, as
    ``RLPipelineMixin.text_encoder_components`` finds them): what ``model.text_encoder_offload`` takes off the GPU
    for each update."""
    return sum(n for name, n in shape.counts.items() if name.startswith("text_encoder")) * dtype_bytes


def plan_for_model_dir(
    model_dir: str,
    num_gpus: int,
    offload: bool,
    *,
    dtype_bytes: int,
    rows: int,
    text_tokens: int,
    height: int,
    width: int,
    vae_scale_factor: int,
    num_frames: int = 1,
) -> tuple[int, int, int]:
    """``plan_inputs`` of a diffusers pipeline directory (``PipelineShape.from_model_dir``)."""
    return plan_inputs(
        PipelineShape.from_model_dir(model_dir),
        dtype_bytes=dtype_bytes,
        rows=rows,
        text_tokens=text_tokens,
        height=height,
        width=width,
        vae_scale_factor=vae_scale_factor,
        num_frames=num_frames,
    )
