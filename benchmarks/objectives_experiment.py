"""Token-weighted fine-tuning experiment: plain CE vs Rho-1 selection vs TLDR on real English text (not a test).

What it runs (METHODS.md 3B, OPT-B1/B2; issue 10 "Must show"):

- **Corpus.** The prose paragraphs of the standard library's ``pydoc_data.topics`` (Python's reference-manual
  prose, ~30k words; :func:`tokensmith.pruning.haystack.english_paragraphs`), tokenized with the SmolLM2
  tokenizer, EOS between paragraphs, cut into blocks of ``T`` tokens. A seeded permutation splits the blocks
  into *held-out* (15%), a *clean subset* (25%) and *training* (the rest).
- **Noise.** Rho-1's premise is that some training tokens are noise. ``--noise`` of the training blocks get a
  random contiguous span of half their tokens replaced by ids drawn uniformly from the vocabulary (special
  tokens excluded): a stand-in for the garbage of web text (boilerplate, encoding errors, random strings).
  The held-out and clean blocks stay clean.
- **Initial model.** SmolLM2: the pretrained SmolLM2-135M-Instruct. Tiny model: a random ``ts.tiny("llama")``
  first trained with plain CE on the clean subset for ``--tiny-pretrain-steps`` steps (stage 1: it stands in
  for a pretrained model; a random model would make TLDR identical to CE: at p ~ 1/V its weight is 2
  everywhere and Adam is scale-invariant). Every objective fine-tunes a copy of it (stage 2).
- **Rho-1's reference**, two variants side by side: ``rho1`` uses the frozen initial model (no extra training;
  the excess loss is then exactly 0 at the first step, whose selection falls back to position order, and
  later measures how far the policy has moved away from the initial model), ``rho1_clean`` the paper's recipe,
  "a reference model trained on high-quality data": a copy of the initial model trained with plain CE on the
  clean subset for ``--tiny-ref-steps`` / ``--smollm2-ref-steps`` more steps, then frozen. This reference has
  seen clean data the other objectives never see (as in the paper).
- **Objectives**, all from the same initial weights, on the same batches in the same order, with AdamW
  (constant LR, no weight decay, gradient norm clipped at 1.0, as HF Trainer's default):
  ``ce`` (plain mean CE, ``weighter=None``), ``rho1`` and ``rho1_clean``
  (:class:`~tokensmith.optimization.training.Rho1`, top ``--keep-ratio`` of each batch's tokens by signed excess
  loss, the reference's CE computed on the fly each step) and ``tldr``
  (:class:`~tokensmith.optimization.training.TLDR`, w = cos(pi p) + 1, gradient through w).
- **Lock step.** Every step runs all objectives on the batch one after another, in an order rotated each
  step, so the per-step time ratios against ``ce`` are paired (drift on the shared machine hits all alike).
  A step = forward, (Rho-1: reference forward under no_grad), loss, backward, clip, AdamW step.
- **Measured.** Held-out mean CE per token-frequency bucket: bucket ids from
  :func:`~tokensmith.optimization.training.frequency_buckets` over the clean training labels' counts
  (:func:`~tokensmith.optimization.training.token_frequencies`), ``--n-buckets`` equal-mass buckets, bucket 0 the
  rarest (it also holds tokens never seen in training); the initial model is evaluated too. Training side:
  median step time, tokens/s, the paired ratio to ``ce``, the kept fraction, and the share of the total token
  weight that lands on noise tokens (plain CE: the noise fraction of the labels).

Usage::

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/objectives_experiment.py            # tiny (2 seeds) + SmolLM2
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/objectives_experiment.py --quick    # tiny only, few steps (<1 min)
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/objectives_experiment.py --models tiny --seeds 0,1,2

Writes ``benchmarks/results/objectives_experiment.{json,md}`` (``_quick`` suffix with ``--quick``).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from proc_memory import write_results  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SMOLLM2 = "smollm2-135m-instruct"
OBJECTIVES = ("ce", "rho1", "rho1_clean", "tldr")


# ----------------------------------------------------------------------------------------------- data
def english_blocks(tokenizer: Any, seq_len: int) -> torch.Tensor:
    """``[N, seq_len]`` long: ``pydoc_data.topics`` prose paragraphs, EOS-separated, as one stream cut into blocks."""
    from tokensmith.pruning.haystack import english_paragraphs

    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for p in english_paragraphs():
        stream.extend(tokenizer(p, add_special_tokens=False).input_ids)
        stream.append(eos)
    n = len(stream) // seq_len
    return torch.tensor(stream[: n * seq_len], dtype=torch.long).view(n, seq_len)


def split_blocks(
    blocks: torch.Tensor, seed: int, held_out: float = 0.15, ref: float = 0.25
) -> dict[str, torch.Tensor]:
    """Seeded split into ``held_out`` / ``ref`` (the clean subset) / ``train`` blocks."""
    perm = torch.randperm(blocks.shape[0], generator=torch.Generator().manual_seed(seed))
    n_h, n_r = round(held_out * len(perm)), round(ref * len(perm))
    return {
        "held_out": blocks[perm[:n_h]],
        "ref": blocks[perm[n_h : n_h + n_r]],
        "train": blocks[perm[n_h + n_r :]],
    }


def corrupt(
    blocks: torch.Tensor, frac: float, vocab_size: int, special: set[int], seed: int, span: float = 0.5
) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace a random contiguous ``span`` share of the tokens of ``frac`` of the blocks by uniform random ids.

    Returns ``(corrupted [N, T], noise [N, T] bool)``.
    """
    g = torch.Generator().manual_seed(seed)
    N, T = blocks.shape
    out, noise = blocks.clone(), torch.zeros(N, T, dtype=torch.bool)
    allowed = torch.tensor([i for i in range(vocab_size) if i not in special])
    rows = torch.randperm(N, generator=g)[: round(frac * N)]
    L = max(1, round(span * T))
    for r in rows.tolist():
        s = int(torch.randint(0, T - L + 1, (1,), generator=g))
        out[r, s : s + L] = allowed[torch.randint(0, len(allowed), (L,), generator=g)]
        noise[r, s : s + L] = True
    return out, noise


