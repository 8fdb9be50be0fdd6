#!/usr/bin/env bash
# GPU tests and real-size benchmarks on a GPU machine, one stage per run, from the repository root after the
# bundle is installed (`. .device/cN/install.sh`, or `. /tmp/env.sh` on a machine that has it already):
#   bash scripts/device/run_stage.sh <stage>
# Logs and JSON go to $OUT (default outputs/device); at the end a stage packs them into $OUT/<stage>.tgz and
# appends one line per job (exit code) to $OUT/run_log.txt. Stages:
#   gpu-tests               pytest -m gpu tests/gpu (engine, faults, hybrid engine with both engines, CFG batching,
#                           reward models)
#   gpu-tests-actor         the compiled actor reuses its graphs over every text length | the actor's SDPA
#                           backends where vllm switched cuDNN off (2-layer fixture, no model build)
#   gpu-tests-cfg-engine    the CFG-batching and vllm-omni engine GPU tests
#   gpu-tests-full-weights  full fine-tuning in the hybrid engine on one GPU (both engines, the optimizer offload;
#                           the 2-GPU case where the machine has two)
#   gpu-tests-families      the model families' GPU tests, one file after another: FLUX / SD3.5 / Wan2.1 on the
#                           vllm-omni engine against the diffusers engine, then on the hybrid engine (step-1 ratios),
#                           then the stand-ins built on the GPU (Wan2.1-T2V-1.3B's clips at its recipe's size)
#   build-model             the random full-width Qwen-Image of $E2E_LAYERS layers, weights drawn on the GPU
#   e2e-1gpu-vllm-omni      benchmarks/e2e_step.py on one GPU with the vllm-omni engine (builds the model if missing)
#   e2e-1gpu-diffusers      the same with the diffusers engine
#   e2e-4gpu-vllm-omni      benchmarks/e2e_step.py on 4 GPUs with the vllm-omni engine
#   e2e-4gpu-diffusers      the same with the diffusers engine
#   e2e-engines-side-by-side  one GPU vllm-omni (GPU 0) | one GPU diffusers (GPU 1) | two GPUs vllm-omni (GPUs 2,3,
#                           when the machine has 4)
#   train-step              benchmarks/train_step.py at 60 layers on one GPU ($TRAIN_VARIANTS)
#   bench-actor-rewards     train_step at 60 layers (GPU 0) | train_step at 20 layers (GPU 1) | rewards_scale (GPU 2)
#                           on 3+ GPUs; train_step at 60 layers alone on fewer
#   rollout-breakdown       the 60-layer build | the GELU-epilogue, q/k-kernel and no-sync GPU tests, then
#                           benchmarks/pipeline_breakdown.py on the recipe's rollout call (CFG 4, LoRA r64)
#   vllm-import-cost        the actor's update at 20 layers in a plain process, then in one that imported vllm first
#   e2e-tree                benchmarks/e2e_step.py of another checkout ($E2E_TREE, e.g. an earlier commit's `git
#                           archive`) on one GPU, its model built by that checkout: beside `E2E_LIGHT_TE=1
#                           e2e-1gpu-vllm-omni`, the same machine's figures for that code and this
#   families                benchmarks/family_step.py on each family's stand-in and recipe, one after another: SD3.5
#                           and FLUX.1-dev (-> $OUT/models.json), Wan2.1-T2V-1.3B with the temporal-consistency
#                           reward (-> $OUT/video.json); 3 steps and the B=16 engine comparison each; FAMILIES=wan22
#                           runs Wan2.2-TI2V-5B's recipe the same way, FAMILIES=qwen Qwen-Image's with
#                           text_encoder_offload=true (its stand-in: ~55 GB of disk, alone); FAMILIES="sd3full
#                           qwen20full" the full fine-tuning runs (-> $OUT/full_finetune.json): SD3.5-Medium's full
#                           recipe, Qwen-Image's recipe at 20 layers with lora_rank=0 and the optimizer offload;
#                           FAMILIES=qwenfull Qwen-Image's full fine-tuning recipe at 60 layers on every GPU of the
#                           machine (4 or 8; 8 prompts a GPU), its stand-in ~55 GB of disk
#   eval-throughput         verl-omni-eval (vllm-omni, B=16 calls of the recipe's 512², 10 steps, CFG 4) on the
#                           stand-in a `FAMILY_KEEP_MODELS=1 ... families` run kept ($EVAL_FAMILY, default qwen): the
#                           report's steady images/s against the training rollout's
# A build that runs alone draws the weights on the GPU (seconds); one beside other jobs draws them on the CPU.
# Knobs: E2E_STEPS (3), E2E_LAYERS (60), E2E_REWARDS (ocr), MODEL_DIR (/tmp/verl_omni_models), E2E_LIGHT_TE (1: the
# e2e stages' model with the 2-layer text encoder, as the figures of earlier code), E2E_ARGS (added
# to every e2e run, e.g. "--name x --set actor_rollout_ref.actor.batch_cfg=auto"), TRAIN_VARIANTS (train-step),
# PROBE_VARIANTS / PROBE_REPEATS / PROBE_GPU_TEST (rollout-breakdown: 0 leaves out its GPU tests) / PROBE_TIMEOUT
# (seconds for pipeline_breakdown, 420) / PROBE_LAYERS (60; 20 for a quick check, the files keep the L60 name),
# FAMILIES (families: which of "sd3 flux wan", in that order) / FAMILY_TIMEOUT (seconds per family run, 560) /
# FAMILY_STEPS (training steps per family run, 3; 0: the B=16 engine comparison alone, added to the family's last
# record in docs/benchmarks/) / FAMILY_COMPARE (0 leaves out the B=16 engine comparison) / FAMILY_SET (space-separated
# key=value overrides for every family run, each a --set of family_step.py; the record lists them) /
# COMMIT (the commit the records name, where the copy has no .git) /
# FAMILY_KEEP_MODELS (1 keeps each stand-in in $MODEL_DIR/family_<family> for the next run; by default it is deleted
# after its run: the three take ~65 GB of disk), FAMILY_TESTS_K (gpu-tests-families: a pytest -k expression, e.g.
# wan) / FAMILY_TESTS_TIMEOUT (seconds per test file, 560).
set -uo pipefail
STAGES="gpu-tests gpu-tests-actor gpu-tests-cfg-engine gpu-tests-full-weights gpu-tests-families build-model e2e-1gpu-vllm-omni \
e2e-1gpu-diffusers e2e-4gpu-vllm-omni e2e-4gpu-diffusers e2e-engines-side-by-side train-step bench-actor-rewards \
rollout-breakdown vllm-import-cost e2e-tree families eval-throughput"
stage="${1:-}"
if [ -z "$stage" ] || ! [[ " $STAGES " == *" $stage "* ]]; then
  echo "usage: run_stage.sh <stage>; stages: $STAGES" >&2
  exit 2
