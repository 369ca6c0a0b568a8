"""Tests for the ``tokensmith`` command and the HTML report (``tokensmith.report``).

Fast tests run the demo's sections on ``ts.tiny("llama")`` (random weights, real SmolLM2 tokenizer);
one ``real_model`` test runs the real demo end to end on SmolLM2-135M-Instruct.
"""

from __future__ import annotations

import html as htmllib
import math
import re
from pathlib import Path

import pytest
import torch
from tolerance import fp32_atol

import tokensmith as ts
from tokensmith.cli import main
from tokensmith.report import (
    ReportContext,
    Section,
    build_report,
    register_section,
    registered_sections,
    token_pieces,
    unregister_section,
)
from tokensmith.report import html as H
from tokensmith.report.sections import (
    HEATMAP_ANSWER,
    HEATMAP_QUESTION,
    STEER_NEGATIVE,
    STEER_POSITIVE,
    STEER_PROMPT,
    _mean_resid,
)
from tokensmith.tokenization.demo import SENTENCES

TITLES = ["Model card", "Tokenization across languages", "Per-token log-probs of a chat answer",
          "Which prompt words the answer rests on", "Activation steering",
          "Token-space search: forcing an answer with GCG", "Per-token rewards of a preference pair",
          "KV-cache compression: a needle in half a cache", "Logit lens: what each layer predicts"]


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="module")
def adapter():
    # 4 layers, so that the steering layer (the middle one) has layers after it: then which positions are
    # steered changes the last token's distribution, and the independent KL check below can tell.
    return ts.tiny("llama", n_layers=4)


@pytest.fixture(scope="module")
def report(adapter):
    return build_report(adapter, ReportContext(model_name="tiny:llama", quick=True), progress=False, strict=True)


@pytest.fixture(scope="module")
def page(report):
    return report.to_html()


def assert_self_contained(page: str) -> None:
    assert page.startswith("<!DOCTYPE html>")
    remote = re.findall(r"""(?:src|href|xlink:href)\s*=\s*["']?\s*(?:https?:)?//""", page, flags=re.I)
    assert not remote, f"external references: {remote}"
    for bad in ("<script", "<link", "<iframe", "@import", "url("):
        assert bad not in page.lower(), f"{bad!r} in the page"
    assert "http://" not in page and "https://" not in page


def _attr_values(page: str, attr: str) -> list[float]:
    return [float(v) for v in re.findall(rf'{attr}="(-?[0-9.eE+-]+)"', page)]


def _id_value(page: str, id_: str) -> float:
    m = re.search(rf'id="{id_}" data-value="(-?[0-9.eE+-]+)">([^<]+)<', page)
    assert m, f"no element with id {id_}"
    return float(m.group(1))


# ------------------------------------------------------------------ the page


def test_page_is_self_contained_and_has_every_section(report, page):
    assert_self_contained(page)
    for title in TITLES:
        assert f">{title}</h2>" in page
    assert [s.title for s in report.sections] == TITLES
    assert not report.failed
    assert "random tiny model" in page  # the model card says what this model is
    assert "de-quantized" not in page  # ...and does not claim to be SmolLM2


def test_heatmap_numbers_are_consistent(adapter, report, page):
    sec = report.section("logprobs")
    lps = _attr_values(page, "data-lp")
    # one coloured span per answer token, carrying the log-prob the adapter computed
    enc = adapter.encode(HEATMAP_QUESTION, target=HEATMAP_ANSWER, chat=True)
    ref = adapter.token_logprobs(enc)[0][enc.target_mask].double()
    assert len(lps) == int(enc.target_mask.sum()) == sec.data["n_tokens"]
    assert torch.allclose(torch.tensor(lps, dtype=torch.float64), ref, atol=1e-5)
    nll = _id_value(page, "nll-total")
    assert nll == pytest.approx(-float(ref.sum()), abs=1e-4)
    assert nll == pytest.approx(-sum(lps), abs=1e-3)
    assert _id_value(page, "nll-mean") == pytest.approx(nll / len(lps), rel=1e-5)
    assert _id_value(page, "ppl") == pytest.approx(math.exp(nll / len(lps)), rel=1e-4)
    # ranks come from the full distribution and are consistent with the log-probs
    with torch.no_grad():
        zmax = float(adapter.forward(enc).logits.abs().max())
    # target-row logits vs the full distribution: only the LM head's kernel differs (tests/README.md)
    assert sec.data["max_abs_diff_vs_full_logits"] <= fp32_atol(zmax, adapter.structure.hidden_size)
    ranks = [int(r) for r in re.findall(r'data-rank="(\d+)"', page)]
    assert len(ranks) == len(lps) and min(ranks) >= 1
    assert max(ranks) <= adapter.structure.vocab_size
    # template/special tokens are greyed: the <|im_start|> markers are in 'tpl' spans
    assert re.search(r'<span class="tok tpl"[^>]*>&lt;\|im_start\|&gt;</span>', page)


