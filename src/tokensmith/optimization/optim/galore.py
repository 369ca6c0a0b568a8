"""GaLore: gradient low-rank projection (Zhao et al. 2024) — a projector and an AdamW that uses it."""

from __future__ import annotations

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

__all__ = ["GaLoreAdamW", "GaLoreProjector"]

_PROJ_TYPES = ("std", "left", "right")
_SVDS = ("full", "randomized")


class GaLoreProjector:
    r"""Low-rank gradient projector of GaLore (Zhao et al. 2024, "GaLore: Memory-Efficient LLM Training by
    Gradient Low-Rank Projection").

    For a 2-D gradient :math:`G \in \mathbb{R}^{m\times n}`, every ``update_gap`` steps (and at the first one)
    :math:`P` = the top-:math:`r` left singular vectors of :math:`G` (``left``) or :math:`Q` = the top-:math:`r`
    right singular vectors (``right``); ``std`` picks the smaller side (left if :math:`m \le n`), so the
    optimizer state is :math:`r \times \max(m, n)`. Between recomputations :math:`P` is kept fixed.

    - project: :math:`R = P^\top G` (left) or :math:`R = G Q` (right);
    - project back: :math:`\Delta = s\,P N` (left) or :math:`\Delta = s\,N Q^\top` (right), with the scale
      :math:`s` (the paper's :math:`\alpha`, 0.25 in its experiments).

    ``svd="randomized"`` (GaLore 2's choice for speed) uses a seeded randomized range finder with
    ``oversample`` extra columns and ``power_iters`` subspace iterations instead of a full SVD; its random
    matrix comes from a ``torch.Generator`` seeded by ``seed`` and the step, so runs are reproducible. The
    basis lives in the optimizer state (``state["galore_P"]``, ``state["galore_left"]``), so it is saved with ``state_dict``.

    Args:
        rank: :math:`r` (clamped to :math:`\min(m, n)`).
        update_gap: :math:`T`, steps between recomputations of the basis.
        scale: :math:`s`, multiplies the projected-back update.
        proj_type: ``"std"``, ``"left"`` or ``"right"``.
        svd: ``"full"`` (``torch.linalg.svd``) or ``"randomized"``.
        oversample: extra columns of the randomized range finder.
        power_iters: subspace (power) iterations of the randomized range finder.
        seed: seed of the randomized range finder.

    Examples:
        >>> import torch
        >>> proj = GaLoreProjector(rank=1, update_gap=10)
        >>> G = torch.tensor([[3.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
        >>> state = {}
        >>> R = proj.project(G, state, step=1)  # left (2 <= 3): P = e1 (up to sign), R = P^T G
        >>> R.shape, proj.project_back(R, state).abs()
        (torch.Size([1, 3]), tensor([[0.7500, 0.0000, 0.0000],
                [0.0000, 0.0000, 0.0000]]))
    """

    def __init__(self, rank: int, update_gap: int = 200, scale: float = 0.25, proj_type: str = "std",
                 svd: str = "full", oversample: int = 8, power_iters: int = 2, seed: int = 0) -> None:
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
            raise ValueError(f"rank must be an int >= 1, got {rank!r}")
        if not isinstance(update_gap, int) or isinstance(update_gap, bool) or update_gap < 1:
            raise ValueError(f"update_gap must be an int >= 1 (steps), got {update_gap!r}")
        _check_nonneg("scale", scale)
        if proj_type not in _PROJ_TYPES:
            raise ValueError(f"proj_type must be one of {_PROJ_TYPES}, got {proj_type!r}")
        if svd not in _SVDS:
            raise ValueError(f"svd must be one of {_SVDS}, got {svd!r}")
        if oversample < 0 or power_iters < 0:
            raise ValueError(f"oversample and power_iters must be >= 0, got {oversample}, {power_iters}")
        self.rank, self.update_gap, self.scale = rank, update_gap, float(scale)
        self.proj_type, self.svd, self.oversample, self.power_iters = proj_type, svd, oversample, power_iters
        self.seed = int(seed)

    def side(self, shape: torch.Size | tuple[int, ...]) -> str:
        """``"left"`` or ``"right"``: which side of an ``[m, n]`` gradient is projected."""
        if len(shape) != 2:
            raise ValueError(f"GaLore projects 2-D gradients only, got shape {tuple(shape)}; use plain AdamW for "
                             "other parameters (GaLoreAdamW does this automatically)")
        if self.proj_type != "std":
            return self.proj_type
        return "left" if shape[0] <= shape[1] else "right"

    def basis(self, grad: torch.Tensor, step: int = 1) -> torch.Tensor:
        """The top-``rank`` singular vectors of ``grad`` on the projected side: ``[m, r]`` (left) or ``[n, r]``."""
        side = self.side(grad.shape)
        a = grad if side == "left" else grad.T
        work = a if a.dtype in (torch.float32, torch.float64) else a.float()
        r = min(self.rank, *a.shape)
        if self.svd == "full":
            u = torch.linalg.svd(work, full_matrices=False)[0][:, :r]
        else:
            gen = torch.Generator(device=work.device).manual_seed(self.seed * 1_000_003 + step)
            k = min(r + self.oversample, min(work.shape))
            omega = torch.randn(work.shape[1], k, generator=gen, device=work.device, dtype=work.dtype)
            q = torch.linalg.qr(work @ omega)[0]
            for _ in range(self.power_iters):
                q = torch.linalg.qr(work @ torch.linalg.qr(work.T @ q)[0])[0]
            ub = torch.linalg.svd(q.T @ work, full_matrices=False)[0]
            u = (q @ ub)[:, :r]
        return u.to(grad.dtype).contiguous()

    def project(self, grad: torch.Tensor, state: dict[str, Any], step: int) -> torch.Tensor:
        """:math:`R = P^\\top G` or :math:`G Q`; recomputes the basis into ``state`` at step 1 and every ``update_gap``."""
        if "galore_P" not in state or (step - 1) % self.update_gap == 0:
            state["galore_P"] = self.basis(grad, step)
            # a bool, not the side's name: Optimizer.load_state_dict turns str values into generators
            state["galore_left"] = self.side(grad.shape) == "left"
        p = state["galore_P"]
        return p.T @ grad if state["galore_left"] else grad @ p

    def project_back(self, n: torch.Tensor, state: dict[str, Any]) -> torch.Tensor:
        """:math:`s\\,P N` or :math:`s\\,N Q^\\top` (full-shape update)."""
        p = state["galore_P"]
        out = p @ n if state["galore_left"] else n @ p.T
        return out.mul_(self.scale)


