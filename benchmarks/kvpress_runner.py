"""The KV-compression protocol shared by ``pruning_bench.py`` (tokensmith) and kvpress, and kvpress's side of it.

This file imports only torch and transformers at module level, so it runs in kvpress's own venv (kvpress pins
its own transformers) and ``pruning_bench.py`` imports the same protocol functions for tokensmith: both sides
decode, score and time through *this* code; only the compressing prefill differs.

Protocol for one sample (``run_sample``), given ``prefill(ids) -> (cache, last_logits)``, the only part
that differs between the two libraries:

1. **prefill** the context (haystack with needles) with compression on: the method scores and evicts each
   layer's keys/values right after that layer's attention has run (later layers of the same forward are
   unaffected; kvpress's protocol). Timed; peak RSS during it and RSS retained after it are measured.
2. **continuation NLL**: on a copy of the pruned cache, feed the 63 real tokens that follow the context
   (teacher forcing, positions continuing from the context length, no attention mask): with the prefill's
   last logits this scores the 64 continuation tokens (the first one cannot depend on pruning).
3. **needles**: on a fresh copy of the pruned cache with one row per question (questions of equal token
   length form one batch), feed the question tokens, then decode ``answer_tokens`` greedily (each step one
   token per row through the cache; the steps after the first are timed: decode time per step). The question
   is *not* seen by the compression (kvpress's pipeline protocol: compress the context, then ask).

A forward of several new tokens is one call (``position_ids`` from the context length, ``attention_mask``
None: transformers' causal mask then covers the pruned cache plus the new tokens) when every layer holds
the same number of slots; when layers differ (PyramidKV's per-layer budgets) transformers builds one mask
from layer 0's length, so that forward runs with each layer's own causal mask (``bottom_right_causal``;
checked against the plain forward on the unpruned cache by ``self_check``).

Usage (kvpress side; ``pruning_bench.py --kvpress-python ...`` writes the job and calls this)::

    /path/to/kvpress-venv/bin/python benchmarks/kvpress_runner.py job.json result.json
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import gc
import inspect
import json
import os
import sys
import time
from typing import Any

import torch

# ------------------------------------------------------------------------------------------ process memory


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _settle_and_reset_peak() -> bool:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


# ------------------------------------------------------------------------------------------ shared protocol


def cache_key(model: Any) -> str:
    """The forward's cache keyword: ``cache`` (newer transformers) or ``past_key_values``."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def out_cache(out: Any) -> Any:
    c = getattr(out, "cache", None)
    return c if c is not None else out.past_key_values


def layer_lengths(cache: Any) -> list[int]:
    """Slots each layer of a transformers ``DynamicCache`` holds."""
    if hasattr(cache, "layers"):
        return [int(layer.keys.shape[-2]) for layer in cache.layers]
    return [int(k.shape[-2]) for k in cache.key_cache]


def cache_bytes(cache: Any) -> int:
    """Bytes of the cache's key and value tensors (``numel * element_size``)."""
    if hasattr(cache, "layers"):
        kv = [(layer.keys, layer.values) for layer in cache.layers]
    else:
        kv = list(zip(cache.key_cache, cache.value_cache, strict=True))
    return int(sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in kv))


def batched_copy(cache: Any, n: int) -> Any:
    """A deep copy of a batch-1 cache with its rows repeated ``n`` times (same slots in every row)."""
    c = copy.deepcopy(cache)
    if n == 1:
        return c
    if hasattr(c, "layers"):
        for layer in c.layers:
            layer.keys = layer.keys.repeat(n, 1, 1, 1)
            layer.values = layer.values.repeat(n, 1, 1, 1)
    else:
        c.key_cache = [k.repeat(n, 1, 1, 1) for k in c.key_cache]
        c.value_cache = [v.repeat(n, 1, 1, 1) for v in c.value_cache]
    return c


