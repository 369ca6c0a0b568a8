"""Benchmark one preference-optimization training step (forward + backward) against baselines (not a test).

Two measurements on the same synthetic batch, each variant in a fresh subprocess (peak RSS is per process):

(1) **TDPO step: chunked vs naive.** One TDPO1 step (Zeng et al. 2024) at SmolLM2's 49,152-token vocabulary:

    - ``ours``: the public path ``encode_pairs`` -> ``pair_logprobs(policy, grad=True)`` + ``pair_logprobs(reference)``
      -> ``pair_kl(policy, reference, grad=True)`` -> ``tdpo`` -> ``backward`` (logits only at completion
      positions; the KL chunked, its backward recomputing each chunk). ``pair_logprobs`` and ``pair_kl`` each run
      their own forward, so the policy runs forward twice and two autograd graphs are alive at the backward.
    - ``ours-1fwd``: the same building blocks with one forward per model: ``adapter.forward(batch,
      logits_to_keep=completion positions)`` once, then ``gather_logprobs`` and ``token_kl`` on the same logits.
    - ``naive``: full ``[2B, T, V]`` logits of policy and reference, ``log_softmax``, per-token KL over every
      position, then the completion mask (what a plain PyTorch implementation does).

    Goal: >= 3x less peak memory than naive, <= 15% slower.

(2) **DPO step: ours vs TRL.** ``pair_logprobs`` (policy with grad, reference without) -> ``dpo`` -> ``backward``
    against ``trl.DPOTrainer.training_step`` on the same pairs (TRL tokenizes them itself; the script checks that
    both sides score the same tokens by comparing the summed log-probs and the gradient norm).

Protocol per variant (one subprocess each, ``MALLOC_MMAP_THRESHOLD_=65536`` so freed tensors return to the OS): load
policy and reference, run one small warm-up step of the same variant (this also allocates the parameter
gradients, which then sit in the baseline) and one untimed full-size step, zero the gradients in place, ``gc`` +
``malloc_trim``, reset the kernel's peak-RSS counter (``/proc/self/clear_refs``), read ``VmRSS``, run the full-size
step, read ``VmHWM``: peak extra = VmHWM - VmRSS(before), every byte the process touched during the step. That step
and ``--repeats - 1`` more are timed; the step time is their median. The TDPO part runs without and with gradient
checkpointing of the policy (``--checkpointing``): without it the model's activations dominate the peak.

Sizes: B=2 pairs, T~256 (prompt ~128 + completion ~128 tokens) by default, not the issue's B=8: on 1-2 shared CPU
cores one SmolLM2 step at B=8, T=256 takes about a minute and the whole run must stay under 15 minutes. The ratios
depend little on B, except that fixed costs (parameter-gradient temporaries) weigh more at small B.

Usage::

    python benchmarks/alignment_bench.py            # SmolLM2-135M-Instruct, B=2 pairs, T~256, 1 thread; ~9 min
    python benchmarks/alignment_bench.py --quick    # small sizes, < 2 min (results get a _quick suffix)

Writes ``benchmarks/results/alignment_bench.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from proc_memory import malloc_trim, reset_peak_rss, status_kib, write_results  # noqa: E402

DEFAULT_MODEL = "smollm2-135m-instruct"
RESULTS = Path(__file__).resolve().parent / "results"
TDPO_VARIANTS = ("ours", "ours-1fwd", "ours-chunked", "naive")
DPO_VARIANTS = ("dpo-ours", "dpo-trl")
BETA = 0.1
PROTOCOL = (
    "Each variant runs in a fresh subprocess (MALLOC_MMAP_THRESHOLD_=65536): load policy and reference "
    "(two copies of the model), one small warm-up step of the same variant (it allocates the parameter "
    "gradients, which then belong to the baseline) and one untimed full-size step, zero the gradients in "
    "place, gc + malloc_trim, reset "
    "the peak-RSS counter (/proc/self/clear_refs = 5), read VmRSS, run the full-size step, read VmHWM. "
    "Peak extra memory = VmHWM - VmRSS(before): every byte the process touched during the step "
    "(activations, logits, temporaries, allocator overhead). Step time: median over the full-size steps. "
    "Variants run one after another, so load from other jobs can differ between them (load average "
    "recorded per variant)."
)

WORDS = (
    "the model reads a short answer and writes careful notes about every step of the proof while the "
    "river runs past old stone bridges under grey clouds near a quiet village where people bake bread "
    "sell apples repair bicycles and argue about weather music football prices trains and distant cities"
).split()


# ----------------------------------------------------------------------------------------------- data
def _text(tok, rng: random.Random, n_tokens: int) -> str:
    """Deterministic word soup cut at the token boundary after ``n_tokens`` tokens."""
    s = " ".join(rng.choice(WORDS) for _ in range(2 * n_tokens))
    enc = tok(s, add_special_tokens=False, return_offsets_mapping=True)
    return s[: enc["offset_mapping"][n_tokens - 1][1]].strip()


def make_pairs(tok, B: int, prompt_len: int, completion_len: int, seed: int) -> list[dict[str, str]]:
    """``B`` synthetic pairs: a ~``prompt_len``-token prompt ending in a newline; chosen ~``completion_len`` tokens,
    rejected 0-15 tokens shorter (so the batch has padding)."""
    rng = random.Random(seed)
    out = []
    for _ in range(B):
        prompt = _text(tok, rng, prompt_len) + "\n"
        chosen = _text(tok, rng, max(2, completion_len))
        rejected = _text(tok, rng, max(2, completion_len - rng.randint(0, 15)))
        out.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return out


# ----------------------------------------------------------------------------------------------- steps
def _load(model: str):
    from tokensmith.report.build import load_model

    ad = load_model(model)
    ad.model.eval()  # no dropout in SmolLM2 anyway; deterministic
    return ad


def _scatter(vals: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.zeros(mask.shape, dtype=vals.dtype).masked_scatter(mask, vals)


def step_tdpo(variant: str, policy, reference, pairs) -> dict[str, float]:
    from tokensmith.alignment.data import encode_pairs, pair_kl, pair_logprobs
    from tokensmith.alignment.losses import tdpo
    from tokensmith.models.logprobs import gather_logprobs, shift_target_mask, token_kl

    pb = encode_pairs(policy, pairs, chat=False)
    tm = pb.batch.target_mask.to(torch.bool)
    ids = pb.batch.input_ids
    if variant == "ours":
        lp_w, lp_l = pair_logprobs(policy, pb, grad=True)
        with torch.no_grad():
            r_w, r_l = pair_logprobs(reference, pb)
        kl_w, kl_l = pair_kl(policy, reference, pb, grad=True)
    elif variant == "ours-chunked":
        from tokensmith.alignment.data import pair_logprobs_and_kl

        f = pair_logprobs_and_kl(policy, reference, pb, grad=True)  # chunked LM head (the default)
        (lp_w, lp_l), (r_w, r_l), (kl_w, kl_l) = f["policy"], f["reference"], f["kl"]
    elif variant == "ours-1fwd":
        keep = shift_target_mask(tm)
        tgt = ids[tm]
        z_pol = policy.forward(pb.batch, logits_to_keep=keep).logits
        with torch.no_grad():
            z_ref = reference.forward(pb.batch, logits_to_keep=keep).logits
        if z_pol.dim() == 3:  # a model without boolean logits_to_keep support
            z_pol, z_ref = z_pol[keep], z_ref[keep]
        lp_w, lp_l = pb.split(_scatter(gather_logprobs(z_pol, tgt), tm))
        r_w, r_l = pb.split(_scatter(gather_logprobs(z_ref, tgt), tm))
        kl_w, kl_l = pb.split(_scatter(token_kl(z_ref, z_pol), tm))
    elif variant == "naive":
        d = {"input_ids": ids, "attention_mask": pb.batch.attention_mask,
             "position_ids": pb.batch.position_ids, "use_cache": False}
        logits = policy.model(**d).logits  # [2B, T, V]
        with torch.no_grad():
            ref_logits = reference.model(**d).logits
        lsm = torch.log_softmax(logits.float(), -1)
        ref_lsm = torch.log_softmax(ref_logits.float(), -1)
        kl_pos = (ref_lsm.exp() * (ref_lsm - lsm)).sum(-1)  # KL(ref || policy) at every position
        tok_lp = torch.zeros(ids.shape)
        tok_ref = torch.zeros(ids.shape)
        tok_kl = torch.zeros(ids.shape)
        tok_lp = torch.cat([tok_lp[:, :1], lsm[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]], 1) * tm
        tok_ref = torch.cat([tok_ref[:, :1], ref_lsm[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]], 1) * tm
        tok_kl = torch.cat([tok_kl[:, :1], kl_pos[:, :-1]], 1) * tm
        lp_w, lp_l = pb.split(tok_lp)
        r_w, r_l = pb.split(tok_ref)
        kl_w, kl_l = pb.split(tok_kl)
    else:
        raise ValueError(variant)
    loss, _ = tdpo(lp_w, lp_l, r_w, r_l, pb.mask_w, pb.mask_l, kl_w, kl_l, beta=BETA, variant=1)
    loss.backward()
    return {"loss": float(loss), "sum_logp_chosen": float(lp_w.detach().sum()),
            "sum_kl": float(kl_w.detach().sum() + kl_l.detach().sum()),
            "rows": int(ids.shape[0]), "T": int(ids.shape[1]), "completion_tokens": int(tm.sum())}


def step_dpo_ours(policy, reference, pairs) -> dict[str, float]:
    from tokensmith.alignment.data import encode_pairs, pair_logprobs
    from tokensmith.alignment.losses import dpo

    pb = encode_pairs(policy, pairs, chat=True)  # chat template, end-of-turn scored: what TRL does with chat data
    lp_w, lp_l = pair_logprobs(policy, pb, grad=True)
    with torch.no_grad():
        r_w, r_l = pair_logprobs(reference, pb)
    loss, _ = dpo(lp_w, lp_l, r_w, r_l, pb.mask_w, pb.mask_l, beta=BETA)
    loss.backward()
    return {"loss": float(loss), "sum_logp_chosen": float(lp_w.detach().sum()),
            "rows": int(pb.batch.input_ids.shape[0]), "T": int(pb.batch.input_ids.shape[1]),
            "completion_tokens": int(pb.batch.target_mask.sum())}


class TRLStep:
    """``trl.DPOTrainer`` (sigmoid loss, same beta) built once per process; ``__call__`` runs ``training_step``
    (forward of policy and reference with TRL's fused LM head, sigmoid DPO loss, backward) on the pairs."""

    def __init__(self, policy, reference, pairs_for_init, out_dir: str):
        import datasets
        from trl import DPOConfig, DPOTrainer

        self.tok = policy.tokenizer
        cfg = DPOConfig(output_dir=out_dir, per_device_train_batch_size=len(pairs_for_init), beta=BETA,
                        loss_type=["sigmoid"], max_length=None, report_to=[], use_cpu=True, bf16=False,
                        fp16=False, logging_steps=1, save_strategy="no", dataloader_num_workers=0,
                        remove_unused_columns=False)
        self.trainer = DPOTrainer(model=policy.model, ref_model=reference.model, args=cfg,
                                  train_dataset=datasets.Dataset.from_list(self.chat(pairs_for_init)),
                                  processing_class=self.tok)

    @staticmethod
    def chat(pairs) -> list[dict[str, list[dict[str, str]]]]:
        """The pairs in TRL's conversational format (TRL applies the chat template, as ``encode_pairs(chat=True)``)."""
        return [{"prompt": [{"role": "user", "content": p["prompt"]}],
                 "chosen": [{"role": "assistant", "content": p["chosen"]}],
                 "rejected": [{"role": "assistant", "content": p["rejected"]}]} for p in pairs]

    def batch(self, pairs) -> dict[str, torch.Tensor]:
        ds = self.trainer._prepare_dataset(__import__("datasets").Dataset.from_list(self.chat(pairs)), self.tok,
                                           self.trainer.args, "bench")
        return self.trainer.data_collator([ds[i] for i in range(len(ds))])

    def __call__(self, batch) -> dict[str, float]:
        tr = self.trainer
        tr._metrics["train"].clear()
        tr.current_gradient_accumulation_steps = 1  # set by Trainer.train() in normal use
        loss = tr.training_step(tr.model, batch)
        logps = tr._metrics["train"]["logps/chosen"][-1] * (batch["input_ids"].shape[0] // 2)
        return {"loss": float(loss), "sum_logp_chosen": float(logps), "rows": int(batch["input_ids"].shape[0]),
                "T": int(batch["input_ids"].shape[1]), "completion_tokens": int(batch["completion_mask"].sum())}


def _grad_norm(model) -> float:
    return float(torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters() if p.grad is not None)))


