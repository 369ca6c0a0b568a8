"""Attention-mask overrides for any model whose attention goes through transformers' attention interface.

``with attention_override(adapter, fn_or_mask):`` restricts which keys each query may attend to, in
``adapter.forward``, ``adapter.generate`` (prefill and every decode step, the cache included) and
``kvcache.extend``. The allowed set is the model's own mask (causal, padding, sliding window) AND the
override:

    allowed_l[b, h, q, k] = model_mask_l[b, h, q, k] ∧ override_l(ctx)[b, h, q, k]

(SepLLM, Chen et al. 2024, "SepLLM: Accelerate Large Language Models by Compressing One Segment into One
Separator"; sliding-window / local attention, Beltagy et al. 2020, "Longformer"). The override is a function
``fn(ctx) -> bool`` broadcastable to ``[B, H, Q, K]`` (``True`` = may attend; the head axis may be 1, the
KV-head count or the query-head count), a boolean tensor ``[B|1, 1|H_kv|H, N, N]`` indexed by absolute token
columns (so one tensor serves a whole generation of up to ``N`` columns), or ``{layer: fn_or_tensor}`` for
some layers only. ``ctx`` (:class:`MaskContext`) gives the layer, the query and key *positions* (logical:
0 = a row's first real token, also across decode steps and after :func:`kvcache.evict`, where the key
columns can differ per KV head), their columns and token ids.

How: one function is registered in transformers' ``AttentionInterface`` (and a mask function, the SDPA mask
materialised, in its ``AttentionMaskInterface``); inside the block the model's ``_attn_implementation`` is
switched to it. It ANDs the override into the mask it receives and hands the call on to what the model ran
before: SDPA, the model's own ``eager_attention_forward``, or tokensmith's attention probe (so
``capture_attention`` opened *before* the override records the overridden attention). No per-architecture
code: a one-time two-token probe checks that every attention layer calls the interface, and a model whose
attention does not (attention computed in the module itself, flash-attention or flex kernels) raises a
ValueError naming the layers.

Rows left with no key to attend to (a query that had keys before the override) raise a ValueError rather
than return the NaN/uniform rows SDPA and eager would give.
"""

from __future__ import annotations

import sys
import threading
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Union

import torch
from torch import nn

from tokensmith.models import hooks as _hooks
from tokensmith.models import kvcache

if TYPE_CHECKING:  # pragma: no cover
    from tokensmith.models.adapter import ModelAdapter

__all__ = [
    "MaskContext",
    "AttentionOverride",
    "attention_override",
    "local_window",
    "separator_mask",
    "OVERRIDE_IMPL",
]

OVERRIDE_IMPL = "tokensmith_mask_override"
# set on a cache by rerotate_cache("compact"): ([B, n] columns the slots held before, [B, n] their new positions)
REINDEXED_ATTR = "_tokensmith_reindexed"
_LOCK = threading.Lock()
_REGISTERED = False
# id(module calling the interface) -> [(session, layer)]
_ACTIVE: dict[int, list[tuple[AttentionOverride, int]]] = {}
# id(config) -> [open sessions, implementation to restore]
_IMPL_REFS: dict[int, list[Any]] = {}
# id(module calling the interface) -> the implementation it ran before the override (while any is open)
_MODULE_BASE: dict[int, str] = {}
# model -> {id(module calling the interface): layer} measured by the one-time probe
_INTERFACE: weakref.WeakKeyDictionary[nn.Module, dict[int, int]] = weakref.WeakKeyDictionary()
_RECORD: list[dict[int, nn.Module]] = []  # non-empty while the interface probe runs

MaskFn = Callable[["MaskContext"], torch.Tensor]
MaskSpec = Union[MaskFn, torch.Tensor]


