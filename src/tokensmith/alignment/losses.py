"""Token-level preference losses as pure functions over masked ``[B, T]`` tensors (METHODS.md ALN-1 … ALN-8).

No model, no tokenizer, no I/O. Inputs are what :meth:`ModelAdapter.token_logprobs` returns: per-token
log-probabilities ``[B, T]`` of the policy and the reference for the chosen (``*_w``) and rejected (``*_l``)
completions, 0 outside the completion, with boolean completion masks of the same shape. Chosen and rejected
are paired by row and may be padded to different lengths (``T_w != T_l``). Per-token KL tensors come from
:func:`tokensmith.models.logprobs.token_kl`.

Every loss returns ``(loss, metrics)``: ``loss`` is a scalar (``reduction="mean"``, the mean over pairs) and
``metrics`` a dict of detached 0-dim tensors (call ``.item()`` to log; no device sync happens here).

Padding never counts: every reduction over tokens selects with ``torch.where(mask, x, 0)``, so non-finite
garbage at padded positions changes neither the value nor the gradient.

Notation: Δ_t(y) = log π_θ(y_t∣x, y<t) − log π_ref(y_t∣x, y<t); KL_t(y) = KL(π_ref(·∣x, y<t) ‖ π_θ(·∣x, y<t));
σ the logistic function; sg the stop-gradient.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "dpo",
    "token_rewards",
    "tdpo",
    "sparsepo",
    "MaskModel",
    "contrastive_token_weights",
    "cdpo",
    "self_contrastive_token_rewards",
    "treg_regularizer",
    "treg",
    "aligndistil_target",
    "aligndistil_loss",
    "rto_token_rewards",
    "spans_to_token_rewards",
]

_REDUCTIONS = ("mean", "sum", "none")


# --------------------------------------------------------------------------------------------------- checks
def _check_beta(beta: float, name: str = "beta") -> None:
    if isinstance(beta, torch.Tensor):
        beta = float(beta)
    if not isinstance(beta, (int, float)) or not math.isfinite(beta) or beta <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {beta!r}; typical DPO values are 0.01-0.5")


def _check_reduction(reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def _as_mask(mask: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of booleans, got {type(mask).__name__}")
    if mask.dtype == torch.bool:
        return mask
    if mask.is_floating_point() or mask.dtype in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8):
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError(f"{name} must be boolean (or 0/1); got values other than 0 and 1")
        return mask != 0
    raise TypeError(f"{name} must be a boolean tensor, got dtype {mask.dtype}")


def _check_side(mask: torch.Tensor, mname: str, tensors: dict[str, torch.Tensor | None]) -> torch.Tensor:
    """Validate one side (chosen or rejected): 2-D mask with no empty row; same-shaped finite float tensors."""
    mask = _as_mask(mask, mname)
    if mask.dim() != 2:
        raise ValueError(f"{mname} must be [B, T], got shape {tuple(mask.shape)}")
    empty = (~mask.any(-1)).nonzero().flatten()
    if empty.numel():
        raise ValueError(
            f"{mname} has no completion token in row(s) {empty.tolist()} (empty completion): drop these pairs, or "
            "check truncation (max_length cut the completion off) and the completion span"
        )
    for name, x in tensors.items():
        if x is None:
            continue
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {getattr(x, 'dtype', type(x).__name__)}")
        if x.shape != mask.shape:
            raise ValueError(
                f"{name} has shape {tuple(x.shape)} but {mname} has {tuple(mask.shape)}; per-token tensors and "
                "their completion mask must have the same [B, T] shape (same padding)"
            )
        if not bool(torch.isfinite(x.detach())[mask].all()):
            raise ValueError(f"{name} has NaN or inf at completion positions; check the model outputs / inputs")
    return mask


def _check_pair(mask_w: torch.Tensor, mask_l: torch.Tensor, side_w: dict, side_l: dict) -> tuple[torch.Tensor, torch.Tensor]:
    mask_w = _check_side(mask_w, "mask_w", side_w)
    mask_l = _check_side(mask_l, "mask_l", side_l)
    if mask_w.shape[0] != mask_l.shape[0]:
        raise ValueError(
            f"chosen batch size {mask_w.shape[0]} != rejected batch size {mask_l.shape[0]}: chosen and rejected are "
            "paired by row, pass one rejected completion per chosen one"
        )
    return mask_w, mask_l


def _msum(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ_t over completion positions; padded positions (even NaN/inf) contribute nothing, also to the gradient."""
    return torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device)).sum(-1)


def _z(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Zero the padded positions before any arithmetic: NaN/inf garbage there must not reach values or gradients
    (0·NaN = NaN in a product's backward)."""
    return torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))


