"""Exact byte-level probabilities from a tokenized LM, byte sampling and cross-tokenizer ensembles.

METHODS.md TOK-14 and DEC-2, after *Exact Byte-Level Probabilities from Tokenized Language Models for
FIM-Tasks and Model Ensembles* (Phan et al., the Byte-Token Representation Lemma) and *Understanding and
Mitigating Tokenization Bias in Language Models* (Phan et al.). Reimplemented from the papers' equations
(the reference code is CC-BY-NC and SentencePiece-only; this module handles byte-level BPE).

**The cover set.** A token LM defines a distribution over token sequences; the text it describes is the
byte string of the canonical encodings. For bytes ``x`` the *cover* is

    cover(x) = { canonical T = t_1..t_k : decode(t_1..t_{k-1}) is a proper prefix of x,
                 and x is a prefix of decode(T) },

and (Byte-Token Representation Lemma) ``P(x) = Σ_{T ∈ cover(x)} P(T)`` is the probability that the
text *starts with* ``x``. The next-byte distribution is ``P(b | x) = P(xb) / P(x)``. Every string that
extends ``x`` has exactly one member of ``cover(x)`` as a prefix of its encoding, which is why the sum
needs no end-of-text: prefix probabilities are probabilities of events "the text starts with x" and hold
in an EOS-free setting.

**How it is computed** (one shared computation for all 256 next bytes):

- only the *tail* ``q = x[s:]`` after the start ``s`` of the last pre-token of ``x`` varies: every cover
  member starts with the *fixed* tokens, those of ``enc(x)`` before ``s`` (their forward runs once and
  the KV cache is reused across calls, extended incrementally when the fixed part grows);
- per split ``i`` of the tail, the last token ranges over ``supertokens(q[i:])`` (the view's byte-prefix
  index) and is kept when ``canon(q[:i] + bytes(t))`` ends with ``t``; the tokens before it are the left
  context ``L`` (usually ``canon(q[:i])``, but what follows can change it: a run of spaces gives its last
  space to a following word). Each distinct ``(i, L)`` is one row; all rows run as one batch on the
  cached prefix;
- the split ``i = len(q)`` is ``T_0``, a tokenization of ``x`` itself: every token ``t`` that may follow
  it contributes to the byte ``first_byte(t)`` (the view's ``first_byte``);
- ``P(xb)`` for all ``b`` is then a scatter-add of the row probabilities over the byte each candidate
  token puts at position ``len(x)``.

Choices and approximations (all documented in the guide):

- *Canonicality on bytes.* ``canon`` is the tokenizer's own encode on valid UTF-8 (a token sequence is
  valid when it is the encoding of its own decoding). A string that ends inside a UTF-8 character cannot
  be encoded as text: it is completed with representative characters (every value of the next byte, the
  remaining bytes 0x80 or 0xBF: exhaustive for 2-byte characters) and every tokenization with a token
  boundary exactly at its end counts (:func:`canonical_options`).
- *The pre-token boundary.* Tokens never cross pre-tokens, and the start of the last pre-token of ``x``
  is assumed to stay a pre-token boundary in every extension of ``x`` and the fixed tokens are those of
  ``enc(x)`` before it; checked on every prefix of real text in the tests (``lookback=2`` widens the
  varying tail to the last two pre-tokens if a pre-tokenizer violates it). The tail is encoded without
  the fixed part in front of it (the pre-tokenizers here scan left to right, looking ahead only).
- *Continuations of T_0* (``t0_check``): ``"exact"`` checks that ``canon(q + bytes(t))`` ends with ``t``
  for every token (one batched encode of |V| strings per distinct tail, cached); ``"pair"`` checks the pair
  ``canon(bytes(a) + bytes(t)) == [a, t]`` with ``a`` the last token of ``T_0`` (2-local BPE validity,
  cached per ``a``, so a generation step reuses it), except after a tail that ends in whitespace (a
  space before a word is re-split, so ``T_0`` is not unique there: exact, cached per tail). ``"auto"``:
  exact for |V| <= 8192, else pair.
- *Normalisation.* A real model puts some mass on non-canonical token sequences and on special tokens
  (EOS, chat markers). ``P(b|x)`` is normalised over the 256 bytes (``Σ_b P(xb)``), i.e. conditioned on
  the text continuing with a canonical token; :attr:`ByteLM.last_info` reports ``continue_mass =
  Σ_b P(xb) / P(x)``.
- *Context.* The text starts after ``context_ids`` (default: the tokenizer's automatic BOS, else
  ``<|endoftext|>``, else EOS): a document boundary, as in pre-training.

Examples:
    >>> import tokensmith as ts
    >>> from tokensmith.tokenization.bytes import ByteLM
    >>> blm = ByteLM(ts.tiny("llama"))
    >>> p = blm.next_byte_distribution(b"Hello wor")
    >>> p.shape, abs(float(p.sum()) - 1) < 1e-5, blm.prefix_prob(b"")
    (torch.Size([256]), True, 1.0)
"""

from __future__ import annotations

import codecs
import gc
import math
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from tokensmith.tokenization.view import TokenizerView

__all__ = [
    "ByteEnsemble",
    "ByteGeneration",
    "ByteLM",
    "TokenizationBias",
    "byte_ensemble",
    "byte_generate",
    "canonical_options",
    "split_incomplete_utf8",
    "tokenization_bias",
]


