"""``run(job, dataset, out)``: a per-example job over a dataset, sharded across processes, resumable, merged in order.

The protocol, identical in one process and under ``accelerate launch`` (``PartialState``: processes, GPUs,
nodes):

1. every process validates the dataset (the job's columns exist, ids are unique) and reads the manifest of
   ``out``; a manifest of another job, config or set of ids refuses the directory (``overwrite=True`` clears
   it), and so does a record whose row changed since it was written (each record keeps a hash of the columns
   the job read);
2. the main process writes the manifest and truncates torn last lines of every shard; barrier;
3. every process reads the finished ids from all shards (any earlier number of processes); barrier (nobody
   writes before everyone has read, so all see the same pending list);
4. the pending rows, in input order, are split between the processes
   (``PartialState.split_between_processes``: contiguous, disjoint); each process loads the model on its
   device (``job.setup``) and appends one fsynced record per row to its own shard;
5. barrier; the main process merges all shards into ``results.jsonl`` in input order; barrier; every process
   returns the same :class:`RunResult`.

A process killed mid-run leaves complete records and at most one torn line; the next run skips the finished
ids, drops the torn line, and computes the rest — nothing lost, nothing duplicated (tested with
``accelerate launch --multi_gpu --num_processes 2`` on CPU and a SIGKILL). Results do not depend on the number of processes
as long as the job is deterministic per row (every built-in job is: fixed seeds, no cross-row batching).

Examples:
    >>> import tempfile, datasets
    >>> from tokensmith.run import run
    >>> ds = datasets.Dataset.from_dict({"text": ["Hello world", "The sky is blue"]})
    >>> out = tempfile.mkdtemp()
    >>> res = run("tokenizer_report", ds, out, config={"tokenizers": ["smollm2"]}, progress=False)
    >>> res.computed, [r["tokens"]["smollm2"] for r in res.results]
    (2, [2, 4])
    >>> run("tokenizer_report", ds, out, config={"tokenizers": ["smollm2"]}, progress=False).computed   # resumed
    0
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokensmith.run.jobs import Job, get_job
from tokensmith.run.store import (
    MANIFEST,
    MERGED,
    append_record,
    collect,
    config_hash,
    key,
    read_jsonl,
    read_manifest,
    shard_path,
    shard_paths,
    write_json_atomic,
)

__all__ = ["RunResult", "default_state", "load_rows", "run"]

_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


@dataclass
class RunResult:
    """The records of a run in input order.

    Attributes:
        ids: the example ids (the ``id_column`` values, else the row indices).
        results: the job's output per example (None where it failed).
        errors: ``{id: "ExceptionType: message"}`` of failed examples (``on_error="record"``).
        out: the output directory (or file).
        computed: examples computed by this call, over all processes (the rest were read back).
        manifest: the run's manifest (job, config, hashes).
    """

    ids: list[Any]
    results: list[dict[str, Any] | None]
    errors: dict[Any, str] = field(default_factory=dict)
    out: Path | None = None
    computed: int = 0
    manifest: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, Any] | None:
        return self.results[i]

    def __iter__(self) -> Iterator[dict[str, Any] | None]:
        return iter(self.results)

    def to_pandas(self) -> Any:
        """One row per example: ``id``, ``error`` and the result's keys flattened (``pandas.json_normalize``)."""
        import pandas as pd

        flat = pd.json_normalize([r if r is not None else {} for r in self.results])
        flat.insert(0, "id", self.ids)
        flat.insert(1, "error", [self.errors.get(k) for k in self.ids])
        return flat


def default_state() -> Any:
    """``accelerate.PartialState()``; on a machine without an accelerator, ``PartialState(cpu=True)``.

    Under ``torchrun`` / ``accelerate launch --multi_gpu --num_processes N`` on a CPU-only machine, a plain
    ``PartialState()`` finds no GPU backend and runs every process as a separate single-process job (each would
    compute everything); with ``cpu=True`` accelerate sets up the ``gloo`` CPU process group (``MULTI_CPU``).
    """
    import torch
    from accelerate import PartialState

    has_accel = torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())
    return PartialState(cpu=not has_accel)


def load_rows(data: Any) -> list[dict[str, Any]]:
    """Rows of a ``datasets.Dataset``, a list of dicts, or a file / directory path.

    Paths: ``.jsonl`` / ``.json``, ``.csv``, ``.parquet`` (``datasets.load_dataset`` with that builder, offline),
    or a directory written by ``Dataset.save_to_disk``.
    """
    if isinstance(data, (str, Path)):
        import datasets

        p = Path(data)
        if p.is_dir():
            data = datasets.load_from_disk(str(p))
        elif p.suffix.lower() in _FORMATS:
            if not p.exists():
                raise ValueError(f"data file {p} does not exist")
            data = datasets.load_dataset(_FORMATS[p.suffix.lower()], data_files=str(p), split="train")
        else:
            raise ValueError(f"data path {p}: give a .jsonl, .json, .csv or .parquet file or a save_to_disk directory")
    if isinstance(data, list):
        if not all(isinstance(r, dict) for r in data):
            raise TypeError("a list dataset must hold dicts (one per example)")
        return data
    if hasattr(data, "column_names") and hasattr(data, "__getitem__"):
        if hasattr(data, "keys") and not hasattr(data, "select"):  # a DatasetDict
            raise TypeError(f"got a DatasetDict with splits {list(data.keys())}: pass one split, e.g. ds['train']")
        return [data[i] for i in range(len(data))]
    raise TypeError(f"dataset must be a datasets.Dataset, a list of dicts or a path, got {type(data).__name__}")


