"""PEZ: hard prompts by projected gradient descent (Wen et al. 2023, Algorithm 1; METHODS.md OPT-A8).

Reimplemented from the paper ("Hard Prompts Made Easy: Gradient-Based Discrete Optimization for Prompt
Tuning and Discovery").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from tokensmith.optimization.search.proposers import Proposer, register_proposer

if TYPE_CHECKING:  # pragma: no cover
    from tokensmith.optimization.search.loop import SearchState

__all__ = ["PEZ"]

_INITS = ("current", "random")


@register_proposer("pez")
@dataclass
class PEZ(Proposer):
    """PEZ (Wen et al. 2023): a continuous prompt P ∈ ℝ^{n×d} optimised through its projection.

    Each step t:

        P′_t = Proj_E(P_t)   (per row, the cosine-nearest allowed embedding row: ``adapter.nearest_tokens``)
        g_t  = ∇_{P′} L(P′_t)   (``objective.embed_grad`` at the projected ids: straight-through)
        P_{t+1} = AdamW(P_t, g_t)   (``torch.optim.AdamW`` on the leaf P, lr, weight decay)

    and the step's one candidate is the projection of the *updated* prompt, ids_{t+1} = Proj_E(P_{t+1})
    (``[1, n]``). The loop scores it exactly, so the history's ``loss`` is always the loss of a projected
    (discrete) prompt, never of the continuous P, and ``best_ids``/``best_loss`` are the best projected prompt
    seen (the paper's "keep the best"). The next step's gradient is taken at that same projection, so the
    sequence of gradients is Algorithm 1's whatever ``buffer_size`` the loop uses. A step whose projection
    is unchanged (it equals the current ids) is dropped by the loop's deduplication and recorded with
    ``n_candidates=0``; P still moved, so later steps continue.

    The continuous state (P and AdamW's moments and step count) is saved with the result
    (:meth:`state_dict`, as lists of floats that JSON round-trips exactly), so ``search(..., resume=res)``
    continues exactly as an uninterrupted run.

    Args:
        lr: AdamW learning rate γ (paper: 0.1).
        weight_decay: AdamW weight decay (paper: 0.1).
        init: ``"current"`` (P_0 = the embedding rows of the initial slot ids) or ``"random"`` (rows of
            allowed tokens drawn uniformly from the search's generator).

    Examples:
        >>> import tokensmith as ts
        >>> from tokensmith.models import Slot
        >>> from tokensmith.optimization.search import search
        >>> ad = ts.tiny("llama")
        >>> enc = ad.encode(["Say", Slot("p", " x x x")], target=" ok")
        >>> res = search(ad, enc, "pez", steps=3, progress=False)
        >>> res.best_loss <= res.init_loss
        True
    """

    lr: float = 0.1
    weight_decay: float = 0.1
    init: str = "current"
    needs_grad = False  # PEZ reads objective.embed_grad itself, not the one-hot gradient
    resample = False  # one deterministic candidate per step

    def __post_init__(self) -> None:
        self.P: torch.Tensor | None = None
        self.optimizer: torch.optim.AdamW | None = None
        self._loaded: dict[str, Any] | None = None

    # ---- setup and state
    def setup(self, state: SearchState) -> None:
        if self.init not in _INITS:
            raise ValueError(f"init must be one of {_INITS}, got {self.init!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if int(state.allowed.sum()) < 1:
            raise ValueError("the constraints leave no allowed token")
        E = state.adapter.E.detach()
        if self.init == "current":
            P0 = E[state.current.to(E.device)].float().cpu()
        else:
            ids = torch.nonzero(state.allowed).flatten()
            pick = ids[torch.randint(0, len(ids), (state.n,), generator=state.generator)]
            P0 = E[pick.to(E.device)].float().cpu()
        self.P = P0.clone().to(E.device).requires_grad_(True)
        self.optimizer = torch.optim.AdamW([self.P], lr=float(self.lr), weight_decay=float(self.weight_decay))
        if self._loaded is not None:  # state loaded before setup(): apply it now
            loaded, self._loaded = self._loaded, None
            self._apply(loaded)

    def _apply(self, saved: dict[str, Any]) -> None:
        """Put a saved P and AdamW state into the (already built) prompt and optimizer."""
        assert self.P is not None and self.optimizer is not None
        P = torch.tensor(saved["P"], dtype=torch.float32)
        if tuple(P.shape) != tuple(self.P.shape):
            raise ValueError(f"the saved PEZ prompt is {tuple(P.shape)}; this problem needs {tuple(self.P.shape)}")
        with torch.no_grad():
            self.P.copy_(P.to(self.P.device))
        sd = self.optimizer.state_dict()
        a = saved.get("adam")
        sd["state"] = {} if not a else {
            0: {
                "step": torch.tensor(float(a["step"])),
                "exp_avg": torch.tensor(a["exp_avg"], dtype=torch.float32, device=self.P.device),
                "exp_avg_sq": torch.tensor(a["exp_avg_sq"], dtype=torch.float32, device=self.P.device),
            }
        }
        self.optimizer.load_state_dict(sd)

    def state_dict(self) -> dict[str, Any]:
        if self.P is None or self.optimizer is None:
            return {}
        st = self.optimizer.state.get(self.P, {})
        adam = None
        if st:
            adam = {
                "step": float(st["step"]),
                "exp_avg": st["exp_avg"].detach().cpu().tolist(),
                "exp_avg_sq": st["exp_avg_sq"].detach().cpu().tolist(),
            }
        return {"P": self.P.detach().cpu().tolist(), "adam": adam}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore P and AdamW's state, before or after :meth:`setup` (applied when the prompt exists)."""
        if not state:
            return
        if self.P is None:
            self._loaded = dict(state)
        else:
            self._apply(state)

    # ---- the step
    def project(self, state: SearchState) -> torch.Tensor:
        """``[n]`` ids: Proj_E(P), the cosine-nearest allowed rows."""
        assert self.P is not None
        return state.adapter.nearest_tokens(self.P.detach(), state.allowed).cpu().to(torch.long)

    def propose(self, state: SearchState) -> torch.Tensor:
        if self.P is None or self.optimizer is None:
            raise RuntimeError("PEZ.setup was not called (run it through search())")
        ids = self.project(state)
        g = state.objective.embed_grad(ids)
        if not torch.isfinite(g).all():
            raise ValueError("the objective's embedding gradient is NaN or inf at the projected prompt")
        self.optimizer.zero_grad(set_to_none=True)
        self.P.grad = g.detach().to(self.P.device, torch.float32).reshape(self.P.shape)
        self.optimizer.step()
        return self.project(state)[None]
