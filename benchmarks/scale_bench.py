"""Scale-out benchmark: attribution over a dataset with 1 vs 2 processes through ``tokensmith.run`` (not a test).

Job: :class:`tokensmith.run.AttributeJob` (``integrated_gradients`` by default, ``--n-steps`` steps, one
attribution per row) over ``--rows`` prompt/target pairs built from English prose (the paragraphs of the
stdlib's ``pydoc_data.topics``: the first ``--prompt-words`` words are the prompt, the next
``--target-words`` the target), on SmolLM2-135M (``--model``; ``tiny:llama`` with ``--quick``).

Protocol: the same CLI command, ``tokensmith run attribute --data rows.jsonl --out DIR --model M ...``, run
(a) as one process and (b) under ``accelerate launch --multi_gpu --num_processes 2`` (on CPU: torchrun + the
gloo backend, see ``tokensmith.run.default_state``), each with ``OMP_NUM_THREADS=1`` and torch 1 thread per
process, into a fresh output directory, ``--repeats`` times alternating the order (1, 2, 2, 1, ...). Wall
time is the whole command (process start, model load and all rows), so the ratio includes the launch overhead
a user pays; the time in the rows alone is also reported (the records' ``seconds``, summed per process, the
slowest process). Outputs
must be identical: the merged ``results.jsonl`` of every run is compared record by record with the first
one-process run.

Goal (issue 12): ``throughput(2 processes) / throughput(1 process) >= 1.7`` on 2 cores with 1 thread each.

Usage::

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/scale_bench.py --quick      # tiny llama, ~1 min
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/scale_bench.py              # SmolLM2-135M, 32 rows (~5 min)

Writes ``benchmarks/results/scale_bench{_quick}.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
BIN = Path(sys.executable).parent


def rows(n: int, prompt_words: int, target_words: int) -> list[dict]:
    from tokensmith.pruning.haystack import english_paragraphs

    out = []
    for p in english_paragraphs():
        w = p.split()
        if len(w) >= prompt_words + target_words:
            cut = prompt_words + target_words
            out.append({"prompt": " ".join(w[:prompt_words]), "target": " " + " ".join(w[prompt_words:cut])})
        if len(out) == n:
            break
    return out


def port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(n_proc: int, data: Path, out: Path, args: argparse.Namespace) -> list[str]:
    run_args = ["run", "attribute", "--data", str(data), "--out", str(out), "--model", args.model, "--no-progress",
                "--set", f"method={args.method}", "--set", f"kwargs={json.dumps({'n_steps': args.n_steps})}"]
    if n_proc == 1:
        return [sys.executable, "-m", "tokensmith.cli", *run_args]
    return [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", str(n_proc), "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port()),
            "-m", "tokensmith.cli", *run_args]


def merged(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny llama, 16 rows; _quick suffix")
    ap.add_argument("--model", default=None, help="default smollm2-135m-instruct (quick: tiny:llama)")
    ap.add_argument("--rows", type=int, default=None, help="rows (default 32; quick 16)")
    ap.add_argument("--method", default="integrated_gradients")
    ap.add_argument("--n-steps", type=int, default=None, help="IG steps (default 16; quick 32)")
    ap.add_argument("--prompt-words", type=int, default=24)
    ap.add_argument("--target-words", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2, help="runs per process count (alternating order)")
    ap.add_argument("--out-dir", default=str(RESULTS))
    args = ap.parse_args()
    args.model = args.model or ("tiny:llama" if args.quick else "smollm2-135m-instruct")
    args.rows = args.rows or (16 if args.quick else 32)
    args.n_steps = args.n_steps or (32 if args.quick else 16)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false", MKL_NUM_THREADS="1")
    t_start = time.time()
    load0 = os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="scale_bench_"))
    data = work / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows(args.rows, args.prompt_words, args.target_words)))
    order = [1, 2, 2, 1] * ((args.repeats + 1) // 2)
    order = order[: 2 * args.repeats]
    runs: list[dict] = []
    ref = None
    for k, n_proc in enumerate(order):
        out = work / f"out_{k}_{n_proc}"
        t0 = time.perf_counter()
        proc = subprocess.run(command(n_proc, data, out, args), env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"run {k} ({n_proc} processes) failed:\n{proc.stderr[-4000:]}")
        recs = merged(out)
        if ref is None and n_proc == 1:
            ref = recs
        same = ref is not None and [r["result"] for r in recs] == [r["result"] for r in ref]
        shard_sizes = sorted(len(p.read_text().splitlines()) for p in out.glob("shard-*.jsonl"))
        busy = {}
        for r in recs:
            busy[r["rank"]] = busy.get(r["rank"], 0.0) + r["seconds"]
        compute = max(busy.values())  # the slowest process' time in its rows (start-up and load excluded)
        runs.append({"processes": n_proc, "wall_s": wall, "compute_s": compute, "identical_to_first_1proc": same,
                     "shard_rows": shard_sizes, "order": k})
        print(f"run {k}: {n_proc} process(es) {wall:.1f} s (rows {compute:.1f} s), shards {shard_sizes}, "
              f"identical {same}", flush=True)
    # the first 2-process run may precede the reference: check it again
    for r, n_proc in zip(runs, order, strict=True):
        if n_proc == 2 and not r["identical_to_first_1proc"]:
            r["identical_to_first_1proc"] = [x["result"] for x in merged(work / f"out_{r['order']}_2")] == [
                x["result"] for x in ref]
    w1 = statistics.median(r["wall_s"] for r in runs if r["processes"] == 1)
    w2 = statistics.median(r["wall_s"] for r in runs if r["processes"] == 2)
    speedup = w1 / w2
    c1 = statistics.median(r["compute_s"] for r in runs if r["processes"] == 1)
    c2 = statistics.median(r["compute_s"] for r in runs if r["processes"] == 2)
    identical = all(r["identical_to_first_1proc"] for r in runs)
    import torch
    import transformers

    import tokensmith

    meta = {
        "model": args.model, "rows": args.rows, "method": args.method, "n_steps": args.n_steps,
        "prompt_words": args.prompt_words, "target_words": args.target_words, "repeats": args.repeats,
        "threads_per_process": 1, "cpus": os.cpu_count(), "torch": torch.__version__,
        "transformers": transformers.__version__, "tokensmith": tokensmith.__version__,
        "python": platform.python_version(), "load_at_start": load0, "load_at_end": os.getloadavg()[0],
        "date": time.strftime("%Y-%m-%d"), "wall_total_s": time.time() - t_start,
    }
    result = {"meta": meta, "runs": runs, "median_wall_1proc_s": w1, "median_wall_2proc_s": w2,
              "median_rows_1proc_s": c1, "median_rows_2proc_s": c2, "rows_speedup": c1 / c2,
              "speedup": speedup, "goal": 1.7, "goal_met": speedup >= 1.7, "identical": identical}
    suffix = "_quick" if args.quick else ""
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"scale_bench{suffix}.json").write_text(json.dumps(result, indent=2))
    lines = [
        f"# scale_bench{suffix}",
        "",
        f"`tokensmith run attribute` ({args.method}, {args.n_steps} steps) over {args.rows} prompt/target rows of "
        f"English prose ({args.prompt_words} + {args.target_words} words), model `{args.model}`; 1 process vs "
        f"`accelerate launch --multi_gpu --num_processes 2` (CPU: torchrun + gloo), 1 torch thread per process, "
        f"{meta['cpus']} CPUs; torch {meta['torch']}, transformers {meta['transformers']}; load average "
        f"{load0:.2f} at start, {meta['load_at_end']:.2f} at the end; {meta['date']}. Wall time = the whole "
        "command (start-up, model load, every row, merge).",
        "",
        "| run | processes | wall s | rows s (slowest process) | rows per shard | identical to the 1-process output |",
        "| --- | ---: | ---: | ---: | --- | --- |",
    ]
    lines += [f"| {r['order']} | {r['processes']} | {r['wall_s']:.1f} | {r['compute_s']:.1f} | {r['shard_rows']} | "
              f"{'yes' if r['identical_to_first_1proc'] else 'NO'} |" for r in runs]
    lines += [
        "",
        f"Median wall time: 1 process {w1:.1f} s, 2 processes {w2:.1f} s: **speedup {speedup:.2f}×** "
        f"(goal ≥ 1.7×: **{'yes' if speedup >= 1.7 else 'no'}**); outputs identical: **{'yes' if identical else 'no'}**.",
        f"Time in the rows alone (start-up and model load excluded; the slowest process): {c1:.1f} s vs {c2:.1f} s, "
        f"**{c1 / c2:.2f}×**.",
    ]
    (out_dir / f"scale_bench{suffix}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