class _Layout:
    """Where a run keeps its files: a directory (shards + manifest + merged), or one ``.jsonl`` file (one
    process only: the file is the only shard, the manifest sits beside it as ``<file>.run.json``)."""

    def __init__(self, out: str | Path) -> None:
        self.path = Path(out)
        self.single = self.path.suffix == ".jsonl"
        self.dir = self.path.parent if self.single else self.path

    @property
    def manifest(self) -> Path:
        return self.path.with_name(self.path.name + ".run.json") if self.single else self.dir / MANIFEST

    @property
    def merged(self) -> Path | None:
        return None if self.single else self.dir / MERGED

    def shards(self) -> list[Path]:
        return [self.path] if self.single else shard_paths(self.dir)

    def shard(self, rank: int) -> Path:
        return self.path if self.single else shard_path(self.dir, rank)

    def read_manifest(self) -> dict[str, Any] | None:
        if self.single:
            import json

            return json.loads(self.manifest.read_text(encoding="utf-8")) if self.manifest.exists() else None
        return read_manifest(self.dir)

    def collect(self, repair: bool = False) -> dict[Any, dict[str, Any]]:
        if not self.single:
            return collect(self.dir, repair=repair)
        return {key(r["id"]): r for r in read_jsonl(self.path, repair=repair)}

    def clear(self) -> None:
        for p in self.shards():
            p.unlink(missing_ok=True)
        if self.merged is not None:
            self.merged.unlink(missing_ok=True)
        self.manifest.unlink(missing_ok=True)


def _describe_mismatch(old: dict[str, Any], new: dict[str, Any]) -> str:
    if old.get("job") != new["job"]:
        return f"it holds results of job {old.get('job')!r}, not {new['job']!r}"
    if old.get("config_hash") != new["config_hash"]:
        oc, nc = old.get("config", {}), new["config"]
        diff = sorted(k for k in set(oc) | set(nc) if oc.get(k) != nc.get(k))
        return "its config differs in " + ", ".join(f"{k} ({oc.get(k)!r} there, {nc.get(k)!r} now)" for k in diff)
    return (f"it holds results for another dataset ({old.get('n_rows')} rows, fingerprint {old.get('dataset')}; now "
            f"{new['n_rows']} rows, {new['dataset']})")


