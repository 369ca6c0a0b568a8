"""Token merging (PRN-1, PRN-8, PRN-10): ToMe bipartite merge against a loop reference, Y = W·X transforms, cluster
pooling, proportional attention, and ToMe inside BERT encoders (tiny bert; MiniLM as the real-model check)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tokensmith as ts
from tests.tolerance import assert_fp32_close, fp32_atol
from tokensmith.pruning.merge import (
    W_merge,
    W_pool,
    W_prune,
    W_soft,
    bipartite_merge,
    cluster_pool,
    mergeable_counts,
    proportional_attention_bias,
    size_weighted_mean,
    tome_encoder,
    transform_tokens,
    unmerge,
)

pytestmark = pytest.mark.usefixtures("torch_one_thread")


# ---------------------------------------------------------------------------------------------- reference
def tome_reference(x, r, metric=None, sizes=None, protect=None):
    """One row, written from the paper with Python loops (float64): returns the merged real tokens in original
    order, their sizes, and for every input token the (0-based) output slot it went to."""
    T = x.shape[0]
    m = (x if metric is None else metric).double()
    s = [1.0] * T if sizes is None else [float(v) for v in sizes]
    prot = [False] * T if protect is None else [bool(v) for v in protect]
    A = [i for i in range(0, T, 2) if not prot[i]]
    B = [j for j in range(1, T, 2) if not prot[j]]
    best = {}
    for i in A if B else []:
        sims = [(float(m[i] @ m[j] / (m[i].norm() * m[j].norm())), j) for j in B]
        top = max(s_ for s_, _ in sims)
        best[i] = (top, next(j for s_, j in sims if s_ == top))
    ranked = sorted(best, key=lambda i: (-best[i][0], i))[:r]
    dst = {i: best[i][1] for i in ranked}
    xs = {t: x[t].double() * s[t] for t in range(T)}
    tot = {t: s[t] for t in range(T)}
    for i, j in dst.items():
        xs[j] = xs[j] + x[i].double() * s[i]
        tot[j] += s[i]
    survivors = [t for t in range(T) if t not in dst]
    out = torch.stack([xs[t] / tot[t] for t in survivors])
    slot = {t: k for k, t in enumerate(survivors)}
    assign = [slot[dst.get(t, t)] for t in range(T)]
    return out, [tot[t] for t in survivors], assign


def _real(res, b):
    v = res.valid[b]
    return res.x[b][v], res.sizes[b][v]


# ---------------------------------------------------------------------------------------------- bipartite_merge
def test_hand_case_size_weighted_mean():
    # tokens 0 and 1 are near-parallel: A token 0 merges into B token 1 by size-weighted mean
    x = torch.tensor([[[1.0, 0.0], [1.0, 0.2], [0.0, 1.0], [-1.0, 0.0]]], dtype=torch.float64)
    sizes = torch.tensor([[3.0, 1.0, 1.0, 1.0]], dtype=torch.float64)
    res = bipartite_merge(x, 1, sizes=sizes)
    assert res.assignment.tolist() == [[0, 0, 1, 2]]
    assert res.kept_columns.tolist() == [[1, 2, 3]]
    assert res.sizes.tolist() == [[4.0, 1.0, 1.0]]
    torch.testing.assert_close(
        res.x[0, 0], torch.tensor([1.0, 0.05], dtype=torch.float64), rtol=0, atol=1e-15
    )
    assert torch.equal(res.x[0, 1:], x[0, 2:])  # untouched tokens are bit-identical


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    T=st.integers(2, 13),
    d=st.integers(1, 5),
    frac=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
    weighted=st.booleans(),
    n_protect=st.integers(0, 2),
)
def test_matches_loop_reference_and_preserves_mass(T, d, frac, seed, weighted, n_protect):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, T, d, generator=g, dtype=torch.float64)
    metric = torch.randn(1, T, 3, generator=g, dtype=torch.float64)
    sizes = torch.randint(1, 5, (1, T), generator=g).double() if weighted else None
    protect = torch.zeros(1, T, dtype=torch.bool)
    protect[0, torch.randperm(T, generator=g)[:n_protect]] = True
    cap = int(mergeable_counts(torch.ones(1, T, dtype=torch.bool), protect)[0])
    r = int(round(frac * cap))
    res = bipartite_merge(x, r, metric=metric, sizes=sizes, protect=protect)
    ref_x, ref_s, ref_a = tome_reference(x[0], r, metric[0], None if sizes is None else sizes[0], protect[0])
    assert res.x.shape == (1, T - r, d)
    assert res.assignment[0].tolist() == ref_a
    assert res.sizes[0].tolist() == ref_s
    torch.testing.assert_close(res.x[0], ref_x, rtol=0, atol=1e-12)
    # Σ s·x and Σ s are preserved per row (float64)
    s_in = torch.ones(1, T, dtype=torch.float64) if sizes is None else sizes
    torch.testing.assert_close(
        (res.sizes[..., None] * res.x).sum(1), (s_in[..., None] * x).sum(1), rtol=0, atol=1e-12
    )
    assert float(res.sizes.sum()) == float(s_in.sum())
    # protected tokens neither merge nor absorb
    for t in torch.nonzero(protect[0]).flatten().tolist():
        slot = int(res.assignment[0, t])
        assert int((res.assignment[0] == slot).sum()) == 1
        assert torch.equal(res.x[0, slot], x[0, t])


def test_r_zero_changes_nothing():
    x = torch.randn(2, 7, 4)
    res = bipartite_merge(x, 0)
    assert torch.equal(res.x, x)
    assert res.assignment.tolist() == [list(range(7))] * 2
    assert torch.equal(res.sizes, torch.ones(2, 7))


def test_sizes_sum_to_T_and_unmerge_roundtrip():
    x = torch.randn(3, 10, 6, generator=torch.Generator().manual_seed(0))
    res = bipartite_merge(x, 4)
    assert res.sizes.sum(-1).tolist() == [10.0] * 3
    # sizes are the group counts of the assignment
    counts = torch.zeros(3, 6).scatter_add_(1, res.assignment, torch.ones(3, 10))
    assert torch.equal(counts, res.sizes)
    up = unmerge(res.x, res.assignment)
    assert up.shape == x.shape
    # mean pooling of the unmerged tokens = size-weighted mean of the merged ones
    assert_fp32_close(size_weighted_mean(res.x, res.sizes), up.mean(1), width=10)
    assert_fp32_close(size_weighted_mean(res.x, res.sizes), x.mean(1), width=10)


@settings(max_examples=15, deadline=None)
@given(
    lens=st.lists(st.integers(2, 9), min_size=1, max_size=4), seed=st.integers(0, 2**16), left=st.booleans()
)
def test_padded_batch_equals_rows_alone(lens, seed, left):
    g = torch.Generator().manual_seed(seed)
    T = max(lens) + 1
    rows = [torch.randn(n, 3, generator=g, dtype=torch.float64) for n in lens]
    r = torch.tensor([n // 2 - (i % 2 if n // 2 else 0) for i, n in enumerate(lens)])  # per-row r, differing
    x = torch.randn(len(lens), T, 3, generator=g, dtype=torch.float64) * 100  # pads: large garbage
    valid = torch.zeros(len(lens), T, dtype=torch.bool)
    for b, n in enumerate(lens):
        sl = slice(T - n, T) if left else slice(0, n)
        x[b, sl], valid[b, sl] = rows[b], True
    res = bipartite_merge(x, r, valid=valid)
    assert res.x.shape[1] == T - int(r.min())
    assert res.sizes.sum(-1).tolist() == [float(n) for n in lens]  # pads have size 0 and never merge
    for b in range(len(lens)):
        alone = bipartite_merge(rows[b][None], int(r[b]))
        xb, sb = _real(res, b)
        torch.testing.assert_close(xb, alone.x[0], rtol=0, atol=0)
        assert sb.tolist() == alone.sizes[0].tolist()
        # real tokens go where they go alone (slots relabelled by the real-slot order)
        real_slots = torch.nonzero(res.valid[b]).flatten()
        relabel = {int(s): k for k, s in enumerate(real_slots)}
        cols = torch.nonzero(valid[b]).flatten()
        assert [relabel[int(res.assignment[b, c])] for c in cols] == alone.assignment[0].tolist()
        # pads keep their own slot
        for c in torch.nonzero(~valid[b]).flatten().tolist():
            assert not bool(res.valid[b, res.assignment[b, c]])


def test_bad_input_raises():
    x = torch.randn(1, 6, 2)
    with pytest.raises(ValueError, match="50%"):
        bipartite_merge(x, 4)
    with pytest.raises(ValueError, match="mergeable"):
        bipartite_merge(x, 3, protect=torch.tensor([[True, False, True, False, True, False]]))
    with pytest.raises(ValueError, match=r"\[B, T, d\]"):
        bipartite_merge(x[0], 1)
    with pytest.raises(ValueError, match="valid"):
        bipartite_merge(x, 1, valid=torch.ones(1, 5, dtype=torch.bool))
    with pytest.raises(TypeError):
        bipartite_merge(x, 1.5)
    with pytest.raises(ValueError, match=">= 0"):
        bipartite_merge(x, -1)


def test_equals_transform_tokens_with_W_merge():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 9, 5, generator=g, dtype=torch.float64)
    sizes = torch.randint(1, 4, (2, 9), generator=g).double()
    valid = torch.ones(2, 9, dtype=torch.bool)
    valid[1, :2] = False
    sizes[1, :2] = 0
    res = bipartite_merge(x, torch.tensor([3, 2]), sizes=sizes, valid=valid)
    W = W_merge(res.assignment, sizes, n_out=res.x.shape[1])
    y = transform_tokens(x, W, sizes=sizes)
    v = res.valid
    torch.testing.assert_close(y.x[v], res.x[v], rtol=0, atol=1e-12)
    torch.testing.assert_close(y.sizes, res.sizes, rtol=0, atol=1e-12)
    assert torch.allclose(W.sum(-1)[v], torch.ones(()).double())


# ---------------------------------------------------------------------------------------------- Y = W·X
def test_W_prune_is_row_selection():
    x = torch.randn(2, 6, 3)
    keep = torch.tensor([[0, 2, 5], [1, 3, 4]])
    y = transform_tokens(x, W_prune(keep, 6), sizes=torch.ones(2, 6))
    assert torch.equal(y.x, x.gather(1, keep[..., None].expand(2, 3, 3)))
    assert torch.equal(y.sizes, torch.ones(2, 3))
    mask = torch.zeros(2, 6, dtype=torch.bool).scatter_(1, keep, True)
    assert torch.equal(W_prune(mask, 6), W_prune(keep, 6))
    with pytest.raises(ValueError):
        W_prune(torch.tensor([7]), 6)


@pytest.mark.parametrize(("T", "n"), [(7, 3), (10, 4), (5, 5), (3, 1)])
def test_W_pool_matches_adaptive_avg_pool(T, n):
    x = torch.randn(2, T, 4, dtype=torch.float64)
    ref = F.adaptive_avg_pool1d(x.transpose(1, 2), n).transpose(1, 2)
    torch.testing.assert_close(transform_tokens(x, W_pool(T, n, torch.float64)).x, ref, rtol=0, atol=1e-12)


def test_W_soft_rows_and_mass():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 8, 4, generator=g, dtype=torch.float64)
    valid = torch.ones(2, 8, dtype=torch.bool)
    valid[0, -2:] = False
    W = W_soft(x, torch.tensor([[0, 3, 5], [1, 2, 7]]), tau=0.2, valid=valid)
    torch.testing.assert_close(W.sum(-1), torch.ones(2, 3, dtype=torch.float64))
    assert float(W[0, :, -2:].abs().max()) == 0.0  # pads get no weight
    sizes = valid.double()
    y = transform_tokens(x, W, sizes=sizes)
    torch.testing.assert_close(y.sizes.sum(-1), sizes.sum(-1))  # total size conserved
    # tiny tau -> each anchor row is (nearly) the anchor itself when anchors are far apart
    xs = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]], dtype=torch.float64)
    Wh = W_soft(xs, torch.tensor([[0, 1, 2]]), tau=1e-3)
    torch.testing.assert_close(Wh[0], torch.eye(3, dtype=torch.float64), rtol=0, atol=1e-12)
    with pytest.raises(ValueError):
        W_soft(x, torch.tensor([[0]]), tau=0.0)


# ---------------------------------------------------------------------------------------------- proportional attention
def test_proportional_bias_equals_duplicated_keys():
    """softmax(q·k/√d + log s) over merged keys = attention over s copies of each key (ToMe's motivation)."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 3, 8, generator=g, dtype=torch.float64)
    k = torch.randn(1, 2, 4, 8, generator=g, dtype=torch.float64)
    v = torch.randn(1, 2, 4, 8, generator=g, dtype=torch.float64)
    sizes = torch.tensor([[1.0, 3.0, 2.0, 1.0]], dtype=torch.float64)
    bias = proportional_attention_bias(sizes)[:, None, None, :]
    merged = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    reps = torch.tensor([1, 3, 2, 1])
    dup = F.scaled_dot_product_attention(q, k.repeat_interleave(reps, 2), v.repeat_interleave(reps, 2))
    torch.testing.assert_close(merged, dup, rtol=0, atol=1e-12)
    ones = proportional_attention_bias(torch.ones(1, 4, dtype=torch.float64))[:, None, None, :]
    torch.testing.assert_close(
        F.scaled_dot_product_attention(q, k, v, attn_mask=ones),
        F.scaled_dot_product_attention(q, k, v),
        rtol=0,
        atol=1e-14,
    )
    assert float((merged - F.scaled_dot_product_attention(q, k, v)).abs().max()) > 1e-3
    # invalid keys are masked
    b = proportional_attention_bias(torch.tensor([[2.0, 0.0]]))
    assert b[0, 0] == pytest.approx(math.log(2)) and b[0, 1] == torch.finfo(torch.float32).min


# ---------------------------------------------------------------------------------------------- cluster pooling
def test_cluster_pool_objective_and_mass():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 20, 3, generator=g, dtype=torch.float64)
    w = torch.rand(2, 20, generator=g, dtype=torch.float64) + 0.1
    res = cluster_pool(x, 5, weights=w)
    h = res.history
    assert all(b <= a + 1e-12 for a, b in zip(h, h[1:], strict=False))  # Lloyd never increases the objective
    assert len(h) >= 2
    torch.testing.assert_close(
        (res.sizes[..., None] * res.x).sum(1), (w[..., None] * x).sum(1), rtol=0, atol=1e-10
    )
    torch.testing.assert_close(res.sizes.sum(-1), w.sum(-1), rtol=0, atol=1e-12)
    # final objective equals Σ w ||x - c_a||² recomputed from the outputs
    obj = float((w * ((x - unmerge(res.x, res.assignment)) ** 2).sum(-1)).sum())
    assert obj == pytest.approx(h[-1], rel=1e-9)
    # clusters come in the order of their first member
    assert (res.kept_columns.diff(dim=-1) > 0).all()


