"""The text encoders off the training memory: a prompt is encoded once per engine call (not per image), and the hybrid
engine's actor rank takes every text encoder of its pipeline off the device for the update and back after it,
without ever calling one (``actor_rollout_ref.model.text_encoder_offload``, ``workers/text_encoder_offload.py``).
On CPU the mechanism runs with ``true``: host and device are one, so every tensor moves to a host copy and back."""

import numpy as np
import pytest
import torch
from helpers import model_config, num_rows, records_data_proto, rollout_config

from verl_omni.config.actor import ActorConfig, OptimConfig
from verl_omni.config.sampling import DiffusionSamplingParams
from verl_omni.pipelines.loading import load_rl_pipeline
from verl_omni.workers.colocated import ColocatedActorRank
from verl_omni.workers.text_encoder_offload import HostArena, TextEncoderOffload, offload_enabled
from verl_omni.workers.train_batch import TrainBatch

PARAMS = dict(num_inference_steps=4, height=32, width=32, guidance_scale=2.0)


def _count_calls(modules: dict) -> tuple[dict, list]:
    counts = dict.fromkeys(modules, 0)

    def counter(name):
        def hook(module, args):
            counts[name] += 1

        return hook

    return counts, [m.register_forward_pre_hook(counter(name)) for name, m in modules.items()]


@pytest.mark.parametrize(
    ("family", "encoders"),
    [("qwen_image", ["text_encoder"]), ("sd3", ["text_encoder", "text_encoder_2", "text_encoder_3"])],
)
def test_a_group_call_encodes_its_prompt_once_not_per_image(family, encoders, request):
    pipe = request.getfixturevalue(f"{family}_rl_pipe")
    assert sorted(pipe.text_encoder_components()) == encoders
    params = DiffusionSamplingParams(**PARAMS, sde_window_size=2, window_start=0)
    per_call = []
    for seeds in ([1], [1, 2, 3, 4]):
        counts, hooks = _count_calls(pipe.text_encoder_components())
        try:
            pipe.rl_generate("a red cat", seeds, params)
        finally:
            for hook in hooks:
                hook.remove()
        per_call.append(counts)
    # The same encoder forwards for 1 image as for 4 (the prompt and, under CFG, the negative one): once per call.
    assert per_call[0] == per_call[1] and all(n >= 1 for n in per_call[0].values()), per_call


def test_auto_is_on_where_the_rank_trains_on_a_gpu():
    assert offload_enabled("auto", torch.device("cuda", 0)) and not offload_enabled("auto", torch.device("cpu"))
    assert offload_enabled(True, torch.device("cpu")) and not offload_enabled(False, torch.device("cuda"))


@pytest.fixture
def fresh_pipes(tiny_sd3_dir, tiny_qwen_image_dir):
    """Pipelines of their own (these tests move their text encoders): by family name."""
    return lambda family, lora=None: load_rl_pipeline(
        {"qwen_image": tiny_qwen_image_dir, "sd3": tiny_sd3_dir}[family], family, "float32", lora
    )


def _tensors(modules: dict) -> dict[str, torch.Tensor]:
    """Every parameter and buffer (non-persistent ones too) of each module, by qualified name."""
    named = lambda m: [*m.named_parameters(), *m.named_buffers()]  # noqa: E731
    return {f"{n}.{k}": v for n, m in modules.items() for k, v in named(m)}


