"""The demo's logit-lens section: its numbers are the model's at the last layer and the lens' below, the grid is
subsampled on deep models, masked LMs are read at the mask, head-less models are skipped."""

from __future__ import annotations

import torch

import tokensmith as ts
from tokensmith.analysis.demo import LENS_ANSWER, LENS_PROMPT, MAX_ROWS, lens_section
from tokensmith.analysis.lens import logit_lens
from tokensmith.report import ReportContext
from tokensmith.report.sections import registered_sections


def _ctx(name: str) -> ReportContext:
    return ReportContext(model_name=name, quick=True)


def test_section_is_registered():
    spec = {s.key: s for s in registered_sections()}["analysis"]
    assert spec.fn is lens_section and spec.order == 55 and spec.requires == ()


def test_answer_rank_is_the_model_rank_at_the_last_layer(shared_tiny, torch_one_thread):
    ad = shared_tiny("llama")
    sec = lens_section(ad, _ctx("tiny:llama"))
    d = sec.data
    L = ad.structure.num_layers
    ids = ad.encode(LENS_PROMPT).input_ids
    answer = ad.tokenizer(LENS_ANSWER, add_special_tokens=False)["input_ids"][0]
    assert d["answer_id"] == answer and d["position"] == len(ids) - 1 and d["layers"] == list(range(L + 1))
    with torch.no_grad():
        z = ad.forward(ids[None]).logits[0, -1].double()
    assert d["answer_rank"][-1] == int((z > z[answer]).sum())
    assert abs(d["answer_prob"][-1] - float(torch.softmax(z, -1)[answer])) < 1e-6
    assert d["kl_to_final"][-1] == 0.0
    f = logit_lens(ad, LENS_PROMPT, token=answer)
    assert d["answer_rank"] == f[f.position == len(ids) - 1].sort_values("layer").token_rank.tolist()
    assert d["grid_top_token"][0] == f[f.layer == 0].sort_values("position").top_token.tolist()
    # one table row per shown layer (+ header), one cell per position (+ the layer label)
    assert sec.html.count("<tr>") == len(d["shown_layers"]) + 1
    assert sec.html.count("<td>") == len(d["shown_layers"]) * (len(ids) + 1)
    assert "<svg" in sec.html and len(sec.summary_lines) == 3


def test_deep_model_grid_is_subsampled(torch_one_thread):
    ad = ts.tiny("llama", n_layers=20)
    d = lens_section(ad, _ctx("tiny:llama-20")).data
    assert len(d["layers"]) == 21 and len(d["answer_rank"]) == 21
    assert len(d["shown_layers"]) == MAX_ROWS and d["shown_layers"][0] == 0 and d["shown_layers"][-1] == 20
    assert len(d["grid_top_prob"]) == MAX_ROWS


def test_masked_lm_is_read_at_the_mask_and_headless_models_are_skipped(shared_tiny, torch_one_thread):
    import transformers

    bert = shared_tiny("bert")
    d = lens_section(bert, _ctx("tiny:bert")).data
    ids = d["input_tokens"]
    assert d["objective"] == "masked" and ids[d["position"]] == bert.tokenizer.mask_token and ids[-1] == "[SEP]"
    enc = bert.encode(LENS_PROMPT).input_ids.tolist()
    full = torch.tensor(enc[:-1] + [bert.tokenizer.mask_token_id] + enc[-1:])
    with torch.no_grad():
        z = bert.forward(full[None]).logits[0, d["position"]].double()
    # the rank counts logits above the answer's; logits within fp32 rounding of it may fall either side
    za, tol = z[d["answer_id"]], 1e-5 * float(z.abs().max())
    assert int((z > za + tol).sum()) <= d["answer_rank"][-1] <= int((z > za - tol).sum())
    bare = ts.ModelAdapter(transformers.BertModel(bert.model.config).eval(), bert.tokenizer)
    sec = lens_section(bare, _ctx("bare"))
    assert sec.data == {"skipped": ["unembed"]} and "no LM head" in sec.html
    assert "encoder-decoder" in lens_section(shared_tiny("t5"), _ctx("t5")).summary_lines[0]
