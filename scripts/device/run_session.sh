#!/usr/bin/env bash
# The GPU measurements of issues 15-17 in a few calls on one machine (after `. .device/cN/install.sh` or
# `. /tmp/env.sh`), from the repo root. Each stage runs its jobs in parallel on disjoint GPUs (CUDA_VISIBLE_DEVICES)
# and waits for them; logs and JSON go to $OUT. Stages:
#   prep    : (4 GPUs) the 60-layer build | rewards_scale | the CFG-batching, engine and 2-GPU hybrid tests
#   tests   : pytest -m gpu tests/gpu (engine, faults, hybrid engine both engines, CFG batching, reward models)
#   bench   : [build the 60-layer model -> train_step L60 on GPU 0] | [build L20 -> train_step L20 on GPU 1]
#             | [rewards_scale on GPU 2]   (when the machine has 3+ GPUs; else one after the other on GPU 0)
#   e2e1    : e2e L60: 1 GPU vllm_omni (GPU 0) | 1 GPU diffusers (GPU 1) | 2 GPUs vllm_omni (GPUs 2,3)
#   e2e4    : e2e L60, 4 GPUs, vllm_omni           e2e4d: the same with the diffusers engine
#   real1   : one GPU: build the 60-layer model, then train_step L60 ($TRAIN_VARIANTS)
#   prep2   : (4 GPUs) the 60-layer build (cores 32-63) | train_step L20 (GPU 0) | CFG + engine GPU tests (GPU 1)
#   mix1    : (4 GPUs) e2e L60 on one GPU each: vllm_omni (GPU 0) | diffusers (GPU 1) | vllm_omni with the rollout's
#             CFG as two forwards (GPU 2) | train_step L60 (GPU 3)
#   prep3   : (4 GPUs) the 60-layer build | train_step L20, CFG layouts (GPU 0) | attention kernels + CFG/engine
#             GPU tests (GPU 1) | the 2-GPU hybrid-engine test (GPUs 2,3)
#   mix2    : (4 GPUs) e2e L60 vllm_omni on 1 GPU (GPU 0) | on 2 GPUs (GPUs 1,2) | train_step L60 (GPU 3)
#   prep4   : (2+ GPUs) the 60-layer build | train_step L20, checkpointing auto / none (GPU 0) | CFG + engine GPU
#             tests (GPU 1)
#   mix3    : (2 GPUs) e2e L60 vllm_omni at micro-batch 2 (GPU 0) | train_step L60, checkpointing auto / none (GPU 1)
#   mix4    : (2 GPUs) e2e L60 diffusers at micro-batch 2 (GPU 0) | vllm_omni, micro-batch 4, every block recomputed
#             (GPU 1)
#   g1 / g1d: one GPU: e2e L60 with vllm_omni / diffusers
#   cmp1    : one GPU: the compiled actor's graphs over every text length | the actor's SDPA backends
#   vgap    : one GPU: the actor's update at 20 layers in a plain process, then in one that imported vllm
#   b60     : one GPU: the 60-layer build, then the actor's SDPA-backend GPU test (cuDNN attention where vllm switched it off)
#   b60c    : one GPU: the 60-layer build, then the CFG-batching and vllm-omni engine GPU tests
#   probe60 : one GPU: the 60-layer build | the GELU-epilogue, q/k-kernel and no-sync GPU tests, then pipeline_breakdown of the recipe's
#             rollout call (CFG 4, LoRA r64)
# A build that runs alone (before a stage's GPU jobs) draws the weights on the GPU; one beside other jobs, on the CPU.
# Knobs: E2E_STEPS (3), E2E_LAYERS (60), E2E_REWARDS (ocr), MODEL_DIR (/tmp/verl_omni_models), E2E_ARGS (added
# to every e2e run, e.g. "--name x --set actor_rollout_ref.actor.batch_cfg=auto"), PROBE_VARIANTS / PROBE_REPEATS /
# PROBE_GPU_TEST (probe60: 0 leaves out its GPU tests) / PROBE_TIMEOUT (seconds for pipeline_breakdown, 420) /
# PROBE_LAYERS (60; 20 for a quick check, the files keep the L60 name).
set -uo pipefail
stage="${1:?usage: run_session.sh prep|prep2|prep3|prep4|mix1|mix2|mix3|mix4|tests|bench|e2e1|e2e4|e2e4d|real1|g1|g1d|b60|b60c|cmp1|vgap|probe60}"
OUT="${OUT:-$PWD/outputs/device}"; mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false RAY_DEDUP_LOGS=0
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export VERL_OMNI_GPU_OUT="$OUT"
MODEL_DIR="${MODEL_DIR:-/tmp/verl_omni_models}"
STEPS="${E2E_STEPS:-3}"; LAYERS="${E2E_LAYERS:-60}"; REWARDS="${E2E_REWARDS:-ocr}"
gpus=$(nvidia-smi --query-gpu=index --format=csv,noheader | wc -l)
echo "== $(date -u +%FT%TZ) run_session.sh $stage on $(hostname): $gpus GPU(s)" | tee -a "$OUT/session.txt"
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader | tee -a "$OUT/session.txt"