class GaLoreAdamW(Optimizer):
    r"""AdamW with GaLore low-rank gradient projection (Zhao et al. 2024) on the 2-D parameters of chosen groups.

    In a group with ``rank`` set, each 2-D parameter :math:`W` with gradient :math:`G` does (step :math:`t`,
    :class:`GaLoreProjector` for :math:`P`):

    .. math::

        R &= P^\top G, \quad M \leftarrow \beta_1 M + (1-\beta_1)R, \quad V \leftarrow \beta_2 V + (1-\beta_2)R^2 \\
        N &= \frac{M/(1-\beta_1^t)}{\sqrt{V/(1-\beta_2^t)} + \epsilon}, \quad
        W \leftarrow W(1-\eta\lambda) - \eta\, s\, P N

    so the Adam state is :math:`r \times n` instead of :math:`m \times n`. The state is kept across basis
    recomputations (as in the paper). Other parameters (biases, norms, groups without ``rank``) get plain
    AdamW. Typical use: ``GaLoreAdamW([{"params": matrices, "rank": 128}, {"params": others}], lr=...)``;
    the paper uses :math:`r` = 128-512, :math:`T` = 200, :math:`s` = 0.25 and leaves embeddings and the head
    un-projected.

    Args:
        params: parameters or parameter groups; group keys ``rank``, ``update_gap``, ``scale``,
            ``proj_type``, ``svd`` override the defaults below.
        lr: learning rate :math:`\eta`.
        betas: :math:`(\beta_1, \beta_2)`.
        eps: :math:`\epsilon`.
        weight_decay: decoupled weight decay :math:`\lambda` on the full :math:`W`.
        rank: default rank; ``None`` = no projection unless a group sets one.
        update_gap: steps between basis recomputations :math:`T`.
        scale: :math:`s` (the paper's :math:`\alpha`).
        proj_type: ``"std"`` (smaller side), ``"left"`` or ``"right"``.
        svd: ``"full"`` or ``"randomized"``.
        seed: seed of the randomized SVD.

    Examples:
        >>> import torch
        >>> W = torch.nn.Parameter(torch.zeros(4, 6))
        >>> opt = GaLoreAdamW([W], lr=0.01, rank=2)
        >>> W.grad = torch.randn(4, 6, generator=torch.Generator().manual_seed(0)); _ = opt.step()
        >>> tuple(opt.state[W]["exp_avg"].shape), int(torch.linalg.matrix_rank(W.detach()))
        ((2, 6), 2)
    """

    def __init__(self, params: Params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, rank: int | None = None, update_gap: int = 200,
                 scale: float = 0.25, proj_type: str = "std", svd: str = "full", seed: int = 0) -> None:
        _check_lr(lr)
        betas = _check_betas(betas, 2)
        _check_nonneg("eps", eps)
        _check_nonneg("weight_decay", weight_decay)
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay, "rank": rank,
                    "update_gap": update_gap, "scale": scale, "proj_type": proj_type, "svd": svd, "seed": seed}
        super().__init__(params, defaults)
        for group in self.param_groups:  # validate every group's GaLore options now, not at the first step
            self._projector(group)

    @staticmethod
    def _projector(group: dict[str, Any]) -> GaLoreProjector | None:
        if group["rank"] is None:
            return None
        return GaLoreProjector(group["rank"], group["update_gap"], group["scale"], group["proj_type"],
                               group["svd"], seed=group["seed"])

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One optimisation step; ``closure`` (optional) re-evaluates the model and returns the loss."""
        loss = _closure_loss(closure)
        for group in self.param_groups:
            proj = self._projector(group)
            beta1, beta2 = group["betas"]
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = _dense_grad(p, "GaLoreAdamW")
                state = self.state[p]
                if "step" not in state:
                    state["step"] = 0
                state["step"] += 1
                t = state["step"]
                low_rank = proj is not None and p.dim() == 2
                r = proj.project(g, state, t) if low_rank else g
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros_like(r, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(r, memory_format=torch.preserve_format)
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.mul_(beta1).add_(r, alpha=1.0 - beta1)
                v.mul_(beta2).addcmul_(r, r, value=1.0 - beta2)
                denom = (v / (1.0 - beta2 ** t)).sqrt_().add_(eps)
                if wd != 0.0:
                    p.mul_(1.0 - lr * wd)
                if low_rank:
                    n = (m / (1.0 - beta1 ** t)).div_(denom)
                    p.add_(proj.project_back(n, state), alpha=-lr)
                else:
                    p.addcdiv_(m, denom, value=-lr / (1.0 - beta1 ** t))
        return loss
