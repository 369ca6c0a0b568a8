"""tokensmith.analysis.frequency: loss by token frequency (ANA-3) against independent float64 computations."""

from __future__ import annotations

import copy
import gc
import json
import math
import weakref

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tokensmith as ts
from tokensmith.analysis.frames import make_frame
from tokensmith.analysis.frequency import frequency_bias, merge_order_frequencies, token_loss_by_frequency

pytestmark = pytest.mark.usefixtures("torch_one_thread")

EPS32 = torch.finfo(torch.float32).eps
TEXTS = [
    "the cat sat on the mat and the dog sat on the log",
    "a cat and a dog and a bird",
    "The quick brown fox jumps over the lazy dog.",
    "Numbers like 12 and 345 appear, too!",
    "the end",
]


def _reference(ad, texts):
    """Per scored token (id, loss) from the HF model's full logits, unbatched, in float64."""
    m = copy.deepcopy(ad.model).double()
    ids_all, losses = [], []
    with torch.no_grad():
        for t in texts:
            ids = ad.encode(t).input_ids
            logits = m(input_ids=ids[None]).logits[0]
            lp = torch.log_softmax(logits, -1)
            tgt = ids[1:]
            losses.append(-lp[:-1].gather(1, tgt[:, None]).squeeze(1))
            ids_all.append(tgt)
    scale = float(logits.abs().max())
    return torch.cat(ids_all), torch.cat(losses), scale


def _atol(ad, scale):
    """fp32 against float64 log-probs: logits' error through L layers of width d plus the log-sum-exp over V."""
    s = ad.structure
    return 4 * EPS32 * (math.sqrt(s.hidden_size) * (s.num_layers + 1) * max(scale, 1.0) + math.sqrt(s.vocab_size))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_buckets_partition_and_match_float64_reference(shared_tiny, arch):
    ad = shared_tiny(arch)
    f = token_loss_by_frequency(ad, TEXTS, n_buckets=3, batch_size=2, progress=False)
    tgt, loss, scale = _reference(ad, TEXTS)
    b = f.meta["bucket_of"][tgt]
    # a partition of the scored tokens: each one in exactly one bucket of [0, n)
    assert f.meta["n_tokens"] == tgt.numel() == int(f.n_tokens.sum())
    assert bool(((b >= 0) & (b < 3)).all())
    assert f.n_tokens.tolist() == [int((b == j).sum()) for j in range(3)]
    assert f.n_types.tolist() == [len(set(tgt[b == j].tolist())) for j in range(3)]
    # corpus frequencies are the counts of the predicted tokens; each bucket's mass is within the largest
    # group mass (types of equal count stay together) of M/n
    counts = torch.bincount(tgt, minlength=ad.structure.vocab_size).double()
    assert torch.equal(f.meta["freq"], counts)
    c, k = torch.unique(counts[counts > 0], return_counts=True)
    assert (f.n_tokens - tgt.numel() / 3).abs().max() <= float((c * k).max())
    lo = [float(counts[tgt[b == j]].min()) for j in range(3)]
    hi = [float(counts[tgt[b == j]].max()) for j in range(3)]
    assert f.freq_lo.tolist() == lo and f.freq_hi.tolist() == hi
    assert lo[1] >= hi[0] and lo[2] >= hi[1]  # bucket 0 the rarest
    # per-bucket mean and standard error from the float64 full-logit computation
    mean = np.array([float(loss[b == j].mean()) for j in range(3)])
    sem = np.array([float(loss[b == j].std(unbiased=True)) / math.sqrt(int((b == j).sum())) for j in range(3)])
    atol = _atol(ad, scale)
    np.testing.assert_allclose(f.mean_loss.to_numpy(), mean, rtol=0, atol=atol)
    np.testing.assert_allclose(f["sem"].to_numpy(), sem, rtol=1e-3, atol=atol)


_UNBATCHED: dict[str, object] = {}


@settings(max_examples=4, deadline=None)
@given(bs=st.integers(2, 5))
def test_left_padded_batches_equal_unbatched(shared_tiny, bs):
    ad = shared_tiny("llama")
    if "llama" not in _UNBATCHED:
        _UNBATCHED["llama"] = token_loss_by_frequency(ad, TEXTS, n_buckets=3, batch_size=1, progress=False)
    one = _UNBATCHED["llama"]
    f = token_loss_by_frequency(ad, TEXTS, n_buckets=3, batch_size=bs, progress=False)
    assert f.n_tokens.tolist() == one.n_tokens.tolist()
    np.testing.assert_allclose(f.mean_loss, one.mean_loss, rtol=0, atol=_atol(ad, 1.0))
    np.testing.assert_allclose(f["sem"], one["sem"], rtol=1e-4, atol=1e-6)


