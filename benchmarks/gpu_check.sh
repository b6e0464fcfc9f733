#!/usr/bin/env bash
# GPU check: `main.py bench` on one CUDA GPU in bfloat16, our step against PyTorch MiniMind with bf16 autocast.
#
# It runs on any CUDA machine without network access, so the wheels and data are prepared beforehand:
#
#   benchmarks/gpu_check.sh prepare    # on a machine with PyPI (and ../shared for MiniMind's 2510 tokenizer):
#                                      # fills .cache/gpu_check/ with the wheels a CUDA JAX image usually
#                                      # lacks (grain, array_record, portpicker), the chat-corpus subset and
#                                      # the tokenizer (.cache/ is git-ignored: nothing of it is committed)
#   benchmarks/gpu_check.sh run        # on the CUDA machine, from a copy of the repository that includes
#                                      # .cache/gpu_check/; needs no network
#
# `run` uses the jax/jaxlib (CUDA plugin), flax, optax and torch (CUDA build) already installed on that machine,
# adds the prepared wheels with pip --no-index, and runs, each under its own time limit:
#   1. minimind2-small, batch 16 × 512, bf16, --ablation: the default step (the GPU's fast path), MiniMind's
#      literal step, each fast-path switch alone on it, packing, and the fast path with packing, each against
#      the PyTorch step in its own process (about 3 minutes);
#   2. minimind2, batch 16 × 512, bf16: packing + the fast path with cuDNN attention against PyTorch, and the
#      decode benchmark (about 1 minute); if cuDNN refuses the shapes, the same with the default attention.
# It prints the versions and the device, then each bench's table (tokens/s, loss tokens/s, ratio to torch
# with its spread, MFU against the H200's spec-sheet peak, compile time, recompilations, XLA memory and the
# devices' peak memory, data-wait fraction); the JSON and logs go to $OUT (or ./gpu_check_out).
# It has not been run yet: the runtimes above are estimates, and the whole script stops itself by 300 s.
set -uo pipefail
cd "$(dirname "$0")/.."
CARRY=.cache/gpu_check
RECORDS=2000

prepare() {
  set -e
  local python=${PYTHON:-.venv/bin/python}
  rm -rf "$CARRY" && mkdir -p "$CARRY/wheels" "$CARRY/data/corpus"
  local versions
  versions=$("$python" -c "import importlib.metadata as m; print(' '.join(f'{n}=={m.version(n)}' for n in ('grain', 'array_record', 'portpicker')))")
  "$python" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform any -d "$CARRY/wheels" $versions
  "$python" - "$CARRY/data" "$RECORDS" <<'PY'
import pathlib, shutil, sys, tempfile
from minimind_jax.corpus import build_corpus
data_dir, records = pathlib.Path(sys.argv[1]), int(sys.argv[2])
with tempfile.TemporaryDirectory() as tmp:
    paths = build_corpus(tmp)
    lines = paths["sft"].read_text("utf-8").splitlines(keepends=True)[:records]
    (data_dir / f"sft_first_{records}.jsonl").write_text("".join(lines), "utf-8")
    shutil.copy(paths["stats"], data_dir / "corpus" / "stats.json")
PY
  if [ -d ../shared/minimind/2510 ]; then cp -r ../shared/minimind/2510 "$CARRY/tokenizer_2510" && chmod -R u+w "$CARRY"; fi
  du -sh "$CARRY"
}

run() {
  local out=${OUT:-gpu_check_out}
  mkdir -p "$out"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/gpu_check_site \
    "$CARRY"/wheels/*.whl || { echo "no carried wheels in $CARRY (run 'prepare' first)"; return 1; }
  export PYTHONPATH=/tmp/gpu_check_site:$PWD PYTHONUNBUFFERED=1
  export XLA_PYTHON_CLIENT_PREALLOCATE=false  # JAX and torch share the GPU
  local tokenizer=()
  if [ -d "$CARRY/tokenizer_2510" ]; then tokenizer=(--tokenizer_path "$CARRY/tokenizer_2510"); fi
  local common=(--batch_size 16 --max_seq_len 512 --dtype bfloat16 --steps 20 --warmup 3
                --num_records "$RECORDS" --data_dir "$CARRY/data" "${tokenizer[@]}")
  nvidia-smi -L
  python3 -c "import jax, jaxlib, flax, optax, torch; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, \
'flax', flax.__version__, 'optax', optax.__version__, 'torch', torch.__version__, 'cuda', torch.cuda.is_available()); \
print(jax.devices())"
  local start=$SECONDS
  bench() {  # name, time limit, flags...
    local name=$1 limit=$2
    shift 2
    echo "== $name: main.py bench $*"
    timeout "$limit" python3 main.py bench "$@" --json >"$out/$name.json" 2>"$out/$name.log"
    local status=$?
    if [ $status -eq 0 ]; then
      python3 -c "import json, sys; from minimind_jax.bench import format_table; \
print(format_table(json.load(open(sys.argv[1]))))" "$out/$name.json"
    else
      echo "$name: exit status $status (124 = time limit); last lines of $out/$name.log:"
      tail -n 15 "$out/$name.log"
    fi
    return $status
  }
  bench small_ablation 190 --preset minimind2-small --ablation "${common[@]}"
  local fast=(--preset minimind2 --packing --decode "${common[@]}")
  if ! bench minimind2_fast $((290 - (SECONDS - start))) --attention_impl cudnn "${fast[@]}" \
      && [ $((290 - (SECONDS - start))) -gt 60 ]; then  # cuDNN refused these shapes: the default attention
    bench minimind2_fast_default_attention $((290 - (SECONDS - start))) "${fast[@]}"
  fi
  echo "gpu_check: $((SECONDS - start)) s of benches"
}

case "${1:-}" in
  prepare) prepare ;;
  run) run ;;
  *) echo "usage: $0 prepare|run" >&2; exit 2 ;;
esac