def split_incomplete_utf8(data: bytes) -> tuple[str, bytes] | None:
    """Split ``data`` into its decodable text and a trailing incomplete UTF-8 character.

    Returns ``(text, pending)`` where ``text.encode() + pending == data`` and ``pending`` is empty or the
    first 1-3 bytes of a character; ``None`` when ``data`` is not a prefix of any valid UTF-8 string.

    Examples:
        >>> split_incomplete_utf8("é".encode() + b"\\xf0\\x9f")
        ('é', b'\\xf0\\x9f')
        >>> split_incomplete_utf8(b"a\\xffb") is None
        True
    """
    data = bytes(data)
    try:
        return data.decode("utf-8"), b""
    except UnicodeDecodeError:
        pass
    dec = codecs.getincrementaldecoder("utf-8")()
    try:
        text = dec.decode(data, final=False)
    except UnicodeDecodeError:
        return None
    n = len(text.encode("utf-8"))
    return text, bytes(data[n:])


class _Canon:
    """Canonical token sequences of byte strings (see :func:`canonical_options`)."""

    def __init__(self, view: TokenizerView) -> None:
        if view.family != "byte_bpe":
            raise ValueError(
                f"byte-level probabilities are implemented for byte-level BPE tokenizers (GPT-2 / Llama-3 / "
                f"SmolLM2 style); this tokenizer is {view.family!r}. SentencePiece and WordPiece are not supported."
            )
        self.view = view

    def ids(self, texts: Sequence[str]) -> list[list[int]]:
        if len(texts) == 1 and not texts[0]:
            return [[]]
        return self.view.encode_ids(texts)

    def options(self, datas: Sequence[bytes], quick: bool = False) -> list[list[tuple[int, ...]]]:
        """Canonical options per byte string; ``quick`` completes an incomplete last character with 4
        representatives only (a subset: every option found is an option)."""
        gc_on = gc.isenabled()
        gc.disable()  # tens of thousands of small lists: the cyclic GC would rescan them repeatedly
        try:
            return self._options(datas, quick)
        finally:
            if gc_on:
                gc.enable()

    def _options(self, datas: Sequence[bytes], quick: bool) -> list[list[tuple[int, ...]]]:
        out: list[list[tuple[int, ...]]] = [[] for _ in datas]
        texts: list[str] = []
        plan: list[tuple[int, int, int]] = []  # (item, text index, bytes the option must cover; 0: all)
        for k, d in enumerate(datas):
            if not d:
                out[k] = [()]
                continue
            sp = split_incomplete_utf8(d)
            if sp is None:
                continue  # invalid UTF-8 inside: no text decodes to it
            text, pend = sp
            if not pend:
                plan.append((k, len(texts), 0))
                texts.append(text)
                continue
            for c in _completions(pend, quick):  # the character that completes `pend` decides the tokenization
                plan.append((k, len(texts), len(d)))
                texts.append(text + c)
        ids = self.ids(texts)
        tb = self.view.all_token_bytes
        for k, j, n in plan:
            seq = ids[j]
            if n:  # keep the tokens that end exactly at the end of the data, if a token boundary is there
                pos, cut = 0, -1
                for m, i in enumerate(seq):
                    pos += len(tb[i])
                    if pos >= n:
                        cut = m + 1 if pos == n else -1
                        break
                if cut < 0:
                    continue
                seq = seq[:cut]
            opt = tuple(seq)
            if opt not in out[k]:
                out[k].append(opt)
        return out


def _utf8_len(lead: int) -> int:
    return 2 if 0xC2 <= lead <= 0xDF else 3 if 0xE0 <= lead <= 0xEF else 4 if 0xF0 <= lead <= 0xF4 else 0


def _completions(pend: bytes, quick: bool = False) -> list[str]:
    """Representative characters starting with the incomplete UTF-8 sequence ``pend``: every value of the
    next byte, the remaining bytes 0x80 or 0xBF (at most 128 characters, covering the scripts and
    character classes a lead byte can start); ``quick``: next byte 0x80 or 0xBF only."""
    need = _utf8_len(pend[0])
    rest = need - len(pend) - 1
    out: list[str] = []
    for b in (0x80, 0x90, 0xA0, 0xBF) if quick else range(0x80, 0xC0):
        for fill in (b"\x80", b"\xbf") if rest > 0 else (b"",):
            try:
                c = (pend + bytes([b]) + fill * rest).decode("utf-8")
            except UnicodeDecodeError:
                continue
            if c not in out:
                out.append(c)
    return out


def canonical_options(view: TokenizerView, data: bytes) -> list[tuple[int, ...]]:
    """The canonical tokenization(s) of a byte string that may end inside a UTF-8 character.

    Valid UTF-8 has exactly one (the tokenizer's own encode). When ``data`` ends with an incomplete
    character, the character that completes it decides the pre-tokenization (letter, digit, symbol,
    space) and the merges, so ``data`` is completed with representative characters (every value of the
    next byte, the remaining bytes 0x80 or 0xBF) and each tokenization that has a token boundary exactly at
    ``len(data)`` contributes the tokens before it. ``[]`` when ``data`` is not a prefix of valid UTF-8.

    Examples:
        >>> from tokensmith.models.zoo import smollm2_tokenizer
        >>> view = TokenizerView(smollm2_tokenizer())
        >>> canonical_options(view, b" hello") == [tuple(view.encode(" hello").ids)]
        True
        >>> len(canonical_options(view, " caf\\u00e9".encode()[:-1])) >= 1
        True
    """
    return _Canon(view).options([bytes(data)])[0]


