"""Pure log-prob / KL functions against their formulas."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

from tokensmith.models import gather_logprobs, masked_mean, masked_sum, token_kl
from tokensmith.models.logprobs import shift_target_mask

shapes = st.tuples(st.integers(1, 3), st.integers(1, 6), st.integers(2, 40))


def _logits(shape, seed, scale=5.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=g)).to(dtype)


@settings(max_examples=30, deadline=None)
@given(shapes, st.integers(0, 10_000), st.integers(1, 7))
def test_gather_logprobs_equals_log_softmax_gather(shape, seed, chunk):
    z = _logits(shape, seed)
    g = torch.Generator().manual_seed(seed + 1)
    tgt = torch.randint(0, shape[-1], shape[:-1], generator=g)
    got = gather_logprobs(z, tgt, chunk=chunk)
    ref = torch.log_softmax(z, -1).gather(-1, tgt[..., None])[..., 0]
    assert got.shape == tgt.shape and got.dtype == torch.float32
    assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert (got <= 0).all()


def test_gather_logprobs_half_precision_and_extremes():
    z = torch.tensor([[1000.0, 0.0, -1000.0], [0.0, 0.0, 0.0]])
    tgt = torch.tensor([0, 2])
    got = gather_logprobs(z, tgt)
    assert_close(got, torch.tensor([0.0, -torch.log(torch.tensor(3.0)).item()]))
    assert torch.isfinite(gather_logprobs(z, torch.tensor([2, 0]))).all()  # no log(0) = -inf from softmax().log()
    zb = _logits((4, 50), 0).to(torch.bfloat16)
    t = torch.arange(4)
    assert_close(gather_logprobs(zb, t), torch.log_softmax(zb.float(), -1)[torch.arange(4), t])
    with pytest.raises(ValueError, match="disagree"):
        gather_logprobs(torch.zeros(2, 3, 5), torch.zeros(3, dtype=torch.long))


@settings(max_examples=30, deadline=None)
@given(shapes, st.integers(0, 10_000), st.integers(1, 7))
def test_token_kl_equals_formula(shape, seed, chunk):
    p, q = _logits(shape, seed), _logits(shape, seed + 7)
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(shape[:-1], generator=g) > 0.3
    got = token_kl(p, q, mask=mask, chunk=chunk)
    P, Q = torch.softmax(p.double(), -1), torch.softmax(q.double(), -1)
    ref = (P * (P.log() - Q.log())).sum(-1) * mask
    assert_close(got, ref.float(), atol=1e-5, rtol=1e-4)
    assert (got >= -1e-6).all()
    assert_close(token_kl(p, p), torch.zeros(shape[:-1]), atol=1e-6, rtol=0)


def test_token_kl_shape_mismatch_raises():
    with pytest.raises(ValueError, match="vocabulary"):
        token_kl(torch.zeros(2, 5), torch.zeros(2, 6))


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 4), st.integers(1, 9), st.integers(0, 1000))
def test_masked_reductions_and_shift(B, T, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, generator=g)
    m = torch.rand(B, T, generator=g) > 0.5
    s = masked_sum(x, m)
    mean = masked_mean(x, m)
    for b in range(B):
        sel = x[b][m[b]]
        assert_close(s[b], sel.sum() if sel.numel() else torch.tensor(0.0))
        assert_close(mean[b], sel.mean() if sel.numel() else torch.tensor(0.0))
    keep = shift_target_mask(m)
    assert keep.shape == m.shape and not keep[:, -1].any()
    assert torch.equal(keep[:, :-1], m[:, 1:])


# ------------------------------------------------------------------ adapter: scoring masks and KL (issue 5 §4)
import copy  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402

from hypothesis import HealthCheck  # noqa: E402

import tokensmith as ts  # noqa: E402

EPS32 = torch.finfo(torch.float32).eps
WORDS = ["the", "cat", "sat", "on", "a", "mat", "quantum", "zebra", "!", "42", "hello", "world", ","]


def _fp32_tol(ad) -> float:
    """fp32 unit roundoff x sqrt(depth x width) (error growth of the forward's sums) x a factor 4: the
    absolute tolerance per unit of log-prob magnitude for one fp32 forward against another."""
    s = ad.structure
    return 4 * EPS32 * math.sqrt(s.num_layers * s.hidden_size)


def _alone(ad, item):
    """token_logprobs of one example alone, or the ValueError it raises."""
    try:
        return ad.token_logprobs(ad.encode_batch([item]))[0]
    except ValueError as e:
        return e


example = st.tuples(
    st.lists(st.sampled_from(WORDS), min_size=0, max_size=10),  # prompt words (none: target starts at 0)
    st.one_of(st.none(), st.lists(st.sampled_from(WORDS), min_size=1, max_size=5)),  # target words
).filter(lambda x: x[0] or x[1])


@pytest.mark.usefixtures("torch_one_thread")
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(example, min_size=1, max_size=4))
def test_batch_token_logprobs_equal_each_example_alone(arch, shared_tiny, examples):
    ad = shared_tiny(arch)
    items = []
    for pw, tw in examples:
        prompt = " ".join(pw) or None
        items.append((prompt, " " + " ".join(tw)) if tw else prompt)
    alone = [_alone(ad, it) for it in items]
    failing = [i for i, a in enumerate(alone) if isinstance(a, ValueError)]
    b = ad.encode_batch(items)
    if failing:  # errors included: the batch raises for exactly the rows that raise alone
        with pytest.raises(ValueError, match="first real token.*" + re.escape(f"row(s) {failing};")):
            ad.token_logprobs(b)
        return
    rows = b.unpad(ad.token_logprobs(b))
    tol = _fp32_tol(ad)
    for row, single, ex in zip(rows, alone, b.examples, strict=True):
        assert ((row != 0) == (single != 0)).all()  # same scored tokens
        torch.testing.assert_close(row, single, rtol=tol, atol=tol)
        want = ex.target_mask if ex.target_mask.any() else torch.arange(len(ex)) > 0
        assert ((single != 0) == want).all()


@pytest.mark.usefixtures("torch_one_thread")
def test_mixed_batch_scoring_mask_regressions(shared_tiny):
    ad = shared_tiny("llama")
    no_target = ad.encode("one two three four")
    with_target = ad.encode("A much longer prompt here", target=" ok")
    # a row without a target scores all its real tokens after the first, batched or not (was 0 in a batch)
    b = ad.encode_batch([no_target, with_target])
    assert (ad.token_logprobs(b) != 0).sum(1).tolist() == [len(no_target) - 1, int(with_target.target_mask.sum())]
    # a target at the row's first real token raises in a batch as alone (was scored from a PAD position)
    at0 = ad.encode(None, target="Hello there")
    assert at0.target_mask[0]
    for inputs in (at0, ad.encode_batch([with_target, at0])):
        with pytest.raises(ValueError, match="first real token"):
            ad.token_logprobs(inputs)
    # explicit masks are checked per row too, and may not mark padding
    b = ad.encode_batch([no_target, with_target])
    tm = torch.zeros_like(b.input_ids, dtype=torch.bool)
    tm[0, int(b.pad_offsets[0])] = True
    with pytest.raises(ValueError, match=r"first real token.*row\(s\) \[0\]"):
        ad.token_logprobs(b, tm)
    tm[0] = False
    tm[0, 0] = True
    with pytest.raises(ValueError, match="padding"):
        ad.token_logprobs(b, tm)
    with pytest.raises(ValueError, match="first real token"):
        ad.kl(ad, ad.encode_batch([with_target, at0]))


@pytest.mark.usefixtures("torch_one_thread")
def test_kl_is_differentiable_on_request_and_matches_float64_autograd():
    p, q = ts.tiny("llama", seed=1), ts.tiny("llama", seed=2)  # own models: backward writes .grad
    b = p.encode_batch([("The cat sat", " on the mat"), ("Hello", " there friend of mine")])
    assert not p.kl(q, b).requires_grad  # default: no graph
    p.kl(q, b, grad=True).sum().backward()
    assert all(x.grad is None for x in q.model.parameters())  # other stays frozen unless grad_other
    # float64 reference: full logits of each row alone, KL at the positions predicting target tokens
    p64, q64 = copy.deepcopy(p.model).double(), copy.deepcopy(q.model).double()
    for m in (p64, q64):
        m.zero_grad(set_to_none=True)
    ref = torch.zeros((), dtype=torch.float64)
    for ex in b.examples:
        pos = torch.nonzero(ex.target_mask).flatten() - 1
        lp = torch.log_softmax(p64(input_ids=ex.input_ids[None]).logits[0, pos], -1)
        lq = torch.log_softmax(q64(input_ids=ex.input_ids[None]).logits[0, pos], -1)
        ref = ref + (lp.exp() * (lp - lq)).sum()
    ref.backward()
    # fp32 roundoff x sqrt(depth x width) x log V (the log-prob differences a KL gradient multiplies)
    tol = _fp32_tol(p) * math.log(p.structure.vocab_size)
    got = dict(p.model.named_parameters())
    n_checked = 0
    for name, x in p64.named_parameters():
        if x.grad is None or got[name].grad is None:
            assert x.grad is None or not x.grad.any(), name
            continue
        err = (got[name].grad.double() - x.grad).norm() / x.grad.norm()
        assert err < tol, (name, float(err), tol)
        n_checked += 1
    assert n_checked >= 10
    # grad_other: the graph also reaches the second model
    p.model.zero_grad(set_to_none=True)
    p.kl(q, b, grad=True, grad_other=True).sum().backward()
    assert any(x.grad is not None and x.grad.any() for x in q.model.parameters())
