"""End-to-end preference training run (not a test): a few hundred steps of DPO, TDPO1 and SparsePO on a tiny
model, held-out margin and accuracy before and after.

The CI test (``tests/alignment/test_trainer.py``) runs 30 steps; this records the longer run the alignment issue
asks for. Protocol: ``ts.tiny("llama")`` (2 layers, d=64, SmolLM2's 49,152-token vocabulary, seed 0) as policy
and an identical frozen copy as reference; ``demo_pairs(160, seed=0)`` split 120 train / 40 held-out
(``train_test_split(test_size=0.25, seed=0)``); ``TokenPreferenceTrainer`` with batch 8, Adam (HF default
AdamW, weight decay 0), constant learning rate, β = 0.1, plain text (no chat template). The held-out margin is
β·mean(Σ_t Δ_t(y_w) − Σ_t Δ_t(y_l)) with Δ_t = log π_θ − log π_ref, from direct forwards (no cache); accuracy is
the share of held-out pairs with a positive margin. Before training the policy equals the reference, so the
margin is exactly 0.

Usage::

    python benchmarks/alignment_e2e.py                 # 300 steps per loss, ~4-8 min on 1 thread
    python benchmarks/alignment_e2e.py --steps 50      # quicker

Writes ``benchmarks/results/alignment_e2e.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from proc_memory import write_results  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
BETA = 0.1


def margin(pol, ref, ds) -> tuple[float, float]:
    from tokensmith.alignment.data import encode_pairs, pair_logprobs

    pb = encode_pairs(pol, list(ds), chat=False)
    pw, pl = pair_logprobs(pol, pb)
    rw, rl = pair_logprobs(ref, pb)
    h = ((pw - rw) * pb.mask_w).sum(-1) - ((pl - rl) * pb.mask_l).sum(-1)
    return float(BETA * h.mean()), float((h > 0).float().mean())


def run(loss: str, steps: int, lr: float, split, seed: int) -> dict:
    import transformers

    import tokensmith as ts
    from tokensmith.alignment import TokenPreferenceTrainer

    pol, ref = ts.tiny("llama", seed=seed), ts.tiny("llama", seed=seed)
    kw = {}
    if loss == "sparsepo":
        from tokensmith.alignment.sparsepo import SparsePOMasks

        kw["loss_kwargs"] = {"masks": SparsePOMasks(ref), "l1_u": 0.01, "l1_d": 0.01}
    before = margin(pol, ref, split["test"])
    with tempfile.TemporaryDirectory() as d:
        args = transformers.TrainingArguments(
            d, per_device_train_batch_size=8, learning_rate=lr, weight_decay=0.0, lr_scheduler_type="constant",
            logging_steps=max(1, steps // 10), save_strategy="no", report_to=[], seed=seed, use_cpu=True,
            disable_tqdm=True, max_steps=steps,
        )
        tr = TokenPreferenceTrainer(pol, ref, loss=loss, beta=BETA, args=args, train_dataset=split["train"],
                                    chat=False, **kw)
        t = time.perf_counter()
        tr.train()
        secs = time.perf_counter() - t
    after = margin(pol, ref, split["test"])
    curve = [(h["step"], h["loss"], h.get("rewards/margins")) for h in tr.state.log_history if "loss" in h]
    out = {"loss": loss, "steps": steps, "lr": lr, "seconds": secs, "margin_before": before[0],
           "accuracy_before": before[1], "margin_after": after[0], "accuracy_after": after[1], "curve": curve}
    print(f"{loss:>9}: held-out margin {before[0]:.3f} -> {after[0]:.3f}, accuracy {before[1]:.2f} -> "
          f"{after[1]:.2f} ({steps} steps, {secs:.0f} s)", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--losses", default="dpo,tdpo,sparsepo")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-dir", default=str(RESULTS))
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    from tokensmith.alignment.pairs import demo_pairs

    split = demo_pairs(160, seed=0).train_test_split(test_size=0.25, seed=0)
    t0 = time.perf_counter()
    rows = [run(loss, args.steps, args.lr, split, args.seed) for loss in args.losses.split(",")]
    res = {"benchmark": "alignment_e2e", "date": time.strftime("%Y-%m-%d %H:%M:%S"),
           "env": {"torch": torch.__version__, "python": platform.python_version(), "threads": args.threads,
                   "cpu_count": os.cpu_count(), "load_average_end": list(os.getloadavg())},
           "config": {"model": "ts.tiny('llama') (2 layers, d=64, vocab 49152)", "pairs": "demo_pairs(160) 120/40",
                      "batch": 8, "beta": BETA, **vars(args)},
           "rows": rows, "total_seconds": time.perf_counter() - t0}
    md = ["# Alignment end-to-end run", "",
          f"Tiny Llama (2 layers, d=64, SmolLM2 vocabulary 49,152), policy = reference at step 0; 120 training / 40 "
          f"held-out demo pairs; batch 8, constant lr {args.lr}, β = {BETA}; {args.threads} thread(s); seed "
          f"{args.seed}; torch {torch.__version__}; {res['date']}; total {res['total_seconds']:.0f} s.", "",
          "| loss | steps | held-out margin before | after | held-out accuracy before | after | train time (s) |",
          "|---|---:|---:|---:|---:|---:|---:|"]
    md += [f"| {r['loss']} | {r['steps']} | {r['margin_before']:.3f} | {r['margin_after']:.3f} | "
           f"{r['accuracy_before']:.2f} | {r['accuracy_after']:.2f} | {r['seconds']:.0f} |" for r in rows]
    md += ["", "Margin = β·mean over held-out pairs of (Σ_t Δ_t(chosen) − Σ_t Δ_t(rejected)), Δ = log π_θ − log π_ref; "
           "SparsePO uses learned masks (`SparsePOMasks` over every reference layer, λ_u = λ_d = 0.01)."]
    write_results(Path(args.out_dir), "alignment_e2e", res, "\n".join(md) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