def test_two_copies_identical_and_user_counts_equal_corpus(shared_tiny):
    ad = shared_tiny("llama")
    f = token_loss_by_frequency([ad, ad], TEXTS, n_buckets=3, progress=False)
    assert f.meta["models"] == ["tiny-llama", "tiny-llama_2"]
    a, b = (f[f.model == m].drop(columns="model").reset_index(drop=True) for m in f.meta["models"])
    assert a.equals(b)
    # giving the corpus' own counts as a tensor is the same as frequencies="corpus"
    g = token_loss_by_frequency(ad, TEXTS, n_buckets=3, frequencies=f.meta["freq"].numpy(), progress=False)
    assert g.meta["frequencies"] == "user"
    assert g.drop(columns="model").equals(a)


def test_dict_of_models_lazy_loaded_and_released(shared_tiny, tmp_path):
    llama = shared_tiny("llama")
    gpt2 = shared_tiny("gpt2")
    gpt2.model.save_pretrained(tmp_path)
    gpt2.tokenizer.save_pretrained(tmp_path)
    refs = []

    def loader():
        ad = ts.tiny("qwen2")
        refs.append(weakref.ref(ad.model))
        return ad

    f = token_loss_by_frequency({"llama": llama, "qwen": loader, "ckpt": str(tmp_path)}, TEXTS, n_buckets=3,
                                progress=False)
    gc.collect()
    assert refs and refs[0]() is None  # the loaded model was released
    assert f.meta["models"] == ["llama", "qwen", "ckpt"]
    for name, ad in [("qwen", shared_tiny("qwen2")), ("ckpt", gpt2)]:  # (the eager path: tested above)
        alone = token_loss_by_frequency(ad, TEXTS, n_buckets=3, progress=False)
        got = f[f.model == name].reset_index(drop=True)
        assert got.n_tokens.tolist() == alone.n_tokens.tolist()
        np.testing.assert_allclose(got.mean_loss, alone.mean_loss, rtol=0, atol=_atol(ad, 1.0))
    # different models, different losses (the comparison can fail)
    assert not np.allclose(f[f.model == "llama"].mean_loss, f[f.model == "qwen"].mean_loss, atol=1e-3)


def test_mismatched_tokenizers_and_encoder_raise(shared_tiny):
    llama, bert = shared_tiny("llama"), shared_tiny("bert")
    with pytest.raises(ValueError, match=r"'tiny-llama' and 'tiny-bert' have different tokenizers"):
        token_loss_by_frequency([llama, bert], TEXTS, n_buckets=2, progress=False)
    with pytest.raises(ValueError, match=r"'a' and 'b' have different tokenizers"):
        token_loss_by_frequency({"a": llama, "b": lambda: bert}, TEXTS, n_buckets=2, progress=False)
    with pytest.raises(ValueError, match="encoder"):
        token_loss_by_frequency(bert, TEXTS, n_buckets=2, progress=False)


def test_merge_order_is_monotone_in_merge_rank(shared_tiny):
    ad = shared_tiny("llama")
    model = json.loads(ad.tokenizer.backend_tokenizer.to_str())["model"]
    vocab, merges = model["vocab"], model["merges"]
    merged = [vocab["".join(m) if isinstance(m, list) else m.replace(" ", "")] for m in merges]
    f = merge_order_frequencies(ad.tokenizer)
    # earlier merge -> strictly higher frequency; base alphabet above every merge; special tokens below
    fm = f[merged]
    assert bool((fm[:-1] > fm[1:]).all())
    base = vocab["t"]
    special = ad.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert f[base] > fm[0] and f[special] < fm[-1]
    rank = torch.full((f.numel(),), -1.0, dtype=torch.float64)
    rank[merged] = torch.arange(len(merged), dtype=torch.float64)
    for scheme in ("log_bins", "equal_mass"):
        fr = token_loss_by_frequency(ad, TEXTS, n_buckets=3, frequencies="merge_order", scheme=scheme,
                                     progress=False)
        assert fr.meta["frequencies"] == "merge_order" and int(fr.n_tokens.sum()) == fr.meta["n_tokens"]
        b = fr.meta["bucket_of"][merged]
        assert bool((b[:-1] >= b[1:]).all())  # bucket (0 = rarest) non-increasing in merge rank
        assert b[0] > b[-1]
    with pytest.raises(ValueError, match="WordPiece.*frequencies='corpus'"):
        merge_order_frequencies(shared_tiny("bert").tokenizer)


