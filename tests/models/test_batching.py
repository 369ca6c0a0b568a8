"""Left padding equals one-at-a-time; micro-batching with OOM back-off."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

from tokensmith.models import MicroBatcher
from tokensmith.models.batching import is_oom

pytestmark = pytest.mark.usefixtures("torch_one_thread")

CAUSAL = ["gpt2", "llama", "qwen2", "gemma3", "gpt_neox"]
WORDS = ["the", "cat", "sat", "on", "a", "mat", "quantum", "zebra", "!", "42", "hello", "world", ","]
LONG = " ".join(WORDS * 2)  # > 16 tokens: exercises gemma3's sliding-window layer under padding


def _assert_batched_equals_single(ad, items):
    b = ad.encode_batch(items)
    rows = b.unpad(ad.token_logprobs(b))
    for item, row, ex in zip(items, rows, b.examples, strict=True):
        single = ad.token_logprobs(ad.encode_batch([item]))[0]
        assert row.shape == single.shape == ex.input_ids.shape
        assert_close(row, single, atol=1e-5, rtol=1e-5)
    assert (ad.token_logprobs(b)[~b.attention_mask.bool()] == 0).all()


@pytest.mark.parametrize("arch", CAUSAL)
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.lists(st.sampled_from(WORDS), min_size=1, max_size=22), min_size=2, max_size=3))
def test_left_padded_batch_equals_one_at_a_time(arch, shared_tiny, word_lists):
    ad = shared_tiny(arch)
    _assert_batched_equals_single(ad, [" ".join(w) for w in word_lists])


@pytest.mark.parametrize("arch", CAUSAL)
def test_left_padding_with_targets_and_a_long_row(arch, shared_tiny):
    ad = shared_tiny(arch)
    items = [("Hi", " there"), (LONG, " and more"), ("a", " b c d")]
    _assert_batched_equals_single(ad, items)
    b = ad.encode_batch(items)
    lp = ad.token_logprobs(b)
    assert ((lp != 0) == b.target_mask).all()


def test_max_batch_size_equals_unchunked(shared_tiny):
    ad = shared_tiny("llama")
    items = ["one", "two three", LONG, "four five six", "seven"]
    b = ad.encode_batch(items)
    full = ad.token_logprobs(b)
    for bs in (1, 2, 4):
        assert_close(ad.token_logprobs(b, max_batch_size=bs), full, atol=1e-6, rtol=0)


def test_token_logprobs_backs_off_on_oom(shared_tiny, monkeypatch):
    ad = shared_tiny("gpt2")
    b = ad.encode_batch(["one", "two three", "four five six", "seven eight", "nine"])
    full = ad.token_logprobs(b)
    real_forward = ad.model.forward
    sizes = []

    def flaky(*a, **kw):
        n = (kw.get("input_ids") if kw.get("input_ids") is not None else kw["inputs_embeds"]).shape[0]
        sizes.append(n)
        if n > 2:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_forward(*a, **kw)

    monkeypatch.setattr(ad.model, "forward", flaky)
    mb = ad.batcher
    try:
        out = ad.token_logprobs(b)
        assert_close(out, full, atol=1e-6, rtol=0)
        assert sizes[:3] == [5, 2, 2] and max(sizes[1:]) <= 2
        key = ("token_logprobs", b.input_ids.shape[1])
        assert mb.fits[key] == 2
        sizes.clear()
        ad.token_logprobs(b)
        assert max(sizes) == 2  # remembered: starts at the size that fit
    finally:
        mb.fits.clear()


def test_microbatcher_back_off_and_memory():
    calls = []

    def fn(s, e):
        calls.append(e - s)
        if e - s > 3:
            raise RuntimeError("CUDA out of memory. Tried to allocate 1 GiB")
        return list(range(s, e))

    mb = MicroBatcher(max_batch_size=10)
    out = mb.run(fn, 10, key="k")
    assert sum(out, []) == list(range(10))
    assert calls[:2] == [10, 5] and all(c <= 3 for c in calls[2:])
    assert mb.fits["k"] <= 3
    calls.clear()
    out2 = mb.run(fn, 10, key="k")
    assert sum(out2, []) == list(range(10)) and max(calls) <= 3  # starts at the remembered size
    calls.clear()
    mb.run(fn, 3, key="other")
    assert calls == [3]
    # a memory budget bounds the first chunk
    mb2 = MicroBatcher(memory_budget=100)
    assert mb2.first_chunk(50, bytes_per_item=30) == 3
    assert [len(x) for x in mb2.run(lambda s, e: list(range(s, e)), 7, bytes_per_item=30)] == [3, 3, 1]
    assert mb.run(fn, 0) == []
    # a call that merely had few items does not cap later calls with the same key
    mb3 = MicroBatcher()
    assert mb3.run(lambda s, e: e - s, 1, key="k") == [1]
    assert mb3.run(lambda s, e: e - s, 8, key="k") == [8]
    assert mb3.fits == {}


def test_microbatcher_propagates_non_oom_errors_and_oom_at_size_one():
    def bad(s, e):
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        MicroBatcher(4).run(bad, 8)

    def value_error(s, e):
        raise ValueError("out of memory")  # not a RuntimeError -> not an OOM

    with pytest.raises(ValueError):
        MicroBatcher(4).run(value_error, 8)

    def always_oom(s, e):
        raise RuntimeError("CUDA out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        MicroBatcher(4).run(always_oom, 8)
    with pytest.raises(ValueError, match=">= 1"):
        MicroBatcher(0)


def test_is_oom():
    assert is_oom(RuntimeError("CUDA out of memory. Tried to allocate"))
    assert is_oom(RuntimeError("[enforce fail at alloc_cpu.cpp] DefaultCPUAllocator: can't allocate memory"))
    assert is_oom(torch.OutOfMemoryError("x"))
    assert not is_oom(RuntimeError("size mismatch"))
    assert not is_oom(KeyError("out of memory"))


@pytest.mark.real_model
def test_smollm2_left_padded_batch_equals_one_at_a_time(smollm2_shared):
    _assert_batched_equals_single(smollm2_shared, [("Paris is the capital of", " France"), ("Hi", " there, friend")])
