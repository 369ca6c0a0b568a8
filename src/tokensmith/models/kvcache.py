"""Per-layer, per-KV-head cache access (METHODS.md MOD-8), shielded from transformers' cache refactors.

transformers 5.x keeps ``cache.layers[i].keys/values`` (``[B, H_kv, n, d]``); older releases kept
``cache.key_cache[i]``. These helpers read and rewrite either form, so KV-compression methods (SnapKV,
H2O, StreamingLLM, ...) can evict tokens per KV head while keeping the GQA shape.

Token addressing. :func:`evict` takes *absolute* token indices: the column of the token in the
sequence the cache has seen (prompt columns ``0..T-1``, then one per generated token), for every layer
kind and also after earlier evictions (the cache remembers which columns each full-attention layer
still holds, see :func:`stored_positions`). Layer kinds:

- full-attention layers (``DynamicLayer``) hold every column not yet evicted; eviction removes slots;
- sliding-window layers (``DynamicSlidingWindowLayer``, Gemma-2/3, Mistral-style hybrids) hold only the
  last ``W - 1`` columns. A token already outside the window is simply not there (keeping or evicting it
  is a no-op). Removing a token *inside* the window is refused: transformers masks and rolls these
  layers by index arithmetic that assumes contiguous columns, so a gap would silently shift the window
  in later steps. ``evict(..., sliding="skip")`` leaves sliding layers whole and evicts only in
  full-attention layers (what KV-compression methods do on hybrid models: the windowed layers are
  already bounded);
- layers without a KV cache (recurrent / SSM / linear-attention blocks of hybrids) are skipped;
- static and quantized caches (fixed-size or packed buffers) are refused with a TypeError.

After an eviction the cache's own length no longer equals the next position: the next forward must pass
the original absolute ``position_ids`` (positions are preserved: cached keys keep their rotary phase),
and either ``attention_mask=None`` (no padding kept in the cache) or a mask over the cache *slots* plus
the new tokens (length ``stored + new``; full-attention-only caches). Hybrid caches index the mask per
layer kind (slots for full layers, absolute columns for windowed layers), so on them pass
``attention_mask=None`` and keep no pad positions.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any, Literal

import torch

if TYPE_CHECKING:  # pragma: no cover
    from tokensmith.models.adapter import ModelAdapter

__all__ = [
    "prefill",
    "num_cache_layers",
    "layer_kv",
    "set_layer_kv",
    "evict",
    "cache_kind",
    "layer_kind",
    "stored_positions",
    "expand",
    "extend",
]

# attributes this module sets on a transformers cache layer after an eviction: the absolute columns of
# the slots it kept ([B, H_kv, K]) and the number of columns the cache had seen at that time
_POS = "_tokensmith_positions"
_SEEN = "_tokensmith_seen"


def prefill(adapter: ModelAdapter, inputs: Any) -> tuple[Any, Any]:
    """Run the prompt once with a KV cache; returns ``(cache, output)``."""
    out = adapter.forward(inputs, use_cache=True)
    cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
    if cache is None:
        raise ValueError("this model returned no KV cache (is it a causal LM with use_cache support?)")
    return cache, out


def num_cache_layers(cache: Any) -> int:
    """Number of layers in the cache (including layers without keys/values on hybrids)."""
    if hasattr(cache, "layers"):
        return len(cache.layers)
    if hasattr(cache, "key_cache"):
        return len(cache.key_cache)
    raise TypeError(f"unsupported cache type {type(cache).__name__}")


def layer_kind(cache: Any, i: int) -> str:
    """``'full'``, ``'sliding'``, ``'none'`` (a layer without keys/values: recurrent, SSM, linear attention,
    or not yet filled), or ``'unsupported'`` (static / quantized buffers)."""
    if not hasattr(cache, "layers"):
        return "full" if hasattr(cache, "key_cache") else "unsupported"
    layer = cache.layers[i]
    name = type(layer).__name__
    if "Static" in name or "Quantized" in name or "Offloaded" in name:
        return "unsupported"
    if not isinstance(getattr(layer, "keys", None), torch.Tensor) or layer.keys.dim() != 4:
        return "none"
    if getattr(layer, "is_sliding", False) or "Sliding" in name:
        return "sliding"
    return "full"


def layer_kv(cache: Any, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of layer ``i``: ``[B, H_kv, n, d]`` each (``n`` = slots held; for a sliding-window
    layer the last ``min(T, W - 1)`` columns, see :func:`stored_positions`)."""
    if hasattr(cache, "layers"):
        layer = cache.layers[i]
        if not isinstance(getattr(layer, "keys", None), torch.Tensor):
            raise ValueError(f"cache layer {i} ({type(layer).__name__}) holds no keys/values (not an attention layer)")
        return layer.keys, layer.values
    if hasattr(cache, "key_cache"):
        return cache.key_cache[i], cache.value_cache[i]
    raise TypeError(f"unsupported cache type {type(cache).__name__}")


