"""Quality of a pruned model on real text: continuation log-probs through a pruned KV cache, and
needle-in-a-haystack accuracy (the two measurements of ``benchmarks/pruning_bench.py``).

    >>> import tokensmith as ts
    >>> from tokensmith.pruning import presets
    >>> from tokensmith.pruning.evaluate import continuation_logprobs
    >>> ad = ts.tiny("llama")
    >>> lp = continuation_logprobs(ad, presets.key_norm(ratio=0.5), "one two three four five six", " seven eight")
    >>> lp.shape[0] == len(ad.tokenizer(" seven eight", add_special_tokens=False).input_ids)
    True
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from tokensmith.models import kvcache

if TYPE_CHECKING:  # pragma: no cover
    from tokensmith.models.adapter import ModelAdapter
    from tokensmith.pruning.haystack import NeedleCase
    from tokensmith.pruning.reducer import Reducer

__all__ = ["continuation_logprobs", "needle_accuracy"]


def continuation_logprobs(
    adapter: ModelAdapter, reducer: Reducer | None, context: str, continuation: str
) -> torch.Tensor:
    """``log p(c_i | context, c_<i)`` for every token of ``continuation`` (``[L]``, fp32), with the
    context's KV cache pruned by ``reducer`` (None: unpruned) and the continuation teacher-forced through it.

    Protocol (kvpress's "compress the context, then read the rest through the cache"): the context is
    prefilled inside ``reducer.apply`` (its cache comes out pruned; its last logits, computed before any
    eviction takes effect, predict ``c_0``), then the continuation runs in one forward at the positions the
    reducer's policy gives (``preserve``: after the original context length), attending to the pruned cache
    and causally to itself. Context and continuation are tokenized jointly (the continuation's tokens are
    those of ``context + continuation``), never separately.
    """
    if not continuation:
        raise ValueError("continuation is empty")
    tok = adapter.tokenizer
    enc = tok(context + continuation, add_special_tokens=False, return_offsets_mapping=True)
    ids = torch.tensor(enc["input_ids"])
    n_ctx = sum(1 for s, _ in enc["offset_mapping"] if s < len(context))
    if n_ctx < 1 or n_ctx >= len(ids):
        raise ValueError("context and continuation must both cover at least one token")
    ctx_ids, cont = ids[:n_ctx][None].to(adapter.device), ids[n_ctx:][None].to(adapter.device)
    key = "cache" if "cache" in adapter._fwd_params else "past_key_values"
    off = adapter.positions.offset or 0

    def run() -> torch.Tensor:
        cache, out = kvcache.prefill(adapter, {"input_ids": ctx_ids})
        first = out.logits[:, -1]
        return cache, first

    with torch.no_grad():
        if reducer is None:
            cache, first = run()
            nxt = n_ctx
            res = adapter.model(
                input_ids=cont,
                position_ids=(torch.arange(cont.shape[1]) + nxt + off)[None].to(adapter.device),
                **{key: cache},
                use_cache=True,
            )
        else:
            with reducer.apply(adapter) as rep:
                cache, first = run()
                nxt = int(rep.extra.get("next_position", torch.tensor([n_ctx]))[0])
                res = adapter.model(
                    input_ids=cont,
                    position_ids=(torch.arange(cont.shape[1]) + nxt + off)[None].to(adapter.device),
                    **{key: cache},
                    use_cache=True,
                )
    logits = torch.cat([first[:, None], res.logits[:, :-1]], 1).float()  # [1, L, V]
    return torch.log_softmax(logits, -1)[0].gather(-1, cont[0][:, None].long()).squeeze(-1).cpu()


def needle_accuracy(
    adapter: ModelAdapter,
    reducer: Reducer | None,
    cases: Sequence[NeedleCase],
    max_new_tokens: int = 8,
    **gen: Any,
) -> dict[str, Any]:
    """Greedy answers to needle cases with the prompt's cache pruned by ``reducer`` (None: unpruned);
    a case counts as correct when the needle's value appears in the answer."""
    answers, correct, kv = [], [], []
    for case in cases:
        enc = adapter.encode(case.prompt)
        if reducer is None:
            out = adapter.generate(enc, max_new_tokens=max_new_tokens, **gen)
        else:
            with reducer.apply(adapter) as rep:
                out = adapter.generate(enc, max_new_tokens=max_new_tokens, **gen)
            kv.append(rep.kv_compression)
        answers.append(out.texts[0])
        correct.append(case.answer in out.texts[0])
    return {
        "accuracy": sum(correct) / max(len(correct), 1),
        "correct": correct,
        "answers": answers,
        "kv_compression": (sum(kv) / len(kv)) if kv else 0.0,
    }
