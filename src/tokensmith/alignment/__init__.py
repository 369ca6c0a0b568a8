"""tokensmith.alignment — token-level preference optimization (METHODS.md section 4).

Built so far: the pure per-token losses (:mod:`~tokensmith.alignment.losses`: DPO family with token weights,
TDPO, SparsePO, cDPO, T-REG, AlignDistil, RTO token rewards, Text2Grad span rewards) and preference pairs
encoded jointly through the adapter with their per-token log-probs and KL (:mod:`~tokensmith.alignment.data`).
Token scorers and the trainer are to come (see docs/guides/alignment.md).

    >>> import torch
    >>> from tokensmith.alignment import dpo
    >>> lp = torch.tensor([[-1.0, -2.0]]); m = torch.ones(1, 2, dtype=torch.bool)
    >>> loss, metrics = dpo(lp, lp - 1, lp, lp, m, m, beta=0.1)   # margin 0.2: -log σ(0.2)
    >>> round(float(loss), 4)
    0.5981
"""

from tokensmith.alignment import report  # noqa: F401  (registers the demo section)
from tokensmith.alignment.data import PreferenceBatch, PreferencePair, encode_pairs, pair_kl, pair_logprobs
from tokensmith.alignment.losses import (
    MaskModel,
    aligndistil_loss,
    aligndistil_target,
    cdpo,
    contrastive_token_weights,
    dpo,
    rto_token_rewards,
    self_contrastive_token_rewards,
    spans_to_token_rewards,
    sparsepo,
    tdpo,
    token_rewards,
    treg,
    treg_regularizer,
)

__all__ = [
    "PreferencePair",
    "PreferenceBatch",
    "encode_pairs",
    "pair_logprobs",
    "pair_kl",
    "dpo",
    "token_rewards",
    "tdpo",
    "sparsepo",
    "MaskModel",
    "contrastive_token_weights",
    "cdpo",
    "self_contrastive_token_rewards",
    "treg_regularizer",
    "treg",
    "aligndistil_target",
    "aligndistil_loss",
    "rto_token_rewards",
    "spans_to_token_rewards",
]
