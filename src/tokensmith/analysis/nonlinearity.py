"""Token-level nonlinearity between consecutive layers (LLM-Microscope) and contextualisation (self-similarity).

**Nonlinearity** (Razzhigaev et al., 2025, "LLM-Microscope: Uncovering the Hidden Role of Punctuation in
Context Memory of Transformers", §3.1). For a layer pair ``(l, l+1)`` stack the hidden states of every
token of the corpus into ``H_l`` ``[N, d]``, centre and normalise them over the corpus' tokens,

    H̃_l = (H_l − 1·μ_lᵀ) / ‖H_l − 1·μ_lᵀ‖_F,

fit one linear map by least squares

    A* = argmin_A ‖H̃_l A − H̃_{l+1}‖_F  =  (H̃_lᵀH̃_l + λ·tr(H̃_lᵀH̃_l)/d · I)⁻¹ H̃_lᵀH̃_{l+1},

(``λ`` = ``ridge``, relative to the mean eigenvalue of the Gram matrix; it only matters where the system is
singular, e.g. hidden states of rank < d) and report each token's residual

    E_i^l = √N · ‖h̃_i^l A* − h̃_i^{l+1}‖.

**Scaling.** The rows of H̃ have mean squared norm ``1/N``; the factor ``√N`` makes the mean of ``(E_i^l)²`` over
the corpus equal ``‖H̃_l A* − H̃_{l+1}‖²_F``, a per-token quantity that does not shrink with the corpus size and is
comparable across layers: ``mean_i (E_i^l)² = 1 − linearity_l``, where the per-layer **linearity score**
("Your Transformer is Secretly Linear", Razzhigaev et al., 2024) is

    linearity_l = 1 − ‖H̃_l A* − H̃_{l+1}‖²_F / ‖H̃_{l+1}‖²_F   (‖H̃_{l+1}‖_F = 1).

**Streaming, two passes** (:func:`tokensmith.analysis.stream.stream_hidden`): pass 1 accumulates in float64 the
sufficient statistics ``n, Σh_l, Σh_lh_lᵀ`` per depth (:class:`~tokensmith.analysis.stream.Moments`) and the
cross moments ``Σh_lh_{l+1}ᵀ`` per pair, from which ``μ``, the Frobenius norms, ``A*`` and the linearity score
follow in closed form; pass 2 recomputes the hidden states and each token's residual. Nothing of size ``N·d``
is kept. The corpus is read twice, so it is materialised once as a list first (a generator is fine).

**Contextualisation** (:func:`contextualization`): ``1 − cos(h_l(token in its text), h_l(token alone))``, the
self-similarity view of Ethayarajh (2019), "How contextual are contextualized word representations?". "Alone" is
the token between the adapter's own special tokens (what ``adapter.encode`` wraps a text in: BERT's
``[CLS] x [SEP]``, a BOS where the tokenizer adds one, nothing for SmolLM2). It is this module's
contextualisation score; LLM-Microscope's "contextual memory" (``−log P(prefix | e_i)`` from a trained
decoder) needs a trained reconstruction model per LM and is left out.

Examples:
    >>> import tokensmith as ts
    >>> from tokensmith.analysis.nonlinearity import by_class, token_nonlinearity
    >>> texts = ["The cat sat on the mat, and then it slept for a while.",
    ...          "In 1999, prices rose by 4 percent; the bank did not react.",
    ...          "She said: 'no, not again!' and left the room quietly.",
    ...          "Rivers flow to the sea, carrying sand, stones and leaves.",
    ...          "A quick brown fox jumps over the lazy dog near 3 trees.",
    ...          "Why would anyone write code like this? Nobody knows."]
    >>> f = token_nonlinearity(ts.tiny("llama"), texts, progress=False)
    >>> sorted(f.layer.unique().tolist()), list(f.columns)[-2:]
    ([0, 1], ['layer', 'nonlinearity'])
    >>> all(0 <= s <= 1 for s in f.meta["linearity"].values())
    True
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from tokensmith.analysis.frames import AnalysisFrame, make_frame, register_plot, require_matplotlib
from tokensmith.analysis.stream import HiddenBatch, Moments, as_texts, resolve_layers, stream_hidden
from tokensmith.analysis.token_classes import CLASSES, token_classes

if TYPE_CHECKING:  # pragma: no cover
    from tokensmith.models.adapter import ModelAdapter

__all__ = ["by_class", "contextualization", "linear_map_residuals", "linearity_scores", "token_nonlinearity"]


# ----------------------------------------------------------------------------------------------- checks
def _check_stack(adapter: ModelAdapter, what: str) -> None:
    if getattr(adapter.structure, "is_encoder_decoder", False):
        raise ValueError(
            f"{what} reads the hidden states of one decoder-only or encoder-only stack; {adapter.name!r} is an "
            "encoder-decoder model (e.g. T5), which the hidden-state stream does not cover: use a causal LM or "
            "an encoder"
        )


def _check_ridge(ridge: float) -> float:
    if not isinstance(ridge, (int, float)) or isinstance(ridge, bool) or not math.isfinite(ridge) or ridge < 0:
        raise ValueError(f"ridge must be a finite number >= 0 (relative to the mean eigenvalue), got {ridge!r}")
    return float(ridge)


def _pairs(adapter: ModelAdapter, layers: Any) -> list[tuple[int, int]]:
    depths = resolve_layers(adapter, layers)
    s = set(depths)
    pairs = [(d, d + 1) for d in depths if d + 1 in s]
    if not pairs:
        raise ValueError(
            f"token_nonlinearity maps depth l to depth l+1, so layers must hold two adjacent depths (e.g. [3, 4]) "
            f"or be None for all; got depths {depths} of {adapter.name!r} (0..{adapter.structure.num_layers})"
        )
    return pairs


# ----------------------------------------------------------------------------------------------- linear map
def _solve_map(gxx: torch.Tensor, gxy: torch.Tensor, ridge: float) -> torch.Tensor:
    """``A = (G + λ·tr(G)/d·I)⁻¹ C`` in float64; the minimum-norm least-squares solution when ``λ = 0``."""
    d = gxx.shape[0]
    if ridge > 0:
        lam = ridge * float(torch.trace(gxx)) / d
        return torch.linalg.solve(gxx + lam * torch.eye(d, dtype=gxx.dtype, device=gxx.device), gxy)
    return torch.linalg.lstsq(gxx.cpu(), gxy.cpu(), driver="gelsd").solution.to(gxx.device)


def linear_map_residuals(
    X: torch.Tensor, Y: torch.Tensor, ridge: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The LLM-Microscope linear map between two sets of token states and each token's residual (float64).

    ``X`` ``[N, d_x]`` and ``Y`` ``[N, d_y]`` (row ``i`` of both is token ``i``) are centred and divided by
    their Frobenius norm (module docstring), then ``A* = argmin_A ‖X̃A − Ỹ‖_F`` is solved from the normal
    equations with ridge ``λ·tr(X̃ᵀX̃)/d_x`` (``ridge=0``: the minimum-norm least-squares solution, so a singular
    system is fine). Invariant to translating or rescaling ``X`` and ``Y``.

    Args:
        X: ``[N, d_x]`` states at layer ``l``.
        Y: ``[N, d_y]`` states of the same tokens at layer ``l + 1``.
        ridge: relative ridge ``λ >= 0``.

    Returns:
        ``(A, residuals, score)``: ``A`` ``[d_x, d_y]`` maps centred-normalised ``X`` to centred-normalised
        ``Y``; ``residuals[i] = √N·‖x̃_i A − ỹ_i‖`` ``[N]``; ``score = 1 − ‖X̃A − Ỹ‖²_F`` (the linearity score,
        ``= 1 − mean(residuals²)``).

    Raises:
        ValueError: not 2-D, different numbers of rows, fewer than 2 rows, non-finite values, a constant
            ``X`` or ``Y`` (zero norm after centring), or ``ridge < 0``.

    Examples:
        >>> import torch
        >>> from tokensmith.analysis.nonlinearity import linear_map_residuals
        >>> X = torch.randn(50, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        >>> A, r, score = linear_map_residuals(X, 3 * X @ torch.ones(4, 2, dtype=torch.float64) + 1)
        >>> bool(r.max() < 1e-10), round(score, 10)
        (True, 1.0)
    """
    ridge = _check_ridge(ridge)
    if not isinstance(X, torch.Tensor) or not isinstance(Y, torch.Tensor):
        raise TypeError("X and Y must be torch tensors of shape [N, d]")
    if X.dim() != 2 or Y.dim() != 2:
        raise ValueError(f"X and Y must be 2-D [N, d], got shapes {tuple(X.shape)} and {tuple(Y.shape)}")
    if X.shape[0] != Y.shape[0]:
        raise ValueError(f"X and Y must have the same rows (tokens), got {X.shape[0]} and {Y.shape[0]}")
    n = int(X.shape[0])
    if n < 2:
        raise ValueError(f"need at least 2 tokens to centre the states, got {n}")
    X = X.detach().to(torch.float64)
    Y = Y.detach().to(torch.float64)
    if not (torch.isfinite(X).all() and torch.isfinite(Y).all()):
        raise ValueError("X and Y must be finite (no NaN/inf)")
    Xc = X - X.mean(0)
    Yc = Y - Y.mean(0)
    sx, sy = float(Xc.norm()), float(Yc.norm())
    if sx == 0 or sy == 0:
        raise ValueError("X or Y is constant over the tokens (zero norm after centring): nothing to fit")
    Xn, Yn = Xc / sx, Yc / sy
    A = _solve_map(Xn.T @ Xn, Xn.T @ Yn, ridge)
    R = Xn @ A - Yn
    return A, R.norm(dim=1) * math.sqrt(n), 1.0 - float((R * R).sum())


