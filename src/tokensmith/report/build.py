"""Build a report from registered sections and write it as one self-contained HTML file."""

from __future__ import annotations

import datetime as _dt
import re
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tokensmith.report import html as H
from tokensmith.report.sections import ReportContext, Section, SectionSpec, registered_sections

if TYPE_CHECKING:  # pragma: no cover
    from tokensmith.models.adapter import ModelAdapter

__all__ = ["Report", "build_report", "load_model"]


@dataclass
class Report:
    """A built report: sections in order, the context, and timings."""

    sections: list[Section]
    ctx: ReportContext
    title: str = "tokensmith demo"
    seconds: float = 0.0
    extra_timings: dict[str, float] = field(default_factory=dict)

    @property
    def failed(self) -> list[Section]:
        return [s for s in self.sections if s.error]

    def section(self, key: str) -> Section:
        for s in self.sections:
            if s.key == key:
                return s
        raise KeyError(f"no section {key!r}; sections: {[s.key for s in self.sections]}")

    def to_html(self) -> str:
        cards = []
        for s in self.sections:
            body = s.html
            if s.error:
                body = f'<p class="bad">This section failed:</p><pre class="gen">{H.esc(s.error)}</pre>' + body
            body += f'<p class="note">Section time: {s.seconds:.2f} s.</p>'
            cards.append((s.key or _slug(s.title), s.title, body))
        timing_rows = [(k, f"{v:.2f} s") for k, v in self.extra_timings.items()]
        timing_rows += [(f"section: {s.title}", f"{s.seconds:.2f} s") for s in self.sections]
        timing_rows.append(("total (report build, incl. the above)", f"{self.seconds:.2f} s"))
        footer = (
            "<h3>Timings</h3>" + H.kv_table(timing_rows)
            + f"<p>Generated {H.esc(_dt.datetime.now().isoformat(timespec='seconds'))} by tokensmith. "
            "Self-contained file: inline CSS and SVG, no scripts, no external assets.</p>"
        )
        subtitle = f"model: {self.ctx.model_name}" + (" · quick mode" if self.ctx.quick else "")
        return H.page(self.title, cards, subtitle=subtitle, footer=footer)

    def write(self, path: str | Path) -> Path:
        p = Path(path)
        if p.parent and not p.parent.exists():
            p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(self.to_html(), encoding="utf-8")
        return p

    def summary_lines(self) -> list[str]:
        out = []
        for s in self.sections:
            out.append(f"[{s.title}] ({s.seconds:.1f} s)" + (" FAILED" if s.error else ""))
            if s.error:
                out.append("    " + s.error.strip().splitlines()[-1])
            out += ["    " + line for line in s.summary_lines]
        return out


def _slug(s: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", s.lower()).strip("-") or "section"


def build_report(
    adapter: ModelAdapter,
    ctx: ReportContext | None = None,
    sections: Sequence[SectionSpec | str] | None = None,
    *,
    progress: bool = True,
    strict: bool = False,
    title: str = "tokensmith demo",
) -> Report:
    """Run sections on ``adapter`` and collect them into a :class:`Report`.

    Args:
        adapter: the model.
        ctx: run context (quick mode, seed, load time); a default one is made from the adapter's name.
        sections: section specs or registry keys; default: every registered section, in order.
        progress: show a tqdm progress bar over sections.
        strict: re-raise a section's exception (tests); otherwise the error is shown in its card.
        title: page title.

    Examples:
        >>> import tokensmith as ts
        >>> from tokensmith.report import build_report
        >>> rep = build_report(ts.tiny("llama"), sections=["model"], progress=False)
        >>> rep.sections[0].title
        'Model card'
    """
    from tqdm.auto import tqdm

    ctx = ctx or ReportContext(model_name=str(adapter.name))
    reg = {s.key: s for s in registered_sections()}
    if sections is None:
        specs = list(reg.values())
    else:
        specs = []
        for s in sections:
            if isinstance(s, str):
                if s not in reg:
                    raise KeyError(f"no registered section {s!r}; registered: {sorted(reg)}")
                specs.append(reg[s])
            else:
                specs.append(s)
    feats = adapter.capabilities()["features"]
    t0 = time.perf_counter()
    out: list[Section] = []
    bar = tqdm(specs, desc="report", unit="section", disable=not progress, leave=True)
    for spec in bar:
        bar.set_postfix_str(spec.title)
        missing = [r for r in spec.requires if not feats.get(r, False)]
        ts = time.perf_counter()
        if missing:
            sec = Section(spec.title, f'<p class="note">Skipped: this model lacks {H.esc(", ".join(missing))}.</p>',
                          [f"skipped (model lacks {', '.join(missing)})"], {"skipped": missing})
        else:
            try:
                sec = spec.fn(adapter, ctx)
            except Exception as e:
                if strict:
                    raise
                sec = Section(spec.title, "", [], {}, error=f"{type(e).__name__}: {e}\n\n{traceback.format_exc()}")
        sec.key = spec.key
        sec.seconds = time.perf_counter() - ts
        ctx.results[spec.key] = sec
        out.append(sec)
    bar.close()
    return Report(out, ctx, title=title, seconds=time.perf_counter() - t0)


def load_model(name: str, **kwargs: Any) -> ModelAdapter:
    """``tiny:<arch>`` builds ``tokensmith.tiny(arch)``; anything else goes to ``tokensmith.load``."""
    import tokensmith as ts

    if name.startswith("tiny:") or name.startswith("tiny-"):
        return ts.tiny(name[5:] or "llama", **kwargs)
    return ts.load(name, **kwargs)
