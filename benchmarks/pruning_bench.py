"""Benchmark KV-cache pruning (``tokensmith.pruning`` presets) against no pruning and kvpress (not a test).

Tasks, built in code over real English text available offline (the prose of the Python standard library's
``pydoc_data.topics``: the language reference, markup, grammar and code blocks stripped):

1. **Needle in a haystack** (multi-key, copy style): ``--needles`` sentences "The magic number of the
   <key> is <5-digit number>." are inserted at sentence boundaries at spread depths into a contiguous
   haystack, making a context of ``--context-len`` tokens (SmolLM2 writes one token per digit). Each needle
   is asked for by a continuation prompt ("Question: What is the magic number of the <key>? Answer: The
   magic number of the <key> is"), greedy decoding ``--answer-tokens`` tokens; exact match of the number,
   and digit accuracy (the fraction of its digits right, position by position) as partial credit. The
   unpruned SmolLM2-135M-Instruct answers this form reliably without the chat template; with the chat
   template it restates the question before the number (``--chat`` and ``--check-variants`` measure that
   form), and single-token word needles ("The secret word of the <key> is <word>.", ``--needle-kind word``)
   made it confuse the keys (unpruned accuracy 0.5 in the development runs).
2. **Continuation NLL**: the 64 real tokens that follow the haystack in the text, teacher forced through
   the pruned cache; mean NLL per token (and perplexity), paired with the unpruned model on the same tokens.

Protocol A (both libraries, the same code: ``kvpress_runner.run_sample``): prefill the *context only*
with compression on, then feed the question (or the continuation) through the pruned cache and decode,
without further compression: kvpress's pipeline protocol ("compress the context, then ask"). tokensmith's
prefill is ``with preset.apply(adapter) as report: adapter.forward(ctx, use_cache=True)``; kvpress's is
``with press(model): model(ctx, past_key_values=DynamicCache())``. Protocol B (``--qa-presets``, default
SnapKV at 0.5): the question is part of the compressed prompt (SnapKV's own setting: the observation window
holds the question): ``with preset.apply(adapter): adapter.generate(ctx + question)``; kvpress: the same
prompt prefilled under the press, then the shared greedy loop.

Measured per preset and ratio (fraction of the context's KV removed: 0.25 / 0.5 / 0.75), all against no
pruning in the same run: needle accuracy, continuation NLL / perplexity, prefill time (compression
included), decode time per step (greedy steps through the pruned cache, all of a sample's questions in one
batch), KV bytes held (measured from the
cache tensors; tokensmith's ``report.kv_bytes_before/after`` are checked against them), and process memory:
peak RSS during the prefill and RSS retained after it (``VmHWM``/``VmRSS`` with ``/proc/self/clear_refs``,
``MALLOC_MMAP_THRESHOLD_=65536`` so freed tensors return to the OS; see ``proc_memory.py``). For every
sample all configurations run back to back in an order rotated per sample, and times are reported as the
median of per-sample paired ratios against no pruning.

Goals (issue 9): at 50% KV compression, SnapKV needle accuracy >= 95% of the unpruned model's; real memory
savings reported; quality at least equal to kvpress's press of the same name.

kvpress runs in its own venv (it pins its own transformers) through ``--kvpress-python``: the same token
ids, the same converted SmolLM2 safetensors directory, its presses of the same name (SnapKVPress,
PyramidKVPress, StreamingLLMPress, ObservedAttentionPress for H2O, KnormPress, RandomPress; kvpress has no
SepLLM press) at the same ratios, each library with its own default hyper-parameters (differences are
listed in the markdown).

Usage::

    python benchmarks/pruning_bench.py --quick                 # < 1 min smoke run (_quick suffix)
    python benchmarks/pruning_bench.py                         # tokensmith only: 9-10 min (1 thread, shared machine)
    python benchmarks/pruning_bench.py --kvpress-python /tmp/kvpress_venv/bin/python   # + kvpress: 14-19 min
    # (--kvpress-ratios 0.5 runs kvpress at 50% only: about 4 min less)

Sizes (defaults): 2 haystacks x 384 tokens x 4 needles (8 questions per configuration, 128 continuation
tokens), 7 presets x 3 ratios + no pruning; 1 torch thread (on the shared 2-core machine 2 threads ran 2-5x
*slower* than 1 in the development runs: the cores are oversubscribed); seed 0. The kvpress venv:
``python3.11 -m venv /tmp/kvpress_venv``, then ``pip install /opt/wheels/torch-2.13.0+cpu-*.whl`` (torch
first, so pip never resolves a CUDA torch), then ``pip install kvpress`` (0.5.5 installs transformers 5.2.0,
which reads tokensmith's converted SmolLM2 directory as is: the unpruned logits of both sides agree).

Writes ``benchmarks/results/pruning_bench.json`` and ``.md`` (``--quick`` and other models add a suffix).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import kvpress_runner as proto  # noqa: E402
from proc_memory import write_results  # noqa: E402

DEFAULT_MODEL = "smollm2-135m-instruct"
RESULTS = Path(__file__).resolve().parent / "results"
PRESETS = ("snapkv", "pyramidkv", "streaming_llm", "sepllm", "h2o", "key_norm", "random")
KEYS = (
    "red door", "silver key", "old bridge", "green lamp", "north tower", "wooden box", "blue river",
    "stone gate", "small garden", "iron clock", "white ship", "quiet library", "golden bell", "paper kite",
)  # fmt: skip
WORDS = (
    "apple tiger candle mirror rocket violin pepper marble dragon castle lemon jacket pencil island falcon copper "
    "meadow saddle anchor basket bottle cactus dolphin engine forest glacier hammer jungle ladder magnet needle "
    "orange parrot pirate rabbit tomato turtle wallet window yellow zebra banana piano camera carpet cotton desert "
    "eagle feather guitar helmet kettle lizard monkey onion pillow planet puzzle salmon spider sugar thunder tunnel"
).split()  # single SmolLM2 tokens with a leading space; none is a word of KEYS
KIND = {  # needle sentence, continuation question, chat question
    "number": (
        " The magic number of the {key} is {val}.",
        "\n\nQuestion: What is the magic number of the {key}? Answer: The magic number of the {key} is",
        "What is the magic number of the {key}?",
    ),
    "word": (
        " The secret word of the {key} is {val}.",
        "\n\nQuestion: What is the secret word of the {key}? Answer: The secret word of the {key} is",
        "What is the secret word of the {key}?",
    ),
}
# each library's defaults that differ for the presses of the same name (shown in the markdown)
DIFFERENCES = {
    "snapkv": "window 32, max-pooling (kernel 5) | kvpress: window 64, avg-pooling (kernel 5)",
    "pyramidkv": "SnapKV scores, linear per-layer budgets (mean 1-ratio) | kvpress: window 64, beta 20 budgets",
    "streaming_llm": "4 sinks + most recent | same",
    "sepllm": "4 initial + 64 recent + separators (newest first) | no kvpress press",
    "h2o": "summed attention of all prompt queries + 16 recent protected | kvpress ObservedAttention: attention "
    "averaged over the queries that see each key, no recent window, eager attention",
    "key_norm": "lowest key L2 norm | same",
    "random": "uniform (seeded) | uniform (seeded)",
    "snapkv_w64_avg": "tokensmith's SnapKV with kvpress's defaults (window 64, avg-pooling, kernel 5): a parity "
    "check against SnapKVPress",
}


# ----------------------------------------------------------------------------------------------- data
def prose_paragraphs() -> list[str]:
    """Paragraphs of English prose from the stdlib's ``pydoc_data.topics`` (the language reference): headings,
    indented grammar/code blocks, quotes markup and short fragments removed; in the modules' order."""
    import pydoc_data.topics as topics

    rule = re.compile(r"[*=\-^~]{3,}")
    out = []
    for key in sorted(topics.topics):
        lines = topics.topics[key].split("\n")
        cur: list[str] = []
        paras = []
        for i, ln in enumerate(lines):
            nxt = lines[i + 1] if i + 1 < len(lines) else ""
            if (
                rule.fullmatch(nxt.strip())
                or rule.fullmatch(ln.strip())
                or not ln.strip()
                or ln.startswith(" ")
            ):
                if cur:
                    paras.append(" ".join(cur))
                cur = []
                continue
            cur.append(ln.strip())
        if cur:
            paras.append(" ".join(cur))
        for p in paras:
            p = re.sub(r"\s+", " ", p.replace('"', "").replace("\u2019", "'")).strip()
            if len(p) >= 80 and p.endswith("."):
                out.append(p)
    return out


