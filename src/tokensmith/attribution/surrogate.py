"""Surrogate-model perturbation attributions: KernelSHAP and LIME (ATT-10).

Both fit a linear model ``g(z) = b + Σ_g z_g·φ_g`` to the target rows' scores over binary coalitions
``z ∈ {0, 1}^M`` of the features (``z_g = 0``: feature ``g`` removed, as for occlusion: deleted or replaced
by ``baseline``), and report the coefficients ``φ`` as the scores. Every coalition is built from the token
**ids** and all coalitions of all target rows are scored in **one** batched call of the perturbation engine
(:mod:`tokensmith.attribution.perturbation`: one teacher-forced ``token_logprobs`` per perturbed sequence
scores every row; ``batch_size=`` micro-batches it).

- KernelSHAP (Lundberg & Lee, 2017, "A Unified Approach to Interpreting Model Predictions"): weighted least
  squares with the Shapley kernel ``π(z) = (M − 1) / (C(M, |z|)·|z|·(M − |z|))`` and the efficiency
  constraint ``Σ_g φ_g = f(x) − f(∅)`` enforced exactly (the kernel's infinite weights on ``z = 0`` and
  ``z = 1``). With every coalition (``2^M − 2 ≤ n_samples``) the solution is the exact Shapley value;
  otherwise coalitions are drawn from the kernel (size ``s`` with probability ``∝ (M − 1)/(s(M − s))``, then a
  uniform subset of that size; paired with their complements by default) and weighted equally.
- LIME (Ribeiro et al., 2016, "Why Should I Trust You?"): coalitions with a uniform number of removed
  features, the exponential kernel ``π(z) = exp(−D(z)²/σ²)`` on the cosine distance to the full input
  ``D(z) = 1 − √(|z|/M)``, and a weighted ridge fit with an unpenalised intercept.

As for Shapley value sampling, the players are the features before the first scored token (one coalition
game serves every row; a row's own token cannot be absent), so continuation tokens get no score.

The solvers are pure tensor functions at the bottom of this module (:func:`shapley_kernel_weights`,
:func:`constrained_wls`, :func:`lime_kernel_weights`, :func:`weighted_ridge`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from tokensmith.attribution.base import AttributionMethod, MethodOutput, register_method
from tokensmith.attribution.perturbation import _score, coalition_players, perturb, removal_id
from tokensmith.attribution.targets import AttributionProblem

__all__ = [
    "KernelSHAP",
    "LIME",
    "shapley_kernel_weights",
    "constrained_wls",
    "lime_kernel_weights",
    "weighted_ridge",
    "all_coalitions",
]


def _score_coalitions(problem: AttributionProblem, groups: list[list[int]], Z: torch.Tensor, baseline: Any
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(f(x) [R], f(∅) [R], f(z_k) [K, R])`` in float64, every sequence in one batched call."""
    rep = removal_id(problem, baseline)
    ids = problem.ids.tolist()
    all_pos = {i for g in groups for i in g}
    seqs = [perturb(ids, set(), rep), perturb(ids, all_pos, rep)]
    for z in Z.tolist():
        removed = {i for g, keep in zip(groups, z, strict=True) if not keep for i in g}
        seqs.append(perturb(ids, removed, rep))
    f = _score(problem, seqs).double()
    if not torch.isfinite(f).all():
        raise ValueError(
            f"some coalitions cannot be scored with baseline={baseline!r}: removing every feature before a target "
            "token leaves nothing to predict it from (the model's tokenizer adds no BOS). Use a replacement "
            "baseline (baseline='pad', 'mask' or a token id), or keep a first token out of the features"
        )
    return f[0], f[1], f[2:]


def _spread(problem: AttributionProblem, groups: list[list[int]], phi: torch.Tensor, full: torch.Tensor,
            **out: Any) -> MethodOutput:
    """Group values ``phi [R, G]`` split equally over each group's tokens, as a :class:`MethodOutput`."""
    R, L = problem.n_rows, len(problem.ids)
    scores = torch.zeros(R, L, dtype=torch.float64)
    players = torch.zeros(L, dtype=torch.bool)
    for gi, g in enumerate(groups):
        scores[:, g] = phi[:, gi : gi + 1] / len(g)
        players[g] = True
    ok = torch.isfinite(scores) & players[None, :]
    extra = {"groups": groups, **out.pop("extra", {})}
    return MethodOutput(torch.where(ok, scores, torch.zeros_like(scores)).float(), target_scores=full.float(),
                        valid=ok & problem.valid(), extra=extra, **out)


