"""A byte-exact view of a tokenizer (METHODS.md TOK-1).

Decoding tokens one at a time breaks on ``Ġ`` (GPT-2 byte map), ``▁`` (SentencePiece), ``##``
(WordPiece) and on UTF-8 characters split across tokens. :class:`TokenizerView` gives every token its
exact **bytes**, every encoding exact **byte offsets**, and the byte-prefix index (``supertokens``) that
token healing and exact byte-level probabilities need. Everything else in
:mod:`tokensmith.tokenization` reads tokens through it.

Supported families (``view.family``):

- ``"byte_bpe"``: GPT-2 / Llama-3 / Qwen / SmolLM2 style byte-level BPE (the ``ByteLevel`` byte map
  inverted); lossless.
- ``"sentencepiece"``: SentencePiece-style BPE with ``▁`` for spaces and ``<0xNN>`` byte fallback
  (Llama-2, Mistral, Gemma); lossless when byte fallback is on. A dummy prefix space (``Prepend("▁")``)
  is detected and removed from decoded bytes and offsets, as the tokenizer's own decoder does.
- ``"unigram"``: SentencePiece Unigram (T5, XLM-R); lossless only with byte fallback (else UNK).
- ``"wordpiece"``: BERT-style ``##`` continuation pieces; lossy (lower-casing, accent stripping,
  spaces implicit), so offsets come from the tokenizer's own character alignment.
- ``"tiktoken"``: a ``tiktoken.Encoding`` (tokens are raw byte strings); lossless.

``view.lossless`` is not assumed from the family: it is measured at construction on a probe string
(emoji, CJK, combining marks, tabs, runs of spaces, a special-token string) and says whether
``decode_bytes(encode(text).ids) == text.encode()`` held, and it is False when some byte has no token
(``view.missing_bytes``, bytes that can occur in UTF-8 text): SmolLM2's byte-level vocabulary lacks six
control bytes (``\\x04 \\x06 \\x13 \\x14 \\x16 \\x1d``) and the lead bytes ``\\xf1 \\xf2`` (characters in
planes 4-12), which its tokenizer silently drops. Offsets stay exact there: a dropped byte falls between tokens
or inside the span of the token that merged across it.

Examples:
    >>> from tokensmith.tokenization.view import TokenizerView
    >>> from tokensmith.models.zoo import smollm2_tokenizer
    >>> view = TokenizerView(smollm2_tokenizer())
    >>> view.family, view.lossless, sorted(view.missing_bytes)[:3]   # no token for byte 0x04: not lossless
    ('byte_bpe', False, [4, 6, 19])
    >>> enc = view.encode("naïve 😀")
    >>> enc.pieces()          # the emoji is split across two tokens: exact bytes, not "\\ufffd"
    [b'na', b'\\xc3\\xafve', b' \\xf0\\x9f\\x98', b'\\x80']
    >>> enc.offsets
    [(0, 2), (2, 6), (6, 10), (10, 11)]
    >>> view.decode_bytes(enc.ids) == "naïve 😀".encode()
    True
"""

from __future__ import annotations

import bisect
import itertools
import json
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import torch

__all__ = [
    "ByteEncoding",
    "TokenizerView",
    "bytes_to_unicode",
    "check_homomorphism",
    "utf8_boundaries",
    "utf8_encode",
]

_SHARED: weakref.WeakKeyDictionary[Any, tuple[int | None, TokenizerView]] = weakref.WeakKeyDictionary()
_NOT_UTF8 = frozenset([0xC0, 0xC1, *range(0xF5, 0x100)])  # bytes that never occur in valid UTF-8
_PROBE = "Héllo  wörld\t— 😀👍🏽 中文字 e\u0301 <|im_start|> [SEP] 12345\n\n  end"


def bytes_to_unicode() -> dict[int, str]:
    """The GPT-2 byte-to-character map used by byte-level BPE vocabularies.

    Printable Latin-1 bytes map to themselves; the other 68 bytes map to ``chr(256 + k)`` in byte
    order (so space ``0x20`` becomes ``Ġ`` and newline ``0x0A`` becomes ``Ċ``).

    Examples:
        >>> m = bytes_to_unicode()
        >>> m[0x20], m[0x0A], m[ord("a")]
        ('Ġ', 'Ċ', 'a')
    """
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    out: dict[int, str] = {b: chr(b) for b in keep}
    k = 0
    for b in range(256):
        if b not in out:
            out[b] = chr(256 + k)
            k += 1
    return out


