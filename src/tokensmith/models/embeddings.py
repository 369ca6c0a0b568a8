"""Non-vocabulary vectors in the input sequence (METHODS.md MOD-13). Pure tensor functions."""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["insert_embeddings"]


def insert_embeddings(
    embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    input_ids: torch.Tensor,
    vectors: torch.Tensor,
    positions: Sequence[int],
    pad_id: int = 0,
) -> dict[str, torch.Tensor]:
    """Insert ``vectors[k]`` before unpadded position ``positions[k]`` of every row.

    Rows are assumed left-padded; the output is left-padded too, with position ids counting real and
    virtual tokens (so a prefix soft prompt shifts the text's positions, as in prompt tuning).

    Args:
        embeds: ``[B, T, d]``; attention_mask: ``[B, T]``; input_ids: ``[B, T]``.
        vectors: ``[k, d]``; positions: k insertion indices in ``[0, len_b]`` for every row.
        pad_id: id written at virtual positions of ``input_ids``.

    Returns:
        ``inputs_embeds [B, T+k, d]``, ``attention_mask``, ``position_ids``, ``virtual_mask``, ``input_ids``.

    Examples:
        >>> import torch
        >>> e = torch.zeros(1, 2, 3); m = torch.ones(1, 2, dtype=torch.long); ids = torch.tensor([[5, 6]])
        >>> out = insert_embeddings(e, m, ids, torch.ones(1, 3), [0])
        >>> out["virtual_mask"].tolist(), out["input_ids"].tolist()
        ([[True, False, False]], [[0, 5, 6]])
    """
    if vectors.dim() != 2 or vectors.shape[-1] != embeds.shape[-1]:
        raise ValueError(f"vectors must be [k, {embeds.shape[-1]}], got {tuple(vectors.shape)}")
    if len(positions) != vectors.shape[0]:
        raise ValueError("give one insertion position per vector")
    if not torch.isfinite(vectors).all():
        raise ValueError("vectors contain NaN or inf")
    B, T, d = embeds.shape
    k = vectors.shape[0]
    order = sorted(range(k), key=lambda i: (positions[i], i))
    out_e = embeds.new_zeros(B, T + k, d)
    out_m = torch.zeros(B, T + k, dtype=attention_mask.dtype, device=embeds.device)
    out_v = torch.zeros(B, T + k, dtype=torch.bool, device=embeds.device)
    out_i = torch.full((B, T + k), pad_id, dtype=input_ids.dtype, device=embeds.device)
    rows_e = []
    for b in range(B):
        real = attention_mask[b].bool()
        e_b, ids_b = embeds[b][real], input_ids[b][real]
        n = e_b.shape[0]
        pieces_e, pieces_v, pieces_i, prev = [], [], [], 0
        for i in order:
            p = int(positions[i])
            if not 0 <= p <= n:
                raise ValueError(f"insertion position {p} outside [0, {n}] for row {b}")
            pieces_e += [e_b[prev:p], vectors[i : i + 1]]
            pieces_v += [torch.zeros(p - prev, dtype=torch.bool), torch.ones(1, dtype=torch.bool)]
            pieces_i += [ids_b[prev:p], torch.full((1,), pad_id, dtype=ids_b.dtype, device=ids_b.device)]
            prev = p
        pieces_e.append(e_b[prev:])
        pieces_v.append(torch.zeros(n - prev, dtype=torch.bool))
        pieces_i.append(ids_b[prev:])
        row = torch.cat(pieces_e, 0)
        rows_e.append(row)
        L = row.shape[0]
        out_v[b, T + k - L :] = torch.cat(pieces_v).to(embeds.device)
        out_i[b, T + k - L :] = torch.cat(pieces_i)
        out_m[b, T + k - L :] = 1
    out_e = torch.stack([torch.cat([embeds.new_zeros(T + k - r.shape[0], d), r], 0) for r in rows_e], 0)
    pos = (out_m.long().cumsum(-1) - 1).clamp_min(0)
    return {
        "inputs_embeds": out_e,
        "attention_mask": out_m,
        "position_ids": pos,
        "virtual_mask": out_v,
        "input_ids": out_i,
    }
