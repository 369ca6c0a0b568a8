"""Re-rotating cached keys to new positions: the ``positions="rerotate"`` policy (METHODS.md section 6).

After tokens are evicted from a KV cache (:func:`tokensmith.models.kvcache.evict`) the kept keys still carry
the rotary phase of their original positions. A pruning method may instead *re-index* the kept tokens
(``0..n-1``, as if the compacted sequence had been the prompt) and let generation continue at position
``n``. With rotary position embeddings (RoPE, Su et al. 2021, "RoFormer") that needs no recomputation:
a cached key is ``k_p = σ·R(p)·k`` (``R(p)`` rotates each 2-D plane ``(x_1, x_2)`` of the first ``r``
head dimensions by ``p·θ_f``; ``σ`` is the model's ``attention_scaling``, 1 except for YaRN-style
scalings), and rotations compose:

    R(p_new) · R(p_old)⁻¹ = R(p_new − p_old),   so   k_{p_new} = R(p_new − p_old) · k_{p_old}.

Per plane with angles ``a = p_old·θ``, ``b = p_new·θ``: ``cos(b − a) = (c_b c_a + s_b s_a)/σ²`` and
``sin(b − a) = (s_b c_a − c_b s_a)/σ²`` from the model's own ``(c, s) = σ·(cos, sin)`` tables, so the
re-rotated key carries exactly the fp32 rounding of ``σ·R(p_new)·k`` that a fresh forward would give.

Nothing here is a per-architecture table:

- the ``(cos, sin)`` each layer uses are read from the model itself: one forward with every decoder layer
  replaced by a pass-through (:func:`tokensmith.models.layers.skip_layers`) records the
  ``position_embeddings`` the model hands to each layer for the requested positions (Gemma-3's local and
  global bases, partial rotary ``r < head_dim`` of GPT-NeoX/Phi, YaRN's ``σ`` all come out of it);
- how a layer applies them (rotate-half pairs ``(i, i + r/2)`` or interleaved pairs ``(2i, 2i+1)``, and the
  direction of rotation) is *measured* once per model: in a sequence of one repeated token every layer's
  pre-RoPE key is the same at all positions (attention averages identical values), so the cached keys
  must satisfy ``k_p = R(p − p_0)·k_{p_0}``; the layout that reproduces them is kept, a layer whose keys do
  not move with the position (a NoPE layer) is left alone, and a model matching neither raises.

Models without RoPE (GPT-2's learned absolute positions are added to the hidden state before layer 0, so a
key's position cannot be changed afterwards) raise a ValueError naming the policies available there.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from tokensmith.models import hooks as _hooks
from tokensmith.models import kvcache
from tokensmith.models.layers import skip_layers

if TYPE_CHECKING:  # pragma: no cover
    from tokensmith.models.adapter import ModelAdapter

__all__ = [
    "RotaryLayout",
    "RerotateResult",
    "rotary_layouts",
    "rotary_tables",
    "rotate_keys",
    "rerotate_cache",
]

# model -> {cache layer: RotaryLayout or None (keys do not depend on the position)}
_LAYOUTS: weakref.WeakKeyDictionary[nn.Module, dict[int, RotaryLayout | None]] = weakref.WeakKeyDictionary()
_CALIBRATION_LENGTH = 8


@dataclass(frozen=True)
class RotaryLayout:
    """How one layer applies its rotary embedding to a ``[..., head_dim]`` key.

    Attributes:
        rotary_dims: ``r``, the leading head dimensions that rotate (the rest pass through).
        pairing: ``"half"`` (planes ``(i, i + r/2)``, Llama/NeoX ``rotate_half``) or ``"interleaved"``
            (planes ``(2i, 2i+1)``, GPT-J/Cohere style).
        sign: +1 when plane ``(x_1, x_2)`` turns to ``(x_1 c − x_2 s, x_2 c + x_1 s)``, −1 for the opposite
            direction.
        per_plane: the layer's tables have one column per plane (``r/2``, GPT-J), not one per dimension.
        sin_first: the layer is given ``(sin, cos)`` instead of ``(cos, sin)`` (GPT-J).
    """

    rotary_dims: int
    pairing: Literal["half", "interleaved"]
    sign: int = 1
    per_plane: bool = False
    sin_first: bool = False

    def planes(self) -> tuple[slice, slice]:
        """Index of the first and second coordinate of every rotating plane."""
        r = self.rotary_dims
        if self.pairing == "half":
            return slice(0, r // 2), slice(r // 2, r)
        return slice(0, r, 2), slice(1, r, 2)


@dataclass
class RerotateResult:
    """What :func:`rerotate_cache` did.

    Attributes:
        cache: the same cache object, modified in place.
        next_position: ``[B]`` the rotary position the next token of each row must take (for ``"compact"``:
            the number of kept real tokens; pass it as ``position_ids`` or use ``kvcache.extend``).
        attention_mask: ``[B, n]`` mask over the cache slots (1 = real token) when the cache holds padding
            slots (``attention_mask`` was given), else None; append ones for the new tokens.
        layers: the cache layers whose keys were rotated.
    """

    cache: Any
    next_position: torch.Tensor
    attention_mask: torch.Tensor | None
    layers: list[int]


_POLICIES = (
    "Position policies available on this model: 'preserve' (kvcache.evict keeps every token at its original "
    "position; pass the original position_ids to the next forward) and 'reindex' (new tokens continue at the "
    "compacted count while the cached keys keep the positions they were computed at: an approximation)"
)


def _no_rope_error(adapter: ModelAdapter, why: str) -> ValueError:
    return ValueError(
        f"rerotate needs rotary position embeddings (RoPE) and {adapter.name!r} {why}. {_POLICIES}"
    )


def _check_rope(adapter: ModelAdapter) -> None:
    lim = adapter.position_limit
    if lim.table_limit is not None:
        raise _no_rope_error(
            adapter,
            f"has a learned absolute position table ({lim.table_name!r}) added to the hidden states before "
            "layer 0, so a cached key cannot be moved to another position",
        )


def rotary_tables(
    adapter: ModelAdapter, positions: torch.Tensor
) -> dict[int, tuple[torch.Tensor, torch.Tensor] | None]:
    """The ``(cos, sin)`` the model gives each decoder layer at ``positions``.

    One forward with every decoder layer replaced by a pass-through records the ``position_embeddings``
    argument of each layer (cost: the embedding and the rotary tables, no attention or MLP). User hook
    sessions do not see it.

    Args:
        adapter: the model.
        positions: 1-D non-negative rotary positions (logical: 0 = a row's first real token).

    Returns:
        ``{layer: (cos, sin)}`` with fp32 ``[P, r]`` tables (``r`` = rotary dimensions), or ``None`` for a
        layer that receives no ``position_embeddings`` pair.
    """
    s = adapter.structure
    pos = torch.as_tensor(positions, dtype=torch.long).reshape(-1).to(adapter.device)
    if pos.numel() == 0:
        return {i: None for i in range(s.num_layers)}
    if bool((pos < 0).any()):
        raise ValueError("rotary positions must be >= 0")
    rec: dict[int, Any] = {}
    ids = adapter._probe_ids(1).to(adapter.device).expand(1, pos.numel())
    kw: dict[str, Any] = {"input_ids": ids}
    if "position_ids" not in adapter._fwd_params:
        raise _no_rope_error(adapter, "takes no position_ids")
    kw["position_ids"] = pos[None] + (adapter.positions.offset or 0)
    if "use_cache" in adapter._fwd_params:
        kw["use_cache"] = False
    handles = []
    with skip_layers(adapter, range(s.num_layers)):
        for i, layer in enumerate(s.layers):

            def pre(mod: nn.Module, args: tuple, kwargs: dict, _i: int = i) -> None:
                rec[_i] = kwargs.get("position_embeddings")

            handles.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
        _hooks._SUSPENDED[0] += 1
        was = adapter.model.training
        try:
            adapter.model.eval()
            with torch.no_grad():
                adapter.model(**kw)
        finally:
            _hooks._SUSPENDED[0] -= 1
            adapter.model.train(was)
            for h in handles:
                h.remove()
    out: dict[int, tuple[torch.Tensor, torch.Tensor] | None] = {}
    P = pos.numel()
    for i in range(s.num_layers):
        pe = rec.get(i)
        if (
            isinstance(pe, (tuple, list))
            and len(pe) == 2
            and all(isinstance(t, torch.Tensor) for t in pe)
            and pe[0].shape == pe[1].shape
            and pe[0].shape[-2:-1] == (P,)
            and pe[0].numel() == P * pe[0].shape[-1]
        ):
            out[i] = (pe[0].reshape(P, -1).float(), pe[1].reshape(P, -1).float())
        else:
            out[i] = None
    return out


def rotate_keys(
    keys: torch.Tensor,
    old: torch.Tensor,
    new: torch.Tensor,
    table: tuple[torch.Tensor, torch.Tensor],
    table_positions: torch.Tensor,
    layout: RotaryLayout,
) -> torch.Tensor:
    """``R(new − old)·k`` for every slot: keys rotated from positions ``old`` to ``new``.

    Args:
        keys: ``[..., n, head_dim]`` cached keys.
        old: ``[..., n]`` positions the keys carry now.
        new: ``[..., n]`` positions they should carry.
        table: the layer's ``(cos, sin)`` ``[P, r]`` (from :func:`rotary_tables`) at ``table_positions``.
        table_positions: sorted 1-D ``[P]`` positions of the table rows (must contain ``old`` and ``new``).
        layout: how the layer applies RoPE (:func:`rotary_layouts`).

    Returns:
        keys of the same dtype; computed in fp32. Pass-through dimensions are unchanged.
    """
    cos, sin = table[::-1] if layout.sin_first else table
    shape = old.shape
    i1, _ = layout.planes()
    c, s = (cos, sin) if layout.per_plane else (cos[:, i1], sin[:, i1])  # [P, r/2] one entry per plane
    old = old.reshape(-1).contiguous().to(table_positions.device)
    new = new.reshape(-1).contiguous().to(table_positions.device)
    ia = torch.searchsorted(table_positions, old)
    ib = torch.searchsorted(table_positions, new)
    last = len(table_positions) - 1
    if bool((table_positions[ia.clamp_max(last)] != old).any()) or bool(
        (table_positions[ib.clamp_max(last)] != new).any()
    ):
        raise ValueError("table_positions must contain every old and new position")
    ca, sa, cb, sb = c[ia], s[ia], c[ib], s[ib]
    sigma2 = ca * ca + sa * sa
    cd = ((cb * ca + sb * sa) / sigma2).reshape(*shape, -1).to(keys.device)
    sd = ((sb * ca - cb * sa) / sigma2).reshape(*shape, -1).to(keys.device) * layout.sign
    return _apply_rotation(keys, cd, sd, layout)


def _apply_rotation(
    keys: torch.Tensor, cd: torch.Tensor, sd: torch.Tensor, layout: RotaryLayout
) -> torch.Tensor:
    i1, i2 = layout.planes()
    x = keys.float()
    x1, x2 = x[..., i1], x[..., i2]
    out = x.clone()
    out[..., i1] = x1 * cd - x2 * sd
    out[..., i2] = x2 * cd + x1 * sd
    return out.to(keys.dtype)


def _candidate_layouts(table: tuple[torch.Tensor, torch.Tensor], head_dim: int) -> list[RotaryLayout]:
    """Layouts consistent with a layer's tables (``[P, w]`` at positions ``0..P-1``): which of the pair is
    the cosine (at position 0 it is ``σ``, the sine 0), and whether the ``w`` columns are one per dimension
    (equal within each plane) or one per plane."""
    a, b = table
    if torch.allclose(b[0], torch.zeros_like(b[0]), atol=1e-6) and bool((a[0].abs() > 1e-3).all()):
        cos, sin_first = a, False
    elif torch.allclose(a[0], torch.zeros_like(a[0]), atol=1e-6) and bool((b[0].abs() > 1e-3).all()):
        cos, sin_first = b, True
    else:
        return []
    w = cos.shape[-1]
    out: list[RotaryLayout] = []
    for pairing in ("half", "interleaved"):
        opts = []
        if w >= 2 and w % 2 == 0 and w <= head_dim:
            lay = RotaryLayout(w, pairing, sin_first=sin_first)  # type: ignore[arg-type]
            i1, i2 = lay.planes()
            if torch.allclose(cos[:, i1], cos[:, i2], rtol=0, atol=1e-6):
                opts.append(lay)
        if 2 * w <= head_dim:
            opts.append(RotaryLayout(2 * w, pairing, per_plane=True, sin_first=sin_first))  # type: ignore[arg-type]
        for lay in opts:
            out += [lay, RotaryLayout(lay.rotary_dims, lay.pairing, -1, lay.per_plane, lay.sin_first)]
    return out


def rotary_layouts(adapter: ModelAdapter) -> dict[int, RotaryLayout | None]:
    """How every attention layer applies RoPE, measured once per model (then remembered).

    One forward of a single token repeated ``8`` times: every layer's pre-RoPE key is then the same at all
    positions (an attention layer averages identical values), so the cached keys satisfy
    ``k_p = R(p − p_0)·k_{p_0}``. For each layer, among the layouts its tables allow (which of the pair is
    the cosine, one column per dimension or per plane, rotate-half or interleaved planes, either
    direction), the one reproducing the cached keys to
    ``max(1e-4, 64·ε)`` relative is kept. A layer whose keys do not change with the position gets ``None``
    (no RoPE there: rerotation leaves it alone).

    Raises:
        ValueError: a model without RoPE (learned absolute positions), or a layer whose keys move with the
            position in a way no layout explains (e.g. rotary applied inside the attention module from a
            table the layer is not given).
    """
    _check_rope(adapter)
    got = _LAYOUTS.get(adapter.model)
    if got is not None:
        return got
    P = _CALIBRATION_LENGTH
    ids = adapter._probe_ids(1).to(adapter.device).expand(1, P)
    _hooks._SUSPENDED[0] += 1
    was = adapter.model.training
    try:
        adapter.model.eval()
        with torch.no_grad():
            out = adapter.model(input_ids=ids, use_cache=True)
    finally:
        _hooks._SUSPENDED[0] -= 1
        adapter.model.train(was)
    cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
    if cache is None:
        raise _no_rope_error(adapter, "returned no KV cache")
    tables = rotary_tables(adapter, torch.arange(P))
    eps = torch.finfo(adapter.dtype).eps if adapter.dtype.is_floating_point else 1e-7
    result: dict[int, RotaryLayout | None] = {}
    for i in range(kvcache.num_cache_layers(cache)):
        if kvcache.layer_kind(cache, i) not in ("full", "sliding"):
            continue
        k, _ = kvcache.layer_kv(cache, i)
        cols = kvcache.stored_positions(cache, i)[0, 0]  # [n] columns the layer holds
        k = k[0].float()  # [H, n, d]
        scale = float(k.abs().max()) + 1e-12
        tol = max(1e-4, 64 * eps) * scale
        ref = k[:, :1].expand_as(k)
        if float((k - ref).abs().max()) <= tol:
            result[i] = None
            continue
        table = tables.get(i)
        if table is None:
            raise _no_rope_error(
                adapter,
                f"has keys in layer {i} that depend on the position, but the layer is given no rotary "
                "(cos, sin) position_embeddings to re-apply (rotary computed inside the attention module, or "
                "absolute positions)",
            )
        tpos = torch.arange(P, device=table[0].device)
        best, err = None, float("inf")
        for lay in _candidate_layouts(table, k.shape[-1]):
            old = cols[:1].expand(k.shape[0], -1).expand(k.shape[0], k.shape[1])
            new = cols.expand(k.shape[0], -1)
            pred = rotate_keys(ref, old, new, table, tpos, lay)
            e = float((pred - k).abs().max())
            if e < err:
                best, err = lay, e
        if best is None or err > tol:
            found = (
                "no layout fits its tables"
                if best is None
                else (
                    f"the best layout {best} reproduces the keys of a repeated token to {err / scale:.2e} relative, "
                    f"tolerance {tol / scale:.1e}"
                )
            )
            raise ValueError(
                f"could not identify how layer {i} of {adapter.name!r} applies its rotary embedding ({found}); "
                f"rerotation is not available on this model. {_POLICIES}"
            )
        result[i] = best
    _LAYOUTS[adapter.model] = result
    return result


def _logical_positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.long().cumsum(-1) - 1).clamp_min(0)


def rerotate_cache(
    adapter: ModelAdapter,
    cache: Any,
    new_positions: Literal["compact"] | torch.Tensor | dict[int, torch.Tensor] | None = "compact",
    *,
    attention_mask: torch.Tensor | None = None,
    sliding: Literal["error", "skip"] = "error",
) -> RerotateResult:
    """Re-apply RoPE to the cached keys for new positions (after eviction or compaction).

    Each key slot is rotated by ``R(p_new − p_old)`` (module docstring); values are unchanged.

    ``"compact"`` (default, also ``None``) re-indexes the kept slots of every layer, row and KV head to
    consecutive positions ending right before the next token, as a prompt of the kept tokens would have
    them: a full-attention layer holding ``n`` slots gets ``0..n-1`` (when layers hold different numbers
    ``n_l``, e.g. per-layer budgets, layer ``l`` gets ``N − n_l .. N − 1`` with ``N = max n_l``, so the newest
    kept token is adjacent to the next one everywhere); a sliding-window layer keeps its most recent
    ``min(held, N)`` slots at ``N − held .. N − 1`` (the relative distances inside the window are kept). The
    cache then is an ordinary contiguous cache of ``N`` columns when all layers hold ``N`` slots: the next
    forward continues at position ``N`` (``kvcache.extend(adapter, cache, N, ...)``, or HF ``generate`` with
    the slot mask), and later :func:`kvcache.evict` calls address slots ``0..N-1``.

    With ``attention_mask`` (``[B, columns]`` over the columns the cache has seen, 1 = real token: the
    prompt's left-padding mask, extended by ones for generated tokens), old positions are the logical ones
    (``cumsum(mask) − 1``), padding slots are left untouched, and each row's real slots become
    ``0..r_b − 1``; the result's ``attention_mask`` (over the slots) and ``next_position`` (``r_b``) are
    what the next forward takes. Full-attention caches only (a hybrid cache indexes masks per layer kind).

    An explicit tensor ``new_positions`` (``[B, n]`` or ``[B, H_kv, n]``, or ``{layer: tensor}``) moves each
    slot of the full-attention layers to the given position; :func:`kvcache.stored_positions` then reports
    them and the next forward must pass ``position_ids``.

    Args:
        adapter: the model (RoPE; see :func:`rotary_layouts`).
        cache: a transformers ``DynamicCache`` (full, sliding-window or hybrid), e.g. after ``kvcache.evict``.
        new_positions: ``"compact"`` / ``None``, or explicit positions.
        attention_mask: optional ``[B, columns]`` padding mask (see above).
        sliding: with explicit positions, ``'error'`` (default) refuses a sliding-window layer, ``'skip'``
            leaves sliding layers as they are.

    Returns:
        :class:`RerotateResult` (the cache, the next position per row, the slot mask, the rotated layers).

    Raises:
        ValueError: a model without RoPE (the message lists the position policies available there), shapes
            that do not match the cache, rows whose KV heads hold different numbers of real tokens, padding
            on a hybrid cache, or negative positions.
        TypeError: static / quantized caches.

    Examples:
        >>> import torch, tokensmith as ts
        >>> from tokensmith.models import kvcache
        >>> ad = ts.tiny("llama")
        >>> ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
        >>> cache, _ = kvcache.prefill(ad, {"input_ids": ids})
        >>> _ = kvcache.evict(cache, torch.tensor([[0, 4, 5]]))
        >>> res = rerotate_cache(ad, cache)
        >>> res.next_position.tolist(), kvcache.stored_positions(cache, 0)[0, 0].tolist()
        ([3], [0, 1, 2])
    """
    if sliding not in ("error", "skip"):
        raise ValueError(f"sliding must be 'error' or 'skip', got {sliding!r}")
    _check_rope(adapter)
    n_layers = kvcache.num_cache_layers(cache)
    kinds = {i: kvcache.layer_kind(cache, i) for i in range(n_layers)}
    bad = [i for i, k in kinds.items() if k == "unsupported"]
    if bad:
        raise TypeError(
            f"cache layers {bad} are static or quantized buffers; rerotation works on the default DynamicCache"
        )
    full = [i for i, k in kinds.items() if k == "full"]
    slid = [i for i, k in kinds.items() if k == "sliding"]
    if not full and not slid:
        raise ValueError("the cache holds no keys/values")
    first = kvcache.layer_kv(cache, (full or slid)[0])[0]
    B, device = first.shape[0], first.device
    # plan: layer -> (old [B,H,n], new [B,H,n], rotate mask [B,H,n] or None, crop to last n or None)
    plan: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, int | None]] = {}
    slot_mask: torch.Tensor | None = None
    columns: dict[int, torch.Tensor] = {}  # full layers: the absolute columns each slot held before
    plain: set[int] = set()  # layers that become ordinary contiguous layers
    if new_positions is None or (isinstance(new_positions, str) and new_positions == "compact"):
        if attention_mask is not None:
            if slid:
                raise ValueError(
                    "compact with attention_mask works on full-attention caches only: a hybrid cache indexes the "
                    "mask by slots in full layers and by columns in sliding layers. Run unpadded rows (one at a "
                    "time or of equal length) and pass attention_mask=None"
                )
            am = torch.as_tensor(attention_mask).to(device).bool()
            if am.dim() != 2 or am.shape[0] != B:
                raise ValueError(f"attention_mask must be [B={B}, columns], got {tuple(am.shape)}")
            logical = _logical_positions(am)
            counts = {kvcache.layer_kv(cache, i)[0].shape[2] for i in full}
            if len(counts) != 1:
                raise ValueError(
                    f"layers hold different numbers of slots {sorted(counts)}; compact with attention_mask needs "
                    "one slot mask for all layers (equal slot counts)"
                )
            real_ref = None
            for i in full:
                cols = kvcache.stored_positions(cache, i)
                if int(cols.max()) >= am.shape[1]:
                    raise ValueError(
                        f"attention_mask covers {am.shape[1]} columns but cache layer {i} holds column "
                        f"{int(cols.max())}; extend the mask with ones for the generated tokens"
                    )
                real = am.gather(1, cols.reshape(B, -1)).reshape(cols.shape)
                if real_ref is None:
                    real_ref = real
                    if not bool((real == real[:, :1]).all()):
                        raise ValueError(
                            "KV heads of a row hold padding at different slots; one slot mask cannot describe "
                            "the cache (evict the same columns in every head, or evict the padding)"
                        )
                elif not torch.equal(real, real_ref):
                    raise ValueError(
                        "layers hold padding at different slots; one slot mask cannot describe them"
                    )
                old = logical.gather(1, cols.reshape(B, -1)).reshape(cols.shape)
                new = torch.where(real, real.long().cumsum(-1) - 1, old)
                columns[i] = cols
                plan[i] = (old, new, real, None)
                plain.add(i)
            assert real_ref is not None
            slot_mask = real_ref[:, 0].long()
            next_pos = slot_mask.sum(-1)
        else:
            held = {i: kvcache.layer_kv(cache, i)[0].shape[2] for i in full + slid}
            N = max(held[i] for i in full) if full else max(held.values())
            for i in full:
                n = held[i]
                old = kvcache.stored_positions(cache, i)
                new = (N - n + torch.arange(n, device=device)).expand_as(old)
                plan[i] = (old, new, None, None)
                columns[i] = old
                if n == N:
                    plain.add(i)
            for i in slid:
                keep = min(held[i], N)
                old = kvcache.stored_positions(cache, i)[..., -keep:]
                new = (N - keep + torch.arange(keep, device=device)).expand_as(old)
                plan[i] = (old, new, None, keep)
            next_pos = torch.full((B,), N, dtype=torch.long, device=device)
    elif isinstance(new_positions, str):
        raise ValueError(
            f"new_positions must be 'compact', None, a tensor or a {{layer: tensor}} dict, got {new_positions!r}"
        )
    else:
        if attention_mask is not None:
            raise ValueError(
                "attention_mask is used with 'compact' only; give explicit positions per slot instead"
            )
        per_layer = (
            new_positions if isinstance(new_positions, dict) else {i: new_positions for i in full + slid}
        )
        for i, p in per_layer.items():
            if not -n_layers <= int(i) < n_layers:
                raise ValueError(f"layer {i} out of range for a cache with {n_layers} layers")
            i = int(i) % n_layers
            kind = kinds[i]
            if kind == "none":
                if isinstance(new_positions, dict):
                    raise ValueError(f"cache layer {i} holds no keys/values")
                continue
            if kind == "sliding":
                if sliding == "skip":
                    continue
                raise ValueError(
                    f"cache layer {i} is a sliding-window layer (contiguous columns placed by index arithmetic); "
                    "explicit positions apply to full-attention layers only: pass sliding='skip', a {layer: "
                    "positions} dict of full layers, or new_positions='compact'"
                )
            k, _ = kvcache.layer_kv(cache, i)
            Bk, H, n = k.shape[:3]
            p = torch.as_tensor(p, device=device)
            if p.dtype.is_floating_point or p.dtype == torch.bool:
                raise TypeError(f"new positions must be integers, got {p.dtype}")
            if p.dim() == 2 and p.shape == (Bk, n):
                p = p[:, None].expand(Bk, H, n)
            if p.shape != (Bk, H, n):
                raise ValueError(
                    f"new positions for cache layer {i} must be [B={Bk}, n={n}] or [B, H_kv={H}, n], got {tuple(p.shape)}"
                )
            if bool((p < 0).any()):
                raise ValueError("new positions must be >= 0")
            plan[i] = (kvcache.stored_positions(cache, i), p.long(), None, None)
        tops = [int(pl[1].max()) + 1 for pl in plan.values() if pl[1].numel()]
        next_pos = torch.full((B,), max(tops) if tops else 0, dtype=torch.long, device=device)
    layouts = rotary_layouts(adapter)
    todo = {i: pl for i, pl in plan.items() if layouts.get(i) is not None}
    if todo:
        allpos = torch.cat([torch.cat([o.reshape(-1), n.reshape(-1)]) for o, n, _, _ in todo.values()])
        tpos = torch.unique(allpos.cpu()).to(device)
        if bool((tpos < 0).any()):
            raise ValueError("positions must be >= 0 (an old position was negative)")
        tables = rotary_tables(adapter, tpos)
    for i, (old, new, rot, crop) in plan.items():
        k, v = kvcache.layer_kv(cache, i)
        lay = layouts.get(i)
        if crop is not None:
            k, v = k[:, :, -crop:], v[:, :, -crop:]
        if lay is not None:
            table = tables[i]
            if table is None:  # calibrated as RoPE, but no table this time: refuse rather than guess
                raise ValueError(f"layer {i} received no rotary tables in the position probe")
            k2 = rotate_keys(k, old, new, table, tpos.to(table[0].device), lay)
            k = k2 if rot is None else torch.where(rot[..., None], k2, k)
        layer = cache.layers[i] if hasattr(cache, "layers") else None
        if kinds[i] == "sliding":
            layer.keys, layer.values = k, v  # type: ignore[union-attr]
            layer.cumulative_length = int(next_pos.max())  # type: ignore[union-attr]
            continue
        if i in plain:
            kvcache.set_layer_kv(cache, i, k, v)
            for attr in (kvcache._POS, kvcache._SEEN):
                if layer is not None and hasattr(layer, attr):
                    delattr(layer, attr)
        else:
            kvcache.set_layer_kv(cache, i, k, v, positions=new)
            if layer is not None:
                setattr(layer, kvcache._SEEN, int(next_pos.max()))
    _mark_reindexed(
        cache, plan, columns, full, compact=isinstance(new_positions, str) or new_positions is None
    )
    return RerotateResult(cache, next_pos, slot_mask, sorted(todo))


def _mark_reindexed(
    cache: Any, plan: dict, columns: dict[int, torch.Tensor], full: list[int], compact: bool
) -> None:
    """Tell an open attention override which columns the compacted slots held (so its token ids follow
    them): only when every full layer and KV head kept the same columns and the cache is now contiguous."""
    from tokensmith.models.masking import REINDEXED_ATTR

    if hasattr(cache, REINDEXED_ATTR):
        delattr(cache, REINDEXED_ATTR)
    if not compact or not full:
        return
    old0, new0 = columns[full[0]], plan[full[0]][1]
    same = all(
        columns[i].shape == old0.shape and torch.equal(columns[i], old0) and torch.equal(plan[i][1], new0)
        for i in full
    ) and bool((old0 == old0[:, :1]).all())
    if same:
        setattr(cache, REINDEXED_ATTR, (old0[:, 0].clone(), new0[:, 0].clone()))
