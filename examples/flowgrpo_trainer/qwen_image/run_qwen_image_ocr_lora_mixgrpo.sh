#!/usr/bin/env bash
# MixGRPO on Qwen-Image with a LoRA and the OCR reward, rollouts on vllm-omni (one GPU).
#   QWEN_IMAGE_PATH=/path/to/Qwen-Image bash examples/flowgrpo_trainer/qwen_image/run_qwen_image_ocr_lora_mixgrpo.sh [overrides]
# Needs: pip install -e ".[vllm-omni]" on a CUDA machine. The settings live in the preset
# configs/qwen_image_mixgrpo_ocr_lora.yaml (it says where each comes from); extra Hydra overrides are passed through.
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
REPO=$(cd "$(dirname "$0")/../../.." && pwd)
: "${QWEN_IMAGE_PATH:?set QWEN_IMAGE_PATH to a local Qwen-Image pipeline directory}"
DATA_DIR=${DATA_DIR:-$HOME/data/qwenimage_ocr}
PYTHON=${PYTHON:-python}
ODE_SOLVER=${ODE_SOLVER:-dpmsolver++}
# Plain MixGRPO moves its window every 25 training steps, MixGRPO-Flash (the preset) every 20.
if [ "$ODE_SOLVER" = "euler" ]; then SHIFT_INTERVAL=25; else SHIFT_INTERVAL=20; fi

[ -f "$DATA_DIR/train.parquet" ] || "$PYTHON" "$REPO/examples/flowgrpo_trainer/data_process/qwenimage_ocr.py" --local_dir "$DATA_DIR"

"$PYTHON" -m verl_omni.trainer.main_flowgrpo --config-dir "$REPO/configs" --config-name qwen_image_mixgrpo_ocr_lora \
  data.train_files="$DATA_DIR/train.parquet" \
  data.val_files="$DATA_DIR/test.parquet" \
  actor_rollout_ref.model.path="$QWEN_IMAGE_PATH" \
  algorithm.mixgrpo.ode_solver="$ODE_SOLVER" \
  algorithm.mixgrpo.shift_interval="$SHIFT_INTERVAL" \
  "$@"
