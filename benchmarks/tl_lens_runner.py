"""TransformerLens's side of the logit-lens comparison in ``analysis_bench.py`` (runs in its own venv).

This file imports only torch, transformers and transformer_lens, so it runs in a separate venv where
TransformerLens is installed (it pins its own dependencies); ``analysis_bench.py --tl-python ...`` writes
the job (a checkpoint directory, a tokenizer directory, the prompts as token ids) and calls it.

For each prompt (token ids ``x_0 .. x_{T-1}``, exactly the ids tokensmith's side reads) it runs
TransformerLens 4's own logit lens (``transformer_lens.tools.analysis.logit_lens`` through
``ActivationCache.logit_lens``): the accumulated residual stream (``blocks.ℓ.hook_resid_pre`` for
``ℓ = 0..L-1``, then the last block's ``hook_resid_post``), the final norm with recomputed statistics
(``ln_final``), ``W_U`` (+ ``b_U``), log-softmax over the vocabulary, i.e. per depth ``ℓ`` and position
``t``::

    log p_ℓ,t = log_softmax(W_U · norm_f(h_ℓ,t))

It records, per (depth, position), the log-prob of the actual next token ``x_{t+1}`` (the last position
has none) and the top-1 token id, and the wall time per prompt (one ``run_with_cache`` plus the two
lens readouts, after one untimed warm-up prompt; median over ``repeats``; each readout takes one selector,
so the log-probs of the targets and the top-1 ids are two readouts; the forward + targets readout alone is
recorded too).

Usage::

    /tmp/tl_venv/bin/python benchmarks/tl_lens_runner.py job.json result.json
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from typing import Any

import torch


def _version(name: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:
        return None


def lens_one(bridge: Any, ids: list[int]) -> dict[str, Any]:
    """TransformerLens's logit lens of one prompt: next-token log-probs, top-1 ids per (depth, position)."""
    toks = torch.tensor([ids], dtype=torch.long)
    T = len(ids)
    nxt = torch.tensor([ids[1:] + [ids[-1]]], dtype=torch.long)  # the last position's target is ignored
    t0 = time.perf_counter()
    with torch.no_grad():
        _, cache = bridge.run_with_cache(toks)
        t1 = time.perf_counter()
        tgt = cache.logit_lens(positions=None, targets=nxt, return_type="log_probs")
        t2 = time.perf_counter()
        top = cache.logit_lens(positions=None, top_k=1, return_type="log_probs")
        t3 = time.perf_counter()
    lp = tgt.readout.values[:, 0, :, 0]  # [depths, T]
    top_ids = top.readout.top_ids[:, 0, :, 0]  # [depths, T]
    return {
        "labels": list(tgt.labels),
        "next_logprob": lp[:, : T - 1].tolist(),
        "top_id": top_ids.tolist(),
        "top_logprob": top.readout.values[:, 0, :, 0].tolist(),
        "stage_s": {"run_with_cache": t1 - t0, "targets_readout": t2 - t1, "top1_readout": t3 - t2},
    }


def main(job_path: str, result_path: str) -> None:
    with open(job_path, encoding="utf-8") as f:
        job = json.load(f)
    torch.set_num_threads(int(job["threads"]))
    import transformer_lens
    import transformers
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoTokenizer

    out: dict[str, Any] = {
        "versions": {
            "transformer_lens": getattr(transformer_lens, "__version__", None)
            or _version("transformer_lens"),
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "python": sys.version.split()[0],
        },
        "threads": torch.get_num_threads(),
    }
    try:
        tok = AutoTokenizer.from_pretrained(job["tokenizer_dir"])
        t = time.perf_counter()
        bridge = TransformerBridge.boot_transformers(
            job["model_dir"], tokenizer=tok, device="cpu", dtype=torch.float32
        )
        bridge.eval()
        out["load_s"] = time.perf_counter() - t
        out["attn_implementation"] = getattr(bridge.original_model.config, "_attn_implementation", None)
    except Exception as e:  # reported, not fatal: the bench writes what failed
        out["error"] = f"load: {type(e).__name__}: {e}"
        with open(result_path, "w", encoding="utf-8") as f:
            json.dump(out, f)
        return
    prompts = job["prompts"]
    rows = []
    try:
        lens_one(bridge, prompts[0])  # warm-up (first-call costs out of the timings)
        for ids in prompts:
            times, s_ft = [], []
            res = None
            for _ in range(int(job["repeats"])):
                t = time.perf_counter()
                res = lens_one(bridge, ids)
                times.append(time.perf_counter() - t)
                s_ft.append(res["stage_s"]["run_with_cache"] + res["stage_s"]["targets_readout"])
            rows.append({**res, "seconds": statistics.median(times), "seconds_all": times,
                         "seconds_forward_and_targets": statistics.median(s_ft)})
    except Exception as e:
        out["error"] = f"lens: {type(e).__name__}: {e}"
    out["prompts"] = rows
    out["load_average_end"] = list(os.getloadavg())
    with open(result_path, "w", encoding="utf-8") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
