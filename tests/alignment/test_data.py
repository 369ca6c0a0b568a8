"""Preference pairs encoded jointly (encode_pairs) and their per-token log-probs / KL."""

from __future__ import annotations

import pytest
import torch

from tokensmith.alignment.data import PreferencePair, encode_pairs, pair_kl, pair_logprobs

pytestmark = pytest.mark.usefixtures("torch_one_thread")

PAIRS = [("Why is the sky blue?", "Rayleigh scattering.", "Because it is."),
         ("Name a colour.", "Red", "I will not answer questions about colours.")]


def test_pairs_match_encoding_each_alone_and_score_the_end_of_turn(shared_tiny):
    ad = shared_tiny("llama")
    pb = encode_pairs(ad, PAIRS)
    B = len(PAIRS)
    assert pb.mask_w.shape == pb.mask_l.shape == (B, pb.batch.input_ids.shape[1])
    for i, (p, w, _) in enumerate(PAIRS):
        alone = ad.encode(p, target=w, chat=True, score_eot=True)
        row = pb.batch.input_ids[i][pb.batch.attention_mask[i].bool()]
        assert torch.equal(row, alone.input_ids)
        assert int(pb.mask_w[i].sum()) == int(alone.target_mask.sum())
    # the end-of-turn marker is scored
    im_end = ad.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert bool((pb.batch.input_ids[:B][pb.mask_w] == im_end).any())
    lw, ll = pair_logprobs(ad, pb)
    ref = ad.token_logprobs(pb.batch)
    assert torch.equal(lw, ref[:B]) and torch.equal(ll, ref[B:])
    assert bool((lw[~pb.mask_w] == 0).all()) and bool((lw[pb.mask_w] < 0).all())


def test_pair_kl_is_zero_against_itself_and_positive_otherwise(shared_tiny):
    ad, other = shared_tiny("llama"), shared_tiny("llama", seed=1)
    pb = encode_pairs(ad, [PreferencePair(*PAIRS[0])], chat=False)
    kw, kl = pair_kl(ad, ad, pb)
    assert float(kw.abs().max()) < 1e-5 and float(kl.abs().max()) < 1e-5
    kw, kl = pair_kl(ad, other, pb)
    assert bool((kw[pb.mask_w] > 0).all()) and bool((kw[~pb.mask_w] == 0).all())
    with pytest.raises(ValueError, match="direction"):
        pair_kl(ad, other, pb, direction="nope")


def test_bad_pairs(shared_tiny):
    ad = shared_tiny("llama")
    with pytest.raises(ValueError, match="empty"):
        encode_pairs(ad, [("Hi", "   ", "no")])
    with pytest.raises(ValueError, match="no \\['rejected'\\]"):
        encode_pairs(ad, [{"prompt": "Hi", "chosen": "yes"}])
    with pytest.raises(ValueError, match="no preference pairs"):
        encode_pairs(ad, [])
    with pytest.raises(TypeError, match="expected a PreferencePair"):
        encode_pairs(ad, [42])


def test_fused_logprobs_and_kl_equal_the_separate_calls(shared_tiny):
    from tokensmith.alignment.data import pair_logprobs_and_kl

    ad, other = shared_tiny("llama"), shared_tiny("llama", seed=1)
    pb = encode_pairs(ad, PAIRS)
    f = pair_logprobs_and_kl(ad, other, pb, grad=True)
    lw, ll = pair_logprobs(ad, pb)
    rw, rl = pair_logprobs(other, pb)
    kw, kl = pair_kl(ad, other, pb)
    for got, ref in ((f["policy"], (lw, ll)), (f["reference"], (rw, rl)), (f["kl"], (kw, kl))):
        for g, r in zip(got, ref, strict=True):
            assert torch.allclose(g.detach(), r, atol=2e-5)
    # gradients flow to the policy only, through both the log-probs and the KL
    (f["policy"][0].sum() + f["kl"][1].sum()).backward()
    assert any(p.grad is not None for p in ad.model.parameters())
    assert all(p.grad is None for p in other.model.parameters())
    ad.model.zero_grad(set_to_none=True)
