"""Optimizer benchmark: step time of tokensmith's optimizers vs ``torch.optim.AdamW`` (and ``pytorch-optimizer``).

(a) **Conformance** of the ``pytorch-optimizer`` classes that share a name with ours, on the golden problem of
    ``tests/optimization/test_optim.py`` (float64, 8 steps, a 5-vector and a 3x4 matrix whose gradient depends
    on the parameters; spikes for SPAM and AdaGC): max abs difference of the parameters after each step vs
    ours (ours equals the paper's rule written out step by step, to 1e-12). Hyperparameters are mapped by
    name; where they differ the tell-tale variants are compared too: AdEMAMix with the slow EMA divided by
    beta1's bias correction, SPAM without clipping (what clipping a copy would give).
(b) **Step time** on SmolLM2-135M-sized parameters: the parameter list of ``ts.load("smollm2-135m-instruct")``
    (names and shapes only; fresh fp32 tensors, seeded) with fixed random gradients (``torch.Generator``,
    seed), ``--threads`` torch threads. Per variant: one warm-up step (allocates the state; for GaLore and
    FRUGAL it computes every projection basis, so it is reported separately as the "first step"), then
    ``--repeats`` rounds of (one step of a ``torch.optim.AdamW`` with default options on the same parameters,
    kept alive for the whole run; one step of the variant). Reported: the medians and the median of the
    per-round ratios variant / AdamW (paired, so drift on the shared machine hits both; a second AdamW
    instance is a variant too, as the noise check). GaLore projects the 2-D weights of the transformer blocks (rank ``--rank``, the embedding and
    norms get plain AdamW, as in the paper); its steady steps use the stored basis. FRUGAL: the same blocks,
    density 0.25, randomized SVD, signSGD on the residual. Also reported: the
    optimizer state size (sum of the state tensors, MiB).

Writes ``benchmarks/results/optim_bench.{json,md}`` (``_quick`` suffix with ``--quick``). Usage::

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/optim_bench.py            # full run, ~5 min on 1 thread
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/optim_bench.py --quick    # 2 layers, no embedding, ~20 s
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MODEL = "smollm2-135m-instruct"
D = torch.float64
HAS_PO = importlib.util.find_spec("pytorch_optimizer") is not None


# ------------------------------------------------------------------------------------ (a) conformance
def _target(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=D)


def _grad(theta: torch.Tensor, k: int, seed: int, spike: dict[int, float] | None) -> torch.Tensor:
    curv = torch.linspace(0.5, 3.0, theta.numel(), dtype=D).reshape(theta.shape)
    g = (theta - _target(theta.shape, seed)) * curv + 0.3 * _target(theta.shape, 1000 + 17 * k + seed)
    return g * spike[k] if spike and k in spike else g


def trajectory(make: Callable[[list[torch.nn.Parameter]], Any], steps: int = 8,
               spikes: dict[int, dict[int, float]] | None = None) -> list[list[torch.Tensor]]:
    ps = [torch.nn.Parameter(_target((5,), 50)), torch.nn.Parameter(_target((3, 4), 51))]
    opt = make(ps)
    out = []
    for k in range(1, steps + 1):
        for i, p in enumerate(ps):
            p.grad = _grad(p.detach(), k, i, (spikes or {}).get(i))
        opt.step()
        out.append([p.detach().clone() for p in ps])
    return out


def ademamix_bias_corrected_m2(lr: float, b1: float, b2: float, b3: float, alpha: float, T: int, eps: float,
                               wd: float, steps: int = 8) -> list[list[torch.Tensor]]:
    """The known AdEMAMix error, written out: (m1 + alpha m2) / (1 - b1^t) instead of m1 / (1 - b1^t) + alpha m2."""
    from tokensmith.optimization.optim import ademamix_alpha, ademamix_beta3

    th = [_target((5,), 50), _target((3, 4), 51)]
    m1 = [torch.zeros_like(x) for x in th]
    m2 = [torch.zeros_like(x) for x in th]
    v = [torch.zeros_like(x) for x in th]
    out = []
    for t in range(1, steps + 1):
        a_t, b3_t = ademamix_alpha(t, alpha, T), ademamix_beta3(t, b1, b3, T)
        for i in range(2):
            g = _grad(th[i], t, i, None)
            m1[i] = b1 * m1[i] + (1 - b1) * g
            m2[i] = b3_t * m2[i] + (1 - b3_t) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            num = (m1[i] + a_t * m2[i]) / (1 - b1 ** t)
            th[i] = th[i] - lr * (num / (torch.sqrt(v[i] / (1 - b2 ** t)) + eps) + wd * th[i])
        out.append([x.clone() for x in th])
    return out


def _diffs(a: list[list[torch.Tensor]], b: list[list[torch.Tensor]]) -> list[float]:
    return [max(float((x - y).abs().max()) for x, y in zip(sa, sb, strict=True)) for sa, sb in zip(a, b, strict=True)]


def conformance() -> dict[str, Any]:
    from tokensmith.optimization.optim import SPAM, AdaGC, AdEMAMix, GaLoreAdamW, Lion

    if not HAS_PO:
        return {"skipped": "pytorch_optimizer not installed"}
    import pytorch_optimizer as po

    spike_spam = {1: {3: 300.0, 6: -500.0}}
    spike_adagc = {0: {5: -40.0}}
    am = {"lr": 0.02, "betas": (0.9, 0.99, 0.9995), "alpha": 4.0, "eps": 1e-8, "weight_decay": 0.1}
    sp = {"lr": 0.05, "betas": (0.9, 0.99), "eps": 1e-8, "weight_decay": 0.1}
    ag = {"lr": 0.05, "betas": (0.9, 0.99), "eps": 1e-8, "weight_decay": 0.1, "beta": 0.9, "lambda_abs": 1.0,
          "lambda_rel": 1.05, "warmup_steps": 3}
    cases: dict[str, dict[str, Any]] = {
        "lion": {"ours": lambda ps: Lion(ps, lr=0.01, betas=(0.8, 0.95), weight_decay=0.5),
                 "po": lambda ps: po.load_optimizer("lion")(ps, lr=0.01, betas=(0.8, 0.95), weight_decay=0.5),
                 "mapping": "lr, betas, weight_decay (po default weight_decouple=True)"},
        "ademamix": {"ours": lambda ps: AdEMAMix(ps, t_warmup=5, **am),
                     "po": lambda ps: po.load_optimizer("ademamix")(ps, t_alpha_beta3=5, weight_decouple=True, **am),
                     "mapping": "t_warmup -> t_alpha_beta3; weight_decouple=True (po default: False, L2 decay)",
                     "variants": {"slow EMA divided by beta1's bias correction":
                                  ademamix_bias_corrected_m2(0.02, 0.9, 0.99, 0.9995, 4.0, 5, 1e-8, 0.1)}},
        "spam": {"ours": lambda ps: SPAM(ps, reset_interval=4, spike_threshold=1000.0, warmup=3, **sp),
                 "po": lambda ps: po.load_optimizer("spam")(ps, update_proj_gap=4, threshold=1000, warmup_epoch=3,
                                                            **sp),
                 "mapping": "reset_interval -> update_proj_gap, spike_threshold -> threshold, warmup -> "
                            "warmup_epoch; po grad_accu_steps=20 and density=1.0 left at their defaults",
                 "spikes": spike_spam,
                 "variants": {"no clipping (= clipping a copy)":
                              trajectory(lambda ps: SPAM(ps, reset_interval=4, spike_threshold=0.0, warmup=3, **sp),
                                         spikes=spike_spam)}},
        "spam, no resets, aligned": {
            "ours": lambda ps: SPAM(ps, reset_interval=0, spike_threshold=1000.0, **sp),
            "po": lambda ps: po.load_optimizer("spam")(ps, update_proj_gap=10**6, threshold=1000, grad_accu_steps=2,
                                                       **sp),
            "mapping": "as above, no reset within the run, grad_accu_steps=2 (po clips only after its first "
                       "grad_accu_steps steps; 2 = ours: skip step 1 only). The rest is weight decay: po decays "
                       "the updated weights, (theta - lr u)(1 - lr wd), AdamW and ours theta(1 - lr wd) - lr u "
                       "(with weight_decay=0 the two agree to 5e-8)",
            "spikes": spike_spam,
            "variants": {"no clipping (= clipping a copy)":
                         trajectory(lambda ps: SPAM(ps, reset_interval=0, spike_threshold=0.0, **sp),
                                    spikes=spike_spam)}},
        "adagc": {"ours": lambda ps: AdaGC(ps, **ag), "po": lambda ps: po.load_optimizer("adagc")(ps, **ag),
                  "mapping": "same names", "spikes": spike_adagc},
        "adagc, aligned": {"ours": lambda ps: AdaGC(ps, **ag),
                           "po": lambda ps: po.load_optimizer("adagc")(ps, **{**ag, "warmup_steps": 4}),
                           "mapping": "po warmup_steps = ours + 1 (its global-clipping phase is one step shorter)",
                           "spikes": spike_adagc},
        "galore-adamw": {
            "ours": lambda ps: GaLoreAdamW([{"params": [ps[1]], "rank": 2, "update_gap": 3, "scale": 0.5},
                                            {"params": [ps[0]]}], lr=0.05, betas=(0.9, 0.99), weight_decay=0.1),
            "po": lambda ps: po.load_optimizer("galore")(
                [{"params": [ps[1]], "rank": 2, "update_proj_gap": 3, "scale": 0.5, "projection_type": "std"},
                 {"params": [ps[0]]}], lr=0.05, betas=(0.9, 0.99), weight_decay=0.1, eps=1e-8),
            "mapping": "group keys update_gap -> update_proj_gap, proj_type -> projection_type"},
    }
    out: dict[str, Any] = {"pytorch_optimizer": po.__version__ if hasattr(po, "__version__") else _po_version()}
    for name, c in cases.items():
        ours = trajectory(c["ours"], spikes=c.get("spikes"))
        row: dict[str, Any] = {"mapping": c["mapping"]}
        try:
            theirs = trajectory(c["po"], spikes=c.get("spikes"))
        except Exception as err:  # noqa: BLE001 - report, do not fail
            row["error"] = f"{type(err).__name__}: {err}"
            out[name] = row
            continue
        d = _diffs(ours, theirs)
        row["max_abs_diff_per_step"] = d
        row["matches_golden"] = max(d) <= 1e-6
        row["first_step_differing"] = next((k for k, x in enumerate(d, 1) if x > 1e-6), None)
        for vname, vtraj in c.get("variants", {}).items():
            row.setdefault("vs_variant", {})[vname] = max(_diffs(theirs, vtraj))
        out[name] = row
    return out


def _po_version() -> str:
    from importlib.metadata import version

    return version("pytorch_optimizer")


# ------------------------------------------------------------------------------------- (b) step time
def param_shapes(quick: bool) -> list[tuple[str, tuple[int, ...]]]:
    import tokensmith as ts

    ad = ts.load(MODEL)
    shapes = [(n, tuple(p.shape)) for n, p in ad.model.named_parameters()]
    if quick:
        shapes = [(n, s) for n, s in shapes if ".layers.0." in n or ".layers.1." in n]
    return shapes


def _state_mib(opt: Any) -> float:
    seen, total = set(), 0
    for st in opt.state.values():
        for v in st.values() if isinstance(st, dict) else []:
            for t in (v.__dict__.values() if hasattr(v, "__dict__") and not isinstance(v, torch.Tensor) else [v]):
                if isinstance(t, torch.Tensor) and id(t) not in seen:
                    seen.add(id(t))
                    total += t.numel() * t.element_size()
    return total / 2**20


def variants(args: argparse.Namespace, names: list[str]) -> dict[str, Callable[[list[torch.nn.Parameter]], Any]]:
    from tokensmith.optimization.optim import create

    def galore_groups(ps: list[torch.nn.Parameter], po_keys: bool, **kw: Any) -> list[dict[str, Any]]:
        mats = [p for n, p in zip(names, ps, strict=True) if p.dim() == 2 and ".layers." in n]
        rest = [p for n, p in zip(names, ps, strict=True) if not (p.dim() == 2 and ".layers." in n)]
        g = ({"rank": args.rank, "update_proj_gap": 10**9, "scale": 0.25, "projection_type": "std"} if po_keys
             else {"rank": args.rank, "update_gap": 10**9, "scale": 0.25, **kw})
        return [{"params": mats, **g}, {"params": rest}]

    def frugal_groups(ps: list[torch.nn.Parameter]) -> list[dict[str, Any]]:
        mats = [p for n, p in zip(names, ps, strict=True) if p.dim() == 2 and ".layers." in n]
        rest = [p for n, p in zip(names, ps, strict=True) if not (p.dim() == 2 and ".layers." in n)]
        return [{"params": mats, "density": 0.25, "update_gap": 10**9, "svd": "randomized"},
                {"params": rest, "density": None}]

    lr = 1e-4
    v: dict[str, Callable[[list[torch.nn.Parameter]], Any]] = {
        "torch AdamW (default; a 2nd instance: noise check, expect 1.00)": lambda ps: torch.optim.AdamW(ps, lr=lr),
        "torch AdamW foreach=True": lambda ps: torch.optim.AdamW(ps, lr=lr, foreach=True),
        "ours lion": lambda ps: create("lion", ps, lr=lr),
        "ours ademamix": lambda ps: create("ademamix", ps, lr=lr, t_warmup=1000),
        "ours spam": lambda ps: create("spam", ps, lr=lr),
        "ours adagc": lambda ps: create("adagc", ps, lr=lr),
        "ours adagc-lion": lambda ps: create("adagc-lion", ps, lr=lr),
        "ours galore-adamw": lambda ps: create("galore-adamw", galore_groups(ps, False), lr=lr),
        "ours galore-adamw (randomized svd)": lambda ps: create("galore-adamw", galore_groups(ps, False,
                                                                                             svd="randomized"), lr=lr),
        "ours frugal (density 0.25, randomized svd)": lambda ps: create("frugal", frugal_groups(ps), lr=lr),
    }
    if HAS_PO:
        v.update({
            "po lion": lambda ps: create("po:lion", ps, lr=lr),
            "po ademamix": lambda ps: create("po:ademamix", ps, lr=lr, t_alpha_beta3=1000),
            "po spam": lambda ps: create("po:spam", ps, lr=lr),
            "po adagc": lambda ps: create("po:adagc", ps, lr=lr),
            "po galore": lambda ps: create("po:galore", galore_groups(ps, True), lr=lr),
        })
    return v


def _timed_step(opt: Any) -> float:
    t0 = time.perf_counter()
    opt.step()
    return time.perf_counter() - t0


def time_variant(make: Callable[[list[torch.nn.Parameter]], Any], ps: list[torch.nn.Parameter], repeats: int,
                 baseline: Any) -> dict[str, Any]:
    """Warm-up step, then ``repeats`` x (one baseline AdamW step, one step of the variant): paired ratios."""
    gc.collect()
    opt = make(ps)
    first = _timed_step(opt)  # state allocation (+ GaLore / FRUGAL bases)
    times, base_times = [], []
    for _ in range(repeats):
        base_times.append(_timed_step(baseline))
        times.append(_timed_step(opt))
    out = {"first_step_s": first, "times_s": times, "adamw_times_s": base_times,
           "median_s": statistics.median(times), "adamw_median_s": statistics.median(base_times),
           "paired_ratio": statistics.median([a / b for a, b in zip(times, base_times, strict=True)]),
           "state_mib": _state_mib(opt)}
    del opt
    gc.collect()
    return out


def bench_steps(args: argparse.Namespace) -> dict[str, Any]:
    shapes = param_shapes(args.quick)
    names = [n for n, _ in shapes]
    gen = torch.Generator().manual_seed(args.seed)
    ps = [torch.nn.Parameter(torch.randn(s, generator=gen) * 0.02) for _, s in shapes]
    for p in ps:
        p.grad = torch.randn(p.shape, generator=gen) * 1e-3
    n_params = sum(p.numel() for p in ps)
    vs = variants(args, names)
    baseline = torch.optim.AdamW(ps, lr=1e-4)  # torch AdamW, default options, kept alive: the paired baseline
    baseline.step()
    rows: dict[str, Any] = {}
    for name, make in vs.items():
        print(f"  {name} ...", flush=True)
        try:
            rows[name] = time_variant(make, ps, args.repeats, baseline)
        except Exception as err:  # noqa: BLE001 - report, do not fail
            rows[name] = {"error": f"{type(err).__name__}: {err}"}
            continue
        r = rows[name]
        print(f"    median {r['median_s'] * 1e3:.1f} ms (AdamW {r['adamw_median_s'] * 1e3:.1f} ms), paired ratio "
              f"{r['paired_ratio']:.2f}, first {r['first_step_s'] * 1e3:.0f} ms, state {r['state_mib']:.0f} MiB",
              flush=True)
    all_base = [x for r in rows.values() for x in r.get("adamw_times_s", [])]
    return {"n_params": n_params, "n_tensors": len(ps), "galore_rank": args.rank,
            "adamw_median_s": statistics.median(all_base), "rows": rows}


# ------------------------------------------------------------------------------------------------ output
def markdown(out: dict[str, Any]) -> str:
    m = out["meta"]
    md = ["# Optimizer benchmark: step time vs torch.optim.AdamW, and pytorch-optimizer conformance", "",
          f"Parameters: {m['model']}; {m['threads']} torch thread(s); seed {m['seed']}; torch {m['torch']}, "
          f"pytorch_optimizer {m['pytorch_optimizer']}; {m['platform']}; load average at start "
          f"{tuple(round(x, 2) for x in m['loadavg_start'])}, at end {tuple(round(x, 2) for x in m['loadavg_end'])}; "
          f"total {m['total_s']:.0f} s.", ""]
    c = out.get("a_conformance", {"skipped": "--skip a"})
    md += ["## (a) pytorch-optimizer vs the paper's rule (golden problem of the tests, float64, 8 steps)", ""]
    if "skipped" in c:
        md += [f"Skipped: {c['skipped']}.", ""]
    else:
        md += ["| optimizer | max abs diff vs ours (= paper) | first differing step | vs tell-tale variant | "
               "hyperparameter mapping |", "|---|---:|---:|---|---|"]
        for name, r in c.items():
            if not isinstance(r, dict):
                continue
            if "error" in r:
                md.append(f"| {name} | error: {r['error']} | | | {r['mapping']} |")
                continue
            var = "; ".join(f"{k}: {v:.1e}" for k, v in r.get("vs_variant", {}).items()) or "–"
            md.append(f"| {name} | {max(r['max_abs_diff_per_step']):.1e} | {r['first_step_differing'] or '–'} | "
                      f"{var} | {r['mapping']} |")
        md += ["", "A difference <= 1e-6 means the same update rule: pytorch-optimizer's Adam-type steps place eps "
               "differently from ours and torch.optim.AdamW (sqrt(v_hat) + eps), worth ~5e-8 here; with eps = 0 "
               "its SPAM agrees with ours to 2e-16. "
               "'vs tell-tale variant' is the max abs "
               "difference of pytorch-optimizer's trajectory from the named known-wrong variant (0 = it IS that "
               "variant).", ""]
    b = out.get("b_steps")
    if b:
        md += [f"## (b) Step time, {b['n_params'] / 1e6:.1f} M parameters in {b['n_tensors']} tensors", "",
               f"One warm-up step per variant, then {m['repeats']} rounds of (one step of "
               "a torch.optim.AdamW with default options on the same parameters, kept alive for the whole run; "
               "one step of the variant). Ratio = median over rounds of variant / AdamW (paired: drift on the "
               f"shared machine hits both). AdamW median over all rounds {b['adamw_median_s'] * 1e3:.0f} ms. "
               f"GaLore rank {b['galore_rank']} on the blocks' 2-D weights; its 'first step' computes all "
               "projection bases (every update_gap steps in training).", "",
               "| variant | median step (ms) | AdamW in the same rounds (ms) | ratio vs AdamW (paired) | "
               "first step (ms) | state (MiB) |", "|---|---:|---:|---:|---:|---:|"]
        for name, r in b["rows"].items():
            if "error" in r:
                md.append(f"| {name} | error: {r['error']} | | | | |")
                continue
            md.append(f"| {name} | {r['median_s'] * 1e3:.0f} | {r['adamw_median_s'] * 1e3:.0f} | "
                      f"{r['paired_ratio']:.2f} | {r['first_step_s'] * 1e3:.0f} | {r['state_mib']:.0f} |")
        md.append("")
    return "\n".join(md)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--rank", type=int, default=128, help="GaLore rank")
    ap.add_argument("--skip", default="", help="parts to skip: 'a', 'b'")
    ap.add_argument("--quick", action="store_true", help="2 layers (no embedding), 2 repeats: checks that it runs")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    if args.quick and args.repeats == ap.get_default("repeats"):
        args.repeats = 2
    torch.set_num_threads(args.threads)
    skip = set(filter(None, args.skip.split(",")))
    t_start = time.perf_counter()
    meta: dict[str, Any] = {
        "model": f"{MODEL} parameter shapes" + (" (layers 0-1 only, --quick)" if args.quick else "")
                 + ", fresh fp32 tensors, random gradients",
        "threads": args.threads, "seed": args.seed, "repeats": args.repeats, "quick": args.quick,
        "torch": torch.__version__, "pytorch_optimizer": _po_version() if HAS_PO else None,
        "platform": platform.platform(), "loadavg_start": os.getloadavg(), "args": vars(args),
    }
    out: dict[str, Any] = {"meta": meta}
    if "a" not in skip:
        print("(a) conformance ...", flush=True)
        out["a_conformance"] = conformance()
        for k, r in out["a_conformance"].items():
            if isinstance(r, dict):
                print(f"  {k}: max diff {max(r.get('max_abs_diff_per_step', [math.nan])):.2e} "
                      f"{r.get('vs_variant', '')} {r.get('error', '')}", flush=True)
    if "b" not in skip:
        print("(b) step time ...", flush=True)
        out["b_steps"] = bench_steps(args)
    meta["loadavg_end"] = os.getloadavg()
    meta["total_s"] = time.perf_counter() - t_start
    res = Path(args.out)
    res.mkdir(parents=True, exist_ok=True)
    sfx = "_quick" if args.quick else ""
    (res / f"optim_bench{sfx}.json").write_text(json.dumps(out, indent=1))
    md = markdown(out)
    (res / f"optim_bench{sfx}.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
