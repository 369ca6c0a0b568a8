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


# -- micro-batching is transparent to hooks (issue 5 §2) -------------------------------------------------------
import math  # noqa: E402

from tokensmith.models import ablate_fn, patch_fn, steer_fn  # noqa: E402

HOOK_ITEMS = [("one", " two"), ("two three four", " five"), (LONG, " and"), ("seven", " eight nine")]
SCENARIOS = ["bs1", "bs2", "bs3", "bs4", "oom"]  # B = 4; "oom": max_batch_size=4, the 4-row attempt runs out


def _fp32_tol(ad, ref: torch.Tensor) -> float:
    """Absolute tolerance for a value recomputed with another batch size (another BLAS blocking): a few fp32
    ulps per accumulation, growing like sqrt(depth * width), times the magnitude."""
    s = ad.structure
    return 4e-6 * math.sqrt(s.num_layers * s.hidden_size) * float(ref.abs().max().clamp_min(1e-3))


def _assert_fp32_close(ad, got, ref):
    assert got.shape == ref.shape
    assert_close(got, ref, atol=_fp32_tol(ad, ref), rtol=0)


class _OOMOnce:
    """Raise an out-of-memory error inside layer 1 (after layer 0's hooks fired) the first time a forward
    holds more than ``rows`` rows: the failed attempt has already recorded something."""

    def __init__(self, ad, rows: int = 2, err: type[BaseException] = torch.OutOfMemoryError):
        self.ad, self.rows, self.err, self.fired, self.handle = ad, rows, err, 0, None

    def __enter__(self):
        def hook(module, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            if x.shape[0] > self.rows and not self.fired:
                self.fired += 1
                raise self.err("CUDA out of memory. Tried to allocate 2.00 GiB")

        self.handle = self.ad.structure.layers[1].register_forward_pre_hook(hook, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def _scored(ad, b, scenario, grad=False):
    if scenario == "oom":
        with _OOMOnce(ad) as oom:
            out = ad.token_logprobs(b, max_batch_size=4, grad=grad)
        assert oom.fired == 1
        return out
    return ad.token_logprobs(b, max_batch_size=int(scenario[2:]), grad=grad)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_hook_cache_under_micro_batching_equals_unbatched(scenario, shared_tiny):
    ad = shared_tiny("llama")
    b = ad.encode_batch(HOOK_ITEMS)
    names = ["embed", "layers.0.resid_post", "layers.1.attn.q", "layers.1.attn.probs", "logits"]
    with torch.no_grad():
        with ad.hooks(cache=names) as ref:
            full = ad.token_logprobs(b)
        with ad.hooks(cache=names) as h:
            out = _scored(ad, b, scenario)
    _assert_fp32_close(ad, out, full)
    for n in names:
        # one record per logical call, rows in order; nothing left over from a failed attempt
        assert len(h.cache.steps(n)) == 1, n
        _assert_fp32_close(ad, h.cache[n], ref.cache[n])
    assert h.cache["layers.0.resid_post"].shape[:2] == b.input_ids.shape


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_hook_grads_under_micro_batching_equal_unbatched(scenario, shared_tiny):
    ad = shared_tiny("gpt2")
    b = ad.encode_batch(HOOK_ITEMS)
    names = ["layers.0.resid_post", "layers.1.attn.v"]  # attn.v: a fused-QKV slice on GPT-2
    with ad.hooks(grad=names) as ref:
        ad.token_logprobs(b, grad=True).sum().backward()
    with ad.hooks(grad=names) as h:
        _scored(ad, b, scenario, grad=True).sum().backward()
    ad.model.zero_grad(set_to_none=True)
    for n in names:
        (g,) = h.grads.steps(n)
        assert g.shape[:2] == b.input_ids.shape
        _assert_fp32_close(ad, g, ref.grads[n])
        assert g.abs().max() > 0


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_edits_with_per_example_values_under_micro_batching(scenario, shared_tiny):
    ad = shared_tiny("qwen2")
    b = ad.encode_batch(HOOK_ITEMS)
    B, T = b.input_ids.shape
    d = ad.structure.hidden_size
    g = torch.Generator().manual_seed(0)
    value = torch.randn(B, T, d, generator=g)  # per-example patch
    vec = 2 * torch.randn(B, 1, d, generator=g)  # per-example steering vector
    mask = torch.rand(B, T, generator=g) > 0.5  # per-example position mask
    mask[:, -2] = True
    n0, n1 = "layers.0.resid_post", "layers.1.mlp.out"
    edits = {
        "patch": {n0: patch_fn(value, positions=mask)},
        "steer": {n0: steer_fn(vec, 1.0, positions=mask)},
        "mean_example": {n1: ablate_fn("mean", over="example")},
        "mean_value": {n1: ablate_fn("mean", value=value[:, :1])},
    }
    with torch.no_grad():
        base = ad.token_logprobs(b)
        for kind, edit in edits.items():
            with ad.hooks(edit=edit):
                ref = ad.token_logprobs(b)
                got = _scored(ad, b, scenario)
            assert (ref - base).abs().max() > 1e-3, kind  # the edit does something
            _assert_fp32_close(ad, got, ref)


def test_edit_context_reports_rows_of_each_micro_batch(shared_tiny):
    ad = shared_tiny("llama")
    b = ad.encode_batch(HOOK_ITEMS)
    seen = []
    with torch.no_grad(), ad.hooks(edit={"layers.0.resid_post": lambda h, ctx: seen.append((ctx.rows, ctx.batch_size, ctx.step, h.shape[0]))}):
        with _OOMOnce(ad):
            ad.token_logprobs(b, max_batch_size=4)
        ad.forward(b)
    # failed attempt (all 4 rows), its two halves (same logical step 0), then a plain forward (step 1)
    assert seen == [(slice(0, 4), 4, 0, 4), (slice(0, 2), 4, 0, 2), (slice(2, 4), 4, 0, 2), (slice(0, 4), 4, 1, 4)]


def test_batch_mean_ablation_refuses_a_split_batch(shared_tiny):
    ad = shared_tiny("llama")
    b = ad.encode_batch(HOOK_ITEMS)
    with torch.no_grad(), ad.hooks(edit={"layers.0.mlp.out": ablate_fn("mean")}):
        full = ad.token_logprobs(b)
        _assert_fp32_close(ad, ad.token_logprobs(b, max_batch_size=4), full)  # not split: the batch mean
        with pytest.raises(ValueError, match=r"micro-batches.*value=.*over='example'"):
            ad.token_logprobs(b, max_batch_size=2)
        with pytest.raises(ValueError, match="micro-batches"), _OOMOnce(ad):
            ad.token_logprobs(b, max_batch_size=4)  # split by the OOM back-off: refused too, not silently wrong


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.lists(st.lists(st.sampled_from(WORDS), min_size=1, max_size=12), min_size=1, max_size=5),
    st.integers(1, 5),
    st.booleans(),
)
def test_micro_batched_hook_cache_equals_unbatched_property(shared_tiny, word_lists, bs, oom):
    ad = shared_tiny("gpt_neox")
    b = ad.encode_batch([" ".join(w) for w in word_lists])
    name = "layers.1.resid_pre"
    with torch.no_grad():
        with ad.hooks(cache=name) as ref:
            ad.forward(b)
        with ad.hooks(cache=name) as h:
            if oom:
                with _OOMOnce(ad, rows=max(1, bs // 2), err=RuntimeError):
                    ad.token_logprobs(b, max_batch_size=bs)
            else:
                ad.token_logprobs(b, max_batch_size=bs)
    _assert_fp32_close(ad, h.cache[name], ref.cache[name])


def test_micro_batch_call_drops_failed_attempts_and_checks_rows(shared_tiny):
    ad = shared_tiny("llama")
    ids = ad.encode_batch(["a b c", "d e f", "g h i"]).input_ids
    name = "layers.0.resid_post"
    with torch.no_grad(), ad.hooks(cache=name) as h:
        with ad.micro_batch(3) as call:
            with pytest.raises(RuntimeError, match="boom"), call.rows(0, 3):
                ad.forward(ids)
                raise RuntimeError("boom")
            for s, e in ((2, 3), (0, 2)):  # any order: assembled by rows
                with call.rows(s, e):
                    ad.forward(ids[s:e])
        with pytest.raises(ValueError, match="not inside a batch of 3"), ad.micro_batch(3) as call:
            with call.rows(2, 5):
                pass
    with torch.no_grad(), ad.hooks(cache=name) as ref:
        ad.forward(ids)
    assert len(h.cache.steps(name)) == 1
    _assert_fp32_close(ad, h.cache[name], ref.cache[name])