@register_method("kernel_shap", "kernelshap")
@dataclass
class KernelSHAP(AttributionMethod):
    """KernelSHAP (ATT-10; Lundberg & Lee, 2017): Shapley values from a Shapley-kernel weighted regression.

    ``φ = argmin_φ Σ_z π(z)·(f(z) − f(∅) − zᵀφ)²`` subject to ``Σ_g φ_g = f(x) − f(∅)``, with
    ``π(z) = (M − 1)/(C(M, |z|)·|z|·(M − |z|))``, solved per row in float64 (one design for all rows).
    Efficiency holds exactly for every row; with all ``2^M − 2`` coalitions (``n_samples ≥ 2^M − 2``) the
    values are the exact Shapley values.

    Args:
        n_samples: coalitions to evaluate (each one forward, all batched); when ``2^M − 2 ≤ n_samples`` every
            coalition is enumerated instead (exact).
        features: ``"tokens"`` (default), ``"words"``, ``"spans"`` or explicit position lists.
        baseline: how a feature is removed: ``"pad"`` (default), ``"mask"``, a token id (replace it) or
            ``"delete"`` (drop it; the empty coalition then needs a token before the first feature, e.g. a BOS).
        paired: antithetic sampling: each sampled coalition is scored with its complement.
        seed: sampling seed (no global RNG is touched).

    Examples:
        >>> import tokensmith as ts
        >>> from tokensmith.attribution import attribute
        >>> import tokensmith.attribution.surrogate  # registers kernel_shap and lime
        >>> r = attribute(ts.tiny("llama"), "The capital of France is", target=" Paris", method="kernel_shap",
        ...               baseline="pad")
        >>> r.extra["exact"], bool(abs(r.scores.sum() - (r.target_scores - r.baseline_scores).sum()) < 1e-4)
        (True, True)
    """

    n_samples: int = 256
    features: Any = "tokens"
    baseline: Any = "pad"
    paired: bool = True
    seed: int | None = 0
    requires = ("token_logprobs",)
    stochastic = True

    def attribute_batch(self, problem: AttributionProblem) -> MethodOutput:
        if self.n_samples < 1:
            raise ValueError("n_samples must be >= 1")
        groups = coalition_players(problem, self.features)
        M = len(groups)
        exact = M < 2 or (2**M - 2) <= self.n_samples
        if exact:
            Z = all_coalitions(M)
            w = shapley_kernel_weights(Z)
        else:
            gen = torch.Generator().manual_seed(0 if self.seed is None else self.seed)
            Z = _kernel_samples(M, self.n_samples, self.paired, gen)
            w = torch.ones(len(Z), dtype=torch.float64)
        full, empty, fz = _score_coalitions(problem, groups, Z, self.baseline)
        total = full - empty
        if len(Z) == 0:  # one player: it gets everything
            phi = total[:, None].clone()
        else:
            phi = constrained_wls(Z.double(), (fz - empty).double(), w, total).T
        return _spread(problem, groups, phi, full, baseline_scores=empty.float(),
                       extra={"n_coalitions": int(len(Z)), "exact": bool(exact)})


@register_method("lime")
@dataclass
class LIME(AttributionMethod):
    """LIME (ATT-10; Ribeiro et al., 2016): a locally weighted linear surrogate; its coefficients are the scores.

    ``(b, φ) = argmin Σ_z π(z)·(f(z) − b − zᵀφ)² + α‖φ‖²`` with ``π(z) = exp(−D(z)²/σ²)`` and
    ``D(z) = 1 − √(|z|/M)``, the cosine distance between the coalition and the full input (``D = 1`` for the
    empty coalition). Samples: the full input, then coalitions with a number of removed features drawn
    uniformly from ``1..M−1`` and which ones uniformly (LIME's text sampler).

    Args:
        n_samples: coalitions including the full input (each one forward, all batched).
        kernel_width: ``σ`` of the exponential kernel on the cosine distance (LIME's text default, 25 on the
            distance ×100, is 0.25 here).
        alpha: ridge penalty on the coefficients (LIME's reference implementation uses 1.0); the intercept is
            not penalised.
        features: as for :class:`KernelSHAP`.
        baseline: as for :class:`KernelSHAP`.
        seed: sampling seed.

    Examples:
        >>> import tokensmith as ts
        >>> from tokensmith.attribution import attribute
        >>> import tokensmith.attribution.surrogate
        >>> r = attribute(ts.tiny("llama"), "The capital of France is", target=" Paris", method="lime",
        ...               n_samples=32, baseline="pad")
        >>> len(r.extra["intercept"]) == r.shape[0]
        True
    """

    n_samples: int = 256
    kernel_width: float = 0.25
    alpha: float = 1.0
    features: Any = "tokens"
    baseline: Any = "pad"
    seed: int | None = 0
    requires = ("token_logprobs",)
    stochastic = True

    def attribute_batch(self, problem: AttributionProblem) -> MethodOutput:
        if self.n_samples < 2:
            raise ValueError("n_samples must be >= 2 (the full input and at least one perturbation)")
        if not self.kernel_width > 0:
            raise ValueError("kernel_width must be > 0")
        if self.alpha < 0:
            raise ValueError("alpha must be >= 0")
        groups = coalition_players(problem, self.features)
        M = len(groups)
        gen = torch.Generator().manual_seed(0 if self.seed is None else self.seed)
        Z = _lime_samples(M, self.n_samples, gen)
        full, empty, fz = _score_coalitions(problem, groups, Z, self.baseline)
        w = lime_kernel_weights(Z, self.kernel_width)
        coef, intercept = weighted_ridge(Z.double(), fz, w, self.alpha)
        return _spread(problem, groups, coef.T, full, baseline_scores=empty.float(),
                       extra={"intercept": intercept.tolist(), "n_coalitions": int(len(Z))})


