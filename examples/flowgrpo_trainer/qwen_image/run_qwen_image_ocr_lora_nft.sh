#!/usr/bin/env bash
# DiffusionNFT on Qwen-Image with a LoRA and the OCR reward, rollouts on vllm-omni (one GPU).
#   QWEN_IMAGE_PATH=/path/to/Qwen-Image bash examples/flowgrpo_trainer/qwen_image/run_qwen_image_ocr_lora_nft.sh [overrides]
# Needs: pip install -e ".[vllm-omni]" on a CUDA machine. Extra Hydra overrides are passed through.
#
# The settings of NVlabs/DiffusionNFT's OCR config (config/nft.py, sd3_ocr) where they apply:
# - no CFG anywhere (rollout, update, validation: pipeline.true_cfg_scale stays 1.0); deterministic ODE rollouts of
#   10 steps by the old policy, which keep only each image's final latent (the sampler's log-probs are not needed);
# - beta=0.1 and decay_type=2 (the old policy follows the trained one for 75 steps, then lags it ever more, up to a
#   decay of 0.999); 9 of the 10 timesteps per image in each update (timestep_fraction=0.99);
# - advantages normalised by the whole batch's std (global_std) and clipped to +-5 (actor.adv_clip_max), a velocity
#   KL of 1e-4 to the base model (actor.kl_coef, the original's train.beta); AdamW lr 3e-4, weight decay 1e-4,
#   gradient clip 1.0; validation with 40 steps.
# Not the original's: 16 images per prompt x 4 prompts per step (it samples 24 x 48 per epoch on 8 GPUs), the same
# images per step as the FlowGRPO recipe (run_qwen_image_ocr_lora.sh) so the two compare; and the FlowGRPO recipe's
# LoRA (rank 64 on Qwen-Image's attention, where the original puts rank 32 on SD3's). The rollout's SDE keys
# (rollout.algo.*) are not used.
set -euo pipefail
: "${QWEN_IMAGE_PATH:?set QWEN_IMAGE_PATH to a local Qwen-Image pipeline directory}"
DATA_DIR=${DATA_DIR:-$HOME/data/qwenimage_ocr}
PYTHON=${PYTHON:-python}

[ -f "$DATA_DIR/train.parquet" ] || "$PYTHON" examples/flowgrpo_trainer/data_process/qwenimage_ocr.py --local_dir "$DATA_DIR"

"$PYTHON" -m verl_omni.trainer.main_flowgrpo \
  algorithm.name=diffusion_nft \
  algorithm.diffusion_nft.beta=0.1 \
  algorithm.diffusion_nft.decay_type=2 \
  algorithm.diffusion_nft.timestep_fraction=0.99 \
  algorithm.diffusion_nft.adv_mode=all \
  algorithm.diffusion_nft.global_std=true \
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
  actor_rollout_ref.actor.optim.weight_decay=1e-4 \
  actor_rollout_ref.actor.kl_coef=1e-4 \
  actor_rollout_ref.actor.adv_clip_max=5.0 \
  actor_rollout_ref.actor.grad_clip=1.0 \
  actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4 \
  actor_rollout_ref.rollout.name=vllm_omni \
  actor_rollout_ref.rollout.device=cuda \
  actor_rollout_ref.rollout.dtype=bfloat16 \
  actor_rollout_ref.rollout.n=16 \
  actor_rollout_ref.rollout.enable_batched_diffusion=True \
  actor_rollout_ref.rollout.gpu_memory_utilization=0.5 \
  actor_rollout_ref.rollout.pipeline.num_inference_steps=10 \
  actor_rollout_ref.rollout.pipeline.height=512 \
  actor_rollout_ref.rollout.pipeline.width=512 \
  actor_rollout_ref.rollout.pipeline.true_cfg_scale=1.0 \
  actor_rollout_ref.rollout.pipeline.max_sequence_length=256 \
  actor_rollout_ref.rollout.val_kwargs.num_inference_steps=40 \
  'reward.rewards=[{name: ocr, weight: 1.0}]' \
  trainer.project_name=verl_omni_diffusion_nft \
  trainer.experiment_name=qwen_image_ocr_lora_nft \
  trainer.logger='[console,tensorboard]' \
  trainer.total_training_steps=300 \
  trainer.save_freq=20 \
  trainer.test_freq=10 \
  "$@"
