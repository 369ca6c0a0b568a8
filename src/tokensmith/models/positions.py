"""Position limits: how many positions a model can take, discovered from its config and modules.

A model has a *soft* limit, the context length its config declares (``max_position_embeddings``,
``n_positions``, ``max_seq_len``, ... on the config or its ``text_config``), and possibly a *hard* limit:
the number of rows of a learned (or fixed-table) absolute position embedding, minus the offset at which
the model starts counting (BART/OPT's ``offset``, RoBERTa's ``padding_idx + 1``). Past the hard limit the
model indexes out of its table (a raw ``IndexError``); past the soft limit a rotary / relative model runs
but out of its training range (silently degraded). :class:`tokensmith.models.ModelAdapter` refuses inputs
past ``max_positions`` (the soft limit by default); rotary models may opt out, learned tables never.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from torch import nn

from tokensmith.models.structure import safe_getattr

__all__ = ["PositionLimit", "discover_position_limit", "CONFIG_FIELDS"]

# config fields that declare a context length, in order of preference
CONFIG_FIELDS = (
    "max_position_embeddings",
    "n_positions",
    "max_seq_len",
    "max_sequence_length",
    "max_seq_length",
    "seq_length",
    "n_ctx",
)
_POS_NAME = re.compile(r"(^|[._])(wpe|pos|position|positions|embed_positions|position_embeddings|positions_embed)\b|pos_emb")


@dataclass
class PositionLimit:
    """What bounds the sequence length of a model.

    Attributes:
        config_limit: the context length the config declares (None when it declares none).
        config_field: where it was read (e.g. ``"max_position_embeddings"``, ``"text_config.n_positions"``).
        table_limit: positions an absolute position table can index (None for rotary / relative models).
        table_name: the module path of that table.
    """

    config_limit: int | None = None
    config_field: str | None = None
    table_limit: int | None = None
    table_name: str | None = None

    @property
    def default(self) -> int | None:
        """The limit applied by default: the smaller of the declared and the table limit."""
        vals = [v for v in (self.config_limit, self.table_limit) if v is not None]
        return min(vals) if vals else None

    def describe(self) -> str:
        parts = []
        if self.config_limit is not None:
            parts.append(f"config.{self.config_field}={self.config_limit}")
        if self.table_limit is not None:
            parts.append(f"learned position table {self.table_name!r} indexes {self.table_limit} positions")
        return "; ".join(parts) or "no declared limit"


def _config_limit(config: Any) -> tuple[int | None, str | None]:
    scopes: list[tuple[str, Any]] = [("", config)]
    text = getattr(config, "text_config", None)
    if text is not None and text is not config:
        scopes.append(("text_config.", text))
    for prefix, cfg in scopes:
        for field in CONFIG_FIELDS:
            v = safe_getattr(cfg, field)
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                return v, prefix + field
    return None, None


def discover_position_limit(model: nn.Module, token_embedding: nn.Module | None = None) -> PositionLimit:
    """Find the declared context length and any absolute position table of ``model``.

    A position table is an ``nn.Embedding`` other than the token embedding whose name says so (``wpe``,
    ``position_embeddings``, ``embed_positions``, ...) or whose row count (less its ``offset``) equals the
    declared limit. It can index ``num_embeddings - offset - (padding_idx + 1 if padding_idx is set)``
    positions (RoBERTa counts positions from ``padding_idx + 1``; BART/OPT add ``offset``). Relative
    attention biases and token-type tables are not position tables.
    """
    config = getattr(model, "config", None)
    limit, field = _config_limit(config) if config is not None else (None, None)
    vocab = getattr(token_embedding, "num_embeddings", None)
    table, table_name = None, None
    for name, m in model.named_modules():
        if not isinstance(m, nn.Embedding) or m is token_embedding:
            continue
        leaf = name.rsplit(".", 1)[-1].lower()
        if "token_type" in leaf or "relative" in name.lower() or "bias" in leaf or m.num_embeddings == vocab:
            continue
        offset = getattr(m, "offset", 0)
        offset = offset if isinstance(offset, int) else 0
        named = bool(_POS_NAME.search(name.lower()))
        if not (named or (limit is not None and m.num_embeddings - offset == limit)):
            continue
        usable = m.num_embeddings - offset - (m.padding_idx + 1 if m.padding_idx is not None else 0)
        if table is None or usable < table:
            table, table_name = usable, name
    return PositionLimit(limit, field, table, table_name)
