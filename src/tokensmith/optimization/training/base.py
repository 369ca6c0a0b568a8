"""Bases and registry for token-level training objectives (METHODS.md 3B).

Every objective in :mod:`tokensmith.optimization.training` is one of two kinds:

- a :class:`TokenWeighter` turns the per-token cross-entropy of a batch into per-token weights
  ``w[B, T]``; the loss is then ``weighted_token_loss(logits, labels, mask, weights=w)``
  (Rho-1, TLDR, focal, PRIOR, ...);
- a :class:`TokenLoss` computes a whole extra loss term from the batch (SimCTG, contrastive token,
  number-token, unlikelihood, smoothed CE, replaced-token detection, ...).

Both take a :class:`TokenBatch`: the tensors of one training step, named once so that every objective
reads the same fields. Labels are already *aligned* with the logits: ``logits[:, t]`` predicts
``labels[:, t]`` (shift once, with :func:`tokensmith.optimization.training.shift_labels`).

Register a subclass by giving it a ``name`` class attribute; ``get_weighter("rho1", ...)`` /
``get_token_loss("simctg", ...)`` build one by name, so ``weighter="my_weighter"`` works everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

__all__ = [
    "TokenBatch",
    "TokenWeighter",
    "TokenLoss",
    "register_weighter",
    "register_token_loss",
    "get_weighter",
    "get_token_loss",
    "weighter_names",
    "token_loss_names",
]


@dataclass
class TokenBatch:
    """The tensors of one training step, aligned (``logits[:, t]`` predicts ``labels[:, t]``).

    Attributes:
        logits: ``[B, T, V]`` policy logits (with grad), or None when an objective computes its own.
        labels: ``[B, T]`` target ids; any value where ``mask`` is False (e.g. -100).
        mask: ``[B, T]`` bool, True where the token counts (padding, prompt and ignored labels False).
        token_loss: ``[B, T]`` per-token CE ``-log p(labels)`` (0 where masked), with grad; filled by
            :func:`~tokensmith.optimization.training.token_loss` when not given.
        input_ids: ``[B, T]`` the model's input ids (unshifted), when known.
        hidden: ``[B, T, d]`` last hidden states aligned with ``logits``, when an objective needs them.
        extra: anything else an objective needs (reference log-probs, number values, ...), by name.
    """

    logits: torch.Tensor | None
    labels: torch.Tensor
    mask: torch.Tensor
    token_loss: torch.Tensor | None = None
    input_ids: torch.Tensor | None = None
    hidden: torch.Tensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)


_WEIGHTERS: dict[str, type[TokenWeighter]] = {}
_LOSSES: dict[str, type[TokenLoss]] = {}


class TokenWeighter:
    """Base class: per-token weights ``w[B, T]`` for :func:`weighted_token_loss`.

    Override :meth:`weights`. Weights must be 0 where ``batch.mask`` is False; they are usually detached
    (a weighter that backpropagates through its weights, like TLDR, says so in its docstring). ``needs``
    names the :class:`TokenBatch` fields / ``extra`` keys it reads (checked by :meth:`check`).
    ``normalize`` tells :func:`weighted_token_loss` how to reduce: ``"mask"`` divides by the number of
    counted tokens (Σ_t w_t·CE_t / Σ_t m_t, METHODS OPT-B1), ``"weights"`` by Σ_t w_t (selection: the mean
    over kept tokens, Rho-1).
    """

    name: ClassVar[str] = ""
    needs: ClassVar[tuple[str, ...]] = ()
    normalize: ClassVar[str] = "mask"

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        if cls.__dict__.get("name"):
            _WEIGHTERS[cls.name] = cls

    def check(self, batch: TokenBatch) -> None:
        for k in self.needs:
            if getattr(batch, k, None) is None and k not in batch.extra:
                raise ValueError(
                    f"{type(self).__name__} needs {k!r} in the TokenBatch (a field or batch.extra[{k!r}])"
                )

    def weights(self, batch: TokenBatch) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self, batch: TokenBatch) -> torch.Tensor:
        self.check(batch)
        return self.weights(batch)


class TokenLoss:
    """Base class: an extra loss term over a :class:`TokenBatch` (scalar).

    Override :meth:`loss`; return a scalar tensor (with grad). ``needs`` as for :class:`TokenWeighter`.
    Most token losses are *added* to maximum likelihood; whether :meth:`loss` includes the CE term is part
    of each class's documented formula (``includes_ce``).
    """

    name: ClassVar[str] = ""
    needs: ClassVar[tuple[str, ...]] = ()
    includes_ce: ClassVar[bool] = False

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        if cls.__dict__.get("name"):
            _LOSSES[cls.name] = cls

    def check(self, batch: TokenBatch) -> None:
        for k in self.needs:
            if getattr(batch, k, None) is None and k not in batch.extra:
                raise ValueError(
                    f"{type(self).__name__} needs {k!r} in the TokenBatch (a field or batch.extra[{k!r}])"
                )

    def loss(self, batch: TokenBatch) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self, batch: TokenBatch) -> torch.Tensor:
        self.check(batch)
        return self.loss(batch)


def register_weighter(cls: type[TokenWeighter], name: str | None = None) -> type[TokenWeighter]:
    """Register a weighter class under ``name`` (default ``cls.name``); usable as a decorator."""
    key = name or cls.name
    if not key:
        raise ValueError("give the weighter a name (class attribute `name` or name=...)")
    _WEIGHTERS[key] = cls
    return cls


def register_token_loss(cls: type[TokenLoss], name: str | None = None) -> type[TokenLoss]:
    """Register a token-loss class under ``name`` (default ``cls.name``); usable as a decorator."""
    key = name or cls.name
    if not key:
        raise ValueError("give the token loss a name (class attribute `name` or name=...)")
    _LOSSES[key] = cls
    return cls


def get_weighter(name: str | TokenWeighter, **kw: Any) -> TokenWeighter:
    """An instance by registry name (or the instance itself)."""
    if isinstance(name, TokenWeighter):
        return name
    if name not in _WEIGHTERS:
        raise ValueError(f"unknown token weighter {name!r}; registered: {sorted(_WEIGHTERS)}")
    return _WEIGHTERS[name](**kw)


def get_token_loss(name: str | TokenLoss, **kw: Any) -> TokenLoss:
    """An instance by registry name (or the instance itself)."""
    if isinstance(name, TokenLoss):
        return name
    if name not in _LOSSES:
        raise ValueError(f"unknown token loss {name!r}; registered: {sorted(_LOSSES)}")
    return _LOSSES[name](**kw)


def weighter_names() -> list[str]:
    return sorted(_WEIGHTERS)


def token_loss_names() -> list[str]:
    return sorted(_LOSSES)
