"""SPAM: spike-aware Adam with momentum reset (Huang et al. 2025, ICLR)."""

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

__all__ = ["SPAM", "spam_warmup_factor"]


def spam_warmup_factor(step: int, last_reset: int | None, warmup: int) -> float:
    r"""SPAM's cosine lr warm-up after a momentum reset: :math:`\tfrac12(1-\cos(\pi j/N))` for :math:`j \le N`.

    :math:`j = t - t_{reset} + 1` counts the steps since the last reset (the reset step is :math:`j = 1`), so
    the factor rises from :math:`\tfrac12(1-\cos(\pi/N))` to exactly 1 at :math:`j = N`, and is 1 before
    the first reset (the start of training keeps the user's own schedule).

    Args:
        step: the 1-based step :math:`t`.
        last_reset: the step of the last reset, ``None`` before the first one.
        warmup: :math:`N`, warm-up steps after each reset (0 = none).

    Examples:
        >>> [round(spam_warmup_factor(t, 500, 2), 6) for t in (500, 501, 502)], spam_warmup_factor(10, None, 150)
        ([0.5, 1.0, 1.0], 1.0)
    """
    if last_reset is None or warmup <= 0:
        return 1.0
    j = step - last_reset + 1
    if j >= warmup:
        return 1.0
    return 0.5 * (1.0 - math.cos(math.pi * j / warmup))


class SPAM(Optimizer):
    r"""SPAM, Huang et al. 2025, "SPAM: Spike-Aware Adam with Momentum Reset for Stable LLM Training".

    AdamW (decoupled decay) with two changes, per parameter at the 1-based step :math:`t`:

    1. **Momentum reset**: when :math:`t \bmod \Delta T = 0`, :math:`m` and :math:`v` are set to zero, and the
       lr is multiplied by a cosine warm-up :math:`\phi_t` (:func:`spam_warmup_factor`) for the next
       :math:`N` steps. Bias correction keeps the global :math:`t` (as in the paper's Algorithm 1): right
       after a reset :math:`\hat m/\sqrt{\hat v}` is about :math:`(1-\beta_1)/\sqrt{1-\beta_2}` times the
       sign, which the warm-up tames.
    2. **Spike-aware clipping** of the gradient **that enters the moments**, element-wise, against the
       previous second moment:

       .. math::

           g_i \leftarrow \operatorname{sign}(g_i)\sqrt{\theta\, v_{t-1,i}} \quad \text{if } g_i^2 > \theta\, v_{t-1,i}

       skipped on the first step after initialisation or a reset (:math:`v_{t-1} = 0` there would clip
       every gradient to zero). ``p.grad`` itself is left unchanged.

    Then :math:`m \leftarrow \beta_1 m + (1-\beta_1) g`, :math:`v \leftarrow \beta_2 v + (1-\beta_2) g^2`,
    :math:`\theta \leftarrow \theta(1-\eta\lambda) - \eta\,\phi_t\, \hat m/(\sqrt{\hat v}+\epsilon)`.
    Defaults :math:`\Delta T = 500`, :math:`\theta = 5000`, :math:`N = 150` follow METHODS.md's reading of
    the paper (pytorch-optimizer also uses 500 and 5000, but a 50-step warm-up). The paper's optional sparse
    momentum (a random subset of coordinates keeps state) is not implemented.

    Args:
        params: parameters or parameter groups.
        lr: learning rate :math:`\eta`.
        betas: :math:`(\beta_1, \beta_2)`.
        eps: :math:`\epsilon`.
        weight_decay: decoupled weight decay :math:`\lambda` (multiplied by ``lr``, not by :math:`\phi_t`).
        reset_interval: :math:`\Delta T` (0 = never reset).
        spike_threshold: :math:`\theta` (0 = no clipping).
        warmup: :math:`N`, cosine warm-up steps after each reset.

    Examples:
        >>> import torch
        >>> w = torch.nn.Parameter(torch.zeros(1))
        >>> opt = SPAM([w], lr=0.1)  # spike_threshold=5000
        >>> for g in (1.0, 1.0, 1000.0):  # the spike is clipped to sqrt(5000 v) before entering m and v
        ...     w.grad = torch.tensor([g]); _ = opt.step()
        >>> round(float(opt.state[w]["exp_avg_sq"]), 4)  # unclipped: about 1000 * (1 - beta2) = 1.0
        0.012
    """

    def __init__(self, params: Params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, reset_interval: int = 500,
                 spike_threshold: float = 5000.0, warmup: int = 150) -> None:
        _check_lr(lr)
        betas = _check_betas(betas, 2)
        _check_nonneg("eps", eps)
        _check_nonneg("weight_decay", weight_decay)
        _check_nonneg("spike_threshold", spike_threshold)
        for name, v in (("reset_interval", reset_interval), ("warmup", warmup)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"{name} must be an int >= 0 (steps), got {v!r}")
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay,
                                  "reset_interval": reset_interval, "spike_threshold": spike_threshold,
                                  "warmup": warmup})

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One optimisation step; ``closure`` (optional) re-evaluates the model and returns the loss."""
        loss = _closure_loss(closure)
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps, wd, thr = group["lr"], group["eps"], group["weight_decay"], group["spike_threshold"]
            interval = group["reset_interval"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = _dense_grad(p, "SPAM")
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["last_reset"] = None
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                t = state["step"]
                m, v = state["exp_avg"], state["exp_avg_sq"]
                fresh = t == 1
                if interval and t % interval == 0:
                    m.zero_()
                    v.zero_()
                    state["last_reset"] = t
                    fresh = True
                if thr > 0.0 and not fresh:
                    # sign(g) min(|g|, sqrt(theta v)) is the rule: g^2 > theta v  <=>  |g| > sqrt(theta v)
                    bound = (v * thr).sqrt_()
                    g = torch.minimum(bound, g.abs(), out=bound).copysign_(g)
                m.mul_(beta1).add_(g, alpha=1.0 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
                phi = spam_warmup_factor(t, state["last_reset"], group["warmup"])
                denom = (v / (1.0 - beta2 ** t)).sqrt_().add_(eps)
                if wd != 0.0:
                    p.mul_(1.0 - lr * wd)
                p.addcdiv_(m, denom, value=-lr * phi / (1.0 - beta1 ** t))
        return loss
