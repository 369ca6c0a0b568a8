"""Steering from attribution: GrAInS (METHODS.md ATT-13).

Nguyen, Prasad, Stengel-Eskin & Bansal (2025), "GrAInS: Gradient-based Attribution for Inference-Time
Steering of LLMs and VLMs". From examples ``(x, y⁺, y⁻)`` (a prompt, a preferred and a dispreferred
continuation) :func:`grains_fit` builds one steering vector per layer:

1. **Contrastive IG** (ATT-2): integrated gradients of ``f(x) = log p(y⁺ | x) − log p(y⁻ | x)`` over the
   prompt's source tokens (``attribute(..., Contrast(y⁺, y⁻), method="integrated_gradients")``; template
   and special tokens are never selected). For one-token continuations ``f`` is read from one forward of
   the prompt (the same function of the same embeddings, half the cost of a :class:`Contrast`).
2. **Top-k tokens**: ``I⁺`` = the ``k`` sources with the largest positive attributions (they push towards
   ``y⁺``), ``I⁻`` = the ``k`` with the most negative ones (towards ``y⁻``). A side with fewer than ``k``
   tokens of that sign keeps only those (none: that side contributes ``0``). The last prompt token, where
   the state is read, is not selectable unless ``select_last=True``.
3. **Masked forwards**: ``x̃⁺`` = ``x`` with the tokens of ``I⁺`` replaced by a mask token, ``x̃⁻`` likewise
   for ``I⁻``. At every chosen layer ``l`` the hidden state at the last prompt token (the residual stream
   after the layer, ``layers.{l}.resid_post``, read with ``cache_positions="last"``) gives
   ``δ⁺ = h_l(x) − h_l(x̃⁺)`` (what the positive tokens add), ``δ⁻ = h_l(x) − h_l(x̃⁻)`` and the
   example's contrastive difference ``δ_l = δ⁺ − δ⁻ = h_l(x̃⁻) − h_l(x̃⁺)``.
4. **Aggregation** over the ``N`` examples. The paper names PCA: ``aggregate="pca"`` is the first principal
   component of ``{δ_l^(i)}`` — the top right-singular vector of the centred matrix ``Δ_l − mean(Δ_l)`` —
   with its sign chosen so that ``⟨v_l, mean δ_l⟩ ≥ 0`` (a principal component has no sign of its own;
   aligned with the mean it points from dispreferred to preferred); ``"svd"`` is the top singular vector of
   the uncentred ``Δ_l`` (same sign rule). The default, ``"mean"``, is the normalised mean difference
   ``mean δ_l / ‖mean δ_l‖``: measured on SmolLM2-135M with 16 examples (``benchmarks/grains_bench.py``),
   the principal component (centred or not) follows the axis along which the differences *vary* across
   examples (nearly the same axis with or without centring: cosine 1.00), and steering along it moved
   held-out contrasts up for ``−α`` as well as for ``+α``: its first-order part, ``(shift(+α) − shift(−α))/2``
   at ``α = ±0.02``, was +0.24 nats against +3.63 for the mean direction (which moved all 8 held-out
   prompts in the sign of ``α``) and −0.28 for random directions.
   Every rule gives unit-norm ``v_l``. With one example (or identical differences) the centred matrix
   vanishes and ``"pca"`` uses the mean direction.

Applying (:meth:`SteeringVectors.apply`): at every steered layer and position,
``h ← (h + α·v_l)·‖h‖/‖h + α·v_l‖`` (norm-preserving, ``adapter.steer(..., renorm=True)``), during
prefill and every generated token. ``relative=True`` scales ``α`` per layer by the mean hidden-state norm
at the last prompt token seen while fitting (``α_l = α·n_l``), so one ``α`` means the same rotation
everywhere.

The paper's full text was not available to this implementation; steps 3–4 follow its abstract and
published summaries ("masks the top-k positive and negative tokens, compares the resulting activations,
per-layer difference vectors, PCA over these deltas across samples"). Choices made here: the mask token
(``mask_id``: the tokenizer's mask, else unk, else pad token, kept inside the attention mask so positions
do not move), the per-example combination ``δ⁺ − δ⁻`` before aggregating, the centring, the sign rule, the
unit norm, the mean as the default rule and the exclusion of the last prompt token.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tokensmith.attribution.api import run_method
from tokensmith.attribution.base import get_method
from tokensmith.attribution.progress import bar
from tokensmith.attribution.targets import Contrast, prepare
from tokensmith.models import MicroBatcher

__all__ = ["SteeringVectors", "GrainsDifferences", "grains_fit", "grains_differences", "grains_steer", "grains_directions"]

FORMAT = "tokensmith.steering/1"
_HOOK = "layers.{}.resid_post"


@dataclass
class SteeringVectors:
    """Per-layer steering vectors (GrAInS, :func:`grains_fit`).

    Attributes:
        layers: the steered layer indices.
        vectors: ``[n_layers, d]`` float32, unit-norm rows (``vectors[j]`` steers ``layers[j]``).
        hidden_norms: ``[n_layers]`` mean ``‖h_l‖`` at the last prompt token of the fitting examples
            (the scale for ``apply(relative=True)``).
        config: the fitting settings (``k``, ``n_steps``, ``aggregate``, ...) and statistics
            (``explained_variance``: ``σ₁²/Σσ²`` of the decomposed differences for ``"pca"``/``"svd"``).
        selected: per example, the chosen tokens ``{"positive": [...], "negative": [...]}`` (strings) and
            their positions.
    """

    layers: list[int]
    vectors: torch.Tensor
    hidden_norms: torch.Tensor
    config: dict[str, Any] = field(default_factory=dict)
    selected: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.layers = [int(i) for i in self.layers]
        self.vectors = torch.as_tensor(self.vectors, dtype=torch.float32)
        self.hidden_norms = torch.as_tensor(self.hidden_norms, dtype=torch.float32)
        if self.vectors.dim() != 2 or self.vectors.shape[0] != len(self.layers):
            raise ValueError(f"vectors must be [n_layers={len(self.layers)}, d], got {list(self.vectors.shape)}")
        if self.hidden_norms.shape != (len(self.layers),):
            raise ValueError(f"hidden_norms must be [{len(self.layers)}], got {list(self.hidden_norms.shape)}")
        if not torch.isfinite(self.vectors).all():
            raise ValueError("steering vectors contain NaN or inf")

    def __len__(self) -> int:
        return len(self.layers)

    def __repr__(self) -> str:
        return (f"SteeringVectors(layers={self.layers}, d={self.vectors.shape[1]}, "
                f"aggregate={self.config.get('aggregate')!r}, n_examples={self.config.get('n_examples')})")

    def names(self) -> list[str]:
        """The hook names steered (``layers.{l}.resid_post``)."""
        return [_HOOK.format(i) for i in self.layers]

    def alphas(self, alpha: float, relative: bool = False) -> list[float]:
        """The strength used at each layer: ``α``, or ``α·n_l`` with ``relative=True``."""
        if relative:
            return [float(alpha) * float(n) for n in self.hidden_norms]
        return [float(alpha)] * len(self.layers)

    @contextmanager
    def apply(
        self, adapter: Any, alpha: float = 1.0, *, relative: bool = False, positions: Any = None, renorm: bool = True
    ) -> Iterator[SteeringVectors]:
        """Steer inside a ``with`` block: ``h ← (h + α v_l)·‖h‖/‖h + α v_l‖`` at every steered layer.

        Args:
            adapter: the model the vectors were fitted on (same hidden size and at least as many layers).
            alpha: strength (negative: towards the dispreferred behaviour; 0: no change).
            relative: scale ``alpha`` per layer by :attr:`hidden_norms`.
            positions: which tokens (``adapter.steer``'s ``positions``; default every token, prefill and
                decode steps).
            renorm: keep each token's norm (GrAInS; default True).
        """
        d = adapter.structure.hidden_size
        if self.vectors.shape[1] != d:
            raise ValueError(f"the vectors have size {self.vectors.shape[1]}, this model's hidden size is {d}")
        L = adapter.structure.num_layers
        bad = [i for i in self.layers if not 0 <= i < L]
        if bad:
            raise ValueError(f"layer(s) {bad} are out of range for this {L}-layer model")
        with ExitStack() as stack:
            for name, v, a in zip(self.names(), self.vectors, self.alphas(alpha, relative), strict=True):
                stack.enter_context(adapter.steer(name, v, alpha=a, positions=positions, renorm=renorm))
            yield self

    # -- serialisation ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly dict (floats of the float32 vectors round-trip exactly)."""
        return {
            "format": FORMAT,
            "layers": list(self.layers),
            "vectors": self.vectors.tolist(),
            "hidden_norms": self.hidden_norms.tolist(),
            "config": self.config,
            "selected": self.selected,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SteeringVectors:
        if d.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} dict (format={d.get('format')!r})")
        return cls(d["layers"], torch.tensor(d["vectors"]), torch.tensor(d["hidden_norms"]), d.get("config", {}),
                   d.get("selected", []))

    def save(self, path: str | Path) -> Path:
        """Write JSON to ``path``; returns it."""
        p = Path(path)
        p.write_text(json.dumps(self.to_dict()))
        return p

    @classmethod
    def load(cls, path: str | Path) -> SteeringVectors:
        return cls.from_dict(json.loads(Path(path).read_text()))


