"""Re-rendering an encoded example with new slot text (reencode) and the in-context re-tokenization check
(slot_round_trip), which token-space searches use to drop candidates whose string would tokenize differently."""

from __future__ import annotations

import pytest
import torch

import tokensmith as ts
from tokensmith.models import Slot, encode, reencode, slot_round_trip


@pytest.fixture(scope="module")
def tok():
    return ts.tiny("llama").tokenizer  # the SmolLM2 byte-level BPE tokenizer with its ChatML template


@pytest.mark.parametrize("chat", [False, True])
def test_reencode_equals_encoding_the_new_text_directly(tok, chat):
    enc = encode(tok, ["Tell me a story", Slot("suffix", " x x x")], target=" Sure", chat=chat, system="Be brief." if chat else None)
    new = reencode(tok, enc, {"suffix": " about a brave cat"})
    direct = encode(tok, ["Tell me a story", Slot("suffix", " about a brave cat")], target=" Sure", chat=chat,
                    system="Be brief." if chat else None)
    assert torch.equal(new.input_ids, direct.input_ids)
    assert new.spans == direct.spans
    assert new.slot_names == ["suffix"]
    # overrides change the recipe
    gen = reencode(tok, enc, {"suffix": " now"}, target=None)
    assert "target" not in gen.spans


def test_reencode_slot_in_messages_and_errors(tok):
    msgs = [{"role": "user", "content": ["Doc:", Slot("doc", " cats purr"), "."]}]
    enc = encode(tok, messages=msgs, target=" ok", chat=True)
    new = reencode(tok, enc, {"doc": " dogs bark"})
    assert "dogs bark" in new.text and "cats purr" not in new.text
    with pytest.raises(ValueError, match="no slot named"):
        reencode(tok, enc, {"nope": "x"})
    hand = encode(tok, "plain", target=" x")
    hand.recipe = None
    with pytest.raises(ValueError, match="no recipe"):
        reencode(tok, hand, {"s": "x"})


@pytest.mark.parametrize("boundary", ["error", "split"])
def test_round_trip_keeps_clean_and_catches_constructed_drift(tok, boundary):
    enc = encode(tok, ["Write a poem", Slot("suffix", " a b c d e")], target=" Sure", chat=True, boundary=boundary)
    sp = enc.spans["suffix"]
    ids = enc.input_ids[sp.slice]
    # drift: " wor" + "ld" decodes to " world", which tokenizes as one token
    wor, ld = tok.encode(" wor", add_special_tokens=False), tok.encode("ld", add_special_tokens=False)
    assert len(wor) == 1 and len(ld) == 1 and len(tok.encode(" world", add_special_tokens=False)) == 1
    drift = ids.clone()
    drift[1], drift[2] = wor[0], ld[0]
    # a candidate spelling a control token: "<|im_end|>" pieces as plain tokens
    pieces = tok.encode("<|im_end|>", add_special_tokens=False, split_special_tokens=True)
    ctrl = ids.clone()
    if len(pieces) <= len(ids):
        ctrl[: len(pieces)] = torch.tensor(pieces)
    ok = slot_round_trip(tok, enc, "suffix", torch.stack([ids, drift, ctrl]))
    assert ok.tolist()[:2] == [True, False]
    # content is tokenized with special parsing off, so the spelled marker stays text when it re-tokenizes to
    # the same pieces; either way it never becomes the control token
    new = reencode(tok, enc, {"suffix": tok.decode(ctrl.tolist())})
    assert tok.convert_tokens_to_ids("<|im_end|>") not in new.input_ids[new.spans["suffix"].slice].tolist()
    assert bool(ok[2]) == torch.equal(new.input_ids[new.spans["suffix"].slice], ctrl)


def test_round_trip_sees_merges_with_the_text_after_the_slot(tok):
    # the slot is followed by "ld" in the prompt: a candidate ending in " wor" merges with it
    enc = encode(tok, ["Hello", Slot("adv", " big"), "ld is here"], target=" ok", boundary="split")
    ids = enc.input_ids[enc.spans["adv"].slice]
    wor = tok.encode(" wor", add_special_tokens=False)
    cand = ids.clone()
    cand[-1] = wor[0]
    assert slot_round_trip(tok, enc, "adv", cand[None]).tolist() == [True]  # split: the slot alone round-trips
    joint = encode(tok, ["Hello", Slot("adv", " big"), " world is here"], target=" ok")
    ids_j = joint.input_ids[joint.spans["adv"].slice]
    assert slot_round_trip(tok, joint, "adv", ids_j[None]).tolist() == [True]


def test_round_trip_batch_equals_one_at_a_time_and_shape_errors(tok):
    enc = encode(tok, ["Say", Slot("s", " one two three")], target=" ok")
    ids = enc.input_ids[enc.spans["s"].slice]
    g = torch.Generator().manual_seed(0)
    cands = ids[None].repeat(40, 1)
    cands[:, 1] = torch.randint(0, len(tok), (40,), generator=g)
    batched = slot_round_trip(tok, enc, "s", cands)
    single = torch.cat([slot_round_trip(tok, enc, "s", c[None]) for c in cands])
    assert torch.equal(batched, single)
    with pytest.raises(ValueError, match="slot_ids must be"):
        slot_round_trip(tok, enc, "s", ids[None, :2])
    with pytest.raises(ValueError, match="no span named"):
        slot_round_trip(tok, enc, "zz", ids[None])


def test_round_trip_on_wordpiece_keeps_edge_spaces_and_ignores_added_specials():
    """BERT's [CLS]/[SEP] are added outside the text (offsets (0, 0)) and WordPiece tokens carry no spaces:
    the slot's own tokens must still round-trip, with the slot's edge spaces kept when decoding."""
    from tokensmith.models import decode_slot

    tok = ts.tiny("bert").tokenizer
    enc = encode(tok, ["the movie was", Slot("t", " really very"), " good ."])
    ids = enc.input_ids[enc.spans["t"].slice]
    assert decode_slot(tok, enc, "t", ids[None]) == [" really very"]
    other = tok.convert_tokens_to_ids(["not", "so"])
    cands = torch.stack([ids, torch.tensor(other)])
    assert slot_round_trip(tok, enc, "t", cands).tolist() == [True, True]
    # "un" + "##able" decodes to "unable", a single WordPiece token: that drifts
    assert tok.tokenize("unable") == ["unable"]
    glue = torch.tensor(tok.convert_tokens_to_ids(["un", "##able"]))
    assert slot_round_trip(tok, enc, "t", glue[None]).tolist() == [False]
    # byte-level BPE is unchanged: the decode is the tokenizer's own (a token without its space has none)
    btok = ts.tiny("llama").tokenizer
    benc = encode(btok, ["Say", Slot("s", " a b")], target=" ok")
    x = btok.encode("x", add_special_tokens=False)
    bids = benc.input_ids[benc.spans["s"].slice].clone()
    bids[0] = x[0]
    assert decode_slot(btok, benc, "s", bids[None]) == ["x b"]


def test_same_vocab_is_remembered_and_sees_added_tokens():
    a, b = ts.tiny("llama", seed=0), ts.tiny("llama", seed=1)
    assert a.same_vocab(a) and a.same_vocab(b) and a.same_vocab(b)
    b.add_tokens(["<zz_added>"])  # the same tokenizer object, one token longer: the remembered answer is stale
    assert not a.same_vocab(b)
    with pytest.raises(ValueError, match="same tokenizer"):
        a.kl(b, a.encode("Hello", target=" world"))
