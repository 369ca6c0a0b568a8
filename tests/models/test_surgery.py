"""Vocabulary surgery: add_tokens / set_embeddings, tied and untied."""

import copy

import pytest
import torch

import tokensmith as ts
from tokensmith.models.surgery import padding_rows


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_add_tokens_mean_init_and_encoding(arch):
    ad = ts.tiny(arch)
    V = ad.structure.vocab_size
    mean_before = ad.E[:V].detach().mean(0).clone()
    ids = ad.add_tokens(["<think>", "</think>"], special=True)
    assert ids == [V, V + 1]
    assert ad.structure.vocab_size == V + 2
    torch.testing.assert_close(ad.E[ids[0]].detach(), mean_before)
    enc = ad.encode("a <think> b", allow_special=True)  # content parses special tokens only on request
    assert ids[0] in enc.input_ids.tolist()
    assert bool(enc.special_mask[enc.input_ids.tolist().index(ids[0])])
    assert ad.logits("x <think>").shape[-1] == V + 2
    assert not ad.allowed_token_mask()[ids[0]]  # added tokens are never placed by searches


def test_existing_token_keeps_its_id_and_weights():
    ad = ts.tiny("llama")
    hello = ad.tokenizer.convert_tokens_to_ids("Hello")
    row = ad.E[hello].detach().clone()
    ids = ad.add_tokens(["Hello"])
    assert ids == [hello]
    torch.testing.assert_close(ad.E[hello].detach(), row)


def test_untied_model_gets_both_rows_and_set_embeddings():
    ad = ts.tiny("gpt_neox")
    assert not ad.tied
    (i,) = ad.add_tokens(["zzqxw"], init="zeros")
    assert ad.E[i].abs().sum() == 0 and ad.W_U[i].abs().sum() == 0
    e_in = torch.ones(1, ad.structure.hidden_size)
    e_out = 2 * torch.ones(1, ad.structure.hidden_size)
    ad.set_embeddings([i], e_in, e_out)
    assert torch.all(ad.E[i] == 1) and torch.all(ad.W_U[i] == 2)
    with pytest.raises(ValueError):
        ad.set_embeddings([i], torch.full((1, ad.structure.hidden_size), float("nan")))
    with pytest.raises(ValueError):
        ad.set_embeddings([ad.structure.vocab_size], e_in)


def test_tied_model_single_matrix():
    ad = ts.tiny("gpt2")
    assert ad.tied
    (i,) = ad.add_tokens(["zzqxw"])
    e = torch.randn(1, ad.structure.hidden_size)
    ad.set_embeddings([i], e)
    torch.testing.assert_close(ad.W_U[i].detach(), e[0])
    with pytest.raises(ValueError):
        ad.set_embeddings([i], e, e + 1)


def test_bad_inputs_and_padding_rows():
    ad = ts.tiny("llama")
    with pytest.raises(TypeError):
        ad.add_tokens("<x>")
    with pytest.raises(ValueError):
        ad.add_tokens([""])
    assert padding_rows(ad).numel() == ad.structure.vocab_size - len(ad.tokenizer)


@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen2", "gemma3", "gpt_neox", "bert"])
def test_replace_vocabulary_on_every_tiny_arch(arch):
    """A copy on a smaller tokenizer (the same one with extra tokens removed is not available, so: the same
    tokenizer plus two added tokens): rows are the ones given, the original model is untouched, logits of the
    old ids equal the original model's for text that uses no new token."""
    from tokensmith.models import replace_vocabulary

    a = ts.tiny(arch)
    tok = copy.deepcopy(a.tokenizer)
    tok.add_tokens(["<ts_new_a>", "<ts_new_b>"])
    n = len(tok)
    g = torch.Generator().manual_seed(0)
    E = torch.cat([a.E.detach()[: len(a.tokenizer)], torch.randn(n - len(a.tokenizer), a.structure.hidden_size, generator=g)])
    E_out = None if a.tied or a.structure.lm_head is None else torch.cat(
        [a.W_U.detach()[: len(a.tokenizer)], torch.randn(n - len(a.tokenizer), a.structure.hidden_size, generator=g)])
    before = a.E.detach().clone()
    b = replace_vocabulary(a, tok, E, E_out)
    assert b.model is not a.model and torch.equal(a.E.detach(), before)
    assert b.structure.vocab_size >= n and torch.equal(b.E.detach()[:n], E.to(b.E.dtype))
    batch = a.encode_batch(["hello world"])
    za, zb = a.forward(batch).logits, b.forward(batch).logits
    k = min(za.shape[-1], len(a.tokenizer))
    assert torch.allclose(za[..., :k], zb[..., :k], atol=1e-5)
    with pytest.raises(ValueError, match="E_in"):
        replace_vocabulary(a, tok, E[:-1])