def make_samples(
    tok: Any,
    n_samples: int,
    ctx_len: int,
    n_needles: int,
    cont_len: int,
    seed: int,
    chat: bool = False,
    kind: str = "number",
    digits: int = 5,
) -> list[dict[str, Any]]:
    """``n_samples`` haystacks from disjoint stretches of the prose, each ``ctx_len`` tokens with
    ``n_needles`` needles at spread depths (over all samples the depths cover (0, 1) evenly), the questions,
    and the ``cont_len`` real tokens following the haystack."""
    rng = random.Random(seed)
    stream = tok(" ".join(prose_paragraphs()), add_special_tokens=False)["input_ids"]
    pieces = tok.convert_ids_to_tokens(stream)
    prefix: list[int] = []
    q_suffix = ""
    if chat:  # the context opens a user turn; the question closes it and opens the assistant's
        msgs = [{"role": "user", "content": "@@CTX@@" + "@@Q@@"}]
        full = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        head, rest = full.split("@@CTX@@")
        prefix = tok(head, add_special_tokens=False)["input_ids"]
        q_suffix = rest.split("@@Q@@")[1]
    samples = []
    span = len(stream) // n_samples
    for s in range(n_samples):
        keys = rng.sample(KEYS, n_needles)
        vals = (
            rng.sample(range(10 ** (digits - 1), 10**digits), n_needles)
            if kind == "number"
            else rng.sample(WORDS, n_needles)
        )
        needle_t, question_t, chat_t = KIND[kind]
        needles = [
            tok(needle_t.format(key=k, val=v), add_special_tokens=False)["input_ids"]
            for k, v in zip(keys, vals, strict=True)
        ]
        h_len = ctx_len - len(prefix) - sum(len(n) for n in needles)
        start = s * span + rng.randrange(0, max(1, span - h_len - cont_len))
        if start + h_len + cont_len > len(stream):
            raise ValueError(
                f"the prose has {len(stream)} tokens: too few for {n_samples} samples of {ctx_len}"
            )
        hay = stream[start : start + h_len]
        cont = stream[start + h_len : start + h_len + cont_len]
        # sentence boundaries: after a token ending in "." followed by a space-led token
        bounds = [
            i + 1
            for i in range(h_len - 1)
            if pieces[start + i].endswith(".") and pieces[start + i + 1].startswith("\u0120")
        ]
        depths = [(j + (s + 0.5) / n_samples) / n_needles for j in range(n_needles)]
        at = []
        for d in depths:
            b = min(bounds, key=lambda i: abs(i - d * h_len)) if bounds else int(d * h_len)
            at.append(b)
        ctx = list(prefix)
        prev = 0
        for b, nd in sorted(zip(at, needles, strict=True), key=lambda x: x[0]):
            ctx += hay[prev:b] + nd
            prev = b
        ctx += hay[prev:]
        qs = []
        for k, v, d, b in zip(keys, vals, depths, at, strict=True):
            q = "\n\n" + chat_t.format(key=k) + q_suffix if chat else question_t.format(key=k)
            qs.append(
                {
                    "key": k,
                    "value": str(v),
                    "depth": round(d, 3),
                    "at_token": b + len(prefix),
                    "q_ids": tok(q, add_special_tokens=False)["input_ids"],
                }
            )
        samples.append({"ctx_ids": ctx, "cont_ids": cont, "questions": qs, "start": start})
    return samples


