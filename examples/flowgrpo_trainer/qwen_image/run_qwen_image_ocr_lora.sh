#!/usr/bin/env bash
# FlowGRPO on Qwen-Image with a LoRA and the OCR reward, rollouts on vllm-omni (one GPU; more with
# trainer.n_gpus_per_node=N data.train_batch_size=2N, several nodes with RAY_ADDRESS and trainer.nnodes: README).
#   QWEN_IMAGE_PATH=/path/to/Qwen-Image bash examples/flowgrpo_trainer/qwen_image/run_qwen_image_ocr_lora.sh [overrides]
# Needs: pip install -e ".[vllm-omni]" on a CUDA machine. The settings live in the preset
# configs/qwen_image_flowgrpo_ocr_lora.yaml; extra Hydra overrides are passed through.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../../.." && pwd)
: "${QWEN_IMAGE_PATH:?set QWEN_IMAGE_PATH to a local Qwen-Image pipeline directory}"
DATA_DIR=${DATA_DIR:-$HOME/data/qwenimage_ocr}
PYTHON=${PYTHON:-python}

[ -f "$DATA_DIR/train.parquet" ] || "$PYTHON" "$REPO/examples/flowgrpo_trainer/data_process/qwenimage_ocr.py" --local_dir "$DATA_DIR"

"$PYTHON" -m verl_omni.trainer.main_flowgrpo --config-dir "$REPO/configs" --config-name qwen_image_flowgrpo_ocr_lora \
  data.train_files="$DATA_DIR/train.parquet" \
  data.val_files="$DATA_DIR/test.parquet" \
  actor_rollout_ref.model.path="$QWEN_IMAGE_PATH" \
  "$@"