def test_tokenization_numbers(adapter, report, page):
    rows = report.section("tokenization").data["languages"]
    assert [r["code"] for r in rows] == list(SENTENCES)
    tok = adapter.tokenizer
    for r in rows:
        text = SENTENCES[r["code"]][1]
        n = len(tok(text, add_special_tokens=False)["input_ids"])
        assert r["tokens"] == n
        assert r["bytes"] == len(text.encode("utf-8"))
        assert r["premium"] == pytest.approx(n / rows[0]["tokens"])
        assert r["bytes_reconstructed"] is True
        assert f"{r['premium']:.2f}×" in page
    assert rows[0]["premium"] == 1.0
    # non-Latin scripts cost more tokens than English with this English-centric BPE
    assert all(r["premium"] > 1.5 for r in rows if r["code"] in ("ru", "zh", "ar", "hi"))
    # chips show decoded text, not byte-level stand-ins ('Ġ' = space, 'Ð' = byte 0xD0); tooltips may name them
    section = page.split('id="tokenization"')[1].split("</section>")[0]
    visible = re.sub(r'title="[^"]*"', "", section)
    assert "Ġ" not in visible and "Ð" not in visible and "à¤" not in visible
    assert "Ġ" in section  # ...while the tooltips do show the raw token strings
    assert visible.count('class="chip"') == sum(r["tokens"] for r in rows)
    assert "<svg" in page


def test_steering_section(adapter, report):
    d = report.section("steering").data
    assert d["alpha0_exact"] is True
    zero = [r for r in d["runs"] if r["alpha"] == 0]
    assert zero and all(r["identical"] and r["max_abs_diff"] == 0 and abs(r["kl"]) < 1e-9 for r in zero)
    assert all(r["kl"] > 0 for r in d["runs"] if r["alpha"] > 0)
    gens = d["generations"]
    assert gens[0]["ids"] == gens[1]["ids"]  # baseline == alpha 0
    # the KL shown is KL(steered || base) of the next-token distributions: recompute it independently
    # with a plain forward hook on the layer module (not the adapter's hook machinery)
    name = d["hook"]
    v = _mean_resid(adapter, STEER_POSITIVE, name)[0] - _mean_resid(adapter, STEER_NEGATIVE, name)[0]
    assert float(v.norm()) == pytest.approx(d["vector_norm"], rel=1e-5)
    enc = adapter.encode(STEER_PROMPT, chat=True)
    start = enc.spans["prompt"].start
    with torch.no_grad():
        base = torch.log_softmax(adapter.model(input_ids=enc.input_ids[None]).logits[0, -1].double(), -1)

        def add(module, args, output):
            h = output[0] if isinstance(output, tuple) else output
            h = h.clone()
            h[:, start:] += 2.0 * v.to(h.dtype)
            return (h, *output[1:]) if isinstance(output, tuple) else h

        layer = adapter.structure.layers[int(name.split(".")[1])]
        handle = layer.register_forward_hook(add)
        try:
            steered = torch.log_softmax(adapter.model(input_ids=enc.input_ids[None]).logits[0, -1].double(), -1)
        finally:
            handle.remove()
    kl = float((steered.exp() * (steered - base)).sum())
    shown = next(r for r in d["runs"] if r["alpha"] == 2.0 and r["renorm"] is False)
    assert shown["kl"] == pytest.approx(kl, rel=1e-3, abs=1e-6)
    assert shown["max_abs_diff"] == pytest.approx(float((steered - base).abs().max()), rel=1e-3, abs=1e-5)


