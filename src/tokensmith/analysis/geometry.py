"""Geometry of token representations: anisotropy, whitening, effective rank, intrinsic dimension, k-NN overlap.

Pure functions over a point cloud ``X`` ``[N, d]`` (any float dtype, any device; everything is computed in
**float64** and scalars are returned as Python floats, tensors as float64):

- :func:`anisotropy` -- the mean cosine similarity of distinct pairs (Ethayarajh 2019, "How contextual are
  contextualized word representations?", §3; SimCTG, Su et al. 2022; "Rare Tokens Degenerate All Tokens", Yu et
  al. 2022). With unit vectors ``x̂_i = x_i / ‖x_i‖`` the ``N(N−1)`` ordered pairs sum in closed form,

      A(X) = 1/(N(N−1)) Σ_{i≠j} x̂_iᵀx̂_j = (‖Σ_i x̂_i‖² − N) / (N(N−1)),

  so it costs ``O(N·d)`` and streams (a running ``Σ x̂_i`` and a count).
- :class:`Whitening` / :func:`whiten` -- WhiteningBERT (Huang et al. 2021) and "Whitening Sentence
  Representations" (Su et al. 2021, eq. 4-6): ``x ↦ (x − μ) U_k Λ_k^{−1/2}`` with ``Σ = U Λ Uᵀ`` the
  eigendecomposition of the (population, ``1/N``) covariance, the ``k`` largest components kept. The fit set
  then has identity covariance exactly (to float64 rounding).
- :func:`effective_rank` -- the number of principal components that reach a fraction ``var`` of the total
  variance ("Representation Deficiency in Masked Language Modeling", Meng et al. 2024); and
  :func:`entropy_effective_rank` -- Roy & Vetterli (2007), "The effective rank: a measure of effective
  dimensionality", eq. (1)-(2): ``erank = exp(H(p))``, ``p_i = σ_i / Σ_j σ_j`` with ``σ`` the singular values
  of the centred ``X`` (``σ_i ∝ √λ_i``, the covariance eigenvalues).
- :func:`twonn` -- the TwoNN intrinsic dimension (Facco, d'Errico, Rodriguez & Laio 2017, Sci. Rep. 7:12140):
  with ``r1, r2`` a point's two nearest-neighbour distances, ``μ = r2/r1`` is Pareto distributed,
  ``F(μ) = 1 − μ^{−d}`` (eq. 3), so ``−log(1 − F(μ)) = d·log μ`` is a line through the origin; ``d`` is its
  least-squares slope over the empirical CDF after discarding the largest ``discard`` fraction of ``μ``
  (``method="fit"``, the paper's estimator, default), or the maximum-likelihood ``d = N / Σ_i log μ_i``
  (``method="mle"``).
- :func:`knn_overlap` -- the mean fraction of each point's ``k`` nearest neighbours shared between two
  representations of the same points (the neighbourhood-overlap of Doimo et al. 2020 / Valeriani et al. 2023,
  "The geometry of hidden representations of large transformer models").

:func:`token_geometry` streams a corpus through a model (:func:`~tokensmith.analysis.stream.stream_hidden`)
and reports all of these per hidden-state depth, for the texts and for a **shuffled control**, the same texts
with their tokens permuted within each text ("The Geometry of Tokens in Internal Representations of Large
Language Models", Viswanathan et al. 2025): anisotropy, effective ranks and the mean norm are exact over every
token (float64 running sums / :class:`~tokensmith.analysis.stream.Moments`); the point statistics (TwoNN,
k-NN overlap, whitened anisotropy) use a seeded uniform :class:`~tokensmith.analysis.stream.TokenSample` of
``max_points`` tokens, the same tokens at every depth.

Examples:
    >>> import torch
    >>> from tokensmith.analysis.geometry import anisotropy, effective_rank, twonn, whiten
    >>> g = torch.Generator().manual_seed(0)
    >>> X = torch.randn(500, 8, generator=g, dtype=torch.float64) + 5.0      # a shared offset: anisotropic
    >>> round(anisotropy(X), 2), abs(anisotropy(whiten(X))) < 0.01
    (0.97, True)
    >>> effective_rank(X @ torch.randn(8, 32, generator=g, dtype=torch.float64), var=0.999)   # 8-dim subspace
    8
    >>> plane = torch.rand(2000, 2, generator=g, dtype=torch.float64) @ torch.linalg.qr(
    ...     torch.randn(10, 10, generator=g, dtype=torch.float64))[0][:2]     # a square in R^10
    >>> round(twonn(plane).dim)
    2
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from tokensmith.analysis.frames import AnalysisFrame, make_frame, register_plot, require_matplotlib
from tokensmith.analysis.stream import (
    Moments,
    TokenSample,
    _encode_ids,
    as_texts,
    resolve_layers,
    stream_hidden,
)
from tokensmith.analysis.token_classes import token_classes

if TYPE_CHECKING:  # pragma: no cover
    from tokensmith.models.adapter import ModelAdapter

__all__ = [
    "METRICS",
    "TwoNNResult",
    "Whitening",
    "anisotropy",
    "effective_rank",
    "entropy_effective_rank",
    "knn_overlap",
    "plot_geometry",
    "shuffle_tokens",
    "token_geometry",
    "twonn",
    "whiten",
]

#: The per-layer statistics of :func:`token_geometry` (the panels of its plot).
METRICS: tuple[str, ...] = ("mean_norm", "anisotropy", "anisotropy_whitened", "effective_rank",
                            "entropy_effective_rank", "intrinsic_dim", "knn_overlap_next")

_BLOCK_ELEMS = 1 << 22  # float64 entries of one row block of a distance matrix (32 MiB)


# ----------------------------------------------------------------------------------------------- helpers
def _points(X: Any, what: str, min_n: int = 1) -> torch.Tensor:
    """``X`` as a float64 ``[N, d]`` tensor (CPU when it lives on MPS, which has no float64)."""
    if not isinstance(X, torch.Tensor):
        try:
            X = torch.as_tensor(X)
        except Exception as e:
            raise TypeError(f"{what} takes a [N, d] tensor (or array), not {type(X).__name__}") from e
    if X.dim() != 2:
        raise ValueError(f"{what} takes points as a [N, d] tensor (one row per point), got shape {tuple(X.shape)}")
    if not (X.dtype.is_floating_point or X.dtype in (torch.int32, torch.int64, torch.int16, torch.int8)):
        raise TypeError(f"{what} takes real-valued points, got dtype {X.dtype}")
    if X.shape[1] == 0:
        raise ValueError(f"{what} got points with 0 coordinates (shape {tuple(X.shape)})")
    if X.shape[0] < min_n:
        raise ValueError(f"{what} needs at least {min_n} points (rows), got {X.shape[0]}")
    dev = X.device if X.device.type != "mps" else torch.device("cpu")
    X = X.detach().to(device=dev, dtype=torch.float64)
    if not torch.isfinite(X).all():
        raise ValueError(f"{what}: the points contain NaN or inf; drop those rows or check the model's dtype")
    return X


def _null_rtol(d: int) -> float:
    """Eigenvalues at most this fraction of the largest are numerically zero (float64 eigh error ~ d·ε·λ_max)."""
    return max(1e-12, 8.0 * d * torch.finfo(torch.float64).eps)


def _cov_eigvalsh(X_or_moments: Any, what: str) -> torch.Tensor:
    """Eigenvalues (descending, ``≥ 0``, numerical zeros set to 0) of the population covariance."""
    if isinstance(X_or_moments, Moments):
        if X_or_moments.n < 2:
            raise ValueError(f"{what} needs at least 2 points; the Moments have seen {X_or_moments.n}")
        C = X_or_moments.cov.to(torch.float64)
    else:
        X = _points(X_or_moments, what, min_n=2)
        Xc = X - X.mean(0)
        C = Xc.T @ Xc / X.shape[0]
        C = (C + C.T) / 2
    lam = torch.linalg.eigvalsh(C).flip(0).clamp_min(0)
    if not lam[0] > 0:
        raise ValueError(f"{what}: the points have zero variance (all rows are equal); give distinct points")
    return torch.where(lam > _null_rtol(int(C.shape[0])) * lam[0], lam, torch.zeros((), dtype=lam.dtype))


def _step(n_cols: int) -> int:
    """Rows per block so that one block of an ``[rows, n_cols]`` float64 matrix stays near 32 MiB."""
    return max(1, _BLOCK_ELEMS // max(1, n_cols))


def _sq_dists_block(Xc: torch.Tensor, sq: torch.Tensor, s: int, e: int) -> torch.Tensor:
    """Squared distances of rows ``s:e`` to every row (float64, ``‖a‖² + ‖b‖² − 2aᵀb``), self = +inf."""
    D = (sq[s:e, None] + sq[None, :] - 2.0 * (Xc[s:e] @ Xc.T)).clamp_min_(0)
    r = torch.arange(e - s, device=Xc.device)
    D[r, r + s] = math.inf
    return D


def _knn_indices(X: torch.Tensor, k: int) -> torch.Tensor:
    """``[N, k]`` indices of each row's ``k`` nearest other rows, in row blocks (never ``N × N`` at once).

    Among equidistant neighbours (duplicated points) ``topk`` picks deterministically but arbitrarily."""
    Xc = X - X.mean(0)
    sq = (Xc * Xc).sum(1)
    n = X.shape[0]
    out = torch.empty(n, k, dtype=torch.long, device=X.device)
    step = _step(n)
    for s in range(0, n, step):
        e = min(s + step, n)
        D = _sq_dists_block(Xc, sq, s, e)
        out[s:e] = torch.topk(D, k, dim=1, largest=False).indices
    return out


def _check_int(name: str, v: Any, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name} must be an int, not {type(v).__name__}")
    if v < lo:
        raise ValueError(f"{name} must be >= {lo}, got {v}")
    return int(v)


# ----------------------------------------------------------------------------------------------- anisotropy
def anisotropy(X: Any) -> float:
    """The mean cosine similarity over distinct pairs, ``mean_{i≠j} cos(x_i, x_j)`` (module docstring).

    Closed form ``(‖Σ_i x̂_i‖² − N) / (N(N−1))`` with ``x̂_i = x_i/‖x_i‖`` (Ethayarajh 2019, §3), in float64:
    ``O(N·d)``, no pairwise matrix. ``0`` for isotropic directions, ``1`` when every vector points the same way,
    at least ``−1/(N−1)``.

    Args:
        X: ``[N, d]`` points (rows).

    Returns:
        The mean pairwise cosine (a float).

    Raises:
        ValueError: fewer than 2 rows, a zero row (its direction is undefined), NaN/inf, not 2-D.
        TypeError: not a tensor/array of numbers.

    Examples:
        >>> import tokensmith as ts, torch
        >>> from tokensmith.analysis.geometry import anisotropy
        >>> ad = ts.tiny("llama")
        >>> E = ad.model.get_input_embeddings().weight[3:503]   # (row 2, the pad token, is zero)
        >>> abs(anisotropy(E)) < 0.05                 # random init: nearly isotropic
        True
        >>> anisotropy(torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 3.0]]))   # cosines 1, 0, 0
        0.3333333333333333
    """
    X = _points(X, "anisotropy", min_n=2)
    norms = X.norm(dim=1)
    if not (norms > 0).all():
        raise ValueError(f"anisotropy: {int((norms == 0).sum())} of the {X.shape[0]} vectors are zero, so their "
                         "cosine is undefined; drop the zero rows first")
    s = (X / norms[:, None]).sum(0)
    n = X.shape[0]
    return float(((s @ s) - n) / (n * (n - 1)))


# ----------------------------------------------------------------------------------------------- whitening
@dataclass
class Whitening:
    """A fitted whitening map ``x ↦ (x − mean) @ W`` (WhiteningBERT; Su et al. 2021, eq. 4-6).

    ``W = U_k Λ_k^{−1/2}`` ``[d, k]``, with ``Λ_k, U_k`` the ``k`` largest eigenvalues / eigenvectors of the
    population covariance of the fit set (columns in decreasing-variance order), so the fit set maps to zero
    mean and identity covariance.

    **Fewer points than dimensions.** ``N`` points span at most ``N − 1`` directions: the covariance is then
    singular and only its **non-degenerate components** (eigenvalues above ``eps · λ_max``; their number is
    ``rank``) can be whitened. ``fit`` keeps those (``k = rank`` by default); directions outside them are
    dropped, not inflated. ``k > rank`` raises.

    Attributes:
        mean: ``[d]`` float64, the fit set's mean.
        W: ``[d, k]`` float64.
        rank: the number of non-degenerate covariance components of the fit set.
        eigenvalues: ``[k]`` the kept covariance eigenvalues (descending).

    Examples:
        >>> import torch
        >>> from tokensmith.analysis.geometry import Whitening
        >>> X = torch.randn(200, 6, generator=torch.Generator().manual_seed(0)) * torch.arange(1, 7)
        >>> w = Whitening.fit(X)
        >>> Z = w.transform(X)
        >>> Z.dtype, torch.allclose(torch.cov(Z.T, correction=0), torch.eye(6, dtype=torch.float64), atol=1e-10)
        (torch.float64, True)
        >>> Whitening.fit(X[:4]).rank          # 4 points in R^6 span 3 directions
        3
    """

    mean: torch.Tensor
    W: torch.Tensor
    rank: int
    eigenvalues: torch.Tensor

    @classmethod
    def fit(cls, X: Any, k: int | None = None, eps: float | None = None) -> Whitening:
        """Fit on ``X`` ``[N, d]`` (float64 inside).

        Args:
            X: the fit set.
            k: components to keep (the largest-variance ones); ``None`` = every non-degenerate one (``rank``).
            eps: eigenvalues ``≤ eps · λ_max`` are degenerate (numerically zero). Default
                ``max(1e-12, 8·d·ε_float64)``, float64 rounding of the eigendecomposition.

        Raises:
            ValueError: fewer than 2 points, zero variance, ``k < 1`` or ``k > rank``, ``eps`` not in ``[0, 1)``.
        """
        X = _points(X, "Whitening.fit", min_n=2)
        n, d = X.shape
        if eps is None:
            eps = _null_rtol(d)
        if not 0 <= float(eps) < 1:
            raise ValueError(f"eps is a relative eigenvalue floor in [0, 1), got {eps}")
        mu = X.mean(0)
        Xc = X - mu
        C = Xc.T @ Xc / n
        lam, U = torch.linalg.eigh((C + C.T) / 2)
        lam, U = lam.flip(0), U.flip(1)
        if not lam[0] > 0:
            raise ValueError("Whitening.fit: the points have zero variance (all rows are equal); give distinct "
                             "points")
        rank = int((lam > float(eps) * lam[0]).sum())
        if k is None:
            k = rank
        k = _check_int("k", k, 1)
        if k > rank:
            why = (f" ({n} points span at most {n - 1} directions: give more points than dimensions to whiten "
                   "all of them)" if n <= d else "")
            raise ValueError(f"k={k} exceeds the number of non-degenerate covariance components, {rank}, of the "
                             f"fit set in R^{d}{why}; use k <= {rank} or k=None")
        W = U[:, :k] / lam[:k].sqrt()
        return cls(mean=mu, W=W, rank=rank, eigenvalues=lam[:k].clone())

    def transform(self, X: Any) -> torch.Tensor:
        """``(X − mean) @ W`` as float64 ``[N, k]``.

        Raises:
            ValueError: ``X`` is not ``[N, d]`` with the fit set's ``d``.
        """
        X = _points(X, "Whitening.transform")
        if X.shape[1] != self.mean.shape[0]:
            raise ValueError(f"Whitening was fitted on {self.mean.shape[0]}-dim points, got {X.shape[1]}-dim ones")
        return (X - self.mean.to(X.device)) @ self.W.to(X.device)


def whiten(X: Any, k: int | None = None, eps: float | None = None) -> torch.Tensor:
    """``Whitening.fit(X, k, eps).transform(X)``: ``X`` with zero mean and identity covariance (float64 ``[N, k]``).

    With fewer points than dimensions only the ``rank`` non-degenerate components are kept (:class:`Whitening`).

    Raises:
        ValueError: see :meth:`Whitening.fit`.

    Examples:
        >>> import tokensmith as ts
        >>> from tokensmith.analysis.geometry import anisotropy, whiten
        >>> E = ts.tiny("llama").model.get_input_embeddings().weight[3:303]
        >>> tuple(whiten(E).shape), tuple(whiten(E, k=8).shape)
        ((300, 64), (300, 8))
    """
    return Whitening.fit(X, k=k, eps=eps).transform(X)


# ----------------------------------------------------------------------------------------------- ranks
def effective_rank(X: Any, var: float = 0.9) -> int:
    """The number of principal components needed to reach a fraction ``var`` of the total variance.

    With ``λ_1 ≥ … ≥ λ_d`` the covariance eigenvalues (float64), the smallest ``m`` with
    ``Σ_{i≤m} λ_i ≥ var · Σ_i λ_i`` (Meng et al. 2024, "Representation Deficiency in Masked Language
    Modeling", §3). Eigenvalues at float64 rounding level count as zero.

    Args:
        X: ``[N, d]`` points, or a :class:`~tokensmith.analysis.stream.Moments` of a stream (exact, streamed).
        var: the variance fraction, in ``(0, 1]``.

    Raises:
        ValueError: fewer than 2 points, zero variance, ``var`` not in ``(0, 1]``.

    Examples:
        >>> import tokensmith as ts
        >>> from tokensmith.analysis.geometry import effective_rank
        >>> E = ts.tiny("llama").model.get_input_embeddings().weight
        >>> 1 <= effective_rank(E, 0.5) < effective_rank(E, 0.9) <= 64
        True
    """
    if isinstance(var, bool) or not isinstance(var, (int, float)) or not 0 < float(var) <= 1:
        raise ValueError(f"var is a fraction of the variance in (0, 1], got {var!r}")
    lam = _cov_eigvalsh(X, "effective_rank")
    cum = lam.cumsum(0)
    need = float(var) * float(cum[-1]) * (1 - 1e-12)
    return min(int((cum < need).sum()) + 1, int((lam > 0).sum()))


def entropy_effective_rank(X: Any) -> float:
    """Roy & Vetterli (2007) effective rank ``exp(H(p))``, ``p_i = σ_i / Σ_j σ_j`` (eq. 1-2).

    ``σ`` are the singular values of the centred ``X`` (``σ_i = √(N·λ_i)``, computed from the float64
    covariance eigenvalues ``λ``; numerically-zero ones are dropped), ``H(p) = −Σ p_i log p_i``. Equals ``k``
    for ``k`` equal singular values, lies in ``[1, rank]``.

    Args:
        X: ``[N, d]`` points, or a :class:`~tokensmith.analysis.stream.Moments` of a stream.

    Raises:
        ValueError: fewer than 2 points, zero variance.

    Examples:
        >>> import torch
        >>> from tokensmith.analysis.geometry import entropy_effective_rank
        >>> X = torch.cat([torch.eye(4), -torch.eye(4)])          # 4 equal singular values
        >>> round(entropy_effective_rank(X), 10)
        4.0
    """
    lam = _cov_eigvalsh(X, "entropy_effective_rank")
    s = lam[lam > 0].sqrt()
    p = s / s.sum()
    return float(torch.exp(-(p * p.log()).sum()))


# ----------------------------------------------------------------------------------------------- TwoNN
@dataclass
class TwoNNResult:
    """The result of :func:`twonn`; ``float(result)`` is ``dim``.

    Attributes:
        dim: the intrinsic-dimension estimate.
        method: ``"fit"`` or ``"mle"``.
        n_points: the rows given.
        n_distinct: the distinct rows used (exact duplicates are collapsed to one point).
        n_duplicates: ``n_points − n_distinct``.
        n_fit: the ratios ``μ`` the estimate used (after ``discard`` for ``"fit"``).
        discard: the discarded largest fraction (``"fit"``).
    """

    dim: float
    method: str
    n_points: int
    n_distinct: int
    n_duplicates: int
    n_fit: int
    discard: float

    def __float__(self) -> float:
        return float(self.dim)


def _two_nn_ratios(X: torch.Tensor) -> torch.Tensor:
    """``μ_i = r2/r1`` of every (distinct) row; the candidates come from blocked squared distances, ``r1, r2``
    are then recomputed exactly as ``‖x_i − x_j‖`` (no cancellation for close pairs)."""
    Xc = X - X.mean(0)
    sq = (Xc * Xc).sum(1)
    n = X.shape[0]
    kc = min(4, n - 1)
    step = _step(n)
    mus = []
    for s in range(0, n, step):
        e = min(s + step, n)
        cand = torch.topk(_sq_dists_block(Xc, sq, s, e), kc, dim=1, largest=False).indices
        r = (Xc[s:e, None, :] - Xc[cand]).norm(dim=-1).sort(dim=1).values
        mus.append(r[:, 1] / r[:, 0])
    return torch.cat(mus)


def twonn(X: Any, discard: float = 0.1, method: str = "fit") -> TwoNNResult:
    """TwoNN intrinsic dimension (Facco et al. 2017, Sci. Rep. 7:12140), float64.

    For each point, ``μ_i = r2_i / r1_i`` (distances to its second and first nearest neighbour). Under local
    uniformity ``μ`` is Pareto: ``F(μ) = 1 − μ^{−d}`` (eq. 3), i.e. ``−log(1 − F(μ)) = d · log μ``.

    - ``method="fit"`` (default, the paper's estimator): sort ``μ``, take the empirical ``F(μ_(i)) = i/N``,
      drop the largest ``discard`` fraction (the noisy tail; the paper uses 10%; ``i = N``, where
      ``−log(1 − F)`` is infinite, is always dropped), and fit a line **through the origin**:
      ``d = Σ x_i y_i / Σ x_i²`` with ``x = log μ``, ``y = −log(1 − F)``.
    - ``method="mle"``: the maximum-likelihood ``d = N / Σ_i log μ_i`` over every point (``discard`` unused;
      ``(N − 1)/Σ log μ`` would be unbiased, the difference is ``O(1/N)``).

    **Duplicates** (``r1 = 0``, e.g. the same token's embedding at depth 0) make ``μ`` undefined: exact duplicate
    rows are collapsed to one point first and counted in ``n_duplicates``. The nearest-neighbour search runs
    in row blocks (never an ``N × N`` matrix; ``N = 5000`` needs ~32 MiB).

    Args:
        X: ``[N, d]`` points.
        discard: the largest fraction of ``μ`` left out of the fit, in ``[0, 1)``.
        method: ``"fit"`` or ``"mle"``.

    Returns:
        :class:`TwoNNResult` (``float(result)`` = the dimension).

    Raises:
        ValueError: fewer than 3 distinct points (every point needs two neighbours), fewer than 2 ratios left
            after ``discard``, all ratios equal to 1 (a lattice: no scale information), bad ``discard``/``method``.

    Warns:
        UserWarning: no more distinct points than ambient dimensions: ``N`` points span at most ``N − 1``
            directions, so the estimate is limited by the sample (give more points).

    Examples:
        >>> import tokensmith as ts, torch
        >>> from tokensmith.analysis.geometry import twonn
        >>> cube = torch.rand(1500, 3, generator=torch.Generator().manual_seed(0))
        >>> r = twonn(torch.cat([cube, torch.zeros(1500, 5)], 1))          # a 3-D cube in R^8
        >>> round(r.dim), r.method, r.n_fit
        (3, 'fit', 1350)
    """
    if method not in ("fit", "mle"):
        raise ValueError(f"method must be 'fit' (linear fit of Facco et al.) or 'mle', got {method!r}")
    if isinstance(discard, bool) or not isinstance(discard, (int, float)) or not 0 <= float(discard) < 1:
        raise ValueError(f"discard is the fraction of the largest ratios left out, in [0, 1), got {discard!r}")
    X = _points(X, "twonn")
    n_points, D = X.shape
    U = torch.unique(X, dim=0)
    n = int(U.shape[0])
    if n < 3:
        raise ValueError(
            f"TwoNN needs at least 3 distinct points (each point's two nearest neighbours), got {n} distinct of "
            f"{n_points}; give more points (for token_geometry: more or longer texts, or a larger max_points)"
        )
    if n <= D:
        warnings.warn(
            f"fewer points than dimensions for TwoNN: {n} distinct points in R^{D} span at most {n - 1} "
            "directions, so the intrinsic-dimension estimate is limited by the sample size; give more points "
            "than dimensions (token_geometry: max_points and more texts) unless the data is known to be "
            "low-dimensional", UserWarning, stacklevel=2)
    mu = _two_nn_ratios(U)
    x = mu.log()
    if method == "mle":
        sx = float(x.sum())
        if not sx > 0:
            raise ValueError("TwoNN: every point's two nearest neighbours are equidistant (r2 = r1 for all), so "
                             "the distances carry no dimension information (a regular lattice?)")
        return TwoNNResult(n / sx, "mle", n_points, n, n_points - n, n, 0.0)
    x = x.sort().values
    n_fit = min(int(math.floor(n * (1 - float(discard)))), n - 1)
    if n_fit < 2:
        raise ValueError(f"TwoNN fit: only {n_fit} ratios left of {n} after discard={discard}; give more points "
                         "or a smaller discard")
    i = torch.arange(1, n_fit + 1, dtype=torch.float64, device=x.device)
    y = -torch.log1p(-i / n)
    xf = x[:n_fit]
    sxx = float(xf @ xf)
    if not sxx > 0:
        raise ValueError("TwoNN: the kept ratios are all r2/r1 = 1 (equidistant neighbours), so the fit has no "
                         "slope; give generic points or a smaller discard")
    return TwoNNResult(float(xf @ y) / sxx, "fit", n_points, n, n_points - n, n_fit, float(discard))


# ----------------------------------------------------------------------------------------------- k-NN overlap
def knn_overlap(X: Any, Y: Any, k: int = 10) -> float:
    """Mean neighbourhood overlap ``(1/N) Σ_i |kNN_X(i) ∩ kNN_Y(i)| / k`` of two representations of the same
    ``N`` points (row ``i`` of ``X`` and of ``Y`` is the same point; their widths may differ).

    Neighbours are by Euclidean distance, self excluded, ties (duplicate points) broken arbitrarily (Doimo et al. 2020,
    "Hierarchical nucleation in deep neural networks", eq. 1; Valeriani et al. 2023). Invariant to rotations,
    translations and scaling of either cloud; ``1`` when the neighbourhoods agree; about ``k/(N−1)`` for
    unrelated clouds. Computed in float64 row blocks (no ``N × N`` matrix).

    Args:
        X: ``[N, d_x]`` points.
        Y: ``[N, d_y]`` the same points in another representation (row ``i`` is point ``i``).
        k: neighbours per point, ``1 ≤ k < N``.

    Raises:
        ValueError: different ``N``, ``k`` out of range, NaN/inf, not 2-D.

    Examples:
        >>> import torch
        >>> from tokensmith.analysis.geometry import knn_overlap
        >>> X = torch.randn(300, 5, generator=torch.Generator().manual_seed(0))
        >>> knn_overlap(X, 3 * X + 1, k=10)
        1.0
    """
    k = _check_int("k", k, 1)
    X = _points(X, "knn_overlap")
    Y = _points(Y, "knn_overlap").to(X.device)
    if X.shape[0] != Y.shape[0]:
        raise ValueError(f"knn_overlap compares two representations of the same points: X has {X.shape[0]} rows, "
                         f"Y has {Y.shape[0]}")
    n = X.shape[0]
    if k >= n:
        raise ValueError(f"k={k} neighbours need at least k+1 = {k + 1} points, got {n}; use a smaller k or more "
                         "points")
    a, b = _knn_indices(X, k), _knn_indices(Y, k)
    hits = 0
    step = _step(k * k)
    for s in range(0, n, step):
        e = min(s + step, n)
        hits += int((a[s:e, :, None] == b[s:e, None, :]).any(-1).sum())
    return hits / (n * k)


# ----------------------------------------------------------------------------------------------- corpus
def shuffle_tokens(adapter: ModelAdapter, texts: Any, seed: int = 0, max_length: int | None = None,
                   column: str = "text") -> list[list[int]]:
    """The shuffled control of "The Geometry of Tokens" (Viswanathan et al. 2025): each text's token ids
    (``adapter.encode``, truncated to ``max_length``), permuted within the text; special tokens (BOS, [CLS],
    [SEP], ...) stay at their positions. One ``torch.Generator(seed)``, texts in order, ``randperm`` per text.

    Raises:
        ValueError / TypeError: as :func:`~tokensmith.analysis.stream.as_texts`.

    Examples:
        >>> import tokensmith as ts
        >>> from tokensmith.analysis.geometry import shuffle_tokens
        >>> ad = ts.tiny("llama")
        >>> s = shuffle_tokens(ad, ["one two three four five"], seed=0)[0]
        >>> sorted(s) == sorted(ad.encode("one two three four five").input_ids.tolist())
        True
    """
    items = as_texts(texts, column)
    g = torch.Generator().manual_seed(int(seed))
    out = []
    for x in items:
        ids = _encode_ids(adapter, x, max_length)
        free = [i for i, c in enumerate(token_classes(adapter.tokenizer, ids)) if c != "special"]
        perm = torch.randperm(len(free), generator=g).tolist()
        new = list(ids)
        for dst, src in zip(free, perm, strict=True):
            new[dst] = ids[free[src]]
        out.append(new)
    return out


def _layer_stats(P: dict[int, torch.Tensor], depths: list[int], k: int, discard: float, method: str,
                 where: str, progress: bool) -> dict[int, dict[str, float]]:
    """Point statistics of the token sample at each depth: TwoNN, k-NN overlap with the next depth, and the
    anisotropy of the odd-position half whitened with a map fitted on the even-position half."""
    from tqdm.auto import tqdm

    out: dict[int, dict[str, float]] = {}
    for j, d in enumerate(tqdm(depths, desc=f"geometry ({where}): layers", disable=not progress, leave=False)):
        X = P[d]
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # token_geometry warns once for all layers
                r = twonn(X, discard=discard, method=method)
            wfit = Whitening.fit(X[0::2])
            aw = anisotropy(wfit.transform(X[1::2]))
        except ValueError as e:
            raise ValueError(f"token_geometry, layer {d} ({where}): {e}") from e
        nxt = knn_overlap(X, P[depths[j + 1]], k) if j + 1 < len(depths) else math.nan
        out[d] = {"anisotropy_whitened": aw, "intrinsic_dim": r.dim, "n_distinct": r.n_distinct,
                  "knn_overlap_next": nxt}
    return out


def token_geometry(
    adapter: ModelAdapter,
    texts: Any,
    layers: Any = None,
    k: int = 10,
    max_points: int = 2000,
    shuffled: bool = True,
    seed: int = 0,
    batch_size: int = 8,
    max_length: int | None = None,
    skip_first: bool = True,
    var: float = 0.9,
    discard: float = 0.1,
    id_method: str = "fit",
    column: str = "text",
    progress: bool = True,
) -> AnalysisFrame:
    """Per-layer geometry of the token representations of a corpus, with a shuffled-token control.

    One pass over the corpus per condition (:func:`~tokensmith.analysis.stream.stream_hidden`); per depth:

    - exact over **every** token (float64 running sums): ``n_tokens``; ``mean_norm`` ``mean ‖h‖``;
      ``anisotropy`` (:func:`anisotropy`, from a running ``Σ ĥ`` and count); ``effective_rank`` (``var``) and
      ``entropy_effective_rank`` from the streamed covariance (:class:`~tokensmith.analysis.stream.Moments`);
    - on a seeded uniform sample of ``max_points`` tokens, the same tokens at every depth
      (:class:`~tokensmith.analysis.stream.TokenSample`; every token when the corpus has at most
      ``max_points``): ``intrinsic_dim`` (:func:`twonn`, ``discard``, ``id_method``; ``n_distinct`` its distinct
      points, duplicates collapsed), ``knn_overlap_next`` (:func:`knn_overlap` with the **next requested**
      depth, NaN at the last), and ``anisotropy_whitened``: a :class:`Whitening` fitted on the sample's
      even-numbered tokens (stream order) and the anisotropy of the odd-numbered ones under it, i.e. held-out
      (on the fit set itself it would be ≈ 0 by construction).

    ``condition`` is ``"text"``, and with ``shuffled=True`` also ``"shuffled"``: the same texts with the
    tokens permuted within each text (:func:`shuffle_tokens`, seeded), the control of Viswanathan et al. (2025).
    One row per (layer, condition).

    **The first token** of each text (BOS / [CLS] where the tokenizer adds one, else the first word) is an
    attention sink whose hidden state has an outsized norm in most LMs; it would dominate norms, covariance and
    anisotropy. ``skip_first=True`` (default) leaves it out of every statistic, in both conditions. Other
    special tokens (e.g. BERT's final [SEP]) are kept.

    Args:
        adapter: a decoder-only or encoder-only model (any with hidden states).
        texts: a str, a list of str or token ids, a ``[N, T]`` id tensor, or a ``datasets.Dataset`` (``column``).
        layers: hidden-state depths (default ``0..L``; :func:`~tokensmith.analysis.stream.resolve_layers`).
        k: neighbours for ``knn_overlap_next``.
        max_points: the token sample size for the point statistics (memory ``max_points × depths × d`` fp32).
        shuffled: also compute the shuffled control.
        seed: seeds the token sample and the shuffling.
        batch_size: texts per forward pass (left-padded batches).
        max_length: truncate each text to this many tokens.
        skip_first: leave out each text's first token (above).
        var: the variance fraction of ``effective_rank``.
        discard: :func:`twonn`'s ``discard``.
        id_method: :func:`twonn`'s ``method`` (``"fit"`` or ``"mle"``).
        column: the text column of a Dataset.
        progress: tqdm bars over the texts and the layers.

    Returns:
        ``AnalysisFrame(kind="geometry")`` with ``layer``, ``condition``, ``n_tokens``, ``n_sample``,
        ``n_distinct``, ``mean_norm``, ``anisotropy``, ``anisotropy_whitened``, ``effective_rank``,
        ``entropy_effective_rank``, ``intrinsic_dim``, ``knn_overlap_next``; ``meta`` has the settings.

    Raises:
        ValueError: an encoder-decoder model, a depth out of range, an empty corpus or text, fewer than
            ``max(k + 1, 4)`` tokens (after ``skip_first``) for the point statistics, a zero hidden state,
            bad ``k``/``max_points``/``var``/``discard``/``id_method``/``batch_size``/``max_length``.

    Warns:
        UserWarning: once, when the token sample has no more points than the hidden size (TwoNN, :func:`twonn`).

    Examples:
        >>> import tokensmith as ts
        >>> from tokensmith.analysis.geometry import token_geometry
        >>> texts = ["The cat sat on the mat and looked at the birds outside.",
        ...          "Rivers flow to the sea, carrying sand, stones and leaves.",
        ...          "A quick brown fox jumps over the lazy dog near three old trees."] * 4
        >>> f = token_geometry(ts.tiny("llama"), texts, progress=False)
        >>> f.kind, f.shape[0], sorted(set(f.condition))
        ('geometry', 6, ['shuffled', 'text'])
        >>> bool(f[f.layer == 2].knn_overlap_next.isna().all())
        True
    """
    if getattr(adapter.structure, "is_encoder_decoder", False):
        raise ValueError(
            f"token_geometry reads the hidden states of one decoder-only or encoder-only stack; {adapter.name!r} "
            "is an encoder-decoder model (e.g. T5), which the hidden-state stream does not cover: use a causal "
            "LM or an encoder"
        )
    k = _check_int("k", k, 1)
    max_points = _check_int("max_points", max_points, 4)
    if max_points <= k:
        raise ValueError(f"max_points={max_points} must exceed k={k} (each sampled token needs k neighbours)")
    if isinstance(var, bool) or not isinstance(var, (int, float)) or not 0 < float(var) <= 1:
        raise ValueError(f"var is a fraction of the variance in (0, 1], got {var!r}")
    if id_method not in ("fit", "mle"):
        raise ValueError(f"id_method must be 'fit' or 'mle', got {id_method!r}")
    if isinstance(discard, bool) or not isinstance(discard, (int, float)) or not 0 <= float(discard) < 1:
        raise ValueError(f"discard is the fraction of the largest TwoNN ratios left out, in [0, 1), got {discard!r}")
    depths = resolve_layers(adapter, layers)
    items = as_texts(texts, column)
    conditions: list[tuple[str, Any, int | None]] = [("text", items, max_length)]
    if shuffled:
        conditions.append(("shuffled", shuffle_tokens(adapter, items, seed, max_length), None))

    rows: list[dict[str, Any]] = []
    n_tokens = 0
    warned = False
    for cond, data, ml in conditions:
        mom = {d: Moments() for d in depths}
        usum: dict[int, torch.Tensor] = {}
        nsum = {d: 0.0 for d in depths}
        sample = TokenSample(max_points, seed=seed)
        n = 0
        for hb in stream_hidden(adapter, data, depths, batch_size, ml, column, progress, desc=f"geometry ({cond})"):
            where = hb.mask & (hb.mask.long().cumsum(1) > 1) if skip_first else hb.mask
            if not where.any():
                continue
            hs = {d: hb.tokens(d, where) for d in depths}
            n += int(where.sum())
            for d, h in hs.items():
                h64 = h.to(torch.float64)
                nr = h64.norm(dim=1)
                if not (nr > 0).all():
                    raise ValueError(f"token_geometry: a hidden state at layer {d} ({cond}) is the zero vector, so "
                                     "its direction (anisotropy) is undefined; check the model or pick other layers")
                mom[d].update(h64)
                u = (h64 / nr[:, None]).sum(0)
                usum[d] = usum[d] + u if d in usum else u
                nsum[d] += float(nr.sum())
            sample.add({str(d): h for d, h in hs.items()})
        need = max(k + 1, 4)
        if n < need:
            extra = " after skipping each text's first token (skip_first=True)" if skip_first else ""
            raise ValueError(f"token_geometry needs at least {need} tokens (k={k} neighbours, TwoNN, a whitening "
                             f"split); the corpus has {n}{extra}: give more or longer texts, or a smaller k")
        n_tokens = n
        P = {d: sample.fields[str(d)] for d in depths}
        m = int(next(iter(P.values())).shape[0])
        dim = int(next(iter(P.values())).shape[1])
        if m <= dim and not warned:
            warnings.warn(
                f"fewer points than dimensions for TwoNN: the token sample has {m} tokens in R^{dim} (hidden size), "
                "so intrinsic_dim is limited by the sample; raise max_points (and give more text) to above "
                f"{dim}", UserWarning, stacklevel=2)
            warned = True
        pts = _layer_stats(P, depths, k, discard, id_method, cond, progress)
        for d in depths:
            rows.append({
                "layer": d, "condition": cond, "n_tokens": n, "n_sample": m, "n_distinct": pts[d]["n_distinct"],
                "mean_norm": nsum[d] / n,
                "anisotropy": float((usum[d] @ usum[d] - n) / (n * (n - 1))),
                "anisotropy_whitened": pts[d]["anisotropy_whitened"],
                "effective_rank": effective_rank(mom[d], var),
                "entropy_effective_rank": entropy_effective_rank(mom[d]),
                "intrinsic_dim": pts[d]["intrinsic_dim"],
                "knn_overlap_next": pts[d]["knn_overlap_next"],
            })
    return make_frame(rows, kind="geometry", model=adapter.name, n_texts=len(items), n_tokens=n_tokens,
                      layers=depths, num_layers=int(adapter.structure.num_layers), k=k, max_points=max_points,
                      var=float(var), discard=float(discard), id_method=id_method, skip_first=skip_first,
                      shuffled=shuffled, seed=seed, batch_size=batch_size, max_length=max_length,
                      whitening="fit on the even-numbered sampled tokens, evaluated on the odd-numbered ones")


# ----------------------------------------------------------------------------------------------- plot
@register_plot("geometry")
def plot_geometry(frame: AnalysisFrame, ax: Any = None, metrics: Any = None, ncols: int = 4, **kw: Any) -> Any:
    """Small multiples: one panel per metric (default :data:`METRICS`) against layer, one line per condition
    (``text`` solid, ``shuffled`` dashed).

    Args:
        frame: a :func:`token_geometry` frame.
        ax: ``None`` (a new figure), or a sequence/array of Axes with at least one per metric (one Axes for one
            metric).
        metrics: a metric name or a list of them.
        ncols: panels per row of a new figure.
        **kw: passed to ``Axes.plot``.

    Returns:
        A 1-D numpy array of the Axes used, one per metric (``.figure`` is the figure).

    Raises:
        ValueError: an unknown metric or too few Axes.
    """
    import numpy as np

    plt = require_matplotlib()
    from matplotlib.ticker import MaxNLocator

    cols = list(METRICS if metrics is None else ([metrics] if isinstance(metrics, str) else metrics))
    bad = [c for c in cols if c not in frame.columns]
    if bad or not cols:
        raise ValueError(f"metrics {bad or cols} are not columns of the geometry frame; choose from {list(METRICS)}")
    if ax is None:
        nc = max(1, min(ncols, len(cols)))
        nr = -(-len(cols) // nc)
        _, grid = plt.subplots(nr, nc, figsize=(3.0 * nc, 2.4 * nr), squeeze=False, layout="constrained")
        axes = grid.ravel()
        for extra in axes[len(cols):]:
            extra.set_visible(False)
        axes = axes[: len(cols)]
    else:
        axes = np.atleast_1d(np.asarray(ax, dtype=object)).ravel()
        if len(axes) < len(cols):
            raise ValueError(f"{len(cols)} metrics need {len(cols)} Axes, got {len(axes)}")
        axes = axes[: len(cols)]
    conds = list(dict.fromkeys(frame["condition"].tolist())) if "condition" in frame.columns else [None]
    for a, c in zip(axes, cols, strict=True):
        for j, cond in enumerate(conds):
            s = frame if cond is None else frame[frame["condition"] == cond]
            s = s.sort_values("layer")
            a.plot(s["layer"], s[c].astype(float), marker="o", linestyle="-" if j == 0 else "--",
                   label=str(cond), **kw)
        a.xaxis.set_major_locator(MaxNLocator(integer=True))
        a.set_title(c, fontsize=9)
        a.set_xlabel("layer (depth)", fontsize=8)
        a.tick_params(labelsize=7)
    if len(conds) > 1:
        axes[0].legend(fontsize=7)
    return axes
