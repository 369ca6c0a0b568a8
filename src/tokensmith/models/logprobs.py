"""Pure tensor functions for per-token log-probabilities and KL (METHODS.md MOD-2).

No model, no tokenizer. One ``log_softmax``/``logsumexp`` (never ``softmax().log()``), chunked over rows so
peak memory stays at one chunk of ``[rows, V]`` temporaries.
"""

from __future__ import annotations

import torch

__all__ = ["gather_logprobs", "token_kl", "masked_sum", "masked_mean", "shift_target_mask"]


def gather_logprobs(logits: torch.Tensor, targets: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """``log softmax(logits)[target]`` for each row, computed in row chunks.

    log p(y) = z_y − logsumexp(z)

    Args:
        logits: ``[..., V]`` (any float dtype; computed in fp32).
        targets: ``[...]`` integer ids, same leading shape.
        chunk: rows per chunk.

    Returns:
        fp32 tensor of shape ``targets.shape``.

    Examples:
        >>> import torch
        >>> z = torch.tensor([[0.0, 0.0]])
        >>> round(gather_logprobs(z, torch.tensor([1])).item(), 4)
        -0.6931
    """
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} disagree")
    flat = logits.reshape(-1, logits.shape[-1])
    tgt = targets.reshape(-1)
    out = torch.empty(tgt.shape[0], dtype=torch.float32, device=logits.device)
    for s in range(0, flat.shape[0], chunk):
        z = flat[s : s + chunk].float()
        out[s : s + chunk] = z.gather(-1, tgt[s : s + chunk, None])[:, 0] - torch.logsumexp(z, dim=-1)
    return out.reshape(targets.shape)


def token_kl(
    p_logits: torch.Tensor,
    q_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    chunk: int = 1024,
) -> torch.Tensor:
    """Per-position KL(p ‖ q) = Σ_v p_v (log p_v − log q_v), chunked over positions.

    Args:
        p_logits: ``[..., V]`` logits of p.
        q_logits: ``[..., V]`` logits of q (same shape).
        mask: optional ``[...]`` boolean; masked-out positions get 0.
        chunk: positions per chunk.

    Returns:
        fp32 ``[...]``.

    Examples:
        >>> import torch
        >>> z = torch.randn(3, 5)
        >>> token_kl(z, z).abs().max().item() < 1e-6
        True
    """
    if p_logits.shape != q_logits.shape:
        raise ValueError(
            f"p_logits {tuple(p_logits.shape)} and q_logits {tuple(q_logits.shape)} differ; "
            "KL needs the same vocabulary (mismatched tokenizers?)"
        )
    V = p_logits.shape[-1]
    p = p_logits.reshape(-1, V)
    q = q_logits.reshape(-1, V)
    out = torch.zeros(p.shape[0], dtype=torch.float32, device=p_logits.device)
    m = mask.reshape(-1).to(torch.bool) if mask is not None else None
    for s in range(0, p.shape[0], chunk):
        lp = torch.log_softmax(p[s : s + chunk].float(), -1)
        lq = torch.log_softmax(q[s : s + chunk].float(), -1)
        out[s : s + chunk] = (lp.exp() * (lp - lq)).sum(-1)
    if m is not None:
        out = out * m
    return out.reshape(p_logits.shape[:-1])


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Σ over ``dim`` of ``x`` where ``mask`` is true."""
    return (x * mask.to(x.dtype)).sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Mean over ``dim`` of ``x`` where ``mask`` is true (0 where the mask is empty)."""
    m = mask.to(x.dtype)
    return (x * m).sum(dim) / m.sum(dim).clamp_min(1.0)


def shift_target_mask(target_mask: torch.Tensor) -> torch.Tensor:
    """Positions whose logits predict a target token: ``keep[:, t] = target[:, t + 1]``."""
    keep = torch.zeros_like(target_mask, dtype=torch.bool)
    keep[..., :-1] = target_mask[..., 1:].to(torch.bool)
    return keep
