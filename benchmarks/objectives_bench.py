"""Token-objective benchmark: the cost of token weighting and extra token losses in a full training step, and the
optimizer step against ``torch.optim.AdamW`` on the same parameters (not a test).

(a) **Weighting overhead.** One full optimizer step per variant: ``zero_grad``, forward, loss, backward,
    ``AdamW.step()`` (lr 1e-6, so the model barely moves), on one fixed batch of real English text
    (``pydoc_data.topics`` prose, SmolLM2 tokenizer, ``B`` rows of ``T`` tokens, drawn among the blocks with at
    least one digit label so that the number-token loss has work to do). The baseline is the plain CE step
    everybody runs: ``model(input_ids, labels=input_ids).loss`` (HF's own shifted CE). Variants:

    - ``ours, w = 1``: :func:`~tokensmith.optimization.training.compute_token_objective` without a weighter
      (our chunked CE on the model's logits, :func:`shift_labels`);
    - weighters (``compute_token_objective(..., weighter)``): ``uniform``, ``rho1`` with the reference's
      per-token CE precomputed (cached with the data set; computed outside the timed step) and with the
      reference forward on the fly (:func:`reference_token_loss` on a frozen copy of the model under
      ``no_grad``, inside the step), ``tldr``, ``focal``, ``prior`` (targets = the second half of each row; the
      no-context log-probs of :func:`no_context_logprobs` precomputed: on the fly they cost one reference
      forward, as for Rho-1; its ratio is taken against a CE step on the same targets, HF labels -100 on the
      first half);
    - extra token losses, added to CE (``token_losses=[...]``): ``simctg`` (forward with
      ``output_hidden_states``), ``contrastive_token``, ``unlikelihood``, ``number_token`` (MSE over the digit
      tokens), and ``smoothed_ce`` (replaces CE; similarity to the model's input embeddings).

    Protocol: one untimed warm-up step per variant (allocates the gradients and the AdamW state), then
    ``--repeats`` rounds; each round runs every variant once, in a freshly shuffled order (seeded), so drift
    on the shared machine hits all variants alike. Reported per variant: median step time, the median of the
    per-round ratios to the baseline in the same round (paired), and the part of the step spent in
    ``AdamW.step()``. **Goal: weighting <= 10% of a training step, i.e. ratio <= 1.10** (the reference forward
    of Rho-1/PRIOR on the fly is an extra model forward, not weighting: reported, not held to the goal).

(b) **Optimizer step vs AdamW**, on the parameters of the model of (a) with the gradients of one real CE
    backward on the batch: this calls into ``benchmarks/optim_bench.py`` (``variants`` and ``time_variant``: a
    warm-up step, then ``--repeats`` rounds of one ``torch.optim.AdamW`` step and one step of the variant,
    paired ratio). ``optim_bench.py`` itself measures the same on fresh tensors of SmolLM2's shapes with random
    gradients, plus pytorch-optimizer's implementations; its stored result (``results/optim_bench.json``) is
    shown side by side where present.

Usage::

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/objectives_bench.py            # SmolLM2-135M, B=2,4, T=128
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/objectives_bench.py --quick    # ts.tiny("llama"), B=2, T=64

Writes ``benchmarks/results/objectives_bench.{json,md}`` (``_quick`` suffix with ``--quick``).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import optim_bench  # noqa: E402
from objectives_experiment import english_blocks  # noqa: E402
from proc_memory import write_results  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SMOLLM2 = "smollm2-135m-instruct"
BASE = "ce (HF labels=)"
BASE_HALF = "ce, targets = 2nd half (HF labels=, -100 on the 1st half)"
GOAL = 1.10


# ----------------------------------------------------------------------------------------------- (a)
class Bench:
    """The model, its frozen reference copy, one AdamW, the batch and everything precomputed for it."""

    def __init__(self, ad: Any, B: int, T: int, seed: int) -> None:
        from tokensmith.optimization.training import (
            get_token_loss,
            no_context_logprobs,
            number_token_values,
            reference_token_loss,
            shift_labels,
        )

        self.ad, self.model = ad, ad.model
        self.model.train()
        self.ref = copy.deepcopy(ad.model).eval().requires_grad_(False)
        self.params = list({id(p): p for p in self.model.parameters() if p.requires_grad}.values())
        self.opt = torch.optim.AdamW(self.params, lr=1e-6)
        blocks = english_blocks(ad.tokenizer, T)
        perm = torch.randperm(blocks.shape[0], generator=torch.Generator().manual_seed(seed))
        digit_ids = number_token_values(ad.tokenizer)[0]
        has_digit = torch.isin(blocks[:, 1:], digit_ids).any(1)
        self.ids = blocks[perm[has_digit[perm]][:B]]  # blocks with a digit label, so that NTL has work to do
        self.labels, self.mask = shift_labels(self.ids)
        tm = torch.zeros_like(self.ids, dtype=torch.bool)
        tm[:, T // 2 :] = True
        self.labels_h, self.mask_h = shift_labels(self.ids, target_mask=tm)
        self.hf_labels_h = self.ids.masked_fill(~tm, -100)
        self.ref_ce = reference_token_loss(self.ref, self.ids, None, self.labels, self.mask)
        self.noctx = no_context_logprobs(self.ref, self.labels_h, self.mask_h)
        self.ntl = get_token_loss("number_token", tokenizer=ad.tokenizer)
        E = self.model.get_input_embeddings().weight.detach()
        self.sce = get_token_loss("smoothed_ce", embeddings=E)
        self.n_number_labels = int(torch.isin(self.labels[self.mask], digit_ids).sum())

    def variants(self) -> dict[str, Callable[[], torch.Tensor]]:
        from tokensmith.optimization.training import (
            compute_token_objective,
            reference_token_loss,
        )

        m, ids, lab, mask = self.model, self.ids, self.labels, self.mask

        def fwd(hidden: bool = False) -> Any:
            return m(input_ids=ids, use_cache=False, output_hidden_states=hidden)

        def obj(*a: Any, **k: Any) -> torch.Tensor:
            return compute_token_objective(fwd().logits, lab, mask, *a, **k).loss

        def rho1_fly() -> torch.Tensor:
            logits = fwd().logits
            ref = reference_token_loss(self.ref, ids, None, lab, mask)
            return compute_token_objective(logits, lab, mask, "rho1", ref_token_loss=ref).loss

        def prior() -> torch.Tensor:
            logits = fwd().logits
            lp = self.noctx
            return compute_token_objective(
                logits, self.labels_h, self.mask_h, "prior", ref_noctx_logprobs=lp
            ).loss

        def simctg() -> torch.Tensor:
            out = fwd(hidden=True)
            return compute_token_objective(
                out.logits, lab, mask, token_losses=["simctg"], hidden=out.hidden_states[-1]
            ).loss

        return {
            BASE: lambda: m(input_ids=ids, labels=ids, use_cache=False).loss,
            BASE + " (2nd instance: noise check, expect 1.00)": lambda: (
                m(input_ids=ids, labels=ids, use_cache=False).loss
            ),
            "ours, w = 1 (compute_token_objective, no weighter)": lambda: obj(),
            "uniform": lambda: obj("uniform"),
            "rho1 (reference CE precomputed)": lambda: obj("rho1", ref_token_loss=self.ref_ce),
            "rho1 (reference forward on the fly)": rho1_fly,
            "tldr": lambda: obj("tldr"),
            "focal": lambda: obj("focal"),
            BASE_HALF: lambda: m(input_ids=ids, labels=self.hf_labels_h, use_cache=False).loss,
            "prior (no-context log-probs precomputed)": prior,
            "ce + simctg": simctg,
            "ce + contrastive_token": lambda: obj(token_losses=["contrastive_token"]),
            "ce + unlikelihood": lambda: obj(token_losses=["unlikelihood"]),
            "ce + number_token (mse)": lambda: obj(token_losses=[self.ntl]),
            "smoothed_ce (replaces ce)": lambda: obj(token_losses=[self.sce]),
        }

    def step(self, loss_fn: Callable[[], torch.Tensor]) -> tuple[float, float]:
        """One full optimizer step; returns (total seconds, seconds in AdamW.step)."""
        t0 = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        t1 = time.perf_counter()
        self.opt.step()
        t2 = time.perf_counter()
        if not torch.isfinite(loss.detach()):
            raise ValueError(f"non-finite loss {float(loss)}")
        return t2 - t0, t2 - t1


def base_of(name: str) -> str:
    return BASE_HALF if name.startswith("prior") else BASE


def bench_objectives(ad: Any, B: int, T: int, repeats: int, seed: int) -> dict[str, Any]:
    bench = Bench(ad, B, T, seed)
    vs = bench.variants()
    names = list(vs)
    times: dict[str, list[float]] = {n: [] for n in names}
    opt_times: dict[str, list[float]] = {n: [] for n in names}
    warm: dict[str, float] = {}
    for n in names:  # warm-up, in the listed order
        warm[n] = bench.step(vs[n])[0]
    rng = random.Random(seed)
    for r in range(repeats):
        order = names[:]
        rng.shuffle(order)
        for n in order:
            t, o = bench.step(vs[n])
            times[n].append(t)
            opt_times[n].append(o)
        print(f"    round {r + 1}/{repeats}: {BASE} {times[BASE][-1] * 1e3:.0f} ms", flush=True)
    rows: dict[str, Any] = {}
    for n in names:
        b = base_of(n)
        ratios = [a / c for a, c in zip(times[n], times[b], strict=True)]
        rows[n] = {
            "baseline": b,
            "median_s": statistics.median(times[n]),
            "adamw_step_median_s": statistics.median(opt_times[n]),
            "paired_ratio": statistics.median(ratios),
            "ratio_of_medians": statistics.median(times[n]) / statistics.median(times[b]),
            "times_s": times[n],
            "adamw_step_times_s": opt_times[n],
            "warmup_s": warm[n],
        }
        print(f"  {n}: {rows[n]['median_s'] * 1e3:.0f} ms, ratio {rows[n]['paired_ratio']:.3f}", flush=True)
    # (b) needs real gradients of a plain CE step on this batch
    bench.opt.zero_grad(set_to_none=True)
    vs[BASE]().backward()
    return {
        "B": B,
        "T": T,
        "tokens": int(bench.mask.sum()),
        "number_labels": bench.n_number_labels,
        "rows": rows,
        "_bench": bench,
    }


# ----------------------------------------------------------------------------------------------- (b)
def bench_optimizers(bench: Bench, args: argparse.Namespace) -> dict[str, Any]:
    """optim_bench's paired AdamW-vs-variant timing on the model's own parameters and real gradients."""
    named = list({id(p): (n, p) for n, p in bench.model.named_parameters() if p.requires_grad}.values())
    names, ps = [n for n, _ in named], [p for _, p in named]
    for p in ps:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    ns = argparse.Namespace(rank=args.rank)
    all_vs = optim_bench.variants(ns, names)
    sel = _select(all_vs, args.optimizers)
    baseline = torch.optim.AdamW(ps, lr=1e-4)
    baseline.step()
    rows: dict[str, Any] = {}
    for name in sel:
        print(f"  {name} ...", flush=True)
        try:
            rows[name] = optim_bench.time_variant(all_vs[name], ps, args.opt_repeats, baseline)
        except Exception as err:  # noqa: BLE001 - report, do not fail
            rows[name] = {"error": f"{type(err).__name__}: {err}"}
            continue
        print(f"    paired ratio {rows[name]['paired_ratio']:.2f}", flush=True)
    stored = RESULTS / "optim_bench.json"
    ref_rows: dict[str, Any] = {}
    ref_meta: dict[str, Any] = {}
    if stored.exists():
        d = json.loads(stored.read_text())
        ref_rows = {k: v.get("paired_ratio") for k, v in d.get("b_steps", {}).get("rows", {}).items()}
        ref_meta = {k: d.get("meta", {}).get(k) for k in ("model", "threads", "repeats", "loadavg_start")}
    base_all = [x for r in rows.values() for x in r.get("adamw_times_s", [])]
    return {
        "n_params": sum(p.numel() for p in ps),
        "n_tensors": len(ps),
        "galore_rank": args.rank,
        "adamw_median_s": statistics.median(base_all) if base_all else None,
        "rows": rows,
        "optim_bench_json": {"meta": ref_meta, "paired_ratio": ref_rows} if ref_rows else None,
    }


def _select(vs: dict[str, Any], spec: str) -> list[str]:
    if spec == "all":
        return list(vs)
    if spec == "ours":
        return [n for n in vs if n.startswith("ours") or "noise check" in n]
    keys = [s.strip() for s in spec.split(",") if s.strip()]
    return [n for n in vs if any(k in n for k in keys)]


# ----------------------------------------------------------------------------------------------- output
def markdown(out: dict[str, Any]) -> str:
    m = out["meta"]
    md = [
        "# Token objectives: weighting overhead in a full training step, and optimizer steps vs AdamW",
        "",
        f"Model {m['model']} ({m['params'] / 1e6:.1f} M parameters, vocabulary {m['vocab']}, fp32, CPU); "
        f"{m['threads']} torch thread(s) on {m['cpu_count']} CPUs; seed {m['seed']}; torch {m['torch']}, "
        f"transformers {m['transformers']}; {m['platform']}; load average at start {m['loadavg_start']}, at end "
        f"{m['loadavg_end']}; total {m['total_s']:.0f} s. Batch: real English text (`pydoc_data.topics` prose). "
        "Protocol: see the script's docstring.",
        "",
        "## (a) One full step (zero_grad, forward, loss, backward, AdamW.step) per variant",
        "",
    ]
    for a in out["a_objectives"]:
        md += [
            f"### B = {a['B']}, T = {a['T']} ({a['tokens']} counted tokens, {a['number_labels']} digit labels)",
            "",
            f"Warm-up step per variant, then {m['repeats']} rounds, each running every variant once in a shuffled "
            "order. Ratio = median over rounds of variant / baseline in the same round (paired). "
            f"Goal: <= {GOAL:.2f} (weighting <= 10% of a step).",
            "",
            "| variant | median step (ms) | AdamW.step in it (ms) | ratio vs plain CE (paired) | ratio of medians | "
            "goal |",
            "|---|---:|---:|---:|---:|---|",
        ]
        for n, r in a["rows"].items():
            if n in (BASE, BASE_HALF):
                goal = "baseline" + (" for prior" if n == BASE_HALF else "")
            elif "on the fly" in n:
                goal = "(+1 reference forward)"
            else:
                goal = "met" if r["paired_ratio"] <= GOAL else "NOT met"
            md.append(
                f"| {n} | {r['median_s'] * 1e3:.0f} | {r['adamw_step_median_s'] * 1e3:.0f} | "
                f"{r['paired_ratio']:.3f} | {r['ratio_of_medians']:.3f} | {goal} |"
            )
        md.append("")
    b = out.get("b_optimizers")
    if b:
        ref = b.get("optim_bench_json")
        md += [
            f"## (b) Optimizer step vs torch.optim.AdamW on the same parameters ({b['n_params'] / 1e6:.1f} M in "
            f"{b['n_tensors']} tensors, the model of (a), gradients of one real CE backward)",
            "",
            "Calls `optim_bench.time_variant`: a warm-up step per variant, then "
            f"{m['opt_repeats']} rounds of (one step of a torch.optim.AdamW with default options kept alive for "
            "the whole run, one step of the variant); ratio = median of the per-round ratios. AdamW median over "
            f"all rounds {b['adamw_median_s'] * 1e3:.0f} ms. GaLore rank {b['galore_rank']} on the blocks' 2-D "
            "weights; its first step computes every projection basis.",
            "",
            "| variant | median step (ms) | AdamW in the same rounds (ms) | ratio vs AdamW (paired) | first step (ms) "
            "| state (MiB) | optim_bench.json ratio (fresh tensors) |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for n, r in b["rows"].items():
            if "error" in r:
                md.append(f"| {n} | error: {r['error']} | | | | | |")
                continue
            rr = (ref or {}).get("paired_ratio", {}).get(n)
            md.append(
                f"| {n} | {r['median_s'] * 1e3:.0f} | {r['adamw_median_s'] * 1e3:.0f} | {r['paired_ratio']:.2f} | "
                f"{r['first_step_s'] * 1e3:.0f} | {r['state_mib']:.0f} | {'' if rr is None else f'{rr:.2f}'} |"
            )
        if ref:
            md += [
                "",
                f"Last column: the stored `optim_bench.py` run ({ref['meta'].get('model')}; "
                f"{ref['meta'].get('threads')} thread(s), {ref['meta'].get('repeats')} repeats).",
            ]
        md.append("")
    return "\n".join(md)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=SMOLLM2, help="bundled name or tiny:<arch>")
    ap.add_argument("--batch-sizes", default="2,4")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--opt-repeats", type=int, default=3)
    ap.add_argument("--optimizers", default="ours", help="'ours', 'all', or comma-separated name substrings")
    ap.add_argument("--rank", type=int, default=128, help="GaLore rank")
    ap.add_argument("--skip", default="", help="parts to skip: 'a', 'b'")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="ts.tiny('llama'), B=2, T=64, 3 repeats (< 1 min)")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    if args.quick:
        args.model, args.batch_sizes, args.seq_len = "tiny:llama", "2", 64
        args.repeats, args.opt_repeats, args.rank = 3, 2, 16
    torch.set_num_threads(args.threads)
    import transformers

    import tokensmith as ts

    t_start = time.perf_counter()
    ad = ts.tiny(args.model.split(":", 1)[1]) if args.model.startswith("tiny:") else ts.load(args.model)
    skip = set(filter(None, args.skip.split(",")))
    meta = {
        "model": args.model,
        "params": sum(p.numel() for p in {id(p): p for p in ad.model.parameters()}.values()),
        "vocab": int(ad.model.get_output_embeddings().weight.shape[0]),
        "threads": args.threads,
        "cpu_count": os.cpu_count(),
        "seed": args.seed,
        "repeats": args.repeats,
        "opt_repeats": args.opt_repeats,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": f"{platform.system()} {platform.machine()}",
        "loadavg_start": tuple(round(x, 1) for x in os.getloadavg()),
        "args": vars(args),
    }
    out: dict[str, Any] = {"meta": meta, "a_objectives": []}
    sizes = [int(b) for b in args.batch_sizes.split(",") if b]
    last = None
    if "a" in skip:
        last = Bench(ad, sizes[0], args.seq_len, args.seed)
        last.model(input_ids=last.ids, labels=last.ids, use_cache=False).loss.backward()
    else:
        for B in sizes:
            print(f"(a) B={B}, T={args.seq_len} ...", flush=True)
            a = bench_objectives(ad, B, args.seq_len, args.repeats, args.seed)
            last = a.pop("_bench")
            out["a_objectives"].append(a)
    if "b" not in skip and last is not None:
        print("(b) optimizer steps ...", flush=True)
        out["b_optimizers"] = bench_optimizers(last, args)
    meta["loadavg_end"] = tuple(round(x, 1) for x in os.getloadavg())
    meta["total_s"] = time.perf_counter() - t_start
    write_results(args.out, "objectives_bench" + ("_quick" if args.quick else ""), out, markdown(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
