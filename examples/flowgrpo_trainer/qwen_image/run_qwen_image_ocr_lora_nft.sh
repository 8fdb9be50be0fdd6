#!/usr/bin/env bash
# DiffusionNFT on Qwen-Image with a LoRA and the OCR reward, rollouts on vllm-omni (one GPU).
#   QWEN_IMAGE_PATH=/path/to/Qwen-Image bash examples/flowgrpo_trainer/qwen_image/run_qwen_image_ocr_lora_nft.sh [overrides]
# Needs: pip install -e ".[vllm-omni]" on a CUDA machine. The settings live in the preset
# configs/qwen_image_diffusion_nft_ocr_lora.yaml; extra Hydra overrides are passed through.
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
REPO=$(cd "$(dirname "$0")/../../.." && pwd)
: "${QWEN_IMAGE_PATH:?set QWEN_IMAGE_PATH to a local Qwen-Image pipeline directory}"
DATA_DIR=${DATA_DIR:-$HOME/data/qwenimage_ocr}
PYTHON=${PYTHON:-python}

[ -f "$DATA_DIR/train.parquet" ] || "$PYTHON" "$REPO/examples/flowgrpo_trainer/data_process/qwenimage_ocr.py" --local_dir "$DATA_DIR"

"$PYTHON" -m verl_omni.trainer.main_flowgrpo --config-dir "$REPO/configs" --config-name qwen_image_diffusion_nft_ocr_lora \
  data.train_files="$DATA_DIR/train.parquet" \
  data.val_files="$DATA_DIR/test.parquet" \
  actor_rollout_ref.model.path="$QWEN_IMAGE_PATH" \
  "$@"
