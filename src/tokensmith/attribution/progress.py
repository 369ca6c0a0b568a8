"""Progress bars for long attributions, without threading a flag through every method.

:func:`attribute` opens a :func:`progress_scope`; the engines inside (the gradient path loop, the batched
perturbation scoring) report their work units with :func:`steps`. Nothing is shown unless the scope is
enabled, and an enabled bar only appears once a run has lasted ``delay`` seconds (tqdm's ``delay``), so
short calls stay silent. Scopes nest: :func:`~tokensmith.attribution.attribute_dataset` shows one bar over
the examples and silences the per-example bars.

    >>> from tokensmith.attribution.progress import progress_scope, steps
    >>> with progress_scope(False):
    ...     total = sum(1 for _ in steps(range(3), desc="points"))
    >>> total
    3
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

__all__ = ["progress_scope", "steps", "bar", "progress_enabled"]

T = TypeVar("T")
_STATE: contextvars.ContextVar[tuple[bool, float]] = contextvars.ContextVar("tokensmith_attr_progress", default=(False, 0.0))


@contextlib.contextmanager
def progress_scope(enabled: bool | None, delay: float = 2.0) -> Iterator[None]:
    """Enable (True), silence (False) or inherit (None) progress bars inside the block.

    ``delay``: seconds a bar waits before it is drawn (short runs never show one).
    """
    if enabled is None:
        yield
        return
    token = _STATE.set((bool(enabled), float(delay)))
    try:
        yield
    finally:
        _STATE.reset(token)


def progress_enabled() -> bool:
    """Whether bars are enabled in the current scope."""
    return _STATE.get()[0]


def steps(it: Iterable[T], desc: str, total: int | None = None, unit: str = "it", **kw: Any) -> Iterable[T]:
    """``it`` wrapped in a tqdm bar when the current scope enables progress, else ``it`` itself."""
    on, delay = _STATE.get()
    if not on:
        return it
    from tqdm.auto import tqdm

    return tqdm(it, desc=desc, total=total, unit=unit, delay=delay, leave=False, **kw)


class _NullBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def bar(total: int, desc: str, unit: str = "it") -> Any:
    """A tqdm bar with ``update(n)`` / ``close()`` when progress is enabled, else a no-op object."""
    on, delay = _STATE.get()
    if not on:
        return _NullBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, delay=delay, leave=False)
