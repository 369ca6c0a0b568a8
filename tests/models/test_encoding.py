"""Span-aware joint encoding: spans, chat templates, joint vs naive tokenization, left padding, errors."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

from tokensmith.models import Slot, encode, pad_batch

pytestmark = pytest.mark.usefixtures("torch_one_thread")

LLAMA3_MARKERS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
# Llama-3-style template (like the real one, it trims message content)
LLAMA3_TEMPLATE = (
    "{{- '<|begin_of_text|>' -}}"
    "{%- for message in messages -%}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}{%- endif -%}"
)
WORDS = ["cat", "sat", "on", "the", "mat", "hello", "world", "!", "42", "zebra", "quantum", "é"]


@pytest.fixture(scope="module")
def tok(shared_tiny):
    return shared_tiny("llama").tokenizer  # the real SmolLM2 tokenizer with its ChatML template


def _llama3_tokenizer(tok, add_markers: bool):
    t = copy.deepcopy(tok)
    t.chat_template = LLAMA3_TEMPLATE
    if add_markers:
        t.add_tokens(LLAMA3_MARKERS, special_tokens=True)
    return t


def _check_spans(tokenizer, enc, pieces: dict[str, str]) -> None:
    """Each named piece: decoding its span gives the text back; its char range holds the text; the
    span's tokens cover exactly that character range."""
    for name, text in pieces.items():
        sp = enc.spans[name]
        assert tokenizer.decode(enc.input_ids[sp.slice]) == text
        assert enc.text[sp.char_start : sp.char_end] == text
        assert enc.offsets[sp.start][0] == sp.char_start and enc.offsets[sp.end - 1][1] == sp.char_end
        assert enc.segments()[sp.start : sp.end] == [name] * len(sp)


def _independent_template_mask(enc, pieces: dict[str, str]) -> list[bool]:
    """A token is template iff it is special or its characters overlap no piece."""
    ranges = [(enc.spans[n].char_start, enc.spans[n].char_end) for n in pieces]
    out = []
    for (s, e), special in zip(enc.offsets, enc.special_mask.tolist(), strict=True):
        overlaps = e > s and any(s < ce and e > cs for cs, ce in ranges)
        out.append(special or not overlaps)
    return out


@pytest.mark.parametrize("close_target", [True, False])
def test_chatml_spans_decode_to_slot_text(tok, close_target):
    pieces = {"prompt": "Tell me a joke", "suffix": " ! ! x !", "target": " Sure, here is one"}
    enc = encode(tok, ["Tell me a joke", Slot("suffix", pieces["suffix"])], pieces["target"], chat=True,
                 close_target=close_target)
    assert enc.input_ids.tolist() == tok(enc.text, add_special_tokens=False)["input_ids"]
    _check_spans(tok, enc, pieces)
    assert enc.text.endswith("<|im_end|>\n") == close_target
    # special tokens: exactly the tokenizer's special ids, all in the template segment
    specials = set(tok.all_special_ids)
    assert enc.special_mask.tolist() == [i in specials for i in enc.input_ids.tolist()]
    assert enc.special_mask.sum() >= 5
    assert enc.template_mask.tolist() == _independent_template_mask(enc, pieces)
    assert enc.boundary_tokens == []


