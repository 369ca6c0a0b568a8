"""AdEMAMix: Adam with a mixture of a fast and a slow EMA (Pagliardini, Ablin, Grangier 2024)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch.optim import Optimizer

from tokensmith.optimization.optim.lion import (
    Params,
    _check_betas,
    _check_lr,
    _check_nonneg,
    _closure_loss,
    _dense_grad,
)

__all__ = ["AdEMAMix", "ademamix_alpha", "ademamix_beta3"]


def ademamix_alpha(step: int, alpha: float, t_warmup: int | None) -> float:
    r"""The paper's linear :math:`\alpha` warm-up: :math:`\alpha(t) = \min(t\,\alpha / T_\alpha,\ \alpha)`.

    Args:
        step: the 1-based step :math:`t`.
        alpha: the final mixing coefficient :math:`\alpha`.
        t_warmup: :math:`T_\alpha`; ``None`` or 0 means no warm-up (:math:`\alpha` from the first step).

    Examples:
        >>> ademamix_alpha(5, 8.0, 10), ademamix_alpha(20, 8.0, 10), ademamix_alpha(1, 8.0, None)
        (4.0, 8.0, 8.0)
    """
    if not t_warmup:
        return float(alpha)
    return min(step * alpha / t_warmup, alpha)


def ademamix_beta3(step: int, beta1: float, beta3: float, t_warmup: int | None) -> float:
    r"""The paper's :math:`\beta_3` warm-up, linear in the EMA's half-life, from :math:`\beta_1` to :math:`\beta_3`.

    With :math:`\tau = t / T_{\beta_3}`:

    .. math::

        \beta_3(t) = \min\Big(\exp\Big(\frac{\ln\beta_1\,\ln\beta_3}
                     {(1-\tau)\ln\beta_3 + \tau\ln\beta_1}\Big),\ \beta_3\Big),

    i.e. :math:`1/\ln\beta_3(t)` (proportional to the half-life :math:`t_{1/2} = \ln\tfrac12/\ln\beta`) moves
    linearly from :math:`1/\ln\beta_1` to :math:`1/\ln\beta_3`. A linear schedule on :math:`\beta_3` itself
    would keep the half-life short for almost the whole warm-up.

    Args:
        step: the 1-based step :math:`t`.
        beta1: the start value (the fast EMA's :math:`\beta_1`), in (0, 1).
        beta3: the final value :math:`\beta_3`, in [``beta1``, 1).
        t_warmup: :math:`T_{\beta_3}`; ``None`` or 0 means no warm-up.

    Examples:
        >>> round(ademamix_beta3(0, 0.9, 0.999, 100), 6), ademamix_beta3(100, 0.9, 0.999, 100)
        (0.9, 0.999)
    """
    if not t_warmup:
        return float(beta3)
    tau = min(step / t_warmup, 1.0)
    lb1, lb3 = math.log(beta1), math.log(beta3)
    return min(math.exp(lb1 * lb3 / ((1.0 - tau) * lb3 + tau * lb1)), beta3)


class AdEMAMix(Optimizer):
    r"""AdEMAMix, Pagliardini, Ablin & Grangier 2024, "The AdEMAMix Optimizer: Better, Faster, Older".

    Adam's fast moment :math:`m_1` and second moment :math:`\nu` (bias-corrected) plus a slow EMA
    :math:`m_2` of the gradient with :math:`\beta_3 \approx 0.9999` that is **not** bias-corrected:

    .. math::

        m_1 &\leftarrow \beta_1 m_1 + (1-\beta_1) g_t, \quad
        m_2 \leftarrow \beta_3(t)\, m_2 + (1-\beta_3(t))\, g_t, \quad
        \nu \leftarrow \beta_2 \nu + (1-\beta_2) g_t^2 \\
        \hat m_1 &= m_1 / (1-\beta_1^t), \quad \hat\nu = \nu / (1-\beta_2^t) \\
        \theta &\leftarrow \theta - \eta\Big(\frac{\hat m_1 + \alpha(t)\, m_2}{\sqrt{\hat\nu} + \epsilon}
                 + \lambda\theta\Big)

    :math:`\alpha(t)` and :math:`\beta_3(t)` warm up over ``t_warmup`` steps (:func:`ademamix_alpha`,
    :func:`ademamix_beta3`) with :math:`T_\alpha = T_{\beta_3}` = ``t_warmup``; the paper sets it to about
    the length of the run when :math:`\beta_3` is large. An implementation error seen in the wild divides :math:`m_2` by :math:`\beta_1`'s
    bias correction too, i.e. uses :math:`(m_1 + \alpha m_2)/(1-\beta_1^t)`; this class does not (tested).

    Args:
        params: parameters or parameter groups.
        lr: learning rate :math:`\eta`.
        betas: :math:`(\beta_1, \beta_2, \beta_3)`: fast EMA, second moment, slow EMA.
        alpha: final mixing coefficient :math:`\alpha` of the slow EMA.
        t_warmup: warm-up steps of :math:`\alpha` and :math:`\beta_3`; ``None`` = no warm-up.
        eps: :math:`\epsilon` added to :math:`\sqrt{\hat\nu}`.
        weight_decay: decoupled weight decay :math:`\lambda` (multiplied by ``lr``).

    Examples:
        >>> import torch
        >>> w = torch.nn.Parameter(torch.zeros(2))
        >>> opt = AdEMAMix([w], lr=0.1, alpha=0.0)  # alpha = 0: exactly Adam(W)
        >>> w.grad = torch.tensor([1.0, -3.0]); _ = opt.step()
        >>> w.detach()
        tensor([-0.1000,  0.1000])
    """

    def __init__(self, params: Params, lr: float = 1e-3,
                 betas: tuple[float, float, float] = (0.9, 0.999, 0.9999), alpha: float = 5.0,
                 t_warmup: int | None = None, eps: float = 1e-8, weight_decay: float = 0.0) -> None:
        _check_lr(lr)
        betas = _check_betas(betas, 3)
        _check_nonneg("alpha", alpha)
        _check_nonneg("eps", eps)
        _check_nonneg("weight_decay", weight_decay)
        if t_warmup is not None and (not isinstance(t_warmup, int) or t_warmup < 0):
            raise ValueError(f"t_warmup must be None or an int >= 0 (steps), got {t_warmup!r}")
        if t_warmup and not 0.0 < betas[0] <= betas[2]:
            raise ValueError(f"the beta3 warm-up goes from beta1 to beta3 in log half-life: it needs "
                             f"0 < beta1 <= beta3, got betas={betas}; pass t_warmup=None to disable it")
        super().__init__(params, {"lr": lr, "betas": betas, "alpha": alpha, "t_warmup": t_warmup, "eps": eps,
                                  "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One optimisation step; ``closure`` (optional) re-evaluates the model and returns the loss."""
        loss = _closure_loss(closure)
        for group in self.param_groups:
            beta1, beta2, beta3 = group["betas"]
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = _dense_grad(p, "AdEMAMix")
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg_fast"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_slow"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                t = state["step"]
                a_t = ademamix_alpha(t, group["alpha"], group["t_warmup"])
                b3_t = ademamix_beta3(t, beta1, beta3, group["t_warmup"])
                m1, m2, v = state["exp_avg_fast"], state["exp_avg_slow"], state["exp_avg_sq"]
                m1.mul_(beta1).add_(g, alpha=1.0 - beta1)
                m2.mul_(b3_t).add_(g, alpha=1.0 - b3_t)
                v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
                denom = (v / (1.0 - beta2 ** t)).sqrt_().add_(eps)
                num = m1 / (1.0 - beta1 ** t)
                if a_t != 0.0:
                    num.add_(m2, alpha=a_t)
                if wd != 0.0:
                    p.mul_(1.0 - lr * wd)
                p.addcdiv_(num, denom, value=-lr)
        return loss
