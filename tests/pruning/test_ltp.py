"""LTP (Kim et al. 2022): thresholds, soft masks, penalty, physical hard pruning vs its simulation, FLOPs."""

from __future__ import annotations

import math
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tokensmith as ts
from tokensmith.models.masking import attention_override
from tokensmith.pruning.ltp import (
    LTPOutput,
    LTPThresholds,
    classification_loss,
    ltp_flops,
    ltp_flops_ratio,
    ltp_forward,
    ltp_layer_costs,
    ltp_mask_forward,
    ltp_penalty,
    ltp_scores,
    ltp_soft_mask,
    next_token_loss,
    train_ltp_thresholds,
)

pytestmark = pytest.mark.usefixtures("torch_one_thread")

TEXTS = ["the cat sat on the mat today", "a dog", "one two three four five six seven eight nine"]
EPS = torch.finfo(torch.float32).eps


def _tol(x: torch.Tensor, k: float = 64.0) -> float:
    """fp32 rounding tolerance scaled by the magnitude of the compared values (a few ops deep)."""
    return k * EPS * max(1.0, float(x.detach().abs().max()))


@pytest.fixture(scope="module")
def bert3():
    # a wider weight init than the default 0.02 gives peaked (not near-uniform) attention, so thresholds split
    # tokens by a clear margin
    return ts.tiny("bert", n_layers=3, initializer_range=0.2)


@pytest.fixture(scope="module")
def llama3():
    return ts.tiny("llama", n_layers=3)


# ---------------------------------------------------------------------------------------------- formulas
def test_thresholds_linear_ramp_plus_delta():
    th = LTPThresholds(4, theta_base=0.2, layers=[1, 3])
    with torch.no_grad():
        th.delta.copy_(torch.tensor([9.0, 0.01, 9.0, -0.02]))
    theta = th.theta().detach()
    assert math.isinf(theta[0]) and theta[0] < 0 and math.isinf(theta[2])
    assert theta[1].item() == pytest.approx(0.2 * 2 / 4 + 0.01, abs=1e-7)
    assert theta[3].item() == pytest.approx(0.2 * 4 / 4 - 0.02, abs=1e-7)
    assert th.pruned_layers() == [1, 3]
    init = LTPThresholds(3, init=[-math.inf, 0.1, 0.3])
    assert init.pruned_layers() == [1, 2] and init.theta()[2].item() == pytest.approx(0.3)


def test_soft_mask_hand_values():
    s = torch.tensor([[0.30, 0.10, 0.20, -math.inf]])
    m = ltp_soft_mask(s, 0.2, 0.05)
    expect = [1 / (1 + math.exp(-2.0)), 1 / (1 + math.exp(2.0)), 0.5, 0.0]
    assert m.flatten().tolist() == pytest.approx(expect, abs=1e-6)
    valid = torch.tensor([[True, False, True, True]])
    assert ltp_soft_mask(s, 0.2, 0.05, valid)[0, 1] == 0.0
    # θ = -inf keeps every real token exactly (no inf - inf)
    assert ltp_soft_mask(s, -math.inf, 0.05).flatten().tolist() == [1.0, 1.0, 1.0, 0.0]
    # gradient w.r.t. θ: dm/dθ = -σ(x)(1-σ(x))/T
    th = torch.tensor(0.2, requires_grad=True)
    ltp_soft_mask(s[:, :1], th, 0.05).sum().backward()
    sg = 1 / (1 + math.exp(-2.0))
    assert th.grad.item() == pytest.approx(-sg * (1 - sg) / 0.05, rel=1e-5)


def test_scores_mean_over_heads_and_real_queries():
    # B=1, H=2, T=3; the first column is a pad: its query row must not vote, its key gets -inf
    A = torch.tensor(
        [
            [
                [[0.0, 0.5, 0.5], [0.0, 0.2, 0.8], [0.0, 0.6, 0.4]],
                [[0.0, 1.0, 0.0], [0.0, 0.4, 0.6], [0.0, 0.0, 1.0]],
            ]
        ]
    )
    A[0, :, 0] = torch.tensor([[0.0, 9.0, 9.0], [0.0, 9.0, 9.0]])  # garbage on the pad query row
    valid = torch.tensor([[False, True, True]])
    s = ltp_scores(A, valid)
    assert s[0, 0] == -math.inf
    # key 1: heads x real queries (rows 1, 2): (0.2 + 0.6 + 0.4 + 0.0) / 4
    assert s[0, 1].item() == pytest.approx((0.2 + 0.6 + 0.4 + 0.0) / 4)
    assert s[0, 2].item() == pytest.approx((0.8 + 0.4 + 0.6 + 1.0) / 4)


