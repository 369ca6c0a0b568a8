"""tokensmith.alignment — token-level preference optimization (METHODS.md section 4).

The pure per-token losses (:mod:`~tokensmith.alignment.losses`: DPO family with token weights,
TDPO, SparsePO, cDPO, T-REG, AlignDistil, RTO token rewards, Text2Grad span rewards) and preference pairs
encoded jointly through the adapter with their per-token log-probs and KL (:mod:`~tokensmith.alignment.data`),
token scorers (:mod:`~tokensmith.alignment.scorers`) and :class:`TokenPreferenceTrainer` with a per-token
reference cache (:mod:`~tokensmith.alignment.trainer`) on an offline demo set (:func:`demo_pairs`).

    >>> import torch
    >>> from tokensmith.alignment import dpo
    >>> lp = torch.tensor([[-1.0, -2.0]]); m = torch.ones(1, 2, dtype=torch.bool)
    >>> loss, metrics = dpo(lp, lp - 1, lp, lp, m, m, beta=0.1)   # margin 0.2: -log σ(0.2)
    >>> round(float(loss), 4)
    0.5981
"""

from tokensmith.alignment import report  # noqa: F401  (registers the demo section)
from tokensmith.alignment.data import (
    PreferenceBatch,
    PreferencePair,
    encode_pairs,
    pair_kl,
    pair_logprobs,
    pair_logprobs_and_kl,
)
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
from tokensmith.alignment.pairs import demo_pairs
from tokensmith.alignment.scorers import (
    AttributionScorer,
    ContrastiveScorer,
    CriticalTokens,
    ExcessLossScorer,
    ImplicitRewardScorer,
    TokenScorer,
    TVDScorer,
    available_scorers,
    find_critical_tokens,
    get_scorer,
    register_scorer,
)
from tokensmith.alignment.sparsepo import SparsePOMasks

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
    "TokenScorer",
    "ContrastiveScorer",
    "ExcessLossScorer",
    "ImplicitRewardScorer",
    "TVDScorer",
    "AttributionScorer",
    "register_scorer",
    "get_scorer",
    "available_scorers",
    "find_critical_tokens",
    "CriticalTokens",
    "TokenPreferenceTrainer",
    "ReferenceCache",
    "LossInputs",
    "PreferenceCollator",
    "LOSSES",
    "PEFT_DISABLED",
    "peft_disabled_reference",
    "TokenDPOTrainer",
    "TRLLossInputs",
    "check_trl_version",
    "SparsePOMasks",
    "pair_logprobs_and_kl",
    "demo_pairs",
]

_LAZY = {
    "TokenPreferenceTrainer", "ReferenceCache", "LossInputs", "PreferenceCollator", "LOSSES", "PEFT_DISABLED",
    "peft_disabled_reference",
}
_LAZY_TRL = {"TokenDPOTrainer", "TRLLossInputs", "check_trl_version"}


def __getattr__(name: str):  # the trainers import transformers.Trainer / trl (seconds): only when asked for
    if name in _LAZY:
        from tokensmith.alignment import trainer

        return getattr(trainer, name)
    if name in _LAZY_TRL:
        from tokensmith.alignment import trl

        return getattr(trl, name)
    raise AttributeError(f"module 'tokensmith.alignment' has no attribute {name!r}")
