"""tokensmith: a token-level research toolkit for PyTorch and HuggingFace transformers."""
from __future__ import annotations

__version__ = "0.1.0"

from tokensmith.models import ModelAdapter, load, tiny  # noqa: E402

__all__ = ["ModelAdapter", "load", "tiny", "__version__"]
