"""Layer ops, mid-forward continuation, token skipping, embedding insertion."""

import pytest
import torch

import tokensmith as ts
from tokensmith.models.embeddings import insert_embeddings

CAUSAL = ["llama", "gpt2", "qwen2", "gemma3", "gpt_neox"]


@pytest.fixture(scope="module")
def llama():
    return ts.tiny("llama")


@pytest.mark.parametrize("arch", CAUSAL)
def test_run_layers_from_cached_resid_pre_reproduces_forward(arch):
    ad = ts.tiny(arch)
    enc = ad.encode("The quick brown fox jumps over the lazy dog")
    with ad.hooks(cache=["layers.1.resid_pre"]) as h:
        full = ad.forward(enc).logits
    out = ad.run_layers(h.cache["layers.1.resid_pre"], start=1)
    assert out["physical"] is True
    torch.testing.assert_close(out["logits"], full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_run_layers_on_a_prefix_equals_the_full_forward_prefix(arch):
    # dropping trailing tokens physically at layer 1 cannot change earlier positions (causality)
    ad = ts.tiny(arch)
    enc = ad.encode("one two three four five six seven")
    with ad.hooks(cache=["layers.1.resid_pre"]) as h:
        full = ad.forward(enc).logits
    k = 4
    pos = torch.arange(k)[None]
    out = ad.run_layers(h.cache["layers.1.resid_pre"][:, :k], start=1, position_ids=pos)
    torch.testing.assert_close(out["logits"], full[:, :k], atol=1e-5, rtol=1e-5)


def test_run_layers_preserve_vs_reindex_differ_for_a_gap(llama):
    enc = llama.encode("alpha beta gamma delta epsilon zeta")
    with llama.hooks(cache=["layers.1.resid_pre"]) as h:
        llama.forward(enc)
    keep = torch.tensor([0, 1, 4, 5])
    hid = h.cache["layers.1.resid_pre"][:, keep]
    a = llama.run_layers(hid, 1, position_ids=keep[None], positions="preserve")["logits"]
    b = llama.run_layers(hid, 1, position_ids=keep[None], positions="reindex")["logits"]
    assert not torch.allclose(a[:, 2:], b[:, 2:])  # RoPE positions matter after the gap
    torch.testing.assert_close(a[:, :2], b[:, :2])  # identical before the gap


def test_run_layers_rejects_bad_ranges(llama):
    h = torch.zeros(1, 3, llama.structure.hidden_size)
    with pytest.raises(ValueError):
        llama.run_layers(h, start=2)
    with pytest.raises(ValueError):
        llama.run_layers(h, start=0, positions="rerotate")


def test_skip_layers_equals_unembedding_the_earlier_layer_and_is_reversible(llama):
    enc = llama.encode("Hello there friend")
    before = llama.logits(enc)
    with llama.hooks(cache=["layers.0.resid_post"]) as h:
        llama.forward(enc)
    with llama.skip_layers([1]):
        skipped = llama.logits(enc)
    torch.testing.assert_close(skipped, llama.unembed(h.cache["layers.0.resid_post"]).detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(llama.logits(enc), before)
    with llama.truncate_layers(1):
        torch.testing.assert_close(llama.logits(enc), skipped)


def test_skip_layers_restores_after_exception(llama):
    layer1 = llama.structure.layers[1]
    with pytest.raises(RuntimeError), llama.skip_layers([1]):
        raise RuntimeError("boom")
    assert llama.structure.layers[1] is layer1


def test_swap_layers_changes_output_and_restores(llama):
    enc = llama.encode("Hello there friend")
    base = llama.logits(enc)
    l0, l1 = llama.structure.layers[0], llama.structure.layers[1]
    with llama.swap_layers(0, 1):
        swapped = llama.logits(enc)
        assert llama.structure.layers[0] is l1
    assert not torch.allclose(base, swapped)
    assert llama.structure.layers[0] is l0
    torch.testing.assert_close(llama.logits(enc), base)


def test_skip_layer_for_tokens_block_and_ffn(llama):
    enc = llama.encode("a b c d e f")
    T = len(enc)
    mask = torch.zeros(1, T, dtype=torch.bool)
    mask[0, 2] = True
    with llama.hooks(cache=["layers.1.resid_pre", "layers.1.resid_post"]) as ref:
        llama.forward(enc)
    with llama.skip_layer_for_tokens(mask, [1]), llama.hooks(cache=["layers.1.resid_post"]) as h:
        llama.forward(enc)
    out = h.cache["layers.1.resid_post"]
    torch.testing.assert_close(out[0, 2], ref.cache["layers.1.resid_pre"][0, 2])
    torch.testing.assert_close(out[0, 3:], ref.cache["layers.1.resid_post"][0, 3:])  # layer 1 is the last: others untouched
    with llama.skip_layer_for_tokens(mask, [1], part="ffn"), llama.hooks(cache=["layers.1.mlp.out"]) as h2:
        llama.forward(enc)
    assert torch.all(h2.cache["layers.1.mlp.out"][0, 2] == 0)
    assert torch.any(h2.cache["layers.1.mlp.out"][0, 3] != 0)


def test_insert_embeddings_prefix_soft_prompt_matches_manual_concat(llama):
    enc = llama.encode("Hello there")
    v = torch.randn(2, llama.structure.hidden_size, generator=torch.Generator().manual_seed(0))
    out = llama.insert_embeddings(enc, v, [0, 0])
    manual = torch.cat([v[None], llama.embed(enc.input_ids[None])], 1)
    torch.testing.assert_close(out["inputs_embeds"], manual)
    assert out["virtual_mask"][0].tolist() == [True, True] + [False] * len(enc)
    assert out["position_ids"][0].tolist() == list(range(len(enc) + 2))
    z = llama.forward(inputs_embeds=out["inputs_embeds"], attention_mask=out["attention_mask"]).logits
    assert z.shape[1] == len(enc) + 2


def test_insert_embeddings_left_padded_batch_and_errors():
    e = torch.arange(2 * 3 * 2, dtype=torch.float32).reshape(2, 3, 2)
    m = torch.tensor([[0, 1, 1], [1, 1, 1]])
    ids = torch.tensor([[9, 1, 2], [3, 4, 5]])
    out = insert_embeddings(e, m, ids, torch.full((1, 2), -1.0), [1], pad_id=9)
    assert out["input_ids"].tolist() == [[9, 1, 9, 2], [3, 9, 4, 5]]
    assert out["attention_mask"].tolist() == [[0, 1, 1, 1], [1, 1, 1, 1]]
    assert out["virtual_mask"].tolist() == [[False, False, True, False], [False, True, False, False]]
    assert out["inputs_embeds"][0, 2].tolist() == [-1.0, -1.0]
    assert out["inputs_embeds"][0, 1].tolist() == e[0, 1].tolist()
    with pytest.raises(ValueError):
        insert_embeddings(e, m, ids, torch.full((1, 2), float("nan")), [1])
    with pytest.raises(ValueError):
        insert_embeddings(e, m, ids, torch.ones(1, 2), [5])


# KV-cache access and eviction tests live in test_kvcache.py


def test_unembed_is_the_logit_lens_identity_for_bert_mlm_head():
    ad = ts.tiny("bert")
    out = ad.forward(ad.encode("hello world"), output_hidden_states=True)
    torch.testing.assert_close(ad.unembed(out.hidden_states[-1]), out.logits)
