"""Re-rotating cached keys (rerotate.py) against keys computed from scratch at the new positions.

Which equalities hold exactly (up to fp32 rounding):

1. Layer 0, any tokens: a layer-0 pre-RoPE key depends only on its own token, so the compacted cache's
   layer-0 keys equal a fresh prefill of the kept tokens at positions 0..n-1 (per row and KV head).
2. Every layer, one repeated token: all hidden states are equal across positions (attention averages
   identical values), so every layer's keys of the compacted cache equal a fresh prefill of n copies.
3. Every layer, any tokens, dropping a *prefix*: RoPE scores depend only on p_q − p_k, so decoding at
   position n from the compacted cache equals decoding at the original position from the evicted cache.
   This checks the bookkeeping too (kvcache.extend continues at the returned next position).

Tolerances: keys and logits of a 2-layer, 64-wide fp32 model carry a few ulps of relative error per op; we
allow 64·eps32·max|x| (~8e-6 relative) for keys and 2e-5·max|logit| for logits (as test_kvcache). Every
check is paired with the same comparison without rerotation, which is off by O(1).
"""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

import tokensmith as ts
from tokensmith.models import kvcache
from tokensmith.models.rerotate import (
    RotaryLayout,
    rerotate_cache,
    rotary_layouts,
    rotary_tables,
    rotate_keys,
)

pytestmark = pytest.mark.usefixtures("torch_one_thread")

ROPE_ARCHS = ["llama", "qwen2", "gemma3", "gpt_neox"]
EPS = torch.finfo(torch.float32).eps


def _ktol(ref: torch.Tensor) -> dict:
    return dict(atol=64 * EPS * float(ref.detach().abs().max()), rtol=0)


def _ltol(ref: torch.Tensor) -> dict:
    return dict(atol=2e-5 * float(ref.abs().max()), rtol=0)


def _keys(cache, i):
    return kvcache.layer_kv(cache, i)[0]


def _random_keep(g, B, H, T, K):
    return torch.stack(
        [torch.stack([torch.randperm(T, generator=g)[:K].sort().values for _ in range(H)]) for _ in range(B)]
    )


@pytest.mark.parametrize("arch", ROPE_ARCHS)
def test_repeated_token_all_layers_equal_fresh_prefill(shared_tiny, arch):
    """Per-row, per-KV-head random eviction, then compaction: every layer's keys equal a fresh prefill of n
    copies of the row's token at 0..n-1 (gemma3: the sliding layer keeps its last n slots)."""
    ad = shared_tiny(arch)
    lay = rotary_layouts(ad)
    hd = ad.structure.head_dim
    # rotary dims measured = the config's (GPT-NeoX: rotary_pct = 0.25 of the head)
    frac = (
        ad.config.rope_parameters.get("partial_rotary_factor", 1.0)
        if hasattr(ad.config, "rope_parameters")
        else 1.0
    )
    assert all(v == RotaryLayout(int(hd * frac), "half", 1) for v in lay.values()), lay
    g = torch.Generator().manual_seed(0)
    B, T, n = 2, 12, 6
    tok = torch.tensor([[101], [2050]])
    cache, _ = kvcache.prefill(ad, {"input_ids": tok.expand(B, T)})
    L = kvcache.num_cache_layers(cache)
    full = [i for i in range(L) if kvcache.layer_kind(cache, i) == "full"]
    Hkv = _keys(cache, full[0]).shape[1]
    kvcache.evict(cache, {i: _random_keep(g, B, Hkv, T, n) for i in full})
    evicted = {i: _keys(cache, i).clone() for i in full}
    res = rerotate_cache(ad, cache)
    assert res.next_position.tolist() == [n, n] and res.attention_mask is None
    fresh, _ = kvcache.prefill(ad, {"input_ids": tok.expand(B, n)})
    for i in range(L):
        ref = _keys(fresh, i)
        assert _keys(cache, i).shape == ref.shape
        assert torch.equal(kvcache.stored_positions(cache, i), kvcache.stored_positions(fresh, i))
        assert_close(_keys(cache, i), ref, **_ktol(ref))
    for i in full:  # the test can fail: the evicted keys before rerotation are far off
        assert (evicted[i] - _keys(fresh, i)).abs().max() > 1000 * _ktol(_keys(fresh, i))["atol"]


