"""Lion: evolved sign momentum (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms").

Shared validation helpers for the optimizers of this package live here too (``_check_*``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim import Optimizer

__all__ = ["Lion"]

Params = Iterable[torch.Tensor] | Iterable[dict[str, Any]]


# ------------------------------------------------------------------------------------------- shared checks
def _check_lr(lr: float) -> None:
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not lr >= 0.0:
        raise ValueError(f"lr must be a float >= 0, got {lr!r}")


def _check_beta(name: str, beta: float) -> None:
    if not isinstance(beta, (int, float)) or not 0.0 <= beta < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {beta!r}")


def _check_nonneg(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or not value >= 0.0:
        raise ValueError(f"{name} must be a float >= 0, got {value!r}")


def _check_betas(betas: Any, n: int) -> tuple[float, ...]:
    try:
        betas = tuple(float(b) for b in betas)
    except TypeError:
        raise ValueError(f"betas must be a tuple of {n} floats in [0, 1), got {betas!r}") from None
    if len(betas) != n:
        raise ValueError(f"betas must be a tuple of {n} floats in [0, 1), got {len(betas)} values: {betas!r}")
    for i, b in enumerate(betas):
        _check_beta(f"betas[{i}]", b)
    return betas


def _dense_grad(p: torch.Tensor, who: str) -> torch.Tensor:
    g = p.grad
    if g.is_sparse:
        raise TypeError(f"{who} does not support sparse gradients; use torch.optim.SparseAdam for sparse "
                        "embeddings or pass sparse=False to the embedding")
    if torch.is_complex(p):
        raise TypeError(f"{who} does not support complex parameters; view them as real with torch.view_as_real")
    return g


def _closure_loss(closure: Callable[[], Any] | None) -> Any:
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def _lion_update(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, lr: float, beta1: float, beta2: float,
                 weight_decay: float) -> None:
    """One in-place Lion step on ``p`` with gradient ``g`` and momentum ``m`` (see :class:`Lion`)."""
    if weight_decay != 0.0:
        p.mul_(1.0 - lr * weight_decay)
    c = m.mul(beta1).add_(g, alpha=1.0 - beta1)
    p.add_(c.sign_(), alpha=-lr)
    m.mul_(beta2).add_(g, alpha=1.0 - beta2)


# ------------------------------------------------------------------------------------------------- Lion
class Lion(Optimizer):
    r"""Lion (EvoLved Sign Momentum), Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms".

    Per parameter, with gradient :math:`g_t`, momentum :math:`m` (zero-initialised):

    .. math::

        c_t &= \beta_1 m_{t-1} + (1-\beta_1) g_t \\
        \theta_t &= \theta_{t-1} - \eta\,(\operatorname{sign}(c_t) + \lambda\,\theta_{t-1}) \\
        m_t &= \beta_2 m_{t-1} + (1-\beta_2) g_t

    The update has the same magnitude :math:`\eta` in every coordinate, so the paper recommends an lr
    3-10x smaller than AdamW's and a weight decay :math:`\lambda` 3-10x larger (same effective decay
    :math:`\eta\lambda`). One state tensor per parameter (half of Adam's).

    Args:
        params: parameters or parameter groups (dicts with ``params`` and any of the options below).
        lr: learning rate :math:`\eta`.
        betas: :math:`(\beta_1, \beta_2)`: interpolation for the update direction, momentum decay.
        weight_decay: decoupled weight decay :math:`\lambda` (multiplied by ``lr``).

    Examples:
        >>> import torch
        >>> w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
        >>> opt = Lion([w], lr=0.1)
        >>> w.grad = torch.tensor([0.5, -0.1]); _ = opt.step()
        >>> w.detach()
        tensor([ 0.9000, -1.9000])
    """

    def __init__(self, params: Params, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0) -> None:
        _check_lr(lr)
        betas = _check_betas(betas, 2)
        _check_nonneg("weight_decay", weight_decay)
        super().__init__(params, {"lr": lr, "betas": betas, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One optimisation step; ``closure`` (optional) re-evaluates the model and returns the loss."""
        loss = _closure_loss(closure)
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = _dense_grad(p, "Lion")
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                _lion_update(p, g, state["exp_avg"], group["lr"], beta1, beta2, group["weight_decay"])
        return loss