class _PairFit:
    """``μ_x, μ_y, ‖·‖_F`` and ``A*`` of one layer pair, from streamed sufficient statistics."""

    def __init__(self, mx: Moments, my: Moments, cross: torch.Tensor, ridge: float) -> None:
        n = mx.n
        self.mu_x, self.mu_y = mx.s1 / n, my.s1 / n  # type: ignore[operator]
        gxx = mx.s2 - n * torch.outer(self.mu_x, self.mu_x)  # type: ignore[operator]
        gxx = (gxx + gxx.T) / 2
        gxy = cross - n * torch.outer(self.mu_x, self.mu_y)
        tyy = float(torch.trace(my.s2)) - n * float(self.mu_y @ self.mu_y)  # type: ignore[arg-type]
        txx = float(torch.trace(gxx))
        if txx <= 0 or tyy <= 0:
            raise ValueError("the hidden states are constant over the corpus' tokens: nothing to fit")
        self.sx, self.sy = math.sqrt(txx), math.sqrt(tyy)
        g = gxx / txx
        c = gxy / (self.sx * self.sy)
        self.A = _solve_map(g, c, ridge)
        rss = float((self.A * (g @ self.A)).sum()) - 2 * float((self.A * c).sum()) + 1.0
        self.linearity = 1.0 - max(rss, 0.0)

    def residuals(self, x: torch.Tensor, y: torch.Tensor, n: int) -> torch.Tensor:
        xt = (x - self.mu_x) / self.sx
        yt = (y - self.mu_y) / self.sy
        return (xt @ self.A - yt).norm(dim=1) * math.sqrt(n)