@pytest.mark.parametrize("arch", ROPE_ARCHS)
def test_layer0_random_tokens_per_head_equal_prefill_of_kept_tokens(arch):
    """Random tokens, different kept columns per row and KV head: the layer-0 keys of head h in row b equal
    the layer-0 keys of a fresh prefill of that head's kept tokens. (gemma3 with one layer: its layer 0 is a
    full-attention layer; in the 2-layer tiny it is a sliding layer, which cannot evict in-window tokens.)"""
    ad = ts.tiny(arch, n_layers=1)
    assert kvcache.layer_kind(kvcache.prefill(ad, {"input_ids": torch.tensor([[5, 6]])})[0], 0) == "full"
    g = torch.Generator().manual_seed(1)
    B, T, n = 2, 10, 5
    ids = torch.randint(10, 2000, (B, T), generator=g)
    cache, _ = kvcache.prefill(ad, {"input_ids": ids})
    Hkv = _keys(cache, 0).shape[1]
    keep = _random_keep(g, B, Hkv, T, n)
    assert not torch.equal(keep[:, 0], keep[:, -1]) or Hkv == 1
    kvcache.evict(cache, keep)
    before = _keys(cache, 0).clone()
    rerotate_cache(ad, cache)
    got = _keys(cache, 0)
    for b in range(B):
        for h in range(Hkv):
            fresh, _ = kvcache.prefill(ad, {"input_ids": ids[b, keep[b, h]][None]})
            ref = _keys(fresh, 0)[0, h]
            assert_close(got[b, h], ref, **_ktol(ref))
            if bool((keep[b, h] != torch.arange(n)).any()):
                assert (before[b, h] - ref).abs().max() > 1000 * _ktol(ref)["atol"]


def _decode(ad, cache, tok, position):
    name = "cache" if "cache" in ad._fwd_params else "past_key_values"
    B = tok.shape[0]
    with torch.no_grad():
        out = ad.model(
            input_ids=tok, position_ids=torch.full((B, 1), position), use_cache=True, **{name: cache}
        )
    return out.logits[:, -1]


def _check_prefix_drop(ad, with_generate: bool) -> None:
    g = torch.Generator().manual_seed(2)
    B, T, k = 2, 24, 6
    ids = torch.randint(10, 2000, (B, T), generator=g)
    new = torch.randint(10, 2000, (B, 2), generator=g)
    keep = torch.arange(k, T).expand(B, T - k)

    def evicted():
        with torch.no_grad():
            c, _ = kvcache.prefill(ad, {"input_ids": ids})
        return kvcache.evict(c, keep, sliding="skip")

    ref_cache = evicted()
    ref = [_decode(ad, ref_cache, new[:, j : j + 1], T + j) for j in range(2)]
    cache = evicted()
    res = rerotate_cache(ad, cache)
    N = T - k
    assert res.next_position.tolist() == [N] * B
    for i in range(kvcache.num_cache_layers(cache)):
        held = _keys(cache, i).shape[2]
        assert torch.equal(kvcache.stored_positions(cache, i)[0, 0], torch.arange(N - held, N))
    with torch.no_grad():
        got = [kvcache.extend(ad, cache, N + j, new[:, j : j + 1]).logits[:, -1] for j in range(2)]
    for a, r in zip(got, ref, strict=True):
        assert_close(a, r, **_ltol(r))
    if with_generate:  # HF generate continues from a compacted cache on its own (kept ids ⊕ new token)
        cache = evicted()
        rerotate_cache(ad, cache)
        steps: list[torch.Tensor] = []
        h = ad.model.register_forward_hook(lambda m, a, o: steps.append(o.logits[:, -1]))
        try:
            seq = torch.cat([ids[:, k:], new[:, :1]], 1)
            ad.model.generate(
                input_ids=seq,
                attention_mask=torch.ones_like(seq),
                cache=cache,
                max_new_tokens=2,
                min_new_tokens=2,
                do_sample=False,
                pad_token_id=ad.pad_token_id,
            )
        finally:
            h.remove()
        assert_close(steps[0], ref[0], **_ltol(ref[0]))
    # 'reindex' without rerotation (continue at N with the keys as they were) is far off
    wrong = _decode(ad, evicted(), new[:, :1], N)
    assert (wrong - ref[0]).abs().max() > 10 * _ltol(ref[0])["atol"]


@pytest.mark.parametrize("arch", ROPE_ARCHS)
def test_dropping_a_prefix_decodes_as_the_original_positions(shared_tiny, arch):
    """Drop the first 6 of 24 columns in the full-attention layers (gemma3: its sliding layer holds the last 15
    columns either way), compact to 0..17 and decode two tokens with kvcache.extend at 18, 19: equals the
    evicted cache decoded at the original positions 24, 25 (RoPE is relative). HF generate from the compacted
    cache gives the same first step."""
    _check_prefix_drop(shared_tiny(arch), with_generate=True)


