"""Adapter functions on models dispatched by accelerate, the way ``device_map="auto"`` builds them.

A sharded or offloaded model is not moved with ``.to()``: accelerate puts an ``AlignDevicesHook`` on its
modules that moves activations to each module's execution device, and for *offloaded* modules (device map
``"cpu"`` beside a GPU, or ``"disk"``) keeps the weights out of the module (its parameters are ``meta``
tensors) and loads them at each forward. This machine has no GPU, so the tests use the one kind of split a
CPU can host: the input embeddings and the first block on ``"cpu"``, the rest offloaded to ``"disk"`` (an
``offload_dir`` under ``tmp_path``). The hooks installed are the same classes a multi-GPU or CPU-offload map
installs; what a CPU cannot show is a cross-device mismatch (``cuda:0`` vs ``cuda:1``).

Each check compares the dispatched adapter with the undispatched model built from the same seed (an
independent forward through plain modules), to the fp32 tolerance of ``tests/tolerance.py``.
"""

from __future__ import annotations

import pytest
import torch
from tolerance import assert_fp32_close

import tokensmith as ts
from tokensmith.models.tiny import TINY_ARCHS

CAUSAL = [a for a in TINY_ARCHS if a not in ("bert", "t5")]  # gpt2, llama, qwen2, gemma3, gpt_neox
PROMPT, TARGET = "The quick brown fox", " jumps over the dog"


def _device_map(ref: ts.ModelAdapter, embed: str = "cpu") -> dict[str, str]:
    """A manual map at the granularity ``infer_auto_device_map`` uses: the input embedding (on ``embed``) and
    layer 0 on "cpu", every other layer and every other child of the layers' parent (final norm, rotary
    tables, GPT-2's position table) and of the root (the LM head) on "disk"."""
    s = ref.structure
    m = ref.model
    parent = s.layers_path.rsplit(".", 1)[0]
    dm: dict[str, str] = {}
    for name, _ in m.get_submodule(parent).named_children():
        path = f"{parent}.{name}"
        if path == s.layers_path:
            dm.update({f"{path}.{i}": ("cpu" if i == 0 else "disk") for i in range(s.num_layers)})
        elif path != s.embed_path:
            dm[path] = "disk"
    dm.update({name: "disk" for name, _ in m.named_children() if name != parent})
    dm[s.embed_path] = embed
    return dm


def _dispatch(ref: ts.ModelAdapter, arch: str, offload_dir, embed: str = "cpu") -> ts.ModelAdapter:
    """An adapter over a fresh copy of ``ref``'s weights (same seed), dispatched with ``_device_map``."""
    from accelerate import dispatch_model

    from tokensmith.models.tiny import tiny_model_and_tokenizer

    model, tok = tiny_model_and_tokenizer(arch)
    model = dispatch_model(model, device_map=_device_map(ref, embed), offload_dir=str(offload_dir))
    return ts.ModelAdapter(model, tok)


@pytest.fixture(scope="module", params=CAUSAL)
def pair(request, shared_tiny, tmp_path_factory):
    """(undispatched reference, adapter over the same weights dispatched with disk offload); read-only."""
    ref = shared_tiny(request.param)
    return ref, _dispatch(ref, request.param, tmp_path_factory.mktemp(f"offload_{request.param}"))


@pytest.fixture(scope="module", params=["llama", "gpt2"])  # untied and tied
def offloaded_embed(request, shared_tiny, tmp_path_factory):
    """As ``pair``, with the input embedding offloaded to disk as well; read-only."""
    ref = shared_tiny(request.param)
    return ref, _dispatch(ref, request.param, tmp_path_factory.mktemp(f"offload_e_{request.param}"), embed="disk")


def _close(actual, expected, ref: ts.ModelAdapter, scale: float | None = None, **kw) -> None:
    s = ref.structure
    assert_fp32_close(actual.detach().float().cpu(), expected.detach().float().cpu(), width=s.hidden_size,
                      depth=s.num_layers, scale=scale, **kw)


def _zmax(ref: ts.ModelAdapter, enc) -> float:
    with torch.no_grad():
        return float(ref.forward(enc).logits.abs().max())


def test_accelerate_hooks_are_installed_and_weights_offloaded(pair):
    _, ad = pair
    s = ad.structure
    last = s.layers[-1]
    offloaded = [m for m in last.modules() if getattr(getattr(m, "_hf_hook", None), "offload", False)]
    assert offloaded, "the last layer should carry accelerate offload hooks"
    assert all(p.device.type == "meta" for p in last.parameters())
    assert all(p.device.type == "cpu" for p in s.layers[0].parameters())
    assert ad.device == torch.device("cpu")


