"""Hooks over canonical names (METHODS.md MOD-4, MOD-6).

Canonical names (TransformerLens-style, independent of the architecture's attribute names)::

    embed                      output of the token-embedding module (scaled for Gemma)
    layers.{i}.resid_pre       input hidden states of decoder layer i
    layers.{i}.resid_post      output hidden states of decoder layer i
    layers.{i}.attn.q|k|v      outputs of the q/k/v projections ([B, T, H*d], [B, T, H_kv*d]; before RoPE);
                               for fused projections (GPT-2 ``c_attn``, GPT-NeoX ``query_key_value``) the
                               matching columns of the fused output (see "Fused QKV" below)
    layers.{i}.attn.z          per-head attention outputs before the output projection ([B, T, H*d])
    layers.{i}.attn.out        output of the attention block before the residual add; for post-LN blocks that
                               normalise inside the attention module (BERT: LayerNorm(resid_pre + attn.out)),
                               the output of the output projection
    layers.{i}.attn.probs      attention probabilities [B, H, Tq, Tk] (cache only; see attention.py)
    layers.{i}.mlp.in|act|out  MLP input, input of its down projection, output
    final_norm                 output of the final norm
    logits                     output of the LM head (only the positions the forward computed)

Wildcards use shell patterns: ``layers.*.resid_post``, ``layers.1?.attn.out``.

A hook function has the signature ``fn(tensor, ctx) -> tensor | None`` where ``ctx`` is a
:class:`HookContext` giving the layer, the forward step, absolute positions (left padding removed),
whether this is prefill or a decode step, and the pad offsets. Returning a tensor replaces the
activation. Hooks are removed in ``finally`` — also when the block raises.

Micro-batching is transparent: inside :meth:`ModelAdapter.token_logprobs` (or any loop run through
:meth:`ModelAdapter.micro_batch`) every forward covers rows ``ctx.rows`` of a full batch of
``ctx.batch_size``; caches and gradients are assembled by rows (one ``[B, ...]`` record per logical call,
as if unsplit), an attempt that fails (out of memory, then retried smaller) leaves nothing behind, and
:func:`patch_fn`/:func:`steer_fn`/:func:`ablate_fn` values with a leading dimension of ``batch_size`` (and
``[B, T]`` position masks) are sliced to the rows of each forward.

Caching selected positions: ``cache_positions=`` (see :class:`HookSession`) keeps only some tokens of each
cached tensor — ``"last"`` (the last real token of each row, left or right padding read from the attention
mask), absolute positions (an int or a list; negative counts from the end of each row), a ``[B, T]`` boolean
mask or ``fn(ctx) -> mask``. The record is a new, small tensor (a gather, never a view of the full
activation): ``[B, ...]`` for ``"last"``/an int, ``[B, k, ...]`` for a list of ``k``, ``[N_selected, ...]``
(row-major) for a mask.

Fused QKV: when a layer has no separate q/k/v projections but one module whose weight maps ``d`` to
``(H + 2·H_kv)·d_head`` columns, ``attn.q|k|v`` select columns of that output. Two layouts exist: *blocked*
``[Q | K | V]`` (GPT-2 ``c_attn``, Phi-3 ``qkv_proj``) and *grouped* — per KV head ``g`` a block
``[q_(g,1) … q_(g,G) | k_g | v_g]`` (GPT-NeoX/BLOOM with ``G = 1``, Falcon). The layout is identified, once per
model, by a one-token forward: there every head attends only to itself, so ``attn.z`` equals the head's
``v``, and only one layout's ``v`` columns reproduce it (q precedes k in both). Edits write the returned
tensor back into those columns of the fused output.
"""

from __future__ import annotations

import fnmatch
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from tokensmith.models.batching import RowAssembler

if TYPE_CHECKING:  # pragma: no cover
    from tokensmith.models.adapter import ModelAdapter

__all__ = [
    "HookContext",
    "HookSession",
    "ActivationCache",
    "StopForward",
    "steer_fn",
    "patch_fn",
    "ablate_fn",
    "hook_names",
    "rows_of",
    "FusedQKV",
    "fused_qkv_index",
    "attention_geometry",
]

HookFn = Callable[[torch.Tensor, "HookContext"], "torch.Tensor | None"]


class StopForward(Exception):
    """Raised by a hook to end the forward early (``stop_after=``); caught by the adapter."""


@dataclass
class HookContext:
    """What a hook function knows about the call it runs in.

    Attributes:
        name: canonical hook name.
        layer: decoder layer index, or None for ``embed``/``final_norm``/``logits``.
        step: 0 for the first forward inside the ``with`` block, then 1, 2, ... (one per decode step).
        positions: ``[B, T]`` absolute positions of the tokens in this call (left padding not counted).
        is_prefill: True when no KV cache was filled before this call.
        pad_offsets: ``[B]`` number of left-pad tokens (from the attention mask) or None.
        attention_mask: the 2D attention mask given to the model, or None.
        rows: the rows ``[start, stop)`` of the full batch this forward covers (``slice(0, B)`` unless a
            micro-batched call split the batch). ``positions``, ``pad_offsets``, ``attention_mask`` and the
            hooked tensor are those of these rows only.
        batch_size: the number of rows of the full (logical) batch.

    A per-example value ``v`` of the full batch (``[batch_size, ...]``) is ``v[ctx.rows]`` for this forward.
    """

    name: str
    layer: int | None
    step: int
    positions: torch.Tensor | None
    is_prefill: bool
    pad_offsets: torch.Tensor | None
    attention_mask: torch.Tensor | None
    rows: slice | None = None
    batch_size: int | None = None

    @property
    def is_partial(self) -> bool:
        """True when this forward covers only part of the logical batch (micro-batching)."""
        if self.rows is None or self.batch_size is None:
            return False
        return self.rows.stop - self.rows.start != self.batch_size


@dataclass
class _ForwardState:
    step: int = -1
    positions: torch.Tensor | None = None
    is_prefill: bool = True
    pad_offsets: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None
    batch: int | None = None
    # for position-selected caches (cache_positions=): which tokens of a hooked tensor are real
    past: int = 0
    decoder_attention_mask: torch.Tensor | None = None
    encoder_runs: bool = False  # encoder-decoder: this forward runs the encoder (its embeddings come first)
    embed_calls: int = 0  # calls of the embedding module in this forward (shared by T5's encoder and decoder)


# -- fused QKV projections and post-LN attention blocks -------------------------------------------------------
_LAYOUTS = ("blocked", "grouped")


