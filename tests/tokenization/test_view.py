"""TokenizerView: byte-exact round trips for every supported family, offsets, trie, canonicality."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tokensmith.tokenization import (
    TokenizerView,
    bytes_to_unicode,
    check_homomorphism,
    load_tokenizer,
    utf8_boundaries,
)

BYTE_EXACT = ["smollm2", "qwen2.5", "mistral-sp", "tekken"]
_VIEWS: dict[str, TokenizerView] = {}


def view(name: str) -> TokenizerView:
    if name not in _VIEWS:
        _VIEWS[name] = TokenizerView(load_tokenizer(name))
    return _VIEWS[name]


# text with every kind of trouble: astral chars, combining marks, CJK, whitespace runs, special strings
_text = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), max_codepoint=0x1F9FF), max_size=40
) | st.sampled_from(["<|im_start|>user", "[CLS] x [SEP]", "<s>[INST]", "\n\n\t  ", "e\u0301\u0301", "😀👍🏽x"])


@pytest.mark.parametrize("name", BYTE_EXACT)
def test_families(name):
    fam = {"smollm2": "byte_bpe", "qwen2.5": "byte_bpe", "mistral-sp": "sentencepiece", "tekken": "tiktoken"}
    v = view(name)
    assert v.family == fam[name]
    # SmolLM2's vocabulary has no token for six control bytes: not lossless, and it says which
    assert v.lossless == (name != "smollm2")
    assert sorted(v.missing_bytes) == ([4, 6, 19, 20, 22, 29, 241, 242] if name == "smollm2" else [])


@pytest.mark.parametrize("name", BYTE_EXACT)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=_text)
def test_round_trip_bytes_and_offsets(name, text):
    v = view(name)
    e = v.encode(text)
    kept = bytes(b for b in text.encode() if b not in v.missing_bytes)  # bytes without a token vanish
    assert v.decode_bytes(e.ids) == kept
    # offsets are in order, each span holds exactly that token's bytes (plus dropped bytes it merged across),
    # and only dropped bytes fall between
    pos = 0
    for k, (i, (s, t)) in enumerate(zip(e.ids, e.offsets, strict=True)):
        want = v.token_bytes(i)[1:] if k == 0 and v.dummy_prefix else v.token_bytes(i)  # the hidden ▁
        assert s >= pos and bytes(b for b in e.data[s:t] if b not in v.missing_bytes) == want
        assert t == s or e.data[s] not in v.missing_bytes
        assert all(b in v.missing_bytes for b in e.data[pos:s])
        pos = t
    assert all(b in v.missing_bytes for b in e.data[pos:])
    # special-token strings typed by a user are text, never control tokens
    assert not set(e.ids) & v.special_ids
    if not any(b in v.missing_bytes for b in e.data):  # a dropped byte can join its neighbours into one token
        assert v.is_canonical(e.ids)


@settings(max_examples=60, deadline=None)
@given(text=_text)
def test_wordpiece_offsets_are_character_aligned(text):
    v = view("minilm")
    e = v.encode(text)
    cuts = set(utf8_boundaries(e.data))
    last = (0, 0)
    for s, t in e.offsets:
        assert s in cuts and t in cuts and s <= t  # never inside a character
        # monotone; several pieces of one character (Hangul decomposed by the normaliser) share its span
        assert s >= last[1] or (s, t) == last
        last = (s, t)


def test_wordpiece_pieces_and_decode():
    v = view("minilm")
    e = v.encode("Unaffable wörld")
    assert [v.token_bytes(i) for i in e.ids] == [b"una", b"ffa", b"ble", b"world"]
    assert [v.word_start(i) for i in e.ids] == [True, False, False, True]
    assert e.pieces()[3] == "wörld".encode()  # offsets point at the original (un-normalised) bytes
    assert v.decode_bytes(e.ids) == b"unaffable world"
    assert not v.lossless


def test_byte_map_is_gpt2s():
    m = bytes_to_unicode()
    assert len(set(m.values())) == 256 and m[0x20] == "Ġ" and m[0x0A] == "Ċ" and m[0] == "Ā"


def test_dropped_byte_inside_a_merge():
    v = view("smollm2")
    e = v.encode(":\x16:")  # SmolLM2 has no token for 0x16: the tokenizer drops it and merges "::"
    assert v.decode_bytes(e.ids) == b"::" and e.offsets == [(0, 3)]
    assert v.pretokenize(":\x16:") == [(0, 3)] and v.bpe_merge(b":\x16:") == e.ids


def test_split_character_gets_exact_bytes():
    v = view("smollm2")
    e = v.encode(" 😀")  # split by byte-level BPE into two tokens inside the 4-byte character
    assert len(e.ids) == 2 and b"".join(e.pieces()) == " 😀".encode()
    assert all(len(p) < 5 for p in e.pieces())
    assert e.offsets == [(0, len(e.pieces()[0])), (len(e.pieces()[0]), 5)]


def test_sentencepiece_dummy_prefix_and_byte_fallback():
    v = view("mistral-sp")
    e = v.encode("hello")
    assert v.token_bytes(e.ids[0]).startswith(b" ") and e.offsets[0][0] == 0  # dummy ▁ hidden
    assert v.decode_bytes(e.ids) == b"hello"
    rare = next(c for c in "🧿🪬𓀀ꙮ" if any(v.special_class(i) == "byte" for i in v.encode(c).ids))
    e = v.encode(rare)  # spelled with <0xNN> byte-fallback pieces
    assert v.decode_bytes(e.ids) == rare.encode() and b"".join(e.pieces()) == rare.encode()
    assert not check_homomorphism(v, "a", "b")  # "b" alone loses its dummy space; "a"+"b" keeps it
    assert check_homomorphism(view("smollm2"), "a", "b")


def test_add_special_tokens_spans_are_empty():
    v = view("mistral-sp")
    e = v.encode("hi", add_special_tokens=True)
    bos = [k for k, i in enumerate(e.ids) if i in v.special_ids]
    assert bos and all(e.offsets[k][0] == e.offsets[k][1] for k in bos)


@pytest.mark.parametrize("name", ["smollm2", "tekken"])
def test_supertokens_and_prefix_tokens_match_a_linear_scan(name):
    v = view(name)
    rng = random.Random(0)
    toks = [b for b in v.all_token_bytes if b]
    for prefix in [b"", b" th", b"\xf0", b"\xff\xff", b"zzzq"] + [rng.choice(toks)[:2] for _ in range(5)]:
        got = set(v.supertokens(prefix).tolist())
        want = {i for i, b in enumerate(v.all_token_bytes) if b and i not in v.special_ids and b.startswith(prefix)}
        assert got == want, prefix
    data = b" the quick"
    want = sorted(
        (len(b), i) for i, b in enumerate(v.all_token_bytes) if b and i not in v.special_ids and data.startswith(b)
    )
    assert v.prefix_tokens(data) == [i for _, i in want]


def test_first_byte_matrix():
    v = view("smollm2")
    m = v.first_byte_matrix
    assert m.shape == (256, v.vocab_size) and m.dtype == torch.bool
    assert int(m.sum()) == sum(1 for i, b in enumerate(v.all_token_bytes) if b)
    i = v.encode(" hello").ids[0]
    assert m[ord(" "), i] and v.first_byte[i] == ord(" ")
    assert all(v.first_byte[j] == -1 for j in v.special_ids)


@pytest.mark.parametrize("name", ["smollm2", "qwen2.5", "tekken"])
@settings(max_examples=40, deadline=None)
@given(text=_text)
def test_bpe_merge_equals_the_tokenizer_within_each_pretoken(name, text):
    v = view(name)
    e = v.encode(text)
    ids = []
    for s, t in v.pretokenize(text):
        ids += v.bpe_merge(e.data[s:t])
    assert ids == e.ids


def test_canonicality():
    v = view("smollm2")
    ids = v.encode(" hello world").ids
    assert v.is_canonical(ids)
    spelled = [v.ids_of_bytes(bytes([c]))[0] for c in b" hello"]
    assert not v.is_canonical(spelled)  # same bytes, not the tokenizer's encoding
    half = v.encode(" 😀").ids[:1]
    assert not v.is_canonical(half)  # not valid UTF-8


def test_categories():
    v = view("smollm2")
    cats = v.categories()
    assert len(cats) == v.vocab_size
    assert {cats[i] for i in v.special_ids} == {"special"}
    i = v.encode(" hello").ids[0]
    assert cats[i] == "ok"
    half = v.encode(" 😀").ids[0]
    assert cats[half] == "undecodeable"
    w = view("minilm")
    wc = w.categories()
    assert wc[w.encode("unaffable").ids[1]] == "continuation" and wc[1] == "unreachable"  # [unused0]


def test_bad_input():
    v = view("smollm2")
    with pytest.raises(ValueError, match="surrogate"):
        v.encode("a\ud800b")
    with pytest.raises(TypeError, match="str"):
        v.encode(b"bytes")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="fast"):
        TokenizerView(object())
    with pytest.raises(TypeError, match="bytes"):
        v.supertokens("text")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="known offline tokenizers"):
        load_tokenizer("nope")
    with pytest.raises(NotImplementedError, match="byte-level"):
        view("mistral-sp").bpe_merge(b"abc")


def test_adapter_is_accepted():
    import tokensmith as ts

    a = ts.tiny("llama")
    assert TokenizerView(a).vocab_size == len(a.tokenizer)