def test_forward_and_token_logprobs(pair):
    ref, ad = pair
    enc = ref.encode(PROMPT, target=TARGET, chat=True)
    z = _zmax(ref, enc)
    with torch.no_grad():
        _close(ad.forward(enc).logits, ref.forward(enc).logits, ref, scale=z)
    lp = ad.token_logprobs(enc)
    assert lp.shape == enc.input_ids.reshape(1, -1).shape and bool((lp[0][enc.target_mask] < 0).all())
    _close(lp, ref.token_logprobs(enc), ref, scale=z, vocab=ref.structure.vocab_size)
    batch = ref.encode_batch([ref.encode(PROMPT, target=TARGET), ref.encode("Hi", target=" there")])  # left-padded
    _close(ad.token_logprobs(batch, max_batch_size=1), ref.token_logprobs(batch), ref, scale=z,
           vocab=ref.structure.vocab_size)


def test_hooks_cache_equals_undispatched(pair):
    ref, ad = pair
    enc = ref.encode(PROMPT, target=TARGET)
    names = ["embed", "layers.*.resid_post", "layers.*.attn.out", "layers.*.mlp.out", "final_norm"]
    caches = []
    for a in (ad, ref):
        with a.hooks(cache=names) as h, torch.no_grad():
            a.forward(enc)
        caches.append(h.cache)
    got, want = caches
    assert set(got) == set(want) and len(want) == 2 + 3 * ref.structure.num_layers
    for k in want:
        assert got[k].shape == want[k].shape, k
        _close(got[k], want[k], ref)


