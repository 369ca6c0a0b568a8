"""``AttributionResult``: a labelled ``[target rows × source tokens]`` score matrix.

Every attribution method returns one. It carries everything needed to read the scores without the
model: token strings, ids, character offsets, segments (``template``, ``prompt``, slot names,
``target``), special-token flags, which positions are sources, which entries are valid (a source can
only affect a later token), the method and its configuration, the seed, library versions, the row
scores ``f_t`` at the input and (for path methods) at the baseline with the completeness delta.

Views return new results and never mutate: :meth:`AttributionResult.normalize`,
:meth:`AttributionResult.aggregate` (``"words"`` or ``"spans"``). Exports: :meth:`to_pandas` (tidy),
:meth:`save` / :meth:`load` (JSON), :meth:`plot` (matplotlib heatmap), :meth:`to_html` /
``_repr_html_`` (a self-contained heatmap with hover values for notebooks).
"""

from __future__ import annotations

import html as _html
import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

__all__ = ["AttributionResult", "token_groups", "versions"]

FORMAT = "tokensmith.attribution/1"


def versions() -> dict[str, str]:
    """Versions of the libraries a result depends on."""
    import transformers

    import tokensmith

    return {"tokensmith": tokensmith.__version__, "torch": torch.__version__, "transformers": transformers.__version__}


