#!/usr/bin/env bash
# GPU end to end: a short FlowGRPO run with rollout.name=vllm_omni, then the same with the diffusers engine.
# On the device after `. .device/cN/install.sh`, from the repo root:  bash scripts/device/run_e2e.sh
# Writes $OUT/e2e_<engine>.log, $OUT/metrics_<engine>.jsonl (every metric of every step) and $OUT/e2e_summary.json
# (the step's seconds, reward and grad norm per engine).
set -uo pipefail
OUT="${OUT:-$PWD/outputs/device}"; mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false RAY_DEDUP_LOGS=0
WORK=${E2E_WORK:-/tmp/verl_omni_e2e}
STEPS=${E2E_STEPS:-4}
mkdir -p "$WORK"
# rapidocr is not in the device bundle: the GPU run scores brightness + JPEG (set E2E_REWARDS to change)
REWARDS=${E2E_REWARDS:-"[{name: brightness, weight: 1.0}, {name: jpeg_compressibility, weight: 0.1}]"}
python3 examples/flowgrpo_trainer/data_process/qwenimage_ocr.py --local_dir "$WORK/data" --train_size 64 --test_size 4
# bf16 on disk, as vllm-omni expects (a float32 text encoder breaks its bf16 transformer)
python3 -c "import torch; from verl_omni.pipelines.qwen_image.standin import build_tiny_qwen_image as b; b('$WORK/model', seed=0, dtype=torch.bfloat16)"
rc=0
for engine in ${E2E_ENGINES:-vllm_omni diffusers}; do
  VERL_FILE_LOGGER_PATH="$OUT/metrics_$engine.jsonl" timeout "${E2E_TIMEOUT_S:-240}" python3 -m verl_omni.trainer.main_flowgrpo \
    data.train_files="$WORK/data/train.parquet" data.val_files="$WORK/data/test.parquet" data.train_batch_size=2 \
    actor_rollout_ref.model.path="$WORK/model" actor_rollout_ref.model.lora_rank=8 actor_rollout_ref.model.lora_alpha=16 \
    actor_rollout_ref.actor.device=cuda actor_rollout_ref.actor.dtype=bfloat16 actor_rollout_ref.actor.optim.lr=1e-3 \
    actor_rollout_ref.rollout.name=$engine actor_rollout_ref.rollout.device=cuda actor_rollout_ref.rollout.dtype=bfloat16 \
    actor_rollout_ref.rollout.enforce_eager=True actor_rollout_ref.rollout.gpu_memory_utilization=0.3 \
    actor_rollout_ref.rollout.n=8 actor_rollout_ref.rollout.pipeline.num_inference_steps=10 \
    actor_rollout_ref.rollout.pipeline.height=128 actor_rollout_ref.rollout.pipeline.width=128 \
    actor_rollout_ref.rollout.algo.sde_window_size=2 actor_rollout_ref.rollout.algo.sde_window_range=[0,5] \
    "reward.rewards=$REWARDS" \
    trainer.total_training_steps=$STEPS trainer.save_freq=$STEPS trainer.test_freq=-1 trainer.logger=[console,file] \
    trainer.default_local_dir="$WORK/run_$engine" trainer.resume_mode=overwrite \
    2>&1 | tee "$OUT/e2e_$engine.log"
  s=${PIPESTATUS[0]}; echo "exit code ($engine): $s" | tee -a "$OUT/e2e_$engine.log"; [ "$s" = 0 ] || rc=$s
done
python3 - "$OUT" <<'PY'
import json, sys, glob, os
out = sys.argv[1]; summary = {}
keys = ("timing/step_s", "timing/rollout_s", "timing/update_s", "timing/sync_s", "reward/total/mean",
        "perf/img_per_s_rollout", "actor/grad_norm")
for path in glob.glob(os.path.join(out, "metrics_*.jsonl")):  # verl's file logger: {"step": n, "data": {...}}
    engine = os.path.basename(path)[len("metrics_"):-len(".jsonl")]
    records = [json.loads(line) for line in open(path) if line.strip()]
    summary[engine] = [{"step": r["step"], **{k: r["data"][k] for k in keys if k in r["data"]}}
                       for r in records if "timing/step_s" in r["data"]]
json.dump(summary, open(os.path.join(out, "e2e_summary.json"), "w"), indent=1)
print(json.dumps(summary, indent=1))
PY
exit $rc
