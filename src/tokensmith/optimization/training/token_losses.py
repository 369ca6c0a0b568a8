"""Extra token-level loss terms (METHODS.md 3B: OPT-B7 … OPT-B12, and token-level unlikelihood).

Each objective is a pure function over tensors plus a registered :class:`TokenLoss` that reads a
:class:`TokenBatch`:

| registry name | function | paper | CE included |
|---|---|---|---|
| `"simctg"` | `simctg_loss` | Su et al. 2022 (SimCTG) | no |
| `"contrastive_token"` | `contrastive_token_loss` | Jiang et al. 2022 (CT loss) | no |
| `"number_token"` | `number_token_loss` | Zausinger et al. 2024/2025 (NTL) | no |
| `"smoothed_ce"` | `smoothed_ce` | Elbayad et al. 2018 (token-level smoothing) | yes |
| `"unlikelihood"` | `unlikelihood_loss` | Welleck et al. 2019 (token-level UL) | no |
| `"rtd"` | `replaced_token_detection_loss` | Clark et al. 2020 (ELECTRA) | yes (the MLM CE) |

"CE included: no" means the term is *added* to maximum likelihood by the caller,
``loss = ce + λ·term`` (``TokenLoss.includes_ce`` is False); "yes" means the returned value is the
whole objective.

Conventions. Labels are aligned with the logits: ``logits[:, t]`` predicts ``labels[:, t]``. ``mask`` is
``[B, T]`` bool (0/1 accepted), True where a token counts. Masked positions never contribute: every
loss selects kept rows (boolean indexing) or zeroes a gathered value with ``torch.where`` *before*
any non-linearity, so NaN/inf garbage or ``-100`` labels there change neither the value nor any
gradient. Computation is fp32 (fp64 when the input is fp64). Bad input (shape mismatch, no kept
token, NaN/inf at a kept position, label out of range) raises ``ValueError``/``TypeError`` saying
what to do.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from tokensmith.models.logprobs import gather_logprobs
from tokensmith.optimization.training.base import TokenBatch, TokenLoss

__all__ = [
    "simctg_loss",
    "contrastive_token_loss",
    "number_token_values",
    "number_token_loss",
    "smoothed_ce",
    "unlikelihood_loss",
    "replaced_token_detection_loss",
    "RTDOutput",
    "share_embeddings",
    "SimCTGLoss",
    "ContrastiveTokenLoss",
    "NumberTokenLoss",
    "SmoothedCELoss",
    "UnlikelihoodLoss",
    "ReplacedTokenDetectionLoss",
]

_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


# --------------------------------------------------------------------------------------------------- checks
def _cdt(x: torch.Tensor) -> torch.dtype:
    """Compute dtype: fp64 stays fp64, everything else runs in fp32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _as_mask(mask: Any, shape: torch.Size, name: str = "mask") -> torch.Tensor:
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a [B, T] torch.Tensor of booleans, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        if not (mask.is_floating_point() or mask.dtype in _INT_DTYPES):
            raise TypeError(f"{name} must be a boolean tensor, got dtype {mask.dtype}")
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError(f"{name} must be boolean (or 0/1); it has values other than 0 and 1")
        mask = mask != 0
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(
            f"{name} has shape {tuple(mask.shape)} but the tokens are {tuple(shape)}; pass one [B, T] mask "
            "aligned with the logits/labels (logits[:, t] predicts labels[:, t])"
        )
    return mask


def _need_kept(mask: torch.Tensor, what: str) -> None:
    if not bool(mask.any()):
        raise ValueError(
            f"{what}: no kept tokens (mask is all False), nothing to train on; check the mask (prompt and "
            "padding are False) and the label shift, or skip this batch"
        )


def _check_finite(x: torch.Tensor, mask: torch.Tensor, name: str) -> None:
    if not bool(torch.isfinite(x.detach()[mask]).all()):
        raise ValueError(
            f"{name} has NaN or inf at kept positions; check the model forward (fp16/bf16 overflow, a diverged "
            "step: lower the learning rate) or set mask False there"
        )


def _check_number(
    x: Any, name: str, lo: float | None = None, hi: float | None = None, open_lo: bool = False
) -> float:
    if isinstance(x, torch.Tensor) and x.numel() == 1:
        x = float(x)
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        raise ValueError(f"{name} must be a finite number, got {x!r}")
    if lo is not None and (x < lo or (open_lo and x == lo)):
        raise ValueError(f"{name} must be {'>' if open_lo else '>='} {lo}, got {x!r}")
    if hi is not None and x > hi:
        raise ValueError(f"{name} must be <= {hi}, got {x!r}")
    return float(x)


