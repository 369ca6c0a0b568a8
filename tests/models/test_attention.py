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
