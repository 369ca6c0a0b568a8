"""What each token stands for in the text, for display: characters, bytes, and split characters.

A byte-level BPE token is stored as a string of stand-in characters (``'Ġ'`` for a space, ``'Ð'`` for the
byte 0xD0, ...). Showing those strings is misleading, and a token may hold only part of a multi-byte
UTF-8 character (Cyrillic, Devanagari and CJK text is often split mid-character). :func:`token_pieces`
maps every token back to the bytes it encodes, checks that the bytes of a run of tokens reproduce the
text at the tokenizer's character offsets, and describes each token as whole characters plus fragments
of characters ("byte 1 of 2 of 'П'"). When the tokenizer is not byte-level (or the check fails) it falls
back to the character offsets alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

__all__ = ["TokenPiece", "token_pieces", "token_chips", "byte_level_decoder"]


@dataclass
class TokenPiece:
    """Display information for one token.

    Attributes:
        index: position in the sequence.
        id: token id.
        raw: the tokenizer's own token string (e.g. ``'ĠParis'``).
        text: the characters of the text this token covers (a split character is included once per
            token that holds part of it).
        nbytes: number of UTF-8 bytes the token encodes (None when unknown: not byte-level).
        parts: ``(text, is_fragment, note)`` runs; fragments are pieces of one character.
        special: a special/control token (rendered as its name).
    """

    index: int
    id: int
    raw: str
    text: str
    nbytes: int | None
    parts: list[tuple[str, bool, str]] = field(default_factory=list)
    special: bool = False

    @property
    def has_fragment(self) -> bool:
        return any(f for _, f, _ in self.parts)

    def tooltip(self) -> str:
        notes = [n for _, f, n in self.parts if f]
        head = f"#{self.index} id {self.id} {self.raw!r}"
        if self.nbytes is not None:
            head += f" · {self.nbytes} byte{'s' if self.nbytes != 1 else ''}"
        return head + ("\n" + "\n".join(notes) if notes else "")


@lru_cache(maxsize=1)
def byte_level_decoder() -> dict[str, int]:
    """Stand-in character -> byte for GPT-2 style byte-level BPE.

    Bytes that are printable and not whitespace (``!``..``~``, ``¡``..``¬``, ``®``..``ÿ``) stand for
    themselves; the other 68 bytes are mapped, in increasing order, to code points 256, 257, ...
    """
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAC + 1)) | set(range(0xAE, 0xFF + 1))
    table: dict[str, int] = {}
    extra = 0
    for b in range(256):
        if b in printable:
            table[chr(b)] = b
        else:
            table[chr(256 + extra)] = b
            extra += 1
    return table


def _token_bytes(raw: str) -> bytes | None:
    table = byte_level_decoder()
    try:
        return bytes(table[c] for c in raw)
    except KeyError:
        return None


def _char_note(ch: str, k0: int, k1: int, n: int) -> str:
    which = f"byte {k0 + 1}" if k1 - k0 == 1 else f"bytes {k0 + 1}-{k1}"
    return f"{which} of {n} of {ch!r} (U+{ord(ch):04X})"


def token_pieces(
    tokenizer: Any,
    ids: Sequence[int],
    text: str,
    offsets: Sequence[tuple[int, int]],
    special_mask: Sequence[bool] | None = None,
) -> list[TokenPiece]:
    """Describe each token of ``ids`` (tokenized from ``text`` with ``offsets``) for display.

    Args:
        tokenizer: the HF tokenizer (for ``convert_ids_to_tokens``).
        ids: token ids.
        text: the string that was tokenized.
        offsets: per-token ``(char_start, char_end)``.
        special_mask: per-token special flags (default: ``tokenizer.all_special_ids``).

    Returns:
        One :class:`TokenPiece` per token.

    Examples:
        >>> import tokensmith as ts
        >>> tok = ts.tiny("llama").tokenizer
        >>> enc = tok("Привет", add_special_tokens=False, return_offsets_mapping=True)
        >>> ps = token_pieces(tok, enc["input_ids"], "Привет", enc["offset_mapping"])
        >>> sum(p.nbytes for p in ps) == len("Привет".encode())
        True
    """
    ids = [int(i) for i in ids]
    raws = tokenizer.convert_ids_to_tokens(ids)
    if special_mask is None:
        sp = set(getattr(tokenizer, "all_special_ids", []) or [])
        special_mask = [i in sp for i in ids]
    special = [bool(s) for s in special_mask]
    offs = [(int(a), int(b)) for a, b in offsets]
    pieces: list[TokenPiece | None] = [None] * len(ids)

    # Runs of consecutive non-special tokens; each run is checked against the text as a whole.
    runs: list[list[int]] = []
    for i in range(len(ids)):
        if special[i]:
            pieces[i] = TokenPiece(i, ids[i], raws[i], raws[i], None, [(raws[i], False, "special token")], True)
            continue
        if runs and runs[-1][-1] == i - 1:
            runs[-1].append(i)
        else:
            runs.append([i])

    for run in runs:
        if not _byte_level_run(run, ids, raws, text, offs, pieces):
            _offset_run(run, ids, raws, text, offs, pieces)
    return [p for p in pieces if p is not None]


def _byte_level_run(run, ids, raws, text, offs, pieces) -> bool:
    tb = [_token_bytes(raws[i]) for i in run]
    if any(b is None for b in tb):
        return False
    cs = min(offs[i][0] for i in run)
    ce = max(offs[i][1] for i in run)
    chunk = text[cs:ce]
    if b"".join(tb) != chunk.encode("utf-8"):  # type: ignore[arg-type]
        return False
    # byte range of every character of the chunk
    char_ranges: list[tuple[int, int, str]] = []
    pos = 0
    for ch in chunk:
        n = len(ch.encode("utf-8"))
        char_ranges.append((pos, pos + n, ch))
        pos += n
    p = 0
    ci = 0
    for i, b in zip(run, tb, strict=True):
        q = p + len(b)  # type: ignore[arg-type]
        parts: list[tuple[str, bool, str]] = []
        while ci < len(char_ranges) and char_ranges[ci][1] <= p:
            ci += 1
        cj = ci
        full = []
        while cj < len(char_ranges) and char_ranges[cj][0] < q:
            a, e, ch = char_ranges[cj]
            if a >= p and e <= q:
                full.append(ch)
            else:
                if full:
                    parts.append(("".join(full), False, ""))
                    full = []
                k0, k1 = max(a, p) - a, min(e, q) - a
                parts.append((ch, True, _char_note(ch, k0, k1, e - a)))
            cj += 1
        if full:
            parts.append(("".join(full), False, ""))
        pieces[i] = TokenPiece(i, ids[i], raws[i], "".join(t for t, _, _ in parts), len(b), parts)  # type: ignore[arg-type]
        p = q
    return True


def _offset_run(run, ids, raws, text, offs, pieces) -> None:
    prev = None
    for i in run:
        s, e = offs[i]
        t = text[s:e]
        frag = prev is not None and (s, e) == prev and e > s
        if not t:
            parts = [(raws[i], False, "no characters of its own")]
            t = raws[i]
        elif frag:
            parts = [(t, True, "shares its characters with the previous token")]
        else:
            parts = [(t, False, "")]
        pieces[i] = TokenPiece(i, ids[i], raws[i], t, None, parts)
        prev = (s, e)


def token_chips(tokenizer: Any, ids: list[int], text: str, offsets: list[tuple[int, int]], special=None) -> str:
    from tokensmith.report import html as H
    """Tokens of ``text`` as coloured chips (decoded per token; split characters underlined)."""
    out = []
    for p in token_pieces(tokenizer, ids, text, offsets, special):
        inner = "".join(
            f'<span class="frag">{H.token_text(t)}</span>' if frag else H.token_text(t) for t, frag, _ in p.parts
        )
        color = "#e5e7eb" if p.special else H.CHIP_PALETTE[p.index % len(H.CHIP_PALETTE)]
        out.append(H.chip(inner, title=p.tooltip(), color=color))
    return '<div class="chips" dir="ltr">' + "".join(out) + "</div>"