def _zero_grads(model) -> None:
    for p in model.parameters():
        if p.grad is not None:
            p.grad.zero_()  # keep the allocation: parameter gradients belong to the baseline, not the step's peak


def worker(args: argparse.Namespace) -> None:
    load0 = list(os.getloadavg())
    policy, reference = _load(args.model), _load(args.model)
    reference.model.requires_grad_(False)
    if args.ckpt:
        policy.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        policy.model.train()  # HF checkpoints only in training mode (SmolLM2 has no dropout)
    tok = policy.tokenizer
    pairs = make_pairs(tok, args.pairs, args.prompt_len, args.completion_len, args.seed)
    small = make_pairs(tok, 1, 12, 12, args.seed + 1)
    v = args.worker
    if v in TDPO_VARIANTS:
        def step(p):
            return step_tdpo(v, policy, reference, p)
        full, warm = pairs, small
    elif v == "dpo-ours":
        def step(p):
            return step_dpo_ours(policy, reference, p)
        full, warm = pairs, small
    else:
        with tempfile.TemporaryDirectory() as d:
            trl = TRLStep(policy, reference, pairs, d)
        full, warm = trl.batch(pairs), trl.batch(small)
        step = trl
    step(warm)  # warm-up: same code path, small; allocates parameter gradients
    step(full)  # and once at full size (first-call costs of new shapes stay out of the timings)
    _zero_grads(policy.model)
    gc.collect()
    malloc_trim()
    hwm_ok = reset_peak_rss()
    rss0 = status_kib("VmRSS")
    t = time.perf_counter()
    info = step(full)
    times = [time.perf_counter() - t]
    hwm = status_kib("VmHWM")
    gnorm = _grad_norm(policy.model)
    for _ in range(args.repeats - 1):
        _zero_grads(policy.model)
        gc.collect()
        t = time.perf_counter()
        step(full)
        times.append(time.perf_counter() - t)
    if hwm_ok and hwm is not None and rss0 is not None:
        peak, method = (hwm - rss0) / 1024, "VmHWM after clear_refs - VmRSS before"
    else:
        peak, method = float("nan"), "unavailable (no /proc/self/clear_refs)"
    out = {"variant": v + ("@ckpt" if args.ckpt else ""), "gradient_checkpointing": bool(args.ckpt), "peak_extra_mib": peak, "rss_before_mib": (rss0 or 0) / 1024, "method": method,
           "times_s": times, "median_s": statistics.median(times), "grad_norm": gnorm,
           "load_average_start": load0, "load_average_end": list(os.getloadavg()), "model_info": model_info(policy),
           **info}
    Path(args.result).write_text(json.dumps(out), encoding="utf-8")