def grains_steer(
    adapter: Any, vectors: SteeringVectors, alpha: float = 1.0, **kwargs: Any
) -> Any:
    """``vectors.apply(adapter, alpha, **kwargs)``: a context manager steering with GrAInS vectors."""
    return vectors.apply(adapter, alpha, **kwargs)


# ------------------------------------------------------------------------------------------------ fitting
def _check_examples(examples: Any) -> list[tuple[str, str, str]]:
    if isinstance(examples, (str, bytes)) or not isinstance(examples, Sequence):
        raise TypeError("examples must be a list of (prompt, preferred, dispreferred) string triples")
    if len(examples) == 0:
        raise ValueError("examples is empty: give at least one (prompt, preferred, dispreferred) triple")
    out = []
    for n, ex in enumerate(examples):
        if not isinstance(ex, (tuple, list)) or len(ex) != 3 or not all(isinstance(s, str) for s in ex):
            raise TypeError(f"example {n} must be a (prompt, preferred, dispreferred) triple of strings, got {ex!r}")
        if not all(s.strip() for s in ex):
            raise ValueError(f"example {n} has an empty prompt, preferred or dispreferred string: {ex!r}")
        if ex[1] == ex[2]:
            raise ValueError(f"example {n}: the preferred and dispreferred continuations are the same ({ex[1]!r})")
        out.append((ex[0], ex[1], ex[2]))
    return out


