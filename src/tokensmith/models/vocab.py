"""Vocabulary-space helpers for the embedding path (METHODS.md MOD-3).

Pure-ish functions over an embedding matrix and a tokenizer: the allowed-token mask used by every
token-space search, cosine-nearest projection, and soft embeddings softmax(z/τ)·E.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

__all__ = ["allowed_token_mask", "nearest_tokens", "soft_embed"]


def allowed_token_mask(
    tokenizer: Any,
    num_embeddings: int,
    *,
    ascii_only: bool = False,
    round_trip: bool = False,
    blocklist: Iterable[int] = (),
    allow_special: bool = False,
) -> torch.Tensor:
    """``[num_embeddings]`` boolean mask of token ids a search may place.

    Always excludes ids ≥ ``len(tokenizer)`` (padding rows of the embedding matrix) and — unless
    ``allow_special`` — special and added control tokens (chat markers are often *added* tokens that a
    ``vocab_size`` filter misses).

    Args:
        tokenizer: an HF tokenizer.
        num_embeddings: rows of the input embedding matrix.
        ascii_only: also drop tokens whose decoded text is not printable ASCII.
        round_trip: also drop tokens for which ``encode(decode([i])) != [i]``.
        blocklist: ids to drop (e.g. under-trained tokens).
        allow_special: keep special/added tokens.

    Examples:
        >>> import tokensmith as ts
        >>> ad = ts.tiny("llama")
        >>> m = ad.allowed_token_mask()
        >>> bool(m[ad.tokenizer.eos_token_id])
        False
    """
    n_tok = len(tokenizer)
    mask = torch.zeros(num_embeddings, dtype=torch.bool)
    mask[: min(n_tok, num_embeddings)] = True
    if not allow_special:
        bad = set(getattr(tokenizer, "all_special_ids", []) or [])
        bad |= set((getattr(tokenizer, "added_tokens_decoder", {}) or {}).keys())
        for i in bad:
            if 0 <= i < num_embeddings:
                mask[i] = False
    for i in blocklist:
        if 0 <= int(i) < num_embeddings:
            mask[int(i)] = False
    if ascii_only or round_trip:
        for i in torch.nonzero(mask).flatten().tolist():
            s = tokenizer.decode([i])
            if ascii_only and not (s.isascii() and s.isprintable() and s.strip() != ""):
                mask[i] = False
            elif round_trip and tokenizer.encode(s, add_special_tokens=False) != [i]:
                mask[i] = False
    return mask


def nearest_tokens(embeds: torch.Tensor, E: torch.Tensor, allowed: torch.Tensor | None = None) -> torch.Tensor:
    """Cosine-nearest allowed vocabulary row for each vector: argmax_v cos(x, E_v).

    Args:
        embeds: ``[..., d]``; E: ``[V, d]``; allowed: optional ``[V]`` boolean.

    Returns:
        ``[...]`` token ids.
    """
    x = torch.nn.functional.normalize(embeds.float(), dim=-1)
    e = torch.nn.functional.normalize(E.float(), dim=-1)
    sims = x @ e.T
    if allowed is not None:
        sims = sims.masked_fill(~allowed.to(sims.device), float("-inf"))
    return sims.argmax(-1)


def soft_embed(logits: torch.Tensor, E: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """Soft embeddings softmax(z/τ)·E.

    Args:
        logits: ``[..., V]``; E: ``[V, d]``; tau: temperature > 0.
    """
    if tau <= 0:
        raise ValueError("tau must be > 0")
    return torch.softmax(logits.float() / tau, dim=-1).to(E.dtype) @ E
