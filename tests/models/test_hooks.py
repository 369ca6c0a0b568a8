"""Hooks over canonical names: caching, steering, patching, ablation, gradients, cleanup, generation."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch.testing import assert_close

import tokensmith as ts
from tokensmith.models import ablate_fn, patch_fn, steer_fn

pytestmark = pytest.mark.usefixtures("torch_one_thread")

CAUSAL = ["gpt2", "llama", "qwen2", "gemma3", "gpt_neox"]
TEXT = "The quick brown fox jumps over the lazy dog"


def _vec(ad, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(ad.structure.hidden_size, generator=g)


def _hook_counts(model):
    """Registered hook ids per module (transformers installs a few output-capturing hooks of its own)."""
    return {
        name: (tuple(m._forward_hooks), tuple(m._forward_pre_hooks), tuple(m._backward_hooks))
        for name, m in model.named_modules()
    }


@pytest.mark.parametrize("arch", [*CAUSAL, "bert"])
def test_resid_post_cache_matches_output_hidden_states(arch, shared_tiny):
    ad = shared_tiny(arch)
    L = ad.structure.num_layers
    with torch.no_grad(), ad.hooks(cache="layers.*.resid_post") as h:
        out = ad.forward(TEXT, output_hidden_states=True)
    hs = out.hidden_states
    assert sorted(h.cache) == [f"layers.{i}.resid_post" for i in range(L)]
    for i in range(L - 1):
        assert_close(h.cache[f"layers.{i}.resid_post"], hs[i + 1], atol=1e-6, rtol=0)
    last = h.cache[f"layers.{L - 1}.resid_post"]
    fn = ad.structure.final_norm
    # transformers reports the last layer either raw or after the final norm, depending on the model
    ok_raw = torch.allclose(last, hs[L], atol=1e-6)
    ok_normed = fn is not None and torch.allclose(fn(last), hs[L], atol=1e-5)
    assert ok_raw or ok_normed


@pytest.mark.parametrize("arch", [*CAUSAL, "bert"])
def test_embed_cache_is_the_scaled_embedding_lookup(arch, shared_tiny):
    ad = shared_tiny(arch)
    ids = ad.encode(TEXT).input_ids[None]
    with torch.no_grad(), ad.hooks(cache="embed") as h:
        ad.forward(ids)
    scale = math.sqrt(ad.structure.hidden_size) if arch == "gemma3" else 1.0
    W = ad.model.get_input_embeddings().weight
    assert_close(h.cache["embed"], W[ids] * scale, atol=1e-6, rtol=1e-6)
    assert_close(ad.embed(ids), W[ids] * scale, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("arch", CAUSAL)
def test_steering_changes_logits_and_alpha_zero_is_exact_noop(arch, shared_tiny):
    ad = shared_tiny(arch)
    v = _vec(ad)
    with torch.no_grad():
        base = ad.forward(TEXT).logits
        with ad.steer("layers.0.resid_post", v, alpha=0.0):
            zero = ad.forward(TEXT).logits
        with ad.steer("layers.0.resid_post", v, alpha=2.0):
            steered = ad.forward(TEXT).logits
        after = ad.forward(TEXT).logits
    assert torch.equal(zero, base)
    assert (steered - base).abs().max() > 1e-3
    assert torch.equal(after, base)  # the hook is gone


def test_steer_adds_alpha_v_and_renorm_preserves_norms(shared_tiny):
    ad = shared_tiny("llama")
    v = _vec(ad)
    rec: dict[str, torch.Tensor] = {}
    name = "layers.1.resid_pre"

    def before(h, ctx):
        rec["before"] = h.clone()

    def after(h, ctx):
        rec["after"] = h.clone()

    for renorm in (False, True):
        edit = [(name, before), (name, steer_fn(v, 1.5, renorm=renorm)), (name, after)]
        with torch.no_grad(), ad.hooks(edit=edit):
            ad.forward(TEXT)
        b, a = rec["before"], rec["after"]
        if renorm:
            assert_close(a.norm(dim=-1), b.norm(dim=-1), atol=1e-5, rtol=1e-5)
            plain = b + 1.5 * v
            assert_close(a, plain * (b.norm(dim=-1, keepdim=True) / plain.norm(dim=-1, keepdim=True)))
            assert (a - b).abs().max() > 1e-2
        else:
            assert_close(a - b, (1.5 * v).expand_as(b), atol=1e-5, rtol=0)


def test_steer_positions_restricts_to_absolute_positions_in_padded_batch(shared_tiny):
    ad = shared_tiny("llama")
    v = _vec(ad)
    b = ad.encode_batch(["a b", "one two three four five"])
    name = "layers.0.resid_post"
    with torch.no_grad():
        with ad.hooks(cache=name) as h0:
            ad.forward(b)
        with ad.hooks(edit=[(name, steer_fn(v, 1.0, positions=[1, 3]))], cache=name) as h1:
            ad.forward(b)
    diff = (h1.cache[name] - h0.cache[name]).abs().amax(-1)
    real = b.attention_mask.bool()
    want = real & torch.isin(b.position_ids, torch.tensor([1, 3]))
    assert (diff[want] > 1e-3).all()
    assert (diff[real & ~want] == 0).all()
    # row 0 has only 2 real tokens: absolute position 3 does not exist there
    assert int(want[0].sum()) == 1 and int(want[1].sum()) == 2


def test_hooks_during_generate_see_prefill_and_decode_positions(shared_tiny):
    ad = shared_tiny("llama")
    v = _vec(ad, scale=5.0)
    b = ad.encode_batch(["Hi there", "The quick brown fox"])
    n_real = b.attention_mask.sum(-1)
    assert n_real[0] < n_real[1]
    target_pos = int(n_real[1]) + 1  # reached by row 1 in its 2nd decode step, never by row 0
    name = "layers.0.resid_post"
    log = []

    def before(h, ctx):
        log.append({"step": ctx.step, "prefill": ctx.is_prefill, "pos": ctx.positions.clone(), "h": h.clone()})

    def after(h, ctx):
        log[-1]["after"] = h.clone()

    edit = [(name, before), (name, steer_fn(v, 1.0, positions=[target_pos])), (name, after)]
    with ad.hooks(edit=edit):
        ad.generate(b, max_new_tokens=4, min_new_tokens=4)
    assert [e["step"] for e in log] == [0, 1, 2, 3]
    assert log[0]["prefill"] and not any(e["prefill"] for e in log[1:])
    real = b.attention_mask.bool()
    assert log[0]["pos"][real].tolist() == b.position_ids[real].tolist()
    for k, e in enumerate(log[1:], start=1):
        assert e["h"].shape[:2] == (2, 1)
        assert e["pos"][:, 0].tolist() == (n_real + k - 1).tolist()  # absolute, continuing the prompt
    for k, e in enumerate(log):
        d = (e["after"] - e["h"]).abs().amax(-1)
        if k == 2:
            assert_close(e["after"][1, 0] - e["h"][1, 0], v, atol=1e-5, rtol=0)
            assert d[0, 0] == 0
        else:
            assert (d == 0).all()


def test_hooks_removed_after_exception_inside_block(shared_tiny):
    ad = ts.tiny("llama")
    before = _hook_counts(ad.model)
    with pytest.raises(RuntimeError, match="boom"):
        with ad.hooks(
            cache=["layers.*.resid_post", "layers.0.attn.probs", "embed", "logits"],
            edit={"layers.1.mlp.out": steer_fn(_vec(ad), 1.0)},
            grad="layers.0.resid_pre",
        ):
            assert ad.config._attn_implementation != "sdpa"  # the probe is active
            assert _hook_counts(ad.model) != before
            ad.forward(TEXT)
            raise RuntimeError("boom")
    assert _hook_counts(ad.model) == before
    assert ad.config._attn_implementation == "sdpa"
    # an exception raised by an edit inside the forward also cleans up
    with pytest.raises(ValueError, match="must return a tensor of shape"):
        with ad.hooks(edit={"layers.0.resid_post": lambda h, ctx: h[:, :1]}):
            ad.forward(TEXT)
    assert _hook_counts(ad.model) == before


def test_stop_after_returns_none_and_caches_up_to_that_point(shared_tiny):
    ad = shared_tiny("llama")
    with torch.no_grad(), ad.hooks(cache=["embed", "layers.*.resid_post", "logits"]) as full:
        ad.forward(TEXT)
    with torch.no_grad(), ad.hooks(cache=["embed", "layers.*.resid_post", "logits"], stop_after="layers.0.resid_post") as h:
        out = ad.forward(TEXT)
    assert out is None
    assert sorted(h.cache) == ["embed", "layers.0.resid_post"]
    assert torch.equal(h.cache["layers.0.resid_post"], full.cache["layers.0.resid_post"])
    assert torch.equal(h.cache["embed"], full.cache["embed"])
    with pytest.raises(KeyError, match="not cached"):
        h.cache["layers.1.resid_post"]


def test_edit_returning_wrong_shape_raises(shared_tiny):
    ad = shared_tiny("gpt2")
    with pytest.raises(ValueError, match="shape"):
        with ad.hooks(edit={"layers.0.attn.out": lambda h, ctx: h[..., :-1]}):
            ad.forward(TEXT)
    with pytest.raises(ValueError, match="shape"):
        with ad.hooks(edit={"embed": lambda h, ctx: "not a tensor"}):
            ad.forward(TEXT)


def test_unknown_hook_name_lists_valid_names(shared_tiny):
    ad = shared_tiny("llama")
    with pytest.raises(ValueError, match=r"layers\.7\.resid_post.*embed.*hook_names"):
        ad.hooks(cache="layers.7.resid_post")
    with pytest.raises(ValueError, match="no hook point"):
        ad.hooks(edit={"layers.0.nonsense": lambda h, ctx: None})
    with pytest.raises(TypeError, match="callable"):
        ad.hooks(edit={"embed": 3})
    with pytest.raises(ValueError, match="attn.probs"):
        ad.hooks(edit={"layers.0.attn.probs": lambda h, ctx: None})
    names = ad.hook_names()
    assert names[0] == "embed" and names[-1] == "logits" and "layers.1.mlp.act" in names


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_grad_records_gradient_of_the_activation(arch, shared_tiny):
    ad = shared_tiny(arch)
    name = "layers.0.resid_post"
    ids = ad.encode(TEXT).input_ids[None]
    with ad.hooks(grad=name) as h:
        loss = -ad.token_logprobs(ids, grad=True).sum()
        loss.backward()
    ad.model.zero_grad(set_to_none=True)
    (g,) = h.grads.steps(name)
    # independent: make the activation a leaf by replacing it, then differentiate w.r.t. that leaf
    leaf = {}

    def make_leaf(t, ctx):
        leaf["x"] = t.detach().requires_grad_(True)
        return leaf["x"]

    with ad.hooks(edit={name: make_leaf}):
        loss2 = -ad.token_logprobs(ids, grad=True).sum()
    (ref,) = torch.autograd.grad(loss2, leaf["x"])
    assert_close(g, ref, atol=1e-6, rtol=1e-5)
    assert g.abs().max() > 0


@pytest.mark.parametrize("arch", ["llama", "gpt_neox"])
def test_patching_run_a_into_run_b_reproduces_run_a(arch, shared_tiny):
    ad = shared_tiny(arch)
    g = torch.Generator().manual_seed(1)
    a = torch.randint(100, 5000, (2, 9), generator=g)
    b = torch.randint(100, 5000, (2, 9), generator=g)
    name = "layers.0.resid_post"
    with torch.no_grad():
        with ad.hooks(cache=name) as ha:
            la = ad.forward(a).logits
        lb = ad.forward(b).logits
        with ad.hooks(edit={name: patch_fn(ha.cache[name])}):
            patched = ad.forward(b).logits
        # patching only some positions: earlier positions keep run B (causality)
        with ad.hooks(edit={name: patch_fn(ha.cache[name], positions=[5, 6, 7, 8])}):
            part = ad.forward(b).logits
    assert_close(patched, la, atol=1e-5, rtol=0)
    assert (la - lb).abs().max() > 1e-3
    assert_close(part[:, :5], lb[:, :5], atol=1e-5, rtol=0)


def test_zero_ablation_of_mlp_equals_zeroed_weights(shared_tiny):
    ad = shared_tiny("llama")
    twin = copy.deepcopy(ad.model)
    with torch.no_grad():
        twin.model.layers[1].mlp.down_proj.weight.zero_()
        ref = twin(input_ids=ad.encode(TEXT).input_ids[None]).logits
        with ad.hooks(edit={"layers.1.mlp.out": ablate_fn("zero")}):
            got = ad.forward(TEXT).logits
        base = ad.forward(TEXT).logits
    assert_close(got, ref, atol=1e-5, rtol=0)
    assert (got - base).abs().max() > 1e-4


def test_mean_ablation_uses_real_tokens_only(shared_tiny):
    ad = shared_tiny("qwen2")
    b = ad.encode_batch(["short", "a much longer example sentence"])
    name = "layers.0.attn.out"
    with torch.no_grad():
        with ad.hooks(cache=name) as h0:
            ad.forward(b)
        with ad.hooks(edit={name: ablate_fn("mean")}, cache=name) as h1:
            ad.forward(b)
    real = b.attention_mask.bool()
    mean = h0.cache[name][real].mean(0)
    assert_close(h1.cache[name], mean.expand_as(h1.cache[name]), atol=1e-6, rtol=1e-5)
    fixed = torch.ones(ad.structure.hidden_size)
    with torch.no_grad(), ad.hooks(edit={name: ablate_fn("mean", positions=[0], value=fixed)}, cache=name) as h2:
        ad.forward(b)
    first = b.position_ids == 0
    assert (h2.cache[name][first & real] == 1).all()
    assert torch.equal(h2.cache[name][~first], h0.cache[name][~first])
    with pytest.raises(ValueError, match="zero.*mean"):
        ablate_fn("resample")


def test_cache_over_generation_concatenates_steps(shared_tiny):
    ad = shared_tiny("gpt2")
    with ad.hooks(cache="layers.1.resid_post") as h:
        out = ad.generate("Once upon a time", max_new_tokens=3, eos_token_id=None)
    steps = h.cache.steps("layers.1.resid_post")
    assert len(steps) == 3
    T0 = out.prompt.input_ids.shape[1]
    assert h.cache["layers.1.resid_post"].shape[:2] == (1, T0 + 2)


def test_steering_vector_validation(shared_tiny):
    ad = shared_tiny("llama")
    with pytest.raises(ValueError, match="size"):
        ad.steer("layers.0.resid_post", torch.ones(ad.structure.hidden_size + 1))
    with pytest.raises(ValueError, match="NaN"):
        steer_fn(torch.full((4,), float("nan")))


# -- fused QKV projections (GPT-2 c_attn, GPT-NeoX query_key_value) ----------------------------------------
def _attn_input(ad, layer, text):
    """The attention module's input, recorded by a plain torch hook (independent of tokensmith's hooks)."""
    rec = {}
    attn = ad.structure.attn[layer]
    hd = attn.register_forward_pre_hook(
        lambda m, a, kw: rec.__setitem__("x", (a[0] if a else kw["hidden_states"]).detach()), with_kwargs=True
    )
    try:
        with torch.no_grad(), ad.hooks(cache=[f"layers.{layer}.attn.{p}" for p in "qkvz"]) as h:
            ad.forward(text)
    finally:
        hd.remove()
    return rec["x"], h.cache


def _qkv_from_weights(ad, layer, x):
    """q, k, v ``[B, T, H*hd]`` in float64 straight from the fused weights and the documented layout."""
    s = ad.structure
    H, hd, d = s.num_heads, s.head_dim, s.hidden_size
    attn = s.attn[layer]
    x = x.double()
    if hasattr(attn, "c_attn"):  # GPT-2 Conv1D: weight [d, 3d], output [q | k | v]
        qkv = x @ attn.c_attn.weight.double() + attn.c_attn.bias.double()
        return qkv[..., :d], qkv[..., d : 2 * d], qkv[..., 2 * d :]
    lin = attn.query_key_value  # GPT-NeoX: per head [q_h | k_h | v_h]
    qkv = (x @ lin.weight.double().T + lin.bias.double()).unflatten(-1, (H, 3 * hd))
    return tuple(qkv[..., j * hd : (j + 1) * hd].flatten(-2) for j in range(3))


def _heads(t, H):
    return t.unflatten(-1, (H, -1)).transpose(1, 2)  # [B, H, T, hd]


def _causal_attention(q, k, v, H):
    """z = softmax(q kᵀ / √d_head + causal mask) v, heads concatenated, float64."""
    q, k, v = (_heads(t.double(), H) for t in (q, k, v))
    T = q.shape[2]
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2).flatten(-2)


def _rope(ad, q, k):
    """Apply the model's own rotary embedding (GPT-NeoX, partial rotary) to q and k: [B, T, H*hd]."""
    from transformers.models.gpt_neox.modeling_gpt_neox import apply_rotary_pos_emb

    H = ad.structure.num_heads
    pos = torch.arange(q.shape[1])[None]
    cos, sin = ad.model.gpt_neox.rotary_emb(q, pos)
    qr, kr = apply_rotary_pos_emb(_heads(q, H), _heads(k, H), cos, sin)
    return qr.transpose(1, 2).flatten(-2), kr.transpose(1, 2).flatten(-2)


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox"])
def test_fused_qkv_hooks_equal_the_split_of_the_fused_weights(arch, shared_tiny):
    ad = shared_tiny(arch)
    s = ad.structure
    assert all(s.q_proj[i] is None for i in range(s.num_layers))  # no separate projections on these models
    assert {"layers.1.attn.q", "layers.1.attn.k", "layers.1.attn.v"} <= set(ad.hook_names())
    layer = 1
    x, cache = _attn_input(ad, layer, TEXT)
    want = _qkv_from_weights(ad, layer, x)
    tol = 1e-5 * math.sqrt(s.hidden_size) * float(x.abs().max())
    for part, ref in zip("qkv", want, strict=True):
        got = cache[f"layers.{layer}.attn.{part}"]
        assert got.shape == (*x.shape[:2], s.num_heads * s.head_dim)
        assert_close(got.double(), ref, atol=tol, rtol=0)
    # the split is the one attention uses: the hooked q, k, v reproduce attn.z (q/k order included)
    q, k, v = (cache[f"layers.{layer}.attn.{p}"] for p in "qkv")
    if arch == "gpt_neox":
        q, k = _rope(ad, q, k)
    z = _causal_attention(q, k, v, s.num_heads)
    assert_close(cache[f"layers.{layer}.attn.z"].double(), z, atol=1e-5 * float(v.abs().max()) * 8, rtol=0)


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox"])
def test_fused_qkv_edits_write_back_into_the_fused_projection(arch, shared_tiny):
    ad = shared_tiny(arch)
    H = ad.structure.num_heads
    zname, vname, qname = "layers.0.attn.z", "layers.0.attn.v", "layers.0.attn.q"
    with torch.no_grad():
        with ad.hooks(cache=[zname, vname]) as base:
            logits = ad.forward(TEXT).logits
        # z is linear in v for fixed attention weights: doubling v doubles z
        with ad.hooks(cache=zname, edit={vname: lambda t, ctx: 2 * t}) as dbl:
            edited = ad.forward(TEXT).logits
        # q = 0 gives uniform causal attention: z_t = mean of v over positions <= t
        with ad.hooks(cache=zname, edit={qname: lambda t, ctx: torch.zeros_like(t)}) as uni:
            ad.forward(TEXT)
        after = ad.forward(TEXT).logits
    zb = base.cache[zname]
    assert_close(dbl.cache[zname], 2 * zb, atol=1e-5 * float(zb.abs().max()), rtol=0)
    assert (edited - logits).abs().max() > 1e-3
    v = base.cache[vname].unflatten(-1, (H, -1))
    T = v.shape[1]
    mean_v = (v.cumsum(1) / torch.arange(1, T + 1).view(1, T, 1, 1)).flatten(-2)
    assert_close(uni.cache[zname], mean_v, atol=1e-5 * float(v.abs().max()), rtol=0)
    assert torch.equal(after, logits)  # hooks gone


