"""Which tokens a search may place in the slot (METHODS.md MOD-3, OPT-A1)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # pragma: no cover
    from tokensmith.models.adapter import ModelAdapter

__all__ = ["Constraints"]


@dataclass
class Constraints:
    """Token constraints of a search.

    The allowed set is ``adapter.allowed_token_mask()`` over *all* embedding rows — padding rows past
    ``len(tokenizer)``, special and added tokens (chat markers) are never proposed — intersected with the
    options below. Candidates whose string does not re-tokenize to the same ids in context are dropped
    after proposal (``retokenize``), and the fraction dropped is reported per step.

    Args:
        ascii_only: only tokens whose text is printable, non-blank ASCII.
        blocklist: token ids or strings (every id whose decoded text equals the string) never to propose,
            e.g. under-trained tokens.
        allow_special: allow special / added tokens (almost never what you want).
        mask: an extra ``[V]`` boolean mask to intersect with.
        retokenize: drop candidates that do not round-trip in context (default True).

    Examples:
        >>> import tokensmith as ts
        >>> ad = ts.tiny("llama")
        >>> m = Constraints(ascii_only=True).allowed(ad)
        >>> bool(m[ad.tokenizer.eos_token_id]), m.shape[0] == ad.E.shape[0]
        (False, True)
    """

    ascii_only: bool = False
    blocklist: Sequence[int | str] = field(default_factory=tuple)
    allow_special: bool = False
    mask: torch.Tensor | None = None
    retokenize: bool = True

    def allowed(self, adapter: ModelAdapter) -> torch.Tensor:
        """``[V]`` boolean mask over the input embedding rows."""
        ids: list[int] = []
        strings = {b for b in self.blocklist if isinstance(b, str)}
        ids += [int(b) for b in self.blocklist if not isinstance(b, str)]
        m = adapter.allowed_token_mask(ascii_only=self.ascii_only, blocklist=ids, allow_special=self.allow_special)
        if strings:
            tok = adapter.tokenizer
            for i in torch.nonzero(m).flatten().tolist():
                if tok.decode([i]) in strings:
                    m[i] = False
        if self.mask is not None:
            extra = torch.as_tensor(self.mask, dtype=torch.bool).cpu()
            if extra.shape != m.shape:
                raise ValueError(f"Constraints.mask must be [{m.shape[0]}] (one flag per embedding row), got {tuple(extra.shape)}")
            m &= extra
        return m

    def to_dict(self) -> dict:
        return {
            "ascii_only": self.ascii_only,
            "blocklist": list(self.blocklist),
            "allow_special": self.allow_special,
            "mask": None if self.mask is None else "custom",
            "retokenize": self.retokenize,
        }
