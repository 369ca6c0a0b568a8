"""Scorers and selectors as pure functions, pinned to their formulas (float64 hand computations)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tokensmith.pruning import (
    KCenter,
    KeyNorm,
    ObservationWindow,
    RandomScore,
    ScoreContext,
    Scorer,
    TopK,
    accumulated_attention,
    attention_received,
    get_scorer,
    group_heads,
    kcenter_keep,
    keep_counts,
    key_norm,
    layer_ratios,
    observation_window,
    pyramid_schedule,
    rank_normalize,
    redundancy,
    scorer_names,
    separator_ids,
    sinks_and_recent,
    threshold_keep,
    topk_keep,
)


def _attn(B=2, H=4, R=3, T=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(B, H, R, T, generator=g, dtype=torch.float64), -1)


def test_attention_received_formula():
    A = _attn()
    valid = torch.ones(2, 7, dtype=torch.bool)
    valid[1, :2] = False
    rv = torch.tensor([[True, True, True], [False, True, True]])
    s = attention_received(A, valid, rv)
    for b in range(2):
        rows = [r for r in range(3) if rv[b, r]]
        want = sum(A[b, h, r] for h in range(4) for r in rows) / (4 * len(rows))
        for j in range(7):
            if valid[b, j]:
                assert float(s[b, 0, j]) == pytest.approx(float(want[j]), rel=1e-6)
            else:
                assert s[b, 0, j] == -math.inf


def test_observation_window_pooling_and_groups():
    A = _attn(B=1, H=4, R=2, T=9)
    valid = torch.ones(1, 9, dtype=torch.bool)
    s = observation_window(A, valid, num_kv_heads=2, window=2, kernel=3, pooling="max")
    v = A.sum(2)[0]  # [H, T]
    pooled = torch.stack([torch.stack([v[h, max(0, j - 1) : j + 2].max() for j in range(9)]) for h in range(4)])
    want = torch.stack([pooled[0:2].mean(0), pooled[2:4].mean(0)])  # GQA: heads 0,1 -> kv 0
    torch.testing.assert_close(s[0, :, :7], want[:, :7].float(), rtol=1e-6, atol=1e-7)
    # the window's own columns rank above everything
    assert bool((s[0, :, 7:] > s[0, :, :7].amax(-1, keepdim=True)).all())
    with pytest.raises(ValueError, match="odd"):
        observation_window(A, valid, 2, 2, kernel=4)


def test_group_heads_follows_repeat_kv():
    x = torch.arange(8.0).view(1, 4, 2)
    # transformers' repeat_kv: query head h reads kv head h // (H / H_kv)
    torch.testing.assert_close(group_heads(x, 2), torch.tensor([[[1.0, 2.0], [5.0, 6.0]]]))
    torch.testing.assert_close(group_heads(x, 2, "sum"), torch.tensor([[[2.0, 4.0], [10.0, 12.0]]]))
    with pytest.raises(ValueError):
        group_heads(x, 3)


def test_accumulated_attention_running_sum():
    A = _attn(B=1, H=2, R=4, T=5)
    valid = torch.ones(1, 5, dtype=torch.bool)
    prev = torch.tensor([[[1.0, 2.0, 3.0]]])
    s = accumulated_attention(A, valid, 1, prev)
    want = A.sum((1, 2))[0].float()
    want[:3] += prev[0, 0]
    torch.testing.assert_close(s[0, 0], want, rtol=1e-6, atol=1e-7)


def test_key_norm_and_redundancy():
    k = torch.randn(2, 2, 6, 4, dtype=torch.float64)
    valid = torch.ones(2, 6, dtype=torch.bool)
    torch.testing.assert_close(key_norm(k, valid), -k.norm(dim=-1).float())
    x = torch.tensor([[[1.0, 0.0], [1.0, 0.01], [0.0, 1.0]]])
    r = redundancy(x, torch.ones(1, 3, dtype=torch.bool))
    # the two near-duplicates score low, the orthogonal token high
    assert float(r[0, 0, 2]) > float(r[0, 0, 0]) and float(r[0, 0, 2]) > float(r[0, 0, 1])
    assert float(r[0, 0, 2]) == pytest.approx(-max(0.0, 0.01 / math.hypot(1, 0.01)), abs=1e-6)


def test_sinks_and_recent_order():
    valid = torch.ones(1, 10, dtype=torch.bool)
    valid[0, :2] = False  # left padding
    s = sinks_and_recent(valid, n_sink=2, window=3)[0, 0]
    order = torch.argsort(s, descending=True).tolist()
    # real positions 0,1 are columns 2,3 (sinks); the 3 newest are columns 7,8,9
    assert set(order[:2]) == {2, 3}
    assert set(order[2:5]) == {7, 8, 9}
    assert torch.isinf(s[:2]).all()


@settings(max_examples=40, deadline=None)
@given(
    B=st.integers(1, 3),
    h=st.integers(1, 3),
    T=st.integers(2, 12),
    ratio=st.floats(0.0, 0.95),
    seed=st.integers(0, 10_000),
)
def test_topk_keep_properties(B, h, T, ratio, seed):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(B, h, T, generator=g)
    n = torch.randint(1, T + 1, (B,), generator=g)
    valid = torch.arange(T)[None, :] >= (T - n)[:, None]  # left padded
    protect = (torch.rand(B, T, generator=g) < 0.15) & valid
    k = keep_counts(valid, ratio=ratio)
    assert bool((k == torch.clamp(torch.floor(n * (1 - ratio) + 1e-9).long().clamp_min(1), max=n)).all())
    keep = topk_keep(scores.masked_fill(~valid[:, None], -math.inf), k, valid, protect)
    K = int(torch.maximum(k, protect.sum(-1)).max())
    assert keep.shape == (B, h, K)
    assert bool((keep[..., 1:] > keep[..., :-1]).all())  # sorted, distinct
    for b in range(B):
        kb = max(int(k[b]), int(protect[b].sum()))
        for hh in range(h):
            cols = keep[b, hh].tolist()
            real = [c for c in cols if valid[b, c]]
            assert len(real) >= kb and len(real) <= kb + 1  # +1 only when a row lacks pad columns
            assert set(protect[b].nonzero().flatten().tolist()) <= set(cols)
            # the kept real tokens beat the dropped ones (protected aside)
            free = [c for c in real if not protect[b, c]]
            dropped = [c for c in range(T) if valid[b, c] and c not in cols]
            if free and dropped and len(real) == kb:
                assert float(scores[b, hh, free].min()) >= float(scores[b, hh, dropped].max())
        # pad fillers are the same for every head (one slot mask describes the row)
        pads = [[c for c in keep[b, hh].tolist() if not valid[b, c]] for hh in range(h)]
        assert all(p == pads[0] for p in pads)


def test_keep_counts_and_errors():
    valid = torch.ones(1, 10, dtype=torch.bool)
    assert keep_counts(valid, ratio=0.0).tolist() == [10]
    assert keep_counts(valid, budget=4).tolist() == [4]
    assert keep_counts(valid, budget=40).tolist() == [10]  # the documented fallback
    for bad in (1.0, -0.5):
        with pytest.raises(ValueError, match=r"\[0, 1\)"):
            keep_counts(valid, ratio=bad)
    with pytest.raises(ValueError):
        keep_counts(valid)
    with pytest.raises(ValueError):
        TopK(budget=0)


def test_threshold_keep_and_kcenter():
    s = torch.tensor([[[0.1, 0.7, 0.3, 0.9]]])
    valid = torch.tensor([[True, True, True, True]])
    assert threshold_keep(s, 0.5, valid).tolist() == [[[False, True, False, True]]]
    assert threshold_keep(s, 5.0, valid).sum() == 1  # at least the best token
    # k-center on points on a line: picks the extremes first
    x = torch.tensor([[[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.7, 0.7], [-1.0, 0.2]]])
    keep = kcenter_keep(x, 3, torch.ones(1, 5, dtype=torch.bool))
    assert set(keep[0, 0].tolist()) >= {2, 4}


def test_schedules():
    r = pyramid_schedule(5, 0.6)
    assert sum(1 - x for x in r) / 5 == pytest.approx(0.4)
    assert r == sorted(r)  # deeper layers remove more
    assert layer_ratios(None, [0, 1], 0.3) == {0: 0.3, 1: 0.3}
    assert layer_ratios([0.1, 0.2], [3, 5], None) == {3: 0.1, 5: 0.2}
    with pytest.raises(ValueError):
        layer_ratios([0.1], [3, 5], None)


def test_combined_and_registry():
    ctx = ScoreContext(layer=0, phase="prefill", valid=torch.ones(1, 5, dtype=torch.bool), keys=torch.randn(1, 2, 5, 4))
    a, b = KeyNorm(), RandomScore(seed=0)
    c = 0.5 * a + b
    s = c(ctx)
    want = 0.5 * rank_normalize(a(ctx), ctx.valid) + rank_normalize(RandomScore(seed=0)(ctx), ctx.valid)
    torch.testing.assert_close(s, want)
    assert {"snapkv", "h2o", "key_norm", "streaming", "sepllm", "attention"} <= set(scorer_names())
    assert isinstance(get_scorer("snapkv"), ObservationWindow)

    class Mine(Scorer):
        name = "test_mine"

        def score(self, ctx):
            return torch.zeros(ctx.shape[0], 1, ctx.shape[1])

    assert isinstance(get_scorer("test_mine"), Mine)
    bad = ScoreContext(layer=0, phase="prefill", valid=torch.ones(1, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="needs 'keys'"):
        KeyNorm()(bad)
    with pytest.raises(ValueError, match="needs"):
        KCenter(ratio=0.5).select(torch.zeros(1, 1, 5), bad.valid, None, ctx=bad)


def test_separator_ids_from_tokenizer(shared_tiny):
    tok = shared_tiny("llama").tokenizer
    ids = separator_ids(tok)
    texts = [tok.decode([i]) for i in ids]
    assert any(t.strip() == "." for t in texts) and any(t.strip() == "," for t in texts)
    assert all(ch in ".,;:!?\n。，；：！？、 " for t in texts for ch in t)
