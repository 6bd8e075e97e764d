#!/usr/bin/env bash
# A training profile run whole: D2GP and Supervised NPOs on SPC, MRI and SR with `d2gp train
# --profile $PROFILE` (src/d2gp/apps.py's PROFILES), as a queue of six trainings served by $WORKERS
# workers of $THREADS threads each on $DEVICE; then `d2gp evaluate` scores each task's pair on the
# test split (the first 200 SPC digits, all MRI slices and SR crops) against the tuned baseline and
# the teacher at K / 2K / 5K, with restart (its default): $OUT/<task>/table.md, and
# benchmarks/summarize_gains.py puts the gains in one table, $OUT/gains.md. The wrappers
# cpu_profile.sh (two 1-thread workers on a laptop's CPU) and paper_profile.sh (one GPU) set the
# variables; PHASES="train" or "evaluate" runs one phase (e.g. train on a GPU machine, evaluate
# where the runs were copied to).
#
# Written: the training phase's wall time to $OUT/training_wall.txt, each run's start and end to
# $OUT/jobs.txt (a fifth word "stopped" when the DEADLINE stopped it: its last checkpoint and
# best.pt remain, and evaluate scores that best.pt), its seconds per update to its summary.json, its
# log without the progress bars' redraws to $OUT/logs/<task>-<method>.txt, a copy of its
# config.json, summary.json and log.csv to $OUT/runs/<task>/<method>/. A training failing with
# --cuda-graph or --compile among its TRAIN_ARGS_<task> is run again eagerly (its log kept as
# <method>.capture-failed.log); any other failure stops the script and names its log.
set -euo pipefail
cd "$(dirname "$0")/.."
PROFILE=${PROFILE:-cpu}
SEED=${SEED:-0}
TASKS=${TASKS:-spc mri sr}  # a subset, e.g. another seed on one task: SEED=1 TASKS=mri OUT=... RUNS=...
RUNS=${RUNS:-runs/${PROFILE}_profile}
OUT=${OUT:-benchmarks/results/${PROFILE}_profile}
WORKERS=${WORKERS:-2}
THREADS=${THREADS:-1}
DEVICE=${DEVICE:-cpu}
EVAL_DEVICE=${EVAL_DEVICE:-cpu}
PHASES=${PHASES:-train evaluate}
DEADLINE=${DEADLINE:-}  # seconds since the epoch after which running trainings are stopped (none by default)
D2GP=${D2GP:-d2gp}
PYTHON=${PYTHON:-python}
mkdir -p "$RUNS" "$OUT/logs"
# Longest first, so that no worker idles while another still has two runs to go (in the cpu
# profile's run of 2026-11-27, two fixed lanes of one method each left a core idle for the last 12
# minutes). The order is that of the times measured then: SPC D2GP, SR D2GP (teacher targets for
# 2 000 crops), SPC Supervised, SR Supervised, then MRI's two.
ORDER=("spc d2gp" "sr d2gp" "spc supervised" "sr supervised" "mri d2gp" "mri supervised")
attempt() {  # task method [flag ...]: one `d2gp train`, stopped at the DEADLINE; sets began and rc
  began=$(date +%s) rc=0
  local limit=()
  [[ -n "$DEADLINE" ]] && limit=(timeout --signal=TERM "$((DEADLINE > began ? DEADLINE - began : 1))")
  "${limit[@]}" "$D2GP" --threads "$THREADS" train --task "$1" --profile "$PROFILE" --method "$2" --seed "$SEED" \
    --device "$DEVICE" "${@:3}" --out "$RUNS/$1/$2" > "$RUNS/$1/$2.log" 2>&1 || rc=$?
}
train_one() {  # task method: one training, its output to $RUNS/<task>/<method>.log
  mkdir -p "$RUNS/$1"
  local began rc extra_name stopped=""
  extra_name="TRAIN_ARGS_$1"
  local extra=(${!extra_name:-})
  attempt "$1" "$2" "${extra[@]}"
  if [[ $rc -ne 0 && $rc -ne 124 && " ${extra[*]} " =~ " --"(compile|cuda-graph)" " ]]; then
    echo "training $1 $2 failed with --${BASH_REMATCH[1]}: again eagerly (see $RUNS/$1/$2.capture-failed.log)" >&2
    mv "$RUNS/$1/$2.log" "$RUNS/$1/$2.capture-failed.log"
    rm -rf "${RUNS:?}/$1/$2"
    local eager=()
    for arg in "${extra[@]}"; do [[ $arg == --compile || $arg == --cuda-graph ]] || eager+=("$arg"); done
    attempt "$1" "$2" "${eager[@]}"
  fi
  if [[ $rc -eq 124 && -n "$DEADLINE" ]]; then
    stopped=" stopped"
  elif [[ $rc -ne 0 ]]; then
    echo "training $1 $2 failed: see $RUNS/$1/$2.log" >&2
    return 1
  fi
  echo "$1 $2 $began $(date +%s)$stopped" >> "$OUT/jobs.txt"
  tidy_log < "$RUNS/$1/$2.log" > "$OUT/logs/$1-$2.txt"
  mkdir -p "$OUT/runs/$1/$2"  # the run's settings, summary and validation log beside the results
  for file in config.json summary.json log.csv; do
    if [[ -f "$RUNS/$1/$2/$file" ]]; then cp "$RUNS/$1/$2/$file" "$OUT/runs/$1/$2/"; fi
  done
}
tidy_log() {  # a log's messages and each progress bar's last state (tqdm redraws a bar after a \r)
  tr '\r' '\n' | awk '{ gsub(/^[ \t]+|[ \t]+$/, "") }
    /^.*: +[0-9]+%\|/ { key = $0; sub(/: +[0-9]+%\|.*/, "", key)
                         if (bar != "" && key != barkey) print bar
                         bar = $0; barkey = key; next }
    NF { if (bar != "") print bar; bar = ""; print }
    END { if (bar != "") print bar }'
}
export -f attempt train_one tidy_log
export D2GP SEED RUNS OUT PROFILE THREADS DEVICE DEADLINE
if [[ " $PHASES " == *" train "* ]]; then
  : > "$OUT/jobs.txt"  # task, method, start and end (seconds since the epoch) of each training
  start=$(date +%s)
  for job in "${ORDER[@]}"; do
    case " $TASKS " in *" ${job%% *} "*) echo "$job" ;; esac
  done | xargs -P "$WORKERS" -L 1 bash -c 'train_one "$@"' train_one
  end=$(date +%s)
  if [[ $DEVICE == cpu ]]; then
    machine="$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores"
  else
    machine="$("$PYTHON" -c 'import torch; print(torch.cuda.get_device_name())' 2>/dev/null || echo "$DEVICE")"
  fi
  printf 'training phase: %d s wall (%.1f min), both methods, tasks %s, seed %s, %s workers of %s threads on %s; %s; %s\n' \
    $((end - start)) "$(awk "BEGIN {print ($end - $start) / 60}")" "$TASKS" "$SEED" "$WORKERS" "$THREADS" "$DEVICE" \
    "$(date -u +%Y-%m-%dT%H:%MZ)" "$machine" > "$OUT/training_wall.txt"
fi
if [[ " $PHASES " == *" evaluate "* ]]; then
  declare -A LIMIT=([spc]="--limit 200" [mri]="" [sr]="")
  for task in $TASKS; do
    # shellcheck disable=SC2086
    "$D2GP" --threads 2 evaluate "$RUNS/$task/d2gp" "$RUNS/$task/supervised" --split test ${LIMIT[$task]} \
      --device "$EVAL_DEVICE" --out "$OUT/$task"
  done
  # shellcheck disable=SC2046
  "$PYTHON" benchmarks/summarize_gains.py $(for task in $TASKS; do echo "$OUT/$task"; done) --out "$OUT/gains.md"
fi
