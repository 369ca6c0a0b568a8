"""tokensmith.tokenization — byte-exact tokenizer view, metrics and reports, token healing, exact
byte-level probabilities and vocabulary transfer (METHODS.md section 5, DEC-1/DEC-2).

See ``docs/guides/tokenization.md``.
"""

from tokensmith.tokenization import (  # noqa: F401  (register `tokensmith tokenizer-report` and the demo section)
    cli,
    demo,
    metrics,  # noqa: F401  (the pure metric functions, as a namespace)
)
from tokensmith.tokenization.bytes import (
    ByteEnsemble,
    ByteGeneration,
    ByteLM,
    TokenizationBias,
    byte_ensemble,
    byte_generate,
    canonical_options,
    split_incomplete_utf8,
    tokenization_bias,
)
from tokensmith.tokenization.corpus import django_parallel_corpus, flores_corpus
from tokensmith.tokenization.healing import (
    HealingResult,
    PrefixConstraintLogitsProcessor,
    allowed_token_mask_for,
    token_healing_generate,
)
from tokensmith.tokenization.metrics import (
    compression,
    corpus_metrics,
    fertility,
    measure,
    morph_score,
    parity_matrix,
    renyi_efficiency,
    tokenization_premium,
    unfairness_summary,
)
from tokensmith.tokenization.report import TokenizerReport, bundled_report, report
from tokensmith.tokenization.tokenizers import TOKENIZERS, load_tokenizer
from tokensmith.tokenization.transfer import (
    TransferPlan,
    bits_per_byte,
    omp,
    plan_transfer,
    sparsemax,
    transfer_embeddings,
)
from tokensmith.tokenization.undertrained import (
    REPEAT_TEMPLATES,
    RepeatTemplate,
    UndertrainedReport,
    find_undertrained_tokens,
    reference_tokens,
    reserved_special_tokens,
)
from tokensmith.tokenization.view import (
    ByteEncoding,
    TokenizerView,
    bytes_to_unicode,
    check_homomorphism,
    utf8_boundaries,
)

__all__ = [
    "transfer_embeddings",
    "plan_transfer",
    "TransferPlan",
    "bits_per_byte",
    "omp",
    "sparsemax",
    "find_undertrained_tokens",
    "UndertrainedReport",
    "RepeatTemplate",
    "REPEAT_TEMPLATES",
    "reference_tokens",
    "reserved_special_tokens",
    "metrics",
    "report",
    "TokenizerReport",
    "bundled_report",
    "django_parallel_corpus",
    "flores_corpus",
    "compression",
    "corpus_metrics",
    "fertility",
    "measure",
    "morph_score",
    "parity_matrix",
    "renyi_efficiency",
    "tokenization_premium",
    "unfairness_summary",
    "ByteLM",
    "ByteEnsemble",
    "ByteGeneration",
    "TokenizationBias",
    "byte_ensemble",
    "byte_generate",
    "canonical_options",
    "split_incomplete_utf8",
    "tokenization_bias",
    "HealingResult",
    "PrefixConstraintLogitsProcessor",
    "allowed_token_mask_for",
    "token_healing_generate",
    "TOKENIZERS",
    "ByteEncoding",
    "TokenizerView",
    "bytes_to_unicode",
    "check_homomorphism",
    "load_tokenizer",
    "utf8_boundaries",
]