# ----------------------------------------------------------------------------------------------- tokens
def _where(hb: HiddenBatch, skip_first: bool) -> tuple[torch.Tensor, torch.Tensor]:
    pos = hb.mask.long().cumsum(1) - 1
    where = hb.mask & (pos >= 1) if skip_first else hb.mask
    return where, pos


def _token_meta(hb: HiddenBatch, where: torch.Tensor, pos: torch.Tensor) -> dict[str, torch.Tensor]:
    idx = torch.tensor(hb.index, dtype=torch.long)[:, None].expand_as(where)
    return {"text": idx[where], "position": pos[where], "token_id": hb.input_ids[where]}


def _token_columns(adapter: ModelAdapter, meta: dict[str, list[torch.Tensor]]) -> dict[str, np.ndarray]:
    cols = {k: torch.cat(v).numpy() for k, v in meta.items()}
    ids = cols["token_id"]
    uniq, inv = np.unique(ids, return_inverse=True)
    tok = adapter.tokenizer
    strs = np.array([tok.decode([int(i)]) for i in uniq] + [""], dtype=object)[:-1]
    cls = np.array(token_classes(tok, uniq.tolist()) + [""], dtype=object)[:-1]
    return {"text": cols["text"], "position": cols["position"], "token": strs[inv], "token_id": ids,
            "token_class": cls[inv]}


