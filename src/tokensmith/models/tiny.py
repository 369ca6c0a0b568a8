"""Tiny randomly initialised models with real tokenizers, for fast tests and examples.

``tiny("llama")`` builds a 2-layer, 64-wide model of the named architecture in a fraction of
a second, deterministically from ``seed`` and without touching the global RNG. The tokenizer
is real: decoder-only and encoder-decoder models get the (normalised) SmolLM2 byte-level BPE
tokenizer with its ChatML chat template, BERT gets the all-MiniLM-L6-v2 WordPiece tokenizer;
``vocab_size == len(tokenizer)``. Outputs are random, but shapes, special tokens, chat
templates, padding and every structural feature (GQA, tied/untied embeddings, Gemma's
embedding scale and sliding-window layers, encoder-decoder cross attention) are those of the
real architecture.

Examples:
    >>> from tokensmith.models.tiny import tiny_model_and_tokenizer
    >>> model, tok = tiny_model_and_tokenizer("llama", seed=0)           # doctest: +SKIP
    >>> model.config.num_key_value_heads, model.config.vocab_size == len(tok)   # doctest: +SKIP
    (2, True)
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # pragma: no cover
    from tokensmith.models.adapter import ModelAdapter

__all__ = ["TINY_ARCHS", "tiny", "tiny_model_and_tokenizer"]

N_HEADS = 4
N_KV_HEADS = 2
MAX_POSITIONS = 1024
BERT_MAX_POSITIONS = 512
GEMMA3_SLIDING_WINDOW = 16

_BERT_TOKENIZER: list[Any] = []


def _decoder_tokenizer() -> Any:
    from tokensmith.models.zoo import smollm2_tokenizer

    return smollm2_tokenizer(copy=True)


def _bert_tokenizer() -> Any:
    if not _BERT_TOKENIZER:
        from transformers import AutoTokenizer

        from tokensmith.models.zoo import minilm_path

        _BERT_TOKENIZER.append(AutoTokenizer.from_pretrained(str(minilm_path())))
    return copy.deepcopy(_BERT_TOKENIZER[0])


def _special_ids(tok: Any) -> dict[str, Any]:
    return {
        "pad_token_id": tok.pad_token_id,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
    }


def _gpt2(tok: Any, n_layers: int, hidden: int) -> tuple[str, dict[str, Any]]:
    return "GPT2LMHeadModel", dict(
        vocab_size=len(tok),
        n_positions=MAX_POSITIONS,
        n_embd=hidden,
        n_layer=n_layers,
        n_head=N_HEADS,
        n_inner=4 * hidden,
        **_special_ids(tok),
    )


def _llama_like(tok: Any, n_layers: int, hidden: int) -> dict[str, Any]:
    return dict(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=n_layers,
        num_attention_heads=N_HEADS,
        num_key_value_heads=N_KV_HEADS,
        head_dim=hidden // N_HEADS,
        max_position_embeddings=MAX_POSITIONS,
        **_special_ids(tok),
    )


def _llama(tok: Any, n_layers: int, hidden: int) -> tuple[str, dict[str, Any]]:
    return "LlamaForCausalLM", _llama_like(tok, n_layers, hidden)


def _qwen2(tok: Any, n_layers: int, hidden: int) -> tuple[str, dict[str, Any]]:
    cfg = _llama_like(tok, n_layers, hidden)
    cfg.pop("head_dim")
    return "Qwen2ForCausalLM", cfg


def _gemma3(tok: Any, n_layers: int, hidden: int) -> tuple[str, dict[str, Any]]:
    cfg = _llama_like(tok, n_layers, hidden)
    # Alternate sliding-window and full attention, ending on a full layer.
    layer_types = [
        "full_attention" if (n_layers - 1 - i) % 2 == 0 else "sliding_attention" for i in range(n_layers)
    ]
    cfg.update(
        query_pre_attn_scalar=hidden // N_HEADS,
        sliding_window=GEMMA3_SLIDING_WINDOW,
        layer_types=layer_types,
    )
    return "Gemma3ForCausalLM", cfg


def _gpt_neox(tok: Any, n_layers: int, hidden: int) -> tuple[str, dict[str, Any]]:
    return "GPTNeoXForCausalLM", dict(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=n_layers,
        num_attention_heads=N_HEADS,
        max_position_embeddings=MAX_POSITIONS,
        rotary_pct=0.25,
        **_special_ids(tok),
    )


def _bert(tok: Any, n_layers: int, hidden: int) -> tuple[str, dict[str, Any]]:
    return "BertForMaskedLM", dict(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=n_layers,
        num_attention_heads=N_HEADS,
        max_position_embeddings=BERT_MAX_POSITIONS,
        pad_token_id=tok.pad_token_id,
    )


def _t5(tok: Any, n_layers: int, hidden: int) -> tuple[str, dict[str, Any]]:
    return "T5ForConditionalGeneration", dict(
        vocab_size=len(tok),
        d_model=hidden,
        d_kv=hidden // N_HEADS,
        d_ff=2 * hidden,
        num_layers=n_layers,
        num_decoder_layers=n_layers,
        num_heads=N_HEADS,
        relative_attention_num_buckets=16,
        relative_attention_max_distance=64,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        decoder_start_token_id=tok.pad_token_id,
    )


# arch -> (config class name, config builder, tokenizer factory)
_ARCHS: dict[str, tuple[str, Callable[..., tuple[str, dict[str, Any]]], Callable[[], Any]]] = {
    "gpt2": ("GPT2Config", _gpt2, _decoder_tokenizer),
    "llama": ("LlamaConfig", _llama, _decoder_tokenizer),
    "qwen2": ("Qwen2Config", _qwen2, _decoder_tokenizer),
    "gemma3": ("Gemma3TextConfig", _gemma3, _decoder_tokenizer),
    "gpt_neox": ("GPTNeoXConfig", _gpt_neox, _decoder_tokenizer),
    "bert": ("BertConfig", _bert, _bert_tokenizer),
    "t5": ("T5Config", _t5, _decoder_tokenizer),
}
TINY_ARCHS: tuple[str, ...] = tuple(_ARCHS)

_ALIASES = {"gpt-neox": "gpt_neox", "gptneox": "gpt_neox", "gemma-3": "gemma3", "gemma3_text": "gemma3"}


def _canonical_arch(arch: str) -> str:
    key = str(arch).strip().lower()
    key = _ALIASES.get(key, key)
    if key not in _ARCHS:
        raise ValueError(f"Unknown tiny architecture {arch!r}; supported: {', '.join(TINY_ARCHS)}")
    return key


def tiny_model_and_tokenizer(
    arch: str = "llama",
    *,
    seed: int = 0,
    n_layers: int = 2,
    hidden: int = 64,
    attn_implementation: str = "sdpa",
    **config_overrides: Any,
) -> tuple[Any, Any]:
    """Build a tiny random model of ``arch`` and its (real) tokenizer.

    Args:
        arch: one of :data:`TINY_ARCHS`: ``gpt2``, ``llama``, ``qwen2``, ``gemma3``
            (``Gemma3ForCausalLM``; layers alternate sliding-window (16 tokens) and full
            attention, the last is full), ``gpt_neox``, ``bert`` (``BertForMaskedLM``),
            ``t5`` (``T5ForConditionalGeneration``).
        seed: weights are a deterministic function of ``(arch, seed, sizes, overrides)``;
            the global torch RNG is left exactly as it was.
        n_layers: number of layers (encoder and decoder layers each, for t5).
        hidden: model width; must be a multiple of 8 (4 heads with an even head dim).
            Attention uses 4 heads, and 2 key/value heads (GQA) for llama, qwen2, gemma3.
        attn_implementation: ``"sdpa"`` or ``"eager"`` (eager materialises attention
            probabilities).
        **config_overrides: set on the transformers config after the defaults (e.g.
            ``tie_word_embeddings=True``, ``num_key_value_heads=4``).

    Returns:
        ``(model, tokenizer)``: the model is fp32, on CPU, in eval mode, with
        ``config.pad_token_id`` set; ``config.vocab_size == len(tokenizer)``. Each call returns
        a fresh model and a fresh tokenizer object (safe to mutate).

    Raises:
        ValueError: unknown ``arch`` (the message lists the supported ones) or bad sizes.
    """
    import transformers

    key = _canonical_arch(arch)
    if n_layers < 1:
        raise ValueError(f"n_layers must be >= 1, got {n_layers}")
    if hidden < 8 or hidden % (2 * N_HEADS):
        raise ValueError(f"hidden must be a positive multiple of {2 * N_HEADS}, got {hidden}")
    config_name, build_config, make_tokenizer = _ARCHS[key]
    tok = make_tokenizer()
    model_name, cfg = build_config(tok, n_layers, hidden)
    cfg.update(config_overrides)
    config = getattr(transformers, config_name)(**cfg)
    model_cls = getattr(transformers, model_name)
    config._attn_implementation = attn_implementation
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config)
    model.to(torch.float32)
    model.eval()
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tok.pad_token_id
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        for k in ("pad_token_id", "bos_token_id", "eos_token_id"):
            v = getattr(model.config, k, None)
            if v is not None:
                setattr(gen, k, v)
    model.config.name_or_path = f"tiny-{key}"
    return model, tok


def tiny(
    arch: str = "llama",
    *,
    seed: int = 0,
    n_layers: int = 2,
    hidden: int = 64,
    attn_implementation: str = "sdpa",
    **config_overrides: Any,
) -> ModelAdapter:
    """A ``ModelAdapter`` over a tiny random model; see :func:`tiny_model_and_tokenizer`.

    Examples:
        >>> import tokensmith as ts                     # doctest: +SKIP
        >>> adapter = ts.tiny("gemma3", seed=1)         # doctest: +SKIP
    """
    from tokensmith.models.adapter import ModelAdapter

    key = _canonical_arch(arch)
    model, tok = tiny_model_and_tokenizer(
        key,
        seed=seed,
        n_layers=n_layers,
        hidden=hidden,
        attn_implementation=attn_implementation,
        **config_overrides,
    )
    return ModelAdapter(model, tok, name=f"tiny-{key}")
