"""Span-aware encoding (METHODS.md MOD-17).

A prompt, named slots (e.g. an optimizable suffix) and a target are rendered into ONE string — through
the chat template when asked — and tokenized ONCE. Spans are recovered from character offsets, so a
target is never tokenized on its own and concatenated (that changes merges at the boundary and can
insert a BOS in the middle). Every token gets a segment: ``template`` (chat scaffolding and special
tokens), ``system``, ``prompt``, a slot's name, or ``target``.

Batching pads on the LEFT and keeps per-example coordinates recoverable (:meth:`EncodedBatch.unpad`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["Slot", "Span", "Encoded", "EncodedBatch", "encode", "pad_batch"]

TEMPLATE = "template"


@dataclass(frozen=True)
class Slot:
    """A named piece of text inside a prompt whose token span you want back (e.g. an adversarial suffix).

    Examples:
        >>> Slot("suffix", "! ! ! !").name
        'suffix'
    """

    name: str
    text: str


@dataclass(frozen=True)
class Span:
    """Token range ``[start, end)`` and character range ``[char_start, char_end)`` of a named piece."""

    name: str
    start: int
    end: int
    char_start: int
    char_end: int

    @property
    def slice(self) -> slice:
        return slice(self.start, self.end)

    def __len__(self) -> int:
        return self.end - self.start


@dataclass
class Encoded:
    """One encoded example. All token-level fields are aligned with ``input_ids``.

    Attributes:
        input_ids: ``[T]`` token ids.
        text: the full rendered string that was tokenized.
        offsets: per-token ``(char_start, char_end)`` into ``text`` (``(0, 0)`` for added special tokens).
        spans: named token spans (``prompt`` pieces are merged into one span from first to last piece).
        segment_ids: ``[T]`` index into ``segment_names``; 0 is ``template``.
        special_mask: ``[T]`` True for special/added control tokens.
        boundary_tokens: indices of tokens whose characters straddle two segments (joint tokenization
            merged across a boundary). Such a token is assigned to the later segment.
    """

    input_ids: torch.Tensor
    text: str
    offsets: list[tuple[int, int]]
    spans: dict[str, Span]
    segment_ids: torch.Tensor
    segment_names: list[str]
    special_mask: torch.Tensor
    tokens: list[str]
    boundary_tokens: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def mask(self, *names: str) -> torch.Tensor:
        """``[T]`` boolean mask of the tokens in the named segments."""
        out = torch.zeros(len(self), dtype=torch.bool)
        for n in names:
            if n not in self.segment_names:
                raise KeyError(f"no segment named {n!r}; this example has {self.segment_names}")
            out |= self.segment_ids == self.segment_names.index(n)
        return out

    @property
    def target_mask(self) -> torch.Tensor:
        """Tokens of the target (empty mask when there is no target)."""
        if "target" not in self.segment_names:
            return torch.zeros(len(self), dtype=torch.bool)
        return self.mask("target")

    @property
    def template_mask(self) -> torch.Tensor:
        return self.segment_ids == 0

    def segments(self) -> list[str]:
        """Per-token segment names."""
        return [self.segment_names[i] for i in self.segment_ids.tolist()]


@dataclass
class EncodedBatch:
    """Left-padded batch of :class:`Encoded` examples.

    ``position_ids`` count real tokens only (the first real token is position 0), so a left-padded row
    gives the same per-token results as the unpadded example.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    pad_offsets: torch.Tensor
    examples: list[Encoded]

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def shape(self) -> torch.Size:
        return self.input_ids.shape

    def mask(self, *names: str) -> torch.Tensor:
        """``[B, T]`` mask of named segments in padded coordinates (missing segment -> all False)."""
        out = torch.zeros_like(self.input_ids, dtype=torch.bool)
        for b, ex in enumerate(self.examples):
            present = [n for n in names if n in ex.segment_names]
            if present:
                out[b, int(self.pad_offsets[b]) :] = ex.mask(*present)
        return out

    @property
    def target_mask(self) -> torch.Tensor:
        return self.mask("target")

    def unpad(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Split a ``[B, T, ...]`` tensor into per-example ``[T_b, ...]`` tensors (padding removed)."""
        if x.shape[:2] != self.input_ids.shape:
            raise ValueError(f"expected a tensor of leading shape {tuple(self.input_ids.shape)}, got {tuple(x.shape)}")
        return [x[b, int(self.pad_offsets[b]) :] for b in range(len(self))]

    def to(self, device: torch.device | str) -> EncodedBatch:
        return EncodedBatch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.position_ids.to(device),
            self.pad_offsets,
            self.examples,
        )


def _sentinel(k: int) -> str:
    return f"\ue000ts{k}\ue001"


def _pieces(prompt: Any, default_name: str = "prompt") -> list[tuple[str, str]]:
    if prompt is None:
        return []
    if isinstance(prompt, Slot):
        return [(prompt.name, prompt.text)]
    if isinstance(prompt, str):
        return [(default_name, prompt)]
    if isinstance(prompt, Sequence):
        out: list[tuple[str, str]] = []
        for p in prompt:
            out.extend(_pieces(p, default_name))
        return out
    raise TypeError(f"prompt pieces must be str, Slot or a list of them, got {type(prompt).__name__}")


def encode(
    tokenizer: Any,
    prompt: Any = None,
    target: str | None = None,
    *,
    chat: bool = False,
    system: str | None = None,
    messages: list[dict[str, Any]] | None = None,
    close_target: bool = True,
    add_special_tokens: bool | None = None,
    chat_template_kwargs: dict[str, Any] | None = None,
) -> Encoded:
    """Render and tokenize ``prompt`` + ``target`` jointly and recover named spans.

    Args:
        tokenizer: a *fast* HF tokenizer (offsets are required).
        prompt: a string, a :class:`Slot`, or a list mixing both (``["Write ", Slot("suffix", "x x"), "."]``).
        target: the continuation (plain mode) or the assistant answer (chat mode).
        chat: render through ``tokenizer.apply_chat_template`` as a user turn (+ assistant target).
        system: optional system message (chat mode only).
        messages: full chat history instead of ``prompt``; each ``content`` may be a str or list of
            str/:class:`Slot`. ``target`` (if given) is appended as the assistant turn.
        close_target: in chat mode, end the target with the template's end-of-turn tokens (the default,
            right for preference data). ``False`` stops the text right after the target.
        add_special_tokens: passed to the tokenizer; defaults to True in plain mode, False in chat mode
            (the template already contains BOS etc.).
        chat_template_kwargs: extra keyword arguments for ``apply_chat_template``.

    Returns:
        :class:`Encoded`.

    Raises:
        ValueError: empty input, a slow tokenizer, a chat template that rewrites message text, or a
            target that yields no token.

    Examples:
        >>> import tokensmith as ts
        >>> from tokensmith.models import Slot
        >>> ad = ts.tiny("llama")
        >>> enc = ad.encode(["Tell me", Slot("suffix", " ! !")], target=" Sure", chat=True)
        >>> ad.tokenizer.decode(enc.input_ids[enc.spans["suffix"].slice])
        ' ! !'
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            "span-aware encoding needs a fast tokenizer (character offsets); load it with use_fast=True"
        )
    user_pieces = _pieces(prompt)
    if messages is None and target is None and not any(t for _, t in user_pieces):
        raise ValueError("nothing to encode: give a non-empty prompt, messages or target")
    if target is not None and not isinstance(target, str):
        raise TypeError(f"target must be a str, got {type(target).__name__}")
    if target is not None and target == "":
        raise ValueError("target is empty: give the text whose tokens should be scored")
    names = [n for n, _ in user_pieces]
    for reserved in (TEMPLATE,):
        if reserved in names:
            raise ValueError(f"{reserved!r} is a reserved segment name")

    pieces: list[tuple[str, str]] = []
    if chat:
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError(
                "chat=True but this tokenizer has no chat template; set tokenizer.chat_template or use chat=False"
            )
        msgs: list[dict[str, Any]] = []

        def add(name: str, text: str) -> str:
            pieces.append((name, text))
            return _sentinel(len(pieces) - 1)

        if system is not None:
            msgs.append({"role": "system", "content": add("system", system)})
        if messages is not None:
            for m in messages:
                content = "".join(add(n, t) for n, t in _pieces(m.get("content"), m.get("role", "prompt")))
                msgs.append({**m, "content": content})
        if user_pieces:
            msgs.append({"role": "user", "content": "".join(add(n, t) for n, t in user_pieces)})
        if target is not None:
            msgs.append({"role": "assistant", "content": add("target", target)})
        kw = dict(chat_template_kwargs or {})
        if target is not None:
            kw.setdefault("continue_final_message", not close_target)
        else:
            kw.setdefault("add_generation_prompt", True)
        rendered_sentinels = tokenizer.apply_chat_template(msgs, tokenize=False, **kw)
        text, char_spans = _substitute(rendered_sentinels, pieces)
        plain_msgs = [{**m, "content": _fill(m["content"], pieces)} for m in msgs]
        rendered = tokenizer.apply_chat_template(plain_msgs, tokenize=False, **kw)
        if rendered != text:
            raise ValueError(
                "the chat template rewrites message text (e.g. trims whitespace), so spans cannot be located "
                "exactly; strip leading/trailing whitespace from the prompt pieces and target"
            )
        add_special = False if add_special_tokens is None else add_special_tokens
    else:
        if system is not None or messages is not None:
            raise ValueError("system= and messages= need chat=True")
        pieces = list(user_pieces) + ([("target", target)] if target is not None else [])
        text = "".join(t for _, t in pieces)
        char_spans, pos = [], 0
        for _, t in pieces:
            char_spans.append((pos, pos + len(t)))
            pos += len(t)
        add_special = True if add_special_tokens is None else add_special_tokens

    if not text.strip() and not add_special:
        raise ValueError("the text to encode is empty")
    batch = tokenizer(text, add_special_tokens=add_special, return_offsets_mapping=True)
    ids: list[int] = list(batch["input_ids"])
    offsets = [tuple(o) for o in batch["offset_mapping"]]
    if not ids:
        raise ValueError("the text produced no tokens")

    segment_names = [TEMPLATE]
    for n, _ in pieces:
        if n not in segment_names:
            segment_names.append(n)
    seg = [0] * len(ids)
    boundary: list[int] = []
    special_ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    special_ids |= {i for i, t in added.items() if getattr(t, "special", False)}
    special = [i in special_ids for i in ids]
    for ti, (s, e) in enumerate(offsets):
        if e <= s or special[ti]:
            continue
        hits = [pi for pi, (cs, ce) in enumerate(char_spans) if s < ce and e > cs]
        if not hits:
            continue
        pi = hits[-1]
        cs, ce = char_spans[pi]
        if len(hits) > 1 or s < cs or e > ce:
            boundary.append(ti)
        seg[ti] = segment_names.index(pieces[pi][0])

    spans: dict[str, Span] = {}
    for name in segment_names[1:]:
        idx = [i for i, s in enumerate(seg) if segment_names[s] == name]
        cidx = [char_spans[pi] for pi, (n, _) in enumerate(pieces) if n == name]
        if not idx:
            if name == "target":
                raise ValueError(
                    "the target produced no token of its own (it merged entirely into the prompt); "
                    "change the boundary, e.g. start the target with a space"
                )
            spans[name] = Span(name, 0, 0, cidx[0][0], cidx[-1][1])
            continue
        spans[name] = Span(name, idx[0], idx[-1] + 1, cidx[0][0], cidx[-1][1])

    return Encoded(
        input_ids=torch.tensor(ids, dtype=torch.long),
        text=text,
        offsets=[(int(a), int(b)) for a, b in offsets],
        spans=spans,
        segment_ids=torch.tensor(seg, dtype=torch.long),
        segment_names=segment_names,
        special_mask=torch.tensor(special, dtype=torch.bool),
        tokens=tokenizer.convert_ids_to_tokens(ids),
        boundary_tokens=boundary,
    )