def _frame(cols: dict[str, np.ndarray], layers: list[int], values: list[np.ndarray], value: str, kind: str,
           **meta: Any) -> AnalysisFrame:
    n = len(cols["token_id"])
    data = {k: np.tile(v, len(layers)) for k, v in cols.items()}
    data["layer"] = np.repeat(np.asarray(layers, dtype=np.int64), n)
    data[value] = np.concatenate(values) if values else np.zeros(0)
    return make_frame(pd.DataFrame(data), kind=kind, **meta)


# ----------------------------------------------------------------------------------------------- nonlinearity
def token_nonlinearity(
    adapter: ModelAdapter,
    texts: Any,
    layers: Any = None,
    ridge: float = 1e-6,
    batch_size: int = 8,
    max_length: int | None = None,
    skip_first: bool = True,
    progress: bool = True,
    column: str = "text",
) -> AnalysisFrame:
    """Per-token nonlinearity ``E_i^l`` of the map from depth ``l`` to ``l+1`` (LLM-Microscope, module docstring).

    Args:
        adapter: a decoder-only or encoder-only :class:`~tokensmith.models.ModelAdapter`.
        texts: a corpus (:func:`~tokensmith.analysis.stream.as_texts`); read twice.
        layers: hidden-state depths (``0`` = embeddings, ``l`` = output of block ``l−1``); every ``l`` with
            ``l+1`` also in ``layers`` gives a pair ``l → l+1``. None: all ``L`` pairs.
        ridge: relative ridge ``λ`` (module docstring); ``0`` = plain (minimum-norm) least squares.
        batch_size: texts per forward pass (as :func:`~tokensmith.analysis.stream.stream_hidden`).
        max_length: truncate each text to this many tokens.
        skip_first: leave out each text's first token, from the fit and from the rows. The first position is
            an attention sink with hidden-state norms orders of magnitude above the rest in trained LMs; kept,
            it dominates the Frobenius normalisation and the fit. ``False`` keeps it.
        progress: tqdm bars for the two passes.
        column: the text column when ``texts`` is a ``datasets.Dataset``.

    Returns:
        ``AnalysisFrame(kind="nonlinearity")``, one row per (text, position, layer): ``text`` (corpus index),
        ``position`` (token index in the text), ``token`` (decoded), ``token_id``, ``token_class``
        (:func:`~tokensmith.analysis.token_classes.token_classes`), ``layer`` (``l``; the map goes ``l → l+1``),
        ``nonlinearity`` (``E_i^l``, scaled so that its mean square is ``1 − linearity_l``). ``meta``:
        ``linearity`` ``{l: score}`` (:func:`linearity_scores` for a frame), ``pairs``, ``n_tokens``,
        ``n_texts``, ``ridge``, ``skip_first``, ``model``.

    Raises:
        ValueError: an empty corpus or text, layers out of range or without an adjacent pair, an
            encoder-decoder model, ``ridge < 0``, or fewer than ``d + 2`` tokens (``d`` the hidden size): with
            ``N − 1 <= d`` centred tokens every layer maps exactly onto the next and every residual is 0.

    Examples:
        >>> import tokensmith as ts
        >>> from tokensmith.analysis.nonlinearity import token_nonlinearity
        >>> ad = ts.tiny("llama")
        >>> texts = [f"Sentence number {i}: the {w} sat, quietly, on a mat." for i, w in
        ...          enumerate(["cat", "dog", "bird", "fish", "horse", "child", "robot", "king"])]
        >>> f = token_nonlinearity(ad, texts, layers=[1, 2], progress=False)
        >>> f.layer.unique().tolist(), f.meta["n_tokens"] == len(f)
        ([1], True)
        >>> bool(abs((f.nonlinearity ** 2).mean() - (1 - f.meta["linearity"][1])) < 1e-9)
        True
    """
    _check_stack(adapter, "token_nonlinearity")
    ridge = _check_ridge(ridge)
    items = as_texts(texts, column)
    pairs = _pairs(adapter, layers)
    depths = sorted({d for p in pairs for d in p})
    mom = {d: Moments() for d in depths}
    cross: dict[int, torch.Tensor] = {}
    for hb in stream_hidden(adapter, items, depths, batch_size, max_length, progress=progress,
                            desc="nonlinearity: fit"):
        where, _ = _where(hb, skip_first)
        xs = {d: hb.tokens(d, where).to(torch.float64) for d in depths}
        for d in depths:
            mom[d].update(xs[d])
        for a, b in pairs:
            c = xs[a].T @ xs[b]
            cross[a] = cross[a] + c if a in cross else c
    n = mom[depths[0]].n
    width = int(adapter.structure.hidden_size) if mom[depths[0]].s1 is None else int(mom[depths[0]].s1.shape[0])
    if n < width + 2:
        extra = " after skipping each text's first token (skip_first=True)" if skip_first else ""
        raise ValueError(
            f"token_nonlinearity fits a {width}x{width} map per layer pair and needs at least {width + 2} tokens "
            f"(more than the hidden size + 1, else every map is exact); got {n}{extra}: add texts or longer texts"
        )
    fits = {a: _PairFit(mom[a], mom[b], cross[a], ridge) for a, b in pairs}
    values: dict[int, list[torch.Tensor]] = {a: [] for a, _ in pairs}
    meta: dict[str, list[torch.Tensor]] = {"text": [], "position": [], "token_id": []}
    for hb in stream_hidden(adapter, items, depths, batch_size, max_length, progress=progress,
                            desc="nonlinearity: residuals"):
        where, pos = _where(hb, skip_first)
        for k, v in _token_meta(hb, where, pos).items():
            meta[k].append(v)
        for a, b in pairs:
            x = hb.tokens(a, where).to(torch.float64)
            y = hb.tokens(b, where).to(torch.float64)
            values[a].append(fits[a].residuals(x, y, n))
    cols = _token_columns(adapter, meta)
    if len(cols["token_id"]) != n:  # pragma: no cover - the stream is deterministic
        raise RuntimeError("the two passes over the corpus saw different tokens")
    layer_list = [a for a, _ in pairs]
    return _frame(
        cols, layer_list, [torch.cat(values[a]).numpy() for a in layer_list], "nonlinearity", "nonlinearity",
        model=adapter.name, n_texts=len(items), n_tokens=n, pairs=[list(p) for p in pairs], ridge=ridge,
        skip_first=skip_first, linearity={a: fits[a].linearity for a in layer_list},
        scaling="E = sqrt(N)*||h~_l A - h~_(l+1)||; mean E^2 = 1 - linearity",
    )