@contextlib.contextmanager
def bottom_right_causal(model: Any):
    """Inside: the model's SDPA attention ignores the mask transformers built and uses, in every layer, the
    causal mask aligned to that layer's own key length (``key j`` visible to new token ``i`` iff
    ``j <= S_layer - Q + i``): exact for new tokens appended to a cache whose layers hold different numbers
    of slots (transformers builds one mask from layer 0's length). Only for ``attn_implementation="sdpa"``."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS as fns

    if model.config._attn_implementation != "sdpa":
        raise NotImplementedError("bottom_right_causal needs attn_implementation='sdpa'")
    had = "sdpa" in fns._local_mapping
    prev = fns._local_mapping.get("sdpa")
    orig = fns["sdpa"]

    def attn(module, query, key, value, attention_mask, **kw):
        Q, S = query.shape[-2], key.shape[-2]
        m = torch.ones(Q, S, dtype=torch.bool, device=query.device).tril(S - Q)[None, None]
        kw.pop("is_causal", None)
        return orig(module, query, key, value, m, **kw)

    fns["sdpa"] = attn
    try:
        yield
    finally:
        if had:
            fns["sdpa"] = prev
        else:
            del fns["sdpa"]


@torch.no_grad()
def feed(
    model: Any, cache: Any, ids: list[list[int]], start: int, force_per_layer: bool = False
) -> torch.Tensor:
    """Append the rows ``ids`` (``[B][L]``, equal lengths) at positions ``start, start+1, ...`` to ``cache`` (in
    place, batch ``B``) in one forward; returns ``[B, L, V]`` logits. When the layers hold different numbers
    of slots (PyramidKV) the forward runs inside :func:`bottom_right_causal` (each layer its own causal
    offset); ``force_per_layer`` uses that path also for uniform caches (the self-check)."""
    key = cache_key(model)
    x = torch.tensor(ids, dtype=torch.long)
    B, n = x.shape
    pid = torch.arange(start, start + n).expand(B, n)
    kw = {"input_ids": x, "position_ids": pid, "use_cache": True, key: cache}
    if len(set(layer_lengths(cache))) == 1 and not force_per_layer:
        return model(**kw).logits.float()
    with bottom_right_causal(model):
        return model(**kw).logits.float()


def stepwise_check(model: Any, cache: Any, new: list[int], start: int) -> float:
    """Max |Δlogit| between :func:`feed` (one forward) and feeding ``new`` one token at a time (copies of
    ``cache``; for a cache whose layers hold different numbers of slots)."""
    key = cache_key(model)
    a = feed(model, copy.deepcopy(cache), [new], start)[0]
    c = copy.deepcopy(cache)
    rows = []
    with torch.no_grad():
        for j, t in enumerate(new):
            out = model(
                input_ids=torch.tensor([[t]]),
                position_ids=torch.tensor([[start + j]]),
                use_cache=True,
                **{key: c},
            )
            rows.append(out.logits[0, -1].float())
    return float((a - torch.stack(rows)).abs().max())


def self_check(model: Any, ctx: list[int], new: list[int]) -> float:
    """Max |Δlogit| between the plain and the per-layer-causal feed of ``new`` after ``ctx`` (unpruned)."""
    key = cache_key(model)
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ctx]), use_cache=True, logits_to_keep=1, **{key: None})
    c = out_cache(out)
    a = feed(model, copy.deepcopy(c), [new], len(ctx))
    b = feed(model, copy.deepcopy(c), [new], len(ctx), force_per_layer=True)
    return float((a - b).abs().max())


@torch.no_grad()
def greedy(
    model: Any, cache: Any, first: torch.Tensor, start: int, n: int
) -> tuple[list[list[int]], list[float]]:
    """Greedy decode ``n`` tokens per row from next-token logits ``first`` ``[B, V]`` (``start`` is the next
    position); returns the tokens per row and the wall time of each cached decode step (``n - 1`` steps, all
    rows at once)."""
    key = cache_key(model)
    toks, times = [first.argmax(-1)], []
    B = first.shape[0]
    for j in range(n - 1):
        t = time.perf_counter()
        out = model(
            input_ids=toks[-1][:, None],
            position_ids=torch.full((B, 1), start + j, dtype=torch.long),
            use_cache=True,
            logits_to_keep=1,
            **{key: cache},
        )
        nxt = out.logits[:, -1].argmax(-1)
        times.append(time.perf_counter() - t)
        toks.append(nxt)
    return torch.stack(toks, 1).tolist(), times


def nll(logits: torch.Tensor, targets: list[int]) -> list[float]:
    lp = torch.log_softmax(logits.float(), -1)
    return [-float(lp[i, t]) for i, t in enumerate(targets)]


def run_sample(model: Any, prefill: Any, sample: dict[str, Any], answer_tokens: int) -> dict[str, Any]:
    """The protocol of the module docstring for one sample; ``prefill(ctx_ids) -> (cache, last_logits [V],
    extra dict)``."""
    ctx = sample["ctx_ids"]
    T = len(ctx)
    hwm_ok = _settle_and_reset_peak()
    rss0 = _status_kib("VmRSS")
    t = time.perf_counter()
    cache, last, extra = prefill(ctx)
    prefill_s = time.perf_counter() - t
    hwm = _status_kib("VmHWM")
    gc.collect()
    rss1 = _status_kib("VmRSS")
    mem = {
        "prefill_peak_mib": (hwm - rss0) / 1024 if hwm_ok and hwm and rss0 else None,
        "retained_mib": (rss1 - rss0) / 1024 if rss1 and rss0 else None,
    }
    lengths = layer_lengths(cache)
    kv = cache_bytes(cache)
    cont = sample["cont_ids"]
    c = copy.deepcopy(cache)
    z = feed(model, c, [cont[:-1]], T)[0]
    cont_nll = nll(last[None], cont[:1]) + nll(z, cont[1:])
    del c, z
    qs = sample["questions"]
    answers: list[Any] = [None] * len(qs)
    dec_times: list[float] = []
    groups: dict[int, list[int]] = {}
    for i, q in enumerate(qs):  # questions of equal length go through the cache as one batch
        groups.setdefault(len(q["q_ids"]), []).append(i)
    for L, idx in groups.items():
        c = batched_copy(cache, len(idx))
        zq = feed(model, c, [qs[i]["q_ids"] for i in idx], T)
        toks, times = greedy(model, c, zq[:, -1], T + L, answer_tokens)
        for i, t in zip(idx, toks, strict=True):
            answers[i] = t
        dec_times += times
        del c
    return {
        "prefill_s": prefill_s,
        "decode_s_per_token": sorted(dec_times)[len(dec_times) // 2] if dec_times else None,
        "kv_bytes": kv,
        "kept_slots_per_layer": lengths,
        "cont_nll": cont_nll,
        "answers": answers,
        **mem,
        **extra,
    }


def run_qa(model: Any, prefill: Any, sample: dict[str, Any], answer_tokens: int) -> dict[str, Any]:
    """Question inside the compressed prompt: prefill ``context + question`` (all the sample's questions as
    one batch of equal-length rows) with compression, then decode greedily through the pruned cache."""
    rows = [sample["ctx_ids"] + q["q_ids"] for q in sample["questions"]]
    t = time.perf_counter()
    cache, last, _ = prefill(rows)
    toks, _ = greedy(model, cache, last, len(rows[0]), answer_tokens)
    return {"answers": toks, "generate_s": time.perf_counter() - t}


# ------------------------------------------------------------------------------------------ kvpress side

PRESSES = {
    "snapkv": "SnapKVPress",
    "pyramidkv": "PyramidKVPress",
    "streaming_llm": "StreamingLLMPress",
    "h2o": "ObservedAttentionPress",
    "key_norm": "KnormPress",
    "random": "RandomPress",
}


def _press(name: str, ratio: float, seed: int) -> Any:
    import kvpress

    cls = getattr(kvpress, PRESSES[name])
    kw: dict[str, Any] = {"compression_ratio": ratio}
    if name == "random":
        kw["seed"] = seed
    try:
        return cls(**kw)
    except TypeError:
        kw.pop("seed", None)
        return cls(**kw)


def main(job_path: str, result_path: str) -> None:
    job = json.loads(open(job_path, encoding="utf-8").read())
    torch.set_num_threads(int(job["threads"]))
    import kvpress
    import transformers
    from transformers import AutoModelForCausalLM, DynamicCache

    models: dict[str, Any] = {}

    def model_for(impl: str) -> Any:
        if impl not in models:
            m = AutoModelForCausalLM.from_pretrained(
                job["model_dir"], dtype=torch.float32, attn_implementation=impl
            ).eval()
            with torch.no_grad():  # page the (memory-mapped) weights in before any RSS measurement
                m(input_ids=torch.tensor([job["samples"][0]["ctx_ids"][:64]]), use_cache=False)
            models[impl] = m
        return models[impl]

    def make_prefill(model: Any, press: Any):
        key = cache_key(model)

        @torch.no_grad()
        def prefill(ids: list[int] | list[list[int]]):
            batched = bool(ids) and isinstance(ids[0], list)
            x = torch.tensor(ids if batched else [ids], dtype=torch.long)
            kw = {key: DynamicCache(), "use_cache": True, "logits_to_keep": 1}
            if press is None:
                out = model(input_ids=x, **kw)
            else:
                with press(model):
                    out = model(input_ids=x, **kw)
            z = out.logits[:, -1].float()
            return out_cache(out), (z if batched else z[0]), {}

        return prefill

    rows = []
    base = model_for("sdpa")
    s0 = job["samples"][0]
    # warm-up (first-call costs out of the timings): the unpruned protocol once at full size; the
    # per-layer-causal feed's self-check
    run_sample(base, make_prefill(base, None), s0, int(job["answer_tokens"]))
    check = self_check(base, s0["ctx_ids"][:128], s0["cont_ids"][:16])
    for name, ratio in [(None, 0.0)] + [tuple(x) for x in job["configs"]]:
        model = model_for("eager" if name == "h2o" else "sdpa")
        press = None if name is None else _press(name, float(ratio), int(job["seed"]))
        res = []
        err = None
        for s in job["samples"]:
            try:
                res.append(run_sample(model, make_prefill(model, press), s, int(job["answer_tokens"])))
            except Exception as e:  # a press that fails on this model: recorded, not fatal
                err = f"{type(e).__name__}: {e}"
                break
        rows.append(
            {
                "preset": name or "none",
                "ratio": float(ratio),
                "press": repr(press),
                "samples": res,
                "error": err,
            }
        )
        print(f"kvpress {name or 'none'} {ratio}: {'error ' + err if err else 'ok'}", flush=True)
    qa_rows = []
    for name, ratio in [tuple(x) for x in job.get("qa_configs", [])]:  # names of kvpress_runner.PRESSES
        model = model_for("eager" if name == "h2o" else "sdpa")
        press = _press(name, float(ratio), int(job["seed"]))
        try:
            res = [
                run_qa(model, make_prefill(model, press), s, int(job["answer_tokens"]))
                for s in job["samples"]
            ]
            qa_rows.append({"preset": name, "ratio": float(ratio), "samples": res, "error": None})
        except Exception as e:
            qa_rows.append(
                {"preset": name, "ratio": float(ratio), "samples": [], "error": f"{type(e).__name__}: {e}"}
            )
        print(f"kvpress question-aware {name} {ratio}: {qa_rows[-1]['error'] or 'ok'}", flush=True)
    out = {
        "versions": {
            "kvpress": getattr(kvpress, "__version__", None) or _dist_version("kvpress"),
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "python": sys.version.split()[0],
        },
        "threads": torch.get_num_threads(),
        "load_average_start": job.get("load_average_start"),
        "load_average_end": list(os.getloadavg()),
        "rows": rows,
        "question_aware": qa_rows,
        "feed_self_check_max_abs_logit_diff": check,
    }
    with open(result_path, "w", encoding="utf-8") as f:
        json.dump(out, f)


def _dist_version(name: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:
        return None


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
