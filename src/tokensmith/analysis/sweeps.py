"""Layer intervention sweeps: delete one block or swap two adjacent blocks, measure what changes.

Lad, Gurnee & Tegmark (2024, *The Remarkable Robustness of LLMs: Stages of Inference?*) intervene on one
transformer block at a time — delete it (the residual stream passes it unchanged, ``h_{i+1} = h_i``) or
swap it with the next one (blocks ``i`` and ``i+1`` run in the order ``i+1, i``) — without any fine-tuning,
and compare the intervened model's next-token predictions with the intact model's. Models turn out to be
remarkably robust to such edits except at the first and last blocks. This module runs that sweep over a
corpus with the reversible layer operations of the adapter (``adapter.skip_layers([i])``,
``adapter.swap_layers(i, i + 1)``; MOD-9). With ``p`` the intact and ``q`` the intervened next-token
distribution at a predicting position ``t`` (target ``y_t``), over the ``N`` predicting positions:

- ``loss = (1/N) Σ_t −log q(y_t)`` and ``delta_loss = loss − (1/N) Σ_t −log p(y_t)``;
- ``top1_agreement = (1/N) Σ_t 1[argmax_v q_t(v) = argmax_v p_t(v)]``;
- ``kl_to_intact = (1/N) Σ_t KL(p_t ‖ q_t) = (1/N) Σ_t Σ_v p_t(v) (log p_t(v) − log q_t(v))``.

The full distributions come from the last hidden states (depth ``L``, before the final norm) through
``adapter.unembed`` a chunk of positions at a time (:func:`tokensmith.analysis.stream.logit_chunks`), never
``[B, T, V]``. The loops are batch-outer, intervention-inner: per batch the intact last hidden states are
kept (``[N, d]``), each intervention runs one forward, and the intact and intervened logits of one chunk
are the only ``[chunk, V]`` tensors alive. Nothing of the model is rewritten; every intervention is undone
when its block exits.

Examples:
    >>> import tokensmith as ts
    >>> from tokensmith.analysis.sweeps import layer_intervention_sweep
    >>> ad = ts.tiny("llama")
    >>> f = layer_intervention_sweep(ad, ["Hello world, how are you?", "A second text"], progress=False)
    >>> f.op.tolist(), f.layer.tolist()
    (['none', 'delete', 'delete', 'swap'], [<NA>, 0, 1, 0])
    >>> bool((f.kl_to_intact >= 0).all()), bool(f.top1_agreement.between(0, 1).all())
    (True, True)
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from tokensmith.analysis.frames import AnalysisFrame, make_frame, register_plot, require_matplotlib
from tokensmith.analysis.stream import logit_chunks, require_lm_head, stream_hidden

if TYPE_CHECKING:  # pragma: no cover
    from tokensmith.models.adapter import ModelAdapter

__all__ = ["layer_intervention_sweep", "plot_layer_sweep", "OPS"]

OPS = ("delete", "swap")


def _ops(ops: Any) -> list[str]:
    if isinstance(ops, str):
        ops = (ops,)
    try:
        out = list(dict.fromkeys(ops))
    except TypeError:
        raise TypeError(
            f"ops must be a str or a sequence of str from {OPS}, not {type(ops).__name__}"
        ) from None
    if not out:
        raise ValueError(f"ops is empty: give some of {OPS}")
    bad = [o for o in out if o not in OPS]
    if bad:
        raise ValueError(
            f"unknown op(s) {bad}: ops are {OPS} ('delete' skips block i, 'swap' runs i+1 before i)"
        )
    return out


def _blocks(adapter: ModelAdapter, layers: Any) -> list[int]:
    L = int(adapter.structure.num_layers)
    if layers is None:
        return list(range(L))
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = [layers]
    out = set()
    for x in layers:
        if isinstance(x, bool) or not isinstance(x, (int, np.integer)) or not -L <= int(x) < L:
            raise ValueError(
                f"layers are block indices in [0, {L - 1}] (negative counts from the end) for "
                f"{adapter.name!r} with {L} blocks; got {x!r}"
            )
        out.add(int(x) % L)
    if not out:
        raise ValueError("layers is empty: give at least one block index, or None for all")
    return sorted(out)


def _intervention(adapter: ModelAdapter, op: str, i: int) -> AbstractContextManager[Any]:
    return adapter.skip_layers([i]) if op == "delete" else adapter.swap_layers(i, i + 1)


def _chunk_stats(
    adapter: ModelAdapter, h0: torch.Tensor, h1: torch.Tensor, y: torch.Tensor
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per chunk of positions: (intact NLL, intervened NLL, top-1 agreement, KL(p ‖ q)), float64 ``[c]``."""
    for (s, z0), (_, z1) in zip(logit_chunks(adapter, h0), logit_chunks(adapter, h1), strict=True):
        l0 = torch.log_softmax(z0.double(), -1)
        l1 = torch.log_softmax(z1.double(), -1)
        yc = y[s : s + z0.shape[0]].unsqueeze(1)
        nll0 = -l0.gather(1, yc).squeeze(1)
        nll1 = -l1.gather(1, yc).squeeze(1)
        agree = (z0.argmax(-1) == z1.argmax(-1)).double()
        kl = (l0.exp() * (l0 - l1)).sum(-1).clamp_min(0.0)
        yield nll0, nll1, agree, kl


