"""GlobEnc / ALTI decomposition rollout: exact per-source split of every attention block, the measures
against a direct computation, rollout axioms, and clear errors."""

from __future__ import annotations

import pytest
import torch

import tokensmith as ts
import tokensmith.attribution.decomposition  # noqa: F401  (registers the methods)
from tokensmith.attribution import attribute
from tokensmith.attribution.decomposition import capture_layers, contribution_matrix, decompose_layer

PROMPT, TARGET = "The capital of France is", " Paris is nice"
CAUSAL = ["llama", "gpt2", "qwen2", "gemma3", "gpt_neox"]
# an independent reading of each block's output from the model's own modules: (module path, input or output)
BLOCK_OUT = {
    "llama": ("model.layers.{}.post_attention_layernorm", "in"),  # the MLP norm reads x + attn
    "qwen2": ("model.layers.{}.post_attention_layernorm", "in"),
    "gpt2": ("transformer.h.{}.ln_2", "in"),
    "gemma3": ("model.layers.{}.pre_feedforward_layernorm", "in"),  # x + post_norm(attn)
    "bert": ("bert.encoder.layer.{}.attention", "out"),  # LN(x + dense(z))
    "gpt_neox": None,  # parallel residual: x + attn is never formed; use resid_pre + attn.out
}


@pytest.fixture(scope="module")
def random_norm_tiny(torch_one_thread, random_norm_tiny_factory):
    """Own tiny adapters with random norm parameters (see random_norm_tiny_factory)."""
    return lambda arch: random_norm_tiny_factory(arch, seed=3, norm_seed=1)


@pytest.mark.parametrize("arch", sorted(BLOCK_OUT))
def test_per_source_vectors_sum_to_the_block_output(arch, random_norm_tiny):
    ad = random_norm_tiny(arch)
    ids = ad.encode("The capital of France is Paris and").input_ids
    n = ad.structure.num_layers
    recs, _ = capture_layers(ad, ids, list(range(n)))
    got: dict[int, torch.Tensor] = {}
    handles = []
    if BLOCK_OUT[arch]:
        path, kind = BLOCK_OUT[arch]
        for i in range(n):
            m = ad.model.get_submodule(path.format(i))
            if kind == "in":
                handles.append(m.register_forward_pre_hook(lambda m, a, i=i: got.__setitem__(i, a[0].detach())))
            else:
                handles.append(m.register_forward_hook(lambda m, a, o, i=i: got.__setitem__(i, o[0].detach())))
        try:
            with torch.no_grad():
                ad.forward(ids[None])
        finally:
            for h in handles:
                h.remove()
    for i in range(n):
        dec = decompose_layer(ad, recs[i])
        ref = got[i][0].double() if got else recs[i].resid_pre + recs[i].attn_out
        scale = float(ref.abs().max())
        # fp32 forward vs float64 recomposition: 32 ulps of the magnitude times √d (d = 64)
        torch.testing.assert_close(dec.output, ref, atol=32 * 1.2e-7 * 8 * scale, rtol=0)
        if ad.is_causal:  # z_{i←j} = 0 for later sources
            later = torch.triu(torch.ones(len(ids), len(ids), dtype=torch.bool), 1)
            assert (dec.vectors[later] == 0).all()
    want = {"bert": "post_residual", "gemma3": "post"}.get(arch, "pre")
    assert dec.placement == want


