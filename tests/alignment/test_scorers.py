"""Token scorers (alignment.scorers) against float64 computations written here, and the rollout probe."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import tokensmith as ts
from tokensmith.alignment.data import encode_pairs
from tokensmith.alignment.scorers import (
    AttributionScorer,
    ContrastiveScorer,
    CriticalTokens,
    ExcessLossScorer,
    ImplicitRewardScorer,
    TokenScorer,
    TVDScorer,
    available_scorers,
    find_critical_tokens,
    get_scorer,
    register_scorer,
)

pytestmark = pytest.mark.usefixtures("torch_one_thread")

PAIRS = [("Why is the sky blue?", "Rayleigh scattering of light.", "Because."),
         ("Name a colour.", "Red", "I will not answer questions about colours.")]


# ------------------------------------------------------------------------------------------- references
_F64: dict[int, torch.nn.Module] = {}


def f64(ad: ts.ModelAdapter) -> torch.nn.Module:
    """A float64 copy of the adapter's model (the shared adapters are left untouched)."""
    if id(ad) not in _F64:
        _F64[id(ad)] = copy.deepcopy(ad.model).double().eval()
    return _F64[id(ad)]


def rows64(ad: ts.ModelAdapter, pb) -> list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per row of ``pb`` (chosen rows then rejected rows), run UNPADDED in float64: (row, padded positions of its
    completion tokens, float64 logits predicting them [n, V], the token ids [n])."""
    b = pb.batch
    tm = torch.cat([pb.mask_w, pb.mask_l])
    out = []
    for r in range(len(b)):
        off = int(b.pad_offsets[r])
        ids = b.input_ids[r, off:]
        pos = torch.nonzero(tm[r, off:]).flatten()
        with torch.no_grad():
            z = f64(ad)(input_ids=ids[None]).logits[0].double()
        out.append((r, pos + off, z[pos - 1], ids[pos]))
    return out


def logsoftmax64(z: torch.Tensor) -> torch.Tensor:
    m = z.max(-1, keepdim=True).values
    return z - m - torch.log(torch.exp(z - m).sum(-1, keepdim=True))


def both(pb, ww, wl) -> torch.Tensor:
    return torch.cat([ww, wl])


def assert_zero_outside(pb, ww, wl) -> None:
    assert not ww.requires_grad and not wl.requires_grad
    assert bool((ww[~pb.mask_w] == 0).all()) and bool((wl[~pb.mask_l] == 0).all())


@pytest.fixture(scope="module")
def sharp_pair():
    """Private tiny llamas with logits scaled by their final-norm gain (x25 positive, x5 negative) and pairs whose
    chosen completions are the positive model's greedy text: its tokens then have contrastive probabilities up
    to ~1, so a wrong formula shows (on raw random models every s_t is ~1/V and w_t ~1)."""
    ads = []
    for seed, scale in ((10, 25.0), (11, 5.0)):
        ad = ts.tiny("llama", seed=seed)
        with torch.no_grad():
            ad.model.model.norm.weight.mul_(scale)
        ads.append(ad)
    pos, neg = ads
    prompts = [p for p, _, _ in PAIRS]
    good = pos.generate([pos.encode(p, chat=True) for p in prompts], max_new_tokens=6).texts
    bad = neg.generate([pos.encode(p, chat=True) for p in prompts], max_new_tokens=6).texts
    return pos, neg, encode_pairs(pos, list(zip(prompts, good, bad, strict=True)))


@pytest.fixture(scope="module")
def odd_tokenizer():
    ad = ts.tiny("llama", seed=3)
    ad.add_tokens(["<zz_one>", "<zz_two>"])
    return ad


# ------------------------------------------------------------------------------------------- contrastive
@pytest.mark.parametrize("gamma", [1.0, 0.5])
def test_contrastive_matches_float64_softmax(sharp_pair, gamma):
    pos, neg, pb = sharp_pair
    ww, wl = ContrastiveScorer(pos, neg, gamma, chosen="contrastive", chunk=7)(pb, policy=pos)
    assert_zero_outside(pb, ww, wl)
    w = both(pb, ww, wl)
    ref_p, ref_n = rows64(pos, pb), rows64(neg, pb)
    spread = []
    for (r, where, zp, y), (_, _, zn, _) in zip(ref_p, ref_n, strict=True):
        u = (1 + gamma) * zp - gamma * zn
        e = torch.exp(u - u.max(-1, keepdim=True).values)
        s_ref = (e / e.sum(-1, keepdim=True)).gather(-1, y[:, None])[:, 0]
        s = 1.0 - w[r, where].double()
        torch.testing.assert_close(s, s_ref, rtol=2e-3, atol=2e-6)
        spread.append(s_ref)
    s_all = torch.cat(spread)
    assert float(s_all.max()) > 0.5 and float(s_all.min()) < 1e-3  # far from uniform: the check has teeth
    # chosen default: ones on the completion
    ww1, wl1 = ContrastiveScorer(pos, neg, gamma)(pb)
    assert torch.equal(ww1, pb.mask_w.float()) and torch.equal(wl1, wl)


# ------------------------------------------------------------------------------------------- excess loss
def test_excess_loss_matches_float64_and_top_k(shared_tiny):
    pol, ref = shared_tiny("llama"), shared_tiny("llama", seed=1)
    pb = encode_pairs(pol, PAIRS)
    ww, wl = ExcessLossScorer(ref)(pb, policy=pol)
    assert_zero_outside(pb, ww, wl)
    w = both(pb, ww, wl)
    tm = torch.cat([pb.mask_w, pb.mask_l])
    for (r, where, zp, y), (_, _, zr, _) in zip(rows64(pol, pb), rows64(ref, pb), strict=True):
        lp = logsoftmax64(zp).gather(-1, y[:, None])[:, 0]
        lr = logsoftmax64(zr).gather(-1, y[:, None])[:, 0]
        torch.testing.assert_close(w[r, where].double(), lr - lp, rtol=0, atol=5e-5)  # L_θ − L_ref
    # normalised: mean |w| = 1 over each completion, same signs
    nw, nl = ExcessLossScorer(ref, normalize=True, policy=pol)(pb)
    n = both(pb, nw, nl)
    mean_abs = (n.abs() * tm).sum(-1) / tm.sum(-1)
    torch.testing.assert_close(mean_abs, torch.ones_like(mean_abs), rtol=1e-5, atol=0)
    assert torch.equal(torch.sign(n[tm]), torch.sign(w[tm]))
    # Rho-1 selection: exactly ceil(k n) ones per completion, on the largest excess losses
    k = 0.4
    kw, kl = ExcessLossScorer(ref, top_k=k)(pb, policy=pol)
    sel = both(pb, kw, kl)
    for r in range(tm.shape[0]):
        vals = w[r][tm[r]]
        cnt = math.ceil(k * int(tm[r].sum()))
        assert int(sel[r].sum()) == cnt and set(sel[r].unique().tolist()) <= {0.0, 1.0}
        assert float(vals[sel[r][tm[r]] == 1].min()) >= float(vals.topk(cnt).values.min())
    with pytest.raises(ValueError, match="top_k"):
        ExcessLossScorer(ref, top_k=1.5)
    with pytest.raises(ValueError, match="needs the policy"):
        ExcessLossScorer(ref)(pb)


# ------------------------------------------------------------------------------------------- implicit reward
def test_implicit_reward_transforms_match_float64(shared_tiny):
    pol, ref = shared_tiny("llama"), shared_tiny("llama", seed=1)
    pb = encode_pairs(pol, PAIRS)
    beta, tau = 0.3, 0.05
    tm = torch.cat([pb.mask_w, pb.mask_l])
    B = len(pb)
    r_ref = torch.zeros(tm.shape, dtype=torch.float64)
    for (r, where, zp, y), (_, _, zr, _) in zip(rows64(pol, pb), rows64(ref, pb), strict=True):
        lp = logsoftmax64(zp).gather(-1, y[:, None])[:, 0]
        lr = logsoftmax64(zr).gather(-1, y[:, None])[:, 0]
        r_ref[r, where] = beta * (lp - lr)
    w = both(pb, *ImplicitRewardScorer(ref, beta)(pb, policy=pol))
    torch.testing.assert_close(w.double(), r_ref, rtol=0, atol=2e-5)
    wa = both(pb, *ImplicitRewardScorer(ref, beta, transform="abs", policy=pol)(pb))
    torch.testing.assert_close(wa.double(), r_ref.abs(), rtol=0, atol=2e-5)
    sc = ImplicitRewardScorer(ref, beta, transform="softmax", tau=tau, flip_rejected=True, policy=pol)
    ws = both(pb, *sc(pb))
    signed = r_ref.clone()
    signed[B:] = -signed[B:]
    for r in range(tm.shape[0]):
        v = signed[r][tm[r]] / tau
        e = torch.exp(v - v.max())
        ref_w = v.numel() * e / e.sum()  # n · softmax: mean 1
        torch.testing.assert_close(ws[r][tm[r]].double(), ref_w, rtol=2e-3, atol=1e-6)
        assert float(ref_w.max() / ref_w.min()) > 1.5  # not flat at this tau
    assert_zero_outside(pb, ws[:B], ws[B:])
    with pytest.raises(ValueError, match="beta"):
        ImplicitRewardScorer(ref, beta=0.0)
    with pytest.raises(ValueError, match="transform"):
        ImplicitRewardScorer(ref, transform="exp")


# ------------------------------------------------------------------------------------------- TVD
def test_tvd_matches_float64_and_is_zero_against_itself(shared_tiny):
    pol, other = shared_tiny("llama"), shared_tiny("gpt2")  # different architectures, one tokenizer
    pb = encode_pairs(pol, PAIRS)
    w = both(pb, *TVDScorer(other, chunk=5)(pb, policy=pol))
    for (r, where, zp, _), (_, _, zq, _) in zip(rows64(pol, pb), rows64(other, pb), strict=True):
        tvd = 0.5 * (logsoftmax64(zp).exp() - logsoftmax64(zq).exp()).abs().sum(-1)
        torch.testing.assert_close(w[r, where].double(), tvd, rtol=1e-3, atol=1e-6)
    tm = torch.cat([pb.mask_w, pb.mask_l])
    assert bool(((w[tm] > 0) & (w[tm] <= 1)).all())
    self_w = both(pb, *TVDScorer(pol)(pb, policy=pol))
    assert float(self_w.abs().max()) < 1e-6


# ------------------------------------------------------------------------------------------- attribution
def test_attribution_input_x_gradient_matches_float64_autograd(shared_tiny):
    ad = shared_tiny("llama")
    pb = encode_pairs(ad, PAIRS[:1])  # chat: the scored end-of-turn token is special -> not a source
    w = both(pb, *AttributionScorer(reduce="signed", normalize=False)(pb, policy=ad))
    b = pb.batch
    tm = torch.cat([pb.mask_w, pb.mask_l])
    m = f64(ad)
    for r in range(len(b)):
        off = int(b.pad_offsets[r])
        ids = b.input_ids[r, off:]
        pos = torch.nonzero(tm[r, off:]).flatten()
        e = m.get_input_embeddings()(ids[None]).detach().requires_grad_(True)
        lsm = logsoftmax64(m(inputs_embeds=e).logits[0, pos - 1])
        f = lsm.gather(-1, ids[pos][:, None]).sum()
        (g,) = torch.autograd.grad(f, e)
        a = (g[0] * e[0]).sum(-1).detach()
        special = b.examples[r].special_mask[pos]
        ref = torch.where(special, torch.zeros_like(a[pos]), a[pos])
        got = w[r, off + pos].double()
        torch.testing.assert_close(got, ref, rtol=2e-3, atol=2e-5 * float(ref.abs().max()))
        assert float(ref.abs().max()) > 0 and bool((got[special] == 0).all()) and float(got[-1]) == 0.0
    # default: |a|, mean 1 over each completion
    n = both(pb, *AttributionScorer()(pb, policy=ad))
    torch.testing.assert_close((n * tm).sum(-1) / tm.sum(-1), torch.ones(len(b)), rtol=1e-5, atol=0)
    assert bool((n >= 0).all())
    with pytest.raises(ValueError):
        AttributionScorer(method="no_such_method")


# ------------------------------------------------------------------------------------------- batching, masks
def _scorers(shared_tiny):
    pol, ref, gpt = shared_tiny("llama"), shared_tiny("llama", seed=1), shared_tiny("gpt2")
    return pol, [
        ContrastiveScorer(gpt, ref, chosen="contrastive"),
        ExcessLossScorer(ref, normalize=True),
        ImplicitRewardScorer(ref, 0.1, transform="softmax"),
        TVDScorer(gpt, normalize=True, max_batch_size=3),
        AttributionScorer(),
    ]


def test_batched_equals_each_pair_alone(shared_tiny):
    pol, scorers = _scorers(shared_tiny)
    pairs = [PAIRS[0], ("Name a colour.", "Red", "No.")]
    pb = encode_pairs(pol, pairs)
    alone = [encode_pairs(pol, [p]) for p in pairs]
    # rows are padded differently in the batch than alone: left padding is in play
    B = len(pairs)
    assert any(int(pb.batch.pad_offsets[j * B + i]) != int(a.batch.pad_offsets[j])
               for i, a in enumerate(alone) for j in (0, 1))
    for sc in scorers:
        ww, wl = sc(pb, policy=pol)
        assert_zero_outside(pb, ww, wl)
        for i, a in enumerate(alone):
            aw, al = sc(a, policy=pol)
            torch.testing.assert_close(ww[i][pb.mask_w[i]], aw[0][a.mask_w[0]], rtol=1e-4, atol=1e-5, msg=repr(sc))
            torch.testing.assert_close(wl[i][pb.mask_l[i]], al[0][a.mask_l[0]], rtol=1e-4, atol=1e-5, msg=repr(sc))


def test_mismatched_tokenizer_raises(shared_tiny, odd_tokenizer):
    pol, ref = shared_tiny("llama"), shared_tiny("llama", seed=1)
    odd = odd_tokenizer
    pb = encode_pairs(pol, PAIRS[:1])
    cases = [
        (ContrastiveScorer(pol, odd), None),
        (ContrastiveScorer(ref, ref), odd),
        (ExcessLossScorer(odd), pol),
        (ImplicitRewardScorer(odd, 0.1), pol),
        (TVDScorer(odd), pol),
        (AttributionScorer(model=odd), pol),
    ]
    for sc, p in cases:
        with pytest.raises(ValueError, match="another tokenizer than (the policy|its pos_adapter).*policy's tokenizer"):
            sc(pb, policy=p)


def test_registry_and_output_checks(shared_tiny):
    assert {"contrastive", "excess_loss", "implicit_reward", "tvd", "attribution"} <= set(available_scorers())
    ref = shared_tiny("llama", seed=1)
    sc = get_scorer("tvd", other=ref)
    assert isinstance(sc, TVDScorer) and sc.name == "tvd" and get_scorer(sc) is sc
    with pytest.raises(ValueError, match="unknown token scorer 'nope'.*tvd"):
        get_scorer("nope")
    with pytest.raises(ValueError, match="already registered"):
        register_scorer("tvd")(type("OtherTVD", (TokenScorer,), {}))

    @register_scorer("test_leaky")
    class Leaky(TokenScorer):
        def weights(self, pb, policy=None):
            return torch.ones(pb.mask_w.shape), torch.ones(pb.mask_l.shape)

    pol = shared_tiny("llama")
    pb = encode_pairs(pol, PAIRS[:1])
    with pytest.raises(ValueError, match="outside the completion mask"):
        get_scorer("test_leaky")(pb)
    with pytest.raises(TypeError, match="PreferenceBatch"):
        TVDScorer(ref)(pb.batch, policy=pol)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------- rollout probe
def test_find_critical_tokens_shapes_calls_and_determinism(shared_tiny, monkeypatch):
    ad = shared_tiny("llama")
    calls: list[tuple[int, int | None]] = []
    orig = ad.generate

    def counting(inputs, *a, **kw):
        calls.append((len(inputs), kw.get("seed")))
        return orig(inputs, *a, **kw)

    monkeypatch.setattr(ad, "generate", counting)

    def judge(s: str) -> bool:
        return "e" in s

    resp = "The tree grows."
    R = 4
    ct = find_critical_tokens(ad, "Write a sentence.", resp, judge, n_rollouts=R, max_new_tokens=3, seed=7)
    n = len(ct.tokens)
    enc = ad.encode("Write a sentence.", target=resp, chat=True, score_eot=False)
    assert isinstance(ct, CriticalTokens) and n == int(enc.target_mask.sum()) > 2
    assert ct.token_ids.tolist() == enc.input_ids[enc.target_mask].tolist()
    assert ct.positions.tolist() == list(range(n)) and ct.successes.shape == (n, R) and len(ct.rollouts) == n
    assert len(calls) == n and all(c == (R, 7 + t) for t, c in enumerate(calls))  # one batched call per position
    assert bool(((ct.rates >= 0) & (ct.rates <= 1)).all())
    torch.testing.assert_close(ct.rates * R, (ct.rates * R).round())
    assert [[judge(s) for s in row] for row in ct.rollouts] == ct.successes.tolist()
    assert ct.final is True
    # every rollout text starts with the response prefix it was sampled from
    for t, row in zip(ct.positions.tolist(), ct.rollouts, strict=True):
        pre = ad.tokenizer.decode(ct.token_ids[:t].tolist(), skip_special_tokens=True)
        assert all(s.startswith(pre) for s in row)
    nxt = torch.cat([ct.rates[1:], torch.tensor([1.0])])
    torch.testing.assert_close(ct.deltas, nxt - ct.rates)
    assert torch.equal(ct.flips, (ct.rates >= 0.5) != (nxt >= 0.5))
    top = ct.top(2, direction="abs")
    assert len(top) == min(2, n) and abs(top[0][3]) == float(ct.deltas.abs().max())
    assert len(ct.table()) == n
    # determinism: same seed, same rollouts; a position's rollouts do not depend on the other positions
    again = find_critical_tokens(ad, "Write a sentence.", resp, judge, n_rollouts=R, max_new_tokens=3, seed=7)
    assert again.rollouts == ct.rollouts and torch.equal(again.rates, ct.rates)
    one = find_critical_tokens(ad, "Write a sentence.", resp, judge, n_rollouts=R, max_new_tokens=3, seed=7,
                               positions=[2])
    assert one.positions.tolist() == [2] and one.rollouts[0] == ct.rollouts[2]
    other = find_critical_tokens(ad, "Write a sentence.", resp, judge, n_rollouts=R, max_new_tokens=3, seed=8,
                                 positions=[0, 1])
    assert other.rollouts != ct.rollouts[:2]
    with pytest.raises(ValueError, match="prefix lengths"):
        find_critical_tokens(ad, "Write a sentence.", resp, judge, positions=[n])
    with pytest.raises(TypeError, match="must return a bool"):
        find_critical_tokens(ad, "Write a sentence.", resp, lambda s: "yes", n_rollouts=1, max_new_tokens=1,
                             positions=[0])
