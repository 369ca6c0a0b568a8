"""I-GCG, HotFlip/AutoPrompt (+ the masked-LM objective), PEZ and probe sampling.

Pinned: each method lowers the loss on a toy problem; an identical seed gives an identical history; I-GCG's
merges are the cumulative swaps of the best candidates (independent list implementation); HotFlip's current
loss never increases and its candidates are the top of −G_i; the masked-LM loss equals a direct log-softmax
at the mask and its gradients equal autograd through the HF model; PEZ's first step is AdamW's closed form,
its ids are allowed, its history losses are exact evaluations of those ids and a resumed run equals an
uninterrupted one; probe sampling's Spearman ρ equals the closed form / scipy, α = 1 for draft = target and
the target scores exactly |P| + max(1, ⌊(1−α)B/r⌋) candidates; bad inputs raise.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from tests.tolerance import EPS32, assert_fp32_close, fp32_atol
from tokensmith.models import Slot
from tokensmith.optimization.search import Constraints, Problem, SearchResult, TargetLoss, search
from tokensmith.optimization.search.hotflip import HotFlip, MaskedTargetLoss
from tokensmith.optimization.search.igcg import IGCG, merge_candidates
from tokensmith.optimization.search.pez import PEZ
from tokensmith.optimization.search.probe import ProbeSampling, rankdata, spearman

pytestmark = pytest.mark.usefixtures("torch_one_thread")

PROMPT = "Write a poem about the sea"
TARGET = " Sure, here is"
SUFFIX = " x y z w v"


def _enc(ad, suffix=SUFFIX):
    return ad.encode([PROMPT, Slot("suffix", suffix)], target=TARGET)


def _masked_enc(ad, trigger="a b c d"):
    # the space before the slot belongs to the template: WordPiece decodes a slot without its leading space
    return ad.encode(["the movie was ", Slot("trigger", trigger), " " + ad.tokenizer.mask_token + " ."],
                     allow_special=True)


def _losses(res):
    return [h["loss"] for h in res.history]


# ---------------------------------------------------------------- I-GCG
def _merge_reference(current, cands, losses, K, conflict):
    """Plain-list reimplementation of the cumulative merge (the docstring's recursion)."""
    order = sorted((lo, j) for j, lo in enumerate(losses) if math.isfinite(lo))[:K]
    cur = list(current)
    merged = list(cands[order[0][1]])
    changed = {p for p in range(len(cur)) if merged[p] != cur[p]}
    out = []
    for k, (_, j) in enumerate(order[1:], start=2):
        prev = list(merged)
        for p in range(len(cur)):
            if cands[j][p] != cur[p] and (conflict == "override" or p not in changed):
                merged[p] = cands[j][p]
                changed.add(p)
        if merged != prev:
            out.append((k, list(merged)))
    return out


@pytest.mark.parametrize("conflict", ["skip", "override"])
def test_igcg_merge_is_cumulative(conflict):
    g = torch.Generator().manual_seed(3)
    n, B = 6, 20
    current = torch.randint(0, 50, (n,), generator=g)
    pos = torch.randint(0, n, (B,), generator=g)  # single swaps, several at the same position
    cands = current[None].repeat(B, 1)
    cands[torch.arange(B), pos] = torch.randint(50, 100, (B,), generator=g)
    losses = torch.rand(B, generator=g)
    losses[4] = float("inf")  # not scored (probe sampling): never merged
    merged, ks = merge_candidates(current, cands, losses, max_merge=7, conflict=conflict)
    ref = _merge_reference(current.tolist(), cands.tolist(), losses.tolist(), 7, conflict)
    assert ks == [k for k, _ in ref]
    assert merged.tolist() == [m for _, m in ref]
    assert len(ref) >= 2  # the example has merges to compare
    # structure: m_k changes exactly the positions of the first k candidates (skip: the best token wins)
    order = torch.argsort(losses)[:7].tolist()
    for k, row in zip(ks, merged.tolist(), strict=True):
        first_k = order[:k]
        changed = {int(pos[j]) for j in first_k}
        assert {p for p in range(n) if row[p] != int(current[p])} == changed
        for p in changed:
            owners = [j for j in first_k if int(pos[j]) == p]
            owner = owners[0] if conflict == "skip" else owners[-1]
            assert row[p] == int(cands[owner, p])


def test_igcg_lowers_loss_and_refines_in_loop(llama):
    enc = _enc(llama)
    seen = []

    class Spy(IGCG):
        def refine(self, state, candidates, evaluation):
            out = super().refine(state, candidates, evaluation)
            seen.append((state.current.clone(), candidates.clone(), evaluation.loss.clone(), out))
            return out

    res = search(llama, enc, Spy(search_width=24, topk=12, max_merge=5), steps=6, progress=False)
    assert res.best_loss < res.init_loss - 0.2
    assert seen and all(o is not None for *_, o in seen)
    cur, cands, losses, out = seen[0]
    assert ((cands != cur[None]).sum(1) == 1).all()  # first round: single swaps
    ref = _merge_reference(cur.tolist(), cands.tolist(), losses.tolist(), 5, "skip")
    assert out.tolist() == [m for _, m in ref]
    assert ((out != cur[None]).sum(1) >= 2).all()  # merges change several coordinates


def test_igcg_bad_options(llama):
    enc = _enc(llama)
    few = Constraints(mask=torch.arange(llama.E.shape[0]) < 300)
    with pytest.raises(ValueError, match="lower topk"):
        search(llama, enc, "igcg", steps=1, topk=1000, constraints=few, progress=False)
    with pytest.raises(ValueError, match="max_merge"):
        search(llama, enc, "igcg", steps=1, max_merge=1, progress=False)
    with pytest.raises(ValueError, match="conflict"):
        merge_candidates(torch.zeros(2, dtype=torch.long), torch.ones(3, 2, dtype=torch.long), torch.rand(3),
                         conflict="first")


# ---------------------------------------------------------------- HotFlip
def test_hotflip_strict_acceptance_and_lowers_loss(llama):
    enc = _enc(llama)
    trace = []

    def cb(state, rec):
        trace.append((state.current.clone(), state.current_loss, rec["loss"]))

    res = search(llama, enc, "hotflip", steps=12, num_cand=12, seed=1, callbacks=[cb], progress=False)
    assert res.best_loss < res.init_loss - 0.2
    prev_ids, prev_loss = enc.input_ids[enc.spans["suffix"].slice], res.init_loss
    rejected = 0
    for ids, cur_loss, tried in trace:
        assert cur_loss <= prev_loss  # the current loss never increases
        if tried >= prev_loss:  # the step's best candidate did not improve: stay
            rejected += 1
            assert cur_loss == prev_loss
            assert torch.equal(ids, prev_ids)
        else:
            assert cur_loss == tried
        prev_ids, prev_loss = ids, cur_loss
    assert rejected >= 1  # the run exercised a rejection
    assert res.best_loss == trace[-1][1]
    # without strict acceptance the loop moves to worse candidates on this run
    loose = []
    search(llama, enc, "hotflip", steps=12, num_cand=12, seed=1, strict=False, progress=False,
           callbacks=[lambda s, r: loose.append(s.current_loss)])
    assert any(b > a for a, b in zip(loose, loose[1:], strict=False))


def test_hotflip_candidates_are_top_of_negative_gradient(llama):
    enc = _enc(llama)
    obj = TargetLoss(llama, enc)
    got = []

    class Rec(HotFlip):
        def propose(self, state):
            c = super().propose(state)
            got.append((state.step, state.current.clone(), c))
            return c

    res = search(llama, Problem(objective=obj), Rec(num_cand=7, position="cycle"), steps=3, progress=False,
                 constraints=Constraints(retokenize=False))
    assert len(res.history) == 3 and [s for s, *_ in got] == [0, 1, 2]
    allowed = Constraints().allowed(llama)
    for step, cur, c in got:
        i = step % obj.n
        assert ((c != cur[None]).sum(1) == 1).all() and (c[:, i] != cur[i]).all()
        g = obj.grad(cur)[i].clone()
        g[~allowed] = float("inf")
        g[cur[i]] = float("inf")
        want = set((-g).topk(7).indices.tolist())
        assert set(c[:, i].tolist()) == want


def test_hotflip_deterministic_and_bad_input(llama):
    enc = _enc(llama)
    a = search(llama, enc, "hotflip", steps=4, num_cand=8, seed=5, progress=False)
    b = search(llama, enc, "hotflip", steps=4, num_cand=8, seed=5, progress=False)
    assert _losses(a) == _losses(b) and a.best_ids == b.best_ids
    few = Constraints(mask=torch.arange(llama.E.shape[0]) < 20)
    with pytest.raises(ValueError, match="lower num_cand"):
        search(llama, enc, "hotflip", steps=1, num_cand=100, constraints=few, progress=False)
    with pytest.raises(ValueError, match="position"):
        search(llama, enc, "hotflip", steps=1, position="left", progress=False)


# ---------------------------------------------------------------- masked LM (AutoPrompt)
def test_masked_target_loss_matches_direct_computation(bert):
    enc = _masked_enc(bert)
    obj = MaskedTargetLoss(bert, enc, "great")
    lab = bert.tokenizer.convert_tokens_to_ids("great")
    mask_pos = int((enc.input_ids == bert.tokenizer.mask_token_id).nonzero())
    assert obj.mask_positions.tolist() == [mask_pos]
    g = torch.Generator().manual_seed(0)
    cands = torch.randint(1000, 20000, (5, obj.n), generator=g)
    ev = obj.evaluate(cands)
    ids = enc.input_ids[None].repeat(5, 1)
    ids[:, obj.template.start : obj.template.end] = cands
    with torch.no_grad():
        z = bert.model(input_ids=ids).logits[:, mask_pos].double()
    want = -torch.log_softmax(z, -1)[:, lab]
    V = int(bert.E.shape[0])
    assert_fp32_close(ev.loss.double(), want, width=64, scale=float(z.abs().max()), vocab=V)
    assert torch.equal(ev.success, z.argmax(-1) == lab)
    # rescore through the string equals the id loss for ids that round-trip
    ids0 = obj.init_ids
    atol = fp32_atol(float(z.abs().max()), 64) + 4 * EPS32 * math.sqrt(V)
    assert abs(obj.rescore(obj.decode(ids0)) - float(obj.evaluate(ids0[None]).loss[0])) <= atol


def test_masked_target_gradients_match_autograd(bert):
    enc = _masked_enc(bert)
    obj = MaskedTargetLoss(bert, enc, "good")
    t = obj.template
    ids = enc.input_ids.clone()
    E = bert.model.get_input_embeddings().weight
    rows = E[ids[t.start : t.end]].detach().clone().requires_grad_(True)
    with torch.no_grad():
        base = E[ids].detach().clone()
    e = torch.cat([base[: t.start], rows, base[t.end :]])[None]
    z = bert.model(inputs_embeds=e).logits[0, obj.mask_positions]
    lab = bert.tokenizer.convert_tokens_to_ids("good")
    loss = -torch.log_softmax(z.float(), -1)[:, lab].mean()
    (want,) = torch.autograd.grad(loss, rows)
    got = obj.embed_grad(obj.init_ids)
    V = int(bert.E.shape[0])
    assert_fp32_close(got, want, width=V, depth=2)
    oh = obj.grad(obj.init_ids)  # ∂L/∂onehot = ∇_e L · Eᵀ (embedding scale 1)
    assert oh.shape == (t.n, V)
    atol = fp32_atol(float(want.abs().max()), V, depth=2) * float(E.detach().abs().sum(1).max())
    assert_close(oh, want @ E.detach().T, atol=atol, rtol=0)


def test_autoprompt_on_masked_lm_lowers_loss(bert):
    obj = MaskedTargetLoss(bert, _masked_enc(bert), "great")
    allowed = Constraints().allowed(bert).nonzero().flatten()
    rand = allowed[torch.randint(0, len(allowed), (256, obj.n), generator=torch.Generator().manual_seed(0))]
    rand_loss = obj.evaluate(rand).loss  # the tiny random BERT's mask distribution barely depends on the trigger
    res = search(bert, Problem(objective=obj), "hotflip", steps=4, num_cand=32, position="cycle", progress=False)
    assert res.best_loss < float(rand_loss.min())  # beats the best of 256 random triggers
    assert res.best_loss < res.init_loss - 4 * float(rand_loss.std())  # fp32 noise is ~1e-5, std ~6e-4
    assert abs(float(obj.evaluate(torch.tensor(res.best_ids)[None]).loss[0]) - res.best_loss) < 1e-5


def test_masked_target_bad_input(bert, llama):
    tok = bert.tokenizer
    no_mask = bert.encode(["the movie was", Slot("trigger", " a b"), "."])
    with pytest.raises(ValueError, match="no mask token"):
        MaskedTargetLoss(bert, no_mask, "great")
    as_text = bert.encode(["the movie was", Slot("trigger", " a b"), tok.mask_token])  # not parsed as special
    with pytest.raises(ValueError, match="allow_special=True"):
        MaskedTargetLoss(bert, as_text, "great")
    with pytest.raises(ValueError, match="single-token label"):
        MaskedTargetLoss(bert, _masked_enc(bert), "unbelievably")
    with pytest.raises(ValueError, match="one per mask"):
        MaskedTargetLoss(bert, _masked_enc(bert), ["good", "bad"])
    with pytest.raises(ValueError, match="without target"):
        MaskedTargetLoss(bert, bert.encode(["x", Slot("t", " a"), tok.mask_token], target=" y", allow_special=True),
                         "good")
    with pytest.raises(ValueError, match="TargetLoss"):
        MaskedTargetLoss(llama, _enc(llama), "ok")


# ---------------------------------------------------------------- PEZ
def test_pez_lowers_loss_exact_history_and_allowed_ids(llama):
    enc = _enc(llama)
    obj = TargetLoss(llama, enc)
    cons = Constraints(ascii_only=True)
    allowed = cons.allowed(llama)
    trace = []
    res = search(llama, Problem(objective=obj, constraints=cons), "pez", steps=10, lr=0.1, progress=False,
                 callbacks=[lambda s, r: trace.append((s.current.clone(), r["loss"], r["n_candidates"]))])
    assert res.best_loss < res.init_loss - 0.2
    assert allowed[torch.tensor(res.best_ids)].all()
    scored = [(ids, lo) for ids, lo, nc in trace if nc == 1]
    assert len(scored) >= 5
    for ids, lo in scored:
        assert allowed[ids].all()
        assert float(obj.evaluate(ids[None]).loss[0]) == pytest.approx(lo, abs=1e-5)
    assert res.best_loss == min(lo for _, lo in scored)
    assert float(obj.evaluate(torch.tensor(res.best_ids)[None]).loss[0]) == pytest.approx(res.best_loss, abs=1e-5)


def test_pez_first_step_is_adamw_closed_form(llama):
    enc = _enc(llama)
    obj = TargetLoss(llama, enc)
    pez = PEZ(lr=0.05, weight_decay=0.1)
    search(llama, Problem(objective=obj), pez, steps=1, progress=False)
    E = llama.E.detach().double()
    P0 = E[obj.init_ids]
    g = obj.embed_grad(obj.init_ids).double()  # Proj_E(P0) = the initial ids
    # AdamW step 1: decoupled decay, then m̂ = g, v̂ = g² → update lr·g/(|g| + eps)
    want = P0 * (1 - 0.05 * 0.1) - 0.05 * g / (g.abs() + 1e-8)
    assert torch.allclose(pez.P.detach().double(), want, atol=1e-6)


def test_pez_resume_continues_exactly(llama, tmp_path):
    enc = _enc(llama)
    full = search(llama, enc, "pez", steps=6, seed=2, init="random", progress=False)
    half = search(llama, enc, "pez", steps=3, seed=2, init="random", progress=False, save_path=tmp_path / "r.json")
    back = search(llama, enc, "pez", steps=6, seed=2, init="random", progress=False,
                  resume=SearchResult.load(tmp_path / "r.json"))
    assert _losses(full)[:3] == _losses(half)
    l1, l2 = _losses(full), _losses(back)
    assert len(l2) == 6
    assert all((a == b) or (math.isnan(a) and math.isnan(b)) for a, b in zip(l1, l2, strict=True))
    assert full.best_ids == back.best_ids
    assert full.state["proposer"] == back.state["proposer"]
    # an identical seed gives an identical run
    again = search(llama, enc, "pez", steps=6, seed=2, init="random", progress=False)
    assert again.state["proposer"] == full.state["proposer"]


def test_pez_bad_options(llama):
    with pytest.raises(ValueError, match="init"):
        search(llama, _enc(llama), "pez", steps=1, init="zeros", progress=False)


# ---------------------------------------------------------------- probe sampling
def test_spearman_closed_form_and_ties():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(17, generator=g), torch.randn(17, generator=g)
    d = rankdata(x) - rankdata(y)
    N = 17
    closed = 1 - 6 * float((d * d).sum()) / (N * (N * N - 1))
    assert spearman(x, y) == pytest.approx(closed, abs=1e-12)
    assert rankdata(torch.tensor([3.0, 1.0, 3.0, 2.0, 3.0])).tolist() == [4.0, 1.0, 4.0, 2.0, 4.0]
    # ties by hand: x ranks [1.5, 1.5, 3, 4], y ranks [1, 2, 3, 4]
    rx = torch.tensor([1.5, 1.5, 3, 4], dtype=torch.float64) - 2.5
    ry = torch.tensor([1.0, 2, 3, 4], dtype=torch.float64) - 2.5
    hand = float((rx * ry).sum() / torch.sqrt((rx * rx).sum() * (ry * ry).sum()))
    assert spearman(torch.tensor([5.0, 5.0, 6.0, 7.0]), torch.tensor([1.0, 2.0, 3.0, 4.0])) == pytest.approx(hand)
    assert math.isnan(spearman(torch.ones(4), torch.arange(4.0)))
    stats = pytest.importorskip("scipy.stats")
    xt = torch.tensor([1.0, 2, 2, 3, 5, 5, 5, 0])
    yt = torch.tensor([2.0, 1, 4, 4, 3, 0, 7, 7])
    assert spearman(xt, yt) == pytest.approx(float(stats.spearmanr(xt.numpy(), yt.numpy())[0]), abs=1e-12)


def test_probe_sampling_counts_and_alpha(llama, shared_tiny):
    small = shared_tiny("gpt2")
    enc = _enc(llama)
    target = TargetLoss(llama, enc, prefix_cache=False)  # forwards = rows scored, exactly
    draft = TargetLoss(small, small.encode(**enc.recipe), prefix_cache=False)
    ps = ProbeSampling(target, draft, r=4, sampling_factor=8, seed=1)
    B = 48
    g = torch.Generator().manual_seed(0)
    cands = torch.randint(1000, 40000, (B, ps.n), generator=g)
    before_t, before_d = target.counters()["forwards"], draft.counters()["forwards"]
    ev = ps.evaluate(cands)
    alpha = ps.alphas[-1]
    k = max(1, math.floor((1 - alpha) * B / 4))
    assert target.counters()["forwards"] - before_t == B // 8 + k
    assert draft.counters()["forwards"] - before_d == B
    assert int(torch.isfinite(ev.loss).sum()) == B // 8 + k
    # the scored losses are the target's; the filtered ones are the draft-best outside the probe set
    fin = torch.isfinite(ev.loss)
    assert torch.allclose(ev.loss[fin], target.evaluate(cands[fin]).loss, atol=1e-5)
    assert not ev.success[~fin].any()
    d = draft.evaluate(cands).loss
    probe = ps.last_scored[: B // 8]
    rest = torch.ones(B, dtype=torch.bool)
    rest[probe] = False
    idx = rest.nonzero().flatten()
    assert set(ps.last_scored[B // 8 :].tolist()) == set(idx[d[idx].argsort()[:k]].tolist())
    assert alpha == pytest.approx((1 + spearman(target.evaluate(cands[probe]).loss, d[probe])) / 2)
    # a batch too small for a probe set of two is scored by the target alone (no α)
    n_alpha, n0 = len(ps.alphas), target.counters()["forwards"]
    ev = ps.evaluate(cands[:15])
    assert torch.isfinite(ev.loss).all() and len(ps.alphas) == n_alpha
    assert target.counters()["forwards"] - n0 == 15


def test_probe_sampling_alpha_one_when_draft_is_target(llama):
    enc = _enc(llama)
    target = TargetLoss(llama, enc, prefix_cache=False)
    ps = ProbeSampling(target, target, r=8, sampling_factor=4, seed=0)
    cands = torch.randint(1000, 40000, (40, ps.n), generator=torch.Generator().manual_seed(1))
    n0 = target.counters()["forwards"]
    ps.evaluate(cands)
    assert ps.alphas[-1] == pytest.approx(1.0, abs=1e-12)
    assert target.counters()["forwards"] - n0 == 40 + 10 + 1  # draft (= target) all, probe 10, filtered max(1, 0)


def test_probe_sampling_search_lowers_loss_and_is_deterministic(llama, shared_tiny):
    small = shared_tiny("gpt2")
    enc = _enc(llama)

    def run():
        ps = ProbeSampling(TargetLoss(llama, enc), TargetLoss(small, small.encode(**enc.recipe)), r=2,
                           sampling_factor=8, seed=0)
        return search(llama, Problem(objective=ps), "gcg", steps=6, search_width=32, topk=16, progress=False), ps

    (a, pa), (b, pb) = run(), run()
    assert a.best_loss < a.init_loss - 0.2
    assert all(math.isfinite(x) for x in _losses(a))
    assert _losses(a) == _losses(b) and pa.alphas == pb.alphas and len(pa.alphas) == 6


def test_probe_sampling_bad_input(llama, bert):
    enc = _enc(llama)
    t = TargetLoss(llama, enc)
    with pytest.raises(ValueError, match="tokenizer"):
        ProbeSampling(t, MaskedTargetLoss(bert, _masked_enc(bert, "a b c d e"), "good"))
    with pytest.raises(ValueError, match="tokens"):
        ProbeSampling(t, TargetLoss(llama, _enc(llama, " x y")))
    with pytest.raises(ValueError, match="r and sampling_factor"):
        ProbeSampling(t, t, r=0)


@pytest.mark.parametrize("method,opts", [("igcg", dict(search_width=16, topk=8, max_merge=4)),
                                         ("pez", dict(init="random"))])
def test_identical_seed_identical_history(llama, method, opts):
    enc = _enc(llama)
    a = search(llama, enc, method, steps=4, seed=7, progress=False, **opts)
    b = search(llama, enc, method, steps=4, seed=7, progress=False, **opts)
    la, lb = _losses(a), _losses(b)
    assert all((x == y) or (math.isnan(x) and math.isnan(y)) for x, y in zip(la, lb, strict=True))
    assert a.best_ids == b.best_ids


def test_probe_sampling_resume_draws_the_same_probe_sets(tmp_path):
    import tokensmith as ts
    from tokensmith.models import Slot
    from tokensmith.optimization import ProbeSampling, TargetLoss, search

    ad, small = ts.tiny("llama"), ts.tiny("gpt2")
    enc = ad.encode(["Write a poem", Slot("suffix", " a b c d e")], target=" Sure, here", chat=True,
                    close_target=False)

    def obj():
        return ProbeSampling(TargetLoss(ad, enc), TargetLoss(small, small.encode(**enc.recipe)), r=4,
                             sampling_factor=4, seed=1)

    kw = dict(search_width=16, topk=8, seed=0, progress=False)
    full = search(ad, obj(), "gcg", steps=4, **kw)
    path = tmp_path / "p.json"
    search(ad, obj(), "gcg", steps=2, save_path=path, **kw)
    resumed = search(ad, obj(), "gcg", steps=4, resume=path, **kw)
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history]