def _fill(s: str, pieces: list[tuple[str, str]]) -> str:
    for k, (_, t) in enumerate(pieces):
        s = s.replace(_sentinel(k), t)
    return s


def _substitute(rendered: str, pieces: list[tuple[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    found = []
    for k in range(len(pieces)):
        i = rendered.find(_sentinel(k))
        if i < 0:
            raise ValueError(
                f"the chat template dropped the {pieces[k][0]!r} message (e.g. it does not support a system "
                "role); remove it or use another template"
            )
        found.append((i, k))
    found.sort()
    out, spans, pos = [], [(0, 0)] * len(pieces), 0
    length = 0
    for i, k in found:
        literal = rendered[pos:i]
        out.append(literal)
        length += len(literal)
        text = pieces[k][1]
        spans[k] = (length, length + len(text))
        out.append(text)
        length += len(text)
        pos = i + len(_sentinel(k))
    out.append(rendered[pos:])
    return "".join(out), spans


def pad_batch(examples: Sequence[Encoded], pad_id: int) -> EncodedBatch:
    """Left-pad encoded examples into an :class:`EncodedBatch`.

    Examples:
        >>> import tokensmith as ts
        >>> ad = ts.tiny("llama")
        >>> b = ad.encode_batch(["a", "a longer prompt"])
        >>> b.attention_mask[0].tolist()[:2]
        [0, 0]
    """
    if not examples:
        raise ValueError("cannot build a batch from zero examples")
    T = max(len(e) for e in examples)
    B = len(examples)
    ids = torch.full((B, T), int(pad_id), dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    offs = torch.zeros(B, dtype=torch.long)
    for b, e in enumerate(examples):
        n = len(e)
        ids[b, T - n :] = e.input_ids
        mask[b, T - n :] = 1
        offs[b] = T - n
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    return EncodedBatch(ids, mask, pos, offs, list(examples))