def test_too_small_corpus_and_bad_inputs(shared_tiny):
    ad = shared_tiny("llama")
    with pytest.raises(ValueError, match="1 distinct predicted token type.*fewer than n_buckets=3"):
        token_loss_by_frequency(ad, "the the the", n_buckets=3, progress=False)
    skewed = "a b c" + " the" * 9  # predicted: b, c once, 'the' 9 times: it holds > 1/3 of the mass
    with pytest.raises(ValueError, match=r"equal-mass bucket\(s\) \[2\] of 3 hold no token.*fewer n_buckets"):
        token_loss_by_frequency(ad, skewed, n_buckets=3, progress=False)
    f = token_loss_by_frequency(ad, skewed, n_buckets=3, scheme="log_bins", progress=False)
    assert f.n_tokens.tolist() == [2, 0, 9] and math.isnan(f.mean_loss[1])
    np.testing.assert_allclose([f.freq_lo[0], f.freq_hi[2]], [1.0, 9.0])
    np.testing.assert_allclose(f.freq_hi[0], 9 ** (1 / 3))  # equal width in log frequency
    for kw, err in [({"n_buckets": 0}, "n_buckets"), ({"scheme": "quantile"}, "scheme"),
                    ({"frequencies": "zipf"}, "frequencies must be"),
                    ({"frequencies": torch.ones(7)}, "one count per vocabulary entry"),
                    ({"frequencies": torch.zeros(ad.structure.vocab_size), "scheme": "log_bins"}, "pseudocount")]:
        with pytest.raises(ValueError, match=err):
            token_loss_by_frequency(ad, TEXTS, progress=False, **{"n_buckets": 2, **kw})
    with pytest.raises(TypeError, match="models must be"):
        token_loss_by_frequency(42, TEXTS, progress=False)


def test_frequency_bias_equals_weighted_polyfit():
    rows, rng = [], np.random.default_rng(0)
    for model, slope in [("m1", -0.7), ("m2", 0.2)]:
        for j, (lo, hi, n) in enumerate([(1, 2, 40), (2, 9, 25), (9, 50, 10), (50, 400, 0), (400, 5e3, 7)]):
            y = 6.0 + slope * 0.5 * (math.log(lo) + math.log(hi)) + rng.normal(0, 0.3)
            rows.append({"model": model, "bucket": j, "freq_lo": lo, "freq_hi": hi, "n_types": 1, "n_tokens": n,
                         "mean_loss": y if n else math.nan, "sem": 0.1})
    frame = make_frame(rows, "loss_by_frequency")
    out = frequency_bias(frame)
    assert out.kind == "frequency_bias" and out.model.tolist() == ["m1", "m2"]
    for model, r in zip(["m1", "m2"], out.itertuples(), strict=True):
        g = frame[(frame.model == model) & (frame.n_tokens > 0)]
        x = 0.5 * (np.log(g.freq_lo) + np.log(g.freq_hi))
        p = np.polyfit(x, g.mean_loss, 1, w=np.sqrt(g.n_tokens))
        np.testing.assert_allclose([r.slope, r.intercept], p, rtol=1e-10)
        assert r.rare_token_gap == pytest.approx(g.mean_loss.iloc[0] - g.mean_loss.iloc[-1], rel=1e-12)
        assert r.n_buckets == 4 and r.n_tokens == 82
    # a bucket of user-count zeros has no log midpoint: left out of the slope, kept as the rarest for the gap
    z = frame.copy()
    z.loc[0, "freq_lo"] = 0.0
    zb = frequency_bias(z).iloc[0]
    g = frame[(frame.model == "m1") & (frame.n_tokens > 0)].iloc[1:]
    p = np.polyfit(0.5 * (np.log(g.freq_lo) + np.log(g.freq_hi)), g.mean_loss, 1, w=np.sqrt(g.n_tokens))
    assert zb.slope == pytest.approx(p[0], rel=1e-10) and zb.rare_loss == frame.mean_loss[0]
    with pytest.raises(ValueError, match="missing columns"):
        frequency_bias(make_frame([{"model": "a"}], "x"))


def test_plot(shared_tiny):
    f = token_loss_by_frequency(shared_tiny("llama"), TEXTS, n_buckets=3, progress=False)
    ax = f.plot()
    assert len(ax.lines) + len(ax.containers) >= 1 and ax.get_xscale() == "log"
    import matplotlib.pyplot as plt

    plt.close("all")
