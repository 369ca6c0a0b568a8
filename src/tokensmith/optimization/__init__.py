"""tokensmith.optimization — token-space search (GCG family, random search, PEZ, RAG poisoning).

    >>> import tokensmith as ts
    >>> from tokensmith.models import Slot
    >>> from tokensmith.optimization import gcg
    >>> ad = ts.tiny("llama")
    >>> res = gcg(ad, "Say hi", " ok", suffix=" x x x", steps=2, search_width=8, topk=4, progress=False)
    >>> len(res.best_ids)
    3

These are red-teaming tools: use them to evaluate models you are responsible for.
"""

from tokensmith.optimization import cli, report  # noqa: F401  (register the CLI command and demo section)
from tokensmith.optimization.search import *  # noqa: F401,F403
from tokensmith.optimization.search import __all__ as _search_all
from tokensmith.optimization.shortcuts import gcg, random_search

__all__ = [*_search_all, "gcg", "random_search"]
