"""I-GCG: GCG with the automatic multi-coordinate merge (Jia et al. 2024; METHODS.md OPT-A3).

Reimplemented from the paper ("Improved Techniques for Optimization-Based Jailbreaking on Large Language
Models"); no code of the authors' repository is used.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from tokensmith.optimization.search.proposers import GCG, register_proposer

if TYPE_CHECKING:  # pragma: no cover
    from tokensmith.optimization.search.loop import SearchState
    from tokensmith.optimization.search.objectives import Evaluation

__all__ = ["IGCG", "merge_candidates"]

_CONFLICTS = ("skip", "override")


def merge_candidates(
    current: torch.Tensor,
    candidates: torch.Tensor,
    losses: torch.Tensor,
    max_merge: int = 7,
    conflict: str = "skip",
) -> tuple[torch.Tensor, list[int]]:
    """I-GCG's cumulative merge of the best single-swap candidates.

    Sort the candidates by loss, c_(1), c_(2), …, and let S_j be the swaps of c_(j) (the positions where it
    differs from ``current`` and its tokens there). Then

        m_1 = c_(1),   m_k = m_{k−1} ⊕ S_k   (k = 2..K),

    where ``⊕`` applies the swaps of S_k at positions that m_{k−1} has not changed yet (``conflict="skip"``,
    the best candidate's token wins) or at every position (``conflict="override"``, the later swap wins).
    Only m_k that differ from m_{k−1} are returned (m_1 is a candidate already, and a skipped swap leaves
    m_k = m_{k−1}). Non-finite losses (candidates an objective did not score) are not merged.

    Args:
        current: ``[n]`` the current ids.
        candidates: ``[B, n]`` the step's candidates (single swaps for I-GCG; multi-swap rows merge all their
            swaps).
        losses: ``[B]`` their losses.
        max_merge: K, the number of best candidates merged (K ≥ 2; K = 7 in the paper's code release).
        conflict: ``"skip"`` or ``"override"`` (see above).

    Returns:
        ``(merged [M, n], ks)``: the merged rows and, per row, the k of m_k (2 ≤ k ≤ K).

    Raises:
        ValueError: ``max_merge < 2`` or an unknown ``conflict``.

    Examples:
        >>> import torch
        >>> cur = torch.tensor([0, 0, 0])
        >>> cands = torch.tensor([[1, 0, 0], [0, 2, 0], [0, 0, 3]])
        >>> m, ks = merge_candidates(cur, cands, torch.tensor([0.3, 0.1, 0.2]), max_merge=3)
        >>> m.tolist(), ks
        ([[0, 2, 3], [1, 2, 3]], [2, 3])
    """
    if int(max_merge) < 2:
        raise ValueError(f"max_merge (K) must be >= 2 (m_1 is the best candidate itself), got {max_merge}")
    if conflict not in _CONFLICTS:
        raise ValueError(f"conflict must be one of {_CONFLICTS}, got {conflict!r}")
    current = torch.as_tensor(current, dtype=torch.long).reshape(-1)
    candidates = torch.as_tensor(candidates, dtype=torch.long).reshape(-1, current.shape[0])
    losses = torch.as_tensor(losses).reshape(-1).float().cpu()
    finite = torch.nonzero(torch.isfinite(losses)).flatten()
    order = finite[torch.argsort(losses[finite], stable=True)][: int(max_merge)]
    out: list[torch.Tensor] = []
    ks: list[int] = []
    if len(order) < 2:
        return torch.zeros(0, current.shape[0], dtype=torch.long), ks
    merged = candidates[order[0]].clone()
    changed = merged != current
    for k, j in enumerate(order[1:].tolist(), start=2):
        row = candidates[j]
        swap = row != current
        if conflict == "skip":
            swap &= ~changed
        before = merged.clone()
        merged[swap] = row[swap]
        changed |= swap
        if not torch.equal(before, merged):
            out.append(merged.clone())
            ks.append(k)
    if not out:
        return torch.zeros(0, current.shape[0], dtype=torch.long), ks
    return torch.stack(out), ks


@register_proposer("igcg")
@dataclass
class IGCG(GCG):
    """I-GCG (Jia et al. 2024): GCG whose single-swap candidates are merged automatically.

    Each step proposes GCG candidates (``n_replace=1``, B = ``search_width``), the loop scores them, then
    :meth:`refine` returns the cumulative merges m_k = m_{k−1} ⊕ S_k of the K best candidates
    (:func:`merge_candidates`); the loop scores those too and the lowest loss over all B + K − 1 candidates
    becomes the current suffix. The number of coordinates changed per step therefore adapts: as many as the
    best merge uses, one when no merge beats the best single swap.

    The paper's other two improvements are usage patterns, not proposer options: the target template
    ``"Sure, my output is harmful. Here is ..."`` (pass it as the encoding's target) and the easy-to-hard
    initialisation (run I-GCG on an easy behaviour first, then start the hard one from that suffix:
    ``search(ad, Problem(enc_hard, init=res_easy.best_ids), "igcg")``).

    Args:
        search_width: single-swap candidates per step (B; 256 in the paper).
        topk: tokens kept per position (k).
        n_replace: positions per first-round candidate (1 for I-GCG; an int or ``"decay"`` still works).
        decay_every: steps per epoch of the ``"decay"`` schedule.
        positions: ``"random"`` or ``"spread"``.
        max_merge: K, the number of best candidates merged (default 7).
        conflict: a later candidate's swap at a position an earlier (better) one already changed is
            ``"skip"``-ped (default; the better token wins) or ``"override"``-s it.

    Examples:
        >>> import tokensmith as ts
        >>> from tokensmith.models import Slot
        >>> from tokensmith.optimization.search import search
        >>> ad = ts.tiny("llama")
        >>> enc = ad.encode(["Say", Slot("suffix", " x x x x")], target=" ok")
        >>> res = search(ad, enc, "igcg", steps=2, search_width=8, topk=4, max_merge=3, progress=False)
        >>> res.best_loss <= res.init_loss
        True
    """

    search_width: int = 256
    n_replace: int | str = 1
    max_merge: int = 7
    conflict: str = "skip"

    def setup(self, state: SearchState) -> None:
        super().setup(state)
        if int(self.max_merge) < 2:
            raise ValueError(f"max_merge (K) must be >= 2, got {self.max_merge}; use method='gcg' for no merge")
        if self.conflict not in _CONFLICTS:
            raise ValueError(f"conflict must be one of {_CONFLICTS}, got {self.conflict!r}")

    def refine(self, state: SearchState, candidates: torch.Tensor, evaluation: Evaluation) -> torch.Tensor | None:
        merged, _ = merge_candidates(state.current, candidates, evaluation.loss, self.max_merge, self.conflict)
        return merged if len(merged) else None
