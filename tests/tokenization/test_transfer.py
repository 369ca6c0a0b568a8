"""Vocabulary transfer (FVT, OMP, FOCUS-style, random) and bits-per-byte: closed forms on tiny models."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import tokensmith as ts
from tokensmith.tokenization.transfer import (
    _focus_rows,
    bits_per_byte,
    omp,
    plan_transfer,
    sparsemax,
    transfer_embeddings,
)
from tokensmith.tokenization.view import TokenizerView

pytestmark = pytest.mark.usefixtures("torch_one_thread")

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Hello, world! 12345", "naïve café — 😀", "a"]


@pytest.fixture(scope="module")
def smol_view():
    return TokenizerView(ts.tiny("gpt2").tokenizer)


@pytest.fixture(scope="module")
def small_bpe():
    """A 400-token byte-level BPE trained on the fly (with the same end-of-text string as SmolLM2)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bt = Tokenizer(models.BPE())
    bt.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bt.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    corpus = [t * 3 for t in TEXTS] + ["the lazy dog sleeps while the brown fox runs quickly over the hill"] * 5
    bt.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bt, eos_token="<|endoftext|>", pad_token="<pad>")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # untied and tied heads
def test_fvt_onto_identical_tokenizer_is_exact(arch, smol_view):
    ad = ts.tiny(arch, seed=1)
    new = transfer_embeddings(ad, ts.tiny(arch).tokenizer, method="fvt", views=(smol_view, smol_view),
                              validate=False, progress=False)
    assert new.transfer_plan.counts() == {"special": 17, "shared": len(ad.tokenizer) - 17}
    assert torch.equal(new.E, ad.E)
    assert new.tied == ad.tied
    if not ad.tied:
        assert torch.equal(new.W_U, ad.W_U)
    ad.E.data.add_(1.0)  # the copy is independent of the original
    assert not torch.equal(new.E, ad.E)


def test_bits_per_byte_is_token_nll_over_bytes(smol_view):
    ad = ts.tiny("llama", seed=2)
    bpb = bits_per_byte(ad, TEXTS + [""], batch_size=3, view=smol_view, progress=False)
    ctx = ad.tokenizer.eos_token_id if ad.tokenizer.bos_token_id is None else ad.tokenizer.bos_token_id
    nll, n_bytes = 0.0, 0
    for t in TEXTS:  # one at a time, through the adapter's own scoring
        ids = torch.tensor([[ctx] + ad.tokenizer(t, add_special_tokens=False)["input_ids"]])
        nll -= float(ad.token_logprobs(ids).double().sum())
        n_bytes += len(t.encode("utf-8"))
    assert bpb == pytest.approx(nll / math.log(2) / n_bytes, rel=1e-5)
    with pytest.raises(ValueError, match="non-empty"):
        bits_per_byte(ad, [""], view=smol_view, progress=False)
    with pytest.raises(ValueError, match="causal"):
        bits_per_byte(ts.tiny("bert"), ["x"], progress=False)


def test_omp_reproduces_a_member_and_solves_least_squares():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(300, 32, generator=g, dtype=torch.float64)
    idx, c = omp(X[[7, 123]], X, 5)
    rec = torch.einsum("bk,bkd->bd", c, X[idx])
    assert torch.allclose(rec, X[[7, 123]], atol=1e-12)  # t ∈ S: its own row, exactly
    assert idx[0, 0] == 7 and idx[1, 0] == 123
    # a planted 3-sparse combination is recovered; for any y the coefficients are least squares on the support
    y = (2.0 * X[5] - 0.7 * X[40] + 0.3 * X[299])[None]
    idx, c = omp(y, X, 3)
    assert sorted(idx[0].tolist()) == [5, 40, 299]
    y2 = torch.randn(4, 32, generator=g, dtype=torch.float64)
    idx, c = omp(y2, X, 6, batch_size=3)
    for b in range(4):
        A = X[idx[b]].T
        ref = torch.linalg.lstsq(A, y2[b][:, None]).solution[:, 0]
        assert torch.allclose(c[b], ref, atol=1e-10)
        assert len(set(idx[b].tolist())) == 6
    # greedy choice: the first atom is the most correlated one (normalised)
    corr = (y2 @ torch.nn.functional.normalize(X, dim=1).T).abs()
    assert torch.equal(idx[:, 0], corr.argmax(1))


WORDS = ["zqxfoo", " blorptastic"]


@pytest.fixture(scope="module")
def added():
    """The SmolLM2 tokenizer plus two ordinary tokens the old vocabulary lacks, and its view."""
    tok = ts.tiny("llama").tokenizer
    tok.add_tokens(WORDS)
    return tok, TokenizerView(tok)