def correct(text: str, value: str, chat: bool = False) -> bool:
    """Exact match: the first number (or word, for word needles) of the answer is the needle's value; with
    continuation prompts it must come first, with the chat template anywhere after a restated question."""
    pat = r"\d+" if value.isdigit() else r"[A-Za-z]+"
    t = text.replace(",", "")
    if chat:
        t = re.sub(r"(?i)the (magic number|secret word) of the [a-z ]+? is", " ", t)
        m = re.search(pat, t)
    else:
        m = re.match(r"\s*(" + pat + ")", t)
    return bool(m) and m.group(m.lastindex or 0).lower() == value.lower()


# ----------------------------------------------------------------------------------------------- ours
# tokensmith presets with kvpress's default hyper-parameters: a parity check of the implementation (SnapKVPress:
# window 64, average pooling with kernel 5); compared with kvpress's press of the base name
VARIANTS = {"snapkv_w64_avg": ("snapkv", {"window": 64, "pooling": "avg"})}


def press_name(name: str) -> str:
    """The kvpress press a configuration is compared with (a variant's base preset)."""
    return VARIANTS[name][0] if name in VARIANTS else name


def make_reducer(name: str, ratio: float, seed: int) -> Any:
    from tokensmith.pruning import presets

    if name == "random":
        return presets.random(ratio=ratio, seed=seed)
    if name in VARIANTS:
        base, kw = VARIANTS[name]
        return getattr(presets, base)(ratio=ratio, **kw)
    return getattr(presets, name)(ratio=ratio)


def our_prefill(ad: Any, name: str, ratio: float, seed: int):
    """``prefill(ids) -> (cache, last logits, extra)`` with the preset's reducer around the forward."""

    @torch.no_grad()
    def prefill(ids: list[int]):
        x = {"input_ids": torch.tensor([ids], dtype=torch.long)}
        if name == "none":
            out = ad.forward(x, use_cache=True, logits_to_keep=1)
            return proto.out_cache(out), out.logits[0, -1].float(), {}
        red = make_reducer(name, ratio, seed)
        with red.apply(ad) as rep:
            out = ad.forward(x, use_cache=True, logits_to_keep=1)
        s = rep.summary()
        extra = {
            k: s[k]
            for k in (
                "physical",
                "kv_bytes_before",
                "kv_bytes_after",
                "kv_compression",
                "kept_fraction",
                "notes",
            )
        }
        return proto.out_cache(out), out.logits[0, -1].float(), extra

    return prefill


def our_qa(ad: Any, name: str, ratio: float, seed: int, sample: dict[str, Any], answer_tokens: int) -> dict:
    """Protocol B: the question is inside the compressed prompt; ``adapter.generate`` inside the block, all the
    sample's questions as one batch (equal lengths: no padding)."""
    rows = [sample["ctx_ids"] + q["q_ids"] for q in sample["questions"]]
    if len({len(r) for r in rows}) != 1:
        raise ValueError("question-aware protocol: the questions of a sample must have equal token lengths")
    ids = torch.tensor(rows, dtype=torch.long)
    t = time.perf_counter()
    with make_reducer(name, ratio, seed).apply(ad) as rep:
        out = ad.generate({"input_ids": ids}, max_new_tokens=answer_tokens, eos_token_id=None)
    dt = time.perf_counter() - t
    return {
        "answers": [[int(x) for x in row] for row in out.new_tokens],
        "generate_s": dt,
        "kv_compression": rep.kv_compression,
        "physical": rep.physical,
    }


# ----------------------------------------------------------------------------------------------- kvpress
def smollm2_dir() -> Path:
    """The converted SmolLM2 safetensors directory tokensmith's zoo caches (built on first use)."""
    from tokensmith.models import zoo

    d, _ = zoo._smollm2_model_dir()
    return Path(d)


def run_kvpress(
    args: argparse.Namespace,
    samples: list[dict],
    configs: list[tuple[str, float]],
    qa: list[tuple[str, float]],
) -> dict:
    job = {
        "model_dir": str(smollm2_dir()),
        "samples": samples,
        "configs": configs,
        "qa_configs": qa,
        "threads": args.threads,
        "seed": args.seed,
        "answer_tokens": args.answer_tokens,
        "load_average_start": list(os.getloadavg()),
    }
    with tempfile.TemporaryDirectory() as d:
        jp, rp = Path(d) / "job.json", Path(d) / "result.json"
        jp.write_text(json.dumps(job), encoding="utf-8")
        env = dict(
            os.environ,
            MALLOC_MMAP_THRESHOLD_="65536",
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_VERBOSITY="error",
            TQDM_DISABLE="1",
            PYTHONPATH="",
        )
        t = time.perf_counter()
        p = subprocess.run(
            [args.kvpress_python, str(Path(__file__).with_name("kvpress_runner.py")), str(jp), str(rp)],
            env=env,
            capture_output=True,
            text=True,
        )
        if p.returncode != 0:
            tail = (p.stderr or p.stdout)[-3000:]
            print(f"kvpress FAILED (rc {p.returncode}):\n{tail}", flush=True)
            return {"error": tail}
        out = json.loads(rp.read_text(encoding="utf-8"))
        out["wall_s"] = time.perf_counter() - t
        return out


