#!/usr/bin/env bash
# Train the k folds of a cross-validation at once on one GPU, each for a fixed number of
# minutes, with the tiramisu-brats CLI. Every fold writes a run folder (log.csv, curves.png,
# checkpoint.safetensors, model_last/best.safetensors) under RUNS.
#
# usage: scripts/gpu/train_folds.sh CACHE RUNS MINUTES FOLDS [extra `tiramisu-brats train` flags]
#   CACHE: a folder of labelled cases or a training cache (scripts/gpu/pack_cache.py packs the
#   cases to travel, scripts/gpu/unpack_cache.py builds the cache from them there)
# Recipe of the fold-0 model (shipped two versions before): MINUTES=7.5, FOLDS=5, flags below
# (see docs/model-card.md, "The fold-0 model").
set -u
if [ $# -lt 4 ]; then
  echo "usage: scripts/gpu/train_folds.sh CACHE RUNS MINUTES FOLDS [extra \`tiramisu-brats train\` flags]" >&2
  exit 2
fi
cache=$1 runs=$2 minutes=$3 folds=$4
[[ $folds =~ ^[1-9][0-9]*$ ]] || { echo "error: FOLDS must be a positive integer, got $folds" >&2; exit 2; }
shift 4
mkdir -p "$runs"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | tee "$runs/gpu.txt"
pids=()
for ((i = 0; i < folds; i++)); do
  OMP_NUM_THREADS=2 python3 -m tiramisu_brats train "$cache" -o "$runs/fold$i" \
    --fold "$i/$folds" --minutes "$minutes" --epochs 100000 --steps-per-epoch 100 \
    --batch-size 32 --patch 192 160 --schedule cosine --loss dice_ce --no-progress "$@" \
    >"$runs/fold$i.log" 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
for ((i = 0; i < folds; i++)); do echo "fold $i: $(tail -n 2 "$runs/fold$i.log" | head -n 1)"; done
exit $status