# ----------------------------------------------------------------------------------------------- eval
@torch.no_grad()
def bucket_losses(
    model: torch.nn.Module, blocks: torch.Tensor, bucket_ids: torch.Tensor, batch_size: int = 8
) -> dict:
    """Held-out mean CE over all next-token positions and per frequency bucket of the label."""
    from tokensmith.optimization.training import shift_labels, token_loss

    was = model.training
    model.eval()
    n = int(bucket_ids.max()) + 1
    s, c = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    for i in range(0, blocks.shape[0], batch_size):
        ids = blocks[i : i + batch_size]
        labels, mask = shift_labels(ids)
        ce = token_loss(model(input_ids=ids, use_cache=False).logits, labels, mask)
        b = bucket_ids[labels.clamp_min(0)][mask]
        s.scatter_add_(0, b, ce[mask].double())
        c.scatter_add_(0, b, torch.ones_like(b, dtype=torch.float64))
    model.train(was)
    return {
        "loss": float(s.sum() / c.sum()),
        "buckets": [float(x) for x in (s / c.clamp_min(1)).tolist()],
        "tokens": [int(x) for x in c.tolist()],
    }


# ----------------------------------------------------------------------------------------------- train
class Run:
    """One objective's model, optimizer and per-step records."""

    def __init__(
        self,
        name: str,
        model: torch.nn.Module,
        lr: float,
        keep_ratio: float,
        ref: torch.nn.Module | None = None,
    ) -> None:
        from tokensmith.optimization.training import TLDR, Rho1

        self.name, self.model, self.ref = name, model, ref
        self.model.train()
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=lr, weight_decay=0.0)
        self.weighter = {
            "ce": None,
            "rho1": Rho1(keep_ratio),
            "rho1_clean": Rho1(keep_ratio),
            "tldr": TLDR(),
        }[name]
        self.times: list[float] = []
        self.loss_ce: list[float] = []
        self.kept: list[float] = []
        self.noise_share: list[float] = []
        self.weight_mean: list[float] = []

    def step(self, ids: torch.Tensor, noise_labels: torch.Tensor) -> None:
        from tokensmith.optimization.training import (
            compute_token_objective,
            reference_token_loss,
            shift_labels,
        )

        t0 = time.perf_counter()
        labels, mask = shift_labels(ids)
        logits = self.model(input_ids=ids, use_cache=False).logits
        extra = {}
        if self.ref is not None:
            extra["ref_token_loss"] = reference_token_loss(self.ref, ids, None, labels, mask)
        out = compute_token_objective(logits, labels, mask, self.weighter, **extra)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.times.append(time.perf_counter() - t0)
        w = out.weights.detach()
        self.loss_ce.append(float(out.logs["loss_ce"]))
        self.kept.append(float(out.kept_fraction))
        self.noise_share.append(float(w[noise_labels & mask].sum() / w[mask].sum()))
        self.weight_mean.append(float(out.logs["weight_mean"]))