@dataclass
class MaskContext:
    """What a mask function sees for one attention call.

    Attributes:
        layer: the decoder layer index.
        query_positions: ``[B, Q]`` logical positions of the queries (0 = the row's first real token).
        key_positions: ``[B, 1 or H_kv, K]`` logical positions of the keys (per KV head after a per-head
            :func:`kvcache.evict`).
        query_columns: ``[B, Q]`` absolute token columns of the queries (prompt columns ``0..T-1``, then one
            per generated token; padding columns included).
        key_columns: ``[B, 1 or H_kv, K]`` absolute columns of the keys.
        query_token_ids: ``[B, Q]`` token ids of the queries (-1 when the forward took ``inputs_embeds``).
        key_token_ids: ``[B, 1 or H_kv, K]`` token ids of the keys (-1 where unknown: ``inputs_embeds`` or a
            cache filled before the block).
        num_heads: query heads ``H``.
        num_kv_heads: key/value heads ``H_kv``.
        is_prefill: True on the first forward of a cache (or a forward without one).
        sliding_window: the layer's own window (None for full attention).
    """

    layer: int
    query_positions: torch.Tensor
    key_positions: torch.Tensor
    query_columns: torch.Tensor
    key_columns: torch.Tensor
    query_token_ids: torch.Tensor
    key_token_ids: torch.Tensor
    num_heads: int
    num_kv_heads: int
    is_prefill: bool
    sliding_window: int | None = None

    def distance(self) -> torch.Tensor:
        """``[B, 1|H_kv, Q, K]`` query position − key position (≥ 0 for the keys a causal query can see)."""
        return self.query_positions[:, None, :, None] - self.key_positions[:, :, None, :]


def local_window(w: int) -> MaskFn:
    """Sliding-window attention: a query at position ``p`` sees keys at ``p − w < p_k ≤ p``.

    ``allowed = (p_q − p_k) < w`` (the causal half comes from the model's own mask), the convention of
    transformers' ``sliding_window`` (a model configured with ``sliding_window=w`` computes the same).

    Args:
        w: window size (the query and ``w − 1`` tokens before it), ``>= 1``.

    Examples:
        >>> import tokensmith as ts
        >>> ad = ts.tiny("llama")
        >>> with attention_override(ad, local_window(3)):
        ...     out = ad.forward("Hello there, how are you")
    """
    if isinstance(w, bool) or not isinstance(w, int) or w < 1:
        raise ValueError(f"window size w must be an int >= 1, got {w!r}")

    def fn(ctx: MaskContext) -> torch.Tensor:
        return ctx.distance() < w

    return fn


def separator_mask(
    token_ids: torch.Tensor | None = None,
    separators: Iterable[int] = (),
    n_initial: int = 4,
    n_local: int = 256,
) -> MaskFn:
    """SepLLM attention (Chen et al. 2024): a query sees the first ``n_initial`` tokens (attention sinks),
    every separator token before it, and its ``n_local`` nearest tokens.

    ``allowed[q, k] = (p_k < n_initial) ∨ (x_k ∈ S) ∨ (p_q − p_k < n_local)`` with ``x_k`` the key's token
    id and ``S`` the separator ids (AND the model's causal/padding mask).

    Args:
        token_ids: ``[B, N]`` token id of every column, or None (default) to use the ids the forward calls
            saw (prompt and generated tokens; give them when the forward takes ``inputs_embeds``).
        separators: separator token ids (e.g. the ids of ``.``, ``,``, ``?``, ``!``, ``;``, ``:``, newline).
        n_initial: initial tokens every query sees (logical positions ``0..n_initial-1``).
        n_local: local window (the query and ``n_local − 1`` tokens before it), ``>= 1``.

    Examples:
        >>> import tokensmith as ts
        >>> ad = ts.tiny("llama")
        >>> dot = ad.tokenizer.convert_tokens_to_ids(".")
        >>> with attention_override(ad, separator_mask(separators=[dot], n_initial=2, n_local=3)):
        ...     out = ad.forward("One. Two. Three four five six.")
    """
    sep = torch.as_tensor(sorted({int(s) for s in separators}), dtype=torch.long)
    if n_initial < 0 or n_local < 1:
        raise ValueError(f"n_initial must be >= 0 and n_local >= 1, got {n_initial}, {n_local}")
    ids_all = None if token_ids is None else torch.as_tensor(token_ids).long()
    if ids_all is not None and ids_all.dim() != 2:
        raise ValueError(f"token_ids must be [B, N] (one id per column), got {tuple(ids_all.shape)}")

    def fn(ctx: MaskContext) -> torch.Tensor:
        if ids_all is None:
            kid = ctx.key_token_ids
        else:
            cols = ctx.key_columns
            if int(cols.max()) >= ids_all.shape[1]:
                raise ValueError(
                    f"token_ids covers {ids_all.shape[1]} columns; the call reaches column {int(cols.max())}"
                )
            src = ids_all.to(cols.device)
            if src.shape[0] == 1 and cols.shape[0] > 1:
                src = src.expand(cols.shape[0], -1)
            kid = src.gather(1, cols.reshape(cols.shape[0], -1)).reshape(cols.shape)
        keep = torch.isin(kid, sep.to(kid.device)) | (ctx.key_positions < n_initial)  # [B, h, K]
        return keep[:, :, None, :] | (ctx.distance() < n_local)

    return fn


