"""Named recipes for the papers: each returns a configured :class:`~tokensmith.pruning.Reducer`.

    >>> from tokensmith.pruning import presets
    >>> presets.snapkv(ratio=0.5).scorer
    ObservationWindow(window=64, kernel=5, pooling='avg')

| preset | paper | target | scorer | selection |
|---|---|---|---|---|
| :func:`snapkv` | Li et al. 2024 (SnapKV) | kv, prefill | last-``window`` queries' attention, pooled, per KV head | top ``1−ratio`` + the window |
| :func:`pyramidkv` | Cai et al. 2024 (PyramidKV) | kv, prefill | as SnapKV | per-layer budgets falling with depth |
| :func:`streaming_llm` | Xiao et al. 2024 (StreamingLLM) | kv, prefill + decode | sinks + recent window | ``capacity`` or ``ratio`` |
| :func:`sepllm` | Chen et al. 2024 (SepLLM) | kv, prefill + decode | initial + separators + window | ``capacity`` or ``ratio`` |
| :func:`h2o` | Zhang et al. 2023 (H2O) | kv, prefill + decode | accumulated attention per KV head | heavy hitters + ``recent`` |
| :func:`key_norm` | Devoto et al. 2024 | kv, prefill | −‖k‖ per KV head | top ``1−ratio`` |
| :func:`random` | baseline | kv, prefill | uniform | top ``1−ratio`` |
| :func:`fastv` | Chen et al. 2024 (FastV) | hidden, after layer ``k−1`` | last token's attention | top ``1−ratio`` |
| :func:`pyramid_drop` | Xing et al. 2024 (PyramidDrop) | hidden, several stages | last instruction token's attention | ``ratio`` of the survivors per stage |
| :func:`tome` | Bolya et al. 2023 (ToMe) | encoder | key similarity | bipartite merge of ``r`` per layer |
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tokensmith.pruning.reducer import Protect, Reducer
from tokensmith.pruning.scores import (
    AttentionReceived,
    HeavyHitter,
    KeyNorm,
    ObservationWindow,
    RandomScore,
    Separators,
    SinksRecent,
)

__all__ = [
    "snapkv",
    "pyramidkv",
    "streaming_llm",
    "sepllm",
    "h2o",
    "key_norm",
    "random",
    "fastv",
    "pyramid_drop",
    "tome",
    "PRESETS",
]


def _kv_amount(ratio: float | None, capacity: int | None) -> dict[str, Any]:
    if (ratio is None) == (capacity is None):
        raise ValueError(
            "give exactly one of ratio= (fraction of the prompt's KV removed at prefill) or capacity= (KV limit)"
        )
    if capacity is not None:
        return {"capacity": capacity, "phase": "both"}
    return {"ratio": ratio, "phase": "prefill"}


def snapkv(ratio: float = 0.5, window: int = 64, kernel: int = 5, pooling: str = "avg", **kw: Any) -> Reducer:
    """SnapKV: at prefill, the last ``window`` queries vote (summed attention, pooled over ``kernel``
    neighbours, averaged within each KV group); each KV head keeps the window plus its top tokens.

    Defaults (window 64, average pooling, kernel 5) are those of the SnapKV authors' code and kvpress's
    ``SnapKVPress``; with them the benchmark's answers and NLL equal kvpress's (``benchmarks/pruning_bench.py``,
    row ``snapkv_w64_avg``). The paper's window 32 with max pooling scored lower on its needle task."""
    return Reducer(
        target="kv", scorer=ObservationWindow(window, kernel, pooling), ratio=ratio, name="snapkv", **kw
    )


def pyramidkv(ratio: float = 0.5, window: int = 64, kernel: int = 5, pooling: str = "avg", **kw: Any) -> Reducer:
    """PyramidKV: SnapKV scores with per-layer budgets that fall linearly with depth (mean ``1 − ratio``).
    Needs unpadded rows or SDPA attention (layers hold different counts)."""
    return Reducer(
        target="kv",
        scorer=ObservationWindow(window, kernel),
        ratio=ratio,
        schedule="pyramid",
        name="pyramidkv",
        **kw,
    )


