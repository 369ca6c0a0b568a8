"""Hidden-state token pruning inside the forward (METHODS.md PRN-5 FastV, PRN-6/7 PyramidDrop, PRN-2 positions).

After layer ``s − 1`` (entering layer ``s``) a :class:`Stage` scores the tokens still in the sequence and
keeps the best; the remaining layers run on the shorter sequence. Several stages make a pyramid
(PyramidDrop, Xing et al. 2024, "PyramidDrop: Accelerating Your Large Vision-Language Models via Pyramid
Visual Redundancy Reduction": each stage end keeps ``λ`` of the previous survivors, ``N, λN, λ²N, …``);
one stage at ``K = 2`` scored by the last token's attention is FastV (Chen et al. 2024, "An Image is Worth
1/2 Tokens After Layer 2").

Two actions, one kept set:

- ``action="drop"`` (physical): layers ``[0, s₁)`` run on every token; the hidden states entering ``s₁``
  are gathered to the kept columns and the forward continues with :meth:`ModelAdapter.run_layers`
  (skipping the earlier layers), with the kept tokens' attention mask and **original** position ids
  (``positions="preserve"``, GAP / PRN-2) or ``0..k−1`` (``"reindex"``). Memory and time are saved.
- ``action="mask"`` (simulated): the whole sequence runs through every layer, and from layer ``s`` on the
  dropped tokens are removed *as keys* for every query (:func:`tokensmith.models.masking.attention_override`).
  The kept tokens then see exactly what they see in drop mode, so their logits are equal (tested);
  the dropped tokens' own rows differ and are not reported. Nothing is saved (``physical=False``).

Both modes compute the kept sets the same way: a scorer reads a :class:`~tokensmith.pruning.ScoreContext`
over the tokens still in the sequence (``phase="forward"``, ``layer=s``, the attention of layer ``s − 1``
for the query rows the scorer asks for, the hidden states entering ``s``, ids, positions, spans), and the
selector keeps, per row, the best ``1 − ratio`` of the *candidate* tokens plus every protected token.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from tokensmith.pruning.scores import AttentionReceived, ScoreContext, Scorer, get_scorer
from tokensmith.pruning.select import Selector, TopK, keep_counts, keep_mask, topk_keep

if TYPE_CHECKING:  # pragma: no cover
    from tokensmith.models.adapter import ModelAdapter

__all__ = ["Stage", "HiddenPruneOutput", "pruned_forward", "decode_step", "layer_costs", "hidden_flops_ratio"]


# ---------------------------------------------------------------------------------------------- stage
def _check_ratio(ratio: Any) -> float:
    r = float(ratio)
    if math.isnan(r) or not 0.0 <= r < 1.0:
        raise ValueError(
            f"ratio is the fraction of candidate tokens removed and must be in [0, 1), got {ratio!r}"
        )
    return r


@dataclass
class Stage:
    """One pruning point of :func:`pruned_forward`: entering layer ``layer`` (after layer ``layer − 1``), keep
    the best tokens.

    Per row ``b`` with ``c_b`` candidate tokens still in the sequence and ``p_b`` protected ones (the
    non-candidates, ``protect=`` and the last token), the default selector keeps

        k_b = max(1, ⌊c_b · (1 − ratio)⌋) + p_b      or      k_b = min(budget, c_b) + p_b

    tokens: the protected ones and the ``k_b − p_b`` best-scoring candidates (FastV, Chen et al. 2024: "keep
    the top (1 − R) plus all non-candidates"). Stages chain: a second stage applies its ratio to the
    candidates the first one kept (PyramidDrop, Xing et al. 2024: ``N, λN, λ²N, …`` with ``λ = 1 − ratio``).

    Args:
        layer: the layer entering which tokens are dropped (FastV's ``K``). Scores read the attention of
            layer ``layer − 1``, so an attention scorer needs ``layer >= 1``.
        ratio: fraction of the candidates removed, in ``[0, 1)``.
        budget: candidate tokens kept (instead of ``ratio``); at or above the count keeps every token.
        scorer: a :class:`~tokensmith.pruning.Scorer` or a registered name (default
            ``AttentionReceived(rows="last")``: the last token's attention averaged over heads, FastV's and
            PyramidDrop's score).
        selector: a :class:`~tokensmith.pruning.Selector` (default ``TopK``). A custom selector gets the scores
            averaged over KV heads (hidden states have one kept set per token); its own counts apply to every
            real token, not only the candidates, and it may pass ``ratio=None``/``budget=None`` here.

    Examples:
        >>> Stage(2, ratio=0.5)
        Stage(layer=2, ratio=0.5, budget=None, scorer=AttentionReceived(rows='last'), selector=TopK(ratio=0.5, budget=None, per_head=True, min_keep=1))
    """

    layer: int
    ratio: float | None = None
    budget: int | None = None
    scorer: Any = None
    selector: Any = None

    def __post_init__(self) -> None:
        if isinstance(self.layer, bool) or not isinstance(self.layer, int):
            raise TypeError(
                f"Stage.layer must be an int (the layer entering which tokens are dropped), got {self.layer!r}"
            )
        if self.ratio is not None and self.budget is not None:
            raise ValueError(
                "give a Stage either ratio= (fraction of candidates removed) or budget= (kept), not both"
            )
        if self.ratio is not None:
            self.ratio = _check_ratio(self.ratio)
        if self.budget is not None:
            if isinstance(self.budget, bool) or int(self.budget) != self.budget or int(self.budget) < 1:
                raise ValueError(f"budget must be a positive number of tokens, got {self.budget!r}")
            self.budget = int(self.budget)
        if self.scorer is None:
            self.scorer = AttentionReceived(rows="last")
        elif isinstance(self.scorer, str):
            self.scorer = get_scorer(self.scorer)
        elif not isinstance(self.scorer, Scorer):
            raise TypeError(
                f"Stage.scorer must be a Scorer or a registered scorer name, got {type(self.scorer).__name__}"
            )
        if self.selector is None:
            if self.ratio is None and self.budget is None:
                raise ValueError(f"Stage(layer={self.layer}) needs ratio=, budget= or a selector=")
            self.selector = TopK(ratio=self.ratio, budget=self.budget)
        elif not isinstance(self.selector, Selector):
            raise TypeError(f"Stage.selector must be a Selector, got {type(self.selector).__name__}")
        elif self.budget is not None and not isinstance(self.selector, TopK):
            raise ValueError("a budget= with a custom selector is ambiguous: give the budget to the selector")


# ---------------------------------------------------------------------------------------------- output
@dataclass
class HiddenPruneOutput:
    """What :func:`pruned_forward` returns.

    Attributes:
        logits: ``[B, V]`` at each row's last token (``logits="last"``) or ``[B, K, V]`` at the slots of the
            last stage (``logits="kept"``; :attr:`columns` says which tokens, :attr:`kept_valid` which are real).
        kept_columns: per stage, ``[B, K_s]`` original columns of the slots kept (ascending). Rows keeping
            fewer than ``K_s`` tokens fill the rest with their pad columns (leftmost first) or, without
            enough pads, with dropped columns; :attr:`kept_valid` marks those fill slots False.
        kept_valid: per stage, ``[B, K_s]`` True where the slot is a real kept token.
        hidden: ``[B, K, d]`` output of the last layer (before the final norm) at the slots of the last stage.
        physical: True for ``action="drop"`` (memory and time saved), False for ``"mask"`` (simulated).
        positions: the position policy, ``"preserve"`` or ``"reindex"``.
        action: ``"drop"`` or ``"mask"``.
        tokens: ``[B, L]`` real tokens each layer processes per row (identical for both actions; with
            ``"mask"`` the layers actually ran on the whole sequence).
        flops_ratio: analytic decoder-layer cost of the pruned forward over the unpruned one
            (:func:`hidden_flops_ratio`); the cost the pruning would save, whether or not it was physical.
        stages: the stages as run.
        scores: per stage, ``[B, 1, K_{s-1}]`` the scores of the slots before that stage (head-averaged).
        cache: with ``return_cache=True``, a transformers ``DynamicCache`` whose layers ``< s₁`` hold every
            token and later layers only the kept ones (layer ``l`` holds the slots of the stage before it).
        next_position: ``[B]`` logical position of the next token (``n_b``, the row's real tokens), for
            :func:`decode_step`.
    """

    logits: torch.Tensor
    kept_columns: list[torch.Tensor]
    kept_valid: list[torch.Tensor]
    hidden: torch.Tensor
    physical: bool
    positions: str
    action: str
    tokens: torch.Tensor
    flops_ratio: float
    stages: list[Stage]
    scores: list[torch.Tensor] = field(default_factory=list)
    cache: Any = None
    next_position: torch.Tensor | None = None

    @property
    def tokens_per_layer(self) -> dict[int, torch.Tensor]:
        """``{layer: [B]}`` real tokens each layer processes (the columns of :attr:`tokens`)."""
        return {layer: self.tokens[:, layer] for layer in range(self.tokens.shape[1])}

    @property
    def columns(self) -> torch.Tensor:
        """``[B, K]`` original columns of the last stage's slots."""
        return self.kept_columns[-1]

    def summary(self) -> dict[str, Any]:
        """Plain-number summary (kept real tokens per stage, flops ratio, physical/simulated, policy)."""
        return {
            "physical": self.physical,
            "action": self.action,
            "positions": self.positions,
            "stages": [s.layer for s in self.stages],
            "kept": [v.sum(-1).tolist() for v in self.kept_valid],
            "flops_ratio": self.flops_ratio,
        }


# ---------------------------------------------------------------------------------------------- flops
def layer_costs(adapter: ModelAdapter) -> list[tuple[int, int]]:
    """Per decoder layer ``(P_l, d_attn)``: the parameters of its weight matrices and ``H · d_head``.

    A token passing through layer ``l`` costs ``2·P_l`` FLOPs in the layer's matrix products (q/k/v/o
    projections and the MLP: a ``d_in × d_out`` weight costs ``2·d_in·d_out`` per token); norms and biases
    (1-D parameters) are left out. Attention scores and the weighted sum cost ``4·T²·d_attn`` per layer
    for ``T`` tokens (``QKᵀ`` and ``AV``, each ``2·T²·d_attn``, dense kernels; a causal kernel halves it in
    both the pruned and the unpruned forward, which leaves the ratio nearly the same).

    Examples:
        >>> import tokensmith as ts
        >>> ad = ts.tiny("llama")
        >>> P, d = layer_costs(ad)[0]
        >>> d == ad.structure.num_heads * ad.structure.head_dim
        True
    """
    s = adapter.structure
    d_attn = (s.num_heads or 1) * (s.head_dim or (s.hidden_size // max(s.num_heads or 1, 1)))
    out = []
    for layer in s.layers:
        P = sum(int(p.numel()) for p in layer.parameters() if p.dim() >= 2)
        out.append((P, int(d_attn)))
    return out


def hidden_flops_ratio(costs: Sequence[tuple[int, int]], tokens: torch.Tensor, full: torch.Tensor) -> float:
    """Analytic FLOPs of the pruned decoder layers over the unpruned ones:

        F(n) = Σ_b Σ_l [ 2·P_l·n_{b,l} + 4·d_attn·n_{b,l}² ],      ratio = F(tokens) / F(full)

    with ``n_{b,l}`` the real tokens row ``b`` runs through layer ``l`` (:func:`layer_costs` for ``P_l``,
    ``d_attn``). The embedding and the LM head are left out: with ``logits="last"`` both forwards compute them
    the same way.

    Args:
        costs: :func:`layer_costs` of the model.
        tokens: ``[B, L]`` real tokens per row and layer with pruning.
        full: ``[B]`` real tokens per row without pruning.

    Examples:
        >>> import torch
        >>> # F(10) = 2·100·10 + 4·10² = 2400, F(5) = 1100: (2400 + 1100) / (2 · 2400)
        >>> round(hidden_flops_ratio([(100, 1), (100, 1)], torch.tensor([[10, 5]]), torch.tensor([10])), 4)
        0.7292
    """
    P = torch.tensor([float(c[0]) for c in costs], dtype=torch.float64)
    D = torch.tensor([float(c[1]) for c in costs], dtype=torch.float64)
    n = tokens.to(torch.float64).cpu()
    f = full.to(torch.float64).cpu()[:, None].expand_as(n)

    def F(x: torch.Tensor) -> float:
        return float((2.0 * P * x + 4.0 * D * x * x).sum())

    denom = F(f)
    return F(n) / denom if denom > 0 else 1.0


# ---------------------------------------------------------------------------------------------- helpers
def _rows_needed(scorer: Scorer) -> Any:
    """The attention query rows a scorer needs: None (no attention), ``"all"`` or ``w`` (the last w rows)."""
    if "attention" not in scorer.all_needs():
        return None
    w = 0
    for r in scorer.all_rows() or ["last"]:
        if r is None or r == "all":
            return "all"
        if r == "last":
            w = max(w, 1)
        elif isinstance(r, int) and not isinstance(r, bool) and r >= 1:
            w = max(w, r)
        else:
            raise ValueError(f"scorer rows must be 'last', 'all' or a positive int, got {r!r}")
    return w


def _as_mask(x: Any, batch: Any, B: int, T: int, what: str) -> torch.Tensor | None:
    if x is None:
        return None
    if isinstance(x, str):
        if not hasattr(batch, "mask"):
            raise ValueError(f"{what}={x!r} names a span, which needs encoded inputs (adapter.encode_batch)")
        names = [x]
        return batch.mask(*names).bool()
    m = torch.as_tensor(x)
    if m.dtype != torch.bool:
        raise TypeError(f"{what} must be a [B, T] bool tensor or a span name, got dtype {m.dtype}")
    if m.dim() == 1:
        m = m[None].expand(B, -1)
    if tuple(m.shape) != (B, T):
        raise ValueError(f"{what} must be [B={B}, T={T}], got {tuple(m.shape)}")
    return m


def _spans_and_special(batch: Any, B: int, T: int) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    examples = getattr(batch, "examples", None)
    if not examples:
        return {}, None
    names: list[str] = []
    for ex in examples:
        for n in ex.segment_names:
            if n not in names:
                names.append(n)
    spans = {n: batch.mask(n).bool() for n in names}
    special = torch.zeros(B, T, dtype=torch.bool)
    for b, ex in enumerate(examples):
        special[b, int(batch.pad_offsets[b]) :] = ex.special_mask.bool()
    return spans, special


def _slots(keep: torch.Tensor, real: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rectangular slots from a per-row keep mask ``[B, K]``: ``(idx [B, K'], valid [B, K'])``, ascending.

    ``K' = max_b |keep_b|``; a row keeping fewer fills with its pad slots (leftmost first), then with dropped
    slots, all marked invalid (masked out of attention), so every row keeps exactly its own tokens."""
    B, K = keep.shape
    Kp = max(int(keep.sum(-1).max()), 1) if B else 0
    ar = torch.arange(K, device=keep.device, dtype=torch.float32) / max(K, 1)
    pri = torch.where(real, 1.0 - ar, 2.0 - ar)
    pri = torch.where(keep, torch.full_like(pri, 3.0), pri)
    idx = torch.topk(pri, Kp, dim=-1).indices.sort(-1).values
    return idx, keep.gather(1, idx)


def _head_mean(s: torch.Tensor) -> torch.Tensor:
    if s.shape[1] == 1:
        return s.float()
    fin = torch.isfinite(s)
    m = torch.where(fin, s.float(), 0.0).sum(1, keepdim=True) / fin.sum(1, keepdim=True).clamp_min(1)
    return torch.where(fin.any(1, keepdim=True), m, -math.inf)


def _select(
    stage: Stage,
    scores: torch.Tensor,
    real: torch.Tensor,
    prot: torch.Tensor,
    cand: torch.Tensor,
    ctx: ScoreContext,
) -> torch.Tensor:
    """The keep mask ``[B, K]`` of one stage over the current slots."""
    sel = stage.selector
    s = _head_mean(scores)
    B, K = real.shape
    if isinstance(sel, TopK):
        ratio = stage.ratio if stage.ratio is not None else sel.ratio
        budget = stage.budget if stage.budget is not None else sel.budget
        if ratio is None and budget is None:
            raise ValueError(f"Stage(layer={stage.layer}): TopK() without ratio or budget")
        c = real & cand & ~prot
        k = keep_counts(c, ratio=None if budget is not None else ratio, budget=budget, min_keep=sel.min_keep)
        k = k + (prot & real).long().sum(-1)
        keep = torch.zeros(B, K, dtype=torch.bool, device=real.device)
        for b in range(B):  # per row: exactly k_b tokens, as for the row alone (no fill tokens kept)
            cols = topk_keep(s[b : b + 1], k[b : b + 1], real[b : b + 1], prot[b : b + 1])
            keep[b, cols[0, 0]] = True
        return keep & real
    out = sel.select(s, real, prot, stage.ratio, ctx)
    if out.dtype == torch.bool:
        keep = out.any(1) if out.dim() == 3 else out
    else:
        keep = keep_mask(out, K).any(1)
    return (keep & real) | (prot & real)


def _attn_impl(adapter: ModelAdapter) -> str:
    return getattr(adapter.model.config, "_attn_implementation", None) or "eager"


def _cache_kw(adapter: ModelAdapter) -> str:
    params = inspect.signature(adapter.model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _sliding_layers(adapter: ModelAdapter) -> list[int]:
    out = []
    for i, a in enumerate(adapter.structure.attn):
        if a is not None and getattr(a, "sliding_window", None):
            out.append(i)
    return out


def _window_fn(ctx: Any) -> torch.Tensor:
    """A sliding-window layer's own window, by the (preserved) positions, not by the compacted columns."""
    w = ctx.sliding_window
    if not w:
        return torch.ones(1, 1, 1, 1, dtype=torch.bool, device=ctx.query_positions.device)
    return ctx.distance() < int(w)


def _deny_fn(keep_orig: torch.Tensor):
    """Mask-mode override: keys outside the kept columns are removed for every query (a dropped query keeps
    its own key so that its row never goes empty; its output is not reported)."""

    def fn(ctx: Any) -> torch.Tensor:
        kc = ctx.key_columns
        B = kc.shape[0]
        ko = keep_orig.to(kc.device)
        allowed = ko.gather(1, kc.reshape(B, -1)).reshape(kc.shape)
        diag = ctx.query_columns[:, None, :, None] == kc[:, :, None, :]
        return allowed[:, :, None, :] | diag

    return fn


def _segment(
    adapter: ModelAdapter,
    hidden: torch.Tensor,
    start: int,
    end: int,
    am: torch.Tensor,
    pid: torch.Tensor,
    positions: str,
    cache: Any,
) -> torch.Tensor:
    """:meth:`run_layers` with a KV cache: layers ``[start, end)`` on ``hidden``, filling ``cache`` for them.
    Returns the output of layer ``end − 1``."""
    L = adapter.structure.num_layers
    B, T = hidden.shape[:2]
    if positions == "reindex":
        pid = (am.long().cumsum(-1) - 1).clamp_min(0)
    dummy = torch.full((B, T), adapter.pad_token_id, dtype=torch.long)
    h_in = hidden.to(adapter.device)

    def inject(h: torch.Tensor, ctx: Any) -> torch.Tensor:
        return h_in.to(h.dtype)

    out_name = f"layers.{end - 1}.resid_post"
    skipped = [i for i in range(L) if i < start or i >= end]
    with (
        adapter.skip_layers(skipped),
        adapter.hooks(
            cache=[out_name], edit=[(f"layers.{start}.resid_pre", inject)], stop_after=out_name
        ) as h,
    ):
        adapter.forward(
            {"input_ids": dummy, "attention_mask": am.long()},
            position_ids=pid,
            use_cache=True,
            **{_cache_kw(adapter): cache},
        )
    return h.cache[out_name]


# ---------------------------------------------------------------------------------------------- request
def _check_request(
    adapter: ModelAdapter, stages: Stage | Sequence[Stage], positions: str, action: str, logits: str
) -> tuple[list[Stage], list[Any]]:
    """Validate the arguments of :func:`pruned_forward`; returns the stages and the attention rows each needs."""
    if positions not in ("preserve", "reindex"):
        raise ValueError(
            f"positions must be 'preserve' or 'reindex' ('rerotate' applies to KV caches), got {positions!r}"
        )
    if action not in ("drop", "mask"):
        raise ValueError(f"action must be 'drop' (physical) or 'mask' (simulated), got {action!r}")
    if logits not in ("last", "kept"):
        raise ValueError(f"logits must be 'last' or 'kept', got {logits!r}")
    if not adapter.is_causal:
        raise ValueError(
            "pruned_forward prunes the hidden states of causal decoders (FastV/PyramidDrop read and keep the last "
            f"token); {adapter.name!r} is an encoder. For encoders use token merging (ToMe) or prompt pruning"
        )
    if adapter.structure.lm_head is None:
        raise ValueError("pruned_forward needs a model with an LM head (it returns logits)")
    stage_list = [stages] if isinstance(stages, Stage) else list(stages)
    if not stage_list:
        raise ValueError("give at least one Stage")
    L = adapter.structure.num_layers
    prev = -1
    for st in stage_list:
        if not isinstance(st, Stage):
            raise TypeError(f"stages must be Stage objects, got {type(st).__name__}")
        if not 0 <= st.layer < L:
            raise ValueError(
                f"Stage layer {st.layer} out of range: tokens can be dropped entering layers 1..{L - 1} of this "
                f"{L}-layer model (0 only with a scorer that needs no attention)"
            )
        if st.layer <= prev:
            raise ValueError(f"stage layers must be strictly increasing, got {[s.layer for s in stage_list]}")
        prev = st.layer
    impl = _attn_impl(adapter)
    rows_need = [_rows_needed(st.scorer) for st in stage_list]
    for st, rn in zip(stage_list, rows_need, strict=True):
        if "keys" in st.scorer.all_needs():
            raise ValueError(
                f"{st.scorer!r} needs cached keys, which hidden-state pruning does not collect; use the KV-cache "
                "target (Reducer(target='kv')) or a scorer on attention/hidden states"
            )
        if rn is None:
            continue
        if st.layer < 1:
            raise ValueError(f"Stage(layer=0) cannot use {st.scorer!r}: there is no attention before layer 0")
        if adapter.structure.attn[st.layer - 1] is None:
            raise ValueError(
                f"layer {st.layer - 1} has no attention module to score with; pick another stage layer"
            )
        if impl not in ("sdpa", "eager"):
            raise ValueError(
                f"{st.scorer!r} needs attention probabilities, which the {impl!r} kernel does not return; "
                "reload the model with attn_implementation='sdpa' (or 'eager'), or use a scorer that needs no "
                "attention (Redundancy(on='hidden'), RandomScore, ...)"
            )
    if action == "mask" and impl not in ("sdpa", "eager"):
        raise ValueError(
            f"action='mask' removes keys through a dense attention mask, which the {impl!r} kernel does not take; "
            "reload with attn_implementation='sdpa' or use action='drop'"
        )
    if action == "mask" and positions == "reindex":
        raise ValueError(
            "positions='reindex' changes the positions of the layers after a stage only, which a simulated "
            "(masked) forward cannot do: every token has one position for the whole forward; use action='drop'"
        )
    return stage_list, rows_need


def _check_cache_request(
    adapter: ModelAdapter, stages: list[Stage], action: str, positions: str, am: torch.Tensor
) -> None:
    if action != "drop":
        raise ValueError("return_cache=True needs action='drop' (a masked forward keeps every token's keys)")
    if positions != "preserve":
        raise ValueError(
            "return_cache=True needs positions='preserve': with 'reindex' the layers before the first stage and "
            "the pruned layers would need different positions for each new token"
        )
    impl = _attn_impl(adapter)
    if impl != "sdpa":
        raise ValueError(
            f"return_cache=True needs attn_implementation='sdpa': a pruned cache holds fewer slots in the pruned "
            f"layers than in the first ones, and {impl!r} attention builds one mask for the longest layer (the "
            "decode step fails with a shape mismatch under eager attention)"
        )
    if not bool(am.all()):
        raise ValueError(
            "return_cache=True needs unpadded rows: the pruned layers hold different slots per row, which one "
            "2-D attention mask cannot describe in decode; run the rows separately (batch of 1)"
        )
    bad = [i for i in _sliding_layers(adapter) if i >= stages[0].layer]
    if bad:
        raise ValueError(
            f"return_cache=True cannot serve sliding-window layers {bad} after the first stage (transformers rolls "
            "their caches by column, and the kept tokens are not contiguous); use return_cache=False"
        )


@dataclass
class _Prepared:
    """The batch in padded coordinates: ids, mask, logical positions, candidates, protected tokens, spans."""

    ids: torch.Tensor
    am: torch.Tensor
    pos0: torch.Tensor
    cand: torch.Tensor
    prot: torch.Tensor
    spans: dict[str, torch.Tensor]
    special: torch.Tensor | None


def _prepare(adapter: ModelAdapter, inputs: Any, candidates: Any, protect: Any) -> _Prepared:
    batch = adapter.as_batch(inputs)
    if isinstance(batch, dict):
        ids, am, pos0 = batch["input_ids"], batch["attention_mask"], batch.get("position_ids")
    else:
        ids, am, pos0 = batch.input_ids, batch.attention_mask, batch.position_ids
    dev = adapter.device
    ids, am = ids.to(dev), am.to(dev).bool()
    B, T = ids.shape
    if not bool(am[:, -1].all()):
        raise ValueError(
            "pruned_forward needs left-padded rows (the last column real in every row); encode with "
            "adapter.encode_batch, which left-pads"
        )
    pos0 = (am.long().cumsum(-1) - 1).clamp_min(0) if pos0 is None else pos0.to(dev).long()
    cand = _as_mask(candidates, batch, B, T, "candidates")
    prot = _as_mask(protect, batch, B, T, "protect")
    cand = torch.ones(B, T, dtype=torch.bool, device=dev) if cand is None else cand.to(dev)
    prot = torch.zeros(B, T, dtype=torch.bool, device=dev) if prot is None else prot.to(dev).clone()
    prot[:, -1] = True  # the last token: the query and the position whose logits are returned
    prot |= ~cand
    spans, special = _spans_and_special(batch, B, T)
    return _Prepared(
        ids,
        am,
        pos0,
        cand,
        prot,
        {k: v.to(dev) for k, v in spans.items()},
        special.to(dev) if special is not None else None,
    )


# ---------------------------------------------------------------------------------------------- runner
class _Runner:
    """Runs the layers up to each stage and to the end: physically on the kept slots (drop, with
    :meth:`ModelAdapter.run_layers` or, for a cache, :func:`_segment`) or over the whole sequence with the
    dropped keys removed (mask). Everything it returns is in slot coordinates."""

    def __init__(
        self,
        adapter: ModelAdapter,
        prep: _Prepared,
        stages: list[Stage],
        action: str,
        positions: str,
        return_cache: bool,
    ):
        self.ad, self.p, self.stages = adapter, prep, stages
        self.action, self.positions, self.return_cache = action, positions, return_cache
        self.L = adapter.structure.num_layers
        self.sliding_after = [i for i in _sliding_layers(adapter) if i >= stages[0].layer]
        self.keep_orig: list[torch.Tensor] = []  # per stage: [B, T] the real kept columns
        self.caches: list[tuple[Any, int, int]] = []  # (cache, first layer, end layer)

    def _cache(self, lo: int, hi: int) -> Any:
        from transformers import DynamicCache

        c = DynamicCache(config=self.ad.model.config)
        self.caches.append((c, lo, hi))
        return c

    def _window(self, es: ExitStack) -> None:
        if self.sliding_after:  # sliding layers after a drop: their window by the kept tokens' positions
            es.enter_context(self.ad.attention_override(dict.fromkeys(self.sliding_after, _window_fn)))

    def _full_forward(self, es: ExitStack, name: str, cols: torch.Tensor, **kw: Any) -> torch.Tensor:
        """The original sequence up to hook ``name`` (the earlier stages' dropped keys removed), gathered at
        ``cols``."""
        if self.keep_orig:
            es.enter_context(self.ad.attention_override(_stage_masks(self.stages, self.keep_orig, self.L)))
        h = es.enter_context(self.ad.hooks(cache=[name], stop_after=name))
        self.ad.forward(
            {"input_ids": self.p.ids, "attention_mask": self.p.am.long()}, position_ids=self.p.pos0, **kw
        )
        x = h.cache[name]
        return x.gather(1, cols[..., None].expand(-1, -1, x.shape[-1]))

    def _pruned(
        self, es: ExitStack, hidden: torch.Tensor, lo: int, hi: int, real: torch.Tensor, pos: torch.Tensor
    ) -> torch.Tensor:
        self._window(es)
        if self.return_cache:
            return _segment(self.ad, hidden, lo, hi, real, pos, self.positions, self._cache(lo, hi))
        r = self.ad.run_layers(
            hidden,
            start=lo,
            end=hi,
            attention_mask=real.long(),
            position_ids=pos,
            positions=self.positions,
            logits=False,
        )
        return r["hidden"]

    def to_stage(
        self, i: int, rows: Any, cols: torch.Tensor, real: torch.Tensor, hidden: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Hidden states entering stage ``i`` ``[B, K, d]``, the attention of the layer before it for the
        scorer's rows ``[B, H, R, K]`` (or None) and those rows' slot indices ``[R]``."""
        b_layer = self.stages[i].layer
        K = cols.shape[1]
        dev = cols.device
        if rows is None:
            rs = None
        elif rows == "all":
            rs = torch.arange(K, device=dev)
        else:
            rs = torch.arange(max(0, K - rows), K, device=dev)
        name = f"layers.{b_layer}.resid_pre"
        with ExitStack() as es:
            probe, U = None, None
            if rs is not None:
                if self.action == "drop":
                    cap: Any = None if rows == "all" else slice(-int(rs.numel()), None)
                else:  # the wanted slots' original columns (per row), as one list of query rows
                    U = torch.unique(cols[:, rs])
                    cap = U.tolist()
                probe = es.enter_context(self.ad.capture_attention(layers=[b_layer - 1], rows=cap))
            if self.action == "mask":
                hid = self._full_forward(es, name, cols)
            elif i == 0:
                kw = (
                    {"use_cache": True, _cache_kw(self.ad): self._cache(0, b_layer)}
                    if self.return_cache
                    else {}
                )
                hid = self._full_forward(es, name, cols, **kw)
            else:
                lo = self.stages[i - 1].layer
                hid = self._pruned(es, hidden, lo, b_layer, real, self.p.pos0.gather(1, cols))  # type: ignore[arg-type]
        if probe is None:
            return hid, None, rs
        a = probe[b_layer - 1].to(dev)  # [B, H, R, K] (drop) or [B, H, |U|, T] (mask)
        if U is not None:
            ri = torch.searchsorted(U.to(dev), cols[:, rs])  # [B, R] rows of each batch row's wanted slots
            a = a.gather(2, ri[:, None, :, None].expand(-1, a.shape[1], -1, a.shape[-1]))
            a = a.gather(3, cols[:, None, None, :].expand(-1, a.shape[1], a.shape[2], -1))
        return hid, a, rs

    def to_end(self, cols: torch.Tensor, real: torch.Tensor, hidden: torch.Tensor | None) -> torch.Tensor:
        """Output of the last layer at the final slots ``[B, K, d]``."""
        name = f"layers.{self.L - 1}.resid_post"
        with ExitStack() as es:
            if self.action == "mask":
                return self._full_forward(es, name, cols)
            if self.return_cache and not bool(real.all()):
                raise ValueError(
                    "return_cache=True: rows kept different numbers of tokens, so the pruned cache would hold "
                    "masked slots that a decode step without an attention mask would attend to; run the rows "
                    "separately (batch of 1)"
                )
            lo = self.stages[-1].layer
            return self._pruned(es, hidden, lo, self.L, real, self.p.pos0.gather(1, cols))  # type: ignore[arg-type]

    def cache(self) -> Any:
        """One ``DynamicCache``: each layer from the segment that ran it."""
        from transformers import DynamicCache

        out = DynamicCache(config=self.ad.model.config)
        if not hasattr(out, "layers"):  # pragma: no cover - transformers < 5
            raise TypeError("return_cache=True needs a transformers version whose caches have .layers (>= 5)")
        for c, lo, hi in self.caches:
            for j in range(lo, hi):
                out.layers[j] = c.layers[j]
        return out


# ---------------------------------------------------------------------------------------------- main
def pruned_forward(
    adapter: ModelAdapter,
    inputs: Any,
    stages: Stage | Sequence[Stage],
    *,
    candidates: Any = None,
    protect: Any = None,
    positions: str = "preserve",
    action: str = "drop",
    return_cache: bool = False,
    logits: str = "last",
) -> HiddenPruneOutput:
    """Forward with hidden-state token pruning at one or more layers (FastV, PyramidDrop).

    At each :class:`Stage` ``s`` the tokens still in the sequence are scored (by default the last token's
    attention in layer ``s − 1``, averaged over heads and, FastV's ``s_j = (1/H) Σ_h A[h, last, j]``) and the
    best candidates are kept (``k_b = ⌊c_b(1 − ratio)⌋`` of the ``c_b`` candidates, plus all protected
    tokens). The layers from ``s`` on run only on the kept tokens (``action="drop"``) or see only them as keys
    (``"mask"``, simulated, same kept-token logits). Positions of the kept tokens are their original ones by
    default (``positions="preserve"``, GAP / PRN-2), or ``0..k−1`` (``"reindex"``, drop only). On a model with
    learned absolute positions (GPT-2) positions enter only at the embedding, so the policy changes nothing
    after a stage.

    The kept set's cost is reported analytically (:func:`hidden_flops_ratio`):
    ``Σ_l n_l·2P_l + 4·d_attn·n_l²`` over the unpruned cost.

    Args:
        adapter: a causal LM (encoders raise a ValueError).
        inputs: text, a list of texts, :class:`~tokensmith.models.Encoded`/``EncodedBatch``, ids, or a dict
            with ``input_ids``/``attention_mask``; left-padded (the last column of every row is real).
        stages: a :class:`Stage` or a list with strictly increasing layers (PyramidDrop's stage ends).
        candidates: ``[B, T]`` bool or a span/segment name (e.g. ``"prompt"``): only these tokens may be
            dropped; everything else is protected. Default: every token.
        protect: ``[B, T]`` bool or a span name: tokens always kept. The last token of each row is always
            kept (it is the query of the default scorer and the position whose logits are returned).
        positions: ``"preserve"`` (default) or ``"reindex"``.
        action: ``"drop"`` (physical) or ``"mask"`` (simulated; needs sdpa or eager attention).
        return_cache: also return a ``DynamicCache`` for decoding after the pruned prefill (drop only, sdpa,
            unpadded rows keeping equal counts, no sliding-window layer after the first stage; see
            :func:`decode_step`). FastV with a KV cache prunes once here; the paper re-prunes every step.
        logits: ``"last"`` (``[B, V]`` at the last token) or ``"kept"`` (``[B, K, V]`` at the kept slots).
            Runs without gradients (inference).

    Returns:
        :class:`HiddenPruneOutput`.

    Raises:
        ValueError: stage layers out of range or not increasing, a ratio outside ``[0, 1)``, an attention
            scorer on a model whose attention cannot be probed (flash-attention), an encoder, right-padded
            input, bad ``positions``/``action``/``logits``, or a ``return_cache`` setting it cannot serve.

    Examples:
        >>> import tokensmith as ts
        >>> ad = ts.tiny("llama")
        >>> out = pruned_forward(ad, "The quick brown fox jumps over the lazy dog", [Stage(1, ratio=0.5)])
        >>> out.logits.shape[-1] == ad.structure.vocab_size, out.physical
        (True, True)
        >>> n = out.tokens[0].tolist(); n[1] < n[0]
        True
        >>> masked = pruned_forward(ad, "The quick brown fox jumps over the lazy dog", [Stage(1, ratio=0.5)], action="mask")
        >>> bool((masked.logits - out.logits).abs().max() < 1e-4)
        True
    """
    stage_list, rows_need = _check_request(adapter, stages, positions, action, logits)
    p = _prepare(adapter, inputs, candidates, protect)
    if return_cache:
        _check_cache_request(adapter, stage_list, action, positions, p.am)
    B, T = p.ids.shape
    L = adapter.structure.num_layers
    H = adapter.structure.num_heads or 1
    Hkv = adapter.structure.num_kv_heads or H
    run = _Runner(adapter, p, stage_list, action, positions, return_cache)
    cols = torch.arange(T, device=p.ids.device).expand(B, T).contiguous()  # original column of each slot
    real = p.am.clone()  # slot holds a real kept token
    kept_cols: list[torch.Tensor] = []
    kept_valid: list[torch.Tensor] = []
    all_scores: list[torch.Tensor] = []
    hidden: torch.Tensor | None = None  # drop: hidden states of the slots entering the next segment
    with torch.no_grad():
        for i, st in enumerate(stage_list):
            hid, attn, rs = run.to_stage(i, rows_need[i], cols, real, hidden)
            ctx = ScoreContext(
                layer=st.layer,
                phase="forward",
                valid=real,
                attn=attn,
                attn_rows=rs,
                hidden=hid,
                input_ids=p.ids.gather(1, cols),
                positions=p.pos0.gather(1, cols),
                columns=cols[:, None, :],
                spans={k: v.gather(1, cols) & real for k, v in p.spans.items()},
                special=p.special.gather(1, cols) if p.special is not None else None,
                num_heads=H,
                num_kv_heads=Hkv,
                adapter=adapter,
                extra={"stage": i, "attention_layer": st.layer - 1},
            )
            st.scorer.reset()
            scores = st.scorer(ctx)
            all_scores.append(_head_mean(scores))
            keep = _select(st, scores, real, p.prot.gather(1, cols), p.cand.gather(1, cols), ctx)
            idx, real = _slots(keep, real)
            cols = cols.gather(1, idx)
            hidden = hid.gather(1, idx[..., None].expand(-1, -1, hid.shape[-1]))
            kept_cols.append(cols)
            kept_valid.append(real)
            run.keep_orig.append(
                torch.zeros(B, T, dtype=torch.bool, device=cols.device).scatter(1, cols, real)
            )
        h_last = run.to_end(cols, real, hidden)
        z = adapter.unembed(h_last[:, -1] if logits == "last" else h_last)

    n_full = p.am.long().sum(-1)
    tokens = n_full[:, None].repeat(1, L)
    for st, v in zip(stage_list, kept_valid, strict=True):
        tokens[:, st.layer :] = v.long().sum(-1, keepdim=True)
    return HiddenPruneOutput(
        logits=z,
        kept_columns=kept_cols,
        kept_valid=kept_valid,
        hidden=h_last,
        physical=action == "drop",
        positions=positions,
        action=action,
        tokens=tokens.cpu(),
        flops_ratio=hidden_flops_ratio(layer_costs(adapter), tokens, n_full),
        stages=stage_list,
        scores=all_scores,
        cache=run.cache() if return_cache else None,
        next_position=n_full.clone(),
    )


def _stage_masks(stages: list[Stage], keep_orig: list[torch.Tensor], L: int) -> dict[int, Any]:
    """``{layer: deny fn}``: layers ``[s_j, s_{j+1})`` see only the columns stage ``j`` kept."""
    out: dict[int, Any] = {}
    for j, ko in enumerate(keep_orig):
        hi = stages[j + 1].layer if j + 1 < len(stages) else L
        fn = _deny_fn(ko)
        for layer in range(stages[j].layer, hi):
            out[layer] = fn
    return out


def decode_step(adapter: ModelAdapter, result: HiddenPruneOutput, input_ids: torch.Tensor) -> torch.Tensor:
    """One decode step from the pruned cache of ``pruned_forward(..., return_cache=True)``; returns ``[B, V]``.

    The new token is fed at the next logical position (``result.next_position``, then advanced) with
    ``attention_mask=None``: each layer attends to all the slots it holds (every token below the first
    stage, the kept ones above) plus the new token. One token per call: a multi-token step would need a
    causal mask per layer length, which transformers builds for the longest layer only.

    Args:
        adapter: the model that produced ``result``.
        result: with ``cache`` (appended to in place) and ``next_position``.
        input_ids: ``[B]`` or ``[B, 1]`` the next token of each row.

    Examples:
        >>> import tokensmith as ts
        >>> ad = ts.tiny("llama")
        >>> out = pruned_forward(ad, "One two three four five six", [Stage(1, ratio=0.5)], return_cache=True)
        >>> z = decode_step(ad, out, out.logits.argmax(-1))
        >>> z.shape == out.logits.shape
        True
    """
    if result.cache is None or result.next_position is None:
        raise ValueError("decode_step needs the output of pruned_forward(..., return_cache=True)")
    x = torch.as_tensor(input_ids).long()
    if x.dim() == 1:
        x = x[:, None]
    if x.dim() != 2 or x.shape[1] != 1 or x.shape[0] != result.next_position.shape[0]:
        raise ValueError(
            f"decode_step takes one token per row ([B={result.next_position.shape[0]}] or [B, 1]), got {tuple(x.shape)}"
        )
    off = adapter.positions.offset or 0
    pos = (result.next_position.to(adapter.device)[:, None] + off).long()
    d: dict[str, Any] = {"input_ids": x.to(adapter.device), "position_ids": pos, "use_cache": True}
    d[_cache_kw(adapter)] = result.cache
    params = inspect.signature(adapter.model.forward).parameters
    if "logits_to_keep" in params:
        d["logits_to_keep"] = 1
    with torch.no_grad():
        out = adapter.model(**d)
    result.next_position = result.next_position + 1
    return out.logits[:, -1]
