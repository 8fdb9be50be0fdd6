#!/usr/bin/env bash
# CPU demo: the same entry point as the GPU recipe, on a tiny random Qwen-Image built locally (no downloads)
# with the in-process diffusers engine. About 2-3 minutes on 2 cores; the reward visibly rises.
#   bash examples/flowgrpo_trainer/qwen_image/run_qwen_image_tiny_cpu.sh [overrides]
#
# What it learns, honestly: the model is random, so it cannot render text and the OCR reward of the GPU recipe
# (run_qwen_image_ocr_lora.sh) would stay at 0.0 here. The demo trains on the `brightness` reward instead (mean
# pixel value in [0, 1]): a random model can move it, so the run shows FlowGRPO doing its job. It keeps the OCR
# prompts so the data pipeline is the GPU recipe's.
#
# Why these settings (measured on 2 cores; the CI learning check in tests/test_trainer.py runs this recipe, shorter):
# - LoRA on the output path (attention out, image MLP out, final AdaLN modulation, output projection): these
#   layers can shift the predicted velocity, hence the image, directly. The GPU recipe's to_q/to_k/to_v/to_out.0
#   targets barely move this tiny model's images (+0.001..+0.003 in 20 steps, against +0.014..+0.020 with these).
# - algo.noise_level=1.5: more exploration in the SDE window, so more of the reward's spread within a group
#   comes from the actions the policy is graded on. At 0.7 the gain varied 0.004-0.023 across seeds; at 1.5 it was
#   0.077-0.083. Validation still samples without noise (val_kwargs.noise_level=0).
# - n=8 images per prompt: a steadier group baseline than 4. lr 2e-2 (3e-2 was unstable). 40 steps.
# - max_sequence_length=128: the longest demo prompt is 91 tokens with the tiny byte-level tokenizer; nothing is
#   truncated.
#
# Other algorithms (docs/algorithms.md): pass algorithm.name=<name> and the overrides given here for it.
# - DiffusionNFT: algorithm.name=diffusion_nft actor_rollout_ref.actor.optim.lr=3e-2 (it samples without noise or
#   CFG, so rollout.algo.* is unused). Its group spread comes from the initial noise alone; at lr 2e-2 the reward
#   rose only 3.3-4.5 x the step-1 std in 20 steps, at 3e-2 5.6-8.7 x in 24 (two seeds), 5e-2 overshot on one.
#   The whole demo at 3e-2 (40 steps): +0.025, 11.8 x; validation 0.546 at step 20, 0.561 at step 40.
set -euo pipefail
cd "$(dirname "$0")/../../.."
PYTHON=${PYTHON:-.venv/bin/python}
OUT=${OUT_DIR:-outputs/tiny_cpu_demo}
DATA_DIR=$OUT/data
# transformers' weight-loading bars are noise for a 3 MB model and garble log files.
export HF_HUB_DISABLE_PROGRESS_BARS=${HF_HUB_DISABLE_PROGRESS_BARS:-1}

"$PYTHON" examples/flowgrpo_trainer/data_process/qwenimage_ocr.py --local_dir "$DATA_DIR" --train_size 256 --test_size 4

"$PYTHON" -m verl_omni.trainer.main_flowgrpo \
  data.train_files="$DATA_DIR/train.parquet" \
  data.val_files="$DATA_DIR/test.parquet" \
  data.train_batch_size=2 \
  data.val_batch_size=4 \
  actor_rollout_ref.model.path=tiny:qwen_image \
  actor_rollout_ref.model.lora_rank=4 \
  actor_rollout_ref.model.lora_alpha=8 \
  'actor_rollout_ref.model.target_modules=[to_out.0,img_mlp.net.2,norm_out.linear,proj_out]' \
  actor_rollout_ref.actor.optim.lr=2e-2 \
  actor_rollout_ref.rollout.name=diffusers \
  actor_rollout_ref.rollout.n=8 \
  actor_rollout_ref.rollout.pipeline.num_inference_steps=6 \
  actor_rollout_ref.rollout.pipeline.height=64 \
  actor_rollout_ref.rollout.pipeline.width=64 \
  actor_rollout_ref.rollout.pipeline.max_sequence_length=128 \
  actor_rollout_ref.rollout.algo.noise_level=1.5 \
  actor_rollout_ref.rollout.algo.sde_window_size=2 \
  actor_rollout_ref.rollout.algo.sde_window_range=[0,3] \
  'reward.rewards=[{name: brightness, weight: 1.0}]' \
  trainer.total_training_steps=40 \
  trainer.save_freq=10 \
  trainer.test_freq=20 \
  trainer.default_local_dir="$OUT/checkpoints" \
  trainer.logger='[console,tensorboard]' \
  "$@"
