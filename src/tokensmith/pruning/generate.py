"""Decoding with a pruned KV cache: the loop ``adapter.generate`` runs inside ``with reducer.apply(adapter)``.

HF ``generate`` derives positions and the padding mask from the original sequence length, which no longer
matches a cache whose columns were evicted. This loop passes them explicitly at every step:

- ``position_ids``: each row's next *logical* position (policy ``preserve``: original length + steps;
  ``reindex``: kept count + steps; ``rerotate``: the compacted count + steps);
- ``attention_mask``: ``None`` when the cache holds no padding slot, else the mask over the cache *slots*
  plus the new token (left-padded rows keep some pad slots as fillers of the rectangular cache);
- the cache object the session prunes.

Greedy by default; ``do_sample=True`` samples with ``temperature`` / ``top_k`` from a seeded generator (the
global RNG is untouched). Returns the same :class:`~tokensmith.models.adapter.GenerationResult` as
``adapter.generate``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from tokensmith.models import kvcache
from tokensmith.models.adapter import GenerationResult
from tokensmith.models.encoding import EncodedBatch

if TYPE_CHECKING:  # pragma: no cover
    from tokensmith.models.adapter import ModelAdapter
    from tokensmith.pruning.kv import KVSession

__all__ = ["pruned_generate", "decode_loop"]


def _choose(
    logits: torch.Tensor, do_sample: bool, temperature: float, top_k: int | None, gen: torch.Generator | None
) -> torch.Tensor:
    if not do_sample:
        return logits.argmax(-1)
    z = logits.float() / max(float(temperature), 1e-6)
    if top_k:
        kth = torch.topk(z, int(top_k), -1).values[..., -1:]
        z = z.masked_fill(z < kth, float("-inf"))
    p = torch.softmax(z, -1)
    return torch.multinomial(p.cpu(), 1, generator=gen).squeeze(-1).to(logits.device)


def decode_loop(
    adapter: ModelAdapter,
    batch: EncodedBatch,
    cache: Any,
    first_logits: torch.Tensor,
    next_position: Any,
    max_new_tokens: int,
    *,
    slot_mask: Any = None,
    do_sample: bool = False,
    seed: int | None = None,
    temperature: float = 1.0,
    top_k: int | None = None,
    eos_token_id: int | None = -1,
    output_logits: bool = False,
) -> GenerationResult:
    """Greedy / sampled decoding from a (pruned) cache after the prompt.

    Args:
        first_logits: ``[B, V]`` next-token logits of the prompt's last position.
        next_position: a callable returning ``[B]`` logical positions of the next token (read before each
            step) — or a tensor, advanced by one per step.
        slot_mask: a callable returning the ``[B, S]`` slot mask of the cache or None (no padding held).
        eos_token_id: stop a row after it (default: the tokenizer's EOS; None never stops).
        output_logits: also return each step's ``[B, V]`` next-token logits as ``result.logits`` (a list).
    """
    dev = adapter.device
    tok = adapter.tokenizer
    eos = getattr(tok, "eos_token_id", None) if eos_token_id == -1 else eos_token_id
    key = "cache" if "cache" in adapter._fwd_params else "past_key_values"
    off = adapter.positions.offset or 0
    gen = torch.Generator().manual_seed(int(seed)) if (do_sample and seed is not None) else None
    B = int(batch.input_ids.shape[0])
    pos_state = None if callable(next_position) else torch.as_tensor(next_position, device=dev).long().clone()
    logits = first_logits
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    out_tokens: list[torch.Tensor] = []
    step_logits: list[torch.Tensor] = []
    with torch.no_grad():
        for step in range(int(max_new_tokens)):
            if output_logits:
                step_logits.append(logits.float().cpu())
            nxt = _choose(logits, do_sample, temperature, top_k, gen)
            nxt = torch.where(done, torch.full_like(nxt, adapter.pad_token_id), nxt)
            out_tokens.append(nxt)
            if eos is not None:
                done = done | (nxt == eos)
            if bool(done.all()) or step == int(max_new_tokens) - 1:
                break
            pos = next_position() if callable(next_position) else pos_state
            pid = (pos.to(dev).long() + off)[:, None]
            m = slot_mask() if callable(slot_mask) else slot_mask
            am = (
                None
                if m is None
                else torch.cat([m.long().to(dev), torch.ones(B, 1, dtype=torch.long, device=dev)], 1)
            )
            kw: dict[str, Any] = {
                "input_ids": nxt[:, None],
                "position_ids": pid,
                key: cache,
                "use_cache": True,
            }
            if am is not None:
                kw["attention_mask"] = am
            if "logits_to_keep" in adapter._fwd_params:
                kw["logits_to_keep"] = 1
            res = adapter.model(**kw)
            logits = res.logits[:, -1]
            if pos_state is not None:
                pos_state = pos_state + 1
    new = torch.stack(out_tokens, 1) if out_tokens else torch.zeros(B, 0, dtype=torch.long, device=dev)
    seqs = torch.cat([batch.input_ids.to(dev), new], 1).cpu()
    rows, texts = [], []
    for b in range(B):
        row = new[b].cpu()
        if eos is not None and bool((row == eos).any()):
            row = row[: int((row == eos).nonzero()[0]) + 1]
        rows.append(row)
        texts.append(tok.decode(row, skip_special_tokens=True))
    result = GenerationResult(seqs, rows, texts, batch)
    if output_logits:
        result.logits = step_logits  # type: ignore[attr-defined]
    return result


def _as_encoded_batch(adapter: ModelAdapter, inputs: Any) -> EncodedBatch:
    batch = adapter.as_batch(inputs)
    if isinstance(batch, EncodedBatch):
        return batch
    if isinstance(batch, dict) and "input_ids" in batch:
        ids = batch["input_ids"]
        am = batch.get("attention_mask")
        am = torch.ones_like(ids) if am is None else am
        if bool((am[:, 1:].long() < am[:, :-1].long()).any()):
            raise ValueError(
                "attention_mask must be left-padded (pads before the real tokens) for generation"
            )
        pid = (am.long().cumsum(-1) - 1).clamp_min(0)
        return EncodedBatch(ids, am, pid, (am == 0).long().sum(-1), [])
    raise TypeError("generate takes text, encoded inputs or {'input_ids', 'attention_mask'}")


def pruned_generate(
    adapter: ModelAdapter,
    session: KVSession,
    inputs: Any,
    max_new_tokens: int = 32,
    *,
    do_sample: bool = False,
    seed: int | None = None,
    temperature: float = 1.0,
    top_k: int | None = None,
    eos_token_id: int | None = -1,
    output_logits: bool = False,
    **unsupported: Any,
) -> GenerationResult:
    """``adapter.generate`` inside ``with Reducer(target="kv", ...).apply(adapter)``: prefill (the session
    prunes the cache as the layers run), then :func:`decode_loop` with the session's positions and slot mask
    (the session keeps pruning in decode steps when the recipe has a ``capacity``)."""
    if unsupported:
        raise TypeError(
            f"generate inside a KV Reducer supports do_sample, seed, temperature, top_k, eos_token_id, output_logits; got "
            f"{sorted(unsupported)} (beam search and HF generation configs are not supported on a pruned cache)"
        )
    if not (adapter.is_causal and adapter.structure.lm_head is not None):
        raise ValueError("generate needs a causal LM with an LM head")
    batch = _as_encoded_batch(adapter, inputs)
    adapter.check_length(
        int(batch.input_ids.shape[1]) + int(max_new_tokens), "the prompt plus max_new_tokens"
    )
    padded = not bool(batch.attention_mask.bool().all())
    with torch.no_grad():
        out = adapter.forward(batch, use_cache=True, logits_to_keep=1)
    cache = session.cache
    if padded and kvcache.cache_kind(cache) == "hybrid":
        raise ValueError(
            "KV pruning of a hybrid (sliding + full attention) cache needs unpadded rows: the cache indexes its "
            "padding mask per layer kind; generate the rows one at a time (or with equal lengths)"
        )
    return decode_loop(
        adapter,
        batch,
        cache,
        out.logits[:, -1],
        lambda: session.next_pos,
        max_new_tokens,
        slot_mask=session.slot_mask,
        do_sample=do_sample,
        seed=seed,
        temperature=temperature,
        top_k=top_k,
        eos_token_id=eos_token_id,
        output_logits=output_logits,
    )


def generate_from_hidden(
    red: Any, adapter: ModelAdapter, report: Any, inputs: Any, max_new_tokens: int = 32, **kw: Any
) -> GenerationResult:
    """``adapter.generate`` inside ``with Reducer(target="hidden", ...).apply(adapter)``: the prefill is the
    pruned forward (later layers cache only the kept tokens), then :func:`decode_loop`."""
    from tokensmith.pruning.hidden import pruned_forward

    batch = _as_encoded_batch(adapter, inputs)
    if not bool(batch.attention_mask.bool().all()):
        raise ValueError(
            "hidden-state pruning with generation needs unpadded rows (its cache holds different token counts "
            "per layer, which one padding mask cannot describe); generate the rows one at a time"
        )
    res = pruned_forward(
        adapter, batch, red.hidden_stages(adapter), action="drop", positions=red.positions, return_cache=True
    )
    _fill_hidden_report(report, res, batch)
    nxt = batch.attention_mask.long().sum(-1).to(adapter.device)
    first = res.logits if res.logits.dim() == 2 else res.logits[:, -1]
    return decode_loop(adapter, batch, res.cache, first, nxt, max_new_tokens, **kw)


def _fill_hidden_report(report: Any, res: Any, batch: EncodedBatch) -> None:
    report.tokens_in = batch.attention_mask.long().sum(-1).cpu()
    tpl = getattr(res, "tokens_per_layer", None)
    if tpl is not None:
        for i, t in tpl.items() if isinstance(tpl, dict) else enumerate(tpl):
            report.kept[int(i)] = (
                torch.as_tensor(t).reshape(-1, 1).cpu()
                if torch.as_tensor(t).dim() <= 1
                else torch.as_tensor(t).cpu()
            )
    report.flops_ratio = getattr(res, "flops_ratio", None)
    report.physical = bool(getattr(res, "physical", True))
