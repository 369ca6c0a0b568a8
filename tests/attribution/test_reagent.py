"""ReAGent: the update rule by hand, replacement invariants, offset alignment, determinism and errors."""

from __future__ import annotations

import math

import pytest
import torch

import tokensmith as ts
import tokensmith.attribution.reagent as rg
from tokensmith.attribution import attribute, prepare
from tokensmith.models.tiny import tiny_model_and_tokenizer

PROMPT, TARGET = "The capital of France is", " Paris is nice"


@pytest.fixture(autouse=True, scope="module")
def _one_thread(torch_one_thread):
    yield


@pytest.fixture(scope="module")
def mlm(shared_tiny):
    return shared_tiny("bert")


def test_update_rule_matches_a_hand_computation():
    ctx = torch.tensor([[True, True, True, False], [True, True, False, False]])
    logits = torch.zeros(2, 4, dtype=torch.float64)
    # iteration 1: R = {0}, Δ = (0.5, NaN): row 0 gets ±log 3, row 1 (its token was replaced) is unchanged
    logits = rg.reagent_update(logits, torch.tensor([0.5, float("nan")]), torch.tensor([True, False, False, False]),
                               ctx)
    l3 = math.log(3)
    torch.testing.assert_close(logits, torch.tensor([[l3, -l3, -l3, 0], [0, 0, 0, 0]], dtype=torch.float64))
    # iteration 2: R = {1, 3}, Δ = (−0.2, 0.6): logit(0.4) = −log 1.5 on R, logit(0.6) = log 1.5 off R; row 1:
    # logit(0.8) = log 4 on R, logit(0.2) = −log 4 off R; positions outside the context never move
    logits = rg.reagent_update(logits, torch.tensor([-0.2, 0.6]), torch.tensor([False, True, False, True]), ctx)
    l15, l4 = math.log(1.5), math.log(4)
    want = torch.tensor([[l3 + l15, -l3 - l15, -l3 + l15, 0], [-l4, l4, 0, 0]], dtype=torch.float64)
    torch.testing.assert_close(logits, want)
    s = rg.reagent_scores(logits, ctx)
    e = [math.exp(v) for v in want[0, :3].tolist()]
    torch.testing.assert_close(s[0], torch.tensor([v / sum(e) for v in e] + [0.0], dtype=torch.float64))
    torch.testing.assert_close(s[1], torch.tensor([1 / 17, 16 / 17, 0, 0], dtype=torch.float64))


def test_offset_alignment_on_a_toy():
    # model: "The| capital| ofFrance|\n"   mlm: [CLS] the cap ##ital of france [SEP]
    model = [(0, 3), (3, 11), (11, 20), (20, 21)]
    mlm = [(0, 0), (0, 3), (4, 7), (7, 11), (12, 14), (14, 20), (0, 0)]
    assert rg.align_offsets(model, mlm) == [[1], [2, 3], [4, 5], []]
    # MLM specials never align, even with a span
    assert rg.align_offsets([(0, 3)], [(0, 3)], [True]) == [[]]


def test_replacement_keeps_length_and_never_touches_template_tokens(shared_tiny, mlm):
    ad = shared_tiny("llama")
    p = prepare(ad, "What is the capital of France?", target="Paris.", chat=True)
    rep = rg.MLMReplacer(p, mlm)
    assert not rep.shared_vocab
    ids = p.ids.tolist()
    src = p.sources.tolist()
    assert rep.replaceable.tolist() == [s and bool(a) for s, a in zip(src, rep.align, strict=True)]
    assert not rep.replaceable[~p.sources].any()
    pos = torch.nonzero(rep.replaceable).flatten().tolist()
    # " capital" (offsets include its space) aligns to the MLM token "capital" and keeps the space
    cap = next(i for i in pos if p.encoded.tokens[i] == "Ġcapital")
    assert [mlm.tokenizer.convert_ids_to_tokens(j) for j in [rep.mlm_ids[k] for k in rep.align[cap]]] == ["capital"]
    assert rep.prefix[cap] == " "
    (new,) = rep.fill([pos])
    assert len(new) == len(ids)
    assert all(new[i] == ids[i] for i in range(len(ids)) if i not in pos)
    special = set(ad.tokenizer.all_special_ids)
    assert all(new[i] not in special for i in pos)
    assert sum(new[i] != ids[i] for i in pos) >= len(pos) - 1
    # a word-start replacement keeps the leading space of the model token it replaces
    assert ad.tokenizer.decode([new[cap]]).startswith(" ")


