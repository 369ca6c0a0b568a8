"""Span-aware encoding (METHODS.md MOD-17).

A prompt, named slots (e.g. an optimizable suffix) and a target are rendered into ONE string — through
the chat template when asked — and tokenized ONCE. Spans are recovered from character offsets, so a
target is never tokenized on its own and concatenated (that changes merges at the boundary and can
insert a BOS in the middle). Every token gets a segment: ``template`` (chat scaffolding and special
tokens), ``system``, ``prompt``, a slot's name, ``target``, or ``eot`` (the closing of the assistant turn,
when asked). A piece whose edge falls inside a token is an error unless ``boundary=`` says otherwise, and
content text never produces special tokens unless ``allow_special=True`` (see :func:`encode`).

Batching pads on the LEFT and keeps per-example coordinates recoverable (:meth:`EncodedBatch.unpad`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = [
    "BOUNDARY_POLICIES",
    "Slot",
    "Span",
    "Encoded",
    "EncodedBatch",
    "encode",
    "reencode",
    "slot_round_trip",
    "decode_slot",
    "pad_batch",
]

TEMPLATE = "template"
EOT = "eot"
BOUNDARY_POLICIES = ("error", "split", "allow")
# names the encoder gives pieces itself; a Slot may not use them
RESERVED_NAMES = frozenset({TEMPLATE, "prompt", "system", "target", EOT})


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
            merged across a piece edge). Only ``boundary="allow"`` lets such tokens through (``"error"``
            raises, ``"split"`` cannot produce them); each is assigned to the later piece.
        scored_segments: the segments :attr:`target_mask` covers: ``("target",)``, or
            ``("target", "eot")`` with ``encode(..., score_eot=True)``.
        recipe: the arguments :func:`encode` was called with (prompt pieces, target, chat, ...), so the
            example can be rendered again with other slot texts (:func:`reencode`); None when built by hand.
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
    scored_segments: tuple[str, ...] = ("target",)
    recipe: dict[str, Any] | None = field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def slot_names(self) -> list[str]:
        """Names of the :class:`Slot` pieces in this example (in the order given)."""
        if self.recipe is None:
            return []
        out: list[str] = []
        for group in [self.recipe.get("prompt")] + [m.get("content") for m in self.recipe.get("messages") or []]:
            out += [p.name for p in _pieces(group) if p.slot]
        return out

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
        """Tokens scored as the target: the ``target`` segment, plus the closing end-of-turn tokens
        (segment ``eot``) when encoded with ``score_eot=True``. Empty mask when there is no target."""
        present = [n for n in self.scored_segments if n in self.segment_names]
        if not present:
            return torch.zeros(len(self), dtype=torch.bool)
        return self.mask(*present)

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
        """``[B, T]`` per-row :attr:`Encoded.target_mask` in padded coordinates (False on padding)."""
        out = torch.zeros_like(self.input_ids, dtype=torch.bool)
        for b, ex in enumerate(self.examples):
            out[b, int(self.pad_offsets[b]) :] = ex.target_mask
        return out

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


@dataclass(frozen=True)
class _Piece:
    """One piece of the rendered text: its segment name, text, whether it is user content (tokenized
    with special-token parsing off unless ``allow_special``) and whether it came from a :class:`Slot`."""

    name: str
    text: str
    content: bool = True
    slot: bool = False


def _pieces(prompt: Any, default_name: str = "prompt") -> list[_Piece]:
    if prompt is None:
        return []
    if isinstance(prompt, Slot):
        if not isinstance(prompt.name, str) or not prompt.name:
            raise ValueError(f"a Slot needs a non-empty str name, got {prompt.name!r}")
        if not isinstance(prompt.text, str):
            raise TypeError(f"Slot {prompt.name!r} text must be a str, got {type(prompt.text).__name__}")
        return [_Piece(prompt.name, prompt.text, slot=True)]
    if isinstance(prompt, str):
        return [_Piece(default_name, prompt)]
    if isinstance(prompt, Sequence):
        out: list[_Piece] = []
        for p in prompt:
            out.extend(_pieces(p, default_name))
        return out
    raise TypeError(f"prompt pieces must be str, Slot or a list of them, got {type(prompt).__name__}")


def _check_names(groups: list[list[_Piece]]) -> None:
    """Slot names must be unique and must not be a name the encoder gives pieces itself."""
    implicit = {p.name for g in groups for p in g if not p.slot}
    seen: set[str] = set()
    for g in groups:
        for p in g:
            if not p.slot:
                continue
            if p.name in RESERVED_NAMES or p.name in implicit:
                raise ValueError(
                    f"Slot name {p.name!r} is reserved: the encoder itself names segments "
                    f"{sorted(RESERVED_NAMES | implicit)} (plain strings are 'prompt' or their message role, "
                    "the answer is 'target'); rename the slot"
                )
            if p.name in seen:
                raise ValueError(
                    f"two slots are named {p.name!r}; each slot needs its own name (one name gives one span, "
                    "which would cover everything between them) — e.g. "
                    f"{p.name + '_1'!r} and {p.name + '_2'!r}"
                )
            seen.add(p.name)


def _special_ids(tokenizer: Any) -> set[int]:
    """Special / control token ids: the tokenizer's special tokens and every added token marked special."""
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return ids | {i for i, t in added.items() if getattr(t, "special", False)}


