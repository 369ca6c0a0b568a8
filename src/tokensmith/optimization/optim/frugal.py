"""FRUGAL: full-rank updates with gradient splitting (Zmushko et al. 2025, ICML)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.optim import Optimizer

from tokensmith.optimization.optim.galore import GaLoreProjector
from tokensmith.optimization.optim.lion import (
    Params,
    _check_betas,
    _check_lr,
    _check_nonneg,
    _closure_loss,
    _dense_grad,
)

__all__ = ["FRUGAL"]

_STATE_FREE = ("signsgd", "sgd")


class FRUGAL(Optimizer):
    r"""FRUGAL, Zmushko et al. 2025, "FRUGAL: Memory-Efficient Optimization by Reducing State Overhead for Scalable Training".

    Each 2-D parameter's gradient :math:`G` is split by a low-rank projector (:class:`GaLoreProjector`, rank
    :math:`r = \max(1, \mathrm{round}(\rho\,\min(m, n)))` for the density :math:`\rho`, or ``rank``) into a
    state-full part, updated by Adam in the subspace, and the state-free residual, updated by signSGD (or SGD):

    .. math::

        R &= P^\top G, \quad G_{free} = G - P P^\top G \\
        M &\leftarrow \beta_1 M + (1-\beta_1) R, \quad V \leftarrow \beta_2 V + (1-\beta_2) R^2, \quad
        N = \frac{M/(1-\beta_1^k)}{\sqrt{V/(1-\beta_2^k)}+\epsilon} \\
        W &\leftarrow W(1-\eta\lambda) - \eta\, P N - \eta\,s_{free}\,\operatorname{sign}(G_{free})

    (right projection: :math:`R = GQ`, :math:`G_{free} = G - GQQ^\top`, :math:`NQ^\top`). The step is full-rank,
    the state is :math:`r \times \max(m, n)`. Every ``update_gap`` steps the basis is recomputed; with
    ``reset_state=True`` (default; verify against the paper's code) :math:`M, V` are zeroed then and the bias
    correction restarts (:math:`k` counts the steps since the last refresh), since the old moments live in the
    old basis. :math:`s_{free}` (``inactive_lr_scale``): the paper uses 1.0 for pre-training, 0.1 for
    fine-tuning. Other parameters (1-D, or groups with ``density=None`` and ``rank=None``) get plain AdamW.

    Args:
        params: parameters or parameter groups; group keys override the options below.
        lr: learning rate :math:`\eta`.
        betas: Adam's :math:`(\beta_1, \beta_2)` for the state-full part.
        eps: :math:`\epsilon`.
        weight_decay: decoupled weight decay :math:`\lambda`.
        density: :math:`\rho`, the state-full fraction of each 2-D parameter's smaller side.
        rank: explicit rank :math:`r` (overrides ``density``).
        update_gap: steps between basis recomputations.
        proj_type: ``"std"``, ``"left"`` or ``"right"`` (see :class:`GaLoreProjector`).
        svd: ``"full"`` or ``"randomized"``.
        state_free: ``"signsgd"`` or ``"sgd"`` for the residual.
        inactive_lr_scale: :math:`s_{free}`.
        reset_state: zero the Adam state at each basis refresh.
        seed: seed of the randomized SVD.

    Examples:
        >>> import torch
        >>> W = torch.nn.Parameter(torch.zeros(4, 6))
        >>> opt = FRUGAL([W], lr=0.01, rank=1)
        >>> W.grad = torch.randn(4, 6, generator=torch.Generator().manual_seed(0)); _ = opt.step()
        >>> tuple(opt.state[W]["exp_avg"].shape), int(torch.linalg.matrix_rank(W.detach())) > 1  # full-rank step
        ((1, 6), True)
    """

    def __init__(self, params: Params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, density: float | None = 0.25,
                 rank: int | None = None, update_gap: int = 200, proj_type: str = "std", svd: str = "full",
                 state_free: str = "signsgd", inactive_lr_scale: float = 1.0, reset_state: bool = True,
                 seed: int = 0) -> None:
        _check_lr(lr)
        betas = _check_betas(betas, 2)
        _check_nonneg("eps", eps)
        _check_nonneg("weight_decay", weight_decay)
        _check_nonneg("inactive_lr_scale", inactive_lr_scale)
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay, "density": density,
                    "rank": rank, "update_gap": update_gap, "proj_type": proj_type, "svd": svd,
                    "state_free": state_free, "inactive_lr_scale": inactive_lr_scale, "reset_state": reset_state,
                    "seed": seed}
        super().__init__(params, defaults)
        for group in self.param_groups:
            if group["state_free"] not in _STATE_FREE:
                raise ValueError(f"state_free must be one of {_STATE_FREE}, got {group['state_free']!r}")
            d = group["density"]
            if d is not None and not (isinstance(d, (int, float)) and 0.0 < d <= 1.0):
                raise ValueError(f"density must be in (0, 1] or None, got {d!r}")
            self._projector(group, (2, 2))  # validates rank, update_gap, proj_type, svd

    @staticmethod
    def _projector(group: dict[str, Any], shape: tuple[int, ...]) -> GaLoreProjector | None:
        if group["rank"] is not None:
            r = group["rank"]
        elif group["density"] is not None:
            r = max(1, round(group["density"] * min(shape)))
        else:
            return None
        return GaLoreProjector(r, group["update_gap"], 1.0, group["proj_type"], group["svd"], seed=group["seed"])

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One optimisation step; ``closure`` (optional) re-evaluates the model and returns the loss."""
        loss = _closure_loss(closure)
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = _dense_grad(p, "FRUGAL")
                state = self.state[p]
                if "step" not in state:
                    state["step"] = 0
                    state["k"] = 0  # steps since the Adam state was (re)started
                state["step"] += 1
                t = state["step"]
                proj = self._projector(group, tuple(p.shape)) if p.dim() == 2 else None
                if proj is not None:
                    refresh = "galore_P" not in state or (t - 1) % proj.update_gap == 0
                    r = proj.project(g, state, t)
                    if refresh and group["reset_state"] and "exp_avg" in state:
                        state["exp_avg"].zero_()
                        state["exp_avg_sq"].zero_()
                        state["k"] = 0
                else:
                    r = g
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros_like(r, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(r, memory_format=torch.preserve_format)
                state["k"] += 1
                k = state["k"]
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.mul_(beta1).add_(r, alpha=1.0 - beta1)
                v.mul_(beta2).addcmul_(r, r, value=1.0 - beta2)
                denom = (v / (1.0 - beta2 ** k)).sqrt_().add_(eps)
                if wd != 0.0:
                    p.mul_(1.0 - lr * wd)
                if proj is None:
                    p.addcdiv_(m, denom, value=-lr / (1.0 - beta1 ** k))
                    continue
                full = proj.project_back((m / (1.0 - beta1 ** k)).div_(denom), state)
                free = g - proj.project_back(r, state)  # G - P P^T G (scale 1)
                if group["state_free"] == "signsgd":
                    free.sign_()
                p.add_(full, alpha=-lr).add_(free, alpha=-lr * group["inactive_lr_scale"])
        return loss