def _check_layers(layers: Any, L: int) -> list[int]:
    if layers is None:
        return list(range(L))
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = [layers]
    out: list[int] = []
    for i in layers:
        if isinstance(i, bool) or not isinstance(i, int):
            raise TypeError(f"layers must be ints, got {i!r}")
        if not -L <= i < L:
            raise ValueError(f"layer {i} is out of range for this {L}-layer model (use 0..{L - 1} or negatives)")
        j = i % L
        if j not in out:
            out.append(j)
    if not out:
        raise ValueError("layers is empty: give at least one layer index (or None for all layers)")
    return sorted(out)


def _mask_id(adapter: Any, mask_id: int | None) -> int:
    if mask_id is not None:
        if isinstance(mask_id, bool) or not isinstance(mask_id, int) or not 0 <= mask_id < adapter.structure.vocab_size:
            raise ValueError(f"mask_id must be a token id in [0, {adapter.structure.vocab_size}), got {mask_id!r}")
        return int(mask_id)
    tok = adapter.tokenizer
    for attr in ("mask_token_id", "unk_token_id"):
        tid = getattr(tok, attr, None)
        if tid is not None:
            return int(tid)
    return int(adapter.pad_token_id)


def _top_k(scores: torch.Tensor, cand: torch.Tensor, k: int) -> tuple[list[int], list[int]]:
    """Positions of the ``k`` largest positive and ``k`` most negative scores among ``cand`` (ties: earlier
    position first)."""
    pos_idx = torch.nonzero(cand).flatten()
    s = scores[pos_idx].double()
    order = sorted(range(len(pos_idx)), key=lambda j: (-float(s[j]), int(pos_idx[j])))
    positive = [int(pos_idx[j]) for j in order if float(s[j]) > 0][:k]
    order = sorted(range(len(pos_idx)), key=lambda j: (float(s[j]), int(pos_idx[j])))
    negative = [int(pos_idx[j]) for j in order if float(s[j]) < 0][:k]
    return positive, negative


def _next_token_problem(
    adapter: Any, problem: Any, x: str, chat: bool, batch_size: int | None, encode_kwargs: dict[str, Any] | None
) -> Any:
    """For one-token continuations, the same ``f = log p(y⁺ | x) − log p(y⁻ | x)`` read from one forward of the
    prompt alone (a callable target), instead of the two forwards of a :class:`Contrast` (half the cost, the
    same function of the same source embeddings). None when the continuations have more than one token."""
    s = problem.shared
    if problem.target_positions.tolist() != [s] or problem.foil_positions.tolist() != [s]:
        return None
    enc = adapter.encode(x, chat=chat, **dict(encode_kwargs or {}))
    if enc.input_ids.tolist() != problem.ids[:s].tolist():
        return None
    a, b = int(problem.ids[s]), int(problem.foil.input_ids[s])

    def contrast(out: Any, _problem: Any) -> torch.Tensor:
        lp = torch.log_softmax(out.logits[:, -1].float(), -1)
        return lp[:, a] - lp[:, b]

    return prepare(adapter, enc, contrast, batch_size=batch_size)