def streaming_llm(
    ratio: float | None = None, capacity: int | None = None, n_sink: int = 4, window: int = 0, **kw: Any
) -> Reducer:
    """StreamingLLM: keep ``n_sink`` attention sinks and the most recent tokens. With ``capacity`` the cache
    never holds more than that many real tokens (evicted at prefill and after every decode step); with
    ``ratio`` the prompt's cache is cut once. ``positions="rerotate"`` gives the paper's cache-relative
    positions on RoPE models."""
    return Reducer(
        target="kv",
        scorer=SinksRecent(n_sink, window),
        name="streaming_llm",
        **_kv_amount(ratio, capacity),
        **kw,
    )


def sepllm(
    ratio: float | None = None,
    capacity: int | None = None,
    n_initial: int = 4,
    window: int = 64,
    separators: Any = "auto",
    **kw: Any,
) -> Reducer:
    """SepLLM: initial tokens, the recent window, then separator tokens (``. , ; : ! ? \\n`` from the
    tokenizer), newest first, within the budget. For SepLLM's *attention mask* (training / exact SepLLM
    attention) see :func:`tokensmith.models.masking.separator_mask`."""
    return Reducer(
        target="kv",
        scorer=Separators(n_initial, window, separators),
        name="sepllm",
        **_kv_amount(ratio, capacity),
        **kw,
    )


def h2o(ratio: float | None = None, capacity: int | None = None, recent: int = 16, **kw: Any) -> Reducer:
    """H2O heavy hitters: accumulated attention per KV head (all prompt queries, then every decode query),
    plus the ``recent`` newest tokens always kept."""
    prot = kw.pop("protect", None) or Protect(recent=recent)
    return Reducer(
        target="kv", scorer=HeavyHitter(), protect=prot, name="h2o", **_kv_amount(ratio, capacity), **kw
    )


def key_norm(ratio: float = 0.5, **kw: Any) -> Reducer:
    """Keep the keys with the smallest L2 norm per KV head (Devoto et al. 2024; kvpress's ``KnormPress``)."""
    return Reducer(target="kv", scorer=KeyNorm(), ratio=ratio, name="key_norm", **kw)


def random(ratio: float = 0.5, seed: int = 0, **kw: Any) -> Reducer:
    """Uniformly random eviction (the baseline every method must beat)."""
    return Reducer(target="kv", scorer=RandomScore(seed=seed), ratio=ratio, name="random", **kw)


def fastv(k: int = 2, ratio: float = 0.5, **kw: Any) -> Reducer:
    """FastV: after layer ``k − 1``, drop the ``ratio`` of tokens the last token attends to least (head
    mean); the rest of the forward runs on the kept tokens with their original positions. With a KV cache
    the pruning happens once at prefill (the paper re-prunes at every step)."""
    return Reducer(
        target="hidden", scorer=AttentionReceived(rows="last"), ratio=ratio, layers=[k], name="fastv", **kw
    )


def pyramid_drop(
    stage_ends: Sequence[int] | None = None, ratio: float = 0.5, num_layers: int | None = None, **kw: Any
) -> Reducer:
    """PyramidDrop: at each stage end keep ``1 − ratio`` of the surviving tokens by the last instruction
    token's attention (N, λN, λ²N, ...). ``stage_ends`` default: a quarter, half and three quarters of the
    depth (resolved when applied, from ``num_layers`` or the model)."""
    red = Reducer(
        target="hidden",
        scorer=AttentionReceived(rows="last"),
        ratio=ratio,
        layers=list(stage_ends) if stage_ends is not None else None,
        name="pyramid_drop",
        **kw,
    )
    red._auto_stages = stage_ends is None  # type: ignore[attr-defined]
    return red


def tome(r: int = 4, **kw: Any) -> Any:
    """ToMe token merging in an encoder: merge ``r`` tokens per layer by bipartite soft matching on the
    keys, with proportional attention (:func:`tokensmith.pruning.merge.tome_encoder`). Returns a recipe
    whose ``apply(adapter)`` is the context manager."""
    from tokensmith.pruning.merge import tome_encoder

    class _ToMe:
        name = "tome"

        def __init__(self) -> None:
            self.r = r
            self.kw = kw

        def apply(self, adapter: Any) -> Any:
            return tome_encoder(adapter, r, **kw)

        def __repr__(self) -> str:
            return f"tome(r={r})"

    return _ToMe()


PRESETS = {
    "snapkv": snapkv,
    "pyramidkv": pyramidkv,
    "streaming_llm": streaming_llm,
    "sepllm": sepllm,
    "h2o": h2o,
    "key_norm": key_norm,
    "random": random,
    "fastv": fastv,
    "pyramid_drop": pyramid_drop,
    "tome": tome,
}
