"""Tokenizer metrics: fertility, premium/parity, compression, Rényi efficiency, MorphScore, stream statistics.

METHODS.md TOK-2 .. TOK-7. The module has two layers:

1. **Pure functions** over token counts, ids and byte offsets (no tokenizer, no model, no I/O). They are
   what tests pin to formulas: :func:`fertility`, :func:`continued_word_ratio`, :func:`tokenization_premium`,
   :func:`parity_matrix`, :func:`unfairness_summary`, :func:`gini`, :func:`normalized_sequence_length`,
   :func:`unused_vocab_share`, :func:`renyi_entropy`, :func:`renyi_efficiency`, :func:`zipf_fit`,
   :func:`unigram_entropy`, :func:`token_innovation`, :func:`compression_ratio`, :func:`digit_chunks`,
   :func:`number_split_style`, :func:`morph_score`, :func:`vocab_param_ratio`, and the word splitter
   :func:`word_spans`.
2. **Thin wrappers** that take a tokenizer (anything :class:`~tokensmith.tokenization.view.TokenizerView`
   accepts) and texts: :func:`encode_corpus` (one batched encode per chunk, progress bar),
   :func:`corpus_metrics` (every metric of one encoded corpus), :func:`measure` (both),
   :func:`compression` and :func:`morph_score_tokenizer`.

**Words (script-aware).** Fertility is tokens per word (Rust et al., 2021; Ács, 2019). A *word* here is a
maximal run of non-space characters (punctuation stays attached, as with ``str.split``), except in scripts
written without spaces between words (Han, Hiragana, Katakana, Thai, Lao, Khmer, Myanmar, Tibetan and CJK
punctuation/full-width forms): there every character (with its combining marks) is one unit, so fertility
falls back to tokens per character (METHODS TOK-2). :func:`word_spans` reports which kind each unit is, and
:func:`corpus_metrics` reports ``char_unit_share`` (0: all units are words, 1: all are characters) so a
tokens-per-character number is never read as a tokens-per-word one.

**Tokens of a word.** ``|τ(w)|`` is the number of tokens whose byte span overlaps the word's byte span
(byte offsets from the byte-exact view, TOK-1); a leading-space token ``" hello"`` belongs to ``hello``, a
token of spaces alone belongs to no word.

Examples:
    >>> from collections import Counter
    >>> counts = Counter("pick @@ed pick @@l @@ed pick @@les".split())
    >>> round(renyi_efficiency(list(counts.values()), alpha=3.0, vocab_size=4), 5)
    0.80315
    >>> tokenization_premium([10, 20], [10, 10])
    1.5
"""

from __future__ import annotations

import bz2
import itertools
import lzma
import math
import weakref
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tokensmith.tokenization.view import TokenizerView, utf8_encode

__all__ = [
    "NO_SPACE_SCRIPTS",
    "word_spans",
    "tokens_per_word",
    "fertility",
    "continued_word_ratio",
    "tokenization_premium",
    "premium_bootstrap",
    "parity_matrix",
    "gini",
    "unfairness_summary",
    "normalized_sequence_length",
    "unused_vocab_share",
    "unk_rate",
    "byte_fallback_rate",
    "partial_char_rate",
    "renyi_entropy",
    "renyi_efficiency",
    "unigram_entropy",
    "zipf_fit",
    "token_innovation",
    "compression_ratio",
    "digit_chunks",
    "number_split_style",
    "morph_boundaries",
    "morph_score",
    "vocab_param_ratio",
    "EncodedCorpus",
    "encode_corpus",
    "corpus_metrics",
    "measure",
    "compression",
    "morph_score_tokenizer",
]

#: Scripts written without spaces between words: each character (with its combining marks) is one unit.
NO_SPACE_SCRIPTS: tuple[str, ...] = (
    "Han",
    "Hiragana",
    "Katakana",
    "Thai",
    "Lao",
    "Khmer",
    "Myanmar",
    "Tibetan",
)
_NOSPACE_CLASS = "".join(rf"\p{{{s}}}" for s in NO_SPACE_SCRIPTS) + r"\u3000-\u303f\u30fc\uff00-\uffef"
_SPACE, _NOSPACE, _MARK = 1, 2, 4  # bit flags of the character-class table
_TABLE: np.ndarray | None = None


def _classify(chars: str) -> np.ndarray:
    """Class flags (space / no-space script / combining mark) of every character of ``chars``."""
    import regex

    out = np.zeros(len(chars), dtype=np.uint8)
    for flag, pat in ((_SPACE, r"\s"), (_NOSPACE, f"[{_NOSPACE_CLASS}]"), (_MARK, r"\p{M}")):
        # replace matches by U+0001 (and U+0001 itself by U+0002 first) so the hit mask is one comparison
        marked = regex.sub(pat, "\x01", chars.replace("\x01", "\x02"))
        hit = np.frombuffer(marked.encode("utf-32-le", "surrogatepass"), dtype=np.uint32) == 1
        if "\x01" in chars and regex.fullmatch(pat, "\x01"):
            hit[[i for i, c in enumerate(chars) if c == "\x01"]] = True
        out[hit] |= flag
    return out


def _table() -> np.ndarray:
    global _TABLE
    if _TABLE is None:
        _TABLE = _classify("".join(map(chr, range(0x10000))))
    return _TABLE


def _char_classes(cp: np.ndarray) -> np.ndarray:
    """Class flags per code point (BMP from a cached table, astral planes classified on the fly)."""
    tab = _table()
    cls = np.zeros(cp.size, dtype=np.uint8)
    bmp = cp < 0x10000
    cls[bmp] = tab[cp[bmp]]
    if not bmp.all():
        astral = np.unique(cp[~bmp])
        flags = _classify("".join(map(chr, astral.tolist())))
        cls[~bmp] = flags[np.searchsorted(astral, cp[~bmp])]
    return cls