def _last_hidden(adapter: Any, seqs: list[list[int]], names: list[str], batch_size: int | None) -> torch.Tensor:
    """``[n_seqs, n_layers, d]`` hidden states at the last token of each (left-padded, batched) sequence."""
    N, T = len(seqs), max(len(s) for s in seqs)
    ids = torch.full((N, T), int(adapter.pad_token_id), dtype=torch.long)
    am = torch.zeros(N, T, dtype=torch.long)
    for n, s in enumerate(seqs):
        ids[n, T - len(s):] = torch.tensor(s, dtype=torch.long)
        am[n, T - len(s):] = 1

    def run(s: int, e: int) -> None:
        adapter.forward({"input_ids": ids[s:e], "attention_mask": am[s:e]})

    with torch.no_grad(), adapter.hooks(cache=names, cache_positions="last") as h:
        with adapter.micro_batch(N) as call:
            MicroBatcher(batch_size).run(run, N, call=call)
    return torch.stack([h.cache[n].float().cpu() for n in names], 1)


def grains_directions(deltas: torch.Tensor, aggregate: str = "mean") -> tuple[torch.Tensor, torch.Tensor]:
    """Unit directions ``[n_layers, d]`` from per-example differences ``deltas`` ``[N, n_layers, d]`` and the
    explained-variance share of each (step 4 of the module docstring; computed in float64).

    ``"pca"``: top right-singular vector of the centred ``Δ_l − mean Δ_l``, sign-aligned with ``mean Δ_l``
    (the mean direction where the centred matrix vanishes); ``"svd"``: top right-singular vector of the
    uncentred ``Δ_l``, same sign rule; ``"mean"``: ``mean Δ_l / ‖mean Δ_l‖``. The share is
    ``σ₁² / Σσ²`` of the decomposed matrix (NaN for ``"mean"``).

    Examples:
        >>> import torch
        >>> d = torch.tensor([[[1.0, 1.0]], [[3.0, 1.0]], [[2.0, 1.0]]])  # 3 examples, 1 layer, d = 2
        >>> grains_directions(d, "pca")[0].tolist()  # the axis the differences vary along, pointing with the mean
        [[1.0, 0.0]]
        >>> [round(x, 3) for x in grains_directions(d)[0][0].tolist()]  # the mean difference
        [0.894, 0.447]
    """
    if aggregate not in ("pca", "svd", "mean"):
        raise ValueError(f"aggregate must be 'pca', 'svd' or 'mean', got {aggregate!r}")
    if deltas.dim() != 3 or deltas.shape[0] < 1:
        raise ValueError(f"deltas must be [N >= 1, n_layers, d], got {list(deltas.shape)}")
    D = deltas.double()
    N, n_layers, _ = D.shape
    out, share = [], []
    for j in range(n_layers):
        X = D[:, j]
        if not torch.isfinite(X).all() or float(X.norm()) == 0.0:
            raise ValueError(
                f"no steering direction at layer index {j}: the differences are all zero (masking the top-k tokens "
                "did not change the hidden state) or not finite; use more or other examples, a larger k or another "
                "mask_id"
            )
        mu = X.mean(0)
        centred = X - mu
        tiny = float(centred.norm()) <= 1e-9 * max(float(X.norm()), 1e-300)
        if aggregate == "svd":
            _, S, Vh = torch.linalg.svd(X, full_matrices=False)
            v = Vh[0] if float(Vh[0] @ mu) >= 0 else -Vh[0]
            share.append(float(S[0] ** 2 / (S**2).sum()))
        elif aggregate == "mean" or N < 2 or tiny:
            v = mu
            share.append(float("nan"))
        else:
            _, S, Vh = torch.linalg.svd(centred, full_matrices=False)
            v = Vh[0]
            share.append(float(S[0] ** 2 / (S**2).sum()))
            if float(v @ mu) < 0:
                v = -v
        n = float(v.norm())
        if n == 0.0:  # "mean" of differences that cancel out
            raise ValueError(f"no steering direction at layer index {j}: the mean difference is zero; use 'pca'")
        out.append(v / n)
    return torch.stack(out).float(), torch.tensor(share)


