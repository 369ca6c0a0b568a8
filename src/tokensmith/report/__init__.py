"""Self-contained HTML reports (the ``tokensmith demo`` page and anything built like it).

- :mod:`tokensmith.report.html`: string helpers (page, tables, inline-SVG bar chart, heat colours, chips).
- :mod:`tokensmith.report.tokens`: what each token stands for (bytes, characters, split characters).
- :mod:`tokensmith.report.sections`: the :class:`Section` type, the section registry and the built-in
  demo sections (model card, multilingual tokenization, log-prob heatmap, steering).
- :mod:`tokensmith.report.build`: :func:`build_report` runs sections and writes one HTML file.

Add a section to every report with :func:`register_section`.
"""

from tokensmith.report.build import Report, build_report, load_model
from tokensmith.report.sections import (
    ReportContext,
    Section,
    SectionSpec,
    register_section,
    registered_sections,
    unregister_section,
)
from tokensmith.report.tokens import TokenPiece, token_pieces

__all__ = [
    "Report",
    "ReportContext",
    "Section",
    "SectionSpec",
    "build_report",
    "load_model",
    "register_section",
    "registered_sections",
    "unregister_section",
    "TokenPiece",
    "token_pieces",
]
