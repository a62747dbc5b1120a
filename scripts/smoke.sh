#!/usr/bin/env bash
# The main job on a fresh machine: set up, convert shapes3 (real images), train Stage 1 on the tiny model.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 USE_HF=1 TOKENIZERS_PARALLELISM=false
bash scripts/setup.sh
.venv/bin/python -m application.prepare_data --config configs/prepare_data/shapes3.yaml
.venv/bin/python -m application.prepare_data --config configs/prepare_data/shapes3_val.yaml
.venv/bin/python -m application.train --config configs/stage1/smoke.yaml
