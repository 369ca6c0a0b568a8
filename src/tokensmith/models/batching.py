"""Micro-batching under a memory budget with back-off on out-of-memory (METHODS.md MOD-2).

:class:`MicroBatcher` splits work along the batch dimension. It starts from ``max_batch_size`` (or the
size a ``memory_budget`` allows), halves the chunk on an out-of-memory error, retries, and remembers
the largest size that fit for each ``key`` so later calls start there.

Micro-batching is made transparent to anything that records per-forward results (hook sessions,
attention probes) by a small protocol. One *logical call* over ``n`` rows is a :class:`BatchCall`;
every attempt at a chunk runs inside ``call.rows(start, end)``. Listeners (objects with the
:class:`RowListener` methods) are told which rows ``[start, end)`` of the full batch each forward
covers, whether the attempt succeeded (an attempt that raised, e.g. an OOM that triggers a back-off,
must leave nothing behind) and when the logical call ends (results are then assembled by rows, as if
the batch had run at once). :class:`RowAssembler` implements the protocol for any ``dict`` of
per-forward lists.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterator, MutableMapping, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any, Protocol, TypeVar

import torch

__all__ = ["MicroBatcher", "is_oom", "BatchCall", "RowListener", "RowAssembler", "merge_rows"]

T = TypeVar("T")


def is_oom(err: BaseException) -> bool:
    """True for CUDA/MPS/CPU out-of-memory errors."""
    oom_type = getattr(torch, "OutOfMemoryError", None)
    if oom_type is not None and isinstance(err, oom_type):
        return True
    msg = str(err).lower()
    return isinstance(err, RuntimeError) and (
        "out of memory" in msg or "can't allocate memory" in msg or "not enough memory" in msg
    )


class RowListener(Protocol):
    """What a :class:`BatchCall` tells its listeners (all four methods are required)."""

    def begin_batch(self, n: int) -> None:
        """A logical call over ``n`` rows starts."""

    def begin_rows(self, start: int, end: int, n: int) -> None:
        """An attempt at rows ``[start, end)`` of the ``n``-row batch starts."""

    def end_rows(self, ok: bool) -> None:
        """The attempt ended; ``ok=False`` (it raised): forget everything it recorded."""

    def end_batch(self, ok: bool) -> None:
        """The logical call ended; assemble the committed chunks by rows (``ok=False``: drop them)."""


class BatchCall:
    """One logical call over ``n`` rows, possibly split into micro-batches, announced to ``listeners``.

    Use as a context manager around the whole call and wrap every attempt at a chunk in
    :meth:`rows`. :meth:`MicroBatcher.run` does the latter when given ``call=``; the adapter gives you
    one with :meth:`ModelAdapter.micro_batch`.

    Examples:
        >>> seen = []
        >>> class L:
        ...     def begin_batch(self, n): seen.append(("batch", n))
        ...     def begin_rows(self, s, e, n): seen.append(("rows", s, e))
        ...     def end_rows(self, ok): seen.append(("ok", ok))
        ...     def end_batch(self, ok): seen.append(("end", ok))
        >>> with BatchCall(3, [L()]) as call:
        ...     _ = MicroBatcher(2).run(lambda s, e: e - s, 3, call=call)
        >>> seen
        [('batch', 3), ('rows', 0, 2), ('ok', True), ('rows', 2, 3), ('ok', True), ('end', True)]
    """

    def __init__(self, n: int, listeners: Sequence[RowListener] = ()):
        if n < 0:
            raise ValueError(f"a batch call needs n >= 0 rows, got {n}")
        self.n = int(n)
        self.listeners = list(listeners)
        self._entered: list[RowListener] = []
        self._in_rows = False

    def __enter__(self) -> BatchCall:
        try:
            for listener in self.listeners:
                listener.begin_batch(self.n)
                self._entered.append(listener)
        except BaseException:
            self.__exit__(RuntimeError, None, None)
            raise
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        entered, self._entered = self._entered, []
        for listener in reversed(entered):
            listener.end_batch(exc_type is None)

    @contextmanager
    def rows(self, start: int, end: int) -> Iterator[None]:
        """One attempt at rows ``[start, end)``; if the block raises, the listeners drop what it recorded."""
        if not 0 <= start < end <= self.n:
            raise ValueError(f"rows [{start}, {end}) are not inside a batch of {self.n}")
        if self._in_rows:
            raise RuntimeError("BatchCall.rows blocks cannot be nested: one attempt covers one row range")
        self._in_rows = True
        begun: list[RowListener] = []
        try:
            for listener in self._entered:
                listener.begin_rows(start, end, self.n)
                begun.append(listener)
            yield
        except BaseException:
            for listener in reversed(begun):
                listener.end_rows(False)
            raise
        else:
            for listener in reversed(begun):
                listener.end_rows(True)
        finally:
            self._in_rows = False


def merge_rows(pieces: Sequence[tuple[int, int, Any]]) -> Any:
    """Assemble per-chunk records ``(start, end, item)`` (sorted by ``start``) into one full-batch record.

    Tensors are concatenated along dim 0 (the batch axis, or the row-major flattened positions of
    ``logits`` under a boolean ``logits_to_keep``). Other items must define
    ``merge_rows(pieces) -> item`` (a classmethod).
    """
    first = pieces[0][2]
    if isinstance(first, torch.Tensor):
        if len(pieces) == 1:
            return first
        if any(not isinstance(p[2], torch.Tensor) or p[2].dim() == 0 for p in pieces):
            raise ValueError("cannot assemble scalar or mixed records by rows")
        return torch.cat([p[2].to(first.device) for p in pieces], 0)
    merge = getattr(type(first), "merge_rows", None)
    if merge is None:
        raise TypeError(f"cannot assemble records of type {type(first).__name__} by rows")
    return merge(pieces)


class RowAssembler:
    """:class:`RowListener` for stores mapping a key to a list with one record per forward.

    The code that records keeps appending to ``store[key]`` as usual. During a logical call the assembler
    moves what each successful attempt appended into a per-chunk buffer, truncates what a failed attempt
    appended, and at the end of the call appends, per key and per forward index ``j``, the rows of all
    chunks' ``j``-th records assembled with :func:`merge_rows`. So a call split into chunks leaves
    exactly what the unsplit call would have left.

    Raises (at the end of the call) ``ValueError`` when chunks recorded a key a different number of times
    (e.g. a generation that stopped earlier in one chunk): such records cannot be assembled by rows.
    """

    def __init__(self, *stores: MutableMapping[Any, list]):
        self.stores = stores
        self._chunks: list[tuple[int, int, list[dict[Any, list]]]] | None = None
        self._snap: list[dict[Any, int]] | None = None
        self._rows: tuple[int, int] | None = None

    def begin_batch(self, n: int) -> None:
        self._chunks = []

    def begin_rows(self, start: int, end: int, n: int) -> None:
        self._rows = (start, end)
        self._snap = [{k: len(v) for k, v in dict.items(s)} for s in self.stores]  # type: ignore[arg-type]

    def end_rows(self, ok: bool) -> None:
        if self._snap is None or self._rows is None:
            return
        taken: list[dict[Any, list]] = []
        for store, snap in zip(self.stores, self._snap, strict=True):
            new: dict[Any, list] = {}
            for k in list(dict.keys(store)):  # type: ignore[arg-type]
                lst = dict.__getitem__(store, k)  # type: ignore[arg-type]
                n0 = snap.get(k, 0)
                if len(lst) > n0:
                    new[k] = lst[n0:]
                    del lst[n0:]
                if k not in snap and not lst:
                    dict.__delitem__(store, k)  # type: ignore[arg-type]
            taken.append(new)
        if ok and self._chunks is not None:
            self._chunks.append((*self._rows, taken))
        self._snap = self._rows = None

    def end_batch(self, ok: bool) -> None:
        chunks, self._chunks = self._chunks, None
        if not ok or not chunks:
            return
        chunks.sort(key=lambda c: c[0])
        for si, store in enumerate(self.stores):
            keys: list[Any] = []
            for c in chunks:
                keys += [k for k in c[2][si] if k not in keys]
            for k in keys:
                per_chunk = [(s, e, c[si].get(k, [])) for s, e, c in chunks]
                counts = {len(recs) for _, _, recs in per_chunk}
                if len(counts) != 1:
                    raise ValueError(
                        f"{k!r} was recorded {sorted(len(r) for _, _, r in per_chunk)} times in the micro-batches of "
                        "one call; records that differ per chunk cannot be assembled by rows — run this call "
                        "without micro-batching"
                    )
                lst = dict.setdefault(store, k, [])  # type: ignore[arg-type]
                for j in range(counts.pop()):
                    lst.append(merge_rows([(s, e, recs[j]) for s, e, recs in per_chunk]))


class MicroBatcher:
    """Run ``fn(start, end)`` over ``[0, n)`` in chunks, backing off on OOM.

    Args:
        max_batch_size: the largest chunk to try (None = all at once).
        memory_budget: bytes per chunk; with ``bytes_per_item`` given to :meth:`run` the first chunk is
            ``memory_budget // bytes_per_item``.

    Examples:
        >>> mb = MicroBatcher(max_batch_size=4)
        >>> mb.run(lambda s, e: list(range(s, e)), 10)
        [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    """

    def __init__(self, max_batch_size: int | None = None, memory_budget: int | None = None):
        if max_batch_size is not None and max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        self.max_batch_size = max_batch_size
        self.memory_budget = memory_budget
        self.fits: dict[Any, int] = {}

    def first_chunk(self, n: int, key: Any = None, bytes_per_item: int | None = None) -> int:
        size = n
        if self.max_batch_size is not None:
            size = min(size, self.max_batch_size)
        if self.memory_budget is not None and bytes_per_item:
            size = min(size, max(1, int(self.memory_budget // max(1, bytes_per_item))))
        if key in self.fits:
            size = min(size, self.fits[key])
        return max(1, size)

    def run(
        self,
        fn: Callable[[int, int], T],
        n: int,
        key: Any = None,
        bytes_per_item: int | None = None,
        call: BatchCall | None = None,
    ) -> list[T]:
        """Call ``fn(start, end)`` for consecutive chunks covering ``n`` items; return the results in order.

        With ``call`` (a :class:`BatchCall` over the same ``n`` rows, e.g. from
        :meth:`ModelAdapter.micro_batch`), every attempt runs inside ``call.rows(start, end)`` so hook
        sessions see which rows each forward covers and drop what an attempt that ran out of memory
        recorded.
        """
        if n <= 0:
            return []
        if call is not None and call.n != n:
            raise ValueError(f"the BatchCall covers {call.n} rows but run() was asked for {n}")
        chunk = self.first_chunk(n, key, bytes_per_item)
        out: list[T] = []
        start = 0
        while start < n:
            end = min(n, start + chunk)
            try:
                with call.rows(start, end) if call is not None else nullcontext():
                    res = fn(start, end)
            except Exception as err:  # noqa: BLE001 - re-raised unless it is an OOM
                if not is_oom(err) or chunk == 1:
                    raise
                chunk = max(1, chunk // 2)
                self.fits[key] = chunk
                gc.collect()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                continue
            out.append(res)
            start = end
        # only a back-off (above) records a size: a call that simply had few items says nothing about memory
        return out
