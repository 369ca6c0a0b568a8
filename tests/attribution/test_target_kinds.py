"""Class-label targets (sequence classifiers) and [MASK] targets (masked LMs): gradient methods against plain
autograd written here, IG completeness, occlusion against explicit forwards, validity, bad input."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

import tokensmith as ts
from tokensmith.attribution import AttributionMethod, MethodOutput, attribute, register_method
from tokensmith.attribution.targets import Label, MaskFill, prepare

EPS = 2.0**-23
TEXT = "this movie was great fun"
MASKED = "the capital of [MASK] is [MASK] ."
FILL = ["france", "paris"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread(torch_one_thread):
    yield


@pytest.fixture(scope="module")
def clf():
    """A tiny BERT sequence classifier (3 labels) on the tiny-bert config and tokenizer."""
    import transformers

    from tokensmith.models.tiny import tiny_model_and_tokenizer

    m, tok = tiny_model_and_tokenizer("bert")
    cfg = m.config
    cfg.num_labels = 3
    cfg.id2label = {0: "neg", 1: "neu", 2: "pos"}
    cfg.label2id = {v: k for k, v in cfg.id2label.items()}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        model = transformers.BertForSequenceClassification(cfg).eval()
        # a sharper head than the random init, so log-probs move measurably with the input
        model.classifier.weight.data.mul_(30)
    return ts.ModelAdapter(model, tok, name="tiny-bert-clf")


@pytest.fixture(scope="module")
def mlm():
    """A tiny BERT masked LM with a sharpened prediction head (log-probs spread over ~±5 nats instead of the
    random init's ~0.01), so attributions are far above fp32 rounding."""
    ad = ts.tiny("bert", seed=1)
    ad.model.cls.predictions.decoder.weight.data.mul_(30)
    return ad


def _tol(scale: float, depth: int = 2, width: int = 64, k: float = 4.0) -> float:
    """tests/README.md rule: safety · ε · √width · depth · scale (k: extra factor for a gradient, which
    runs the graph twice)."""
    return 4 * EPS * math.sqrt(width) * depth * max(scale, 1.0) * k


def _label_f(ad, ids: torch.Tensor, c: int):
    def f(e):
        return torch.log_softmax(ad.model(inputs_embeds=e).logits.double(), -1)[:, c]

    return f


def _mask_f(ad, ids: torch.Tensor, pos: list[int], want: list[int]):
    def f(e):
        lp = torch.log_softmax(ad.model(inputs_embeds=e).logits.double(), -1)
        return torch.stack([lp[:, p, w] for p, w in zip(pos, want, strict=True)], -1)

    return f


def _autograd(f, e: torch.Tensor, rows: int) -> torch.Tensor:
    """Plain autograd reference ``[R, L, d]``: one backward per row."""
    out = []
    for t in range(rows):
        x = e.detach().clone().requires_grad_(True)
        y = f(x)
        y = y if y.dim() == 1 else y[:, t]
        (g,) = torch.autograd.grad(y.sum(), x)
        out.append(g[0])
    return torch.stack(out)


# ---------------------------------------------------------------------------------------------- labels
def test_label_gradients_equal_plain_autograd(clf):
    ad = clf
    ids = ad.encode(TEXT).input_ids
    e = ad.embed(ids[None]).detach()
    G = _autograd(_label_f(ad, ids, 2), e, 1)
    src = ~ad.encode(TEXT).special_mask
    for method, ref in (("saliency", G.norm(dim=-1)), ("input_x_gradient", (G * e[0]).sum(-1))):
        r = attribute(ad, TEXT, target="pos", method=method)
        assert r.target_labels == ["pos"] and r.extra["target_kind"] == "label"
        want = torch.where(src, ref, torch.zeros_like(ref))
        scale = float(want.abs().max())
        torch.testing.assert_close(r.scores, want.float(), rtol=0, atol=_tol(1.0) * scale)
        # the other class has other gradients: the test can tell a wrong label
        assert (attribute(ad, TEXT, target=0, method=method).scores - r.scores).abs().max() > 100 * _tol(1.0) * scale
    # several labels are several rows of the same forwards
    both = attribute(ad, TEXT, target=Label(["neg", 2]), method="input_x_gradient")
    assert both.target_labels == ["neg", "pos"]
    torch.testing.assert_close(both.scores[1], r.scores[0], rtol=0, atol=_tol(1.0) * scale)


def test_label_ig_completeness(clf):
    r = attribute(clf, TEXT, target="pos", method="ig", n_steps=16, baseline=42)
    diff = float(r.target_scores[0] - r.baseline_scores[0])
    assert abs(diff) > 1e-3  # a measurable change to explain
    assert abs(float(r.delta[0])) < 0.01 * abs(diff)
    # f(x) is the classifier's own log-softmax
    with torch.no_grad():
        lp = torch.log_softmax(clf.model(clf.encode(TEXT).input_ids[None]).logits, -1)[0, 2]
    assert float(r.target_scores[0]) == pytest.approx(float(lp), abs=_tol(1.0, k=1))


@pytest.mark.parametrize("baseline", ["delete", "pad"])
def test_label_occlusion_equals_explicit_forwards(clf, baseline):
    ad = clf
    enc = ad.encode(TEXT)
    ids = enc.input_ids.tolist()
    r = attribute(ad, TEXT, target="pos", method="occlusion", baseline=baseline, batch_size=2)

    def f(seq):
        with torch.no_grad():
            return float(torch.log_softmax(ad.model(torch.tensor([seq])).logits.double(), -1)[0, 2])

    full = f(ids)
    for i in range(len(ids)):
        if not r.valid[0, i]:
            assert enc.special_mask[i]
            continue
        pert = ids[:i] + ids[i + 1:] if baseline == "delete" else ids[:i] + [ad.pad_token_id] + ids[i + 1:]
        assert float(r.scores[0, i]) == pytest.approx(full - f(pert), abs=2 * _tol(1.0, k=1))
    assert r.valid[0].sum() == (~enc.special_mask).sum()
    assert float(r.scores[0].abs().max()) > 100 * _tol(1.0, k=1)


# ---------------------------------------------------------------------------------------------- [MASK]
def test_mask_gradients_equal_plain_autograd(mlm):
    ad = mlm
    p = prepare(ad, MASKED, FILL)
    pos, want = p.target_positions.tolist(), p.row_ids.tolist()
    assert p.kind == "mask" and [ad.tokenizer.convert_ids_to_tokens(w) for w in want] == FILL
    e = ad.embed(p.ids[None]).detach()
    G = _autograd(_mask_f(ad, p.ids, pos, want), e, 2)
    for method, ref in (("saliency", G.norm(dim=-1)), ("input_x_gradient", (G * e[0]).sum(-1))):
        r = attribute(ad, MASKED, target=FILL, method=method)
        want_s = torch.where(r.valid, ref, torch.zeros_like(ref)).float()
        scale = float(want_s.abs().max())
        torch.testing.assert_close(r.scores, want_s, rtol=0, atol=_tol(1.0) * scale)
        # the two rows differ (a row scored at the wrong mask would be caught)
        assert (r.scores[0] - r.scores[1]).abs().max() > 100 * _tol(1.0) * scale
    # the rows score log p(token at its mask): against the full MLM logits
    with torch.no_grad():
        lp = torch.log_softmax(ad.model(p.ids[None]).logits, -1)[0]
    full = p.full_scores()
    assert full.tolist() == pytest.approx([float(lp[q, w]) for q, w in zip(pos, want, strict=True)], abs=_tol(30.0, k=1))


def test_mask_ig_completeness_and_validity(mlm):
    ad = mlm
    r = attribute(ad, MASKED, target=MaskFill(FILL), method="ig", n_steps=16, baseline=42)
    diff = (r.target_scores - r.baseline_scores).abs()
    assert (diff > 1e-3).all()
    assert ((r.delta.abs() / diff) < 0.01).all()
    # the masks are special tokens: not sources; with include_template a mask is a source for the other row
    # but never for its own
    r2 = attribute(ad, MASKED, target=FILL, method="saliency", include_template=True)
    p0, p1 = r2.target_positions.tolist()
    assert not r2.valid[0, p0] and r2.valid[0, p1] and r2.valid[1, p0] and not r2.valid[1, p1]
    assert r2.valid[0, 0]  # [CLS] is a source when asked


@pytest.mark.parametrize("baseline", ["delete", "mask"])
def test_mask_occlusion_equals_explicit_forwards(mlm, baseline):
    ad = mlm
    p = prepare(ad, MASKED, FILL)
    ids, pos, want = p.ids.tolist(), p.target_positions.tolist(), p.row_ids.tolist()
    r = attribute(ad, MASKED, target=FILL, method="occlusion", baseline=baseline)
    mask_id = ad.tokenizer.mask_token_id

    def f(seq, positions):
        with torch.no_grad():
            lp = torch.log_softmax(ad.model(torch.tensor([seq])).logits.double(), -1)[0]
        return [float(lp[q, w]) for q, w in zip(positions, want, strict=True)]

    full = f(ids, pos)
    for i in range(len(ids)):
        if not r.valid[:, i].any():
            continue
        if baseline == "delete":
            seq, shifted = ids[:i] + ids[i + 1:], [q - (q > i) for q in pos]
        else:
            seq, shifted = ids[:i] + [mask_id] + ids[i + 1:], pos
        ref = [a - b for a, b in zip(full, f(seq, shifted), strict=True)]
        assert r.scores[:, i].tolist() == pytest.approx(ref, abs=2 * _tol(30.0, k=1))
    assert float(r.scores.abs().max()) > 100 * _tol(30.0, k=1)


def test_explicit_mask_positions_equal_a_written_mask(mlm):
    ad = mlm
    enc = ad.encode("the capital of france is paris .")
    i = enc.tokens.index("paris")
    a = attribute(ad, enc, target=MaskFill(["paris"], positions=[i]), method="input_x_gradient")
    b = attribute(ad, "the capital of france is [MASK] .", target="paris", method="input_x_gradient")
    assert a.ids.tolist() == b.ids.tolist() and a.tokens[i] == "[MASK]" and a.special[i]
    torch.testing.assert_close(a.scores, b.scores, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------- bad input
def test_bad_label_and_mask_targets_raise(clf, shared_tiny):
    mlm, llama = shared_tiny("bert"), shared_tiny("llama")
    with pytest.raises(ValueError, match="label 5 is out of range.*3 labels"):
        attribute(clf, TEXT, target=5, method="saliency")
    with pytest.raises(ValueError, match="'great' is not a label.*neg"):
        attribute(clf, TEXT, target="great", method="saliency")
    with pytest.raises(TypeError, match="class index or a name"):
        attribute(clf, TEXT, target=Label(2.5), method="saliency")
    with pytest.raises(ValueError, match="needs a sequence classifier.*BertForMaskedLM"):
        attribute(mlm, TEXT, target=Label(0), method="saliency")
    with pytest.raises(ValueError, match="needs a sequence classifier"):
        attribute(llama, TEXT, target=Label("pos"), method="saliency")
    with pytest.raises(ValueError, match="cannot score tokens.*no mask token '\\[MASK\\]'"):
        attribute(mlm, "the capital of france is paris .", target="paris", method="saliency")
    with pytest.raises(ValueError, match="1 token\\(s\\) for 2 mask position"):
        attribute(mlm, MASKED, target="paris", method="saliency")
    with pytest.raises(ValueError, match="each mask scores exactly one token"):
        attribute(mlm, MASKED, target=["france", "new york"], method="saliency")
    with pytest.raises(ValueError, match="mask positions must be"):
        attribute(mlm, TEXT, target=MaskFill("x", positions=[99]), method="saliency")
    with pytest.raises(ValueError, match="needs a masked LM"):
        attribute(llama, TEXT, target=MaskFill(" x"), method="saliency")
    with pytest.raises(ValueError, match="inputs is empty"):
        attribute(clf, "  ", target=1, method="saliency")


def test_methods_that_cannot_take_the_kinds_say_so(clf, shared_tiny):
    with pytest.raises(ValueError, match="does not take a label target"):
        attribute(clf, TEXT, target="pos", method="layer_integrated_gradients", n_steps=2)

    @register_method("test_tokens_only")
    @dataclass
    class TokensOnly(AttributionMethod):
        targets = ("tokens",)

        def attribute_batch(self, problem):  # pragma: no cover - never reached
            return MethodOutput(problem.valid().float())

    with pytest.raises(ValueError, match="does not take a mask target"):
        attribute(shared_tiny("bert"), MASKED, target=FILL, method="test_tokens_only")


def test_evaluate_rebuilds_label_and_mask_problems_from_the_result(clf, mlm):
    from tokensmith.attribution import evaluate

    for ad, text, target in ((clf, "this movie was great fun", "pos"), (mlm, MASKED, FILL)):
        r = attribute(ad, text, target=target, method="occlusion", baseline="mask")
        m = evaluate(ad, r, ["comprehensiveness"], fractions=[1.0], baseline="mask")
        # removing every valid source at once: comprehensiveness = p(x) − p(x with all sources masked)
        p = prepare(ad, text, target)
        ids = p.ids.clone()
        mask_id = ad.tokenizer.mask_token_id
        full = p.full_scores().double().exp()
        for t in range(p.n_rows):
            x = ids.clone()
            x[r.valid[t]] = mask_id
            alt = p.score_ids([x.tolist()]).double().exp()[0, t]
            assert m["per_row"]["comprehensiveness"][t] == pytest.approx(float(full[t] - alt), abs=1e-5)