# ------------------------------------------------------------------ token pieces


def test_token_pieces_split_characters(adapter):
    tok = adapter.tokenizer
    text = "Привет"
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ps = token_pieces(tok, enc["input_ids"], text, enc["offset_mapping"])
    assert sum(p.nbytes for p in ps) == len(text.encode())
    # SmolLM2's BPE splits 'П' (D0 9F) into two single-byte tokens, then 'ри' is one token
    assert ps[0].parts == [("П", True, "byte 1 of 2 of 'П' (U+041F)")]
    assert ps[1].parts == [("П", True, "byte 2 of 2 of 'П' (U+041F)")]
    assert ps[2].text == "ри" and not ps[2].has_fragment
    for p in ps:
        if not p.has_fragment:
            assert p.text == tok.decode([p.id])


def test_token_pieces_reconstruct_text(adapter):
    tok = adapter.tokenizer
    for _, text in SENTENCES.values():
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        ps = token_pieces(tok, enc["input_ids"], text, enc["offset_mapping"])
        # whole characters plus each split character once (at its first byte) rebuild the text
        out = []
        for p in ps:
            for t, frag, note in p.parts:
                if not frag or note.startswith("byte 1 ") or note.startswith("bytes 1-"):
                    out.append(t)
        assert "".join(out) == text
        assert sum(p.nbytes for p in ps) == len(text.encode())


def test_token_pieces_special_and_wordpiece_fallback():
    bert_tok = ts.tiny("bert").tokenizer
    text = "Hello world"
    enc = bert_tok(text, return_offsets_mapping=True)
    ps = token_pieces(bert_tok, enc["input_ids"], text, enc["offset_mapping"])
    assert ps[0].special and ps[0].text == "[CLS]" and ps[-1].special
    assert [p.text for p in ps[1:-1]] == ["Hello", "world"]  # from the offsets: original casing
    assert all(p.nbytes is None for p in ps)  # not byte-level: no byte counts invented


# ------------------------------------------------------------------ html helpers


def test_html_helpers_escape_and_validate():
    assert "&lt;b&gt;" in H.table(["x"], [["<b>"]])
    assert H.esc('"<&>') == "&quot;&lt;&amp;&gt;"
    assert H.heat_color(0.0) == "#ffffff"
    assert H.heat_color(100.0) == H.heat_color(8.0) == "#dc2626"
    with pytest.raises(ValueError):
        H.bar_chart_svg(["a"], [1.0, 2.0])
    svg = H.bar_chart_svg(["a", "b"], [1.0, 3.0], ref=1.0)
    assert svg.count("<rect") == 2 and "stroke-dasharray" in svg
    assert H.token_text(" a\n") == '<span class="ws">·</span>a<span class="ws">↵</span>'


# ------------------------------------------------------------------ registry


def test_registry_custom_failing_and_skipped_sections(adapter):
    @register_section("zz-custom", order=999, title="Custom")
    def custom(ad, ctx):
        n = len(ctx.results)
        return Section("Custom section", f"<p>seen {n} earlier</p>", ["custom ran"], {"n": n})

    @register_section("zz-fail", order=1000, title="Failing")
    def failing(ad, ctx):
        raise RuntimeError("boom")

    @register_section("zz-skip", order=1001, title="Needs magic", requires=("magic_feature",))
    def needs(ad, ctx):  # pragma: no cover - must be skipped
        raise AssertionError("should have been skipped")

    try:
        keys = [s.key for s in registered_sections()]
        assert keys[:5] == ["model", "tokenization", "logprobs", "attribution", "steering"]
        assert keys[-3:] == ["zz-custom", "zz-fail", "zz-skip"]
        rep = build_report(adapter, sections=["model", "zz-custom", "zz-fail", "zz-skip"], progress=False)
        assert rep.section("zz-custom").data["n"] == 1
        assert [s.key for s in rep.failed] == ["zz-fail"]
        assert "RuntimeError: boom" in rep.to_html()
        assert rep.section("zz-skip").data["skipped"] == ["magic_feature"]
        with pytest.raises(RuntimeError, match="boom"):
            build_report(adapter, sections=["zz-fail"], progress=False, strict=True)
        with pytest.raises(KeyError):
            build_report(adapter, sections=["no-such-section"], progress=False)
    finally:
        for k in ("zz-custom", "zz-fail", "zz-skip"):
            unregister_section(k)
    assert "zz-custom" not in [s.key for s in registered_sections()]


