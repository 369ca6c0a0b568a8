"""Multi-token prediction: the loss against float64 loops and next-token CE; self-speculative decoding equals
plain greedy decoding with bad, identity and oracle heads."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import tokensmith as ts
from tokensmith.models import heads as H
from tokensmith.optimization.training.mtp import (
    MTPHead,
    SpeculativeResult,
    add_mtp_heads,
    mtp_heads,
    mtp_loss,
    multi_token_loss,
    self_speculative_generate,
)

pytestmark = pytest.mark.usefixtures("torch_one_thread")

_CACHE: dict[str, ts.ModelAdapter] = {}


def _tiny(arch: str) -> ts.ModelAdapter:
    """A tiny adapter owned by this module (heads are attached to it; removed after every test)."""
    if arch not in _CACHE:
        _CACHE[arch] = ts.tiny(arch, seed=0)
    return _CACHE[arch]


@pytest.fixture(autouse=True)
def _no_leftover_heads():
    yield
    for ad in _CACHE.values():
        for name in list(H.heads(ad)):
            H.remove_head(ad, name)
        ad.model.zero_grad(set_to_none=True)


CAUSAL = ["gpt2", "llama", "qwen2", "gemma3", "gpt_neox"]
EPS32 = torch.finfo(torch.float32).eps


@torch.no_grad()
def _loop_reference(h, heads, W, ids, tm, am):
    """float64 loop over heads and positions: Σ_i mean_{(b,t) valid} −log softmax(W·head_i(h_bt))[x_{b,t+i}]."""
    B, T, _ = h.shape
    total = torch.zeros((), dtype=torch.float64)
    per = []
    for i, head in enumerate(heads, start=1):
        terms = []
        for b in range(B):
            for t in range(T - i):
                if am[b, t] and tm[b, t + i]:
                    x = h[b, t].double()
                    x = x if head is None else head(x[None])[0]
                    z = W.double() @ x
                    terms.append(-(z[ids[b, t + i]] - torch.logsumexp(z, 0)))
        li = torch.stack(terms).mean() if terms else torch.zeros((), dtype=torch.float64)
        per.append(li)
        total = total + li
    return total, torch.stack(per)


@settings(max_examples=10, deadline=None)
@given(
    B=st.integers(1, 3),
    T=st.integers(1, 7),
    n=st.integers(1, 4),
    chunk=st.integers(1, 9),
    seed=st.integers(0, 2**16),
)
def test_loss_equals_float64_loop(B, T, n, chunk, seed):
    g = torch.Generator().manual_seed(seed)
    d, V = 6, 11
    h = torch.randn(B, T, d, generator=g)
    W = torch.randn(V, d, generator=g)
    ids = torch.randint(0, V, (B, T), generator=g)
    tm = torch.rand(B, T, generator=g) < 0.7
    am = torch.ones(B, T, dtype=torch.bool)
    for b in range(B):  # left padding of random length
        am[b, : int(torch.randint(0, T, (1,), generator=g))] = False
    heads = [None] + [MTPHead(d, 5, offset=i + 2, zero_init=False, seed=seed + i) for i in range(n - 1)]
    heads64 = [None] + [copy.deepcopy(m).double() for m in heads[1:]]
    loss, per = multi_token_loss(
        h, heads, lambda x: x @ W.T, ids, tm, attention_mask=am, chunk=chunk, return_per_head=True
    )
    ref, ref_per = _loop_reference(h, heads64, W, ids, tm, am)
    tol = 64 * EPS32 * max(1.0, float(ref_per.detach().abs().max())) * n
    assert abs(float(loss.detach()) - float(ref)) <= tol
    assert torch.allclose(per.double(), ref_per, atol=tol, rtol=0)


def test_loss_gradients_and_chunking():
    g = torch.Generator().manual_seed(0)
    B, T, d, V, n = 2, 6, 5, 13, 3
    h = torch.randn(B, T, d, generator=g, requires_grad=True)
    W = torch.randn(V, d, generator=g, requires_grad=True)
    ids = torch.randint(0, V, (B, T), generator=g)
    heads = [None] + [MTPHead(d, 4, offset=i + 2, zero_init=False, seed=i) for i in range(n - 1)]
    seen: list[int] = []

    def unembed(x):
        seen.append(x.shape[0])
        return x @ W.T

    params = [h, W, *[p for m in heads[1:] for p in m.parameters()]]
    grads = {}
    for chunk in (1, 4, 1000):
        seen.clear()
        loss = multi_token_loss(h, heads, unembed, ids, chunk=chunk)
        assert max(seen) <= chunk  # never more than `chunk` rows of logits at once
        grads[chunk] = (float(loss.detach()), torch.autograd.grad(loss, params))
    # one direct computation with full [N, V] logits per head, as the independent reference
    direct = 0.0
    for i, head in enumerate(heads, start=1):
        x = h[:, : T - i].reshape(-1, d)
        x = x if head is None else head(x)
        direct = direct + nn.functional.cross_entropy(x @ W.T, ids[:, i:].reshape(-1))
    ref = torch.autograd.grad(direct, params)
    for chunk, (lv, gs) in grads.items():
        assert math.isclose(lv, float(direct.detach()), rel_tol=1e-6), chunk
        for a, r in zip(gs, ref, strict=True):
            assert torch.allclose(a, r, atol=1e-6 + 1e-5 * float(r.abs().max()), rtol=0), chunk


def test_masked_positions_do_not_contribute():
    g = torch.Generator().manual_seed(1)
    B, T, d, V = 2, 7, 4, 9
    W = torch.randn(V, d, generator=g)
    h = torch.randn(B, T, d, generator=g, requires_grad=True)
    ids = torch.randint(0, V, (B, T), generator=g)
    heads = [None, MTPHead(d, 4, zero_init=False, seed=2), MTPHead(d, 4, offset=3, zero_init=False, seed=3)]
    am = torch.ones(B, T, dtype=torch.bool)
    am[1, :3] = False  # row 1: 3 pads
    tm = am.clone()
    tm[0, 5] = False  # an unscored target
    un = lambda x: x @ W.T  # noqa: E731
    loss = multi_token_loss(h, heads, un, ids, tm, attention_mask=am)
    # changing what sits at masked targets or padded sources changes nothing
    ids2 = ids.clone()
    ids2[0, 5] = (ids2[0, 5] + 1) % V
    ids2[1, :3] = (ids2[1, :3] + 1) % V
    h2 = h.detach().clone()
    h2[1, :3] += 100.0
    assert torch.equal(multi_token_loss(h2, heads, un, ids2, tm, attention_mask=am), loss.detach())
    (gh,) = torch.autograd.grad(loss, [h])
    assert float(gh[1, :3].abs().max()) == 0.0  # padding sources get no gradient
    assert float(gh[:, -1].abs().max()) == 0.0  # the last position has no target past the end
    assert float(gh[0, -3].abs().max()) > 0  # ... the third-last still predicts t+1 and t+2
    # a head whose offset exceeds the sequence contributes 0
    short = h[:, :2]
    l_short, per = multi_token_loss(short, heads, un, ids[:, :2], return_per_head=True)
    assert float(per[1]) == 0.0 and float(per[2]) == 0.0 and float(l_short.detach()) == float(per[0]) > 0


@pytest.mark.parametrize("arch", CAUSAL)
def test_one_head_equals_next_token_ce(arch):
    ad = _tiny(arch)
    batch = ad.encode_batch([("Hello there", " general Kenobi"), ("A", " b c d e f")])  # left-padded
    last = f"layers.{ad.structure.num_layers - 1}.resid_post"
    with torch.no_grad(), ad.hooks(cache=last) as hk:
        ad.forward(batch)
    lp = ad.token_logprobs(batch)
    ce = -lp[batch.target_mask].mean()
    loss = multi_token_loss(
        hk.cache[last],
        [None],
        ad.unembed,
        batch.input_ids,
        batch.target_mask,
        attention_mask=batch.attention_mask,
        chunk=3,
    )
    assert loss.requires_grad  # the unembedding's parameters are trainable
    loss = loss.detach()
    assert abs(float(loss) - float(ce)) <= 64 * EPS32 * max(1.0, float(ce))


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_mtp_loss_on_adapter(arch):
    ad = _tiny(arch)
    heads = add_mtp_heads(ad, 2, zero_init=False, seed=4)
    assert [h.name for h in mtp_heads(ad)] == ["mtp2", "mtp3"]
    batch = ad.encode_batch(["The cat sat on the mat today", "Short one"])
    last = f"layers.{ad.structure.num_layers - 1}.resid_post"
    loss, per = mtp_loss(ad, batch, return_per_head=True)
    with torch.no_grad(), ad.hooks(cache=last) as hk:
        ad.forward(batch)
    ref, ref_per = multi_token_loss(
        hk.cache[last],
        [None, *heads],
        ad.unembed,
        batch.input_ids,
        batch.attention_mask,
        attention_mask=batch.attention_mask,
        return_per_head=True,
    )
    assert torch.allclose(per, ref_per, atol=1e-5) and abs(float(loss.detach()) - float(ref.detach())) < 1e-5
    # head 1 is the model's own next-token CE over every real token after the first
    ce = -ad.token_logprobs(batch)
    mask = batch.attention_mask.bool().clone()
    mask[torch.arange(2), batch.pad_offsets] = False
    assert abs(float(per[0]) - float(ce[mask].mean())) < 1e-5
    loss.backward()
    for hd in heads:
        assert all(p.grad is not None and float(p.grad.abs().max()) > 0 for p in hd.parameters())
    assert ad.structure.embed.weight.grad is not None  # the trunk is trained too


def test_add_mtp_heads_zero_init_is_the_model_head():
    ad = _tiny("qwen2")
    heads = add_mtp_heads(ad, 2, hidden_layer=-1)
    batch = ad.encode_batch(["one two three"])
    with torch.no_grad(), H.capture(ad) as out:
        logits = ad.forward(batch).logits
    for hd in heads:
        assert torch.allclose(ad.unembed(out[f"mtp{hd.offset}"]), logits, atol=1e-5)
    for name in list(H.heads(ad)):
        H.remove_head(ad, name)
    ad2 = ad
    add_mtp_heads(ad2, 1, hidden_layer=0, prefix="m")
    assert H.heads(ad2)["m2"].at == "layers.0.resid_post"
    with pytest.raises(ValueError, match="n must be"):
        add_mtp_heads(ad2, 0)
    with pytest.raises(ValueError, match="causal"):
        add_mtp_heads(ts.tiny("bert"), 1)


def test_loss_errors():
    h, ids = torch.zeros(1, 3, 4), torch.zeros(1, 3, dtype=torch.long)
    un = lambda x: x  # noqa: E731
    with pytest.raises(ValueError, match="empty"):
        multi_token_loss(h, [], un, ids)
    with pytest.raises(ValueError, match="n=3"):
        multi_token_loss(h, [None], un, ids, n=3)
    with pytest.raises(ValueError, match="input_ids"):
        multi_token_loss(h, [None], un, ids[:, :2])
    with pytest.raises(TypeError, match="integer"):
        multi_token_loss(h, [None], un, ids.float())
    with pytest.raises(ValueError, match="weights"):
        multi_token_loss(h, [None], un, ids, weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="chunk"):
        multi_token_loss(h, [None], un, ids, chunk=0)
    with pytest.raises(TypeError, match="callable"):
        multi_token_loss(h, [3], un, ids)  # type: ignore[list-item]


# -- self-speculative decoding ------------------------------------------------------------------------------
PROMPTS = ["Once upon a time", "The", "1 2 3 4 5 6"]
NEW = 14


class Oracle(nn.Module):
    """Knows the base model's greedy future: head_i(h_p) = h_{p+i-1} of the full greedy sequence, whose
    unembedding the base model argmaxes to its greedy token x_{p+i}. The position is recovered as the nearest
    stored trunk state."""

    def __init__(self, H_full: torch.Tensor, offset: int):
        super().__init__()
        self.register_buffer("H_full", H_full)
        self.offset = offset

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        p = int(torch.cdist(h.reshape(1, -1), self.H_full).argmin())
        return self.H_full[min(p + self.offset - 1, self.H_full.shape[0] - 1)][None]


_GREEDY: dict[tuple, torch.Tensor] = {}


def _greedy(ad, prompt, new=NEW):
    """Plain greedy decoding (adapter.generate), memoised per adapter, prompt, budget and EOS."""
    key = (ad, prompt, new, ad.tokenizer.eos_token_id)  # the adapter object itself: kept alive, no id reuse
    if key not in _GREEDY:
        _GREEDY[key] = ad.generate(prompt, max_new_tokens=new, do_sample=False).new_tokens[0]
    return _GREEDY[key]


def _check(res: SpeculativeResult, ad, prompt, new=NEW):
    want = _greedy(ad, prompt, new)
    assert torch.equal(res.new_tokens[0], want), (prompt, res.new_tokens[0].tolist(), want.tolist())
    assert res.forward_calls[0] == 1 + len(res.accepted[0])
    assert all(0 <= a <= k for a, k in zip(res.accepted[0], res.drafted[0], strict=True))
    assert len(want) <= 1 + sum(a + 1 for a in res.accepted[0])


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_self_speculative_equals_greedy(arch):
    ad = _tiny(arch)
    n = 3
    # random (bad) heads: few drafts accepted, output identical
    bad = add_mtp_heads(ad, n, zero_init=False, seed=7, prefix="bad")
    rates = []
    for prompt in PROMPTS:
        res = self_speculative_generate(
            ad, prompt, NEW, heads=[f"bad{i}" for i in range(2, n + 2)], progress=False
        )
        _check(res, ad, prompt)
        rates.append(res.acceptance_rate)
    assert sum(rates) / len(rates) < 0.5
    # identity (zero-init) heads draft the next token again: output identical
    add_mtp_heads(ad, n, prefix="id")
    for prompt in PROMPTS[:2]:
        _check(
            self_speculative_generate(ad, prompt, NEW, heads=["id2", "id3", "id4"], progress=False),
            ad,
            prompt,
        )
    # oracle heads: every draft accepted, ~NEW / (n + 1) forwards
    last = f"layers.{ad.structure.num_layers - 1}.resid_post"
    for prompt in PROMPTS:
        full = ad.generate(prompt, max_new_tokens=NEW + n + 1).sequences  # the greedy future beyond NEW too
        with torch.no_grad(), ad.hooks(cache=last) as hk:
            ad.forward(full)
        names = []
        for i in range(2, n + 2):
            H.add_head(ad, f"or{i}", Oracle(hk.cache[last][0], i), at=last, replace=True)
            names.append(f"or{i}")
        res = self_speculative_generate(ad, prompt, NEW, heads=names, progress=False)
        _check(res, ad, prompt)
        assert res.acceptance_rate == 1.0
        assert res.forward_calls[0] == 1 + math.ceil((NEW - 1) / (n + 1))
        assert res.tokens_per_call == NEW / res.forward_calls[0] > 2.5
    assert len(bad) == n


def test_self_speculative_batch_rows_and_stop_at_eos():
    ad = ts.tiny("llama", seed=0)
    add_mtp_heads(ad, 2, zero_init=False, seed=3)
    batch = ad.encode_batch(PROMPTS[:3])  # left-padded: rows decoded one after another
    res = self_speculative_generate(ad, batch, 9, progress=False)
    assert len(res.new_tokens) == 3
    for b, prompt in enumerate(PROMPTS[:3]):
        assert torch.equal(res.new_tokens[b], _greedy(ad, prompt, 9))
        assert torch.equal(res.sequences[b][: -len(res.new_tokens[b])], ad.encode(prompt).input_ids)
    assert res.texts[0] == ad.tokenizer.decode(res.new_tokens[0], skip_special_tokens=True)
    # make a token the greedy path emits the EOS: both stop there, EOS kept
    free = _greedy(ad, PROMPTS[0], NEW)
    stop = int(free[4])
    ad.tokenizer.eos_token = ad.tokenizer.convert_ids_to_tokens(stop)
    want = _greedy(ad, PROMPTS[0], NEW)
    assert int(want[-1]) == stop and len(want) < NEW
    got = self_speculative_generate(ad, PROMPTS[0], NEW, progress=False)
    assert torch.equal(got.new_tokens[0], want)


def test_self_speculative_sliding_window_rollback():
    """Gemma-3 (sliding window 16): prompt + generation roll the window; rejected drafts are rolled back."""
    ad = _tiny("gemma3")
    add_mtp_heads(ad, 3, zero_init=False, seed=5)
    prompt = "one two three four five six seven eight nine ten eleven"
    res = self_speculative_generate(ad, prompt, 20, progress=False)
    assert len(ad.encode(prompt).input_ids) + 20 > ad.config.sliding_window
    _check(res, ad, prompt, 20)
    assert sum(res.drafted[0]) > sum(res.accepted[0])  # some drafts were rejected (and rolled back)


def test_no_heads_is_plain_greedy_and_errors():
    ad = _tiny("llama")
    res = self_speculative_generate(ad, "Hello", 5, heads=[], progress=False)
    assert torch.equal(res.new_tokens[0], _greedy(ad, "Hello", 5)) and res.forward_calls[0] == 5

    # outputs="logits": a head returning logits itself (here the model's own next-token logits, i.e. it drafts
    # "the same token again")
    class OwnLogits(nn.Module):
        def forward(self, h):
            return ad.unembed(h)

    last = f"layers.{ad.structure.num_layers - 1}.resid_post"
    H.add_head(ad, "own", OwnLogits(), at=last)
    res = self_speculative_generate(ad, "Hello", 5, heads=["own"], outputs="logits", progress=False)
    assert torch.equal(res.new_tokens[0], _greedy(ad, "Hello", 5)) and res.drafted[0][0] == 1
    with pytest.raises(ValueError, match="max_new_tokens"):
        self_speculative_generate(ad, "Hello", 0)
    with pytest.raises(ValueError, match="outputs"):
        self_speculative_generate(ad, "Hello", 3, heads=[], outputs="probs")
    with pytest.raises(ValueError, match="not attached"):
        self_speculative_generate(ad, "Hello", 3, heads=[MTPHead(ad.structure.hidden_size)])
    with pytest.raises(ValueError, match="no extra heads"):
        mtp_loss(ad, "Hello")
