#!/usr/bin/env bash
# Score each cross-validation fold's model on the cases it never saw, with the full pipeline
# (segment + postprocess + evaluate), and pool the folds into one report.
#
# usage: scripts/crossval.sh RUNS DATA OUT [extra `tiramisu-brats segment` flags]
#   RUNS: folder of fold*/ run folders (train_config.json + model_last.safetensors), as
#         scripts/gpu/train_folds.sh writes; DATA: the labelled case folders; OUT: results.
set -eu
usage="usage: scripts/crossval.sh RUNS DATA OUT [extra \`tiramisu-brats segment\` flags]"
[ $# -ge 3 ] || { echo "$usage" >&2; exit 2; }
runs=$1 data=$2 out=$3
shift 3
shopt -s nullglob
folds=("$runs"/fold*/)
[ ${#folds[@]} -gt 0 ] || { echo "error: $runs: no fold*/ run folders in it" >&2; exit 2; }
for run in "${folds[@]}"; do  # all checked before anything runs
  [ -f "$run/train_config.json" ] || { echo "error: ${run}: no train_config.json" >&2; exit 2; }
done
mkdir -p "$out/predictions"
for run in "${folds[@]}"; do
  fold=$(basename "$run")
  cases=$(python3 -c "import json,sys; print(' '.join(json.load(open(sys.argv[1]))['val_cases']))" "$run/train_config.json")
  mkdir -p "$out/inputs/$fold"
  for c in $cases; do ln -sfn "$(cd "$data/$c" && pwd)" "$out/inputs/$fold/$c"; done
  tiramisu-brats segment "$out/inputs/$fold" -o "$out/predictions" --model "$run/model_last.safetensors" \
    --save-raw --skip-existing --no-progress "$@"
done
tiramisu-brats evaluate "$out/predictions" "$data" -o "$out/report" --overwrite --no-progress