def test_penalty_is_mean_kept_fraction():
    valid = torch.tensor([[True, True, True, True], [False, False, True, True]])
    m1 = torch.tensor([[1.0, 0.5, 0.5, 0.0], [0.7, 0.7, 1.0, 0.0]])  # pad entries must not count
    m2 = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]])
    expect = ((2.0 / 4 + 1.0 / 2) + (1.0 / 4 + 2.0 / 2)) / 4  # mean over 2 layers x 2 rows
    assert ltp_penalty([m1, m2], valid).item() == pytest.approx(expect)


def test_flops_formula_hand_values():
    d = 16
    P, W = [12 * d * d] * 2, [d, d]  # BERT-like: 12 n d² + 2 n² d per layer (the LTP paper's MAC count)
    tokens = torch.tensor([[10.0, 8.0], [5.0, 8.0]])  # [L, B]
    per_row = ltp_flops(tokens, P, W)
    c = lambda n: 12 * n * d * d + 2 * n * n * d  # noqa: E731
    assert per_row.tolist() == pytest.approx([c(10) + c(5), c(8) + c(8)])
    r = ltp_flops_ratio(tokens, torch.tensor([10, 8]), P, W)
    assert r == pytest.approx((c(10) + c(5) + 2 * c(8)) / (2 * c(10) + 2 * c(8)))


def test_layer_costs_bert(bert3):
    cfg = bert3.config
    d, f = cfg.hidden_size, cfg.intermediate_size
    P, W = ltp_layer_costs(bert3)
    assert P.tolist() == [4 * d * d + 2 * d * f] * 3  # q, k, v, o + the two MLP maps
    assert W.tolist() == [d] * 3


# ---------------------------------------------------------------------------------------------- equality to the plain model
@pytest.mark.parametrize("arch", ["bert", "llama", "gpt2"])
def test_keep_all_equals_plain_forward(arch, bert3, llama3, shared_tiny):
    ad = {"bert": bert3, "llama": llama3}.get(arch) or shared_tiny(arch)  # gpt2: learned absolute positions
    L = ad.structure.num_layers
    batch = ad.encode_batch(TEXTS)
    with ad.hooks(cache=[f"layers.{L - 1}.resid_post"]) as h:
        plain = ad.forward(batch)
    ref = h.cache[f"layers.{L - 1}.resid_post"]
    valid = batch.attention_mask.bool()
    # θ = -inf (one forward) and θ below every score (the stage-by-stage run_layers path, nothing dropped)
    for th in (LTPThresholds.keep_all(L), LTPThresholds(L, init=[-1.0] * L)):
        out = ltp_forward(ad, batch, th, pooling="mean")
        assert out.physical and out.flops_ratio == 1.0
        assert out.kept.tolist() == [valid.sum(-1).float().tolist()] * L
        assert torch.equal(out.columns >= 0, valid)
        got = out.hidden[valid]
        assert (got - ref[valid]).abs().max() <= _tol(ref)
        x = ref if ad.structure.final_norm is None else ad.structure.final_norm(ref)
        mean = (x * valid[..., None]).sum(1) / valid.sum(-1, keepdim=True)
        assert (out.pooled - mean).abs().max() <= _tol(mean)
        if ad.is_causal:
            assert (out.logits - plain.logits[:, -1]).abs().max() <= _tol(plain.logits)
        sim = ltp_mask_forward(ad, batch, th, mode="hard")
        assert not sim.physical and (sim.hidden[valid] - ref[valid]).abs().max() <= _tol(ref)


