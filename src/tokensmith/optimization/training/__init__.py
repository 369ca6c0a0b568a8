"""tokensmith.optimization.training — token-level training objectives (METHODS.md 3B).

Pure losses over ``logits [B, T, V]``, aligned ``labels [B, T]`` and ``mask [B, T]``
(:func:`shift_labels`, :func:`token_loss`, :func:`weighted_token_loss`, :func:`compute_token_objective`), token
weighters by registry name (``"uniform"``, ``"rho1"``, ``"tldr"``, ``"focal"``, ``"prior"``), extra token
losses by registry name (``"simctg"``, ``"contrastive_token"``, ``"number_token"``, ``"smoothed_ce"``,
``"unlikelihood"``, ``"rtd"``) and
:class:`TokenWeightedTrainer` (a ``transformers.Trainer``; imported lazily, so this package does not import the
Trainer machinery until it is used).

    >>> import torch
    >>> from tokensmith.optimization.training import shift_labels, weighted_token_loss
    >>> ids = torch.tensor([[3, 1, 4, 1, 5]])
    >>> labels, mask = shift_labels(ids)
    >>> loss = weighted_token_loss(torch.zeros(1, 5, 8), labels, mask, weighter="tldr")
    >>> round(loss.item(), 4)                     # p = 1/8 everywhere: (cos(π/8) + 1)·log 8
    4.0006
"""

from __future__ import annotations

from typing import Any

from tokensmith.optimization.training.base import (
    TokenBatch,
    TokenLoss,
    TokenWeighter,
    get_token_loss,
    get_weighter,
    register_token_loss,
    register_weighter,
    token_loss_names,
    weighter_names,
)
from tokensmith.optimization.training.losses import (
    TokenLossOutput,
    compute_token_objective,
    reduce_token_loss,
    shift_labels,
    token_loss,
    weighted_token_loss,
)
from tokensmith.optimization.training.mtp import (
    MTPHead,
    SpeculativeResult,
    add_mtp_heads,
    mtp_heads,
    mtp_loss,
    multi_token_loss,
    self_speculative_generate,
)
from tokensmith.optimization.training.token_losses import (
    ContrastiveTokenLoss,
    NumberTokenLoss,
    ReplacedTokenDetectionLoss,
    RTDOutput,
    SimCTGLoss,
    SmoothedCELoss,
    UnlikelihoodLoss,
    contrastive_token_loss,
    number_token_loss,
    number_token_values,
    replaced_token_detection_loss,
    share_embeddings,
    simctg_loss,
    smoothed_ce,
    unlikelihood_loss,
)
from tokensmith.optimization.training.weighters import (
    TLDR,
    ContextDependence,
    Focal,
    Rho1,
    Uniform,
    check_reference_vocab,
    context_dependence_weights,
    excess_loss,
    keep_count,
    no_context_logprobs,
    reference_token_loss,
    selective_lm_loss,
    top_k_mask,
)

_LAZY = {"TokenWeightedTrainer", "frequency_buckets", "token_frequencies"}

__all__ = [
    # base
    "TokenBatch",
    "TokenWeighter",
    "TokenLoss",
    "register_weighter",
    "register_token_loss",
    "get_weighter",
    "get_token_loss",
    "weighter_names",
    "token_loss_names",
    # losses
    "shift_labels",
    "token_loss",
    "weighted_token_loss",
    "reduce_token_loss",
    "TokenLossOutput",
    "compute_token_objective",
    # weighters
    "Uniform",
    "Rho1",
    "TLDR",
    "Focal",
    "ContextDependence",
    "excess_loss",
    "keep_count",
    "top_k_mask",
    "selective_lm_loss",
    "context_dependence_weights",
    "reference_token_loss",
    "no_context_logprobs",
    "check_reference_vocab",
    # extra token losses
    "simctg_loss",
    "contrastive_token_loss",
    "number_token_values",
    "number_token_loss",
    "smoothed_ce",
    "unlikelihood_loss",
    "replaced_token_detection_loss",
    "share_embeddings",
    "RTDOutput",
    "SimCTGLoss",
    "ContrastiveTokenLoss",
    "NumberTokenLoss",
    "SmoothedCELoss",
    "UnlikelihoodLoss",
    "ReplacedTokenDetectionLoss",
    # multi-token prediction
    "MTPHead",
    "add_mtp_heads",
    "mtp_heads",
    "multi_token_loss",
    "mtp_loss",
    "self_speculative_generate",
    "SpeculativeResult",
    # trainer (lazy)
    "TokenWeightedTrainer",
    "frequency_buckets",
    "token_frequencies",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from tokensmith.optimization.training import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
