"""Objectives of a token-space search (METHODS.md OPT-A1, OPT-A7).

An :class:`Objective` maps candidate slot ids ``[N, n]`` to losses ``[N]`` (exact, batched) and gives the
gradient of the loss with respect to the one-hot slot tokens ``[n, V]`` that GCG-style proposers rank swaps
with. Objectives compose with weights: ``0.7 * TargetLoss(...) + 0.3 * other`` is a :class:`Sum`.

- :class:`TargetLoss`: the target cross-entropy (or mellowmax) of one prompt, from the same log-probs as
  ``adapter.token_logprobs``; the KV cache of the unchanged prefix is computed once and shared by every
  candidate, candidates are grouped by the first slot position they change so the cache of the unchanged
  part of the slot is reused too, and logits are computed only at the target positions.
- :func:`multi_prompt`: one universal slot over many prompts (Zou et al. 2023, section 2.3).
- :func:`multi_model`: transfer over an ensemble of adapters sharing a tokenizer, gradients row-normalised
  per model.
- retriever similarity and the joint retriever+generator objective live in
  :mod:`tokensmith.optimization.search.retrieval`.

New objectives subclass :class:`Objective` (override :meth:`Objective.evaluate` and :meth:`Objective.grad`)
and may register a name with :func:`register_objective`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from tokensmith.models import Encoded, encode, gather_logprobs, kvcache
from tokensmith.models.batching import is_oom
from tokensmith.optimization.search.losses import TARGET_LOSSES, target_loss
from tokensmith.optimization.search.template import SlotTemplate

if TYPE_CHECKING:  # pragma: no cover
    from tokensmith.models.adapter import ModelAdapter

__all__ = [
    "Evaluation",
    "Objective",
    "TemplateObjective",
    "TargetLoss",
    "Sum",
    "multi_prompt",
    "multi_model",
    "register_objective",
    "get_objective",
    "available_objectives",
    "row_normalize",
    "plan_chunks",
]

_OBJECTIVES: dict[str, Callable[..., Objective]] = {}


def register_objective(name: str) -> Callable[[Callable[..., Objective]], Callable[..., Objective]]:
    """Register an objective class or factory under ``name`` (for ``objective="name"`` in :func:`search`)."""

    def deco(cls: Callable[..., Objective]) -> Callable[..., Objective]:
        _OBJECTIVES[name] = cls
        return cls

    return deco


def get_objective(name: str) -> Callable[..., Objective]:
    if name not in _OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; registered: {sorted(_OBJECTIVES)}")
    return _OBJECTIVES[name]


def available_objectives() -> list[str]:
    return sorted(_OBJECTIVES)


def row_normalize(g: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Each row divided by its L2 norm (GCG's per-prompt / per-model gradient normalisation)."""
    return g / g.norm(dim=-1, keepdim=True).clamp_min(eps)


def plan_chunks(first: Sequence[int], length: int, max_rows: int, overhead: float = 64.0) -> list[tuple[int, int]]:
    """Split candidates sorted by the first slot position they change into forwards of at most ``max_rows``.

    A chunk ``[a, b)`` reuses the cache up to its smallest first position ``first[a]`` and computes
    ``(b − a)·(length − first[a])`` token positions, plus ``overhead`` per forward call. Returns the
    contiguous chunks minimising the total (dynamic programme over the sorted order; exact).

    Examples:
        >>> plan_chunks([0, 0, 5, 5], 10, max_rows=4, overhead=1)
        [(0, 2), (2, 4)]
        >>> plan_chunks([0, 0, 5, 5], 10, max_rows=4, overhead=100)
        [(0, 4)]
    """
    n = len(first)
    if n == 0:
        return []
    if any(b < a for a, b in zip(first, first[1:], strict=False)):
        raise ValueError("first positions must be sorted")
    best = [0.0] + [float("inf")] * n
    prev = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(max(0, j - max_rows), j):
            c = best[i] + overhead + (j - i) * (length - first[i])
            if c < best[j]:
                best[j], prev[j] = c, i
    out, j = [], n
    while j > 0:
        out.append((prev[j], j))
        j = prev[j]
    return out[::-1]


@dataclass
class Evaluation:
    """Losses of a batch of candidates (``[N]``) and, where the objective can tell, whether each candidate
    makes the model produce the target greedily (``success``, ``[N]`` bool) — read off the same logits."""

    loss: torch.Tensor
    success: torch.Tensor | None = None