@dataclass(frozen=True)
class FusedQKV:
    """Where ``q``, ``k`` and ``v`` sit in the output of a fused projection (see the module docstring).

    Attributes:
        module: the fused projection (``nn.Linear``, GPT-2 ``Conv1D``, ...).
        layout: ``'blocked'`` or ``'grouped'``.
        index: ``{'q'|'k'|'v': LongTensor}`` columns of the fused output, in head-major order (the order a
            separate ``q_proj`` would produce).
    """

    module: nn.Module
    layout: str
    index: dict[str, torch.Tensor]


def fused_qkv_index(layout: str, part: str, num_heads: int, num_kv_heads: int, head_dim: int) -> torch.Tensor:
    """Columns of ``part`` (``'q'``, ``'k'``, ``'v'``) in a fused ``[.., (H + 2·H_kv)·d_head]`` output.

    ``blocked``: ``[Q (H·d) | K (H_kv·d) | V (H_kv·d)]``. ``grouped``: for each KV head ``g`` a block of
    ``(G + 2)·d`` columns ``[q_(g,1) … q_(g,G) | k_g | v_g]`` with ``G = H / H_kv``; query head ``h`` is
    ``q_(h // G, h % G)``.

    Examples:
        >>> fused_qkv_index("grouped", "v", 2, 2, 1).tolist()
        [2, 5]
        >>> fused_qkv_index("blocked", "k", 2, 1, 2).tolist()
        [4, 5]
    """
    H, Hkv, d = int(num_heads), int(num_kv_heads), int(head_dim)
    if part not in ("q", "k", "v"):
        raise ValueError(f"part must be 'q', 'k' or 'v', got {part!r}")
    if H % Hkv:
        raise ValueError(f"num_heads={H} is not a multiple of num_kv_heads={Hkv}")
    G = H // Hkv
    if layout == "blocked":
        start = {"q": 0, "k": H * d, "v": (H + Hkv) * d}[part]
        return torch.arange(start, start + (H if part == "q" else Hkv) * d)
    if layout != "grouped":
        raise ValueError(f"layout must be one of {_LAYOUTS}, got {layout!r}")
    base = torch.arange(Hkv)[:, None] * ((G + 2) * d)
    if part == "q":
        off = torch.arange(G * d)
    else:
        off = (G if part == "k" else G + 1) * d + torch.arange(d)
    return (base + off[None]).reshape(-1)


def _is_norm(m: nn.Module) -> bool:
    return "norm" in type(m).__name__.lower()


def _fused_qkv_module(adapter: ModelAdapter, i: int) -> nn.Module | None:
    """The one module inside layer ``i``'s attention whose weight maps ``d`` to ``(H + 2·H_kv)·d_head``,
    when the layer has no separate q/k/v projections."""
    s = adapter.structure
    attn = s.attn[i]
    if attn is None or any(m is not None for m in (s.q_proj[i], s.k_proj[i], s.v_proj[i])):
        return None
    H, hd = s.num_heads, s.head_dim
    if not H or not hd:
        return None
    Hkv = s.num_kv_heads or H
    want = sorted((s.hidden_size, (H + 2 * Hkv) * hd))
    hits = [
        m
        for m in attn.modules()
        if m is not attn
        and m is not s.o_proj[i]
        and isinstance(getattr(m, "weight", None), torch.Tensor)
        and m.weight.dim() == 2
        and sorted(m.weight.shape) == want
    ]
    return hits[0] if len(hits) == 1 else None


@dataclass
class _AttnGeometry:
    out_module: nn.Module  # where attn.out is read
    fused: FusedQKV | None
    fused_error: str | None


# attention module -> what the one-token probe found (weak: forgets modules that are gone)
_GEOMETRY: weakref.WeakKeyDictionary[nn.Module, _AttnGeometry] = weakref.WeakKeyDictionary()
_SUSPENDED = [0]  # > 0 while the geometry probe runs: active sessions ignore that forward


def internal_forward_running() -> bool:
    """True while the adapter runs an internal probe forward (the fused-QKV layout probe): active hook
    sessions and attention probes ignore that forward, so it never shows up in user records."""
    return _SUSPENDED[0] > 0


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape:
        return False
    scale = float(b.abs().max()) + 1e-6
    # the same fp32 operations recomputed: differences are a few ulps of the magnitude
    return bool((a.float() - b.float()).abs().max() <= 1e-4 * scale)


def attention_geometry(adapter: ModelAdapter, layer: int) -> _AttnGeometry:
    """Fused-QKV layout and the ``attn.out`` module of ``layer`` (probed once per model, then cached).

    Layers whose attention holds neither a fused projection nor a norm need no probe: ``attn.out`` is the
    attention module's output. Otherwise one forward of two single-token sequences decides (i) the fused
    layout (``attn.z`` must equal the ``v`` columns, repeated per KV group) and (ii) whether the module's
    output is ``Norm(resid_pre + o_proj(z))`` (post-LN, BERT-style), in which case ``attn.out`` is read from
    the output projection.
    """
    s = adapter.structure
    attn = s.attn[layer]
    if attn is None:
        raise ValueError(f"layer {layer} has no discovered attention module; pass AdapterSpec(attn=...)")
    if attn in _GEOMETRY:
        return _GEOMETRY[attn]
    todo = []
    for i in range(s.num_layers):
        a = s.attn[i]
        if a is None or a in _GEOMETRY:
            continue
        fused = _fused_qkv_module(adapter, i)
        has_norm = any(_is_norm(m) for m in a.modules() if m is not a)
        if fused is None and not has_norm:
            _GEOMETRY[a] = _AttnGeometry(a, None, None)
        else:
            todo.append((i, a, fused))
    if todo:
        _probe_geometry(adapter, todo)
    return _GEOMETRY[attn]


