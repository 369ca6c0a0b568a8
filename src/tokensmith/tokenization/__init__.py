"""tokensmith.tokenization — byte-exact tokenizer view, metrics and reports, token healing, exact
byte-level probabilities and vocabulary transfer (METHODS.md section 5, DEC-1/DEC-2).

See ``docs/guides/tokenization.md``.
"""

from tokensmith.tokenization.tokenizers import TOKENIZERS, load_tokenizer
from tokensmith.tokenization.view import (
    ByteEncoding,
    TokenizerView,
    bytes_to_unicode,
    check_homomorphism,
    utf8_boundaries,
)

__all__ = [
    "TOKENIZERS",
    "ByteEncoding",
    "TokenizerView",
    "bytes_to_unicode",
    "check_homomorphism",
    "load_tokenizer",
    "utf8_boundaries",
]
