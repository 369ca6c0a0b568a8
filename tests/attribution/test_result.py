"""AttributionResult: views, exports and round-trips."""

from __future__ import annotations

import pytest
import torch

from tokensmith.attribution import AttributionResult, attribute, token_groups


@pytest.fixture(scope="module")
def res(shared_tiny):
    ad = shared_tiny("llama")
    return attribute(ad, "Unbelievably, the capital of France is", target=" Paris is nice", method="input_x_gradient")


def test_save_load_round_trip_is_lossless(res, tmp_path):
    p = res.save(tmp_path / "r.json")
    back = AttributionResult.load(p)
    assert torch.equal(back.scores, res.scores) and torch.equal(back.valid, res.valid)
    assert back.tokens == res.tokens and back.offsets == res.offsets and back.segments == res.segments
    assert back.method == res.method and back.versions == res.versions
    with pytest.raises(ValueError, match="not a saved attribution result"):
        AttributionResult.from_dict({"format": "other"})


def test_aggregate_words_sums_the_tokens_of_each_word(res):
    w = res.aggregate("words")
    groups = w.extra["groups"]
    assert sum(len(g) for g in groups) == len(res.tokens)
    for g_i, g in enumerate(groups):
        torch.testing.assert_close(w.scores[:, g_i], res.scores[:, g].sum(-1))
    assert any(len(g) > 1 for g in groups)  # "Unbelievably" is several tokens
    assert "Unbelievably," in w.tokens and " France" in w.tokens  # words split at whitespace
    spans = res.aggregate("spans")
    assert spans.segments == ["prompt", "target"]


def test_token_groups_respects_whitespace_segments_and_specials():
    text = "ab cd<s>ef"
    offs = [(0, 1), (1, 2), (2, 5), (5, 8), (8, 10)]
    assert token_groups("words", text, offs, ["p"] * 5, [False, False, False, True, False]) == [[0, 1], [2], [3], [4]]
    assert token_groups("spans", text, offs, ["p", "p", "q", "q", "p"], [False] * 5) == [[0, 1], [2, 3], [4]]
    with pytest.raises(ValueError):
        token_groups("lines", text, offs, ["p"] * 5, [False] * 5)


def test_normalize(res):
    n = res.normalize("l1")
    torch.testing.assert_close(n.scores.abs().sum(-1), torch.ones(n.shape[0]))
    m = res.normalize("max")
    torch.testing.assert_close(m.scores.abs().amax(-1), torch.ones(m.shape[0]))
    assert torch.equal(res.scores, res.scores)  # the original is untouched (views return new results)
    with pytest.raises(ValueError):
        res.normalize("softmax")


def test_exports(res):
    df = res.to_pandas()
    assert len(df) == res.shape[0] * res.shape[1]
    assert set(df.columns) >= {"row", "target", "position", "token", "segment", "valid", "score"}
    assert float(df[df.valid].score.abs().sum()) == pytest.approx(float(res.scores.abs().sum()), rel=1e-6)
    html = res._repr_html_()
    assert html.startswith("<div") and "title='" in html and "row 2" in html
    ax = res.plot()
    assert ax.get_title() == "input_x_gradient"
    assert res.top(2, row=0)[0][2] >= res.top(2, row=0)[1][2]


def test_evaluate_against_spans_maps_characters_to_tokens(shared_tiny):
    from tokensmith.attribution import attribute, evaluate_against_spans, plausibility

    ad = shared_tiny("llama")
    text = "The capital of France is"
    r = attribute(ad, text, target=" Paris", method="occlusion")
    a = text.index("France")
    gold = [i for i, (s, e) in enumerate(r.offsets) if s < a + 6 and a < e]
    assert gold and evaluate_against_spans(r, [(a, a + 6)]) == plausibility(r, gold)
    with pytest.raises(ValueError, match="end > start"):
        evaluate_against_spans(r, [(5, 5)])
    with pytest.raises(ValueError, match="no token"):
        evaluate_against_spans(r, [(900, 901)])
