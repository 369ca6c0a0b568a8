"""Helpers that build a self-contained HTML page (inline CSS, inline SVG, no external assets).

Everything here returns strings. Text is always escaped with :func:`esc`; callers pass raw
strings. The page never references a URL: no ``src``/``href`` to ``http(s)``, no web fonts,
no scripts.

Examples:
    >>> from tokensmith.report import html
    >>> "&lt;b&gt;" in html.table(["x"], [["<b>"]])
    True
"""

from __future__ import annotations

import html as _html
import math
from collections.abc import Iterable, Sequence
from typing import Any

__all__ = [
    "esc",
    "fmt",
    "page",
    "table",
    "kv_table",
    "bar_chart_svg",
    "heat_color",
    "heat_legend_svg",
    "chip",
    "token_text",
    "CHIP_PALETTE",
]

# Pastel colours cycled over adjacent tokens so that token boundaries are visible.
CHIP_PALETTE = ("#dbeafe", "#fde68a", "#d1fae5", "#fbcfe8", "#e9d5ff", "#fed7aa")

_CSS = """
:root { --fg:#1f2328; --muted:#6b7280; --line:#e5e7eb; --accent:#4f46e5; }
* { box-sizing: border-box; }
body { font-family: -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, "Noto Sans", sans-serif;
       color: var(--fg); margin: 0; background: #f8fafc; line-height: 1.45; }
main { max-width: 1100px; margin: 0 auto; padding: 24px 28px 60px; }
header.top { background: #1e1b4b; color: #fff; padding: 22px 28px; }
header.top h1 { margin: 0 0 4px; font-size: 1.6rem; }
header.top p { margin: 0; color: #c7d2fe; }
section.card { background: #fff; border: 1px solid var(--line); border-radius: 10px; padding: 18px 22px;
               margin: 18px 0; }
section.card h2 { margin-top: 0; font-size: 1.25rem; border-bottom: 1px solid var(--line); padding-bottom: 6px; }
section.card h3 { font-size: 1.02rem; margin: 18px 0 6px; }
nav.toc { margin: 14px 0 0; font-size: .92rem; }
nav.toc a { color: var(--accent); margin-right: 14px; text-decoration: none; }
table.t { border-collapse: collapse; margin: 8px 0 12px; font-size: .9rem; }
table.t th, table.t td { border-bottom: 1px solid var(--line); padding: 4px 10px; text-align: left; vertical-align: top; }
table.t th { background: #f1f5f9; font-weight: 600; }
table.t td.num, table.t th.num { text-align: right; font-variant-numeric: tabular-nums; }
.muted { color: var(--muted); }
.note { font-size: .88rem; color: var(--muted); margin: 6px 0; }
.ok { color: #047857; font-weight: 600; }
.bad { color: #b91c1c; font-weight: 600; }
code, .mono { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, "Liberation Mono", monospace; font-size: .88em; }
pre.gen { background: #f1f5f9; border-radius: 6px; padding: 8px 10px; white-space: pre-wrap; margin: 4px 0 10px; }
.chips { display: flex; flex-wrap: wrap; gap: 3px; margin: 4px 0 12px; direction: ltr; }
.chip { display: inline-block; padding: 1px 4px; border-radius: 4px; border: 1px solid rgba(0,0,0,.08);
        font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: .86rem;
        white-space: pre; unicode-bidi: isolate; }
.chip .ws { color: #94a3b8; }
.chip .frag { border-bottom: 2px dotted #b91c1c; }
.heat { line-height: 2.0; font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: .9rem; }
.heat span.tok { padding: 2px 1px; border-radius: 3px; white-space: pre-wrap; }
.heat span.tpl { color: #9ca3af; background: #f3f4f6; }
.heat span.ctx { color: #374151; }
.heat span.sc { outline: 1px solid rgba(0,0,0,.06); }
.grid2 { display: grid; grid-template-columns: 1fr 1fr; gap: 18px; }
@media (max-width: 820px) { .grid2 { grid-template-columns: 1fr; } }
footer { font-size: .85rem; color: var(--muted); margin-top: 30px; }
"""


def esc(x: Any) -> str:
    """HTML-escape ``str(x)`` (quotes included, so the result is safe inside attributes)."""
    return _html.escape(str(x), quote=True)


def fmt(x: Any, digits: int = 3) -> str:
    """Format a number compactly: ints as-is, floats with ``digits`` significant decimals."""
    if isinstance(x, bool) or x is None:
        return str(x)
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        if math.isnan(x) or math.isinf(x):
            return str(x)
        if x != 0 and (abs(x) < 10 ** (-digits) or abs(x) >= 1e6):
            return f"{x:.{digits}g}"
        return f"{x:.{digits}f}"
    return str(x)


