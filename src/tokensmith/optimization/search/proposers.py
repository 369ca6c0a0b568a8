"""Proposers: where the next candidates come from (METHODS.md OPT-A1, OPT-A2).

A :class:`Proposer` turns the search state into candidate slot ids ``[B, n]``; the loop filters,
evaluates and selects. Subclass it, override :meth:`Proposer.propose`, and register a name with
:func:`register_proposer` so ``method="my_method"`` works in :func:`~tokensmith.optimization.search`.
Optional hooks: :meth:`Proposer.setup` (validate once), :meth:`Proposer.refine` (a second round of
candidates built from the first round's losses, e.g. I-GCG's merge) and :meth:`Proposer.observe`
(feedback after selection, e.g. PEZ's continuous update).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # pragma: no cover
    from tokensmith.optimization.search.loop import SearchState
    from tokensmith.optimization.search.objectives import Evaluation

__all__ = [
    "Proposer",
    "GCG",
    "RandomSearch",
    "register_proposer",
    "get_proposer",
    "available_proposers",
    "sample_swaps",
    "dedupe",
    "n_replace_at",
]

_PROPOSERS: dict[str, type[Proposer]] = {}


def register_proposer(name: str) -> Callable[[type[Proposer]], type[Proposer]]:
    """Class decorator registering a :class:`Proposer` under ``name``."""

    def deco(cls: type[Proposer]) -> type[Proposer]:
        cls.name = name
        _PROPOSERS[name] = cls
        return cls

    return deco


def get_proposer(method: str | Proposer, **kwargs: Any) -> Proposer:
    """A proposer instance from a registered name (keyword arguments are its fields) or an instance."""
    if isinstance(method, Proposer):
        if kwargs:
            raise ValueError(f"method is already a Proposer instance; unexpected options {sorted(kwargs)}")
        return method
    if not isinstance(method, str) or method not in _PROPOSERS:
        raise ValueError(f"unknown method {method!r}; registered: {available_proposers()}")
    cls = _PROPOSERS[method]
    names = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    bad = set(kwargs) - names
    if bad:
        raise TypeError(f"{cls.__name__} has no option(s) {sorted(bad)}; its options are {sorted(names)}")
    return cls(**kwargs)


def available_proposers() -> list[str]:
    return sorted(_PROPOSERS)


class Proposer:
    """Base class of search methods: override :meth:`propose`.

    Attributes:
        name: registry name.
        needs_grad: whether :meth:`propose` reads ``state.grad()`` (the loop counts the backward).
        resample: whether the loop may call :meth:`propose` again in a step when the re-tokenization filter
            drops more than half the candidates (False for one-candidate proposers such as PEZ and HotFlip).
    """

    name = "proposer"
    needs_grad = True
    resample = True

    def setup(self, state: SearchState) -> None:
        """Validate against the problem once, before the first step (raise ValueError on bad settings)."""

    def propose(self, state: SearchState) -> torch.Tensor:
        """Candidate slot ids ``[B, n]`` (long) for this step."""
        raise NotImplementedError

    def refine(self, state: SearchState, candidates: torch.Tensor, evaluation: Evaluation) -> torch.Tensor | None:
        """Optional second round of candidates from the first round's losses (None: none)."""
        return None

    def observe(self, state: SearchState, candidates: torch.Tensor, evaluation: Evaluation) -> None:
        """Optional feedback after the step's selection."""

    def select(self, state: SearchState, candidates: torch.Tensor, evaluation: Evaluation) -> int:
        """Index of the candidate that becomes the current slot (default: the lowest loss)."""
        return int(torch.argmin(evaluation.loss))

    def state_dict(self) -> dict[str, Any]:
        """State to save with a result so that a resumed run continues exactly (default: none)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""

    def config(self) -> dict[str, Any]:
        if dataclasses.is_dataclass(self):
            return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {}


def dedupe(candidates: torch.Tensor, current: torch.Tensor | None = None) -> torch.Tensor:
    """Unique rows of ``candidates`` in first-seen order, without rows equal to ``current``."""
    if candidates.numel() == 0:
        return candidates
    seen: set[tuple[int, ...]] = set()
    cur = tuple(current.tolist()) if current is not None else None
    keep = []
    for i, row in enumerate(candidates.tolist()):
        t = tuple(row)
        if t in seen or t == cur:
            continue
        seen.add(t)
        keep.append(i)
    return candidates[keep]


def n_replace_at(n_replace: int | str, n: int, step: int, decay_every: int, floor: int = 2) -> int:
    """Coordinates changed per candidate at ``step``: a fixed int, or ``"decay"``: the multi-coordinate
    schedule c = max(⌊n / 2^(e+1)⌋, floor) with epoch e = ⌊step / decay_every⌋ (ACG; Joint-GCG's MCG)."""
    if n_replace == "decay":
        e = step // max(1, decay_every)
        return int(max(min(floor, n), min(n, n // (2 ** (e + 1)))))
    k = int(n_replace)
    if not 1 <= k <= n:
        raise ValueError(f"n_replace must be in [1, {n}] (the slot's length) or 'decay', got {n_replace!r}")
    return k


def sample_swaps(
    current: torch.Tensor,
    pool: torch.Tensor,
    width: int,
    n_replace: int,
    generator: torch.Generator,
    positions: str = "random",
) -> torch.Tensor:
    """``width`` candidates, each replacing ``n_replace`` positions of ``current`` with draws from ``pool``.

    Args:
        current: ``[n]`` ids.
        pool: ``[n, k]`` candidate ids per position (e.g. the top-k of the negative gradient).
        width: number of candidates B.
        n_replace: positions changed per candidate.
        generator: the only source of randomness.
        positions: ``"random"`` (n_replace distinct positions drawn per candidate, nanoGCG) or ``"spread"``
            (candidate b changes positions starting at ⌊b·n/B⌋, evenly spread; GCG's original code).
    """
    n, k = pool.shape
    B = int(width)
    if positions == "spread":
        startp = (torch.arange(B) * n // B) % n
        pos = (startp[:, None] + torch.arange(n_replace)[None]) % n
    elif positions == "random":
        pos = torch.rand(B, n, generator=generator).argsort(1)[:, :n_replace]
    else:
        raise ValueError(f"positions must be 'random' or 'spread', got {positions!r}")
    pick = torch.randint(0, k, (B, n_replace), generator=generator)
    new_tok = pool[pos, pick]
    out = current[None].repeat(B, 1)
    out.scatter_(1, pos, new_tok)
    return out


@register_proposer("gcg")
@dataclass
class GCG(Proposer):
    """Greedy Coordinate Gradient (Zou et al. 2023, Algorithm 1; METHODS.md OPT-A1, OPT-A2).

    G = ∇_onehot L ∈ ℝ^{n×V};  X_i = TopK_v(−G_{i,v}) over allowed tokens v ≠ z_i;
    each of B candidates replaces ``n_replace`` positions i with a uniform draw from X_i.

    Args:
        search_width: candidates per step (B).
        topk: tokens kept per position (k).
        n_replace: positions per candidate: an int, or ``"decay"`` (see :func:`n_replace_at`).
        decay_every: steps per epoch of the ``"decay"`` schedule.
        positions: ``"random"`` or ``"spread"`` (see :func:`sample_swaps`).
    """

    search_width: int = 512
    topk: int = 256
    n_replace: int | str = 1
    decay_every: int = 10
    positions: str = "random"

    def setup(self, state: SearchState) -> None:
        if self.search_width < 1 or self.topk < 1:
            raise ValueError("search_width and topk must be >= 1")
        n_allowed = int(state.allowed.sum())
        if n_allowed < self.topk:
            raise ValueError(
                f"the constraints leave {n_allowed} allowed tokens, fewer than topk={self.topk}: lower topk or relax "
                "the constraints (ascii_only, blocklist, mask)"
            )
        n_replace_at(self.n_replace, state.n, 0, self.decay_every)

    def top_tokens(self, state: SearchState) -> torch.Tensor:
        """``[n, k]``: per position, the k allowed tokens with the most negative gradient (not the current)."""
        g = state.grad().clone().cpu().float()
        g[:, ~state.allowed] = float("inf")
        g[torch.arange(state.n), state.current] = float("inf")
        return (-g).topk(self.topk, dim=1).indices

    def propose(self, state: SearchState) -> torch.Tensor:
        pool = self.top_tokens(state)
        k = n_replace_at(self.n_replace, state.n, state.step, self.decay_every)
        return sample_swaps(state.current, pool, self.search_width, k, state.generator, self.positions)


@register_proposer("random")
@dataclass
class RandomSearch(Proposer):
    """Random search (Andriushchenko et al. 2024; ACG's baseline; METHODS.md OPT-A2): candidates replace
    ``n_replace`` positions with tokens drawn uniformly from the allowed set; no gradient.

    Args:
        search_width: candidates per step.
        n_replace: positions per candidate (int or ``"decay"``).
        decay_every: steps per epoch of the ``"decay"`` schedule.
    """

    search_width: int = 128
    n_replace: int | str = 1
    decay_every: int = 10
    needs_grad = False

    def setup(self, state: SearchState) -> None:
        if int(state.allowed.sum()) < 1:
            raise ValueError("the constraints leave no allowed token")
        n_replace_at(self.n_replace, state.n, 0, self.decay_every)

    def propose(self, state: SearchState) -> torch.Tensor:
        ids = torch.nonzero(state.allowed).flatten()
        pool_idx = torch.randint(0, len(ids), (state.n, min(len(ids), 4096)), generator=state.generator)
        pool = ids[pool_idx]
        k = n_replace_at(self.n_replace, state.n, state.step, self.decay_every)
        return sample_swaps(state.current, pool, self.search_width, k, state.generator)
