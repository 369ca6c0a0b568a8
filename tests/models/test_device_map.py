"""Models loaded with device_map (accelerate dispatch) are used in place, never moved with .to()."""

import pytest
import torch
from tolerance import assert_fp32_close

import tokensmith as ts


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory):
    ad = ts.tiny("llama")
    d = tmp_path_factory.mktemp("tiny_llama")
    ad.model.save_pretrained(d)
    ad.tokenizer.save_pretrained(d)
    return d, ad


def test_load_path_with_device_map_never_moves_the_model(saved_tiny, monkeypatch):
    d, ref = saved_tiny
    ad = ts.load(str(d), device_map={"": "cpu"})

    def forbidden(*a, **k):
        raise AssertionError("a dispatched model must never be moved with .to()")

    monkeypatch.setattr(ad.model, "to", forbidden)
    monkeypatch.setattr(ad.model, "cuda", forbidden)
    enc = ad.encode("Hello", target=" world", chat=True)
    with torch.no_grad():
        zmax = float(ref.forward(enc).logits.abs().max())
    s = ref.structure
    assert_fp32_close(ad.token_logprobs(enc), ref.token_logprobs(enc), width=s.hidden_size, depth=s.num_layers, scale=zmax, vocab=s.vocab_size)
    res = ad.generate(enc, max_new_tokens=3)
    assert len(res.new_tokens[0]) <= 3


def test_accelerate_dispatch_model(saved_tiny, monkeypatch):
    from accelerate import dispatch_model

    _, ref = saved_tiny
    model = ts.tiny("llama").model
    model = dispatch_model(model, device_map={"": "cpu"})
    ad = ts.ModelAdapter(model, ref.tokenizer)
    monkeypatch.setattr(ad.model, "to", lambda *a, **k: (_ for _ in ()).throw(AssertionError("moved")))
    with ad.hooks(cache=["layers.*.resid_post"]) as h:
        out = ad.forward("Hello there")
    assert out.logits.shape[0] == 1 and len(h.cache) == ad.structure.num_layers