def test_physical_drop_equals_key_masking_encoder(bert3):
    """Independent of the LTP code: dropping tokens after layer 0 and running layers 1.. on the rest equals the
    full forward whose later layers cannot attend to the dropped tokens (for the kept tokens' outputs)."""
    ad = bert3
    batch = ad.encode_batch(TEXTS)
    valid = batch.attention_mask.bool()
    g = torch.Generator().manual_seed(1)
    keep = valid & (torch.rand(valid.shape, generator=g) > 0.4)
    keep |= valid & (valid.long().cumsum(-1) == 1)  # keep [CLS]
    with ad.hooks(cache=["layers.0.resid_post"]) as h:
        ad.forward(batch)
    h0 = h.cache["layers.0.resid_post"]
    # physical: each row's kept tokens, left-padded
    K = int(keep.sum(-1).max())
    hid = torch.zeros(len(TEXTS), K, h0.shape[-1])
    am = torch.zeros(len(TEXTS), K, dtype=torch.long)
    for b in range(len(TEXTS)):
        idx = keep[b].nonzero().flatten()
        hid[b, K - len(idx) :] = h0[b, idx]
        am[b, K - len(idx) :] = 1
    phys = ad.run_layers(hid, start=1, attention_mask=am, logits=False)["hidden"]

    def mask(ctx):
        return keep.gather(1, ctx.key_columns[:, 0])[:, None, None, :]

    L = ad.structure.num_layers
    with (
        attention_override(ad, {i: mask for i in range(1, L)}),
        ad.hooks(cache=[f"layers.{L - 1}.resid_post"]) as h2,
    ):
        ad.forward(batch)
    sim = h2.cache[f"layers.{L - 1}.resid_post"]
    with ad.hooks(cache=[f"layers.{L - 1}.resid_post"]) as h3:
        ad.forward(batch)
    unmasked = h3.cache[f"layers.{L - 1}.resid_post"]
    for b in range(len(TEXTS)):
        idx = keep[b].nonzero().flatten()
        got, ref = phys[b, K - len(idx) :], sim[b, idx]
        assert (got - ref).abs().max() <= _tol(ref)
    # ... and the dropped tokens did matter as keys (so the equality above could fail)
    assert (sim[keep] - unmasked[keep]).abs().max() > 1e-3


def _robust_theta(ad, batch, n):
    """A threshold that prunes at least 20% of the tokens and sits > 1e-4 away from every score it decides on,
    so fp32 rounding differences between the physical and the simulated run cannot flip a decision."""
    L = ad.structure.num_layers
    for c in (0.08, 0.1, 0.06, 0.12, 0.05, 0.15):
        th = LTPThresholds(L, init=[c] * L)
        sim = ltp_mask_forward(ad, batch, th, mode="hard")
        margin = min(float((s[torch.isfinite(s)] - c).abs().min()) for s in sim.scores.values())
        if margin > 1e-4 and float(sim.kept[-1].sum()) < 0.8 * float(n.sum()):
            return th
    pytest.fail("no threshold with a safe margin")


@pytest.mark.parametrize("which", ["bert", "llama"])
def test_ltp_forward_equals_hard_mask_simulation(which, bert3, llama3):
    ad = bert3 if which == "bert" else llama3
    batch = ad.encode_batch(TEXTS)
    valid = batch.attention_mask.bool()
    n = valid.sum(-1).float()
    th = _robust_theta(ad, batch, n)
    phys = ltp_forward(ad, batch, th, pooling="mean")
    sim = ltp_mask_forward(ad, batch, th, mode="hard", pooling="mean")
    assert phys.physical and not sim.physical
    assert torch.equal(phys.kept, sim.kept) and torch.equal(phys.entering, sim.entering)
    assert phys.flops_ratio == pytest.approx(sim.flops_ratio) and phys.flops_ratio < 1.0
    for b in range(len(TEXTS)):
        cols = phys.columns[b][phys.columns[b] >= 0]
        assert torch.equal(sim.weights[b].nonzero().flatten(), cols)
        got, ref = phys.hidden[b, phys.columns[b] >= 0], sim.hidden[b, cols]
        assert (got - ref).abs().max() <= _tol(ref)
    assert (phys.pooled - sim.pooled).abs().max() <= _tol(sim.pooled)
    if ad.is_causal:
        assert bool((phys.columns[:, -1] == valid.shape[1] - 1).all())  # the last token is always kept
        assert (phys.logits - sim.logits).abs().max() <= _tol(sim.logits)
    else:
        first = (valid.long().cumsum(-1) == 1) & valid
        assert bool(sim.weights[first].eq(1).all())  # [CLS] is always kept
    # the FLOPs ratio is the analytic formula on the counts
    P, W = ltp_layer_costs(ad)
    assert phys.flops_ratio == pytest.approx(ltp_flops_ratio(phys.entering, n, P, W))
    # without removing the dropped tokens as keys the simulation is NOT the physical drop
    loose = ltp_mask_forward(ad, batch, th, mode="hard", mask_keys=False, pooling="mean")
    assert (loose.pooled - phys.pooled).abs().max() > 1e-4


