"""KV-cache access and eviction (kvcache.py): per-KV-head eviction on full, sliding and hybrid caches equals
the full-cache forward with the evicted (layer, kv-head, column) entries masked out.

The reference runs the same weights in float64 through an attention function registered in transformers'
``AttentionInterface`` that ANDs a per-(layer, kv-head, query-row, key-column) mask into the model's own
(causal / sliding-window) mask, and recomputes the whole sequence without a cache. The evicted fp32
decode must match it to fp32 accuracy: logits of a 2-layer, 64-wide model accumulate ~sqrt(L·d)·eps32
relative error (~1.4e-6), so we allow 2e-5 x the logit scale; wrong eviction moves logits by >1e-2.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.testing import assert_close

from tokensmith.models import kvcache
from tokensmith.models.tiny import GEMMA3_SLIDING_WINDOW

pytestmark = pytest.mark.usefixtures("torch_one_thread")

_REF_IMPL = "tokensmith_test_kv_reference"
# layer_idx -> bool [B, H_kv, Tq, Tk]: entries a query row may attend to, on top of the model's own mask
_HEAD_MASK: dict[int, torch.Tensor] = {}


def _reference_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, softcap=None, **kw):
    B, H, Tq, d = query.shape
    n_rep = H // key.shape[1]
    k = key.repeat_interleave(n_rep, 1)
    v = value.repeat_interleave(n_rep, 1)
    scores = (query @ k.transpose(-1, -2)) * (scaling if scaling is not None else d**-0.5)
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    Tk = k.shape[2]
    if attention_mask is None:
        allowed = torch.ones(Tq, Tk, dtype=torch.bool, device=query.device).tril(Tk - Tq)
    elif attention_mask.dtype == torch.bool:
        allowed = attention_mask[..., :Tk]
    else:
        allowed = attention_mask[..., :Tk] == 0
    allowed = allowed.expand(B, H, Tq, Tk)
    extra = _HEAD_MASK.get(module.layer_idx)
    if extra is not None:
        allowed = allowed & extra.repeat_interleave(n_rep, 1)[:, :, -Tq:, :Tk]
    probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1)
    return (probs @ v).transpose(1, 2).contiguous(), probs


def _reference_model(ad):
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(_REF_IMPL, _reference_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(_REF_IMPL, sdpa_mask)
    ref = copy.deepcopy(ad.model).double()
    ref.config._attn_implementation = _REF_IMPL
    return ref


def _reference_logits(ref, ids, masks):
    _HEAD_MASK.clear()
    _HEAD_MASK.update(masks)
    try:
        with torch.no_grad():
            return ref(input_ids=ids).logits
    finally:
        _HEAD_MASK.clear()


def _decode(ad, cache, tok, position):
    B = tok.shape[0]
    with torch.no_grad():
        out = ad.model(input_ids=tok, position_ids=torch.full((B, 1), position), attention_mask=None,
                       cache=cache, use_cache=True)
    return out.logits[:, -1]


def _random_keep(g, B, H, candidates, K):
    """[B, H, K] distinct sorted columns drawn from ``candidates`` (a list), different per row and head."""
    c = torch.as_tensor(candidates)
    return torch.stack([
        torch.stack([c[torch.randperm(len(c), generator=g)[:K]].sort().values for _ in range(H)]) for _ in range(B)
    ])


def _row_mask(masks, layer, row, keep):
    """Allow query row ``row`` of ``layer`` to see only the columns in ``keep`` [B, H_kv, K] (+ itself)."""
    m = masks[layer]
    m[:, :, row] = False
    m[:, :, row].scatter_(-1, keep, True)
    m[:, :, row, row] = True


def _tol(ref):
    return dict(atol=2e-5 * float(ref.abs().max()), rtol=0)


def test_per_head_eviction_matches_masked_reference_gqa(shared_tiny):
    """Llama GQA (4 query / 2 KV heads): evict different columns per layer, row and KV head, decode, evict
    again by absolute column (including the decoded token), decode again: equals the masked reference."""
    ad = shared_tiny("llama")
    s = ad.structure
    Hkv = s.num_kv_heads
    assert (s.num_heads, Hkv) == (4, 2)
    g = torch.Generator().manual_seed(0)
    B, T = 2, 10
    ids = torch.randint(10, 2000, (B, T), generator=g)
    new = torch.randint(10, 2000, (B, 2), generator=g)
    full = torch.cat([ids, new], 1)
    cache, _ = kvcache.prefill(ad, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    assert kvcache.cache_kind(cache) == "dynamic"
    keep1 = {layer: _random_keep(g, B, Hkv, list(range(T)), 6) for layer in range(s.num_layers)}
    assert not torch.equal(keep1[0][:, 0], keep1[0][:, 1])  # the heads really differ
    kvcache.evict(cache, keep1)
    for layer in range(s.num_layers):
        k, v = kvcache.layer_kv(cache, layer)
        assert k.shape == v.shape == (B, Hkv, 6, s.head_dim)
        assert torch.equal(kvcache.stored_positions(cache, layer), keep1[layer])
    step1 = _decode(ad, cache, new[:, :1], T)
    # second eviction by absolute column: 5 of the 7 columns each head holds now (6 kept + the new token T)
    keep2 = {}
    for layer in range(s.num_layers):
        held = kvcache.stored_positions(cache, layer)
        assert torch.equal(held[..., -1], torch.full((B, Hkv), T))
        pick = torch.stack([torch.stack([torch.randperm(7, generator=g)[:5].sort().values for _ in range(Hkv)])
                            for _ in range(B)])
        keep2[layer] = held.gather(-1, pick)
    kvcache.evict(cache, keep2)
    step2 = _decode(ad, cache, new[:, 1:], T + 1)

    ref_model = _reference_model(ad)
    masks = {layer: torch.ones(B, Hkv, T + 2, T + 2, dtype=torch.bool) for layer in range(s.num_layers)}
    for layer in range(s.num_layers):
        _row_mask(masks, layer, T, keep1[layer])
        _row_mask(masks, layer, T + 1, keep2[layer])
    ref = _reference_logits(ref_model, full, masks)
    assert_close(step1.double(), ref[:, T], **_tol(ref))
    assert_close(step2.double(), ref[:, T + 1], **_tol(ref))
    # the test can fail: without the eviction masks the reference is far away
    unmasked = _reference_logits(ref_model, full, {})
    assert (unmasked[:, T] - step1.double()).abs().max() > 100 * _tol(ref)["atol"]


def test_eviction_on_gemma3_hybrid_sliding_cache(shared_tiny):
    """Gemma-3 (layer 0 sliding window W=16, layer 1 full): absolute columns map to each layer's stored
    columns; tokens outside the window are simply not there; in-window eviction is refused by default and
    skipped with sliding='skip'. Both decodes equal the masked reference (sliding mask from the model)."""
    ad = shared_tiny("gemma3")
    W = GEMMA3_SLIDING_WINDOW
    assert ad.config.layer_types == ["sliding_attention", "full_attention"]
    Hkv = ad.structure.num_kv_heads
    g = torch.Generator().manual_seed(1)
    B, T = 2, 24
    ids = torch.randint(10, 2000, (B, T), generator=g)
    new = torch.randint(10, 2000, (B, 2), generator=g)
    full = torch.cat([ids, new], 1)
    ref_model = _reference_model(ad)

    cache, _ = kvcache.prefill(ad, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    assert kvcache.cache_kind(cache) == "hybrid"
    assert [kvcache.layer_kind(cache, i) for i in range(2)] == ["sliding", "full"]
    window = list(range(T - W + 1, T))  # the W-1 columns the sliding layer holds
    assert torch.equal(kvcache.stored_positions(cache, 0)[0, 0], torch.tensor(window))
    k0, v0 = (t.clone() for t in kvcache.layer_kv(cache, 0))
    # keep the window + 3 older columns, different per row and head: a no-op for layer 0 (the older
    # columns are not there), a per-head eviction for layer 1
    older = _random_keep(g, B, Hkv, list(range(T - W + 1)), 3)
    keep = torch.cat([older, torch.tensor(window).expand(B, Hkv, -1)], -1)
    kvcache.evict(cache, keep)
    assert torch.equal(kvcache.layer_kv(cache, 0)[0], k0) and torch.equal(kvcache.layer_kv(cache, 0)[1], v0)
    assert kvcache.layer_kv(cache, 1)[0].shape[2] == len(window) + 3
    assert cache.layers[0].cumulative_length == T  # the window's placement is untouched
    steps = [_decode(ad, cache, new[:, :1], T), _decode(ad, cache, new[:, 1:], T + 1)]
    masks = {1: torch.ones(B, Hkv, T + 2, T + 2, dtype=torch.bool)}
    _row_mask(masks, 1, T, keep)
    _row_mask(masks, 1, T + 1, torch.cat([keep, torch.full((B, Hkv, 1), T)], -1))
    ref = _reference_logits(ref_model, full, masks)
    assert_close(steps[0].double(), ref[:, T], **_tol(ref))
    assert_close(steps[1].double(), ref[:, T + 1], **_tol(ref))
    unmasked = _reference_logits(ref_model, full, {})
    assert (unmasked[:, T] - steps[0].double()).abs().max() > 100 * _tol(ref)["atol"]

    # evicting inside the window: refused (cache untouched), or applied to full layers only with 'skip'
    cache, _ = kvcache.prefill(ad, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    keep = _random_keep(g, B, Hkv, list(range(T)), 12)
    k1 = kvcache.layer_kv(cache, 1)[0].clone()
    with pytest.raises(ValueError, match="sliding-window layer.*sliding='skip'"):
        kvcache.evict(cache, keep)
    assert torch.equal(kvcache.layer_kv(cache, 1)[0], k1)
    kvcache.evict(cache, keep, sliding="skip")
    assert kvcache.layer_kv(cache, 0)[0].shape[2] == W - 1 and kvcache.layer_kv(cache, 1)[0].shape[2] == 12
    step = _decode(ad, cache, new[:, :1], T)
    masks = {1: torch.ones(B, Hkv, T + 1, T + 1, dtype=torch.bool)}
    _row_mask(masks, 1, T, keep)
    ref = _reference_logits(ref_model, full[:, : T + 1], masks)
    assert_close(step.double(), ref[:, T], **_tol(ref))


def test_set_layer_kv_bookkeeping_and_errors(shared_tiny):
    ad = shared_tiny("gemma3")
    ids = torch.randint(10, 2000, (1, 20), generator=torch.Generator().manual_seed(2))
    cache, _ = kvcache.prefill(ad, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    k, v = kvcache.layer_kv(cache, 0)
    with pytest.raises(ValueError, match="cannot shrink"):
        kvcache.set_layer_kv(cache, 0, k[:, :, 1:], v[:, :, 1:])
    kvcache.set_layer_kv(cache, 0, k * 1, v * 1)  # same length: allowed, window placement unchanged
    assert cache.layers[0].cumulative_length == 20
    k1, v1 = kvcache.layer_kv(cache, 1)
    kvcache.set_layer_kv(cache, 1, k1[:, :, 5:], v1[:, :, 5:], positions=torch.arange(5, 20).expand(1, 2, 15))
    assert cache.get_seq_length(1) == 15  # the layer's own length: the next call must pass position_ids
    kvcache.evict(cache, {1: torch.tensor([[7, 19]])})
    assert kvcache.stored_positions(cache, 1).tolist() == [[[7, 19], [7, 19]]]
    with pytest.raises(ValueError, match=r"\[B=1, K\] or \[B, H_kv=2, K\]"):
        kvcache.evict(cache, torch.zeros(1, 3, 2, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="different numbers"):
        kvcache.evict(cache, {1: torch.tensor([[[7, 19], [7, 3]]])})  # column 3 is no longer held
    with pytest.raises(ValueError, match="'error' or 'skip'"):
        kvcache.evict(cache, torch.tensor([[7]]), sliding="drop")


def test_kv_cache_access_and_keep_everything_is_identity(shared_tiny):
    ad = shared_tiny("llama")
    enc = ad.encode("Hello world, this is a test of caches")
    ids = enc.input_ids[None]
    T = ids.shape[1]
    cache, out = kvcache.prefill(ad, enc)
    k, v = kvcache.layer_kv(cache, 0)
    assert k.shape == (1, ad.structure.num_kv_heads, T, ad.structure.head_dim)
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    with torch.no_grad():
        full = ad.model(input_ids=torch.cat([ids, nxt], 1)).logits[:, -1]
    kvcache.evict(cache, torch.arange(T)[None])  # keep everything: identical decode
    o = _decode(ad, cache, nxt, T)
    assert_close(o, full, atol=2e-5 * float(full.abs().max()), rtol=0)
