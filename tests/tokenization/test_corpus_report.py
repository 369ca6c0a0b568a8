"""Django parallel corpus, tokenizer report and the ``tokensmith tokenizer-report`` CLI."""

from __future__ import annotations

import gettext
import re

import numpy as np
import pytest

from tokensmith.tokenization import corpus as C

PLACEHOLDER = re.compile(r"%\(\w*\)|%[sdifr]|\{\w*\}|</?[a-zA-Z][^>]*>")


@pytest.fixture(scope="module")
def ds3():
    return C.django_parallel_corpus(["en", "de", "ja"])


def test_corpus_is_deterministic_and_clean(ds3):
    assert ds3.column_names == ["key", "domain", "en", "de", "ja"]
    assert len(ds3) > 300
    again = C.django_parallel_corpus(["EN", "de-DE".split("-")[0], "ja"])
    assert again.to_dict() == ds3.to_dict()
    keys = list(zip(ds3["domain"], ds3["key"], strict=True))
    assert keys == sorted(keys)
    for col in ("en", "de", "ja"):
        texts = ds3[col]
        assert all(len(t) >= 2 and t == t.strip() for t in texts)
        assert not [t for t in texts if PLACEHOLDER.search(t)]
    assert len(set(ds3["en"])) == len(ds3)  # deduplicated English side
    assert not any("%(num)d day" in k for k in ds3["key"])  # plural entries are skipped


def test_corpus_rows_are_the_catalog_translations(ds3):
    # independent path: stdlib gettext's public lookup on the core catalog
    root = C.django_locale_dirs()["conf"]
    tr = {c: gettext.translation("django", localedir=str(root), languages=[c]) for c in ("de", "ja")}
    n = 0
    for row in ds3:
        if row["domain"] != "conf" or "\x04" in row["key"]:
            continue
        msgid = row["key"].split(":", 1)[1]
        for c in ("de", "ja"):
            assert C.strip_placeholders(tr[c].gettext(msgid)) == row[c]
        assert C.strip_placeholders(msgid) == row["en"]
        n += 1
    assert n > 100


def test_strip_placeholders_and_language_codes():
    assert (
        C.strip_placeholders("Hello %(name)s, you have %d new {0} <b>messages</b>.")
        == "Hello, you have new messages."
    )
    assert C.strip_placeholders("100%% sure &amp; done") == "100% sure & done"
    assert C.normalize_language("zh-hans") == "zh_Hans" and C.normalize_language("PT_br") == "pt_BR"
    with pytest.raises(ValueError):
        C.normalize_language("")


def test_corpus_bad_input(monkeypatch):
    with pytest.raises(ValueError, match="available: .*de"):
        C.django_parallel_corpus(["en", "xx"])
    with pytest.raises(ValueError, match="unknown catalog domains"):
        C.django_parallel_corpus(["en", "de"], domains=["nope"])
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "django" else real(name, *a)
    )
    with pytest.raises(ImportError, match="pip install django"):
        C.django_parallel_corpus(["en", "de"])


def test_flores_offline_message(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError, match="django_parallel_corpus"):
        C.flores_corpus(["en", "de"])


# ---------------------------------------------------------------------------------------------- report


@pytest.fixture(scope="module")
def rep(ds3):
    from tokensmith.tokenization.report import report

    return report(["smollm2", "minilm"], ds3, n_boot=200, seed=0, progress=False)