@dataclass
class _Prefix:
    ids: tuple[int, ...]
    cache: Any
    last: torch.Tensor  # [V] float32 log p(next | ids)


@dataclass
class _Row:
    split: int
    left: tuple[int, ...]
    logp: float = 0.0  # log P(left | context + fixed)
    dist: torch.Tensor | None = None  # [V] log p(next token | ... left)


@dataclass
class _Cover:
    data: bytes
    fixed: tuple[int, ...]
    tail: bytes
    rows: list[_Row]
    prefix: _Prefix
    cands: list[np.ndarray] = field(default_factory=list)  # valid last tokens per row (T_0 rows: all valid ids)


def _default_context(tokenizer: Any) -> list[int]:
    try:
        ids = list(tokenizer("", add_special_tokens=True)["input_ids"])
    except Exception:  # pragma: no cover - exotic tokenizers
        ids = []
    if ids:
        return ids
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    if "<|endoftext|>" in vocab:
        return [int(vocab["<|endoftext|>"])]
    for name in ("eos_token_id", "bos_token_id"):
        v = getattr(tokenizer, name, None)
        if isinstance(v, int):
            return [v]
    raise ValueError("the tokenizer has no BOS/EOS/<|endoftext|> token: pass ByteLM(adapter, context_ids=[...])")


