"""Per-layer, per-KV-head cache access (METHODS.md MOD-8), shielded from transformers' cache refactors.

transformers 5.x keeps ``cache.layers[i].keys/values`` (``[B, H_kv, T, d]``); older releases kept
``cache.key_cache[i]``. These helpers read and rewrite either form, so KV-compression methods (SnapKV,
H2O, StreamingLLM, ...) can evict tokens per KV head while keeping the GQA shape.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # pragma: no cover
    from tokensmith.models.adapter import ModelAdapter

__all__ = ["prefill", "num_cache_layers", "layer_kv", "set_layer_kv", "evict", "cache_kind"]


def prefill(adapter: ModelAdapter, inputs: Any) -> tuple[Any, Any]:
    """Run the prompt once with a KV cache; returns ``(cache, output)``."""
    out = adapter.forward(inputs, use_cache=True)
    cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
    if cache is None:
        raise ValueError("this model returned no KV cache (is it a causal LM with use_cache support?)")
    return cache, out


def num_cache_layers(cache: Any) -> int:
    if hasattr(cache, "layers"):
        return len(cache.layers)
    if hasattr(cache, "key_cache"):
        return len(cache.key_cache)
    raise TypeError(f"unsupported cache type {type(cache).__name__}")


def layer_kv(cache: Any, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of layer ``i``: ``[B, H_kv, T, d]`` each."""
    if hasattr(cache, "layers"):
        layer = cache.layers[i]
        return layer.keys, layer.values
    if hasattr(cache, "key_cache"):
        return cache.key_cache[i], cache.value_cache[i]
    raise TypeError(f"unsupported cache type {type(cache).__name__}")


def set_layer_kv(cache: Any, i: int, keys: torch.Tensor, values: torch.Tensor) -> None:
    """Replace the keys/values of layer ``i`` (shapes may shrink along T)."""
    if hasattr(cache, "layers"):
        cache.layers[i].keys = keys
        cache.layers[i].values = values
        if hasattr(cache.layers[i], "cumulative_length"):
            cache.layers[i].cumulative_length = keys.shape[-2]
    elif hasattr(cache, "key_cache"):
        cache.key_cache[i] = keys
        cache.value_cache[i] = values
    else:
        raise TypeError(f"unsupported cache type {type(cache).__name__}")


def cache_kind(cache: Any) -> str:
    """'dynamic', 'sliding', 'hybrid' (mixed sliding/full layers) or the class name."""
    layers = getattr(cache, "layers", None)
    if layers is None:
        return type(cache).__name__
    kinds = {("sliding" if "Sliding" in type(x).__name__ else "full") for x in layers}
    if kinds == {"full"}:
        return "dynamic"
    return "sliding" if kinds == {"sliding"} else "hybrid"


def evict(cache: Any, keep: torch.Tensor | dict[int, torch.Tensor]) -> Any:
    """Keep only the given token indices in every (or each given) layer of the cache.

    Args:
        cache: a transformers cache.
        keep: ``[B, K]`` (same tokens for all KV heads), ``[B, H_kv, K]`` (per KV head; K equal across
            heads keeps the tensor rectangular), or ``{layer: indices}``. Indices are sorted to keep order.

    Returns:
        the same cache object, modified in place. After eviction the next call must pass an attention
        mask of length ``K + new`` and the original absolute ``position_ids`` (positions are preserved).
    """
    n = num_cache_layers(cache)
    per_layer = keep if isinstance(keep, dict) else {i: keep for i in range(n)}
    for i, idx in per_layer.items():
        k, v = layer_kv(cache, i)
        idx = idx.to(k.device).sort(-1).values
        if idx.dim() == 2:
            idx = idx[:, None, :].expand(k.shape[0], k.shape[1], idx.shape[-1])
        if idx.dim() != 3 or idx.shape[:2] != k.shape[:2]:
            raise ValueError(f"keep must be [B, K] or [B, H_kv={k.shape[1]}, K], got {tuple(idx.shape)}")
        g = idx[..., None].expand(*idx.shape, k.shape[-1])
        set_layer_kv(cache, i, k.gather(2, g), v.gather(2, g))
    return cache
