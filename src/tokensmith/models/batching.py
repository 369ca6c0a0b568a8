"""Micro-batching under a memory budget with back-off on out-of-memory (METHODS.md MOD-2).

:class:`MicroBatcher` splits work along the batch dimension. It starts from ``max_batch_size`` (or the
size a ``memory_budget`` allows), halves the chunk on an out-of-memory error, retries, and remembers
the largest size that fit for each ``key`` so later calls start there.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from typing import Any, TypeVar

import torch

__all__ = ["MicroBatcher", "is_oom"]

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
    ) -> list[T]:
        """Call ``fn(start, end)`` for consecutive chunks covering ``n`` items; return the results in order."""
        if n <= 0:
            return []
        chunk = self.first_chunk(n, key, bytes_per_item)
        out: list[T] = []
        start = 0
        while start < n:
            end = min(n, start + chunk)
            try:
                out.append(fn(start, end))
            except Exception as err:  # noqa: BLE001 - re-raised unless it is an OOM
                if not is_oom(err) or chunk == 1:
                    raise
                chunk = max(1, chunk // 2)
                self.fits[key] = chunk
                gc.collect()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                continue
            start = end
        # only a back-off (above) records a size: a call that simply had few items says nothing about memory
        return out
