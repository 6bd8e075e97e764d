#!/usr/bin/env bash
# The `cpu` profile run whole, as a laptop user would: D2GP and Supervised NPOs on SPC, MRI and SR
# (SPC 1 500 updates of 8 digits, MRI and SR 500 of 4; truncated backpropagation through the last
# 5 iterations; src/d2gp/apps.py's PROFILES). The two methods train as two 1-thread processes side
# by side, each taking its three tasks one after the other; the wall time of that phase goes to
# $OUT/training_wall.txt (each run's seconds per update to its summary.json). Then `d2gp evaluate`
# scores each task's pair on the test split (the first 200 SPC digits, all MRI slices and SR crops)
# against the tuned baseline and the teacher at K / 2K / 5K, with restart (its default):
# $OUT/<task>/table.md, and benchmarks/summarize_gains.py puts the gains in one table, $OUT/gains.md.
# The aim (issue #9): both methods on the three tasks within 60 minutes. Run it under
# `/usr/bin/time -v -o $OUT/time.txt` for the whole call's time and memory.
set -euo pipefail
cd "$(dirname "$0")/.."
SEED=${SEED:-0}
TASKS=${TASKS:-spc mri sr}  # a subset, e.g. another seed on one task: SEED=1 TASKS=mri OUT=... RUNS=...
RUNS=${RUNS:-runs/cpu_profile}
OUT=${OUT:-benchmarks/results/cpu_profile}
D2GP=${D2GP:-d2gp}
PYTHON=${PYTHON:-python}
mkdir -p "$RUNS" "$OUT"
lane() {  # method: its trainings (one per task), one after the other, on one thread
  for task in $TASKS; do
    "$D2GP" --threads 1 train --task "$task" --profile cpu --method "$1" --seed "$SEED" --device cpu \
      --out "$RUNS/$task/$1"
  done
}
start=$(date +%s)
lane d2gp > "$RUNS/d2gp.log" 2>&1 &
first=$!
lane supervised > "$RUNS/supervised.log" 2>&1 &
second=$!
wait $first
wait $second
end=$(date +%s)
printf 'training phase: %d s wall (%.1f min), both methods, tasks %s, seed %s, two 1-thread processes; %s; %s\n' \
  $((end - start)) "$(awk "BEGIN {print ($end - $start) / 60}")" "$TASKS" "$SEED" "$(date -u +%Y-%m-%dT%H:%MZ)" \
  "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores" > "$OUT/training_wall.txt"
declare -A LIMIT=([spc]="--limit 200" [mri]="" [sr]="")
for task in $TASKS; do
  # shellcheck disable=SC2086
  "$D2GP" --threads 2 evaluate "$RUNS/$task/d2gp" "$RUNS/$task/supervised" --split test ${LIMIT[$task]} \
    --device cpu --out "$OUT/$task"
done
# shellcheck disable=SC2046
"$PYTHON" benchmarks/summarize_gains.py $(for task in $TASKS; do echo "$OUT/$task"; done) --out "$OUT/gains.md"
