"""Analysis benchmark: per-layer statistics through hooks vs ``output_hidden_states=True`` (not a test).

Hooks-based collection of every layer's statistics against ``output_hidden_states=True`` and against
collecting everything first, and the logit lens against TransformerLens's.

Part 1 — **per-layer statistics over a corpus.** ``N`` sequences of ``T`` tokens of real English text (the
prose paragraphs of the stdlib's ``pydoc_data.topics``,
:func:`tokensmith.pruning.haystack.english_paragraphs`, EOS-separated, tokenized as one stream and cut
into ``T``-token blocks, in a seeded order, repeated cyclically when there are fewer than ``N`` blocks),
batch ``B``, fp32. The statistics are those of
:mod:`tokensmith.analysis`, for every hidden-state depth ``ℓ = 0..L`` (``L + 1 = 31`` for SmolLM2-135M):

- :class:`tokensmith.analysis.stream.Moments`: ``n``, ``Σx``, ``Σxxᵀ`` in float64 -> mean ``μ_ℓ`` and
  population covariance ``C_ℓ = Σ(x-μ)(x-μ)ᵀ/n``;
- the running sum of unit vectors ``s_ℓ = Σ_i x_i/‖x_i‖``, giving the anisotropy (mean pairwise cosine,
  SimCTG / Ethayarajh 2019) ``a_ℓ = (‖s_ℓ‖² − n) / (n(n − 1))`` (``‖s‖² = Σ_ij cos(x_i, x_j)``, the ``n``
  diagonal terms removed);
- the mean norm ``E‖x‖``.

Methods, each feeding the same reducers (except the naive one):

- ``ours``: :func:`tokensmith.analysis.stream.stream_hidden` (``adapter.hooks(cache=...)`` on every
  residual hook, forward stopped after the last block: no final norm, no LM head);
- ``hf``: ``adapter.model(input_ids, attention_mask, output_hidden_states=True)`` per batch (what one writes
  with plain transformers; it also computes the ``B×T×V`` logits);
- ``hf_keep1``: the same with ``logits_to_keep=1`` (an HF user who knows to skip the LM head);
- ``naive`` (what one-off scripts do): keep every batch's ``hidden_states`` in a list, then per depth
  concatenate, convert to float64 and compute mean (``X.mean``), covariance (``torch.cov``), unit vectors
  and norms at the end. Its memory grows with ``N`` (``T·(L+1)·d·4`` bytes per sequence just to hold the
  states), so it runs on fewer sequences when the estimate exceeds ``--naive-max-gb`` (said in the output).

Depth semantics: ours follow HF's ``hidden_states`` indexing except at ``ℓ = L``, where HF returns the state
*after* the final norm and tokensmith the last block's output *before* it. The agreement check compares the
statistics of ``ours`` and ``hf`` at depths ``0..L−1`` (max relative difference of means and covariances,
absolute difference of anisotropy) and reports ``ℓ = L`` separately.

Protocol. Every measurement runs in a fresh subprocess of this script (``--worker``;
``MALLOC_MMAP_THRESHOLD_=65536`` so freed tensors return to the OS), with
``torch.set_num_threads(--threads)``:

1. **time** (one process, all ``--timing-methods`` over all ``N`` sequences): after one untimed warm-up batch
   per method, each batch is run by every method in an order rotated per batch, so drift on a shared machine
   hits all alike; each method's time is its forward plus its reducer updates. Reported: total seconds, the
   median of per-batch paired ratios to ``hf``, the ratio of totals, the forward-only ratio; and the
   statistics agreement of the methods (same process, same data).
2. **memory** (one process per method, ``--mem-seqs`` sequences): load the model, warm up on one batch, ``gc``
   + ``malloc_trim``, reset the kernel's peak counter (``/proc/self/clear_refs``), record ``VmRSS``; then run
   (fresh reducers included) and report ``VmHWM − VmRSS₀`` (peak growth) after every batch. For the streaming
   methods the peak is reached in the first batch and stays flat (the per-batch trajectory is in the JSON),
   so ``--mem-seqs`` below ``N`` does not change it; the naive method's peak grows with ``N``
   (reported per sequence).

Goals (issue text): ``ours`` no slower than ``hf`` (ratio ≤ 1.0), peak memory lower.

Part 2 — **logit lens vs TransformerLens** (``--tl-python``: a separate venv with ``transformer_lens``,
``benchmarks/tl_lens_runner.py``): a few prompts (two short sentences and English paragraphs cut to
``--lens-tokens`` tokens), the same token ids on both sides. Ours: :func:`tokensmith.analysis.lens.logit_lens`
(``log_softmax(unembed(h_ℓ,t))``, the final norm applied to each depth). TransformerLens 4: its own
``ActivationCache.logit_lens`` (accumulated residual stream, ``ln_final`` with recomputed statistics,
``W_U``) on a ``TransformerBridge`` booted from the same checkpoint directory. Compared per (depth,
position): the log-prob of the actual next token (max abs difference) and the top-1 token (agreement);
wall time per prompt (median of ``--lens-repeats`` after a warm-up prompt), each library's own work
(ours also computes entropy, KL to the final layer, top-3, ranks and a tidy frame; TransformerLens's
readouts compute entropy and ranks; its bridge runs eager attention, ours SDPA).

Usage::

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/analysis_bench.py --quick     # tiny llama, ~1-2 min
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/analysis_bench.py             # SmolLM2-135M, N=1000 (long)
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/analysis_bench.py --skip-stats   # the logit lens part only

Sizes (defaults): N = 1000 sequences × T = 64 tokens, B = 16, ``--mem-seqs 128``, the naive method on all
N unless its memory estimate exceeds 6 GB, timing methods ``ours,hf,hf_keep1``, 1 torch thread, seed 0;
the lens: 5 prompts, 32 tokens, 3 repeats. The TransformerLens venv: ``python3.11 -m venv /tmp/tl_venv``,
``pip install /opt/wheels/torch-2.13.0+cpu-*.whl`` (torch first, so pip never resolves a CUDA torch), then
``pip install transformer_lens transformers==<ours>`` (4.3.0 installs with transformers 5.25.0).

Writes ``benchmarks/results/analysis_bench.{json,md}`` (``_quick`` / model suffixes; ``_lens`` with
``--skip-stats``, ``_stats`` with ``--skip-lens``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from proc_memory import meminfo_kib, settle_and_reset_peak, status_kib, write_results  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_MODEL = "smollm2-135m-instruct"
QUICK_MODEL = "tiny:llama"
METHODS = ("ours", "hf", "hf_keep1")
DEFAULT_TL_PYTHON = "/tmp/tl_venv/bin/python"
SHORT_PROMPTS = (
    "The capital of France is Paris, and the capital of Italy is Rome.",
    "One, two, three, four, five, six, seven, eight, nine, ten.",
)


# ----------------------------------------------------------------------------------------------- data
def english_blocks(tokenizer: Any, T: int, N: int, seed: int) -> tuple[torch.Tensor, dict[str, Any]]:
    """``[N, T]`` token ids: the prose paragraphs of ``pydoc_data.topics`` EOS-separated as one stream, cut
    into ``T``-token blocks, in a seeded order, repeated cyclically if there are fewer than ``N``."""
    from tokensmith.pruning.haystack import english_paragraphs

    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for p in english_paragraphs():
        stream.extend(tokenizer(p, add_special_tokens=False)["input_ids"])
        if eos is not None:
            stream.append(int(eos))
    n = len(stream) // T
    if n < 1:
        raise ValueError(f"the corpus has {len(stream)} tokens, fewer than one block of T={T}")
    blocks = torch.tensor(stream[: n * T], dtype=torch.long).view(n, T)
    blocks = blocks[torch.randperm(n, generator=torch.Generator().manual_seed(seed))]
    reps = math.ceil(N / n)
    out = blocks.repeat(reps, 1)[:N]
    info = {"stream_tokens": len(stream), "unique_blocks": n, "cyclic": N > n, "repeats_of_corpus": N / n}
    return out, info


# ----------------------------------------------------------------------------------------------- reducers
class LayerStats:
    """Per depth: :class:`~tokensmith.analysis.stream.Moments` (float64 mean / covariance), the running sum
    of unit vectors and of norms (module docstring)."""

    def __init__(self) -> None:
        self.moments: dict[int, Any] = {}
        self.unit_sum: dict[int, torch.Tensor] = {}
        self.norm_sum: dict[int, float] = {}

    def update(self, depth: int, x: torch.Tensor) -> None:
        from tokensmith.analysis.stream import Moments

        x64 = x.detach().to(torch.float64)
        if depth not in self.moments:
            self.moments[depth] = Moments()
            self.unit_sum[depth] = torch.zeros(x.shape[1], dtype=torch.float64)
            self.norm_sum[depth] = 0.0
        self.moments[depth].update(x64)
        nrm = x64.norm(dim=1)
        self.unit_sum[depth] += (x64 / nrm.clamp_min(1e-300)[:, None]).sum(0)
        self.norm_sum[depth] += float(nrm.sum())

    def summary(self) -> dict[str, Any]:
        ds = sorted(self.moments)
        n = [self.moments[d].n for d in ds]
        return {
            "depths": ds,
            "n": n,
            "mean": torch.stack([self.moments[d].mean for d in ds]),
            "cov": torch.stack([self.moments[d].cov for d in ds]),
            "anisotropy": [anisotropy(self.unit_sum[d], n[i]) for i, d in enumerate(ds)],
            "mean_norm": [self.norm_sum[d] / n[i] for i, d in enumerate(ds)],
        }


def anisotropy(unit_sum: torch.Tensor, n: int) -> float:
    """Mean pairwise cosine over ``i ≠ j`` from ``s = Σ x_i/‖x_i‖``: ``(‖s‖² − n) / (n(n − 1))``."""
    return float((unit_sum.double().square().sum() - n) / (n * (n - 1))) if n > 1 else float("nan")


def naive_summary(store: list[tuple[torch.Tensor, ...]]) -> dict[str, Any]:
    """The statistics from every batch's hidden states held in memory (the naive script): per depth,
    concatenate, float64, ``mean``, ``torch.cov``, unit vectors, norms."""
    D = len(store[0])
    means, covs, aniso, norms, ns = [], [], [], [], []
    for d in range(D):
        X = torch.cat([hs[d].reshape(-1, hs[d].shape[-1]) for hs in store]).double()
        nrm = X.norm(dim=1)
        means.append(X.mean(0))
        covs.append(torch.cov(X.T, correction=0))
        aniso.append(anisotropy((X / nrm.clamp_min(1e-300)[:, None]).sum(0), X.shape[0]))
        norms.append(float(nrm.mean()))
        ns.append(int(X.shape[0]))
        del X, nrm
    return {"depths": list(range(D)), "n": ns, "mean": torch.stack(means), "cov": torch.stack(covs),
            "anisotropy": aniso, "mean_norm": norms}


def compare(a: dict[str, Any], b: dict[str, Any], depths: list[int]) -> dict[str, Any]:
    """Per depth: max |Δμ| / max |μ_b|, max |ΔC| / max |C_b|, |Δ anisotropy|, |Δ mean norm| / mean norm."""
    ia = {d: i for i, d in enumerate(a["depths"])}
    ib = {d: i for i, d in enumerate(b["depths"])}
    rows = []
    for d in depths:
        i, j = ia[d], ib[d]
        mb, cb = b["mean"][j], b["cov"][j]
        rows.append({
            "depth": d,
            "n_equal": a["n"][i] == b["n"][j],
            "mean_rel": float((a["mean"][i] - mb).abs().max() / mb.abs().max().clamp_min(1e-300)),
            "cov_rel": float((a["cov"][i] - cb).abs().max() / cb.abs().max().clamp_min(1e-300)),
            "anisotropy_abs": abs(a["anisotropy"][i] - b["anisotropy"][j]),
            "mean_norm_rel": abs(a["mean_norm"][i] - b["mean_norm"][j]) / max(abs(b["mean_norm"][j]), 1e-300),
        })
    keys = ("mean_rel", "cov_rel", "anisotropy_abs", "mean_norm_rel")
    return {
        "depths": depths,
        "all_n_equal": all(r["n_equal"] for r in rows),
        **{f"max_{k}": max(r[k] for r in rows) for k in keys},
        "per_depth": rows,
    }


# ----------------------------------------------------------------------------------------------- methods
def hf_hidden(ad: Any, ids: torch.Tensor, keep1: bool) -> tuple[torch.Tensor, ...]:
    """``adapter.model(input_ids, attention_mask, output_hidden_states=True)`` (``logits_to_keep=1``)."""
    kw: dict[str, Any] = {"logits_to_keep": 1} if keep1 else {}
    with torch.no_grad():
        out = ad.model(
            input_ids=ids.to(ad.device), attention_mask=torch.ones_like(ids).to(ad.device),
            output_hidden_states=True, use_cache=False, **kw,
        )
    return tuple(h.float().cpu() for h in out.hidden_states)


class Runner:
    """One method over ``blocks``, batch by batch: ``step()`` runs the next batch's forward (timed) and its
    reducer updates (timed separately)."""

    def __init__(self, ad: Any, method: str, blocks: torch.Tensor, B: int, stats: LayerStats | None) -> None:
        from tokensmith.analysis.stream import stream_hidden

        self.ad, self.method, self.blocks, self.B = ad, method, blocks, B
        self.stats = stats
        self.i = 0
        self.gen = (
            stream_hidden(ad, blocks, layers=None, batch_size=B, progress=False) if method == "ours" else None
        )

    def forward(self) -> tuple[list[int], Any]:
        """The next batch's forward: ``(depths, tokens)`` with ``tokens(d)`` the ``[n_tokens, d_model]``
        states of the real tokens at depth ``d`` (ours: ``HiddenBatch.tokens``, a copy made one depth at a
        time while the reducers consume it; HF: a view, every token is real: the blocks have no padding)."""
        if self.gen is not None:
            hb = next(self.gen)
            return sorted(hb.hidden), hb.tokens
        ids = self.blocks[self.i * self.B : (self.i + 1) * self.B]
        hs = hf_hidden(self.ad, ids, keep1=self.method == "hf_keep1")
        return list(range(len(hs))), lambda d: hs[d].reshape(-1, hs[d].shape[-1])

    def step(self) -> tuple[float, float]:
        t0 = time.perf_counter()
        depths, tokens = self.forward()
        t1 = time.perf_counter()
        if self.stats is not None:
            for d in depths:
                self.stats.update(d, tokens(d))
        t2 = time.perf_counter()
        self.i += 1
        return t1 - t0, t2 - t1


# ----------------------------------------------------------------------------------------------- workers
def worker_setup(job: dict[str, Any]) -> tuple[Any, torch.Tensor, dict[str, Any]]:
    torch.set_num_threads(int(job["threads"]))
    from tokensmith.report import load_model

    ad = load_model(job["model"])
    if ad.dtype != torch.float32:
        raise ValueError(f"{job['model']} loaded as {ad.dtype}; the benchmark runs fp32")
    blocks, info = english_blocks(ad.tokenizer, int(job["T"]), int(job["N"]), int(job["seed"]))
    return ad, blocks, info


def worker_time(job: dict[str, Any]) -> dict[str, Any]:
    """All ``timing_methods`` over the same batches, order rotated per batch; statistics compared."""
    from tqdm.auto import tqdm

    ad, blocks, info = worker_setup(job)
    B, methods = int(job["B"]), list(job["timing_methods"])
    nb = math.ceil(blocks.shape[0] / B)
    for m in methods:  # warm-up, untimed, throwaway reducers
        Runner(ad, m, blocks[:B], B, LayerStats()).step()
    stats = {m: LayerStats() for m in methods}
    runners = {m: Runner(ad, m, blocks, B, stats[m]) for m in methods}
    fwd: dict[str, list[float]] = {m: [] for m in methods}
    red: dict[str, list[float]] = {m: [] for m in methods}
    orders = []
    for i in tqdm(range(nb), desc="time (all methods per batch)", disable=not job["progress"]):
        k = i % len(methods)
        order = methods[k:] + methods[:k]
        orders.append(order)
        for m in order:
            f, r = runners[m].step()
            fwd[m].append(f)
            red[m].append(r)
    summaries = {m: stats[m].summary() for m in methods}
    L = int(ad.structure.num_layers)
    agreement = {}
    for m in methods:
        if m == "ours":
            continue
        agreement[f"ours_vs_{m}"] = {
            "below_last": compare(summaries["ours"], summaries[m], list(range(L))),
            "last_depth": compare(summaries["ours"], summaries[m], [L]),
        }
    if job.get("stats_path"):
        torch.save({m: summaries[m] for m in methods if m in ("ours", "hf")}, job["stats_path"])
    return {
        "batches": nb,
        "forward_s": fwd,
        "reduce_s": red,
        "orders_first_batches": orders[: len(methods)],
        "agreement": agreement,
        "anisotropy_ours": summaries["ours"]["anisotropy"] if "ours" in summaries else None,
        "mean_norm_ours": summaries["ours"]["mean_norm"] if "ours" in summaries else None,
        "data": info,
        "model_info": model_info(ad),
        "load_average_end": list(os.getloadavg()),
    }


def worker_mem(job: dict[str, Any]) -> dict[str, Any]:
    """Peak RSS growth of one streaming method over ``N`` sequences (after a warm-up batch)."""
    ad, blocks, _ = worker_setup(job)
    B, method = int(job["B"]), job["method"]
    Runner(ad, method, blocks[:B], B, LayerStats()).step()  # warm-up: weights paged in, allocator warm
    ok = settle_and_reset_peak()
    rss0 = status_kib("VmRSS")
    stats = LayerStats()
    run = Runner(ad, method, blocks, B, stats)
    traj, times = [], []
    t = time.perf_counter()
    for _ in range(math.ceil(blocks.shape[0] / B)):
        times.append(sum(run.step()))
        hwm = status_kib("VmHWM")
        traj.append((hwm - rss0) / 1024 if ok and hwm and rss0 else None)
    total = time.perf_counter() - t
    rss1 = status_kib("VmRSS")
    return {
        "method": method,
        "seqs": int(blocks.shape[0]),
        "peak_growth_mib": traj[-1],
        "peak_growth_mib_after_batch": traj,
        "retained_mib": (rss1 - rss0) / 1024 if rss1 and rss0 else None,
        "reducers_mib": reducer_bytes(stats) / 2**20,
        "seconds": total,
        "seconds_per_batch": times,
        "baseline_rss_mib": rss0 / 1024 if rss0 else None,
    }


def worker_naive(job: dict[str, Any]) -> dict[str, Any]:
    """Peak RSS growth of holding every hidden state and computing the statistics at the end."""
    ad, blocks, _ = worker_setup(job)
    B = int(job["B"])
    naive_summary([hf_hidden(ad, blocks[:B], keep1=False)])  # warm-up
    ok = settle_and_reset_peak()
    rss0 = status_kib("VmRSS")
    t = time.perf_counter()
    store = []
    for s in range(0, blocks.shape[0], B):
        store.append(hf_hidden(ad, blocks[s : s + B], keep1=False))
    t_collect = time.perf_counter() - t
    hwm_collect = status_kib("VmHWM")
    summ = naive_summary(store)
    total = time.perf_counter() - t
    hwm = status_kib("VmHWM")
    held = sum(h.numel() * h.element_size() for hs in store for h in hs)
    del store
    if job.get("stats_path"):
        torch.save(summ, job["stats_path"])
    n = int(blocks.shape[0])
    peak = (hwm - rss0) / 1024 if ok and hwm and rss0 else None
    return {
        "method": "naive",
        "seqs": n,
        "peak_growth_mib": peak,
        "peak_growth_mib_after_collect": (hwm_collect - rss0) / 1024 if ok and hwm_collect and rss0 else None,
        "peak_growth_mib_per_seq": peak / n if peak is not None else None,
        "hidden_states_held_mib": held / 2**20,
        "hidden_states_held_mib_per_seq": held / 2**20 / n,
        "seconds": total,
        "seconds_collect": t_collect,
        "seconds_stats": total - t_collect,
        "baseline_rss_mib": rss0 / 1024 if rss0 else None,
    }


def reducer_bytes(stats: LayerStats) -> int:
    b = 0
    for d, m in stats.moments.items():
        b += m.s1.numel() * 8 + m.s2.numel() * 8 + stats.unit_sum[d].numel() * 8
    return b


def model_info(ad: Any) -> dict[str, Any]:
    cfg = ad.model.config
    return {
        "name": ad.name,
        "params": sum(p.numel() for p in {id(p): p for p in ad.model.parameters()}.values()),
        "num_layers": int(ad.structure.num_layers),
        "depths": int(ad.structure.num_layers) + 1,
        "d_model": int(cfg.hidden_size),
        "vocab_size": int(ad.model.get_input_embeddings().weight.shape[0]),
        "dtype": str(ad.dtype),
        "attn_implementation": getattr(cfg, "_attn_implementation", None),
        "final_norm_in_hf_last_hidden_state": True,
    }


WORKERS = {"time": worker_time, "mem": worker_mem, "naive": worker_naive}


def run_worker(kind: str, job: dict[str, Any], tmp: Path) -> dict[str, Any]:
    """This script in a fresh subprocess (``--worker kind``); its JSON result, or ``{"error": ...}``."""
    tag = f"{kind}_{job.get('method', '')}"
    jp, rp = tmp / f"{tag}.job.json", tmp / f"{tag}.result.json"
    jp.write_text(json.dumps(job), encoding="utf-8")
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="65536", HF_HUB_OFFLINE="1",
               TRANSFORMERS_VERBOSITY="error")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--job", str(jp),
           "--result", str(rp)]
    t = time.perf_counter()
    p = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True)
    if p.returncode != 0 or not rp.exists():
        print(f"worker {tag} FAILED (rc {p.returncode}); see its stderr above", flush=True)
        return {"error": f"rc {p.returncode}", "stdout_tail": (p.stdout or "")[-2000:]}
    out = json.loads(rp.read_text(encoding="utf-8"))
    out["wall_s"] = time.perf_counter() - t
    return out


# ----------------------------------------------------------------------------------------------- part 1
def naive_plan(args: argparse.Namespace, info: dict[str, Any]) -> dict[str, Any]:
    """How many sequences the naive method can hold under ``--naive-max-gb`` (and half of MemAvailable)."""
    T, D, d, V, B = args.seq_len, info["depths"], info["d_model"], info["vocab_size"], args.batch_size
    per_seq = T * D * d * 4  # the fp32 hidden states kept
    final = 3 * T * d * 8  # one depth concatenated in float64 + unit vectors + the centred copy in torch.cov
    fixed = B * T * V * 4 + B * T * D * d * 4  # one batch's logits and hidden states in flight
    est = lambda n: n * (per_seq + final) + fixed  # noqa: E731
    avail = meminfo_kib("MemAvailable")
    cap = args.naive_max_gb * 2**30
    if avail:
        cap = min(cap, avail * 1024 / 2)
    n = args.naive_seqs if args.naive_seqs is not None else args.seqs
    reduced = False
    if args.naive_seqs is None and est(n) > cap:
        n = max(B, int((cap - fixed) / (per_seq + final)) // B * B)
        reduced = True
    return {"seqs": n, "reduced": reduced, "estimate_gib_at_N": est(args.seqs) / 2**30,
            "cap_gib": cap / 2**30, "bytes_per_seq_held": per_seq}


def run_stats(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    base = {"model": args.model, "T": args.seq_len, "B": args.batch_size, "threads": args.threads,
            "seed": args.seed, "progress": not args.no_progress}
    print(f"[time] {args.seqs} sequences x {args.seq_len} tokens, methods {args.timing_methods} ...",
          flush=True)
    timing = run_worker("time", {**base, "N": args.seqs, "timing_methods": args.timing_methods,
                                 "stats_path": str(tmp / "stats_time.pt")}, tmp)
    if "error" in timing:
        return {"timing": timing}
    info = timing["model_info"]
    mem = {}
    for m in args.mem_methods:
        print(f"[memory] {m} over {args.mem_seqs} sequences ...", flush=True)
        mem[m] = run_worker("mem", {**base, "N": args.mem_seqs, "method": m}, tmp)
    plan = naive_plan(args, info)
    naive = None
    if not args.skip_naive:
        print(f"[memory] naive over {plan['seqs']} sequences"
              f"{' (reduced: the estimate at N exceeds the cap)' if plan['reduced'] else ''} ...", flush=True)
        naive = run_worker("naive", {**base, "N": plan["seqs"], "stats_path": str(tmp / "stats_naive.pt")},
                           tmp)
        if "error" not in naive and plan["seqs"] == args.seqs:
            a = torch.load(tmp / "stats_time.pt")
            b = torch.load(tmp / "stats_naive.pt")
            if "hf" in a:
                naive["agreement_hf_vs_naive_all_depths"] = compare(a["hf"], b, list(range(info["depths"])))
    return {"timing": timing, "memory": mem, "naive_plan": plan, "naive": naive,
            "summary": summarize_stats(timing, mem, naive, args)}


def summarize_stats(timing: dict[str, Any], mem: dict[str, Any], naive: dict[str, Any] | None,
                    args: argparse.Namespace) -> dict[str, Any]:
    fwd, red = timing["forward_s"], timing["reduce_s"]
    tot = {m: [f + r for f, r in zip(fwd[m], red[m], strict=True)] for m in fwd}
    rows = {}
    for m in tot:
        row: dict[str, Any] = {
            "total_s": sum(tot[m]),
            "forward_s": sum(fwd[m]),
            "reduce_s": sum(red[m]),
            "median_batch_s": statistics.median(tot[m]),
        }
        if "hf" in tot:
            row["ratio_to_hf_paired_median"] = statistics.median(a / b for a, b in zip(tot[m], tot["hf"],
                                                                                         strict=True))
            row["ratio_to_hf_totals"] = sum(tot[m]) / sum(tot["hf"])
            row["forward_ratio_to_hf_totals"] = sum(fwd[m]) / sum(fwd["hf"])
        if m in mem and "error" not in mem[m]:
            row["peak_growth_mib"] = mem[m]["peak_growth_mib"]
            row["peak_growth_mib_first_batch"] = mem[m]["peak_growth_mib_after_batch"][0]
        rows[m] = row
    for r in rows.values():
        if "hf" in rows and r.get("peak_growth_mib") is not None and rows["hf"].get("peak_growth_mib"):
            r["peak_ratio_to_hf"] = r["peak_growth_mib"] / rows["hf"]["peak_growth_mib"]
    out: dict[str, Any] = {"methods": rows}
    if naive and "error" not in naive and naive.get("peak_growth_mib") and rows.get("ours", {}).get(
        "peak_growth_mib"
    ):
        out["ours_peak_over_naive_peak"] = rows["ours"]["peak_growth_mib"] / naive["peak_growth_mib"]
        out["naive_seqs"] = naive["seqs"]
        out["naive_peak_mib_per_seq"] = naive["peak_growth_mib_per_seq"]
        out["naive_peak_gib_extrapolated_to_N"] = naive["peak_growth_mib_per_seq"] * args.seqs / 1024
    if "ours" in rows and "hf" in rows:
        r = rows["ours"]
        out["goal_no_slower"] = r["ratio_to_hf_paired_median"] <= 1.0
        if r.get("peak_ratio_to_hf") is not None:
            out["goal_lower_peak_memory_than_hf"] = r["peak_ratio_to_hf"] < 1.0
    return out


# ----------------------------------------------------------------------------------------------- part 2
def lens_prompts(ad: Any, n_tokens: int, n_prompts: int) -> list[list[int]]:
    """Two short sentences, then English prose paragraphs cut to ``n_tokens`` tokens (``adapter.encode``)."""
    from tokensmith.pruning.haystack import english_paragraphs

    texts = list(SHORT_PROMPTS)
    paras = english_paragraphs()
    step = max(1, len(paras) // max(1, n_prompts))
    texts += [paras[i * step] for i in range(max(0, n_prompts - len(texts)))]
    return [ad.encode(t).input_ids.tolist()[:n_tokens] for t in texts[:n_prompts]]


def checkpoint_dirs(ad: Any, tmp: Path) -> tuple[Path, Path]:
    """A checkpoint directory TransformerLens can boot (the one the adapter was loaded from when it holds
    ``config.json``, else ``save_pretrained``) and a tokenizer directory."""
    src = Path(str(getattr(ad.model, "name_or_path", "") or ""))
    if (src / "config.json").is_file() and any(src.glob("*.safetensors")):
        model_dir = src
    else:
        model_dir = tmp / "model"
        ad.model.save_pretrained(model_dir)
    tok_dir = tmp / "tokenizer"
    ad.tokenizer.save_pretrained(tok_dir)
    return model_dir, tok_dir


def ours_lens(ad: Any, ids: list[int]) -> dict[str, Any]:
    """Our logit lens of one prompt as arrays ``[depths, T]``: next-token log-prob (``T-1``) and top-1 id."""
    from tokensmith.analysis.lens import logit_lens

    f = logit_lens(ad, ids)
    f = f.sort_values(["layer", "position"])
    D, T = int(f.layer.nunique()), len(ids)
    lp = torch.tensor(f["token_logprob"].to_numpy(dtype=float)).view(D, T)[:, : T - 1]
    top = torch.tensor(f["top_id"].to_numpy(dtype="int64")).view(D, T)
    top_lp = torch.tensor(f["top_prob"].to_numpy(dtype=float)).view(D, T).log()
    return {"next_logprob": lp, "top_id": top, "top_logprob": top_lp}


def run_lens(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    from tokensmith.report import load_model

    torch.set_num_threads(args.threads)
    ad = load_model(args.model)
    prompts = lens_prompts(ad, args.lens_tokens, args.lens_prompts)
    res: dict[str, Any] = {"prompts_tokens": [len(p) for p in prompts], "prompts_ids": prompts,
                           "repeats": args.lens_repeats}
    # ours: warm-up, then the median of repeats per prompt
    ours_lens(ad, prompts[0])
    ours, ours_t = [], []
    for ids in prompts:
        ts_ = []
        for _ in range(args.lens_repeats):
            t = time.perf_counter()
            o = ours_lens(ad, ids)
            ts_.append(time.perf_counter() - t)
        ours.append(o)
        ours_t.append(statistics.median(ts_))
    res["ours_seconds_per_prompt"] = ours_t
    tl_py = args.tl_python
    if not tl_py or not Path(tl_py).exists():
        res["transformer_lens"] = {"error": f"no TransformerLens venv at {tl_py!r}: not compared"}
        return res
    model_dir, tok_dir = checkpoint_dirs(ad, tmp)
    job = {"model_dir": str(model_dir), "tokenizer_dir": str(tok_dir), "prompts": prompts,
           "threads": args.threads, "repeats": args.lens_repeats}
    jp, rp = tmp / "tl_job.json", tmp / "tl_result.json"
    jp.write_text(json.dumps(job), encoding="utf-8")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", TQDM_DISABLE="1",
               PYTHONPATH="")
    print(f"[lens] TransformerLens ({tl_py}) on {len(prompts)} prompts ...", flush=True)
    t = time.perf_counter()
    p = subprocess.run([tl_py, str(Path(__file__).with_name("tl_lens_runner.py")), str(jp), str(rp)],
                       env=env, capture_output=True, text=True)
    if p.returncode != 0 or not rp.exists():
        res["transformer_lens"] = {"error": f"rc {p.returncode}: {(p.stderr or p.stdout)[-3000:]}"}
        return res
    tl = json.loads(rp.read_text(encoding="utf-8"))
    tl["wall_s"] = time.perf_counter() - t
    res["transformer_lens"] = {k: v for k, v in tl.items() if k != "prompts"}
    if tl.get("error"):
        return res
    per = []
    for i, (o, r) in enumerate(zip(ours, tl["prompts"], strict=True)):
        lp_tl = torch.tensor(r["next_logprob"], dtype=torch.float64)
        top_tl = torch.tensor(r["top_id"], dtype=torch.long)
        top_lp_tl = torch.tensor(r["top_logprob"], dtype=torch.float64)
        if lp_tl.shape != o["next_logprob"].shape:
            per.append({"prompt": i, "error": f"shapes differ: TL {tuple(lp_tl.shape)} vs ours "
                        f"{tuple(o['next_logprob'].shape)} (labels {r['labels']})"})
            continue
        d_lp = (o["next_logprob"] - lp_tl).abs()
        agree = o["top_id"] == top_tl
        dis = ~agree
        per.append({
            "prompt": i,
            "tokens": len(prompts[i]),
            "tl_labels": r["labels"],
            "max_abs_next_logprob_diff": float(d_lp.max()),
            "max_abs_next_logprob_diff_last_depth": float(d_lp[-1].max()),
            "top1_agreement": float(agree.double().mean()),
            "top1_disagreements": int(dis.sum()),
            "max_top_logprob_gap_at_disagreements": float((o["top_logprob"] - top_lp_tl).abs()[dis].max())
            if bool(dis.any()) else None,
            "ours_s": ours_t[i],
            "tl_s": r["seconds"],
            "tl_forward_and_targets_s": r.get("seconds_forward_and_targets"),
            "ratio_ours_to_tl": ours_t[i] / r["seconds"],
        })
    ok = [x for x in per if "error" not in x]
    res["per_prompt"] = per
    if ok:
        res["summary"] = {
            "max_abs_next_logprob_diff": max(x["max_abs_next_logprob_diff"] for x in ok),
            "top1_agreement": sum(x["top1_agreement"] * (x["tokens"] * len(x["tl_labels"])) for x in ok)
            / sum(x["tokens"] * len(x["tl_labels"]) for x in ok),
            "top1_disagreements": sum(x["top1_disagreements"] for x in ok),
            "median_ratio_ours_to_tl": statistics.median(x["ratio_ours_to_tl"] for x in ok),
            "median_ours_s": statistics.median(x["ours_s"] for x in ok),
            "median_tl_s": statistics.median(x["tl_s"] for x in ok),
            "median_tl_forward_and_targets_s": statistics.median(x["tl_forward_and_targets_s"] or math.nan
                                                                 for x in ok),
        }
    return res


# ----------------------------------------------------------------------------------------------- output
def fmt(x: Any, spec: str = ".3g") -> str:
    if x is None:
        return "–"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        return format(x, spec)
    return str(x)


def to_markdown(res: dict[str, Any]) -> str:
    e, a = res["env"], res["args"]
    lines = [f"# analysis_bench{' (quick)' if a['quick'] else ''}", ""]
    lines += [
        f"Model `{e.get('model')}` ({fmt(e.get('params'), ',')} parameters, {e.get('num_layers')} blocks = "
        f"{e.get('depths')} hidden-state depths, d = {e.get('d_model')}, V = {e.get('vocab_size')}, "
        f"{e.get('dtype')}, {e.get('attn_implementation')}); torch {e['torch']}, transformers "
        f"{e['transformers']}, tokensmith {e['tokensmith']}, {e['torch_threads']} torch thread(s), "
        f"{e['cpu_count']} CPUs, load average at start {fmt(e['load_average_start'][0], '.2f')}; seed "
        f"{a['seed']}.",
        "",
    ]
    st = res.get("stats")
    if st and "error" not in st.get("timing", {}):
        tm, s = st["timing"], st["summary"]
        data = tm["data"]
        lines += [
            "## Per-layer statistics over a corpus",
            "",
            f"N = {a['seqs']} sequences × T = {a['seq_len']} tokens (English prose of `pydoc_data.topics`, "
            f"{data['unique_blocks']} distinct blocks"
            + (f", **repeated cyclically** ({data['repeats_of_corpus']:.2f}× the corpus)" if data["cyclic"]
               else "")
            + f"), B = {a['batch_size']}, {tm['batches']} batches. Statistics per depth: Moments (float64 "
            "mean / covariance), sum of unit vectors (anisotropy), mean norm. Time: one process, every "
            "method on every batch in a rotated order (forward + reducer updates). Peak memory: a fresh "
            f"process per method over {a['mem_seqs']} sequences, VmHWM − VmRSS after warm-up.",
            "",
            "| method | total s | forward s | reducers s | ratio to hf (paired median) | ratio of totals | "
            "forward ratio | peak growth MiB | peak ratio to hf |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for m, r in s["methods"].items():
            lines.append(
                f"| {m} | {fmt(r['total_s'], '.1f')} | {fmt(r['forward_s'], '.1f')} | "
                f"{fmt(r['reduce_s'], '.1f')} "
                f"| {fmt(r.get('ratio_to_hf_paired_median'))} | {fmt(r.get('ratio_to_hf_totals'))} | "
                f"{fmt(r.get('forward_ratio_to_hf_totals'))} | {fmt(r.get('peak_growth_mib'), '.0f')} | "
                f"{fmt(r.get('peak_ratio_to_hf'))} |"
            )
        nv = st.get("naive")
        if nv and "error" not in nv:
            plan = st["naive_plan"]
            lines += [
                f"| naive (hold all, then compute; N = {nv['seqs']}) | {fmt(nv['seconds'], '.1f')} | "
                f"{fmt(nv['seconds_collect'], '.1f')} | {fmt(nv['seconds_stats'], '.1f')} | – | – | – | "
                f"{fmt(nv['peak_growth_mib'], '.0f')} | – |",
                "",
                f"Naive: {fmt(nv['peak_growth_mib_per_seq'], '.2f')} MiB peak growth per sequence "
                f"({fmt(nv['hidden_states_held_mib'], '.0f')} MiB of hidden states held, "
                f"{fmt(nv['hidden_states_held_mib_per_seq'], '.2f')} MiB per sequence; peak after collecting "
                f"{fmt(nv['peak_growth_mib_after_collect'], '.0f')} MiB, then the float64 statistics)"
                + (f"; run on {nv['seqs']} of N = {a['seqs']} sequences because its estimate "
                   f"({plan['estimate_gib_at_N']:.1f} GiB) exceeds the {plan['cap_gib']:.1f} GiB cap; "
                   f"extrapolated to N: {fmt(s.get('naive_peak_gib_extrapolated_to_N'), '.2f')} GiB"
                   if plan["reduced"] else "")
                + f". ours / naive peak: {fmt(s.get('ours_peak_over_naive_peak'))}"
                + (" (naive on fewer sequences: its peak at N is larger)" if plan["reduced"] else "") + ".",
            ]
        lines.append("")
        if "ours" in s["methods"]:
            traj = st["memory"].get("ours", {}).get("peak_growth_mib_after_batch") or []
            lines += [
                f"Goals: ours no slower than hf: **{fmt(s.get('goal_no_slower'))}**; lower peak memory than "
                f"hf: **{fmt(s.get('goal_lower_peak_memory_than_hf'))}**. Streaming peaks are flat in N "
                f"(ours after batch 1 / last: {fmt(traj[0] if traj else None, '.0f')} / "
                f"{fmt(traj[-1] if traj else None, '.0f')}"
                " MiB); the reducers hold "
                f"{fmt(st['memory'].get('ours', {}).get('reducers_mib'), '.0f')} MiB.",
                "",
            ]
        lines += ["Agreement of the statistics (same data, same process; depths below the last: the same "
                  "semantics; the last depth differs by design: HF's last hidden state is after the final "
                  "norm, ours before it):", "",
                  "| pair | depths | max rel Δ mean | max rel Δ cov | max Δ anisotropy | "
                  "max rel Δ mean norm |",
                  "|---|---|---|---|---|---|"]
        for pair, ag in tm["agreement"].items():
            for part, c in ag.items():
                dd = c["depths"]
                lines.append(f"| {pair} | {dd[0]}..{dd[-1]} ({part}) | {fmt(c['max_mean_rel'])} | "
                             f"{fmt(c['max_cov_rel'])} | {fmt(c['max_anisotropy_abs'])} | "
                             f"{fmt(c['max_mean_norm_rel'])} |")
        if nv and nv.get("agreement_hf_vs_naive_all_depths"):
            c = nv["agreement_hf_vs_naive_all_depths"]
            lines.append(f"| hf_vs_naive | 0..{c['depths'][-1]} | {fmt(c['max_mean_rel'])} | "
                         f"{fmt(c['max_cov_rel'])} | {fmt(c['max_anisotropy_abs'])} | "
                         f"{fmt(c['max_mean_norm_rel'])} |")
        lines.append("")
    elif st:
        lines += ["## Per-layer statistics", "", f"FAILED: {st['timing'].get('error')}", ""]
    ln = res.get("lens")
    if ln:
        lines += ["## Logit lens vs TransformerLens", ""]
        tl = ln.get("transformer_lens", {})
        if tl.get("error") and not ln.get("summary"):
            lines += [f"TransformerLens not compared: {tl['error'][:800]}", "",
                      f"ours: median {fmt(statistics.median(ln['ours_seconds_per_prompt']))} s per prompt.",
                      ""]
        else:
            v = tl.get("versions", {})
            s = ln["summary"]
            lines += [
                f"{len(ln['prompts_tokens'])} prompts of {ln['prompts_tokens']} tokens, the same ids on both "
                f"sides; TransformerLens {v.get('transformer_lens')} (transformers {v.get('transformers')}, "
                f"torch {v.get('torch')}, TransformerBridge booted from the same checkpoint, "
                f"{tl.get('attn_implementation')} attention) vs `tokensmith.analysis.lens.logit_lens` "
                f"({res['env'].get('attn_implementation')}). Time: median of {ln['repeats']} repeats per "
                "prompt after a warm-up prompt; each side's own work (ours also builds entropy, KL, top-3, "
                "ranks and a DataFrame; TL: run_with_cache + a targets readout + a top-1 readout).",
                "",
                "max |Δ log p(next token)| over all (depth, position): "
                f"**{fmt(s['max_abs_next_logprob_diff'])}**; "
                f"top-1 agreement **{fmt(s['top1_agreement'], '.4f')}** ({s['top1_disagreements']} "
                f"disagreements); time per prompt: ours {fmt(s['median_ours_s'])} s, TL "
                f"{fmt(s['median_tl_s'])} s (of which its forward + the targets readout alone: "
                f"{fmt(s.get('median_tl_forward_and_targets_s'))} s), "
                f"median ratio ours/TL **{fmt(s['median_ratio_ours_to_tl'])}**.",
                "",
                "| prompt | tokens | max Δ log p | max Δ log p (last depth) | top-1 agreement | gap at "
                "disagreements | ours s | TL s | TL fwd + targets s | ours/TL |",
                "|---|---|---|---|---|---|---|---|---|---|",
            ]
            for x in ln["per_prompt"]:
                if "error" in x:
                    lines.append(f"| {x['prompt']} | error: {x['error']} ||||||||")
                    continue
                lines.append(
                    f"| {x['prompt']} | {x['tokens']} | {fmt(x['max_abs_next_logprob_diff'])} | "
                    f"{fmt(x['max_abs_next_logprob_diff_last_depth'])} | {fmt(x['top1_agreement'], '.4f')} | "
                    f"{fmt(x['max_top_logprob_gap_at_disagreements'])} | {fmt(x['ours_s'])} | "
                    f"{fmt(x['tl_s'])} | "
                    f"{fmt(x.get('tl_forward_and_targets_s'))} | "
                    f"{fmt(x['ratio_ours_to_tl'])} |"
                )
            lines.append("")
    lines.append(f"Wall time of the whole run: {res['wall_s'] / 60:.1f} min; load average at the end "
                 f"{fmt(res['load_average_end'][0], '.2f')}.")
    return "\n".join(lines) + "\n"


def env_info(args: argparse.Namespace, info: dict[str, Any] | None) -> dict[str, Any]:
    import transformers

    import tokensmith

    return {
        "model": args.model,
        **({k: v for k, v in info.items() if k != "name"} if info else {}),
        "torch_threads": args.threads,
        "cpu_count": os.cpu_count(),
        "seed": args.seed,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokensmith": tokensmith.__version__,
        "python": platform.python_version(),
        "platform": f"{platform.system()} {platform.machine()}",
        "load_average_start": list(os.getloadavg()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None,
                    help=f"bundled name, path or tiny:<arch> (default {DEFAULT_MODEL}; quick {QUICK_MODEL})")
    ap.add_argument("--quick", action="store_true", help="small sizes, tiny model (~1-2 min); _quick suffix")
    ap.add_argument("--seqs", type=int, default=None, help="N sequences (default 1000; quick 64)")
    ap.add_argument("--seq-len", type=int, default=64, help="T tokens per sequence (default 64)")
    ap.add_argument("--batch-size", type=int, default=16, help="B (default 16)")
    ap.add_argument("--timing-methods", default="ours,hf,hf_keep1",
                    help="comma list of ours,hf,hf_keep1 for the paired timing (default all; needs hf)")
    ap.add_argument("--mem-methods", default="ours,hf,hf_keep1", help="streaming methods measured for memory")
    ap.add_argument("--mem-seqs", type=int, default=None,
                    help="sequences per streaming memory run (default min(N, 128); the peak is flat in N)")
    ap.add_argument("--naive-seqs", type=int, default=None,
                    help="sequences for the naive method (default N, reduced when over --naive-max-gb)")
    ap.add_argument("--naive-max-gb", type=float, default=6.0, help="memory cap of the naive method (GiB)")
    ap.add_argument("--skip-naive", action="store_true")
    ap.add_argument("--skip-stats", action="store_true", help="run only the logit-lens part (_lens suffix)")
    ap.add_argument("--skip-lens", action="store_true", help="run only the statistics part (_stats suffix)")
    ap.add_argument("--tl-python", default=DEFAULT_TL_PYTHON,
                    help="python of a venv with transformer_lens (default %(default)s; missing: skipped)")
    ap.add_argument("--lens-prompts", type=int, default=5)
    ap.add_argument("--lens-tokens", type=int, default=32)
    ap.add_argument("--lens-repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--seed", type=int, default=0, help="block order (default 0)")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--out-dir", default=str(RESULTS))
    ap.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    ap.add_argument("--job", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        job = json.loads(Path(args.job).read_text(encoding="utf-8"))
        out = WORKERS[args.worker](job)
        Path(args.result).write_text(json.dumps(out), encoding="utf-8")
        return
    q = args.quick
    args.model = args.model or (QUICK_MODEL if q else DEFAULT_MODEL)
    args.seqs = args.seqs or (64 if q else 1000)
    args.mem_seqs = args.mem_seqs or min(args.seqs, 64 if q else 128)
    args.timing_methods = [m for m in args.timing_methods.split(",") if m]
    args.mem_methods = [m for m in args.mem_methods.split(",") if m]
    bad = [m for m in args.timing_methods + args.mem_methods if m not in METHODS]
    if bad or "hf" not in args.timing_methods:
        raise SystemExit(f"methods must be among {METHODS} and --timing-methods must include hf; got {bad}")
    if args.skip_stats and args.skip_lens:
        raise SystemExit("--skip-stats and --skip-lens together leave nothing to run")
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    load0 = list(os.getloadavg())
    hidden = ("worker", "job", "result")
    res: dict[str, Any] = {"args": {k: v for k, v in vars(args).items() if k not in hidden}}
    with tempfile.TemporaryDirectory(prefix="analysis_bench_") as d:
        tmp = Path(d)
        info = None
        if not args.skip_stats:
            res["stats"] = run_stats(args, tmp)
            info = res["stats"]["timing"].get("model_info")
        if not args.skip_lens:
            res["lens"] = run_lens(args, tmp)
    res["env"] = env_info(args, info)
    if info is None:
        from tokensmith.report import load_model

        res["env"].update({k: v for k, v in model_info(load_model(args.model)).items() if k != "name"})
    res["env"]["load_average_start"] = load0
    res["wall_s"] = time.perf_counter() - t0
    res["load_average_end"] = list(os.getloadavg())
    stem = "analysis_bench"
    if args.model != DEFAULT_MODEL and not (q and args.model == QUICK_MODEL):
        stem += "_" + re.sub(r"[^a-z0-9]+", "-", args.model.lower()).strip("-")
    stem += "_quick" if q else ""
    stem += "_lens" if args.skip_stats else ("_stats" if args.skip_lens else "")
    write_results(args.out_dir, stem, res, to_markdown(res))


if __name__ == "__main__":
    main()
