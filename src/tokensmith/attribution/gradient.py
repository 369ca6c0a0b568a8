"""Gradient attributions: saliency, input × gradient, integrated gradients, SmoothGrad, layer IG.

All of them differentiate the row scores ``f_t`` (per-token log-probs from ``adapter.token_logprobs``
run from ``inputs_embeds``, or a contrast / callable) with respect to the source embeddings
``e_i = E[x_i]·scale``. A continuation of ``R`` tokens costs **one forward per evaluation point and R
backward passes** over that graph (``retain_graph``), never one full attribution per target token.
Non-source positions (chat template, special tokens) are held at their real embeddings everywhere,
including along the IG path.

Formulas (``g_t(e) = ∂f_t/∂e``, ``e′`` the baseline, ``⟨·,·⟩`` over the hidden dimension):

- saliency (ATT-1): ``s_ti = ‖g_t(e)_i‖₂``;
- input × gradient (ATT-1): ``s_ti = ⟨e_i, g_t(e)_i⟩``;
- integrated gradients (ATT-2; Sundararajan et al., 2017):
  ``a_ti = ⟨e_i − e′_i, ∫₀¹ g_t(e′ + α(e − e′))_i dα⟩`` by quadrature (Gauss-Legendre by default), with
  the completeness error ``δ_t = Σ_i a_ti − (f_t(e) − f_t(e′))`` reported per row;
- SmoothGrad (Smilkov et al., 2017): ``ĝ_t = (1/n) Σ_k g_t(e + ε_k)``, ``ε_k ~ N(0, σ²)`` on the sources,
  ``σ = noise_level · (max e − min e)``; reported as ``⟨e_i, ĝ_ti⟩`` (or ``‖ĝ_ti‖`` with
  ``multiply_by_inputs=False``);
- layer integrated gradients: IG on the activation ``h`` at a canonical hook name (``layers.{i}.resid_post``,
  ``layers.{i}.attn.out``, ...), from its value ``h′`` on the baseline input: ``a_ti = ⟨h_i − h′_i, ∫ ∂f_t/∂h(h′ + α(h − h′))_i dα⟩``.
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from tokensmith.attribution.base import AttributionMethod, MethodOutput, register_method
from tokensmith.attribution.progress import bar
from tokensmith.attribution.quadrature import quadrature
from tokensmith.attribution.targets import AttributionProblem
from tokensmith.models.hooks import rows_of

_log = logging.getLogger(__name__)
CPU_GRAD_TOKENS_PER_FORWARD = 768  # default chunk of path points on CPU (see _grad_loop)

__all__ = [
    "Saliency",
    "InputXGradient",
    "IntegratedGradients",
    "SmoothGrad",
    "LayerIntegratedGradients",
    "baseline_embeddings",
    "path_gradients",
    "point_contributions",
    "adaptive_ig",
]


def baseline_embeddings(problem: AttributionProblem, baseline: Any) -> torch.Tensor:
    """The baseline ``e′`` ``[L, d]`` at the sources (non-sources keep their real embedding).

    ``baseline``: ``"zero"``; ``"pad"`` (the pad token's embedding); ``"mask"`` (the tokenizer's mask or
    unk token); ``"mean"`` (the mean embedding row, scaled); an int token id; a ``[d]`` or ``[L, d]`` tensor.
    """
    ad = problem.adapter
    e = ad.embed(problem.ids[None])[0].detach()
    L, d = e.shape
    if isinstance(baseline, str):
        if baseline == "zero":
            b = torch.zeros_like(e)
        elif baseline == "pad":
            b = ad.embed(torch.full((1, L), ad.pad_token_id))[0].detach()
        elif baseline == "mask":
            tid = getattr(ad.tokenizer, "mask_token_id", None)
            tid = tid if tid is not None else getattr(ad.tokenizer, "unk_token_id", None)
            if tid is None:
                raise ValueError("baseline='mask' needs a tokenizer with a mask or unk token; use 'pad' or 'zero'")
            b = ad.embed(torch.full((1, L), int(tid)))[0].detach()
        elif baseline == "mean":
            b = (ad.E.detach().float().mean(0) * ad.structure.embed_scale).to(e).expand(L, d).clone()
        else:
            raise ValueError(f"unknown baseline {baseline!r}; use 'zero', 'pad', 'mask', 'mean', a token id or a tensor")
    elif isinstance(baseline, int) and not isinstance(baseline, bool):
        if not 0 <= baseline < ad.structure.vocab_size:
            raise ValueError(f"baseline token id {baseline} is outside the vocabulary")
        b = ad.embed(torch.full((1, L), baseline))[0].detach()
    elif isinstance(baseline, torch.Tensor):
        if not torch.isfinite(baseline).all():
            raise ValueError("the baseline tensor contains NaN or inf")
        if baseline.shape == (d,):
            b = baseline.to(e).expand(L, d).clone()
        elif baseline.shape == (L, d):
            b = baseline.to(e).clone()
        else:
            raise ValueError(f"a baseline tensor must be [d]={[d]} or [L, d]={[L, d]}, got {list(baseline.shape)}")
    else:
        raise TypeError(f"unsupported baseline type {type(baseline).__name__}")
    src = problem.sources.to(e.device)[:, None]
    return torch.where(src, b, e)


def _grad_loop(
    problem: AttributionProblem,
    points: torch.Tensor,
    chunk: int | None,
    score: Any,
    consume: Any,
) -> torch.Tensor:
    """Forward ``points`` in chunks, one backward per row per chunk; ``consume(s, t, g)`` receives the
    gradient ``g = ∂f_t/∂x`` of each row ``t`` at the chunk starting at ``s``. Returns the scores ``[K, R]``."""
    score = score or (lambda x: problem.score_embeds(x, grad=True))
    K = points.shape[0]
    if chunk is None:
        # on CPU a forward of ~700 tokens whose graph is kept for R backward passes stays in cache; 32 points x
        # 83 tokens at once ran 1.5x slower per point on SmolLM2 (measured). Elsewhere: all points at once.
        cpu = points.device.type == "cpu"
        chunk = max(1, CPU_GRAD_TOKENS_PER_FORWARD // max(1, points.shape[1])) if cpu else K
    F_all = []
    progress = bar(-(-K // chunk), desc="gradient points", unit="forward")
    for s in range(0, K, chunk):
        x = points[s : s + chunk].detach().clone().requires_grad_(True)
        F = score(x)
        R = F.shape[1]
        for t in range(R):
            (g,) = torch.autograd.grad(F[:, t].sum(), x, retain_graph=t < R - 1, allow_unused=True)
            if g is not None:
                consume(s, t, R, g)
        F_all.append(F.detach().float().cpu())
        progress.update(1)
    progress.close()
    return torch.cat(F_all, 0)


def path_gradients(
    problem: AttributionProblem,
    points: torch.Tensor,
    weights: torch.Tensor,
    chunk: int | None = None,
    score: Any = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``G[t] = Σ_k w_k ∂f_t/∂x (points[k])`` for every row ``t``: ``[R, L, d]`` (float64), and the row
    scores at the points ``[K, R]``.

    One forward per chunk of points, then one backward per row with the graph retained. ``score`` maps a
    ``[n, L, d]`` tensor (requiring grad) to ``[n, R]`` (default: ``problem.score_embeds``).
    """
    acc: dict[str, torch.Tensor] = {}

    def consume(s: int, t: int, R: int, g: torch.Tensor) -> None:
        if "G" not in acc:
            acc["G"] = torch.zeros(R, *points.shape[1:], dtype=torch.float64, device=points.device)
        w = weights[s : s + g.shape[0]].to(g.device, torch.float64)
        acc["G"][t] += (g.double() * w[:, None, None]).sum(0)

    F = _grad_loop(problem, points, chunk, score, consume)
    if "G" not in acc:  # no row depends on the points
        acc["G"] = torch.zeros(F.shape[1], *points.shape[1:], dtype=torch.float64, device=points.device)
    return acc["G"], F