build() {  # build the random full-width model of $1 layers once (idempotent), on cores $2 (default: all), drawing
  # the weights on device $3 (default cpu; cuda where the GPU is free then: 22 s for 20 layers on an H200, where
  # the CPU spends 46 s on the transformer's random fills alone; a failed GPU build falls back to the CPU, logged)
  ${2:+taskset -c $2} python3 -c "import sys; sys.path.insert(0, 'benchmarks'); from bench_common import build_model; \
build_model('$MODEL_DIR', $1, device='${3:-cpu}')"
}
# train_step variants of prep2 / mix1: the float32-LoRA baseline, the default, fewer checkpointed blocks, mb8
TRAIN_SET="ckpt_mb4_eager,ckpt_mb4_eager_lora_f32,default,compiled_ckpt75_mb4,compiled_ckpt50_mb4,compiled_ckpt_mb8"
# prep3 / mix2: CFG as one masked forward vs two unmasked ones (SDPA flash), with every / 45 / 30 of 60 blocks
# recomputed
CFG_SET="default,two_forwards,compiled_ckpt75_mb4,two_forwards_ckpt75,compiled_ckpt50_mb4,two_forwards_ckpt50"
# prep4 / mix3: model.gradient_checkpointing_blocks=auto (the default) at micro-batch 4 and 2, against every block
# recomputed (the default before) and micro-batches of 1-2 rows that keep every block
NOCKPT_SET="ckpt_all_mb4,default,auto_mb2,nockpt_mb2,nockpt_mb1,ckpt25_mb2"
train_step() {  # train_step <gpu> <layers> <variants> <timeout s> [cores]: one run of benchmarks/train_step.py
  CUDA_VISIBLE_DEVICES=$1 ${5:+taskset -c $5} timeout "$4" python3 benchmarks/train_step.py --layers "$2" --repeats 1 \
    --variants "$3" --model-dir "$MODEL_DIR" --out "$OUT/train_step_L$2.json" > "$OUT/train_step_L$2.log" 2>&1
  echo "train_step L$2 exit $?" | tee -a "$OUT/session.txt"
}
e2e() {  # e2e <visible gpus> <n gpus> <engine> <log name> [--name N --set KEY=VALUE ...]; $E2E_ARGS: to every run
  CUDA_VISIBLE_DEVICES=$1 timeout 560 python3 benchmarks/e2e_step.py --layers "$LAYERS" --gpus "$2" --engine "$3" \
    --steps "$STEPS" --rewards "$REWARDS" --model-dir "$MODEL_DIR" --work-dir "/tmp/e2e_$4" \
    --out "$OUT/e2e_runs_$4.json" "${@:5}" ${E2E_ARGS:-} > "$OUT/e2e_$4.log" 2>&1
  echo "e2e $4 exit code $?" | tee -a "$OUT/session.txt"
}
gpu_tests() {  # gpu_tests <visible gpus> <cores> <timeout s> <name> <pytest args...>: log in $OUT/gpu_tests_<name>.log
  CUDA_VISIBLE_DEVICES=$1 taskset -c "$2" timeout "$3" python3 -m pytest -m gpu -v -s -p no:cacheprovider "${@:5}" \
    > "$OUT/gpu_tests_$4.log" 2>&1
  echo "gpu tests $4 exit $?" | tee -a "$OUT/session.txt"
}
build_logged() {  # build_logged <layers> <cores> [device]: a stage's build, its log in $OUT/build.log
  build "$1" "$2" "${3:-cpu}" > "$OUT/build.log" 2>&1
  echo "build L$1 exit $?" | tee -a "$OUT/session.txt"
}
CFG_ENGINE_TESTS=(tests/gpu/test_cfg_batching_gpu.py tests/gpu/test_vllm_omni_engine_gpu.py)

