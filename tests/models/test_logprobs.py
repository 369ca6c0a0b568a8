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
