"""Pure loss functions of a token-space search (METHODS.md OPT-A1). No model, no tokenizer."""

from __future__ import annotations

import math

import torch

__all__ = ["target_loss", "mellowmax", "TARGET_LOSSES"]

TARGET_LOSSES = ("ce", "mellowmax")


def mellowmax(x: torch.Tensor, alpha: float = 1.0, dim: int = -1) -> torch.Tensor:
    """Mellowmax (Asadi & Littman, 2017): mm_α(x) = (1/α)·(logsumexp(α·x) − log H) over ``dim``.

    A smooth maximum between the mean (α → 0) and the max (α → ∞) of the H values.

    Examples:
        >>> import torch
        >>> round(float(mellowmax(torch.tensor([1.0, 1.0]), 3.0)), 6)
        1.0
    """
    if alpha <= 0:
        raise ValueError(f"mellowmax alpha must be > 0, got {alpha}")
    H = x.shape[dim]
    return (torch.logsumexp(alpha * x, dim=dim) - math.log(H)) / alpha


def target_loss(
    logprobs: torch.Tensor,
    kind: str = "ce",
    *,
    first_token_weight: float = 1.0,
    alpha: float = 1.0,
) -> torch.Tensor:
    """Per-candidate loss from the target tokens' log-probs ``[N, H]``: ``[N]``.

    - ``"ce"``: weighted mean NLL, L = Σ_h w_h·(−log p_h) / Σ_h w_h with w_0 = ``first_token_weight`` and
      w_h = 1 otherwise (GCG, Zou et al. 2023; w_0 > 1 stresses the first token, which decides whether an
      answer starts at all);
    - ``"mellowmax"``: L = (1/α)·(logsumexp_h(α·(−log p_h)) − log H), a soft maximum of the per-token NLLs
      (α → 0 gives the mean NLL). nanoGCG applies mellowmax to the negated raw target *logits*; here it is
      applied to the NLLs, so the value is shift-invariant in the logits and comparable with ``"ce"``.

    Examples:
        >>> import torch
        >>> lp = torch.log(torch.tensor([[0.5, 0.25]]))
        >>> round(float(target_loss(lp)), 4)
        1.0397
    """
    if logprobs.dim() != 2 or logprobs.shape[1] == 0:
        raise ValueError(f"logprobs must be [N, H] with H >= 1 target tokens, got {tuple(logprobs.shape)}")
    nll = -logprobs.float()
    if kind == "ce":
        if first_token_weight == 1.0:
            return nll.mean(-1)
        w = torch.ones(nll.shape[1], device=nll.device)
        w[0] = first_token_weight
        return (nll * w).sum(-1) / w.sum()
    if kind == "mellowmax":
        return mellowmax(nll, alpha, dim=-1)
    raise ValueError(f"loss must be one of {TARGET_LOSSES}, got {kind!r}")
