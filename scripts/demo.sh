#!/usr/bin/env bash
# Set up .venv if needed, then run the tokensmith demo (writes an HTML report, by default
# tokensmith-demo.html). Extra arguments go to `tokensmith demo`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
bash "$ROOT/scripts/setup.sh"
exec "$ROOT/.venv/bin/tokensmith" demo "$@"
