"""The optimizable slot of an encoded example (METHODS.md OPT-A1, MOD-17).

A :class:`SlotTemplate` holds one :class:`~tokensmith.models.Encoded` example (built by ``adapter.encode`` with
a :class:`~tokensmith.models.Slot` anywhere: suffix, prefix, infix, inside a chat template or a document) and
answers what a token-space search needs: the slot's token span, the ids with the slot replaced, the in-context
re-tokenization check, and the example rendered again from a string through the full template.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from tokensmith.models import Encoded, Slot, decode_slot, slot_round_trip

if TYPE_CHECKING:  # pragma: no cover
    from tokensmith.models.adapter import ModelAdapter

__all__ = ["SlotTemplate", "find_slot"]

def find_slot(enc: Encoded, slot: str | None = None) -> str:
    """The name of the optimizable slot of ``enc``: ``slot`` when given, else its only :class:`Slot`.

    Raises:
        ValueError: no slot, several slots and none named, a named slot that is not there, or a slot that
            produced no token.
    """
    names = enc.slot_names
    if slot is None:
        if not names:
            raise ValueError(
                "this problem has no optimizable slot: encode the prompt with a Slot, e.g. "
                "adapter.encode(['Write a poem', Slot('suffix', ' ! ! ! !')], target='Sure', chat=True)"
            )
        if len(names) > 1:
            raise ValueError(f"the example has several slots {names}; pass slot= to say which one to optimise")
        slot = names[0]
    if slot not in enc.spans:
        raise ValueError(f"no slot named {slot!r}; this example has slots {names}")
    if len(enc.spans[slot]) == 0:
        raise ValueError(f"slot {slot!r} produced no token; give it an initial text such as ' ! ! ! !'")
    return slot


class SlotTemplate:
    """One encoded example with one optimizable slot.

    Args:
        adapter: the model whose tokenizer encoded ``enc``.
        enc: from ``adapter.encode`` (it keeps its recipe, so strings can be rendered again).
        slot: the slot's name (default: the example's only slot).

    Attributes:
        ids: ``[T]`` the example's ids, cut after the last target token (later tokens cannot change a causal
            loss on the target).
        start: index of the slot's first token; ``n`` its token count.
        target_positions: ``[H]`` indices of the scored tokens.

    Examples:
        >>> import tokensmith as ts
        >>> from tokensmith.models import Slot
        >>> ad = ts.tiny("llama")
        >>> t = SlotTemplate(ad, ad.encode(["Hi", Slot("suffix", " ! !")], target=" ok"))
        >>> t.fill(t.slot_ids[None]).shape == t.ids[None].shape
        True
    """

    def __init__(self, adapter: ModelAdapter, enc: Encoded, slot: str | None = None):
        if not isinstance(enc, Encoded):
            raise TypeError(f"expected an Encoded example from adapter.encode, got {type(enc).__name__}")
        self.adapter = adapter
        self.enc = enc
        self.slot = find_slot(enc, slot)
        sp = enc.spans[self.slot]
        self.start, self.end = sp.start, sp.end
        self.n = sp.end - sp.start
        tm = enc.target_mask
        if bool(tm.any()):
            last = int(torch.nonzero(tm).max())
            if last < self.end:
                raise ValueError(
                    f"the slot {self.slot!r} comes after the last scored token: a causal model's loss on the target "
                    "cannot depend on it; put the slot before the target"
                )
            self.ids = enc.input_ids[: last + 1].clone()
        else:
            self.ids = enc.input_ids.clone()
        self.target_mask = tm[: len(self.ids)]
        self.target_positions = torch.nonzero(self.target_mask).flatten()
        self.slot_ids = self.ids[self.start : self.end].clone()

    def __repr__(self) -> str:
        return f"SlotTemplate(slot={self.slot!r}, start={self.start}, n={self.n}, T={len(self.ids)})"

    @property
    def tokenizer(self) -> Any:
        return self.adapter.tokenizer

    def fill(self, slot_ids: torch.Tensor) -> torch.Tensor:
        """``[N, T]`` ids with the slot replaced by each row of ``slot_ids`` (``[N, n]``)."""
        slot_ids = torch.as_tensor(slot_ids, dtype=torch.long)
        if slot_ids.dim() == 1:
            slot_ids = slot_ids[None]
        if slot_ids.shape[1] != self.n:
            raise ValueError(f"slot ids must have {self.n} tokens (the slot's length), got {slot_ids.shape[1]}")
        out = self.ids[None].repeat(slot_ids.shape[0], 1)
        out[:, self.start : self.end] = slot_ids.to(out.device)
        return out

    def decode(self, slot_ids: torch.Tensor) -> str:
        """The slot's text for one row of ids, as it goes back into the template
        (:func:`tokensmith.models.decode_slot`: edge whitespace kept for WordPiece tokenizers)."""
        return decode_slot(self.tokenizer, self.enc, self.slot, torch.as_tensor(slot_ids).reshape(1, -1))[0]

    def round_trips(self, slot_ids: torch.Tensor) -> torch.Tensor:
        """``[N]`` bool: the decoded string re-tokenizes to the same ids *in context*
        (:func:`tokensmith.models.slot_round_trip`)."""
        return slot_round_trip(self.tokenizer, self.enc, self.slot, torch.as_tensor(slot_ids).reshape(-1, self.n))

    def render(self, text: str, **overrides: Any) -> Encoded:
        """The example rendered again with ``text`` in the slot, through the full template (boundary merges
        allowed: the point is what the string really tokenizes to)."""
        overrides.setdefault("boundary", "allow")
        return self.adapter.reencode(self.enc, {self.slot: text}, **overrides)

    def with_slot_text(self, text: str) -> SlotTemplate:
        """A template whose slot starts from ``text`` (the same recipe otherwise)."""
        return SlotTemplate(self.adapter, self.adapter.reencode(self.enc, {self.slot: text}), self.slot)


def as_slot(slot: Any, default: str = "suffix") -> Slot:
    """A :class:`Slot` from a Slot or a string."""
    return slot if isinstance(slot, Slot) else Slot(default, str(slot))