def run(
    job: Job | str,
    dataset: Any,
    out: str | Path,
    *,
    config: dict[str, Any] | None = None,
    id_column: str | None = None,
    on_error: str = "raise",
    retry_errors: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    state: Any = None,
) -> RunResult:
    """Run a per-example ``job`` over ``dataset``, sharded across processes, resumable (module docstring).

    Args:
        job: a :class:`~tokensmith.run.jobs.Job` or a registered job name (then ``config`` are its options).
        dataset: a ``datasets.Dataset``, a list of dicts, or a path (:func:`load_rows`).
        out: the output directory (created), or a ``.jsonl`` file for a one-process run without shards.
        config: options of a job given by name (``{"model": "tiny:llama", "method": "saliency"}``).
        id_column: a column of unique ids (default: the row index). Resume matches records by id.
        on_error: ``"raise"`` (default: the exception propagates; finished rows are kept) or ``"record"`` (the
            error is stored as the example's record and the run goes on).
        retry_errors: recompute examples whose stored record is an error.
        overwrite: clear an output directory that holds another job's, config's or dataset's results
            (default: refuse it).
        progress: a tqdm bar on the main process.
        state: an ``accelerate.PartialState`` (default: :func:`default_state`; one process unless launched
            with ``accelerate launch`` / ``torchrun``).

    Returns:
        :class:`RunResult` in input order, the same on every process.

    Raises:
        ValueError: an unknown job, a dataset without the job's columns (named), duplicate ids, an output
            directory holding another job / config / dataset (unless ``overwrite``), a shard written by two
            runs at once, a ``.jsonl`` output with several processes, an unknown ``on_error``.
        TypeError: a dataset of the wrong type, unknown job options.

    Examples:
        >>> import tempfile, datasets
        >>> from tokensmith.run import run
        >>> ds = datasets.Dataset.from_dict({"text": ["a b c", "d e"]})
        >>> run("tokenizer_report", ds, tempfile.mkdtemp(), config={"text_column": "body"}, progress=False)
        Traceback (most recent call last):
        ...
        ValueError: the dataset has no column(s) ['body'] needed by job 'tokenizer_report' (columns: ['text']): ...
    """
    if on_error not in ("raise", "record"):
        raise ValueError(f"on_error must be 'raise' or 'record', got {on_error!r}")
    if isinstance(job, str):
        job = get_job(job, **(config or {}))
    elif config:
        raise ValueError("config= is for a job given by name; set the options on the Job instance instead")
    if not isinstance(job, Job):
        raise TypeError(f"job must be a tokensmith.run.Job or a registered job name, got {type(job).__name__}")
    if state is None:
        state = default_state()
    layout = _Layout(out)
    if layout.single and state.num_processes > 1:
        raise ValueError(f"out={str(out)!r} is one .jsonl file; with {state.num_processes} processes give a directory")

    rows = load_rows(dataset)
    cols = set(rows[0]) if rows else set()
    need = job.required_columns() + ([id_column] if id_column else [])
    missing = [c for c in need if c not in cols] if rows else []
    if missing:
        raise ValueError(
            f"the dataset has no column(s) {missing} needed by job {job.name!r} (columns: {sorted(cols)}): rename "
            "them or set the job's column options"
        )
    ids = [key(r[id_column]) if id_column else i for i, r in enumerate(rows)]
    if len(set(ids)) != len(ids):
        raise ValueError(f"id column {id_column!r} has duplicate values; pass a column of unique ids")
    read = job.required_columns()
    row_hash = [config_hash({c: r[c] for c in read}) for r in rows]
    cfg = job.config()
    manifest = {
        "job": job.name,
        "config": cfg,
        "config_hash": config_hash({"job": job.name, "config": cfg}),
        "dataset": config_hash({"ids": ids}),
        "n_rows": len(rows),
        "id_column": id_column,
    }

    # 1-2. check the directory (every process, so all raise alike), then the main process claims / repairs it
    old = layout.read_manifest()
    stale = old is not None and any(old.get(k) != manifest[k] for k in ("job", "config_hash", "dataset"))
    orphan = old is None and any(p.exists() and p.stat().st_size > 0 for p in layout.shards())
    if orphan and not overwrite:
        layout.collect()  # a file that is not ours at all says so ("not a JSON record of a tokensmith run")
    if (stale or orphan) and not overwrite:
        why = _describe_mismatch(old, manifest) if stale else "it holds records without a run manifest"
        raise ValueError(
            f"output {layout.path} is not a run of this job on this dataset: {why}. Use another output directory, "
            "or overwrite=True (--overwrite) to discard it"
        )
    if state.is_main_process:
        layout.dir.mkdir(parents=True, exist_ok=True)
        if stale or orphan:
            layout.clear()
        write_json_atomic(layout.manifest, manifest)
        layout.collect(repair=True)  # truncate torn last lines of every shard
    state.wait_for_everyone()

    # 3. the same pending list on every process
    done = layout.collect()
    changed = [k for i, k in enumerate(ids) if k in done and done[k].get("row_hash") != row_hash[i]
               and not (retry_errors and "error" in done[k])]
    if changed:
        raise ValueError(
            f"the rows of {len(changed)} id(s) (e.g. {changed[:3]}) changed since their results in {layout.path} were "
            "written: use overwrite=True (--overwrite) to recompute everything, or another output"
        )
    todo = [i for i, k in enumerate(ids) if k not in done or (retry_errors and "error" in done[k])]
    state.wait_for_everyone()

    # 4. this process' share
    with state.split_between_processes(todo) as mine:
        mine = list(mine)
    if mine:
        layout.dir.mkdir(parents=True, exist_ok=True)
        job.setup(state.device)
        from tqdm.auto import tqdm

        bar = tqdm(total=len(mine), desc=f"{job.name} [{state.process_index}/{state.num_processes}]",
                   unit="example", disable=not (progress and state.is_main_process))
        with open(layout.shard(state.process_index), "a", encoding="utf-8") as fh:
            for i in mine:
                rec: dict[str, Any] = {"id": ids[i], "index": i, "row_hash": row_hash[i]}
                t0 = time.perf_counter()
                try:
                    rec["result"] = job(rows[i])
                except Exception as e:  # noqa: BLE001 - recorded on request, re-raised otherwise
                    if on_error == "raise":
                        bar.close()
                        raise
                    rec["error"] = f"{type(e).__name__}: {e}"
                rec["seconds"] = round(time.perf_counter() - t0, 6)
                rec["rank"] = state.process_index
                append_record(fh, rec)
                bar.update(1)
        bar.close()
    state.wait_for_everyone()

    # 5. merge in input order
    records = layout.collect()
    if state.is_main_process and layout.merged is not None and all(k in records for k in ids):
        write_json_atomic(layout.merged, (records[k] for k in ids), jsonl=True)
    state.wait_for_everyone()
    results: list[dict[str, Any] | None] = []
    errors: dict[Any, str] = {}
    for k in ids:
        rec = records.get(k)
        if rec is None or "error" in rec:
            errors[k] = rec["error"] if rec is not None else "missing: the process that owned it did not finish"
            results.append(None)
        else:
            results.append(rec.get("result"))
    return RunResult(ids, results, errors, layout.path, len(todo), manifest)

