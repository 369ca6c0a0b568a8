"""Token healing (DEC-1): the constraint masks, HF generate, the constructed "http:" boundary case."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import LogitsProcessorList

from tokensmith.tokenization.healing import (
    PrefixConstraintLogitsProcessor,
    allowed_token_mask_for,
    token_healing_generate,
)
from tokensmith.tokenization.view import TokenizerView

REAL = [
    "The url is http://www.example.com/index.html?q=1",
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1)",
    "naïve café — 😀 中文字 e\u0301 ok",
    "It's   spaced\tout,\n\nisn't it?",
]


pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def smol(smollm2_shared):
    return smollm2_shared  # read-only: ByteLM and healing never change the model


@pytest.fixture(scope="module")
def tiny(shared_tiny):
    return shared_tiny("llama")


def test_mask_is_exactly_the_constraint(tiny):
    """Property: over random byte slices of real strings (also mid-character), the mask allows exactly
    the tokens whose bytes are a non-empty prefix of the remaining bytes or start with them (the SmolLM2
    tokenizer of ts.tiny)."""
    view = TokenizerView.of(tiny.tokenizer)
    tb = view.all_token_bytes
    rng = random.Random(0)
    for _ in range(25):
        data = rng.choice(REAL).encode()
        a = rng.randrange(len(data))
        r = data[a : a + rng.randint(1, 6)]
        m = allowed_token_mask_for(view, r)
        want = [bool(b) and i not in view.special_ids and (r.startswith(b) or b.startswith(r)) for i, b in enumerate(tb)]
        assert m.tolist() == want, r
    with pytest.raises(ValueError, match="non-empty"):
        allowed_token_mask_for(view, b"")


def test_processor_with_plain_hf_generate(tiny):
    """The processor alone, in HF generate: the output reproduces the removed bytes, for random cuts."""
    view = TokenizerView.of(tiny.tokenizer)
    rng = random.Random(1)
    proc = None
    for _ in range(4):
        text = rng.choice(REAL)
        ids = view.encode(text).ids
        k = rng.randint(2, len(ids) - 1)
        j = k - rng.randint(1, min(3, k - 1))
        s = view.decode_bytes(ids[j:k])
        proc = PrefixConstraintLogitsProcessor(view, s)
        x = torch.tensor([ids[:j]])
        out = tiny.model.generate(
            x, attention_mask=torch.ones_like(x), logits_processor=LogitsProcessorList([proc]),
            max_new_tokens=len(s) + 1, do_sample=False, pad_token_id=0,
        )
        gen = view.decode_bytes(out[0, j:].tolist())
        assert gen.startswith(s), (s, gen)
    # the same processor object starts over on a new generate call (shorter input_ids)
    assert proc is not None
    x = torch.tensor([view.encode("The url is http").ids])
    proc2 = PrefixConstraintLogitsProcessor(tiny.tokenizer, b"://")
    for _ in range(2):
        out = tiny.model.generate(x, attention_mask=torch.ones_like(x), logits_processor=LogitsProcessorList([proc2]),
                                  max_new_tokens=3, do_sample=False, pad_token_id=0)
        assert view.decode_bytes(out[0, x.shape[1]:].tolist()).startswith(b"://")


@pytest.mark.real_model
def test_http_boundary_case(smol):
    """ "The url is http:" ends with ":" where the text continues with the single token "://". Without
    healing the model after [" http", ":"] spreads its mass (what follows ":" there is out of distribution);
    with healing (remove ":", require it back) the first token is "://", which reproduces ":" and goes on."""
    view = TokenizerView.of(smol.tokenizer)
    prompt = "The url is http:"
    ids = view.encode(prompt).ids
    assert [view.token_bytes(i) for i in ids[-2:]] == [b" http", b":"]
    p_plain = smol.next_token_logprobs(torch.tensor([ids])).exp()[0]
    slash = torch.tensor([b.startswith(b"/") for b in view.all_token_bytes])
    p_slash_plain = float(p_plain[: len(slash)][slash].sum())
    p_heal = smol.next_token_logprobs(torch.tensor([ids[:-1]])).exp()[0]
    allowed = allowed_token_mask_for(view, b":", p_heal.shape[0])
    p_heal = p_heal * allowed
    p_heal = p_heal / p_heal.sum()
    colon_slash = view.ids_of_bytes(b"://")[0]
    assert int(p_heal.argmax()) == colon_slash
    assert float(p_heal[colon_slash]) > 0.9 and p_slash_plain < 0.5  # measured: 0.976 vs 0.047
    res = token_healing_generate(smol, prompt, max_new_tokens=3)
    assert res.removed == [b":"] and res.healed == [True]
    assert res.new_tokens[0][0] == colon_slash and res.texts[0].startswith("//")
    plain = smol.generate(prompt, max_new_tokens=3).texts[0]
    assert not plain.startswith("//")  # the distortion: greedy decoding without healing misses the URL


def test_backoff_never_cuts_a_character(tiny):
    view = TokenizerView.of(tiny.tokenizer)
    text = "naïve 😀"
    pieces = view.encode(text).pieces()
    assert pieces[-1] == b"\x80"  # the last token is the end of the emoji: removing it alone would cut it
    res = token_healing_generate(tiny, text, backtrack=1, max_new_tokens=6)
    assert res.removed == [" 😀".encode()]
    assert res.healed == [True] and res.generated_bytes[0].startswith(" 😀".encode())
    w = token_healing_generate(tiny, "hello wor", backtrack="word", max_new_tokens=3)
    assert w.removed == [b" wor"]
    none = token_healing_generate(tiny, "hello wor", backtrack=0, max_new_tokens=2)
    assert none.removed == [b""] and none.healed == [True]


def test_batched_equals_one_at_a_time(tiny):
    prompts = ["The url is http:", "naïve café", "x"]
    batch = token_healing_generate(tiny, prompts, max_new_tokens=4)
    alone = [token_healing_generate(tiny, p, max_new_tokens=4) for p in prompts]
    assert batch.texts == [a.texts[0] for a in alone]
    assert batch.removed == [a.removed[0] for a in alone]
    assert all(batch.healed)


def test_bad_input(tiny):
    with pytest.raises(ValueError, match="backtrack"):
        token_healing_generate(tiny, "abc", backtrack=-1)
    with pytest.raises(TypeError, match="str"):
        token_healing_generate(tiny, 3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="bytes"):
        PrefixConstraintLogitsProcessor(tiny.tokenizer, ["abc"])  # type: ignore[list-item]


def test_shared_view_is_cached(tiny):
    assert TokenizerView.of(tiny.tokenizer) is TokenizerView.of(tiny) is TokenizerView.of(TokenizerView.of(tiny.tokenizer))
    assert isinstance(TokenizerView.of(tiny), TokenizerView)
