"""Preference pairs encoded jointly through the adapter, and their per-token log-probs and KL (METHODS.md 4).

Every pair is rendered as prompt + completion in ONE string (through the chat template when asked) and
tokenized once (``adapter.encode``), so chosen and rejected carry exactly the prompt tokens the model sees at
inference and their completion masks come from character offsets. In chat mode the closing end-of-turn
tokens are scored by default (``score_eot=True``), as TRL's DPO completions end. Chosen and rejected rows are
padded together (one left-padded batch of ``2B`` rows), so their per-token tensors share one ``T``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from tokensmith.models import (
    EncodedBatch,
    chunked_head_logprobs,
    final_hidden,
    gather_logprobs,
    pad_batch,
    token_kl,
)
from tokensmith.models.logprobs import shift_target_mask

if TYPE_CHECKING:  # pragma: no cover
    from tokensmith.models.adapter import ModelAdapter

__all__ = ["PreferencePair", "PreferenceBatch", "encode_pairs", "pair_logprobs", "pair_kl", "pair_logprobs_and_kl"]


@dataclass(frozen=True)
class PreferencePair:
    """One preference example: a prompt, the preferred and the dispreferred completion."""

    prompt: str
    chosen: str
    rejected: str


@dataclass
class PreferenceBatch:
    """``B`` pairs as one left-padded batch of ``2B`` rows: rows ``[0, B)`` chosen, ``[B, 2B)`` rejected.

    Attributes:
        batch: the :class:`~tokensmith.models.EncodedBatch` of all rows.
        mask_w: ``[B, T]`` completion mask of the chosen rows (the scored tokens).
        mask_l: ``[B, T]`` completion mask of the rejected rows.
    """

    batch: EncodedBatch
    mask_w: torch.Tensor
    mask_l: torch.Tensor

    def __len__(self) -> int:
        return int(self.mask_w.shape[0])

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[2B, ...]`` → (chosen ``[B, ...]``, rejected ``[B, ...]``)."""
        B = len(self)
        if x.shape[0] != 2 * B:
            raise ValueError(f"expected {2 * B} rows (chosen then rejected), got {x.shape[0]}")
        return x[:B], x[B:]


def _as_pairs(pairs: Iterable[Any]) -> list[PreferencePair]:
    out = []
    for i, p in enumerate(pairs):
        if isinstance(p, PreferencePair):
            out.append(p)
        elif isinstance(p, Mapping):
            missing = [k for k in ("prompt", "chosen", "rejected") if k not in p]
            if missing:
                raise ValueError(f"pair {i} has no {missing} field(s); a preference row needs prompt, chosen, rejected")
            out.append(PreferencePair(str(p["prompt"]), str(p["chosen"]), str(p["rejected"])))
        elif isinstance(p, Sequence) and len(p) == 3:
            out.append(PreferencePair(*map(str, p)))
        else:
            raise TypeError(f"pair {i}: expected a PreferencePair, a dict or a (prompt, chosen, rejected) tuple")
    if not out:
        raise ValueError("no preference pairs given")
    return out


def encode_pairs(
    adapter: ModelAdapter,
    pairs: Iterable[Any],
    *,
    chat: bool | None = None,
    system: str | None = None,
    score_eot: bool | None = None,
    **encode_kwargs: Any,
) -> PreferenceBatch:
    """Encode preference pairs (``PreferencePair``, dicts with prompt/chosen/rejected — e.g. rows of a
    ``datasets.Dataset`` — or tuples) jointly through ``adapter.encode``.

    Args:
        adapter: the policy (its tokenizer and chat template).
        pairs: the pairs.
        chat: render through the chat template (default: when the tokenizer has one).
        system: system message (chat mode).
        score_eot: score the closing end-of-turn tokens (default: True in chat mode).
        **encode_kwargs: other :meth:`~tokensmith.models.ModelAdapter.encode` options.

    Raises:
        ValueError: a missing field, an empty completion, or a completion that merges entirely into the prompt.

    Examples:
        >>> import tokensmith as ts
        >>> ad = ts.tiny("llama")
        >>> pb = encode_pairs(ad, [("Say hi", "Hi!", "No.")])
        >>> pb.mask_w.shape == pb.mask_l.shape, bool(pb.mask_w.any())
        (True, True)
    """
    rows = _as_pairs(pairs)
    if chat is None:
        chat = getattr(adapter.tokenizer, "chat_template", None) is not None
    if score_eot is None:
        score_eot = bool(chat)
    kw = dict(encode_kwargs)
    if chat:
        kw.update(chat=True, system=system, score_eot=score_eot)
    encs = []
    for side in ("chosen", "rejected"):
        for i, p in enumerate(rows):
            text = getattr(p, side)
            if not text.strip():
                raise ValueError(f"pair {i}: the {side} completion is empty; drop the pair or give a completion")
            encs.append(adapter.encode(p.prompt, target=text, **kw))
    batch = pad_batch(encs, adapter.pad_token_id)
    tm = batch.target_mask
    B = len(rows)
    for i in range(2 * B):
        if not bool(tm[i].any()):
            side = "chosen" if i < B else "rejected"
            raise ValueError(f"pair {i % B}: the {side} completion produced no token of its own")
    return PreferenceBatch(batch, tm[:B], tm[B:])