@pytest.mark.parametrize("family", ["qwen_image", "sd3"])
def test_offload_moves_every_text_encoder_and_the_rollout_after_is_bit_identical(family, fresh_pipes):
    pipe = fresh_pipes(family)
    encoders = pipe.text_encoder_components()
    for encoder in encoders.values():
        encoder.requires_grad_(False)
    params = DiffusionSamplingParams(**PARAMS, sde_window_size=2, window_start=1)
    before = pipe.rl_generate("a blue house", [5, 6], params)
    originals = {k: (t.data_ptr(), t.detach().clone()) for k, t in _tensors(encoders).items()}

    offload = TextEncoderOffload(encoders)
    host_ptrs = []
    for _ in range(2):
        # (the tensors of before this offload: in the second round, restored ones; an address freed after the first
        # round may be the allocator's for a new host copy of a buffer)
        live = {k: t.data_ptr() for k, t in _tensors(encoders).items()}
        live_bytes = sum(
            {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in _tensors(encoders).values()}.values()
        )
        offload.offload()
        # Every parameter and buffer of every encoder now lives in its host copy, none in the module's tensor.
        moved = _tensors(encoders)
        assert set(moved) == set(originals)
        assert all(t.data_ptr() != live[k] for k, t in moved.items())
        assert offload.offloaded_bytes == live_bytes
        # The frozen weights' kept copies fill one host buffer of their exact size (each start 512-byte aligned),
        # not one allocation each.
        arena = offload.arena
        weights = [t for t in moved.values() if isinstance(t, torch.nn.Parameter)]
        assert arena.nbytes == arena.used == sum(-(-t.numel() * t.element_size() // 512) * 512 for t in weights)
        start = arena.buffer.data_ptr()
        assert all(start <= t.data_ptr() < start + arena.nbytes for t in weights)
        assert not arena.pinned  # nothing to page-lock for a CPU module
        on_host = {k: t.data_ptr() for k, t in moved.items()}
        host_ptrs.append({k: p for k, p in on_host.items() if isinstance(moved[k], torch.nn.Parameter)})
        # An encoder called while off is refused, naming the key (a rollout would call it).
        with pytest.raises(RuntimeError, match="text_encoder_offload"):
            pipe.rl_generate("a blue house", [5], params)
        offload.restore()
        for k, t in _tensors(encoders).items():
            # Back in tensors of the module's device (here the CPU too): none still reads its host copy.
            assert torch.equal(t, originals[k][1]) and t.data_ptr() != on_host[k], k
    # Frozen weights are copied to the host once: the second offload reused the first one's copies.
    assert host_ptrs[0] == host_ptrs[1] and host_ptrs[0]

    after = pipe.rl_generate("a blue house", [5, 6], params)
    assert torch.equal(after.images, before.images)
    for name in ("prompt_embeds", "negative_prompt_embeds"):
        assert torch.equal(getattr(after, name), getattr(before, name)), name


class _CudartRecorder:
    """Records the page-locking calls a HostArena makes (``torch.cuda.cudart()``'s functions of those names)."""

    def __init__(self):
        self.registered, self.unregistered = [], []

    def cudaHostRegister(self, ptr, size, flags):  # noqa: N802 - CUDA's name
        self.registered.append((ptr, size, flags))
        return 0

    def cudaHostUnregister(self, ptr):  # noqa: N802
        self.unregistered.append(ptr)
        return 0


def test_host_arena_page_locks_exactly_its_bytes_once_and_releases_them(monkeypatch):
    import gc
    import mmap

    cudart = _CudartRecorder()
    monkeypatch.setattr(torch.cuda, "cudart", lambda: cudart)
    nbytes = 3 * 4096 + 100  # not a power of two, not whole pages
    arena = HostArena(nbytes, pin=True)
    assert arena.pinned and cudart.registered == [(arena.buffer.data_ptr(), nbytes, 0)]
    assert arena.buffer.data_ptr() % mmap.PAGESIZE == 0
    a = arena.take(torch.Size([10, 7]), torch.bfloat16)  # 140 bytes: the next copy starts 512 bytes on
    b = arena.take(torch.Size([3]), torch.float32)
    assert (a.data_ptr(), b.data_ptr()) == (arena.buffer.data_ptr(), arena.buffer.data_ptr() + 512)
    assert b.dtype == torch.float32 and b.shape == (3,) and arena.used == 1024
    assert arena.take(torch.Size([nbytes]), torch.uint8) is None  # no room: the caller allocates on its own
    ptr = arena.buffer.data_ptr()
    del arena, a, b
    gc.collect()
    assert cudart.unregistered == [ptr]


def test_host_arena_that_cannot_page_lock_keeps_pageable_copies_and_says_so(caplog):
    """Without CUDA (this machine) the registration fails: a logged fallback; the copies still work."""
    if torch.cuda.is_available():
        pytest.skip("needs a machine where cudaHostRegister is unavailable")
    with caplog.at_level("WARNING"):
        arena = HostArena(4096, pin=True)
    assert not arena.pinned
    assert "text_encoder_offload" in caplog.text and "pageable" in caplog.text
    copy = arena.take(torch.Size([4, 4]), torch.float32)
    copy.copy_(torch.arange(16.0).view(4, 4))
    assert torch.equal(copy, torch.arange(16.0).view(4, 4))


class _FakePool:
    """A memory pool by segment, on the CPU: unmapping a segment overwrites its tensors (their contents are lost)."""

    def __init__(self, segments: dict[int, list[torch.Tensor]]):
        self.tensors = segments
        self.unmapped, self.mapped = [], []

    def segments(self):
        return [
            (address, sum(t.untyped_storage().nbytes() for t in ts), [t.untyped_storage().data_ptr() for t in ts])
            for address, ts in self.tensors.items()
        ]

    def unmap(self, address):
        self.unmapped.append(address)
        with torch.no_grad():
            for t in self.tensors[address]:
                t.fill_(float("nan"))

    def map(self, address):
        self.mapped.append(address)


def test_pool_segments_holding_only_text_encoder_tensors_are_unmapped_in_place():
    torch.manual_seed(0)
    encoder = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4)).requires_grad_(False)
    foreign = torch.zeros(16)  # another component's weight sharing a segment with the last bias
    first, second = encoder[0], encoder[1]
    pool = _FakePool({100: [first.weight, first.bias], 200: [second.bias, foreign]})  # second.weight: in no pool
    originals = {k: v.clone() for k, v in encoder.state_dict().items()}
    pointers = {k: v.data_ptr() for k, v in encoder.state_dict().items()}

    offload = TextEncoderOffload({"text_encoder": encoder}, pool=pool)
    offload.offload()
    assert pool.unmapped == [100]  # segment 200 also holds a tensor of something else: it stays
    assert offload.kept_bytes == second.bias.untyped_storage().nbytes()
    nbytes = {k: v.untyped_storage().nbytes() for k, v in originals.items()}
    assert offload.offloaded_bytes == nbytes["0.weight"] + nbytes["0.bias"] + nbytes["1.weight"]
    now = {k: v.data_ptr() for k, v in encoder.state_dict().items()}
    # Unmapped tensors keep their addresses, the kept one too; the tensor in no pool moved to its host copy.
    assert [k for k in now if now[k] != pointers[k]] == ["1.weight"]
    assert torch.isnan(first.weight).all()  # what the unmapped segment holds while off
    # The kept copies, of the unmapped segment's storages and of the weight in no pool, share one host buffer.
    assert offload.arena.used == sum(-(-nbytes[k] // 512) * 512 for k in ("0.weight", "0.bias", "1.weight"))
    offload.restore()
    assert pool.mapped == [100]
    for k, v in encoder.state_dict().items():
        assert torch.equal(v, originals[k]), k
    assert encoder.state_dict()["0.weight"].data_ptr() == pointers["0.weight"]
    with offload.offloaded_during() as moved:  # the update's metrics: what moved, and what stayed
        pass
    assert moved["text_encoder_kept_gb"] == second.bias.untyped_storage().nbytes() / 1e9
    assert moved["text_encoder_offloaded_gb"] == offload.offloaded_bytes / 1e9 > 0


def _rollout(pipe, prompts=("a red cat", "a blue house on a hill"), seeds=(11, 22)):
    records = []
    for i, prompt in enumerate(prompts):
        params = DiffusionSamplingParams(**PARAMS, sde_window_size=2, window_start=i)
        records.append(pipe.rl_generate(prompt, [s + i for s in seeds], params))
    raw = np.array([prompts[i // len(seeds)] for i in range(num_rows(records))], dtype=object)
    uid = np.array([f"g{i // len(seeds)}" for i in range(num_rows(records))], dtype=object)
    return records_data_proto(records, {"raw_prompt": raw, "uid": uid})


def _refuse_calls(modules: dict) -> list:
    def refuse(module, args):
        raise AssertionError("the update called a text encoder")

    return [m.register_forward_pre_hook(refuse) for m in modules.values()]


def test_the_update_uses_the_batch_embeddings_with_or_without_offload(fresh_pipes, tiny_qwen_image_dir):
    """Two ranks on pipelines of the same weights, offload on and off: the same update (never calling a text
    encoder), the same adapter after it, and bit-identical rollouts afterwards."""
    rollout = rollout_config(pipeline={"true_cfg_scale": 2.0})
    actor = ActorConfig(optim=OptimConfig(lr=1e-2), ppo_micro_batch_size_per_gpu=2)
    ranks, pipes = {}, {}
    for setting in (True, False):
        model = model_config(tiny_qwen_image_dir, text_encoder_offload=setting)
        pipes[setting] = fresh_pipes("qwen_image", model.lora)
        ranks[setting] = ColocatedActorRank(pipes[setting], model, actor, rollout, 0, 1, None, "cpu", lora_seed=7)
    assert ranks[True].text_encoders is not None and ranks[False].text_encoders is None
    batch = TrainBatch.from_data_proto(_rollout(pipes[False], prompts=("a red cat",)), torch.tensor([1.0, -1.0]))

    metrics = {}
    for setting, rank in ranks.items():
        hooks = _refuse_calls(pipes[setting].text_encoder_components())
        try:
            metrics[setting] = rank.update(batch.as_dict(), batch.num_terms)
        finally:
            for hook in hooks:
                hook.remove()
    assert metrics[True]["actor/text_encoder_offload_s"] > 0 and metrics[True]["actor/text_encoder_offloaded_gb"] > 0
    assert metrics[False]["actor/text_encoder_offload_s"] == 0 == metrics[False]["actor/text_encoder_offloaded_gb"]
    assert metrics[True]["actor/grad_norm"] == metrics[False]["actor/grad_norm"] > 0
    trained = [rank.lora_state_dict() for rank in ranks.values()]
    assert all(torch.equal(trained[0][k], trained[1][k]) for k in trained[0])

    params = DiffusionSamplingParams(**PARAMS, sde_window_size=2, window_start=0)
    images = [pipes[s].rl_generate("a green tree", [3], params).images for s in (True, False)]
    assert torch.equal(images[0], images[1])


def test_vllm_cumem_pool_unmaps_the_weights_segments_that_hold_only_text_encoder_tensors():
    """``CuMemWeightPool`` over a stand-in of vllm's CuMem allocator: segments of the ``weights`` tag from the
    allocator, their live blocks from PyTorch's snapshot (freed blocks ignored), unmapped and mapped back by handle."""
    from types import SimpleNamespace

    from verl_omni.core.workarounds import CuMemWeightPool

    encoder = torch.nn.Linear(8, 8).requires_grad_(False)
    other = torch.zeros(4)
    weight, bias = (t.untyped_storage().data_ptr() for t in (encoder.weight, encoder.bias))
    handles = {1000: (0, 4096, 1000, None), 2000: (0, 4096, 2000, None), 3000: (0, 4096, 3000, None)}
    allocator = SimpleNamespace(
        pointer_to_data={
            1000: SimpleNamespace(tag="weights", handle=handles[1000]),
            2000: SimpleNamespace(tag="weights", handle=handles[2000]),
            3000: SimpleNamespace(tag="kv_cache", handle=handles[3000]),
        }
    )
    block = lambda address, state="active_allocated": {"address": address, "state": state}  # noqa: E731
    snapshot = [
        {"address": 1000, "blocks": [block(weight), block(12345, "inactive")]},  # the weight and a freed block
        {"address": 2000, "blocks": [block(bias), block(other.untyped_storage().data_ptr())]},  # shared
        {"address": 3000, "blocks": [block(bias)]},  # not the weights' tag
    ]
    unmapped, mapped = [], []
    pool = CuMemWeightPool(allocator, unmapped.append, mapped.append, snapshot=lambda: snapshot)
    assert sorted(a for a, _, _ in pool.segments()) == [1000, 2000]

    original = encoder.weight.detach().clone()
    offload = TextEncoderOffload({"text_encoder": encoder}, pool=pool)
    offload.offload()
    assert unmapped == [handles[1000]] and mapped == []
    assert offload.kept_bytes == encoder.bias.untyped_storage().nbytes()
    assert encoder.weight.untyped_storage().data_ptr() == weight  # in place: the segment keeps its addresses
    offload.restore()
    assert mapped == [handles[1000]] and torch.equal(encoder.weight, original)


def test_a_bad_setting_names_the_key(tiny_qwen_image_dir):
    with pytest.raises(ValueError, match=r"actor_rollout_ref\.model\.text_encoder_offload='yes' must be true, false"):
        model_config(tiny_qwen_image_dir, text_encoder_offload="yes")


def test_restore_gives_the_updates_cached_memory_back_before_mapping_the_encoders_again():
    """The update fills the memory the encoders left (its planner counts it free) and PyTorch's allocator keeps the
    freed blocks cached: the cache is emptied before any segment is mapped back or any tensor moves back."""
    encoder = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4)).requires_grad_(False)
    first = encoder[0]
    events = []

    class Pool(_FakePool):
        def map(self, address):
            events.append(("map", address))
            super().map(address)

    pool = Pool({100: [first.weight, first.bias]})
    offload = TextEncoderOffload({"text_encoder": encoder}, pool=pool, release=lambda: events.append("release"))
    original = {k: v.clone() for k, v in encoder.state_dict().items()}
    offload.offload()
    assert events == ["release"]  # the encoders' memory handed to the update
    events.clear()
    offload.restore()
    assert events == ["release", ("map", 100)]
    assert all(torch.equal(v, original[k]) for k, v in encoder.state_dict().items())