def test_report_two_tokenizers_three_languages(rep, ds3):
    from tokensmith.tokenization.tokenizers import load_tokenizer
    from tokensmith.tokenization.view import TokenizerView

    assert rep.tokenizers == ["smollm2", "minilm"] and rep.languages == ["en", "de", "ja"]
    assert set(rep.data.columns) == {"tokenizer", "language", "metric", "value", "ci_low", "ci_high"}
    prem = rep.premiums()
    assert prem.shape == (2, 3)
    assert (prem["en"] == 1.0).all()  # exactly, against itself
    view = TokenizerView(load_tokenizer("smollm2"))
    counts = {c: sum(len(e.ids) for e in view.encode_batch(ds3[c])) for c in ("en", "de", "ja")}
    tokens = rep.metric("tokens")
    for c in ("en", "de", "ja"):
        assert tokens.at["smollm2", c] == counts[c]
        assert prem.at["smollm2", c] == pytest.approx(counts[c] / counts["en"], rel=1e-12)
    d = rep.data.set_index(["tokenizer", "language", "metric"])
    for t in rep.tokenizers:
        lo, hi = d.loc[(t, "ja", "premium"), ["ci_low", "ci_high"]]
        assert lo < prem.at[t, "ja"] < hi
        assert d.loc[(t, "ALL", "max_min_ratio"), "value"] == pytest.approx(
            prem.loc[t].max() / prem.loc[t].min()
        )
    assert rep.metric("char_unit_share").at["smollm2", "ja"] > 0.9  # Japanese: tokens per character
    assert rep.metric("byte_premium").at["minilm", "de"] == rep.metric("byte_premium").at["smollm2", "de"]
    assert rep.summary["smollm2"]["family"] == "byte_bpe" and rep.summary["minilm"]["family"] == "wordpiece"
    w = rep.wide()
    assert ("smollm2", "ja") in w.index and "fertility" in w.columns


def test_report_outputs(rep, tmp_path):
    html = rep.to_html(tmp_path / "r.html")
    assert (tmp_path / "r.html").read_text(encoding="utf-8") == html
    assert "<svg" in html and "http://" not in html.replace("http://www.w3.org", "")
    assert f"{rep.premiums().at['smollm2', 'ja']:.2f}" in html
    import pandas as pd

    back = pd.read_csv(rep.to_csv(tmp_path / "r.csv"))
    assert len(back) == len(rep.data)
    pytest.importorskip("matplotlib")
    fig = rep.plot(tmp_path / "r.png")
    assert (tmp_path / "r.png").stat().st_size > 1000 and len(fig.axes) >= 2


def test_report_nsl_against_a_baseline(ds3):
    from tokensmith.tokenization.report import report

    r = report(["smollm2", "minilm"], ds3, baseline="minilm", n_boot=0, max_rows=80, progress=False)
    nsl, tokens = r.metric("nsl"), r.metric("tokens")
    assert (nsl.loc["minilm", r.languages] == 1.0).all()
    for c in r.languages:
        assert nsl.at["smollm2", c] == pytest.approx(
            tokens.at["smollm2", c] / tokens.at["minilm", c], rel=1e-12
        )
    assert r.data[r.data.metric == "premium"].ci_low.isna().all()  # n_boot=0: no CIs


def test_report_bad_input(ds3):
    import datasets

    from tokensmith.tokenization.report import report

    with pytest.raises(ValueError, match="not columns of the corpus; it has: en, de, ja"):
        report(["smollm2"], ds3, languages=["en", "fr"], progress=False)
    with pytest.raises(ValueError, match="empty"):
        report(["smollm2"], datasets.Dataset.from_dict({"en": [], "de": []}), progress=False)
    with pytest.raises(ValueError, match="empty or non-string rows"):
        report(
            ["smollm2"], datasets.Dataset.from_dict({"en": ["a b", "c"], "de": ["x", " "]}), progress=False
        )
    with pytest.raises(ValueError, match="unknown tokenizer"):
        report(["nope"], ds3, progress=False)


def test_cli_writes_html_and_csv(tmp_path, capsys):
    import tokensmith.tokenization.cli  # noqa: F401  (registers the subcommand)
    from tokensmith.cli import main

    out = tmp_path / "rep"
    rc = main(
        [
            "tokenizer-report",
            "--tokenizers",
            "smollm2,minilm",
            "--languages",
            "en,de,ja",
            "--out",
            str(out),
            "--max-rows",
            "60",
            "--n-boot",
            "50",
            "--quiet",
        ]
    )
    assert rc == 0
    assert (out / "report.html").stat().st_size > 1000
    import pandas as pd

    df = pd.read_csv(out / "report.csv")
    assert set(df.tokenizer) == {"smollm2", "minilm"} and {"en", "de", "ja", "ALL"} <= set(df.language)
    assert np.allclose(df[(df.metric == "premium") & (df.language == "en")].value, 1.0)
    assert "wrote" in capsys.readouterr().out
    assert (
        main(
            [
                "tokenizer-report",
                "--tokenizers",
                "smollm2",
                "--languages",
                "en,xx",
                "--out",
                str(out),
                "--quiet",
            ]
        )
        == 2
    )