def _reduce(per_pair: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return per_pair.mean()
    if reduction == "sum":
        return per_pair.sum()
    return per_pair


def _pair_metrics(r_w: torch.Tensor, r_l: torch.Tensor) -> dict[str, torch.Tensor]:
    r_w, r_l = r_w.detach(), r_l.detach()
    return {
        "rewards/chosen": r_w.mean(),
        "rewards/rejected": r_l.mean(),
        "rewards/margins": (r_w - r_l).mean(),
        "rewards/accuracy": (r_w > r_l).float().mean(),
    }


def _logsig_loss(z: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    if label_smoothing == 0.0:
        return -F.logsigmoid(z)
    return -(1.0 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)


# ---------------------------------------------------------------------------------------------- ALN-1: DPO
def token_rewards(pol_lp: torch.Tensor, ref_lp: torch.Tensor, mask: torch.Tensor, beta: float = 0.1) -> torch.Tensor:
    """Implicit per-token DPO reward r̂_t = β·(log π_θ(y_t∣x, y<t) − log π_ref(y_t∣x, y<t)), 0 outside the mask.

    Rafailov et al. 2024, "From r to Q*: Your Language Model is Secretly a Q-Function" (the token-level reading
    of DPO's implicit reward, Rafailov et al. 2023).

    Args:
        pol_lp: ``[B, T]`` policy per-token log-probs.
        ref_lp: ``[B, T]`` reference per-token log-probs.
        mask: ``[B, T]`` boolean completion mask.
        beta: the DPO temperature β > 0.

    Returns:
        ``[B, T]`` rewards (differentiable through ``pol_lp``).

    Examples:
        >>> import torch
        >>> r = token_rewards(torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.5, -1.0]]),
        ...                   torch.tensor([[True, False]]), beta=0.5)
        >>> r.tolist()
        [[0.25, 0.0]]
    """
    _check_beta(beta)
    mask = _check_side(mask, "mask", {"pol_lp": pol_lp, "ref_lp": ref_lp})
    return beta * (_z(pol_lp, mask) - _z(ref_lp, mask))


def dpo(
    pol_lp_w: torch.Tensor,
    pol_lp_l: torch.Tensor,
    ref_lp_w: torch.Tensor,
    ref_lp_l: torch.Tensor,
    mask_w: torch.Tensor,
    mask_l: torch.Tensor,
    beta: float = 0.1,
    weights_w: torch.Tensor | None = None,
    weights_l: torch.Tensor | None = None,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    ipo_average: bool = True,
    reduction: str = "mean",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Token-weighted DPO (sigmoid, IPO or hinge); unit weights give DPO (Rafailov et al. 2023, "Direct Preference
    Optimization: Your Language Model is Secretly a Reward Model", Eq. 7).

    h = Σ_t w^w_t·Δ_t(y_w) − Σ_t w^l_t·Δ_t(y_l)   (sums over completion tokens; w ≡ 1 without weights)

    - ``"sigmoid"``: L = −log σ(β·h); with ``label_smoothing`` ε (conservative DPO, Mitchell 2023):
      L = −(1−ε)·log σ(β·h) − ε·log σ(−β·h).
    - ``"ipo"`` (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
      Preferences", Eq. 17, β playing τ): L = (h − 1/(2β))². With ``ipo_average=True`` (default, TRL's
      convention, confirmed by the IPO authors per TRL) each side's sum is divided by its number of completion
      tokens: h = Σ_t w^w_t·Δ_t(y_w)/|y_w| − Σ_t w^l_t·Δ_t(y_l)/|y_l|.
    - ``"hinge"`` (SLiC, Zhao et al. 2023): L = max(0, 1 − β·h).

    Args:
        pol_lp_w: ``[B, T_w]`` policy log-probs of the chosen completions (0 outside ``mask_w``).
        pol_lp_l: ``[B, T_l]`` policy log-probs of the rejected completions.
        ref_lp_w: ``[B, T_w]`` reference log-probs of the chosen completions.
        ref_lp_l: ``[B, T_l]`` reference log-probs of the rejected completions.
        mask_w: ``[B, T_w]`` boolean completion mask of the chosen completions.
        mask_l: ``[B, T_l]`` boolean completion mask of the rejected completions.
        beta: β > 0.
        weights_w: optional ``[B, T_w]`` per-token weights of the chosen tokens (default 1).
        weights_l: optional ``[B, T_l]`` per-token weights of the rejected tokens (default 1).
        loss_type: ``"sigmoid"``, ``"ipo"`` or ``"hinge"``.
        label_smoothing: ε in [0, 0.5), sigmoid loss only.
        ipo_average: IPO only: average (True) or sum (False) the per-token log-ratios.
        reduction: ``"mean"`` over pairs, ``"sum"`` or ``"none"`` (``[B]``).

    Returns:
        ``(loss, metrics)``; metrics ``rewards/chosen`` (mean of β·Σ_t w^w_t·Δ_t(y_w)), ``rewards/rejected``,
        ``rewards/margins``, ``rewards/accuracy`` (fraction of pairs with chosen reward > rejected reward).

    Examples:
        >>> import torch
        >>> m = torch.ones(1, 2, dtype=torch.bool)
        >>> z = torch.zeros(1, 2)
        >>> loss, metrics = dpo(z, z, z, z, m, m, beta=0.1)
        >>> round(loss.item(), 4)  # log 2: policy == reference
        0.6931
    """
    _check_beta(beta)
    _check_reduction(reduction)
    if loss_type not in ("sigmoid", "ipo", "hinge"):
        raise ValueError(f"loss_type must be 'sigmoid', 'ipo' or 'hinge', got {loss_type!r}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if label_smoothing and loss_type != "sigmoid":
        raise ValueError("label_smoothing only applies to loss_type='sigmoid'")
    mask_w, mask_l = _check_pair(
        mask_w,
        mask_l,
        {"pol_lp_w": pol_lp_w, "ref_lp_w": ref_lp_w, "weights_w": weights_w},
        {"pol_lp_l": pol_lp_l, "ref_lp_l": ref_lp_l, "weights_l": weights_l},
    )
    d_w = _z(pol_lp_w, mask_w) - _z(ref_lp_w, mask_w)
    d_l = _z(pol_lp_l, mask_l) - _z(ref_lp_l, mask_l)
    if weights_w is not None:
        d_w = _z(weights_w, mask_w) * d_w
    if weights_l is not None:
        d_l = _z(weights_l, mask_l) * d_l
    s_w, s_l = _msum(d_w, mask_w), _msum(d_l, mask_l)
    if loss_type == "sigmoid":
        per_pair = _logsig_loss(beta * (s_w - s_l), label_smoothing)
    elif loss_type == "hinge":
        per_pair = torch.relu(1.0 - beta * (s_w - s_l))
    else:
        if ipo_average:
            h = s_w / mask_w.sum(-1).to(s_w.dtype) - s_l / mask_l.sum(-1).to(s_l.dtype)
        else:
            h = s_w - s_l
        per_pair = (h - 1.0 / (2.0 * beta)) ** 2
    return _reduce(per_pair, reduction), _pair_metrics(beta * s_w, beta * s_l)


# --------------------------------------------------------------------------------------------- ALN-2: TDPO
def tdpo(
    pol_lp_w: torch.Tensor,
    pol_lp_l: torch.Tensor,
    ref_lp_w: torch.Tensor,
    ref_lp_l: torch.Tensor,
    mask_w: torch.Tensor,
    mask_l: torch.Tensor,
    kl_w: torch.Tensor,
    kl_l: torch.Tensor,
    beta: float = 0.1,
    alpha: float = 0.5,
    variant: int = 1,
    reduction: str = "mean",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Token-level DPO (Zeng et al. 2024, "Token-level Direct Preference Optimization", ICML; Eqs. for
    L_TDPO1 / L_TDPO2 in Sec. 4).

    D(x, y) = Σ_t KL(π_ref(·∣x, y<t) ‖ π_θ(·∣x, y<t)) (the sequential KL, reference first: the paper's
    D_SeqKL(x, y; π_ref ‖ π_θ)), u = Σ_t Δ_t(y_w) − Σ_t Δ_t(y_l):

    - TDPO1: L = −log σ(β·[u − (D(x, y_l) − D(x, y_w))])
    - TDPO2: L = −log σ(β·[u − α·(D(x, y_l) − sg[D(x, y_w)])])

    Compute ``kl_w`` with ``token_kl(ref_logits, policy_logits, mask)`` at the positions whose log-probs are
    in ``pol_lp_w`` (the distribution that predicts y_t). The paper recommends TDPO1 for small learning rates,
    TDPO2 (α = 0.5) for larger ones. With zero KL both reduce to DPO.

    Args:
        pol_lp_w: ``[B, T_w]`` policy log-probs of the chosen completions.
        pol_lp_l: ``[B, T_l]`` policy log-probs of the rejected completions.
        ref_lp_w: ``[B, T_w]`` reference log-probs of the chosen completions.
        ref_lp_l: ``[B, T_l]`` reference log-probs of the rejected completions.
        mask_w: ``[B, T_w]`` boolean completion mask (chosen).
        mask_l: ``[B, T_l]`` boolean completion mask (rejected).
        kl_w: ``[B, T_w]`` per-token KL(π_ref ‖ π_θ) along the chosen completions (differentiable).
        kl_l: ``[B, T_l]`` per-token KL(π_ref ‖ π_θ) along the rejected completions.
        beta: β > 0.
        alpha: α > 0, TDPO2 only.
        variant: 1 or 2.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Returns:
        ``(loss, metrics)``: the DPO reward metrics plus ``seq_kl/chosen``, ``seq_kl/rejected`` (mean D).

    Examples:
        >>> import torch
        >>> m = torch.ones(1, 3, dtype=torch.bool)
        >>> z = torch.zeros(1, 3)
        >>> loss, metrics = tdpo(z, z, z, z, m, m, z, z, variant=2)
        >>> round(loss.item(), 4)
        0.6931
    """
    _check_beta(beta)
    _check_reduction(reduction)
    if variant not in (1, 2):
        raise ValueError(f"variant must be 1 (TDPO1) or 2 (TDPO2), got {variant!r}")
    if variant == 2:
        _check_beta(alpha, "alpha")
    mask_w, mask_l = _check_pair(
        mask_w,
        mask_l,
        {"pol_lp_w": pol_lp_w, "ref_lp_w": ref_lp_w, "kl_w": kl_w},
        {"pol_lp_l": pol_lp_l, "ref_lp_l": ref_lp_l, "kl_l": kl_l},
    )
    s_w = _msum(_z(pol_lp_w, mask_w) - _z(ref_lp_w, mask_w), mask_w)
    s_l = _msum(_z(pol_lp_l, mask_l) - _z(ref_lp_l, mask_l), mask_l)
    D_w, D_l = _msum(kl_w, mask_w), _msum(kl_l, mask_l)
    u = s_w - s_l
    delta = D_l - D_w if variant == 1 else alpha * (D_l - D_w.detach())
    per_pair = -F.logsigmoid(beta * (u - delta))
    metrics = _pair_metrics(beta * s_w, beta * s_l)
    metrics["seq_kl/chosen"] = D_w.detach().mean()
    metrics["seq_kl/rejected"] = D_l.detach().mean()
    return _reduce(per_pair, reduction), metrics


# ----------------------------------------------------------------------------------------- ALN-3: SparsePO
def sparsepo(
    pol_lp_w: torch.Tensor,
    pol_lp_l: torch.Tensor,
    ref_lp_w: torch.Tensor,
    ref_lp_l: torch.Tensor,
    mask_w: torch.Tensor,
    mask_l: torch.Tensor,
    kl_w: torch.Tensor,
    kl_l: torch.Tensor,
    m_u_w: torch.Tensor,
    m_u_l: torch.Tensor,
    m_d_w: torch.Tensor,
    m_d_l: torch.Tensor,
    beta: float = 0.1,
    l1_u: float = 0.0,
    l1_d: float = 0.0,
    reduction: str = "mean",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SparsePO (Christopoulou et al. 2024, "SparsePO: Controlling Preference Alignment of LLMs via Sparse Token
    Masks"): token masks on the reward and on the KL term of TDPO1.

    u = Σ_t m_u(y_w)_t·Δ_t(y_w) − Σ_t m_u(y_l)_t·Δ_t(y_l)
    d = Σ_t m_d(y_l)_t·KL_t(y_l) − Σ_t m_d(y_w)_t·KL_t(y_w)
    L = −log σ(β·(u − d)) + λ_u·‖m_u‖₁ + λ_d·‖m_d‖₁

    The L1 terms are per pair the mean of |m| over that pair's completion tokens (chosen and rejected tokens
    pooled, padding excluded), so λ does not scale with length and the batch loss is the mean of per-pair
    losses. m ≡ 1 gives TDPO1; m_u ≡ 1, m_d ≡ 0 gives DPO. Masks come from :class:`MaskModel` (learned) or
    any non-negative ``[B, T]`` tensor (e.g. the paper's reference-activation masks); pass the same tensor
    as ``m_u`` and ``m_d`` for the paper's "common mask" setting.

    Args:
        pol_lp_w: ``[B, T_w]`` policy log-probs of the chosen completions.
        pol_lp_l: ``[B, T_l]`` policy log-probs of the rejected completions.
        ref_lp_w: ``[B, T_w]`` reference log-probs of the chosen completions.
        ref_lp_l: ``[B, T_l]`` reference log-probs of the rejected completions.
        mask_w: ``[B, T_w]`` boolean completion mask (chosen).
        mask_l: ``[B, T_l]`` boolean completion mask (rejected).
        kl_w: ``[B, T_w]`` per-token KL(π_ref ‖ π_θ), chosen.
        kl_l: ``[B, T_l]`` per-token KL(π_ref ‖ π_θ), rejected.
        m_u_w: ``[B, T_w]`` reward mask on the chosen tokens.
        m_u_l: ``[B, T_l]`` reward mask on the rejected tokens.
        m_d_w: ``[B, T_w]`` KL mask on the chosen tokens.
        m_d_l: ``[B, T_l]`` KL mask on the rejected tokens.
        beta: β > 0.
        l1_u: λ_u ≥ 0, L1 weight of the reward mask.
        l1_d: λ_d ≥ 0, L1 weight of the KL mask.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Returns:
        ``(loss, metrics)``: reward metrics (masked rewards β·Σ m_u·Δ), ``seq_kl/*`` (masked KL sums),
        ``mask_u/mean``, ``mask_d/mean``, ``mask_u/sparsity`` and ``mask_d/sparsity`` (fraction of completion
        tokens with m == 0).

    Examples:
        >>> import torch
        >>> m = torch.ones(1, 2, dtype=torch.bool)
        >>> z, one = torch.zeros(1, 2), torch.ones(1, 2)
        >>> loss, _ = sparsepo(z, z, z, z, m, m, z, z, one, one, one, one, l1_u=0.5)
        >>> round(loss.item(), 4)  # log 2 + 0.5 · mean|m_u|
        1.1931
    """
    _check_beta(beta)
    _check_reduction(reduction)
    if l1_u < 0 or l1_d < 0:
        raise ValueError(f"l1_u and l1_d must be >= 0, got {l1_u}, {l1_d}")
    mask_w, mask_l = _check_pair(
        mask_w,
        mask_l,
        {"pol_lp_w": pol_lp_w, "ref_lp_w": ref_lp_w, "kl_w": kl_w, "m_u_w": m_u_w, "m_d_w": m_d_w},
        {"pol_lp_l": pol_lp_l, "ref_lp_l": ref_lp_l, "kl_l": kl_l, "m_u_l": m_u_l, "m_d_l": m_d_l},
    )
    pol_lp_w, ref_lp_w, kl_w, m_u_w, m_d_w = (_z(x, mask_w) for x in (pol_lp_w, ref_lp_w, kl_w, m_u_w, m_d_w))
    pol_lp_l, ref_lp_l, kl_l, m_u_l, m_d_l = (_z(x, mask_l) for x in (pol_lp_l, ref_lp_l, kl_l, m_u_l, m_d_l))
    r_w = _msum(m_u_w * (pol_lp_w - ref_lp_w), mask_w)
    r_l = _msum(m_u_l * (pol_lp_l - ref_lp_l), mask_l)
    k_w, k_l = _msum(m_d_w * kl_w, mask_w), _msum(m_d_l * kl_l, mask_l)
    u, d = r_w - r_l, k_l - k_w
    per_pair = -F.logsigmoid(beta * (u - d))
    n = (mask_w.sum(-1) + mask_l.sum(-1)).to(per_pair.dtype)
    l1u = (_msum(m_u_w.abs(), mask_w) + _msum(m_u_l.abs(), mask_l)) / n
    l1d = (_msum(m_d_w.abs(), mask_w) + _msum(m_d_l.abs(), mask_l)) / n
    if l1_u:
        per_pair = per_pair + l1_u * l1u
    if l1_d:
        per_pair = per_pair + l1_d * l1d
    metrics = _pair_metrics(beta * r_w, beta * r_l)
    zero_u = (_msum((m_u_w.detach() == 0).to(n.dtype), mask_w) + _msum((m_u_l.detach() == 0).to(n.dtype), mask_l)) / n
    zero_d = (_msum((m_d_w.detach() == 0).to(n.dtype), mask_w) + _msum((m_d_l.detach() == 0).to(n.dtype), mask_l)) / n
    metrics.update(
        {
            "seq_kl/chosen": k_w.detach().mean(),
            "seq_kl/rejected": k_l.detach().mean(),
            "mask_u/mean": l1u.detach().mean(),
            "mask_d/mean": l1d.detach().mean(),
            "mask_u/sparsity": zero_u.mean(),
            "mask_d/sparsity": zero_d.mean(),
        }
    )
    return _reduce(per_pair, reduction), metrics


class MaskModel(nn.Module):
    """SparsePO's learned token mask over reference hidden states (Christopoulou et al. 2024, Sec. 3):

    m_t = ReLU(Σ_l a_l · ReLU(w_l · LN_l(h_{l,t}) + b_l))

    one LayerNorm, one ``d → 1`` projection (w_l, b_l) and one mixing scalar a_l per layer. The outer ReLU makes
    exact zeros possible (sparsity). Feed it the reference model's hidden states (read through ``adapter.hooks``
    by the trainer); this module only takes tensors. Mask positions the same way as the log-probs (the hidden
    state that predicts y_t).

    Args:
        hidden_size: d, the width of each hidden state.
        num_layers: how many hidden-state tensors are passed to :meth:`forward`.
        init_bias: initial b_l (a positive value starts with m ≈ Σ a_l·b_l > 0, i.e. dense masks).

    Examples:
        >>> import torch
        >>> mm = MaskModel(hidden_size=8, num_layers=2)
        >>> mm([torch.randn(3, 5, 8), torch.randn(3, 5, 8)]).shape
        torch.Size([3, 5])
    """

    def __init__(self, hidden_size: int, num_layers: int, init_bias: float = 1.0) -> None:
        super().__init__()
        if hidden_size < 1 or num_layers < 1:
            raise ValueError(f"hidden_size and num_layers must be >= 1, got {hidden_size}, {num_layers}")
        self.norms = nn.ModuleList(nn.LayerNorm(hidden_size) for _ in range(num_layers))
        self.proj = nn.ModuleList(nn.Linear(hidden_size, 1) for _ in range(num_layers))
        for p in self.proj:
            nn.init.normal_(p.weight, std=hidden_size**-0.5 * 0.1)
            nn.init.constant_(p.bias, init_bias)
        self.mix = nn.Parameter(torch.full((num_layers,), 1.0 / num_layers))

    def forward(self, hidden_states: Sequence[torch.Tensor]) -> torch.Tensor:
        """``[B, T, d]`` per layer → mask ``[B, T]`` (≥ 0)."""
        if len(hidden_states) != len(self.proj):
            raise ValueError(f"MaskModel was built for {len(self.proj)} layers, got {len(hidden_states)} tensors")
        total = None
        for a, ln, lin, h in zip(self.mix, self.norms, self.proj, hidden_states, strict=True):
            if h.dim() != 3 or h.shape[-1] != lin.in_features:
                raise ValueError(f"hidden states must be [B, T, {lin.in_features}], got {tuple(h.shape)}")
            term = a * torch.relu(lin(ln(h.to(lin.weight.dtype)))[..., 0])
            total = term if total is None else total + term
        return torch.relu(total)


# ---------------------------------------------------------------------------------------------- ALN-4: cDPO
def contrastive_token_weights(
    pos_logits: torch.Tensor,
    neg_logits: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    chunk: int = 1024,
) -> torch.Tensor:
    """cDPO token weights from contrastive estimation (Lin et al. 2024, "Critical Tokens Matter: Token-Level
    Contrastive Estimation Enhances LLM's Reasoning Capability"):

    s_t = softmax((1+γ)·z⁺_t − γ·z⁻_t)[y_t],   w_t = 1 − s_t

    with z⁺ / z⁻ the logits of the models fine-tuned on correct / incorrect trajectories at the position that
    predicts y_t; γ = 1 gives METHODS.md's softmax(2z⁺ − z⁻). A token the negative model likes much more than
    the positive one (a critical token) gets s_t ≈ 0, w_t ≈ 1. Because softmax is shift-invariant per position,
    raw logits and log-softmaxed logits give the same s_t. The exact form of s_t is marked (verify) in
    METHODS.md; γ keeps it adjustable. Computed in position chunks with one logsumexp (no softmax().log()).

    Args:
        pos_logits: ``[B, T, V]`` logits of the positive model.
        neg_logits: ``[B, T, V]`` logits of the negative model.
        targets: ``[B, T]`` token ids y_t.
        mask: ``[B, T]`` boolean completion mask; weights are 0 outside it.
        gamma: γ ≥ 0, the contrast strength.
        chunk: positions per chunk.

    Returns:
        ``[B, T]`` weights in [0, 1], detached (weights are constants of the loss).

    Examples:
        >>> import torch
        >>> z = torch.zeros(1, 1, 4)  # both models uniform: s = 1/4
        >>> contrastive_token_weights(z, z, torch.tensor([[2]]), torch.tensor([[True]])).tolist()
        [[0.75]]
    """
    if pos_logits.shape != neg_logits.shape:
        raise ValueError(
            f"pos_logits {tuple(pos_logits.shape)} and neg_logits {tuple(neg_logits.shape)} differ; both models "
            "must share the policy's tokenizer and positions"
        )
    if pos_logits.dim() != 3 or pos_logits.shape[:2] != targets.shape:
        raise ValueError(f"logits must be [B, T, V] and targets [B, T], got {tuple(pos_logits.shape)}, "
                         f"{tuple(targets.shape)}")
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    mask = _as_mask(mask, "mask")
    if mask.shape != targets.shape:
        raise ValueError(f"mask {tuple(mask.shape)} must match targets {tuple(targets.shape)}")
    V = pos_logits.shape[-1]
    zp, zn = pos_logits.detach().reshape(-1, V), neg_logits.detach().reshape(-1, V)
    tgt = targets.reshape(-1)
    log_s = torch.empty(tgt.shape[0], dtype=torch.float32, device=pos_logits.device)
    for s in range(0, tgt.shape[0], chunk):
        u = (1.0 + gamma) * zp[s : s + chunk].float() - gamma * zn[s : s + chunk].float()
        log_s[s : s + chunk] = u.gather(-1, tgt[s : s + chunk, None])[:, 0] - torch.logsumexp(u, dim=-1)
    w = 1.0 - log_s.exp().reshape(targets.shape)
    if not bool(torch.isfinite(w)[mask].all()):
        raise ValueError("contrastive weights are NaN/inf at completion positions; check the logits")
    return torch.where(mask, w, torch.zeros((), dtype=w.dtype, device=w.device))


def cdpo(
    pol_lp_w: torch.Tensor,
    pol_lp_l: torch.Tensor,
    ref_lp_w: torch.Tensor,
    ref_lp_l: torch.Tensor,
    mask_w: torch.Tensor,
    mask_l: torch.Tensor,
    weights_l: torch.Tensor,
    beta: float = 0.1,
    weights_w: torch.Tensor | None = None,
    reduction: str = "mean",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """cDPO (Lin et al. 2024, "Critical Tokens Matter"): token-weighted sigmoid DPO whose rejected-token weights
    come from :func:`contrastive_token_weights` and chosen weights are 1 by default:

    L = −log σ(β·[Σ_t w^w_t·Δ_t(y_w) − Σ_t w^l_t·Δ_t(y_l)]),  w^l_t = 1 − s_t(y_l),  w^w ≡ 1

    This is the sum form of ALN-1 (the reference implementation's position-paired mean is not reproduced).

    Args:
        pol_lp_w: ``[B, T_w]`` policy log-probs of the chosen completions.
        pol_lp_l: ``[B, T_l]`` policy log-probs of the rejected completions.
        ref_lp_w: ``[B, T_w]`` reference log-probs of the chosen completions.
        ref_lp_l: ``[B, T_l]`` reference log-probs of the rejected completions.
        mask_w: ``[B, T_w]`` boolean completion mask (chosen).
        mask_l: ``[B, T_l]`` boolean completion mask (rejected).
        weights_l: ``[B, T_l]`` critical-token weights of the rejected tokens.
        beta: β > 0.
        weights_w: optional ``[B, T_w]`` chosen weights (default 1).
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Returns:
        ``(loss, metrics)`` as :func:`dpo`.
    """
    return dpo(
        pol_lp_w, pol_lp_l, ref_lp_w, ref_lp_l, mask_w, mask_l, beta=beta,
        weights_w=weights_w, weights_l=weights_l, reduction=reduction,
    )


# --------------------------------------------------------------------------------------------- ALN-5: T-REG
_TREG_NORMS = ("softmax", "sigmoid", "none")
_TREG_FORMS = ("weighted", "mse", "cosine")


def self_contrastive_token_rewards(
    lp_better: torch.Tensor,
    lp_worse: torch.Tensor,
    mask: torch.Tensor,
    normalize: str = "softmax",
    temperature: float = 1.0,
) -> torch.Tensor:
    """Self-generated token rewards by contrastive prompting (Zhou et al. 2024, "T-REG: Preference Optimization
    with Token-Level Reward Regularization"):

    r_t = log π(y_t∣x_better, y<t) − log π(y_t∣x_worse, y<t)

    where x_better / x_worse are the prompt with an instruction to answer better / worse, scored on the same
    response tokens. Normalisation per sequence over its completion tokens (``normalize``; the paper's exact
    choice is marked (verify) in METHODS.md, so it is pluggable):

    - ``"softmax"`` (default): r̃_t = n·softmax_t(r_t/τ) over the n completion tokens (mean 1, Σ_t r̃_t = n);
    - ``"sigmoid"``: r̃_t = 2·σ(r_t/τ) − 1 ∈ (−1, 1) (sign kept, per-token, no length coupling);
    - ``"none"``: r̃_t = r_t.

    Args:
        lp_better: ``[B, T]`` per-token log-probs of y under the "better" prompt.
        lp_worse: ``[B, T]`` per-token log-probs of y under the "worse" prompt.
        mask: ``[B, T]`` boolean completion mask.
        normalize: ``"softmax"``, ``"sigmoid"`` or ``"none"``.
        temperature: τ > 0.

    Returns:
        ``[B, T]`` detached rewards, 0 outside the mask.

    Examples:
        >>> import torch
        >>> r = self_contrastive_token_rewards(torch.tensor([[-1.0, -1.0]]), torch.tensor([[-2.0, -1.0]]),
        ...                                    torch.tensor([[True, True]]), normalize="none")
        >>> r.tolist()
        [[1.0, 0.0]]
    """
    if normalize not in _TREG_NORMS:
        raise ValueError(f"normalize must be one of {_TREG_NORMS}, got {normalize!r}")
    _check_beta(temperature, "temperature")
    mask = _check_side(mask, "mask", {"lp_better": lp_better, "lp_worse": lp_worse})
    r = (lp_better - lp_worse).detach() / temperature
    zero = torch.zeros((), dtype=r.dtype, device=r.device)
    if normalize == "softmax":
        n = mask.sum(-1, keepdim=True).to(r.dtype)
        r = n * torch.softmax(torch.where(mask, r, torch.full((), -math.inf, dtype=r.dtype, device=r.device)), -1)
    elif normalize == "sigmoid":
        r = 2.0 * torch.sigmoid(r) - 1.0
    return torch.where(mask, r, zero)


def treg_regularizer(
    r_hat: torch.Tensor,
    r_self: torch.Tensor,
    mask: torch.Tensor,
    form: str = "weighted",
) -> torch.Tensor:
    """T-REG's token-level reward regulariser L_REG(r̂, r^self) per sequence (Zhou et al. 2024; the exact form is
    marked (verify) in METHODS.md, hence ``form``):

    - ``"weighted"`` (default): L = −log σ(Σ_t sg[r^self_t]·r̂_t): the implicit token rewards, weighted by the
      self-generated ones, should form a positive sequence reward (tokens the model itself rates as better
      should carry positive implicit reward, worse ones negative);
    - ``"mse"``: L = mean_t (r̂_t − r^self_t)²;
    - ``"cosine"``: L = 1 − cos(r̂, r^self) over the completion tokens.

    Args:
        r_hat: ``[B, T]`` implicit token rewards β·Δ_t (:func:`token_rewards`), differentiable.
        r_self: ``[B, T]`` self-generated rewards (:func:`self_contrastive_token_rewards`); treated as constants.
        mask: ``[B, T]`` boolean completion mask.
        form: ``"weighted"``, ``"mse"`` or ``"cosine"``.

    Returns:
        ``[B]`` per-sequence regulariser.

    Examples:
        >>> import torch
        >>> m = torch.tensor([[True, True]])
        >>> treg_regularizer(torch.tensor([[1.0, -1.0]]), torch.tensor([[1.0, -1.0]]), m, form="mse").tolist()
        [0.0]
    """
    if form not in _TREG_FORMS:
        raise ValueError(f"form must be one of {_TREG_FORMS}, got {form!r}")
    mask = _check_side(mask, "mask", {"r_hat": r_hat, "r_self": r_self})
    rs, r_hat = _z(r_self.detach(), mask), _z(r_hat, mask)
    if form == "weighted":
        return -F.logsigmoid(_msum(rs * r_hat, mask))
    if form == "mse":
        return _msum((r_hat - rs) ** 2, mask) / mask.sum(-1).to(r_hat.dtype)
    dot = _msum(rs * r_hat, mask)
    nh = _msum(r_hat * r_hat, mask).clamp_min(1e-24).sqrt()
    ns = _msum(rs * rs, mask).clamp_min(1e-24).sqrt()
    return 1.0 - dot / (nh * ns)


def treg(
    pol_lp_w: torch.Tensor,
    pol_lp_l: torch.Tensor,
    ref_lp_w: torch.Tensor,
    ref_lp_l: torch.Tensor,
    mask_w: torch.Tensor,
    mask_l: torch.Tensor,
    r_self_w: torch.Tensor,
    r_self_l: torch.Tensor,
    beta: float = 0.1,
    alpha: float = 1.0,
    form: str = "weighted",
    reduction: str = "mean",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """T-REG (Zhou et al. 2024): L = L_DPO + α·(L_REG(r̂(y_w), r^self(y_w)) + L_REG(r̂(y_l), r^self(y_l)))

    with r̂_t = β·Δ_t (:func:`token_rewards`) and r^self from :func:`self_contrastive_token_rewards` computed on
    each completion. The regulariser applies to both completions of a pair (self-rewards are per token, not
    per preference label). α is a constant here; a schedule (the paper's, marked (verify)) belongs to the
    trainer.

    Args:
        pol_lp_w: ``[B, T_w]`` policy log-probs of the chosen completions.
        pol_lp_l: ``[B, T_l]`` policy log-probs of the rejected completions.
        ref_lp_w: ``[B, T_w]`` reference log-probs of the chosen completions.
        ref_lp_l: ``[B, T_l]`` reference log-probs of the rejected completions.
        mask_w: ``[B, T_w]`` boolean completion mask (chosen).
        mask_l: ``[B, T_l]`` boolean completion mask (rejected).
        r_self_w: ``[B, T_w]`` self-generated token rewards of the chosen completions.
        r_self_l: ``[B, T_l]`` self-generated token rewards of the rejected completions.
        beta: β > 0.
        alpha: α ≥ 0, the regulariser weight.
        form: :func:`treg_regularizer` form.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Returns:
        ``(loss, metrics)``: DPO metrics plus ``treg/dpo`` and ``treg/reg`` (mean per-pair terms).
    """
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")
    _check_reduction(reduction)
    l_dpo, metrics = dpo(pol_lp_w, pol_lp_l, ref_lp_w, ref_lp_l, mask_w, mask_l, beta=beta, reduction="none")
    mask_w, mask_l = _as_mask(mask_w, "mask_w"), _as_mask(mask_l, "mask_l")
    reg = treg_regularizer(token_rewards(pol_lp_w, ref_lp_w, mask_w, beta), r_self_w, mask_w, form) + treg_regularizer(
        token_rewards(pol_lp_l, ref_lp_l, mask_l, beta), r_self_l, mask_l, form
    )
    metrics["treg/dpo"] = l_dpo.detach().mean()
    metrics["treg/reg"] = reg.detach().mean()
    return _reduce(l_dpo + alpha * reg, reduction), metrics


# ---------------------------------------------------------------------------------------- ALN-7: AlignDistil
def aligndistil_target(
    z_dpo: torch.Tensor,
    z_rdpo: torch.Tensor,
    beta: float,
    beta2: float,
    tau: float = 1.0,
    eps: float = 1e-3,
    chunk: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """AlignDistil's token-adaptive teacher (Zhang et al. 2025, "AlignDistil: Token-Level Language Model Alignment
    as Adaptive Policy Distillation"), per METHODS.md ALN-7:

    TVD_t = Σ_v |p_dpo,v − p_rdpo,v|   (the L1 distance, twice the usual TVD),
    w_t = β₂·TVD_t + ε,   coefficient_t = β / w_t,
    z⋆_t = w_t·(z_dpo,t − z_rdpo,t) + z_dpo,t,   target logits = z⋆_t / τ

    with p = softmax(z) of the DPO and the reverse-DPO model at each position. Tokens on which the two models
    disagree get a stronger extrapolation (larger w_t) and a weaker KL coefficient.

    Args:
        z_dpo: ``[..., V]`` logits of the DPO model.
        z_rdpo: ``[..., V]`` logits of the reverse-DPO model (trained with chosen/rejected swapped).
        beta: β > 0, the base KL coefficient.
        beta2: β₂ > 0, the extrapolation scale.
        tau: τ > 0, teacher temperature.
        eps: ε > 0 added to w_t.
        chunk: positions per chunk.

    Returns:
        ``(target_logits [..., V] fp32, coefficient [...] fp32)``, both detached (a teacher is a constant).

    Examples:
        >>> import torch
        >>> z = torch.randn(2, 3, 5)
        >>> t, c = aligndistil_target(z, z, beta=0.1, beta2=1.0)
        >>> bool(torch.allclose(t, z)), round(c[0, 0].item(), 4)  # identical models: no extrapolation
        (True, 100.0)
    """
    if z_dpo.shape != z_rdpo.shape:
        raise ValueError(f"z_dpo {tuple(z_dpo.shape)} and z_rdpo {tuple(z_rdpo.shape)} differ; same tokenizer needed")
    for name, v in (("beta", beta), ("beta2", beta2), ("tau", tau), ("eps", eps)):
        _check_beta(v, name)
    V = z_dpo.shape[-1]
    a, b = z_dpo.detach().reshape(-1, V), z_rdpo.detach().reshape(-1, V)
    target = torch.empty(a.shape, dtype=torch.float32, device=a.device)
    coef = torch.empty(a.shape[0], dtype=torch.float32, device=a.device)
    for s in range(0, a.shape[0], chunk):
        za, zb = a[s : s + chunk].float(), b[s : s + chunk].float()
        tvd = (torch.softmax(za, -1) - torch.softmax(zb, -1)).abs().sum(-1)
        w = beta2 * tvd + eps
        target[s : s + chunk] = (w[:, None] * (za - zb) + za) / tau
        coef[s : s + chunk] = beta / w
    if not bool(torch.isfinite(target).all()):
        raise ValueError("aligndistil target has NaN/inf; check z_dpo / z_rdpo")
    return target.reshape(z_dpo.shape), coef.reshape(z_dpo.shape[:-1])


class _ChunkedKL(torch.autograd.Function):
    """KL(softmax(a) ‖ softmax(b)) per row, forward and backward in row chunks: only the inputs are saved, so
    at most one chunk of ``[rows, V]`` fp32 temporaries is alive (also during backward)."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor, chunk: int) -> torch.Tensor:  # type: ignore[override]
        out = torch.empty(a.shape[0], dtype=torch.float32, device=a.device)
        for s in range(0, a.shape[0], chunk):
            la = torch.log_softmax(a[s : s + chunk].float(), -1)
            lb = torch.log_softmax(b[s : s + chunk].float(), -1)
            out[s : s + chunk] = (la.exp() * (la - lb)).sum(-1)
        ctx.save_for_backward(a, b, out)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        a, b, kl = ctx.saved_tensors
        need_a, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        ga = torch.empty_like(a) if need_a else None
        gb = torch.empty_like(b) if need_b else None
        for s in range(0, a.shape[0], ctx.chunk):
            la = torch.log_softmax(a[s : s + ctx.chunk].float(), -1)
            lb = torch.log_softmax(b[s : s + ctx.chunk].float(), -1)
            pa = la.exp()
            gs = g[s : s + ctx.chunk, None].float()
            if need_a:  # ∂KL/∂a_j = p_j·(log p_j − log q_j − KL)
                ga[s : s + ctx.chunk] = (gs * pa * (la - lb - kl[s : s + ctx.chunk, None])).to(a.dtype)
            if need_b:  # ∂KL/∂b_j = q_j − p_j
                gb[s : s + ctx.chunk] = (gs * (lb.exp() - pa)).to(b.dtype)
        return ga, gb, None


def aligndistil_loss(
    student_logits: torch.Tensor,
    target_logits: torch.Tensor,
    weights: torch.Tensor,
    mask: torch.Tensor,
    chunk: int = 1024,
    reduction: str = "mean",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """AlignDistil distillation loss (Zhang et al. 2025; METHODS.md ALN-7):

    L = Σ_t coefficient_t · KL(π_θ(·∣x, y<t) ‖ softmax(target_t))   (per sequence, over completion tokens)

    the reverse KL from the student to the teacher of :func:`aligndistil_target`. Chunked over positions in
    forward *and* backward (a custom autograd function saves only the input logits): never several
    ``[B, T, V]`` fp32 temporaries alive at once.

    Args:
        student_logits: ``[B, T, V]`` policy logits at the positions predicting the completion tokens.
        target_logits: ``[B, T, V]`` teacher logits (already divided by τ).
        weights: ``[B, T]`` per-token coefficients (β / w_t from :func:`aligndistil_target`).
        mask: ``[B, T]`` boolean completion mask.
        chunk: positions per chunk.
        reduction: ``"mean"`` over sequences, ``"sum"`` or ``"none"``.

    Returns:
        ``(loss, metrics)`` with ``kl/mean`` (unweighted KL per completion token).

    Examples:
        >>> import torch
        >>> z = torch.randn(1, 2, 5)
        >>> loss, _ = aligndistil_loss(z, z, torch.ones(1, 2), torch.ones(1, 2, dtype=torch.bool))
        >>> abs(loss.item()) < 1e-6
        True
    """
    _check_reduction(reduction)
    if student_logits.shape != target_logits.shape or student_logits.dim() != 3:
        raise ValueError(
            f"student_logits {tuple(student_logits.shape)} and target_logits {tuple(target_logits.shape)} must be "
            "the same [B, T, V] shape (same tokenizer, same positions)"
        )
    mask = _check_side(mask, "mask", {"weights": weights})
    if mask.shape != student_logits.shape[:2]:
        raise ValueError(f"mask {tuple(mask.shape)} must match logits [B, T] {tuple(student_logits.shape[:2])}")
    V = student_logits.shape[-1]
    sel = mask.reshape(-1).nonzero().flatten()  # only completion positions are computed
    a = student_logits.reshape(-1, V).index_select(0, sel)
    b = target_logits.reshape(-1, V).index_select(0, sel)
    kl_rows = _ChunkedKL.apply(a, b, chunk)
    kl = torch.zeros(mask.numel(), dtype=kl_rows.dtype, device=kl_rows.device).index_put((sel,), kl_rows)
    kl = kl.reshape(mask.shape)
    per_seq = _msum(_z(weights, mask) * kl, mask)
    n = mask.sum()
    return _reduce(per_seq, reduction), {"kl/mean": (kl.detach().sum() / n)}


# ---------------------------------------------------------------------------------------------- ALN-6: RTO
def rto_token_rewards(
    dpo_lp: torch.Tensor,
    ref_lp: torch.Tensor,
    policy_lp: torch.Tensor,
    seq_reward: torch.Tensor,
    mask: torch.Tensor,
    beta1: float = 0.05,
    clip: float = 0.05,
    kl_coef: float = 0.01,
    reward_clip: float = 10.0,
) -> torch.Tensor:
    """RTO dense token rewards for PPO (Zhong et al. 2024, "DPO Meets PPO: Reinforced Token Optimization for
    RLHF"; METHODS.md ALN-6):

    r_t = clip(β₁·[log π_dpo − log π_ref](y_t), −c, c) − β_KL·[log π_θ − log π_ref](y_t)
          + 1[t = last completion token]·clamp(r_RM, −10, 10)

    The DPO log-ratio is scaled by β₁ *before* clipping. The sequence reward is added at each row's last
    completion position (its last True in ``mask``, wherever the padding is). Rewards are constants for PPO:
    the result is detached. Advantages (GAE) belong to the trainer.

    Args:
        dpo_lp: ``[B, T]`` per-token log-probs of the DPO model.
        ref_lp: ``[B, T]`` per-token log-probs of the reference.
        policy_lp: ``[B, T]`` per-token log-probs of the current policy (sampling policy).
        seq_reward: ``[B]`` sequence-level reward-model scores.
        mask: ``[B, T]`` boolean completion mask.
        beta1: β₁ > 0, scale of the DPO token reward.
        clip: c > 0, clip of the scaled DPO token reward.
        kl_coef: β_KL ≥ 0.
        reward_clip: clamp of the sequence reward (10 in RTO).

    Returns:
        ``[B, T]`` detached rewards, 0 outside the mask.

    Examples:
        >>> import torch
        >>> z = torch.zeros(1, 3)
        >>> m = torch.tensor([[True, True, False]])
        >>> rto_token_rewards(z, z, z, torch.tensor([25.0]), m).tolist()
        [[0.0, 10.0, 0.0]]
    """
    for name, v in (("beta1", beta1), ("clip", clip), ("reward_clip", reward_clip)):
        _check_beta(v, name)
    if kl_coef < 0:
        raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
    mask = _check_side(mask, "mask", {"dpo_lp": dpo_lp, "ref_lp": ref_lp, "policy_lp": policy_lp})
    if not isinstance(seq_reward, torch.Tensor):
        seq_reward = torch.as_tensor(seq_reward, dtype=dpo_lp.dtype, device=dpo_lp.device)
    if seq_reward.shape != (mask.shape[0],):
        raise ValueError(f"seq_reward must be [B] = [{mask.shape[0]}], got {tuple(seq_reward.shape)}")
    if not bool(torch.isfinite(seq_reward).all()):
        raise ValueError("seq_reward has NaN or inf")
    with torch.no_grad():
        dense = torch.clamp(beta1 * (dpo_lp - ref_lp), -clip, clip) - kl_coef * (policy_lp - ref_lp)
        T = mask.shape[1]
        last = T - 1 - mask.flip(-1).to(torch.int64).argmax(-1)
        r = torch.where(mask, dense, torch.zeros((), dtype=dense.dtype, device=dense.device))
        bonus = torch.clamp(seq_reward.to(r.dtype), -reward_clip, reward_clip)
        r[torch.arange(mask.shape[0], device=r.device), last] += bonus
    return r


# --------------------------------------------------------------------------------------- ALN-8: Text2Grad
def spans_to_token_rewards(
    offsets: Sequence[tuple[int, int]] | torch.Tensor,
    spans: Sequence[tuple[int, int, float]],
    length: int | None = None,
    overlap: str = "mean",
) -> torch.Tensor:
    """Critique-span rewards broadcast to tokens by character offsets (Text2Grad, Wang et al. 2025, "Text2Grad:
    Reinforcement Learning from Natural Language Feedback").

    Token t with character range [s_t, e_t) receives the score of every span [a, b) it overlaps
    (s_t < b and a < e_t); zero-width tokens (special tokens, ``(0, 0)`` offsets) overlap nothing. Where
    several spans cover a token, ``overlap="mean"`` (default) averages their scores (the reward stays on the
    critique's scale), ``"sum"`` adds them. Tokens outside every span get 0.

    Args:
        offsets: per-token ``(start, end)`` character offsets into the response (``[T, 2]`` or list of pairs).
        spans: ``(char_start, char_end, score)`` critique spans, end exclusive.
        length: output length (≥ number of offsets; padding gets 0). Default ``len(offsets)``.
        overlap: ``"mean"`` or ``"sum"``.

    Returns:
        ``[length]`` float32 per-token rewards.

    Examples:
        >>> spans_to_token_rewards([(0, 3), (3, 8), (8, 12)], [(4, 6, -1.0), (8, 12, 1.0)]).tolist()
        [0.0, -1.0, 1.0]
    """
    if overlap not in ("mean", "sum"):
        raise ValueError(f"overlap must be 'mean' or 'sum', got {overlap!r}")
    off = torch.as_tensor(offsets, dtype=torch.int64).reshape(-1, 2)
    n = off.shape[0]
    length = n if length is None else int(length)
    if length < n:
        raise ValueError(f"length {length} is shorter than the {n} token offsets")
    if bool((off[:, 1] < off[:, 0]).any()):
        raise ValueError("token offsets must satisfy start <= end")
    total = torch.zeros(length, dtype=torch.float64)
    count = torch.zeros(length, dtype=torch.float64)
    for span in spans:
        if len(span) != 3:
            raise ValueError(f"each span must be (char_start, char_end, score), got {span!r}")
        a, b, score = int(span[0]), int(span[1]), float(span[2])
        if b < a:
            raise ValueError(f"span {span!r} has end < start")
        if not math.isfinite(score):
            raise ValueError(f"span {span!r} has a non-finite score")
        hit = (off[:, 0] < b) & (a < off[:, 1]) & (off[:, 1] > off[:, 0])
        total[:n] += hit.to(torch.float64) * score
        count[:n] += hit.to(torch.float64)
    if overlap == "mean":
        total = total / count.clamp_min(1.0)
    return total.to(torch.float32)