def stored_positions(cache: Any, i: int) -> torch.Tensor:
    """Absolute columns of the slots layer ``i`` holds: ``[B, H_kv, n]`` (long).

    A fresh full-attention layer holds ``0..n-1``; after :func:`evict` it holds the kept columns followed
    by the columns appended since. A sliding-window layer holds the last ``n`` of the
    ``cumulative_length`` columns it has seen.
    """
    k, _ = layer_kv(cache, i)
    B, H, n = k.shape[:3]
    kind = layer_kind(cache, i)
    if kind == "sliding":
        seen = int(cache.layers[i].cumulative_length)
        return torch.arange(seen - n, seen, device=k.device).expand(B, H, n)
    layer = cache.layers[i] if hasattr(cache, "layers") else None
    kept = getattr(layer, _POS, None)
    if kept is None:
        return torch.arange(n, device=k.device).expand(B, H, n)
    K = kept.shape[-1]
    if n < K or kept.shape[:2] != (B, H):
        raise ValueError(
            f"cache layer {i} was changed outside tokensmith after an eviction (holds {n} slots, {K} were kept); "
            "its token columns are unknown"
        )
    new = getattr(layer, _SEEN) + torch.arange(n - K, device=k.device)
    return torch.cat([kept.to(k.device), new.expand(B, H, n - K)], -1)


def set_layer_kv(
    cache: Any, i: int, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor | None = None
) -> None:
    """Replace the keys/values of layer ``i``.

    On a full-attention layer the slot count may shrink; ``positions`` (``[B, H_kv, n_new]`` absolute
    columns) tells later :func:`evict` calls which tokens the slots hold (default: unchanged when the slot
    count is, else the slots count as columns ``0..n_new-1``). The layer's own length then is
    ``n_new``, not the next position: the next forward must pass ``position_ids``.
    A sliding-window layer must keep its slot count (its ``cumulative_length``, which places the
    window, is left as it is); static / quantized layers are refused.
    """
    kind = layer_kind(cache, i)
    if kind == "unsupported":
        raise TypeError(
            f"cache layer {i} is a {type(cache.layers[i]).__name__ if hasattr(cache, 'layers') else type(cache).__name__}: "
            "static and quantized caches have fixed or packed buffers that cannot be rewritten; use the default DynamicCache"
        )
    if keys.shape != values.shape[:-1] + keys.shape[-1:] or keys.dim() != 4:
        raise ValueError(f"keys {tuple(keys.shape)} and values {tuple(values.shape)} must be [B, H_kv, n, d] alike")
    if not hasattr(cache, "layers"):
        cache.key_cache[i] = keys
        cache.value_cache[i] = values
        return
    layer = cache.layers[i]
    if kind == "none":
        raise ValueError(f"cache layer {i} ({type(layer).__name__}) holds no keys/values to replace")
    n_old = layer.keys.shape[-2]
    if kind == "sliding" and keys.shape[-2] != n_old:
        raise ValueError(
            f"cache layer {i} is a sliding-window layer holding the last {n_old} columns; it cannot shrink "
            "(transformers places the window by index arithmetic over contiguous columns). Evict only in "
            "full-attention layers (evict(..., sliding='skip'))"
        )
    if kind == "full":
        if positions is not None:
            if positions.shape != keys.shape[:3]:
                raise ValueError(f"positions must be [B, H_kv, n] = {tuple(keys.shape[:3])}, got {tuple(positions.shape)}")
            kept = getattr(layer, _POS, None)
            seen = n_old if kept is None else getattr(layer, _SEEN) + n_old - kept.shape[-1]  # columns seen so far
            setattr(layer, _SEEN, max(seen, int(positions.max()) + 1 if positions.numel() else 0))
            setattr(layer, _POS, positions.to(torch.long))
        elif keys.shape[-2] != n_old:
            for attr in (_POS, _SEEN):
                if hasattr(layer, attr):
                    delattr(layer, attr)
    layer.keys = keys
    layer.values = values


