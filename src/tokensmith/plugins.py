"""Subpackages that register demo-report sections and CLI subcommands when imported.

``tokensmith demo`` and ``tokensmith.report.registered_sections()`` call :func:`load_plugins` so that
every subpackage's section is present whatever was imported before. A new subpackage with a section or a
command adds its module path to :data:`PLUGINS`.
"""

from __future__ import annotations

import importlib

__all__ = ["PLUGINS", "load_plugins"]

PLUGINS: tuple[str, ...] = (
    "tokensmith.tokenization", "tokensmith.attribution", "tokensmith.optimization", "tokensmith.alignment",
    "tokensmith.pruning", "tokensmith.analysis", "tokensmith.run",
)


def load_plugins() -> None:
    """Import every module in :data:`PLUGINS` (idempotent)."""
    for mod in PLUGINS:
        importlib.import_module(mod)
