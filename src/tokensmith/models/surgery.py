"""Vocabulary surgery (METHODS.md MOD-14): add tokens and set embedding rows, tied or untied.

These are the only functions in :mod:`tokensmith.models` that change weights, and only because that is
their purpose (vocabulary transfer, TOK-9…13). Input and output embeddings are handled together: with tied
embeddings one matrix changes; untied models get both rows. Rows past ``len(tokenizer)`` (padding rows that
some checkpoints carry) are tracked by :func:`padding_rows` and never receive real tokens.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from tokensmith.models.offload import is_offloaded

if TYPE_CHECKING:  # pragma: no cover
    from tokensmith.models.adapter import ModelAdapter

__all__ = ["add_tokens", "set_embeddings", "padding_rows", "replace_vocabulary"]


def _refuse_offloaded(adapter: ModelAdapter, head: bool = True) -> None:
    """Surgery writes embedding rows in place; accelerate-offloaded matrices (meta tensors whose values live
    in the offload store, see :mod:`tokensmith.models.offload`) cannot be written, and writing into the copy
    ``adapter.E`` returns would be silently lost."""
    s = adapter.structure
    mods = [("input embedding", s.embed), ("LM head", s.lm_head if head else None)]
    for what, mod in mods:
        if mod is not None and is_offloaded(getattr(mod, "weight", None)):
            raise ValueError(
                f"the {what} is offloaded by accelerate (device_map 'cpu'/'disk'): vocabulary surgery cannot "
                "write its rows. Load the model without offloading them (e.g. a device_map that keeps the "
                "embeddings and the LM head on a device) to add tokens or set embeddings"
            )


def padding_rows(adapter: ModelAdapter) -> torch.Tensor:
    """Ids of embedding rows that no tokenizer entry maps to (``len(tokenizer) .. V-1``)."""
    return torch.arange(len(adapter.tokenizer), adapter.structure.vocab_size)


def add_tokens(
    adapter: ModelAdapter,
    tokens: Sequence[str],
    init: str | torch.Tensor = "mean",
    special: bool = False,
    init_out: torch.Tensor | None = None,
) -> list[int]:
    """Add ``tokens`` to the tokenizer and embedding matrices; return their ids.

    Args:
        adapter: the model (changed in place; the structure is re-discovered).
        tokens: new token strings (existing ones are left alone and keep their ids).
        init: ``'mean'`` (mean of the existing rows — the usual baseline), ``'zeros'``, or a ``[k, d]``
            tensor of input-embedding rows for the k *new* tokens.
        special: add as special tokens (never split, skipped when decoding with skip_special_tokens).
        init_out: ``[k, d]`` output-embedding rows for untied models (default: same rule as ``init``).

    Examples:
        >>> import tokensmith as ts
        >>> ad = ts.tiny("llama")
        >>> ids = ad.add_tokens(["<think>"], special=True)
        >>> ad.tokenizer.convert_ids_to_tokens(ids)
        ['<think>']
    """
    if isinstance(tokens, str):
        raise TypeError("tokens must be a list of strings, not one string")
    _refuse_offloaded(adapter)
    if not tokens or any(not isinstance(t, str) or t == "" for t in tokens):
        raise ValueError("give a non-empty list of non-empty token strings")
    tok = adapter.tokenizer
    before = set(tok.get_vocab())
    new = [t for t in dict.fromkeys(tokens) if t not in before]
    if new:
        tok.add_tokens(new, special_tokens=special)
    ids = tok.convert_tokens_to_ids(list(tokens))
    new_ids = tok.convert_tokens_to_ids(new)
    V_old = adapter.structure.vocab_size
    need = max([*new_ids, V_old - 1]) + 1
    if need > V_old:
        adapter.model.resize_token_embeddings(need, mean_resizing=False)
    adapter._rediscover()
    if new_ids:
        k = len(new_ids)
        E = adapter.E
        rows_in = _init_rows(init, E[:V_old], k)
        out_w = None if adapter.tied or adapter.structure.lm_head is None else adapter.W_U
        rows_out = None
        if out_w is not None:
            rows_out = init_out if init_out is not None else _init_rows(init if isinstance(init, str) else "mean", out_w[:V_old], k)
        set_embeddings(adapter, new_ids, rows_in, rows_out)
    return list(ids)


def _init_rows(init: str | torch.Tensor, W: torch.Tensor, k: int) -> torch.Tensor:
    if isinstance(init, torch.Tensor):
        if init.shape != (k, W.shape[1]):
            raise ValueError(f"init rows must be [{k}, {W.shape[1]}], got {tuple(init.shape)}")
        return init
    if init == "mean":
        return W.detach().float().mean(0, keepdim=True).expand(k, -1).to(W.dtype)
    if init == "zeros":
        return torch.zeros(k, W.shape[1], dtype=W.dtype, device=W.device)
    raise ValueError("init must be 'mean', 'zeros' or a tensor")


def set_embeddings(
    adapter: ModelAdapter,
    ids: Sequence[int] | torch.Tensor,
    E_in: torch.Tensor,
    E_out: torch.Tensor | None = None,
) -> None:
    """Write rows ``ids`` of the input (and, untied, output) embedding matrices.

    With tied embeddings ``E_out`` must be None or equal to ``E_in`` (one matrix). Raises on NaN rows,
    on ids outside the matrix, and on ids that are padding rows (no tokenizer entry).
    """
    _refuse_offloaded(adapter, head=E_out is not None and not adapter.tied)
    idx = torch.as_tensor(list(ids) if not isinstance(ids, torch.Tensor) else ids, dtype=torch.long)
    V = adapter.structure.vocab_size
    if idx.numel() == 0:
        return
    if idx.min() < 0 or idx.max() >= V:
        raise ValueError(f"ids must be in [0, {V})")
    if (idx >= len(adapter.tokenizer)).any():
        raise ValueError("some ids are padding rows with no tokenizer entry; add tokens first")
    if E_in.shape != (idx.numel(), adapter.structure.hidden_size) or not torch.isfinite(E_in).all():
        raise ValueError(f"E_in must be finite with shape [{idx.numel()}, {adapter.structure.hidden_size}]")
    with torch.no_grad():
        adapter.E[idx.to(adapter.E.device)] = E_in.to(adapter.E)
        if E_out is not None:
            if adapter.tied:
                if not torch.equal(E_out.to(E_in), E_in):
                    raise ValueError("this model ties input and output embeddings: E_out must equal E_in")
            else:
                W = adapter.W_U
                if E_out.shape != E_in.shape or not torch.isfinite(E_out).all():
                    raise ValueError("E_out must be finite with the shape of E_in")
                W[idx.to(W.device)] = E_out.to(W)


def replace_vocabulary(
    adapter: ModelAdapter,
    tokenizer: Any,
    E_in: torch.Tensor,
    E_out: torch.Tensor | None = None,
    *,
    name: str | None = None,
    validate: bool = True,
) -> ModelAdapter:
    """A new adapter: a copy of ``adapter``'s model on another tokenizer, with embedding rows ``E_in`` (and, for
    an untied head, output rows ``E_out``), one per id of ``tokenizer`` (vocabulary transfer).

    The model is deep-copied (the original is unchanged), its embedding matrices resized to ``len(tokenizer)``
    with transformers' ``resize_token_embeddings`` (tied heads stay tied), the config's and generation config's
    ``bos/eos/pad_token_id`` set from the new tokenizer, and every row written by :func:`set_embeddings`.

    Args:
        adapter: the source model.
        tokenizer: the new tokenizer (any HF tokenizer).
        E_in: ``[len(tokenizer), d]`` input embedding rows.
        E_out: ``[len(tokenizer), d]`` output rows for an untied head (None: the resized head keeps HF's
            initialisation for new rows; pass rows to set them).
        name: the new adapter's name (default ``"<name>+newvocab"``).
        validate: run the new adapter's load-time validation.

    Raises:
        ValueError: shapes that do not match the new vocabulary, NaN rows, ``E_out`` for a tied model that differs
            from ``E_in``.

    Examples:
        >>> import tokensmith as ts
        >>> a = ts.tiny("llama")
        >>> b = replace_vocabulary(a, a.tokenizer, a.E.detach().clone())
        >>> bool((b.E == a.E).all()) and b.model is not a.model
        True
    """
    from tokensmith.models.adapter import ModelAdapter

    n = len(tokenizer)
    d = adapter.structure.hidden_size
    if E_in.shape != (n, d):
        raise ValueError(f"E_in must be [len(tokenizer), d] = [{n}, {d}], got {tuple(E_in.shape)}")
    if E_out is not None and E_out.shape != (n, d):
        raise ValueError(f"E_out must be [{n}, {d}], got {tuple(E_out.shape)}")
    model = copy.deepcopy(adapter.model)
    model.resize_token_embeddings(n, mean_resizing=False)
    for cfg in (model.config, getattr(model, "generation_config", None)):
        if cfg is None:
            continue
        for r in ("bos", "eos", "pad"):
            if hasattr(cfg, f"{r}_token_id"):
                setattr(cfg, f"{r}_token_id", getattr(tokenizer, f"{r}_token_id", None))
    new = ModelAdapter(model, tokenizer, name=name or f"{adapter.name}+newvocab", validate=False)
    new.set_embeddings(list(range(n)), E_in.to(new.E.dtype), None if E_out is None else E_out.to(new.E.dtype))
    if validate:
        new.validate()
    return new