# ------------------------------------------------------------------------------------------------ samplers
def all_coalitions(M: int) -> torch.Tensor:
    """Every coalition but the empty and the full one: ``[2^M − 2, M]`` in {0, 1} (float64).

    Examples:
        >>> all_coalitions(2).tolist()
        [[1.0, 0.0], [0.0, 1.0]]
    """
    if M > 24:
        raise ValueError(f"enumerating 2^{M} coalitions is too many; sample them (n_samples < 2^M - 2)")
    if M < 2:
        return torch.zeros(0, max(M, 0), dtype=torch.float64)
    codes = torch.arange(1, 2**M - 1)
    return ((codes[:, None] >> torch.arange(M)[None, :]) & 1).double()


def _kernel_samples(M: int, n: int, paired: bool, gen: torch.Generator) -> torch.Tensor:
    """``n`` coalitions drawn from the Shapley kernel: size ``s ∝ (M−1)/(s(M−s))``, then a uniform subset."""
    sizes = torch.arange(1, M, dtype=torch.float64)
    q = (M - 1) / (sizes * (M - sizes))
    draws = (n + 1) // 2 if paired else n
    s = torch.multinomial(q / q.sum(), draws, replacement=True, generator=gen) + 1
    Z = torch.zeros(draws, M, dtype=torch.float64)
    for k, sk in enumerate(s.tolist()):
        Z[k, torch.randperm(M, generator=gen)[:sk]] = 1.0
    if paired:
        Z = torch.stack([Z, 1 - Z], 1).reshape(-1, M)[:n]
    return Z


