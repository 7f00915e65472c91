#!/usr/bin/env bash
# Every GPU check in one script, capped at 8 minutes in all (475 s of
# per-benchmark caps) on one H100/H200, writing
# $OUT/gpu_table.md (a table of every figure) plus one JSON per benchmark. No Ray, no network:
# each benchmark drives a stage worker directly with real-size architectures at random weights.
#
#   here:        bash bench/gpu_wheels.sh                      # once: wheels the GPU image lacks
#   GPU machine: python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
#                  --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD; \
#                bash bench/gpu.sh
#   CPU smoke:   bash bench/gpu.sh --tiny                      # same script, tiny models
#
# Each benchmark has a hard time cap; one that runs out or fails is marked in the table and the
# rest still run. Record the table in bench/RESULTS.md with the date and the device.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-}:$PWD TOKENIZERS_PARALLELISM=false
tiny=()
gpu=1
if [ "${1:-}" = "--tiny" ]; then tiny=(--tiny); gpu=""; fi
size() { [ -n "$gpu" ] && echo "$@"; }  # GPU-only size flags (the --tiny defaults are small)

run() {  # name, seconds, command…
  local name=$1 cap=$2; shift 2
  [ -n "$gpu" ] || cap=$((cap * 4))  # the CPU smoke run is slower; the caps are the GPU's
  local t0=$SECONDS
  timeout --signal=INT --kill-after=15 "$cap" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "| $name | rc=$rc | $((SECONDS - t0)) s | $OUT/$name.log |" >>"$OUT/gpu_runs.md"
  echo "$name: rc=$rc in $((SECONDS - t0)) s"
}

: >"$OUT/gpu_runs.md"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | tee "$OUT/device.txt"
# Order: cheapest first, so a short lease still yields figures.
run gpu_score 70 $PY bench/gpu_score.py "${tiny[@]}" $(size --n 4096) --json "$OUT/gpu_score.json"
run gpu_sample 70 $PY bench/gpu_sample.py "${tiny[@]}" $(size --reps 3) --out "$OUT/gpu_sample.json"
run gpu_features 80 $PY bench/gpu_features.py "${tiny[@]}" --reps 1 --vae-dtype fp32 --out "$OUT/gpu_features.json"
run gpu_caption 90 $PY bench/gpu_caption.py "${tiny[@]}" $(size --n 192 --batch-sizes 64) --cache dynamic --out "$OUT/gpu_caption.json"
run gpu_train 75 $PY bench/gpu_train.py "${tiny[@]}" --out "$OUT/gpu_train.json"
# LCM, ControlNet, DreamBooth in the one loop vs the bare step of the same work (target >= 0.9)
run gpu_objectives 90 $PY bench/gpu_objectives.py "${tiny[@]}" --out "$OUT/gpu_objectives.json"
$PY bench/gpu_table.py "$OUT" | tee "$OUT/gpu_table.md"
