#!/usr/bin/env bash
# Does the cheaper CPU step cost PSNR? D2GP on SPC with the full unroll (backpropagation through all
# K = 20 iterations) against --unroll truncated --truncate 5 and --truncate 3 (the last 5 or 3 only:
# 1.79 s against 3.16 s per update at batch 32 for 5, benchmarks/results/training_speed/u-net-default/),
# two seeds each, the quick profile's settings with 512 updates (cosine schedule). The six trainings
# run as two 1-thread processes side by side (each takes one run of every variant, so both finish
# together; finished runs in RUNS are reused); then one evaluation per seed (benchmarks/d2gp_variants.py:
# validation split, 200 digits, K / 2K / 5K, with restart) writes benchmarks/results/truncated_unroll/seed<N>/.
# About 45 minutes on 2 CPU cores from nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
UPDATES=${UPDATES:-512}
RUNS=${RUNS:-runs/truncated_unroll}
OUT=${OUT:-benchmarks/results/truncated_unroll}
variants() {  # seed, variants..., then d2gp_variants.py options
  local seed=$1; shift
  python benchmarks/d2gp_variants.py --task spc --seed "$seed" --set updates="$UPDATES" --references --runs "$RUNS" "$@"
}
(variants 0 --variants d2gp --threads 1 --train-only && variants 1 --variants truncated-5 --threads 1 --train-only \
  && variants 0 --variants truncated-3 --threads 1 --train-only) &
first=$!
(variants 0 --variants truncated-5 --threads 1 --train-only && variants 1 --variants d2gp --threads 1 --train-only \
  && variants 1 --variants truncated-3 --threads 1 --train-only) &
second=$!
wait $first
wait $second
for seed in 0 1; do
  variants $seed --variants d2gp truncated-5 truncated-3 --threads 2 --out "$OUT/seed$seed"
done
