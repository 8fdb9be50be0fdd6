"""The text encoder off the GPU during the hybrid engine's update (``actor_rollout_ref.model.text_encoder_offload``),
on a stand-in whose text encoder has the real Qwen2.5-VL width (3584, 2 layers) so its bytes are visible.

- the diffusers engine's rank, in this process: at the update's first training forward the allocator holds the
  text encoder's bytes fewer than without offload, every encoder weight sits in pinned host memory, and the
  encoder is back on the GPU for the rollout after it;
- both engines through the trainer, offload on and off: the bytes each rank took off (``perf/update_text_encoder_
  offloaded_gb``: for vllm-omni, the CuMem segments it unmapped) against the encoder's size on disk, training in
  every step (the rollout of step 2 ran on the restored encoder), and the seconds moving.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch
from gpu_helpers import requires_cuda, requires_vllm_omni, write_figures

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from helpers import rollout_config, trainer_config  # noqa: E402

pytestmark = [pytest.mark.gpu, requires_cuda]

SIZE = 256


@pytest.fixture(scope="module")
def wide_text_encoder_dir(tmp_path_factory):
    from verl_omni.pipelines.qwen_image.standin import build_qwen_image

    path = tmp_path_factory.mktemp("qwen_image_wide_te")
    return build_qwen_image(str(path), num_layers=2, full_width=True, seed=0, dtype=torch.bfloat16, device="cuda")


def _text_encoder_bytes(model_dir: str) -> int:
    folder = os.path.join(model_dir, "text_encoder")
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder) if f.endswith(".safetensors"))


def _batch(pipe):
    from helpers import records_data_proto

    from verl_omni.config.sampling import DiffusionSamplingParams
    from verl_omni.workers.train_batch import TrainBatch

    params = DiffusionSamplingParams(
        num_inference_steps=4,
        height=SIZE,
        width=SIZE,
        guidance_scale=4.0,
        negative_prompt=" ",
        sde_window_size=2,
        window_start=0,
    )
    record = pipe.rl_generate("a sign that says HELLO", [1, 2, 3, 4], params)
    info = {"raw_prompt": np.array(["a sign"] * 4, dtype=object), "uid": np.array(["g"] * 4, dtype=object)}
    data = records_data_proto([record], info)
    return TrainBatch.from_data_proto(data, torch.tensor([1.0, -1.0, 0.5, -0.5])), params


def test_the_diffusers_rank_frees_the_text_encoder_during_its_update(wide_text_encoder_dir):
    from verl_omni.config.actor import ActorConfig
    from verl_omni.config.model import ModelConfig
    from verl_omni.pipelines.loading import load_rl_pipeline
    from verl_omni.workers.colocated import ColocatedActorRank

    model = ModelConfig(path=wide_text_encoder_dir, lora_rank=8, lora_alpha=16.0, text_encoder_offload=True)
    # The rank recomputes with the rollout's guidance (the batch below: CFG 4 with the negative prompt " ").
    rollout = rollout_config(device="cuda", dtype="bfloat16", pipeline={"true_cfg_scale": 4.0, "negative_prompt": " "})
    actor = ActorConfig(device="cuda", dtype="bfloat16", ppo_micro_batch_size_per_gpu=4)
    pipe = load_rl_pipeline(wide_text_encoder_dir, "qwen_image", "bfloat16", model.lora).to("cuda")
    rank = ColocatedActorRank(pipe, model, actor, rollout, 0, 1, None, "cuda", lora_seed=0)
    offload = rank.text_encoders
    encoder = pipe.text_encoder
    encoder_bytes = sum(p.numel() * p.element_size() for p in encoder.parameters())
    batch, params = _batch(pipe)

    seen = {}

    def at_first_training_forward(module, args):
        if torch.is_grad_enabled() and "allocated" not in seen:
            seen["allocated"] = torch.cuda.memory_allocated()
            seen["encoder_on_host"] = all(p.device.type == "cpu" and p.is_pinned() for p in encoder.parameters())

    hook = pipe.transformer.register_forward_pre_hook(at_first_training_forward)
    figures = {"text_encoder_gb": encoder_bytes / 1e9}
    try:
        for name, setting in (("warm", offload), ("on", offload), ("off", None)):  # warm: compiles, host copies
            seen.clear()
            rank.text_encoders = setting
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            metrics = rank.update(batch.as_dict(), batch.num_terms)
            figures[name] = {
                "allocated_at_first_forward_gb": seen["allocated"] / 1e9,
                "encoder_on_host": seen["encoder_on_host"],
                "peak_gb": torch.cuda.max_memory_allocated() / 1e9,
                "offload_s": metrics["actor/text_encoder_offload_s"],
                "offloaded_gb": metrics["actor/text_encoder_offloaded_gb"],
                "busy_s": metrics["actor/busy_s"],
                "recomputed_blocks": metrics["actor/recomputed_blocks"],
            }
            assert all(p.device.type == "cuda" for p in encoder.parameters())  # back for the next rollout
    finally:
        hook.remove()
    # The host copies: one page-locked buffer of the weights' own size (PyTorch's pinned allocator would round
    # each weight up to a power of two).
    figures["host_copies_gb"], figures["host_copies_pinned"] = offload.arena.nbytes / 1e9, offload.arena.pinned
    write_figures("gpu_text_encoder_offload_diffusers.json", figures)
    num_weights = sum(1 for _ in encoder.parameters())
    assert offload.arena.pinned and encoder_bytes <= offload.arena.nbytes <= encoder_bytes + 512 * num_weights
    on, off = figures["on"], figures["off"]
    assert on["encoder_on_host"] and not off["encoder_on_host"]
    freed = (off["allocated_at_first_forward_gb"] - on["allocated_at_first_forward_gb"]) * 1e9
    assert freed >= 0.99 * encoder_bytes, figures
    assert on["offloaded_gb"] * 1e9 >= encoder_bytes and off["offloaded_gb"] == 0
    pipe.rl_generate("a sign that says HELLO", [5], params)  # the restored encoder serves the rollout


@pytest.mark.parametrize("engine", [pytest.param("vllm_omni", marks=requires_vllm_omni), "diffusers"])
def test_both_engines_train_with_the_text_encoder_off(engine, wide_text_encoder_dir, ocr_data_files, tmp_path):
    from verl_omni.trainer.ray_trainer import FlowGRPOTrainer

    figures = {"engine": engine, "text_encoder_gb": _text_encoder_bytes(wide_text_encoder_dir) / 1e9}
    for setting in (True, False):
        cfg = trainer_config(
            ocr_data_files,
            wide_text_encoder_dir,
            tmp_path / f"{engine}_{setting}",
            **{
                "actor_rollout_ref.hybrid_engine": True,
                "actor_rollout_ref.rollout.name": engine,
                "actor_rollout_ref.rollout.device": "cuda",
                "actor_rollout_ref.rollout.dtype": "bfloat16",
                "actor_rollout_ref.actor.device": "cuda",
                "actor_rollout_ref.actor.dtype": "bfloat16",
                "actor_rollout_ref.model.text_encoder_offload": setting,
                "actor_rollout_ref.rollout.pipeline.height": SIZE,
                "actor_rollout_ref.rollout.pipeline.width": SIZE,
                "actor_rollout_ref.rollout.pipeline.true_cfg_scale": 4.0,
                "actor_rollout_ref.rollout.pipeline.negative_prompt": " ",
                "actor_rollout_ref.rollout.gpu_memory_utilization": 0.5,
                "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu": 4,
                "actor_rollout_ref.actor.optim.lr": 1e-3,
                # No compilation (engine or actor): two trainer starts per engine fit the GPU tests' time limit.
                "actor_rollout_ref.rollout.enforce_eager": True,
                "actor_rollout_ref.actor.use_torch_compile": False,
                "trainer.total_training_steps": 2,
                "trainer.n_gpus_per_node": 1,
            },
        )
        trainer = FlowGRPOTrainer(cfg).init()
        try:
            history = trainer.fit()
        finally:
            trainer.shutdown()
        figures[f"offload_{setting}"] = {
            "offloaded_gb": [h["perf/update_text_encoder_offloaded_gb/rank0"] for h in history],
            "kept_gb": [h["perf/update_text_encoder_kept_gb/rank0"] for h in history],
            "offload_s": [h["timing/update_text_encoder_offload_s/rank0"] for h in history],
            "update_s": [h["timing/update_s"] for h in history],
            "recomputed_blocks": [h["actor/recomputed_blocks"] for h in history],
            "grad_norms": [h["actor/grad_norm"] for h in history],
        }
    write_figures(f"gpu_text_encoder_offload_{engine}.json", figures)
    on, off = figures["offload_True"], figures["offload_False"]
    # Every byte of the encoder is accounted for in every update: off the GPU, or kept in pool segments it shares
    # with other weights (vllm-omni's CuMem pool; none with the diffusers engine). Kept bytes sit at the boundaries
    # of the components' allocations: 15% of this 2-layer encoder's 0.3 GB on an H100 (0.253 GB moved).
    for moved, kept in zip(on["offloaded_gb"], on["kept_gb"], strict=True):
        assert moved + kept >= 0.99 * figures["text_encoder_gb"] and moved >= 0.8 * figures["text_encoder_gb"], figures
    assert engine == "vllm_omni" or on["kept_gb"] == [0.0, 0.0]
    assert off["offloaded_gb"] == [0.0, 0.0] and off["offload_s"] == [0.0, 0.0]
    assert all(g > 0 for g in on["grad_norms"] + off["grad_norms"]), figures
