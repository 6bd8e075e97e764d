#!/usr/bin/env bash
# The `cpu` profile run whole, as a laptop user would: D2GP and Supervised NPOs on SPC, MRI and SR
# (SPC 1 500 updates of 8 digits, MRI and SR 500 of 4; truncated backpropagation through the last
# 3 iterations, on SR the last 5; src/d2gp/apps.py's PROFILES). The six trainings run on two 1-thread
# workers (below); the wall time of that phase goes to $OUT/training_wall.txt, each run's start and
# end to $OUT/jobs.txt (its seconds per update to its summary.json), its log without the progress
# bars' redraws to $OUT/logs/<task>-<method>.txt. Then `d2gp evaluate`
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
mkdir -p "$RUNS" "$OUT/logs"
# The six trainings as a queue served by two 1-thread workers (xargs -P 2), longest first, so that
# neither core idles while the other still has two runs to go (in the run of 2026-11-27, two fixed
# lanes of one method each left a core idle for the last 12 minutes). The order is that of the
# times measured then: SPC D2GP, SR D2GP (teacher targets for 2 000 crops), SPC Supervised, SR
# Supervised, then MRI's two.
ORDER=("spc d2gp" "sr d2gp" "spc supervised" "sr supervised" "mri d2gp" "mri supervised")
train_one() {  # task method: one training on one thread, its output to $RUNS/<task>/<method>.log
  mkdir -p "$RUNS/$1"
  local began
  began=$(date +%s)
  "$D2GP" --threads 1 train --task "$1" --profile cpu --method "$2" --seed "$SEED" --device cpu \
    --out "$RUNS/$1/$2" > "$RUNS/$1/$2.log" 2>&1 || { echo "training $1 $2 failed: see $RUNS/$1/$2.log" >&2; return 1; }
  echo "$1 $2 $began $(date +%s)" >> "$OUT/jobs.txt"
  tidy_log < "$RUNS/$1/$2.log" > "$OUT/logs/$1-$2.txt"
}
tidy_log() {  # a log's messages and each progress bar's last state (tqdm redraws a bar after a \r)
  tr '\r' '\n' | awk '{ gsub(/^[ \t]+|[ \t]+$/, "") }
    /^.*: +[0-9]+%\|/ { key = $0; sub(/: +[0-9]+%\|.*/, "", key)
                         if (bar != "" && key != barkey) print bar
                         bar = $0; barkey = key; next }
    NF { if (bar != "") print bar; bar = ""; print }
    END { if (bar != "") print bar }'
}
export -f train_one tidy_log
export D2GP SEED RUNS OUT
: > "$OUT/jobs.txt"  # task, method, start and end (seconds since the epoch) of each training
start=$(date +%s)
for job in "${ORDER[@]}"; do
  case " $TASKS " in *" ${job%% *} "*) echo "$job" ;; esac
done | xargs -P 2 -L 1 bash -c 'train_one "$@"' train_one
end=$(date +%s)
printf 'training phase: %d s wall (%.1f min), both methods, tasks %s, seed %s, two 1-thread workers; %s; %s\n' \
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