def _check_lm(logits: Any, labels: Any, mask: Any, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate ``logits [B, T, V]``, ``labels [B, T]``, ``mask [B, T]``; return (mask, labels with 0 where masked)."""
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        raise TypeError(
            f"{what}: logits must be a floating-point [B, T, V] tensor, got {getattr(logits, 'dtype', type(logits).__name__)}"
        )
    if logits.dim() != 3:
        raise ValueError(f"{what}: logits must be [B, T, V], got shape {tuple(logits.shape)}")
    if not isinstance(labels, torch.Tensor) or labels.dtype not in _INT_DTYPES:
        raise TypeError(
            f"{what}: labels must be an integer [B, T] tensor, got {getattr(labels, 'dtype', type(labels).__name__)}"
        )
    if tuple(labels.shape) != tuple(logits.shape[:2]):
        raise ValueError(
            f"{what}: labels {tuple(labels.shape)} and logits {tuple(logits.shape)} disagree; labels must be aligned "
            "[B, T] with logits[:, t] predicting labels[:, t] (shift once with shift_labels)"
        )
    mask = _as_mask(mask, logits.shape[:2])
    _need_kept(mask, what)
    V = logits.shape[-1]
    kept = labels[mask]
    if bool(((kept < 0) | (kept >= V)).any()):
        bad = kept[(kept < 0) | (kept >= V)][:5].tolist()
        raise ValueError(
            f"{what}: labels at kept positions must be token ids in [0, {V}), got e.g. {bad}; an ignore label "
            "(-100) must have mask False, and the logits need the full vocabulary"
        )
    _check_finite(logits, mask, f"{what}: logits")
    return mask, labels.masked_fill(~mask, 0).long()


def _graph_zero(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A 0 connected to ``logits`` through one kept (finite) element, so ``backward()`` works and grads are 0."""
    b, t = mask.nonzero()[0].tolist()
    return logits[b, t, 0].to(_cdt(logits)) * 0.0


def _kept_rows_lse(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``logsumexp_v logits[b, t, v]`` at kept positions, 0 elsewhere (masked rows never enter the graph)."""
    out = torch.zeros(mask.shape, dtype=_cdt(logits), device=logits.device)
    return out.index_put((mask,), torch.logsumexp(logits[mask].to(_cdt(logits)), dim=-1))


def _resolve_length(x: int | float | None, n: torch.Tensor, name: str) -> torch.Tensor:
    """A float in (0, 1] is a fraction of ``n`` (rounded half up); an int >= 1 is absolute (capped at ``n``)."""
    if x is None:
        return n.clone()
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise TypeError(f"{name} must be an int >= 1, a float fraction in (0, 1], or None, got {x!r}")
    if isinstance(x, float):
        if not (0.0 < x <= 1.0):
            raise ValueError(
                f"{name}={x!r}: a float is a fraction in (0, 1]; pass an int for an absolute number of tokens, "
                "or None for all of them"
            )
        return torch.floor(x * n.double() + 0.5).long()
    if x < 1:
        raise ValueError(f"{name}={x!r}: an int must be >= 1 (to switch the term off, do not add it)")
    return torch.clamp(n, max=int(x))


def _preceding_pairs(
    labels: torch.Tensor, mask: torch.Tensor, window: torch.Tensor | None, dedup: bool
) -> torch.Tensor:
    """``pair[b, t, s]``: kept s < kept t with ``labels[s] != labels[t]`` and rank(t) − rank(s) <= window[b].

    With ``dedup`` each distinct token counts once per position t (its last occurrence before t stands for it):
    s is dropped when a kept s' with s < s' < t has the same label.
    """
    B, T = labels.shape
    idx = torch.arange(T, device=labels.device)
    both = mask[:, :, None] & mask[:, None, :]
    earlier = idx[None, :, None] > idx[None, None, :]  # [1, t, s]: s < t
    diff = labels[:, :, None] != labels[:, None, :]
    pair = both & earlier & diff
    if window is not None:
        rank = mask.long().cumsum(1) - 1
        gap = rank[:, :, None] - rank[:, None, :]
        pair &= gap <= window[:, None, None]
    if dedup:
        same_later = (
            (labels[:, :, None] == labels[:, None, :]) & both & (idx[None, None, :] > idx[None, :, None])
        )
        nxt = (
            torch.where(same_later, idx[None, None, :], T).min(-1).values
        )  # [B, s]: next kept occurrence of labels[s]
        pair &= nxt[:, None, :] >= idx[None, :, None]
    return pair


# --------------------------------------------------------------------------------------------------- SimCTG
def simctg_loss(hidden: torch.Tensor, mask: torch.Tensor, margin: float = 0.5) -> torch.Tensor:
    """SimCTG token-contrastive loss (Su et al. 2022, "A Contrastive Framework for Neural Text Generation").

    For the kept tokens of one sequence with representations h_1..h_n and s the cosine similarity,

        L_CL = 1/(n(n−1)) · Σ_i Σ_{j≠i} max(0, ρ − s(h_i, h_i) + s(h_i, h_j)),

    which pushes every pair of distinct positions' cosine below 1 − ρ (isotropic representations).
    Pairs are formed only inside a row and only between kept tokens; over a batch the hinge terms of all
    valid pairs are averaged (Σ terms / number of pairs; for one row exactly the paper's formula). The
    paper trains with L = L_MLE + L_CL and ρ = 0.5 (the CE is **not** included here).

    Args:
        hidden: ``[B, T, d]`` last-layer hidden states (aligned with the logits), with grad.
        mask: ``[B, T]`` bool, True where a token counts.
        margin: ρ; the hinge is active for pairs with cosine > 1 − ρ.

    Returns:
        Scalar loss (fp32, fp64 for fp64 input).

    Examples:
        >>> import torch, tokensmith as ts
        >>> ad = ts.tiny("llama")
        >>> ids = ad.tokenizer("the cat sat on the mat", return_tensors="pt").input_ids
        >>> h = ad.model(ids, output_hidden_states=True).hidden_states[-1]
        >>> loss = simctg_loss(h, torch.ones(ids.shape, dtype=torch.bool))
        >>> 0.0 <= loss.item() <= 2.5
        True
        >>> simctg_loss(torch.eye(4)[None], torch.ones(1, 4, dtype=torch.bool)).item()  # cosines 0 <= 1 - ρ
        0.0
    """
    if not isinstance(hidden, torch.Tensor) or not hidden.is_floating_point() or hidden.dim() != 3:
        raise ValueError(
            f"simctg_loss: hidden must be a floating-point [B, T, d] tensor, got "
            f"{getattr(hidden, 'shape', type(hidden).__name__)}; pass output_hidden_states=True and take hidden_states[-1]"
        )
    margin = _check_number(margin, "margin")
    mask = _as_mask(mask, hidden.shape[:2])
    _need_kept(mask, "simctg_loss")
    _check_finite(hidden, mask, "simctg_loss: hidden")
    T = hidden.shape[1]
    h = torch.where(mask[..., None], hidden, torch.zeros((), dtype=hidden.dtype, device=hidden.device)).to(
        _cdt(hidden)
    )
    hn = h / h.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    s = hn @ hn.transpose(1, 2)  # [B, T, T]
    eye = torch.eye(T, dtype=torch.bool, device=hidden.device)
    pair = mask[:, :, None] & mask[:, None, :] & ~eye
    n_pairs = int(pair.sum())
    if n_pairs == 0:
        raise ValueError(
            "simctg_loss needs at least one row with 2 or more kept tokens (it contrasts pairs of positions); "
            "check the mask or skip this batch"
        )
    terms = torch.relu(margin - s.diagonal(dim1=1, dim2=2)[:, :, None] + s)
    return torch.where(pair, terms, torch.zeros((), dtype=terms.dtype, device=terms.device)).sum() / n_pairs


# --------------------------------------------------------------------------------------------------- CT loss
def contrastive_token_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor,
    preceding_m: int | float | None = 0.5,
    ct_length: int | float | None = 0.25,
    dedup: bool = True,
) -> torch.Tensor:
    """Contrastive token (CT) loss (Jiang et al. 2022, "A Simple Contrastive Learning Objective for Alleviating
    Neural Text Degeneration").

    With z_t the logits at position t, y_t the label and S_N^t = {y_{t−M}, …, y_{t−1}} \\ {y_t} the preceding
    M labels other than y_t (negative tokens),

        L_CT = 1/|P| · Σ_{t∈P} log(1 + Σ_{n∈S_N^t} exp(z_{t,n} − z_{t,y_t})),

    over the CT positions P: the first ``ct_length`` kept tokens of each row. The paper trains with
    L = L_CE + L_CT (the CE is **not** included here). Positions without negatives contribute log 1 = 0 but
    count in |P| (as in the authors' package).

    Lengths are counted in *kept* tokens of each row: a float in (0, 1] is a fraction (``ct_length`` of the
    row's kept tokens, ``preceding_m`` of the row's CT length; the authors' defaults 0.25 and 0.5), an int an
    absolute count, None everything. (The authors' ``ct-loss`` package takes the fractions of the padded length;
    identical when nothing is padded or masked.) Negatives are kept label positions only: prompt/padding
    tokens are never negatives.

    Args:
        logits: ``[B, T, V]``.
        labels: ``[B, T]`` aligned target ids (anything where ``mask`` is False).
        mask: ``[B, T]`` bool.
        preceding_m: M, the window of preceding tokens whose labels are negatives.
        ct_length: how many leading kept tokens of each row get the CT term.
        dedup: True (the paper's set S_N^t): a token repeated in the window is one negative. False counts it once
            per occurrence, as the authors' package does.

    Returns:
        Scalar L_CT (0, still connected to the graph, when no row is long enough to have a CT position).

    Examples:
        >>> import torch, tokensmith as ts
        >>> ad = ts.tiny("llama")
        >>> ids = ad.tokenizer("the cat sat on the mat", return_tensors="pt").input_ids
        >>> logits = ad.model(ids).logits[:, :-1]
        >>> labels, mask = ids[:, 1:], torch.ones(ids[:, 1:].shape, dtype=torch.bool)
        >>> contrastive_token_loss(logits, labels, mask, preceding_m=None, ct_length=None).item() > 0
        True
        >>> same = torch.full_like(labels, int(ids[0, 1]))  # every label equal: no negatives anywhere
        >>> contrastive_token_loss(logits, same, mask, preceding_m=None, ct_length=None).item()
        0.0
        >>> z = torch.zeros(1, 2, 3)  # position 1: one negative (label 0) with z_n = z_y: log(1 + 1)
        >>> round(contrastive_token_loss(z, torch.tensor([[0, 1]]), torch.ones(1, 2), None, None).item(), 4)
        0.3466
    """
    mask, lab = _check_lm(logits, labels, mask, "contrastive_token_loss")
    n = mask.sum(1)
    L = _resolve_length(ct_length, n, "ct_length")
    M = _resolve_length(preceding_m, L, "preceding_m") if preceding_m is not None else None
    rank = mask.long().cumsum(1) - 1
    pos = mask & (rank < L[:, None])  # CT positions
    n_pos = int(pos.sum())
    if n_pos == 0:
        return _graph_zero(logits, mask)
    pair = _preceding_pairs(lab, mask, M, dedup) & pos[:, :, None]
    cdt = _cdt(logits)
    zero = torch.zeros((), dtype=cdt, device=logits.device)
    T = lab.shape[1]
    z_neg = logits.gather(-1, lab[:, None, :].expand(-1, T, -1)).to(cdt)  # [B, t, s] = z_t[y_s]
    z_neg = torch.where(pair, z_neg, zero)
    z_pos = torch.where(pos, logits.gather(-1, lab[..., None])[..., 0].to(cdt), zero)
    d = torch.where(
        pair, z_neg - z_pos[..., None], torch.full((), -math.inf, dtype=cdt, device=logits.device)
    )
    per = torch.logsumexp(torch.cat([torch.zeros_like(d[..., :1]), d], dim=-1), dim=-1)  # log(1 + Σ exp d)
    return torch.where(pos, per, zero).sum() / n_pos


# --------------------------------------------------------------------------------------------------- NTL
_NUMBER_RE = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)", re.ASCII)


def number_token_values(tokenizer: Any, digits_only: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The tokens of a tokenizer's vocabulary that are one number, and their values.

    A token counts when its text (``convert_tokens_to_string``, surrounding whitespace and a WordPiece ``##``
    prefix stripped) is a number: one ASCII digit with ``digits_only`` (the "digit-level" setting Zausinger
    et al. use for most experiments, which stabilises NTL), else any ASCII decimal such as ``42``, ``-1`` or
    ``3.5``. Special tokens are skipped; non-ASCII digits (``²``, ``½``) never count.

    Args:
        tokenizer: a HuggingFace tokenizer (anything with ``get_vocab`` and ``convert_tokens_to_string``).
        digits_only: only single digits 0-9.

    Returns:
        ``(ids, values)``: LongTensor of token ids (ascending) and float32 values, for
        :func:`number_token_loss`.

    Examples:
        >>> import tokensmith as ts
        >>> ids, values = number_token_values(ts.tiny("llama").tokenizer)
        >>> sorted(values.tolist())
        [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0]
    """
    if not hasattr(tokenizer, "get_vocab"):
        raise TypeError(
            f"number_token_values needs a HuggingFace tokenizer (with get_vocab), got {type(tokenizer).__name__}"
        )
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    to_str = getattr(tokenizer, "convert_tokens_to_string", None)
    found: dict[int, float] = {}
    for tok, i in tokenizer.get_vocab().items():
        if i in special or not any("0" <= ch <= "9" for ch in tok):
            continue
        text = to_str([tok]) if to_str is not None else tok
        text = text.strip()
        if text.startswith("##"):
            text = text[2:]
        if digits_only:
            if len(text) == 1 and "0" <= text <= "9":
                found[int(i)] = float(text)
        elif _NUMBER_RE.fullmatch(text):
            v = float(text)
            if math.isfinite(v):
                found[int(i)] = v
    if not found:
        raise ValueError(
            "number_token_values found no number token in this vocabulary"
            + (" (digits_only=True: try digits_only=False)" if digits_only else "")
        )
    ids = sorted(found)
    return torch.tensor(ids, dtype=torch.long), torch.tensor([found[i] for i in ids], dtype=torch.float32)


def _number_table(
    num_values: Any, V: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids [K], values [K], dense [V] with NaN at non-number tokens) from (ids, values), a dict or a dense [V] tensor."""
    if isinstance(num_values, Mapping):
        num_values = (list(num_values.keys()), list(num_values.values()))
    if isinstance(num_values, torch.Tensor) and num_values.is_floating_point() and num_values.dim() == 1:
        if num_values.shape[0] != V:
            raise ValueError(
                f"a dense num_values must have one entry per vocabulary id ({V}), got {num_values.shape[0]}"
            )
        ids = torch.isfinite(num_values).nonzero().flatten()
        vals = num_values[ids]
    elif isinstance(num_values, (tuple, list)) and len(num_values) == 2:
        ids = torch.as_tensor(num_values[0]).long().flatten()
        vals = torch.as_tensor(num_values[1]).flatten()
        if ids.shape != vals.shape:
            raise ValueError(
                f"num_values ids {tuple(ids.shape)} and values {tuple(vals.shape)} must have the same length"
            )
    else:
        raise TypeError(
            "num_values must be (ids, values) as returned by number_token_values(tokenizer), a {id: value} dict, "
            "or a dense [V] float tensor with NaN at non-number tokens"
        )
    if ids.numel() == 0:
        raise ValueError("num_values has no number token; build it with number_token_values(tokenizer)")
    if bool(((ids < 0) | (ids >= V)).any()) or ids.unique().numel() != ids.numel():
        raise ValueError(f"num_values ids must be distinct token ids in [0, {V}) (the logits' vocabulary)")
    vals = vals.to(device=device, dtype=torch.float64)
    if not bool(torch.isfinite(vals).all()):
        raise ValueError("num_values values must be finite numbers")
    ids = ids.to(device)
    dense = torch.full((V,), math.nan, dtype=torch.float64, device=device)
    dense[ids] = vals
    return ids, vals, dense


def number_token_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor,
    num_values: Any,
    variant: str = "mse",
    p: float = 2.0,
) -> torch.Tensor:
    """Number Token Loss (Zausinger et al. 2024/2025, "Regress, Don't Guess – A Regression-like Loss on Number
    Tokens for Language Models").

    At every kept position whose label y is a number token, with q the softmax of the logits restricted to the
    K number tokens (renormalised over them) and v_i their values:

        NTL-MSE (``variant="mse"``):  |Σ_i q_i·v_i − v_y|^p          (p = 2: squared error; p = 1: absolute)
        NTL-WAS (``variant="was"``):  W_1(q, δ_{v_y}) = Σ_k |F_q(u_k) − F_y(u_k)|·(u_{k+1} − u_k),

    F the CDFs over the sorted values u. Against a one-hot target the Wasserstein-1 distance equals the
    expectation E_q |v − v_y| (closed form, tested). The loss is the mean over number-label positions; the
    paper trains with L = L_CE + λ·NTL (the CE is **not** included here). A batch without number labels gives
    0 (connected to the graph).

    Args:
        logits: ``[B, T, V]``.
        labels: ``[B, T]`` aligned targets.
        mask: ``[B, T]`` bool.
        num_values: ``(ids, values)`` from :func:`number_token_values`, a ``{id: value}`` dict, or a dense ``[V]``
            tensor with NaN at non-number tokens.
        variant: ``"mse"`` or ``"was"``.
        p: exponent of the ``"mse"`` variant (> 0).

    Returns:
        Scalar loss.

    Examples:
        >>> import torch, tokensmith as ts
        >>> ad = ts.tiny("llama")
        >>> nums = number_token_values(ad.tokenizer)
        >>> ids = ad.tokenizer("12 + 30 = 42", return_tensors="pt").input_ids
        >>> logits, labels = ad.model(ids).logits[:, :-1], ids[:, 1:]
        >>> mask = torch.ones(labels.shape, dtype=torch.bool)
        >>> number_token_loss(logits, labels, mask, nums, variant="was").item() > 0
        True
        >>> z = torch.tensor([[[0.0, 0.0, 5.0]]])  # q = (1/2, 1/2) on values (1, 3), label value 3
        >>> number_token_loss(z, torch.tensor([[1]]), torch.ones(1, 1), ([0, 1], [1.0, 3.0])).item()
        1.0
    """
    mask, lab = _check_lm(logits, labels, mask, "number_token_loss")
    if variant not in ("mse", "was"):
        raise ValueError(f"variant must be 'mse' or 'was', got {variant!r}")
    p = _check_number(p, "p", lo=0.0, open_lo=True)
    ids, vals, dense = _number_table(num_values, logits.shape[-1], logits.device)
    y_all = dense[lab]
    at = mask & torch.isfinite(y_all)
    if not bool(at.any()):
        return _graph_zero(logits, mask)
    cdt = _cdt(logits)
    vals = vals.to(cdt)
    # softmax over the K number tokens only (renormalised over them)
    q = torch.softmax(logits.index_select(-1, ids)[at].to(cdt), dim=-1)  # [P, K]
    y = y_all[at].to(cdt)
    if variant == "mse":
        per = ((q * vals).sum(-1) - y).abs().pow(p)
    else:
        u, order = vals.sort()
        Fq = q[:, order].cumsum(-1)[:, :-1]
        Fy = (u[None, :-1] >= y[:, None]).to(cdt)
        per = ((Fq - Fy).abs() * (u[1:] - u[:-1])).sum(-1)
    return per.mean()


# --------------------------------------------------------------------------------------------------- smoothing
def smoothed_ce(
    logits: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor,
    E: torch.Tensor,
    tau: float = 0.1,
    alpha: float = 0.3,
) -> torch.Tensor:
    """Token-level loss smoothing from embedding similarity (Elbayad et al. 2018, "Token-level and sequence-level
    loss smoothing for RNN language models").

    The one-hot target at each kept position is replaced in part by

        r(w ∣ y) = exp(cos(E_w, E_y)/τ) / Σ_{w'} exp(cos(E_{w'}, E_y)/τ),

        L = 1/N · Σ_t [(1 − α)·CE_t + α·KL(r(·∣y_t) ‖ p_θ(·∣y<t))].

    KL(r‖p) and the cross-entropy H(r, p) differ by the entropy of r, a constant of the model, so the gradient
    is the paper's. α = 0 is plain CE; τ → 0 makes r one-hot, so L → CE for every α. E is detached (the
    target is not trained). Includes the CE term: use it *instead of* CE. Defaults τ = 0.1, α = 0.3 are ours,
    not the paper's: tune them. Memory: the kept logits in fp32 and r, two ``[N, V]`` tensors for N kept tokens.

    Args:
        logits: ``[B, T, V]``.
        labels: ``[B, T]`` aligned targets.
        mask: ``[B, T]`` bool.
        E: ``[V, d]`` token embeddings (e.g. the model's input embeddings, or GloVe rows per token).
        tau: temperature τ > 0 of the target.
        alpha: mixing weight α in [0, 1].

    Returns:
        Scalar loss.

    Examples:
        >>> import torch, tokensmith as ts
        >>> ad = ts.tiny("llama")
        >>> ids = ad.tokenizer("the cat sat on the mat", return_tensors="pt").input_ids
        >>> logits, labels = ad.model(ids).logits[:, :-1], ids[:, 1:]
        >>> mask = torch.ones(labels.shape, dtype=torch.bool)
        >>> E = ad.model.get_input_embeddings().weight
        >>> ce = smoothed_ce(logits, labels, mask, E, alpha=0.0)
        >>> torch.allclose(ce, torch.nn.functional.cross_entropy(logits[0], labels[0]))
        True
        >>> smoothed_ce(logits, labels, mask, E, alpha=0.5).item() > 0
        True
    """
    mask, lab = _check_lm(logits, labels, mask, "smoothed_ce")
    tau = _check_number(tau, "tau", lo=0.0, open_lo=True)
    alpha = _check_number(alpha, "alpha", lo=0.0, hi=1.0)
    V = logits.shape[-1]
    if not isinstance(E, torch.Tensor) or not E.is_floating_point() or E.dim() != 2:
        raise ValueError(
            f"E must be a floating-point [V, d] embedding matrix, got {getattr(E, 'shape', type(E).__name__)}"
        )
    if E.shape[0] != V:
        raise ValueError(
            f"E has {E.shape[0]} rows but the logits have V = {V}; pass one embedding row per logit column "
            "(slice E[:V] or pad it)"
        )
    if not bool(torch.isfinite(E.detach()).all()):
        raise ValueError("E has NaN or inf entries")
    cdt = _cdt(logits)
    z = logits[mask].to(cdt)  # [N, V], kept rows only
    y = lab[mask]
    lse = torch.logsumexp(z, dim=-1)
    ce = lse - z.gather(-1, y[:, None])[:, 0]
    if alpha == 0.0:
        return ce.mean()
    with torch.no_grad():
        En = E.detach().to(device=logits.device, dtype=cdt)
        En = En / En.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        log_r = torch.log_softmax((En[y] @ En.T) / tau, dim=-1)  # [N, V]
        r = log_r.exp()
        neg_entropy = (r * log_r).sum(-1)
        del log_r
    kl = neg_entropy - (r * z).sum(-1) + lse  # Σ_w r_w (log r_w − log p_w), log p = z − lse
    return ((1.0 - alpha) * ce + alpha * kl).mean()


# --------------------------------------------------------------------------------------------------- unlikelihood
def unlikelihood_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor,
    alpha: float = 1.0,
    eps: float = 1e-5,
) -> torch.Tensor:
    """Token-level unlikelihood (Welleck et al. 2019, "Neural Text Generation with Unlikelihood Training").

    With C_t = {y_s : s < t kept} \\ {y_t} the previous context tokens other than the target (a set: a repeated
    token is one candidate),

        L_UL = α · 1/N · Σ_t −Σ_{c∈C_t} log(1 − p_θ(c ∣ y<t)),

    averaged over the N kept tokens. The paper's token-level objective is L_MLE + L_UL with α = 1 (the CE is
    **not** included here). 1 − p is clamped at ``eps`` (p → 1 would be log 0). Context tokens are the kept labels
    of the row: prompt and padding never become candidates.

    Args:
        logits: ``[B, T, V]``.
        labels: ``[B, T]`` aligned targets.
        mask: ``[B, T]`` bool.
        alpha: weight α ≥ 0.
        eps: floor of 1 − p.

    Returns:
        Scalar α·L_UL.

    Examples:
        >>> import torch, tokensmith as ts
        >>> ad = ts.tiny("llama")
        >>> ids = ad.tokenizer("the cat sat on the mat", return_tensors="pt").input_ids
        >>> logits, labels = ad.model(ids).logits[:, :-1], ids[:, 1:]
        >>> unlikelihood_loss(logits, labels, torch.ones(labels.shape, dtype=torch.bool)).item() > 0
        True
        >>> z = torch.zeros(1, 2, 2)  # position 1: candidate 0 with p = 1/2, mean over 2 tokens
        >>> round(unlikelihood_loss(z, torch.tensor([[0, 1]]), torch.ones(1, 2)).item(), 4)  # log(2)/2
        0.3466
    """
    mask, lab = _check_lm(logits, labels, mask, "unlikelihood_loss")
    alpha = _check_number(alpha, "alpha", lo=0.0)
    eps = _check_number(eps, "eps", lo=0.0, open_lo=True, hi=1.0)
    pair = _preceding_pairs(lab, mask, None, dedup=True)
    cdt = _cdt(logits)
    zero = torch.zeros((), dtype=cdt, device=logits.device)
    T = lab.shape[1]
    zc = torch.where(pair, logits.gather(-1, lab[:, None, :].expand(-1, T, -1)).to(cdt), zero)
    lp = torch.where(pair, zc - _kept_rows_lse(logits, mask)[..., None], zero)
    one_minus_p = (-torch.expm1(lp)).clamp_min(eps)
    terms = torch.where(pair, -torch.log(one_minus_p), zero)
    return alpha * terms.sum() / int(mask.sum())


# --------------------------------------------------------------------------------------------------- ELECTRA
class RTDOutput(NamedTuple):
    """What :func:`replaced_token_detection_loss` returns.

    Attributes:
        loss: L_MLM + λ·L_Disc (scalar, with grad into both models).
        mlm_loss: generator cross-entropy at the masked positions.
        disc_loss: discriminator binary cross-entropy over all attended tokens.
        masked: ``[B, T]`` bool, the positions given to the generator as the mask token.
        replaced: ``[B, T]`` bool, the discriminator's targets (sampled token ≠ original).
        corrupted_ids: ``[B, T]`` the discriminator's input.
        disc_accuracy: detached fraction of attended tokens the discriminator tags right.
    """

    loss: torch.Tensor
    mlm_loss: torch.Tensor
    disc_loss: torch.Tensor
    masked: torch.Tensor
    replaced: torch.Tensor
    corrupted_ids: torch.Tensor
    disc_accuracy: torch.Tensor


def _rng(seed: int | torch.Generator | None, device: torch.device) -> torch.Generator:
    if isinstance(seed, torch.Generator):
        return seed
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()  # fresh OS entropy; the global RNG is untouched
    elif isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, a torch.Generator or None, got {type(seed).__name__}")
    else:
        g.manual_seed(seed)
    return g


def _logits_of(out: Any, who: str) -> torch.Tensor:
    z = out.logits if hasattr(out, "logits") else out[0] if isinstance(out, (tuple, list)) else out
    if not isinstance(z, torch.Tensor):
        raise TypeError(
            f"the {who} must return logits (a ModelOutput with .logits or a tensor), got {type(out).__name__}"
        )
    return z


def replaced_token_detection_loss(
    generator: nn.Module,
    discriminator: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    generator_mask_token_id: int,
    mask_prob: float = 0.15,
    lambda_disc: float = 50.0,
    seed: int | torch.Generator | None = None,
    maskable: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> RTDOutput:
    """ELECTRA replaced-token detection (Clark et al. 2020, "ELECTRA: Pre-training Text Encoders as
    Discriminators Rather Than Generators").

    1. In each row, round(mask_prob·n) (at least 1) of the n maskable tokens are chosen uniformly (with
       ``seed``) and replaced by ``generator_mask_token_id``.
    2. The generator (a small masked LM) predicts them: L_MLM = mean over masked positions of −log p_G(x_t).
    3. At every masked position a token is *sampled* from p_G (temperature 1 = the paper); the sampling is
       discrete, so no gradient flows from the discriminator into the generator through it.
    4. The discriminator tags every attended token of the corrupted sequence: target 1 where the token differs
       from the original (a sampled token equal to the original counts as original, as in the paper),
       L_Disc = mean binary cross-entropy over attended tokens.

        L = L_MLM + λ·L_Disc,  λ = 50 (the paper's).

    Includes the generator's MLM cross-entropy: this is the whole pre-training objective. Share the token
    embeddings with :func:`share_embeddings` (the paper shares them; optional here). ``seed`` fixes the masked
    positions and the samples; dropout inside the models still draws from the global RNG (the models' own).

    Args:
        generator: HF masked LM (``...ForMaskedLM``): ``generator(input_ids=, attention_mask=).logits [B, T, V]``.
        discriminator: HF token classifier returning logits ``[B, T]`` (``ElectraForPreTraining``), ``[B, T, 1]``
            (``num_labels=1``) or ``[B, T, 2]`` (``num_labels=2``, class 1 = replaced).
        input_ids: ``[B, T]`` original ids.
        attention_mask: ``[B, T]`` (default all ones); padding is never masked and never tagged.
        generator_mask_token_id: the mask token (``tokenizer.mask_token_id``).
        mask_prob: fraction of maskable tokens to mask (paper: 0.15).
        lambda_disc: λ.
        seed: int, ``torch.Generator`` (advanced in place; pass one to get fresh masks each step) or None.
        maskable: ``[B, T]`` bool, positions that may be masked (default: ``attention_mask``; pass
            ``~special_tokens_mask`` to keep [CLS]/[SEP]).
        temperature: sampling temperature of the generator.

    Returns:
        :class:`RTDOutput`.

    Examples:
        >>> import torch, tokensmith as ts
        >>> from transformers import BertConfig, BertForMaskedLM, BertForTokenClassification
        >>> gen = BertForMaskedLM(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
        ...     num_attention_heads=2, intermediate_size=32))
        >>> disc = BertForTokenClassification(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
        ...     num_attention_heads=2, intermediate_size=32, num_labels=1))
        >>> ids = torch.randint(5, 50, (2, 12), generator=torch.Generator().manual_seed(0))
        >>> out = replaced_token_detection_loss(gen, disc, ids, generator_mask_token_id=4, seed=0)
        >>> out.masked.sum(1).tolist()  # round(0.15 * 12) = 2 per row
        [2, 2]
        >>> bool(torch.isclose(out.loss, out.mlm_loss + 50 * out.disc_loss))
        True
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in _INT_DTYPES or input_ids.dim() != 2:
        raise ValueError(
            f"input_ids must be an integer [B, T] tensor, got {getattr(input_ids, 'shape', type(input_ids).__name__)}"
        )
    if isinstance(generator_mask_token_id, bool) or not isinstance(generator_mask_token_id, int):
        raise TypeError(
            f"generator_mask_token_id must be an int (tokenizer.mask_token_id), got {generator_mask_token_id!r}"
        )
    mask_prob = _check_number(mask_prob, "mask_prob", lo=0.0, hi=1.0, open_lo=True)
    lambda_disc = _check_number(lambda_disc, "lambda_disc", lo=0.0)
    temperature = _check_number(temperature, "temperature", lo=0.0, open_lo=True)
    B, T = input_ids.shape
    dev = input_ids.device
    att = (
        torch.ones((B, T), dtype=torch.bool, device=dev)
        if attention_mask is None
        else _as_mask(attention_mask, (B, T), "attention_mask")
    )
    can = att if maskable is None else _as_mask(maskable, (B, T), "maskable") & att
    n = can.sum(1)
    if not bool((n > 0).any()):
        raise ValueError(
            "replaced_token_detection_loss: no maskable token (attention_mask/maskable all False); skip this batch"
        )
    g = _rng(seed, dev)
    k = torch.minimum(torch.floor(mask_prob * n.double() + 0.5).long().clamp_min(1), n)
    scores = torch.rand((B, T), generator=g, device=dev).masked_fill(~can, 2.0)
    rank = scores.argsort(1).argsort(1)
    masked = can & (rank < k[:, None])

    gen_in = input_ids.masked_fill(masked, generator_mask_token_id)
    gen_logits = _logits_of(generator(input_ids=gen_in, attention_mask=att.long()), "generator")
    if gen_logits.dim() != 3 or tuple(gen_logits.shape[:2]) != (B, T):
        raise ValueError(
            f"the generator must return MLM logits [B, T, V] = [{B}, {T}, V], got {tuple(gen_logits.shape)}"
        )
    zm = gen_logits[masked]
    _check_finite(zm, torch.ones(zm.shape[0], dtype=torch.bool, device=dev), "generator logits")
    orig = input_ids[masked].long()
    if bool((orig >= gen_logits.shape[-1]).any()) or bool((orig < 0).any()):
        raise ValueError(f"input_ids hold ids outside the generator's vocabulary [0, {gen_logits.shape[-1]})")
    mlm_loss = -gather_logprobs(zm, orig).mean()
    with torch.no_grad():
        probs = torch.softmax(zm.detach().float() / temperature, dim=-1)
        sampled = torch.multinomial(probs, 1, generator=g)[:, 0]
    corrupted = input_ids.clone()
    corrupted[masked] = sampled.to(corrupted.dtype)
    replaced = corrupted != input_ids

    d = _logits_of(discriminator(input_ids=corrupted, attention_mask=att.long()), "discriminator")
    if d.dim() == 3 and d.shape[-1] == 1:
        d = d[..., 0]
    elif d.dim() == 3 and d.shape[-1] == 2:
        d = d[..., 1] - d[..., 0]  # 2-class softmax CE == BCE on the logit difference
    if d.dim() != 2 or tuple(d.shape) != (B, T):
        raise ValueError(
            f"the discriminator must return per-token logits [B, T], [B, T, 1] or [B, T, 2], got {tuple(d.shape)}; "
            "build it with num_labels=1 (e.g. BertForTokenClassification) or use ElectraForPreTraining"
        )
    da = d[att].float()
    _check_finite(da, torch.ones(da.shape, dtype=torch.bool, device=dev), "discriminator logits")
    ta = replaced[att].float()
    disc_loss = F.binary_cross_entropy_with_logits(da, ta)
    acc = ((da.detach() > 0).float() == ta).float().mean()
    return RTDOutput(
        mlm_loss + lambda_disc * disc_loss, mlm_loss, disc_loss, masked, replaced, corrupted, acc
    )


def share_embeddings(generator: nn.Module, discriminator: nn.Module) -> nn.Module:
    """Make the generator use the discriminator's token-embedding module (ELECTRA shares them).

    Afterwards both losses update the one embedding matrix. When the generator's output layer is tied to its
    input embeddings (``tie_word_embeddings``) it is re-tied to the shared matrix. Position embeddings stay
    separate. Both models must use the same embedding width (for HF BERT: the same ``hidden_size``; ELECTRA's
    smaller generator keeps the discriminator's embedding size and projects, which plain BERT configs cannot).

    Returns:
        The shared embedding module.

    Examples:
        >>> from transformers import BertConfig, BertForMaskedLM, BertForTokenClassification
        >>> cfg = dict(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
        >>> gen, disc = BertForMaskedLM(BertConfig(**cfg)), BertForTokenClassification(BertConfig(**cfg, num_labels=1))
        >>> emb = share_embeddings(gen, disc)
        >>> gen.get_input_embeddings() is disc.get_input_embeddings() is emb
        True
    """
    ge, de = generator.get_input_embeddings(), discriminator.get_input_embeddings()
    if ge.weight.shape != de.weight.shape:
        raise ValueError(
            f"cannot share embeddings of shapes {tuple(ge.weight.shape)} (generator) and {tuple(de.weight.shape)} "
            "(discriminator): use the same vocabulary and embedding width"
        )
    generator.set_input_embeddings(de)
    out = generator.get_output_embeddings() if hasattr(generator, "get_output_embeddings") else None
    if out is not None and getattr(generator.config, "tie_word_embeddings", False):
        out.weight = de.weight
    return de


# --------------------------------------------------------------------------------------------------- classes
class SimCTGLoss(TokenLoss):
    """:func:`simctg_loss` over ``batch.hidden`` (OPT-B7). CE not included: train with ``ce + loss``.

    Examples:
        >>> import torch
        >>> from tokensmith.optimization.training.base import TokenBatch, get_token_loss
        >>> b = TokenBatch(logits=None, labels=torch.zeros(1, 4, dtype=torch.long),
        ...     mask=torch.ones(1, 4, dtype=torch.bool), hidden=torch.eye(4)[None])
        >>> get_token_loss("simctg", margin=0.5)(b).item()
        0.0
    """

    name = "simctg"
    needs = ("hidden",)
    includes_ce = False

    def __init__(self, margin: float = 0.5) -> None:
        self.margin = _check_number(margin, "margin")

    def loss(self, batch: TokenBatch) -> torch.Tensor:
        return simctg_loss(batch.hidden, batch.mask, self.margin)


class ContrastiveTokenLoss(TokenLoss):
    """:func:`contrastive_token_loss` (OPT-B8). CE not included: train with ``ce + loss``.

    Examples:
        >>> import torch
        >>> from tokensmith.optimization.training.base import TokenBatch, get_token_loss
        >>> b = TokenBatch(logits=torch.zeros(1, 2, 3), labels=torch.tensor([[0, 1]]), mask=torch.ones(1, 2))
        >>> round(get_token_loss("contrastive_token", preceding_m=None, ct_length=None)(b).item(), 4)
        0.3466
    """

    name = "contrastive_token"
    needs = ("logits",)
    includes_ce = False

    def __init__(
        self, preceding_m: int | float | None = 0.5, ct_length: int | float | None = 0.25, dedup: bool = True
    ) -> None:
        self.preceding_m, self.ct_length, self.dedup = preceding_m, ct_length, dedup

    def loss(self, batch: TokenBatch) -> torch.Tensor:
        return contrastive_token_loss(
            batch.logits, batch.labels, batch.mask, self.preceding_m, self.ct_length, self.dedup
        )


class NumberTokenLoss(TokenLoss):
    """:func:`number_token_loss` (OPT-B9). CE not included: train with ``ce + λ·loss``.

    The number tokens come from ``num_values``, else from ``tokenizer`` (via :func:`number_token_values`),
    else from ``batch.extra["num_values"]``.

    Examples:
        >>> import torch, tokensmith as ts
        >>> from tokensmith.optimization.training.base import TokenBatch, get_token_loss
        >>> ntl = get_token_loss("number_token", tokenizer=ts.tiny("llama").tokenizer, variant="was")
        >>> len(ntl.num_values[0])
        10
    """

    name = "number_token"
    needs = ("logits",)
    includes_ce = False

    def __init__(
        self,
        num_values: Any = None,
        *,
        tokenizer: Any = None,
        variant: str = "mse",
        p: float = 2.0,
        digits_only: bool = True,
    ) -> None:
        if variant not in ("mse", "was"):
            raise ValueError(f"variant must be 'mse' or 'was', got {variant!r}")
        if num_values is None and tokenizer is not None:
            num_values = number_token_values(tokenizer, digits_only=digits_only)
        self.num_values, self.variant, self.p = num_values, variant, p

    def loss(self, batch: TokenBatch) -> torch.Tensor:
        nv = self.num_values if self.num_values is not None else batch.extra.get("num_values")
        if nv is None:
            raise ValueError(
                "NumberTokenLoss needs num_values: pass num_values= or tokenizer=, or batch.extra['num_values']"
            )
        return number_token_loss(batch.logits, batch.labels, batch.mask, nv, self.variant, self.p)


class SmoothedCELoss(TokenLoss):
    """:func:`smoothed_ce` (OPT-B12). **Includes** the CE term ((1 − α)·CE + α·KL): use it instead of CE.

    The embeddings come from ``embeddings`` or ``batch.extra["embeddings"]``.

    Examples:
        >>> import torch
        >>> from tokensmith.optimization.training.base import TokenBatch, get_token_loss
        >>> b = TokenBatch(logits=torch.zeros(1, 2, 3), labels=torch.tensor([[0, 1]]), mask=torch.ones(1, 2))
        >>> round(get_token_loss("smoothed_ce", embeddings=torch.eye(3), alpha=0.0)(b).item(), 4)  # log 3
        1.0986
    """

    name = "smoothed_ce"
    needs = ("logits",)
    includes_ce = True

    def __init__(self, embeddings: torch.Tensor | None = None, tau: float = 0.1, alpha: float = 0.3) -> None:
        self.embeddings = embeddings
        self.tau = _check_number(tau, "tau", lo=0.0, open_lo=True)
        self.alpha = _check_number(alpha, "alpha", lo=0.0, hi=1.0)

    def loss(self, batch: TokenBatch) -> torch.Tensor:
        E = self.embeddings if self.embeddings is not None else batch.extra.get("embeddings")
        if E is None:
            raise ValueError(
                "SmoothedCELoss needs embeddings: pass embeddings= or batch.extra['embeddings'] ([V, d])"
            )
        return smoothed_ce(batch.logits, batch.labels, batch.mask, E, self.tau, self.alpha)


class UnlikelihoodLoss(TokenLoss):
    """:func:`unlikelihood_loss` (token-level UL). CE not included: train with ``ce + loss``.

    Examples:
        >>> import torch
        >>> from tokensmith.optimization.training.base import TokenBatch, get_token_loss
        >>> b = TokenBatch(logits=torch.zeros(1, 2, 2), labels=torch.tensor([[0, 1]]), mask=torch.ones(1, 2))
        >>> round(get_token_loss("unlikelihood")(b).item(), 4)
        0.3466
    """

    name = "unlikelihood"
    needs = ("logits",)
    includes_ce = False

    def __init__(self, alpha: float = 1.0, eps: float = 1e-5) -> None:
        self.alpha = _check_number(alpha, "alpha", lo=0.0)
        self.eps = eps

    def loss(self, batch: TokenBatch) -> torch.Tensor:
        return unlikelihood_loss(batch.logits, batch.labels, batch.mask, self.alpha, self.eps)


class ReplacedTokenDetectionLoss(TokenLoss):
    """:func:`replaced_token_detection_loss` over ``batch.input_ids`` and ``batch.extra["attention_mask"]``
    (OPT-B10). **Includes** the generator's MLM cross-entropy: it is the whole ELECTRA objective, not a term
    to add to a causal-LM CE. The instance owns a ``torch.Generator`` seeded once with ``seed``, so each call
    draws fresh masks and the run is reproducible; the last :class:`RTDOutput` is kept in ``self.last``.

    Examples:
        >>> import torch
        >>> from transformers import BertConfig, BertForMaskedLM, BertForTokenClassification
        >>> from tokensmith.optimization.training.base import TokenBatch, get_token_loss
        >>> cfg = dict(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
        >>> rtd = get_token_loss("rtd", generator=BertForMaskedLM(BertConfig(**cfg)),
        ...     discriminator=BertForTokenClassification(BertConfig(**cfg, num_labels=1)), mask_token_id=4)
        >>> ids = torch.randint(5, 50, (2, 10), generator=torch.Generator().manual_seed(0))
        >>> b = TokenBatch(logits=None, labels=ids, mask=torch.ones(2, 10, dtype=torch.bool), input_ids=ids,
        ...     extra={"attention_mask": torch.ones(2, 10, dtype=torch.long)})
        >>> rtd(b).item() > 0
        True
    """

    name = "rtd"
    needs = ("input_ids", "attention_mask")
    includes_ce = True

    def __init__(
        self,
        generator: nn.Module,
        discriminator: nn.Module,
        mask_token_id: int,
        mask_prob: float = 0.15,
        lambda_disc: float = 50.0,
        seed: int = 0,
        temperature: float = 1.0,
    ) -> None:
        self.generator, self.discriminator = generator, discriminator
        self.mask_token_id, self.mask_prob, self.lambda_disc = mask_token_id, mask_prob, lambda_disc
        self.seed, self.temperature = seed, temperature
        self._rng: torch.Generator | None = None
        self.last: RTDOutput | None = None

    def loss(self, batch: TokenBatch) -> torch.Tensor:
        ids = batch.input_ids
        if self._rng is None or self._rng.device.type != ids.device.type:
            self._rng = _rng(self.seed, ids.device)
        self.last = replaced_token_detection_loss(
            self.generator,
            self.discriminator,
            ids,
            batch.extra["attention_mask"],
            generator_mask_token_id=self.mask_token_id,
            mask_prob=self.mask_prob,
            lambda_disc=self.lambda_disc,
            seed=self._rng,
            maskable=batch.extra.get("maskable"),
            temperature=self.temperature,
        )
        return self.last.loss
