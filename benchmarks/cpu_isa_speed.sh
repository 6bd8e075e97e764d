#!/usr/bin/env bash
# The training step on the CPUs this one stands for, by capping the instructions PyTorch's kernels
# may use (oneDNN: the convolutions; ATen: the elementwise kernels; results.json records the caps):
#   native/       this CPU (on an AMX Xeon: bfloat16 by default, d2gp.device.use_bf16);
#   avx512_bf16/  AVX-512 with bf16 instructions but no AMX tiles (like AMD Zen 4): the default
#                 stays float32 (cpu_has_amx_bf16 sees the cap) against bf16 autocast forced on;
#   avx2/         AVX2 only (AMD Zen 2/3, most laptops), and bf16 forced on there (avx2_bf16/, two
#                 updates: it is tens of seconds each).
# Only the instructions change: the clock, caches and memory stay this machine's. Each table times
# `before` (the original step) in the same run, and gives the update's GFLOP and the rate sustained.
# About 15 minutes on 2 CPU cores. Usage: bash benchmarks/cpu_isa_speed.sh [OUT] [STEPS]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/results/training_speed/isa}
STEPS=${2:-6}
PYTHON=${PYTHON:-python}
speed() {  # out, configurations...
  local out=$1; shift
  "$PYTHON" benchmarks/training_speed.py --threads 2 --steps "$STEPS" --out "$OUT/$out" --configs "$@"
}
speed native before "default, float32" default "default + truncated (last 5)"
ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16 speed avx512_bf16 before default "default + bf16 autocast" \
  "default + truncated (last 5)"
export ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2
speed avx2 before default "default + truncated (last 5)"
STEPS=2 speed avx2_bf16 "default + bf16 autocast"
