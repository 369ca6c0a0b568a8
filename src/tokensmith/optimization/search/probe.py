"""Probe sampling: a draft model filters the candidates the target model scores (Zhao et al. 2024; OPT-A4).

Reimplemented from the paper ("Accelerating Greedy Coordinate Gradient and General Prompt Optimization via
Probe Sampling").
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from tokensmith.optimization.search.objectives import Evaluation, Objective

if TYPE_CHECKING:  # pragma: no cover
    from tokensmith.models.adapter import ModelAdapter
    from tokensmith.optimization.search.template import SlotTemplate

__all__ = ["ProbeSampling", "rankdata", "spearman"]


def rankdata(x: torch.Tensor) -> torch.Tensor:
    """Ranks 1..N of a 1-D tensor, ties given the average of the ranks they span (float64).

    Examples:
        >>> import torch
        >>> rankdata(torch.tensor([10., 30., 20., 20.])).tolist()
        [1.0, 4.0, 2.5, 2.5]
    """
    x = torch.as_tensor(x).reshape(-1)
    if len(x) == 0:
        return torch.zeros(0, dtype=torch.float64)
    _, inverse, counts = torch.unique(x, sorted=True, return_inverse=True, return_counts=True)
    c = counts.to(torch.float64)
    first = torch.cumsum(c, 0) - c  # ranks before each group (0-based)
    return (first + (c + 1) / 2)[inverse]


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    """Spearman's rank correlation ρ = Pearson(rank(x), rank(y)) with average ranks for ties.

    Without ties this is 1 − 6·Σd_i²/(N(N²−1)). Returns NaN when N < 2 or either side is constant.

    Examples:
        >>> import torch
        >>> spearman(torch.tensor([1., 2., 3.]), torch.tensor([3., 2., 1.]))
        -1.0
    """
    x, y = torch.as_tensor(x).reshape(-1), torch.as_tensor(y).reshape(-1)
    if len(x) != len(y):
        raise ValueError(f"spearman needs two samples of the same size, got {len(x)} and {len(y)}")
    if len(x) < 2:
        return float("nan")
    rx, ry = rankdata(x), rankdata(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    den = float(torch.sqrt((rx * rx).sum() * (ry * ry).sum()))
    if den == 0.0:
        return float("nan")
    return float((rx * ry).sum()) / den


class ProbeSampling(Objective):
    """Probe sampling (Zhao et al. 2024, Algorithm 1): a cheap draft objective decides which candidates the
    target objective scores.

    For a batch of B candidates:

    1. the draft scores all B: L_d;
    2. the target scores a random probe set P, |P| = max(1, ⌊B / sampling_factor⌋): L_t(P);
    3. agreement α = (1 + ρ_Spearman(L_t(P), L_d(P))) / 2 ∈ [0, 1];
    4. the target also scores the k = max(1, ⌊(1 − α)·B / r⌋) candidates outside P with the lowest draft loss
       (at most B − |P|).

    The returned losses are the target losses of P and of those k candidates, and +inf for every other
    candidate, so the loop's arg-min (and I-GCG's merge, which skips non-finite losses) only ever picks a
    candidate the target scored; ``success`` is the target's where scored and False elsewhere. α of every
    call is appended to :attr:`alphas`. When ρ is undefined because one side is constant, α = 1/2 is used (no
    evidence either way). A batch whose probe set would hold fewer than two candidates
    (B < 2·``sampling_factor``: the loop's single evaluations, I-GCG's K − 1 merges) is scored by the target
    alone, exactly, and records no α.

    Gradients (:meth:`grad`, :meth:`embed_grad`), :meth:`rescore`, the templates and the re-tokenization
    check are the target's. :meth:`counters` adds the draft's work to the target's; the parts are in
    :meth:`target_counters` and :meth:`draft_counters`.

    The probe set is drawn from this objective's own generator (seeded by ``seed``); it is not part of a
    saved search result, so a resumed run draws different probe sets than an uninterrupted one.

    Args:
        target: the objective being optimised.
        draft: the same problem under a smaller model sharing the target's tokenizer (same slot length).
        r: the filtered-set divisor (paper: 8).
        sampling_factor: B / |P| (paper: 16).
        seed: seeds the probe-set generator.

    Raises:
        ValueError: slot lengths or vocabularies that differ, or r / sampling_factor < 1.

    Examples:
        >>> import tokensmith as ts
        >>> from tokensmith.models import Slot
        >>> from tokensmith.optimization.search import TargetLoss
        >>> ad, small = ts.tiny("llama"), ts.tiny("gpt2")
        >>> enc = ad.encode(["Say", Slot("s", " x x")], target=" ok")
        >>> obj = ProbeSampling(TargetLoss(ad, enc), TargetLoss(small, small.encode(**enc.recipe)))
        >>> ev = obj.evaluate(torch.randint(0, 1000, (32, obj.n)))
        >>> int(torch.isfinite(ev.loss).sum()) >= 3, len(obj.alphas)
        (True, 1)
    """

    name = "probe_sampling"

    def __init__(self, target: Objective, draft: Objective, r: float = 8, sampling_factor: float = 16, seed: int = 0):
        super().__init__()
        if not isinstance(target, Objective) or not isinstance(draft, Objective):
            raise TypeError("ProbeSampling wraps two Objectives (target, draft)")
        if draft.n != target.n:
            raise ValueError(f"the draft's slot has {draft.n} tokens, the target's {target.n}: encode the same example")
        if draft.adapter is not target.adapter and not draft.adapter.same_vocab(target.adapter):
            raise ValueError(
                "the draft model does not share the target's tokenizer, so it cannot score the same slot ids; pick a "
                "draft model of the same family (same vocabulary)"
            )
        if not r >= 1 or not sampling_factor >= 1:
            raise ValueError(f"r and sampling_factor must be >= 1, got r={r}, sampling_factor={sampling_factor}")
        self.target = target
        self.draft = draft
        self.r = float(r)
        self.sampling_factor = float(sampling_factor)
        self.generator = torch.Generator().manual_seed(int(seed))
        self.alphas: list[float] = []
        self.last_scored: torch.Tensor | None = None

    @property
    def adapter(self) -> ModelAdapter:
        return self.target.adapter

    @property
    def templates(self) -> list[SlotTemplate]:
        return self.target.templates

    @property
    def n(self) -> int:
        return self.target.n

    @property
    def init_ids(self) -> torch.Tensor:
        return self.target.init_ids

    def __repr__(self) -> str:
        return f"ProbeSampling(target={self.target!r}, draft={self.draft!r}, r={self.r:g}, sf={self.sampling_factor:g})"

    def sizes(self, B: int, alpha: float) -> tuple[int, int]:
        """(|P|, k) for B candidates at agreement α."""
        p = max(1, int(B // self.sampling_factor)) if B else 0
        k = max(1, int(math.floor((1.0 - alpha) * B / self.r)))
        return p, max(0, min(k, B - p))

    def evaluate(self, slot_ids: torch.Tensor, base: torch.Tensor | None = None) -> Evaluation:
        cand = torch.as_tensor(slot_ids, dtype=torch.long).reshape(-1, self.n)
        B = len(cand)
        if B == 0:
            return Evaluation(torch.zeros(0), torch.zeros(0, dtype=torch.bool))
        loss = torch.full((B,), float("inf"))
        success = torch.zeros(B, dtype=torch.bool)
        has_success = True
        p, _ = self.sizes(B, 0.0)
        if p < 2 or p >= B:  # ρ undefined on a probe set of one, or nothing to filter: the target scores all
            ev = self.target.evaluate(cand, base)
            self.last_scored = torch.arange(B)
            return ev
        d = self.draft.evaluate(cand, base).loss.float().cpu()
        probe = torch.randperm(B, generator=self.generator)[:p]
        ev_p = self.target.evaluate(cand[probe], base)
        loss[probe] = ev_p.loss.float().cpu()
        if ev_p.success is None:
            has_success = False
        else:
            success[probe] = ev_p.success.cpu()
        rho = spearman(loss[probe], d[probe])
        alpha = 0.5 if math.isnan(rho) else (1.0 + rho) / 2.0
        self.alphas.append(alpha)
        _, k = self.sizes(B, alpha)
        rest = torch.ones(B, dtype=torch.bool)
        rest[probe] = False
        idx = torch.nonzero(rest).flatten()
        pick = idx[torch.argsort(d[idx], stable=True)[:k]]
        if len(pick):
            ev_f = self.target.evaluate(cand[pick], base)
            loss[pick] = ev_f.loss.float().cpu()
            if ev_f.success is None:
                has_success = False
            else:
                success[pick] = ev_f.success.cpu()
        self.last_scored = torch.cat([probe, pick])
        return Evaluation(loss, success if has_success else None)

    def grad(self, slot_ids: torch.Tensor) -> torch.Tensor:
        return self.target.grad(slot_ids)

    def embed_grad(self, slot_ids: torch.Tensor) -> torch.Tensor:
        return self.target.embed_grad(slot_ids)

    def round_trips(self, slot_ids: torch.Tensor) -> torch.Tensor:
        return self.target.round_trips(slot_ids)

    def decode(self, slot_ids: torch.Tensor) -> str:
        return self.target.decode(slot_ids)

    def rescore(self, text: str) -> float:
        return self.target.rescore(text)

    def state_dict(self) -> dict:
        """The probe-set generator and the α history, so a resumed search draws the same probe sets."""
        from tokensmith.optimization.search.result import generator_state

        return {"generator": generator_state(self.generator), "alphas": list(self.alphas)}

    def load_state_dict(self, state: dict) -> None:
        from tokensmith.optimization.search.result import set_generator_state

        if state.get("generator"):
            set_generator_state(self.generator, state["generator"])
        self.alphas = list(state.get("alphas", self.alphas))

    def target_counters(self) -> dict[str, int]:
        return self.target.counters()

    def draft_counters(self) -> dict[str, int]:
        return self.draft.counters()

    def counters(self) -> dict[str, int]:
        t, d = self.target.counters(), self.draft.counters()
        return {k: t[k] + d[k] for k in t}
