#!/usr/bin/env bash
# FlowGRPO on FLUX.1-dev with a LoRA and the OCR reward, rollouts on vllm-omni (one GPU; more with
# trainer.n_gpus_per_node=N data.train_batch_size=2N, several nodes with RAY_ADDRESS and trainer.nnodes: README).
#   FLUX_PATH=/path/to/FLUX.1-dev bash examples/flowgrpo_trainer/flux/run_flux_ocr_lora.sh [overrides]
# Needs: pip install -e ".[vllm-omni]" on a CUDA machine. The settings (flow_grpo's FLUX ones) live in the preset
# configs/flux_flowgrpo_ocr_lora.yaml; extra Hydra overrides are passed through.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../../.." && pwd)
: "${FLUX_PATH:?set FLUX_PATH to a local FLUX.1-dev pipeline directory}"
DATA_DIR=${DATA_DIR:-$HOME/data/qwenimage_ocr}
PYTHON=${PYTHON:-python}

[ -f "$DATA_DIR/train.parquet" ] || "$PYTHON" "$REPO/examples/flowgrpo_trainer/data_process/qwenimage_ocr.py" --local_dir "$DATA_DIR"

"$PYTHON" -m verl_omni.trainer.main_flowgrpo --config-dir "$REPO/configs" --config-name flux_flowgrpo_ocr_lora \
  data.train_files="$DATA_DIR/train.parquet" \
  data.val_files="$DATA_DIR/test.parquet" \
  actor_rollout_ref.model.path="$FLUX_PATH" \
  "$@"
