"""``tokensmith run <job> --data rows.jsonl --out DIR ...`` (registered on import).

The same command runs on one process or, unchanged, under accelerate::

    tokensmith run attribute --data rows.jsonl --out out/ --model tiny:llama --set method=saliency
    accelerate launch --multi_gpu --num_processes 2 -m tokensmith.cli run attribute --data rows.jsonl --out out/ \\
        --model tiny:llama --set method=saliency
    accelerate launch --num_processes 8 -m tokensmith.cli run gcg --data advbench.csv --out gcg/ \\
        --model my-7b --set 'kwargs={"steps": 250}'

``--set key=value`` sets a job option; the value is parsed as JSON when it is valid JSON (numbers, lists,
``{...}``, ``true``, ``null``), else taken as a string. ``--job-module pkg.mod`` imports a module that registers
your own jobs (``tokensmith.run.register_job``).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys

from tokensmith.cli import register_subcommand

__all__ = ["add_arguments", "parse_sets", "run_command"]


def parse_sets(items: list[str]) -> dict:
    """``["a=1", "b=x", 'c=["u"]']`` -> ``{"a": 1, "b": "x", "c": ["u"]}`` (JSON where it parses)."""
    out: dict = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--set takes key=value, got {item!r}")
        k, v = item.split("=", 1)
        try:
            out[k.strip()] = json.loads(v)
        except json.JSONDecodeError:
            out[k.strip()] = v
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("job", help="a registered job: attribute, gcg, tokenizer_report, features, logprobs, or your own")
    p.add_argument("--data", required=True, help=".jsonl / .json / .csv / .parquet file or a save_to_disk directory")
    p.add_argument("--out", required=True, help="output directory (shards, manifest, merged results.jsonl)")
    p.add_argument("--model", default=None, help="model of model jobs: bundled name, path, hub id or tiny:<arch>")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE", help="a job option")
    p.add_argument("--id-column", default=None, help="a column of unique ids (default: the row index)")
    p.add_argument("--on-error", choices=("raise", "record"), default="raise")
    p.add_argument("--retry-errors", action="store_true", help="recompute examples stored as errors")
    p.add_argument("--overwrite", action="store_true", help="discard an output of another job/config/dataset")
    p.add_argument("--job-module", action="append", default=[], help="import this module first (custom jobs)")
    p.add_argument("--no-progress", action="store_true")


def run_command(args: argparse.Namespace) -> int:
    from tokensmith.run import run

    try:
        for mod in args.job_module:
            importlib.import_module(mod)
        cfg = parse_sets(args.sets)
        if args.model is not None:
            cfg["model"] = args.model
        res = run(args.job, args.data, args.out, config=cfg, id_column=args.id_column, on_error=args.on_error,
                  retry_errors=args.retry_errors, overwrite=args.overwrite, progress=not args.no_progress)
    except (ValueError, TypeError) as e:
        print(f"tokensmith run: {e}", file=sys.stderr)
        return 2
    from tokensmith.run.runner import default_state

    if default_state().is_main_process:
        print(f"tokensmith run {args.job}: {len(res)} examples, computed {res.computed}, "
              f"read back {len(res) - res.computed}, errors {len(res.errors)}; results in {res.out}")
    return 0


register_subcommand("run", "a per-example job over a dataset: sharded across processes, resumable, merged in order",
                    add_arguments, run_command)
