"""Prompt compression: text in, shorter text out (METHODS.md PRN-21; LLMLingua, LongLLMLingua).

A small causal LM decides which words of a prompt carry information; the rest are deleted, and the
shorter text is what you send to the (large, possibly black-box) model.

**Fine-grained** (LLMLingua, Jiang et al. 2023, "iterative token-level compression"): the text is cut
into segments of about ``segment_tokens`` tokens; every token of a segment is scored by its
self-information

    s_t = −log p(x_t | x̃_<t)

where ``x̃_<t`` is the *compressed* text so far (the segments already compressed, then the segment's own
original tokens before ``t``): LLMLingua's approximation of the conditional dependence between what is
kept. ``iterative=False`` conditions on the *original* prefix instead (one forward; Selective-Context
style). In each segment the highest-scoring units are kept until the kept tokens reach the segment's
budget, i.e. units above the score quantile that meets the target rate (budgets carry over between
segments, so rounding does not accumulate).

**Question-aware** (LongLLMLingua, Jiang et al. 2024, "contrastive perplexity"): with ``question=`` the
score is the shift in a token's surprisal that the question causes,

    s_t = −log p(x_t | x̃_<t) − (−log p(x_t | x^que, x̃_<t)) = log p(x_t | x^que, x̃_<t) − log p(x_t | x̃_<t)

(the paper's difference of per-token perplexities, taken in the log domain: a token's "perplexity" there
is its surprisal). The question is prepended as conditioning only; it is not part of the output.

**Coarse** (LLMLingua's budget controller; LongLLMLingua's question-aware coarse ranking): a list of
``demonstrations`` (few-shot examples, retrieved documents) is ranked and whole ones are dropped until
their tokens reach ``coarse_rate``; the fine stage then compresses what is left to meet ``rate`` overall.
Without a question a demonstration's rank is its perplexity ``PPL(d) = exp(−(1/n) Σ_t log p(d_t | d_<t))``
and LLMLingua keeps the *high*-perplexity ones (they carry more information), so the lowest-perplexity
demonstration goes first (``coarse_drop="high"`` reverses this). With a question the rank is
LongLLMLingua's ``r_k = −(1/N_c) Σ_i log p(x_i^{que,restrict} | x_k^doc)``, the question's (plus a
restrictive sentence, :data:`RESTRICT`) mean surprisal after the document: the demonstration that explains
the question worst (highest ``r_k``) goes first.

**Deletions at word boundaries.** With ``granularity="word"`` a word (a maximal run of non-space
characters) is kept or dropped whole, together with the whitespace before it; its score is the *mean* of
its tokens' scores (``reduce="max"`` / ``"sum"`` are available). The output is then always a subsequence
of the input's words. ``granularity="token"`` drops single tokens (tokens sharing a character, e.g. the
bytes of one emoji, form one unit, so no character is ever cut). ``keep=`` strings (literal) and compiled
regexes are never dropped; by default numbers (:data:`NUMBERS`) are kept, because a wrong or missing
number silently changes the answer of a math or table prompt. The first token of the text has nothing to
predict it (unless the tokenizer adds a BOS) and is always kept.

The achieved rate is measured, never assumed: ``rate = tokens_out / tokens_in`` with both counts taken by
re-tokenizing the input and the output text with ``lm``'s tokenizer.

Left out: LLMLingua's distribution alignment (instruction-tuning the small LM), the per-part budgets of
instruction and question, LongLLMLingua's document reordering, dynamic per-document ratios and
subsequence recovery, and LLMLingua-2 (a trained token classifier; pass its probabilities as
``scorer=Attribution(result=...)``).
"""

from __future__ import annotations

import html
import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from tokensmith.pruning.scores import ScoreContext, Scorer

if TYPE_CHECKING:  # pragma: no cover
    from tokensmith.models.adapter import ModelAdapter

__all__ = [
    "CompressedPrompt",
    "compress",
    "rank_demonstrations",
    "budget_select",
    "NUMBERS",
    "RESTRICT",
]

NUMBERS: re.Pattern[str] = re.compile(r"\d+(?:[.,:/]\d+)*")
"""Default ``keep=`` pattern: integers and decimals (``3``, ``3.14``, ``1,000``, ``12:30``)."""

RESTRICT = " We can get the answer to this question in the given documents."
"""LongLLMLingua's restrictive sentence appended to the question for the coarse (document) ranking."""

_GRANULARITIES = ("word", "token")
_REDUCE = ("mean", "max", "sum")


