"""Learned Token Pruning (LTP; Kim, Shen, Thorsley, Gholami, Kwon, Hassoun, Keutzer, KDD 2022, "Learned Token
Pruning for Transformers") — METHODS.md PRN-3, PRN-4.

LTP removes, after each layer ``l``, the tokens whose *importance score* falls below a per-layer threshold
``θ_l`` learned with a FLOPs penalty. The pieces, bottom to top:

**Importance** (the attention a token receives, averaged over heads and real queries):

    s_l,j = 1/(H·|Q|) Σ_h Σ_{q ∈ Q} A_l[h, q, j]            (:func:`ltp_scores`; Q = the real, kept queries)

**Thresholds** (:class:`LTPThresholds`): ``θ_l = θ_base·l/L + δ_l`` with ``l = 1..L`` and learnable ``δ_l``
initialised at 0 (METHODS PRN-4; the authors' release initialises the last layer's threshold at ``θ_base``
and scales the others linearly). Tokens are dropped *after* a layer here, so by default the last layer does
not prune (it would save no compute). Learning ``δ_l`` is the same as learning ``θ_l`` itself from the linear
initialisation: ``∂θ_l/∂δ_l = 1``, so the gradients are identical (they differ only under weight decay).

**Soft mask** during training (:func:`ltp_soft_mask`), multiplied into layer ``l``'s output hidden states:

    m_l,j = σ((s_l,j − θ_l) / T)

Cumulative by default: the hidden states leaving layer ``l`` are multiplied by ``M_l,j = Π_{k ≤ l} m_k,j``, so
a token masked at layer ``l`` stays masked in the layers after it. This matters for post-LN encoders (BERT),
where the next layer's LayerNorm would otherwise re-normalise a scaled-down token back to full size. The
authors' release multiplies each layer's own ``m_l`` only (``cumulative=False`` reproduces that); with binary
masks both equal the hard pruning below (``M² = M``). A layer that does not prune, after one that does,
re-applies the current mask. Scores are computed from detached attention probabilities (the probe records
them without a graph): gradients reach ``θ`` through the masks, and the model (``train_model=True``) through the
masked hidden states, not through ``s``.

**Loss** (:func:`ltp_penalty`; METHODS: task + λ Σ_l ‖m_l‖₁):

    loss = L_task + λ · (1/|P|) Σ_{l ∈ P} ‖M_l‖₁ / n          (P = pruned layers, n = real tokens of the row)

i.e. λ times the mean kept fraction (averaged over the batch). The paper writes ``(1/L) Σ_l ‖M_l‖₁``; dividing
by ``n`` makes λ independent of the input length. :func:`train_ltp_thresholds` minimises it over the
thresholds only (the model frozen), or also over the model (``train_model=True``).

**Hard pruning** at inference (:func:`ltp_forward`, ``physical=True``): tokens with ``s_l,j < θ_l`` are
dropped after layer ``l`` (gathered out of the hidden states, which continue through
``adapter.run_layers`` with their original position ids); the kept set only shrinks, protected tokens
(``[CLS]`` of an encoder, the last token of a causal LM) are always kept and every row keeps at least its
best token. :func:`ltp_mask_forward` is the simulated variant (no drop, ``physical=False``): soft masks, or
hard 0/1 masks that also remove dropped tokens as keys of later layers (through
:func:`tokensmith.models.masking.attention_override`) and as queries of later scores — which equals the
physical drop (tested).

**FLOPs** (:func:`ltp_flops`, :func:`ltp_flops_ratio`), analytic, per layer for ``n`` tokens entering it
(multiply-accumulates; the ratio is the same in FLOPs):

    C_l(n) = n·P_l + 2·n²·H·d_head

with ``P_l`` the weights of the layer's linear maps (every 2-D parameter of the layer: q/k/v/o and the MLP;
12·d² for BERT, giving the paper's ``12·n·d² + 2·n²·d``) and the ``n²`` term for ``QKᵀ`` and ``A·V``. The
ratio is ``Σ_b Σ_l C_l(n_b,l) / Σ_b Σ_l C_l(n_b)``; embeddings and the head are not counted, and a causal
model is counted with the full ``n²`` (as SDPA computes it).

Classification: the encoder's pooled output (mean over the kept real tokens, weighted by ``M_L`` in the
simulated variant; or ``[CLS]``) feeds a head you pass (:func:`classification_loss`). Causal LMs: next-token
cross-entropy at the last position (:func:`next_token_loss`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from tokensmith.models.masking import attention_override
from tokensmith.models.padding import logical_positions
from tokensmith.pruning.scores import attention_received
from tokensmith.pruning.select import threshold_keep

if TYPE_CHECKING:  # pragma: no cover
    from tokensmith.models.adapter import ModelAdapter

__all__ = [
    "LTPThresholds",
    "LTPOutput",
    "ltp_scores",
    "ltp_soft_mask",
    "ltp_penalty",
    "ltp_layer_costs",
    "ltp_flops",
    "ltp_flops_ratio",
    "ltp_mask_forward",
    "ltp_forward",
    "train_ltp_thresholds",
    "classification_loss",
    "next_token_loss",
]


# ---------------------------------------------------------------------------------------------- thresholds
class LTPThresholds(nn.Module):
    """Per-layer LTP thresholds ``θ_l = θ_base·l/L + δ_l`` (Kim et al. 2022; METHODS.md PRN-4).

    ``l = 1..L`` (so layer index ``i`` gets ``θ_base·(i+1)/L``); ``δ`` is the learnable ``[L]`` parameter,
    initialised at 0. Layers not in ``layers`` do not prune (``θ = −inf``).

    Args:
        num_layers: ``L``, the model's number of layers.
        theta_base: the last layer's initial threshold (the authors use 0.01 for 128-token GLUE inputs;
            importance scores average ``1/n`` over a row's ``n`` tokens, so scale it with your lengths).
        layers: the layer indices that prune (default: all but the last, ``0..L−2``: tokens are dropped
            *after* a layer, so a threshold on the last layer would save no compute and would only reward
            the penalty for pruning what pooling reads).
        init: explicit initial thresholds ``[L]`` instead of the linear ramp (``-inf`` = this layer keeps
            everything); overrides ``theta_base`` and ``layers``.

    Examples:
        >>> th = LTPThresholds(2, theta_base=0.1)   # e.g. for ts.tiny("llama"), which has 2 layers
        >>> [round(v, 3) for v in th.theta().tolist()]
        [0.05, -inf]
        >>> [round(v, 3) for v in LTPThresholds(2, theta_base=0.1, layers=[0, 1]).theta().tolist()]
        [0.05, 0.1]
        >>> LTPThresholds.keep_all(2).theta().tolist()
        [-inf, -inf]
    """

    def __init__(
        self,
        num_layers: int,
        theta_base: float = 0.01,
        layers: Iterable[int] | None = None,
        init: torch.Tensor | Sequence[float] | None = None,
    ):
        super().__init__()
        L = int(num_layers)
        if L < 1:
            raise ValueError(f"num_layers must be a positive number of layers, got {num_layers!r}")
        if init is not None:
            vals = torch.as_tensor(init, dtype=torch.float32).reshape(-1)
            if vals.numel() != L:
                raise ValueError(f"init gives {vals.numel()} thresholds for a model with {L} layers")
            if bool(torch.isnan(vals).any()) or bool((vals == math.inf).any()):
                raise ValueError(
                    "init thresholds must be finite or -inf (-inf = the layer keeps every token)"
                )
            active = torch.isfinite(vals)
            base = torch.where(active, vals, torch.zeros_like(vals))
        else:
            if not math.isfinite(float(theta_base)):
                raise ValueError(f"theta_base must be finite, got {theta_base!r}")
            base = float(theta_base) * torch.arange(1, L + 1, dtype=torch.float32) / L
            active = torch.zeros(L, dtype=torch.bool)
            for i in range(max(L - 1, 1)) if layers is None else layers:
                if not -L <= int(i) < L:
                    raise ValueError(f"layer {i} out of range for a model with {L} layers")
                active[int(i) % L] = True
        self.register_buffer("base", base)
        self.register_buffer("active", active)
        self.delta = nn.Parameter(torch.zeros(L))
        self.history: list[dict[str, float]] = []

    @classmethod
    def keep_all(cls, num_layers: int) -> LTPThresholds:
        """Thresholds that prune nothing (``θ_l = −inf`` everywhere): :func:`ltp_forward` is the plain forward."""
        return cls(num_layers, layers=[])

    @property
    def num_layers(self) -> int:
        return int(self.base.numel())

    def theta(self) -> torch.Tensor:
        """``[L]`` thresholds ``θ_base·l/L + δ_l`` (``−inf`` at layers that do not prune), differentiable in ``δ``."""
        return torch.where(self.active, self.base + self.delta, torch.full_like(self.base, -math.inf))

    def forward(self) -> torch.Tensor:
        return self.theta()

    def pruned_layers(self) -> list[int]:
        """Indices of the layers that prune."""
        return [int(i) for i in torch.nonzero(self.active).flatten().tolist()]

    def extra_repr(self) -> str:
        return f"num_layers={self.num_layers}, pruned_layers={self.pruned_layers()}"


def _as_thresholds(thresholds: Any, L: int) -> LTPThresholds:
    if isinstance(thresholds, LTPThresholds):
        th = thresholds
    elif isinstance(thresholds, (torch.Tensor, Sequence)) and not isinstance(thresholds, str):
        th = LTPThresholds(L, init=thresholds)
    else:
        raise TypeError(
            f"thresholds must be an LTPThresholds or [L] threshold values, got {type(thresholds).__name__}"
        )
    if th.num_layers != L:
        raise ValueError(f"thresholds cover {th.num_layers} layers; the model has {L}")
    return th


# ---------------------------------------------------------------------------------------------- pure functions
def ltp_scores(
    attn: torch.Tensor, valid: torch.Tensor, row_valid: torch.Tensor | None = None
) -> torch.Tensor:
    """LTP importance scores ``[B, T]`` (Kim et al. 2022, Eq. 4): the attention each token receives, averaged
    over heads and real queries,

        s_j = 1/(H·|Q|) Σ_h Σ_{q ∈ Q} A[h, q, j]

    (:func:`tokensmith.pruning.scores.attention_received` over all query rows). Pads get ``-inf``.

    Args:
        attn: ``[B, H, T, T]`` attention probabilities (every query row).
        valid: ``[B, T]`` real (kept) key columns.
        row_valid: ``[B, T]`` query rows that vote (default ``valid``: pad queries do not).

    Examples:
        >>> import torch
        >>> A = torch.tensor([[[[0.5, 0.5], [0.9, 0.1]]]])   # one head, two queries
        >>> ltp_scores(A, torch.ones(1, 2, dtype=torch.bool)).tolist()
        [[0.699999988079071, 0.30000001192092896]]
    """
    if attn.dim() != 4 or attn.shape[-1] != attn.shape[-2]:
        raise ValueError(f"attn must be [B, H, T, T] with every query row, got {tuple(attn.shape)}")
    if valid.shape != (attn.shape[0], attn.shape[-1]):
        raise ValueError(
            f"valid must be [B, T] = {(attn.shape[0], attn.shape[-1])}, got {tuple(valid.shape)}"
        )
    rv = valid if row_valid is None else row_valid
    return attention_received(attn, valid.bool(), rv.bool())[:, 0]


def ltp_soft_mask(
    scores: torch.Tensor,
    theta: float | torch.Tensor,
    temperature: float,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """LTP soft mask (Kim et al. 2022, Eq. 6): ``m_j = σ((s_j − θ) / T)``; 0 at pads (``valid`` False or
    ``s = −inf``). Differentiable in ``θ`` (and in ``s``).

    Examples:
        >>> import torch
        >>> m = ltp_soft_mask(torch.tensor([[0.3, 0.1, -float("inf")]]), 0.2, 0.1)
        >>> [round(v, 4) for v in m.flatten().tolist()]
        [0.7311, 0.2689, 0.0]
    """
    T = float(temperature)
    if not T > 0 or not math.isfinite(T):
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")
    ok = torch.isfinite(scores)
    if valid is not None:
        ok = ok & valid.to(scores.device).bool()
    th = torch.as_tensor(theta, dtype=scores.dtype, device=scores.device)
    if not bool(torch.isfinite(th).all()):
        # θ = −inf keeps every real token (σ(+inf) = 1); avoids inf − inf
        return ok.to(scores.dtype)
    s = torch.where(ok, scores, torch.zeros_like(scores))
    return torch.where(ok, torch.sigmoid((s - th) / T), torch.zeros_like(s))


def ltp_penalty(masks: Sequence[torch.Tensor] | torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """The LTP pruning penalty: the mean kept fraction over the pruned layers and the batch,

        R = (1/B) Σ_b (1/|P|) Σ_{l ∈ P} ‖M_l,b‖₁ / n_b

    (the paper's ``(1/L) Σ_l ‖M_l‖₁`` divided by the row's real-token count ``n_b``; see the module docstring).

    Args:
        masks: per pruned layer a ``[B, T]`` mask (or a stacked ``[|P|, B, T]`` tensor).
        valid: ``[B, T]`` real tokens.

    Examples:
        >>> import torch
        >>> v = torch.ones(1, 4, dtype=torch.bool)
        >>> float(ltp_penalty([torch.tensor([[1.0, 1, 0, 0]]), torch.tensor([[1.0, 0, 0, 0]])], v))
        0.375
    """
    m = torch.stack(list(masks)) if not isinstance(masks, torch.Tensor) else masks
    if m.dim() != 3 or m.shape[1:] != valid.shape:
        raise ValueError(
            f"masks must be [layers, B, T] with [B, T] = {tuple(valid.shape)}, got {tuple(m.shape)}"
        )
    n = valid.to(m.device).float().sum(-1).clamp_min(1.0)  # [B]
    frac = (m * valid.to(m.device)).sum(-1) / n  # [|P|, B]
    return frac.mean()


def ltp_flops(
    tokens: torch.Tensor,
    linear_params: torch.Tensor | Sequence[int],
    attn_width: torch.Tensor | Sequence[int],
) -> torch.Tensor:
    """Analytic multiply-accumulates of the layer stack per row (Kim et al. 2022, §4.1):

        C = Σ_l  n_l·P_l + 2·n_l²·W_l

    Args:
        tokens: ``[L, B]`` tokens entering each layer (floats allowed: expected counts of soft masks).
        linear_params: ``[L]`` weights of each layer's linear maps (``12·d²`` for BERT).
        attn_width: ``[L]`` ``H·d_head`` of each layer's attention (0 for a layer without attention).

    Returns:
        ``[B]`` MACs (float64).

    Examples:
        >>> import torch
        >>> d = 8   # BERT-like: P = 12 d², W = d; one layer, 10 tokens -> 12·10·64 + 2·100·8
        >>> ltp_flops(torch.tensor([[10.0]]), [12 * d * d], [d]).tolist()
        [9280.0]
    """
    n = torch.as_tensor(tokens, dtype=torch.float64)
    if n.dim() == 1:
        n = n[:, None]
    P = torch.as_tensor(linear_params, dtype=torch.float64).reshape(-1, 1).to(n.device)
    W = torch.as_tensor(attn_width, dtype=torch.float64).reshape(-1, 1).to(n.device)
    if P.shape[0] != n.shape[0] or W.shape[0] != n.shape[0]:
        raise ValueError(
            f"tokens cover {n.shape[0]} layers; linear_params {P.shape[0]}, attn_width {W.shape[0]}"
        )
    return (n * P + 2.0 * n * n * W).sum(0)


def ltp_flops_ratio(
    tokens: torch.Tensor,
    n0: torch.Tensor,
    linear_params: torch.Tensor | Sequence[int],
    attn_width: torch.Tensor | Sequence[int],
) -> float:
    """``Σ_b C(n_b,l) / Σ_b C(n_b)``: the pruned stack's MACs over the unpruned one's (:func:`ltp_flops`).

    Args:
        tokens: ``[L, B]`` tokens entering each layer after pruning.
        n0: ``[B]`` real tokens of each row (what every layer sees without pruning).

    Examples:
        >>> import torch
        >>> round(ltp_flops_ratio(torch.tensor([[10.0], [5.0]]), torch.tensor([10]), [12 * 64] * 2, [8] * 2), 4)
        0.7284
    """
    n = torch.as_tensor(tokens, dtype=torch.float64)
    base = torch.as_tensor(n0, dtype=torch.float64).reshape(1, -1).expand(n.shape[0], -1)
    den = float(ltp_flops(base, linear_params, attn_width).sum())
    return float(ltp_flops(n, linear_params, attn_width).sum()) / den if den > 0 else 1.0


def ltp_layer_costs(adapter: ModelAdapter) -> tuple[torch.Tensor, torch.Tensor]:
    """``(P [L], W [L])`` for :func:`ltp_flops`: the number of weights in each layer's 2-D parameters (its
    linear maps; a mixture-of-experts layer counts every expert) and ``H·d_head`` (0 without attention).

    Examples:
        >>> import tokensmith as ts
        >>> P, W = ltp_layer_costs(ts.tiny("llama"))
        >>> P.tolist(), W.tolist()
        ([36864, 36864], [64, 64])
    """
    s = adapter.structure
    P, W = [], []
    for i, layer in enumerate(s.layers):
        P.append(sum(int(p.numel()) for p in layer.parameters() if p.dim() == 2))
        W.append(int(s.num_heads * s.head_dim) if s.attn[i] is not None else 0)
    return torch.tensor(P, dtype=torch.long), torch.tensor(W, dtype=torch.long)


# ---------------------------------------------------------------------------------------------- output
@dataclass
class LTPOutput:
    """What :func:`ltp_forward` / :func:`ltp_mask_forward` return.

    Attributes:
        hidden: ``[B, T', d]`` output of the last layer. Physical: the kept tokens only, left-padded (``T'`` =
            the most kept in a row); simulated: all ``T`` tokens, multiplied by their masks.
        weights: ``[B, T']`` each slot's weight in pooling: 1 at kept real tokens (physical), ``M_L`` (simulated).
        columns: ``[B, T']`` the original column of each slot (-1 at padding).
        pooled: ``[B, d]`` pooled output (after the final norm, if the model has one).
        logits: ``head(pooled)`` when a head was given; else, for a causal LM, the next-token logits ``[B, V]``
            at the last position; else None.
        kept: ``[L, B]`` tokens left after each layer (expected counts ``Σ_j M_l,j`` for soft masks).
        entering: ``[L, B]`` tokens entering each layer (what the FLOPs count uses).
        seq_len: ``[B]`` real tokens of each row before pruning.
        flops_ratio: analytic MACs with pruning / without (:func:`ltp_flops_ratio`).
        physical: True when tokens were really dropped (compute saved), False for masks (simulated).
        scores: ``{layer: [B, T_l]}`` importance scores at each pruned layer (detached; physical: over the
            tokens entering that layer).
        masks: per pruned layer the ``[B, T]`` mask ``M_l`` (simulated; differentiable for soft masks).
        penalty: :func:`ltp_penalty` of ``masks`` (simulated; differentiable), else None.
    """

    hidden: torch.Tensor
    weights: torch.Tensor
    columns: torch.Tensor
    pooled: torch.Tensor
    logits: torch.Tensor | None
    kept: torch.Tensor
    entering: torch.Tensor
    seq_len: torch.Tensor
    flops_ratio: float
    physical: bool
    scores: dict[int, torch.Tensor] = field(default_factory=dict)
    masks: list[torch.Tensor] = field(default_factory=list)
    penalty: torch.Tensor | None = None

    def kept_fraction(self) -> torch.Tensor:
        """``[L]`` mean over rows of the fraction of real tokens left after each layer."""
        return (self.kept.double() / self.seq_len.double().clamp_min(1)[None, :]).mean(-1)

    def summary(self) -> dict[str, Any]:
        """Plain numbers: physical, FLOPs ratio, kept fraction per layer, mean tokens before/after."""
        return {
            "physical": self.physical,
            "flops_ratio": self.flops_ratio,
            "kept_fraction": [round(float(v), 4) for v in self.kept_fraction()],
            "tokens_in": float(self.seq_len.double().mean()),
            "tokens_out": float(self.kept[-1].double().mean()),
        }


# ---------------------------------------------------------------------------------------------- helpers
def _batch(adapter: ModelAdapter, inputs: Any) -> tuple[Any, torch.Tensor, torch.Tensor]:
    batch = adapter.as_batch(inputs)
    if isinstance(batch, dict):
        am = batch["attention_mask"]
        pos = batch.get("position_ids")
        pos = logical_positions(am) if pos is None else pos
    else:
        am, pos = batch.attention_mask, batch.position_ids
    valid = am.to(adapter.device).bool()
    if not bool(valid.any(-1).all()):
        raise ValueError("every row needs at least one real token (attention_mask is all zeros in some row)")
    return batch, valid, pos.to(adapter.device).long()


def _protect_mask(adapter: ModelAdapter, valid: torch.Tensor, protect: Any) -> torch.Tensor:
    """``[B, T]`` tokens never pruned. ``"auto"``: the last real token of a causal LM, the first ([CLS]) of an
    encoder; ``"first"``, ``"last"``, ``"both"``, ``None``/``"none"``; or a ``[B, T]`` bool tensor."""
    c = valid.long().cumsum(-1)
    first = (c == 1) & valid
    last = (c == c[:, -1:]) & valid
    if isinstance(protect, torch.Tensor):
        if protect.shape != valid.shape:
            raise ValueError(
                f"protect must be a [B, T] = {tuple(valid.shape)} bool mask, got {tuple(protect.shape)}"
            )
        return protect.to(valid.device).bool() & valid
    if protect is None or protect == "none":
        return torch.zeros_like(valid)
    if protect == "auto":
        protect = "last" if adapter.is_causal else "first"
    if protect == "first":
        return first
    if protect == "last":
        return last
    if protect == "both":
        return first | last
    raise ValueError(
        f"protect must be 'auto', 'first', 'last', 'both', None or a [B, T] bool mask, got {protect!r}"
    )


def _compact(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Kept columns of ``keep [B, T]`` in original order, left-padded to the most kept: ``(idx [B, K], slot
    valid [B, K])`` (pad slots point at column 0 and are invalid)."""
    B, T = keep.shape
    K = max(int(keep.sum(-1).max()), 1)
    ar = torch.arange(T, device=keep.device).expand(B, T)
    key = torch.where(keep, ar, torch.full_like(ar, -1))
    idx = key.sort(-1).values[:, T - K :]
    return idx.clamp_min(0), idx >= 0


def _gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    if x.dim() == 2:
        return x.gather(1, idx)
    return x.gather(1, idx[..., None].expand(-1, -1, x.shape[-1]))


def _final_norm(adapter: ModelAdapter, h: torch.Tensor) -> torch.Tensor:
    fn = adapter.structure.final_norm
    return fn(h) if fn is not None else h


def _pool(
    adapter: ModelAdapter, h: torch.Tensor, w: torch.Tensor, pooling: str | None, normalize: bool | None
) -> torch.Tensor:
    cfg = getattr(adapter, "pooling_config", None)
    method = pooling or (cfg.method if cfg is not None else ("last" if adapter.is_causal else "mean"))
    if normalize is None:
        normalize = bool(cfg.normalize) if (cfg is not None and pooling is None) else False
    x = _final_norm(adapter, h)
    real = w > 0
    if method == "mean":
        ww = w.to(x.dtype)
        out = (x * ww[..., None]).sum(1) / ww.sum(-1, keepdim=True).clamp_min(1e-9)
    elif method in ("cls", "first"):
        out = x[torch.arange(x.shape[0], device=x.device), real.long().argmax(-1)]
    elif method == "last":
        T = real.shape[1]
        idx = T - 1 - real.flip(-1).long().argmax(-1)
        out = x[torch.arange(x.shape[0], device=x.device), idx]
    else:
        raise ValueError(
            f"pooling must be 'mean', 'cls', 'last' or None (the adapter's default), got {pooling!r}"
        )
    return F.normalize(out, dim=-1) if normalize else out


def _outputs(
    adapter: ModelAdapter,
    h: torch.Tensor,
    w: torch.Tensor,
    pooling: str | None,
    normalize: bool | None,
    head: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    pooled = _pool(adapter, h, w, pooling, normalize)
    if head is not None:
        return pooled, head(pooled)
    if adapter.is_causal:
        real = w > 0
        T = real.shape[1]
        idx = T - 1 - real.flip(-1).long().argmax(-1)
        return pooled, adapter.unembed(h[torch.arange(h.shape[0], device=h.device), idx][:, None])[:, 0]
    return pooled, None


def _check_layers(adapter: ModelAdapter, th: LTPThresholds) -> list[int]:
    active = th.pruned_layers()
    missing = [i for i in active if adapter.structure.attn[i] is None]
    if missing:
        raise ValueError(
            f"LTP scores come from attention; layer(s) {missing} have none (recurrent/SSM blocks); "
            "exclude them with LTPThresholds(..., layers=[...])"
        )
    return active


# ---------------------------------------------------------------------------------------------- simulated
def ltp_mask_forward(
    adapter: ModelAdapter,
    inputs: Any,
    thresholds: LTPThresholds | torch.Tensor | Sequence[float],
    *,
    mode: str = "soft",
    temperature: float = 1e-3,
    cumulative: bool = True,
    mask_keys: bool | None = None,
    protect: Any = "auto",
    pooling: str | None = None,
    normalize: bool | None = None,
    head: Callable[[torch.Tensor], torch.Tensor] | None = None,
    grad: bool = False,
) -> LTPOutput:
    """Simulated LTP (no token is dropped; ``physical=False``): masks multiplied into each layer's output.

    ``mode="soft"`` (training, Kim et al. 2022 Eq. 6): ``m_l = σ((s_l − θ_l)/T)``, with ``M_l = Π_{k≤l} m_k``
    multiplied into ``layers.{l}.resid_post`` (``cumulative=False``: ``m_l`` alone, as the authors' release).
    ``mode="hard"``: ``M_l = 1[s_l ≥ θ_l]`` over the tokens still alive (cumulative), protected tokens and each
    row's best token kept; with ``mask_keys`` (the default in hard mode) dropped tokens are also removed as
    keys of the later layers' attention and as voting queries, which equals :func:`ltp_forward` on the
    kept tokens.

    Args:
        adapter: the model (encoder or causal LM).
        inputs: text(s), an :class:`~tokensmith.models.EncodedBatch` or ids (left padding handled).
        thresholds: an :class:`LTPThresholds` or ``[L]`` values (``-inf`` = no pruning at that layer).
        mode: ``"soft"`` or ``"hard"``.
        temperature: ``T`` of the soft mask.
        cumulative: multiply the masks across layers (soft mode; hard masks are always cumulative).
        mask_keys: also mask dropped tokens as attention keys (default: True for hard, False for soft).
        protect: tokens never pruned: ``"auto"`` (last token of a causal LM, [CLS] of an encoder),
            ``"first"``, ``"last"``, ``"both"``, None, or a ``[B, T]`` bool mask.
        pooling: pooled output (``"mean"`` weighted by ``M_L``, ``"cls"``, ``"last"``; default: the adapter's
            pooling config, else mean for encoders and last for causal LMs).
        normalize: L2-normalise the pooled output (default: the adapter's pooling config).
        head: optional module applied to the pooled output (its result is ``logits``).
        grad: keep the autograd graph (training); default runs under ``torch.no_grad``.

    Returns:
        :class:`LTPOutput` with ``masks`` and ``penalty`` (:func:`ltp_penalty`).

    Examples:
        >>> import tokensmith as ts
        >>> ad = ts.tiny("llama")
        >>> out = ltp_mask_forward(ad, ["the cat sat on the mat"], LTPThresholds(2, theta_base=0.2), temperature=0.05)
        >>> out.physical, out.logits.shape[-1] == ad.config.vocab_size
        (False, True)
    """
    if mode not in ("soft", "hard"):
        raise ValueError(f"mode must be 'soft' or 'hard', got {mode!r}")
    if mask_keys is None:
        mask_keys = mode == "hard"
    if mask_keys and mode == "soft":
        raise ValueError("mask_keys=True needs binary masks (mode='hard'); soft masks cannot remove keys")
    if mode == "soft":
        ltp_soft_mask(torch.zeros(1), 0.0, temperature)  # validates the temperature
    L = adapter.structure.num_layers
    th = _as_thresholds(thresholds, L)
    active = _check_layers(adapter, th)
    batch, valid, _ = _batch(adapter, inputs)
    B, T = valid.shape
    prot = _protect_mask(adapter, valid, protect)
    ctxm = torch.enable_grad() if grad else torch.no_grad()
    with ctxm:
        theta = th.theta().to(adapter.device)
        first = active[0] if active else L - 1
        edited = list(range(first, L))
        state: dict[str, Any] = {"M": valid.float(), "alive": valid.clone()}
        masks: list[torch.Tensor] = []
        scores: dict[int, torch.Tensor] = {}
        kept: dict[int, torch.Tensor] = {}
        active_set = set(active)

        def make(layer: int) -> Callable[[torch.Tensor, Any], torch.Tensor]:
            def fn(h: torch.Tensor, ctx: Any) -> torch.Tensor:
                if h.shape[:2] != (B, T):
                    raise ValueError(
                        "ltp_mask_forward runs one forward over the whole batch (no micro-batching)"
                    )
                if layer in active_set:
                    A = att.records[layer][-1]
                    if mode == "soft":
                        s = ltp_scores(A, valid)
                        m = ltp_soft_mask(s, theta[layer], temperature, valid)
                        m = torch.where(prot, torch.ones_like(m), m)
                        M = state["M"] * m if cumulative else m * valid
                    else:
                        alive = state["alive"]
                        s = ltp_scores(A, alive)
                        keep = threshold_keep(s[:, None], float(theta[layer]), alive, prot)[:, 0]
                        state["alive"] = keep
                        M = keep.float()
                    state["M"] = M
                    masks.append(M)
                    scores[layer] = s.detach()
                M = state["M"]
                kept[layer] = M.detach().sum(-1)
                out = h * M[..., None].to(h.dtype)
                if layer == L - 1:
                    state["last"] = out
                return out

            return fn

        def key_mask(ctx: Any) -> torch.Tensor:
            kc = ctx.key_columns  # [B, 1|H_kv, K]
            alive = state["alive"]
            ok = alive.gather(1, kc[:, 0].clamp(0, T - 1).to(alive.device))[:, None, None, :]
            self_ = ctx.query_columns.to(kc.device)[:, None, :, None] == kc[:, :, None, :]
            return ok.to(kc.device) | self_

        with ExitStack() as stack:
            att = stack.enter_context(adapter.capture_attention(layers=active)) if active else None
            if mask_keys and active:
                stack.enter_context(attention_override(adapter, key_mask))
            stack.enter_context(adapter.hooks(edit=[(f"layers.{i}.resid_post", make(i)) for i in edited]))
            adapter.forward(batch, logits_to_keep=1)
        h = state["last"]
        M = state["M"] * valid
        pooled, logits = _outputs(adapter, h, M, pooling, normalize, head)
        n0 = valid.sum(-1).float()
        kept_t = torch.stack([kept.get(i, n0) for i in range(L)]).float()
        entering = torch.cat([n0[None], kept_t[:-1]], 0)
        P, W = ltp_layer_costs(adapter)
        ratio = ltp_flops_ratio(entering.cpu(), n0.cpu(), P, W)
        cols = torch.where(valid, torch.arange(T, device=valid.device).expand(B, T), -1)
        penalty = ltp_penalty(masks, valid) if masks else None
    return LTPOutput(
        hidden=h,
        weights=M,
        columns=cols,
        pooled=pooled,
        logits=logits,
        kept=kept_t,
        entering=entering,
        seq_len=valid.sum(-1),
        flops_ratio=ratio,
        physical=False,
        scores=scores,
        masks=masks,
        penalty=penalty,
    )


# ---------------------------------------------------------------------------------------------- physical
@torch.no_grad()
def ltp_forward(
    adapter: ModelAdapter,
    inputs: Any,
    thresholds: LTPThresholds | torch.Tensor | Sequence[float],
    *,
    protect: Any = "auto",
    pooling: str | None = None,
    normalize: bool | None = None,
    head: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> LTPOutput:
    """Hard LTP inference with tokens physically dropped (Kim et al. 2022 §3.3; ``physical=True``).

    After each pruned layer ``l``: ``s_l`` = :func:`ltp_scores` of that layer's attention over the tokens
    that entered it, keep ``s_l,j ≥ θ_l`` (plus protected tokens and each row's best token), gather the
    kept hidden states (original order, left-padded) and continue with ``adapter.run_layers`` from layer
    ``l+1`` with the kept tokens' original position ids, stage by stage. Dropped tokens are gone for all
    later layers (as keys, queries and in pooling).

    Args:
        adapter: an encoder (BERT, MiniLM) or a causal LM (the last token is always kept).
        inputs: text(s), an :class:`~tokensmith.models.EncodedBatch` or ids.
        thresholds: an :class:`LTPThresholds` or ``[L]`` values; ``-inf`` everywhere is the plain forward.
        protect: as in :func:`ltp_mask_forward`.
        pooling: as in :func:`ltp_mask_forward`.
        normalize: as in :func:`ltp_mask_forward`.
        head: as in :func:`ltp_mask_forward`.

    Returns:
        :class:`LTPOutput` (``hidden`` holds only the kept tokens; ``columns`` says which they are).

    Examples:
        >>> import tokensmith as ts
        >>> ad = ts.tiny("llama")
        >>> out = ltp_forward(ad, ["the cat sat on the mat"], [0.1, 0.1])
        >>> out.physical, int(out.kept[-1, 0]) <= int(out.seq_len[0]), out.flops_ratio <= 1.0
        (True, True, True)
    """
    L = adapter.structure.num_layers
    th = _as_thresholds(thresholds, L)
    active = _check_layers(adapter, th)
    theta = [float(v) for v in th.theta().detach().tolist()]
    batch, valid, pos = _batch(adapter, inputs)
    B, T = valid.shape
    prot = _protect_mask(adapter, valid, protect)
    cols = torch.where(valid, torch.arange(T, device=valid.device).expand(B, T), -1)
    n0 = valid.sum(-1)
    ends = list(active)
    if not ends or ends[-1] != L - 1:
        ends.append(L - 1)
    entering: list[torch.Tensor] = []
    kept: list[torch.Tensor] = []
    scores: dict[int, torch.Tensor] = {}
    cur_valid, cur_pos, cur_cols, cur_prot = valid, pos, cols, prot
    h: torch.Tensor | None = None
    start = 0
    for end in ends:
        probe = [end] if end in active else []
        with adapter.capture_attention(layers=probe) if probe else nullcontext() as att:
            if start == 0:
                name = f"layers.{end}.resid_post"
                with adapter.hooks(cache=[name], stop_after=name if end < L - 1 else None) as hk:
                    adapter.forward(batch, logits_to_keep=1)
                h = hk.cache[name]
            else:
                assert h is not None
                h = adapter.run_layers(
                    h,
                    start=start,
                    end=end + 1,
                    attention_mask=cur_valid.long(),
                    position_ids=cur_pos,
                    logits=False,
                )["hidden"]
        n_in = cur_valid.sum(-1)
        for _ in range(start, end + 1):
            entering.append(n_in)
            kept.append(n_in)
        if probe:
            s = ltp_scores(att[end], cur_valid)
            scores[end] = s
            keep = threshold_keep(s[:, None], theta[end], cur_valid, cur_prot)[:, 0]
            idx, slot = _compact(keep)
            h = _gather(h, idx)
            cur_pos = torch.where(slot, _gather(cur_pos, idx), 0)
            cur_cols = torch.where(slot, _gather(cur_cols, idx), -1)
            cur_prot = _gather(cur_prot, idx) & slot
            cur_valid = slot
            kept[-1] = cur_valid.sum(-1)
        start = end + 1
    assert h is not None
    w = cur_valid.float()
    pooled, logits = _outputs(adapter, h, w, pooling, normalize, head)
    kept_t = torch.stack(kept).float()
    entering_t = torch.stack(entering).float()
    P, W = ltp_layer_costs(adapter)
    return LTPOutput(
        hidden=h,
        weights=w,
        columns=cur_cols,
        pooled=pooled,
        logits=logits,
        kept=kept_t,
        entering=entering_t,
        seq_len=n0,
        flops_ratio=ltp_flops_ratio(entering_t.cpu(), n0.cpu(), P, W),
        physical=True,
        scores=scores,
    )


# ---------------------------------------------------------------------------------------------- losses
def classification_loss(
    head: Callable[[torch.Tensor], torch.Tensor] | None = None, labels_key: str = "labels"
) -> Callable[[LTPOutput, dict[str, Any]], torch.Tensor]:
    """Task loss for :func:`train_ltp_thresholds`: ``CE(head(pooled), labels)`` (or ``CE(out.logits, labels)``
    when ``head`` is None and the forward was given one).

    Examples:
        >>> import torch
        >>> fn = classification_loss(torch.nn.Identity())
        >>> out = LTPOutput(*[None] * 3, torch.tensor([[2.0, 0.0]]), *[None] * 4, 1.0, False)
        >>> round(float(fn(out, {"labels": torch.tensor([0])})), 4)
        0.1269
    """

    def fn(out: LTPOutput, batch: dict[str, Any]) -> torch.Tensor:
        if labels_key not in batch:
            raise ValueError(f"classification_loss needs batch[{labels_key!r}] (class ids [B])")
        y = torch.as_tensor(batch[labels_key]).long()
        z = head(out.pooled) if head is not None else out.logits
        if z is None:
            raise ValueError("classification_loss: pass head= (a module on the pooled output)")
        return F.cross_entropy(z.float(), y.to(z.device))

    return fn


def next_token_loss(labels_key: str = "labels") -> Callable[[LTPOutput, dict[str, Any]], torch.Tensor]:
    """Task loss for a causal LM: next-token cross-entropy at the last position, ``CE(out.logits, labels)``
    with ``labels`` the ``[B]`` ids of the tokens that follow the inputs.

    Examples:
        >>> import torch
        >>> out = LTPOutput(*[None] * 4, torch.zeros(1, 4), *[None] * 3, 1.0, False)
        >>> round(float(next_token_loss()(out, {"labels": torch.tensor([1])})), 4)
        1.3863
    """

    def fn(out: LTPOutput, batch: dict[str, Any]) -> torch.Tensor:
        if labels_key not in batch:
            raise ValueError(
                f"next_token_loss needs batch[{labels_key!r}] (the next token id of each row, [B])"
            )
        if out.logits is None:
            raise ValueError("next_token_loss needs next-token logits: use a causal LM and no head=")
        y = torch.as_tensor(batch[labels_key]).long()
        return F.cross_entropy(out.logits.float(), y.to(out.logits.device))

    return fn


# ---------------------------------------------------------------------------------------------- training
def _batches(data: Any) -> list[dict[str, Any]]:
    if isinstance(data, dict):
        data = [data]
    out = []
    for i, b in enumerate(data):
        if isinstance(b, dict):
            if "inputs" not in b:
                raise ValueError(
                    f"batch {i} is a dict without 'inputs' (give {{'inputs': ..., 'labels': ...}})"
                )
            out.append(b)
        elif isinstance(b, (tuple, list)) and len(b) == 2:
            out.append({"inputs": b[0], "labels": b[1]})
        else:
            raise TypeError(
                f"batch {i}: each batch must be a dict with 'inputs' (and what task_loss_fn reads) or an "
                f"(inputs, labels) pair, got {type(b).__name__}"
            )
    if not out:
        raise ValueError("data is empty: give at least one batch")
    return out


def train_ltp_thresholds(
    adapter: ModelAdapter,
    data: Any,
    task_loss_fn: Callable[[LTPOutput, dict[str, Any]], torch.Tensor],
    lam: float = 0.1,
    temperature: float = 1e-3,
    steps: int = 50,
    lr: float = 1e-3,
    seed: int = 0,
    progress: bool = True,
    *,
    thresholds: LTPThresholds | None = None,
    theta_base: float = 0.01,
    layers: Iterable[int] | None = None,
    cumulative: bool = True,
    train_model: bool = False,
    model_lr: float = 2e-5,
    extra_params: Iterable[nn.Parameter] | None = None,
    protect: Any = "auto",
    pooling: str | None = None,
    normalize: bool | None = None,
    head: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> LTPThresholds:
    """Learn LTP thresholds (Kim et al. 2022 §3.2, the soft-pruning stage): minimise

        L_task + λ · (1/|P|) Σ_l ‖M_l‖₁ / n,     M_l = Π_{k≤l} σ((s_k − θ_k)/T)

    with Adam over ``δ`` (``θ_l = θ_base·l/L + δ_l``), the model frozen (``train_model=True`` also updates the
    model at ``model_lr``, as the paper's soft stage does; importance scores are treated as constants, so the
    model learns through the task loss and the masked hidden states, not through ``s``). The model runs in
    eval mode (no dropout). Then use :func:`ltp_forward` for physical hard pruning (the paper's second stage,
    fine-tuning the model under hard masks, is left to you).

    Args:
        adapter: the model.
        data: a sequence of batches; each a dict with ``"inputs"`` (anything :func:`ltp_mask_forward` takes) and
            what ``task_loss_fn`` reads (e.g. ``"labels"``), or an ``(inputs, labels)`` pair. Cycled in a
            seeded random order.
        task_loss_fn: ``fn(out: LTPOutput, batch) -> scalar`` (:func:`classification_loss`,
            :func:`next_token_loss`).
        lam: λ, the weight of the kept-fraction penalty (higher = more pruning).
        temperature: ``T`` of the soft mask (the authors searched 1e-4..2e-3 on 128-token inputs; scores
            average ``1/n``, so shorter inputs want a larger ``T``).
        steps: optimiser steps. lr: Adam learning rate of ``δ``. seed: batch order.
        progress: tqdm bar.
        thresholds: start from these (trained in place) instead of a new ramp from ``theta_base``/``layers``.
        cumulative: cumulative masks (see the module docstring).
        train_model: also train the model's parameters.
        model_lr: learning rate of the model's parameters (with ``train_model``).
        extra_params: further parameters to train with the thresholds at ``lr`` (e.g. a classification head).
        protect: as in :func:`ltp_mask_forward`.
        pooling: as in :func:`ltp_mask_forward`.
        normalize: as in :func:`ltp_mask_forward`.
        head: as in :func:`ltp_mask_forward`.

    Returns:
        The trained :class:`LTPThresholds`; ``.history`` holds per-step ``loss``, ``task``, ``penalty`` (the
        soft kept fraction) and ``flops_ratio``.

    Examples:
        >>> import tokensmith as ts, torch
        >>> ad = ts.tiny("llama")
        >>> data = [{"inputs": ["the cat sat on the", "one two three four"], "labels": torch.tensor([5, 6])}]
        >>> th = train_ltp_thresholds(ad, data, next_token_loss(), lam=1.0, temperature=0.05, steps=2,
        ...                           lr=0.01, theta_base=0.1, progress=False)
        >>> len(th.history), bool(th.delta.abs().sum() > 0)
        (2, True)
    """
    from tqdm.auto import tqdm

    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps!r}")
    if lam < 0 or not math.isfinite(float(lam)):
        raise ValueError(f"lam must be a finite number >= 0, got {lam!r}")
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr!r}")
    if not callable(task_loss_fn):
        raise TypeError("task_loss_fn must be callable: fn(out: LTPOutput, batch: dict) -> scalar tensor")
    ltp_soft_mask(torch.zeros(1), 0.0, temperature)
    L = adapter.structure.num_layers
    th = thresholds if thresholds is not None else LTPThresholds(L, theta_base=theta_base, layers=layers)
    th = _as_thresholds(th, L).to(adapter.device)
    if not th.pruned_layers():
        raise ValueError("no layer prunes (all thresholds are -inf): nothing to train")
    batches = _batches(data)
    gen = torch.Generator().manual_seed(int(seed))
    groups: list[dict[str, Any]] = [{"params": [th.delta], "lr": float(lr)}]
    extra = list(extra_params) if extra_params is not None else []
    if extra:
        groups.append({"params": extra, "lr": float(lr)})
    model_params = [p for p in adapter.model.parameters()]
    flags = [p.requires_grad for p in model_params]
    if train_model:
        groups.append({"params": [p for p in model_params if p.requires_grad], "lr": float(model_lr)})
    opt = torch.optim.Adam(groups)
    order: list[int] = []
    try:
        if not train_model:
            for p in model_params:
                p.requires_grad_(False)
        with adapter.eval_mode():
            for step in tqdm(range(int(steps)), desc="LTP thresholds", disable=not progress):
                if not order:
                    order = torch.randperm(len(batches), generator=gen).tolist()
                b = batches[order.pop(0)]
                out = ltp_mask_forward(
                    adapter,
                    b["inputs"],
                    th,
                    mode="soft",
                    temperature=temperature,
                    cumulative=cumulative,
                    protect=protect,
                    pooling=pooling,
                    normalize=normalize,
                    head=head,
                    grad=True,
                )
                task = task_loss_fn(out, b)
                assert out.penalty is not None
                loss = task + float(lam) * out.penalty
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                th.history.append(
                    {
                        "step": float(step),
                        "loss": float(loss.detach()),
                        "task": float(task.detach()),
                        "penalty": float(out.penalty.detach()),
                        "flops_ratio": float(out.flops_ratio),
                    }
                )
    finally:
        for p, f in zip(model_params, flags, strict=True):
            p.requires_grad_(f)
    return th
