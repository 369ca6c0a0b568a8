"""Integrated Jacobians: token-pair attributions for the similarity of two texts under a sentence encoder.

Implements ATT-12 (Moeller, Nikolaev & Padó, 2023, *An Attribution Method for Siamese Encoders*). A
siamese encoder embeds each text on its own, ``f(a) = pool(encoder(a))`` (the adapter's pooling: mean over
the real tokens for MiniLM; L2-normalised for the cosine score), and compares the two:

    s(a, b) = f(a)ᵀ f(b)

For token embeddings ``a = (a_1 … a_Ta)``, a reference ``r_a`` and the path ``x(κ) = r_a + κ(a − r_a)``, the
integrated Jacobian ``J_a = ∫₀¹ ∂f/∂x (x(κ)) dκ`` (a ``[D × Ta·d]`` matrix, ``J_{a,i}`` its block for token
``i``) satisfies ``J_a (a − r_a) = f(a) − f(r_a)`` exactly (fundamental theorem of calculus along the path).
Writing ``u_i = J_{a,i}(a_i − r_{a,i}) ∈ R^D`` (token ``i``'s share of the embedding change) and likewise
``v_j`` for ``b``, the pair attribution is

    A_ij = (a_i − r_{a,i})ᵀ J_{a,i}ᵀ J_{b,j} (b_j − r_{b,j}) = u_iᵀ v_j

and, because ``s`` is bilinear in ``(f(a), f(b))``,

    Σ_ij A_ij = (Σ_i u_i)ᵀ (Σ_j v_j) = (f(a) − f(r_a))ᵀ (f(b) − f(r_b))
              = s(a, b) − s(r_a, b) − s(a, r_b) + s(r_a, r_b).

That is the completeness identity; the three reference terms are reported, and ``delta`` is the quadrature
error ``Σ A − (s − s(r_a,b) − s(a,r_b) + s(r_a,r_b))``. It holds for the dot score of unnormalised
embeddings and for the cosine score (``f`` normalised) alike: normalisation is part of ``f``. On an
off-the-shelf encoder the reference terms do not vanish (MiniLM, pad references: ``s(r_a, r_b) ≈ 0.995``),
so ``Σ A`` explains the similarity of the *reference-shifted* embeddings, not ``s(a, b)`` itself. The paper
makes them vanish by shifting the embeddings, ``f̃(x) = f(x) − f(r)``, with a dot-product score (and
fine-tuning the encoder that way); ``shift=True`` reports that score, ``s̃(a, b) = Σ A`` (same ``A``).

Computation. ``J`` is never materialised: ``u_i = Σ_k w_k J(x(κ_k)) Δ⁽ⁱ⁾`` (``Δ⁽ⁱ⁾`` = ``a − r_a`` on
token ``i``, zero elsewhere) is a Jacobian-vector product, so one forward-mode pass per (token, quadrature
node) gives it — ``Ta·K`` batched JVP rows instead of ``D·K`` VJPs (D = 384 for MiniLM, Ta ≈ 10-30).
Rows are processed ``batch_size`` at a time, so memory is that of a forward over ``batch_size`` sequences.
Attention runs on PyTorch's math SDPA kernel inside the JVP (the fused CPU kernel has no forward-mode
derivative). ``mode="reverse"`` computes the same ``u_i`` with one backward per output dimension.

Special tokens ([CLS], [SEP]) are held at their real embeddings on both the input and the reference
(``include_special=False``, like the sources of :func:`~tokensmith.attribution.attribute`); their rows and
columns are then zero and flagged in ``special_a`` / ``special_b``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from tokensmith.attribution.quadrature import quadrature
from tokensmith.models import Encoded

if TYPE_CHECKING:  # pragma: no cover
    from tokensmith.models.adapter import ModelAdapter

__all__ = ["PairAttribution", "integrated_jacobians", "integrated_jacobians_pairwise", "integrated_contributions", "encoder_function"]

SCORES = ("cosine", "dot")


@dataclass
class PairAttribution:
    """Token-pair attributions ``A [Ta × Tb]`` of the similarity ``s(a, b)`` (see the module docstring).

    Attributes:
        tokens_a, tokens_b: token strings of the two texts (special tokens included, flagged).
        ids_a, ids_b: their ids.
        matrix: ``[Ta, Tb]`` ``A_ij = u_iᵀ v_j``.
        score: ``s(a, b)``.
        score_ref_a: ``s(r_a, b)``; ``score_ref_b``: ``s(a, r_b)``; ``score_ref_ab``: ``s(r_a, r_b)``.
        delta: ``Σ_ij A_ij − (s − s(r_a,b) − s(a,r_b) + s(r_a,r_b))`` (quadrature error).
        contrib_a, contrib_b: ``[Ta, D]`` per-token vectors ``u_i`` / ``v_j`` with
            ``Σ_i u_i ≈ f(a) − f(r_a)``.
        delta_a, delta_b: ``‖Σ_i u_i − (f(a) − f(r_a))‖₂`` (per side).
        special_a, special_b: the tokenizer's special tokens ([CLS], [SEP]).
        moved_a, moved_b: the tokens moved along the path (the others are held at their real embeddings and
            have zero rows / columns).
        score_kind: ``"cosine"`` or ``"dot"``.
        config: the settings.
    """

    tokens_a: list[str]
    tokens_b: list[str]
    ids_a: torch.Tensor
    ids_b: torch.Tensor
    matrix: torch.Tensor
    score: float
    score_ref_a: float
    score_ref_b: float
    score_ref_ab: float
    delta: float
    contrib_a: torch.Tensor
    contrib_b: torch.Tensor
    delta_a: float
    delta_b: float
    special_a: torch.Tensor
    special_b: torch.Tensor
    moved_a: torch.Tensor
    moved_b: torch.Tensor
    score_kind: str = "cosine"
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.matrix.shape)  # type: ignore[return-value]

    @property
    def reference_terms(self) -> dict[str, float]:
        """``{"s(a,b)", "s(r_a,b)", "s(a,r_b)", "s(r_a,r_b)"}``."""
        return {"s(a,b)": self.score, "s(r_a,b)": self.score_ref_a, "s(a,r_b)": self.score_ref_b,
                "s(r_a,r_b)": self.score_ref_ab}

    @property
    def expected_sum(self) -> float:
        """What ``Σ A`` equals exactly: ``s(a,b) − s(r_a,b) − s(a,r_b) + s(r_a,r_b)``."""
        return self.score - self.score_ref_a - self.score_ref_b + self.score_ref_ab

    @property
    def relative_delta(self) -> float:
        """``|delta| / |expected_sum|``."""
        return abs(self.delta) / max(abs(self.expected_sum), 1e-30)

    def top(self, k: int = 5, by: str = "abs") -> list[tuple[str, str, float, int, int]]:
        """The ``k`` largest pairs as ``(token_a, token_b, value, i, j)``, by ``|A_ij|`` (``by="abs"``) or by
        value (``"value"``: most positive first; ``"negative"``: most negative first)."""
        m = self.matrix.flatten().double()
        key = {"abs": m.abs(), "value": m, "negative": -m}.get(by)
        if key is None:
            raise ValueError(f"by must be 'abs', 'value' or 'negative', got {by!r}")
        idx = torch.argsort(key, descending=True)[: max(0, int(k))].tolist()
        Tb = self.matrix.shape[1]
        return [(self.tokens_a[n // Tb], self.tokens_b[n % Tb], float(m[n]), n // Tb, n % Tb) for n in idx]

    def to_pandas(self) -> Any:
        """Tidy DataFrame: one row per token pair (``i, token_a, special_a, j, token_b, special_b, value``)."""
        import pandas as pd

        rows = []
        for i, ta in enumerate(self.tokens_a):
            for j, tb in enumerate(self.tokens_b):
                rows.append({"i": i, "token_a": ta, "special_a": bool(self.special_a[i]), "j": j, "token_b": tb,
                             "special_b": bool(self.special_b[j]), "value": float(self.matrix[i, j])})
        return pd.DataFrame(rows)

    def plot(self, ax: Any = None, *, cmap: str = "RdBu_r", include_special: bool = False) -> Any:
        """Heatmap of ``A`` (rows: tokens of ``a``, columns: tokens of ``b``); matplotlib is optional
        (``tokensmith[viz]``)."""
        try:
            import matplotlib.pyplot as plt
        except ImportError as e:  # pragma: no cover - viz extra
            raise ImportError("plot() needs matplotlib: pip install 'tokensmith[viz]'") from e
        ra = [i for i in range(len(self.tokens_a)) if include_special or not bool(self.special_a[i])]
        cb = [j for j in range(len(self.tokens_b)) if include_special or not bool(self.special_b[j])]
        m = self.matrix[ra][:, cb].numpy()
        if ax is None:
            _, ax = plt.subplots(figsize=(max(4, 0.4 * len(cb) + 1.5), max(3, 0.4 * len(ra) + 1)))
        v = float(abs(m).max()) if m.size else 1.0
        im = ax.imshow(m, cmap=cmap, vmin=-(v or 1.0), vmax=v or 1.0, aspect="auto")
        ax.set_xticks(range(len(cb)), [self.tokens_b[j] for j in cb], rotation=90, fontsize=8)
        ax.set_yticks(range(len(ra)), [self.tokens_a[i] for i in ra], fontsize=8)
        ax.set_title(f"integrated Jacobians: {self.score_kind} {self.score:.3f} (Σ = {float(self.matrix.sum()):.3f})")
        ax.figure.colorbar(im, ax=ax, fraction=0.03)
        return ax

    def __repr__(self) -> str:
        return (f"PairAttribution({self.shape[0]}×{self.shape[1]}, {self.score_kind}={self.score:.4f}, "
                f"sum={float(self.matrix.sum()):.4f}, expected={self.expected_sum:.4f}, delta={self.delta:.2e})")


# ---------------------------------------------------------------------------------------------- pure part
def integrated_contributions(
    f: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    r: torch.Tensor,
    move: torch.Tensor | None = None,
    *,
    n_steps: int = 32,
    rule: str = "gausslegendre",
    batch_size: int | None = None,
    mode: str = "forward",
) -> torch.Tensor:
    """Per-token integrated-Jacobian contributions ``U [T, D]`` (float64) of ``f`` from ``r`` to ``x``.

    ``U_i = Σ_k w_k ∂f/∂x(r + α_k(x − r)) · Δ⁽ⁱ⁾`` with ``Δ⁽ⁱ⁾`` equal to ``x − r`` on token ``i`` and zero
    elsewhere (``α, w`` from :func:`~tokensmith.attribution.quadrature.quadrature`), so
    ``Σ_i U_i ≈ f(x) − f(r)``. Tokens outside ``move`` get ``U_i = 0`` (pass ``r_i = x_i`` there).

    Args:
        f: maps ``[N, T, d]`` to ``[N, D]`` (differentiable).
        x: ``[T, d]`` input.
        r: ``[T, d]`` reference.
        move: ``[T]`` bool, tokens to attribute (default: all).
        n_steps: quadrature nodes.
        rule: the quadrature rule.
        batch_size: sequences per forward (default 64).
        mode: ``"forward"`` (one JVP row per token and node) or ``"reverse"`` (one backward per output dim).

    Examples:
        >>> import torch
        >>> W = torch.randn(3, 4 * 2, dtype=torch.float64)
        >>> f = lambda z: z.flatten(1) @ W.T                       # linear: U_i = W_i (x_i - r_i) exactly
        >>> x, r = torch.randn(4, 2, dtype=torch.float64), torch.zeros(4, 2, dtype=torch.float64)
        >>> U = integrated_contributions(f, x, r, n_steps=1)
        >>> torch.allclose(U.sum(0), f(x[None])[0] - f(r[None])[0])
        True
    """
    if x.shape != r.shape or x.dim() != 2:
        raise ValueError(f"x and r must both be [T, d], got {list(x.shape)} and {list(r.shape)}")
    if not torch.isfinite(r).all():
        raise ValueError("the reference (baseline) contains NaN or inf")
    T = x.shape[0]
    move = torch.ones(T, dtype=torch.bool) if move is None else move.to(torch.bool).cpu()
    alpha, w = quadrature(n_steps, rule)
    diff = (x - r).detach()
    points = r.detach()[None] + alpha.to(x.device, x.dtype)[:, None, None] * diff[None]  # [K, T, d]
    bs = batch_size or 64
    if bs < 1:
        raise ValueError("batch_size must be >= 1")
    toks = torch.nonzero(move).flatten()
    if mode == "forward":
        return _forward_mode(f, points, diff, w, toks, bs)
    if mode == "reverse":
        return _reverse_mode(f, points, diff, w, toks, bs)
    raise ValueError(f"mode must be 'forward' or 'reverse', got {mode!r}")


def _math_attention() -> Any:
    """PyTorch's math SDPA kernel: composed of primitive ops, so it has forward-mode derivatives."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


