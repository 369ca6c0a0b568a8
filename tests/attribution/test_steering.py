"""GrAInS steering (ATT-13): the vectors against an explicit reference, renormalised steering, the sign
convention on a toy, serialisation and bad input."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from tokensmith.attribution import Contrast, attribute
from tokensmith.attribution.steering import (
    SteeringVectors,
    grains_differences,
    grains_directions,
    grains_fit,
)

pytestmark = pytest.mark.usefixtures("torch_one_thread")

PROMPTS = [
    "The movie was really",
    "I think the food is very",
    "Honestly the weather today is",
    "My new phone feels",
    "That concert last night was",
    "The service at this hotel is",
]
GOOD, BAD = " good", " bad"
IG = {"n_steps": 4, "baseline": 42}  # a token-id baseline: tiny models' pad row is zero


def _examples(n):
    return [(p, GOOD, BAD) for p in PROMPTS[:n]]


def _last_state(ad, ids, layers):
    """Hidden states [n_layers, d] after each layer at the last token of one unpadded sequence."""
    names = [f"layers.{i}.resid_post" for i in layers]
    with torch.no_grad(), ad.hooks(cache=names) as h:
        ad.forward(torch.tensor([ids]))
    return torch.stack([h.cache[n][0, -1] for n in names])


def _reference_deltas(ad, examples, k, layers):
    """Steps 1-3 written out: IG via attribute(), top-k by sorting, masked ids, one forward per sequence."""
    mask_id = ad.tokenizer.unk_token_id
    deltas, chosen = [], []
    for x, yp, yn in examples:
        res = attribute(ad, x, Contrast(yp, yn), method="integrated_gradients", progress=False, **IG)
        prompt = ad.encode(x).input_ids.tolist()
        assert res.ids[: len(prompt)].tolist() == prompt
        s = res.scores[0]
        cand = [i for i in range(len(prompt) - 1) if bool(res.valid[0, i])]  # the last prompt token is excluded
        pos = [i for i in sorted(cand, key=lambda i: -float(s[i])) if s[i] > 0][:k]
        neg = [i for i in sorted(cand, key=lambda i: float(s[i])) if s[i] < 0][:k]
        x_pos = [mask_id if i in pos else t for i, t in enumerate(prompt)]
        x_neg = [mask_id if i in neg else t for i, t in enumerate(prompt)]
        deltas.append(_last_state(ad, x_neg, layers) - _last_state(ad, x_pos, layers))
        chosen.append((pos, neg))
    return torch.stack(deltas).double(), chosen


def _ref_direction(X, aggregate):
    mu = X.mean(0)
    if aggregate == "mean":
        v = mu
    else:
        M = X - mu if aggregate == "pca" else X
        v = torch.linalg.svd(M, full_matrices=False).Vh[0]
        v = v if float(v @ mu) >= 0 else -v
    return v / v.norm()


def test_vectors_equal_an_explicit_reference(shared_tiny):
    ad = shared_tiny("llama")
    layers, k = [0, 1], 2
    ex = _examples(4)
    ref, chosen = _reference_deltas(ad, ex, k, layers)
    diffs = grains_differences(ad, ex, k=k, layers=layers, **IG)
    assert [(s["positive_positions"], s["negative_positions"]) for s in diffs.selected] == chosen
    d = ad.structure.hidden_size
    atol = 4 * torch.finfo(torch.float32).eps * d**0.5 * 2 * float(diffs.hidden.abs().max())  # fp32, depth 2
    assert_close(diffs.deltas.double(), ref, atol=atol, rtol=0)
    for aggregate in ("pca", "svd", "mean"):
        sv = diffs.vectors(aggregate)
        assert sv.layers == layers and sv.vectors.shape == (2, d)
        want = torch.stack([_ref_direction(ref[:, j], aggregate) for j in range(len(layers))])
        assert_close(sv.vectors.double(), want, atol=1e-4, rtol=0)  # direction error <= fp32 error / singular gap
        assert_close(sv.vectors.norm(dim=-1), torch.ones(2), atol=1e-6, rtol=0)
    # the full pipeline, micro-batched, gives the same vectors
    sv = grains_fit(ad, ex, k=k, layers=layers, batch_size=2, **IG)
    assert_close(sv.vectors, diffs.vectors("mean").vectors, atol=1e-5, rtol=0)
    assert sv.config["aggregate"] == "mean" and sv.config["n_examples"] == 4  # the default


def test_apply_adds_alpha_v_with_renorm_and_cleans_up(shared_tiny):
    ad = shared_tiny("llama")
    g = torch.Generator().manual_seed(1)
    v = torch.randn(1, ad.structure.hidden_size, generator=g)
    sv = SteeringVectors([0], v / v.norm(), torch.tensor([4.0]))
    batch = ad.encode_batch(PROMPTS[:3])
    name = "layers.0.resid_post"
    with torch.no_grad():
        with ad.hooks(cache=name) as plain:
            base = ad.forward(batch).logits
        for relative, alpha in ((False, 2.5), (True, 0.5)):
            with sv.apply(ad, alpha=alpha, relative=relative), ad.hooks(cache=name) as steered:
                ad.forward(batch)
            h, s = plain.cache[name], steered.cache[name]
            a = alpha * (4.0 if relative else 1.0)
            new = h + a * sv.vectors[0]
            assert_close(s, new * h.norm(dim=-1, keepdim=True) / new.norm(dim=-1, keepdim=True), atol=1e-5, rtol=0)
            assert_close(s.norm(dim=-1), h.norm(dim=-1), atol=1e-4, rtol=1e-6)  # renorm: norms preserved
            assert (s - h).abs().max() > 0.1
        after = ad.forward(batch).logits
    assert torch.equal(after, base)  # hooks removed


def test_sign_convention_steering_moves_the_contrast_towards_the_preferred(shared_tiny):
    """Toy: six sentiment prompts on a tiny model. The premise (masking the top positive tokens lowers
    f = log p(good) − log p(bad) more than masking the top negative ones) is checked; then +α must raise f
    and −α lower it, for every aggregation rule. A flipped δ (h(x̃⁺) − h(x̃⁻)) fails this test."""
    ad = shared_tiny("llama")
    good, bad = ad.tokenizer.encode(GOOD), ad.tokenizer.encode(BAD)
    assert len(good) == len(bad) == 1
    batch = ad.encode_batch(PROMPTS)

    def contrast(b=batch):
        lp = ad.next_token_logprobs(b)
        return lp[:, good[0]] - lp[:, bad[0]]

    diffs = grains_differences(ad, _examples(6), k=1, layers=[1], **IG)
    mid = diffs.config["mask_id"]
    masked = {"pos": [], "neg": []}
    for x, s in zip(PROMPTS, diffs.selected, strict=True):
        ids = ad.encode(x).input_ids.tolist()
        for side, key in (("pos", "positive_positions"), ("neg", "negative_positions")):
            masked[side].append([mid if i in s[key] else t for i, t in enumerate(ids)])
    f_pos = torch.stack([contrast({"input_ids": torch.tensor([m])})[0] for m in masked["pos"]])
    f_neg = torch.stack([contrast({"input_ids": torch.tensor([m])})[0] for m in masked["neg"]])
    assert float((f_neg - f_pos).mean()) > 0.05  # the premise: the attributions point the right way
    base = contrast()
    for aggregate in ("pca", "svd", "mean"):
        sv = diffs.vectors(aggregate)
        shift = {}
        for alpha in (-0.3, 0.3):
            with sv.apply(ad, alpha=alpha, relative=True):
                shift[alpha] = float((contrast() - base).mean())
        assert shift[0.3] > 0.02 and shift[-0.3] < -0.02, (aggregate, shift)


def test_chat_templated_examples_select_content_tokens_only(shared_tiny):
    ad = shared_tiny("llama")
    # single-token answers: a multi-token Contrast currently gets one row per target token in prepare()
    ex = [("Say whether the movie was good", "Yes", "No"), ("Was the food tasty today", "Yes", "No")]
    sv = grains_fit(ad, ex, k=2, layers=[1], chat=True, n_steps=2, baseline=42)
    for (x, yp, _), s in zip(ex, sv.selected, strict=True):
        enc = ad.encode(x, target=yp, chat=True)
        for p in s["positive_positions"] + s["negative_positions"]:
            assert not bool(enc.template_mask[p]) and not bool(enc.special_mask[p])
            assert enc.segment_names[int(enc.segment_ids[p])] != "target"
    assert sv.config["chat"] is True


def test_save_load_round_trip(shared_tiny, tmp_path):
    ad = shared_tiny("llama")
    sv = grains_fit(ad, _examples(2), k=1, layers=[-1], n_steps=2, baseline=42)
    assert sv.layers == [1]
    back = SteeringVectors.load(sv.save(tmp_path / "v.json"))
    assert torch.equal(back.vectors, sv.vectors) and torch.equal(back.hidden_norms, sv.hidden_norms)
    assert back.layers == sv.layers and back.config == sv.config and back.selected == sv.selected
    assert SteeringVectors.from_dict(sv.to_dict()).names() == ["layers.1.resid_post"]


def test_bad_input(shared_tiny):
    ad = shared_tiny("llama")
    ex = _examples(2)
    with pytest.raises(ValueError, match="examples is empty"):
        grains_fit(ad, [])
    with pytest.raises(TypeError, match="triple"):
        grains_fit(ad, [("a prompt", " good")])
    with pytest.raises(TypeError, match="list of"):
        grains_fit(ad, "The movie was")
    with pytest.raises(ValueError, match="empty prompt"):
        grains_fit(ad, [("  ", " good", " bad")])
    with pytest.raises(ValueError, match="are the same"):
        grains_fit(ad, [("The movie was", " good", " good")])
    with pytest.raises(ValueError, match="k must be"):
        grains_fit(ad, ex, k=0)
    with pytest.raises(ValueError, match="larger than example 0's 3 selectable"):
        grains_fit(ad, ex, k=4, layers=[0], **IG)
    with pytest.raises(ValueError, match="out of range for this 2-layer model"):
        grains_fit(ad, ex, layers=[2])
    with pytest.raises(ValueError, match="layers is empty"):
        grains_fit(ad, ex, layers=[])
    with pytest.raises(ValueError, match="aggregate must be"):
        grains_fit(ad, ex, aggregate="median")
    with pytest.raises(ValueError, match="mask_id"):
        grains_fit(ad, ex, mask_id=-1)
    with pytest.raises(ValueError, match="cannot score tokens"):
        grains_fit(shared_tiny("bert"), ex)
    with pytest.raises(ValueError, match="differences are all zero"):
        grains_directions(torch.zeros(3, 1, 4))
    with pytest.raises(ValueError, match="NaN or inf"):
        SteeringVectors([0], torch.full((1, 4), float("nan")), torch.ones(1))
    with pytest.raises(ValueError, match=r"vectors must be \[n_layers=2"):
        SteeringVectors([0, 1], torch.ones(1, 4), torch.ones(2))
    small = SteeringVectors([0], torch.ones(1, 8), torch.ones(1))
    with pytest.raises(ValueError, match="hidden size is 64"), small.apply(ad):
        pass
    far = SteeringVectors([5], torch.ones(1, 64), torch.ones(1))
    with pytest.raises(ValueError, match="out of range"), far.apply(ad):
        pass
    with pytest.raises(ValueError, match="format"):
        SteeringVectors.from_dict({"format": "other"})
