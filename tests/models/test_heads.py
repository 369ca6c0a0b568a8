"""Extra heads (MOD-15): outputs are module(hooked tensor), trainable, beside the model, saved and loaded."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import tokensmith as ts
from tokensmith.models import heads as H
from tokensmith.optimization.training.mtp import MTPHead

CAUSAL = ["gpt2", "llama", "qwen2", "gemma3", "gpt_neox"]
ITEMS = ["The cat sat on the mat", "A b", "Left padding makes this row the longest one"]

pytestmark = pytest.mark.usefixtures("torch_one_thread")

_CACHE: dict[str, ts.ModelAdapter] = {}


def _tiny(arch: str) -> ts.ModelAdapter:
    """A tiny adapter owned by this module (heads are attached to it; removed after every test)."""
    if arch not in _CACHE:
        _CACHE[arch] = ts.tiny(arch, seed=0)
    return _CACHE[arch]


@pytest.fixture(autouse=True)
def _no_leftover_heads():
    yield
    for ad in _CACHE.values():
        for name in list(H.heads(ad)):
            H.remove_head(ad, name)
        ad.model.zero_grad(set_to_none=True)


class TwoLayer(nn.Module):
    """A head with no ``head_config``: it must be constructed by the caller before loading."""

    def __init__(self, d: int, k: int):
        super().__init__()
        self.a = nn.Linear(d, 2 * k)
        self.b = nn.Linear(2 * k, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x)))


def _seeded(mod_fn, seed: int):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return mod_fn()


def _attach_three(ad: ts.ModelAdapter) -> dict[str, tuple[nn.Module, str]]:
    d = ad.structure.hidden_size
    spec = {
        "fn": (_seeded(lambda: nn.Linear(d, 5), 1), "final_norm"),
        "last": (MTPHead(d, 16, zero_init=False, seed=3), "layers.-1.resid_post"),
        "mlp0": (_seeded(lambda: TwoLayer(d, 3), 2), "layers.0.mlp.out"),
    }
    for name, (mod, at) in spec.items():
        H.add_head(ad, name, mod, at=at)
    return spec


@pytest.mark.parametrize("arch", CAUSAL)
def test_heads_compute_module_of_hooked_tensor_and_train(arch):
    ad = _tiny(arch)
    batch = ad.encode_batch(ITEMS)  # left-padded
    keys = set(ad.model.state_dict())
    n_modules = len(list(ad.model.modules()))
    n_params = sum(p.numel() for p in ad.model.parameters())
    with torch.no_grad():
        base = ad.forward(batch).logits

    spec = _attach_three(ad)
    points = {name: H.heads(ad)[name].at for name in spec}
    assert points["last"] == f"layers.{ad.structure.num_layers - 1}.resid_post"  # negative index resolved
    # the HF model is unchanged: same parameters, same modules, same state_dict keys
    assert set(ad.model.state_dict()) == keys
    assert len(list(ad.model.modules())) == n_modules
    assert sum(p.numel() for p in ad.model.parameters()) == n_params

    with ad.hooks(cache=sorted(set(points.values()))) as h, H.capture(ad) as out:
        o = ad.forward(batch)
    assert torch.equal(o.logits.detach(), base)  # base logits unchanged, bit for bit
    for name, (mod, _) in spec.items():
        x = h.cache[points[name]]
        with torch.no_grad():
            ref = mod(x)
        assert out[name].shape == ref.shape
        assert torch.allclose(out[name].detach(), ref, atol=1e-6, rtol=0)
        assert out[name].requires_grad
        assert len(out.steps(name)) == 1

    # gradients: head parameters get exactly the gradients of module(x) on the recorded tensor, and the loss
    # reaches the model below the hook point (the embedding)
    loss = sum((out[n] ** 2).mean() for n in spec)
    loss.backward()
    for name, (mod, _) in spec.items():
        params = list(mod.parameters())
        x = h.cache[points[name]]
        ref = torch.autograd.grad((mod(x) ** 2).mean(), params)
        for p, r in zip(params, ref, strict=True):
            assert p.grad is not None and float(p.grad.abs().max()) > 0
            assert torch.allclose(p.grad, r, atol=1e-6 + 1e-4 * float(r.abs().max()), rtol=0)
    emb = ad.structure.embed.weight
    assert emb.grad is not None and float(emb.grad.abs().max()) > 0
    assert set(p for p in H.head_modules(ad).parameters()) == {
        p for m, _ in spec.values() for p in m.parameters()
    }

    # removing restores: no heads, nothing computed, same logits
    for name in list(spec):
        assert H.remove_head(ad, name) is spec[name][0]
    assert H.heads(ad) == {}
    with torch.no_grad(), H.capture(ad) as out2:
        again = ad.forward(batch).logits
    assert len(out2) == 0 and torch.equal(again, base)
    assert set(ad.model.state_dict()) == keys


@pytest.mark.parametrize("arch", CAUSAL)
def test_save_load_round_trip(arch, tmp_path):
    ad = _tiny(arch)
    d = ad.structure.hidden_size
    _attach_three(ad)
    H.add_head(
        ad,
        "cfg",
        _seeded(lambda: nn.Linear(d, 2), 5),
        at="layers.0.resid_post",
        config={"in_features": d, "out_features": 2},
    )
    batch = ad.encode_batch(ITEMS[:2])
    with torch.no_grad():
        _, want = H.forward_with_heads(ad, batch)
    path = H.save_heads(ad, tmp_path / "heads")
    meta = json.loads((path / "heads.json").read_text())
    assert [e["name"] for e in meta["heads"]] == ["fn", "last", "mlp0", "cfg"]
    assert meta["heads"][1]["config"]["intermediate_size"] == 16  # MTPHead.head_config was picked up

    for name in list(H.heads(ad)):  # load into the same adapter with every head removed
        H.remove_head(ad, name)
    other = ad
    # Linear / TwoLayer saved without a config: refused with advice, and nothing attached (atomic)
    with pytest.raises(ValueError, match="construct it, add_head"):
        H.load_heads(other, path)
    assert H.heads(other) == {}
    H.add_head(other, "fn", nn.Linear(d, 5), at="final_norm")  # constructed by the caller, fresh weights
    with pytest.raises(ValueError, match="'mlp0'.*construct it"):
        H.load_heads(other, path)
    assert list(H.heads(other)) == ["fn"]
    H.add_head(other, "mlp0", TwoLayer(d, 3), at="layers.0.mlp.out")
    assert H.load_heads(other, path) == ["fn", "last", "mlp0", "cfg"]
    assert {n: h.at for n, h in H.heads(other).items()} == {e["name"]: e["at"] for e in meta["heads"]}
    assert isinstance(H.heads(other)["last"].module, MTPHead)  # rebuilt from its class path + config
    with torch.no_grad():
        _, got = H.forward_with_heads(other, batch)
    for name in want:
        assert torch.equal(got[name], want[name]), name
    # the base checkpoint stays clean: head weights are not in the model's state_dict
    assert not any(k.startswith(("fn.", "last.", "mlp0.", "cfg.")) for k in other.model.state_dict())


def test_save_pretrained_of_base_is_clean(tmp_path):
    from safetensors import safe_open

    ad = _tiny("llama")
    ad.model.save_pretrained(tmp_path / "before")
    ad.add_head("probe", nn.Linear(ad.structure.hidden_size, 3), at="layers.1.resid_post")  # facade
    assert "probe" in H.heads(ad)
    ad.model.save_pretrained(tmp_path / "after")
    with safe_open(str(tmp_path / "before" / "model.safetensors"), "pt") as f:
        before = {k: f.get_tensor(k) for k in f.keys()}
    with safe_open(str(tmp_path / "after" / "model.safetensors"), "pt") as f:
        after = {k: f.get_tensor(k) for k in f.keys()}
    assert set(before) == set(after) and all(torch.equal(before[k], after[k]) for k in before)


def test_capture_during_generate_records_every_step():
    ad = _tiny("llama")
    lin = ad.add_head("lin", nn.Linear(ad.structure.hidden_size, 2), at="final_norm")
    enc = ad.encode("Once upon a time")
    with ad.hooks(cache="final_norm") as h, H.capture(ad) as out:
        res = ad.generate(enc, max_new_tokens=4, min_new_tokens=4)
    steps = out.steps("lin")
    assert len(steps) == 4 == len(h.cache.steps("final_norm"))  # prefill + 3 decode steps
    assert steps[0].shape[1] == len(enc.input_ids) and all(s.shape[1] == 1 for s in steps[1:])
    for s, x in zip(steps, h.cache.steps("final_norm"), strict=True):
        assert torch.allclose(s, lin(x), atol=1e-6)
    assert res.sequences.shape[1] == len(enc.input_ids) + 4


def test_fp32_head_on_double_model_casts_input():
    ad = ts.tiny("llama", seed=0)
    ad.model.double()
    lin = H.add_head(ad, "lin", nn.Linear(ad.structure.hidden_size, 2), at="final_norm")
    assert lin.weight.dtype == torch.float32
    with ad.hooks(cache="final_norm") as h, H.capture(ad) as out:
        ad.forward("Hello")
    assert out["lin"].dtype == torch.float32
    assert torch.allclose(out["lin"], lin(h.cache["final_norm"].float()), atol=1e-6)


def test_errors():
    ad = _tiny("llama")
    d = ad.structure.hidden_size
    with pytest.raises(TypeError, match="nn.Module"):
        H.add_head(ad, "x", lambda t: t)  # type: ignore[arg-type]
    for bad in ("", "a.b", " a"):
        with pytest.raises(ValueError, match="name"):
            H.add_head(ad, bad, nn.Identity())
    with pytest.raises(ValueError, match="no hook point"):
        H.add_head(ad, "x", nn.Identity(), at="layers.0.nope")
    with pytest.raises(ValueError, match="pattern"):
        H.add_head(ad, "x", nn.Identity(), at="layers.*.resid_post")
    with pytest.raises(ValueError, match="out of range"):
        H.add_head(ad, "x", nn.Identity(), at="layers.7.resid_post")
    with pytest.raises(ValueError, match="cached"):
        H.add_head(ad, "x", nn.Identity(), at="layers.0.attn.probs")
    with pytest.raises(TypeError, match="JSON"):
        H.add_head(ad, "x", nn.Identity(), config={"t": torch.zeros(1)})
    H.add_head(ad, "x", nn.Identity())
    with pytest.raises(ValueError, match="attached already"):
        H.add_head(ad, "x", nn.Identity())
    H.add_head(ad, "x", nn.Linear(d, 1), replace=True)
    assert isinstance(H.heads(ad)["x"].module, nn.Linear)
    with pytest.raises(ValueError, match="no head named"):
        H.remove_head(ad, "y")
    with pytest.raises(ValueError, match="no heads named"), H.capture(ad, "y"):
        pass
    with pytest.raises(FileNotFoundError):
        H.load_heads(ad, "/nonexistent/dir")


def test_load_refuses_mismatches(tmp_path):
    ad = _tiny("llama")
    d = ad.structure.hidden_size
    H.add_head(ad, "lin", nn.Linear(d, 2), config={"in_features": d, "out_features": 2})
    path = H.save_heads(ad, tmp_path / "h")
    other = _tiny("qwen2")
    H.add_head(other, "lin", nn.Linear(d, 3))
    with pytest.raises(ValueError, match="shapes differ"):
        H.load_heads(other, path)
    H.add_head(other, "lin", TwoLayer(d, 2), replace=True)
    with pytest.raises(TypeError, match="saved as"):
        H.load_heads(other, path)
    H.remove_head(other, "lin")
    assert H.load_heads(other, path, names="lin") == ["lin"]  # rebuilt from config
    assert torch.equal(H.heads(other)["lin"].module.weight, H.heads(ad)["lin"].module.weight)
