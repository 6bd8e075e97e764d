#!/usr/bin/env bash
# Disk size of an installed d2gp virtual environment, and how much of it is PyTorch's CUDA
# libraries (the nvidia-* packages pip pulls in with PyPI's Linux torch wheel), for the README's
# install note. Reads the environment only (du); writes benchmarks/results/install_size.txt.
# Usage: benchmarks/install_size.sh [VENV]   (default .venv)
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-.venv}"
site=$(echo "$venv"/lib/python*/site-packages)
out=benchmarks/results/install_size.txt
{
  echo "command: benchmarks/install_size.sh $*"
  echo "date: $(date -Iseconds)"
  echo "machine: $(uname -sm), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')"
  echo "torch: $("$venv"/bin/python -c 'import torch; print(torch.__version__)')"
  echo "venv total: $(du -sh "$venv" | cut -f1)"
  echo "nvidia-* packages: $(du -shc "$site"/nvidia* 2>/dev/null | tail -1 | cut -f1)"
  echo "torch package: $(du -sh "$site"/torch | cut -f1)"
} | tee "$out"
