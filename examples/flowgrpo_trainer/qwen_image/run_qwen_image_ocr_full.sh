#!/usr/bin/env bash
# FlowGRPO on Qwen-Image training every transformer weight (full fine-tuning) with the OCR reward, rollouts on
# vllm-omni, on 4 GPUs of one node (8 with trainer.n_gpus_per_node=8 data.train_batch_size=64; several nodes with
# RAY_ADDRESS and trainer.nnodes: README).
#   QWEN_IMAGE_PATH=/path/to/Qwen-Image bash examples/flowgrpo_trainer/qwen_image/run_qwen_image_ocr_full.sh [overrides]
# Needs: pip install -e ".[vllm-omni]" on a CUDA machine, and host memory for the optimizer's shards (12 bytes a
# trained weight over the node: 228 GiB; the start-up check refuses a node that cannot hold them). The settings
# (verl-omni's full-weight recipe: no CFG, lr 3e-5, clip 1e-5) live in the preset
# configs/qwen_image_flowgrpo_ocr_full.yaml; extra Hydra overrides are passed through.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../../.." && pwd)
: "${QWEN_IMAGE_PATH:?set QWEN_IMAGE_PATH to a local Qwen-Image pipeline directory}"
DATA_DIR=${DATA_DIR:-$HOME/data/qwenimage_ocr}
PYTHON=${PYTHON:-python}

[ -f "$DATA_DIR/train.parquet" ] || "$PYTHON" "$REPO/examples/flowgrpo_trainer/data_process/qwenimage_ocr.py" --local_dir "$DATA_DIR"

"$PYTHON" -m verl_omni.trainer.main_flowgrpo --config-dir "$REPO/configs" --config-name qwen_image_flowgrpo_ocr_full \
  data.train_files="$DATA_DIR/train.parquet" \
  data.val_files="$DATA_DIR/test.parquet" \
  actor_rollout_ref.model.path="$QWEN_IMAGE_PATH" \
  "$@"
