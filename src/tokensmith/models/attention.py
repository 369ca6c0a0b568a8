"""Scoped attention probe (METHODS.md MOD-5).

Attention probabilities softmax(QKᵀ·s + mask) are materialised only for the layers (and query rows) asked
for. The other layers keep their fast kernel (SDPA): the probe registers one function in transformers'
``AttentionInterface`` registry that delegates to SDPA everywhere except on the probed modules, and
switches the model to it only inside the ``with`` block. Models already running ``eager`` attention
return their weights anyway; the probe just records them. GQA is handled by repeating K/V per group;
:meth:`AttentionProbe.grouped` averages heads within each KV group so results keep ``num_kv_heads``.

With ``rows`` (the query rows a pruning method needs, e.g. ``[-1]``), a probed layer keeps its SDPA
output and the probe computes only ``softmax(q[rows] kᵀ·s + mask[rows])``: memory ``O(B·H·|rows|·Tk)``,
never the ``[B, H, Tq, Tk]`` matrix. The model's attention implementation is switched to the probe while
at least one probe is open on it (a reference count per model), so probes may be exited in any order.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from tokensmith.models.hooks import internal_forward_running

if TYPE_CHECKING:  # pragma: no cover
    from tokensmith.models.adapter import ModelAdapter

__all__ = ["AttentionProbe", "eager_attention_probs", "attention_probs_rows", "attention_layers", "PROBE_IMPL"]

PROBE_IMPL = "tokensmith_probe"
# id(attention module) -> the (probe, layer) pairs recording it; several when probes are nested
_ACTIVE: dict[int, list[tuple[AttentionProbe, int]]] = {}
# id(model config) -> [number of open probes, the implementation to restore when the last one exits]
_IMPL_REFS: dict[int, list[Any]] = {}
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


def _row_index(rows: Any, n: int) -> torch.Tensor:
    """The query rows selected by ``rows`` (int, sequence, slice or index tensor) among ``n``, as a 1-D
    index tensor in order of selection (negative indices count from the end)."""
    try:
        idx = torch.arange(n)[rows if not isinstance(rows, torch.Tensor) else rows.cpu()]
    except IndexError as e:
        raise IndexError(f"attention rows {rows!r} are out of range for {n} query positions") from e
    return idx.reshape(-1)


def _causal_row_mask(idx: torch.Tensor, Tk: int, device: torch.device) -> torch.Tensor:
    """Upper-left causal mask (SDPA's ``is_causal`` convention) restricted to query rows ``idx``: ``[R, Tk]``."""
    return torch.arange(Tk, device=device)[None, :] <= idx.to(device)[:, None]


def attention_probs_rows(
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    rows: Any,
    is_causal: bool = True,
    softcap: float | None = None,
) -> torch.Tensor:
    """Selected query rows of the attention probabilities, without building the full matrix.

    ``P[..., r, :] = softmax(q_r kᵀ · scaling + mask_r)`` for the rows ``r`` in ``rows``; equal to
    ``eager_attention_probs(query, key, attention_mask, ...)[:, :, rows]`` but in ``O(B·H·|rows|·Tk)``
    memory.

    Args:
        query: ``[B, H, Tq, d]``; key: ``[B, H_kv, Tk, d]``.
        attention_mask: as in :func:`eager_attention_probs` (its query axis, when not 1, is indexed by
            ``rows`` too).
        scaling: the score scale.
        rows: an int, a sequence of ints, a slice or an index tensor over the ``Tq`` query positions.
        is_causal: with ``attention_mask=None`` and ``Tq > 1``, apply the upper-left causal mask.
        softcap: optional ``tanh`` soft-capping.

    Returns:
        fp32 ``[B, H, R, Tk]`` with ``R`` the number of selected rows.
    """
    Tq, Tk = query.shape[2], key.shape[2]
    idx = _row_index(rows, Tq)
    q = query[:, :, idx.to(query.device)]
    if attention_mask is None:
        mask = _causal_row_mask(idx, Tk, query.device) if (is_causal and Tq > 1) else None
    else:
        mask = attention_mask[..., :Tk]
        if mask.dim() >= 2 and mask.shape[-2] == Tq and Tq > 1:
            mask = mask[..., idx.to(mask.device), :]
    return eager_attention_probs(q, key, mask, scaling, is_causal=False, softcap=softcap)


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
        pk, pv = key[:, :, : query.shape[2]], value[:, :, : query.shape[2]]
    else:
        pk, pv = key, value
    softcap = kwargs.get("softcap")
    if all(probe.rows is not None for probe, _ in entries):
        # only some query rows are wanted: the layer keeps its SDPA output and the probe computes those rows
        out = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
        for probe, layer in list(entries):
            rows = attention_probs_rows(query, pk, attention_mask, scale, probe.rows, is_causal, softcap)
            probe._record(layer, rows, rows_selected=True)
        return out
    probs = eager_attention_probs(query, pk, attention_mask, scale, is_causal, softcap)
    n_rep = query.shape[1] // pv.shape[1]
    v = pv.repeat_interleave(n_rep, dim=1) if n_rep > 1 else pv
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


def attention_layers(adapter: ModelAdapter) -> list[int]:
    """Indices of the layers that have an attention module (hybrids interleave recurrent/SSM blocks)."""
    return [i for i, a in enumerate(adapter.structure.attn) if a is not None]


class AttentionProbe:
    """Context manager recording attention probabilities of selected layers.

    Use :meth:`ModelAdapter.capture_attention`. Inside the block every forward appends one
    ``[B, H, Tq_sel, Tk]`` fp32 tensor per probed layer, ``P = softmax(q kᵀ·s + mask)``, where ``Tq_sel``
    is the number of requested query rows (all ``Tq`` by default).

    Args:
        adapter: the model.
        layers: layer indices (negative allowed); default: every layer that has attention (on hybrids
            such as Jamba, Qwen3-Next or RecurrentGemma, the attention layers only).
        rows: query rows to keep (an int, a sequence of ints, a slice or an index tensor; ``[-1]`` = the
            last token). On an SDPA model the probed layers then keep their SDPA output and only these rows
            of ``P`` are computed (memory ``O(B·H·|rows|·Tk)``); an eager model computes its full weights
            anyway and the rows are selected from them.

    Raises:
        ValueError: a layer index out of range, or a layer without attention (the message lists the
            layers that have it).

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
        have = attention_layers(adapter)
        if not have:
            raise ValueError("no attention modules were discovered in this model; pass AdapterSpec(attn='...')")
        layers = list(have) if layers is None else [int(i) for i in layers]
        for i in layers:
            if not -n <= i < n:
                raise ValueError(f"layer {i} out of range for a model with {n} layers")
        self.layers = sorted({i % n for i in layers})
        missing = [i for i in self.layers if adapter.structure.attn[i] is None]
        if missing:
            raise ValueError(
                f"layer(s) {missing} have no attention module (recurrent/SSM blocks of a hybrid model); "
                f"layers with attention: {have} (see capabilities()['attention_layers'])"
            )
        if isinstance(rows, (bool, str)) or (rows is not None and not isinstance(rows, (int, slice, torch.Tensor, Sequence))):
            raise TypeError(f"rows must be an int, a sequence of ints, a slice or an index tensor, got {type(rows).__name__}")
        self.rows = rows
        self.records: dict[int, list[torch.Tensor]] = {i: [] for i in self.layers}
        self._handles: list[Any] = []
        self._mode = ""
        self._config_key: int | None = None

    def _record(self, layer: int, probs: torch.Tensor, rows_selected: bool = False) -> None:
        if internal_forward_running():
            return
        if self.rows is not None and not rows_selected:
            probs = probs[:, :, _row_index(self.rows, probs.shape[2]).to(probs.device)]
        self.records[layer].append(probs.detach())

    def __enter__(self) -> AttentionProbe:
        s = self.adapter.structure
        mods = [s.attn[i] for i in self.layers]
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
                key = id(config)
                ref = _IMPL_REFS.get(key)
                if ref is None:
                    # the first open probe on this model remembers what to restore ("sdpa" if the
                    # config was left on the probe by something else)
                    _IMPL_REFS[key] = [1, impl if impl != PROBE_IMPL else "sdpa"]
                else:
                    ref[0] += 1
                self._config_key = key
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
                ref = _IMPL_REFS.get(self._config_key) if self._config_key is not None else None
                if ref is not None:
                    ref[0] -= 1
                    if ref[0] <= 0:
                        # the last open probe on this model (whatever the exit order) restores it
                        self.adapter.model.config._attn_implementation = ref[1]
                        del _IMPL_REFS[self._config_key]
            self._config_key = None
            self._mode = ""

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