def point_contributions(
    problem: AttributionProblem,
    points: torch.Tensor,
    weights: torch.Tensor,
    direction: torch.Tensor,
    chunk: int | None = None,
    score: Any = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``C[k, t, i] = w_k ⟨∂f_t/∂x(points[k])_i, direction_i⟩`` ``[K, R, L]`` (float64) and the scores
    ``[K, R]`` — per-point IG terms, so that any subset of the points can be summed afterwards."""
    K = points.shape[0]
    acc: dict[str, torch.Tensor] = {}
    dirn = direction.to(points.device, torch.float64)

    def consume(s: int, t: int, R: int, g: torch.Tensor) -> None:
        if "C" not in acc:
            acc["C"] = torch.zeros(K, R, points.shape[1], dtype=torch.float64)
        w = weights[s : s + g.shape[0]].to(g.device, torch.float64)
        acc["C"][s : s + g.shape[0], t] = ((g.double() * dirn[None]).sum(-1) * w[:, None]).cpu()

    F = _grad_loop(problem, points, chunk, score, consume)
    if "C" not in acc:
        acc["C"] = torch.zeros(K, F.shape[1], points.shape[1], dtype=torch.float64)
    return acc["C"], F


def adaptive_ig(
    problem: AttributionProblem,
    e: torch.Tensor,
    b: torch.Tensor,
    *,
    tol: float = 0.01,
    max_points: int = 256,
    nodes: int = 4,
    chunk: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Integrated gradients by adaptive composite Gauss-Legendre quadrature driven by completeness.

    The path ``[0, 1]`` is cut into intervals ``I = [α₀, α₁]``, each integrated with ``nodes``-point
    Gauss-Legendre. Completeness holds *per interval*: ``Σ_i a^I_ti = f_t(α₁) − f_t(α₀)`` for the exact
    integral, and ``f`` at the interval ends costs one forward, so the residual
    ``r^I_t = Σ_i a^I_ti − (f_t(α₁) − f_t(α₀))`` is a computable local error. Intervals whose residual is
    within a factor 2 of the worst are bisected until ``max_t |Σ_I r^I_t| / |f_t(1) − f_t(0)| ≤ tol`` or
    ``max_points`` gradient points are spent (a warning says so). The integrand of a transformer along the
    straight IG path is smooth except near a few ``α`` (where a softmax or a norm changes regime): uniform
    rules spend most points where nothing happens; this one spends them where the residual is.

    Returns ``(scores [R, L], f(1) [R], f(0) [R], info)`` with ``info`` holding the intervals, points used,
    rounds, the final relative error and the per-round trail (points, error, seconds).
    """
    if nodes < 1 or max_points < nodes:
        raise ValueError("adaptive IG needs nodes >= 1 and n_steps (the point budget) >= nodes")
    x, w = quadrature(nodes, "gausslegendre")
    diff = (e - b)
    fcache: dict[float, torch.Tensor] = {}

    def f_at(alphas: list[float]) -> None:
        new = sorted({a for a in alphas if a not in fcache})
        if new:
            pts = torch.stack([b + a * diff for a in new])
            with torch.no_grad():
                vals = problem.score_embeds(pts).double().cpu()
            for a, v in zip(new, vals, strict=True):
                fcache[a] = v

    contrib: dict[tuple[float, float], torch.Tensor] = {}

    def integrate(intervals: list[tuple[float, float]]) -> None:
        todo = [iv for iv in intervals if iv not in contrib]
        if not todo:
            return
        al = torch.cat([a0 + (a1 - a0) * x for a0, a1 in todo])
        wt = torch.cat([(a1 - a0) * w for a0, a1 in todo])
        pts = b[None] + al.to(e.device, e.dtype)[:, None, None] * diff[None]
        C, _ = point_contributions(problem, pts, wt, diff, chunk)
        for j, iv in enumerate(todo):
            contrib[iv] = C[j * nodes : (j + 1) * nodes].sum(0)

    n0 = max(1, min(4, max_points // nodes))
    intervals = [(i / n0, (i + 1) / n0) for i in range(n0)]
    used, rounds = 0, 0
    trail: list[dict[str, float]] = []
    t_start = time.perf_counter()
    while True:
        f_at([a for iv in intervals for a in iv])
        before = len(contrib)
        integrate(intervals)
        used += (len(contrib) - before) * nodes
        rounds += 1
        full, base = fcache[1.0], fcache[0.0]
        span = (full - base).abs().clamp_min(1e-12)
        res = torch.stack([contrib[iv].sum(-1) - (fcache[iv[1]] - fcache[iv[0]]) for iv in intervals])  # [I, R]
        rel = ((res.sum(0)).abs() / span).max().item()
        trail.append({"points": used, "intervals": len(intervals), "max_relative_delta": rel,
                      "seconds": time.perf_counter() - t_start})
        _log.debug("adaptive IG round %d: %d intervals, %d points, max relative error %.3g", rounds, len(intervals),
                   used, rel)
        if rel <= tol:
            break
        err = (res.abs() / span[None]).max(1).values
        worst = float(err.max())
        split = [iv for iv, er in zip(intervals, err.tolist(), strict=True) if er >= worst / 2]
        if used + 2 * nodes * len(split) > max_points:
            room = (max_points - used) // (2 * nodes)
            split = sorted(split, key=lambda iv: -float(err[intervals.index(iv)]))[:room]
            if not split:
                warnings.warn(
                    f"adaptive IG used its budget of {max_points} points with relative completeness error "
                    f"{rel:.2%} > tol={tol:.2%}; raise n_steps (the point budget) or use another baseline",
                    stacklevel=4,
                )
                break
        nxt = []
        for iv in intervals:
            if iv in split:
                mid = (iv[0] + iv[1]) / 2
                nxt += [(iv[0], mid), (mid, iv[1])]
            else:
                nxt.append(iv)
        intervals = nxt
    scores = torch.stack([contrib[iv] for iv in intervals]).sum(0)
    info = {"intervals": [list(iv) for iv in intervals], "points": used, "rounds": rounds,
            "max_relative_delta": rel, "tol": tol, "trail": trail}
    return scores, fcache[1.0], fcache[0.0], info


def _clean(problem: AttributionProblem) -> torch.Tensor:
    return problem.adapter.embed(problem.ids[None])[0].detach()


def _warn_if_degenerate(problem: AttributionProblem, e: torch.Tensor, b: torch.Tensor) -> None:
    """Warn when the baseline is (almost) zero at the sources: a model that normalises the embeddings
    first (pre-LN / RMSNorm) sees ``norm(α·e) = norm(e)`` for every α > 0, so ``f`` jumps at α ≈ 0 and no
    quadrature meets completeness. (Embedding rows of the pad token are zero in many initialisations.)"""
    src = problem.sources.to(e.device)
    if not bool(src.any()):
        return
    ratio = (b[src].float().norm(dim=-1) / e[src].float().norm(dim=-1).clamp_min(1e-30)).max().item()
    if ratio < 0.05:
        warnings.warn(
            "the IG baseline is (almost) zero at the sources; on models that normalise the embeddings first the "
            "integrand then jumps at alpha≈0 and completeness fails. Use a non-zero baseline (a token id, or "
            "'mean' on a trained model) and check result.relative_delta()",
            stacklevel=3,
        )


@register_method("saliency")
@dataclass
class Saliency(AttributionMethod):
    """Gradient saliency (ATT-1): ``s_ti = ‖∂f_t/∂e_i‖₂`` — magnitude only, always ≥ 0."""

    def attribute_batch(self, problem: AttributionProblem) -> MethodOutput:
        e = _clean(problem)
        G, F = path_gradients(problem, e[None], torch.ones(1))
        return MethodOutput(G.norm(dim=-1).float().cpu(), target_scores=F[0])


@register_method("input_x_gradient", "grad_x_input")
@dataclass
class InputXGradient(AttributionMethod):
    """Input × gradient (ATT-1): ``s_ti = Σ_d e_id · ∂f_t/∂e_id`` (first-order Taylor term of ``f`` at 0)."""

    def attribute_batch(self, problem: AttributionProblem) -> MethodOutput:
        e = _clean(problem)
        G, F = path_gradients(problem, e[None], torch.ones(1))
        return MethodOutput((G * e.double()[None]).sum(-1).float().cpu(), target_scores=F[0])


@register_method("integrated_gradients", "ig")
@dataclass
class IntegratedGradients(AttributionMethod):
    """Integrated gradients (ATT-2): ``a_ti = ⟨e_i − e′_i, Σ_k w_k ∂f_t/∂e (e′ + α_k(e − e′))_i⟩``.

    Args:
        n_steps: quadrature points (with ``rule="adaptive"``: the budget of gradient points).
        rule: ``"gausslegendre"`` (default), a Riemann rule (:mod:`tokensmith.attribution.quadrature`), or
            ``"adaptive"``: composite Gauss-Legendre refined where the per-interval completeness residual is
            largest, until the relative completeness error is ``<= tol`` on every row (:func:`adaptive_ig`).
        baseline: see :func:`baseline_embeddings` (default ``"pad"``).
        internal_batch_size: points per forward (default: all; on CPU about 768 tokens per forward).
        tol: the target relative completeness error of ``rule="adaptive"``.
    """

    n_steps: int = 32
    rule: str = "gausslegendre"
    baseline: Any = "pad"
    internal_batch_size: int | None = None
    tol: float = 0.01

    def attribute_batch(self, problem: AttributionProblem) -> MethodOutput:
        e = _clean(problem)
        b = baseline_embeddings(problem, self.baseline)
        _warn_if_degenerate(problem, e, b)
        if self.rule == "adaptive":
            sc, f1, f0, info = adaptive_ig(problem, e, b, tol=self.tol, max_points=self.n_steps,
                                           chunk=self.internal_batch_size)
            delta = sc.sum(-1) - (f1 - f0)
            return MethodOutput(sc.float(), target_scores=f1.float(), baseline_scores=f0.float(),
                                delta=delta.float(), extra={"adaptive": info})
        alpha, w = quadrature(self.n_steps, self.rule)
        a = alpha.to(e.device, e.dtype)[:, None, None]
        points = b[None] + a * (e - b)[None]
        G, _ = path_gradients(problem, points, w, self.internal_batch_size)
        scores = (G * (e - b).double()[None]).sum(-1)
        with torch.no_grad():
            f = problem.score_embeds(torch.stack([e, b])).double().cpu()
        delta = scores.sum(-1).cpu() - (f[0] - f[1])
        return MethodOutput(scores.float().cpu(), target_scores=f[0].float(), baseline_scores=f[1].float(),
                            delta=delta.float())


@register_method("smoothgrad")
@dataclass
class SmoothGrad(AttributionMethod):
    """SmoothGrad: gradients averaged over ``n_samples`` noisy copies of the source embeddings.

    Args:
        n_samples: noisy copies.
        noise_level: ``σ / (max e − min e)`` (Smilkov et al. suggest 0.1-0.2).
        multiply_by_inputs: report ``⟨e_i, ĝ_ti⟩`` (default) or ``‖ĝ_ti‖``.
        seed: the noise seed (no global RNG is touched).
        internal_batch_size: noisy copies per forward (default: all; on CPU about 768 tokens per forward).
    """

    n_samples: int = 16
    noise_level: float = 0.1
    multiply_by_inputs: bool = True
    seed: int | None = 0
    internal_batch_size: int | None = None
    stochastic = True

    def attribute_batch(self, problem: AttributionProblem) -> MethodOutput:
        if self.n_samples < 1:
            raise ValueError("n_samples must be >= 1")
        e = _clean(problem)
        src = problem.sources.to(e.device)
        sigma = self.noise_level * float(e[src].max() - e[src].min()) if bool(src.any()) else 0.0
        g = torch.Generator().manual_seed(0 if self.seed is None else self.seed)
        noise = torch.randn((self.n_samples, *e.shape), generator=g).to(e) * sigma
        points = e[None] + noise * src[None, :, None]
        G, F = path_gradients(problem, points, torch.full((self.n_samples,), 1.0 / self.n_samples),
                              self.internal_batch_size)
        s = (G * e.double()[None]).sum(-1) if self.multiply_by_inputs else G.norm(dim=-1)
        return MethodOutput(s.float().cpu(), extra={"sigma": sigma})


@register_method("layer_integrated_gradients", "layer_ig")
@dataclass
class LayerIntegratedGradients(AttributionMethod):
    """Integrated gradients on the activation at a hook point, per position.

    The path runs from ``h′``, the activation on the *baseline input* (the sources' embeddings replaced by
    ``baseline``, as for :class:`IntegratedGradients`), to ``h``, the activation on the input:
    ``a_ti = ⟨h_i − h′_i, ∫₀¹ ∂f_t/∂h(h′ + α(h − h′))_i dα⟩``, and completeness holds against
    ``f_t(x) − f_t(x′)``. (A zero activation is not a usable baseline in pre-norm transformers: the next
    layer's norm makes ``f`` constant along ``α·h`` except for a jump at 0.) Non-source positions keep their
    input activation.

    Args:
        layer: a canonical hook name, e.g. ``"layers.3.resid_post"`` or ``"layers.0.attn.out"``.
        baseline: the baseline input (see :func:`baseline_embeddings`).
        n_steps: quadrature points (as for :class:`IntegratedGradients`).
        rule: the quadrature rule.
        internal_batch_size: points per forward (default: all; on CPU about 768 tokens per forward).
    """

    layer: str = "layers.0.resid_post"
    baseline: Any = "pad"
    n_steps: int = 32
    rule: str = "gausslegendre"
    internal_batch_size: int | None = None
    targets = ("tokens", "callable")

    def attribute_batch(self, problem: AttributionProblem) -> MethodOutput:
        ad = problem.adapter
        if self.layer not in ad.hook_names():
            raise ValueError(f"unknown hook name {self.layer!r}; see adapter.hook_names()")
        e = _clean(problem)
        b = baseline_embeddings(problem, self.baseline)
        with torch.no_grad(), ad.hooks(cache=self.layer) as h:
            f_ends = problem.score_embeds(torch.stack([e, b])).double().cpu()
        acts = h.cache[self.layer].detach()
        if acts.dim() != 3 or acts.shape[1] != e.shape[0]:
            raise ValueError(f"layer IG needs a per-position activation [L, d]; {self.layer!r} has {list(acts.shape[1:])}")
        act, base = acts[0], acts[1]
        src = problem.sources.to(act.device)[:, None]
        base = torch.where(src, base, act)
        alpha, w = quadrature(self.n_steps, self.rule)
        points = base[None] + alpha.to(act)[:, None, None] * (act - base)[None]

        def score(x: torch.Tensor, grad: bool = True) -> torch.Tensor:
            def put(t: torch.Tensor, ctx: Any) -> torch.Tensor:
                return rows_of(x, ctx, t).to(t.dtype)

            with ad.hooks(edit={self.layer: put}):
                return problem.score_embeds(e[None].expand(x.shape[0], -1, -1), grad=grad)

        G, _ = path_gradients(problem, points, w, self.internal_batch_size, score=score)
        scores = (G * (act - base).double()[None]).sum(-1)
        f_clean = f_ends[0]
        f_base = score(base[None], grad=False).double().cpu()[0]
        delta = scores.sum(-1).cpu() - (f_clean - f_base)
        return MethodOutput(scores.float().cpu(), target_scores=f_clean.float(), baseline_scores=f_base.float(),
                            delta=delta.float(), extra={"layer": self.layer})
