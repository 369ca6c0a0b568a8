"""``attribute_dataset``: one attribution per row of a ``datasets.Dataset``, written as it goes, resumable.

Each finished example is appended to a JSON Lines file as one line
``{"id": ..., "index": i, "result": AttributionResult.to_dict(), "metrics": {...}}`` (or ``"error"``), flushed
and fsynced, so a crash loses at most the example in flight. Running the same call again reads the file,
skips every id already there (finished or failed, unless ``retry_errors=True``) and drops a last line that
was cut off mid-write. The returned :class:`AttributionRecords` is in input order.

    >>> import tempfile, datasets, tokensmith as ts
    >>> from tokensmith.attribution import attribute_dataset
    >>> ds = datasets.Dataset.from_dict({"prompt": ["The sky is", "Grass is"], "target": [" blue", " green"]})
    >>> path = tempfile.mkdtemp() + "/attr.jsonl"
    >>> recs = attribute_dataset(ts.tiny("llama"), ds, path, method="input_x_gradient", progress=False)
    >>> len(recs), recs.computed, recs[0].shape[0]
    (2, 2, 1)
    >>> attribute_dataset(ts.tiny("llama"), ds, path, method="input_x_gradient", progress=False).computed
    0
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokensmith.attribution.api import attribute
from tokensmith.attribution.progress import progress_scope, steps
from tokensmith.attribution.result import AttributionResult

__all__ = ["attribute_dataset", "AttributionRecords", "read_records"]


@dataclass
class AttributionRecords:
    """The results of :func:`attribute_dataset`, in input order.

    Attributes:
        ids: the example ids.
        results: one :class:`AttributionResult` per id (None where the example failed).
        metrics: per-example metric dicts (empty without ``metrics=``).
        errors: ``{id: message}`` of failed examples.
        path: the JSON Lines file.
        computed: how many examples this call computed (the rest were read back).
    """

    ids: list[Any]
    results: list[AttributionResult | None]
    metrics: list[dict[str, float]] = field(default_factory=list)
    errors: dict[Any, str] = field(default_factory=dict)
    path: Path | None = None
    computed: int = 0

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> AttributionResult | None:
        return self.results[i]

    def __iter__(self) -> Iterator[AttributionResult | None]:
        return iter(self.results)

    def to_pandas(self) -> Any:
        """Tidy table over every example: the ``AttributionResult.to_pandas()`` rows plus an ``id`` column."""
        import pandas as pd

        frames = []
        for i, r in zip(self.ids, self.results, strict=True):
            if r is not None:
                df = r.to_pandas()
                df.insert(0, "id", i)
                frames.append(df)
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()

    def metrics_frame(self) -> Any:
        """One row per example with its metrics (``id`` first)."""
        import pandas as pd

        return pd.DataFrame([{"id": i, **m} for i, m in zip(self.ids, self.metrics, strict=True)])


def read_records(path: str | Path, repair: bool = False) -> dict[Any, dict[str, Any]]:
    """The complete records of a results file by id (the last record of an id wins).

    A final line without its newline (a write cut off by a crash) is ignored, and with ``repair=True``
    removed from the file. A malformed line elsewhere raises a ValueError (the file is not ours).
    """
    p = Path(path)
    if not p.exists():
        return {}
    raw = p.read_bytes()
    good = raw.rfind(b"\n") + 1  # everything after the last newline is a torn write
    if repair and good < len(raw):
        with open(p, "r+b") as fh:
            fh.truncate(good)
    out: dict[Any, dict[str, Any]] = {}
    for n, line in enumerate(raw[:good].splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{p}:{n} is not a JSON record written by attribute_dataset ({e}); use another path") from e
        if not isinstance(rec, dict) or "id" not in rec:
            raise ValueError(f"{p}:{n} is not a record written by attribute_dataset; use another path")
        out[_key(rec["id"])] = rec
    return out


def _key(x: Any) -> Any:
    return tuple(x) if isinstance(x, list) else x


def attribute_dataset(
    adapter: Any,
    dataset: Any,
    path: str | Path,
    *,
    input_column: str = "prompt",
    target_column: str | None = "target",
    id_column: str | None = None,
    method: Any = "integrated_gradients",
    metrics: list[str] | None = None,
    on_error: str = "raise",
    retry_errors: bool = False,
    progress: bool = True,
    row_kwargs: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    **attribute_kwargs: Any,
) -> AttributionRecords:
    """:func:`~tokensmith.attribution.attribute` over every row of ``dataset``, resumable.

    Args:
        adapter: the model.
        dataset: a ``datasets.Dataset`` (or a list of dicts).
        path: the JSON Lines results file (created; appended to on resume).
        input_column: the column holding the prompt (a string, or a chat message list with ``chat=True``).
        target_column: the column holding the target (None: no target column, e.g. ``target="generate"``
            passed in ``attribute_kwargs``).
        id_column: a column of unique ids (default: the row index).
        method: the attribution method (name, class or instance).
        metrics: :func:`~tokensmith.attribution.evaluate` metrics computed per example and stored with it.
        on_error: ``"raise"`` (default) or ``"record"`` (store the error message and go on).
        retry_errors: recompute examples whose stored record is an error.
        progress: one bar over the examples (the per-example bars are silenced).
        row_kwargs: ``fn(row) -> dict`` of per-row ``attribute`` arguments (e.g. ``target_span``).
        **attribute_kwargs: passed to every ``attribute`` call (``chat=True``, ``n_steps=32``, ...).

    Returns:
        :class:`AttributionRecords` in input order (``computed`` says how many were new).

    Raises:
        ValueError: a missing column, duplicate ids, an unknown ``on_error``, a results file not written
            by this function.
    """
    if on_error not in ("raise", "record"):
        raise ValueError(f"on_error must be 'raise' or 'record', got {on_error!r}")
    rows = _rows(dataset)
    cols = set(rows[0]) if rows else set()
    for c in (input_column, target_column, id_column):
        if c is not None and rows and c not in cols:
            raise ValueError(f"column {c!r} not in the dataset (columns: {sorted(cols)})")
    ids = [_key(r[id_column]) if id_column else i for i, r in enumerate(rows)]
    if len(set(ids)) != len(ids):
        raise ValueError(f"id column {id_column!r} has duplicate values; pass a column of unique ids")
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    done = read_records(p, repair=True)
    todo = [i for i, k in enumerate(ids) if k not in done or (retry_errors and "error" in done[k])]
    computed = 0
    from tokensmith.attribution.evaluate import evaluate

    with progress_scope(progress), open(p, "a", encoding="utf-8") as fh:
        for i in steps(todo, desc="attribute_dataset", total=len(todo), unit="example"):
            row = rows[i]
            kw = dict(attribute_kwargs)
            if row_kwargs is not None:
                kw.update(row_kwargs(row))
            if target_column is not None:
                kw["target"] = row[target_column]
            rec: dict[str, Any] = {"id": ids[i], "index": i}
            try:
                with progress_scope(False):
                    res = attribute(adapter, row[input_column], method=method, progress=None, **kw)
                    rec["result"] = res.to_dict()
                    if metrics:
                        ev = evaluate(adapter, res, metrics=metrics)
                        rec["metrics"] = {k: float(v) for k, v in ev.items() if k != "per_row"}
            except Exception as e:  # noqa: BLE001 - recorded on request, re-raised otherwise
                if on_error == "raise":
                    raise
                rec = {"id": ids[i], "index": i, "error": f"{type(e).__name__}: {e}"}
            fh.write(json.dumps(rec) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
            done[ids[i]] = json.loads(json.dumps(rec))
            computed += 1
    results: list[AttributionResult | None] = []
    mets: list[dict[str, float]] = []
    errors: dict[Any, str] = {}
    for k in ids:
        rec = done[k]
        if "error" in rec:
            errors[k] = rec["error"]
            results.append(None)
        else:
            results.append(AttributionResult.from_dict(rec["result"]))
        mets.append(dict(rec.get("metrics", {})))
    return AttributionRecords(ids, results, mets, errors, p, computed)


def _rows(dataset: Any) -> list[dict[str, Any]]:
    if isinstance(dataset, list):
        if not all(isinstance(r, dict) for r in dataset):
            raise TypeError("a list dataset must hold dicts (one per example)")
        return dataset
    if hasattr(dataset, "column_names") and hasattr(dataset, "__getitem__"):
        return [dataset[i] for i in range(len(dataset))]
    raise TypeError(f"dataset must be a datasets.Dataset or a list of dicts, got {type(dataset).__name__}")
