#!/usr/bin/env bash
# Trains the DnCNN denoisers shipped in src/d2gp/weights/ (the exact commands that made them).
# Each writes dncnn_<task>.pt and dncnn_<task>.json (training history, command, machine, date).
# About 30 minutes on 2 CPU cores in all; then benchmarks/reconstruct_baselines.sh checks stability to K = 100.
# MRI uses σ_min = 0: trained on σ ∈ [0.01, 0.2] its DnCNN, iterated, drifted away from clean images and
# PnP-FISTA diverged past K = 20 (student 21.5 dB at K = 20, 10.1 at K = 100).
# train-denoiser never overwrites its --out: delete the old dncnn_<task>.pt and .json first to retrain one.
set -euo pipefail
cd "$(dirname "$0")/.."
W=src/d2gp/weights
d2gp --threads 2 train-denoiser --task spc --epochs 25 --sigma-min 0.01 --sigma-max 0.2 --out $W/dncnn_spc.pt "$@"
d2gp --threads 2 train-denoiser --task mri --epochs 120 --sigma-min 0 --sigma-max 0.2 --out $W/dncnn_mri.pt "$@"
d2gp --threads 2 train-denoiser --task sr --epochs 20 --sigma-min 0.01 --sigma-max 0.2 --out $W/dncnn_sr.pt "$@"
