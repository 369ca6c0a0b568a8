"""Token importance scorers (METHODS.md section 6): ``score(ctx) -> [B, H_kv or 1, T]``, higher = keep.

Two layers, as everywhere in tokensmith:

- **pure functions** over tensors (:func:`attention_received`, :func:`observation_window`,
  :func:`key_norm`, :func:`redundancy`, ...): what tests pin to formulas and what your own loop calls;
- **Scorer classes** (:class:`Scorer` subclasses with a registry ``name``) reading what they need from a
  :class:`ScoreContext` that the :class:`~tokensmith.pruning.Reducer` fills at each pruning point
  (a layer of the prefill, a decode step, a hidden-state stage, or a prompt).

Scores are per *KV head* when the method is (SnapKV, H2O, key norm: ``[B, H_kv, T]``; query heads are
averaged within each GQA group so the cache keeps ``num_kv_heads``), or shared by all heads
(``[B, 1, T]``). Padding columns get ``-inf``. Scorers combine by weights: ``0.7 * SnapKV() +
0.3 * KeyNorm()`` is a :class:`Combined` scorer summing rank-normalised scores.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F

if TYPE_CHECKING:  # pragma: no cover
    from tokensmith.models.adapter import ModelAdapter

__all__ = [
    "ScoreContext",
    "Scorer",
    "Combined",
    "register_scorer",
    "get_scorer",
    "scorer_names",
    "attention_received",
    "query_attention",
    "observation_window",
    "accumulated_attention",
    "key_norm",
    "redundancy",
    "self_information",
    "sinks_and_recent",
    "separator_ids",
    "group_heads",
    "rank_normalize",
    "AttentionReceived",
    "QueryAttention",
    "ObservationWindow",
    "HeavyHitter",
    "KeyNorm",
    "Redundancy",
    "SelfInformation",
    "Attribution",
    "SinksRecent",
    "Separators",
    "Recency",
    "RandomScore",
]


# ---------------------------------------------------------------------------------------------- context
@dataclass
class ScoreContext:
    """What a scorer may read at one pruning point. Fields are None when not collected.

    Attributes:
        layer: the decoder layer (None for prompt-level pruning).
        phase: ``"prefill"``, ``"decode"``, ``"forward"`` (hidden-state pruning) or ``"text"`` (prompt).
        valid: ``[B, T]`` bool, True for real (non-pad) columns.
        attn: ``[B, H, R, T]`` attention probabilities of the query rows in :attr:`attn_rows`
            (post-softmax, all query heads).
        attn_rows: ``[R]`` the column index of each row of :attr:`attn` (the query token's column).
        keys: ``[B, H_kv, T, d]`` keys as cached (post-RoPE). values: same shape.
        hidden: ``[B, T, d]`` hidden states entering the layer.
        input_ids: ``[B, T]`` token ids (-1 where unknown).
        positions: ``[B, T]`` logical positions (0 = a row's first real token).
        columns: ``[B, H_kv | 1, T]`` absolute column of each key (differs from ``arange(T)`` after evictions).
        spans: named ``[B, T]`` bool masks (e.g. ``"question"`` from an :class:`~tokensmith.models.Encoded`).
        special: ``[B, T]`` bool special/control tokens.
        num_heads, num_kv_heads: of the layer.
        adapter: the model (for scorers that run an LM).
        state: a dict that persists for this layer across the steps of one ``with reducer.apply(...)`` block
            (accumulated attention lives here).
        extra: anything else (attribution scores, ...).
    """

    layer: int | None
    phase: str
    valid: torch.Tensor
    attn: torch.Tensor | None = None
    attn_rows: torch.Tensor | None = None
    keys: torch.Tensor | None = None
    values: torch.Tensor | None = None
    hidden: torch.Tensor | None = None
    input_ids: torch.Tensor | None = None
    positions: torch.Tensor | None = None
    columns: torch.Tensor | None = None
    spans: dict[str, torch.Tensor] = field(default_factory=dict)
    special: torch.Tensor | None = None
    num_heads: int = 1
    num_kv_heads: int = 1
    adapter: ModelAdapter | None = None
    state: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.valid.shape[0]), int(self.valid.shape[1])

    def require(self, *names: str, who: str = "this scorer") -> None:
        for n in names:
            if getattr(self, n) is None:
                raise ValueError(
                    f"{who} needs {n!r}, which this pruning target does not collect "
                    f"(phase={self.phase!r}); use a scorer that does not need it, or a target that provides it"
                )


# ---------------------------------------------------------------------------------------------- pure functions
def _neg_inf_invalid(s: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    return s.masked_fill(~valid[:, None, :].to(s.device), -math.inf)


def group_heads(x: torch.Tensor, num_kv_heads: int, reduce: str = "mean") -> torch.Tensor:
    """Aggregate query heads within each GQA group: ``[B, H, ...] -> [B, H_kv, ...]``.

    Query head ``h`` reads KV head ``h // (H / H_kv)`` (transformers' ``repeat_kv`` layout).

    Examples:
        >>> import torch
        >>> group_heads(torch.arange(4.0).view(1, 4, 1), 2).flatten().tolist()
        [0.5, 2.5]
    """
    B, H = x.shape[:2]
    if H == num_kv_heads:
        return x
    if H % num_kv_heads:
        raise ValueError(f"{H} query heads do not split into {num_kv_heads} KV groups")
    g = x.reshape(B, num_kv_heads, H // num_kv_heads, *x.shape[2:])
    if reduce == "mean":
        return g.mean(2)
    if reduce == "max":
        return g.amax(2)
    if reduce == "sum":
        return g.sum(2)
    raise ValueError(f"reduce must be 'mean', 'max' or 'sum', got {reduce!r}")


def attention_received(
    attn: torch.Tensor, valid: torch.Tensor, row_valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean attention each key receives (FastV, Chen et al. 2024; LTP, Kim et al. 2022), ``[B, 1, T]``.

        s_j = (1 / (H·|Q|)) Σ_h Σ_{q ∈ Q} A[h, q, j]

    Args:
        attn: ``[B, H, R, T]`` probabilities of the query rows Q.
        valid: ``[B, T]`` real columns (pads get ``-inf``).
        row_valid: ``[B, R]`` which rows count (default all; pad query rows should not vote).
    """
    B, H, R, T = attn.shape
    rv = (
        torch.ones(B, R, dtype=torch.bool, device=attn.device)
        if row_valid is None
        else row_valid.to(attn.device)
    )
    w = rv.float()[:, None, :, None]
    s = (attn.float() * w).sum((1, 2)) / (H * w.sum((1, 2, 3)).clamp_min(1.0))[:, None]
    return _neg_inf_invalid(s[:, None, :], valid)


def query_attention(attn: torch.Tensor, valid: torch.Tensor, query_rows: torch.Tensor) -> torch.Tensor:
    """Attention from query/instruction tokens (PyramidDrop, Xing et al. 2024; AIM), ``[B, 1, T]``.

        s_j = mean_{h, q ∈ query} A[h, q, j]

    Args:
        attn: ``[B, H, R, T]``; query_rows: ``[B, R]`` bool, the rows that are query tokens.
    """
    if not bool(query_rows.any(-1).all()):
        raise ValueError("query_attention: some batch rows have no query tokens among the attention rows")
    return attention_received(attn, valid, query_rows)


def observation_window(
    attn: torch.Tensor,
    valid: torch.Tensor,
    num_kv_heads: int,
    window: int,
    kernel: int = 5,
    pooling: str = "max",
    window_cols: torch.Tensor | None = None,
) -> torch.Tensor:
    """SnapKV (Li et al. 2024) observation-window scores, ``[B, H_kv, T]``.

        v[h, j] = Σ_{q in the last w rows} A[h, q, j];   v ← pool1d(v, kernel);   per KV group: mean over heads

    The window's own columns get ``max + 1`` (SnapKV always keeps the window).

    Args:
        attn: ``[B, H, w, T]`` probabilities of the last ``window`` query rows.
        window_cols: ``[T]`` bool, the window's columns (default: the last ``window`` columns).
    """
    B, H, R, T = attn.shape
    v = attn.float().sum(2)  # [B, H, T]
    if kernel and kernel > 1:
        if kernel % 2 == 0:
            raise ValueError(f"SnapKV pooling kernel must be odd, got {kernel}")
        x = v.reshape(B * H, 1, T)
        if pooling == "max":
            x = F.max_pool1d(x, kernel, stride=1, padding=kernel // 2)
        elif pooling == "avg":
            x = F.avg_pool1d(x, kernel, stride=1, padding=kernel // 2, count_include_pad=False)
        else:
            raise ValueError(f"pooling must be 'max' or 'avg', got {pooling!r}")
        v = x.reshape(B, H, T)
    v = group_heads(v, num_kv_heads)
    wc = window_cols
    if wc is None:
        wc = torch.zeros(T, dtype=torch.bool, device=v.device)
        wc[max(0, T - window) :] = True
    top = v.amax(-1, keepdim=True) + 1.0
    v = torch.where(wc.to(v.device)[None, None, :], top, v)
    return _neg_inf_invalid(v, valid)


def accumulated_attention(
    attn: torch.Tensor, valid: torch.Tensor, num_kv_heads: int, previous: torch.Tensor | None = None
) -> torch.Tensor:
    """H2O heavy-hitter statistics (Zhang et al. 2023), ``[B, H_kv, T]``: ``hh[h, j] += Σ_q A[h, q, j]``.

    Query heads are summed within each KV group. ``previous`` (``[B, H_kv, T_prev]``, ``T_prev <= T``) is
    the running total of the columns already held; new columns start at 0.
    """
    s = group_heads(attn.float().sum(2), num_kv_heads, reduce="sum")
    if previous is not None:
        p = previous.to(s.device)
        s = s.clone()
        s[..., : p.shape[-1]] += p
    return _neg_inf_invalid(s, valid)


def key_norm(keys: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``-‖k_j‖₂`` per KV head (Devoto et al. 2024, "A Simple and Effective L2 Norm-Based Strategy for KV
    Cache Compression": low-norm keys draw high attention), ``[B, H_kv, T]``."""
    return _neg_inf_invalid(-keys.float().norm(dim=-1), valid)


def redundancy(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Uniqueness ``s_j = −max_{i≠j} cos(x_i, x_j)`` over real tokens (ToMe-style similarity; "Sparsity
    Meets Similarity"): a token with a near-duplicate scores low. ``x``: ``[B, T, d]`` or
    ``[B, H, T, d]``; returns ``[B, 1 | H, T]``."""
    y = x if x.dim() == 4 else x[:, None]
    y = F.normalize(y.float(), dim=-1)
    sim = y @ y.transpose(-1, -2)  # [B, h, T, T]
    T = sim.shape[-1]
    eye = torch.eye(T, dtype=torch.bool, device=sim.device)
    bad = eye | ~valid[:, None, None, :].to(sim.device)
    sim = sim.masked_fill(bad, -math.inf)
    s = -sim.amax(-1)
    s = torch.where(torch.isfinite(s), s, torch.zeros_like(s))  # a single real token: unique
    return _neg_inf_invalid(s, valid)


def self_information(logprobs: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """LLMLingua self-information ``s_t = −log p(x_t | x_<t)`` (Jiang et al. 2023), ``[B, 1, T]``.

    ``logprobs[b, t]`` is the log-prob of token ``t`` given its prefix (the first real token of a row has
    none: it gets ``+inf``, i.e. it is always kept)."""
    s = -logprobs.float()
    return _neg_inf_invalid(s[:, None, :], valid)


def sinks_and_recent(
    valid: torch.Tensor, n_sink: int, window: int, positions: torch.Tensor | None = None
) -> torch.Tensor:
    """StreamingLLM (Xiao et al. 2024) retention as scores, ``[B, 1, T]``: ``2`` for the first ``n_sink``
    real tokens (attention sinks), ``1 + p/T`` for the last ``window`` real tokens, ``p/T²`` otherwise (so a
    budget larger than sinks + window keeps the most recent of the rest)."""
    B, T = valid.shape
    pos = (valid.long().cumsum(-1) - 1) if positions is None else positions.long()
    if pos.dim() == 2:
        pos = pos[:, None, :]
    pos = pos.to(valid.device)
    last = torch.where(valid[:, None, :], pos, -1).amax(-1, keepdim=True)  # a row's newest real position
    p = pos.float()
    s = p / float(T * T)
    s = torch.where(pos > last - window, 1.0 + p / T, s)
    s = torch.where(pos < n_sink, torch.full_like(s, 2.0), s)
    return _neg_inf_invalid(s, valid)


_SEP_CACHE: dict[int, tuple[int, ...]] = {}
_SEP_CHARS = set(".,;:!?\n。，；：！？、")


def separator_ids(tokenizer: Any) -> list[int]:
    """Token ids whose text, stripped of spaces, is a run of separator characters ``. , ; : ! ? \\n`` (and
    their CJK forms): SepLLM's separators (Chen et al. 2024), derived from the tokenizer, no table."""
    key = id(tokenizer)
    if key not in _SEP_CACHE:
        V = len(tokenizer)
        texts = tokenizer.batch_decode([[i] for i in range(V)], clean_up_tokenization_spaces=False)
        out = []
        for i, t in enumerate(texts):
            s = t.replace(" ", "")
            if s and all(c in _SEP_CHARS for c in s) and ("\n" in t or len(s) <= 2):
                out.append(i)
        _SEP_CACHE[key] = tuple(out)
    return list(_SEP_CACHE[key])


def rank_normalize(s: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Map scores to their rank in ``[0, 1]`` among a row's real columns (for combining scorers); pads stay
    ``-inf``."""
    x = s.masked_fill(~valid[:, None, :].to(s.device), math.inf)
    r = x.argsort(-1).argsort(-1).float()
    n = valid.sum(-1).float().clamp_min(2.0)[:, None, None] - 1.0
    return _neg_inf_invalid(r / n, valid)


# ---------------------------------------------------------------------------------------------- scorer classes
_SCORERS: dict[str, type[Scorer]] = {}


class Scorer:
    """Base class: override :meth:`score` (``ctx -> [B, H_kv or 1, T]``, higher = keep, pads ``-inf``).

    Class attributes a scorer declares so the :class:`~tokensmith.pruning.Reducer` collects only what
    is needed: ``needs`` (a subset of ``{"attention", "keys", "hidden", "ids", "lm"}``) and, when it needs
    attention, :attr:`rows`: ``"last"`` (the last query row), an int ``w`` (the last ``w`` rows),
    ``"all"``. Giving the class a ``name`` registers it (``get_scorer("snapkv")``).

    Scorers combine: ``a + b``, ``0.5 * a`` give a :class:`Combined` scorer.
    """

    name: ClassVar[str] = ""
    needs: ClassVar[frozenset[str]] = frozenset()
    rows: Any = None
    per_head: ClassVar[bool] = False

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        if cls.__dict__.get("name"):
            _SCORERS[cls.name] = cls

    def score(self, ctx: ScoreContext) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self, ctx: ScoreContext) -> torch.Tensor:
        s = self.score(ctx)
        B, T = ctx.shape
        if s.dim() != 3 or s.shape[0] != B or s.shape[-1] != T:
            raise ValueError(
                f"{type(self).__name__}.score returned {tuple(s.shape)}; expected [B={B}, H_kv or 1, T={T}]"
            )
        return s

    # combination
    def __add__(self, other: Scorer) -> Combined:
        return Combined(_terms(self) + _terms(other))

    def __mul__(self, w: float) -> Combined:
        return Combined([(float(w) * a, s) for a, s in _terms(self)])

    __rmul__ = __mul__

    def all_needs(self) -> frozenset[str]:
        return frozenset(self.needs)

    def all_rows(self) -> list[Any]:
        return [self.rows] if "attention" in self.needs else []

    def reset(self) -> None:
        """Called when a ``with reducer.apply(...)`` block starts (stateful scorers clear their state)."""


def _terms(s: Scorer) -> list[tuple[float, Scorer]]:
    return list(s.terms) if isinstance(s, Combined) else [(1.0, s)]


class Combined(Scorer):
    """Weighted sum of rank-normalised scorers: ``s = Σ_i w_i · rank(s_i)`` (ranks in [0, 1] per row, so
    scales do not matter). Per-head terms broadcast against shared ones."""

    def __init__(self, terms: list[tuple[float, Scorer]]):
        if not terms:
            raise ValueError("Combined needs at least one scorer")
        self.terms = terms

    def all_needs(self) -> frozenset[str]:
        out: frozenset[str] = frozenset()
        for _, s in self.terms:
            out |= s.all_needs()
        return out

    def all_rows(self) -> list[Any]:
        return [r for _, s in self.terms for r in s.all_rows()]

    def reset(self) -> None:
        for _, s in self.terms:
            s.reset()

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        if len(self.terms) == 1 and self.terms[0][0] == 1.0:
            return self.terms[0][1](ctx)
        out = None
        for w, s in self.terms:
            r = rank_normalize(s(ctx), ctx.valid) * w
            out = r if out is None else out + r
        return out  # type: ignore[return-value]

    def __repr__(self) -> str:
        return " + ".join(f"{w:g}*{s!r}" for w, s in self.terms)


def register_scorer(cls: type[Scorer], name: str | None = None) -> type[Scorer]:
    """Register a scorer class under ``name`` (default ``cls.name``)."""
    key = name or cls.name
    if not key:
        raise ValueError("give the scorer a name")
    _SCORERS[key] = cls
    return cls


def get_scorer(name: str | Scorer, **kw: Any) -> Scorer:
    """A scorer instance by registry name (or the instance itself)."""
    if isinstance(name, Scorer):
        return name
    if name not in _SCORERS:
        raise ValueError(f"unknown scorer {name!r}; registered: {sorted(_SCORERS)}")
    return _SCORERS[name](**kw)


def scorer_names() -> list[str]:
    return sorted(_SCORERS)


def _row_valid(ctx: ScoreContext) -> torch.Tensor | None:
    if ctx.attn_rows is None:
        return None
    return ctx.valid[:, ctx.attn_rows.to(ctx.valid.device)]


@dataclass(repr=True)
class AttentionReceived(Scorer):
    """Mean attention received from the query rows ``rows`` (FastV: ``"last"``; LTP: ``"all"``)."""

    name: ClassVar[str] = "attention"
    needs: ClassVar[frozenset[str]] = frozenset({"attention"})
    rows: Any = "last"

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        ctx.require("attn", who="AttentionReceived")
        return attention_received(ctx.attn, ctx.valid, _row_valid(ctx))  # type: ignore[arg-type]


@dataclass(repr=True)
class QueryAttention(Scorer):
    """Attention from the query tokens of a named span (PyramidDrop / AIM); falls back to the last row."""

    name: ClassVar[str] = "query_attention"
    needs: ClassVar[frozenset[str]] = frozenset({"attention"})
    span: str | None = None
    rows: Any = "all"

    def __post_init__(self) -> None:
        if self.span is None:
            self.rows = "last"

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        ctx.require("attn", who="QueryAttention")
        if self.span is None:
            return attention_received(ctx.attn, ctx.valid, _row_valid(ctx))  # type: ignore[arg-type]
        if self.span not in ctx.spans:
            raise ValueError(
                f"QueryAttention: no span {self.span!r} in this input (spans: {sorted(ctx.spans)})"
            )
        qm = ctx.spans[self.span][:, ctx.attn_rows.to(ctx.valid.device)]  # type: ignore[union-attr]
        return query_attention(ctx.attn, ctx.valid, qm)  # type: ignore[arg-type]


@dataclass(repr=True)
class ObservationWindow(Scorer):
    """SnapKV observation-window attention with 1-D pooling, per KV head (:func:`observation_window`)."""

    name: ClassVar[str] = "snapkv"
    needs: ClassVar[frozenset[str]] = frozenset({"attention"})
    per_head: ClassVar[bool] = True
    window: int = 64
    kernel: int = 5
    pooling: str = "avg"

    @property  # type: ignore[override]
    def rows(self) -> int:
        return self.window

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        ctx.require("attn", who="ObservationWindow (SnapKV)")
        T = ctx.shape[1]
        wc = torch.zeros(T, dtype=torch.bool)
        wc[ctx.attn_rows] = True  # type: ignore[index]
        return observation_window(
            ctx.attn, ctx.valid, ctx.num_kv_heads, self.window, self.kernel, self.pooling, wc
        )  # type: ignore[arg-type]


@dataclass(repr=True)
class HeavyHitter(Scorer):
    """H2O accumulated attention per KV head; the running sum lives in ``ctx.state`` across decode steps."""

    name: ClassVar[str] = "h2o"
    needs: ClassVar[frozenset[str]] = frozenset({"attention"})
    per_head: ClassVar[bool] = True
    rows: Any = "all"

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        ctx.require("attn", who="HeavyHitter (H2O)")
        prev = ctx.state.get("h2o")
        if prev is not None and ctx.columns is not None and "h2o_cols" in ctx.state:
            # carry the totals of the columns still held (evictions removed some)
            old_cols = ctx.state["h2o_cols"]
            cols = ctx.columns.expand(ctx.shape[0], prev.shape[1], -1)
            hit = cols[..., :, None] == old_cols[..., None, :]
            prev = (hit.float() * prev[..., None, :]).sum(-1)
        s = accumulated_attention(ctx.attn, ctx.valid, ctx.num_kv_heads, prev)  # type: ignore[arg-type]
        ctx.state["h2o"] = torch.where(torch.isfinite(s), s, torch.zeros_like(s))
        if ctx.columns is not None:
            ctx.state["h2o_cols"] = ctx.columns.expand(ctx.shape[0], s.shape[1], -1).clone()
        return s


@dataclass(repr=True)
class KeyNorm(Scorer):
    """``−‖k‖`` per KV head (:func:`key_norm`)."""

    name: ClassVar[str] = "key_norm"
    needs: ClassVar[frozenset[str]] = frozenset({"keys"})
    per_head: ClassVar[bool] = True

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        ctx.require("keys", who="KeyNorm")
        return key_norm(ctx.keys, ctx.valid)  # type: ignore[arg-type]


@dataclass(repr=True)
class Redundancy(Scorer):
    """Uniqueness by cosine similarity of ``on="keys"`` (per KV head) or ``"hidden"`` (:func:`redundancy`)."""

    name: ClassVar[str] = "redundancy"
    on: str = "hidden"

    @property  # type: ignore[override]
    def needs(self) -> frozenset[str]:
        return frozenset({self.on})

    def all_needs(self) -> frozenset[str]:
        return self.needs

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        if self.on not in ("keys", "hidden"):
            raise ValueError(f"Redundancy(on=...) must be 'keys' or 'hidden', got {self.on!r}")
        ctx.require(self.on, who="Redundancy")
        return redundancy(getattr(ctx, self.on), ctx.valid)


@dataclass(repr=True)
class SelfInformation(Scorer):
    """LLMLingua self-information ``−log p(x_t | x_<t)`` from a (small) LM: ``lm`` (an adapter with the same
    tokenizer) or, when None, the pruned model itself. Computed once per input and cached in ``ctx.state``."""

    name: ClassVar[str] = "self_information"
    needs: ClassVar[frozenset[str]] = frozenset({"ids", "lm"})
    lm: Any = None

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        ctx.require("input_ids", who="SelfInformation")
        ids = ctx.input_ids
        if "selfinfo" in ctx.extra:
            lp = ctx.extra["selfinfo"]
        else:
            lm = self.lm if self.lm is not None else ctx.adapter
            if lm is None:
                raise ValueError("SelfInformation needs lm= (an adapter) when the context has no model")
            if bool((ids < 0).any()):  # type: ignore[operator]
                raise ValueError("SelfInformation needs every token id; this cache holds unknown ids")
            lp = token_logprobs_of(lm, ids, ctx.valid)  # type: ignore[arg-type]
            ctx.extra["selfinfo"] = lp
        return self_information(lp, ctx.valid)


def token_logprobs_of(lm: ModelAdapter, ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` log p(x_t | x_<t) of every token under ``lm`` (left-padded rows handled); the first real
    token of each row gets ``-inf`` (no prefix, always kept by :func:`self_information`)."""
    am = valid.long()
    first_real = (am.cumsum(-1) == 1) & am.bool()  # nothing predicts a row's first token
    with torch.no_grad():
        lp = lm.token_logprobs(
            {"input_ids": ids.clamp_min(0), "attention_mask": am}, target_mask=am.bool() & ~first_real
        )
    lp = lp.float().cpu()
    first = am.argmax(-1)
    lp[torch.arange(ids.shape[0]), first] = -math.inf
    return lp.masked_fill(~valid, 0.0)


@dataclass(repr=True)
class Attribution(Scorer):
    """Scores from an attribution: an :class:`~tokensmith.attribution.AttributionResult` (its ``total()``
    over rows, ``abs`` by default) or a ``[B, T]`` / ``[T]`` tensor aligned with the pruned columns."""

    name: ClassVar[str] = "attribution"
    result: Any = None
    absolute: bool = True

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        r = self.result if self.result is not None else ctx.extra.get("attribution")
        if r is None:
            raise ValueError("Attribution scorer: pass result= (an AttributionResult or a [B, T] tensor)")
        s = r.total() if hasattr(r, "total") else torch.as_tensor(r)
        s = s.float()
        if s.dim() == 1:
            s = s[None].expand(ctx.shape[0], -1)
        B, T = ctx.shape
        if s.shape[-1] != T:
            if s.shape[-1] < T:  # left-aligned scores of unpadded examples: right-align into padded rows
                s = torch.cat([torch.zeros(s.shape[0], T - s.shape[-1]), s], -1)
            else:
                raise ValueError(f"attribution scores cover {s.shape[-1]} tokens; the pruned input has {T}")
        if self.absolute:
            s = s.abs()
        return _neg_inf_invalid(s[:, None, :].to(ctx.valid.device), ctx.valid)


@dataclass(repr=True)
class SinksRecent(Scorer):
    """StreamingLLM: attention sinks (first ``n_sink`` tokens) + the recent ``window`` (:func:`sinks_and_recent`)."""

    name: ClassVar[str] = "streaming"
    n_sink: int = 4
    window: int = 256

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        return sinks_and_recent(ctx.valid, self.n_sink, self.window, ctx.positions)


@dataclass(repr=True)
class Separators(Scorer):
    """SepLLM (Chen et al. 2024): initial tokens > recent window > separator tokens > the rest; among
    separators the more recent ranks higher. ``separators``: ``"auto"`` (:func:`separator_ids` of the
    adapter's tokenizer) or a list of ids."""

    name: ClassVar[str] = "sepllm"
    needs: ClassVar[frozenset[str]] = frozenset({"ids"})
    n_initial: int = 4
    window: int = 64
    separators: Any = "auto"

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        ctx.require("input_ids", who="Separators (SepLLM)")
        seps = self.separators
        if isinstance(seps, str):
            if seps != "auto" or ctx.adapter is None:
                raise ValueError(
                    "Separators(separators=...) must be 'auto' (needs the adapter) or a list of token ids"
                )
            seps = separator_ids(ctx.adapter.tokenizer)
        ids = ctx.input_ids if ctx.input_ids.dim() == 3 else ctx.input_ids[:, None, :]  # type: ignore[union-attr]
        sep = torch.isin(ids, torch.as_tensor(list(seps), dtype=torch.long, device=ids.device))
        base = sinks_and_recent(ctx.valid, self.n_initial, self.window, ctx.positions)  # 2 / 1+ / tiny
        T = ctx.shape[1]
        pos = ctx.positions if ctx.positions is not None else torch.arange(T).expand(ctx.shape)
        pos = (pos if pos.dim() == 3 else pos[:, None, :]).float().to(base.device)
        s = torch.where(sep.to(base.device) & (base < 1.0), 0.5 + pos / (2.0 * T * T), base)
        return _neg_inf_invalid(s, ctx.valid)


@dataclass(repr=True)
class Recency(Scorer):
    """Later tokens score higher (a sliding-window baseline)."""

    name: ClassVar[str] = "recency"

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        B, T = ctx.shape
        pos = ctx.positions if ctx.positions is not None else torch.arange(T).expand(B, T)
        pos = (pos if pos.dim() == 3 else pos[:, None, :]).float().clone()
        return _neg_inf_invalid(pos.to(ctx.valid.device), ctx.valid)


@dataclass(repr=True)
class RandomScore(Scorer):
    """Uniform random scores (a baseline), reproducible with ``seed``; per KV head when ``per_kv_head``."""

    name: ClassVar[str] = "random"
    seed: int = 0
    per_kv_head: bool = False

    def reset(self) -> None:
        self._gen = torch.Generator().manual_seed(self.seed)

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        if not hasattr(self, "_gen"):
            self.reset()
        B, T = ctx.shape
        h = ctx.num_kv_heads if self.per_kv_head else 1
        s = torch.rand(B, h, T, generator=self._gen)
        return _neg_inf_invalid(s.to(ctx.valid.device), ctx.valid)