def table(
    headers: Sequence[str],
    rows: Iterable[Sequence[Any]],
    *,
    numeric: Sequence[int] = (),
    raw: bool = False,
    cls: str = "t",
) -> str:
    """An HTML table. Cells are escaped unless ``raw``; columns in ``numeric`` are right-aligned."""
    num = set(numeric)
    head = "".join(f'<th class="num">{esc(h)}</th>' if i in num else f"<th>{esc(h)}</th>" for i, h in enumerate(headers))
    body = []
    for row in rows:
        cells = []
        for i, c in enumerate(row):
            content = str(c) if raw else esc(fmt(c) if isinstance(c, (int, float)) else c)
            cells.append(f'<td class="num">{content}</td>' if i in num else f"<td>{content}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def kv_table(items: Iterable[tuple[str, Any]]) -> str:
    """A two-column key/value table (values escaped and formatted)."""
    rows = "".join(
        f"<tr><th>{esc(k)}</th><td>{esc(fmt(v) if isinstance(v, (int, float)) else v)}</td></tr>" for k, v in items
    )
    return f'<table class="t"><tbody>{rows}</tbody></table>'


def bar_chart_svg(
    labels: Sequence[str],
    values: Sequence[float],
    *,
    title: str = "",
    unit: str = "",
    ref: float | None = None,
    width: int = 520,
    bar_h: int = 20,
    color: str = "#6366f1",
) -> str:
    """A horizontal bar chart as inline SVG. ``ref`` draws a dashed reference line (e.g. 1.0x)."""
    if len(labels) != len(values):
        raise ValueError("labels and values must have the same length")
    label_w, pad, top = 90, 60, 26 if title else 6
    plot_w = width - label_w - pad
    vmax = max([*values, ref or 0.0, 1e-12])
    h = top + len(values) * (bar_h + 6) + 8
    parts = [
        f'<svg width="{width}" height="{h}" viewBox="0 0 {width} {h}" '
        f'role="img" aria-label="{esc(title or "bar chart")}" font-family="sans-serif" font-size="12">'
    ]
    if title:
        parts.append(f'<text x="0" y="16" font-weight="600">{esc(title)}</text>')
    for i, (lab, v) in enumerate(zip(labels, values, strict=False)):
        y = top + i * (bar_h + 6)
        w = max(1.0, plot_w * float(v) / vmax)
        parts.append(f'<text x="{label_w - 6}" y="{y + bar_h * 0.72:.1f}" text-anchor="end">{esc(lab)}</text>')
        parts.append(
            f'<rect x="{label_w}" y="{y}" width="{w:.1f}" height="{bar_h}" rx="3" fill="{color}">'
            f"<title>{esc(lab)}: {esc(fmt(float(v), 2))}{esc(unit)}</title></rect>"
        )
        parts.append(f'<text x="{label_w + w + 4:.1f}" y="{y + bar_h * 0.72:.1f}">{esc(fmt(float(v), 2))}{esc(unit)}</text>')
    if ref is not None:
        x = label_w + plot_w * ref / vmax
        parts.append(
            f'<line x1="{x:.1f}" y1="{top - 4}" x2="{x:.1f}" y2="{h - 4}" stroke="#111827" stroke-dasharray="4 3"/>'
        )
    parts.append("</svg>")
    return "".join(parts)


def heat_color(value: float, vmax: float = 8.0) -> str:
    """Background colour for a surprisal (-log p, nats): white at 0, deep red at ``vmax`` and above."""
    x = 0.0 if not math.isfinite(value) else min(max(value / vmax, 0.0), 1.0)
    # interpolate white -> amber -> red
    if x < 0.5:
        a, b, t = (255, 255, 255), (253, 186, 116), x / 0.5
    else:
        a, b, t = (253, 186, 116), (220, 38, 38), (x - 0.5) / 0.5
    r, g, bl = (round(a[i] + (b[i] - a[i]) * t) for i in range(3))
    return f"#{r:02x}{g:02x}{bl:02x}"


def heat_legend_svg(vmax: float = 8.0, width: int = 320) -> str:
    """A colour legend for :func:`heat_color` (surprisal in nats and the matching probability)."""
    n = 32
    step = (width - 20) / n
    rects = "".join(
        f'<rect x="{10 + i * step:.2f}" y="4" width="{step + 0.5:.2f}" height="12" fill="{heat_color(vmax * i / (n - 1), vmax)}"/>'
        for i in range(n)
    )
    ticks = []
    for v in (0.0, vmax / 4, vmax / 2, 3 * vmax / 4, vmax):
        x = 10 + (width - 20) * v / vmax
        ticks.append(f'<text x="{x:.1f}" y="30" text-anchor="middle">{v:g}</text>')
    return (
        f'<svg width="{width}" height="48" viewBox="0 0 {width} 48" '
        f'font-family="sans-serif" font-size="10" role="img" aria-label="surprisal legend">{rects}'
        f'<rect x="10" y="4" width="{width - 20}" height="12" fill="none" stroke="#d1d5db"/>{"".join(ticks)}'
        f'<text x="{width / 2:.0f}" y="44" text-anchor="middle">surprisal −log p (nats; p = e^−x), '
        f"{vmax:g}+ saturates</text></svg>"
    )


def token_text(s: str) -> str:
    """Escape a token's text and make whitespace visible (space ·, newline ↵, tab →)."""
    out = []
    for ch in s:
        if ch == " ":
            out.append('<span class="ws">·</span>')
        elif ch == "\n":
            out.append('<span class="ws">↵</span>')
        elif ch == "\t":
            out.append('<span class="ws">→</span>')
        else:
            out.append(esc(ch))
    return "".join(out)


def chip(inner_html: str, *, title: str = "", color: str | None = None, attrs: str = "") -> str:
    """One token chip: ``inner_html`` is already escaped (see :func:`token_text`)."""
    style = f' style="background:{color}"' if color else ""
    t = f' title="{esc(title)}"' if title else ""
    extra = f" {attrs}" if attrs else ""
    return f'<span class="chip"{style}{t}{extra}>{inner_html}</span>'


def page(title: str, sections: Sequence[tuple[str, str, str]], *, subtitle: str = "", footer: str = "") -> str:
    """The full HTML document.

    Args:
        title: page title.
        sections: ``(anchor_id, heading, body_html)`` triples, rendered as cards with a table of contents.
        subtitle: a line under the title (escaped).
        footer: raw HTML for the footer.
    """
    toc = "".join(f'<a href="#{esc(a)}">{esc(h)}</a>' for a, h, _ in sections)
    cards = "".join(f'<section class="card" id="{esc(a)}"><h2>{esc(h)}</h2>{body}</section>' for a, h, body in sections)
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{_CSS}</style></head><body>"
        f'<header class="top"><h1>{esc(title)}</h1><p>{esc(subtitle)}</p></header>'
        f'<main><nav class="toc">{toc}</nav>{cards}<footer>{footer}</footer></main></body></html>\n'
    )