def test_unembed(pair):
    ref, ad = pair
    h = torch.randn(3, 5, ref.structure.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref.unembed(h)
        _close(ad.unembed(h), want, ref)
        _close(ad.unembed(h, final_norm=False), ref.unembed(h, final_norm=False), ref)


def test_embed_inputs_embeds_and_gradients(pair):
    """The attribution path: forward from ``inputs_embeds`` and d(log p)/d(embeddings), d/d(one-hot)."""
    ref, ad = pair
    enc = ref.encode(PROMPT, target=TARGET)
    ids = enc.input_ids.reshape(1, -1)
    z = _zmax(ref, enc)
    _close(ad.embed(ids), ref.embed(ids), ref)
    grads, onehots = [], []
    for a in (ad, ref):
        e = a.embed(ids).detach().requires_grad_(True)
        lp = a.token_logprobs(enc, inputs_embeds=e, grad=True)
        lp.sum().backward()
        grads.append((lp.detach(), e.grad))
        emb, oh = a.onehot_embeds(ids, torch.ones_like(ids, dtype=torch.bool))
        a.token_logprobs(enc, inputs_embeds=emb, grad=True).sum().backward()
        onehots.append(oh.grad)
    (lp_d, g_d), (lp_r, g_r) = grads
    _close(lp_d, lp_r, ref, scale=z, vocab=ref.structure.vocab_size)
    assert float(g_r.abs().max()) > 0
    _close(g_d, g_r, ref)
    _close(onehots[0], onehots[1], ref)


def test_steer(pair):
    ref, ad = pair
    v = torch.randn(ref.structure.hidden_size, generator=torch.Generator().manual_seed(1))
    plain = ref.next_token_logprobs(PROMPT)
    out = []
    for a in (ad, ref):
        with a.steer("layers.0.resid_post", v, alpha=4.0):
            out.append(a.next_token_logprobs(PROMPT))
    _close(out[0], out[1], ref, scale=float(out[1].abs().max()))
    assert float((out[1] - plain).abs().max()) > 1e-3  # the edit changed something


@pytest.mark.parametrize("op", ["skip", "swap"])
def test_skip_and_swap_layers(pair, op):
    ref, ad = pair
    plain = ref.logits(PROMPT)
    out = []
    for a in (ad, ref):
        with a.skip_layers([1]) if op == "skip" else a.swap_layers(0, 1):
            out.append(a.logits(PROMPT))
    _close(out[0], out[1], ref, scale=float(out[1].abs().max()))
    assert float((out[1] - plain).abs().max()) > 1e-3
    _close(ad.logits(PROMPT), plain, ref, scale=float(plain.abs().max()))  # restored on exit


def test_generate_greedy_tokens_equal(pair):
    ref, ad = pair
    enc = ref.encode("Once upon a time", chat=True)
    got, want = ad.generate(enc, max_new_tokens=6), ref.generate(enc, max_new_tokens=6)
    assert torch.equal(got.sequences, want.sequences)
    v = torch.randn(ref.structure.hidden_size, generator=torch.Generator().manual_seed(2))
    seqs = []
    for a in (ad, ref):  # hooks run at every decode step of a dispatched model too
        with a.steer("layers.1.resid_post", v, alpha=3.0):
            seqs.append(a.generate(enc, max_new_tokens=4).sequences)
    assert torch.equal(seqs[0], seqs[1])


def test_integrated_gradients(pair):
    from tokensmith.attribution import attribute

    ref, ad = pair
    res = [attribute(a, "The capital of France is", target=" Paris", method="integrated_gradients", n_steps=8,
                     progress=False) for a in (ad, ref)]
    assert res[0].tokens == res[1].tokens and torch.equal(res[0].valid, res[1].valid)
    scale = float(res[1].scores.abs().max())
    _close(res[0].scores, res[1].scores, ref, scale=scale)
    _close(res[0].delta, res[1].delta, ref, scale=scale)


def test_logit_lens(pair):
    from tokensmith.analysis import logit_lens

    ref, ad = pair
    got, want = logit_lens(ad, "The capital of France is"), logit_lens(ref, "The capital of France is")
    assert len(got) == len(want) == (ref.structure.num_layers + 1) * len(ref.encode("The capital of France is").input_ids)
    assert got["top_id"].tolist() == want["top_id"].tolist()
    for col in ("top_prob", "entropy"):
        _close(torch.tensor(got[col].to_numpy(float)), torch.tensor(want[col].to_numpy(float)), ref, scale=1.0)
    # KL(p_L ‖ p_l) sums V terms of the log-prob error
    kl = [torch.tensor(f["kl_to_final"].to_numpy(float)) for f in (got, want)]
    _close(kl[0], kl[1], ref, scale=_zmax(ref, "The capital of France is"), vocab=ref.structure.vocab_size)


# ----------------------------------------------------------------- weights read directly (models.offload)


def test_offloaded_embeddings_and_head_are_read_from_the_offload_store(offloaded_embed):
    """With the embedding offloaded too, its weight is a meta tensor: ``adapter.device`` is the hook's
    execution device, ``E`` / ``W_U`` are the stored values, tying comes from the config, the traced head
    chain is found, and the one-hot path (which multiplies by ``E``) still works."""
    ref, ad = offloaded_embed
    s = ad.structure
    assert s.embed.weight.device.type == "meta" and s.lm_head.weight.device.type == "meta"
    assert ad.device == torch.device("cpu")
    assert ad.tied == ref.tied == (ref.model.config.model_type == "gpt2")
    assert s.embed_scale == ref.structure.embed_scale
    assert torch.equal(ad.E, ref.E) and torch.equal(ad.W_U, ref.W_U)
    assert s.head_paths == ref.structure.head_paths
    enc = ref.encode(PROMPT, target=TARGET)
    ids = enc.input_ids.reshape(1, -1)
    _close(ad.token_logprobs(enc), ref.token_logprobs(enc), ref, scale=_zmax(ref, enc), vocab=s.vocab_size)
    ohs = []
    for a in (ad, ref):
        emb, oh = a.onehot_embeds(ids, torch.ones_like(ids, dtype=torch.bool))
        a.token_logprobs(enc, inputs_embeds=emb, grad=True).sum().backward()
        ohs.append(oh.grad)
    _close(ohs[0], ohs[1], ref)
    x = torch.randn(2, s.hidden_size, generator=torch.Generator().manual_seed(3))
    assert torch.equal(ad.nearest_tokens(x), ref.nearest_tokens(x))


def test_norm_form_of_an_offloaded_norm(pair):
    from tokensmith.models.norms import attention_norms, norm_form

    ref, ad = pair
    assert next(ad.structure.final_norm.parameters()).device.type == "meta"
    x = torch.randn(4, ref.structure.hidden_size, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    got, want = norm_form(ad.structure.final_norm), norm_form(ref.structure.final_norm)
    assert torch.equal(got(x), want(x))
    pre = attention_norms(ad, 1).pre  # a norm inside the offloaded layer 1
    assert torch.equal(norm_form(pre)(x), norm_form(attention_norms(ref, 1).pre)(x))


def test_vocabulary_surgery_refuses_offloaded_matrices(offloaded_embed):
    """Writing rows into the copy ``E`` returns for an offloaded matrix would be lost: refused, unchanged."""
    _, ad = offloaded_embed
    n, d = len(ad.tokenizer), ad.structure.hidden_size
    with pytest.raises(ValueError, match="input embedding is offloaded by accelerate"):
        ad.add_tokens(["<zz_new>"])
    assert len(ad.tokenizer) == n and ad.structure.vocab_size == ad.E.shape[0]
    with pytest.raises(ValueError, match="input embedding is offloaded by accelerate"):
        ad.set_embeddings([5], torch.zeros(1, d))


def test_surgery_refuses_an_offloaded_untied_head(pair):
    ref, ad = pair
    if ref.tied or ad.structure.lm_head.weight.device.type != "meta":
        pytest.skip("the head is tied to the embedding or not offloaded here")
    d = ad.structure.hidden_size
    before = ad.E[5].detach().clone()
    with pytest.raises(ValueError, match="LM head is offloaded by accelerate"):
        ad.set_embeddings([5], torch.zeros(1, d), torch.zeros(1, d))
    assert torch.equal(ad.E[5], before)


def test_offloaded_encoder_structure_and_pooling(shared_tiny, tmp_path):
    """BERT with its embeddings and prediction head on disk: the traced head chain (transform + decoder),
    forward, hooks and sentence pooling equal the undispatched model."""
    from accelerate import dispatch_model

    from tokensmith.models import pooling
    from tokensmith.models.tiny import tiny_model_and_tokenizer

    ref = shared_tiny("bert")
    dm = {"bert.embeddings": "disk", "bert.encoder.layer.0": "cpu", "bert.encoder.layer.1": "disk", "cls": "disk"}
    model, tok = tiny_model_and_tokenizer("bert")
    model = dispatch_model(model, device_map=dm, offload_dir=str(tmp_path))
    ad = ts.ModelAdapter(model, tok)
    assert ad.structure.head_paths == ref.structure.head_paths and ad.tied == ref.tied
    outs = []
    for a in (ad, ref):
        with a.hooks(cache="layers.*.resid_post") as h, torch.no_grad():
            z = a.forward("hello world").logits
        outs.append((z, h.cache))
    _close(outs[0][0], outs[1][0], ref)
    for k in outs[1][1]:
        _close(outs[0][1][k], outs[1][1][k], ref)
    texts = ["hello world", "a small cat"]
    _close(pooling.sentence_embedding(model.bert, ref.tokenizer, texts),
           pooling.sentence_embedding(ref.model.bert, ref.tokenizer, texts), ref)


@pytest.mark.parametrize("method", ["dla", "decomposition_rollout", "alti"])
def test_decomposition_attribution_on_offloaded_layers(pair, method):
    # these read o_proj's weight itself (attribution.internals.output_projection, through offloaded_value)
    from tokensmith.attribution import attribute

    ref, ad = pair
    res = [attribute(a, "The capital of France is", target=" Paris", method=method, progress=False) for a in (ad, ref)]
    _close(res[0].scores, res[1].scores, ref, scale=float(res[1].scores.abs().max()))


# ----------------------------------------------------------------- transformers' own device_map loading


@pytest.fixture(scope="module")
def saved(shared_tiny, tmp_path_factory):
    out = {}
    for arch in ("llama", "gpt2"):
        ref = shared_tiny(arch)
        d = tmp_path_factory.mktemp(f"saved_{arch}")
        ref.model.save_pretrained(d)
        ref.tokenizer.save_pretrained(d)
        out[arch] = (ref, d)
    return out


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_load_with_a_disk_offload_device_map(saved, arch, tmp_path):
    """``ts.load(dir, device_map={...}, offload_folder=...)`` forwards both to ``from_pretrained``."""
    ref, d = saved[arch]
    dm = _device_map(ref)
    if ref.tied:  # transformers stores a tied head once: it must sit with the embedding (as "auto" places it)
        dm[ref.structure.lm_head_path] = dm[ref.structure.embed_path]
    ad = ts.load(str(d), device_map=dm, offload_folder=str(tmp_path))
    assert "disk" in set(ad.model.hf_device_map.values())
    assert all(p.device.type == "meta" for p in ad.structure.layers[-1].parameters())
    enc = ref.encode(PROMPT, target=TARGET, chat=True)
    _close(ad.token_logprobs(enc), ref.token_logprobs(enc), ref, scale=_zmax(ref, enc), vocab=ref.structure.vocab_size)
    caches = []
    for a in (ad, ref):
        with a.hooks(cache="layers.*.resid_post") as h, torch.no_grad():
            a.forward(enc)
        caches.append(h.cache)
    for k in caches[1]:
        _close(caches[0][k], caches[1][k], ref)
    assert torch.equal(ad.generate(enc, max_new_tokens=5).sequences, ref.generate(enc, max_new_tokens=5).sequences)
    assert torch.equal(ad.W_U, ref.W_U)


def test_load_device_map_auto(saved):
    """``device_map="auto"`` passes through ``ts.load`` (on a CPU-only machine accelerate puts everything on
    the CPU; on GPUs it shards, as the tests above simulate)."""
    ref, d = saved["llama"]
    ad = ts.load(str(d), device_map="auto")
    enc = ref.encode(PROMPT, target=TARGET)
    _close(ad.token_logprobs(enc), ref.token_logprobs(enc), ref, scale=_zmax(ref, enc), vocab=ref.structure.vocab_size)
