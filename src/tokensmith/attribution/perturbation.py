"""Perturbation attributions: occlusion / leave-one-out and Shapley value sampling.

Every perturbed input is built from the token **ids** (a feature is deleted or replaced in the id
sequence; nothing is decoded and re-encoded) and every target row is scored from **one teacher-forced
``token_logprobs`` per perturbed sequence**, all perturbations of a call batched together (micro-batched
with ``batch_size=``). Features are tokens, words or segment spans of the source positions
(:func:`~tokensmith.attribution.result.token_groups`), or explicit lists of positions.

- occlusion / leave-one-out (ATT-9): ``s_tg = f_t(x) − f_t(x ∖ g)`` for each feature ``g``; the value is
  split equally over the feature's tokens (so aggregating by the same features gives it back);
- Shapley value sampling (ATT-10; Castro et al., 2009): ``φ_g = E_π[f(S_π,g ∪ {g}) − f(S_π,g)]`` over random
  feature orders ``π``, where ``S_π,g`` are the features before ``g`` and absent features are removed as
  for occlusion. Each permutation telescopes, so ``Σ_g φ_g = f(x) − f(x with every feature removed)``
  exactly (efficiency). The players are the features before the first scored token (one game serves all
  rows; a row's own token cannot be absent), so continuation tokens get no Shapley value.

Removal (``baseline``): ``"delete"`` (drop the tokens; later positions shift), ``"pad"``, ``"mask"`` (the
tokenizer's mask/unk token) or a token id (replace the tokens, length kept).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from tokensmith.attribution.base import AttributionMethod, MethodOutput, register_method
from tokensmith.attribution.progress import bar
from tokensmith.attribution.result import token_groups
from tokensmith.attribution.targets import AttributionProblem

__all__ = ["Occlusion", "ShapleySampling", "coalition_players", "feature_groups", "perturb", "removal_id"]


def feature_groups(problem: AttributionProblem, features: Any = "tokens") -> list[list[int]]:
    """Source positions grouped into features: ``"tokens"``, ``"words"``, ``"spans"`` or a list of position
    lists (each must hold source positions only)."""
    src = problem.sources.tolist()
    if isinstance(features, str):
        enc = problem.encoded
        gs = token_groups(features, enc.text, enc.offsets, enc.segments(), enc.special_mask.tolist())
        return [g for g in ([i for i in g if src[i]] for g in gs) if g]
    groups = [sorted({int(i) for i in g}) for g in features]
    bad = [i for g in groups for i in g if not 0 <= i < len(src) or not src[i]]
    if bad or not all(groups):
        raise ValueError(f"feature groups must be non-empty lists of source positions; not sources: {bad[:10]}")
    return groups


def coalition_players(problem: AttributionProblem, features: Any = "tokens") -> list[list[int]]:
    """The players of the one coalition game that serves every row (Shapley sampling, KernelSHAP, LIME).

    A feature holding a row's own token would leave that row undefined in every coalition without it, so the
    players are the :func:`feature_groups` that lie before the first scored token (for a continuation: its first
    token; for a :class:`~tokensmith.attribution.Contrast`: the end of the shared prompt).
    """
    groups = feature_groups(problem, features)
    limit = {"tokens": int(problem.target_positions.min()), "contrast": problem.shared}.get(problem.kind)
    if limit is not None:
        groups = [g for g in groups if max(g) < limit]
    if not groups:
        raise ValueError("no feature lies before the first target token: nothing to attribute")
    return groups


def removal_id(problem: AttributionProblem, baseline: Any) -> int | None:
    """The replacement token id for ``baseline`` (None for ``"delete"``)."""
    if baseline == "delete":
        return None
    tok = problem.adapter.tokenizer
    if baseline == "pad":
        return problem.adapter.pad_token_id
    if baseline == "mask":
        tid = getattr(tok, "mask_token_id", None)
        tid = tid if tid is not None else getattr(tok, "unk_token_id", None)
        if tid is None:
            raise ValueError("baseline='mask' needs a tokenizer with a mask or unk token; use 'pad' or 'delete'")
        return int(tid)
    if isinstance(baseline, int) and not isinstance(baseline, bool):
        return baseline
    raise ValueError(f"unknown removal baseline {baseline!r}; use 'delete', 'pad', 'mask' or a token id")


def perturb(ids: Sequence[int], removed: set[int], replace_with: int | None) -> tuple[list[int], list[int] | None]:
    """``(new ids, kept original positions or None)`` with positions ``removed`` deleted or replaced."""
    if replace_with is None:
        keep = [p for p in range(len(ids)) if p not in removed]
        return [ids[p] for p in keep], keep
    return [replace_with if p in removed else t for p, t in enumerate(ids)], None


SCORE_BLOCK = 128  # perturbed sequences per scoring call (bounded padding memory, one progress tick each)


def _score(problem: AttributionProblem, seqs: list[tuple[list[int], list[int] | None]]) -> torch.Tensor:
    """Row scores ``[N, R]`` of ``(ids, kept positions)`` pairs, in blocks of :data:`SCORE_BLOCK`."""
    out = []
    progress = bar(len(seqs), desc="perturbations", unit="seq")
    for s in range(0, len(seqs), SCORE_BLOCK):
        block = seqs[s : s + SCORE_BLOCK]
        rows = [r for r, _ in block]
        if all(k is None for _, k in block):
            out.append(problem.score_ids(rows))
        else:
            out.append(problem.score_ids(rows, [k if k is not None else list(range(len(r))) for r, k in block]))
        progress.update(len(block))
    progress.close()
    return torch.cat(out, 0)


@register_method("occlusion", "loo", "leave_one_out")
@dataclass
class Occlusion(AttributionMethod):
    """Occlusion / leave-one-out (ATT-9): ``s_tg = f_t(x) − f_t(x ∖ g)`` per feature ``g``.

    Args:
        features: ``"tokens"`` (default), ``"words"``, ``"spans"`` or explicit position lists.
        baseline: ``"delete"`` (default), ``"pad"``, ``"mask"`` or a token id.
    """

    features: Any = "tokens"
    baseline: Any = "delete"
    requires = ("token_logprobs",)

    def attribute_batch(self, problem: AttributionProblem) -> MethodOutput:
        groups = feature_groups(problem, self.features)
        rep = removal_id(problem, self.baseline)
        ids = problem.ids.tolist()
        seqs = [(ids, None if rep is not None else list(range(len(ids))))]
        seqs += [perturb(ids, set(g), rep) for g in groups]
        f = _score(problem, seqs)
        full, pert = f[0], f[1:]
        R, L = problem.n_rows, len(ids)
        scores = torch.zeros(R, L)
        measured = torch.zeros(R, L, dtype=torch.bool)
        for gi, g in enumerate(groups):
            eff = full - pert[gi]
            ok = torch.isfinite(eff)
            for i in g:
                scores[ok, i] = (eff[ok] / len(g)).float()
                measured[ok, i] = True
        return MethodOutput(scores, target_scores=full.float(), valid=measured,
                            extra={"groups": groups, "baseline": str(self.baseline)})


@register_method("shapley", "shapley_sampling")
@dataclass
class ShapleySampling(AttributionMethod):
    """Shapley value sampling (ATT-10): ``φ_g`` = mean marginal gain of adding feature ``g`` over random
    orders; ``Σ_g φ_tg = f_t(x) − f_t(∅)`` exactly for every row.

    Args:
        n_permutations: random feature orders (each costs ``#features`` forwards, batched).
        features: as for :class:`Occlusion`.
        baseline: ``"pad"`` (default), ``"mask"``, a token id or ``"delete"`` (the empty coalition then needs a
            token before the first feature, e.g. a BOS).
        seed: permutation seed (no global RNG is touched).
    """

    n_permutations: int = 8
    features: Any = "tokens"
    baseline: Any = "pad"
    seed: int | None = 0
    requires = ("token_logprobs",)
    stochastic = True

    def attribute_batch(self, problem: AttributionProblem) -> MethodOutput:
        if self.n_permutations < 1:
            raise ValueError("n_permutations must be >= 1")
        groups = coalition_players(problem, self.features)
        rep = removal_id(problem, self.baseline)
        ids = problem.ids.tolist()
        G = len(groups)
        gen = torch.Generator().manual_seed(0 if self.seed is None else self.seed)
        all_pos = {i for g in groups for i in g}
        seqs = [perturb(ids, set(), rep), perturb(ids, all_pos, rep)]  # full, empty
        orders = [torch.randperm(G, generator=gen).tolist() for _ in range(self.n_permutations)]
        for order in orders:
            present: set[int] = set()
            for gi in order[:-1]:  # the last step reaches the full input (already scored)
                present |= set(groups[gi])
                seqs.append(perturb(ids, all_pos - present, rep))
        f = _score(problem, seqs).double()
        if not torch.isfinite(f).all():
            raise ValueError(
                f"some coalitions cannot be scored with baseline={self.baseline!r}: removing every feature before a "
                "target token leaves nothing to predict it from (the model's tokenizer adds no BOS). Use a "
                "replacement baseline (baseline='pad', 'mask' or a token id)"
            )
        full, empty = f[0], f[1]
        R = problem.n_rows
        phi = torch.zeros(R, G, dtype=torch.float64)
        k = 2
        for order in orders:
            prev = empty
            for step, gi in enumerate(order):
                cur = full if step == G - 1 else f[k + step]
                phi[:, gi] += cur - prev
                prev = cur
            k += G - 1
        phi /= self.n_permutations
        scores = torch.zeros(R, len(ids), dtype=torch.float64)
        for gi, g in enumerate(groups):
            for i in g:
                scores[:, i] = phi[:, gi] / len(g)
        players = torch.zeros(len(ids), dtype=torch.bool)
        players[[i for g in groups for i in g]] = True
        ok = torch.isfinite(scores) & players[None, :]
        return MethodOutput(torch.where(ok, scores, torch.zeros_like(scores)).float(), target_scores=full.float(),
                            baseline_scores=empty.float(), valid=ok & problem.valid(),
                            extra={"groups": groups, "n_permutations": self.n_permutations})