def linearity_scores(frame: AnalysisFrame) -> AnalysisFrame:
    """The per-layer linearity scores of a :func:`token_nonlinearity` frame as rows ``layer, next_layer,
    linearity, n_tokens`` (``kind="linearity"``).

    Raises:
        ValueError: ``frame`` is not a nonlinearity frame.

    Examples:
        >>> import tokensmith as ts
        >>> from tokensmith.analysis.nonlinearity import linearity_scores, token_nonlinearity
        >>> texts = [f"Text {i}: a {w} and a {v} went out, then came back." for i, (w, v) in
        ...          enumerate(zip("cat dog owl fox elk ant bee yak".split(), "sun moon sea sky rain snow".split()))]
        >>> s = linearity_scores(token_nonlinearity(ts.tiny("llama"), texts, progress=False))
        >>> list(s.columns), s.layer.tolist()
        (['layer', 'next_layer', 'linearity', 'n_tokens'], [0, 1])
    """
    meta = getattr(frame, "meta", None) or {}
    if getattr(frame, "kind", None) != "nonlinearity" or "linearity" not in meta:
        raise ValueError("linearity_scores takes the frame returned by token_nonlinearity")
    rows = [{"layer": int(k), "next_layer": int(k) + 1, "linearity": float(s), "n_tokens": int(meta["n_tokens"])}
            for k, s in sorted(meta["linearity"].items())]
    return make_frame(rows, kind="linearity", model=meta.get("model"))