@dataclass
class GrainsDifferences:
    """Steps 1–3 of GrAInS for a set of examples (:func:`grains_differences`).

    Attributes:
        layers: the layer indices.
        deltas: ``[N, n_layers, d]`` per-example ``δ_l = h_l(x̃⁻) − h_l(x̃⁺)`` at the last prompt token.
        hidden: ``[N, 3, n_layers, d]`` the hidden states of ``x``, ``x̃⁺``, ``x̃⁻`` there.
        selected: per example the chosen tokens, their positions, the contrast ``f(x)`` and the IG
            completeness error.
        config: the settings.
    """

    layers: list[int]
    deltas: torch.Tensor
    hidden: torch.Tensor
    selected: list[dict[str, Any]]
    config: dict[str, Any]

    def vectors(self, aggregate: str = "mean") -> SteeringVectors:
        """Step 4: aggregate into :class:`SteeringVectors` (see :func:`grains_directions`)."""
        vectors, share = grains_directions(self.deltas, aggregate)
        norms = self.hidden[:, 0].norm(dim=-1).mean(0)
        config = {
            **self.config,
            "aggregate": aggregate,
            "explained_variance": [None if v != v else v for v in share.tolist()],
        }
        return SteeringVectors(self.layers, vectors, norms, config, self.selected)


def grains_differences(
    adapter: Any,
    examples: Sequence[tuple[str, str, str]],
    k: int = 3,
    layers: Sequence[int] | int | None = None,
    n_steps: int = 16,
    chat: bool = False,
    batch_size: int | None = None,
    *,
    baseline: Any = "pad",
    rule: str = "gausslegendre",
    mask_id: int | None = None,
    select_last: bool = False,
    encode_kwargs: dict[str, Any] | None = None,
    progress: bool = False,
) -> GrainsDifferences:
    """Steps 1–3 of GrAInS (contrastive IG, top-k tokens, masked forwards): the per-example, per-layer
    differences ``δ_l = h_l(x̃⁻) − h_l(x̃⁺)`` at the last prompt token. Arguments as for :func:`grains_fit`."""
    exs = _check_examples(examples)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    L = adapter.structure.num_layers
    lay = _check_layers(layers, L)
    mid = _mask_id(adapter, mask_id)
    names = [_HOOK.format(i) for i in lay]
    method = get_method(
        "integrated_gradients", n_steps=n_steps, rule=rule, baseline=baseline, internal_batch_size=batch_size
    )

    seqs: list[list[int]] = []
    selected: list[dict[str, Any]] = []
    prog = bar(len(exs), desc="GrAInS attributions", unit="example") if progress else None
    for n, (x, yp, yn) in enumerate(exs):
        problem = prepare(adapter, x, Contrast(yp, yn), chat=chat, batch_size=batch_size, encode_kwargs=encode_kwargs)
        shared = problem.shared
        prompt = problem.ids[:shared].tolist()
        fast = _next_token_problem(adapter, problem, x, chat, batch_size, encode_kwargs)
        res = run_method(fast or problem, method)
        cand = res.valid[0] & (torch.arange(len(res.tokens)) < shared)
        if not select_last:
            cand[shared - 1] = False
        n_src = int(cand.sum())
        if k > n_src:
            raise ValueError(
                f"k={k} is larger than example {n}'s {n_src} selectable source token(s) ({x!r}; the last prompt "
                f"token, where the state is read, is excluded unless select_last=True); use k <= {n_src} or a "
                "longer prompt"
            )
        positive, negative = _top_k(res.scores[0], cand, k)
        masked_pos, masked_neg = list(prompt), list(prompt)
        for p in positive:
            masked_pos[p] = mid
        for p in negative:
            masked_neg[p] = mid
        seqs += [prompt, masked_pos, masked_neg]
        selected.append({
            "prompt": x,
            "positive": [res.tokens[p] for p in positive],
            "negative": [res.tokens[p] for p in negative],
            "positive_positions": positive,
            "negative_positions": negative,
            "contrast": float(res.target_scores[0]),
            "ig_delta": None if res.delta is None else float(res.delta[0]),
        })
        if prog is not None:
            prog.update(1)
    if prog is not None:
        prog.close()
    H = _last_hidden(adapter, seqs, names, batch_size).view(len(exs), 3, len(lay), -1)
    # δ⁺ − δ⁻ = (h(x) − h(x̃⁺)) − (h(x) − h(x̃⁻)) = h(x̃⁻) − h(x̃⁺)
    delta = (H[:, 0] - H[:, 1]) - (H[:, 0] - H[:, 2])
    config = {
        "method": "grains",
        "k": k,
        "n_steps": n_steps,
        "rule": rule,
        "baseline": baseline if isinstance(baseline, (str, int)) else "tensor",
        "mask_id": mid,
        "select_last": select_last,
        "chat": chat,
        "hook": "resid_post",
        "n_examples": len(exs),
        "model": getattr(adapter, "name", None),
        "mean_contrast": sum(s["contrast"] for s in selected) / len(selected),
    }
    return GrainsDifferences(lay, delta, H, selected, config)


