"""AdaGC: adaptive per-tensor gradient clipping (Wang et al. 2025), built into AdamW or Lion, or wrapping any optimizer."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.optim import Optimizer

from tokensmith.optimization.optim.lion import (
    Params,
    _check_beta,
    _check_betas,
    _check_lr,
    _check_nonneg,
    _closure_loss,
    _dense_grad,
    _lion_update,
)

__all__ = ["AdaGC", "AdaGCClipper", "adagc_clip"]


def _check_adagc(beta: float, lambda_abs: float, lambda_rel: float, warmup_steps: int) -> None:
    _check_beta("beta", beta)
    for name, v in (("lambda_abs", lambda_abs), ("lambda_rel", lambda_rel)):
        if not isinstance(v, (int, float)) or not v > 0.0:
            raise ValueError(f"{name} must be a float > 0, got {v!r}")
    if not isinstance(warmup_steps, int) or isinstance(warmup_steps, bool) or warmup_steps < 0:
        raise ValueError(f"warmup_steps must be an int >= 0, got {warmup_steps!r}")


def adagc_clip(grads: Sequence[torch.Tensor], gammas: Sequence[torch.Tensor | None], step: int, *,
               beta: float = 0.98, lambda_abs: float = 1.0, lambda_rel: float = 1.05,
               warmup_steps: int = 100) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    r"""One AdaGC clipping step over a list of tensors: returns the clipped gradients and the new :math:`\gamma_i`.

    Wang et al. 2025, "AdaGC: Improving Training Stability for Large Language Model Pretraining". At the
    1-based step :math:`t`, per tensor :math:`i`:

    - **warm-up** (:math:`t \le T_{warm}`): global-norm clipping at :math:`\lambda_{abs}` (the global norm
      :math:`\lVert g\rVert` over all tensors, computed once), :math:`\hat g_i = \min(1, \lambda_{abs}/\lVert g\rVert)\,g_i`,
      and :math:`\gamma_i = \min(\gamma_i, \lVert\hat g_i\rVert)` (the running minimum; the first step sets it);
    - **after**: :math:`\hat g_i = \min(1, \lambda_{rel}\gamma_i/\lVert g_i\rVert)\,g_i`, then
      :math:`\gamma_i \leftarrow \beta\gamma_i + (1-\beta)\lVert\hat g_i\rVert`.

    A tensor with no :math:`\gamma_i` yet after the warm-up (``warmup_steps=0``) starts with
    :math:`\gamma_i = \lVert g_i\rVert` (not clipped). No host synchronisation (the factors stay tensors).

    Args:
        grads: the gradients (not modified).
        gammas: the previous :math:`\gamma_i` (0-d tensors) or ``None`` where there is none yet.
        step: the 1-based step :math:`t`.
        beta: EMA coefficient :math:`\beta` of the clipped norms.
        lambda_abs: global clipping threshold during the warm-up.
        lambda_rel: relative threshold :math:`\lambda_{rel}` after it.
        warmup_steps: :math:`T_{warm}`.

    Examples:
        >>> import torch
        >>> g, gam = adagc_clip([torch.tensor([3.0, 4.0])], [torch.tensor(1.0)], step=5, warmup_steps=0)
        >>> g[0], gam[0]  # clipped to norm 1.05 * 1.0; gamma = 0.98 * 1 + 0.02 * 1.05
        (tensor([0.6300, 0.8400]), tensor(1.0010))
    """
    _check_adagc(beta, lambda_abs, lambda_rel, warmup_steps)
    if len(grads) != len(gammas):
        raise ValueError(f"grads and gammas must have the same length, got {len(grads)} and {len(gammas)}")
    norms = [torch.linalg.vector_norm(g) for g in grads]
    out_g: list[torch.Tensor] = []
    out_gamma: list[torch.Tensor] = []
    if step <= warmup_steps:
        gnorm = torch.linalg.vector_norm(torch.stack([n.to(torch.float64) for n in norms])) if norms else None
        for g, n, gam in zip(grads, norms, gammas, strict=True):
            h = torch.clamp(lambda_abs / gnorm, max=1.0).to(g.dtype)  # ||g|| = 0 -> inf -> 1
            cn = h * n
            out_g.append(g * h)
            out_gamma.append(cn if gam is None else torch.minimum(gam.to(cn), cn))
        return out_g, out_gamma
    for g, n, gam in zip(grads, norms, gammas, strict=True):
        if gam is None:
            out_g.append(g.clone())
            out_gamma.append(n.clone())
            continue
        gam = gam.to(n)
        h = torch.where(n > 0, torch.clamp(lambda_rel * gam / n, max=1.0), torch.ones_like(n))
        out_g.append(g * h)
        out_gamma.append(beta * gam + (1.0 - beta) * (h * n))
    return out_g, out_gamma


class AdaGC(Optimizer):
    r"""AdamW (or Lion) with AdaGC clipping, Wang et al. 2025, "AdaGC: Improving Training Stability for LLM Pretraining".

    Each step clips every gradient with :func:`adagc_clip` (warm-up: global clipping at :math:`\lambda_{abs}`
    with the global norm computed once per step over all groups; then per tensor
    :math:`\hat g_i = \min(1, \lambda_{rel}\gamma_i/\lVert g_i\rVert)\,g_i`,
    :math:`\gamma_i \leftarrow \beta\gamma_i + (1-\beta)\lVert\hat g_i\rVert`) and feeds :math:`\hat g_i` to
    the base update:

    - ``base="adamw"``: :math:`m \leftarrow \beta_1 m + (1-\beta_1)\hat g`,
      :math:`v \leftarrow \beta_2 v + (1-\beta_2)\hat g^2`,
      :math:`\theta \leftarrow \theta(1-\eta\lambda) - \eta\,\hat m/(\sqrt{\hat v}+\epsilon)`;
    - ``base="lion"``: the :class:`~tokensmith.optimization.optim.lion.Lion` update on :math:`\hat g`.

    The clipping options (``beta``, ``lambda_abs``, ``lambda_rel``, ``warmup_steps``) are read from the
    first parameter group (the global norm spans all groups). ``p.grad`` is left unchanged.

    Args:
        params: parameters or parameter groups.
        lr: learning rate :math:`\eta`.
        betas: base betas; ``None`` = (0.9, 0.999) for AdamW, (0.9, 0.99) for Lion.
        eps: :math:`\epsilon` of AdamW (unused by Lion).
        weight_decay: decoupled weight decay :math:`\lambda`.
        beta: EMA coefficient :math:`\beta` of the clipped norms (paper: 0.98).
        lambda_abs: global clipping threshold during the warm-up (paper: 1.0).
        lambda_rel: relative clipping threshold (paper: 1.05).
        warmup_steps: steps of global clipping before the adaptive phase (paper: 100).
        base: ``"adamw"`` or ``"lion"``.

    Examples:
        >>> import torch
        >>> w = torch.nn.Parameter(torch.zeros(2))
        >>> opt = AdaGC([w], lr=0.1, warmup_steps=1)
        >>> w.grad = torch.tensor([3.0, 4.0]); _ = opt.step()   # warm-up: global clip to norm 1
        >>> w.grad = torch.tensor([30.0, 40.0]); _ = opt.step()  # clipped to norm 1.05 * gamma = 1.05
        >>> round(float(opt.state[w]["gamma"]), 4)
        1.001
    """

    def __init__(self, params: Params, lr: float = 1e-3, betas: tuple[float, float] | None = None,
                 eps: float = 1e-8, weight_decay: float = 0.0, beta: float = 0.98, lambda_abs: float = 1.0,
                 lambda_rel: float = 1.05, warmup_steps: int = 100, base: str = "adamw") -> None:
        if base not in ("adamw", "lion"):
            raise ValueError(f"base must be 'adamw' or 'lion', got {base!r}")
        _check_lr(lr)
        betas = _check_betas(betas if betas is not None else ((0.9, 0.999) if base == "adamw" else (0.9, 0.99)), 2)
        _check_nonneg("eps", eps)
        _check_nonneg("weight_decay", weight_decay)
        _check_adagc(beta, lambda_abs, lambda_rel, warmup_steps)
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay,
                                  "beta": beta, "lambda_abs": lambda_abs, "lambda_rel": lambda_rel,
                                  "warmup_steps": warmup_steps, "base": base})

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One optimisation step; ``closure`` (optional) re-evaluates the model and returns the loss."""
        loss = _closure_loss(closure)
        items = [(group, p, _dense_grad(p, "AdaGC")) for group in self.param_groups for p in group["params"]
                 if p.grad is not None]
        if not items:
            return loss
        for group, p, _g in items:
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["gamma"] = None
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if group["base"] == "adamw":
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["step"] += 1
        g0 = self.param_groups[0]
        t = self.state[items[0][1]]["step"]
        clipped, gammas = adagc_clip([g for _, _, g in items], [self.state[p]["gamma"] for _, p, _ in items], t,
                                     beta=g0["beta"], lambda_abs=g0["lambda_abs"], lambda_rel=g0["lambda_rel"],
                                     warmup_steps=g0["warmup_steps"])
        for (group, p, _), g, gam in zip(items, clipped, gammas, strict=True):
            state = self.state[p]
            state["gamma"] = gam
            beta1, beta2 = group["betas"]
            lr, wd = group["lr"], group["weight_decay"]
            if group["base"] == "lion":
                _lion_update(p, g, state["exp_avg"], lr, beta1, beta2, wd)
                continue
            ts = state["step"]
            m, v = state["exp_avg"], state["exp_avg_sq"]
            m.mul_(beta1).add_(g, alpha=1.0 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
            denom = (v / (1.0 - beta2 ** ts)).sqrt_().add_(group["eps"])
            if wd != 0.0:
                p.mul_(1.0 - lr * wd)
            p.addcdiv_(m, denom, value=-lr / (1.0 - beta1 ** ts))
        return loss


class AdaGCClipper:
    r"""AdaGC clipping in front of any optimizer: clips ``p.grad`` in place (:func:`adagc_clip`), then ``opt.step()``.

    Use it like ``torch.nn.utils.clip_grad_norm_`` but with per-tensor adaptive thresholds (Wang et al. 2025);
    its :math:`\gamma_i` are saved with :meth:`state_dict` alongside the wrapped optimizer's state.

    Args:
        optimizer: the wrapped optimizer (any ``torch.optim.Optimizer``, e.g. ``Lion`` or ``GaLoreAdamW``).
        beta: EMA coefficient :math:`\beta` of the clipped norms.
        lambda_abs: global clipping threshold during the warm-up.
        lambda_rel: relative clipping threshold.
        warmup_steps: steps of global clipping before the adaptive phase.

    Examples:
        >>> import torch
        >>> w = torch.nn.Parameter(torch.zeros(2))
        >>> opt = AdaGCClipper(torch.optim.SGD([w], lr=1.0), warmup_steps=1)
        >>> w.grad = torch.tensor([3.0, 4.0]); _ = opt.step()
        >>> w.detach()  # the gradient was clipped to global norm 1 first
        tensor([-0.6000, -0.8000])
    """

    def __init__(self, optimizer: Optimizer, beta: float = 0.98, lambda_abs: float = 1.0,
                 lambda_rel: float = 1.05, warmup_steps: int = 100) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"AdaGCClipper wraps a torch.optim.Optimizer, got {type(optimizer).__name__}")
        _check_adagc(beta, lambda_abs, lambda_rel, warmup_steps)
        self.optimizer = optimizer
        self.options = {"beta": beta, "lambda_abs": lambda_abs, "lambda_rel": lambda_rel,
                        "warmup_steps": warmup_steps}
        self.steps = 0
        self.gammas: dict[int, torch.Tensor] = {}  # flat parameter index -> gamma

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """The wrapped optimizer's parameter groups (give lr schedulers ``clipper.optimizer`` itself)."""
        return self.optimizer.param_groups

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the wrapped optimizer's gradients."""
        self.optimizer.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def clip(self) -> None:
        """Clip every ``p.grad`` in place (one AdaGC step of the thresholds)."""
        idx = [(i, p) for i, p in enumerate(self._params()) if p.grad is not None]
        if not idx:
            return
        self.steps += 1
        grads = [_dense_grad(p, "AdaGCClipper") for _, p in idx]
        clipped, gammas = adagc_clip(grads, [self.gammas.get(i) for i, _ in idx], self.steps, **self.options)
        for (i, p), g, gam in zip(idx, clipped, gammas, strict=True):
            p.grad.copy_(g)
            self.gammas[i] = gam

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Evaluate ``closure`` (if given), clip the gradients, then step the wrapped optimizer."""
        loss = _closure_loss(closure)
        self.clip()
        self.optimizer.step()
        return loss

    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's state plus the clipper's step count and thresholds."""
        return {"optimizer": self.optimizer.state_dict(), "steps": self.steps,
                "gammas": {i: g.clone() for i, g in self.gammas.items()}, "options": dict(self.options)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.optimizer.load_state_dict(state["optimizer"])
        self.steps = int(state["steps"])
        self.gammas = {int(i): g.clone() for i, g in state["gammas"].items()}
        self.options = dict(state["options"])