# ----------------------------------------------------------------------------------------------- by class
def by_class(frame: AnalysisFrame, value: str | None = None) -> AnalysisFrame:
    """Mean, standard error and count of ``value`` per ``(layer, token_class)``.

    Args:
        frame: a :func:`token_nonlinearity` or :func:`contextualization` frame (any frame with ``layer``,
            ``token_class`` and ``value`` columns).
        value: the column to summarise; None: the frame's kind (``"nonlinearity"`` / ``"contextualization"``),
            else ``"nonlinearity"``.

    Returns:
        ``AnalysisFrame(kind=f"{frame.kind}_by_class")`` with columns ``layer, token_class, mean, sem, count``
        (``sem`` = sample std / √count, NaN for a single token); classes in
        :data:`~tokensmith.analysis.token_classes.CLASSES` order.

    Raises:
        ValueError: a missing column.

    Examples:
        >>> import pandas as pd
        >>> from tokensmith.analysis.frames import make_frame
        >>> from tokensmith.analysis.nonlinearity import by_class
        >>> f = make_frame(pd.DataFrame({"layer": [0, 0, 0], "token_class": ["content", "content", "stopword"],
        ...                              "nonlinearity": [1.0, 3.0, 5.0]}), kind="nonlinearity")
        >>> by_class(f)[["token_class", "mean", "count"]].values.tolist()
        [['stopword', 5.0, 1], ['content', 2.0, 2]]
    """
    kind = getattr(frame, "kind", None) or "frame"
    if value is None:
        value = kind if kind in frame.columns else "nonlinearity"
    missing = [c for c in ("layer", "token_class", value) if c not in frame.columns]
    if missing:
        raise ValueError(f"by_class needs the columns {missing} (give value=<column> for another column)")
    g = pd.DataFrame(frame).groupby(["layer", "token_class"])[value]
    out = g.agg(["mean", "count"]).reset_index()
    std = g.std(ddof=1).reset_index(drop=True)
    out["sem"] = (std / np.sqrt(out["count"])).where(out["count"] > 1)
    order = {c: i for i, c in enumerate(CLASSES)}
    out["_o"] = out.token_class.map(lambda c: order.get(c, len(order)))
    out = out.sort_values(["layer", "_o"]).drop(columns="_o").reset_index(drop=True)
    out = out[["layer", "token_class", "mean", "sem", "count"]]
    out["count"] = out["count"].astype(int)
    meta = dict(getattr(frame, "meta", None) or {})
    return make_frame(out, kind=f"{kind}_by_class", value=value, source_kind=kind, model=meta.get("model"))


# ----------------------------------------------------------------------------------------------- contextualisation
class _Bank:
    """Growing ``[n, d]`` float32 rows per depth (capacity doubling), addressed by insertion index."""

    def __init__(self) -> None:
        self.rows: dict[int, torch.Tensor] = {}
        self.n = 0

    def add(self, vecs: dict[int, torch.Tensor]) -> None:
        m = next(iter(vecs.values())).shape[0]
        for d, v in vecs.items():
            buf = self.rows.get(d)
            if buf is None or buf.shape[0] < self.n + m:
                cap = max(2 * (buf.shape[0] if buf is not None else 0), self.n + m, 64)
                new = torch.empty(cap, v.shape[1], dtype=torch.float32)
                if buf is not None:
                    new[: self.n] = buf[: self.n]
                self.rows[d] = buf = new
            buf[self.n : self.n + m] = v
        self.n += m


