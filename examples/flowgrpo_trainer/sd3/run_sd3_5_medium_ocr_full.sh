#!/usr/bin/env bash
# FlowGRPO on Stable Diffusion 3.5 Medium training every transformer weight (full fine-tuning) with the OCR reward,
# rollouts on vllm-omni (one GPU; more with trainer.n_gpus_per_node=N data.train_batch_size=2N, which also shards the
# optimizer over the GPUs; several nodes with RAY_ADDRESS and trainer.nnodes: README).
#   SD3_PATH=/path/to/stable-diffusion-3.5-medium bash examples/flowgrpo_trainer/sd3/run_sd3_5_medium_ocr_full.sh [overrides]
# Needs: pip install -e ".[vllm-omni]" on a CUDA machine. The settings (the LoRA recipe's, with lora_rank=0, lr 3e-5,
# no KL term and 8 images per VAE decode) live in the preset configs/sd3_5_medium_flowgrpo_ocr_full.yaml; extra Hydra overrides are passed
# through, e.g. actor_rollout_ref.actor.optimizer_offload=true (the optimizer in host memory: README's table).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../../.." && pwd)
: "${SD3_PATH:?set SD3_PATH to a local stable-diffusion-3.5-medium pipeline directory}"
DATA_DIR=${DATA_DIR:-$HOME/data/qwenimage_ocr}
PYTHON=${PYTHON:-python}

[ -f "$DATA_DIR/train.parquet" ] || "$PYTHON" "$REPO/examples/flowgrpo_trainer/data_process/qwenimage_ocr.py" --local_dir "$DATA_DIR"

"$PYTHON" -m verl_omni.trainer.main_flowgrpo --config-dir "$REPO/configs" --config-name sd3_5_medium_flowgrpo_ocr_full \
  data.train_files="$DATA_DIR/train.parquet" \
  data.val_files="$DATA_DIR/test.parquet" \
  actor_rollout_ref.model.path="$SD3_PATH" \
  "$@"