# ----------------------------------------------------------------------------------------------- scoring
def digit_score(text: str, value: str) -> float:
    """Partial credit for a number needle: the fraction of the value's digits that the answer's first number
    has right, position by position (0 when the answer has no number)."""
    m = re.search(r"\d+", text.replace(",", ""))
    got = m.group(0) if m else ""
    return sum(a == b for a, b in zip(got, value, strict=False)) / len(value)


def score_row(tok: Any, samples: list[dict], res: list[dict], chat: bool) -> dict[str, Any]:
    hits, n, digits, nlls, per_q = 0, 0, 0.0, [], []
    for s, r in zip(samples, res, strict=True):
        nlls += r["cont_nll"]
        for q, a in zip(s["questions"], r["answers"], strict=True):
            text = tok.decode(a, skip_special_tokens=True)
            ok = correct(text, q["value"], chat)
            hits += ok
            n += 1
            digits += digit_score(text, q["value"]) if q["value"].isdigit() else float(ok)
            per_q.append({"depth": q["depth"], "value": q["value"], "answer": text, "correct": ok})
    return {
        "needle_acc": hits / max(1, n),
        "needle_digits": digits / max(1, n),
        "needle_n": n,
        "nll": sum(nlls) / max(1, len(nlls)),
        "tokens_scored": len(nlls),
        "per_question": per_q,
    }


def qa_score(tok: Any, samples: list[dict], res: list[dict], chat: bool) -> dict[str, Any]:
    pairs = [
        (tok.decode(a, skip_special_tokens=True), q["value"])
        for s, r in zip(samples, res, strict=True)
        for q, a in zip(s["questions"], r["answers"], strict=True)
    ]
    hits = [correct(t, v, chat) for t, v in pairs]
    dig = [digit_score(t, v) if v.isdigit() else float(h) for (t, v), h in zip(pairs, hits, strict=True)]
    return {
        "needle_acc": sum(hits) / max(1, len(hits)),
        "needle_digits": sum(dig) / max(1, len(dig)),
        "needle_n": len(hits),
        "answers": [t for t, _ in pairs],
    }


