"""Pure tensor functions for per-token log-probabilities and KL (METHODS.md MOD-2).

No model, no tokenizer. One ``log_softmax``/``logsumexp`` (never ``softmax().log()``), chunked over rows so
peak memory stays at one chunk of ``[rows, V]`` temporaries — under autograd too for :func:`token_kl`, whose
backward recomputes each chunk instead of saving its intermediates.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.autograd.function import once_differentiable

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

    Under autograd only the two logits tensors are saved; the backward recomputes each chunk's softmaxes, so
    memory stays at one chunk of ``[chunk, V]`` temporaries there too. With p = softmax(a), q = softmax(b)
    and upstream gradient g per position: ∂KL/∂a = g·p ⊙ (log p − log q − KL), ∂KL/∂b = g·(q − p).

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
    m = mask.reshape(-1).to(torch.bool) if mask is not None else None
    if torch.is_grad_enabled() and (p.requires_grad or q.requires_grad):
        out = _ChunkedKL.apply(p, q, chunk)
    else:
        out = _kl_rows(p, q, chunk)
    if m is not None:
        out = out * m
    return out.reshape(p_logits.shape[:-1])


def _kl_rows(p: torch.Tensor, q: torch.Tensor, chunk: int) -> torch.Tensor:
    """KL(softmax(p) ‖ softmax(q)) per row of ``[N, V]`` logits, fp32, chunked."""
    out = torch.zeros(p.shape[0], dtype=torch.float32, device=p.device)
    for s in range(0, p.shape[0], chunk):
        lp = torch.log_softmax(p[s : s + chunk].float(), -1)
        lq = torch.log_softmax(q[s : s + chunk].float(), -1)
        out[s : s + chunk] = (lp.exp() * (lp - lq)).sum(-1)
    return out


class _ChunkedKL(torch.autograd.Function):
    """Row-wise KL(softmax(a) ‖ softmax(b)) that saves only ``a`` and ``b`` and recomputes per chunk in backward.

    ∂KL/∂a = p ⊙ (log p − log q − KL), ∂KL/∂b = q − p (each row times its upstream gradient).
    """

    @staticmethod
    def forward(ctx: Any, a: torch.Tensor, b: torch.Tensor, chunk: int) -> torch.Tensor:
        ctx.save_for_backward(a, b)
        ctx.chunk = chunk
        return _kl_rows(a, b, chunk)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        a, b = ctx.saved_tensors
        need_a, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        ga = torch.empty_like(a) if need_a else None
        gb = torch.empty_like(b) if need_b else None
        for s in range(0, a.shape[0], ctx.chunk):
            e = s + ctx.chunk
            lp = torch.log_softmax(a[s:e].float(), -1)
            lq = torch.log_softmax(b[s:e].float(), -1)
            pr = lp.exp()
            gs = g[s:e, None].float()
            if ga is not None:
                kl = (pr * (lp - lq)).sum(-1, keepdim=True)
                ga[s:e] = pr * (lp - lq - kl) * gs
            if gb is not None:
                gb[s:e] = (lq.exp() - pr) * gs
        return ga, gb, None


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