def utf8_encode(texts: Sequence[str]) -> list[bytes]:
    """``[t.encode("utf-8") for t in texts]`` with the errors this subpackage promises.

    Raises:
        TypeError: an element is not a ``str`` (bytes must be decoded first).
        ValueError: text with a lone surrogate (not encodable as UTF-8), naming the text and character.

    Examples:
        >>> utf8_encode(["aé"])
        [b'a\\xc3\\xa9']
    """
    out = []
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"text {i} is a {type(t).__name__}, not a str; decode bytes first")
        try:
            out.append(t.encode("utf-8"))
        except UnicodeEncodeError as e:
            raise ValueError(
                f"text {i} has a lone surrogate at character {e.start} (not valid UTF-8): clean it "
                "first, e.g. text.encode('utf-8', 'replace').decode()"
            ) from None
    return out


def utf8_boundaries(data: bytes) -> list[int]:
    """Byte positions where a UTF-8 character starts, plus ``len(data)``.

    Functions of :mod:`tokensmith.tokenization` cut text only at these positions.

    Examples:
        >>> utf8_boundaries("aé😀".encode())
        [0, 1, 3, 7]
    """
    return [i for i, b in enumerate(data) if b & 0xC0 != 0x80] + [len(data)]


@dataclass(frozen=True)
class ByteEncoding:
    """One text encoded through a :class:`TokenizerView`.

    Attributes:
        text: The input text.
        data: ``text.encode("utf-8")``.
        ids: Token ids.
        offsets: ``(start, end)`` **byte** offsets into ``data``, one per id. For lossless tokenizers they
            are the exact bytes of each token (a token holding half of a character gets that half);
            specials added by ``add_special_tokens`` get an empty span.
    """

    text: str
    data: bytes
    ids: list[int]
    offsets: list[tuple[int, int]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)

    def pieces(self) -> list[bytes]:
        """The bytes of ``data`` each token covers."""
        return [self.data[s:e] for s, e in self.offsets]


def _is_tiktoken(tok: Any) -> bool:
    return type(tok).__module__.startswith("tiktoken") and hasattr(tok, "decode_single_token_bytes")


def _walk(node: Any) -> list[dict]:
    """Flatten a tokenizer.json component (possibly a ``Sequence``) into its parts."""
    if not node:
        return []
    if node.get("type") == "Sequence":
        parts = node.get("decoders") or node.get("normalizers") or node.get("pretokenizers") or []
        return [p for sub in parts for p in _walk(sub)]
    return [node]