def test_reagent_runs_seeded_and_sums_to_one(shared_tiny, mlm):
    ad = shared_tiny("llama")
    kw = dict(method="reagent", replacer=mlm, n_iters=16, delta="logprob")
    r = attribute(ad, PROMPT, target=TARGET, seed=1, **kw)
    torch.testing.assert_close(r.scores.sum(-1), torch.ones(r.shape[0]), atol=1e-5, rtol=0)
    assert (r.scores >= 0).all() and r.valid.sum(-1).tolist() == [5, 6, 7]
    assert not torch.allclose(r.scores[0, :5], torch.full((5,), 0.2), atol=1e-4)  # the scores moved
    again = attribute(ad, PROMPT, target=TARGET, seed=1, **kw)
    assert torch.equal(r.scores, again.scores) and r.seed == 1 and r.config["replacer"] == mlm.name
    other = attribute(ad, PROMPT, target=TARGET, seed=2, **kw)
    assert not torch.equal(r.scores, other.scores)
    # the paper's Δp also runs (on a random model p(y) is tiny, so the scores stay near uniform)
    p = attribute(ad, PROMPT, target=TARGET, method="reagent", replacer=mlm, n_iters=8)
    assert p.extra["iterations"] == [8, 8, 8] and p.extra["stopped"] == [False] * 3


def test_blocks_do_not_change_the_scores_and_the_stop_test_stops(shared_tiny, mlm):
    ad = shared_tiny("llama")
    kw = dict(method="reagent", replacer=mlm, n_iters=8, delta="logprob", stop_topk=None)
    a = attribute(ad, PROMPT, target=TARGET, block_size=1, **kw)
    b = attribute(ad, PROMPT, target=TARGET, block_size=8, batch_size=3, **kw)
    torch.testing.assert_close(a.scores, b.scores, atol=1e-5, rtol=0)
    # every target is in the top-|V|: each row stops after its first block
    V = ad.structure.vocab_size
    s = attribute(ad, PROMPT, target=TARGET, method="reagent", replacer=mlm, n_iters=32, block_size=4, stop_topk=V)
    assert s.extra["iterations"] == [4, 4, 4] and all(s.extra["stopped"])


def test_reagent_on_a_chat_input(shared_tiny, mlm):
    ad = shared_tiny("llama")
    r = attribute(ad, "What is the capital of France?", target="Paris.", chat=True, method="reagent",
                  replacer=mlm, n_iters=8, delta="logprob")
    cols = torch.nonzero(r.valid.any(0)).flatten().tolist()
    assert cols and all(r.segments[i] in ("prompt", "target") for i in cols)
    assert not r.valid[:, r.special].any()
    torch.testing.assert_close(r.scores.sum(-1), torch.ones(r.shape[0]), atol=1e-5, rtol=0)


def test_shared_vocabulary_uses_ids_directly(shared_tiny, mlm):
    enc_model = shared_tiny("bert", seed=1)  # a masked LM attributed through a callable target

    def fn(out, problem):
        return out.logits[:, 1].log_softmax(-1)[:, 2000]

    r = attribute(enc_model, "the cat sat on the mat", target=fn, method="reagent", replacer=mlm, n_iters=8)
    assert r.extra["shared_vocab"] and r.extra["stopped"] == [False]
    torch.testing.assert_close(r.scores.sum(-1), torch.ones(1), atol=1e-5, rtol=0)
    p = prepare(enc_model, "the cat sat on the mat", target=fn)
    rep = rg.MLMReplacer(p, mlm)
    pos = torch.nonzero(p.sources).flatten().tolist()
    (new,) = rep.fill([pos])
    ids = p.ids.tolist()
    assert len(new) == len(ids) and new[0] == ids[0] and new[-1] == ids[-1]  # [CLS], [SEP] kept


def test_errors_without_a_masked_lm(shared_tiny):
    ad = shared_tiny("llama")
    with pytest.raises(ValueError, match=r"replacer=ts\.load"):
        attribute(ad, PROMPT, target=TARGET, method="reagent")
    with pytest.raises(ValueError, match="not a masked LM: it is a causal LM"):
        attribute(ad, PROMPT, target=TARGET, method="reagent", replacer=ad)
    model, tok = tiny_model_and_tokenizer("bert")
    bare = ts.ModelAdapter(model.bert, tok)  # the encoder without its MLM head
    with pytest.raises(ValueError, match="no MLM head"):
        attribute(ad, PROMPT, target=TARGET, method="reagent", replacer=bare)
    with pytest.raises(TypeError, match="ModelAdapter"):
        attribute(ad, PROMPT, target=TARGET, method="reagent", replacer="roberta-base")
    with pytest.raises(ValueError, match="replace_ratio"):
        attribute(ad, PROMPT, target=TARGET, method="reagent", replacer=shared_tiny("bert"), replace_ratio=1.5)
