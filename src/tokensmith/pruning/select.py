"""Selectors: from scores ``[B, H_kv or 1, T]`` to the columns kept (METHODS.md PRN-3, PRN-9, PRN-25).

- :func:`keep_counts`: how many real tokens each row keeps under a ``ratio`` (fraction *removed*, in
  ``[0, 1)``) or an absolute ``budget``.
- :func:`topk_keep`: the kept columns ``[B, h, K]`` sorted in original order, rectangular (every head of a
  row keeps the same number), protected tokens always kept, padded rows filled with pad columns (see below).
- :func:`threshold_keep`: a boolean keep mask ``s >= θ`` (LTP); variable counts, for masks and hidden states.
- :func:`kcenter_keep`: greedy farthest-point (k-center) selection, attention-free (ToDRE).
- :func:`pyramid_schedule`, :func:`layer_ratios`: per-layer ratios (constant, pyramid, explicit list).
- :class:`TopK`, :class:`Threshold`, :class:`KCenter`: the selector objects a :class:`~tokensmith.pruning.Reducer` takes.

**Rectangular kept sets and padding.** A KV cache stores ``[B, H_kv, K, d]``, so every row and head keeps
``K = max_b k_b`` slots. A row keeping ``k_b < K`` real tokens fills the remaining slots with its own pad
columns (leftmost first: with left padding every head picks the same pad slots, so one slot mask describes
the row). Those slots stay masked; the report counts real tokens only. A row without enough pads keeps its
next-best real tokens instead (at most one, from rounding).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

__all__ = [
    "keep_counts",
    "topk_keep",
    "threshold_keep",
    "kcenter_keep",
    "keep_mask",
    "pyramid_schedule",
    "layer_ratios",
    "Selector",
    "TopK",
    "Threshold",
    "KCenter",
]


def _check_ratio(ratio: float) -> float:
    r = float(ratio)
    if not (0.0 <= r < 1.0) or math.isnan(r):
        raise ValueError(f"ratio is the fraction of tokens removed and must be in [0, 1), got {ratio!r}")
    return r


def keep_counts(
    valid: torch.Tensor, ratio: float | None = None, budget: int | None = None, min_keep: int = 1
) -> torch.Tensor:
    """Real tokens kept per row: ``k_b = max(min_keep, ⌊n_b·(1 − ratio)⌋)`` or ``min(budget, n_b)``.

    ``n_b`` is the row's number of real tokens. A ``budget`` at or above ``n_b`` keeps the row whole (the
    documented fallback for short inputs and for capacities not reached yet).

    Examples:
        >>> import torch
        >>> keep_counts(torch.ones(2, 10, dtype=torch.bool), ratio=0.25).tolist()
        [7, 7]
    """
    if (ratio is None) == (budget is None):
        raise ValueError("give exactly one of ratio= (fraction removed, in [0, 1)) or budget= (tokens kept)")
    n = valid.long().sum(-1)
    if ratio is not None:
        r = _check_ratio(ratio)
        k = torch.floor(n.double() * (1.0 - r) + 1e-9).long()
    else:
        if int(budget) < 1:  # type: ignore[arg-type]
            raise ValueError(f"budget must be a positive number of tokens, got {budget!r}")
        k = torch.full_like(n, int(budget))  # type: ignore[arg-type]
    return torch.minimum(k.clamp_min(min_keep), n)


def topk_keep(
    scores: torch.Tensor,
    k: torch.Tensor | int,
    valid: torch.Tensor,
    protect: torch.Tensor | None = None,
) -> torch.Tensor:
    """Kept columns ``[B, h, K]`` (ascending): per row and head the ``k_b`` best real tokens, protected
    tokens first; rectangular over rows by filling with pad columns (module docstring).

    Ties are broken towards the later column (recent tokens), deterministically.

    Args:
        scores: ``[B, h, T]`` (``-inf`` at pads is fine).
        k: ``[B]`` real tokens to keep per row (or an int for all rows).
        valid: ``[B, T]`` real columns.
        protect: ``[B, T]`` (or ``[B, h, T]``) tokens always kept (specials, sinks, a question span); if a row protects more than
            ``k_b`` tokens it keeps all of them.

    Examples:
        >>> import torch
        >>> s = torch.tensor([[[0.1, 0.9, 0.5, 0.2]]])
        >>> topk_keep(s, 2, torch.ones(1, 4, dtype=torch.bool)).tolist()
        [[[1, 2]]]
    """
    B, h, T = scores.shape
    dev = scores.device
    valid = valid.to(dev)
    kk = torch.as_tensor(k, device=dev).long().expand(B).clone()
    if protect is None:
        prot = torch.zeros(B, 1, T, dtype=torch.bool, device=dev)
    else:
        prot = protect.to(dev)
        prot = (prot if prot.dim() == 3 else prot[:, None, :]) & valid[:, None, :]
    kk = torch.maximum(kk, prot.long().sum(-1).amax(-1))
    s = torch.nan_to_num(scores.float(), nan=-math.inf)
    ranked = torch.where(prot, math.inf, s)
    ranked = torch.where(valid[:, None, :], ranked, -math.inf)
    # stable descending sort of the column-reversed scores: among equal scores the later column ranks first
    idx = torch.argsort(ranked.flip(-1), dim=-1, descending=True, stable=True)
    rank = (
        torch.empty_like(idx)
        .scatter_(-1, idx, torch.arange(T, device=dev).expand_as(idx).contiguous())
        .flip(-1)
    )
    chosen = (rank < kk[:, None, None]) & valid[:, None, :]  # [B, h, T]
    K = int(kk.max()) if B else 0
    # fill: pads leftmost first, then the best remaining real tokens
    pad_pri = 2.0 - torch.arange(T, device=dev).float() / T  # in (1, 2]
    real_rank = rank.float() / max(T, 1)
    fill_pri = torch.where(valid[:, None, :], 1.0 - real_rank.clamp(max=1.0), pad_pri.expand(B, h, T))
    pri = torch.where(chosen, 4.0, fill_pri.clamp(max=3.0))
    keep = torch.topk(pri, K, dim=-1).indices
    return torch.sort(keep, -1).values


def threshold_keep(
    scores: torch.Tensor,
    theta: float | torch.Tensor,
    valid: torch.Tensor,
    protect: torch.Tensor | None = None,
) -> torch.Tensor:
    """Boolean keep mask ``[B, h, T]``: ``s ≥ θ`` (LTP, Kim et al. 2022), protected tokens always kept,
    pads never; every row keeps at least its best token."""
    valid = valid.to(scores.device)
    m = (scores >= torch.as_tensor(theta, device=scores.device)) & valid[:, None, :]
    if protect is not None:
        m = m | (protect.to(scores.device) & valid)[:, None, :]
    best = torch.where(valid[:, None, :], scores, -math.inf).argmax(-1, keepdim=True)
    return m.scatter(-1, best, True) & valid[:, None, :]


def keep_mask(keep: torch.Tensor, T: int) -> torch.Tensor:
    """Kept columns ``[B, h, K]`` -> boolean mask ``[B, h, T]``."""
    m = torch.zeros(*keep.shape[:2], T, dtype=torch.bool, device=keep.device)
    return m.scatter(-1, keep, True)


def kcenter_keep(
    x: torch.Tensor,
    k: torch.Tensor | int,
    valid: torch.Tensor,
    protect: torch.Tensor | None = None,
    init: str = "max_norm",
) -> torch.Tensor:
    """Greedy k-center (farthest-point) selection (ToDRE, Li et al. 2025; Gonzalez 1985): start from the
    max-norm token (or the protected ones), repeatedly add the real token farthest (cosine distance) from
    the selected set. Returns kept columns ``[B, 1, K]`` as :func:`topk_keep` does (rectangular, sorted)."""
    if init not in ("max_norm", "first"):
        raise ValueError(f"init must be 'max_norm' or 'first', got {init!r}")
    B, T = valid.shape
    dev = x.device
    valid = valid.to(dev)
    kk = torch.as_tensor(k, device=dev).long().expand(B).clone()
    y = F.normalize(x.float(), dim=-1)
    order = torch.full((B, T), -1.0, device=dev)  # selection step of each token (higher = earlier)
    for b in range(B):
        v = valid[b]
        if not bool(v.any()):
            continue
        sel = torch.zeros(T, dtype=torch.bool, device=dev)
        if protect is not None:
            sel |= protect[b].to(dev) & v
        if not bool(sel.any()):
            start = (
                x[b].float().norm(dim=-1).masked_fill(~v, -1).argmax()
                if init == "max_norm"
                else v.nonzero()[0, 0]
            )
            sel[start] = True
        step = float(T)
        for i in sel.nonzero().flatten().tolist():
            order[b, i] = step
        dist = (1.0 - y[b] @ y[b][sel].T).amin(-1)  # [T]
        n = int(kk[b])
        while int(sel.sum()) < n:
            step -= 1.0
            d = dist.masked_fill(sel | ~v, -1.0)
            j = int(d.argmax())
            sel[j] = True
            order[b, j] = step
            dist = torch.minimum(dist, 1.0 - y[b] @ y[b, j])
    scores = torch.where(order >= 0, order, -math.inf)[:, None, :]
    return topk_keep(scores, kk, valid, protect)


def pyramid_schedule(n_layers: int, ratio: float, spread: float = 0.5) -> list[float]:
    """Per-layer removal ratios whose kept fractions fall linearly with depth and average ``1 − ratio``
    (PyramidKV / PyramidDrop-style): kept ``f_l = f·(1 + spread·(1 − 2l/(L−1)))``, clipped to (0, 1].

    Examples:
        >>> [round(r, 2) for r in pyramid_schedule(3, 0.5)]
        [0.25, 0.5, 0.75]
    """
    r = _check_ratio(ratio)
    f = 1.0 - r
    if n_layers == 1:
        return [r]
    out = []
    for li in range(n_layers):
        fl = f * (1.0 + spread * (1.0 - 2.0 * li / (n_layers - 1)))
        out.append(min(max(1.0 - fl, 0.0), 1.0 - 1e-6))
    return out


def layer_ratios(schedule: Any, layers: Sequence[int], ratio: float | None) -> dict[int, float | None]:
    """``{layer: ratio}`` from a schedule: None / ``"constant"`` (``ratio`` everywhere), ``"pyramid"``, or an
    explicit list (one ratio per pruned layer) / dict."""
    layers = list(layers)
    if schedule is None or schedule == "constant":
        return dict.fromkeys(layers, ratio)
    if schedule == "pyramid":
        if ratio is None:
            raise ValueError("schedule='pyramid' needs ratio=")
        return dict(zip(layers, pyramid_schedule(len(layers), ratio), strict=True))
    if isinstance(schedule, dict):
        return {int(i): _check_ratio(v) for i, v in schedule.items()}
    if isinstance(schedule, (list, tuple)):
        if len(schedule) != len(layers):
            raise ValueError(
                f"schedule lists {len(schedule)} ratios for {len(layers)} pruned layers {layers}"
            )
        return {i: _check_ratio(v) for i, v in zip(layers, schedule, strict=True)}
    raise ValueError(f"schedule must be None, 'constant', 'pyramid', a list or a dict, got {schedule!r}")


# ---------------------------------------------------------------------------------------------- objects
class Selector:
    """Base class: ``select(scores, valid, protect, ratio) -> kept columns [B, h, K]`` (or, for
    ``variable=True`` selectors, a boolean keep mask ``[B, h, T]``)."""

    variable: bool = False

    def select(
        self,
        scores: torch.Tensor,
        valid: torch.Tensor,
        protect: torch.Tensor | None,
        ratio: float | None,
        ctx: Any = None,
    ) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


@dataclass
class TopK(Selector):
    """Keep the best ``1 − ratio`` of each row's real tokens (or ``budget`` tokens), per KV head when the
    scores are per head (``per_head=False`` averages them first: one kept set for all heads)."""

    ratio: float | None = None
    budget: int | None = None
    per_head: bool = True
    min_keep: int = 1

    def __post_init__(self) -> None:
        if self.ratio is not None:
            _check_ratio(self.ratio)
        if self.budget is not None and int(self.budget) < 1:
            raise ValueError(f"budget must be a positive number of tokens, got {self.budget!r}")

    def select(self, scores, valid, protect, ratio=None, ctx=None):
        r = self.ratio if ratio is None else ratio
        k = keep_counts(
            valid, ratio=r if self.budget is None else None, budget=self.budget, min_keep=self.min_keep
        )
        s = scores
        if not self.per_head and s.shape[1] > 1:
            s = (
                torch.where(torch.isfinite(s), s, torch.nan)
                .nanmean(1, keepdim=True)
                .nan_to_num(nan=-math.inf)
            )
        return topk_keep(s, k, valid, protect)


@dataclass
class Threshold(Selector):
    """Keep tokens scoring at least ``theta`` (LTP); variable counts (masks / hidden states only)."""

    theta: float = 0.0
    variable = True

    def select(self, scores, valid, protect, ratio=None, ctx=None):
        return threshold_keep(scores, self.theta, valid, protect)


@dataclass
class KCenter(Selector):
    """Greedy k-center diversity selection on ``ctx.hidden`` (or ``on="keys"``: head-mean keys); the scorer's
    scores are ignored (ToDRE)."""

    ratio: float | None = None
    budget: int | None = None
    on: str = "hidden"

    def select(self, scores, valid, protect, ratio=None, ctx=None):
        r = self.ratio if ratio is None else ratio
        k = keep_counts(valid, ratio=r if self.budget is None else None, budget=self.budget)
        if ctx is None:
            raise ValueError("KCenter needs the score context (hidden states or keys)")
        x = ctx.hidden if self.on == "hidden" else (ctx.keys.mean(1) if ctx.keys is not None else None)
        if x is None:
            raise ValueError(f"KCenter(on={self.on!r}) needs {self.on} at this pruning point")
        return kcenter_keep(x, k, valid, protect)
