"""tokensmith.analysis.sweeps: layer delete / swap sweeps (ANA-10) against axioms and a float64 reference."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

import tokensmith as ts
from tokensmith.analysis.sweeps import layer_intervention_sweep

pytestmark = pytest.mark.usefixtures("torch_one_thread")

EPS32 = torch.finfo(torch.float32).eps
CAUSAL = ["gpt2", "llama", "qwen2", "gemma3", "gpt_neox"]
TEXTS = ["The cat sat on the mat.", "Hello world, how are you today?", "A b"]


def _atol(ad, scale=1.0):
    """fp32 logits through L blocks of width d and the head, at magnitude ``scale`` (the sweep takes the
    log-softmax of its fp32 logits in float64, so there is no log-sum-exp rounding term)."""
    s = ad.structure
    return 4 * EPS32 * math.sqrt(s.hidden_size) * (s.num_layers + 1) * max(scale, 1.0)


def _make_identity(ad, i):
    """Block i adds nothing to the residual stream: zero its attention output and MLP down projections."""
    with torch.no_grad():
        for mod in (ad.structure.o_proj[i], ad.structure.mlp_out[i]):
            mod.weight.zero_()
            if getattr(mod, "bias", None) is not None:
                mod.bias.zero_()


def _logits(ad):
    return ad.logits(ad.encode_batch([ad.encode(t) for t in TEXTS]))


@pytest.mark.parametrize("arch", CAUSAL)
def test_identity_block_axioms_every_causal_arch(arch):
    ad = ts.tiny(arch, n_layers=3, seed=1)
    _make_identity(ad, 1)
    before = _logits(ad)
    modules = list(ad.structure.layers)
    f = layer_intervention_sweep(ad, TEXTS, batch_size=2, progress=False)
    assert f.kind == "layer_sweep" and f.meta["n_layers"] == 3
    assert f.op.tolist() == ["none", "delete", "delete", "delete", "swap", "swap"]
    assert f.layer.iloc[1:].tolist() == [0, 1, 2, 0, 1]
    n = sum(len(ad.encode(t).input_ids) - 1 for t in TEXTS)
    assert (f.n_tokens == n).all()
    r = f.set_index(["op", f.layer.fillna(-1)])
    # deleting the identity block, or swapping it with a neighbour (it commutes), changes nothing. Not the swaps
    # on gemma3: its layer types alternate by position (full, sliding, full: RoPE base), and a swapped block
    # runs with the type of its new position, so there block 0 at position 1 computes something else
    for key in [("delete", 1)] + ([] if arch == "gemma3" else [("swap", 0), ("swap", 1)]):
        row = r.loc[key]
        assert abs(row.delta_loss) <= _atol(ad), key
        assert row.top1_agreement == 1.0 and row.kl_to_intact <= 1e-6, key
    # deleting a real block does change the predictions (the axioms above can fail)
    for key in [("delete", 0), ("delete", 2)]:
        assert r.loc[key].kl_to_intact > 1e-4, key
    assert ((f.kl_to_intact >= 0) & f.top1_agreement.between(0, 1)).all()
    assert f.loss.iloc[0] == pytest.approx(r.loc[("delete", 1)].loss, abs=_atol(ad))
    # the model is unchanged afterwards
    assert list(ad.structure.layers) == modules
    assert torch.equal(_logits(ad), before)


def test_swapping_identical_blocks_changes_nothing():
    ad = ts.tiny("gpt_neox", n_layers=3, seed=2)
    ad.structure.layers[1].load_state_dict(ad.structure.layers[0].state_dict())
    f = layer_intervention_sweep(ad, TEXTS, ops="swap", progress=False)
    same, other = f[f.layer == 0].iloc[0], f[f.layer == 1].iloc[0]
    assert abs(same.delta_loss) <= _atol(ad) and same.top1_agreement == 1.0 and same.kl_to_intact <= 1e-6
    assert other.kl_to_intact > 1e-4  # blocks 1 and 2 differ


def _float64_reference(ad, texts, edits):
    """Per edit (loss, delta, top1, kl, n) from float64 deep copies of the HF model whose ModuleList is edited
    directly (no adapter, no hooks), unbatched."""
    ref = copy.deepcopy(ad.model).double()
    with torch.no_grad():
        ids = [ad.encode(t).input_ids[None] for t in texts]
        l0 = [torch.log_softmax(ref(input_ids=x, use_cache=False).logits[0, :-1], -1) for x in ids]
        y = torch.cat([x[0, 1:] for x in ids])[:, None]
        l0 = torch.cat(l0)
        out = []
        for edit in edits:
            cut = copy.deepcopy(ref)
            stack = cut
            for part in ad.structure.layers_path.split("."):
                stack = getattr(stack, part)
            edit(stack, cut.config)
            l1 = torch.cat([torch.log_softmax(cut(input_ids=x, use_cache=False).logits[0, :-1], -1) for x in ids])
            nll0, nll1 = -l0.gather(1, y)[:, 0], -l1.gather(1, y)[:, 0]
            agree = (l0.argmax(-1) == l1.argmax(-1)).double()
            kl = (l0.exp() * (l0 - l1)).sum(-1)
            out.append((float(nll1.mean()), float(nll1.mean() - nll0.mean()), float(agree.mean()),
                        float(kl.mean()), len(agree)))
    return out


def _delete(i):
    def edit(stack, config):
        del stack[i]
        config.num_hidden_layers = len(stack)

    return edit


def _swap(i):
    def edit(stack, config):
        stack[i], stack[i + 1] = stack[i + 1], stack[i]

    return edit


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_delete_and_swap_equal_float64_module_surgery(arch):
    ad = ts.tiny(arch, n_layers=3, seed=4)
    with torch.no_grad():  # peaky distributions: KL ~ 1 nat, so KL(p||q) and KL(q||p) differ by far more than atol
        for p in ad.structure.final_norm.parameters():
            p.mul_(30.0)
    f = layer_intervention_sweep(ad, TEXTS, batch_size=2, progress=False)
    atol = _atol(ad, float(_logits(ad).abs().max()))
    cases = [("delete", 0, _delete(0)), ("delete", 2, _delete(2)), ("swap", 1, _swap(1))]
    refs = _float64_reference(ad, TEXTS, [c[2] for c in cases])
    for (op, i, _), (loss, delta, top1, kl, n) in zip(cases, refs, strict=True):
        row = f[(f.op == op) & (f.layer == i)].iloc[0]
        assert row.n_tokens == n
        np.testing.assert_allclose([row.loss, row.delta_loss, row.kl_to_intact], [loss, delta, kl], rtol=0,
                                   atol=atol)
        assert abs(row.top1_agreement - top1) <= 1 / n  # at most one near-tie may flip between fp32 and fp64
        assert kl > 0.3


def test_batch_size_does_not_matter(shared_tiny):
    ad = shared_tiny("qwen2")
    a = layer_intervention_sweep(ad, TEXTS, batch_size=1, progress=False)
    b = layer_intervention_sweep(ad, TEXTS, batch_size=3, progress=False)
    assert a.op.tolist() == b.op.tolist() and a.top1_agreement.tolist() == b.top1_agreement.tolist()
    cols = ["loss", "delta_loss", "kl_to_intact"]
    np.testing.assert_allclose(a[cols].to_numpy(), b[cols].to_numpy(), rtol=0, atol=_atol(ad))


def test_bad_inputs(shared_tiny):
    ad = shared_tiny("llama")
    for kw, err in [({"layers": [2]}, r"block indices in \[0, 1\]"), ({"layers": [-3]}, "block indices"),
                    ({"layers": [True]}, "block indices"), ({"layers": []}, "empty"),
                    ({"ops": "drop"}, "unknown op"), ({"ops": ()}, "ops is empty"),
                    ({"ops": "swap", "layers": [1]}, "nothing to sweep"), ({"batch_size": 0}, "batch_size")]:
        with pytest.raises(ValueError, match=err):
            layer_intervention_sweep(ad, TEXTS, progress=False, **kw)
    with pytest.raises(TypeError, match="ops must be"):
        layer_intervention_sweep(ad, TEXTS, ops=5, progress=False)
    with pytest.raises(ValueError, match="encoder"):
        layer_intervention_sweep(shared_tiny("bert"), TEXTS, progress=False)
    one = ad.tokenizer.convert_tokens_to_ids("the")
    with pytest.raises(ValueError, match="no predicting position"):
        layer_intervention_sweep(ad, [[one]], progress=False)


def test_plot(shared_tiny):
    f = layer_intervention_sweep(shared_tiny("llama"), TEXTS[:2], progress=False)
    ax = f.plot()
    assert len(ax.lines) >= 2
    import matplotlib.pyplot as plt

    plt.close("all")