# ---------------------------------------------------------------------------------------------- result
@dataclass
class CompressedPrompt:
    """The result of :func:`compress`.

    Attributes:
        text: the compressed prompt.
        original_text: the prompt that was compressed (with ``demonstrations``: ``text`` and the
            demonstrations joined by ``separator``); every span below indexes it.
        kept: ``(start, end)`` character spans of the kept units (words or tokens), in order.
        rate: achieved ``tokens_out / tokens_in`` (both from re-tokenizing with ``lm``'s tokenizer).
        tokens_in, tokens_out: token counts of :attr:`original_text` and :attr:`text`.
        target_rate: the ``rate`` asked for.
        units: ``(start, end)`` spans of every unit scored by the fine stage.
        scores: one score per unit (higher = keep; ``inf`` for a unit holding the unpredicted first token).
        unit_kept: whether each unit was kept.
        forced: whether each unit was forced (``keep=`` match or infinite score).
        token_scores: per-token scores of the fine stage, aligned with ``token_spans``.
        token_spans: character spans of the tokens of the fine stage's input.
        method: what scored the units.
        granularity: ``"word"`` or ``"token"``.
        demonstrations: per demonstration ``{"index", "kept", "score", "tokens"}`` (coarse stage), or ``[]``.
        seconds: wall time of the call.
    """

    text: str
    original_text: str
    kept: list[tuple[int, int]]
    rate: float
    tokens_in: int
    tokens_out: int
    target_rate: float
    units: list[tuple[int, int]] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    unit_kept: list[bool] = field(default_factory=list)
    forced: list[bool] = field(default_factory=list)
    token_scores: list[float] = field(default_factory=list)
    token_spans: list[tuple[int, int]] = field(default_factory=list)
    method: str = ""
    granularity: str = "word"
    demonstrations: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def words(self) -> list[str]:
        """The text of every unit (word or token), aligned with :attr:`scores`."""
        return [self.original_text[s:e] for s, e in self.units]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (non-finite scores become ``None``; :attr:`forced` says which were infinite).

        Examples:
            >>> import json, tokensmith as ts
            >>> from tokensmith.pruning.prompt import compress
            >>> d = compress("One two three four five six.", ts.tiny("llama"), rate=0.5).to_dict()
            >>> sorted(d)[:4], isinstance(json.dumps(d), str)
            (['demonstrations', 'forced', 'granularity', 'kept'], True)
        """

        def f(x: float) -> float | None:
            return float(x) if math.isfinite(x) else None

        return {
            "text": self.text,
            "original_text": self.original_text,
            "kept": [list(s) for s in self.kept],
            "rate": self.rate,
            "tokens_in": self.tokens_in,
            "tokens_out": self.tokens_out,
            "target_rate": self.target_rate,
            "units": [list(s) for s in self.units],
            "scores": [f(x) for x in self.scores],
            "unit_kept": list(self.unit_kept),
            "forced": list(self.forced),
            "token_scores": [f(x) for x in self.token_scores],
            "token_spans": [list(s) for s in self.token_spans],
            "method": self.method,
            "granularity": self.granularity,
            "demonstrations": [
                {**d, "score": f(d["score"]) if d.get("score") is not None else None}
                for d in self.demonstrations
            ],
            "seconds": self.seconds,
        }

    def __repr__(self) -> str:
        t = self.text if len(self.text) <= 60 else self.text[:57] + "..."
        return (
            f"CompressedPrompt(rate={self.rate:.3f} [{self.tokens_out}/{self.tokens_in} tokens], "
            f"target={self.target_rate:g}, method={self.method!r}, text={t!r})"
        )

    def _repr_html_(self) -> str:
        """Kept text in black, dropped text struck through in grey (notebook display)."""
        out: list[str] = []
        pos = 0
        kept = set(self.kept)
        for s, e in sorted(set(self.units) | kept):
            if s < pos:
                continue
            out.append(html.escape(self.original_text[pos:s]))
            piece = html.escape(self.original_text[s:e])
            if (s, e) in kept:
                out.append(f"<span>{piece}</span>")
            else:
                out.append(f'<span style="color:#aaa;text-decoration:line-through">{piece}</span>')
            pos = e
        out.append(html.escape(self.original_text[pos:]))
        head = (
            f"<div><b>rate {self.rate:.3f}</b> ({self.tokens_out}/{self.tokens_in} tokens, "
            f"target {self.target_rate:g}), {html.escape(self.method)}</div>"
        )
        body = "".join(out).replace("\n", "<br>")
        return f'{head}<div style="font-family:monospace;white-space:pre-wrap">{body}</div>'


# ---------------------------------------------------------------------------------------------- pure parts
def budget_select(
    scores: Sequence[float],
    costs: Sequence[int],
    budget: float,
    forced: Sequence[bool] | None = None,
) -> list[bool]:
    """Keep the best units until their cost meets a budget: the score-quantile cut of LLMLingua.

    Forced units are kept first (their cost counts). The others are taken in descending score (ties: the
    earlier unit first) while they fit; at the first unit that does not fit, it is taken iff that lands
    closer to the budget than stopping, and selection stops there: every kept unit scores at least as high
    as every dropped one (a threshold, the ``(1 − rate)`` quantile of the cost-weighted scores).

        keep = F ∪ {u : s_u ≥ θ},   θ = the largest score with Σ_{s_v ≥ θ} c_v ≈ budget − Σ_F c

    NaN scores rank last.

    Args:
        scores: one score per unit (higher = keep).
        costs: tokens per unit.
        budget: tokens to keep.
        forced: units always kept.

    Examples:
        >>> budget_select([0.1, 0.9, 0.5, 0.7], [1, 1, 1, 1], 2)
        [False, True, False, True]
        >>> budget_select([0.1, 0.9, 0.5], [1, 1, 3], 2, forced=[True, False, False])
        [True, True, False]
    """
    n = len(scores)
    if len(costs) != n or (forced is not None and len(forced) != n):
        raise ValueError(f"scores, costs and forced must have the same length; got {n}, {len(costs)}")
    keep = [bool(forced[i]) if forced is not None else False for i in range(n)]
    cum = float(sum(c for c, k in zip(costs, keep, strict=True) if k))
    key = [(-float(s) if not math.isnan(float(s)) else math.inf) for s in scores]
    order = sorted((i for i in range(n) if not keep[i]), key=lambda i: (key[i], i))
    for i in order:
        c = float(costs[i])
        if cum + c <= budget + 1e-9:
            keep[i] = True
            cum += c
            continue
        if (cum + c - budget) < (budget - cum):
            keep[i] = True
        break
    return keep


@dataclass
class _Unit:
    start: int  # content span (the word or the token group), in the string being compressed
    end: int
    piece_start: int  # the unit's piece: from the previous unit's end (whitespace before it) to its end
    tokens: list[int]  # tokens whose anchor character lies in the piece (they go when the unit goes)
    score_tokens: list[int]  # tokens that score the unit


def _tokenize(tok: Any, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    kw: dict[str, Any] = {"add_special_tokens": False, "return_offsets_mapping": True}
    try:
        enc = tok(text, split_special_tokens=True, **kw)
    except TypeError:  # pragma: no cover - old tokenizers
        enc = tok(text, **kw)
    return list(enc["input_ids"]), [tuple(map(int, o)) for o in enc["offset_mapping"]]  # type: ignore[misc]


def _count(tok: Any, text: str) -> int:
    if not text:
        return 0
    try:
        return len(tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])
    except TypeError:  # pragma: no cover
        return len(tok(text, add_special_tokens=False)["input_ids"])


def _lead_ids(tok: Any) -> list[int]:
    """Special tokens the tokenizer puts before content (a BOS): they condition the first token."""
    probe = "Hello world"
    plain = list(tok(probe, add_special_tokens=False)["input_ids"])
    full = list(tok(probe, add_special_tokens=True)["input_ids"])
    for i in range(0, min(4, len(full) - len(plain) + 1)):
        if full[i : i + len(plain)] == plain:
            return full[:i]
    return []


def _anchor(text: str, s: int, e: int) -> int:
    for j in range(s, e):
        if not text[j].isspace():
            return j
    return s


def _units(text: str, offsets: list[tuple[int, int]], granularity: str) -> tuple[list[_Unit], list[int]]:
    """Units (words or token groups) and the tokens of the trailing remainder (always kept)."""
    T = len(offsets)
    spans: list[tuple[int, int, list[int]]] = []  # content start, end, score tokens
    if granularity == "word":
        words = [(m.start(), m.end()) for m in re.finditer(r"\S+", text)]
        for s, e in words:
            spans.append((s, e, []))
        # score tokens: tokens with non-space characters overlapping the word
        w = 0
        for t, (s, e) in enumerate(offsets):
            if e <= s or text[s:e].isspace():
                continue
            while w < len(words) and words[w][1] <= s:
                w += 1
            j = w
            while j < len(words) and words[j][0] < e:
                spans[j][2].append(t)
                j += 1
    else:
        t = 0
        while t < T:
            s, e = offsets[t]
            group = [t]
            t += 1
            while t < T and (offsets[t][0] < e or offsets[t][1] <= offsets[t][0]):
                e = max(e, offsets[t][1])
                group.append(t)
                t += 1
            spans.append((s, e, group))
    units: list[_Unit] = []
    prev = 0
    for s, e, st in spans:
        units.append(_Unit(s, e, prev, [], st))
        prev = e
    # token -> the unit whose piece holds its anchor character
    trailing: list[int] = []
    u = 0
    for t, (s, e) in enumerate(offsets):
        a = _anchor(text, s, e) if e > s else s
        while u < len(units) and units[u].end <= a:
            u += 1
        if u < len(units) and units[u].piece_start <= a:
            units[u].tokens.append(t)
        elif u < len(units):  # pragma: no cover - an anchor before the first piece cannot happen
            units[u].tokens.append(t)
        else:
            trailing.append(t)
    return units, trailing


def _forced_units(text: str, units: list[_Unit], keep: Sequence[str | re.Pattern[str]]) -> list[bool]:
    spans: list[tuple[int, int]] = []
    for k in keep:
        if isinstance(k, re.Pattern):
            spans += [(m.start(), m.end()) for m in k.finditer(text) if m.end() > m.start()]
        elif isinstance(k, str):
            if k:
                spans += [(m.start(), m.end()) for m in re.finditer(re.escape(k), text)]
        else:
            raise TypeError(
                f"keep= takes strings (literal) and compiled regexes (re.compile), got {type(k).__name__}"
            )
    out = []
    for u in units:
        out.append(any(s < u.end and u.start < e for s, e in spans))
    return out


def _rebuild(text: str, units: list[_Unit], keep: list[bool]) -> tuple[str, list[tuple[int, int]]]:
    if not units:
        return text, []
    lead_ws = text[: len(text) - len(text.lstrip())]
    parts: list[str] = []
    kept: list[tuple[int, int]] = []
    first = True
    for u, k in zip(units, keep, strict=True):
        if not k:
            continue
        piece = text[u.piece_start : u.end]
        if first:
            if u.piece_start != 0:  # the first kept unit takes the text's own leading whitespace
                piece = lead_ws + piece.lstrip()
            first = False
        parts.append(piece)
        kept.append((u.start, u.end))
    parts.append(text[units[-1].end :])
    return "".join(parts), kept


def _reduce(vals: list[float], how: str) -> float:
    if not vals:
        return math.nan
    if any(v == math.inf for v in vals):
        return math.inf
    if how == "mean":
        return sum(vals) / len(vals)
    if how == "max":
        return max(vals)
    return sum(vals)


# ---------------------------------------------------------------------------------------------- LM access
def _check_lm(lm: Any, need_lm: bool) -> None:
    tok = getattr(lm, "tokenizer", None)
    if tok is None or not callable(tok):
        raise TypeError(
            f"lm must be a tokensmith ModelAdapter (ts.load(...), ts.tiny('llama')), got {type(lm).__name__}"
        )
    if not getattr(tok, "is_fast", False):
        raise ValueError(
            "prompt compression needs character offsets, i.e. a fast (Rust) tokenizer; load the adapter with "
            "AutoTokenizer.from_pretrained(..., use_fast=True)"
        )
    if need_lm:
        causal = bool(getattr(lm, "is_causal", False))
        head = getattr(getattr(lm, "structure", None), "lm_head", None) is not None
        if not (causal and head):
            what = "is not causal" if not causal else "has no LM head"
            raise ValueError(
                f"compress scores tokens with a causal LM, and {getattr(lm, 'name', type(lm).__name__)!r} {what} "
                "(an encoder). Pass a small causal LM (e.g. ts.load('smollm2-135m-instruct')), or give "
                "scorer= (e.g. Attribution(result=scores), RandomScore()) so the encoder only tokenizes"
            )


def _logprobs(lm: Any, ids: list[int], start: int) -> torch.Tensor:
    """``log p(ids[t] | ids[:t])`` for ``t >= start`` (``start >= 1``), one forward, float32 on CPU."""
    x = torch.tensor([ids], dtype=torch.long)
    m = torch.zeros_like(x, dtype=torch.bool)
    m[0, start:] = True
    with torch.no_grad():
        lp = lm.token_logprobs({"input_ids": x, "attention_mask": torch.ones_like(x)}, target_mask=m)
    return lp[0, start:].float().cpu()


def _limit(lm: Any) -> int | None:
    return getattr(lm, "max_positions", None)


def _surprisal_given(lm: Any, lead: list[int], ctx: list[int], seg: list[int]) -> torch.Tensor:
    """``−log p(seg_t | lead, ctx, seg_<t)`` for every token of ``seg`` (``+inf`` where nothing precedes)."""
    limit = _limit(lm)
    if limit is not None:
        room = limit - len(lead) - len(seg)
        if room < 0:
            raise ValueError(
                f"a segment of {len(seg)} tokens (+{len(lead)} lead) exceeds the model's {limit} positions; "
                "lower segment_tokens="
            )
        ctx = ctx[len(ctx) - room :] if len(ctx) > room else ctx
    ids = lead + ctx + seg
    start = len(lead) + len(ctx)
    out = torch.full((len(seg),), math.inf)
    s = max(start, 1)
    if s < len(ids):
        out[s - start :] = -_logprobs(lm, ids, s)
    return out


def _fine_scores(
    lm: Any, lead: list[int], q: list[int] | None, ctx: list[int], seg: list[int]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Self-information of ``seg`` after ``ctx``; with a question also the surprisal after ``q + ctx``."""
    plain = _surprisal_given(lm, lead, ctx, seg)
    if q is None:
        return plain, None
    return plain, _surprisal_given(lm, lead + q, ctx, seg)