case "$stage" in
  tests)
    timeout 570 python3 -m pytest -m gpu tests/gpu -v -s -p no:cacheprovider --timeout=400 2>&1 \
      | tee "$OUT/gpu_test_log.txt" | grep -E "PASSED|FAILED|SKIPPED|ERROR|passed|failed|figures" ;;
  bench)
    if [ "$gpus" -ge 3 ]; then
      (build 60 && CUDA_VISIBLE_DEVICES=0 timeout 540 python3 benchmarks/train_step.py --layers 60 --prompts 1 \
        --model-dir "$MODEL_DIR" --out "$OUT/train_step_L60.json" > "$OUT/train_step_L60.log" 2>&1;
        echo "train_step L60 exit $?" | tee -a "$OUT/session.txt") &
      (build 20 && CUDA_VISIBLE_DEVICES=1 timeout 540 python3 benchmarks/train_step.py --layers 20 \
        --model-dir "$MODEL_DIR" --out "$OUT/train_step_L20.json" > "$OUT/train_step_L20.log" 2>&1;
        echo "train_step L20 exit $?" | tee -a "$OUT/session.txt") &
      (CUDA_VISIBLE_DEVICES=2 timeout 400 python3 benchmarks/rewards_scale.py --out "$OUT/rewards_scale.json" \
        > "$OUT/rewards_scale.log" 2>&1; echo "rewards_scale exit $?" | tee -a "$OUT/session.txt") &
      wait
    else
      build 60 && timeout 540 python3 benchmarks/train_step.py --layers 60 --prompts 1 --model-dir "$MODEL_DIR" \
        --out "$OUT/train_step_L60.json" > "$OUT/train_step_L60.log" 2>&1
      echo "train_step L60 exit $?" | tee -a "$OUT/session.txt"
    fi ;;
  prep)  # 4 GPUs, 64 cores: the 60-layer build (cores 32-63) | rewards_scale (GPU 0, cores 0-19)
         # | CFG-batching + engine tests (GPU 1) | the 2-GPU hybrid test (GPUs 2,3)
    build_logged 60 32-63 &
    (CUDA_VISIBLE_DEVICES=0 taskset -c 0-19 timeout 420 python3 benchmarks/rewards_scale.py \
      --out "$OUT/rewards_scale.json" > "$OUT/rewards_scale.log" 2>&1; echo "rewards_scale exit $?" | tee -a "$OUT/session.txt") &
    gpu_tests 1 20-25 400 a "${CFG_ENGINE_TESTS[@]}" -k "not lora_update" &
    gpu_tests 2,3 26-31 400 b tests/gpu/test_hybrid_engine_gpu.py -k 2gpus &
    wait
    grep -h -E "PASSED|FAILED|ERROR|passed|failed" "$OUT"/gpu_tests_*.log | tail -20 ;;
  prep2)  # 4 GPUs, 64 cores; ~5 min: bounded by the 60-layer build
    build_logged 60 32-63 &
    (build 20 > /dev/null && train_step 0 20 "${TRAIN_VARIANTS_L20:-$TRAIN_SET}" 300 0-15) &
    gpu_tests 1 16-31 290 a "${CFG_ENGINE_TESTS[@]}" -k "not lora_update" &
    wait
    grep -h -E "PASSED|FAILED|ERROR|passed|failed" "$OUT"/gpu_tests_*.log | tail -20
    grep -h -E "s per update|out of memory" "$OUT"/train_step_L20.log ;;
  prep3)  # 4 GPUs, 64 cores; ~6 min: the 60-layer build (cores 32-63) | train_step L20, CFG layouts (GPU 0)
          # | attention kernels, then the CFG + engine GPU tests (GPU 1) | the 2-GPU hybrid-engine test (GPUs 2,3)
    build_logged 60 32-63 &
    (build 20 0-15 > /dev/null && train_step 0 20 "${TRAIN_VARIANTS_L20:-$CFG_SET}" 330 0-15) &
    (CUDA_VISIBLE_DEVICES=1 taskset -c 16-23 timeout 60 python3 benchmarks/attention_backends.py \
      --out "$OUT/attention_backends.json" > "$OUT/attention_backends.log" 2>&1; \
      echo "attention_backends exit $?" | tee -a "$OUT/session.txt"; \
      gpu_tests 1 16-23 250 a "${CFG_ENGINE_TESTS[@]}" -k "not lora_update") &
    gpu_tests 2,3 24-31 330 b tests/gpu/test_hybrid_engine_gpu.py -k 2gpus &
    wait
    grep -h -E "PASSED|FAILED|ERROR|passed|failed" "$OUT"/gpu_tests_*.log | tail -20
    grep -h -E "per_update|batched_masked|two_calls" "$OUT"/attention_backends.log | tail -9
    grep -h -E "s per update|out of memory" "$OUT"/train_step_L20.log ;;
  prep4)  # 2+ GPUs, 32+ cores; ~6 min: the 60-layer build (cores 16-31) | train_step L20 (GPU 0, cores 0-11)
          # | CFG + engine GPU tests (GPU 1, cores 12-15)
    build_logged 60 16-31 &
    (build 20 0-11 > /dev/null && train_step 0 20 "${TRAIN_VARIANTS_L20:-$NOCKPT_SET}" 400 0-11) &
    gpu_tests 1 12-15 300 a tests/gpu/test_activation_memory_gpu.py "${CFG_ENGINE_TESTS[@]}" -k "not lora_update" &
    wait
    grep -h -E "PASSED|FAILED|ERROR|passed|failed" "$OUT"/gpu_tests_*.log | tail -20
    grep -h -E "s per update|out of memory|blocks recomputed" "$OUT"/train_step_L20.log ;;
  mix3)  # 2 GPUs; ~9 min: e2e L60 vllm_omni at micro-batch 2, the defaults otherwise (checkpointing auto) (GPU 0)
         # | train_step L60 (GPU 1)
    build 60 "" cuda > /dev/null
    e2e 0 1 vllm_omni g1_vllm_omni_auto &
    train_step 1 60 "${TRAIN_VARIANTS:-$NOCKPT_SET}" 560 &
    wait
    grep -h -E "s per update|out of memory|blocks recomputed" "$OUT"/train_step_L60.log
    grep -h -E "auto:" "$OUT"/e2e_*.log | cut -c1-300
    grep -h '"step_s"' "$OUT"/e2e_*.log | cut -c1-400 ;;
  mix4)  # 2 GPUs; ~7 min: e2e L60 diffusers at micro-batch 2 (GPU 0) | vllm_omni, micro-batch 4, every block
         # recomputed (the defaults before auto) (GPU 1)
    build 60 "" cuda > /dev/null
    e2e 0 1 diffusers g1_diffusers_auto &
    e2e 1 1 vllm_omni g1_vllm_omni_ckpt_all --name ckpt_all \
      --set actor_rollout_ref.model.gradient_checkpointing_blocks=null &
    wait
    grep -h -E "auto:" "$OUT"/e2e_*.log | cut -c1-300
    grep -h '"step_s"' "$OUT"/e2e_*.log | cut -c1-400 ;;
  mix2)  # 4 GPUs; ~9 min with E2E_STEPS=3: e2e L60 1 GPU (GPU 0) | e2e L60 2 GPUs (GPUs 1,2) | train_step L60 (GPU 3)
    build 60 "" cuda > /dev/null
    e2e 0 1 vllm_omni g1_vllm_omni &
    e2e 1,2 2 vllm_omni g2_vllm_omni &
    train_step 3 60 "${TRAIN_VARIANTS:-$CFG_SET}" 550 &
    wait
    grep -h -E "s per update|out of memory" "$OUT"/train_step_L60.log
    grep -h '"step_s"' "$OUT"/e2e_*.log | cut -c1-400 ;;
  mix1)  # 4 GPUs; ~9 min with E2E_STEPS=3
    build 60 "" cuda > /dev/null
    e2e 0 1 vllm_omni g1_vllm_omni &
    e2e 1 1 diffusers g1_diffusers &
    e2e 2 1 vllm_omni g1_vllm_omni_cfg2 --name two_cfg_forwards --set actor_rollout_ref.rollout.pipeline.batch_cfg=false &
    train_step 3 60 "${TRAIN_VARIANTS:-$TRAIN_SET}" 550 &
    wait
    grep -h -E "s per update|out of memory" "$OUT"/train_step_L60.log
    grep -h '"step_s"' "$OUT"/e2e_*.log | cut -c1-400 ;;
  e2e1)
    build "$LAYERS" "" cuda > /dev/null
    e2e 0 1 vllm_omni g1_vllm_omni &
    e2e 1 1 diffusers g1_diffusers &
    [ "$gpus" -ge 4 ] && e2e 2,3 2 vllm_omni g2_vllm_omni &
    wait ;;
  real1)
    build 60 "" cuda | tail -1
    timeout 500 python3 benchmarks/train_step.py --layers 60 --prompts 1 --repeats "${TRAIN_REPEATS:-1}" \
      --variants "${TRAIN_VARIANTS:-ckpt_mb1_two_forwards,default,compiled_ckpt_mb8}" --model-dir "$MODEL_DIR" \
      --out "$OUT/train_step_L60.json" 2>&1 | grep -v -e Loading -e WARNING | tee "$OUT/train_step_L60.log" | tail -25
    echo "train_step L60 exit ${PIPESTATUS[0]}" | tee -a "$OUT/session.txt" ;;
  probe60)  # one GPU; ~7 min: the 60-layer build, then pipeline_breakdown on the recipe's rollout call (CFG 4,
            # LoRA r64): the split placement's diffusers path (eager, SDPA) and vllm-omni's (compiled, FA3), profile
    cores=$(nproc); build_logged "${PROBE_LAYERS:-60}" "2-$((cores - 1))" &
    [ "${PROBE_GPU_TEST:-1}" = 1 ] && gpu_tests 0 0-1 230 gelu tests/gpu/test_gelu_epilogue_gpu.py \
      tests/gpu/test_qk_norm_rope_gpu.py tests/gpu/test_denoise_no_sync_gpu.py &
    wait
    timeout "${PROBE_TIMEOUT:-420}" python3 benchmarks/pipeline_breakdown.py --layers "${PROBE_LAYERS:-60}" --cfg 4 \
      --lora-rank 64 \
      --variants "${PROBE_VARIANTS:-eager_sdpa,compiled_flash}" --repeats "${PROBE_REPEATS:-2}" --model-dir "$MODEL_DIR" \
      --out "$OUT/pipeline_breakdown_L60.json" > "$OUT/pipeline_breakdown_L60.log" 2>&1
    echo "pipeline_breakdown L60 exit $?" | tee -a "$OUT/session.txt"
    grep -v -e Loading -e WARNING -e "truncated to" "$OUT/pipeline_breakdown_L60.log" | tail -40 ;;
  b60)  # one GPU; ~3 min: the 60-layer build on the GPU, then the actor's SDPA-backend GPU test
    build_logged 60 "" cuda
    gpu_tests 0 0-15 230 sdpa tests/gpu/test_actor_sdpa_backend_gpu.py
    grep -h -E "PASSED|FAILED|ERROR|SKIPPED|passed|failed|^E " "$OUT"/gpu_tests_sdpa.log | tail -12 ;;
  b60c)  # one GPU; ~4 min: the 60-layer build on the GPU, then the CFG-batching and vllm-omni engine GPU tests
    # (bf16 equivalence of batched CFG with the masked-text padding, and the engine's calls)
    build_logged 60 "" cuda
    gpu_tests 0 0-15 260 cfg_engine "${CFG_ENGINE_TESTS[@]}"
    grep -h -E "PASSED|FAILED|ERROR|SKIPPED|passed|failed|^E " "$OUT"/gpu_tests_cfg_engine.log | tail -30 ;;
  cmp1)  # one GPU; ~5 min: the compiled actor reuses its graphs over every text length (and an unpadded control
    # recompiles) | the actor's SDPA backends where vllm switched cuDNN off (the 2-layer fixture only: no model build)
    gpu_tests 0 0-11 340 compile tests/gpu/test_actor_compile_gpu.py &
    gpu_tests 0 12-15 200 sdpa tests/gpu/test_actor_sdpa_backend_gpu.py &
    wait
    grep -h -E "PASSED|FAILED|ERROR|SKIPPED|passed|failed|^E " "$OUT"/gpu_tests_*.log | tail -30 ;;
  vgap)  # one GPU; ~5 min with the 20-layer build: the actor's update (train_step's "default" variant) in a plain
    # process, then in one that imported vllm first: what importing vllm alone costs the update
    # (the vllm-omni worker's update measured 0.6 s of compute slower than the diffusers engine's at 60 layers)
    build 20 "" cuda > /dev/null
    for run in plain vllm; do
      pre=""; [ "$run" = vllm ] && pre="import vllm; "
      CUDA_VISIBLE_DEVICES=0 timeout 240 python3 -c "${pre}import runpy, sys; sys.argv = ['train_step.py', '--layers',
