"""Under-trained token detection (Land & Bartolo 2024): indicators on constructed weights, verification
probabilities against an independent softmax, errors for models that cannot be scored."""

from __future__ import annotations

import pytest
import torch

import tokensmith as ts
from tokensmith.tokenization.undertrained import (
    RepeatTemplate,
    _remove_principal,
    find_undertrained_tokens,
    impossible_utf8,
    indicator_scores,
    repeat_probabilities,
    reserved_special_tokens,
)

pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def smol_view():
    """The view of the SmolLM2 tokenizer that every tiny decoder uses (categories computed once)."""
    from tokensmith.tokenization.view import TokenizerView

    return TokenizerView(ts.tiny("gpt2").tokenizer)

GLITCH = [101, 2048, 3071, 9000, 12345, 20001, 30303, 40404, 45000, 49000]


def _plant(adapter: ts.ModelAdapter, ids: list[int], seed: int = 0) -> None:
    """Set rows ``ids`` of the (un)embedding to one shared vector + tiny noise: the under-trained pattern."""
    g = torch.Generator().manual_seed(seed)
    d = adapter.structure.hidden_size
    v = torch.randn(d, generator=g) * adapter.W_U.detach().std()
    rows = v + 1e-4 * torch.randn(len(ids), d, generator=g)
    adapter.set_embeddings(ids, rows, None if adapter.tied else rows.clone())


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # untied and tied heads
def test_planted_rows_are_found_first(arch, smol_view):
    ad = ts.tiny(arch, seed=3)
    _plant(ad, GLITCH)
    ref = GLITCH[:3]
    rep = find_undertrained_tokens(ad, verify=False, reference=ref, top_k=len(GLITCH),
                                   view=smol_view, progress=False)
    assert rep.flagged_ids() == sorted(GLITCH)
    assert set(rep.frame["id"].head(len(GLITCH))) == set(GLITCH)
    # a random row's cosine to the reference mean is ~0 in 64 dims; planted rows are ~1
    top = rep.frame.set_index("id").loc[GLITCH, "unembed_cosine"]
    assert (top > 0.99).all()
    # the report feeds the search mask as an exclusion
    mask = rep.allowed_token_mask(ad)
    assert not mask[GLITCH].any() and mask.sum() == ad.allowed_token_mask().sum() - len(GLITCH)


def test_principal_component_removed():
    g = torch.Generator().manual_seed(0)
    U = torch.randn(200, 8, generator=g, dtype=torch.float64) @ torch.diag(torch.tensor([9.0, 5, 3, 1, 1, 1, 1, 1]).double())
    U = U + 4.0  # a shared offset too
    Up = _remove_principal(U, 2)
    Uc = U - U.mean(0)
    _, vecs = torch.linalg.eigh(Uc.T @ Uc)
    P = vecs[:, -2:]
    assert torch.allclose((Up - Up.mean(0)) @ P, torch.zeros(200, 2, dtype=torch.float64), atol=1e-10)
    # nothing else changes: the part orthogonal to P is kept
    Q = vecs[:, :-2]
    assert torch.allclose(Up @ Q, U @ Q, atol=1e-10)


def test_repeat_probability_is_batched_softmax():
    ad = ts.tiny("llama", seed=1)
    ids = [5, 300, 4242, 17, 49151]
    tmpl = (RepeatTemplate("Copy: x -> x\nCopy: {token}", " ->"), RepeatTemplate("Say '{token}'", "'", chat=True))
    p_batched = repeat_probabilities(ad, ids, templates=tmpl, batch_size=3, progress=False)
    p_single = torch.cat([repeat_probabilities(ad, [i], templates=tmpl, batch_size=1, progress=False) for i in ids])
    assert p_batched.shape == (5, 2)
    assert torch.allclose(p_batched, p_single, rtol=1e-5, atol=1e-9)
    # independent check: softmax of the full logits of the same id sequence at its last position
    tok = ad.tokenizer
    pre, post = tok("Copy: x -> x\nCopy: ", add_special_tokens=False)["input_ids"], tok(" ->", add_special_tokens=False)["input_ids"]
    for k, i in enumerate(ids):
        row = torch.tensor([pre + [i] + post])
        logits = ad.logits(row)[0, -1].double()
        want = torch.softmax(logits, -1)[i]
        assert abs(float(p_batched[k, 0]) - float(want)) <= 1e-5 * float(want) + 1e-9
    assert ((p_batched >= 0) & (p_batched <= 1)).all()


def test_verification_flags_low_probabilities(smol_view):
    ad = ts.tiny("gpt2", seed=2)
    tmpl = (RepeatTemplate("{token}", " again:"),)
    rep = find_undertrained_tokens(ad, candidates=[10, 20, 30], reference=[1, 2], templates=tmpl, threshold=0.5,
                                   view=smol_view, progress=False)
    f = rep.frame.set_index("id")
    p = repeat_probabilities(ad, [10, 20, 30], templates=tmpl, progress=False)[:, 0].numpy()
    assert f.loc[[10, 20, 30], "verified_prob"].tolist() == pytest.approx(p.tolist())
    assert rep.flagged_ids() == [10, 20, 30]  # a random tiny model repeats nothing with p >= 0.5
    assert f["verified_prob"].notna().sum() == 3


def test_errors_for_models_that_cannot_be_scored(smol_view):
    enc = ts.load("minilm-l6")  # sentence encoder, no LM head
    with pytest.raises(ValueError, match="LM head"):
        find_undertrained_tokens(enc, progress=False)
    mlm = ts.tiny("bert")  # masked LM: indicators work, prompting does not
    with pytest.raises(ValueError, match="verify=False"):
        find_undertrained_tokens(mlm, progress=False)
    with pytest.raises(ValueError, match="causal"):
        repeat_probabilities(mlm, [5], progress=False)
    with pytest.raises(ValueError, match="empty"):
        indicator_scores(mlm, [])
    rep = find_undertrained_tokens(mlm, verify=False, reference=[100, 101], top_k=5, progress=False)
    assert len(rep.flagged_ids()) == 5
    with pytest.raises(ValueError, match="top_k"):
        find_undertrained_tokens(ts.tiny("gpt2"), top_k=0, view=smol_view, progress=False)


def test_impossible_utf8_and_reserved_specials():
    assert impossible_utf8(b"\xff") and impossible_utf8(b"\xc0") and impossible_utf8(b"\x80\x80\x80\x80")
    assert impossible_utf8(b"\xc3\xc3")  # a lead byte where a continuation must follow
    assert not impossible_utf8("é".encode()[1:]) and not impossible_utf8("😀".encode()[:3])
    assert not impossible_utf8(b"abc")
    tok = ts.tiny("llama").tokenizer  # the SmolLM2 tokenizer
    names = tok.convert_ids_to_tokens(reserved_special_tokens(tok))
    assert "<file_sep>" in names and "<jupyter_code>" in names
    assert "<|im_start|>" not in names and "<|im_end|>" not in names and "<|endoftext|>" not in names