def test_soft_mask_forward_cumulative(bert3):
    ad = bert3
    batch = ad.encode_batch(TEXTS)
    valid = batch.attention_mask.bool()
    th = LTPThresholds(3, theta_base=0.15, layers=[0, 1, 2])
    out = ltp_mask_forward(ad, batch, th, temperature=0.02)
    assert len(out.masks) == 3
    # M_l = Π_{k≤l} m_k, with m_k recomputed from the recorded scores
    theta = th.theta()
    prod = valid.float()
    first = (valid.long().cumsum(-1) == 1) & valid
    for i, M in zip(range(3), out.masks, strict=True):
        m = torch.where(first, 1.0, ltp_soft_mask(out.scores[i], theta[i], 0.02, valid))
        prod = prod * m
        assert (M - prod).abs().max() <= 1e-6
    assert out.penalty.item() == pytest.approx(ltp_penalty(out.masks, valid).item())
    assert torch.allclose(out.kept[-1], out.masks[-1].sum(-1))
    per_layer = ltp_mask_forward(ad, batch, th, temperature=0.02, cumulative=False)
    m2 = torch.where(first, 1.0, ltp_soft_mask(per_layer.scores[2], theta[2], 0.02, valid))
    assert (per_layer.masks[2] - m2 * valid).abs().max() <= 1e-6


# ---------------------------------------------------------------------------------------------- gradients and training
def test_penalty_gradient_reaches_theta_and_matches_finite_difference(bert3):
    ad = bert3
    th = LTPThresholds(3, theta_base=0.15, layers=[0, 1, 2])
    out = ltp_mask_forward(ad, TEXTS, th, temperature=0.05, grad=True)
    out.penalty.backward()
    g = th.delta.grad.clone()
    assert bool((g < 0).all())  # raising any threshold lowers the kept fraction
    # the last layer's threshold acts only through its own mask (scores before it do not depend on it):
    # autograd equals a central finite difference there
    e = 1e-2

    def pen(dl):
        with torch.no_grad():
            t2 = LTPThresholds(3, theta_base=0.15, layers=[0, 1, 2])
            t2.delta[2] = dl
            return ltp_mask_forward(ad, TEXTS, t2, temperature=0.05).penalty.double().item()

    fd = (pen(e) - pen(-e)) / (2 * e)
    assert g[2].item() == pytest.approx(fd, rel=2e-2)