def _tokenize(tokenizer: Any, text: str, add_special: bool, split_special: bool) -> tuple[list[int], list[tuple[int, int]]]:
    kw: dict[str, Any] = {"add_special_tokens": add_special, "return_offsets_mapping": True}
    if split_special:
        kw["split_special_tokens"] = True
    b = tokenizer(text, **kw)
    return list(b["input_ids"]), [(int(s), int(e)) for s, e in b["offset_mapping"]]


def _special_wrap(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The ids ``add_special_tokens=True`` puts before and after a text (e.g. BOS; BERT's [CLS] … [SEP])."""
    inner = tokenizer("a", add_special_tokens=False)["input_ids"]
    outer = tokenizer("a", add_special_tokens=True)["input_ids"]
    n = len(inner)
    for i in range(len(outer) - n + 1):
        if outer[i : i + n] == inner:
            return list(outer[:i]), list(outer[i + n :])
    raise ValueError("cannot tell which special tokens this tokenizer adds; pass add_special_tokens=False")


def _whitespace_goes_to_next_token(tokenizer: Any) -> bool:
    """True when offsets are *trimmed* (whitespace that belongs to the next token, like GPT-2's ``Ġ``, is
    left out of its offsets). Probed on ``"a b"``: the token ending at the ``b`` starts at the space
    (untrimmed: False), or starts at ``b`` and differs from ``"b"`` tokenized alone (trimmed: True), or
    equals it (whitespace dropped, as in WordPiece: False)."""
    ids, offs = _tokenize(tokenizer, "a b", False, False)
    for i, (s, e) in enumerate(offs):
        if e == 3:
            return s == 2 and tokenizer("b", add_special_tokens=False)["input_ids"] != [ids[i]]
    return False


def encode(
    tokenizer: Any,
    prompt: Any = None,
    target: str | None = None,
    *,
    chat: bool = False,
    system: str | None = None,
    messages: list[dict[str, Any]] | None = None,
    close_target: bool = True,
    score_eot: bool = False,
    boundary: str = "error",
    allow_special: bool = False,
    add_special_tokens: bool | None = None,
    chat_template_kwargs: dict[str, Any] | None = None,
) -> Encoded:
    """Render and tokenize ``prompt`` + ``target`` jointly and recover named spans.

    **Clean spans.** A piece (a prompt string, a :class:`Slot`, the system text, the target) is *clean*
    when its character range is exactly covered by whole tokens: no token straddles one of its edges.
    Joint tokenization can merge across an edge — ``["Say ", Slot("adv", "hel"), "lo world"]`` gives
    one token ``" hello"``; ``Slot("adv", " now ")`` before ``"word"`` loses its trailing space to the
    token ``" word"`` — and then no token span holds exactly the piece. ``boundary`` decides:

    - ``"error"`` (default): raise a ``ValueError`` naming the merged token and the two pieces it
      straddles. Edges between pieces of the same implicit name (two plain strings) do not count.
    - ``"split"``: force a token boundary at every piece edge: each piece and each stretch of template
      text is tokenized on its own (``add_special_tokens=False``) and the ids are concatenated, with
      the tokenizer's own BOS/EOS (what ``add_special_tokens=True`` adds) around them. The ids are then
      ``wrap_pre + ids(chunk_1) + … + ids(chunk_n) + wrap_post``, chunks in text order — what GCG
      implementations optimise. They may differ from ``tokenizer(text)``; ``text`` is unchanged.
      Raises when the tokenizer cannot tokenize a piece on its own without changing it (e.g. it
      prepends a space to every call).
    - ``"allow"``: keep the joint tokenization; a straddling token goes to the *later* piece and is
      listed in :attr:`Encoded.boundary_tokens` (the span of the earlier piece then lacks its end).

    **Special tokens in content.** By default content (prompt, slots, target, system and message text)
    never produces a special/control token: ``"<|im_end|>"`` typed by a user is tokenized as text
    (``split_special_tokens``), while the template's own markers are still parsed. For content without
    special-token strings the ids equal ``tokenizer(text)``. ``allow_special=True`` parses them in
    content too (the tokenizer's default behaviour).

    Args:
        tokenizer: a *fast* HF tokenizer (offsets are required).
        prompt: a string, a :class:`Slot`, or a list mixing both (``["Write ", Slot("suffix", "x x"), "."]``).
            Plain strings form the ``prompt`` segment.
        target: the continuation (plain mode) or the assistant answer (chat mode).
        chat: render through ``tokenizer.apply_chat_template`` as a user turn (+ assistant target).
        system: optional system message (chat mode only).
        messages: full chat history instead of ``prompt``; each ``content`` may be a str or list of
            str/:class:`Slot`; plain strings are named after the message ``role``. ``target`` (if given)
            is appended as the assistant turn.
        close_target: in chat mode, end the target with the template's end-of-turn tokens (the default,
            right for preference data). ``False`` stops the text right after the target.
        score_eot: chat mode with a closed target: the template text after the target — the closing of
            the assistant turn, e.g. ``<|im_end|>\\n`` for ChatML, ``<|eot_id|>`` for Llama 3 — becomes the
            segment ``"eot"`` and is part of :attr:`Encoded.target_mask`, so a loss on the target also
            teaches the model to stop (TRL's DPO/SFT completions end the same way). Default False:
            those tokens are ``template``. Turn it on for preference / token-weighted training; keep it
            off for attribution and adversarial suffix search.
        boundary: ``"error"``, ``"split"`` or ``"allow"`` (see above).
        allow_special: let content text produce special tokens (see above).
        add_special_tokens: passed to the tokenizer; defaults to True in plain mode, False in chat mode
            (the template already contains BOS etc.).
        chat_template_kwargs: extra keyword arguments for ``apply_chat_template``.

    Returns:
        :class:`Encoded`.

    Raises:
        ValueError: empty input, a slow tokenizer, a chat template that rewrites message text, a target
            that yields no token, a reserved or duplicate slot name, an unclean span under
            ``boundary="error"``, or ``score_eot`` without a closed chat target.

    Examples:
        >>> import tokensmith as ts
        >>> from tokensmith.models import Slot
        >>> ad = ts.tiny("llama")
        >>> enc = ad.encode(["Tell me", Slot("suffix", " ! !")], target=" Sure", chat=True)
        >>> ad.tokenizer.decode(enc.input_ids[enc.spans["suffix"].slice])
        ' ! !'
        >>> enc = ad.encode(["Say ", Slot("adv", "hel"), "lo world"], boundary="split")
        >>> ad.tokenizer.decode(enc.input_ids[enc.spans["adv"].slice])
        'hel'
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            "span-aware encoding needs a fast tokenizer (character offsets); load it with use_fast=True"
        )
    if boundary not in BOUNDARY_POLICIES:
        raise ValueError(f"boundary must be one of {BOUNDARY_POLICIES}, got {boundary!r}")
    user_pieces = _pieces(prompt)
    if messages is None and target is None and not any(p.text for p in user_pieces):
        raise ValueError("nothing to encode: give a non-empty prompt, messages or target")
    if target is not None and not isinstance(target, str):
        raise TypeError(f"target must be a str, got {type(target).__name__}")
    if target is not None and target == "":
        raise ValueError("target is empty: give the text whose tokens should be scored")
    if score_eot and not (chat and target is not None and close_target):
        raise ValueError(
            "score_eot=True scores the tokens that close the assistant turn: it needs chat=True, a target "
            "and close_target=True"
        )
    message_pieces = [
        _pieces(m.get("content"), m.get("role", "prompt")) for m in (messages or [])
    ]
    _check_names([user_pieces, *message_pieces])

    pieces: list[_Piece] = []
    if chat:
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError(
                "chat=True but this tokenizer has no chat template; set tokenizer.chat_template or use chat=False"
            )
        msgs: list[dict[str, Any]] = []

        def add(piece: _Piece) -> str:
            pieces.append(piece)
            return _sentinel(len(pieces) - 1)

        if system is not None:
            msgs.append({"role": "system", "content": add(_Piece("system", system))})
        for m, mp in zip(messages or [], message_pieces, strict=True):
            msgs.append({**m, "content": "".join(add(p) for p in mp)})
        if user_pieces:
            msgs.append({"role": "user", "content": "".join(add(p) for p in user_pieces)})
        if target is not None:
            msgs.append({"role": "assistant", "content": add(_Piece("target", target))})
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
        if score_eot:
            t_end = char_spans[pieces.index(next(p for p in pieces if p.name == "target"))][1]
            if not text[t_end:].strip():
                raise ValueError("score_eot=True but the chat template puts no end-of-turn text after the target")
            pieces.append(_Piece(EOT, text[t_end:], content=False))
            char_spans.append((t_end, len(text)))
        add_special = False if add_special_tokens is None else add_special_tokens
    else:
        if system is not None or messages is not None:
            raise ValueError("system= and messages= need chat=True")
        pieces = list(user_pieces) + ([_Piece("target", target)] if target is not None else [])
        text = "".join(p.text for p in pieces)
        char_spans, pos = [], 0
        for p in pieces:
            char_spans.append((pos, pos + len(p.text)))
            pos += len(p.text)
        add_special = True if add_special_tokens is None else add_special_tokens

    if not text.strip() and not add_special:
        raise ValueError("the text to encode is empty")
    special_ids = _special_ids(tokenizer)
    content_ranges = [cs_ce for p, cs_ce in zip(pieces, char_spans, strict=True) if p.content]
    if boundary == "split":
        ids, offsets = _tokenize_split(tokenizer, text, pieces, char_spans, add_special, allow_special)
    else:
        ids, offsets = _tokenize(tokenizer, text, add_special, False)
        if not allow_special:
            ids, offsets = _unparse_content_specials(tokenizer, text, ids, offsets, special_ids, content_ranges)
    if not ids:
        raise ValueError("the text produced no tokens")

    segment_names = [TEMPLATE]
    for p in pieces:
        if p.name not in segment_names:
            segment_names.append(p.name)
    # owner[c] = 1 + index of the piece holding character c (0: template text)
    owner = [0] * len(text)
    for pi, (cs, ce) in enumerate(char_spans):
        owner[cs:ce] = [pi + 1] * (ce - cs)
    special = [i in special_ids for i in ids]
    ranges = _token_char_ranges(tokenizer, text, offsets, special)
    seg = [0] * len(ids)
    boundary_tokens: list[int] = []
    for ti, (s, e) in enumerate(ranges):
        if e <= s:
            continue
        if special[ti]:  # template markers; only the closing of a scored turn gets a segment of its own
            o = owner[s]
            if o and not pieces[o - 1].content and all(x == o for x in owner[s:e]):
                seg[ti] = segment_names.index(pieces[o - 1].name)
            continue
        owners = sorted(set(owner[s:e]))
        pieces_hit = [o for o in owners if o]
        if not pieces_hit:
            continue
        seg[ti] = segment_names.index(pieces[pieces_hit[-1] - 1].name)
        names = {pieces[o - 1].name if o else TEMPLATE for o in owners}
        if len(names) > 1:
            if boundary == "error":
                raise ValueError(_merge_message(tokenizer, text, ids[ti], (s, e), owner, pieces))
            boundary_tokens.append(ti)

    spans: dict[str, Span] = {}
    for name in segment_names[1:]:
        idx = [i for i, s in enumerate(seg) if segment_names[s] == name]
        cidx = [char_spans[pi] for pi, p in enumerate(pieces) if p.name == name]
        if not idx:
            if name == "target":
                raise ValueError(
                    "the target produced no token of its own (it merged entirely into the prompt); "
                    "change the boundary, e.g. start the target with a space"
                )
            at = next((i for i, (s, _) in enumerate(ranges) if s >= cidx[0][0] and not special[i]), len(ids))
            spans[name] = Span(name, at, at, cidx[0][0], cidx[-1][1])
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
        boundary_tokens=boundary_tokens,
        scored_segments=("target", EOT) if score_eot else ("target",),
        recipe=dict(
            prompt=prompt, target=target, chat=chat, system=system, messages=messages, close_target=close_target,
            score_eot=score_eot, boundary=boundary, allow_special=allow_special,
            add_special_tokens=add_special, chat_template_kwargs=chat_template_kwargs,
        ),
    )


def _replace_slots(group: Any, texts: dict[str, str], used: set[str]) -> Any:
    if isinstance(group, Slot):
        if group.name in texts:
            used.add(group.name)
            return Slot(group.name, texts[group.name])
        return group
    if isinstance(group, (list, tuple)):
        return [_replace_slots(g, texts, used) for g in group]
    return group


def reencode(tokenizer: Any, enc: Encoded, texts: dict[str, str], **overrides: Any) -> Encoded:
    """Render ``enc`` again with new slot texts, through exactly the same recipe (template, system text,
    target, boundary policy, ...): what a string found by a search really tokenizes to in its context.

    Args:
        tokenizer: the tokenizer ``enc`` was encoded with.
        enc: an example from :func:`encode` (it keeps its recipe).
        texts: ``{slot name: new text}``.
        **overrides: :func:`encode` arguments to change (e.g. ``target=``, ``boundary="allow"``).

    Raises:
        ValueError: ``enc`` has no recipe (built by hand), or a name in ``texts`` is not one of its slots.

    Examples:
        >>> import tokensmith as ts
        >>> from tokensmith.models import Slot
        >>> ad = ts.tiny("llama")
        >>> enc = ad.encode(["Tell me", Slot("suffix", " x")], target=" Sure", chat=True)
        >>> new = reencode(ad.tokenizer, enc, {"suffix": " y z"})
        >>> ad.tokenizer.decode(new.input_ids[new.spans["suffix"].slice])
        ' y z'
    """
    if enc.recipe is None:
        raise ValueError("this Encoded has no recipe (it was not built by encode()); encode it with adapter.encode")
    r = dict(enc.recipe)
    used: set[str] = set()
    r["prompt"] = _replace_slots(r.get("prompt"), texts, used)
    if r.get("messages"):
        r["messages"] = [{**m, "content": _replace_slots(m.get("content"), texts, used)} for m in r["messages"]]
    missing = set(texts) - used
    if missing:
        raise ValueError(f"no slot named {sorted(missing)} in this example; its slots are {enc.slot_names}")
    r.update(overrides)
    return encode(tokenizer, **r)


def _drops_edge_whitespace(tokenizer: Any) -> bool:
    """True when tokens cannot carry a leading space (WordPiece: ``decode(encode(" a")) == "a"``)."""
    ids = tokenizer(" a", add_special_tokens=False)["input_ids"]
    return not tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False).startswith(" ")


def decode_slot(tokenizer: Any, enc: Encoded, slot: str, slot_ids: torch.Tensor) -> list[str]:
    """The text of each candidate token sequence ``[N, n]`` for a slot, as it goes back into the template.

    For tokenizers whose tokens carry their whitespace (byte-level BPE, SentencePiece) this is
    ``tokenizer.decode``. Tokenizers that drop whitespace (WordPiece) cannot represent the slot's edge
    spaces in tokens, so the original slot text's leading and trailing whitespace is kept
    (``" a b"`` → ``"x b"`` would otherwise glue the slot to the word before it).
    """
    ids = torch.as_tensor(slot_ids, dtype=torch.long).reshape(-1, torch.as_tensor(slot_ids).shape[-1])
    dec = dict(skip_special_tokens=False, clean_up_tokenization_spaces=False)
    strings = tokenizer.batch_decode(ids.tolist(), **dec)
    if slot in enc.spans and _drops_edge_whitespace(tokenizer):
        sp = enc.spans[slot]
        orig = enc.text[sp.char_start : sp.char_end]
        lead = orig[: len(orig) - len(orig.lstrip())]
        trail = orig[len(orig.rstrip()) :]
        strings = [(lead if not s[:1].isspace() else "") + s + (trail if not s[-1:].isspace() else "") for s in strings]
    return strings


def slot_round_trip(tokenizer: Any, enc: Encoded, slot: str, slot_ids: torch.Tensor) -> torch.Tensor:
    """Which candidate token sequences for a slot survive decode → re-tokenize *in context*: ``[N]`` bool.

    Row ``i`` of ``slot_ids`` (``[N, n]``) replaces the slot's tokens; it passes when the decoded string,
    put back into ``enc``'s full text, tokenizes to exactly the same ids (``enc``'s boundary policy: the
    whole text jointly for ``"error"``/``"allow"``, the slot on its own for ``"split"``). A sequence that
    drifts (``" wor" + "ld"`` → ``" world"``, a merge with the template text after the slot, a string that
    spells a control token) would be optimised under one tokenization and used under another.
    Batched through the fast tokenizer (one call for all rows).

    Examples:
        >>> import tokensmith as ts, torch
        >>> from tokensmith.models import Slot
        >>> ad = ts.tiny("llama")
        >>> enc = ad.encode(["Say", Slot("adv", " hi there")], target=" ok")
        >>> ids = enc.input_ids[enc.spans["adv"].slice]
        >>> slot_round_trip(ad.tokenizer, enc, "adv", ids[None]).tolist()
        [True]
    """
    if slot not in enc.spans:
        raise ValueError(f"no span named {slot!r}; this example has {sorted(enc.spans)}")
    sp = enc.spans[slot]
    ids = torch.as_tensor(slot_ids, dtype=torch.long)
    if ids.dim() != 2 or ids.shape[1] != len(sp):
        raise ValueError(f"slot_ids must be [N, {len(sp)}] (the slot's token count), got {tuple(ids.shape)}")
    strings = decode_slot(tokenizer, enc, slot, ids)
    r = enc.recipe or {}
    allow_special = bool(r.get("allow_special", False))
    kw: dict[str, Any] = {"add_special_tokens": False}
    if not allow_special:
        kw["split_special_tokens"] = True
    if r.get("boundary", "error") == "split":
        got = tokenizer(strings, **kw)["input_ids"]
        want = ids.tolist()
    else:
        # the context that can merge with the slot: from the last special token before it to the first after
        # it (special tokens are hard boundaries: encode() parses template markers on their own)
        special = enc.special_mask.tolist()
        a = max([i for i in range(sp.start) if special[i]], default=-1) + 1
        b = min([i for i in range(sp.end, len(enc)) if special[i]], default=len(enc))
        cs = enc.offsets[a - 1][1] if a > 0 else 0
        if b < len(enc):
            # a special token added by the tokenizer (BERT's final [SEP]) is not in the text: offsets (0, 0)
            ce = len(enc.text) if tuple(enc.offsets[b]) == (0, 0) else enc.offsets[b][0]
        else:
            ce = len(enc.text)
        if enc.offsets[b - 1][1] > ce or cs > sp.char_start:  # offsets we cannot trust: check the whole text
            full = dict(kw, add_special_tokens=bool(r.get("add_special_tokens", False)))
            texts = [enc.text[: sp.char_start] + s + enc.text[sp.char_end :] for s in strings]
            got = tokenizer(texts, **full)["input_ids"]
            base = enc.input_ids.tolist()
            want = [base[: sp.start] + row + base[sp.end :] for row in ids.tolist()]
        else:
            texts = [enc.text[cs : sp.char_start] + s + enc.text[sp.char_end : ce] for s in strings]
            got = tokenizer(texts, **kw)["input_ids"]
            head, tail = enc.input_ids[a : sp.start].tolist(), enc.input_ids[sp.end : b].tolist()
            want = [head + row + tail for row in ids.tolist()]
    return torch.tensor([g == w for g, w in zip(got, want, strict=True)], dtype=torch.bool)


def _token_char_ranges(
    tokenizer: Any, text: str, offsets: list[tuple[int, int]], special: list[bool]
) -> list[tuple[int, int]]:
    """Character range each token really consumes. Offsets are used as they are, except when the
    tokenizer trims them (see :func:`_whitespace_goes_to_next_token`): then whitespace left out of every
    token's offsets is given back to the token that follows it, so whitespace absorbed across a piece
    edge is seen as a merge."""
    if not _whitespace_goes_to_next_token(tokenizer):
        return list(offsets)
    out, prev_end = [], 0
    for (s, e), sp in zip(offsets, special, strict=True):
        if not sp and s >= prev_end and not text[prev_end:s].strip():
            s = prev_end
        out.append((s, max(s, e)))
        if e > s or not sp:
            prev_end = max(prev_end, e)
    return out


def _merge_message(
    tokenizer: Any, text: str, tid: int, rng: tuple[int, int], owner: list[int], pieces: list[_Piece]
) -> str:
    s, e = rng
    parts: list[str] = []
    c = s
    while c < e:
        o, d = owner[c], c
        while d < e and owner[d] == o:
            d += 1
        who = f"the {pieces[o - 1].name!r} piece" if o else "the template text"
        frag = text[c:d]
        ws = " (whitespace absorbed into a neighbouring token)" if not frag.strip() else ""
        parts.append(f"{frag!r} from {who}{ws}")
        c = d
    tok = tokenizer.convert_ids_to_tokens([tid])[0]
    return (
        f"token {tok!r} (text {text[s:e]!r}) straddles a piece edge: it joins " + " and ".join(parts)
        + ", so no token span holds exactly one piece. Fix: move the edge to a token boundary (e.g. end the "
        "earlier piece with a full word and start the next one with a space, and do not end a slot with "
        "whitespace), or pass boundary='split' to tokenize every piece on its own (as GCG does), or "
        "boundary='allow' to keep the joint tokenization (the token goes to the later piece)"
    )


def _unparse_content_specials(
    tokenizer: Any,
    text: str,
    ids: list[int],
    offsets: list[tuple[int, int]],
    special_ids: set[int],
    content_ranges: list[tuple[int, int]],
) -> tuple[list[int], list[tuple[int, int]]]:
    """Re-tokenize, with special-token parsing off, every stretch between two *template* special tokens
    that contains a special token produced by content text. Other tokens are kept as they are, so the
    result equals ``tokenizer(text)`` when content holds no special-token string."""

    def in_content(s: int, e: int) -> bool:
        return e > s and any(s < ce and e > cs for cs, ce in content_ranges)

    bad = [i for i, (t, (s, e)) in enumerate(zip(ids, offsets, strict=True)) if t in special_ids and in_content(s, e)]
    if not bad:
        return ids, offsets
    fixed = set(bad)
    anchor = [t in special_ids and i not in fixed for i, t in enumerate(ids)]  # template specials stay
    out_ids: list[int] = []
    out_offs: list[tuple[int, int]] = []
    i = 0
    while i < len(ids):
        if anchor[i]:
            out_ids.append(ids[i])
            out_offs.append(offsets[i])
            i += 1
            continue
        j = i
        while j < len(ids) and not anchor[j]:
            j += 1
        if any(k in fixed for k in range(i, j)):
            cs, ce = offsets[i][0], offsets[j - 1][1]
            sub_ids, sub_offs = _tokenize(tokenizer, text[cs:ce], False, True)
            out_ids.extend(sub_ids)
            out_offs.extend((a + cs, b + cs) for a, b in sub_offs)
        else:
            out_ids.extend(ids[i:j])
            out_offs.extend(offsets[i:j])
        i = j
    return out_ids, out_offs


def _tokenize_split(
    tokenizer: Any,
    text: str,
    pieces: list[_Piece],
    char_spans: list[tuple[int, int]],
    add_special: bool,
    allow_special: bool,
) -> tuple[list[int], list[tuple[int, int]]]:
    """``boundary="split"``: tokenize every piece and every stretch of template text on its own."""
    chunks: list[tuple[int, int, bool]] = []  # (start, end, is content)
    pos = 0
    for p, (cs, ce) in sorted(zip(pieces, char_spans, strict=True), key=lambda x: x[1]):
        if cs > pos:
            chunks.append((pos, cs, False))
        if ce > cs:
            chunks.append((cs, ce, p.content))
        pos = max(pos, ce)
    if pos < len(text):
        chunks.append((pos, len(text), False))
    ids: list[int] = []
    offsets: list[tuple[int, int]] = []
    for cs, ce, content in chunks:
        sub_ids, sub_offs = _tokenize(tokenizer, text[cs:ce], False, content and not allow_special)
        ids.extend(sub_ids)
        offsets.extend((a + cs, b + cs) for a, b in sub_offs)
    joint, _ = _tokenize(tokenizer, text, False, not allow_special)
    dec = dict(skip_special_tokens=False, clean_up_tokenization_spaces=False)
    if tokenizer.decode(ids, **dec) != tokenizer.decode(joint, **dec):
        raise ValueError(
            "boundary='split' cannot tokenize the pieces on their own without changing the text (this "
            "tokenizer adds or drops characters at the start of each call, e.g. a prefix space, or a piece "
            "edge falls inside a word it cannot split); use boundary='error' and move the edges"
        )
    if add_special:
        pre, post = _special_wrap(tokenizer)
        ids = pre + ids + post
        offsets = [(0, 0)] * len(pre) + offsets + [(len(text), len(text))] * len(post)
    return ids, offsets


def _fill(s: str, pieces: list[_Piece]) -> str:
    for k, p in enumerate(pieces):
        s = s.replace(_sentinel(k), p.text)
    return s


def _substitute(rendered: str, pieces: list[_Piece]) -> tuple[str, list[tuple[int, int]]]:
    found = []
    for k in range(len(pieces)):
        i = rendered.find(_sentinel(k))
        if i < 0:
            raise ValueError(
                f"the chat template dropped the {pieces[k].name!r} message (e.g. it does not support a system "
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
        text = pieces[k].text
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