def _sequence_surprisal(
    lm: Any, lead: list[int], ids: list[int], pre: list[int] | None = None
) -> torch.Tensor:
    """Non-iterative: ``−log p(x_t | [pre], x_<t)`` over a whole text, windowed when it is too long."""
    pre = pre or []
    limit = _limit(lm)
    if limit is None or len(lead) + len(pre) + len(ids) <= limit:
        return _surprisal_given(lm, lead + pre, [], ids)
    # too long: windows of half the context, each conditioned on the original tokens before it
    room = limit - len(lead) - len(pre)
    step = max(1, room // 2)
    out = []
    for s in range(0, len(ids), step):
        seg = ids[s : s + step]
        out.append(_surprisal_given(lm, lead + pre, ids[:s], seg))
    return torch.cat(out)


# ---------------------------------------------------------------------------------------------- coarse
def rank_demonstrations(
    demonstrations: Sequence[str], lm: ModelAdapter, question: str | None = None
) -> list[float]:
    """Coarse-stage score of each demonstration (LLMLingua budget controller; LongLLMLingua coarse ranking).

    Without a question: the demonstration's perplexity under ``lm``,

        PPL(d) = exp(−(1/n) Σ_{t} log p(d_t | d_<t))     (its first token is not scored unless a BOS exists)

    With a question: LongLLMLingua's ``r_k = −(1/N_c) Σ_i log p(x_i^{que,restrict} | x_k^doc)``, the mean
    surprisal of the question plus :data:`RESTRICT`, written after the demonstration and ``"\\n\\n"``
    (tokenized jointly, so the boundary merges as in the prompt); lower ``r_k`` = more relevant.

    Args:
        demonstrations: the texts (few-shot examples, documents).
        lm: a causal :class:`~tokensmith.models.ModelAdapter`.
        question: the question for the LongLLMLingua ranking.

    Returns:
        One float per demonstration: a perplexity (no question) or a mean surprisal ``r_k`` in nats.

    Examples:
        >>> import tokensmith as ts
        >>> r = rank_demonstrations(["2 + 2 = 4.", "The sky is blue."], ts.tiny("llama"))
        >>> len(r), all(x > 1 for x in r)
        (2, True)
    """
    _check_lm(lm, need_lm=True)
    tok = lm.tokenizer
    lead = _lead_ids(tok)
    out: list[float] = []
    for d in demonstrations:
        if not isinstance(d, str) or not d.strip():
            raise ValueError("every demonstration must be a non-empty string")
        if question is None:
            ids, _ = _tokenize(tok, d)
            s = _surprisal_given(lm, lead, [], ids)
            s = s[torch.isfinite(s)]
            out.append(float(torch.exp(s.double().mean())) if len(s) else math.nan)
        else:
            pre = d + "\n\n"
            full = pre + question + RESTRICT
            ids, offs = _tokenize(tok, full)
            k = next((i for i, (a, _) in enumerate(offs) if a >= len(pre)), len(ids))
            k = max(k, 1)
            s = -_logprobs(lm, lead + ids, len(lead) + k)
            out.append(float(s.double().mean()))
    return out


# ---------------------------------------------------------------------------------------------- compress
def compress(
    text: str,
    lm: ModelAdapter,
    rate: float = 0.5,
    question: str | None = None,
    scorer: Scorer | None = None,
    segment_tokens: int = 200,
    granularity: str = "word",
    keep: Sequence[str | re.Pattern[str]] | None = (NUMBERS,),
    demonstrations: Sequence[str] | None = None,
    coarse_rate: float | None = None,
    progress: bool = False,
    *,
    iterative: bool = True,
    reduce: str = "mean",
    coarse_drop: str = "low",
    separator: str = "\n\n",
) -> CompressedPrompt:
    """Compress a prompt to about ``rate`` of its tokens (LLMLingua, Jiang et al. 2023; LongLLMLingua).

    Fine stage (module docstring): per segment of about ``segment_tokens`` tokens, the score of token ``t``

        s_t = −log p(x_t | x̃_<t)                                   (self-information; no question)
        s_t = log p(x_t | x^que, x̃_<t) − log p(x_t | x̃_<t)          (contrastive; question given)

    with ``x̃_<t`` the compressed text so far (``iterative=True``) or the original prefix
    (``iterative=False``); units (words or tokens) above the score quantile that meets the segment's
    budget ``round(rate · N_≤k) − kept_<k`` are kept (:func:`budget_select`). Coarse stage (with
    ``demonstrations``): whole demonstrations are dropped by :func:`rank_demonstrations` until their tokens
    are about ``coarse_rate`` of what they were, then the fine stage compresses the rest at
    ``rate · N / N_rest``.

    Args:
        text: the prompt (with ``demonstrations``: the part that precedes them, e.g. an instruction; may
            then be empty).
        lm: the small causal :class:`~tokensmith.models.ModelAdapter` that scores (its tokenizer counts).
        rate: target ``tokens_out / tokens_in`` in ``(0, 1]``; ``1`` returns the text unchanged.
        question: condition on a question (LongLLMLingua); it is not part of the output.
        scorer: a :class:`~tokensmith.pruning.scores.Scorer` used instead of the LM scores. It gets one
            :class:`~tokensmith.pruning.scores.ScoreContext` (``phase="text"``, ``input_ids`` ``[1, T]`` of
            the text's tokens under ``lm``'s tokenizer, ``adapter=lm``, ``extra={"question": ...}``) and
            returns ``[1, h, T]`` (heads are averaged). Scoring is then non-iterative.
        segment_tokens: tokens per segment (LLMLingua/LongLLMLingua use 100/200).
        granularity: ``"word"`` (whole words) or ``"token"``.
        keep: literal strings and compiled regexes whose matches are never dropped (default: numbers,
            :data:`NUMBERS`; ``keep=()`` or ``None`` for none).
        demonstrations: texts appended after ``text`` (joined by ``separator``) that the coarse stage
            may drop whole.
        coarse_rate: the fraction of demonstration tokens the coarse stage keeps (default ``rate``; at least
            one demonstration is kept).
        progress: a tqdm bar over segments.
        iterative: condition on the compressed prefix (LLMLingua) or, if False, on the original one.
        reduce: a word's score from its tokens': ``"mean"``, ``"max"`` or ``"sum"``.
        coarse_drop: without a question, drop the ``"low"``-perplexity demonstrations first (LLMLingua) or
            the ``"high"`` ones.
        separator: joins ``text`` and the demonstrations.

    Returns:
        A :class:`CompressedPrompt` (the text, the measured rate, every unit's score and fate).

    Raises:
        ValueError: empty text, ``rate``/``coarse_rate`` outside ``(0, 1]``, an unknown ``granularity``,
            an encoder ``lm`` with no scorer, a slow tokenizer.

    Examples:
        >>> import tokensmith as ts
        >>> lm = ts.tiny("llama")
        >>> out = compress("The 3 quick brown foxes jumped over the lazy dog twice today.", lm, rate=0.5)
        >>> out.tokens_in, out.tokens_out, "3" in out.text.split()   # a random tiny model picks the words
        (14, 7, True)
        >>> compress("Keep me whole.", lm, rate=1.0).text
        'Keep me whole.'
    """
    t0 = time.perf_counter()
    if not isinstance(text, str):
        raise TypeError(f"text must be a string, got {type(text).__name__}")
    demos = list(demonstrations) if demonstrations is not None else []
    if isinstance(demonstrations, str):
        raise TypeError("demonstrations must be a list of strings, not one string")
    for d in demos:
        if not isinstance(d, str) or not d.strip():
            raise ValueError("every demonstration must be a non-empty string")
    if not text.strip() and not demos:
        raise ValueError("text is empty: nothing to compress (pass the prompt, or demonstrations=[...])")
    r = _check_rate(rate, "rate")
    cr = r if coarse_rate is None else _check_rate(coarse_rate, "coarse_rate")
    if granularity not in _GRANULARITIES:
        raise ValueError(f"granularity must be one of {_GRANULARITIES}, got {granularity!r}")
    if reduce not in _REDUCE:
        raise ValueError(f"reduce must be one of {_REDUCE}, got {reduce!r}")
    if coarse_drop not in ("low", "high"):
        raise ValueError(f"coarse_drop must be 'low' (LLMLingua) or 'high', got {coarse_drop!r}")
    if isinstance(segment_tokens, bool) or not isinstance(segment_tokens, int) or segment_tokens < 1:
        raise ValueError(f"segment_tokens must be a positive int, got {segment_tokens!r}")
    if question is not None and (not isinstance(question, str) or not question.strip()):
        raise ValueError("question must be a non-empty string (or None)")
    if scorer is not None and not isinstance(scorer, Scorer):
        raise TypeError(f"scorer must be a tokensmith.pruning.scores.Scorer, got {type(scorer).__name__}")
    keep = () if keep is None else (keep if not isinstance(keep, (str, re.Pattern)) else (keep,))
    scorer_needs_lm = (
        scorer is not None and "lm" in scorer.all_needs() and getattr(scorer, "lm", None) is None
    )
    _check_lm(lm, need_lm=scorer is None or bool(demos) or scorer_needs_lm)
    tok = lm.tokenizer

    # ---------------------------------------------------------------- coarse stage
    parts = ([text] if text.strip() else []) + demos
    first_demo = len(parts) - len(demos)
    original = separator.join(parts)
    starts_orig = _starts(parts, separator)
    demo_info: list[dict[str, Any]] = []
    kept_parts = list(range(len(parts)))
    method_coarse = ""
    if demos:
        costs = [_count(tok, d) for d in demos]
        ranks = rank_demonstrations(demos, lm, question)
        if question is not None:
            prio = [-x for x in ranks]  # lower question surprisal = keep first
            method_coarse = "coarse: question surprisal r_k (LongLLMLingua); "
        else:
            prio = list(ranks) if coarse_drop == "low" else [-x for x in ranks]
            method_coarse = f"coarse: perplexity, drop {coarse_drop}est first (LLMLingua); "
        sel = budget_select(prio, costs, cr * sum(costs)) if cr < 1.0 else [True] * len(demos)
        if not any(sel):
            sel[max(range(len(demos)), key=lambda i: (prio[i], -i))] = True
        demo_info = [
            {"index": i, "kept": bool(sel[i]), "score": float(ranks[i]), "tokens": costs[i]}
            for i in range(len(demos))
        ]
        kept_parts = list(range(first_demo)) + [first_demo + i for i in range(len(demos)) if sel[i]]
    rest_parts = [parts[i] for i in kept_parts]
    rest = separator.join(rest_parts)
    starts_rest = _starts(rest_parts, separator)

    tokens_in = _count(tok, original)
    n_rest = _count(tok, rest)
    r_fine = min(1.0, r * tokens_in / max(n_rest, 1))

    # ---------------------------------------------------------------- fine stage
    ids, offsets = _tokenize(tok, rest)
    units, trailing = _units(rest, offsets, granularity)
    forced = _forced_units(rest, units, keep)
    lead = _lead_ids(tok) if scorer is None else []
    q_ids = None
    if question is not None and scorer is None:
        q_ids, _ = _tokenize(tok, question + "\n\n")
    T = len(ids)
    tok_scores = torch.full((T,), math.nan)

    # segments over units (a unit never straddles two)
    segs: list[list[int]] = []
    cur: list[int] = []
    acc = 0
    for i, u in enumerate(units):
        cur.append(i)
        acc += len(u.tokens)
        if acc >= segment_tokens:
            segs.append(cur)
            cur, acc = [], 0
    if cur or not segs:
        segs.append(cur)

    if scorer is not None:
        method = f"scorer: {type(scorer).__name__}"
        ctx = ScoreContext(
            layer=None,
            phase="text",
            valid=torch.ones(1, T, dtype=torch.bool),
            input_ids=torch.tensor([ids], dtype=torch.long),
            positions=torch.arange(T)[None],
            columns=torch.arange(T)[None, None],
            spans={"text": torch.ones(1, T, dtype=torch.bool)},
            special=torch.zeros(1, T, dtype=torch.bool),
            adapter=lm,
            extra={"question": question},
        )
        s = scorer(ctx).float()
        tok_scores = s.mean(1)[0].cpu() if T else tok_scores
        iterate = False
    elif not iterative:
        plain = _sequence_surprisal(lm, lead, ids)
        if q_ids is None:
            tok_scores = plain
            method = "self-information −log p(x_t | x_<t), original prefix"
        else:
            tok_scores = plain - _sequence_surprisal(lm, lead, ids, pre=q_ids)
            method = "contrastive log p(x_t | q, x_<t) − log p(x_t | x_<t), original prefix"
        iterate = False
    else:
        iterate = True
        method = (
            "self-information −log p(x_t | x̃_<t), compressed prefix (iterative)"
            if q_ids is None
            else "contrastive log p(x_t | q, x̃_<t) − log p(x_t | x̃_<t), compressed prefix (iterative)"
        )
    method = method_coarse + "fine: " + method

    keep_flags = [False] * len(units)
    unit_scores = [math.nan] * len(units)
    prefix: list[int] = []
    seen = kept = 0
    try:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(segs), disable=not progress, desc="compress")
    except ImportError:  # pragma: no cover
        bar = None
    for k, seg in enumerate(segs):
        seg_tokens = sorted(t for i in seg for t in units[i].tokens)
        if k == len(segs) - 1:
            seg_tokens = sorted(seg_tokens + trailing)
        if iterate and seg_tokens:
            seg_ids = [ids[t] for t in seg_tokens]
            plain, with_q = _fine_scores(lm, lead, q_ids, prefix, seg_ids)
            vals = plain if with_q is None else plain - with_q
            if with_q is not None:  # the unpredicted first token stays +inf (kept), not inf - inf
                vals = torch.where(torch.isinf(plain), plain, vals)
            tok_scores[torch.tensor(seg_tokens)] = vals
        for i in seg:
            vals = [float(tok_scores[t]) for t in units[i].score_tokens]
            unit_scores[i] = _reduce(vals, reduce)
        costs = [len(units[i].tokens) for i in seg]
        seen += sum(costs) + (len(trailing) if k == len(segs) - 1 else 0)
        budget = round(r_fine * seen) - kept - (len(trailing) if k == len(segs) - 1 else 0)
        sel = budget_select(
            [unit_scores[i] for i in seg],
            costs,
            budget,
            [forced[i] or unit_scores[i] == math.inf for i in seg],
        )
        for i, s_ in zip(seg, sel, strict=True):
            keep_flags[i] = s_
        kept += sum(c for c, s_ in zip(costs, sel, strict=True) if s_) + (
            len(trailing) if k == len(segs) - 1 else 0
        )
        if iterate:
            prefix += [ids[t] for i, s_ in zip(seg, sel, strict=True) if s_ for t in units[i].tokens]
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()

    if r_fine >= 1.0:
        keep_flags = [True] * len(units)
    out_text, kept_rest = _rebuild(rest, units, keep_flags)
    if not units:
        out_text = rest

    # ---------------------------------------------------------------- map spans of ``rest`` to ``original``
    def to_orig(p: int) -> int:
        j = 0
        for m, st in enumerate(starts_rest):
            if st <= p:
                j = m
        return starts_orig[kept_parts[j]] + (p - starts_rest[j]) if kept_parts else p

    def span(s: int, e: int) -> tuple[int, int]:
        return (to_orig(s), to_orig(e - 1) + 1) if e > s else (to_orig(s), to_orig(s))

    tokens_out = _count(tok, out_text)
    return CompressedPrompt(
        text=out_text,
        original_text=original,
        kept=[span(s, e) for s, e in kept_rest],
        rate=tokens_out / max(tokens_in, 1),
        tokens_in=tokens_in,
        tokens_out=tokens_out,
        target_rate=r,
        units=[span(u.start, u.end) for u in units],
        scores=[float(x) for x in unit_scores],
        unit_kept=list(keep_flags),
        forced=[bool(f or s == math.inf) for f, s in zip(forced, unit_scores, strict=True)],
        token_scores=[float(x) for x in tok_scores],
        token_spans=[span(s, e) for s, e in offsets],
        method=method,
        granularity=granularity,
        demonstrations=demo_info,
        seconds=time.perf_counter() - t0,
    )


def _starts(parts: list[str], sep: str) -> list[int]:
    out, p = [], 0
    for x in parts:
        out.append(p)
        p += len(x) + len(sep)
    return out


def _check_rate(x: Any, name: str) -> float:
    try:
        v = float(x)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number in (0, 1] (tokens kept / tokens in), got {x!r}") from None
    if isinstance(x, bool) or not (0.0 < v <= 1.0):
        raise ValueError(
            f"{name} is the fraction of tokens kept and must be in (0, 1] (e.g. 0.5 halves the prompt), got {x!r}"
        )
    return v