def _other_convention(name: str):
    from transformers import CohereConfig, CohereForCausalLM, GPTJConfig, GPTJForCausalLM

    from tokensmith.models.zoo import smollm2_tokenizer

    tok = smollm2_tokenizer(copy=True)
    ids = dict(pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        if name == "cohere":
            model = CohereForCausalLM(
                CohereConfig(
                    vocab_size=len(tok),
                    hidden_size=64,
                    intermediate_size=128,
                    num_hidden_layers=2,
                    num_attention_heads=4,
                    num_key_value_heads=2,
                    max_position_embeddings=1024,
                    **ids,
                )
            )
        else:
            model = GPTJForCausalLM(
                GPTJConfig(
                    vocab_size=len(tok), n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=1024, **ids
                )
            )
    return ts.ModelAdapter(model.eval(), tok)


@pytest.mark.parametrize(
    "name, layout",
    [
        ("cohere", RotaryLayout(16, "interleaved")),  # repeat_interleave'd tables, planes (2i, 2i+1)
        ("gptj", RotaryLayout(8, "interleaved", per_plane=True, sin_first=True)),  # (sin, cos), r/2 columns
        ("llama-yarn", RotaryLayout(16, "half")),  # YaRN: tables scaled by sigma != 1
    ],
)
def test_other_rotary_conventions_are_measured(name, layout):
    """The layout is measured, not looked up: Cohere's interleaved planes, GPT-J's (sin, cos) per-plane
    tables with partial rotary, and Llama with YaRN scaling (sigma = 1.14) all decode after compaction as
    at their original positions."""
    if name == "llama-yarn":
        ad = ts.tiny(
            "llama",
            rope_parameters={
                "rope_type": "yarn",
                "factor": 4.0,
                "rope_theta": 10000.0,
                "original_max_position_embeddings": 256,
            },
        )
        assert ad.model.model.rotary_emb.attention_scaling > 1.1
    else:
        ad = _other_convention(name)
    assert set(rotary_layouts(ad).values()) == {layout}
    _check_prefix_drop(ad, with_generate=False)


@pytest.mark.parametrize("arch", ["llama", "gpt_neox"])
def test_left_padded_batch_compacts_each_row_to_its_real_tokens(shared_tiny, arch):
    """A left-padded batch (row 1 has 3 pad columns) keeps 7 slots per row, pads included: compact with the
    prompt mask gives each row positions 0..r_b-1, the slot mask and next positions [7, 4]; the decode equals
    each row alone, evicted to the same real tokens and decoded at its original next position."""
    ad = shared_tiny(arch)
    g = torch.Generator().manual_seed(3)
    rows = [torch.randint(10, 2000, (10,), generator=g), torch.randint(10, 2000, (7,), generator=g)]
    nxt = torch.randint(10, 2000, (2, 1), generator=g)
    ids = torch.stack([rows[0], torch.cat([torch.full((3,), ad.pad_token_id), rows[1]])])
    mask = torch.tensor([[1] * 10, [0] * 3 + [1] * 7])
    cache, _ = kvcache.prefill(ad, {"input_ids": ids, "attention_mask": mask})
    keep = torch.tensor([list(range(3, 10)), [0, 1, 2, 6, 7, 8, 9]])  # row 1: 3 pads + its last 4 tokens
    kvcache.evict(cache, keep)
    res = rerotate_cache(ad, cache, attention_mask=mask)
    assert res.next_position.tolist() == [7, 4]
    assert res.attention_mask.tolist() == [[1] * 7, [0, 0, 0, 1, 1, 1, 1]]
    am = torch.cat([res.attention_mask, torch.ones(2, 1, dtype=torch.long)], 1)
    with torch.no_grad():
        got = ad.model(
            input_ids=nxt,
            attention_mask=am,
            position_ids=res.next_position[:, None],
            cache=cache,
            use_cache=True,
        ).logits[:, -1]
    for b, (row, kept) in enumerate([(rows[0], torch.arange(3, 10)), (rows[1], torch.arange(3, 7))]):
        c, _ = kvcache.prefill(ad, {"input_ids": row[None]})
        kvcache.evict(c, kept[None])
        with torch.no_grad():
            ref = ad.model(
                input_ids=nxt[b : b + 1], position_ids=torch.tensor([[len(row)]]), cache=c, use_cache=True
            ).logits[:, -1]
        assert_close(got[b : b + 1], ref, **_ltol(ref))


def test_explicit_positions_shift_and_errors(shared_tiny):
    """Explicit positions: shifting every key by +5 and decoding at T+5 equals the untouched cache at T;
    stored positions report the new ones. Errors: gpt2 (learned positions) names the policies available;
    sliding layers refuse explicit positions; hybrid caches refuse a padding mask; bad shapes."""
    ad = shared_tiny("llama")
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(10, 2000, (1, 8), generator=g)
    nxt = torch.randint(10, 2000, (1, 1), generator=g)
    base, _ = kvcache.prefill(ad, {"input_ids": ids})
    with torch.no_grad():
        ref = ad.model(input_ids=nxt, cache=base, use_cache=True).logits[:, -1]
    cache, _ = kvcache.prefill(ad, {"input_ids": ids})
    res = rerotate_cache(ad, cache, torch.arange(5, 13)[None])
    assert res.next_position.tolist() == [13]
    assert kvcache.stored_positions(cache, 0)[0, 0].tolist() == list(range(5, 13))
    with torch.no_grad():
        got = ad.model(input_ids=nxt, position_ids=torch.tensor([[13]]), cache=cache, use_cache=True).logits[
            :, -1
        ]
    assert_close(got, ref, **_ltol(ref))
    with pytest.raises(ValueError, match=r"\[B=1, n=9\]"):
        rerotate_cache(ad, cache, torch.arange(4)[None])
    with pytest.raises(TypeError, match="integers"):
        rerotate_cache(ad, cache, torch.zeros(1, 8))

    gpt2 = shared_tiny("gpt2")
    c2, _ = kvcache.prefill(gpt2, {"input_ids": ids})
    with pytest.raises(ValueError, match="learned absolute position table.*'preserve'.*'reindex'"):
        rerotate_cache(gpt2, c2)

    gem = shared_tiny("gemma3")
    c3, _ = kvcache.prefill(gem, {"input_ids": ids})
    with pytest.raises(ValueError, match="sliding-window layer"):
        rerotate_cache(gem, c3, torch.arange(2, 10)[None])
    with pytest.raises(ValueError, match="full-attention caches only"):
        rerotate_cache(gem, c3, attention_mask=torch.ones(1, 8))
    rerotate_cache(gem, c3, {1: torch.arange(2, 10)[None]})  # full layer only: fine
    assert kvcache.stored_positions(c3, 1)[0, 0].tolist() == list(range(2, 10))


def test_rotate_keys_composes_and_inverts():
    """rotate_keys on a synthetic table: p -> q -> p is the identity, p -> q -> r equals p -> r, the
    pass-through dims never change, and interleaved planes rotate (2i, 2i+1)."""
    g = torch.Generator().manual_seed(5)
    pos = torch.arange(0, 40)
    inv = 1.0 / (10000 ** (torch.arange(0, 4).float() / 4))
    ang = pos[:, None].float() * inv  # [P, 4]
    for pairing, cos, sin in [
        ("half", torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()),
        ("interleaved", ang.repeat_interleave(2, -1).cos(), ang.repeat_interleave(2, -1).sin()),
    ]:
        lay = RotaryLayout(8, pairing)  # type: ignore[arg-type]
        k = torch.randn(2, 3, 12, generator=g, dtype=torch.float64).float()
        p, q, r = (torch.randint(0, 40, (2, 3), generator=g) for _ in range(3))
        t = (cos * 1.5, sin * 1.5)  # a YaRN-style sigma cancels
        kq = rotate_keys(k, p, q, t, pos, lay)
        assert_close(rotate_keys(kq, q, p, t, pos, lay), k, atol=1e-5, rtol=0)
        assert_close(rotate_keys(kq, q, r, t, pos, lay), rotate_keys(k, p, r, t, pos, lay), atol=1e-5, rtol=0)
        assert torch.equal(kq[..., 8:], k[..., 8:])
        i1, i2 = lay.planes()
        norm = (k[..., i1] ** 2 + k[..., i2] ** 2).sqrt()
        assert_close((kq[..., i1] ** 2 + kq[..., i2] ** 2).sqrt(), norm, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="contain every"):
        rotate_keys(k, torch.full((2, 3), 50), p, t, pos, lay)


def test_rotary_tables_follow_layer_types(shared_tiny):
    """Gemma-3's sliding and full layers get different RoPE bases: the tables the layers receive differ, and
    each matches cos/sin of p·θ for its own base (read from the config: an independent formula)."""
    ad = shared_tiny("gemma3")
    pos = torch.tensor([0, 3, 100])
    tab = rotary_tables(ad, pos)
    hd = ad.structure.head_dim
    for i, lt in enumerate(ad.config.layer_types):
        base = ad.config.rope_parameters[lt]["rope_theta"]
        inv = 1.0 / (base ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
        ang = pos[:, None].double() * inv
        assert_close(tab[i][0].double(), torch.cat([ang, ang], -1).cos(), atol=1e-5, rtol=0)
        assert_close(tab[i][1].double(), torch.cat([ang, ang], -1).sin(), atol=1e-5, rtol=0)
    assert (tab[0][1] - tab[1][1]).abs().max() > 0.1
