"""Run every ``examples/*.py`` (jupytext percent-format notebooks) as a script.

Each example runs in a fresh subprocess with this interpreter, in a temporary working
directory (so files it writes do not land in the repo), offline (``HF_HUB_OFFLINE=1``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "examples"
EXAMPLES = sorted(EXAMPLES_DIR.glob("*.py"))
TIMEOUT_S = 600


def _tail(text: str, n: int = 60) -> str:
    return "\n".join(text.splitlines()[-n:])


@pytest.mark.slow
@pytest.mark.parametrize("example", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_runs(example: Path, tmp_path: Path) -> None:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", MPLBACKEND="Agg", PYTHONUNBUFFERED="1")
    try:
        proc = subprocess.run(
            [sys.executable, str(example)],
            cwd=tmp_path,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
        )
    except subprocess.TimeoutExpired as exc:
        stderr = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else exc.stderr or ""
        pytest.fail(
            f"{example.name} did not finish within {TIMEOUT_S} s\n--- stderr (tail) ---\n{_tail(stderr)}"
        )
    assert proc.returncode == 0, (
        f"{example.name} exited with code {proc.returncode}\n"
        f"--- stdout (tail) ---\n{_tail(proc.stdout, 20)}\n"
        f"--- stderr (tail) ---\n{_tail(proc.stderr)}"
    )
