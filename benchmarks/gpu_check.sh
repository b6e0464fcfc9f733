#!/usr/bin/env bash
# GPU check: `main.py bench` on one CUDA GPU in bfloat16, our steps against MiniMind's own code, in about 6 minutes.
#
# It runs on a CUDA machine without network access, so what it needs is prepared beforehand:
#
#   benchmarks/gpu_check.sh prepare    # on a machine with PyPI and MiniMind's checkouts (../minimind-2510 and
#                                      # ../minimind, or $MINIMIND_2510 and $MINIMIND_V3): fills .cache/gpu_check/
#                                      # (git-ignored) with the wheels a CUDA JAX image lacks (grain, array_record,
#                                      # portpicker), the transformers MiniMind pins (4.57.6, with the
#                                      # huggingface_hub and tokenizers it accepts) for MiniMind's processes alone,
#                                      # the chat-corpus subset, and each era's model/ (model code and tokenizer)
#   benchmarks/gpu_check.sh run        # on the CUDA machine, from a copy of the repository with .cache/gpu_check/;
#                                      # results under $OUT (or ./gpu_check_out)
#
# `run` uses the jax (CUDA plugin), flax, optax and torch (CUDA build) installed there ($PYTHON, default python3)
# and adds the carried wheels with pip --no-index. In order of importance, each bench in its own process with a
# time limit from what is left of the budget (330 s, the install included), sides taking turns, 2 warm-up and 8
# timed steps:
#   1. minimind2, batch 16 × 512: the default `main.py sft` step (the fast path) against MiniMind 2510's own
#      train_full_sft step, eager with bf16 autocast (the baseline) and under torch.compile; cold compile times;
#   2. the same step of ours again in a new process with the persistent compilation cache of 1: warm compile;
#   3. minimind3-moe, batch 8 × 512, against MiniMind v3's step, eager and compiled;
#   4. minimind2-small, batch 16 × 512, against MiniMind 2510's, eager and compiled;
#   5. decode, minimind2, batch 1 and 32: generate against MiniMind's own generate, bf16, 64 + 64 tokens, eos off;
#   6. memory probe: our minimind2 step at batch 64, without and with --remat full (peak device memory);
#   7. minimind3-moe with --moe_impl ragged_dot (jax.lax.ragged_dot) instead of the default expert tiles;
#   8. where the compile goes (benchmarks/compile_time.py, minimind2): the default step with XLA's GEMM
#      autotuning off, then causal_blocks attention, full logits and unrolled layers each alone.
# A bench that fails or runs out of time is reported with its last log lines, and the rest still run. The end is
# a compact summary (card, versions, every row's tokens/s, ratio to MiniMind's eager step, MFU against the
# spec-sheet bf16 peak, compile times, peak memory, the largest batch extrapolated from the memory probe).
# $OUT gets gpu_check.log (this output), benches.log (every bench's stderr), results.json (every bench's JSON)
# and compile_ablation.jsonl.
# GPU_CHECK_SMOKE=1 shrinks everything (tiny presets, few steps, dynamo's eager backend) to try the script on a CPU.
# Its scratch (installed wheels, the benches' JSON and logs, the XLA cache) is $GPU_CHECK_WORK, default /tmp/gpu_check.
set -uo pipefail
cd "$(dirname "$0")/.."
CARRY=.cache/gpu_check
RECORDS=2000
OUR_WHEELS=(grain array_record portpicker)  # at the versions of the environment that runs `prepare`
MINIMIND_WHEELS=(transformers==4.57.6 huggingface_hub==0.36.2 tokenizers==0.22.2)  # MiniMind's requirements.txt
CHECKOUT_FILES=(__init__.py model_minimind.py model_lora.py tokenizer.json tokenizer_config.json)

download() {  # folder, requirements...
  local folder=$1
  shift
  "$PREPARE_PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform any -d "$folder" "$@"
}

copy_checkout() {  # a MiniMind checkout, destination: its model/ files the bench imports and tokenizes with
  mkdir -p "$2/model"
  for file in "${CHECKOUT_FILES[@]}"; do cp "$1/model/$file" "$2/model/"; done
}

