"""token_kl under autograd: the memory-lean backward (recompute per chunk) against float64 autograd."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from tokensmith.models import token_kl

EPS32 = torch.finfo(torch.float32).eps


def _logits(shape, seed, scale=4.0):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(*shape, generator=g)


def _reference(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """KL(softmax(a) ‖ softmax(b)) per position by plain (unchunked) autograd on whatever dtype a, b have."""
    lp, lq = torch.log_softmax(a, -1), torch.log_softmax(b, -1)
    out = (lp.exp() * (lp - lq)).sum(-1)
    return out if mask is None else out * mask


def _tol(V: int) -> float:
    # fp32 log_softmax + a V-term sum: each term carries a few ulps of relative error, summed over V terms.
    return 4 * V * EPS32


@pytest.mark.parametrize(("shape", "chunk"), [((2, 5, 37), 3), ((7, 64), 1), ((3, 4, 50), 1024), ((11, 29), 4)])
def test_value_and_grads_equal_float64_autograd(shape, chunk):
    a, b = _logits(shape, 1), _logits(shape, 2)
    mask = torch.rand(shape[:-1], generator=torch.Generator().manual_seed(3)) > 0.3
    w = torch.randn(shape[:-1], generator=torch.Generator().manual_seed(4))  # a non-uniform upstream gradient
    a32, b32 = a.clone().requires_grad_(), b.clone().requires_grad_()
    got = token_kl(a32, b32, mask=mask, chunk=chunk)
    (got * w).sum().backward()
    a64, b64 = a.double().requires_grad_(), b.double().requires_grad_()
    ref = _reference(a64, b64, mask)
    (ref * w.double()).sum().backward()
    tol = _tol(shape[-1])
    assert got.dtype == torch.float32 and got.shape == shape[:-1]
    assert_close(got.double(), ref.detach(), atol=tol, rtol=tol)
    assert_close(a32.grad.double(), a64.grad, atol=tol, rtol=tol)
    assert_close(b32.grad.double(), b64.grad, atol=tol, rtol=tol)
    # masked-out positions: value 0 and no gradient
    assert (got[~mask] == 0).all()
    assert (a32.grad[~mask] == 0).all() and (b32.grad[~mask] == 0).all()


def test_grads_equal_plain_fp32_autograd_and_the_closed_form():
    """Same as the previous implementation (autograd through the chunked fp32 loop) to fp32 rounding, and the
    closed form ∂/∂a = p ⊙ (log p − log q − KL), ∂/∂b = q − p."""
    a, b = _logits((6, 40), 5), _logits((6, 40), 6)
    a1, b1 = a.clone().requires_grad_(), b.clone().requires_grad_()
    token_kl(a1, b1, chunk=4).sum().backward()
    a2, b2 = a.clone().requires_grad_(), b.clone().requires_grad_()
    _reference(a2, b2, None).sum().backward()
    tol = _tol(40)
    assert_close(a1.grad, a2.grad, atol=tol, rtol=tol)
    assert_close(b1.grad, b2.grad, atol=tol, rtol=tol)
    P, Q = torch.softmax(a.double(), -1), torch.softmax(b.double(), -1)
    kl = (P * (P.log() - Q.log())).sum(-1, keepdim=True)
    assert_close(a1.grad.double(), P * (P.log() - Q.log() - kl), atol=tol, rtol=tol)
    assert_close(b1.grad.double(), Q - P, atol=tol, rtol=tol)
    assert_close(b1.grad.sum(-1), torch.zeros(6), atol=tol, rtol=0)  # both gradients sum to 0 over the vocab
    assert_close(a1.grad.sum(-1), torch.zeros(6), atol=tol, rtol=0)


def test_only_one_side_requires_grad_and_dtype_kept():
    a, b = _logits((5, 30), 7), _logits((5, 30), 8)
    bq = b.clone().requires_grad_()
    token_kl(a, bq, chunk=2).sum().backward()  # reference || policy: only q is trained
    assert_close(bq.grad, torch.softmax(b, -1) - torch.softmax(a, -1), atol=_tol(30), rtol=_tol(30))
    ap = a.clone().requires_grad_()
    token_kl(ap, b).sum().backward()
    assert ap.grad is not None and torch.isfinite(ap.grad).all()
    # half-precision logits: gradients come back in the input dtype, computed in fp32
    ab = a.to(torch.bfloat16).requires_grad_()
    bb = b.to(torch.bfloat16).requires_grad_()
    token_kl(ab, bb, chunk=3).sum().backward()
    assert ab.grad.dtype == torch.bfloat16 and bb.grad.dtype == torch.bfloat16
    P, Q = torch.softmax(ab.detach().float(), -1), torch.softmax(bb.detach().float(), -1)
    assert_close(bb.grad.float(), Q - P, atol=2 ** -8, rtol=2 ** -7)  # one bf16 rounding of the fp32 result


def test_no_grad_and_extremes():
    a = torch.tensor([[1000.0, 0.0, -1000.0], [0.0, 0.0, 0.0]], requires_grad=True)
    b = torch.tensor([[0.0, 1000.0, 0.0], [0.0, 0.0, 0.0]], requires_grad=True)
    out = token_kl(a, b)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all()
    assert_close(out[0], torch.tensor(1000.0))  # p = δ_0, log q_0 ≈ −1000
    with torch.no_grad():
        assert not token_kl(a, b).requires_grad


def _saved_bytes(fn) -> int:
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total[0]


def test_backward_saves_only_the_two_inputs():
    """The graph keeps a and b (2·N·V floats) and nothing per chunk; plain autograd keeps several N·V tensors."""
    N, V = 64, 500
    a = _logits((N, V), 9).requires_grad_()
    b = _logits((N, V), 10).requires_grad_()
    ours = _saved_bytes(lambda: token_kl(a, b, chunk=8))
    plain = _saved_bytes(lambda: _reference(a, b, None))
    assert ours <= 2 * N * V * 4 + 4 * N * 8  # the inputs (+ per-row scalars at most)
    assert plain >= 3 * N * V * 4