@pytest.mark.parametrize("add_markers", [True, False])
def test_llama3_style_template_spans(tok, add_markers):
    t = _llama3_tokenizer(tok, add_markers)
    pieces = {"system": "Be brief.", "prompt": "Tell me a joke", "suffix": " ! ! !", "target": "Sure, here is one"}
    enc = encode(t, ["Tell me a joke", Slot("suffix", " ! ! !")], "Sure, here is one", chat=True, system="Be brief.")
    assert enc.text.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>")
    assert enc.text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\nSure, here is one<|eot_id|>")
    assert enc.input_ids.tolist() == t(enc.text, add_special_tokens=False)["input_ids"]
    marker_ids = set(t.convert_tokens_to_ids(LLAMA3_MARKERS)) if add_markers else set()
    assert enc.special_mask.tolist() == [i in marker_ids for i in enc.input_ids.tolist()]
    assert int(enc.special_mask.sum()) == (1 + 3 * 3 if add_markers else 0)  # BOS + 3 turns x 3 markers
    if add_markers:
        _check_spans(t, enc, pieces)
        assert enc.boundary_tokens == []
    else:
        # markers tokenized as text: "." merges with the following "<" into ".<", a token straddling the
        # system text and the template; it is flagged and assigned to the system segment
        sp = enc.spans["system"]
        assert enc.tokens[sp.end - 1] == ".<" and enc.boundary_tokens == [sp.end - 1]
        assert t.decode(enc.input_ids[sp.start : sp.end - 1]) == "Be brief"
        _check_spans(t, enc, {k: v for k, v in pieces.items() if k != "system"})
    assert enc.template_mask.tolist() == _independent_template_mask(enc, pieces)


def test_template_that_trims_content_raises(tok):
    t = _llama3_tokenizer(tok, add_markers=True)
    with pytest.raises(ValueError, match="whitespace"):
        encode(t, "Hi", target=" Sure", chat=True)
    with pytest.raises(ValueError, match="rewrites message text"):
        encode(t, [" Hi", Slot("s", " x ")], chat=True)


def test_generation_prompt_without_target(tok):
    enc = encode(tok, "What is 2+2?", chat=True)
    assert enc.text.endswith("<|im_start|>assistant\n")
    assert not enc.target_mask.any()
    _check_spans(tok, enc, {"prompt": "What is 2+2?"})


@pytest.mark.parametrize(
    ("prompt", "target"),
    [("Hello wor", "ld"), ("The cat sa", "t on the mat"), ("Good mor", "ning, all")],
)
def test_joint_tokenization_differs_from_naive_and_is_scored_right(shared_tiny, prompt, target):
    ad = shared_tiny("llama")
    tok = ad.tokenizer
    naive = tok(prompt)["input_ids"] + tok(target)["input_ids"]
    joint = tok(prompt + target)["input_ids"]
    assert naive != joint  # the constructed cases really do merge across the boundary
    enc = ad.encode(prompt, target=target)
    assert enc.input_ids.tolist() == joint
    assert enc.text == prompt + target
    assert len(enc.boundary_tokens) >= 1
    assert all(enc.segments()[i] == "target" for i in enc.boundary_tokens)  # straddling -> later segment
    tm = enc.target_mask
    assert tm.any() and not tm[0]
    # manual log-prob of the target tokens from a plain full-sequence forward
    ids = enc.input_ids[None]
    with torch.no_grad():
        lp_all = torch.log_softmax(ad.model(input_ids=ids).logits[0].float(), -1)
    manual = torch.stack([lp_all[t - 1, ids[0, t]] for t in torch.nonzero(tm).flatten().tolist()])
    got = ad.token_logprobs(enc)[0]
    assert_close(got[tm], manual, atol=1e-5, rtol=1e-5)
    assert_close(ad.sequence_logprob(enc)[0], manual.sum(), atol=1e-4, rtol=1e-5)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.lists(st.lists(st.sampled_from(WORDS), min_size=1, max_size=4), min_size=1, max_size=3),
    st.lists(st.sampled_from(WORDS), min_size=1, max_size=4),
)
def test_plain_spans_property(tok, prompt_words, target_words):
    # every piece starts with a space (after the first), so piece boundaries are token boundaries
    texts = [" ".join(w) for w in prompt_words]
    texts = [texts[0]] + [" " + t for t in texts[1:]]
    target = " " + " ".join(target_words)
    parts = [texts[0]] + [Slot(f"s{i}", t) for i, t in enumerate(texts[1:])]
    enc = encode(tok, parts, target)
    pieces = {"prompt": texts[0], "target": target} | {f"s{i}": t for i, t in enumerate(texts[1:])}
    assert enc.text == "".join(texts) + target
    assert enc.input_ids.tolist() == tok(enc.text)["input_ids"]
    _check_spans(tok, enc, pieces)
    # segments appear in order and cover every token (plain mode has no template text)
    seg = enc.segments()
    order = ["prompt"] + [f"s{i}" for i in range(len(texts) - 1)] + ["target"]
    assert [s for i, s in enumerate(seg) if i == 0 or s != seg[i - 1]] == order
    assert enc.tokens == tok.convert_ids_to_tokens(enc.input_ids.tolist())


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.lists(st.sampled_from(WORDS), min_size=1, max_size=8), min_size=1, max_size=4))
def test_pad_batch_left_pads_and_unpads(tok, examples):
    encs = [encode(tok, " ".join(w), target=" end") for w in examples]
    b = pad_batch(encs, pad_id=tok.pad_token_id)
    T = max(len(e) for e in encs)
    assert b.input_ids.shape == (len(encs), T)
    for i, e in enumerate(encs):
        n = len(e)
        assert int(b.pad_offsets[i]) == T - n
        assert b.attention_mask[i].tolist() == [0] * (T - n) + [1] * n
        assert (b.input_ids[i, : T - n] == tok.pad_token_id).all()
        assert b.position_ids[i, T - n :].tolist() == list(range(n))
        assert b.unpad(b.input_ids)[i].tolist() == e.input_ids.tolist()
        assert b.unpad(b.target_mask)[i].tolist() == e.target_mask.tolist()
    assert not b.target_mask[~b.attention_mask.bool()].any()
    with pytest.raises(ValueError, match="leading shape"):
        b.unpad(b.input_ids[:, 1:])