def cache_kind(cache: Any) -> str:
    """'dynamic' (all full attention), 'sliding' (all windowed), 'hybrid' (mixed sliding/full, or attention
    mixed with recurrent layers) or the class name for legacy caches."""
    layers = getattr(cache, "layers", None)
    if layers is None:
        return type(cache).__name__
    kinds = {("sliding" if (getattr(x, "is_sliding", False) or "Sliding" in type(x).__name__) else "full") for x in layers}
    if kinds == {"full"}:
        return "dynamic"
    return "sliding" if kinds == {"sliding"} else "hybrid"


def evict(
    cache: Any,
    keep: torch.Tensor | dict[int, torch.Tensor],
    *,
    sliding: Literal["error", "skip"] = "error",
) -> Any:
    """Keep only the given tokens in every (or each given) attention layer of the cache.

    For each layer ``l``, KV head ``h`` and row ``b``, the slots kept are those whose absolute column is
    in ``keep[b, h]``; the next query then attends to ``{kept columns} ∪ {new tokens}`` exactly as the
    full cache with the other columns masked out (tested against a per-head masked reference).

    Args:
        cache: a transformers ``DynamicCache`` (full, sliding-window or hybrid).
        keep: absolute token columns to keep: ``[B, K]`` (same tokens for all KV heads), ``[B, H_kv, K]``
            (per KV head), or ``{layer: indices}`` for some layers only. Order does not matter (slots stay
            in column order). Columns a layer does not hold (outside its window, or evicted before) are
            ignored; after that every head must keep the same number of slots (rectangular tensors).
        sliding: what to do when a sliding-window layer would lose a token inside its window: ``'error'``
            (default) raises; ``'skip'`` leaves sliding layers whole and evicts only in full-attention
            layers. Evictions that only drop tokens already outside the window are a no-op either way.

    Returns:
        the same cache object, modified in place. The next forward must pass the absolute
        ``position_ids`` (positions are preserved) and ``attention_mask=None`` or a mask over the slots +
        new tokens (see the module docstring).

    Raises:
        ValueError: a wrongly shaped ``keep``, unequal kept counts across heads, a sliding layer losing an
            in-window token with ``sliding='error'``, or a dict key naming a layer without keys/values.
        TypeError: static / quantized caches.
    """
    if sliding not in ("error", "skip"):
        raise ValueError(f"sliding must be 'error' or 'skip', got {sliding!r}")
    n = num_cache_layers(cache)
    explicit = isinstance(keep, dict)
    per_layer = keep if explicit else {i: keep for i in range(n)}
    plan: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # validated first: an error leaves the cache as it was
    for i, idx in per_layer.items():
        if not -n <= i < n:
            raise ValueError(f"layer {i} out of range for a cache with {n} layers")
        kind = layer_kind(cache, i)
        if kind == "unsupported":
            raise TypeError(
                f"cache layer {i} ({type(cache.layers[i]).__name__}) is a static or quantized buffer; evict works "
                "on the default DynamicCache (do not pass cache_implementation='static'/'quantized')"
            )
        if kind == "none":
            if explicit:
                raise ValueError(f"cache layer {i} holds no keys/values (a recurrent/SSM layer or not yet filled)")
            continue
        k, _ = layer_kv(cache, i)
        B, H = k.shape[:2]
        idx = torch.as_tensor(idx, device=k.device)
        if idx.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
            raise TypeError(f"keep must hold integer token indices, got dtype {idx.dtype}")
        if idx.dim() == 2 and idx.shape[0] == B:
            idx = idx[:, None, :].expand(B, H, idx.shape[-1])
        if idx.dim() != 3 or idx.shape[:2] != (B, H):
            raise ValueError(f"keep must be [B={B}, K] or [B, H_kv={H}, K], got {tuple(idx.shape)}")
        pos = stored_positions(cache, i)  # [B, H, n]
        hit = (pos[..., :, None] == idx.long()[..., None, :]).any(-1)  # [B, H, n] slot is kept
        if bool(hit.all()):
            continue  # nothing held by this layer is evicted (e.g. only tokens outside a window)
        if kind == "sliding":
            if sliding == "skip":
                continue
            lost = sorted({int(c) for c in pos[~hit].tolist()})
            raise ValueError(
                f"cache layer {i} is a sliding-window layer holding columns {int(pos.min())}..{int(pos.max())}; "
                f"evicting in-window columns {lost[:8]}{'...' if len(lost) > 8 else ''} is not supported "
                "(transformers places the window by index arithmetic over contiguous columns). Pass "
                "sliding='skip' to evict only in full-attention layers, or keep the window's columns"
            )
        counts = hit.sum(-1)
        if not bool((counts == counts.flatten()[0]).all()):
            raise ValueError(
                f"cache layer {i}: rows/heads would keep different numbers of tokens {counts.tolist()} (after "
                "ignoring columns the layer does not hold); keep the same number per head"
            )
        K = int(counts.flatten()[0])
        order = torch.where(hit, torch.arange(hit.shape[-1], device=k.device), hit.shape[-1])
        plan.append((i, torch.sort(order, -1).values[..., :K], pos))
    for i, slots, pos in plan:
        k, v = layer_kv(cache, i)
        g = slots[..., None].expand(*slots.shape, k.shape[-1])
        gv = slots[..., None].expand(*slots.shape, v.shape[-1])
        set_layer_kv(cache, i, k.gather(2, g), v.gather(2, gv), positions=pos.gather(2, slots))
    return cache


