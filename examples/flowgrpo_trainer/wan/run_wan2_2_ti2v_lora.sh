#!/usr/bin/env bash
# FlowGRPO on Wan2.2-TI2V-5B (text-to-video) with a LoRA and the OCR reward on its frames, rollouts on vllm-omni
# (one GPU; more with trainer.n_gpus_per_node=N data.train_batch_size=8N, several nodes with RAY_ADDRESS and
# trainer.nnodes: README).
#   WAN_PATH=/path/to/Wan2.2-TI2V-5B-Diffusers bash examples/flowgrpo_trainer/wan/run_wan2_2_ti2v_lora.sh [overrides]
# Needs: pip install -e ".[vllm-omni]" on a CUDA machine. The settings (verl-omni's Wan2.2 recipe; Wan2.1's recipe
# where it has none) live in the preset configs/wan2_2_ti2v_5b_flowgrpo_lora.yaml; extra Hydra overrides are passed
# through. Sample and validation clips are written as MP4 under trainer.default_local_dir.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../../.." && pwd)
: "${WAN_PATH:?set WAN_PATH to a local Wan2.2-TI2V-5B-Diffusers pipeline directory}"
DATA_DIR=${DATA_DIR:-$HOME/data/qwenimage_ocr}
PYTHON=${PYTHON:-python}

[ -f "$DATA_DIR/train.parquet" ] || "$PYTHON" "$REPO/examples/flowgrpo_trainer/data_process/qwenimage_ocr.py" --local_dir "$DATA_DIR"

"$PYTHON" -m verl_omni.trainer.main_flowgrpo --config-dir "$REPO/configs" --config-name wan2_2_ti2v_5b_flowgrpo_lora \
  data.train_files="$DATA_DIR/train.parquet" \
  data.val_files="$DATA_DIR/test.parquet" \
  actor_rollout_ref.model.path="$WAN_PATH" \
  "$@"
