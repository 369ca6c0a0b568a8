"""Per-token next-token features: ΣNLL equals HF's loss × tokens, the features equal a float64 reimplementation
from the model's logits, batched equals unbatched, and Dataset columns are carried over."""

from __future__ import annotations

import datasets
import pytest
import torch

from tokensmith.analysis.features import next_token_features

CAUSAL = ["gpt2", "llama", "qwen2", "gemma3", "gpt_neox"]
TEXTS = ["The capital of France is Paris.", "Hi", "A somewhat longer sentence, with a comma and more words in it.",
         "x", "1 2 3 4 5"]


@pytest.fixture(scope="module")
def rn(torch_one_thread, random_norm_tiny_factory):
    return lambda arch: random_norm_tiny_factory(arch, seed=4, norm_seed=2)


@pytest.mark.parametrize("arch", CAUSAL)
def test_sum_of_nll_is_hf_loss_times_tokens_and_features_match_float64(arch, rn):
    ad = rn(arch)
    ds = next_token_features(ad, TEXTS, batch_size=3, progress=False)
    assert ds.num_rows == len(TEXTS) and ds["text_index"] == list(range(len(TEXTS)))
    for i, t in enumerate(TEXTS):
        ids = ad.encode(t).input_ids
        row = ds[i]
        assert row["input_ids"] == ids.tolist() and row["n_predicted"] == len(ids) - 1
        assert all(len(row[c]) == len(ids) - 1 for c in ("logprob", "entropy", "rank", "max_prob"))
        if len(ids) < 2:
            continue
        with torch.no_grad():
            out = ad.model(input_ids=ids[None], labels=ids[None])
        nll = -torch.tensor(row["logprob"], dtype=torch.float64).sum()
        assert abs(float(nll) - float(out.loss) * (len(ids) - 1)) <= 1e-5 * (len(ids) - 1)
        lp = torch.log_softmax(out.logits[0, :-1].double(), -1)
        y = ids[1:]
        tl = lp[torch.arange(len(y)), y]
        torch.testing.assert_close(torch.tensor(row["logprob"], dtype=torch.float64), tl, atol=1e-5, rtol=0)
        p = lp.exp()
        torch.testing.assert_close(torch.tensor(row["entropy"], dtype=torch.float64), -(p * lp).sum(-1),
                                   atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(torch.tensor(row["max_prob"], dtype=torch.float64), p.max(-1).values,
                                   atol=1e-7, rtol=1e-4)
        rank = torch.tensor(row["rank"])
        assert ((lp > tl[:, None] + 5e-6).sum(-1) <= rank).all() and (rank <= (lp > tl[:, None] - 5e-6).sum(-1)).all()


def test_batched_equals_unbatched_and_per_token_equals_per_text(rn):
    ad = rn("llama")
    one = next_token_features(ad, TEXTS, batch_size=1, progress=False)
    many = next_token_features(ad, TEXTS, batch_size=4, progress=False)
    for c in ("logprob", "entropy", "max_prob"):
        a = torch.tensor([v for r in one[c] for v in r])
        b = torch.tensor([v for r in many[c] for v in r])
        torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-5)
    assert one["input_ids"] == many["input_ids"]
    tok = next_token_features(ad, TEXTS, batch_size=4, per="token", progress=False)
    assert tok.num_rows == sum(many["n_predicted"])
    k = 0
    for i, r in enumerate(many):
        for j in range(r["n_predicted"]):
            row = tok[k]
            assert (row["text_index"], row["position"], row["token_id"]) == (i, j + 1, r["input_ids"][j + 1])
            assert row["logprob"] == r["logprob"][j] and row["rank"] == r["rank"][j]
            k += 1
    short = next_token_features(ad, TEXTS, max_length=3, progress=False)
    assert short["n_predicted"] == [min(len(x), 3) - 1 for x in many["input_ids"]]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_hidden_is_the_final_normed_last_layer_state(arch, rn):
    ad = rn(arch)
    ds = next_token_features(ad, TEXTS[:3], batch_size=2, hidden=True, progress=False)
    tok = next_token_features(ad, TEXTS[:3], batch_size=3, hidden=True, per="token", progress=False)
    for i, t in enumerate(TEXTS[:3]):
        ids = ad.encode(t).input_ids
        with torch.no_grad():
            hs = ad.model(input_ids=ids[None], output_hidden_states=True).hidden_states[-1][0]  # final-normed
        got = torch.tensor(ds[i]["hidden"]).reshape(-1, ad.structure.hidden_size)  # "Hi": one token, no rows
        assert got.shape == (len(ids) - 1, ad.structure.hidden_size)
        torch.testing.assert_close(got, hs[:-1], atol=1e-5, rtol=1e-5)
    d = ad.structure.hidden_size
    torch.testing.assert_close(torch.tensor(tok["hidden"]),
                               torch.cat([torch.tensor(h).reshape(-1, d) for h in ds["hidden"]]), atol=1e-5, rtol=1e-5)


def test_dataset_columns_are_carried_over(shared_tiny, torch_one_thread):
    ad = shared_tiny("llama")
    data = datasets.Dataset.from_dict({"body": TEXTS[:3], "label": [1, 0, 1]})
    ds = next_token_features(ad, data, column="body", progress=False)
    assert ds.column_names[:2] == ["body", "label"] and ds["label"] == [1, 0, 1] and ds["body"] == TEXTS[:3]
    tok = next_token_features(ad, data, column="body", per="token", progress=False)
    assert "body" not in tok.column_names
    assert tok["label"] == [lab for lab, n in zip([1, 0, 1], ds["n_predicted"], strict=True) for _ in range(n)]


def test_bad_inputs(shared_tiny, torch_one_thread):
    ad = shared_tiny("llama")
    with pytest.raises(ValueError, match="per must be"):
        next_token_features(ad, TEXTS, per="word", progress=False)
    with pytest.raises(ValueError, match="empty"):
        next_token_features(ad, ["ok", ""], progress=False)
    with pytest.raises(ValueError, match="no column"):
        next_token_features(ad, datasets.Dataset.from_dict({"x": ["a"]}), progress=False)
    with pytest.raises(ValueError, match="encoder"):
        next_token_features(shared_tiny("bert"), TEXTS, progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        next_token_features(ad, TEXTS, batch_size=0, progress=False)