def _register() -> None:
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    def materialised_sdpa_mask(*args: Any, **kwargs: Any) -> Any:
        kwargs["allow_is_causal_skip"] = False  # always a boolean [B, 1, Q, K] mask to AND into
        return sdpa_mask(*args, **kwargs)

    AttentionInterface.register(OVERRIDE_IMPL, _override_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(OVERRIDE_IMPL, materialised_sdpa_mask)
    _REGISTERED = True


def _base_attention(module: nn.Module, base: str) -> Callable[..., Any]:
    if base == "sdpa":
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward
    if base == "eager":
        fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
        if fn is None:
            raise ValueError(
                f"{type(module).__name__} has no module-level eager_attention_forward to delegate to; run the model "
                "with attn_implementation='sdpa' to use attention overrides"
            )
        return fn
    from tokensmith.models import attention as _attention

    if base == _attention.PROBE_IMPL:
        return _attention._probe_attention
    raise ValueError(f"cannot delegate to attention implementation {base!r}")


def _override_attention(module: nn.Module, query, key, value, attention_mask, *args: Any, **kwargs: Any):
    if _RECORD:
        _RECORD[-1][id(module)] = module
    base = _MODULE_BASE.get(id(module), "sdpa")
    entries = _ACTIVE.get(id(module))
    if not entries or _hooks._SUSPENDED[0]:
        # not overridden (a layer outside `layers`, or an internal probe forward): what the model ran before
        return _base_attention(module, base)(module, query, key, value, attention_mask, *args, **kwargs)
    B, H, Q, _ = query.shape
    K = key.shape[2]
    Hkv = key.shape[1]
    allowed = _model_allowed(module, attention_mask, B, Q, K, query.device)
    before_any = allowed.any(-1)
    for session, layer in list(entries):
        extra = session._extra(module, layer, B, H, Hkv, Q, K, kwargs)
        if extra is not None:
            allowed = allowed & extra
    if bool((before_any & ~allowed.any(-1)).any()):
        layer = entries[0][1]
        raise ValueError(
            f"the attention override leaves some query rows of layer {layer} with no key to attend to; keep at "
            "least the query's own position (e.g. OR the mask with ctx.distance() == 0)"
        )
    fn = _base_attention(module, base)
    if base == "eager":
        mask = torch.zeros(allowed.shape, dtype=query.dtype, device=query.device)
        mask = mask.masked_fill(~allowed, torch.finfo(query.dtype).min)
        return fn(module, query, key, value, mask, *args, **kwargs)
    return fn(module, query, key, value, allowed, *args, **kwargs)


def _model_allowed(
    module: nn.Module, mask: torch.Tensor | None, B: int, Q: int, K: int, device: torch.device
) -> torch.Tensor:
    """The model's own mask as booleans ``[B|1, 1|H, Q, K]`` (None: lower-right causal, or all for an
    encoder)."""
    if mask is None:
        if not getattr(module, "is_causal", True):
            return torch.ones(1, 1, Q, K, dtype=torch.bool, device=device)
        q = torch.arange(Q, device=device)[:, None] + (K - Q)
        return (torch.arange(K, device=device)[None, :] <= q)[None, None]
    if mask.dim() != 4:
        raise ValueError(f"expected a 4-D attention mask inside the attention call, got {tuple(mask.shape)}")
    mask = mask[..., :K]
    if mask.dtype == torch.bool:
        return mask
    return mask > torch.finfo(mask.dtype).min / 2


def _seen_columns(cache: Any) -> int:
    """Columns the cache has seen (before the current forward appends to it)."""
    if cache is None or not hasattr(cache, "layers"):
        if cache is not None and hasattr(cache, "get_seq_length"):
            return int(cache.get_seq_length())
        return 0
    seen = 0
    for i, layer in enumerate(cache.layers):
        kind = kvcache.layer_kind(cache, i)
        if kind == "sliding":
            seen = max(seen, int(layer.cumulative_length))
        elif kind == "full":
            n = layer.keys.shape[-2]
            kept = getattr(layer, kvcache._POS, None)
            seen = max(seen, n if kept is None else getattr(layer, kvcache._SEEN) + n - kept.shape[-1])
    return seen


class AttentionOverride:
    """Context manager ANDing a mask into every (or some) attention layer's own mask; see the module
    docstring and :func:`attention_override`.

    Args:
        adapter: the model.
        mask: ``fn(ctx) -> bool`` tensor, a boolean tensor ``[B|1, 1|H_kv|H, N, N]`` over absolute columns, or
            ``{layer: fn_or_tensor}``.
        layers: restrict a single ``fn``/tensor to these layers (default: every attention layer).

    Raises:
        ValueError: an attention implementation other than ``sdpa``/``eager`` (flash / flex kernels take
            no dense mask), layers whose attention does not call transformers' attention interface (named),
            a layer index out of range, a mask of the wrong shape or dtype, or an override leaving a query
            with no key.
        TypeError: a mask that is neither a function nor a tensor.
    """

    def __init__(
        self, adapter: ModelAdapter, mask: MaskSpec | dict[int, MaskSpec], layers: Iterable[int] | None = None
    ):
        self.adapter = adapter
        n = adapter.structure.num_layers
        have = [i for i, a in enumerate(adapter.structure.attn) if a is not None]
        if isinstance(mask, dict):
            if layers is not None:
                raise ValueError("give either a {layer: mask} dict or layers=, not both")
            per = {}
            for i, m in mask.items():
                if not -n <= int(i) < n:
                    raise ValueError(f"layer {i} out of range for a model with {n} layers")
                per[int(i) % n] = m
        else:
            sel = have if layers is None else [int(i) for i in layers]
            for i in sel:
                if not -n <= i < n:
                    raise ValueError(f"layer {i} out of range for a model with {n} layers")
            per = {i % n: mask for i in sel}
        missing = [i for i in per if adapter.structure.attn[i] is None]
        if missing:
            raise ValueError(f"layer(s) {missing} have no attention module; layers with attention: {have}")
        self.masks: dict[int, MaskFn] = {i: self._as_fn(m) for i, m in per.items()}
        # stream state: token ids and logical positions per column, and the current forward
        self._ids: torch.Tensor | None = None
        self._pos: torch.Tensor | None = None
        self._cur: tuple[int, int, Any] = (0, 0, None)
        self._handle: Any = None
        self._config_key: int | None = None
        self._registered: list[int] = []
        self._modules: list[int] = []

    @staticmethod
    def _as_fn(m: MaskSpec) -> MaskFn:
        if isinstance(m, torch.Tensor):
            return _tensor_mask_fn(m)
        if callable(m):
            return m
        raise TypeError(
            f"an attention override is a function ctx -> bool mask or a boolean tensor, got {type(m).__name__}"
        )

    # -- stream tracking ----------------------------------------------------------------------
    def _pre_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if _hooks._SUSPENDED[0]:
            return
        ids = kwargs.get("input_ids", args[0] if args and isinstance(args[0], torch.Tensor) else None)
        emb = kwargs.get("inputs_embeds")
        x = ids if ids is not None else emb
        if x is None:
            return
        B, Q = int(x.shape[0]), int(x.shape[1])
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        seen = _seen_columns(cache)
        dev = x.device
        hist_ids, hist_pos = self._ids, self._pos
        if seen == 0 or hist_ids is None:
            hist_ids = torch.full((B, 0), -1, dtype=torch.long, device=dev)
            hist_pos = torch.zeros((B, 0), dtype=torch.long, device=dev)
        if hist_ids.shape[0] != B:
            if hist_ids.shape[0] == 1:
                hist_ids, hist_pos = hist_ids.expand(B, -1), hist_pos.expand(B, -1)  # type: ignore[union-attr]
            else:  # another stream: what came before is unknown
                hist_ids = torch.full((B, 0), -1, dtype=torch.long, device=dev)
                hist_pos = torch.zeros((B, 0), dtype=torch.long, device=dev)
        have = hist_ids.shape[1]
        if have > seen:  # the cache shrank: compacted by rerotate_cache, or replaced
            re = getattr(cache, REINDEXED_ATTR, None)
            if re is not None and tuple(re[0].shape) == (B, seen) and int(re[0].max()) < have:
                hist_ids = hist_ids.gather(1, re[0].to(dev))
                hist_pos = re[1].to(dev)
            else:  # what its columns hold is unknown
                hist_ids = torch.full((B, seen), -1, dtype=torch.long, device=dev)
                hist_pos = torch.arange(seen, device=dev).expand(B, seen)
        elif have < seen:  # a cache filled before the block: unknown ids, unpadded positions
            pad = seen - have
            hist_ids = torch.cat([hist_ids, torch.full((B, pad), -1, dtype=torch.long, device=dev)], 1)
            hist_pos = torch.cat([hist_pos, torch.arange(have, seen, device=dev).expand(B, pad)], 1)  # type: ignore[list-item]
        new_ids = ids.long() if ids is not None else torch.full((B, Q), -1, dtype=torch.long, device=dev)
        pid = kwargs.get("position_ids")
        am = kwargs.get("attention_mask")
        off = self.adapter.positions.offset or 0
        if isinstance(pid, torch.Tensor) and pid.dim() == 2 and pid.shape[-1] == Q:
            new_pos = (pid.long() - off).expand(B, Q)
        elif isinstance(am, torch.Tensor) and am.dim() == 2 and am.shape[1] == seen + Q:
            new_pos = (am.long().cumsum(-1) - 1).clamp_min(0)[:, -Q:]
        else:
            start = int(hist_pos[:, -1].max()) + 1 if hist_pos.shape[1] else 0  # type: ignore[union-attr]
            new_pos = (start + torch.arange(Q, device=dev)).expand(B, Q)
        self._ids = torch.cat([hist_ids, new_ids.to(dev)], 1)
        self._pos = torch.cat([hist_pos, new_pos.to(dev)], 1)  # type: ignore[list-item]
        self._cur = (seen, Q, cache)

    def _extra(
        self, module: nn.Module, layer: int, B: int, H: int, Hkv: int, Q: int, K: int, kwargs: dict
    ) -> torch.Tensor | None:
        fn = self.masks.get(layer)
        if fn is None:
            return None
        seen, q_len, cache = self._cur
        dev = self._pos.device if self._pos is not None else torch.device("cpu")
        if self._pos is None or q_len != Q or self._pos.shape[0] != B:
            # a forward the pre-hook did not see (e.g. the model called from inside another module)
            seen = K - Q
            pos = torch.arange(K, device=dev).expand(B, K)
            ids = torch.full((B, K), -1, dtype=torch.long, device=dev)
        else:
            pos, ids = self._pos, self._ids
        ci = getattr(module, "layer_idx", layer)
        cols: torch.Tensor | None = None
        if (
            cache is not None
            and hasattr(cache, "layers")
            and isinstance(ci, int)
            and 0 <= ci < len(cache.layers)
        ):
            lay = cache.layers[ci]
            if getattr(lay, kvcache._POS, None) is not None and kvcache.layer_kind(cache, ci) == "full":
                c = kvcache.stored_positions(cache, ci)  # [B, H_kv, K] after this forward's update
                if c.shape[-1] == K:
                    cols = c
        if cols is None:
            cols = (seen + Q - K + torch.arange(K, device=dev)).expand(B, 1, K)
        cols = cols.to(dev)
        qcols = (seen + torch.arange(Q, device=dev)).expand(B, Q)
        total = pos.shape[1]
        if int(cols.max()) >= total or int(cols.min()) < 0:
            raise ValueError(
                f"layer {layer}: key columns {int(cols.min())}..{int(cols.max())} outside the {total} columns seen"
            )
        flat = cols.reshape(B, -1)
        ctx = MaskContext(
            layer=layer,
            query_positions=pos[:, seen : seen + Q] if total >= seen + Q else qcols,
            key_positions=pos.gather(1, flat).reshape(cols.shape),
            query_columns=qcols,
            key_columns=cols,
            query_token_ids=ids[:, seen : seen + Q]
            if ids.shape[1] >= seen + Q
            else torch.full((B, Q), -1, dtype=torch.long, device=dev),
            key_token_ids=ids.gather(1, flat).reshape(cols.shape),
            num_heads=H,
            num_kv_heads=Hkv,
            is_prefill=seen == 0,
            sliding_window=kwargs.get("sliding_window", getattr(module, "sliding_window", None)),
        )
        out = fn(ctx)
        if not isinstance(out, torch.Tensor) or out.dtype != torch.bool:
            raise TypeError(
                f"the mask function must return a boolean tensor, got {type(out).__name__} "
                f"{getattr(out, 'dtype', '')}"
            )
        if out.dim() != 4:
            raise ValueError(
                f"the mask function must return a 4-D [B, heads, Q, K] mask, got {tuple(out.shape)}"
            )
        h = out.shape[1]
        if h not in (1, H, Hkv):
            raise ValueError(f"mask head axis must be 1, H_kv={Hkv} or H={H}, got {h}")
        if h == Hkv and Hkv != H:
            out = out.repeat_interleave(H // Hkv, dim=1)
        try:
            torch.broadcast_shapes(out.shape, (B, H, Q, K))
        except RuntimeError as e:
            raise ValueError(
                f"mask {tuple(out.shape)} does not broadcast to [B={B}, H={H}, Q={Q}, K={K}]"
            ) from e
        return out.to(dev)

    # -- enter / exit -------------------------------------------------------------------------
    def __enter__(self) -> AttentionOverride:
        config = self.adapter.model.config
        impl = getattr(config, "_attn_implementation", None) or "eager"
        from tokensmith.models.attention import PROBE_IMPL

        if impl not in ("sdpa", "eager", PROBE_IMPL, OVERRIDE_IMPL):
            raise ValueError(
                f"attention overrides need a dense mask ('sdpa' or 'eager' attention), not {impl!r}; reload the model "
                "with attn_implementation='sdpa'"
            )
        _register()
        layer_of = _interface_modules(self.adapter)
        by_layer: dict[int, list[int]] = {}
        for mid, i in layer_of.items():
            by_layer.setdefault(i, []).append(mid)
        bad = sorted(i for i in self.masks if i not in by_layer)
        if bad:
            raise ValueError(
                f"layer(s) {bad} of {self.adapter.name!r} compute attention without transformers' attention "
                "interface, so their mask cannot be overridden (layers that can: "
                f"{sorted(by_layer)}); pass layers= / a dict without them"
            )
        with _LOCK:
            for i in self.masks:
                for mid in by_layer[i]:
                    _ACTIVE.setdefault(mid, []).append((self, i))
                    self._registered.append(mid)
            key = id(config)
            ref = _IMPL_REFS.get(key)
            if ref is None:
                ref = _IMPL_REFS[key] = [1, impl if impl != OVERRIDE_IMPL else "sdpa"]
            else:
                ref[0] += 1
            for mid in layer_of:
                _MODULE_BASE[mid] = ref[1]
            self._config_key = key
            self._modules = list(layer_of)
            config._attn_implementation = OVERRIDE_IMPL
        self._handle = self.adapter.model.register_forward_pre_hook(self._pre_forward, with_kwargs=True)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        with _LOCK:
            for mid in self._registered:
                lst = [e for e in _ACTIVE.get(mid, []) if e[0] is not self]
                if lst:
                    _ACTIVE[mid] = lst
                else:
                    _ACTIVE.pop(mid, None)
            self._registered.clear()
            ref = _IMPL_REFS.get(self._config_key) if self._config_key is not None else None
            if ref is not None:
                ref[0] -= 1
                if ref[0] <= 0:
                    self.adapter.model.config._attn_implementation = ref[1]
                    del _IMPL_REFS[self._config_key]
                    for mid in self._modules:
                        _MODULE_BASE.pop(mid, None)
            self._config_key = None
        self._ids = self._pos = None


def _interface_modules(adapter: ModelAdapter) -> dict[int, int]:
    """``{id(module): layer}`` of the modules that call the attention interface, from one two-token forward
    (once per model)."""
    got = _INTERFACE.get(adapter.model)
    if got is not None:
        return got
    config = adapter.model.config
    rec: dict[int, nn.Module] = {}
    _RECORD.append(rec)
    _hooks._SUSPENDED[0] += 1
    was_impl = config._attn_implementation
    was = adapter.model.training
    try:
        config._attn_implementation = OVERRIDE_IMPL
        adapter.model.eval()
        kw: dict[str, Any] = {"input_ids": adapter._probe_ids(2).to(adapter.device)}
        if "use_cache" in adapter._fwd_params:
            kw["use_cache"] = False
        with torch.no_grad():
            adapter.model(**kw)
    finally:
        config._attn_implementation = was_impl
        adapter.model.train(was)
        _hooks._SUSPENDED[0] -= 1
        _RECORD.pop()
    out: dict[int, int] = {}
    for i, attn in enumerate(adapter.structure.attn):
        if attn is None:
            continue
        inside = {id(m) for m in attn.modules()}
        for mid in rec:
            if mid in inside:
                out[mid] = i
    _INTERFACE[adapter.model] = out
    return out


def _tensor_mask_fn(m: torch.Tensor) -> MaskFn:
    if m.dtype != torch.bool or m.dim() != 4 or m.shape[-1] != m.shape[-2]:
        raise ValueError(
            f"a mask tensor must be boolean [B|1, heads, N, N] over absolute columns, got {m.dtype} {tuple(m.shape)}"
        )

    def fn(ctx: MaskContext) -> torch.Tensor:
        N = m.shape[-1]
        qc, kc = ctx.query_columns, ctx.key_columns  # [B, Q], [B, h, K]
        if int(qc.max()) >= N or int(kc.max()) >= N:
            raise ValueError(
                f"the mask tensor covers {N} columns; this call reaches column {max(int(qc.max()), int(kc.max()))}"
            )
        B = qc.shape[0]
        mm = m.to(qc.device)
        if mm.shape[0] not in (1, B):
            raise ValueError(f"the mask tensor's batch axis is {mm.shape[0]}, the forward has {B} rows")
        mm = mm.expand(B, *mm.shape[1:])
        hm, hk = mm.shape[1], kc.shape[1]
        h = max(hm, hk)
        if hm != h:
            mm = mm.repeat_interleave(h // hm, 1) if hm > 1 else mm.expand(B, h, N, N)
        if hk != h:
            kc = kc.repeat_interleave(h // hk, 1) if hk > 1 else kc.expand(B, h, kc.shape[-1])
        rows = mm.gather(2, qc[:, None, :, None].expand(B, h, qc.shape[1], N))  # [B, h, Q, N]
        return rows.gather(3, kc[:, :, None, :].expand(B, h, qc.shape[1], kc.shape[-1]))

    return fn


def attention_override(
    adapter: ModelAdapter, mask: MaskSpec | dict[int, MaskSpec], layers: Iterable[int] | None = None
) -> AttentionOverride:
    """``with attention_override(adapter, fn_or_mask):`` AND a mask into the model's attention masks.

    See the module docstring and :class:`AttentionOverride`. ``fn(ctx)`` returns a boolean mask
    broadcastable to ``[B, H, Q, K]`` (True = may attend); ready-made: :func:`local_window`,
    :func:`separator_mask`.

    Args:
        adapter: the model.
        mask: a function, a boolean ``[B|1, heads, N, N]`` tensor over absolute columns, or a
            ``{layer: function_or_tensor}`` dict.
        layers: the layers a single mask applies to (default: all attention layers).

    Examples:
        >>> import torch, tokensmith as ts
        >>> ad = ts.tiny("llama")
        >>> everything = lambda ctx: torch.ones(1, 1, 1, 1, dtype=torch.bool)
        >>> with attention_override(ad, everything):
        ...     a = ad.logits("Hello world")
        >>> torch.equal(a, ad.logits("Hello world"))
        True
    """
    return AttentionOverride(adapter, mask, layers)