def expand(cache: Any, n: int, length: int | None = None) -> Any:
    """A new cache holding the first ``length`` columns of a batch-1 (or batch-``n``) cache for ``n`` rows.

    The tensors are *views* (``expand``), not copies, and the input cache is never modified: a forward that
    appends to the new cache concatenates into fresh tensors. This is how a search scores many candidates
    that share a prefix: :func:`prefill` the prefix once, then ``extend(adapter, expand(cache, N), ...)``
    per batch of candidates (METHODS.md MOD-8, OPT-A1). ``length`` crops to a shorter shared prefix (e.g.
    the tokens before the first position a candidate changes).

    Args:
        cache: a transformers ``DynamicCache`` (full, sliding-window or hybrid) with batch size 1 or ``n``.
        n: rows of the new cache.
        length: columns to keep (default: all). Sliding-window layers can be cropped only while they still
            hold every column they have seen (the window has not rolled); layers without keys/values
            (recurrent / SSM) cannot be cropped or shared at all.

    Raises:
        ValueError: a batch size other than 1 or ``n``, a ``length`` outside ``[1, columns]``, a cache whose
            layers cannot be cropped (rolled window, recurrent state) or that was evicted (positions are not
            contiguous).
        TypeError: static / quantized caches.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not hasattr(cache, "layers"):
        raise TypeError(f"expand needs a transformers >= 5 cache with .layers, got {type(cache).__name__}")
    new = copy.copy(cache)
    new.layers = []
    for i, layer in enumerate(cache.layers):
        kind = layer_kind(cache, i)
        if kind == "unsupported":
            raise TypeError(f"cache layer {i} ({type(layer).__name__}) is static or quantized; use the default DynamicCache")
        if kind == "none":
            raise ValueError(
                f"cache layer {i} ({type(layer).__name__}) holds no keys/values (a recurrent / SSM state): its state "
                "cannot be cropped or shared across rows; run candidates without a prefix cache"
            )
        if getattr(layer, _POS, None) is not None:
            raise ValueError(f"cache layer {i} was evicted; expand works on a cache of contiguous columns 0..T-1")
        k, v = layer.keys, layer.values
        B, seen = k.shape[0], k.shape[-2]
        if kind == "sliding":
            seen = int(layer.cumulative_length)
            if k.shape[-2] != seen and (length is None or length != seen):
                if length is not None:
                    raise ValueError(
                        f"cache layer {i} is a sliding-window layer whose window has rolled ({seen} columns seen, "
                        f"{k.shape[-2]} held): it cannot be cropped to {length} columns"
                    )
        L = seen if length is None else int(length)
        if not 1 <= L <= seen:
            raise ValueError(f"length {length} outside [1, {seen}] columns held by cache layer {i}")
        if B not in (1, n):
            raise ValueError(f"expand needs a cache of batch 1 or {n}, got batch {B}")
        nl = copy.copy(layer)
        if kind == "sliding" and k.shape[-2] != seen:  # rolled window, uncropped: keep what it holds
            nk, nv = k, v
        else:
            nk, nv = k[:, :, :L], v[:, :, :L]
            if kind == "sliding":
                nl.cumulative_length = L
        nl.keys = nk.expand(n, *nk.shape[1:])
        nl.values = nv.expand(n, *nv.shape[1:])
        new.layers.append(nl)
    return new


def extend(
    adapter: ModelAdapter,
    cache: Any,
    past_length: int,
    input_ids: torch.Tensor | None = None,
    *,
    inputs_embeds: torch.Tensor | None = None,
    logits_to_keep: int | torch.Tensor | None = None,
    **kwargs: Any,
) -> Any:
    """Continue a forward from a KV cache holding ``past_length`` unpadded columns.

    Rows are unpadded (all ``N`` rows share the cached prefix and have the same new length ``L``): the new
    tokens get positions ``past_length .. past_length + L - 1`` (plus the model's own first position), and
    no attention mask is passed (every cached and new column is attended). Equals the uncached forward of
    ``prefix ⊕ new`` at the new positions (tested on every tiny causal architecture).

    Args:
        adapter: the model.
        cache: e.g. ``expand(prefill_cache, N)``; it is appended to (pass a fresh :func:`expand` per call).
        past_length: columns the cache holds.
        input_ids: ``[N, L]`` new token ids (or ``inputs_embeds`` ``[N, L, d]``, e.g. a one-hot path).
        inputs_embeds: ``[N, L, d]`` embeddings instead of ids.
        logits_to_keep: positions (of the new tokens) whose logits to compute: an int (the last k) or a 1-D
            index tensor shared by all rows.
        **kwargs: passed to the model.

    Returns:
        the model output (``.logits`` ``[N, K, V]``, ``.past_key_values``).
    """
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("give exactly one of input_ids or inputs_embeds")
    x = input_ids if input_ids is not None else inputs_embeds
    N, L = x.shape[:2]
    adapter.check_length(past_length + L)
    params = adapter._fwd_params
    d: dict[str, Any] = {("cache" if "cache" in params else "past_key_values"): cache, "use_cache": True}
    if input_ids is not None:
        d["input_ids"] = input_ids.to(adapter.device)
    else:
        if not torch.isfinite(inputs_embeds).all():  # type: ignore[union-attr]
            raise ValueError("inputs_embeds contains NaN or inf")
        d["inputs_embeds"] = inputs_embeds
    if "position_ids" in params:
        off = adapter.positions.offset or 0
        pid = torch.arange(past_length, past_length + L, device=adapter.device) + off
        d["position_ids"] = pid.expand(N, L)
    if "cache_position" in params:
        d["cache_position"] = torch.arange(past_length, past_length + L, device=adapter.device)
    if logits_to_keep is not None and "logits_to_keep" in params:
        d["logits_to_keep"] = logits_to_keep.to(adapter.device) if isinstance(logits_to_keep, torch.Tensor) else logits_to_keep
    d.update(kwargs)
    return adapter.model(**d)
