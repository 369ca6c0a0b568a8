"""``Reducer``: score -> select -> act -> fix positions, applied to a model as a context manager.

    >>> import tokensmith as ts
    >>> from tokensmith.pruning import Reducer, KeyNorm
    >>> ad = ts.tiny("llama")
    >>> red = Reducer(target="kv", scorer=KeyNorm(), ratio=0.5)
    >>> with red.apply(ad) as report:
    ...     out = ad.generate("Hello there, how are you today?", max_new_tokens=3)
    >>> report.physical, report.kv_bytes_after < report.kv_bytes_before
    (True, True)

Targets:

- ``"kv"``: the KV cache during ``adapter.generate`` (prefill and/or decode; :mod:`tokensmith.pruning.kv`).
  Also any forward with a cache inside the block (``kvcache.prefill(adapter, ...)``): its cache comes out
  pruned.
- ``"hidden"``: hidden states inside the forward after given layers (FastV, PyramidDrop;
  :mod:`tokensmith.pruning.hidden`): inside the block ``adapter.generate`` prefills with the pruned
  forward; call :meth:`Reducer.forward` for logits.
- ``"encoder"``: ToMe token merging in an encoder, ``r`` tokens per layer (:func:`tokensmith.pruning.tome_encoder`):
  ``adapter.forward`` / ``sentence_embedding`` inside the block run merged.
- ``"prompt"``: text in, shorter text out (LLMLingua; :meth:`Reducer.compress`).

The model is never changed outside the ``with`` block: every hook, attention override and probe is removed
on exit, also on exceptions.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from tokensmith.pruning.report import ReductionReport
from tokensmith.pruning.scores import ScoreContext, Scorer, get_scorer
from tokensmith.pruning.select import Selector, TopK, layer_ratios, topk_keep

if TYPE_CHECKING:  # pragma: no cover
    from tokensmith.models.adapter import ModelAdapter

__all__ = ["Reducer", "Protect"]

_TARGETS = ("kv", "hidden", "encoder", "prompt")
_ACTIONS = ("drop", "mask")
_POSITIONS = ("preserve", "reindex", "rerotate")
_PHASES = ("prefill", "decode", "both")


@dataclass
class Protect:
    """Tokens never pruned: ``special`` (special/control tokens), ``sinks`` (the first n real tokens),
    ``recent`` (the newest n), ``spans`` (named spans of the input, e.g. ``("question",)`` from
    ``adapter.encode``; pass the encoded input's spans through ``Reducer.apply(adapter, spans=...)``)."""

    special: bool = False
    sinks: int = 0
    recent: int = 0
    spans: Sequence[str] = ()

    def mask(self, ctx: ScoreContext) -> torch.Tensor | None:
        valid = ctx.valid
        out = None

        def add(m: torch.Tensor) -> None:
            nonlocal out
            m = m if m.dim() == 3 else m[:, None, :]
            out = m if out is None else (out | m)

        if self.special and ctx.special is not None:
            add(ctx.special.to(valid.device))
        if (self.sinks or self.recent) and ctx.positions is not None:
            pos = ctx.positions.to(valid.device)
            pos3 = pos if pos.dim() == 3 else pos[:, None, :]
            v3 = valid[:, None, :]
            if self.sinks:
                add((pos3 < self.sinks) & v3)
            if self.recent:
                last = torch.where(v3, pos3, -1).amax(-1, keepdim=True)
                add((pos3 > last - self.recent) & v3)
        for name in self.spans:
            if name not in ctx.spans:
                raise ValueError(f"protected span {name!r} is not in the input (spans: {sorted(ctx.spans)})")
            add(ctx.spans[name].to(valid.device).bool())
        return out


@dataclass
class Reducer:
    """A token-reduction recipe: ``score -> select -> act -> position policy`` on one target.

    Args:
        target: ``"kv"`` (the KV cache), ``"hidden"`` (hidden states inside the forward), ``"encoder"`` (ToMe
            merging, ``r`` per layer) or ``"prompt"`` (text compression).
        scorer: a :class:`~tokensmith.pruning.scores.Scorer` (or registry name); higher = keep. Default: SnapKV's
            observation window (kv), the last token's attention (hidden), self-information (prompt).
        ratio: fraction of (real) tokens *removed*, in ``[0, 1)``; 0 changes nothing.
        budget: tokens kept (instead of ``ratio``), e.g. a KV budget per layer.
        capacity: KV only: the cache's maximum real tokens per layer and head; the cache is evicted back to
            it whenever a decode step exceeds it (``phase="decode"``/``"both"``; StreamingLLM, H2O).
        select: a :class:`~tokensmith.pruning.select.Selector` (default :class:`TopK`: per KV head when the
            scores are).
        action: ``"drop"`` (physical gather: memory freed) or ``"mask"`` (simulated: the dropped tokens are
            masked out of attention; same math for the kept tokens, nothing freed, reported as simulated).
        positions: ``"preserve"`` (default: kept tokens keep their positions, new tokens continue after the
            original length; GAP, PRN-2), ``"reindex"`` (new tokens continue at the kept count; cached keys keep
            their phase), ``"rerotate"`` (RoPE models: cached keys are rotated to the compacted positions
            ``0..K−1`` and new tokens continue at ``K``; StreamingLLM's cache-relative positions).
        phase: KV only: ``"prefill"`` (compress once after the prompt; SnapKV, kvpress's protocol),
            ``"decode"`` (keep within ``capacity`` while generating), ``"both"``.
        layers: the layers pruned (default: every attention layer).
        schedule: per-layer ratios: None/``"constant"``, ``"pyramid"`` (kept fraction falls linearly with
            depth, mean ``1 − ratio``), or a list with one ratio per pruned layer.
        protect: a :class:`Protect` (or None).
        every: decode phase: evict every ``every`` steps (amortises the selection; the cache may exceed
            ``capacity`` by ``every − 1`` tokens in between).
        name: a label for reports.
        stages: hidden target: explicit :class:`~tokensmith.pruning.hidden.Stage` list (instead of ``layers``).
        r: encoder target: tokens merged per layer.
    """

    target: str = "kv"
    scorer: Scorer | str | None = None
    ratio: float | None = None
    budget: int | None = None
    capacity: int | None = None
    select: Selector | None = None
    action: str = "drop"
    positions: str = "preserve"
    phase: str = "prefill"
    layers: Sequence[int] | None = None
    schedule: Any = None
    protect: Protect | None = None
    every: int = 1
    name: str = ""
    stages: Sequence[Any] | None = None
    r: int | None = None
    _spans: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.target not in _TARGETS:
            raise ValueError(f"target must be one of {_TARGETS}, got {self.target!r}")
        if self.target == "encoder":
            if self.r is None or int(self.r) < 0:
                raise ValueError(
                    "target='encoder' merges r tokens per layer (ToMe): give r= (a non-negative int)"
                )
            self.action = "merge"
        elif self.action not in _ACTIONS:
            raise ValueError(
                f"action must be one of {_ACTIONS}, got {self.action!r} (merging: target='encoder', or "
                "tokensmith.pruning.bipartite_merge)"
            )
        if self.positions not in _POSITIONS:
            raise ValueError(f"positions must be one of {_POSITIONS}, got {self.positions!r}")
        if self.phase not in _PHASES:
            raise ValueError(f"phase must be one of {_PHASES}, got {self.phase!r}")
        if self.ratio is not None:
            r = float(self.ratio)
            if not (0.0 <= r < 1.0) or math.isnan(r):
                raise ValueError(
                    f"ratio is the fraction of tokens removed and must be in [0, 1), got {self.ratio!r}"
                )
        for k in ("budget", "capacity"):
            v = getattr(self, k)
            if v is not None and int(v) < 1:
                raise ValueError(f"{k} must be a positive number of tokens, got {v!r}")
        if int(self.every) < 1:
            raise ValueError(f"every must be >= 1, got {self.every!r}")
        if self.target == "encoder":
            self.scorer = None
            return
        if self.target == "prompt":
            if self.ratio is None:
                raise ValueError("target='prompt' needs ratio= (the fraction of the prompt's tokens removed)")
            if self.scorer is not None:
                self.scorer = get_scorer(self.scorer)
            return
        if self.scorer is None:
            from tokensmith.pruning.scores import AttentionReceived, ObservationWindow

            self.scorer = ObservationWindow() if self.target == "kv" else AttentionReceived(rows="last")
        self.scorer = get_scorer(self.scorer)
        if self.target == "kv":
            if self.ratio is None and self.budget is None and self.capacity is None:
                raise ValueError(
                    "give ratio= (fraction removed), budget= (tokens kept) or capacity= (KV decode limit)"
                )
            if self.phase in ("decode", "both") and self.capacity is None:
                raise ValueError(f"phase={self.phase!r} keeps the cache within capacity=; give capacity=")
            if self.action == "mask" and self.positions != "preserve":
                raise ValueError("action='mask' keeps the cache whole, so positions must be 'preserve'")
        if self.select is None:
            self.select = TopK(ratio=self.ratio)

    # ------------------------------------------------------------------ pieces the targets use
    def layer_ratios(self, layers: Sequence[int]) -> dict[int, float | None]:
        return layer_ratios(self.schedule, layers, self.ratio)

    def protect_mask(self, ctx: ScoreContext) -> torch.Tensor | None:
        return None if self.protect is None else self.protect.mask(ctx)

    def select_keep(
        self, scores: torch.Tensor, valid: torch.Tensor, protect: torch.Tensor | None, k: torch.Tensor
    ) -> torch.Tensor:
        """Kept slot indices ``[B, h, K]`` for ``k`` real tokens per row."""
        sel = self.select
        if isinstance(sel, TopK):
            s = scores
            if not sel.per_head and s.shape[1] > 1:
                s = (
                    torch.where(torch.isfinite(s), s, torch.nan)
                    .nanmean(1, keepdim=True)
                    .nan_to_num(nan=-math.inf)
                )
            return topk_keep(s, k, valid, protect)
        if getattr(sel, "variable", False):
            raise ValueError(
                f"{type(sel).__name__} keeps a variable number of tokens per row/head; a KV cache needs a "
                "rectangular kept set: use TopK / a budget, or target='hidden' with action='mask'"
            )
        budget = int(k.max())
        out = sel.select(scores, valid, protect, None, ctx=None) if budget else None  # type: ignore[union-attr]
        return out  # type: ignore[return-value]

    # ------------------------------------------------------------------ apply
    @contextlib.contextmanager
    def apply(
        self, adapter: ModelAdapter, *, spans: dict[str, torch.Tensor] | None = None
    ) -> Iterator[ReductionReport]:
        """Context manager: inside it, ``adapter.generate`` (and forwards with a KV cache) run pruned.

        Args:
            adapter: the model.
            spans: named ``[B, T]`` masks of the prompt (e.g. ``{"question": batch.mask("question")}``) for
                span-based scorers and :class:`Protect`.

        Yields:
            the :class:`~tokensmith.pruning.report.ReductionReport`, complete when the block exits.
        """
        report = ReductionReport(
            target=self.target,
            action=self.action,
            positions=self.positions,
            scorer=repr(self.scorer),
            physical=self.action == "drop",
        )
        self._spans = {k: v.bool() for k, v in (spans or {}).items()}
        if self.positions == "rerotate":
            from tokensmith.models.rerotate import rotary_layouts

            try:
                rotary_layouts(adapter)
            except ValueError as e:
                raise ValueError(f"positions='rerotate' needs rotary position embeddings: {e}") from e
        if self.target == "prompt":
            raise ValueError(
                "target='prompt' compresses text: call reducer.compress(adapter, text, question=...)"
            )
        if self.target == "encoder":
            from tokensmith.pruning.merge import tome_encoder

            with tome_encoder(adapter, int(self.r), layers=self.layers) as rep:  # type: ignore[arg-type]
                yield rep
            return
        if self.target == "kv":
            from tokensmith.pruning.generate import pruned_generate
            from tokensmith.pruning.kv import KVSession

            sess = KVSession(self, adapter, report)
            had = "generate" in adapter.__dict__
            with sess:
                adapter.generate = lambda inputs, max_new_tokens=32, **kw: pruned_generate(  # type: ignore[method-assign]
                    adapter, sess, inputs, max_new_tokens, **kw
                )
                try:
                    yield report
                finally:
                    if not had:
                        del adapter.generate
        else:
            from tokensmith.pruning import hidden as _hidden

            had = "generate" in adapter.__dict__
            adapter.generate = lambda inputs, max_new_tokens=32, **kw: _hidden_generate(  # type: ignore[method-assign]
                self, adapter, report, inputs, max_new_tokens, **kw
            )
            try:
                yield report
            finally:
                if not had:
                    del adapter.generate
            del _hidden

    def compress(self, adapter: ModelAdapter, text: str, question: str | None = None, **kw: Any) -> Any:
        """Prompt target: :func:`tokensmith.pruning.prompt.compress` at rate ``1 − ratio`` with this recipe's
        scorer (self-information from ``adapter`` when None)."""
        if self.target != "prompt":
            raise ValueError("Reducer.compress is for target='prompt'")
        from tokensmith.pruning.prompt import compress

        rate = 1.0 - float(self.ratio)  # type: ignore[arg-type]
        return compress(text, adapter, rate=rate, question=question, scorer=self.scorer, **kw)  # type: ignore[arg-type]

    def forward(self, adapter: ModelAdapter, inputs: Any, **kw: Any) -> Any:
        """Hidden target: the pruned forward (:func:`tokensmith.pruning.hidden.pruned_forward`) with this
        recipe's stages."""
        if self.target != "hidden":
            raise ValueError(
                "Reducer.forward is for target='hidden'; KV pruning acts on generate / cached forwards"
            )
        from tokensmith.pruning.hidden import pruned_forward

        return pruned_forward(
            adapter, inputs, self.hidden_stages(adapter), action=self.action, positions=self.positions, **kw
        )

    def hidden_stages(self, adapter: ModelAdapter) -> list[Any]:
        from tokensmith.pruning.hidden import Stage

        if self.stages:
            return list(self.stages)
        if getattr(self, "_auto_stages", False):
            L = adapter.structure.num_layers
            layers = sorted({max(1, round(L * f)) for f in (0.25, 0.5, 0.75)} & set(range(1, L)))
            if not layers:
                raise ValueError(f"a {L}-layer model has no stage end for pruning between layers")
        else:
            layers = list(self.layers or [2])
        ratios = self.layer_ratios(layers)
        if self.budget is not None:
            return [Stage(layer=i, budget=self.budget, scorer=self.scorer) for i in layers]
        return [Stage(layer=i, ratio=ratios[i], scorer=self.scorer) for i in layers]


def _hidden_generate(
    red: Reducer,
    adapter: ModelAdapter,
    report: ReductionReport,
    inputs: Any,
    max_new_tokens: int = 32,
    **kw: Any,
) -> Any:
    from tokensmith.pruning.generate import generate_from_hidden

    return generate_from_hidden(red, adapter, report, inputs, max_new_tokens, **kw)