def pair_logprobs(
    adapter: ModelAdapter, pb: PreferenceBatch, *, grad: bool = False, max_batch_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs of the chosen and the rejected completions: two ``[B, T]`` tensors (0 outside the
    completion masks), from ``adapter.token_logprobs`` (LM head only at the completion positions)."""
    lp = adapter.token_logprobs(pb.batch, grad=grad, max_batch_size=max_batch_size)
    return pb.split(lp)


def pair_kl(
    policy: ModelAdapter,
    reference: ModelAdapter,
    pb: PreferenceBatch,
    *,
    direction: str = "ref||policy",
    grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token KL between the reference's and the policy's next-token distributions at every completion
    position (chunked, ``adapter.kl``): two ``[B, T]`` tensors.

    Args:
        policy: the model being trained.
        reference: the frozen reference (same tokenizer).
        pb: the encoded pairs.
        direction: ``"ref||policy"`` (TDPO's sequential KL, D_KL(π_ref ‖ π_θ)) or ``"policy||ref"``.
        grad: keep the graph through the policy.
    """
    if direction == "ref||policy":
        kl = reference.kl(policy, pb.batch, grad_other=grad)
    elif direction == "policy||ref":
        kl = policy.kl(reference, pb.batch, grad=grad)
    else:
        raise ValueError(f"direction must be 'ref||policy' or 'policy||ref', got {direction!r}")
    return pb.split(kl)


def _completion_logits(adapter: ModelAdapter, pb: PreferenceBatch, keep: torch.Tensor, grad: bool) -> torch.Tensor:
    """``[N, V]`` logits at the positions predicting a completion token (LM head only there)."""
    with torch.set_grad_enabled(grad):
        out = adapter.forward(pb.batch, logits_to_keep=keep.to(adapter.device))
        z = out.logits
        return z[keep.to(z.device)] if z.dim() == 3 else z


def pair_logprobs_and_kl(
    policy: ModelAdapter,
    reference: ModelAdapter,
    pb: PreferenceBatch,
    *,
    grad: bool = True,
    head_chunk: int | None = 256,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Policy and reference per-token log-probs and the per-token KL(π_ref ‖ π_θ) from ONE forward of each model.

    :func:`pair_logprobs` + :func:`pair_kl` run the policy twice (two autograd graphs alive at the backward);
    this runs each model once. With ``head_chunk`` (default) the models run without their LM head and the head
    is applied ``head_chunk`` completion positions at a time (:func:`tokensmith.models.headchunk
    .chunked_head_logprobs`, recomputed per chunk in the backward): no ``[N, V]`` logits tensor ever exists.
    With ``head_chunk=None`` the logits at the completion positions (``[N, V]``) are materialised once and the
    KL is computed from them by ``token_kl`` (chunked, backward recomputing per chunk). Both equal the
    separate calls (tested).

    Returns:
        ``{"policy": (lp_w, lp_l), "reference": (ref_w, ref_l), "kl": (kl_w, kl_l)}``, each ``[B, T]``.

    Raises:
        ValueError: the two models' tokenizers differ.
    """
    if not policy.same_vocab(reference):
        raise ValueError("the reference must share the policy's tokenizer (same vocabulary) for a per-token KL")
    tm = pb.batch.target_mask
    keep = shift_target_mask(tm)
    if head_chunk is not None and policy.structure.lm_head is not None and reference.structure.lm_head is not None:
        hp = final_hidden(policy, pb.batch, keep, grad=grad)
        with reference.eval_mode():
            hr = final_hidden(reference, pb.batch, keep, grad=False)
        tgt = pb.batch.input_ids[tm].to(hp.device)
        with torch.set_grad_enabled(grad):
            st = chunked_head_logprobs(policy, hp, tgt, reference=reference, h_ref=hr.to(hp.device), chunk=head_chunk)
            out = {}
            for k, name in (("policy", "logprobs"), ("reference", "ref_logprobs"), ("kl", "kl")):
                v = st[name]
                full = torch.zeros(tm.shape, dtype=torch.float32, device=v.device).masked_scatter(tm.to(v.device), v)
                out[k] = pb.split(full)
        return out
    zp = _completion_logits(policy, pb, keep, grad)
    with reference.eval_mode():
        zr = _completion_logits(reference, pb, keep, False).to(zp.device)
    tgt = pb.batch.input_ids[tm].to(zp.device)
    with torch.set_grad_enabled(grad):
        vals = {"policy": gather_logprobs(zp, tgt), "reference": gather_logprobs(zr, tgt), "kl": token_kl(zr, zp)}
        out = {}
        for k, v in vals.items():
            full = torch.zeros(tm.shape, dtype=torch.float32, device=v.device).masked_scatter(tm.to(v.device), v)
            out[k] = pb.split(full)
    return out