@dataclass
class AttributionResult:
    """Scores of source tokens for target rows.

    Attributes:
        scores: ``[R, L]`` float32; ``scores[t, i]`` is source ``i``'s attribution for row ``t``
            (0 where not :attr:`valid`).
        valid: ``[R, L]`` bool; ``i`` is a source and comes before row ``t``'s token.
        tokens, ids, offsets, segments: per position of the sequence (length ``L``).
        special: ``[L]`` special/control tokens; sources: ``[L]`` positions that got scores.
        target_positions: ``[R]`` the token each row scores (``-1`` for callable targets).
        target_labels: one label per row.
        text: the rendered text the offsets index into.
        spans: named token ranges ``{name: (start, end)}``.
        method: registry name of the method; config: its settings.
        target_scores: ``[R]`` row scores ``f_t`` at the input (log-probs for token targets).
        baseline_scores: ``[R]`` ``f_t`` at the baseline (path methods).
        delta: ``[R]`` completeness error ``Σ_i a_ti − (f_t(x) − f_t(x′))`` (path methods).
        seed: the seed used (stochastic methods), versions: library versions, extra: method-specific data.
    """

    scores: torch.Tensor
    valid: torch.Tensor
    tokens: list[str]
    ids: torch.Tensor
    offsets: list[tuple[int, int]]
    segments: list[str]
    special: torch.Tensor
    sources: torch.Tensor
    target_positions: torch.Tensor
    target_labels: list[str]
    text: str
    spans: dict[str, tuple[int, int]] = field(default_factory=dict)
    method: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    target_scores: torch.Tensor | None = None
    baseline_scores: torch.Tensor | None = None
    delta: torch.Tensor | None = None
    seed: int | None = None
    versions: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ basics
    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.scores.shape[0]), int(self.scores.shape[1]))

    def __repr__(self) -> str:
        R, L = self.shape
        return f"AttributionResult(method={self.method!r}, rows={R}, tokens={L}, sources={int(self.sources.sum())})"

    def row(self, t: int) -> torch.Tensor:
        """Scores ``[L]`` of row ``t`` (0 where invalid)."""
        return self.scores[t]

    def total(self) -> torch.Tensor:
        """Scores ``[L]`` summed over rows: each source's attribution to the whole continuation."""
        return self.scores.sum(0)

    def relative_delta(self) -> torch.Tensor | None:
        """``|delta_t| / |f_t(x) − f_t(x′)|`` per row (path methods), else None."""
        if self.delta is None or self.target_scores is None or self.baseline_scores is None:
            return None
        diff = (self.target_scores - self.baseline_scores).abs().clamp_min(1e-12)
        return self.delta.abs() / diff

    def top(self, k: int = 5, row: int | None = None) -> list[tuple[int, str, float]]:
        """The ``k`` highest-scoring sources ``(position, token, score)`` for a row (or the total)."""
        s = (self.total() if row is None else self.row(row)).clone()
        ok = self.valid.any(0) if row is None else self.valid[row]
        s[~ok] = -math.inf
        idx = torch.argsort(s, descending=True)[: min(k, int(ok.sum()))]
        return [(int(i), self.tokens[int(i)], float(s[i])) for i in idx]

    # ------------------------------------------------------------------ views
    def normalize(self, kind: str = "l1") -> AttributionResult:
        """Per row: ``"l1"`` divides by ``Σ_i |s_ti|`` over valid sources, ``"max"`` by ``max_i |s_ti|``,
        ``"sum"`` by ``Σ_i s_ti`` (signed; rows summing to 0 are left as they are). Template and special
        tokens are not sources unless the attribution included them, so they never enter the norm."""
        s = torch.where(self.valid, self.scores, torch.zeros_like(self.scores))
        if kind == "l1":
            z = s.abs().sum(-1, keepdim=True)
        elif kind == "max":
            z = s.abs().amax(-1, keepdim=True)
        elif kind == "sum":
            z = s.sum(-1, keepdim=True)
        else:
            raise ValueError(f"normalize kind must be 'l1', 'max' or 'sum', got {kind!r}")
        z = torch.where(z.abs() > 1e-30, z, torch.ones_like(z))
        return replace(self, scores=s / z, config={**self.config, "normalized": kind})

    def groups(self, by: str = "words") -> list[list[int]]:
        """Token indices per group; see :func:`token_groups`."""
        return token_groups(by, self.text, self.offsets, self.segments, self.special.tolist())

    def aggregate(self, by: str = "words") -> AttributionResult:
        """Sum scores within groups (:meth:`groups`); the result's "tokens" are the groups' texts.

        Rows keep their targets; a group is valid for a row when any of its tokens is.
        """
        gs = self.groups(by)
        G = torch.zeros(len(self.tokens), len(gs))
        for g, idx in enumerate(gs):
            G[idx, g] = 1.0
        s = torch.where(self.valid, self.scores, torch.zeros_like(self.scores)) @ G
        valid = (self.valid.float() @ G) > 0
        pick = lambda xs: [xs[idx[0]] for idx in gs]  # noqa: E731
        offsets = [(self.offsets[idx[0]][0], self.offsets[idx[-1]][1]) for idx in gs]
        texts = [self.text[a:b] if b > a else "".join(self.tokens[i] for i in idx) for (a, b), idx in zip(offsets, gs, strict=True)]
        first = torch.tensor([idx[0] for idx in gs])
        # the group of each row's target token
        where = {i: g for g, idx in enumerate(gs) for i in idx}
        tp = torch.tensor([where.get(int(p), -1) if int(p) >= 0 else -1 for p in self.target_positions])
        return replace(
            self,
            scores=s,
            valid=valid,
            tokens=texts,
            ids=self.ids[first],
            offsets=offsets,
            segments=pick(self.segments),
            special=torch.tensor([bool(self.special[idx].all()) for idx in gs]),
            sources=torch.tensor([bool(self.sources[idx].any()) for idx in gs]),
            target_positions=tp,
            spans={},
            extra={**self.extra, "groups": gs, "aggregated_by": by},
        )

    # ------------------------------------------------------------------ exports
    def to_pandas(self) -> Any:
        """A tidy DataFrame: one row per (target row, source position), with labels and validity."""
        import pandas as pd

        R, L = self.shape
        rows = []
        for t in range(R):
            for i in range(L):
                rows.append({
                    "row": t, "target": self.target_labels[t], "target_position": int(self.target_positions[t]),
                    "position": i, "token": self.tokens[i], "segment": self.segments[i],
                    "special": bool(self.special[i]), "source": bool(self.sources[i]),
                    "valid": bool(self.valid[t, i]), "score": float(self.scores[t, i]),
                })
        return pd.DataFrame(rows)

    def to_dict(self) -> dict[str, Any]:
        def t(x: torch.Tensor | None) -> Any:
            return None if x is None else x.tolist()

        return {
            "format": FORMAT, "method": self.method, "config": _jsonable(self.config), "seed": self.seed,
            "versions": self.versions, "text": self.text, "tokens": self.tokens, "ids": t(self.ids),
            "offsets": [list(o) for o in self.offsets], "segments": self.segments, "special": t(self.special),
            "sources": t(self.sources), "target_positions": t(self.target_positions),
            "target_labels": self.target_labels, "spans": {k: list(v) for k, v in self.spans.items()},
            "scores": t(self.scores), "valid": t(self.valid), "target_scores": t(self.target_scores),
            "baseline_scores": t(self.baseline_scores), "delta": t(self.delta), "extra": _jsonable(self.extra),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AttributionResult:
        if d.get("format") != FORMAT:
            raise ValueError(f"not a saved attribution result (format {d.get('format')!r}, expected {FORMAT!r})")

        def t(x: Any, dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
            return None if x is None else torch.tensor(x, dtype=dtype)

        return cls(
            scores=t(d["scores"]), valid=t(d["valid"], torch.bool), tokens=list(d["tokens"]),
            ids=t(d["ids"], torch.long), offsets=[tuple(o) for o in d["offsets"]], segments=list(d["segments"]),
            special=t(d["special"], torch.bool), sources=t(d["sources"], torch.bool),
            target_positions=t(d["target_positions"], torch.long), target_labels=list(d["target_labels"]),
            text=d["text"], spans={k: tuple(v) for k, v in d["spans"].items()}, method=d["method"],
            config=d["config"], target_scores=t(d["target_scores"]), baseline_scores=t(d["baseline_scores"]),
            delta=t(d["delta"]), seed=d["seed"], versions=d["versions"], extra=d.get("extra", {}),
        )  # type: ignore[arg-type]

    def save(self, path: str | Path) -> Path:
        """Write the result as JSON (lossless for the fp32 scores)."""
        p = Path(path)
        p.write_text(json.dumps(self.to_dict()))
        return p

    @classmethod
    def load(cls, path: str | Path) -> AttributionResult:
        return cls.from_dict(json.loads(Path(path).read_text()))

    def plot(self, ax: Any = None, *, sources_only: bool = True, cmap: str = "RdBu_r") -> Any:
        """Heatmap of ``[rows × sources]`` with matplotlib (optional dependency ``tokensmith[viz]``)."""
        try:
            import matplotlib.pyplot as plt
        except ImportError as e:  # pragma: no cover - viz extra
            raise ImportError("plot() needs matplotlib: pip install 'tokensmith[viz]'") from e
        cols = torch.nonzero(self.valid.any(0) if sources_only else torch.ones(self.shape[1], dtype=torch.bool)).flatten()
        m = self.scores[:, cols].numpy()
        if ax is None:
            _, ax = plt.subplots(figsize=(max(4, 0.35 * len(cols)), max(2, 0.35 * self.shape[0] + 1)))
        v = float(abs(m).max()) or 1.0
        im = ax.imshow(m, cmap=cmap, vmin=-v, vmax=v, aspect="auto")
        ax.set_xticks(range(len(cols)), [self.tokens[int(i)] for i in cols], rotation=90, fontsize=8)
        ax.set_yticks(range(self.shape[0]), self.target_labels, fontsize=8)
        ax.set_title(f"{self.method}")
        ax.figure.colorbar(im, ax=ax, fraction=0.03)
        return ax

    def to_html(self, max_rows: int = 32) -> str:
        """Self-contained HTML: per row, the sequence with each source coloured by its score (red
        positive, blue negative, scaled per row) and the value on hover; the row's target underlined."""
        out = [f"<div style='font-family:monospace;font-size:13px'><div><b>{_html.escape(self.method)}</b> "
               f"— {self.shape[0]} row(s)</div>"]
        for t in range(min(self.shape[0], max_rows)):
            s = self.scores[t]
            v = float(s[self.valid[t]].abs().max()) if bool(self.valid[t].any()) else 1.0
            v = v or 1.0
            label = _html.escape(self.target_labels[t])
            extra = ""
            if self.delta is not None:
                extra = f" (completeness δ {float(self.delta[t]):+.3g})"
            chips = []
            for i, tok in enumerate(self.tokens):
                txt = _html.escape(tok.replace("Ġ", " ").replace("Ċ", "↵").replace("▁", " "))
                if bool(self.valid[t, i]):
                    x = float(s[i]) / v
                    col = f"rgba(220,38,38,{min(1.0, x):.3f})" if x >= 0 else f"rgba(37,99,235,{min(1.0, -x):.3f})"
                    chips.append(f"<span title='{float(s[i]):.4g}' style='background:{col};padding:1px 2px;"
                                 f"margin:1px;border-radius:3px'>{txt}</span>")
                else:
                    style = "color:#999" if not bool(self.sources[i]) else ""
                    if i == int(self.target_positions[t]):
                        style = "text-decoration:underline;font-weight:bold"
                    chips.append(f"<span style='{style};padding:1px 2px;margin:1px'>{txt}</span>")
            out.append(f"<div style='margin:6px 0'><div style='color:#555'>row {t}: {label}{extra}</div>"
                       f"<div style='line-height:1.9'>{''.join(chips)}</div></div>")
        out.append("</div>")
        return "".join(out)

    def _repr_html_(self) -> str:
        return self.to_html()


def token_groups(
    by: str, text: str, offsets: list[tuple[int, int]], segments: list[str], special: list[bool]
) -> list[list[int]]:
    """Group token positions: ``"words"`` — a word starts at a token whose text begins with whitespace or
    follows whitespace, at a segment change, and each template or special token is its own group;
    ``"spans"`` — one group per run of one segment; ``"tokens"`` — one group per token.

    Examples:
        >>> token_groups("words", "ab cd", [(0, 1), (1, 2), (2, 5)], ["prompt"] * 3, [False] * 3)
        [[0, 1], [2]]
    """
    if by not in ("words", "spans", "tokens"):
        raise ValueError(f"group by must be 'words', 'spans' or 'tokens', got {by!r}")
    out: list[list[int]] = []
    for i, seg in enumerate(segments):
        prev = out[-1][-1] if out else None
        if by == "tokens" or prev is None:
            new = True
        elif by == "spans":
            new = segments[prev] != seg
        else:
            s, e = offsets[i]
            piece = text[s:e] if e > s else ""
            prev_end = offsets[prev][1]
            new = (
                seg != segments[prev]
                or special[i] or special[prev]
                or seg == "template"
                or not piece
                or piece[:1].isspace()
                or (prev_end > 0 and text[prev_end - 1 : prev_end].isspace())
                or (s > prev_end and text[prev_end:s].isspace())
            )
        if new:
            out.append([i])
        else:
            out[-1].append(i)
    return out


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return repr(x)
