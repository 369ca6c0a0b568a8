"""Chunked LM head: values and gradients equal the full-logits computation on every tiny causal arch."""

from __future__ import annotations

import pytest
import torch

import tokensmith as ts
from tokensmith.models import chunked_head_logprobs, final_hidden, gather_logprobs, token_kl
from tokensmith.models.logprobs import shift_target_mask

CAUSAL = ["gpt2", "llama", "qwen2", "gemma3", "gpt_neox"]
ITEMS = [("Hello there", " general Kenobi"), ("A", " b c d e f"), ("Left padded prompt is long", " x")]


def _full(policy, reference, batch, keep, tgt):
    """Reference computation: full [B, T, V] logits, then select the scored positions."""
    zp = policy.forward(batch).logits[keep]
    with torch.no_grad():
        zr = reference.forward(batch).logits[keep]
    return gather_logprobs(zp, tgt), gather_logprobs(zr, tgt), token_kl(zr, zp)


@pytest.mark.parametrize("arch", CAUSAL)
def test_chunked_head_equals_full_logits(arch):
    policy, reference = ts.tiny(arch, seed=0), ts.tiny(arch, seed=1)
    batch = policy.encode_batch(ITEMS)
    keep = shift_target_mask(batch.target_mask)
    tgt = batch.input_ids[batch.target_mask]
    params = [p for p in policy.model.parameters() if p.requires_grad]

    lp, rlp, kl = _full(policy, reference, batch, keep, tgt)
    g_full = torch.autograd.grad(lp.sum() + 0.3 * kl.sum(), params, allow_unused=True)

    h = final_hidden(policy, batch, keep, grad=True)
    hr = final_hidden(reference, batch, keep)
    out = chunked_head_logprobs(policy, h, tgt, reference=reference, h_ref=hr, chunk=3)  # chunks cut rows
    g_chunk = torch.autograd.grad(out["logprobs"].sum() + 0.3 * out["kl"].sum(), params, allow_unused=True)

    eps = torch.finfo(torch.float32).eps
    tol = 64 * eps * max(1.0, float(lp.detach().abs().max()))
    assert torch.allclose(out["logprobs"], lp, atol=tol, rtol=0)
    assert torch.allclose(out["ref_logprobs"], rlp, atol=tol, rtol=0)
    assert torch.allclose(out["kl"], kl, atol=tol, rtol=0)
    for a, b in zip(g_chunk, g_full, strict=True):
        if a is None or b is None:
            assert a is None and b is None or float((a if a is not None else b).abs().max()) == 0.0
            continue
        scale = float(b.abs().max()) + 1e-12
        assert float((a - b).abs().max()) <= 1e-4 * scale  # fp32 reassociation over chunks, relative
    assert not any(p.grad is not None for p in reference.model.parameters())


def test_final_hidden_is_the_pre_norm_last_layer_output():
    a = ts.tiny("llama")
    batch = a.encode_batch(ITEMS)
    keep = torch.ones_like(batch.target_mask)
    h = final_hidden(a, batch, keep)
    z = a.forward(batch).logits[keep.bool()]
    assert torch.allclose(a.unembed(h), z, atol=1e-5)


def test_bad_input():
    a = ts.tiny("llama")
    batch = a.encode_batch(ITEMS)
    keep = shift_target_mask(batch.target_mask)
    h = final_hidden(a, batch, keep)
    tgt = batch.input_ids[batch.target_mask]
    with pytest.raises(ValueError, match="chunk"):
        chunked_head_logprobs(a, h, tgt, chunk=0)
    with pytest.raises(ValueError, match="targets"):
        chunked_head_logprobs(a, h, tgt[:-1])
    with pytest.raises(ValueError, match="both"):
        chunked_head_logprobs(a, h, tgt, reference=a)
    with pytest.raises(ValueError, match="do not match"):
        final_hidden(a, batch, keep[:, :-1])
