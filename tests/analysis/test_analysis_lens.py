"""The analysis logit lens: depth L is the model, middle depths are HF's hidden states through the head, the
metrics equal a float64 reimplementation, and the corpus statistics stream exactly."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tokensmith as ts
from tokensmith.analysis.lens import logit_lens, logit_lens_stats

CAUSAL = ["gpt2", "llama", "qwen2", "gemma3", "gpt_neox"]
TEXT = "The capital of France is Paris, and the capital of Italy is"
CORPUS = ["Hello world, how are you today?", "A short one.", "x", "The quick brown fox jumps over the lazy dog",
          "Numbers: 1 2 3 4 5 6"]


@pytest.fixture(scope="module")
def rn(torch_one_thread, random_norm_tiny_factory):
    """Tiny adapters with random norm weights (a dropped final-norm γ/β would show)."""
    return lambda arch: random_norm_tiny_factory(arch, seed=3, norm_seed=1)


def _reference(ad, ids: torch.Tensor) -> dict[int, torch.Tensor]:
    """float64 log-probs ``[T, V]`` per depth, independent of the lens: depth L = the model's own logits, depth
    l < L = HF ``hidden_states[l]`` through ``unembed``."""
    L = ad.structure.num_layers
    with torch.no_grad():
        out = ad.model(input_ids=ids[None], output_hidden_states=True)
        ref = {L: torch.log_softmax(out.logits[0].double(), -1)}
        for d in range(L):
            ref[d] = torch.log_softmax(ad.unembed(out.hidden_states[d][0]).double(), -1)
    return ref


def _check_against(frame, ref, ids, target):
    for d, lp in ref.items():
        g = frame[frame.layer == d].sort_values("position")
        p = lp.exp()
        ent = -(p * lp).sum(-1)
        top = lp.max(-1)
        torch.testing.assert_close(torch.tensor(g.top_prob.to_numpy()), top.values.exp(), atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(torch.tensor(g.entropy.to_numpy()), ent, atol=1e-4, rtol=1e-5)
        kl = (ref[max(ref)].exp() * (ref[max(ref)] - lp)).sum(-1)
        torch.testing.assert_close(torch.tensor(g.kl_to_final.to_numpy()), kl, atol=1e-4, rtol=1e-4)
        ok = target >= 0
        tl = lp[torch.arange(len(ids))[ok], target[ok]]
        got = torch.tensor(g.token_logprob.to_numpy())[ok]
        assert float((got - tl).abs().max()) <= 1e-5
        # rank = #tokens more likely; fp32 can only reorder tokens whose float64 log-probs are within rounding
        got_rank = torch.tensor(g.token_rank.to_numpy(dtype="int64", na_value=-1))[ok]
        surely_above = (lp[ok] > tl[:, None] + 5e-6).sum(-1)
        maybe_above = (lp[ok] > tl[:, None] - 5e-6).sum(-1)
        assert ((surely_above <= got_rank) & (got_rank <= maybe_above)).all()
        # the lens' top-1 is a float64 top-1 (up to a tie within fp32 rounding)
        at_top = lp.gather(1, torch.tensor(g.top_id.tolist())[:, None]).squeeze(1)
        assert float((top.values - at_top).abs().max()) < 1e-5


@pytest.mark.parametrize("arch", CAUSAL)
def test_lens_is_the_model_at_depth_L_and_hf_hidden_states_below(arch, rn):
    ad = rn(arch)
    f = logit_lens(ad, TEXT, top_k=4)
    ids = ad.encode(TEXT).input_ids
    T, L = len(ids), ad.structure.num_layers
    assert len(f) == (L + 1) * T and f.kind == "logit_lens" and f.meta["objective"] == "next_token"
    ref = _reference(ad, ids)
    nxt = torch.cat([ids[1:], torch.tensor([-1])])
    # the lens at depth L is the model: log-probs of the actual next token within 1e-5
    g = f[f.layer == L].sort_values("position")
    want = ref[L][torch.arange(T - 1), ids[1:]]
    assert float((torch.tensor(g.token_logprob.to_numpy()[:-1]) - want).abs().max()) <= 1e-5
    assert (g.kl_to_final == 0).all()
    _check_against(f, ref, ids, nxt)
    # columns: tokens and next tokens, NaN/NA at the last position, top-k lists
    last = f[f.position == T - 1]
    assert last.next_token.isna().all() and last.token_prob.isna().all() and last.token_rank.isna().all()
    assert f[f.layer == 0].input_token.tolist() == [ad.tokenizer.decode([int(i)]) for i in ids]
    assert f[(f.layer == 0) & (f.position < T - 1)].next_token.tolist() == [
        ad.tokenizer.decode([int(i)]) for i in ids[1:]]
    assert all(len(k) == 4 and k[0] == t for k, t in zip(f.top_k_tokens, f.top_token, strict=True))
    assert ((f.kl_to_final >= -1e-6) & (f.entropy >= 0) & (f.entropy <= math.log(ad.structure.vocab_size) + 1e-4)).all()


def test_tracked_token_by_string_or_id_and_ids_input(shared_tiny, torch_one_thread):
    ad = shared_tiny("llama")
    pid = ad.tokenizer(" Paris", add_special_tokens=False)["input_ids"]
    assert len(pid) == 1
    a = logit_lens(ad, TEXT, token=" Paris", layers=[1, -1])
    b = logit_lens(ad, ad.encode(TEXT).input_ids.tolist(), token=pid[0], layers=[2, 1])
    assert set(a.token) == {" Paris"} and set(a.token_id) == {pid[0]} and sorted(set(a.layer)) == [1, 2]
    cols = ["token_logprob", "token_prob", "top_prob", "kl_to_final", "entropy"]
    torch.testing.assert_close(torch.tensor(a[cols].to_numpy()), torch.tensor(b[cols].to_numpy()), atol=1e-6, rtol=0)
    assert a.token_rank.tolist() == b.token_rank.tolist() and a.token_rank.notna().all()
    ref = _reference(ad, ad.encode(TEXT).input_ids)
    _check_against(a, {d: ref[d] for d in (1, 2)}, ad.encode(TEXT).input_ids,
                   torch.full((len(ad.encode(TEXT).input_ids),), pid[0]))
    assert b.meta["text"] is None and a.meta["text"] == TEXT and a.meta["token"] == pid[0]


def test_masked_lm_head_predicts_the_token_at_the_same_position(shared_tiny, torch_one_thread):
    ad = shared_tiny("bert")
    f = logit_lens(ad, "paris is the capital of france")
    ids = ad.encode("paris is the capital of france").input_ids
    assert f.meta["objective"] == "masked"
    assert (f.next_token == f.input_token).all() and f.token_rank.notna().all()
    L = ad.structure.num_layers
    ref = _reference(ad, ids)
    _check_against(f, ref, ids, ids.clone())
    assert (f[f.layer == L].kl_to_final == 0).all()


def test_bad_inputs_say_what_to_do(shared_tiny, torch_one_thread):
    import transformers

    ad = shared_tiny("llama")
    with pytest.raises(ValueError, match=r"depths in \[0, 2\]"):
        logit_lens(ad, TEXT, layers=[3])
    with pytest.raises(ValueError, match=r"2 pieces.*first piece.*token id"):
        logit_lens(ad, TEXT, token=" Parisian")
    with pytest.raises(ValueError, match="0 pieces"):
        logit_lens(ad, TEXT, token="")
    with pytest.raises(ValueError, match="out of the vocabulary"):
        logit_lens(ad, TEXT, token=10**7)
    with pytest.raises(TypeError, match="bool"):
        logit_lens(ad, TEXT, token=True)
    with pytest.raises(ValueError, match="empty"):
        logit_lens(ad, "   ")
    with pytest.raises(TypeError, match="ONE text"):
        logit_lens(ad, ["a", "b"])
    with pytest.raises(ValueError, match="top_k"):
        logit_lens(ad, TEXT, top_k=0)
    bert = shared_tiny("bert")
    bare = ts.ModelAdapter(transformers.BertModel(bert.model.config).eval(), bert.tokenizer)
    with pytest.raises(ValueError, match="LM head"):
        logit_lens(bare, "hello")
    with pytest.raises(ValueError, match="encoder-decoder"):
        logit_lens(shared_tiny("t5"), "hello")
    with pytest.raises(ValueError, match="encoder"):
        logit_lens_stats(bert, ["hello world"], progress=False)
    with pytest.raises(ValueError, match="at least two tokens"):
        logit_lens_stats(ad, ["x", "y"], progress=False)
    with pytest.raises(ValueError, match="depths"):
        logit_lens_stats(ad, CORPUS, layers=[-4], progress=False)


def _stats_reference(ad, texts):
    """Per-layer means over every predicting position, float64, each text alone through HF (no streaming)."""
    L = ad.structure.num_layers
    acc = {d: torch.zeros(5, dtype=torch.float64) for d in range(L + 1)}
    n = 0
    for t in texts:
        ids = ad.encode(t).input_ids
        if len(ids) < 2:
            continue
        ref = _reference(ad, ids)
        y = ids[1:]
        n += len(y)
        lpL = ref[L][:-1]
        for d, lp in ref.items():
            lp = lp[:-1]
            top = lp.argmax(-1)
            p = lp.exp()
            acc[d] += torch.stack([
                -lp[torch.arange(len(y)), y].sum(), (top == y).double().sum(), (top == lpL.argmax(-1)).double().sum(),
                (lpL.exp() * (lpL - lp)).sum(), -(p * lp).sum(),
            ])
    return {d: v / n for d, v in acc.items()}, n


@pytest.fixture(scope="module")
def stats_ref(rn):
    ad = rn("llama")
    return ad, _stats_reference(ad, CORPUS)


@settings(max_examples=8, deadline=None)
@given(bs=st.integers(1, 6))
def test_streamed_stats_equal_the_all_at_once_reference(stats_ref, bs):
    ad, (ref, n) = stats_ref
    s = logit_lens_stats(ad, CORPUS, batch_size=bs, progress=False)
    assert s.kind == "logit_lens_stats" and s.layer.tolist() == [0, 1, 2] and (s.n_tokens == n).all()
    cols = ["nll", "top1_accuracy", "top1_agreement", "kl_to_final", "entropy"]
    got = torch.tensor(s[cols].to_numpy())
    want = torch.stack([ref[d] for d in s.layer])
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    assert float(s.top1_agreement.iloc[-1]) == 1.0 and float(s.kl_to_final.iloc[-1]) == 0.0


def test_stats_on_a_subset_of_layers_and_max_length(rn):
    ad = rn("gemma3")
    full = logit_lens_stats(ad, CORPUS, batch_size=2, progress=False)
    sub = logit_lens_stats(ad, CORPUS, layers=[1], batch_size=3, progress=False)
    assert sub.layer.tolist() == [1]
    torch.testing.assert_close(torch.tensor(sub.iloc[0, 1:6].to_numpy(dtype=float)),
                               torch.tensor(full[full.layer == 1].iloc[0, 1:6].to_numpy(dtype=float)), atol=1e-5, rtol=0)
    short = logit_lens_stats(ad, CORPUS, max_length=3, progress=False)
    assert int(short.n_tokens.iloc[0]) == sum(min(len(ad.encode(t).input_ids), 3) - 1 for t in CORPUS)


def test_plots_have_one_row_per_shown_layer(torch_one_thread):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    deep = ts.tiny("llama", n_layers=20)
    f = logit_lens(deep, "Hello there world")
    T = len(deep.encode("Hello there world").input_ids)
    try:
        ax = f.plot()
        arr = ax.images[0].get_array()
        assert arr.shape == (16, T) and len(ax.texts) == 16 * T
        assert [t.get_text() for t in ax.get_yticklabels()][:2] == ["0", "1"]
        assert ax.get_yticklabels()[-1].get_text() == "20"
        ax = f.plot(value="kl_to_final", max_rows=None, annotate=False)
        assert ax.images[0].get_array().shape == (21, T) and len(ax.texts) == 0
        assert float(ax.images[0].get_array()[-1].max()) == 0.0   # the last depth's KL to itself
        with pytest.raises(ValueError, match="not numeric"):
            f.plot(value="top_token")
        s = logit_lens_stats(deep, ["Hello there world", "another text here"], layers=[0, 10, 20], progress=False)
        ax = s.plot()
        lines = ax.get_lines() + [ln for other in ax.figure.axes if other is not ax for ln in other.get_lines()]
        assert len(lines) == 5 and all(len(ln.get_xdata()) == 3 for ln in lines)
        with pytest.raises(ValueError, match="statistics"):
            s.plot(columns=["n_tokens"])
    finally:
        plt.close("all")