def _forward_mode(f: Callable, points: torch.Tensor, diff: torch.Tensor, w: torch.Tensor, toks: torch.Tensor,
                  bs: int) -> torch.Tensor:
    import torch.autograd.forward_ad as fwAD

    K, T, _ = points.shape
    pairs_i = toks.repeat_interleave(K)
    pairs_k = torch.arange(K).repeat(len(toks))
    U: torch.Tensor | None = None
    for s in range(0, len(pairs_i), bs):
        ii, kk = pairs_i[s : s + bs], pairs_k[s : s + bs]
        n = len(ii)
        prim = points[kk.to(points.device)]
        tan = torch.zeros_like(prim)
        tan[torch.arange(n), ii.to(points.device)] = diff[ii.to(points.device)]
        with torch.no_grad(), fwAD.dual_level(), _math_attention():
            out = f(fwAD.make_dual(prim, tan))
            p, jv = fwAD.unpack_dual(out)
        if U is None:
            U = torch.zeros(T, p.shape[-1], dtype=torch.float64)
        if jv is not None:
            U.index_add_(0, ii, jv.detach().double().cpu() * w[kk][:, None])
    if U is None:  # nothing to move: one plain forward for the output size
        with torch.no_grad():
            U = torch.zeros(T, f(points[:1]).shape[-1], dtype=torch.float64)
    return U


