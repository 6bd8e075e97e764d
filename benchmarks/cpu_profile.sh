#!/usr/bin/env bash
# The `cpu` profile run whole, as a laptop user would: D2GP and Supervised NPOs on SPC, MRI and SR
# (SPC 1 500 updates of 8 digits, MRI and SR 500 of 4; truncated backpropagation through the last
# 3 iterations, on SR the last 5; src/d2gp/apps.py's PROFILES), the six trainings as a queue served
# by two 1-thread workers, then the evaluation on the test split (benchmarks/run_profile.sh says
# what each writes). The aim (issue #9): both methods on the three tasks within 60 minutes. Run it
# under `/usr/bin/time -v -o $OUT/time.txt` for the whole call's time and memory.
export PROFILE=cpu WORKERS=${WORKERS:-2} THREADS=${THREADS:-1} DEVICE=${DEVICE:-cpu}
exec bash "$(dirname "$0")/run_profile.sh"
