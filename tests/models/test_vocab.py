"""Vocabulary helpers: allowed-token mask, nearest tokens, soft embeddings."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

from tokensmith.models import allowed_token_mask, nearest_tokens, soft_embed

pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_allowed_mask_excludes_special_added_and_padding_rows(arch, shared_tiny):
    tok = copy.deepcopy(shared_tiny(arch).tokenizer)
    tok.add_tokens(["<my_marker>"])  # a plain (non-special) added token
    n = len(tok)
    extra = 8  # embedding rows beyond the tokenizer (padded vocab)
    m = allowed_token_mask(tok, n + extra)
    assert m.shape == (n + extra,) and m.dtype == torch.bool
    bad = set(tok.all_special_ids) | set(tok.added_tokens_decoder)
    assert tok.convert_tokens_to_ids("<my_marker>") in bad
    expected = torch.tensor([i < n and i not in bad for i in range(n + extra)])
    assert torch.equal(m, expected)
    keep_special = allowed_token_mask(tok, n + extra, allow_special=True)
    assert keep_special[:n].all() and not keep_special[n:].any()
    blocked = allowed_token_mask(tok, n, blocklist=[500, 501, n + 100])
    assert not blocked[500] and not blocked[501] and blocked.sum() == m.sum() - 2
    assert allowed_token_mask(tok, 100).shape == (100,)  # fewer rows than the tokenizer


def test_allowed_mask_ascii_and_round_trip(shared_tiny):
    ad = shared_tiny("llama")
    tok = ad.tokenizer
    base = ad.allowed_token_mask()
    asc = ad.allowed_token_mask(ascii_only=True)
    rt = ad.allowed_token_mask(round_trip=True)
    assert not (asc & ~base).any() and not (rt & ~base).any()
    assert 0 < asc.sum() < base.sum() and 0 < rt.sum() < base.sum()
    g = torch.Generator().manual_seed(0)
    for ids, want in ((torch.nonzero(asc).flatten(), True), (torch.nonzero(base & ~asc).flatten(), False)):
        for i in ids[torch.randperm(len(ids), generator=g)[:100]].tolist():
            s = tok.decode([i])
            assert (s.isascii() and s.isprintable() and s.strip() != "") is want, (i, s)
    for ids, want in ((torch.nonzero(rt).flatten(), True), (torch.nonzero(base & ~rt).flatten(), False)):
        for i in ids[torch.randperm(len(ids), generator=g)[:50]].tolist():
            assert (tok.encode(tok.decode([i]), add_special_tokens=False) == [i]) is want, i


@settings(max_examples=20, deadline=None)
@given(st.lists(st.integers(17, 49151), min_size=1, max_size=6, unique=True), st.floats(0.1, 10.0))
def test_nearest_tokens_of_embedding_rows_are_their_ids(ids, scale):
    E = _E()
    ids_t = torch.tensor(ids)
    assert nearest_tokens(E[ids_t] * scale, E).tolist() == ids
    allowed = torch.ones(E.shape[0], dtype=torch.bool)
    allowed[ids_t] = False
    other = nearest_tokens(E[ids_t], E, allowed)
    assert not torch.isin(other, ids_t).any()
    # the masked answer is the cosine-argmax over the allowed rows
    En = torch.nn.functional.normalize(E, dim=-1)
    cos = torch.nn.functional.normalize(E[ids_t], dim=-1) @ En.T
    cos[:, ~allowed] = -2
    assert other.tolist() == cos.argmax(-1).tolist()


_E_CACHE: list[torch.Tensor] = []


def _E() -> torch.Tensor:
    if not _E_CACHE:
        import tokensmith as ts

        _E_CACHE.append(ts.tiny("llama").E.detach().clone())
    return _E_CACHE[0]


def test_adapter_nearest_tokens_and_soft_embed(shared_tiny):
    ad = shared_tiny("gemma3")  # embedding scale sqrt(64)
    ids = torch.tensor([100, 2000, 30000])
    assert ad.nearest_tokens(ad.embed(ids)).tolist() == ids.tolist()
    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, ad.structure.vocab_size, generator=g)
    top = z.argmax(-1)
    z[torch.arange(3), top] += 0.05  # margin over the runner-up
    assert_close(ad.soft_embed(z, tau=1e-4), ad.embed(top), atol=1e-5, rtol=1e-5)  # includes the sqrt(d) scale
    assert (ad.soft_embed(z, tau=1.0) - ad.embed(top)).abs().max() > 1e-2
    assert_close(soft_embed(z, ad.E, tau=2.0), torch.softmax(z / 2.0, -1) @ ad.E, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="tau"):
        soft_embed(z, ad.E, tau=0.0)


@settings(max_examples=15, deadline=None)
@given(st.integers(0, 1000))
def test_soft_embed_approaches_the_argmax_row_as_tau_shrinks(seed):
    E = _E()[:500]
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(4, 500, generator=g)
    top = z.argmax(-1)
    z[torch.arange(4), top] += 0.05  # a margin of >= 0.05 over the runner-up
    target = E[top]
    taus = (1.0, 0.1, 0.01, 1e-3, 1e-4)
    errs = [(soft_embed(z, E, tau) - target).abs().max().item() for tau in taus]
    for tau, err in zip(taus, errs, strict=True):
        # |softmax(z/tau) E - E_top| <= 2 max|E| (1 - p_top(tau))
        p_top = torch.softmax(z / tau, -1)[torch.arange(4), top].min().item()
        assert err <= 2 * E.abs().max().item() * (1 - p_top) + 1e-6
    assert errs[-1] < 1e-6
    assert errs[0] > errs[-1]