def _special_wrap(adapter: ModelAdapter) -> tuple[list[int], list[int]]:
    """The special tokens ``adapter.encode`` puts before and after a text (leading / trailing run)."""
    enc = adapter.encode("a")
    ids = enc.input_ids.tolist()
    sp = enc.special_mask.tolist()
    i = 0
    while i < len(ids) and sp[i]:
        i += 1
    j = len(ids)
    while j > i and sp[j - 1]:
        j -= 1
    return ids[:i], ids[j:]


def contextualization(
    adapter: ModelAdapter,
    texts: Any,
    layers: Any = None,
    batch_size: int = 8,
    max_length: int | None = None,
    skip_first: bool = True,
    alone_batch_size: int = 64,
    progress: bool = True,
    column: str = "text",
) -> AnalysisFrame:
    """Per token and depth: ``1 − cos(h_l(token in its text), h_l(token alone))`` (Ethayarajh, 2019).

    "Alone" runs the token between the adapter's own special tokens (the leading and trailing special
    tokens of ``adapter.encode("a")``: ``[CLS] x [SEP]`` for BERT, ``BOS x`` where the tokenizer adds a BOS,
    ``x`` for SmolLM2), read at the token. A token that *is* one of those wrapper specials is run as the
    wrapper alone (the encoding of an empty text), read at its own place. The alone states are computed once
    per distinct token id (batched, ``alone_batch_size`` sequences per forward) and cached for the whole run:
    ``#distinct ids × #depths × d`` float32. One pass over the corpus.

    0 means the token's state does not depend on its context (depth 0 of a model without absolute position
    embeddings; the first token of a causal LM without BOS); larger is more contextual. This is the
    contextualisation score of :mod:`tokensmith.analysis`; LLM-Microscope's trained-decoder contextual memory is
    not implemented (module docstring).

    Args:
        adapter: a decoder-only or encoder-only adapter.
        texts: a corpus (:func:`~tokensmith.analysis.stream.as_texts`).
        layers: hidden-state depths, None for all ``0..L``.
        batch_size: texts per forward pass (as :func:`~tokensmith.analysis.stream.stream_hidden`).
        max_length: truncate each text to this many tokens.
        skip_first: leave out each text's first token (in a causal LM without BOS it is its own "alone").
        alone_batch_size: sequences per forward for the alone states.
        progress: a tqdm bar.
        column: the text column of a ``datasets.Dataset``.

    Returns:
        ``AnalysisFrame(kind="contextualization")``, one row per (text, position, layer): ``text, position,
        token, token_id, token_class, layer, contextualization``; ``meta``: ``wrap`` (the special ids before /
        after the alone token), ``n_tokens``, ``n_distinct``, ``model``.

    Raises:
        ValueError: an empty corpus or text, layers out of range, an encoder-decoder model, no token left
            (e.g. one-token texts with ``skip_first=True``), ``alone_batch_size < 1``.

    Examples:
        >>> import tokensmith as ts
        >>> from tokensmith.analysis.nonlinearity import contextualization
        >>> f = contextualization(ts.tiny("llama"), ["the cat sat on the mat", "a dog"], progress=False)
        >>> float(f[f.layer == 0].contextualization.abs().max()) < 1e-6   # no position embeddings in llama
        True
        >>> bool(f[f.layer == 2].contextualization.mean() > 1e-3)
        True
    """
    _check_stack(adapter, "contextualization")
    if alone_batch_size < 1:
        raise ValueError(f"alone_batch_size must be >= 1, got {alone_batch_size}")
    items = as_texts(texts, column)
    depths = resolve_layers(adapter, layers)
    prefix, suffix = _special_wrap(adapter)
    wrap = prefix + suffix
    slot: dict[int, int] = {}
    bank = _Bank()
    values: dict[int, list[torch.Tensor]] = {d: [] for d in depths}
    meta: dict[str, list[torch.Tensor]] = {"text": [], "position": [], "token_id": []}

    def alone(new: list[int]) -> None:
        seqs, at = [], []
        for v in new:
            if v in wrap:
                seqs.append(list(wrap))
                at.append(wrap.index(v))
            else:
                seqs.append(prefix + [v] + suffix)
                at.append(len(prefix))
        lens = torch.tensor([len(s) for s in seqs])
        idx = torch.tensor(at)
        start = 0
        for hb in stream_hidden(adapter, seqs, depths, alone_batch_size, progress=False, desc="alone"):
            B, T = hb.mask.shape
            rows = torch.arange(B)
            col = T - lens[start : start + B] + idx[start : start + B]
            bank.add({d: torch.nn.functional.normalize(hb.hidden[d][rows, col].double(), dim=-1).float()
                      for d in depths})
            start += B
        for v in new:
            slot[v] = len(slot)

    for hb in stream_hidden(adapter, items, depths, batch_size, max_length, progress=progress,
                            desc="contextualization"):
        where, pos = _where(hb, skip_first)
        tm = _token_meta(hb, where, pos)
        ids = tm["token_id"]
        new = [v for v in dict.fromkeys(ids.tolist()) if v not in slot]
        if new:
            alone(new)
        for k, v in tm.items():
            meta[k].append(v)
        rows = torch.tensor([slot[v] for v in ids.tolist()], dtype=torch.long)
        for d in depths:
            h = torch.nn.functional.normalize(hb.tokens(d, where).double(), dim=-1)
            cos = (h * bank.rows[d][rows].double()).sum(-1) if len(rows) else torch.zeros(0, dtype=torch.float64)
            values[d].append(1.0 - cos)
    n = sum(len(v) for v in meta["token_id"])
    if n == 0:
        raise ValueError(
            "contextualization found no tokens to score: every text has a single token and skip_first=True "
            "drops it; give longer texts or skip_first=False"
        )
    cols = _token_columns(adapter, meta)
    return _frame(
        cols, depths, [torch.cat(values[d]).numpy() for d in depths], "contextualization", "contextualization",
        model=adapter.name, n_texts=len(items), n_tokens=n, n_distinct=len(slot), wrap=[prefix, suffix],
        skip_first=skip_first,
    )


