"""The on-disk store of a run: a manifest, one JSON Lines shard per process, a merged file in input order.

Layout of an output directory::

    out/
      run.json                 # manifest: job name, config, config hash, dataset fingerprint, row count
      shard-00000.jsonl        # records written by process 0 (appended to on resume)
      shard-00001.jsonl        # ... one per process rank that ever wrote
      results.jsonl            # all records in input order, written when every row is done

A record is one JSON object per line, ``{"id": ..., "index": i, "row_hash": ..., "result": {...}, "seconds": s,
"rank": r}`` (or ``"error": "..."`` instead of ``"result"``; ``seconds`` is the time the row took, ``rank`` the
process that computed it); it is written with one ``write`` of the whole line, flushed and ``fsync``-ed before the next
row starts, so a killed process loses at most the row in flight. A final line without its newline is a write
that was cut off: it is never counted, and the process that owns the shard (or the main process before the
run starts) truncates it away before appending. An id with results in two shards (impossible through
:func:`tokensmith.run.run`, which hands every pending id to exactly one process) raises rather than being
silently merged; an error record superseded by a retried result in another shard is not a duplicate.

Each record also carries ``row_hash``, a hash of the columns the job read: a resumed run refuses records
whose row has changed since (stale results), except failed ones retried with ``retry_errors``.

Examples:
    >>> import tempfile
    >>> from tokensmith.run.store import append_record, read_jsonl
    >>> path = tempfile.mkdtemp() + "/shard-00000.jsonl"
    >>> with open(path, "a", encoding="utf-8") as fh:
    ...     append_record(fh, {"id": 0, "index": 0, "result": {"x": 1}})
    >>> with open(path, "a", encoding="utf-8") as fh:
    ...     _ = fh.write('{"id": 1, "ind')            # a torn write: the process died mid-line
    >>> [r["id"] for r in read_jsonl(path)]
    [0]
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import IO, Any

__all__ = [
    "MANIFEST",
    "MERGED",
    "append_record",
    "collect",
    "config_hash",
    "read_jsonl",
    "read_manifest",
    "shard_path",
    "shard_paths",
    "write_json_atomic",
]

MANIFEST = "run.json"
MERGED = "results.jsonl"
_SHARD_GLOB = "shard-*.jsonl"


def shard_path(out: Path, rank: int) -> Path:
    """The shard file of process ``rank``."""
    return out / f"shard-{int(rank):05d}.jsonl"


def shard_paths(out: Path) -> list[Path]:
    """Every shard file in ``out`` (any number of processes may have written), sorted by name."""
    return sorted(Path(out).glob(_SHARD_GLOB))


def key(x: Any) -> Any:
    """A hashable form of an id as JSON gives it back (lists become tuples)."""
    return tuple(key(v) for v in x) if isinstance(x, list) else x


def read_jsonl(path: str | Path, repair: bool = False) -> list[dict[str, Any]]:
    """The complete records of one JSON Lines file, in file order.

    A last line without its newline (a torn write) is ignored, and with ``repair=True`` truncated from the file.
    A malformed line elsewhere, or a line that is not a record with an ``id``, raises a ValueError: the file
    was not written by this store.
    """
    p = Path(path)
    if not p.exists():
        return []
    raw = p.read_bytes()
    good = raw.rfind(b"\n") + 1
    if repair and good < len(raw):
        with open(p, "r+b") as fh:
            fh.truncate(good)
            fh.flush()
            os.fsync(fh.fileno())
    out: list[dict[str, Any]] = []
    for n, line in enumerate(raw[:good].splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{p}:{n} is not a JSON record of a tokensmith run ({e}); use another output") from e
        if not isinstance(rec, dict) or "id" not in rec:
            raise ValueError(f"{p}:{n} is not a record of a tokensmith run (no 'id'); use another output")
        out.append(rec)
    return out


def append_record(fh: IO[str], rec: dict[str, Any]) -> None:
    """Append one record as one line, flushed and fsynced (a crash loses at most a torn last line)."""
    fh.write(json.dumps(rec, ensure_ascii=False, allow_nan=True) + "\n")
    fh.flush()
    os.fsync(fh.fileno())


def collect(out: Path, repair: bool = False) -> dict[Any, dict[str, Any]]:
    """The records of every shard of ``out`` by id.

    The same id in two shards raises a ValueError, except an error record next to a result (a failed example
    retried by another process): the result wins.
    """
    found: dict[Any, dict[str, Any]] = {}
    where: dict[Any, Path] = {}
    for p in shard_paths(out):
        for rec in read_jsonl(p, repair=repair):
            k = key(rec["id"])
            if k in found and where[k] != p:
                # a failed example retried by another process (retry_errors): the success supersedes the error
                if "error" in found[k] and "error" not in rec:
                    found[k], where[k] = rec, p
                    continue
                if "error" in rec:
                    continue
                raise ValueError(
                    f"id {rec['id']!r} has records in both {where[k].name} and {p.name} of {out}: the directory was "
                    "written by two runs at once (or edited by hand); use a fresh output directory"
                )
            found[k] = rec  # within one shard the last record of an id wins (a retried error)
            where[k] = p
    return found


def config_hash(obj: Any) -> str:
    """A stable SHA-256 (hex, 16 chars) of a JSON-serialisable object (keys sorted)."""
    blob = json.dumps(obj, sort_keys=True, ensure_ascii=True, default=repr, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def write_json_atomic(path: Path, obj: Any, jsonl: bool = False) -> None:
    """Write ``obj`` (a JSON document, or with ``jsonl=True`` an iterable of records) via a temp file + rename."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        if jsonl:
            for rec in obj:
                fh.write(json.dumps(rec, ensure_ascii=False, allow_nan=True) + "\n")
        else:
            json.dump(obj, fh, indent=2, sort_keys=True, default=repr)
            fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def read_manifest(out: Path) -> dict[str, Any] | None:
    """The manifest of ``out`` (None when there is none)."""
    p = Path(out) / MANIFEST
    if not p.exists():
        return None
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{p} is not a tokensmith run manifest ({e}); use another output directory") from e