def _synthetic(n_batches: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    words = "red blue green cat dog bird tree car house river stone light".split()
    out = []
    for _ in range(n_batches):
        xs, ys = [], []
        for _ in range(8):
            w = [rng.choice(words) for _ in range(rng.randint(5, 9))]
            xs.append(" ".join(w))
            ys.append(int(w[0] in words[:6]))
        out.append({"inputs": xs, "labels": torch.tensor(ys)})
    return out


def test_training_large_lambda_prunes_zero_lambda_keeps(bert3):
    ad = bert3
    data = _synthetic(3, seed=0)
    # a linear probe fitted on the unpruned pooled outputs: pruning can only hurt its task loss
    keep_all = LTPThresholds.keep_all(3)
    X = torch.cat([ltp_forward(ad, b["inputs"], keep_all).pooled for b in data])
    y = torch.cat([b["labels"] for b in data])
    head = torch.nn.Linear(ad.structure.hidden_size, 2)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
    opt = torch.optim.Adam(head.parameters(), lr=0.1)
    for _ in range(100):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(head(X), y).backward()
        opt.step()
    head.requires_grad_(False)

    def kept(th):
        return float(torch.stack([ltp_forward(ad, b["inputs"], th).kept_fraction()[-1] for b in data]).mean())

    before = [p.detach().clone() for p in ad.model.parameters()]
    kw = dict(temperature=0.02, steps=10, lr=0.02, theta_base=0.06, progress=False)
    assert kept(LTPThresholds(3, theta_base=0.06)) > 0.95
    th0 = train_ltp_thresholds(ad, data, classification_loss(head), lam=0.0, **kw)
    th5 = train_ltp_thresholds(ad, data, classification_loss(head), lam=5.0, **kw)
    k0, k5 = kept(th0), kept(th5)
    print(f"kept fraction after training: lam=0 {k0:.3f}, lam=5 {k5:.3f}")
    assert k0 > 0.95
    assert k5 < 0.7
    assert len(th5.history) == 10 and th5.history[-1]["penalty"] < th5.history[0]["penalty"]
    # the model is frozen and its requires_grad flags are restored
    assert all(torch.equal(a, b) for a, b in zip(before, ad.model.parameters(), strict=True))
    assert all(p.requires_grad for p in ad.model.parameters())
    # seeded: the same run gives the same thresholds
    kw2 = {**kw, "steps": 2}
    a1 = train_ltp_thresholds(ad, data, classification_loss(head), lam=5.0, seed=3, **kw2)
    a2 = train_ltp_thresholds(ad, data, classification_loss(head), lam=5.0, seed=3, **kw2)
    assert torch.equal(a1.theta(), a2.theta())


def test_next_token_loss_on_causal_lm(llama3):
    ad = llama3
    data = [{"inputs": ["the cat sat on the", "one two three four"], "labels": torch.tensor([5, 6])}]
    out = ltp_mask_forward(
        ad, data[0]["inputs"], LTPThresholds(3, theta_base=0.1), temperature=0.05, grad=True
    )
    loss = next_token_loss()(out, data[0])
    ref = torch.nn.functional.cross_entropy(out.logits, data[0]["labels"])
    assert loss.item() == pytest.approx(ref.item())
    th = train_ltp_thresholds(
        ad,
        data,
        next_token_loss(),
        lam=1.0,
        temperature=0.05,
        steps=2,
        lr=0.01,
        theta_base=0.1,
        progress=False,
    )
    assert th.delta.abs().sum() > 0


@settings(max_examples=8, deadline=None)
@given(st.lists(st.floats(0.0, 0.5), min_size=2, max_size=2), st.integers(0, 3))
def test_kept_sets_only_shrink_and_keep_protected(llama3, theta, start):
    ad = llama3
    out = ltp_forward(ad, TEXTS[start % 3 :], theta + [0.1])
    assert bool((out.kept[1:] <= out.kept[:-1]).all()) and bool((out.kept[0] <= out.seq_len).all())
    assert bool((out.kept >= 1).all())
    assert 0.0 < out.flops_ratio <= 1.0
    T = int(ad.as_batch(TEXTS[start % 3 :]).input_ids.shape[1])
    assert bool((out.columns[:, -1] == T - 1).all())


# ---------------------------------------------------------------------------------------------- errors
def test_errors(bert3):
    with pytest.raises(ValueError, match="layers"):
        ltp_forward(bert3, TEXTS, [0.1, 0.1])
    with pytest.raises(ValueError, match="temperature"):
        ltp_soft_mask(torch.zeros(1, 2), 0.0, 0.0)
    with pytest.raises(ValueError, match="mode"):
        ltp_mask_forward(bert3, TEXTS, LTPThresholds(3), mode="medium")
    with pytest.raises(ValueError, match="mask_keys"):
        ltp_mask_forward(bert3, TEXTS, LTPThresholds(3), mask_keys=True)
    with pytest.raises(ValueError, match="protect"):
        ltp_forward(bert3, TEXTS, LTPThresholds(3), protect="middle")
    with pytest.raises(ValueError, match="nothing to train"):
        train_ltp_thresholds(
            bert3,
            _synthetic(1, 0),
            classification_loss(torch.nn.Linear(64, 2)),
            thresholds=LTPThresholds.keep_all(3),
        )
    with pytest.raises(TypeError, match="batch 0"):
        train_ltp_thresholds(bert3, [42], classification_loss(), progress=False)
    with pytest.raises(ValueError, match="init"):
        LTPThresholds(2, init=[0.1])
    with pytest.raises(TypeError):
        ltp_forward(bert3, TEXTS, "high")
    with pytest.raises(ValueError, match="head"):
        classification_loss()(
            LTPOutput(*[None] * 4, None, *[None] * 3, 1.0, False), {"labels": torch.tensor([0])}
        )


def test_summary(bert3):
    out = ltp_forward(bert3, TEXTS, LTPThresholds(3, theta_base=0.3))
    s = out.summary()
    assert s["physical"] is True and len(s["kept_fraction"]) == 3 and s["flops_ratio"] <= 1.0
