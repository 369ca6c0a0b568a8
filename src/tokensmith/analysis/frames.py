"""Tidy results: :class:`AnalysisFrame`, a ``pandas.DataFrame`` whose ``.plot()`` draws the analysis' own picture.

Every diagnostic of :mod:`tokensmith.analysis` returns an :class:`AnalysisFrame`: one row per observation
(a layer, a (layer, position) cell, a frequency bucket, ...), one column per variable, so ``groupby``,
``pivot``, ``merge`` and seaborn work as usual. ``frame.kind`` names the diagnostic (``"logit_lens"``,
``"geometry"``, ...) and ``frame.meta`` holds what the rows do not (model name, corpus size, tokens used).

``frame.plot()`` calls the plotting function registered for ``frame.kind`` (:func:`register_plot`) and
returns the matplotlib ``Axes``; everything else of pandas' plot accessor still works
(``frame.plot.line(x="layer", y="anisotropy")``, ``frame.plot(x=..., y=...)`` with pandas' own arguments
when no plot is registered). matplotlib is the optional ``viz`` extra (``pip install tokensmith[viz]``).

Examples:
    >>> from tokensmith.analysis.frames import make_frame
    >>> f = make_frame([{"layer": 0, "value": 1.0}, {"layer": 1, "value": 0.5}], kind="example", model="m")
    >>> f.kind, f.meta["model"], list(f.columns)
    ('example', 'm', ['layer', 'value'])
    >>> f[f.layer > 0].kind              # the kind survives slicing
    'example'
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import pandas as pd

__all__ = ["AnalysisFrame", "make_frame", "register_plot", "plot_kinds", "require_matplotlib"]

PlotFn = Callable[..., Any]
_PLOTS: dict[str, PlotFn] = {}


def register_plot(kind: str) -> Callable[[PlotFn], PlotFn]:
    """Decorator: ``fn(frame, ax=None, **kw) -> Axes`` becomes ``frame.plot()`` for frames of ``kind``."""

    def deco(fn: PlotFn) -> PlotFn:
        _PLOTS[kind] = fn
        return fn

    return deco


def plot_kinds() -> list[str]:
    """The kinds that have a registered ``.plot()``."""
    return sorted(_PLOTS)


def require_matplotlib() -> Any:
    """``matplotlib.pyplot`` (Agg backend when no display), or an ImportError that says how to install it."""
    try:
        import matplotlib

        if not _has_display():
            matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - matplotlib is installed in CI
        raise ImportError("plots need matplotlib: pip install 'tokensmith[viz]' (or pip install matplotlib)") from e
    return plt


def _has_display() -> bool:
    import os

    return bool(os.environ.get("DISPLAY")) or os.name == "nt"


class _PlotAccessor:
    """``frame.plot``: callable (the registered picture), attributes fall through to pandas' accessor."""

    def __init__(self, frame: AnalysisFrame) -> None:
        self._frame = frame

    def _pandas(self) -> Any:
        return pd.plotting.PlotAccessor(self._frame)  # pandas' own accessor

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        fn = _PLOTS.get(self._frame.kind or "")
        if fn is None or args or {"x", "y", "kind"} & set(kwargs):
            require_matplotlib()
            return self._pandas()(*args, **kwargs)
        require_matplotlib()
        return fn(self._frame, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pandas(), name)


class AnalysisFrame(pd.DataFrame):
    """A tidy ``pandas.DataFrame`` with ``kind`` and ``meta`` and a diagnostic-specific ``.plot()``.

    Attributes:
        kind: the diagnostic that produced it (selects the registered plot).
        meta: a dict of run facts that are not per-row (model, number of texts and tokens, settings).
    """

    _metadata = ["kind", "meta"]

    @property
    def _constructor(self) -> type[AnalysisFrame]:
        return AnalysisFrame

    @property
    def plot(self) -> _PlotAccessor:  # type: ignore[override]
        return _PlotAccessor(self)

    def to_pandas(self) -> pd.DataFrame:
        """A plain ``pandas.DataFrame`` copy (no ``kind``/``meta``)."""
        return pd.DataFrame(self)


def make_frame(
    rows: Iterable[Mapping[str, Any]] | Mapping[str, Any] | pd.DataFrame,
    kind: str,
    columns: list[str] | None = None,
    **meta: Any,
) -> AnalysisFrame:
    """An :class:`AnalysisFrame` from records (or a column dict / DataFrame), with ``kind`` and ``meta``."""
    if isinstance(rows, pd.DataFrame):
        f = AnalysisFrame(rows)
    elif isinstance(rows, Mapping):
        f = AnalysisFrame(dict(rows))
    else:
        f = AnalysisFrame(list(rows), columns=columns)
    f.kind = kind
    f.meta = dict(meta)
    return f
