"""Full fine-tuning (model.lora_rank=0) on CPU: two ranks in their own processes (gloo) train every transformer weight
with the sharded AdamW (workers/full_weights.py) against one process stepping torch's own AdamW over all the
weights; the pipeline's transformer (what an engine serves) holds the new weights, bitwise alike on both ranks;
a resume from the saved weights and optimizer shards repeats the next step bit for bit. And the memory plan."""

import copy
import json
import os
import socket
from dataclasses import replace

import pytest
import torch
import torch.multiprocessing as mp
from helpers import make_config, model_config, rollout_config, trainer_config
from test_hybrid_engine import _rollout

from verl_omni.config.actor import ActorConfig, EMAConfig, OptimConfig
from verl_omni.core.checksum import tensors_checksum
from verl_omni.models.ema import PolicyEMA
from verl_omni.trainer.ray_trainer import FlowGRPOTrainer
from verl_omni.trainer.run_summary import TAIL_STEPS
from verl_omni.workers.actor import DiffusionLoRAActor
from verl_omni.workers.full_actor import DiffusionFullActor, make_actor
from verl_omni.workers.full_weights import (
    BUCKETS_IN_FLIGHT,
    HOST_RESERVE_PER_GPU,
    HOST_RESERVE_PER_NODE,
    HOST_STEP_PIECE,
    PIECE_ALIGN,
    GiB,
    HostBudget,
    ShardedAdamW,
    activation_bytes_estimate,
    check_full_weights_fit,
    check_host_memory_fits,
    plan_full_weights_memory,
)
from verl_omni.workers.grad_sync import LoRAGradSync
from verl_omni.workers.train_batch import TrainBatch

# grad_clip below the tiny model's gradient norm: the global-norm clipping is exercised; two optimizer steps per update;
# 1 MiB gradient buckets: the tiny transformer's 19 MiB of float32 weights reduce in many buckets, several per block
ACTOR = dict(
    optim=OptimConfig(lr=1e-3, weight_decay=0.01),
    ppo_micro_batch_size_per_gpu=2,
    grad_clip=0.05,
    ppo_epochs=2,
    grad_bucket_mb=1.0,
)


def _configs(model_dir):
    return model_config(model_dir, lora_rank=0), ActorConfig(**ACTOR), rollout_config(pipeline={"true_cfg_scale": 2.0})


def _load_pipe(model_dir):
    from verl_omni.pipelines.qwen_image.pipeline import QwenImageRLPipeline

    return QwenImageRLPipeline.from_pretrained(model_dir)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gathered_ema(actor) -> dict:
    """The policy EMA as weights by name on every rank (its shards swapped in: a collective)."""
    with actor._ema_in_params():
        return {"lora": actor.lora_state_dict(), "optimizer_steps": actor.ema.optimizer_steps}


def _rank_main(rank, world_size, port, model_dir, shards, num_terms, out_dir):
    """One rank: two optimizer steps on its shard; then a resume from the state after step 1 and step 2 again. The
    policy EMA (moved after every step) beside an unsharded one of the same live weights."""
    torch.set_num_threads(1)
    model, actor_cfg, rollout = _configs(model_dir)
    actor_cfg = replace(actor_cfg, ema=EMAConfig(enable=True, update_interval=1))
    pipe = _load_pipe(model_dir)  # the engine's pipeline: the actor trains its transformer in place
    sync = LoRAGradSync(rank, world_size, ("127.0.0.1", port), torch.device("cpu"))
    actor = make_actor(model, actor_cfg, rollout, pipe=pipe, grad_sync=sync)
    assert isinstance(actor, DiffusionFullActor) and isinstance(actor.optimizer, ShardedAdamW)
    plain = PolicyEMA(actor.trainable, actor.ema.schedule)  # every weight's float32 average, in this process
    sharded_step = actor._after_optimizer_step

    def both_emas_step():
        sharded_step()
        plain.after_optimizer_step()

    actor._after_optimizer_step = both_emas_step
    batch = TrainBatch.from_dict(shards[rank])
    metrics = actor.update_batch(batch, num_terms)
    optimizer = actor.optimizer
    layout = {
        "buckets": len(optimizer.buckets),
        "peak": optimizer.peak_buckets,
        "plan": len(actor.plan(batch)),
        "grads_during_reductions": optimizer.grads_during_reductions,
        "grads": optimizer.grads_seen,
        "local_world_size": sync.local_world_size,
        "host_threads": optimizer.host_threads,
    }
    # optimizer_state_dict() holds the live host tensors (the CPU actor's): copied to outlive the next step
    saved = (actor.lora_state_dict(), copy.deepcopy(actor.optimizer_state_dict()), _gathered_ema(actor))
    actor.update_batch(batch, num_terms)
    served = {n: p.detach().clone() for n, p in pipe.transformer.named_parameters()}
    matches = actor.lora_matches_rank0()
    ema = _gathered_ema(actor)
    names = [n for n, _ in pipe.transformer.named_parameters()]
    ema_report = {
        "shard": actor.ema.weights.shadow[0].numel(),
        "equal_to_unsharded": all(
            torch.equal(ema["lora"][n], s) for n, s in zip(names, plain.weights.shadow, strict=True)
        ),
        "moved": max((ema["lora"][n] - saved[2]["lora"][n]).abs().max().item() for n in names),
        "state_dict_is_none": actor.ema_state_dict() is None,
        "checksum": actor.ema_checksum(),
        "live_back": all(torch.equal(p, served[n]) for n, p in pipe.transformer.named_parameters()),
    }
    # Resume: the weights, this rank's optimizer shard and the EMA as saved after step 1, then step 2 again.
    actor.load_lora_state_dict(saved[0])
    actor.load_optimizer_state_dict(saved[1])
    actor.load_ema_state_dict(saved[2])
    actor.update_batch(batch, num_terms)
    resumed = actor.lora_state_dict()
    resumed_ema = _gathered_ema(actor)["lora"]
    ema_report["resumed_equal"] = all(torch.equal(resumed_ema[n], ema["lora"][n]) for n in names)
    torch.save(
        {
            "metrics": metrics,
            "served": served,
            "matches": matches,
            "resumed": resumed,
            "shard": saved[1],
            "layout": layout,
            "ema": ema_report,
        },
        os.path.join(out_dir, f"rank{rank}.pt"),
    )


def _reference(model_dir, batch, num_terms):
    """One process, every row, torch.optim.AdamW over all the weights and torch's clip_grad_norm_."""
    model, actor_cfg, rollout = _configs(model_dir)
    actor = DiffusionFullActor(model, actor_cfg, rollout)
    optim = actor_cfg.optim
    actor.optimizer = torch.optim.AdamW(
        actor.trainable, lr=optim.lr, betas=tuple(optim.betas), weight_decay=optim.weight_decay
    )
    for verb in ("_prepare_grads", "_backward", "_reduce_and_clip"):  # the LoRA actor's: plain .grad, all of it
        setattr(actor, verb, getattr(DiffusionLoRAActor, verb).__get__(actor))
    actor._after_optimizer_step = lambda: DiffusionLoRAActor._after_optimizer_step(actor)
    metrics = actor.update_batch(batch, num_terms)
    actor.update_batch(batch, num_terms)
    return metrics, actor.lora_state_dict()


