"""Layer operations and mid-forward continuation (METHODS.md MOD-7, MOD-9, MOD-10).

All operations are reversible context managers and never rewrite weights:

* :func:`skip_layers` — physically skip decoder layers (the layer is replaced by a pass-through module for
  the duration of the block; its output equals its input). ``truncate_layers(n)`` skips layers ``n..L-1``.
* :func:`swap_layers` — exchange two decoder layers in the stack (run with ``use_cache=False``; layer-type
  specific position embeddings, e.g. Gemma's sliding/global RoPE, follow the *position* in the stack).
* :func:`skip_layer_for_tokens` — h_l = h_{l−1} at masked token positions (``part='block'``), or zero the
  MLP contribution there (``part='ffn'``); simulated (computed then discarded), stated in the report.
* :func:`run_layers` — continue the forward from layer ``start`` with a new set of hidden states (e.g.
  fewer tokens after pruning), keeping original position ids (``positions='preserve'``, PRN-2) or
  re-indexing them (``'reindex'``). Layers before ``start`` are physically skipped.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:  # pragma: no cover
    from tokensmith.models.adapter import ModelAdapter

__all__ = ["skip_layers", "truncate_layers", "swap_layers", "skip_layer_for_tokens", "run_layers", "Passthrough"]


class Passthrough(nn.Module):
    """Stands in for a decoder layer: returns its hidden-state input unchanged.

    Attribute lookups the model's loop may make on the layer (``attention_type``, ``layer_idx``, ...) fall
    through to the original layer.
    """

    def __init__(self, original: nn.Module, returns_tuple: bool = False):
        super().__init__()
        object.__setattr__(self, "_original", original)
        self._returns_tuple = returns_tuple

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_original"), name)

    def forward(self, hidden_states: torch.Tensor | None = None, *args: Any, **kwargs: Any) -> Any:
        if hidden_states is None:
            hidden_states = args[0]
        return (hidden_states,) if self._returns_tuple else hidden_states


def _check_layers(adapter: ModelAdapter, layers: Iterable[int]) -> list[int]:
    n = adapter.structure.num_layers
    out = []
    for i in layers:
        if not -n <= int(i) < n:
            raise ValueError(f"layer {i} out of range for a model with {n} layers")
        out.append(int(i) % n)
    return sorted(set(out))


@contextmanager
def skip_layers(adapter: ModelAdapter, layers: Iterable[int]) -> Iterator[ModelAdapter]:
    """Physically skip ``layers`` inside the block (reversible ``delete_layer``).

    Examples:
        >>> import tokensmith as ts
        >>> ad = ts.tiny("llama")
        >>> with ad.skip_layers([1]):
        ...     z = ad.logits("Hello")
    """
    idx = _check_layers(adapter, layers)
    stack = adapter.structure.layers
    originals = {i: stack[i] for i in idx}
    tup = adapter.structure.layer_returns_tuple
    try:
        for i in idx:
            stack[i] = Passthrough(originals[i], tup)
        yield adapter
    finally:
        for i, m in originals.items():
            stack[i] = m


def truncate_layers(adapter: ModelAdapter, n: int):
    """Keep only the first ``n`` layers (the final norm and head still run): skip layers ``n..L-1``."""
    L = adapter.structure.num_layers
    if not 0 <= n <= L:
        raise ValueError(f"n must be in [0, {L}]")
    return skip_layers(adapter, range(n, L))


@contextmanager
def swap_layers(adapter: ModelAdapter, i: int, j: int) -> Iterator[ModelAdapter]:
    """Exchange layers ``i`` and ``j`` inside the block (use without a KV cache)."""
    a, b = (_check_layers(adapter, [x])[0] for x in (i, j))
    stack = adapter.structure.layers
    li, lj = stack[a], stack[b]
    try:
        stack[a], stack[b] = lj, li
        yield adapter
    finally:
        stack[a], stack[b] = li, lj


def skip_layer_for_tokens(
    adapter: ModelAdapter,
    token_mask: torch.Tensor,
    layers: Iterable[int],
    part: str = "block",
):
    """Make ``layers`` leave the masked tokens unchanged (ShortV-style, MOD-10).

    ``part='block'``: h_l = h_{l−1} at masked positions. ``part='ffn'``: the MLP adds nothing there.
    The mask is ``[B, T]`` in the coordinates of the prefill call. The computation still runs for those
    tokens (a *simulated* skip); the result equals a physical skip.
    """
    if part not in ("block", "ffn"):
        raise ValueError("part must be 'block' or 'ffn'")
    idx = _check_layers(adapter, layers)
    mask = token_mask.to(torch.bool)
    saved: dict[int, torch.Tensor] = {}

    def keep_pre(i: int):
        def fn(h: torch.Tensor, ctx: Any) -> None:
            saved[i] = h
            return None

        return fn

    def restore(i: int):
        def fn(h: torch.Tensor, ctx: Any) -> torch.Tensor:
            m = mask.to(h.device)
            if m.shape != h.shape[:2]:
                return h  # decode steps: the mask describes the prefill only
            return torch.where(m[..., None], saved.pop(i), h)

        return fn

    def zero_ffn(h: torch.Tensor, ctx: Any) -> torch.Tensor:
        m = mask.to(h.device)
        if m.shape != h.shape[:2]:
            return h
        return h.masked_fill(m[..., None], 0.0)

    edits: list[tuple[str, Any]] = []
    for i in idx:
        if part == "block":
            edits += [(f"layers.{i}.resid_pre", keep_pre(i)), (f"layers.{i}.resid_post", restore(i))]
        else:
            edits.append((f"layers.{i}.mlp.out", zero_ffn))
    return adapter.hooks(edit=edits)


def run_layers(
    adapter: ModelAdapter,
    hidden: torch.Tensor,
    start: int,
    end: int | None = None,
    *,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    positions: str = "preserve",
    logits: bool = True,
) -> dict[str, Any]:
    """Continue the forward from layer ``start`` (its ``resid_pre``) on the hidden states ``hidden``.

    Args:
        adapter: the model.
        hidden: ``[B, T', d]`` hidden states entering layer ``start`` — e.g. a pruned subset of the
            tokens cached at ``layers.{start}.resid_pre``.
        start: first layer to run; layers before it are physically skipped.
        end: run up to (excluding) this layer, then the final norm/head (default: all layers).
        attention_mask: ``[B, T']`` (1 = real token).
        position_ids: ``[B, T']`` original positions of the kept tokens (used with ``positions='preserve'``).
        positions: ``'preserve'`` keeps the given original ids (GAP, PRN-2); ``'reindex'`` uses 0..T'−1.
        logits: also return logits (else only the last hidden state).

    Returns:
        ``{"hidden": [B, T', d] output of layer end−1, "logits": [B, T', V] or None, "physical": True,
        "positions": positions}``.
    """
    L = adapter.structure.num_layers
    end = L if end is None else end
    if not 0 <= start < end <= L:
        raise ValueError(f"need 0 <= start < end <= {L}, got start={start}, end={end}")
    if positions not in ("preserve", "reindex"):
        raise ValueError("positions must be 'preserve' or 'reindex' ('rerotate' applies to KV caches)")
    B, T = hidden.shape[:2]
    am = attention_mask if attention_mask is not None else torch.ones(B, T, dtype=torch.long)
    if positions == "reindex" or position_ids is None:
        pid = (am.long().cumsum(-1) - 1).clamp_min(0)
    else:
        pid = position_ids
    dummy = torch.full((B, T), adapter.pad_token_id, dtype=torch.long)
    h_in = hidden.to(adapter.device)
    skipped = [i for i in range(L) if i < start or i >= end]

    def inject(h: torch.Tensor, ctx: Any) -> torch.Tensor:
        return h_in.to(h.dtype)

    if start == 0:
        # layer 0's input is the embedding output: replace it there
        edit_name = "layers.0.resid_pre"
    else:
        edit_name = f"layers.{start}.resid_pre"
    out_name = f"layers.{end - 1}.resid_post"
    with skip_layers(adapter, skipped), adapter.hooks(cache=[out_name], edit=[(edit_name, inject)]) as h:
        out = adapter.forward(
            {"input_ids": dummy, "attention_mask": am},
            position_ids=pid,
            logits_to_keep=0 if logits else 1,
        )
    return {
        "hidden": h.cache[out_name],
        "logits": out.logits if (logits and out is not None) else None,
        "physical": True,
        "positions": positions,
    }
