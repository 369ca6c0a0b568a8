"""``attribute_dataset``: one attribution per row of a ``datasets.Dataset``, written as it goes, resumable.

A thin call of :func:`tokensmith.run.run` with :class:`tokensmith.run.AttributeJob`. Each finished example is
appended as one line ``{"id": ..., "index": i, "row_hash": ..., "result": {"attribution":
AttributionResult.to_dict(), "metrics": {...}}}`` (or ``"error"``), flushed and fsynced, so a crash loses at
most the example in flight. Running the same call again skips every id already there (finished or failed,
unless ``retry_errors=True``) and drops a last line that was cut off mid-write; a different method, config or
set of ids refuses the file (its manifest ``<path>.run.json`` says what it holds). ``path`` is one ``.jsonl``
file (this process only) or a directory: then the rows are sharded across the processes of ``accelerate
launch`` (one shard per process, merged into ``results.jsonl``). The returned :class:`AttributionRecords` is in
input order.

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

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokensmith.attribution.progress import progress_scope
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
    from tokensmith.run import read_jsonl

    return {_key(rec["id"]): rec for rec in read_jsonl(path, repair=repair)}


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
    from tokensmith.run import AttributeJob, run

    job = AttributeJob(adapter=adapter, model=str(getattr(adapter, "name", "adapter")), method=method,
                       input_column=input_column, target_column=target_column, metrics=metrics,
                       kwargs=dict(attribute_kwargs), row_kwargs=row_kwargs)
    with progress_scope(progress):
        single = Path(path).suffix == ".jsonl"  # one file: this process only; a directory: sharded (tokensmith.run)
        res = run(job, _rows(dataset), Path(path), id_column=id_column, on_error=on_error,
                  retry_errors=retry_errors, progress=progress, state=_SingleProcess() if single else None)
    results: list[AttributionResult | None] = []
    mets: list[dict[str, float]] = []
    for out in res.results:
        results.append(AttributionResult.from_dict(out["attribution"]) if out is not None else None)
        mets.append(dict(out.get("metrics", {})) if out is not None else {})
    return AttributionRecords(res.ids, results, mets, dict(res.errors), Path(path), res.computed)


class _SingleProcess:
    """The one-process state of :func:`attribute_dataset` (a ``.jsonl`` file is one shard)."""

    process_index = 0
    num_processes = 1
    is_main_process = True
    device = "cpu"

    def wait_for_everyone(self) -> None:
        pass

    def split_between_processes(self, items: Any) -> Any:
        from contextlib import nullcontext

        return nullcontext(items)


def _rows(dataset: Any) -> list[dict[str, Any]]:
    if isinstance(dataset, list):
        if not all(isinstance(r, dict) for r in dataset):
            raise TypeError("a list dataset must hold dicts (one per example)")
        return dataset
    if hasattr(dataset, "column_names") and hasattr(dataset, "__getitem__"):
        return [dataset[i] for i in range(len(dataset))]
    raise TypeError(f"dataset must be a datasets.Dataset or a list of dicts, got {type(dataset).__name__}")
