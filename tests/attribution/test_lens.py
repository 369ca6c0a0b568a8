"""Logit lens and direct logit attribution: the last layer is the model, the logit splits exactly."""

from __future__ import annotations

import pytest
import torch

import tokensmith as ts
import tokensmith.attribution.lens  # noqa: F401  (registers the methods)
from tokensmith.attribution import Contrast, attribute
from tokensmith.attribution.lens import logit_lens

PROMPT, TARGET = "The capital of France is", " Paris is nice"
CAUSAL = ["llama", "gpt2", "qwen2", "gemma3", "gpt_neox"]


@pytest.fixture(scope="module")
def random_norm_tiny(torch_one_thread, random_norm_tiny_factory):
    """Own tiny adapters with random norm parameters (a dropped final-norm γ/β would show)."""
    return lambda arch: random_norm_tiny_factory(arch, seed=5, norm_seed=2)


@pytest.mark.parametrize("arch", CAUSAL)
def test_last_layer_of_the_lens_is_the_model(arch, shared_tiny, torch_one_thread):
    ad = shared_tiny(arch)
    lens = logit_lens(ad, PROMPT, target=TARGET)
    enc = ad.encode(PROMPT, target=TARGET)
    want = ad.token_logprobs(enc)[0][enc.target_mask].float()
    torch.testing.assert_close(lens.logprobs[:, -1], want, atol=1e-5, rtol=0)
    assert lens.layers[0] == "embed" and len(lens.layers) == ad.structure.num_layers + 1
    torch.testing.assert_close(lens.kl[:, -1], torch.zeros(len(want)), atol=1e-6, rtol=0)
    assert (lens.kl >= 0).all()
    df = lens.to_pandas()
    assert len(df) == lens.logprobs.numel() and set(df["layer"]) == set(lens.layers)


def test_a_middle_layer_equals_final_norm_and_head_applied_by_hand(shared_tiny, torch_one_thread):
    ad = shared_tiny("llama")
    lens = logit_lens(ad, PROMPT, target=TARGET, layers=[0, "embed"])
    enc = ad.encode(PROMPT, target=TARGET)
    pos = torch.nonzero(enc.target_mask).flatten()
    seen: dict[str, torch.Tensor] = {}
    h = ad.model.model.layers[0].register_forward_hook(lambda m, a, o: seen.__setitem__("h", o[0] if isinstance(o, tuple) else o))
    try:
        with torch.no_grad():
            ad.forward(enc.input_ids[None])
    finally:
        h.remove()
    with torch.no_grad():
        z = ad.model.lm_head(ad.model.model.norm(seen["h"][0, pos - 1]))
    lp = torch.log_softmax(z, -1)
    tgt = enc.input_ids[pos]
    torch.testing.assert_close(lens.logprobs[:, 0], lp[torch.arange(len(pos)), tgt], atol=1e-5, rtol=0)
    ranks = (z > z[torch.arange(len(pos)), tgt][:, None]).sum(-1)
    assert lens.ranks[:, 0].tolist() == ranks.tolist()
    assert lens.layers == ["layers.0.resid_post", "embed"]


def test_lens_errors_say_what_to_do(shared_tiny, torch_one_thread):
    bert = shared_tiny("bert")
    with pytest.raises(ValueError, match="encoder"):
        logit_lens(bert, PROMPT, target=TARGET)
    import transformers

    bare = ts.ModelAdapter(transformers.BertModel(bert.model.config).eval(), bert.tokenizer)
    with pytest.raises(ValueError, match="LM head"):
        logit_lens(bare, PROMPT, target=TARGET)
    ad = shared_tiny("llama")
    with pytest.raises(ValueError, match="target tokens"):
        logit_lens(ad, PROMPT, target=Contrast(" Paris", " London"))
    with pytest.raises(ValueError, match="layer indices"):
        logit_lens(ad, PROMPT, target=TARGET, layers=[7])


@pytest.mark.parametrize("arch", CAUSAL)
def test_direct_logit_attribution_splits_the_logit_exactly(arch, random_norm_tiny):
    ad = random_norm_tiny(arch)
    r = attribute(ad, PROMPT, target=TARGET, method="dla", include_template=True)
    e = r.extra
    T = lambda k: torch.tensor(e[k], dtype=torch.float64)  # noqa: E731
    pl = {k: torch.tensor(v, dtype=torch.float64) for k, v in e["per_layer"].items()}
    lin = T("linear_logit")
    total = r.scores.double().sum(-1) + pl["attn_bias"].sum(-1) + pl["mlp"].sum(-1) + T("embed") + T("excluded")
    size = pl["attn"].abs().sum(-1) + pl["mlp"].abs().sum(-1) + T("embed").abs()
    torch.testing.assert_close(total, lin, atol=float(64 * 1.2e-7 * size.max()), rtol=0)
    torch.testing.assert_close(pl["attn"].sum(-1) + pl["mlp"].sum(-1) + T("embed"), lin, atol=1e-9, rtol=0)
    # the model's own logit (its forward, not the method's head replay) = linearised logit + norm/head bias
    with torch.no_grad():
        logits = ad.forward(r.ids[None]).logits[0].double()
    q = r.target_positions - 1
    real = logits[q, r.ids[r.target_positions]]
    cap = ad.structure.logit_softcap
    real = cap * torch.atanh(real / cap) if cap else real
    torch.testing.assert_close(lin + T("norm_bias"), real, atol=1e-5 * float(real.abs().max() + 1), rtol=0)
    assert r.shape[1] == len(r.ids) and (r.scores[:, q.max() + 1 :] == 0).all()


def test_dla_layer_terms_equal_hook_readings(random_norm_tiny):
    """Llama: attn_ℓ = attn.out·u and mlp_ℓ = mlp.out·u with u = γ_f ⊙ W_U[t] / rms(h_q) written out here."""
    ad = random_norm_tiny("llama")
    r = attribute(ad, PROMPT, target=TARGET, method="direct_logit", include_template=True)
    n = ad.structure.num_layers
    names = [f"layers.{i}.{p}" for i in range(n) for p in ("attn.out", "mlp.out")] + [f"layers.{n - 1}.resid_post"]
    with torch.no_grad(), ad.hooks(cache=names) as h:
        ad.forward(r.ids[None])
    q = r.target_positions - 1
    hq = h.cache[f"layers.{n - 1}.resid_post"][0, q].double()
    fn = ad.model.model.norm
    rms = torch.sqrt(hq.pow(2).mean(-1, keepdim=True) + fn.variance_epsilon)
    u = fn.weight.double() * ad.model.lm_head.weight.double()[r.ids[r.target_positions]] / rms  # [R, d]
    for i in range(n):
        for part in ("attn", "mlp"):
            want = (h.cache[f"layers.{i}.{part}.out"][0, q].double() * u).sum(-1)
            got = torch.tensor([row[i] for row in r.extra["per_layer"][part]], dtype=torch.float64)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_dla_on_a_chat_and_refusals(shared_tiny, torch_one_thread):
    ad = shared_tiny("qwen2")
    r = attribute(ad, "Name a city.", target="Paris", chat=True, method="dla")
    assert (r.scores[~r.valid] == 0).all() and any(abs(x) > 0 for x in r.extra["excluded"])
    with pytest.raises(ValueError):
        attribute(shared_tiny("bert"), PROMPT, target=TARGET, method="dla")
    with pytest.raises(ValueError, match="tokens"):
        attribute(ad, PROMPT, target=Contrast(" Paris", " London"), method="dla")