def _lime_samples(M: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """The full input, then ``n − 1`` coalitions removing a uniform number ``1..M−1`` of features (all
    removed when ``M = 1``)."""
    Z = torch.ones(n, M, dtype=torch.float64)
    for k in range(1, n):
        r = int(torch.randint(1, M, (1,), generator=gen)) if M > 1 else 1
        Z[k, torch.randperm(M, generator=gen)[:r]] = 0.0
    return Z


# ------------------------------------------------------------------------------------------------ solvers
def shapley_kernel_weights(Z: torch.Tensor) -> torch.Tensor:
    """The Shapley kernel ``π(z) = (M − 1)/(C(M, |z|)·|z|·(M − |z|))`` for coalitions ``Z [K, M]`` with
    ``0 < |z| < M`` (float64).

    Examples:
        >>> shapley_kernel_weights(all_coalitions(3)).tolist()  # (3 - 1) / (3·1·2) for every size
        [0.3333333333333333, 0.3333333333333333, 0.3333333333333333, 0.3333333333333333, 0.3333333333333333, 0.3333333333333333]
    """
    M = Z.shape[1]
    s = Z.double().sum(1)
    if bool(((s <= 0) | (s >= M)).any()):
        raise ValueError("the Shapley kernel is infinite at the empty and the full coalition; leave them out "
                         "(constrained_wls enforces them exactly)")
    binom = torch.tensor([float(math.comb(M, int(k))) for k in s.tolist()], dtype=torch.float64)
    return (M - 1) / (binom * s * (M - s))


def constrained_wls(Z: torch.Tensor, y: torch.Tensor, w: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """``φ = argmin Σ_k w_k (y_k − z_kᵀφ)²`` subject to ``1ᵀφ = total``, for every column of ``y``.

    The constraint is eliminated exactly: ``φ = (total/M)·1 + N θ`` with ``N`` an orthonormal basis of
    ``{v : 1ᵀv = 0}``, and ``θ`` is the (minimum-norm) weighted least-squares solution, so ``Σφ = total``
    holds to float64 rounding even when the design is rank-deficient.

    Args:
        Z: ``[K, M]`` design (coalitions); y: ``[K]`` or ``[K, R]`` targets (``f(z) − f(∅)``);
        w: ``[K]`` non-negative weights; total: ``[]`` or ``[R]`` (``f(x) − f(∅)``).

    Returns:
        ``[M]`` or ``[M, R]`` float64.

    Examples:
        >>> Z = all_coalitions(2); y = torch.tensor([1.0, 2.0]).double()
        >>> [round(v, 9) for v in constrained_wls(Z, y, shapley_kernel_weights(Z), torch.tensor(3.0)).tolist()]
        [1.0, 2.0]
    """
    Z, w = Z.double(), w.double()
    vec = y.dim() == 1
    Y = (y[:, None] if vec else y).double()
    T = total.double().reshape(-1)
    if T.numel() == 1 and Y.shape[1] > 1:
        T = T.expand(Y.shape[1])
    K, M = Z.shape
    if (w < 0).any():
        raise ValueError("weights must be non-negative")
    base = T[None, :] / M  # [1, R]
    if M == 1:
        phi = base.clone()
    else:
        q, _ = torch.linalg.qr(torch.cat([torch.ones(M, 1, dtype=torch.float64) / math.sqrt(M),
                                          torch.eye(M, dtype=torch.float64)[:, : M - 1]], 1))
        N = q[:, 1:]  # [M, M-1], orthonormal, orthogonal to 1
        sw = w.sqrt()[:, None]
        A = sw * (Z @ N)
        b = sw * (Y - Z.sum(1, keepdim=True) * base)
        theta = torch.linalg.lstsq(A, b, driver="gelsd").solution
        phi = base + N @ theta
    return phi[:, 0] if vec else phi


def lime_kernel_weights(Z: torch.Tensor, kernel_width: float) -> torch.Tensor:
    """``π(z) = exp(−D(z)²/σ²)`` with ``D(z) = 1 − √(|z|/M)`` (cosine distance to the all-ones input; 1 for
    the empty coalition).

    Examples:
        >>> lime_kernel_weights(torch.tensor([[1.0, 1.0], [0.0, 0.0]]), 1.0).tolist()
        [1.0, 0.36787944117144233]
    """
    M = Z.shape[1]
    d = 1 - torch.sqrt(Z.double().sum(1) / M)
    return torch.exp(-(d**2) / kernel_width**2)


def weighted_ridge(Z: torch.Tensor, y: torch.Tensor, w: torch.Tensor, alpha: float
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted ridge with an unpenalised intercept: ``argmin_{b,β} Σ_k w_k (y_k − b − z_kᵀβ)² + α‖β‖²``.

    Solved by weighted centring: ``β = (Z̃ᵀWZ̃ + αI)⁺ Z̃ᵀWỹ`` with ``Z̃ = Z − z̄``, ``ỹ = y − ȳ`` (``w``-weighted
    means), ``b = ȳ − z̄ᵀβ`` (pseudo-inverse via least squares when ``α = 0`` and the design is rank-deficient).

    Returns:
        ``(coef [M] or [M, R], intercept [] or [R])`` in float64.

    Examples:
        >>> Z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]]).double()
        >>> coef, b = weighted_ridge(Z, Z @ torch.tensor([2.0, -1.0]).double() + 0.5, torch.ones(4), 0.0)
        >>> [round(c, 9) for c in coef.tolist()], round(float(b), 9)
        ([2.0, -1.0], 0.5)
    """
    Z, w = Z.double(), w.double()
    vec = y.dim() == 1
    Y = (y[:, None] if vec else y).double()
    if (w < 0).any() or not float(w.sum()) > 0:
        raise ValueError("weights must be non-negative with a positive sum")
    ws = w / w.sum()
    zbar = ws @ Z  # [M]
    ybar = ws @ Y  # [R]
    Zc, Yc = Z - zbar, Y - ybar
    M = Z.shape[1]
    sw = w.sqrt()[:, None]
    A = torch.cat([sw * Zc, math.sqrt(alpha) * torch.eye(M, dtype=torch.float64)], 0)
    b = torch.cat([sw * Yc, torch.zeros(M, Y.shape[1], dtype=torch.float64)], 0)
    coef = torch.linalg.lstsq(A, b, driver="gelsd").solution
    intercept = ybar - zbar @ coef
    return (coef[:, 0], intercept[0]) if vec else (coef, intercept)