def test_cluster_pool_recovers_blobs_and_padding():
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]], dtype=torch.float64)
    labels = torch.tensor([1, 0, 2, 1, 0, 2, 2, 0])
    g = torch.Generator().manual_seed(2)
    row = centres[labels] + 0.1 * torch.randn(8, 2, generator=g, dtype=torch.float64)
    res = cluster_pool(row[None], 3)
    # first-member order: label 1 (first at 0), 0 (at 1), 2 (at 2)
    assert res.assignment[0].tolist() == [0, 1, 2, 0, 1, 2, 2, 1]
    assert res.sizes[0].tolist() == [2.0, 3.0, 3.0]
    # padded batch == row alone
    x = torch.full((2, 10, 2), 1e3, dtype=torch.float64)
    valid = torch.zeros(2, 10, dtype=torch.bool)
    x[0, 2:], valid[0, 2:] = row, True
    x[1, :8], valid[1, :8] = row.flip(0), True
    pb = cluster_pool(x, 3, valid=valid)
    torch.testing.assert_close(pb.x[0], res.x[0], rtol=0, atol=1e-12)
    assert pb.assignment[0, 2:].tolist() == res.assignment[0].tolist()
    # k = n: every token is its own cluster
    one = cluster_pool(row[None], 8)
    torch.testing.assert_close(one.x[0], row, rtol=0, atol=0)
    with pytest.raises(ValueError):
        cluster_pool(row[None], 9)