def _probe_geometry(adapter: ModelAdapter, todo: list[tuple[int, nn.Module, nn.Module | None]]) -> None:
    s = adapter.structure
    model = adapter.model
    recs: dict[int, dict[str, torch.Tensor]] = {i: {} for i, _, _ in todo}
    handles: list[Any] = []

    def put(r: dict[str, torch.Tensor], key: str, t: Any) -> None:
        t = t[0] if isinstance(t, (tuple, list)) else t
        if isinstance(t, torch.Tensor):
            r[key] = t.detach()

    try:
        for i, a, fused in todo:
            r = recs[i]
            handles.append(
                a.register_forward_pre_hook(
                    lambda m, args, kw, r=r: put(r, "x", args[0] if args else kw.get("hidden_states")), with_kwargs=True
                )
            )
            handles.append(a.register_forward_hook(lambda m, args, out, r=r: put(r, "a", out)))
            o = s.o_proj[i]
            if o is not None:
                handles.append(o.register_forward_pre_hook(lambda m, args, r=r: put(r, "z", args[0] if args else None)))
                handles.append(o.register_forward_hook(lambda m, args, out, r=r: put(r, "p", out)))
            if fused is not None:
                handles.append(fused.register_forward_hook(lambda m, args, out, r=r: put(r, "qkv", out)))
        ids = adapter._probe_ids(2).reshape(2, 1).to(adapter.device)
        kw: dict[str, Any] = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if "use_cache" in adapter._fwd_params:
            kw["use_cache"] = False
        was = model.training
        _SUSPENDED[0] += 1
        try:
            model.eval()
            with torch.no_grad():
                model(**kw)
        except Exception as err:  # noqa: BLE001 - recorded: only the hooks that need the probe fail
            for r in recs.values():
                r.clear()
            recs_error = f"the one-token probe forward failed ({type(err).__name__}: {err})"
        else:
            recs_error = None
        finally:
            _SUSPENDED[0] -= 1
            model.train(was)
    finally:
        for h in handles:
            h.remove()
    H, hd = s.num_heads or 0, s.head_dim or 0
    Hkv = s.num_kv_heads or H
    for i, a, fused in todo:
        r = recs[i]
        out_module: nn.Module = a
        x, p, y = r.get("x"), r.get("p"), r.get("a")
        if x is not None and p is not None and y is not None and x.shape == p.shape == y.shape and not _close(p, y):
            with torch.no_grad():
                for m in a.modules():
                    if m is not a and _is_norm(m) and _close(m(x + p), y):
                        out_module = s.o_proj[i]  # type: ignore[assignment]
                        break
        fq, err = None, None
        if fused is not None:
            qkv, z = r.get("qkv"), r.get("z")
            if qkv is None or z is None:
                err = recs_error or "the fused projection or the output projection did not run in the probe forward"
            else:
                for layout in _LAYOUTS:
                    v = qkv.index_select(-1, fused_qkv_index(layout, "v", H, Hkv, hd).to(qkv.device))
                    v = v.reshape(*v.shape[:-1], Hkv, hd).repeat_interleave(H // Hkv, dim=-2).flatten(-2)
                    if _close(v, z):
                        fq = FusedQKV(fused, layout, {p_: fused_qkv_index(layout, p_, H, Hkv, hd) for p_ in "qkv"})
                        break
                else:
                    err = (
                        "neither the blocked [Q|K|V] nor the grouped [q..q k v] layout of the fused projection "
                        "reproduces the attention output of a one-token input"
                    )
        _GEOMETRY[a] = _AttnGeometry(out_module, fq, err)


def hook_names(adapter: ModelAdapter) -> list[str]:
    """All canonical names available on this model."""
    s = adapter.structure
    names = ["embed"]
    for i in range(s.num_layers):
        p = f"layers.{i}."
        names += [p + "resid_pre", p + "resid_post"]
        if s.attn[i] is not None:
            names.append(p + "attn.out")
            names.append(p + "attn.probs")
        for part, mods in (("q", s.q_proj), ("k", s.k_proj), ("v", s.v_proj)):
            if mods[i] is not None and mods[i] is not s.o_proj[i]:
                names.append(p + f"attn.{part}")
        if _fused_qkv_module(adapter, i) is not None:
            names += [p + "attn.q", p + "attn.k", p + "attn.v"]
        if s.o_proj[i] is not None:
            names.append(p + "attn.z")
        if s.mlp[i] is not None:
            names += [p + "mlp.in", p + "mlp.out"]
            if s.mlp_out[i] is not None:
                names.append(p + "mlp.act")
    if s.final_norm is not None:
        names.append("final_norm")
    if s.lm_head is not None:
        names.append("logits")
    return names


def expand(adapter: ModelAdapter, patterns: Iterable[str] | str) -> list[str]:
    """Expand wildcard patterns to canonical names, raising a helpful error for unknown names."""
    if isinstance(patterns, str):
        patterns = [patterns]
    available = hook_names(adapter)
    out: list[str] = []
    for pat in patterns:
        hits = [n for n in available if fnmatch.fnmatchcase(n, pat)]
        if not hits:
            raise ValueError(
                f"no hook point matches {pat!r} on this model. Examples of valid names: "
                f"{available[:3] + available[-3:]}; see ModelAdapter.hook_names()"
            )
        out.extend(h for h in hits if h not in out)
    return out


def _resolve(adapter: ModelAdapter, name: str) -> tuple[torch.nn.Module, str, int | None]:
    """Return (module, 'out' | 'in' | 'fused:q|k|v', layer)."""
    s = adapter.structure
    if name == "embed":
        return s.embed, "out", None
    if name == "final_norm":
        return s.final_norm, "out", None  # type: ignore[return-value]
    if name == "logits":
        return s.lm_head, "out", None  # type: ignore[return-value]
    parts = name.split(".")
    i = int(parts[1])
    rest = ".".join(parts[2:])
    if rest == "attn.out":
        return attention_geometry(adapter, i).out_module, "out", i
    if rest in ("attn.q", "attn.k", "attn.v") and _fused_qkv_module(adapter, i) is not None:
        geo = attention_geometry(adapter, i)
        if geo.fused is None:
            raise ValueError(
                f"{name}: layer {i} has a fused QKV projection whose layout could not be identified "
                f"({geo.fused_error}); use layers.{i}.attn.z or attn.out instead"
            )
        return geo.fused.module, "fused:" + rest[-1], i
    table: dict[str, tuple[Any, str]] = {
        "resid_pre": (s.layers[i], "in"),
        "resid_post": (s.layers[i], "out"),
        "attn.out": (s.attn[i], "out"),
        "attn.q": (s.q_proj[i], "out"),
        "attn.k": (s.k_proj[i], "out"),
        "attn.v": (s.v_proj[i], "out"),
        "attn.z": (s.o_proj[i], "in"),
        "mlp.in": (s.mlp[i], "in"),
        "mlp.out": (s.mlp[i], "out"),
        "mlp.act": (s.mlp_out[i], "in"),
    }
    mod, kind = table[rest]
    return mod, kind, i


# -- position-selected caches (cache_positions=) ---------------------------------------------------------------
def _check_cache_positions(spec: Any) -> str | None:
    """Validate ``cache_positions`` and return the layout of its records (None: no selection)."""
    if spec is None:
        return None
    if isinstance(spec, str):
        if spec != "last":
            raise ValueError(f"cache_positions={spec!r}: the only named selection is 'last'")
        return "stack"
    if isinstance(spec, bool):
        raise TypeError("cache_positions must be 'last', an int, a list of ints, a [B, T] bool mask or fn(ctx)")
    if isinstance(spec, int):
        return "stack"
    if isinstance(spec, torch.Tensor):
        if spec.dim() != 2 or spec.dtype != torch.bool:
            raise ValueError(
                f"a cache_positions mask must be a [batch, seq] bool tensor, got {spec.dtype} of shape {list(spec.shape)}"
            )
        return "cat0"
    if callable(spec):
        return "cat0"
    if isinstance(spec, (list, tuple)):
        if not spec or not all(isinstance(p, int) and not isinstance(p, bool) for p in spec):
            raise ValueError(f"cache_positions as a list must hold at least one int position, got {spec!r}")
        return "cat1"
    raise TypeError(
        f"cache_positions must be 'last', an int, a list of ints, a [B, T] bool mask or fn(ctx), got {type(spec).__name__}"
    )


class _Selection:
    """Which tokens of one hooked ``[B, T, ...]`` tensor a position-selected cache keeps."""

    def __init__(self, index: torch.Tensor | None = None, mask: torch.Tensor | None = None, squeeze: bool = False):
        self.index, self.mask, self.squeeze = index, mask, squeeze

    def take(self, x: torch.Tensor) -> torch.Tensor:
        """A new tensor holding the selected tokens (advanced indexing copies: never a view of ``x``)."""
        if self.mask is not None:
            return x[self.mask.to(x.device)]
        idx = self.index.to(x.device)  # type: ignore[union-attr]
        out = x[torch.arange(x.shape[0], device=x.device)[:, None], idx]
        return out[:, 0] if self.squeeze else out

    def shape(self, x: torch.Tensor) -> torch.Size:
        if self.mask is not None:
            return torch.Size([int(self.mask.sum()), *x.shape[2:]])
        B, k = self.index.shape  # type: ignore[union-attr]
        return torch.Size([B, *x.shape[2:]]) if self.squeeze else torch.Size([B, k, *x.shape[2:]])


def _real_tokens(st: _ForwardState, name: str, B: int, T: int, enc_dec: bool) -> tuple[torch.Tensor | None, int]:
    """The attention mask ``[B, W]`` (``W >= T``; the last ``T`` columns are this forward's tokens) that says
    which tokens of a hooked ``[B, T, ...]`` tensor are real, or None (all real), and the KV-cache length.

    Decoder-only and encoder models: the mask given to the model. Encoder-decoder models: hook points live
    in the decoder stack, so the decoder's mask (``decoder_attention_mask``, None = all real), except the
    embedding module's first call in a forward that runs the encoder (T5 shares one embedding module).
    """
    if enc_dec:
        encoder_side = name == "embed" and st.encoder_runs and st.embed_calls == 1
        am = st.attention_mask if encoder_side else st.decoder_attention_mask
        past = 0 if encoder_side else st.past
    else:
        am, past = st.attention_mask, st.past
    if am is None or am.dim() != 2:
        return None, past
    if am.shape[0] != B or am.shape[1] < T:
        raise ValueError(
            f"cache_positions at {name}: the hooked tensor covers [{B}, {T}] tokens but the attention mask is "
            f"{list(am.shape)}; positions cannot be selected here (cache this name without cache_positions)"
        )
    return am.bool(), past


def _select(
    spec: Any, name: str, t: torch.Tensor, ctx: HookContext, st: _ForwardState, enc_dec: bool
) -> _Selection | None:
    """The :class:`_Selection` of ``spec`` on ``t`` for this forward, or None: nothing to record (a decode step
    holding none of the requested positions)."""
    if t.dim() < 2:
        raise ValueError(f"cache_positions at {name}: the tensor has shape {list(t.shape)}, not [batch, seq, ...]")
    B, T = int(t.shape[0]), int(t.shape[1])
    am, past = _real_tokens(st, name, B, T, enc_dec)
    dev = t.device
    if isinstance(spec, torch.Tensor) or (callable(spec) and not isinstance(spec, str)):
        m = spec(ctx) if callable(spec) and not isinstance(spec, torch.Tensor) else spec
        m = torch.as_tensor(m)
        if m.dim() != 2:
            raise ValueError(f"cache_positions at {name}: a mask must be [batch, seq], got shape {list(m.shape)}")
        m = m.to(device=dev, dtype=torch.bool)
        if m.shape[0] != B and ctx.batch_size is not None and m.shape[0] == ctx.batch_size and ctx.rows is not None:
            m = m[ctx.rows]
        if m.shape[1] != T and am is not None and m.shape[1] == am.shape[1]:
            m = m[:, -T:]  # a mask over the whole sequence so far (decode steps): this forward's columns
        if tuple(m.shape) != (B, T):
            raise ValueError(
                f"cache_positions at {name}: the mask is {list(m.shape)} but the tensor covers [{B}, {T}] tokens "
                "(give one column per token of the forward, or per token of the attention mask)"
            )
        return _Selection(mask=m)
    if am is None:
        real = torch.ones(B, T, dtype=torch.bool, device=dev)
        pos = torch.arange(past, past + T, device=dev).expand(B, T)
    else:
        am = am.to(dev)
        real = am[:, -T:]
        pos = (am.long().cumsum(-1) - 1)[:, -T:]
    if spec == "last":
        if not bool(real.any(-1).all()):
            rows = torch.nonzero(~real.any(-1)).flatten().tolist()
            raise ValueError(f"cache_positions='last' at {name}: row(s) {rows} have no real token in this forward")
        idx = (T - 1 - real.flip(-1).int().argmax(-1))[:, None]
        return _Selection(index=idx, squeeze=True)
    wanted = [spec] if isinstance(spec, int) else list(spec)
    from_end = real.int().flip(-1).cumsum(-1).flip(-1)  # real tokens at or after each column, in this forward
    idx = torch.zeros(B, len(wanted), dtype=torch.long, device=dev)
    ok = torch.zeros(B, len(wanted), dtype=torch.bool, device=dev)
    for j, p in enumerate(wanted):
        hit = real & ((pos == p) if p >= 0 else (from_end == -p))
        ok[:, j] = hit.any(-1)
        idx[:, j] = hit.int().argmax(-1)
    if bool(ok.all()):
        return _Selection(index=idx, squeeze=isinstance(spec, int))
    if not st.is_prefill:
        return None  # decode step: record only steps that hold every requested position in every row
    bad = torch.nonzero(~ok)
    b, j = int(bad[0, 0]), int(bad[0, 1])
    raise ValueError(
        f"cache_positions={spec!r} at {name}: position {wanted[j]} is not a real token of row {b} "
        f"({int(real[b].sum())} real tokens in this forward); every row must hold every requested position — use "
        "a [B, T] bool mask or fn(ctx) for ragged selections"
    )


class _GradSlot:
    """Gradients at one hook point of one forward (possibly split into micro-batches).

    ``pieces``: ``(start, end, (shape, dtype, device), grads)`` per chunk; ``grads`` gets one tensor per
    backward pass. Resolved per backward pass ``j`` by concatenating the chunks' ``j``-th gradients along
    dim 0; a chunk whose hook did not fire in that pass did not influence what was differentiated, so its
    gradient is zero.
    """

    def __init__(self, pieces: list[tuple[int, int, tuple[Any, Any, Any], list[torch.Tensor]]]):
        self.pieces = pieces

    @classmethod
    def for_tensor(cls, t: torch.Tensor, start: int, end: int) -> _GradSlot:
        return cls([(start, end, (t.shape, t.dtype, t.device), [])])

    def append_hook(self) -> Callable[[torch.Tensor], None]:
        store = self.pieces[0][3]
        return lambda g: store.append(g.detach())

    @classmethod
    def merge_rows(cls, pieces: Sequence[tuple[int, int, Any]]) -> _GradSlot:
        return cls([p for _, _, slot in pieces for p in slot.pieces])

    def resolve(self) -> list[torch.Tensor]:
        k = max(len(p[3]) for p in self.pieces)
        out = []
        for j in range(k):
            parts = [
                p[3][j] if len(p[3]) > j else torch.zeros(p[2][0], dtype=p[2][1], device=p[2][2]) for p in self.pieces
            ]
            out.append(parts[0] if len(parts) == 1 else torch.cat([t.to(parts[0].device) for t in parts], 0))
        return out


class ActivationCache(dict):
    """``name -> list of tensors`` (one per forward, or per logical call when micro-batched). Indexing returns
    the single tensor, or the concatenation along the sequence dimension over decode steps
    (``[B, T_total, ...]``). A micro-batched call contributes one record with all its rows (assembled along
    dim 0). For gradients (``session.grads``) there is one record per forward and backward pass."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        # name -> how records of several forwards combine: "cat1" (default, along the sequence), "stack"
        # ([B, ...] records of cache_positions="last"/an int -> [B, steps, ...]), "cat0" (mask selections)
        self.layout: dict[str, str] = {}

    def __getitem__(self, name: str) -> torch.Tensor:  # type: ignore[override]
        steps = self.steps(name)
        if not steps:
            raise KeyError(f"{name!r} has no record yet (gradients appear after backward())")
        if len(steps) == 1:
            return steps[0]
        mode = self.layout.get(name, "cat1")
        try:
            if mode == "stack":
                return torch.stack(steps, dim=1)
            return torch.cat(steps, dim=0 if mode == "cat0" else 1)
        except RuntimeError as e:  # pragma: no cover - shapes that cannot be concatenated
            raise ValueError(f"{name} has {len(steps)} steps of different shapes; use .steps({name!r})") from e

    def steps(self, name: str) -> list[torch.Tensor]:
        """All records of ``name`` in order (one per forward / logical call)."""
        if not dict.__contains__(self, name):
            raise KeyError(f"{name!r} was not cached; cached names: {sorted(self.keys())}")
        out: list[torch.Tensor] = []
        for rec in dict.__getitem__(self, name):
            out.extend(rec.resolve() if isinstance(rec, _GradSlot) else [rec])
        return out


class HookSession:
    """Context manager that caches and edits activations at canonical hook names.

    Prefer :meth:`ModelAdapter.hooks`. Arguments:
        cache: names/patterns to record (detached unless ``detach=False``).
        edit: ``{name_or_pattern: fn}`` or a list of ``(pattern, fn)`` pairs; ``fn(tensor, ctx)`` returns a
            replacement tensor or None.
        grad: names whose gradients to record during ``backward`` (``session.grads[name]``).
        stop_after: a name after which the forward stops (saves compute when only early activations
            are needed); the adapter's ``forward`` returns None in that case. Methods that need the model's
            output (``token_logprobs``) refuse to run while such a session is active.
        offload: device to move cached tensors to (e.g. ``"cpu"``).
        cache_positions: keep only some tokens of each cached tensor (and of each recorded gradient):

            - ``"last"``: the last real token of each row -> ``[B, ...]`` per forward. Padding on either side
              is read from the attention mask given to the model (no mask: the last column).
            - an int ``p`` -> ``[B, ...]``, or a list of ``k`` ints -> ``[B, k, ...]``: absolute (logical)
              positions, 0 = each row's first real token (left padding not counted); negative ``-j`` = the
              ``j``-th last real token of the row in this forward.
            - a ``[B, T]`` bool mask (``B`` of the forward or of the full micro-batched call; ``T`` the
              forward's tokens, or the attention mask's width in decode steps) or ``fn(ctx) -> mask``:
              the selected tokens in row-major order -> ``[N_selected, ...]``.

            Each record is a gather, a new tensor the size of the selection (never a view of the full
            activation), so the full activation is freed after the forward. Micro-batched calls assemble
            the selected records by rows (masks: row-major, as if unsplit); an attempt that failed leaves
            nothing. With ``grad=`` the recorded gradients are those of the selected tokens (same shapes);
            with ``detach=False`` the selection stays differentiable.

            Decode steps (generation with a KV cache): a position means the same absolute position, and
            negative positions count within the step's new tokens, so ``"last"`` / ``-1`` records the token
            fed at every step: ``cache[name]`` is ``[B, steps, ...]`` (prefill's last token first). An int
            or list records only in the forwards that hold every requested position in every row (prefill
            raises a ValueError when a row lacks one; decode steps that hold none are skipped). Records of
            several forwards combine as ``[B, steps, ...]`` (``"last"``/int), ``[B, steps·k, ...]`` (list)
            or ``[ΣN, ...]`` (mask); ``.steps(name)`` gives them one by one.

            Encoder-decoder models: hook points are in the decoder, whose tokens are real unless a
            ``decoder_attention_mask`` says otherwise; the encoder's call of a shared embedding module uses
            the encoder's attention mask. ``attn.probs`` cannot be selected (use
            :meth:`ModelAdapter.capture_attention` with ``rows=``).

    While the session is active it listens to the adapter's micro-batched calls (see
    :meth:`ModelAdapter.micro_batch`): records are assembled by rows per logical call, and what an attempt
    that raised (e.g. out of memory) recorded is dropped.

    Examples:
        >>> import tokensmith as ts
        >>> ad = ts.tiny("llama")
        >>> with ad.hooks(cache=["layers.*.resid_post"]) as h:
        ...     _ = ad.forward("Hello")
        >>> h.cache["layers.0.resid_post"].shape[-1] == ad.structure.hidden_size
        True
        >>> batch = ad.encode_batch(["a b c", "d"])  # left-padded
        >>> with ad.hooks(cache="layers.*.resid_post", cache_positions="last") as h:
        ...     _ = ad.forward(batch)
        >>> list(h.cache["layers.1.resid_post"].shape) == [2, ad.structure.hidden_size]
        True
    """

    def __init__(
        self,
        adapter: ModelAdapter,
        cache: Iterable[str] | str = (),
        edit: dict[str, HookFn] | Sequence[tuple[str, HookFn]] | None = None,
        grad: Iterable[str] | str = (),
        stop_after: str | None = None,
        detach: bool = True,
        offload: str | torch.device | None = None,
        cache_positions: Any = None,
    ):
        self.adapter = adapter
        self.cache = ActivationCache()
        self.grads = ActivationCache()
        self.state = _ForwardState()
        self.detach = detach
        self.offload = offload
        cache_names = expand(adapter, cache) if cache else []
        self._probe_layers = [int(n.split(".")[1]) for n in cache_names if n.endswith("attn.probs")]
        self._cache_names = [n for n in cache_names if not n.endswith("attn.probs")]
        self._probe_names = [n for n in cache_names if n.endswith("attn.probs")]
        items = list(edit.items()) if isinstance(edit, dict) else list(edit or [])
        self._edits: dict[str, list[HookFn]] = {}
        for pat, fn in items:
            if not callable(fn):
                raise TypeError(f"edit for {pat!r} must be callable fn(tensor, ctx), got {type(fn).__name__}")
            for n in expand(adapter, pat):
                if n.endswith("attn.probs"):
                    raise ValueError("attn.probs can be cached, not edited; edit attn.z or attn.out instead")
                self._edits.setdefault(n, []).append(fn)
        self._grad_names = expand(adapter, grad) if grad else []
        layout = _check_cache_positions(cache_positions)
        if layout is not None and self._probe_names:
            raise ValueError(
                f"cache_positions cannot select attention probabilities ({self._probe_names[0]}); cache attn.probs "
                "in a session without cache_positions, or use adapter.capture_attention(rows=[-1])"
            )
        self.cache_positions = cache_positions
        if layout is not None:
            for n in self._cache_names:
                self.cache.layout[n] = layout
            for n in self._grad_names:
                self.grads.layout[n] = layout
        self._enc_dec = bool(getattr(adapter.structure, "is_encoder_decoder", False))
        self._stop_after = expand(adapter, stop_after)[0] if stop_after else None
        self._handles: list[Any] = []
        self._probe = None
        names = set(self._cache_names) | set(self._edits) | set(self._grad_names)
        if self._stop_after:
            names.add(self._stop_after)
        # resolve now (may run the one-token geometry probe), before any of our hooks exist
        self._targets = [(name, *_resolve(adapter, name)) for name in sorted(names)]
        self._rows: tuple[int, int, int] | None = None  # (start, end, n) of the current micro-batch attempt
        self._asm: RowAssembler | None = None
        self._batch_base = 0
        self._batch_forwards = 0

    @property
    def stop_after(self) -> str | None:
        """The hook name after which forwards stop, or None."""
        return self._stop_after

    # -- registration -------------------------------------------------------------------------
    def __enter__(self) -> HookSession:
        try:
            self._handles.append(
                self.adapter.model.register_forward_pre_hook(self._state_hook, with_kwargs=True)
            )
            for name, mod, kind, layer in self._targets:
                if kind.startswith("fused:"):
                    geo = attention_geometry(self.adapter, layer)  # type: ignore[arg-type]
                    idx = geo.fused.index[kind[-1]]  # type: ignore[union-attr]
                    self._handles.append(mod.register_forward_hook(self._fused_hook(name, layer, idx)))
                elif kind == "out":
                    self._handles.append(mod.register_forward_hook(self._out_hook(name, layer)))
                else:
                    self._handles.append(
                        mod.register_forward_pre_hook(self._in_hook(name, layer), with_kwargs=True)
                    )
            if self._probe_layers:
                from tokensmith.models.attention import AttentionProbe

                self._probe = AttentionProbe(self.adapter, self._probe_layers).__enter__()
            self.adapter.__dict__.setdefault("_row_listeners", []).append(self)
        except BaseException:
            self._remove()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self._remove()

    def _remove(self) -> None:
        listeners = self.adapter.__dict__.get("_row_listeners", [])
        if self in listeners:
            listeners.remove(self)
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self._probe is not None:
            probe, self._probe = self._probe, None
            probe.__exit__(None, None, None)
            for name in self._probe_names:
                layer = int(name.split(".")[1])
                dict.__setitem__(self.cache, name, list(probe.records[layer]))

    # -- micro-batching (batching.RowListener) ------------------------------------------------
    def begin_batch(self, n: int) -> None:
        stores: list[Any] = [self.cache, self.grads]
        if self._probe is not None:
            stores.append(self._probe.records)
        self._asm = RowAssembler(*stores)
        self._asm.begin_batch(n)
        self._batch_base = self.state.step + 1
        self._batch_forwards = 0

    def begin_rows(self, start: int, end: int, n: int) -> None:
        self._rows = (start, end, n)
        self.state.step = self._batch_base - 1  # every chunk's forwards share the logical call's steps
        if self._asm is not None:
            self._asm.begin_rows(start, end, n)

    def end_rows(self, ok: bool) -> None:
        if ok:
            self._batch_forwards = max(self._batch_forwards, self.state.step - self._batch_base + 1)
        self._rows = None
        if self._asm is not None:
            self._asm.end_rows(ok)

    def end_batch(self, ok: bool) -> None:
        self.state.step = self._batch_base - 1 + self._batch_forwards
        asm, self._asm = self._asm, None
        if asm is not None:
            asm.end_batch(ok)

    # -- forward state ------------------------------------------------------------------------
    def _state_hook(self, module: Any, args: tuple, kwargs: dict) -> None:
        if _SUSPENDED[0]:
            return
        st = self.state
        st.step += 1
        st.embed_calls = 0
        st.decoder_attention_mask = kwargs.get("decoder_attention_mask")
        st.encoder_runs = self._enc_dec and kwargs.get("encoder_outputs") is None
        x = kwargs.get("input_ids", args[0] if args else None)
        if x is None:
            x = kwargs.get("inputs_embeds")
        if x is None:
            x = kwargs.get("decoder_input_ids")
        if x is None:
            return
        B, T = x.shape[:2]
        st.batch = int(B)
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        past = 0
        if cache is not None and hasattr(cache, "get_seq_length"):
            try:
                past = int(cache.get_seq_length())
            except Exception:  # pragma: no cover
                past = 0
        am = kwargs.get("attention_mask")
        pos = kwargs.get("position_ids")
        if pos is None and am is not None and am.dim() == 2:
            pos = (am.long().cumsum(-1) - 1).clamp_min(0)[:, -T:]
        if pos is None:
            pos = torch.arange(past, past + T, device=x.device).expand(B, T)
        st.positions = pos.expand(B, T) if pos.shape[0] == 1 else pos
        st.is_prefill = past == 0
        st.past = past
        st.attention_mask = am
        st.pad_offsets = (am == 0).long().sum(-1) if am is not None and am.dim() == 2 else None

    def _ctx(self, name: str, layer: int | None) -> HookContext:
        st = self.state
        if self._rows is not None:
            rows: slice | None = slice(self._rows[0], self._rows[1])
            n: int | None = self._rows[2]
        else:
            rows = slice(0, st.batch) if st.batch is not None else None
            n = st.batch
        return HookContext(
            name, layer, max(st.step, 0), st.positions, st.is_prefill, st.pad_offsets, st.attention_mask, rows, n
        )

    def _apply(self, name: str, layer: int | None, t: torch.Tensor) -> torch.Tensor:
        if _SUSPENDED[0]:
            return t
        ctx = None
        for fn in self._edits.get(name, ()):
            ctx = ctx or self._ctx(name, layer)
            new = fn(t, ctx)
            if new is not None:
                if not isinstance(new, torch.Tensor) or new.shape != t.shape:
                    raise ValueError(
                        f"edit at {name} must return a tensor of shape {tuple(t.shape)} or None, got "
                        f"{getattr(new, 'shape', type(new).__name__)}"
                    )
                t = new
        if name == "embed":
            self.state.embed_calls += 1
        want_cache = name in self._cache_names
        want_grad = name in self._grad_names and t.requires_grad
        sel: _Selection | None = None
        if self.cache_positions is not None and (want_cache or want_grad):
            sel = _select(self.cache_positions, name, t, ctx or self._ctx(name, layer), self.state, self._enc_dec)
            if sel is None:  # a decode step holding none of the requested positions
                want_cache = want_grad = False
        if want_cache:
            c = t.detach() if self.detach else t
            if sel is not None:
                c = sel.take(c)
            if self.offload is not None:
                c = c.to(self.offload)
            self.cache.setdefault(name, []).append(c)
        if want_grad:
            start, end = (self._rows[0], self._rows[1]) if self._rows is not None else (0, t.shape[0])
            if sel is None:
                slot = _GradSlot.for_tensor(t, start, end)
                t.register_hook(slot.append_hook())
            else:
                slot = _GradSlot([(start, end, (sel.shape(t), t.dtype, t.device), [])])
                store = slot.pieces[0][3]
                t.register_hook(lambda g, sel=sel, store=store: store.append(sel.take(g.detach())))
            dict.setdefault(self.grads, name, []).append(slot)
        if name == self._stop_after:
            raise StopForward(name)
        return t

    def _out_hook(self, name: str, layer: int | None):
        def hook(module, args, output):
            if isinstance(output, (tuple, list)):  # lists: OpenAI-GPT blocks
                new = self._apply(name, layer, output[0])
                return type(output)([new, *output[1:]]) if new is not output[0] else None
            if hasattr(output, "last_hidden_state") and not isinstance(output, torch.Tensor):
                new = self._apply(name, layer, output.last_hidden_state)
                output.last_hidden_state = new
                return output
            new = self._apply(name, layer, output)
            return new if new is not output else None

        return hook

    def _fused_hook(self, name: str, layer: int | None, idx: torch.Tensor):
        """Hook on a fused QKV projection: ``name``'s columns go through :meth:`_apply` and are written back."""

        def hook(module, args, output):
            out = output[0] if isinstance(output, tuple) else output
            cols = idx.to(out.device)
            part = out.index_select(-1, cols)
            new = self._apply(name, layer, part)
            if new is part and not (name in self._grad_names and part.requires_grad):
                return None
            merged = out.index_copy(-1, cols, new)  # gradients reach `part` (grad=) or the edit
            return (merged, *output[1:]) if isinstance(output, tuple) else merged

        return hook

    def _in_hook(self, name: str, layer: int | None):
        def hook(module, args, kwargs):
            if args:
                new = self._apply(name, layer, args[0])
                if new is not args[0]:
                    return (new, *args[1:]), kwargs
                return None
            key = "hidden_states" if "hidden_states" in kwargs else next(iter(kwargs))
            new = self._apply(name, layer, kwargs[key])
            if new is not kwargs[key]:
                kwargs = {**kwargs, key: new}
                return args, kwargs
            return None

        return hook