'20', '--repeats', '2', '--variants', 'default', '--model-dir', '$MODEL_DIR', '--out', '$OUT/train_step_L20_$run.json'];
runpy.run_path('benchmarks/train_step.py', run_name='__main__')" > "$OUT/train_step_L20_$run.log" 2>&1
      echo "train_step L20 ($run) exit $?" | tee -a "$OUT/session.txt"
      tail -n 4 "$OUT/train_step_L20_$run.log"
    done ;;
  g1) build "$LAYERS" "" cuda > /dev/null; e2e 0 1 vllm_omni g1_vllm_omni; tail -n 25 "$OUT/e2e_g1_vllm_omni.log" ;;
  g1d) build "$LAYERS" "" cuda > /dev/null; e2e 0 1 diffusers g1_diffusers; tail -n 25 "$OUT/e2e_g1_diffusers.log" ;;
  e2e4) build "$LAYERS" "" cuda > /dev/null; e2e 0,1,2,3 4 vllm_omni g4_vllm_omni ;;
  e2e4d) build "$LAYERS" "" cuda > /dev/null; e2e 0,1,2,3 4 diffusers g4_diffusers ;;
  *) echo "unknown stage $stage"; exit 2 ;;
esac
tail -n 3 "$OUT"/*.log 2>/dev/null | tail -n 60
# At most 8 files come back from $OUT: pack everything of this stage into one archive (session.txt stays readable).
( cd "$OUT" && files=$(ls | grep -v -e '^session.txt$' -e '\.tgz$') && [ -n "$files" ] && \
  tar czf "$stage.tgz" $files && rm -f $files )
ls -la "$OUT"
