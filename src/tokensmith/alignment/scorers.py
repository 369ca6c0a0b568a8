"""Token scorers: per-token weights on the policy's own tokenization for token-level preference optimisation
(METHODS.md section 4, ALN-1 and ALN-4).

A scorer maps a :class:`~tokensmith.alignment.data.PreferenceBatch` to two ``[B, T]`` weight tensors (chosen,
rejected), aligned with ``pb.mask_w`` / ``pb.mask_l``, 0 outside the completion masks and detached — the
``weights_w`` / ``weights_l`` of :func:`~tokensmith.alignment.losses.dpo` (token-weighted DPO, ALN-1):

    L = −log σ(β[Σ_t w^w_t·Δ_t(y_w) − Σ_t w^l_t·Δ_t(y_l)]),   Δ_t = log π_θ(y_t|x, y_<t) − log π_ref(y_t|x, y_<t)

Every model a scorer reads must share the policy's tokenizer (the weights index the policy's tokens); a
different vocabulary raises a ValueError. Scorers that need full next-token distributions (contrastive, TVD)
run the LM head only at the positions that predict a completion token (``logits_to_keep`` with the
completion mask, as :meth:`~tokensmith.models.ModelAdapter.token_logprobs` does), so memory is
``[N_completion_tokens, V]`` per model, never ``B×T×V``, and reduce them in position chunks.

Scorers: :class:`ContrastiveScorer` (cDPO critical tokens), :class:`ExcessLossScorer` (Rho-1),
:class:`ImplicitRewardScorer` (DPO implicit token reward), :class:`TVDScorer` (total variation between two
models), :class:`AttributionScorer` (``tokensmith.attribution``). New scorers subclass :class:`TokenScorer`
(override :meth:`TokenScorer.weights`) and register with :func:`register_scorer`.

:func:`find_critical_tokens` is the rollout probe of ALN-4: resample continuations from every prefix of a
response and report where the judged outcome flips.

    >>> import tokensmith as ts
    >>> from tokensmith.alignment.data import encode_pairs
    >>> pol, ref = ts.tiny("llama"), ts.tiny("llama", seed=1)
    >>> pb = encode_pairs(pol, [("Say hi", "Hi!", "No.")])
    >>> w_w, w_l = get_scorer("tvd", other=ref)(pb, policy=pol)
    >>> w_w.shape == pb.mask_w.shape, bool((w_l[~pb.mask_l] == 0).all())
    (True, True)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from tokensmith.alignment.data import PreferenceBatch
from tokensmith.alignment.losses import _check_beta, contrastive_token_weights
from tokensmith.models import Encoded, pad_batch
from tokensmith.models.logprobs import shift_target_mask

if TYPE_CHECKING:  # pragma: no cover
    from tokensmith.models.adapter import ModelAdapter

__all__ = [
    "TokenScorer",
    "register_scorer",
    "get_scorer",
    "available_scorers",
    "ContrastiveScorer",
    "ExcessLossScorer",
    "ImplicitRewardScorer",
    "TVDScorer",
    "AttributionScorer",
    "CriticalTokens",
    "find_critical_tokens",
]

_SCORERS: dict[str, type[TokenScorer]] = {}


# --------------------------------------------------------------------------------------------------- registry
def register_scorer(name: str) -> Callable[[type[TokenScorer]], type[TokenScorer]]:
    """Class decorator registering a :class:`TokenScorer` subclass under ``name`` (for :func:`get_scorer`).

    Args:
        name: the registry name (lower case, e.g. ``"tvd"``).

    Raises:
        ValueError: ``name`` is already taken by another class.
        TypeError: the decorated class is not a :class:`TokenScorer`.
    """
    if not isinstance(name, str) or not name:
        raise ValueError("a scorer name must be a non-empty string")

    def deco(cls: type[TokenScorer]) -> type[TokenScorer]:
        if not (isinstance(cls, type) and issubclass(cls, TokenScorer)):
            raise TypeError(f"register_scorer({name!r}) decorates TokenScorer subclasses, got {cls!r}")
        old = _SCORERS.get(name)
        if old is not None and old.__qualname__ != cls.__qualname__:
            raise ValueError(f"a scorer named {name!r} is already registered ({old.__name__}); pick another name")
        _SCORERS[name] = cls
        cls.name = name
        return cls

    return deco


def available_scorers() -> list[str]:
    """The registered scorer names, sorted."""
    return sorted(_SCORERS)


def get_scorer(name: str | TokenScorer | type[TokenScorer], **kwargs: Any) -> TokenScorer:
    """A scorer instance from a registered name (or a class, or an instance, returned as is).

    Args:
        name: a name from :func:`available_scorers`, a :class:`TokenScorer` subclass or instance.
        **kwargs: the scorer's constructor arguments (e.g. ``other=`` for ``"tvd"``).

    Raises:
        ValueError: an unknown name (the message lists the registered ones).
    """
    if isinstance(name, TokenScorer):
        if kwargs:
            raise TypeError("got a scorer instance and constructor arguments; pass a name or class with kwargs")
        return name
    if isinstance(name, type) and issubclass(name, TokenScorer):
        return name(**kwargs)
    if name not in _SCORERS:
        raise ValueError(f"unknown token scorer {name!r}; registered: {available_scorers()}")
    return _SCORERS[name](**kwargs)


# --------------------------------------------------------------------------------------------------- helpers


def check_same_tokenizer(
    policy: ModelAdapter, other: ModelAdapter, what: str = "the other model", against: str = "the policy"
) -> None:
    """Raise a ValueError unless ``other`` has exactly the policy's vocabulary (token → id) and logit width.

    Args:
        policy: the model whose tokenization the weights use.
        other: the model to check.
        what: how the error message names ``other``.
        against: how the error message names ``policy``.
    """
    if other is policy:
        return
    if not policy.same_vocab(other):
        va, vb = policy.tokenizer.get_vocab(), other.tokenizer.get_vocab()
        diff = len(set(va.items()) ^ set(vb.items()))
        raise ValueError(
            f"{what} has another tokenizer than {against} ({len(vb)} vs {len(va)} tokens, {diff} (token, id) "
            "entries differ): token weights live on the policy's tokenization, so every scorer model must use "
            "the policy's tokenizer — load it from the policy's base checkpoint (or apply the same "
            "add_tokens), or distil it onto the policy's vocabulary first"
        )
    va_n, vb_n = policy.structure.vocab_size, other.structure.vocab_size
    if va_n != vb_n:
        raise ValueError(
            f"{what} has {vb_n} logits per position but {against} has {va_n} (same tokenizer, resized embeddings?); "
            "resize both to the same vocabulary size"
        )


def _rows_mask(pb: PreferenceBatch) -> torch.Tensor:
    if not isinstance(pb, PreferenceBatch):
        raise TypeError(f"expected a PreferenceBatch (from encode_pairs), got {type(pb).__name__}")
    tm = torch.cat([pb.mask_w, pb.mask_l], 0).to(torch.bool)
    if tm.shape != pb.batch.input_ids.shape:
        raise ValueError(f"masks {tuple(tm.shape)} do not match the batch's input ids {tuple(pb.batch.input_ids.shape)}")
    keep = shift_target_mask(tm)
    if int(keep.sum()) != int(tm.sum()):
        raise ValueError("a completion mask marks the first position of a row: nothing predicts that token")
    return tm


def _row_chunks(n: int, size: int | None) -> list[tuple[int, int]]:
    size = n if not size else int(size)
    return [(s, min(n, s + size)) for s in range(0, n, size)]


def _completion_logits(adapter: ModelAdapter, pb: PreferenceBatch, tm: torch.Tensor, s: int, e: int) -> torch.Tensor:
    """``[N, V]`` logits of rows ``[s, e)`` at the positions predicting a completion token (row-major order,
    the order of ``ids[tm]``); the LM head runs only there when the model takes ``logits_to_keep``."""
    b = pb.batch
    keep = shift_target_mask(tm[s:e])
    sub = {"input_ids": b.input_ids[s:e], "attention_mask": b.attention_mask[s:e], "position_ids": b.position_ids[s:e]}
    with torch.no_grad(), adapter.eval_mode():
        z = adapter.forward(sub, logits_to_keep=keep.to(adapter.device)).logits
    if z.dim() == 3:  # the model ignored logits_to_keep
        z = z[keep.to(z.device)]
    return z


def _token_logprobs(adapter: ModelAdapter, pb: PreferenceBatch, tm: torch.Tensor, bs: int | None) -> torch.Tensor:
    with adapter.eval_mode():
        return adapter.token_logprobs(pb.batch, tm, grad=False, max_batch_size=bs).to(tm.device)


def _scatter(values: torch.Tensor, tm: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(tm.shape, dtype=torch.float32, device=tm.device)
    return out.masked_scatter(tm, values.detach().float().to(tm.device))


def _normalize_rows(w: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Scale each row so that the mean of ``|w|`` over its masked tokens is 1 (rows of zeros stay 0)."""
    m = mask.to(w.dtype)
    z = (w.abs() * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp_min(1.0)
    z = torch.where(z > 1e-12, z, torch.ones_like(z))
    return w / z


# --------------------------------------------------------------------------------------------------- base
class TokenScorer:
    """Base class of token scorers: override :meth:`weights`.

    ``scorer(pb, policy=...)`` calls :meth:`weights` and checks its output (two ``[B, T]`` float tensors, finite
    and 0 outside the masks, detached). The policy is the model whose tokenization ``pb`` carries (the one passed
    to :func:`~tokensmith.alignment.data.encode_pairs`); it may be bound at construction (``policy=``) or given
    per call — scorers that compare against the policy (excess loss, implicit reward, TVD, attribution) need one.

    Args:
        policy: the policy adapter (optional; a per-call ``policy`` wins).
    """

    name: ClassVar[str] = ""

    def __init__(self, policy: ModelAdapter | None = None) -> None:
        self.policy = policy

    def weights(self, pb: PreferenceBatch, policy: ModelAdapter | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token weights ``(w_chosen [B, T], w_rejected [B, T])``, 0 outside ``pb.mask_w`` / ``pb.mask_l``.

        Args:
            pb: the encoded preference pairs.
            policy: the policy adapter (default: the one given at construction).
        """
        raise NotImplementedError

    def __call__(self, pb: PreferenceBatch, policy: ModelAdapter | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        ww, wl = self.weights(pb, policy)
        for w, m, side in ((ww, pb.mask_w, "chosen"), (wl, pb.mask_l, "rejected")):
            if not isinstance(w, torch.Tensor) or w.shape != m.shape:
                raise ValueError(f"{type(self).__name__} returned {side} weights of shape "
                                 f"{tuple(getattr(w, 'shape', ()))}, expected {tuple(m.shape)}")
            if not bool(torch.isfinite(w).all()):
                raise ValueError(f"{type(self).__name__} returned NaN/inf {side} weights; check the models' outputs")
            if bool((w[~m.bool()] != 0).any()):
                raise ValueError(f"{type(self).__name__} returned non-zero {side} weights outside the completion mask")
        return ww.detach(), wl.detach()

    # helpers for subclasses
    def _policy(self, policy: ModelAdapter | None, required: bool = True) -> ModelAdapter | None:
        p = policy if policy is not None else self.policy
        if p is None and required:
            raise ValueError(f"{type(self).__name__} needs the policy: pass policy= to the constructor or the call")
        return p

    def _check(self, policy: ModelAdapter | None, models: dict[str, ModelAdapter]) -> None:
        items = list(models.items())
        if policy is not None:
            for what, m in items:
                check_same_tokenizer(policy, m, f"{type(self).__name__}'s {what}")
        elif len(items) > 1:
            base_name, base = items[0]
            for what, m in items[1:]:
                check_same_tokenizer(base, m, f"{type(self).__name__}'s {what}", f"its {base_name}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


# --------------------------------------------------------------------------------------------------- scorers
@register_scorer("contrastive")
class ContrastiveScorer(TokenScorer):
    """cDPO critical-token weights from contrastive estimation (Lin et al. 2024, "Critical Tokens Matter:
    Token-Level Contrastive Estimation Enhances LLM's Reasoning Capability"; METHODS.md ALN-4):

        s_t = softmax((1+γ)·z⁺_t − γ·z⁻_t)[y_t],   w^l_t = 1 − s_t,   w^w_t = 1 (default)

    z⁺ / z⁻ are the logits, at the position predicting y_t, of a model fine-tuned on correct trajectories and
    of one fine-tuned on incorrect ones (:func:`~tokensmith.alignment.losses.contrastive_token_weights`). A
    rejected token that the negative model prefers much more than the positive one — a critical token — gets
    s_t ≈ 0 and weight ≈ 1; tokens both models agree on get weight ≈ 1 − p(y_t), small when y_t is likely.

    Args:
        pos_adapter: the positive model (p₊).
        neg_adapter: the negative model (p₋).
        gamma: γ ≥ 0, the contrast strength (γ = 1: softmax(2z⁺ − z⁻)).
        chosen: ``"ones"`` (default: w^w ≡ 1 on the chosen completion, as in cDPO) or ``"contrastive"`` (the
            same 1 − s_t on the chosen tokens).
        policy: the policy (optional here; when given, both models are checked against its tokenizer).
        max_batch_size: rows per forward (default: all ``2B`` rows at once).
        chunk: positions per softmax chunk.

    Examples:
        >>> import tokensmith as ts
        >>> from tokensmith.alignment.data import encode_pairs
        >>> pos, neg = ts.tiny("llama"), ts.tiny("llama", seed=1)
        >>> pb = encode_pairs(pos, [("2+2=", " 4", " 5")], chat=False)
        >>> w_w, w_l = ContrastiveScorer(pos, neg)(pb)
        >>> bool((w_w[pb.mask_w] == 1).all()), bool(((w_l > 0) & (w_l < 1))[pb.mask_l].all())
        (True, True)
    """

    def __init__(
        self,
        pos_adapter: ModelAdapter,
        neg_adapter: ModelAdapter,
        gamma: float = 1.0,
        *,
        chosen: str = "ones",
        policy: ModelAdapter | None = None,
        max_batch_size: int | None = None,
        chunk: int = 1024,
    ) -> None:
        super().__init__(policy)
        if not isinstance(gamma, (int, float)) or not math.isfinite(gamma) or gamma < 0:
            raise ValueError(f"gamma must be a finite number >= 0, got {gamma!r}")
        if chosen not in ("ones", "contrastive"):
            raise ValueError(f"chosen must be 'ones' or 'contrastive', got {chosen!r}")
        self.pos, self.neg, self.gamma, self.chosen = pos_adapter, neg_adapter, float(gamma), chosen
        self.max_batch_size, self.chunk = max_batch_size, int(chunk)

    def weights(self, pb: PreferenceBatch, policy: ModelAdapter | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        pol = self._policy(policy, required=False)
        self._check(pol, {"pos_adapter": self.pos, "neg_adapter": self.neg})
        tm = _rows_mask(pb)
        B = len(pb)
        if self.chosen == "ones":
            tm_run = tm.clone()
            tm_run[:B] = False
        else:
            tm_run = tm
        out = torch.zeros(tm.shape, dtype=torch.float32, device=tm.device)
        ids = pb.batch.input_ids
        for s, e in _row_chunks(2 * B, self.max_batch_size):
            sub = tm_run[s:e]
            if not bool(sub.any()):
                continue
            zp = _completion_logits(self.pos, pb, tm_run, s, e)
            zn = _completion_logits(self.neg, pb, tm_run, s, e).to(zp.device)
            tgt = ids[s:e][sub].to(zp.device)
            ones = torch.ones(1, tgt.shape[0], dtype=torch.bool, device=zp.device)
            w = contrastive_token_weights(zp[None], zn[None], tgt[None], ones, gamma=self.gamma, chunk=self.chunk)[0]
            out[s:e] = _scatter(w, sub)
        if self.chosen == "ones":
            out[:B] = pb.mask_w.to(torch.float32)
        return pb.split(out)

    def __repr__(self) -> str:
        return f"ContrastiveScorer(gamma={self.gamma}, chosen={self.chosen!r})"


@register_scorer("excess_loss")
class ExcessLossScorer(TokenScorer):
    """Rho-1 excess loss per token (Lin et al. 2024, "Rho-1: Not All Tokens Are What You Need"):

        e_t = L_θ(y_t) − L_ref(y_t) = log π_ref(y_t | x, y_<t) − log π_θ(y_t | x, y_<t)

    signed: > 0 where the policy still lags the reference (a learnable, useful token), < 0 where it is ahead.
    Rho-1 trains only on the top k% tokens by e_t (``top_k=``: weight 1 on the ⌈k·n⌉ tokens of each
    completion with the largest excess loss, 0 elsewhere).

    Args:
        reference: the reference model (Rho-1's reference model trained on high-quality data).
        normalize: rescale each completion so that ``mean_t |w_t| = 1`` (mean 1 for non-negative weights; a
            signed mean can be ≈ 0, so |w| is used).
        top_k: optional fraction in (0, 1]: Rho-1's token selection instead of the raw excess loss.
        policy: the policy (θ; else given per call).
        max_batch_size: rows per forward.

    Examples:
        >>> import tokensmith as ts
        >>> from tokensmith.alignment.data import encode_pairs
        >>> pol = ts.tiny("llama")
        >>> pb = encode_pairs(pol, [("Say hi", "Hi!", "No.")])
        >>> w_w, w_l = ExcessLossScorer(pol)(pb, policy=pol)   # the policy against itself: no excess loss
        >>> float(w_w.abs().max())
        0.0
    """

    def __init__(
        self,
        reference: ModelAdapter,
        *,
        normalize: bool = False,
        top_k: float | None = None,
        policy: ModelAdapter | None = None,
        max_batch_size: int | None = None,
    ) -> None:
        super().__init__(policy)
        if top_k is not None and not (isinstance(top_k, (int, float)) and 0 < top_k <= 1):
            raise ValueError(f"top_k is a fraction in (0, 1] (Rho-1 keeps e.g. 0.6 of the tokens), got {top_k!r}")
        self.reference, self.normalize, self.top_k, self.max_batch_size = reference, bool(normalize), top_k, max_batch_size

    def weights(self, pb: PreferenceBatch, policy: ModelAdapter | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        pol = self._policy(policy)
        self._check(pol, {"reference": self.reference})
        tm = _rows_mask(pb)
        lp_pol = _token_logprobs(pol, pb, tm, self.max_batch_size)  # type: ignore[arg-type]
        lp_ref = _token_logprobs(self.reference, pb, tm, self.max_batch_size)
        w = torch.where(tm, lp_ref - lp_pol, torch.zeros((), device=tm.device))
        if self.top_k is not None:
            w = _top_fraction(w, tm, float(self.top_k))
        if self.normalize:
            w = _normalize_rows(w, tm)
        return pb.split(w)

    def __repr__(self) -> str:
        return f"ExcessLossScorer(normalize={self.normalize}, top_k={self.top_k})"


def _top_fraction(w: torch.Tensor, mask: torch.Tensor, frac: float) -> torch.Tensor:
    """1 on the ⌈frac·n_b⌉ highest-scoring masked tokens of each row, 0 elsewhere."""
    n = mask.sum(-1)
    k = torch.ceil(n.to(torch.float64) * frac).long().clamp_min(1)
    order = torch.where(mask, w, torch.full_like(w, -math.inf)).argsort(-1, descending=True)
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(w.shape[-1], device=w.device).expand_as(order).contiguous())
    return ((rank < k[:, None]) & mask).to(torch.float32)


_TRANSFORMS = ("identity", "abs", "softmax")


@register_scorer("implicit_reward")
class ImplicitRewardScorer(TokenScorer):
    """DPO implicit token reward as a weight (Rafailov et al. 2023, "Direct Preference Optimization"; Rafailov
    et al. 2024, "From r to Q*: Your Language Model is Secretly a Q-Function"; METHODS.md ALN-1):

        r̂_t = β·(log π(y_t | x, y_<t) − log π_ref(y_t | x, y_<t))

    then ``transform``: ``"identity"`` (r̂_t, signed), ``"abs"`` (|r̂_t|) or ``"softmax"``
    (n·softmax_t(r̂_t / τ) over the n tokens of each completion: positive, mean 1, the form of
    TIS-DPO-style importance weights). π is the policy — or, to weight tokens by an already trained DPO model,
    pass that model as ``policy=`` at construction. ``flip_rejected`` uses −r̂_t on the rejected completion
    (so that its most dispreferred tokens get the largest weight under ``"softmax"``).

    Args:
        reference: the reference model π_ref.
        beta: β > 0.
        transform: ``"identity"``, ``"abs"`` or ``"softmax"``.
        tau: softmax temperature τ > 0 (``"softmax"`` only).
        flip_rejected: negate r̂ on the rejected side before the transform.
        normalize: rescale each completion to ``mean_t |w_t| = 1`` after the transform.
        policy: π (else given per call).
        max_batch_size: rows per forward.
    """

    def __init__(
        self,
        reference: ModelAdapter,
        beta: float = 0.1,
        *,
        transform: str = "identity",
        tau: float = 1.0,
        flip_rejected: bool = False,
        normalize: bool = False,
        policy: ModelAdapter | None = None,
        max_batch_size: int | None = None,
    ) -> None:
        super().__init__(policy)
        _check_beta(beta)
        if transform not in _TRANSFORMS:
            raise ValueError(f"transform must be one of {_TRANSFORMS}, got {transform!r}")
        if not (isinstance(tau, (int, float)) and math.isfinite(tau) and tau > 0):
            raise ValueError(f"tau must be a finite number > 0, got {tau!r}")
        self.reference, self.beta, self.transform, self.tau = reference, float(beta), transform, float(tau)
        self.flip_rejected, self.normalize, self.max_batch_size = bool(flip_rejected), bool(normalize), max_batch_size

    def weights(self, pb: PreferenceBatch, policy: ModelAdapter | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        pol = self._policy(policy)
        self._check(pol, {"reference": self.reference})
        tm = _rows_mask(pb)
        r = self.beta * (_token_logprobs(pol, pb, tm, self.max_batch_size)  # type: ignore[arg-type]
                         - _token_logprobs(self.reference, pb, tm, self.max_batch_size))
        if self.flip_rejected:
            r[len(pb):] = -r[len(pb):]
        if self.transform == "abs":
            r = r.abs()
        elif self.transform == "softmax":
            z = torch.where(tm, r / self.tau, torch.full_like(r, -math.inf))
            r = torch.softmax(z, -1) * tm.sum(-1, keepdim=True).to(r.dtype)
        w = torch.where(tm, r, torch.zeros((), device=tm.device))
        if self.normalize:
            w = _normalize_rows(w, tm)
        return pb.split(w)

    def __repr__(self) -> str:
        return f"ImplicitRewardScorer(beta={self.beta}, transform={self.transform!r})"


@register_scorer("tvd")
class TVDScorer(TokenScorer):
    """Total variation distance between two models' next-token distributions at each completion token
    (the token-adaptive signal of AlignDistil, Zhang et al. 2025, "AlignDistil: Token-Level Language Model
    Alignment as Adaptive Policy Distillation"; METHODS.md ALN-7):

        TVD_t = ½ Σ_v |π(v | x, y_<t) − π_other(v | x, y_<t)|  ∈ [0, 1]

    (AlignDistil writes Σ_v |·| without ½: multiply by 2.) Tokens where the two models disagree most get the
    largest weight. Computed in position chunks of ``[chunk, V]``.

    Args:
        other: the second model (e.g. the reference, or a reverse-DPO model).
        normalize: rescale each completion to mean weight 1.
        policy: the first model (else given per call).
        max_batch_size: rows per forward.
        chunk: positions per chunk.
    """

    def __init__(
        self,
        other: ModelAdapter,
        *,
        normalize: bool = False,
        policy: ModelAdapter | None = None,
        max_batch_size: int | None = None,
        chunk: int = 1024,
    ) -> None:
        super().__init__(policy)
        self.other, self.normalize, self.max_batch_size, self.chunk = other, bool(normalize), max_batch_size, int(chunk)

    def weights(self, pb: PreferenceBatch, policy: ModelAdapter | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        pol = self._policy(policy)
        self._check(pol, {"other": self.other})
        tm = _rows_mask(pb)
        out = torch.zeros(tm.shape, dtype=torch.float32, device=tm.device)
        for s, e in _row_chunks(tm.shape[0], self.max_batch_size):
            zp = _completion_logits(pol, pb, tm, s, e)  # type: ignore[arg-type]
            zq = _completion_logits(self.other, pb, tm, s, e).to(zp.device)
            tvd = torch.empty(zp.shape[0], dtype=torch.float32, device=zp.device)
            for c in range(0, zp.shape[0], self.chunk):
                p = torch.softmax(zp[c : c + self.chunk].float(), -1)
                q = torch.softmax(zq[c : c + self.chunk].float(), -1)
                tvd[c : c + self.chunk] = 0.5 * (p - q).abs().sum(-1)
            out[s:e] = _scatter(tvd.clamp(0.0, 1.0), tm[s:e])
        if self.normalize:
            out = _normalize_rows(out, tm)
        return pb.split(out)

    def __repr__(self) -> str:
        return f"TVDScorer(normalize={self.normalize})"


_REDUCE = ("abs", "signed", "positive")


@register_scorer("attribution")
class AttributionScorer(TokenScorer):
    """Token weights from input attribution of the completion's own log-likelihood (``tokensmith.attribution``;
    in the spirit of attribution-shaped dense rewards, Koo et al. 2025, "Learning Explainable Dense Reward
    Shapes via Bayesian Optimization", METHODS.md ALN-9):

        f(y) = Σ_{t ∈ completion} log π(y_t | x, y_<t),    a_i = attribution of f to token y_i

    e.g. for ``method="input_x_gradient"`` (the default, one forward and one backward per completion)
    a_i = ⟨e_i, ∂f/∂e_i⟩ with e_i the input embedding of y_i. A completion token gets a large |a_i| when the
    likelihood of the rest of the completion hinges on it; the last scored token influences no later token, so
    its attribution is 0 (and template/special tokens such as the chat end-of-turn are not attribution sources
    unless ``include_template=True``, so they get 0 too). Each completion is attributed on its own
    (:func:`~tokensmith.attribution.attribute` with a callable target over the row's unpadded ``Encoded``).

    Args:
        method: an attribution method name (:func:`tokensmith.attribution.available_methods`), class or instance;
            gradient methods are the cheap ones.
        reduce: ``"abs"`` (|a_i|, default), ``"signed"`` (a_i) or ``"positive"`` (max(a_i, 0)).
        normalize: rescale each completion to ``mean_t |w_t| = 1`` (default True: raw attributions have an
            arbitrary scale).
        include_template: also attribute to template/special tokens.
        model: the model attributed (default: the policy).
        policy: the policy (else given per call).
        **method_kwargs: the method's settings (e.g. ``n_steps=16`` for integrated gradients).
    """

    def __init__(
        self,
        method: Any = "input_x_gradient",
        *,
        reduce: str = "abs",
        normalize: bool = True,
        include_template: bool = False,
        model: ModelAdapter | None = None,
        policy: ModelAdapter | None = None,
        **method_kwargs: Any,
    ) -> None:
        super().__init__(policy)
        if reduce not in _REDUCE:
            raise ValueError(f"reduce must be one of {_REDUCE}, got {reduce!r}")
        from tokensmith.attribution import get_method

        get_method(method, **method_kwargs)  # fail early on an unknown method / bad settings
        self.method, self.method_kwargs, self.reduce = method, dict(method_kwargs), reduce
        self.normalize, self.include_template, self.model = bool(normalize), bool(include_template), model

    def weights(self, pb: PreferenceBatch, policy: ModelAdapter | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        from tokensmith.attribution import attribute

        pol = self._policy(policy, required=self.model is None)
        ad = self.model if self.model is not None else pol
        if self.model is not None and pol is not None:
            self._check(pol, {"model": self.model})
        tm = _rows_mask(pb)
        b = pb.batch
        out = torch.zeros(tm.shape, dtype=torch.float32, device=tm.device)
        for r in range(tm.shape[0]):
            off = int(b.pad_offsets[r])
            ex = b.examples[r]
            if not torch.equal(ex.input_ids.cpu(), b.input_ids[r, off:].cpu()):
                raise ValueError(f"row {r}: the batch ids differ from its Encoded example; re-encode with encode_pairs")
            pos = torch.nonzero(tm[r, off:].cpu()).flatten()
            y = ex.input_ids[pos]

            def f(outputs: Any, problem: Any, pos: torch.Tensor = pos, y: torch.Tensor = y) -> torch.Tensor:
                z = outputs.logits[:, (pos - 1).to(outputs.logits.device)].float()
                lp = torch.log_softmax(z, -1).gather(-1, y.to(z.device)[None, :, None].expand(z.shape[0], -1, 1))
                return lp[..., 0].sum(-1)

            with ad.eval_mode():  # type: ignore[union-attr]
                res = attribute(ad, ex, target=f, method=self.method, include_template=self.include_template,
                                progress=False, **self.method_kwargs)
            a = res.scores[0, pos].to(torch.float32)
            if self.reduce == "abs":
                a = a.abs()
            elif self.reduce == "positive":
                a = a.clamp_min(0.0)
            row = torch.zeros(tm.shape[1], dtype=torch.float32)
            row[off + pos] = a.cpu()
            out[r] = row.to(out.device)
        if self.normalize:
            out = _normalize_rows(out, tm)
        return pb.split(out)

    def __repr__(self) -> str:
        return f"AttributionScorer(method={self.method!r}, reduce={self.reduce!r}, normalize={self.normalize})"


# --------------------------------------------------------------------------------------------------- probe
@dataclass
class CriticalTokens:
    """Result of :func:`find_critical_tokens`: per evaluated prefix, the success rate of resampled rollouts.

    ``rates[p]`` is the fraction of the ``n_rollouts`` continuations of ``prompt + response[:positions[p]]``
    (the response's first ``positions[p]`` tokens) that the judge accepts, i.e. an estimate of
    P(success | x, y_<t) before token ``t = positions[p]`` is committed. ``deltas[p]`` is the change from
    there to the next evaluated prefix (or to ``final``, the judge's verdict on the full response, after the
    last one): with every position evaluated, ``deltas[p] = rate(t + 1) − rate(t)`` is the effect of committing
    token ``y_t`` alone — very negative for the critical tokens of Lin et al. 2024 ("Critical Tokens Matter").
    ``flips[p]``: the majority outcome (rate ≥ ``threshold``) changes across that step.

    Attributes:
        tokens: the response's tokens (strings), ``n`` of them.
        token_ids: ``[n]`` their ids.
        positions: ``[P]`` evaluated prefix lengths t (0 ≤ t < n), sorted.
        rates: ``[P]`` success rates in [0, 1].
        successes: ``[P, n_rollouts]`` the judge's verdict on each rollout.
        rollouts: ``P`` lists of ``n_rollouts`` judged texts (response prefix + continuation).
        final: the judge's verdict on the response itself.
        deltas: ``[P]`` rate changes (see above).
        flips: ``[P]`` majority flips.
        threshold: the majority threshold.
        seed: the base seed (rollouts of prefix t use ``seed + t``).
    """

    tokens: list[str]
    token_ids: torch.Tensor
    positions: torch.Tensor
    rates: torch.Tensor
    successes: torch.Tensor
    rollouts: list[list[str]]
    final: bool
    deltas: torch.Tensor
    flips: torch.Tensor
    threshold: float = 0.5
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.positions.numel())

    @property
    def flip_positions(self) -> list[int]:
        """Token positions where the majority outcome flips."""
        return [int(t) for t in self.positions[self.flips]]

    def top(self, k: int = 5, direction: str = "down") -> list[tuple[int, str, float, float]]:
        """The ``k`` most critical tokens as ``(position, token, rate_before, delta)``.

        Args:
            k: how many.
            direction: ``"down"`` (largest drop in success rate first — tokens that derail the response),
                ``"up"`` (largest rise) or ``"abs"`` (largest change either way).
        """
        if direction == "down":
            key = -self.deltas
        elif direction == "up":
            key = self.deltas
        elif direction == "abs":
            key = self.deltas.abs()
        else:
            raise ValueError(f"direction must be 'down', 'up' or 'abs', got {direction!r}")
        order = torch.argsort(key, descending=True, stable=True)[: max(0, int(k))]
        return [(int(self.positions[i]), self.tokens[int(self.positions[i])], float(self.rates[i]),
                 float(self.deltas[i])) for i in order]

    def table(self) -> list[dict[str, Any]]:
        """One dict per evaluated position (position, token, rate, delta, flip) — e.g. for ``pandas.DataFrame``."""
        return [{"position": int(t), "token": self.tokens[int(t)], "rate": float(r), "delta": float(d), "flip": bool(f)}
                for t, r, d, f in zip(self.positions, self.rates, self.deltas, self.flips, strict=True)]

    def __repr__(self) -> str:
        return (f"CriticalTokens(tokens={len(self.tokens)}, positions={len(self)}, "
                f"rollouts={int(self.successes.shape[1]) if self.successes.dim() == 2 else 0}, "
                f"flips={self.flip_positions}, final={self.final})")


def _verdict(v: Any, text: str) -> bool:
    if isinstance(v, bool) or type(v).__name__ in ("bool_", "bool8"):
        return bool(v)
    if isinstance(v, int) and v in (0, 1):
        return bool(v)
    if isinstance(v, torch.Tensor) and v.numel() == 1 and v.dtype == torch.bool:
        return bool(v)
    raise TypeError(f"judge(text) must return a bool, got {v!r} ({type(v).__name__}) for {text[:60]!r}")


def _prefix(enc: Encoded, n: int) -> Encoded:
    """The first ``n`` tokens of ``enc`` (ids, offsets, segments; spans dropped), for generation."""
    end = enc.offsets[n - 1][1] if n else 0
    return Encoded(
        input_ids=enc.input_ids[:n].clone(),
        text=enc.text[:end],
        offsets=list(enc.offsets[:n]),
        spans={},
        segment_ids=enc.segment_ids[:n].clone(),
        segment_names=list(enc.segment_names),
        special_mask=enc.special_mask[:n].clone(),
        tokens=list(enc.tokens[:n]),
    )


def find_critical_tokens(
    adapter: ModelAdapter,
    prompt: Any,
    response: str,
    judge: Callable[[str], bool],
    n_rollouts: int = 8,
    max_new_tokens: int = 32,
    *,
    positions: Sequence[int] | torch.Tensor | None = None,
    seed: int = 0,
    chat: bool = True,
    system: str | None = None,
    threshold: float = 0.5,
    **gen_kwargs: Any,
) -> CriticalTokens:
    """Critical-token probe by rollouts (Lin et al. 2024, "Critical Tokens Matter"; METHODS.md ALN-4).

    For each prefix length t of the response's tokens (all of them, or ``positions``), sample ``n_rollouts``
    continuations of ``prompt + y_<t`` with ``adapter.generate(..., do_sample=True, seed=seed + t)`` — all
    rollouts of one position in one batched call — and judge each full text (``y_<t`` decoded with the
    continuation). The success rate estimates

        rate(t) = P(judge(y_<t ⊕ ŷ) = True),   ŷ ~ π(· | x, y_<t)

    and a token y_t whose commitment makes rate(t + 1) ≪ rate(t) is critical. The prompt and response are
    tokenized jointly (``adapter.encode(prompt, target=response, chat=chat)``), so the prefixes are exactly
    the tokens the model sees. Seeds are per position, so a position's rollouts do not depend on which other
    positions are evaluated.

    Args:
        adapter: the model that generates.
        prompt: the prompt (a user turn with ``chat=True``).
        response: the response whose tokens are probed.
        judge: ``judge(text) -> bool`` on the response text (e.g. "the final answer is correct").
        n_rollouts: continuations per prefix.
        max_new_tokens: generation budget per continuation.
        positions: prefix lengths to evaluate (0 ≤ t < n); default every token position.
        seed: base seed (prefix t uses ``seed + t``).
        chat: render through the chat template.
        system: system message (chat mode).
        threshold: success rate separating the two majority outcomes (for ``flips``).
        **gen_kwargs: passed to ``adapter.generate`` (``temperature=``, ``top_p=``, ...).

    Returns:
        :class:`CriticalTokens`.

    Examples:
        >>> import tokensmith as ts
        >>> ad = ts.tiny("llama")
        >>> ct = find_critical_tokens(ad, "Spell a word.", "tree", lambda s: "e" in s, n_rollouts=2,
        ...                           max_new_tokens=2, chat=False)
        >>> len(ct) == len(ct.tokens), bool(((ct.rates >= 0) & (ct.rates <= 1)).all())
        (True, True)
    """
    if not isinstance(response, str) or not response:
        raise ValueError("response must be a non-empty string")
    if not callable(judge):
        raise TypeError("judge must be a callable judge(text) -> bool")
    if not (isinstance(n_rollouts, int) and n_rollouts >= 1):
        raise ValueError(f"n_rollouts must be an int >= 1, got {n_rollouts!r}")
    if not 0.0 <= float(threshold) <= 1.0:
        raise ValueError(f"threshold must lie in [0, 1], got {threshold!r}")
    kw: dict[str, Any] = {"chat": True, "system": system, "score_eot": False} if chat else {}
    enc = adapter.encode(prompt, target=response, **kw)
    where = torch.nonzero(enc.target_mask).flatten()
    if where.numel() == 0:
        raise ValueError("the response produced no token of its own (it merged into the prompt)")
    a, n = int(where[0]), int(where.numel())
    if int(where[-1]) != a + n - 1:
        raise ValueError("the response tokens are not contiguous; cannot probe prefixes")
    resp_ids = enc.input_ids[a : a + n]
    if positions is None:
        pos = list(range(n))
    else:
        pos = sorted({int(t) for t in (positions.tolist() if isinstance(positions, torch.Tensor) else positions)})
        bad = [t for t in pos if not 0 <= t < n]
        if bad or not pos:
            raise ValueError(f"positions must be prefix lengths in [0, {n}) (the response has {n} tokens), got {bad or pos}")
    tok = adapter.tokenizer
    succ, rolls = [], []
    for t in pos:
        pre = _prefix(enc, a + t)
        if len(pre) == 0:
            raise ValueError("nothing to generate from: the prompt is empty and t = 0")
        batch = pad_batch([pre] * n_rollouts, adapter.pad_token_id)
        g = adapter.generate(batch, max_new_tokens=max_new_tokens, do_sample=True, seed=int(seed) + t, **gen_kwargs)
        texts = [tok.decode(resp_ids[:t].tolist() + new.tolist(), skip_special_tokens=True) for new in g.new_tokens]
        rolls.append(texts)
        succ.append([_verdict(judge(s), s) for s in texts])
    final = _verdict(judge(response), response)
    successes = torch.tensor(succ, dtype=torch.bool)
    rates = successes.float().mean(-1)
    nxt = torch.cat([rates[1:], torch.tensor([float(final)])])
    deltas = nxt - rates
    thr = float(threshold)
    flips = (rates >= thr) != (nxt >= thr)
    tokens = [tok.convert_ids_to_tokens(int(i)) for i in resp_ids]
    return CriticalTokens(tokens, resp_ids.clone(), torch.tensor(pos, dtype=torch.long), rates, successes, rolls,
                          final, deltas, flips, thr, int(seed), {"n_rollouts": n_rollouts, "max_new_tokens": max_new_tokens})