def test_globenc_and_alti_equal_a_direct_computation(random_norm_tiny):
    """Layer 0 of Llama from its weights: z_ij = Σ_h A^h_ij RMSNorm(x_j) W_V^{g(h)}ᵀ W_O^hᵀ + δ_ij x_i."""
    ad = random_norm_tiny("llama")
    ids = ad.encode(PROMPT).input_ids
    layer = ad.model.model.layers[0]
    at = layer.self_attn
    seen: dict[str, torch.Tensor] = {}
    h = layer.register_forward_pre_hook(
        lambda m, a, kw: seen.__setitem__("x", (a[0] if a else kw["hidden_states"]).detach()), with_kwargs=True)
    try:
        with torch.no_grad(), ad.capture_attention(layers=[0]) as att:
            ad.forward(ids[None])
    finally:
        h.remove()
    x = seen["x"][0].double()
    A = att[0][0].double()
    H, dh = ad.structure.num_heads, ad.structure.head_dim
    G = H // ad.structure.num_kv_heads
    with torch.no_grad():
        nx = layer.input_layernorm(seen["x"])[0].double()
    v = nx @ at.v_proj.weight.double().t()
    Wo = at.o_proj.weight.double()  # [d, H*dh]
    Lq = len(ids)
    z = torch.zeros(Lq, Lq, x.shape[-1], dtype=torch.float64)
    for hh in range(H):
        g = hh // G
        f = v[:, g * dh : (g + 1) * dh] @ Wo[:, hh * dh : (hh + 1) * dh].t()  # [L, d]
        z += A[hh][:, :, None] * f[None]
    z[range(Lq), range(Lq)] += x
    y = z.sum(1)  # Llama's o_proj has no bias
    N = z.norm(dim=-1)
    alti = (y.abs().sum(-1, keepdim=True) - (y[:, None] - z).abs().sum(-1)).clamp_min(0)
    recs, _ = capture_layers(ad, ids, [0])
    dec = decompose_layer(ad, recs[0])
    torch.testing.assert_close(contribution_matrix(dec, "globenc"), N / N.sum(-1, keepdim=True), atol=1e-6, rtol=0)
    torch.testing.assert_close(contribution_matrix(dec, "alti"), alti / alti.sum(-1, keepdim=True), atol=1e-6, rtol=0)
    # the rollout is the product of the two layers' normalised matrices, read at each predicting query
    r = attribute(ad, PROMPT, target=TARGET, method="globenc", include_template=True)
    L = len(r.ids)
    full, _ = capture_layers(ad, r.ids, [0, 1])
    R = contribution_matrix(decompose_layer(ad, full[1]), "globenc") @ contribution_matrix(
        decompose_layer(ad, full[0]), "globenc")
    q = r.target_positions - 1
    torch.testing.assert_close(r.scores.double(), torch.where(r.valid, R[q], torch.zeros(len(q), L)), atol=1e-6, rtol=0)


@pytest.mark.parametrize("arch", CAUSAL)
@pytest.mark.parametrize("measure", ["alti", "globenc"])
def test_rollout_rows_sum_to_one_and_are_causal(arch, measure, shared_tiny, torch_one_thread):
    ad = shared_tiny(arch)
    r = attribute(ad, PROMPT, target=TARGET, method=measure, include_template=True)
    sums = torch.tensor(r.extra["row_sums"])
    torch.testing.assert_close(sums, torch.ones_like(sums), atol=1e-9, rtol=0)
    assert r.extra["measure"] == measure and (r.scores >= 0).all()
    q = r.target_positions - 1
    for t in range(r.shape[0]):
        assert (r.scores[t, int(q[t]) + 1 :] == 0).all()


def test_chat_template_encoder_and_settings(shared_tiny, torch_one_thread):
    ad = shared_tiny("llama")
    r = attribute(ad, "Name a city.", target="Paris", chat=True, method="decomposition_rollout", measure="globenc")
    assert r.valid.any() and (r.scores[~r.valid] == 0).all()  # template tokens flagged and left out
    bert = shared_tiny("bert")
    r = attribute(bert, PROMPT, target=lambda out, p: out.logits[:, 0, 5], method="alti", include_template=True)
    assert abs(float(r.scores.sum()) - 1) < 1e-5  # one row over the whole (bidirectional) sequence
    with pytest.raises(ValueError, match="measure must be one of"):
        attribute(ad, PROMPT, target=TARGET, method="decomposition_rollout", measure="l2")


def test_clear_error_without_discoverable_attention(shared_tiny, torch_one_thread):
    ad = shared_tiny("llama")
    recs, _ = capture_layers(ad, ad.encode(PROMPT).input_ids, [0])
    recs[0].attn_out[2] += 1.0  # an attention output the value vectors cannot explain (e.g. an output gate)
    with pytest.raises(ValueError, match="does not model"):
        decompose_layer(ad, recs[0])

    ad = ts.tiny("llama", n_layers=1)
    ad.structure.o_proj = [None]  # as for a model whose output projection was not found
    with pytest.raises(ValueError, match="output projection of layer 0"):
        attribute(ad, PROMPT, target=TARGET, method="alti")