# ----------------------------------------------------------------------------------------------- plots
def _plot_classes(frame: AnalysisFrame, ax: Any = None, value: str | None = None, **kw: Any) -> Any:
    """Mean ``value`` per layer, one line per token class, ± one standard error."""
    plt = require_matplotlib()
    kind = getattr(frame, "kind", "") or ""
    g = frame if kind.endswith("_by_class") else by_class(frame, value)
    label = (getattr(g, "meta", None) or {}).get("value", value or kind)
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 4))
    for cls in [c for c in CLASSES if c in set(g.token_class)] + sorted(set(g.token_class) - set(CLASSES)):
        s = g[g.token_class == cls].sort_values("layer")
        m = s["mean"].to_numpy(dtype=float)
        e = s["sem"].fillna(0).to_numpy(dtype=float)
        ax.plot(s["layer"], m, marker="o", label=cls, **kw)
        ax.fill_between(s["layer"].to_numpy(), m - e, m + e, alpha=0.2)
    pairs = str(label).startswith("nonlinearity")
    ax.set_xlabel("layer l (map l → l+1)" if pairs else "layer (hidden-state depth)")
    ax.set_ylabel(f"mean {label}")
    ax.legend(title="token class", fontsize="small")
    return ax


@register_plot("nonlinearity")
def plot_nonlinearity(frame: AnalysisFrame, ax: Any = None, **kw: Any) -> Any:
    """``frame.plot()`` of :func:`token_nonlinearity`: mean nonlinearity per layer, one line per token class."""
    return _plot_classes(frame, ax, "nonlinearity", **kw)


@register_plot("contextualization")
def plot_contextualization(frame: AnalysisFrame, ax: Any = None, **kw: Any) -> Any:
    """``frame.plot()`` of :func:`contextualization`: mean 1 − cos per layer, one line per token class."""
    return _plot_classes(frame, ax, "contextualization", **kw)


register_plot("nonlinearity_by_class")(plot_nonlinearity)
register_plot("contextualization_by_class")(plot_contextualization)
