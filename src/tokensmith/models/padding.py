"""Left padding: how a model takes positions, measured once at load, so a padded batch equals each row alone.

The adapter left-pads batches and scores them in unpadded coordinates, which is exact only if every real
token sees the same positions it would see alone. Models disagree on how positions reach them:

- most take ``position_ids`` counted from 0 (Llama, GPT-2, BERT, ...): the adapter passes the *logical*
  positions ``cumsum(mask) - 1`` for padded rows;
- RoBERTa-family models (roberta, xlm-roberta, camembert, data2vec-text, ...) count from
  ``padding_idx + 1``: the same logical positions plus that offset;
- some derive positions themselves and take no ``position_ids`` (the BART family, marian, pegasus,
  DistilBERT, ...): their positions ignore the mask, so a left-padded row is shifted and silently wrong.

Rather than a table per architecture, :func:`probe_position_scheme` runs one short sequence alone and
left-padded under each candidate scheme (pass logical positions; pass them plus the position table's
``padding_idx + 1``; pass nothing) and keeps the first whose real-token outputs match the row alone to fp32
rounding. When none does, :class:`ModelAdapter` refuses left-padded input with a ValueError
(:func:`padding_error`) instead of returning shifted results; right-padded and unpadded input still run.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = [
    "PositionScheme",
    "probe_position_scheme",
    "logical_positions",
    "has_left_padding",
    "padding_error",
]

_PAD = 3  # left-padding columns in the probe


@dataclass
class PositionScheme:
    """How the adapter passes positions to a model, and whether left padding is exact.

    Attributes:
        left_padding: a left-padded row equals the row alone (measured at load); False: left-padded input
            raises a ValueError.
        pass_position_ids: padded batches get explicit ``position_ids`` (``logical + offset``).
        offset: the model's first position (0, or ``padding_idx + 1`` for RoBERTa-family models).
        reason: how the scheme was decided (or why left padding is refused).
        max_rel_err: the probe's max relative difference padded vs alone under the chosen scheme.
    """

    left_padding: bool = True
    pass_position_ids: bool = True
    offset: int = 0
    reason: str = "default"
    max_rel_err: float | None = None

    def summary(self) -> dict[str, Any]:
        return {
            "left_padding": self.left_padding,
            "pass_position_ids": self.pass_position_ids,
            "offset": self.offset,
            "reason": self.reason,
            "max_rel_err": self.max_rel_err,
        }


def logical_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """``(cumsum(mask) - 1).clamp_min(0)``: 0 at each row's first real token, counted over real tokens."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def has_left_padding(attention_mask: torch.Tensor) -> bool:
    """True when some row has a masked position before a real token (left padding or a hole)."""
    m = attention_mask.bool()
    if m.dim() != 2 or m.shape[1] < 2:
        return False
    return bool((m[:, 1:] & ~m[:, :-1]).any())


def padding_error(name: str, scheme: PositionScheme) -> ValueError:
    """The error raised for left-padded input on a model that cannot take it."""
    return ValueError(
        f"{name!r} cannot take left-padded input exactly: {scheme.reason}. A left-padded row would be "
        "scored at shifted positions. Run rows of different lengths one at a time (or batch rows of equal "
        "length), or right-pad them yourself and pass input_ids/attention_mask directly"
    )


