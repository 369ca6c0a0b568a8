"""``tokensmith attribute "prompt" --target "..." --method ig --out attribution.html`` (registered on import)."""

from __future__ import annotations

import argparse
import sys

from tokensmith.cli import register_subcommand

__all__ = ["add_arguments", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", help="the prompt (a user turn with --chat)")
    p.add_argument("--target", required=True, help="the continuation to attribute, or 'generate'")
    p.add_argument("--method", default="integrated_gradients", help="a registered method (default: %(default)s)")
    p.add_argument("--model", default="smollm2-135m-instruct", help="bundled name, path, hub id or tiny:<arch>")
    p.add_argument("--chat", action="store_true", help="render through the chat template")
    p.add_argument("--n-steps", type=int, default=None, help="integration steps (path methods)")
    p.add_argument("--words", action="store_true", help="aggregate scores by words")
    p.add_argument("--out", default="attribution.html", help="HTML file to write (default: %(default)s)")
    p.add_argument("--json", default=None, help="also save the result as JSON here")


def run(args: argparse.Namespace) -> int:
    from tokensmith.attribution import attribute
    from tokensmith.report import load_model

    try:
        adapter = load_model(args.model)
        kw = {"n_steps": args.n_steps} if args.n_steps else {}
        res = attribute(adapter, args.prompt, target=args.target, method=args.method, chat=args.chat, **kw)
    except (ValueError, TypeError) as e:
        print(f"tokensmith attribute: {e}", file=sys.stderr)
        return 2
    view = res.aggregate("words") if args.words else res
    html = ("<!doctype html><html><head><meta charset='utf-8'><title>tokensmith attribution</title></head><body>"
            + view.to_html(max_rows=64) + "</body></html>")
    with open(args.out, "w", encoding="utf-8") as f:
        f.write(html)
    if args.json:
        res.save(args.json)
    print(f"{res!r}")
    for t, label in enumerate(res.target_labels[:8]):
        top = ", ".join(f"{tok!r} {s:+.3f}" for _, tok, s in view.top(3, row=t))
        print(f"  {label!r}: {top}")
    if res.delta is not None:
        print(f"  completeness error (relative, max over rows): {float(res.relative_delta().max()):.2%}")
    print(f"wrote {args.out}")
    return 0


register_subcommand("attribute", "attribute a continuation to the prompt tokens, as an HTML heatmap", add_arguments, run)
