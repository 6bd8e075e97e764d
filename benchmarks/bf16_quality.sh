#!/usr/bin/env bash
# Does bfloat16 autocast cost PSNR? The same `cpu`-profile training in float32 (--no-autocast) and
# in bfloat16 autocast (--autocast; the denoiser and the NPO in bf16, the operators and the loss in
# float32), on each seed; then all of a task's runs scored together on the test split at K / 2K / 5K
# against the tuned baseline (`d2gp evaluate`, float32 as always), so the two precisions' gap can be
# read against the seeds' spread. Meant for CPUs with bf16 instructions (AMX or AVX512-BF16); on
# others autocast is much slower and this says nothing new.
#
#   bash benchmarks/bf16_quality.sh                      # SPC's D2GP, seeds 0 and 1 (about 45 min on 2 cores)
#   TASKS="spc mri" SEEDS=0 METHOD=supervised bash benchmarks/bf16_quality.sh
#
# Writes $OUT/<task>/ (the evaluation), $OUT/gains.md, $OUT/jobs.txt (each training's start and
# end), $OUT/runs/<task>/<run>/ (config, summary, validation log) and $OUT/machine.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
TASKS=${TASKS:-spc}
SEEDS=${SEEDS:-0 1}
METHOD=${METHOD:-d2gp}
PROFILE=${PROFILE:-cpu}
WORKERS=${WORKERS:-2}
RUNS=${RUNS:-runs/bf16_quality}
OUT=${OUT:-benchmarks/results/bf16_quality}
D2GP=${D2GP:-d2gp}
PYTHON=${PYTHON:-python}
declare -A LIMIT=([spc]="--limit 200" [mri]="" [sr]="")
mkdir -p "$RUNS" "$OUT"
{ grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs
  echo "$(nproc) cores; bf16 flags: $(grep -m1 -o -w -E 'amx_bf16|avx512_bf16' /proc/cpuinfo | sort -u | xargs || true)"
  echo "$(date -u +%Y-%m-%dT%H:%MZ); TASKS=$TASKS SEEDS=$SEEDS METHOD=$METHOD PROFILE=$PROFILE WORKERS=$WORKERS"
} > "$OUT/machine.txt"
train_one() {  # task seed precision
  local run="$3-s$2" flag=--no-autocast began
  [[ $3 == bf16 ]] && flag=--autocast
  mkdir -p "$RUNS/$1"
  began=$(date +%s)
  "$D2GP" --threads 1 train --task "$1" --profile "$PROFILE" --method "$METHOD" --seed "$2" "$flag" \
    --device cpu --out "$RUNS/$1/$run" > "$RUNS/$1/$run.log" 2>&1 || { echo "training $1 $run failed: see $RUNS/$1/$run.log" >&2; return 1; }
  echo "$1 $run $began $(date +%s)" >> "$OUT/jobs.txt"
  mkdir -p "$OUT/runs/$1/$run"
  for file in config.json summary.json log.csv; do
    if [[ -f "$RUNS/$1/$run/$file" ]]; then cp "$RUNS/$1/$run/$file" "$OUT/runs/$1/$run/"; fi
  done
}
export -f train_one
export D2GP RUNS OUT PROFILE METHOD
: > "$OUT/jobs.txt"
for task in $TASKS; do for seed in $SEEDS; do for precision in fp32 bf16; do
  echo "$task $seed $precision"
done; done; done | xargs -P "$WORKERS" -L 1 bash -c 'train_one "$@"' train_one
for task in $TASKS; do
  runs=()
  for seed in $SEEDS; do runs+=("$RUNS/$task/fp32-s$seed" "$RUNS/$task/bf16-s$seed"); done
  "$D2GP" --threads 2 evaluate "${runs[@]}" --split test ${LIMIT[$task]} --device cpu --out "$OUT/$task"
done
"$PYTHON" benchmarks/summarize_gains.py $(for task in $TASKS; do echo "$OUT/$task"; done) --out "$OUT/gains.md"
