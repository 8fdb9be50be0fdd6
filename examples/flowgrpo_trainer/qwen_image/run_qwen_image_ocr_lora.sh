#!/usr/bin/env bash
# FlowGRPO on Qwen-Image with a LoRA and the OCR reward, rollouts on vllm-omni (one GPU).
#   QWEN_IMAGE_PATH=/path/to/Qwen-Image bash examples/flowgrpo_trainer/qwen_image/run_qwen_image_ocr_lora.sh [overrides]
# Needs: pip install -e ".[vllm-omni]" on a CUDA machine. Extra Hydra overrides are passed through.
set -euo pipefail
: "${QWEN_IMAGE_PATH:?set QWEN_IMAGE_PATH to a local Qwen-Image pipeline directory}"
DATA_DIR=${DATA_DIR:-$HOME/data/qwenimage_ocr}
PYTHON=${PYTHON:-python}

[ -f "$DATA_DIR/train.parquet" ] || "$PYTHON" examples/flowgrpo_trainer/data_process/qwenimage_ocr.py --local_dir "$DATA_DIR"

# The actor recomputes only the transformer blocks memory requires (model.gradient_checkpointing_blocks=auto, the
# default: measured in the first update): 27-29 of the 60 on one 80 GB H100 (update 14.9 s, step 37.3 s, peak
# 73.8 GB), none on a 141 GB H200 (update 12.0 s, step 33.3 s); docs/benchmarks/e2e_single_gpu.json. A number
# fixes it (60 or null: every block, the least memory).
"$PYTHON" -m verl_omni.trainer.main_flowgrpo \
  data.train_files="$DATA_DIR/train.parquet" \
  data.val_files="$DATA_DIR/test.parquet" \
  data.train_batch_size=4 \
  actor_rollout_ref.model.path="$QWEN_IMAGE_PATH" \
  actor_rollout_ref.model.pipeline=qwen_image \
  actor_rollout_ref.model.lora_rank=64 \
  actor_rollout_ref.model.lora_alpha=128 \
  actor_rollout_ref.actor.device=cuda \
  actor_rollout_ref.actor.dtype=bfloat16 \
  actor_rollout_ref.actor.optim.lr=3e-4 \
  actor_rollout_ref.actor.clip_ratio=1e-4 \
  actor_rollout_ref.actor.kl_coef=0.0 \
  actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4 \
  actor_rollout_ref.rollout.name=vllm_omni \
  actor_rollout_ref.rollout.device=cuda \
  actor_rollout_ref.rollout.dtype=bfloat16 \
  actor_rollout_ref.rollout.n=16 \
  actor_rollout_ref.rollout.enable_batched_diffusion=True \
  actor_rollout_ref.rollout.gpu_memory_utilization=0.5 \
  actor_rollout_ref.rollout.algo.noise_level=1.2 \
  actor_rollout_ref.rollout.algo.sde_type=sde \
  actor_rollout_ref.rollout.algo.sde_window_size=2 \
  actor_rollout_ref.rollout.algo.sde_window_range=[0,5] \
  actor_rollout_ref.rollout.pipeline.num_inference_steps=10 \
  actor_rollout_ref.rollout.pipeline.height=512 \
  actor_rollout_ref.rollout.pipeline.width=512 \
  actor_rollout_ref.rollout.pipeline.true_cfg_scale=4.0 \
  actor_rollout_ref.rollout.pipeline.negative_prompt=" " \
  actor_rollout_ref.rollout.pipeline.max_sequence_length=256 \
  actor_rollout_ref.rollout.val_kwargs.num_inference_steps=20 \
  'reward.rewards=[{name: ocr, weight: 1.0}]' \
  trainer.project_name=verl_omni_flowgrpo \
  trainer.experiment_name=qwen_image_ocr_lora \
  trainer.logger='[console,tensorboard]' \
  trainer.total_training_steps=300 \
  trainer.save_freq=20 \
  trainer.test_freq=10 \
  "$@"
