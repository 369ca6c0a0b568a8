"""Token weighters (METHODS.md 3B, OPT-B1 … OPT-B3): per-token weights ``w[B, T]`` for the weighted CE.

Each class is a :class:`~tokensmith.optimization.training.base.TokenWeighter` with a registry name, so
``weighter="rho1"`` works in :func:`~tokensmith.optimization.training.compute_token_objective` and
``TokenWeightedTrainer``. Notation: ``CE_t = −log p_θ(y_t ∣ y_<t)`` the per-token loss, ``p_t = exp(−CE_t)``
the gold-token probability, ``m_t`` the mask, ``N = Σ_t m_t`` the counted tokens of the batch.

=============  ========================================  ===========================================  ==========
name           weight                                    paper                                         normalize
=============  ========================================  ===========================================  ==========
``uniform``    w_t = 1                                   (plain maximum likelihood)                    mask
``rho1``       w_t = 1[L_Δ(t) in the batch's top-k%]     Lin et al. 2024, Rho-1                        weights
``tldr``       w_t = cos(π·p_t) + 1 (not detached)       Jiang et al. 2020, TLDR                       mask
``focal``      w_t = (1 − p_t)^γ                         Lin et al. 2017, focal loss                   mask
``prior``      w_t = f(1 − p_ref(y_t)) / mean(f(·))      Chen et al. 2025, PRIOR                       mask
=============  ========================================  ===========================================  ==========

The reference quantities come from ``batch.extra``: ``ref_token_loss`` (Rho-1: the reference model's per-token
CE on the same tokens, :func:`reference_token_loss`) and ``ref_noctx_logprobs`` (PRIOR: the reference's
log-probs of the target scored without its context, :func:`no_context_logprobs`), both ``[B, T]`` aligned with
the labels.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from tokensmith.models.adapter import ModelAdapter
from tokensmith.optimization.training.base import TokenBatch, TokenWeighter
from tokensmith.optimization.training.losses import (
    _as_bool_mask,
    _token_loss,
    compute_token_objective,
    shift_labels,
)

__all__ = [
    "Uniform",
    "Rho1",
    "TLDR",
    "Focal",
    "ContextDependence",
    "excess_loss",
    "keep_count",
    "top_k_mask",
    "selective_lm_loss",
    "context_dependence_weights",
    "reference_token_loss",
    "no_context_logprobs",
    "check_reference_vocab",
]

_RHO1_VARIANTS = ("signed", "abs", "softmax")


def _ce_of(batch: TokenBatch) -> torch.Tensor:
    if batch.token_loss is None:
        if batch.logits is None:
            raise ValueError("the TokenBatch has neither token_loss nor logits")
        batch.token_loss = _token_loss(batch.logits, batch.labels, batch.mask, None)
    return batch.token_loss


def _extra(batch: TokenBatch, key: str, who: str) -> torch.Tensor:
    v = batch.extra.get(key)
    if not isinstance(v, torch.Tensor):
        raise ValueError(f"{who} needs batch.extra[{key!r}], a [B, T] tensor aligned with the labels")
    if tuple(v.shape) != tuple(batch.labels.shape):
        raise ValueError(
            f"batch.extra[{key!r}] has shape {tuple(v.shape)}, expected {tuple(batch.labels.shape)}"
        )
    v = v.detach().to(batch.labels.device)
    bad = int((~torch.isfinite(v) & batch.mask.to(v.device)).sum())
    if bad:
        raise ValueError(
            f"batch.extra[{key!r}] is NaN/inf at {bad} counted position(s) (a diverged reference?)"
        )
    return v


# --------------------------------------------------------------------------------------------------- uniform
class Uniform(TokenWeighter):
    """All ones: ``w_t = m_t`` — plain maximum likelihood (the baseline every weighter is compared with).

    Examples:
        >>> import torch
        >>> from tokensmith.optimization.training import TokenBatch
        >>> b = TokenBatch(None, torch.zeros(1, 3, dtype=torch.long), torch.tensor([[True, True, False]]))
        >>> Uniform()(b).tolist()
        [[1.0, 1.0, 0.0]]
    """

    name = "uniform"

    def weights(self, batch: TokenBatch) -> torch.Tensor:
        return batch.mask.to(torch.float32)


# --------------------------------------------------------------------------------------------------- Rho-1
def excess_loss(
    token_loss: torch.Tensor,
    ref_token_loss: torch.Tensor,
    mask: torch.Tensor | None = None,
    variant: str = "signed",
) -> torch.Tensor:
    """Rho-1's token score, the excess loss ``L_Δ(x_t) = L_θ(x_t) − L_ref(x_t)`` (Lin et al. 2024, "Not All Tokens
    Are What You Need", Eq. 1-2), **signed** by default: tokens the reference already predicts well but the
    model does not score high; tokens both find hard (noise) score low.

    Args:
        token_loss: ``[B, T]`` the training model's per-token CE ``L_θ``.
        ref_token_loss: ``[B, T]`` the reference model's per-token CE ``L_ref`` on the same tokens.
        mask: optional ``[B, T]`` bool; masked positions get 0.
        variant: ``"signed"`` (the paper, also used by ``"softmax"``) or ``"abs"`` (``|L_Δ|``).

    Returns:
        ``[B, T]`` scores (detached inputs are not required; the result has grad if ``token_loss`` has).

    Examples:
        >>> import torch
        >>> excess_loss(torch.tensor([[2.0, 1.0]]), torch.tensor([[0.5, 3.0]])).tolist()
        [[1.5, -2.0]]
        >>> excess_loss(torch.tensor([[2.0, 1.0]]), torch.tensor([[0.5, 3.0]]), variant="abs").tolist()
        [[1.5, 2.0]]
    """
    if variant not in _RHO1_VARIANTS:
        raise ValueError(f"variant must be one of {_RHO1_VARIANTS}, got {variant!r}")
    if token_loss.shape != ref_token_loss.shape:
        raise ValueError(
            f"token_loss {tuple(token_loss.shape)} and ref_token_loss {tuple(ref_token_loss.shape)} differ; the "
            "reference must score the same (aligned) tokens"
        )
    d = token_loss - ref_token_loss.to(token_loss.device, token_loss.dtype)
    if variant == "abs":
        d = d.abs()
    if mask is not None:
        d = torch.where(_as_bool_mask(mask, d.shape).to(d.device), d, 0.0)
    return d


def keep_count(n: int, keep_ratio: float) -> int:
    """How many of ``n`` counted tokens Rho-1 keeps: ``k = max(1, ⌊ρ·n + ½⌋)`` (rounding half up; at least one
    token, so a selection never yields a silent zero loss).

    Examples:
        >>> keep_count(10, 0.6), keep_count(3, 0.5), keep_count(4, 0.01)
        (6, 2, 1)
    """
    _check_ratio(keep_ratio)
    if n < 1:
        raise ValueError(f"no counted tokens to select from (n={n})")
    return max(1, min(n, int(math.floor(keep_ratio * n + 0.5))))


def _check_ratio(keep_ratio: float) -> None:
    if isinstance(keep_ratio, torch.Tensor):
        keep_ratio = float(keep_ratio)
    if not isinstance(keep_ratio, (int, float)) or not (0.0 < keep_ratio <= 1.0) or math.isnan(keep_ratio):
        raise ValueError(
            f"keep_ratio must be in (0, 1], got {keep_ratio!r} (Rho-1 keeps the top keep_ratio of tokens)"
        )


def top_k_mask(scores: torch.Tensor, mask: torch.Tensor, keep_ratio: float) -> torch.Tensor:
    """The batch's top-``k`` counted tokens by score, ``k = keep_count(Σ mask, keep_ratio)``: exactly ``k`` True.

    Ties are broken deterministically: equal scores keep the earlier token in row-major (``b, t``) order (a
    stable descending sort over the counted tokens).

    Examples:
        >>> import torch
        >>> s, m = torch.tensor([[3.0, 1.0, 2.0, 2.0]]), torch.ones(1, 4, dtype=torch.bool)
        >>> top_k_mask(s, m, 0.5).tolist()
        [[True, False, True, False]]
    """
    m = _as_bool_mask(mask, scores.shape).to(scores.device)
    flat = scores.detach()[m]
    k = keep_count(int(flat.numel()), keep_ratio)
    if bool(torch.isnan(flat).any()):
        raise ValueError("the selection scores are NaN at counted positions")
    order = torch.sort(flat, descending=True, stable=True).indices[:k]
    sel_flat = torch.zeros(flat.shape[0], dtype=torch.bool, device=flat.device)
    sel_flat[order] = True
    out = torch.zeros_like(m)
    out[m] = sel_flat
    return out


class Rho1(TokenWeighter):
    """Rho-1 selective language modelling (Lin et al. 2024, "Not All Tokens Are What You Need"): train only on the
    batch's top-k% tokens by excess loss ``L_Δ = L_θ − L_ref`` (signed),

        L = −(1 / (N·k%)) · Σ_i 1[L_Δ(x_i) in the batch's top k%] · log P_θ(x_i)

    so ``w_i = 1[selected]`` with ``normalize="weights"`` (the mean CE over the kept tokens). Exactly
    :func:`keep_count` ``(N, keep_ratio)`` tokens are kept, over the whole batch's counted tokens (not per row);
    ties are broken by position (:func:`top_k_mask`). The weights are detached (selection is not differentiated).

    Variants: ``"signed"`` (default, the paper), ``"abs"`` (rank by ``|L_Δ|``), ``"softmax"`` (soft weights
    ``w_i ∝ exp(L_Δ(x_i)/τ)`` over the kept tokens, scaled to sum to ``k``; with ``keep_ratio=1`` a fully soft
    selection).

    Reads ``batch.extra["ref_token_loss"]`` (``[B, T]``, the reference's per-token CE on the same aligned labels;
    :func:`reference_token_loss` computes it from a reference adapter or model). The paper's reference is a model
    trained on high-quality data; k% = 60% for math (verify for other domains; 0.6 here by default).

    Args:
        keep_ratio: the kept fraction ρ in (0, 1].
        variant: ``"signed"``, ``"abs"`` or ``"softmax"``.
        temperature: τ > 0 for ``"softmax"``.

    Examples:
        >>> import tokensmith as ts, torch
        >>> from tokensmith.optimization.training import shift_labels, compute_token_objective
        >>> ad = ts.tiny("llama")
        >>> ids = ad.tokenizer(["the cat sat on the mat"], return_tensors="pt").input_ids
        >>> labels, mask = shift_labels(ids)
        >>> ref = reference_token_loss(ts.tiny("llama", seed=1), ids, None, labels, mask, policy=ad)
        >>> out = compute_token_objective(ad.forward(ids).logits, labels, mask, Rho1(0.5), ref_token_loss=ref)
        >>> int(out.weights.sum()) == keep_count(int(mask.sum()), 0.5)
        True
    """

    name = "rho1"
    needs = ("ref_token_loss",)
    normalize = "weights"

    def __init__(self, keep_ratio: float = 0.6, variant: str = "signed", temperature: float = 1.0) -> None:
        _check_ratio(keep_ratio)
        if variant not in _RHO1_VARIANTS:
            raise ValueError(f"variant must be one of {_RHO1_VARIANTS}, got {variant!r}")
        if not (isinstance(temperature, (int, float)) and temperature > 0 and math.isfinite(temperature)):
            raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
        self.keep_ratio = float(keep_ratio)
        self.variant = variant
        self.temperature = float(temperature)
        self.logs: dict[str, torch.Tensor] = {}

    def __repr__(self) -> str:
        return f"Rho1(keep_ratio={self.keep_ratio}, variant={self.variant!r})"

    def weights(self, batch: TokenBatch) -> torch.Tensor:
        ce = _ce_of(batch).detach()
        ref = _extra(batch, "ref_token_loss", "Rho1").to(ce.device, ce.dtype)
        m = batch.mask.to(ce.device)
        score = excess_loss(ce, ref, m, "abs" if self.variant == "abs" else "signed")
        sel = top_k_mask(score, m, self.keep_ratio)
        if self.variant == "softmax":
            z = torch.where(sel, score / self.temperature, float("-inf"))
            w = torch.softmax(z.reshape(-1), 0).reshape(z.shape) * sel.sum()
        else:
            w = sel.to(ce.dtype)
        n = m.sum()
        self.logs = {
            "excess_loss_mean": torch.where(m, score, 0.0).sum() / n,
            "ref_loss_mean": torch.where(m, ref, 0.0).sum() / n,
        }
        return w


def selective_lm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor,
    ref_token_loss: torch.Tensor,
    keep_ratio: float = 0.6,
    variant: str = "signed",
) -> torch.Tensor:
    """Rho-1's selective LM loss as one function: ``−(1/k)·Σ_{i ∈ top-k by L_Δ} log P_θ(x_i)`` (see :class:`Rho1`).

    Examples:
        >>> import torch
        >>> z = torch.zeros(1, 4, 3)                                       # uniform: CE = log 3 everywhere
        >>> y, m = torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 4, dtype=torch.bool)
        >>> round(selective_lm_loss(z, y, m, torch.tensor([[0.0, 5.0, 0.0, 5.0]]), 0.5).item(), 4)
        1.0986
    """
    out = compute_token_objective(
        logits, labels, mask, Rho1(keep_ratio, variant), ref_token_loss=ref_token_loss
    )
    return out.loss


# --------------------------------------------------------------------------------------------------- TLDR, focal
class TLDR(TokenWeighter):
    """TLDR token-loss dynamic reweighting (Jiang et al. 2020, "TLDR: Token Loss Dynamic Reweighting for Reducing
    Repetitive Utterance Generation"): ``w_t = cos(π·p_t) + 1`` with ``p_t = exp(−CE_t)`` the gold probability,
    so hard tokens (p → 0) get weight 2 and easy ones (p → 1) weight 0. ``L = Σ m·w·CE / Σ m``.

    The weight is **not detached** (``detach=False``, the METHODS.md convention): the gradient flows through
    ``w`` too, ``∂(w·CE)/∂CE = w + CE·π·sin(π·p)·p``. Pass ``detach=True`` to treat ``w`` as a constant.

    Examples:
        >>> import torch
        >>> from tokensmith.optimization.training import TokenBatch
        >>> ce = torch.tensor([[0.0, math.log(2.0), 50.0]])              # p = 1, 1/2, ~0
        >>> b = TokenBatch(None, torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 3, dtype=torch.bool), ce)
        >>> [round(v, 4) for v in TLDR()(b)[0].tolist()]
        [0.0, 1.0, 2.0]
    """

    name = "tldr"
    needs = ("token_loss",)

    def __init__(self, detach: bool = False) -> None:
        self.detach = bool(detach)

    def weights(self, batch: TokenBatch) -> torch.Tensor:
        ce = _ce_of(batch)
        ce = ce.detach() if self.detach else ce
        p = torch.exp(-ce)
        return torch.where(batch.mask.to(ce.device), torch.cos(math.pi * p) + 1.0, 0.0)


class Focal(TokenWeighter):
    """Focal-loss weights (Lin et al. 2017, "Focal Loss for Dense Object Detection"): ``w_t = (1 − p_t)^γ``, so
    ``w·CE = −(1 − p_t)^γ·log p_t`` (their FL with α = 1). ``γ = 2`` is the paper's default; ``γ = 0`` is plain CE.

    By default the gradient flows through the weight, as in the paper's FL (``detach=False``); ``detach=True``
    treats ``w`` as a constant. ``1 − p`` is computed as ``−expm1(−CE)`` (exact for small CE) and clamped at
    1e-12 before the power, so ``γ < 1`` never gives an infinite gradient at ``p = 1``.

    Examples:
        >>> import torch
        >>> from tokensmith.optimization.training import TokenBatch
        >>> ce = torch.tensor([[math.log(2.0), math.log(4.0)]])          # p = 1/2, 1/4
        >>> b = TokenBatch(None, torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 2, dtype=torch.bool), ce)
        >>> [round(v, 4) for v in Focal(gamma=2.0)(b)[0].tolist()]
        [0.25, 0.5625]
    """

    name = "focal"
    needs = ("token_loss",)

    def __init__(self, gamma: float = 2.0, detach: bool = False) -> None:
        if not (isinstance(gamma, (int, float)) and gamma >= 0 and math.isfinite(gamma)):
            raise ValueError(f"gamma must be a finite number >= 0, got {gamma!r} (the paper uses 2)")
        self.gamma = float(gamma)
        self.detach = bool(detach)

    def weights(self, batch: TokenBatch) -> torch.Tensor:
        ce = _ce_of(batch)
        ce = ce.detach() if self.detach else ce
        m = batch.mask.to(ce.device)
        u = torch.where(m, -torch.expm1(-ce), 1.0).clamp_min(1e-12)
        return torch.where(m, u**self.gamma, 0.0)


# --------------------------------------------------------------------------------------------------- PRIOR
def context_dependence_weights(
    ref_noctx_logprobs: torch.Tensor,
    mask: torch.Tensor,
    alpha: float = 1.0,
) -> torch.Tensor:
    """PRIOR-style context-dependence weights (Chen et al. 2025, "Prioritizing Image-Related Tokens Enhances
    Vision-Language Pre-Training"): a reference LM scores each target token *without* its conditioning (for text,
    the prompt / source document); tokens it cannot predict alone depend on the context and weigh more:

        w_t = f(1 − p_ref(x_t)) / mean_{counted s} f(1 − p_ref(x_s)),   f(u) = u^α

    so the weights have mean 1 over the batch's counted tokens (``alpha = 0``: uniform). The exact ``f`` of the
    paper is marked "verify" in METHODS.md; the power family with ``α = 1`` is the default here.

    Args:
        ref_noctx_logprobs: ``[B, T]`` ``log p_ref(x_t ∣ target tokens before t)`` aligned with the labels
            (:func:`no_context_logprobs`).
        mask: ``[B, T]`` bool.
        alpha: the exponent α >= 0.

    Raises:
        ValueError: alpha < 0, shapes differ, NaN/positive log-probs at counted positions, or all ``f`` zero
            (the reference predicts every counted token with probability 1).

    Examples:
        >>> import torch
        >>> lp = torch.log(torch.tensor([[0.5, 0.75, 0.9]]))            # 1 − p = 0.5, 0.25, (masked)
        >>> w = context_dependence_weights(lp, torch.tensor([[True, True, False]]))
        >>> [round(v, 4) for v in w[0].tolist()]                       # 0.5 / 0.375, 0.25 / 0.375, masked
        [1.3333, 0.6667, 0.0]
    """
    if not (isinstance(alpha, (int, float)) and alpha >= 0 and math.isfinite(alpha)):
        raise ValueError(f"alpha must be a finite number >= 0, got {alpha!r}")
    m = _as_bool_mask(mask, ref_noctx_logprobs.shape).to(ref_noctx_logprobs.device)
    lp = ref_noctx_logprobs.detach().float()
    bad = int((~torch.isfinite(lp) & m).sum())
    if bad:
        raise ValueError(f"ref_noctx_logprobs is NaN/inf at {bad} counted position(s)")
    if bool((torch.where(m, lp, 0.0) > 1e-4).any()):
        raise ValueError(
            "ref_noctx_logprobs must be log-probabilities (<= 0); got positive values (CE passed?)"
        )
    u = torch.where(m, -torch.expm1(lp.clamp_max(0.0)), 0.0)
    f = u**alpha if alpha != 0 else m.float()
    f = torch.where(m, f, 0.0)
    mean = f.sum() / m.sum().clamp_min(1)
    if not bool(mean > 0):
        raise ValueError(
            "all context-dependence weights are 0: the no-context reference predicts every counted token with "
            "probability 1 (is it given the context after all?)"
        )
    return f / mean


class ContextDependence(TokenWeighter):
    """PRIOR context-dependence weights as a weighter (:func:`context_dependence_weights`), ``normalize="mask"``:
    ``L = Σ m·w·CE / Σ m`` with mean-1 weights, i.e. a re-weighted mean CE. Reads
    ``batch.extra["ref_noctx_logprobs"]``; the weights are constants (no gradient).

    Examples:
        >>> import tokensmith as ts, torch
        >>> from tokensmith.optimization.training import shift_labels, compute_token_objective
        >>> ad = ts.tiny("llama")
        >>> ids = ad.tokenizer(["Q: 2+2? A: four"], return_tensors="pt").input_ids
        >>> tm = torch.zeros_like(ids, dtype=torch.bool); tm[0, -2:] = True          # the answer tokens
        >>> labels, mask = shift_labels(ids, target_mask=tm)
        >>> lp0 = no_context_logprobs(ad, labels, mask)
        >>> out = compute_token_objective(ad.forward(ids).logits, labels, mask, "prior", ref_noctx_logprobs=lp0)
        >>> round(float(out.weights[mask].mean()), 4)
        1.0
    """

    name = "prior"
    needs = ("ref_noctx_logprobs",)
    normalize = "mask"

    def __init__(self, alpha: float = 1.0) -> None:
        if not (isinstance(alpha, (int, float)) and alpha >= 0 and math.isfinite(alpha)):
            raise ValueError(f"alpha must be a finite number >= 0, got {alpha!r}")
        self.alpha = float(alpha)

    def weights(self, batch: TokenBatch) -> torch.Tensor:
        lp = _extra(batch, "ref_noctx_logprobs", "ContextDependence")
        return context_dependence_weights(lp, batch.mask, self.alpha)


# --------------------------------------------------------------------------------------------------- references
def _tokenizer_of(x: Any) -> Any:
    if isinstance(x, ModelAdapter):
        return x.tokenizer
    if hasattr(x, "get_vocab") and callable(x.get_vocab):
        return x
    return None


def _vocab_size_of(x: Any) -> int | None:
    """Output vocabulary size of an adapter or module (None for a tokenizer: its length may differ from the
    model's padded embedding rows)."""
    if isinstance(x, ModelAdapter):
        return int(x.structure.vocab_size)
    if isinstance(x, nn.Module):
        emb = x.get_output_embeddings() if hasattr(x, "get_output_embeddings") else None
        if emb is not None and getattr(emb, "weight", None) is not None:
            return int(emb.weight.shape[0])
        v = getattr(getattr(x, "config", None), "vocab_size", None)
        return int(v) if v is not None else None
    return None


def check_reference_vocab(policy: Any, ref: Any) -> None:
    """Refuse a reference whose vocabulary differs from the policy's (per-token losses would compare different
    tokens). Two adapters are compared with :meth:`ModelAdapter.same_vocab`; whenever both sides have a tokenizer
    (an adapter or a tokenizer), by ``get_vocab()``; a bare ``nn.Module`` (no tokenizer) against a module or
    adapter only by the output vocabulary size (a module against a bare tokenizer cannot be compared and passes).

    Raises:
        ValueError: the vocabularies differ.

    Examples:
        >>> import copy, tokensmith as ts
        >>> ad = ts.tiny("llama")
        >>> check_reference_vocab(ad, ad.tokenizer)                        # same tokenizer: fine
        >>> other = copy.deepcopy(ad.tokenizer)
        >>> _ = other.add_tokens(["<an_extra_token>"])
        >>> check_reference_vocab(ad, other)                               # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ValueError: the reference has another tokenizer ...
    """
    if isinstance(policy, ModelAdapter) and isinstance(ref, ModelAdapter):
        same = policy.same_vocab(ref)
    else:
        ta, tb = _tokenizer_of(policy), _tokenizer_of(ref)
        if ta is not None and tb is not None:
            same = ta is tb or (len(ta) == len(tb) and ta.get_vocab() == tb.get_vocab())
        else:
            va, vb = _vocab_size_of(policy), _vocab_size_of(ref)
            same = va is None or vb is None or va == vb
    if not same:
        raise ValueError(
            "the reference has another tokenizer / vocabulary than the policy; per-token losses compare the same "
            "token ids, so use a reference with the policy's tokenizer (e.g. its base model or a copy)"
        )


@contextlib.contextmanager
def _eval(model: nn.Module) -> Iterator[None]:
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


def _ref_logits(ref: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    am = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    if isinstance(ref, ModelAdapter):
        with ref.eval_mode():
            return ref.forward({"input_ids": input_ids, "attention_mask": am}).logits
    if isinstance(ref, nn.Module):
        dev = next(ref.parameters()).device
        with _eval(ref):
            return ref(input_ids=input_ids.to(dev), attention_mask=am.to(dev), use_cache=False).logits
    raise TypeError(
        f"ref must be a ModelAdapter or a torch nn.Module (a causal LM), got {type(ref).__name__}"
    )


def reference_token_loss(
    ref: ModelAdapter | nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    labels: torch.Tensor,
    mask: torch.Tensor,
    *,
    policy: Any = None,
) -> torch.Tensor:
    """The reference model's per-token CE ``L_ref(x_t)`` on the batch's aligned labels, ``[B, T]`` (0 where
    masked), for :class:`Rho1` (``batch.extra["ref_token_loss"]``). No grad, the reference in eval mode.

    When the labels are the next input ids (what :func:`shift_labels` gives) and ``ref`` is a
    :class:`ModelAdapter`, it uses :meth:`ModelAdapter.token_logprobs` (the LM head only at the scored positions,
    positions from the attention mask so left padding is exact); otherwise one forward of the reference and
    :func:`~tokensmith.optimization.training.token_loss` on its logits.

    Args:
        ref: reference adapter or causal-LM module (same tokenizer as the policy).
        input_ids: ``[B, T]`` the policy's input ids.
        attention_mask: ``[B, T]`` or None.
        labels: ``[B, T]`` aligned labels.
        mask: ``[B, T]`` bool.
        policy: the policy (adapter, tokenizer or module) to check the vocabulary against
            (:func:`check_reference_vocab`).

    Raises:
        ValueError: a reference with another vocabulary; the errors of ``token_loss``.

    Examples:
        >>> import tokensmith as ts
        >>> from tokensmith.optimization.training import shift_labels, token_loss
        >>> ad = ts.tiny("llama")
        >>> ids = ad.tokenizer(["a b c d"], return_tensors="pt").input_ids
        >>> labels, mask = shift_labels(ids)
        >>> ref = reference_token_loss(ad, ids, None, labels, mask)                 # ref = the model itself
        >>> bool((ref - token_loss(ad.forward(ids).logits, labels, mask)).abs().max() < 1e-4)
        True
    """
    if policy is not None:
        check_reference_vocab(policy, ref)
    m = _as_bool_mask(mask, labels.shape).to(labels.device)
    ids = input_ids.to(labels.device)
    with torch.no_grad():
        shifted = bool((~m[:, -1]).all()) and bool(
            torch.where(m[:, :-1], labels[:, :-1] == ids[:, 1:], True).all()
        )
        if isinstance(ref, ModelAdapter) and shifted and ref.is_causal:
            am = torch.ones_like(ids) if attention_mask is None else attention_mask.to(ids.device)
            tm = torch.zeros_like(m)
            tm[:, 1:] = m[:, :-1]
            lp = ref.token_logprobs({"input_ids": ids, "attention_mask": am}, target_mask=tm)
            out = torch.zeros(labels.shape, dtype=torch.float32, device=lp.device)
            out[:, :-1] = -lp[:, 1:]
            return torch.where(m.to(out.device), out, 0.0).to(labels.device)
        logits = _ref_logits(ref, ids, attention_mask)
        return _token_loss(logits, labels.to(logits.device), m.to(logits.device), None).to(labels.device)


def no_context_logprobs(
    ref: ModelAdapter | nn.Module,
    labels: torch.Tensor,
    mask: torch.Tensor,
    *,
    bos_id: int | None = None,
) -> torch.Tensor:
    """The reference's log-probs of the target tokens scored WITHOUT their context, for PRIOR
    (:class:`ContextDependence`, ``batch.extra["ref_noctx_logprobs"]``), ``[B, T]`` aligned with the labels.

    Per row, the counted labels (in order; gaps in the mask are closed up) form a new sequence after one BOS
    token, ``[bos, y_1, …, y_n]``, and the reference scores ``log p_ref(y_i ∣ bos, y_<i)``; the values are put
    back at the counted positions (0 elsewhere). No grad; the reference in eval mode.

    Args:
        ref: reference adapter or causal-LM module.
        labels: ``[B, T]`` aligned labels.
        mask: ``[B, T]`` bool, the target tokens (e.g. from ``shift_labels(ids, target_mask=...)``).
        bos_id: the token that starts the context-free sequence (default: the tokenizer's / config's BOS, else
            its EOS, the usual document separator).

    Examples:
        >>> import tokensmith as ts, torch
        >>> ad = ts.tiny("llama")
        >>> labels, mask = torch.tensor([[7, 8, 9]]), torch.tensor([[False, True, True]])
        >>> lp = no_context_logprobs(ad, labels, mask)
        >>> lp[0, 0].item() == 0.0 and bool((lp[0, 1:] < 0).all())
        True
    """
    m = _as_bool_mask(mask, labels.shape).to(labels.device)
    if bos_id is None:
        src = ref.tokenizer if isinstance(ref, ModelAdapter) else getattr(ref, "config", None)
        for attr in ("bos_token_id", "eos_token_id"):
            v = getattr(src, attr, None)
            if isinstance(v, (list, tuple)):
                v = v[0] if v else None
            if v is not None:
                bos_id = int(v)
                break
        if bos_id is None:
            raise ValueError(
                "the reference has no BOS or EOS token id: pass bos_id= (the token that starts a text)"
            )
    n = m.sum(-1)
    L = int(n.max()) + 1 if m.numel() else 1
    B = labels.shape[0]
    pos = torch.arange(L, device=labels.device)[None, :]
    seq = torch.full((B, L), bos_id, dtype=torch.long, device=labels.device)
    am = (pos <= n[:, None]).long()
    target_slots = (pos >= 1) & (pos <= n[:, None])
    seq[target_slots] = labels[m].long()
    lab2, m2 = shift_labels(seq, am)
    with torch.no_grad():
        logits = _ref_logits(ref, seq, am)
        ce2 = _token_loss(logits, lab2.to(logits.device), m2.to(logits.device), None).to(labels.device)
    out = torch.zeros(labels.shape, dtype=torch.float32, device=labels.device)
    out[m] = -ce2[m2]
    return out
