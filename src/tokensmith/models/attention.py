"""Scoped attention probe (METHODS.md MOD-5).

Attention probabilities softmax(QKᵀ·s + mask) are materialised only for the layers (and query rows) asked
for. The other layers keep their fast kernel (SDPA): the probe registers one function in transformers'
``AttentionInterface`` registry that delegates to SDPA everywhere except on the probed modules, and
switches the model to it only inside the ``with`` block. Models already running ``eager`` attention
return their weights anyway; the probe just records them. GQA is handled by repeating K/V per group;
:meth:`AttentionProbe.grouped` averages heads within each KV group so results keep ``num_kv_heads``.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # pragma: no cover
    from tokensmith.models.adapter import ModelAdapter

__all__ = ["AttentionProbe", "eager_attention_probs", "PROBE_IMPL"]

PROBE_IMPL = "tokensmith_probe"
# id(attention module) -> the (probe, layer) pairs recording it; several when probes are nested
_ACTIVE: dict[int, list[tuple[AttentionProbe, int]]] = {}
_LOCK = threading.Lock()
_REGISTERED = False


def eager_attention_probs(
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    is_causal: bool = True,
    softcap: float | None = None,
) -> torch.Tensor:
    """Attention probabilities ``softmax(q kᵀ · scaling + mask)`` with GQA repetition.

    Args:
        query: ``[B, H, Tq, d]``; key: ``[B, H_kv, Tk, d]``.
        attention_mask: None, a boolean mask (True = attend) or an additive float mask, broadcastable to
            ``[B, H, Tq, Tk]``.
        scaling: the score scale (usually ``d ** -0.5``).
        is_causal: with ``attention_mask=None`` and ``Tq > 1``, apply an upper-left causal mask (SDPA's
            convention).
        softcap: optional ``tanh`` soft-capping of the scores.

    Returns:
        fp32 ``[B, H, Tq, Tk]``; rows with no visible key are all zeros.
    """
    n_rep = query.shape[1] // key.shape[1]
    if n_rep > 1:
        key = key.repeat_interleave(n_rep, dim=1)
    scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    Tq, Tk = scores.shape[-2:]
    if attention_mask is None:
        if is_causal and Tq > 1:
            allowed = torch.ones(Tq, Tk, dtype=torch.bool, device=scores.device).tril()
            scores = scores.masked_fill(~allowed, float("-inf"))
    elif attention_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attention_mask[..., :Tk], float("-inf"))
    else:
        scores = scores + attention_mask[..., :Tk].float()
    probs = torch.softmax(scores, dim=-1)
    return torch.nan_to_num(probs, nan=0.0)


def _probe_attention(module: Any, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    entries = _ACTIVE.get(id(module))
    if not entries:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    is_causal = kwargs.get("is_causal")
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    if attention_mask is None and is_causal and query.shape[2] > 1 and key.shape[2] > query.shape[2]:
        key, value = key[:, :, : query.shape[2]], value[:, :, : query.shape[2]]
    probs = eager_attention_probs(query, key, attention_mask, scale, is_causal, kwargs.get("softcap"))
    n_rep = query.shape[1] // value.shape[1]
    v = value.repeat_interleave(n_rep, dim=1) if n_rep > 1 else value
    out = torch.matmul(probs.to(v.dtype), v).transpose(1, 2).contiguous()
    for probe, layer in list(entries):
        probe._record(layer, probs)
    return out, None


def _register() -> None:
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(PROBE_IMPL, _probe_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(PROBE_IMPL, sdpa_mask)
    _REGISTERED = True


class AttentionProbe:
    """Context manager recording attention probabilities of selected layers.

    Use :meth:`ModelAdapter.capture_attention`. Inside the block every forward appends one
    ``[B, H, Tq_sel, Tk]`` fp32 tensor per probed layer (``Tq_sel`` = the requested query rows).

    Examples:
        >>> import tokensmith as ts
        >>> ad = ts.tiny("llama")
        >>> with ad.capture_attention(layers=[1]) as att:
        ...     _ = ad.forward("Hello there")
        >>> att[1].shape[1] == ad.structure.num_heads
        True
    """

    def __init__(self, adapter: ModelAdapter, layers: Iterable[int] | None = None, rows: Any = None):
        self.adapter = adapter
        n = adapter.structure.num_layers
        layers = list(range(n)) if layers is None else [int(i) for i in layers]
        for i in layers:
            if not -n <= i < n:
                raise ValueError(f"layer {i} out of range for a model with {n} layers")
        self.layers = sorted({i % n for i in layers})
        self.rows = rows
        self.records: dict[int, list[torch.Tensor]] = {i: [] for i in self.layers}
        self._handles: list[Any] = []
        self._saved_impl: Any = None
        self._mode = ""

    def _record(self, layer: int, probs: torch.Tensor) -> None:
        if self.rows is not None:
            probs = probs[:, :, self.rows]
        self.records[layer].append(probs.detach())

    def __enter__(self) -> AttentionProbe:
        s = self.adapter.structure
        mods = [s.attn[i] for i in self.layers]
        if any(m is None for m in mods):
            raise ValueError("attention modules were not discovered; pass AdapterSpec(attn='...')")
        config = self.adapter.model.config
        impl = getattr(config, "_attn_implementation", None)
        if impl == "eager" or impl is None:
            self._mode = "eager"
            for i, m in zip(self.layers, mods, strict=True):
                self._handles.append(m.register_forward_hook(self._eager_hook(i)))
        elif impl in ("sdpa", PROBE_IMPL):
            self._mode = "probe"
            _register()
            with _LOCK:
                for i, m in zip(self.layers, self._probe_modules(mods), strict=True):
                    _ACTIVE.setdefault(id(m), []).append((self, i))
            self._saved_impl = impl
            config._attn_implementation = PROBE_IMPL
        else:
            raise ValueError(
                f"attention capture supports the 'sdpa' and 'eager' attention implementations, not {impl!r}; "
                "reload the model with attn_implementation='sdpa'"
            )
        return self

    def _probe_modules(self, mods: list[Any]) -> list[Any]:
        # the module that calls the attention interface is the one holding `config` + the projections;
        # for BERT-style wrappers that is `attention.self`.
        out = []
        for m in mods:
            inner = getattr(m, "self", None)
            out.append(inner if isinstance(inner, torch.nn.Module) else m)
        return out

    def _eager_hook(self, layer: int):
        def hook(module, args, output):
            w = output[1] if isinstance(output, tuple) and len(output) > 1 else None
            if w is None:
                raise RuntimeError(f"layer {layer}'s attention returned no weights under eager attention")
            self._record(layer, w.float())

        return hook

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self._mode == "probe":
            with _LOCK:
                for k in list(_ACTIVE):
                    _ACTIVE[k] = [e for e in _ACTIVE[k] if e[0] is not self]
                    if not _ACTIVE[k]:
                        del _ACTIVE[k]
            self.adapter.model.config._attn_implementation = self._saved_impl

    def __getitem__(self, layer: int) -> torch.Tensor:
        """Probabilities of ``layer`` from the single forward in the block (see :meth:`steps`)."""
        recs = self.steps(layer)
        if len(recs) != 1:
            raise ValueError(
                f"layer {layer} was recorded {len(recs)} times (generation or several forwards); use .steps({layer})"
            )
        return recs[0]

    def steps(self, layer: int) -> list[torch.Tensor]:
        """All recorded probabilities of ``layer``, one per forward call."""
        layer = layer % self.adapter.structure.num_layers
        if layer not in self.records:
            raise KeyError(f"layer {layer} was not probed; probed layers: {self.layers}")
        return self.records[layer]

    def grouped(self, layer: int) -> torch.Tensor:
        """Head-mean within each KV group: ``[B, H_kv, Tq, Tk]`` (GQA-aware aggregation)."""
        p = self[layer]
        s = self.adapter.structure
        hk = s.num_kv_heads or p.shape[1]
        B, H, Tq, Tk = p.shape
        return p.view(B, hk, H // hk, Tq, Tk).mean(2)