# -- ready-made edit functions ----------------------------------------------------------------------
def rows_of(value: torch.Tensor, ctx: HookContext, like: torch.Tensor) -> torch.Tensor:
    """The rows of a per-example ``value`` that the current forward covers.

    ``value`` with as many dims as the hooked tensor ``like`` and a leading dimension equal to the full batch
    (``ctx.batch_size``) is per-example: ``value[ctx.rows]`` is returned. Anything else (``[d]``, ``[1, T, d]``,
    ...) broadcasts and is returned unchanged.
    """
    if (
        ctx.rows is not None
        and ctx.batch_size is not None
        and value.dim() == like.dim()
        and value.dim() > 0
        and value.shape[0] == ctx.batch_size
        and ctx.batch_size != 1
    ):
        return value[ctx.rows]
    return value


def _position_mask(positions: Any, ctx: HookContext, shape: torch.Size, device: torch.device) -> torch.Tensor | None:
    """[B, T] boolean selection from absolute positions, or None for all.

    ``positions``: None; an int or a list of absolute positions; a ``[B, T]`` boolean tensor; or
    ``fn(ctx) -> [B, T]`` boolean. Masks with ``ctx.batch_size`` rows are sliced to ``ctx.rows``.
    """
    if positions is None:
        return None
    if callable(positions) or isinstance(positions, torch.Tensor):
        sel = positions(ctx) if callable(positions) else positions
        sel = torch.as_tensor(sel).to(device=device, dtype=torch.bool)
        if sel.dim() != 2:
            raise ValueError(f"a position mask must be a [batch, seq] boolean tensor, got shape {tuple(sel.shape)}")
        if sel.shape[0] != shape[0] and ctx.batch_size is not None and sel.shape[0] == ctx.batch_size:
            sel = sel[ctx.rows]
        return sel
    pos = ctx.positions
    if pos is None:
        pos = torch.arange(shape[1], device=device).expand(shape[0], shape[1])
    pos = pos.to(device)
    if isinstance(positions, int):
        positions = [positions]
    wanted = torch.as_tensor(list(positions), device=device)
    return torch.isin(pos, wanted)


