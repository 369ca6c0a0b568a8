"""``tokenization.report``: tokenizers × languages over a parallel corpus -> a tidy table, plots, HTML, CSV.

:func:`report` encodes every language of a parallel ``datasets.Dataset`` with every tokenizer (one batched
call per chunk, progress bar), computes the metrics of :mod:`tokensmith.tokenization.metrics` per
(tokenizer, language), the premium of every language against the reference language with a paired bootstrap
CI, and per tokenizer the unfairness summary (max/min premium ratio, Gini, CIs), the unused-vocabulary share
and the number-splitting style.

**Table layout: tidy (long).** :attr:`TokenizerReport.data` has one row per *tokenizer × language ×
metric*, columns ``tokenizer, language, metric, value, ci_low, ci_high`` (CIs only where bootstrapped, else
NaN). Rows with ``language == "ALL"`` are per-tokenizer numbers (over the whole corpus, or across languages
for the unfairness statistics). :meth:`TokenizerReport.wide` pivots to one row per tokenizer × language and
one column per metric; :meth:`TokenizerReport.premiums` to tokenizer × language.

Metrics per language: ``tokens, words, chars, bytes, fertility, char_unit_share, pcw, bytes_per_token,
chars_per_token, premium (CI), byte_premium, char_premium, nsl`` (with a baseline), ``unk_rate,
byte_fallback_rate, partial_char_rate, renyi_2.5, unigram_entropy, types``. Per tokenizer (``ALL``):
``vocab_size, unused_vocab_share, renyi_1, renyi_2.5, renyi_3, unigram_entropy, zipf_exponent,
compression_zlib, max_digits_per_token, max_min_ratio (CI), gini (CI), max_premium, min_premium,
seconds_encode``. Strings (family, number style, worst language) live in :attr:`TokenizerReport.summary`.

Examples:
    >>> from tokensmith.tokenization.report import report
    >>> r = report(["smollm2", "minilm"], languages=["en", "de", "ja"], n_boot=100)  # doctest: +SKIP
    >>> r.premiums()                                                                     # doctest: +SKIP
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tokensmith.tokenization import metrics as M

__all__ = [
    "TokenizerReport",
    "report",
    "bundled_report",
    "BUNDLED_TOKENIZERS",
    "resolve_tokenizers",
    "grouped_bar_svg",
    "heatmap_table",
]

_SKIP_COLUMNS = {"key", "domain", "id", "idx", "index", "url", "topic", "split"}
_LANG_METRICS = (
    "tokens",
    "words",
    "chars",
    "bytes",
    "fertility",
    "char_unit_share",
    "pcw",
    "bytes_per_token",
    "chars_per_token",
    "unk_rate",
    "byte_fallback_rate",
    "partial_char_rate",
    "renyi_2.5",
    "unigram_entropy",
    "types",
)
_ALL_METRICS = (
    "vocab_size",
    "unused_vocab_share",
    "renyi_1",
    "renyi_2.5",
    "renyi_3",
    "unigram_entropy",
    "zipf_exponent",
    "compression_zlib",
)


def resolve_tokenizers(tokenizers: Any) -> dict[str, Any]:
    """``name -> tokenizer`` from a dict, a list of names/objects, or a comma-separated string.

    Names are loaded with :func:`tokensmith.tokenization.tokenizers.load_tokenizer` (``"smollm2"``,
    ``"minilm"``, ``"qwen2.5"``, ``"tekken"``, ...); objects are named by ``name_or_path`` or class.

    Args:
        tokenizers: The tokenizers.
    """
    from tokensmith.tokenization.tokenizers import load_tokenizer

    if isinstance(tokenizers, str):
        tokenizers = [t.strip() for t in tokenizers.split(",") if t.strip()]
    if isinstance(tokenizers, Mapping):
        items = list(tokenizers.items())
    else:
        items = []
        for t in tokenizers:
            name = (
                t
                if isinstance(t, str)
                else str(getattr(t, "name_or_path", "") or getattr(t, "name", "") or type(t).__name__)
            )
            items.append((name, t))
    if not items:
        raise ValueError("no tokenizers given")
    out: dict[str, Any] = {}
    for name, t in items:
        if name in out:
            raise ValueError(f"tokenizer name {name!r} given twice: pass a dict with distinct names")
        out[name] = load_tokenizer(t) if isinstance(t, str) else t
    return out


def _corpus_languages(corpus: Any, languages: Sequence[str] | None, reference: str) -> list[str]:
    cols = list(corpus.column_names)
    text_cols = [c for c in cols if c not in _SKIP_COLUMNS]
    if languages is None:
        langs = text_cols
    else:
        if isinstance(languages, str):
            languages = [x.strip() for x in languages.split(",") if x.strip()]
        langs = list(dict.fromkeys(languages))
        missing = [x for x in langs if x not in cols]
        if missing:
            raise ValueError(
                f"languages {missing} are not columns of the corpus; it has: {', '.join(text_cols)}"
            )
    if reference not in langs:
        if reference not in cols:
            raise ValueError(
                f"reference language {reference!r} is not a column of the corpus ({', '.join(text_cols)})"
            )
        langs = [reference, *langs]
    return langs


@dataclass
class TokenizerReport:
    """Result of :func:`report` (see the module docs for the table layout).

    Attributes:
        data: Tidy ``pandas.DataFrame``: ``tokenizer, language, metric, value, ci_low, ci_high``.
        summary: Per tokenizer: ``family``, ``lossless``, ``vocab_size``, ``unfairness``
            (:func:`~tokensmith.tokenization.metrics.unfairness_summary`), ``number_style``, ``seconds``.
        reference: The reference language of the premiums.
        languages: Languages in report order.
        tokenizers: Tokenizer names in report order.
        meta: Corpus size, bootstrap settings, seed, baseline.
    """

    data: Any
    summary: dict[str, dict[str, Any]]
    reference: str
    languages: list[str]
    tokenizers: list[str]
    meta: dict[str, Any] = field(default_factory=dict)

    def wide(self) -> Any:
        """One row per tokenizer × language, one column per metric (values only)."""
        w = self.data.pivot_table(
            index=["tokenizer", "language"], columns="metric", values="value", aggfunc="first"
        )
        return w.reindex(
            [(t, lang) for t in self.tokenizers for lang in [*self.languages, "ALL"] if (t, lang) in w.index]
        )

    def metric(self, name: str) -> Any:
        """``tokenizer × language`` DataFrame of one metric."""
        d = self.data[self.data.metric == name]
        if d.empty:
            raise KeyError(f"no metric {name!r}; have: {sorted(self.data.metric.unique())}")
        p = d.pivot(index="tokenizer", columns="language", values="value")
        cols = [c for c in [*self.languages, "ALL"] if c in p.columns]
        return p.reindex(index=self.tokenizers, columns=cols)

    def premiums(self) -> Any:
        """``tokenizer × language`` DataFrame of token premiums vs the reference."""
        return self.metric("premium")

    def to_csv(self, path: str | Path) -> Path:
        """Write the tidy table as CSV (UTF-8); returns the path."""
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        self.data.to_csv(p, index=False)
        return p

    # ------------------------------------------------------------------------------------ plots
    def plot(self, path: str | Path | None = None) -> Any:
        """Matplotlib figure: premium per language per tokenizer (grouped bars, 95% CI whiskers) and a
        premium heatmap. Needs ``matplotlib`` (``pip install matplotlib``); :meth:`to_html` does not.

        Args:
            path: Save the figure there (PNG/SVG/PDF by suffix) when given.
        """
        try:
            import matplotlib

            matplotlib.use("Agg", force=False)
            import matplotlib.pyplot as plt
        except ImportError as e:  # pragma: no cover
            raise ImportError(
                "TokenizerReport.plot needs matplotlib: pip install matplotlib "
                "(or use to_html(), which draws SVG itself)"
            ) from e
        prem = self.premiums()[self.languages]
        d = self.data[self.data.metric == "premium"].set_index(["tokenizer", "language"])
        fig, (ax1, ax2) = plt.subplots(
            1, 2, figsize=(6 + 0.9 * len(self.languages), 4.2), gridspec_kw={"width_ratios": [3, 2]}
        )
        n_t = len(self.tokenizers)
        x = np.arange(len(self.languages))
        w = 0.8 / max(n_t, 1)
        for k, t in enumerate(self.tokenizers):
            vals = prem.loc[t].to_numpy(dtype=float)
            lo = np.array([d.loc[(t, lang), "ci_low"] for lang in self.languages], dtype=float)
            hi = np.array([d.loc[(t, lang), "ci_high"] for lang in self.languages], dtype=float)
            err = np.vstack([np.nan_to_num(vals - lo), np.nan_to_num(hi - vals)])
            ax1.bar(x + (k - (n_t - 1) / 2) * w, vals, w, yerr=err, capsize=2, label=t)
        ax1.axhline(1.0, color="k", ls="--", lw=0.8)
        ax1.set_xticks(x, self.languages)
        ax1.set_ylabel(f"token premium vs {self.reference}")
        ax1.legend(fontsize=8)
        im = ax2.imshow(prem.to_numpy(dtype=float), cmap="OrRd", aspect="auto")
        ax2.set_xticks(x, self.languages)
        ax2.set_yticks(np.arange(n_t), self.tokenizers)
        arr = prem.to_numpy(dtype=float)
        mid = np.nanmin(arr) + 0.6 * (np.nanmax(arr) - np.nanmin(arr))
        for i in range(n_t):
            for j in range(len(self.languages)):
                ax2.text(
                    j,
                    i,
                    f"{arr[i, j]:.2f}",
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if arr[i, j] > mid else "black",
                )
        fig.colorbar(im, ax=ax2, shrink=0.8)
        fig.tight_layout()
        if path is not None:
            fig.savefig(path, dpi=120)
        return fig

    def to_html(self, path: str | Path | None = None, *, title: str = "Tokenizer report") -> str:
        """A self-contained HTML page (inline SVG, no matplotlib, no external assets); written to ``path``
        when given. Returns the HTML."""
        from tokensmith.report import html as H

        prem = self.premiums()
        body_sum = H.table(
            [
                "tokenizer",
                "family",
                "|V|",
                "lossless",
                "max/min premium",
                "95% CI",
                "Gini",
                "95% CI",
                "unused vocab",
                "numbers",
                "encode s",
            ],
            [
                [
                    t,
                    s["family"],
                    s["vocab_size"],
                    s["lossless"],
                    f"{s['unfairness']['max_min_ratio']:.2f}",
                    _ci(s["unfairness"].get("max_min_ratio_ci")),
                    f"{s['unfairness']['gini']:.3f}",
                    _ci(s["unfairness"].get("gini_ci"), 3),
                    f"{100 * s['unused_vocab_share']:.1f}%",
                    s["number_style"]["style"],
                    f"{s['seconds']:.2f}",
                ]
                for t, s in self.summary.items()
            ],
            numeric=(2, 4, 5, 6, 7, 8, 10),
        )
        chart = grouped_bar_svg(
            self.languages,
            {t: [float(prem.at[t, lang]) for lang in self.languages] for t in self.tokenizers},
            title=f"Token premium |τ(C_L)| / |τ(C_{self.reference})| (dashed: 1×)",
            ref=1.0,
        )
        heat = heatmap_table(prem[self.languages], fmt="{:.2f}")
        wide = self.wide()
        cols = [
            c
            for c in (
                "tokens",
                "fertility",
                "char_unit_share",
                "pcw",
                "bytes_per_token",
                "premium",
                "byte_premium",
                "nsl",
                "unk_rate",
                "partial_char_rate",
                "renyi_2.5",
            )
            if c in wide.columns
        ]
        rows = []
        for (t, lang), r in wide.iterrows():
            if lang == "ALL":
                continue
            rows.append([t, lang, *[_num(r.get(c), c in _COUNTS) for c in cols]])
        detail = H.table(["tokenizer", "language", *cols], rows, numeric=range(2, 2 + len(cols)))
        m = self.meta
        notes = (
            f"<p class='note'>Corpus: {H.esc(m.get('corpus', ''))}; {m.get('n_sentences')} parallel sentences per "
            f"language. Premium = total tokens of language L / total tokens of the same sentences in "
            f"{H.esc(self.reference)}; CIs: paired percentile bootstrap over sentences, {m.get('n_boot')} resamples, "
            f"seed {m.get('seed')}. Fertility = tokens per word; for scripts without spaces (Han, kana, Thai, ...) "
            "every character is a unit (char_unit_share = 1 means tokens per character). byte_premium is the "
            "UTF-8 byte ratio (the script's cost, tokenizer-independent).</p>"
        )
        flags = [
            f"{t}: {', '.join(s['unk_over_10pct'])}" for t, s in self.summary.items() if s["unk_over_10pct"]
        ]
        if flags:
            notes += (
                "<p class='note'><b>More than 10% UNK tokens</b> (the text is largely unrepresentable, so its "
                f"token counts understate the cost): {H.esc('; '.join(flags))}</p>"
            )
        sections = [
            ("summary", "Tokenizers", body_sum + notes),
            ("premium", "Premium per language", chart + heat),
            ("detail", "Metrics per tokenizer and language", detail),
        ]
        page = H.page(
            title,
            sections,
            subtitle=f"{len(self.tokenizers)} tokenizers × {len(self.languages)} languages, "
            f"reference {self.reference}",
            footer="tokensmith.tokenization.report",
        )
        if path is not None:
            p = Path(path)
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(page, encoding="utf-8")
        return page


_COUNTS = {"tokens", "words", "chars", "bytes", "types", "vocab_size"}


def _num(v: Any, count: bool = False) -> Any:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return int(v) if count else float(v)


def _ci(ci: Any, digits: int = 2) -> str:
    if not ci:
        return "–"
    return f"[{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


_PALETTE = ("#6366f1", "#f59e0b", "#10b981", "#ef4444", "#0ea5e9", "#a855f7", "#84cc16", "#64748b")


def grouped_bar_svg(
    labels: Sequence[str],
    series: Mapping[str, Sequence[float]],
    *,
    title: str = "",
    ref: float | None = None,
    unit: str = "×",
    width: int = 640,
    bar_h: int = 12,
) -> str:
    """Horizontal grouped bars as inline SVG: one group per label, one bar per series (legend on top).

    Args:
        labels: Group labels (e.g. languages).
        series: Series name -> one value per label (e.g. tokenizer -> premiums).
        title: Chart title.
        ref: Draw a dashed reference line at this value.
        unit: Suffix of the value labels.
        width: SVG width in pixels.
        bar_h: Height of one bar.
    """
    from tokensmith.report import html as H

    names = list(series)
    vals = [[float(v) for v in series[n]] for n in names]
    if any(len(v) != len(labels) for v in vals):
        raise ValueError("every series needs one value per label")
    finite = [v for s in vals for v in s if math.isfinite(v)]
    vmax = max([*finite, ref or 0.0, 1e-12])
    label_w, pad = 90, 56
    top = (24 if title else 4) + 16
    group_h = len(names) * bar_h + 8
    h = top + len(labels) * group_h + 8
    plot_w = width - label_w - pad
    parts = [
        f'<svg width="{width}" height="{h}" viewBox="0 0 {width} {h}" role="img" '
        f'aria-label="{H.esc(title or "grouped bar chart")}" font-family="sans-serif" font-size="11">'
    ]
    if title:
        parts.append(f'<text x="0" y="16" font-weight="600" font-size="12">{H.esc(title)}</text>')
    x = label_w
    for k, n in enumerate(names):
        c = _PALETTE[k % len(_PALETTE)]
        parts.append(
            f'<rect x="{x}" y="{top - 14}" width="10" height="10" fill="{c}"/>'
            f'<text x="{x + 13}" y="{top - 5}">{H.esc(n)}</text>'
        )
        x += 20 + 7 * len(n)
    for i, lab in enumerate(labels):
        y0 = top + i * group_h
        parts.append(
            f'<text x="{label_w - 6}" y="{y0 + group_h / 2 + 2:.1f}" text-anchor="end">{H.esc(lab)}</text>'
        )
        for k, n in enumerate(names):
            v = vals[k][i]
            if not math.isfinite(v):
                continue
            y = y0 + k * bar_h
            w = max(1.0, plot_w * v / vmax)
            c = _PALETTE[k % len(_PALETTE)]
            parts.append(
                f'<rect x="{label_w}" y="{y}" width="{w:.1f}" height="{bar_h - 2}" fill="{c}">'
                f"<title>{H.esc(n)} · {H.esc(lab)}: {v:.2f}{H.esc(unit)}</title></rect>"
            )
            parts.append(
                f'<text x="{label_w + w + 3:.1f}" y="{y + bar_h - 3}" font-size="9">{v:.2f}{H.esc(unit)}</text>'
            )
    if ref is not None:
        xr = label_w + plot_w * ref / vmax
        parts.append(
            f'<line x1="{xr:.1f}" y1="{top - 2}" x2="{xr:.1f}" y2="{h - 4}" stroke="#111827" '
            'stroke-dasharray="4 3"/>'
        )
    parts.append("</svg>")
    return "".join(parts)


def _heat(v: float, lo: float, hi: float) -> str:
    t = 0.0 if not math.isfinite(v) or hi <= lo else min(max((v - lo) / (hi - lo), 0.0), 1.0)
    a, b = (255, 255, 255), (220, 38, 38)
    r, g, bl = (round(a[i] + (b[i] - a[i]) * t) for i in range(3))
    return f"#{r:02x}{g:02x}{bl:02x}"


def heatmap_table(frame: Any, *, fmt: str = "{:.2f}") -> str:
    """A ``pandas.DataFrame`` as an HTML table whose cells are coloured white (min) to red (max).

    Args:
        frame: Rows × columns of numbers.
        fmt: Cell number format.
    """
    from tokensmith.report import html as H

    arr = frame.to_numpy(dtype=float)
    fin = arr[np.isfinite(arr)]
    lo, hi = (float(fin.min()), float(fin.max())) if fin.size else (0.0, 1.0)
    head = "<tr><th></th>" + "".join(f'<th class="num">{H.esc(c)}</th>' for c in frame.columns) + "</tr>"
    body = []
    for name, row in zip(frame.index, arr, strict=True):
        cells = "".join(
            f'<td class="num" style="background:{_heat(v, lo, hi)}">{H.esc(fmt.format(v))}</td>' for v in row
        )
        body.append(f"<tr><th>{H.esc(name)}</th>{cells}</tr>")
    return f'<table class="t"><thead>{head}</thead><tbody>{"".join(body)}</tbody></table>'


#: The offline tokenizers :func:`bundled_report` compares (each skipped with a reason when it cannot load).
BUNDLED_TOKENIZERS = ("smollm2", "minilm", "qwen2.5", "tekken")


@functools.lru_cache(maxsize=8)
def _bundled(
    languages: tuple[str, ...], names: tuple[str, ...], n_boot: int, max_rows: int | None, seed: int
) -> tuple[TokenizerReport, tuple[tuple[str, str], ...]]:
    from tokensmith.tokenization.tokenizers import load_tokenizer

    toks, skipped = {}, []
    for n in names:
        try:
            toks[n] = load_tokenizer(n)
        except (ImportError, OSError, ValueError, RuntimeError) as e:
            skipped.append((n, f"{type(e).__name__}: {e}"))
    if not toks:
        raise RuntimeError(
            "none of the bundled tokenizers could be loaded: " + "; ".join(f"{n}: {r}" for n, r in skipped)
        )
    r = report(
        toks,
        languages=list(languages),
        reference=languages[0],
        n_boot=n_boot,
        max_rows=max_rows,
        seed=seed,
        progress=False,
    )
    return r, tuple(skipped)


def bundled_report(
    languages: Sequence[str],
    *,
    names: Sequence[str] = BUNDLED_TOKENIZERS,
    n_boot: int = 200,
    max_rows: int | None = None,
    seed: int = 0,
) -> tuple[TokenizerReport, dict[str, str]]:
    """:func:`report` of the offline tokenizers on the Django corpus, memoised per process (the demo's
    cross-tokenizer premium chart). The first language is the reference. Do not mutate the result.

    Args:
        languages: Language codes (first = reference).
        names: Tokenizer names for :func:`~tokensmith.tokenization.tokenizers.load_tokenizer`.
        n_boot: Bootstrap resamples.
        max_rows: Use the first ``max_rows`` parallel sentences.
        seed: Bootstrap seed.

    Returns:
        ``(report, skipped)`` where ``skipped`` maps a tokenizer that could not load to the reason.
    """
    from tokensmith.tokenization.corpus import normalize_language

    langs = tuple(dict.fromkeys(normalize_language(x) for x in languages))
    r, skipped = _bundled(langs, tuple(names), int(n_boot), max_rows, int(seed))
    return r, dict(skipped)


def report(
    tokenizers: Any,
    corpus: Any = None,
    *,
    languages: Sequence[str] | None = None,
    reference: str = "en",
    baseline: Any = None,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    max_rows: int | None = None,
    batch_size: int = 2048,
    progress: bool = True,
) -> TokenizerReport:
    """Tokenizer × language report over a parallel corpus (see the module docs for the table).

    Args:
        tokenizers: ``{name: tokenizer}``, a list of names (loaded offline with
            :func:`~tokensmith.tokenization.tokenizers.load_tokenizer`) or objects, or ``"smollm2,minilm"``.
        corpus: A ``datasets.Dataset`` with one text column per language (aligned rows). Default: the Django
            catalogs (:func:`~tokensmith.tokenization.corpus.django_parallel_corpus`) for ``languages``
            (default ``en, de, fr, es, ru, zh_Hans, ja, ar, hi``).
        languages: Columns to use (default: every text column of ``corpus``).
        reference: The premium's reference language (a column; added when not in ``languages``).
        baseline: A tokenizer name among ``tokenizers`` (or a tokenizer) for NSL; ``None``: no NSL.
        n_boot: Bootstrap resamples for the CIs (0: none).
        level: CI level.
        seed: Bootstrap seed.
        max_rows: Use the first ``max_rows`` rows of the corpus.
        batch_size: Texts per batched encode call.
        progress: Progress bars.

    Raises:
        ValueError: Empty corpus, languages not in the corpus (lists the columns), empty texts.
    """
    import pandas as pd

    if corpus is None:
        from tokensmith.tokenization.corpus import django_parallel_corpus, normalize_language

        if isinstance(languages, str):
            languages = [x.strip() for x in languages.split(",") if x.strip()]
        langs_n = [
            normalize_language(x)
            for x in (languages or ["en", "de", "fr", "es", "ru", "zh_Hans", "ja", "ar", "hi"])
        ]
        reference = normalize_language(reference)
        if reference not in langs_n:
            langs_n = [reference, *langs_n]
        corpus = django_parallel_corpus(langs_n)
        languages = langs_n
        corpus_name = "Django locale catalogs (human translations; placeholders stripped)"
    else:
        corpus_name = getattr(getattr(corpus, "info", None), "dataset_name", None) or "user corpus"
    if not hasattr(corpus, "column_names"):
        raise TypeError(
            f"corpus must be a datasets.Dataset (or None for the Django corpus), got {type(corpus).__name__}"
        )
    if max_rows is not None:
        corpus = corpus.select(range(min(max_rows, len(corpus))))
    if len(corpus) == 0:
        raise ValueError("the corpus is empty: it needs at least one parallel sentence")
    langs = _corpus_languages(corpus, languages, reference)
    texts = {lang: list(corpus[lang]) for lang in langs}
    for lang, ts_ in texts.items():
        bad = [i for i, t in enumerate(ts_) if not isinstance(t, str) or not t.strip()]
        if bad:
            raise ValueError(
                f"column {lang!r} has {len(bad)} empty or non-string rows (first: row {bad[0]}); "
                "drop them before reporting (corpus.filter(...))"
            )
    toks = resolve_tokenizers(tokenizers)
    n = len(corpus)
    flat = [t for lang in langs for t in texts[lang]]
    base_lengths = None
    if baseline is not None:
        btok = (
            toks[baseline]
            if isinstance(baseline, str) and baseline in toks
            else (resolve_tokenizers([baseline])[baseline] if isinstance(baseline, str) else baseline)
        )
        base_lengths = M.encode_corpus(
            btok, flat, batch_size=batch_size, progress=progress, desc="baseline"
        ).lengths
    rows: list[tuple[str, str, str, float, float, float]] = []
    summary: dict[str, dict[str, Any]] = {}
    nan = float("nan")

    def add(t: str, lang: str, metric: str, v: Any, ci: Any = None) -> None:
        lo, hi = ci if ci else (nan, nan)
        rows.append((t, lang, metric, float(v) if v is not None else nan, float(lo), float(hi)))

    for name, tok in toks.items():
        view = M._as_view(tok)
        t0 = time.perf_counter()
        enc = M.encode_corpus(view, flat, batch_size=batch_size, progress=progress, desc=f"encode {name}")
        secs = time.perf_counter() - t0
        per: dict[str, M.EncodedCorpus] = {
            lang: enc.select(k * n, (k + 1) * n) for k, lang in enumerate(langs)
        }
        lengths = {lang: e.lengths for lang, e in per.items()}
        ref = per[reference]
        unf = M.unfairness_summary(lengths, reference, n_boot=n_boot, level=level, seed=seed)
        for k, lang in enumerate(langs):
            e = per[lang]
            m = M.corpus_metrics(
                e,
                alphas=(2.5,),
                codecs=(),
                baseline_lengths=None if base_lengths is None else base_lengths[k * n : (k + 1) * n],
            )
            for key in _LANG_METRICS:
                if key in m:
                    add(name, lang, key, m[key])
            if "nsl" in m:
                add(name, lang, "nsl", m["nsl"])
            add(name, lang, "premium", unf["premium"][lang], unf.get("premium_ci", {}).get(lang))
            add(name, lang, "byte_premium", M.tokenization_premium(e.n_bytes, ref.n_bytes))
            add(name, lang, "char_premium", M.tokenization_premium(e.n_chars, ref.n_chars))
        allm = M.corpus_metrics(enc, alphas=(1.0, 2.5, 3.0))
        for key in _ALL_METRICS:
            if key in allm:
                add(name, "ALL", key, allm[key])
        add(name, "ALL", "max_digits_per_token", allm["number_style"]["max_digits_per_token"])
        add(name, "ALL", "max_min_ratio", unf["max_min_ratio"], unf.get("max_min_ratio_ci"))
        add(name, "ALL", "gini", unf["gini"], unf.get("gini_ci"))
        add(name, "ALL", "max_premium", unf["max"])
        add(name, "ALL", "min_premium", unf["min"])
        add(name, "ALL", "seconds_encode", secs)
        if allm["unk_rate"] > 0.10:
            unf["unk_flag"] = True
        summary[name] = {
            "family": view.family,
            "lossless": bool(view.lossless),
            "vocab_size": view.vocab_size,
            "unused_vocab_share": allm["unused_vocab_share"],
            "number_style": allm["number_style"],
            "unfairness": unf,
            "unk_over_10pct": [
                lang
                for lang in langs
                if per[lang].ids.size and M.unk_rate(per[lang].ids, per[lang].unk_ids) > 0.10
            ],
            "seconds": secs,
        }
    data = pd.DataFrame(rows, columns=["tokenizer", "language", "metric", "value", "ci_low", "ci_high"])
    meta = {
        "corpus": corpus_name,
        "n_sentences": n,
        "n_boot": n_boot,
        "level": level,
        "seed": seed,
        "baseline": baseline if isinstance(baseline, str) or baseline is None else type(baseline).__name__,
    }
    return TokenizerReport(data, summary, reference, langs, list(toks), meta)
