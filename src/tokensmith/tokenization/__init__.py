"""tokensmith.tokenization — byte-exact tokenizer view, metrics and reports, token healing, exact
byte-level probabilities and vocabulary transfer (METHODS.md section 5, DEC-1/DEC-2).

See ``docs/guides/tokenization.md``.
"""

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
from tokensmith.tokenization.healing import (
    HealingResult,
    PrefixConstraintLogitsProcessor,
    allowed_token_mask_for,
    token_healing_generate,
)
from tokensmith.tokenization.tokenizers import TOKENIZERS, load_tokenizer
from tokensmith.tokenization.view import (
    ByteEncoding,
    TokenizerView,
    bytes_to_unicode,
    check_homomorphism,
    utf8_boundaries,
)

__all__ = [
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
