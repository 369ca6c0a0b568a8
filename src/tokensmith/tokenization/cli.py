"""``tokensmith tokenizer-report``: premiums and tokenizer metrics over a parallel corpus, HTML + CSV out.

    tokensmith tokenizer-report --tokenizers smollm2,minilm,qwen2.5 --languages en,de,ja --out DIR

Writes ``DIR/report.html`` (self-contained, inline SVG) and ``DIR/report.csv`` (the tidy table of
:class:`~tokensmith.tokenization.report.TokenizerReport`), plus ``DIR/report.png`` with ``--png`` when
matplotlib is installed. The corpus is Django's translation catalogs (offline) unless ``--corpus`` names a
saved ``datasets`` directory (``Dataset.save_to_disk``) or a CSV/JSON/Parquet file with one column per
language.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tokensmith.cli import register_subcommand

__all__ = ["add_arguments", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--tokenizers",
        default="smollm2,minilm,qwen2.5",
        help="comma-separated offline tokenizer names (smollm2, minilm, qwen2.5, qwen3.6, mistral-sp, "
        "tekken) or local HF tokenizer paths (default: %(default)s)",
    )
    p.add_argument(
        "--languages",
        default="en,de,fr,es,ru,zh_Hans,ja,ar,hi",
        help="comma-separated language codes / corpus columns (default: %(default)s)",
    )
    p.add_argument(
        "--reference", default="en", help="reference language of the premium (default: %(default)s)"
    )
    p.add_argument(
        "--corpus",
        default=None,
        help="a Dataset.save_to_disk directory or a .csv/.json/.jsonl/.parquet file (default: Django catalogs)",
    )
    p.add_argument("--baseline", default=None, help="tokenizer name (among --tokenizers) for NSL")
    p.add_argument("--max-rows", type=int, default=None, help="use the first N parallel sentences")
    p.add_argument(
        "--n-boot", type=int, default=1000, help="bootstrap resamples for CIs (default: %(default)s)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="tokenizer-report", help="output directory (default: %(default)s)")
    p.add_argument("--png", action="store_true", help="also write report.png (needs matplotlib)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _load_corpus(spec: str | None):
    if spec is None:
        return None
    import datasets

    p = Path(spec)
    if p.is_dir():
        return datasets.load_from_disk(str(p))
    if not p.is_file():
        raise FileNotFoundError(f"--corpus {spec}: no such file or directory")
    suffix = p.suffix.lower()
    kind = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}.get(suffix)
    if kind is None:
        raise ValueError(
            f"--corpus: unsupported file type {suffix!r} (use .csv, .json, .jsonl, .parquet or a "
            "save_to_disk directory)"
        )
    return datasets.load_dataset(kind, data_files=str(p), split="train")


def _tokenizers(spec: str) -> dict:
    from tokensmith.tokenization.tokenizers import TOKENIZERS

    out: dict = {}
    for name in [s.strip() for s in spec.split(",") if s.strip()]:
        if name.lower() in TOKENIZERS:
            out[name] = name
        elif Path(name).exists():
            from transformers import AutoTokenizer

            out[Path(name).name] = AutoTokenizer.from_pretrained(name)
        else:
            raise ValueError(
                f"unknown tokenizer {name!r}: use one of {', '.join(TOKENIZERS)} or a local path"
            )
    return out


def run(args: argparse.Namespace) -> int:
    from tokensmith.tokenization.report import report

    try:
        corpus = _load_corpus(args.corpus)
        r = report(
            _tokenizers(args.tokenizers),
            corpus,
            languages=args.languages,
            reference=args.reference,
            baseline=args.baseline,
            n_boot=args.n_boot,
            seed=args.seed,
            max_rows=args.max_rows,
            progress=not args.quiet,
        )
    except (ValueError, TypeError, ImportError, FileNotFoundError, KeyError) as e:
        print(f"tokensmith tokenizer-report: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    r.to_html(out / "report.html")
    r.to_csv(out / "report.csv")
    if args.png:
        try:
            r.plot(out / "report.png")
        except ImportError as e:
            print(f"tokensmith tokenizer-report: no PNG ({e})", file=sys.stderr)
    prem = r.premiums()
    print(f"{r.meta['n_sentences']} parallel sentences, reference {r.reference}; token premium:")
    print(prem.round(2).to_string())
    for name, s in r.summary.items():
        u = s["unfairness"]
        ci = u.get("max_min_ratio_ci")
        print(
            f"{name}: max/min premium {u['max_min_ratio']:.2f}"
            + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")
            + f" ({u['argmax']} / {u['argmin']}), Gini {u['gini']:.3f}, numbers {s['number_style']['style']}"
        )
    print(f"wrote {out / 'report.html'} and {out / 'report.csv'}")
    return 0


register_subcommand(
    "tokenizer-report",
    "tokenizer premiums and metrics over a parallel corpus (HTML + CSV)",
    add_arguments,
    run,
)
