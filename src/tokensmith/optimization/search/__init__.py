"""Token-space search: GCG family, random search, HotFlip/AutoPrompt, PEZ, RAG poisoning (METHODS.md 3A).

One loop (:func:`search`) with pluggable parts: a :class:`Problem` (an encoding with a slot, an
:class:`Objective`, :class:`Constraints`), a :class:`Proposer`, and a :class:`SearchResult`.
"""

from tokensmith.optimization.search.constraints import Constraints
from tokensmith.optimization.search.hotflip import HotFlip, MaskedTargetLoss
from tokensmith.optimization.search.igcg import IGCG, merge_candidates
from tokensmith.optimization.search.loop import Problem, SearchState, search
from tokensmith.optimization.search.losses import mellowmax, target_loss
from tokensmith.optimization.search.objectives import (
    Evaluation,
    Objective,
    Sum,
    TargetLoss,
    TemplateObjective,
    available_objectives,
    get_objective,
    multi_model,
    multi_prompt,
    plan_chunks,
    register_objective,
    row_normalize,
)
from tokensmith.optimization.search.pez import PEZ
from tokensmith.optimization.search.probe import ProbeSampling, rankdata, spearman
from tokensmith.optimization.search.proposers import (
    GCG,
    Proposer,
    RandomSearch,
    available_proposers,
    dedupe,
    get_proposer,
    n_replace_at,
    register_proposer,
    sample_swaps,
)
from tokensmith.optimization.search.result import SearchResult
from tokensmith.optimization.search.retrieval import (
    CrossTokenizer,
    Joint,
    RetrieverSimilarity,
    awf_ratio,
    char_alignment,
    minmax_normalize,
    retrieval_rank,
    vocab_map,
)
from tokensmith.optimization.search.template import SlotTemplate, find_slot

__all__ = [
    "search",
    "Problem",
    "SearchState",
    "SearchResult",
    "Constraints",
    "Objective",
    "Evaluation",
    "TargetLoss",
    "TemplateObjective",
    "Sum",
    "multi_prompt",
    "multi_model",
    "register_objective",
    "get_objective",
    "available_objectives",
    "row_normalize",
    "plan_chunks",
    "Proposer",
    "GCG",
    "RandomSearch",
    "register_proposer",
    "get_proposer",
    "available_proposers",
    "sample_swaps",
    "dedupe",
    "n_replace_at",
    "IGCG",
    "merge_candidates",
    "HotFlip",
    "MaskedTargetLoss",
    "PEZ",
    "ProbeSampling",
    "spearman",
    "rankdata",
    "RetrieverSimilarity",
    "CrossTokenizer",
    "Joint",
    "retrieval_rank",
    "vocab_map",
    "char_alignment",
    "minmax_normalize",
    "awf_ratio",
    "SlotTemplate",
    "find_slot",
    "target_loss",
    "mellowmax",
]
