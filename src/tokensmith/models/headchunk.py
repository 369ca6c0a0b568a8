"""Chunked LM head: per-token log-probs and KL without ever holding ``[N, V]`` logits (METHODS.md MOD-2).

At a 49k-262k vocabulary the logits, not the model, dominate a training step's memory: one fp32
``[B·T, V]`` tensor at B=16 rows, T=256, V=49,152 is 805 MB, and a naive token-level loss keeps several
(policy and reference logits, their log-softmaxes, the KL product, the gradient). This module runs the
model **without its head** (only the last layer's output at the positions that are scored is kept,
``[N, d]``) and applies the head chunk by chunk:

    for each chunk c of positions:  z_c = unembed(h_c)            (final norm, head, scale, soft-cap)
                                    log p(y_c) = z_c[y_c] − logsumexp(z_c)
                                    KL_c = Σ_v p_ref,v (log p_ref,v − log p_v)   (z_ref,c = ref.unembed(h_ref,c))

Under autograd each chunk is wrapped in ``torch.utils.checkpoint``: only ``h_c`` is saved and the chunk's
logits are recomputed in the backward, so peak memory is one chunk of ``[chunk, V]`` temporaries in the
forward and in the backward. The cost is one extra head matmul per chunk (policy) plus the reference head in
the recomputation; the head is ~20% of SmolLM2-135M's forward FLOPs.

Examples:
    >>> import tokensmith as ts, torch
    >>> from tokensmith.models.headchunk import final_hidden, chunked_head_logprobs
    >>> a = ts.tiny("llama")
    >>> b = a.encode_batch([("Hello", " world"), ("Hi", " there you")])
    >>> keep = torch.zeros_like(b.target_mask)
    >>> keep[:, :-1] = b.target_mask[:, 1:]                      # positions predicting a target token
    >>> h = final_hidden(a, b, keep)                              # [N, d], the head never ran on them
    >>> lp = chunked_head_logprobs(a, h, b.input_ids[b.target_mask], chunk=2)["logprobs"]
    >>> ref = a.token_logprobs(b)[b.target_mask]
    >>> bool(torch.allclose(lp, ref, atol=1e-5))
    True
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch.utils.checkpoint import checkpoint

if TYPE_CHECKING:
    from tokensmith.models.adapter import ModelAdapter

__all__ = ["final_hidden", "chunked_head_logprobs"]


def final_hidden(
    adapter: ModelAdapter, inputs: Any, positions: torch.Tensor, *, grad: bool = False, **forward_kw: Any
) -> torch.Tensor:
    """The last layer's output (before the final norm) at ``positions``: ``[N, d]``, N = positions.sum().

    The model runs with ``logits_to_keep=1`` (its head sees one position per row) where it supports it;
    a model without ``logits_to_keep`` still runs its full head (correct, but no memory is saved).

    Args:
        adapter: the model.
        inputs: anything :meth:`ModelAdapter.forward` takes (``EncodedBatch``, text, ids dict).
        positions: ``[B, T]`` boolean mask of the positions to return, in row-major order.
        grad: keep the autograd graph (training).
        forward_kw: passed on to :meth:`ModelAdapter.forward`.

    Raises:
        ValueError: if the model has no LM head, or ``positions`` does not match the input shape.
    """
    s = adapter.structure
    if s.lm_head is None:
        raise ValueError("this model has no LM head; final_hidden/chunked_head_logprobs need a causal or masked LM")
    grabbed: list[torch.Tensor] = []

    def hook(_mod: torch.nn.Module, _args: Any, out: Any) -> None:
        grabbed.append(out if isinstance(out, torch.Tensor) else out[0])

    handle = s.layers[-1].register_forward_hook(hook)
    try:
        with torch.set_grad_enabled(grad):
            keep = 1 if adapter._keep_mask_supported() else None
            adapter.forward(inputs, logits_to_keep=keep, **forward_kw)
    finally:
        handle.remove()
    if not grabbed:
        raise RuntimeError("the last layer did not run (a hook stopped the forward early?)")
    h = grabbed[-1]
    if h.shape[:2] != positions.shape:
        raise ValueError(f"positions {tuple(positions.shape)} do not match the input's [B, T] {tuple(h.shape[:2])}")
    return h[positions.to(h.device).bool()]


def _chunk_stats(
    adapter: ModelAdapter,
    reference: ModelAdapter | None,
    h: torch.Tensor,
    h_ref: torch.Tensor | None,
    y: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    lsm = torch.log_softmax(adapter.unembed(h).float(), -1)
    lp = lsm.gather(-1, y[:, None])[:, 0]
    if reference is None or h_ref is None:
        empty = lp.new_zeros(0)
        return lp, empty, empty
    with torch.no_grad():
        zr = reference.unembed(h_ref).float()
        lq = torch.log_softmax(zr, -1)
        ref_lp = lq.gather(-1, y[:, None])[:, 0]
    kl = (lq.exp() * (lq - lsm)).sum(-1)  # KL(π_ref ‖ π_θ), differentiable through the policy's log-softmax
    return lp, ref_lp, kl


def chunked_head_logprobs(
    adapter: ModelAdapter,
    h: torch.Tensor,
    targets: torch.Tensor,
    *,
    reference: ModelAdapter | None = None,
    h_ref: torch.Tensor | None = None,
    chunk: int = 256,
) -> dict[str, torch.Tensor]:
    """Per-token log-probs of ``targets`` (and, with a reference, its log-probs and KL(π_ref ‖ π_θ)) from
    final hidden states, applying the LM head ``chunk`` positions at a time.

    Args:
        adapter: the policy (its :meth:`~ModelAdapter.unembed` is the head).
        h: ``[N, d]`` policy hidden states from :func:`final_hidden` (with grad for training).
        targets: ``[N]`` the token each position predicts.
        reference: optional frozen reference with the same vocabulary.
        h_ref: ``[N, d]`` the reference's hidden states at the same positions (no grad).
        chunk: positions per chunk (peak memory ~ a few ``[chunk, V]`` fp32 tensors).

    Returns:
        ``{"logprobs": [N]}`` plus ``"ref_logprobs"`` and ``"kl"`` (``[N]`` each) when a reference is given;
        fp32. Gradients flow into ``h`` and the head's parameters; never into the reference.

    Raises:
        ValueError: shapes disagree, ``chunk < 1``, or the reference has another vocabulary.
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    if h.dim() != 2 or targets.shape != h.shape[:1]:
        raise ValueError(f"h must be [N, d] and targets [N]; got {tuple(h.shape)} and {tuple(targets.shape)}")
    if (reference is None) != (h_ref is None):
        raise ValueError("give both reference and h_ref, or neither")
    if reference is not None:
        assert h_ref is not None
        if h_ref.shape[0] != h.shape[0]:
            raise ValueError(f"h_ref has {h_ref.shape[0]} positions, h has {h.shape[0]}")
        if not adapter.same_vocab(reference):
            raise ValueError("the reference must share the policy's tokenizer (same vocabulary) for a per-token KL")
    y = targets.to(h.device).long()
    train = torch.is_grad_enabled() and (h.requires_grad or any(p.requires_grad for p in adapter.model.parameters()))
    lps, rlps, kls = [], [], []
    for s in range(0, h.shape[0], chunk):
        e = s + chunk
        hr = h_ref[s:e].to(h.device) if h_ref is not None else None
        if train:
            lp, rlp, kl = checkpoint(_chunk_stats, adapter, reference, h[s:e], hr, y[s:e], use_reentrant=False)
        else:
            lp, rlp, kl = _chunk_stats(adapter, reference, h[s:e], hr, y[s:e])
        lps.append(lp)
        rlps.append(rlp)
        kls.append(kl)
    out = {"logprobs": torch.cat(lps) if lps else h.new_zeros(0, dtype=torch.float32)}
    if reference is not None:
        out["ref_logprobs"] = torch.cat(rlps) if rlps else out["logprobs"].new_zeros(0)
        out["kl"] = torch.cat(kls) if kls else out["logprobs"].new_zeros(0)
    return out