# ----------------------------------------------------------------------------------------------- driver
def run_variant(args: argparse.Namespace, variant: str, d: str, ckpt: bool = False) -> dict[str, Any]:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="65536", HF_HUB_OFFLINE="1",
               TRANSFORMERS_VERBOSITY="error", TQDM_DISABLE="1")
    res = os.path.join(d, f"{variant}{'-ckpt' if ckpt else ''}.json")
    cmd = [sys.executable, __file__, "--worker", variant, "--result", res, "--model", args.model,
           "--pairs", str(args.pairs), "--prompt-len", str(args.prompt_len), "--completion-len",
           str(args.completion_len), "--repeats", str(args.repeats), "--seed", str(args.seed)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if ckpt:
        cmd.append("--ckpt")
        variant += "@ckpt"
    t = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        tail = (p.stderr or p.stdout)[-2000:]
        print(f"  {variant:<10} FAILED (rc {p.returncode}):\n{tail}", flush=True)
        return {"variant": variant, "error": tail}
    r = json.loads(Path(res).read_text(encoding="utf-8"))
    r["wall_s"] = time.perf_counter() - t
    print(f"  {variant:<10} peak extra {r['peak_extra_mib']:8.0f} MiB   step {r['median_s']:6.1f} s "
          f"(times {', '.join(f'{x:.1f}' for x in r['times_s'])})   loss {r['loss']:.6f}   "
          f"|grad| {r['grad_norm']:.5g}   load {r['load_average_start'][0]:.1f}", flush=True)
    return r


def trl_available() -> tuple[bool, str]:
    try:
        import trl  # noqa: F401
        from trl import DPOTrainer  # noqa: F401
    except Exception as e:  # pragma: no cover - environment dependent
        return False, f"trl not importable here: {type(e).__name__}: {e}"
    return True, f"trl {trl.__version__}"


def model_info(ad) -> dict[str, Any]:
    return {
        "model_class": type(ad.model).__name__,
        "params": sum(p.numel() for p in {id(p): p for p in ad.model.parameters()}.values()),
        "vocab_size": ad.structure.vocab_size,
        "num_layers": ad.structure.num_layers,
        "hidden_size": ad.structure.hidden_size,
        "attn_implementation": getattr(ad.config, "_attn_implementation", None),
    }


def env_info(args: argparse.Namespace) -> dict[str, Any]:
    import transformers

    import tokensmith

    return {
        "model": args.model,
        "torch_threads": args.threads or torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average_at_start": list(os.getloadavg()),
        "seed": args.seed,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokensmith": tokensmith.__version__,
        "python": platform.python_version(),
        "platform": f"{platform.system()} {platform.machine()}",
    }


def _ok(x: bool) -> str:
    return "met" if x else "NOT met"


def summarize(rows: dict[str, dict[str, Any]], V: int) -> dict[str, Any]:
    s: dict[str, Any] = {}
    good = {k: r for k, r in rows.items() if "error" not in r}
    for sfx in ("", "@ckpt"):
        if "naive" + sfx not in good:
            continue
        nv = good["naive" + sfx]
        s["analytic_full_logits_mib"] = nv["rows"] * nv["T"] * V * 4 / 2**20
        s["analytic_completion_logits_mib"] = nv["completion_tokens"] * V * 4 / 2**20
        for k in ("ours" + sfx, "ours-1fwd" + sfx, "ours-chunked" + sfx):
            if k in good:
                o = good[k]
                s[k] = {"memory_ratio_naive_over_ours": nv["peak_extra_mib"] / o["peak_extra_mib"],
                        "time_ratio_ours_over_naive": o["median_s"] / nv["median_s"],
                        "loss_abs_diff": abs(o["loss"] - nv["loss"]),
                        "sum_kl_rel_diff": abs(o["sum_kl"] - nv["sum_kl"]) / max(abs(nv["sum_kl"]), 1e-12),
                        "grad_norm_rel_diff": abs(o["grad_norm"] - nv["grad_norm"]) / nv["grad_norm"]}
    if "dpo-ours" in good and "dpo-trl" in good:
        o, t = good["dpo-ours"], good["dpo-trl"]
        s["dpo"] = {"memory_ratio_trl_over_ours": t["peak_extra_mib"] / o["peak_extra_mib"],
                    "time_ratio_ours_over_trl": o["median_s"] / t["median_s"],
                    "same_tokens": (o["completion_tokens"] == t["completion_tokens"]),
                    "sum_logp_chosen_abs_diff": abs(o["sum_logp_chosen"] - t["sum_logp_chosen"]),
                    "grad_norm_rel_diff": abs(o["grad_norm"] - t["grad_norm"]) / t["grad_norm"]}
    return s


def to_markdown(res: dict[str, Any]) -> str:
    e, s, rows, cfg = res["env"], res["summary"], res["rows"], res["config"]
    la = res["load_average"]
    lines = [
        "# Alignment benchmark",
        "",
        f"Model `{e['model']}` ({e['model_class']}, {e['params'] / 1e6:.1f} M params, {e['num_layers']} layers, "
        f"d={e['hidden_size']}, vocab {e['vocab_size']}, fp32, CPU, attention {e['attn_implementation']}); "
        f"torch {e['torch']}, transformers {e['transformers']}, {res['trl']}, tokensmith {e['tokensmith']}, "
        f"Python {e['python']}, {e['platform']}; **{e['torch_threads']} torch threads** on {e['cpu_count']} CPUs; "
        f"load average {', '.join(f'{x:.1f}' for x in la['start'])} at the start and "
        f"{', '.join(f'{x:.1f}' for x in la['end'])} at the end (1, 5, 15 min; the machine is shared with other "
        f"jobs); seed {e['seed']}; {res['date']}; total {res['total_seconds']:.0f} s.",
        "",
        f"Batch: {cfg['pairs']} synthetic pairs (deterministic word soup; prompt ~{cfg['prompt_len']} tokens, "
        f"chosen ~{cfg['completion_len']}, rejected 0-15 shorter), so {2 * cfg['pairs']} rows; plain text for "
        "TDPO, the chat template for the TRL comparison (so T differs); padded length T and completion tokens "
        "per variant below. One step = forward of policy and reference + loss + backward through the policy. "
        f"{cfg['repeats']} timed full-size steps per variant after an untimed one (the first timed step also "
        "measures the peak).",
        "",
        res["protocol"],
        "",
        "## (1) TDPO1 step: chunked vs naive full-tensor",
        "",
        "| variant | T | completion tokens | peak extra memory (MiB) | naive / variant | step time median (s) "
        "| variant / naive | all step times (s) | loss | grad norm | load (1 min) at start |",
        "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|",
    ]
    names = {"ours": "`pair_logprobs` + `pair_kl` + `tdpo` (public path)",
             "ours-1fwd": "one forward per model: `gather_logprobs` + `token_kl` + `tdpo`",
             "ours-chunked": "`pair_logprobs_and_kl` (chunked LM head, no `[N, V]` logits) + `tdpo`",
             "naive": "naive: full logits, `log_softmax`, KL everywhere, then mask",
             "dpo-ours": "ours: `pair_logprobs` + `dpo`", "dpo-trl": "`trl.DPOTrainer.training_step`"}

    def row(k: str, base: str) -> str:
        r = rows.get(k)
        name = names[k.split("@")[0]] + (", gradient checkpointing" if k.endswith("@ckpt") else "")
        if r is None:
            return f"| {name} | skipped | | | | | | | | | |"
        if "error" in r:
            return f"| {name} | failed (see JSON) | | | | | | | | | |"
        b = rows.get(base, {})
        mr = f"{b['peak_extra_mib'] / r['peak_extra_mib']:.2f}x" if "peak_extra_mib" in b else ""
        tr = f"{r['median_s'] / b['median_s']:.2f}" if "median_s" in b else ""
        return (f"| {name} | {r['T']} | {r['completion_tokens']} | {r['peak_extra_mib']:.0f} | {mr} | "
                f"{r['median_s']:.1f} | {tr} | {', '.join(f'{x:.1f}' for x in r['times_s'])} | {r['loss']:.6f} | "
                f"{r['grad_norm']:.5g} | {r['load_average_start'][0]:.1f} |")

    for sfx in ("", "@ckpt"):
        lines += [row(k + sfx, "naive" + sfx) for k in TDPO_VARIANTS if k + sfx in rows]
    if "analytic_full_logits_mib" in s:
        lines += ["", f"One fp32 `[2B, T, V]` logits tensor is {s['analytic_full_logits_mib']:.0f} MiB; the completion "
                  f"positions' logits are {s['analytic_completion_logits_mib']:.0f} MiB."]
    for k in ("ours", "ours-1fwd", "ours-chunked", "ours@ckpt", "ours-1fwd@ckpt", "ours-chunked@ckpt"):
        if k in s:
            x = s[k]
            lines.append(
                f"- **{k}**: {x['memory_ratio_naive_over_ours']:.2f}x less peak memory than naive (goal >= 3x: "
                f"{_ok(x['memory_ratio_naive_over_ours'] >= 3)}), time ratio {x['time_ratio_ours_over_naive']:.2f} "
                f"(goal <= 1.15: {_ok(x['time_ratio_ours_over_naive'] <= 1.15)}); agreement with naive: |Δloss| "
                f"{x['loss_abs_diff']:.1e}, relative Δ(Σ KL) {x['sum_kl_rel_diff']:.1e}, relative Δ|grad| "
                f"{x['grad_norm_rel_diff']:.1e}.")
    lines += ["", "Policy and reference start identical, so every loss is log 2 and the KL and its gradient are 0: the "
              "agreement checks cover the log-prob gradients (the KL gradient is tested against float64 autograd in "
              "`tests/models/test_logprobs_kl.py`); the costs do not depend on the values."]
    lines += ["", "## (2) DPO step: ours vs TRL's `DPOTrainer`", ""]
    if res.get("trl_skipped"):
        lines.append(f"Skipped: {res['trl_skipped']}")
    else:
        lines += [
            "| variant | T | completion tokens | peak extra memory (MiB) | TRL / variant | step time median (s) "
            "| variant / TRL | all step times (s) | loss | grad norm | load (1 min) at start |",
            "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|",
            row("dpo-ours", "dpo-trl"), row("dpo-trl", "dpo-trl"), "",
        ]
        if "dpo" in s:
            x = s["dpo"]
            lines.append(
                f"Ours vs TRL: {x['memory_ratio_trl_over_ours']:.2f}x less peak memory (TRL / ours), time ratio "
                f"ours / TRL {x['time_ratio_ours_over_trl']:.2f}. Same scored tokens: {x['same_tokens']}; |Δ Σ log p"
                f"(chosen)| {x['sum_logp_chosen_abs_diff']:.1e}; relative Δ|grad| {x['grad_norm_rel_diff']:.1e}. "
                "TRL right-pads and runs its fused LM head (tiles over the completion positions only); ours left-pads "
                "and keeps the logits at the completion positions (`logits_to_keep`).")
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=DEFAULT_MODEL, help="bundled name, path, or tiny:<arch> (default: %(default)s)")
    ap.add_argument("--quick", action="store_true", help="small sizes (< 2 min); results get a _quick suffix")
    ap.add_argument("--pairs", type=int, default=None, help="preference pairs B (default 2; quick 1)")
    ap.add_argument("--prompt-len", type=int, default=None, help="prompt tokens (default 128; quick 24)")
    ap.add_argument("--completion-len", type=int, default=None, help="completion tokens (default 128; quick 24)")
    ap.add_argument("--repeats", type=int, default=None, help="timed full-size steps per variant (default 2)")
    ap.add_argument("--skip-trl", action="store_true", help="skip the TRL comparison")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch.set_num_threads (default 1: on a shared machine more threads make timings erratic)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-dir", default=str(RESULTS))
    ap.add_argument("--checkpointing", choices=["both", "off", "on"], default=None,
                    help="TDPO part without and/or with gradient checkpointing of the policy (default: both; quick off)")
    ap.add_argument("--variants", default=",".join(TDPO_VARIANTS),
                    help="comma-separated TDPO variants to run (default: all; naive is always run)")
    ap.add_argument("--worker", choices=TDPO_VARIANTS + DPO_VARIANTS, help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if args.worker:
        worker(args)
        return 0
    args.checkpointing = args.checkpointing or ("off" if args.quick else "both")
    args.ckpt_modes = {"both": (False, True), "off": (False,), "on": (True,)}[args.checkpointing]
    dflt = (1, 24, 24, 2) if args.quick else (2, 128, 128, 2)
    args.pairs = args.pairs or dflt[0]
    args.prompt_len = args.prompt_len or dflt[1]
    args.completion_len = args.completion_len or dflt[2]
    args.repeats = args.repeats or dflt[3]

    t0 = time.perf_counter()
    env = env_info(args)
    trl_ok, trl_msg = (False, "skipped (--skip-trl)") if args.skip_trl else trl_available()
    print(f"{args.model}, {env['torch_threads']} threads, {trl_msg}; B={args.pairs} pairs, prompt ~{args.prompt_len}, "
          f"completion ~{args.completion_len}; load average {env['load_average_at_start']}", flush=True)
    rows: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as d:
        print("(1) TDPO step (one subprocess per variant)", flush=True)
        for ckpt in args.ckpt_modes:
            chosen = set(args.variants.split(",")) | {"naive"}
            for v in [v for v in TDPO_VARIANTS if v in chosen]:
                rows[v + ("@ckpt" if ckpt else "")] = run_variant(args, v, d, ckpt)
        if trl_ok:
            print("(2) DPO step: ours vs TRL", flush=True)
            for v in DPO_VARIANTS:
                rows[v] = run_variant(args, v, d)
    for r in rows.values():
        if "model_info" in r:
            env.update(r["model_info"])
            break
    res = {
        "benchmark": "alignment_bench",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "env": env,
        "trl": trl_msg,
        "trl_skipped": None if trl_ok else trl_msg,
        "quick": args.quick,
        "config": {"variants": args.variants, "checkpointing": args.checkpointing, "pairs": args.pairs, "prompt_len": args.prompt_len, "completion_len": args.completion_len,
                   "repeats": args.repeats, "beta": BETA, "tdpo_variant": 1},
        "protocol": PROTOCOL,
        "rows": rows,
        "summary": summarize(rows, env.get("vocab_size", 0)),
        "load_average": {"start": env["load_average_at_start"], "end": list(os.getloadavg())},
        "total_seconds": time.perf_counter() - t0,
    }
    out_dir = Path(args.out_dir)
    stem = "alignment_bench"
    if args.model != DEFAULT_MODEL:
        stem += "_" + "".join(c if c.isalnum() else "-" for c in args.model.lower()).strip("-")
    if args.quick:
        stem += "_quick"
    write_results(out_dir, stem, res, to_markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
