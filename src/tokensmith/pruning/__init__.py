"""tokensmith.pruning — token pruning, merging and KV-cache compression with honest accounting.

Every method is *score -> select -> act (drop / mask / merge) -> fix positions*:

- :mod:`~tokensmith.pruning.scores`: scorers (attention received, SnapKV window, H2O, key norm,
  redundancy, self-information, attribution, sinks + recent, separators), ``score(ctx) -> [B, H_kv|1, T]``;
- :mod:`~tokensmith.pruning.select`: ratio / budget / threshold / k-center selection, per-layer schedules;
- :mod:`~tokensmith.pruning.merge`: ToMe bipartite merging, ``Y = W·X`` transforms, encoder token merging
  (:func:`tome_encoder`);
- :mod:`~tokensmith.pruning.ltp`: learned token pruning thresholds (LTP) with physical staged inference;
- :func:`compress`: prompt compression, text in -> shorter text out (LLMLingua / LongLLMLingua);
- :class:`Reducer` applies a recipe to a model: ``with reducer.apply(adapter) as report: adapter.generate(...)``;
  :mod:`~tokensmith.pruning.presets` names the papers' recipes;
- the :class:`ReductionReport` says what was kept, whether it was physical or simulated, and the KV bytes
  actually freed.

    >>> import tokensmith as ts
    >>> from tokensmith.pruning import presets
    >>> ad = ts.tiny("llama")
    >>> with presets.snapkv(ratio=0.5, window=4).apply(ad) as report:
    ...     _ = ad.generate("a b c d e f g h i j k l", max_new_tokens=2)
    >>> report.physical
    True
"""

from tokensmith.pruning import demo, evaluate, haystack, presets  # noqa: F401  (demo registers the report section)
from tokensmith.pruning.hidden import (
    HiddenPruneOutput,
    Stage,
    decode_step,
    hidden_flops_ratio,
    layer_costs,
    pruned_forward,
)
from tokensmith.pruning.ltp import (
    LTPOutput,
    LTPThresholds,
    classification_loss,
    ltp_forward,
    ltp_mask_forward,
    next_token_loss,
    train_ltp_thresholds,
)
from tokensmith.pruning.merge import *  # noqa: F401,F403
from tokensmith.pruning.merge import __all__ as _merge_all
from tokensmith.pruning.prompt import (
    NUMBERS,
    RESTRICT,
    CompressedPrompt,
    budget_select,
    compress,
    rank_demonstrations,
)
from tokensmith.pruning.reducer import Protect, Reducer
from tokensmith.pruning.report import ReductionReport, cache_bytes
from tokensmith.pruning.scores import *  # noqa: F401,F403
from tokensmith.pruning.scores import __all__ as _scores_all
from tokensmith.pruning.select import *  # noqa: F401,F403
from tokensmith.pruning.select import __all__ as _select_all

__all__ = [
    "Reducer",
    "Protect",
    "ReductionReport",
    "cache_bytes",
    "presets",
    "haystack",
    "evaluate",
    "Stage",
    "HiddenPruneOutput",
    "pruned_forward",
    "decode_step",
    "layer_costs",
    "hidden_flops_ratio",
    "LTPThresholds",
    "LTPOutput",
    "ltp_forward",
    "ltp_mask_forward",
    "train_ltp_thresholds",
    "classification_loss",
    "next_token_loss",
    "compress",
    "CompressedPrompt",
    "rank_demonstrations",
    "budget_select",
    "NUMBERS",
    "RESTRICT",
    *_scores_all,
    *_select_all,
    *_merge_all,
]