def _med(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return statistics.median(xs) if xs else None


def aggregate(
    tok: Any, samples: list[dict], rows: dict[tuple[str, float], list[dict]], chat: bool
) -> list[dict]:
    base = rows[("none", 0.0)]
    out = []
    for (name, ratio), res in rows.items():
        sc = score_row(tok, samples, res, chat)
        r = {"preset": name, "ratio": ratio, **{k: v for k, v in sc.items() if k != "per_question"}}
        r["ppl"] = math.exp(r["nll"])
        r["prefill_s"] = _med([x["prefill_s"] for x in res])
        r["decode_ms_per_token"] = 1000 * _med([x["decode_s_per_token"] for x in res])
        r["prefill_ratio"] = _med([x["prefill_s"] / b["prefill_s"] for x, b in zip(res, base, strict=True)])
        r["decode_ratio"] = _med(
            [x["decode_s_per_token"] / b["decode_s_per_token"] for x, b in zip(res, base, strict=True)]
        )
        r["kv_mib"] = _med([x["kv_bytes"] / 2**20 for x in res])
        r["kv_mib_unpruned"] = _med([b["kv_bytes"] / 2**20 for b in base])
        r["kv_saving"] = 1 - r["kv_mib"] / r["kv_mib_unpruned"]
        r["prefill_peak_mib"] = _med([x["prefill_peak_mib"] for x in res])
        r["retained_mib"] = _med([x["retained_mib"] for x in res])
        r["delta_nll"] = r["nll"] - sum(sum(b["cont_nll"]) for b in base) / sum(
            len(b["cont_nll"]) for b in base
        )
        if name != "none" and res and "kv_bytes_after" in res[0]:
            r["physical"] = all(x.get("physical") for x in res)
            r["report_matches_tensors"] = all(x["kv_bytes_after"] == x["kv_bytes"] for x in res)
            r["report_kv_compression"] = _med([x["kv_compression"] for x in res])
            r["notes"] = sorted({n for x in res for n in (x.get("notes") or [])})
        out.append(r)
    return out


# ----------------------------------------------------------------------------------------------- markdown
def _f(x: Any, fmt: str = ".2f", none: str = "–") -> str:
    return none if x is None else format(x, fmt)


def to_markdown(res: dict[str, Any]) -> str:
    e, c = res["env"], res["config"]
    kv = res.get("kvpress") or {}
    kvrows = {(r["preset"], r["ratio"]): r for r in kv.get("aggregate", [])}
    base = next(r for r in res["ours"] if r["preset"] == "none")
    needle_desc = (
        f'"The magic number of the <key> is <{c["digits"]} digits>." (one token per digit)'
        if c["needle_kind"] == "number"
        else '"The secret word of the <key> is <word>." (one token)'
    )
    lines = [
        "# KV-cache pruning benchmark",
        "",
        f"Model `{e['model']}` ({e['params'] / 1e6:.1f} M params, {e['num_layers']} layers, {e['num_heads']} query / "
        f"{e['num_kv_heads']} KV heads, head dim {e['head_dim']}, fp32, CPU, attention {e['attn_implementation']}); "
        f"torch {e['torch']}, transformers {e['transformers']}, tokensmith {e['tokensmith']}, Python {e['python']}; "
        f"**{e['torch_threads']} torch thread(s)** on {e['cpu_count']} CPUs; load average "
        f"{', '.join(f'{x:.1f}' for x in res['load_average']['start'])} at the start, "
        f"{', '.join(f'{x:.1f}' for x in res['load_average']['end'])} at the end (the machine is shared); seed "
        f"{e['seed']}; {res['date']}; total {res['total_seconds']:.0f} s.",
        "",
        f"Data: {c['samples']} haystacks of {c['context_len']} tokens from the prose of the stdlib's "
        f"`pydoc_data.topics`, {c['needles']} needles each ({needle_desc}, at sentence boundaries, depths "
        f"spread over (0, 1)), so {base['needle_n']} questions per configuration; continuation: the "
        f"{c['cont_len']} real tokens after each haystack ({base['tokens_scored']} scored tokens per configuration); "
        f"greedy answers of {c['answer_tokens']} tokens, exact match of the value (digit accuracy: the fraction "
        "of the number's digits right, position by position); prompt form: "
        f"{'chat template' if c['chat'] else 'plain continuation (no chat template)'}.",
        "",
        res["protocol"],
        "",
        f"Unpruned: needle accuracy **{base['needle_acc']:.2f}** (digits {base['needle_digits']:.2f}), continuation NLL {base['nll']:.3f} (perplexity "
        f"{base['ppl']:.2f}), prefill {base['prefill_s']:.2f} s, decode {base['decode_ms_per_token']:.1f} ms/step, "
        f"KV {base['kv_mib']:.2f} MiB, RSS retained after the prefill {_f(base['retained_mib'], '.1f')} MiB, "
        f"peak during it {_f(base['prefill_peak_mib'], '.1f')} MiB.",
        "",
        "## tokensmith presets vs no pruning" + (" and kvpress" if kvrows else ""),
        "",
        "Ratio = fraction of the context's KV removed. Acc = needle accuracy / digit accuracy; ΔNLL = mean NLL "
        "per continuation token minus the unpruned model's on the same tokens (kvpress's columns: its press of "
        "the same name, same protocol, same tokens); prefill and decode: median time and, in brackets, the "
        "median of per-sample paired ratios to no pruning (prefill includes the scoring; a decode step advances "
        f"all {c['needles']} questions of a sample by one token); KV = MiB held by the cache tensors after the "
        f"prefill (measured; unpruned {base['kv_mib']:.2f} MiB); RSS = process memory retained after the "
        "prefill / peak during it, MiB.",
        "",
        "| preset | ratio | acc / digits | kvpress acc / digits | ΔNLL | kvpress ΔNLL | ppl | prefill s (× none) "
        "| kvpress prefill × none | decode ms/step (× none) | KV MiB (saved) | RSS retained / peak MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in res["ours"]:
        if r["preset"] == "none":
            continue
        k = kvrows.get((press_name(r["preset"]), r["ratio"]))
        kacc = f"{k['needle_acc']:.2f} / {k['needle_digits']:.2f}" if k else "–"
        kdn = f"{k['delta_nll']:+.3f}" if k else "–"
        lines.append(
            f"| {r['preset']} | {r['ratio']:.2f} | {r['needle_acc']:.2f} / {r['needle_digits']:.2f} | {kacc} | "
            f"{r['delta_nll']:+.3f} | {kdn} | {r['ppl']:.2f} | {r['prefill_s']:.2f} ({r['prefill_ratio']:.2f}×) | "
            f"{_f(k['prefill_ratio'] if k else None)} | {r['decode_ms_per_token']:.0f} ({r['decode_ratio']:.2f}×) | "
            f"{r['kv_mib']:.2f} ({100 * r['kv_saving']:.0f}%) | {_f(r['retained_mib'], '.1f')} / "
            f"{_f(r['prefill_peak_mib'], '.1f')} |"
        )
    qa = res.get("question_aware")
    if qa:
        kqa = {
            (r["preset"], r["ratio"]): r for r in kv.get("question_aware_aggregate", []) if not r.get("error")
        }
        lines += [
            "",
            "## Question inside the compressed prompt (SnapKV's own setting)",
            "",
            "The prompt = context + question (the sample's questions as one batch of equal-length rows) is "
            "prefilled with compression, so the observation window holds the question; then the answer is "
            "decoded through the pruned cache. tokensmith: `with preset.apply(adapter): adapter.generate(...)` "
            "(its own decode loop); kvpress: `with press(model): model(...)`, then the shared greedy loop. "
            f"Unpruned accuracy: {base['needle_acc']:.2f} (the unpruned prefill of context + question is the same "
            "computation as the context-only protocol's).",
            "",
            "| preset | ratio | acc / digits | kvpress acc / digits | generate s (tokensmith, one sample's batch) |",
            "|---|---:|---:|---:|---:|",
        ]
        for r in qa:
            k = kqa.get((press_name(r["preset"]), r["ratio"]))
            kq = f"{k['needle_acc']:.2f} / {k['needle_digits']:.2f}" if k else "–"
            lines.append(
                f"| {r['preset']} | {r['ratio']:.2f} | {r['needle_acc']:.2f} / {r['needle_digits']:.2f} | "
                f"{kq} | "
                f"{r['generate_s']:.2f} |"
            )
    g = res["goals"]
    lines += ["", "## Goals", ""]
    for item in g:
        lines.append(f"- {item}")
    if kv:
        lines += ["", "## kvpress", ""]
        if "error" in kv:
            lines.append(f"kvpress failed: `{kv['error'][-500:]}`")
        else:
            v = kv["versions"]
            kb = kvrows.get(("none", 0.0))
            lines.append(
                f"kvpress {v['kvpress']} with transformers {v['transformers']}, torch {v['torch']}, in its own venv "
                f"({kv['threads']} thread(s)), run after tokensmith's configurations (not interleaved; wall "
                f"{kv['wall_s']:.0f} s). Its unpruned run: needle accuracy {kb['needle_acc']:.2f}, NLL "
                f"{kb['nll']:.3f} (tokensmith's: {base['nll']:.3f}; max per-token |ΔNLL| "
                f"{kv.get('unpruned_max_abs_dnll', float('nan')):.2e}, same answers: {kv.get('unpruned_same_answers')})."
            )
            lines += ["", "Default hyper-parameters of the presets / presses of the same name:", ""]
            lines += [f"- {k}: {DIFFERENCES[k]}" for k in (*PRESETS, *VARIANTS)]
    if res.get("variant_check"):
        lines += ["", "## Prompt form check (unpruned)", ""]
        for k, v in res["variant_check"].items():
            lines.append(f"- {k}: needle accuracy {v['needle_acc']:.2f} on {v['needle_n']} questions")
    lines.append("")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- main
def env_info(ad: Any, args: argparse.Namespace) -> dict[str, Any]:
    import transformers

    import tokensmith

    cfg = ad.model.config
    return {
        "model": args.model,
        "params": sum(p.numel() for p in {id(p): p for p in ad.model.parameters()}.values()),
        "num_layers": ad.structure.num_layers,
        "num_heads": ad.structure.num_heads,
        "num_kv_heads": ad.structure.num_kv_heads,
        "head_dim": getattr(cfg, "head_dim", cfg.hidden_size // cfg.num_attention_heads),
        "attn_implementation": getattr(cfg, "_attn_implementation", None),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "seed": args.seed,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokensmith": tokensmith.__version__,
        "python": platform.python_version(),
        "platform": f"{platform.system()} {platform.machine()}",
    }


PROTOCOL = (
    "Protocol (both libraries, the same code: `benchmarks/kvpress_runner.py`): prefill the context alone with "
    "compression on (each layer's KV is scored and evicted right after that layer's attention; later layers "
    "of the same forward are unaffected), timed, with peak RSS during it and RSS retained after it "
    "(`VmHWM`/`VmRSS`, `clear_refs`, `MALLOC_MMAP_THRESHOLD_=65536`); then, on copies of the pruned cache "
    "and without further compression: the continuation teacher forced (positions continue from the "
    "context length, no attention mask), and for each needle the question fed and the answer decoded greedily "
    "(decode time = median step time, a step advancing all of a sample's questions by one token). The "
    "question is not seen by the compression (kvpress's pipeline "
    "protocol). Questions of equal length (all of a sample's) go through one batched copy of the cache. "
    "PyramidKV's layers hold different numbers of slots, so its multi-token feeds run with each layer's own "
    "causal mask (transformers builds one mask from layer 0's length; checked against token-by-token "
    "feeding, `checks` in the JSON)."
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument(
        "--quick", action="store_true", help="smoke run (< 1 min): tiny sizes, 2 presets, ratio 0.5"
    )
    ap.add_argument("--samples", type=int, default=None, help="haystacks (default 2; quick 1)")
    ap.add_argument(
        "--context-len", type=int, default=None, help="context tokens per haystack (default 384; quick 160)"
    )
    ap.add_argument(
        "--needles", type=int, default=None, help="needles (questions) per haystack (default 4; quick 2)"
    )
    ap.add_argument(
        "--cont-len", type=int, default=None, help="continuation tokens scored (default 64; quick 16)"
    )
    ap.add_argument(
        "--needle-kind",
        choices=("number", "word"),
        default="number",
        help="needle value: a 5-digit number (6 tokens) or one single-token word",
    )
    ap.add_argument("--digits", type=int, default=5, help="digits of a number needle (one token each)")
    ap.add_argument(
        "--answer-tokens",
        type=int,
        default=None,
        help="greedy answer tokens (default 7 for numbers: space + 5 digits + one; 3 for words)",
    )
    ap.add_argument("--ratios", default=None, help="comma list (default 0.25,0.5,0.75)")
    ap.add_argument("--presets", default=None, help=f"comma list (default all: {','.join(PRESETS)})")
    ap.add_argument(
        "--qa-presets",
        default=None,
        help="presets also run with the question inside the compressed prompt (default snapkv,snapkv_w64_avg; '' none)",
    )
    ap.add_argument("--qa-ratios", default=None, help="ratios for --qa-presets (default 0.5)")
    ap.add_argument(
        "--parity-ratios",
        default=None,
        help="ratios for SnapKV with kvpress's defaults (window 64, avg pooling; default 0.5; '' none)",
    )
    ap.add_argument("--chat", action="store_true", help="needle prompts through the chat template")
    ap.add_argument(
        "--check-variants",
        action="store_true",
        help="also measure the unpruned accuracy of the other prompt form (chat vs plain)",
    )
    ap.add_argument(
        "--kvpress-python", default=None, help="python of a venv with kvpress (runs it side by side)"
    )
    ap.add_argument("--kvpress-ratios", default=None, help="ratios for kvpress (default: --ratios)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1; see the docs draft)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-dir", default=str(RESULTS))
    args = ap.parse_args()
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:  # freed tensors must return to the OS for RSS deltas
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
        os.execv(sys.executable, [sys.executable, *sys.argv])
    q = args.quick
    args.samples = args.samples or (1 if q else 2)
    args.context_len = args.context_len or (160 if q else 384)
    args.needles = args.needles or (2 if q else 4)
    args.cont_len = args.cont_len or (16 if q else 64)
    ratios = [float(x) for x in (args.ratios or ("0.5" if q else "0.25,0.5,0.75")).split(",")]
    presets_ = [
        x for x in (args.presets or ("snapkv,streaming_llm" if q else ",".join(PRESETS))).split(",") if x
    ]
    qa_presets = [
        x
        for x in (
            ("" if q else "snapkv,snapkv_w64_avg") if args.qa_presets is None else args.qa_presets
        ).split(",")
        if x
    ]
    qa_ratios = [float(x) for x in (args.qa_ratios or "0.5").split(",")]
    parity_ratios = [
        float(x)
        for x in (("" if q else "0.5") if args.parity_ratios is None else args.parity_ratios).split(",")
        if x
    ]
    kv_ratios = [float(x) for x in (args.kvpress_ratios or ",".join(map(str, ratios))).split(",")]
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    t_start = time.perf_counter()
    load0 = list(os.getloadavg())

    import tokensmith as ts

    ad = ts.load(args.model)
    ad.model.eval()
    tok = ad.tokenizer
    args.answer_tokens = args.answer_tokens or (args.digits + 2 if args.needle_kind == "number" else 3)
    samples = make_samples(
        tok,
        args.samples,
        args.context_len,
        args.needles,
        args.cont_len,
        args.seed,
        args.chat,
        args.needle_kind,
        args.digits,
    )
    configs: list[tuple[str, float]] = [("none", 0.0)] + [(p, r) for p in presets_ for r in ratios]
    configs += [(v, r) for v in VARIANTS if press_name(v) in presets_ for r in parity_ratios]
    print(
        f"{len(samples)} samples x {len(configs)} configurations, context {args.context_len} tokens, "
        f"{args.needles} needles, {args.threads} thread(s)",
        flush=True,
    )
    # warm-up (first-call costs out of the timings): the unpruned protocol once at full size, every preset
    # once on a short input
    if not q:  # (skipped in the smoke run)
        proto.run_sample(ad.model, our_prefill(ad, "none", 0.0, args.seed), samples[0], args.answer_tokens)
    warm = {
        "ctx_ids": samples[0]["ctx_ids"][:96],
        "cont_ids": samples[0]["cont_ids"][:4],
        "questions": samples[0]["questions"][:1],
    }
    for name in presets_:
        proto.run_sample(ad.model, our_prefill(ad, name, 0.5, args.seed), warm, 2)
    rows: dict[tuple[str, float], list[dict]] = {c: [] for c in configs}
    for si, s in enumerate(samples):
        order = configs[si % len(configs) :] + configs[: si % len(configs)]
        for name, ratio in order:
            t = time.perf_counter()
            r = proto.run_sample(ad.model, our_prefill(ad, name, ratio, args.seed), s, args.answer_tokens)
            rows[(name, ratio)].append(r)
            sc = score_row(tok, [s], [r], args.chat)
            print(
                f"  sample {si} {name:<13} {ratio:.2f}: acc {sc['needle_acc']:.2f} nll {sc['nll']:.3f} "
                f"prefill {r['prefill_s']:.2f}s kv {r['kv_bytes'] / 2**20:.2f}MiB ({time.perf_counter() - t:.1f}s)",
                flush=True,
            )
    ours = aggregate(tok, samples, rows, args.chat)
    raw_ours = {f"{n}@{r}": [{k: v for k, v in x.items()} for x in rows[(n, r)]] for n, r in configs}

    qa_rows = []
    qa_cfg = [(p, r) for p in qa_presets for r in qa_ratios]
    for name, ratio in qa_cfg:
        res = [our_qa(ad, name, ratio, args.seed, s, args.answer_tokens) for s in samples]
        qa_rows.append(
            {
                "preset": name,
                "ratio": ratio,
                **qa_score(tok, samples, res, args.chat),
                "generate_s": _med([r["generate_s"] for r in res]),
                "raw": res,
            }
        )
        print(f"  question-aware {name} {ratio}: acc {qa_rows[-1]['needle_acc']:.2f}", flush=True)
    s0 = samples[0]
    check = {
        "feed_self_check_max_abs_logit_diff": proto.self_check(
            ad.model, s0["ctx_ids"][:128], s0["cont_ids"][:16]
        )
    }
    if (
        "pyramidkv" in presets_
    ):  # the per-layer-causal one-forward feed against token-by-token on a pruned cache
        cache, _, _ = our_prefill(ad, "pyramidkv", 0.5, args.seed)(s0["ctx_ids"][:128])
        check["pyramidkv_lengths_differ"] = len(set(proto.layer_lengths(cache))) > 1
        check["pyramidkv_feed_vs_stepwise_max_abs_logit_diff"] = proto.stepwise_check(
            ad.model, cache, s0["cont_ids"][:16], 128
        )

    variant_check = None
    if args.check_variants:
        other = make_samples(
            tok,
            args.samples,
            args.context_len,
            args.needles,
            args.cont_len,
            args.seed,
            not args.chat,
            args.needle_kind,
            args.digits,
        )
        res = [
            proto.run_sample(ad.model, our_prefill(ad, "none", 0.0, args.seed), s, args.answer_tokens + 8)
            for s in other
        ]
        variant_check = {
            ("plain" if args.chat else "chat") + f" (answer tokens {args.answer_tokens + 8})": {
                k: v for k, v in score_row(tok, other, res, not args.chat).items()
            },
            ("chat" if args.chat else "plain") + f" (answer tokens {args.answer_tokens})": {
                k: v for k, v in score_row(tok, samples, rows[("none", 0.0)], args.chat).items()
            },
        }

    kv = None
    if args.kvpress_python:
        kv_cfg = [(p, r) for p in presets_ if p in proto.PRESSES for r in kv_ratios]
        print(f"kvpress: {len(kv_cfg)} presses + unpruned in {args.kvpress_python}", flush=True)
        kv_qa = [(p, r) for p, r in qa_cfg if p in proto.PRESSES]  # variants compare with their base press
        kv = run_kvpress(args, samples, kv_cfg, kv_qa)
        if "error" not in kv:
            kvraw = {(r["preset"], r["ratio"]): r["samples"] for r in kv["rows"] if not r["error"]}
            kv["errors"] = {f"{r['preset']}@{r['ratio']}": r["error"] for r in kv["rows"] if r["error"]}
            kv["aggregate"] = aggregate(tok, samples, kvraw, args.chat)
            kb, ob = kvraw[("none", 0.0)], rows[("none", 0.0)]
            kv["unpruned_max_abs_dnll"] = max(
                abs(a - b)
                for x, y in zip(kb, ob, strict=True)
                for a, b in zip(x["cont_nll"], y["cont_nll"], strict=True)
            )
            kv["unpruned_same_answers"] = all(
                x["answers"] == y["answers"] for x, y in zip(kb, ob, strict=True)
            )
            kv["question_aware_aggregate"] = [
                {
                    "preset": r["preset"],
                    "ratio": r["ratio"],
                    "error": r["error"],
                    **(qa_score(tok, samples, r["samples"], args.chat) if not r["error"] else {}),
                }
                for r in kv.get("question_aware", [])
            ]

    # goals
    by = {(r["preset"], r["ratio"]): r for r in ours}
    base = by[("none", 0.0)]
    goals = []
    sk = by.get(("snapkv", 0.5))
    if sk:
        rel = sk["needle_acc"] / base["needle_acc"] if base["needle_acc"] else float("nan")
        goals.append(
            f"SnapKV at 50%, context-only compression: needle accuracy {sk['needle_acc']:.2f} vs unpruned "
            f"{base['needle_acc']:.2f} = {100 * rel:.0f}% (goal >= 95%: {'met' if rel >= 0.95 else 'NOT met'})"
        )
    for r in qa_rows:
        if r["preset"] == "snapkv" and r["ratio"] == 0.5:
            rel = r["needle_acc"] / base["needle_acc"] if base["needle_acc"] else float("nan")
            goals.append(
                f"SnapKV at 50%, question inside the compressed prompt: {r['needle_acc']:.2f} vs "
                f"{base['needle_acc']:.2f} = {100 * rel:.0f}% (goal >= 95%: {'met' if rel >= 0.95 else 'NOT met'})"
            )
    phys = [r for r in ours if r["preset"] != "none"]
    goals.append(
        "real memory: every tokensmith run physical (tensors gathered): "
        f"{all(r.get('physical') for r in phys)}; report.kv_bytes_after == measured cache bytes: "
        f"{all(r.get('report_matches_tensors') for r in phys)}; at ratio 0.5 the KV held is "
        + ", ".join(f"{r['preset']} {r['kv_mib']:.2f}" for r in phys if r["ratio"] == 0.5)
        + f" MiB vs {base['kv_mib']:.2f} unpruned; RSS retained after the prefill "
        + ", ".join(f"{r['preset']} {_f(r['retained_mib'], '.1f')}" for r in phys if r["ratio"] == 0.5)
        + f" MiB vs {_f(base['retained_mib'], '.1f')}"
    )
    if kv and "aggregate" in kv:
        kvby = {(r["preset"], r["ratio"]): r for r in kv["aggregate"]}
        cmp = []
        for (p, rt), r in by.items():
            k = kvby.get((press_name(p), rt))
            if k and p != "none":
                ok = r["needle_acc"] >= k["needle_acc"] and r["nll"] <= k["nll"] + 0.005
                cmp.append(
                    f"{p}@{rt}: acc {r['needle_acc']:.2f} vs {k['needle_acc']:.2f}, NLL {r['nll']:.3f} vs "
                    f"{k['nll']:.3f} ({'>=' if ok else 'WORSE'})"
                )
        goals.append(
            "quality vs kvpress's press of the same name (acc >= and NLL <= kvpress + 0.005): "
            + "; ".join(cmp)
        )

    res = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "env": env_info(ad, args),
        "config": {
            "samples": args.samples,
            "context_len": args.context_len,
            "needles": args.needles,
            "cont_len": args.cont_len,
            "answer_tokens": args.answer_tokens,
            "ratios": ratios,
            "presets": presets_,
            "qa_presets": qa_presets,
            "qa_ratios": qa_ratios,
            "chat": args.chat,
            "needle_kind": args.needle_kind,
            "digits": args.digits,
            "quick": q,
            "kvpress_ratios": kv_ratios if args.kvpress_python else None,
        },
        "protocol": PROTOCOL,
        "load_average": {"start": load0, "end": list(os.getloadavg())},
        "ours": ours,
        "question_aware": [{k: v for k, v in r.items() if k != "raw"} for r in qa_rows],
        "goals": goals,
        "kvpress": None if kv is None else {k: v for k, v in kv.items() if k != "rows"},
        "variant_check": variant_check,
        "checks": check,
        "samples": [
            {
                "start": s["start"],
                "questions": [{k: v for k, v in q.items() if k != "q_ids"} for q in s["questions"]],
            }
            for s in samples
        ],
        "raw": {
            "ours": raw_ours,
            "kvpress": None if not kv or "rows" not in kv else kv["rows"],
            "question_aware": {f"{r['preset']}@{r['ratio']}": r["raw"] for r in qa_rows},
        },
        "total_seconds": time.perf_counter() - t_start,
    }
    stem = "pruning_bench" + ("" if args.model == DEFAULT_MODEL else "_" + re.sub(r"\W+", "_", args.model))
    stem += "_quick" if q else ""
    write_results(args.out_dir, stem, res, to_markdown(res))


if __name__ == "__main__":
    main()