# ---------------------------------------------------------------------------------------------- encoder (tiny bert)
TEXTS = ["the quick brown fox jumps over the lazy dog near the river bank", "a short one", "hello"]


def _hook_counts(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.fixture(scope="module")
def bert(shared_tiny):
    return shared_tiny("bert")


def test_r0_equals_plain_forward_and_model_unchanged(bert):
    batch = bert.encode_batch(TEXTS)  # left padded
    n_hooks = _hook_counts(bert.model)
    with torch.no_grad():
        base = bert.forward(batch, output_hidden_states=True)
    emb = bert.sentence_embedding(TEXTS)  # right padded by the tokenizer
    with tome_encoder(bert, r=0) as rep, torch.no_grad():
        out = bert.forward(batch, output_hidden_states=True)
        emb0 = bert.sentence_embedding(TEXTS)
    d = bert.structure.hidden_size
    am = batch["attention_mask"].bool() if isinstance(batch, dict) else batch.attention_mask.bool()
    assert_fp32_close(out.logits[am], base.logits[am], width=d, depth=2)
    for h0, h1 in zip(out.hidden_states, base.hidden_states, strict=True):
        assert_fp32_close(h0[am], h1[am], width=d, depth=2)
    assert_fp32_close(emb0, emb, width=d, depth=2)
    assert rep.physical and rep.calls == 2 and rep.flops_ratio == 1.0
    assert rep.tokens_per_layer()[0] == rep.tokens_per_layer()[1]
    # outside the block: no hooks left, the same forward bit for bit
    assert _hook_counts(bert.model) == n_hooks
    with torch.no_grad():
        after = bert.forward(batch, output_hidden_states=True)
    assert torch.equal(after.logits, base.logits)


def test_merging_drops_r_per_layer_and_keeps_shapes(bert):
    texts = [TEXTS[0]]
    with tome_encoder(bert, r=3) as rep, torch.no_grad():
        out = bert.forward(bert.encode_batch(texts), output_hidden_states=True)
        hs = bert.hidden_states(bert.encode_batch(texts))
    T = out.logits.shape[1]
    counts = rep.tokens_per_layer()
    assert counts[0] == [T] and counts[1] == [T - 3]
    assert rep.tokens_out.tolist() == [T - 6]
    assert [e["length"] for e in rep.events[:2]] == [[T, T - 3], [T - 3, T - 6]]
    assert rep.physical and rep.where == "attn" and rep.flops_ratio < 1.0
    assert hs.shape[2] == T and len(out.hidden_states) == 3 and out.logits.shape[:2] == (1, T)
    assert float(rep.sizes.sum()) == T
    # special tokens ([CLS] first, [SEP] last) never merge
    slot_sizes = rep.sizes.gather(1, rep.assignment)[0]
    assert slot_sizes[0] == 1 and slot_sizes[-1] == 1
    # tokens merged into one slot get identical unmerged outputs
    last = out.hidden_states[-1][0]
    a = rep.assignment[0]
    for s in a.unique():
        grp = torch.nonzero(a == s).flatten()
        assert torch.equal(last[grp], last[grp[:1]].expand(len(grp), -1))


@pytest.fixture(scope="module")
def nopos_bert():
    """A tiny bert without position embeddings: permutation-equivariant, so duplicated tokens stay duplicates."""
    ad = ts.tiny("bert", seed=3)
    with torch.no_grad():
        ad.model.bert.embeddings.position_embeddings.weight.zero_()
    return ad


@pytest.mark.parametrize("where", ["attn", "layer"])
def test_merging_exact_duplicates_is_lossless_with_proportional_attention(nopos_bert, where):
    ad = nopos_bert
    tok = ad.tokenizer
    words = ["cat", "tree", "house", "house", "river", "blue"]
    ids = torch.tensor([[tok.cls_token_id, *tok.convert_tokens_to_ids(words), tok.sep_token_id]])
    am = torch.ones_like(ids)
    with torch.no_grad():
        base = ad.model(input_ids=ids, attention_mask=am).logits
        with tome_encoder(ad, r={0: 1}, where=where) as rep:
            prop = ad.model(input_ids=ids, attention_mask=am).logits
        with tome_encoder(ad, r={0: 1}, where=where, proportional=False):
            flat = ad.model(input_ids=ids, attention_mask=am).logits
    # the merged pair is the duplicate ("house" at ranks 3 and 4)
    assert rep.assignment[0].tolist() == [0, 1, 2, 3, 3, 4, 5, 6]
    scale = float(base.abs().max())
    atol = fp32_atol(scale, ad.structure.hidden_size, depth=2)
    assert_fp32_close(prop, base, width=ad.structure.hidden_size, depth=2)
    assert float((flat - base).abs().max()) > 100 * atol  # without log(size) the duplicate loses weight


def test_padded_batch_equals_rows_alone_in_encoder(bert):
    d = bert.structure.hidden_size
    with tome_encoder(bert, r=2) as rep:
        emb = bert.sentence_embedding(TEXTS)  # right padding
        left = bert.pool(bert.encode_batch(TEXTS))  # left padding
        alone, merged_away = [], []
        for t in TEXTS:
            alone.append(bert.sentence_embedding([t]))
            merged_away.append(int(rep.tokens_in[0] - rep.tokens_out[0]))
    alone = torch.cat(alone)
    assert_fp32_close(emb, alone, width=d, depth=2)
    assert_fp32_close(left, alone, width=d, depth=2)
    # rows merged different amounts (the short ones are clamped), and that is noted
    assert merged_away[0] == 4 and merged_away[2] < merged_away[1] < 4
    assert any("clamped" in n for n in rep.notes)
    plain = bert.sentence_embedding(TEXTS)
    assert float((plain[0] - emb[0]).abs().max()) > 1e-4  # the long row was changed by merging


def test_unmerge_false_returns_merged_states(bert):
    batch = bert.encode_batch(TEXTS[:2])
    with torch.no_grad():
        with tome_encoder(bert, r=2) as rep:
            full = bert.forward(batch, output_hidden_states=True).hidden_states[-1]
        with tome_encoder(bert, r=2, unmerge=False) as rep2:
            merged = bert.forward(batch, output_hidden_states=True).hidden_states[-1]
    assert merged.shape[1] == rep2.sizes.shape[1] < full.shape[1]
    assert torch.equal(rep.assignment, rep2.assignment)
    am = batch.attention_mask.bool() if hasattr(batch, "attention_mask") else batch["attention_mask"].bool()
    mean_full = (full * am[..., None]).sum(1) / am.sum(1, keepdim=True)
    assert_fp32_close(size_weighted_mean(merged, rep2.sizes), mean_full, width=full.shape[1])


def test_errors_and_cleanup(bert, shared_tiny):
    with pytest.raises(ValueError, match="encoder"):
        with tome_encoder(shared_tiny("llama"), r=1):
            pass
    with pytest.raises(ValueError, match="per-layer"):
        with tome_encoder(bert, r=[1, 2, 3]):
            pass
    with pytest.raises(ValueError, match="out of range"):
        with tome_encoder(bert, r=1, layers=[5]):
            pass
    with pytest.raises(TypeError):
        with tome_encoder(bert, r=1.5):
            pass
    n = _hook_counts(bert.model)
    with pytest.raises(ValueError, match="already active"):
        with tome_encoder(bert, r=1), tome_encoder(bert, r=1):
            pass
    with pytest.raises(RuntimeError, match="boom"):
        with tome_encoder(bert, r=1):
            raise RuntimeError("boom")
    assert _hook_counts(bert.model) == n


# ---------------------------------------------------------------------------------------------- real model
@pytest.mark.real_model
def test_minilm_merged_embeddings_stay_close():
    enc = ts.load("minilm-l6")
    texts = [
        "A man is playing a guitar on the street while people walk past him.",
        "The new phone has a larger screen, a faster processor and a better camera than last year's model.",
        "Scientists discovered a new species of frog in the rainforest of South America last month.",
    ]
    base = enc.sentence_embedding(texts)
    with tome_encoder(enc, r=0):
        same = enc.sentence_embedding(texts)
    assert_fp32_close(same, base, width=enc.structure.hidden_size, depth=enc.structure.num_layers)
    with tome_encoder(enc, r=1):
        light = enc.sentence_embedding(texts)
    with tome_encoder(enc, r=2) as rep:
        merged = enc.sentence_embedding(texts)
    # measured (fp32, CPU): r=1 -> cos 0.974 / 0.989 / 0.982; r=2 -> 0.863 / 0.979 / 0.787 (17/24/18 tokens -> 5/12/6)
    assert float(F.cosine_similarity(light, base, dim=-1).min()) > 0.95
    cos = F.cosine_similarity(merged, base, dim=-1)
    assert rep.tokens_out.tolist() == (rep.tokens_in - 12).tolist()  # 6 layers x 2 tokens merged
    assert float(cos.min()) > 0.75, cos.tolist()
    # merged embeddings still rank each sentence's own unmerged embedding first
    assert torch.equal((merged @ base.T).argmax(-1), torch.arange(3))