def _units(cp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Word units of a code-point array: ``(char spans int64[n, 2], is_char bool[n])``.

    A unit starts at every non-space character except (a) a combining mark that follows a non-space
    character and (b) an "other" character (neither space nor no-space script) that follows another.
    """
    if cp.size == 0:
        return np.zeros((0, 2), dtype=np.int64), np.zeros(0, dtype=bool)
    cls = _char_classes(cp)
    space = (cls & _SPACE) != 0
    nos = ((cls & _NOSPACE) != 0) & ~space
    mark = (cls & _MARK) != 0
    other = ~space & ~nos
    prev_ns = np.r_[False, ~space[:-1]]
    prev_other = np.r_[False, other[:-1]]
    cont = prev_ns & (mark | (other & prev_other))
    start = ~space & ~cont
    starts = np.flatnonzero(start)
    if starts.size == 0:
        return np.zeros((0, 2), dtype=np.int64), np.zeros(0, dtype=bool)
    # a unit ends before the next start or the next space, whichever comes first
    brk = np.flatnonzero(start | space)
    nxt = np.searchsorted(brk, starts, "right")
    ends = np.where(nxt < brk.size, brk[np.minimum(nxt, brk.size - 1)], cp.size)
    return np.stack([starts, ends], axis=1).astype(np.int64), nos[starts]


def _code_points(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32).astype(np.int64)


def _char_to_byte_cp(cp: np.ndarray) -> np.ndarray:
    """``cum[i]`` = UTF-8 byte offset of code point ``i`` (length ``len(cp) + 1``)."""
    n = 1 + (cp >= 0x80).astype(np.int64) + (cp >= 0x800) + (cp >= 0x10000)
    out = np.zeros(cp.size + 1, dtype=np.int64)
    np.cumsum(n, out=out[1:])
    return out


def word_spans(text: str) -> tuple[np.ndarray, np.ndarray]:
    """Script-aware word units of ``text`` as UTF-8 **byte** spans.

    A unit is a maximal run of non-space characters outside :data:`NO_SPACE_SCRIPTS` (punctuation stays
    attached, as with ``str.split``), or one character of a no-space script (Chinese, Japanese, Thai, ...,
    CJK punctuation and full-width forms) together with the combining marks (``\\p{M}``) that follow it: the
    tokens-per-character fallback. Spaces are ``\\s`` (Unicode White_Space).

    Args:
        text: The text.

    Returns:
        ``(spans, is_char)``: ``int64[n, 2]`` byte ``(start, end)`` per unit and ``bool[n]`` marking the
        character units.

    Examples:
        >>> spans, is_char = word_spans("Hi, wörld 中文")
        >>> spans.tolist(), is_char.tolist()
        ([[0, 3], [4, 10], [11, 14], [14, 17]], [False, False, True, True])
    """
    cp = _code_points(text)
    cs, is_char = _units(cp)
    return _char_to_byte_cp(cp)[cs], is_char


def tokens_per_word(offsets: np.ndarray, spans: np.ndarray) -> np.ndarray:
    """``|τ(w)|`` for every word: how many tokens' byte spans overlap the word's byte span.

    Tokens with an empty span (special tokens) count for nothing. Works on any token order.

    Args:
        offsets: ``int[T, 2]`` token byte offsets ``(start, end)``.
        spans: ``int[W, 2]`` word byte spans (:func:`word_spans`).

    Returns:
        ``int64[W]`` token counts.

    Examples:
        >>> tokens_per_word(np.array([[0, 2], [2, 5], [5, 11]]), np.array([[0, 5], [6, 11]])).tolist()
        [2, 1]
    """
    offsets = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    spans = np.asarray(spans, dtype=np.int64).reshape(-1, 2)
    keep = offsets[:, 1] > offsets[:, 0]
    s = np.sort(offsets[keep, 0])
    e = np.sort(offsets[keep, 1])
    # overlap(t, w) <=> s_t < we and e_t > ws; tokens with e_t <= ws all have s_t < we.
    return np.searchsorted(s, spans[:, 1], "left") - np.searchsorted(e, spans[:, 0], "right")


def fertility(lengths: Any, words: Any = None) -> float:
    """Fertility (Rust et al., 2021): tokens per word, ``Σ_w |τ(w)| / #words``.

    Args:
        lengths: Token counts: per word (then ``words`` may be omitted as ``None``), or per text (the
            within-word token totals).
        words: Word counts per text, matching ``lengths``; ``None`` when ``lengths`` is per word.

    Raises:
        ValueError: When there are no words.

    Examples:
        >>> fertility([1, 2, 3], None)
        2.0
        >>> fertility([5, 7], [4, 2])
        2.0
    """
    n_tok = float(np.sum(lengths))
    n_words = float(len(np.asarray(lengths).reshape(-1)) if words is None else np.sum(words))
    if n_words <= 0:
        raise ValueError("fertility needs at least one word (the texts are empty or all whitespace)")
    return n_tok / n_words


def continued_word_ratio(counts: Any) -> float:
    """Proportion of continued words (PCW; Rust et al., 2021): share of words split into ≥ 2 tokens.

    Args:
        counts: ``|τ(w)|`` per word (:func:`tokens_per_word`).

    Examples:
        >>> continued_word_ratio([1, 2, 1, 3])
        0.5
    """
    c = np.asarray(counts).reshape(-1)
    if c.size == 0:
        raise ValueError("continued_word_ratio needs at least one word")
    return float(np.mean(c >= 2))


def _paired(lengths: Any, reference: Any) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(lengths, dtype=np.float64).reshape(-1)
    b = np.asarray(reference, dtype=np.float64).reshape(-1)
    if a.shape != b.shape:
        raise ValueError(
            f"parallel text: {a.size} lengths vs {b.size} reference lengths; the corpora must be aligned "
            "sentence by sentence (one translation per reference sentence)"
        )
    if a.size == 0:
        raise ValueError("the parallel corpus is empty")
    if b.sum() <= 0:
        raise ValueError("the reference side has no tokens")
    return a, b


def tokenization_premium(lengths: Any, reference: Any) -> float:
    """Tokenization premium (Petrov et al., 2023): ``premium(L) = |τ(C_L)| / |τ(C_ref)|``.

    ``lengths[i]`` and ``reference[i]`` are the sizes of the two translations of sentence ``i`` (tokens for
    the tokenizer premium; bytes or characters give the byte/char premium, which separates the script's cost
    from the tokenizer's). A language against itself has premium exactly 1.

    Args:
        lengths: Sizes of the language-L side, one per sentence.
        reference: Sizes of the reference side (e.g. English), aligned with ``lengths``.

    Examples:
        >>> tokenization_premium([3, 5], [2, 2])
        2.0
    """
    a, b = _paired(lengths, reference)
    return float(a.sum() / b.sum())


def _bootstrap_weights(n: int, n_boot: int, seed: int, chunk: int = 256):
    """Yield ``float64[b, n]`` multinomial resampling weights (sentences drawn with replacement)."""
    rng = np.random.default_rng(seed)
    done = 0
    while done < n_boot:
        b = min(chunk, n_boot - done)
        yield rng.multinomial(n, np.full(n, 1.0 / n), size=b).astype(np.float64)
        done += b


def premium_bootstrap(
    lengths: Any, reference: Any, *, n_boot: int = 1000, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of :func:`tokenization_premium`.

    Sentences are resampled with replacement, the two sides together (paired), ``n_boot`` times with
    ``numpy.random.default_rng(seed)``.

    Args:
        lengths: Sizes of the language-L side, one per sentence.
        reference: Sizes of the reference side, aligned with ``lengths``.
        n_boot: Number of bootstrap resamples.
        level: Confidence level of the interval.
        seed: Seed of the resampling.

    Returns:
        ``(low, high)``.

    Examples:
        >>> premium_bootstrap([2, 4, 6], [1, 2, 3], n_boot=50)
        (2.0, 2.0)
    """
    a, b = _paired(lengths, reference)
    vals = []
    for w in _bootstrap_weights(a.size, n_boot, seed):
        vals.append((w @ a) / np.maximum(w @ b, 1e-300))
    v = np.concatenate(vals)
    q = (1 - level) / 2
    return float(np.quantile(v, q)), float(np.quantile(v, 1 - q))


def parity_matrix(lengths: Mapping[str, Any]) -> tuple[list[str], np.ndarray]:
    """Pairwise premiums ``M[a, b] = |τ(C_a)| / |τ(C_b)|`` over parallel text (Petrov et al., 2023).

    A tokenizer achieves *parity* for ``a`` w.r.t. ``b`` when ``M[a, b] ≈ 1``. The diagonal is exactly 1 and
    ``M[a, b] · M[b, a] = 1``.

    Args:
        lengths: Language -> token counts per sentence (all aligned).

    Returns:
        ``(languages, M)`` with ``M`` a ``float64[L, L]`` array in the order of ``languages``.

    Examples:
        >>> langs, m = parity_matrix({"en": [2, 2], "de": [3, 3]})
        >>> langs, m.tolist()
        (['en', 'de'], [[1.0, 0.6666666666666666], [1.5, 1.0]])
    """
    langs = list(lengths)
    if not langs:
        raise ValueError("parity_matrix needs at least one language")
    arr = [_paired(lengths[k], lengths[langs[0]])[0] for k in langs]
    tot = np.array([x.sum() for x in arr])
    if np.any(tot <= 0):
        raise ValueError(
            f"languages with no tokens: {[k for k, t in zip(langs, tot, strict=True) if t <= 0]}"
        )
    m = tot[:, None] / tot[None, :]
    np.fill_diagonal(m, 1.0)
    return langs, m


def gini(values: Any) -> float:
    """Gini coefficient ``G = Σ_i Σ_j |x_i − x_j| / (2 n² x̄)``: 0 when all values are equal.

    Args:
        values: Non-negative values (e.g. premiums across languages).

    Examples:
        >>> gini([1, 1, 1]), round(gini([0, 0, 1]), 6)
        (0.0, 0.666667)
    """
    x = np.sort(np.asarray(values, dtype=np.float64).reshape(-1))
    n = x.size
    if n == 0:
        raise ValueError("gini needs at least one value")
    if np.any(x < 0):
        raise ValueError("gini is defined for non-negative values")
    if x.sum() == 0:
        return 0.0
    # sorted form of the mean absolute difference: Σ_i (2i − n − 1) x_(i)
    i = np.arange(1, n + 1)
    return float(np.sum((2 * i - n - 1) * x) / (n * x.sum()))


def _gini_rows(x: np.ndarray) -> np.ndarray:
    x = np.sort(x, axis=-1)
    n = x.shape[-1]
    i = np.arange(1, n + 1)
    return np.sum((2 * i - n - 1) * x, axis=-1) / (n * np.maximum(x.sum(-1), 1e-300))


def unfairness_summary(
    lengths: Mapping[str, Any],
    reference: str,
    *,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """Premiums of every language against ``reference``, with spread and bootstrap CIs (Petrov et al., 2023).

    Reported: ``premium[L]`` and its CI, ``max``/``min`` premium (and which language), ``max_min_ratio``
    ``= max_L premium / min_L premium`` (the length gap between the best- and worst-served language) and the
    :func:`gini` of the premiums, each with a paired percentile bootstrap CI (sentences resampled with
    replacement, all languages together, ``numpy.random.default_rng(seed)``).

    Args:
        lengths: Language -> token counts per sentence (aligned; ``reference`` among them).
        reference: The reference language.
        n_boot: Number of bootstrap resamples (0: no CIs).
        level: Confidence level.
        seed: Seed of the resampling.

    Examples:
        >>> s = unfairness_summary({"en": [2, 2], "de": [3, 3], "ja": [4, 4]}, "en", n_boot=0)
        >>> s["premium"], s["max_min_ratio"], s["argmax"]
        ({'en': 1.0, 'de': 1.5, 'ja': 2.0}, 2.0, 'ja')
    """
    if reference not in lengths:
        raise ValueError(f"reference language {reference!r} not among the languages {sorted(lengths)}")
    langs = list(lengths)
    ref = np.asarray(lengths[reference], dtype=np.float64).reshape(-1)
    mat = np.stack([_paired(lengths[k], ref)[0] for k in langs])  # [L, N]
    prem = mat.sum(1) / ref.sum()
    prem[langs.index(reference)] = 1.0
    out: dict[str, Any] = {
        "reference": reference,
        "premium": {k: float(p) for k, p in zip(langs, prem, strict=True)},
        "max": float(prem.max()),
        "min": float(prem.min()),
        "argmax": langs[int(prem.argmax())],
        "argmin": langs[int(prem.argmin())],
        "max_min_ratio": float(prem.max() / prem.min()),
        "gini": gini(prem),
        "n_sentences": int(ref.size),
        "n_boot": int(n_boot),
        "level": level,
        "seed": seed,
    }
    if n_boot > 0:
        ps, ratios, ginis = [], [], []
        for w in _bootstrap_weights(ref.size, n_boot, seed):
            p = (w @ mat.T) / np.maximum(w @ ref, 1e-300)[:, None]  # [b, L]
            ps.append(p)
            ratios.append(p.max(1) / p.min(1))
            ginis.append(_gini_rows(p))
        p_all = np.concatenate(ps)
        q = (1 - level) / 2

        def ci(v: np.ndarray) -> tuple[float, float]:
            return float(np.quantile(v, q)), float(np.quantile(v, 1 - q))

        out["premium_ci"] = {k: ci(p_all[:, j]) for j, k in enumerate(langs)}
        out["max_min_ratio_ci"] = ci(np.concatenate(ratios))
        out["gini_ci"] = ci(np.concatenate(ginis))
    return out


def normalized_sequence_length(lengths: Any, baseline: Any) -> float:
    """NSL (Dagan et al., 2024, *Getting the Most out of Your Tokenizer*): ``Σ_i |τ(D_i)| / Σ_i |τ_β(D_i)|``.

    The same texts tokenized by the tokenizer under study and by a baseline tokenizer ``β``; below 1: the
    tokenizer compresses better than the baseline.

    Args:
        lengths: Token counts per text under the tokenizer.
        baseline: Token counts of the same texts under the baseline tokenizer.

    Examples:
        >>> normalized_sequence_length([8, 12], [10, 15])
        0.8
    """
    a, b = _paired(lengths, baseline)
    return float(a.sum() / b.sum())


def unused_vocab_share(counts: Any, vocab_size: int, *, exclude: Iterable[int] = ()) -> float:
    """Share of the vocabulary never emitted on the corpus: ``1 − |{i : count_i > 0}| / |V|``.

    Pass the **true** ``|V|`` (every id the tokenizer can emit, added tokens included:
    ``TokenizerView.vocab_size``), not ``tokenizer.vocab_size`` (base vocabulary only for HF).

    Args:
        counts: Per-id counts (``np.bincount(ids, minlength=vocab_size)``), length ≤ ``vocab_size``.
        vocab_size: The true ``|V|``.
        exclude: Ids removed from numerator and denominator (e.g. special tokens that text never produces).

    Examples:
        >>> unused_vocab_share([3, 0, 1, 0], 4)
        0.5
        >>> unused_vocab_share([3, 0, 1, 0], 4, exclude=[3])
        0.3333333333333333
    """
    c = np.zeros(vocab_size, dtype=np.int64)
    cc = np.asarray(counts).reshape(-1)
    if cc.size > vocab_size:
        raise ValueError(f"{cc.size} counts for a vocabulary of {vocab_size}: pass the true |V|")
    c[: cc.size] = cc
    keep = np.ones(vocab_size, dtype=bool)
    ex = np.fromiter((int(i) for i in exclude), dtype=np.int64)
    keep[ex[(ex >= 0) & (ex < vocab_size)]] = False
    n = int(keep.sum())
    if n == 0:
        raise ValueError("no vocabulary left after exclusions")
    return float((n - np.count_nonzero(c[keep])) / n)


def unk_rate(ids: Any, unk_ids: Iterable[int]) -> float:
    """Share of tokens that are the unknown token. METHODS TOK-3 flags a language above 10%.

    Args:
        ids: Token ids (flat).
        unk_ids: The UNK id(s) (empty: the tokenizer has none, rate 0).

    Examples:
        >>> unk_rate([5, 0, 7, 0], [0])
        0.5
    """
    a = np.asarray(ids).reshape(-1)
    if a.size == 0:
        return 0.0
    u = np.fromiter((int(i) for i in unk_ids), dtype=np.int64)
    return float(np.isin(a, u).mean()) if u.size else 0.0


def byte_fallback_rate(ids: Any, byte_mask: Any) -> float:
    """Share of tokens that are byte-fallback pieces (SentencePiece ``<0xNN>``).

    Args:
        ids: Token ids (flat).
        byte_mask: ``bool[V]``, True for the byte-fallback ids (``view.special_class(i) == "byte"``).

    Examples:
        >>> byte_fallback_rate([1, 2, 2, 3], [False, False, True, False])
        0.5
    """
    a = np.asarray(ids, dtype=np.int64).reshape(-1)
    if a.size == 0:
        return 0.0
    return float(np.asarray(byte_mask, dtype=bool)[a].mean())


def partial_char_rate(offsets: Any, data: bytes) -> float:
    """Share of tokens holding only part of a UTF-8 character (a byte-level tokenizer's "byte tokens").

    A token is partial when its byte span starts or ends inside a character. Specials (empty spans) are
    not counted in the denominator.

    Args:
        offsets: ``int[T, 2]`` token byte offsets into ``data``.
        data: The UTF-8 bytes.

    Examples:
        >>> partial_char_rate([[0, 1], [1, 3], [3, 4]], "a中".encode())  # "中" is 3 bytes, split 2 + 1
        0.6666666666666666
    """
    o = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    o = o[o[:, 1] > o[:, 0]]
    if o.size == 0:
        return 0.0
    buf = np.frombuffer(bytes(data) + b"\x00", dtype=np.uint8)
    cont = (buf & 0xC0) == 0x80
    return float((cont[o[:, 0]] | cont[o[:, 1]]).mean())


def _probs(counts: Any) -> np.ndarray:
    if isinstance(counts, Mapping):
        counts = list(counts.values())
    c = np.asarray(counts, dtype=np.float64).reshape(-1)
    if np.any(c < 0):
        raise ValueError("counts must be non-negative")
    tot = c.sum()
    if tot <= 0:
        raise ValueError("counts are all zero (no tokens)")
    p = c[c > 0] / tot
    return p


def renyi_entropy(counts: Any, alpha: float) -> float:
    """Rényi entropy in bits of the unigram distribution: ``H_α = (1/(1−α)) · log₂ Σ_i p_i^α``.

    ``α = 1`` is Shannon entropy ``−Σ p log₂ p``; ``α = inf`` is min-entropy ``−log₂ max p``; ``α = 0`` is
    ``log₂`` of the number of types.

    Args:
        counts: Unigram counts (a sequence, array or mapping type -> count).
        alpha: Order ``α ≥ 0``.

    Examples:
        >>> renyi_entropy([1, 1, 1, 1], 2.5)
        2.0
    """
    p = _probs(counts)
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")
    if math.isinf(alpha):
        return float(-np.log2(p.max()))
    if abs(alpha - 1.0) < 1e-12:
        return float(-(p * np.log2(p)).sum())
    return float(np.log2(np.sum(p**alpha)) / (1.0 - alpha))


def renyi_efficiency(counts: Any, alpha: float = 2.5, *, vocab_size: int) -> float:
    """Rényi efficiency (Zouhar et al., 2023, *Tokenization and the Noiseless Channel*; METHODS TOK-4):
    ``E_α = H_α(p) / log₂ |V|`` over unigram token frequencies.

    ``|V|`` must be the tokenizer's **true** vocabulary size (types never emitted included), not the number
    of types seen. ``α = 2.5`` correlates best with BLEU in the paper; ``α → 1`` is Shannon efficiency.

    Args:
        counts: Unigram counts (sequence, array or mapping).
        alpha: Order ``α``.
        vocab_size: The true ``|V|`` (≥ 2).

    Examples:
        >>> round(renyi_efficiency([3, 2, 1, 1], 2.5, vocab_size=4), 5)
        0.82651
    """
    if vocab_size < 2:
        raise ValueError(f"vocab_size must be >= 2 (the true |V|), got {vocab_size}")
    return renyi_entropy(counts, alpha) / math.log2(vocab_size)


def unigram_entropy(counts: Any, *, base: float = 2.0) -> float:
    """Shannon entropy ``−Σ p_i log p_i`` of the unigram token distribution (bits for ``base=2``).

    Args:
        counts: Unigram counts.
        base: Logarithm base.

    Examples:
        >>> unigram_entropy([1, 1, 1, 1])
        2.0
    """
    return renyi_entropy(counts, 1.0) / math.log2(base)


def zipf_fit(counts: Any, *, min_count: int = 1, max_rank: int | None = None) -> dict[str, float]:
    """Least-squares line through ``(log rank, log frequency)`` (Zipf's law ``f ∝ r^−s``; METHODS TOK-7).

    Args:
        counts: Unigram counts (zeros ignored).
        min_count: Drop types seen fewer times (the noisy tail).
        max_rank: Fit only the ``max_rank`` most frequent types.

    Returns:
        ``{"exponent": s, "intercept": log10 f at rank 1, "r2": coefficient of determination, "n_types"}``.

    Examples:
        >>> r = zipf_fit([1000 / k for k in range(1, 50)])
        >>> round(r["exponent"], 6), round(r["r2"], 6)
        (1.0, 1.0)
    """
    if isinstance(counts, Mapping):
        counts = list(counts.values())
    c = np.sort(np.asarray(counts, dtype=np.float64).reshape(-1))[::-1]
    c = c[c >= max(min_count, 1e-300)]
    if max_rank is not None:
        c = c[:max_rank]
    if c.size < 2:
        raise ValueError("zipf_fit needs at least two types with counts >= min_count")
    x = np.log10(np.arange(1, c.size + 1))
    y = np.log10(c)
    slope, intercept = np.polyfit(x, y, 1)
    resid = y - (slope * x + intercept)
    ss = np.sum((y - y.mean()) ** 2)
    r2 = 1.0 - float(np.sum(resid**2) / ss) if ss > 0 else 1.0
    return {"exponent": float(-slope), "intercept": float(intercept), "r2": r2, "n_types": int(c.size)}


def token_innovation(ids: Any, *, n_points: int = 20) -> dict[str, Any]:
    """Type growth along a token stream: how fast new types appear (METHODS TOK-7).

    Returns the number of distinct types after each of ``n_points`` evenly spaced prefix lengths, the overall
    innovation rate ``#types / #tokens``, and the Heaps exponent ``β`` of ``#types ∝ #tokens^β`` (least
    squares in log-log over the points).

    Args:
        ids: The token stream (flat, in corpus order).
        n_points: Number of prefix lengths.

    Examples:
        >>> r = token_innovation([1, 1, 2, 1, 3, 3], n_points=3)
        >>> r["positions"], r["types"], r["rate"]
        ([2, 4, 6], [1, 2, 3], 0.5)
    """
    a = np.asarray(ids, dtype=np.int64).reshape(-1)
    if a.size == 0:
        raise ValueError("token_innovation needs a non-empty token stream")
    _, first = np.unique(a, return_index=True)
    new = np.zeros(a.size, dtype=np.int64)
    new[first] = 1
    cum = np.cumsum(new)
    k = max(1, min(n_points, a.size))
    pos = np.unique(np.ceil(np.arange(1, k + 1) * (a.size / k)).astype(np.int64))
    types = cum[pos - 1]
    beta = float("nan")
    if pos.size >= 2 and types[-1] > types[0]:
        beta = float(np.polyfit(np.log(pos), np.log(types), 1)[0])
    return {
        "positions": pos.tolist(),
        "types": types.tolist(),
        "rate": float(cum[-1] / a.size),
        "heaps_beta": beta,
    }


_CODECS = {
    "zlib": lambda b: zlib.compress(b, 6),
    "lzma": lambda b: lzma.compress(b, preset=6),
    "bz2": lambda b: bz2.compress(b, 9),
}


def compression_ratio(ids: Any, codec: str = "zlib", *, vocab_size: int | None = None) -> float:
    """Compressed size / raw size of a token stream (METHODS TOK-7): lower = more redundant.

    Ids are serialised little-endian at a fixed width: 2 bytes when ``vocab_size`` (or the largest id + 1)
    is at most 65,536, else 4 bytes.

    Args:
        ids: The token stream (flat).
        codec: ``"zlib"`` (level 6, its default), ``"lzma"`` (preset 6) or ``"bz2"`` (level 9).
        vocab_size: Sets the width; default from the largest id.

    Examples:
        >>> compression_ratio([7] * 10000) < 0.01
        True
    """
    if codec not in _CODECS:
        raise ValueError(f"unknown codec {codec!r}; choose one of {sorted(_CODECS)}")
    a = np.asarray(ids, dtype=np.int64).reshape(-1)
    if a.size == 0:
        raise ValueError("compression_ratio needs a non-empty token stream")
    v = vocab_size if vocab_size is not None else int(a.max()) + 1
    raw = a.astype("<u2" if v <= 65536 else "<u4").tobytes()
    return len(_CODECS[codec](raw)) / len(raw)


def digit_chunks(offsets: Any, data: bytes) -> list[list[int]]:
    """How tokens cut every maximal run of ASCII digits: per run, the digits in each token, left to right.

    Args:
        offsets: ``int[T, 2]`` token byte offsets into ``data`` (sorted, non-overlapping).
        data: The UTF-8 bytes.

    Examples:
        >>> # tokens "x 12", "3", "456", "7 9"
        >>> digit_chunks([[0, 4], [4, 5], [5, 8], [8, 10]], b"x 1234567 9")
        [[2, 1, 3, 1], [1]]
    """
    buf = np.frombuffer(bytes(data), dtype=np.uint8)
    isd = (buf >= 0x30) & (buf <= 0x39)
    pos = np.flatnonzero(isd)
    if pos.size == 0:
        return []
    o = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    o = o[o[:, 1] > o[:, 0]]
    tok = np.searchsorted(o[:, 0], pos, "right") - 1  # token holding each digit byte
    run = np.cumsum(np.r_[True, np.diff(pos) > 1])  # run id per digit byte
    change = np.r_[True, (np.diff(run) != 0) | (np.diff(tok) != 0)]
    starts = np.flatnonzero(change)
    lens = np.diff(np.r_[starts, pos.size])
    runs = run[starts]
    out: list[list[int]] = []
    for r in np.unique(runs):
        out.append(lens[runs == r].tolist())
    return out


def number_split_style(chunks: Sequence[Sequence[int]]) -> dict[str, Any]:
    """Classify how a tokenizer splits numbers, from :func:`digit_chunks`.

    Per digit run (of length ≥ 2): *left-to-right* chunking of width k (``k, k, ..., ≤ k``: GPT-4-style
    ``\\d{1,3}``), *right-to-left* (``≤ k, k, ..., k``: thousands-aligned), *single digits* (every chunk
    1), or neither (learned BPE merges). A run compatible with both directions (e.g. ``3, 3``) counts for both.

    Returns:
        ``style`` (``"single_digit"``, ``"ltr_k"``, ``"rtl_k"``, ``"learned"`` or ``"none"`` without numbers),
        ``max_digits_per_token``, ``digits_per_token`` histogram ``{k: share of chunks}``, ``share_ltr``,
        ``share_rtl`` (over runs), ``n_runs``.

    Args:
        chunks: Digits per token for each digit run.

    Examples:
        >>> number_split_style([[3, 3, 1], [3, 2], [1]])["style"]
        'ltr_3'
        >>> number_split_style([[1, 1, 1], [1, 1]])["style"]
        'single_digit'
    """
    runs = [list(map(int, c)) for c in chunks if sum(c) >= 2]
    flat = [x for c in chunks for x in c]
    if not flat:
        return {
            "style": "none",
            "max_digits_per_token": 0,
            "digits_per_token": {},
            "share_ltr": float("nan"),
            "share_rtl": float("nan"),
            "n_runs": 0,
        }
    k = max(flat)
    hist = {int(v): float(n) / len(flat) for v, n in zip(*np.unique(flat, return_counts=True), strict=True)}
    ltr = [all(x == k for x in c[:-1]) and c[-1] <= k for c in runs]
    rtl = [all(x == k for x in c[1:]) and c[0] <= k for c in runs]
    s_l = float(np.mean(ltr)) if runs else float("nan")
    s_r = float(np.mean(rtl)) if runs else float("nan")
    if k == 1:
        style = "single_digit"
    elif runs and s_l == 1.0 and s_r < 1.0:
        style = f"ltr_{k}"
    elif runs and s_r == 1.0 and s_l < 1.0:
        style = f"rtl_{k}"
    elif runs and s_l == 1.0 and s_r == 1.0:
        style = f"ltr_or_rtl_{k}"  # only ambiguous runs were seen (lengths that are multiples of k)
    else:
        style = "learned"
    return {
        "style": style,
        "max_digits_per_token": int(k),
        "digits_per_token": hist,
        "share_ltr": s_l,
        "share_rtl": s_r,
        "n_runs": len(runs),
    }


def morph_boundaries(morphemes: Sequence[str]) -> list[int]:
    """Gold morpheme boundaries as byte positions inside the word ``"".join(morphemes)``.

    Args:
        morphemes: The gold segmentation (e.g. ``["walk", "ing"]``).

    Examples:
        >>> morph_boundaries(["über", "all"])   # "ü" is two bytes
        [5]
    """
    cuts, p = [], 0
    for m in morphemes[:-1]:
        p += len(m.encode("utf-8"))
        cuts.append(p)
    return cuts


def morph_score(
    token_boundaries: Sequence[Sequence[int]],
    gold_boundaries: Sequence[Sequence[int]],
    *,
    mode: str = "single",
    n_tokens: Sequence[int] | None = None,
    include_single_token: bool = False,
) -> dict[str, Any]:
    """MorphScore (Arnett & Bergen, 2024; 70-language version, Arnett et al., 2025; METHODS TOK-5).

    Boundaries are **byte** positions inside each word (:func:`morph_boundaries`; token boundaries from
    byte offsets, TOK-1), interior only (not 0, not the word length).

    - ``mode="single"``: every word has exactly one gold boundary; a word scores 1 when a token boundary
      falls on it. Score = mean over words.
    - ``mode="recall"``: the share of all gold boundaries (pooled over words) that a token boundary hits.

    Words the tokenizer keeps as one token are skipped (they say nothing about boundary placement) unless
    ``include_single_token``; then they score 0.

    Args:
        token_boundaries: Per word, the byte positions where one token ends and the next starts.
        gold_boundaries: Per word, the gold morpheme boundaries.
        mode: ``"single"`` or ``"recall"``.
        n_tokens: Per word, the number of tokens (default: ``len(token_boundaries[i]) + 1``).
        include_single_token: Count one-token words (as misses) instead of skipping them.

    Returns:
        ``{"score", "n_words" (scored), "n_skipped", "n_boundaries", "hits"}``.

    Examples:
        >>> morph_score([[4], [2], []], [[4], [4], [4]])   # hit, miss, one-token word skipped
        {'score': 0.5, 'n_words': 2, 'n_skipped': 1, 'n_boundaries': 2, 'hits': 1}
    """
    if mode not in ("single", "recall"):
        raise ValueError(f"mode must be 'single' or 'recall', got {mode!r}")
    if len(token_boundaries) != len(gold_boundaries):
        raise ValueError(
            f"{len(token_boundaries)} tokenized words vs {len(gold_boundaries)} gold segmentations"
        )
    hits = nb = nw = skipped = 0
    for i, (tb, gb) in enumerate(zip(token_boundaries, gold_boundaries, strict=True)):
        nt = n_tokens[i] if n_tokens is not None else len(tb) + 1
        if mode == "single" and len(gb) != 1:
            raise ValueError(
                f"single mode needs exactly one gold boundary per word; word {i} has {len(gb)}: "
                "use mode='recall'"
            )
        if nt <= 1 and not include_single_token:
            skipped += 1
            continue
        t = set(int(x) for x in tb)
        h = sum(int(g) in t for g in gb)
        nw += 1
        if mode == "single":
            hits += h
            nb += 1
        else:
            hits += h
            nb += len(gb)
    score = hits / nb if nb else float("nan")
    return {"score": score, "n_words": nw, "n_skipped": skipped, "n_boundaries": nb, "hits": hits}


def vocab_param_ratio(model: Any) -> float:
    """Share of parameters in the vocabulary matrices (METHODS TOK-6): ``V·d (×2 if untied) / #params``.

    Args:
        model: A ``torch.nn.Module`` with ``get_input_embeddings()`` (a HF model) or a ``ModelAdapter``.

    Examples:
        >>> import tokensmith as ts
        >>> 0 < vocab_param_ratio(ts.tiny("llama")) < 1
        True
    """
    m = getattr(model, "model", model) if not hasattr(model, "get_input_embeddings") else model
    if not hasattr(m, "get_input_embeddings"):
        raise TypeError(f"vocab_param_ratio needs a HF model or a ModelAdapter, got {type(model).__name__}")
    emb = m.get_input_embeddings().weight
    vocab = emb.numel()
    out = m.get_output_embeddings() if hasattr(m, "get_output_embeddings") else None
    if (
        out is not None
        and getattr(out, "weight", None) is not None
        and out.weight.data_ptr() != emb.data_ptr()
    ):
        vocab += out.weight.numel()
    seen: set[int] = set()
    total = 0
    for p in m.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel()
    return vocab / total


# ---------------------------------------------------------------------------------------------- wrappers


@dataclass
class EncodedCorpus:
    """Texts encoded through a :class:`~tokensmith.tokenization.view.TokenizerView`, flattened for numpy.

    Attributes:
        ids: ``int64[T]`` all token ids, text after text.
        offsets: ``int64[T, 2]`` byte offsets of each token inside its own text.
        text_index: ``int64[N + 1]``: tokens of text ``i`` are ``ids[text_index[i]:text_index[i + 1]]``.
        n_bytes: ``int64[N]`` UTF-8 length of each text.
        n_chars: ``int64[N]`` length of each text in code points.
        texts: The texts.
        vocab_size: The tokenizer's true ``|V|``.
        unk_ids: UNK id(s).
        byte_mask: ``bool[V]`` byte-fallback ids.
        special_ids: Control/special ids.
        family: ``view.family``.
        lossless: ``view.lossless``.
    """

    ids: np.ndarray
    offsets: np.ndarray
    text_index: np.ndarray
    n_bytes: np.ndarray
    n_chars: np.ndarray
    texts: list[str]
    vocab_size: int
    unk_ids: list[int] = field(default_factory=list)
    byte_mask: np.ndarray | None = None
    special_ids: list[int] = field(default_factory=list)
    family: str = ""
    lossless: bool = True

    @property
    def lengths(self) -> np.ndarray:
        """Tokens per text."""
        return np.diff(self.text_index)

    def __len__(self) -> int:
        return len(self.texts)

    def select(self, start: int, stop: int) -> EncodedCorpus:
        """Texts ``start:stop`` (e.g. one language of a corpus encoded in one call)."""
        if not 0 <= start <= stop <= len(self.texts):
            raise IndexError(f"select({start}, {stop}) out of range for {len(self.texts)} texts")
        a, b = int(self.text_index[start]), int(self.text_index[stop])
        return EncodedCorpus(
            ids=self.ids[a:b],
            offsets=self.offsets[a:b],
            text_index=self.text_index[start : stop + 1] - a,
            n_bytes=self.n_bytes[start:stop],
            n_chars=self.n_chars[start:stop],
            texts=self.texts[start:stop],
            vocab_size=self.vocab_size,
            unk_ids=self.unk_ids,
            byte_mask=self.byte_mask,
            special_ids=self.special_ids,
            family=self.family,
            lossless=self.lossless,
        )


def _as_view(tokenizer: Any) -> Any:
    """A view of ``tokenizer`` (shared per tokenizer object through ``TokenizerView.of``)."""
    return TokenizerView.of(tokenizer)


_VIEW_INFO: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _view_info(view: Any) -> dict[str, Any]:
    """Per-view arrays, computed once: token byte lengths, UNK ids, byte-fallback mask, special ids."""
    info = _VIEW_INFO.get(view)
    if info is None:
        classes = [view.special_class(i) for i in range(view.vocab_size)]
        info = {
            "vocab_buf": np.frombuffer(b"".join(view.all_token_bytes), dtype=np.uint8),
            "tb_len": np.fromiter(
                (len(b) for b in view.all_token_bytes), dtype=np.int64, count=view.vocab_size
            ),
            "unk_ids": [i for i, c in enumerate(classes) if c == "unk"],
            "byte_mask": np.array([c == "byte" for c in classes], dtype=bool),
            "special_ids": sorted(view.special_ids),
        }
        info["vocab_start"] = np.r_[0, np.cumsum(info["tb_len"])[:-1]].astype(np.int64)
        _VIEW_INFO[view] = info
    return info


def _ids_function(view: Any) -> Any:
    """The view's batched ids-only encoder (no offsets, no per-token Python), or None."""
    fn = getattr(view, "encode_ids", None)
    if fn is not None:
        return fn
    raw = getattr(view, "_encode_ids", None)  # older views: the same encoder under its private name
    return None if raw is None else (lambda texts: raw(list(texts), False))


def encode_corpus(
    tokenizer: Any,
    texts: Sequence[str],
    *,
    batch_size: int = 2048,
    progress: bool = True,
    desc: str = "encode",
) -> EncodedCorpus:
    """Encode ``texts`` with exact byte offsets, one batched call per ``batch_size`` texts (tqdm bar).

    Offsets are the view's (:meth:`TokenizerView.encode_batch`). Where a text's token bytes concatenate to
    exactly its UTF-8 bytes, the view's offsets are the cumulative token byte lengths, so they are computed
    here in numpy from ids alone (one batched ids-only encode); every other text (a SentencePiece dummy
    prefix, bytes the tokenizer drops, normalisation) is re-encoded through ``view.encode_batch``. WordPiece
    (lossy) always goes through ``view.encode_batch`` (offsets from the tokenizer's character alignment).

    Args:
        tokenizer: A tokenizer :class:`~tokensmith.tokenization.view.TokenizerView` accepts, or a view.
        texts: The texts (``str``; lone surrogates raise ``ValueError``).
        batch_size: Texts per batched encode call.
        progress: Show a progress bar.
        desc: Progress-bar label.

    Raises:
        ValueError: When ``texts`` is empty, or a text is not valid UTF-8 (lone surrogates).
        TypeError: When a text is not a ``str``.
    """
    from tqdm.auto import tqdm

    texts = list(texts)
    if not texts:
        raise ValueError("encode_corpus got no texts (empty corpus)")
    view = _as_view(tokenizer)
    info = _view_info(view)
    tb_len = info["tb_len"]
    datas = utf8_encode(texts)
    n_bytes = np.fromiter((len(d) for d in datas), dtype=np.int64, count=len(datas))
    n_chars = np.fromiter((len(t) for t in texts), dtype=np.int64, count=len(texts))
    ids_fn = _ids_function(view) if view.family != "wordpiece" else None
    vocab_buf, vocab_start = info["vocab_buf"], info["vocab_start"]
    ids_parts: list[np.ndarray] = []
    off_parts: list[np.ndarray] = []
    len_parts: list[np.ndarray] = []
    bar = tqdm(total=len(texts), desc=desc, disable=not progress, leave=False)
    for k in range(0, len(texts), batch_size):
        chunk = texts[k : k + batch_size]
        if ids_fn is not None:
            id_lists = ids_fn(chunk)
            lens = np.fromiter((len(x) for x in id_lists), dtype=np.int64, count=len(id_lists))
            ids = np.fromiter(itertools.chain.from_iterable(id_lists), dtype=np.int64, count=int(lens.sum()))
            tl = tb_len[ids]
            cz = np.r_[0, np.cumsum(tl)]
            tix = np.r_[0, np.cumsum(lens)]
            end = cz[1:] - np.repeat(cz[tix[:-1]], lens)
            offs = np.stack([end - tl, end], axis=1)
            # cumulative offsets are exact where the token bytes ARE the text (the view's own rule): same
            # length per text, then a byte-wise comparison of the aligned concatenations
            ok = cz[tix[1:]] - cz[tix[:-1]] == n_bytes[k : k + len(chunk)]
            good = np.flatnonzero(ok)
            sel = ids[np.repeat(ok, lens)]
            sel_len = tb_len[sel]
            # gather the selected tokens' bytes from the flat vocabulary buffer (no per-token Python)
            pos = np.arange(int(sel_len.sum()), dtype=np.int64)
            pos += np.repeat(vocab_start[sel] - (np.cumsum(sel_len) - sel_len), sel_len)
            tok_buf = vocab_buf[pos]
            dat_buf = np.frombuffer(b"".join([datas[k + j] for j in good.tolist()]), dtype=np.uint8)
            cn = np.r_[0, np.cumsum(tok_buf != dat_buf)]
            bz = np.r_[0, np.cumsum(n_bytes[k + good])]
            ok[good[cn[bz[1:]] - cn[bz[:-1]] > 0]] = False
            bad = np.flatnonzero(~ok)
            if bad.size:  # not the cumulative case: take the view's own offsets for those texts
                for j, e in zip(
                    bad.tolist(), view.encode_batch([chunk[j] for j in bad.tolist()]), strict=True
                ):
                    if len(e.ids) != lens[j]:
                        raise RuntimeError("the view's ids-only and full encodings disagree; report this")
                    offs[tix[j] : tix[j + 1]] = np.asarray(e.offsets, dtype=np.int64).reshape(-1, 2)
        else:
            encs = view.encode_batch(chunk)
            lens = np.fromiter((len(e.ids) for e in encs), dtype=np.int64, count=len(encs))
            ids = np.fromiter(
                itertools.chain.from_iterable(e.ids for e in encs), dtype=np.int64, count=int(lens.sum())
            )
            offs = np.fromiter(
                itertools.chain.from_iterable(x for e in encs for x in e.offsets),
                dtype=np.int64,
                count=2 * int(lens.sum()),
            ).reshape(-1, 2)
        ids_parts.append(ids)
        off_parts.append(offs)
        len_parts.append(lens)
        bar.update(len(chunk))
    bar.close()
    return EncodedCorpus(
        ids=np.concatenate(ids_parts),
        offsets=np.concatenate(off_parts).reshape(-1, 2),
        text_index=np.r_[0, np.cumsum(np.concatenate(len_parts))].astype(np.int64),
        n_bytes=n_bytes,
        n_chars=n_chars,
        texts=texts,
        vocab_size=view.vocab_size,
        unk_ids=info["unk_ids"],
        byte_mask=info["byte_mask"],
        special_ids=info["special_ids"],
        family=view.family,
        lossless=bool(view.lossless),
    )


def _global_offsets(enc: EncodedCorpus) -> tuple[np.ndarray, np.ndarray, bytes]:
    """Token offsets shifted into one concatenated byte buffer (texts joined by one ``\\n``)."""
    base = np.r_[0, np.cumsum(enc.n_bytes + 1)[:-1]].astype(np.int64)
    per_tok = np.repeat(base, enc.lengths)
    return enc.offsets + per_tok[:, None], base, "\n".join(enc.texts).encode("utf-8")


def _corpus_words(enc: EncodedCorpus) -> tuple[np.ndarray, np.ndarray]:
    """:func:`word_spans` of every text at once, as byte spans in the joined buffer (``\\n`` never joins
    two words)."""
    cp = _code_points("\n".join(enc.texts))
    cs, is_char = _units(cp)
    return _char_to_byte_cp(cp)[cs], is_char


def corpus_metrics(
    enc: EncodedCorpus,
    *,
    alphas: Sequence[float] = (1.0, 2.5, 3.0),
    baseline_lengths: Any = None,
    codecs: Sequence[str] = ("zlib",),
) -> dict[str, Any]:
    """Every metric of one encoded corpus (one tokenizer, one language or a mix).

    Keys: ``tokens``, ``texts``, ``words`` (units), ``chars``, ``bytes``, ``fertility``, ``char_unit_share``
    (share of units that are no-space-script characters), ``pcw``, ``bytes_per_token``, ``chars_per_token``,
    ``unk_rate``, ``byte_fallback_rate``, ``partial_char_rate``, ``renyi_<α>`` (efficiency, true ``|V|``),
    ``unigram_entropy`` (bits), ``zipf_exponent``, ``zipf_r2``, ``innovation_rate``, ``heaps_beta``,
    ``types``, ``unused_vocab_share`` (specials excluded), ``compression_<codec>``, ``number_style`` (dict),
    ``nsl`` (when ``baseline_lengths`` is given).

    Args:
        enc: The output of :func:`encode_corpus`.
        alphas: Rényi orders to report.
        baseline_lengths: Token counts of the same texts under a baseline tokenizer (for NSL).
        codecs: Codecs for :func:`compression_ratio`.
    """
    goff, _, buf = _global_offsets(enc)
    spans, is_char = _corpus_words(enc)
    tpw = tokens_per_word(goff, spans)
    counts = np.bincount(enc.ids, minlength=enc.vocab_size)
    n_tok = int(enc.ids.size)
    out: dict[str, Any] = {
        "texts": len(enc),
        "tokens": n_tok,
        "words": int(spans.shape[0]),
        "chars": int(enc.n_chars.sum()),
        "bytes": int(enc.n_bytes.sum()),
        "fertility": fertility(tpw, None) if tpw.size else float("nan"),
        "char_unit_share": float(is_char.mean()) if is_char.size else float("nan"),
        "pcw": continued_word_ratio(tpw) if tpw.size else float("nan"),
        "bytes_per_token": float(enc.n_bytes.sum() / max(n_tok, 1)),
        "chars_per_token": float(enc.n_chars.sum() / max(n_tok, 1)),
        "unk_rate": unk_rate(enc.ids, enc.unk_ids),
        "byte_fallback_rate": byte_fallback_rate(enc.ids, enc.byte_mask)
        if enc.byte_mask is not None
        else 0.0,
        "partial_char_rate": partial_char_rate(goff, buf),
        "vocab_size": enc.vocab_size,
    }
    if n_tok == 0:
        return out
    for a in alphas:
        out[f"renyi_{a:g}"] = renyi_efficiency(counts, a, vocab_size=enc.vocab_size)
    out["unigram_entropy"] = unigram_entropy(counts)
    if np.count_nonzero(counts) >= 2:
        z = zipf_fit(counts)
        out["zipf_exponent"], out["zipf_r2"] = z["exponent"], z["r2"]
    inn = token_innovation(enc.ids)
    out["innovation_rate"], out["heaps_beta"] = inn["rate"], inn["heaps_beta"]
    out["types"] = int(np.count_nonzero(counts))
    out["unused_vocab_share"] = unused_vocab_share(counts, enc.vocab_size, exclude=enc.special_ids)
    for c in codecs:
        out[f"compression_{c}"] = compression_ratio(enc.ids, c, vocab_size=enc.vocab_size)
    out["number_style"] = number_split_style(digit_chunks(goff, buf))
    if baseline_lengths is not None:
        out["nsl"] = normalized_sequence_length(enc.lengths, baseline_lengths)
    return out


def measure(
    tokenizer: Any,
    texts: Sequence[str],
    *,
    baseline: Any = None,
    batch_size: int = 2048,
    progress: bool = True,
    **kwargs: Any,
) -> dict[str, Any]:
    """:func:`encode_corpus` + :func:`corpus_metrics`; ``baseline`` (a tokenizer) adds NSL.

    Args:
        tokenizer: The tokenizer under study.
        texts: The texts.
        baseline: A baseline tokenizer for NSL (optional).
        batch_size: Texts per batched encode call.
        progress: Show a progress bar.
        **kwargs: Passed to :func:`corpus_metrics`.

    Examples:
        >>> from tokensmith.models.zoo import smollm2_tokenizer
        >>> m = measure(smollm2_tokenizer(), ["Hello world", "The weather is nice."], progress=False)
        >>> m["tokens"], m["words"], round(m["fertility"], 4)   # "." is its own token, not its own word
        (7, 6, 1.1667)
    """
    enc = encode_corpus(tokenizer, texts, batch_size=batch_size, progress=progress)
    if baseline is not None:
        kwargs["baseline_lengths"] = encode_corpus(
            baseline, texts, batch_size=batch_size, progress=progress
        ).lengths
    return corpus_metrics(enc, **kwargs)


def compression(
    tokenizer: Any, texts: Sequence[str], ref_tokenizer: Any = None, *, progress: bool = True
) -> dict[str, float]:
    """Compression of ``texts`` (METHODS TOK-2): bytes/token, chars/token, NSL vs ``ref_tokenizer``.

    Args:
        tokenizer: The tokenizer under study.
        texts: The texts.
        ref_tokenizer: The NSL baseline (optional).
        progress: Show a progress bar.
    """
    enc = encode_corpus(tokenizer, texts, progress=progress)
    n = max(int(enc.ids.size), 1)
    out = {
        "bytes_per_token": float(enc.n_bytes.sum() / n),
        "chars_per_token": float(enc.n_chars.sum() / n),
        "tokens": int(enc.ids.size),
    }
    if ref_tokenizer is not None:
        out["nsl"] = normalized_sequence_length(
            enc.lengths, encode_corpus(ref_tokenizer, texts, progress=progress).lengths
        )
    return out


def morph_score_tokenizer(
    tokenizer: Any,
    gold: Sequence[tuple[str, Sequence[str]]] | Mapping[str, Sequence[str]],
    *,
    mode: str = "single",
    prefix_space: bool = True,
    include_single_token: bool = False,
) -> dict[str, Any]:
    """MorphScore of a tokenizer on gold segmentations ``[(word, [morphemes]), ...]`` (:func:`morph_score`).

    Each word is encoded on its own, after one space when ``prefix_space`` (the mid-sentence form that
    byte-level and SentencePiece vocabularies store); token boundaries are byte offsets from the view,
    shifted to the word (the space is not part of the word).

    Args:
        tokenizer: A tokenizer the view accepts.
        gold: ``(word, morphemes)`` pairs or a mapping word -> morphemes; ``"".join(morphemes) == word``.
        mode: ``"single"`` or ``"recall"``.
        prefix_space: Encode ``" " + word``.
        include_single_token: Score one-token words (as misses) instead of skipping them.

    Raises:
        ValueError: When a segmentation does not spell its word.
    """
    items = list(gold.items()) if isinstance(gold, Mapping) else list(gold)
    for w, ms in items:
        if "".join(ms) != w:
            raise ValueError(f"gold segmentation {list(ms)} does not spell {w!r}; fix or drop the entry")
    view = _as_view(tokenizer)
    pre = " " if prefix_space else ""
    encs = view.encode_batch([pre + w for w, _ in items])
    shift = len(pre.encode())
    tbs, nts = [], []
    for (w, _), e in zip(items, encs, strict=True):
        n = len(w.encode())
        ends = [b - shift for _, b in e.offsets[:-1] if 0 < b - shift < n]
        tbs.append(sorted(set(ends)))
        nts.append(sum(1 for s, b in e.offsets if b > s and b - shift > 0))
    return morph_score(
        tbs,
        [morph_boundaries(ms) for _, ms in items],
        mode=mode,
        n_tokens=nts,
        include_single_token=include_single_token,
    )