def train_ce(
    model: torch.nn.Module, blocks: torch.Tensor, steps: int, batch_size: int, lr: float, seed: int
) -> None:
    """Plain-CE training on clean blocks (in place): stage 1 of the tiny runs, and the clean reference."""
    run = Run("ce", model, lr, 1.0)
    order = _order(blocks.shape[0], steps * batch_size, seed)
    zeros = torch.zeros(batch_size, blocks.shape[1], dtype=torch.bool)
    for s in range(steps):
        ids = blocks[order[s * batch_size : (s + 1) * batch_size]]
        run.step(ids, zeros[: ids.shape[0]])
    model.eval()


def _order(n: int, total: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.cat([torch.randperm(n, generator=g) for _ in range(math.ceil(total / n))])[:total]


def experiment(kind: str, args: argparse.Namespace, seed: int) -> dict[str, Any]:
    """One run (``kind`` = "tiny" or "smollm2") at one seed: data, reference, lock-step training, evaluation."""
    import tokensmith as ts
    from tokensmith.optimization.training import frequency_buckets, token_frequencies

    tiny = kind == "tiny"
    if tiny:
        ad = ts.tiny("llama", seed=seed, n_layers=args.tiny_layers, hidden=args.tiny_hidden)
        T, B, steps, lr = args.tiny_seq_len, args.tiny_batch, args.tiny_steps, args.tiny_lr
    else:
        ad = ts.load(SMOLLM2)
        T, B, steps, lr = args.smollm2_seq_len, args.smollm2_batch, args.smollm2_steps, args.smollm2_lr
    tok, init = ad.tokenizer, ad.model
    init.eval()
    V = int(init.get_output_embeddings().weight.shape[0])
    blocks = english_blocks(tok, T)
    sp = split_blocks(blocks, seed)
    held = sp["held_out"] if tiny else sp["held_out"][: args.smollm2_eval_blocks]
    clean_train = sp["train"]
    train, noise = corrupt(clean_train, args.noise, V, set(tok.all_special_ids), seed + 1)
    noise_labels = torch.zeros_like(noise)
    noise_labels[:, :-1] = noise[:, 1:]
    freq = token_frequencies([{"labels": b[1:]} for b in clean_train], V)
    bucket_ids = frequency_buckets(freq, args.n_buckets)
    print(
        f"[{kind} seed {seed}] {blocks.shape[0]} blocks of {T}: train {len(train)} ({args.noise:.0%} corrupted), "
        f"clean subset {len(sp['ref'])}, held-out {len(held)}",
        flush=True,
    )

    t0 = time.perf_counter()
    evals: dict[str, Any] = {}
    pre_steps = args.tiny_pretrain_steps if tiny else args.smollm2_pretrain_steps
    if pre_steps:
        evals["before stage 1"] = bucket_losses(init, held, bucket_ids)
        train_ce(init, sp["ref"], pre_steps, B, args.tiny_pretrain_lr if tiny else lr, seed + 2)
        print(
            f"  stage 1: {pre_steps} CE steps on the clean subset in {time.perf_counter() - t0:.0f} s",
            flush=True,
        )
    evals["init"] = bucket_losses(init, held, bucket_ids)
    refs = {"rho1": copy.deepcopy(init).eval().requires_grad_(False)}
    ref_steps = args.tiny_ref_steps if tiny else args.smollm2_ref_steps
    ref_lr = args.tiny_pretrain_lr if tiny else lr
    if "rho1_clean" in args.objectives:
        t1 = time.perf_counter()
        ref_clean = copy.deepcopy(init)
        train_ce(ref_clean, sp["ref"], ref_steps, B, ref_lr, seed + 4)
        refs["rho1_clean"] = ref_clean.requires_grad_(False)
        evals["reference (clean)"] = bucket_losses(ref_clean, held, bucket_ids)
        print(f"  clean reference: {ref_steps} more CE steps in {time.perf_counter() - t1:.0f} s", flush=True)
    runs = {
        name: Run(name, copy.deepcopy(init), lr, args.keep_ratio, refs.get(name)) for name in args.objectives
    }
    order = _order(len(train), steps * B, seed + 3)
    names = list(runs)
    curves: dict[str, list[tuple[int, float]]] = {n: [] for n in names}
    eval_every = max(1, steps // args.n_evals) if args.n_evals else 0
    for s in range(steps):
        idx = order[s * B : (s + 1) * B]
        k = s % len(names)
        for name in names[k:] + names[:k]:
            runs[name].step(train[idx], noise_labels[idx])
        if eval_every and (s + 1) % eval_every == 0 and s + 1 < steps:
            for name in names:
                curves[name].append((s + 1, bucket_losses(runs[name].model, held, bucket_ids)["loss"]))
        if (s + 1) % max(1, steps // 5) == 0:
            print(
                f"  step {s + 1}/{steps}: "
                + ", ".join(
                    f"{n} ce {runs[n].loss_ce[-1]:.3f} ({runs[n].times[-1] * 1e3:.0f} ms)" for n in names
                ),
                flush=True,
            )
    for name in names:
        evals[name] = bucket_losses(runs[name].model, held, bucket_ids)
        curves[name].append((steps, evals[name]["loss"]))
    base = runs["ce"].times if "ce" in runs else None
    train_stats = {}
    for name, r in runs.items():
        ts_ = r.times[1:] if len(r.times) > 1 else r.times  # the first step allocates the optimizer state
        row = {
            "median_step_s": statistics.median(ts_),
            "tokens_per_s": B * (T - 1) / statistics.median(ts_),
            "kept_fraction": statistics.mean(r.kept),
            "weight_mean": statistics.mean(r.weight_mean),
            "noise_weight_share": statistics.mean(r.noise_share),
            "final_train_loss_ce": statistics.mean(r.loss_ce[-max(1, steps // 10) :]),
            "times_s": r.times,
        }
        if base is not None:
            row["paired_ratio_vs_ce"] = statistics.median(
                [a / b for a, b in zip(ts_, base[1:] if len(base) > 1 else base, strict=True)]
            )
        train_stats[name] = row
    # bucket description: token types and frequency range per bucket
    buckets = []
    for j in range(args.n_buckets):
        sel = bucket_ids == j
        f = freq[sel]
        seen = f[f > 0]
        buckets.append(
            {
                "types": int(sel.sum()),
                "seen_types": int((f > 0).sum()),
                "train_mass": int(f.sum()),
                "min_count": int(seen.min()) if seen.numel() else 0,
                "max_count": int(seen.max()) if seen.numel() else 0,
                "held_out_tokens": evals["init"]["tokens"][j],
            }
        )
    info = {
        "model": f"tiny llama ({args.tiny_layers} layers, d={args.tiny_hidden}, SmolLM2 tokenizer)"
        if tiny
        else SMOLLM2,
        "params": sum(p.numel() for p in {id(p): p for p in init.parameters()}.values()),
        "vocab": V,
        "seq_len": T,
        "batch": B,
        "steps": steps,
        "lr": lr,
        "seed": seed,
        "n_blocks": {k: int(v.shape[0]) for k, v in sp.items()} | {"held_out_evaluated": int(held.shape[0])},
        "noise_blocks": args.noise,
        "noise_label_fraction": float(noise_labels[:, :-1].float().mean()),
        "pretrain_steps": pre_steps,
        "pretrain_lr": (args.tiny_pretrain_lr if tiny else lr) if pre_steps else None,
        "keep_ratio": args.keep_ratio,
        "ref_steps": ref_steps if "rho1_clean" in args.objectives else 0,
        "ref_lr": ref_lr,
        "wall_s": time.perf_counter() - t0,
    }
    print(
        f"  done in {info['wall_s']:.0f} s: "
        + ", ".join(f"{n} held-out {evals[n]['loss']:.3f}" for n in names),
        flush=True,
    )
    return {"info": info, "buckets": buckets, "eval": evals, "train": train_stats, "curves": curves}


# ----------------------------------------------------------------------------------------------- report
def _la(x: Any) -> str:
    return "(" + ", ".join(f"{v:.1f}" for v in x) + ")"


def _mean_sd(xs: list[float]) -> str:
    if len(xs) == 1:
        return f"{xs[0]:.3f}"
    return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f}"


def markdown(res: dict[str, Any]) -> str:
    m = res["meta"]
    md = [
        "# Token-weighted fine-tuning: plain CE vs Rho-1 vs TLDR (held-out loss per frequency bucket)",
        "",
        f"torch {m['torch']}, transformers {m['transformers']}, {m['platform']}, {m['threads']} torch thread(s) on "
        f"{m['cpu_count']} CPUs; "
        + "; ".join(
            f"`--models {v['models']}`: load average {_la(v['loadavg_start'])} at start, "
            f"{_la(v.get('loadavg_end', ()))} at end, "
            f"{v.get('total_s', 0):.0f} s"
            for v in m["invocations"]
        )
        + ". Corpus: `pydoc_data.topics` prose "
        f"({m['paragraphs']} paragraphs), SmolLM2 tokenizer. Protocol: see the script's docstring.",
        "",
    ]
    for kind in sorted(res["runs"], key=lambda k: k != "tiny"):
        seeds = res["runs"][kind]
        r0 = seeds[0]
        i = r0["info"]
        nb = len(r0["buckets"])
        names = [n for n in OBJECTIVES if n in r0["eval"]]
        md += [
            f"## {i['model']}",
            "",
            f"{i['params'] / 1e6:.1f} M parameters, vocabulary {i['vocab']}; blocks of {i['seq_len']} tokens, "
            f"batch {i['batch']}, {i['steps']} steps, AdamW lr {i['lr']:g} (constant, clip 1.0); "
            f"{i['noise_blocks']:.0%} of the training blocks half-corrupted "
            f"({i['noise_label_fraction']:.1%} of the training labels are noise); Rho-1 keep ratio "
            f"{i['keep_ratio']}. Initial model"
            + (
                f" = a random init trained with CE on the clean subset ({i['n_blocks']['ref']} blocks) for "
                f"{i['pretrain_steps']} steps at lr {i['pretrain_lr']:g} (stage 1)"
                if i["pretrain_steps"]
                else ": the pretrained model"
            )
            + ". Reference of `rho1`: the frozen initial model; of `rho1_clean`: the initial model trained with "
            f"CE on the clean subset for {i.get('ref_steps', 0)} more steps (lr {i.get('ref_lr', 0):g}), "
            "frozen (Rho-1's recipe: a reference trained on high-quality data)"
            + f"; held-out: {i['n_blocks']['held_out_evaluated']} clean blocks; seeds "
            f"{[s['info']['seed'] for s in seeds]} (mean ± sd over seeds where more than one).",
            "",
            "Frequency buckets (equal training mass, bucket 0 = rarest, incl. unseen tokens): "
            + "; ".join(
                f"b{j}: {b['seen_types']} seen types, counts {b['min_count']}–{b['max_count']}, "
                f"{b['held_out_tokens']} held-out tokens"
                for j, b in enumerate(r0["buckets"])
            )
            + ".",
            "",
            "| model | held-out loss | " + " | ".join(f"bucket {j}" for j in range(nb)) + " |",
            "|---|---:|" + "---:|" * nb,
        ]
        for name in ["before stage 1", "init", "reference (clean)", *names]:
            if name not in r0["eval"]:
                continue
            vals = [_mean_sd([s["eval"][name]["loss"] for s in seeds])]
            vals += [_mean_sd([s["eval"][name]["buckets"][j] for s in seeds]) for j in range(nb)]
            md.append(f"| {name} | " + " | ".join(vals) + " |")
        if "ce" in r0["eval"]:
            md += [
                "",
                "Difference to plain CE (negative = lower held-out loss than CE), per seed:",
                "",
                "| objective | seed | held-out loss | " + " | ".join(f"bucket {j}" for j in range(nb)) + " |",
                "|---|---:|---:|" + "---:|" * nb,
            ]
            for name in names:
                if name == "ce":
                    continue
                for s in seeds:
                    e, c = s["eval"][name], s["eval"]["ce"]
                    md.append(
                        f"| {name} | {s['info']['seed']} | {e['loss'] - c['loss']:+.3f} | "
                        + " | ".join(f"{e['buckets'][j] - c['buckets'][j]:+.3f}" for j in range(nb))
                        + " |"
                    )
        md += [
            "",
            "Training side (paired: each step runs every objective on the same batch, order rotated; the "
            "first step is left out of the times):",
            "",
            "| objective | median step (ms) | tokens/s | step time / CE (paired) | kept fraction | mean weight | "
            "weight share on noise tokens | train CE (last 10%) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for name in names:
            t = [s["train"][name] for s in seeds]
            md.append(
                f"| {name} | {statistics.mean(x['median_step_s'] for x in t) * 1e3:.0f} | "
                f"{statistics.mean(x['tokens_per_s'] for x in t):.0f} | "
                f"{statistics.mean(x.get('paired_ratio_vs_ce', math.nan) for x in t):.2f} | "
                f"{statistics.mean(x['kept_fraction'] for x in t):.2f} | "
                f"{statistics.mean(x.get('weight_mean', math.nan) for x in t):.3f} | "
                f"{statistics.mean(x['noise_weight_share'] for x in t):.3f} | "
                f"{statistics.mean(x['final_train_loss_ce'] for x in t):.3f} |"
            )
        md.append("")
    return "\n".join(md)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="tiny,smollm2", help="comma list of tiny, smollm2")
    ap.add_argument("--objectives", default=",".join(OBJECTIVES))
    ap.add_argument("--seeds", default="0,1", help="seeds of the tiny runs (SmolLM2 runs the first only)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--noise", type=float, default=0.3, help="share of training blocks half-corrupted")
    ap.add_argument("--keep-ratio", type=float, default=0.6)
    ap.add_argument("--n-buckets", type=int, default=4)
    ap.add_argument(
        "--n-evals", type=int, default=4, help="held-out evaluations during the tiny runs (curve)"
    )
    ap.add_argument("--tiny-layers", type=int, default=2)
    ap.add_argument("--tiny-hidden", type=int, default=64)
    ap.add_argument("--tiny-seq-len", type=int, default=64)
    ap.add_argument("--tiny-batch", type=int, default=8)
    ap.add_argument("--tiny-steps", type=int, default=100)
    ap.add_argument("--tiny-lr", type=float, default=3e-3)
    ap.add_argument(
        "--tiny-pretrain-steps", type=int, default=150, help="stage 1: CE steps on the clean subset"
    )
    ap.add_argument("--tiny-pretrain-lr", type=float, default=3e-3)
    ap.add_argument(
        "--tiny-ref-steps", type=int, default=50, help="rho1_clean: more CE steps on the clean subset"
    )
    ap.add_argument("--smollm2-seq-len", type=int, default=128)
    ap.add_argument("--smollm2-batch", type=int, default=2)
    ap.add_argument("--smollm2-steps", type=int, default=10)
    ap.add_argument("--smollm2-lr", type=float, default=5e-5)
    ap.add_argument("--smollm2-eval-blocks", type=int, default=16)
    ap.add_argument(
        "--smollm2-pretrain-steps", type=int, default=0, help="CE steps on the clean subset first"
    )
    ap.add_argument(
        "--smollm2-ref-steps",
        type=int,
        default=20,
        help="rho1_clean: CE steps of the reference, clean subset",
    )
    ap.add_argument(
        "--quick", action="store_true", help="tiny model only, few steps: checks that it runs (<1 min)"
    )
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument(
        "--append", action="store_true", help="keep the other models' runs of the existing result file"
    )
    args = ap.parse_args(argv)
    if args.quick:
        args.models, args.seeds, args.n_evals = "tiny", "0", 0
        args.tiny_layers, args.tiny_hidden, args.tiny_batch, args.tiny_seq_len = 2, 64, 4, 32
        args.tiny_steps, args.tiny_pretrain_steps, args.tiny_ref_steps = 8, 12, 4
    args.objectives = tuple(o for o in args.objectives.split(",") if o)
    bad = set(args.objectives) - set(OBJECTIVES)
    if bad:
        ap.error(f"unknown objectives {sorted(bad)}; choose from {OBJECTIVES}")
    torch.set_num_threads(args.threads)
    import transformers

    from tokensmith.pruning.haystack import english_paragraphs

    t_start = time.perf_counter()
    meta = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": f"{platform.system()} {platform.machine()}",
        "threads": args.threads,
        "cpu_count": os.cpu_count(),
        "loadavg_start": tuple(round(x, 1) for x in os.getloadavg()),
        "paragraphs": len(english_paragraphs()),
    }
    seeds = [int(s) for s in args.seeds.split(",") if s]
    stem = "objectives_experiment" + ("_quick" if args.quick else "")
    res: dict[str, Any] = {"meta": meta, "runs": {}}
    prev = Path(args.out) / f"{stem}.json"
    if args.append and prev.exists():
        old = json.loads(prev.read_text())
        res["runs"] = old.get("runs", {})
        meta["invocations"] = old.get("meta", {}).get("invocations", [])
    inv = {
        "models": args.models,
        "seeds": args.seeds,
        "loadavg_start": meta["loadavg_start"],
        "args": vars(args),
    }
    meta.setdefault("invocations", []).append(inv)
    for kind in [k for k in args.models.split(",") if k]:
        if kind not in ("tiny", "smollm2"):
            ap.error(f"unknown model {kind!r}: use tiny, smollm2")
        res["runs"][kind] = []
        for s in seeds if kind == "tiny" else seeds[:1]:
            res["runs"][kind].append(experiment(kind, args, s))
            inv["loadavg_end"] = tuple(round(x, 1) for x in os.getloadavg())
            inv["total_s"] = time.perf_counter() - t_start
            write_results(args.out, stem, res, markdown(res))  # after every run: a crash keeps what is done
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
