"""The ``tokenization`` section of the ``tokensmith demo`` report (registered on import): one sentence in
eight languages through the model's tokenizer (byte-exact pieces, premiums) and a premium chart across the
bundled tokenizers over Django's human translations, all computed by :mod:`tokensmith.tokenization`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tokensmith.report import ReportContext, Section, register_section
from tokensmith.report import html as H
from tokensmith.report.tokens import token_chips, token_pieces

if TYPE_CHECKING:  # pragma: no cover
    from tokensmith.models.adapter import ModelAdapter

__all__ = ["SENTENCES", "tokenization_section"]

# One sentence with the same meaning in eight languages (translated for this demo).
SENTENCES: dict[str, tuple[str, str]] = {
    "en": ("English", "The weather is nice today, so we are going to the park with our friends."),
    "fr": ("French", "Il fait beau aujourd'hui, alors nous allons au parc avec nos amis."),
    "de": ("German", "Das Wetter ist heute schön, also gehen wir mit unseren Freunden in den Park."),
    "es": ("Spanish", "Hoy hace buen tiempo, así que vamos al parque con nuestros amigos."),
    "ru": ("Russian", "Сегодня хорошая погода, поэтому мы идём в парк с друзьями."),
    "zh": ("Chinese", "今天天气很好，所以我们和朋友们一起去公园。"),
    "ar": ("Arabic", "الطقس جميل اليوم، لذلك سنذهب إلى الحديقة مع أصدقائنا."),
    "hi": ("Hindi", "आज मौसम अच्छा है, इसलिए हम अपने दोस्तों के साथ पार्क जा रहे हैं।"),
}


@register_section("tokenization", order=20, title="Tokenization across languages")
def tokenization_section(adapter: ModelAdapter, ctx: ReportContext) -> Section:
    """One sentence in eight languages through the model's tokenizer (chips, premium), then the premium of
    the same languages across the bundled tokenizers on Django's parallel corpus
    (:mod:`tokensmith.tokenization`)."""
    from tokensmith.tokenization import metrics as TM

    tok = adapter.tokenizer
    codes = list(SENTENCES)
    texts = [SENTENCES[c][1] for c in codes]
    try:  # byte-exact path (tokensmith.tokenization.view); a tokenizer it does not support falls back
        enc = TM.encode_corpus(tok, texts, progress=False)
        per = [TM.corpus_metrics(enc.select(i, i + 1), alphas=(), codecs=()) for i in range(len(texts))]
    except TypeError:
        enc, per = None, [None] * len(texts)
    rows_data = []
    chips = []
    for k, (code, (lang, text)) in enumerate(SENTENCES.items()):
        hf = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(hf["input_ids"])
        offs = [tuple(o) for o in hf["offset_mapping"]]
        pieces = token_pieces(tok, ids, text, offs)
        nb = [p.nbytes for p in pieces]
        n_bytes = len(text.encode("utf-8"))
        bytes_ok = all(b is not None for b in nb) and sum(nb) == n_bytes  # type: ignore[arg-type]
        split_chars = sum(1 for p in pieces if p.has_fragment)
        m = per[k]
        rows_data.append(
            {
                "code": code,
                "language": lang,
                "text": text,
                "tokens": len(ids),
                "chars": len(text),
                "bytes": n_bytes,
                "chars_per_token": len(text) / max(len(ids), 1),
                "bytes_per_token": n_bytes / max(len(ids), 1),
                "fertility": m["fertility"] if m else None,
                "fertility_unit": None if m is None else ("char" if m["char_unit_share"] > 0.5 else "word"),
                "tokens_with_split_chars": split_chars,
                "bytes_reconstructed": bytes_ok,
            }
        )
        chips.append(
            f"<h3>{H.esc(lang)} <span class='muted'>({len(ids)} tokens)</span></h3>"
            f'<p dir="auto" class="muted">{H.esc(text)}</p>' + token_chips(tok, ids, text, offs)
        )
    n_en = rows_data[0]["tokens"]
    for r in rows_data:
        r["premium"] = TM.tokenization_premium([r["tokens"]], [n_en]) if n_en else float("nan")
    table = H.table(
        ["language", "tokens", "chars", "UTF-8 bytes", "chars/token", "bytes/token", "tokens/word", "premium vs en",
         "tokens splitting a char"],
        [
            [r["language"], r["tokens"], r["chars"], r["bytes"], f"{r['chars_per_token']:.2f}", f"{r['bytes_per_token']:.2f}",
             "–" if r["fertility"] is None else f"{r['fertility']:.2f}" + (" /char" if r["fertility_unit"] == "char" else ""),
             f"{r['premium']:.2f}×", r["tokens_with_split_chars"]]
            for r in rows_data
        ],
        numeric=range(1, 9),
    )
    chart = H.bar_chart_svg(
        [r["language"] for r in rows_data],
        [r["premium"] for r in rows_data],
        title="Tokenization premium |tokens_L| / |tokens_en| (dashed: 1×)",
        unit="×",
        ref=1.0,
    )
    all_ok = all(r["bytes_reconstructed"] for r in rows_data)
    check = (
        '<p class="note"><span class="ok">✓</span> For every sentence the bytes of the tokens, decoded from the '
        "byte-level vocabulary, concatenate to the UTF-8 text exactly.</p>"
        if all_ok
        else '<p class="note">Token texts come from the tokenizer\'s character offsets (not a byte-level '
        "vocabulary, or the bytes did not reproduce the text).</p>"
    )
    # the same languages across the bundled tokenizers, on a real parallel corpus
    corpus_html, corpus_data, corpus_summary = "", {}, []
    try:
        from tokensmith.tokenization.report import (
            BUNDLED_TOKENIZERS,
            bundled_report,
            grouped_bar_svg,
            heatmap_table,
        )

        # quick (tests): the two bundled-model tokenizers on 150 sentences; else all four on the whole corpus
        rep, skipped = bundled_report(codes, names=("smollm2", "minilm") if ctx.quick else BUNDLED_TOKENIZERS,
                                      n_boot=100 if ctx.quick else 300, max_rows=150 if ctx.quick else None,
                                      seed=ctx.seed)
        prem = rep.premiums()[rep.languages]
        names = {c2: SENTENCES[c][0] for c, c2 in zip(codes, rep.languages, strict=True)}
        cross = grouped_bar_svg([names[c] for c in rep.languages],
                                {t: [float(prem.at[t, c]) for c in rep.languages] for t in rep.tokenizers},
                                title="Token premium vs English on Django's parallel corpus (dashed: 1×)", ref=1.0)
        heat = heatmap_table(prem.rename(columns=names))
        summ = H.table(
            ["tokenizer", "family", "|V|", "max/min premium", "95% CI", "Gini", "worst language"],
            [[t, s["family"], s["vocab_size"], f"{s['unfairness']['max_min_ratio']:.2f}",
              "–" if "max_min_ratio_ci" not in s["unfairness"] else
              "[{:.2f}, {:.2f}]".format(*s["unfairness"]["max_min_ratio_ci"]),
              f"{s['unfairness']['gini']:.3f}", names.get(s["unfairness"]["argmax"], s["unfairness"]["argmax"])]
             for t, s in rep.summary.items()],
            numeric=(2, 3, 5),
        )
        skip_note = "" if not skipped else (
            '<p class="note">Not shown (could not load offline): '
            + H.esc("; ".join(f"{n} ({r})" for n, r in skipped.items())) + "</p>")
        corpus_html = (
            f"<h3>Across tokenizers: {rep.meta['n_sentences']} parallel sentences</h3>"
            "<p>Django's human translations of its own interface strings (only strings translated into all eight "
            "languages; placeholders and HTML stripped), tokenized by each bundled tokenizer. Premium = total tokens "
            "of the language / total tokens of the English originals; the CI is a paired bootstrap over sentences. "
            "Built by <code>tokensmith.tokenization.report</code> (<code>tokensmith tokenizer-report</code> writes "
            "the full table).</p>"
            + '<div class="grid2"><div>' + cross + "</div><div>" + heat + summ + "</div></div>" + skip_note
        )
        corpus_data = {"tokenizers": rep.tokenizers, "languages": rep.languages, "n_sentences": rep.meta["n_sentences"],
                       "premiums": {t: {c: float(prem.at[t, c]) for c in rep.languages} for t in rep.tokenizers},
                       "max_min_ratio": {t: s["unfairness"]["max_min_ratio"] for t, s in rep.summary.items()},
                       "skipped": skipped}
        corpus_summary = ["corpus premium (max/min over languages): " + ", ".join(
            f"{t} {s['unfairness']['max_min_ratio']:.2f}" for t, s in rep.summary.items())]
    except (ImportError, RuntimeError, ValueError) as e:  # Django missing, no tokenizer loads
        corpus_html = f'<p class="note">Cross-tokenizer corpus chart skipped: {H.esc(e)}</p>'
        corpus_data = {"error": str(e)}
    body = (
        "<p>The same sentence in eight languages, tokenized with the model's tokenizer (no special tokens). "
        "The <b>premium</b> is how many more tokens a language needs than English for the same meaning: it "
        "multiplies cost and eats context. One sentence is an anecdote, not a corpus measurement: the corpus "
        "measurement across tokenizers follows below.</p>"
        + '<div class="grid2"><div>' + table + "</div><div>" + chart + "</div></div>"
        + check
        + corpus_html
        + '<p class="note">Chips alternate colours at token boundaries; · is a space, ↵ a newline. '
        "A <span style='border-bottom:2px dotted #b91c1c'>dotted underline</span> marks a token that holds only "
        "some of the bytes of a character (hover for which bytes). Arabic is shown in token (logical) order. "
        "Tokens per word counts characters as words for Chinese (/char).</p>"
        + "".join(chips)
    )
    worst = max(rows_data, key=lambda r: r["premium"])
    summary = [
        "tokens per sentence: " + ", ".join(f"{r['code']} {r['tokens']}" for r in rows_data),
        f"largest premium vs English: {worst['language']} {worst['premium']:.2f}× "
        f"({worst['bytes_per_token']:.2f} bytes/token vs {rows_data[0]['bytes_per_token']:.2f} for English)",
        *corpus_summary,
    ]
    data = {"languages": rows_data, "bytes_reconstructed": all_ok, "corpus": corpus_data}
    return Section("Tokenization across languages", body, summary, data)