def steer_fn(
    vector: torch.Tensor,
    alpha: float = 1.0,
    positions: Any = None,
    renorm: bool = False,
) -> HookFn:
    """Edit function adding ``alpha * vector`` to the hidden states (GrAInS-style steering, MOD-6).

    With ``renorm=True``: h ← (h + αv)·‖h‖/‖h + αv‖ (norm-preserving, GrAInS).

    Args:
        vector: ``[d]`` (or broadcastable to the activation); a per-example ``[B, 1, d]`` / ``[B, T, d]``
            vector of the full batch is sliced to the rows of each micro-batch (:func:`rows_of`).
        alpha: strength; 0 leaves the activation untouched.
        positions: None (all), absolute position(s) (int or list), a ``[B, T]`` boolean mask, or
            ``fn(ctx) -> [B, T] bool``.
        renorm: keep each token's norm.
    """
    v = torch.as_tensor(vector)
    if not torch.isfinite(v).all():
        raise ValueError("steering vector contains NaN or inf")

    def fn(h: torch.Tensor, ctx: HookContext) -> torch.Tensor | None:
        if alpha == 0:
            return None
        new = h + alpha * rows_of(v, ctx, h).to(device=h.device, dtype=h.dtype)
        if renorm:
            new = new * (h.norm(dim=-1, keepdim=True) / new.norm(dim=-1, keepdim=True).clamp_min(1e-12))
        sel = _position_mask(positions, ctx, h.shape, h.device)
        return new if sel is None else torch.where(sel[..., None], new, h)

    return fn