class TokenizerView:
    """Byte-exact view of a tokenizer: token bytes, byte offsets, canonicality, byte-prefix index.

    Args:
        tokenizer: A HuggingFace fast tokenizer (anything with ``backend_tokenizer``), a
            ``tokenizers.Tokenizer``, a ``tiktoken.Encoding``, or a ``ModelAdapter`` (its tokenizer).

    Raises:
        TypeError: For tokenizers without a Rust backend (slow Python tokenizers, custom classes): load
            the fast version (``AutoTokenizer.from_pretrained(..., use_fast=True)``) or convert it.

    Special-token *strings* inside user text are encoded as plain text (``"<|im_start|>"`` typed by a
    user is not a control token); pass ``add_special_tokens=True`` to get the tokenizer's BOS/EOS.
    """

    def __init__(self, tokenizer: Any) -> None:
        if hasattr(tokenizer, "tokenizer") and hasattr(tokenizer, "model") and hasattr(tokenizer, "encode"):
            tokenizer = tokenizer.tokenizer  # a ModelAdapter
        self.tokenizer = tokenizer
        self._tk = None  # tiktoken.Encoding
        self._bt = None  # tokenizers.Tokenizer (our own copy)
        if _is_tiktoken(tokenizer):
            self._init_tiktoken(tokenizer)
        else:
            import tokenizers

            if isinstance(tokenizer, tokenizers.Tokenizer):
                backend = tokenizer
            elif hasattr(tokenizer, "backend_tokenizer"):
                backend = tokenizer.backend_tokenizer
            else:
                raise TypeError(
                    f"TokenizerView needs a fast (Rust `tokenizers`) tokenizer or a tiktoken.Encoding; got "
                    f"{type(tokenizer).__name__}. Load it with AutoTokenizer.from_pretrained(..., use_fast=True) "
                    "or convert it (transformers.convert_slow_tokenizer)."
                )
            self._init_hf(backend)
        self._check_lossless()

    # ------------------------------------------------------------------ construction
    def _init_hf(self, backend: Any) -> None:
        import tokenizers

        spec = json.loads(backend.to_str())
        self._bt = tokenizers.Tokenizer.from_str(backend.to_str())
        try:
            self._bt.encode_special_tokens = True  # special-token strings in user text stay text
        except AttributeError:  # very old tokenizers
            pass
        self._bt.no_truncation()
        self._bt.no_padding()
        model = spec.get("model") or {}
        mtype = model.get("type")
        decoders = _walk(spec.get("decoder"))
        normalizers = _walk(spec.get("normalizer"))
        pretoks = _walk(spec.get("pre_tokenizer"))
        dtypes = {d.get("type") for d in decoders}
        ptypes = {p.get("type") for p in pretoks}
        self._model_spec = model
        self._byte_map: dict[str, int] | None = None
        self._wp_prefix = None
        self.dummy_prefix = False
        if "ByteLevel" in dtypes or "ByteLevel" in ptypes:
            family = "byte_bpe"
            self._byte_map = {c: b for b, c in bytes_to_unicode().items()}
        elif mtype == "WordPiece" or "WordPiece" in dtypes:
            family = "wordpiece"
            self._wp_prefix = model.get("continuing_subword_prefix") or "##"
        elif mtype == "Unigram":
            family = "unigram"
        elif mtype == "BPE":
            family = "sentencepiece"
        else:
            raise TypeError(
                f"TokenizerView does not support tokenizer model type {mtype!r} (supported: byte-level BPE, "
                "SentencePiece-style BPE/Unigram, WordPiece, tiktoken)."
            )
        # SentencePiece dummy prefix: Prepend("▁") normaliser or Metaspace(prepend_scheme != never) +
        # a decoder that strips it again (Strip / Metaspace).
        if family in ("sentencepiece", "unigram"):
            prepends = any(n.get("type") == "Prepend" for n in normalizers) or any(
                p.get("type") == "Metaspace" and p.get("prepend_scheme", "always") != "never"
                and p.get("add_prefix_space", True) for p in pretoks
            )
            strips = any(d.get("type") == "Strip" and d.get("start", 0) >= 1 for d in decoders) or any(
                d.get("type") == "Metaspace" for d in decoders
            )
            self.dummy_prefix = bool(prepends and strips)
        self.family = family
        vocab = backend.get_vocab(with_added_tokens=True)
        n = max(vocab.values()) + 1 if vocab else 0
        if hasattr(self.tokenizer, "__len__") and not isinstance(self.tokenizer, tokenizers.Tokenizer):
            n = max(n, len(self.tokenizer))
        pieces: list[str | None] = [None] * n
        for s, i in vocab.items():
            pieces[i] = s
        self._pieces = pieces
        added = {t["id"]: t for t in spec.get("added_tokens", [])}
        self._added = added
        self._unk_id = None
        unk = model.get("unk_token")
        if isinstance(model.get("unk_id"), int):
            self._unk_id = model["unk_id"]
        elif unk is not None and unk in vocab:
            self._unk_id = vocab[unk]
        tb: list[bytes] = []
        cls: list[str] = []
        for i, p in enumerate(pieces):
            if i in added:
                t = added[i]
                if t.get("special", False):
                    tb.append(b"")
                    cls.append("unk" if i == self._unk_id else "control")
                else:
                    tb.append(t["content"].encode("utf-8"))
                    cls.append("added")
                continue
            if p is None:
                tb.append(b"")
                cls.append("control")
                continue
            b, c = self._piece_bytes(p)
            if i == self._unk_id:
                b, c = b"", "unk"
            tb.append(b)
            cls.append(c)
        self._token_bytes = tb
        self._classes = cls

    def _piece_bytes(self, p: str) -> tuple[bytes, str]:
        if self.family == "byte_bpe":
            assert self._byte_map is not None
            try:
                return bytes(self._byte_map[c] for c in p), "normal"
            except KeyError:  # a piece outside the byte alphabet (added to the model vocab directly)
                return p.encode("utf-8"), "normal"
        if self.family == "wordpiece":
            pre = self._wp_prefix or "##"
            return (p[len(pre):] if p.startswith(pre) and len(p) > len(pre) else p).encode("utf-8"), "normal"
        if len(p) == 6 and p.startswith("<0x") and p.endswith(">"):
            try:
                return bytes([int(p[3:5], 16)]), "byte"
            except ValueError:
                pass
        return p.replace("\u2581", " ").encode("utf-8"), "normal"

    def _init_tiktoken(self, enc: Any) -> None:
        self._tk = enc
        self.family = "tiktoken"
        self.dummy_prefix = False
        self._wp_prefix = None
        self._byte_map = None
        self._unk_id = None
        n = enc.n_vocab
        specials = {}
        for s in enc.special_tokens_set:
            specials[enc.encode_single_token(s)] = s
        self._added = {i: {"id": i, "content": s, "special": True} for i, s in specials.items()}
        tb, cls = [], []
        for i in range(n):
            if i in specials:
                tb.append(b"")
                cls.append("control")
                continue
            try:
                tb.append(enc.decode_single_token_bytes(i))
                cls.append("normal")
            except KeyError:
                tb.append(b"")
                cls.append("control")
        self._token_bytes = tb
        self._classes = cls
        self._pieces = [None] * n

    def _check_lossless(self) -> None:
        single = {b[0] for i, b in enumerate(self._token_bytes) if len(b) == 1 and self._classes[i] != "control"}
        self.missing_bytes: frozenset[int] = (
            frozenset(set(range(256)) - single - _NOT_UTF8) if self.family not in ("wordpiece", "unigram") else frozenset()
        )
        data = _PROBE.encode()
        ids = self._encode_ids([_PROBE], False)[0]
        self.lossless = self.family != "wordpiece" and not self.missing_bytes and self.decode_bytes(ids) == data

    # ------------------------------------------------------------------ vocabulary
    @property
    def vocab_size(self) -> int:
        """The true ``|V|``: every id the tokenizer can emit (added and special tokens included)."""
        return len(self._token_bytes)

    def token_bytes(self, i: int) -> bytes:
        """Exact bytes of token ``i`` (``b""`` for control/special tokens)."""
        return self._token_bytes[int(i)]

    @property
    def all_token_bytes(self) -> list[bytes]:
        """``[token_bytes(i) for i in range(vocab_size)]``."""
        return list(self._token_bytes)

    @cached_property
    def special_ids(self) -> frozenset[int]:
        """Control and special added tokens (their bytes are empty)."""
        return frozenset(i for i, c in enumerate(self._classes) if c in ("control", "unk"))

    def special_class(self, i: int) -> str:
        """``"control"`` (special/control token), ``"added"`` (user-added, non-special), ``"byte"``
        (SentencePiece ``<0xNN>`` byte fallback), ``"unk"`` or ``"normal"``."""
        return self._classes[int(i)]

    def word_start(self, i: int) -> bool:
        """Whether token ``i`` begins a new word: a leading space (``Ġ``/``▁``/tiktoken) or, for WordPiece,
        a piece without the ``##`` continuation prefix."""
        return bool(self.word_start_mask[int(i)])

    @cached_property
    def word_start_mask(self) -> torch.Tensor:
        """``BoolTensor[V]`` of :meth:`word_start`."""
        if self.family == "wordpiece":
            pre = self._wp_prefix or "##"
            m = [
                c == "normal" and not (p or "").startswith(pre) for p, c in zip(self._pieces, self._classes, strict=True)
            ]
        else:
            m = [b[:1] in (b" ",) for b in self._token_bytes]
        return torch.tensor(m, dtype=torch.bool)

    @cached_property
    def first_byte(self) -> torch.Tensor:
        """``LongTensor[V]``: each token's first byte, ``-1`` for empty/special tokens."""
        return torch.tensor([b[0] if b else -1 for b in self._token_bytes], dtype=torch.long)

    @cached_property
    def first_byte_matrix(self) -> torch.Tensor:
        """``BoolTensor[256, V]`` with ``M[b, t] = (first byte of t == b)``."""
        fb = self.first_byte
        m = torch.zeros(256, self.vocab_size, dtype=torch.bool)
        ok = fb >= 0
        m[fb[ok], torch.nonzero(ok).squeeze(1)] = True
        return m

    @cached_property
    def _sorted(self) -> tuple[list[bytes], np.ndarray]:
        pairs = sorted((b, i) for i, b in enumerate(self._token_bytes) if b and i not in self.special_ids)
        return [b for b, _ in pairs], np.array([i for _, i in pairs], dtype=np.int64)

    @cached_property
    def _by_bytes(self) -> dict[bytes, list[int]]:
        out: dict[bytes, list[int]] = {}
        for i, b in enumerate(self._token_bytes):
            if b and i not in self.special_ids:
                out.setdefault(b, []).append(i)
        return out

    @cached_property
    def max_token_bytes(self) -> int:
        """Length in bytes of the longest token."""
        return max((len(b) for b in self._token_bytes), default=0)

    def supertokens(self, prefix: bytes) -> np.ndarray:
        """Ids of (non-special) tokens whose bytes start with ``prefix`` (all tokens for ``b""``).

        A bisection over the byte-sorted vocabulary: ``O(log V)`` plus the output size.

        Examples:
            >>> from tokensmith.models.zoo import smollm2_tokenizer
            >>> view = TokenizerView(smollm2_tokenizer())
            >>> all(view.token_bytes(i).startswith(b" hel") for i in view.supertokens(b" hel"))
            True
        """
        if not isinstance(prefix, (bytes, bytearray)):
            raise TypeError(f"supertokens takes bytes (use text.encode()), got {type(prefix).__name__}")
        keys, ids = self._sorted
        prefix = bytes(prefix)
        lo = bisect.bisect_left(keys, prefix)
        upper = _prefix_upper(prefix)
        hi = len(keys) if upper is None else bisect.bisect_left(keys, upper, lo=lo)
        return ids[lo:hi].copy()

    def prefix_tokens(self, data: bytes) -> list[int]:
        """Ids of (non-special) tokens whose bytes are a non-empty prefix of ``data``, shortest first."""
        out: list[int] = []
        by = self._by_bytes
        for k in range(1, min(len(data), self.max_token_bytes) + 1):
            out.extend(by.get(bytes(data[:k]), ()))
        return out

    def ids_of_bytes(self, b: bytes) -> list[int]:
        """Ids of (non-special) tokens whose bytes equal ``b`` exactly (several for duplicates)."""
        return list(self._by_bytes.get(bytes(b), ()))

    # ------------------------------------------------------------------ encode / decode
    @classmethod
    def of(cls, tokenizer: Any) -> TokenizerView:
        """One shared view per tokenizer object (building one takes about a second for a 49k vocabulary);
        rebuilt when the tokenizer's length changes (``add_tokens``). Accepts a view (returned as is), a
        tokenizer or an adapter.

        Examples:
            >>> from tokensmith.models.zoo import smollm2_tokenizer
            >>> tok = smollm2_tokenizer()
            >>> TokenizerView.of(tok) is TokenizerView.of(tok)
            True
        """
        if isinstance(tokenizer, TokenizerView):
            return tokenizer
        if hasattr(tokenizer, "tokenizer") and hasattr(tokenizer, "model") and hasattr(tokenizer, "encode"):
            tokenizer = tokenizer.tokenizer  # a ModelAdapter
        n = len(tokenizer) if hasattr(tokenizer, "__len__") else None
        try:
            hit = _SHARED.get(tokenizer)
        except TypeError:  # not weak-referenceable
            return cls(tokenizer)
        if hit is not None and hit[0] == n:
            return hit[1]
        view = cls(tokenizer)
        _SHARED[tokenizer] = (n, view)
        return view

    def encode_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids only (no offsets, no specials added, special-token strings as text), one batched call:
        the fast path for code that encodes many strings."""
        texts = list(texts)
        if not texts:
            return []
        return self._encode_ids(texts, False)

    def _encode_ids(self, texts: Sequence[str], add_special_tokens: bool) -> list[list[int]]:
        if self._tk is not None:
            return [list(self._tk.encode_ordinary(t)) for t in texts]
        assert self._bt is not None
        fast = getattr(self._bt, "encode_batch_fast", None) if not add_special_tokens else None
        encs = (fast or self._bt.encode_batch)(list(texts), add_special_tokens=add_special_tokens)
        return [e.ids for e in encs]

    def encode(self, text: str, *, add_special_tokens: bool = False) -> ByteEncoding:
        """Encode ``text`` with exact byte offsets (see :class:`ByteEncoding`)."""
        return self.encode_batch([text], add_special_tokens=add_special_tokens)[0]

    def encode_batch(self, texts: Sequence[str], *, add_special_tokens: bool = False) -> list[ByteEncoding]:
        """Encode many texts in one batched call (see :meth:`encode`).

        Raises:
            TypeError: When an element is not a ``str``.
            ValueError: For text with lone surrogates (not encodable as UTF-8): clean it first, e.g.
                ``text.encode("utf-8", "replace").decode()``.
        """
        texts = list(texts)
        datas = utf8_encode(texts)
        if self._tk is not None:
            out = []
            for t, d, ids in zip(texts, datas, self._encode_ids(texts, False), strict=True):
                out.append(ByteEncoding(t, d, ids, self._cumulative(ids, 0)))
            return out
        assert self._bt is not None
        encs = self._bt.encode_batch(texts, add_special_tokens=add_special_tokens)
        out = []
        for t, d, e in zip(texts, datas, encs, strict=True):
            ids = list(e.ids)
            joined = b"".join(self._token_bytes[i] for i in ids) if self.family != "wordpiece" else None
            if joined == d:
                offs = self._cumulative(ids, 0)
            elif self.dummy_prefix and joined == b" " + d:
                offs = [(max(s - 1, 0), max(e_ - 1, 0)) for s, e_ in self._cumulative(ids, 0)]
            elif self.missing_bytes and joined == bytes(b for b in d if b not in self.missing_bytes):
                offs = self._align_skipping(ids, d)
            else:
                offs = _char_to_byte_offsets(t, e.offsets, [self._classes[i] == "control" for i in ids], len(d))
            out.append(ByteEncoding(t, d, ids, offs))
        return out

    def _align_skipping(self, ids: Sequence[int], data: bytes) -> list[tuple[int, int]]:
        """Spans when the tokenizer silently drops bytes it has no token for. A dropped byte may sit *inside* a
        token (``":\\x16:"`` becomes the one token ``"::"``): the token's span then covers it."""
        offs, p = [], 0
        miss = self.missing_bytes
        for i in ids:
            tb = self._token_bytes[i]
            while tb and p < len(data) and data[p] in miss and data[p] != tb[0]:
                p += 1
            start = q = p
            for b in tb:
                while q < len(data) and data[q] != b and data[q] in miss:
                    q += 1
                q += 1
            offs.append((start, q))
            p = q
        return offs

    def _cumulative(self, ids: Sequence[int], start: int) -> list[tuple[int, int]]:
        offs, p = [], start
        for i in ids:
            n = len(self._token_bytes[i])
            offs.append((p, p + n))
            p += n
        return offs

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The bytes of ``ids``: token bytes concatenated, specials empty, a SentencePiece dummy prefix
        space removed (as the tokenizer's own decoder does). Never splits or repairs characters.
        WordPiece (lossy) gets a space before every word-initial piece but the first."""
        ids = [int(i) for i in ids]
        if self.family == "wordpiece":  # spaces are implicit before word-initial pieces
            ws = self.word_start_mask
            parts = [(b" " if ws[i] and k else b"") + self._token_bytes[i] for k, i in enumerate(ids)]
            return b"".join(parts)
        out = b"".join(self._token_bytes[i] for i in ids)
        if self.dummy_prefix and out.startswith(b" "):
            first = next((i for i in ids if self._token_bytes[i]), None)
            if first is not None and self._token_bytes[first].startswith(b" "):
                out = out[1:]
        return out

    def decode(self, ids: Iterable[int], errors: str = "replace") -> str:
        """``decode_bytes(ids).decode("utf-8", errors)``."""
        return self.decode_bytes(ids).decode("utf-8", errors)

    def is_canonical(self, ids: Sequence[int]) -> bool:
        """Whether ``ids`` is the tokenizer's own encoding of its bytes: ``encode(decode(ids)) == ids``.

        Special tokens are ignored on both sides. ``False`` when the bytes are not valid UTF-8 (no text
        encodes to them).
        """
        ids = [int(i) for i in ids if int(i) not in self.special_ids]
        try:
            text = self.decode_bytes(ids).decode("utf-8")
        except UnicodeDecodeError:
            return False
        return self._encode_ids([text], False)[0] == ids

    def categories(self, *, batch_size: int = 4096) -> list[str]:
        """Round-trip category of every token: ``"ok"`` (its bytes alone encode to exactly it),
        ``"special"``, ``"unreachable"`` (valid UTF-8 that encodes differently: a token the tokenizer
        never emits for its own string) or ``"undecodeable"`` (bytes alone are not valid UTF-8: a piece
        of a character, reachable only next to its other half).

        WordPiece ``##`` pieces cannot stand alone and are reported as ``"continuation"`` (not checked).
        When a SentencePiece tokenizer adds a dummy prefix space, a piece without a leading space is
        checked after a newline (``"\\n" + piece``: a newline never merges with a following piece).
        """
        cats = [""] * self.vocab_size
        todo: list[tuple[int, str, int]] = []  # (id, text, index of the token in the expected encoding)
        for i, b in enumerate(self._token_bytes):
            c = self._classes[i]
            if c in ("control", "unk") or not b:
                cats[i] = "special"
                continue
            try:
                s = b.decode("utf-8")
            except UnicodeDecodeError:
                cats[i] = "undecodeable"
                continue
            if self.family == "wordpiece" and not bool(self.word_start_mask[i]):
                cats[i] = "continuation"
                continue
            needs_host = self.dummy_prefix and not b.startswith(b" ")
            if self.dummy_prefix and not needs_host:
                s = s[1:]  # the dummy prefix supplies the leading space
            todo.append((i, ("\n" + s) if needs_host else s, 1 if needs_host else 0))
        host = self._encode_ids(["\n"], False)[0] if todo else []
        for k in range(0, len(todo), batch_size):
            chunk = todo[k : k + batch_size]
            encs = self._encode_ids([t for _, t, _ in chunk], False)
            for (i, _, hosted), ids in zip(chunk, encs, strict=True):
                if hosted:
                    ok = ids[: len(host)] == host and ids[len(host):] == [i]
                else:
                    ok = ids == [i]
                cats[i] = "ok" if ok else "unreachable"
        return cats

    # ------------------------------------------------------------------ words / BPE on bytes
    def pretokenize(self, text: str) -> list[tuple[int, int]]:
        """Byte spans of the pre-tokenizer's words in ``text`` (tokens never cross them)."""
        if self._tk is not None:
            import regex

            pat = getattr(self._tk, "_pat_str", None)
            if pat is None:
                raise NotImplementedError("this tiktoken Encoding does not expose its pattern")
            spans = []
            for m in regex.finditer(pat, text):
                start = len(text[: m.start()].encode())
                spans.append((start, start + len(m.group(0).encode())))
            return spans
        assert self._bt is not None
        e = self.encode(text)
        words: dict[int, list[int]] = {}
        enc = self._bt.encode(text, add_special_tokens=False)
        for k, w in enumerate(enc.word_ids):
            if w is not None:
                words.setdefault(w, []).append(k)
        return [(e.offsets[ks[0]][0], e.offsets[ks[-1]][1]) for _, ks in sorted(words.items())]

    @cached_property
    def _ranks(self) -> dict[Any, int]:
        if self._tk is not None:
            ranks = getattr(self._tk, "_mergeable_ranks", None)
            if ranks is None:
                raise NotImplementedError("this tiktoken Encoding does not expose its mergeable ranks")
            return dict(ranks)
        if self.family != "byte_bpe":
            raise NotImplementedError(f"bpe_merge is defined for byte-level BPE and tiktoken, not {self.family}")
        merges = self._model_spec.get("merges") or []
        out: dict[Any, int] = {}
        for r, m in enumerate(merges):
            a, b = m.split(" ", 1) if isinstance(m, str) else m
            out.setdefault((a, b), r)
        return out

    def bpe_merge(self, word: bytes) -> list[int]:
        """Apply the BPE merges to one pre-token's bytes (any bytes, also incomplete UTF-8).

        Byte-level BPE: start from single bytes (as byte-map characters) and repeatedly merge the adjacent
        pair of lowest merge rank; tiktoken: merge the adjacent pair whose concatenation has the lowest
        rank. This is the tokenizer's model step *within* a pre-token; :meth:`encode` runs the
        pre-tokenizer too. Bytes without a token (``missing_bytes``) are dropped first, as the tokenizer does.

        Examples:
            >>> from tokensmith.models.zoo import smollm2_tokenizer
            >>> view = TokenizerView(smollm2_tokenizer())
            >>> view.bpe_merge(b" hello") == view.encode(" hello").ids
            True
        """
        word = bytes(word)
        if not word:
            return []
        ranks = self._ranks
        if self._tk is not None:
            parts = [word[i : i + 1] for i in range(len(word))]
            while len(parts) > 1:
                best, bi = None, -1
                for k in range(len(parts) - 1):
                    r = ranks.get(parts[k] + parts[k + 1])
                    if r is not None and (best is None or r < best):
                        best, bi = r, k
                if best is None:
                    break
                parts[bi : bi + 2] = [parts[bi] + parts[bi + 1]]
            return [ranks[p] for p in parts]
        assert self._byte_map is not None
        fwd = bytes_to_unicode()
        vocab = self._model_spec.get("vocab") or {}
        syms = [fwd[b] for b in word if fwd[b] in vocab]  # bytes without a token are dropped, as the tokenizer does
        s = "".join(syms)
        if self._model_spec.get("ignore_merges") and s in vocab:
            return [vocab[s]]
        while len(syms) > 1:
            best, bi = None, -1
            for k in range(len(syms) - 1):
                r = ranks.get((syms[k], syms[k + 1]))
                if r is not None and (best is None or r < best):
                    best, bi = r, k
            if best is None:
                break
            a, b = syms[bi], syms[bi + 1]
            merged, k = [], 0
            while k < len(syms):  # merge every occurrence of the best pair, left to right
                if k < len(syms) - 1 and syms[k] == a and syms[k + 1] == b:
                    merged.append(a + b)
                    k += 2
                else:
                    merged.append(syms[k])
                    k += 1
            syms = merged
        return [vocab[x] for x in syms]

    def __repr__(self) -> str:
        return f"TokenizerView(family={self.family!r}, vocab_size={self.vocab_size}, lossless={self.lossless})"


def _prefix_upper(prefix: bytes) -> bytes | None:
    """The smallest byte string greater than every string starting with ``prefix`` (None: no bound)."""
    p = bytearray(prefix)
    while p and p[-1] == 0xFF:
        p.pop()
    if not p:
        return None
    p[-1] += 1
    return bytes(p)


def _char_to_byte_offsets(
    text: str, offsets: Sequence[tuple[int, int]], empty: Sequence[bool], n_bytes: int | None = None
) -> list[tuple[int, int]]:
    """Character offsets (as the Rust tokenizer reports them, within ``[0, len(text)]``) -> byte offsets: the
    identity for ASCII text, else one running sum of UTF-8 lengths."""
    if n_bytes == len(text):  # ASCII: byte offsets are character offsets
        return [(s, s) if z else (s, e) for (s, e), z in zip(offsets, empty, strict=True)]
    cum = [0, *itertools.accumulate(1 if c < "\x80" else len(c.encode("utf-8")) for c in text)]
    return [(cum[s], cum[s]) if z else (cum[s], cum[e]) for (s, e), z in zip(offsets, empty, strict=True)]


def check_homomorphism(view: TokenizerView, a: str, b: str) -> bool:
    """Whether decoding is a homomorphism on this pair (METHODS.md TOK-8):
    ``decode(ids_a + ids_b) == decode(ids_a) + decode(ids_b)``.

    Byte-level BPE and tiktoken always satisfy it; SentencePiece with a dummy prefix does not (the prefix
    space of the second part is kept in the concatenation but stripped when it is decoded alone).

    Examples:
        >>> from tokensmith.models.zoo import smollm2_tokenizer
        >>> check_homomorphism(TokenizerView(smollm2_tokenizer()), "Hello", " world")
        True
    """
    ia, ib = view.encode(a).ids, view.encode(b).ids
    return view.decode_bytes(ia + ib) == view.decode_bytes(ia) + view.decode_bytes(ib)
