"""GrAInS steering benchmark: does a steering vector fitted on 16 sentiment prompts shift held-out prompts?

Protocol (SmolLM2-135M-Instruct, plain completion prompts, everything in one run):

- 24 templated prompts that end just before an evaluative word ("..., and honestly it was"); preferred
  continuation ``" great"``, dispreferred ``" terrible"`` (one token each). The first ``--n-fit`` (16) fit
  the vectors, the other 8 are held out.
- Fit: :func:`grains_differences` (contrastive IG of ``log p(great) − log p(terrible)`` at ``--n-steps``
  Gauss-Legendre points, pad-token baseline; top ``--k`` positive and negative prompt tokens; hidden states
  after every layer at the last prompt token with those tokens replaced by the unk token), then one vector
  per layer for each aggregation rule (``pca``, the paper's; ``svd``; ``mean``).
- Evaluate on the held-out prompts ``f = log p(great | x) − log p(terrible | x)`` unsteered and steered at
  every layer with ``h ← (h + α_l v_l)·‖h‖/‖h + α_l v_l‖`` for each ``α`` of ``--alphas``, with
  ``α_l = α·n_l`` (``relative=True``: ``n_l`` the mean hidden norm at the last prompt token while fitting).
- Control, same run: random unit vectors per layer (seeded Gaussian directions), same layers, same ``α_l``.
  Also the fitting prompts' shift (in-sample), for comparison.

Writes ``benchmarks/results/grains_bench.{json,md}``. Usage::

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/grains_bench.py          # ~1-2 min on 2 CPU cores
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/grains_bench.py --quick  # tiny model, a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import tokensmith as ts  # noqa: E402
from tokensmith.attribution.result import versions  # noqa: E402
from tokensmith.attribution.steering import SteeringVectors, grains_differences  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
GOOD, BAD = " great", " terrible"
SUBJECTS = [
    ("I went to see the new movie last night", "it was"),
    ("We tried the Italian restaurant downtown", "the food was"),
    ("I finally read the book my sister gave me", "it was"),
    ("Yesterday we drove to the beach for the day", "the trip was"),
    ("I bought a new phone last week", "so far it has been"),
    ("We stayed at a small hotel near the station", "the room was"),
    ("My brother played his first concert on Friday", "the show was"),
    ("I started a new job on Monday", "the first day was"),
    ("We watched the football match at the stadium", "the game was"),
    ("I cooked dinner for my parents tonight", "the meal was"),
    ("The team presented their project this morning", "the presentation was"),
    ("I took the train to the mountains", "the view was"),
    ("We adopted a puppy from the shelter", "the first week was"),
    ("I listened to the band's new album", "the album is"),
    ("We visited the science museum with the kids", "the visit was"),
    ("I tried the new coffee shop on the corner", "the coffee was"),
    # held out
    ("My friend hosted a party on Saturday", "the party was"),
    ("I watched the play at the local theatre", "the play was"),
    ("We went camping by the lake", "the weekend was"),
    ("I got a haircut at the new salon", "the haircut was"),
    ("Our flight to Madrid left this morning", "the flight was"),
    ("I played the video game everyone talks about", "the game is"),
    ("We had a picnic in the park", "the afternoon was"),
    ("I attended the cooking class at the library", "the class was"),
]


def prompts() -> list[str]:
    return [f"{a}, and honestly {b}" for a, b in SUBJECTS]


def contrast(ad, texts: list[str], good: int, bad: int) -> torch.Tensor:
    """``log p(good | x) − log p(bad | x)`` for each prompt (one batched forward, left-padded)."""
    with torch.no_grad():
        lp = ad.next_token_logprobs(ad.encode_batch(texts))
    return (lp[:, good] - lp[:, bad]).double().cpu()


def stats(xs: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0,
            "min": min(xs), "max": max(xs)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--n-fit", type=int, default=16)
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--n-steps", type=int, default=16)
    ap.add_argument("--alphas", default="-0.05,-0.02,0.02,0.05")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="tiny llama, 4 fitting prompts, 4 IG steps")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t_start = time.perf_counter()
    if args.quick:
        ad, args.n_fit, args.n_steps, baseline = ts.tiny("llama"), 4, 4, 42
    else:
        ad, baseline = ts.load(args.model), "pad"
    tok = ad.tokenizer
    good, bad = tok.encode(GOOD), tok.encode(BAD)
    if len(good) != 1 or len(bad) != 1:
        raise SystemExit(f"{GOOD!r} and {BAD!r} must be single tokens for this protocol")
    good, bad = good[0], bad[0]
    texts = prompts()
    for x in texts:  # the batched next-token read equals the joint encoding of prompt + answer
        assert ad.encode(x, target=GOOD).input_ids.tolist() == ad.encode(x).input_ids.tolist() + [good]
    fit, held = texts[: args.n_fit], texts[args.n_fit:]
    alphas = [float(a) for a in args.alphas.split(",")]
    L, d = ad.structure.num_layers, ad.structure.hidden_size

    t0 = time.perf_counter()
    diffs = grains_differences(ad, [(x, GOOD, BAD) for x in fit], k=args.k, n_steps=args.n_steps, baseline=baseline)
    fit_s = time.perf_counter() - t0
    vectors = {agg: diffs.vectors(agg) for agg in ("pca", "svd", "mean")}
    g = torch.Generator().manual_seed(args.seed)
    rnd = torch.randn(L, d, generator=g)
    vectors["random"] = SteeringVectors(list(range(L)), rnd / rnd.norm(dim=-1, keepdim=True),
                                        vectors["pca"].hidden_norms, {"control": "random unit directions"})

    base_held, base_fit = contrast(ad, held, good, bad), contrast(ad, fit, good, bad)
    rows: list[dict] = []
    per_prompt: dict[str, dict[str, list[float]]] = {}
    t0 = time.perf_counter()
    for name, sv in vectors.items():
        for a in alphas:
            with sv.apply(ad, alpha=a, relative=True):
                h, f_ = contrast(ad, held, good, bad), contrast(ad, fit, good, bad)
            shift = (h - base_held).tolist()
            per_prompt[f"{name}@{a:g}"] = {"held_out": h.tolist(), "shift": shift}
            rows.append({
                "vectors": name, "alpha": a,
                "held_out_after": stats(h.tolist()), "held_out_shift": stats(shift),
                "held_out_prompts_up": sum(s > 0 for s in shift),
                "fit_shift_mean": float((f_ - base_fit).mean()),
            })
    eval_s = time.perf_counter() - t0
    cos = {agg: [float(x) for x in (vectors[agg].vectors * vectors["pca"].vectors).sum(-1)] for agg in ("svd", "mean")}
    result = {
        "benchmark": "grains_bench",
        "protocol": __doc__.split("\n\n")[1],
        "model": "tiny-llama" if args.quick else f"{args.model} (fp32)",
        "device": "cpu", "threads": args.threads, "seed": args.seed, "platform": platform.platform(),
        "load_average_1min_at_end": os.getloadavg()[0], "cpu_count": os.cpu_count(),
        "versions": versions(),
        "sizes": {"n_fit": len(fit), "n_held_out": len(held), "layers": L, "hidden": d, "k": args.k,
                  "n_steps": args.n_steps, "ig_baseline": baseline, "mask_id": diffs.config["mask_id"]},
        "preferred": GOOD, "dispreferred": BAD,
        "held_out_prompts": held, "fit_prompts": fit,
        "before": {"held_out": base_held.tolist(), "held_out_stats": stats(base_held.tolist()),
                   "fit_mean": float(base_fit.mean())},
        "rows": rows, "per_prompt": per_prompt,
        "selected_tokens": [{"prompt": s["prompt"], "positive": s["positive"], "negative": s["negative"],
                             "contrast": s["contrast"], "ig_delta": s["ig_delta"]} for s in diffs.selected],
        "ig_abs_delta_median": statistics.median(abs(s["ig_delta"]) for s in diffs.selected),
        "fit_abs_contrast_median": statistics.median(abs(s["contrast"]) for s in diffs.selected),
        "explained_variance": {agg: vectors[agg].config["explained_variance"] for agg in ("pca", "svd")},
        "cosine_with_pca": cos,
        "hidden_norms": vectors["pca"].hidden_norms.tolist(),
        "seconds": {"fit_differences": fit_s, "evaluate": eval_s, "total": time.perf_counter() - t_start},
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "grains_bench_quick" if args.quick else "grains_bench"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    md = markdown(result)
    (out / f"{stem}.md").write_text(md)
    print(md)
    return 0


def markdown(r: dict) -> str:
    s = r["sizes"]
    lines = [
        "# GrAInS steering on held-out prompts",
        "",
        f"Model {r['model']}, CPU, {r['threads']} threads, seed {r['seed']}; {s['n_fit']} fitting prompts, "
        f"{s['n_held_out']} held out; k = {s['k']}, IG {s['n_steps']} Gauss-Legendre points (baseline "
        f"{s['ig_baseline']!r}), mask token id {s['mask_id']}; steering at all {s['layers']} layers (resid_post), "
        "renormalised, α_l = α·(mean ‖h_l‖ at the last fitting-prompt token).",
        f"f = log p({r['preferred']!r}) − log p({r['dispreferred']!r}) at the end of the prompt. "
        f"Unsteered held-out mean f = {r['before']['held_out_stats']['mean']:.3f} "
        f"(std {r['before']['held_out_stats']['std']:.3f}).",
        "",
        "| vectors | α | held-out mean f after | mean shift | std of shift | prompts up (of "
        f"{s['n_held_out']}) | in-sample mean shift |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        lines.append(
            f"| {row['vectors']} | {row['alpha']:g} | {row['held_out_after']['mean']:.3f} | "
            f"{row['held_out_shift']['mean']:+.3f} | {row['held_out_shift']['std']:.3f} | "
            f"{row['held_out_prompts_up']} | {row['fit_shift_mean']:+.3f} |"
        )
    shifts = {(row["vectors"], row["alpha"]): row["held_out_shift"]["mean"] for row in r["rows"]}
    pairs = sorted({abs(a) for _, a in shifts if a > 0 and (_, -a) in shifts})
    if pairs:
        lines += [
            "",
            "First-order (antisymmetric) part of the held-out shift, (shift(+α) − shift(−α))/2 — it cancels the "
            "sign-independent disruption that any large edit causes:",
            "",
            "| vectors | " + " | ".join(f"α = ±{a:g}" for a in pairs) + " |",
            "|---|" + "---|" * len(pairs),
        ]
        for name in dict.fromkeys(v for v, _ in shifts):
            vals = " | ".join(f"{(shifts[(name, a)] - shifts[(name, -a)]) / 2:+.3f}" for a in pairs)
            lines.append(f"| {name} | {vals} |")
    lines += [
        "",
        "`random`: unit Gaussian directions per layer with the same α_l (the control). `pca` is the paper's "
        "aggregation (first principal component of the centred differences, sign-aligned with their mean); "
        "`svd` the uncentred top singular vector; `mean` the normalised mean difference.",
        "",
        "Per-prompt held-out f (unsteered, then steered with the pca and mean vectors at each α):",
        "",
    ]
    pca_keys = [k for k in r["per_prompt"] if k.startswith(("pca@", "mean@"))]
    lines += [
        "| prompt | before | " + " | ".join(k.replace("@", " α=") for k in pca_keys) + " |",
        "|---|---|" + "---|" * len(pca_keys),
    ]
    for i, p in enumerate(r["held_out_prompts"]):
        vals = " | ".join(f"{r['per_prompt'][k]['held_out'][i]:.3f}" for k in pca_keys)
        lines.append(f"| {p} | {r['before']['held_out'][i]:.3f} | {vals} |")
    ev = r["explained_variance"]["pca"]
    lines += [
        "",
        f"PCA explained-variance share per layer: min {min(ev):.2f}, max {max(ev):.2f}. Cosine of svd / mean "
        f"with pca per layer: mean {statistics.fmean(r['cosine_with_pca']['svd']):.2f} / "
        f"{statistics.fmean(r['cosine_with_pca']['mean']):.2f}.",
        f"IG completeness error |δ| over the fitting prompts: median {r['ig_abs_delta_median']:.2f} nats "
        f"(the contrasts themselves: median |f| {r['fit_abs_contrast_median']:.2f}); the top-k sets are read from "
        "these scores.",
        f"Time: differences (IG + masked forwards) {r['seconds']['fit_differences']:.1f} s, evaluation "
        f"{r['seconds']['evaluate']:.1f} s, total {r['seconds']['total']:.1f} s (1-min load average at the end "
        f"{r['load_average_1min_at_end']:.1f} on {r['cpu_count']} CPUs: the machine was shared).",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
