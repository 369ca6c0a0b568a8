"""Attention-based attributions: rows of probabilities, rollout axioms, the value-norm formula."""

from __future__ import annotations

import pytest
import torch

from tokensmith.attribution import attribute

PROMPT, TARGET = "The capital of France is", " Paris is nice"


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3", "gpt_neox", "qwen2"])
def test_rollout_rows_sum_to_one_and_are_causal(arch, shared_tiny):
    ad = shared_tiny(arch)
    r = attribute(ad, PROMPT, target=TARGET, method="rollout", include_template=True)
    sums = torch.tensor(r.extra["row_sums"])
    torch.testing.assert_close(sums, torch.ones_like(sums), atol=1e-5, rtol=0)
    q = r.target_positions - 1
    L = r.shape[1]
    for t in range(r.shape[0]):
        assert (r.scores[t, int(q[t]) + 1:] == 0).all()  # lower-triangular: no mass on later keys
    assert L > 0


def test_attention_is_the_probe_row_of_the_predicting_query(shared_tiny):
    ad = shared_tiny("llama")
    r = attribute(ad, PROMPT, target=TARGET, method="attention", layer=1, head=0, include_template=True)
    ids = r.ids[None]
    with torch.no_grad(), ad.capture_attention(layers=[1]) as att:
        ad.forward(ids)
    A = att[1][0, 0]
    for t, p in enumerate(r.target_positions.tolist()):
        torch.testing.assert_close(r.scores[t, :p], A[p - 1, :p], atol=1e-6, rtol=0)
    mean = attribute(ad, PROMPT, target=TARGET, method="attention", layer="mean")
    assert mean.valid.any()
    with pytest.raises(ValueError, match="out of range"):
        attribute(ad, PROMPT, target=TARGET, method="attention", head=99)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
def test_attention_norm_decomposes_the_attention_output(arch, shared_tiny):
    """vec_i = Σ_h A^h[q, i] v_i^{g(h)} W_O^h; Σ_i vec_i must equal o_proj(z_q) − bias (z from the attn.z hook,
    an independent path), and the method's scores must be ‖vec_i‖."""
    ad = shared_tiny(arch)
    r = attribute(ad, PROMPT, target=TARGET, method="attention_norm", layer=0, include_template=True)
    s = ad.structure
    with torch.no_grad(), ad.capture_attention(layers=[0]) as att, ad.hooks(cache=["layers.0.attn.v", "layers.0.attn.z"]) as h:
        ad.forward(r.ids[None])
    A = att[0][0].double()
    H, dh = s.num_heads, s.head_dim
    v = h.cache["layers.0.attn.v"][0].double()
    Hkv = v.shape[-1] // dh
    v = v.view(-1, Hkv, dh).repeat_interleave(H // Hkv, dim=1)  # [L, H, dh]
    o = s.o_proj[0]
    with torch.no_grad():  # the projection's matrix measured on the basis (GPT-2's Conv1D is [in, out], square here)
        b0 = o(torch.zeros(1, H * dh))[0].double()
        W = (o(torch.eye(H * dh)).double() - b0).t()  # [d, H*dh]
    Wh = W.view(W.shape[0], H, dh)
    z = h.cache["layers.0.attn.z"][0]
    with torch.no_grad():
        real = o(z).double() - b0  # o_proj(z_q) − bias, run by the module itself
    for t, p in enumerate(r.target_positions.tolist()):
        q = p - 1
        vec = torch.einsum("hi,ihd,ohd->io", A[:, q], v, Wh)  # [L, d]
        torch.testing.assert_close(vec.sum(0), real[q], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(r.scores[t, :p].double(), vec.norm(dim=-1)[:p], atol=1e-5, rtol=1e-4)