def _reverse_mode(f: Callable, points: torch.Tensor, diff: torch.Tensor, w: torch.Tensor, toks: torch.Tensor,
                  bs: int) -> torch.Tensor:
    K, T, _ = points.shape
    U: torch.Tensor | None = None
    sel = torch.zeros(T, dtype=torch.bool)
    sel[toks] = True
    for s in range(0, K, bs):
        x = points[s : s + bs].detach().clone().requires_grad_(True)
        F = f(x)
        D = F.shape[-1]
        if U is None:
            U = torch.zeros(T, D, dtype=torch.float64)
        wk = w[s : s + bs].to(x.device, torch.float64)[:, None, None]
        for dim in range(D):
            (g,) = torch.autograd.grad(F[:, dim].sum(), x, retain_graph=dim < D - 1, allow_unused=True)
            if g is not None:
                U[:, dim] += ((g.double() * wk).sum(0) * diff.double()).sum(-1).cpu()
    assert U is not None
    U[~sel] = 0
    return U


# ---------------------------------------------------------------------------------------------- the encoder
def encoder_function(
    adapter: ModelAdapter, score: str = "cosine", method: str | None = None, layers: Any = None
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``f(inputs_embeds [N, T, d]) -> [N, D]``: the adapter's pooled sentence embedding from token embeddings
    (no padding), L2-normalised for ``score="cosine"``. Pooling method and layers default to
    ``adapter.pooling_config`` (mean over the last hidden state otherwise), as :meth:`ModelAdapter.pool`.

    The hidden states are read at canonical hook points (``layers.{k}.resid_pre`` for ``hidden_states[k]``,
    the last layer's ``resid_post`` or ``final_norm`` for the last) and the forward stops there, so a masked
    LM's prediction head never runs.
    """
    from tokensmith.models import pooling

    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    cfg = getattr(adapter, "pooling_config", None)
    method = method or (cfg.method if cfg else "mean")
    if layers is None and cfg is not None:
        layers = cfg.layers
    n = adapter.structure.num_layers
    idx = [-1] if layers is None else ([layers] if isinstance(layers, int) else list(layers))
    idx = [i % (n + 1) for i in idx]
    has_norm = "final_norm" in adapter.hook_names()

    def name(k: int) -> str:
        if k < n:
            return f"layers.{k}.resid_pre"
        return "final_norm" if has_norm else f"layers.{n - 1}.resid_post"

    names = [name(k) for k in idx]
    last = name(max(idx))

    def f(x: torch.Tensor) -> torch.Tensor:
        am = torch.ones(x.shape[:2], dtype=torch.long)
        with adapter.hooks(cache=sorted(set(names)), stop_after=last, detach=False) as h:
            adapter.forward(inputs_embeds=x, attention_mask=am)
        hs = [h.cache[nm] for nm in names]
        out = pooling.pool(hs, am.to(hs[0].device), method=method, layers=list(range(len(hs))))
        return pooling.l2_normalize(out) if score == "cosine" else out

    return f


def _encode(adapter: ModelAdapter, text: Any, which: str) -> Encoded:
    if isinstance(text, Encoded):
        enc = text
    elif isinstance(text, str):
        if not text.strip():
            raise ValueError(f"text {which} is empty: give a non-empty sentence")
        enc = adapter.encode(text)
    else:
        raise TypeError(f"text {which} must be a str or an Encoded, got {type(text).__name__}")
    if len(enc) == 0:
        raise ValueError(f"text {which} tokenizes to nothing")
    adapter.check_length(len(enc), f"text {which}")
    return enc


def _reference(adapter: ModelAdapter, enc: Encoded, baseline: Any, move: torch.Tensor) -> torch.Tensor:
    from tokensmith.attribution.gradient import baseline_embeddings
    from tokensmith.attribution.targets import AttributionProblem

    problem = AttributionProblem(adapter, enc, move, torch.tensor([-1]), [], kind="callable")
    return baseline_embeddings(problem, baseline)


def integrated_jacobians(
    adapter: ModelAdapter,
    a: str | Encoded,
    b: str | Encoded,
    *,
    n_steps: int = 32,
    rule: str = "gausslegendre",
    baseline: Any = "pad",
    score: str = "cosine",
    batch_size: int | None = None,
    include_special: bool = False,
    mode: str = "forward",
    shift: bool = False,
) -> PairAttribution:
    """Integrated-Jacobian token-pair attributions of ``s(a, b) = f(a)ᵀf(b)`` (Moeller et al., 2023).

    ``A_ij = (a_i − r_{a,i})ᵀ J_{a,i}ᵀ J_{b,j} (b_j − r_{b,j})`` with ``J = ∫₀¹ ∂f(r + κ(x − r))/∂x dκ`` by
    quadrature; ``Σ_ij A_ij = s(a,b) − s(r_a,b) − s(a,r_b) + s(r_a,r_b)`` up to the quadrature error
    ``delta`` (see the module docstring for the derivation).

    Args:
        adapter: a sentence encoder (any model whose hidden states :meth:`ModelAdapter.pool` pools; the
            bundled ``ts.load("minilm-l6")``), fed through ``inputs_embeds``.
        a: the first text (str or :class:`~tokensmith.models.Encoded`).
        b: the second text.
        n_steps: quadrature nodes (the cost is ``(Ta + Tb)·n_steps`` JVP rows).
        rule: ``"gausslegendre"`` (default) or a Riemann rule.
        baseline: the reference embeddings ``r`` at the attributed tokens, as for integrated gradients
            (:func:`~tokensmith.attribution.gradient.baseline_embeddings`: ``"pad"`` (default: the pad
            token's embedding at every attributed token), ``"zero"``, ``"mask"``, ``"mean"``, a token id, a tensor).
        score: ``"cosine"`` (``f`` L2-normalised) or ``"dot"`` (raw pooled vectors).
        batch_size: sequences per forward (default 64).
        include_special: also move [CLS]/[SEP] (default: held at their real embeddings, rows zero).
        mode: ``"forward"`` (JVPs; default) or ``"reverse"`` (one backward per output dimension).
        shift: score the reference-shifted embeddings ``f̃(x) = f(x) − f(r_x)`` (the paper's setup): then
            ``score = (f(a) − f(r_a))ᵀ(f(b) − f(r_b))``, the reference terms are 0 and ``Σ A ≈ score``.

    Raises:
        ValueError: an empty text, an unknown score, a model without ``inputs_embeds``, a NaN/inf baseline,
            a text with no token to attribute.

    Examples:
        >>> import tokensmith as ts
        >>> ad = ts.tiny("bert")
        >>> pa = integrated_jacobians(ad, "a cat", "a dog", n_steps=4)
        >>> pa.shape == (len(pa.tokens_a), len(pa.tokens_b)) and abs(pa.delta) < 0.1
        True
    """
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    if not adapter.capabilities()["features"]["inputs_embeds"]:
        raise ValueError(f"{adapter.name!r} does not take inputs_embeds; integrated Jacobians need the embedding "
                         "path")
    ea, eb = _encode(adapter, a, "a"), _encode(adapter, b, "b")
    f = encoder_function(adapter, score)
    sides = []
    for enc, which in ((ea, "a"), (eb, "b")):
        move = torch.ones(len(enc), dtype=torch.bool) if include_special else ~enc.special_mask.clone()
        if not bool(move.any()):
            raise ValueError(f"text {which} has no non-special token to attribute (or pass include_special=True)")
        x = adapter.embed(enc.input_ids[None])[0].detach()
        r = _reference(adapter, enc, baseline, move)
        U = integrated_contributions(f, x, r, move, n_steps=n_steps, rule=rule, batch_size=batch_size, mode=mode)
        with torch.no_grad():
            fx, fr = f(torch.stack([x, r])).double().cpu()
        sides.append((enc, move, U, fx, fr))
    (_, ma, Ua, fa, fra), (_, mb, Ub, fb, frb) = sides
    A = Ua @ Ub.T
    if shift:
        s, s_ra, s_rb, s_rr = float((fa - fra) @ (fb - frb)), 0.0, 0.0, 0.0
    else:
        s, s_ra, s_rb, s_rr = float(fa @ fb), float(fra @ fb), float(fa @ frb), float(fra @ frb)
    delta = float(A.sum()) - (s - s_ra - s_rb + s_rr)
    cfg = {"n_steps": n_steps, "rule": rule, "baseline": baseline if not isinstance(baseline, torch.Tensor)
           else f"tensor{list(baseline.shape)}", "score": score, "include_special": include_special, "mode": mode, "shift": shift}
    return PairAttribution(
        tokens_a=list(ea.tokens), tokens_b=list(eb.tokens), ids_a=ea.input_ids.clone(), ids_b=eb.input_ids.clone(),
        matrix=A.float(), score=s, score_ref_a=s_ra, score_ref_b=s_rb, score_ref_ab=s_rr, delta=delta,
        contrib_a=Ua.float(), contrib_b=Ub.float(),
        delta_a=float((Ua.sum(0) - (fa - fra)).norm()), delta_b=float((Ub.sum(0) - (fb - frb)).norm()),
        special_a=ea.special_mask.clone(), special_b=eb.special_mask.clone(), moved_a=ma, moved_b=mb, score_kind=score, config=cfg,
    )


integrated_jacobians_pairwise = integrated_jacobians  # METHODS.md ATT-12's name