def test_omp_transfer_applies_donor_coefficients_in_base_space(smol_view, added):
    ad = ts.tiny("llama", seed=3)  # untied: input and head rows both checked
    new_tok, new_view = added
    views = (smol_view, new_view)
    new_ids = new_tok.convert_tokens_to_ids(WORDS)
    E, W = ad.E.detach().double(), ad.W_U.detach().double()
    a, b, c, d = 1000, 2000, 3000, 4000  # shared tokens (ordinary vocabulary ids)
    D_in = torch.cat([E, torch.zeros(2, E.shape[1], dtype=torch.float64)])
    D_out = torch.cat([W, torch.zeros(2, W.shape[1], dtype=torch.float64)])
    D_in[new_ids[0]], D_in[new_ids[1]] = 0.8 * E[a] - 0.5 * E[b], E[c]
    D_out[new_ids[0]], D_out[new_ids[1]] = 0.4 * W[c] + 0.9 * W[d], -W[a]
    new = transfer_embeddings(ad, new_tok, method="omp", donor=(D_in, D_out), k=4, views=views,
                              validate=False, progress=False)
    assert [new.transfer_plan.kind[i] for i in new_ids] == ["decomposed", "decomposed"]
    tol = 1e-6 * float(E.abs().max())
    assert torch.allclose(new.E[new_ids[0]].double(), 0.8 * E[a] - 0.5 * E[b], atol=tol)
    assert torch.allclose(new.E[new_ids[1]].double(), E[c], atol=tol)
    assert torch.allclose(new.W_U[new_ids[0]].double(), 0.4 * W[c] + 0.9 * W[d], atol=tol)
    assert torch.allclose(new.W_U[new_ids[1]].double(), -W[a], atol=tol)
    assert torch.equal(new.E[: len(ad.tokenizer)], ad.E)  # shared rows copied
    with pytest.raises(ValueError, match="donor"):
        transfer_embeddings(ad, new_tok, method="omp", progress=False)


def test_fvt_and_focus_rows_for_new_tokens(smol_view, added):
    ad = ts.tiny("gpt2", seed=4)  # tied
    new_tok, new_view = added
    views = (smol_view, new_view)
    i = new_tok.convert_tokens_to_ids("zqxfoo")
    pieces = ad.tokenizer("zqxfoo", add_special_tokens=False)["input_ids"]
    fvt = transfer_embeddings(ad, new_tok, method="fvt", views=views, validate=False, progress=False)
    assert fvt.transfer_plan.pieces[i] == pieces
    assert torch.allclose(fvt.E[i].detach().double(), ad.E[pieces].detach().double().mean(0), atol=1e-7)
    foc = transfer_embeddings(ad, new_tok, method="focus", views=views, validate=False, progress=False)
    # a convex combination of shared rows with sparsemax weights of cos(FVT vector, E[S])
    E = ad.E.detach().double()
    v = torch.nn.functional.normalize(E[pieces].mean(0), dim=0)
    S = torch.tensor(foc.transfer_plan.shared_old)
    w = sparsemax(torch.nn.functional.normalize(E[S], dim=1) @ v)
    assert float(w.sum()) == pytest.approx(1.0) and (w >= 0).all() and 0 < int((w > 0).sum()) < 100
    assert torch.allclose(foc.E[i].detach().double(), w @ E[S], atol=1e-6)
    # the support fills a too-small top-m window: the row is redone over all shared tokens, same result
    rows, _ = _focus_rows(E, E, foc.transfer_plan, [i], False, top=2)
    assert torch.allclose(rows[0], w @ E[S], atol=1e-6)


def test_sparsemax_is_the_simplex_projection():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(5, 40, generator=g, dtype=torch.float64)
    p = sparsemax(z)
    assert torch.allclose(p.sum(-1), torch.ones(5, dtype=torch.float64)) and (p >= 0).all()
    for b in range(5):  # KKT: p = z − τ on the support, z ≤ τ off it
        sup = p[b] > 0
        tau = (z[b][sup] - p[b][sup]).mean()
        assert torch.allclose(z[b][sup] - p[b][sup], tau.expand(int(sup.sum())), atol=1e-12)
        assert (z[b][~sup] <= tau + 1e-12).all()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_transfer_to_a_smaller_trained_tokenizer(arch, small_bpe, smol_view):
    ad = ts.tiny(arch, seed=5)
    nv = TokenizerView(small_bpe)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # number-splitting note (tested below)
        outs = {m: transfer_embeddings(ad, small_bpe, method=m, seed=0, views=(smol_view, nv), validate=m == "fvt",
                                       progress=False) for m in ("fvt", "focus", "random")}
    for m, new in outs.items():
        assert new.E.shape == (len(small_bpe), ad.structure.hidden_size), m
        assert new.tied == ad.tied
        if ad.tied:
            assert new.W_U.data_ptr() == new.E.data_ptr()
        else:
            assert new.W_U.shape == new.E.shape
        assert math.isfinite(bits_per_byte(new, TEXTS, view=nv, progress=False))
    old_eot = ad.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert torch.equal(outs["fvt"].E[small_bpe.eos_token_id], ad.E[old_eot])  # special by identical string
    assert torch.equal(outs["fvt"].E[small_bpe.pad_token_id], ad.E[ad.tokenizer.pad_token_id])  # by role
    again = transfer_embeddings(ad, small_bpe, method="random", seed=0, views=(smol_view, nv), validate=False,
                                progress=False)
    assert torch.equal(again.E, outs["random"].E)  # seeded
    assert outs["random"].transfer_plan.counts() == {"fallback": len(small_bpe)}


def test_warnings_and_errors(small_bpe, smol_view):
    plan = plan_transfer(ts.tiny("llama").tokenizer, small_bpe, views=(smol_view, TokenizerView(small_bpe)))
    assert any("number splitting" in n for n in plan.notes)  # SmolLM2: single digits; the trained BPE merges them
    ad = ts.tiny("llama")
    with pytest.raises(ValueError, match="unknown method"):
        transfer_embeddings(ad, small_bpe, method="wechsel")
    with pytest.raises(TypeError, match="fast tokenizer"):
        transfer_embeddings(ad, object())