fi
OUT="${OUT:-$PWD/outputs/device}"; mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false RAY_DEDUP_LOGS=0
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export VERL_OMNI_GPU_OUT="$OUT"
MODEL_DIR="${MODEL_DIR:-/tmp/verl_omni_models}"
STEPS="${E2E_STEPS:-3}"; LAYERS="${E2E_LAYERS:-60}"; REWARDS="${E2E_REWARDS:-ocr}"
RUN_LOG="$OUT/run_log.txt"
gpus=$(nvidia-smi --query-gpu=index --format=csv,noheader | wc -l)
echo "== $(date -u +%FT%TZ) run_stage.sh $stage on $(hostname): $gpus GPU(s)" | tee -a "$RUN_LOG"
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader | tee -a "$RUN_LOG"

build() {  # build <layers> [cores] [device]: the random full-width model, once (idempotent), on cores $2 (default:
  # all), drawing the weights on device $3 (default cpu; cuda where the GPU is free then: PyTorch's CPU random fills
  # run on one thread; a failed GPU build falls back to the CPU, logged)
  ${2:+taskset -c $2} python3 -c "import sys; sys.path.insert(0, 'benchmarks'); from bench_common import build_model; \
build_model('$MODEL_DIR', $1, device='${3:-cpu}', light_text_encoder=${E2E_LIGHT_TE:-0} == 1)"
}
e2e() {  # e2e <visible gpus> <n gpus> <engine> <log name> [--name N --set KEY=VALUE ...]; $E2E_ARGS: to every run
  CUDA_VISIBLE_DEVICES=$1 timeout -k 15 560 python3 benchmarks/e2e_step.py --layers "$LAYERS" --gpus "$2" --engine "$3" \
    --steps "$STEPS" --rewards "$REWARDS" --model-dir "$MODEL_DIR" --work-dir "/tmp/e2e_$4" \
    --out "$OUT/e2e_runs_$4.json" "${@:5}" $([ "${E2E_LIGHT_TE:-0}" = 1 ] && echo --light-text-encoder) ${E2E_ARGS:-} \
    > "$OUT/e2e_$4.log" 2>&1
  echo "e2e $4 exit code $?" | tee -a "$RUN_LOG"
}
gpu_tests() {  # gpu_tests <visible gpus> <cores> <timeout s> <name> <pytest args...>: log in $OUT/gpu_tests_<name>.log
  CUDA_VISIBLE_DEVICES=$1 taskset -c "$2" timeout -k 15 "$3" python3 -m pytest -m gpu -v -s -p no:cacheprovider "${@:5}" \
    > "$OUT/gpu_tests_$4.log" 2>&1
  echo "gpu tests $4 exit $?" | tee -a "$RUN_LOG"
}
build_logged() {  # build_logged <layers> <cores> [device]: a stage's build, its log in $OUT/build.log
  build "$1" "$2" "${3:-cpu}" > "$OUT/build.log" 2>&1
  echo "build L$1 exit $?" | tee -a "$RUN_LOG"
}
train_step() {  # train_step <gpu> <layers> <timeout s> [train_step.py args...]: one run of benchmarks/train_step.py
  CUDA_VISIBLE_DEVICES=$1 timeout -k 15 "$3" python3 benchmarks/train_step.py --layers "$2" --model-dir "$MODEL_DIR" \
    --out "$OUT/train_step_L$2.json" "${@:4}" > "$OUT/train_step_L$2.log" 2>&1
  echo "train_step L$2 exit $?" | tee -a "$RUN_LOG"
}
results() {  # results <logs...>: the pass / fail lines of pytest logs
  grep -h -E "PASSED|FAILED|ERROR|SKIPPED|passed|failed|^E " "$@" | tail -30
}
family_step() {  # family_step <family>: benchmarks/family_step.py on the family's stand-in with its recipe preset,
  # $FAMILY_STEPS steps then the B=16 rollout on both engines; log in $OUT/family_<family>.log, the stand-in in
  # $MODEL_DIR/family_<family> (deleted afterwards unless FAMILY_KEEP_MODELS=1). FAMILY_STEPS=0: the comparison
  # alone, added to the family's last record in docs/benchmarks/<models|video>.json (copied to $OUT first)
  local args out=models.json
  case "$1" in
    sd3) args=(--preset sd3_5_medium_flowgrpo_ocr_lora) ;;
    flux) args=(--preset flux_flowgrpo_ocr_lora) ;;
    wan) args=(--variant 1.3B --preset wan2_1_t2v_1_3b_flowgrpo_lora --rewards temporal_consistency); out=video.json ;;
    qwen) args=(--preset qwen_image_flowgrpo_ocr_lora --set actor_rollout_ref.model.text_encoder_offload=true
                --name te_offload) ;;
    wan22) args=(--variant TI2V-5B --preset wan2_2_ti2v_5b_flowgrpo_lora --rewards temporal_consistency)
           out=video.json ;;
    sd3full) args=(--preset sd3_5_medium_flowgrpo_ocr_full --name full); out=full_finetune.json ;;
    qwen20full) args=(--preset qwen_image_flowgrpo_ocr_lora --layers 20 --name full_offload
                      --set actor_rollout_ref.model.lora_rank=0 --set actor_rollout_ref.actor.optimizer_offload=true)
                out=full_finetune.json ;;
    qwenfull) args=(--preset qwen_image_flowgrpo_ocr_full --gpus "$gpus" --set "data.train_batch_size=$((8 * gpus))")
              out=full_finetune.json ;;
    *) echo "family_step: unknown family $1 (FAMILIES takes sd3, flux, wan, wan22, qwen, sd3full, qwen20full, qwenfull)" | tee -a "$RUN_LOG"; return 2 ;;
  esac
  local visible=0  # one GPU; qwenfull: every GPU of the machine (its preset's 8 prompts a GPU)
  [ "$1" = qwenfull ] && visible=$(seq -s, 0 $((gpus - 1)))
  local family="$1"
  [ "$family" = wan22 ] && family=wan  # wan22: Wan2.2-TI2V-5B on the wan family
  [ "$family" = qwen ] && family=qwen_image  # qwen: Qwen-Image's recipe with its text encoder off during updates
  [ "$family" = sd3full ] && family=sd3  # sd3full: SD3.5-Medium's full fine-tuning recipe
  [ "$family" = qwen20full ] && family=qwen_image  # qwen20full: Qwen-Image at 20 layers, every weight, optimizer offload
  [ "$family" = qwenfull ] && family=qwen_image  # qwenfull: Qwen-Image's full fine-tuning recipe on every GPU
  local run=(--steps "${FAMILY_STEPS:-3}") kv
  for kv in ${FAMILY_SET:-}; do args+=(--set "$kv"); done
  [ "${FAMILY_COMPARE:-1}" = 1 ] && run+=(--rollout-compare)
  if [ "${FAMILY_STEPS:-3}" = 0 ]; then
    run=(--compare-only)
    [ -f "$OUT/$out" ] || cp "docs/benchmarks/$out" "$OUT/$out"
  fi
  CUDA_VISIBLE_DEVICES=$visible timeout -k 15 "${FAMILY_TIMEOUT:-560}" python3 benchmarks/family_step.py --family "$family" \
    "${args[@]}" "${run[@]}" --out "$OUT/$out" --model-dir "$MODEL_DIR/family_$1" --work-dir "/tmp/family_$1" \
    --commit "${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null)}" > "$OUT/family_$1.log" 2>&1
  echo "family_step $1 exit $?" | tee -a "$RUN_LOG"
  [ "${FAMILY_KEEP_MODELS:-0}" = 1 ] || rm -rf "$MODEL_DIR/family_$1"
}
CFG_ENGINE_TESTS=(tests/gpu/test_cfg_batching_gpu.py tests/gpu/test_vllm_omni_engine_gpu.py)
FAMILY_TESTS=(tests/gpu/test_families_vllm_omni_gpu.py tests/gpu/test_families_hybrid_gpu.py
              tests/gpu/test_standins_gpu.py)
