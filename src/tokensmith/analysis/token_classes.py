"""Token classes for grouping per-token diagnostics: special, punctuation, stopword, number, whitespace, content.

LLM-Microscope (Razzhigaev et al., 2025) finds that the most "linear" / context-carrying tokens are the
least meaningful ones: punctuation, articles, stopwords. :func:`token_class` puts every token id of a
tokenizer into one class, from the token's *decoded text* (so byte-level ``Ġthe`` and SentencePiece ``▁the``
both are ``stopword``):

- ``special``: the tokenizer's special / added-special tokens (BOS, EOS, pad, chat markers).
- ``whitespace``: only spaces, tabs and newlines.
- ``punctuation``: only punctuation and symbols (Unicode categories P* and S*), e.g. ``,`` ``.`` ``)``.
- ``number``: digits (optionally with ``.,``), e.g. ``2024``, ``3``.
- ``stopword``: an English function word (:data:`STOPWORDS`, case-insensitive, surrounding spaces ignored).
- ``content``: everything else (word pieces included).

Examples:
    >>> import tokensmith as ts
    >>> from tokensmith.analysis.token_classes import token_classes
    >>> tok = ts.tiny("llama").tokenizer
    >>> ids = tok("the cat, 42", add_special_tokens=False)["input_ids"]
    >>> token_classes(tok, ids)[:1]
    ['stopword']
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from typing import Any

__all__ = ["CLASSES", "STOPWORDS", "token_class", "token_classes", "text_class"]

CLASSES: tuple[str, ...] = ("special", "whitespace", "punctuation", "number", "stopword", "content")

#: English function words (articles, pronouns, prepositions, conjunctions, auxiliaries, common adverbs).
STOPWORDS: frozenset[str] = frozenset(
    """a about above after again against all am an and any are as at be because been before being below between
    both but by can could did do does doing down during each few for from further had has have having he her here
    hers herself him himself his how i if in into is it its itself just me more most my myself no nor not now of
    off on once only or other our ours ourselves out over own same she should so some such than that the their
    theirs them themselves then there these they this those through to too under until up very was we were what
    when where which while who whom why will with would you your yours yourself yourselves also may might must
    shall us upon yet""".split()
)


def text_class(s: str) -> str:
    """The class of a decoded token text (module docstring), without the ``special`` check."""
    if s == "" or s.isspace():
        return "whitespace"
    core = s.strip()
    if all(unicodedata.category(c)[0] in "PS" for c in core):
        return "punctuation"
    if any(c.isdigit() for c in core) and all(c.isdigit() or c in ".," for c in core):
        return "number"
    if core.lower() in STOPWORDS:
        return "stopword"
    return "content"


def _special_ids(tokenizer: Any) -> set[int]:
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    for tid, tok in (getattr(tokenizer, "added_tokens_decoder", {}) or {}).items():
        if getattr(tok, "special", False):
            ids.add(int(tid))
    return ids


def token_class(tokenizer: Any, token_id: int) -> str:
    """The class of one token id (module docstring)."""
    return token_classes(tokenizer, [token_id])[0]


def token_classes(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    """The class of each token id in ``ids`` (module docstring); decodes each id on its own."""
    special = _special_ids(tokenizer)
    cache: dict[int, str] = {}
    out = []
    for i in ids:
        i = int(i)
        if i not in cache:
            if i in special:
                cache[i] = "special"
            else:
                cache[i] = text_class(tokenizer.decode([i]))
        out.append(cache[i])
    return out