prepare() {
  set -e
  PREPARE_PYTHON=${PYTHON:-.venv/bin/python}
  rm -rf "$CARRY" && mkdir -p "$CARRY/wheels" "$CARRY/minimind_wheels"
  local versions
  versions=$("$PREPARE_PYTHON" -c "import importlib.metadata as m, sys; \
print(' '.join(f'{n}=={m.version(n)}' for n in sys.argv[1:]))" "${OUR_WHEELS[@]}")
  download "$CARRY/wheels" $versions
  download "$CARRY/minimind_wheels" "${MINIMIND_WHEELS[@]}"
  "$PREPARE_PYTHON" -m minimind_jax.bench.gpu_check data "$CARRY/data" "$RECORDS"
  copy_checkout "${MINIMIND_2510:-../minimind-2510}" "$CARRY/minimind-2510"
  copy_checkout "${MINIMIND_V3:-../minimind}" "$CARRY/minimind-v3"
  du -sh "$CARRY"
}

# ---------------------------------------------------------------------------------------------------------------
# run

settings() {  # the real check, or GPU_CHECK_SMOKE=1's tiny one
  BUDGET=330 RESERVE=10 MIN_BENCH=25  # seconds: the whole script, kept for the summary, least worth starting
  M2=minimind2 M2_SMALL=minimind2-small M3_MOE=minimind3-moe
  BATCH=16 MOE_BATCH=8 SEQ=512 PROBE_BATCH=64 WARMUP=2 STEPS=8
  DECODE_BATCHES=1,32 NEW_TOKENS=64 COMPILE_BACKEND=inductor
  if [ "${GPU_CHECK_SMOKE:-0}" = 1 ]; then
    BUDGET=1500 MIN_BENCH=5
    M2=$WORK/tiny2.yaml M2_SMALL=$WORK/tiny2.yaml M3_MOE=$WORK/tiny3_moe.yaml
    printf 'arch: minimind2\nhidden_size: 64\nnum_hidden_layers: 2\n' >"$M2"
    printf 'arch: minimind3\nhidden_size: 64\nnum_hidden_layers: 2\nuse_moe: true\n' >"$M3_MOE"
    BATCH=4 MOE_BATCH=4 SEQ=64 PROBE_BATCH=8 WARMUP=1 STEPS=2
    DECODE_BATCHES=1,2 NEW_TOKENS=4 COMPILE_BACKEND=eager
  fi
}

install_wheels() {
  if ! "$PY" -c "import grain" 2>/dev/null; then  # our side's
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$WORK/site" \
      "$CARRY"/wheels/*.whl || return 1
    export PYTHONPATH=$WORK/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  # MiniMind's pinned transformers, seen by MiniMind's processes alone (through their interpreter, a wrapper).
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$WORK/minimind_site" \
    "$CARRY"/minimind_wheels/*.whl || return 1
  printf '#!/bin/sh\nPYTHONPATH=%s${PYTHONPATH:+:$PYTHONPATH} exec %s "$@"\n' \
    "$WORK/minimind_site" "$(realpath -s "$(command -v "$PY")")" >"$WORK/minimind_python"
  chmod +x "$WORK/minimind_python"
}

bench() {  # name, kind (train|warm|decode|memory), longest it may take in s, main.py bench flags...
  local name=$1 kind=$2 cap=$3
  shift 3
  local left=$((BUDGET - RESERVE - SECONDS)) start=$SECONDS status
  local limit=$((cap < left ? cap : left))
  if [ "$limit" -lt "$MIN_BENCH" ]; then
    echo "== $name: skipped, $left s left"
    status=skipped
  else
    echo "== $name (at most $limit s): main.py bench $*"
    timeout -k 5 "$limit" "$PY" main.py bench "$@" --json >"$WORK/$name.json" 2>"$WORK/$name.log"
    status=$?
    { echo "==== $name: main.py bench $*"; cat "$WORK/$name.log"; } >>"$OUT_DIR/benches.log"
    if [ "$status" -eq 0 ]; then
      "$PY" -c "import json, sys; from minimind_jax.bench.train_step import format_table, decode_lines; \
r = json.load(open(sys.argv[1])); print(format_table(r) if 'rows' in r else '\n'.join(decode_lines(r)))" \
        "$WORK/$name.json"
    else
      echo "$name: exit status $status (124: time limit) after $((SECONDS - start)) s; last lines:"
      tail -n 8 "$WORK/$name.log"
    fi
  fi
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$kind" "$status" "$((SECONDS - start))" "$*" >>"$WORK/status.tsv"
}

