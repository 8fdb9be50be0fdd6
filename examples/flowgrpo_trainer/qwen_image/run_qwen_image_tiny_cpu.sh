#!/usr/bin/env bash
# CPU demo: the same entry point as the GPU recipe, on a tiny random Qwen-Image built locally (no
# downloads) with the in-process diffusers engine. Two FlowGRPO steps in a few minutes on 2 cores.
#   bash examples/flowgrpo_trainer/qwen_image/run_qwen_image_tiny_cpu.sh [overrides]
set -euo pipefail
cd "$(dirname "$0")/../../.."
PYTHON=${PYTHON:-.venv/bin/python}
OUT=${OUT_DIR:-outputs/tiny_cpu_demo}
DATA_DIR=$OUT/data

"$PYTHON" examples/flowgrpo_trainer/data_process/qwenimage_ocr.py --local_dir "$DATA_DIR" --train_size 32 --test_size 4

"$PYTHON" -m verl_omni.trainer.main_flowgrpo \
  data.train_files="$DATA_DIR/train.parquet" \
  data.val_files="$DATA_DIR/test.parquet" \
  data.train_batch_size=2 \
  actor_rollout_ref.model.path=tiny:qwen_image \
  actor_rollout_ref.model.lora_rank=4 \
  actor_rollout_ref.model.lora_alpha=8 \
  actor_rollout_ref.actor.optim.lr=1e-3 \
  actor_rollout_ref.rollout.name=diffusers \
  actor_rollout_ref.rollout.n=4 \
  actor_rollout_ref.rollout.pipeline.num_inference_steps=6 \
  actor_rollout_ref.rollout.pipeline.height=64 \
  actor_rollout_ref.rollout.pipeline.width=64 \
  actor_rollout_ref.rollout.algo.sde_window_size=2 \
  actor_rollout_ref.rollout.algo.sde_window_range=[0,3] \
  'reward.rewards=[{name: ocr, weight: 1.0}, {name: brightness, weight: 0.5}]' \
  trainer.total_training_steps=2 \
  trainer.save_freq=1 \
  trainer.test_freq=2 \
  trainer.default_local_dir="$OUT/checkpoints" \
  trainer.logger='[console,tensorboard]' \
  "$@"
