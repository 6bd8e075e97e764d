#!/usr/bin/env bash
# The `paper` profile on one GPU: D2GP and Supervised NPOs on SPC, MRI and SR with every training
# image for 30 epochs in batches of 32 (SPC 3 750 updates, SR 1 890, MRI 180). Each training
# replays its update as a CUDA graph (--cuda-graph: an eager update is launch-bound,
# benchmarks/gpu_step.py), and the six run at once, as six processes of 2 CPU threads sharing the
# GPU, so that one's teacher targets, validations and start-up overlap the others' updates. Then
# the evaluation on the test split (benchmarks/run_profile.sh says what each writes; PHASES=train
# trains only, e.g. on a GPU machine, and PHASES=evaluate scores the runs where they were copied to).
export PROFILE=paper WORKERS=${WORKERS:-6} THREADS=${THREADS:-2} DEVICE=${DEVICE:-cuda}
export TRAIN_ARGS_spc=${TRAIN_ARGS_spc---cuda-graph} TRAIN_ARGS_mri=${TRAIN_ARGS_mri---cuda-graph} \
  TRAIN_ARGS_sr=${TRAIN_ARGS_sr---cuda-graph}
exec bash "$(dirname "$0")/run_profile.sh"