@pytest.fixture(scope="module")
def two_ranks(qwen_image_rl_pipe, tiny_qwen_image_dir, tmp_path_factory):
    batch = TrainBatch.from_data_proto(
        _rollout(qwen_image_rl_pipe), torch.randn(6, generator=torch.Generator().manual_seed(0))
    )
    out = tmp_path_factory.mktemp("full_ranks")
    # Uneven ranks: 4 rows (two micro-batches a window step) and 2 rows (one), so the second rank pads its backwards
    shards = [batch.select(slice(0, 4)).as_dict(), batch.select(slice(4, 6)).as_dict()]
    args = (2, _free_port(), tiny_qwen_image_dir, shards, batch.num_terms, str(out))
    mp.start_processes(_rank_main, args=args, nprocs=2, join=True, start_method="spawn")
    ranks = [torch.load(out / f"rank{k}.pt", weights_only=False) for k in range(2)]
    return batch, ranks


@pytest.fixture(scope="module")
def reference(two_ranks, tiny_qwen_image_dir):
    batch, _ = two_ranks
    return _reference(tiny_qwen_image_dir, batch, batch.num_terms)


def test_two_ranks_update_every_weight_like_one_process_with_torch_adamw(two_ranks, reference, tiny_qwen_image_dir):
    batch, ranks = two_ranks
    ref_metrics, reference = reference
    start = _load_pipe(tiny_qwen_image_dir).transformer.state_dict()
    served = ranks[0]["served"]
    assert set(served) == set(reference) == set(start)
    moved = max((reference[k] - start[k]).abs().max().item() for k in start)
    diff = max((served[k] - reference[k]).abs().max().item() for k in start)
    print(f"2 ranks (sharded AdamW) vs 1 process (torch AdamW): max abs diff {diff:.2e}, moved {moved:.2e}")
    # (the reference sums the micro-batches' gradients before any reduction, the ranks reduce each micro-batch's:
    # float32 sums in another order)
    assert moved > 1e-3 and diff < 2e-6
    # Every weight trained (the text encoder and the VAE are not the transformer's: they stay as loaded).
    assert all(not torch.equal(reference[k], start[k]) for k in start if start[k].numel() > 1)
    # The clipping saw the global norm (the sum of both shards'), as clip_grad_norm_ over all weights does.
    norm = ranks[0]["metrics"]["actor/grad_norm"]
    assert norm == pytest.approx(ref_metrics["actor/grad_norm"], rel=1e-5) and norm > ACTOR["grad_clip"]
    assert ranks[0]["metrics"]["actor/weight_sync_s"] > 0
    # The gradients were reduced in many buckets, at most BUCKETS_IN_FLIGHT held at once; rank 0 ran more
    # micro-batches than rank 1, which joined the extra reduce-scatters with zeros.
    layouts = [r["layout"] for r in ranks]
    assert layouts[0]["buckets"] == layouts[1]["buckets"] >= 10
    assert all(0 < lay["peak"] <= BUCKETS_IN_FLIGHT for lay in layouts), layouts
    # A bucket's reduce-scatter is not waited for while the backward computes the next gradients: most gradients
    # arrive with one outstanding.
    assert all(lay["grads_during_reductions"] > lay["grads"] // 2 for lay in layouts), layouts
    assert layouts[0]["plan"] > layouts[1]["plan"] > 0
    # Both ranks run on this host: an offloaded step would take half of its cores each.
    cores = len(os.sched_getaffinity(0))
    assert all((lay["local_world_size"], lay["host_threads"]) == (2, max(1, cores // 2)) for lay in layouts), layouts


@pytest.mark.parametrize("offload", [False, True], ids=["master_beside_weights", "optimizer_offload"])
def test_one_rank_with_recomputed_blocks_steps_like_torch_adamw(two_ranks, reference, tiny_qwen_image_dir, offload):
    """World size 1: the rank's shard is every bucket; the blocks recompute in the backward (the gradients still
    arrive bucket by bucket). With the offload the gradient shard is its own tensor in the weights' dtype, copied
    into the master's a piece at a time; without it, the master's float32 gradient. Either exists during an update
    only: none before the first, none after each step."""
    batch, _ = two_ranks
    _, actor_cfg, rollout = _configs(tiny_qwen_image_dir)
    model = model_config(tiny_qwen_image_dir, lora_rank=0, enable_gradient_checkpointing=True)
    actor = DiffusionFullActor(model, replace(actor_cfg, optimizer_offload=offload), rollout)
    opt = actor.optimizer
    assert actor.checkpointed_blocks > 0 and len(opt.buckets) >= 10
    assert opt.grad_shard is None and opt.master.grad is None
    shards, threads = [], []
    backward, adamw_step = opt.backward, opt.optimizer.step
    opt.backward = lambda loss: (backward(loss), shards.append(opt.grad_shard))[0]  # the shard during the update
    opt.optimizer.step = lambda: (threads.append(torch.get_num_threads()), adamw_step())[1]
    opt.host_threads = 2  # the offloaded step's CPU threads, whatever the process runs with (a Ray actor: 1)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        metrics = actor.update_batch(batch, batch.num_terms)
        actor.update_batch(batch, batch.num_terms)
        after = torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
    assert set(threads) == ({2} if offload else {1}) and after == 1
    assert metrics["actor/optimizer_step_s"] > 0 and metrics["actor/weight_sync_s"] > 0
    assert opt.grad_shard is None and opt.master.grad is None  # released after the step
    assert shards and all(t is not None for t in shards)
    expected = (actor.transformer.dtype, opt.shard_numel) if offload else (torch.float32, opt.shard_numel)
    assert {(t.dtype, t.numel()) for t in shards} == {expected}
    ref_metrics, weights = reference
    diff = max((p - weights[k]).abs().max().item() for k, p in actor.lora_state_dict().items())
    assert diff < 2e-6 and metrics["actor/grad_norm"] == pytest.approx(ref_metrics["actor/grad_norm"], rel=1e-5)
    assert all(p.grad is None for p in actor.trainable)  # no weight keeps a full-size gradient
    # The shard's state is the live host tensors (the offload, and any CPU actor): a checkpoint writes them without a
    # second copy in host memory.
    state = actor.optimizer_state_dict()
    assert state["master"].data_ptr() == actor.optimizer.master.data_ptr()
    live = opt._moments if offload else [opt.optimizer.state[opt.master][k] for k in ("exp_avg", "exp_avg_sq")]
    assert [state["optimizer"]["state"][0][k].data_ptr() for k in ("exp_avg", "exp_avg_sq")] == [
        t.data_ptr() for t in live
    ]
    # The optimizer shard of another bucket size, or of the format before per-bucket sharding, is refused.
    other = DiffusionFullActor(model_config(tiny_qwen_image_dir, lora_rank=0), ActorConfig(), rollout)
    refused = r"with \d+ gradient buckets, this run has 1: resume with the same actor_rollout_ref.actor.grad_bucket_mb"
    with pytest.raises(ValueError, match=refused):
        other.load_optimizer_state_dict(state)
    with pytest.raises(ValueError, match=r"format 'verl_omni.full_weights_shard.v1' .* resume from a checkpoint"):
        actor.load_optimizer_state_dict({**state, "format": "verl_omni.full_weights_shard.v1"})


def test_the_sharded_policy_ema_equals_the_unsharded_one_and_resumes_bit_identically(two_ranks):
    _, ranks = two_ranks
    reports = [r["ema"] for r in ranks]
    numel = ranks[0]["shard"]["numel"]
    for report in reports:
        # each rank keeps the float32 average of its half of the weights only
        assert report["shard"] == ranks[0]["shard"]["master"].numel() < numel
        # all-gathered, it is bitwise the unsharded average of the same live weights, which it moved with
        assert report["equal_to_unsharded"] and report["moved"] > 0
        # swapping it in and out leaves the live weights bitwise as they were
        assert report["live_back"] and report["resumed_equal"]
    # rank 0 returns the EMA weights (a checkpoint's ema.safetensors), the other rank None; both see one checksum
    assert [r["state_dict_is_none"] for r in reports] == [False, True]
    assert reports[0]["checksum"] == reports[1]["checksum"]


def test_the_ranks_shards_cover_every_weight_once_bucket_by_bucket():
    """Three ranks' shards (each its part of every bucket) hold every value of the weights exactly once; buckets stay
    under the cap unless one weight is larger, and take the weights in reverse order."""
    from types import SimpleNamespace

    from verl_omni.workers.full_weights import plan_buckets

    g = torch.Generator().manual_seed(0)
    shapes = [(5, 7), (3,), (40,), (2, 2), (11,), (1,), (9, 3)]
    params = [torch.nn.Parameter(torch.randn(shape, generator=g)) for shape in shapes]
    numels = [p.numel() for p in params]
    cap = 30
    buckets = plan_buckets(numels, 3, cap)
    assert [i for b in buckets for i in b.members] == list(reversed(range(len(params))))
    assert all(b.numel <= cap or len(b.members) == 1 for b in buckets) and len(buckets) > 2
    assert all(b.padded == 3 * b.chunk >= b.numel > b.padded - 3 for b in buckets)
    pieces = []
    for rank in range(3):
        sync = SimpleNamespace(rank=rank, world_size=3, local_world_size=3)
        optimizer = ShardedAdamW(params, sync, lr=1e-3, betas=(0.9, 0.999), weight_decay=0.0, bucket_mb=cap * 4 / 2**20)
        shard = optimizer.read_shard(torch.empty(optimizer.shard_numel))
        assert torch.equal(shard, optimizer.master.detach())  # the master starts from the weights' values
        pieces += [(id(p), lo, hi, shard[at : at + hi - lo]) for p, lo, hi, at in optimizer.shard_pieces()]
    for p in params:
        mine = sorted((lo, hi, values) for key, lo, hi, values in pieces if key == id(p))
        assert [lo for lo, _, _ in mine] == [0] + [hi for _, hi, _ in mine[:-1]] and mine[-1][1] == p.numel()
        assert torch.equal(torch.cat([values for _, _, values in mine]), p.detach().reshape(-1))


def test_both_engines_serve_the_same_weights_bitwise(two_ranks):
    _, ranks = two_ranks
    assert [r["matches"] for r in ranks] == [True, True]
    for name, tensor in ranks[0]["served"].items():
        assert torch.equal(tensor, ranks[1]["served"][name]), name


def test_resume_from_the_saved_weights_and_shards_is_bit_identical(two_ranks):
    _, ranks = two_ranks
    for r in ranks:
        for name, tensor in r["served"].items():
            assert torch.equal(tensor, r["resumed"][name]), name
    # Each rank saved its own half of the master weights and AdamW state.
    shards = [r["shard"] for r in ranks]
    assert [s["rank"] for s in shards] == [0, 1] and shards[0]["master"].shape == shards[1]["master"].shape
    # A rank's shard: its half of every gradient bucket (padded to an even count).
    assert shards[0]["buckets"] == shards[1]["buckets"] and sum(shards[0]["buckets"]) == shards[0]["numel"]
    assert shards[0]["master"].numel() == sum((n + 1) // 2 for n in shards[0]["buckets"])


class _RanksWritingShards:
    """What the hybrid engine's group does at a checkpoint: each rank writes its own shard file."""

    def __init__(self, shards):
        self.shards = shards

    def write_shards(self, folder):
        names = [f"optim_shard_rank{k}.pt" for k in range(len(self.shards))]
        for name, shard in zip(names, self.shards, strict=True):
            torch.save(shard, os.path.join(folder, name))
        return names


def test_a_checkpoint_holds_one_verified_optimizer_shard_file_per_rank(two_ranks, tmp_path):
    from verl_omni.trainer.checkpoint import SHARD_FILES, DamagedCheckpointError, read_checkpoint, save_checkpoint

    _, ranks = two_ranks
    shards = [r["shard"] for r in ranks]
    path = save_checkpoint(str(tmp_path), 1, ranks[0]["served"], _RanksWritingShards(shards), {})
    loaded = read_checkpoint(path)
    files = loaded.optimizer_state[SHARD_FILES]
    assert [os.path.basename(f) for f in files] == ["optim_shard_rank0.pt", "optim_shard_rank1.pt"]
    for file, shard in zip(files, shards, strict=True):
        again = torch.load(file, weights_only=True)
        assert torch.equal(again["master"], shard["master"]) and again["rank"] == shard["rank"]
    damaged = os.path.join(path, "optim_shard_rank1.pt")
    data = bytearray(open(damaged, "rb").read())
    data[len(data) // 2 :] = bytes(len(data) - len(data) // 2)
    open(damaged, "wb").write(bytes(data))
    with pytest.raises(DamagedCheckpointError, match=r"optim_shard_rank1.pt: sha256 .* does not match"):
        read_checkpoint(path)


def test_an_optimizer_shard_of_another_world_size_is_refused(tiny_qwen_image_dir, two_ranks):
    model, actor_cfg, rollout = _configs(tiny_qwen_image_dir)
    actor = DiffusionFullActor(model, actor_cfg, rollout)
    with pytest.raises(ValueError, match=r"rank 0 of 2 over \d+ weights; this rank is 0 of 1 .* same number of ranks"):
        actor.load_optimizer_state_dict(two_ranks[1][0]["shard"])


def test_full_fine_tuning_refuses_a_kl_term_naming_the_key(tiny_qwen_image_dir):
    model, _, rollout = _configs(tiny_qwen_image_dir)
    with pytest.raises(ValueError, match=r"actor_rollout_ref.actor.kl_coef=0.1 needs a reference policy"):
        DiffusionFullActor(model, ActorConfig(kl_coef=0.1), rollout)


def test_diffusion_nft_trains_every_weight_of_the_engines_transformer_and_its_old_policy_follows(tiny_qwen_image_dir):
    """Another algorithm behind the seam: DiffusionNFT's forward-process loss, its old policy a copy of every weight
    moved by its schedule (flow_grpo-style decay), on the engine's own pipeline."""
    from test_diffusion_nft import _nft_rollout

    from verl_omni.algorithms.diffusion_nft import old_policy_decay

    pipe = _load_pipe(tiny_qwen_image_dir)
    data = _nft_rollout(pipe)
    model, _, rollout = _configs(tiny_qwen_image_dir)
    section = {"name": "diffusion_nft", "diffusion_nft": {"decay_type": 1, "beta": 0.1}}
    actor = DiffusionFullActor(model, ActorConfig(**{**ACTOR, "ppo_epochs": 1}), rollout, pipe=pipe, algorithm=section)
    before = [p.detach().clone() for p in pipe.transformer.parameters()]
    old = actor.algorithm.old  # every weight, sharded like the master (one rank here: one shard of all of them)
    assert old.shadow[0].numel() == sum(p.numel() for p in before) and old.shadow[0].dtype == torch.float32
    advantages, _ = actor.algorithm.advantages(
        torch.tensor([0.1, 0.5, 0.9, 0.3, 0.3, 0.6], dtype=torch.float64), data.non_tensor_batch["uid"]
    )
    metrics = actor.update(data, advantages)
    after = [p.detach() for p in pipe.transformer.parameters()]
    assert sum(not torch.equal(a, b) for a, b in zip(after, before, strict=True)) > 0.9 * len(before)
    assert metrics["actor/num_train_terms"] == 24 and metrics["actor/weight_sync_s"] > 0
    decay = old_policy_decay(1, 1)
    actor.swap_in_rollout_weights()  # what training rollouts sample from: the old policy in the engine's weights
    served = [p.detach().clone() for p in pipe.transformer.parameters()]
    actor.swap_out_rollout_weights()
    for o, b, a in zip(served, before, after, strict=True):
        torch.testing.assert_close(o, b * decay + a * (1 - decay), rtol=1e-6, atol=1e-7)
    assert all(torch.equal(p, a) for p, a in zip(pipe.transformer.parameters(), after, strict=True))


def _nft_rank_main(rank, world_size, port, model_dir, shards, num_terms, out_dir):
    """One DiffusionNFT rank of full fine-tuning: its old policy sharded like the master, one update."""
    torch.set_num_threads(1)
    model, actor_cfg, rollout = _configs(model_dir)
    actor_cfg = replace(actor_cfg, ppo_epochs=1)
    section = {"name": "diffusion_nft", "diffusion_nft": {"decay_type": 1, "beta": 0.1}}
    pipe = _load_pipe(model_dir)
    sync = LoRAGradSync(rank, world_size, ("127.0.0.1", port), torch.device("cpu"))
    actor = make_actor(model, actor_cfg, rollout, pipe=pipe, grad_sync=sync, algorithm=section)
    batch = TrainBatch.from_dict(shards[rank])
    before = {n: p.detach().clone() for n, p in pipe.transformer.named_parameters()}
    actor.update_batch(batch, num_terms)
    after = {n: p.detach().clone() for n, p in pipe.transformer.named_parameters()}
    actor.swap_in_rollout_weights()  # a collective: the old policy's shards all-gathered into the served weights
    old = {n: p.detach().clone() for n, p in pipe.transformer.named_parameters()}
    actor.swap_out_rollout_weights()
    live_back = all(torch.equal(p, after[n]) for n, p in pipe.transformer.named_parameters())
    report = {"micro_batches": len(actor.plan(batch)), "shard": actor.algorithm.old.shadow[0].numel()}
    torch.save(
        {**report, "before": before, "after": after, "old": old, "live_back": live_back},
        os.path.join(out_dir, f"nft{rank}.pt"),
    )


def test_diffusion_nft_keeps_its_old_policy_sharded_and_ranks_of_unequal_rows_stay_in_step(
    tiny_qwen_image_dir, tmp_path
):
    """Two ranks (gloo) of unequal rows, so of unequal micro-batch counts: each keeps its shard of the float32 old
    policy; the epoch's one swap (all-gathers) keeps them in step; after the update both serve the same old policy,
    which moved by its schedule from the weights before towards the trained ones."""
    from test_diffusion_nft import _nft_rollout

    from verl_omni.algorithms.diffusion_nft import old_policy_decay

    pipe = _load_pipe(tiny_qwen_image_dir)
    advantages = torch.tensor([0.1, 0.5, 0.9, 0.3, 0.3, 0.6])
    batch = TrainBatch.from_data_proto(_nft_rollout(pipe), advantages)
    shards = [batch.select(slice(0, 4)).as_dict(), batch.select(slice(4, 6)).as_dict()]
    args = (2, _free_port(), tiny_qwen_image_dir, shards, 24, str(tmp_path))
    mp.start_processes(_nft_rank_main, args=args, nprocs=2, join=True, start_method="spawn")
    ranks = [torch.load(tmp_path / f"nft{k}.pt", weights_only=False) for k in range(2)]
    numel = sum(p.numel() for p in pipe.transformer.parameters())
    assert [r["micro_batches"] for r in ranks] == [8, 4]  # 4 timesteps of 4 rows / of 2 rows, 2 rows a micro-batch
    assert all(r["shard"] < numel and r["live_back"] for r in ranks)
    decay = old_policy_decay(1, 1)
    names = list(ranks[0]["after"])
    assert sum(not torch.equal(ranks[0]["after"][n], ranks[0]["before"][n]) for n in names) > 0.9 * len(names)
    for n in names:
        assert torch.equal(ranks[0]["after"][n], ranks[1]["after"][n]) and torch.equal(
            ranks[0]["old"][n], ranks[1]["old"][n]
        )
        expected = ranks[0]["before"][n] * decay + ranks[0]["after"][n] * (1 - decay)
        torch.testing.assert_close(ranks[0]["old"][n], expected, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------- memory planning


def test_the_memory_plan_of_a_known_configuration():
    # 20B bf16 weights on 8 GPUs: weights 2P, four 256 MiB gradient buckets, the master 4P/8 and its gradient 4P/8
    # (the master's gradient is the gradient shard, during the update only), AdamW's moments 8P/8.
    p = 20 * 10**9
    buckets = BUCKETS_IN_FLIGHT * 256 * 2**20
    plan = plan_full_weights_memory(p, 8, False, frozen_bytes=3 * GiB, activation_bytes=5 * GiB)
    assert (plan.weights, plan.grads, plan.buckets, plan.master, plan.optimizer) == (2 * p, p // 2, buckets, p // 2, p)
    assert plan.device_total == 2 * p + buckets + 2 * p + 8 * GiB and plan.host_total == 0
    # Between updates (the rollout) the GPU holds no gradient shard: the rollout's footprint is the weights, the
    # master and moments, the frozen components and the VAE decode.
    decoding = plan_full_weights_memory(p, 8, False, frozen_bytes=3 * GiB, decode_bytes=40 * GiB)
    assert decoding.device_total == 2 * p + p // 2 + p + 3 * GiB + 40 * GiB
    # Offloaded: the master, one piece's float32 gradient (the step goes piece by piece) and the moments on the host;
    # the gradient shard on the GPU in bf16.
    offloaded = plan_full_weights_memory(p, 8, True, frozen_bytes=3 * GiB, activation_bytes=5 * GiB)
    piece = HOST_STEP_PIECE * 4
    assert offloaded.grads == p // 4 and offloaded.host_total == 3 * p // 2 + piece
    assert offloaded.device_total == plan.device_total - 2 * p + p // 4
    # Smaller buckets, less held; never more than the weights.
    small = plan_full_weights_memory(p, 8, False, bucket_mb=64)
    assert small.buckets == buckets // 4 and plan_full_weights_memory(1000, 1, False).buckets == 2000
    # Activations with every block recomputed: each block's input plus one block's working set (34 s b h bytes).
    # The policy EMA and DiffusionNFT's old policy: a float32 copy of every weight each, sharded like the master
    # (on the host with the offload).
    both = plan_full_weights_memory(p, 8, False, frozen_bytes=3 * GiB, activation_bytes=5 * GiB, sharded_copies=2)
    assert both.device_total == plan.device_total + 2 * 4 * p // 8
    both_off = plan_full_weights_memory(p, 8, True, frozen_bytes=3 * GiB, activation_bytes=5 * GiB, sharded_copies=2)
    assert both_off.device_total == offloaded.device_total and both_off.host_total == offloaded.host_total + p
    assert activation_bytes_estimate(60, 3072, 4096, 2) == 60 * 4096 * 2 * 3072 * 2 + 34 * 4096 * 2 * 3072


def test_text_encoders_off_the_gpu_for_the_update_leave_the_larger_of_update_and_rollout():
    p = 20 * 10**9
    kw = dict(frozen_bytes=3 * GiB, activation_bytes=5 * GiB)
    plan = plan_full_weights_memory(p, 8, False, **kw)
    # 2 of the 3 GiB of frozen components leave for the update, whose peak (activations, buckets) still dominates.
    off = plan_full_weights_memory(p, 8, False, **kw, offloaded_frozen_bytes=2 * GiB)
    assert off.device_total == plan.device_total - 2 * GiB and off.offloaded_frozen == 2 * GiB
    assert "of them off the GPU for the update (text encoders) 2.00 GiB" in off.describe()
    assert "of them off" not in plan.describe()
    # Without activations, with small buckets and text encoders larger than the gradient shard, the rollout's
    # footprint (every component on the GPU, no gradient shard) is the larger.
    small = dict(frozen_bytes=12 * GiB, bucket_mb=1)
    between = plan_full_weights_memory(p, 8, False, **small, offloaded_frozen_bytes=12 * GiB)
    resident = between.weights + between.master + between.optimizer
    assert between.device_total == resident + 12 * GiB > resident + between.grads + between.buckets
    with pytest.raises(ValueError, match="offloaded_frozen_bytes=.* must be within"):
        plan_full_weights_memory(p, 8, False, frozen_bytes=GiB, offloaded_frozen_bytes=2 * GiB)


def test_the_plan_reads_the_parameter_counts_from_the_model_directory(tiny_qwen_image_dir):
    from verl_omni.workers.full_weights import stored_parameter_counts

    pipe = _load_pipe(tiny_qwen_image_dir)
    counts = stored_parameter_counts(tiny_qwen_image_dir)
    assert counts["transformer"] == sum(p.numel() for p in pipe.transformer.parameters())
    assert counts["text_encoder"] == sum(p.numel() for p in pipe.text_encoder.parameters())
    assert counts["vae"] == sum(p.numel() for p in pipe.vae.parameters())


def test_the_trainer_refuses_a_plan_the_gpu_cannot_hold_before_ray_starts(tiny_qwen_image_dir, monkeypatch):
    from types import SimpleNamespace

    from verl_omni.config.trainer import FlowGRPOConfig
    from verl_omni.trainer.ray_trainer import check_full_fine_tuning_memory
    from verl_omni.workers.full_weights import plan_for_model_dir

    overrides = {"actor_rollout_ref.model.lora_rank": 0, "trainer.n_gpus_per_node": 2}
    overrides.update({f"actor_rollout_ref.{s}.device": "cuda" for s in ("actor", "rollout")})
    cfg = FlowGRPOConfig.from_omega(make_config({"actor_rollout_ref.model.path": tiny_qwen_image_dir, **overrides}))
    params = cfg.actor_rollout_ref.rollout.sampling_params()
    p, frozen, activations = plan_for_model_dir(
        tiny_qwen_image_dir,
        2,
        False,
        dtype_bytes=4,
        rows=2 * cfg.actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu,
        text_tokens=params.max_sequence_length,
        height=params.height,
        width=params.width,
        vae_scale_factor=8,
    )
    # Per GPU on 2: 4P weights + 4P gradient buckets (three of 256 MiB hold the tiny model's every gradient) + 8P
    # master and its gradient + 8P moments; offloaded: 4P + 4P + a 2P gradient shard = 10P on the GPU.
    fits_offloaded = frozen + activations + 11 * p
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda _: SimpleNamespace(total_memory=fits_offloaded))
    with pytest.raises(
        ValueError, match=r"does not fit: .* on 2 GPU\(s\).* Set actor_rollout_ref.actor.optimizer_offload"
    ):
        check_full_fine_tuning_memory(cfg, tiny_qwen_image_dir)


def test_a_plan_that_does_not_fit_is_refused_with_its_numbers_and_the_option_that_fits():
    p = 20 * 10**9
    gpu = 80 * GiB
    # On 4 GPUs: 2P + 1 GiB buckets + 4P = 112.8 GiB does not fit; offloaded: 2P + P/2 + 1 GiB = 47.6 GiB does.
    with pytest.raises(
        ValueError,
        match=r"does not fit: 20.00B trained weights on 4 GPU\(s\), actor_rollout_ref.actor.optimizer_offload=false: "
        r"112.76 GiB per GPU \(weights 37.25 GiB, gradient shard 18.63 GiB, gradient buckets 1.00 GiB, .*\), more than "
        r"the GPU's 80.00 GiB. Set actor_rollout_ref.actor.optimizer_offload=true \(47.57 GiB per GPU, 55.94 GiB host "
        r"per GPU\)",
    ):
        check_full_weights_fit(p, 4, False, gpu)
    # With 35 GiB of activations the offload alone is not enough: the fewest GPUs that fit, without and with it
    # (2P + 1 GiB + 35 GiB + 16P/N, or + 2P/N offloaded).
    with pytest.raises(
        ValueError,
        match=r"Use 45 GPUs \(79.88 GiB per GPU\) or 6 GPUs with actor_rollout_ref.actor.optimizer_offload=true "
        r"\(79.46 GiB per GPU\); GPUs: trainer.n_gpus_per_node x trainer.nnodes",
    ):
        check_full_weights_fit(p, 4, False, gpu, activation_bytes=35 * GiB)
    with pytest.raises(ValueError, match=r"No GPU count fits: .* train a LoRA \(actor_rollout_ref.model.lora_rank"):
        check_full_weights_fit(p, 8, True, 37 * GiB)
    assert check_full_weights_fit(p, 4, True, gpu).device_total < gpu


# ---------------------------------------------------------------- the trainer


def trainer_blocks(state: dict) -> set:
    return {k.split(".")[1] for k in state if k.startswith("transformer_blocks.")}


def test_full_fine_tuning_config_refusals_name_the_keys():
    base = {"actor_rollout_ref.model.path": "tiny:qwen_image", "actor_rollout_ref.model.lora_rank": 0}
    with pytest.raises(ValueError, match=r"lora_rank=0 \(full fine-tuning\) .* actor_rollout_ref.hybrid_engine=true"):
        FlowGRPOTrainer(make_config({**base, "actor_rollout_ref.hybrid_engine": False}))
    with pytest.raises(ValueError, match=r"actor_rollout_ref.actor.kl_coef=0.1 needs a reference policy"):
        FlowGRPOTrainer(make_config({**base, "actor_rollout_ref.actor.kl_coef": 0.1}))


@pytest.mark.e2e
def test_the_trainer_fine_tunes_every_weight_on_two_ranks_and_resumes(
    ray_session, ocr_data_files, tiny_qwen_image_dir, tmp_path, capsys, monkeypatch
):
    from verl_omni.trainer.colocated_actor import ColocatedActorGroup

    def no_weights_in_the_driver(self):
        raise AssertionError("the driver fetched the full weights")

    written = []
    write_weights_file = ColocatedActorGroup.write_weights_file

    def writing_rank0(self, path):
        written.append(write_weights_file(self, path))
        return written[-1]

    overrides = {
        "actor_rollout_ref.model.lora_rank": 0,
        "actor_rollout_ref.actor.optim.lr": 1e-4,
        "trainer.n_gpus_per_node": 2,
        "trainer.save_freq": 1,
    }
    cfg = trainer_config(
        ocr_data_files, tiny_qwen_image_dir, tmp_path, **overrides, **{"trainer.total_training_steps": 2}
    )
    start = _load_pipe(tiny_qwen_image_dir).transformer.state_dict()
    trainer = FlowGRPOTrainer(cfg).init()
    try:
        assert "full fine-tuning memory plan: " in capsys.readouterr().out
        # The saves: rank 0 writes the weights file; only its sha256 and size come back.
        with monkeypatch.context() as m:
            m.setattr(ColocatedActorGroup, "lora_state_dict", no_weights_in_the_driver)
            m.setattr(ColocatedActorGroup, "write_weights_file", writing_rank0)
            history = trainer.fit()
        assert len(written) == 2 and all(isinstance(d, str) and isinstance(n, int) for d, n in written)
        assert len(history) == 2 and history[-1]["actor/grad_norm"] > 0 and history[-1]["actor/weight_sync_s"] > 0
        weights = trainer.actor.lora_state_dict()
        unmoved = [k for k in start if torch.equal(weights[k], start[k])]
        # Every weight moved but the last block's text stream, whose output nothing reads (zero gradient; no decay).
        last = f"transformer_blocks.{len(trainer_blocks(start)) - 1}."
        text_stream = ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "norm_added", "txt_")
        assert set(weights) == set(start) and unmoved
        assert all(k.startswith(last) and any(t in k for t in text_stream) for k in unmoved), unmoved
        # Both engines serve their ranks' weights, bitwise alike; the checkpoint's checksum is theirs.
        assert trainer.actor.lora_matches_rank0() == [True, True]
        assert trainer.actor.lora_checksums() == [tensors_checksum(weights)] * 2 == [trainer.last_lora_checksum] * 2
        shards = trainer.actor.optimizer.state_dict()["full_weights_shards"]
        assert [s["rank"] for s in shards] == [0, 1]
        # Each rank wrote its own optimizer shard into the checkpoint, recorded with its sha256.
        with open(tmp_path / "global_step_2" / "meta.json") as f:
            recorded = json.load(f)["files"]
        assert {"optim_shard_rank0.pt", "optim_shard_rank1.pt"} <= set(recorded)
        assert recorded["lora.safetensors"] == written[-1][0]
    finally:
        trainer.shutdown()
    cfg3 = trainer_config(
        ocr_data_files, tiny_qwen_image_dir, tmp_path, **overrides, **{"trainer.total_training_steps": 3}
    )
    # The resume: every rank reads the verified weights file itself; the shape check reads its header.
    with monkeypatch.context() as m:
        m.setattr(ColocatedActorGroup, "lora_state_dict", no_weights_in_the_driver)
        resumed = FlowGRPOTrainer(cfg3).init()
    try:
        assert resumed.global_step == 2
        again = resumed.actor.lora_state_dict()
        assert all(torch.equal(weights[k], again[k]) for k in weights)
        for mine, saved in zip(resumed.actor.optimizer.state_dict()["full_weights_shards"], shards, strict=True):
            assert torch.equal(mine["master"], saved["master"])
            for name, value in saved["optimizer"]["state"][0].items():
                assert torch.equal(torch.as_tensor(value), torch.as_tensor(mine["optimizer"]["state"][0][name])), name
        assert len(resumed.fit()) == 1 and resumed.global_step == 3
    finally:
        resumed.shutdown()


@pytest.mark.e2e
@pytest.mark.parametrize("lora_rank", [4, 0], ids=["lora", "every_weight"])
def test_the_actor_recomputes_the_engines_log_probs_exactly_in_bf16(
    ray_session, ocr_data_files, tiny_sd3_dir, tmp_path, lora_rank
):
    """The hybrid engine in bf16 on the CPU, SD3 with the SD3.5 recipe's CFG 4.5 and noise level 0.7: step 1's
    importance ratios are exactly 1, with a LoRA and with every weight trained. The actor's recomputation is the
    rollout's computation in both; where a GPU's ratios are not 1 (its kernels differ between the engine's compiled
    rollout and the update), this rules out a difference in what the full-weight actor computes."""
    overrides = {
        "actor_rollout_ref.hybrid_engine": True,
        "actor_rollout_ref.model.pipeline": "sd3",
        "actor_rollout_ref.model.lora_rank": lora_rank,
        "actor_rollout_ref.rollout.dtype": "bfloat16",
        "actor_rollout_ref.actor.dtype": "bfloat16",
        "actor_rollout_ref.rollout.pipeline.true_cfg_scale": 4.5,
        "actor_rollout_ref.rollout.algo.noise_level": 0.7,
        "actor_rollout_ref.actor.optim.lr": 1e-5,
        "trainer.total_training_steps": 1,
    }
    trainer = FlowGRPOTrainer(trainer_config(ocr_data_files, tiny_sd3_dir, tmp_path, **overrides)).init()
    try:
        (first,) = trainer.fit()
    finally:
        trainer.shutdown()
    ratios = (first["actor/ratio_min"], first["actor/ratio_mean"], first["actor/ratio_max"])
    assert ratios == (1.0, 1.0, 1.0), ratios
    assert first["actor/grad_norm"] > 0


# ---------------------------------------------------------------- export


def _moved_actor(model_dir):
    actor = DiffusionFullActor(*_configs(model_dir))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in actor.trainable:
            p.add_(0.01 * torch.randn(p.shape, generator=g))
    return actor


class _Rank0WritesWeights:
    """What the hybrid engine's rank 0 does at a checkpoint (``ColocatedActorRank.save_weights_file``): writes the
    weights file itself; only its sha256 and size reach the caller."""

    def __init__(self, actor):
        self.actor, self.returned = actor, []

    def __call__(self, path):
        from verl_omni.core.weights_file import write_safetensors_file

        result = write_safetensors_file(path, self.actor.lora_state_dict())
        self.returned.append(result)
        return result


def test_rank0_writes_the_weights_file_and_every_rank_reads_it_back_verified(tiny_qwen_image_dir, tmp_path):
    from safetensors.torch import load_file

    from verl_omni.trainer.checkpoint import (
        DamagedCheckpointError,
        check_lora_fits,
        load_resumable_checkpoint,
        lora_meta,
        save_checkpoint,
    )

    actor = _moved_actor(tiny_qwen_image_dir)
    weights = actor.lora_state_dict()
    writer = _Rank0WritesWeights(actor)
    path = save_checkpoint(str(tmp_path), 1, writer, actor.optimizer, {"lora": lora_meta(0, 16.0, [])})
    # The driver got a checksum and a size, no tensor; it recorded them in meta.json like every file.
    [(digest, size)] = writer.returned
    assert isinstance(digest, str) and isinstance(size, int)
    assert size == os.path.getsize(os.path.join(path, "lora.safetensors"))
    with open(os.path.join(path, "meta.json")) as f:
        assert json.load(f)["files"]["lora.safetensors"] == digest
    # Resume: verified, the weights left on disk; the shape check reads the file's header.
    loaded = load_resumable_checkpoint(str(tmp_path), "stop", weights_in_memory=False)
    assert loaded.lora is None and loaded.lora_file == os.path.join(path, "lora.safetensors")
    assert loaded.lora_shapes() == actor.weight_shapes()
    check_lora_fits(loaded, lora_meta(0, 16.0, []), actor.weight_shapes())
    # A rank reading the file: bit-identical weights.
    fresh = DiffusionFullActor(*_configs(tiny_qwen_image_dir))
    fresh.load_lora_state_dict(load_file(loaded.lora_file))
    again = fresh.lora_state_dict()
    assert set(again) == set(weights) and all(torch.equal(again[k], weights[k]) for k in weights)
    # A changed shape is named from the header alone.
    name = next(iter(weights))
    shapes = {**actor.weight_shapes(), name: (1, 2, 3)}
    with pytest.raises(ValueError, match=rf"{name} \[.*\] -> \[1, 2, 3\]"):
        check_lora_fits(loaded, lora_meta(0, 16.0, []), shapes)
    # One flipped byte in the weights file: refused, naming the file, before any rank reads it.
    damaged = os.path.join(path, "lora.safetensors")
    data = bytearray(open(damaged, "rb").read())
    data[-1] ^= 0xFF
    open(damaged, "wb").write(bytes(data))
    with pytest.raises(DamagedCheckpointError, match=r"lora.safetensors: sha256 .* does not match"):
        load_resumable_checkpoint(str(tmp_path), "stop", weights_in_memory=False)


def test_a_weights_file_the_driver_cannot_see_is_refused_and_no_checkpoint_is_left(tmp_path):
    from verl_omni.trainer.checkpoint import LATEST, save_checkpoint

    def elsewhere(path):  # a rank whose filesystem is not the driver's: the file never appears in the driver's view
        return "0" * 64, 123

    with pytest.raises(RuntimeError, match=r"reported 123 bytes .* no file: trainer.default_local_dir must be one"):
        save_checkpoint(str(tmp_path), 1, elsewhere, torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0))
    assert os.listdir(tmp_path) == [] and not os.path.exists(tmp_path / LATEST)


def test_full_weights_export_to_a_pipeline_directory_that_from_pretrained_loads(tiny_qwen_image_dir, tmp_path):
    from diffusers import QwenImagePipeline

    from verl_omni.export import read_adapter
    from verl_omni.export.__main__ import main as export_main
    from verl_omni.trainer.checkpoint import lora_meta, save_checkpoint

    actor = _moved_actor(tiny_qwen_image_dir)
    weights = actor.lora_state_dict()
    meta = {"lora_checksum": tensors_checksum(weights), "lora": lora_meta(0, 16.0, [])}
    # The weights file as the hybrid engine's rank 0 writes it.
    save_checkpoint(str(tmp_path / "run"), 2, _Rank0WritesWeights(actor), actor.optimizer, meta)
    # What the evaluation reads (verl_omni.eval's read_adapter): the weights by name, verified, rank 0.
    adapter = read_adapter(str(tmp_path / "run"))
    assert adapter.rank == 0 and adapter.checksum == meta["lora_checksum"]
    out = tmp_path / "exported"
    assert export_main(["--checkpoint", str(tmp_path / "run"), "--base", tiny_qwen_image_dir, "--out", str(out)]) == 0
    loaded = QwenImagePipeline.from_pretrained(str(out)).transformer.state_dict()
    assert set(loaded) == set(weights) and all(torch.equal(loaded[k], weights[k]) for k in weights)


# Measured on 2 cores (the demo recipe with lora_rank=0 for 20 steps, rollout.seed 42): lr 3e-4 +2.6, 1e-3 +5.2,
# 3e-3 +10.9 x the step-1 std; lr 3e-3 with rollout.seed 7: +33 x.
FULL_LEARNING_LR = 3e-3


@pytest.mark.e2e
@pytest.mark.slow
def test_the_cpu_demo_learns_with_full_fine_tuning(ray_session, ocr_data_files, tiny_qwen_image_dir, tmp_path):
    from test_trainer import DEMO_RECIPE, LEARNING_CHECK_STEPS, _train

    recipe = {k: v for k, v in DEMO_RECIPE.items() if k != "actor_rollout_ref.model.target_modules"}
    recipe.update(
        {
            "actor_rollout_ref.model.lora_rank": 0,
            "actor_rollout_ref.actor.optim.lr": FULL_LEARNING_LR,
            "trainer.total_training_steps": LEARNING_CHECK_STEPS,
        }
    )
    trainer, history, _ = _train(trainer_config(ocr_data_files, tiny_qwen_image_dir, tmp_path, **recipe))
    rewards = [h["reward/total/mean"] for h in history]
    tail = rewards[-TAIL_STEPS:]
    change = sum(tail) / len(tail) - rewards[0]
    step1_std = history[0]["reward/total/std"]
    print(f"full fine-tuning: change {change:+.4f} = {change / step1_std:.1f} x the step-1 std; {rewards}")
    assert len(history) == LEARNING_CHECK_STEPS and change >= 5 * step1_std


def test_host_memory_a_node_cannot_hold_is_refused_with_the_node_count_that_fits():
    p = 20 * 10**9

    def replan(gpus: int, offload: bool):
        return plan_full_weights_memory(p, gpus, offload)

    # 8 GPUs on one node with the offload: each keeps 12P/8 bytes of master and AdamW moments (and a 64 MiB piece of
    # gradient) in host memory, 240 GB a node: more than 200 GiB. Two nodes halve each GPU's shards (more GPUs on one
    # node would not change a node's share); without the offload each GPU holds 2P + 1 GiB + 16P/8 = 75.5 GiB.
    on_one_node = replan(8, True)
    with pytest.raises(
        ValueError,
        match=r"host memory does not fit: 8 GPU\(s\) per node x 28.00 GiB \(28.00 GiB of master, AdamW and "
        r"policy-copy shards\) = 224.02 GiB, more than the 200.00 GiB available on this node. Use trainer.nnodes=2 "
        r"\(112.26 GiB of host memory a node\) or actor_rollout_ref.actor.optimizer_offload=false "
        r"\(75.51 GiB per GPU\)",
    ):
        check_host_memory_fits(on_one_node, 8, 200 * GiB, replan=replan, gpu_bytes=80 * GiB)
    # What fits is returned: the node's bytes.
    assert check_host_memory_fits(on_one_node, 8, 300 * GiB, replan=replan) == 8 * on_one_node.host_total
    # The text encoders' host copies (one per GPU with model.text_encoder_offload) count; turning that off is named.
    with pytest.raises(ValueError, match=r"\+ 16.00 GiB of text encoders .* Use model.text_encoder_offload=false"):
        check_host_memory_fits(on_one_node, 8, 300 * GiB, text_encoder_host_bytes=16 * GiB)
    # Nothing fits: no node count within the limit, the GPU too small without the offload.
    with pytest.raises(ValueError, match=r"Add host memory, or train a LoRA"):
        check_host_memory_fits(on_one_node, 8, GiB, replan=replan, gpu_bytes=40 * GiB, max_nodes=4)
    # Without the offload nothing lives in host memory: nothing to check.
    assert check_host_memory_fits(replan(8, False), 8, 0, replan=replan) == 0


def test_the_trainer_refuses_host_memory_the_node_cannot_hold_before_ray_starts(tiny_qwen_image_dir, capsys):
    from verl_omni.config.trainer import FlowGRPOConfig
    from verl_omni.trainer.ray_trainer import check_full_fine_tuning_memory

    overrides = {
        "actor_rollout_ref.model.path": tiny_qwen_image_dir,
        "actor_rollout_ref.model.lora_rank": 0,
        "actor_rollout_ref.actor.optimizer_offload": True,
        "trainer.n_gpus_per_node": 2,
    }
    cfg = FlowGRPOConfig.from_omega(make_config(overrides))
    check_full_fine_tuning_memory(cfg, tiny_qwen_image_dir, host=HostBudget(128 * GiB, 120 * GiB, 2))
    assert "full fine-tuning host memory per node: 0.07 GiB of the 87.60 GiB for the shards" in capsys.readouterr().out
    # The tiny model's 2 GPUs keep ~0.07 GiB a node (16 bytes a weight, halved by each rank's shard); on 2 nodes
    # each GPU's shard halves again. A 128 GiB node with 32.45 GiB available leaves them 50 MiB: 6.40 GiB lie above
    # Ray's line and 26 GiB go to the run's processes.
    nearly_full = HostBudget(128 * GiB, 26 * GiB + 50 * 2**20 + int(0.05 * 128 * GiB), 2)
    with pytest.raises(
        ValueError,
        match=r"host memory does not fit: 2 GPU\(s\) per node x .* more than the 0.05 GiB this node leaves for them "
        r"\(95% of the node's 128.00 GiB .* 26.00 GiB for the run's processes\)\. Use trainer.nnodes=2",
    ):
        check_full_fine_tuning_memory(cfg, tiny_qwen_image_dir, host=nearly_full)


def test_the_host_budget_keeps_below_rays_memory_monitor_and_leaves_room_for_the_runs_processes():
    # The measured case: Qwen-Image's 20 layers on one GPU with the offload, when the shards took 16 bytes a weight
    # in host memory (101.9 GiB for 6.84B weights), on a node of 125.85 GiB with 124.19 GiB available; Ray's monitor
    # stopped the run. The budget refuses that; the step piece by piece (12 bytes a weight, 76.5 GiB) fits.
    node = HostBudget(int(125.85 * GiB), int(124.19 * GiB), gpus_per_node=1)
    assert node.reserve == HOST_RESERVE_PER_NODE + HOST_RESERVE_PER_GPU
    assert node.for_shards == int(0.95 * node.total) - (node.total - node.available) - node.reserve
    weights = 6_837_149_248
    measured = replace(plan_full_weights_memory(weights, 1, True), master=8 * weights)
    beside = 17.6 * GiB  # what the run's processes used beside the shards when the monitor stopped it
    assert round(measured.host_total / GiB, 2) == 101.88
    assert measured.host_total + beside > 0.95 * node.total - (node.total - node.available)
    with pytest.raises(ValueError, match=r"host memory does not fit: 1 GPU\(s\) per node"):
        check_host_memory_fits(measured, 1, node.for_shards, budget="this node leaves for them")
    plan = plan_full_weights_memory(weights, 1, True)
    assert round(plan.host_total / GiB, 1) == 76.5
    assert check_host_memory_fits(plan, 1, node.for_shards) == plan.host_total
    # More GPUs on the node: each engine process's own memory counts.
    assert HostBudget(node.total, node.available, 8).for_shards == node.for_shards - 7 * HOST_RESERVE_PER_GPU
    # Nothing left: zero, never negative.
    assert HostBudget(64 * GiB, 8 * GiB, 8).for_shards == 0


def test_the_host_budget_reads_rays_memory_monitor_settings():
    default = HostBudget.of_this_node(1, env={})
    assert default.kill_fraction == 0.95 and 0 < default.available <= default.total
    assert HostBudget.of_this_node(1, env={"RAY_memory_usage_threshold": "0.8"}).kill_fraction == 0.8
    assert HostBudget.of_this_node(1, env={"RAY_memory_monitor_refresh_ms": "0"}).kill_fraction == 1.0


def test_the_rollouts_vae_decode_counts_beside_every_component_between_updates():
    p = 20 * 10**9
    kw = dict(frozen_bytes=3 * GiB, activation_bytes=5 * GiB)
    plan = plan_full_weights_memory(p, 8, False, **kw)
    resident = plan.weights + plan.master + plan.optimizer
    # A decode smaller than the update's buckets and activations changes nothing; a larger one is the plan.
    small = plan_full_weights_memory(p, 8, False, **kw, decode_bytes=GiB)
    assert small.device_total == plan.device_total and "the rollout's VAE decode 1.00 GiB" in small.describe()
    large = plan_full_weights_memory(p, 8, False, **kw, decode_bytes=20 * GiB)
    assert large.device_total == resident + 3 * GiB + 20 * GiB > plan.device_total
    assert "VAE decode" not in plan.describe()
    # It never leaves the GPU: with the text encoders off for the update, the rollout keeps both.
    both = plan_full_weights_memory(p, 8, False, **kw, decode_bytes=20 * GiB, offloaded_frozen_bytes=2 * GiB)
    assert both.device_total == large.device_total


def test_the_offloaded_step_goes_piece_by_piece_exactly_as_one_adamw_over_the_shard():
    """With the offload AdamW steps the host master a piece at a time through one small float32 gradient buffer:
    the weights, master and moments equal one AdamW over the whole shard bit for bit (AdamW is elementwise), with
    clipping; the state of either resumes in the other. Both are PyTorch's fused AdamW, whose CPU kernel rounds a
    unit's last partial vector differently: a piece size off the alignment (37 values) is rounded up to it (64), so
    every value takes the same path as in the whole shard's step."""
    from verl_omni.workers.grad_sync import LoRAGradSync

    def run(offload: bool, steps: int, state=None, piece: int = 37, first: int = 0):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(16, 24), torch.nn.GELU(), torch.nn.Linear(24, 8))
        sync = LoRAGradSync(0, 1, None, "cpu")
        optimizer = ShardedAdamW(
            list(model.parameters()), sync, lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1, offload=offload,
            bucket_mb=256 * 4 / 2**20, host_step_piece=piece,
        )  # fmt: skip
        if state is not None:
            model.load_state_dict(state[0])
            optimizer.load_state_dict(copy.deepcopy(state[1]))
        for step in range(first, first + steps):
            optimizer.zero_grad()
            x = torch.randn(5, 16, generator=torch.Generator().manual_seed(step))
            optimizer.backward(model(x).pow(2).mean())
            optimizer.reduce_and_clip(torch.zeros(()), max_norm=0.05)  # clips: the norm is above 0.05
            optimizer.step()
        return model, optimizer

    whole, whole_opt = run(False, 3)
    pieces, pieces_opt = run(True, 3)
    assert pieces_opt._grad_buffer.numel() == PIECE_ALIGN == 64  # 37 rounded up
    assert len(pieces_opt._pieces) == -(-pieces_opt.shard_numel // 64) >= 9
    assert whole_opt.optimizer.defaults["fused"] and pieces_opt.optimizer.defaults["fused"]
    assert not hasattr(pieces_opt.master, "grad") or pieces_opt.master.grad is None  # no whole-shard gradient
    assert all(torch.equal(a, b) for a, b in zip(whole.parameters(), pieces.parameters(), strict=True))
    a, b = whole_opt.state_dict(), pieces_opt.state_dict()
    assert torch.equal(a["master"], b["master"])
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    for key in ("step", "exp_avg", "exp_avg_sq"):
        assert torch.equal(a["optimizer"]["state"][0][key], b["optimizer"]["state"][0][key]), key
    # Either's checkpoint resumes in the other: two more steps from step 3 equal five steps straight.
    five, _ = run(False, 5)
    for offload, saved in ((True, (whole.state_dict(), a)), (False, (pieces.state_dict(), b))):
        resumed, _ = run(offload, 2, saved, piece=130, first=3)
        assert all(torch.equal(x, y) for x, y in zip(five.parameters(), resumed.parameters(), strict=True)), offload


def _anonymous_bytes() -> int:
    """This process's anonymous memory (what a file mapping does not add), from /proc/self/smaps_rollup."""
    with open("/proc/self/smaps_rollup") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("Anonymous:"))


def test_a_resume_reads_the_shard_file_without_a_second_copy_in_process_memory(tmp_path):
    """``read_shard_file`` maps the shard file: loading it into the live shards adds no anonymous memory of the
    file's size (with the offload the live shards already take 12 bytes a weight of the node)."""
    import gc

    from verl_omni.workers.full_weights import read_shard_file

    n = 24 * 2**20  # 288 MiB of shards: master and two moments
    moments = {"exp_avg": torch.randn(n), "exp_avg_sq": torch.rand(n)}
    torch.save({"master": torch.randn(n), "optimizer": {"state": {0: moments}}}, tmp_path / "optim_shard_rank0.pt")
    live = [torch.ones(n) for _ in range(3)]  # the live shards, allocated before
    del moments
    gc.collect()
    before = _anonymous_bytes()
    state = read_shard_file(str(tmp_path / "optim_shard_rank0.pt"))
    loaded = state["optimizer"]["state"][0]
    for dst, src in zip(live, (state["master"], loaded["exp_avg"], loaded["exp_avg_sq"]), strict=True):
        dst.copy_(src)
    grown = _anonymous_bytes() - before
    assert grown < 3 * n * 4 / 4, f"{grown / 2**20:.0f} MiB of anonymous memory for {3 * n * 4 / 2**20:.0f} MiB read"
    assert torch.equal(live[0], state["master"]) and live[2].min() >= 0
