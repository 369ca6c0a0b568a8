"""Per-token cross-entropy and its weighted reductions (METHODS.md 3B, OPT-B1).

Pure functions over ``logits [B, T, V]``, ``labels [B, T]`` and ``mask [B, T]``: no model, no tokenizer.
Labels are *aligned* with the logits (``logits[:, t]`` predicts ``labels[:, t]``); :func:`shift_labels` makes
them from input ids once, keeping the length ``T`` (the last position is masked), so the model's logits are
passed as they are and never sliced or copied.

Per-token CE: ``CE_t = −log softmax(z_t)[y_t] = logsumexp(z_t) − z_{t, y_t}``, one ``log-softmax`` per row
(:func:`tokensmith.models.logprobs.gather_logprobs`), in row chunks; 0 where the mask is False.

Reductions (:func:`weighted_token_loss`), with ``m`` the mask and ``w`` the per-token weights:

- ``reduction="token"``, ``normalize="mask"`` (default): ``L = Σ_{b,t} m·w·CE / Σ_{b,t} m`` — one mean over all
  counted tokens of the batch (with ``w ≡ 1`` this is HF's causal-LM loss);
- ``reduction="token"``, ``normalize="weights"``: ``L = Σ m·w·CE / Σ m·w`` (selection: the mean over the kept
  tokens, Rho-1);
- ``reduction="sequence"``: the mean over sequences of each sequence's own ratio
  ``Σ_t m·w·CE / Σ_t m`` (or ``/ Σ_t m·w``); sequences with no counted token (or, for ``"weights"``, zero
  total weight) are left out of the mean.

Masks and padding never count: every reduction selects with ``torch.where(mask, x, 0)`` and the CE's backward
writes exact zeros at masked rows, so any value at a masked position (even NaN) changes neither the loss nor
any gradient.

Memory: the forward keeps no copy of the logits (the CE function saves the logits tensor itself plus
``[B·T]`` vectors); the backward writes the logits' gradient chunk by chunk into one tensor of the logits'
shape and dtype. Nothing here ever materialises a second ``B×T×V`` tensor, in fp32 or otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.autograd.function import once_differentiable

from tokensmith.models.logprobs import gather_logprobs
from tokensmith.optimization.training.base import (
    TokenBatch,
    TokenLoss,
    TokenWeighter,
    get_token_loss,
    get_weighter,
)

__all__ = [
    "shift_labels",
    "token_loss",
    "weighted_token_loss",
    "reduce_token_loss",
    "TokenLossOutput",
    "compute_token_objective",
]

_REDUCTIONS = ("token", "sequence")
_NORMALIZE = ("mask", "weights")
_NAN = ("raise", "skip")
_NAN_HINT = (
    "a diverged step (lower the learning rate, check the data / mixed precision), or pass nan='skip' to "
    "compute_token_objective / TokenWeightedTrainer to skip such steps"
)


# --------------------------------------------------------------------------------------------------- checks
def _as_bool_mask(mask: torch.Tensor, shape: torch.Size, name: str = "mask") -> torch.Tensor:
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of booleans, got {type(mask).__name__}")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(mask.shape)}, expected {tuple(shape)} (the labels' shape)")
    if mask.dtype == torch.bool:
        return mask
    if mask.is_floating_point() or mask.is_complex():
        raise TypeError(f"{name} must be boolean (or an integer 0/1 tensor), got dtype {mask.dtype}")
    return mask != 0


def _check_logits_labels(logits: torch.Tensor, labels: torch.Tensor) -> None:
    if not isinstance(logits, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise TypeError("logits and labels must be torch tensors")
    if not logits.is_floating_point():
        raise TypeError(f"logits must be a float tensor, got dtype {logits.dtype}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor of token ids, got dtype {labels.dtype}")
    if logits.dim() < 2 or tuple(logits.shape[:-1]) != tuple(labels.shape):
        raise ValueError(
            f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree: expected logits "
            "[B, T, V] with labels [B, T], aligned so that logits[:, t] predicts labels[:, t] (use shift_labels "
            "on the input ids; do not slice the logits)"
        )


def _check_labels_in_range(labels: torch.Tensor, mask: torch.Tensor, V: int) -> int:
    """One host sync: the number of counted tokens and the label range at counted positions."""
    big = torch.iinfo(torch.int64).max
    lab = labels.long()
    stats = torch.stack(
        [
            mask.sum(),
            torch.where(mask, lab, big).min() if mask.numel() else torch.tensor(big),
            torch.where(mask, lab, -1).max() if mask.numel() else torch.tensor(-1),
        ]
    ).tolist()
    n, lo, hi = int(stats[0]), int(stats[1]), int(stats[2])
    if n == 0:
        raise ValueError(
            "the mask keeps no token: the loss would be a silent 0 (check the attention / target masks, that "
            "labels are not all ignore_index, and that sequences have at least 2 real tokens)"
        )
    if lo < 0 or hi >= V:
        bad = lo if lo < 0 else hi
        raise ValueError(
            f"label id {bad} at a counted position is outside the vocabulary [0, {V}); mask ignored labels "
            "(e.g. -100) out of the mask, and resize the model's embeddings after adding tokens"
        )
    return n


# --------------------------------------------------------------------------------------------------- shift
def shift_labels(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    target_mask: torch.Tensor | None = None,
    ignore_index: int = -100,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token labels aligned with the logits: ``logits[:, t]`` predicts ``labels[:, t] = input_ids[:, t+1]``.

    The length stays ``T`` (the last position predicts nothing and is masked), so a model's logits
    ``[B, T, V]`` are used as they are. Position ``t`` counts when

        mask[:, t] = am[:, t] ∧ am[:, t+1] ∧ tm[:, t+1] ∧ (input_ids[:, t+1] ≠ ignore_index),   mask[:, T−1] = False

    with ``am`` the attention mask and ``tm`` the target mask (both all-True when not given). Passing HF-style
    ``labels`` (``-100`` where ignored, unshifted) as ``input_ids`` therefore works too. ``labels`` is
    ``ignore_index`` wherever ``mask`` is False. Left and right padding are both handled (a padded position
    neither predicts nor is predicted).

    Args:
        input_ids: ``[B, T]`` integer ids (or unshifted HF labels with ``ignore_index``).
        attention_mask: ``[B, T]`` 1 for real tokens.
        target_mask: ``[B, T]`` True for tokens that are targets (e.g. the answer, not the prompt), in
            input coordinates (``Encoded.target_mask``).
        ignore_index: the value that marks ignored labels.

    Returns:
        ``(labels [B, T] long, mask [B, T] bool)``.

    Examples:
        >>> import torch
        >>> labels, mask = shift_labels(torch.tensor([[5, 6, 7, 0]]), torch.tensor([[1, 1, 1, 0]]))
        >>> labels.tolist(), mask.tolist()
        ([[6, 7, -100, -100]], [[True, True, False, False]])
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError("input_ids must be a [B, T] tensor (add a batch dimension with [None])")
    if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
        raise TypeError(f"input_ids must be integer, got {input_ids.dtype}")
    ids = input_ids.long()
    B, T = ids.shape
    labels = torch.full_like(ids, ignore_index)
    mask = torch.zeros(B, T, dtype=torch.bool, device=ids.device)
    if T < 2:
        return labels, mask
    nxt = ids[:, 1:]
    keep = nxt != ignore_index
    if attention_mask is not None:
        am = _as_bool_mask(attention_mask, ids.shape, "attention_mask").to(ids.device)
        keep = keep & am[:, 1:] & am[:, :-1]
    if target_mask is not None:
        tm = _as_bool_mask(target_mask, ids.shape, "target_mask").to(ids.device)
        keep = keep & tm[:, 1:]
    mask[:, :-1] = keep
    labels[:, :-1] = torch.where(keep, nxt, torch.full_like(nxt, ignore_index))
    return labels, mask


# --------------------------------------------------------------------------------------------------- CE
_CHUNK_ELEMENTS = 1 << 25  # 32M logits per chunk: a 128 MB fp32 temporary at most


def _auto_chunk(chunk: int | None, V: int) -> int:
    if chunk is None:
        return max(1, _CHUNK_ELEMENTS // max(1, V))
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be a positive int or None, got {chunk!r}")
    return chunk


def _row_chunks(keep: torch.Tensor, chunk: int) -> list[tuple[int, int]]:
    """Row ranges ``[s, e)`` of ``chunk`` rows that hold at least one kept row (one host sync)."""
    N = keep.shape[0]
    n_chunks = (N + chunk - 1) // chunk
    pad = n_chunks * chunk - N
    flags = torch.nn.functional.pad(keep, (0, pad)).view(n_chunks, chunk).any(1).tolist()
    return [(i * chunk, min(N, (i + 1) * chunk)) for i, f in enumerate(flags) if f]


def _ce_forward(
    flat: torch.Tensor, tgt: torch.Tensor, keep: torch.Tensor, chunk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """CE per row (0 where not kept) and logsumexp per row, fp32, over chunks with a kept row."""
    N = flat.shape[0]
    ce = torch.zeros(N, dtype=torch.float32, device=flat.device)
    lse = torch.zeros(N, dtype=torch.float32, device=flat.device)
    for s, e in _row_chunks(keep, chunk):
        lp = gather_logprobs(flat[s:e], tgt[s:e], chunk=e - s)
        zy = flat[s:e].gather(-1, tgt[s:e, None])[:, 0].float()
        k = keep[s:e]
        ce[s:e] = torch.where(k, -lp, 0.0)
        lse[s:e] = torch.where(k, zy - lp, 0.0)
    return ce, lse


class _ChunkedCE(torch.autograd.Function):
    """Per-row CE = logsumexp(z) − z_y with a chunked backward ∂CE/∂z = g·(softmax(z) − onehot(y)), exactly 0 at
    rows that are not kept. Saves the logits tensor itself (no copy), the targets, the mask and the logsumexp; the
    backward writes into the gradient tensor in place (fp32 logits: no temporary; others: one fp32 chunk)."""

    @staticmethod
    def forward(
        ctx: Any, flat: torch.Tensor, tgt: torch.Tensor, keep: torch.Tensor, chunk: int
    ) -> torch.Tensor:
        ce, lse = _ce_forward(flat, tgt, keep, chunk)
        ctx.save_for_backward(flat, tgt, keep, lse)
        ctx.chunk = chunk
        return ce

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        flat, tgt, keep, lse = ctx.saved_tensors
        grad = torch.zeros_like(flat)
        gk = torch.where(keep, g.float(), 0.0)
        fp32 = flat.dtype == torch.float32
        for s, e in _row_chunks(keep, ctx.chunk):
            buf = (
                grad[s:e]
                if fp32
                else torch.empty(e - s, flat.shape[1], dtype=torch.float32, device=flat.device)
            )
            torch.sub(flat[s:e].float(), lse[s:e, None], out=buf)
            buf.exp_().mul_(gk[s:e, None])
            buf.scatter_add_(-1, tgt[s:e, None], -gk[s:e, None])
            buf.masked_fill_(~keep[s:e, None], 0.0)  # exact zeros (also where a masked row holds NaN)
            if not fp32:
                grad[s:e] = buf
        return grad, None, None, None


def _token_loss(
    logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, chunk: int | None
) -> torch.Tensor:
    """Validated CE ``[B, T]`` without the finiteness check (callers check the final loss once)."""
    _check_logits_labels(logits, labels)
    mask = _as_bool_mask(mask, labels.shape).to(labels.device)
    V = logits.shape[-1]
    chunk = _auto_chunk(chunk, V)
    _check_labels_in_range(labels, mask, V)
    flat = logits.reshape(-1, V)  # a view for the contiguous logits a model returns
    keep = mask.reshape(-1).to(flat.device)
    tgt = torch.where(keep, labels.reshape(-1).long().to(flat.device), 0)
    if torch.is_grad_enabled() and flat.requires_grad:
        ce = _ChunkedCE.apply(flat, tgt, keep, chunk)
    else:
        ce, _ = _ce_forward(flat.detach(), tgt, keep, chunk)
    return ce.reshape(labels.shape)


def token_loss(
    logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, *, chunk: int | None = None
) -> torch.Tensor:
    """Per-token cross-entropy ``[B, T]``: ``CE_t = logsumexp(z_t) − z_{t, y_t}`` where ``mask``, 0 elsewhere.

    One log-softmax per row via :func:`tokensmith.models.logprobs.gather_logprobs`, computed in fp32 in chunks of
    ``chunk`` rows (default: 32M logits per chunk, ``⌊2²⁵/V⌋`` rows; chunks with no counted row are skipped). Differentiable (first order: the backward is a
    hand-written chunked ``g·(softmax − onehot)``, exactly 0 at masked rows; double backward is not supported).
    The result is fp32 whatever the logits' dtype.

    Args:
        logits: ``[B, T, V]`` float logits (as the model returns them; a non-contiguous tensor is copied once).
        labels: ``[B, T]`` integer ids aligned with the logits (:func:`shift_labels`); any value where masked.
        mask: ``[B, T]`` bool (or 0/1), True where the token counts.
        chunk: rows per chunk (None: about 32M logits per chunk).

    Raises:
        ValueError: logits/labels shapes disagree; the mask keeps no token (never a silent zero loss); a counted
            label outside ``[0, V)``; NaN/inf logits at a counted position (the message names ``nan="skip"`` of
            :func:`compute_token_objective` / ``TokenWeightedTrainer``).
        TypeError: non-float logits, non-integer labels, a float mask.

    Examples:
        >>> import torch
        >>> z = torch.zeros(1, 2, 4)                      # uniform over 4 tokens
        >>> ce = token_loss(z, torch.tensor([[1, 3]]), torch.tensor([[True, False]]))
        >>> [round(v, 4) for v in ce[0].tolist()]           # log 4, then masked
        [1.3863, 0.0]
    """
    ce = _token_loss(logits, labels, mask, chunk)
    m = _as_bool_mask(mask, labels.shape).to(ce.device)
    bad = int((~torch.isfinite(ce) & m).sum())
    if bad:
        raise ValueError(f"the logits are NaN/inf at {bad} counted position(s): {_NAN_HINT}")
    return ce


# --------------------------------------------------------------------------------------------------- reduce
def _check_reduction(reduction: str, normalize: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if normalize not in _NORMALIZE:
        raise ValueError(f"normalize must be one of {_NORMALIZE}, got {normalize!r}")


def reduce_token_loss(
    ce: torch.Tensor,
    mask: torch.Tensor,
    weights: torch.Tensor | None = None,
    reduction: str = "token",
    normalize: str = "mask",
) -> torch.Tensor:
    """Reduce per-token losses ``[B, T]`` with per-token weights to a scalar (the conventions of the module doc).

    ``token``/``mask``: Σ m·w·ℓ / Σ m; ``token``/``weights``: Σ m·w·ℓ / Σ m·w; ``sequence``: the mean over
    sequences of Σ_t m·w·ℓ / Σ_t m (or / Σ_t m·w), over the sequences whose denominator is > 0. Values at masked
    positions never count (selected with ``torch.where``). A zero denominator gives NaN (callers check it).

    Examples:
        >>> import torch
        >>> ce, m = torch.tensor([[1.0, 3.0], [2.0, 0.0]]), torch.tensor([[True, True], [True, False]])
        >>> reduce_token_loss(ce, m).item(), reduce_token_loss(ce, m, reduction="sequence").item()
        (2.0, 2.0)
    """
    _check_reduction(reduction, normalize)
    m = mask.to(torch.bool)
    mf = m.to(ce.dtype)
    w = torch.ones_like(ce) if weights is None else weights.to(ce.dtype)
    wm = torch.where(m, w, 0.0)
    num = torch.where(m, wm * ce, 0.0)
    den = mf if normalize == "mask" else wm
    if reduction == "token":
        return num.sum() / den.sum()
    num_b, den_b = num.sum(-1), den.sum(-1)
    rows = den_b > 0
    per = torch.where(rows, num_b / torch.where(rows, den_b, 1.0), 0.0)
    return per.sum() / rows.sum()


def _check_weights(weights: torch.Tensor, labels: torch.Tensor, who: str) -> torch.Tensor:
    if not isinstance(weights, torch.Tensor) or not weights.is_floating_point():
        raise TypeError(f"{who} must return / be a float tensor [B, T]")
    if tuple(weights.shape) != tuple(labels.shape):
        raise ValueError(
            f"{who} has shape {tuple(weights.shape)}, expected {tuple(labels.shape)} (the labels' shape)"
        )
    return weights


def weighted_token_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor,
    weights: torch.Tensor | None = None,
    weighter: str | TokenWeighter | None = None,
    reduction: str = "token",
    normalize: str | None = None,
    *,
    ce: torch.Tensor | None = None,
    chunk: int | None = None,
    **extra: Any,
) -> torch.Tensor:
    """Weighted token loss (METHODS OPT-B1): ``L = Σ_t m_t·w_t·CE_t / Σ_t m_t`` and its variants.

    With ``weights=None`` and no weighter, ``w ≡ 1`` and ``L`` is the plain mean CE over the counted tokens (what
    HF causal-LM models return as ``loss`` for the same labels). A ``weighter`` (a :class:`TokenWeighter` or its
    registry name: ``"rho1"``, ``"tldr"``, ``"focal"``, ``"prior"``, ``"uniform"``) computes ``w`` from a
    :class:`TokenBatch`; ``**extra`` goes into ``batch.extra`` (e.g. ``ref_token_loss=`` for Rho-1). Reductions:
    see the module doc; ``normalize`` defaults to the weighter's (``"weights"`` for Rho-1: Σ m·w·CE / Σ m·w),
    else ``"mask"``.

    Args:
        logits: ``[B, T, V]``.
        labels: ``[B, T]`` aligned (:func:`shift_labels`).
        mask: ``[B, T]`` bool.
        weights: ``[B, T]`` float weights (values at masked positions are ignored); exclusive with ``weighter``.
        weighter: a :class:`TokenWeighter` instance or name.
        reduction: ``"token"`` or ``"sequence"``.
        normalize: ``"mask"`` or ``"weights"``.
        ce: precomputed per-token CE (:func:`token_loss`) to reuse.
        chunk: rows per chunk of the CE (None: automatic).
        **extra: ``TokenBatch.extra`` entries for the weighter.

    Raises:
        ValueError: both ``weights`` and ``weighter``; bad shapes; an empty mask; NaN/inf logits or weights at
            counted positions; all weights zero with ``normalize="weights"``.

    Examples:
        >>> import torch
        >>> z = torch.zeros(1, 3, 4)
        >>> y, m = torch.tensor([[0, 1, 2]]), torch.tensor([[True, True, False]])
        >>> round(weighted_token_loss(z, y, m).item(), 4)                 # log 4
        1.3863
        >>> round(weighted_token_loss(z, y, m, torch.tensor([[2.0, 0.0, 9.0]])).item(), 4)   # 2·log4 / 2
        1.3863
    """
    if weights is not None and weighter is not None:
        raise ValueError("give weights= or weighter=, not both")
    out = compute_token_objective(
        logits,
        labels,
        mask,
        weighter=weighter,
        reduction=reduction,
        normalize=normalize,
        weights=weights,
        ce=ce,
        chunk=chunk,
        **extra,
    )
    return out.loss


# --------------------------------------------------------------------------------------------------- objective
@dataclass
class TokenLossOutput:
    """What :func:`compute_token_objective` returns.

    Attributes:
        loss: the scalar to backpropagate (weighted CE plus the weighted token-loss terms).
        token_loss: ``[B, T]`` per-token CE (fp32, with grad, 0 where masked).
        weights: ``[B, T]`` the weights used (0 where masked; with grad only for weighters that backpropagate
            through them, e.g. TLDR).
        kept_fraction: 0-dim detached tensor, the share of counted tokens with a nonzero weight (Rho-1: ≈ k%).
        logs: detached 0-dim tensors by name: ``loss_ce`` (plain mean CE), ``loss_weighted`` (the reduced
            weighted CE), ``loss_<term>`` per token-loss term, ``kept_fraction``, ``weight_mean`` (mean weight over
            counted tokens), and whatever the weighter reports (its ``logs`` attribute).
        mask: ``[B, T]`` bool, the counted tokens.
        skipped: True when ``nan="skip"`` found a non-finite loss: then ``loss`` is a zero without grad and must
            not be backpropagated (``TokenWeightedTrainer`` substitutes ``0·Σθ``).
    """

    loss: torch.Tensor
    token_loss: torch.Tensor
    weights: torch.Tensor
    kept_fraction: torch.Tensor
    logs: dict[str, torch.Tensor] = field(default_factory=dict)
    mask: torch.Tensor | None = None
    skipped: bool = False


def _loss_terms(token_losses: Iterable[Any]) -> list[tuple[TokenLoss, float, str]]:
    """(instance, weight, log name) for TokenLoss instances, names, or (loss, weight) pairs."""
    if isinstance(token_losses, (TokenLoss, str)) or (
        isinstance(token_losses, tuple)
        and len(token_losses) == 2
        and isinstance(token_losses[1], (int, float))
    ):
        token_losses = [token_losses]
    out: list[tuple[TokenLoss, float, str]] = []
    seen: dict[str, int] = {}
    for item in token_losses:
        if isinstance(item, Sequence) and not isinstance(item, str) and len(item) == 2:
            obj, lam = item
        else:
            obj, lam = item, None
        inst = get_token_loss(obj) if isinstance(obj, (str, TokenLoss)) else None
        if inst is None:
            raise TypeError(
                f"token_losses items must be TokenLoss instances, registry names, or (loss, weight) pairs; got {item!r}"
            )
        lam = float(getattr(inst, "weight", 1.0) if lam is None else lam)
        if not math.isfinite(lam):
            raise ValueError(f"the weight of token loss {inst!r} must be finite, got {lam}")
        name = inst.name or type(inst).__name__.lower()
        seen[name] = seen.get(name, 0) + 1
        out.append((inst, lam, name if seen[name] == 1 else f"{name}_{seen[name]}"))
    return out


def _diagnose(
    ce: torch.Tensor, w: torch.Tensor, mask: torch.Tensor, den_zero: bool, terms: dict[str, torch.Tensor]
) -> str:
    """Why the loss is not finite (the error path only: these syncs never run on a good step)."""
    n_ce = int((~torch.isfinite(ce.detach()) & mask).sum())
    if n_ce:
        return f"the logits are NaN/inf at {n_ce} counted position(s): {_NAN_HINT}"
    n_w = int((~torch.isfinite(w.detach()) & mask).sum())
    if n_w:
        return f"the token weights are NaN/inf at {n_w} counted position(s): {_NAN_HINT}"
    if den_zero:
        return (
            "every counted token has weight 0 (normalize='weights' divides by the sum of the weights): the loss "
            "would be 0/0; check the weighter's inputs or use normalize='mask'"
        )
    bad = [k for k, v in terms.items() if not bool(torch.isfinite(v.detach()).all())]
    if bad:
        return f"the token-loss term(s) {bad} are NaN/inf: {_NAN_HINT}"
    return f"the loss is NaN/inf: {_NAN_HINT}"


def compute_token_objective(
    logits: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor,
    weighter: str | TokenWeighter | None = None,
    token_losses: Iterable[Any] = (),
    *,
    reduction: str = "token",
    normalize: str | None = None,
    nan: str = "raise",
    weights: torch.Tensor | None = None,
    input_ids: torch.Tensor | None = None,
    hidden: torch.Tensor | None = None,
    ce: torch.Tensor | None = None,
    chunk: int | None = None,
    **extra: Any,
) -> TokenLossOutput:
    """The one function a training loop calls: per-token CE, weights, the weighted reduction, extra loss terms.

        L = reduce(m·w·CE) + Σ_i λ_i·L_i(batch)

    ``w`` comes from ``weighter`` (a :class:`TokenWeighter` or registry name; ``None``: ``w ≡ 1``, or
    ``weights=`` given directly), ``reduce`` is :func:`reduce_token_loss` with ``reduction`` and ``normalize``
    (default: the weighter's ``normalize``, else ``"mask"``). ``token_losses`` are :class:`TokenLoss` instances
    (weight λ = their ``weight`` attribute, default 1), registry names, or ``(loss, λ)`` pairs; each gets the same
    :class:`TokenBatch` (logits, labels, mask, the CE, ``input_ids``, ``hidden``, ``extra``). A term whose
    ``includes_ce`` is True already contains the CE: the CE term is then left out of ``L`` (only allowed without
    a weighter). Everything detached for logging is in ``logs``; no host sync happens except the label check and
    one finiteness check of ``L``.

    Args:
        logits: ``[B, T, V]`` (with grad).
        labels: ``[B, T]`` aligned with the logits.
        mask: ``[B, T]`` bool.
        weighter: weighter instance or name.
        token_losses: extra loss terms.
        reduction: ``"token"`` or ``"sequence"``.
        normalize: ``"mask"`` or ``"weights"`` (default from the weighter).
        nan: ``"raise"`` (ValueError saying what is non-finite) or ``"skip"`` (return ``skipped=True`` with a
            zero loss that has no grad; the caller skips the step).
        weights: explicit ``[B, T]`` weights instead of a weighter.
        input_ids: ``[B, T]`` unshifted ids, for terms that need them.
        hidden: ``[B, T, d]`` hidden states aligned with the logits, for terms that need them.
        ce: a precomputed per-token CE to reuse.
        chunk: rows per chunk of the CE (None: automatic).
        **extra: ``TokenBatch.extra`` entries (``ref_token_loss=``, ``ref_noctx_logprobs=``, ...).

    Examples:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> z = torch.randn(2, 5, 11, generator=g, requires_grad=True)
        >>> y, m = torch.randint(0, 11, (2, 5), generator=g), torch.ones(2, 5, dtype=torch.bool)
        >>> out = compute_token_objective(z, y, m, weighter="rho1", ref_token_loss=torch.zeros(2, 5))
        >>> round(out.kept_fraction.item(), 4), int(out.weights.sum())   # round(0.6 · 10) tokens kept
        (0.6, 6)
        >>> out.loss.backward()
    """
    if nan not in _NAN:
        raise ValueError(f"nan must be one of {_NAN}, got {nan!r}")
    if weights is not None and weighter is not None:
        raise ValueError("give weights= or weighter=, not both")
    wt = get_weighter(weighter) if weighter is not None else None
    norm = normalize if normalize is not None else (wt.normalize if wt is not None else "mask")
    _check_reduction(reduction, norm)
    terms = _loss_terms(token_losses)
    ce_included = any(t.includes_ce for t, _, _ in terms)
    if ce_included and (wt is not None or weights is not None):
        raise ValueError(
            f"token loss(es) {[n for t, _, n in terms if t.includes_ce]} already include the CE term (includes_ce); "
            "a weighter / weights would have no CE term to weight: drop one of them"
        )
    if ce is None:
        ce = _token_loss(logits, labels, mask, chunk)
    else:
        if logits is not None:
            _check_logits_labels(logits, labels)
        if not isinstance(ce, torch.Tensor) or tuple(ce.shape) != tuple(labels.shape):
            raise ValueError(f"ce must be a [B, T] tensor shaped like the labels {tuple(labels.shape)}")
        V = logits.shape[-1] if logits is not None else torch.iinfo(torch.int64).max
        _check_labels_in_range(labels, _as_bool_mask(mask, labels.shape).to(labels.device), V)
    mask = _as_bool_mask(mask, labels.shape).to(ce.device)
    batch = TokenBatch(
        logits, labels, mask, token_loss=ce, input_ids=input_ids, hidden=hidden, extra=dict(extra)
    )
    if wt is not None:
        w = _check_weights(wt(batch), labels, f"{type(wt).__name__}.weights")
    elif weights is not None:
        w = _check_weights(weights, labels, "weights")
    else:
        w = mask.to(ce.dtype)
    w = torch.where(mask, w.to(ce.device, ce.dtype), 0.0)
    mf = mask.to(ce.dtype)
    n = mf.sum()
    logs: dict[str, torch.Tensor] = {}
    loss_ce = torch.where(mask, ce, 0.0).detach().sum() / n
    logs["loss_ce"] = loss_ce
    if ce_included:
        total = torch.zeros((), dtype=ce.dtype, device=ce.device)
    else:
        total = reduce_token_loss(ce, mask, w, reduction, norm)
        logs["loss_weighted"] = total.detach()
    term_vals: dict[str, torch.Tensor] = {}
    for inst, lam, name in terms:
        v = inst(batch)
        if not isinstance(v, torch.Tensor) or v.dim() != 0:
            raise TypeError(f"{type(inst).__name__}.loss must return a scalar tensor, got {v!r}")
        term_vals[name] = v
        logs[f"loss_{name}"] = v.detach()
        total = total + lam * v.to(total.device, total.dtype)
    wd = w.detach()
    kept = ((wd != 0) & mask).to(ce.dtype).sum() / n
    logs["kept_fraction"] = kept
    logs["weight_mean"] = wd.sum() / n
    for k, v in (getattr(wt, "logs", None) or {}).items():
        logs[k] = v.detach() if isinstance(v, torch.Tensor) else torch.tensor(float(v))
    if not bool(torch.isfinite(total.detach())):
        if nan == "skip":
            zero = torch.zeros((), dtype=ce.dtype, device=ce.device)
            return TokenLossOutput(zero, ce, w, kept, logs, mask, skipped=True)
        den_zero = False
        if not ce_included:
            den = mf if norm == "mask" else torch.where(mask, wd, 0.0)
            den_zero = bool(den.sum() == 0) if reduction == "token" else bool((den.sum(-1) > 0).sum() == 0)
        raise ValueError(_diagnose(ce, w, mask, den_zero, term_vals))
    return TokenLossOutput(total, ce, w, kept, logs, mask)
