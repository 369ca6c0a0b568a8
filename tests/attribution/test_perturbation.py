"""Perturbation attributions against explicit forwards, and the Shapley efficiency axiom."""

from __future__ import annotations

import pytest
import torch

from tokensmith.attribution import attribute, prepare

PROMPT, TARGET = "The capital of France is", " Paris is nice"


@pytest.fixture(autouse=True, scope="module")
def _one_thread(torch_one_thread):
    yield


def _row_logprobs(ad, ids: list[int], positions: list[int]) -> list[float]:
    x = torch.tensor([ids])
    tm = torch.zeros_like(x, dtype=torch.bool)
    tm[0, positions] = True
    lp = ad.token_logprobs(x, tm)[0]
    return [float(lp[p]) for p in positions]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_leave_one_out_equals_explicit_deletion_forwards(arch, shared_tiny):
    ad = shared_tiny(arch)
    r = attribute(ad, PROMPT, target=TARGET, method="loo")
    ids = r.ids.tolist()
    tp = r.target_positions.tolist()
    full = _row_logprobs(ad, ids, tp)
    for i in range(len(ids)):
        rest = ids[:i] + ids[i + 1:]
        for t, p in enumerate(tp):
            if not r.valid[t, i]:
                assert r.scores[t, i] == 0
                continue
            q = p - 1 if i < p else p  # the row's token moves one left when an earlier token is deleted
            want = full[t] - _row_logprobs(ad, rest, [q])[0]
            assert abs(float(r.scores[t, i]) - want) < 1e-4, (t, i)


def test_replacement_occlusion_and_word_features(shared_tiny):
    ad = shared_tiny("llama")
    r = attribute(ad, PROMPT, target=TARGET, method="occlusion", baseline="pad")
    ids, tp = r.ids.tolist(), r.target_positions.tolist()
    full = _row_logprobs(ad, ids, tp)
    i = 2
    mod = list(ids)
    mod[i] = ad.pad_token_id
    assert abs(float(r.scores[0, i]) - (full[0] - _row_logprobs(ad, mod, [tp[0]])[0])) < 1e-4
    w = attribute(ad, "Unbelievably good results", target=" indeed", method="occlusion", features="words")
    groups = w.extra["groups"]
    assert any(len(g) > 1 for g in groups)  # a multi-token word was removed as one feature
    agg = w.aggregate("words")
    # the group effect is split equally over its tokens, so aggregating by words gives it back
    for g in groups:
        vals = w.scores[0, g]
        assert torch.allclose(vals, vals[0].expand_as(vals))
    assert agg.shape[1] < w.shape[1]


def test_shapley_sampling_is_efficient(shared_tiny):
    ad = shared_tiny("llama")
    r = attribute(ad, PROMPT, target=TARGET, method="shapley", n_permutations=3, baseline="pad", seed=1)
    # sum_g phi_g = f(x) - f(all features removed), exactly, on every row
    torch.testing.assert_close(r.scores.sum(-1).double(), (r.target_scores - r.baseline_scores).double(),
                               atol=2e-5, rtol=0)
    again = attribute(ad, PROMPT, target=TARGET, method="shapley", n_permutations=3, baseline="pad", seed=1)
    assert torch.equal(r.scores, again.scores) and r.seed == 1
    # players are the prompt tokens: continuation tokens get no Shapley value
    first = int(r.target_positions.min())
    assert not r.valid[:, first:].any()


def test_perturbation_micro_batching_gives_the_same_numbers(shared_tiny):
    ad = shared_tiny("llama")
    a = attribute(ad, PROMPT, target=TARGET, method="loo")
    b = attribute(ad, PROMPT, target=TARGET, method="loo", batch_size=2)
    torch.testing.assert_close(a.scores, b.scores, atol=1e-5, rtol=0)


def test_occlusion_on_a_model_that_refuses_left_padding_uses_replacement():
    """Deletion batches are left-padded; a model that cannot take that raises the adapter's clear error,
    and replacement baselines (no padding) still work."""
    import transformers

    from tokensmith.models import ModelAdapter
    from tokensmith.models.zoo import smollm2_tokenizer

    tok = smollm2_tokenizer(copy=True)
    cfg = transformers.BartConfig(vocab_size=len(tok), d_model=32, decoder_layers=2, encoder_layers=2,
                                  decoder_attention_heads=2, encoder_attention_heads=2, decoder_ffn_dim=64,
                                  encoder_ffn_dim=64, max_position_embeddings=64, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    ad = ModelAdapter(transformers.BartForCausalLM(cfg).eval(), tok)
    with pytest.raises(ValueError, match="left-padded"):
        attribute(ad, PROMPT, target=TARGET, method="loo")
    r = attribute(ad, PROMPT, target=TARGET, method="occlusion", baseline="pad")
    assert r.valid.any()
    assert prepare(ad, PROMPT, TARGET).n_rows == r.shape[0]
