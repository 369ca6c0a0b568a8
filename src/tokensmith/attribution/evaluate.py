"""Faithfulness and plausibility of attributions (ATT-11), on the same batched perturbation engine.

For row ``t`` let ``V_t`` be its valid sources sorted by score (highest first), ``r_k`` the top
``⌈k·|V_t|⌉`` of them, and ``p_t(·)`` the row's probability (``exp`` of the log-prob for token targets;
the raw score for contrast / callable targets). Removed tokens are replaced by the pad token by default
(``baseline="pad"``; ``"mask"``, a token id, or ``"delete"`` as for occlusion — with deletion, removing
every source before a row's token leaves it without context and the curve point is undefined). Metrics (DeYoung et al., 2020, ERASER; Samek et al., 2017):

- ``comprehensiveness``: ``mean_k [p_t(x) − p_t(x ∖ r_k)]`` over ``k ∈ fractions`` (AOPC of deletion;
  higher = more faithful);
- ``sufficiency``: ``mean_k [p_t(x) − p_t(r_k only)]`` (the other valid sources removed; lower = better);
- ``deletion_auc``: area under ``p_t`` as the top sources are removed in score order, over the fraction
  removed ∈ [0, 1] (trapezoid on ``steps`` points; lower = better);
- ``insertion_auc``: the same, starting from every valid source removed and inserting in score order
  (higher = better);
- ``completeness``: ``mean_t |δ_t| / |f_t(x) − f_t(x′)|`` for path methods (from the result).

``plausibility(result, gold)`` compares the summed scores with gold positions: ROC-AUC, average
precision and recall at ``|gold|``.
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Sequence
from typing import Any

import torch

from tokensmith.attribution.perturbation import perturb, removal_id
from tokensmith.attribution.result import AttributionResult
from tokensmith.attribution.targets import FORWARD_KINDS, AttributionProblem

__all__ = ["METRICS", "evaluate", "plausibility", "compare_methods"]

METRICS = ("comprehensiveness", "sufficiency", "deletion_auc", "insertion_auc", "completeness")
FRACTIONS = (0.01, 0.05, 0.1, 0.2, 0.5)


def _problem_from_result(adapter: Any, result: AttributionResult) -> AttributionProblem:
    from tokensmith.models import Encoded, Span

    if result.extra.get("aggregated_by"):
        raise ValueError("evaluate a token-level result (before .aggregate()); aggregated groups are not tokens")
    kind = result.extra.get("target_kind", "tokens")
    if kind not in ("tokens", *FORWARD_KINDS) or (kind in FORWARD_KINDS and "row_ids" not in result.extra):
        raise ValueError("a contrast or callable result needs its problem: evaluate(adapter, result, problem=...)")
    names: list[str] = ["template"]
    for s in result.segments:
        if s not in names:
            names.append(s)
    enc = Encoded(
        input_ids=result.ids.clone(), text=result.text, offsets=list(result.offsets),
        spans={k: Span(k, a, b, 0, 0) for k, (a, b) in result.spans.items()},
        segment_ids=torch.tensor([names.index(s) for s in result.segments]), segment_names=names,
        special_mask=result.special.clone(), tokens=list(result.tokens),
    )
    row_ids = torch.tensor(result.extra["row_ids"], dtype=torch.long) if kind in FORWARD_KINDS else None
    return AttributionProblem(adapter, enc, result.sources.clone(), result.target_positions.clone(),
                              list(result.target_labels), kind=kind, row_ids=row_ids)


def _auc(y: Sequence[float]) -> float:
    n = len(y) - 1
    return float(sum((y[i] + y[i + 1]) / 2 for i in range(n)) / n) if n > 0 else float(y[0])


def evaluate(
    adapter: Any,
    result: AttributionResult,
    metrics: Sequence[str] = METRICS,
    *,
    fractions: Sequence[float] = FRACTIONS,
    steps: int = 10,
    baseline: Any = "pad",
    problem: AttributionProblem | None = None,
    batch_size: int | None = None,
) -> dict[str, Any]:
    """Faithfulness metrics of ``result`` (see the module docstring); ``{metric: mean over rows}`` plus
    ``"per_row"`` with each row's value.

    Examples:
        >>> import tokensmith as ts
        >>> from tokensmith.attribution import attribute, evaluate
        >>> ad = ts.tiny("llama")
        >>> res = attribute(ad, "The capital of France is", target=" Paris", method="occlusion")
        >>> m = evaluate(ad, res, ["comprehensiveness", "deletion_auc"], steps=4)
        >>> sorted(k for k in m if k != "per_row")
        ['comprehensiveness', 'deletion_auc']
    """
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; available: {METRICS}")
    if steps < 1:
        raise ValueError("steps must be >= 1")
    prob = problem or _problem_from_result(adapter, result)
    if batch_size is not None:
        prob.batch_size = batch_size
    rep = removal_id(prob, baseline)
    ids = prob.ids.tolist()
    R = prob.n_rows
    as_prob = prob.kind in ("tokens", *FORWARD_KINDS)  # rows are log-probabilities
    out: dict[str, Any] = {"per_row": {m: [] for m in metrics}}
    need_perturb = [m for m in metrics if m != "completeness"]

    plans: list[tuple[int, str, list[int]]] = []  # (row, kind, removed positions)
    order_per_row = []
    for t in range(R):
        ok = result.valid[t]
        cand = torch.nonzero(ok).flatten()
        order = cand[torch.argsort(result.scores[t, cand], descending=True)].tolist()
        order_per_row.append(order)
        n = len(order)
        if not n or not need_perturb:
            continue
        ks = sorted({max(1, math.ceil(f * n)) for f in fractions})
        if "comprehensiveness" in metrics:
            plans += [(t, f"comp{k}", order[:k]) for k in ks]
        if "sufficiency" in metrics:
            plans += [(t, f"suff{k}", order[k:]) for k in ks]
        cuts = sorted({round(j * n / steps) for j in range(steps + 1)})
        if "deletion_auc" in metrics:
            plans += [(t, f"del{c}", order[:c]) for c in cuts]
        if "insertion_auc" in metrics:
            plans += [(t, f"ins{c}", order[c:]) for c in cuts]
    vals: dict[tuple[int, str], float] = {}
    if plans:
        seqs = [perturb(ids, set(rm), rep) for _, _, rm in plans]
        rows = [r for r, _ in seqs]
        keeps = None if rep is not None else [k for _, k in seqs]
        f = prob.score_ids(rows, keeps).double()
        for j, (t, key, _) in enumerate(plans):
            v = float(f[j, t])
            vals[(t, key)] = math.exp(v) if as_prob else v
    base = prob.full_scores().double()
    for t in range(R):
        full = math.exp(float(base[t])) if as_prob else float(base[t])
        n = len(order_per_row[t])
        ks = sorted({max(1, math.ceil(f * n)) for f in fractions}) if n else []
        cuts = sorted({round(j * n / steps) for j in range(steps + 1)}) if n else []
        row: dict[str, float] = {}
        if "comprehensiveness" in metrics:
            row["comprehensiveness"] = sum(full - vals[(t, f"comp{k}")] for k in ks) / len(ks) if ks else math.nan
        if "sufficiency" in metrics:
            row["sufficiency"] = sum(full - vals[(t, f"suff{k}")] for k in ks) / len(ks) if ks else math.nan
        if "deletion_auc" in metrics:
            row["deletion_auc"] = _auc([vals[(t, f"del{c}")] for c in cuts]) if cuts else math.nan
        if "insertion_auc" in metrics:
            row["insertion_auc"] = _auc([vals[(t, f"ins{c}")] for c in reversed(cuts)]) if cuts else math.nan
        if "completeness" in metrics:
            rd = result.relative_delta()
            row["completeness"] = float(rd[t]) if rd is not None else math.nan
        for m in metrics:
            out["per_row"][m].append(row[m])
    for m in metrics:
        xs = [x for x in out["per_row"][m] if not math.isnan(x)]
        out[m] = sum(xs) / len(xs) if xs else math.nan
    return out


def plausibility(result: AttributionResult, gold: Sequence[int] | torch.Tensor, row: int | None = None) -> dict[str, float]:
    """Agreement of the scores (a row, or summed over rows) with gold source positions: ROC-AUC, average
    precision (AP) and recall at ``|gold|``, over the valid sources.

    Examples:
        >>> import torch
        >>> from tokensmith.attribution import AttributionResult
        >>> r = AttributionResult(torch.tensor([[0.9, 0.1, 0.5]]), torch.ones(1, 3, dtype=torch.bool), list("abc"),
        ...     torch.arange(3), [(0, 1), (1, 2), (2, 3)], ["prompt"] * 3, torch.zeros(3, dtype=torch.bool),
        ...     torch.ones(3, dtype=torch.bool), torch.tensor([3]), ["x"], "abc")
        >>> plausibility(r, [0])["roc_auc"]
        1.0
    """
    s = result.total() if row is None else result.row(row)
    ok = result.valid.any(0) if row is None else result.valid[row]
    pos = torch.nonzero(ok).flatten().tolist()
    gold_set = {int(g) for g in (gold.tolist() if isinstance(gold, torch.Tensor) else gold)}
    labels = [1 if p in gold_set else 0 for p in pos]
    if not any(labels) or all(labels):
        raise ValueError("gold must contain some but not all of the valid source positions")
    scores = [float(s[p]) for p in pos]
    P, N = sum(labels), len(labels) - sum(labels)
    # ROC-AUC = P(score of a gold token > score of another), ties count half
    auc = sum((a > b) + 0.5 * (a == b) for a, la in zip(scores, labels, strict=True) if la
              for b, lb in zip(scores, labels, strict=True) if not lb) / (P * N)
    order = sorted(range(len(pos)), key=lambda i: -scores[i])
    hits, ap = 0, 0.0
    for rank, i in enumerate(order, 1):
        if labels[i]:
            hits += 1
            ap += hits / rank
    recall = sum(labels[i] for i in order[:P]) / P
    return {"roc_auc": float(auc), "average_precision": ap / P, "recall_at_gold": float(recall)}



def evaluate_against_spans(
    result: AttributionResult, gold_spans: Sequence[tuple[int, int]], row: int | None = None
) -> dict[str, float]:
    """:func:`plausibility` against gold **character** spans of ``result.text`` (ERASER-style rationales, human
    error spans): a source token is gold when its characters overlap a span.

    Examples:
        >>> import tokensmith as ts
        >>> from tokensmith.attribution import attribute
        >>> r = attribute(ts.tiny("llama"), "The capital of France is", target=" Paris", method="occlusion")
        >>> m = evaluate_against_spans(r, [(15, 21)])     # "France"
        >>> sorted(m)
        ['average_precision', 'recall_at_gold', 'roc_auc']
    """
    spans = [(int(a), int(b)) for a, b in gold_spans]
    if not spans or any(b <= a for a, b in spans):
        raise ValueError("gold_spans must be non-empty (start, end) character spans with end > start")
    gold = [i for i, (a, b) in enumerate(result.offsets) if b > a and any(a < e and s < b for s, e in spans)]
    if not gold:
        raise ValueError(f"no token of the text overlaps the gold spans {spans}; check the character offsets")
    return plausibility(result, gold, row=row)

def compare_methods(
    adapter: Any,
    inputs: Any,
    target: Any = None,
    methods: Sequence[Any] = ("input_x_gradient", "integrated_gradients", "occlusion", "attention_rollout"),
    metrics: Sequence[str] = ("comprehensiveness", "sufficiency", "deletion_auc", "insertion_auc"),
    *,
    method_kwargs: dict[str, dict[str, Any]] | None = None,
    random_seed: int | None = 0,
    **attribute_kwargs: Any,
) -> list[dict[str, Any]]:
    """Run several methods on one input and evaluate each: a list of rows ``{method, seconds, metric...}``
    (``pandas.DataFrame(rows)`` makes the table). ``random_seed`` adds a ``"random"`` row (uniform random
    scores on the same valid entries), the baseline every method should beat.
    """
    from tokensmith.attribution.api import run_method
    from tokensmith.attribution.base import get_method
    from tokensmith.attribution.targets import prepare

    mk = method_kwargs or {}
    prepare_kw = {n for n, p in inspect.signature(prepare).parameters.items() if p.kind is p.KEYWORD_ONLY}
    enc_kw = {k: attribute_kwargs.pop(k) for k in list(attribute_kwargs) if k in prepare_kw}
    if attribute_kwargs:
        raise TypeError(f"unknown arguments {sorted(attribute_kwargs)}; pass method settings in method_kwargs")
    problem = prepare(adapter, inputs, target, **enc_kw)
    rows = []
    last = None
    for m in methods:
        name = m if isinstance(m, str) else getattr(m, "name", type(m).__name__)
        canonical = get_method(m).name if isinstance(m, str) else name
        kw = mk.get(name, mk.get(canonical, {}))  # settings by the given name or the registry name
        t0 = time.perf_counter()
        res = run_method(problem, get_method(m, **kw))
        sec = time.perf_counter() - t0
        ev = evaluate(adapter, res, metrics, problem=problem)
        rows.append({"method": res.method, "seconds": sec, **{k: ev[k] for k in metrics}})
        last = res
    if random_seed is not None and last is not None:
        g = torch.Generator().manual_seed(random_seed)
        rnd = AttributionResult(**{**last.__dict__, "scores": torch.rand(last.scores.shape, generator=g) * last.valid,
                                   "method": "random"})
        ev = evaluate(adapter, rnd, metrics, problem=problem)
        rows.append({"method": "random", "seconds": 0.0, **{k: ev[k] for k in metrics}})
    return rows
