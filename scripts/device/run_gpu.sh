#!/usr/bin/env bash
# The one GPU entry point: on the device, after `. .device/cN/install.sh`, from the repo root:
#   bash scripts/device/run_gpu.sh [tests|bench|probe|build|all]      (default: all = tests + bench)
# - tests: pytest -m gpu tests/gpu   -> $OUT/gpu_test_log.txt (+ $OUT/gpu_sleep_wake.json etc. from the tests)
# - bench: benchmarks/rollout_throughput.py -> $OUT/rollout_throughput.json + $OUT/bench_log.txt
# - probe: benchmarks/pipeline_breakdown.py (in-process variants, stage times, kernel profile) -> $OUT/breakdown.json
# - build: only write the random full-width model of BENCH_LAYERS layers (e.g. 60 while the tests run)
# Knobs (environment): BENCH_LAYERS (default 20), BENCH_STEPS (10), BENCH_REPEATS (3), BENCH_PATHS (all).
# Our package travels with the working tree: PYTHONPATH=$PWD makes it importable (no pip install needed).
set -uo pipefail
what="${1:-all}"
OUT="${OUT:-$PWD/outputs/device}"; mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export VERL_OMNI_GPU_OUT="$OUT"
rc=0

{
  echo "== $(date -u +%FT%TZ) run_gpu.sh $what on $(hostname)"
  nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv,noheader
  python3 -c "import torch, vllm, vllm_omni, diffusers, transformers; import verl_omni; \
print('torch', torch.__version__, '| vllm', vllm.__version__, '| vllm-omni', vllm_omni.__version__, \
'| diffusers', diffusers.__version__, '| transformers', transformers.__version__, '| verl_omni import ok')"
  df -h /tmp | tail -1
} 2>&1 | tee "$OUT/env.txt"

if [ "$what" = all ] || [ "$what" = tests ]; then
  timeout "${TESTS_TIMEOUT_S:-330}" python3 -m pytest -m gpu tests/gpu -v -s -p no:cacheprovider --timeout=300 \
    2>&1 | tee "$OUT/gpu_test_log.txt"
  t=${PIPESTATUS[0]}; echo "pytest exit code: $t" | tee -a "$OUT/gpu_test_log.txt"; [ "$t" = 0 ] || rc=$t
fi

if [ "$what" = all ] || [ "$what" = bench ]; then
  timeout "${BENCH_TIMEOUT_S:-560}" python3 benchmarks/rollout_throughput.py \
    --layers "${BENCH_LAYERS:-20}" --steps "${BENCH_STEPS:-10}" --repeats "${BENCH_REPEATS:-3}" \
    --paths "${BENCH_PATHS:-a,b,c,d,e}" --model-dir "${BENCH_MODEL_DIR:-/tmp/verl_omni_models}" \
    --out "$OUT/rollout_throughput.json" 2>&1 | tee "$OUT/bench_log.txt"
  b=${PIPESTATUS[0]}; echo "benchmark exit code: $b" | tee -a "$OUT/bench_log.txt"; [ "$b" = 0 ] || rc=$b
fi
if [ "$what" = probe ]; then
  timeout "${PROBE_TIMEOUT_S:-400}" python3 benchmarks/pipeline_breakdown.py --layers "${BENCH_LAYERS:-20}" \
    --steps "${BENCH_STEPS:-10}" --variants "${PROBE_VARIANTS:-eager_sdpa,compiled_sdpa,compiled_flash}" \
    --model-dir "${BENCH_MODEL_DIR:-/tmp/verl_omni_models}" --out "$OUT/breakdown.json" 2>&1 \
    | grep -v "truncated to max_sequence_length" | tee "$OUT/probe_log.txt"
  p=${PIPESTATUS[0]}; echo "probe exit code: $p" | tee -a "$OUT/probe_log.txt"; [ "$p" = 0 ] || rc=$p
fi

if [ "$what" = build ]; then
  python3 -c "import sys; sys.path.insert(0, 'benchmarks'); from rollout_throughput import build_model; \
build_model('${BENCH_MODEL_DIR:-/tmp/verl_omni_models}', ${BENCH_LAYERS:-20})" 2>&1 | tail -3 | tee "$OUT/build_log.txt"
  rc=${PIPESTATUS[0]}
fi
exit $rc