checks() {
  local m2510=$CARRY/minimind-2510 v3=$CARRY/minimind-v3 cache=$WORK/xla_cache
  local common=(--max_seq_len "$SEQ" --dtype bfloat16 --num_records "$RECORDS" --data_dir "$CARRY/data")
  local timed=(--warmup "$WARMUP" --steps "$STEPS")
  local versus=(--torch_reference 0 --torch_compile 1 --torch_compile_backend "$COMPILE_BACKEND"
                --torch_python "$WORK/minimind_python" --literal_row 0)
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >"$WORK/gpu.txt" 2>/dev/null \
    && cat "$WORK/gpu.txt"
  echo "installing the carried wheels"
  install_wheels || { echo "no carried wheels in $CARRY (run 'prepare' first)"; return 1; }
  bench minimind2 train 200 --preset "$M2" --batch_size "$BATCH" --minimind_dir "$m2510" "${versus[@]}" \
    --compilation_cache_dir "$cache" "${timed[@]}" "${common[@]}"
  bench minimind2_warm warm 60 --preset "$M2" --batch_size "$BATCH" --no_torch --literal_row 0 \
    --compilation_cache_dir "$cache" --warmup 0 --steps 1 --tokenizer_path "$m2510/model" "${common[@]}"
  bench minimind3_moe train 150 --preset "$M3_MOE" --batch_size "$MOE_BATCH" --minimind_dir "$v3" "${versus[@]}" \
    "${timed[@]}" "${common[@]}"
  bench minimind2_small train 120 --preset "$M2_SMALL" --batch_size "$BATCH" --minimind_dir "$m2510" \
    "${versus[@]}" "${timed[@]}" "${common[@]}"
  bench decode decode 90 --preset "$M2" --decode_only --decode_batch_sizes "$DECODE_BATCHES" \
    --decode_new_tokens "$NEW_TOKENS" --minimind_dir "$m2510" --torch_python "$WORK/minimind_python" "${common[@]}"
  for remat in none full; do
    bench "memory_remat_$remat" memory 70 --preset "$M2" --batch_size "$PROBE_BATCH" --remat "$remat" --no_torch \
      --literal_row 0 --warmup 0 --steps 2 --tokenizer_path "$m2510/model" "${common[@]}"
  done
  bench minimind3_moe_ragged_dot train 60 --preset "$M3_MOE" --batch_size "$MOE_BATCH" --moe_impl ragged_dot \
    --no_torch --literal_row 0 --tokenizer_path "$v3/model" "${timed[@]}" "${common[@]}"
  compile_ablation
}

compile_ablation() {  # where the default step's compile goes: each switch alone, and XLA's GEMM autotuning off
  local left=$((BUDGET - RESERVE - SECONDS)) lines=$OUT_DIR/compile_ablation.jsonl
  if [ "$left" -lt "$MIN_BENCH" ]; then echo "== compile ablation: skipped, $left s left"; return; fi
  echo "== compile ablation (at most $left s): benchmarks/compile_time.py, one JSON line per compile"
  local flags=(--preset "$M2" --batch_size "$BATCH" --max_seq_len "$SEQ" --dtype bfloat16)
  XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_autotune_level=0" timeout -k 5 "$((left / 3))" "$PY" benchmarks/compile_time.py \
    "${flags[@]}" --variants default | tee -a "$lines"
  timeout -k 5 "$((BUDGET - RESERVE - SECONDS))" "$PY" benchmarks/compile_time.py "${flags[@]}" \
    --variants causal_blocks full_logits unrolled | tee -a "$lines"
}

run() {
  PY=${PYTHON:-python3} WORK=${GPU_CHECK_WORK:-/tmp/gpu_check} OUT_DIR=${OUT:-gpu_check_out}
  rm -rf "$WORK" && mkdir -p "$WORK" && : >"$OUT_DIR/benches.log"
  settings
  export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false  # JAX and torch share the GPU
  checks
  "$PY" -m minimind_jax.bench.gpu_check summary "$WORK" "$OUT_DIR/results.json" "$SECONDS"
}

case "${1:-}" in
  prepare) prepare ;;
  run) mkdir -p "${OUT:-gpu_check_out}" && run 2>&1 | tee "${OUT:-gpu_check_out}/gpu_check.log" ;;
  *) echo "usage: $0 prepare|run" >&2; exit 2 ;;
esac
