#!/usr/bin/env bash
# The main job on a fresh machine: set up, convert shapes3 (three real images, boxes), train Stage 1 on the
# embedded tiny Qwen3-VL until it has memorised them, then infer -> evaluate -> visualize on the same images
# and print the headline numbers. Each invocation writes a fresh run folder output/smoke/<timestamp>/
# (the configs it used are kept there), so running it twice never mixes two runs.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 USE_HF=1 TOKENIZERS_PARALLELISM=false
PY=.venv/bin/python
started=$(date +%s)
bash scripts/setup.sh
after_setup=$(date +%s)
echo "setup done in $(( after_setup - started )) s"
echo "== [1/3] convert shapes3 (data/shapes3 -> output/data/shapes3/train_bbox.jsonl)"
"$PY" -m application.prepare_data --config configs/prepare_data/shapes3_bbox.yaml
stamp=$(date +%Y%m%d-%H%M%S)
out="output/smoke/$stamp"
while [ -e "$out" ]; do stamp="$stamp-$$"; out="output/smoke/$stamp"; done
mkdir -p "$out/configs"
cat > "$out/configs/train.yaml" <<YAML
# Written by scripts/smoke.sh: configs/stage1/smoke.yaml with this invocation's own output folder.
extends: $PWD/configs/stage1/smoke.yaml
run:
  output_dir: $out
YAML
cat > "$out/configs/infer.yaml" <<YAML
# Written by scripts/smoke.sh: configs/infer/smoke.yaml on the checkpoint this invocation trained.
extends: $PWD/configs/infer/smoke.yaml
run:
  output_dir: $out
model:
  path: $out/stage1_smoke/checkpoint-150
YAML
echo "== [2/3] train Stage 1 (150 packed steps on the three images; the loss is logged every 25 steps)"
"$PY" -m application.train --config "$out/configs/train.yaml"
echo "== [3/3] infer -> evaluate -> visualize on the same three images"
"$PY" -m application.infer --config "$out/configs/infer.yaml"
echo "main job done in $(( $(date +%s) - after_setup )) s after setup; everything is under $out/"
