#!/usr/bin/env bash
# Are two revisions the same trainer? `bash scripts/equality_run.sh REV_A REV_B [OUT]` (issue 10 item 6).
#
# Trains the same two short Stage-1 runs on the tiny model at both revisions (each in its own git worktree,
# with this checkout's .venv): a packed run (random object order, accumulation 2, evaluation every 4 steps,
# token-type metrics and the instability monitor on, checkpoints at 4 and 8) and a padded LoRA run (batch 2),
# then compares them with scripts/compare_runs.py (every logging.jsonl value, every checkpoint tensor bit for
# bit, the pack plans). Exit 0 when both pairs are the same run. Single-threaded (OMP_NUM_THREADS=1).
# RTOL (default 2e-7) is the relative tolerance of logged floats: the same revision run twice differs in the last
# bits of a logged loss at a few steps on this CPU (weights stay bit-equal); RTOL=0 asks for bit-equal logs.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
A=${1:?usage: equality_run.sh REV_A REV_B [OUT]}
B=${2:?usage: equality_run.sh REV_A REV_B [OUT]}
OUT=${3:-$(mktemp -d /tmp/coordexp-equality.XXXXXX)}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 USE_HF=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=1
PY="$ROOT/.venv/bin/python"
DATA="$OUT/data"
if [ ! -f "$DATA/train_bbox.jsonl" ]; then
  mkdir -p "$OUT"
  cat > "$OUT/prepare.yaml" <<YAML
extends: $ROOT/configs/prepare_data/shapes3_bbox.yaml
data:
  convert:
    output_dir: $DATA
YAML
  "$PY" -m application.prepare_data --config "$OUT/prepare.yaml" > "$OUT/prepare.log" 2>&1
fi
write_configs() {  # $1: run output dir
  cat > "$1/packed.yaml" <<YAML
extends: $ROOT/configs/stage1/smoke.yaml
run: {name: packed, output_dir: $1}
data: {train_jsonl: $DATA/train_bbox.jsonl, val_jsonl: $DATA/train_bbox.jsonl, ordering: random}
objective: {token_type_metrics: {enabled: true}, instability_monitor: {enabled: true}}
training: {max_steps: 8, logging_steps: 1, gradient_accumulation_steps: 2, max_length: 2048, save_steps: 4,
           save_total_limit: 2, eval_strategy: steps, eval_steps: 4, report_to: []}
YAML
  cat > "$1/padded.yaml" <<YAML
extends: $ROOT/configs/stage1/smoke.yaml
run: {name: padded, output_dir: $1}
data: {train_jsonl: $DATA/train_bbox.jsonl, val_jsonl: $DATA/train_bbox.jsonl}
objective: {coord_soft_ce_w1: {ce_weight: 0.0}}
training: {packing: false, per_device_train_batch_size: 2, max_steps: 6, logging_steps: 1, save_steps: 6,
           eval_strategy: "no", report_to: [], lora: {enabled: true}}
YAML
}
for side in A B; do
  rev=${!side}
  tree="$OUT/tree_$side"
  [ -d "$tree" ] || git worktree add --detach "$tree" "$rev" > /dev/null
  mkdir -p "$OUT/runs_$side"
  write_configs "$OUT/runs_$side"
  for run in packed padded; do
    (cd "$tree" && "$PY" -m application.train --config "$OUT/runs_$side/$run.yaml" > "$OUT/runs_$side/$run.log" 2>&1) \
      || { echo "training failed at $rev ($run): see $OUT/runs_$side/$run.log" >&2; exit 1; }
  done
done
status=0
for run in packed padded; do
  echo "== $run: $A vs $B"
  "$PY" scripts/compare_runs.py --rtol "${RTOL:-2e-7}" "$OUT/runs_A/$run" "$OUT/runs_B/$run" || status=1
done
git worktree remove --force "$OUT/tree_A" > /dev/null 2>&1 || true
git worktree remove --force "$OUT/tree_B" > /dev/null 2>&1 || true
exit $status
