#!/usr/bin/env bash
# Student and teacher PnP-FISTA (identity preconditioner, γ = 1/‖AᵀA‖) on the test split of each
# task's embedded default data, with the shipped denoisers, to K = 100: the numbers of the README's
# baseline table, and the check that each shipped denoiser keeps PnP-FISTA stable to K = 100.
# Results (table.md/csv, results.json with command, machine and date, PNGs) go to
# benchmarks/results/reconstruct-<task>/. A few minutes on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
for task in spc mri sr; do
  d2gp --threads 2 reconstruct --task "$task" --iterations 100 --report 0,1,5,10,20,50,100 \
       --out "benchmarks/results/reconstruct-$task" "$@"
done
python benchmarks/summarize_baselines.py