def patch_fn(value: torch.Tensor, positions: Any = None) -> HookFn:
    """Edit function replacing the activation by ``value`` (e.g. from another run's cache).

    ``value`` broadcasts to the activation; a per-example ``[B, ...]`` value of the full batch is sliced to
    the rows of each micro-batch (:func:`rows_of`), so patching works under ``max_batch_size``.
    ``positions`` as in :func:`steer_fn`.
    """

    def fn(h: torch.Tensor, ctx: HookContext) -> torch.Tensor:
        v = rows_of(value, ctx, h).to(device=h.device, dtype=h.dtype).expand_as(h)
        sel = _position_mask(positions, ctx, h.shape, h.device)
        return v.clone() if sel is None else torch.where(sel[..., None], v, h)

    return fn


def ablate_fn(
    kind: str = "zero", positions: Any = None, value: torch.Tensor | None = None, over: str = "batch"
) -> HookFn:
    """Edit function for ablation.

    Args:
        kind: ``'zero'`` or ``'mean'``.
        positions: which tokens to ablate (as in :func:`steer_fn`); others keep their value.
        value: for ``'mean'``, a fixed mean (e.g. a dataset mean, ``[d]`` or per-example ``[B, ...]``);
            recommended, since it does not depend on the batch.
        over: for ``'mean'`` without ``value``: ``'batch'`` = mean over all real (unpadded) tokens of the
            forward's batch, μ = Σ_{b,t} m_bt h_bt / Σ m_bt; ``'example'`` = per-example mean over its own
            real tokens, μ_b = Σ_t m_bt h_bt / Σ_t m_bt (row-local, so identical under micro-batching).
            A batch mean over a micro-batch would silently be the mean of a chunk: ``over='batch'`` raises a
            ValueError when the call was split (use ``value=`` or ``over='example'``).
    """
    if kind not in ("zero", "mean"):
        raise ValueError(f"ablation kind must be 'zero' or 'mean' (resample = patch_fn with another run), got {kind!r}")
    if over not in ("batch", "example"):
        raise ValueError(f"over must be 'batch' or 'example', got {over!r}")

    def fn(h: torch.Tensor, ctx: HookContext) -> torch.Tensor:
        if kind == "zero":
            rep = torch.zeros_like(h)
        elif value is not None:
            rep = rows_of(value, ctx, h).to(h).expand_as(h)
        else:
            if over == "batch" and ctx.is_partial:
                raise ValueError(
                    f"ablate_fn('mean') at {ctx.name} averages over the whole batch, but this call was split into "
                    f"micro-batches (rows {ctx.rows.start}:{ctx.rows.stop} of {ctx.batch_size}); pass the mean "
                    "explicitly (value=..., e.g. from a cached run), use over='example', or do not micro-batch"
                )
            dims = (0, 1) if over == "batch" else (1,)
            am = ctx.attention_mask
            if am is not None and am.dim() == 2 and am.shape[:2] == h.shape[:2]:
                m = am.to(h.dtype)[..., None]
                mean = (h * m).sum(dims, keepdim=True) / m.sum(dims, keepdim=True).clamp_min(1)
            else:
                mean = h.mean(dim=dims, keepdim=True)
            rep = mean.expand_as(h)
        sel = _position_mask(positions, ctx, h.shape, h.device)
        return rep if sel is None else torch.where(sel[..., None], rep, h)

    return fn
