#!/usr/bin/env bash
# Set up .venv if needed, then run every check CI runs:
#   ruff (lint), pytest (tests/, including every examples/*.py), mkdocs build --strict.
# All checks run even if one fails; exits non-zero if any failed.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 MPLBACKEND=Agg PYTHONDONTWRITEBYTECODE=1 NO_MKDOCS_2_WARNING=1

if ! bash scripts/setup.sh; then
  echo "test.sh: FAILED (setup)"
  exit 1
fi
BIN="$ROOT/.venv/bin"
FAILED=()
PASSED=()
step() {  # step NAME CMD...
  local name="$1"; shift
  echo "== $name: $*"
  local start=$SECONDS rc=0
  "$@" || rc=$?
  if [[ "$name" == pytest && $rc -eq 5 ]]; then
    echo "test.sh: pytest collected no tests: that counts as a failure"
  fi
  if [[ $rc -eq 0 ]]; then
    PASSED+=("$name")
    echo "== $name: ok ($((SECONDS - start)) s)"
  else
    FAILED+=("$name")
    echo "== $name: FAILED with exit code $rc ($((SECONDS - start)) s)"
  fi
}

LINT_PATHS=()
for d in src tests examples benchmarks; do [[ -e "$d" ]] && LINT_PATHS+=("$d"); done
step ruff "$BIN/ruff" check "${LINT_PATHS[@]}"

step pytest "$BIN/python" -m pytest -q

SITE="$(mktemp -d "${TMPDIR:-/tmp}/tokensmith-site.XXXXXX")"
step mkdocs "$BIN/mkdocs" build --strict -d "$SITE"
rm -rf "$SITE"

if [[ ${#FAILED[@]} -eq 0 ]]; then
  echo "test.sh: ALL CHECKS PASSED (${PASSED[*]})"
  exit 0
fi
echo "test.sh: FAILED (${FAILED[*]}); passed: ${PASSED[*]:-none}"
exit 1
