"""tokensmith.alignment.losses: every loss against a step-by-step float64 reference written here (loops over
rows and tokens), forward value and gradient; reductions between losses; padding; batching; bad inputs."""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.tolerance import assert_fp32_close
from tokensmith.alignment.losses import (
    MaskModel,
    aligndistil_loss,
    aligndistil_target,
    cdpo,
    contrastive_token_weights,
    dpo,
    rto_token_rewards,
    self_contrastive_token_rewards,
    spans_to_token_rewards,
    sparsepo,
    tdpo,
    token_rewards,
    treg,
    treg_regularizer,
)

F64 = torch.float64
TIGHT = {"atol": 1e-11, "rtol": 1e-10}  # float64 vs float64 with another summation order

# ------------------------------------------------------------------------------------------------ fixtures


def _mask(B: int, T: int, g: torch.Generator) -> torch.Tensor:
    """Random completion masks: a prompt part (False), 1..T-start completion tokens, then right padding."""
    m = torch.zeros(B, T, dtype=torch.bool)
    for b in range(B):
        start = int(torch.randint(0, T // 2, (1,), generator=g))
        n = int(torch.randint(1, T - start + 1, (1,), generator=g))
        m[b, start : start + n] = True
    return m


def make_batch(B: int = 3, Tw: int = 7, Tl: int = 5, seed: int = 0, dtype=F64) -> dict[str, torch.Tensor]:
    """One side per completion, log-probs zero outside the mask (what adapter.token_logprobs returns)."""
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for side, T in (("w", Tw), ("l", Tl)):
        m = _mask(B, T, g)
        out[f"mask_{side}"] = m
        for name, gen in (
            ("pol_lp", lambda T=T: -3 * torch.rand(B, T, generator=g, dtype=F64)),
            ("ref_lp", lambda T=T: -3 * torch.rand(B, T, generator=g, dtype=F64)),
            ("kl", lambda T=T: 0.5 * torch.rand(B, T, generator=g, dtype=F64)),
            ("weights", lambda T=T: 2 * torch.rand(B, T, generator=g, dtype=F64)),
            ("m_u", lambda T=T: torch.relu(torch.randn(B, T, generator=g, dtype=F64))),
            ("m_d", lambda T=T: torch.relu(torch.randn(B, T, generator=g, dtype=F64))),
        ):
            out[f"{name}_{side}"] = (gen() * m).to(dtype)
    return out


def leaves(batch: dict[str, torch.Tensor], names: list[str]) -> dict[str, torch.Tensor]:
    """Copies of ``batch`` with the float tensors in ``names`` as fresh leaves that require grad."""
    out = {}
    for k, v in batch.items():
        out[k] = v.detach().clone().requires_grad_(k in names) if v.is_floating_point() else v.clone()
    return out


def grads(loss: torch.Tensor, tensors: dict[str, torch.Tensor], names: list[str]) -> list[torch.Tensor]:
    gs = torch.autograd.grad(loss, [tensors[n] for n in names], allow_unused=True)
    return [torch.zeros_like(tensors[n]) if gr is None else gr for gr, n in zip(gs, names, strict=True)]


def logsig(z: torch.Tensor) -> torch.Tensor:
    """log σ(z) written out (float64 reference)."""
    return -torch.log1p(torch.exp(-z))


def seqsum(x: torch.Tensor, m: torch.Tensor, b: int) -> torch.Tensor:
    """Σ_t x[b, t] over the completion tokens of row b, one token at a time."""
    acc = torch.zeros((), dtype=x.dtype)
    for t in range(x.shape[1]):
        if m[b, t]:
            acc = acc + x[b, t]
    return acc


def ref_dpo(d, beta, loss_type="sigmoid", ls=0.0, ipo_average=True, weighted=False):
    B = d["mask_w"].shape[0]
    losses = []
    for b in range(B):
        sides = []
        for s in ("w", "l"):
            x = d[f"pol_lp_{s}"] - d[f"ref_lp_{s}"]
            if weighted:
                x = d[f"weights_{s}"] * x
            tot = seqsum(x, d[f"mask_{s}"], b)
            if loss_type == "ipo" and ipo_average:
                tot = tot / int(d[f"mask_{s}"][b].sum())
            sides.append(tot)
        h = sides[0] - sides[1]
        if loss_type == "sigmoid":
            losses.append(-(1 - ls) * logsig(beta * h) - ls * logsig(-beta * h))
        elif loss_type == "ipo":
            losses.append((h - 1 / (2 * beta)) ** 2)
        else:
            losses.append(torch.clamp(1 - beta * h, min=0))
    return sum(losses) / B


def ref_tdpo(d, beta, alpha, variant):
    B = d["mask_w"].shape[0]
    total = 0
    for b in range(B):
        u = seqsum(d["pol_lp_w"] - d["ref_lp_w"], d["mask_w"], b) - seqsum(d["pol_lp_l"] - d["ref_lp_l"], d["mask_l"], b)
        Dw, Dl = seqsum(d["kl_w"], d["mask_w"], b), seqsum(d["kl_l"], d["mask_l"], b)
        delta = Dl - Dw if variant == 1 else alpha * (Dl - Dw.detach())
        total = total - logsig(beta * (u - delta))
    return total / B


def ref_sparsepo(d, beta, l1_u, l1_d):
    B = d["mask_w"].shape[0]
    total = 0
    for b in range(B):
        u = seqsum(d["m_u_w"] * (d["pol_lp_w"] - d["ref_lp_w"]), d["mask_w"], b) - seqsum(
            d["m_u_l"] * (d["pol_lp_l"] - d["ref_lp_l"]), d["mask_l"], b
        )
        dd = seqsum(d["m_d_l"] * d["kl_l"], d["mask_l"], b) - seqsum(d["m_d_w"] * d["kl_w"], d["mask_w"], b)
        n = int(d["mask_w"][b].sum()) + int(d["mask_l"][b].sum())
        l1u = (seqsum(d["m_u_w"].abs(), d["mask_w"], b) + seqsum(d["m_u_l"].abs(), d["mask_l"], b)) / n
        l1d = (seqsum(d["m_d_w"].abs(), d["mask_w"], b) + seqsum(d["m_d_l"].abs(), d["mask_l"], b)) / n
        total = total - logsig(beta * (u - dd)) + l1_u * l1u + l1_d * l1d
    return total / B


LP = ["pol_lp_w", "pol_lp_l", "ref_lp_w", "ref_lp_l", "mask_w", "mask_l"]


def args(d, *extra):
    return [d[k] for k in LP + list(extra)]


# ------------------------------------------------------------------------------------------ ALN-1: DPO


@pytest.mark.parametrize(
    "loss_type,ls,ipo_average,weighted",
    [
        ("sigmoid", 0.0, True, False),
        ("sigmoid", 0.2, True, True),
        ("ipo", 0.0, True, True),
        ("ipo", 0.0, False, False),
        ("hinge", 0.0, True, True),
    ],
)
def test_dpo_matches_loop_reference(loss_type, ls, ipo_average, weighted):
    beta = 0.7 if loss_type != "hinge" else 3.0  # hinge: large β so some pairs sit on each side of the kink
    names = ["pol_lp_w", "pol_lp_l", "weights_w", "weights_l"]
    d = leaves(make_batch(B=4, seed=1), names)
    kw = {"weights_w": d["weights_w"], "weights_l": d["weights_l"]} if weighted else {}
    loss, metrics = dpo(
        *args(d), beta=beta, loss_type=loss_type, label_smoothing=ls, ipo_average=ipo_average, **kw
    )
    ref = ref_dpo(d, beta, loss_type, ls, ipo_average, weighted)
    torch.testing.assert_close(loss, ref, **TIGHT)
    for a, b in zip(grads(loss, d, names), grads(ref, d, names), strict=True):
        torch.testing.assert_close(a, b, **TIGHT)
    # a wrong formula would differ by far more than TIGHT: the rewards are O(1)
    assert abs(loss.item() - ref_dpo(d, beta * 1.01, loss_type, ls, ipo_average, weighted).item()) > 1e-5


def test_dpo_metrics():
    d = make_batch(B=4, seed=2)
    beta = 0.3
    _, m = dpo(*args(d), beta=beta)
    rw = torch.stack([beta * seqsum(d["pol_lp_w"] - d["ref_lp_w"], d["mask_w"], b) for b in range(4)])
    rl = torch.stack([beta * seqsum(d["pol_lp_l"] - d["ref_lp_l"], d["mask_l"], b) for b in range(4)])
    torch.testing.assert_close(m["rewards/chosen"], rw.mean(), **TIGHT)
    torch.testing.assert_close(m["rewards/rejected"], rl.mean(), **TIGHT)
    torch.testing.assert_close(m["rewards/margins"], (rw - rl).mean(), **TIGHT)
    assert m["rewards/accuracy"].item() == pytest.approx((rw > rl).double().mean().item())
    assert not any(v.requires_grad for v in m.values())


def test_dpo_fp32_within_derived_tolerance():
    """fp32 inputs (the real dtype) against the float64 reference: the error is a sum of T rounded terms."""
    names = ["pol_lp_w", "pol_lp_l"]
    d64 = make_batch(B=4, Tw=9, Tl=6, seed=3)
    d32 = leaves(make_batch(B=4, Tw=9, Tl=6, seed=3, dtype=torch.float32), names)
    loss, _ = dpo(*args(d32), beta=0.5, weights_w=d32["weights_w"], weights_l=d32["weights_l"])
    ref = ref_dpo({k: v.to(F64) if v.is_floating_point() else v for k, v in d32.items()}, 0.5, weighted=True)
    assert_fp32_close(loss.to(F64), ref.detach(), width=9, scale=float(d64["pol_lp_w"].abs().sum(-1).max()))


def test_token_rewards():
    d = make_batch(seed=4)
    r = token_rewards(d["pol_lp_w"], d["ref_lp_w"], d["mask_w"], beta=0.25)
    for b in range(r.shape[0]):
        for t in range(r.shape[1]):
            want = 0.25 * (d["pol_lp_w"][b, t] - d["ref_lp_w"][b, t]) if d["mask_w"][b, t] else 0.0
            assert r[b, t].item() == pytest.approx(float(want), abs=1e-15)
    # summed token rewards are DPO's sequence reward
    _, m = dpo(*args(d), beta=0.25)
    torch.testing.assert_close(r.sum(-1).mean(), m["rewards/chosen"], **TIGHT)


def test_dpo_unit_weights_equal_unweighted():
    d = make_batch(seed=5)
    ones_w, ones_l = torch.ones_like(d["pol_lp_w"]), torch.ones_like(d["pol_lp_l"])
    a, _ = dpo(*args(d), beta=0.2)
    b, _ = dpo(*args(d), beta=0.2, weights_w=ones_w, weights_l=ones_l)
    torch.testing.assert_close(a, b, **TIGHT)


def _trl_stub(beta: float):
    acc = SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x, gather=lambda x: x)
    return SimpleNamespace(
        model=SimpleNamespace(training=True),
        accelerator=acc,
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=["sigmoid"],
        loss_weights=[1.0],
        beta=beta,
        label_smoothing=0.0,
        use_weighting=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )


def test_dpo_matches_trl_sigmoid():
    """Our DPO vs TRL's own DPOTrainer loss code on identical per-token log-probs. TRL 1.x has no free loss
    function: we call ``DPOTrainer._compute_loss`` with a stub trainer (precomputed reference log-probs) and a
    stub model whose fused-LM-head output carries our per-token log-probs."""
    pytest.importorskip("trl", minversion="1.0")
    from trl.trainer.dpo_trainer import DPOTrainer

    B, T, beta = 3, 6, 0.4
    d = make_batch(B=B, Tw=T, Tl=T, seed=6, dtype=torch.float32)
    pol = torch.cat([d["pol_lp_w"], d["pol_lp_l"]]).requires_grad_(True)
    mask = torch.cat([d["mask_w"], d["mask_l"]])
    completion_mask = torch.zeros(2 * B, T + 1, dtype=torch.long)
    completion_mask[:, 1:] = mask.long()  # TRL's log-probs are shifted by one: position t+1 is predicted at t
    inputs = {
        "input_ids": torch.zeros(2 * B, T + 1, dtype=torch.long),
        "attention_mask": torch.ones(2 * B, T + 1, dtype=torch.long),
        "completion_mask": completion_mask,
        "ref_chosen_logps": (d["ref_lp_w"] * d["mask_w"]).sum(-1),
        "ref_rejected_logps": (d["ref_lp_l"] * d["mask_l"]).sum(-1),
    }

    def model(**kwargs):
        zeros = torch.zeros(2 * B, T)
        return SimpleNamespace(log_probs=pol, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())

    trl_loss = DPOTrainer._compute_loss(_trl_stub(beta), model, inputs, False)
    (trl_grad,) = torch.autograd.grad(trl_loss, pol)
    ours, _ = dpo(pol[:B], pol[B:], d["ref_lp_w"], d["ref_lp_l"], d["mask_w"], d["mask_l"], beta=beta)
    (our_grad,) = torch.autograd.grad(ours, pol)
    assert_fp32_close(ours, trl_loss.detach(), width=T)
    # TRL sums all positions (its fused LM head returns a constant 0 at label -100), so compare gradients on the
    # completion tokens; ours is exactly 0 on the others
    assert_fp32_close(our_grad[mask], trl_grad[mask], width=T)
    assert our_grad[~mask].abs().max().item() == 0.0


# ----------------------------------------------------------------------------------------- ALN-2: TDPO


@pytest.mark.parametrize("variant", [1, 2])
def test_tdpo_matches_loop_reference(variant):
    names = ["pol_lp_w", "pol_lp_l", "kl_w", "kl_l"]
    d = leaves(make_batch(B=4, seed=7), names)
    loss, m = tdpo(*args(d, "kl_w", "kl_l"), beta=0.6, alpha=0.3, variant=variant)
    ref = ref_tdpo(d, 0.6, 0.3, variant)
    torch.testing.assert_close(loss, ref, **TIGHT)
    g_ours, g_ref = grads(loss, d, names), grads(ref, d, names)
    for a, b in zip(g_ours, g_ref, strict=True):
        torch.testing.assert_close(a, b, **TIGHT)
    kl_w_grad = g_ours[2]
    if variant == 2:  # stop-gradient on D(x, y_w)
        assert kl_w_grad.abs().max().item() == 0.0
    else:
        assert kl_w_grad.abs().max().item() > 1e-3
    Dw = torch.stack([seqsum(d["kl_w"], d["mask_w"], b) for b in range(4)]).mean()
    torch.testing.assert_close(m["seq_kl/chosen"], Dw.detach(), **TIGHT)


@pytest.mark.parametrize("variant", [1, 2])
def test_tdpo_zero_kl_is_dpo(variant):
    names = ["pol_lp_w", "pol_lp_l"]
    d = leaves(make_batch(B=4, seed=8), names)
    z_w, z_l = torch.zeros_like(d["kl_w"]), torch.zeros_like(d["kl_l"])
    a, _ = tdpo(*args(d), z_w, z_l, beta=0.4, variant=variant)
    b, _ = dpo(*args(d), beta=0.4)
    torch.testing.assert_close(a, b, **TIGHT)
    for x, y in zip(grads(a, d, names), grads(b, d, names), strict=True):
        torch.testing.assert_close(x, y, **TIGHT)
    # and the KL term matters when it is not zero
    c, _ = tdpo(*args(d, "kl_w", "kl_l"), beta=0.4, variant=variant)
    assert abs(c.item() - b.item()) > 1e-4


# ------------------------------------------------------------------------------------- ALN-3: SparsePO

SP = ["kl_w", "kl_l", "m_u_w", "m_u_l", "m_d_w", "m_d_l"]


def test_sparsepo_matches_loop_reference():
    names = ["pol_lp_w", "pol_lp_l", "kl_w", "kl_l", "m_u_w", "m_u_l", "m_d_w", "m_d_l"]
    d = leaves(make_batch(B=4, seed=9), names)
    loss, m = sparsepo(*args(d, *SP), beta=0.5, l1_u=0.3, l1_d=0.2)
    ref = ref_sparsepo(d, 0.5, 0.3, 0.2)
    torch.testing.assert_close(loss, ref, **TIGHT)
    for a, b in zip(grads(loss, d, names), grads(ref, d, names), strict=True):
        torch.testing.assert_close(a, b, **TIGHT)
    assert 0.0 < m["mask_u/sparsity"].item() < 1.0  # relu(randn) is about half zeros


def test_sparsepo_reductions():
    names = ["pol_lp_w", "pol_lp_l", "kl_w", "kl_l"]
    d = leaves(make_batch(B=4, seed=10), names)
    ones = {k: torch.ones_like(d[k]) for k in ("m_u_w", "m_u_l", "m_d_w", "m_d_l")}
    zeros = {k: torch.zeros_like(d[k]) for k in ("m_d_w", "m_d_l")}
    sp1, _ = sparsepo(*args(d, "kl_w", "kl_l"), ones["m_u_w"], ones["m_u_l"], ones["m_d_w"], ones["m_d_l"], beta=0.5)
    t1, _ = tdpo(*args(d, "kl_w", "kl_l"), beta=0.5, variant=1)
    torch.testing.assert_close(sp1, t1, **TIGHT)
    for a, b in zip(grads(sp1, d, names), grads(t1, d, names), strict=True):
        torch.testing.assert_close(a, b, **TIGHT)
    sp0, _ = sparsepo(*args(d, "kl_w", "kl_l"), ones["m_u_w"], ones["m_u_l"], zeros["m_d_w"], zeros["m_d_l"], beta=0.5)
    d0, _ = dpo(*args(d), beta=0.5)
    torch.testing.assert_close(sp0, d0, **TIGHT)
    for a, b in zip(grads(sp0, d, names), grads(d0, d, names), strict=True):
        torch.testing.assert_close(a, b, **TIGHT)
    assert abs(sp1.item() - sp0.item()) > 1e-4  # the KL masks matter


def test_mask_model_matches_formula():
    torch.manual_seed(0)
    B, T, dm, L = 2, 4, 6, 3
    mm = MaskModel(dm, L).double()
    with torch.no_grad():  # non-trivial LN affine, mixing and biases (some units off, some on)
        for ln in mm.norms:
            ln.weight.normal_(1.0, 0.3)
            ln.bias.normal_(0.0, 0.3)
        for p in mm.proj:
            p.weight.normal_(0.0, 0.5)
            p.bias.normal_(0.0, 0.5)
        mm.mix.copy_(torch.tensor([0.7, -0.4, 1.1], dtype=F64))
    hs = [torch.randn(B, T, dm, dtype=F64, requires_grad=True) for _ in range(L)]
    out = mm(hs)
    ref = torch.zeros(B, T, dtype=F64)
    for b in range(B):
        for t in range(T):
            acc = torch.zeros((), dtype=F64)
            for i in range(L):
                h = hs[i][b, t]
                mu = h.mean()
                var = ((h - mu) ** 2).mean()
                x = (h - mu) / torch.sqrt(var + mm.norms[i].eps) * mm.norms[i].weight + mm.norms[i].bias
                acc = acc + mm.mix[i] * torch.relu((x * mm.proj[i].weight[0]).sum() + mm.proj[i].bias[0])
            ref = ref.index_put((torch.tensor([b]), torch.tensor([t])), torch.relu(acc)[None])
    torch.testing.assert_close(out, ref, **TIGHT)
    assert (out == 0).any() and (out > 0).any()
    for a, b in zip(torch.autograd.grad(out.sum(), hs), torch.autograd.grad(ref.sum(), hs), strict=True):
        torch.testing.assert_close(a, b, **TIGHT)
    with pytest.raises(ValueError, match="layers"):
        mm(hs[:2])


# ----------------------------------------------------------------------------------------- ALN-4: cDPO


def test_contrastive_token_weights_match_formula():
    g = torch.Generator().manual_seed(11)
    B, T, V = 2, 5, 13
    zp, zn = 3 * torch.randn(B, T, V, generator=g), 3 * torch.randn(B, T, V, generator=g)
    y = torch.randint(0, V, (B, T), generator=g)
    mask = torch.tensor([[False, True, True, True, False], [True, True, False, False, False]])
    for gamma in (1.0, 0.5):
        w = contrastive_token_weights(zp, zn, y, mask, gamma=gamma, chunk=3)
        ref = torch.zeros(B, T, dtype=F64)
        for b in range(B):
            for t in range(T):
                if mask[b, t]:
                    u = (1 + gamma) * zp[b, t].double() - gamma * zn[b, t].double()
                    ref[b, t] = 1 - torch.exp(u[y[b, t]]) / torch.exp(u).sum()
        assert_fp32_close(w.double(), ref, width=V, scale=float(((1 + gamma) * zp - gamma * zn).abs().max()))
    # log-softmaxed logits give the same weights (softmax is shift-invariant per position)
    w2 = contrastive_token_weights(torch.log_softmax(zp, -1), torch.log_softmax(zn, -1), y, mask)
    assert_fp32_close(w2, contrastive_token_weights(zp, zn, y, mask), width=V, scale=float(zp.abs().max() * 3))


def test_cdpo_is_weighted_dpo_with_unit_chosen_weights():
    names = ["pol_lp_w", "pol_lp_l"]
    d = leaves(make_batch(B=3, seed=12), names)
    a, _ = cdpo(*args(d), weights_l=d["weights_l"], beta=0.3)
    b = ref_dpo({**d, "weights_w": torch.ones_like(d["weights_w"])}, 0.3, weighted=True)
    torch.testing.assert_close(a, b, **TIGHT)
    for x, y in zip(grads(a, d, names), grads(b, d, names), strict=True):
        torch.testing.assert_close(x, y, **TIGHT)


# ---------------------------------------------------------------------------------------- ALN-5: T-REG


@pytest.mark.parametrize("normalize", ["softmax", "sigmoid", "none"])
def test_self_contrastive_token_rewards(normalize):
    d = make_batch(B=3, seed=13)
    better, worse, m = d["pol_lp_w"], d["ref_lp_w"], d["mask_w"]
    r = self_contrastive_token_rewards(better, worse, m, normalize=normalize, temperature=0.5)
    for b in range(3):
        idx = [t for t in range(m.shape[1]) if m[b, t]]
        raw = [(better[b, t] - worse[b, t]).item() / 0.5 for t in idx]
        if normalize == "softmax":
            z = sum(math.exp(v) for v in raw)
            want = [len(idx) * math.exp(v) / z for v in raw]
        elif normalize == "sigmoid":
            want = [2 / (1 + math.exp(-v)) - 1 for v in raw]
        else:
            want = raw
        assert r[b, idx].tolist() == pytest.approx(want, abs=1e-12)
        assert r[b, [t for t in range(m.shape[1]) if not m[b, t]]].abs().sum().item() == 0.0


@pytest.mark.parametrize("form", ["weighted", "mse", "cosine"])
def test_treg_matches_loop_reference(form):
    names = ["pol_lp_w", "pol_lp_l"]
    d = leaves(make_batch(B=3, seed=14), names)
    beta, alpha = 0.5, 0.7
    rs_w, rs_l = d["weights_w"] - 1, d["weights_l"] - 1  # signed self-rewards
    loss, m = treg(*args(d), rs_w, rs_l, beta=beta, alpha=alpha, form=form)

    def reg(s, rs, b):
        mask = d[f"mask_{s}"]
        rh = [beta * (d[f"pol_lp_{s}"][b, t] - d[f"ref_lp_{s}"][b, t]) for t in range(mask.shape[1]) if mask[b, t]]
        rr = [rs[b, t] for t in range(mask.shape[1]) if mask[b, t]]
        if form == "weighted":
            return -logsig(sum(x * y for x, y in zip(rh, rr, strict=True)))
        if form == "mse":
            return sum((x - y) ** 2 for x, y in zip(rh, rr, strict=True)) / len(rh)
        dot = sum(x * y for x, y in zip(rh, rr, strict=True))
        return 1 - dot / (torch.sqrt(sum(x * x for x in rh)) * torch.sqrt(sum(y * y for y in rr)))

    ref = ref_dpo(d, beta) + alpha * sum(reg("w", rs_w, b) + reg("l", rs_l, b) for b in range(3)) / 3
    torch.testing.assert_close(loss, ref, **TIGHT)
    for a, b in zip(grads(loss, d, names), grads(ref, d, names), strict=True):
        torch.testing.assert_close(a, b, **TIGHT)
    # alpha = 0 is DPO
    l0, _ = treg(*args(d), rs_w, rs_l, beta=beta, alpha=0.0, form=form)
    torch.testing.assert_close(l0, dpo(*args(d), beta=beta)[0], **TIGHT)
    assert m["treg/reg"].item() > 0


def test_treg_regularizer_mse_zero_at_match():
    d = make_batch(seed=15)
    r = token_rewards(d["pol_lp_w"], d["ref_lp_w"], d["mask_w"], 0.3)
    assert treg_regularizer(r, r, d["mask_w"], form="mse").abs().max().item() < 1e-15
    assert treg_regularizer(r, r, d["mask_w"], form="cosine").abs().max().item() < 1e-12


# ------------------------------------------------------------------------------------ ALN-7: AlignDistil


def test_aligndistil_target_matches_formula():
    g = torch.Generator().manual_seed(16)
    za, zb = 2 * torch.randn(2, 3, 11, generator=g), 2 * torch.randn(2, 3, 11, generator=g)
    beta, beta2, tau = 0.1, 2.0, 0.8
    tgt, coef = aligndistil_target(za, zb, beta, beta2, tau, chunk=2)
    for b in range(2):
        for t in range(3):
            pa, pb = torch.softmax(za[b, t].double(), -1), torch.softmax(zb[b, t].double(), -1)
            w = beta2 * sum(abs(pa[v] - pb[v]) for v in range(11)) + 1e-3
            want = (w * (za[b, t].double() - zb[b, t].double()) + za[b, t].double()) / tau
            assert_fp32_close(tgt[b, t].double(), want, width=11)
            assert coef[b, t].item() == pytest.approx((beta / w).item(), rel=1e-5)


def test_aligndistil_loss_matches_loop_reference_and_chunks():
    g = torch.Generator().manual_seed(17)
    B, T, V = 2, 4, 9
    s = (2 * torch.randn(B, T, V, generator=g)).requires_grad_(True)
    q = (2 * torch.randn(B, T, V, generator=g)).requires_grad_(True)
    wts = torch.rand(B, T, generator=g) + 0.5
    mask = torch.tensor([[False, True, True, True], [True, True, False, False]])
    loss, m = aligndistil_loss(s, q, wts, mask, chunk=2)
    s64, q64 = s.detach().double().requires_grad_(True), q.detach().double().requires_grad_(True)
    ref = 0
    for b in range(B):
        for t in range(T):
            if mask[b, t]:
                lp, lq = torch.log_softmax(s64[b, t], -1), torch.log_softmax(q64[b, t], -1)
                ref = ref + wts[b, t].double() * (lp.exp() * (lp - lq)).sum()
    ref = ref / B
    scale = float(s.detach().abs().max() + q.detach().abs().max())
    assert_fp32_close(loss.double(), ref.detach(), width=V, scale=scale)
    gs, gq = torch.autograd.grad(loss, [s, q])
    rs, rq = torch.autograd.grad(ref, [s64, q64])
    assert_fp32_close(gs.double(), rs, width=V)
    assert_fp32_close(gq.double(), rq, width=V)
    assert gs[~mask].abs().max().item() == 0.0  # padding gets no gradient
    one, _ = aligndistil_loss(s, q, wts, mask, chunk=1000)
    assert_fp32_close(one.double(), loss.detach().double(), width=V, scale=scale)
    assert m["kl/mean"].item() > 0


# ---------------------------------------------------------------------------------------------- ALN-6: RTO


def test_rto_token_rewards_match_formula():
    d = make_batch(B=3, seed=18)
    dpo_lp, ref_lp, pol_lp, m = 3 * d["pol_lp_w"], d["ref_lp_w"], d["pol_lp_l"][:, :1].expand_as(d["ref_lp_w"]), d["mask_w"]
    pol_lp = (pol_lp * m).contiguous()
    seq = torch.tensor([3.0, -25.0, 12.0], dtype=F64)
    r = rto_token_rewards(dpo_lp, ref_lp, pol_lp, seq, m, beta1=0.05, clip=0.05, kl_coef=0.01)
    for b in range(3):
        idx = [t for t in range(m.shape[1]) if m[b, t]]
        for t in range(m.shape[1]):
            want = 0.0
            if m[b, t]:
                want = min(max(0.05 * (dpo_lp[b, t] - ref_lp[b, t]).item(), -0.05), 0.05)
                want -= 0.01 * (pol_lp[b, t] - ref_lp[b, t]).item()
                if t == idx[-1]:
                    want += max(min(seq[b].item(), 10.0), -10.0)
            assert r[b, t].item() == pytest.approx(want, abs=1e-12)
    # scale before clipping: with beta1 tiny, the clip is not reached (clip-then-scale would give 0.05·beta1)
    small = rto_token_rewards(dpo_lp, ref_lp, ref_lp, torch.zeros(3, dtype=F64), m, beta1=1e-3, clip=0.05)
    torch.testing.assert_close(small, 1e-3 * (dpo_lp - ref_lp) * m, **TIGHT)


# ---------------------------------------------------------------------------------------- ALN-8: Text2Grad


def test_spans_to_token_rewards():
    offsets = [(0, 0), (0, 4), (4, 9), (9, 10), (10, 16)]  # a special token first
    spans = [(2, 6, -1.0), (5, 16, 2.0)]
    mean = spans_to_token_rewards(offsets, spans, length=7)
    total = spans_to_token_rewards(offsets, spans, length=7, overlap="sum")
    assert mean.tolist() == pytest.approx([0.0, -1.0, 0.5, 2.0, 2.0, 0.0, 0.0])
    assert total.tolist() == pytest.approx([0.0, -1.0, 1.0, 2.0, 2.0, 0.0, 0.0])
    # adjacent, non-overlapping character ranges do not count as overlap (end is exclusive)
    assert spans_to_token_rewards([(0, 4), (4, 8)], [(4, 8, 1.0)]).tolist() == [0.0, 1.0]
    with pytest.raises(ValueError, match="shorter"):
        spans_to_token_rewards(offsets, spans, length=3)
    with pytest.raises(ValueError, match="char_start"):
        spans_to_token_rewards(offsets, [(0, 1)])


# ------------------------------------------------------------------------------------ padding, batching


def _pad(d: dict[str, torch.Tensor], extra: int, garbage: float) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in d.items():
        fill = torch.zeros(v.shape[0], extra, dtype=torch.bool) if v.dtype == torch.bool else torch.full(
            (v.shape[0], extra), garbage, dtype=v.dtype
        )
        out[k] = torch.cat([v, fill], dim=1)
    return out


LOSSES = {
    "dpo": lambda d: dpo(*args(d), beta=0.5, weights_w=d["weights_w"], weights_l=d["weights_l"]),
    "ipo": lambda d: dpo(*args(d), beta=0.5, loss_type="ipo", weights_w=d["weights_w"]),
    "tdpo1": lambda d: tdpo(*args(d, "kl_w", "kl_l"), beta=0.5, variant=1),
    "tdpo2": lambda d: tdpo(*args(d, "kl_w", "kl_l"), beta=0.5, variant=2),
    "sparsepo": lambda d: sparsepo(*args(d, *SP), beta=0.5, l1_u=0.1, l1_d=0.1),
    "treg": lambda d: treg(*args(d), d["weights_w"], d["weights_l"], beta=0.5, alpha=0.5),
}
GRAD_NAMES = ["pol_lp_w", "pol_lp_l", "kl_w", "kl_l", "m_u_w", "m_u_l", "weights_w", "weights_l"]


@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("garbage", [7.5, float("nan")])
def test_padding_changes_nothing(name, garbage):
    base = make_batch(B=3, seed=19)
    d = leaves(base, GRAD_NAMES)
    p = leaves(_pad(base, 4, garbage), GRAD_NAMES)
    a, ma = LOSSES[name](d)
    b, mb = LOSSES[name](p)
    torch.testing.assert_close(a, b, **TIGHT)
    for k in ma:
        torch.testing.assert_close(ma[k], mb[k], **TIGHT)
    for n, ga, gb in zip(GRAD_NAMES, grads(a, d, GRAD_NAMES), grads(b, p, GRAD_NAMES), strict=True):
        T = ga.shape[1]
        torch.testing.assert_close(gb[:, :T], ga, **TIGHT)
        assert gb[:, T:].abs().max().item() == 0.0, n


@settings(max_examples=20, deadline=None)
@given(B=st.integers(1, 4), Tw=st.integers(2, 6), Tl=st.integers(2, 6), seed=st.integers(0, 10_000),
       name=st.sampled_from(list(LOSSES)))
def test_batched_equals_mean_of_rows(B, Tw, Tl, seed, name):
    d = make_batch(B=B, Tw=Tw, Tl=Tl, seed=seed)
    full, _ = LOSSES[name](d)
    rows = [LOSSES[name]({k: v[b : b + 1] for k, v in d.items()})[0] for b in range(B)]
    torch.testing.assert_close(full, torch.stack(rows).mean(), **TIGHT)
    none, _ = dpo(*args(d), beta=0.5, reduction="none")
    assert none.shape == (B,)


# ------------------------------------------------------------------------------------------- bad inputs


def _bad(**changes):
    d = make_batch(B=3, seed=20)
    d.update(changes)
    return d


def test_bad_inputs_raise():
    d = make_batch(B=3, seed=20)
    with pytest.raises(ValueError, match="batch size"):
        dpo(d["pol_lp_w"], d["pol_lp_l"][:2], d["ref_lp_w"], d["ref_lp_l"][:2], d["mask_w"], d["mask_l"][:2])
    with pytest.raises(ValueError, match="same \\[B, T\\] shape"):
        dpo(*args(_bad(mask_w=d["mask_w"][:, :-1])))
    with pytest.raises(ValueError, match="same \\[B, T\\] shape"):
        dpo(*args(d), weights_l=torch.ones(3, 2, dtype=F64))
    with pytest.raises(ValueError, match="same \\[B, T\\] shape"):
        tdpo(*args(d), d["kl_w"][:, :-1], d["kl_l"])
    for beta in (0.0, -0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="beta"):
            dpo(*args(d), beta=beta)
        with pytest.raises(ValueError, match="beta"):
            tdpo(*args(d, "kl_w", "kl_l"), beta=beta)
    nan_w = d["pol_lp_w"].clone()
    b, t = d["mask_w"].nonzero()[0].tolist()
    nan_w[b, t] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        dpo(*args(_bad(pol_lp_w=nan_w)))
    empty = d["mask_l"].clone()
    empty[1] = False
    with pytest.raises(ValueError, match=r"no completion token in row\(s\) \[1\]"):
        dpo(*args(_bad(mask_l=empty)))
    with pytest.raises(ValueError, match="empty completion"):
        sparsepo(*args(_bad(mask_l=empty), *SP))
    with pytest.raises(ValueError, match="loss_type"):
        dpo(*args(d), loss_type="kto")
    with pytest.raises(ValueError, match="variant"):
        tdpo(*args(d, "kl_w", "kl_l"), variant=3)
    with pytest.raises(ValueError, match="0 and 1"):
        dpo(*args(_bad(mask_w=d["mask_w"].double() * 0.5)))
    with pytest.raises(ValueError, match="tokenizer"):
        aligndistil_target(torch.zeros(1, 2, 5), torch.zeros(1, 2, 6), 0.1, 1.0)
    with pytest.raises(ValueError, match="seq_reward"):
        rto_token_rewards(*[d[k] for k in ("pol_lp_w", "ref_lp_w", "ref_lp_w")], torch.zeros(2), d["mask_w"])
    # 0/1 integer masks are accepted and equal boolean masks
    a, _ = dpo(*args(_bad(mask_w=d["mask_w"].long(), mask_l=d["mask_l"].int())))
    torch.testing.assert_close(a, dpo(*args(d))[0], **TIGHT)