def grains_fit(
    adapter: Any,
    examples: Sequence[tuple[str, str, str]],
    k: int = 3,
    layers: Sequence[int] | int | None = None,
    n_steps: int = 16,
    chat: bool = False,
    batch_size: int | None = None,
    *,
    baseline: Any = "pad",
    rule: str = "gausslegendre",
    mask_id: int | None = None,
    aggregate: str = "mean",
    select_last: bool = False,
    encode_kwargs: dict[str, Any] | None = None,
    progress: bool = False,
) -> SteeringVectors:
    """Fit GrAInS steering vectors (Nguyen et al., 2025; ATT-13) from ``(prompt, preferred, dispreferred)``
    examples: contrastive IG → top-k positive/negative tokens → masked forwards → per-layer
    ``δ_l = h_l(x̃⁻) − h_l(x̃⁺)`` at the last prompt token → aggregated over the examples into unit vectors
    (see the module docstring for every step). :func:`grains_differences` + :meth:`GrainsDifferences.vectors`.

    Args:
        adapter: a causal LM adapter.
        examples: ``(x, y⁺, y⁻)`` string triples; ``y⁺``/``y⁻`` are continuations of ``x`` (encoded jointly
            with it; start them with a space) or, with ``chat=True``, assistant answers to the user turn ``x``.
        k: tokens per side.
        layers: layer indices to steer (default all; negatives count from the end).
        n_steps: IG quadrature points.
        chat: render prompts through the chat template (its tokens are never selected; the last prompt token
            is the template's last token before the answer).
        batch_size: micro-batch size for the forwards (IG path points per forward, hidden-state sequences).
        baseline: the IG baseline (see :func:`~tokensmith.attribution.gradient.baseline_embeddings`).
        rule: the IG quadrature rule.
        mask_id: the token that replaces selected tokens (default: mask, else unk, else pad token).
        aggregate: ``"mean"`` (default: the normalised mean difference), ``"pca"`` (the paper's: first
            principal component of the centred differences) or ``"svd"`` (top singular vector of the uncentred
            differences); all sign-aligned with the mean difference and unit-norm (:func:`grains_directions`;
            the module docstring says why the default is the mean).
        select_last: allow masking the last prompt token. Off by default: the state is read at that token,
            and replacing it measures the swap of the token itself (with chat templates the last token is a
            template token and is never a source anyway).
        encode_kwargs: passed to ``adapter.encode`` (e.g. ``system=``).
        progress: a progress bar over the examples.

    Raises:
        ValueError: empty examples, ``k`` < 1 or larger than an example's selectable source tokens, a layer
            out of range, an unknown ``aggregate``, differences that are all zero.
        TypeError: examples that are not string triples.

    Examples:
        >>> import tokensmith as ts
        >>> from tokensmith.attribution.steering import grains_fit
        >>> ad = ts.tiny("llama")
        >>> ex = [("The movie was really", " good", " bad"), ("I think the food is very", " good", " bad")]
        >>> sv = grains_fit(ad, ex, k=2, layers=[1], n_steps=4, baseline=42)
        >>> sv.vectors.shape == (1, ad.structure.hidden_size)
        True
        >>> with sv.apply(ad, alpha=0.3, relative=True):
        ...     steered = ad.next_token_logprobs("The movie was really")
    """
    if aggregate not in ("pca", "svd", "mean"):
        raise ValueError(f"aggregate must be 'pca', 'svd' or 'mean', got {aggregate!r}")
    diffs = grains_differences(
        adapter, examples, k, layers, n_steps, chat, batch_size, baseline=baseline, rule=rule, mask_id=mask_id,
        select_last=select_last, encode_kwargs=encode_kwargs, progress=progress,
    )
    return diffs.vectors(aggregate)
