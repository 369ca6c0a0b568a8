"""Tests for tokensmith.models.tiny: tiny random models with real tokenizers."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import time

import pytest
import torch
from tolerance import assert_fp32_close

from tokensmith.models.tiny import TINY_ARCHS, tiny_model_and_tokenizer

EXPECTED_CLASS = {
    "gpt2": "GPT2LMHeadModel",
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "gemma3": "Gemma3ForCausalLM",
    "gpt_neox": "GPTNeoXForCausalLM",
    "bert": "BertForMaskedLM",
    "t5": "T5ForConditionalGeneration",
}
GQA = {"llama", "qwen2", "gemma3"}


def _forward(model, tok, texts=("Hello world", "The quick brown fox")):
    batch = tok(list(texts), return_tensors="pt", padding=True)
    kwargs = {}
    if model.config.is_encoder_decoder:
        kwargs["decoder_input_ids"] = batch["input_ids"]
    with torch.no_grad():
        return batch, model(**batch, **kwargs).logits


def test_archs_listed():
    assert set(TINY_ARCHS) == set(EXPECTED_CLASS)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_builds_and_forwards(arch):
    model, tok = tiny_model_and_tokenizer(arch)
    cfg = model.config
    assert type(model).__name__ == EXPECTED_CLASS[arch]
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert cfg.vocab_size == len(tok)
    assert cfg.pad_token_id is not None and cfg.pad_token_id == tok.pad_token_id
    width = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None) or cfg.d_model
    assert width == 64
    heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", None) or cfg.num_heads
    assert heads == 4
    layers = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", None) or cfg.num_layers
    assert layers == 2
    if arch in GQA:
        assert cfg.num_key_value_heads == 2
    if arch != "t5":  # t5 uses relative positions: no maximum
        max_pos = getattr(cfg, "max_position_embeddings", None) or cfg.n_positions
        assert max_pos >= 512
    assert cfg._attn_implementation == "sdpa"
    batch, logits = _forward(model, tok)
    assert logits.shape == (*batch["input_ids"].shape, len(tok))
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_tokenizers_are_real(arch):
    _, tok = tiny_model_and_tokenizer(arch)
    if arch == "bert":
        assert tok("Hello world")["input_ids"] == [101, 7592, 2088, 102]
        assert tok.mask_token == "[MASK]"
    else:  # SmolLM2 tokenizer with the ChatML template, no automatic BOS
        assert tok("Hello world")["input_ids"] == [19556, 905]
        assert tok.eos_token == "<|im_end|>" and tok.pad_token_id == 2
        text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)
        assert text.startswith("<|im_start|>system\n")


def test_fresh_objects_each_call():
    m1, t1 = tiny_model_and_tokenizer("llama")
    m2, t2 = tiny_model_and_tokenizer("llama")
    assert m1 is not m2 and t1 is not t2
    t1.padding_side = "left"
    t1.add_tokens(["<my_new_token>"])
    assert t2.padding_side == "right"
    _, t3 = tiny_model_and_tokenizer("llama")
    assert t3.padding_side == "right" and len(t3) == m1.config.vocab_size


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert", "t5"])
def test_deterministic_by_seed(arch):
    a, _ = tiny_model_and_tokenizer(arch, seed=3)
    torch.manual_seed(999)  # the global RNG state must not matter
    b, _ = tiny_model_and_tokenizer(arch, seed=3)
    c, _ = tiny_model_and_tokenizer(arch, seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)


def test_no_global_rng_side_effect():
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    initial = torch.initial_seed()
    tiny_model_and_tokenizer("llama", seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.initial_seed() == initial
    after = torch.rand(8)
    torch.manual_seed(1234)
    assert torch.equal(after, torch.rand(8))


def test_unknown_arch():
    with pytest.raises(ValueError) as err:
        tiny_model_and_tokenizer("mamba")
    for arch in TINY_ARCHS:
        assert arch in str(err.value)


def test_bad_sizes():
    with pytest.raises(ValueError, match="hidden"):
        tiny_model_and_tokenizer("llama", hidden=60)
    with pytest.raises(ValueError, match="n_layers"):
        tiny_model_and_tokenizer("llama", n_layers=0)


def test_sizes_and_overrides():
    model, _ = tiny_model_and_tokenizer("llama", n_layers=3, hidden=32, tie_word_embeddings=True)
    assert model.config.num_hidden_layers == 3 and len(model.model.layers) == 3
    assert model.config.hidden_size == 32 and model.config.head_dim == 8
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    untied, _ = tiny_model_and_tokenizer("llama")
    assert untied.lm_head.weight.data_ptr() != untied.model.embed_tokens.weight.data_ptr()


def test_eager_matches_sdpa():
    sdpa, tok = tiny_model_and_tokenizer("llama", seed=5)
    eager, _ = tiny_model_and_tokenizer("llama", seed=5, attn_implementation="eager")
    assert eager.config._attn_implementation == "eager"
    _, a = _forward(sdpa, tok)
    _, b = _forward(eager, tok)
    # eager and SDPA attention sum in another order in every layer
    assert_fp32_close(a, b, width=sdpa.config.hidden_size, depth=sdpa.config.num_hidden_layers)


def test_gemma3_sliding_window_is_active():
    model, _ = tiny_model_and_tokenizer("gemma3")
    assert "sliding_attention" in model.config.layer_types
    assert model.config.layer_types[-1] == "full_attention"
    window = model.config.sliding_window
    # One sliding layer only: a token further back than the window cannot influence the output.
    one, _ = tiny_model_and_tokenizer("gemma3", n_layers=1, layer_types=["sliding_attention"])
    full, _ = tiny_model_and_tokenizer("gemma3", n_layers=1, layer_types=["full_attention"])
    T = window + 8
    ids = torch.arange(100, 100 + T)[None]
    ids2 = ids.clone()
    ids2[0, 0] = 5000
    with torch.no_grad():
        s1, s2 = one(input_ids=ids).logits, one(input_ids=ids2).logits
        f1, f2 = full(input_ids=ids).logits, full(input_ids=ids2).logits
    assert torch.equal(s1[0, -1], s2[0, -1])  # beyond the window: unchanged
    assert not torch.allclose(s1[0, 1], s2[0, 1])  # inside the window: changed
    assert not torch.allclose(f1[0, -1], f2[0, -1])  # full attention sees it


def test_fast_after_first_call():
    tiny_model_and_tokenizer("llama")
    t = time.perf_counter()
    tiny_model_and_tokenizer("llama", seed=1)
    assert time.perf_counter() - t < 1.5  # ~0.15 s on 2 shared CPU cores


def _adapter_cls():
    from tokensmith.models.adapter import ModelAdapter

    return ModelAdapter


@pytest.mark.parametrize(
    "arch",
    TINY_ARCHS,
)
def test_tiny_through_adapter(arch):
    ModelAdapter = _adapter_cls()
    from tokensmith.models.tiny import tiny

    adapter = tiny(arch, seed=2)
    assert isinstance(adapter, ModelAdapter)
    ref, _ = tiny_model_and_tokenizer(arch, seed=2)
    sa, sr = adapter.model.state_dict(), ref.state_dict()
    assert all(torch.equal(sa[k], sr[k]) for k in sr)