cores=$(nproc)

case "$stage" in
  gpu-tests)
    timeout -k 15 570 python3 -m pytest -m gpu tests/gpu -v -s -p no:cacheprovider --timeout=400 2>&1 \
      | tee "$OUT/gpu_test_log.txt" | grep -E "PASSED|FAILED|SKIPPED|ERROR|passed|failed|figures" ;;
  gpu-tests-actor)  # ~5 min: both on GPU 0, on disjoint cores
    gpu_tests 0 "0-$((cores * 3 / 4 - 1))" 340 compile tests/gpu/test_actor_compile_gpu.py &
    gpu_tests 0 "$((cores * 3 / 4))-$((cores - 1))" 200 sdpa tests/gpu/test_actor_sdpa_backend_gpu.py &
    wait
    results "$OUT"/gpu_tests_*.log ;;
  gpu-tests-cfg-engine)  # ~3 min
    gpu_tests 0 "0-$((cores - 1))" 300 cfg_engine "${CFG_ENGINE_TESTS[@]}"
    results "$OUT"/gpu_tests_cfg_engine.log ;;
  gpu-tests-full-weights)
    gpu_tests "$(seq -s, 0 $((gpus - 1)))" "0-$((cores - 1))" "${FULL_TESTS_TIMEOUT:-500}" full_weights tests/gpu/test_full_weights_gpu.py
    results "$OUT"/gpu_tests_full_weights.log ;;
  gpu-tests-families)  # one file after another (each starts its own engines); FAMILY_TESTS_K narrows them (-k)
    for file in "${FAMILY_TESTS[@]}"; do
      name=$(basename "$file" _gpu.py)
      gpu_tests 0 "0-$((cores - 1))" "${FAMILY_TESTS_TIMEOUT:-560}" "${name#test_}" "$file" \
        ${FAMILY_TESTS_K:+-k "$FAMILY_TESTS_K"}
    done
    results "$OUT"/gpu_tests_families_*.log "$OUT"/gpu_tests_standins.log ;;
  build-model)  # ~1 min for 60 layers on the GPU
    build_logged "$LAYERS" "" cuda
    tail -n 3 "$OUT/build.log" ;;
  e2e-1gpu-vllm-omni)
    build "$LAYERS" "" cuda > /dev/null; e2e 0 1 vllm_omni 1gpu_vllm_omni; tail -n 25 "$OUT/e2e_1gpu_vllm_omni.log" ;;
  e2e-1gpu-diffusers)
    build "$LAYERS" "" cuda > /dev/null; e2e 0 1 diffusers 1gpu_diffusers; tail -n 25 "$OUT/e2e_1gpu_diffusers.log" ;;
  e2e-4gpu-vllm-omni)
    build "$LAYERS" "" cuda > /dev/null; e2e 0,1,2,3 4 vllm_omni 4gpu_vllm_omni ;;
  e2e-4gpu-diffusers)
    build "$LAYERS" "" cuda > /dev/null; e2e 0,1,2,3 4 diffusers 4gpu_diffusers ;;
  e2e-engines-side-by-side)
    build "$LAYERS" "" cuda > /dev/null
    e2e 0 1 vllm_omni 1gpu_vllm_omni &
    e2e 1 1 diffusers 1gpu_diffusers &
    [ "$gpus" -ge 4 ] && e2e 2,3 2 vllm_omni 2gpu_vllm_omni &
    wait ;;
  train-step)
    build 60 "" cuda | tail -1
    timeout -k 15 500 python3 benchmarks/train_step.py --layers 60 --prompts 1 --repeats "${TRAIN_REPEATS:-1}" \
      --variants "${TRAIN_VARIANTS:-ckpt_mb1_two_forwards,default,compiled_ckpt_mb8}" --model-dir "$MODEL_DIR" \
      --out "$OUT/train_step_L60.json" 2>&1 | grep -v -e Loading -e WARNING | tee "$OUT/train_step_L60.log" | tail -25
    echo "train_step L60 exit ${PIPESTATUS[0]}" | tee -a "$RUN_LOG" ;;
  bench-actor-rewards)
    if [ "$gpus" -ge 3 ]; then
      (build 60 && train_step 0 60 540 --prompts 1) &
      (build 20 && train_step 1 20 540) &
      (CUDA_VISIBLE_DEVICES=2 timeout -k 15 400 python3 benchmarks/rewards_scale.py --out "$OUT/rewards_scale.json" \
        > "$OUT/rewards_scale.log" 2>&1; echo "rewards_scale exit $?" | tee -a "$RUN_LOG") &
      wait
    else
      build 60 && train_step 0 60 540 --prompts 1
    fi ;;
  rollout-breakdown)  # ~7 min: the build on all cores but two | the GPU tests on those two; then the breakdown
    build_logged "${PROBE_LAYERS:-60}" "2-$((cores - 1))" &
    [ "${PROBE_GPU_TEST:-1}" = 1 ] && gpu_tests 0 0-1 230 kernels tests/gpu/test_gelu_epilogue_gpu.py \
      tests/gpu/test_qk_norm_rope_gpu.py tests/gpu/test_denoise_no_sync_gpu.py &
    wait
    timeout -k 15 "${PROBE_TIMEOUT:-420}" python3 benchmarks/pipeline_breakdown.py --layers "${PROBE_LAYERS:-60}" --cfg 4 \
      --lora-rank 64 \
      --variants "${PROBE_VARIANTS:-eager_sdpa,compiled_flash}" --repeats "${PROBE_REPEATS:-2}" --model-dir "$MODEL_DIR" \
      --out "$OUT/pipeline_breakdown_L60.json" > "$OUT/pipeline_breakdown_L60.log" 2>&1
    echo "pipeline_breakdown L60 exit $?" | tee -a "$RUN_LOG"
    grep -v -e Loading -e WARNING -e "truncated to" "$OUT/pipeline_breakdown_L60.log" | tail -40 ;;
  vllm-import-cost)  # ~5 min with the 20-layer build: train_step's "default" variant without and with vllm imported
    build 20 "" cuda > /dev/null
    for run in plain vllm; do
      pre=""; [ "$run" = vllm ] && pre="import vllm; "
      CUDA_VISIBLE_DEVICES=0 timeout -k 15 240 python3 -c "${pre}import runpy, sys; sys.argv = ['train_step.py', '--layers',
