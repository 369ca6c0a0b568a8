"""Linear next-token probes per layer: the prediction residual and the law of equi-learning (He & Su, 2024).

He & Su (2024), "A Law of Next-Token Prediction in Large Language Models": regress the one-hot encoding
``y_i ∈ {0,1}^V`` of each token's *next* token on the token's hidden state ``x_i^l`` at depth ``l`` with a
linear map plus intercept, and measure how much of the one-hot variance is left:

    (β_l, b_l) = argmin_{β,b} Σ_i ‖y_i − b − βᵀx_i^l‖² + λ_abs‖β‖²_F,
    PR_l = Σ_i ‖y_i − b_l − β_lᵀx_i^l‖² / Σ_i ‖y_i − ȳ‖²     (residual SS / total SS, i.e. 1 − R²).

The law ("equi-learning"): ``PR_l ≈ ρ^l · PR_0``, i.e. ``log PR_l`` decreases *linearly* in ``l`` — every layer
removes the same fraction of the residual. This module reports ``PR_l`` per depth and the least-squares line of
``log PR_l`` against ``l`` (slope, intercept, r², decay ratio ``ρ = exp(slope)``).

**Definition used here** (the paper's wording is "prediction residual = residual sum of squares of a linear
regression of the next-token one-hot on the embedding, normalised by the total sum of squares"; the exact
regularisation of its implementation could not be checked): the intercept is not penalised, which is the
same as centring ``x`` and ``y`` with the training means; the ridge is *relative*,
``λ_abs = ridge · tr(X_cᵀX_c)/d`` (``ridge`` times the mean eigenvalue of the centred Gram matrix, so one value
fits every layer and model width); ``log`` is natural. ``pr_train`` is the fit's own residual (the paper's
quantity); ``pr_heldout`` applies the training fit (β, b) to texts held out by a seeded split *by text* and
divides by the held-out total SS around the held-out mean (so predicting a constant scores about 1).

**One streaming pass**, sufficient statistics only, float64, per depth and split: ``n``, ``Σx``, ``XᵀX``
(:class:`~tokensmith.analysis.stream.Moments`), ``XᵀY`` accumulated with ``index_add`` over a *compacted*
vocabulary of the next-token ids that occur (``d × V_seen``, never ``d × V``), and the next-token counts
(``Σy``; ``Σ‖y‖² = n`` for one-hots). Then, with ``G = X_cᵀX_c``, ``C = X_cᵀY_c``,
``β = (G + λ_abs I)⁻¹C`` and on either split

    RSS = tr(Y_cᵀY_c) − 2·tr(βᵀX_cᵀY_c) + tr(βᵀX_cᵀX_cβ),

with ``X_c, Y_c`` centred by the *training* means (expanded from the raw sums, so no second pass). Memory:
``8·d·(d + V_seen)`` bytes per depth and split (SmolLM2-135M, 31 depths, 4k distinct next tokens: ~1.2 GB;
pass ``layers=`` to probe a few depths).

Examples:
    >>> import tokensmith as ts
    >>> from tokensmith.analysis.probes import prediction_residual_by_layer
    >>> texts = [f"Story {i}: the {w} walked to the river, drank, and slept under a tree." for i, w in
    ...          enumerate("cat dog fox owl elk ant bee yak cow pig hen ram".split())]
    >>> f = prediction_residual_by_layer(ts.tiny("llama"), texts, progress=False)
    >>> f.layer.tolist(), bool((f.pr_train < 1).all())
    ([0, 1, 2], True)
    >>> sorted(f.meta["law"])
    ['decay_ratio', 'intercept', 'r2', 'slope']
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from tokensmith.analysis.frames import AnalysisFrame, make_frame, register_plot, require_matplotlib
from tokensmith.analysis.stream import Moments, as_texts, resolve_layers, stream_hidden

if TYPE_CHECKING:  # pragma: no cover
    from tokensmith.models.adapter import ModelAdapter

__all__ = ["law_fit", "prediction_residual_by_layer", "ridge_prediction_residual"]


# ----------------------------------------------------------------------------------------------- statistics
class _Compactor:
    """Maps token ids to ``0, 1, 2, ...`` as they first occur (a lookup table grown on demand)."""

    def __init__(self) -> None:
        self.table = torch.full((0,), -1, dtype=torch.long)
        self.size = 0

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        ids = ids.long().flatten()
        if ids.numel() == 0:
            return ids
        if int(ids.min()) < 0:
            raise ValueError("labels must be non-negative integers (token ids)")
        top = int(ids.max()) + 1
        if top > self.table.shape[0]:
            grown = torch.full((max(top, 2 * self.table.shape[0]),), -1, dtype=torch.long)
            grown[: self.table.shape[0]] = self.table
            self.table = grown
        uniq = torch.unique(ids)
        new = uniq[self.table[uniq] < 0]
        self.table[new] = torch.arange(self.size, self.size + len(new))
        self.size += len(new)
        return self.table[ids]


class _SplitStats:
    """``n, Σx, XᵀX`` (Moments) and ``Yᵀ X`` ``[K, d]``, ``Σy`` ``[K]``, ``Σ‖y‖²`` of one split, float64."""

    def __init__(self) -> None:
        self.x = Moments()
        self.yx: torch.Tensor | None = None
        self.ysum: torch.Tensor | None = None
        self.yy = 0.0

    @property
    def n(self) -> int:
        return self.x.n

    def _grow(self, k: int, d: int) -> None:
        if self.yx is None:
            self.yx = torch.zeros(max(k, 16), d, dtype=torch.float64)
            self.ysum = torch.zeros(max(k, 16), dtype=torch.float64)
        elif self.yx.shape[0] < k:
            cap = max(k, 2 * self.yx.shape[0])
            yx = torch.zeros(cap, d, dtype=torch.float64)
            ys = torch.zeros(cap, dtype=torch.float64)
            yx[: self.yx.shape[0]] = self.yx
            ys[: self.ysum.shape[0]] = self.ysum  # type: ignore[union-attr]
            self.yx, self.ysum = yx, ys

    def update_index(self, x: torch.Tensor, cols: torch.Tensor, k: int) -> None:
        """One-hot targets given as compacted column indices ``cols`` ``[n]`` (``k`` columns so far)."""
        if x.shape[0] == 0:
            return
        x = x.detach().to(torch.float64).cpu()
        self.x.update(x)
        self._grow(k, x.shape[1])
        self.yx.index_add_(0, cols, x)  # type: ignore[union-attr]
        self.ysum.index_add_(0, cols, torch.ones(len(cols), dtype=torch.float64))  # type: ignore[union-attr]
        self.yy += float(len(cols))

    def update_dense(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Dense targets ``y`` ``[n, K]``."""
        if x.shape[0] == 0:
            return
        x = x.detach().to(torch.float64).cpu()
        y = y.detach().to(torch.float64).cpu()
        self.x.update(x)
        self._grow(y.shape[1], x.shape[1])
        self.yx[: y.shape[1]] += y.T @ x  # type: ignore[index]
        self.ysum[: y.shape[1]] += y.sum(0)  # type: ignore[index]
        self.yy += float((y * y).sum())

    def cols(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(C [d, k] = XᵀY, s [k] = Σy)`` padded to ``k`` columns."""
        d = self.x.s1.shape[0]  # type: ignore[union-attr]
        C = torch.zeros(d, k, dtype=torch.float64)
        s = torch.zeros(k, dtype=torch.float64)
        if self.yx is not None:
            m = min(k, self.yx.shape[0])
            C[:, :m] = self.yx[:m].T
            s[:m] = self.ysum[:m]  # type: ignore[index]
        return C, s


def _solve(G: torch.Tensor, C: torch.Tensor, ridge: float) -> torch.Tensor:
    d = G.shape[0]
    if ridge > 0:
        lam = ridge * float(torch.trace(G)) / d
        return torch.linalg.solve(G + lam * torch.eye(d, dtype=G.dtype), C)
    return torch.linalg.lstsq(G, C, driver="gelsd").solution


def _rss(XtX: torch.Tensor, XtY: torch.Tensor, yy: float, beta: torch.Tensor) -> float:
    """``tr(YᵀY) − 2 tr(βᵀXᵀY) + tr(βᵀXᵀXβ)`` (all centred)."""
    return yy - 2.0 * float((beta * XtY).sum()) + float((beta * (XtX @ beta)).sum())


def _pr(train: _SplitStats, test: _SplitStats | None, k: int, ridge: float) -> tuple[float, float]:
    """Closed-form ``(PR_train, PR_test)`` (module docstring); ``PR_test`` NaN without (enough) test tokens."""
    n = train.n
    mu = train.x.s1 / n  # type: ignore[operator]
    C, s = train.cols(k)
    ybar = s / n
    G = train.x.s2 - n * torch.outer(mu, mu)  # type: ignore[operator]
    G = (G + G.T) / 2
    Cc = C - n * torch.outer(mu, ybar)
    tss = train.yy - n * float(ybar @ ybar)
    beta = _solve(G, Cc, ridge)
    pr_train = max(_rss(G, Cc, tss, beta), 0.0) / tss
    pr_test = float("nan")
    if test is not None and test.n > 0:
        m = test.n
        Ch, sh = test.cols(k)
        s1h = test.x.s1
        Gh = test.x.s2 - torch.outer(s1h, mu) - torch.outer(mu, s1h) + m * torch.outer(mu, mu)  # type: ignore[operator]
        Ch_c = Ch - torch.outer(mu, sh) - torch.outer(s1h - m * mu, ybar)  # type: ignore[operator]
        yy_c = test.yy - 2.0 * float(sh @ ybar) + m * float(ybar @ ybar)
        tss_h = test.yy - float(sh @ sh) / m
        if tss_h > 0:
            pr_test = max(_rss(Gh, Ch_c, yy_c, beta), 0.0) / tss_h
    return pr_train, pr_test


def _check_ridge(ridge: float) -> float:
    if not isinstance(ridge, (int, float)) or isinstance(ridge, bool) or not math.isfinite(ridge) or ridge < 0:
        raise ValueError(f"ridge must be a finite number >= 0 (relative to tr(XᵀX)/d), got {ridge!r}")
    return float(ridge)


def _need_tokens(n: int, d: int, ridge: float, tss: float, what: str) -> None:
    if n < 2:
        raise ValueError(f"{what} needs at least 2 training tokens with a next token, got {n}: add texts")
    if ridge == 0 and n <= d:
        raise ValueError(
            f"{what} with ridge=0 is an unregularised least-squares fit of a {d}-wide state and needs more than "
            f"d = {d} training tokens (got {n}): add texts, or pass ridge > 0 (e.g. 1e-3)"
        )
    if tss <= 0:
        raise ValueError(f"{what}: every training target is the same, so there is no variance to explain; add texts")


# ----------------------------------------------------------------------------------------------- pure function
def ridge_prediction_residual(
    X: torch.Tensor,
    y: torch.Tensor,
    ridge: float = 1e-3,
    X_test: torch.Tensor | None = None,
    y_test: torch.Tensor | None = None,
) -> tuple[float, float | None]:
    """Prediction residual ``PR = RSS/TSS`` of a ridge regression of ``y`` on ``X`` with intercept (float64).

    The module docstring gives the definition (intercept unpenalised; ``λ_abs = ridge·tr(X_cᵀX_c)/d``;
    ``ridge=0``: minimum-norm least squares). Closed form from sufficient statistics, exactly as
    :func:`prediction_residual_by_layer` computes each layer.

    Args:
        X: ``[N, d]`` features.
        y: ``[N]`` integer class labels (one-hot targets over the labels that occur) or ``[N, K]`` real targets.
        ridge: relative ridge ``>= 0``.
        X_test: optional held-out states, scored with the training fit (its TSS is around its own mean).
        y_test: the held-out labels (give both or neither).

    Returns:
        ``(pr_train, pr_test)``; ``pr_test`` is None without test data, NaN when its TSS is 0.

    Raises:
        ValueError: shapes that do not match, non-finite values, negative labels, ``ridge < 0``, fewer than 2
            rows, ``ridge=0`` with ``N <= d``, constant targets, or only one of ``X_test``/``y_test``.
        TypeError: non-tensor inputs.

    Examples:
        >>> import torch
        >>> from tokensmith.analysis.probes import ridge_prediction_residual
        >>> g = torch.Generator().manual_seed(0)
        >>> y = torch.randint(0, 5, (400,), generator=g)
        >>> X = torch.cat([torch.nn.functional.one_hot(y, 5).double(), torch.randn(400, 3, generator=g)], 1)
        >>> pr, _ = ridge_prediction_residual(X, y, ridge=1e-9)
        >>> pr < 1e-6
        True
    """
    ridge = _check_ridge(ridge)
    if (X_test is None) != (y_test is None):
        raise ValueError("give both X_test and y_test, or neither")
    comp = _Compactor()

    def stats(Xa: Any, ya: Any, name: str) -> _SplitStats:
        if not isinstance(Xa, torch.Tensor) or not isinstance(ya, torch.Tensor):
            raise TypeError(f"X{name} and y{name} must be torch tensors")
        if Xa.dim() != 2:
            raise ValueError(f"X{name} must be [N, d], got shape {tuple(Xa.shape)}")
        if ya.dim() not in (1, 2) or ya.shape[0] != Xa.shape[0]:
            raise ValueError(f"y{name} must be [N] labels or [N, K] targets with N = {Xa.shape[0]} rows, got "
                             f"shape {tuple(ya.shape)}")
        if not torch.isfinite(Xa).all() or (ya.is_floating_point() and not torch.isfinite(ya).all()):
            raise ValueError(f"X{name} / y{name} must be finite")
        st = _SplitStats()
        if ya.dim() == 1:
            if ya.is_floating_point():
                raise ValueError(f"1-D y{name} must hold integer labels; give real targets as [N, K]")
            st.update_index(Xa, comp(ya), comp.size)
        else:
            st.update_dense(Xa, ya)
        return st

    train = stats(X, y, "")
    dense = y.dim() == 2
    test = None
    if X_test is not None:
        if X_test.dim() != 2 or X_test.shape[1] != X.shape[1]:
            raise ValueError(f"X_test must be [M, {X.shape[1]}], got shape {tuple(X_test.shape)}")
        if y_test.dim() != y.dim() or (dense and y_test.shape[1] != y.shape[1]):  # type: ignore[union-attr]
            raise ValueError("y_test must have the form of y (labels, or targets with the same K)")
        test = stats(X_test, y_test, "_test")
    k = int(y.shape[1]) if dense else comp.size
    n, d = int(X.shape[0]), int(X.shape[1])
    _, s = train.cols(k)
    _need_tokens(n, d, ridge, train.yy - float(s @ s) / max(n, 1), "ridge_prediction_residual")
    pr_train, pr_test = _pr(train, test, k, ridge)
    return pr_train, (pr_test if test is not None else None)


# ----------------------------------------------------------------------------------------------- law fit
def _line(x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok].astype(float), y[ok].astype(float)
    nan = float("nan")
    if len(x) < 2 or np.ptp(x) == 0:
        return {"slope": nan, "intercept": nan, "r2": nan, "decay_ratio": nan}
    slope, intercept = np.polyfit(x, y, 1)
    fit = slope * x + intercept
    ss = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - float(((y - fit) ** 2).sum()) / ss if ss > 0 else 1.0
    return {"slope": float(slope), "intercept": float(intercept), "r2": r2, "decay_ratio": float(np.exp(slope))}


def law_fit(frame: AnalysisFrame, column: str = "log_pr_train", min_layer: int | None = None) -> dict[str, float]:
    """The least-squares line of ``column`` (``log PR``) against ``layer`` — the equi-learning law's fit.

    Args:
        frame: a :func:`prediction_residual_by_layer` frame.
        column: ``"log_pr_train"`` or ``"log_pr_heldout"``.
        min_layer: fit only depths ``>= min_layer`` (e.g. 1 to leave out the embeddings).

    Returns:
        ``{"slope", "intercept", "r2", "decay_ratio"}`` (``decay_ratio = exp(slope)``, the paper's ``ρ``: the
        factor by which each layer multiplies PR); NaN with fewer than 2 finite points.

    Raises:
        ValueError: a missing column.

    Examples:
        >>> import numpy as np
        >>> from tokensmith.analysis.frames import make_frame
        >>> from tokensmith.analysis.probes import law_fit
        >>> f = make_frame({"layer": [0, 1, 2, 3], "log_pr_train": np.log([0.8, 0.4, 0.2, 0.1])},
        ...                kind="prediction_residual")
        >>> round(law_fit(f)["decay_ratio"], 6), round(law_fit(f)["r2"], 6)
        (0.5, 1.0)
    """
    for c in ("layer", column):
        if c not in frame.columns:
            raise ValueError(f"law_fit needs a {c!r} column (a prediction_residual_by_layer frame)")
    f = frame if min_layer is None else frame[frame.layer >= min_layer]
    return _line(f["layer"].to_numpy(), f[column].to_numpy(dtype=float))


# ----------------------------------------------------------------------------------------------- streaming
def _split(n: int, holdout: float, seed: int) -> torch.Tensor:
    held = torch.zeros(n, dtype=torch.bool)
    if holdout > 0:
        if n < 2:
            raise ValueError(f"holdout={holdout} splits the corpus by text and needs at least 2 texts (got {n}): "
                             "add texts or pass holdout=0")
        k = min(max(int(round(holdout * n)), 1), n - 1)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
        held[perm[:k]] = True
    return held


def prediction_residual_by_layer(
    adapter: ModelAdapter,
    texts: Any,
    layers: Any = None,
    ridge: float = 1e-3,
    holdout: float = 0.2,
    seed: int = 0,
    batch_size: int = 8,
    max_length: int | None = None,
    skip_first: bool = True,
    progress: bool = True,
    column: str = "text",
) -> AnalysisFrame:
    """Per depth, the prediction residual of a ridge probe from the hidden state to the next token (module docstring).

    Args:
        adapter: a causal LM adapter.
        texts: a corpus (:func:`~tokensmith.analysis.stream.as_texts`); every position that has a next token in
            its text is one example.
        layers: hidden-state depths (``0`` = embeddings, ``L`` = last block's output before the final norm),
            None for all.
        ridge: relative ridge ``λ`` (``λ_abs = λ·tr(X_cᵀX_c)/d``); ``0`` = least squares (needs more training
            tokens than the hidden size).
        holdout: fraction of the *texts* held out (seeded split), in ``[0, 1)``; 0 = no held-out split.
        seed: seed of the split (``torch.Generator``).
        batch_size: texts per forward pass (as :func:`~tokensmith.analysis.stream.stream_hidden`).
        max_length: truncate each text to this many tokens.
        skip_first: leave out each text's first token (as an input; it still is the target of nothing). In
            trained LMs the first position is an attention sink whose hidden state has a norm orders of
            magnitude above the rest from the early-middle layers on; kept, its few rows dominate ``XᵀX`` (and
            the relative ridge) and the per-layer curve jumps where the sink appears. ``False`` keeps it.
        progress: a tqdm bar.
        column: the text column of a ``datasets.Dataset``.

    Returns:
        ``AnalysisFrame(kind="prediction_residual")``, one row per depth: ``layer, pr_train, pr_heldout,
        log_pr_train, log_pr_heldout, n_train, n_heldout`` (NaN held-out values without a held-out split).
        ``meta``: ``law`` / ``law_heldout`` (:func:`law_fit` of ``log PR`` against ``layer``), ``ridge``,
        ``holdout``, ``seed``, ``n_texts``, ``heldout_texts`` (corpus indices), ``vocab_seen``, ``model``.

    Raises:
        ValueError: an encoder (the probe needs next-token prediction of a causal LM) or an encoder-decoder
            model, an empty corpus or text, layers out of range, ``ridge < 0``, ``holdout`` outside ``[0, 1)``,
            ``holdout > 0`` with one text, fewer than 2 training tokens, ``ridge = 0`` with at most ``d``
            training tokens, or a training split whose next tokens are all the same.

    Examples:
        >>> import tokensmith as ts
        >>> from tokensmith.analysis.probes import prediction_residual_by_layer
        >>> texts = [f"Note {i}: buy {w}, then call home." for i, w in enumerate("milk eggs rice tea jam".split())]
        >>> f = prediction_residual_by_layer(ts.tiny("llama"), texts, layers=[0, 2], holdout=0.4, progress=False)
        >>> f[["layer", "n_train", "n_heldout"]].values.tolist()
        [[0, 27, 18], [2, 27, 18]]
    """
    if getattr(adapter.structure, "is_encoder_decoder", False):
        raise ValueError(
            f"prediction_residual_by_layer reads one decoder stack; {adapter.name!r} is an encoder-decoder model "
            "(e.g. T5): use a causal LM"
        )
    if not adapter.is_causal:
        raise ValueError(
            f"prediction_residual_by_layer probes next-token prediction and needs a causal LM; {adapter.name!r} "
            "is an encoder (each state sees the next token): use a causal LM"
        )
    ridge = _check_ridge(ridge)
    if not isinstance(holdout, (int, float)) or isinstance(holdout, bool) or not 0 <= holdout < 1:
        raise ValueError(f"holdout is the fraction of texts held out, in [0, 1); got {holdout!r}")
    items = as_texts(texts, column)
    depths = resolve_layers(adapter, layers)
    held = _split(len(items), float(holdout), seed)
    comp = _Compactor()
    stats = {d: (_SplitStats(), _SplitStats()) for d in depths}
    for hb in stream_hidden(adapter, items, depths, batch_size, max_length, progress=progress,
                            desc="prediction residual"):
        row_held = held[torch.tensor(hb.index, dtype=torch.long)]
        for split, sel in ((0, ~row_held), (1, row_held)):
            where = hb.label_mask & sel[:, None]
            if skip_first:
                where = where & (hb.mask.long().cumsum(1) > 1)
            if not bool(where.any()):
                continue
            cols = comp(hb.labels[where])
            for d in depths:
                stats[d][split].update_index(hb.tokens(d, where), cols, comp.size)
    k = comp.size
    first = stats[depths[0]][0]
    n_train, n_held = first.n, stats[depths[0]][1].n
    width = int(adapter.structure.hidden_size) if first.x.s1 is None else int(first.x.s1.shape[0])
    tss = 0.0
    if n_train > 0:
        _, s = first.cols(k)
        tss = first.yy - float(s @ s) / n_train
    _need_tokens(n_train, width, ridge, tss, "prediction_residual_by_layer")
    rows = []
    for d in depths:
        tr, ho = stats[d]
        pr_t, pr_h = _pr(tr, ho if ho.n > 0 else None, k, ridge)
        rows.append({
            "layer": d,
            "pr_train": pr_t,
            "pr_heldout": pr_h,
            "log_pr_train": math.log(pr_t) if pr_t > 0 else -math.inf,
            "log_pr_heldout": math.log(pr_h) if pr_h > 0 else (-math.inf if pr_h == 0 else float("nan")),
            "n_train": tr.n,
            "n_heldout": ho.n,
        })
    f = make_frame(rows, kind="prediction_residual")
    f.meta = {
        "model": adapter.name,
        "law": law_fit(f, "log_pr_train"),
        "law_heldout": law_fit(f, "log_pr_heldout"),
        "ridge": ridge,
        "skip_first": bool(skip_first),
        "holdout": float(holdout),
        "seed": int(seed),
        "n_texts": len(items),
        "heldout_texts": torch.nonzero(held).flatten().tolist(),
        "vocab_seen": k,
        "n_train": n_train,
        "n_heldout": n_held,
    }
    return f


# ----------------------------------------------------------------------------------------------- plot
@register_plot("prediction_residual")
def plot_prediction_residual(frame: AnalysisFrame, ax: Any = None, **kw: Any) -> Any:
    """``frame.plot()`` of :func:`prediction_residual_by_layer`: ``log PR`` against depth with the fitted lines."""
    plt = require_matplotlib()
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 4))
    x = frame["layer"].to_numpy(dtype=float)
    meta = getattr(frame, "meta", None) or {}
    for col, key, label in (("log_pr_train", "law", "train"), ("log_pr_heldout", "law_heldout", "held-out")):
        if col not in frame.columns or not np.isfinite(frame[col].to_numpy(dtype=float)).any():
            continue
        (line,) = ax.plot(x, frame[col], marker="o", linestyle="none", label=f"log PR ({label})", **kw)
        fit = meta.get(key) or law_fit(frame, col)
        if np.isfinite(fit.get("slope", np.nan)):
            ax.plot(x, fit["slope"] * x + fit["intercept"], color=line.get_color(), alpha=0.7,
                    label=f"fit: slope {fit['slope']:.3f}, r² {fit['r2']:.3f}")
    ax.set_xlabel("layer (hidden-state depth)")
    ax.set_ylabel("log prediction residual")
    ax.legend(fontsize="small")
    return ax
