"""The result of a token-space search: best ids and string, both losses, history, archive; JSON save/load."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["SearchResult", "versions", "generator_state", "set_generator_state"]


def generator_state(g) -> str:
    """A ``torch.Generator``'s state as a JSON-safe string (saved with a result for exact resume)."""
    import base64

    return base64.b64encode(g.get_state().numpy().tobytes()).decode("ascii")


def set_generator_state(g, state: str) -> None:
    """Restore :func:`generator_state` into ``g``."""
    import base64

    import numpy as np
    import torch

    g.set_state(torch.from_numpy(np.frombuffer(base64.b64decode(state), dtype=np.uint8).copy()))


def versions() -> dict[str, str]:
    import torch
    import transformers

    import tokensmith

    return {"tokensmith": tokensmith.__version__, "torch": torch.__version__, "transformers": transformers.__version__}


@dataclass
class SearchResult:
    """What :func:`~tokensmith.optimization.search` returns.

    Attributes:
        best_ids: slot token ids with the lowest loss seen.
        best_string: their decoded text.
        best_loss: the loss of ``best_ids`` as optimised (on the ids).
        init_loss: the loss of the initial slot ids.
        string_loss: the loss recomputed from ``best_string`` rendered through the full template(s) (what a
            user pasting the string gets); differs from ``best_loss`` only when the string re-tokenizes
            differently in context.
        string_ids: the slot's ids after that re-rendering (first template).
        success: whether the best ids make the model produce the target greedily (None: not checkable).
        history: one dict per step: ``step, loss`` (selected candidate), ``best_loss``, ``n_candidates``,
            ``filtered`` (fraction dropped by the re-tokenization filter), ``seconds``, ``forwards``,
            ``tokens`` (cumulative token positions computed), ``success``.
        archive: every candidate that met the success criterion (greedy target, or the user predicate):
            ``step, ids, string, loss, by``.
        method: proposer name; config: its options and the loop's; seed; versions.
        stopped: why the loop ended (``"steps"``, ``"time"``, ``"forwards"``, ``"early_stop"``,
            ``"callback"``, ``"interrupted"``).
        state: what a resumed run needs (current ids, buffer, generator and proposer state).

    Examples:
        >>> r = SearchResult(best_ids=[1, 2], best_string="ab", best_loss=0.5)
        >>> SearchResult.from_dict(r.to_dict()).best_ids
        [1, 2]
    """

    best_ids: list[int]
    best_string: str
    best_loss: float
    init_loss: float | None = None
    string_loss: float | None = None
    string_ids: list[int] | None = None
    success: bool | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    archive: list[dict[str, Any]] = field(default_factory=list)
    method: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    seed: int | None = None
    versions: dict[str, str] = field(default_factory=dict)
    stopped: str = ""
    state: dict[str, Any] = field(default_factory=dict, repr=False)

    def __repr__(self) -> str:
        sl = "n/a" if self.string_loss is None else f"{self.string_loss:.4f}"
        return (
            f"SearchResult(method={self.method!r}, steps={len(self.history)}, best_loss={self.best_loss:.4f}, "
            f"string_loss={sl}, success={self.success}, best_string={self.best_string!r}, stopped={self.stopped!r})"
        )

    @property
    def steps(self) -> int:
        return len(self.history)

    @property
    def losses(self) -> list[float]:
        """Best loss after each step."""
        return [h["best_loss"] for h in self.history]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SearchResult:
        return cls(**d)

    def save(self, path: str | Path) -> Path:
        """Write the result as JSON (resume from it with ``search(..., resume=path)``)."""
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_suffix(p.suffix + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1, default=_json_default), encoding="utf-8")
        tmp.replace(p)
        return p

    @classmethod
    def load(cls, path: str | Path) -> SearchResult:
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))

    def to_pandas(self):  # pragma: no cover - thin
        import pandas as pd

        return pd.DataFrame(self.history)

    def plot(self, ax: Any = None, x: str = "step"):
        """Loss curve (selected and best loss against ``x``: ``"step"``, ``"forwards"`` or ``"seconds"``)."""
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(5, 3))
        xs = [h[x] for h in self.history]
        ax.plot(xs, [h["loss"] for h in self.history], alpha=0.4, label="selected")
        ax.plot(xs, self.losses, label="best")
        ax.set_xlabel(x)
        ax.set_ylabel("loss")
        ax.legend()
        return ax


def _json_default(o: Any) -> Any:
    import torch

    if isinstance(o, torch.Tensor):
        return o.tolist()
    raise TypeError(f"cannot serialise {type(o).__name__}")
