"""A small offline preference data set built in code (METHODS.md 4; issue: "a small offline demo set").

:func:`demo_pairs` needs no download: every row is generated from a template with a seeded
:class:`random.Random`, so the same ``(n, seed)`` always gives the same rows (and the same
``datasets.Dataset`` fingerprint, which keys the trainer's reference cache).

How the rows are made. Four families of short factual questions with a known answer:

- ``arith``: "What is {a} plus {b}?" (a, b in 2..49) → the sum;
- ``capital``: "What is the capital of {country}?" (24 countries) → the capital;
- ``opposite``: "What is the opposite of '{word}'?" (24 word pairs) → the antonym;
- ``count``: "How many letters are in the word '{word}'?" → the length.

The **chosen** completion is always the correct, concise answer (" 42." / " Paris."). The **rejected** one is,
at random (seeded), one of three failure styles:

- *wrong*: a concise but wrong answer (a sum off by 1-9, another country's capital, a wrong antonym, a count off
  by 1-3);
- *rambling*: the correct answer buried in filler ("Well, that is a good question. Let me think about it for a
  moment. I believe the answer is 42, but I am not completely sure.");
- *wrong and rambling*: the wrong answer inside the same kind of filler.

So a preference model can learn two things from it: correctness (hard for a tiny random model) and concision
(easy: the filler phrases recur). Split it with the ``datasets`` method, e.g.
``demo_pairs(200).train_test_split(test_size=0.25, seed=0)`` → ``{"train": …, "test": …}``; a held-out split
shares the templates but not the rows.
"""

from __future__ import annotations

import random
from typing import Any

__all__ = ["demo_pairs"]

_CAPITALS = [
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Japan", "Tokyo"),
    ("Canada", "Ottawa"), ("Egypt", "Cairo"), ("Kenya", "Nairobi"), ("Peru", "Lima"), ("Chile", "Santiago"),
    ("Norway", "Oslo"), ("Sweden", "Stockholm"), ("Poland", "Warsaw"), ("Greece", "Athens"),
    ("Portugal", "Lisbon"), ("Austria", "Vienna"), ("Ireland", "Dublin"), ("Russia", "Moscow"),
    ("China", "Beijing"), ("India", "New Delhi"), ("Cuba", "Havana"), ("Turkey", "Ankara"),
    ("Hungary", "Budapest"), ("Finland", "Helsinki"),
]
_OPPOSITES = [
    ("hot", "cold"), ("big", "small"), ("fast", "slow"), ("up", "down"), ("open", "closed"), ("light", "dark"),
    ("early", "late"), ("happy", "sad"), ("full", "empty"), ("old", "new"), ("hard", "soft"), ("wet", "dry"),
    ("high", "low"), ("rich", "poor"), ("strong", "weak"), ("thick", "thin"), ("loud", "quiet"),
    ("long", "short"), ("clean", "dirty"), ("near", "far"), ("first", "last"), ("win", "lose"),
    ("push", "pull"), ("inside", "outside"),
]
_WORDS = [
    "cat", "house", "river", "garden", "pencil", "window", "orange", "planet", "music", "bridge", "forest",
    "candle", "rabbit", "silver", "doctor", "island", "yellow", "camera", "dragon", "ticket", "winter", "apple",
    "school", "mountain",
]
_OPENERS = [
    "Well, that is a good question.",
    "Hmm, let me think about this for a moment.",
    "That is an interesting thing to ask, and there are many ways to look at it.",
    "Okay, so, first of all, thank you for asking.",
]
_HEDGES = [
    "but I am not completely sure about that.",
    "although I could be wrong, so please double check.",
    "at least that is what I remember, more or less.",
    "if I had to guess, which I suppose I do.",
]


def _family(rng: random.Random, kind: str) -> tuple[str, str, str]:
    """(question, correct answer, wrong answer) of one family."""
    if kind == "arith":
        a, b = rng.randint(2, 49), rng.randint(2, 49)
        off = rng.choice([-1, 1]) * rng.randint(1, 9)
        return f"What is {a} plus {b}?", str(a + b), str(a + b + off)
    if kind == "capital":
        i = rng.randrange(len(_CAPITALS))
        j = (i + rng.randint(1, len(_CAPITALS) - 1)) % len(_CAPITALS)
        return f"What is the capital of {_CAPITALS[i][0]}?", _CAPITALS[i][1], _CAPITALS[j][1]
    if kind == "opposite":
        i = rng.randrange(len(_OPPOSITES))
        j = (i + rng.randint(1, len(_OPPOSITES) - 1)) % len(_OPPOSITES)
        return f"What is the opposite of '{_OPPOSITES[i][0]}'?", _OPPOSITES[i][1], _OPPOSITES[j][1]
    word = rng.choice(_WORDS)
    n = len(word)
    off = rng.randint(1, 3)
    wrong = n - off if rng.random() < 0.5 and n - off >= 1 else n + off
    return f"How many letters are in the word '{word}'?", str(n), str(wrong)


def demo_pairs(n: int = 200, seed: int = 0, *, styles: tuple[str, ...] = ("wrong", "rambling", "both")) -> Any:
    """``n`` templated preference pairs as a ``datasets.Dataset`` with columns ``prompt``, ``chosen``,
    ``rejected`` (plain strings; the chosen completion is a correct concise answer, the rejected one a wrong
    and/or rambling one — see the module docstring for how the rows are made), plus ``family`` and ``style``
    columns describing each row. Deterministic in ``(n, seed, styles)``.

    Args:
        n: number of pairs (>= 1).
        seed: the generator seed.
        styles: which rejected styles to draw from: any of ``"wrong"``, ``"rambling"``, ``"both"``.

    Returns:
        a ``datasets.Dataset``; split it with ``.train_test_split(test_size=..., seed=...)``.

    Raises:
        ValueError: ``n < 1`` or an unknown style.

    Examples:
        >>> ds = demo_pairs(4, seed=0)
        >>> ds.column_names[:3]
        ['prompt', 'chosen', 'rejected']
        >>> demo_pairs(4, seed=0)._fingerprint == ds._fingerprint
        True
    """
    import datasets

    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    bad = [s for s in styles if s not in ("wrong", "rambling", "both")]
    if bad or not styles:
        raise ValueError(f"styles must be a non-empty subset of ('wrong', 'rambling', 'both'), got {styles!r}")
    rng = random.Random(seed)
    rows: dict[str, list[str]] = {"prompt": [], "chosen": [], "rejected": [], "family": [], "style": []}
    for _ in range(n):
        kind = rng.choice(["arith", "capital", "opposite", "count"])
        question, right, wrong = _family(rng, kind)
        style = rng.choice(list(styles))
        if style == "wrong":
            rejected = f" {wrong}."
        else:
            ans = right if style == "rambling" else wrong
            rejected = f" {rng.choice(_OPENERS)} I believe the answer is {ans}, {rng.choice(_HEDGES)}"
        rows["prompt"].append(f"Question: {question}\nAnswer:")
        rows["chosen"].append(f" {right}.")
        rows["rejected"].append(rejected)
        rows["family"].append(kind)
        rows["style"].append(style)
    return datasets.Dataset.from_dict(rows)
