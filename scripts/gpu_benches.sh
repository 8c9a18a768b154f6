#!/usr/bin/env bash
# The GPU benchmarks the issues name, in one pass sized for a short accelerator lease: one random
# 8B-shaped checkpoint (8 layers, bf16) built once and shared ($GSJAX_BENCH_CACHE), then
#   sampler:  embedded JAX sampler vs transformers `generate` (prompts 512/2048, batch 1/16) + weight sync
#   grpo:     GRPO steps of the tiny recipe's agent episodes on the 8B-shaped decoder (phases, tokens/s, MFU)
#   vision:   the vision tower (8B preset, 4 blocks) with dense vs banded block-diagonal attention
#   multiturn: multi-turn episodes with and without prefix reuse
# Each writes one JSON line to $RESULTS/<name>.json and its log beside it; each has its own time limit
# (seconds, env BUDGET_<NAME>), so one that fails or runs long does not cost the others. Every JSON line also
# goes to $SUMMARY/all.jsonl and the end of every log to $SUMMARY/all.log (two files, for a lease that
# returns only a few).
#   RESULTS=out bash scripts/gpu_benches.sh
set -u
RESULTS=${RESULTS:-${OUT:-bench_results}}
SUMMARY=${SUMMARY:-$RESULTS}
mkdir -p "$RESULTS" "$SUMMARY"
export GSJAX_BENCH_CACHE=${GSJAX_BENCH_CACHE:-/tmp/gsjax_bench_cache}
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/gsjax_jax_cache}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
W=${WORKLOAD:-8b-8layers}

bench() {  # name budget_s command...
  local name=$1 budget=$2; shift 2
  local start=$SECONDS
  timeout --signal=TERM --kill-after=10 "$budget" "$@" > "$RESULTS/$name.log" 2>&1
  local rc=$?
  grep '^{' "$RESULTS/$name.log" | tail -1 > "$RESULTS/$name.json"
  cat "$RESULTS/$name.json" >> "$SUMMARY/all.jsonl"
  { echo "=== $name rc=$rc"; tail -n 120 "$RESULTS/$name.log"; } >> "$SUMMARY/all.log"
  echo "$name: rc=$rc $((SECONDS - start))s $(head -c 300 "$RESULTS/$name.json")"
  [ "$rc" = 0 ] || tail -5 "$RESULTS/$name.log"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $PY -c "import jax, flax, transformers, torch; print('jax', jax.__version__, jax.devices()[0].device_kind,
'flax', flax.__version__, 'transformers', transformers.__version__, 'torch', torch.__version__)"
} > "$RESULTS/versions.txt" 2>&1
cat "$RESULTS/versions.txt"

# CPU-bound checkpoint build beside the GPU-bound tests and vision benchmark.
$PY -c "from pathlib import Path; from gsjax.benchmarking import build_checkpoint as b
print(b('$W', Path('/tmp/unused'), 'bfloat16'))" > "$RESULTS/checkpoint.log" 2>&1 &
build=$!

# The accelerator-only tests (cuDNN attention against XLA; the real-SGLang test skips without sglang). If the
# cuDNN kernel fails them, the benchmarks run on the XLA kernel instead and say so.
[ -n "${SKIP_TESTS:-}" ] || timeout 100 $PY -m pytest -q -p no:cacheprovider -m gpu tests/models/test_gpu_kernels.py \
  tests/rollout/test_sglang_launcher.py -rs > "$RESULTS/gpu_tests.log" 2>&1
gpu_tests=$?
ATT=auto; [ "$gpu_tests" = 0 ] || ATT=xla
echo "gpu tests: rc=$gpu_tests attention=$ATT"; tail -4 "$RESULTS/gpu_tests.log"
{ cat "$RESULTS/versions.txt"; echo "=== gpu tests rc=$gpu_tests"; tail -n 80 "$RESULTS/gpu_tests.log"; } >> "$SUMMARY/all.log"

[ -n "${SKIP_VISION:-}" ] || bench vision "${BUDGET_VISION:-50}" $PY scripts/bench_vision_attention.py --preset ${VISION_PRESET:-8b} --depth 4 --dtype bfloat16 \
  --frames 8 --grid 32x32
wait $build; echo "checkpoint: rc=$? $(tail -1 "$RESULTS/checkpoint.log")"

bench sampler "${BUDGET_SAMPLER:-220}" $PY scripts/bench_sampler.py --workload $W --dtype bfloat16 --attention $ATT \
  --prompt-lens 512,2048 --batches 1,16 --new-tokens 128 --repeats 2
bench grpo "${BUDGET_GRPO:-180}" $PY scripts/bench_grpo.py --workload $W --steps 2 model.attention_impl=$ATT \
  rollout.group_size=8 rollout.prompts_per_step=4 rollout.max_slots=32 rollout.concurrency=32 \
  rollout.min_prefill_bucket=2048 env.max_new_tokens_per_turn=128 'batch.buckets=[4096]'
bench multiturn "${BUDGET_MULTITURN:-120}" $PY scripts/bench_multiturn.py --workload $W --dtype bfloat16 \
  --attention $ATT --episodes 16 --turns 4 --first-prompt 1024 --append 256 --new-tokens 128 --min-bucket 256 --repeats 1