class ByteLM:
    """A tokenized causal LM seen as a byte-level LM: exact prefix and next-byte probabilities (TOK-14).

    ``P(x) = Σ_{T ∈ cover(x)} P(T)`` and ``P(b | x) = P(xb) / Σ_b' P(xb')`` (see the module docstring for
    the cover set, the computation and every approximation).

    Args:
        adapter: A :class:`tokensmith.models.ModelAdapter` of a causal LM with a byte-level BPE tokenizer.
        context_ids: Token ids the text follows (default: the tokenizer's automatic BOS, else
            ``<|endoftext|>``, else EOS). Prefix probabilities are conditional on them.
        lookback: Number of trailing pre-tokens whose tokenization varies (1: the last pre-token).
        t0_check: How continuations of ``enc(x)`` are checked: ``"exact"``, ``"pair"`` or ``"auto"``
            (exact for vocabularies up to 8192 tokens).
        max_batch_size: Rows (tail splits) per forward; None chooses so that rows × cached prefix length
            stays under 4096 positions (the row caches are materialised).
        cache_size: Distinct left contexts whose candidate-validity results are kept (LRU).

    Examples:
        >>> import tokensmith as ts
        >>> blm = ByteLM(ts.tiny("llama"))
        >>> lp = blm.log_prefix_prob(b"The cat")
        >>> lp <= blm.log_prefix_prob(b"The ca") + 1e-6
        True
    """

    def __init__(
        self,
        adapter: Any,
        *,
        context_ids: Sequence[int] | None = None,
        lookback: int = 1,
        t0_check: str = "auto",
        max_batch_size: int | None = None,
        cache_size: int = 256,
    ) -> None:
        if not getattr(adapter, "is_causal", False):
            raise ValueError("ByteLM needs a causal LM adapter (ts.load(...) of a decoder model)")
        if lookback < 1:
            raise ValueError(f"lookback must be >= 1, got {lookback}")
        if t0_check not in ("auto", "exact", "pair"):
            raise ValueError(f"t0_check must be 'auto', 'exact' or 'pair', got {t0_check!r}")
        self.adapter = adapter
        self.view = TokenizerView.of(adapter.tokenizer)
        self._canon = _Canon(self.view)
        self.context_ids = tuple(int(i) for i in (context_ids if context_ids is not None else _default_context(adapter.tokenizer)))
        if not self.context_ids:
            raise ValueError("context_ids must hold at least one token (the model needs a position to predict from)")
        self.lookback = int(lookback)
        self.max_batch_size = max_batch_size
        V = self.view.vocab_size
        self.t0_check = ("exact" if V <= 8192 else "pair") if t0_check == "auto" else t0_check
        self._cache_size = int(cache_size)
        self._valid_cache: OrderedDict[Any, Any] = OrderedDict()  # left bytes -> {t: lefts}; ("pair", a) -> ids
        self._prefix_state: _Prefix | None = None
        tb = self.view.all_token_bytes
        self._tb = tb
        self._len = np.array([len(b) for b in tb], dtype=np.int64)
        L = max(1, self.view.max_token_bytes)
        mat = np.full((V, L), -1, dtype=np.int16)
        for i, b in enumerate(tb):
            if b:
                mat[i, : len(b)] = np.frombuffer(b, dtype=np.uint8)
        self._bytemat = mat
        specials = np.zeros(V, dtype=bool)
        specials[list(self.view.special_ids)] = True
        self._nonspecial = ~specials & (self._len > 0)
        self.last_info: dict[str, Any] = {}

    # ------------------------------------------------------------------ model calls
    def _vocab_limit(self, logits_v: int) -> int:
        return min(self.view.vocab_size, logits_v)

    def _prefix(self, ids: tuple[int, ...]) -> _Prefix:
        """Cached forward of ``context + fixed`` (extended incrementally when ``ids`` grows)."""
        from tokensmith.models import kvcache

        st = self._prefix_state
        dev = self.adapter.device
        with torch.no_grad():
            if st is not None and len(ids) >= len(st.ids) and ids[: len(st.ids)] == st.ids:
                new = ids[len(st.ids):]
                if not new:
                    return st
                out = kvcache.extend(
                    self.adapter, kvcache.expand(st.cache, 1), len(st.ids),
                    torch.tensor([list(new)], dtype=torch.long, device=dev), logits_to_keep=1,
                )
            else:
                out = self.adapter.forward(
                    torch.tensor([list(ids)], dtype=torch.long, device=dev), use_cache=True, logits_to_keep=1
                )
        cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
        if cache is None:
            raise ValueError("this model returned no KV cache; ByteLM needs use_cache support")
        last = torch.log_softmax(out.logits[0, -1].float(), -1).cpu()
        self._prefix_state = _Prefix(ids, cache, last)
        return self._prefix_state

    def _fixed_logprob(self, ids: tuple[int, ...]) -> float:
        """log P(fixed tokens | context) (a separate scoring forward; only prefix_prob needs it)."""
        n_ctx = len(self.context_ids)
        if len(ids) == n_ctx:
            return 0.0
        t = torch.tensor([list(ids)], dtype=torch.long)
        mask = torch.zeros_like(t, dtype=torch.bool)
        mask[0, n_ctx:] = True
        lp = self.adapter.token_logprobs(t, mask)
        return float(lp[0, n_ctx:].double().sum())

    def _run_rows(self, prefix: _Prefix, rows: list[_Row]) -> None:
        from tokensmith.models import kvcache

        P = len(prefix.ids)
        todo = [r for r in rows if r.left]
        for r in rows:
            if not r.left:
                r.logp, r.dist = 0.0, prefix.last
        if not todo:
            return
        bs = self.max_batch_size or max(1, 4096 // max(P, 1))
        dev = self.adapter.device
        for s in range(0, len(todo), bs):
            chunk = todo[s : s + bs]
            Lmax = max(len(r.left) for r in chunk)
            ids = torch.zeros(len(chunk), Lmax, dtype=torch.long)
            for k, r in enumerate(chunk):
                ids[k, : len(r.left)] = torch.tensor(r.left)
            with torch.no_grad():  # right padding: causal attention keeps real positions exact
                out = kvcache.extend(self.adapter, kvcache.expand(prefix.cache, len(chunk)), P, ids.to(dev))
            logp = torch.log_softmax(out.logits.float(), -1).cpu()
            for k, r in enumerate(chunk):
                n = len(r.left)
                tok = torch.tensor(r.left)
                lp = float(prefix.last[tok[0]].double())
                if n > 1:
                    lp += float(logp[k, torch.arange(n - 1), tok[1:]].double().sum())
                r.logp, r.dist = lp, logp[k, n - 1]

    # ------------------------------------------------------------------ validity
    def _lefts(self, left_bytes: bytes, cand: np.ndarray) -> list[tuple[tuple[int, ...], ...]]:
        """For each candidate last token ``t``: the left token sequences ``L`` with ``L + [t]`` a canonical
        tokenization of ``left_bytes + bytes(t)`` (``decode(L) == left_bytes``); several when the string ends
        inside a character whose completions tokenize differently, none when ``t`` cannot follow. ``L`` comes from the candidate,
        not from ``left_bytes`` alone: what follows can change how the left part is tokenized (a run of
        spaces gives its last space to a following word). Cached per ``left_bytes`` (LRU)."""
        memo = self._valid_cache.get(left_bytes)
        if memo is None:
            memo = {}
            self._valid_cache[left_bytes] = memo
            while len(self._valid_cache) > self._cache_size:
                self._valid_cache.popitem(last=False)
        else:
            self._valid_cache.move_to_end(left_bytes)
        todo = [int(t) for t in cand if int(t) not in memo]
        if todo:
            opts = self._canon.options([left_bytes + self._tb[t] for t in todo])
            for t, o in zip(todo, opts, strict=True):
                memo[t] = tuple(x[:-1] for x in o if x and x[-1] == t)
        return [memo[int(t)] for t in cand]

    def _pair_ok(self, a: int, cand: np.ndarray) -> np.ndarray:
        """Tokens ``t`` (of ``cand``) with ``canon(bytes(a) + bytes(t)) == [a, t]``, cached per ``a``. Strings
        ending inside a character are tried with 4 completions first, then with all of them."""
        key = ("pair", a)
        hit = self._valid_cache.get(key)  # type: ignore[call-overload]
        if hit is not None:
            self._valid_cache.move_to_end(key)  # type: ignore[arg-type]
            return hit  # type: ignore[return-value]
        ab = self._tb[a]
        datas = [ab + self._tb[int(t)] for t in cand]
        want = [(a, int(t)) for t in cand]
        quick = self._canon.options(datas, quick=True)
        ok = np.array([w in o for w, o in zip(want, quick, strict=True)], dtype=bool)
        retry = []
        for k in np.nonzero(~ok)[0].tolist():
            sp = split_incomplete_utf8(datas[k])
            if sp is not None and sp[1]:  # ends inside a character: try every completion
                retry.append(k)
        if retry:
            full = self._canon.options([datas[k] for k in retry])
            for k, o in zip(retry, full, strict=True):
                ok[k] = want[k] in o
        out = cand[ok]
        self._valid_cache[key] = out  # type: ignore[index]
        while len(self._valid_cache) > self._cache_size:
            self._valid_cache.popitem(last=False)
        return out

    def _group(self, split: int, cand: np.ndarray, lefts: list[tuple[tuple[int, ...], ...]], rows: dict) -> None:
        for t, Ls in zip(cand.tolist(), lefts, strict=True):
            for L in Ls:
                rows.setdefault((split, L), []).append(t)

    # ------------------------------------------------------------------ cover
    def _split(self, data: bytes) -> tuple[tuple[int, ...], bytes]:
        sp = split_incomplete_utf8(data)
        if sp is None:
            raise ValueError(
                "the prefix is not a prefix of valid UTF-8 (it holds an invalid byte sequence before its end); "
                "no text has these bytes"
            )
        text, _ = sp
        if not text:
            return (), bytes(data)
        starts = [a for a, _ in self.view.pretokenize(text)]
        s = starts[-self.lookback] if len(starts) >= self.lookback else 0
        if s == 0:
            return (), bytes(data)
        # the fixed tokens are those of enc(x) before s (not enc(x[:s]) alone: a whitespace run before s is
        # split by what follows it, which x already holds)
        enc = self.view.encode(text)
        k = next((m for m, (a, _) in enumerate(enc.offsets) if a >= s), len(enc.ids))
        if k < len(enc.offsets) and enc.offsets[k][0] != s:  # pragma: no cover - no token boundary at s
            return tuple(self._canon.ids([data[:s].decode("utf-8")])[0]), bytes(data[s:])
        return tuple(enc.ids[:k]), bytes(data[s:])

    def _cover(self, data: bytes) -> _Cover:
        if not isinstance(data, (bytes, bytearray)):
            raise TypeError(f"ByteLM takes bytes (use text.encode()), got {type(data).__name__}")
        data = bytes(data)
        fixed, q = self._split(data)
        prefix = self._prefix(self.context_ids + fixed)
        V = self._vocab_limit(int(prefix.last.shape[-1]))
        groups: dict[tuple[int, tuple[int, ...]], list[int]] = {}
        for i in range(len(q)):  # the last token starts inside the tail and covers q[i:]
            c = self.view.supertokens(q[i:])
            c = c[c < V]
            self._group(i, c, self._lefts(q[:i], c), groups)
        # the split i = len(q): T_0 = a tokenization of q itself, continued by any token
        all_ids = np.nonzero(self._nonspecial[:V])[0]
        sp = split_incomplete_utf8(q)
        ends_in_space = sp is not None and not sp[1] and sp[0][-1:].isspace()
        if self.t0_check == "exact" or ends_in_space or not q:
            # a tail ending in whitespace is re-split by what follows (its last space joins a following
            # word), so T_0 is not always enc(q): check every token against the whole tail (cached per tail;
            # whitespace tails repeat, e.g. b" " after every word)
            self._group(len(q), all_ids, self._lefts(q, all_ids), groups)
        else:
            for L0 in self._canon.options([q])[0]:
                a = L0[-1]
                ab = self._tb[a]
                if (a,) in self._canon.options([ab])[0]:  # 2-local check of the pair (a, t)
                    groups.setdefault((len(q), L0), []).extend(self._pair_ok(a, all_ids).tolist())
                else:  # `a` is not canonical alone: check the whole tail
                    lefts = self._lefts(q, all_ids)
                    groups.setdefault((len(q), L0), []).extend(
                        t for t, Ls in zip(all_ids.tolist(), lefts, strict=True) if L0 in Ls
                    )
        rows = [_Row(i, L) for (i, L) in groups]
        self._run_rows(prefix, rows)
        cands = [np.array(groups[(r.split, r.left)], dtype=np.int64) for r in rows]
        return _Cover(data, fixed, q, rows, prefix, cands)

    # ------------------------------------------------------------------ public API
    def log_prefix_prob(self, data: bytes) -> float:
        """``log P(the text starts with data)``, natural log (``-inf`` when no canonical sequence covers it).

        ``P(x) = Σ_{T ∈ cover(x)} P(T | context)``; ``log_prefix_prob(b"") == 0``.
        """
        if not isinstance(data, (bytes, bytearray)):
            raise TypeError(f"log_prefix_prob takes bytes (use text.encode()), got {type(data).__name__}")
        if not data:
            return 0.0
        cov = self._cover(bytes(data))
        terms = []
        for r, c in zip(cov.rows, cov.cands, strict=True):
            if r.split < len(cov.tail) and c.size:
                assert r.dist is not None
                terms.append(r.logp + float(torch.logsumexp(r.dist[torch.from_numpy(c)].double(), 0)))
        if not terms:
            return -math.inf
        rel = float(torch.logsumexp(torch.tensor(terms, dtype=torch.float64), 0))
        return self._fixed_logprob(self.context_ids + cov.fixed) + rel

    def prefix_prob(self, data: bytes) -> float:
        """``P(the text starts with data)`` (see :meth:`log_prefix_prob`)."""
        return math.exp(self.log_prefix_prob(data))

    def _byte_masses(self, cov: _Cover) -> tuple[torch.Tensor, float]:
        """Unnormalised ``P(xb)`` for all b (scaled by a common factor) and ``P(x)`` on the same scale."""
        q = cov.tail
        masses = torch.zeros(256, dtype=torch.float64)
        px = 0.0
        if not cov.rows:
            return masses, px
        M = max(r.logp for r in cov.rows)
        for r, c in zip(cov.rows, cov.cands, strict=True):
            if not c.size:
                continue
            assert r.dist is not None
            w = math.exp(r.logp - M)
            p = r.dist[torch.from_numpy(c)].double().exp() * w
            if r.split < len(q):
                px += float(p.sum())
                m = len(q) - r.split
                longer = self._len[c] > m
                if longer.any():
                    b = torch.from_numpy(self._bytemat[c[longer], m].astype(np.int64))
                    masses.index_add_(0, b, p[torch.from_numpy(longer)])
            else:
                b = torch.from_numpy(self._bytemat[c, 0].astype(np.int64))
                masses.index_add_(0, b, p)
        return masses, px

    def next_byte_distribution(self, prefix: bytes | Sequence[bytes]) -> torch.Tensor:
        """``P(b | prefix)`` for the 256 byte values: ``Tensor[256]`` (float32, sums to 1), or ``[B, 256]``
        for a list of prefixes.

        ``P(b | x) = P(xb) / Σ_b' P(xb')``, all ``P(xb)`` from one cover computation of ``x``. Bytes that no
        canonical continuation produces (e.g. ones that make the text invalid UTF-8) get 0.

        Raises:
            ValueError: When ``P(prefix) = 0`` (e.g. it holds a byte the tokenizer has no token for).
        """
        if isinstance(prefix, (list, tuple)):
            return torch.stack([self.next_byte_distribution(p) for p in prefix])
        if not isinstance(prefix, (bytes, bytearray)):
            raise TypeError(f"next_byte_distribution takes bytes (use text.encode()), got {type(prefix).__name__}")
        t = time.perf_counter()
        cov = self._cover(bytes(prefix))
        masses, px = self._byte_masses(cov)
        tot = float(masses.sum())
        if not tot > 0:
            raise ValueError(
                f"no canonical token sequence continues {bytes(prefix)[-20:]!r}: P(b|x) is undefined (does the "
                "prefix hold a byte the tokenizer has no token for? see TokenizerView.missing_bytes)"
            )
        self.last_info = {
            "fixed_tokens": len(cov.fixed),
            "tail_bytes": len(cov.tail),
            "rows": len(cov.rows),
            "candidates": int(sum(c.size for c in cov.cands)),
            "continue_mass": tot / px if len(prefix) and px > 0 else float("nan"),
            "seconds": time.perf_counter() - t,
        }
        return (masses / tot).float()

    def next_byte_logprobs(self, prefix: bytes) -> torch.Tensor:
        """``log P(b | prefix)``: ``Tensor[256]`` (``-inf`` for impossible bytes)."""
        return self.next_byte_distribution(prefix).double().log().float()

    def __repr__(self) -> str:
        return f"ByteLM({getattr(self.adapter, 'name', type(self.adapter.model).__name__)!s}, t0_check={self.t0_check!r})"


# ---------------------------------------------------------------------- ensembles
class ByteEnsemble:
    """A mixture of byte-level LMs that may use different tokenizers (DEC-2): one byte stream.

    ``mode="step"``: ``P(b | x) = Σ_k w_k P_k(b | x)`` (the per-step mixture the paper ensembles with).
    ``mode="bayes"``: the mixture of the models as distributions over texts,
    ``P(b | x) = Σ_k w_k P_k(x) P_k(b | x) / Σ_k w_k P_k(x)`` (posterior weights from the prefix).
    ``mode="product"``: the renormalised weighted geometric mean ``∝ Π_k P_k(b | x)^{w_k}``.

    Args:
        models: Objects with ``next_byte_distribution(bytes) -> Tensor[256]`` (:class:`ByteLM`, ensembles).
        weights: Non-negative weights, one per model (normalised to sum 1); default uniform.
        mode: ``"step"``, ``"bayes"`` or ``"product"``.
    """

    def __init__(self, models: Sequence[Any], weights: Sequence[float] | None = None, mode: str = "step") -> None:
        models = list(models)
        if not models:
            raise ValueError("byte_ensemble needs at least one model")
        for m in models:
            if not hasattr(m, "next_byte_distribution"):
                raise TypeError(f"{type(m).__name__} has no next_byte_distribution; wrap adapters in ByteLM(adapter)")
        w = [1.0] * len(models) if weights is None else [float(x) for x in weights]
        if len(w) != len(models):
            raise ValueError(f"{len(w)} weights for {len(models)} models")
        if any(x < 0 or not math.isfinite(x) for x in w) or sum(w) <= 0:
            raise ValueError(f"weights must be finite, non-negative and not all zero, got {w}")
        if mode not in ("step", "bayes", "product"):
            raise ValueError(f"mode must be 'step', 'bayes' or 'product', got {mode!r}")
        if mode == "bayes" and not all(hasattr(m, "log_prefix_prob") for m in models):
            raise TypeError("mode='bayes' needs models with log_prefix_prob (ByteLM)")
        s = sum(w)
        self.models, self.weights, self.mode = models, [x / s for x in w], mode

    def mixture_weights(self, prefix: bytes) -> torch.Tensor:
        """The weights used for ``prefix``: the given ones, or (``"bayes"``) ``∝ w_k P_k(prefix)``."""
        w = torch.tensor(self.weights, dtype=torch.float64)
        if self.mode != "bayes":
            return w
        lp = torch.tensor([m.log_prefix_prob(prefix) for m in self.models], dtype=torch.float64)
        return torch.softmax(w.log() + lp, 0)

    def next_byte_distribution(self, prefix: bytes) -> torch.Tensor:
        """The mixed ``P(b | prefix)``: ``Tensor[256]`` (float32, sums to 1)."""
        dists = torch.stack([m.next_byte_distribution(prefix).double() for m in self.models])
        w = self.mixture_weights(prefix)
        if self.mode == "product":
            keep = w > 0  # (0 * log 0 would be nan)
            logd = (w[keep, None] * dists[keep].log()).sum(0)
            out = torch.softmax(logd, 0)
        else:
            out = (w[:, None] * dists).sum(0)
        if not torch.isfinite(out).all() or float(out.sum()) <= 0:
            raise ValueError("the models agree on no next byte (product of distributions with disjoint support)")
        return (out / out.sum()).float()


def byte_ensemble(models: Sequence[Any], weights: Sequence[float] | None = None, mode: str = "step") -> ByteEnsemble:
    """Mix the next-byte distributions of several :class:`ByteLM` (different tokenizers welcome), DEC-2.

    Args:
        models: ByteLMs (or other byte-level models).
        weights: Mixture weights (normalised); default uniform.
        mode: ``"step"`` (``Σ_k w_k P_k(b|x)``), ``"bayes"`` or ``"product"`` (see :class:`ByteEnsemble`).

    Examples:
        >>> import tokensmith as ts
        >>> blm = ByteLM(ts.tiny("llama"))
        >>> ens = byte_ensemble([blm, blm], [0.5, 0.5])   # two models with different tokenizers in practice
        >>> bool(torch.allclose(ens.next_byte_distribution(b"Hi"), blm.next_byte_distribution(b"Hi")))
        True
    """
    return ByteEnsemble(models, weights, mode)


# ---------------------------------------------------------------------- generation
@dataclass
class ByteGeneration:
    """Output of :func:`byte_generate`.

    Attributes:
        prompt: The prompt bytes.
        new_bytes: The generated bytes.
        probs: ``P(b | x)`` of each generated byte.
        stopped: Why generation ended: ``"length"``, ``"stop"`` (a stop string) or ``"dead_end"`` (no byte
            had probability).
    """

    prompt: bytes
    new_bytes: bytes
    probs: list[float]
    stopped: str

    @property
    def text(self) -> str:
        """The new bytes decoded (``errors="replace"``; a character the prompt left open is completed in
        :attr:`full_text`, not here)."""
        return self.new_bytes.decode("utf-8", "replace")

    @property
    def full_text(self) -> str:
        """Prompt plus generation, decoded with ``errors="replace"``."""
        return (self.prompt + self.new_bytes).decode("utf-8", "replace")


def byte_generate(
    model: Any,
    prompt_bytes: bytes,
    max_new_bytes: int,
    *,
    do_sample: bool = False,
    temperature: float = 1.0,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    stop: bytes | Sequence[bytes] | None = None,
    progress: bool = False,
) -> ByteGeneration:
    """Generate bytes from ``P(b | x)`` (DEC-2): greedy, or sampled with a seed.

    The prompt may end inside a token or inside a UTF-8 character: the cover set marginalises over every
    tokenization, so no token healing is needed.

    Args:
        model: A :class:`ByteLM` or :class:`ByteEnsemble` (anything with ``next_byte_distribution``).
        prompt_bytes: The prompt (``text.encode()``; may end mid-character).
        max_new_bytes: Bytes to generate at most.
        do_sample: Sample instead of taking the most probable byte.
        temperature: Sampling temperature (``p^(1/T)`` renormalised); ignored when greedy.
        seed: Seed of a private ``torch.Generator`` (the global RNG is not used).
        generator: A generator to use instead of ``seed``.
        stop: A byte string (or several) that ends generation once produced.
        progress: Show a tqdm bar.

    Examples:
        >>> import tokensmith as ts
        >>> out = byte_generate(ByteLM(ts.tiny("llama")), b"Hello", 1, do_sample=True, seed=0)
        >>> len(out.new_bytes), out.stopped
        (1, 'length')
    """
    from tqdm.auto import tqdm

    if not isinstance(prompt_bytes, (bytes, bytearray)):
        raise TypeError(f"prompt_bytes must be bytes (use text.encode()), got {type(prompt_bytes).__name__}")
    if max_new_bytes < 0:
        raise ValueError(f"max_new_bytes must be >= 0, got {max_new_bytes}")
    if do_sample and not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    stops = [] if stop is None else [stop] if isinstance(stop, (bytes, bytearray)) else list(stop)
    gen = generator
    if do_sample and gen is None:
        gen = torch.Generator()
        gen.manual_seed(int(seed) if seed is not None else 0)
    x = bytes(prompt_bytes)
    new = bytearray()
    probs: list[float] = []
    why = "length"
    for _ in tqdm(range(int(max_new_bytes)), desc="bytes", disable=not progress, leave=False):
        try:
            p = model.next_byte_distribution(x + bytes(new)).double()
        except ValueError:
            why = "dead_end"
            break
        if do_sample:
            q = p.pow(1.0 / temperature) if temperature != 1.0 else p
            b = int(torch.multinomial(q / q.sum(), 1, generator=gen))
        else:
            b = int(torch.argmax(p))
        new.append(b)
        probs.append(float(p[b]))
        if any(bytes(new).endswith(s) for s in stops):
            why = "stop"
            break
    return ByteGeneration(x, bytes(new), probs, why)


# ---------------------------------------------------------------------- tokenization bias
@dataclass
class TokenizationBias:
    """Token-level vs byte-level probability of the next character after the same prefix.

    Attributes:
        prefix: The prompt text (``text[:split]``).
        next_char: The character that follows in ``text``.
        boundary_inside: Whether ``split`` falls inside a token of ``encode(text)`` (the prompt ends
            mid-token, so its own encoding is not a prefix of the text's encoding).
        token_level: ``Σ_{t: bytes(t) starts with next_char} p(t | enc(prefix))`` over non-special tokens
            (renormalised): what naive prompting predicts.
        byte_level: ``P(next_char | prefix)`` from :class:`ByteLM` (product of next-byte probabilities).
        token_level_at_boundary: The same token-level number for the prompt cut at the start of the token
            that contains ``split`` (the prompt ends at a boundary of ``encode(text)``), predicting the
            text's next bytes up to ``split`` + next_char.
        byte_level_at_boundary: ``P(text[boundary:split] + next_char | text[:boundary])`` byte-level.
    """

    prefix: str
    next_char: str
    boundary_inside: bool
    token_level: float
    byte_level: float
    token_level_at_boundary: float
    byte_level_at_boundary: float

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _token_level_prob(adapter: Any, view: TokenizerView, context: Sequence[int], prefix: bytes, target: bytes) -> float:
    ids = list(context) + view.encode(prefix.decode("utf-8")).ids
    with torch.no_grad():
        out = adapter.forward(torch.tensor([ids], dtype=torch.long), logits_to_keep=1)
    p = torch.softmax(out.logits[0, -1].double(), -1)
    V = min(view.vocab_size, p.shape[-1])
    p = p[:V]
    empty = torch.tensor([not b for b in view.all_token_bytes[:V]], dtype=torch.bool)  # specials have no bytes
    p = p.masked_fill(empty, 0.0)
    hit = torch.from_numpy(view.supertokens(target))
    hit = hit[hit < V]
    return float(p[hit].sum() / p.sum())


def tokenization_bias(model: Any, text: str, split: int, *, at_boundary: bool = True) -> TokenizationBias:
    """Demonstrate tokenization bias (TOK-14): the same prefix, the token boundary inside vs at the end.

    Naive prompting encodes ``text[:split]`` and reads the next token; when ``split`` falls inside a token
    of the full text (``"http:" | "//"`` with ``"://"`` one token), the continuation the model learned is
    a token that was never seen after this encoding, and the next-character probability is distorted. The
    byte-level probability of :class:`ByteLM` marginalises over tokenizations and is not.

    Args:
        model: A :class:`ByteLM` or a causal-LM adapter (wrapped in a ByteLM).
        text: The full text.
        split: Character index where the prompt ends (``0 < split < len(text)``).
        at_boundary: Also compute both numbers with the prompt cut at the start of the token that
            contains ``split`` (``nan`` when False or when that start is 0).

    Returns:
        :class:`TokenizationBias` with the four probabilities.
    """
    blm = model if isinstance(model, ByteLM) else ByteLM(model)
    if not isinstance(text, str):
        raise TypeError(f"text must be str, got {type(text).__name__}")
    if not 0 < split < len(text):
        raise ValueError(f"split must be in (0, {len(text)}), got {split}")
    view = blm.view
    data = text.encode("utf-8")
    cut = len(text[:split].encode("utf-8"))
    nxt = text[split].encode("utf-8")
    enc = view.encode(text)
    starts = [s for s, _ in enc.offsets]
    inside = cut not in starts
    bnd = max([s for s in starts if s <= cut] or [0])

    def byte_prob(prefix: bytes, target: bytes) -> float:
        lp = 0.0
        for k in range(len(target)):
            p = float(blm.next_byte_distribution(prefix + target[:k])[target[k]])
            if p <= 0:
                return 0.0
            lp += math.log(p)
        return math.exp(lp)

    tok = _token_level_prob(blm.adapter, view, blm.context_ids, data[:cut], nxt)
    byt = byte_prob(data[:cut], nxt)
    if at_boundary and bnd > 0:
        tok_b = _token_level_prob(blm.adapter, view, blm.context_ids, data[:bnd], data[bnd:cut] + nxt)
        byt_b = byte_prob(data[:bnd], data[bnd:cut] + nxt)
    else:
        tok_b, byt_b = float("nan"), float("nan")
    return TokenizationBias(text[:split], text[split], inside, tok, byt, tok_b, byt_b)
