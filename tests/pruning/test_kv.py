"""KV-cache pruning through ``Reducer(target="kv")``: invariants (ratio 0, drop == mask, GQA shape, bytes,
left padding, re-rotation), presets on every tiny causal arch, bad input, and nothing left behind."""

from __future__ import annotations

import pytest
import torch

import tokensmith as ts
from tokensmith.models import kvcache
from tokensmith.pruning import (
    HeavyHitter,
    KeyNorm,
    ObservationWindow,
    Protect,
    RandomScore,
    Reducer,
    SinksRecent,
    cache_bytes,
    presets,
)
from tokensmith.pruning.generate import _as_encoded_batch, decode_loop

ARCHS = ["llama", "gpt2", "qwen2", "gemma3", "gpt_neox"]
PROMPT = "The quick brown fox jumps over the lazy dog and then runs far away into the dark forest"
PROMPTS = ["one two three four five six seven eight nine ten eleven twelve", "red green blue cyan magenta"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread(torch_one_thread):
    yield


def _logits_close(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        scale = max(1.0, float(y.abs().max()))
        torch.testing.assert_close(x, y, rtol=0, atol=2e-5 * scale)


def _plain_decode(ad: ts.ModelAdapter, inputs, n: int):
    batch = _as_encoded_batch(ad, inputs)
    with torch.no_grad():
        out = ad.forward(batch, use_cache=True, logits_to_keep=1)
    cache = getattr(out, "past_key_values", None) or out.cache
    nxt = batch.attention_mask.long().sum(-1)
    m = None if bool(batch.attention_mask.bool().all()) else batch.attention_mask.bool()

    def mask_fn():
        return None if m is None else torch.cat([m, torch.ones(m.shape[0], step[0], dtype=torch.bool)], 1)

    step = [0]

    def slot_mask():
        r = mask_fn()
        step[0] += 1
        return r

    return decode_loop(ad, batch, cache, out.logits[:, -1], nxt, n, slot_mask=slot_mask, output_logits=True, eos_token_id=None)


@pytest.mark.parametrize("arch", ARCHS)
def test_decode_loop_equals_hf_generate(shared_tiny, arch):
    ad = shared_tiny(arch)
    ref = ad.generate(PROMPT, max_new_tokens=5, eos_token_id=None)
    ours = _plain_decode(ad, PROMPT, 5)
    assert ours.new_tokens[0].tolist() == ref.new_tokens[0].tolist()


@pytest.mark.parametrize("arch", ARCHS)
def test_ratio_zero_changes_nothing(shared_tiny, arch):
    ad = shared_tiny(arch)
    ref = _plain_decode(ad, PROMPT, 4)
    with Reducer(target="kv", scorer=KeyNorm(), ratio=0.0).apply(ad) as rep:
        out = ad.generate(PROMPT, max_new_tokens=4, output_logits=True, eos_token_id=None)
    _logits_close(out.logits, ref.logits)
    assert rep.kv_bytes_after == rep.kv_bytes_before
    # a budget at least the length is the documented no-op fallback
    with Reducer(target="kv", scorer=KeyNorm(), budget=10_000).apply(ad) as rep2:
        out2 = ad.generate(PROMPT, max_new_tokens=4, output_logits=True, eos_token_id=None)
    _logits_close(out2.logits, ref.logits)
    assert any("nothing pruned" in n for n in rep2.notes)


RECIPES = {
    "snapkv": lambda: Reducer(target="kv", scorer=ObservationWindow(window=4), ratio=0.5),
    "h2o_capacity": lambda: Reducer(target="kv", scorer=HeavyHitter(), capacity=9, phase="both", protect=Protect(recent=3)),
    "streaming": lambda: Reducer(target="kv", scorer=SinksRecent(2, 4), capacity=7, phase="both"),
    "random_per_head": lambda: Reducer(target="kv", scorer=RandomScore(seed=1, per_kv_head=True), ratio=0.4),
    "key_norm": lambda: Reducer(target="kv", scorer=KeyNorm(), ratio=0.4),
}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("recipe", list(RECIPES))
def test_drop_equals_mask(shared_tiny, arch, recipe):
    """Physical eviction and masking the same tokens out of attention give the same logits at every step."""
    ad = shared_tiny(arch)
    outs, reps = {}, {}
    for action in ("drop", "mask"):
        red = RECIPES[recipe]()
        red.action = action
        with red.apply(ad) as rep:
            outs[action] = ad.generate(PROMPT, max_new_tokens=5, output_logits=True, eos_token_id=None)
        reps[action] = rep
    _logits_close(outs["drop"].logits, outs["mask"].logits)
    base = _plain_decode(ad, PROMPT, 5)
    # pruning did change the later steps (the test would pass trivially otherwise)
    assert max(float((a - b).abs().max()) for a, b in zip(outs["drop"].logits, base.logits, strict=True)) > 1e-3
    assert reps["drop"].physical and not reps["mask"].physical
    assert reps["drop"].kv_bytes_after < reps["drop"].kv_bytes_before
    assert reps["mask"].kv_bytes_after == reps["mask"].kv_bytes_before
    for layer, k in reps["drop"].kept.items():
        torch.testing.assert_close(k, reps["mask"].kept[layer])


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_gqa_shape_and_bytes(shared_tiny, arch):
    ad = shared_tiny(arch)
    ids = ad.encode(PROMPT).input_ids[None]
    T = ids.shape[1]
    plain, _ = kvcache.prefill(ad, {"input_ids": ids})
    with Reducer(target="kv", scorer=ObservationWindow(window=4), ratio=0.5).apply(ad) as rep:
        cache, _ = kvcache.prefill(ad, {"input_ids": ids})
    K = T // 2
    for i in range(kvcache.num_cache_layers(cache)):
        k, v = kvcache.layer_kv(cache, i)
        assert tuple(k.shape) == (1, ad.structure.num_kv_heads, K, k.shape[-1])
        assert v.shape[:3] == k.shape[:3]
    measured = sum(
        t.numel() * t.element_size() for i in range(kvcache.num_cache_layers(cache)) for t in kvcache.layer_kv(cache, i)
    )
    assert rep.kv_bytes_after == measured == cache_bytes(cache)
    assert rep.kv_bytes_before == cache_bytes(plain)
    assert rep.kv_compression == pytest.approx(1 - K / T)
    assert rep.kept_fraction() == pytest.approx(K / T)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox"])
@pytest.mark.parametrize("recipe", ["snapkv", "key_norm", "streaming"])
def test_left_padded_batch_equals_rows_alone(shared_tiny, arch, recipe):
    ad = shared_tiny(arch)
    with RECIPES[recipe]().apply(ad):
        both = ad.generate(PROMPTS, max_new_tokens=4, output_logits=True, eos_token_id=None)
    assert not bool(both.prompt.attention_mask.bool().all())
    for b, p in enumerate(PROMPTS):
        with RECIPES[recipe]().apply(ad):
            one = ad.generate(p, max_new_tokens=4, output_logits=True, eos_token_id=None)
        _logits_close([x[b : b + 1] for x in both.logits], one.logits)


@pytest.mark.parametrize("arch", ["llama", "gpt_neox", "qwen2"])
def test_rerotate_equals_fresh_prompt_of_kept_length(shared_tiny, arch):
    """One repeated token: every layer's hidden state is the same at every position, so a cache cut to K
    slots and re-rotated to 0..K-1 equals a fresh prompt of K copies (keys, values and the next logits)."""
    ad = shared_tiny(arch)
    tok = 17
    ids = torch.full((1, 12), tok)
    with Reducer(target="kv", scorer=SinksRecent(2, 3), ratio=0.5, positions="rerotate").apply(ad):
        out = ad.generate({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, max_new_tokens=3, output_logits=True, eos_token_id=None)
    ref = _plain_decode(ad, {"input_ids": ids[:, :6], "attention_mask": torch.ones(1, 6, dtype=torch.long)}, 3)
    assert out.new_tokens[0].tolist() == ref.new_tokens[0].tolist()
    _logits_close(out.logits, ref.logits)
    # without re-rotation (positions preserved) the same cut continues at position 12: different logits
    with Reducer(target="kv", scorer=SinksRecent(2, 3), ratio=0.5).apply(ad):
        pres = ad.generate({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, max_new_tokens=3, output_logits=True, eos_token_id=None)
    assert float((pres.logits[1] - out.logits[1]).abs().max()) > (1e-4 if arch != "gpt_neox" else 1e-5)  # partial rotary: smaller


def test_rerotate_refused_without_rope(shared_tiny):
    with pytest.raises(ValueError, match="rotary"):
        with Reducer(target="kv", scorer=KeyNorm(), ratio=0.5, positions="rerotate").apply(shared_tiny("gpt2")):
            pass


def test_capacity_bounds_the_cache_while_decoding(shared_tiny):
    ad = shared_tiny("llama")
    with presets.streaming_llm(capacity=8, n_sink=2).apply(ad) as rep:
        ad.generate(PROMPT, max_new_tokens=10, eos_token_id=None)
    for k in rep.kept.values():
        assert int(k.max()) <= 8
    assert rep.kv_compression > 0.5
    decode_events = [e for e in rep.events if e["phase"] == "decode"]
    assert decode_events and all(e["after"] <= 8 for e in decode_events)


def test_streaming_keeps_sinks_and_recent(shared_tiny):
    ad = shared_tiny("llama")
    ids = ad.encode(PROMPT).input_ids[None]
    T = ids.shape[1]
    with presets.streaming_llm(ratio=0.5, n_sink=3).apply(ad):
        cache, _ = kvcache.prefill(ad, {"input_ids": ids})
    cols = kvcache.stored_positions(cache, 0)[0, 0].tolist()
    K = T // 2
    assert cols == list(range(3)) + list(range(T - (K - 3), T))


def test_h2o_accumulates_attention(shared_tiny):
    """At prefill, H2O's score of key j is Σ_q A[h, q, j] summed over the heads of each KV group."""
    ad = shared_tiny("llama")
    ids = ad.encode(PROMPT).input_ids[None]
    with ad.capture_attention(layers=[0]) as att:
        ad.forward({"input_ids": ids})
    A = att[0]  # [1, H, T, T]
    Hkv = ad.structure.num_kv_heads
    expect = A.sum(2).view(1, Hkv, -1, A.shape[-1]).sum(2)  # [1, Hkv, T]
    with Reducer(target="kv", scorer=HeavyHitter(), ratio=0.5, layers=[0]).apply(ad):
        cache, _ = kvcache.prefill(ad, {"input_ids": ids})
    K = ids.shape[1] // 2
    kept = kvcache.stored_positions(cache, 0)[0]  # [Hkv, K]
    want = torch.sort(torch.topk(expect[0], K, -1).indices, -1).values
    assert kept.tolist() == want.tolist()


def test_protected_span_survives(shared_tiny):
    ad = shared_tiny("llama")
    enc = ad.encode(["Context: " + PROMPT, ts.models.Slot("question", " Where did the fox go?")])
    batch = ad.as_batch(enc)
    q = batch.mask("question")
    with Reducer(target="kv", scorer=RandomScore(seed=3), ratio=0.6, protect=Protect(spans=("question",))).apply(
        ad, spans={"question": q}
    ):
        cache, _ = kvcache.prefill(ad, batch)
    cols = set(kvcache.stored_positions(cache, 0)[0, 0].tolist())
    assert set(q[0].nonzero().flatten().tolist()) <= cols


@pytest.mark.parametrize("arch", ARCHS)
def test_every_kv_preset_runs(shared_tiny, arch):
    ad = shared_tiny(arch)
    recipes = [
        presets.snapkv(ratio=0.5, window=4),
        presets.pyramidkv(ratio=0.5, window=4),
        presets.streaming_llm(capacity=8, n_sink=2),
        presets.streaming_llm(ratio=0.5),
        presets.sepllm(capacity=10, window=4),
        presets.h2o(capacity=9, recent=3),
        presets.key_norm(ratio=0.5),
        presets.random(ratio=0.5),
    ]
    for red in recipes:
        with red.apply(ad) as rep:
            out = ad.generate(PROMPT, max_new_tokens=3, eos_token_id=None)
        assert len(out.new_tokens[0]) == 3
        assert rep.physical and rep.kv_bytes_after < rep.kv_bytes_before, red.name


def test_model_unchanged_outside_block(shared_tiny):
    ad = shared_tiny("llama")
    impl = ad.model.config._attn_implementation
    n_hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in ad.model.modules())
    ref = _plain_decode(ad, PROMPT, 3)
    with pytest.raises(RuntimeError, match="boom"):
        with presets.snapkv(ratio=0.5, window=4).apply(ad):
            assert "generate" in ad.__dict__
            raise RuntimeError("boom")
    with presets.h2o(capacity=8).apply(ad):
        ad.generate(PROMPT, max_new_tokens=2)
    assert "generate" not in ad.__dict__
    assert ad.model.config._attn_implementation == impl
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in ad.model.modules()) == n_hooks
    _logits_close(_plain_decode(ad, PROMPT, 3).logits, ref.logits)


def test_bad_input(shared_tiny):
    ad = shared_tiny("llama")
    for bad in (1.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match=r"\[0, 1\)"):
            Reducer(target="kv", scorer=KeyNorm(), ratio=bad)
    with pytest.raises(ValueError, match="budget"):
        Reducer(target="kv", scorer=KeyNorm(), budget=0)
    with pytest.raises(ValueError, match="capacity"):
        Reducer(target="kv", scorer=KeyNorm(), ratio=0.5, phase="decode")
    with pytest.raises(ValueError, match="ratio="):
        Reducer(target="kv", scorer=KeyNorm())
    with pytest.raises(ValueError, match="target"):
        Reducer(target="weights", scorer=KeyNorm(), ratio=0.5)
    with pytest.raises(ValueError, match="unknown scorer"):
        Reducer(target="kv", scorer="nope", ratio=0.5)
    with pytest.raises(ValueError, match="preserve"):
        Reducer(target="kv", scorer=KeyNorm(), ratio=0.5, action="mask", positions="rerotate")
    with pytest.raises(TypeError, match="num_beams"):
        with presets.key_norm().apply(ad):
            ad.generate(PROMPT, max_new_tokens=2, num_beams=2)
    # a scorer that needs attention probabilities on a kernel that has none
    ad2 = ts.tiny("llama")
    ad2.model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="attention probabilities"):
        with presets.snapkv().apply(ad2):
            pass
    with pytest.raises(ValueError, match="encoder"):
        with presets.key_norm().apply(shared_tiny("bert")):
            pass


@pytest.mark.parametrize("arch", ARCHS)
def test_every_hidden_preset_runs(shared_tiny, arch):
    """FastV / PyramidDrop through the Reducer: the forward and generate agree on the first token, and the
    report counts fewer tokens after the stage."""
    ad = shared_tiny(arch)
    for red in (presets.fastv(k=1, ratio=0.5), presets.pyramid_drop(ratio=0.5)):
        out = red.forward(ad, PROMPT)
        with red.apply(ad) as rep:
            gen = ad.generate(PROMPT, max_new_tokens=2, eos_token_id=None)
        assert int(gen.new_tokens[0][0]) == int(out.logits[0].argmax())
        assert rep.physical and rep.flops_ratio is not None and rep.flops_ratio < 1.0
        kept = {k: float(v.float().mean()) for k, v in rep.kept.items()}
        assert kept[max(kept)] < kept[min(kept)]


def test_encoder_and_prompt_targets(shared_tiny):
    from tokensmith.pruning import compress

    bert = shared_tiny("bert")
    texts = ["a short sentence about cats and dogs", "another one"]
    plain = bert.sentence_embedding(texts)
    with Reducer(target="encoder", r=0).apply(bert) as rep0:
        same = bert.sentence_embedding(texts)
    torch.testing.assert_close(same, plain, rtol=0, atol=1e-5)
    with Reducer(target="encoder", r=2).apply(bert) as rep:
        merged = bert.sentence_embedding(texts)
    assert rep.physical and rep.action == "merge" and rep0.action == "merge"
    assert merged.shape == plain.shape and float((merged - plain).abs().max()) > 1e-4
    ad = shared_tiny("llama")
    red = Reducer(target="prompt", ratio=0.5)
    assert red.compress(ad, PROMPT).text == compress(PROMPT, ad, rate=0.5).text
    with pytest.raises(ValueError, match="compress"):
        with red.apply(ad):
            pass
    with pytest.raises(ValueError, match="r="):
        Reducer(target="encoder")
    with pytest.raises(ValueError, match="ratio="):
        Reducer(target="prompt")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_continuation_logprobs_protocol(shared_tiny, arch):
    """Unpruned (and ratio 0) equals token_logprobs of context+continuation; drop equals mask."""
    from tokensmith.pruning.evaluate import continuation_logprobs

    ad = shared_tiny(arch)
    ctx, cont = PROMPT, " and it never came back to the village again"
    ids = ad.tokenizer(ctx + cont, add_special_tokens=False).input_ids
    n = len(ids) - len(continuation_logprobs(ad, None, ctx, cont))
    tm = torch.zeros(1, len(ids), dtype=torch.bool)
    tm[0, n:] = True
    ref = ad.token_logprobs({"input_ids": torch.tensor([ids])}, target_mask=tm)[0, n:]
    for red in (None, Reducer(target="kv", scorer=KeyNorm(), ratio=0.0)):
        torch.testing.assert_close(continuation_logprobs(ad, red, ctx, cont), ref.float(), rtol=0, atol=1e-4)
    drop = continuation_logprobs(ad, presets.snapkv(ratio=0.5, window=4), ctx, cont)
    mask = continuation_logprobs(ad, presets.snapkv(ratio=0.5, window=4, action="mask"), ctx, cont)
    torch.testing.assert_close(drop, mask, rtol=0, atol=1e-4)
    assert float((drop - ref).abs().max()) > 1e-3