def test_batch_mask_of_segment_missing_in_some_rows(tok):
    b = pad_batch([encode(tok, ["a", Slot("s", " b c")]), encode(tok, "a b c d e")], tok.pad_token_id)
    m = b.mask("s")
    assert m[1].sum() == 0 and m[0].sum() == 2
    assert b.unpad(m)[0].tolist() == b.examples[0].mask("s").tolist()


# ------------------------------------------------------------------ errors
def test_empty_inputs_raise(tok, shared_tiny):
    bert_tok = shared_tiny("bert").tokenizer
    for t in (tok, bert_tok):
        for bad in ("", None, [], [""]):
            with pytest.raises(ValueError, match="empty|nothing to encode"):
                encode(t, bad)
    with pytest.raises(ValueError, match="target is empty"):
        encode(tok, "Hello", target="")
    with pytest.raises(ValueError, match="target is empty"):
        encode(tok, "Hello", target="", chat=True)


def test_non_str_target_raises(tok):
    # documents current behaviour: a TypeError (the issue asked for ValueError)
    for bad in (123, ["a"], b"bytes"):
        with pytest.raises(TypeError, match="target must be a str"):
            encode(tok, "Hello", target=bad)


def test_slow_tokenizer_raises():
    from transformers import BertTokenizerLegacy

    from tokensmith.models.zoo import minilm_path

    slow = BertTokenizerLegacy(vocab_file=str(minilm_path() / "vocab.txt"))
    assert slow.is_fast is False
    with pytest.raises(ValueError, match="fast tokenizer"):
        encode(slow, "hello world")


def test_other_encoding_errors(tok, shared_tiny):
    with pytest.raises(ValueError, match="reserved"):
        encode(tok, ["a", Slot("template", " b")])
    with pytest.raises(ValueError, match="chat=True"):
        encode(tok, "Hi", system="Be brief.")
    no_template = copy.deepcopy(tok)
    no_template.chat_template = None
    with pytest.raises(ValueError, match="chat template"):
        encode(no_template, "Hi", chat=True)
    with pytest.raises(TypeError, match="prompt pieces"):
        encode(tok, 42)
    with pytest.raises(ValueError, match="no token of its own"):
        # a whitespace-only target yields no WordPiece token
        encode(shared_tiny("bert").tokenizer, "hello", target="   ")
    enc = encode(tok, "Hi")
    with pytest.raises(KeyError, match="no segment"):
        enc.mask("suffix")
