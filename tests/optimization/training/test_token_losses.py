"""Token-level loss terms (METHODS.md 3B: SimCTG, CT, NTL, RTD, smoothed CE, unlikelihood).

Every loss is pinned against a hand-written float64 loop implementation of its paper formula (value and
gradient through ``torch.autograd.grad``), against closed forms, and for mask invariance (NaN logits and
arbitrary labels at masked positions change neither the value nor any gradient).

Tolerances: on fp64 inputs the vectorised code and the loops differ only by summation order, so 1e-10
relative. On fp32 inputs (paths through ``gather_logprobs``/``token_kl``, which compute in fp32) the error is a
few fp32 ulps (ε = 1.2e-7) times the O(V) terms of a softmax, so rtol 1e-4, atol 1e-6.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import BertConfig, BertForMaskedLM, BertForTokenClassification

from tokensmith.optimization.training.base import TokenBatch, get_token_loss, token_loss_names
from tokensmith.optimization.training.token_losses import (
    ContrastiveTokenLoss,
    NumberTokenLoss,
    ReplacedTokenDetectionLoss,
    SimCTGLoss,
    SmoothedCELoss,
    UnlikelihoodLoss,
    contrastive_token_loss,
    number_token_loss,
    number_token_values,
    replaced_token_detection_loss,
    share_embeddings,
    simctg_loss,
    smoothed_ce,
    unlikelihood_loss,
)

F64 = dict(rtol=1e-10, atol=1e-12)
F32 = dict(rtol=1e-4, atol=1e-6)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _case(B=3, T=7, V=6, seed=0, dtype=torch.float64, n_labels=None):
    """Random logits/labels with a ragged mask (row 1 has a masked prompt, row 2 padding); labels drawn
    from a small alphabet so tokens repeat."""
    g = _gen(seed)
    logits = (2 * torch.randn(B, T, V, generator=g)).to(dtype).requires_grad_(True)
    labels = torch.randint(0, n_labels or min(V, 3), (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, :2] = False
    if B > 2:
        mask[2, T - 3 :] = False
    return logits, labels, mask


def _grad(loss, x):
    (g,) = torch.autograd.grad(loss, x)
    return g


def _poison(logits, labels, mask):
    """Same kept values; NaN logits and -100 / random labels where masked."""
    lg = logits.detach().clone()
    lg[~mask] = float("nan")
    lb = labels.clone()
    lb[~mask] = -100
    return lg.requires_grad_(True), lb


# --------------------------------------------------------------------------------------------------- references
def ref_simctg(hidden, mask, margin):
    h = hidden.double()
    tot, n = 0.0, 0
    for b in range(h.shape[0]):
        kept = [t for t in range(h.shape[1]) if mask[b, t]]
        for i in kept:
            for j in kept:
                if i == j:
                    continue
                sii = F.cosine_similarity(h[b, i], h[b, i], dim=0, eps=1e-30)
                sij = F.cosine_similarity(h[b, i], h[b, j], dim=0, eps=1e-30)
                tot = tot + torch.clamp(margin - sii + sij, min=0)
                n += 1
    return tot / n


def _rnd(x):  # round half up
    return math.floor(x + 0.5)


def ref_ct(logits, labels, mask, preceding_m, ct_length, dedup=True):
    z = logits.double()
    tot, npos = 0.0, 0
    for b in range(z.shape[0]):
        kept = [t for t in range(z.shape[1]) if mask[b, t]]
        n = len(kept)
        L = (
            n
            if ct_length is None
            else (_rnd(ct_length * n) if isinstance(ct_length, float) else min(ct_length, n))
        )
        M = (
            None
            if preceding_m is None
            else (_rnd(preceding_m * L) if isinstance(preceding_m, float) else min(preceding_m, L))
        )
        for r in range(L):
            t = kept[r]
            y = int(labels[b, t])
            lo = 0 if M is None else max(0, r - M)
            negs = [int(labels[b, kept[q]]) for q in range(lo, r) if int(labels[b, kept[q]]) != y]
            if dedup:
                negs = sorted(set(negs))
            s = sum((torch.exp(z[b, t, c] - z[b, t, y]) for c in negs), torch.zeros((), dtype=torch.float64))
            tot = tot + torch.log(1 + s)
            npos += 1
    return tot / npos


def ref_ct_package(logits, labels, ct_length=0.25, preced=0.5):
    """The authors' ct-loss semantics on an unpadded batch: CT on the first round(T·ct_length) positions,
    negatives = the labels at the preceding round(preced·ct) positions that differ from y_t, duplicates
    counted once per occurrence."""
    z = logits.double()
    B, T, _ = z.shape
    ct = round(T * ct_length)
    M = round(preced * ct)
    tot = 0.0
    for b in range(B):
        for t in range(ct):
            y = int(labels[b, t])
            s = torch.zeros((), dtype=torch.float64)
            for q in range(max(0, t - M), t):
                c = int(labels[b, q])
                if c != y:
                    s = s + torch.exp(z[b, t, c] - z[b, t, y])
            tot = tot + torch.log(1 + s)
    return tot / (B * ct)


def ref_ntl(logits, labels, mask, ids, vals, variant, p=2.0):
    z = logits.double()
    table = {int(i): float(v) for i, v in zip(ids, vals, strict=True)}
    ids = list(table)
    vals_t = torch.tensor([table[i] for i in ids], dtype=torch.float64)
    per = []
    for b in range(z.shape[0]):
        for t in range(z.shape[1]):
            y = int(labels[b, t])
            if not mask[b, t] or y not in table:
                continue
            q = torch.softmax(z[b, t, ids], dim=0)
            if variant == "mse":
                per.append((q @ vals_t - table[y]).abs() ** p)
            else:  # closed form of W1 against a point mass
                per.append((q * (vals_t - table[y]).abs()).sum())
    return torch.stack(per).mean()


def ref_smoothed(logits, labels, mask, E, tau, alpha):
    z = logits.double()
    En = E.double() / E.double().norm(dim=-1, keepdim=True)
    per = []
    for b in range(z.shape[0]):
        for t in range(z.shape[1]):
            if not mask[b, t]:
                continue
            y = int(labels[b, t])
            logp = torch.log_softmax(z[b, t], dim=0)
            r = torch.softmax((En @ En[y]) / tau, dim=0)
            kl = (r * (r.log() - logp)).sum()
            per.append((1 - alpha) * (-logp[y]) + alpha * kl)
    return torch.stack(per).mean()


def ref_ul(logits, labels, mask, alpha=1.0):
    z = logits.double()
    tot, n = torch.zeros((), dtype=torch.float64), 0
    for b in range(z.shape[0]):
        seen = []
        for t in range(z.shape[1]):
            if not mask[b, t]:
                continue
            y = int(labels[b, t])
            p = torch.softmax(z[b, t], dim=0)
            for c in sorted(set(seen) - {y}):
                tot = tot - torch.log(1 - p[c])
            seen.append(y)
            n += 1
    return alpha * tot / n


# --------------------------------------------------------------------------------------------------- SimCTG
def _hidden(B=3, T=6, d=5, seed=0, dtype=torch.float64):
    g = _gen(seed)
    base = torch.randn(B, 1, d, generator=g)
    h = base + 0.8 * torch.randn(B, T, d, generator=g)  # correlated: some hinges active, some not
    return h.to(dtype).requires_grad_(True)


@pytest.mark.parametrize("margin", [0.5, 1.2])
def test_simctg_matches_loop_reference(margin):
    h = _hidden()
    _, _, mask = _case(B=3, T=6)
    out, ref = simctg_loss(h, mask, margin), ref_simctg(h, mask, margin)
    assert 0 < ref.item()  # the case exercises the hinge
    torch.testing.assert_close(out, ref, **F64)
    torch.testing.assert_close(_grad(out, h), _grad(ref, h), **F64)


def test_simctg_fp32_and_closed_forms():
    h = _hidden(dtype=torch.float32)
    mask = torch.ones(3, 6, dtype=torch.bool)
    torch.testing.assert_close(simctg_loss(h, mask).double(), ref_simctg(h.detach(), mask, 0.5), **F32)
    # all pairwise cosines <= 1 - ρ  ->  0, zero gradient
    q = torch.linalg.qr(torch.randn(6, 6, generator=_gen(1)))[0]
    ortho = (q[None] * torch.tensor([1.0, 2, 3, 4, 5, 6])[None, :, None]).requires_grad_(True)
    loss = simctg_loss(ortho, torch.ones(1, 6, dtype=torch.bool), margin=0.5)
    assert loss.item() == 0.0 and _grad(loss, ortho).abs().max().item() == 0.0
    # identical representations: every hinge is ρ - 1 + 1 = ρ
    same = torch.randn(1, 1, 4).expand(1, 5, 4)
    assert simctg_loss(same, torch.ones(1, 5), margin=0.3).item() == pytest.approx(0.3, abs=1e-6)


def test_simctg_mask_invariance():
    h = _hidden()
    _, _, mask = _case(B=3, T=6)
    poisoned = h.detach().clone()
    poisoned[~mask] = float("nan")
    poisoned.requires_grad_(True)
    a, b = simctg_loss(h, mask), simctg_loss(poisoned, mask)
    torch.testing.assert_close(a, b, **F64)
    ga, gb = _grad(a, h), _grad(b, poisoned)
    assert torch.isfinite(gb).all() and gb[~mask].abs().max() == 0
    torch.testing.assert_close(ga, gb, **F64)


# --------------------------------------------------------------------------------------------------- CT
@pytest.mark.parametrize(
    "preceding_m,ct_length,dedup",
    [(None, None, True), (0.5, 0.25, True), (2, None, True), (0.5, 0.75, False), (3, 5, False)],
)
def test_ct_matches_loop_reference(preceding_m, ct_length, dedup):
    logits, labels, mask = _case(B=3, T=10, V=5, seed=2)
    out = contrastive_token_loss(logits, labels, mask, preceding_m, ct_length, dedup)
    ref = ref_ct(logits, labels, mask, preceding_m, ct_length, dedup)
    torch.testing.assert_close(out, ref, **F64)
    torch.testing.assert_close(_grad(out, logits), _grad(ref, logits), **F64)


def test_ct_matches_authors_package_semantics_unpadded():
    logits, labels, _ = _case(B=2, T=16, V=5, seed=3)
    mask = torch.ones(2, 16, dtype=torch.bool)
    out = contrastive_token_loss(logits, labels, mask, dedup=False)  # defaults 0.5 / 0.25
    ref = ref_ct_package(logits, labels)
    torch.testing.assert_close(out, ref, **F64)
    torch.testing.assert_close(_grad(out, logits), _grad(ref, logits), **F64)


def test_ct_hand_case_and_mask_invariance():
    # one negative with z_n - z_y = 1 at position 1, none at 0: (log(1 + e) + 0) / 2
    z = torch.zeros(1, 2, 3)
    z[0, 1, 0] = 1.0
    v = contrastive_token_loss(z, torch.tensor([[0, 1]]), torch.ones(1, 2), None, None)
    assert v.item() == pytest.approx(math.log1p(math.e) / 2, rel=1e-6)
    logits, labels, mask = _case(B=3, T=8, V=5, seed=4)
    pl, pb = _poison(logits, labels, mask)
    a = contrastive_token_loss(logits, labels, mask, None, None)
    b = contrastive_token_loss(pl, pb, mask, None, None)
    torch.testing.assert_close(a, b, **F64)
    gb = _grad(b, pl)
    assert torch.isfinite(gb).all() and gb[~mask].abs().max() == 0
    torch.testing.assert_close(_grad(a, logits), gb, **F64)


def test_ct_short_rows_give_connected_zero():
    logits = torch.randn(2, 3, 4, requires_grad=True)
    loss = contrastive_token_loss(
        logits, torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3), ct_length=0.1
    )
    assert loss.item() == 0.0
    assert _grad(loss, logits).abs().max() == 0


# --------------------------------------------------------------------------------------------------- NTL
NUMS = ([1, 3, 4, 6], [0.0, 1.0, 2.0, 7.5])  # unevenly spaced values


def _ntl_case(dtype=torch.float64):
    logits, labels, mask = _case(B=3, T=6, V=8, seed=5, dtype=dtype, n_labels=8)
    return logits, labels, mask


@pytest.mark.parametrize("variant,p", [("mse", 2.0), ("mse", 1.0), ("mse", 3.0), ("was", 2.0)])
def test_ntl_matches_reference(variant, p):
    logits, labels, mask = _ntl_case()
    out = number_token_loss(logits, labels, mask, NUMS, variant=variant, p=p)
    ref = ref_ntl(logits, labels, mask, *NUMS, variant=variant, p=p)
    torch.testing.assert_close(out, ref, **F64)
    torch.testing.assert_close(_grad(out, logits), _grad(ref, logits), **F64)


def test_ntl_wasserstein_cdf_equals_expected_abs_error_with_tied_values():
    # the implementation integrates |F_q - F_y|; the closed form against a point mass is E_q|v - y|,
    # also with two tokens of one value (zero-width CDF steps)
    nums = ([0, 2, 5, 7, 1], [3.0, -1.0, 3.0, 10.0, 0.5])
    logits, labels, mask = _case(B=2, T=9, V=8, seed=6, n_labels=8)
    out = number_token_loss(logits, labels, mask, nums, variant="was")
    torch.testing.assert_close(out, ref_ntl(logits, labels, mask, *nums, variant="was"), **F64)


def test_ntl_value_forms_fp32_and_no_number_labels():
    logits, labels, mask = _ntl_case(dtype=torch.float32)
    a = number_token_loss(logits, labels, mask, NUMS)
    dense = torch.full((8,), float("nan"))
    dense[torch.tensor(NUMS[0])] = torch.tensor(NUMS[1])
    b = number_token_loss(logits, labels, mask, dense)
    c = number_token_loss(logits, labels, mask, dict(zip(*NUMS, strict=True)))
    assert a.item() == b.item() == c.item()
    torch.testing.assert_close(a.double(), ref_ntl(logits.detach(), labels, mask, *NUMS, "mse"), **F32)
    # perfect prediction: all number mass on the label's value -> 0
    z = torch.full((1, 1, 8), -30.0)
    z[0, 0, 4] = 30.0
    assert number_token_loss(z, torch.tensor([[4]]), torch.ones(1, 1), NUMS, variant="was").item() < 1e-12
    # no number labels: a 0 that backpropagates zeros
    lg = torch.randn(1, 3, 8, requires_grad=True)
    loss = number_token_loss(lg, torch.tensor([[0, 2, 5]]), torch.ones(1, 3), NUMS)
    assert loss.item() == 0.0 and _grad(loss, lg).abs().max() == 0


def test_ntl_mask_invariance():
    logits, labels, mask = _ntl_case()
    pl, pb = _poison(logits, labels, mask)
    for variant in ("mse", "was"):
        a = number_token_loss(logits, labels, mask, NUMS, variant)
        b = number_token_loss(pl, pb, mask, NUMS, variant)
        torch.testing.assert_close(a, b, **F64)
        gb = _grad(b, pl)
        assert torch.isfinite(gb).all() and gb[~mask].abs().max() == 0
        torch.testing.assert_close(_grad(a, logits), gb, **F64)


def test_number_token_values_llama_digits(llama):
    ids, values = number_token_values(llama.tokenizer)
    assert sorted(values.tolist()) == [float(d) for d in range(10)]
    for i, v in zip(ids.tolist(), values.tolist(), strict=True):
        assert llama.tokenizer.decode([i]).strip() == str(int(v))


def _wordlevel_tokenizer():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {
        "[UNK]": 0,
        "[CLS]": 1,
        "7": 2,
        "12": 3,
        "##5": 4,
        "²": 5,
        "3.5": 6,
        "cat": 7,
        "-2": 8,
        "a1": 9,
        "00": 10,
    }
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", cls_token="[CLS]")


def test_number_token_values_rules():
    tok = _wordlevel_tokenizer()
    ids, values = number_token_values(tok)
    assert dict(zip(ids.tolist(), values.tolist(), strict=True)) == {
        2: 7.0,
        4: 5.0,
    }  # digits, a ## continuation digit
    ids, values = number_token_values(tok, digits_only=False)
    assert dict(zip(ids.tolist(), values.tolist(), strict=True)) == {
        2: 7.0,
        3: 12.0,
        4: 5.0,
        6: 3.5,
        8: -2.0,
        10: 0.0,
    }


# --------------------------------------------------------------------------------------------------- smoothed CE
def _emb(V=6, d=4, seed=7):
    return torch.randn(V, d, generator=_gen(seed))


@pytest.mark.parametrize("tau,alpha", [(0.5, 0.3), (0.2, 1.0), (2.0, 0.7)])
def test_smoothed_ce_matches_reference(tau, alpha):
    logits, labels, mask = _case(B=3, T=5, V=6, seed=8, dtype=torch.float32, n_labels=6)
    E = _emb()
    out = smoothed_ce(logits, labels, mask, E, tau, alpha)
    ld = logits.detach().double().requires_grad_(True)
    ref = ref_smoothed(ld, labels, mask, E, tau, alpha)
    torch.testing.assert_close(out.double(), ref, **F32)
    torch.testing.assert_close(_grad(out, logits).double(), _grad(ref, ld), **F32)


def test_smoothed_ce_closed_forms():
    logits, labels, mask = _case(B=3, T=5, V=6, seed=9, dtype=torch.float32, n_labels=6)
    E = _emb()
    ce = F.cross_entropy(logits[mask], labels[mask])
    torch.testing.assert_close(smoothed_ce(logits, labels, mask, E, 0.5, alpha=0.0), ce, **F32)
    # τ -> 0: r is one-hot at y (cos(E_w, E_y) < 1 for w != y), so the loss is CE for any α
    torch.testing.assert_close(smoothed_ce(logits, labels, mask, E, 1e-3, alpha=0.7), ce, **F32)
    # identical embedding rows: r uniform, KL(u || p) = -log V - mean_w log p_w
    Eu = torch.ones(6, 4)
    logp = torch.log_softmax(logits[mask].double(), -1)
    kl_u = (-math.log(6) - logp.mean(-1)).mean()
    want = 0.6 * ce.double() + 0.4 * kl_u
    torch.testing.assert_close(smoothed_ce(logits, labels, mask, Eu, 0.3, alpha=0.4).double(), want, **F32)


def test_smoothed_ce_embeddings_detached_and_mask_invariance():
    logits, labels, mask = _case(B=3, T=5, V=6, seed=10, dtype=torch.float32, n_labels=6)
    E = _emb().requires_grad_(True)
    loss = smoothed_ce(logits, labels, mask, E, 0.5, 0.5)
    g_logits, g_E = torch.autograd.grad(loss, (logits, E), allow_unused=True)
    assert g_E is None
    pl, pb = _poison(logits, labels, mask)
    b = smoothed_ce(pl, pb, mask, E, 0.5, 0.5)
    torch.testing.assert_close(loss, b, rtol=0, atol=0)
    gb = _grad(b, pl)
    assert torch.isfinite(gb).all() and gb[~mask].abs().max() == 0
    torch.testing.assert_close(g_logits, gb, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------- UL
@pytest.mark.parametrize("alpha", [1.0, 0.25])
def test_ul_matches_reference(alpha):
    logits, labels, mask = _case(B=3, T=8, V=5, seed=11)
    out = unlikelihood_loss(logits, labels, mask, alpha)
    ref = ref_ul(logits, labels, mask, alpha)
    assert ref.item() > 0
    torch.testing.assert_close(out, ref, **F64)
    torch.testing.assert_close(_grad(out, logits), _grad(ref, logits), **F64)


@settings(max_examples=15, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 3), st.integers(2, 9), st.integers(2, 5))
def test_ul_and_ct_property(seed, B, T, n_labels):
    g = _gen(seed)
    logits = torch.randn(B, T, 5, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, n_labels, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[0, 0] = True
    torch.testing.assert_close(unlikelihood_loss(logits, labels, mask), ref_ul(logits, labels, mask), **F64)
    torch.testing.assert_close(
        contrastive_token_loss(logits, labels, mask, 2, None), ref_ct(logits, labels, mask, 2, None), **F64
    )


def test_ul_closed_forms_and_mask_invariance():
    # T = 2, labels (a, b): only position 1 has a candidate (a): -log(1 - p_1(a)) / 2
    z = torch.randn(1, 2, 4, dtype=torch.float64, generator=_gen(12))
    p1a = torch.softmax(z[0, 1], 0)[2]
    assert unlikelihood_loss(z, torch.tensor([[2, 0]]), torch.ones(1, 2)).item() == pytest.approx(
        -math.log(1 - p1a.item()) / 2, rel=1e-12
    )
    # every label equal: no candidate anywhere
    lg = torch.randn(2, 6, 5, requires_grad=True)
    loss = unlikelihood_loss(lg, torch.full((2, 6), 3), torch.ones(2, 6))
    assert loss.item() == 0.0 and _grad(loss, lg).abs().max() == 0
    # no mass on the previous tokens: 0
    z = torch.zeros(1, 4, 6)
    z[..., :4] = -1e4
    assert unlikelihood_loss(z, torch.tensor([[0, 1, 2, 3]]), torch.ones(1, 4)).item() < 1e-12
    # masked labels are no context, NaN logits there change nothing
    logits, labels, mask = _case(B=3, T=8, V=5, seed=13)
    pl, pb = _poison(logits, labels, mask)
    pb[~mask] = 1  # a real token id where masked: still not a candidate
    a, b = unlikelihood_loss(logits, labels, mask), unlikelihood_loss(pl, pb, mask)
    torch.testing.assert_close(a, b, **F64)
    gb = _grad(b, pl)
    assert torch.isfinite(gb).all() and gb[~mask].abs().max() == 0
    torch.testing.assert_close(_grad(a, logits), gb, **F64)


# --------------------------------------------------------------------------------------------------- RTD
V_RTD, MASK_ID = 40, 3


def _tiny_pair(num_labels=1, seed=0, share_width=False):
    torch.manual_seed(seed)  # model init only (tests may touch the global RNG; the library may not)
    drop = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    gw = 32 if share_width else 16
    gen = BertForMaskedLM(
        BertConfig(
            vocab_size=V_RTD,
            hidden_size=gw,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            **drop,
        )
    )
    disc = BertForTokenClassification(
        BertConfig(
            vocab_size=V_RTD,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            num_labels=num_labels,
            **drop,
        )
    )
    return gen, disc


def _rtd_batch():
    ids = torch.randint(4, V_RTD, (3, 20), generator=_gen(14))
    att = torch.ones(3, 20, dtype=torch.long)
    att[1, 17:] = 0  # 0.15 * 17 = 2.55 rounds to 3 (half up), floors to 2
    att[2, 7:] = 0
    ids[att == 0] = 0
    return ids, att


def test_rtd_formula_masking_and_targets():
    gen, disc = _tiny_pair()
    ids, att = _rtd_batch()
    out = replaced_token_detection_loss(gen, disc, ids, att, generator_mask_token_id=MASK_ID, seed=0)
    n = att.sum(1)
    assert out.masked.sum(1).tolist() == [max(1, math.floor(0.15 * k + 0.5)) for k in n.tolist()] == [3, 3, 1]
    assert not (out.masked & (att == 0)).any()
    assert torch.equal(out.replaced, out.corrupted_ids != ids) and not (out.replaced & ~out.masked).any()
    assert torch.equal(out.corrupted_ids[~out.masked], ids[~out.masked])
    # independent recomputation of both terms
    gl = gen(input_ids=ids.masked_fill(out.masked, MASK_ID), attention_mask=att).logits
    mlm = F.cross_entropy(gl[out.masked], ids[out.masked])
    dl = disc(input_ids=out.corrupted_ids, attention_mask=att).logits[..., 0]
    bce = F.binary_cross_entropy_with_logits(dl[att.bool()], out.replaced[att.bool()].float())
    torch.testing.assert_close(out.mlm_loss, mlm, **F32)
    torch.testing.assert_close(out.disc_loss, bce, **F32)
    torch.testing.assert_close(out.loss, mlm + 50 * bce, **F32)
    # padding never counts: other ids under attention_mask = 0 give the same masks and losses
    ids2 = ids.masked_fill(att == 0, 17)
    out2 = replaced_token_detection_loss(gen, disc, ids2, att, generator_mask_token_id=MASK_ID, seed=0)
    assert torch.equal(out2.masked, out.masked) and torch.equal(out2.replaced, out.replaced)
    torch.testing.assert_close(out2.loss, out.loss, **F32)


class _PeakedGenerator(torch.nn.Module):
    """A "masked LM" that always puts almost all mass on token ``c``: where the original token is c, the
    sample equals it and the discriminator target must be 0 (original), although the position was masked."""

    def __init__(self, c: int):
        super().__init__()
        self.bias = torch.nn.Parameter(torch.full((V_RTD,), -20.0))
        with torch.no_grad():
            self.bias[c] = 20.0

    def forward(self, input_ids, attention_mask=None):
        return type("Out", (), {"logits": self.bias.expand(*input_ids.shape, V_RTD)})()


def test_rtd_sampled_original_counts_as_original():
    _, disc = _tiny_pair()
    ids = torch.full((2, 12), 7)
    ids[:, ::2] = 9  # half the tokens are the generator's favourite (9)
    out = replaced_token_detection_loss(
        _PeakedGenerator(9), disc, ids, mask_prob=0.5, generator_mask_token_id=MASK_ID, seed=0
    )
    assert torch.equal(out.corrupted_ids, ids.masked_fill(out.masked, 9))
    hit = out.masked & (ids == 9)
    assert hit.any() and (out.masked & (ids == 7)).any()
    assert not out.replaced[hit].any() and out.replaced[out.masked & (ids == 7)].all()
    assert out.mlm_loss.item() == pytest.approx(
        F.cross_entropy(_PeakedGenerator(9).bias.expand(int(out.masked.sum()), V_RTD), ids[out.masked]).item()
    )


def test_rtd_gradients_reach_both_nets_but_not_through_sampling():
    gen, disc = _tiny_pair()
    ids, att = _rtd_batch()
    out = replaced_token_detection_loss(gen, disc, ids, att, generator_mask_token_id=MASK_ID, seed=1)
    gp, dp = list(gen.parameters()), list(disc.parameters())
    grads = torch.autograd.grad(out.loss, gp + dp, allow_unused=True, retain_graph=True)
    g_gen, g_disc = grads[: len(gp)], grads[len(gp) :]
    assert sum(float(g.abs().sum()) for g in g_gen if g is not None) > 0
    assert sum(float(g.abs().sum()) for g in g_disc if g is not None) > 0
    # the discriminator term never reaches the generator (sampling is discrete, no shared weights)
    g_mlm = torch.autograd.grad(out.mlm_loss, gp, allow_unused=True)
    for a, b in zip(g_gen, g_mlm, strict=True):
        if a is None or b is None:
            assert a is None or a.abs().max() == 0
            continue
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_rtd_shared_embeddings_get_both_gradients():
    gen, disc = _tiny_pair(share_width=True)
    emb = share_embeddings(gen, disc)
    assert gen.get_input_embeddings() is disc.get_input_embeddings()
    assert gen.get_output_embeddings().weight is emb.weight
    ids, att = _rtd_batch()
    out = replaced_token_detection_loss(gen, disc, ids, att, generator_mask_token_id=MASK_ID, seed=2)
    (g_all,) = torch.autograd.grad(out.loss, emb.weight, retain_graph=True)
    (g_mlm,) = torch.autograd.grad(out.mlm_loss, emb.weight, retain_graph=True)
    (g_disc,) = torch.autograd.grad(out.disc_loss, emb.weight)
    assert g_disc.abs().sum() > 0
    torch.testing.assert_close(g_all, g_mlm + 50 * g_disc, **F32)
    with pytest.raises(ValueError, match="cannot share"):
        share_embeddings(*_tiny_pair())


def test_rtd_deterministic_with_seed_and_no_global_rng():
    gen, disc = _tiny_pair()
    ids, att = _rtd_batch()
    state = torch.get_rng_state()
    a = replaced_token_detection_loss(gen, disc, ids, att, generator_mask_token_id=MASK_ID, seed=5)
    b = replaced_token_detection_loss(gen, disc, ids, att, generator_mask_token_id=MASK_ID, seed=5)
    c = replaced_token_detection_loss(gen, disc, ids, att, generator_mask_token_id=MASK_ID, seed=6)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a.masked, b.masked) and torch.equal(a.corrupted_ids, b.corrupted_ids)
    assert a.loss.item() == b.loss.item()
    assert not torch.equal(a.corrupted_ids, c.corrupted_ids)


def test_rtd_two_class_discriminator_is_softmax_ce():
    gen, disc = _tiny_pair(num_labels=2)
    ids, att = _rtd_batch()
    out = replaced_token_detection_loss(
        gen, disc, ids, att, generator_mask_token_id=MASK_ID, seed=3, lambda_disc=1.0
    )
    dl = disc(input_ids=out.corrupted_ids, attention_mask=att).logits
    ce = F.cross_entropy(dl[att.bool()], out.replaced[att.bool()].long())
    torch.testing.assert_close(out.disc_loss, ce, **F32)


def test_rtd_class_advances_its_generator():
    ids, att = _rtd_batch()
    batch = TokenBatch(logits=None, labels=ids, mask=att.bool(), input_ids=ids, extra={"attention_mask": att})
    runs = []
    for _ in range(2):
        gen, disc = _tiny_pair()
        loss = get_token_loss("rtd", generator=gen, discriminator=disc, mask_token_id=MASK_ID, seed=9)
        assert isinstance(loss, ReplacedTokenDetectionLoss) and loss.includes_ce
        first = loss(batch)
        m1 = loss.last.masked
        second = loss(batch)
        runs.append((first.item(), m1, second.item(), loss.last.masked))
    assert not torch.equal(runs[0][1], runs[0][3])  # fresh masks each step
    assert runs[0][0] == runs[1][0] and runs[0][2] == runs[1][2]  # reproducible run
    with pytest.raises(ValueError, match="attention_mask"):
        get_token_loss("rtd", generator=gen, discriminator=disc, mask_token_id=MASK_ID)(
            TokenBatch(logits=None, labels=ids, mask=att.bool(), input_ids=ids)
        )


# --------------------------------------------------------------------------------------------------- classes, errors
def test_registry_classes_wrap_the_functions():
    assert {"simctg", "contrastive_token", "number_token", "rtd", "smoothed_ce", "unlikelihood"} <= set(
        token_loss_names()
    )
    logits, labels, mask = _case(B=3, T=6, V=8, seed=15, n_labels=8)
    h = _hidden(T=6)
    E = _emb(V=8)
    batch = TokenBatch(
        logits=logits, labels=labels, mask=mask, hidden=h, extra={"embeddings": E, "num_values": NUMS}
    )
    cases = [
        ("simctg", SimCTGLoss, {"margin": 0.7}, simctg_loss(h, mask, 0.7), False),
        (
            "contrastive_token",
            ContrastiveTokenLoss,
            {"ct_length": None},
            contrastive_token_loss(logits, labels, mask, 0.5, None),
            False,
        ),
        (
            "number_token",
            NumberTokenLoss,
            {"variant": "was"},
            number_token_loss(logits, labels, mask, NUMS, "was"),
            False,
        ),
        (
            "smoothed_ce",
            SmoothedCELoss,
            {"tau": 0.4, "alpha": 0.2},
            smoothed_ce(logits, labels, mask, E, 0.4, 0.2),
            True,
        ),
        (
            "unlikelihood",
            UnlikelihoodLoss,
            {"alpha": 0.5},
            unlikelihood_loss(logits, labels, mask, 0.5),
            False,
        ),
    ]
    for name, cls, kw, want, includes_ce in cases:
        obj = get_token_loss(name, **kw)
        assert type(obj) is cls and obj.includes_ce is includes_ce
        assert obj(batch).item() == want.item()
    with pytest.raises(ValueError, match="hidden"):
        get_token_loss("simctg")(TokenBatch(logits=logits, labels=labels, mask=mask))
    with pytest.raises(ValueError, match="num_values"):
        get_token_loss("number_token")(TokenBatch(logits=logits, labels=labels, mask=mask))


def _fns():
    E = _emb(V=6)
    return {
        "ct": lambda lg, lb, m: contrastive_token_loss(lg, lb, m),
        "ntl": lambda lg, lb, m: number_token_loss(lg, lb, m, ([0, 1], [0.0, 1.0])),
        "smoothed": lambda lg, lb, m: smoothed_ce(lg, lb, m, E),
        "ul": lambda lg, lb, m: unlikelihood_loss(lg, lb, m),
    }


@pytest.mark.parametrize("fn", list(_fns()))
def test_bad_input(fn):
    f = _fns()[fn]
    logits, labels, mask = _case(B=2, T=4, V=6, seed=16)
    with pytest.raises(ValueError, match="disagree"):
        f(logits, labels[:, :3], mask)
    with pytest.raises(ValueError, match="mask has shape"):
        f(logits, labels, mask[:, :3])
    with pytest.raises(ValueError, match="no kept tokens"):
        f(logits, labels, torch.zeros_like(mask))
    bad = logits.detach().clone()
    bad[0, 0, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        f(bad, labels, torch.ones_like(mask))
    with pytest.raises(ValueError, match=r"\[0, 6\)"):
        f(logits, torch.full_like(labels, -100), mask)
    with pytest.raises(ValueError, match=r"\[B, T, V\]"):
        f(logits[0], labels, mask)
    with pytest.raises(TypeError, match="integer"):
        f(logits, labels.float(), mask)


def test_bad_parameters():
    logits, labels, mask = _case(B=2, T=4, V=6, seed=17)
    with pytest.raises(ValueError, match="2 or more kept tokens"):
        simctg_loss(torch.randn(2, 4, 3), torch.eye(4, dtype=torch.bool)[:2])
    with pytest.raises(ValueError, match="NaN"):
        simctg_loss(torch.full((1, 3, 2), float("nan")), torch.ones(1, 3))
    with pytest.raises(ValueError, match="fraction"):
        contrastive_token_loss(logits, labels, mask, ct_length=1.5)
    with pytest.raises(ValueError, match="variant"):
        number_token_loss(logits, labels, mask, NUMS, variant="l1")
    with pytest.raises(ValueError, match="distinct token ids"):
        number_token_loss(logits, labels, mask, ([0, 9], [1.0, 2.0]))
    with pytest.raises(ValueError, match="rows"):
        smoothed_ce(logits, labels, mask, torch.randn(5, 3))
    with pytest.raises(ValueError, match="tau"):
        smoothed_ce(logits, labels, mask, torch.randn(6, 3), tau=0.0)
    with pytest.raises(ValueError, match="alpha"):
        unlikelihood_loss(logits, labels, mask, alpha=float("nan"))
    gen, disc = _tiny_pair()
    ids, att = _rtd_batch()
    with pytest.raises(ValueError, match="no maskable token"):
        replaced_token_detection_loss(gen, disc, ids, torch.zeros_like(att), generator_mask_token_id=MASK_ID)
    with pytest.raises(TypeError, match="mask_token_id"):
        replaced_token_detection_loss(gen, disc, ids, att, generator_mask_token_id=None)
