"""tokensmith.optimization — token-space search (GCG family, random search, PEZ, RAG poisoning), token-level
training objectives and multi-token prediction (:mod:`~tokensmith.optimization.training`), optimizers
(:mod:`~tokensmith.optimization.optim`).

    >>> import tokensmith as ts
    >>> from tokensmith.models import Slot
    >>> from tokensmith.optimization import gcg
    >>> ad = ts.tiny("llama")
    >>> res = gcg(ad, "Say hi", " ok", suffix=" x x x", steps=2, search_width=8, topk=4, progress=False)
    >>> len(res.best_ids)
    3

These are red-teaming tools: use them to evaluate models you are responsible for.
"""

from tokensmith.optimization import (  # noqa: F401  (register the CLI command and demo section)
    cli,
    report,
    training,  # noqa: F401  (token-level training objectives, MTP)
)
from tokensmith.optimization.search import *  # noqa: F401,F403
from tokensmith.optimization.search import __all__ as _search_all
from tokensmith.optimization.shortcuts import gcg, random_search
from tokensmith.optimization.training import (
    TokenLoss,
    TokenWeighter,
    add_mtp_heads,
    multi_token_loss,
    self_speculative_generate,
    token_loss,
    weighted_token_loss,
)

__all__ = [
    *_search_all,
    "gcg",
    "random_search",
    "training",
    "token_loss",
    "weighted_token_loss",
    "TokenWeighter",
    "TokenLoss",
    "add_mtp_heads",
    "multi_token_loss",
    "self_speculative_generate",
]


def __getattr__(name: str):
    if name == "TokenWeightedTrainer":  # lazy: imports the transformers Trainer machinery
        return training.TokenWeightedTrainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