class Objective:
    """Base class: candidate slot ids ``[N, n]`` → losses ``[N]``; ``grad`` gives ∂L/∂onehot ``[n, V]``.

    Subclasses override :meth:`evaluate` and :meth:`grad` (and :meth:`embed_grad` to support continuous
    methods such as PEZ). Counters ``forwards`` (sequences run forward), ``backwards`` and ``tokens``
    (token positions computed) measure the work done.
    """

    name = "objective"

    def __init__(self) -> None:
        self.forwards = 0
        self.backwards = 0
        self.tokens = 0

    # ---- what a subclass provides
    @property
    def adapter(self) -> ModelAdapter:
        """The model whose vocabulary the slot ids live in."""
        raise NotImplementedError

    @property
    def templates(self) -> list[SlotTemplate]:
        """The slot templates scored (all share the slot's ids)."""
        raise NotImplementedError

    def evaluate(self, slot_ids: torch.Tensor, base: torch.Tensor | None = None) -> Evaluation:
        """Exact losses of the candidates ``[N, n]``. ``base`` (``[n]``, the current ids) lets an objective
        reuse what candidates share with it (the cache of the unchanged part of the slot)."""
        raise NotImplementedError

    def grad(self, slot_ids: torch.Tensor) -> torch.Tensor:
        """∂L/∂onehot at ``slot_ids`` (``[n]``): ``[n, V]`` over every embedding row."""
        raise NotImplementedError

    def embed_grad(self, slot_ids: torch.Tensor) -> torch.Tensor:
        """∂L/∂e at ``slot_ids``: ``[n, d]``, the gradient with respect to the input-embedding rows placed in
        the slot (before any embedding scale). Needed by continuous methods (PEZ)."""
        raise NotImplementedError(f"{type(self).__name__} has no embedding gradient (continuous methods need one)")

    # ---- shared behaviour
    @property
    def n(self) -> int:
        return self.templates[0].n

    @property
    def init_ids(self) -> torch.Tensor:
        return self.templates[0].slot_ids.clone()

    @property
    def vocab_size(self) -> int:
        return int(self.adapter.E.shape[0])

    def loss(self, slot_ids: torch.Tensor, base: torch.Tensor | None = None) -> torch.Tensor:
        return self.evaluate(slot_ids, base).loss

    def round_trips(self, slot_ids: torch.Tensor) -> torch.Tensor:
        """``[N]`` bool: every template's in-context re-tokenization check passes."""
        ok = torch.ones(len(slot_ids), dtype=torch.bool)
        for t in self.templates:
            ok &= t.round_trips(slot_ids)
        return ok

    def decode(self, slot_ids: torch.Tensor) -> str:
        return self.templates[0].decode(slot_ids)

    def rescore(self, text: str) -> float:
        """The loss recomputed from the slot *string* through the full template(s)."""
        raise NotImplementedError

    def counters(self) -> dict[str, int]:
        return {"forwards": self.forwards, "backwards": self.backwards, "tokens": self.tokens}

    def state_dict(self) -> dict[str, Any]:
        """Random or adaptive state to save with a result (e.g. a probe-set generator, an adaptive weight), so
        that a resumed search continues exactly. Default: none."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""

    def __add__(self, other: Objective) -> Sum:
        return Sum([(1.0, self), (1.0, other)])

    def __mul__(self, w: float) -> Sum:
        return Sum([(float(w), self)], normalize=False)

    __rmul__ = __mul__


class TemplateObjective(Objective):
    """Base of objectives over one :class:`SlotTemplate` of one model (target loss, masked-LM label loss,
    retriever similarity): holds ``adapter`` and ``template`` and answers :attr:`adapter` / :attr:`templates`.

    Args:
        adapter: the model.
        enc: the encoded example with the slot.
        slot: the slot's name (default: the only slot).
    """

    def __init__(self, adapter: ModelAdapter, enc: Encoded, slot: str | None = None):
        super().__init__()
        self._adapter = adapter
        self.template = SlotTemplate(adapter, enc, slot)

    @property
    def adapter(self) -> ModelAdapter:
        return self._adapter

    @property
    def templates(self) -> list[SlotTemplate]:
        return [self.template]


@register_objective("target")
class TargetLoss(TemplateObjective):
    """Target cross-entropy of one prompt (GCG, Zou et al. 2023, eq. 2; METHODS.md OPT-A1):

    L(z) = (1/H)·Σ_h −log p(y⋆_h | x_before, z, x_after, y⋆_<h)

    or the mellowmax / first-token-weighted variants of :func:`target_loss`. The log-probs are those of
    ``adapter.token_logprobs`` on the same ids (tested), computed with the prefix cache and target-only
    logits.

    Args:
        adapter: a causal LM adapter.
        enc: from ``adapter.encode`` with one :class:`~tokensmith.models.Slot` and a target.
        slot: the slot's name (default: the only slot).
        loss: ``"ce"`` or ``"mellowmax"``.
        first_token_weight: weight of the first target token in ``"ce"``.
        mellowmax_alpha: α of ``"mellowmax"``.
        prefix_cache: reuse the KV cache of the tokens before the slot (default True; exact).
        group: group candidates by the first slot position they change and reuse the cache of the unchanged
            part of the slot (default True; exact).
        max_batch_size: candidates per forward (halved on out-of-memory). Default 64.
        chunk_overhead: the cost of one extra forward call, in token positions, used to split candidates
            grouped by first changed position into forwards (:func:`plan_chunks`).

    Examples:
        >>> import tokensmith as ts, torch
        >>> from tokensmith.models import Slot
        >>> ad = ts.tiny("llama")
        >>> obj = TargetLoss(ad, ad.encode(["Say", Slot("adv", " x x")], target=" ok"))
        >>> obj.evaluate(obj.init_ids[None]).loss.shape
        torch.Size([1])
    """

    name = "target"

    def __init__(
        self,
        adapter: ModelAdapter,
        enc: Encoded,
        slot: str | None = None,
        *,
        loss: str = "ce",
        first_token_weight: float = 1.0,
        mellowmax_alpha: float = 1.0,
        prefix_cache: bool = True,
        group: bool = True,
        max_batch_size: int | None = None,
        chunk_overhead: int = 16,
    ):
        if loss not in TARGET_LOSSES:
            raise ValueError(f"loss must be one of {TARGET_LOSSES}, got {loss!r}")
        if not adapter.is_causal or adapter.structure.lm_head is None:
            raise ValueError(
                "TargetLoss scores a continuation with a causal LM; for a masked LM use MaskedTargetLoss, for a "
                "sentence encoder RetrieverSimilarity"
            )
        super().__init__(adapter, enc, slot)
        if not bool(self.template.target_mask.any()):
            raise ValueError("the example has no target: encode it with target='...' (the text the model should say)")
        self.kind = loss
        self.first_token_weight = float(first_token_weight)
        self.alpha = float(mellowmax_alpha)
        self.use_cache = bool(prefix_cache)
        self.group = bool(group)
        self.max_batch_size = int(max_batch_size or 64)
        self.chunk_overhead = int(chunk_overhead)
        t = self.template
        adapter.check_length(len(t.ids), "the problem (prompt + slot + target)")
        self._tgt = t.ids[t.target_positions]
        self._cache: Any = None
        self._cache_failed = False

    def __repr__(self) -> str:
        return f"TargetLoss({self.template!r}, loss={self.kind!r})"

    def reduce(self, logprobs: torch.Tensor) -> torch.Tensor:
        return target_loss(logprobs, self.kind, first_token_weight=self.first_token_weight, alpha=self.alpha)

    # ---- prefix cache
    def _prefix_cache(self) -> Any:
        t = self.template
        if not self.use_cache or t.start == 0 or self._cache_failed:
            return None
        if self._cache is None:
            try:
                with torch.no_grad():
                    self._cache, _ = kvcache.prefill(self.adapter, {"input_ids": t.ids[None, : t.start]})
                kvcache.expand(self._cache, 1)  # refuses caches it cannot share (recurrent layers)
            except (ValueError, TypeError):
                self._cache, self._cache_failed = None, True
                return None
            self.forwards += 1
            self.tokens += t.start
        return self._cache

    def _run(self, cache: Any, past: int, new_ids: torch.Tensor | None, embeds: torch.Tensor | None) -> torch.Tensor:
        """Logits at the positions predicting target tokens for rows continuing ``past`` cached columns."""
        t = self.template
        keep = (t.target_positions - 1 - past).to(self.adapter.device)
        x = new_ids if new_ids is not None else embeds
        N, L = x.shape[:2]
        self.forwards += N
        self.tokens += N * L
        if cache is None:  # no prefix (the slot starts the sequence) or a cache this model cannot share
            if past:
                raise AssertionError("no cache but past > 0")
            if embeds is not None:
                out = self.adapter.forward(inputs_embeds=embeds, logits_to_keep=keep)
            else:
                out = self.adapter.forward(new_ids, logits_to_keep=keep)
        else:
            out = kvcache.extend(
                self.adapter, kvcache.expand(cache, N, past), past, new_ids, inputs_embeds=embeds, logits_to_keep=keep
            )
        z = out.logits
        if z.shape[1] != len(keep):  # the model ignored logits_to_keep
            z = z[:, keep]
        return z

    def _slot_cache(self, base: torch.Tensor) -> Any:
        """Cache of prefix ⊕ base slot (for candidates that share the start of the slot with ``base``)."""
        t = self.template
        pc = self._prefix_cache()
        if pc is None:
            if self._cache_failed or not self.use_cache:
                return None
            with torch.no_grad():
                c, _ = kvcache.prefill(self.adapter, {"input_ids": base[None].to(torch.long)})
            self.forwards += 1
            self.tokens += t.n
            return c
        c = kvcache.expand(pc, 1)
        with torch.no_grad():
            kvcache.extend(self.adapter, c, t.start, base[None].to(torch.long), logits_to_keep=1)
        self.forwards += 1
        self.tokens += t.n
        try:  # a sliding-window layer whose window rolled inside the slot cannot be cropped: no grouping
            kvcache.expand(c, 1, t.start + 1)
        except ValueError:
            self.group = False
            return None
        return c

    # ---- evaluation
    def evaluate(self, slot_ids: torch.Tensor, base: torch.Tensor | None = None) -> Evaluation:
        t = self.template
        cand = torch.as_tensor(slot_ids, dtype=torch.long).reshape(-1, t.n)
        N = cand.shape[0]
        if N == 0:
            return Evaluation(torch.zeros(0), torch.zeros(0, dtype=torch.bool))
        tail = t.ids[t.end :]
        if self.group and base is not None and self.use_cache:
            base = torch.as_tensor(base, dtype=torch.long).reshape(t.n)
            diff = cand != base[None]
            first = torch.where(diff.any(1), diff.float().argmax(1), torch.full((N,), t.n)).clamp_max(t.n - 1)
        else:
            first = torch.zeros(N, dtype=torch.long)
        order = torch.argsort(first, stable=True)
        fs = first[order].tolist()
        losses = torch.empty(N)
        success = torch.empty(N, dtype=torch.bool)
        slot_cache = None
        bs = self.max_batch_size
        chunks = plan_chunks(fs, t.n + len(tail) - 1, bs, self.chunk_overhead)
        ci = 0
        while ci < len(chunks):
            a, b = chunks[ci]
            idx = order[a:b]
            k0 = fs[a]
            try:
                with torch.no_grad():
                    if k0 > 0 and slot_cache is None:
                        slot_cache = self._slot_cache(base)  # type: ignore[arg-type]
                    if k0 > 0 and slot_cache is not None:
                        cache, past = slot_cache, t.start + k0
                    else:
                        cache = self._prefix_cache()
                        past = t.start if cache is not None else 0
                    rows = cand[idx]
                    # the last target token is only a label: its own output predicts nothing, so it is not run
                    if cache is None:
                        new = t.fill(rows)[:, :-1]
                    else:
                        new = torch.cat([rows[:, past - t.start :], tail[None, :-1].expand(len(idx), -1)], 1)
                    z = self._run(cache, past, new, None)
                    tgt = self._tgt[None].expand(len(idx), -1).to(z.device)
                    lp = gather_logprobs(z, tgt)
                    losses[idx] = self.reduce(lp).cpu()
                    success[idx] = (z.argmax(-1) == tgt).all(-1).cpu()
            except Exception as err:  # noqa: BLE001 - re-raised unless out of memory
                if not is_oom(err) or bs == 1:
                    raise
                bs = max(1, bs // 2)
                self.max_batch_size = bs
                chunks = chunks[:ci] + [(a + c, a + d) for c, d in plan_chunks(fs[a:], t.n + len(tail) - 1, bs, self.chunk_overhead)]
                continue
            ci += 1
        return Evaluation(losses, success)

    # ---- gradients
    def _grad_forward(self, slot_ids: torch.Tensor, make_embeds: Callable[[torch.Tensor, int], tuple[torch.Tensor, Any]]):
        t = self.template
        ids = t.fill(torch.as_tensor(slot_ids).reshape(1, t.n))[0]
        cache = self._prefix_cache()
        past = t.start if cache is not None else 0
        sub = ids[past:-1]  # the last target token is only a label
        embeds, leaf = make_embeds(sub, t.start - past)
        with torch.enable_grad():
            z = self._run(cache, past, None, embeds)
            loss = self.reduce(gather_logprobs(z[0], self._tgt.to(z.device))[None])[0]
            (g,) = torch.autograd.grad(loss, leaf)
        self.backwards += 1
        return g

    def grad(self, slot_ids: torch.Tensor) -> torch.Tensor:
        """∂L/∂onehot ``[n, V]`` through ``adapter.onehot_embeds`` (prefix cache reused, target-only logits)."""
        t = self.template
        ad = self.adapter

        def make(sub: torch.Tensor, off: int) -> tuple[torch.Tensor, torch.Tensor]:
            pos = torch.zeros(1, len(sub), dtype=torch.bool)
            pos[0, off : off + t.n] = True  # off: the slot's start inside sub
            with torch.enable_grad():
                return ad.onehot_embeds(sub[None], pos)

        return self._grad_forward(slot_ids, make).float()

    def embed_grad(self, slot_ids: torch.Tensor) -> torch.Tensor:
        """∂L/∂e ``[n, d]`` with respect to the embedding rows in the slot (before the embedding scale)."""
        t = self.template
        ad = self.adapter
        scale = ad.structure.embed_scale

        def make(sub: torch.Tensor, off: int) -> tuple[torch.Tensor, torch.Tensor]:
            with torch.no_grad():
                base = ad.embed(sub[None])
                rows = ad.E[sub[off : off + t.n].to(ad.device)].detach().clone()
            rows.requires_grad_(True)
            with torch.enable_grad():
                e = torch.cat([base[:, :off], (rows * scale)[None].to(base.dtype), base[:, off + t.n :]], 1)
            return e, rows

        return self._grad_forward(slot_ids, make).float()

    def rescore(self, text: str) -> float:
        enc = self.template.render(text)
        lp = self.adapter.token_logprobs(enc)[0]
        vals = lp[enc.target_mask]
        return float(self.reduce(vals[None].float())[0])


class Sum(Objective):
    """Weighted sum of objectives over the same slot: L = Σ_k w_k·L_k.

    The gradient is Σ_k w_k·G_k, with each G_k row-normalised first when ``normalize=True`` (GCG's
    aggregation over prompts and models, so no prompt or model dominates by gradient scale). ``success`` is
    True where every term that can tell says so. All terms must share the slot's vocabulary.

    Args:
        terms: ``[(weight, objective), ...]``.
        normalize: row-normalise each term's gradient before summing.
    """

    name = "sum"

    def __init__(self, terms: Sequence[tuple[float, Objective]], normalize: bool = True):
        super().__init__()
        flat: list[tuple[float, Objective]] = []
        for w, o in terms:
            if not isinstance(o, Objective):
                raise TypeError(f"Sum terms must be Objectives, got {type(o).__name__}")
            if isinstance(o, Sum) and o.normalize == normalize:
                flat += [(float(w) * w2, o2) for w2, o2 in o.terms]
            else:
                flat.append((float(w), o))
        if not flat:
            raise ValueError("Sum needs at least one objective")
        first = flat[0][1]
        for _, o in flat[1:]:
            if o.n != first.n:
                raise ValueError(f"objectives disagree on the slot length ({o.n} vs {first.n} tokens)")
            if o.adapter is not first.adapter and not _same_vocab(o.adapter, first.adapter):
                raise ValueError(
                    "objectives over models with different tokenizers cannot share slot ids; map the other model's "
                    "objective into this vocabulary (tokensmith.optimization.search.CrossTokenizer) or use models "
                    "that share a tokenizer"
                )
        self.terms = flat
        self.normalize = normalize

    @property
    def adapter(self) -> ModelAdapter:
        return self.terms[0][1].adapter

    @property
    def templates(self) -> list[SlotTemplate]:
        return [t for _, o in self.terms for t in o.templates]

    def __repr__(self) -> str:
        return "Sum(" + " + ".join(f"{w:g}*{o!r}" for w, o in self.terms) + ")"

    def evaluate(self, slot_ids: torch.Tensor, base: torch.Tensor | None = None) -> Evaluation:
        total: torch.Tensor | None = None
        succ: torch.Tensor | None = None
        for w, o in self.terms:
            ev = o.evaluate(slot_ids, base)
            total = w * ev.loss if total is None else total + w * ev.loss
            if ev.success is not None:
                succ = ev.success.clone() if succ is None else succ & ev.success
        return Evaluation(total, succ)  # type: ignore[arg-type]

    def grad(self, slot_ids: torch.Tensor) -> torch.Tensor:
        g_all: torch.Tensor | None = None
        for w, o in self.terms:
            g = o.grad(slot_ids)
            g = row_normalize(g) if self.normalize else g
            g_all = w * g if g_all is None else g_all + w * g.to(g_all.device)
        return g_all  # type: ignore[return-value]

    def embed_grad(self, slot_ids: torch.Tensor) -> torch.Tensor:
        first = self.terms[0][1].adapter
        if any(o.adapter is not first for _, o in self.terms):
            raise NotImplementedError("an embedding gradient over several models' embedding spaces is undefined")
        out = None
        for w, o in self.terms:
            g = o.embed_grad(slot_ids)
            g = row_normalize(g) if self.normalize else g
            out = w * g if out is None else out + w * g
        return out  # type: ignore[return-value]

    def rescore(self, text: str) -> float:
        return float(sum(w * o.rescore(text) for w, o in self.terms))

    def state_dict(self) -> dict[str, Any]:
        return {str(k): o.state_dict() for k, (_, o) in enumerate(self.terms)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, (_, o) in enumerate(self.terms):
            o.load_state_dict(state.get(str(k), {}))

    def counters(self) -> dict[str, int]:
        out = {"forwards": 0, "backwards": 0, "tokens": 0}
        for _, o in self.terms:
            for k, v in o.counters().items():
                out[k] += v
        return out


def _same_vocab(a: ModelAdapter, b: ModelAdapter) -> bool:
    return a.same_vocab(b)


def multi_prompt(adapter: ModelAdapter, encodings: Sequence[Encoded], slot: str | None = None, **kw: Any) -> Sum:
    """One universal slot over many prompts (Zou et al. 2023, Algorithm 2): L = (1/K)·Σ_k L_k, gradients
    row-normalised per prompt. Every prompt's slot must start from the same token ids.

    Args:
        adapter: the model.
        encodings: one encoded example per behaviour, each with the same slot.
        slot: the slot's name.
        **kw: :class:`TargetLoss` options.

    Raises:
        ValueError: no encodings, or a slot that tokenizes differently in some prompt.
    """
    if not encodings:
        raise ValueError("multi_prompt needs at least one encoded prompt")
    objs = [TargetLoss(adapter, e, slot, **kw) for e in encodings]
    ref = objs[0].init_ids
    for k, o in enumerate(objs[1:], 1):
        if o.n != len(ref) or not torch.equal(o.init_ids, ref):
            raise ValueError(
                f"the slot tokenizes differently in prompt {k} ({o.n} vs {len(ref)} tokens, or other ids); encode the "
                "prompts with boundary='split' so the slot is tokenized on its own, or start the slot with a space"
            )
    return Sum([(1.0 / len(objs), o) for o in objs], normalize=True)


def multi_model(adapters: Sequence[ModelAdapter], enc: Encoded, slot: str | None = None, **kw: Any) -> Sum:
    """Transfer over an ensemble (Zou et al. 2023): the same example encoded by each model, L = (1/M)·Σ_m L_m,
    gradients row-normalised per model. All models must share the tokenizer (same vocabulary).

    Args:
        adapters: the models.
        enc: the example, encoded by the first model (its recipe is re-encoded for the others).
        slot: the slot's name.
        **kw: :class:`TargetLoss` options.

    Raises:
        ValueError: models whose tokenizers differ (no mapping between their vocabularies), or an example
            without a recipe.
    """
    if not adapters:
        raise ValueError("multi_model needs at least one adapter")
    first = adapters[0]
    if enc.recipe is None:
        raise ValueError("the example has no recipe; encode it with adapters[0].encode(...)")
    objs = []
    for ad in adapters:
        if ad is not first and not _same_vocab(ad, first):
            raise ValueError(
                f"{ad.name} does not share the tokenizer of {first.name}: slot ids cannot be shared. Use models with "
                "one tokenizer, or wrap the other model's objective in CrossTokenizer (character-offset mapping)"
            )
        e = enc if ad is first else encode(ad.tokenizer, **enc.recipe)
        objs.append(TargetLoss(ad, e, slot, **kw))
    return Sum([(1.0 / len(objs), o) for o in objs], normalize=True)
