"""The scoped attention probe equals eager attention; only probed layers leave SDPA."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

import tokensmith as ts
from tokensmith.models.attention import eager_attention_probs
from tokensmith.models.tiny import GEMMA3_SLIDING_WINDOW, tiny_model_and_tokenizer

pytestmark = pytest.mark.usefixtures("torch_one_thread")

ARCHS = ["gpt2", "llama", "qwen2", "gemma3", "gpt_neox", "bert"]
LONG = (
    "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty"
)
TEXTS = ["Hi", LONG, "The quick brown fox"]


@pytest.fixture(scope="module")
def eager_models():
    cache = {}

    def get(arch):
        if arch not in cache:
            model, _ = tiny_model_and_tokenizer(arch, seed=0, attn_implementation="eager")
            cache[arch] = model
        return cache[arch]

    return get


def _eager_attentions(model, b):
    with torch.no_grad():
        out = model(
            input_ids=b.input_ids,
            attention_mask=b.attention_mask,
            position_ids=b.position_ids,
            output_attentions=True,
        )
    return out.attentions


def _assert_real_close(got, ref, b, rows=None):
    """Compare [B, H, Tq, Tk] attention over real query rows / key columns only (``rows``: the query
    rows the probe kept, in padded coordinates)."""
    T = b.input_ids.shape[1]
    sel = torch.arange(T) if rows is None else torch.arange(T)[rows].reshape(-1)
    for r in range(len(b)):
        p = int(b.pad_offsets[r])
        keep = sel >= p
        assert keep.any()
        assert_close(got[r][:, keep, p:], ref[r][:, sel[keep], p:], atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_probe_on_sdpa_model_equals_eager_attention(arch, shared_tiny, eager_models):
    ad = shared_tiny(arch)
    eager = eager_models(arch)
    for (k1, v1), (k2, v2) in zip(ad.model.state_dict().items(), eager.state_dict().items(), strict=True):
        assert k1 == k2 and torch.equal(v1, v2)  # same seed -> same weights
    assert ad.config._attn_implementation == "sdpa"
    b = ad.encode_batch(TEXTS)
    assert b.input_ids.shape[1] > GEMMA3_SLIDING_WINDOW + 2
    ref = _eager_attentions(eager, b)
    s = ad.structure
    with torch.no_grad():
        base = ad.forward(b)
    for layer in range(s.num_layers):
        with torch.no_grad(), ad.capture_attention([layer]) as att:
            probed = ad.forward(b)
        assert ad.config._attn_implementation == "sdpa"
        p = att[layer]
        assert p.shape == (len(b), s.num_heads, b.input_ids.shape[1], b.input_ids.shape[1])
        assert p.dtype == torch.float32
        _assert_real_close(p, ref[layer], b)
        real = b.attention_mask.bool()
        assert_close(p.sum(-1)[real[:, None, :].expand(-1, s.num_heads, -1)],
                     torch.ones(int(real.sum()) * s.num_heads), atol=1e-5, rtol=0)
        out_key = "logits" if hasattr(base, "logits") else "last_hidden_state"
        assert_close(getattr(probed, out_key)[real], getattr(base, out_key)[real], atol=1e-5, rtol=0)
        with pytest.raises(KeyError, match="not probed"):
            att.steps((layer + 1) % s.num_layers)


def test_gemma3_sliding_window_layer_is_banded(shared_tiny, eager_models):
    ad = shared_tiny("gemma3")
    assert ad.config.layer_types == ["sliding_attention", "full_attention"]
    ids = ad.encode(LONG).input_ids[None]
    T = ids.shape[1]
    assert T > GEMMA3_SLIDING_WINDOW + 2
    with torch.no_grad(), ad.capture_attention([0, 1]) as att:
        ad.forward(ids)
    q = torch.arange(T)[:, None]
    k = torch.arange(T)[None, :]
    far = (q - k) >= GEMMA3_SLIDING_WINDOW
    future = k > q
    assert (att[0][..., far] == 0).all() and (att[0][..., future] == 0).all()
    assert (att[1][..., far] > 0).all() and (att[1][..., future] == 0).all()
    with torch.no_grad():
        ref = eager_models("gemma3")(input_ids=ids, output_attentions=True).attentions
    assert_close(att[0], ref[0], atol=1e-5, rtol=0)
    assert_close(att[1], ref[1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_only_probed_layers_leave_sdpa(arch, shared_tiny, monkeypatch):
    import transformers.integrations.sdpa_attention as sdpa_mod

    ad = shared_tiny(arch)
    calls = []
    real_fn = sdpa_mod.sdpa_attention_forward

    def counting(module, *a, **kw):
        calls.append(module)
        return real_fn(module, *a, **kw)

    monkeypatch.setattr(sdpa_mod, "sdpa_attention_forward", counting)
    with torch.no_grad(), ad.capture_attention([1]):
        ad.forward("hello there world")
    assert calls == [ad.structure.attn[0]]  # layer 0 still runs SDPA, layer 1 is the eager probe


def test_rows_selection_and_grouped_heads(shared_tiny, eager_models):
    ad = shared_tiny("qwen2")  # GQA: 4 query heads, 2 kv heads
    s = ad.structure
    assert (s.num_heads, s.num_kv_heads) == (4, 2)
    b = ad.encode_batch(TEXTS)
    ref = _eager_attentions(eager_models("qwen2"), b)
    T = b.input_ids.shape[1]
    for rows in ([-1], slice(T - 3, None), torch.tensor([T - 2, T - 1])):
        with torch.no_grad(), ad.capture_attention([0, 1], rows=rows) as att:
            ad.forward(b)
        for layer in (0, 1):
            _assert_real_close(att[layer], ref[layer], b, rows=rows)
    with torch.no_grad(), ad.capture_attention([1]) as att:
        ad.forward(b)
    g = att.grouped(1)
    assert g.shape == (len(b), s.num_kv_heads, T, T)
    p = att[1]
    n_rep = s.num_heads // s.num_kv_heads
    for kv in range(s.num_kv_heads):  # query head h uses kv head h // n_rep
        assert_close(g[:, kv], p[:, kv * n_rep : (kv + 1) * n_rep].mean(1))
    # negative layer index, attn.probs through the hooks API
    with torch.no_grad(), ad.capture_attention([-1]) as att2, ad.hooks(cache="layers.1.attn.probs"):
        ad.forward(b)
    assert torch.equal(att2[1], p)
    with torch.no_grad(), ad.hooks(cache="layers.1.attn.probs") as h:
        ad.forward(b)
    assert torch.equal(h.cache["layers.1.attn.probs"], p)


def test_probe_on_an_eager_model_records_its_weights(eager_models):
    model, tok = tiny_model_and_tokenizer("llama", seed=0, attn_implementation="eager")
    ad = ts.ModelAdapter(model, tok)
    hooks_before = [tuple(m._forward_hooks) for m in ad.structure.attn]
    b = ad.encode_batch(TEXTS)
    ref = _eager_attentions(eager_models("llama"), b)
    with torch.no_grad(), ad.capture_attention([1]) as att:
        ad.forward(b)
    _assert_real_close(att[1], ref[1], b)
    assert ad.config._attn_implementation == "eager"
    assert [tuple(m._forward_hooks) for m in ad.structure.attn] == hooks_before


def test_probe_over_generation_records_each_step(shared_tiny):
    ad = shared_tiny("llama")
    enc = ad.encode("Once upon a time")
    T0 = len(enc)
    with ad.capture_attention([0]) as att:
        ad.generate(enc, max_new_tokens=3, min_new_tokens=3)
    steps = att.steps(0)
    assert [tuple(x.shape[2:]) for x in steps] == [(T0, T0), (1, T0 + 1), (1, T0 + 2)]
    with pytest.raises(ValueError, match="steps"):
        att[0]
    for x in steps[1:]:
        assert_close(x.sum(-1), torch.ones_like(x.sum(-1)), atol=1e-5, rtol=0)
    assert ad.config._attn_implementation == "sdpa"


def test_probe_errors_and_restoration_on_exception(shared_tiny):
    ad = shared_tiny("llama")
    with pytest.raises(ValueError, match="out of range"):
        ad.capture_attention([5])
    with pytest.raises(RuntimeError, match="inside"):
        with ad.capture_attention([0]):
            raise RuntimeError("inside")
    assert ad.config._attn_implementation == "sdpa"


def test_eager_attention_probs_formula():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 5, 8, generator=g)
    k = torch.randn(2, 2, 5, 8, generator=g)
    got = eager_attention_probs(q, k, None, 8**-0.5, is_causal=True, softcap=None)
    kk = k.repeat_interleave(2, dim=1)
    scores = (q @ kk.transpose(-1, -2)) / 8**0.5
    scores = scores.masked_fill(torch.ones(5, 5, dtype=torch.bool).triu(1), float("-inf"))
    assert_close(got, torch.softmax(scores, -1))
    capped = eager_attention_probs(q, k, None, 8**-0.5, is_causal=False, softcap=0.5)
    s2 = torch.tanh((q @ kk.transpose(-1, -2)) / 8**0.5 / 0.5) * 0.5
    assert_close(capped, torch.softmax(s2, -1))
    masked = eager_attention_probs(q, k, torch.zeros(2, 1, 5, 5, dtype=torch.bool), 1.0)
    assert torch.equal(masked, torch.zeros_like(masked))  # fully masked rows -> zeros, not NaN


@pytest.mark.real_model
def test_smollm2_probe_equals_eager_attention(smollm2_shared):
    ad = smollm2_shared  # GQA: 9 query heads, 3 kv heads
    s = ad.structure
    assert (s.num_heads, s.num_kv_heads) == (9, 3)
    b = ad.encode_batch(["The capital of France is", "Hi"])
    with torch.no_grad(), ad.capture_attention([5]) as att:
        ad.forward(b)
    assert ad.config._attn_implementation == "sdpa"
    ad.config._attn_implementation = "eager"  # same weights, eager kernel, restored below
    try:
        ref = _eager_attentions(ad.model, b)
    finally:
        ad.config._attn_implementation = "sdpa"
    _assert_real_close(att[5], ref[5], b)
    assert att.grouped(5).shape == (2, 3, *att[5].shape[2:])


# ---------------------------------------------------------------- issue 5 §5: rows, exit order, hybrids
def _padded_ids(T: int = 12, pad: int = 5):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(10, 2000, (2, T), generator=g)
    am = torch.ones(2, T, dtype=torch.long)
    am[1, :pad] = 0
    ids[1, :pad] = 0
    return {"input_ids": ids, "attention_mask": am}


@pytest.mark.parametrize("rows", [[-1], slice(-3, None), torch.tensor([2, 7, 11]), 4])
def test_rows_probe_computes_only_the_requested_rows(rows, shared_tiny, monkeypatch):
    """rows=... equals the full probe's rows, leaves the layer's SDPA output untouched, and never builds
    a [B, H, T, T] score matrix (every softmax the probe runs has |rows| query rows)."""
    ad = shared_tiny("qwen2")  # GQA 4/2
    b = _padded_ids()
    T = b["input_ids"].shape[1]
    sel = torch.arange(T)[rows].reshape(-1)
    with torch.no_grad():
        base = ad.forward(dict(b)).logits
    with torch.no_grad(), ad.capture_attention([0, 1]) as full:
        ad.forward(dict(b))
    shapes = []
    real_softmax = torch.softmax

    def recording_softmax(x, *a, **kw):
        shapes.append(tuple(x.shape))
        return real_softmax(x, *a, **kw)

    monkeypatch.setattr(torch, "softmax", recording_softmax)
    with torch.no_grad(), ad.capture_attention([0, 1], rows=rows) as att:
        out = ad.forward(dict(b)).logits
    monkeypatch.setattr(torch, "softmax", real_softmax)
    assert shapes and all(s[-2] == len(sel) for s in shapes), shapes  # no [.., T, T] matrix
    assert max(s[0] * s[1] * s[2] * s[3] for s in shapes) == 2 * 4 * len(sel) * T
    assert torch.equal(out, base)  # probed layers kept their SDPA output
    for layer in (0, 1):
        got = att[layer]
        assert got.shape == (2, 4, len(sel), T)
        # same formula on a subset of rows: equal up to fp32 rounding of the score dot products (d = 16)
        assert_close(got, full[layer][:, :, sel], atol=1e-6, rtol=0)


def test_rows_probe_during_generation_takes_the_last_row(shared_tiny):
    ad = shared_tiny("llama")
    enc = ad.encode("Once upon a time")
    T0 = len(enc)
    with ad.capture_attention([1], rows=[-1]) as att:
        ad.generate(enc, max_new_tokens=2, min_new_tokens=2)
    with ad.capture_attention([1]) as full:
        ad.generate(enc, max_new_tokens=2, min_new_tokens=2)
    assert [tuple(x.shape[2:]) for x in att.steps(1)] == [(1, T0), (1, T0 + 1)]
    for got, ref in zip(att.steps(1), full.steps(1), strict=True):
        assert_close(got, ref[:, :, -1:], atol=1e-6, rtol=0)


def test_probes_exited_out_of_order_restore_the_implementation(shared_tiny):
    from tokensmith.models.attention import PROBE_IMPL

    ad = shared_tiny("llama")
    ids = torch.tensor([[11, 12, 13, 14]])
    p1 = ad.capture_attention([0]).__enter__()
    p2 = ad.capture_attention([1]).__enter__()
    p1.__exit__(None, None, None)
    assert ad.config._attn_implementation == PROBE_IMPL  # p2 is still open
    with torch.no_grad():
        ad.forward(ids)
    assert len(p2.steps(1)) == 1 and len(p1.steps(0)) == 0
    p2.__exit__(None, None, None)
    assert ad.config._attn_implementation == "sdpa"
    with torch.no_grad():
        ad.forward(ids)
    assert len(p2.steps(1)) == 1  # nothing recorded after exit
    # in-order nesting and a re-entered probe still restore
    with ad.capture_attention([0]), ad.capture_attention([1]):
        assert ad.config._attn_implementation == PROBE_IMPL
    assert ad.config._attn_implementation == "sdpa"


def _tiny_hybrid(kind: str):
    """A 2-layer, 64-wide hybrid whose layer 0 is not attention (recurrent / linear attention)."""
    import transformers

    from tokensmith.models.tiny import _decoder_tokenizer

    tok = _decoder_tokenizer()
    common = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, pad_token_id=tok.pad_token_id,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    if kind == "qwen3_next":
        cfg = transformers.Qwen3NextConfig(
            **common, head_dim=16, layer_types=["linear_attention", "full_attention"], linear_num_value_heads=2,
            linear_num_key_heads=2, linear_key_head_dim=16, linear_value_head_dim=16, num_experts=2,
            num_experts_per_tok=1, moe_intermediate_size=32, shared_expert_intermediate_size=32)
        cls = transformers.Qwen3NextForCausalLM
    else:
        cfg = transformers.RecurrentGemmaConfig(**common, lru_width=64, block_types=["recurrent", "attention"],
                                                attention_window_size=16)
        cls = transformers.RecurrentGemmaForCausalLM
    cfg._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = cls(cfg).eval()
    return ts.ModelAdapter(model, tok)


@pytest.mark.parametrize("kind", ["qwen3_next", "recurrent_gemma"])
def test_hybrid_attention_capture_per_attention_layer(kind):
    ad = _tiny_hybrid(kind)
    caps = ad.capabilities()
    assert caps["attention_layers"] == [1]
    assert caps["features"]["attention_probe"] is True
    b = _padded_ids(T=8, pad=3)
    with torch.no_grad(), ad.capture_attention() as att:  # default: the attention layers
        ad.forward(dict(b))
    assert att.layers == [1]
    assert ad.config._attn_implementation == "sdpa"
    pos = (b["attention_mask"].cumsum(-1) - 1).clamp_min(0)
    ad.config._attn_implementation = "eager"
    try:
        with torch.no_grad():
            ref = ad.model(**b, position_ids=pos, output_attentions=True).attentions[-1]
    finally:
        ad.config._attn_implementation = "sdpa"
    for r, p in ((0, 0), (1, 3)):  # real query rows / key columns
        assert_close(att[1][r][:, p:, p:], ref[r][:, p:, p:], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match=r"layers with attention: \[1\]"):
        ad.capture_attention([0])
    with pytest.raises(ValueError, match=r"layers with attention: \[1\]"):
        ad.capture_attention([-2, 1])


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox"])
def test_fused_qkv_probe_forward_is_not_recorded_by_an_open_attention_probe(arch):
    """The one-token forward that identifies a fused QKV layout runs when a q/k/v hook is first requested;
    inside an open capture_attention block it must not add a record (it did: 'recorded 2 times')."""
    ad = ts.tiny(arch)  # fresh: the layout is probed once per model
    ids = ad.encode("a b c d").input_ids[None]
    with torch.no_grad(), ad.capture_attention(layers=[0]) as att, ad.hooks(cache="layers.0.attn.v") as h:
        ad.forward(ids)
    assert len(att.steps(0)) == 1 and att[0].shape[-1] == ids.shape[1]
    assert h.cache["layers.0.attn.v"].shape[1] == ids.shape[1]