def line_chart_svg(
    series: dict[str, Sequence[float]],
    *,
    x: Sequence[float] | None = None,
    title: str = "",
    xlabel: str = "",
    ylabel: str = "",
    width: int = 520,
    height: int = 220,
) -> str:
    """Lines as inline SVG: ``series`` maps a label to y values (all of one length, sharing ``x``)."""
    colors = ["#6366f1", "#f59e0b", "#10b981", "#ef4444", "#0ea5e9"]
    ys = [list(map(float, v)) for v in series.values()]
    if not ys or not ys[0]:
        raise ValueError("line_chart_svg needs at least one non-empty series")
    n = len(ys[0])
    if any(len(v) != n for v in ys):
        raise ValueError("all series must have the same length")
    xs = list(map(float, x)) if x is not None else [float(i) for i in range(n)]
    finite = [v for s in ys for v in s if v == v and abs(v) != float("inf")]
    lo, hi = (min(finite), max(finite)) if finite else (0.0, 1.0)
    if hi - lo < 1e-12:
        hi = lo + 1.0
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    L, R, T, B = 48, 12, 24 if title else 8, 30
    pw, ph = width - L - R, height - T - B

    def px(v: float) -> float:
        return L + pw * (v - x0) / (x1 - x0)

    def py(v: float) -> float:
        return T + ph * (1 - (v - lo) / (hi - lo))

    parts = [f'<svg width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
             f'aria-label="{esc(title or "line chart")}" font-family="sans-serif" font-size="11">']
    if title:
        parts.append(f'<text x="0" y="14" font-weight="600" font-size="12">{esc(title)}</text>')
    parts.append(f'<rect x="{L}" y="{T}" width="{pw}" height="{ph}" fill="none" stroke="#d1d5db"/>')
    for v in (lo, (lo + hi) / 2, hi):
        parts.append(f'<text x="{L - 4}" y="{py(v) + 4:.1f}" text-anchor="end">{esc(fmt(v, 3))}</text>')
    parts.append(f'<text x="{L}" y="{height - 8}">{esc(fmt(x0, 3))}</text>')
    parts.append(f'<text x="{L + pw}" y="{height - 8}" text-anchor="end">{esc(fmt(x1, 3))}</text>')
    if xlabel:
        parts.append(f'<text x="{L + pw / 2}" y="{height - 8}" text-anchor="middle">{esc(xlabel)}</text>')
    if ylabel:
        parts.append(f'<text x="10" y="{T + ph / 2}" transform="rotate(-90 10 {T + ph / 2})" text-anchor="middle">{esc(ylabel)}</text>')
    for k, (label, s) in enumerate(zip(series, ys, strict=True)):
        pts = " ".join(f"{px(a):.1f},{py(b):.1f}" for a, b in zip(xs, s, strict=True) if b == b and abs(b) != float("inf"))
        c = colors[k % len(colors)]
        parts.append(f'<polyline fill="none" stroke="{c}" stroke-width="2" points="{pts}"><title>{esc(label)}</title></polyline>')
        parts.append(f'<text x="{L + pw - 4}" y="{T + 14 + 13 * k}" text-anchor="end" fill="{c}">{esc(label)}</text>')
    parts.append("</svg>")
    return "".join(parts)
