"""What a pruning run did, measured: :class:`ReductionReport` (DESIGN.md "honesty rules for numbers").

Every report says whether the reduction was **physical** (tensors actually smaller: memory and time saved)
or **simulated** (tokens masked out of attention: same math for the kept tokens, no saving), which
position policy was used, how many real tokens each layer (and KV head) kept, and — for KV caches — the
bytes the cache holds against the bytes it would hold unpruned, both measured from the tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["ReductionReport", "cache_bytes"]


def cache_bytes(cache: Any) -> int:
    """Bytes held by a transformers cache's key and value tensors (measured: ``numel · element_size``)."""
    from tokensmith.models import kvcache

    total = 0
    for i in range(kvcache.num_cache_layers(cache)):
        if kvcache.layer_kind(cache, i) in ("full", "sliding"):
            k, v = kvcache.layer_kv(cache, i)
            total += k.numel() * k.element_size() + v.numel() * v.element_size()
    return total


@dataclass
class ReductionReport:
    """Filled inside ``with reducer.apply(adapter) as report:`` and final when the block exits.

    Attributes:
        target: ``"kv"``, ``"hidden"``, ``"prompt"`` or ``"encoder"``.
        action: ``"drop"``, ``"mask"`` or ``"merge"``.
        physical: True when tensors were actually reduced (drop / merge); False for ``action="mask"``.
        positions: the position policy (``"preserve"``, ``"reindex"``, ``"rerotate"``).
        tokens_in: ``[B]`` real tokens of the input (prompt) per row.
        kept: ``{layer: [B, H_kv | 1]}`` real tokens each layer holds after the last reduction (KV: per KV
            head; hidden: tokens entering the layer).
        events: one dict per reduction (layer, phase, step, tokens before, tokens after).
        kv_bytes_before: bytes the KV cache would hold without pruning at the end of the block (every
            column seen, same dtype; windowed layers capped at their window), ``None`` when no cache was used.
        kv_bytes_after: bytes the cache's tensors hold at the end of the block (measured). For
            ``action="mask"`` this equals ``kv_bytes_before``: nothing is freed.
        flops_ratio: analytic forward FLOPs of the pruned run / unpruned (hidden-state pruning), else None.
        notes: fallbacks taken (e.g. "budget >= length: nothing pruned") and limits that applied.
    """

    target: str
    action: str
    positions: str
    scorer: str = ""
    physical: bool = True
    tokens_in: torch.Tensor | None = None
    kept: dict[int, torch.Tensor] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)
    kv_bytes_before: int | None = None
    kv_bytes_after: int | None = None
    flops_ratio: float | None = None
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def kv_bytes_freed(self) -> int | None:
        if self.kv_bytes_before is None or self.kv_bytes_after is None:
            return None
        return self.kv_bytes_before - self.kv_bytes_after

    @property
    def kv_compression(self) -> float | None:
        """Fraction of KV bytes freed (0 for simulated pruning)."""
        if not self.kv_bytes_before or self.kv_bytes_after is None:
            return None
        return 1.0 - self.kv_bytes_after / self.kv_bytes_before

    def kept_fraction(self) -> float | None:
        """Mean over layers, rows and heads of kept tokens / tokens seen (prompt + generated; the *token*
        compression, physical or simulated)."""
        seen = self.extra.get("tokens_seen", self.tokens_in)
        if not self.kept or seen is None:
            return None
        n = torch.as_tensor(seen).float().clamp_min(1)
        fr = [(k.float() / n[:, None]).mean().item() for k in self.kept.values()]
        return float(sum(fr) / len(fr))

    def note(self, msg: str) -> None:
        if msg not in self.notes:
            self.notes.append(msg)

    def summary(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "target": self.target,
            "action": self.action,
            "physical": self.physical,
            "simulated": not self.physical,
            "positions": self.positions,
            "scorer": self.scorer,
            "tokens_in": None if self.tokens_in is None else self.tokens_in.tolist(),
            "kept_fraction": self.kept_fraction(),
            "kept_per_layer": {int(k): v.float().mean().item() for k, v in self.kept.items()},
            "kv_bytes_before": self.kv_bytes_before,
            "kv_bytes_after": self.kv_bytes_after,
            "kv_bytes_freed": self.kv_bytes_freed,
            "kv_compression": self.kv_compression,
            "flops_ratio": self.flops_ratio,
            "events": len(self.events),
            "notes": list(self.notes),
        }

    def __repr__(self) -> str:
        s = self.summary()
        kind = "physical" if self.physical else "SIMULATED (masked, nothing freed)"
        kb = ""
        if self.kv_bytes_before is not None and self.kv_bytes_after is not None:
            kb = f", KV {self.kv_bytes_after / 2**20:.2f}/{self.kv_bytes_before / 2**20:.2f} MiB"
        kf = s["kept_fraction"]
        kfs = "n/a" if kf is None else f"{kf:.2f}"
        return f"ReductionReport({self.target}, {kind}, positions={self.positions}, kept={kfs}{kb})"
