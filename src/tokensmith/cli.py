"""The ``tokensmith`` command.

Subcommands:

``tokensmith demo [--out tokensmith-demo.html] [--model smollm2-135m-instruct] [--quick] [--no-progress]``
    Load a model (the bundled SmolLM2-135M-Instruct by default, offline; ``--model tiny:llama`` for a
    random tiny model) and write a self-contained HTML report built from the registered report sections
    (:mod:`tokensmith.report.sections`): model card, multilingual tokenization, per-token log-prob heatmap,
    activation steering. Prints a summary and the timings.

``tokensmith models``
    List the bundled models.

``tokensmith attribute "prompt" --target "..." [--method ig] [--chat] [--out attribution.html]``
    Attribute a continuation to the prompt tokens (:mod:`tokensmith.attribution.cli`).

Subpackages register their subcommands with :func:`register_subcommand` and their demo sections with
``tokensmith.report.register_section`` when imported; :data:`tokensmith.plugins.PLUGINS` lists them.
"""

from __future__ import annotations

import time

_T0 = time.perf_counter()

import argparse  # noqa: E402
import sys  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402

__all__ = ["main", "build_parser", "SUBCOMMANDS", "register_subcommand"]

_FIRST_CALL = True


def _process_age() -> float | None:
    """Seconds since this process started (Linux), so that the demo's time includes Python start-up and
    importing torch (which happens before this module runs: ``tokensmith/__init__`` imports it)."""
    try:
        import os

        with open("/proc/self/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        start_ticks = int(fields[19])  # field 22 of stat(5): starttime, in clock ticks since boot
        with open("/proc/uptime", encoding="ascii") as f:
            uptime = float(f.read().split()[0])
        age = uptime - start_ticks / os.sysconf("SC_CLK_TCK")
        return age if 0 <= age < 3600 else None
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def _add_demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="tokensmith-demo.html", help="HTML file to write (default: %(default)s)")
    p.add_argument(
        "--model",
        default="smollm2-135m-instruct",
        help="bundled name, local path, hub id, or tiny:<arch> for a random tiny model (default: %(default)s)",
    )
    p.add_argument("--quick", action="store_true", help="smaller workloads (for tests)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--seed", type=int, default=0, help="seed (default: %(default)s)")
    p.add_argument(
        "--sections",
        default=None,
        help="comma-separated section keys to include (default: all registered sections)",
    )
    p.add_argument("--strict", action="store_true", help="stop at the first section that raises")


def _run_demo(args: argparse.Namespace) -> int:
    import torch

    from tokensmith.report import ReportContext, build_report, load_model, registered_sections

    progress = not args.no_progress
    t_import = time.perf_counter() - args._t0
    torch.manual_seed(args.seed)
    print(f"tokensmith demo: loading {args.model} ...", flush=True)
    t = time.perf_counter()
    try:
        adapter = load_model(args.model)
    except (ValueError, ImportError) as e:
        print(f"tokensmith demo: cannot load {args.model!r}: {e}", file=sys.stderr)
        return 2
    load_s = time.perf_counter() - t
    print(f"tokensmith demo: loaded in {load_s:.2f} s ({torch.get_num_threads()} torch threads)", flush=True)
    keys = None
    if args.sections:
        keys = [k.strip() for k in args.sections.split(",") if k.strip()]
        known = {s.key for s in registered_sections()}
        unknown = [k for k in keys if k not in known]
        if unknown:
            print(f"tokensmith demo: unknown section(s) {unknown}; known: {sorted(known)}", file=sys.stderr)
            return 2
    ctx = ReportContext(model_name=args.model, quick=args.quick, seed=args.seed, load_seconds=load_s)
    report = build_report(adapter, ctx, keys, progress=progress, strict=args.strict)
    report.extra_timings = {"start-up and imports": t_import, "model load": load_s}
    path = report.write(args.out)
    total = time.perf_counter() - args._t0
    print()
    for line in report.summary_lines():
        print(line)
    print()
    print(
        f"wrote {path} ({path.stat().st_size / 1024:.0f} KiB) — total {total:.1f} s "
        f"(start-up {t_import:.1f} s, load {load_s:.1f} s, sections {report.seconds:.1f} s)"
    )
    if report.failed:
        print(f"tokensmith demo: {len(report.failed)} section(s) failed: "
              f"{', '.join(s.key for s in report.failed)}", file=sys.stderr)
        return 1
    return 0


def _add_models_args(p: argparse.ArgumentParser) -> None:
    return None


def _run_models(args: argparse.Namespace) -> int:
    from tokensmith.models.zoo import available_models

    for name, desc in available_models().items():
        print(f"{name}\n    {desc}")
    print("tiny:<arch>\n    random tiny model for tests (gpt2, llama, qwen2, gemma3, gpt_neox, bert, t5)")
    return 0


# name -> (help, add_arguments, run)
SUBCOMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {
    "demo": ("write a self-contained HTML tour of a model (offline)", _add_demo_args, _run_demo),
    "models": ("list the bundled models", _add_models_args, _run_models),
}


def register_subcommand(
    name: str,
    help_: str,
    add_arguments: Callable[[argparse.ArgumentParser], None],
    run: Callable[[argparse.Namespace], int],
) -> None:
    """Add ``tokensmith <name>``; subpackages call this from their own ``cli`` module."""
    SUBCOMMANDS[name] = (help_, add_arguments, run)


def build_parser() -> argparse.ArgumentParser:
    from tokensmith import __version__
    from tokensmith.plugins import load_plugins

    load_plugins()

    parser = argparse.ArgumentParser(prog="tokensmith", description="tokensmith: a token-level research toolkit")
    parser.add_argument("--version", action="version", version=f"tokensmith {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_, add, _) in SUBCOMMANDS.items():
        add(sub.add_parser(name, help=help_, description=help_))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``tokensmith`` command; returns the exit code."""
    global _FIRST_CALL
    t0 = time.perf_counter()
    if _FIRST_CALL and argv is None:  # the console script: count from process start
        age = _process_age()
        t0 = t0 - age if age is not None else _T0
    _FIRST_CALL = False
    parser = build_parser()
    args = parser.parse_args(list(argv) if argv is not None else None)
    args._t0 = t0
    if not args.command:
        parser.print_help()
        return 2
    return SUBCOMMANDS[args.command][2](args)


if __name__ == "__main__":  # pragma: no cover
    # ``python -m tokensmith.cli`` (and ``accelerate launch -m tokensmith.cli``) runs this file as ``__main__``, a
    # second module object: subcommands register into the importable ``tokensmith.cli``, so run that one's main
    from tokensmith.cli import main as _main

    sys.exit(_main())
