#!/usr/bin/env bash
# The project's test command: import contracts, strict typing of the core, then the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 USE_HF=1 TOKENIZERS_PARALLELISM=false
BIN=.venv/bin
echo "== lint-imports"
"$BIN/lint-imports"
echo "== mypy --strict domain ports application"
"$BIN/mypy" --strict domain ports application
echo "== pytest"
set +e
"$BIN/python" -m pytest "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no test: failing" >&2
  exit 1
fi
exit "$rc"