# -- BERT-style post-LN attention: attn.out is the block's output before the residual add -----------------
def test_bert_attn_out_is_before_residual_add_and_layernorm(shared_tiny):
    ad = shared_tiny("bert")
    i = 1
    attn = ad.structure.attn[i]
    rec = {}
    hd = attn.register_forward_hook(lambda m, a, o: rec.__setitem__("a", (o[0] if isinstance(o, tuple) else o).detach()))
    names = [f"layers.{i}.resid_pre", f"layers.{i}.attn.out", f"layers.{i}.attn.z"]
    try:
        with torch.no_grad(), ad.hooks(cache=names) as h:
            ad.forward(TEXT)
        resid, out, z = (h.cache[n] for n in names)
        with torch.no_grad():
            # documented relation: attention module output = LayerNorm(resid_pre + attn.out)
            assert_close(attn.output.LayerNorm(resid + out), rec["a"], atol=1e-5, rtol=1e-5)
            assert_close(out, attn.output.dense(z), atol=1e-6, rtol=1e-6)
            assert (out - rec["a"]).abs().max() > 1e-2  # not the normalised output any more
            # editing attn.out acts before the residual add: zeroing it leaves LayerNorm(resid_pre)
            with ad.hooks(edit={f"layers.{i}.attn.out": ablate_fn("zero")}):
                ad.forward(TEXT)
            assert_close(rec["a"], attn.output.LayerNorm(resid), atol=1e-5, rtol=1e-5)
    finally:
        hd.remove()


def test_pre_norm_attn_out_is_still_the_attention_module_output(shared_tiny):
    from tokensmith.models.hooks import attention_geometry

    for arch in ("llama", "gemma3", "gpt2"):  # gemma3's attention holds q/k norms: probed, not post-LN
        ad = shared_tiny(arch)
        assert attention_geometry(ad, 0).out_module is ad.structure.attn[0]


def test_stop_after_refused_by_token_logprobs_with_a_pointer_to_forward(shared_tiny):
    ad = shared_tiny("llama")
    enc = ad.encode("The cat", target=" sat")
    with torch.no_grad(), ad.hooks(cache="layers.0.resid_post", stop_after="layers.0.resid_post") as h:
        with pytest.raises(ValueError, match=r"stop_after.*adapter\.forward"):
            ad.token_logprobs(enc)
        assert ad.forward(enc) is None
    assert h.cache["layers.0.resid_post"].shape[0] == 1
    assert ad.token_logprobs(enc).shape == enc.input_ids[None].shape  # fine once the session is gone