def layer_intervention_sweep(
    adapter: ModelAdapter,
    texts: Any,
    ops: Any = OPS,
    layers: Any = None,
    batch_size: int = 8,
    max_length: int | None = None,
    progress: bool = True,
) -> AnalysisFrame:
    """Delete each block / swap each block with the next; loss, top-1 agreement and KL to the intact model.

    Args:
        adapter: a causal LM with its LM head.
        texts: the corpus (:func:`~tokensmith.analysis.stream.as_texts`: str, list of str or ids, Dataset).
        ops: ``"delete"`` (``adapter.skip_layers([i])``) and/or ``"swap"`` (``adapter.swap_layers(i, i+1)``;
            not for the last block).
        layers: block indices ``i`` to intervene on (``None``: all; negative counts from the end). Unlike the
            hidden-state depths of :mod:`tokensmith.analysis.stream`, these are blocks ``0..L-1``.
        batch_size: texts per forward.
        max_length: truncate each text to this many tokens.
        progress: tqdm progress bar (over texts).

    Returns:
        ``AnalysisFrame(kind="layer_sweep")``: one row for the intact model (``op="none"``, ``layer`` NA) and
        one per (op, block): ``op``, ``layer`` (the block; for ``swap`` the first of the pair ``i, i+1``),
        ``loss`` (mean next-token NLL, nats), ``delta_loss`` (``loss − intact loss``), ``top1_agreement``,
        ``kl_to_intact`` (mean ``KL(p_intact ‖ p_intervened)``, nats), ``n_tokens`` (predicting positions).
        ``meta``: ``model``, ``n_layers``, ``n_texts``, ``n_tokens``, ``ops``.

    Raises:
        ValueError: an encoder or a model without LM head, unknown ``ops``, a block index out of range,
            nothing to sweep (only ``swap`` on the last block), a corpus without a predicting position.
        TypeError: ``ops`` not a str or sequence of str.

    Examples:
        >>> import tokensmith as ts
        >>> ad = ts.tiny("llama")
        >>> text = "The cat sat on the mat."
        >>> f = layer_intervention_sweep(ad, text, ops="delete", layers=[-1], progress=False)
        >>> f.op.tolist(), f.layer.tolist(), int(f.n_tokens.iloc[1]) == len(ad.encode(text).input_ids) - 1
        (['none', 'delete'], [<NA>, 1], True)
        >>> layer_intervention_sweep(ad, "Hi there", layers=[5], progress=False)
        Traceback (most recent call last):
        ...
        ValueError: layers are block indices in [0, 1] (negative counts from the end) for 'tiny-llama' ...
    """
    require_lm_head(adapter, "layer_intervention_sweep")
    op_list = _ops(ops)
    blocks = _blocks(adapter, layers)
    L = int(adapter.structure.num_layers)
    plan = [(op, i) for op in op_list for i in blocks if not (op == "swap" and i == L - 1)]
    if not plan:
        raise ValueError(
            f"nothing to sweep: 'swap' exchanges block i with i+1, and block {L - 1} is the last one; give "
            "other layers or add 'delete'"
        )
    # float64 sums per intervention: Σ NLL, Σ agreement, Σ KL; and the intact Σ NLL
    sums = {k: torch.zeros(3, dtype=torch.float64) for k in plan}
    intact = torch.zeros((), dtype=torch.float64)
    n = 0
    n_texts = 0
    with torch.no_grad():
        for hb in stream_hidden(adapter, texts, layers=[L], batch_size=batch_size, max_length=max_length,
                                progress=progress, desc="layer sweep"):
            n_texts += len(hb.index)
            pm = hb.label_mask
            if not bool(pm.any()):
                continue
            h0 = hb.hidden[L][pm]
            y = hb.labels[pm]
            rows = [hb.input_ids[b][hb.mask[b]].tolist() for b in range(hb.input_ids.shape[0])]
            counted = False
            for key in plan:
                with _intervention(adapter, *key):
                    hi = next(stream_hidden(adapter, rows, layers=[L], batch_size=len(rows), progress=False))
                if not torch.equal(hi.mask, hb.mask):  # pragma: no cover - the same ids pad the same way
                    raise RuntimeError("internal: the intervened batch is laid out differently")
                h1 = hi.hidden[L][pm]
                for nll0, nll1, agree, kl in _chunk_stats(adapter, h0, h1, y):
                    if not counted:
                        intact += nll0.sum()
                    sums[key] += torch.stack([nll1.sum(), agree.sum(), kl.sum()])
                counted = True
            n += int(pm.sum())
    if n == 0:
        raise ValueError(
            "the corpus has no predicting position (every text is a single token): give longer texts"
        )
    base = float(intact / n)
    out: list[dict[str, Any]] = [{"op": "none", "layer": pd.NA, "loss": base, "delta_loss": 0.0,
                                  "top1_agreement": 1.0, "kl_to_intact": 0.0, "n_tokens": n}]
    for (op, i), s in sums.items():
        loss = float(s[0] / n)
        out.append({"op": op, "layer": i, "loss": loss, "delta_loss": loss - base,
                    "top1_agreement": float(s[1] / n), "kl_to_intact": float(s[2] / n), "n_tokens": n})
    cols = ["op", "layer", "loss", "delta_loss", "top1_agreement", "kl_to_intact", "n_tokens"]
    f = make_frame(out, "layer_sweep", columns=cols, model=str(adapter.name), n_layers=L, n_texts=n_texts,
                   n_tokens=n, ops=op_list)
    f["layer"] = f["layer"].astype("Int64")
    return f


