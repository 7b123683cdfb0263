#!/usr/bin/env bash
# Train the learned reducers shipped for the bundled reference model (backbone frozen, 1 epoch of the
# Fashion-MNIST training set each, the methods' own optimisers and learning rates) and copy them into
# the package.  Needs the Debian package dataset-fashion-mnist (or FASHION_MNIST=DIR, a folder of its idx
# files).  About 18 minutes on 2 CPU cores.  The reference model itself is trained by
# scripts/train_reference.py; retrain the reducers whenever it changes.
#
#   bash scripts/train_reference_reducers.sh [RUNS_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-runs/reducers}
dest=src/tokenreduce/data/reducers
mkdir -p "$dest"
train() {  # name, then `tokenreduce train` arguments
  local name=$1; shift
  tokenreduce train ${FASHION_MNIST:+--data-dir "$FASHION_MNIST"} --out "$runs/$name" --threads 2 --no-progress "$@"
  cp "$runs/$name/reducer.safetensors" "$dest/$name.safetensors"
}
train ltmp_0.75   --method ltmp --param target=0.75
train ltmp_0.6    --method ltmp --param target=0.6
train dynamicvit  --method dynamicvit
train dtps        --method tps --param variant=dtps
train cropr       --method cropr --param p=4
