#!/usr/bin/env bash
# MixGRPO on Qwen-Image with a LoRA and the OCR reward, rollouts on vllm-omni (one GPU).
#   QWEN_IMAGE_PATH=/path/to/Qwen-Image bash examples/flowgrpo_trainer/qwen_image/run_qwen_image_ocr_lora_mixgrpo.sh [overrides]
# Needs: pip install -e ".[vllm-omni]" on a CUDA machine. Extra Hydra overrides are passed through.
#
# MixGRPO (Tencent-Hunyuan/MixGRPO): SDE steps only in a window of algorithm.mixgrpo.window_size steps that slides
# along the denoising steps as training goes (by `stride` steps every `shift_interval` training steps, back to the
# start past the last trainable step), ODE steps elsewhere; FlowGRPO's clipped loss on the window's transitions.
# With ODE_SOLVER=dpmsolver++ (the default here) it is MixGRPO-Flash: the ODE steps after the window are
# second-order DPM-Solver++ (midpoint) steps on a schedule compressed to 0.4 of its steps. ODE_SOLVER=euler gives
# plain MixGRPO.
#
# From the original's scripts (scripts/finetune/finetune_flux_grpo_MixGRPO*.sh): window (group_size) 4, shift
# interval (iters_per_group) 25 / 20 for Flash, stride (prog_overlap_step) 1 with roll-back, eta (noise_level) 0.7,
# clip_range 1e-4, adv_clip_max 5, no KL, 12 images per prompt, the DPM settings. Not the original's: its 25
# sampling steps at 720x720 on FLUX (here Qwen-Image's 10 steps at 512x512, as the FlowGRPO recipe, so the two are
# compared at equal steps, and a window of 4 of them), its full fine-tuning at lr 1e-5 (here the FlowGRPO recipe's
# LoRA), FLUX's distilled guidance (here Qwen-Image's true CFG 4.0).
set -euo pipefail
: "${QWEN_IMAGE_PATH:?set QWEN_IMAGE_PATH to a local Qwen-Image pipeline directory}"
DATA_DIR=${DATA_DIR:-$HOME/data/qwenimage_ocr}
PYTHON=${PYTHON:-python}
ODE_SOLVER=${ODE_SOLVER:-dpmsolver++}
if [ "$ODE_SOLVER" = "euler" ]; then SHIFT_INTERVAL=25; else SHIFT_INTERVAL=20; fi

[ -f "$DATA_DIR/train.parquet" ] || "$PYTHON" examples/flowgrpo_trainer/data_process/qwenimage_ocr.py --local_dir "$DATA_DIR"

"$PYTHON" -m verl_omni.trainer.main_flowgrpo \
  algorithm.name=mixgrpo \
  algorithm.mixgrpo.window_size=4 \
  algorithm.mixgrpo.shift_interval="$SHIFT_INTERVAL" \
  algorithm.mixgrpo.stride=1 \
  algorithm.mixgrpo.strategy=progressive \
  algorithm.mixgrpo.roll_back=True \
  algorithm.mixgrpo.ode_solver="$ODE_SOLVER" \
  algorithm.mixgrpo.ode_solver_order=2 \
  algorithm.mixgrpo.ode_solver_type=midpoint \
  algorithm.mixgrpo.ode_compress_ratio=0.4 \
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
  actor_rollout_ref.actor.adv_clip_max=5.0 \
  actor_rollout_ref.actor.kl_coef=0.0 \
  actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4 \
  actor_rollout_ref.rollout.name=vllm_omni \
  actor_rollout_ref.rollout.device=cuda \
  actor_rollout_ref.rollout.dtype=bfloat16 \
  actor_rollout_ref.rollout.n=12 \
  actor_rollout_ref.rollout.enable_batched_diffusion=True \
  actor_rollout_ref.rollout.gpu_memory_utilization=0.5 \
  actor_rollout_ref.rollout.algo.noise_level=0.7 \
  actor_rollout_ref.rollout.algo.sde_type=sde \
  actor_rollout_ref.rollout.pipeline.num_inference_steps=10 \
  actor_rollout_ref.rollout.pipeline.height=512 \
  actor_rollout_ref.rollout.pipeline.width=512 \
  actor_rollout_ref.rollout.pipeline.true_cfg_scale=4.0 \
  actor_rollout_ref.rollout.pipeline.negative_prompt=" " \
  actor_rollout_ref.rollout.pipeline.max_sequence_length=256 \
  actor_rollout_ref.rollout.val_kwargs.num_inference_steps=20 \
  'reward.rewards=[{name: ocr, weight: 1.0}]' \
  trainer.project_name=verl_omni_mixgrpo \
  trainer.experiment_name=qwen_image_ocr_lora_mixgrpo \
  trainer.logger='[console,tensorboard]' \
  trainer.total_training_steps=300 \
  trainer.save_freq=20 \
  trainer.test_freq=10 \
  "$@"