# ------------------------------------------------------------------ the command


def test_cli_demo_tiny(tmp_path: Path, capsys):
    out = tmp_path / "sub" / "demo.html"
    rc = main(["demo", "--out", str(out), "--model", "tiny:llama", "--quick", "--no-progress"])
    assert rc == 0
    page = out.read_text(encoding="utf-8")
    assert_self_contained(page)
    for title in TITLES:
        assert title in page
    stdout = capsys.readouterr().out
    assert f"wrote {out}" in stdout
    assert "alpha=0 reproduces the baseline exactly: True" in stdout
    m = re.search(r"NLL ([0-9.]+) nats", stdout)
    assert m and float(m.group(1)) == pytest.approx(_id_value(page, "nll-total"), abs=0.01)
    assert "Timings" in page and "model load" in page


def test_cli_sections_and_errors(tmp_path: Path, capsys):
    out = tmp_path / "d.html"
    assert main(["demo", "--out", str(out), "--model", "tiny:gpt2", "--quick", "--no-progress",
                 "--sections", "model,tokenization"]) == 0
    page = out.read_text(encoding="utf-8")
    assert "Model card" in page and "Tokenization across languages" in page
    assert "Activation steering" not in page
    assert "GPT2LMHeadModel" in page
    assert main(["demo", "--out", str(out), "--model", "tiny:llama", "--sections", "nope", "--no-progress"]) == 2
    assert main(["demo", "--out", str(out), "--model", "/no/such/model/dir", "--no-progress"]) == 2
    assert "cannot load" in capsys.readouterr().err
    assert main([]) == 2
    assert main(["models"]) == 0
    assert "smollm2-135m-instruct" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--version"])


@pytest.mark.real_model
def test_real_demo_end_to_end(tmp_path: Path, capsys):
    out = tmp_path / "demo.html"
    rc = main(["demo", "--out", str(out), "--no-progress"])
    assert rc == 0
    page = out.read_text(encoding="utf-8")
    assert_self_contained(page)
    for title in TITLES:
        assert f">{title}</h2>" in page
    assert "de-quantized from the 4-bit Q4_1 GGUF" in page
    assert "LlamaForCausalLM" in page and "30" in page
    lps = _attr_values(page, "data-lp")
    assert len(lps) > 10
    assert _id_value(page, "nll-total") == pytest.approx(-sum(lps), abs=1e-3)
    # a trained model finds the fixed answer far more predictable than chance (ln 49152 = 10.8 nats)
    assert _id_value(page, "nll-mean") < 5.0
    assert "✓ exact" in page
    stdout = capsys.readouterr().out
    assert "alpha=0 reproduces the baseline exactly: True" in stdout
    m = re.search(r"total ([0-9.]+) s", stdout)
    assert m and float(m.group(1)) < 600
    text = htmllib.unescape(page)
    assert "Why is the sky blue?" in text


def test_attribution_section_and_command(adapter, report, tmp_path: Path, capsys):
    sec = next(s for s in report.sections if s.key == "attribution")
    assert sec.error is None, sec.error
    assert set(sec.data["tops"]) >= {"integrated_gradients", "occlusion"}
    assert all(len(v) == 5 for v in sec.data["tops"].values())
    out = tmp_path / "a.html"
    js = tmp_path / "a.json"
    assert main(["attribute", "The capital of France is", "--target", " Paris", "--model", "tiny:llama",
                 "--method", "occlusion", "--words", "--out", str(out), "--json", str(js)]) == 0
    assert "row 0" in out.read_text(encoding="utf-8") and js.exists()
    assert "wrote" in capsys.readouterr().out
    assert main(["attribute", "x", "--target", " y", "--model", "tiny:llama", "--method", "nope"]) == 2
    assert "registered" in capsys.readouterr().err