@register_plot("layer_sweep")
def plot_layer_sweep(frame: AnalysisFrame, ax: Any = None, **kw: Any) -> Any:
    """``delta_loss`` (solid, left axis) and ``top1_agreement`` (dashed, right axis) against the block, one
    colour per op. Returns the left ``Axes``."""
    plt = require_matplotlib()
    if ax is None:
        _, ax = plt.subplots(figsize=kw.pop("figsize", (7, 4)))
    ax2 = ax.twinx()
    f = frame[frame.op != "none"]
    for k, (op, g) in enumerate(f.groupby("op", sort=False)):
        g = g.sort_values("layer")
        c = f"C{k}"
        ax.plot(g.layer.astype(float), g.delta_loss, marker="o", color=c, label=f"{op}: Δ loss", **kw)
        ax2.plot(g.layer.astype(float), g.top1_agreement, marker="x", ls="--", color=c, label=f"{op}: top-1")
    ax.axhline(0.0, color="grey", lw=0.5)
    ax.set_xlabel("block (swap: i ↔ i+1)")
    ax.set_ylabel("Δ loss vs intact (nats)")
    ax2.set_ylabel("top-1 agreement with intact")
    ax2.set_ylim(0, 1.05)
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, loc="best")
    model = getattr(frame, "meta", {}).get("model")
    ax.set_title(f"layer interventions ({model})" if model else "layer interventions")
    return ax