def _padding_offsets(model: nn.Module) -> list[int]:
    """Candidate first positions: ``padding_idx + 1`` of absolute position tables that have a padding_idx."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    out: list[int] = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Embedding) and m is not emb and m.padding_idx is not None and "position" in name.lower():
            off = int(m.padding_idx) + 1
            if off not in out:
                out.append(off)
    return out


def _output(out: Any) -> torch.Tensor | None:
    for attr in ("logits", "last_hidden_state"):
        v = getattr(out, attr, None)
        if isinstance(v, torch.Tensor):
            return v
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    return None


def probe_position_scheme(
    model: nn.Module,
    forward_params: Collection[str],
    ids: torch.Tensor,
    pad_token_id: int,
    *,
    width: int | None = None,
    depth: int | None = None,
) -> PositionScheme:
    """Decide how positions are passed to ``model`` by measuring it (see the module docstring).

    Runs ``ids`` (``[1, T]``) alone (the plain HF call, no ``position_ids``) and left-padded by three
    ``pad_token_id`` columns under each candidate scheme, in order: logical positions; logical positions
    plus an offset ``padding_idx + 1`` for each absolute position table with a ``padding_idx``; no
    ``position_ids`` (the model derives its own). The first scheme whose real-token outputs match the row
    alone, ``max|Δ| ≤ 8·ε·√d·L · max|y|``, wins (d = ``width``, the residual width; L = ``depth``, the number
    of layers: the fp32 rounding of a padded vs an unpadded batch; a shifted position moves the outputs far
    more, ~1e-3 relative even in a tiny random model with small position embeddings). Encoder-decoder models get a fixed 2-token
    decoder input in every run. A forward that raises counts as a mismatch.
    """
    params = set(forward_params)
    if "attention_mask" not in params:
        return PositionScheme(False, False, 0, "its forward takes no attention_mask")
    cfg = getattr(model, "config", None)
    extra: dict[str, Any] = {}
    if "use_cache" in params:
        extra["use_cache"] = False
    if bool(getattr(cfg, "is_encoder_decoder", False)) and "decoder_input_ids" in params:
        extra["decoder_input_ids"] = ids[:, :2]
    T = ids.shape[1]
    pad = torch.full((1, _PAD), int(pad_token_id), dtype=ids.dtype, device=ids.device)
    padded = torch.cat([pad, ids], 1)
    mask = torch.cat([torch.zeros_like(pad), torch.ones_like(ids)], 1)
    logical = logical_positions(mask)

    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            try:
                ref = _output(model(input_ids=ids, attention_mask=torch.ones_like(ids), **extra))
            except Exception as e:  # noqa: BLE001 - the plain call failed: nothing to compare with
                return PositionScheme(True, "position_ids" in params, 0, f"not probed (plain forward failed: {type(e).__name__})")
            if ref is None:
                return PositionScheme(True, "position_ids" in params, 0, "not probed (the model returns no tensor)")
            ref = ref.float()
            width = width or int(getattr(cfg, "hidden_size", 0) or ref.shape[-1])
            depth = depth or int(getattr(cfg, "num_hidden_layers", 0) or 12)
            scale = max(ref.abs().max().item(), 1e-30)
            tol = 8 * torch.finfo(torch.float32).eps * math.sqrt(width) * max(depth, 1) * scale

            candidates: list[tuple[bool, int, str]] = []
            if "position_ids" in params:
                candidates.append((True, 0, "position_ids counted from 0 for the first real token"))
                for off in _padding_offsets(model):
                    candidates.append((True, off, f"position_ids counted from padding_idx + 1 = {off}"))
            candidates.append((False, 0, "the model derives positions itself (no position_ids passed)"))
            errs: list[str] = []
            for pass_pid, off, why in candidates:
                kw = dict(extra)
                if pass_pid:
                    kw["position_ids"] = logical + off
                try:
                    got = _output(model(input_ids=padded, attention_mask=mask, **kw))
                except Exception as e:  # noqa: BLE001 - this scheme does not run
                    errs.append(f"{why}: raised {type(e).__name__}")
                    continue
                if got is None:
                    continue
                got = got.float()
                got = got[:, -T:] if got.shape[1] == T + _PAD else got  # seq2seq: decoder outputs, same length
                if got.shape != ref.shape:
                    errs.append(f"{why}: output shape {list(got.shape)}")
                    continue
                err = (got - ref).abs().max().item()
                if err <= tol:
                    return PositionScheme(True, pass_pid, off, why, err / scale)
                errs.append(f"{why}: max |Δ| {err:.2g}")
    finally:
        model.train(was)
    return PositionScheme(
        False, "position_ids" in params, 0,
        "a left-padded row differs from the row alone under every position scheme tried (" + "; ".join(errs) + ")",
    )
