#!/usr/bin/env bash
# Creates .venv (if missing) and installs CoordExp with its dev + semantic extras, offline-safe.
# On a CPU machine like the project's, torch/torchvision are pinned by constraints/cpu.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --progress-bar on --upgrade pip
echo "setup: installing torch + torchvision (a CUDA build that runs on CPU; the finished .venv is ~7 GB)"
.venv/bin/python -m pip install --progress-bar on -c constraints/cpu.txt torch torchvision
echo "setup: installing CoordExp with its dev, semantic and lvis extras"
.venv/bin/python -m pip install --progress-bar on -c constraints/cpu.txt -e '.[dev,semantic,lvis]'
echo "setup: ok ($(.venv/bin/python -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'))"
