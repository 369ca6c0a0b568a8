"""Long real English text available offline, and needle-in-a-haystack cases built over it.

The text is the prose of Python's own reference documentation, shipped with every CPython as
``pydoc_data.topics`` (~460 kB): headings, grammar blocks and code examples (indented lines) are dropped,
paragraphs are re-flowed. It is real, human-written English with long-range structure, which is what KV
pruning needs to be measured on, and it never needs a download.

    >>> from tokensmith.pruning.haystack import english_paragraphs, needle_case
    >>> len(english_paragraphs()) > 500
    True
    >>> case = needle_case(n_words=200, depth=0.5, seed=0)
    >>> case.answer in case.context
    True
"""

from __future__ import annotations

import functools
import random
import re
from dataclasses import dataclass

__all__ = ["english_paragraphs", "english_text", "NeedleCase", "needle_case"]


@functools.lru_cache(maxsize=1)
def english_paragraphs() -> tuple[str, ...]:
    """Prose paragraphs of ``pydoc_data.topics`` in a fixed order (topic name order)."""
    from pydoc_data import topics

    out: list[str] = []
    for name in sorted(topics.topics):
        for block in re.split(r"\n\s*\n", topics.topics[name]):
            lines = block.split("\n")
            if any(ln.startswith((" ", "\t")) for ln in lines):  # code, grammar, indented lists
                continue
            if len(lines) >= 2 and set(lines[-1].strip()) <= set("*=-~^"):
                continue  # a heading with its underline
            text = " ".join(ln.strip() for ln in lines).strip()
            if len(text) < 80 or text.count('"') > len(text) / 20 or "::=" in text:
                continue
            out.append(text)
    return tuple(out)


def english_text(n_words: int, start: int = 0) -> str:
    """About ``n_words`` words of consecutive paragraphs, starting at paragraph ``start`` (wrapping)."""
    paras = english_paragraphs()
    words: list[str] = []
    chunks: list[str] = []
    i = start
    while len(words) < n_words:
        p = paras[i % len(paras)]
        chunks.append(p)
        words.extend(p.split())
        i += 1
    text = "\n\n".join(chunks)
    # cut at the sentence end nearest to n_words
    cut = " ".join(text.split(" ")[: max(n_words, 1)])
    end = max(cut.rfind(". "), cut.rfind(".\n"))
    return cut[: end + 1] if end > len(cut) // 2 else cut


@dataclass
class NeedleCase:
    """A needle-in-a-haystack case: ``context`` holds ``needle`` (which states ``answer``) at ``depth``;
    ``question`` asks for it and ``prompt_suffix`` starts the answer so a small base/instruct model
    continues with the value (``context + question + prompt_suffix``, then greedy decoding)."""

    context: str
    needle: str
    question: str
    prompt_suffix: str
    answer: str
    depth: float
    seed: int

    @property
    def prompt(self) -> str:
        return f"{self.context}\n\n{self.question}{self.prompt_suffix}"


def needle_case(n_words: int = 400, depth: float = 0.5, seed: int = 0, kind: str = "number") -> NeedleCase:
    """A haystack of ``n_words`` words of real text with a needle inserted at a paragraph boundary near
    ``depth`` (0 = start, 1 = end). ``kind="number"``: "The secret number is 48213." (a 5-digit value from
    ``seed``)."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    if kind != "number":
        raise ValueError("kind must be 'number'")
    rng = random.Random(seed)
    value = str(rng.randint(10000, 99999))
    start = rng.randrange(len(english_paragraphs()))
    text = english_text(n_words, start=start)
    needle = f"The secret number is {value}."
    sents = re.split(r"(?<=\.)\s+", text)
    at = min(len(sents), max(0, round(depth * len(sents))))
    context = " ".join(sents[:at] + [needle] + sents[at:])
    return NeedleCase(
        context=context,
        needle=needle,
        question="What is the secret number?",
        prompt_suffix=" The secret number is",
        answer=value,
        depth=depth,
        seed=seed,
    )