'20', '--repeats', '2', '--variants', 'default', '--model-dir', '$MODEL_DIR', '--out', '$OUT/train_step_L20_$run.json'];
runpy.run_path('benchmarks/train_step.py', run_name='__main__')" > "$OUT/train_step_L20_$run.log" 2>&1
      echo "train_step L20 ($run) exit $?" | tee -a "$RUN_LOG"
      tail -n 4 "$OUT/train_step_L20_$run.log"
    done ;;
  e2e-tree)  # benchmarks/e2e_step.py of another checkout ($E2E_TREE, e.g. `git archive <commit> | tar -x -C
    # .device/base`, carried) on GPU 0 with vllm-omni, its model built on the GPU by that checkout's own code in
    # $MODEL_DIR/tree; then `E2E_LIGHT_TE=1 ... e2e-1gpu-vllm-omni` on the same machine gives this code's figure
    tree=$(cd "${E2E_TREE:?set E2E_TREE to a checkout of the code to measure}" && pwd)
    (cd "$tree" && PYTHONPATH="$tree:$PYTHONPATH" python3 -c "import sys; sys.path.insert(0, 'benchmarks'); \
from bench_common import build_model; build_model('$MODEL_DIR/tree', $LAYERS, device='cuda')") > "$OUT/build_tree.log" 2>&1
    (cd "$tree" && PYTHONPATH="$tree:$PYTHONPATH" CUDA_VISIBLE_DEVICES=0 timeout -k 15 560 python3 benchmarks/e2e_step.py \
      --layers "$LAYERS" --gpus 1 --engine vllm_omni --steps "$STEPS" --rewards "$REWARDS" --model-dir "$MODEL_DIR/tree" \
      --work-dir /tmp/e2e_tree --out "$OUT/e2e_runs_tree.json" ${E2E_ARGS:-}) > "$OUT/e2e_tree.log" 2>&1
    echo "e2e tree exit $?" | tee -a "$RUN_LOG"
    tail -n 25 "$OUT/e2e_tree.log" ;;
  families)  # one family after another on GPU 0 (each run starts and stops its own engines)
    for family in ${FAMILIES:-sd3 flux wan}; do
      family_step "$family"
      grep -v -e Loading -e WARNING "$OUT/family_$family.log" 2>/dev/null | tail -n 8
    done ;;
  eval-throughput)  # verl-omni-eval on a stand-in kept by `FAMILY_KEEP_MODELS=1 FAMILIES=<f> ... families`
    family="${EVAL_FAMILY:-qwen}"
    base=$(dirname "$(find "$MODEL_DIR/family_$family" -maxdepth 2 -name model_index.json | head -n 1)")
    CUDA_VISIBLE_DEVICES=0 timeout -k 15 "${EVAL_TIMEOUT:-420}" python3 -m verl_omni.eval --base "$base" \
      --prompts "/tmp/family_$family/data/train.parquet" --out "$OUT/eval_$family" --steps 10 --cfg 4 \
      --noise-level 0 --height 512 --width 512 --images-per-prompt 16 --batch-images 16 --negative-prompt " " \
      --reward ocr --engine vllm_omni --limit "${EVAL_PROMPTS:-12}" --no-progress > "$OUT/eval_$family.log" 2>&1
    echo "eval $family exit $?" | tee -a "$RUN_LOG"
    # The random weights' images and grids (~200 MB) would keep the archive from coming back: the report stays.
    rm -rf "$OUT/eval_$family/images" "$OUT/eval_$family/grids"
    grep -A12 '"timing"' "$OUT/eval_$family/report.json" 2>/dev/null | head -n 14 ;;
esac
tail -n 3 "$OUT"/*.log 2>/dev/null | tail -n 60
# Pack this stage's outputs into one archive (run_log.txt stays beside it, readable).
( cd "$OUT" && files=$(ls | grep -v -e '^run_log.txt$' -e '\.tgz$') && [ -n "$files" ] && \
  tar czf "$stage.tgz" $files && rm -rf $files )
ls -la "$OUT"
